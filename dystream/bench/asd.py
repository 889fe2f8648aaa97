"""Active-speaker detection benchmarks: the parts of `dystream data pack --asd-weights` per video frame.

Figures (random weights at the real layouts, which cost the same as the released ones): S3FD on 1280x720 frames
at the protocol's x0.25 (320x180 into the network), Light-ASD scoring one 4 s face track with the six window lengths,
and tracking + cropping + MFCC of that track. Frames per second = 25 fps video frames processed per second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dystream.bench.timing import summarize, time_call
from dystream.datamodules.active_speaker import (
    ASDConfig,
    LightASDScorer,
    face_crops,
    multi_window_scores,
    track_faces,
)
from dystream.evaluation.mfcc import mfcc_pcm16
from dystream.evaluation.networks.light_asd import LightASD
from dystream.evaluation.networks.s3fd import S3FD, S3FDDetector


def _per_frame(seconds: list[float], frames: int) -> dict[str, Any]:
    return summarize([frames / s for s in seconds], "frames/s")


def run(quick: bool = True, device: str = "cpu") -> dict[str, Any]:
    repeats = 2 if quick else 5
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}

    n_det = 2 if quick else 16  # quick: the 2-minute budget of `make bench QUICK=1`
    frames = rng.integers(0, 256, size=(n_det, 720, 1280, 3), dtype=np.uint8)
    detector = S3FDDetector(S3FD().to(device), scale=0.25, batch_size=4, device=device, conf_threshold=0.9)
    t = time_call(lambda: detector(frames), repeats=repeats, warmup=1, device=device)
    out["S3FD 1280x720 at x0.25 (320x180), batch 4"] = _per_frame(t, n_det)

    n = 50 if quick else 150  # a 2 s / 6 s track (a 6 s track uses every window length whole)
    scorer = LightASDScorer(LightASD().to(device).eval(), device)
    mfcc = rng.normal(size=(4 * n - 1, 13)).astype(np.float32) * 10
    faces = rng.integers(0, 256, size=(n, 112, 112), dtype=np.uint8)
    with torch.no_grad():  # every frame goes through the network once per window length (6 times)
        t = time_call(lambda: multi_window_scores(scorer, mfcc, faces), repeats=repeats - 1, warmup=0, device=device)
    out[f"Light-ASD, {n // 25} s track, windows of 1-6 s"] = _per_frame(t, n)

    n = 100
    small = rng.integers(0, 256, size=(n, 360, 640, 3), dtype=np.uint8)
    dets = [np.array([[260.0 + i * 0.2, 100.0, 380.0 + i * 0.2, 220.0, 0.99]]) for i in range(n)]
    audio = (rng.normal(size=n * 640) * 0.1).astype(np.float32)

    def prepare() -> None:
        (track,) = track_faces(dets)
        face_crops(small, track, 112, ASDConfig())
        mfcc_pcm16(audio)

    out["tracking + crops + MFCC, 640x360, 4 s"] = _per_frame(time_call(prepare, repeats=repeats, warmup=1), n)
    out["note"] = "the whole pipeline runs at about 1 / sum(1 / fps) of these; S3FD dominates on a CPU"
    return out
