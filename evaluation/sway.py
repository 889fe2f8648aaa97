"""A listener's sway measured from pixels, without a pose network.

StreamAvatar's Table 2 scores a listener's motion by keypoint variances (LBKV / LHKV / LFKV, ``keypoints.py``). At
64x64 that motion is small: in the synthetic world a listener's nods move the face by 1-2 pixels and breathing moves
the body by a fraction of one, so a pose network's jitter can hide it or invent it. This diagnostic follows two
colours of the reference image instead: for each frame, the centroid of the pixels that carry the shirt's colour
(the reference's bottom-centre patch) and of those that carry the skin's colour at the nose, above the nose's row
+ a margin (so resting hands do not count). A pixel's weight falls linearly with its colour's distance from the
followed one and reaches 0 at the background's (the reference's top rows, the sky): a pixel that mixes the two
colours weighs its coverage, so a sub-pixel shift of the region moves the centroid by the same amount, and a soft
edge weighs what a sharp one does. As for Table 2 (``keypoints.listening_variances``), each centroid's variance is
taken per listening segment of at least 25 frames and averaged weighted by length, in px^2 of the frame; the same
estimator reads every row (real clips, reconstructions, generated clips). Unlike LFKV, which subtracts the face's
centroid and so reads the features' motion inside the face, the face sway here is the head's own translation.
docs/evaluation.md, "Where the listening motion is lost".
"""

from __future__ import annotations

import numpy as np

from dystream.evaluation.keypoints import listening_segments


def colour_centroids(video: np.ndarray, colour: np.ndarray, tolerance: float) -> np.ndarray:
    """``video [T, H, W, 3]`` (0-255) -> ``[T, 2]`` (x, y) centroids of the pixels near ``colour``, each pixel
    weighted ``max(0, 1 - |pixel - colour| / tolerance)``; NaN for a frame without such a pixel."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"colour_centroids: video must be [T, H, W, 3], got {video.shape}")
    if tolerance <= 0:
        raise ValueError(f"colour_centroids: tolerance must be > 0, got {tolerance}")
    frames = video.astype(np.float32)
    weight = np.clip(1.0 - np.linalg.norm(frames - np.asarray(colour, np.float32), axis=-1) / tolerance, 0.0, 1.0)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]] + 0.5  # pixel centres
    total = weight.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total], -1)


def listening_sway(
    video: np.ndarray,
    reference: np.ndarray,
    nose_xy: tuple[float, float],
    mask: np.ndarray,
    min_frames: int = 25,
    face_margin: float = 0.3,
) -> dict[str, float]:
    """``{"body", "face"}``: variances (px^2, x and y summed) of the shirt's and the face's colour centroids within
    each listening segment (``mask [T]`` speaking = 0 for at least ``min_frames`` frames) of ``video [T, H, W, 3]``,
    averaged weighted by segment length; NaN without such a segment. ``reference [H, W, 3]`` gives the colours: the
    shirt at the bottom centre, the skin at ``nose_xy`` (pixels); the face's centroid is taken above
    ``nose_y + face_margin * H``."""
    if len(mask) != len(video):
        raise ValueError(f"listening_sway: {len(mask)} mask values for {len(video)} frames")
    h, w = reference.shape[:2]
    segments = listening_segments(mask, min_frames)
    if not segments:
        return {"body": float("nan"), "face": float("nan")}
    lengths = [e - s for s, e in segments]
    ref = reference.astype(np.float32)
    shirt = np.median(ref[h - 6 : h - 1, int(0.4 * w) : int(0.6 * w)].reshape(-1, 3), 0)
    nx, ny = (int(np.clip(round(float(c)), 1, n - 2)) for c, n in zip(nose_xy, (w, h), strict=True))
    skin = np.median(ref[ny - 1 : ny + 2, nx - 1 : nx + 2].reshape(-1, 3), 0)
    background = np.median(ref[:3].reshape(-1, 3), 0)
    top = min(h, ny + int(face_margin * h))
    out = {}
    for name, frames, colour in (("body", video, shirt), ("face", video[:, :top], skin)):
        tolerance = max(float(np.linalg.norm(colour - background)), 1.0)
        c = colour_centroids(frames, colour, tolerance)
        per_segment = [np.nanvar(c[s:e], axis=0).sum() for s, e in segments]
        out[name] = float(np.average(per_segment, weights=lengths))
    return out
