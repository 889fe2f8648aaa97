"""The objective of the synthetic world's keypoint regressor (`PoseRegressor`), trained on its exact keypoints by
`dystream.stages.metric_pose.PoseTrainer` (recipes/metric_pose.yaml).

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dystream.evaluation.networks.pose_small import PoseOutput

__all__ = ["augment", "batch_frames", "simcc_loss"]


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


def augment(
    frames: Tensor, target: Tensor, generator: torch.Generator, scale: float = 0.15, shift: float = 0.1
) -> tuple:
    """Random framing and colour per frame: frames [N, 3, s, s] in [-1, 1], keypoints [N, K, 3] in input pixels.

    The synthetic world has 16 training identities by default, and the network overfits them (pixel error 0.3 on
    training frames, 1.2 on unseen identities): a zoom of 1 +- `scale`, a shift of +- `shift` of the frame, per-channel
    gains and offsets and a random channel order widen the looks it sees. Keypoints move with the frame; points that
    leave it get confidence 0, as the synthetic labels mark points outside the image.
    """
    n, _, s, _ = frames.shape

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    zoom = uniform(1 - scale, 1 + scale, n)  # output = input zoomed by `zoom` about the centre, then shifted
    offset = uniform(-shift, shift, n, 2) * 2  # in normalised [-1, 1] units
    # affine_grid maps output coordinates to input coordinates: x_in = (x_out - offset) / zoom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = -offset / zoom[:, None]
    grid = F.affine_grid(theta, list(frames.shape), align_corners=False)
    out = F.grid_sample(frames, grid.to(frames), mode="bilinear", padding_mode="border", align_corners=False)
    kp = target.clone()
    xy = kp[..., :2] / s * 2 - 1  # pixel coordinates (centres at i + 0.5) -> normalised, align_corners=False
    xy = xy * zoom[:, None, None] + offset[:, None, :]
    kp[..., :2] = (xy + 1) / 2 * s
    inside = ((kp[..., :2] >= 0) & (kp[..., :2] <= s)).all(-1)
    kp[..., 2] = torch.where(inside, kp[..., 2], torch.zeros_like(kp[..., 2]))
    gain = uniform(0.75, 1.25, n, 3, 1, 1)
    bias = uniform(-0.15, 0.15, n, 3, 1, 1)
    out = out * gain.to(out) + bias.to(out)
    perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)])  # [N, 3]
    out = out[torch.arange(n)[:, None], perm]
    return out.clamp(-1, 1), kp
