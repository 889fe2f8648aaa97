"""Samplers over a narrow denoiser interface (k-diffusion style, DESIGN.md style rule 3).

A *denoiser* is any callable ``denoiser(x, sigma, cond) -> v``:

- ``x``: latents ``[B, C, F, h, w]``; latent frame 0 is the clean reference (docs/architecture.md);
- ``sigma``: per-frame noise levels ``[B, F]`` (0 for the reference frame);
- ``cond``: a dict of conditions; the audio conditions live under :data:`TALK_KEY` and
  :data:`LISTEN_KEY` (``[B, T, D]`` features per video frame, already routed by the speaking mask);
- returns the predicted velocity ``v = eps - x0``, same shape as ``x``.

Contract for classifier-free guidance: the unconditional call sets the audio keys to ``None``; a
denoiser must treat ``None`` exactly like all-zero features of that key. The teacher's condition
dropout (``dystream.objectives.flow_matching``) zeroes the dropped features, so the unconditional
branch seen at sampling time is the one trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dystream.diffusion.schedule import expand_sigma

TALK_KEY = "audio_talk"  # own-voice features x speaking mask -> the talk ("Audio") attention, paper §3.2
LISTEN_KEY = "audio_listen"  # partner features x (1 - mask) -> the "Interact Audio" attention, paper §3.2

Denoiser = Callable[[Tensor, Tensor, Mapping[str, Any]], Tensor]


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance over the audio conditions
# ---------------------------------------------------------------------------------------------


@dataclass
class AudioGuidance:
    """Classifier-free guidance over the talk and listen audio conditions.

    Joint mode (default; ``talk_scale`` and ``listen_scale`` unset):
        ``v = v_uncond + scale * (v_cond - v_uncond)``, the unconditional call having both audio
        keys set to None. ``scale = 1`` returns the conditional prediction and makes no extra call.
    Separate mode (``talk_scale`` and/or ``listen_scale`` set; ``scale`` must then stay 1):
        ``v = v_cond + (w_talk - 1) (v_cond - v_no_talk) + (w_listen - 1) (v_cond - v_no_listen)``,
        where ``v_no_talk`` drops only the talk key and ``v_no_listen`` only the listen key. Each
        direction is a guidance around the full conditional prediction, so the two scales act
        independently; a scale of 1 (or unset) skips its call.
    """

    scale: float = 1.0  # joint audio guidance scale (1 = no guidance)
    talk_scale: float | None = None  # separate guidance on the talk (own voice) audio
    listen_scale: float | None = None  # separate guidance on the listen (partner) audio
    talk_key: str = TALK_KEY
    listen_key: str = LISTEN_KEY

    def __post_init__(self) -> None:
        for name in ("scale", "talk_scale", "listen_scale"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"AudioGuidance.{name} must be >= 0, got {value}")
        if self.separate and self.scale != 1.0:
            raise ValueError(
                "AudioGuidance: set either the joint `scale` or the separate `talk_scale`/`listen_scale`, not both "
                f"(got scale={self.scale}, talk_scale={self.talk_scale}, listen_scale={self.listen_scale})"
            )
        if self.talk_key == self.listen_key:
            raise ValueError(f"AudioGuidance.talk_key and listen_key must differ, both are {self.talk_key!r}")

    @property
    def separate(self) -> bool:
        return self.talk_scale is not None or self.listen_scale is not None

    @property
    def is_identity(self) -> bool:
        """True when guidance reduces to the conditional prediction (one denoiser call)."""
        if self.separate:
            return (self.talk_scale in (None, 1.0)) and (self.listen_scale in (None, 1.0))
        return self.scale == 1.0

    def num_calls(self) -> int:
        """Denoiser calls per step."""
        if self.separate:
            return 1 + int(self.talk_scale not in (None, 1.0)) + int(self.listen_scale not in (None, 1.0))
        return 1 if self.scale == 1.0 else 2


def drop_keys(cond: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A copy of ``cond`` with ``keys`` set to None (the unconditional branch of CFG)."""
    out = dict(cond)
    for key in keys:
        out[key] = None
    return out


def guided_velocity(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor,
    cond: Mapping[str, Any],
    guidance: AudioGuidance | None = None,
) -> Tensor:
    """One guided velocity prediction (see :class:`AudioGuidance` for the formulas)."""
    g = guidance or AudioGuidance()
    v_cond = denoiser(x, sigma, cond)
    if g.is_identity:
        return v_cond
    if not g.separate:
        v_uncond = denoiser(x, sigma, drop_keys(cond, (g.talk_key, g.listen_key)))
        return v_uncond + g.scale * (v_cond - v_uncond)
    v = v_cond
    for key, w in ((g.talk_key, g.talk_scale), (g.listen_key, g.listen_scale)):
        if w is None or w == 1.0:
            continue
        v_drop = denoiser(x, sigma, drop_keys(cond, (key,)))
        v = v + (w - 1.0) * (v_cond - v_drop)
    return v


# ---------------------------------------------------------------------------------------------
# Euler ODE sampler
# ---------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """States recorded by :func:`sample_euler`.

    ``states[:, k]`` is the sampler state *before* step ``step_indices[k]`` (at noise level
    ``sigmas[k]``); the last entry is the final clean latent (sigma 0). This is the layout of
    CausVid / Self-Forcing ODE pairs (notes §1.3): noisy states at the student's timesteps + x0.
    """

    states: Tensor  # [B, K + 1, C, F, h, w]
    sigmas: Tensor  # [K + 1], the last one 0
    step_indices: list[int]  # [K], indices into the sampling grid


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    cond: Mapping[str, Any],
    sigmas: Tensor,
    *,
    guidance: AudioGuidance | None = None,
    num_clean_frames: int = 1,
    record_steps: Sequence[int] | None = None,
) -> tuple[Tensor, Trajectory | None]:
    """Euler integration of the flow ODE ``dx/dsigma = v`` along a decreasing sigma grid.

    Args:
        denoiser: velocity predictor, see the module docstring.
        x: start latents ``[B, C, F, h, w]``: frames ``[:num_clean_frames]`` hold the clean
            conditioning (the reference latent), the rest pure noise at ``sigmas[0]``.
        cond: conditions passed through to the denoiser (guidance drops the audio keys).
        sigmas: decreasing grid ``[N + 1]`` ending at 0, e.g. ``schedule.sampling_sigmas(N, shift)``.
        guidance: audio classifier-free guidance; None = conditional prediction only.
        num_clean_frames: leading frames kept bit-exactly equal to the input at sigma 0.
        record_steps: step indices in ``[0, N)`` at which to record the state (before the step);
            the final clean latent is always appended. None records nothing.

    Returns:
        ``(x0, trajectory)``: the sampled latents (clean frames untouched) and the recorded
        :class:`Trajectory` (None when ``record_steps`` is None).
    """
    if x.ndim != 5:
        raise ValueError(f"sample_euler: x must be [B, C, F, h, w], got {tuple(x.shape)}")
    b, _, f = x.shape[:3]
    if not 0 <= num_clean_frames < f:
        raise ValueError(f"sample_euler: need 0 <= num_clean_frames < F={f}, got {num_clean_frames}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sample_euler: sigmas must be a 1-D grid [N + 1] with N >= 1, got {tuple(sigmas.shape)}")
    if bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sample_euler: sigmas must decrease strictly and end at 0, got {sigmas.tolist()}")
    num_steps = sigmas.numel() - 1
    record = sorted(set(record_steps)) if record_steps is not None else None
    if record is not None and any(not 0 <= i < num_steps for i in record):
        raise ValueError(f"sample_euler: record_steps must lie in [0, {num_steps}), got {list(record_steps or [])}")

    clean = x[:, :, :num_clean_frames]
    # one grid value per frame; the clean frames stay at sigma 0 throughout
    frame_is_noisy = torch.ones(f, dtype=x.dtype, device=x.device)
    frame_is_noisy[:num_clean_frames] = 0
    states: list[Tensor] = []
    for i in range(num_steps):
        if record is not None and i in record:
            states.append(x)
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma = (frame_is_noisy * s.to(x.dtype)).expand(b, f)
        v = guided_velocity(denoiser, x, sigma, cond, guidance)
        dt = (s_next - s).to(x.dtype)
        x_noisy = x[:, :, num_clean_frames:] + dt * v[:, :, num_clean_frames:]
        # the reference is re-imposed bit-exactly (never integrated), as Wan's I2V sampler does (notes §5)
        x = torch.cat([clean, x_noisy], dim=2)
    if record is None:
        return x, None
    states.append(x)
    traj_sigmas = torch.cat([sigmas[list(record)], sigmas.new_zeros(1)])
    return x, Trajectory(states=torch.stack(states, dim=1), sigmas=traj_sigmas, step_indices=list(record))


def predict_x0(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor,
    cond: Mapping[str, Any],
    guidance: AudioGuidance | None = None,
) -> Tensor:
    """Guided clean estimate ``x0 = x - sigma v`` at per-frame ``sigma [B, F]`` (clean frames pass through)."""
    v = guided_velocity(denoiser, x, sigma, cond, guidance)
    return x - expand_sigma(sigma, x) * v
