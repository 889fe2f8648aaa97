"""Relativistic pairing losses and R1/R2 penalties (exact and finite-difference) against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from dystream.models.discriminator import ConsistencyAwareDiscriminator, DiscriminatorConfig, DiscriminatorOutput
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.objectives.gan import (
    discriminator_accuracy,
    discriminator_loss,
    discriminator_score,
    double_backward_attention,
    finite_difference_penalty,
    generator_loss,
    gradient_penalty,
    pairing_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP hand-offs that dominate (tens of times slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _out(frames: torch.Tensor, glob: torch.Tensor | None) -> DiscriminatorOutput:
    return DiscriminatorOutput(frames, glob, torch.zeros(frames.shape[0], frames.shape[1] + 1, 1))


class SmoothD(torch.nn.Module):
    """A small smooth discriminator with a hand-written input gradient: ``s(x) = sum_j a_j tanh(w_j . x + b_j)``."""

    def __init__(self, dim: int, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=torch.float64) / math.sqrt(dim))
        self.b = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, ...] -> [B]
        return (torch.tanh(x.flatten(1) @ self.w.T + self.b) * self.a).sum(1)

    @torch.no_grad()
    def grad(self, x: torch.Tensor) -> torch.Tensor:  # d s / d x, by hand
        t = torch.tanh(x.flatten(1) @ self.w.T + self.b)
        return (((1 - t**2) * self.a) @ self.w).view_as(x)


# -------------------------------------------------------------------------------------------- pairing losses
def test_relativistic_losses_sign_and_symmetry():
    g = torch.Generator().manual_seed(0)
    real = _out(torch.randn(4, 3, generator=g), torch.randn(4, generator=g))
    fake = _out(torch.randn(4, 3, generator=g), torch.randn(4, generator=g))
    # swapping real and fake swaps the two losses
    torch.testing.assert_close(discriminator_loss(real, fake), generator_loss(fake, real))
    torch.testing.assert_close(generator_loss(real, fake), discriminator_loss(fake, real))
    # equal logits: log 2 per term
    torch.testing.assert_close(discriminator_loss(real, real, 1.0, 0.5), torch.tensor(1.5 * math.log(2)))
    # the D loss falls (and the G loss rises) as real logits rise above fake ones
    d_losses, g_losses = [], []
    for margin in (-2.0, -0.5, 0.0, 0.5, 2.0, 5.0):
        shifted = _out(fake.frame_logits + margin, fake.global_logit + margin)
        d_losses.append(float(discriminator_loss(shifted, fake)))
        g_losses.append(float(generator_loss(shifted, fake)))
    assert all(a > b for a, b in zip(d_losses, d_losses[1:], strict=False))
    assert all(a < b for a, b in zip(g_losses, g_losses[1:], strict=False))
    # gradient directions: D pushes real up and fake down, G pushes fake up
    r = real.frame_logits.clone().requires_grad_()
    f = fake.frame_logits.clone().requires_grad_()
    discriminator_loss(_out(r, None), _out(f, None)).backward()
    assert (r.grad < 0).all() and (f.grad > 0).all()
    f2 = fake.frame_logits.clone().requires_grad_()
    generator_loss(_out(real.frame_logits, None), _out(f2, None)).backward()
    assert (f2.grad < 0).all()


def test_pairing_loss_weights_and_pairs_frames_in_place():
    real = _out(torch.tensor([[2.0, -1.0]]), torch.tensor([0.5]))
    fake = _out(torch.tensor([[0.0, 1.0]]), torch.tensor([1.5]))
    sp = torch.nn.functional.softplus
    expected = 0.3 * (sp(torch.tensor(-2.0)) + sp(torch.tensor(2.0))) / 2 + 0.7 * sp(torch.tensor(1.0))
    torch.testing.assert_close(pairing_loss(real, fake, 0.3, 0.7), expected)
    torch.testing.assert_close(
        pairing_loss(real, fake, 0.3, 0.0), 0.3 * (sp(torch.tensor(-2.0)) + sp(torch.tensor(2.0))) / 2
    )
    no_global = _out(real.frame_logits, None)
    with pytest.raises(ValueError, match="global logit"):
        pairing_loss(no_global, fake)
    with pytest.raises(ValueError, match="same frame logits shape"):
        pairing_loss(_out(torch.zeros(1, 3), None), _out(torch.zeros(1, 2), None))


def test_score_and_accuracy():
    out = _out(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(discriminator_score(out, 1.0, 0.5), torch.tensor([3.0, -0.5]))
    torch.testing.assert_close(discriminator_score(_out(out.frame_logits, None), 1.0, 0.5), torch.tensor([2.0, 0.0]))
    acc = discriminator_accuracy(torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert float(acc) == 0.5


# -------------------------------------------------------------------------------------------- exact R1 / R2
def test_exact_penalty_equals_the_hand_written_gradient_norm():
    d = SmoothD(dim=12)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    gamma = 0.7
    xg = x.clone().requires_grad_()
    penalty = gradient_penalty(d(xg), xg, gamma)
    expected = gamma / 2 * d.grad(x).pow(2).flatten(1).sum(1).mean()  # summed per sample, mean over the batch
    torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=1e-14)
    # and against central differences of s itself
    h = 1e-6
    fd = torch.zeros_like(x)
    for i in range(x[0].numel()):
        e = torch.zeros(x[0].numel(), dtype=torch.float64)
        e[i] = h
        e = e.view_as(x[0])
        fd.view(5, -1)[:, i] = (d(x + e) - d(x - e)) / (2 * h)
    torch.testing.assert_close(fd, d.grad(x), rtol=1e-6, atol=1e-9)


def test_exact_penalty_trains_the_discriminator_through_its_gradient():
    """create_graph=True: d(penalty)/d(params) matches central differences of the penalty in parameter space."""
    d = SmoothD(dim=6)
    x = torch.randn(4, 6, dtype=torch.float64)

    def penalty() -> torch.Tensor:
        xg = x.clone().requires_grad_()
        return gradient_penalty(d(xg), xg, 1.3)

    penalty().backward()
    analytic = d.w.grad.clone()
    assert analytic.abs().sum() > 0
    direction = torch.randn_like(d.w)
    h = 1e-6
    with torch.no_grad():
        d.w.add_(h * direction)
    up = penalty().detach()
    with torch.no_grad():
        d.w.sub_(2 * h * direction)
    down = penalty().detach()
    torch.testing.assert_close((up - down) / (2 * h), (analytic * direction).sum(), rtol=1e-6, atol=1e-10)


def test_exact_penalty_needs_an_input_that_requires_grad():
    d = SmoothD(dim=4)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="require grad"):
        gradient_penalty(d(x), x, 1.0)


# -------------------------------------------------------------------------------------------- finite differences
def test_finite_difference_penalty_approaches_the_exact_one_as_sigma_shrinks():
    """E_eps ((s(x + sigma eps) - s(x)) / sigma)^2 -> ||grad s||^2. With the fixed, antithetic eps set
    {+-sqrt(d) e_i} the sample mean of (grad s . eps)^2 is exactly ||grad s||^2, so the remaining error is the
    finite-difference bias alone, and it shrinks with sigma."""
    dim = 10
    d = SmoothD(dim=dim, seed=1)
    x = torch.randn(3, dim, dtype=torch.float64)
    gamma = 2.0
    xg = x.clone().requires_grad_()
    exact = gradient_penalty(d(xg), xg, gamma).detach()
    basis = math.sqrt(dim) * torch.eye(dim, dtype=torch.float64)
    eps = torch.cat([basis, -basis])[:, None, :].expand(2 * dim, 3, dim)  # [K, B, dim], the same set per sample
    errors = []
    for sigma in (1e-1, 1e-2, 1e-3):
        approx = finite_difference_penalty(d, x, gamma / 2, sigma, noise=eps).detach()
        errors.append(abs(float(approx - exact)) / float(exact))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[1] < 1e-2 and errors[2] < 1e-4, errors
    # Gaussian eps (what training draws): within Monte-Carlo error of the exact penalty
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(20000, 3, dim, generator=g, dtype=torch.float64)
    approx = finite_difference_penalty(d, x, gamma / 2, 1e-3, noise=gauss).detach()
    torch.testing.assert_close(approx, exact, rtol=0.03, atol=0)


def test_finite_difference_penalty_reuses_the_loss_forward_and_trains_d():
    d = SmoothD(dim=5)
    x = torch.randn(4, 5, dtype=torch.float64)
    eps = torch.randn(4, 5, dtype=torch.float64)
    calls = []

    def score_fn(z):
        calls.append(z)
        return d(z)

    score_x = d(x)
    p = finite_difference_penalty(score_fn, x, 0.5, 1e-2, score_x=score_x, noise=eps)
    assert len(calls) == 1  # only the perturbed input; s(x) came from the loss's forward
    expected = 0.5 * (((d(x + 1e-2 * eps) - d(x)) / 1e-2) ** 2).mean()
    torch.testing.assert_close(p, expected)
    p.backward()
    assert d.w.grad is not None and d.w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sigma"):
        finite_difference_penalty(d, x, 1.0, 0.0)
    with pytest.raises(ValueError, match="does not match"):
        finite_difference_penalty(d, x, 1.0, 0.1, noise=torch.randn(4, 6, dtype=torch.float64))


# -------------------------------------------------------------------------------------------- on the real discriminator
def test_penalties_on_the_tiny_discriminator():
    """Exact R1 through the DiT backbone (double backward inside ``double_backward_attention``) equals the
    squared norm of the input gradient computed by a plain first-order backward, and the gradient itself
    matches central differences along random directions; the finite-difference penalty with the same eps tracks
    the directional derivatives ever closer as sigma shrinks."""
    torch.manual_seed(0)
    backbone = AvatarDiT(DiTConfig.from_preset("tiny"))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    disc = ConsistencyAwareDiscriminator.from_backbone(backbone, DiscriminatorConfig.from_preset("tiny"))
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 16, 1, 8, 8, generator=g)
    gen = torch.randn(2, 16, 3, 8, 8, generator=g)
    sigma = torch.full((2, 4), 0.5)
    sigma[:, 0] = 0

    def score_fn(z: torch.Tensor) -> torch.Tensor:
        return discriminator_score(disc(torch.cat([ref, z], dim=2), sigma))

    gen_g = gen.clone().requires_grad_()
    with double_backward_attention():
        penalty = gradient_penalty(score_fn(gen_g), gen_g, 2.0)
        penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.qformers.parameters())

    gen_1 = gen.clone().requires_grad_()
    (grad,) = torch.autograd.grad(score_fn(gen_1).sum(), gen_1)  # first order, any attention kernel
    torch.testing.assert_close(penalty.detach(), grad.pow(2).flatten(1).sum(1).mean(), rtol=1e-5, atol=1e-10)
    # float32 (the DiT computes its norms in float32 and cannot run in float64): loose tolerances
    eps = torch.randn(4, *gen.shape, generator=g)
    directional = torch.stack([(grad * e).flatten(1).sum(1) for e in eps])  # [K, B]
    with torch.no_grad():
        h = 1e-2
        central = torch.stack([(score_fn(gen + h * e) - score_fn(gen - h * e)) / (2 * h) for e in eps])
        torch.testing.assert_close(central, directional, rtol=2e-2, atol=1e-4)
        target = directional.pow(2).mean()
        errors = [
            abs(float(finite_difference_penalty(score_fn, gen, 1.0, s, noise=eps)) - float(target))
            for s in (1e-1, 1e-2)
        ]
    assert errors[1] < errors[0], errors
    assert errors[1] < 0.05 * float(target), (errors, float(target))


def test_gan_pulls_a_shifted_generator_onto_the_data():
    """End to end on a toy problem: real clips are N(0, I) latents, the generator adds a learnable per-channel
    offset (|b| = 4 at the start). Alternating D steps (relativistic loss + exact R1/R2) and G steps (D frozen),
    with real and fake noised at the same sigma with the same noise, remove the offset."""
    torch.manual_seed(0)
    backbone = AvatarDiT(DiTConfig.from_preset("tiny", audio_attention=False))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    disc = ConsistencyAwareDiscriminator.from_backbone(backbone)
    for m in disc.unused_modules():
        m.requires_grad_(False)
    d_params = [p for p in disc.parameters() if p.requires_grad]
    offset = torch.nn.Parameter(torch.full((16,), 1.0))
    opt_d = torch.optim.Adam(d_params, lr=1e-3, betas=(0.0, 0.99))
    opt_g = torch.optim.Adam([offset], lr=4e-2, betas=(0.0, 0.99))
    b, f, h = 8, 3, 2
    start = float(offset.detach().norm())
    for _ in range(50):
        ref = torch.randn(b, 16, 1, h, h)
        real = torch.cat([ref, torch.randn(b, 16, f - 1, h, h)], dim=2)
        fake = torch.cat([ref, torch.randn(b, 16, f - 1, h, h) + offset.view(1, -1, 1, 1, 1)], dim=2)
        sigma = torch.rand(b) * 0.6 + 0.2
        sigma = torch.cat([torch.zeros(b, 1), sigma[:, None].expand(b, f - 1)], dim=1)
        noise = torch.randn_like(real)
        s = sigma[:, None, :, None, None]
        x_real, x_fake = (1 - s) * real + s * noise, (1 - s) * fake + s * noise
        # discriminator step on the detached fake
        g_real = x_real[:, :, 1:].detach().requires_grad_()
        g_fake = x_fake[:, :, 1:].detach().requires_grad_()
        with double_backward_attention():
            out_r = disc(torch.cat([x_real[:, :, :1], g_real], dim=2), sigma)
            out_f = disc(torch.cat([x_fake[:, :, :1].detach(), g_fake], dim=2), sigma)
            loss_d = discriminator_loss(out_r, out_f)
            loss_d = loss_d + gradient_penalty(discriminator_score(out_r), g_real, 0.1)
            loss_d = loss_d + gradient_penalty(discriminator_score(out_f), g_fake, 0.1)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        # generator step through the frozen discriminator
        for p in d_params:
            p.requires_grad_(False)
        with torch.no_grad():
            out_r = disc(x_real, sigma)
        loss_g = generator_loss(out_r, disc(x_fake, sigma))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        for p in d_params:
            p.requires_grad_(True)
    assert float(offset.detach().norm()) < 0.2 * start, (float(offset.detach().norm()), start)
