"""StreamingAvatar end to end: real-time factors per module, first-frame delay, and stability over a long stream.

StreamAvatar §7 / Table 5 report the real-time factor (processing time / media duration) of the DiT and the VAE
and their first-frame delays; a streaming avatar must also stay at the same speed and memory for as long as the
call lasts (Reference Sink + rolling window + RAPR keep every chunk's work constant). This benchmark streams
synthetic speech (both tracks, silero-vad masks, Wav2Vec2 features, 3-step DiT, VAE decode) through one session
in 20 ms packets as fast as possible, the returned frames dropped, and reports the figures below. The long stream
decodes inline (``threaded=False``): on a small shared CPU a decoder thread competing with the DiT for the same
cores blurs every module's busy time, and the per-module RTFs are what the figures are about; the first-frame
delay is measured with the (default) decoder thread.

* ``rtf_dit`` / ``rtf_vae`` / ``rtf_audio``: over the whole stream (< 1: the module keeps up with real time);
* first-frame delay: fresh (warm-process) sessions fed exactly one chunk of audio, median over repeats;
* per-chunk compute time (audio + DiT + VAE of one chunk) at the start of a stream vs after N minutes, as a ratio
  of medians and of minima (target <= 1.1): a fresh session's chunks 5-24 and the long stream's next 20 chunks,
  pushed alternately chunk by chunk so that the load of a shared machine hits both alike;
* resident memory at chunk 25 vs at the end of the stream, after a garbage collection and ``malloc_trim`` (growth
  target <= 5 %), and the KV-cache size.

Quick mode: 30 s of audio (the 2-minute budget of ``make bench QUICK=1``); full mode: 10 minutes. On a CPU one
intra-op thread (at tiny sizes a thread pool only adds synchronisation, which on a loaded shared machine costs more
than the work and swamps the figures). Tiny presets at 64x64 (8x8 latents), random weights: speed does not depend
on them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from dystream.bench.timing import summarize

EARLY = slice(5, 25)  # chunks after warm-up (the first ones pay one-off costs), once the window is full
LATE = 20  # chunks measured after the long stream
RSS_EVERY = 25  # chunks between memory samples
PACKET = 320  # 20 ms


def _rss_bytes() -> int:
    """Resident memory after a garbage collection and, on glibc, returning freed heap pages to the system, so that
    the figure follows live memory rather than allocator caching (which fluctuates by tens of MiB)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _speech(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Turn-taking synthetic speech of both speakers (the synthetic world's voices), tiled to ``seconds``."""
    from dystream.datamodules.synthetic import sample_conversation, sample_identity, synthesize_speech

    rng = np.random.default_rng(seed)
    base = 20.0
    me, you = sample_conversation(base, rng)
    n = int(base * 16000)
    own = synthesize_speech(me, sample_identity("self", rng), n, rng)[0]
    other = synthesize_speech(you, sample_identity("other", rng), n, rng)[0]
    reps = int(np.ceil(seconds / base))
    total = int(seconds * 16000)
    return np.tile(own, reps)[:total], np.tile(other, reps)[:total]


def _networks(device: str):
    from dystream.models.audio import AudioEncoder
    from dystream.models.dit import AvatarDiT, DiTConfig
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig

    torch.manual_seed(0)
    return (
        AvatarDiT(DiTConfig.from_preset("tiny")).to(device),
        ReferenceGuidedVAE(VAEConfig.from_preset("tiny")).to(device),
        AudioEncoder("tiny").to(device),
    )


def run(
    quick: bool = True,
    device: str = "cpu",
    preset: str | None = None,
    size: str | None = None,
    dtype: str | None = None,
    vae: str | None = None,
    patch: int | None = None,
    vae_device: str | None = None,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Without model options: the long-stream figures above. With any of them: 20 chunks (5 in quick mode) of that
    DiT / VAE pair at that size and dtype, the VAE on ``vae_device`` if given (:func:`dystream.bench.scaled.stream`)."""
    if any(v is not None for v in (preset, size, dtype, vae, patch, vae_device, compile)):
        from dystream.bench import scaled

        setup = scaled.Setup.from_options(device, preset, size, dtype, vae, patch, vae_device, compile)
        return scaled.stream(setup, chunks=5 if quick else 20)
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(quick, device)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, device: str) -> dict[str, Any]:
    from dystream.streaming.avatar import StreamingAvatar

    minutes = 0.5 if quick else 10
    size = 64
    nets = _networks(device)
    reference = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    own, other = _speech(60.0 * minutes + 30.0)  # the last 30 s feed the interleaved late chunks

    def new_session(threaded: bool = False) -> StreamingAvatar:
        return StreamingAvatar(*nets, reference, size=size, device=device, threaded=threaded)

    # 1. the long stream: RTFs and memory
    late = new_session()
    chunk = late.frames_per_chunk * 640
    stream_end = int(60 * minutes * 16000)
    rss: list[int] = []
    frames = 0
    start = time.perf_counter()
    for lo in range(0, stream_end, PACKET):
        frames += len(late.push(own[lo : lo + PACKET], other[lo : lo + PACKET]))
        if (lo + PACKET) % (RSS_EVERY * chunk) < PACKET:
            rss.append(_rss_bytes())
    wall = time.perf_counter() - start
    stream_stats = late.stats()

    # 2. per-chunk compute early vs late, packets pushed alternately so that machine load hits both alike: a fresh
    #    session's chunks 5-24 against the long stream's next 20 chunks
    early = new_session()
    for lo in range(0, EARLY.start * chunk, PACKET):
        early.push(own[lo : lo + PACKET], other[lo : lo + PACKET])
    for lo in range(EARLY.start * chunk, EARLY.stop * chunk, PACKET):
        early.push(own[lo : lo + PACKET], other[lo : lo + PACKET])
        at = stream_end + lo - EARLY.start * chunk
        late.push(own[at : at + PACKET], other[at : at + PACKET])
    early.flush()
    late.flush()
    e_stats, l_stats = early.stats(), late.stats()

    def compute(stats: dict[str, Any]) -> list[float]:
        keys = ("chunk_audio_s", "chunk_dit_s", "chunk_vae_s")
        return [sum(parts) for parts in zip(*(stats[k] for k in keys), strict=True)]

    # chunk j is generated once its look-ahead arrived, i.e. during the push of chunk j + 1: skip the flush's one
    e_chunks = compute(e_stats)[EARLY.start - 1 : EARLY.stop - 1]
    l_chunks = compute(l_stats)[-LATE - 1 : -1]

    ffd, ffd_dit, ffd_vae = [], [], []
    for _ in range(3 if quick else 5):  # first-frame delay of fresh sessions in a warm process
        fresh = new_session(threaded=True)
        need = (fresh.frames_per_chunk + fresh.lookahead + 1) * 640
        fresh.push(own[:need], other[:need])
        fresh.flush()
        s = fresh.stats()
        ffd.append(s["first_frame_delay_s"])
        ffd_dit.append(s["ffd_dit_s"])
        ffd_vae.append(s["ffd_vae_s"])

    rss_early, rss_late = rss[0], rss[-1]
    return {
        "setup": f"tiny DiT/VAE/audio at {size}x{size}, {minutes} min of two-speaker synthetic speech in 20 ms packets "
        f"as fast as possible, {late.sigmas.numel()} steps, C={late.chunk_frames}, silero-vad masks, "
        f"VAE decode inline (threaded for the first-frame delay), torch threads {torch.get_num_threads()}, "
        f"device {device}",
        "frames": frames,
        "wall time / audio time (sum of the modules: decode inline)": wall / (stream_end / 16000),
        "rtf DiT": stream_stats["rtf_dit"],
        "rtf VAE": stream_stats["rtf_vae"],
        "rtf audio (Wav2Vec2 + VAD)": stream_stats["rtf_audio"],
        "first-frame delay (chunk audio complete -> first frame)": summarize(ffd, "s"),
        "first-frame delay, DiT": summarize(ffd_dit, "s"),
        "first-frame delay, VAE": summarize(ffd_vae, "s"),
        "algorithmic latency (chunk + look-ahead audio)": f"{stream_stats['algorithmic_latency_s']:.3f} s",
        "chunk compute, fresh session chunks 5-24": summarize(e_chunks, "s"),
        f"chunk compute, {LATE} chunks after {minutes} min": summarize(l_chunks, "s"),
        "chunk compute ratio late / early (medians; target <= 1.1)": statistics.median(l_chunks)
        / statistics.median(e_chunks),
        "chunk compute ratio late / early (minima)": min(l_chunks) / min(e_chunks),
        f"RSS at chunk {RSS_EVERY}": f"{rss_early / 2**20:.1f} MiB",
        f"RSS after {minutes} min": f"{rss_late / 2**20:.1f} MiB",
        f"RSS max over the stream (sampled every {RSS_EVERY} chunks)": f"{max(rss) / 2**20:.1f} MiB",
        "RSS growth (target <= 5 %)": f"{100 * (rss_late - rss_early) / rss_early:.2f} %",
        "KV cache": f"{stream_stats['kv_cache_frames']} frames, {stream_stats['kv_cache_bytes'] / 2**10:.0f} KiB",
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
