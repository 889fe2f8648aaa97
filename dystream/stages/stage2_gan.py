"""Stage 2: adversarial refinement of the few-step student on real video (StreamAvatar §3.1.2).

Networks (notes/distillation.md §1.3, §7, §8, §14.7):

- the **student** generator (the SiD export), block-causal, trained; it generates with student forcing
  through its KV cache (:func:`~dystream.diffusion.rollout.student_rollout`: each chunk conditioned on its
  own earlier output, a random exit step per chunk drawn on rank 0 and broadcast, gradient through the last
  ``grad_chunks`` chunks);
- the **consistency-aware discriminator** (:class:`~dystream.models.discriminator.ConsistencyAwareDiscriminator`):
  a trainable copy of the teacher's backbone with N_Q per-frame Q-Formers, a local realism head (one logit per
  generated frame) and a global consistency head (one logit per clip; ``global_branch=False`` is the paper's
  "GAN w/o D_CA" ablation);
- frozen here (:func:`~dystream.stages.common.freeze`, via :class:`AvatarConditioner`): the VAE and the audio
  encoder. The teacher is only read once, to initialise the discriminator.

Unlike stage 1 the discriminator sees **real video**: the batch's window encoded with the frozen VAE, frame 0
the reference image encoded alone; the student generates from that same reference latent and the same audio,
so real clip b and fake clip b form a pair for the relativistic loss. Both are noised at one sigma per sample
(uniform, shifted, clamped, as Self-Forcing's critic timestep; the reference frame stays clean) with the
**same** noise, then judged (:mod:`dystream.objectives.gan`).

One training step:

1. a **discriminator update** on a fresh, detached student rollout: ``L_D`` (relativistic pairing, per-frame and
   global logits weighted by ``frame_weight`` / ``global_weight``) + R1 on the real and R2 on the fake input,
   exact (double backward, R3GAN) or by finite differences (APT), ``penalty``;
2. every ``generator_every`` steps after ``d_warmup_steps`` discriminator-only steps, a **generator update**: a
   rollout with gradient, ``L_G`` (pairing with real and fake swapped) with the discriminator's parameters frozen
   for the update, so the student learns only through the discriminator's judgement of its samples.

Manual optimisation with two AdamW optimizers (discriminator lr = ``lr * d_lr_multiplier``), gradient clipping
here (``grad_clip``), EMA of the student after every generator update. Counters (``gan_step``, ``generator_steps``,
the accuracy monitor) are buffers, so a resumed run continues the same schedule. Lightning's ``global_step``
counts the steps of both optimizers: set the run length with epochs or ``max_steps = 2 x steps``.

Discriminator accuracy (fraction of pairs with ``score(real) > score(fake)``, the score being the loss's weighted
logits) is logged every step (``train/d_acc``; per branch ``train/d_acc_frame`` over frame pairs and
``train/d_acc_global`` over clip pairs) with its running mean (``train/d_acc_ema``); a running mean stuck within
``saturation_margin`` of 0 or 1 for ``saturation_steps`` discriminator steps is reported once per episode
(a warning and ``train/d_saturated`` = 1): the discriminator has won (1) or collapsed (0), and the generator
gets no useful signal.

Validation (SpeakerVid batches with video): the EMA student's few-step sample from the batch's reference and
audio (fixed noise) against the real window: ``val/psnr`` of the decoded frames (data range 2), ``val/latent_mse``,
``val/latent_fd`` (Fréchet distance between the sets of generated and real latent frames, one feature per frame
from stage 1's :func:`~dystream.stages.student.frame_features`, per rank then averaged) and ``val/d_acc`` of the
current discriminator at a fixed sigma. PSNR against the real window rewards reproducing *this* clip's motion,
which the audio only partly determines; it is bounded by the VAE's reconstruction PSNR.

Hand-over: ``<export_dir>/student.safetensors`` (EMA student, written at every checkpoint save).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dystream.diffusion.rollout import CacheWrite, RenoiseMode, student_rollout
from dystream.diffusion.schedule import add_noise, frame_sigmas
from dystream.models.discriminator import ConsistencyAwareDiscriminator, DiscriminatorConfig, DiscriminatorOutput
from dystream.objectives.gan import (
    discriminator_accuracy,
    discriminator_loss,
    discriminator_score,
    double_backward_attention,
    finite_difference_penalty,
    generator_loss,
    gradient_penalty,
)
from dystream.stages.common import EMA, adamw
from dystream.stages.conditioning import AvatarConditioner, build_dit, check_cached_latents, teacher_mask_mode
from dystream.stages.student import StudentStage, build_student, frame_features, frozen, latent_mse

DiscriminatorPresetName = Literal["tiny", "wan2.2-ti2v-5b"]
PenaltyMode = Literal["exact", "finite_difference", "none"]


class GANStage(StudentStage):
    """Relativistic GAN refinement of the student against the consistency-aware discriminator (module docstring).

    Args:
        student: the SiD stage's export (the generator starts here).
        teacher: the teacher stage's export; the discriminator's backbone starts from these weights.
        vae: the VAE stage's export (real latents, validation frames).
        audio: the teacher stage's audio encoder export.
        student_overrides: block-causal layout fields to change from the student file's config.
        text_context: the fixed prompt's text-encoder output (file or zoo entry) for real presets, whose weight files
            do not carry it; set on the student and the discriminator. Tiny presets learn a constant instead.
        student_steps: the student's denoising steps N (§4.1: 3).
        shift: timestep shift of the student's sigmas; None = the teacher's (recorded in its export).
        cache_write: ``noisy`` (paper: the last step's input is cached) or ``clean`` (Self-Forcing).
        renoise_mode: ``fresh`` noise or the deterministic ``ode`` step between the student's steps.
        grad_chunks: how many trailing chunks carry gradient in the generator update; None = all.
        same_exit_step: one exit step for all chunks of a rollout instead of one per chunk.
        d_preset: discriminator head preset (:data:`~dystream.models.discriminator.DISCRIMINATOR_PRESETS`);
            the backbone is the teacher's.
        feature_layers: blocks after which the Q-Formers read the backbone (one per Q-Former, non-decreasing);
            None = the preset's (evenly spaced for another depth).
        num_qformers: N_Q (§4.1: 3).
        global_branch: the global consistency head; False is the "GAN w/o D_CA" ablation.
        d_audio: condition the discriminator on the talk/listen audio (so it can judge lip and listening motion).
        train_d_backbone: train the discriminator's backbone too (public practice), else only the Q-Formers and heads.
        frame_weight: weight of the per-frame (local realism) pairing loss.
        global_weight: weight of the global (consistency) pairing loss.
        sigma_shift: shift of the uniform sigma at which real and fake are noised; None = the teacher's (Wan: 5).
        min_sigma: lower clamp of that sigma.
        max_sigma: upper clamp of that sigma.
        penalty: ``exact`` R1/R2 (double backward; small models), ``finite_difference`` (APT; large or sharded
            models), or ``none``.
        r1_gamma: R1 weight gamma on real inputs (exact: gamma/2 ||grad||^2; finite difference: lambda = gamma/2).
        r2_gamma: R2 weight gamma on fake inputs.
        fd_sigma: perturbation size of the finite-difference penalty (Self-Forcing: 0.01).
        d_warmup_steps: discriminator-only steps before the first generator update.
        generator_every: one generator update every this many discriminator updates (the D/G update ratio).
        lr: generator learning rate (paper: 5e-6 at batch 32 for the 5B model, 1400 steps).
        d_lr_multiplier: discriminator learning rate = ``lr * d_lr_multiplier``.
        betas: AdamW betas of both optimizers (R3GAN, Self-Forcing: beta1 = 0).
        weight_decay: AdamW weight decay of both optimizers.
        grad_clip: gradient-norm clip of both updates (0 = none).
        ema_decay: decay of the EMA of the student (per generator update).
        ema_start_step: generator update from which the EMA decays.
        saturation_steps: discriminator steps the accuracy's running mean may sit near 0 or 1 before a warning.
        saturation_margin: "near": within this distance of 0 or 1.
        export_dir: where ``student.safetensors`` is written.
    """

    stage_name = "stage2_gan"
    frozen_networks = ("cond",)

    def __init__(
        self,
        student: str = "runs/stage1_sid/student.safetensors",
        teacher: str = "runs/teacher/teacher.safetensors",
        vae: str = "runs/vae/vae.safetensors",
        audio: str = "runs/teacher/audio.safetensors",
        student_overrides: dict[str, int | bool | None] | None = None,
        text_context: str | None = None,
        student_steps: PositiveInt = 3,
        shift: PositiveFloat | None = None,
        cache_write: CacheWrite = "noisy",
        renoise_mode: RenoiseMode = "fresh",
        grad_chunks: PositiveInt | None = None,
        same_exit_step: bool = False,
        d_preset: DiscriminatorPresetName = "tiny",
        feature_layers: list[NonNegativeInt] | None = None,
        num_qformers: PositiveInt = 3,
        global_branch: bool = True,
        d_audio: bool = True,
        train_d_backbone: bool = True,
        frame_weight: NonNegativeFloat = 1.0,
        global_weight: NonNegativeFloat = 1.0,
        sigma_shift: PositiveFloat | None = None,
        min_sigma: ClosedUnitInterval = 0.02,
        max_sigma: ClosedUnitInterval = 0.98,
        penalty: PenaltyMode = "exact",
        r1_gamma: NonNegativeFloat = 0.1,
        r2_gamma: NonNegativeFloat = 0.1,
        fd_sigma: PositiveFloat = 0.01,
        d_warmup_steps: NonNegativeInt = 0,
        generator_every: PositiveInt = 1,
        lr: PositiveFloat = 1e-5,
        d_lr_multiplier: PositiveFloat = 1.0,
        betas: tuple[ClosedUnitInterval, ClosedUnitInterval] = (0.0, 0.999),
        weight_decay: NonNegativeFloat = 0.0,
        grad_clip: NonNegativeFloat = 1.0,
        ema_decay: ClosedUnitInterval = 0.99,
        ema_start_step: NonNegativeInt = 0,
        saturation_steps: PositiveInt = 50,
        saturation_margin: ClosedUnitInterval = 0.02,
        export_dir: str = "runs/stage2_gan",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < min_sigma < max_sigma < 1.0:
            raise ValueError(f"GANStage: need 0 < min_sigma < max_sigma < 1, got {min_sigma}, {max_sigma}")
        if penalty not in ("exact", "finite_difference", "none"):
            raise ValueError(f"GANStage.penalty must be 'exact', 'finite_difference' or 'none', got {penalty!r}")
        if cache_write not in ("noisy", "clean"):
            raise ValueError(f"GANStage.cache_write must be 'noisy' or 'clean', got {cache_write!r}")
        if frame_weight == 0 and (global_weight == 0 or not global_branch):
            raise ValueError("GANStage: frame_weight and global_weight (or global_branch) leave no loss at all")
        self.automatic_optimization = False
        self.cond = AvatarConditioner(vae=vae, audio=audio, mask_mode=teacher_mask_mode(teacher))
        self.student = build_student(student, self.cond, student_overrides)
        # the preset is unused when weights are given
        backbone = build_dit("tiny", self.cond, init_weights=teacher, text_context=text_context)
        if text_context is not None:
            self.student.set_text_context(backbone.fixed_text_context)
        d_config = DiscriminatorConfig.from_preset(
            d_preset,
            backbone=backbone.config,
            num_qformers=num_qformers,
            global_branch=global_branch,
            **({"feature_layers": tuple(feature_layers)} if feature_layers is not None else {}),
        )
        self.discriminator = ConsistencyAwareDiscriminator.from_backbone(backbone, d_config)
        del backbone
        # parameters that can never get a gradient stay frozen (DDP would otherwise wait for them)
        never_used = self.discriminator.unused_modules()
        if not d_audio:
            never_used += [m for n, m in self.discriminator.backbone.named_modules() if _is_audio_module(n)]
        if not train_d_backbone:
            never_used.append(self.discriminator.backbone)
        for module in never_used:
            module.requires_grad_(False)
        self.ema = EMA(self.student, decay=ema_decay, start_step=ema_start_step)
        self.set_timesteps(teacher, student_steps, shift, sigma_shift)
        self.export_dir = Path(export_dir)
        self.register_buffer("gan_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("d_acc_ema", torch.full((), 0.5))
        self.register_buffer("saturated_steps", torch.zeros((), dtype=torch.long))

    def grad_chunk_indices(self, num_chunks: int) -> list[int]:
        k = self.hparams.grad_chunks
        return list(range(0 if k is None else max(0, num_chunks - k), num_chunks))

    # -- inputs -------------------------------------------------------------------------------------
    def real_latents(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Real latents ``[B, z, 1 + T/4, h, w]`` of the window (frame 0 the reference) and the audio conditions."""
        if "video" not in batch and "latents" not in batch:
            raise ValueError(
                "GANStage needs real windows: batches from SpeakerVidDataModule (key 'video') or LatentDataModule "
                "(key 'latents'), not ODE pairs"
            )
        real = self.cond.batch_latents(batch)
        return real, self.cond.audio_conditions(batch)

    def rollout(
        self, reference: Tensor, cond: dict[str, Tensor], with_grad: bool, generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[int]]:
        """Student-forcing sample ``[B, z, F, h, w]`` from ``reference [B, z, 1, h, w]``; the chunks with gradient."""
        n_chunks = self.num_chunks(cond["audio_talk"])
        chunks = self.grad_chunk_indices(n_chunks) if with_grad else []
        res = student_rollout(
            self.student,
            reference,
            n_chunks,
            self.sigmas.to(reference.device, reference.dtype),
            cond["audio_talk"],
            cond["audio_listen"],
            exit_steps=self.draw_exit_steps(n_chunks),
            grad_chunks=chunks,
            cache_write=self.hparams.cache_write,
            renoise_mode=self.hparams.renoise_mode,
            generator=generator,
        )
        return res.latents, chunks

    def noised_pair(
        self, real: Tensor, fake: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Real and fake noised at the same sigma ``[B, F]`` (reference clean) with the same noise."""
        if real.shape != fake.shape:
            raise ValueError(
                f"GANStage: real latents {tuple(real.shape)} and the student's sample {tuple(fake.shape)} differ; "
                f"the window must be a whole number of chunks of {self.student.config.chunk_frames} latent frames"
            )
        b, _, f = real.shape[:3]
        sigma = frame_sigmas(self.draw_sigma(b, real.device, generator).to(real.dtype), f)
        eps = torch.randn(real.shape, generator=generator, device="cpu").to(real.device, real.dtype)
        return add_noise(real, eps, sigma), add_noise(fake, eps, sigma), sigma

    def judge(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> DiscriminatorOutput:
        audio = cond if self.hparams.d_audio else {}
        return self.discriminator(x, sigma, **audio)

    def score(self, out: DiscriminatorOutput) -> Tensor:
        return discriminator_score(out, self.hparams.frame_weight, self.hparams.global_weight)

    # -- the two losses -----------------------------------------------------------------------------
    def discriminator_step_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_D + R1 + R2`` on the batch's real window and a fresh detached student rollout."""
        h = self.hparams
        real, cond = self.real_latents(batch)
        with torch.no_grad():
            fake, _ = self.rollout(real[:, :, :1], cond, with_grad=False)
        x_real, x_fake, sigma = self.noised_pair(real, fake)
        exact = h.penalty == "exact"
        penalised = {"real": exact and h.r1_gamma > 0, "fake": exact and h.r2_gamma > 0}
        outs, scores, inputs = {}, {}, {}
        with double_backward_attention() if any(penalised.values()) else nullcontext():
            for name, x in (("real", x_real), ("fake", x_fake)):
                # the penalties differentiate w.r.t. the judged frames; frame 0 (the reference) is the condition
                gen = x[:, :, 1:].detach().requires_grad_(penalised[name])
                outs[name] = self.judge(torch.cat([x[:, :, :1], gen], dim=2), sigma, cond)
                scores[name], inputs[name] = self.score(outs[name]), gen
            loss_adv = discriminator_loss(outs["real"], outs["fake"], h.frame_weight, h.global_weight)
            r1 = self._penalty("real", h.r1_gamma, scores, inputs, x_real, sigma, cond)
            r2 = self._penalty("fake", h.r2_gamma, scores, inputs, x_fake, sigma, cond)
        acc = discriminator_accuracy(scores["real"], scores["fake"])
        per_branch = {"d_acc_frame": discriminator_accuracy(outs["real"].frame_logits, outs["fake"].frame_logits)}
        if outs["real"].global_logit is not None:
            per_branch["d_acc_global"] = discriminator_accuracy(outs["real"].global_logit, outs["fake"].global_logit)
        logs = {
            **per_branch,
            "loss_d_adv": loss_adv.detach(),
            "r1": r1.detach(),
            "r2": r2.detach(),
            "d_acc": acc,
            "logit_real": scores["real"].detach().mean(),
            "logit_fake": scores["fake"].detach().mean(),
            "sigma": sigma[:, 1].mean(),
        }
        return loss_adv + r1 + r2, logs

    def _penalty(self, name, gamma, scores, inputs, x, sigma, cond) -> Tensor:
        h = self.hparams
        if h.penalty == "none" or gamma == 0:
            return scores[name].new_zeros(())
        if h.penalty == "exact":
            return gradient_penalty(scores[name], inputs[name], gamma)
        ref = x[:, :, :1]

        def score_fn(gen: Tensor) -> Tensor:
            return self.score(self.judge(torch.cat([ref, gen], dim=2), sigma, cond))

        return finite_difference_penalty(score_fn, inputs[name], gamma / 2, h.fd_sigma, score_x=scores[name])

    def generator_step_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_G`` of a rollout with gradient; call inside ``frozen(self.discriminator)`` as ``training_step`` does."""
        h = self.hparams
        real, cond = self.real_latents(batch)
        fake, _ = self.rollout(real[:, :, :1], cond, with_grad=True)
        x_real, x_fake, sigma = self.noised_pair(real, fake)
        with torch.no_grad():  # the real side carries no gradient to anything in this update
            out_real = self.judge(x_real, sigma, cond)
        out_fake = self.judge(x_fake, sigma, cond)
        loss = generator_loss(out_real, out_fake, h.frame_weight, h.global_weight)
        return loss, {"g_logit_fake": self.score(out_fake).detach().mean()}

    # -- Lightning: manual optimisation -------------------------------------------------------------
    def on_fit_start(self) -> None:
        check_cached_latents(getattr(self.trainer, "datamodule", None), self.hparams.vae)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_d, opt_g = self.optimizers()
        b = batch["audio_self"].shape[0]
        loss_d, logs = self.discriminator_step_loss(batch)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        self._clip(opt_d)
        opt_d.step()
        self._monitor_accuracy(logs["d_acc"])
        self.log("train/loss_d", loss_d.detach(), prog_bar=True, batch_size=b)
        self.log("train/d_acc", logs.pop("d_acc"), prog_bar=True, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=b)
        self.log_dict({"train/d_acc_ema": self.d_acc_ema.float(), "train/d_saturated": self._saturated()}, batch_size=b)
        if self.generator_due(int(self.gan_step)):
            with frozen(self.discriminator):  # the generator loss must not train the discriminator
                loss_g, g_logs = self.generator_step_loss(batch)
                opt_g.zero_grad(set_to_none=True)
                self.manual_backward(loss_g)
            self._clip(opt_g)
            opt_g.step()
            self.generator_steps += 1
            self.ema.update(self.student, int(self.generator_steps))
            self.log("train/loss_g", loss_g.detach(), prog_bar=True, batch_size=b)
            self.log_dict({f"train/{k}": v for k, v in g_logs.items()}, batch_size=b)
        self.gan_step += 1

    def generator_due(self, step: int) -> bool:
        """Whether discriminator step ``step`` (0-based) is followed by a generator update."""
        warmup = self.hparams.d_warmup_steps
        return step >= warmup and (step - warmup) % self.hparams.generator_every == 0

    def _saturated(self) -> float:
        return float(int(self.saturated_steps) >= self.hparams.saturation_steps)

    def _monitor_accuracy(self, acc: Tensor) -> None:
        """Running mean of the accuracy; warn once when it sits near 0 or 1 for ``saturation_steps`` steps."""
        self.d_acc_ema.mul_(0.9).add_(0.1 * acc.to(self.d_acc_ema))
        margin = self.hparams.saturation_margin
        mean = float(self.d_acc_ema)
        if mean <= margin or mean >= 1 - margin:
            self.saturated_steps += 1
        else:
            self.saturated_steps.zero_()
        if int(self.saturated_steps) == self.hparams.saturation_steps:
            what = "always beats the generator" if mean >= 0.5 else "has collapsed (fakes score above reals)"
            rank_zero_warn(
                f"GANStage: the discriminator accuracy has stayed at {mean:.3f} for {self.hparams.saturation_steps} "
                f"steps: the discriminator {what}; consider a larger r1_gamma/r2_gamma, a smaller d_lr_multiplier "
                "or generator_every, or more discriminator warm-up"
            )

    def _clip(self, opt) -> None:
        if self.hparams.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        h = self.hparams
        d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        opt_d = adamw(self, d_params, lr=h.lr * h.d_lr_multiplier, betas=tuple(h.betas), weight_decay=h.weight_decay)
        opt_g = adamw(self, self.student.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        return [opt_d, opt_g]

    # -- validation against the real windows --------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_feats: list[tuple[Tensor, Tensor]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "video" not in batch:
            return
        g = torch.Generator().manual_seed(4321 + batch_idx)  # the same noises every validation: comparable curves
        real, cond = self.real_latents(batch)
        ref = real[:, :, :1]
        res = student_rollout(
            self.ema.shadow,
            ref,
            self.num_chunks(cond["audio_talk"]),
            self.sigmas.to(ref.device, ref.dtype),
            cond["audio_talk"],
            cond["audio_listen"],
            cache_write=self.hparams.cache_write,
            renoise_mode=self.hparams.renoise_mode,
            generator=g,
        )
        sample = res.latents
        b = real.shape[0]
        video = self.cond.decode(sample, batch["references"][:, 0])[:, :, 1 : 1 + batch["video"].shape[2]]
        self.log("val/psnr", psnr(video, batch["video"]).mean(), sync_dist=True, batch_size=b)
        self.log("val/latent_mse", latent_mse(sample, real).mean(), sync_dist=True, batch_size=b)
        x_real, x_fake, sigma = self.noised_pair(real, sample, generator=g)
        acc = discriminator_accuracy(
            self.score(self.judge(x_real, sigma, cond)), self.score(self.judge(x_fake, sigma, cond))
        )
        self.log("val/d_acc", acc, sync_dist=True, batch_size=b)
        self._val_feats.append((frame_features(sample).cpu(), frame_features(real).cpu()))
        if batch_idx == 0:
            self._log_real_vs_sample(batch["video"][:1], video[:1])

    def on_validation_epoch_end(self) -> None:
        from dystream.evaluation.frechet import frechet_distance

        feats, self._val_feats = getattr(self, "_val_feats", []), []
        if not feats:
            return
        sample = torch.cat([s for s, _ in feats])
        real = torch.cat([r for _, r in feats])
        if sample.shape[0] >= 2:
            fd = torch.tensor(frechet_distance(sample, real), dtype=torch.float32, device=self.device)
            self.log("val/latent_fd", fd, sync_dist=True)

    def _log_real_vs_sample(self, real: Tensor, sample: Tensor) -> None:
        if self.global_rank != 0 or self._trainer is None:
            return
        logger = getattr(self.logger, "experiment", None)
        if logger is None or not hasattr(logger, "add_image"):
            return
        rows = [torch.cat(list(v[0].unbind(1)), dim=-1) for v in (real, sample)]  # [3, H, T W] each
        strip = torch.cat(rows, dim=-2)  # real above, sample below
        logger.add_image("val/real_vs_student", (strip.clamp(-1, 1) + 1) / 2, self.global_step)

    @property
    def val_cache_write(self) -> CacheWrite:
        return self.hparams.cache_write


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample PSNR in dB of videos ``[B, 3, T, H, W]`` in [-1, 1] (data range 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def _is_audio_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "audio_proj" or (
        len(parts) > 2 and parts[0] == "blocks" and parts[2] in ("audio_attn", "interact_attn")
    )
