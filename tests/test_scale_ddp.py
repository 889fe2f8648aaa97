"""DDP parity: the tiny teacher stage on 2 processes (gloo, CPU) follows the 1-process run with the same global batch.

Both runs go through Lightning's Trainer (DDPStrategy, AdamW, warm-up schedule, gradient clipping at every step,
EMA). The only test-side change is where the teacher's noise comes from: per sample, seeded by the sample's key and
the step (the stage draws it per batch from the global generator, which two ranks cannot split the way one process
does), so the two runs see the same noise and the same data, and differ only in how gradients are summed. This file
is also the 2-rank worker: ``torchrun --nproc_per_node 2 tests/test_scale_ddp.py --worker ARGS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import Tensor

STEPS = 3
SAMPLES = 8


def noise_per_sample_stage():
    from dystream.stages.teacher import TeacherStage

    class NoisePerSampleTeacher(TeacherStage):
        """TeacherStage whose noise is a function of (sample key, step): identical for any split of the batch."""

        def _loss(self, batch, generator=None):
            if generator is not None:
                return super()._loss(batch, generator)
            losses, logs = [], {}
            for i, key in enumerate(batch["key"]):
                g = torch.Generator().manual_seed(zlib.crc32(f"{key}:{int(self.global_step)}".encode()))
                one = {k: v[i : i + 1] for k, v in batch.items()}
                loss, logs = super()._loss(one, generator=g)
                losses.append(loss)
            return torch.stack(losses).mean(), logs  # equal-size samples: the batch mean

    return NoisePerSampleTeacher


def samples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(SAMPLES):
        video = torch.rand(3, 8, 64, 64, generator=g) * 2 - 1
        out.append(
            {
                "video": video,
                "references": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
                "audio_self": torch.randn(8 * 640, generator=g) * 0.1,
                "audio_other": torch.randn(8 * 640, generator=g) * 0.1,
                "mask": (torch.arange(8) < 4).float(),
                "key": f"clip{i}",
            }
        )
    return out


def fit(
    vae: str,
    out: str,
    devices: int,
    batch_size: int,
    strategy=None,
    plugins=None,
    callbacks=(),
    freeze_prompt: bool = False,
    weights=None,
) -> tuple[list[float], dict[str, Tensor]]:
    """Fit STEPS steps; returns this rank's per-step losses and the DiT and EMA weights (``weights(stage)`` if given).

    ``freeze_prompt`` freezes the tiny preset's learned prompt constant (FSDP refuses a trainable parameter outside
    its units; the real presets' prompt is fixed anyway).
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    stage = noise_per_sample_stage()(vae=vae, export_dir=out, warmup_steps=2, lr=1e-3, ema_decay=0.5)
    if freeze_prompt:
        stage.dit.text_context.requires_grad_(False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy or ("ddp" if devices > 1 else "auto"),
        plugins=plugins,
        max_steps=STEPS,
        gradient_clip_val=0.1,  # below the gradient norm (about 0.3): every step is clipped
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[Record(), *callbacks],
    )
    # each rank reads every devices-th sample, so step s of the 2-rank run covers the samples of step s of one rank
    rank = int(os.environ.get("RANK", 0))
    data = DataLoader(samples()[rank::devices], batch_size=batch_size, shuffle=False)
    trainer.fit(stage, train_dataloaders=data)
    if weights is not None:
        return losses, weights(stage)
    state = {f"dit.{k}": v.clone() for k, v in stage.dit.state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in stage.ema.shadow.state_dict().items()})
    return losses, state


def worker(args: dict) -> None:
    torch.set_num_threads(1)
    losses, weights = fit(args["vae"], args["out"], devices=2, batch_size=SAMPLES // 2 // 2)
    rank = int(os.environ["RANK"])
    Path(args["out"], f"losses{rank}.json").write_text(json.dumps(losses))
    if rank == 0:
        torch.save(weights, Path(args["out"], "weights.pt"))


def launch(script: Path, nproc: int, args: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` on ``script --worker ARGS`` (gloo on CPU, one thread per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(
        [*cmd, str(script), "--worker", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:  # the whole of both tails: pytest would cut an assertion's repr mid-traceback
        tails = f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        pytest.fail(f"torchrun exited {proc.returncode}\n{tails}", pytrace=False)
    return proc


def finish_ranks() -> None:
    """End a worker in step and without C++ teardown: every rank reaches a barrier (all outputs are written), then
    leaves with ``os._exit(0)``.

    A normal interpreter exit destroys the process group's and the libraries' native threads in whatever state they
    are in; a thread object destroyed while still joinable calls std::terminate ("terminate called without an active
    exception", SIGABRT), which fails a run whose results were all written.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
    from dystream.zoo.files import save_model

    torch.manual_seed(0)
    vae = str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", arch="vae"))
    out2 = tmp_path / "ddp"
    out2.mkdir()
    launch(Path(__file__), 2, {"vae": vae, "out": str(out2)})
    one_losses, one_weights = fit(vae, str(tmp_path / "one"), devices=1, batch_size=SAMPLES // 2)

    ranks = [json.loads((out2 / f"losses{r}.json").read_text()) for r in range(2)]
    assert len(one_losses) == len(ranks[0]) == len(ranks[1]) == STEPS
    two_losses = [(a + b) / 2 for a, b in zip(*ranks, strict=True)]  # each rank's loss is its half of the batch
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-4, atol=1e-6)
    assert ranks[0] != ranks[1]  # the ranks did see different samples
    two_weights = torch.load(out2 / "weights.pt", weights_only=True)
    assert two_weights.keys() == one_weights.keys()
    for key, value in one_weights.items():  # after 3 AdamW steps (DiT) and EMA updates
        torch.testing.assert_close(two_weights[key], value, rtol=1e-3, atol=2e-5, msg=key)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
    finish_ranks()
