"""Metric-network stage: trains the synthetic world's SyncNet (`SmallSyncNet`) for Sync-C/D and FD-sync.

The embedded default has no `syncnet_v2.model`, so `make eval` first runs this stage (recipes/metric_syncnet.yaml) on
the synthetic dyadic world: SyncNet's contrastive loss (Chung & Zisserman 2016, eq. 1) on in-sync vs shifted or
shuffled lip/audio windows cut exactly as `SyncNetScorer` cuts them (objective and pairs:
`dystream.evaluation.train_syncnet`). Hand-over: `<export_dir>/syncnet.safetensors` (arch `metric_syncnet`), read by
`dystream.evaluation.metric_nets.load_metric_syncnet`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from dystream.evaluation.networks.syncnet_small import PRESETS, SmallSyncNet
from dystream.evaluation.train_syncnet import (
    LIP_FRAMES,
    MFCC_PER_FRAME,
    MFCC_WINDOW,
    contrastive_sync_loss,
    lip_sequence,
    make_pairs,
    mfcc_sequence,
    video_to_uint8,
)
from dystream.logs import announce_export
from dystream.zoo.files import save_model

__all__ = ["SyncNetTrainer", "one_cycle"]


def one_cycle(module: L.LightningModule, params, lr: float, weight_decay: float):
    """AdamW with a one-cycle schedule (10 % warm-up, cosine decay) over the run's steps; constant without a Trainer
    or a step budget. Shared by the metric-network trainers: short CPU runs converge faster with it."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else float("inf")
    if not math.isfinite(total) or total < 2:
        return opt
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=int(total), pct_start=0.1)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SyncNetTrainer(L.LightningModule):
    """Trains `SmallSyncNet` on the synthetic world and exports it for Sync-C/D (`make eval`).

    Args:
        preset: `SmallSyncNet` preset (`synthetic-64`, `tiny`).
        positions: lip windows per clip and batch (each gives one in-sync and one off-sync pair).
        min_shift: smallest off-sync shift in frames (windows 1-2 frames apart overlap too much to be negatives).
        max_shift: largest off-sync shift in frames (the Sync-C offset search covers +-15).
        p_other_clip: probability that a negative's audio comes from another clip of the batch.
        margin: contrastive margin (Chung & Zisserman 2016 eq. 1); it sets the distance scale of Sync-C/D.
        box_jitter: per-clip random scale/shift of the ground-truth face boxes, as a fraction of the box size.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        seed: seed of the pair sampling and box jitter.
        export_dir: where `syncnet.safetensors` is written (at every checkpoint and at the end of fit).
    """

    def __init__(
        self,
        preset: str = "synthetic-64",
        positions: PositiveInt = 12,
        min_shift: PositiveInt = 3,
        max_shift: PositiveInt = 15,
        p_other_clip: ClosedUnitInterval = 0.3,
        margin: PositiveFloat = 10.0,
        box_jitter: NonNegativeFloat = 0.08,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        seed: int = 0,
        export_dir: str = "runs/metric_syncnet",
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"SyncNetTrainer.preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if min_shift > max_shift:
            raise ValueError(f"SyncNetTrainer: min_shift ({min_shift}) must not exceed max_shift ({max_shift})")
        self.save_hyperparameters()
        self.net = SmallSyncNet(PRESETS[preset])
        self.export_dir = Path(export_dir)
        self._rng = np.random.default_rng(seed)

    # -- batch -> pairs ---------------------------------------------------------------------------
    def pair_tensors(self, batch: dict[str, Any], rng: np.random.Generator, jitter: float) -> tuple[Tensor, ...]:
        """(lip windows [N, 3, 5, s, s], MFCC windows [N, 1, 13, 20], labels [N]) of a DataModule batch."""
        if "kpts" not in batch:
            raise ValueError(
                "SyncNetTrainer needs keypoints in the batch (`kpts`, the face boxes); the shards have none"
            )
        video, kpts = batch["video"], batch["kpts"].detach().cpu().numpy()
        masks = batch["mask"].detach().cpu().numpy()
        lips = [lip_sequence(self.net, video_to_uint8(video[i]), kpts[i], jitter, rng) for i in range(len(video))]
        mfccs = [mfcc_sequence(batch["audio_self"][i]) for i in range(len(video))]
        hp = self.hparams
        pairs = make_pairs(masks, hp.positions, hp.min_shift, hp.max_shift, hp.p_other_clip, rng)
        lip = torch.stack([lips[i][:, v : v + LIP_FRAMES] for i, v, _, _, _ in pairs])
        aud = torch.stack(
            [mfccs[j][None, :, MFCC_PER_FRAME * u : MFCC_PER_FRAME * u + MFCC_WINDOW] for _, _, j, u, _ in pairs]
        )
        label = torch.tensor([y for *_, y in pairs])
        return lip.to(self.device), aud.to(self.device), label.to(self.device)

    def _step(self, batch: dict[str, Any], rng: np.random.Generator, jitter: float) -> tuple[Tensor, Tensor]:
        lip, aud, label = self.pair_tensors(batch, rng, jitter)
        v, a = self.net.forward_lip(lip), self.net.forward_aud(aud)
        loss = contrastive_sync_loss(v, a, label, self.hparams.margin)
        with torch.no_grad():  # a pair is right when its distance falls on its side of margin / 2
            d = torch.linalg.vector_norm(v - a, dim=-1)
            acc = ((d < self.hparams.margin / 2) == (label == 1)).float().mean()
        return loss, acc

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, acc = self._step(batch, self._rng, self.hparams.box_jitter)
        b = batch["video"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/pair_acc", acc, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rng = np.random.default_rng(1000 + batch_idx)  # the same pairs at every validation
        loss, acc = self._step(batch, rng, 0.0)
        b = batch["video"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/pair_acc", acc, batch_size=b, sync_dist=True)

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
        extra = {"stage": "metric_syncnet", "step": step, "margin": self.hparams.margin, "trained_on": "synthetic"}
        path = save_model(self.net, self.export_dir / "syncnet.safetensors", arch="metric_syncnet", extra=extra)
        announce_export(self, path)
