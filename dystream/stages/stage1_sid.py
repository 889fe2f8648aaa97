"""Stage 1b: Score identity Distillation of the block-causal student with student forcing (StreamAvatar §3.1.1).

Three networks (notes/distillation.md §1.3, §6, §14.6):

- the **student** generator (from the ODE-init export), block-causal, trained;
- the **teacher** (real score), bidirectional, frozen here and only here, audio CFG through
  :func:`~dystream.diffusion.sampling.predict_x0`;
- the **fake score**, bidirectional, initialised from the teacher and trained with the
  flow-matching loss on the student's (detached) samples, so it tracks the student's distribution.

One training step (one batch of prompts: reference + audio):

1. every ``generator_every`` steps, a **generator update**: the student rolls out the window chunk
   by chunk through its KV cache, each chunk conditioned on its own earlier output (student forcing,
   :func:`~dystream.diffusion.rollout.student_rollout`; ``cache_write="noisy"``, the paper's choice,
   or ``"clean"``, Self-Forcing's), with a random exit step per chunk drawn on rank 0 and broadcast, and
   gradient only through the last ``grad_chunks`` chunks. The sample ``x_g`` is noised at a shifted,
   clamped sigma (reference frame clean at sigma 0); teacher and fake score predict x0 in bidirectional
   mode, and :func:`~dystream.objectives.sid.sid_generator_loss` (float64, ``alpha``, ``weighting``)
   is backpropagated into the student through ``x_g`` and through both score networks' inputs, with the
   fake score's parameters frozen for the whole update;
2. a **fake-score update**: a fresh rollout without gradient, noised at a fresh sigma, and the fake
   score's flow-matching loss on it (:func:`~dystream.objectives.sid.fake_score_loss`).

Manual optimisation with two AdamW optimizers (betas (0, 0.999), public SiD / Self-Forcing code),
gradient clipping done here (``grad_clip``), EMA of the student after every generator update. The step
counters (``sid_step``, ``generator_steps``) are buffers, so a resumed run continues the same
alternation. Lightning's ``global_step`` counts optimizer steps of both optimizers, so set the run
length with epochs (``ODEPairDataModule.samples_per_epoch`` x ``max_epochs``), not ``max_steps``.
Under DDP use ``find_unused_parameters=True``: each update touches one of the two networks.

Hand-over: ``<export_dir>/student.safetensors`` (EMA student).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor

from dystream.diffusion.rollout import CacheWrite, RenoiseMode, student_rollout
from dystream.diffusion.sampling import AudioGuidance, predict_x0
from dystream.diffusion.schedule import add_noise, expand_sigma, frame_sigmas
from dystream.objectives.sid import SiDWeighting, fake_score_loss, sid_generator_loss
from dystream.stages.common import EMA, adamw, freeze
from dystream.stages.conditioning import AvatarConditioner, build_dit, teacher_mask_mode
from dystream.stages.student import StudentStage, build_student, frozen


class SiDStage(StudentStage):
    """SiD with student forcing: student + fake score trained, teacher frozen (module docstring).

    Args:
        student: the ODE-init stage's export (the generator starts here).
        teacher: the teacher stage's export (real score; the fake score starts from it too).
        vae: the VAE stage's export (validation images, SpeakerVid batches).
        audio: the teacher stage's audio encoder export.
        student_overrides: block-causal layout fields to change from the student file's config.
        student_steps: the student's denoising steps N (§4.1: 3).
        shift: timestep shift of the student's sigmas; None = the teacher's (recorded in its export).
        cache_write: ``noisy`` (paper: the last step's input is cached) or ``clean`` (Self-Forcing).
        renoise_mode: ``fresh`` noise or the deterministic ``ode`` step between the student's steps.
        grad_chunks: how many trailing chunks carry gradient and the generator loss; None = all.
        same_exit_step: one exit step for all chunks of a rollout instead of one per chunk.
        alpha: SiD's alpha (1 in Self-Forcing, 1.2 in SiD).
        weighting: ``legacy`` (1 / mean|x_g - f_real|) or ``one_minus_sigma`` (SiD for flow models).
        guidance_scale: audio CFG of the teacher's x0 prediction (as the pairs were recorded).
        sigma_shift: shift of the sigma at which the student's sample is noised; None = the teacher's (Wan: 5).
        min_sigma: lower clamp of that sigma (Self-Forcing: timestep 20 of 1000).
        max_sigma: upper clamp (timestep 980 of 1000).
        generator_every: a generator update every this many steps (public code: 5); the fake score updates every step.
        lr: generator learning rate (paper: 3e-6 at batch 16 for the 5B model).
        lr_fake: fake-score learning rate.
        betas: AdamW betas of both optimizers.
        weight_decay: AdamW weight decay of both optimizers.
        grad_clip: gradient-norm clip of both updates (0 = none).
        ema_decay: decay of the EMA of the student (per generator update).
        ema_start_step: generator update from which the EMA decays.
        export_dir: where ``student.safetensors`` is written.
    """

    stage_name = "stage1_sid"
    frozen_networks = ("cond", "teacher")

    def __init__(
        self,
        student: str = "runs/stage1_ode/student.safetensors",
        teacher: str = "runs/teacher/teacher.safetensors",
        vae: str = "runs/vae/vae.safetensors",
        audio: str = "runs/teacher/audio.safetensors",
        student_overrides: dict[str, int | bool | None] | None = None,
        student_steps: PositiveInt = 3,
        shift: PositiveFloat | None = None,
        cache_write: CacheWrite = "noisy",
        renoise_mode: RenoiseMode = "fresh",
        grad_chunks: PositiveInt | None = None,
        same_exit_step: bool = False,
        alpha: float = 1.0,
        weighting: SiDWeighting = "legacy",
        guidance_scale: NonNegativeFloat = 3.0,
        sigma_shift: PositiveFloat | None = None,
        min_sigma: ClosedUnitInterval = 0.02,
        max_sigma: ClosedUnitInterval = 0.98,
        generator_every: PositiveInt = 5,
        lr: PositiveFloat = 2e-5,
        lr_fake: PositiveFloat = 2e-5,
        betas: tuple[ClosedUnitInterval, ClosedUnitInterval] = (0.0, 0.999),
        weight_decay: NonNegativeFloat = 0.0,
        grad_clip: NonNegativeFloat = 1.0,
        ema_decay: ClosedUnitInterval = 0.99,
        ema_start_step: NonNegativeInt = 0,
        export_dir: str = "runs/stage1_sid",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < min_sigma < max_sigma < 1.0:
            raise ValueError(f"SiDStage: need 0 < min_sigma < max_sigma < 1, got {min_sigma}, {max_sigma}")
        if cache_write not in ("noisy", "clean"):
            raise ValueError(f"SiDStage.cache_write must be 'noisy' or 'clean', got {cache_write!r}")
        if weighting not in ("legacy", "one_minus_sigma"):
            raise ValueError(f"SiDStage.weighting must be 'legacy' or 'one_minus_sigma', got {weighting!r}")
        self.automatic_optimization = False
        self.cond = AvatarConditioner(vae=vae, audio=audio, mask_mode=teacher_mask_mode(teacher))
        self.student = build_student(student, self.cond, student_overrides)
        self.teacher = freeze(build_dit("tiny", self.cond, init_weights=teacher))  # frozen here and only here
        self.fake_score = build_student(teacher, self.cond)  # trainable copy of the teacher
        self.ema = EMA(self.student, decay=ema_decay, start_step=ema_start_step)
        self.guidance = AudioGuidance(scale=guidance_scale)
        self.set_timesteps(teacher, student_steps, shift, sigma_shift)
        self.export_dir = Path(export_dir)
        self.register_buffer("sid_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))

    def grad_chunk_indices(self, num_chunks: int) -> list[int]:
        k = self.hparams.grad_chunks
        return list(range(0 if k is None else max(0, num_chunks - k), num_chunks))

    # -- the two losses ----------------------------------------------------------------------------
    def rollout(self, batch: dict[str, Any], with_grad: bool) -> tuple[Tensor, list[int], list[int], dict]:
        """Student-forcing sample ``[B, z, F, h, w]``, the chunks with gradient, the exit steps, the conditions."""
        ref, cond = self.conditions(batch)
        n_chunks = self.num_chunks(cond["audio_talk"])
        chunks = self.grad_chunk_indices(n_chunks) if with_grad else []
        exits = self.draw_exit_steps(n_chunks)
        res = student_rollout(
            self.student,
            ref,
            n_chunks,
            self.sigmas.to(ref.device, ref.dtype),
            cond["audio_talk"],
            cond["audio_listen"],
            exit_steps=exits,
            grad_chunks=chunks,
            cache_write=self.hparams.cache_write,
            renoise_mode=self.hparams.renoise_mode,
        )
        return res.latents, chunks, exits, cond

    def _chunk_frames(self, num_frames: int, chunks: list[int], device: torch.device) -> Tensor:
        """Boolean ``[F]``: the latent frames of ``chunks`` (the reference frame never)."""
        c = self.student.config.chunk_frames
        mask = torch.zeros(num_frames, dtype=torch.bool, device=device)
        for j in chunks:
            mask[1 + j * c : 1 + (j + 1) * c] = True
        return mask

    def _score(self, net, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance: AudioGuidance | None):
        def denoiser(x_: Tensor, s_: Tensor, c_: dict[str, Any]) -> Tensor:
            return net(x_, s_, attention="bidirectional", **c_)

        return predict_x0(denoiser, x, sigma, cond, guidance)

    def generator_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """SiD generator loss of one rollout (call inside ``frozen(self.fake_score)``, as ``training_step`` does)."""
        x_g, chunks, exits, cond = self.rollout(batch, with_grad=True)
        b, _, f = x_g.shape[:3]
        sigma = frame_sigmas(self.draw_sigma(b, x_g.device).to(x_g.dtype), f)  # [B, F], reference 0
        eps = torch.randn_like(x_g)
        x_sigma = add_noise(x_g, eps, sigma)
        f_real = self._score(self.teacher, x_sigma, sigma, cond, self.guidance)
        f_fake = self._score(self.fake_score, x_sigma, sigma, cond, None)
        frame_mask = self._chunk_frames(f, chunks, x_g.device)
        loss = sid_generator_loss(
            x_g,
            f_real,
            f_fake,
            expand_sigma(sigma, x_g),
            alpha=self.hparams.alpha,
            weighting=self.hparams.weighting,
            frame_mask=frame_mask,
        )
        return loss, {"sigma": float(sigma[:, 1].mean()), "exit_step": sum(exits) / len(exits)}

    def fake_score_loss(self, batch: dict[str, Any]) -> Tensor:
        """Flow-matching loss of the fake score on a fresh, detached student rollout."""
        with torch.no_grad():
            x_g, _, _, cond = self.rollout(batch, with_grad=False)
        b, _, f = x_g.shape[:3]
        sigma = frame_sigmas(self.draw_sigma(b, x_g.device).to(x_g.dtype), f)
        eps = torch.randn_like(x_g)
        v = self.fake_score(add_noise(x_g, eps, sigma), sigma, attention="bidirectional", **cond)
        return fake_score_loss(v, x_g, eps, frame_mask=self._chunk_frames(f, list(range(f)), x_g.device))

    # -- Lightning: manual optimisation ------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_fake, opt_gen = self.optimizers()
        b = len(batch["key"])
        if int(self.sid_step) % self.hparams.generator_every == 0:
            with frozen(self.fake_score):  # the generator loss must not train the fake score
                loss_g, logs = self.generator_loss(batch)
                opt_gen.zero_grad(set_to_none=True)
                self.manual_backward(loss_g)
            self._clip(opt_gen)
            opt_gen.step()
            self.generator_steps += 1
            self.ema.update(self.student, int(self.generator_steps))
            self.log("train/loss_generator", loss_g.float(), prog_bar=True, batch_size=b)
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=b)
        loss_f = self.fake_score_loss(batch)
        opt_fake.zero_grad(set_to_none=True)
        self.manual_backward(loss_f)
        self._clip(opt_fake)
        opt_fake.step()
        self.sid_step += 1
        self.log("train/loss_fake", loss_f, prog_bar=True, batch_size=b)

    def _clip(self, opt) -> None:
        if self.hparams.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        h = self.hparams
        fake = adamw(
            self, self.fake_score.parameters(), lr=h.lr_fake, betas=tuple(h.betas), weight_decay=h.weight_decay
        )
        gen = adamw(self, self.student.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        return [fake, gen]

    @property
    def val_cache_write(self) -> CacheWrite:
        return self.hparams.cache_write
