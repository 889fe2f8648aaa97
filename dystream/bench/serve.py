"""`dystream serve` under load: 1 and 2 concurrent calls on this machine, each a Python aiortc client on loopback
sending real-time synthetic speech as its microphone and receiving the avatar's video and voice.

Figures per load level (median over the calls' frames): audio-in -> frame-out latency (the server had the last
sample of a frame's audio -> the frame went to the video encoder; algorithmic latency + compute + the 0.12 s
playout delay), its p95, the real-time factors (the call's worker thread: audio features and DiT; the VAE on its
own thread), the frames late / dropped and the input skipped by the real-time policy, the frame rate the client
received, and the release gap between the own-voice audio and the video frame it belongs to.

Tiny presets at 64x64 (random weights: speed does not depend on them), silero-vad masks, one torch thread per
call thread. Quick mode: 8 s calls; full mode: 30 s. Every request and wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np
import torch

from dystream.bench.streaming import _networks, _speech

SIZE = 64
WARMUP_S = 2.0  # excluded from the figures: the first chunk's audio is still arriving


def run(quick: bool = True, device: str = "cpu") -> dict[str, Any]:
    """The serve figures. Once decord is loaded in a process, its bundled FFmpeg shadows PyAV's and aiortc can no
    longer open the libvpx encoder (avcodec_open2 fails with EINVAL, the calls get no video): `bench all` has loaded
    it by then (the data part), so the calls then run in a fresh process."""
    import sys

    if "decord" not in sys.modules:
        return _run_here(quick, device)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_here, quick, device).result()


def _run_here(quick: bool, device: str) -> dict[str, Any]:
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(quick, device)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, device: str) -> dict[str, Any]:
    from dystream.serving.app import create_app
    from dystream.serving.cli import avatar_factory
    from dystream.serving.config import ServeConfig
    from dystream.serving.local import LocalServer
    from dystream.streaming.avatar import StreamingConfig

    seconds = 8.0 if quick else 30.0
    nets = _networks(device)
    factory = avatar_factory(nets, StreamingConfig(size=(SIZE, SIZE)), device, None)
    out: dict[str, Any] = {
        "setup": f"tiny DiT/VAE/audio at {SIZE}x{SIZE}, {seconds:.0f} s calls of synthetic speech from aiortc clients "
        f"on loopback (Opus audio in, VP8 video out), silero-vad masks, torch threads {torch.get_num_threads()} per "
        f"thread, device {device}; the first {WARMUP_S:.0f} s of each call excluded",
    }
    for calls in (1, 2):
        sessions: list[Any] = []
        config = ServeConfig(port=0, max_sessions=calls, ice_addresses=("127.0.0.1",))
        app = create_app(factory, config, (SIZE, SIZE), on_session=sessions.append)
        with LocalServer(app) as server:
            clients = asyncio.run(asyncio.wait_for(_calls(server.url, calls, seconds), seconds + 60))
        out.update(_figures(calls, sessions, clients))
    return out


async def _calls(url: str, calls: int, seconds: float) -> list[dict[str, Any]]:
    from dystream.serving.client import CallClient

    async def one(i: int) -> dict[str, Any]:
        own, other = _speech(seconds + 5, seed=i)
        async with CallClient(url) as call:
            await call.start(partner=other, reference={"name": f"synthetic-{i + 1}"}, voice={"source": "none"})
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            final = await call.stop()
            times = np.asarray([t for t in call.frame_times if t - start >= WARMUP_S])
            fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
            return {"final": final, "fps": fps}

    return await asyncio.gather(*(one(i) for i in range(calls)))


def _figures(calls: int, sessions: list[Any], clients: list[dict[str, Any]]) -> dict[str, Any]:
    skip = int(WARMUP_S * 25)  # shown frames of the warm-up
    latency = np.concatenate([np.asarray(s.latencies()[skip:]) for s in sessions])
    offsets = np.concatenate([np.asarray(s.av_offsets()) for s in sessions])
    finals = [c["final"] for c in clients]

    def mean(key: str) -> float:
        values = [f[key] for f in finals if f.get(key) is not None]
        return statistics.fmean(values) if values else float("nan")

    tag = f"{calls} call{'s' if calls > 1 else ''}"
    return {
        f"{tag}: audio in -> frame out latency, median": f"{np.median(latency):.3f} s",
        f"{tag}: audio in -> frame out latency, p95": f"{np.percentile(latency, 95):.3f} s",
        f"{tag}: RTF worker (audio + DiT), mean over calls": mean("rtf"),
        f"{tag}: RTF DiT": mean("rtf_dit"),
        f"{tag}: RTF VAE (decoder thread)": mean("rtf_vae"),
        f"{tag}: RTF audio (Wav2Vec2 + VAD)": mean("rtf_audio"),
        f"{tag}: first-frame delay": f"{mean('first_frame_delay_s'):.3f} s",
        f"{tag}: frames sent / late / dropped / input skipped": " / ".join(
            str(sum(f[k] for f in finals))
            for k in ("frames_sent", "frames_late", "frames_dropped", "input_skipped_frames")
        ),
        f"{tag}: frame rate received by the client": f"{statistics.fmean(c['fps'] for c in clients):.2f} fps",
        f"{tag}: own voice release - video release (median; p95 of the absolute gap)": (
            f"{np.median(offsets):.3f} ms, {np.percentile(np.abs(offsets), 95):.3f} ms" if offsets.size else "-"
        ),
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
