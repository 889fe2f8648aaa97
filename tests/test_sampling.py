"""Euler flow sampler, audio CFG and trajectory recording over the narrow denoiser interface."""

from __future__ import annotations

import pytest
import torch

from dystream.diffusion.sampling import LISTEN_KEY, TALK_KEY, AudioGuidance, guided_velocity, sample_euler
from dystream.diffusion.schedule import nearest_step_indices, sampling_sigmas, student_sigmas


def straight_path_denoiser(target):
    """The exact velocity field of the straight paths ending at ``target``: v = (x - x0) / sigma."""

    def denoiser(x, sigma, cond):
        s = sigma[:, None, :, None, None]
        v = (x - target) / torch.where(s > 0, s, torch.ones_like(s))
        # garbage on clean frames: the sampler must never integrate them
        return torch.where(s > 0, v, torch.full_like(v, 1e3))

    return denoiser


def start_latents(ref, noise):
    return torch.cat([ref, noise], dim=2)


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (4, 1.0), (7, 5.0), (30, 3.0)])
def test_euler_recovers_x0_on_straight_paths(num_steps, shift):
    b, c, f, h, w = 2, 3, 5, 4, 4
    x0 = torch.randn(b, c, f, h, w, dtype=torch.float64)
    eps = torch.randn(b, c, f - 1, h, w, dtype=torch.float64)
    x = start_latents(x0[:, :, :1], eps)
    out, traj = sample_euler(straight_path_denoiser(x0), x, {}, sampling_sigmas(num_steps, shift))
    assert traj is None
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    assert torch.equal(out[:, :, 0], x0[:, :, 0])  # the reference is bit-exact, not just close


def test_reference_frame_untouched_and_sigma_layout():
    b, c, f = 2, 3, 4
    x = torch.randn(b, c, f, 2, 2)
    seen = []

    def denoiser(x_in, sigma, cond):
        seen.append((x_in.clone(), sigma.clone()))
        return torch.randn_like(x_in) * 100  # wild predictions everywhere, frame 0 included

    grid = sampling_sigmas(5, 5.0).float()
    out, _ = sample_euler(denoiser, x, {}, grid)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    for i, (x_in, sigma) in enumerate(seen):
        assert torch.equal(x_in[:, :, 0], x[:, :, 0])
        assert sigma.shape == (b, f) and sigma[:, 0].eq(0).all()
        assert torch.equal(sigma[:, 1:], grid[i].expand(b, f - 1))


def test_trajectory_states_are_the_sampler_states():
    b, c, f = 2, 2, 4
    torch.manual_seed(1)
    w = torch.randn(c, c, dtype=torch.float64) * 0.3

    def denoiser(x, sigma, cond):  # a state-dependent, non-linear field
        return torch.tanh(torch.einsum("ij,bjfhw->bifhw", w, x)) + sigma[:, None, :, None, None]

    grid = sampling_sigmas(12, 5.0)
    x = torch.randn(b, c, f, 3, 3, dtype=torch.float64)
    record = [0, 3, 7, 11]
    out, traj = sample_euler(denoiser, x, {}, grid, record_steps=record)
    assert traj is not None and traj.states.shape == (b, len(record) + 1, c, f, 3, 3)
    assert traj.step_indices == record
    torch.testing.assert_close(traj.sigmas, torch.cat([grid[record], grid.new_zeros(1)]))
    assert torch.equal(traj.states[:, -1], out)
    # independent Euler loop
    state, manual = x.clone(), {}
    for i in range(12):
        manual[i] = state.clone()
        sig = grid[i] * torch.ones(b, f, dtype=x.dtype)
        sig[:, 0] = 0
        v = denoiser(state, sig, {})
        state = state.clone()
        state[:, :, 1:] = state[:, :, 1:] + (grid[i + 1] - grid[i]) * v[:, :, 1:]
    for k, i in enumerate(record):
        torch.testing.assert_close(traj.states[:, k], manual[i], rtol=0, atol=1e-12)
    # resuming from a recorded state on the rest of the grid gives the same final latent
    resumed, _ = sample_euler(denoiser, traj.states[:, 2], {}, grid[record[2] :])
    torch.testing.assert_close(resumed, out, rtol=0, atol=1e-12)


def test_trajectory_at_student_sigmas():
    teacher, student = sampling_sigmas(48, 5.0), student_sigmas(3, 5.0)
    x0 = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64)
    x = start_latents(x0[:, :, :1], torch.randn(1, 2, 2, 2, 2, dtype=torch.float64))
    _, traj = sample_euler(
        straight_path_denoiser(x0), x, {}, teacher, record_steps=nearest_step_indices(teacher, student)
    )
    torch.testing.assert_close(traj.sigmas[:-1], student)
    # on straight paths the recorded states are exactly x_sigma = (1 - sigma) x0 + sigma eps
    eps = x[:, :, 1:]
    for k, s in enumerate(student):
        torch.testing.assert_close(traj.states[:, k, :, 1:], (1 - s) * x0[:, :, 1:] + s * eps, rtol=0, atol=1e-12)


class CountingDenoiser:
    """v depends on which audio keys are present, so every CFG branch is distinguishable."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append({k: v is not None for k, v in cond.items()})
        v = 0.5 * x
        if cond.get(TALK_KEY) is not None:
            v = v + 2.0 * cond[TALK_KEY].mean()
        if cond.get(LISTEN_KEY) is not None:
            v = v - 3.0 * cond[LISTEN_KEY].mean() + x**2
        return v


def _cond():
    return {TALK_KEY: torch.rand(1, 8, 4) + 1, LISTEN_KEY: torch.rand(1, 8, 4) + 1, "other": torch.ones(1)}


def test_cfg_scale_one_is_conditional_and_single_call():
    x, sigma, cond = torch.randn(1, 2, 3, 2, 2), torch.rand(1, 3), _cond()
    den = CountingDenoiser()
    for g in (None, AudioGuidance(scale=1.0), AudioGuidance(talk_scale=1.0, listen_scale=1.0)):
        den.calls.clear()
        out = guided_velocity(den, x, sigma, cond, g)
        assert torch.equal(out, CountingDenoiser()(x, sigma, cond))
        assert len(den.calls) == 1


def test_cfg_joint_formula():
    x, sigma, cond = torch.randn(1, 2, 3, 2, 2), torch.rand(1, 3), _cond()
    den = CountingDenoiser()
    out = guided_velocity(den, x, sigma, cond, AudioGuidance(scale=4.0))
    assert len(den.calls) == 2
    assert den.calls[1] == {TALK_KEY: False, LISTEN_KEY: False, "other": True}  # only audio is dropped
    ref = CountingDenoiser()
    v_c = ref(x, sigma, cond)
    v_u = ref(x, sigma, {**cond, TALK_KEY: None, LISTEN_KEY: None})
    torch.testing.assert_close(out, v_u + 4.0 * (v_c - v_u))


def test_cfg_separate_scales():
    x, sigma, cond = torch.randn(1, 2, 3, 2, 2), torch.rand(1, 3), _cond()
    ref = CountingDenoiser()
    v_c = ref(x, sigma, cond)
    v_nt = ref(x, sigma, {**cond, TALK_KEY: None})
    v_nl = ref(x, sigma, {**cond, LISTEN_KEY: None})
    den = CountingDenoiser()
    out = guided_velocity(den, x, sigma, cond, AudioGuidance(talk_scale=3.0))
    assert len(den.calls) == 2
    torch.testing.assert_close(out, v_c + 2.0 * (v_c - v_nt))
    den.calls.clear()
    out = guided_velocity(den, x, sigma, cond, AudioGuidance(talk_scale=3.0, listen_scale=1.5))
    assert len(den.calls) == 3 and AudioGuidance(talk_scale=3.0, listen_scale=1.5).num_calls() == 3
    torch.testing.assert_close(out, v_c + 2.0 * (v_c - v_nt) + 0.5 * (v_c - v_nl))


def test_guidance_validation_and_sampler_input_checks():
    with pytest.raises(ValueError, match="not both"):
        AudioGuidance(scale=2.0, talk_scale=3.0)
    with pytest.raises(ValueError, match="AudioGuidance.scale"):
        AudioGuidance(scale=-1.0)
    x = torch.randn(1, 2, 3, 2, 2)
    den = CountingDenoiser()
    with pytest.raises(ValueError, match="end at 0"):
        sample_euler(den, x, {}, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="record_steps"):
        sample_euler(den, x, {}, sampling_sigmas(3), record_steps=[3])
    with pytest.raises(ValueError, match=r"\[B, C, F, h, w\]"):
        sample_euler(den, x[0], {}, sampling_sigmas(3))


def test_sampler_with_cfg_uses_guided_velocity():
    x, cond = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64), _cond()
    cond = {k: v.double() for k, v in cond.items()}
    grid = sampling_sigmas(3, 2.0)
    g = AudioGuidance(scale=2.5)
    out, _ = sample_euler(CountingDenoiser(), x, cond, grid, guidance=g)
    state = x.clone()
    for i in range(3):
        sig = torch.full((1, 3), float(grid[i]), dtype=x.dtype)
        sig[:, 0] = 0
        v = guided_velocity(CountingDenoiser(), state, sig, cond, g)
        state = torch.cat([x[:, :, :1], state[:, :, 1:] + (grid[i + 1] - grid[i]) * v[:, :, 1:]], dim=2)
    torch.testing.assert_close(out, state, rtol=0, atol=1e-12)
