"""Small shared building blocks (norms and the timestep embedding) in the numerics of Wan2.2.

Wan2.2 (`wan/modules/model.py`) computes its norms in float32 and casts back, and embeds timesteps with a
float64 sinusoid ``[cos | sin]``; we follow both so that the official weights behave the same in low precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 (parameter ``weight``, as Wan's ``norm_q``/``norm_k``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32; no parameters unless ``affine`` (Wan: norm1/norm2 plain, norm3 affine)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        # the affine parameters join in float32 too, so a model cast to bf16 as a whole still normalises in float32
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """``t [...] -> [..., dim]`` float32 embedding ``[cos(t w_i) | sin(t w_i)]``, ``w_i = 10000^(-i / (dim/2))``.

    Computed in float64 (timesteps reach 1000, float32 phases would lose digits) like Wan2.2.
    """
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
    half = dim // 2
    t64 = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t64.unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()
