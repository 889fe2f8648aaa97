"""ArcFace IResNet-50 (insightface `recognition/arcface_torch`, `backbones/iresnet.py`): the face-embedding network
for identity similarity on real video.

Architecture (Deng et al. 2019, "ArcFace", §3.2 / Duta et al.'s improved residual block as insightface implements it),
written here from the published layout so that the public `backbone.pth` state dicts load strictly:

- stem: `conv1` 3x3 stride 1 (64 channels, no bias), `bn1`, `prelu`;
- `layer1`..`layer4` of `IBasicBlock`s (64, 128, 256, 512 channels; 3, 4, 14, 3 blocks for IResNet-50), each stage
  starting with stride 2; a block is bn1 -> conv1 (3x3) -> bn2 -> prelu -> conv2 (3x3, the stage's stride) -> bn3,
  plus the shortcut (`downsample.0` 1x1 conv, `downsample.1` BN) where the shape changes;
- head: `bn2` (2-D), flatten (512 x 7 x 7), `dropout`, `fc` to 512, `features` (BatchNorm1d, weight frozen at 1).
Every BatchNorm uses eps 1e-5. Input: aligned 112x112 RGB faces scaled to [-1, 1] ((x / 255 - 0.5) / 0.5); output:
the 512-d embedding, compared by cosine.

`load_arcface_iresnet50(path)` reads `backbone.pth` (`torch.load(weights_only=True)`) and loads it strictly; a key
that does not match is named in the error. `ArcFaceEmbedder` is the `Embedder` of `dystream.evaluation.identity`
(uint8 frames -> unit 512-d features); it resizes whole frames to 112x112, so give it aligned face crops for real
video (as insightface's evaluation does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PRESETS",
    "ArcFaceEmbedder",
    "IBasicBlock",
    "IResNet",
    "IResNetConfig",
    "iresnet50",
    "load_arcface_iresnet50",
]


@dataclass
class IResNetConfig:
    layers: tuple[int, int, int, int] = (3, 4, 14, 3)  # IResNet-50
    num_features: int = 512
    dropout: float = 0.0
    input_size: int = 112  # fc expects 512 x (input_size / 16)^2

    def __post_init__(self) -> None:
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"IResNetConfig.layers must be four positive block counts, got {self.layers}")
        if self.input_size % 16:
            raise ValueError(f"IResNetConfig.input_size must be a multiple of 16, got {self.input_size}")
        if self.num_features <= 0:
            raise ValueError(f"IResNetConfig.num_features must be positive, got {self.num_features}")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    def __init__(self, config: IResNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or IResNetConfig()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), c.layers, strict=True)):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
            layer = [IBasicBlock(inplanes, planes, 2, downsample)] + [
                IBasicBlock(planes, planes) for _ in range(blocks - 1)
            ]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=c.dropout)
        side = c.input_size // 16
        self.fc = nn.Linear(512 * side * side, c.num_features)
        self.features = nn.BatchNorm1d(c.num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # as insightface: the last BN only centres and scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, 112, 112] in [-1, 1] (RGB) -> [B, 512] embeddings (not normalised, as insightface returns them)."""
        s = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"IResNet expects faces [B, 3, {s}, {s}] in [-1, 1], got {tuple(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet50(**overrides) -> IResNet:
    """IResNet-50 (insightface `iresnet50`: layers 3, 4, 14, 3; 512-d output)."""
    return IResNet(IResNetConfig(**{**PRESETS["iresnet50"].__dict__, **overrides}))


def load_arcface_iresnet50(path: str | os.PathLike, device: str | torch.device = "cpu") -> IResNet:
    """An ArcFace `backbone.pth` (insightface arcface_torch IResNet-50 state dict) loaded strictly, frozen, eval mode.

    Raises FileNotFoundError naming the file and how to get it, and ValueError naming the missing / unexpected /
    mis-shaped keys when the file is not an IResNet-50 state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"ArcFace IResNet-50 weights {str(p)!r} not found: download insightface's arcface_torch backbone.pth "
            "(IResNet-50) and `dystream zoo import arcface-iresnet50.ms1mv3 backbone.pth --trust`, or pass its path"
        )
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{p}: expected a state dict (name -> tensor), got {type(state).__name__}")
    net = iresnet50()
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:4]]}")
        raise ValueError(f"{p} is not an insightface IResNet-50 state dict: {'; '.join(parts)}")
    net.load_state_dict(state, strict=True)
    return net.requires_grad_(False).eval().to(device)


class ArcFaceEmbedder:
    """`Embedder` over an IResNet: uint8 RGB faces [N, H, W, 3] -> unit float32 [N, 512] (resized to 112x112)."""

    name = "arcface_iresnet50"

    def __init__(self, net: IResNet, batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        self.net = net.eval().to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        f = np.asarray(frames)
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"ArcFaceEmbedder: faces must be uint8 RGB [N, H, W, 3], got {f.dtype} {f.shape}")
        s = self.net.config.input_size
        out = []
        for i in range(0, len(f), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(f[i : i + self.batch_size])).permute(0, 3, 1, 2).float()
            x = x.to(self.device) / 127.5 - 1.0  # (x / 255 - 0.5) / 0.5, insightface's normalisation
            if x.shape[-2:] != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out.append(F.normalize(self.net(x).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.net.config.num_features), dtype=np.float32)


# Presets. "iresnet50": insightface arcface_torch `iresnet50` (the MS1MV3 / Glint360K backbone.pth files).
# "tiny": unit tests (same key names, fewer blocks and a smaller input).
PRESETS: dict[str, IResNetConfig] = {
    "iresnet50": IResNetConfig(layers=(3, 4, 14, 3), num_features=512, input_size=112),
    "tiny": IResNetConfig(layers=(1, 1, 1, 1), num_features=32, input_size=16),
}
