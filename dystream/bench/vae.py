"""VAE speed: one-shot encode and decode throughput, and the streaming decoder's per-latent-frame latency.

The streaming figure is what StreamingAvatar's decode thread pays for every latent frame it
receives (:meth:`ReferenceGuidedVAE.decode_chunk` with one latent frame -> 4 video frames, feature
cache and reference features reused); real-time needs it under 4 / 25 s = 160 ms. Weights are
random (speed does not depend on them); one reference image guides the VAE, as in streaming.
The paper-scale preset runs only on an accelerator (512 x 512).

The training step of the embedded recipe (forward, the pixel losses and KL, backward, Adam; batch 2 x 24-frame
windows at 64x64, K = 1 and K = 0 guidance images, as the recipe draws them) in float32 and under bf16 autocast
(``trainer.precision: bf16-mixed``), with the ratio of their medians: what bf16 buys the VAE stage's 15-minute
budget (docs/vae.md). On a CPU bf16 is timed only where oneDNN has it natively (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from dystream.bench.timing import summarize, time_call
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig

FPS = 25


def _bench_preset(preset: str, size: int, latent_frames: int, repeats: int, device: str) -> dict[str, Any]:
    cfg = VAEConfig.from_preset(preset)
    torch.manual_seed(0)
    vae = ReferenceGuidedVAE(cfg).to(device).eval()
    r_t = cfg.temporal_factor
    frames = 1 + r_t * (latent_frames - 1)
    video = torch.rand(1, 3, frames, size, size, device=device) * 2 - 1
    refs = video[:, :, :1].transpose(1, 2).contiguous()  # [1, K=1, 3, H, W]
    figures: dict[str, Any] = {}
    with torch.inference_mode():
        z = vae.encode(video, refs)
        enc = time_call(lambda: vae.encode(video, refs), repeats, 1, device)
        dec = time_call(lambda: vae.decode(z, refs), repeats, 1, device)
        figures[f"{preset} {size}px: encode {frames} frames"] = summarize([frames / t for t in enc], "frames/s")
        figures[f"{preset} {size}px: decode {frames} frames"] = summarize([frames / t for t in dec], "frames/s")

        latencies: list[float] = []
        for _ in range(repeats):
            cache = vae.new_decode_cache(refs)
            vae.decode_chunk(z[:, :, :1], cache)  # the reference frame: 1 video frame, not a steady-state cost
            for i in range(1, latent_frames):
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                vae.decode_chunk(z[:, :, i : i + 1], cache)
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                latencies.append(time.perf_counter() - start)
        latency = summarize([1000 * t for t in latencies], "ms")
        figures[f"{preset} {size}px: streaming decode latency per latent frame ({r_t} frames)"] = latency
        figures[f"{preset} {size}px: streaming decode real-time factor at {FPS} fps"] = (r_t / FPS) / (
            latency["median"] / 1000
        )
    return figures


def _bench_training_step(repeats: int, device: str) -> dict[str, Any]:
    from dystream.cli import cpu_has_native_bf16
    from dystream.stages.vae import VAEStage

    torch.manual_seed(0)
    stage = VAEStage(preset="tiny", face_weight=0.0, mouth_weight=0.0, hands_weight=0.0, disc_weight=0.0,
                     lpips_weight=0.0, max_references=1, export_dir="unused").to(device)  # fmt: skip
    opt = torch.optim.Adam(stage.vae.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    batch = {
        "video": (torch.rand(2, 3, 24, 64, 64, generator=g) * 2 - 1).to(device),
        "references": (torch.rand(2, 2, 3, 64, 64, generator=g) * 2 - 1).to(device),
    }
    precisions = ["fp32"]
    if device.startswith("cuda") or cpu_has_native_bf16():
        precisions.append("bf16")

    def step(precision: str, k: int) -> None:
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            loss = stage.vae_loss(batch, k)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    figures: dict[str, Any] = {}
    medians: dict[str, float] = {}
    for precision in precisions:
        for k in (1, 0):
            name = f"tiny 64px training step, K = {k}, {precision}"
            figures[name] = summarize(time_call(partial(step, precision, k), repeats, 2, device), "s")
            medians[f"{precision} {k}"] = figures[name]["median"]
    if "bf16" in precisions:
        mean = {p: (medians[f"{p} 1"] + medians[f"{p} 0"]) / 2 for p in precisions}
        figures["tiny 64px training step: bf16 / fp32 (mean of K = 0 and 1)"] = mean["bf16"] / mean["fp32"]
    return figures


def run(
    quick: bool = True,
    device: str = "cpu",
    preset: str | None = None,
    size: str | None = None,
    dtype: str | None = None,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Without model options: the figures above. With any of them (``preset`` is the VAE preset here): the streaming
    decode of that preset at that size and dtype (:func:`dystream.bench.scaled.vae_decode`)."""
    if any(v is not None for v in (preset, size, dtype, compile)):
        from dystream.bench import scaled

        setup = scaled.Setup.from_options(device, None, size, dtype, preset or "tiny", 1, compile=compile)
        return scaled.vae_decode(setup, repeats=3 if quick else 10)
    repeats = 3 if quick else 10
    latent_frames = 3 if quick else 13  # 9 or 49 video frames
    figures = _bench_preset("tiny", 64, latent_frames, repeats, device)
    figures |= _bench_training_step(5 if quick else 12, device)
    if not device.startswith("cpu"):
        figures |= _bench_preset("ref-dc-f32t4c16", 512, latent_frames, repeats, device)
    return figures
