"""`dystream stream`: simulate a live call from wav files and measure the latency of the avatar.

    dystream stream --image ref.png --audio-self me.wav [--audio-other you.wav] --out live.mp4

The audio is cut into packets of ``--packet-ms`` (20 ms, a typical VoIP frame) and pushed into a
:class:`~dystream.streaming.StreamingAvatar` at real-time pace (each packet when its last sample would have been
captured), or as fast as possible with ``--no-realtime``. Frames are written to the mp4 as they come out (with the
mixed sound), and at the end the session's statistics (real-time factors, first-frame delay) and the measured
per-frame latency are printed: a frame's latency is the time from the moment its last audio sample was captured
to the moment the session handed the frame out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from dystream.streaming.cli import (
    CliError,
    add_config_arguments,
    add_model_arguments,
    config_from_args,
    load_networks,
    reporting_cli_errors,
)

HELP = "stream wav files through a live avatar session at real-time pace, write the mp4 as it goes, print latency"

SAMPLE_RATE = 16_000
FPS = 25


class LiveMp4Writer:
    """An mp4 (H.264 + mono AAC) written incrementally: frames and sound are encoded as they arrive."""

    AAC_FRAME = 1024

    def __init__(self, path: str | Path, height: int, width: int, fps: int = FPS, crf: int = 18) -> None:
        import av

        if height % 2 or width % 2:
            raise ValueError(f"H.264 yuv420p needs even sizes, got {height}x{width}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._av = av
        self.container = av.open(str(self.path), mode="w")
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.options = {"crf": str(crf)}
        self.sound = self.container.add_stream("aac", rate=SAMPLE_RATE)
        self.sound.layout = "mono"
        self._pending = np.zeros(0, np.float32)
        self._audio_pts = 0
        self.frames = 0

    def write_frames(self, frames: list[np.ndarray]) -> None:
        for frame in frames:
            packet = self.video.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24"))
            self.container.mux(packet)
            self.frames += 1

    def write_audio(self, samples: np.ndarray, final: bool = False) -> None:
        self._pending = np.concatenate([self._pending, np.clip(samples.astype(np.float32), -1, 1)])
        while self._pending.shape[0] >= self.AAC_FRAME or (final and self._pending.shape[0]):
            block, self._pending = self._pending[: self.AAC_FRAME], self._pending[self.AAC_FRAME :]
            frame = self._av.AudioFrame.from_ndarray(block[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, self._audio_pts, Fraction(1, SAMPLE_RATE)
            self._audio_pts += block.shape[0]
            self.container.mux(self.sound.encode(frame))

    def close(self) -> None:
        self.write_audio(np.zeros(0, np.float32), final=True)
        self.container.mux(self.video.encode())
        self.container.mux(self.sound.encode())
        self.container.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="the avatar's reference image (or a video: first frame)")
    parser.add_argument("--audio-self", required=True, help="the avatar's own voice (any format/rate PyAV reads)")
    parser.add_argument("--audio-other", default=None, help="the partner's voice (default: none, silence)")
    parser.add_argument("--out", required=True, help="the mp4 to write")
    parser.add_argument("--packet-ms", type=float, default=20.0, help="audio packet length in milliseconds")
    parser.add_argument("--no-realtime", action="store_true", help="push packets as fast as possible")
    parser.add_argument("--stats-json", default=None, help="also write the statistics to this JSON file")
    add_model_arguments(parser)
    add_config_arguments(parser)


def _read_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from dystream.streaming.samples import read_image
    from dystream.streaming.video_io import read_wav

    def read(path: str, flag: str, fn: Any) -> np.ndarray:
        try:
            return fn(path)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise CliError(f"{flag}: {exc}") from exc

    image = read(args.image, "--image", read_image)
    own = read(args.audio_self, "--audio-self", read_wav)
    other = read(args.audio_other, "--audio-other", read_wav) if args.audio_other else np.zeros_like(own)
    n = max(own.shape[0], other.shape[0])
    if n == 0:
        raise CliError("--audio-self: the audio is empty")
    return image, np.pad(own, (0, n - own.shape[0])), np.pad(other, (0, n - other.shape[0]))


@reporting_cli_errors
def run(args: argparse.Namespace) -> int:
    if not args.packet_ms > 0:
        raise CliError(f"--packet-ms must be > 0, got {args.packet_ms}")
    image, own, other = _read_inputs(args)
    generator, vae, audio = load_networks(args)
    from dystream.streaming.avatar import StreamingAvatar

    config = config_from_args(args, generator, vae)
    session = StreamingAvatar(generator, vae, audio, image, config, device=args.device, vae_device=args.vae_device)
    writer = LiveMp4Writer(args.out, session.height, session.width)
    packet = max(1, round(args.packet_ms * SAMPLE_RATE / 1000))
    realtime = not args.no_realtime
    emitted: list[float] = []  # when each frame was handed out
    behind = 0.0
    print(f"streaming {own.shape[0] / SAMPLE_RATE:.2f} s in {packet}-sample packets "
          f"({'real time' if realtime else 'as fast as possible'}) -> {args.out}", file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    for lo in range(0, own.shape[0], packet):
        hi = min(lo + packet, own.shape[0])
        if realtime:  # a packet is available once its last sample has been captured
            wait = start + hi / SAMPLE_RATE - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                behind = max(behind, -wait)
        frames = session.push(own[lo:hi], other[lo:hi])
        now = time.perf_counter()
        emitted += [now] * len(frames)
        writer.write_frames(frames)
        writer.write_audio(own[lo:hi] + other[lo:hi])
    frames = session.flush()
    now = time.perf_counter()
    emitted += [now] * len(frames)
    writer.write_frames(frames)
    writer.close()
    wall = now - start

    stats = session.stats()
    # latency of frame i: handed out at emitted[i]; its last audio sample was captured at start + (i + 1) / 25 s
    # (clipped to the end of the audio for the final, partial frame)
    duration = own.shape[0] / SAMPLE_RATE
    captured = np.minimum((np.arange(len(emitted)) + 1) / FPS, duration) + start
    latency = np.asarray(emitted) - captured
    summary = {
        "frames": len(emitted),
        "audio_seconds": duration,
        "wall_seconds": wall,
        "overall_rtf": wall / duration,
        "realtime": realtime,
        **({"frame_latency_s": _percentiles(latency), "max_lag_behind_s": behind} if realtime else {}),
        **{k: v for k, v in stats.items() if not isinstance(v, list)},
        "chunk_latency_s": _percentiles(np.asarray(stats["chunk_latency_s"])) if stats["chunk_latency_s"] else None,
    }
    print(f"wrote {writer.path}: {len(emitted)} frames")
    for key, value in summary.items():
        print(f"  {key}: {_format(value)}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(summary, indent=2))
    return 0


def _percentiles(values: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
        "min": float(values.min()),
    }


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_format(v)}" for k, v in value.items())
    return str(value)
