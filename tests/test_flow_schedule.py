"""Flow-matching schedule: timestep shift, sigma grids, training sigmas, noising algebra."""

from __future__ import annotations

import pytest
import torch

from dystream.diffusion.schedule import (
    add_noise,
    eps_from_velocity,
    expand_sigma,
    frame_sigmas,
    nearest_step_indices,
    sample_training_sigma,
    sampling_sigmas,
    shift_sigma,
    student_sigmas,
    unshift_sigma,
    velocity_target,
    x0_from_velocity,
)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 5.0, 8.0])
def test_shift_endpoints_fixed_and_monotone(shift):
    s = torch.linspace(0, 1, 1001, dtype=torch.float64)
    out = shift_sigma(s, shift)
    assert out[0] == 0 and out[-1] == 1
    assert bool((out[1:] > out[:-1]).all())  # strictly increasing
    torch.testing.assert_close(unshift_sigma(out, shift), s)  # invertible
    if shift > 1:
        assert bool((out[1:-1] > s[1:-1]).all())  # more time at high noise
    if shift == 1.0:
        torch.testing.assert_close(out, s)


def test_shift_formula_by_hand():
    assert float(shift_sigma(0.5, 5.0)) == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    with pytest.raises(ValueError, match="shift"):
        shift_sigma(0.5, 0.0)


def test_sampling_grid_and_student_sigmas():
    grid = sampling_sigmas(10, shift=5.0)
    assert grid.shape == (11,) and grid[0] == 1 and grid[-1] == 0
    assert bool((grid[1:] < grid[:-1]).all())
    st = student_sigmas(3, shift=5.0)
    torch.testing.assert_close(st, shift_sigma(torch.tensor([1.0, 2 / 3, 1 / 3], dtype=torch.float64), 5.0))
    # the student's sigmas sit exactly on a teacher grid with a step count divisible by 3
    teacher = sampling_sigmas(48, shift=5.0)
    idx = nearest_step_indices(teacher, st)
    assert idx == [0, 16, 32]
    torch.testing.assert_close(teacher[idx], st)
    with pytest.raises(ValueError, match="not on the sampling grid"):
        nearest_step_indices(sampling_sigmas(50, shift=5.0), st)
    assert nearest_step_indices(sampling_sigmas(50, shift=5.0), st, atol=None)[0] == 0
    with pytest.raises(ValueError, match="num_steps"):
        sampling_sigmas(0)


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_training_sigma_distribution(distribution, shift):
    g = torch.Generator().manual_seed(0)
    s = sample_training_sigma(20000, distribution=distribution, shift=shift, generator=g)
    assert s.shape == (20000,)
    assert bool(((s > 0) & (s < 1)).all())
    # both base distributions have median 1/2; the shift maps the median through shift_sigma
    assert float(s.median()) == pytest.approx(float(shift_sigma(0.5, shift)), abs=0.02)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(s, sample_training_sigma(20000, distribution=distribution, shift=shift, generator=g2))


def test_training_sigma_bad_input():
    with pytest.raises(ValueError, match="distribution"):
        sample_training_sigma(4, distribution="beta")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        sample_training_sigma(0)


def test_noise_velocity_roundtrip_per_frame():
    b, c, f, h, w = 2, 3, 4, 5, 6
    x0, eps = torch.randn(b, c, f, h, w, dtype=torch.float64), torch.randn(b, c, f, h, w, dtype=torch.float64)
    sigma = frame_sigmas(torch.tensor([0.3, 0.9], dtype=torch.float64), f)  # frame 0 at 0
    assert sigma[:, 0].eq(0).all() and torch.equal(
        sigma[:, 1:], torch.tensor([[0.3] * 3, [0.9] * 3], dtype=sigma.dtype)
    )
    x_t = add_noise(x0, eps, sigma)
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0])  # the reference frame is bit-exact at sigma 0
    for i in range(b):  # independent per-element computation
        s = sigma[i, 2]
        torch.testing.assert_close(x_t[i, :, 2], (1 - s) * x0[i, :, 2] + s * eps[i, :, 2])
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0)
    torch.testing.assert_close(eps_from_velocity(x_t, v, sigma)[:, :, 1:], eps[:, :, 1:])


def test_expand_sigma_shapes():
    x = torch.zeros(2, 3, 4, 5, 6)
    assert expand_sigma(torch.rand(2), x).shape == (2, 1, 1, 1, 1)
    assert expand_sigma(torch.rand(2, 4), x).shape == (2, 1, 4, 1, 1)
    assert expand_sigma(0.5, x).shape == ()
    with pytest.raises(ValueError, match=r"\[B, F\]"):
        expand_sigma(torch.rand(2, 3), x)
    with pytest.raises(ValueError, match="same shape"):
        add_noise(x, torch.zeros(2, 3, 4, 5, 5), 0.5)
