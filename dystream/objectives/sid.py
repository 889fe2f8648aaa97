"""Score identity Distillation (SiD) for a flow-matching teacher, as used in StreamAvatar stage 1.

StreamAvatar §3.1.1 distils the bidirectional teacher into the block-causal student with SiD
(Zhou et al., ICML 2024) under student forcing. With ``x_g`` the student's sample, noised to
``x_sigma = (1 - sigma) x_g + sigma eps``, ``f_real`` the teacher's (CFG-guided) x0 prediction and
``f_fake`` the fake score's x0 prediction, the generator loss per element is

    L = (f_real - f_fake) * [(f_real - x_g) - alpha (f_real - f_fake)] * w

with the weighting ``w`` either

- ``"legacy"``: ``1 / mean|x_g - f_real|`` per sample, computed without gradient (SiD
  ``training/sid_loss.py``, Self-Forcing ``model/sid.py``), or
- ``"one_minus_sigma"``: ``1 - sigma`` (SiD for flow models, ``ml-sid-dit``).

Gradients flow into ``x_g`` through all three terms (``x_g`` itself and both score networks'
inputs); the score networks' *parameters* must be frozen by the caller during the generator
update. The loss is computed in float64 (notes §13) and averaged. ``alpha`` = 1 (Self-Forcing) or
1.2 (SiD). The fake score itself is trained with the flow-matching velocity loss on detached
student samples (:func:`fake_score_loss`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SiDWeighting = Literal["legacy", "one_minus_sigma"]


def sid_weight(
    x_g: Tensor,
    f_real: Tensor,
    sigma: Tensor,
    weighting: SiDWeighting,
    selector: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """The per-sample (broadcastable) weight ``w`` of the SiD generator loss; never carries gradient.

    ``selector`` (float, broadcastable to ``x_g``) restricts the legacy mean to the frames with a loss.
    """
    with torch.no_grad():
        if weighting == "legacy":
            dims = tuple(range(1, x_g.ndim))
            diff = (x_g - f_real).abs().double()
            if selector is None:
                mean = diff.mean(dim=dims, keepdim=True)
            else:
                sel = selector.double().expand_as(diff)
                mean = (diff * sel).sum(dim=dims, keepdim=True) / sel.sum(dim=dims, keepdim=True).clamp_min(1)
            return 1.0 / mean.clamp_min(eps)
        if weighting == "one_minus_sigma":
            return 1.0 - sigma.double()
    raise ValueError(f"sid weighting must be 'legacy' or 'one_minus_sigma', got {weighting!r}")


def sid_generator_loss(
    x_g: Tensor,
    f_real: Tensor,
    f_fake: Tensor,
    sigma: Tensor,
    alpha: float = 1.0,
    weighting: SiDWeighting = "legacy",
    frame_mask: Tensor | None = None,
) -> Tensor:
    """SiD generator loss (module docstring), float64, mean over the selected elements.

    Args:
        x_g: student sample ``[B, C, F, h, w]`` (with gradient).
        f_real: teacher x0 prediction at ``x_sigma`` (CFG-guided), same shape.
        f_fake: fake-score x0 prediction at the same ``x_sigma``, same shape.
        sigma: noise level broadcastable to ``x_g`` (e.g. ``[B, 1, F, 1, 1]``).
        alpha: SiD's alpha.
        weighting: ``"legacy"`` or ``"one_minus_sigma"``.
        frame_mask: optional ``[F]`` or ``[B, F]`` boolean, frames that carry the loss (e.g. not
            the reference frame, only the chunks chosen for gradient).
    """
    if not (x_g.shape == f_real.shape == f_fake.shape):
        raise ValueError(f"sid_generator_loss: shapes differ {x_g.shape}, {f_real.shape}, {f_fake.shape}")
    x, real, fake = x_g.double(), f_real.double(), f_fake.double()
    sigma = torch.as_tensor(sigma, device=x.device).double()
    sel = None if frame_mask is None else _frame_selector(frame_mask, x)
    weight = sid_weight(x, real, sigma, weighting, selector=sel)
    per_element = (real - fake) * ((real - x) - alpha * (real - fake)) * weight
    if sel is None:
        return per_element.mean()
    return (per_element * sel).sum() / sel.expand_as(per_element).sum().clamp_min(1)


def _frame_selector(frame_mask: Tensor, x: Tensor) -> Tensor:
    """``[F]`` or ``[B, F]`` mask -> float ``[B or 1, 1, F, 1, 1]`` selector for ``[B, C, F, h, w]``."""
    m = frame_mask.to(device=x.device, dtype=x.dtype)
    if m.ndim == 1:
        m = m[None]
    if m.shape[-1] != x.shape[2]:
        raise ValueError(f"frame_mask has {m.shape[-1]} frames, sample has {x.shape[2]}")
    return m[:, None, :, None, None]


def fake_score_loss(v_fake: Tensor, x_g: Tensor, eps: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """Flow-matching loss of the fake score on a detached student sample: ``mean((v_fake - (eps - x_g))^2)``."""
    target = eps - x_g.detach()
    err = (v_fake.float() - target.float()) ** 2
    if frame_mask is None:
        return err.mean()
    sel = _frame_selector(frame_mask, err)
    return (err * sel).sum() / sel.expand_as(err).sum().clamp_min(1)
