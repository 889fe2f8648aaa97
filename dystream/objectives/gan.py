"""Relativistic pairing GAN with R1/R2 penalties, as used in StreamAvatar's adversarial refinement (§3.1.2).

StreamAvatar trains the student "using a relativistic adversarial loss [16] and R1/R2 gradient penalty [26],
as proposed in [13, 20]" (R3GAN, APT). With ``D`` the consistency-aware discriminator and a real clip paired
with the fake clip generated from the *same* reference and audio (notes/distillation.md §7, §13):

* discriminator: ``L_D = softplus(-(D(real) - D(fake)))``
* generator:     ``L_G = softplus(-(D(fake) - D(real)))``

applied to each logit pair: the per-frame logits of frame i (local realism) and the clip logits (global
consistency), combined as ``frame_weight * mean_{b, i} + global_weight * mean_b`` (:func:`pairing_loss`). The
generator loss is the discriminator loss with real and fake swapped.

Zero-centred gradient penalties (Mescheder et al. 2018; R3GAN) on the discriminator's scalar score per sample
``s(x) = frame_weight * mean_i l_i(x) + global_weight * l_global(x)`` (:func:`discriminator_score`, the
function the loss sees), with respect to the generated latent frames of its (noisy) input:

* exact (R3GAN ``ZeroCenteredGradientPenalty``): ``(gamma / 2) E_b ||grad_x s(x_b)||^2``, the squared norm summed
  over all input elements of a sample, by double backward (:func:`gradient_penalty`). R1 on real inputs, R2 on
  fake ones. The forward must run inside :func:`double_backward_attention` (fused attention kernels have no
  second derivative). The penalty is *not* detached (R3GAN issue #20: detaching makes it a constant).
* finite difference (APT's approximated R1, Self-Forcing ``model/gan.py``), for large or sharded models where
  double backward through FlashAttention/FSDP is impractical: ``lambda E_b ((s(x_b + sigma eps) - s(x_b)) / sigma)^2``
  with ``eps ~ N(0, I)`` (:func:`finite_difference_penalty`). Since ``E_eps (grad s . eps)^2 = ||grad s||^2``,
  it estimates the exact penalty with ``lambda = gamma / 2`` as sigma -> 0 (its bias is O(sigma^2): the
  odd Gaussian moments cancel). Self-Forcing adds ``0.5 (r1 + r2)`` with ``r = lambda mean(...)``, so its
  ``lambda`` plays R3GAN's ``gamma``; the GAN stage keeps ``gamma`` as the one knob of both modes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from dystream.models.discriminator import DiscriminatorOutput

__all__ = [
    "relativistic_pairing",
    "pairing_loss",
    "discriminator_loss",
    "generator_loss",
    "discriminator_score",
    "discriminator_accuracy",
    "gradient_penalty",
    "finite_difference_penalty",
    "double_backward_attention",
]


def relativistic_pairing(pos: Tensor, neg: Tensor) -> Tensor:
    """Elementwise ``softplus(-(pos - neg))`` (float32 or wider): small when ``pos`` beats ``neg``."""
    diff = pos - neg
    if diff.dtype in (torch.float16, torch.bfloat16):
        diff = diff.float()
    return torch.nn.functional.softplus(-diff)


def pairing_loss(
    pos: DiscriminatorOutput,
    neg: DiscriminatorOutput,
    frame_weight: float = 1.0,
    global_weight: float = 1.0,
) -> Tensor:
    """``frame_weight * mean softplus(-(pos_i - neg_i)) + global_weight * mean softplus(-(pos_g - neg_g))``.

    ``pos`` and ``neg`` are the discriminator's outputs on paired clips (same reference, audio, sigma and noise);
    frame i of one is paired with frame i of the other. The global term is skipped when the branch is off.
    """
    if pos.frame_logits.shape != neg.frame_logits.shape:
        raise ValueError(
            f"pairing_loss: paired clips need the same frame logits shape, got {tuple(pos.frame_logits.shape)} "
            f"and {tuple(neg.frame_logits.shape)}"
        )
    if (pos.global_logit is None) != (neg.global_logit is None):
        raise ValueError("pairing_loss: one output has a global logit and the other not")
    loss = frame_weight * relativistic_pairing(pos.frame_logits, neg.frame_logits).mean()
    if pos.global_logit is not None and global_weight:
        loss = loss + global_weight * relativistic_pairing(pos.global_logit, neg.global_logit).mean()
    return loss


def discriminator_loss(
    real: DiscriminatorOutput, fake: DiscriminatorOutput, frame_weight: float = 1.0, global_weight: float = 1.0
) -> Tensor:
    """``L_D``: real should score above its paired fake (R3GAN, relativistic pairing)."""
    return pairing_loss(real, fake, frame_weight, global_weight)


def generator_loss(
    real: DiscriminatorOutput, fake: DiscriminatorOutput, frame_weight: float = 1.0, global_weight: float = 1.0
) -> Tensor:
    """``L_G``: the fake should score above its paired real; ``L_D`` with real and fake swapped."""
    return pairing_loss(fake, real, frame_weight, global_weight)


def discriminator_score(out: DiscriminatorOutput, frame_weight: float = 1.0, global_weight: float = 1.0) -> Tensor:
    """The scalar the penalties and the accuracy look at, per sample ``[B]``: the loss's weighted logits."""
    score = frame_weight * out.frame_logits.mean(dim=1)
    if out.global_logit is not None and global_weight:
        score = score + global_weight * out.global_logit
    return score


@torch.no_grad()
def discriminator_accuracy(real_score: Tensor, fake_score: Tensor) -> Tensor:
    """Fraction of pairs where the real clip scores above its fake (0.5 = D cannot tell, 1 = D always can)."""
    return (real_score > fake_score).float().mean()


def gradient_penalty(score: Tensor, x: Tensor, gamma: float) -> Tensor:
    """Exact R1 (``x`` real) or R2 (``x`` fake): ``(gamma / 2) mean_b ||d score_b / d x_b||^2``.

    Args:
        score: ``[B]`` discriminator scores computed from ``x`` (which must require grad); samples independent.
        x: the input the gradient is taken with respect to, e.g. the generated frames of the noisy latents.
        gamma: R3GAN's gamma.

    The graph of the gradient is kept (``create_graph=True``) so the penalty trains the discriminator.
    """
    if not x.requires_grad:
        raise ValueError("gradient_penalty: x must require grad and score must be computed from it")
    if score.ndim != 1 or score.shape[0] != x.shape[0]:
        raise ValueError(f"gradient_penalty: score must be [B={x.shape[0]}], got {tuple(score.shape)}")
    (grad,) = torch.autograd.grad(score.sum(), x, create_graph=True)
    norm2 = grad.pow(2).flatten(1).sum(1)  # per sample, summed over all input elements (R3GAN)
    return gamma / 2 * norm2.mean()


def finite_difference_penalty(
    score_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    weight: float,
    sigma: float = 0.01,
    score_x: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Approximated R1/R2 (APT): ``weight * mean_b ((s(x_b + sigma eps_b) - s(x_b)) / sigma)^2``.

    Args:
        score_fn: ``x -> [B]`` discriminator scores.
        x: the (detached) input, e.g. the generated frames of the noisy latents.
        weight: lambda; ``gamma / 2`` estimates :func:`gradient_penalty` with ``gamma``.
        sigma: perturbation size (Self-Forcing default 0.01).
        score_x: ``s(x)`` if already computed (the loss's forward), saving one forward; it keeps its graph.
        noise: ``eps`` of x's shape (default: drawn from ``generator``). A leading extra dimension ``[K, *x.shape]``
            averages over K draws (used by tests to approach the expectation).
    """
    if not sigma > 0:
        raise ValueError(f"finite_difference_penalty: sigma must be > 0, got {sigma}")
    x = x.detach()
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x.device, x.dtype)
    draws = noise if noise.dim() == x.dim() + 1 else noise.unsqueeze(0)
    if draws.shape[1:] != x.shape:
        raise ValueError(f"finite_difference_penalty: noise {tuple(noise.shape)} does not match x {tuple(x.shape)}")
    base = score_fn(x) if score_x is None else score_x
    terms = [((score_fn(x + sigma * eps) - base) / sigma).pow(2).mean() for eps in draws]
    return weight * torch.stack(terms).mean()


def double_backward_attention() -> AbstractContextManager:
    """Context for forwards whose gradient is differentiated again (exact R1/R2): the math SDPA kernel.

    PyTorch's fused attention kernels (flash, memory-efficient, the CPU flash kernel) have no second derivative
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
    """
    return sdpa_kernel([SDPBackend.MATH])
