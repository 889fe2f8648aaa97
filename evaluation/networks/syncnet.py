"""SyncNet v2 (Chung & Zisserman 2016, joonson/syncnet_python `SyncNetModel.S`): lip and audio embeddings.

Two streams map 0.2 s of each modality into a shared 1024-d space where in-sync pairs are close:
- lip stream `netcnnlip` + `netfclip`: 5 face crops, [B, 3, 5, 224, 224], BGR channel order, raw 0-255 floats (no
  mean subtraction: syncnet_python stacks cv2.imread frames as they are);
- audio stream `netcnnaud` + `netfcaud`: 13 MFCC x 20 frames (100 Hz), [B, 1, 13, 20].
Sequential indices and layer types follow the original file so the state-dict keys are those of `syncnet_v2.model`
(e.g. `netcnnaud.0.weight`, `netcnnlip.19.running_var`, `netfcaud.3.bias`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from dystream.evaluation.weights import WeightsInfo, load_state_dict_checked, require_weights

__all__ = ["PRESETS", "SyncNetConfig", "SyncNetV2", "load_syncnet"]


@dataclass
class SyncNetConfig:
    embed_dim: int = 1024  # syncnet_python num_layers_in_fc_layers
    lip_frames: int = 5  # video frames per window (0.2 s at 25 fps)
    crop_size: int = 224
    mfcc_frames: int = 20  # MFCC frames per window (0.2 s at 100 Hz)
    num_cepstra: int = 13

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ValueError(f"SyncNetConfig.embed_dim must be positive, got {self.embed_dim}")
        fixed = {"lip_frames": 5, "crop_size": 224, "mfcc_frames": 20, "num_cepstra": 13}
        for name, value in fixed.items():
            # the last conv of each stream (kernels (1, 6, 6) and (5, 4)) reduces exactly these sizes to 1x1
            if getattr(self, name) != value:
                got = getattr(self, name)
                raise ValueError(f"SyncNetConfig.{name} must be {value} for the SyncNet v2 layout, got {got}")


def _bn_relu2d(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]


def _bn_relu3d(c: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(c), nn.ReLU(inplace=True)]


def _fc_head(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


class SyncNetV2(nn.Module):
    def __init__(self, config: SyncNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or SyncNetConfig()
        # audio: [B, 1, 13, 20] -> [B, 512, 1, 1]
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=3, padding=1), *_bn_relu2d(64),
            nn.MaxPool2d(kernel_size=1, stride=1),  # index 3, a no-op kept for the key numbering
            nn.Conv2d(64, 192, kernel_size=3, padding=1), *_bn_relu2d(192),
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),  # [13, 20] -> [11, 9]
            nn.Conv2d(192, 384, kernel_size=3, padding=1), *_bn_relu2d(384),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), *_bn_relu2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), *_bn_relu2d(256),
            nn.MaxPool2d(kernel_size=3, stride=2),  # [11, 9] -> [5, 4]
            nn.Conv2d(256, 512, kernel_size=(5, 4)), nn.BatchNorm2d(512), nn.ReLU(),  # -> [1, 1]
        )  # fmt: skip
        self.netfcaud = _fc_head(self.config.embed_dim)
        self.netfclip = _fc_head(self.config.embed_dim)
        # lips: [B, 3, 5, 224, 224] -> [B, 512, 1, 1, 1]
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2)), *_bn_relu3d(96),  # -> [1, 109, 109]
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # -> 54
            nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), *_bn_relu3d(256),  # -> 26
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # -> 13
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), *_bn_relu3d(256),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), *_bn_relu3d(256),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), *_bn_relu3d(256),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # -> 6
            nn.Conv3d(256, 512, kernel_size=(1, 6, 6)), *_bn_relu3d(512),  # -> 1
        )  # fmt: skip

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """[B, 1, 13, 20] MFCC windows -> [B, embed_dim]."""
        if mfcc.ndim != 4 or tuple(mfcc.shape[1:]) != (1, 13, 20):
            raise ValueError(f"SyncNetV2.forward_aud expects [B, 1, 13, 20], got {tuple(mfcc.shape)}")
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 3, 5, 224, 224] BGR 0-255 face crops -> [B, embed_dim]."""
        if crops.ndim != 5 or tuple(crops.shape[1:]) != (3, 5, 224, 224):
            raise ValueError(f"SyncNetV2.forward_lip expects [B, 3, 5, 224, 224], got {tuple(crops.shape)}")
        return self.netfclip(self.netcnnlip(crops).flatten(1))


def load_syncnet(
    path: str | os.PathLike | None, device: str | torch.device = "cpu", config: SyncNetConfig | None = None
) -> tuple[SyncNetV2, WeightsInfo]:
    """Load `syncnet_v2.model` (a plain state dict; weights_only, strict) -> (frozen eval-mode net, WeightsInfo).

    Raises `MetricWeightsMissing` if `path` is None, absent, not a state dict, or its keys do not match.
    """
    info = require_weights("syncnet_v2", path)
    net = SyncNetV2(config or PRESETS["syncnet_v2"])
    load_state_dict_checked(net, info)
    net.requires_grad_(False).eval().to(device)
    return net, info


# Presets. "syncnet_v2": joonson/syncnet_python SyncNetModel.S(num_layers_in_fc_layers=1024), weights syncnet_v2.model.
PRESETS: dict[str, SyncNetConfig] = {
    "syncnet_v2": SyncNetConfig(),
}
