"""`dystream eval`: generate the evaluation set with every model of a recipe and write the benchmark tables.

    dystream eval --config recipes/eval.yaml [--out docs/results] [--clips 16] [--device cpu]

The recipe (`recipes/eval.yaml`) fixes the evaluation set (the first `clips.count` clips of `clips.shards`, in shard
order; of each, frame `clips.reference_frame` is the reference image and the last `clips.frames` frames are the
evaluated window, with their audio and speaking mask), the metric networks and protocol (`metrics`, the fields of
`dystream.evaluation.suite.SuiteConfig`) and the models (`models`, the fields of
`dystream.evaluation.generation.ModelSpec`). Rows:

- "Ground truth": the real clips (the real set every Fréchet distance compares with);
- "Ground truth (exact keypoints)": keypoint metrics from the synthetic world's exact keypoints instead of the pose
  network (shows what the network adds or loses);
- "Ground truth, partner muted (synthetic world)": the synthetic clips re-rendered with the partner muted and none of
  the listener's reactions to them, every other draw the same: the listening motion that answers the partner, i.e.
  the most a model's "partner muted" row can lose (Table 2's reference); and its exact-keypoints row;
- "VAE reconstruction" (when `reconstruction_vae` names a VAE file): the real clips encoded and decoded as the DiT
  stages encode them: what any generator on that VAE can reach at best;
- one row per model. A model whose export is missing is an n/a row naming the file and the recipe that makes it; it
  never triggers training.
Every row is also scored against another clip's voice (clip i against clip i + 1's audio; the "other voice" columns
of Table 4: the floor of a video that ignores its audio), and with `swapped_voice` each model generates the clips a
second time driven by clip i + 1's voice (own reference, mask and partner) and is scored against that voice (the
"swapped voice" column: whether the mouth follows the audio rather than the speaking mask).
A metric whose network is missing is "n/a (reason)" (`MetricUnavailable`), never a number from random weights. The
tables go to `<out>/results.md`, `<out>/table*.csv` and `<out>/results.json` (`dystream.evaluation.tables`).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dystream.evaluation.generation import ModelSpec
from dystream.evaluation.suite import KEYPOINT_METRICS, NA, EvalVideo, MetricSuite, SuiteConfig, SuiteResult
from dystream.evaluation.tables import Row, write_tables

HELP = "generate the evaluation set with each model of recipes/eval.yaml and write the benchmark tables"

DEFAULT_CONFIG = "recipes/eval.yaml"


@dataclass
class ClipsConfig:
    """The evaluation set.

    Args:
        shards: validation shards (a folder with index.json, a brace pattern or a tar).
        count: clips evaluated: the first `count` in shard order (fewer if the shards hold fewer).
        frames: evaluated frames per clip (the clip's last `frames` frames); students need a multiple of 4 x chunk.
        reference_frame: the frame used as the reference image (must lie before the evaluated window).
    """

    shards: str = "data/synthetic/val"
    count: int = 16
    frames: int = 96
    reference_frame: int = 0

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(
                f"eval clips.count must be >= 2 (the other-voice scores pair clip i with clip i + 1), got {self.count}"
            )
        if self.frames < 6:
            raise ValueError(f"eval clips.frames must be >= 6 (one SyncNet window), got {self.frames}")
        if self.reference_frame < 0:
            raise ValueError(f"eval clips.reference_frame must be >= 0, got {self.reference_frame}")


@dataclass
class EvalConfig:
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    metrics: SuiteConfig = field(default_factory=SuiteConfig)
    models: list[ModelSpec] = field(default_factory=list)
    out: str = "docs/results"
    reconstruction_vae: str | None = None  # a VAE export: adds the "VAE reconstruction" row
    swapped_voice: bool = True  # generate each model's clips again driven by another clip's voice (Table 4)
    seed: int = 0
    batch_size: int = 4
    device: str = "cpu"


def _build(cls: type, values: Any, where: str) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def load_config(path: str | Path) -> EvalConfig:
    """Parse and validate an eval recipe; errors name the file and the field."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"eval recipe {str(p)!r} not found (the default is {DEFAULT_CONFIG})")
    doc = yaml.safe_load(p.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: the recipe must be a mapping")
    top = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(doc) - top)
    if unknown:
        raise ValueError(f"{p}: unknown field(s) {unknown}; known: {sorted(top)}")
    models = doc.get("models") or []
    if not isinstance(models, list):
        raise ValueError(f"{p}: models must be a list")
    names = [m.get("name") if isinstance(m, dict) else None for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: model names must be unique, got {names}")
    return EvalConfig(
        clips=_build(ClipsConfig, doc.get("clips"), f"{p}: clips"),
        metrics=_build(SuiteConfig, doc.get("metrics"), f"{p}: metrics"),
        models=[_build(ModelSpec, m, f"{p}: models[{i}]") for i, m in enumerate(models)],
        out=str(doc.get("out", "docs/results")),
        reconstruction_vae=doc.get("reconstruction_vae"),
        swapped_voice=_flag(doc.get("swapped_voice", True), f"{p}: swapped_voice"),
        seed=int(doc.get("seed", 0)),
        batch_size=int(doc.get("batch_size", 4)),
        device=str(doc.get("device", "cpu")),
    )


@dataclass
class EvalClips:
    keys: list[str]
    frames: np.ndarray  # uint8 [N, T, H, W, 3]
    references: np.ndarray  # uint8 [N, H, W, 3]
    audio_self: np.ndarray  # float32 [N, T * 640]
    audio_other: np.ndarray
    masks: np.ndarray  # [N, T]
    kpts: list[np.ndarray | None]
    metas: list[dict] = field(default_factory=list)  # each clip's shard metadata
    clip_frames: list[int] = field(default_factory=list)  # each whole clip's length (frames)

    def videos(
        self, frames: list[np.ndarray] | np.ndarray | None = None, audio_shift: int = 0, other_voice: bool = False
    ) -> list[EvalVideo]:
        """EvalVideos of `frames` (default: the real clips); audio_shift k scores clip i against clip i + k's voice
        (its own speaking mask kept); other_voice also scores it against clip i + k + 1's (the `_other` metrics)."""
        frames = self.frames if frames is None else frames
        n = len(self.keys)
        return [
            EvalVideo(
                key=self.keys[i],
                frames=frames[i],
                audio=self.audio_self[(i + audio_shift) % n],
                other_audio=self.audio_self[(i + audio_shift + 1) % n] if other_voice else None,
                mask=self.masks[i],
                reference=self.references[i],
                kpts=self.kpts[i],
            )
            for i in range(n)
        ]


def load_clips(cfg: ClipsConfig) -> EvalClips:
    """The first `cfg.count` clips of `cfg.shards`, cut to their last `cfg.frames` frames."""
    import os

    from dystream.datamodules.format import read_shards, resolve_shards, sample_to_clip
    from dystream.datamodules.speakervid import DEFAULT_VAL_SHARDS, synthesize_default

    if os.path.normpath(cfg.shards) == os.path.normpath(DEFAULT_VAL_SHARDS) and not Path(cfg.shards).is_dir():
        # the embedded default, as the DataModule writes it on a fresh machine (64x64, seed 0)
        synthesize_default(Path(DEFAULT_VAL_SHARDS).parent, size=64, seed=0)
    shards = resolve_shards(cfg.shards)
    clips = []
    for sample in read_shards(shards.urls):
        clips.append(sample_to_clip(sample))
        if len(clips) == cfg.count:
            break
    if len(clips) < 2:
        raise ValueError(f"{cfg.shards}: {len(clips)} clip(s); the evaluation needs at least 2")
    sizes = {c.video.shape[1:] for c in clips}
    if len(sizes) != 1:
        raise ValueError(f"{cfg.shards}: clips of different sizes {sorted(sizes)}; evaluate one resolution at a time")
    t = cfg.frames
    out: dict[str, list] = {k: [] for k in ("frames", "refs", "self", "other", "masks", "kpts")}
    for c in clips:
        start = c.n_frames - t
        if start <= cfg.reference_frame:
            raise ValueError(
                f"{cfg.shards}: clip {c.key} has {c.n_frames} frames; {t} evaluated frames after reference frame "
                f"{cfg.reference_frame} need at least {t + cfg.reference_frame + 1} (lower clips.frames)"
            )
        out["frames"].append(c.video[start:])
        out["refs"].append(c.video[cfg.reference_frame])
        out["self"].append(c.audio_self[start * 640 :])
        out["other"].append(c.audio_other[start * 640 :])
        out["masks"].append(c.mask[start:].astype(np.float32))
        out["kpts"].append(None if c.kpts is None else c.kpts[start:])
    return EvalClips(
        keys=[c.key for c in clips],
        frames=np.stack(out["frames"]),
        references=np.stack(out["refs"]),
        audio_self=np.stack(out["self"]),
        audio_other=np.stack(out["other"]),
        masks=np.stack(out["masks"]),
        kpts=out["kpts"],
        metas=[dict(c.meta) for c in clips],
        clip_frames=[c.n_frames for c in clips],
    )


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


def _score(
    suite: MetricSuite, clips: EvalClips, frames: np.ndarray | None, real: dict | None = None, exact: bool = False
) -> SuiteResult:
    """The videos scored against their own voice and, as `<key>_other`, against clip i + 1's voice."""
    return suite.evaluate(clips.videos(frames, other_voice=True), real=real, exact_keypoints=exact)


def _reconstruction_row(cfg: EvalConfig, suite: MetricSuite, clips: EvalClips, real: dict, res: str, log) -> Row:
    """The VAE's reconstructions of the real clips, scored like a model."""
    from dystream.evaluation.generation import reconstruct
    from dystream.evaluation.reconstruction import reconstruction_quality

    name = "VAE reconstruction"
    if not Path(cfg.reconstruction_vae).is_file():
        reason = NA(f"{cfg.reconstruction_vae} not found: no VAE export (make train RECIPE=vae)")
        log(f"eval: {name}: {reason}")
        return Row(name, "vae_reconstruction", {k: reason for k in row_keys()}, resolution=res)
    log(f"eval: reconstructing {len(clips.keys)} clips with {cfg.reconstruction_vae}")
    frames = np.stack(reconstruct(cfg.reconstruction_vae, clips.references, clips.frames, cfg.batch_size, cfg.device))
    values = _score(suite, clips, frames, real).values
    values.update(reconstruction_quality(frames, clips.frames))
    if na := suite.na("hkv"):
        values["hand_kpt_error"] = values["hand_kpt_found"] = na
    else:
        values["hand_kpt_error"], values["hand_kpt_found"] = _hand_keypoints(suite, clips.frames, frames)
    return Row(name, "vae_reconstruction", values, resolution=res)


MUTED_PARTNER_ROW = "Ground truth, partner muted (synthetic world)"
MUTED_PARTNER_EXACT_ROW = "Ground truth, partner muted (synthetic world, exact keypoints)"


def _muted_partner_clips(clips: EvalClips, log) -> EvalClips | None:
    """Synthetic clips only: the clips with each evaluated window re-rendered with the partner muted (no partner
    audio, none of the listener's reactions to it; every other draw the same, `remake_clip`), with its keypoint
    labels. Table 2's ceiling: the listening motion a model that listens perfectly would lose when the partner is
    muted. None (and a log line) where a clip is not reproducible from its metadata."""
    from dystream.datamodules.synthetic import remake_clip

    if not clips.metas or any(m.get("source") != "synthetic" for m in clips.metas):
        return None
    t = clips.frames.shape[1]
    size = clips.frames.shape[2]
    frames, labels, silent = [], [], []
    for key, meta, n, kpts, mask in zip(clips.keys, clips.metas, clips.clip_frames, clips.kpts, clips.masks,
                                        strict=True):  # fmt: skip
        try:
            same = remake_clip(meta, n, size)
        except ValueError as e:
            log(f"eval: no {MUTED_PARTNER_ROW!r} row: {key}: {e}")
            return None
        # the generator must reproduce the shard's clip before its counterfactual means anything
        if not np.array_equal(same.mask[n - t :], mask) or (
            kpts is not None and not np.allclose(same.kpts[n - t :], kpts, atol=1e-3)
        ):
            log(f"eval: no {MUTED_PARTNER_ROW!r} row: {key} is not reproduced by this generator (other version?)")
            return None
        muted = remake_clip(meta, n, size, partner_reactions=False)
        frames.append(muted.video[n - t :])
        labels.append(muted.kpts[n - t :])
        silent.append(muted.audio_other[(n - t) * 640 :])
    return dataclasses.replace(clips, frames=np.stack(frames), kpts=labels, audio_other=np.stack(silent))


def _hand_keypoints(suite: MetricSuite, real: np.ndarray, recon: np.ndarray) -> tuple[float, float]:
    """``(error, found)``: the mean over clips of the pixel distance of the pose network's hand keypoints on
    reconstructions vs on the real frames (both confident), whether gesturing hands survive the VAE where they are
    drawn; and the share of the hand keypoints it finds on the real frames that it also finds on the reconstructions
    (pooled over clips), whether they are drawn at all."""
    from dystream.datamodules.keypoints import HANDS
    from dystream.evaluation.reconstruction import keypoint_error, keypoints_found

    errors, found, seen = [], 0, 0
    for fake, clip in zip(recon, real, strict=True):
        kpts_fake, kpts_real = suite.pose(fake), suite.pose(clip)
        errors.append(keypoint_error(kpts_fake, kpts_real, HANDS))
        f, s = keypoints_found(kpts_fake, kpts_real, HANDS)
        found, seen = found + f, seen + s
    errors = [e for e in errors if np.isfinite(e)]
    return (float(np.mean(errors)) if errors else float("nan")), (found / seen if seen else float("nan"))


def evaluate(cfg: EvalConfig, log=print) -> tuple[list[Row], list[str], dict]:
    """Run the whole evaluation: (rows, protocol notes, meta)."""
    from dystream.evaluation.generation import generate

    device = torch.device(cfg.device)
    suite = MetricSuite(cfg.metrics, device=device)
    for name, reason in suite.unavailable.items():
        log(f"eval: {name} metrics n/a ({reason})")
    clips = load_clips(cfg.clips)
    n, t = len(clips.keys), cfg.clips.frames
    res = f"{clips.frames.shape[3]}x{clips.frames.shape[2]}"
    log(f"eval: {n} clips x {t} frames ({res}) from {cfg.clips.shards}")

    gt = _score(suite, clips, None)
    values = gt.values
    real = gt.features
    for k in ("fid", "fvd", "fd_pose", "fd_sync"):
        values[k] = suite.na(k)  # the real set itself: "—" (or why the metric is unavailable)
    rows = [Row("Ground truth", "ground_truth", values, resolution=res)]
    if all(k is not None for k in clips.kpts):
        exact = _score(suite, clips, None, exact=True).values
        labels = {k: v for k, v in exact.items() if k.removesuffix("_other").removesuffix("_clips") in KEYPOINT_METRICS}
        rows.append(Row("Ground truth (exact keypoints)", "ground_truth_exact_keypoints", labels, resolution=res))

    muted = _muted_partner_clips(clips, log)
    if muted is not None:
        rows.append(Row(MUTED_PARTNER_ROW, "ground_truth_partner_muted", _score(suite, muted, None, real).values,
                        resolution=res))  # fmt: skip
        exact = _score(suite, muted, None, exact=True).values
        labels = {k: v for k, v in exact.items() if k.removesuffix("_other").removesuffix("_clips") in KEYPOINT_METRICS}
        rows.append(Row(MUTED_PARTNER_EXACT_ROW, "ground_truth_partner_muted_exact_keypoints",
                        labels, resolution=res))  # fmt: skip

    if cfg.reconstruction_vae is not None:
        rows.append(_reconstruction_row(cfg, suite, clips, real, res, log))

    for spec in cfg.models:
        missing = spec.missing()
        if missing:
            how = f" (make train RECIPE={spec.recipe})" if spec.recipe else ""
            reason = NA(f"{', '.join(missing)} not found: no {spec.name} export{how}")
            log(f"eval: {spec.name}: {reason}")
            values = {k: reason for k in row_keys()}
            rows.append(Row(spec.name, spec.kind, values, steps=spec.steps, resolution=res, time_per_5s=reason))
            continue
        log(f"eval: generating {n} clips with {spec.name} ({spec.weights})")
        try:
            out = generate(spec, clips.references, clips.audio_self, clips.audio_other, clips.masks,
                           seed=cfg.seed, batch_size=cfg.batch_size, device=device)  # fmt: skip
        except (RuntimeError, ValueError, OSError) as e:  # e.g. an export older than the model code
            first = " ".join(str(e).split())[:300] or type(e).__name__  # e.g. the missing state-dict keys
            reason = NA(f"{spec.name} could not generate ({type(e).__name__}: {first}); re-export it with "
                        f"make train RECIPE={spec.recipe or '<its stage>'}")  # fmt: skip
            log(f"eval: {spec.name}: {reason}")
            values = {k: reason for k in row_keys()}
            rows.append(Row(spec.name, spec.kind, values, steps=spec.steps, resolution=res, time_per_5s=reason))
            continue
        values = _score(suite, clips, np.stack(out.videos), real).values
        if cfg.swapped_voice and not (spec.drop_partner or spec.mute_partner):  # (a partner-less row: another question)
            log(f"eval: generating {n} clips with {spec.name}, driven by another clip's voice")
            swapped = generate(spec, clips.references, np.roll(clips.audio_self, -1, axis=0), clips.audio_other,
                               clips.masks, seed=cfg.seed, batch_size=cfg.batch_size, device=device)  # fmt: skip
            driving = suite.evaluate(clips.videos(np.stack(swapped.videos), audio_shift=1))
            values["mouth_voice_r_speech_swapped"] = driving.values["mouth_voice_r_speech"]
        per5 = out.seconds_per_clip * (5 * 25) / t
        rows.append(Row(spec.name, spec.kind, values, steps=out.steps, resolution=res, time_per_5s=per5))

    nets = {k: (v.sha256[:12] if v else "given") for k, v in suite.weights.items()}
    sync_info = suite.weights.get("sync")
    sync_name = "SyncNet v2" if sync_info is not None and sync_info.name == "syncnet_v2" else "the synthetic SyncNet"
    pose_name = "the synthetic pose network" if suite.pose_features else "DWPose"
    notes = [
        f"{n} clips of {cfg.clips.shards} (first in shard order: {', '.join(clips.keys[:3])}"
        f"{', ...' if n > 3 else ''}), "
        f"the last {t} frames of each ({t / 25:.2f} s at 25 fps, {res}); reference image = frame "
        f"{cfg.clips.reference_frame}; seed {cfg.seed}.",
        "FD-pose / FD-sync: Fréchet distances of the synthetic pose network's per-frame embeddings / the synthetic "
        "SyncNet's 5-frame lip-window embeddings, against the ground-truth row; they are not FID/FVD and only compare "
        "rows of this table.",
        f"Sync-C/D: {sync_name}, syncnet_python protocol (face crops, MFCC, +-{cfg.metrics.vshift} frames), "
        f"segments: {cfg.metrics.sync_segments}; face boxes from the {suite.box_source}."
        + (" Not comparable with SyncNet v2 numbers." if sync_name != "SyncNet v2" else ""),
        f"HKV, LBKV/LHKV/LFKV: keypoints of {pose_name} (dwpose134 layout, px^2 at a 512-pixel frame height, tau 0.3, "
        "listening segments >= 25 frames); the exact-keypoints row uses the clips' keypoint labels.",
        (
            f"Identity drift: cosine distance of each frame's identity embedding to the reference image's, distance "
            f"{suite.drift_distance}"
            if suite.identity is not None
            else "Identity drift: RMS difference of 64x64 frames to the reference image in [0, 1] (pixel_rms_64: "
            "appearance, not identity; the identity network is missing)"
        )
        + f", buckets of {cfg.metrics.drift_bucket_s:g} s, slope by least squares.",
        f"Time: wall time per clip (audio features, DiT, VAE decode) scaled to 5 s of video, device {cfg.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), batch "
        f"{cfg.batch_size}.",
        "ASE/IQA (Q-Align) are not reported: no aesthetic / image-quality predictor is provided.",
        f"Metric networks (sha256 prefix): {nets or 'none'}.",
    ]
    meta = {
        "clips": clips.keys,
        "frames": t,
        "resolution": res,
        "unavailable": suite.unavailable,
        "drift_distance": suite.drift_distance,
        "weights": {k: (v.as_dict() if v else None) for k, v in suite.weights.items()},
        "config": dataclasses.asdict(cfg),
        "per_video": {"ground_truth": gt.per_video},
    }
    return rows, notes, meta


def row_keys() -> tuple[str, ...]:
    """Every value key of a model row (the keys an n/a row fills)."""
    from dystream.evaluation.suite import (
        DRIFT_METRICS,
        FD_METRICS,
        LISTENING_COUNTS,
        OTHER_VOICE_METRICS,
        VIDEO_METRICS,
    )

    return (*VIDEO_METRICS, *LISTENING_COUNTS, *DRIFT_METRICS, *FD_METRICS, *OTHER_VOICE_METRICS,
            "mouth_voice_r_speech_swapped")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="eval recipe (clips, metric networks, models)")
    parser.add_argument("--out", default=None, help="output folder of the tables (default: the recipe's `out`)")
    parser.add_argument("--clips", type=int, default=None, help="number of clips (default: the recipe's clips.count)")
    parser.add_argument("--device", default=None, help="torch device (default: the recipe's `device`)")
    parser.add_argument(
        "--syncnet", default=None, help="synthetic SyncNet file (default: the recipe's metrics.syncnet)"
    )
    parser.add_argument("--pose", default=None, help="synthetic pose network file (default: the recipe's metrics.pose)")
    parser.add_argument(
        "--identity",
        default=None,
        help="identity network for drift: identity.safetensors or ArcFace backbone.pth (default: metrics.identity)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.out is not None:
        cfg.out = args.out
    if args.clips is not None:
        cfg.clips = dataclasses.replace(cfg.clips, count=args.clips)
    if args.device is not None:
        cfg.device = args.device
    if args.syncnet is not None:
        cfg.metrics = dataclasses.replace(cfg.metrics, syncnet=args.syncnet)
    if args.pose is not None:
        cfg.metrics = dataclasses.replace(cfg.metrics, pose=args.pose)
    if args.identity is not None:
        cfg.metrics = dataclasses.replace(cfg.metrics, identity=args.identity)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows, notes, meta = evaluate(cfg)
    paths = write_tables(rows, cfg.out, notes, meta)
    print(Path(paths["md"]).read_text())
    print(f"wrote {paths['md']}, {', '.join(paths['csv'])}, {paths['json']}")
    return 0
