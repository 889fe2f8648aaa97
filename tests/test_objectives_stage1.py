"""Stage-1 objectives against direct computations: ODE regression and SiD."""

from __future__ import annotations

import torch

from dystream.objectives.ode_regression import gather_chunk_states, ode_regression_loss
from dystream.objectives.sid import fake_score_loss, sid_generator_loss


def test_ode_regression_loss_equals_direct_computation():
    b, c, f, h, w, k, chunk = 2, 3, 7, 2, 2, 4, 3
    traj = torch.randn(b, k, c, f, h, w, dtype=torch.float64)
    traj[:, :, :, 0] = traj[:, :1, :, 0]  # the reference frame is the same clean frame in every state
    sigmas = torch.tensor([1.0, 0.75, 0.4, 0.0], dtype=torch.float64)
    step = torch.tensor([[0, 2], [1, 3]])
    x_t, sigma = gather_chunk_states(traj, sigmas, step, chunk)
    # direct: chunk j of sample i comes from state step[i, j]
    for i in range(b):
        assert torch.equal(x_t[i, :, 1:4], traj[i, step[i, 0], :, 1:4])
        assert torch.equal(x_t[i, :, 4:7], traj[i, step[i, 1], :, 4:7])
        assert sigma[i, 0] == 0 and torch.all(sigma[i, 1:4] == sigmas[step[i, 0]])
    v = torch.randn_like(x_t)
    x0 = torch.randn_like(x_t)
    loss = ode_regression_loss(v, x_t, sigma, x0)
    pred = x_t - sigma[:, None, :, None, None] * v
    keep = sigma > 0
    direct = torch.stack([((pred - x0)[i][:, keep[i]] ** 2).sum() for i in range(b)]).sum() / (keep.sum() * c * h * w)
    torch.testing.assert_close(loss, direct.float() if loss.dtype == torch.float32 else direct)


def test_sid_gradient_matches_analytic_expression():
    # Score networks linear in their input x_sigma = (1 - s) x + s eps: f_real = a x_sigma, f_fake = b x_sigma.
    # With the legacy weight w held constant (no grad), dL/dx of L = mean(d * ((r - x) - alpha d) * w),
    # d = r - f, r = a xs, f = b xs, dxs/dx = (1 - s), is  w/N * [ (a - b)(1 - s)((r - x) - alpha d)
    #                                                          + d ((a(1 - s) - 1) - alpha (a - b)(1 - s)) ].
    torch.manual_seed(0)
    shape = (2, 3, 4, 2, 2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(shape, dtype=torch.float64)
    s = torch.tensor(0.3, dtype=torch.float64)
    a, bb, alpha = 0.8, 0.5, 1.2
    xs = (1 - s) * x + s * eps
    r, f = a * xs, bb * xs
    loss = sid_generator_loss(x, r, f, s, alpha=alpha, weighting="legacy")
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        d = r - f
        w = 1.0 / (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        n = x.numel()
        analytic = (
            w / n * ((a - bb) * (1 - s) * ((r - x) - alpha * d) + d * ((a * (1 - s) - 1) - alpha * (a - bb) * (1 - s)))
        )
    torch.testing.assert_close(grad, analytic)


def test_sid_loss_value_and_weightings():
    x, r, f = (torch.randn(2, 1, 3, 1, 1, dtype=torch.float64) for _ in range(3))
    sigma = torch.full((2, 1, 3, 1, 1), 0.25, dtype=torch.float64)
    direct = ((r - f) * ((r - x) - 1.0 * (r - f)) * (1 - sigma)).mean()
    torch.testing.assert_close(sid_generator_loss(x, r, f, sigma, alpha=1.0, weighting="one_minus_sigma"), direct)
    # the frame mask drops frames from both the mean and the legacy normaliser
    mask = torch.tensor([False, True, True])
    full = sid_generator_loss(x[:, :, 1:], r[:, :, 1:], f[:, :, 1:], sigma[:, :, 1:])
    torch.testing.assert_close(sid_generator_loss(x, r, f, sigma, frame_mask=mask), full)


def test_fake_score_loss_has_no_gradient_into_the_sample():
    x = torch.randn(1, 2, 3, 2, 2, requires_grad=True)
    v = torch.randn(1, 2, 3, 2, 2, requires_grad=True)
    eps = torch.randn(1, 2, 3, 2, 2)
    loss = fake_score_loss(v, x, eps)
    loss.backward()
    assert x.grad is None and v.grad is not None
    torch.testing.assert_close(loss, ((v - (eps - x)) ** 2).mean())
