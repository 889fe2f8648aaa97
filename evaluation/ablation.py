"""The paper's ablations in miniature, on long streams (StreamAvatar Table 1, Table 3, Fig. 8; docs/ablation.md).

Rows (one recipe overlay each under recipes/ablation/, all from the same teacher and ODE pairs, same budget, seeds):

| row | Table 1 name | what changes |
|---|---|---|
| `baseline` | Baseline (Self-Forcing) | no sink (`reference_sink: false`), 9-frame rolling window, absolute RoPE |
| `sink` | + Reference Sink | reference + first chunk kept, 6-frame window, absolute RoPE |
| `rapr` | + RAPR | sink + RAPR (D = 10): today's stage 1 default |
| `gan_plain` | + GAN w/o D_CA | stage 2 from `rapr`, `global_branch: false` |
| `full` | + GAN (ours) | stage 2 from `rapr` with the consistency-aware discriminator |
| `pre_mask` / `post_mask` | Table 3 | undistilled teachers, speaking mask on the waveform / on the Wav2Vec2 features |

Long-stream protocol: every student row streams every validation identity (the clips of `make eval`) through
`StreamingAvatar`, the path users run, for `seconds` (120 s) on the audio of the validation clips concatenated
(`long_stream_inputs`: own voice, partner voice and speaking mask, cyclically from the identity's own clip on). Per
`bucket_s` (10 s) bucket: identity similarity to the reference (cosine in the synthetic identity network's embedding,
or, without that network, 1 - pixel RMS at 64x64, labelled), Sync-C, HKV, and FD-pose (the bucket's frames of all
identities pooled, against the real validation clips). The "short" numbers are the first `short_seconds` (4 s) of the
same streams. Teachers are scored on the 4-s clips (bidirectional sampling) with LBKV / LHKV / LFKV (Table 2's
listening variances) and Sync-C.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ROWS",
    "AblationRow",
    "LongStreamInputs",
    "bucket_means",
    "long_stream_inputs",
    "stream_row",
    "evaluate_rows",
    "write_outputs",
]

FPS = 25
SAMPLES_PER_FRAME = 640
SAMPLE_RATE = 16000


# ------------------------------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class AblationStep:
    """One training run of a row: `dystream fit --config recipes/<base>.yaml --config <overlay>`."""

    base: str  # chain recipe name (teacher, stage1_ode, stage1_sid, stage2_gan)
    overlay: str  # recipes/ablation/<file>
    export: str  # the file the run exports
    reuse: str | None = None  # a chain export that may stand in for `export` when its saved config matches


@dataclass(frozen=True)
class AblationRow:
    name: str
    label: str  # the row's name in the paper's table
    kind: str  # "student" (long streams) or "teacher" (4-s clips)
    steps: tuple[AblationStep, ...]

    @property
    def weights(self) -> str:
        return self.steps[-1].export


def _stage1(row: str) -> tuple[AblationStep, ...]:
    reuse = row == "rapr"
    return (
        AblationStep(
            "stage1_ode",
            f"recipes/ablation/{row}_ode.yaml",
            f"runs/ablation/{row}/stage1_ode/student.safetensors",
            "runs/stage1_ode/student.safetensors" if reuse else None,
        ),
        AblationStep(
            "stage1_sid",
            f"recipes/ablation/{row}_sid.yaml",
            f"runs/ablation/{row}/stage1_sid/student.safetensors",
            "runs/stage1_sid/student.safetensors" if reuse else None,
        ),
    )


def _gan(row: str) -> AblationStep:
    return AblationStep(
        "stage2_gan", f"recipes/ablation/{row}_gan.yaml", f"runs/ablation/{row}/stage2_gan/student.safetensors"
    )


def _teacher(row: str) -> AblationStep:
    return AblationStep(
        "teacher", f"recipes/ablation/{row}_teacher.yaml", f"runs/ablation/{row}/teacher/teacher.safetensors"
    )


ROWS: tuple[AblationRow, ...] = (
    AblationRow("baseline", "Baseline (Self-Forcing: no sink, absolute RoPE)", "student", _stage1("baseline")),
    AblationRow("sink", "+ Reference Sink", "student", _stage1("sink")),
    AblationRow("rapr", "+ RAPR", "student", _stage1("rapr")),
    AblationRow("gan_plain", "+ GAN w/o D_CA", "student", (*_stage1("rapr"), _gan("gan_plain"))),
    AblationRow("full", "+ GAN with D_CA (full)", "student", (*_stage1("rapr"), _gan("full"))),
    AblationRow("pre_mask", "Pre-Mask (mask on the waveform)", "teacher", (_teacher("pre_mask"),)),
    AblationRow("post_mask", "Post-Mask (mask on the features, ours)", "teacher", (_teacher("post_mask"),)),
)


def get_rows(names: Sequence[str] | None = None) -> list[AblationRow]:
    """The rows named (all by default), in table order; an unknown name raises naming the known ones."""
    if not names:
        return list(ROWS)
    known = {r.name: r for r in ROWS}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown ablation row(s) {bad}; rows are {list(known)}")
    return [r for r in ROWS if r.name in names]


# ------------------------------------------------------------------------------------------------------ long inputs
@dataclass
class LongStreamInputs:
    """The driving inputs of one long stream: both 16 kHz tracks and the per-video-frame speaking mask."""

    audio_self: np.ndarray  # float32 [frames * 640]
    audio_other: np.ndarray  # float32 [frames * 640]
    mask: np.ndarray  # float32 [frames]
    sources: list[int]  # the clip index of each concatenated piece

    @property
    def frames(self) -> int:
        return len(self.mask)


def long_stream_inputs(
    audio_self: np.ndarray, audio_other: np.ndarray, masks: np.ndarray, seconds: float, first: int = 0
) -> LongStreamInputs:
    """Concatenate validation clips `first, first + 1, ...` (cyclically) to exactly `seconds` of video.

    audio_self / audio_other: [N, T * 640]; masks: [N, T]. Each clip contributes its whole audio of both tracks and
    its mask together, so the three stay aligned (frame t's mask covers samples 640 t .. 640 (t + 1)); the last
    piece is cut to the requested length.
    """
    n, t = masks.shape
    if audio_self.shape != (n, t * SAMPLES_PER_FRAME) or audio_other.shape != audio_self.shape:
        raise ValueError(
            f"long_stream_inputs: audio must be [N, T * 640] = [{n}, {t * SAMPLES_PER_FRAME}] for masks {masks.shape}, "
            f"got {audio_self.shape} and {audio_other.shape}"
        )
    frames = round(seconds * FPS)
    if frames < 1:
        raise ValueError(f"long_stream_inputs: seconds must give at least one frame at {FPS} fps, got {seconds}")
    pieces = math.ceil(frames / t)
    sources = [(first + i) % n for i in range(pieces)]
    own = np.concatenate([audio_self[s] for s in sources])[: frames * SAMPLES_PER_FRAME]
    other = np.concatenate([audio_other[s] for s in sources])[: frames * SAMPLES_PER_FRAME]
    mask = np.concatenate([masks[s] for s in sources])[:frames]
    return LongStreamInputs(own.astype(np.float32), other.astype(np.float32), mask.astype(np.float32), sources)


def bucket_means(values: np.ndarray, bucket_frames: int) -> np.ndarray:
    """Mean of per-frame `values` [T] over consecutive buckets of `bucket_frames` (the last may be shorter)."""
    values = np.asarray(values, dtype=np.float64)
    if bucket_frames < 1:
        raise ValueError(f"bucket_means: bucket_frames must be >= 1, got {bucket_frames}")
    return np.array([values[i : i + bucket_frames].mean() for i in range(0, len(values), bucket_frames)])


# ------------------------------------------------------------------------------------------------------ streaming
def stream_row(
    weights: str,
    references: np.ndarray,
    inputs: Sequence[LongStreamInputs],
    vae: str | None = None,
    audio: str | None = None,
    seed: int = 0,
    push_seconds: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[list[np.ndarray], float]:
    """Stream every identity through `StreamingAvatar` (the user's path), the mask given with the audio.

    Returns (videos uint8 [T, H, W, 3], mean real-time factor = generation time / stream time).
    """
    import torch

    from dystream.streaming.avatar import StreamingAvatar, StreamingConfig
    from dystream.zoo.files import load_model, read_metadata

    _, _, extra = read_metadata(weights)
    vae = vae or extra.get("vae") or "runs/vae/vae.safetensors"
    audio = audio or extra.get("audio") or "runs/teacher/audio.safetensors"
    generator = load_model(weights, arch="dit").requires_grad_(False).eval()
    vae_net = load_model(vae, arch="vae").requires_grad_(False).eval()
    audio_net = load_model(audio, arch="audio").requires_grad_(False).eval()
    size = tuple(references.shape[1:3])
    videos, rtf = [], []
    step = int(push_seconds * SAMPLE_RATE)
    for i, (ref, inp) in enumerate(zip(references, inputs, strict=True)):
        t0 = time.perf_counter()
        config = StreamingConfig(seed=seed + i, size=size, threaded=False)
        session = StreamingAvatar(generator, vae_net, audio_net, ref, config, mask_fn=_unused_mask_fn, device="cpu")
        mask = np.repeat(inp.mask, SAMPLES_PER_FRAME)
        frames: list[np.ndarray] = []
        with torch.inference_mode():
            for s in range(0, len(inp.audio_self), step):
                sl = slice(s, s + step)
                frames += session.push(inp.audio_self[sl], inp.audio_other[sl], mask[sl])
            frames += session.flush()
        video = np.stack(frames)[: inp.frames]
        if len(video) != inp.frames:
            raise RuntimeError(f"stream_row: {weights} streamed {len(video)} frames, expected {inp.frames}")
        videos.append(video)
        rtf.append((time.perf_counter() - t0) / (inp.frames / FPS))
        log(f"ablation: {Path(weights).parent} identity {i}: {inp.frames / FPS:.0f} s streamed, RTF {rtf[-1]:.2f}")
    return videos, float(np.mean(rtf))


def _unused_mask_fn(audio: np.ndarray, n_frames: int) -> np.ndarray:  # the mask is always given with the audio
    raise RuntimeError("the ablation streams give the speaking mask with every push")


# ------------------------------------------------------------------------------------------------------ metrics
@dataclass
class RowResult:
    name: str
    label: str
    kind: str
    weights: str
    status: str = "ok"  # "ok" or why the row has no numbers
    short: dict[str, float | None] = field(default_factory=dict)  # first short_seconds (students) / 4-s clips
    long: dict[str, float | None] = field(default_factory=dict)  # the whole stream
    buckets: dict[str, list[float | None]] = field(default_factory=dict)  # per bucket_s, students only
    rtf: float | None = None
    # frames of the first identity's stream at the sheet's time points (students), for the frame sheet; not in the JSON
    snapshots: np.ndarray | None = field(default=None, repr=False)


# stream times (s) shown in the frame sheet: the start, then every 20 s, and the last frame
SHEET_TIMES = (0.0, 20.0, 40.0, 60.0, 80.0, 100.0, None)


def snapshot_frames(n_frames: int, times: Sequence[float | None] = SHEET_TIMES) -> list[int]:
    """Frame indices of the sheet's time points inside a stream of ``n_frames`` (None: the last frame)."""
    picks = [n_frames - 1 if t is None else min(round(t * FPS), n_frames - 1) for t in times]
    return sorted(set(picks))


def _identity_scores(suite: Any, frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-frame identity similarity: cosine in the identity network's embedding, else 1 - pixel RMS at 64x64."""
    from dystream.evaluation import identity as ident

    if suite.identity is not None and hasattr(ident, "identity_similarity"):
        return ident.identity_similarity(frames, reference, suite.identity)
    return 1.0 - ident.frame_distances(frames, reference, None)


def identity_label(suite: Any) -> str:
    if suite.identity is not None:
        return f"cosine similarity ({getattr(suite.identity, 'name', 'identity network')})"
    return "1 - pixel RMS at 64x64 (no identity network: appearance, not identity)"


def _segment_metrics(suite: Any, frames: np.ndarray, audio: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> tuple:
    """(Sync-C, HKV, pose features, identity similarity mean) of one segment of a stream."""
    from dystream.evaluation.suite import EvalVideo

    video = EvalVideo(key="segment", frames=frames, audio=audio, mask=mask, reference=None)
    m, feats = suite.video_metrics(video)
    return m.get("sync_c"), m.get("hkv"), feats.get("fd_pose"), float(_identity_scores(suite, frames, ref).mean())


def _fd(suite: Any, feats: list[np.ndarray], real: Any) -> float | None:
    from dystream.evaluation.frechet import FeatureStats

    feats = [f for f in feats if f is not None and len(f)]
    if not feats or real is None:
        return None
    stats = FeatureStats(keep_features=True, meta=suite.feature_meta("fd_pose"))
    for f in feats:
        stats.update(f)
    v = suite.frechet("fd_pose", stats, real)
    return v if isinstance(v, float) else None


def _nanmean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def score_streams(
    suite: Any,
    videos: Sequence[np.ndarray],
    inputs: Sequence[LongStreamInputs],
    references: np.ndarray,
    real: Any,
    bucket_s: float,
    short_s: float,
) -> tuple[dict, dict, dict]:
    """(short, long, buckets) metrics of a row's streams (module docstring)."""
    bf, sf = round(bucket_s * FPS), round(short_s * FPS)
    n_buckets = math.ceil(len(videos[0]) / bf)
    per: dict[str, list[list]] = {k: [[] for _ in range(n_buckets)] for k in ("sync_c", "hkv", "pose", "identity")}
    short: dict[str, list] = {k: [] for k in ("sync_c", "hkv", "pose", "identity")}
    keys = ("sync_c", "hkv", "pose", "identity")
    for video, inp, ref in zip(videos, inputs, references, strict=True):
        segments = [(None, slice(0, sf))] + [(b, slice(b * bf, (b + 1) * bf)) for b in range(n_buckets)]
        for bucket, sl in segments:
            a = inp.audio_self[sl.start * SAMPLES_PER_FRAME : sl.stop * SAMPLES_PER_FRAME]
            seg = _segment_metrics(suite, video[sl], a, inp.mask[sl], ref)
            for k, v in zip(keys, seg, strict=True):
                (short[k] if bucket is None else per[k][bucket]).append(v)
    buckets = {
        "time_s": [b * bucket_s for b in range(n_buckets)],
        "identity": [_nanmean(per["identity"][b]) for b in range(n_buckets)],
        "sync_c": [_nanmean(per["sync_c"][b]) for b in range(n_buckets)],
        "hkv": [_nanmean(per["hkv"][b]) for b in range(n_buckets)],
        "fd_pose": [_fd(suite, per["pose"][b], real) for b in range(n_buckets)],
    }
    short_out = {
        "identity": _nanmean(short["identity"]),
        "sync_c": _nanmean(short["sync_c"]),
        "hkv": _nanmean(short["hkv"]),
        "fd_pose": _fd(suite, short["pose"], real),
    }
    counts = [min(bf, len(videos[0]) - b * bf) for b in range(n_buckets)]  # frame-weighted over the stream
    long_out = {}
    for k in ("identity", "sync_c", "hkv"):
        vals = [(v, c) for v, c in zip(buckets[k], counts, strict=True) if v is not None]
        long_out[k] = float(np.average([v for v, _ in vals], weights=[c for _, c in vals])) if vals else None
    long_out["fd_pose"] = _fd(suite, [f for b in per["pose"] for f in b], real)
    long_out["identity_last"] = buckets["identity"][-1]
    return short_out, long_out, buckets


# ------------------------------------------------------------------------------------------------------ the run
@dataclass
class AblationEvalConfig:
    """Protocol of `dystream ablation eval` (defaults: the full protocol of docs/ablation.md)."""

    shards: str = "data/synthetic/val"
    clips: int = 16  # identities (validation clips), as make eval
    clip_frames: int = 96  # frames of each clip (the last 96, as make eval); teachers are scored on these
    seconds: float = 120.0  # long-stream length
    bucket_s: float = 10.0
    short_s: float = 4.0
    seed: int = 0
    syncnet: str = "runs/metric_syncnet/syncnet.safetensors"
    pose: str = "runs/metric_pose/pose.safetensors"
    identity: str = "runs/metric_identity/identity.safetensors"
    teacher_steps: int = 20

    def __post_init__(self) -> None:
        if self.clips < 2:
            raise ValueError(f"ablation clips must be >= 2, got {self.clips}")
        if self.short_s > self.seconds or self.bucket_s > self.seconds:
            raise ValueError(
                f"ablation short_s={self.short_s} and bucket_s={self.bucket_s} must not exceed seconds={self.seconds}"
            )


def evaluate_rows(
    rows: Sequence[AblationRow], cfg: AblationEvalConfig, weights: dict[str, str], log=print
) -> tuple[list[RowResult], dict]:
    """Stream / sample every row, score it; `weights` maps a row to its export (after reuse decisions)."""
    from dystream.evaluation.cli import ClipsConfig, load_clips
    from dystream.evaluation.suite import MetricSuite, SuiteConfig

    suite = MetricSuite(SuiteConfig(syncnet=cfg.syncnet, pose=cfg.pose, identity=cfg.identity))
    for name, reason in suite.unavailable.items():
        log(f"ablation: {name} metrics n/a ({reason})")
    clips = load_clips(ClipsConfig(shards=cfg.shards, count=cfg.clips, frames=cfg.clip_frames))
    real_eval = suite.evaluate(clips.videos())
    real = real_eval.features.get("fd_pose")
    n = len(clips.keys)
    inputs = [long_stream_inputs(clips.audio_self, clips.audio_other, clips.masks, cfg.seconds, i) for i in range(n)]
    sheet_frames = snapshot_frames(round(cfg.seconds * FPS))  # the frame sheet's time points in every stream
    results = []
    for row in rows:
        path = weights.get(row.name, row.weights)
        res = RowResult(row.name, row.label, row.kind, path)
        if not Path(path).is_file():
            res.status = f"{path} missing (dystream ablation run trains it)"
            log(f"ablation: {row.name}: {res.status}")
            results.append(res)
            continue
        t0 = time.perf_counter()
        if row.kind == "student":
            videos, res.rtf = stream_row(path, clips.references, inputs, seed=cfg.seed, log=log)
            res.snapshots = videos[0][sheet_frames]
            res.short, res.long, res.buckets = score_streams(
                suite, videos, inputs, clips.references, real, cfg.bucket_s, cfg.short_s
            )
        else:
            res.short = _teacher_scores(suite, path, clips, real, cfg)
        log(f"ablation: {row.name} scored in {time.perf_counter() - t0:.0f} s")
        results.append(res)
    meta = {
        "identities": n,
        "clips": clips.keys,
        "seconds": cfg.seconds,
        "bucket_s": cfg.bucket_s,
        "short_s": cfg.short_s,
        "identity_measure": identity_label(suite),
        # the real clips' own values (Table 3's reference row): the listening motion the teachers should match
        "real": {k: _number(real_eval.values.get(k)) for k in TEACHER_METRICS},
        "reference_image": clips.references[0],
        "sheet_frames": sheet_frames,
        "unavailable": suite.unavailable,
        "config": asdict(cfg),
    }
    return results, meta


def _teacher_scores(suite: Any, path: str, clips: Any, real: Any, cfg: AblationEvalConfig) -> dict:
    from dystream.evaluation.generation import ModelSpec, generate

    spec = ModelSpec(name=path, kind="teacher", weights=path, steps=cfg.teacher_steps)
    gen = generate(spec, clips.references, clips.audio_self, clips.audio_other, clips.masks, seed=cfg.seed)
    values = suite.evaluate(clips.videos(gen.videos), {"fd_pose": real} if real is not None else None).values
    return {k: _number(values.get(k)) for k in TEACHER_METRICS}


TEACHER_METRICS = ("sync_c", "lbkv", "lhkv", "lfkv", "hkv", "fd_pose")


def _number(v: Any) -> float | None:
    return v if isinstance(v, float) else None


# ------------------------------------------------------------------------------------------------------ outputs
def _fmt(v: float | None, d: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{d}f}"


def write_outputs(
    results: Sequence[RowResult], meta: dict, out_md: str, plot: str | None, command: str, sheet: str | None = None
) -> list[str]:
    """docs/results/ablation.md (+ .json next to it), the drift plot and the frame sheet; returns the paths written."""
    md = Path(out_md)
    md.parent.mkdir(parents=True, exist_ok=True)
    s, L, b = meta["short_s"], meta["seconds"], meta["bucket_s"]
    clip_s = meta.get("config", {}).get("clip_frames", 96) / FPS
    lines = [
        "# Ablations in miniature on long streams (StreamAvatar Table 1, Table 3)",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Protocol: docs/ablation.md.",
        f"{meta['identities']} validation identities, each streamed for {L:g} s through `StreamingAvatar` on the "
        f"concatenated audio of the validation clips (own voice, partner, speaking mask); short = the first {s:g} s of "
        f"the same streams, long = all {L:g} s. Identity: {meta['identity_measure']}. FD-pose: synthetic pose "
        "network, against the real validation clips (comparable only inside this table).",
        "",
        "## Table 1 in miniature (students, streaming)",
        "",
        f"| row | ID sim {s:g} s | Sync-C {s:g} s | HKV {s:g} s | FD-pose {s:g} s | ID sim {L:g} s "
        f"| ID sim last {b:g} s | Sync-C {L:g} s | HKV {L:g} s | FD-pose {L:g} s | RTF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.kind != "student":
            continue
        if r.status != "ok":
            lines.append(f"| {r.label} | " + " | ".join(["n/a"] * 10) + f" |  <!-- {r.status} -->")
            continue
        sh, lo = r.short, r.long
        lines.append(
            f"| {r.label} | {_fmt(sh['identity'])} | {_fmt(sh['sync_c'], 2)} | {_fmt(sh['hkv'], 1)} | "
            f"{_fmt(sh['fd_pose'], 2)} | {_fmt(lo['identity'])} | {_fmt(lo['identity_last'])} | "
            f"{_fmt(lo['sync_c'], 2)} | {_fmt(lo['hkv'], 1)} | {_fmt(lo['fd_pose'], 2)} | {_fmt(r.rtf, 2)} |"
        )
    lines += [
        "",
        f"## Table 3 in miniature (teachers, the {clip_s:.2f}-s validation clips, not distilled)",
        "",
        "| row | Sync-C | LBKV | LHKV | LFKV | HKV | FD-pose |",
        "|---|---|---|---|---|---|---|",
    ]
    teachers = [(r.label, r.short, r.status) for r in results if r.kind == "teacher"]
    if teachers and meta.get("real"):
        teachers.insert(0, ("Real clips (reference)", {**meta["real"], "fd_pose": None}, "ok"))
    for label, t, status in teachers:
        if status != "ok":
            lines.append(f"| {label} | " + " | ".join(["n/a"] * 6) + f" |  <!-- {status} -->")
            continue
        lines.append(
            f"| {label} | {_fmt(t['sync_c'], 2)} | {_fmt(t['lbkv'], 2)} | {_fmt(t['lhkv'], 1)} | "
            f"{_fmt(t['lfkv'], 2)} | {_fmt(t['hkv'], 1)} | {_fmt(t['fd_pose'], 2)} |"
        )
    missing = [r for r in results if r.status != "ok"]
    if missing:
        lines += ["", "Rows without numbers:", ""] + [f"- {r.name}: {r.status}" for r in missing]
    lines += ["", f"Per-{b:g}-s buckets of every row: {md.with_suffix('.json').name}.", ""]
    written = [str(md)]
    if plot:
        made = plot_drift(results, plot)
        if made:
            lines.insert(-1, f"![identity similarity and Sync-C against stream time](../images/{Path(plot).name})")
            written.append(plot)
        else:
            lines.insert(-1, "(No plot: matplotlib is not installed in this environment.)")
    if sheet and frame_sheet(results, meta, sheet):
        times = ", ".join(_sheet_labels(meta))
        lines.insert(-1, f"![the first identity's stream of every row at {times}](../images/{Path(sheet).name})")
        written.append(sheet)
    md.write_text("\n".join(lines) + "\n")
    js = md.with_suffix(".json")
    rows = [{k: v for k, v in asdict(r).items() if k != "snapshots"} for r in results]
    meta = {k: v for k, v in meta.items() if k != "reference_image"}  # (an image: the sheet shows it)
    js.write_text(json.dumps({"meta": meta, "command": command, "rows": rows}, indent=1))
    written.append(str(js))
    return written


def _sheet_labels(meta: dict) -> list[str]:
    return [f"{i / FPS:.1f} s" for i in meta.get("sheet_frames", [])]


def frame_sheet(results: Sequence[RowResult], meta: dict, path: str) -> bool:
    """One row per streamed student row: the reference image, then the first identity's frames at SHEET_TIMES."""
    from PIL import Image, ImageDraw

    rows = [r for r in results if r.kind == "student" and r.snapshots is not None]
    if not rows:
        return False
    ref = meta.get("reference_image")
    h, w = rows[0].snapshots.shape[1:3]
    scale, pad, label_w, header = 2, 4, 250, 16
    cols = max(len(r.snapshots) for r in rows) + (ref is not None)
    sheet = Image.new(
        "RGB", (label_w + cols * (w * scale + pad) + pad, header + len(rows) * (h * scale + pad)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    titles = (["reference"] if ref is not None else []) + _sheet_labels(meta)
    for c, title in enumerate(titles[:cols]):
        draw.text((label_w + pad + c * (w * scale + pad), 2), title, fill="black")
    for i, r in enumerate(rows):
        y = header + i * (h * scale + pad)
        draw.text((pad, y + 4), r.label, fill="black")
        frames = ([np.asarray(ref)] if ref is not None else []) + list(r.snapshots)
        for c, frame in enumerate(frames):
            img = Image.fromarray(np.asarray(frame, dtype=np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(img, (label_w + pad + c * (w * scale + pad), y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return True


def plot_drift(results: Sequence[RowResult], path: str) -> bool:
    """Identity similarity and Sync-C against stream time, one line per student row; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        if r.kind != "student" or r.status != "ok":
            continue
        t = r.buckets["time_s"]
        for ax, key in zip(axes, ("identity", "sync_c"), strict=True):
            ys = [np.nan if v is None else v for v in r.buckets[key]]
            ax.plot(t, ys, marker="o", label=r.label)
    axes[0].set(xlabel="stream time (s)", ylabel="identity similarity", title="identity vs reference")
    axes[1].set(xlabel="stream time (s)", ylabel="Sync-C", title="lip sync")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
