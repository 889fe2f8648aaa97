"""FSDP on CPU (gloo, 2 processes): the tiny SiD stage (manual optimization, two optimizers, frozen teacher, EMA)
trains a few steps under Lightning's FSDPStrategy as recipes/scale/fsdp.yaml configures it (AvatarBlock policy
completed by FSDPUnits, activation checkpointing, FSDPMixedPrecision, sharded checkpoints; fp32 on CPU), resumes
from its sharded checkpoint, and ``dystream consolidate`` turns that checkpoint into the EMA student's safetensors file.

Two test-side adaptations, both stated where they are made: Lightning refuses ``FSDPStrategy`` on a CPU
accelerator by an exact type check, so the worker uses a subclass that changes nothing else; and the tiny presets'
learned prompt constant (a direct parameter of the DiT, outside every FSDP unit) is frozen, as the real presets'
prompt context is (FSDPUnits refuses a trainable parameter outside the units, see ``test_scale.py``).
This file is also the 2-rank worker: ``torchrun --nproc_per_node 2 tests/test_scale_fsdp.py --worker ARGS``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_scale_ddp import SAMPLES, finish_ranks, fit, launch  # noqa: E402
from test_stage1_common import make_files, prompt_batch  # noqa: E402


def fsdp_on_cpu_unsupported() -> str | None:
    """Why FSDP cannot run on this machine's CPU, or None."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
    except ImportError as exc:
        return f"torch FSDP is not importable ({exc})"
    return None


def build(files: dict[str, str], out: str):
    from dystream.stages.stage1_sid import SiDStage

    stage = SiDStage(
        student=files["teacher"],
        teacher=files["teacher"],
        vae=files["vae"],
        audio=files["audio"],
        generator_every=2,
        ema_decay=0.5,
        export_dir=out,
    )
    for net in (stage.student, stage.fake_score):
        net.text_context.requires_grad_(False)  # the tiny presets' learned prompt; real presets have a fixed one
    return stage


def cpu_fsdp_strategy():
    """fsdp.yaml's strategy settings on Lightning's FSDPStrategy."""
    from lightning.pytorch.strategies import FSDPStrategy

    from dystream.models.dit import AvatarBlock

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning's FSDPStrategy, unchanged: a subclass only passes the connector's CUDA-only type check."""

    return CPUFSDPStrategy(
        auto_wrap_policy={AvatarBlock},
        activation_checkpointing_policy={AvatarBlock},
        sharding_strategy="FULL_SHARD",
        state_dict_type="sharded",
    )


def trainer(epochs: int):
    import lightning as L

    from dystream.scale import FSDPMixedPrecision, FSDPUnits, ResumeState, StrategyCheck

    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=cpu_fsdp_strategy(),
        # fp32 here: CPU autocast leaves layer_norm's bf16-gathered weights uncast (CUDA autocast casts them)
        plugins=[FSDPMixedPrecision("32-true")],
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[FSDPUnits(), StrategyCheck(), ResumeState()],
    )


def full_state(module: torch.nn.Module, root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``module`` (a collective: every rank calls it; rank 0 gets the tensors)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False)):
        return {k: v.clone() for k, v in module.state_dict().items()}


def worker(args: dict) -> None:
    import lightning as L
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.utils.data import DataLoader

    from dystream.scale import FSDPMixedPrecision, FSDPUnits, sharded_grad_norm

    torch.set_num_threads(1)
    out, files = Path(args["out"]), args["files"]
    rank = int(os.environ["RANK"])
    data = DataLoader([prompt_batch([f"r{rank}b{i}"], seed=10 * rank + i) for i in range(2)], batch_size=None)

    L.seed_everything(0, verbose=False)
    stage = build(files, str(out / "export"))
    first = trainer(epochs=1)
    first.fit(stage, train_dataloaders=data)
    block = stage.student.blocks[0]
    local = sum(p.numel() for p in block.parameters())
    full = sum(v.numel() for v in full_state(block, stage).values())
    metrics = {k: float(v) for k, v in first.callback_metrics.items()}
    # the clipping norm of FSDPMixedPrecision over gradient shards vs the norm of the gathered gradients
    sharded_norm = float(sharded_grad_norm(stage.fake_score.parameters()))
    with FSDP.summon_full_params(stage.fake_score, with_grads=True):
        grads = [p.grad.flatten() for p in stage.fake_score.parameters() if p.grad is not None]
        full_norm = float(torch.linalg.vector_norm(torch.cat(grads).double()))
    first.save_checkpoint(out / "sharded.ckpt")
    ema, student = full_state(stage.ema.shadow, stage), full_state(stage.student, stage)
    report = {
        "wrapped": isinstance(block, FSDP),
        "local": local,
        "full": full,
        "metrics": metrics,
        "counters": [int(stage.sid_step), int(stage.generator_steps)],
        "norms": [sharded_norm, full_norm],
    }

    L.seed_everything(1, verbose=False)
    resumed = build(files, str(out / "export"))
    second = trainer(epochs=2)
    second.fit(resumed, train_dataloaders=data, ckpt_path=str(out / "sharded.ckpt"))
    report["resumed_counters"] = [int(resumed.sid_step), int(resumed.generator_steps)]
    report["resumed_metrics"] = {k: float(v) for k, v in second.callback_metrics.items()}
    report["resumed_student_changed"] = any(
        not torch.equal(v, student[k]) for k, v in full_state(resumed.student, resumed).items()
    )

    # the teacher (automatic optimization, gradient clipping through FSDPMixedPrecision, EMA on shards) against one
    # process with the same global batch, as tests/test_scale_ddp.py does for DDP
    def gathered(st) -> dict[str, torch.Tensor]:
        state = {f"dit.{k}": v for k, v in full_state(st.dit, st).items()}
        return state | {f"ema.{k}": v for k, v in full_state(st.ema.shadow, st).items()}

    teacher_losses, teacher = fit(
        files["vae"],
        str(out / "teacher"),
        devices=2,
        batch_size=SAMPLES // 4,
        strategy=cpu_fsdp_strategy(),
        plugins=[FSDPMixedPrecision("32-true")],
        callbacks=[FSDPUnits()],
        freeze_prompt=True,
        weights=gathered,
    )
    report["teacher_losses"] = teacher_losses
    (out / f"report{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        torch.save({"ema": ema, "student": student, "teacher": teacher}, out / "full.pt")


@pytest.mark.skipif(fsdp_on_cpu_unsupported() is not None, reason=str(fsdp_on_cpu_unsupported()))
def test_fsdp_sid_trains_resumes_and_consolidates_on_cpu(tmp_path):
    from dystream.consolidate import checkpoint_kind, consolidate
    from dystream.zoo.files import load_model

    files = make_files(tmp_path / "files")
    out = tmp_path / "run"
    out.mkdir()
    launch(Path(__file__), 2, {"files": files, "out": str(out)})
    report, other = (json.loads((out / f"report{r}.json").read_text()) for r in range(2))
    assert report["wrapped"] and report["local"] < report["full"]  # the block is sharded: each rank holds a part
    assert report["norms"][0] == pytest.approx(report["norms"][1], rel=1e-6) and report["norms"][0] > 0
    assert report["norms"] == pytest.approx(other["norms"], rel=1e-9)  # one global norm on both ranks
    assert report["counters"] == [2, 1]  # 2 fake-score updates, 1 generator update (generator_every=2)
    assert all(torch.isfinite(torch.tensor(v)) for v in report["metrics"].values())
    assert {"train/loss_fake", "train/loss_generator"} <= report["metrics"].keys()
    assert report["resumed_counters"] == [4, 2]  # the resumed run continued the alternation
    assert report["resumed_student_changed"]

    ckpt = out / "sharded.ckpt"
    assert checkpoint_kind(ckpt) == "fsdp" and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    recipe = tmp_path / "sid.yaml"
    recipe.write_text("model:\n  class_path: dystream.stages.stage1_sid.SiDStage\n")
    (path,) = consolidate(ckpt, recipe, tmp_path / "export")
    assert path.name == "student.safetensors"
    exported = load_model(path, arch="dit").state_dict()
    expected = torch.load(out / "full.pt", weights_only=True)["ema"]
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    teacher = load_model(files["teacher"], arch="dit").state_dict()
    assert any(not torch.equal(exported[k], teacher[k]) for k in teacher)  # the EMA moved away from the init

    # FSDP teacher == one process with the same global batch (gradient reduction, sharded norm clipping, EMA)
    one_losses, one = fit(files["vae"], str(tmp_path / "one"), devices=1, batch_size=SAMPLES // 2, freeze_prompt=True)
    two_losses = [(a + b) / 2 for a, b in zip(report["teacher_losses"], other["teacher_losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-4, atol=1e-6)
    sharded = torch.load(out / "full.pt", weights_only=True)["teacher"]
    assert sharded.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-3, atol=2e-5, msg=key)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
    finish_ranks()
