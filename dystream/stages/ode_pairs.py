"""ODE pairs: record the frozen teacher's sampling trajectories at the student's timesteps (a predict run).

StreamAvatar §3.1.1 (after CausVid, notes/distillation.md §1.3 and §2): the teacher samples avatar
videos from reference images and audio, and its Euler trajectory is kept only at the few-step
student's noise levels. The teacher grid is built so that the student's sigmas lie exactly on it
(same shift, a step count divisible by the student's: shift(1 - k/N) is then a grid point), so the
recorded states are true trajectory states, not interpolations.

Two teachers (``teacher_attention``):

- ``"bidirectional"`` (CausVid / Self-Forcing): the whole window is sampled at once.
- ``"block_causal"``: the teacher's weights sample chunk by chunk in block-causal mode, each chunk
  conditioned on the clean chunks before it (an autoregressive teacher, Causal Forcing's causal
  ODE init). Users of Self-Forcing found ODE pairs from a bidirectional teacher gave block-boundary
  discontinuities on Wan2.2-5B and needed this (issue #64, notes §0.5 and §14.5); it is meant for
  a teacher fine-tuned in block-causal mode. The ODE stage's ``context="clean"`` trains on such
  pairs with the same clean context.

Output: ``<out_dir>/{train,val}-r<rank>-<n>.tar`` and ``<out_dir>/index.json``
(:mod:`dystream.datamodules.ode_pairs`); the index is written only after every rank finished, and
the Makefile takes it as "this stage is done".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dystream.datamodules.ode_pairs import (
    PairShardWriter,
    clear_pairs,
    clip_noise_seed,
    reference_to_uint8,
    write_pair_index,
)
from dystream.diffusion.sampling import AudioGuidance, sample_euler
from dystream.diffusion.schedule import nearest_step_indices, sampling_sigmas, student_sigmas
from dystream.stages.common import freeze, teacher_shift
from dystream.stages.conditioning import AvatarConditioner, build_dit, teacher_mask_mode

TeacherAttention = Literal["bidirectional", "block_causal"]


def pad_audio(audio: Tensor | None, frames: int) -> Tensor | None:
    """The first ``frames`` video frames of ``audio [B, T, D]``, zero-padded past its end (end of stream)."""
    if audio is None:
        return None
    out = audio[:, :frames]
    return torch.nn.functional.pad(out, (0, 0, 0, frames - out.shape[1]))


class ODEPairsStage(L.LightningModule):
    """Frozen teacher -> ODE-pair shards (run with ``dystream predict --config recipes/ode_pairs.yaml``).

    Args:
        teacher: the teacher stage's export (EMA DiT).
        vae: the VAE stage's export (encodes the reference image).
        audio: the teacher stage's audio encoder export (later stages reuse exactly this encoder).
        teacher_steps: Euler steps of the teacher; must be divisible by ``student_steps``.
        student_steps: the student's denoising steps N (StreamAvatar §4.1: 3).
        shift: timestep shift of both grids; None = the teacher's (recorded in its export; Wan2.2: 5).
        guidance_scale: audio classifier-free guidance of the teacher (1 = none).
        teacher_attention: ``bidirectional`` or ``block_causal`` (see the module docstring).
        out_dir: where the shards and index.json go (cleared at the start of a run).
        shard_samples: pairs per shard.
        seed: seed of the per-clip starting noise (noise depends on the clip key only).
    """

    def __init__(
        self,
        teacher: str = "runs/teacher/teacher.safetensors",
        vae: str = "runs/vae/vae.safetensors",
        audio: str = "runs/teacher/audio.safetensors",
        teacher_steps: PositiveInt = 24,
        student_steps: PositiveInt = 3,
        shift: PositiveFloat | None = None,
        guidance_scale: NonNegativeFloat = 3.0,
        teacher_attention: TeacherAttention = "bidirectional",
        out_dir: str = "runs/ode_pairs/pairs",
        shard_samples: PositiveInt = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.shift = teacher_shift(teacher, shift)
        self.grid = sampling_sigmas(teacher_steps, self.shift)  # [S + 1], float64
        self.student = student_sigmas(student_steps, self.shift)  # [N]
        try:
            self.record_steps = nearest_step_indices(self.grid, self.student)
        except ValueError as err:
            raise ValueError(
                f"ODEPairsStage: teacher_steps={teacher_steps} must be divisible by student_steps={student_steps} "
                f"so that the student's sigmas lie on the teacher's grid ({err})"
            ) from None
        if teacher_attention not in ("bidirectional", "block_causal"):
            raise ValueError(
                f"ODEPairsStage.teacher_attention must be bidirectional or block_causal, got {teacher_attention!r}"
            )
        self.cond = AvatarConditioner(vae=vae, audio=audio, mask_mode=teacher_mask_mode(teacher))
        self.teacher = freeze(build_dit("tiny", self.cond, init_weights=teacher))  # frozen here and only here
        self.guidance = AudioGuidance(scale=guidance_scale)
        self.out_dir = Path(out_dir)
        self._writers: dict[str, PairShardWriter] = {}

    # -- the teacher as a denoiser ------------------------------------------------------------------
    def _denoiser(self, attention: TeacherAttention):
        def call(x: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
            return self.teacher(x, sigma, attention=attention, **cond)

        return call

    def _noise(self, keys: list[str], shape: tuple[int, ...], device: torch.device) -> Tensor:
        gens = [torch.Generator().manual_seed(clip_noise_seed(self.hparams.seed, k)) for k in keys]
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)

    @torch.no_grad()
    def record(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Teacher trajectories of a batch of prompts (reference + audio; the window's video is not used).

        Returns ``states [B, K, z, F, h, w]`` (K = student steps; states[:, 0] is the starting noise at
        sigma 1), ``sigmas [K]``, ``x0 [B, z, F, h, w]``, ``audio_talk``/``audio_listen [B, T, D]``.
        """
        reference = batch["references"][:, 0]
        t = batch["audio_self"].shape[-1] // 640
        chunk = self.teacher.config.chunk_frames
        if t % (4 * chunk):
            raise ValueError(
                f"ODE pairs: windows of {t} frames; the student needs whole chunks of {chunk} latent frames, so "
                f"window_frames must be a multiple of {4 * chunk}"
            )
        z_ref = self.cond.encode_reference(reference)  # [B, z, 1, h, w]
        cond = self.cond.audio_conditions(batch)
        b, z, _, h, w = z_ref.shape
        f = 1 + t // 4
        noise = self._noise(list(batch["key"]), (z, f - 1, h, w), z_ref.device)
        x_init = torch.cat([z_ref, noise], dim=2)
        grid = self.grid.to(z_ref.device)
        if self.hparams.teacher_attention == "bidirectional":
            x0, traj = sample_euler(
                self._denoiser("bidirectional"),
                x_init,
                cond,
                grid,
                guidance=self.guidance,
                record_steps=self.record_steps,
            )
            states = traj.states[:, :-1]  # the last entry is x0 itself
        else:
            x0, states = self._record_autoregressive(x_init, cond, grid, chunk)
        return {"states": states, "sigmas": self.student.clone(), "x0": x0, **cond}

    def _record_autoregressive(self, x_init: Tensor, cond: dict[str, Tensor], grid: Tensor, chunk: int):
        """Chunk by chunk with the block-causal teacher, each chunk after the clean chunks before it."""
        look = self.teacher.config.audio_lookahead_frames
        x = x_init[:, :, :1]  # the clean prefix so far
        chunk_states = []
        for lo in range(1, x_init.shape[2], chunk):
            hi = lo + chunk
            cond_j = {k: pad_audio(v, 4 * (hi - 1) + look) for k, v in cond.items()}
            prefix_and_noise = torch.cat([x, x_init[:, :, lo:hi]], dim=2)
            x, traj = sample_euler(
                self._denoiser("block_causal"),
                prefix_and_noise,
                cond_j,
                grid,
                guidance=self.guidance,
                num_clean_frames=lo,
                record_steps=self.record_steps,
            )
            chunk_states.append(traj.states[:, :-1, :, lo:hi])
        ref = x_init[:, None, :, :1].expand(-1, len(self.record_steps), -1, -1, -1, -1)
        return x, torch.cat([ref, *chunk_states], dim=3)

    # -- predict: record and write ------------------------------------------------------------------
    def _rank(self) -> int:
        return int(self._trainer.global_rank) if self._trainer is not None else 0

    def _barrier(self) -> None:
        if self._trainer is not None:
            self._trainer.strategy.barrier()

    def on_predict_start(self) -> None:
        if self._rank() == 0:
            clear_pairs(self.out_dir)  # a new run replaces the old pairs; the index goes first
        self._barrier()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Record the batch's pairs into the shards; returns their names (a step that returns None makes Lightning
        warn once per run; the recipe sets ``return_predictions: false``, so nothing accumulates)."""
        split = batch.get("split", "train")
        names = []
        out = self.record(batch)
        if split not in self._writers:
            self._writers[split] = PairShardWriter(self.out_dir, split, self._rank(), self.hparams.shard_samples)
        starts = batch.get("start", [None] * len(batch["key"]))
        for i, key in enumerate(batch["key"]):
            tensors = {
                "states": out["states"][i],
                "sigmas": out["sigmas"],
                "x0": out["x0"][i],
                "audio_talk": out["audio_talk"][i],
                "audio_listen": out["audio_listen"][i],
                "mask": batch["mask"][i],
                "audio_self": batch["audio_self"][i],
                "audio_other": batch["audio_other"][i],
                "reference": reference_to_uint8(batch["references"][i, 0]),
            }
            start = starts[i]
            name = key if start is None else f"{key}_w{int(start):05d}"
            self._writers[split].write(name, tensors, {"clip": key, "start": start})
            names.append(name)
        return names

    def on_predict_end(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
        self._barrier()
        if self._rank() == 0:
            index = write_pair_index(self.out_dir, **self.settings())
            rank_zero_info(f"ODE pairs: {index['splits']} pairs in {self.out_dir}")

    def settings(self) -> dict[str, Any]:
        """What the index records about how the pairs were made."""
        h = self.hparams
        return {
            "teacher": h.teacher,
            "vae": h.vae,
            "audio": h.audio,
            "teacher_steps": h.teacher_steps,
            "student_steps": h.student_steps,
            "shift": self.shift,
            "guidance_scale": h.guidance_scale,
            "teacher_attention": h.teacher_attention,
            "student_sigmas": self.student.tolist(),
            "record_steps": self.record_steps,
            "chunk_frames": self.teacher.config.chunk_frames,
            "seed": h.seed,
        }
