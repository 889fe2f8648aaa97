"""ODE-regression initialisation of the block-causal student (CausVid; StreamAvatar §3.1.1).

The teacher's sampling trajectories are recorded at the student's timesteps (ODE pairs). For each
chunk of ``C`` latent frames one of the stored noisy states ``x_{sigma_k}`` is picked (one index per
chunk, the same for all its frames), the student predicts x0 from the block-causal sequence, and
the loss is the mean squared error to the trajectory's clean end point over the generated frames
(the reference frame, sigma 0, gets no loss): ``mean || G(x_{sigma_k}, sigma_k) - x0_ODE ||^2``
(CausVid ``ode_regression.py``, Self-Forcing ``model/ode_regression.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dystream.diffusion.schedule import x0_from_velocity


def gather_chunk_states(
    trajectory: Tensor, sigmas: Tensor, step_index: Tensor, chunk_frames: int
) -> tuple[Tensor, Tensor]:
    """Build the student's input from a stored trajectory, one trajectory step per chunk.

    Args:
        trajectory: ``[B, K, C, F, h, w]``, the K stored noisy states (frame 0 the clean reference).
        sigmas: ``[K]``, the noise level of each stored state.
        step_index: ``[B, n_chunks]`` long, which stored state each chunk takes.
        chunk_frames: ``C``.

    Returns:
        ``x_t [B, C, F, h, w]`` and per-frame ``sigma [B, F]`` (0 on the reference frame).
    """
    b, k, c, f, h, w = trajectory.shape
    n_chunks = (f - 1) // chunk_frames
    if 1 + n_chunks * chunk_frames != f:
        raise ValueError(f"trajectory has {f} latent frames; expected 1 + n * {chunk_frames}")
    if step_index.shape != (b, n_chunks):
        raise ValueError(f"step_index must be [{b}, {n_chunks}], got {tuple(step_index.shape)}")
    frame_step = torch.cat(
        [torch.zeros(b, 1, dtype=torch.long, device=step_index.device), step_index.repeat_interleave(chunk_frames, 1)],
        dim=1,
    )  # [B, F]
    idx = frame_step[:, None, None, :, None, None].expand(b, 1, c, f, h, w).to(trajectory.device)
    x_t = trajectory.gather(1, idx).squeeze(1)
    sigma = sigmas.to(trajectory.device, trajectory.dtype)[frame_step.to(trajectory.device)]
    sigma[:, 0] = 0.0  # the reference frame is clean in every stored state
    return x_t, sigma


def ode_regression_loss(v_pred: Tensor, x_t: Tensor, sigma: Tensor, x0_target: Tensor) -> Tensor:
    """MSE between the student's x0 prediction and the ODE end point, over frames with sigma > 0.

    ``v_pred``, ``x_t``, ``x0_target``: ``[B, C, F, h, w]``; ``sigma``: ``[B, F]``.
    """
    x0_pred = x0_from_velocity(x_t, v_pred, sigma)
    err = (x0_pred.float() - x0_target.float()) ** 2  # [B, C, F, h, w]
    sel = (sigma > 0).to(err.dtype)[:, None, :, None, None].expand_as(err)
    return (err * sel).sum() / sel.sum().clamp_min(1)
