"""Reference-guided deep-compression causal video VAE (paper 002), with a streaming API.

The VAE maps a clip of ``1 + r_t k`` frames to ``1 + k`` latent frames: the first frame is
encoded alone, every later latent frame covers ``r_t`` frames (``r_t = 4`` in every preset).
Everything that mixes time is causal (past-only temporal padding, a feature cache for chunked
use), so encoding and decoding can run chunk by chunk and give the same numbers as one shot.

Architecture (our reading of paper 002's abstract; the method section was not available, see
``notes/data_and_vae.md`` §3-4 for the lineage):

* **Causal 3-D convolutions** (Wan2.1 ``CausalConv3d``): time is padded with ``k_t - 1`` zero
  frames on the past side only; in chunked mode the last ``k_t - 1`` input frames of the
  previous chunk replace that padding (the feature cache).
* **Spatio-temporal residual auto-encoding** (DC-AE, extended to time as in Wan2.2
  ``AvgDown3D``/``DupUp3D``): every width/resolution change adds a non-parametric shortcut to
  its learned branch. Down: space/time-to-channel, then the mean over groups of channels. Up:
  channel duplication, then depth-to-space/time. Time stays causal: on the first chunk the
  down path pads the front with ``r_t - 1`` copies of the first frame (so the first latent frame
  sees frame 0 only) and the up path drops the first ``r_t - 1`` output frames. The stem/head
  (patchify, conv in/out, latent projection) carry the same kind of shortcut, so with every
  learned branch zeroed the network maps a constant video to itself exactly.
* **Reference guidance** (Reducio-VAE style cross-attention, extended to a variable number of
  references): a 2-D encoder turns K >= 0 reference images into multi-scale feature maps; chosen
  encoder and decoder levels cross-attend, frame by frame, to the K x h x w reference tokens plus
  one learned null token (so K = 0 and fully masked samples are well defined). Appearance can
  then come from the references and the latent is free to carry dynamics.
* **Local reference attention and the reference copy head** (ours, for static cameras): at the highest
  resolution, each position attends to a small window of the reference around the same place, and the
  decoder's output blends in the reference's own pixels through a learned gate (docs/vae.md, rows s-w).
* Per-position RMS normalisation over channels (as Wan), so no normalisation mixes time.
* A diagonal Gaussian posterior; per-channel latent normalisation buffers (``latent_mean``,
  ``latent_std``) that the training stage fills from data and saves in the checkpoint.

API (all video tensors in [-1, 1]; ``references`` may be ``None`` or ``[B, 0, 3, H, W]``)::

    vae = ReferenceGuidedVAE(VAEConfig.from_preset("tiny"))
    z = vae.encode(video, references)          # [B,3,1+4k,H,W], [B,K,3,H,W] -> [B,z,1+k,H/s,W/s], normalised
    x = vae.decode(z, references)              # -> [B,3,1+4k,H,W]
    mean, logvar = vae.encode_posterior(video, references)   # raw (un-normalised) posterior

    cache = vae.new_encode_cache(references)   # reference features are computed once, here
    z0 = vae.encode_chunk(video[:, :, :1], cache)            # first chunk: 1 + 4m frames
    z1 = vae.encode_chunk(video[:, :, 1:5], cache)           # then 4m frames per call

    cache = vae.new_decode_cache(references)
    frames0 = vae.decode_chunk(z[:, :, :1], cache)           # 1 frame from the first latent frame
    frames1 = vae.decode_chunk(z[:, :, 1:2], cache)          # then 4 frames per latent frame

Presets (table at the bottom): ``tiny`` is f8 t4 c16 (3 * 4 * 8^2 / 16 = 48x; 64x64 video ->
8x8 latents, 2.8M parameters) for CPU tests and the synthetic default; ``tiny-f4`` is f4 t4 c4
(also 48x; 64x64 -> 16x16 latents, 2.7M), which keeps the synthetic world's few-pixel mouths;
``ref-dc-f32t4c16`` is the paper-scale deep-compression VAE, f32 t4 c16 (3 * 4 * 32^2 / 16 = 768x,
the ratio paper 002's digests report; 512x512 video -> 16x16 latents per 4 frames, ~280M parameters).

``reference_mask`` ([B, K] bool, True = use) masks references per sample for variable K in one
batch. A cache belongs to one stream: use one cache per thread (StreamingAvatar decodes on its
own thread with its own cache); the module itself holds no streaming state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "VAE_PRESETS",
    "DISCRIMINATOR_PRESETS",
    "DiscriminatorConfig",
    "PatchDiscriminator3D",
    "ReferenceFeatures",
    "ReferenceGuidedVAE",
    "VAECache",
    "VAEConfig",
    "VAEOutput",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """Architecture of a :class:`ReferenceGuidedVAE`.

    Level ``i`` of the encoder (and of the decoder, in reverse) works at spatial factor
    ``patch_size * 2**i`` with ``widths[i]`` channels; between levels ``i`` and ``i + 1`` a
    residual down block halves space and, where ``temporal_down[i]``, time.
    """

    in_channels: int = 3
    latent_channels: int = 16
    patch_size: int = 2  # non-parametric space-to-channel stem (Wan2.2 patchify)
    widths: tuple[int, ...] = (24, 48, 96)
    temporal_down: tuple[bool, ...] = (True, True)  # one per down block: len(widths) - 1
    encoder_blocks: tuple[int, ...] = (0, 1, 1)  # residual blocks per level (DC-AE: none at the top level)
    decoder_blocks: tuple[int, ...] = (1, 1, 1)
    reference_blocks: tuple[int, ...] = (1, 1, 1)  # 2-D reference encoder blocks per level
    attn_levels: tuple[int, ...] = (1, 2)  # levels whose encoder and decoder attend to references
    # Levels whose encoder and decoder attend to a local window of the references at the same place (cheap enough
    # for the highest resolution, where the fine detail of static regions lives): local_window x local_window cells.
    local_attn_levels: tuple[int, ...] = ()
    local_window: int = 5
    # Decoder output: blend in reference pixels copied through a local window, with a learned per-pixel gate
    # (ReferenceCopyHead). Needs the level-0 reference features, so level 0 joins the reference levels.
    reference_copy: bool = False
    # The copy gate also sees the motion of the decoder's own drawing (|estimate_t - estimate_{t-1}|, a causal
    # temporal difference, learned from that initialisation): where the drawing moves (lips, a gesturing arm) the
    # reference's frame-0 pixels are the wrong answer (docs/vae.md, row aa).
    copy_gate_motion: bool = False
    # The copy head copies from the reference warped by a flow the decoder predicts (a linear map of the level-0
    # features, in pixels, bilinearly upsampled to every pixel, zero at the start): a listener's sway of a fraction
    # of a pixel is followed instead of snapped back to where the reference shows the body (docs/vae.md, row ag).
    copy_warp: bool = False
    # The copy head's window logits (its query-key scores and offset prior) times this: above 1 the copy comes from
    # fewer reference cells, sharper (a softmax over the 5x5 window blurs the reference: docs/vae.md, row am).
    copy_logit_scale: float = 1.0
    # The copy gate's logits times this: above 1 the gate is nearer 0 or 1 (it passes more of the copy where it
    # leans to the copy, and less where it leans to the drawing). With copy_logit_scale, a decode-time sharpness knob
    # for a VAE trained at 1 (VAEStage.export_architecture; the trade-off in docs/vae.md, "Sharper at decode").
    copy_gate_scale: float = 1.0
    # The copy gate rounded to 0 or 1 in the forward pass, its sigmoid's gradient in the backward (straight-through,
    # Bengio et al. 2013): every output value is either the copy or the decoder's drawing, never a blend of the two
    # (a blending gate mixes the drawing's noise into a sharp copy: docs/vae.md, rows am-ao).
    copy_gate_hard: bool = False
    head_dim: int = 24
    temporal_kernel: int = 3
    # DC-AE / paper 002 residual auto-encoding: the non-parametric space/time-to-channel shortcuts beside every
    # down/up block, the stem and the latent projection. False keeps only the learned branches (the ablation of
    # docs/vae.md); the channel-ratio rules below still apply so that both variants share one layout.
    residual_shortcuts: bool = True
    norm_eps: float = 1e-6
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        for name in (
            "widths",
            "temporal_down",
            "encoder_blocks",
            "decoder_blocks",
            "reference_blocks",
            "attn_levels",
            "local_attn_levels",
        ):
            setattr(self, name, tuple(getattr(self, name)))  # YAML/JSON give lists
        n = len(self.widths)
        if n < 1:
            raise ValueError("VAEConfig.widths: needs at least one level")
        if self.in_channels < 1 or self.latent_channels < 1:
            raise ValueError("VAEConfig.in_channels / latent_channels must be >= 1")
        if self.patch_size < 1:
            raise ValueError(f"VAEConfig.patch_size must be >= 1, got {self.patch_size}")
        if len(self.temporal_down) != n - 1:
            raise ValueError(
                f"VAEConfig.temporal_down needs len(widths) - 1 = {n - 1} entries, got {self.temporal_down}"
            )
        for name in ("encoder_blocks", "decoder_blocks", "reference_blocks"):
            value = getattr(self, name)
            if len(value) != n or any(b < 0 for b in value):
                raise ValueError(f"VAEConfig.{name} needs {n} non-negative entries (one per level), got {value}")
        if any(not 0 <= lvl < n for lvl in self.attn_levels) or len(set(self.attn_levels)) != len(self.attn_levels):
            raise ValueError(f"VAEConfig.attn_levels must be distinct levels in [0, {n}), got {self.attn_levels}")
        if any(not 0 <= lvl < n for lvl in self.local_attn_levels) or len(set(self.local_attn_levels)) != len(
            self.local_attn_levels
        ):
            raise ValueError(
                f"VAEConfig.local_attn_levels must be distinct levels in [0, {n}), got {self.local_attn_levels}"
            )
        if self.local_window < 1 or self.local_window % 2 == 0:
            raise ValueError(f"VAEConfig.local_window must be odd and >= 1, got {self.local_window}")
        for name in ("copy_gate_motion", "copy_warp", "copy_gate_hard"):
            if getattr(self, name) and not self.reference_copy:
                raise ValueError(f"VAEConfig.{name} refines the reference copy head: set reference_copy: true too")
        for name in ("copy_logit_scale", "copy_gate_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"VAEConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.temporal_kernel < 1:
            raise ValueError(f"VAEConfig.temporal_kernel must be >= 1, got {self.temporal_kernel}")
        for lvl in (*self.attn_levels, *self.local_attn_levels):
            w = self.widths[lvl]
            if w % self.head_dim:
                raise ValueError(
                    f"VAEConfig.widths[{lvl}] = {w} must be divisible by head_dim = {self.head_dim} "
                    f"because level {lvl} is in attn_levels or local_attn_levels"
                )
        # Residual shortcuts are non-parametric, so every channel change must be an integer ratio.
        stem = self.in_channels * self.patch_size**2
        _check_ratio("patchify -> widths[0] (conv in)", stem, self.widths[0], grow=True)
        _check_ratio("widths[0] -> patchify (conv out)", self.widths[0], stem, grow=False)
        _check_ratio("widths[-1] -> latent_channels", self.widths[-1], self.latent_channels, grow=False)
        _check_ratio("latent_channels -> widths[-1]", self.latent_channels, self.widths[-1], grow=True)
        for i, t_down in enumerate(self.temporal_down):
            factor = (2 if t_down else 1) * 4
            c_in, c_out = self.widths[i], self.widths[i + 1]
            _check_ratio(f"down block {i} (widths[{i}] x {factor} -> widths[{i + 1}])", c_in * factor, c_out, False)
            _check_ratio(f"up block {i} (widths[{i + 1}] -> widths[{i}] x {factor})", c_out, c_in * factor, True)

    # Derived sizes --------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.widths)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (self.num_levels - 1)

    @property
    def reference_levels(self) -> tuple[int, ...]:
        """Levels whose reference feature maps some attention block reads (global or local)."""
        return tuple(sorted({*self.attn_levels, *self.local_attn_levels, *((0,) if self.reference_copy else ())}))

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_down)

    @property
    def compression_ratio(self) -> float:
        """Input values per latent value: ``C * r_t * r_s^2 / z`` (paper 002 reports 768x)."""
        return self.in_channels * self.temporal_factor * self.spatial_factor**2 / self.latent_channels

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(z, 1 + k, h, w)`` for a clip of ``frames = 1 + r_t k`` frames."""
        r_t, r_s = self.temporal_factor, self.spatial_factor
        return self.latent_channels, 1 + (frames - 1) // r_t, height // r_s, width // r_s

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VAEConfig:
        if name not in VAE_PRESETS:
            raise KeyError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}")
        return cls(**{**asdict(VAE_PRESETS[name]), **overrides})


def _check_ratio(what: str, c_in: int, c_out: int, grow: bool) -> None:
    ok = c_out % c_in == 0 if grow else c_in % c_out == 0
    if not ok:
        verb = "a multiple of" if grow else "a divisor of"
        raise ValueError(
            f"VAEConfig: {what}: {c_out} channels must be {verb} {c_in} for the non-parametric residual "
            "shortcut (channel duplication / averaging); adjust widths, latent_channels or patch_size"
        )


@dataclass
class DiscriminatorConfig:
    """3-D PatchGAN (Open-Sora ``N_Layer_discriminator_3D`` layout): strided conv3d + GroupNorm."""

    in_channels: int = 3
    channels: int = 32
    layers: int = 3  # stride-2 stages; the receptive field grows with each
    max_channels: int = 256

    def __post_init__(self) -> None:
        if self.channels < 1 or self.layers < 1 or self.max_channels < self.channels:
            raise ValueError(
                f"DiscriminatorConfig: need channels >= 1, layers >= 1, max_channels >= channels; got {self}"
            )

    @classmethod
    def from_preset(cls, name: str) -> DiscriminatorConfig:
        if name not in DISCRIMINATOR_PRESETS:
            raise KeyError(f"unknown discriminator preset {name!r}; choose one of {sorted(DISCRIMINATOR_PRESETS)}")
        return cls(**asdict(DISCRIMINATOR_PRESETS[name]))


# --------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceFeatures:
    """Reference feature maps per attention level, computed once per reference set.

    ``maps[level]``: ``[B, K, C_level, h_level, w_level]``; ``mask``: ``[B, K]`` bool (True = use).
    """

    maps: dict[int, Tensor]
    mask: Tensor
    pixels: Tensor | None = None  # [B, K, 3 p^2, H/p, W/p]: the patchified images, for the reference copy head


@dataclass
class VAECache:
    """Feature cache of one stream (one encoder or decoder pass over consecutive chunks).

    ``convs`` maps each causal conv (by ``id``) to the last ``k_t - 1`` frames of its input;
    ``first`` is True until the first chunk went through (it selects first-chunk padding).
    """

    kind: str  # "encode" or "decode"
    references: ReferenceFeatures | None
    first: bool = True
    convs: dict[int, Tensor] = field(default_factory=dict)
    frames_in: int = 0
    frames_out: int = 0


@dataclass
class VAEOutput:
    recon: Tensor  # [B, 3, 1 + r_t k, H, W]
    mean: Tensor  # [B, z, 1 + k, h, w], raw (un-normalised) posterior
    logvar: Tensor
    latents: Tensor  # the raw sample that was decoded
    estimate: Tensor | None = None  # the decoder's own drawing before the reference copy head (None without one)
    copy: Tensor | None = None  # what the copy head copies from the references (None without one or without refs)
    copy_gate: Tensor | None = None  # the head's gate per pixel and channel, 1 = the copy (None as ``copy``)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at every (t, h, w) position: local, hence causal and chunk-exact."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, ...]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.weight.view(shape)


class CausalConv3d(nn.Conv3d):
    """3-D conv with ``k_t - 1`` past-only temporal padding and a per-stream feature cache.

    Spatial padding is zero ``k_s // 2``. One shot equals chunked use because the cache holds
    exactly the frames that one-shot padding/concatenation would have placed before the chunk.
    """

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int]) -> None:
        k_t, k_h, k_w = kernel
        super().__init__(c_in, c_out, kernel, padding=(0, k_h // 2, k_w // 2))
        self.pad_t = k_t - 1

    def forward(self, x: Tensor, cache: VAECache | None = None) -> Tensor:  # [B, C, T, H, W]
        if self.pad_t:
            past = cache.convs.get(id(self)) if cache is not None else None
            if past is None:
                past = x.new_zeros(x.shape[0], x.shape[1], self.pad_t, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache.convs[id(self)] = x[:, :, -self.pad_t :]
        return super().forward(x)


def _channel_mean(x: Tensor, c_out: int) -> Tensor:
    """DC-AE channel averaging: mean over groups of ``C / c_out`` consecutive channels."""
    g = x.shape[1] // c_out
    return x if g == 1 else x.unflatten(1, (c_out, g)).mean(dim=2)


def _shortcut(fn, x: Tensor, c_out: int, cfg: VAEConfig) -> Tensor | float:
    """A stem/head shortcut (``fn`` is :func:`_channel_mean` or :func:`_channel_repeat`), or 0 when they are off."""
    return fn(x, c_out) if cfg.residual_shortcuts else 0.0


def _channel_repeat(x: Tensor, c_out: int) -> Tensor:
    """DC-AE channel duplication: every channel repeated ``c_out / C`` times, consecutively."""
    r = c_out // x.shape[1]
    return x if r == 1 else x.repeat_interleave(r, dim=1)


def _to_channels(x: Tensor, r_t: int, r_s: int, first: bool) -> Tensor:
    """Space/time-to-channel ``[B,C,T,H,W] -> [B, C r_t r_s^2, T/r_t, H/r_s, W/r_s]``, causal in time.

    On the first chunk the front is padded with ``r_t - 1`` copies of frame 0, so the first
    output frame sees frame 0 only (and a constant clip stays constant through the averaging).
    """
    if r_t > 1:
        if first:
            x = torch.cat([x[:, :, :1].expand(-1, -1, r_t - 1, -1, -1), x], dim=2)
        if x.shape[2] % r_t:
            raise ValueError(
                f"causal VAE: a chunk reached a temporal down block with {x.shape[2]} frames (after first-chunk "
                f"padding), not a multiple of {r_t}; feed 1 + 4m frames first, then 4m frames per chunk"
            )
    return rearrange(x, "b c (t rt) (h rh) (w rw) -> b (c rt rh rw) t h w", rt=r_t, rh=r_s, rw=r_s)


def _to_space(x: Tensor, r_t: int, r_s: int, first: bool) -> Tensor:
    """Inverse of :func:`_to_channels`; on the first chunk drop the first ``r_t - 1`` frames."""
    x = rearrange(x, "b (c rt rh rw) t h w -> b c (t rt) (h rh) (w rw)", rt=r_t, rh=r_s, rw=r_s)
    return x[:, :, r_t - 1 :] if first and r_t > 1 else x


class ResBlock3d(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convs (Wan ``ResidualBlock`` without dropout)."""

    def __init__(self, channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        k = (cfg.temporal_kernel, 3, 3)
        self.norm1 = ChannelRMSNorm(channels, cfg.norm_eps)
        self.conv1 = CausalConv3d(channels, channels, k)
        self.norm2 = ChannelRMSNorm(channels, cfg.norm_eps)
        self.conv2 = CausalConv3d(channels, channels, k)

    def forward(self, x: Tensor, cache: VAECache | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        return x + self.conv2(F.silu(self.norm2(h)), cache)


class DownBlock3d(nn.Module):
    """Residual down block: ``conv(to_channels(x)) + mean_g(to_channels(x))`` (DC-AE + Wan2.2 AvgDown3D)."""

    def __init__(self, c_in: int, c_out: int, r_t: int, r_s: int, shortcut: bool = True) -> None:
        super().__init__()
        self.r_t, self.r_s, self.c_out, self.shortcut = r_t, r_s, c_out, shortcut
        # The learned branch sees the whole r_t x r_s x r_s neighbourhood at the low resolution.
        self.conv = nn.Conv3d(c_in * r_t * r_s * r_s, c_out, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: Tensor, first: bool) -> Tensor:
        x = _to_channels(x, self.r_t, self.r_s, first)
        return self.conv(x) + _channel_mean(x, self.c_out) if self.shortcut else self.conv(x)


class UpBlock3d(nn.Module):
    """Residual up block: ``to_space(conv(x)) + to_space(repeat(x))`` (DC-AE + Wan2.2 DupUp3D)."""

    def __init__(self, c_in: int, c_out: int, r_t: int, r_s: int, shortcut: bool = True) -> None:
        super().__init__()
        self.r_t, self.r_s, self.shortcut = r_t, r_s, shortcut
        self.c_wide = c_out * r_t * r_s * r_s
        self.conv = nn.Conv3d(c_in, self.c_wide, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: Tensor, first: bool) -> Tensor:
        y = self.conv(x) + _channel_repeat(x, self.c_wide) if self.shortcut else self.conv(x)
        return _to_space(y, self.r_t, self.r_s, first)


POS_DIM = 16  # sin-cos position channels per attention head (4 frequencies x sin/cos x 2 axes)
_SINCOS_CACHE: dict[tuple, Tensor] = {}


def _sincos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[h*w, dim]`` sin-cos positions of normalised pixel centres, so references and video
    feature maps of different sizes still line up (cached: they depend on sizes only)."""
    key = (h, w, dim, str(device), dtype)
    if device.type == "meta":
        return torch.empty(h * w, dim, device=device, dtype=dtype)
    if key not in _SINCOS_CACHE:
        _SINCOS_CACHE[key] = _sincos_2d_uncached(h, w, dim, device, dtype)
    return _SINCOS_CACHE[key]


def _sincos_2d_uncached(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    n = dim // 4
    # Periods from 2 frames down to 1/8 of the frame: 2 pixels at 16x16, finer would alias.
    freqs = math.pi * torch.pow(2.0, torch.linspace(0.0, 4.0, n, device=device))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ay, ax = gy.reshape(-1, 1) * freqs, gx.reshape(-1, 1) * freqs
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1).to(dtype)


class ReferenceCrossAttention(nn.Module):
    """Per-frame cross-attention from video features to reference tokens (+ one learned null token).

    Queries are the ``h x w`` positions of every frame; keys/values are the ``K x h_r x w_r``
    reference tokens of the same level. Each frame attends independently, so the block is causal.
    The null key/value keeps the softmax defined when a sample has no (unmasked) reference.

    Every head's query and key carry ``POS_DIM`` extra sin-cos channels of the normalised
    position, scaled by a learned per-head factor: their dot product adds a relative-position
    logit that peaks where query and key sit at the same place. From initialisation a query
    therefore looks at the same spot in every reference (talking heads barely move), and the
    content projections learn where to look elsewhere. The output projection starts at zero,
    so the block starts as the identity.
    """

    def __init__(self, dim: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.heads = dim // cfg.head_dim
        self.norm = ChannelRMSNorm(dim, cfg.norm_eps)
        self.norm_ref = ChannelRMSNorm(dim, cfg.norm_eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.null_kv = nn.Parameter(torch.zeros(2, dim))
        # 3^2 * 8 (the position dot product at equal places) / sqrt(head_dim + 16): a peaked prior.
        self.pos_scale = nn.Parameter(torch.full((self.heads,), 3.0))
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: Tensor, refs: Tensor | None, mask: Tensor | None) -> Tensor:
        # x: [B, C, T, h, w]; refs: [B, K, C, h_r, w_r] or None; mask: [B, K] bool
        b, c, t, h, w = x.shape
        scale = self.pos_scale.view(1, -1, 1, 1).to(x.dtype)
        q = self.to_q(rearrange(self.norm(x), "b c t h w -> b (t h w) c"))
        q = rearrange(q, "b n (nh d) -> b nh n d", nh=self.heads)
        q_pos = _sincos_2d(h, w, POS_DIM, x.device, x.dtype).repeat(t, 1)  # [T h w, P]
        q = torch.cat([q, (scale * q_pos).expand(b, -1, -1, -1)], dim=-1)
        null_k = self.null_kv[0].expand(b, 1, c)
        null_v = self.null_kv[1].expand(b, 1, c)
        if refs is not None and refs.shape[1] > 0:
            k_n, hr, wr = refs.shape[1], refs.shape[3], refs.shape[4]
            r = rearrange(self.norm_ref(refs.flatten(0, 1)), "(b k) c h w -> b (k h w) c", b=b)
            k = torch.cat([null_k, self.to_k(r)], dim=1)
            v = torch.cat([null_v, self.to_v(r)], dim=1)
            k_pos = _sincos_2d(hr, wr, POS_DIM, x.device, x.dtype).repeat(k_n, 1)  # [K h_r w_r, P]
            k_pos = torch.cat([k_pos.new_zeros(1, POS_DIM), k_pos])  # the null token has no place
            keep = torch.cat([mask.new_ones(b, 1), mask.repeat_interleave(hr * wr, dim=1)], dim=1)
            attn_mask = keep[:, None, None, :]  # [B, 1, 1, N]
        else:
            k, v, attn_mask = null_k, null_v, None
            k_pos = x.new_zeros(1, POS_DIM)
        k, v = (rearrange(a, "b n (nh d) -> b nh n d", nh=self.heads) for a in (k, v))
        k = torch.cat([k, (scale * k_pos).expand(b, -1, -1, -1)], dim=-1)
        # Values are zero-padded to the key width d + P and the padding sliced off again: the same numbers, but equal
        # head widths let SDPA use its fused kernel instead of materialising the attention matrix (~1.5x on a CPU).
        d = v.shape[-1]
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, POS_DIM)), attn_mask=attn_mask)[..., :d]
        out = self.to_out(rearrange(out, "b nh n d -> b n (nh d)"))
        return x + rearrange(out, "b (t h w) c -> b c t h w", t=t, h=h, w=w)


def _window_prior(window: int, heads: int) -> Tensor:
    """``[heads, w^2]`` logit bias ``-3 (dy^2 + dx^2)`` per window offset: attention starts at the same place (~60 %
    on the centre cell; ``-(dy^2 + dx^2)`` left it at ~35 %, a blur of the reference, 0.3 dB worse, docs/vae.md)."""
    r = torch.arange(window, dtype=torch.float32) - window // 2
    return (-3.0 * (r[:, None] ** 2 + r[None, :] ** 2)).flatten().repeat(heads, 1)


def _window_logits(
    q: Tensor, keys: Tensor, offset_bias: Tensor, mask: Tensor | None, window: int
) -> tuple[Tensor, Tensor]:
    """Logits of every query against the ``window x window`` reference cells around its own place.

    q ``[B, T, h, w, nh, d]`` (already scaled); keys ``[B, K, nh d, h, w]``. Returns logits ``[B, T, h, w, nh, K w^2]``
    (cells outside the frame and masked references at -inf) and ``keep`` ``[B, h, w, K w^2]``.
    """
    b, _, h, w, nh, _ = q.shape
    k_n, ww, pad = keys.shape[1], window**2, window // 2
    keys = _windows(keys, window, nh)
    logits = torch.einsum("bthwnd,bhwnjd->bthwnj", q, keys) + offset_bias.repeat(1, k_n).to(q.dtype)
    inside = F.unfold(q.new_ones(1, 1, h, w), window, padding=pad) > 0  # [1, w^2, h w]: False on the zero padding
    keep = rearrange(inside, "one j (h w) -> one h w j", h=h).repeat(1, 1, 1, k_n)  # [1, h, w, K w^2]
    if mask is not None:
        keep = keep & mask.repeat_interleave(ww, dim=1)[:, None, None, :]
    keep = keep.expand(b, -1, -1, -1)
    return logits.masked_fill(~keep[:, None, :, :, None, :], float("-inf")), keep


def _windows(values: Tensor, window: int, heads: int) -> Tensor:
    """Keys or values ``[B, K, nh d, h, w]`` -> every position's window ``[B, h, w, nh, K w^2, d]``."""
    b, h = values.shape[0], values.shape[3]
    unfolded = F.unfold(values.flatten(0, 1), window, padding=window // 2)
    return rearrange(unfolded, "(b k) (nh d j) (h w) -> b h w nh (k j) d", b=b, nh=heads, j=window**2, h=h)


class LocalReferenceAttention(nn.Module):
    """Per-frame cross-attention from each video position to a ``w x w`` window of the references around the
    same position (+ one learned null token).

    Global reference attention over every reference token costs ``(h w)^2`` per frame, too much at the highest
    resolution, where the fine detail of the static regions (background, clothes, the outline of the head) lives.
    A talking person's camera does not move, so that detail sits at the same place in the reference: a window of
    a few cells lets the decoder copy it and leaves the latent to the motion. Each window offset has a learned
    per-head logit bias (:func:`_window_prior`). Cells outside the frame and masked references are excluded.
    The output projection starts at zero (the identity).
    """

    def __init__(self, dim: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.heads, self.window = dim // cfg.head_dim, cfg.local_window
        self.norm = ChannelRMSNorm(dim, cfg.norm_eps)
        self.norm_ref = ChannelRMSNorm(dim, cfg.norm_eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Conv2d(dim, 2 * dim, 1)
        self.null_kv = nn.Parameter(torch.zeros(2, dim))
        self.offset_bias = nn.Parameter(_window_prior(self.window, self.heads))  # [heads, w^2]
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: Tensor, refs: Tensor | None, mask: Tensor | None) -> Tensor:
        # x: [B, C, T, h, w]; refs: [B, K, C, h, w] (the same grid) or None; mask: [B, K] bool
        b, c, t, h, w = x.shape
        nh, d = self.heads, c // self.heads
        q = rearrange(
            self.to_q(rearrange(self.norm(x), "b c t h w -> b t h w c")), "b t h w (nh d) -> b t h w nh d", nh=nh
        )
        null_k, null_v = (rearrange(a, "(nh d) -> nh d", nh=nh) for a in self.null_kv)
        if refs is None or refs.shape[1] == 0:  # only the null token: every position gets its value
            out = null_v.expand(b, t, h, w, nh, d)
        else:
            if refs.shape[-2:] != (h, w):
                raise ValueError(
                    f"LocalReferenceAttention: reference grid {tuple(refs.shape[-2:])} != video grid {(h, w)}"
                )
            q = q * d**-0.5
            keys, values = self.to_kv(self.norm_ref(refs.flatten(0, 1))).unflatten(0, (b, -1)).chunk(2, dim=2)
            logits, _ = _window_logits(q, keys, self.offset_bias, mask, self.window)
            logits_null = torch.einsum("bthwnd,nd->bthwn", q, null_k)[..., None]
            attn = torch.cat([logits_null, logits], dim=-1).softmax(dim=-1)
            windows = _windows(values, self.window, nh)
            out = attn[..., :1] * null_v + torch.einsum("bthwnj,bhwnjd->bthwnd", attn[..., 1:], windows)
        out = self.to_out(rearrange(out, "b t h w nh d -> b t h w (nh d)"))
        return x + rearrange(out, "b t h w c -> b c t h w")


class ReferenceCopyHead(nn.Module):
    """Blend reference pixels into the decoder's output where a learned gate says the reference shows them.

    Feature attention (above) can only add to the decoder's own blurred estimate; to draw a static edge exactly
    the decoder would have to cancel that estimate first. This head instead attends, from the level-0 decoder
    features, over a window of reference cells (keys: level-0 reference features; values: the reference's own
    patchified pixels) and mixes: ``out = cells + g (copy - cells)``, with ``g = sigmoid(linear([features,
    copy - cells, |copy - cells|]))`` per output value. Where the reference shows the same thing (background,
    clothes) g can go to 1 and the pixels are the reference's; where the person moves, g should go to 0 and the
    latent draws (on this data it does not fully: a raised arm is drawn faint, docs/vae.md). No null token: a
    sample without (unmasked) references keeps ``cells`` unchanged. The gate starts at sigmoid(-2) = 0.12.
    With ``copy_gate_motion`` the gate also sees ``|cells_t - cells_{t-1}|``, the motion of the decoder's own drawing
    (a causal temporal conv initialised to that difference; its cache carries the previous frame across chunks).
    With ``copy_warp`` the copied pixels come from the reference warped, per frame, by a flow read off the features
    (:meth:`warped_pixels`): whole cells of the window move the copy by ``patch_size`` pixels, the flow by any
    fraction of one, so a body that sways half a pixel is copied where it is. Per frame, so no cache is involved.
    """

    def __init__(self, dim: int, pixel_channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.window, self.patch_size = cfg.local_window, cfg.patch_size
        self.logit_scale, self.gate_scale = cfg.copy_logit_scale, cfg.copy_gate_scale
        self.hard_gate = cfg.copy_gate_hard
        self.norm = ChannelRMSNorm(dim, cfg.norm_eps)
        self.norm_ref = ChannelRMSNorm(dim, cfg.norm_eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Conv2d(dim, dim, 1)
        self.offset_bias = nn.Parameter(_window_prior(self.window, 1))
        self.to_flow = None
        if cfg.copy_warp:  # (dx, dy) in pixels per level-0 cell; zero: the plain copy
            self.to_flow = nn.Linear(dim, 2)
            nn.init.zeros_(self.to_flow.weight)
            nn.init.zeros_(self.to_flow.bias)
        # The gate sees the features and how far the copy is from the decoder's own estimate (signed and absolute):
        # a gesturing arm that the reference does not show is a large difference, and there the copy must not win.
        self.motion = None
        if cfg.copy_gate_motion:  # estimate_t - estimate_{t-1}, causal and cached like every temporal conv
            self.motion = CausalConv3d(pixel_channels, pixel_channels, (2, 1, 1))
            with torch.no_grad():
                self.motion.weight.zero_()
                self.motion.bias.zero_()
                eye = torch.eye(pixel_channels)
                self.motion.weight[:, :, 0, 0, 0] = -eye
                self.motion.weight[:, :, 1, 0, 0] = eye
        extra = pixel_channels if self.motion is not None else 0
        self.to_gate = nn.Linear(dim + 2 * pixel_channels + extra, pixel_channels)
        nn.init.zeros_(self.to_gate.weight)
        nn.init.constant_(self.to_gate.bias, -2.0)

    def forward(
        self, x: Tensor, cells: Tensor, refs: ReferenceFeatures | None, cache: VAECache | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(blended cells, copy, gate)``, all ``[B, P, T, h, w]``; copy and gate are None without references."""
        # x: [B, C, T, h, w] level-0 features; cells: [B, P, T, h, w] the decoder's patchified output
        # the motion conv runs on every chunk, copied or not, so that its cache always holds the previous frame
        motion = None if self.motion is None else self.motion(cells, cache)
        if refs is None or refs.pixels is None or refs.pixels.shape[1] == 0:
            return cells, None, None
        b, c, t, h, w = x.shape
        feats = rearrange(self.norm(x), "b c t h w -> b t h w c")
        q = self.to_q(feats).unsqueeze(-2) * c**-0.5  # [B, T, h, w, 1, C]
        keys = self.to_k(self.norm_ref(refs.maps[0].flatten(0, 1))).unflatten(0, (b, -1))
        logits, keep = _window_logits(q, keys, self.offset_bias, refs.mask, self.window)
        usable = keep.any(dim=-1)[:, None, :, :, None, None]  # [B, 1, h, w, 1, 1]: some cell to copy from
        attn = torch.where(usable, logits * self.logit_scale, torch.zeros_like(logits)).softmax(dim=-1)
        if self.to_flow is None:
            copy = torch.einsum("bthwnj,bhwnjd->bthwd", attn, _windows(refs.pixels, self.window, 1))
        else:  # every frame copies from its own warp of the references
            pixels = self.warped_pixels(refs.pixels, self.to_flow(feats))  # [B, T, K, P, h, w]
            windows = _windows(pixels.flatten(0, 1), self.window, 1).unflatten(0, (b, t))
            copy = torch.einsum("bthwnj,bthwnjd->bthwd", attn, windows)
        blend = rearrange(cells, "b p t h w -> b t h w p")
        diff = copy - blend
        cues = [feats, diff, diff.abs()]
        if motion is not None:
            cues.append(rearrange(motion, "b p t h w -> b t h w p").abs())
        gate = torch.sigmoid(self.to_gate(torch.cat(cues, dim=-1)) * self.gate_scale)
        if self.hard_gate:  # the value in the forward pass is the rounded gate, the gradient the sigmoid's
            gate = gate + ((gate > 0.5).to(gate.dtype) - gate).detach()
        gate = gate * usable[..., 0]
        blend = blend + gate * diff
        blend, copy, gate = (rearrange(a, "b t h w p -> b p t h w") for a in (blend, copy, gate))
        return blend, copy, gate

    def warped_pixels(self, pixels: Tensor, flow: Tensor) -> Tensor:
        """Patchified references ``[B, K, P, h, w]`` warped by ``flow`` ``[B, T, h, w, 2]`` (``(dx, dy)`` in pixels
        per cell, bilinearly upsampled to every pixel): ``[B, T, K, P, h, w]`` with ``out(x) = ref(x + flow(x))``,
        bilinear between pixels and the border repeated outside the frame. Zero flow returns the references exactly
        (the sampling points are the pixel centres)."""
        b, k, _, h, w = pixels.shape
        t, p = flow.shape[1], self.patch_size
        images = rearrange(pixels, "b k (c p q) h w -> b k c (h p) (w q)", p=p, q=p)
        flow = F.interpolate(
            rearrange(flow.float(), "b t h w two -> (b t) two h w"),
            scale_factor=p,
            mode="bilinear",
            align_corners=False,
        )  # [B T, 2, H, W]
        size_h, size_w = h * p, w * p
        ys = torch.arange(size_h, device=flow.device, dtype=flow.dtype)
        xs = torch.arange(size_w, device=flow.device, dtype=flow.dtype)
        # normalised sampling points (align_corners=False: pixel i's centre is (2 i + 1) / size - 1)
        gx = (2 * (xs[None, None, :] + flow[:, 0]) + 1) / size_w - 1
        gy = (2 * (ys[None, :, None] + flow[:, 1]) + 1) / size_h - 1
        grid = torch.stack([gx, gy], dim=-1).repeat_interleave(k, dim=0)  # [B T K, H, W, 2]
        sources = images[:, None].expand(b, t, *images.shape[1:]).flatten(0, 2).float()
        warped = F.grid_sample(sources, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return rearrange(warped.to(pixels.dtype), "(b t k) c (h p) (w q) -> b t k (c p q) h w", b=b, t=t, p=p, q=p)


class ResBlock2d(nn.Module):
    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(channels, eps)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = ChannelRMSNorm(channels, eps)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class ReferenceEncoder(nn.Module):
    """2-D encoder over reference images; returns the feature map of every attention level.

    Mirrors the spatial layout of the video encoder (same patchify and level factors), so a
    level-``l`` reference map has the same size and width as the level-``l`` video features.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.top = max(cfg.reference_levels) if cfg.reference_levels else -1
        p = cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.in_channels * p * p, cfg.widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        for lvl in range(self.top + 1):
            blocks = nn.ModuleList(ResBlock2d(cfg.widths[lvl], cfg.norm_eps) for _ in range(cfg.reference_blocks[lvl]))
            self.levels.append(blocks)
            if lvl < self.top:
                self.downs.append(nn.Conv2d(cfg.widths[lvl] * 4, cfg.widths[lvl + 1], 3, padding=1))

    def forward(self, images: Tensor) -> dict[int, Tensor]:  # images: [N, 3, H, W]
        x = self.conv_in(F.pixel_unshuffle(images, self.cfg.patch_size))
        maps = {}
        for lvl, blocks in enumerate(self.levels):
            for block in blocks:
                x = block(x)
            if lvl in self.cfg.reference_levels:
                maps[lvl] = x
            if lvl < self.top:
                x = self.downs[lvl](F.pixel_unshuffle(x, 2))
        return maps


# --------------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, k = cfg.patch_size, (cfg.temporal_kernel, 3, 3)
        self.conv_in = CausalConv3d(cfg.in_channels * p * p, cfg.widths[0], k)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        self.local_attn = nn.ModuleDict()
        self.downs = nn.ModuleList()
        for lvl, width in enumerate(cfg.widths):
            self.blocks.append(nn.ModuleList(ResBlock3d(width, cfg) for _ in range(cfg.encoder_blocks[lvl])))
            if lvl in cfg.local_attn_levels:
                self.local_attn[str(lvl)] = LocalReferenceAttention(width, cfg)
            if lvl in cfg.attn_levels:
                self.attn[str(lvl)] = ReferenceCrossAttention(width, cfg)
            if lvl < cfg.num_levels - 1:
                r_t = 2 if cfg.temporal_down[lvl] else 1
                self.downs.append(DownBlock3d(width, cfg.widths[lvl + 1], r_t, 2, cfg.residual_shortcuts))
        self.norm_out = ChannelRMSNorm(cfg.widths[-1], cfg.norm_eps)
        self.conv_out = CausalConv3d(cfg.widths[-1], 2 * cfg.latent_channels, k)

    def forward(self, video: Tensor, refs: ReferenceFeatures | None, cache: VAECache) -> tuple[Tensor, Tensor]:
        x = rearrange(video, "b c t (h p) (w q) -> b (c p q) t h w", p=self.cfg.patch_size, q=self.cfg.patch_size)
        x = self.conv_in(x, cache) + _shortcut(_channel_repeat, x, self.cfg.widths[0], self.cfg)
        for lvl in range(self.cfg.num_levels):
            for block in self.blocks[lvl]:
                x = block(x, cache)
            if str(lvl) in self.local_attn:  # fine detail first, then the global view
                x = self.local_attn[str(lvl)](x, *_level_refs(refs, lvl))
            if str(lvl) in self.attn:
                x = self.attn[str(lvl)](x, *_level_refs(refs, lvl))
            if lvl < self.cfg.num_levels - 1:
                x = self.downs[lvl](x, cache.first)
        z = self.cfg.latent_channels
        h = self.conv_out(F.silu(self.norm_out(x)), cache)
        mean = h[:, :z] + _shortcut(
            _channel_mean, x, z, self.cfg
        )  # DC-AE "averaging" shortcut on the latent projection
        logvar = h[:, z:].clamp(self.cfg.logvar_min, self.cfg.logvar_max)
        return mean, logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, k = cfg.patch_size, (cfg.temporal_kernel, 3, 3)
        self.conv_in = CausalConv3d(cfg.latent_channels, cfg.widths[-1], k)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        self.local_attn = nn.ModuleDict()
        self.ups = nn.ModuleList()
        # Index i of blocks/ups follows the level index (ups[i] goes from level i + 1 to level i).
        for lvl, width in enumerate(cfg.widths):
            self.blocks.append(nn.ModuleList(ResBlock3d(width, cfg) for _ in range(cfg.decoder_blocks[lvl])))
            if lvl in cfg.attn_levels:
                self.attn[str(lvl)] = ReferenceCrossAttention(width, cfg)
            if lvl in cfg.local_attn_levels:
                self.local_attn[str(lvl)] = LocalReferenceAttention(width, cfg)
            if lvl < cfg.num_levels - 1:
                r_t = 2 if cfg.temporal_down[lvl] else 1
                self.ups.append(UpBlock3d(cfg.widths[lvl + 1], width, r_t, 2, cfg.residual_shortcuts))
        self.norm_out = ChannelRMSNorm(cfg.widths[0], cfg.norm_eps)
        self.conv_out = CausalConv3d(cfg.widths[0], cfg.in_channels * p * p, k)
        self.copy_head = ReferenceCopyHead(cfg.widths[0], cfg.in_channels * p * p, cfg) if cfg.reference_copy else None

    def forward(
        self, z: Tensor, refs: ReferenceFeatures | None, cache: VAECache, with_copy: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor | None]]:
        """Latents -> video; with ``with_copy`` also the copy head's ``estimate`` (the drawing before it), ``copy``
        and ``copy_gate``, as videos (None without a copy head; copy and gate None without references)."""
        x = self.conv_in(z, cache) + _shortcut(_channel_repeat, z, self.cfg.widths[-1], self.cfg)
        for lvl in reversed(range(self.cfg.num_levels)):
            for block in self.blocks[lvl]:
                x = block(x, cache)
            if str(lvl) in self.attn:  # the global view, then the fine detail
                x = self.attn[str(lvl)](x, *_level_refs(refs, lvl))
            if str(lvl) in self.local_attn:
                x = self.local_attn[str(lvl)](x, *_level_refs(refs, lvl))
            if lvl > 0:
                x = self.ups[lvl - 1](x, cache.first)
        stem = self.cfg.in_channels * self.cfg.patch_size**2
        cells = self.conv_out(F.silu(self.norm_out(x)), cache) + _shortcut(_channel_mean, x, stem, self.cfg)
        parts: dict[str, Tensor | None] = {"estimate": None, "copy": None, "copy_gate": None}
        if self.copy_head is not None:
            parts["estimate"] = cells
            cells, parts["copy"], parts["copy_gate"] = self.copy_head(x, cells, refs, cache)
        video = self._unpatchify(cells)
        if not with_copy:
            return video
        return video, {name: None if part is None else self._unpatchify(part) for name, part in parts.items()}

    def _unpatchify(self, cells: Tensor) -> Tensor:
        return rearrange(cells, "b (c p q) t h w -> b c t (h p) (w q)", p=self.cfg.patch_size, q=self.cfg.patch_size)


def _level_refs(refs: ReferenceFeatures | None, lvl: int) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if refs is None else (refs.maps[lvl], refs.mask)


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


class ReferenceGuidedVAE(nn.Module):
    """Causal video VAE guided by K >= 0 reference images; see the module docstring for the API."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.reference_encoder = ReferenceEncoder(config) if config.reference_levels else None
        # Per-channel statistics of the raw posterior mean; filled by the VAE stage from data.
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))

    # Fields that change only how the copy head decodes (no weights): set on a trained VAE, e.g. at export.
    COPY_SCALES = ("copy_logit_scale", "copy_gate_scale")

    @classmethod
    def with_copy_scales(cls, config: VAEConfig, **scales: float) -> VAEConfig:
        """``config`` with other copy-head scales (``copy_logit_scale``, ``copy_gate_scale``); unknown names, values
        <= 0 and a config without a copy head raise."""
        unknown = sorted(set(scales) - set(cls.COPY_SCALES))
        if unknown:
            raise ValueError(f"{unknown} are not copy scales; choose from {list(cls.COPY_SCALES)}")
        if scales and not config.reference_copy:
            raise ValueError("copy scales need the reference copy head (reference_copy: true)")
        return replace(config, **scales)  # __post_init__ checks the values

    def set_copy_scales(self, **scales: float) -> None:
        """Decode with other copy-head sharpness (:meth:`with_copy_scales`): the head and the config (what an
        export records) both change; the weights do not."""
        self.config = self.with_copy_scales(self.config, **scales)
        if self.decoder.copy_head is not None:
            self.decoder.copy_head.logit_scale = self.config.copy_logit_scale
            self.decoder.copy_head.gate_scale = self.config.copy_gate_scale

    # ---------------------------------------------------------------- latent normalisation
    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        z = self.config.latent_channels
        if mean.shape != (z,) or std.shape != (z,) or not bool((std > 0).all()):
            raise ValueError(f"set_latent_stats: need mean and std of shape ({z},) with std > 0")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalize_latents(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def denormalize_latents(self, z: Tensor) -> Tensor:
        return z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)

    # ---------------------------------------------------------------- references
    def encode_references(
        self, references: Tensor | None, reference_mask: Tensor | None = None
    ) -> ReferenceFeatures | None:
        """``[B, K, 3, H, W]`` -> features of every attention level (None when there is nothing to attend)."""
        if references is None or self.reference_encoder is None:
            if reference_mask is not None and reference_mask.shape[1] > 0 and references is None:
                raise ValueError("ReferenceGuidedVAE: reference_mask given without references")
            return None
        if references.ndim != 5 or references.shape[2] != self.config.in_channels:
            raise ValueError(
                f"ReferenceGuidedVAE: references must be [B, K, {self.config.in_channels}, H, W], "
                f"got {tuple(references.shape)}"
            )
        b, k = references.shape[:2]
        r_s = self.config.spatial_factor
        if references.shape[3] % r_s or references.shape[4] % r_s:
            raise ValueError(
                f"ReferenceGuidedVAE: reference size {tuple(references.shape[3:])} must be divisible by the "
                f"spatial factor {r_s}"
            )
        if reference_mask is None:
            reference_mask = torch.ones(b, k, dtype=torch.bool, device=references.device)
        elif reference_mask.shape != (b, k):
            raise ValueError(
                f"ReferenceGuidedVAE: reference_mask must be [B, K] = {(b, k)}, got {tuple(reference_mask.shape)}"
            )
        if k == 0:
            return None
        maps = self.reference_encoder(references.flatten(0, 1))
        maps = {lvl: m.unflatten(0, (b, k)) for lvl, m in maps.items()}
        pixels = None
        if self.config.reference_copy:  # the same channel order as the decoder's output cells
            p = self.config.patch_size
            pixels = rearrange(references, "b k c (h p) (w q) -> b k (c p q) h w", p=p, q=p)
        return ReferenceFeatures(maps=maps, mask=reference_mask.to(torch.bool), pixels=pixels)

    # ---------------------------------------------------------------- checks
    def _check_video(self, video: Tensor, where: str, first: bool) -> None:
        c, r_t, r_s = self.config.in_channels, self.config.temporal_factor, self.config.spatial_factor
        if video.ndim != 5 or video.shape[1] != c:
            raise ValueError(f"ReferenceGuidedVAE.{where}: video must be [B, {c}, T, H, W], got {tuple(video.shape)}")
        t = video.shape[2]
        if first and (t - 1) % r_t:
            raise ValueError(
                f"ReferenceGuidedVAE.{where}: got {t} frames; the causal VAE needs 1 + {r_t}k frames "
                f"(the first frame alone, then {r_t} frames per latent frame)"
            )
        if not first and (t == 0 or t % r_t):
            raise ValueError(
                f"ReferenceGuidedVAE.{where}: after the first chunk every chunk needs a positive multiple of "
                f"{r_t} frames, got {t}"
            )
        if video.shape[3] % r_s or video.shape[4] % r_s:
            raise ValueError(
                f"ReferenceGuidedVAE.{where}: frame size {tuple(video.shape[3:])} must be divisible by {r_s}"
            )

    def _check_latents(self, z: Tensor, where: str) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels or z.shape[2] < 1:
            raise ValueError(
                f"ReferenceGuidedVAE.{where}: latents must be [B, {self.config.latent_channels}, F>=1, h, w], "
                f"got {tuple(z.shape)}"
            )

    # ---------------------------------------------------------------- one shot
    def encode_posterior(
        self, video: Tensor, references: Tensor | None = None, reference_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Raw posterior ``(mean, logvar)``, each ``[B, z, 1 + k, h, w]``."""
        self._check_video(video, "encode", first=True)
        refs = self.encode_references(references, reference_mask)
        return self.encoder(video, refs, VAECache("encode", refs))

    def encode(
        self,
        video: Tensor,
        references: Tensor | None = None,
        reference_mask: Tensor | None = None,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``[B, 3, 1 + 4k, H, W]`` -> normalised latents ``[B, z, 1 + k, H/s, W/s]``.

        The posterior mean, or a posterior sample when ``sample`` is set.
        """
        mean, logvar = self.encode_posterior(video, references, reference_mask)
        return self.normalize_latents(_sample(mean, logvar, generator) if sample else mean)

    def decode(self, latents: Tensor, references: Tensor | None = None, reference_mask: Tensor | None = None) -> Tensor:
        """Normalised latents ``[B, z, 1 + k, h, w]`` -> video ``[B, 3, 1 + 4k, H, W]`` (not clamped)."""
        self._check_latents(latents, "decode")
        refs = self.encode_references(references, reference_mask)
        return self.decoder(self.denormalize_latents(latents), refs, VAECache("decode", refs))

    def forward(
        self,
        video: Tensor,
        references: Tensor | None = None,
        reference_mask: Tensor | None = None,
        sample: bool = True,
    ) -> VAEOutput:
        """Training pass on raw latents: encode, sample (reparameterised), decode."""
        self._check_video(video, "forward", first=True)
        refs = self.encode_references(references, reference_mask)
        mean, logvar = self.encoder(video, refs, VAECache("encode", refs))
        z = _sample(mean, logvar) if sample else mean
        recon, parts = self.decoder(z, refs, VAECache("decode", refs), with_copy=True)
        return VAEOutput(recon=recon, mean=mean, logvar=logvar, latents=z, **parts)

    # ---------------------------------------------------------------- streaming
    def new_encode_cache(self, references: Tensor | None = None, reference_mask: Tensor | None = None) -> VAECache:
        return VAECache("encode", self.encode_references(references, reference_mask))

    def new_decode_cache(self, references: Tensor | None = None, reference_mask: Tensor | None = None) -> VAECache:
        return VAECache("decode", self.encode_references(references, reference_mask))

    def encode_chunk(self, frames: Tensor, cache: VAECache) -> Tensor:
        """Next chunk of a stream (first 1 + 4m frames, then 4m) -> its normalised latent frames (posterior mean)."""
        if cache.kind != "encode":
            raise ValueError("ReferenceGuidedVAE.encode_chunk: this cache was made by new_decode_cache")
        self._check_video(frames, "encode_chunk", first=cache.first)
        mean, _ = self.encoder(frames, cache.references, cache)
        cache.first = False
        cache.frames_in += frames.shape[2]
        cache.frames_out += mean.shape[2]
        return self.normalize_latents(mean)

    def decode_chunk(self, latents: Tensor, cache: VAECache) -> Tensor:
        """Next normalised latent frames of a stream -> frames (1 for the very first latent frame, 4 per later one)."""
        if cache.kind != "decode":
            raise ValueError("ReferenceGuidedVAE.decode_chunk: this cache was made by new_encode_cache")
        self._check_latents(latents, "decode_chunk")
        video = self.decoder(self.denormalize_latents(latents), cache.references, cache)
        cache.first = False
        cache.frames_in += latents.shape[2]
        cache.frames_out += video.shape[2]
        return video

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's last conv (LDM's adaptive GAN weight uses its gradients)."""
        return self.decoder.conv_out.weight


def _sample(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


# --------------------------------------------------------------------------------------------
# 3-D PatchGAN discriminator (for the VAE stage's delayed adversarial term)
# --------------------------------------------------------------------------------------------


class PatchDiscriminator3D(nn.Module):
    """Video PatchGAN: ``[B, 3, T, H, W]`` -> patch logits ``[B, 1, T', H', W']``.

    Not causal (it only judges training clips). GroupNorm rather than BatchNorm so that real and
    fake batches, which go through separately, are normalised the same way.
    """

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [nn.Conv3d(config.in_channels, c, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.LeakyReLU(0.2)]
        for i in range(1, config.layers):
            c_next = min(c * 2, config.max_channels)
            stride_t = 2 if i == 1 else 1  # one temporal stride: 17-frame clips keep a few time patches
            layers += [
                nn.Conv3d(c, c_next, (3, 4, 4), (stride_t, 2, 2), (1, 1, 1)),
                nn.GroupNorm(min(32, c_next // 4) or 1, c_next),
                nn.LeakyReLU(0.2),
            ]
            c = c_next
        layers.append(nn.Conv3d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: Tensor) -> Tensor:
        return self.net(video)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

VAE_PRESETS: dict[str, VAEConfig] = {
    # CPU tests and the embedded synthetic default at 64x64: f8 t4 c16 (48x), because the mini DiT
    # preset takes 16 latent channels on 8x8 latents. Levels at 1/2, 1/4, 1/8; global reference attention at
    # 1/4, 1/8; local (5x5) reference attention and the reference copy head at 1/2: static detail comes from the
    # reference image (docs/vae.md rows s-w; in the chain eval PSNR 27.1 -> 29.5 dB, SSIM 0.76 -> 0.92).
    "tiny": VAEConfig(local_attn_levels=(0,), reference_copy=True),
    # f4 t4 c4 (48x like tiny; 64x64 video -> 4 x 16x16 latents), for mouths of a few pixels: at 64x64 a
    # synthetic mouth is ~7x3 pixels and f8 puts the whole face in 2x3 latent pixels. Measured on the 16 eval
    # clips (docs/evaluation.md, "The mouth at 64x64"): reconstructions score Sync-C 2.91 (tiny: 1.84, ground
    # truth 4.34) after the same ~15 CPU minutes (900 steps), but its decoder is far more sensitive to latent
    # errors (latent noise of 0.4 std: -7.5 dB, tiny: -0.4 dB) and the mini DiT at 4x4 patches had not learnt
    # clean samples in 1200 steps, so the embedded default keeps tiny. Levels at 1/1, 1/2, 1/4, no residual
    # blocks at full resolution (the cost is there); reference attention at 1/4.
    "tiny-f4": VAEConfig(
        latent_channels=4,
        patch_size=1,
        widths=(24, 48, 96),
        encoder_blocks=(0, 1, 1),
        decoder_blocks=(0, 1, 1),
        reference_blocks=(1, 1, 1),
        attn_levels=(2,),
    ),
    # Paper 002 scale (our choice; the paper's f/t/c were not available, its digests report 768x):
    # f32 t4 c16 -> 3 * 4 * 32^2 / 16 = 768x, 512x512 -> 16x16 latents per 4 frames. Widths follow
    # DC-AE f32 (128 ... 1024 there), narrowed to integer shortcut ratios and ~280M parameters
    # (encoder 109M, decoder 138M, reference encoder 33M); time is halved between levels 1-2 and
    # 2-3 (Wan keeps the highest resolution at full frame rate); reference attention at 1/16 and
    # 1/32 (Reducio fuses at its two lowest decoder stages).
    "ref-dc-f32t4c16": VAEConfig(
        latent_channels=16,
        patch_size=2,
        widths=(96, 192, 384, 512, 512),
        temporal_down=(False, True, True, False),
        encoder_blocks=(1, 2, 2, 2, 2),
        decoder_blocks=(2, 2, 2, 3, 3),
        reference_blocks=(1, 1, 1, 1, 1),
        attn_levels=(3, 4),
        head_dim=64,
    ),
}

DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    # Small 3-layer PatchGAN for 64x64 CPU runs.
    "tiny": DiscriminatorConfig(channels=16, layers=3, max_channels=64),
    # Open-Sora 2.0 video DC-AE disc: 5-layer 3-D N-layer discriminator, 64 base channels.
    "patchgan3d": DiscriminatorConfig(channels=64, layers=5, max_channels=512),
}
