"""Audio encoder speed: full-utterance encoding and the streaming window per 0.48 s chunk.

The streaming figure is the cost of one :meth:`AudioEncoder.encode_window` call over
context + chunk + look-ahead frames (what :class:`StreamingAudioEncoder` runs per chunk); its
real-time factor is chunk duration / encode time (> 1 keeps up with live audio).
Weights are random (speed does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

from dystream.bench.timing import summarize, time_call
from dystream.models.audio import AudioEncoder

CHUNK_FRAMES = 12  # 3 latent frames x 4 video frames = 0.48 s at 25 fps (StreamAvatar §4.1)
LOOKAHEAD_FRAMES = 2  # 80 ms, just above DyStream's 60 ms audio look-ahead (notes/distillation.md §14)
CONTEXT_FRAMES = 24  # 0.96 s of past audio


def run(quick: bool = True, device: str = "cpu") -> dict[str, Any]:
    presets = ["tiny", "wav2vec2-base-960h"]
    repeats = 2 if quick else 10  # quick: the 2-minute budget of `make bench QUICK=1`
    utterance_s = 2.0 if quick else 10.0
    window = CONTEXT_FRAMES + CHUNK_FRAMES + LOOKAHEAD_FRAMES
    figures: dict[str, Any] = {}
    for preset in presets:
        torch.manual_seed(0)
        enc = AudioEncoder(preset).to(device)
        spf, fps = enc.samples_per_frame, enc.config.fps
        frames = int(utterance_s * fps)
        wave = torch.randn(1, frames * spf, device=device)
        with torch.inference_mode():
            full = summarize(time_call(lambda e=enc, w=wave: e(w), repeats, 1, device), "s")
            chunk = summarize(time_call(lambda e=enc, w=wave: e.encode_window(w, 0, window), repeats, 1, device), "s")
        figures[f"{preset}: encode {utterance_s:g} s utterance"] = full
        figures[f"{preset}: streaming window ({window} frames) per {CHUNK_FRAMES}-frame chunk"] = chunk
        figures[f"{preset}: streaming real-time factor"] = (CHUNK_FRAMES / fps) / chunk["median"]
    return figures
