"""VAE stage: train the reference-guided causal VAE (paper 002) from scratch.

What is reconstructed: the DiT's own latent layout (docs/architecture.md). From a batch with
``video [B, 3, T, H, W]`` and ``references [B, R, 3, H, W]`` the stage builds the clip
``cat([references[:, :1], video], dim=2)`` of ``1 + T`` frames (reference image first, encoded
alone by the causal VAE, then the window), and guides it with K of the *other* references
``references[:, 1:1 + K]``. Those frames come from outside the window, so the guidance never
shows the model the frames it reconstructs (paper 002: the references carry appearance, the
latent carries dynamics). K is drawn uniformly in ``[min_references, max_references]`` once per
batch (capped at ``R - 1``), K = 0 included by default so that the VAE also works unguided.

Objective (:mod:`dystream.objectives.vae`): L1 + LPIPS + KL, then from ``disc_start`` a 3-D
PatchGAN with hinge loss and LDM's adaptive weight, with two optimizers in manual optimization.
The discriminator step goes through the strategy (precision plugin and hooks included) but not
through the LightningOptimizer wrapper, so ``trainer.global_step`` (``max_steps``, ``disc_start``,
checkpoint names) counts training iterations rather than optimizer steps.

Validation: PSNR, SSIM (torchmetrics) and LPIPS when available, with K references and with
K = 0 (``val/psnr_k0``), a few reconstructions logged to TensorBoard as animated GIFs, and the
per-channel statistics of the posterior mean, which become the VAE's latent normalisation
(``latent_mean``/``latent_std`` buffers, so ``encode`` hands the DiT unit-scale latents). Every
checkpoint also exports ``<export_dir>/vae.safetensors`` (:func:`dystream.zoo.files.save_model`),
the file later stages load.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from dystream.datamodules.keypoints import FACE, LEFT_HAND, MOUTH, RIGHT_HAND
from dystream.logs import announce_export
from dystream.models.vae import (
    DiscriminatorConfig,
    PatchDiscriminator3D,
    ReferenceGuidedVAE,
    VAEConfig,
    VAEOutput,
)
from dystream.objectives.vae import (
    adaptive_gan_weight,
    build_lpips,
    changed_pixels,
    colour_l1_loss,
    copy_gate_loss,
    edge_l1_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    keypoint_box_mask,
    kl_loss,
    l1_loss,
    lpips_video,
    open_gate_loss,
    region_l1_loss,
    shut_gate_loss,
    unshown_pixels,
)
from dystream.scale import exports_during_training
from dystream.stages.common import LRSchedule, adamw, warmup_scheduler
from dystream.zoo.files import save_model

VAEPresetName = Literal["tiny", "tiny-f4", "ref-dc-f32t4c16"]
DiscriminatorPresetName = Literal["tiny", "patchgan3d"]


class VAEStage(L.LightningModule):
    """Reference-guided causal VAE: L1 + LPIPS + KL, then a delayed 3-D PatchGAN (hinge, adaptive weight).

    Args:
        preset: VAE architecture preset (``dystream.models.vae.VAE_PRESETS``).
        architecture: fields of ``VAEConfig`` that replace the preset's (e.g. ``{widths: [36, 72, 144]}``); the
            export records the resulting config, so later stages load it as it was trained.
        discriminator_preset: 3-D PatchGAN preset (``dystream.models.vae.DISCRIMINATOR_PRESETS``).
        lr: Adam learning rate of the VAE.
        lr_schedule: ``constant``, or ``cosine``: linear warm-up over ``warmup_steps``, then a cosine decay to
            ``min_lr_ratio * lr`` at ``trainer.max_steps`` (the VAE's optimizer only; the discriminator stays
            constant).
        warmup_steps: linear warm-up of the VAE's learning rate (both schedules).
        min_lr_ratio: the cosine schedule's final learning rate, as a fraction of ``lr``.
        disc_lr: Adam learning rate of the discriminator.
        beta1: Adam beta1 of both optimizers (0.5 as in LDM/VQGAN, for the GAN phase).
        beta2: Adam beta2 of both optimizers.
        weight_decay: AdamW weight decay of the VAE.
        l1_weight: weight of the mean absolute pixel error.
        lpips_weight: weight of LPIPS (used only when ``lpips_backbone`` is given).
        face_weight: weight of an extra L1 term over each frame's face box (the batch's ``kpts``, face group,
            enlarged by ``face_pad``); 0 = off. Frames without face keypoints (the reference frame) add nothing.
        face_pad: enlargement of the face box on each side, as a fraction of its size.
        mouth_weight: weight of an extra L1 term over each frame's mouth box (the face group's lip points, enlarged
            by ``mouth_pad``): at 64x64 the mouth is under 1 % of the frame, and its opening is what lip sync reads.
        mouth_pad: enlargement of the mouth box on each side, as a fraction of its size.
        hands_weight: weight of an extra L1 term over each hand's box (either hand's points, enlarged by
            ``hands_pad``): gesturing hands are small and fast, and the plain L1 lets them blur away.
        hands_pad: enlargement of each hand box on each side, as a fraction of its size.
        changed_weight: weight of an extra L1 over the pixels that differ from the clip's first frame (the
            reference image) by more than ``changed_threshold`` (pixels in [-1, 1], mean over channels): where the
            person has moved; 0 = off. The copy head draws everything else from the reference, so there the
            decoder's drawing carries nearly all the error, on a few percent of the pixels (docs/vae.md).
        changed_threshold: how far a pixel must differ from the reference to count as changed.
        colour_weight: weight of the L1 between each frame's mean colour and the real frame's, per channel: a
            clip-wide tint costs the per-pixel L1 little; 0 = off. Measured at the embedded scale: no gain, more
            background speckle (docs/vae.md, row p).
        estimate_weight: weight of the same pixel terms on the decoder's own drawing before the reference copy head
            (``reference_copy`` presets; 0 = off). Where the copy head copies, the drawing gets no gradient, so the
            decoder stops drawing what the reference shows, and a raised arm, absent from the reference, is left
            faint; this term keeps the drawing whole, so the gate can tell motion from a static region.
        edge_weight: weight of the L1 between the horizontal and vertical pixel differences of the output and of the
            real frames: the plain L1 lets an uncertain edge blur; 0 = off.
        gate_weight: weight of the binary cross-entropy between the copy head's gate and where its copy is right
            (within ``gate_tolerance`` of the real pixel); 0 = off. The pixel loss alone leaves the gate open over a
            moving arm that the decoder draws faint (docs/vae.md, row ab).
        mouth_gate_weight: weight of a cross-entropy that shuts the copy head's gate (towards the decoder's own
            drawing) over each frame's mouth box (``mouth_pad``); 0 = off. A speaking mouth is rarely the reference
            image's: a gate half open over the lips (0.66 in docs/vae.md, row an') blends the reference's mouth into
            the drawn one. Training only (needs keypoints). Measured (rows au, av): Sync-C rises, but the gate also
            closes beyond the lips and PSNR, HF and r in speech fall; not in the default.
        unshown_gate_weight: weight of a cross-entropy that shuts the copy head's gate over the pixels that no guidance
            image shows within ``unshown_radius`` pixels of their place (mean channel difference over
            ``changed_threshold``; :func:`~dystream.objectives.vae.unshown_pixels`); 0 = off. Over a raised arm the
            gate stays open (0.9 in docs/vae.md, "Where the hands go") and the reference's body is drawn where the arm
            is; the pixel loss alone does not shut it. Training only; no keypoints needed.
        unshown_radius: how far (pixels) a guidance image's pixel may sit from a frame's and still show it.
        still_gate_weight: weight of a cross-entropy that opens the copy head's gate (towards the reference's pixels)
            where a guidance image shows the frame exactly at its place (``unshown_pixels`` with radius 0, negated):
            the still background and body, where the copy is right; 0 = off. With ``unshown_gate_weight`` alone the
            gate also half-closes over still regions and the decoder's grainier drawing shows through there.
        gate_tolerance: largest ``|copy - real|`` (pixels in [-1, 1]) at which the copy counts as right.
        copy_weight: weight of an L1 between the copy head's copy itself (before the gate) and the real frames;
            0 = off. The pixel loss reaches the copy only where the gate is open, so where the body has moved and
            the gate closed, the copy's window attention and its warp (``copy_warp``) get no gradient to follow it
            (docs/vae.md, row ag); this term teaches them the correspondence everywhere.
        copy_gate_soft_steps: with ``architecture: {copy_gate_hard: true}``, the steps over which the copy gate
            still blends (its sigmoid, as without the option) before it is rounded to 0 or 1 for the rest of training
            and in the export. Rounded from the first step, the gate opens on only half the pixels that the
            reference shows (docs/vae.md, row aq): it has not yet learned where the copy is right. 0 = rounded from
            the start. Measured (rows ar-at): after a soft start the rounded gate's logits still collapse to the
            threshold and the gate again opens on about half of those pixels; not in the default.
        kl_weight: weight of the KL term, averaged over latent elements.
        disc_weight: scale of LDM's adaptive GAN weight (``disc_weighting: adaptive``) or the adversarial term's
            weight itself (``fixed``); 0 disables the discriminator.
        disc_weighting: ``adaptive`` (LDM: ``disc_weight`` times the ratio of the reconstruction and adversarial
            gradient norms at the decoder's last layer) or ``fixed``. At the embedded scale the adaptive weight fell
            to ~0.001 and the term did nothing (docs/vae.md, row h).
        disc_start: training step from which the adversarial terms are on (before it the
            discriminator is neither used nor trained).
        lpips_net: LPIPS backbone, ``vgg`` (LDM) or ``alex``.
        lpips_backbone: path to a torchvision ``vgg16``/``alexnet`` state dict (``.pth`` read with
            ``weights_only=True``, or ``.safetensors``). Without it the stage trains and validates
            without the perceptual term and says so; it never uses a random backbone.
        lpips_frames: random frames per clip that LPIPS sees in training (all frames if None).
        min_references: fewest guidance references drawn per training batch.
        max_references: most guidance references drawn per training batch (capped at R - 1).
        val_references: guidance references in validation (default: ``max_references``, capped at R - 1).
        sample_posterior: decode a posterior sample in training (else the mean).
        grad_clip: gradient-norm clipping of both optimizers (0 = off).
        num_val_videos: reconstructions logged to TensorBoard at each validation.
        export_dir: where ``vae.safetensors`` is written at every checkpoint.
        export_architecture: decode-only fields written into the export instead of the trained ones
            (``copy_logit_scale``, ``copy_gate_scale``; no weights change): a VAE trained with a blending copy head
            decodes sharper, trading error where the person moved for high-frequency detail where nothing did
            (docs/vae.md, "Sharper at decode"). Training and its validation use ``architecture``'s values.
    """

    def __init__(
        self,
        preset: VAEPresetName = "tiny",
        architecture: dict[str, Any] | None = None,
        discriminator_preset: DiscriminatorPresetName = "tiny",
        lr: PositiveFloat = 2e-4,
        lr_schedule: LRSchedule = "constant",
        warmup_steps: NonNegativeInt = 0,
        min_lr_ratio: NonNegativeFloat = 0.0,
        disc_lr: PositiveFloat = 2e-4,
        beta1: NonNegativeFloat = 0.5,
        beta2: NonNegativeFloat = 0.9,
        weight_decay: NonNegativeFloat = 0.0,
        l1_weight: NonNegativeFloat = 1.0,
        lpips_weight: NonNegativeFloat = 0.1,
        face_weight: NonNegativeFloat = 0.0,
        face_pad: NonNegativeFloat = 0.25,
        mouth_weight: NonNegativeFloat = 0.0,
        mouth_pad: NonNegativeFloat = 0.5,
        hands_weight: NonNegativeFloat = 0.0,
        hands_pad: NonNegativeFloat = 0.25,
        changed_weight: NonNegativeFloat = 0.0,
        changed_threshold: PositiveFloat = 0.1,
        colour_weight: NonNegativeFloat = 0.0,
        estimate_weight: NonNegativeFloat = 0.0,
        edge_weight: NonNegativeFloat = 0.0,
        gate_weight: NonNegativeFloat = 0.0,
        gate_tolerance: PositiveFloat = 0.1,
        mouth_gate_weight: NonNegativeFloat = 0.0,
        unshown_gate_weight: NonNegativeFloat = 0.0,
        unshown_radius: NonNegativeInt = 2,
        still_gate_weight: NonNegativeFloat = 0.0,
        copy_weight: NonNegativeFloat = 0.0,
        copy_gate_soft_steps: NonNegativeInt = 0,
        kl_weight: NonNegativeFloat = 1e-4,
        disc_weight: NonNegativeFloat = 0.05,
        disc_start: NonNegativeInt = 2000,
        disc_weighting: Literal["adaptive", "fixed"] = "adaptive",
        lpips_net: Literal["vgg", "alex"] = "vgg",
        lpips_backbone: str | None = None,
        lpips_frames: PositiveInt | None = 4,
        min_references: NonNegativeInt = 0,
        max_references: NonNegativeInt = 3,
        val_references: NonNegativeInt | None = None,
        sample_posterior: bool = True,
        grad_clip: NonNegativeFloat = 1.0,
        num_val_videos: NonNegativeInt = 2,
        export_dir: str = "runs/vae",
        export_architecture: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if min_references > max_references:
            raise ValueError(f"VAEStage: min_references ({min_references}) > max_references ({max_references})")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not value < 1.0:
                raise ValueError(f"VAEStage.{name} must be in [0, 1), got {value}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # two optimizers: VAE and discriminator
        try:
            config = VAEConfig.from_preset(preset, **(architecture or {}))
        except TypeError as e:  # an unknown field name
            raise ValueError(
                f"VAEStage.architecture: {e}; the fields are those of dystream.models.vae.VAEConfig"
            ) from e
        if copy_gate_soft_steps > 0 and not config.copy_gate_hard:
            raise ValueError(
                f"VAEStage.copy_gate_soft_steps={copy_gate_soft_steps} needs a rounded copy gate: add "
                "architecture: {copy_gate_hard: true} (or set copy_gate_soft_steps: 0)"
            )
        self.vae = ReferenceGuidedVAE(config)
        self._export_scales = dict(export_architecture or {})
        try:  # checked now, not at the first export minutes in
            ReferenceGuidedVAE.with_copy_scales(config, **self._export_scales)
        except ValueError as e:
            raise ValueError(f"VAEStage.export_architecture: {e}") from None
        self.disc = PatchDiscriminator3D(DiscriminatorConfig.from_preset(discriminator_preset)) if disc_weight else None
        # LPIPS is a frozen loss network loaded from a file: kept out of the module tree so it is
        # neither trained nor written into checkpoints (it is rebuilt from the path on load).
        self._lpips = [build_lpips(lpips_net, lpips_backbone)]
        if self._lpips[0] is None and lpips_weight > 0:  # asked for LPIPS (lpips_weight) but gave no network
            rank_zero_warn(
                "VAEStage: no lpips_backbone given, training and validating WITHOUT the LPIPS perceptual term "
                "(pass a torchvision vgg16/alexnet state dict path to enable it)"
            )
        self.export_dir = Path(export_dir)
        self._stats: Tensor | None = None  # [3, z] sums of 1, x, x^2 of the posterior mean (validation)
        self._stats_version = 0  # bumped whenever the latent statistics change
        self._exported: tuple[int, int] | None = None  # (step, stats version) of the last export

    # ------------------------------------------------------------------ batch -> clip, guidance
    def clip_and_references(self, batch: dict[str, Any], k: int) -> tuple[Tensor, Tensor | None]:
        """``(clip [B, 3, 1 + T, H, W], guidance [B, K, 3, H, W] or None)`` from a training batch."""
        video, refs = batch.get("video"), batch.get("references")
        if video is None or refs is None:
            raise KeyError("VAEStage: the batch needs 'video' [B, 3, T, H, W] and 'references' [B, R, 3, H, W]")
        if video.ndim != 5 or refs.ndim != 5 or refs.shape[1] < 1:
            raise ValueError(
                f"VAEStage: expected video [B, 3, T, H, W] and references [B, R>=1, 3, H, W], got "
                f"{tuple(video.shape)} and {tuple(refs.shape)}"
            )
        if video.shape[2] % self.vae.config.temporal_factor:
            raise ValueError(
                f"VAEStage: window of {video.shape[2]} frames; it must be a multiple of "
                f"{self.vae.config.temporal_factor} (set window_frames in the DataModule)"
            )
        clip = torch.cat([refs[:, 0, :, None], video], dim=2)
        guidance = refs[:, 1 : 1 + k] if k > 0 else None
        return clip, guidance

    def region_mask(self, batch: dict[str, Any], clip: Tensor, groups: tuple[slice, ...], pad: float) -> Tensor:
        """``[B, T, H, W]``: each frame's boxes around keypoint ``groups`` (frame 0 is the reference: no box)."""
        kpts = batch.get("kpts")
        if kpts is None:
            raise KeyError(
                "VAEStage: face_weight, mouth_weight, hands_weight or mouth_gate_weight > 0 needs keypoints in the "
                "batch ('kpts', the shards' KEY.kpts.npy); set them to 0 for data without keypoints"
            )
        h, w = clip.shape[-2:]
        region = torch.stack([keypoint_box_mask(kpts, g, h, w, pad=pad) for g in groups]).amax(0)  # [B, T, H, W]
        return torch.cat([torch.zeros_like(region[:, :1]), region], dim=1)  # the reference frame: no box

    def region_l1(
        self, batch: dict[str, Any], recon: Tensor, clip: Tensor, groups: tuple[slice, ...], pad: float
    ) -> Tensor:
        """Mean L1 inside each frame's boxes around keypoint ``groups`` (``clip`` frame 0 is the reference: no box)."""
        return region_l1_loss(recon, clip, self.region_mask(batch, clip, groups, pad))

    def face_l1(self, batch: dict[str, Any], recon: Tensor, clip: Tensor) -> Tensor:
        """Mean L1 inside the face boxes of the window's frames."""
        return self.region_l1(batch, recon, clip, (FACE,), self.hparams.face_pad)

    def _draw_k(self, available: int) -> int:
        lo, hi = self.hparams.min_references, min(self.hparams.max_references, available)
        if lo > hi:
            raise ValueError(
                f"VAEStage: min_references={lo} but the batch has only {available} references besides the "
                f"reference image; raise num_references in the DataModule"
            )
        return int(torch.randint(lo, hi + 1, ()).item())

    @property
    def lpips(self) -> torch.nn.Module | None:
        net = self._lpips[0]
        if net is not None and next(net.parameters()).device != self.device:
            net.to(self.device)
        return net

    def pixel_losses(self, batch: dict[str, Any], video: Tensor, clip: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted pixel terms (L1, face, mouth, hands, changed pixels, edges, colour, LPIPS) of one decoded video,
        and their logs."""
        hp = self.hparams
        rec = l1_loss(video, clip)
        nll = hp.l1_weight * rec
        logs = {"l1": rec.detach()}
        if hp.face_weight > 0:
            face = self.face_l1(batch, video, clip)
            nll = nll + hp.face_weight * face
            logs["face_l1"] = face.detach()
        if hp.mouth_weight > 0:
            mouth = self.region_l1(batch, video, clip, (MOUTH,), hp.mouth_pad)
            nll = nll + hp.mouth_weight * mouth
            logs["mouth_l1"] = mouth.detach()
        if hp.hands_weight > 0:
            hands = self.region_l1(batch, video, clip, (LEFT_HAND, RIGHT_HAND), hp.hands_pad)
            nll = nll + hp.hands_weight * hands
            logs["hands_l1"] = hands.detach()
        if hp.changed_weight > 0:
            changed = region_l1_loss(video, clip, changed_pixels(clip, hp.changed_threshold))
            nll = nll + hp.changed_weight * changed
            logs["changed_l1"] = changed.detach()
        if hp.edge_weight > 0:
            edges = edge_l1_loss(video, clip)
            nll = nll + hp.edge_weight * edges
            logs["edge_l1"] = edges.detach()
        if hp.colour_weight > 0:
            colour = colour_l1_loss(video, clip)
            nll = nll + hp.colour_weight * colour
            logs["colour_l1"] = colour.detach()
        if self.lpips is not None and hp.lpips_weight > 0:
            perceptual = lpips_video(self.lpips, video, clip, frames=hp.lpips_frames)
            nll = nll + hp.lpips_weight * perceptual
            logs["lpips"] = perceptual.detach()
        return nll, logs

    def reconstruction_nll(
        self, batch: dict[str, Any], out: VAEOutput, clip: Tensor, guidance: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The pixel terms of the output, plus ``estimate_weight`` times those of the drawing before the copy head and
        ``gate_weight`` times the copy gate's cross-entropy against where the copy is right, plus ``copy_weight``
        times the L1 of the copy itself, plus ``unshown_gate_weight`` times the gate's cross-entropy against 0 where
        no guidance image (``guidance [B, K, C, H, W]``, what the copy head copied from) shows the frame and
        ``still_gate_weight`` times its cross-entropy against 1 where one shows it at the same place."""
        nll, logs = self.pixel_losses(batch, out.recon, clip)
        if self.hparams.estimate_weight > 0 and out.estimate is not None:
            estimate_nll, estimate_logs = self.pixel_losses(batch, out.estimate, clip)
            nll = nll + self.hparams.estimate_weight * estimate_nll
            logs.update({f"estimate_{name}": value for name, value in estimate_logs.items()})
        if self.hparams.gate_weight > 0 and out.copy_gate is not None:
            gate = copy_gate_loss(out.copy_gate, out.copy, clip, self.hparams.gate_tolerance)
            nll = nll + self.hparams.gate_weight * gate
            logs["copy_gate_bce"] = gate.detach()
        if self.hparams.mouth_gate_weight > 0 and out.copy_gate is not None:
            lips = self.region_mask(batch, clip, (MOUTH,), self.hparams.mouth_pad)
            shut = shut_gate_loss(out.copy_gate, lips)
            nll = nll + self.hparams.mouth_gate_weight * shut
            logs["mouth_gate_bce"] = shut.detach()
        if self.hparams.unshown_gate_weight > 0 and out.copy_gate is not None and guidance is not None:
            unshown = unshown_pixels(clip, guidance, self.hparams.changed_threshold, self.hparams.unshown_radius)
            shut = shut_gate_loss(out.copy_gate, unshown)
            nll = nll + self.hparams.unshown_gate_weight * shut
            logs["unshown_gate_bce"] = shut.detach()
        if self.hparams.still_gate_weight > 0 and out.copy_gate is not None and guidance is not None:
            still = ~unshown_pixels(clip, guidance, self.hparams.changed_threshold, 0)
            opened = open_gate_loss(out.copy_gate, still)
            nll = nll + self.hparams.still_gate_weight * opened
            logs["still_gate_bce"] = opened.detach()
        if self.hparams.copy_weight > 0 and out.copy is not None:
            copy_l1 = l1_loss(out.copy, clip)
            nll = nll + self.hparams.copy_weight * copy_l1
            logs["copy_l1"] = copy_l1.detach()
        return nll, logs

    # ------------------------------------------------------------------ training
    def vae_loss(self, batch: dict[str, Any], k: int) -> tuple[Tensor, Tensor, Tensor, VAEOutput, dict[str, Tensor]]:
        """``(nll + kl_weight * KL, nll, the clip, the VAE's output, logs)`` of one batch with ``k`` guidance images:
        the VAE's own objective, before any adversarial term (also what `dystream bench vae` times)."""
        clip, guidance = self.clip_and_references(batch, k)
        out = self.vae(clip, guidance, sample=self.hparams.sample_posterior)
        nll, logs = self.reconstruction_nll(batch, out, clip, guidance)
        kl = kl_loss(out.mean, out.logvar)
        logs["kl"] = kl.detach()
        return nll + self.hparams.kl_weight * kl, nll, clip, out, logs

    def _round_copy_gate_from_now(self) -> None:
        """The copy gate blends for the first ``copy_gate_soft_steps`` steps and is rounded from then on."""
        head = self.vae.decoder.copy_head
        if head is not None and self.vae.config.copy_gate_hard:
            head.hard_gate = self.global_step >= self.hparams.copy_gate_soft_steps

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._round_copy_gate_from_now()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hparams
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        k = self._draw_k(batch["references"].shape[1] - 1)
        loss, nll, clip, out, logs = self.vae_loss(batch, k)
        logs["references"] = torch.tensor(float(k))

        gan_on = self.disc is not None and self.global_step >= hp.disc_start
        if gan_on:
            self.disc.requires_grad_(False)  # the generator loss must not leave gradients in D
            adv = generator_adversarial_loss(self.disc(out.recon))
            if hp.disc_weighting == "adaptive":
                d_w = adaptive_gan_weight(nll, adv, self.vae.last_layer, hp.disc_weight)
            else:
                d_w = torch.tensor(hp.disc_weight, device=adv.device)
            loss = loss + d_w * adv
            self.disc.requires_grad_(True)
            logs.update(gan_g=adv.detach(), d_weight=d_w)

        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp.grad_clip > 0:
            self.clip_gradients(opt_g, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()  # the one step Lightning counts
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            (schedulers[0] if isinstance(schedulers, list) else schedulers).step()
            logs["lr"] = torch.tensor(opt_g.param_groups[0]["lr"])

        if gan_on:
            d_loss = hinge_discriminator_loss(self.disc(clip), self.disc(out.recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if hp.grad_clip > 0:
                self.clip_gradients(opt_d, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_no_closure)
            logs["gan_d"] = d_loss.detach()

        b = clip.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=b)
        self.log_dict({f"train/{name}": value for name, value in logs.items()}, batch_size=b)
        return loss.detach()

    def configure_optimizers(self):
        hp = self.hparams
        betas = (hp.beta1, hp.beta2)
        opt_g = adamw(self, self.vae.parameters(), lr=hp.lr, betas=betas, weight_decay=hp.weight_decay)
        optimizers = [opt_g]
        if self.disc is not None:
            optimizers.append(torch.optim.Adam(self.disc.parameters(), lr=hp.disc_lr, betas=betas))
        if hp.lr_schedule == "constant" and hp.warmup_steps == 0:
            return optimizers if len(optimizers) > 1 else opt_g
        scheduler = warmup_scheduler(self, opt_g, hp.lr_schedule, hp.warmup_steps, hp.min_lr_ratio)
        return optimizers, [scheduler]

    # ------------------------------------------------------------------ validation
    def _val_k(self, available: int) -> int:
        k = self.hparams.val_references
        return min(self.hparams.max_references if k is None else k, available)

    def on_validation_epoch_start(self) -> None:
        self._round_copy_gate_from_now()  # validation scores the gate that training is using now
        self._stats = torch.zeros(3, self.vae.config.latent_channels, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        k = self._val_k(batch["references"].shape[1] - 1)
        clip, guidance = self.clip_and_references(batch, k)
        out = self.vae(clip, guidance, sample=False)
        metrics = self.reconstruction_metrics(out.recon, clip)
        if k > 0:
            recon_k0 = self.vae(clip, None, sample=False).recon
            metrics["psnr_k0"] = self.reconstruction_metrics(recon_k0, clip, lpips=False)["psnr"]
        b = clip.shape[0]
        self.log("val/psnr", metrics.pop("psnr"), prog_bar=True, batch_size=b, sync_dist=True)
        self.log_dict({f"val/{name}": value for name, value in metrics.items()}, batch_size=b, sync_dist=True)
        mean = out.mean.double().transpose(0, 1).flatten(1)  # [z, N]
        self._stats += torch.stack([torch.full_like(mean[:, 0], mean.shape[1]), mean.sum(1), mean.pow(2).sum(1)])
        if batch_idx == 0 and self.hparams.num_val_videos > 0:
            self._log_videos(clip, out.recon)

    def reconstruction_metrics(self, recon: Tensor, target: Tensor, lpips: bool = True) -> dict[str, Tensor]:
        """PSNR (per clip, then averaged), SSIM (per frame) and LPIPS of videos in [-1, 1], in float32 whatever the
        training precision: SSIM's local variances (E[x^2] - E[x]^2) cancel catastrophically in bf16, and under
        bf16-mixed autocast its Gaussian filter ran in bf16: val/ssim read -0.16 for a VAE scoring 0.82."""
        with torch.autocast(recon.device.type, enabled=False):
            return self._reconstruction_metrics(recon.float(), target.float(), lpips)

    def _reconstruction_metrics(self, recon: Tensor, target: Tensor, lpips: bool) -> dict[str, Tensor]:
        pred, real = (recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2
        frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731  [B, 3, T, H, W] -> [B*T, 3, H, W]
        out = {
            "psnr": peak_signal_noise_ratio(pred, real, data_range=1.0, reduction="none", dim=(1, 2, 3, 4)).mean(),
            "ssim": structural_similarity_index_measure(frames(pred), frames(real), data_range=1.0),
            "l1": (recon - target).abs().mean(),
        }
        if lpips and self.lpips is not None:
            out["lpips"] = lpips_video(self.lpips, recon.clamp(-1, 1), target)
        return out

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._stats is None:
            return
        stats = self.trainer.strategy.reduce(self._stats, reduce_op="sum")
        count, total, total_sq = stats
        if float(count.min()) < 2:
            return
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
        self.vae.set_latent_stats(mean.float(), std.float().clamp_min(1e-6))
        self._stats_version += 1
        self.log("val/latent_std_mean", std.mean().float(), sync_dist=False)

    @rank_zero_only
    def _log_videos(self, clip: Tensor, recon: Tensor) -> None:
        writer = getattr(self.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_image"):
            return
        n = min(self.hparams.num_val_videos, clip.shape[0])
        side_by_side = torch.cat([clip[:n], recon[:n].clamp(-1, 1)], dim=-1)  # [n, 3, T, H, 2W]
        frames = ((side_by_side + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu()  # [n, T, H, 2W, 3]
        for i in range(n):
            _add_gif(writer, f"val/reconstruction_{i}", frames[i], self.global_step)

    # ------------------------------------------------------------------ hand-over
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = (int(self.global_step), self._stats_version)
        # ModelCheckpoint saves "last" and top-k at the same step; ZeRO-3 shards: `dystream consolidate` exports
        if state != self._exported and exports_during_training(self):
            self.export()
            self._exported = state

    @rank_zero_only
    def export(self) -> Path:
        """Write ``<export_dir>/vae.safetensors`` (weights, config and latent statistics)."""
        calibrated = not (bool((self.vae.latent_mean == 0).all()) and bool((self.vae.latent_std == 1).all()))
        if not calibrated:
            rank_zero_warn("VAEStage: latent statistics not computed yet (no validation ran); exporting identity ones")
        extra = {"stage": "vae", "step": int(self.global_step), "latent_stats_from_data": calibrated}
        trained = {name: getattr(self.vae.config, name) for name in self._export_scales}
        self.vae.set_copy_scales(**self._export_scales)
        try:
            path = save_model(self.vae, self.export_dir / "vae.safetensors", arch="vae", extra=extra)
        finally:
            self.vae.set_copy_scales(**trained)
        announce_export(self, path)
        return path


def _no_closure() -> None:
    return None


def _add_gif(writer: Any, tag: str, frames: Tensor, step: int, fps: int = 25) -> None:
    """Animated GIF image summary (what ``SummaryWriter.add_video`` writes, without needing moviepy)."""
    from PIL import Image

    try:
        from tensorboard.compat.proto.summary_pb2 import Summary

        file_writer = writer._get_file_writer()
    except (ImportError, AttributeError):
        writer.add_image(tag, frames[0].permute(2, 0, 1), step)  # not a torch SummaryWriter: first frame only
        return
    images = [Image.fromarray(f.numpy()) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buffer.getvalue())
    file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
