"""Few-step generation of the block-causal student: the offline sampler and the student-forcing rollout.

The student denoises each chunk of ``C`` latent frames in ``N`` steps along ``sigmas[0..N-1]``
(e.g. ``schedule.student_sigmas(3, 5)``): at step k it predicts ``x0 = x - sigma_k v`` and, unless
it is the last step, re-noises that estimate to ``sigma_{k+1}``, with fresh noise (Self-Forcing's
rollout, ``renoise="fresh"``) or along the predicted noise direction (deterministic DDIM-like
step, ``renoise="ode"``). The chunk's output is the x0 prediction of the last step.

Student forcing (StreamAvatar §3.1.1; Self-Forcing's ``inference_with_trajectory``): chunk j is
generated conditioned on the student's *own* earlier chunks through the KV cache, never on ground
truth. What is written to the cache for chunk j:

- ``cache_write="noisy"`` (paper default): the K/V of the last denoising step's input, written by
  that very forward (no extra pass). The paper finds this as good as clean context and it saves
  one forward per chunk.
- ``cache_write="clean"`` (Self-Forcing): one more forward on the chunk's clean output at sigma 0.

Training picks an exit step per chunk: the chunk's output for the loss is the x0 prediction at
that step (computed with gradient if the chunk is among ``grad_chunks``); later steps still run
without gradient so the cache sees exactly what inference would write. The cache is detached, so
gradients never cross chunks through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RenoiseMode = Literal["fresh", "ode"]
CacheWrite = Literal["noisy", "clean"]


def renoise(x0: Tensor, x_t: Tensor, sigma: Tensor, sigma_next: Tensor, mode: RenoiseMode, noise: Tensor) -> Tensor:
    """Move the estimate ``x0`` (made at ``x_t``, ``sigma``) to noise level ``sigma_next``."""
    if mode == "fresh":
        eps = noise
    elif mode == "ode":
        eps = (x_t - (1 - sigma) * x0) / sigma.clamp_min(1e-12)  # the noise the prediction implies
    else:
        raise ValueError(f"renoise mode must be 'fresh' or 'ode', got {mode!r}")
    return (1 - sigma_next) * x0 + sigma_next * eps


def chunk_noises(
    shape: Sequence[int], num_steps: int, generator: torch.Generator | None, device, dtype
) -> list[Tensor]:
    """The noises one chunk consumes, in order: the initial state, then one per re-noise."""
    return [torch.randn(*shape, generator=generator, device="cpu").to(device, dtype) for _ in range(num_steps)]


def sample_few_step(
    model,
    reference: Tensor,
    num_chunks: int,
    sigmas: Tensor,
    audio_talk: Tensor | None = None,
    audio_listen: Tensor | None = None,
    context: Tensor | None = None,
    renoise_mode: RenoiseMode = "fresh",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Offline few-step sampling with the full-sequence ``block_causal`` forward, chunk after chunk.

    Each chunk is denoised with the whole sequence so far in the input (earlier chunks as the
    inputs the rollout would have cached), so with ``cache_write="noisy"`` it computes what
    :func:`student_rollout` computes through the KV cache. Returns latents ``[B, C, 1 + n C, h, w]``.
    """
    chunk = model.config.chunk_frames
    b, c, _, h, w = reference.shape
    seq = reference  # the inputs that would sit in the cache: reference, then each chunk's last-step input
    seq_sigma = torch.zeros(b, 1, device=reference.device, dtype=reference.dtype)
    outputs = [reference]
    n = sigmas.numel()
    for _ in range(num_chunks):
        noises = chunk_noises((b, c, chunk, h, w), n, generator, reference.device, reference.dtype)
        x = noises[0]
        for k in range(n):
            s = sigmas[k].to(x.dtype)
            full = torch.cat([seq, x], dim=2)
            full_sigma = torch.cat([seq_sigma, s.expand(b, chunk)], dim=1)
            t = 4 * (full.shape[2] - 1) + model.config.audio_lookahead_frames  # the look-ahead the stream has too
            talk, listen = _audio_prefix(audio_talk, t), _audio_prefix(audio_listen, t)
            v = model(full, full_sigma, talk, listen, context, attention="block_causal")[:, :, -chunk:]
            x0 = x - s * v
            if k == n - 1:
                seq = full
                seq_sigma = full_sigma
                outputs.append(x0)
            else:
                x = renoise(x0, x, s, sigmas[k + 1].to(x.dtype), renoise_mode, noises[k + 1])
    return torch.cat(outputs, dim=2)


def _audio_prefix(audio: Tensor | None, frames: int) -> Tensor | None:
    """The first ``frames`` video frames of ``audio``, zero-padded past its end (end of stream)."""
    if audio is None:
        return None
    out = audio[:, :frames]
    if out.shape[1] < frames:
        out = torch.cat([out, out.new_zeros(out.shape[0], frames - out.shape[1], *out.shape[2:])], dim=1)
    return out


@dataclass
class RolloutResult:
    """Latents ``[B, C, 1 + n C, h, w]`` (frame 0 the reference) and, per chunk, whether it has gradient."""

    latents: Tensor
    grad_chunks: list[int]
    exit_steps: list[int]


def student_rollout(
    model,
    reference: Tensor,
    num_chunks: int,
    sigmas: Tensor,
    audio_talk: Tensor | None = None,
    audio_listen: Tensor | None = None,
    context: Tensor | None = None,
    exit_steps: Sequence[int] | None = None,
    grad_chunks: Sequence[int] = (),
    cache_write: CacheWrite = "noisy",
    renoise_mode: RenoiseMode = "fresh",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> RolloutResult:
    """Generate ``num_chunks`` chunks through the KV cache, each conditioned on the student's own output.

    Args:
        model: an :class:`~dystream.models.dit.AvatarDiT` (block-causal student).
        reference: the clean reference latent ``[B, C, 1, h, w]``.
        num_chunks: chunks to generate.
        sigmas: the student's step sigmas ``[N]`` (decreasing, all > 0).
        audio_talk, audio_listen: ``[B, 4 n C (+ look-ahead), D]`` features for the whole rollout, or None.
        context: text context (None: the model's learned constant).
        exit_steps: per chunk, the step whose x0 prediction is the chunk's output (default: the last).
        grad_chunks: chunks whose exit-step forward runs with gradient (all others under no_grad).
        cache_write: ``"noisy"`` (paper) or ``"clean"`` (Self-Forcing); see the module docstring.
        renoise_mode: ``"fresh"`` noise or the deterministic ``"ode"`` step between denoising steps.
        generator: source of the noises (drawn in the same order as :func:`sample_few_step`).
        noise: optional starting noise of all chunks ``[B, C, n C, h, w]`` (e.g. the teacher's starting noise
            of an ODE pair, to compare student and teacher from the same noise); it replaces each chunk's
            first draw, the re-noise draws still come from ``generator``.
    """
    n = sigmas.numel()
    if sigmas.ndim != 1 or n < 1 or bool((sigmas <= 0).any()):
        raise ValueError(f"student_rollout: sigmas must be a 1-D list of positive noise levels, got {sigmas.tolist()}")
    exit_steps = [n - 1] * num_chunks if exit_steps is None else list(exit_steps)
    if len(exit_steps) != num_chunks or any(not 0 <= e < n for e in exit_steps):
        raise ValueError(f"student_rollout: need one exit step in [0, {n}) per chunk, got {exit_steps}")
    if cache_write not in ("noisy", "clean"):
        raise ValueError(f"student_rollout: cache_write must be 'noisy' or 'clean', got {cache_write!r}")
    chunk = model.config.chunk_frames
    b, c, _, h, w = reference.shape
    if noise is not None and noise.shape != (b, c, num_chunks * chunk, h, w):
        raise ValueError(
            f"student_rollout: noise must be [B, C, n C, h, w] = {[b, c, num_chunks * chunk, h, w]}, "
            f"got {list(noise.shape)}"
        )
    cache = model.new_kv_cache(b, device=reference.device)
    with torch.no_grad():
        model.forward_chunk(reference, reference.new_zeros(b, 1), None, None, cache, context, write_cache=True)
    outputs = [reference]
    for j in range(num_chunks):
        start = cache.next_frame
        talk = None if audio_talk is None else model.audio_window(audio_talk, start, chunk)
        listen = None if audio_listen is None else model.audio_window(audio_listen, start, chunk)
        noises = chunk_noises((b, c, chunk, h, w), n, generator, reference.device, reference.dtype)
        if noise is not None:
            noises[0] = noise[:, :, j * chunk : (j + 1) * chunk].to(reference.device, reference.dtype)
        x = noises[0]
        out = None
        for k in range(n):
            s = sigmas[k].to(x.dtype)
            with_grad = j in grad_chunks and k == exit_steps[j]
            write = cache_write == "noisy" and k == n - 1
            with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                v = model.forward_chunk(x, s.expand(b, chunk), talk, listen, cache, context, write_cache=write)
                x0 = x - s * v
            if k == exit_steps[j]:
                out = x0
            if k < n - 1:
                x = renoise(x0.detach(), x, s, sigmas[k + 1].to(x.dtype), renoise_mode, noises[k + 1])
        if cache_write == "clean":
            with torch.no_grad():
                model.forward_chunk(out.detach(), x.new_zeros(b, chunk), talk, listen, cache, context, write_cache=True)
        outputs.append(out)
    return RolloutResult(torch.cat(outputs, dim=2), list(grad_chunks), exit_steps)
