"""Consistency-aware discriminator D_CA of StreamAvatar's adversarial refinement (§3.1.2, Fig. 3).

A copy of the teacher's backbone (an :class:`~dystream.models.dit.AvatarDiT`, initialised from the teacher's
weights as in APT and Self-Forcing's GAN, notes/distillation.md §1.3, §8) reads noisy latents
``[B, C, F, h, w]`` (frame 0 the clean reference, the others noised at the sampled sigma) with bidirectional
attention and the talk/listen audio. ``N_Q`` Q-Formers (BLIP-2 style, §4.1: N_Q = 3) are inserted after
intermediate blocks (``feature_layers``; Self-Forcing's GAN head taps blocks 13, 21, 29 of Wan's 30): each has
a few learnable queries that are instantiated **per frame** and cross-attend to the backbone tokens of that
frame only, so every latent frame gets its own feature. The N_Q query outputs of a frame are concatenated and
fused into one per-frame feature ``[B, F, feature_dim]``. Two heads read the features:

* **local realism branch**: a linear projection of each generated frame's feature to one logit,
  ``frame_logits [B, F - 1]`` (frames 1..F-1; the reference frame is the condition, not judged);
* **global consistency branch**: cross-attention from the reference frame's feature (query) to the features
  of all following frames (keys/values), then a linear projection to one logit per clip, ``global_logit [B]``.
  It "explicitly penalizes undesired deviation from the reference" (§3.1.2). The attention has no positional
  term, so the logit depends on the set of following frames, not on their order. ``global_branch=False`` is
  the paper's ablation "GAN w/o D_CA" (per-frame logits only).

The model has no loss code; :mod:`dystream.objectives.gan` turns the logits into the relativistic pairing loss
and the R1/R2 penalties. The backbone's output head and any blocks after the last tapped one never run here
(:meth:`ConsistencyAwareDiscriminator.unused_modules` lists them so a stage can freeze them). Exact R1/R2 need
a double backward through attention: run the forward inside :func:`dystream.objectives.gan.double_backward_attention`
(PyTorch's fused SDPA kernels have no second derivative).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dystream.models.dit import DIT_PRESETS, AvatarDiT, DiTConfig
from dystream.models.layers import LayerNorm32

__all__ = [
    "DiscriminatorConfig",
    "DiscriminatorOutput",
    "ConsistencyAwareDiscriminator",
    "DISCRIMINATOR_PRESETS",
    "default_feature_layers",
]


def default_feature_layers(num_layers: int, num_qformers: int) -> tuple[int, ...]:
    """``num_qformers`` evenly spaced block indices ending at the last block: ``round((k + 1) L / N) - 1``.

    For a backbone shallower than N_Q two Q-Formers may read the same block (distinct queries and weights).
    """
    return tuple(max(0, round((k + 1) * num_layers / num_qformers) - 1) for k in range(num_qformers))


@dataclass
class DiscriminatorConfig:
    """Typed config of :class:`ConsistencyAwareDiscriminator`; ``from_preset(name, backbone=..., **overrides)``."""

    backbone: DiTConfig = field(default_factory=lambda: DIT_PRESETS["tiny"])  # the teacher's config
    num_qformers: int = 3  # N_Q (StreamAvatar §4.1)
    feature_layers: tuple[int, ...] | None = None  # blocks whose output each Q-Former reads; None = evenly spaced
    queries_per_frame: int = 2  # learnable queries per Q-Former, instantiated for every latent frame
    qformer_dim: int = 64  # width of the queries (keys/values are projected from the backbone width)
    qformer_heads: int = 4
    qformer_layers: int = 1  # (self-attention, cross-attention, FFN) layers per Q-Former
    qformer_ffn_mult: int = 4
    feature_dim: int = 64  # per-frame feature after fusing the N_Q Q-Formers
    global_branch: bool = True  # False: the "GAN w/o D_CA" ablation (per-frame logits only)
    global_heads: int = 4
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):  # rebuilt from a JSON config
            self.backbone = DiTConfig(**self.backbone)
        if not isinstance(self.backbone, DiTConfig):
            raise ValueError(f"DiscriminatorConfig.backbone must be a DiTConfig, got {type(self.backbone).__name__}")
        for name in ("num_qformers", "queries_per_frame", "qformer_dim", "qformer_heads", "qformer_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("qformer_ffn_mult", "feature_dim", "global_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.qformer_dim % self.qformer_heads:
            raise ValueError(
                f"DiscriminatorConfig.qformer_dim={self.qformer_dim} must be divisible by "
                f"qformer_heads={self.qformer_heads}"
            )
        if self.feature_dim % self.global_heads:
            raise ValueError(
                f"DiscriminatorConfig.feature_dim={self.feature_dim} must be divisible by "
                f"global_heads={self.global_heads}"
            )
        n = self.backbone.num_layers
        if self.feature_layers is None:
            self.feature_layers = default_feature_layers(n, self.num_qformers)
        self.feature_layers = tuple(int(i) for i in self.feature_layers)
        if len(self.feature_layers) != self.num_qformers:
            raise ValueError(
                f"DiscriminatorConfig.feature_layers {self.feature_layers} must name one block per Q-Former "
                f"(num_qformers={self.num_qformers})"
            )
        if any(not 0 <= i < n for i in self.feature_layers) or list(self.feature_layers) != sorted(self.feature_layers):
            raise ValueError(
                f"DiscriminatorConfig.feature_layers must be non-decreasing block indices in [0, {n}) "
                f"(the backbone has {n} blocks), got {self.feature_layers}"
            )

    @classmethod
    def from_preset(cls, name: str, backbone: DiTConfig | None = None, **overrides) -> DiscriminatorConfig:
        """A preset's heads on ``backbone`` (the teacher's config; default: the preset's own backbone).

        The preset's ``feature_layers`` are kept only when they fit the given backbone's depth; otherwise they
        are recomputed (evenly spaced) unless overridden.
        """
        if name not in DISCRIMINATOR_PRESETS:
            raise KeyError(f"unknown discriminator preset {name!r}; available: {', '.join(DISCRIMINATOR_PRESETS)}")
        preset = DISCRIMINATOR_PRESETS[name]
        if "feature_layers" not in overrides:
            same_depth = backbone is None or backbone.num_layers == preset.backbone.num_layers
            if not same_depth or "num_qformers" in overrides:
                overrides["feature_layers"] = None  # recomputed for this depth / count
        return dataclasses.replace(preset, **({"backbone": backbone} if backbone is not None else {}), **overrides)


@dataclass
class DiscriminatorOutput:
    """Logits and features of one discriminator call.

    ``frame_logits [B, F - 1]`` (local realism, one per generated frame), ``global_logit [B]`` (global
    consistency; None when the branch is off), ``features [B, F, feature_dim]`` (per frame, frame 0 the reference).
    """

    frame_logits: Tensor
    global_logit: Tensor | None
    features: Tensor


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention from ``x [N, L, dim]`` to ``context [N, Lc, kv_dim]`` (no positions)."""

    def __init__(self, dim: int, kv_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (self.q(x), self.k(context), self.v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, L, d]
        return self.o(out.transpose(1, 2).flatten(-2))


class QFormerLayer(nn.Module):
    """BLIP-2 Q-Former layer: queries self-attend, cross-attend to image tokens, then an FFN (pre-norm)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, dim, heads)
        self.norm_cross = nn.LayerNorm(dim, eps=eps)
        self.norm_tokens = LayerNorm32(kv_dim, eps)  # backbone tokens are not normalised at block outputs
        self.cross_attn = Attention(dim, kv_dim, heads)
        self.norm_ffn = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, q: Tensor, tokens: Tensor) -> Tensor:
        # q [N, n_q, dim], tokens [N, S, kv_dim] with N = B F: every frame's queries see only that frame's tokens
        h = self.norm_self(q)
        q = q + self.self_attn(h, h)
        q = q + self.cross_attn(self.norm_cross(q), self.norm_tokens(tokens).to(q.dtype))
        return q + self.ffn(self.norm_ffn(q))


class FrameQFormer(nn.Module):
    """Learnable queries, instantiated per latent frame, reading one tapped block's tokens ``[B, F, S, dim]``."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        dim = cfg.qformer_dim
        self.queries = nn.Parameter(torch.randn(cfg.queries_per_frame, dim) * 0.02)  # BLIP-2's init scale
        self.layers = nn.ModuleList(
            QFormerLayer(dim, cfg.backbone.dim, cfg.qformer_heads, cfg.qformer_ffn_mult * dim, cfg.eps)
            for _ in range(cfg.qformer_layers)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        # tokens [B, F, S, dim] -> [B, F, n_q, qformer_dim]
        b, f = tokens.shape[:2]
        kv = tokens.flatten(0, 1)  # [B F, S, dim]
        q = self.queries.to(kv.dtype).expand(kv.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, kv)
        return q.unflatten(0, (b, f))


class GlobalConsistencyHead(nn.Module):
    """Cross-attention from the reference frame's feature to the following frames' features, then a linear logit."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.norm_ref = nn.LayerNorm(dim, eps=eps)
        self.norm_frames = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, dim, heads)
        self.norm_out = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, 1)

    def forward(self, features: Tensor) -> Tensor:
        # features [B, F, D]: frame 0 the reference -> [B]
        ref, frames = features[:, :1], features[:, 1:]
        h = ref + self.attn(self.norm_ref(ref), self.norm_frames(frames))  # [B, 1, D]
        return self.proj(self.norm_out(h))[:, 0, 0]


# --------------------------------------------------------------------------------------------------------------
# The discriminator
# --------------------------------------------------------------------------------------------------------------


class ConsistencyAwareDiscriminator(nn.Module):
    """Teacher backbone + per-frame Q-Formers + local/global heads; see the module docstring."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.backbone = AvatarDiT(cfg.backbone)
        self.qformers = nn.ModuleList(FrameQFormer(cfg) for _ in range(cfg.num_qformers))
        width = cfg.num_qformers * cfg.queries_per_frame * cfg.qformer_dim
        self.fuse = nn.Sequential(nn.LayerNorm(width, eps=cfg.eps), nn.Linear(width, cfg.feature_dim), nn.SiLU())
        self.local_head = nn.Linear(cfg.feature_dim, 1)
        self.global_head = (
            GlobalConsistencyHead(cfg.feature_dim, cfg.global_heads, cfg.eps) if cfg.global_branch else None
        )

    @classmethod
    def from_backbone(cls, backbone: AvatarDiT, config: DiscriminatorConfig | None = None, **overrides):
        """A discriminator whose backbone is a copy of ``backbone``'s weights (the teacher, §3.1.2, APT).

        ``config`` defaults to the tiny preset's heads on ``backbone.config``; ``overrides`` change head fields.
        """
        if config is None:
            config = DiscriminatorConfig.from_preset("tiny", backbone=backbone.config, **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if config.backbone != backbone.config:
            raise ValueError("ConsistencyAwareDiscriminator.from_backbone: config.backbone differs from the backbone's")
        model = cls(config)
        model.backbone.load_state_dict(backbone.state_dict(), strict=True)
        if backbone.fixed_text_context is not None:
            model.backbone.set_text_context(copy.deepcopy(backbone.fixed_text_context))
        return model.to(next(backbone.parameters()).device)

    def unused_modules(self) -> list[nn.Module]:
        """Backbone parts that never run here (output head, blocks after the last tapped one)."""
        last = max(self.config.feature_layers)
        return [self.backbone.head, *list(self.backbone.blocks)[last + 1 :]]

    def features(
        self,
        x: Tensor,
        sigma: Tensor,
        audio_talk: Tensor | None = None,
        audio_listen: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Per-frame features ``[B, F, feature_dim]`` of latents ``x [B, C, F, h, w]`` at noise ``sigma [B, F]``."""
        taps = self.backbone(
            x,
            sigma,
            audio_talk,
            audio_listen,
            context,
            "bidirectional",
            return_block_features=self.config.feature_layers,
        )
        queries = [qf(t) for qf, t in zip(self.qformers, taps, strict=True)]  # N_Q x [B, F, n_q, d]
        per_frame = torch.cat(queries, dim=2).flatten(2)  # [B, F, N_Q n_q d]
        return self.fuse(per_frame)

    def heads(self, features: Tensor) -> DiscriminatorOutput:
        """Local and global logits from per-frame features ``[B, F, D]`` (frame 0 the reference)."""
        if features.dim() != 3 or features.shape[1] < 2:
            raise ValueError(
                f"ConsistencyAwareDiscriminator: features must be [B, F >= 2, D] (reference + generated frames), "
                f"got {tuple(features.shape)}"
            )
        frame_logits = self.local_head(features[:, 1:])[..., 0]  # [B, F - 1]
        global_logit = self.global_head(features) if self.global_head is not None else None
        return DiscriminatorOutput(frame_logits, global_logit, features)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        audio_talk: Tensor | None = None,
        audio_listen: Tensor | None = None,
        context: Tensor | None = None,
    ) -> DiscriminatorOutput:
        """Judge latents ``x [B, C, F, h, w]`` (frame 0 the clean reference) at per-frame noise ``sigma [B, F]``.

        Args:
            x: noisy latents, real or generated, frame 0 the reference (sigma 0).
            sigma: ``[B, F]`` noise levels (the same for real and fake in a discriminator step).
            audio_talk, audio_listen: masked audio features as for :class:`AvatarDiT`, or None (unconditional).
            context: text context as for :class:`AvatarDiT`.
        """
        if x.dim() != 5 or x.shape[2] < 2:
            raise ValueError(
                f"ConsistencyAwareDiscriminator: x must be [B, C, F >= 2, h, w] (reference + generated frames), "
                f"got {tuple(x.shape)}"
            )
        return self.heads(self.features(x, sigma, audio_talk, audio_listen, context))


# --------------------------------------------------------------------------------------------------------------
# Presets (heads only: the backbone is the teacher's, passed as ``backbone=`` by the stage)
# --------------------------------------------------------------------------------------------------------------

DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    # CPU tests and the embedded default: tiny heads on the tiny DiT (2 blocks; N_Q = 3 Q-Formers read blocks
    # 0, 0, 1, evenly spaced ending at the last), 2 queries per frame and Q-Former.
    "tiny": DiscriminatorConfig(
        backbone=DIT_PRESETS["tiny"],
        num_qformers=3,
        queries_per_frame=2,
        qformer_dim=32,
        qformer_heads=2,
        feature_dim=32,
        global_heads=2,
    ),
    # Wan2.2-TI2V-5B backbone (30 blocks): taps after blocks 13, 21, 29 as Self-Forcing's GAN head
    # (notes/distillation.md §1.3); N_Q = 3 (StreamAvatar §4.1). The paper gives no head widths: ours are
    # 1024-wide Q-Formers (8 heads of 128, as Wan's head size) with 4 queries per frame, ~60M parameters in all.
    "wan2.2-ti2v-5b": DiscriminatorConfig(
        backbone=DIT_PRESETS["wan2.2-ti2v-5b"],
        num_qformers=3,
        feature_layers=(13, 21, 29),
        queries_per_frame=4,
        qformer_dim=1024,
        qformer_heads=8,
        feature_dim=1024,
        global_heads=8,
    ),
}
