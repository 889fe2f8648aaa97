"""Audio pretraining stage: wav2vec 2.0 self-supervised pretraining of the chain's audio encoder.

StreamAvatar conditions its DiT on *pretrained* Wav2Vec2 features (§3.2; its Table 3 compares masking the waveform
before Wav2Vec2 with masking the features after it, which only matters because the features are pretrained). At
paper scale the zoo's ``wav2vec2-base-960h`` is that encoder. The embedded chain's tiny encoder has no published
weights, so this stage pretrains it on the speech it will hear: both audio tracks of the training shards, with the
wav2vec 2.0 objective (Baevski et al. 2020, §3.2-3.3):

- the conv feature encoder's outputs are quantised with Gumbel-softmax codebooks (G groups of V entries) into the
  targets ``q_t``;
- spans of the features are masked (``mask_time_prob`` of the steps start a span of ``mask_time_length``) and
  replaced by a learnt embedding before the transformer;
- at each masked step the transformer's output must pick ``q_t`` among ``num_negatives`` distractors drawn from
  the other masked steps of the same utterance (contrastive loss, cosine similarity over a temperature);
- a diversity loss keeps the codebook entries in use (entropy of the averaged softmax over the entries).

All of it runs through transformers' ``Wav2Vec2ForPreTraining`` and its ``_compute_mask_indices`` and
``_sample_negative_indices`` helpers; the losses are normalised by the number of masked steps, and the Gumbel
temperature decays from ``max_gumbel_temperature`` to ``min_gumbel_temperature`` over the run, as in transformers'
speech-pretraining example.

Hand-over: ``<export_dir>/audio.safetensors``, an :class:`~dystream.models.audio.AudioEncoder` (arch ``audio``)
holding the pretrained ``wav2vec2`` weights, loaded strictly and frozen by every later stage
(``audio: runs/audio/audio.safetensors`` in the teacher recipe).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from transformers import Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from dystream.logs import announce_export
from dystream.models.audio import AudioEncoder, AudioEncoderConfig
from dystream.stages.metric_syncnet import one_cycle
from dystream.zoo.files import save_model

__all__ = ["AudioPretrainStage", "pretraining_model", "normalise_waveforms"]


def pretraining_model(
    config: AudioEncoderConfig,
    *,
    num_codevector_groups: int = 2,
    num_codevectors_per_group: int = 32,
    codevector_dim: int = 64,
    proj_codevector_dim: int = 32,
    num_negatives: int = 20,
    diversity_loss_weight: float = 0.1,
    contrastive_logits_temperature: float = 0.1,
    mask_time_prob: float = 0.5,
    mask_time_length: int = 5,
) -> Wav2Vec2ForPreTraining:
    """``Wav2Vec2ForPreTraining`` whose ``wav2vec2`` has exactly the layout of ``AudioEncoder(config)``."""
    w2v = config.wav2vec2_config()
    w2v.update(
        dict(
            apply_spec_augment=True,  # the explicit mask_time_indices are applied only with it on
            mask_time_prob=mask_time_prob,
            mask_time_length=mask_time_length,
            num_codevector_groups=num_codevector_groups,
            num_codevectors_per_group=num_codevectors_per_group,
            codevector_dim=codevector_dim,
            proj_codevector_dim=proj_codevector_dim,
            num_negatives=num_negatives,
            diversity_loss_weight=diversity_loss_weight,
            contrastive_logits_temperature=contrastive_logits_temperature,
        )
    )
    return Wav2Vec2ForPreTraining(w2v)


def normalise_waveforms(wave: Tensor) -> Tensor:
    """Per-row zero-mean unit-variance normalisation, as :class:`AudioEncoder` applies before its Wav2Vec2."""
    return (wave - wave.mean(dim=1, keepdim=True)) / torch.sqrt(wave.var(dim=1, keepdim=True, unbiased=False) + 1e-7)


class AudioPretrainStage(L.LightningModule):
    """wav2vec 2.0 pretraining of an :class:`AudioEncoder` preset on the shards' speech (module docstring).

    Args:
        preset: ``AudioEncoderConfig`` preset to pretrain (``tiny`` for the embedded chain).
        seed: initialisation seed of the encoder (the chain's random ``tiny`` encoder uses 0).
        mask_time_prob: probability that a feature step starts a masked span (wav2vec 2.0: 0.65 with spans of 10 at
            50 Hz over utterances of seconds; the short synthetic windows use 0.5 and 5).
        mask_time_length: length of each masked span in feature steps (20 ms each).
        num_negatives: distractors per masked step, drawn from the utterance's other masked steps.
        num_codevector_groups, num_codevectors_per_group, codevector_dim, proj_codevector_dim: the quantiser
            (G groups of V entries, concatenated to ``codevector_dim``, projected to ``proj_codevector_dim``).
        diversity_loss_weight: alpha of the diversity loss.
        contrastive_logits_temperature: kappa of the contrastive logits.
        max_gumbel_temperature, min_gumbel_temperature, gumbel_temperature_decay: the Gumbel temperature at step s
            is ``max(max * decay**s, min)``.
        lr: AdamW peak learning rate (one-cycle schedule: 10 % warm-up, cosine decay).
        weight_decay: AdamW weight decay.
        export_dir: where ``audio.safetensors`` is written at every checkpoint save.
    """

    def __init__(
        self,
        preset: str = "tiny",
        seed: int = 0,
        mask_time_prob: PositiveFloat = 0.5,
        mask_time_length: PositiveInt = 5,
        num_negatives: PositiveInt = 20,
        num_codevector_groups: PositiveInt = 2,
        num_codevectors_per_group: PositiveInt = 32,
        codevector_dim: PositiveInt = 64,
        proj_codevector_dim: PositiveInt = 32,
        diversity_loss_weight: NonNegativeFloat = 0.1,
        contrastive_logits_temperature: PositiveFloat = 0.1,
        max_gumbel_temperature: PositiveFloat = 2.0,
        min_gumbel_temperature: PositiveFloat = 0.5,
        gumbel_temperature_decay: PositiveFloat = 0.995,
        lr: PositiveFloat = 2e-3,
        weight_decay: NonNegativeFloat = 0.01,
        export_dir: str = "runs/audio",
    ) -> None:
        super().__init__()
        if not 0.0 < mask_time_prob < 1.0:
            raise ValueError(f"AudioPretrainStage.mask_time_prob must lie in (0, 1), got {mask_time_prob}")
        if codevector_dim % num_codevector_groups:
            raise ValueError(
                f"AudioPretrainStage: codevector_dim {codevector_dim} must be divisible by num_codevector_groups "
                f"{num_codevector_groups}"
            )
        if min_gumbel_temperature > max_gumbel_temperature:
            raise ValueError(
                f"AudioPretrainStage: min_gumbel_temperature {min_gumbel_temperature} > max_gumbel_temperature "
                f"{max_gumbel_temperature}"
            )
        self.save_hyperparameters()
        self.encoder_config = AudioEncoderConfig.from_name(preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            start = AudioEncoder(self.encoder_config)  # the chain's encoder before pretraining, same init
        fields = inspect.signature(pretraining_model).parameters.keys() - {"config"}
        self.model = pretraining_model(self.encoder_config, **{k: self.hparams[k] for k in fields})
        self.model.wav2vec2.load_state_dict(start.wav2vec2.state_dict(), strict=True)
        self.export_dir = Path(export_dir)

    # ------------------------------------------------------------------ data -> masked pretraining batch
    def waveforms(self, batch: dict[str, Any]) -> Tensor:
        """Both tracks of a SpeakerVid batch as rows ``[2B, N]`` (normalised), the alignment padding included."""
        wave = batch.get("audio_self"), batch.get("audio_other")
        if wave[0] is None or wave[1] is None:
            raise KeyError("AudioPretrainStage: the batch needs 'audio_self' and 'audio_other' [B, samples] (16 kHz)")
        rows = torch.cat(wave, dim=0).float()
        pad_l, pad_r = self.encoder_config.pad
        return torch.nn.functional.pad(normalise_waveforms(rows), (pad_l, pad_r))

    def masks(self, rows: int, samples: int, rng: np.random.Generator | None) -> tuple[Tensor, Tensor]:
        """``(mask_time_indices [R, S] bool, sampled_negative_indices [R, S, K] long)`` for ``rows`` utterances."""
        hp = self.hparams
        steps = int(self.model._get_feat_extract_output_lengths(samples))
        if steps < 2 * hp.mask_time_length:
            raise ValueError(
                f"AudioPretrainStage: windows of {samples} samples give {steps} feature steps, fewer than twice "
                f"mask_time_length={hp.mask_time_length}; use longer windows (data.window_frames) or shorter spans"
            )
        state = np.random.get_state()
        if rng is not None:  # the helpers draw from numpy's global generator: fix it for validation
            np.random.seed(int(rng.integers(2**31)))
        try:
            mask = _compute_mask_indices((rows, steps), mask_prob=hp.mask_time_prob, mask_length=hp.mask_time_length,
                                         min_masks=2)  # fmt: skip
            negatives = _sample_negative_indices((rows, steps), hp.num_negatives, mask_time_indices=mask)
        finally:
            if rng is not None:
                np.random.set_state(state)
        return torch.from_numpy(mask).to(self.device), torch.from_numpy(negatives).long().to(self.device)

    def losses(self, batch: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Tensor]:
        """Contrastive and diversity losses per masked step, their sum (``loss``) and the codebook perplexity."""
        wave = self.waveforms(batch)
        mask, negatives = self.masks(wave.shape[0], wave.shape[1], rng)
        out = self.model(wave, mask_time_indices=mask, sampled_negative_indices=negatives)
        n = mask.sum().clamp(min=1)
        return {
            "loss": out.loss / n,
            "contrastive": out.contrastive_loss.detach() / n,
            "diversity": out.diversity_loss.detach() / n,
            "perplexity": out.codevector_perplexity.detach(),
            "masked_fraction": mask.float().mean(),
        }

    # ------------------------------------------------------------------ training
    def gumbel_temperature(self, step: int) -> float:
        hp = self.hparams
        return max(hp.max_gumbel_temperature * hp.gumbel_temperature_decay**step, hp.min_gumbel_temperature)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        temperature = self.gumbel_temperature(self.global_step)
        self.model.set_gumbel_temperature(temperature)
        logs = self.losses(batch)
        b = batch["audio_self"].shape[0]
        self.log("train/loss", logs["loss"], prog_bar=True, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=b)
        self.log("train/gumbel_temperature", temperature, batch_size=b)
        return logs["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logs = self.losses(batch, rng=np.random.default_rng(1234 + batch_idx))  # the same masks every validation
        b = batch["audio_self"].shape[0]
        self.log("val/loss", logs["loss"], prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/contrastive", logs["contrastive"], batch_size=b, sync_dist=True)
        self.log("val/perplexity", logs["perplexity"], batch_size=b, sync_dist=True)

    def configure_optimizers(self):
        return one_cycle(self, self.model.parameters(), self.hparams.lr, self.hparams.weight_decay)

    # ------------------------------------------------------------------ hand-over
    def encoder(self) -> AudioEncoder:
        """The pretrained weights as the frozen :class:`AudioEncoder` every later stage loads."""
        encoder = AudioEncoder(self.encoder_config)
        encoder.wav2vec2.load_state_dict(self.model.wav2vec2.state_dict(), strict=True)
        return encoder.freeze()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.export()

    def on_fit_end(self) -> None:
        self.export()

    @rank_zero_only
    def export(self) -> None:
        path = self.export_dir / "audio.safetensors"
        extra = {"stage": "audio", "step": int(self.global_step), "pretraining": "wav2vec2"}
        save_model(self.encoder(), path, arch="audio", extra=extra)
        announce_export(self, path)
