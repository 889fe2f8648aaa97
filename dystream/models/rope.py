"""3-D rotary position embedding in the Wan2.2 layout, driven by explicit integer frame positions.

Wan2.2 (`wan/modules/model.py`) splits the ``c = head_dim / 2`` complex pairs of every attention head into a
temporal group of ``c - 2 (c // 3)`` pairs and two spatial groups (height, width) of ``c // 3`` pairs each; each
group rotates with the classic RoPE frequencies ``theta ** (-2i / d_group)`` and adjacent channels ``(2i, 2i + 1)``
form one pair. Its tables hold 1024 positions per axis. We keep exactly that layout, so the official weights see
the rotations they were trained with, but positions are *given* rather than implied by the token order: the
block-causal student re-indexes frames per query chunk (RAPR, StreamAvatar §3.1.1) and the streaming cache
applies RoPE at attention time to keys it stored un-rotated.

Positions are integers and index precomputed tables (computed in float64, as Wan does, then stored in float32),
so every code path that asks for the same position gets bit-identical rotations. An index beyond the table is
refused with a clear error instead of silently wrapping or crashing deep inside a reshape.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Rope3D:
    """RoPE tables for one head size; not an ``nn.Module`` so it never appears in a state dict.

    Args:
        head_dim: channels per attention head (even, >= 6 so that every axis gets at least one pair).
        max_positions: table length per axis (Wan2.2: 1024); the largest usable index is ``max_positions - 1``.
        theta: RoPE base (Wan2.2: 10000).
    """

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0) -> None:
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(f"Rope3D: head_dim must be even and >= 6, got {head_dim}")
        if max_positions < 1:
            raise ValueError(f"Rope3D: max_positions must be >= 1, got {max_positions}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        c = head_dim // 2
        self.pairs = (c - 2 * (c // 3), c // 3, c // 3)  # (temporal, height, width) complex pairs
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _axis_angles(self, pairs: int) -> Tensor:
        # [P, pairs] float64 angles pos * theta^(-2i / (2 pairs)), Wan's rope_params for one axis
        exponent = torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs)
        inv_freq = 1.0 / torch.pow(torch.tensor(self.theta, dtype=torch.float64), exponent)
        return torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)

    def tables(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """cos and sin tables ``[max_positions, c]`` (float32), axes concatenated as (t, h, w)."""
        device = torch.device(device)
        if device not in self._tables:
            angles = torch.cat([self._axis_angles(p) for p in self.pairs], dim=1)
            self._tables[device] = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self._tables[device]

    def check(self, positions: Tensor | list[int], what: str = "frame") -> None:
        """Raise if any temporal/spatial index is outside the table (``0 .. max_positions - 1``)."""
        if isinstance(positions, Tensor):
            if positions.numel() == 0:
                return
            lo, hi = int(positions.min()), int(positions.max())
        else:
            if not positions:
                return
            lo, hi = min(positions), max(positions)
        if lo < 0 or hi >= self.max_positions:
            raise ValueError(
                f"RoPE {what} index {hi if hi >= self.max_positions else lo} is outside the table of "
                f"{self.max_positions} positions (valid 0..{self.max_positions - 1}); enable RAPR "
                "(DiTConfig.rapr) for unbounded streams, or shorten the sequence / spatial grid"
            )

    def cos_sin(self, frame_pos: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Rotation factors for a frame-major token grid.

        Args:
            frame_pos: integer temporal positions, any shape ``[..., n]`` (one per latent frame).
            height, width: spatial token grid (after patching); spatial positions are ``0..h-1`` and ``0..w-1``.

        Returns:
            ``(cos, sin)`` each ``[..., n, height * width, c]`` float32, tokens ordered ``(h w)`` as the patch
            embedding flattens them.
        """
        self.check(frame_pos, "temporal")
        self.check([height - 1, width - 1], "spatial")
        cos_table, sin_table = self.tables(frame_pos.device)
        pt, ph, pw = self.pairs
        frame_pos = frame_pos.long()
        hh = torch.arange(height, device=frame_pos.device).repeat_interleave(width)  # [S] row of each token
        ww = torch.arange(width, device=frame_pos.device).repeat(height)  # [S] column of each token
        out = []
        for table in (cos_table, sin_table):
            t_part = table[frame_pos, :pt]  # [..., n, pt]
            h_part = table[hh, pt : pt + ph]  # [S, ph]
            w_part = table[ww, pt + ph :]  # [S, pw]
            spatial = torch.cat([h_part, w_part], dim=-1)  # [S, ph + pw]
            t_part = t_part.unsqueeze(-2).expand(*t_part.shape[:-1], height * width, pt)
            spatial = spatial.expand(*t_part.shape[:-1], ph + pw)
            out.append(torch.cat([t_part, spatial], dim=-1))
        return out[0], out[1]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x [..., S, H, d]`` by ``cos/sin [..., S, d/2]`` (broadcast over heads).

    Computed in float32 and returned in ``x``'s dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # [..., S, H, c, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., S, 1, c]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)
