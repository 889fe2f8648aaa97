"""Teacher stage: the bidirectional AvatarDiT fine-tuned with flow matching on talk/listen audio.

StreamAvatar §3.2 and §4.1: Wan2.2-TI2V-5B extended with an audio attention (talking cues) and an
interact audio attention (listening cues) per block, trained with the base model's rectified-flow
objective. Frozen here (in one place, :func:`dystream.stages.common.freeze`): the VAE of the VAE
stage and the Wav2Vec2 audio encoder. The reference image is latent frame 0, clean at sigma 0.

Hand-over to later stages (written at every checkpoint save, see :meth:`on_save_checkpoint`):
``<export_dir>/teacher.safetensors`` (the EMA weights of the DiT) and
``<export_dir>/audio.safetensors`` (the exact audio encoder every later stage must reuse).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from dystream.datamodules.keypoints import FACE, MOUTH
from dystream.diffusion.sampling import AudioGuidance, sample_euler
from dystream.diffusion.schedule import sample_training_sigma, sampling_sigmas
from dystream.logs import announce_export
from dystream.models.audio import MaskMode
from dystream.objectives.flow_matching import (
    FlowMatchingConfig,
    draw_dropout_masks,
    flow_matching_loss,
    region_loss_weight,
)
from dystream.scale import exports_during_training, shards_parameters
from dystream.stages.common import EMA, LRSchedule, adamw, warmup_scheduler
from dystream.stages.conditioning import AvatarConditioner, DiTPresetName, build_dit, check_cached_latents
from dystream.streaming.video_io import write_mp4
from dystream.zoo.files import save_model


class TeacherStage(L.LightningModule):
    """Bidirectional AvatarDiT teacher trained with flow matching (StreamAvatar §3.2).

    Args:
        vae: the VAE stage's exported file (``runs/vae/vae.safetensors``) or a zoo name.
        audio: an audio encoder preset name (``tiny``, ``wav2vec2-base-960h``) or an exported
            audio encoder file. A preset without ``audio_weights`` is initialised from
            ``audio_seed`` (the tiny chain's random but fixed feature extractor).
        audio_weights: local Wav2Vec2 weights (directory or file) for a preset, never downloaded.
        audio_seed: seed of a preset's initialisation when no weights are given.
        dit_preset: AvatarDiT preset; latent channels and audio width are taken from the VAE and
            the audio encoder, not repeated here.
        dit_overrides: DiTConfig fields that replace the preset's, e.g. ``{audio_lookbehind_frames: 8}``; recorded
            in the export's config, so the students built from it inherit them.
        init_weights: DiT weights to start from (an exported file, or base weights via the zoo).
        text_context: file holding the fixed prompt's text-encoder output (real presets); tiny
            presets learn a constant instead.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        lr_schedule: after the warm-up, ``constant`` or ``cosine`` (decay to ``min_lr_ratio * lr`` at
            ``trainer.max_steps``).
        min_lr_ratio: the cosine schedule's final learning rate, as a fraction of ``lr``.
        ema_decay: decay of the exponential moving average of the DiT weights.
        ema_start_step: step from which the EMA decays (before it, it tracks the weights).
        sigma_distribution: distribution of training sigmas before the shift.
        shift: timestep shift of training and sampling sigmas (Wan2.2 uses 5).
        p_drop_talk: probability of dropping the talk audio (classifier-free guidance).
        p_drop_listen: probability of dropping the listen audio.
        p_drop_reference: probability of dropping the reference frame.
        sample_steps: Euler steps when sampling (validation videos, predict).
        guidance_scale: classifier-free guidance scale over the audio conditions when sampling.
        mask_mode: where the speaking mask applies: ``features`` (after the audio encoder, §3.2) or ``waveform``
            (before it: Table 3's Pre-Mask ablation). Recorded in the export; generation follows it.
        mouth_weight: extra weight of the flow-matching error on the latent cells that hold the lips (the batch's
            keypoints, lip box enlarged by ``mouth_pad``): the mouth is one f8 latent cell of 64 and its opening is
            what lip sync reads. 0 = the plain loss. Needs keypoints in the batch (clip shards).
        mouth_pad: enlargement of the lip box on each side, as a fraction of its size.
        listen_face_weight: extra weight of the flow-matching error on the face's latent cells in the latent frames
            where the avatar listens (the speaking mask is 0 in any of its video frames): a listener's nods move the
            face by 1-2 pixels at 64x64, a small part of an error summed over the whole frame (StreamAvatar Table 2,
            LFKV). Adds to ``mouth_weight``'s weights. 0 = off. Needs keypoints in the batch.
        export_dir: where the hand-over files and predicted sample videos are written.
    """

    def __init__(
        self,
        vae: str = "runs/vae/vae.safetensors",
        audio: str = "tiny",
        audio_weights: str | None = None,
        audio_seed: int = 0,
        dit_preset: DiTPresetName = "tiny",
        dit_overrides: dict[str, Any] | None = None,
        init_weights: str | None = None,
        text_context: str | None = None,
        lr: PositiveFloat = 2e-4,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 50,
        lr_schedule: LRSchedule = "constant",
        min_lr_ratio: NonNegativeFloat = 0.0,
        ema_decay: ClosedUnitInterval = 0.999,
        ema_start_step: NonNegativeInt = 0,
        sigma_distribution: Literal["uniform", "logit_normal"] = "logit_normal",
        shift: PositiveFloat = 5.0,
        p_drop_talk: ClosedUnitInterval = 0.1,
        p_drop_listen: ClosedUnitInterval = 0.1,
        p_drop_reference: ClosedUnitInterval = 0.05,
        sample_steps: PositiveInt = 20,
        guidance_scale: NonNegativeFloat = 3.0,
        mask_mode: MaskMode = "features",
        mouth_weight: NonNegativeFloat = 0.0,
        mouth_pad: NonNegativeFloat = 0.5,
        listen_face_weight: NonNegativeFloat = 0.0,
        export_dir: str = "runs/teacher",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cond = AvatarConditioner(
            vae=vae, audio=audio, audio_weights=audio_weights, audio_seed=audio_seed, mask_mode=mask_mode
        )
        self.dit = build_dit(
            dit_preset, self.cond, init_weights=init_weights, text_context=text_context, **(dit_overrides or {})
        )
        self.ema = EMA(self.dit, decay=ema_decay, start_step=ema_start_step)
        self.flow = FlowMatchingConfig(
            sigma_distribution=sigma_distribution,
            shift=shift,
            p_drop_talk=p_drop_talk,
            p_drop_listen=p_drop_listen,
            p_drop_reference=p_drop_reference,
        )
        self.guidance = AudioGuidance(scale=guidance_scale)
        self.export_dir = Path(export_dir)

    # -- the narrow denoiser interface of dystream.diffusion -------------------------------------
    def denoiser(self, net: torch.nn.Module | None = None):
        net = self.dit if net is None else net

        def call(x: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
            return net(x, sigma, attention="bidirectional", **cond)

        return call

    # -- training --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        check_cached_latents(getattr(self.trainer, "datamodule", None), self.hparams.vae)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, logs = self._loss(batch)
        extra = {f"train/{k}": v for k, v in logs.items() if k != "loss"}
        b = batch["audio_self"].shape[0]
        self.log_dict(extra, prog_bar=False, batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def _loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        x0 = self.cond.batch_latents(batch)  # [B, z, 1 + T/4, h, w], cached or encoded now
        cond = self.cond.audio_conditions(batch)
        b = x0.shape[0]
        sigma = sample_training_sigma(
            b, distribution=self.flow.sigma_distribution, shift=self.flow.shift, generator=generator, device="cpu"
        ).to(x0.device, x0.dtype)
        eps = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        masks = draw_dropout_masks(b, self.flow, generator=generator, device="cpu")
        masks = type(masks)(*(m.to(x0.device) for m in (masks.talk, masks.listen, masks.reference)))
        weight = self.region_weights(batch, x0)
        return flow_matching_loss(self.denoiser(), x0, cond, sigma, eps, masks, self.flow, weight=weight)

    def region_weights(self, batch: dict[str, Any], x0: Tensor) -> Tensor | None:
        """``[B, 1, F - 1, h, w]`` loss weights of the generated frames' latent cells, or None when every weight is 1:
        ``1 + mouth_weight`` under the lips, plus ``listen_face_weight`` on the face while the avatar listens."""
        hp = self.hparams
        if hp.mouth_weight == 0 and hp.listen_face_weight == 0:
            return None
        kpts = batch.get("kpts")
        if kpts is None:
            raise KeyError(
                "TeacherStage: mouth_weight or listen_face_weight > 0 needs the window's keypoints in the batch "
                "('kpts': clip shards with KEY.kpts.npy, or latent shards written from them by `dystream data "
                "encode`); set both to 0 otherwise"
            )
        kpts, size = kpts.to(x0.device), tuple(batch["references"].shape[-2:])
        latent_shape = (x0.shape[2] - self.flow.num_reference_frames, *x0.shape[3:])
        weight = region_loss_weight(kpts, MOUTH, size, latent_shape, hp.mouth_weight, pad=hp.mouth_pad)
        if hp.listen_face_weight > 0:
            face = region_loss_weight(kpts, FACE, size, latent_shape, hp.listen_face_weight, pad=0.1) - 1.0
            mask = batch["mask"].to(x0.device)  # [B, T] speaking mask of the window's video frames
            listening = (mask.unflatten(1, (latent_shape[0], -1)) < 0.5).any(-1)  # [B, F]
            weight = weight + face * listening[:, None, :, None, None]
        return weight

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: ModelCheckpoint saves in the callbacks' on_train_batch_end, which runs
        # before the module's, so a checkpoint would miss this step's update and a resumed EMA would lag by one
        self.ema.update(self.dit, self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.dit.parameters() if p.requires_grad]
        opt = adamw(self, params, lr=hp.lr, weight_decay=hp.weight_decay)
        sched = warmup_scheduler(self, opt, hp.lr_schedule, hp.warmup_steps, hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- validation: loss at fixed noise, one sampled video --------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator().manual_seed(1234 + batch_idx)  # same noise every validation: comparable curves
        no_dropout = FlowMatchingConfig(**{**self.flow.__dict__, "p_drop_talk": 0.0, "p_drop_listen": 0.0})
        no_dropout.p_drop_reference = 0.0
        flow, self.flow = self.flow, no_dropout
        try:
            loss, _ = self._loss(batch, generator=g)
        finally:
            self.flow = flow
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["video"].shape[0])
        if batch_idx == 0:
            self._log_sample(batch)

    def _log_sample(self, batch: dict[str, Any]) -> None:
        # with sharded parameters (FSDP, ZeRO-3) every forward is collective: all ranks sample, rank 0 logs
        if self.global_rank != 0 and not shards_parameters(self.trainer.strategy):
            return
        logger = getattr(self.logger, "experiment", None)
        if logger is None or not hasattr(logger, "add_image"):
            return
        video = self.sample(_first(batch), net=self.ema.shadow)[0]  # [3, T, H, W] in [-1, 1]
        real = batch["video"][0]
        strip = torch.cat([torch.cat(list(real.unbind(1)), dim=-1), torch.cat(list(video.unbind(1)), dim=-1)], dim=-2)
        logger.add_image("val/real_vs_sample", (strip.clamp(-1, 1) + 1) / 2, self.global_step)

    # -- sampling and predict --------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: dict[str, Any], net: torch.nn.Module | None = None, steps: int | None = None) -> Tensor:
        """Generate videos ``[B, 3, T, H, W]`` in [-1, 1] for a batch (reference + both audio tracks)."""
        reference = batch["references"][:, 0]
        t = batch["video"].shape[2] if "video" in batch else batch["audio_self"].shape[-1] // 640
        z_ref = self.cond.encode_reference(reference)  # [B, z, 1, h, w]
        n_latent = 1 + math.ceil(t / 4)
        noise = torch.randn(z_ref.shape[0], z_ref.shape[1], n_latent, *z_ref.shape[-2:], device=z_ref.device)
        x_init = torch.cat([z_ref, noise[:, :, 1:]], dim=2)
        sigmas = sampling_sigmas(steps or self.hparams.sample_steps, shift=self.flow.shift).to(z_ref.device)
        z = sample_euler(self.denoiser(net), x_init, self.cond.audio_conditions(batch), sigmas, guidance=self.guidance)
        if isinstance(z, tuple):  # (final, trajectory) when a trajectory is recorded
            z = z[0]
        return self.cond.decode(z, reference)[:, :, 1 : 1 + t]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        videos = self.sample(batch, net=self.ema.shadow)
        paths = []
        for i, key in enumerate(batch["key"]):
            frames = ((videos[i].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
            mix = (batch["audio_self"][i] + batch["audio_other"][i]).clamp(-1, 1).cpu().numpy()
            paths.append(str(write_mp4(self.export_dir / "samples" / f"{key}.mp4", frames, audio=mix)))
        return paths

    # -- hand-over -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if exports_during_training(self):  # sharded parameters: `dystream consolidate` writes the export
            self.export()

    @rank_zero_only
    def export(self) -> None:
        extra = {
            "stage": "teacher",
            "step": int(self.global_step),
            "shift": float(self.flow.shift),
            "mask_mode": self.cond.mask_mode,
        }
        save_model(self.ema.shadow, self.export_dir / "teacher.safetensors", arch="dit", extra=extra)
        save_model(self.cond.audio, self.export_dir / "audio.safetensors", arch="audio", extra=extra)
        announce_export(self, self.export_dir / "teacher.safetensors", "(EMA) and audio.safetensors")


def _first(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: (v[:1] if isinstance(v, Tensor) else v[:1]) for k, v in batch.items()}
