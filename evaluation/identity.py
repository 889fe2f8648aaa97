"""Identity drift over long streams: how far generated frames wander from the reference image as time passes.

Used for the Reference Sink / RAPR ablations (StreamAvatar §3.3): without an anchored reference, long streams drift in
appearance; with it, the distance to the reference should stay flat. For each frame t, d_t = distance(embed(frame_t),
embed(reference)); the curve is summarised per time bucket (mean, min, max, count) and by its least-squares slope per
minute, which is the drift rate.

The embedding is any callable mapping uint8 RGB frames [N, H, W, 3] to features [N, D] (e.g. a face-recognition or
DINO network whose weights are provided), compared by cosine distance 1 - cos. Without one, the pixel-space fallback
compares frames downsampled to 64x64 (area average, which ignores high-frequency noise) by root mean square difference
in [0, 1] units; it measures appearance drift, not identity, and is labelled "pixel_rms_64". An embedder with a
`name` attribute (e.g. the synthetic identity network, `load_metric_identity`) labels the distance
"cosine (<name>)"; `identity_similarity` gives 1 - cosine distance per frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DriftSummary",
    "distance_name",
    "frame_distances",
    "identity_drift",
    "identity_similarity",
    "pixel_embedding",
    "summarise_drift",
]

Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> [N, D]


def pixel_embedding(frames: np.ndarray, size: int = 64) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, 3 * size * size] area-downsampled pixels in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    return F.adaptive_avg_pool2d(x, size).flatten(1).numpy().astype(np.float64)


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB [N, H, W, 3], got {f.dtype} {f.shape}")
    return f


def frame_distances(
    frames: np.ndarray, reference: np.ndarray, embed: Embedder | None = None, batch_size: int = 64
) -> np.ndarray:
    """Distance of every frame [T, H, W, 3] to the reference [H, W, 3] -> [T] (cosine distance, or pixel RMS)."""
    frames = _check_frames(frames, "frames")
    ref = _check_frames(np.asarray(reference)[None], "reference")
    if embed is None:
        r = pixel_embedding(ref)
        out = [np.sqrt(((pixel_embedding(frames[i : i + batch_size]) - r) ** 2).mean(axis=1))
               for i in range(0, len(frames), batch_size)]  # fmt: skip
        return np.concatenate(out) if out else np.zeros(0)
    r = np.asarray(embed(ref), dtype=np.float64).reshape(1, -1)
    r = r / np.linalg.norm(r, axis=1, keepdims=True).clip(min=1e-12)
    out = []
    for i in range(0, len(frames), batch_size):
        e = np.asarray(embed(frames[i : i + batch_size]), dtype=np.float64).reshape(len(frames[i : i + batch_size]), -1)
        e = e / np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
        out.append(1.0 - e @ r[0])
    return np.concatenate(out) if out else np.zeros(0)


def distance_name(embed: Embedder | None) -> str:
    """The label of the distance `frame_distances` computes with `embed`: "pixel_rms_64", "cosine" or
    "cosine (<embed.name>)"."""
    if embed is None:
        return "pixel_rms_64"
    name = getattr(embed, "name", None)
    return f"cosine ({name})" if name else "cosine"


def identity_similarity(frames: np.ndarray, reference: np.ndarray, embed: Embedder) -> np.ndarray:
    """Cosine similarity of every frame [T, H, W, 3] to the reference [H, W, 3] in the embedding `embed` -> [T]
    (1 - the cosine distance of `frame_distances`; uint8 RGB input)."""
    if embed is None:
        raise ValueError("identity_similarity needs an embedder (e.g. load_metric_identity()); pixel RMS is no cosine")
    return 1.0 - frame_distances(frames, reference, embed)


@dataclass
class DriftSummary:
    bucket_start_s: np.ndarray  # [B] start time of each bucket (s)
    mean: np.ndarray  # [B]
    min: np.ndarray  # [B]
    max: np.ndarray  # [B]
    count: np.ndarray  # [B] frames per bucket
    slope_per_min: float  # least-squares slope of d_t against time, per minute
    first_bucket_mean: float
    last_bucket_mean: float
    distance: str  # "pixel_rms_64", "cosine" or "cosine (<embedder name>)"

    def as_dict(self) -> dict:
        return {
            "bucket_start_s": self.bucket_start_s.tolist(),
            "mean": self.mean.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
            "count": self.count.tolist(),
            "slope_per_min": self.slope_per_min,
            "first_bucket_mean": self.first_bucket_mean,
            "last_bucket_mean": self.last_bucket_mean,
            "distance": self.distance,
        }


def summarise_drift(
    distances: np.ndarray, fps: float = 25.0, bucket_s: float = 10.0, distance: str = ""
) -> DriftSummary:
    """Per-bucket statistics and the drift slope of a distance curve d [T] sampled at `fps`."""
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"summarise_drift: distances must be a non-empty [T] array, got shape {d.shape}")
    if fps <= 0 or bucket_s <= 0:
        raise ValueError(f"summarise_drift: fps and bucket_s must be positive, got {fps}, {bucket_s}")
    t = np.arange(d.size) / fps
    bucket = np.floor(t / bucket_s).astype(np.int64)
    ids = np.unique(bucket)
    mean = np.array([d[bucket == b].mean() for b in ids])
    slope = float(np.polyfit(t, d, 1)[0] * 60.0) if d.size > 1 else 0.0
    return DriftSummary(
        bucket_start_s=ids * bucket_s,
        mean=mean,
        min=np.array([d[bucket == b].min() for b in ids]),
        max=np.array([d[bucket == b].max() for b in ids]),
        count=np.array([(bucket == b).sum() for b in ids]),
        slope_per_min=slope,
        first_bucket_mean=float(mean[0]),
        last_bucket_mean=float(mean[-1]),
        distance=distance,
    )


def identity_drift(
    frames: np.ndarray,
    reference: np.ndarray,
    embed: Embedder | None = None,
    fps: float = 25.0,
    bucket_s: float = 10.0,
) -> DriftSummary:
    """Distance of each frame to the reference, summarised per `bucket_s`-second bucket (see module docstring)."""
    d = frame_distances(frames, reference, embed)
    return summarise_drift(d, fps=fps, bucket_s=bucket_s, distance=distance_name(embed))
