"""Evaluation during validation: the metric suite on the stage's own samples, with cached real statistics.

    callbacks:
      - class_path: dystream.callbacks.evaluation.EvaluationCallback
        init_args:
          metrics: [fd_pose, fd_sync, sync_c, sync_d, hkv]
          sample_method: sample

How samples are produced: for each of the first `max_batches` validation batches the callback calls the stage method
named `sample_method` with the batch, `getattr(stage, sample_method)(batch)`, under a fixed seed per batch (so every
validation sees the same noise). The method must return either videos `[B, 3, T, H, W]` in [-1, 1]
(`output: video`, e.g. `TeacherStage.sample`) or latents `[B, z, 1 + T/4, h, w]` with the reference as latent frame 0
(`output: latents`, e.g. `StudentStage.sample`), which the callback decodes with the stage's frozen VAE,
`stage.cond.decode(latents, batch["references"][:, 0])`. The batch must be a SpeakerVid batch (`video`,
`references`, `audio_self`, `mask`; `kpts` optional): the real videos are its `video`.

Metrics are those of `dystream.evaluation.suite` (FD-pose, FD-sync, Sync-C/D, HKC/HKV, LBKV/LHKV/LFKV, identity
drift, FID/FVD with the published weights), logged as `val/<metric>`. A metric whose network is missing is not
logged: the callback logs "eval: <metric> n/a (<reason>)" once (console, and TensorBoard text `eval/unavailable`)
and keeps the reasons in `unavailable`. Metrics that need longer windows than the validation batches have (the
listening variances need listening runs of >= 25 frames) are n/a for the same reason.

Real statistics (the Fréchet distances' reference) are computed from the real videos of the evaluated batches the
first time and cached on disk in `cache_dir` (one npz per metric, named by a hash of the metric, its network's
sha256, the DataModule's settings and `max_batches`); later validations and later runs load them. The keys of the
clips they were computed on are stored with them: if the validation clips change, the cache is recomputed.
Under DDP every rank evaluates its own batches and keeps its own cache file; logged values are averaged over ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from dystream.evaluation.frechet import FeatureStats
from dystream.evaluation.metric_nets import DEFAULT_POSE, DEFAULT_SYNCNET
from dystream.evaluation.suite import (
    DRIFT_METRICS,
    FD_METRICS,
    NA,
    VIDEO_METRICS,
    EvalVideo,
    MetricSuite,
    SuiteConfig,
)

__all__ = ["ALL_METRICS", "EvaluationCallback", "stage_samples", "to_frames"]

log = logging.getLogger("dystream.eval")

ALL_METRICS = (*FD_METRICS, *VIDEO_METRICS, *DRIFT_METRICS)
_SAMPLE_CACHE = "_dystream_val_samples"


def to_frames(video: Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def stage_samples(
    pl_module: L.LightningModule,
    batch: dict[str, Any],
    batch_idx: int,
    method: str = "sample",
    output: Literal["video", "latents"] = "video",
    seed: int = 0,
) -> Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1] from `getattr(pl_module, method)(batch)`, under seed `seed + batch_idx`.

    The result is kept on the module for the current step and batch, so several callbacks (evaluation, video logger)
    share one sampling run.
    """
    step = pl_module.global_step if pl_module._trainer is not None else 0
    tag = (step, batch_idx, method, output, seed)
    cached = pl_module.__dict__.get(_SAMPLE_CACHE)
    if cached is not None and cached[0] == tag:
        return cached[1]
    fn = getattr(pl_module, method, None)
    if not callable(fn):
        raise AttributeError(f"{type(pl_module).__name__} has no method {method!r} to sample videos with")
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + batch_idx)
        out = fn(batch)
    if output == "latents":
        cond = getattr(pl_module, "cond", None)
        if cond is None or "references" not in batch:
            raise ValueError("output='latents' needs a stage with a `cond` (VAE) and a batch with `references`")
        t = batch["video"].shape[2] if "video" in batch else 4 * (out.shape[2] - 1)
        out = cond.decode(out, batch["references"][:, 0])[:, :, 1 : 1 + t]
    elif output != "video":
        raise ValueError(f"output must be 'video' or 'latents', got {output!r}")
    if out.ndim != 5 or out.shape[1] != 3:
        raise ValueError(f"{method}(batch) must give videos [B, 3, T, H, W] (or latents with output='latents'), "
                         f"got {tuple(out.shape)}")  # fmt: skip
    pl_module.__dict__[_SAMPLE_CACHE] = (tag, out)
    return out


def batch_videos(batch: dict[str, Any], videos: Tensor | None = None) -> list[EvalVideo]:
    """EvalVideos of a SpeakerVid batch: its real videos, or `videos` [B, 3, T, H, W] generated for it."""
    missing = [k for k in ("video", "audio_self", "mask") if k not in batch]
    if missing:
        raise ValueError(f"the evaluation callback needs SpeakerVid batches; this batch has no {missing}")
    src = batch["video"] if videos is None else videos
    t = src.shape[2]
    refs = batch.get("references")
    kpts = batch.get("kpts")
    out = []
    for i in range(src.shape[0]):
        out.append(
            EvalVideo(
                key=str(batch["key"][i]) if "key" in batch else str(i),
                frames=to_frames(src[i]),
                audio=batch["audio_self"][i, : t * 640].detach().float().cpu().numpy(),
                mask=batch["mask"][i, :t].detach().float().cpu().numpy(),
                reference=to_frames(refs[i, 0][:, None])[0] if refs is not None else None,
                kpts=kpts[i, :t].detach().float().cpu().numpy() if kpts is not None else None,
            )
        )
    return out


class EvaluationCallback(Callback):
    """Computes `metrics` on the stage's samples of the first `max_batches` validation batches (see module doc).

    Args:
        metrics: metric keys (fd_pose, fd_sync, sync_c, sync_d, hkc, hkv, lbkv, lhkv, lfkv, fid, fvd, drift_mean,
            drift_first, drift_last, drift_slope_per_min).
        sample_method: name of the stage method that generates videos for a batch.
        output: what that method returns: "video" ([B, 3, T, H, W] in [-1, 1]) or "latents" (decoded with stage.cond).
        max_batches: validation batches evaluated (the first ones; validation batches repeat across epochs).
        every_n_epochs: evaluate on every n-th validation epoch.
        syncnet: synthetic SyncNet file (None: Sync-C/D and FD-sync n/a).
        pose: synthetic pose network file (None: keypoint metrics and FD-pose n/a).
        fid_inception: FID InceptionV3 weights (None: n/a).
        i3d: FVD I3D TorchScript (None: n/a).
        i3d_sha256: the sha256 you trust for `i3d`.
        vshift: Sync-C offset search (+- frames); validation windows shorter than 2 vshift + 6 frames see mostly
            padding, so short windows want a small vshift.
        cache_dir: folder of the cached real statistics.
        seed: base seed of the sampling (seed + batch index).
        prefix: logged names are `<prefix>/<metric>`.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("fd_pose", "fd_sync", "sync_c", "sync_d", "hkv"),
        sample_method: str = "sample",
        output: Literal["video", "latents"] = "video",
        max_batches: int = 2,
        every_n_epochs: int = 1,
        syncnet: str | None = DEFAULT_SYNCNET,
        pose: str | None = DEFAULT_POSE,
        fid_inception: str | None = None,
        i3d: str | None = None,
        i3d_sha256: str | None = None,
        vshift: int = 15,
        cache_dir: str = "runs/eval_cache",
        seed: int = 0,
        prefix: str = "val",
    ) -> None:
        super().__init__()
        unknown = sorted(set(metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"EvaluationCallback.metrics: unknown {unknown}; known: {list(ALL_METRICS)}")
        if max_batches < 1 or every_n_epochs < 1:
            raise ValueError("EvaluationCallback: max_batches and every_n_epochs must be >= 1")
        if output not in ("video", "latents"):
            raise ValueError(f"EvaluationCallback.output must be 'video' or 'latents', got {output!r}")
        self.metrics = list(metrics)
        self.sample_method, self.output = sample_method, output
        self.max_batches, self.every_n_epochs = max_batches, every_n_epochs
        self.config = SuiteConfig(syncnet=syncnet, pose=pose, fid_inception=fid_inception, i3d=i3d,
                                  i3d_sha256=i3d_sha256, vshift=vshift)  # fmt: skip
        self.cache_dir = Path(cache_dir)
        self.seed, self.prefix = seed, prefix
        self.suite: MetricSuite | None = None
        self.unavailable: dict[str, str] = {}
        self.last: dict[str, float | NA] = {}
        self._reported: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        self._active = False
        self._fake: dict[str, FeatureStats] = {}
        self._real: dict[str, FeatureStats] = {}
        self._rows: list[dict[str, float]] = []
        self._keys: list[str] = []

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.suite is None:
            self.suite = MetricSuite(self.config, device=pl_module.device)
        self.unavailable = {}
        for m in self.metrics:
            na = self.suite.na(m)
            if na is not None:
                self.unavailable[m] = na.reason

    def _report(self, trainer: L.Trainer, metric: str, reason: str) -> None:
        if metric in self._reported:
            return
        self._reported.add(metric)
        line = f"eval: {metric} n/a ({reason})"
        log.warning(line)
        if trainer.is_global_zero:
            exp = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
            if exp is not None and hasattr(exp, "add_text"):
                exp.add_text(f"eval/unavailable/{metric}", line, trainer.global_step)

    def _cache_path(self, trainer: L.Trainer, metric: str) -> Path:
        assert self.suite is not None
        dm = getattr(trainer, "datamodule", None)
        settings = {k: v for k, v in dict(getattr(dm, "hparams", {}) or {}).items() if _jsonable(v)}
        key = {
            "metric": metric,
            "network": self.suite.feature_meta(metric),
            "data": settings,
            "max_batches": self.max_batches,
            "rank": trainer.global_rank,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.cache_dir / f"real_{metric}_{digest}.npz"

    # -- validation hooks ------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        if trainer.sanity_checking or self.suite is None:
            return
        self._active = trainer.current_epoch % self.every_n_epochs == 0
        for m, reason in self.unavailable.items():
            self._report(trainer, m, reason)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or batch_idx >= self.max_batches or self.suite is None:
            return
        wanted = [m for m in self.metrics if m not in self.unavailable]
        missing = [k for k in ("video", "audio_self", "mask") if k not in batch]
        if missing:  # e.g. a student validating on ODE-pair batches: nothing to compare with, not an error
            reason = f"the validation batches have no {missing} (the callback needs SpeakerVid batches)"
            for m in wanted:
                self.unavailable[m] = reason
                self._report(trainer, m, reason)
            return
        if not wanted:
            return
        videos = stage_samples(pl_module, batch, batch_idx, self.sample_method, self.output, self.seed)
        fd = [m for m in wanted if m in FD_METRICS]
        cached = {m: p for m in fd if (p := self._cache_path(trainer, m)).is_file()}
        for video in batch_videos(batch, videos):
            values, feats = self.suite.video_metrics(video)
            self._rows.append(values)
            for m in fd:
                if m in feats and len(feats[m]):
                    self._fake.setdefault(m, FeatureStats(keep_features=True, meta=self.suite.feature_meta(m)))
                    self._fake[m].update(feats[m])
        self._keys += [str(k) for k in batch.get("key", [])]
        if len(cached) < len(fd):  # real features for the metrics without a cache
            for video in batch_videos(batch):
                _, feats = self.suite.video_metrics(video)
                for m in fd:
                    if m not in cached and m in feats and len(feats[m]):
                        self._real.setdefault(m, FeatureStats(keep_features=True, meta=self.suite.feature_meta(m)))
                        self._real[m].update(feats[m])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active or self.suite is None:
            return
        keys = hashlib.sha256("\n".join(self._keys).encode()).hexdigest()[:16]
        results: dict[str, float | NA] = {}
        for m in self.metrics:
            if m in self.unavailable:
                results[m] = NA(self.unavailable[m])
                continue
            if m in FD_METRICS:
                results[m] = self._frechet(trainer, m, keys)
            else:
                vals = [r[m] for r in self._rows if m in r and np.isfinite(r[m])]
                results[m] = float(np.mean(vals)) if vals else NA(f"no validation video gave a value for {m}")
        self.last = results
        for m, v in results.items():
            if isinstance(v, NA):
                if m not in self.unavailable:
                    self._report(trainer, m, v.reason)
                continue
            pl_module.log(f"{self.prefix}/{m}", float(v), sync_dist=True, batch_size=max(1, len(self._rows)))
        self._reset()

    def _frechet(self, trainer: L.Trainer, metric: str, keys: str) -> float | NA:
        assert self.suite is not None
        path = self._cache_path(trainer, metric)
        real = self._real.get(metric)
        if real is None and path.is_file():
            real = FeatureStats.load(path)
            if real.meta.get("keys") != keys:  # the validation clips changed: recompute next time
                path.unlink()
                return NA("the cached real statistics were computed on other validation clips; recomputed next time")
        elif real is not None and real.n >= 2:
            real.meta["keys"] = keys
            path.parent.mkdir(parents=True, exist_ok=True)
            real.save(path)
        fake = self._fake.get(metric)
        if fake is not None:
            fake.meta["keys"] = keys
        return self.suite.frechet(metric, fake, real)


def _jsonable(v: Any) -> bool:
    return isinstance(v, str | int | float | bool) or v is None
