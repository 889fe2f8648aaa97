"""Mouth-voice correlation: does the mouth open with the speech?

Sync-C/D ask a SyncNet whether lips and audio agree; this asks the question directly, on keypoints. Per frame t, the
mouth opening is the gap between the inner lips of the 68 face points (iBUG order, as in DWPose's face group):

    opening[t] = mean(|p61 - p67|, |p62 - p66|, |p63 - p65|) / face_scale[t]

with face_scale the RMS distance of the confident face points to their centroid (rotation- and zoom-invariant),
and the voice's loudness is its per-frame RMS over the 640 samples each frame owns (`frame_rms`). The metric is the
Pearson correlation r of the two series over a video:

- `mouth_voice_r`: over all frames; speaking versus listening (the speaking mask) already opens and closes the mouth;
- `mouth_voice_r_speech`: over the frames where the avatar speaks (mask 1) only: syllable by syllable, what the mask
  alone cannot explain.

A low r has two causes a generator's fix tells apart: a mouth that answers the voice too little, or one that also
moves in ways the voice does not explain. `mouth_voice_split` splits the opening's spread over the same frames into
the two (a least-squares line on the loudness): the response, slope x std(loudness) = r x std(opening), and the
unrelated motion, the residual's std = sqrt(1 - r^2) x std(opening), so r = response / sqrt(response^2 + unrelated^2).

In the synthetic world the mouth opening *is* the own voice's per-frame envelope (`datamodules/synthetic.py`,
`sample_motion`), so the exact keypoints give r ~ 1 and any other voice r ~ 0. Scored against another clip's voice
(`dystream eval`'s "other voice" columns) every video gives r ~ 0: the floor. r is NaN for a video with fewer than
`min_frames` usable frames or a constant series (a frozen mouth, a silent voice); dataset values skip NaNs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dystream.datamodules.format import frame_rms
from dystream.evaluation.keypoints import KeypointLayout

__all__ = [
    "INNER_LIP_PAIRS",
    "lagged_mouth_voice_r",
    "mouth_opening",
    "mouth_voice_correlation",
    "mouth_voice_split",
    "pearson_r",
]

# iBUG-68 inner lips: 60 and 64 are the corners, 61-63 the upper lip (left to right), 65-67 the lower (right to left)
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))


def mouth_opening(kpts: np.ndarray, layout: KeypointLayout, tau: float = 0.3, group: str = "face") -> np.ndarray:
    """Per-frame inner-lip gap over the face scale, float64 [T], from keypoints [T, K, 3] (x, y, confidence).

    `group` names the layout's 68 face points in iBUG order. NaN on frames where an inner-lip point of the three
    pairs is below `tau` or fewer than 3 face points are confident."""
    k = np.asarray(kpts, dtype=np.float64)
    if k.ndim != 3 or k.shape[-1] != 3 or k.shape[1] != layout.num_keypoints:
        raise ValueError(
            f"mouth_opening: keypoints must be [T, {layout.num_keypoints}, 3] ({layout.name}), got shape {k.shape}"
        )
    face = np.asarray(layout.indices(group))
    if len(face) != 68:
        raise ValueError(f"mouth_opening: group {group!r} of {layout.name!r} has {len(face)} points, not iBUG's 68")
    pts, conf = k[:, face, :2], k[:, face, 2]
    ok = conf > tau  # [T, 68]
    n = ok.sum(axis=1)
    centroid = np.where(ok[..., None], pts, 0.0).sum(axis=1) / np.maximum(n, 1)[:, None]
    spread = np.where(ok, ((pts - centroid[:, None]) ** 2).sum(-1), 0.0).sum(axis=1) / np.maximum(n, 1)
    scale = np.sqrt(spread)
    upper, lower = [list(side) for side in zip(*INNER_LIP_PAIRS, strict=True)]
    gap = np.linalg.norm(pts[:, upper] - pts[:, lower], axis=-1).mean(axis=1)
    usable = ok[:, upper].all(axis=1) & ok[:, lower].all(axis=1) & (n >= 3) & (scale > 0)
    return np.where(usable, gap / np.where(scale > 0, scale, 1.0), np.nan)


def pearson_r(x: np.ndarray, y: np.ndarray, min_frames: int = 10) -> float:
    """Pearson correlation of two series over the frames where both are finite; NaN with fewer than `min_frames`
    such frames or a constant series."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson_r: expected two series of the same length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < max(min_frames, 2):
        return float("nan")
    x, y = x[keep], y[keep]
    if any(s.std() <= 1e-9 * (np.abs(s).max() + 1e-12) for s in (x, y)):  # constant up to rounding
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def mouth_voice_correlation(
    opening: np.ndarray, voice: np.ndarray, mask: np.ndarray | Sequence[float] | None = None, min_frames: int = 10
) -> float:
    """r between a mouth opening [T] and the voice's per-frame RMS (audio [>= T * 640] at 16 kHz), over all frames,
    or over the frames where `mask` > 0.5 (the speaking frames) when given."""
    opening = np.asarray(opening, dtype=np.float64)
    loudness = frame_rms(voice, len(opening))
    if mask is not None:
        m = np.asarray(mask) > 0.5
        if m.shape != opening.shape:
            raise ValueError(f"mouth_voice_correlation: mask has shape {m.shape}, the opening {opening.shape}")
        opening, loudness = opening[m], loudness[m]
    return pearson_r(opening, loudness, min_frames=min_frames)


def mouth_voice_split(
    opening: np.ndarray, voice: np.ndarray, mask: np.ndarray | Sequence[float] | None = None, min_frames: int = 10
) -> tuple[float, float]:
    """(response, unrelated): the mouth opening's spread over the frames `mouth_voice_correlation` scores, split by a
    least-squares line on the voice's loudness into the part the loudness explains, r x std(opening) (signed: a
    mouth that closes as the voice gets louder is negative), and the residual's std, sqrt(1 - r^2) x std(opening)
    (population stds over the frames where the opening is finite). NaN, NaN where r is NaN."""
    r = mouth_voice_correlation(opening, voice, mask, min_frames=min_frames)
    if not np.isfinite(r):
        return float("nan"), float("nan")
    o = np.asarray(opening, dtype=np.float64)
    if mask is not None:
        o = o[np.asarray(mask) > 0.5]
    spread = float(o[np.isfinite(o)].std())  # the loudness is finite on every frame
    return r * spread, float(np.sqrt(max(1.0 - r * r, 0.0))) * spread


def lagged_mouth_voice_r(
    opening: np.ndarray,
    voice: np.ndarray,
    mask: np.ndarray | Sequence[float] | None = None,
    lags: Sequence[int] = range(-3, 4),
    min_frames: int = 10,
) -> dict[int, float]:
    """`mouth_voice_correlation` with the mouth compared ``lag`` frames after the voice: {lag: r}.

    Over the frames t where the avatar speaks (``mask[t]`` > 0.5, all frames without a mask) and ``t + lag`` lies in
    the video, r of opening[t + lag] against the voice's loudness at t. A mouth in time peaks at lag 0; how fast r
    falls off either side says how frame-exact it is (the synthetic mouth follows the per-frame envelope, so the
    real clips' r drops from about 0.8 at lag 0 to 0.3 at lag 1)."""
    opening = np.asarray(opening, dtype=np.float64)
    loudness = frame_rms(voice, len(opening))
    keep = np.ones(len(opening), dtype=bool) if mask is None else np.asarray(mask) > 0.5
    if keep.shape != opening.shape:
        raise ValueError(f"lagged_mouth_voice_r: mask has shape {keep.shape}, the opening {opening.shape}")
    out = {}
    t = np.arange(len(opening))
    for lag in lags:
        ok = keep & (t + lag >= 0) & (t + lag < len(opening))
        out[int(lag)] = pearson_r(opening[t[ok] + lag], loudness[ok], min_frames=min_frames)
    return out
