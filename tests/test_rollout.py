"""Student-forcing rollout through the KV cache vs the full-sequence block-causal sampler."""

from __future__ import annotations

import pytest
import torch

from dystream.diffusion.rollout import sample_few_step, student_rollout
from dystream.diffusion.schedule import student_sigmas
from dystream.models.dit import AvatarDiT, DiTConfig


def _model(window: int = 3) -> AvatarDiT:
    torch.manual_seed(0)
    cfg = DiTConfig.from_preset("tiny", window_frames=window, rapr_max_distance=1 + 3 + window)
    model = AvatarDiT(cfg).eval()
    # Wan's init zeroes the head and the audio outputs; random weights everywhere make every path matter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _inputs(model: AvatarDiT, chunks: int):
    c = model.config
    ref = torch.randn(1, c.in_channels, 1, 4, 4)
    t = 4 * c.chunk_frames * chunks + c.audio_lookahead_frames
    return ref, torch.randn(1, t, c.audio_dim), torch.randn(1, t, c.audio_dim)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("renoise_mode", ["fresh", "ode"])
def test_rollout_through_cache_equals_full_sequence_sampler(chunks, renoise_mode):
    model = _model()
    ref, talk, listen = _inputs(model, chunks)
    sigmas = student_sigmas(3, 5.0).float()
    with torch.no_grad():
        full = sample_few_step(
            model,
            ref,
            chunks,
            sigmas,
            talk,
            listen,
            renoise_mode=renoise_mode,
            generator=torch.Generator().manual_seed(1),
        )
        roll = student_rollout(
            model,
            ref,
            chunks,
            sigmas,
            talk,
            listen,
            renoise_mode=renoise_mode,
            generator=torch.Generator().manual_seed(1),
        ).latents
    assert roll.shape == full.shape == (1, model.config.in_channels, 1 + 3 * chunks, 4, 4)
    torch.testing.assert_close(roll, full, atol=1e-5, rtol=1e-5)


def test_chunk_depends_on_the_students_own_previous_chunk(monkeypatch):
    import dystream.diffusion.rollout as rollout

    model = _model()
    ref, talk, listen = _inputs(model, 2)
    sigmas = torch.tensor([1.0, 0.6, 0.3])
    shape = (1, model.config.in_channels, 3, 4, 4)
    chunk1 = [torch.randn(shape) for _ in range(3)]

    def run(chunk0_seed: int):
        chunk0 = [torch.randn(shape, generator=torch.Generator().manual_seed(chunk0_seed)) for _ in range(3)]
        draws = iter([chunk0, chunk1])
        monkeypatch.setattr(rollout, "chunk_noises", lambda *a, **k: next(draws))
        with torch.no_grad():
            return student_rollout(model, ref, 2, sigmas, talk, listen).latents

    a, b = run(0), run(1)
    assert not torch.allclose(a[:, :, 1:4], b[:, :, 1:4])  # chunk 0 differs ...
    assert not torch.allclose(a[:, :, 4:7], b[:, :, 4:7])  # ... so chunk 1 differs, though its own noises are equal
    c = run(0)
    torch.testing.assert_close(a, c)  # and nothing else (no ground truth, no hidden state) enters


def test_gradient_only_through_chosen_chunks_and_exit_step():
    model = _model()
    ref, talk, listen = _inputs(model, 2)
    sigmas = torch.tensor([1.0, 0.6, 0.3])
    res = student_rollout(model, ref, 2, sigmas, talk, listen, exit_steps=[2, 1], grad_chunks=[1])
    lat, params = res.latents, [p for p in model.parameters() if p.requires_grad]
    # chunk 0 ran without gradient: it is a constant for the optimiser
    grads0 = torch.autograd.grad(lat[:, :, 1:4].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads0)
    grads1 = torch.autograd.grad(lat[:, :, 4:7].square().mean(), params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads1 if g is not None) > 0


def test_rollout_rejects_bad_arguments():
    model = _model()
    ref, talk, listen = _inputs(model, 1)
    with pytest.raises(ValueError, match="exit step"):
        student_rollout(model, ref, 1, torch.tensor([1.0, 0.5]), talk, listen, exit_steps=[5])
    with pytest.raises(ValueError, match="positive"):
        student_rollout(model, ref, 1, torch.tensor([1.0, 0.0]), talk, listen)
