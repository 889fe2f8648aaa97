"""A small SyncNet for the synthetic world: the SyncNet v2 two-stream layout at a fraction of its width.

The embedded default has no `syncnet_v2.model` (notes/metrics.md §0), so `make eval` trains this network on the
synthetic dyadic world (`dystream.evaluation.train_syncnet`, `recipes/metric_syncnet.yaml`) and scores Sync-C/D with
it through the unchanged `SyncNetScorer` protocol: the same face crops (syncnet_python's crop rule, 224x224, BGR,
raw 0-255), the same MFCC windows (13 x 20 at 100 Hz), the same +-15-frame offset search.

What differs from SyncNet v2 (`networks/syncnet.py`), and why:
- the lip stream first area-averages the 224x224 crop to `crop_size` (default 32): a synthetic face is about 16
  pixels wide in a 64x64 frame, so the crop region holds about 23x31 source pixels and 32x32 keeps all of them;
- widths are `width`, 2 `width`, 4 `width`, 8 `width` instead of 96-512, and the embedding is `embed_dim`-d;
- the 0-255 input is mapped to [-1, 1] inside the network (v2 feeds raw values to its first BatchNorm'd conv).
Like v2, the first lip convolution spans all 5 frames (temporal kernel 5) and both streams end in a convolution whose
kernel covers the remaining map, then a 2-layer FC head; in-sync pairs are close in Euclidean distance (the
contrastive objective of Chung & Zisserman 2016, see `train_syncnet.py`).

These weights measure synchronisation *in the synthetic world only*; numbers are not comparable with SyncNet v2's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PRESETS", "SmallSyncNet", "SmallSyncNetConfig"]


@dataclass
class SmallSyncNetConfig:
    width: int = 16  # channels of the first layer of each stream; later layers 2x, 4x, 8x
    embed_dim: int = 64  # size of the shared lip/audio embedding space
    crop_size: int = 32  # lip crops are area-averaged to crop_size x crop_size first
    lip_frames: int = 5  # video frames per window (0.2 s at 25 fps), fixed by the scorer
    mfcc_frames: int = 20  # MFCC frames per window (0.2 s at 100 Hz), fixed by the scorer
    num_cepstra: int = 13

    def __post_init__(self) -> None:
        for name in ("width", "embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SmallSyncNetConfig.{name} must be positive, got {getattr(self, name)}")
        if self.crop_size < 16 or self.crop_size % 8:
            raise ValueError(f"SmallSyncNetConfig.crop_size must be a multiple of 8 and >= 16, got {self.crop_size}")
        fixed = {"lip_frames": 5, "mfcc_frames": 20, "num_cepstra": 13}
        for name, value in fixed.items():
            # the SyncNetScorer's windows: 5 frames, 13 x 20 MFCC (syncnet_python); the last convs reduce exactly these
            if getattr(self, name) != value:
                raise ValueError(
                    f"SmallSyncNetConfig.{name} must be {value} (the scorer's window), got {getattr(self, name)}"
                )


def _conv2d(cin: int, cout: int, kernel: int | tuple[int, int], stride: int | tuple[int, int] = 1, padding: int = 0):
    return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _fc_head(cin: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cin), nn.BatchNorm1d(cin), nn.ReLU(), nn.Linear(cin, dim))


class SmallSyncNet(nn.Module):
    """Two streams into one `embed_dim` space: `forward_lip` (face crops) and `forward_aud` (MFCC windows)."""

    def __init__(self, config: SmallSyncNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or SmallSyncNetConfig()
        w = c.width
        s = c.crop_size
        # lips: [B, 3, 5, s, s] -> the 5-frame kernel collapses time -> [B, w, 1, s/2, s/2]
        self.lip_stem = nn.Sequential(
            nn.Conv3d(3, w, kernel_size=(5, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2), bias=False),
            nn.BatchNorm3d(w),
            nn.ReLU(inplace=True),
        )
        self.lip_cnn = nn.Sequential(
            *_conv2d(w, 2 * w, 3, 2, 1),  # s/2 -> s/4
            *_conv2d(2 * w, 4 * w, 3, 2, 1),  # -> s/8
            *_conv2d(4 * w, 8 * w, s // 8),  # -> 1x1
        )
        # audio: [B, 1, 13, 20] -> [B, 8w, 1, 1]
        self.aud_cnn = nn.Sequential(
            *_conv2d(1, w, 3, 1, 1),
            *_conv2d(w, 2 * w, 3, (1, 2), 1),  # [13, 20] -> [13, 10]
            *_conv2d(2 * w, 4 * w, 3, 2, 1),  # -> [7, 5]
            *_conv2d(4 * w, 8 * w, (7, 5)),  # -> [1, 1]
        )
        self.lip_fc = _fc_head(8 * w, c.embed_dim)
        self.aud_fc = _fc_head(8 * w, c.embed_dim)

    def prepare_lip(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, S, S] BGR 0-255 crops (any S) -> [B, 3, T, crop_size, crop_size] area-averaged, still 0-255.

        Frame by frame, so pooling whole sequences before windowing gives exactly what `forward_lip` computes.
        """
        if crops.ndim != 5 or crops.shape[1] != 3 or crops.shape[-1] != crops.shape[-2]:
            raise ValueError(f"SmallSyncNet: lip crops must be [B, 3, T, S, S], got {tuple(crops.shape)}")
        s = self.config.crop_size
        if crops.shape[-1] == s:
            return crops
        b, _, t = crops.shape[:3]
        x = crops.transpose(1, 2).reshape(b * t, 3, *crops.shape[-2:])
        x = F.adaptive_avg_pool2d(x, s)
        return x.reshape(b, t, 3, s, s).transpose(1, 2)

    def forward_lip(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 3, 5, S, S] BGR 0-255 face crops (S = 224 from the scorer, or crop_size) -> [B, embed_dim]."""
        x = self.prepare_lip(crops)
        if x.shape[2] != self.config.lip_frames:
            raise ValueError(f"SmallSyncNet.forward_lip expects 5 frames per window, got {tuple(crops.shape)}")
        x = self.lip_stem(x / 127.5 - 1.0).squeeze(2)  # [B, w, s/2, s/2]
        return self.lip_fc(self.lip_cnn(x).flatten(1))

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """[B, 1, 13, 20] MFCC windows -> [B, embed_dim]."""
        if mfcc.ndim != 4 or tuple(mfcc.shape[1:]) != (1, 13, 20):
            raise ValueError(f"SmallSyncNet.forward_aud expects [B, 1, 13, 20], got {tuple(mfcc.shape)}")
        return self.aud_fc(self.aud_cnn(mfcc).flatten(1))


# Presets. "synthetic-64": the embedded default's metric network (64x64 synthetic frames, recipes/metric_syncnet.yaml).
# "tiny": unit tests.
PRESETS: dict[str, SmallSyncNetConfig] = {
    "synthetic-64": SmallSyncNetConfig(width=16, embed_dim=64, crop_size=32),
    "tiny": SmallSyncNetConfig(width=4, embed_dim=16, crop_size=16),
}
