"""VAE speed: one-shot encode and decode throughput, and the streaming decoder's per-latent-frame latency.

The streaming figure is what StreamingAvatar's decode thread pays for every latent frame it
receives (:meth:`ReferenceGuidedVAE.decode_chunk` with one latent frame -> 4 video frames, feature
cache and reference features reused); real-time needs it under 4 / 25 s = 160 ms. Weights are
random (speed does not depend on them); one reference image guides the VAE, as in streaming.
The paper-scale preset runs only on an accelerator (512 x 512).
"""

from __future__ import annotations

import time
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
    if not device.startswith("cpu"):
        figures |= _bench_preset("ref-dc-f32t4c16", 512, latent_frames, repeats, device)
    return figures
