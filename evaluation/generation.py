"""Generating the evaluation set with each model of `recipes/eval.yaml` (teacher and students).

- Teacher (bidirectional AvatarDiT): Euler integration of the flow ODE over `steps` shifted sigmas with audio CFG
  (`dystream.diffusion.sampling.sample_euler`), the reference latent clean as frame 0, exactly as
  `TeacherStage.sample` does it.
- Students (block-causal): the few-step rollout through the KV cache (`dystream.diffusion.rollout.student_rollout`,
  paper cache write "noisy"), with the sigmas the export records (`student_sigmas` in its metadata), chunk by chunk,
  as a stream would produce it.
Both decode with the frozen VAE of `dystream.stages.conditioning.AvatarConditioner` and take the audio conditions from
its audio encoder (talk/listen routed by the speaking mask). Noise comes from a CPU generator seeded per clip, so a
rerun gives the same videos. Time per clip is wall time from audio to decoded frames (feature extraction, DiT,
VAE), reported scaled to 5 s of video.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dystream.diffusion.sampling import LISTEN_KEY

__all__ = ["GeneratedSet", "ModelSpec", "clip_batch", "generate"]

FPS = 25
SAMPLES_PER_FRAME = 640


@dataclass
class ModelSpec:
    """One generated row of the tables.

    Args:
        name: the row's name in the tables.
        kind: "teacher" (bidirectional, Euler sampling) or "student" (block-causal few-step rollout).
        weights: the exported DiT (`runs/teacher/teacher.safetensors`, `runs/stage1_sid/student.safetensors`, ...).
        recipe: the recipe that produces `weights` (named in the n/a reason when the file is missing).
        vae: the VAE export; None: the student export's recorded `vae`, else runs/vae/vae.safetensors.
        audio: the audio encoder export; None: the student export's recorded `audio`, else
            runs/teacher/audio.safetensors.
        steps: teacher Euler steps (students take their recorded sigmas; a value here must match their count).
        guidance_scale: teacher audio CFG scale (joint: both audio conditions dropped in the unconditional call).
        talk_scale / listen_scale: teacher CFG scales on the own voice and on the partner's voice separately
            (``AudioGuidance``'s separate mode, each around the full conditional prediction); set with
            ``guidance_scale: 1``.
        shift: teacher timestep shift; None = the one the teacher export records (its training shift).
        cache_write: student cache write ("noisy", the paper's, or "clean").
        window_frames: teacher only: sample the clip as independent windows of this many frames, each from the
            reference image with its own audio encoded alone, as the teacher trains and as the ODE pairs are drawn
            (`window_frames` of those recipes); None: the whole clip at once.
        drop_partner: generate with the partner's audio dropped (the listen condition zeroed, as the training's
            condition dropout does): the model's marginal over partners; a model that listens well still draws
            reactions there, at random moments.
        mute_partner: generate with the partner's waveform silent (encoded like any audio): the paper's Table 2
            protocol for its talking-only baseline; a model that listens draws no reactions to a silent partner.
    """

    name: str
    kind: Literal["teacher", "student"]
    weights: str
    recipe: str = ""
    vae: str | None = None
    audio: str | None = None
    steps: int | None = None
    guidance_scale: float = 3.0
    talk_scale: float | None = None
    listen_scale: float | None = None
    shift: float | None = None
    cache_write: Literal["noisy", "clean"] = "noisy"
    drop_partner: bool = False
    mute_partner: bool = False
    window_frames: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("teacher", "student"):
            raise ValueError(f"model {self.name!r}: kind must be 'teacher' or 'student', got {self.kind!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"model {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.cache_write not in ("noisy", "clean"):
            raise ValueError(f"model {self.name!r}: cache_write must be 'noisy' or 'clean', got {self.cache_write!r}")
        if self.window_frames is not None and (
            self.kind != "teacher" or self.window_frames < 4 or self.window_frames % 4
        ):
            raise ValueError(
                f"model {self.name!r}: window_frames is for teachers and must be a positive multiple of 4 frames "
                f"(one latent frame), got {self.window_frames} for a {self.kind}"
            )
        if self.drop_partner and self.mute_partner:
            raise ValueError(
                f"model {self.name!r}: drop_partner and mute_partner are two ways to remove the partner; set one"
            )
        if (self.talk_scale is not None or self.listen_scale is not None) and self.guidance_scale != 1.0:
            raise ValueError(
                f"model {self.name!r}: talk_scale / listen_scale guide each audio condition separately; set "
                f"guidance_scale: 1 with them (got guidance_scale {self.guidance_scale})"
            )

    def guidance(self):
        """The teacher's ``AudioGuidance`` for this row."""
        from dystream.diffusion.sampling import AudioGuidance

        return AudioGuidance(scale=self.guidance_scale, talk_scale=self.talk_scale, listen_scale=self.listen_scale)

    def missing(self) -> list[str]:
        """The files this row needs that do not exist (only the DiT weights can be checked before loading)."""
        return [p for p in (self.weights, self.vae, self.audio) if p is not None and not Path(p).is_file()]


@dataclass
class GeneratedSet:
    videos: list[np.ndarray]  # uint8 [T, H, W, 3] per clip
    steps: int
    seconds_per_clip: float  # mean wall time per clip


def clip_batch(
    references: np.ndarray, audio_self: np.ndarray, audio_other: np.ndarray, masks: np.ndarray, device: torch.device
) -> dict[str, Tensor]:
    """Numpy clips -> a batch in the training layout (docs/architecture.md): references [B, 1, 3, H, W] in [-1, 1],
    audio_self / audio_other [B, T * 640], mask [B, T]."""
    return {
        "references": _from_uint8(references)[:, None].to(device),
        "audio_self": torch.from_numpy(np.asarray(audio_self, dtype=np.float32)).to(device),
        "audio_other": torch.from_numpy(np.asarray(audio_other, dtype=np.float32)).to(device),
        "mask": torch.from_numpy(np.asarray(masks, dtype=np.float32)).to(device),
    }


def _from_uint8(x: np.ndarray) -> Tensor:
    """uint8 images [N, H, W, 3] or videos [N, T, H, W, 3] -> float [N, 3, H, W] / [N, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).movedim(-1, 1).float() / 127.5 - 1.0


def _to_uint8(video: Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


class _Generator:
    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        from dystream.stages.conditioning import AvatarConditioner
        from dystream.zoo.files import load_model, read_metadata

        _, _, extra = read_metadata(spec.weights)
        vae = spec.vae or extra.get("vae") or "runs/vae/vae.safetensors"
        audio = spec.audio or extra.get("audio") or "runs/teacher/audio.safetensors"
        self.spec, self.device = spec, device
        # the teacher's export records where its speaking mask applies (a Pre-Mask ablation teacher: "waveform")
        mask_mode = extra.get("mask_mode", "features") if spec.kind == "teacher" else "features"
        self.cond = AvatarConditioner(vae=vae, audio=audio, mask_mode=mask_mode).to(device)
        self.net = load_model(spec.weights, arch="dit").requires_grad_(False).eval().to(device)
        if spec.kind == "student":
            if "student_sigmas" not in extra:
                raise ValueError(f"{spec.weights}: no `student_sigmas` in its metadata; is it a student export?")
            self.sigmas = torch.tensor(extra["student_sigmas"], dtype=torch.float64)
            if spec.steps is not None and spec.steps != len(self.sigmas):
                raise ValueError(
                    f"model {spec.name!r}: steps {spec.steps} but {spec.weights} was distilled for "
                    f"{len(self.sigmas)} steps"
                )
            self.steps = len(self.sigmas)
        else:
            self.steps = spec.steps or 20

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], frames: int, generator: torch.Generator) -> Tensor:
        """Videos [B, 3, frames, H, W] in [-1, 1]."""
        if self.spec.mute_partner:
            batch = {**batch, "audio_other": torch.zeros_like(batch["audio_other"])}
        w = self.spec.window_frames
        if w is not None and frames > w:
            if frames % w:
                raise ValueError(
                    f"model {self.spec.name!r}: window_frames {w} does not divide the clip's {frames} frames"
                )
            windows = []
            for start in range(0, frames, w):  # each window from the reference, its audio encoded alone
                sub = {
                    **batch,
                    "audio_self": batch["audio_self"][:, start * SAMPLES_PER_FRAME : (start + w) * SAMPLES_PER_FRAME],
                    "audio_other": batch["audio_other"][:, start * SAMPLES_PER_FRAME : (start + w) * SAMPLES_PER_FRAME],
                    "mask": batch["mask"][:, start : start + w],
                }
                windows.append(self._sample(sub, w, generator))
            return torch.cat(windows, dim=2)
        return self._sample(batch, frames, generator)

    def _sample(self, batch: dict[str, Tensor], frames: int, generator: torch.Generator) -> Tensor:
        from dystream.diffusion.rollout import student_rollout
        from dystream.diffusion.sampling import sample_euler
        from dystream.diffusion.schedule import sampling_sigmas
        from dystream.stages.common import teacher_shift

        reference = batch["references"][:, 0]
        z_ref = self.cond.encode_reference(reference)  # [B, z, 1, h, w]
        cond = self.cond.audio_conditions(batch)
        if self.spec.drop_partner:  # the listen condition as the training's dropout leaves it
            cond = {**cond, LISTEN_KEY: torch.zeros_like(cond[LISTEN_KEY])}
        if self.spec.kind == "teacher":
            n_latent = 1 + math.ceil(frames / 4)
            # drawn as TeacherStage.sample draws it (all frames, the first replaced by the reference)
            noise = torch.randn(z_ref.shape[0], z_ref.shape[1], n_latent, *z_ref.shape[-2:], generator=generator)
            x = torch.cat([z_ref, noise[:, :, 1:].to(z_ref)], dim=2)
            shift = teacher_shift(self.spec.weights, self.spec.shift)  # None: the teacher's training shift
            sigmas = sampling_sigmas(self.steps, shift=shift).to(z_ref.device)

            def denoiser(x: Tensor, sigma: Tensor, c: dict) -> Tensor:
                return self.net(x, sigma, attention="bidirectional", **c)

            z, _ = sample_euler(denoiser, x, cond, sigmas, guidance=self.spec.guidance())
        else:
            chunk = self.net.config.chunk_frames
            if frames % (4 * chunk):
                raise ValueError(
                    f"students generate chunks of {4 * chunk} frames; clip frames {frames} is not a multiple"
                )
            z = student_rollout(
                self.net,
                z_ref,
                frames // (4 * chunk),
                self.sigmas.to(z_ref.device, z_ref.dtype),
                cond["audio_talk"],
                cond["audio_listen"],
                cache_write=self.spec.cache_write,
                generator=generator,
            ).latents
        return self.cond.decode(z, reference)[:, :, 1 : 1 + frames]


@torch.no_grad()
def reconstruct(
    vae: str | Path | torch.nn.Module,
    references: np.ndarray,
    frames: np.ndarray,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    guidance: bool | np.ndarray = True,
) -> list[np.ndarray]:
    """The VAE's reconstructions of the real clips, as the DiT stages encode them: ``cat([reference, frames])`` with
    the reference image as the only guidance image, decoded, the reference frame dropped. ``guidance``: False for
    none, or uint8 ``[N, K, H, W, 3]`` guidance images per clip instead of the reference image. references uint8
    [N, H, W, 3], frames uint8 [N, T, H, W, 3] -> N uint8 videos [T, H, W, 3]. No generator can sync or look better
    than its VAE does here, so this row bounds the others. ``vae``: an export, or an already loaded VAE."""
    from dystream.stages.common import load_frozen

    device = torch.device(device)
    vae = (load_frozen(vae, "vae") if isinstance(vae, (str, Path)) else vae).to(device)
    t = frames.shape[1]
    if t % vae.config.temporal_factor:
        raise ValueError(
            f"reconstruction: {t} frames per clip is not a multiple of the VAE's {vae.config.temporal_factor} "
            "frames per latent frame (set clips.frames)"
        )
    out: list[np.ndarray] = []
    for i in range(0, len(references), batch_size):
        ref = _from_uint8(references[i : i + batch_size]).to(device)
        video = _from_uint8(frames[i : i + batch_size]).to(device)
        if isinstance(guidance, np.ndarray):
            refs = _from_uint8(guidance[i : i + batch_size]).transpose(1, 2).to(device)  # [B, K, 3, H, W]
            refs = refs if refs.shape[1] else None
        else:
            refs = ref[:, None] if guidance else None
        z = vae.encode(torch.cat([ref[:, :, None], video], dim=2), references=refs)
        out += [_to_uint8(v) for v in vae.decode(z, references=refs)[:, :, 1:]]
    return out


def generate(
    spec: ModelSpec,
    references: np.ndarray,
    audio_self: np.ndarray,
    audio_other: np.ndarray,
    masks: np.ndarray,
    seed: int = 0,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> GeneratedSet:
    """Generate one video per clip: references uint8 [N, H, W, 3], audio [N, T * 640], masks [N, T]."""
    device = torch.device(device)
    gen = _Generator(spec, device)
    frames = masks.shape[1]
    videos: list[np.ndarray] = []
    elapsed = 0.0
    for i in range(0, len(references), batch_size):
        sl = slice(i, i + batch_size)
        batch = clip_batch(references[sl], audio_self[sl], audio_other[sl], masks[sl], device)
        g = torch.Generator().manual_seed(seed * 100003 + i)
        t0 = time.perf_counter()
        out = gen(batch, frames, g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        videos += [_to_uint8(v) for v in out]
    return GeneratedSet(videos, gen.steps, elapsed / max(1, len(videos)))
