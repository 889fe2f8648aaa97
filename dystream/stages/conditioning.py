"""The frozen conditioning networks every DiT stage shares: VAE latents and routed audio features.

One module owns the VAE and the audio encoder, frozen, and turns a training batch (or a
streaming request) into what the AvatarDiT consumes (docs/architecture.md):

- latents ``[B, z, 1 + T/4, h, w]`` of ``cat([reference, video])``: frame 0 is the reference
  image encoded alone, the causal VAE's first frame;
- ``audio_talk`` / ``audio_listen`` ``[B, T, D]``: Wav2Vec2 features of the avatar's own voice
  and of the partner, routed by the speaking mask *after* feature extraction (StreamAvatar §3.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dystream.models.audio import AudioEncoder, AudioEncoderConfig, MaskMode, audio_conditions, load_wav2vec2_weights
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.stages.common import freeze, load_frozen
from dystream.zoo import is_entry, load_text_context, load_weights, resolve
from dystream.zoo.files import WeightFileError, read_metadata

DiTPresetName = Literal["tiny", "mini", "mini-p4", "small", "wan2.2-ti2v-5b"]


def build_audio_encoder(audio: str, weights: str | None = None, seed: int = 0) -> AudioEncoder:
    """An exported audio encoder file or zoo entry, or a preset (with local weights, or a fixed seeded init).

    ``weights`` (a Wav2Vec2 checkpoint path or zoo entry, e.g. ``wav2vec2-base-960h.facebook``) fills the preset.
    """
    if is_entry(audio):
        return freeze(load_weights(audio, "audio"))
    if audio.endswith(".safetensors") or Path(audio).is_file():
        return load_frozen(audio, "audio")
    config = AudioEncoderConfig.from_name(audio)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = AudioEncoder(config)
    if weights is not None:
        load_wav2vec2_weights(encoder, resolve(weights))
    return freeze(encoder)


def teacher_mask_mode(teacher: str | Path) -> MaskMode:
    """Where the speaking mask applies for stages built on ``teacher``: the mode its export records.

    The teacher stage records ``mask_mode`` (``features``, §3.2, or ``waveform``, Table 3's Pre-Mask) in its export;
    the ODE pairs and the students condition the teacher the way it was trained. Files without the record (base
    weights, older exports) give ``features``.
    """
    try:
        _, _, extra = read_metadata(resolve(teacher))
    except (WeightFileError, FileNotFoundError):
        return "features"
    mode = extra.get("mask_mode", "features")
    if mode not in ("features", "waveform"):
        raise ValueError(f"teacher_mask_mode: {teacher} records mask_mode {mode!r}; expected features or waveform")
    return mode


class AvatarConditioner(nn.Module):
    """Frozen VAE + audio encoder: batch -> (latents, audio conditions); latents -> video."""

    def __init__(
        self,
        vae: str,
        audio: str = "tiny",
        audio_weights: str | None = None,
        audio_seed: int = 0,
        mask_mode: MaskMode = "features",
    ) -> None:
        super().__init__()
        if mask_mode not in ("features", "waveform"):
            raise ValueError(f"AvatarConditioner: mask_mode must be 'features' or 'waveform', got {mask_mode!r}")
        self.vae = load_frozen(vae, "vae")
        self.audio = build_audio_encoder(audio, audio_weights, audio_seed)
        self.mask_mode = mask_mode  # where the speaking mask applies: "features" (§3.2) or "waveform" (Table 3)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def audio_dim(self) -> int:
        return self.audio.feature_dim

    @torch.no_grad()
    def encode_video(self, reference: Tensor, video: Tensor) -> Tensor:
        """reference [B, 3, H, W], video [B, 3, T, H, W] -> latents [B, z, 1 + T/4, h, w]."""
        clip = torch.cat([reference[:, :, None], video], dim=2)
        return self.vae.encode(clip, references=reference[:, None])

    def batch_latents(self, batch: dict[str, Any]) -> Tensor:
        """The latents of a training batch: cached ones (`LatentDataModule`) or the window encoded now."""
        if "latents" in batch:
            return batch["latents"]
        return self.encode_video(batch["references"][:, 0], batch["video"])

    @torch.no_grad()
    def encode_reference(self, reference: Tensor) -> Tensor:
        """reference [B, 3, H, W] -> its latent frame [B, z, 1, h, w]."""
        return self.vae.encode(reference[:, :, None], references=reference[:, None])

    @torch.no_grad()
    def decode(self, latents: Tensor, reference: Tensor) -> Tensor:
        """latents [B, z, F, h, w] -> video [B, 3, 1 + 4(F - 1), H, W] in [-1, 1] (frame 0 = reference)."""
        return self.vae.decode(latents, references=reference[:, None])

    @torch.no_grad()
    def audio_conditions(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Talk and listen features ``[B, T, D]`` routed by the speaking mask ``[B, T]``."""
        return audio_conditions(self.audio, batch["audio_self"], batch["audio_other"], batch["mask"], self.mask_mode)


def build_dit(
    preset: str,
    cond: AvatarConditioner,
    init_weights: str | None = None,
    text_context: str | None = None,
    **overrides: Any,
) -> AvatarDiT:
    """An AvatarDiT whose latent channels and audio width follow the conditioning networks.

    ``init_weights`` is a dystream file or zoo entry; base weights loaded through an adapter (the Wan2.2 entry) get
    new audio modules of the audio encoder's width (and ``overrides``). ``text_context`` applies in both cases.
    """
    if init_weights is not None:
        # a file, or a zoo entry (the Wan2.2 base through its adapter)
        model = load_weights(init_weights, arch="dit", adapter_overrides={"audio_dim": cond.audio_dim, **overrides})
        if model.config.in_channels != cond.latent_channels or model.config.audio_dim != cond.audio_dim:
            raise ValueError(
                f"init_weights {init_weights}: DiT expects {model.config.in_channels} latent channels and "
                f"audio_dim {model.config.audio_dim}, but the VAE gives {cond.latent_channels} and the audio "
                f"encoder {cond.audio_dim}"
            )
    else:
        config = DiTConfig.from_preset(
            preset,
            in_channels=cond.latent_channels,
            out_channels=cond.latent_channels,
            audio_dim=cond.audio_dim,
            **overrides,
        )
        model = AvatarDiT(config)
    if text_context is not None:
        model.set_text_context(load_text_context(text_context))
    return model


def check_cached_latents(datamodule: Any, vae: str) -> None:
    """Stop a stage whose training latents were cached by another VAE than its own (`LatentDataModule.vae_sha256`).

    Latents of another VAE train without an error but mean nothing to this stage's decoder."""
    cached = getattr(datamodule, "vae_sha256", None)
    if cached is None:
        return
    from dystream.zoo.cache import sha256_file

    path = resolve(vae) if is_entry(vae) else Path(vae)
    own = sha256_file(path)
    if own != cached:
        raise ValueError(
            f"the cached latents of {getattr(datamodule, 'train_shards', '?')} were encoded by a VAE with sha256 "
            f"{cached[:12]}..., this stage's VAE {path} has {own[:12]}...; re-encode them with `dystream data encode "
            f"--vae {path} ...` (make train: remove runs/latents and it re-encodes them) or point the stage at the VAE "
            "that wrote them"
        )
