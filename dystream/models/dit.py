"""AvatarDiT: the Wan2.2-TI2V video DiT extended with talking and listening audio attention (StreamAvatar §3.2).

Layout (parameter names follow the official Wan2.2 checkpoint, ``Wan-Video/Wan2.2`` ``wan/modules/model.py``,
so :func:`dystream.models.adapters.load_wan22_state_dict` loads it strictly; the new audio modules are reported):

* ``patch_embedding`` (Conv3d, patch (1, 2, 2)) turns latents ``[B, C, F, h, w]`` into frame-major tokens
  ``[B, F, S, dim]`` with ``S = (h/2)(w/2)``;
* ``time_embedding.{0,2}`` embeds the **per-frame** timestep ``t = 1000 sigma`` (``[B, F]``; the reference frame
  has sigma = 0), ``time_projection.1`` gives the 6-way modulation ``[B, F, 6, dim]`` (Wan2.2-TI2V feeds one
  timestep per token; ours is constant over a frame's tokens, which is how TI2V keeps its first frame clean);
* ``text_embedding.{0,2}`` embeds the text context (the paper fixes the prompt "a person is speaking and
  listening": a precomputed umT5 context for the real preset, a learned constant ``text_context`` for toy ones);
* ``blocks.N``: modulated self-attention with qk RMS-norm and 3-D RoPE (``self_attn``), text cross-attention
  (``norm3``, ``cross_attn``), then the two new audio modules, then the modulated FFN (``ffn.{0,2}``,
  ``modulation``);
* ``head.{head,modulation}`` and unpatchify back to ``[B, C_out, F, h, w]``; the output is the velocity
  ``v = eps - x0`` (docs/architecture.md).

Audio (StreamAvatar §3.2, Fig. 4): ``audio_attn`` ("Audio Attention", talking cues) and ``interact_attn``
("Interact Audio Attention", listening cues) are cross-attentions from the video tokens of one latent frame to
audio tokens, with zero-initialised output projections so a fresh model equals the base Wan model. Audio features
arrive per video frame (``[B, T_video, audio_dim]``, already multiplied by the speaking mask upstream: talk =
own x mask, listen = partner x (1 - mask)); a shared ``audio_proj`` turns each video frame into
``audio_tokens_per_frame`` tokens. Latent frame ``i >= 1`` covers video frames ``4(i-1) .. 4i-1`` and attends only
to the tokens of those frames plus ``audio_lookahead_frames`` later video frames (and ``audio_lookbehind_frames``
earlier ones, silence before the first), so conditioning is causal up to the look-ahead; the reference frame gets
no audio update. ``None`` audio (condition dropped for classifier-free guidance) makes the module contribute
nothing. A video frame whose features are exactly zero carries no audio:
its tokens are hidden from the attention, and a latent frame with no audio in its whole window gets exactly
zero update. So per-sample dropout by zeroing features (``dystream.objectives.flow_matching``) trains the same
unconditional branch that ``None`` gives at sampling time, the talk module is silent while the avatar listens
(talk features x mask = 0) and vice versa, and the zero padding past the end of a stream is "no audio".

Forward modes:

* ``model(x [B, C, F, h, w], sigma [B, F], audio_talk, audio_listen, context, attention=...)``:
  ``"bidirectional"`` (teacher) or ``"block_causal"`` (student training: reference block + chunks of C,
  ``F = 1 + k C``, with the same Reference Sink / rolling window / RAPR positions as streaming; see
  :mod:`dystream.models.attention`). Audio is ``[B, 4(F-1), D]``, or ``[B, 4(F-1) + lookahead, D]`` when the
  caller has the look-ahead frames; otherwise the missing look-ahead is zero features (end of stream).
* streaming: ``cache = model.new_kv_cache(batch_size)``; push the reference first as a chunk of one frame at
  sigma 0 (``model.forward_chunk(x_ref [B, C, 1, h, w], zeros [B, 1], None, None, cache)``), then chunks of C
  frames: ``v = model.forward_chunk(x_chunk, sigma_chunk [B, C], talk_chunk, listen_chunk, cache, context,
  write_cache)``. Chunk audio covers exactly the look-behind, the chunk's ``4 C`` video frames and the look-ahead
  (``[B, lookbehind + 4 C + lookahead, D]``); before the start and at the end of a stream it is zero features
  (``model.audio_window(audio, start, C)`` cuts and pads). ``write_cache=False`` attends to the cache without
  changing it (the few-step denoising of one chunk, SiD student forcing); a call with ``write_cache=True``
  attends *and then* appends this chunk's K/V (from the input it was given, e.g. the noisy last-step input) and
  advances the stream. Streaming chunk by chunk equals the ``block_causal`` full forward (tested to 1e-5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dystream.models.attention import (
    BidirectionalAttention,
    BlockCausalAttention,
    CausalLayout,
    KVCache,
    StreamingAttention,
    _sdpa,
)
from dystream.models.layers import LayerNorm32, RMSNorm, sinusoidal_embedding
from dystream.models.rope import Rope3D

__all__ = ["DiTConfig", "AvatarDiT", "DIT_PRESETS"]

AttentionMode = Literal["bidirectional", "block_causal"]


@dataclass
class DiTConfig:
    """Typed config of :class:`AvatarDiT`; build presets with ``DiTConfig.from_preset(name, **overrides)``."""

    # --- Wan2.2 backbone ---
    in_channels: int = 16  # latent channels of the VAE (Wan2.2 VAE: 48; the tiny VAE: 16)
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w); t must be 1 (one token frame per latent frame)
    dim: int = 64
    ffn_dim: int = 256
    num_heads: int = 4
    num_layers: int = 2
    freq_dim: int = 256  # sinusoidal timestep embedding size
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True  # affine LayerNorm ``norm3`` before text cross-attention
    timestep_scale: float = 1000.0  # Wan embeds t = 1000 sigma (num_train_timesteps)
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024  # RoPE table length per axis (Wan2.2: 1024)
    # --- text (fixed prompt, §3.2) ---
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512  # contexts are zero-padded to this length, as in Wan2.2
    learned_text_context: bool = False  # True: a learned [text_len, text_dim] constant replaces the prompt file
    # --- audio (talk / listen attention, §3.2) ---
    audio_attention: bool = True  # False: the plain Wan2.2 block (no audio modules)
    audio_dim: int = 768  # per-video-frame feature size from dystream.models.audio
    audio_tokens_per_frame: int = 4  # tokens per video frame produced by audio_proj
    audio_lookahead_frames: int = 2  # extra future video frames each latent frame may hear
    # past video frames each latent frame also hears (a listener's nod answers the partner's phrase end 2-8 frames
    # earlier; docs/evaluation.md, "Does the teacher hear the partner?"); zeros before the stream's start
    audio_lookbehind_frames: int = 0
    # of those, how many the own voice's attention (talk) hears; None = all. The mouth follows the voice frame by
    # frame, so the talk attention can keep a narrow window while the listen attention reads the partner's past
    talk_lookbehind_frames: int | None = None
    audio_attn_dim: int | None = None  # inner width of the audio attentions; None = dim
    frames_per_latent: int = 4  # video frames per latent frame (VAE temporal stride)
    # --- block-causal student and streaming (§3.1.1, §4.1) ---
    chunk_frames: int = 3
    sink_chunks: int = 1  # sink = reference + this many chunks
    window_frames: int | None = 6  # rolling window of non-sink frames; None = unlimited (no eviction)
    rapr: bool = True
    rapr_max_distance: int = 10  # D
    reference_sink: bool = True  # False: no sink, the reference is evicted like any frame (Self-Forcing baseline)
    # --- execution ---
    attention_backend: str = "sdpa"  # "sdpa" | "flex" (flex: block-causal without RAPR, CUDA only)
    gradient_checkpointing: bool = False  # activation checkpointing per block while training

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        positive = (
            "in_channels out_channels dim ffn_dim num_heads num_layers freq_dim text_dim text_len "
            "audio_dim audio_tokens_per_frame frames_per_latent chunk_frames rope_max_positions"
        )
        for name in positive.split():
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"DiTConfig.patch_size must be three positive ints, got {self.patch_size}")
        if self.patch_size[0] != 1:
            raise ValueError(
                f"DiTConfig.patch_size[0] must be 1 (block-causal chunks and audio windows are per latent frame), "
                f"got {self.patch_size}"
            )
        if self.dim % self.num_heads != 0:
            raise ValueError(f"DiTConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 != 0 or self.head_dim < 6:
            raise ValueError(
                f"DiTConfig: head_dim = dim / num_heads = {self.head_dim} must be even and >= 6 (3-D RoPE)"
            )
        if self.freq_dim % 2 != 0:
            raise ValueError(f"DiTConfig.freq_dim must be even, got {self.freq_dim}")
        for name in ("audio_lookahead_frames", "audio_lookbehind_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"DiTConfig.{name} must be >= 0, got {getattr(self, name)}")
        talk_behind, behind = self.talk_lookbehind_frames, self.audio_lookbehind_frames
        if talk_behind is not None and not 0 <= talk_behind <= behind:
            raise ValueError(
                f"DiTConfig.talk_lookbehind_frames must be in [0, audio_lookbehind_frames={behind}] or None (all of "
                f"them), got {talk_behind}"
            )
        if self.audio_attn_dim is not None and (self.audio_attn_dim < 1 or self.audio_attn_dim % self.head_dim != 0):
            raise ValueError(
                f"DiTConfig.audio_attn_dim={self.audio_attn_dim} must be a positive multiple of "
                f"head_dim={self.head_dim}"
            )
        if self.attention_backend not in ("sdpa", "flex"):
            raise ValueError(f"DiTConfig.attention_backend must be 'sdpa' or 'flex', got {self.attention_backend!r}")
        try:
            self.layout  # noqa: B018  (validates chunk/sink/window/RAPR combinations)
        except ValueError as err:
            raise ValueError(f"DiTConfig: {err}".replace("CausalLayout.", "DiTConfig.")) from None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def layout(self) -> CausalLayout:
        return CausalLayout(
            chunk_frames=self.chunk_frames,
            sink_chunks=self.sink_chunks,
            window_frames=self.window_frames,
            rapr=self.rapr,
            rapr_max_distance=self.rapr_max_distance,
            rope_max_positions=self.rope_max_positions,
            reference_sink=self.reference_sink,
        )

    @property
    def audio_window_frames(self) -> int:
        """Video frames each latent frame hears: the look-behind, its own, the look-ahead."""
        return self.audio_lookbehind_frames + self.frames_per_latent + self.audio_lookahead_frames

    def chunk_audio_frames(self, num_latent: int) -> int:
        """Video frames of audio a chunk of ``num_latent`` latent frames reads: look-behind, own, look-ahead."""
        return self.audio_lookbehind_frames + self.frames_per_latent * num_latent + self.audio_lookahead_frames

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiTConfig:
        if name not in DIT_PRESETS:
            raise KeyError(f"unknown DiT preset {name!r}; available: {', '.join(DIT_PRESETS)}")
        return dataclasses.replace(DIT_PRESETS[name], **overrides)


# --------------------------------------------------------------------------------------------------------------
# Modules (names mirror Wan2.2 where the weights come from there)
# --------------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Wan2.2 self-attention (``q, k, v, o, norm_q, norm_k``); the attention pattern comes from a plan."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()  # over the full width, as Wan does
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, attend, layer: int) -> Tensor:
        # x [B, F, S, dim] -> q, k, v [B, F, S, H, d]; k is handed to the plan un-roped (the cache stores it so)
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        return self.o(attend(layer, q, k, v).flatten(-2))


class CrossAttention(nn.Module):
    """Cross-attention from tokens to a context (Wan2.2 text cross-attention, also the audio attentions).

    ``inner`` is the width of q/k/v (Wan: ``dim``); the output projection maps back to ``dim``.
    """

    def __init__(self, dim: int, inner: int, head_dim: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = inner // head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.o = nn.Linear(inner, dim)
        self.norm_q = RMSNorm(inner, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(inner, eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        # x [N, L, dim], context [N, Lc, dim], key_mask [N, Lc] (True = attend) -> [N, L, dim]
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return self.o(_sdpa(q, k, v, key_mask).flatten(-2))


def frames_window(feats: Tensor, lo: int, width: int) -> Tensor:
    """``feats[:, lo : lo + width]`` of per-video-frame features ``[B, T, D]``, zero features (no audio) where the
    window reaches before frame 0 (``lo < 0``) or past the end: a chunk's audio with its look-behind and look-ahead."""
    before = max(-lo, 0)
    part = feats[:, max(lo, 0) : lo + width]
    return torch.nn.functional.pad(part, (0, 0, before, width - before - part.shape[1]))


class AudioAttention(nn.Module):
    """Per-latent-frame audio cross-attention (talk or listen); zero-initialised ``o`` (see AvatarDiT.init).

    Tokens of video frames without audio (all-zero features: masked by the speaking mask, dropped for CFG,
    or past the end of the stream) are hidden from the attention, and a latent frame with no audio at all in
    its window gets exactly zero update, so zero features mean the same as a dropped (None) condition.
    """

    def __init__(self, dim: int, inner: int, head_dim: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm32(dim, eps)  # parameter-free pre-norm of the residual stream
        self.attn = CrossAttention(dim, inner, head_dim, qk_norm, eps)

    def forward(self, x: Tensor, tokens: Tensor, has_audio: Tensor) -> Tensor:
        # x [B, Fa, S, dim] attends to its own frame's audio tokens [B, Fa, W n_tok, dim]; has_audio [B, Fa, W n_tok]
        b = x.shape[0]
        heard = has_audio.any(-1)  # [B, Fa]
        key_mask = has_audio | ~heard.unsqueeze(-1)  # silent frames attend to everything; their output is dropped
        out = self.attn(self.norm(x).flatten(0, 1), tokens.flatten(0, 1), key_mask.flatten(0, 1))  # per frame
        return out.unflatten(0, (b, -1)) * heard[..., None, None].to(out.dtype)


class AudioTokenizer(nn.Module):
    """Shared projection of per-video-frame features to tokens, gathered into per-latent-frame windows."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.tokens_per_frame = cfg.audio_tokens_per_frame
        self.stride = cfg.frames_per_latent
        self.window = cfg.audio_window_frames
        self.net = nn.Sequential(
            nn.Linear(cfg.audio_dim, cfg.dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.dim, cfg.audio_tokens_per_frame * cfg.dim),
        )
        # which of the window's video frames (look-behind, own 0..3, look-ahead) a token comes from
        self.pos = nn.Parameter(torch.zeros(self.window, cfg.audio_tokens_per_frame, cfg.dim))

    def forward(self, feats: Tensor, num_latent: int) -> tuple[Tensor, Tensor]:
        """``feats [B, P + 4 n + L, D]`` -> tokens ``[B, n, W n_tok, dim]`` and ``has_audio [B, n, W n_tok]``,
        W = P + 4 + L.

        With ``feats`` starting P (look-behind) frames before the first latent frame's own, latent frame j hears
        video frames ``4j - P .. 4j + 3 + L``; a video frame has audio unless its features are all exactly zero.
        """
        tokens = self.net(feats).unflatten(-1, (self.tokens_per_frame, -1))  # [B, T, n_tok, dim]
        windows = tokens.unfold(1, self.window, self.stride)  # [B, n, n_tok, dim, W]
        windows = rearrange(windows, "b n k c w -> b n w k c") + self.pos
        present = (feats != 0).any(-1).unfold(1, self.window, self.stride)  # [B, n, W]
        present = present.unsqueeze(-1).expand(-1, -1, -1, self.tokens_per_frame)  # [B, n, W, n_tok]
        assert windows.shape[1] == num_latent
        return windows.flatten(2, 3), present.flatten(2, 3)


class AvatarBlock(nn.Module):
    """Wan2.2 attention block + talk/listen audio attention (StreamAvatar Fig. 4)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = LayerNorm32(dim, eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm3 = LayerNorm32(dim, eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, dim, cfg.head_dim, cfg.qk_norm, eps)
        self.norm2 = LayerNorm32(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        if cfg.audio_attention:
            inner = cfg.audio_attn_dim or dim
            self.audio_attn = AudioAttention(dim, inner, cfg.head_dim, cfg.qk_norm, eps)
            self.interact_attn = AudioAttention(dim, inner, cfg.head_dim, cfg.qk_norm, eps)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        context: Tensor,
        talk: tuple[Tensor, Tensor] | None,
        listen: tuple[Tensor, Tensor] | None,
        audio_from: int,
        attend,
        layer: int,
    ) -> Tensor:
        # x [B, F, S, dim]; e0 [B, F, 6, dim] float32 per-frame modulation;
        # talk / listen: (tokens [B, F - audio_from, W, dim], has_audio [B, F - audio_from, W]) or None
        mod = (self.modulation.float().unsqueeze(0) + e0.float()).unsqueeze(3)  # [B, F, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # each [B, F, 1, dim]
        h = (self.norm1(x).float() * (1 + scale1) + shift1).to(x.dtype)
        x = x + (self.self_attn(h, attend, layer).float() * gate1).to(x.dtype)
        x = x + self.cross_attn(self.norm3(x).flatten(1, 2), context).unflatten(1, x.shape[1:3])
        for module, tokens in (
            (getattr(self, "audio_attn", None), talk),
            (getattr(self, "interact_attn", None), listen),
        ):
            if module is None or tokens is None:
                continue  # condition dropped: the module contributes nothing
            update = module(x[:, audio_from:], *tokens)
            x = torch.cat([x[:, :audio_from], x[:, audio_from:] + update], dim=1) if audio_from else x + update
        h = (self.norm2(x).float() * (1 + scale2) + shift2).to(x.dtype)
        return x + (self.ffn(h).float() * gate2).to(x.dtype)


class Head(nn.Module):
    """Wan2.2 output head: modulated LayerNorm + linear to ``prod(patch) * out_channels`` per token."""

    def __init__(self, dim: int, out_channels: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm32(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # x [B, F, S, dim], e [B, F, dim] float32
        shift, scale = (self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head((self.norm(x).float() * (1 + scale) + shift).to(x.dtype))


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class AvatarDiT(nn.Module):
    """Wan2.2-TI2V DiT with talk/listen audio attention; see the module docstring for the API."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([AvatarBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg.dim, cfg.out_channels, cfg.patch_size, cfg.eps)
        if cfg.audio_attention:
            self.audio_proj = AudioTokenizer(cfg)
        if cfg.learned_text_context:
            self.text_context = nn.Parameter(torch.empty(cfg.text_len, cfg.text_dim))
        # the precomputed prompt context of real presets (set_text_context); not part of the state dict
        self.register_buffer("fixed_text_context", None, persistent=False)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_max_positions, cfg.rope_theta)
        self.init_weights()

    # ---------------------------------------------------------------------------------------------- weights
    def init_weights(self) -> None:
        """Wan2.2's init scheme (xavier linears, zero biases, N(0, 0.02) embeddings, zero head) + the new modules."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        self.reset_extension_parameters()

    def reset_extension_parameters(self) -> None:
        """(Re)initialise the parameters that the Wan2.2 checkpoint lacks; audio outputs start at exactly zero."""
        for module in self.modules():
            if isinstance(module, AudioAttention):
                for lin in (module.attn.q, module.attn.k, module.attn.v):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
                for norm in (module.attn.norm_q, module.attn.norm_k):
                    if isinstance(norm, RMSNorm):
                        nn.init.ones_(norm.weight)
                nn.init.zeros_(module.attn.o.weight)  # the model starts equal to the base model (§3.2)
                nn.init.zeros_(module.attn.o.bias)
            elif isinstance(module, AudioTokenizer):
                for m in module.net.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_uniform_(m.weight)
                        nn.init.zeros_(m.bias)
                nn.init.normal_(module.pos, std=0.02)
        if self.config.learned_text_context:
            nn.init.normal_(self.text_context, std=1.0)

    def extension_keys(self) -> list[str]:
        """State-dict keys that are not part of the Wan2.2 layout (the new audio modules, the learned prompt)."""
        keys = []
        for key in self.state_dict():
            parts = key.split(".")
            if parts[0] in ("audio_proj", "text_context") or (
                len(parts) > 2 and parts[0] == "blocks" and parts[2] in ("audio_attn", "interact_attn")
            ):
                keys.append(key)
        return keys

    def set_text_context(self, context: Tensor | None) -> None:
        """Fix the prompt context ``[text_len', text_dim]`` (e.g. the umT5 embedding of the paper's prompt)."""
        if context is not None:
            if context.dim() != 2 or context.shape[1] != self.config.text_dim:
                raise ValueError(f"set_text_context: expected [L, {self.config.text_dim}], got {tuple(context.shape)}")
            context = context.to(self.patch_embedding.weight.device)
        self.fixed_text_context = context

    # ---------------------------------------------------------------------------------------------- inputs
    def _check_latents(self, x: Tensor, name: str) -> tuple[int, int]:
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"AvatarDiT: {name} must be [B, C, F, h, w], got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"AvatarDiT: {name} has {x.shape[1]} channels, DiTConfig.in_channels is {cfg.in_channels} "
                "(the VAE's latent channels)"
            )
        _, ph, pw = cfg.patch_size
        if x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(
                f"AvatarDiT: {name} spatial size {tuple(x.shape[3:])} is not divisible by patch {(ph, pw)}"
            )
        return x.shape[3] // ph, x.shape[4] // pw

    def _check_sigma(self, sigma: Tensor, batch: int, frames: int, name: str) -> Tensor:
        if sigma.shape != (batch, frames):
            raise ValueError(
                f"AvatarDiT: {name} must be [B, F] = [{batch}, {frames}] (one noise level per latent frame), "
                f"got {tuple(sigma.shape)}"
            )
        return sigma

    def _context(self, context: Tensor | None, batch: int) -> Tensor:
        cfg = self.config
        if context is None:
            if cfg.learned_text_context:
                context = self.text_context
            elif self.fixed_text_context is not None:
                context = self.fixed_text_context
            else:
                raise ValueError(
                    "AvatarDiT: no text context: pass context=[B, L, text_dim] (the precomputed umT5 embedding of the "
                    "fixed prompt), call model.set_text_context(...), or use DiTConfig.learned_text_context=True"
                )
        if context.dim() == 2:
            context = context.unsqueeze(0)
        if context.dim() != 3 or context.shape[0] not in (1, batch) or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"AvatarDiT: context must be [B or 1, L <= {cfg.text_len}, {cfg.text_dim}], got {tuple(context.shape)}"
            )
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"AvatarDiT: context has {context.shape[1]} tokens, DiTConfig.text_len is {cfg.text_len}")
        weight = self.text_embedding[0].weight
        context = context.to(device=weight.device, dtype=weight.dtype).expand(batch, -1, -1)
        # Wan2.2 zero-pads every prompt to text_len tokens and attends to the padding too
        context = torch.nn.functional.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        return self.text_embedding(context)

    def _audio_tokens(self, feats: Tensor | None, batch: int, num_latent: int, name: str, padded: bool):
        """``feats [B, T, D]`` -> (tokens, has_audio) from :class:`AudioTokenizer`, or None (dropped / no frames).

        ``padded`` (the whole-clip forward): ``feats`` start at the first generated frame and may stop short of the
        look-ahead; the look-behind before the start and the missing look-ahead are silence. Otherwise (a chunk)
        ``feats`` cover the look-behind, the chunk and the look-ahead exactly (:meth:`audio_window` cuts them).
        """
        if feats is None:
            return None
        cfg = self.config
        if not cfg.audio_attention:
            raise ValueError(f"AvatarDiT: {name} given, but this model has no audio modules (audio_attention=False)")
        behind, look = cfg.audio_lookbehind_frames, cfg.audio_lookahead_frames
        if feats.dim() != 3 or feats.shape[0] != batch or feats.shape[2] != cfg.audio_dim:
            raise ValueError(
                f"AvatarDiT: {name} must be [B={batch}, T, audio_dim={cfg.audio_dim}], got {tuple(feats.shape)}"
            )
        own = cfg.frames_per_latent * num_latent
        if padded:
            if look and feats.shape[1] == own:
                feats = torch.nn.functional.pad(feats, (0, 0, 0, look))  # end of stream: silence
            if feats.shape[1] != own + look:
                allowed = f"{own} or {own + look}" if look else f"{own}"
                raise ValueError(
                    f"AvatarDiT: {name} covers {feats.shape[1]} video frames, expected {allowed} "
                    f"({cfg.frames_per_latent} per latent frame x {num_latent} latent frames + {look} look-ahead)"
                )
            feats = torch.nn.functional.pad(feats, (0, 0, behind, 0))  # before the stream's start: silence
        elif feats.shape[1] != (want := cfg.chunk_audio_frames(num_latent)):
            raise ValueError(
                f"AvatarDiT: {name} covers {feats.shape[1]} video frames, expected {want} "
                f"({behind} look-behind + {cfg.frames_per_latent} per latent frame x {num_latent} latent frames"
                f" + {look} look-ahead; model.audio_window cuts it)"
            )
        if num_latent == 0:
            return None
        weight = self.audio_proj.net[0].weight
        tokens, has_audio = self.audio_proj(feats.to(device=weight.device, dtype=weight.dtype), num_latent)
        if name == "audio_talk" and cfg.talk_lookbehind_frames is not None:
            # the talk attention's window starts talk_lookbehind_frames before the latent frame's own video frames
            first = (behind - cfg.talk_lookbehind_frames) * cfg.audio_tokens_per_frame
            tokens, has_audio = tokens[:, :, first:], has_audio[:, :, first:]
        return tokens, has_audio

    def audio_window(self, audio: Tensor | None, start: int, size: int) -> Tensor | None:
        """Cut the chunk audio for latent frames ``start .. start+size-1`` from ``audio [B, T, D]`` (the stream's
        features from its first generated video frame on).

        Returns ``[B, lookbehind + 4 size + lookahead, D]``, zero-padded before the stream's start and past the end
        of ``audio`` (end of stream), or ``None`` for the reference chunk (``start == 0``) or dropped audio.
        """
        if audio is None or start == 0:
            return None
        cfg = self.config
        lo, hi = cfg.frames_per_latent * (start - 1), cfg.frames_per_latent * (start - 1 + size)
        if hi > audio.shape[1]:
            raise ValueError(
                f"audio_window: latent frames {start}..{start + size - 1} need video frames up to {hi - 1}, "
                f"the audio has {audio.shape[1]}"
            )
        return frames_window(audio, lo - cfg.audio_lookbehind_frames, cfg.chunk_audio_frames(size))

    # ---------------------------------------------------------------------------------------------- core
    def _embed_time(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        # sigma [B, F] -> e [B, F, dim], e0 [B, F, 6, dim] (float32), Wan's per-token timestep at frame granularity
        weight = self.time_embedding[0].weight
        t = sigma.to(device=weight.device, dtype=torch.float64) * self.config.timestep_scale  # no bf16 rounding of t
        emb = sinusoidal_embedding(t, self.config.freq_dim)
        e = self.time_embedding(emb.to(weight.dtype)).float()
        e0 = self.time_projection(e.to(weight.dtype)).float().unflatten(-1, (6, self.config.dim))
        return e, e0

    def _run(
        self,
        x: Tensor,
        sigma: Tensor,
        talk: tuple[Tensor, Tensor] | None,
        listen: tuple[Tensor, Tensor] | None,
        audio_from: int,
        context: Tensor,
        attend,
        taps: tuple[int, ...] = (),
    ) -> Tensor | list[Tensor]:
        cfg = self.config
        h, w = x.shape[3] // cfg.patch_size[1], x.shape[4] // cfg.patch_size[2]
        weight = self.patch_embedding.weight
        tokens = self.patch_embedding(x.to(device=weight.device, dtype=weight.dtype))
        tokens = rearrange(tokens, "b c f h w -> b f (h w) c")  # frame-major [B, F, S, dim]
        e, e0 = self._embed_time(sigma)
        use_ckpt = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        features: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            args = (tokens, e0, context, talk, listen, audio_from, attend, i)
            tokens = checkpoint(block, *args, use_reentrant=False) if use_ckpt else block(*args)
            if taps:
                features.extend(tokens for layer in taps if layer == i)
                if len(features) == len(taps):
                    return features  # the later blocks and the head are not needed
        out = self.head(tokens, e)  # [B, F, S, p q r c]
        pt, ph, pw = cfg.patch_size
        return rearrange(out, "b f (h w) (p q r c) -> b c (f p) (h q) (w r)", h=h, w=w, p=pt, q=ph, r=pw)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        audio_talk: Tensor | None = None,
        audio_listen: Tensor | None = None,
        context: Tensor | None = None,
        attention: AttentionMode = "bidirectional",
        return_block_features: Sequence[int] | None = None,
    ) -> Tensor | list[Tensor]:
        """Velocity ``v [B, C_out, F, h, w]`` for latents ``x [B, C_in, F, h, w]`` at per-frame noise ``sigma [B, F]``.

        Args:
            x: latent sequence, frame 0 the reference image.
            sigma: noise level per latent frame in [0, 1] (reference: 0).
            audio_talk, audio_listen: ``[B, 4(F-1) (+ lookahead), audio_dim]`` masked features, or None (dropped).
            context: ``[B or 1, L, text_dim]`` text context; None uses the learned / fixed prompt.
            attention: ``"bidirectional"`` (teacher) or ``"block_causal"`` (student, ``F = 1 + k C``).
            return_block_features: block indices (0-based, non-decreasing, repeats allowed); instead of the
                velocity, return the token states ``[B, F, S, dim]`` after each of these blocks, in order, for
                heads built on the backbone (the stage-2 discriminator's Q-Formers, StreamAvatar §3.1.2). Blocks
                after the last one and the output head are not run.
        """
        grid = self._check_latents(x, "x")
        b, f = x.shape[0], x.shape[2]
        self._check_sigma(sigma, b, f, "sigma")
        device = self.patch_embedding.weight.device
        if attention == "bidirectional":
            attend = BidirectionalAttention(f, grid, self.rope, device)
        elif attention == "block_causal":
            attend = BlockCausalAttention(self.config.layout, f, grid, self.rope, device, self.config.attention_backend)
        else:
            raise ValueError(f"AvatarDiT: attention must be 'bidirectional' or 'block_causal', got {attention!r}")
        taps = ()
        if return_block_features is not None:
            taps = tuple(int(i) for i in return_block_features)
            n = len(self.blocks)
            if not taps or any(not 0 <= i < n for i in taps) or list(taps) != sorted(taps):
                raise ValueError(
                    f"AvatarDiT: return_block_features must be non-decreasing block indices in [0, {n}), got {taps}"
                )
        talk = self._audio_tokens(audio_talk, b, f - 1, "audio_talk", padded=True)
        listen = self._audio_tokens(audio_listen, b, f - 1, "audio_listen", padded=True)
        return self._run(x, sigma, talk, listen, 1, self._context(context, b), attend, taps)

    # ---------------------------------------------------------------------------------------------- streaming
    def new_kv_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        detach: bool = True,
    ) -> KVCache:
        """An empty stream cache (Reference Sink + rolling window, un-roped keys) for ``forward_chunk``."""
        weight = self.patch_embedding.weight
        return KVCache(
            layout=self.config.layout,
            num_layers=self.config.num_layers,
            batch_size=batch_size,
            device=torch.device(device) if device is not None else weight.device,
            dtype=dtype or weight.dtype,
            detach=detach,
        )

    def forward_chunk(
        self,
        x: Tensor,
        sigma: Tensor,
        audio_talk: Tensor | None,
        audio_listen: Tensor | None,
        cache: KVCache,
        context: Tensor | None = None,
        write_cache: bool = True,
    ) -> Tensor:
        """Velocity for the next chunk of a stream, attending to ``cache`` (see the module docstring).

        Args:
            x: ``[B, C_in, n, h, w]``: the reference (n = 1) when the cache is empty, else a chunk of C frames.
            sigma: ``[B, n]`` noise levels.
            audio_talk, audio_listen: ``[B, lookbehind + 4 n + lookahead, audio_dim]`` (:meth:`audio_window`) or
                None; must be None for the reference.
            cache: the stream's :class:`KVCache` (from :meth:`new_kv_cache`).
            context: text context as in :meth:`forward`.
            write_cache: after the forward, append this chunk's K/V and advance the stream.
        """
        grid = self._check_latents(x, "x_chunk")
        b, n = x.shape[0], x.shape[2]
        self._check_sigma(sigma, b, n, "sigma_chunk")
        if cache.layout != self.config.layout or cache.num_layers != self.config.num_layers:
            raise ValueError("forward_chunk: the KVCache was not made for this model's config (use model.new_kv_cache)")
        if b != cache.batch_size:
            raise ValueError(f"forward_chunk: batch {b} but the KVCache was made for batch {cache.batch_size}")
        start = cache.next_frame
        expected = cache.layout.chunk_size(start)
        if n != expected:
            what = "the reference frame (1 latent frame)" if start == 0 else f"a chunk of {expected} latent frames"
            raise ValueError(f"forward_chunk: the stream is at latent frame {start} and expects {what}, got {n}")
        tokens = grid[0] * grid[1]
        if cache.tokens_per_frame is None:
            cache.tokens_per_frame = tokens
        elif cache.tokens_per_frame != tokens:
            raise ValueError(
                f"forward_chunk: {tokens} tokens per frame, the stream so far had {cache.tokens_per_frame}"
            )
        if start == 0:
            for name, audio in (("audio_talk", audio_talk), ("audio_listen", audio_listen)):
                if audio is not None and audio.shape[1] != 0:
                    raise ValueError(f"forward_chunk: the reference chunk has no audio; pass {name}=None")
            talk = listen = None
        else:
            talk = self._audio_tokens(audio_talk, b, n, "audio_talk", padded=False)
            listen = self._audio_tokens(audio_listen, b, n, "audio_listen", padded=False)
        attend = StreamingAttention(cache, n, grid, self.rope, write=write_cache)
        out = self._run(x, sigma, talk, listen, 0, self._context(context, b), attend)
        attend.commit()
        return out


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------

DIT_PRESETS: dict[str, DiTConfig] = {
    # CPU tests and the embedded default: the tiny VAE's 16 latent channels, 8x8 latents (64x64 video, VAE 8x
    # spatial) -> 16 tokens per frame; the tiny audio encoder's 32-d features; learned prompt constant.
    "tiny": DiTConfig(
        in_channels=16,
        out_channels=16,
        dim=64,
        ffn_dim=256,
        num_heads=4,
        num_layers=2,
        freq_dim=64,
        text_dim=32,
        text_len=8,
        learned_text_context=True,
        audio_dim=32,
        audio_tokens_per_frame=2,
    ),
    # The embedded default's teacher and students (64x64 synthetic world, CPU; 10.2M parameters): the tiny VAE's 16
    # channels on 8x8 latents, 2x2 patches -> 16 tokens per frame, the tiny audio encoder's 32-d features. The tiny
    # preset (0.26M) is too small to map the reference latent (an image encoded alone, nearly uncorrelated with the
    # 4-frame latents that follow it) onto the clip: its samples stay noise-coloured blotches.
    "mini": DiTConfig(
        in_channels=16,
        out_channels=16,
        dim=256,
        ffn_dim=1024,
        num_heads=4,
        num_layers=6,
        freq_dim=128,
        text_dim=32,
        text_len=8,
        learned_text_context=True,
        audio_dim=32,
        audio_tokens_per_frame=2,
    ),
    # A ~40M-parameter model for single-GPU experiments at small resolution; same head size as Wan (128).
    # Audio dim is Wav2Vec2-base's 768; recipes using the tiny audio encoder override audio_dim.
    "small": DiTConfig(
        in_channels=16,
        out_channels=16,
        dim=512,
        ffn_dim=2048,
        num_heads=4,
        num_layers=6,
        text_dim=512,
        text_len=16,
        learned_text_context=True,
        audio_dim=768,
    ),
    # Wan2.2-TI2V-5B (Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py + shared_config.py: dim 3072, ffn 14336,
    # 24 heads, 30 layers, patch (1, 2, 2), freq_dim 256, qk_norm, cross_attn_norm, eps 1e-6, text_len 512,
    # umT5-XXL 4096-d context; checkpoint config in/out 48 = Wan2.2 VAE z_dim) + StreamAvatar §4.1 streaming
    # numbers (C = 3, sink = reference + 1 chunk, window 6, D = 10). Audio: Wav2Vec2-base 768-d features,
    # 4 tokens per video frame as Wan-S2V's audio encoder.
    "wan2.2-ti2v-5b": DiTConfig(
        in_channels=48,
        out_channels=48,
        dim=3072,
        ffn_dim=14336,
        num_heads=24,
        num_layers=30,
        freq_dim=256,
        text_dim=4096,
        text_len=512,
        learned_text_context=False,
        audio_dim=768,
        audio_tokens_per_frame=4,
    ),
}
# "mini" with 4x4 patches, for the tiny-f4 VAE's 16x16 latents of 64x64 video: 16 tokens per frame, as "mini" on f8.
DIT_PRESETS["mini-p4"] = dataclasses.replace(DIT_PRESETS["mini"], patch_size=(1, 4, 4))
