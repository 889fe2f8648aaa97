"""What the two stage-1 student stages share: building the block-causal student, conditions, validation, hand-over.

The student is the teacher re-architected (StreamAvatar §3.1.1): the same weights, run with
block-causal attention (chunks of C latent frames, Reference Sink, RAPR, rolling window), which
"preserves the original network weights". Its layout comes from the DiT config in the weight file
(the preset's defaults: C = 3, sink = reference + 1 chunk, window 6, D = 10, §4.1); a stage may
override layout fields only (none of them changes a parameter's shape).

Validation on ODE-pair batches (``dystream.datamodules.ODEPairDataModule``'s held-out split) is the
same for both stages and measures the student against the teacher:

- ``val/teacher_mse``: latent MSE between the EMA student's few-step sample and the teacher's
  sample from the *same* reference, audio and starting noise (the recorded trajectory's sigma-1
  state), over the generated frames. It rewards reproducing the teacher's deterministic
  noise-to-sample map, which ODE regression learns; a student that re-noises with fresh noise
  between its steps (Self-Forcing's rollout) is only asked to match the teacher's *distribution*.
- ``val/teacher_fd``: Fréchet distance between the student's samples from *fresh* starting noise
  and the teacher's recorded samples, with :func:`frame_features` (per generated latent frame, the
  per-channel spatial mean and std), over the validation split (per rank under DDP, then averaged).
  Fresh noise keeps the two sets independent, so the distance compares distributions; its floor
  (two independent teacher sample sets) comes from :func:`teacher_distances`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from dystream.diffusion.rollout import CacheWrite, RenoiseMode, student_rollout
from dystream.diffusion.schedule import sample_training_sigma, student_sigmas
from dystream.logs import announce_export
from dystream.models.dit import AvatarDiT
from dystream.scale import exports_during_training, loads_state_before_hooks
from dystream.stages.common import teacher_shift
from dystream.stages.conditioning import AvatarConditioner, build_dit
from dystream.zoo.files import save_model

# DiTConfig fields a student may change: the block-causal layout and execution, no parameter shapes
LAYOUT_FIELDS = (
    "chunk_frames",
    "sink_chunks",
    "window_frames",
    "rapr",
    "rapr_max_distance",
    "reference_sink",
    "gradient_checkpointing",
)


def build_student(weights: str, cond: AvatarConditioner, overrides: dict[str, Any] | None = None) -> AvatarDiT:
    """A trainable DiT from a weight file (teacher or earlier student), with layout ``overrides`` applied."""
    model = build_dit("tiny", cond, init_weights=weights)  # the preset is unused when weights are given
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(LAYOUT_FIELDS))
    if bad:
        raise ValueError(
            f"student_overrides: {bad} cannot be changed on a network initialised from {weights}; "
            f"allowed: {list(LAYOUT_FIELDS)}"
        )
    if overrides:
        config = dataclasses.replace(model.config, **overrides)  # DiTConfig validates the combination
        state = model.state_dict()
        model = AvatarDiT(config)
        model.load_state_dict(state, strict=True)
    return model


@contextmanager
def frozen(*modules: nn.Module):
    """Parameters of ``modules`` get no gradient inside the block (restored afterwards).

    Parameters held by FSDP units are left as they are: FSDP fixes at each forward which hooks a unit needs, and a
    flag changed in between breaks its end of backward. They get a gradient, which is wasted work but harmless: every
    update zeroes its own optimizer's gradients before its backward (docs/scaling.md).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = {
        id(p) for m in modules for u in m.modules() if isinstance(u, FullyShardedDataParallel) for p in u.parameters()
    }
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters() if id(p) not in sharded]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def latent_mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample MSE over the generated frames (latent frame 0, the reference, excluded): ``[B]``."""
    return (a[:, :, 1:].float() - b[:, :, 1:].float()).pow(2).flatten(1).mean(1)


def frame_features(latents: Tensor) -> Tensor:
    """One feature per generated latent frame, its per-channel spatial mean and std:
    ``[B, z, F, h, w]`` -> ``[B (F - 1), 2 z]`` float64.

    Low-dimensional on purpose: a validation split gives about a hundred frames, and a Fréchet
    distance of flattened latents (``z h w`` dims, far more than samples) measures little but the
    sample count (on the tiny chain two independent teacher sample sets were as far apart as any
    student).
    """
    z = latents[:, :, 1:].transpose(1, 2).flatten(3).double()  # [B, F - 1, z, h w]
    return torch.cat([z.mean(-1), z.std(-1)], dim=-1).flatten(0, 1)


class StudentStage(L.LightningModule):
    """Base of the stage-1 student stages: conditions, few-step sampling, validation, export.

    Subclasses set ``self.cond``, ``self.student``, ``self.ema``, ``self.sigmas`` (the student's step
    sigmas), ``self.export_dir`` and the attribute names of frozen networks in ``frozen_networks``
    (left out of checkpoints, reloaded from their files).
    """

    frozen_networks: tuple[str, ...] = ("cond",)
    stage_name: str = "student"

    # -- inputs -----------------------------------------------------------------------------------
    def conditions(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Reference latent ``[B, z, 1, h, w]`` and audio conditions, from an ODE-pair batch (stored) or a
        SpeakerVid batch (encoded with the frozen VAE and audio encoder)."""
        if "reference_latent" in batch:
            return batch["reference_latent"], {"audio_talk": batch["audio_talk"], "audio_listen": batch["audio_listen"]}
        return self.cond.encode_reference(batch["references"][:, 0]), self.cond.audio_conditions(batch)

    def num_chunks(self, audio: Tensor) -> int:
        """Chunks in a window whose audio features are ``[B, T, D]``."""
        chunk = self.student.config.chunk_frames
        t = audio.shape[1]
        if t % (4 * chunk):
            raise ValueError(
                f"{type(self).__name__}: windows of {t} video frames; the student generates chunks of {chunk} latent "
                f"frames, so the window must be a multiple of {4 * chunk} frames"
            )
        return t // (4 * chunk)

    def set_timesteps(
        self, teacher: str, student_steps: int, shift: float | None, sigma_shift: float | None = None
    ) -> None:
        """``self.sigmas`` (the student's ``[N]`` float64 denoising sigmas), ``self.shift`` and ``self.sigma_shift``;
        a None shift is the teacher's training shift, read once from its export."""
        recorded = teacher_shift(teacher) if shift is None or sigma_shift is None else None
        self.shift = recorded if shift is None else float(shift)
        self.sigma_shift = recorded if sigma_shift is None else float(sigma_shift)
        self.sigmas = student_sigmas(student_steps, self.shift)

    # -- rank-synchronised draws (SiD and GAN stages; hparams same_exit_step, sigma_shift, min/max_sigma) ----
    def draw_exit_steps(self, num_chunks: int) -> list[int]:
        """One exit step per chunk (or one for all), drawn on rank 0 and broadcast to every rank."""
        n = self.sigmas.numel()
        k = 1 if self.hparams.same_exit_step else num_chunks
        steps = torch.randint(0, n, (k,)).tolist()
        if self._trainer is not None:
            steps = self.trainer.strategy.broadcast(steps, src=0)
        return steps * num_chunks if self.hparams.same_exit_step else steps

    def draw_sigma(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Noise level ``[B]`` for noising student/real samples: uniform, shifted, clamped (notes §1.3)."""
        sigma = sample_training_sigma(batch_size, distribution="uniform", shift=self.sigma_shift, generator=generator)
        return sigma.clamp(self.hparams.min_sigma, self.hparams.max_sigma).to(device)

    @torch.no_grad()
    def sample(
        self,
        batch: dict[str, Any],
        net: nn.Module | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        renoise_mode: RenoiseMode = "fresh",
        cache_write: CacheWrite = "noisy",
    ) -> Tensor:
        """Few-step streaming sample ``[B, z, F, h, w]`` (frame 0 the reference) through the KV cache."""
        net = self.ema.shadow if net is None else net
        ref, cond = self.conditions(batch)
        sigmas = self.sigmas.to(ref.device, ref.dtype)
        res = student_rollout(
            net,
            ref,
            self.num_chunks(cond["audio_talk"]),
            sigmas,
            cond["audio_talk"],
            cond["audio_listen"],
            cache_write=cache_write,
            renoise_mode=renoise_mode,
            generator=generator,
            noise=noise,
        )
        return res.latents

    # -- validation against the teacher's recorded samples -----------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_feats: list[tuple[Tensor, Tensor]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "x0" not in batch or "states" not in batch:
            return
        if not bool((batch["sigmas"][:, 0] == 1).all()):
            raise ValueError("validation pairs must start at sigma 1 (their first state is the starting noise)")
        g = torch.Generator().manual_seed(4321 + batch_idx)  # the same draws at every validation
        noise = batch["states"][:, 0, :, 1:]  # [B, z, F - 1, h, w], the teacher's starting noise
        sample = self.sample(batch, noise=noise, generator=g, cache_write=self.val_cache_write)
        b = sample.shape[0]
        self.log("val/teacher_mse", latent_mse(sample, batch["x0"]).mean(), sync_dist=True, batch_size=b)
        independent = self.sample(batch, generator=g, cache_write=self.val_cache_write)
        self._val_feats.append((frame_features(independent).cpu(), frame_features(batch["x0"]).cpu()))
        if batch_idx == 0:
            self._log_images(batch, sample)

    @property
    def val_cache_write(self) -> CacheWrite:
        return "noisy"

    def on_validation_epoch_end(self) -> None:
        from dystream.evaluation.frechet import frechet_distance

        feats, self._val_feats = getattr(self, "_val_feats", []), []
        if not feats:
            return
        student = torch.cat([s for s, _ in feats])
        teacher = torch.cat([t for _, t in feats])
        if student.shape[0] >= 2:  # per rank under DDP, averaged over ranks
            fd = torch.tensor(frechet_distance(student, teacher), dtype=torch.float32, device=self.device)
            self.log("val/teacher_fd", fd, sync_dist=True)

    @rank_zero_only
    def _log_images(self, batch: dict[str, Any], sample: Tensor) -> None:
        logger = getattr(self.logger, "experiment", None) if self._trainer is not None else None
        if logger is None or not hasattr(logger, "add_image"):
            return
        ref = batch["references"][:1, 0]
        videos = [self.cond.decode(z[:1], ref)[0, :, 1:] for z in (batch["x0"], sample)]  # [3, T, H, W] each
        rows = [torch.cat(list(v.unbind(1)), dim=-1) for v in videos]
        strip = torch.cat(rows, dim=-2)  # teacher above, student below
        logger.add_image("val/teacher_vs_student", (strip.clamp(-1, 1) + 1) / 2, self.global_step)

    # -- checkpoints and hand-over -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # frozen networks come from their files at construction; keeping them out of every checkpoint
        # saves a full teacher copy at scale. FSDP and DeepSpeed load a checkpoint strictly before this
        # module's hooks run, so there they stay in (a shard per rank) (docs/scaling.md)
        if not loads_state_before_hooks(self._trainer.strategy if self._trainer is not None else None):
            prefixes = tuple(f"{name}." for name in self.frozen_networks)
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]
        if exports_during_training(self):  # sharded parameters: `dystream consolidate` writes the export
            self.export()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if loads_state_before_hooks(self._trainer.strategy if self._trainer is not None else None):
            return  # already loaded, frozen networks included
        state = checkpoint.setdefault("state_dict", {})
        for name in self.frozen_networks:
            for key, value in getattr(self, name).state_dict().items():
                state.setdefault(f"{name}.{key}", value)

    def export_extra(self) -> dict[str, Any]:
        return {
            "stage": self.stage_name,
            "step": int(self.global_step) if self._trainer is not None else 0,
            "student_sigmas": self.sigmas.tolist(),
            "audio": self.hparams.audio,
            "vae": self.hparams.vae,
        }

    @rank_zero_only
    def export(self) -> None:
        path = Path(self.export_dir) / "student.safetensors"
        save_model(self.ema.shadow, path, arch="dit", extra=self.export_extra())
        announce_export(self, path, "(EMA student)")


# ---------------------------------------------------------------------------------------------
# Offline comparison with the teacher (the numbers of docs and reports)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_distances(
    students: dict[str, str],
    pairs: str = "runs/ode_pairs/pairs",
    split: str = "val",
    teacher: str | None = None,
    teacher_steps: tuple[int, ...] = (),
    batch_size: int = 8,
    seed: int = 0,
    renoise_mode: RenoiseMode = "fresh",
    cache_write: CacheWrite = "noisy",
    fresh_samples: int = 4,
) -> dict[str, dict[str, float]]:
    """How close few-step samplers come to the teacher's recorded ODE-pair samples (as the validation metrics).

    For every sampler and every pair of ``split``: ``mse`` is the latent MSE of its sample from the pair's
    own starting noise, reference and audio to the pair's ``x0``; ``fd`` the Fréchet distance between
    its samples from fresh noise (``fresh_samples`` per pair, to steady the estimate) and the recorded
    samples (:func:`frame_features`). Samplers: each student
    (name -> exported weight file; its sigmas from the file's metadata) and, with ``teacher`` given, the
    teacher's Euler sampler at each of ``teacher_steps`` steps (``teacher@N``) and at the pairs' own step
    count, whose ``mse`` is 0 by construction and whose ``fd`` is the floor that two independent sample sets
    of this size reach.
    """
    from dystream.datamodules.ode_pairs import PairStream, read_pair_index
    from dystream.diffusion.sampling import AudioGuidance, sample_euler
    from dystream.diffusion.schedule import sampling_sigmas
    from dystream.evaluation.frechet import frechet_distance
    from dystream.zoo.files import load_model

    index = read_pair_index(pairs)
    urls = [str(Path(pairs) / s["name"]) for s in index["shards"] if s["split"] == split and s["samples"]]
    if not urls:
        raise ValueError(f"teacher_distances: {pairs} has no {split!r} pairs")
    samplers: dict[str, Any] = {}
    for name, path in students.items():
        net = load_model(path, arch="dit").eval()
        if "student_sigmas" not in net.file_extra:
            raise ValueError(
                f"teacher_distances: {path} has no student_sigmas in its metadata; is it a student export?"
            )
        samplers[name] = ("student", net)
    if teacher is not None:
        t_net = load_model(teacher, arch="dit").eval()
        guidance = AudioGuidance(scale=index["guidance_scale"])

        def denoiser(x: Tensor, s: Tensor, c: dict[str, Any]) -> Tensor:
            return t_net(x, s, attention="bidirectional", **c)

        for n in dict.fromkeys([*teacher_steps, index["teacher_steps"]]):
            samplers[f"teacher@{n}"] = ("teacher", n)

    def run(kind: str, what: Any, batch: dict[str, Any], noise: Tensor, g: torch.Generator) -> Tensor:
        cond = (batch["audio_talk"], batch["audio_listen"])
        if kind == "student":
            sigmas = torch.tensor(what.file_extra["student_sigmas"], dtype=noise.dtype)
            n_chunks = (noise.shape[2]) // what.config.chunk_frames
            ref = batch["reference_latent"]
            res = student_rollout(
                what,
                ref,
                n_chunks,
                sigmas,
                *cond,
                cache_write=cache_write,
                renoise_mode=renoise_mode,
                generator=g,
                noise=noise,
            )
            return res.latents
        start = torch.cat([batch["reference_latent"], noise], dim=2)
        grid = sampling_sigmas(what, index["shift"]).to(noise.dtype)
        c = {"audio_talk": cond[0], "audio_listen": cond[1]}
        return sample_euler(denoiser, start, c, grid, guidance=guidance)[0]

    mse: dict[str, list[Tensor]] = {name: [] for name in samplers}
    feats: dict[str, list[Tensor]] = {name: [] for name in samplers}
    recorded: list[Tensor] = []
    for i, batch in enumerate(PairStream(urls, batch_size, train=False)):
        x0, noise = batch["x0"], batch["states"][:, 0, :, 1:]
        recorded.append(frame_features(x0))
        for name, (kind, what) in samplers.items():
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            mse[name].append(latent_mse(run(kind, what, batch, noise, g), x0))
            for _ in range(fresh_samples):
                fresh = torch.randn(noise.shape, generator=g, dtype=noise.dtype)
                feats[name].append(frame_features(run(kind, what, batch, fresh, g)))
    ref = torch.cat(recorded)
    return {
        name: {"mse": float(torch.cat(mse[name]).mean()), "fd": frechet_distance(torch.cat(feats[name]), ref)}
        for name in samplers
    }


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m dystream.stages.student",
        description="Latent MSE / Fréchet distance of few-step students to the teacher's recorded ODE-pair samples.",
    )
    parser.add_argument("--student", action="append", default=[], metavar="NAME=FILE", help="a student export")
    parser.add_argument("--pairs", default="runs/ode_pairs/pairs")
    parser.add_argument("--split", default="val")
    parser.add_argument("--teacher", default=None, help="the teacher export, for the baselines")
    parser.add_argument("--teacher-steps", type=int, nargs="*", default=[3])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--renoise-mode", default="fresh", choices=["fresh", "ode"])
    parser.add_argument("--cache-write", default="noisy", choices=["noisy", "clean"])
    parser.add_argument("--fresh-samples", type=int, default=4, help="fresh-noise samples per pair for the FD")
    args = parser.parse_args(argv)
    students = dict(s.split("=", 1) for s in args.student)
    result = teacher_distances(
        students,
        args.pairs,
        args.split,
        args.teacher,
        tuple(args.teacher_steps),
        args.batch_size,
        args.seed,
        args.renoise_mode,
        args.cache_write,
        args.fresh_samples,
    )
    print("| sampler | latent MSE to the teacher's sample (same noise) | FD to the teacher's samples (fresh noise) |")
    print("|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['mse']:.4f} | {r['fd']:.4f} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
