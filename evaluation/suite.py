"""The metric suite shared by `dystream eval` (the tables) and the evaluation callback: which networks are available,
and every metric of a set of videos against a set of real videos.

Metrics (docs/evaluation.md for each protocol):

| key | what | needs |
|---|---|---|
| `fid`, `fvd` | FID (InceptionV3 pool3 of every frame), FVD (I3D logits of 16-frame clips) | the published weights |
| `fd_pose` | Fréchet distance of per-frame embeddings of the synthetic pose network (pooled backbone) | `metric_pose` |
| `fd_sync` | Fréchet distance of the synthetic SyncNet's lip-window embeddings (5-frame windows) | `metric_syncnet` |
| `sync_c`, `sync_d` | Sync-C / Sync-D (`SyncNetScorer`, synthetic SyncNet), mean over videos | `metric_syncnet` |
| `hkc`, `hkv`, `lbkv`, `lhkv`, `lfkv` | keypoint metrics on the synthetic pose network's keypoints | `metric_pose` |
| `mouth_voice_r`, `mouth_voice_r_speech` | r of lip gap and voice loudness, all / speaking frames | `metric_pose` |
| `mouth_response_speech`, `mouth_unrelated_speech` | lip gap spread in speech: voice-explained / rest | `metric_pose` |
| `<sync/mouth key>_other` | the same, against `EvalVideo.other_audio` (keypoints, lip embeddings reused) | as above |
| `drift_*` | identity drift: cosine distance to the reference, else 64x64 pixel RMS | `metric_identity` |

FD-pose and FD-sync are *not* FID/FVD: they use our synthetic networks' features, are only comparable between rows of
the same table (same networks, same clips), and are named differently on purpose.

Face boxes for Sync-C/D come from the pose network's face keypoints for every video (so every row uses the same box
source); without a pose network, from the ground-truth keypoints of the source clip (`EvalVideo.kpts`), labelled.
A metric whose network is missing is an `NA` with the `MetricUnavailable` message, never a number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from dystream.evaluation.frechet import FeatureStats, frechet_distance
from dystream.evaluation.identity import distance_name, identity_drift
from dystream.evaluation.keypoints import DWPOSE_134, hkc, hkv, listening_variances, mean_over_videos
from dystream.evaluation.metric_nets import (
    DEFAULT_IDENTITY,
    DEFAULT_POSE,
    DEFAULT_SYNCNET,
    load_metric_identity,
    load_metric_pose,
    load_metric_syncnet,
)
from dystream.evaluation.mouth_voice import mouth_opening, mouth_voice_correlation, mouth_voice_split
from dystream.evaluation.networks.pose_small import PoseNetBackend
from dystream.evaluation.networks.syncnet import load_syncnet
from dystream.evaluation.sync import KeypointFaceBoxes, SyncNetScorer, crop_faces, sync_scores
from dystream.evaluation.weights import MetricUnavailable, WeightsInfo

__all__ = [
    "NA",
    "EvalVideo",
    "MetricSuite",
    "SuiteConfig",
    "SuiteResult",
    "VIDEO_METRICS",
    "FD_METRICS",
    "LISTENING_COUNTS",
]

FD_METRICS = ("fid", "fvd", "fd_pose", "fd_sync")
# why r in speech is what it is: how far the mouth follows the loudness, and how much it moves otherwise
MOUTH_SPLIT_METRICS = ("mouth_response_speech", "mouth_unrelated_speech")
KEYPOINT_METRICS = ("hkc", "hkv", "lbkv", "lhkv", "lfkv", "mouth_voice_r", "mouth_voice_r_speech", *MOUTH_SPLIT_METRICS)
VIDEO_METRICS = ("sync_c", "sync_d", *KEYPOINT_METRICS)
# the same lips against `EvalVideo.other_audio` (another clip's voice: the floor of a video that ignores its audio)
OTHER_VOICE_METRICS = ("sync_c_other", "sync_d_other", "mouth_voice_r_other", "mouth_voice_r_speech_other")
DRIFT_METRICS = ("drift_mean", "drift_first", "drift_last", "drift_slope_per_min")
# how many videos gave each listening variance: a video counts only where its keypoints are confident during a
# listening segment, so two rows' means may cover different clips (a hand drawn as a blur is not detected)
LISTENING_COUNTS = ("lbkv_clips", "lhkv_clips", "lfkv_clips")
# which network each metric needs (keys of MetricSuite.unavailable)
NEEDS = {
    "fid": "fid",
    "fvd": "fvd",
    "fd_pose": "pose",
    "fd_sync": "sync",
    "sync_c": "sync",
    "sync_d": "sync",
    **{k: "pose" for k in KEYPOINT_METRICS},
    "sync_c_other": "sync",
    "sync_d_other": "sync",
    "mouth_voice_r_other": "pose",
    "mouth_voice_r_speech_other": "pose",
}


@dataclass(frozen=True)
class NA:
    """A metric that could not be computed, and why (printed as "n/a (reason)")."""

    reason: str

    def __str__(self) -> str:
        return f"n/a ({self.reason})"


Value = float | NA


@dataclass
class EvalVideo:
    """One video to score, with what its metrics need."""

    key: str
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, 25 fps
    audio: np.ndarray  # float [T * 640] 16 kHz: the avatar's own (driving) voice, what the lips should follow
    mask: np.ndarray  # [T] 1 = speaking, 0 = listening
    reference: np.ndarray | None = None  # uint8 [H, W, 3] the reference image (identity drift)
    kpts: np.ndarray | None = None  # [T, 134, 3] ground-truth keypoints of the source clip (dwpose134), if known
    other_audio: np.ndarray | None = None  # another voice to score the same lips against (the `<key>_other` metrics)

    def __post_init__(self) -> None:
        f = self.frames
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"EvalVideo {self.key}: frames must be uint8 [T, H, W, 3], got {f.dtype} {f.shape}")
        if len(self.mask) != len(f):
            raise ValueError(f"EvalVideo {self.key}: mask has {len(self.mask)} frames, the video {len(f)}")
        for name in ("audio", "other_audio"):
            a = getattr(self, name)
            if a is not None and len(a) < 640 * len(f):
                raise ValueError(
                    f"EvalVideo {self.key}: {name} has {len(a)} samples for {len(f)} frames (need T * 640)"
                )


@dataclass
class SuiteConfig:
    """Networks and protocol of the metric suite.

    Every weight field takes a path or a zoo entry name (resolved from the zoo cache, `dystream zoo import`).

    Args:
        syncnet: the SyncNet file: the synthetic SyncNet (`*.safetensors`, arch `metric_syncnet`) or the published
            `syncnet_v2.model` (any other file name; SyncNet v2 through `load_syncnet`). None: Sync-C/D and FD-sync
            are n/a.
        pose: the synthetic keypoint regressor file (None: HKV, LxKV and FD-pose are n/a, unless DWPose is given).
        dwpose_det: DWPose's `yolox_l.onnx`; with `dwpose_pose`, DWPose (dwpose134 output) replaces the synthetic
            pose network for the keypoint metrics and the face boxes, and FD-pose is n/a (DWPose gives no embedding).
        dwpose_pose: DWPose's `dw-ll_ucoco_384.onnx`.
        identity: the identity embedding for identity drift: the synthetic identity network (`*.safetensors`, arch
            `metric_identity`) or an ArcFace IResNet-50 `backbone.pth` (any other file name). None or a missing file:
            drift falls back to pixel RMS at 64x64 ("pixel_rms_64").
        fid_inception: `pt_inception-2015-12-05-6726825d.pth` for FID (None: n/a).
        i3d: `i3d_torchscript.pt` for FVD (None: n/a); needs `i3d_sha256`.
        i3d_sha256: the sha256 you trust for the I3D TorchScript file (it runs code when loaded).
        sync_segments: "whole" scores each video as one segment; "speaking" scores speaking runs of at least
            `min_segment_frames` (the StreamAvatar protocol for real data; the synthetic world's speaking runs are
            shorter than 2 s, so 4-s synthetic clips use "whole").
        min_segment_frames: shortest speaking run scored with sync_segments="speaking".
        vshift: the Sync-C offset search range in frames (+-).
        drift_bucket_s: bucket length of the identity-drift summary, in seconds.
        fvd_clips_per_video: 16-frame clips per video for FVD (uniformly spaced).
    """

    syncnet: str | None = DEFAULT_SYNCNET
    pose: str | None = DEFAULT_POSE
    dwpose_det: str | None = None
    dwpose_pose: str | None = None
    identity: str | None = DEFAULT_IDENTITY
    fid_inception: str | None = None
    i3d: str | None = None
    i3d_sha256: str | None = None
    sync_segments: Literal["whole", "speaking"] = "whole"
    min_segment_frames: int = 50
    vshift: int = 15
    drift_bucket_s: float = 1.0
    fvd_clips_per_video: int = 4

    def __post_init__(self) -> None:
        if self.sync_segments not in ("whole", "speaking"):
            raise ValueError(f"SuiteConfig.sync_segments must be 'whole' or 'speaking', got {self.sync_segments!r}")
        if self.min_segment_frames < 6:
            raise ValueError(f"SuiteConfig.min_segment_frames must be >= 6, got {self.min_segment_frames}")
        if self.vshift < 1:
            raise ValueError(f"SuiteConfig.vshift must be >= 1, got {self.vshift}")
        if self.drift_bucket_s <= 0:
            raise ValueError(f"SuiteConfig.drift_bucket_s must be positive, got {self.drift_bucket_s}")
        if self.fvd_clips_per_video < 1:
            raise ValueError(f"SuiteConfig.fvd_clips_per_video must be >= 1, got {self.fvd_clips_per_video}")


@dataclass
class SuiteResult:
    values: dict[str, Value]  # dataset values (means over videos; Fréchet distances against the real set)
    features: dict[str, FeatureStats]  # per FD metric, this set's features (raw kept), to serve as a real set later
    per_video: list[dict[str, float]] = field(default_factory=list)


class MetricSuite:
    """Loads whatever metric networks are available; `evaluate(videos, real)` computes every metric it can.

    `unavailable` maps "sync", "pose", "fid", "fvd" to the reason a network is missing (the MetricUnavailable
    message); metrics that need it are `NA(reason)`. Identity drift is never n/a: without the identity network it
    falls back to pixel RMS, and `identity_fallback` holds the reason (None when the embedder is used).
    """

    def __init__(
        self,
        config: SuiteConfig | None = None,
        device: str | torch.device = "cpu",
        syncnet: Any = None,
        pose: Any = None,
        identity: Any = None,
    ) -> None:
        """`syncnet` / `pose` / `identity` (an `Embedder`) may pass already-built networks (tests, callbacks) instead
        of the files in `config`."""
        self.config = cfg = _resolve_zoo_names(config or SuiteConfig())
        self.device = torch.device(device)
        self.unavailable: dict[str, str] = {}
        self.weights: dict[str, WeightsInfo | None] = {}
        self.scorer: SyncNetScorer | None = None
        self.pose: PoseNetBackend | None = None
        self.fid_extractor = self.i3d_extractor = None
        self.pose_features = True  # whether the pose backend gives FD-pose embeddings
        self.identity = identity  # the identity Embedder of the drift metric; None: pixel RMS fallback
        self.identity_fallback: str | None = None if identity is not None else "no identity network configured"
        if identity is None and cfg.identity is not None:
            try:
                self.identity = _load_identity(cfg.identity, self.device)
                self.weights["identity"] = getattr(self.identity, "weights_info", None)
                self.identity_fallback = None
            except MetricUnavailable as e:
                self.identity_fallback = str(e)
        try:
            if syncnet is not None:
                net, info = syncnet, None
            elif cfg.syncnet is not None and not str(cfg.syncnet).endswith(".safetensors"):
                net, info = load_syncnet(cfg.syncnet, device=self.device)  # the published SyncNet v2
            else:
                net, info = load_metric_syncnet(cfg.syncnet, self.device)
            self.scorer = SyncNetScorer(
                net, info, vshift=cfg.vshift, min_segment_frames=cfg.min_segment_frames, device=self.device
            )
            self.weights["sync"] = info
        except MetricUnavailable as e:
            self.unavailable["sync"] = str(e)
        try:
            if pose is None and (cfg.dwpose_det is not None or cfg.dwpose_pose is not None):
                from dystream.evaluation.networks.dwpose import DWPoseBackend

                self.pose = DWPoseBackend(cfg.dwpose_det, cfg.dwpose_pose, output_layout="dwpose134")
                self.weights["pose"] = self.pose.pose_info
                self.pose_features = False
            else:
                net, info = (pose, None) if pose is not None else load_metric_pose(cfg.pose, self.device)
                self.pose = PoseNetBackend(net, device=self.device)
                self.weights["pose"] = info
        except MetricUnavailable as e:
            self.unavailable["pose"] = str(e)
        try:
            from dystream.evaluation.fid import FIDExtractor, load_fid_inception

            net, info = load_fid_inception(cfg.fid_inception, device=self.device)
            self.fid_extractor = FIDExtractor(net, info)
            self.weights["fid"] = info
        except MetricUnavailable as e:
            self.unavailable["fid"] = str(e)
        try:
            from dystream.evaluation.fvd import I3DExtractor
            from dystream.evaluation.networks.i3d import load_i3d_torchscript

            module, info = load_i3d_torchscript(cfg.i3d, sha256=cfg.i3d_sha256, device=self.device)
            self.i3d_extractor = I3DExtractor(module, info, device=self.device)
            self.weights["fvd"] = info
        except MetricUnavailable as e:
            self.unavailable["fvd"] = str(e)

    @property
    def drift_distance(self) -> str:
        """The identity-drift distance: "cosine (metric_identity)" with the identity network, else "pixel_rms_64"."""
        return distance_name(self.identity)

    @property
    def box_source(self) -> str:
        if self.pose is None:
            return "ground-truth keypoints"
        return "synthetic pose network (face keypoints)" if self.pose_features else "DWPose (face keypoints)"

    def na(self, metric: str) -> NA | None:
        """NA(reason) if `metric`'s network is missing, else None."""
        if metric == "fd_pose" and self.pose is not None and not self.pose_features:
            return NA("FD-pose needs the synthetic pose network's embedding; DWPose gives none")
        need = NEEDS.get(metric)
        return NA(self.unavailable[need]) if need in self.unavailable else None

    # -- per video -------------------------------------------------------------------------------
    def _boxes(self, video: EvalVideo, kpts: np.ndarray | None) -> np.ndarray | None:
        source = kpts if kpts is not None else video.kpts
        if source is None:
            return None
        return KeypointFaceBoxes(source, DWPOSE_134.indices("face"))(video.frames)

    def video_metrics(self, video: EvalVideo, exact_keypoints: bool = False) -> tuple[dict[str, float], dict]:
        """(metrics of one video, features for the FD metrics). `exact_keypoints` uses the video's ground-truth
        keypoints for the keypoint metrics instead of the pose network (the ground-truth reference row)."""
        out: dict[str, float] = {}
        feats: dict[str, np.ndarray] = {}
        h = video.frames.shape[1]
        voices = {"": video.audio} | ({} if video.other_audio is None else {"_other": video.other_audio})
        kpts = None
        if exact_keypoints and video.kpts is not None:
            kpts = np.asarray(video.kpts, dtype=np.float32)
        elif self.pose is not None:
            kpts = self.pose(video.frames)
        if self.pose is not None and self.pose_features:
            feats["fd_pose"] = self.pose.features(video.frames)
        if kpts is not None:
            out["hkc"] = hkc(kpts, DWPOSE_134)
            out["hkv"] = hkv(kpts, DWPOSE_134, frame_height=h)
            lv = listening_variances(kpts, video.mask, DWPOSE_134, frame_height=h)
            out.update(lbkv=lv["LBKV"], lhkv=lv["LHKV"], lfkv=lv["LFKV"])
            opening = mouth_opening(kpts, DWPOSE_134)
            for suffix, voice in voices.items():
                out[f"mouth_voice_r{suffix}"] = mouth_voice_correlation(opening, voice)
                out[f"mouth_voice_r_speech{suffix}"] = mouth_voice_correlation(opening, voice, video.mask)
            out.update(zip(MOUTH_SPLIT_METRICS, mouth_voice_split(opening, video.audio, video.mask), strict=True))
        boxes = self._boxes(video, None if exact_keypoints else kpts)
        if self.scorer is not None and boxes is not None:
            crops = crop_faces(video.frames, boxes)
            v, a = self.scorer.embed(crops, np.asarray(video.audio))
            feats["fd_sync"] = v.double().numpy()
            if self.config.sync_segments == "whole":
                s = sync_scores(v, a, self.config.vshift)
                out.update(sync_c=s.sync_c, sync_d=s.sync_d, sync_offset=float(s.offset))
                if video.other_audio is not None:
                    s = sync_scores(v, self.scorer.embed(crops, np.asarray(video.other_audio))[1], self.config.vshift)
                    out.update(sync_c_other=s.sync_c, sync_d_other=s.sync_d)
            else:
                for suffix, voice in voices.items():
                    r = self.scorer(video.frames, voice, lambda f: boxes, video.mask, self.box_source)
                    out.update({f"sync_c{suffix}": r.sync_c, f"sync_d{suffix}": r.sync_d})
        if video.reference is not None:
            d = identity_drift(video.frames, video.reference, self.identity, 25.0, self.config.drift_bucket_s)
            out.update(
                drift_mean=float(np.average(d.mean, weights=d.count)),
                drift_first=d.first_bucket_mean,
                drift_last=d.last_bucket_mean,
                drift_slope_per_min=d.slope_per_min,
            )
        if self.fid_extractor is not None:
            feats["fid"] = self.fid_extractor(video.frames)
        if self.i3d_extractor is not None:
            from dystream.evaluation.fvd import ClipSampler

            sampler = ClipSampler(clips_per_video=self.config.fvd_clips_per_video)
            clips = sampler.clips(torch.from_numpy(np.ascontiguousarray(video.frames)).permute(3, 0, 1, 2))
            if clips.shape[0]:
                feats["fvd"] = self.i3d_extractor(clips)
        return out, feats

    # -- a set of videos -------------------------------------------------------------------------
    def evaluate(
        self,
        videos: Iterable[EvalVideo],
        real: dict[str, FeatureStats] | None = None,
        exact_keypoints: bool = False,
    ) -> SuiteResult:
        """Every metric of `videos`; Fréchet distances against `real` (e.g. the ground-truth set's `features`)."""
        per_video: list[dict[str, float]] = []
        stats: dict[str, FeatureStats] = {}
        other_voice = False
        for video in videos:
            other_voice |= video.other_audio is not None
            m, feats = self.video_metrics(video, exact_keypoints=exact_keypoints)
            per_video.append({"key": video.key, **m})  # type: ignore[dict-item]
            for name, f in feats.items():
                if len(f):
                    stats.setdefault(name, FeatureStats(keep_features=True, meta=self.feature_meta(name))).update(f)
        values: dict[str, Value] = {}
        for name in (*VIDEO_METRICS, *DRIFT_METRICS, *(OTHER_VOICE_METRICS if other_voice else ())):
            exact = exact_keypoints and name.removesuffix("_other") in KEYPOINT_METRICS  # labels need no pose network
            values[name] = (None if exact else self.na(name)) or _mean(per_video, name)
        counts = mean_over_videos(per_video, [name.removesuffix("_clips") for name in LISTENING_COUNTS])
        for name in LISTENING_COUNTS:
            key = name.removesuffix("_clips")
            values[name] = (None if exact_keypoints else self.na(key)) or counts[f"{key}_videos"]
        for name in FD_METRICS:
            values[name] = self.na(name) or self.frechet(name, stats.get(name), (real or {}).get(name))
        return SuiteResult(values, stats, per_video)

    def feature_meta(self, name: str) -> dict[str, str]:
        meta = {"metric": name}
        info = self.weights.get({"fd_pose": "pose", "fd_sync": "sync"}.get(name, name))
        if info is not None:
            meta.update(sha256=info.sha256, weights=info.path)
        return meta

    @staticmethod
    def frechet(name: str, fake: FeatureStats | None, real: FeatureStats | None) -> Value:
        if real is None:
            return NA("no real statistics to compare with")
        if fake is None or fake.n < 2 or real.n < 2:
            return NA("fewer than 2 feature vectors")
        if real.meta.get("sha256") != fake.meta.get("sha256"):
            return NA(f"real and generated features come from different {name} networks")
        return float(frechet_distance(real, fake))


def _load_identity(path: str, device: torch.device) -> Any:
    """The identity `Embedder` of `path`: the synthetic identity network, or ArcFace IResNet-50 for `.pth` files."""
    if str(path).endswith(".safetensors"):
        return load_metric_identity(path, device)
    from dystream.evaluation.networks.iresnet import ArcFaceEmbedder, load_arcface_iresnet50
    from dystream.evaluation.weights import MetricWeightsMissing, sha256_file

    try:
        embed = ArcFaceEmbedder(load_arcface_iresnet50(path, device), device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise MetricWeightsMissing("metric_identity", str(e)) from e
    embed.weights_info = WeightsInfo("arcface_iresnet50", str(path), sha256_file(path), "sha256 reported")
    return embed


def _resolve_zoo_names(cfg: SuiteConfig) -> SuiteConfig:
    """Weight fields may name zoo entries (`fid_inception`, `syncnet_v2`, `syncnet-small.synthetic`, ...) instead of
    paths: an entry in the zoo cache (`dystream zoo import NAME PATH`) resolves to its verified file. A name that is
    not cached stays as it is, and the loader then reports the missing file."""
    import dataclasses
    from pathlib import Path

    from dystream.zoo import is_entry, resolve

    fields = ("syncnet", "pose", "dwpose_det", "dwpose_pose", "identity", "fid_inception", "i3d")
    out = {}
    for name in fields:
        value = getattr(cfg, name)
        if value is None or Path(value).exists() or not is_entry(str(value)):
            continue
        try:
            out[name] = str(resolve(str(value)))
        except (FileNotFoundError, OSError, ValueError, RuntimeError):
            continue  # not in the cache: the loader's MetricWeightsMissing names the file
    return dataclasses.replace(cfg, **out) if out else cfg


def _mean(rows: Sequence[dict[str, float]], key: str) -> Value:
    vals = np.array([r[key] for r in rows if key in r and np.isfinite(r[key])], dtype=np.float64)
    if vals.size == 0:
        return NA("no video gave a value") if rows else NA("no videos")
    return float(vals.mean())
