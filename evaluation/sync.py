"""Sync-C / Sync-D (LSE-C / LSE-D): lip-audio synchronisation with SyncNet v2, as joonson/syncnet_python scores it.

Protocol (notes/metrics.md §3.1, `SyncNetInstance.evaluate` and `calc_pdist`):
- 25 fps video, 16 kHz audio; T = min(frames, floor(samples / 640)); one window per video frame v in [0, T - 5):
  lip window = face crops v..v+4, audio window = MFCC frames 4v..4v+19 (`dystream.evaluation.mfcc`);
- d[i, k] = |v_i - a_{i + k - vshift} + 1e-6|_2 for k in [0, 2 vshift] (torch `pairwise_distance`, whose eps is added
  to the difference), audio embeddings zero-padded by vshift at both ends, vshift = 15 (run_syncnet.py; +-0.6 s);
- mdist[k] = mean_i d[i, k]; Sync-D = min_k mdist; Sync-C = median_k mdist - min_k mdist; AV offset = vshift - argmin.
`sync_scores` is that pure part, on any embeddings.

Face crops (run_pipeline.py `crop_video`): per frame box -> size s = max(w, h) / 2 and centre, each median-filtered
over 13 frames; the frame is padded by int(s (1 + 2 cs)) with value 110, cs = 0.4, and the crop rows
[cy - s, cy + s (1 + 2 cs)), columns [cx - s (1 + cs), cx + s (1 + cs)) (extended downward over mouth and chin) are
resized to 224x224 (bilinear). The box source is pluggable (`BoxSource`): ground-truth boxes from face keypoints, or a
detector/pose network whose weights are provided. The reference uses S3FD boxes (`S3FDFaceBoxes` of
`dystream.evaluation.networks.s3fd` with sfd_face.pth) and re-encodes the crops as XVID; other detectors shift the
numbers a little, so results name their box source.

StreamAvatar deviation, as the notes recommend: scores are computed on speaking segments only (listening frames and
the zero padding both pull the median towards the minimum and deflate Sync-C). Each contiguous speaking run of at least
`min_segment_frames` frames is cut (video and its audio) and scored on its own; Sync-C/D are the frame-weighted means
over segments.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import medfilt

from dystream.evaluation.keypoints import PoseBackend, mask_runs
from dystream.evaluation.mfcc import mfcc_pcm16
from dystream.evaluation.networks.syncnet import SyncNetV2, load_syncnet
from dystream.evaluation.weights import WeightsInfo

__all__ = [
    "BoxSource",
    "KeypointFaceBoxes",
    "PoseFaceBoxes",
    "SyncNetScorer",
    "SyncResult",
    "SyncScores",
    "crop_faces",
    "face_boxes_from_keypoints",
    "framewise_confidence",
    "speaking_segments",
    "sync_scores",
]

SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance default, part of the reference numbers

# frames uint8 [T, H, W, 3] -> boxes float [T, 4] (x1, y1, x2, y2 in pixels; a NaN row where no face was found)
BoxSource = Callable[[np.ndarray], np.ndarray]


class SyncScores(NamedTuple):
    offset: int  # AV offset in frames (vshift - argmin)
    sync_c: float  # median(mdist) - min(mdist)
    sync_d: float  # min(mdist)
    dists: np.ndarray  # [T, 2 vshift + 1] distances per video window and candidate offset


def sync_scores(
    video_emb: np.ndarray | torch.Tensor, audio_emb: np.ndarray | torch.Tensor, vshift: int = 15
) -> SyncScores:
    """Offset search of syncnet_python on per-window embeddings video_emb [T, D], audio_emb [T, D] (float64)."""
    v = torch.as_tensor(video_emb, dtype=torch.float64)
    a = torch.as_tensor(audio_emb, dtype=torch.float64)
    if v.ndim != 2 or v.shape != a.shape:
        raise ValueError(f"sync_scores: embeddings must both be [T, D], got {tuple(v.shape)} and {tuple(a.shape)}")
    if v.shape[0] == 0:
        raise ValueError("sync_scores: no windows (a segment needs at least 6 frames)")
    if vshift < 0:
        raise ValueError(f"sync_scores: vshift must be >= 0, got {vshift}")
    win = 2 * vshift + 1
    a_pad = F.pad(a, (0, 0, vshift, vshift))  # [T + 2 vshift, D], zeros at both ends
    cand = a_pad.unfold(0, win, 1).permute(0, 2, 1)  # [T, win, D]: cand[i, k] = a_pad[i + k]
    dists = torch.linalg.vector_norm(v[:, None, :] - cand + PAIRWISE_EPS, dim=-1)  # [T, win]
    mdist = dists.mean(dim=0)
    minidx = int(torch.argmin(mdist))  # first minimum, as torch.min
    minval = mdist[minidx]
    median = torch.median(mdist)  # win is odd: the true median
    return SyncScores(vshift - minidx, float(median - minval), float(minval), dists.numpy())


def framewise_confidence(scores: SyncScores, kernel_size: int = 9) -> np.ndarray:
    """Per-window confidence median(mdist) - d[i, argmin], median-filtered (syncnet_python `fconfm`)."""
    mdist = scores.dists.mean(axis=0)
    minidx = int(np.argmin(mdist))
    return medfilt(np.median(mdist) - scores.dists[:, minidx], kernel_size=_odd_kernel(kernel_size, len(scores.dists)))


def _odd_kernel(kernel_size: int, length: int) -> int:
    # scipy's medfilt zero-pads; a kernel longer than the sequence would mostly see padding (the reference never meets
    # this: its face tracks are >= 100 frames), so short sequences get the largest odd kernel that fits
    return max(1, min(kernel_size, length if length % 2 else length - 1))


def speaking_segments(mask: np.ndarray | Sequence[float], min_len: int) -> list[tuple[int, int]]:
    """Contiguous runs [start, end) of speaking frames (mask > 0.5) lasting at least `min_len` frames."""
    return mask_runs(np.asarray(mask, dtype=np.float64) > 0.5, min_len)


def face_boxes_from_keypoints(kpts: np.ndarray, face_indices: Sequence[int], tau: float = 0.3) -> np.ndarray:
    """kpts [T, K, 3] (x, y, confidence) -> [T, 4] bounding boxes of the confident face keypoints (NaN if < 3)."""
    k = np.asarray(kpts, dtype=np.float64)
    if k.ndim != 3 or k.shape[-1] != 3:
        raise ValueError(f"face_boxes_from_keypoints: keypoints must be [T, K, 3], got {k.shape}")
    face = k[:, list(face_indices)]
    valid = face[..., 2] > tau
    xy = np.where(valid[..., None], face[..., :2], np.nan)
    boxes = np.full((k.shape[0], 4), np.nan)
    ok = valid.sum(axis=1) >= 3
    if ok.any():
        boxes[ok] = np.concatenate([np.nanmin(xy[ok], axis=1), np.nanmax(xy[ok], axis=1)], axis=1)
    return boxes


@dataclass
class KeypointFaceBoxes:
    """BoxSource from known keypoints (the synthetic world's ground truth, or a pose backend's output).

    `scale` enlarges the box about its centre: landmark boxes start at the eyebrows, tighter than S3FD's boxes.
    """

    kpts: np.ndarray  # [T, K, 3]
    face_indices: Sequence[int]
    tau: float = 0.3
    scale: float = 1.0

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if len(frames) != len(self.kpts):
            raise ValueError(f"KeypointFaceBoxes: {len(frames)} frames but keypoints for {len(self.kpts)}")
        b = face_boxes_from_keypoints(self.kpts, self.face_indices, self.tau)
        c, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2 * self.scale
        return np.concatenate([c - half, c + half], axis=1)


@dataclass
class PoseFaceBoxes:
    """BoxSource from a pose backend whose weights are provided (e.g. `DWPoseBackend`): its face keypoints -> boxes."""

    backend: PoseBackend
    face_group: str = "face"
    tau: float = 0.3
    scale: float = 1.0

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        kpts = self.backend(frames)
        return KeypointFaceBoxes(kpts, self.backend.layout.indices(self.face_group), self.tau, self.scale)(frames)


def _fill_missing(boxes: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaN rows between detections, hold the ends (the reference tracker interpolates gaps)."""
    ok = np.isfinite(boxes).all(axis=1)
    if not ok.any():
        raise ValueError("no face box in any frame of the segment")
    if ok.all():
        return boxes
    t = np.arange(len(boxes))
    return np.stack([np.interp(t, t[ok], boxes[ok, j]) for j in range(4)], axis=1)


def crop_faces(
    frames: np.ndarray, boxes: np.ndarray, crop_scale: float = 0.4, size: int = 224, smooth: int = 13
) -> np.ndarray:
    """syncnet_python's crop rule: frames uint8 [T, H, W, 3], boxes [T, 4] xyxy -> uint8 crops [T, size, size, 3]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"crop_faces: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (len(frames), 4):
        raise ValueError(f"crop_faces: boxes must be [{len(frames)}, 4], got {boxes.shape}")
    boxes = _fill_missing(boxes)
    s = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    cy, cx = (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2
    k = _odd_kernel(smooth, len(frames))
    if k > 1:
        s, cx, cy = (medfilt(v, kernel_size=k) for v in (s, cx, cy))
    out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    cs = crop_scale
    for t, frame in enumerate(frames):
        bs = s[t]
        bsi = int(bs * (1 + 2 * cs))  # pad so that crops leaving the frame read the constant 110
        padded = np.pad(frame, ((bsi, bsi), (bsi, bsi), (0, 0)), mode="constant", constant_values=110)
        my, mx = cy[t] + bsi, cx[t] + bsi
        face = padded[int(my - bs) : int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)) : int(mx + bs * (1 + cs))]
        if face.size == 0:
            raise ValueError(f"crop_faces: empty crop at frame {t} (box size {2 * bs:.1f} px)")
        x = torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # cv2.resize INTER_LINEAR
        out[t] = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


@dataclass
class SyncResult:
    sync_c: float  # frame-weighted mean over scored segments (NaN if none)
    sync_d: float
    offsets: list[int]  # per segment
    segments: list[tuple[int, int]]  # scored [start, end) frames
    per_segment: list[SyncScores] = field(repr=False)
    weights: WeightsInfo | None = None
    box_source: str = ""

    def as_dict(self) -> dict:
        return {
            "sync_c": self.sync_c,
            "sync_d": self.sync_d,
            "offsets": self.offsets,
            "segments": self.segments,
            "weights": self.weights.as_dict() if self.weights else None,
            "box_source": self.box_source,
        }


class SyncNetScorer:
    """Embeds face crops and audio with SyncNet v2 and scores speaking segments.

    `net` is a loaded `SyncNetV2` (`SyncNetScorer.from_weights(path)`), or a random one in tests only.
    """

    def __init__(
        self,
        net: SyncNetV2,
        info: WeightsInfo | None = None,
        vshift: int = 15,
        batch_size: int = 20,
        min_segment_frames: int = 50,
        device: str | torch.device = "cpu",
    ):
        if min_segment_frames < 6:
            raise ValueError(f"SyncNetScorer: min_segment_frames must be >= 6 (one window), got {min_segment_frames}")
        self.net = net.eval().to(device)
        self.info = info
        self.vshift = vshift
        self.batch_size = batch_size
        self.min_segment_frames = min_segment_frames
        self.device = torch.device(device)

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None, device: str | torch.device = "cpu", **kw) -> SyncNetScorer:
        net, info = load_syncnet(path, device=device)
        return cls(net, info, device=device, **kw)

    @staticmethod
    def audio_features(audio: np.ndarray) -> np.ndarray:
        """16 kHz mono -> MFCC [13, n_frames] at 100 Hz. Float audio in [-1, 1] is scaled to the int16 range
        (x 32768), which is what the reference reads from its wav files."""
        return mfcc_pcm16(audio, samplerate=16000).T

    @torch.no_grad()
    def embed(self, crops: np.ndarray, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """crops uint8 RGB [T, 224, 224, 3], audio [N] -> (video_emb, audio_emb), each [T' - 5, D],
        T' = min(T, floor(N / 640)); windows v in [0, T' - 5) as the reference."""
        n = min(len(crops), len(audio) // SAMPLES_PER_FRAME)
        last = n - 5
        if last <= 0:
            raise ValueError(f"SyncNetScorer.embed: {n} aligned frames are too few (need at least 6)")
        # [1, 3, T, 224, 224] float 0-255, BGR as cv2.imread gives the reference
        im = torch.from_numpy(np.ascontiguousarray(crops[:n, :, :, ::-1])).permute(3, 0, 1, 2)[None].float()
        cc = torch.from_numpy(self.audio_features(audio[: n * SAMPLES_PER_FRAME]))[None, None].float()  # [1,1,13,F]
        v_out, a_out = [], []
        for i in range(0, last, self.batch_size):
            frames = range(i, min(last, i + self.batch_size))
            lip = torch.cat([im[:, :, v : v + 5] for v in frames]).to(self.device)
            aud = torch.cat([cc[..., 4 * v : 4 * v + 20] for v in frames]).to(self.device)
            v_out.append(self.net.forward_lip(lip).cpu())
            a_out.append(self.net.forward_aud(aud).cpu())
        return torch.cat(v_out), torch.cat(a_out)

    def score_crops(self, crops: np.ndarray, audio: np.ndarray) -> SyncScores:
        """One already-cropped segment (uint8 [T, 224, 224, 3] + its audio) -> SyncScores."""
        v, a = self.embed(crops, audio)
        return sync_scores(v, a, self.vshift)

    def __call__(
        self,
        frames: np.ndarray,
        audio: np.ndarray,
        box_source: BoxSource,
        mask: np.ndarray | None = None,
        box_source_name: str = "",
    ) -> SyncResult:
        """Sync-C/D of one video: frames uint8 [T, H, W, 3] RGB at 25 fps, audio [N] 16 kHz (the avatar's own voice),
        mask [T] speaking (1) / listening (0); None scores the whole video as one segment."""
        frames = np.asarray(frames)
        t = min(len(frames), len(audio) // SAMPLES_PER_FRAME)
        mask = np.ones(t) if mask is None else np.asarray(mask)[:t]
        segments = speaking_segments(mask, self.min_segment_frames)
        scored: list[tuple[int, int]] = []
        per: list[SyncScores] = []
        boxes_all = np.asarray(box_source(frames), dtype=np.float64) if segments else np.zeros((0, 4))
        if segments and boxes_all.shape != (len(frames), 4):
            raise ValueError(f"box source returned {boxes_all.shape}, expected [{len(frames)}, 4] (one box per frame)")
        for s, e in segments:
            boxes = boxes_all[s:e]
            if not np.isfinite(boxes).all(axis=1).any():
                continue  # no face in the whole segment: not scorable
            crops = crop_faces(frames[s:e], boxes)
            per.append(self.score_crops(crops, audio[s * SAMPLES_PER_FRAME : e * SAMPLES_PER_FRAME]))
            scored.append((s, e))
        if per:
            w = np.array([e - s for s, e in scored], dtype=np.float64)
            sync_c = float(np.average([p.sync_c for p in per], weights=w))
            sync_d = float(np.average([p.sync_d for p in per], weights=w))
        else:
            sync_c = sync_d = float("nan")
        return SyncResult(sync_c, sync_d, [p.offset for p in per], scored, per, self.info, box_source_name)
