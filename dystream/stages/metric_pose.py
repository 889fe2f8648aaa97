"""Metric-network stage: trains the synthetic world's keypoint regressor (`PoseRegressor`, SimCC heads) for HKC/HKV,
LBKV/LHKV/LFKV and FD-pose.

The embedded default has no DWPose weights, so `make eval` first runs this stage (recipes/metric_pose.yaml): the
SimCC objective (`dystream.evaluation.train_pose.simcc_loss`) against the synthetic world's exact dwpose134
keypoints. Hand-over: `<export_dir>/pose.safetensors` (arch `metric_pose`), read by
`dystream.evaluation.metric_nets.load_metric_pose`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from dystream.evaluation.networks.pose_small import PRESETS, PoseRegressor
from dystream.evaluation.train_pose import augment, batch_frames, simcc_loss
from dystream.logs import announce_export
from dystream.stages.metric_syncnet import one_cycle
from dystream.zoo.files import save_model

__all__ = ["PoseTrainer"]


class PoseTrainer(L.LightningModule):
    """Trains `PoseRegressor` on the synthetic world's keypoints and exports it for HKV / LxKV (`make eval`).

    Args:
        preset: `PoseRegressor` preset (`synthetic-64`, `tiny`).
        frames_per_clip: frames of each window used per step.
        augment: random framing and colour of the training frames (`dystream.evaluation.train_pose.augment`).
        label_sigma: standard deviation of the SimCC Gaussian labels, in bins.
        vis_weight: weight of the visibility loss.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seed of the frame choice.
        export_dir: where `pose.safetensors` is written (at every checkpoint and at the end of fit).
    """

    def __init__(
        self,
        preset: str = "synthetic-64",
        frames_per_clip: PositiveInt = 4,
        augment: bool = True,
        label_sigma: PositiveFloat = 1.5,
        vis_weight: NonNegativeFloat = 0.5,
        lr: PositiveFloat = 2e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        seed: int = 0,
        export_dir: str = "runs/metric_pose",
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"PoseTrainer.preset must be one of {sorted(PRESETS)}, got {preset!r}")
        self.save_hyperparameters()
        self.net = PoseRegressor(PRESETS[preset])
        self.export_dir = Path(export_dir)
        self._gen = torch.Generator().manual_seed(seed)

    def _step(self, batch: dict[str, Any], generator: torch.Generator, train: bool = False) -> tuple[Tensor, Tensor]:
        c = self.net.config
        frames, target = batch_frames(batch, self.hparams.frames_per_clip, c.input_size, generator)
        if train and self.hparams.augment:
            frames, target = augment(frames, target, generator)
        out = self.net(frames)
        loss = simcc_loss(out, target, c.split_ratio, self.hparams.label_sigma, self.hparams.vis_weight)
        with torch.no_grad():  # mean pixel error of the visible keypoints, in input pixels
            pred = self.net.decode(out)
            visible = target[..., 2] > 0.5
            err = torch.linalg.vector_norm(pred[..., :2] - target[..., :2], dim=-1)
            px = (err * visible).sum() / visible.sum().clamp_min(1)
        return loss, px

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, px = self._step(batch, self._gen, train=True)
        b = batch["video"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/px_error", px, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, px = self._step(batch, torch.Generator().manual_seed(1000 + batch_idx))
        b = batch["video"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/px_error", px, prog_bar=True, batch_size=b, sync_dist=True)

    def configure_optimizers(self):
        return one_cycle(self, self.net.parameters(), self.hparams.lr, self.hparams.weight_decay)

    # -- hand-over ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.export()

    def on_fit_end(self) -> None:
        self.export()

    @rank_zero_only
    def export(self) -> None:
        step = int(self.global_step) if self._trainer is not None else 0
        extra = {"stage": "metric_pose", "step": step, "trained_on": "synthetic", "layout": "dwpose134"}
        path = save_model(self.net, self.export_dir / "pose.safetensors", arch="metric_pose", extra=extra)
        announce_export(self, path)
