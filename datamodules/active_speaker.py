"""Active-speaker detection (ASD) for packing: the speaking mask of the person a clip shows, from its video and audio.

The protocol of the TalkNet-ASD / Light-ASD demos (`demoTalkNet.py`, `Columbia_test.py`; notes/data_and_vae.md §1.6),
with Light-ASD (`dystream.evaluation.networks.light_asd`) as the scoring network and S3FD
(`dystream.evaluation.networks.s3fd`) as the face detector:

1. faces on every 25 fps frame: S3FD on the frame downscaled x0.25, face probability > 0.9 (`S3FDDetector`);
2. IoU tracking (`track_faces`): a track grows frame by frame with the first face whose IoU with its last box
   exceeds 0.5, may miss up to 10 frames, and is kept with more than 10 detections (the reference's `>`); the boxes
   of missed frames are interpolated linearly;
3. crops (`face_crops`): box size and centre median-filtered over 13 frames, crop scale 0.40, resized to 224x224
   (`dystream.evaluation.sync.crop_faces`, the same rule SyncNet uses), grayscale (cv2 BGR2GRAY weights), centre
   112x112;
4. audio of the track's frames -> 13-d MFCC at 100 Hz, 4 per video frame (`mfcc_pcm16`, python_speech_features);
5. scores (`multi_window_scores`): the track is cut into windows of d seconds for every d of the duration set, each
   window scored on its own, the per-frame logits averaged over the durations and rounded to 0.1; the reference
   writes the set as `{1,1,1,2,2,2,3,3,4,5,6}`, a Python set literal, i.e. {1, 2, 3, 4, 5, 6}: each duration once;
6. per-frame smoothing (`smooth_track_scores`): the mean of the scores of frames f-2 .. f+2 (clipped, and, as the
   reference's slice `score[max(f - 2, 0) : min(f + 3, len(score) - 1)]`, never including the last score);
   a frame speaks when its smoothed score is >= 0.

Choices of ours, where the demos have nothing to say because they label every face in a scene:
- a packed clip is one person's crop and one shot, so there is no scene detection, and the avatar's tracks are
  picked (`select_avatar_tracks`): the track with the most face area weighted by centrality, summed over its
  frames (large, central and long tracks win), plus later or earlier tracks that continue it (no overlap in time,
  median boxes with IoU >= 0.2: the same face after a miss of more than 10 frames);
- frames outside the avatar's tracks are not speaking, and their count is reported (`frames_without_face`);
- crops are not re-encoded as XVID in between (the demos write and re-read an .avi), and MFCC are computed on the
  track's span of the packed 16 kHz track instead of an ffmpeg-cut wav of it (the same samples).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dystream.datamodules.format import FPS, SAMPLES_PER_FRAME

MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps

__all__ = [
    "ASDConfig",
    "ASDResult",
    "ActiveSpeakerDetector",
    "FaceDetector",
    "FaceTrack",
    "LightASDScorer",
    "TrackScorer",
    "box_iou",
    "face_crops",
    "multi_window_scores",
    "select_avatar_tracks",
    "smooth_track_scores",
    "track_faces",
]


class FaceDetector(Protocol):
    """frames uint8 [T, H, W, 3] RGB, resize factor -> per frame [N_t, 5] (x1, y1, x2, y2 in frame pixels, score)."""

    def __call__(self, frames: np.ndarray, scale: float) -> list[np.ndarray]: ...


# (MFCC float32 [B, 4n, 13], grayscale face crops uint8 [B, n, S, S]) -> speaking logits [B, n]
TrackScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class ASDConfig:
    """The ASD protocol's numbers (defaults: the TalkNet / Light-ASD demos)."""

    detect_scale: float = 0.25  # frames are downscaled by this before face detection (--facedetScale)
    iou_threshold: float = 0.5  # a face continues a track when IoU with its last box exceeds this
    max_missed: int = 10  # frames a track may miss (--numFailedDet)
    min_track: int = 10  # tracks need more than this many detections (--minTrack)
    min_face_size: float = 1.0  # mean box side (pixels) a track must exceed (--minFaceSize)
    crop_scale: float = 0.40  # --cropScale
    smooth_kernel: int = 13  # median filter over box centre and size
    durations: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # window lengths in seconds whose scores are averaged
    round_decimals: int | None = 1  # the averaged score is rounded (numpy.round) before smoothing; None: not
    smooth_radius: int = 2  # per-frame smoothing over +- this many frames
    continuation_iou: float = 0.2  # median-box IoU that makes a later/earlier track the same face

    def __post_init__(self) -> None:
        self.durations = tuple(int(d) for d in self.durations)
        if not 0.0 < self.detect_scale <= 1.0:
            raise ValueError(f"ASDConfig.detect_scale must be in (0, 1], got {self.detect_scale}")
        if not 0.0 <= self.iou_threshold < 1.0:
            raise ValueError(f"ASDConfig.iou_threshold must be in [0, 1), got {self.iou_threshold}")
        for name in ("max_missed", "min_track", "smooth_radius"):
            if getattr(self, name) < 0:
                raise ValueError(f"ASDConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.smooth_kernel < 1 or self.smooth_kernel % 2 == 0:
            raise ValueError(f"ASDConfig.smooth_kernel must be a positive odd number, got {self.smooth_kernel}")
        if not self.durations or any(d <= 0 for d in self.durations):
            raise ValueError(f"ASDConfig.durations must be positive seconds, got {self.durations}")
        if self.crop_scale < 0:
            raise ValueError(f"ASDConfig.crop_scale must be >= 0, got {self.crop_scale}")


# ------------------------------------------------------------------------------------------------- tracking


@dataclass
class FaceTrack:
    frames: np.ndarray  # int [L], consecutive frame indices
    boxes: np.ndarray  # float [L, 4] x1, y1, x2, y2 in pixels; frames without a detection interpolated
    detections: int  # frames with an actual detection

    def __len__(self) -> int:
        return len(self.frames)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes (continuous coordinates, as the reference tracker: no +1 on widths)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _boxes_of(detections: np.ndarray, t: int) -> list[np.ndarray]:
    a = np.asarray(detections, dtype=np.float64)
    if a.size == 0:
        return []
    if a.ndim != 2 or a.shape[1] < 4:
        raise ValueError(f"track_faces: detections of frame {t} must be [N, >= 4] xyxy rows, got shape {a.shape}")
    return list(a[:, :4])


def track_faces(
    detections: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
    max_missed: int = 10,
    min_track: int = 10,
    min_face_size: float = 1.0,
) -> list[FaceTrack]:
    """Greedy IoU tracking of per-frame detections ([N_t, >= 4] xyxy rows, best first), TalkNet `track_shot`.

    Tracks are built one after the other: a track starts at the first face not yet taken and, frame by frame,
    takes the first untaken face whose IoU with the track's last box exceeds `iou_threshold` (one face per frame);
    it ends once more than `max_missed` frames pass without one. Kept: tracks with more than `min_track`
    detections whose mean box width or height exceeds `min_face_size`; missed frames get interpolated boxes.
    """
    remaining = [_boxes_of(d, t) for t, d in enumerate(detections)]
    tracks: list[FaceTrack] = []
    while True:
        taken: list[tuple[int, np.ndarray]] = []
        for t, faces in enumerate(remaining):
            if taken and t - taken[-1][0] > max_missed:
                break
            for i, box in enumerate(faces):
                if not taken or box_iou(box, taken[-1][1]) > iou_threshold:
                    taken.append((t, box))
                    del faces[i]
                    break
        if not taken:
            return tracks
        if len(taken) <= min_track:
            continue
        frames = np.array([t for t, _ in taken])
        boxes = np.stack([b for _, b in taken])
        full = np.arange(frames[0], frames[-1] + 1)
        interp = np.stack([np.interp(full, frames, boxes[:, j]) for j in range(4)], axis=1)
        mean_w, mean_h = (interp[:, 2] - interp[:, 0]).mean(), (interp[:, 3] - interp[:, 1]).mean()
        if max(mean_w, mean_h) > min_face_size:
            tracks.append(FaceTrack(full, interp, len(taken)))


def _track_weight(track: FaceTrack, frame_hw: tuple[int, int]) -> float:
    h, w = frame_hw
    b = track.boxes
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2 - w / 2, (b[:, 1] + b[:, 3]) / 2 - h / 2], axis=1)
    off = np.linalg.norm(centre, axis=1) / (np.hypot(w, h) / 2)  # 0 at the centre, 1 at a corner
    return float(np.sum(area * np.clip(1.0 - off, 0.0, 1.0)))


def select_avatar_tracks(
    tracks: Sequence[FaceTrack], frame_hw: tuple[int, int], continuation_iou: float = 0.2
) -> list[int]:
    """Indices of the tracks that show the clip's own person: the one with the largest sum over its frames of box
    area x (1 - distance of the box centre from the frame centre / half diagonal), then, in that order, every track
    that overlaps no chosen track in time and whose median box has IoU >= `continuation_iou` with the first one's."""
    if not tracks:
        return []
    order = sorted(range(len(tracks)), key=lambda i: -_track_weight(tracks[i], frame_hw))
    first = order[0]
    anchor = np.median(tracks[first].boxes, axis=0)
    chosen = [first]
    for i in order[1:]:
        span = set(tracks[i].frames.tolist())
        if any(span.intersection(tracks[j].frames.tolist()) for j in chosen):
            continue
        if box_iou(np.median(tracks[i].boxes, axis=0), anchor) >= continuation_iou:
            chosen.append(i)
    return sorted(chosen, key=lambda i: int(tracks[i].frames[0]))


# ------------------------------------------------------------------------------------------------- crops, scores


def face_crops(
    frames: np.ndarray, track: FaceTrack, crop_size: int = 112, config: ASDConfig | None = None
) -> np.ndarray:
    """Grayscale face crops uint8 [L, crop_size, crop_size] of a track (TalkNet `crop_video` + its reader).

    The SyncNet/TalkNet crop (`crop_faces`) at 2 x crop_size (224), then cv2's BGR2GRAY in fixed point
    (Y = (4899 R + 9617 G + 1868 B + 8192) >> 14), then the centre crop_size x crop_size.
    """
    from dystream.evaluation.sync import crop_faces

    cfg = config or ASDConfig()
    rgb = crop_faces(frames[track.frames], track.boxes, crop_scale=cfg.crop_scale, size=2 * crop_size,
                     smooth=cfg.smooth_kernel).astype(np.int32)  # fmt: skip
    gray = ((rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + 8192) >> 14).astype(np.uint8)
    off = crop_size // 2
    return np.ascontiguousarray(gray[:, off : off + crop_size, off : off + crop_size])


def multi_window_scores(
    score: TrackScorer,
    mfcc: np.ndarray,
    faces: np.ndarray,
    durations: Sequence[int] = (1, 2, 3, 4, 5, 6),
    round_decimals: int | None = 1,
) -> np.ndarray:
    """Per-frame logits of one track averaged over window lengths (Light-ASD `evaluate_network`): float [n].

    mfcc [Ta, 13] (100 Hz), faces [L, S, S]. n = min(floor(Ta / 4), L) frames are scored (the reference keeps
    (Ta - Ta % 4) / 100 seconds: with Ta = 4L - 1 MFCC frames of the track's audio, the last frame gets no score).
    For a duration d every window of 25 d frames (and 100 d MFCC frames) is scored on its own, the last one shorter;
    windows of equal length go through `score` as one batch.
    """
    n = min(len(mfcc) // MFCC_PER_FRAME, len(faces))
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    mfcc = np.asarray(mfcc, dtype=np.float32)[: MFCC_PER_FRAME * n]
    faces = np.asarray(faces)[:n]
    per_duration = []
    for d in durations:
        w = FPS * int(d)
        n_full = n // w
        out = np.empty(n, dtype=np.float64)
        if n_full:
            a = mfcc[: MFCC_PER_FRAME * w * n_full].reshape(n_full, MFCC_PER_FRAME * w, -1)
            v = faces[: w * n_full].reshape(n_full, w, *faces.shape[1:])
            out[: w * n_full] = np.asarray(score(a, v), dtype=np.float64).reshape(-1)
        if n_full * w < n:
            rest = np.asarray(score(mfcc[None, MFCC_PER_FRAME * w * n_full :], faces[None, w * n_full :]))
            out[w * n_full :] = rest.reshape(-1)
        per_duration.append(out)
    mean = np.mean(per_duration, axis=0)
    return np.round(mean, round_decimals) if round_decimals is not None else mean


def smooth_track_scores(scores: np.ndarray, n_frames: int, radius: int = 2) -> np.ndarray:
    """Smoothed score of each of a track's `n_frames` frames: mean of scores[max(f - r, 0) : min(f + r + 1, n - 1)]
    (the reference's window, which leaves out the last score); a frame whose window is empty takes the last score."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return np.full(n_frames, np.nan)
    f = np.arange(n_frames)
    lo = np.maximum(f - radius, 0)
    hi = np.minimum(f + radius + 1, s.size - 1)
    csum = np.concatenate([[0.0], np.cumsum(s)])
    empty = hi <= lo
    count = np.where(empty, 1, hi - lo)
    out = (csum[np.maximum(hi, lo)] - csum[lo]) / count
    return np.where(empty, s[np.minimum(f, s.size - 1)], out)


# ------------------------------------------------------------------------------------------------- the detector


@dataclass
class ASDResult:
    mask: np.ndarray  # uint8 [T]: 1 where the avatar speaks (smoothed score >= 0), 0 elsewhere (also without a face)
    scores: np.ndarray  # float32 [T]: the smoothed Light-ASD logit of the avatar's face, NaN on frames without it
    tracks: list[FaceTrack] = field(repr=False)
    avatar_tracks: list[int] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)

    @property
    def frames_without_face(self) -> int:
        return int(np.isnan(self.scores).sum())

    def meta(self) -> dict[str, Any]:
        """For KEY.json: the protocol's counts and the raw per-frame scores (null without a face)."""
        return {
            "asd": {
                "model": "light-asd",
                "face_tracks": len(self.tracks),
                "avatar_tracks": len(self.avatar_tracks),
                "frames_without_face": self.frames_without_face,
                "weights": self.weights,
            },
            "asd_scores": [None if np.isnan(s) else round(float(s), 3) for s in self.scores],
        }


class ActiveSpeakerDetector:
    """frames uint8 [T, H, W, 3] RGB at 25 fps + the avatar's 16 kHz audio [T * 640] -> `ASDResult`.

    `detect` and `score` are any callables of the `FaceDetector` / `TrackScorer` shapes (stubs in tests);
    `from_weights` builds S3FD + Light-ASD from their weight files.
    """

    def __init__(
        self,
        detect: FaceDetector,
        score: TrackScorer,
        crop_size: int = 112,
        config: ASDConfig | None = None,
        weights: dict[str, Any] | None = None,
    ) -> None:
        self.detect, self.score, self.crop_size = detect, score, crop_size
        self.config = config or ASDConfig()
        self.weights = dict(weights or {})

    @classmethod
    def from_weights(
        cls,
        asd_weights: str | os.PathLike,
        face_detector_weights: str | os.PathLike,
        device: str = "cpu",
        config: ASDConfig | None = None,
    ) -> ActiveSpeakerDetector:
        """Light-ASD (`pretrain_AVA_CVPR.model` / `finetuning_TalkSet.model`) + S3FD (`sfd_face.pth`); each load
        raises `MetricWeightsMissing` naming the file if it is absent, truncated or of another layout."""
        from dystream.evaluation.networks.light_asd import load_light_asd
        from dystream.evaluation.networks.s3fd import S3FDDetector

        name = "light_asd_talkset" if Path(asd_weights).name == "finetuning_TalkSet.model" else "light_asd_ava"
        net, asd_info = load_light_asd(asd_weights, name=name, device=device)
        detector = S3FDDetector.from_weights(face_detector_weights, device=device)
        weights = {"asd": asd_info.as_dict(), "face_detector": detector.info.as_dict() if detector.info else None}
        return cls(detector, LightASDScorer(net, device), net.config.crop_size, config, weights)

    def __call__(self, frames: np.ndarray, audio: np.ndarray, source_scale: float = 1.0) -> ASDResult:
        """`source_scale`: size of `frames` relative to the source video (< 1 when packing downscaled it): faces are
        detected at `detect_scale` of the source resolution, i.e. `frames` are resized by detect_scale / source_scale
        (at most 1)."""
        from dystream.evaluation.mfcc import mfcc_pcm16

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"active-speaker detection: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}"
            )
        t = len(frames)
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or len(audio) != t * SAMPLES_PER_FRAME:
            raise ValueError(
                f"active-speaker detection: audio must be [T * 640] = [{t * SAMPLES_PER_FRAME}], got {audio.shape}"
            )
        if not 0.0 < source_scale <= 1.0:
            raise ValueError(f"active-speaker detection: source_scale must be in (0, 1], got {source_scale}")
        cfg = self.config
        detections = self.detect(frames, min(1.0, cfg.detect_scale / source_scale))
        if len(detections) != t:
            raise ValueError(f"face detector returned {len(detections)} frame(s) of detections for {t} frames")
        tracks = track_faces(detections, cfg.iou_threshold, cfg.max_missed, cfg.min_track, cfg.min_face_size)
        avatar = select_avatar_tracks(tracks, frames.shape[1:3], cfg.continuation_iou)
        scores = np.full(t, np.nan, dtype=np.float64)
        for i in avatar:
            track = tracks[i]
            start, stop = int(track.frames[0]), int(track.frames[-1]) + 1
            faces = face_crops(frames, track, self.crop_size, cfg)
            mfcc = mfcc_pcm16(audio[start * SAMPLES_PER_FRAME : stop * SAMPLES_PER_FRAME])
            raw = multi_window_scores(self.score, mfcc, faces, cfg.durations, cfg.round_decimals)
            scores[start:stop] = smooth_track_scores(raw, len(track), cfg.smooth_radius)
        mask = np.zeros(t, dtype=np.uint8)
        mask[np.isfinite(scores)] = scores[np.isfinite(scores)] >= 0
        return ASDResult(mask, scores.astype(np.float32), tracks, avatar, self.weights)


class LightASDScorer:
    """`TrackScorer` of a loaded `LightASD`: numpy in, numpy out, no gradients."""

    def __init__(self, net: Any, device: str = "cpu") -> None:
        self.net, self.device = net, device

    def __call__(self, mfcc: np.ndarray, faces: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            a = torch.from_numpy(np.ascontiguousarray(mfcc, dtype=np.float32)).to(self.device)
            v = torch.from_numpy(np.ascontiguousarray(faces)).to(self.device)
            return self.net(a, v).float().cpu().numpy()
