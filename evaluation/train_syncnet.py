"""Training the synthetic world's SyncNet (`SmallSyncNet`) with SyncNet's contrastive objective.

Objective (Chung & Zisserman 2016, "Out of time", §3.2, eq. 1; the loss syncnet_python's v2 weights were trained
with): for a lip window v and an audio window a with label y = 1 (in sync) or 0 (off sync),

    E = 1 / (2N) sum_n  y_n d_n^2 + (1 - y_n) max(margin - d_n, 0)^2,     d_n = |v_n - a_n|_2

so in-sync pairs are pulled together and off-sync pairs pushed at least `margin` apart, in the Euclidean distance that
Sync-C/D later measure (`dystream.evaluation.sync.sync_scores`).

Pairs, from `SpeakerVidDataModule` batches (`video [B, 3, T, H, W]` in [-1, 1], `audio_self [B, T * 640]`,
`mask [B, T]`, `kpts [B, T, 134, 3]`):
- lip windows are the SyncNetScorer's: syncnet_python's face crops (boxes from the ground-truth face keypoints,
  jittered a little per clip so that the network tolerates a pose network's boxes), 5 frames from v;
- the audio window of v is MFCC frames 4v .. 4v + 19 of the same clip (positive);
- negatives: the window of the same clip shifted by `min_shift`..`max_shift` frames either way (the offsets the
  Sync-C search covers), or, with probability `p_other_clip`, a window of another clip of the batch (shuffled audio);
- a negative whose lip window and audio window are both silent (mask 0 on all 10 frames) is dropped: a closed mouth
  over silence matches any other silence, so no network can tell those pairs apart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from dystream.evaluation.keypoints import DWPOSE_134
from dystream.evaluation.networks.syncnet_small import PRESETS, SmallSyncNet
from dystream.evaluation.sync import SyncNetScorer, crop_faces, face_boxes_from_keypoints

__all__ = [
    "SyncNetTrainer",
    "contrastive_sync_loss",
    "one_cycle",
    "lip_sequence",
    "make_pairs",
    "mfcc_sequence",
    "video_to_uint8",
]

LIP_FRAMES = 5
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
MFCC_WINDOW = 20


def one_cycle(module: L.LightningModule, params, lr: float, weight_decay: float):
    """AdamW with a one-cycle schedule (10 % warm-up, cosine decay) over the run's steps; constant without a Trainer
    or a step budget. Shared by the metric-network trainers: short CPU runs converge faster with it."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else float("inf")
    if not math.isfinite(total) or total < 2:
        return opt
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=int(total), pct_start=0.1)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def contrastive_sync_loss(lip: Tensor, aud: Tensor, label: Tensor, margin: float) -> Tensor:
    """Chung & Zisserman 2016 eq. 1 on embeddings lip, aud [N, D] and labels [N] (1 = in sync)."""
    d = torch.linalg.vector_norm(lip - aud, dim=-1)
    y = label.to(d.dtype)
    return 0.5 * (y * d.pow(2) + (1 - y) * (margin - d).clamp_min(0).pow(2)).mean()


def video_to_uint8(video: Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (the inverse of the DataModule's scaling)."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def lip_sequence(
    net: SmallSyncNet,
    frames: np.ndarray,
    kpts: np.ndarray,
    jitter: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Tensor:
    """One clip's lip stream input: frames uint8 [T, H, W, 3], keypoints [T, 134, 3] -> [3, T, s, s] BGR 0-255.

    The crops are exactly the SyncNetScorer's (224x224, syncnet_python's rule, BGR) pooled by the network's own
    `prepare_lip`, so training sees what scoring sees. `jitter` scales and shifts the clip's boxes by up to that
    fraction of the box size (one draw per clip; the crop rule median-filters boxes over time anyway).
    """
    boxes = face_boxes_from_keypoints(kpts, DWPOSE_134.indices("face"))
    if jitter > 0 and rng is not None:
        c, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        size = float(np.nanmean(half)) if np.isfinite(half).any() else 0.0
        c = c + rng.uniform(-jitter, jitter, size=2) * 2 * size
        half = half * (1 + rng.uniform(-jitter, jitter))
        boxes = np.concatenate([c - half, c + half], axis=1)
    crops = crop_faces(frames, boxes)  # [T, 224, 224, 3] RGB
    x = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(3, 0, 1, 2)[None].float()  # BGR
    with torch.no_grad():
        return net.prepare_lip(x)[0]


def mfcc_sequence(audio: np.ndarray | Tensor) -> Tensor:
    """One clip's audio [T * 640] (float, [-1, 1]) -> MFCC [13, 4T - 1] as the SyncNetScorer computes it."""
    a = audio.detach().cpu().numpy() if isinstance(audio, Tensor) else np.asarray(audio)
    return torch.from_numpy(SyncNetScorer.audio_features(a)).float()


def make_pairs(
    masks: np.ndarray,
    positions: int,
    min_shift: int,
    max_shift: int,
    p_other_clip: float,
    rng: np.random.Generator,
) -> list[tuple[int, int, int, int, int]]:
    """Pairs (clip, lip window, audio clip, audio window, label) for a batch with speaking masks [B, T].

    Per clip, `positions` lip windows, each with its in-sync audio window (label 1) and one off-sync window (label 0):
    shifted by min_shift..max_shift frames within the clip, or (probability p_other_clip, or when no shift fits)
    a random window of another clip. Negatives whose two windows are silent throughout are dropped.
    """
    b, t = masks.shape
    n_win = t - LIP_FRAMES
    if n_win <= 0:
        raise ValueError(f"make_pairs: windows of {t} frames hold no 5-frame SyncNet window (need at least 6 frames)")
    pairs: list[tuple[int, int, int, int, int]] = []
    silent = np.array([[masks[i, v : v + LIP_FRAMES].max() <= 0.5 for v in range(n_win)] for i in range(b)])
    for i in range(b):
        for v in rng.choice(n_win, size=min(positions, n_win), replace=False):
            v = int(v)
            pairs.append((i, v, i, v, 1))
            shifts = [u for u in range(n_win) if min_shift <= abs(u - v) <= max_shift]
            if b > 1 and (not shifts or rng.random() < p_other_clip):
                j = int(rng.choice([k for k in range(b) if k != i]))
                u = int(rng.integers(n_win))
            elif shifts:
                j, u = i, int(rng.choice(shifts))
            else:
                continue
            if silent[i, v] and silent[j, u]:
                continue
            pairs.append((i, v, j, u, 0))
    return pairs


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
        from dystream.zoo.files import save_model

        step = int(self.global_step) if self._trainer is not None else 0
        extra = {"stage": "metric_syncnet", "step": step, "margin": self.hparams.margin, "trained_on": "synthetic"}
        path = save_model(self.net, self.export_dir / "syncnet.safetensors", arch="metric_syncnet", extra=extra)
        rank_zero_info(f"exported {path}")
