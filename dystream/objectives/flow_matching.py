"""Rectified-flow velocity loss for the bidirectional teacher, with condition dropout for CFG.

StreamAvatar §3.2 / §4.1 fine-tunes Wan2.2-TI2V-5B with the base model's flow-matching objective
(notes §5, §13): ``x_sigma = (1 - sigma) x0 + sigma eps``, target ``v = eps - x0``, loss
``|| v_theta(x_sigma, sigma, c) - v ||^2``. Layout (docs/architecture.md): latent frame 0 is the
clean reference at sigma 0, frames 1..F-1 share one sigma per sample and are the only frames
with a loss (Wan's I2V training keeps the first frame clean the same way).

Condition dropout (so that the teacher supports classifier-free guidance at sampling time) draws
three independent per-sample decisions:

- *talk audio* (own voice x speaking mask) and *listen audio* (partner x (1 - mask)): dropped
  features are set to zero. Zero is what the speaking mask already produces for frames of the
  other phase, and it is what a denoiser must substitute for a ``None`` audio key (the contract of
  ``dystream.diffusion.sampling``), so dropout here and the unconditional branch there agree.
- *reference*: the reference latent frame is what every frame attends to for identity; there is
  no separate "image" input to null. Two ways to drop it, both reproducible at sampling time:
  ``"zeros"`` (default) replaces the reference latent with zeros and keeps it at sigma 0, a clean
  "blank" reference (zero is the data mean of per-channel normalised latents); ``"noise"``
  replaces it with fresh noise at sigma 1, a reference that carries no information and is marked
  as such by its timestep. Either way frame 0 gets no loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dystream.diffusion.sampling import LISTEN_KEY, TALK_KEY, Denoiser
from dystream.diffusion.schedule import (
    SigmaDistribution,
    add_noise,
    frame_sigmas,
    sample_training_sigma,
    velocity_target,
)

ReferenceDropMode = Literal["zeros", "noise"]


@dataclass
class FlowMatchingConfig:
    """Teacher flow-matching loss settings."""

    sigma_distribution: SigmaDistribution = "logit_normal"  # how training sigmas are drawn before the shift
    logit_mean: float = 0.0  # logit-normal location (SD3 uses 0)
    logit_std: float = 1.0  # logit-normal scale (SD3 uses 1)
    shift: float = 5.0  # timestep shift applied to training sigmas; Wan2.2-TI2V-5B samples with 5 (notes §5)
    p_drop_talk: float = 0.1  # probability of zeroing a sample's talk (own voice) audio features
    p_drop_listen: float = 0.1  # probability of zeroing a sample's listen (partner) audio features
    p_drop_reference: float = 0.05  # probability of dropping a sample's reference latent frame
    reference_drop: ReferenceDropMode = "zeros"  # what a dropped reference becomes (module docstring)
    num_reference_frames: int = 1  # leading latent frames that are the clean reference (no loss)
    talk_key: str = TALK_KEY
    listen_key: str = LISTEN_KEY

    def __post_init__(self) -> None:
        if self.sigma_distribution not in ("uniform", "logit_normal"):
            raise ValueError(
                "FlowMatchingConfig.sigma_distribution must be 'uniform' or 'logit_normal', "
                f"got {self.sigma_distribution!r}"
            )
        if not self.logit_std > 0:
            raise ValueError(f"FlowMatchingConfig.logit_std must be > 0, got {self.logit_std}")
        if not self.shift > 0:
            raise ValueError(f"FlowMatchingConfig.shift must be > 0, got {self.shift}")
        for name in ("p_drop_talk", "p_drop_listen", "p_drop_reference"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"FlowMatchingConfig.{name} must be in [0, 1], got {p}")
        if self.reference_drop not in ("zeros", "noise"):
            raise ValueError(
                f"FlowMatchingConfig.reference_drop must be 'zeros' or 'noise', got {self.reference_drop!r}"
            )
        if self.num_reference_frames < 1:
            raise ValueError(f"FlowMatchingConfig.num_reference_frames must be >= 1, got {self.num_reference_frames}")


@dataclass
class DropoutMasks:
    """Per-sample keep decisions ``[B]`` (True = the condition is kept)."""

    talk: Tensor
    listen: Tensor
    reference: Tensor

    @staticmethod
    def keep_all(batch_size: int, device: torch.device | str | None = None) -> DropoutMasks:
        ones = torch.ones(batch_size, dtype=torch.bool, device=device)
        return DropoutMasks(talk=ones, listen=ones.clone(), reference=ones.clone())


def draw_dropout_masks(
    batch_size: int,
    config: FlowMatchingConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> DropoutMasks:
    """Independent Bernoulli keep decisions for talk audio, listen audio and the reference."""
    u = torch.rand(3, batch_size, generator=generator, device=device)
    return DropoutMasks(
        talk=u[0] >= config.p_drop_talk,
        listen=u[1] >= config.p_drop_listen,
        reference=u[2] >= config.p_drop_reference,
    )


def apply_audio_dropout(cond: Mapping[str, Any], masks: DropoutMasks, config: FlowMatchingConfig) -> dict[str, Any]:
    """Zero the dropped samples' audio features (``[B, T, D]``); a None key stays None."""
    out = dict(cond)
    for key, keep in ((config.talk_key, masks.talk), (config.listen_key, masks.listen)):
        feats = out.get(key)
        if feats is None:
            continue
        if feats.shape[0] != keep.shape[0]:
            raise ValueError(
                f"apply_audio_dropout: cond[{key!r}] has batch {feats.shape[0]}, masks have {keep.shape[0]}"
            )
        out[key] = feats * keep.to(feats.dtype).view(-1, *([1] * (feats.ndim - 1)))
    return out


def flow_matching_loss(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Mapping[str, Any],
    sigma: Tensor,
    eps: Tensor,
    masks: DropoutMasks | None = None,
    config: FlowMatchingConfig | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The teacher loss on fixed tensors (all randomness passed in).

    Args:
        denoiser: ``denoiser(x [B, C, F, h, w], sigma [B, F], cond) -> v``.
        x0: clean latents ``[B, C, F, h, w]``, frames ``[:R]`` the reference (R = num_reference_frames).
        cond: conditions; the audio features under ``config.talk_key`` / ``config.listen_key``.
        sigma: one noise level per sample ``[B]``, used for frames R..F-1.
        eps: standard normal noise, same shape as ``x0``; its reference frames are the noise a
            dropped reference gets in ``"noise"`` mode, and are unused otherwise.
        masks: condition dropout decisions; None keeps every condition.
        config: loss settings (only the dropout/layout fields matter here).
        weight: optional per-position weights of the squared error, broadcastable to the generated frames
            ``[B, C, F - R, h, w]`` (e.g. ``[B, 1, F - R, h, w]``, larger on the mouth's latent cells); each sample's
            error is its weighted mean (sum of weight x error over sum of weight), so the loss keeps its scale.

    Returns:
        ``(loss, logs)``: the scalar (weighted) MSE over frames R..F-1 and detached values to log.
    """
    cfg = config or FlowMatchingConfig()
    if x0.ndim != 5:
        raise ValueError(f"flow_matching_loss: x0 must be [B, C, F, h, w], got {tuple(x0.shape)}")
    b, _, f = x0.shape[:3]
    r = cfg.num_reference_frames
    if f <= r:
        raise ValueError(f"flow_matching_loss: x0 has F={f} latent frames, needs more than the {r} reference frame(s)")
    if eps.shape != x0.shape:
        raise ValueError(f"flow_matching_loss: eps {tuple(eps.shape)} must match x0 {tuple(x0.shape)}")
    if sigma.shape != (b,):
        raise ValueError(f"flow_matching_loss: sigma must be [B]=[{b}], got {tuple(sigma.shape)}")
    masks = masks or DropoutMasks.keep_all(b, device=x0.device)

    sigma_f = frame_sigmas(sigma.to(x0.dtype), f, r)  # [B, F], reference frames at 0
    ref = x0[:, :, :r]
    if cfg.reference_drop == "zeros":
        ref = torch.where(~masks.reference.view(b, 1, 1, 1, 1), torch.zeros_like(ref), ref)
    else:  # "noise": sigma 1 makes add_noise return exactly eps for the dropped reference
        sigma_f[:, :r] = torch.where(masks.reference.view(b, 1), sigma_f[:, :r], torch.ones_like(sigma_f[:, :r]))
    x_in = torch.cat([ref, x0[:, :, r:]], dim=2)

    x_t = add_noise(x_in, eps, sigma_f)  # reference frames: sigma 0 -> exactly x_in (or eps at sigma 1)
    v_pred = denoiser(x_t, sigma_f, apply_audio_dropout(cond, masks, cfg))
    if v_pred.shape != x0.shape:
        raise ValueError(f"flow_matching_loss: denoiser returned {tuple(v_pred.shape)}, expected {tuple(x0.shape)}")
    target = velocity_target(x0[:, :, r:], eps[:, :, r:])
    # float32 accumulation even under bf16 autocast; only the generated frames are supervised
    err = (v_pred[:, :, r:].float() - target.float()).pow(2)
    if weight is None:
        per_sample = err.flatten(1).mean(dim=1)  # [B]
    else:
        try:
            w = torch.broadcast_to(weight.to(err), err.shape)
        except RuntimeError as e:
            raise ValueError(
                f"flow_matching_loss: weight {tuple(weight.shape)} does not broadcast to the generated frames "
                f"{tuple(err.shape)}"
            ) from e
        per_sample = (w * err).flatten(1).sum(dim=1) / w.flatten(1).sum(dim=1).clamp(min=1e-12)
    loss = per_sample.mean()

    with torch.no_grad():
        logs = {
            "loss": loss.detach(),
            "sigma_mean": sigma.detach().float().mean(),
            "drop_talk": (~masks.talk).float().mean(),
            "drop_listen": (~masks.listen).float().mean(),
            "drop_reference": (~masks.reference).float().mean(),
        }
        # loss by noise level: where the teacher is weak shows up here first
        for name, lo, hi in (("lo", 0.0, 1 / 3), ("mid", 1 / 3, 2 / 3), ("hi", 2 / 3, 1.0 + 1e-6)):
            sel = (sigma >= lo) & (sigma < hi)
            if bool(sel.any()):
                logs[f"loss_sigma_{name}"] = per_sample.detach()[sel].mean()
    return loss, logs


def region_loss_weight(
    kpts: Tensor,
    points: slice,
    video_size: tuple[int, int],
    latent_shape: tuple[int, int, int],
    extra: float,
    pad: float = 0.5,
) -> Tensor:
    """Per-latent-cell loss weights ``[B, 1, F, h, w]``: ``1 + extra`` on the cells a keypoint box touches, else 1.

    ``kpts [B, T, K, 3]`` are the window's keypoints in pixels of ``video_size (H, W)``; the box around ``points``
    (e.g. the lips, enlarged by ``pad``) is max-pooled to the ``latent_shape (F, h, w)`` of the generated frames
    (T = 4F video frames), so a cell counts when any of its pixels in any of its frames lies in a box. At 64x64 the
    mouth is under 1 % of the frame, one f8 latent cell, and its opening is what lip sync reads.
    """
    from dystream.objectives.vae import keypoint_box_mask

    if kpts.ndim != 4 or kpts.shape[-1] != 3:
        raise ValueError(f"region_loss_weight: keypoints must be [B, T, K, 3], got {tuple(kpts.shape)}")
    f = latent_shape[0]
    if kpts.shape[1] % f:
        raise ValueError(f"region_loss_weight: {kpts.shape[1]} keypoint frames do not divide into {f} latent frames")
    box = keypoint_box_mask(kpts, points, *video_size, pad=pad)  # [B, T, H, W]
    cells = torch.nn.functional.adaptive_max_pool3d(box[:, None].float(), tuple(latent_shape))  # [B, 1, F, h, w]
    return 1.0 + extra * cells


class FlowMatchingObjective:
    """Draws sigma, eps and dropout masks, then calls :func:`flow_matching_loss`.

    The random pieces are separate methods so a test (or a stage) can fix any of them.
    """

    def __init__(self, config: FlowMatchingConfig | None = None) -> None:
        self.config = config or FlowMatchingConfig()

    def sample_sigma(self, batch_size: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        c = self.config
        return sample_training_sigma(
            batch_size,
            distribution=c.sigma_distribution,
            shift=c.shift,
            logit_mean=c.logit_mean,
            logit_std=c.logit_std,
            generator=generator,
            device=device,
        )

    def sample_masks(self, batch_size: int, *, generator: torch.Generator | None = None, device=None) -> DropoutMasks:
        return draw_dropout_masks(batch_size, self.config, generator=generator, device=device)

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        cond: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b = x0.shape[0]
        sigma = self.sample_sigma(b, generator=generator, device=x0.device).to(x0.dtype)
        if generator is None:
            eps = torch.randn_like(x0)
        else:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        masks = self.sample_masks(b, generator=generator, device=x0.device)
        return flow_matching_loss(denoiser, x0, cond, sigma, eps, masks, self.config)
