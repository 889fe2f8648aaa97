"""Stage 1a: ODE-regression initialisation of the block-causal student (StreamAvatar §3.1.1, after CausVid).

The student starts from the teacher's weights, re-architected to block-causal attention (chunks of
C latent frames, Reference Sink, RAPR), and learns to jump from a stored trajectory state straight to
the trajectory's clean end point (``dystream.objectives.ode_regression``): for every chunk one of the
recorded student timesteps is drawn (the same for all frames of the chunk, a fresh draw per chunk,
as Self-Forcing's ``_get_timestep`` with block tying), and the loss is the MSE of the predicted x0
over the generated frames. Data: ``ODEPairDataModule`` over ``recipes/ode_pairs.yaml``'s shards.

Context of a chunk (``context``):

- ``"noisy"`` (CausVid, the default): one block-causal forward over the whole window, every chunk
  at its own stored state; a chunk sees earlier chunks noisy, as the paper's noisy-cache streaming
  (``cache_write="noisy"``) does.
- ``"clean"``: chunk j is predicted with the clean end points of chunks < j as context (one forward
  per chunk), how an autoregressive teacher made its pairs (``ODEPairsStage(teacher_attention=
  "block_causal")``) and how Self-Forcing's clean cache (``cache_write="clean"``) streams.

Hand-over: ``<export_dir>/student.safetensors`` (EMA student), with the student sigmas and the
audio/VAE files in its metadata; later stages keep using the teacher's audio encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor

from dystream.objectives.ode_regression import gather_chunk_states, ode_regression_loss
from dystream.stages.common import EMA, adamw
from dystream.stages.conditioning import AvatarConditioner, teacher_mask_mode
from dystream.stages.ode_pairs import pad_audio
from dystream.stages.student import StudentStage, build_student

OdeContext = Literal["noisy", "clean"]


class ODEInitStage(StudentStage):
    """Block-causal student regressing the teacher's ODE end points (StreamAvatar §3.1.1).

    Args:
        teacher: the teacher stage's export; the student starts from these weights.
        vae: the VAE stage's export (validation images, SpeakerVid batches).
        audio: the teacher stage's audio encoder export.
        student_overrides: block-causal layout fields to change from the weight file's config
            (``chunk_frames``, ``sink_chunks``, ``window_frames``, ``rapr``, ``rapr_max_distance``,
            ``gradient_checkpointing``); None keeps the preset's defaults.
        student_steps: the student's denoising steps N (§4.1: 3); the pairs must be recorded at them.
        shift: timestep shift of the student's sigmas (as in the pairs); None = the teacher's.
        context: ``noisy`` or ``clean`` context of earlier chunks (module docstring).
        lr: AdamW learning rate (paper: 2e-6 at batch 8 for the 5B model).
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        ema_decay: decay of the EMA of the student.
        ema_start_step: step from which the EMA decays (before it, it copies the weights).
        export_dir: where ``student.safetensors`` is written.
    """

    stage_name = "stage1_ode"

    def __init__(
        self,
        teacher: str = "runs/teacher/teacher.safetensors",
        vae: str = "runs/vae/vae.safetensors",
        audio: str = "runs/teacher/audio.safetensors",
        student_overrides: dict[str, int | bool | None] | None = None,
        student_steps: PositiveInt = 3,
        shift: PositiveFloat | None = None,
        context: OdeContext = "noisy",
        lr: PositiveFloat = 1e-4,
        betas: tuple[ClosedUnitInterval, ClosedUnitInterval] = (0.9, 0.999),
        weight_decay: NonNegativeFloat = 0.0,
        ema_decay: ClosedUnitInterval = 0.99,
        ema_start_step: NonNegativeInt = 0,
        export_dir: str = "runs/stage1_ode",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if context not in ("noisy", "clean"):
            raise ValueError(f"ODEInitStage.context must be 'noisy' or 'clean', got {context!r}")
        self.cond = AvatarConditioner(vae=vae, audio=audio, mask_mode=teacher_mask_mode(teacher))
        self.student = build_student(teacher, self.cond, student_overrides)
        self.ema = EMA(self.student, decay=ema_decay, start_step=ema_start_step)
        self.export_dir = Path(export_dir)
        self.set_timesteps(teacher, student_steps, shift)  # self.sigmas: the recorded timesteps of the pairs

    # -- the objective -------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """ODE-regression loss of a pair batch, one random stored timestep per chunk."""
        states, x0 = batch["states"], batch["x0"]  # [B, K, z, F, h, w], [B, z, F, h, w]
        sigmas = self._pair_sigmas(batch["sigmas"])
        chunk = self.student.config.chunk_frames
        b, k, _, f = states.shape[:4]
        n_chunks = (f - 1) // chunk
        index = torch.randint(0, k, (b, n_chunks), generator=generator, device="cpu").to(states.device)
        x_t, sigma = gather_chunk_states(states, sigmas, index, chunk)
        talk, listen = batch["audio_talk"], batch["audio_listen"]
        if self.hparams.context == "noisy":
            v = self.student(x_t, sigma, talk, listen, attention="block_causal")
        else:
            v = self._clean_context_velocity(x_t, sigma, x0, talk, listen, chunk)
        return ode_regression_loss(v, x_t, sigma, x0)

    def _clean_context_velocity(
        self, x_t: Tensor, sigma: Tensor, x0: Tensor, talk: Tensor, listen: Tensor, chunk: int
    ) -> Tensor:
        """Velocity of every chunk predicted after the clean end points of the chunks before it."""
        look = self.student.config.audio_lookahead_frames
        parts = [torch.zeros_like(x_t[:, :, :1])]  # the reference frame carries no loss (sigma 0)
        for lo in range(1, x_t.shape[2], chunk):
            hi = lo + chunk
            x_in = torch.cat([x0[:, :, :lo], x_t[:, :, lo:hi]], dim=2)
            s_in = torch.cat([torch.zeros_like(sigma[:, :lo]), sigma[:, lo:hi]], dim=1)
            frames = 4 * (hi - 1) + look  # the prefix's audio and the look-ahead the stream would have
            t_in, l_in = pad_audio(talk, frames), pad_audio(listen, frames)
            parts.append(self.student(x_in, s_in, t_in, l_in, attention="block_causal")[:, :, lo:hi])
        return torch.cat(parts, dim=2)

    def _pair_sigmas(self, sigmas: Tensor) -> Tensor:
        """The pairs' stored timesteps, which must be the student's sigmas."""
        mine = self.sigmas.to(sigmas.device, sigmas.dtype)
        if sigmas.shape[1:] != mine.shape or not torch.allclose(sigmas, mine.expand_as(sigmas), atol=1e-6):
            raise ValueError(
                f"ODE pairs were recorded at sigmas {sigmas[0].tolist()}, but the student steps at {mine.tolist()} "
                f"(student_steps={self.hparams.student_steps}, shift={self.shift}); use the same values in "
                "recipes/ode_pairs.yaml and here"
            )
        return sigmas[0]

    # -- Lightning -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x0"].shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # not in on_train_batch_end: a checkpoint saved at this step would miss the update (TeacherStage)
        self.ema.update(self.student, self.global_step)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.loss(batch, generator=torch.Generator().manual_seed(1234 + batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["x0"].shape[0])
        super().validation_step(batch, batch_idx)

    def configure_optimizers(self):
        h = self.hparams
        return adamw(self, self.student.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)

    @property
    def val_cache_write(self):
        return "clean" if self.hparams.context == "clean" else "noisy"
