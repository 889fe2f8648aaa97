"""Rectified-flow (flow-matching) schedule: timestep shift, sigma sampling, sigma grids, noising.

Conventions (docs/architecture.md, "Timesteps"; notes/distillation.md §13, the Wan convention):

- sigma in [0, 1]; sigma = 1 is pure noise, sigma = 0 is clean data.
- ``x_sigma = (1 - sigma) * x0 + sigma * eps`` (a straight path from data to noise).
- the network predicts the velocity ``v = eps - x0``, so ``x0 = x_sigma - sigma * v``.
- sigma is given per latent frame, ``[B, F]``, and broadcast over latents ``[B, C, F, h, w]``;
  a per-sample sigma ``[B]`` or a scalar broadcasts over everything. The reference latent frame
  (frame 0) always has sigma 0.

All functions are pure; randomness comes only from an explicit ``torch.Generator``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SigmaDistribution = Literal["uniform", "logit_normal"]


# ---------------------------------------------------------------------------------------------
# Timestep shift
# ---------------------------------------------------------------------------------------------


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """Timestep shift ``sigma' = s * sigma / (1 + (s - 1) * sigma)`` (SD3 / Wan, notes §13).

    For s > 1 it moves every sigma towards 1 (more time at high noise, which large latents need);
    it is monotone increasing on [0, 1] and keeps both endpoints: shift(0) = 0, shift(1) = 1.
    s = 1 is the identity. Wan2.2-TI2V-5B samples with s = 5 (notes §5).
    """
    if not shift > 0:
        raise ValueError(f"shift_sigma: shift must be > 0, got {shift}")
    sigma = torch.as_tensor(sigma)
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """Inverse of :func:`shift_sigma` (the shift with ``1 / s``)."""
    return shift_sigma(sigma, 1.0 / shift)


# ---------------------------------------------------------------------------------------------
# Training sigmas
# ---------------------------------------------------------------------------------------------


def sample_training_sigma(
    batch_size: int,
    *,
    distribution: SigmaDistribution = "logit_normal",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One training sigma per sample, ``[B]``, in (0, 1).

    ``uniform`` draws sigma ~ U(0, 1); ``logit_normal`` draws sigma = sigmoid(N(mean, std)) (SD3's
    logit-normal sampling, which concentrates training on mid noise levels). The timestep shift is
    applied afterwards, so training sees the same warped noise levels as the shifted sampler.
    """
    if batch_size <= 0:
        raise ValueError(f"sample_training_sigma: batch_size must be > 0, got {batch_size}")
    if distribution == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device)
    elif distribution == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"sample_training_sigma: logit_std must be > 0, got {logit_std}")
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator, device=device))
    else:
        raise ValueError(
            f"sample_training_sigma: distribution must be 'uniform' or 'logit_normal', got {distribution!r}"
        )
    return shift_sigma(u, shift)


# ---------------------------------------------------------------------------------------------
# Sampling grids
# ---------------------------------------------------------------------------------------------


def sampling_sigmas(num_steps: int, shift: float = 1.0, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The N-step sampling grid ``[N + 1]``: shift(linspace(1, 0, N + 1)), from exactly 1 down to exactly 0.

    Kept in float64 by default: the grid is tiny and exact grid values make the student's timesteps
    land exactly on teacher steps (see :func:`nearest_step_indices`).
    """
    if num_steps < 1:
        raise ValueError(f"sampling_sigmas: num_steps must be >= 1, got {num_steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype), shift)


def student_sigmas(num_steps: int = 3, shift: float = 5.0, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The few-step student's denoising sigmas ``[N]``, starting at 1 (pure noise), without the final 0.

    Self-Forcing's ``warp_denoising_step`` (notes §1.3): the uniform list ``[1000, 750, 500, 250]``
    is mapped onto the shifted scheduler, i.e. sigma_k = shift(1 - k / N). StreamAvatar uses N = 3
    (§4.1), giving shift([1, 2/3, 1/3]). The student denoises to x0 at each of them and re-noises
    the prediction to the next one; ODE-pair recording stores the teacher's states at these sigmas.
    """
    return sampling_sigmas(num_steps, shift, dtype=dtype)[:-1]


def nearest_step_indices(grid: Tensor, targets: Tensor, *, atol: float | None = 1e-6) -> list[int]:
    """Indices i of ``grid`` (a decreasing sigma grid ``[N + 1]``) with grid[i] closest to each target.

    Used to record a teacher trajectory at the student's sigmas. With the same shift and a teacher
    step count divisible by the student's, every target lies exactly on the grid; ``atol`` makes a
    mismatch an error instead of a silent approximation (pass ``atol=None`` to accept the nearest).
    """
    if grid.ndim != 1 or targets.ndim != 1:
        raise ValueError(
            f"nearest_step_indices: grid and targets must be 1-D, got {tuple(grid.shape)} and {tuple(targets.shape)}"
        )
    dist = (grid.to(torch.float64)[None, :] - targets.to(torch.float64)[:, None]).abs()
    best, idx = dist.min(dim=1)
    if atol is not None and bool((best > atol).any()):
        bad = [(float(t), float(grid[i])) for t, i, b in zip(targets, idx, best, strict=True) if b > atol]
        raise ValueError(
            f"nearest_step_indices: targets not on the sampling grid (target, nearest): {bad}; use the same shift "
            "and a teacher step count divisible by the student's, or pass atol=None to accept the nearest steps"
        )
    return [int(i) for i in idx]


# ---------------------------------------------------------------------------------------------
# Broadcasting and the path
# ---------------------------------------------------------------------------------------------


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast sigma over latents ``x [B, C, F, h, w]``.

    Accepted: a scalar; ``[B]`` (one sigma per sample); ``[B, F]`` (one sigma per latent frame,
    the DiT contract). Anything else is an error rather than a guess.
    """
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.to(x.dtype)
    if sigma.ndim == 0:
        return sigma
    if x.ndim != 5:
        raise ValueError(f"expand_sigma: latents must be [B, C, F, h, w], got shape {tuple(x.shape)}")
    b, _, f = x.shape[:3]
    if sigma.shape == (b,):
        return sigma.view(b, 1, 1, 1, 1)
    if sigma.shape == (b, f):
        return sigma.view(b, 1, f, 1, 1)
    raise ValueError(
        f"expand_sigma: sigma must be a scalar, [B]={b} or [B, F]=[{b}, {f}] for latents {tuple(x.shape)}, "
        f"got {tuple(sigma.shape)}"
    )


def frame_sigmas(sigma: Tensor, num_frames: int, num_clean_frames: int = 1) -> Tensor:
    """Per-frame sigmas ``[B, F]`` from per-sample sigmas ``[B]``: the first ``num_clean_frames``
    (the reference, latent frame 0) get sigma 0, all others the sample's sigma."""
    if sigma.ndim != 1:
        raise ValueError(f"frame_sigmas: sigma must be [B], got {tuple(sigma.shape)}")
    if not 0 <= num_clean_frames < num_frames:
        raise ValueError(f"frame_sigmas: need 0 <= num_clean_frames < num_frames, got {num_clean_frames}, {num_frames}")
    out = sigma[:, None].expand(sigma.shape[0], num_frames).clone()
    out[:, :num_clean_frames] = 0
    return out


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma eps``; exactly x0 where sigma = 0."""
    if x0.shape != eps.shape:
        raise ValueError(f"add_noise: x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape")
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The flow-matching regression target ``v = eps - x0`` (d x_sigma / d sigma)."""
    if x0.shape != eps.shape:
        raise ValueError(f"velocity_target: x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape")
    return eps - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Clean estimate ``x0 = x_sigma - sigma v`` (notes §13)."""
    return x_t - expand_sigma(sigma, x_t) * v


def eps_from_velocity(x_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Noise estimate ``eps = x_sigma + (1 - sigma) v``."""
    return x_t + (1 - expand_sigma(sigma, x_t)) * v


def velocity_from_x0(x_t: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Velocity of the straight path through x_t that ends at x0: ``v = (x_t - x0) / sigma`` (sigma > 0)."""
    s = expand_sigma(sigma, x_t)
    if bool((s <= 0).any()):
        raise ValueError("velocity_from_x0: sigma must be > 0 (the velocity is undefined at clean frames)")
    return (x_t - x0) / s
