"""Training throughput: samples/s, model FLOPs utilisation, and Lightning's overhead.

For the teacher stage (tiny presets, random weights, in-memory batches so data loading is not
measured here; `dystream bench data` measures the loader):

- **samples/s** of one optimisation step (forward, backward, AdamW, EMA update);
- **achieved FLOP/s**: the step's FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions and attention, forward + backward; :func:`dystream.bench.cost.flop_counter`) over its
  median time, against the **measured matmul peak** of the same machine and dtype (a large square matmul), i.e.
  model FLOPs utilisation;
- **Lightning overhead**: the same steps run by ``Trainer.fit`` vs a plain PyTorch loop calling
  the stage's own loss, optimiser and EMA (ratio of per-step medians, and of minima; target <= 1.05);
- **cached latents**: the same step on a batch that carries its latents (``LatentDataModule``), i.e. without the
  VAE encoder, and the speed-up over encoding online (mp4 decoding, also saved, is not in this figure);
- **the ``small`` preset** (the issue's MFU goal: >= 30 % of the measured fp32 matmul peak on a CPU): a teacher step
  on cached latents of 128x128 video (16x16 latents, 64 tokens per frame), batch 4 x 5 latent frames, FLOPs from the
  cost model (:func:`dystream.bench.scaled.training_step`). The tiny preset's matmuls (16 tokens per frame, width 64)
  are too small to say anything about utilisation; at ``small`` the step is matmul-bound once a step carries about a
  thousand tokens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dystream.bench.timing import summarize, time_call

BATCH, FRAMES, SIZE = 2, 8, 64


def matmul_peak(device: str, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> dict[str, Any]:
    """Measured FLOP/s of an ``n x n`` matmul (2 n^3 FLOPs) on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_call(lambda: a @ b, repeats=repeats, warmup=2, device=device)
    return summarize([2 * n**3 / t for t in times], "FLOP/s")


def _batch(device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    video = torch.rand(BATCH, 3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1
    batch = {
        "video": video,
        "references": video[:, :, :1].transpose(1, 2).clone(),
        "audio_self": torch.randn(BATCH, FRAMES * 640, generator=g) * 0.1,
        "audio_other": torch.randn(BATCH, FRAMES * 640, generator=g) * 0.1,
        "mask": (torch.arange(FRAMES) < FRAMES // 2).float().expand(BATCH, FRAMES).clone(),
    }
    return {k: v.to(device) for k, v in batch.items()} | {"key": [f"b{i}" for i in range(BATCH)]}


def _teacher(tmp: Path, device: str):
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
    from dystream.stages.teacher import TeacherStage
    from dystream.zoo.files import save_model

    vae = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp / "vae.safetensors", arch="vae")
    return TeacherStage(vae=str(vae), export_dir=str(tmp / "export"), warmup_steps=1).to(device)


def _plain_step(stage, opt, batch) -> None:
    loss, _ = stage._loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(stage.dit.parameters(), 1.0)
    opt.step()
    stage.ema.update(stage.dit, 0)


class _TimedSteps:
    """Lightning callback recording the wall time between consecutive training-batch ends."""

    def __init__(self) -> None:
        import lightning as L

        class Cb(L.Callback):
            def __init__(self, outer):
                self.outer = outer

            def on_train_batch_end(self, *args, **kwargs):
                now = time.perf_counter()
                if self.outer.last is not None:
                    self.outer.times.append(now - self.outer.last)
                self.outer.last = now

        self.times: list[float] = []
        self.last: float | None = None
        self.callback = Cb(self)


def run(
    quick: bool = True,
    device: str = "cpu",
    preset: str | None = None,
    size: str | None = None,
    dtype: str | None = None,
    vae: str | None = None,
    patch: int | None = None,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Without model options: the figures above. With any of them: a teacher step of that DiT preset on latents of
    that size, in that dtype (:func:`dystream.bench.scaled.training_step`)."""
    if any(v is not None for v in (preset, size, dtype, vae, patch, compile)):
        from dystream.bench import scaled

        setup = scaled.Setup.from_options(device, preset, size, dtype, vae, patch, compile=compile)
        return scaled.training_step(setup, repeats=3 if quick else 10)
    import lightning as L

    from dystream.bench.cost import flop_counter

    steps = 10 if quick else 30  # tiny steps take tens of ms: enough of them for a median on a loaded machine
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        stage = _teacher(tmp, device)
        batch = _batch(device)
        opt = torch.optim.AdamW(stage.dit.parameters(), lr=1e-4)

        with flop_counter() as counter:  # FlopCounterMode that also counts the CPU's fused attention
            loss, _ = stage._loss(batch)
            loss.backward()
        step_flops = counter.get_total_flops()
        stage.dit.zero_grad(set_to_none=True)

        plain = time_call(lambda: _plain_step(stage, opt, batch), repeats=steps, warmup=2, device=device)
        plain_s = summarize(plain, "s/step")
        peak = matmul_peak(device)
        figures["teacher step (plain PyTorch)"] = plain_s
        figures["teacher samples/s"] = summarize([BATCH / t for t in plain], "samples/s")
        figures["teacher FLOPs per step"] = float(step_flops)
        figures["matmul peak fp32"] = peak
        achieved = step_flops / plain_s["median"]
        figures["teacher achieved FLOP/s"] = achieved
        figures["teacher MFU (achieved / measured peak)"] = achieved / peak["median"]

        cached = {**batch, "latents": stage.cond.batch_latents(batch)}  # encoded once, as `data encode` does
        latent = time_call(lambda: _plain_step(stage, opt, cached), repeats=steps, warmup=2, device=device)
        latent_s = summarize(latent, "s/step")
        figures["teacher step from cached latents (plain PyTorch)"] = latent_s
        figures["cached-latent speed-up (online / cached step)"] = plain_s["median"] / latent_s["median"]

        # the same steps through Lightning: fit on a list of identical in-memory batches
        timer = _TimedSteps()
        trainer = L.Trainer(
            accelerator="cuda" if device.startswith("cuda") else "cpu",
            devices=1,
            max_steps=steps + 2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=1.0,
            callbacks=[timer.callback],
            default_root_dir=str(tmp),
        )
        loader = torch.utils.data.DataLoader([batch] * (steps + 2), batch_size=None)
        trainer.fit(stage, train_dataloaders=loader)
        light_s = summarize(timer.times[1:], "s/step")  # the first interval still warms up
        figures["teacher step (Lightning Trainer)"] = light_s
        figures["Lightning overhead (Trainer / plain, target <= 1.05)"] = light_s["median"] / plain_s["median"]
        figures["Lightning overhead (minima, the least load-sensitive)"] = light_s["min"] / plain_s["min"]
    figures |= _small(quick, device)
    return figures


def _small(quick: bool, device: str) -> dict[str, Any]:
    from dystream.bench import scaled

    setup = scaled.Setup("small", "tiny", 128, 128, torch.float32, device)
    # quick: one warm-up and one timed step (a few seconds each on two idle cores); full: the median of five
    small = scaled.training_step(setup, repeats=1 if quick else 5, batch=4, frames=5, warmup=1 if quick else 2)
    out = {f"small: {k}": v for k, v in small.items()}
    out["small: MFU target"] = ">= 0.30 of the measured fp32 matmul peak"
    return out
