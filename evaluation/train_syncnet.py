"""The objective and the training pairs of the synthetic world's SyncNet (`SmallSyncNet`); the LightningModule that
uses them is `dystream.stages.metric_syncnet.SyncNetTrainer` (recipes/metric_syncnet.yaml).

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

import numpy as np
import torch
from torch import Tensor

from dystream.evaluation.keypoints import DWPOSE_134
from dystream.evaluation.networks.syncnet_small import SmallSyncNet
from dystream.evaluation.sync import SyncNetScorer, crop_faces, face_boxes_from_keypoints

__all__ = [
    "contrastive_sync_loss",
    "lip_sequence",
    "make_pairs",
    "mfcc_sequence",
    "video_to_uint8",
]

LIP_FRAMES = 5
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
MFCC_WINDOW = 20


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
