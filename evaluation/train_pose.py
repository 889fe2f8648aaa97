"""Training the synthetic world's keypoint regressor (`PoseRegressor`) on its exact keypoints.

Objective (SimCC, Li et al. 2022 §3, as RTMPose trains its heads): each keypoint's x and y are classified over
`input_size * split_ratio` bins against Gaussian-smoothed labels (standard deviation `label_sigma` bins), i.e. the
cross-entropy between the label distribution and the softmax of the logits (KL divergence up to a constant), on the
keypoints that are visible (confidence > 0.5); plus a binary cross-entropy on visibility for every keypoint (the
synthetic labels are 1 inside the frame and 0 for points outside it, e.g. hands resting below the frame):

    L = sum_{k visible} [CE(g(x_k), p_x,k) + CE(g(y_k), p_y,k)] / (2 |visible|) + w_vis BCE(vis logits, visible)

Frames come from `SpeakerVidDataModule` batches (`video [B, 3, T, H, W]` in [-1, 1], `kpts [B, T, 134, 3]` in pixels
of the H x W frame); `frames_per_clip` frames of each window are used per step (neighbouring frames are nearly equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from dystream.evaluation.networks.pose_small import PRESETS, PoseOutput, PoseRegressor
from dystream.evaluation.train_syncnet import one_cycle

__all__ = ["PoseTrainer", "batch_frames", "simcc_loss"]


def simcc_loss(out: PoseOutput, target: Tensor, split_ratio: float, label_sigma: float, vis_weight: float) -> Tensor:
    """SimCC loss of logits `out` against keypoints target [N, K, 3] (x, y in input pixels, confidence)."""
    bins = out.x_logits.shape[-1]
    visible = target[..., 2] > 0.5  # [N, K]
    centres = torch.arange(bins, device=target.device, dtype=target.dtype) + 0.5  # bin i covers [i, i + 1) bins

    def axis_loss(logits: Tensor, coord: Tensor) -> Tensor:
        label = torch.exp(-0.5 * ((centres - coord[..., None] * split_ratio) / label_sigma) ** 2)  # [N, K, bins]
        label = label / label.sum(-1, keepdim=True).clamp_min(1e-12)
        return -(label * logits.log_softmax(-1)).sum(-1)  # [N, K]

    ce = axis_loss(out.x_logits, target[..., 0]) + axis_loss(out.y_logits, target[..., 1])
    coord = (ce * visible).sum() / (2 * visible.sum().clamp_min(1))
    vis = F.binary_cross_entropy_with_logits(out.visibility, visible.to(out.visibility.dtype))
    return coord + vis_weight * vis


def batch_frames(batch: dict[str, Any], frames_per_clip: int, input_size: int, generator: torch.Generator) -> tuple:
    """(frames [N, 3, s, s] in [-1, 1], keypoints [N, K, 3] in input pixels) from a DataModule batch."""
    if "kpts" not in batch:
        raise ValueError("PoseTrainer needs keypoints in the batch (`kpts`); the shards have none")
    video, kpts = batch["video"], batch["kpts"]
    b, _, t, h, w = video.shape
    idx = torch.stack([torch.randperm(t, generator=generator)[: min(frames_per_clip, t)] for _ in range(b)])  # [B, n]
    rows = torch.arange(b)[:, None].expand_as(idx)
    frames = video.permute(0, 2, 1, 3, 4)[rows, idx].flatten(0, 1)  # [B n, 3, H, W]
    target = kpts[rows, idx].flatten(0, 1).clone()  # [B n, K, 3]
    if (h, w) != (input_size, input_size):
        frames = F.interpolate(frames, size=(input_size, input_size), mode="bilinear", antialias=True)
        target[..., 0] *= input_size / w
        target[..., 1] *= input_size / h
    return frames, target


class PoseTrainer(L.LightningModule):
    """Trains `PoseRegressor` on the synthetic world's keypoints and exports it for HKV / LxKV (`make eval`).

    Args:
        preset: `PoseRegressor` preset (`synthetic-64`, `tiny`).
        frames_per_clip: frames of each window used per step.
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

    def _step(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        c = self.net.config
        frames, target = batch_frames(batch, self.hparams.frames_per_clip, c.input_size, generator)
        out = self.net(frames)
        loss = simcc_loss(out, target, c.split_ratio, self.hparams.label_sigma, self.hparams.vis_weight)
        with torch.no_grad():  # mean pixel error of the visible keypoints, in input pixels
            pred = self.net.decode(out)
            visible = target[..., 2] > 0.5
            err = torch.linalg.vector_norm(pred[..., :2] - target[..., :2], dim=-1)
            px = (err * visible).sum() / visible.sum().clamp_min(1)
        return loss, px

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, px = self._step(batch, self._gen)
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
        from dystream.zoo.files import save_model

        step = int(self.global_step) if self._trainer is not None else 0
        extra = {"stage": "metric_pose", "step": step, "trained_on": "synthetic", "layout": "dwpose134"}
        path = save_model(self.net, self.export_dir / "pose.safetensors", arch="metric_pose", extra=extra)
        rank_zero_info(f"exported {path}")
