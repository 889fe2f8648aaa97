"""Keypoint motion metrics: HKC, HKV (CyberHost / EchoMimicV2) and StreamAvatar's listening variances LBKV, LHKV, LFKV.

No public code defines these, so the definitions are fixed here, following notes/metrics.md §4.2. With keypoints
p[t, k] in pixels rescaled to a frame height of `ref_height` (512 by default, so numbers do not depend on the
evaluation resolution) and confidences c[t, k]:

    HKC    = mean over frames and hand keypoints of c[t, k]
    KV(G, S) = 1/|G'| sum_{k in G'} 1/2 sum_{d in x,y} Var_{t in S, c[t,k] > tau}(p[t, k, d])

Var is the population variance (ddof 0) over the frames of S where that keypoint is confident (tau = 0.3, the DWPose
convention); keypoints with fewer than 2 confident frames are dropped (G' is what is left; KV is NaN if nothing is).

- HKV  = KV(hands, all frames of the video).
- LxKV = KV(G, S) computed per listening segment S (a contiguous run of mask == 0 of at least `min_segment_frames`
  = 25 frames, 1 s) and averaged over segments weighted by segment length; pooling all listening frames would add the
  drift between distant segments. Groups: LBKV body without eyes and ears (so head turns do not dominate; nose,
  shoulders, elbows, wrists, hips, knees, ankles), LHKV both hands (42 points), LFKV the 68 face points with the
  per-frame centroid of the confident face points subtracted, so LFKV measures expression rather than head
  translation.
- Dataset values are means over videos (videos without a valid value are skipped and counted).
Higher is livelier; a frozen video scores 0, jitter inflates the value, so compare with the ground-truth value too.

Layouts: the metrics take index groups from a `KeypointLayout`; `COCO_WHOLEBODY_133` is DWPose's raw output (body
0-16, feet 17-22, face 23-90, left hand 91-111, right hand 112-132); `DWPOSE_134` is the shards' layout (DWPose's
output with a neck and OpenPose body order, `coco133_to_dwpose134`). Other layouts (mediapipe, ...) supply their own
groups; numbers are only comparable within one layout and pose backend (LBKV's body group has the neck in DWPOSE_134
and not in COCO_WHOLEBODY_133).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "COCO_WHOLEBODY_133",
    "DWPOSE_134",
    "LAYOUTS",
    "KeypointLayout",
    "ListeningVarianceConfig",
    "PoseBackend",
    "coco133_to_dwpose134",
    "hkc",
    "hkv",
    "keypoint_variance",
    "listening_segments",
    "listening_variances",
    "mask_runs",
    "mean_over_videos",
]


@dataclass(frozen=True)
class KeypointLayout:
    """A keypoint layout: its size and named index groups (at least the ones the metrics ask for)."""

    name: str
    num_keypoints: int
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for group, idx in self.groups.items():
            bad = [i for i in idx if not 0 <= i < self.num_keypoints]
            if bad:
                raise ValueError(f"KeypointLayout {self.name!r}: group {group!r} has indices {bad} outside [0, K)")

    def indices(self, group: str) -> tuple[int, ...]:
        if group not in self.groups:
            raise KeyError(f"keypoint layout {self.name!r} has no group {group!r} (groups: {sorted(self.groups)})")
        return self.groups[group]


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


# DWPose / COCO-WholeBody order (before DWPose's OpenPose re-ordering and neck insertion).
COCO_WHOLEBODY_133 = KeypointLayout(
    name="coco_wholebody_133",
    num_keypoints=133,
    groups={
        "body": _r(0, 16),
        "body_no_eyes_ears": (0, *_r(5, 16)),  # COCO 1-4 are eyes and ears
        "feet": _r(17, 22),
        "face": _r(23, 90),
        "left_hand": _r(91, 111),
        "right_hand": _r(112, 132),
        "hands": _r(91, 132),
    },
)


# The layout of the shards' KEY.kpts.npy (dystream.datamodules.keypoints): DWPose's output after it inserts a neck
# and re-orders the body to OpenPose-18 (EchoMimicV2 `dwpose_detector.py`); everything after the body shifts by one.
DWPOSE_134 = KeypointLayout(
    name="dwpose134",
    num_keypoints=134,
    groups={
        "body": _r(0, 17),
        "body_no_eyes_ears": _r(0, 13),  # OpenPose 14-17 are eyes and ears
        "feet": _r(18, 23),
        "face": _r(24, 91),
        "left_hand": _r(92, 112),
        "right_hand": _r(113, 133),
        "hands": _r(92, 133),
    },
)

LAYOUTS: dict[str, KeypointLayout] = {layout.name: layout for layout in (COCO_WHOLEBODY_133, DWPOSE_134)}

# DWPose's body re-ordering after the neck is inserted at 17: new[OPENPOSE_IDX] = new[MMPOSE_IDX]
_MMPOSE_IDX = (17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3)
_OPENPOSE_IDX = (1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17)


def coco133_to_dwpose134(kpts: np.ndarray, tau: float = 0.3) -> np.ndarray:
    """COCO-WholeBody [..., 133, 3] -> DWPose / OpenPose order [..., 134, 3], as DWPose does it.

    The neck is the mean of the two shoulders; its confidence is 1 if both shoulders are above `tau`, else 0.
    """
    k = np.asarray(kpts)
    if k.shape[-2:] != (133, 3):
        raise ValueError(f"coco133_to_dwpose134: expected [..., 133, 3], got shape {k.shape}")
    neck = k[..., [5, 6], :].mean(axis=-2)
    neck[..., 2] = ((k[..., 5, 2] > tau) & (k[..., 6, 2] > tau)).astype(k.dtype)
    out = np.insert(k, 17, neck, axis=-2)
    out[..., list(_OPENPOSE_IDX), :] = out[..., list(_MMPOSE_IDX), :]
    return out


@runtime_checkable
class PoseBackend(Protocol):
    """A pose estimator: uint8 RGB frames [T, H, W, 3] -> float32 keypoints [T, K, 3] (x, y pixels, confidence)."""

    layout: KeypointLayout

    def __call__(self, frames: np.ndarray) -> np.ndarray: ...


def _check(kpts: np.ndarray) -> np.ndarray:
    k = np.asarray(kpts, dtype=np.float64)
    if k.ndim != 3 or k.shape[-1] != 3:
        raise ValueError(f"keypoints must be [T, K, 3] (x, y, confidence), got shape {k.shape}")
    return k


def keypoint_variance(
    kpts: np.ndarray,
    indices: Sequence[int],
    tau: float = 0.3,
    subtract_centroid: bool = False,
    coord_scale: float = 1.0,
    min_valid_frames: int = 2,
) -> float:
    """KV over all frames of kpts [T, K, 3]: mean over kept keypoints of 1/2 (Var_t x + Var_t y), confident frames only.

    subtract_centroid: remove, per frame, the mean position of the group's confident keypoints first.
    coord_scale multiplies coordinates (e.g. ref_height / frame_height). NaN if no keypoint has enough valid frames.
    """
    k = _check(kpts)[:, list(indices)]  # [T, G, 3]
    xy = k[..., :2] * coord_scale
    valid = k[..., 2] > tau  # [T, G]
    if subtract_centroid:
        n = valid.sum(axis=1, keepdims=True)  # [T, 1]
        centroid = np.where(valid[..., None], xy, 0.0).sum(axis=1, keepdims=True) / np.maximum(n, 1)[..., None]
        xy = xy - centroid
    count = valid.sum(axis=0)  # [G]
    keep = count >= max(min_valid_frames, 1)
    if not keep.any():
        return float("nan")
    # shift each keypoint by its first confident position: same variance, exactly 0 for a frozen keypoint
    first = valid.argmax(axis=0)  # [G]
    xy = xy - xy[first, np.arange(xy.shape[1])][None]
    w = valid[..., None].astype(np.float64)
    mean = (xy * w).sum(axis=0) / np.maximum(count, 1)[:, None]  # [G, 2]
    var = (((xy - mean) ** 2) * w).sum(axis=0) / np.maximum(count, 1)[:, None]  # [G, 2], ddof 0
    return float(0.5 * var[keep].sum(axis=1).mean())


def hkc(kpts: np.ndarray, layout: KeypointLayout, group: str = "hands") -> float:
    """Hand keypoint confidence: mean detector confidence of the hand keypoints over all frames."""
    return float(_check(kpts)[:, list(layout.indices(group)), 2].mean())


def hkv(
    kpts: np.ndarray,
    layout: KeypointLayout,
    frame_height: float,
    tau: float = 0.3,
    ref_height: float = 512.0,
    group: str = "hands",
) -> float:
    """Hand keypoint variance of one video over all its frames (px^2 at a `ref_height`-pixel frame height)."""
    return keypoint_variance(kpts, layout.indices(group), tau=tau, coord_scale=ref_height / frame_height)


def mask_runs(flags: np.ndarray | Sequence[bool], min_len: int) -> list[tuple[int, int]]:
    """Contiguous runs [start, end) of True in `flags` lasting at least `min_len` frames."""
    f = np.asarray(flags, dtype=bool)
    edges = np.diff(np.concatenate([[0], f.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True) if e - s >= min_len]


def listening_segments(mask: np.ndarray | Sequence[float], min_len: int) -> list[tuple[int, int]]:
    """Contiguous runs [start, end) of listening frames (mask <= 0.5) lasting at least `min_len` frames."""
    return mask_runs(np.asarray(mask, dtype=np.float64) <= 0.5, min_len)


@dataclass
class ListeningVarianceConfig:
    tau: float = 0.3  # DWPose visibility threshold
    min_segment_frames: int = 25  # 1 s at 25 fps
    ref_height: float = 512.0  # coordinates rescaled to this frame height
    body_group: str = "body_no_eyes_ears"
    hand_group: str = "hands"
    face_group: str = "face"
    face_subtract_centroid: bool = True

    def __post_init__(self) -> None:
        if self.tau < 0:
            raise ValueError(f"ListeningVarianceConfig.tau must be >= 0, got {self.tau}")
        if self.min_segment_frames < 2:
            raise ValueError(f"ListeningVarianceConfig.min_segment_frames must be >= 2, got {self.min_segment_frames}")
        if self.ref_height <= 0:
            raise ValueError(f"ListeningVarianceConfig.ref_height must be positive, got {self.ref_height}")


def listening_variances(
    kpts: np.ndarray,
    mask: np.ndarray | Sequence[float],
    layout: KeypointLayout,
    frame_height: float,
    config: ListeningVarianceConfig | None = None,
) -> dict[str, float]:
    """LBKV, LHKV, LFKV of one video: per listening segment, length-weighted mean over segments.

    kpts [T, K, 3] in pixels of a frame `frame_height` pixels high; mask [T] speaking (1) / listening (0).
    Returns the three values (NaN where no segment gives one) plus the number of segments and listening frames used.
    """
    cfg = config or ListeningVarianceConfig()
    k = _check(kpts)
    if k.shape[1] != layout.num_keypoints:
        raise ValueError(f"keypoints have {k.shape[1]} points but layout {layout.name!r} has {layout.num_keypoints}")
    m = np.asarray(mask)
    if m.shape != (k.shape[0],):
        raise ValueError(f"mask must be [T] = [{k.shape[0]}], got shape {m.shape}")
    scale = cfg.ref_height / frame_height
    metrics = {
        "LBKV": (layout.indices(cfg.body_group), False),
        "LHKV": (layout.indices(cfg.hand_group), False),
        "LFKV": (layout.indices(cfg.face_group), cfg.face_subtract_centroid),
    }
    segments = listening_segments(m, cfg.min_segment_frames)
    out: dict[str, float] = {}
    for name, (idx, centre) in metrics.items():
        values, weights = [], []
        for s, e in segments:
            v = keypoint_variance(k[s:e], idx, tau=cfg.tau, subtract_centroid=centre, coord_scale=scale)
            if np.isfinite(v):
                values.append(v)
                weights.append(e - s)
        out[name] = float(np.average(values, weights=weights)) if values else float("nan")
    out["segments"] = float(len(segments))
    out["listening_frames"] = float(sum(e - s for s, e in segments))
    return out


def mean_over_videos(per_video: Iterable[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Dataset value of each key: mean over videos where it is finite; `<key>_videos` counts them."""
    rows = list(per_video)
    out: dict[str, float] = {}
    for key in keys:
        vals = np.array([r[key] for r in rows if key in r and np.isfinite(r[key])], dtype=np.float64)
        out[key] = float(vals.mean()) if vals.size else float("nan")
        out[f"{key}_videos"] = float(vals.size)
    return out
