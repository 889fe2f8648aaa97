"""Streaming AvatarDiT: per-chunk latency early vs. deep into a stream, and the KV-cache size at both.

With the Reference Sink + rolling window (StreamAvatar §3.1.1) a chunk attends to a constant number of key
frames once the window is full (paper numbers: sink 4 + window 6 + itself 3), so latency and cache memory must
not grow with the stream: the figure of merit is the median latency at chunk 500 over chunk 5 (target <= 1.1).

Two operations are timed on the same stream, positioned once at chunk 5 and once at chunk 500 (forked caches,
measured alternately so machine load hits both alike):

* denoise step: ``forward_chunk(..., write_cache=False)``, what the N-step student runs N - 1 times per chunk;
* final step: ``forward_chunk(..., write_cache=True)`` on a fork of the cache, i.e. attend + append + evict.

Quick mode: the ``tiny`` preset at 8x8 latents (64x64 video), on one CPU thread (at these sizes a thread pool
only adds scheduling noise, which on a shared machine swamps the ratio). Full mode: the ``small`` preset at 16x16
latents on CUDA (8x8 on a CPU) with the process's threads; there the stream is fast-forwarded to chunk 500 by
appending zero K/V (latency depends on the cache's shapes and RoPE indices, not on its values), while quick mode
really generates all 500 chunks. Weights are random; speed does not depend on them.
Ratios are given for medians and for minima (the minimum is the least load-sensitive estimate).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from dystream.bench.timing import summarize
from dystream.models.attention import KVCache
from dystream.models.dit import AvatarDiT, DiTConfig

EARLY_CHUNK = 5
LATE_CHUNK = 500


def _fork(cache: KVCache) -> KVCache:
    """A copy of the stream state that can be advanced without touching ``cache`` (tensors are never mutated)."""
    return dataclasses.replace(cache, keys=list(cache.keys), values=list(cache.values), frame_ids=list(cache.frame_ids))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """Without model options: the stream-length figures above. With any of them: the chunk step of that preset at
    that size and dtype (:func:`dystream.bench.scaled.dit_chunk`: step time, memory, FLOP/s, MFU, RTF)."""
    if any(v is not None for v in (preset, size, dtype, vae, patch, compile)):
        from dystream.bench import scaled

        setup = scaled.Setup.from_options(device, preset, size, dtype, vae, patch, compile=compile)
        return scaled.dit_chunk(setup, repeats=5 if quick else 20)
    dev = torch.device(device)
    threads = torch.get_num_threads()
    if quick and dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(quick, dev)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, dev: torch.device) -> dict[str, Any]:
    if quick:
        preset, hw, repeats = "tiny", 8, 100
    else:
        preset, hw, repeats = "small", 16 if dev.type == "cuda" else 8, 20
    torch.manual_seed(0)
    model = AvatarDiT(DiTConfig.from_preset(preset)).to(dev).eval()
    cfg = model.config
    c = cfg.chunk_frames
    x = torch.randn(1, cfg.in_channels, c, hw, hw, device=dev)
    sigma = torch.full((1, c), 0.5, device=dev)
    audio = torch.randn(1, cfg.chunk_audio_frames(c), cfg.audio_dim, device=dev)

    def step(cache: KVCache, write: bool) -> float:
        _sync(dev)
        start = time.perf_counter()
        model.forward_chunk(x, sigma, audio, audio, cache, write_cache=write)
        _sync(dev)
        return time.perf_counter() - start

    with torch.inference_mode():
        cache = model.new_kv_cache(1)
        model.forward_chunk(torch.randn(1, cfg.in_channels, 1, hw, hw, device=dev), sigma[:, :1] * 0, None, None, cache)
        positioned: dict[int, KVCache] = {}
        for chunk in range(1, LATE_CHUNK + 1):  # chunk k starts at latent frame 1 + (k - 1) C
            if chunk in (EARLY_CHUNK, LATE_CHUNK):
                positioned[chunk] = _fork(cache)
            if chunk < LATE_CHUNK:
                if quick:
                    model.forward_chunk(x, sigma, audio, audio, cache)
                else:  # fast-forward: latency depends on the cache's shapes and indices, not on its values
                    kv = torch.zeros(1, c, (hw // 2) ** 2, cfg.num_heads, cfg.head_dim, device=dev)
                    cache.append([(kv, kv)] * cfg.num_layers, cache.next_frame, c)
        for chunk in positioned:  # warm-up
            step(positioned[chunk], False)
        samples: dict[tuple[int, bool], list[float]] = {(k, w): [] for k in positioned for w in (False, True)}
        for _ in range(repeats):
            for k, stream in positioned.items():
                samples[(k, False)].append(step(stream, False))
                samples[(k, True)].append(step(_fork(stream), True))

    figures: dict[str, Any] = {"preset": f"{preset}, latents {hw}x{hw}, C={c}, sink={cfg.layout.sink_frames}, "
                                         f"window={cfg.window_frames}, D={cfg.rapr_max_distance}, "
                                         f"torch threads {torch.get_num_threads()}"}  # fmt: skip
    for k, stream in positioned.items():
        figures[f"chunk {k}: denoise step (attend, no write)"] = summarize(samples[(k, False)], "s")
        figures[f"chunk {k}: final step (attend + write + evict)"] = summarize(samples[(k, True)], "s")
        figures[f"chunk {k}: cache frames"] = stream.num_frames
        figures[f"chunk {k}: cache size"] = f"{stream.nbytes() / 2**20:.3f} MiB"
    for write, name in ((False, "denoise step"), (True, "final step")):
        early, late = (summarize(samples[(k, write)], "s") for k in (EARLY_CHUNK, LATE_CHUNK))
        key = f"latency ratio chunk {LATE_CHUNK} / chunk {EARLY_CHUNK} ({name}"
        figures[f"{key}, medians; target <= 1.1)"] = late["median"] / early["median"]
        figures[f"{key}, minima)"] = late["min"] / early["min"]
    return figures
