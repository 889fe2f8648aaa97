"""StreamingAvatar end to end: real-time factors per module, first-frame delay, and stability over a long stream.

StreamAvatar §7 / Table 5 report the real-time factor (processing time / media duration) of the DiT and the VAE
and their first-frame delays; a streaming avatar must also stay at the same speed and memory for as long as the
call lasts (Reference Sink + rolling window + RAPR keep every chunk's work constant). This benchmark streams
synthetic speech (both tracks, silero-vad masks, Wav2Vec2 features, 3-step DiT, threaded VAE decode) through one
session in 20 ms packets as fast as possible, the returned frames dropped, and reports:

* ``rtf_dit`` / ``rtf_vae`` / ``rtf_audio``: over the whole stream (< 1: the module keeps up with real time);
* first-frame delay: fresh (warm-process) sessions fed exactly one chunk of audio, median over repeats;
* per-chunk compute time (audio + DiT + VAE of one chunk) for chunks 5-24 vs the last 20 chunks of the stream,
  as a ratio of medians and of minima (target <= 1.1);
* resident memory after chunk 25 vs at the end of the stream (growth target <= 5 %), and the KV-cache size.

Quick mode: 1 minute of audio, one intra-op thread (at tiny sizes a thread pool only adds scheduling noise, which
on a shared machine swamps the figures); full mode: 10 minutes with the process's threads. Tiny presets at 64x64
(8x8 latents), random weights: speed does not depend on them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from dystream.bench.timing import summarize

EARLY = slice(5, 25)  # chunks after warm-up (the first ones pay one-off costs), once the window is full
LATE = 20  # the last chunks of the stream
PACKET = 320  # 20 ms


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


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


def run(quick: bool = True, device: str = "cpu") -> dict[str, Any]:
    threads = torch.get_num_threads()
    if quick and torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(quick, device)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, device: str) -> dict[str, Any]:
    from dystream.streaming.avatar import StreamingAvatar

    minutes = 1 if quick else 10
    size = 64
    nets = _networks(device)
    reference = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    own, other = _speech(60.0 * minutes)

    session = StreamingAvatar(*nets, reference, size=size, device=device)
    chunk_samples = session.frames_per_chunk * 640
    rss_early = None
    frames = 0
    start = time.perf_counter()
    for lo in range(0, own.shape[0], PACKET):
        frames += len(session.push(own[lo : lo + PACKET], other[lo : lo + PACKET]))
        if rss_early is None and lo >= 25 * chunk_samples:
            rss_early = _rss_bytes()
    frames += len(session.flush())
    wall = time.perf_counter() - start
    rss_late = _rss_bytes()
    stats = session.stats()
    per_chunk = [a + d + v for a, d, v in zip(stats["chunk_audio_s"], stats["chunk_dit_s"], stats["chunk_vae_s"],
                                              strict=True)]  # fmt: skip
    early, late = per_chunk[EARLY], per_chunk[-LATE:]

    ffd, ffd_dit, ffd_vae = [], [], []
    for _ in range(3 if quick else 5):  # first-frame delay of fresh sessions in a warm process
        fresh = StreamingAvatar(*nets, reference, size=size, device=device)
        need = (session.frames_per_chunk + session.lookahead + 1) * 640
        fresh.push(own[:need], other[:need])
        fresh.flush()
        s = fresh.stats()
        ffd.append(s["first_frame_delay_s"])
        ffd_dit.append(s["ffd_dit_s"])
        ffd_vae.append(s["ffd_vae_s"])

    return {
        "setup": f"tiny DiT/VAE/audio at {size}x{size}, {minutes} min of two-speaker synthetic speech in 20 ms packets "
        f"as fast as possible, {session.sigmas.numel()} steps, C={session.chunk_frames}, silero-vad masks, "
        f"threaded VAE decode, torch threads {torch.get_num_threads()}, device {device}",
        "frames": frames,
        "wall time / audio time": wall / (own.shape[0] / 16000),
        "rtf DiT": stats["rtf_dit"],
        "rtf VAE": stats["rtf_vae"],
        "rtf audio (Wav2Vec2 + VAD)": stats["rtf_audio"],
        "first-frame delay (chunk audio complete -> first frame)": summarize(ffd, "s"),
        "first-frame delay, DiT": summarize(ffd_dit, "s"),
        "first-frame delay, VAE": summarize(ffd_vae, "s"),
        "algorithmic latency (chunk + look-ahead audio)": f"{stats['algorithmic_latency_s']:.3f} s",
        "chunk compute, chunks 5-24": summarize(early, "s"),
        f"chunk compute, last {LATE} chunks (after {minutes} min)": summarize(late, "s"),
        "chunk compute ratio late / early (medians; target <= 1.1)": statistics.median(late) / statistics.median(early),
        "chunk compute ratio late / early (minima)": min(late) / min(early),
        "RSS after chunk 25": f"{rss_early / 2**20:.1f} MiB" if rss_early else "n/a",
        "RSS at the end": f"{rss_late / 2**20:.1f} MiB",
        "RSS growth (target <= 5 %)": f"{100 * (rss_late - rss_early) / rss_early:.2f} %" if rss_early else "n/a",
        "KV cache": f"{stats['kv_cache_frames']} frames, {stats['kv_cache_bytes'] / 2**10:.0f} KiB",
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
