"""Wav2Vec2 audio features per video frame, and the speaking-mask routing (StreamAvatar §3.2).

Notable:

- The network is ``transformers.Wav2Vec2Model`` built from a ``Wav2Vec2Config`` (never downloaded);
  weights come from a local file or directory through :func:`load_wav2vec2_weights`, which reads
  the official ``facebook/wav2vec2-base-960h`` layout strictly (``lm_head.*`` dropped, reported).
- Several hidden states are combined (mean or concat) into one feature per 50 Hz step, then
  aligned to 25 fps video: every video frame owns 640 samples and gets exactly its 2 feature
  frames (mean or concat), or the Wan-S2V style linear interpolation. T * 640 samples always give
  ``[B, T, feature_dim]``, for any T.
- The speaking mask is applied to the *features*, never to the waveform
  (:func:`route_audio_features`): separated or muted waveforms leave Wav2Vec2's training
  distribution (paper §3.2).
- Streaming: :meth:`AudioEncoder.encode_window` encodes video frames [s, e) from a window with a
  bounded past context and look-ahead; :func:`encode_chunked` and :class:`StreamingAudioEncoder`
  (push samples, get frames) are built on it and agree exactly with each other.
- Frozen by default, in one place (:meth:`AudioEncoder.freeze`): no gradients, and ``train()``
  keeps it in eval mode (dropout off).

Alignment (frame_align "mean" / "concat"): the conv stack has a 400-sample receptive field and a
320-sample hop (50 Hz). The utterance is zero-padded by (400 - 320) / 2 = 40 samples on each side,
so feature k covers samples [320 k - 40, 320 k + 360) and the pair (2t, 2t + 1) is centred exactly on
video frame t's centre 640 t + 320; T * 640 samples give exactly 2T features.

Input normalisation: as ``Wav2Vec2FeatureExtractor`` (do_normalize=True): zero mean and unit
variance, ``(x - mean) / sqrt(var + 1e-7)``, over the samples the network sees: the whole
utterance offline, the context + chunk + look-ahead window in streaming (a documented difference
from the offline features, measured by tests/test_audio_streaming.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from dystream.diffusion.sampling import LISTEN_KEY, TALK_KEY

LayerCombine = Literal["mean", "concat"]
FrameAlign = Literal["mean", "concat", "interpolate"]


@dataclass
class AudioEncoderConfig:
    """Wav2Vec2 architecture (fields named as in ``transformers.Wav2Vec2Config``) plus the read-out."""

    # --- Wav2Vec2 architecture (defaults: the wav2vec2-base layout)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    feat_extract_norm: Literal["group", "layer"] = "group"
    conv_bias: bool = False  # True in the "layer"-norm (large, lv60) checkpoints
    do_stable_layer_norm: bool = False
    # --- read-out
    # indices into the Wav2Vec2 hidden states (0 = input of the first transformer layer, i = output
    # of layer i); None = every transformer layer's output, 1..num_hidden_layers
    layers: tuple[int, ...] | None = None
    layer_combine: LayerCombine = "mean"  # how the selected hidden states become one vector
    frame_align: FrameAlign = "mean"  # how 50 Hz features become one per video frame (module docstring)
    normalize: bool = True  # zero-mean unit-variance waveform normalisation, as Wav2Vec2FeatureExtractor
    sample_rate: int = 16000
    fps: int = 25
    frozen: bool = True  # freeze at construction (no grads, always eval)
    # the Wav2Vec2 checkpoint this layout matches, for error messages and the zoo
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.conv_dim, self.conv_kernel, self.conv_stride = (
            tuple(self.conv_dim),
            tuple(self.conv_kernel),
            tuple(self.conv_stride),
        )
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "sample_rate",
            "fps",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"AudioEncoderConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"AudioEncoderConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"AudioEncoderConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_conv_pos_embedding_groups={self.num_conv_pos_embedding_groups}"
            )
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) >= 1):
            raise ValueError(
                "AudioEncoderConfig.conv_dim, conv_kernel and conv_stride must have the same length, got "
                f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}"
            )
        if self.sample_rate % self.fps:
            raise ValueError(f"AudioEncoderConfig: sample_rate={self.sample_rate} must be a multiple of fps={self.fps}")
        if self.layer_combine not in ("mean", "concat"):
            raise ValueError(f"AudioEncoderConfig.layer_combine must be 'mean' or 'concat', got {self.layer_combine!r}")
        if self.frame_align not in ("mean", "concat", "interpolate"):
            raise ValueError(
                f"AudioEncoderConfig.frame_align must be 'mean', 'concat' or 'interpolate', got {self.frame_align!r}"
            )
        if self.frame_align != "interpolate" and 2 * self.hop_length != self.samples_per_frame:
            raise ValueError(
                f"AudioEncoderConfig.conv_stride: frame_align={self.frame_align!r} gives each video frame exactly 2 "
                f"feature frames, so the conv hop (product of strides = {self.hop_length}) must be half of "
                f"sample_rate / fps = {self.samples_per_frame}; use frame_align='interpolate' otherwise"
            )
        if self.receptive_field < self.hop_length:
            raise ValueError(
                f"AudioEncoderConfig.conv_kernel: receptive field {self.receptive_field} is shorter than the hop "
                f"{self.hop_length}; samples would be skipped"
            )
        if self.layers is None:
            self.layers = tuple(range(1, self.num_hidden_layers + 1))
        self.layers = tuple(self.layers)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"AudioEncoderConfig.layers must be non-empty and unique, got {self.layers}")
        if any(not 0 <= i <= self.num_hidden_layers for i in self.layers):
            raise ValueError(
                f"AudioEncoderConfig.layers must lie in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.layers}"
            )

    # --- derived sizes
    @property
    def samples_per_frame(self) -> int:
        """Audio samples per video frame (640 at 16 kHz / 25 fps)."""
        return self.sample_rate // self.fps

    @property
    def hop_length(self) -> int:
        """Samples between consecutive Wav2Vec2 features (320 = 50 Hz at 16 kHz)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples seen by one conv feature (400 for wav2vec2-base)."""
        r, jump = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            r += (k - 1) * jump
            jump *= s
        return r

    @property
    def pad(self) -> tuple[int, int]:
        """Zero padding (left, right) in samples that centres feature pairs on video frames."""
        if self.frame_align == "interpolate":
            return 0, 0
        extra = self.receptive_field - self.hop_length
        return extra // 2, extra - extra // 2

    @property
    def feature_dim(self) -> int:
        """D of the ``[B, T, D]`` output: hidden_size x (#layers if concat) x (2 if frame_align concat)."""
        d = self.hidden_size * (len(self.layers or ()) if self.layer_combine == "concat" else 1)
        return d * (2 if self.frame_align == "concat" else 1)

    def wav2vec2_config(self) -> Wav2Vec2Config:
        """The ``transformers`` config; dropout only matters if the encoder is unfrozen."""
        return Wav2Vec2Config(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            conv_dim=list(self.conv_dim),
            conv_kernel=list(self.conv_kernel),
            conv_stride=list(self.conv_stride),
            num_conv_pos_embeddings=self.num_conv_pos_embeddings,
            num_conv_pos_embedding_groups=self.num_conv_pos_embedding_groups,
            feat_extract_norm=self.feat_extract_norm,
            conv_bias=self.conv_bias,
            do_stable_layer_norm=self.do_stable_layer_norm,
            # mask_time_prob > 0 keeps the `masked_spec_embed` parameter that the official checkpoints
            # carry (strict loading), while SpecAugment itself is switched off: we extract features.
            mask_time_prob=0.05,
            apply_spec_augment=False,
            layerdrop=0.0,
        )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> AudioEncoderConfig:
        """A preset from :data:`AUDIO_ENCODER_PRESETS`, with field overrides."""
        if name not in AUDIO_ENCODER_PRESETS:
            raise ValueError(f"AudioEncoderConfig: unknown preset {name!r}; known: {sorted(AUDIO_ENCODER_PRESETS)}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"AudioEncoderConfig.from_name({name!r}): unknown fields {bad}")
        return cls(**{**AUDIO_ENCODER_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class AudioEncoder(nn.Module):
    """Waveform ``[B, T * 640]`` (16 kHz mono) -> features per video frame ``[B, T, feature_dim]``."""

    def __init__(self, config: AudioEncoderConfig | str = "tiny") -> None:
        super().__init__()
        self.config = AudioEncoderConfig.from_name(config) if isinstance(config, str) else config
        self.wav2vec2 = Wav2Vec2Model(self.config.wav2vec2_config())
        self.frozen = False
        if self.config.frozen:
            self.freeze()

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    # --- freezing: the one place the audio encoder is frozen
    def freeze(self) -> AudioEncoder:
        """No gradients, eval mode now and after any later ``train()`` call (dropout stays off)."""
        self.frozen = True
        self.requires_grad_(False)
        super().train(False)
        return self

    def unfreeze(self) -> AudioEncoder:
        self.frozen = False
        self.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> AudioEncoder:
        return super().train(mode and not self.frozen)

    # --- encoding
    def num_frames(self, wave: Tensor) -> int:
        """Video frames covered by ``wave [B, N]``; N must be a whole number of frames."""
        if wave.ndim != 2:
            raise ValueError(f"AudioEncoder: wave must be [B, samples], got shape {tuple(wave.shape)}")
        n, spf = wave.shape[1], self.samples_per_frame
        if n == 0 or n % spf:
            raise ValueError(
                f"AudioEncoder: wave has {n} samples, expected a positive multiple of {spf} "
                f"(= {self.config.sample_rate} Hz / {self.config.fps} fps, one video frame each); "
                "cut or pad the audio to whole video frames first"
            )
        return n // spf

    def forward(self, wave: Tensor) -> Tensor:
        """Full-utterance features: ``[B, T * 640]`` -> ``[B, T, feature_dim]``."""
        t = self.num_frames(wave)
        return self.encode_window(wave, 0, t)

    def encode_window(self, wave: Tensor, start: int, end: int, *, offset: int = 0) -> Tensor:
        """Features of video frames ``[start, end)`` computed only from those frames' audio.

        ``wave[:, j]`` is sample ``offset + j`` of the utterance (streaming buffers drop old audio,
        so ``offset`` may be > 0); the audio available ends at ``offset + wave.shape[1]``. The
        window reads the frames' samples plus the alignment padding (40 samples each side) where
        they exist, zeros before the utterance start and past the available audio, and normalises
        over what it read. ``forward`` is the window over the whole utterance; chunked encoders
        pass windows with past context and look-ahead.
        """
        if wave.ndim != 2:
            raise ValueError(f"AudioEncoder.encode_window: wave must be [B, samples], got {tuple(wave.shape)}")
        if not 0 <= start < end:
            raise ValueError(f"AudioEncoder.encode_window: need 0 <= start < end, got start={start}, end={end}")
        spf, (pad_l, pad_r) = self.samples_per_frame, self.config.pad
        lo, hi = start * spf - pad_l, end * spf + pad_r  # utterance samples the window reads
        first, avail = max(lo, 0), offset + wave.shape[1]
        if first < offset:
            raise ValueError(
                f"AudioEncoder.encode_window: the window needs samples from {first}, the buffer starts at {offset}"
            )
        if end * spf > avail:
            raise ValueError(f"AudioEncoder.encode_window: frames up to {end} need {end * spf} samples, got {avail}")
        seg = wave[:, first - offset : min(hi, avail) - offset]
        param = next(self.wav2vec2.parameters())
        seg = seg.to(device=param.device, dtype=torch.float32)
        if self.config.normalize:
            # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm (population variance, eps 1e-7)
            seg = (seg - seg.mean(dim=1, keepdim=True)) / torch.sqrt(
                seg.var(dim=1, keepdim=True, unbiased=False) + 1e-7
            )
        seg = F.pad(seg, (first - lo, hi - min(hi, avail)))  # zeros (silence) outside the available audio
        return self._features(seg.to(param.dtype), end - start)

    def _features(self, samples: Tensor, num_frames: int) -> Tensor:
        """Padded window samples -> ``[B, num_frames, feature_dim]``."""
        out = self.wav2vec2(samples, output_hidden_states=True)
        hidden = [out.hidden_states[i] for i in self.config.layers]  # each [B, S, H], S = 50 Hz steps
        h = torch.stack(hidden).mean(0) if self.config.layer_combine == "mean" else torch.cat(hidden, dim=-1)
        s = h.shape[1]
        if self.config.frame_align == "interpolate":
            # Wan-S2V style: linear interpolation, endpoints aligned. With T * 640 samples there are
            # 2T - 1 features, so this picks feature 2t for frame t (its first 25 ms half).
            if num_frames == 1:
                return h[:, :1]
            return F.interpolate(h.transpose(1, 2), size=num_frames, mode="linear", align_corners=True).transpose(1, 2)
        if s != 2 * num_frames:  # guaranteed by the padding; fail loudly if the conv arithmetic changes
            raise RuntimeError(f"AudioEncoder: expected {2 * num_frames} feature frames, got {s}")
        pairs = h.view(h.shape[0], num_frames, 2, h.shape[-1])  # b (t two) d -> b t two d
        return pairs.mean(2) if self.config.frame_align == "mean" else pairs.flatten(2)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: AudioEncoderConfig | str = "wav2vec2-base-960h") -> AudioEncoder:
        """Build the encoder for ``config`` and load local Wav2Vec2 weights (:func:`load_wav2vec2_weights`)."""
        encoder = cls(config)
        load_wav2vec2_weights(encoder, path)
        return encoder


# ---------------------------------------------------------------------------------------------
# Speaking-mask routing (paper §3.2)
# ---------------------------------------------------------------------------------------------


def route_audio_features(self_feats: Tensor, other_feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Split features into the talk and listen conditions with the per-frame speaking mask.

    ``talk = self_feats * mask`` (own voice while speaking -> Audio Attention) and
    ``listen = other_feats * (1 - mask)`` (partner's voice while listening -> Interact Audio
    Attention). Features ``[B, T, D]``, mask ``[B, T]`` with values in [0, 1] (1 = speaking). The
    mask multiplies the extracted *features*, never the waveform (StreamAvatar §3.2).
    """
    if self_feats.ndim != 3 or self_feats.shape != other_feats.shape:
        raise ValueError(
            f"route_audio_features: self_feats {tuple(self_feats.shape)} and other_feats {tuple(other_feats.shape)} "
            "must both be [B, T, D]"
        )
    if mask.shape != self_feats.shape[:2]:
        raise ValueError(
            f"route_audio_features: mask must be [B, T]={list(self_feats.shape[:2])}, got {tuple(mask.shape)}"
        )
    m = mask.to(dtype=self_feats.dtype, device=self_feats.device)
    if bool(((m < 0) | (m > 1)).any()):
        raise ValueError("route_audio_features: mask values must lie in [0, 1] (1 = speaking, 0 = listening)")
    m = m[..., None]
    return self_feats * m, other_feats * (1 - m)


MaskMode = Literal["features", "waveform"]


def mask_waveforms(audio_self: Tensor, audio_other: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The Pre-Mask variant's inputs (StreamAvatar Table 3): ``audio_self * mask`` and ``audio_other * (1 - mask)``
    with the per-frame mask ``[B, T]`` held over each frame's samples (``[B, T * spf]``, spf = samples per frame)."""
    b, n = audio_self.shape
    if mask.ndim != 2 or mask.shape[0] != b or n % mask.shape[1]:
        raise ValueError(
            f"mask_waveforms: mask {tuple(mask.shape)} must be [B, T] with T dividing the {n} samples of each track"
        )
    m = mask.to(audio_self.dtype).repeat_interleave(n // mask.shape[1], dim=1)
    return audio_self * m, audio_other * (1 - m)


def audio_conditions(
    encoder: AudioEncoder, audio_self: Tensor, audio_other: Tensor, mask: Tensor, mask_mode: MaskMode = "features"
) -> dict[str, Tensor]:
    """Batch keys ``audio_self``/``audio_other`` ``[B, T * 640]`` and ``mask [B, T]`` -> the denoiser's
    audio conditions ``{TALK_KEY: [B, T, D], LISTEN_KEY: [B, T, D]}`` (both tracks in one encoder call).

    ``mask_mode="features"`` (the paper's choice, §3.2) routes the extracted features with the mask;
    ``"waveform"`` (Table 3's Pre-Mask ablation) masks the waveforms before the encoder and leaves its features
    as they come.
    """
    if audio_self.shape != audio_other.shape:
        raise ValueError(
            f"audio_conditions: audio_self {tuple(audio_self.shape)} and audio_other {tuple(audio_other.shape)} differ"
        )
    if mask_mode not in ("features", "waveform"):
        raise ValueError(f"audio_conditions: mask_mode must be 'features' or 'waveform', got {mask_mode!r}")
    b = audio_self.shape[0]
    if mask_mode == "waveform":
        audio_self, audio_other = mask_waveforms(audio_self, audio_other, mask)
    feats = encoder(torch.cat([audio_self, audio_other], dim=0))  # per-utterance normalisation is per row
    if mask_mode == "waveform":
        return {TALK_KEY: feats[:b], LISTEN_KEY: feats[b:]}
    talk, listen = route_audio_features(feats[:b], feats[b:], mask)
    return {TALK_KEY: talk, LISTEN_KEY: listen}


# ---------------------------------------------------------------------------------------------
# Chunked / streaming encoding
# ---------------------------------------------------------------------------------------------


def _check_chunking(chunk_frames: int, lookahead_frames: int, context_frames: int) -> None:
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if lookahead_frames < 0 or context_frames < 0:
        raise ValueError(f"lookahead_frames and context_frames must be >= 0, got {lookahead_frames}, {context_frames}")


def encode_chunked(
    encoder: AudioEncoder,
    wave: Tensor,
    chunk_frames: int,
    lookahead_frames: int = 0,
    context_frames: int = 0,
) -> Tensor:
    """Offline simulation of streaming: features of frames [s, s + chunk) come from the window
    [s - context, s + chunk + lookahead) (clipped to the utterance). ``[B, T * 640] -> [B, T, D]``."""
    _check_chunking(chunk_frames, lookahead_frames, context_frames)
    t = encoder.num_frames(wave)
    out = []
    for s in range(0, t, chunk_frames):
        e = min(s + chunk_frames, t)
        ws, we = max(s - context_frames, 0), min(e + lookahead_frames, t)
        out.append(encoder.encode_window(wave, ws, we)[:, s - ws : e - ws])
    return torch.cat(out, dim=1)


class StreamingAudioEncoder:
    """Push 16 kHz samples as they arrive, get features of completed chunks of video frames.

    A chunk of ``chunk_frames`` frames is emitted once its look-ahead (``lookahead_frames`` frames
    plus the 40-sample alignment pad) has arrived; it is encoded from ``context_frames`` frames of
    past audio + the chunk + the look-ahead. Only that much audio is kept. ``flush()`` ends the
    stream: a trailing partial frame is completed with silence, and the remaining frames are
    emitted. Output equals :func:`encode_chunked` on the whole (frame-padded) utterance exactly.
    """

    def __init__(self, encoder: AudioEncoder, chunk_frames: int, lookahead_frames: int = 0, context_frames: int = 0):
        _check_chunking(chunk_frames, lookahead_frames, context_frames)
        self.encoder = encoder
        self.chunk_frames, self.lookahead_frames, self.context_frames = chunk_frames, lookahead_frames, context_frames
        self.reset()

    def reset(self) -> None:
        self._buf: Tensor | None = None  # [B, n] samples from global sample index self._offset on
        self._offset = 0
        self._next = 0  # first video frame not yet emitted
        self._total = 0  # samples pushed so far
        self._closed = False

    @property
    def frames_emitted(self) -> int:
        return self._next

    @property
    def latency_samples(self) -> int:
        """Audio that must arrive after a chunk's last sample before the chunk can be encoded."""
        return self.lookahead_frames * self.encoder.samples_per_frame + self.encoder.config.pad[1]

    def push(self, samples: Tensor) -> Tensor:
        """``samples [B, n]`` (or ``[n]`` for B = 1) -> features of newly completed frames ``[B, k, D]``."""
        if self._closed:
            raise RuntimeError("StreamingAudioEncoder.push: the stream was flushed; call reset() to start a new one")
        if samples.ndim == 1:
            samples = samples[None]
        if samples.ndim != 2:
            raise ValueError(f"StreamingAudioEncoder.push: samples must be [B, n] or [n], got {tuple(samples.shape)}")
        if self._buf is not None and samples.shape[0] != self._buf.shape[0]:
            raise ValueError(
                f"StreamingAudioEncoder.push: batch changed from {self._buf.shape[0]} to {samples.shape[0]}"
            )
        self._buf = samples if self._buf is None else torch.cat([self._buf, samples.to(self._buf)], dim=1)
        self._total += samples.shape[1]
        return self._emit(final=False)

    def flush(self) -> Tensor:
        """Finish the stream: emit every remaining frame (the last partial frame padded with silence)."""
        if self._buf is None:
            raise RuntimeError("StreamingAudioEncoder.flush: nothing was pushed")
        spf = self.encoder.samples_per_frame
        partial = self._total % spf
        if partial:
            self._buf = F.pad(self._buf, (0, spf - partial))
            self._total += spf - partial
        self._closed = True
        return self._emit(final=True)

    def _emit(self, final: bool) -> Tensor:
        assert self._buf is not None
        spf, pad_r = self.encoder.samples_per_frame, self.encoder.config.pad[1]
        b = self._buf.shape[0]
        avail = self._total // spf  # whole frames received
        outs = []
        while self._next < avail:
            s = self._next
            e = min(s + self.chunk_frames, avail)
            if not final and (e - s < self.chunk_frames or self._total < (e + self.lookahead_frames) * spf + pad_r):
                break
            ws, we = max(s - self.context_frames, 0), min(e + self.lookahead_frames, avail)
            feats = self.encoder.encode_window(self._buf, ws, we, offset=self._offset)
            outs.append(feats[:, s - ws : e - ws])
            self._next = e
            # keep only what later windows read: from the next window's start minus the alignment pad
            self._drop_before(max(self._next - self.context_frames, 0) * spf - self.encoder.config.pad[0])
        if not outs:
            d = self.encoder.feature_dim
            return torch.zeros(b, 0, d, device=self._buf.device)
        return torch.cat(outs, dim=1)

    def _drop_before(self, sample: int) -> None:
        assert self._buf is not None
        cut = sample - self._offset
        if cut > 0:
            self._buf = self._buf[:, cut:]
            self._offset = sample


# ---------------------------------------------------------------------------------------------
# Loading official Wav2Vec2 weights (local files only)
# ---------------------------------------------------------------------------------------------

_HF_PREFIX = "wav2vec2."
_DROPPED_PREFIXES = ("lm_head.",)  # the CTC head of *-960h checkpoints: not part of the feature encoder
# weight norm of the positional conv: old checkpoints store weight_g / weight_v, torch's
# parametrized weight_norm names them original0 / original1
_WEIGHT_NORM_NAMES = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}


@dataclass
class Wav2Vec2LoadReport:
    """What :func:`load_wav2vec2_weights` did."""

    path: str
    loaded: list[str]  # encoder parameter/buffer names that received a value
    dropped: list[str]  # checkpoint keys deliberately ignored (``lm_head.*``)


def _read_state_dict(path: Path) -> tuple[dict[str, Tensor], Path]:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(
                f"load_wav2vec2_weights: {path} holds neither model.safetensors nor pytorch_model.bin; point to a "
                "local copy of facebook/wav2vec2-base-960h (directory or weight file) or get it with `dystream zoo`"
            )
    if not path.is_file():
        raise FileNotFoundError(
            f"load_wav2vec2_weights: {path} does not exist; point to a local copy of facebook/wav2vec2-base-960h "
            "(directory with model.safetensors / pytorch_model.bin, or the file itself) or get it with `dystream zoo`"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), path
    if path.suffix in (".bin", ".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        if not isinstance(state, Mapping):
            raise ValueError(f"load_wav2vec2_weights: {path} does not hold a state dict (got {type(state).__name__})")
        return dict(state), path
    raise ValueError(
        f"load_wav2vec2_weights: {path}: unknown weight file type {path.suffix!r} (.safetensors, .bin, .pt)"
    )


def load_wav2vec2_weights(encoder: AudioEncoder | Wav2Vec2Model, path: str | Path) -> Wav2Vec2LoadReport:
    """Load a local Wav2Vec2 checkpoint of the official layout into ``encoder``, strictly.

    Accepted: a directory with ``model.safetensors`` or ``pytorch_model.bin`` (a Hugging Face
    snapshot of ``facebook/wav2vec2-base-960h``), or such a file. Keys may carry the
    ``Wav2Vec2ForCTC`` prefix ``wav2vec2.`` or none; ``lm_head.*`` is dropped and reported; the
    positional conv's ``weight_g``/``weight_v`` are renamed to torch's parametrized weight norm.
    Any other missing, unexpected or mis-shaped key is an error naming the keys.
    """
    model = encoder.wav2vec2 if isinstance(encoder, AudioEncoder) else encoder
    state, file = _read_state_dict(Path(path))
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key.startswith(_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        name = key[len(_HF_PREFIX) :] if key.startswith(_HF_PREFIX) else key
        if name not in target:
            # accept either weight-norm spelling, whichever this torch/transformers uses
            for old, new in _WEIGHT_NORM_NAMES.items():
                if name == old and new in target:
                    name = new
                elif name == new and old in target:
                    name = old
        if name in mapped:
            raise ValueError(f"load_wav2vec2_weights: {file}: key {key!r} maps to {name!r} twice")
        mapped[name] = value
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    shapes = sorted(k for k in set(target) & set(mapped) if tuple(target[k].shape) != tuple(mapped[k].shape))
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", [f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}" for k in shapes]),
            )
            if keys
        )
        raise ValueError(
            f"load_wav2vec2_weights: {file} does not match the encoder layout ({detail}); is it a Wav2Vec2 checkpoint "
            "of the same size as the AudioEncoderConfig preset (e.g. wav2vec2-base-960h)?"
        )
    model.load_state_dict(mapped, strict=True)
    return Wav2Vec2LoadReport(path=str(file), loaded=sorted(mapped), dropped=sorted(dropped))


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

AUDIO_ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: random weights, hidden 32 so that feature_dim = 32 = the tiny DiT's audio_dim. The conv
    # stack keeps the real kernels and strides (400-sample receptive field, 320-sample hop, 50 Hz).
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32, 32, 32, 32, 32),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        source="random (tests)",
    ),
    # facebook/wav2vec2-base-960h (config.json of the Hugging Face repo): 12 post-LN layers, 768 hidden,
    # group-norm conv stack; features = mean of the 12 transformer layer outputs, 768-d per video frame.
    "wav2vec2-base-960h": dict(source="facebook/wav2vec2-base-960h"),
}
