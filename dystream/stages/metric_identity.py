"""Metric-network stage: trains the synthetic world's identity embedding (`IdentityNet`) for identity drift.

The embedded default has no face-recognition weights, so `make eval` first runs this stage
(recipes/metric_identity.yaml). Objective: CosFace (Wang et al. 2018, "CosFace: Large Margin Cosine Loss", eq. 4), an
additive margin on the cosine between the unit embedding x and the unit class centre W_y of the train identities:

    L = -log( e^{s (cos θ_y - m)} / (e^{s (cos θ_y - m)} + sum_{j != y} e^{s cos θ_j}) )

Labels: the synthetic world draws person `index // clips_per_identity` for clip `index` of a split
(`dystream.datamodules.synthetic.make_clip`), and the clip index is the last field of the shard key
(`clip_key`: `<split>-<seed>-<index>`), so the label of a batch sample is recovered from `batch["key"]`.
The validation split's people are drawn from another seed stream: none of them is a train identity, so validation
measures the embedding on unseen people (verification ROC AUC and accuracy at the best threshold over same- vs
different-identity frame pairs, with pixel RMS at 64x64 on the same pairs for comparison; mean cosine similarity of a
clip's frames to its own reference frame and to other identities' reference frames).

Frames: the window frames and the reference frames of each clip (the reference frames lie outside the window, so a
step sees poses, mouths and gestures from all over the clip), randomly re-framed (zoom, shift) and with a mild
per-frame colour gain below the differences between people. Hand-over: `<export_dir>/identity.safetensors` (arch
`metric_identity`), read by `dystream.evaluation.metric_nets.load_metric_identity`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

from dystream.evaluation.networks.identity_small import PRESETS, IdentityNet
from dystream.logs import announce_export
from dystream.stages.metric_syncnet import one_cycle
from dystream.zoo.files import save_model

__all__ = ["IdentityTrainer", "cosface_loss", "identity_labels", "roc_auc", "separation", "verification_metrics"]

_KEY = re.compile(r"^(?P<split>[a-z]+)-(?P<seed>\d+)-(?P<index>\d+)$")


def identity_labels(keys: list[str], clips_per_identity: int) -> Tensor:
    """Identity number of each synthetic clip key `<split>-<seed>-<index>` -> [B] int64."""
    out = []
    for k in keys:
        m = _KEY.match(k)
        if m is None:
            raise ValueError(
                f"IdentityTrainer: key {k!r} is not a synthetic clip key '<split>-<seed>-<index>'; the identity labels "
                "come from the synthetic world's keys (train on the embedded default or shards it wrote)"
            )
        out.append(int(m["index"]) // clips_per_identity)
    return torch.tensor(out, dtype=torch.long)


def cosface_loss(emb: Tensor, centres: Tensor, labels: Tensor, scale: float, margin: float) -> tuple[Tensor, Tensor]:
    """CosFace (eq. 4) of unit embeddings emb [N, D] against class centres [C, D] -> (loss, accuracy without margin)."""
    cos = emb @ F.normalize(centres, dim=-1).t()  # [N, C]
    logits = scale * (cos - margin * F.one_hot(labels, cos.shape[1]).to(cos))
    return F.cross_entropy(logits, labels), (cos.argmax(-1) == labels).float().mean()


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half): P(score of a positive > score of a negative)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks of ties (1-based)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_accuracy(scores: np.ndarray, positive: np.ndarray) -> float:
    """Verification accuracy at the best threshold (score >= threshold means "same identity")."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    ys = y[order]
    # threshold just below the k-th highest score: the first k pairs are called positive
    tp = np.concatenate([[0], np.cumsum(ys)])
    fp = np.concatenate([[0], np.cumsum(~ys)])
    correct = tp + ((~y).sum() - fp)
    return float(correct.max() / len(s))


def separation(scores: np.ndarray, positive: np.ndarray) -> float:
    """d' of same- vs different-identity pair scores: (mean_same - mean_diff) / sqrt((var_same + var_diff) / 2).
    Unlike the AUC it does not saturate: it says how far apart the two groups are in units of their spread (pose and
    mouth changes widen the same-identity spread)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    return float((s[y].mean() - s[~y].mean()) / np.sqrt((s[y].var() + s[~y].var()) / 2).clip(min=1e-12))


def verification_metrics(
    frames: np.ndarray, labels: np.ndarray, clip: np.ndarray, references: np.ndarray, embed
) -> dict[str, float]:
    """Identity verification of `embed` against pixel RMS on held-out frames.

    Args:
        frames: uint8 [N, H, W, 3] frames of several clips.
        labels: [N] identity of each frame.
        clip: [N] clip number of each frame (0 .. C - 1).
        references: uint8 [C, H, W, 3] one reference frame per clip (outside the frames' window).
        embed: uint8 [N, H, W, 3] -> [N, D] (an `Embedder`).

    Pairs are all frame pairs from different clips (same identity = positive). Returns the ROC AUC and the accuracy at
    the best threshold of the cosine similarity and of -pixel RMS at 64x64, their separation d' (`separation`), and
    the mean cosine similarity of each frame to its clip's reference vs to the references of other identities.
    """
    from dystream.evaluation.identity import pixel_embedding

    labels, clip = np.asarray(labels), np.asarray(clip)
    e = np.asarray(embed(frames), dtype=np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
    p = pixel_embedding(frames)
    i, j = np.triu_indices(len(frames), k=1)
    keep = clip[i] != clip[j]
    i, j = i[keep], j[keep]
    same = labels[i] == labels[j]
    cos = (e[i] * e[j]).sum(1)
    rms = np.sqrt(((p[i] - p[j]) ** 2).mean(1))
    r = np.asarray(embed(references), dtype=np.float64)
    r /= np.linalg.norm(r, axis=1, keepdims=True).clip(min=1e-12)
    ref_label = np.array([labels[clip == c][0] for c in range(len(references))])
    sim = e @ r.T  # [N, C]
    own = sim[np.arange(len(frames)), clip]
    other = np.array([sim[n, ref_label != labels[n]].mean() for n in range(len(frames))])
    return {
        "auc": roc_auc(cos, same),
        "acc": best_accuracy(cos, same),
        "pixel_rms_auc": roc_auc(-rms, same),
        "pixel_rms_acc": best_accuracy(-rms, same),
        "dprime": separation(cos, same),
        "pixel_rms_dprime": separation(-rms, same),
        "cos_own_reference": float(own.mean()),
        "cos_other_identity": float(other.mean()),
    }


class IdentityTrainer(L.LightningModule):
    """Trains `IdentityNet` on the synthetic world's identities and exports it for identity drift (`make eval`).

    Args:
        preset: `IdentityNet` preset (`synthetic-64`, `tiny`).
        num_identities: train identities (the embedded default: 64 train clips / 4 clips per identity = 16); a label
            outside the range is an error naming this field.
        clips_per_identity: the synthetic world's clips per person (`dystream data synth --clips-per-identity`).
        frames_per_clip: frames of each clip (window and reference frames) used per step.
        scale: CosFace scale s.
        margin: CosFace additive cosine margin m.
        augment: random zoom/shift and mild colour gain of the training frames.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seed of the frame choice and the augmentations.
        export_dir: where `identity.safetensors` is written (at every checkpoint and at the end of fit).
    """

    def __init__(
        self,
        preset: str = "synthetic-64",
        num_identities: PositiveInt = 16,
        clips_per_identity: PositiveInt = 4,
        frames_per_clip: PositiveInt = 4,
        scale: PositiveFloat = 16.0,
        margin: NonNegativeFloat = 0.25,
        augment: bool = True,
        lr: PositiveFloat = 3e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        seed: int = 0,
        export_dir: str = "runs/metric_identity",
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"IdentityTrainer.preset must be one of {sorted(PRESETS)}, got {preset!r}")
        self.save_hyperparameters()
        self.net = IdentityNet(PRESETS[preset])
        self.centres = nn.Parameter(torch.randn(num_identities, self.net.config.embed_dim) * 0.1)
        self.export_dir = Path(export_dir)
        self._gen = torch.Generator().manual_seed(seed)
        self._val: list[dict[str, Any]] = []
        self.last_validation: dict[str, float] = {}

    # -- batch -> frames ------------------------------------------------------------------------------
    def frames(self, batch: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(frames [N, 3, s, s] in [-1, 1], clip number [N]): `frames_per_clip` frames of each clip, chosen among
        the window and the reference frames (all of them when `generator` is None)."""
        video, refs = batch["video"], batch["references"]  # [B, 3, T, H, W], [B, R, 3, H, W]
        allf = torch.cat([video.permute(0, 2, 1, 3, 4), refs], dim=1)  # [B, T + R, 3, H, W]
        b, n = allf.shape[:2]
        if generator is None:
            idx = torch.arange(n)[None].expand(b, n)
        else:
            idx = torch.stack(
                [torch.randperm(n, generator=generator)[: self.hparams.frames_per_clip] for _ in range(b)]
            )
        rows = torch.arange(b)[:, None].expand_as(idx)
        x = allf[rows, idx].flatten(0, 1).float()
        s = self.net.config.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True)
        return x, rows.flatten()

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Zoom 1 +- 0.1, shift +- 6 % of the frame, per-channel gain 1 +- 0.05 and offset +- 0.03 (in [-1, 1] units):
        framing and lighting changes far smaller than the colour differences between synthetic people."""
        n = x.shape[0]

        def uniform(lo: float, hi: float, *shape: int) -> Tensor:
            return lo + (hi - lo) * torch.rand(*shape, generator=generator)

        zoom = uniform(0.9, 1.1, n)
        offset = uniform(-0.06, 0.06, n, 2) * 2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
        theta[:, :, 2] = -offset / zoom[:, None]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="border", align_corners=False)
        x = x * uniform(0.95, 1.05, n, 3, 1, 1).to(x) + uniform(-0.03, 0.03, n, 3, 1, 1).to(x)
        return x.clamp(-1, 1)

    def _labels(self, batch: dict[str, Any]) -> Tensor:
        return identity_labels(list(batch["key"]), self.hparams.clips_per_identity)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labels = self._labels(batch).to(self.device)
        if int(labels.max()) >= self.hparams.num_identities:
            raise ValueError(
                f"IdentityTrainer.num_identities is {self.hparams.num_identities}, but key {batch['key']} has identity "
                f"{int(labels.max())}: set it to the train split's number of people (clips / clips_per_identity)"
            )
        x, rows = self.frames(batch, self._gen)
        if self.hparams.augment:
            x = self.augment(x, self._gen)
        loss, acc = cosface_loss(self.net(x.to(self.device)), self.centres, labels[rows.to(self.device)],
                                 self.hparams.scale, self.hparams.margin)  # fmt: skip
        b = batch["video"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/acc", acc, batch_size=b)
        return loss

    # -- validation on held-out identities --------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, rows = self.frames(batch, None)
        t = batch["video"].shape[2]
        n = x.shape[0] // batch["video"].shape[0]
        frames = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        per_clip = frames.reshape(-1, n, *frames.shape[1:])  # [B, T + R, s, s, 3]
        self._val.append({
            "frames": per_clip[:, :t],  # the window
            "references": per_clip[:, t],  # the first reference frame
            "labels": self._labels(batch).numpy(),
        })  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        if not self._val or self.trainer.sanity_checking:
            return
        frames = np.concatenate([v["frames"] for v in self._val])  # [C, T, H, W, 3]
        refs = np.concatenate([v["references"] for v in self._val])
        labels = np.concatenate([v["labels"] for v in self._val])
        if len(np.unique(labels)) < 2:
            rank_zero_info("metric_identity: validation needs at least two identities; skipped")
            return
        c, t = frames.shape[:2]
        from dystream.evaluation.networks.identity_small import IdentityEmbedder

        was_training = self.net.training
        embed = IdentityEmbedder(self.net, device=self.device)
        flat = frames.reshape(c * t, *frames.shape[2:])
        m = verification_metrics(flat, np.repeat(labels, t), np.repeat(np.arange(c), t), refs, embed)
        self.net.train(was_training)
        m["identities"], m["clips"] = float(len(np.unique(labels))), float(c)
        self.last_validation = m
        for k, v in m.items():
            self.log(f"val/{k}", v, prog_bar=k in ("auc", "pixel_rms_auc"), sync_dist=False)

    def configure_optimizers(self):
        return one_cycle(self, self.parameters(), self.hparams.lr, self.hparams.weight_decay)

    # -- hand-over ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.export()

    def on_fit_end(self) -> None:
        self.export()
        if self.last_validation:
            m = self.last_validation
            rank_zero_info(
                f"metric_identity validation ({int(m['identities'])} held-out identities, {int(m['clips'])} clips): "
                f"ROC AUC {m['auc']:.4f} (pixel RMS 64x64: {m['pixel_rms_auc']:.4f}), accuracy at the best threshold "
                f"{m['acc']:.4f} (pixel RMS: {m['pixel_rms_acc']:.4f}), separation d' {m['dprime']:.2f} (pixel RMS: "
                f"{m['pixel_rms_dprime']:.2f}); cosine to own reference "
                f"{m['cos_own_reference']:.4f}, to other identities' references {m['cos_other_identity']:.4f}"
            )

    @rank_zero_only
    def export(self) -> None:
        step = int(self.global_step) if self._trainer is not None else 0
        extra = {"stage": "metric_identity", "step": step, "trained_on": "synthetic", "input": "whole frame"}
        extra |= {f"val_{k}": round(v, 6) for k, v in self.last_validation.items()}
        path = save_model(self.net, self.export_dir / "identity.safetensors", arch="metric_identity", extra=extra)
        announce_export(self, path)
