"""A small whole-body keypoint regressor for the synthetic world, with SimCC heads (as RTMPose / DWPose).

The embedded default has no DWPose weights (notes/metrics.md §0), so `make eval` trains this network on the synthetic
world's exact keypoints (`dystream.evaluation.train_pose`, `recipes/metric_pose.yaml`) and measures HKC/HKV and the
listening variances on generated video with it. Its output is the shards' `dwpose134` layout (`DWPOSE_134`), so the
metric groups are the ones of the ground truth.

Layout (the idea of RTMPose's SimCC head, Li et al. 2022 / Jiang et al. 2023, at toy size):
- backbone: a plain conv net from the `input_size` x `input_size` RGB frame to a feature map at stride 4;
- one `head_kernel` convolution to K keypoint maps, each map flattened to a vector (its location information);
- a shared per-keypoint MLP, then two linear classifiers over `input_size * split_ratio` bins per axis (x and y) and
  one visibility logit. Coordinates are the argmax bin refined by the softmax expectation around it (sub-bin
  precision); confidence is the sigmoid of the visibility logit (the synthetic labels are 1 inside the frame, 0
  outside).
`features` (the globally pooled backbone map) is the per-frame embedding the Fréchet distance "FD-pose" uses.

These weights see the synthetic world only; they are not a pose estimator for real video.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dystream.evaluation.keypoints import DWPOSE_134, KeypointLayout

__all__ = ["PRESETS", "PoseNetBackend", "PoseOutput", "PoseRegressor", "PoseRegressorConfig", "frames_to_input"]


@dataclass
class PoseRegressorConfig:
    num_keypoints: int = 134  # DWPOSE_134, the shards' layout
    input_size: int = 64  # frames are resized to input_size x input_size (the synthetic world renders 64x64)
    width: int = 16  # backbone channels at stride 1; 2x at stride 2, 4x at stride 4
    head_kernel: int = 5  # kernel of the convolution to the keypoint maps
    hidden_dim: int = 128  # the shared per-keypoint MLP
    split_ratio: float = 2.0  # SimCC bins per input pixel (RTMPose's default)
    decode_radius: int = 2  # bins around the argmax averaged when decoding

    def __post_init__(self) -> None:
        for name in ("num_keypoints", "width", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PoseRegressorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.input_size < 16 or self.input_size % 4:
            raise ValueError(f"PoseRegressorConfig.input_size must be a multiple of 4 and >= 16, got {self.input_size}")
        if self.head_kernel < 1 or self.head_kernel % 2 == 0:
            raise ValueError(f"PoseRegressorConfig.head_kernel must be odd and positive, got {self.head_kernel}")
        if self.decode_radius < 0:
            raise ValueError(f"PoseRegressorConfig.decode_radius must be >= 0, got {self.decode_radius}")
        if self.split_ratio <= 0:
            raise ValueError(f"PoseRegressorConfig.split_ratio must be positive, got {self.split_ratio}")

    @property
    def num_bins(self) -> int:
        return int(round(self.input_size * self.split_ratio))


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@dataclass
class PoseOutput:
    x_logits: torch.Tensor  # [B, K, bins]
    y_logits: torch.Tensor  # [B, K, bins]
    visibility: torch.Tensor  # [B, K] logits


class PoseRegressor(nn.Module):
    def __init__(self, config: PoseRegressorConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or PoseRegressorConfig()
        w = c.width
        self.backbone = nn.Sequential(
            *_conv(3, w),
            *_conv(w, 2 * w, 2),  # stride 2
            *_conv(2 * w, 2 * w),
            *_conv(2 * w, 4 * w, 2),  # stride 4
            *_conv(4 * w, 4 * w),
        )
        side = c.input_size // 4
        self.keypoint_maps = nn.Conv2d(4 * w, c.num_keypoints, c.head_kernel, padding=c.head_kernel // 2)
        self.mlp = nn.Sequential(nn.Linear(side * side, c.hidden_dim), nn.LayerNorm(c.hidden_dim), nn.GELU())
        self.head_x = nn.Linear(c.hidden_dim, c.num_bins)
        self.head_y = nn.Linear(c.hidden_dim, c.num_bins)
        self.head_vis = nn.Linear(c.hidden_dim, 1)

    def _check(self, x: torch.Tensor) -> None:
        s = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"PoseRegressor expects frames [B, 3, {s}, {s}] in [-1, 1], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> PoseOutput:
        """x [B, 3, s, s] in [-1, 1] -> SimCC logits per keypoint and visibility logits."""
        self._check(x)
        maps = self.keypoint_maps(self.backbone(x)).flatten(2)  # [B, K, (s/4)^2]
        h = self.mlp(maps)  # [B, K, hidden]
        return PoseOutput(self.head_x(h), self.head_y(h), self.head_vis(h).squeeze(-1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, s, s] in [-1, 1] -> [B, 4 width] pooled backbone features (the FD-pose embedding)."""
        self._check(x)
        return self.backbone(x).mean(dim=(2, 3))

    def decode(self, out: PoseOutput) -> torch.Tensor:
        """-> [B, K, 3]: x, y in input pixels, confidence.

        Each axis: the argmax bin (as DWPose decodes SimCC), refined by the softmax expectation over the bins within
        `decode_radius` of it (sub-bin precision). A global expectation would pull uncertain points towards the middle
        of the frame and so shrink every keypoint variance the metrics measure.
        """
        bins = torch.arange(self.config.num_bins, device=out.x_logits.device)
        centres = (bins + 0.5) / self.config.split_ratio  # bin i covers pixels [i, i + 1) / split_ratio

        def axis(logits: torch.Tensor) -> torch.Tensor:
            near = (bins - logits.argmax(-1, keepdim=True)).abs() <= self.config.decode_radius
            return (logits.masked_fill(~near, float("-inf")).softmax(-1) * centres).sum(-1)

        return torch.stack([axis(out.x_logits), axis(out.y_logits), out.visibility.sigmoid()], dim=-1)


def frames_to_input(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> float [N, 3, size, size] in [-1, 1] (bilinear, antialiased if shrinking)."""
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"pose network input must be uint8 RGB [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class PoseNetBackend:
    """`PoseBackend` over a trained `PoseRegressor`: uint8 RGB frames [T, H, W, 3] -> keypoints [T, 134, 3] in frame
    pixels (dwpose134 layout), so `hkv`, `listening_variances` and `PoseFaceBoxes` take it like DWPose."""

    layout: KeypointLayout = DWPOSE_134

    def __init__(self, net: PoseRegressor, batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        if net.config.num_keypoints != self.layout.num_keypoints:
            raise ValueError(f"PoseNetBackend: the network predicts {net.config.num_keypoints} keypoints, not 134")
        self.net = net.eval().to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        s = self.net.config.input_size
        out = []
        for i in range(0, len(frames), self.batch_size):
            x = frames_to_input(frames[i : i + self.batch_size], s).to(self.device)
            out.append(self.net.decode(self.net(x)).cpu())
        k = torch.cat(out) if out else torch.zeros(0, self.layout.num_keypoints, 3)
        h, w = frames.shape[1:3]
        k[..., 0] *= w / s
        k[..., 1] *= h / s
        return k.numpy().astype(np.float32)

    @torch.no_grad()
    def features(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB [T, H, W, 3] -> [T, 4 width] per-frame embeddings (FD-pose)."""
        s = self.net.config.input_size
        out = [
            self.net.features(frames_to_input(frames[i : i + self.batch_size], s).to(self.device)).cpu()
            for i in range(0, len(frames), self.batch_size)
        ]
        return torch.cat(out).double().numpy() if out else np.zeros((0, 4 * self.net.config.width))


# Presets. "synthetic-64": the embedded default's metric network (64x64 synthetic frames, recipes/metric_pose.yaml).
# "tiny": unit tests.
PRESETS: dict[str, PoseRegressorConfig] = {
    "synthetic-64": PoseRegressorConfig(input_size=64, width=16, head_kernel=5, hidden_dim=128),
    "tiny": PoseRegressorConfig(input_size=16, width=4, head_kernel=3, hidden_dim=16),
}
