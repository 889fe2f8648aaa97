"""A small identity-embedding network for the synthetic world (the identity measure of the drift metric).

The embedded default has no face-recognition weights, so `make eval` trains this network on the synthetic world's
identity labels (`dystream.stages.metric_identity`, `recipes/metric_identity.yaml`) and measures identity drift with
it: the cosine distance between a generated frame's embedding and the reference image's (StreamAvatar §3.3, the
Reference Sink / RAPR ablations). For real video use a face-recognition network instead
(`dystream.evaluation.networks.iresnet`, ArcFace IResNet-50).

Input: the whole 64x64 frame, not a face crop. A synthetic person is defined by colours, shapes and sizes of the
head, hair, clothes and background (`dystream.datamodules.synthetic.sample_identity`); at 64x64 the face is about
20 pixels wide, so a crop would throw away most of what makes the identity and add a dependency on a pose network's
boxes for generated video. Pose, mouth and gestures vary within a clip; the training objective (an additive cosine
margin over the train identities, CosFace) and the augmentations make the embedding ignore them.

Layout: three stride-2 stages of two 3x3 conv-BN-ReLU layers (64 -> 8 pixels), global average pooling, a linear
projection to `embed_dim`, L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PRESETS", "IdentityEmbedder", "IdentityNet", "IdentityNetConfig", "frames_to_input"]


@dataclass
class IdentityNetConfig:
    input_size: int = 64  # frames are resized to input_size x input_size (the synthetic world renders 64x64)
    width: int = 24  # channels of the first stage; 2x and 4x in the next two
    embed_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("width", "embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"IdentityNetConfig.{name} must be positive, got {getattr(self, name)}")
        if self.input_size < 16 or self.input_size % 8:
            raise ValueError(f"IdentityNetConfig.input_size must be a multiple of 8 and >= 16, got {self.input_size}")


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class IdentityNet(nn.Module):
    def __init__(self, config: IdentityNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or IdentityNetConfig()
        w = c.width
        self.backbone = nn.Sequential(
            *_conv(3, w, 2), *_conv(w, w),  # stride 2
            *_conv(w, 2 * w, 2), *_conv(2 * w, 2 * w),  # stride 4
            *_conv(2 * w, 4 * w, 2), *_conv(4 * w, 4 * w),  # stride 8
        )  # fmt: skip
        self.proj = nn.Linear(4 * w, c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, s, s] in [-1, 1] -> [B, embed_dim] unit-norm embeddings."""
        s = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"IdentityNet expects frames [B, 3, {s}, {s}] in [-1, 1], got {tuple(x.shape)}")
        return F.normalize(self.proj(self.backbone(x).mean(dim=(2, 3))), dim=-1)


def frames_to_input(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> float [N, 3, size, size] in [-1, 1] (bilinear, antialiased if shrinking)."""
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"identity network input must be uint8 RGB [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class IdentityEmbedder:
    """The `Embedder` of `dystream.evaluation.identity` over a trained `IdentityNet`: uint8 RGB frames [N, H, W, 3]
    -> float32 unit-norm embeddings [N, D]. `name` is the distance label the evaluation tables print."""

    name = "metric_identity"

    def __init__(self, net: IdentityNet, batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        self.net = net.eval().to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.net.config.embed_dim

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        f = np.asarray(frames)
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"IdentityEmbedder: frames must be uint8 RGB [N, H, W, 3], got {f.dtype} {f.shape}")
        s = self.net.config.input_size
        out = [
            self.net(frames_to_input(f[i : i + self.batch_size], s).to(self.device)).float().cpu()
            for i in range(0, len(f), self.batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), dtype=np.float32)


# Presets. "synthetic-64": the embedded default's identity network (64x64 frames, recipes/metric_identity.yaml).
# "tiny": unit tests.
PRESETS: dict[str, IdentityNetConfig] = {
    "synthetic-64": IdentityNetConfig(input_size=64, width=24, embed_dim=128),
    "tiny": IdentityNetConfig(input_size=16, width=4, embed_dim=16),
}
