"""Self-attention plans for the AvatarDiT: bidirectional, block-causal, and streaming with a KV cache.

StreamAvatar §3.1.1 re-architects the bidirectional teacher into a block-causal student and streams it with a
Reference Sink and Reference-Anchored Positional Re-encoding (RAPR). Everything that decides *which key frames a
query frame sees* and *at which RoPE index* lives here, in one place (:class:`CausalLayout`), and is used by both
the full-sequence training forward and the chunk-by-chunk streaming path, so the two agree by construction.

Latent layout (docs/architecture.md): frame 0 is the reference image (its own block of 1 frame), then chunks of
``C`` frames: chunk ``k >= 1`` holds frames ``1 + (k-1) C .. k C``.

Visibility of a query chunk starting at frame ``s`` (besides its own frames, seen bidirectionally):

* the **Reference Sink**: the reference frame and the first ``sink_chunks`` chunks,
  ``sink_frames = 1 + sink_chunks * C`` frames, never evicted;
* the **rolling window**: the most recent ``window_frames`` non-sink frames before ``s``
  (``None`` = all earlier frames, plain block-causal attention without eviction).

RoPE temporal indices (the spatial ones are the token grid, always ``0..h-1``, ``0..w-1``):

* without RAPR every frame uses its absolute index; a stream whose index would reach the table size
  (Wan2.2: 1024) is refused with a clear error before anything overflows;
* with RAPR the chunk's first frame gets ``a = min(s, D)`` and the chunk keeps consecutive indices
  ``a .. a + C - 1``; a cached non-sink frame ``f`` is re-indexed to ``a - (s - f)`` (true relative distance);
  sink frames keep their own indices ``0 .. sink_frames - 1`` (the anchor). With the paper's numbers
  (C = 3, sink = 1 + 3 = 4, window = 6, D = 10) every chunk after the window fills sees reference 0,
  first chunk 1-3, window 4-9, itself 10-12; no index ever exceeds ``D + C - 1``.

Requiring ``D >= sink_frames + window_frames`` keeps re-indexed window frames from landing on (or before) the
sink's indices, so the temporal order of all visible frames is preserved.

Cost of the full-sequence block-causal forward: with RAPR the roped keys differ per query chunk, so one roped K
cannot serve every query; we group query chunks that see the same number of key frames (after the window fills
they all do) and run one SDPA call per group over gathered, re-roped keys. That is the same attention FLOPs as
streaming (``C x (sink + window + C)`` frames per chunk, linear in the number of chunks) and, unlike a dense
masked call, never materialises an ``L x L`` mask; the price is a copy of the visible K/V per query chunk
(about ``(sink + window + C) / C`` times the layer's K/V, 13/3 with paper numbers). Without RAPR a single roped
K would do; on CUDA with ``attention_backend="flex"`` that case runs as one FlexAttention call with a block mask.

Streaming API (see :class:`KVCache`): the caller owns the cache; :class:`StreamingAttention` attends a chunk to
the cached (un-roped) keys plus itself and, only if asked, appends the chunk's K/V once the whole forward is done
(deferred commit, so activation-checkpoint recomputation cannot write twice). Eviction keeps exactly
``CausalLayout.visible_frames(next_frame)``, i.e. the same set the training mask uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dystream.models.rope import Rope3D, apply_rope

__all__ = [
    "CausalLayout",
    "KVCache",
    "BidirectionalAttention",
    "BlockCausalAttention",
    "StreamingAttention",
]


@dataclass(frozen=True)
class CausalLayout:
    """Chunking, sink, window and RoPE indexing of the block-causal student (StreamAvatar §3.1.1, §4.1).

    Args:
        chunk_frames: latent frames per generation chunk ``C`` (paper: 3).
        sink_chunks: generation chunks kept in the Reference Sink besides the reference frame (paper: 1).
        window_frames: non-sink past frames kept in the rolling window (paper: 6); ``None`` = unlimited.
            Must be a multiple of ``chunk_frames`` so that eviction drops whole chunks.
        rapr: use Reference-Anchored Positional Re-encoding (needs a finite window).
        rapr_max_distance: ``D``, the cap on the current chunk's start index (paper: 10);
            must be ``>= sink_frames + window_frames``.
        rope_max_positions: RoPE table length (Wan2.2: 1024).
        reference_sink: keep the reference frame in the sink (default). ``False`` is the Self-Forcing baseline
            of StreamAvatar Table 1 (no sink): needs ``sink_chunks = 0``; the cache is then a pure rolling window
            of the last ``window_frames`` frames, the reference included until the window evicts it.
    """

    chunk_frames: int = 3
    sink_chunks: int = 1
    window_frames: int | None = 6
    rapr: bool = True
    rapr_max_distance: int = 10
    rope_max_positions: int = 1024
    reference_sink: bool = True

    def __post_init__(self) -> None:
        c = self.chunk_frames
        if c < 1:
            raise ValueError(f"CausalLayout.chunk_frames must be >= 1, got {c}")
        if self.sink_chunks < 0:
            raise ValueError(f"CausalLayout.sink_chunks must be >= 0, got {self.sink_chunks}")
        if not self.reference_sink and self.sink_chunks != 0:
            raise ValueError(
                f"CausalLayout.reference_sink=False (no Reference Sink) needs sink_chunks=0, got {self.sink_chunks}: "
                "a sink of generated chunks without the reference is not a layout of the paper"
            )
        if self.window_frames is not None and (self.window_frames < 0 or self.window_frames % c != 0):
            raise ValueError(
                f"CausalLayout.window_frames must be None or a non-negative multiple of chunk_frames={c} "
                f"(eviction drops whole chunks), got {self.window_frames}"
            )
        if self.rapr:
            if self.window_frames is None:
                raise ValueError("CausalLayout.rapr needs a finite window_frames (RAPR caps a rolling window)")
            need = self.sink_frames + self.window_frames
            if self.rapr_max_distance < need:
                raise ValueError(
                    f"CausalLayout.rapr_max_distance={self.rapr_max_distance} must be >= sink_frames + "
                    f"window_frames = {need}, otherwise re-indexed window frames collide with the sink's indices"
                )
            if self.rapr_max_distance + c > self.rope_max_positions:
                raise ValueError(
                    f"CausalLayout.rapr_max_distance + chunk_frames = {self.rapr_max_distance + c} exceeds "
                    f"rope_max_positions={self.rope_max_positions}"
                )

    @property
    def sink_frames(self) -> int:
        """Frames never evicted: the reference + ``sink_chunks`` chunks; 0 without a reference sink."""
        if not self.reference_sink:
            return 0
        return 1 + self.sink_chunks * self.chunk_frames

    @property
    def max_cached_frames(self) -> int | None:
        """Frames a full cache holds (sink + window), ``None`` if the window is unlimited."""
        return None if self.window_frames is None else self.sink_frames + self.window_frames

    @property
    def max_rope_index(self) -> int | None:
        """Largest temporal RoPE index a RAPR stream can use (``D + C - 1``); ``None`` without RAPR."""
        return self.rapr_max_distance + self.chunk_frames - 1 if self.rapr else None

    def chunk_size(self, start: int) -> int:
        """Frames of the chunk that starts at ``start`` (the reference block is 1 frame)."""
        if start == 0:
            return 1
        if (start - 1) % self.chunk_frames != 0:
            raise ValueError(f"frame {start} is not a chunk start (chunks start at 0, 1, 1 + C, ...)")
        return self.chunk_frames

    def chunks(self, num_frames: int) -> list[tuple[int, int]]:
        """``(start, size)`` of every block of a sequence of ``num_frames = 1 + k C`` latent frames."""
        if num_frames < 1 or (num_frames - 1) % self.chunk_frames != 0:
            raise ValueError(
                f"block-causal attention needs F = 1 + k * chunk_frames latent frames (reference + k chunks of "
                f"{self.chunk_frames}), got F={num_frames}"
            )
        return [(0, 1)] + [(s, self.chunk_frames) for s in range(1, num_frames, self.chunk_frames)]

    def visible_frames(self, start: int) -> list[int]:
        """Past frames (sorted) that the chunk starting at ``start`` attends to: sink + rolling window."""
        sink = list(range(min(start, self.sink_frames)))
        lo = self.sink_frames if self.window_frames is None else max(self.sink_frames, start - self.window_frames)
        return sink + list(range(lo, start))

    def positions(self, start: int, size: int, past: list[int]) -> tuple[list[int], list[int]]:
        """RoPE temporal indices ``(query, keys)`` for a chunk; keys are ``past`` followed by the chunk itself."""
        if self.rapr:
            anchor = min(start, self.rapr_max_distance)
            past_pos = [f if f < self.sink_frames else anchor - (start - f) for f in past]
        else:
            anchor = start
            past_pos = list(past)
        query = list(range(anchor, anchor + size))
        return query, past_pos + query

    def check_stream_position(self, start: int, size: int) -> None:
        """Refuse a chunk whose absolute RoPE index would leave the table (only possible without RAPR)."""
        if not self.rapr and start + size > self.rope_max_positions:
            raise ValueError(
                f"latent frame {start + size - 1} would need RoPE index {start + size - 1}, but the table holds "
                f"{self.rope_max_positions} positions (0..{self.rope_max_positions - 1}); without RAPR a stream "
                f"cannot exceed {self.rope_max_positions} latent frames: enable DiTConfig.rapr "
                "(Reference-Anchored Positional Re-encoding) for unbounded streaming"
            )


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """``[N, Lq, H, d] x [N, Lk, H, d] -> [N, Lq, H, d]`` scaled dot-product attention (scale 1/sqrt(d)).

    ``key_mask [N, Lk]`` (bool, True = attend) hides keys; every row needs at least one visible key.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _attend_frames(q: Tensor, k: Tensor, v: Tensor, q_rope: tuple[Tensor, Tensor], k_rope: tuple[Tensor, Tensor]):
    """Attention over frame-major token grids: ``q [N, n, S, H, d]``, ``k, v [N, m, S, H, d]`` -> ``[N, n, S, H, d]``.

    RoPE factors are ``[.., n|m, S, d/2]`` broadcastable against the leading dims of q / k.
    """
    n, s = q.shape[1], q.shape[2]
    q = apply_rope(q, *q_rope).flatten(1, 2)
    k = apply_rope(k, *k_rope).flatten(1, 2)
    out = _sdpa(q, k, v.flatten(1, 2))
    return out.unflatten(1, (n, s))


class BidirectionalAttention:
    """Teacher attention: every frame sees every frame, RoPE at absolute indices ``0..F-1`` (Wan2.2)."""

    def __init__(self, num_frames: int, grid: tuple[int, int], rope: Rope3D, device: torch.device) -> None:
        pos = torch.arange(num_frames, device=device)
        rope.check(pos)
        self.rope_qk = rope.cos_sin(pos, *grid)  # [F, S, c]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _attend_frames(q, k, v, self.rope_qk, self.rope_qk)


@dataclass
class _Group:
    """Query chunks that see the same number of key frames, batched into one SDPA call."""

    q_frames: Tensor  # [G, n] long
    k_frames: Tensor  # [G, m] long (past frames then the chunk's own)
    q_rope: tuple[Tensor, Tensor]  # [G, n, S, c]
    k_rope: tuple[Tensor, Tensor]  # [G, m, S, c]


class BlockCausalAttention:
    """Full-sequence block-causal attention with the same sink, window and RAPR indices as streaming.

    ``records`` lists, per block ``(start, size)``, the visible key frames and the RoPE indices used, so tests
    and tools can inspect the layout.
    """

    def __init__(
        self,
        layout: CausalLayout,
        num_frames: int,
        grid: tuple[int, int],
        rope: Rope3D,
        device: torch.device,
        backend: str = "sdpa",
    ) -> None:
        self.layout = layout
        self.grid = grid
        self.records: list[dict] = []
        by_shape: dict[tuple[int, int], list[tuple[list[int], list[int], list[int], list[int]]]] = {}
        for start, size in layout.chunks(num_frames):
            past = layout.visible_frames(start)
            qpos, kpos = layout.positions(start, size, past)
            rope.check(kpos)
            own = list(range(start, start + size))
            keys = past + own
            self.records.append({"start": start, "size": size, "key_frames": keys, "q_pos": qpos, "k_pos": kpos})
            by_shape.setdefault((size, len(keys)), []).append((own, keys, qpos, kpos))

        # FlexAttention path: one call with a block mask; only valid when one roped K serves all queries
        self.use_flex = backend == "flex" and device.type == "cuda" and not layout.rapr
        if self.use_flex:
            self._init_flex(num_frames, grid, rope, device)
            return

        self.groups: list[_Group] = []
        order: list[int] = []
        for rows in by_shape.values():
            as_tensor = [torch.tensor([r[i] for r in rows], device=device) for i in range(4)]
            q_frames, k_frames, qpos, kpos = as_tensor
            self.groups.append(_Group(q_frames, k_frames, rope.cos_sin(qpos, *grid), rope.cos_sin(kpos, *grid)))
            order.extend(q_frames.flatten().tolist())
        # outputs come out group by group; this permutation puts frames back in sequence order
        self.inverse_order = torch.argsort(torch.tensor(order, device=device))

    def _init_flex(self, num_frames: int, grid: tuple[int, int], rope: Rope3D, device: torch.device) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        visible = torch.zeros(num_frames, num_frames, dtype=torch.bool, device=device)
        for rec in self.records:
            for f in range(rec["start"], rec["start"] + rec["size"]):
                visible[f, rec["key_frames"]] = True
        tokens = grid[0] * grid[1]

        def mask_mod(b, h, q_idx, kv_idx):
            return visible[q_idx // tokens, kv_idx // tokens]

        length = num_frames * tokens
        self.block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
        self.rope_qk = rope.cos_sin(torch.arange(num_frames, device=device), *grid)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.use_flex:
            return self._flex(q, k, v)
        b = q.shape[0]
        outs = []
        for g in self.groups:
            # gather [B, G, n|m, S, H, d]; RoPE factors [G, ...] broadcast over the batch
            qg = apply_rope(q[:, g.q_frames], *g.q_rope)
            kg = apply_rope(k[:, g.k_frames], *g.k_rope)
            vg = v[:, g.k_frames]
            n, s = qg.shape[2], qg.shape[3]
            og = _sdpa(qg.flatten(0, 1).flatten(1, 2), kg.flatten(0, 1).flatten(1, 2), vg.flatten(0, 1).flatten(1, 2))
            outs.append(og.unflatten(0, (b, -1)).unflatten(2, (n, s)).flatten(1, 2))  # [B, G n, S, H, d]
        return torch.cat(outs, dim=1)[:, self.inverse_order]

    def _flex(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, s = q.shape[1], q.shape[2]
        q = apply_rope(q, *self.rope_qk).flatten(1, 2).transpose(1, 2)
        k = apply_rope(k, *self.rope_qk).flatten(1, 2).transpose(1, 2)
        out = _compiled_flex()(q, k, v.flatten(1, 2).transpose(1, 2), block_mask=self.block_mask)
        return out.transpose(1, 2).unflatten(1, (n, s))


_FLEX = None


def _compiled_flex():
    """FlexAttention compiled once per process (uncompiled flex is a slow reference implementation)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


@dataclass
class KVCache:
    """Per-stream self-attention cache, owned by the caller (create it with ``AvatarDiT.new_kv_cache``).

    Holds, for every DiT block, the keys (after qk-norm, *before* RoPE) and values of the cached latent frames,
    frame-major ``[B, frames, tokens_per_frame, heads, head_dim]``. ``frame_ids`` are the absolute latent indices
    of the cached frames (sink first, then the rolling window, both sorted); ``next_frame`` is where the next
    chunk starts. After the window fills, the cache holds exactly ``layout.max_cached_frames`` frames, so its
    memory is constant. Writes are detached by default (gradients do not cross chunks through the cache).

    ``max_rope_index`` is the largest temporal RoPE index used by any attention call on this stream;
    ``last_query_positions`` / ``last_key_positions`` / ``last_key_frames`` describe the most recent call.
    """

    layout: CausalLayout
    num_layers: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    detach: bool = True
    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    frame_ids: list[int] = field(default_factory=list)
    next_frame: int = 0
    tokens_per_frame: int | None = None
    max_rope_index: int = -1
    last_query_positions: list[int] = field(default_factory=list)
    last_key_positions: list[int] = field(default_factory=list)
    last_key_frames: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_layers < 1:
            raise ValueError(
                f"KVCache needs batch_size >= 1 and num_layers >= 1, got {self.batch_size}, {self.num_layers}"
            )
        self.device = torch.device(self.device)
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def num_frames(self) -> int:
        return len(self.frame_ids)

    def nbytes(self) -> int:
        """Bytes held by cached keys and values over all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def reset(self) -> None:
        """Forget the stream (start again from the reference frame)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.frame_ids = []
        self.next_frame = 0
        self.tokens_per_frame = None
        self.max_rope_index = -1

    @torch.compiler.disable
    def append(self, new_kv: list[tuple[Tensor, Tensor]], start: int, size: int) -> None:
        """Append one chunk's un-roped K/V (``[B, size, S, H, d]`` per layer) and evict to the layout's window.

        Runs eagerly under ``torch.compile`` and stores copies: the cache must own its tensors, because a CUDA
        graph (``StreamingConfig.compile``) writes its outputs into buffers that its next replay overwrites.
        """
        if start != self.next_frame:
            raise ValueError(f"KVCache.append: chunk starts at {start}, the stream expects {self.next_frame}")
        if len(new_kv) != self.num_layers:
            raise ValueError(f"KVCache.append: got K/V for {len(new_kv)} layers, the cache has {self.num_layers}")
        frames = self.frame_ids + list(range(start, start + size))
        keep = self.layout.visible_frames(start + size)
        select = None if keep == frames else torch.tensor([frames.index(f) for f in keep], device=self.device)
        for i, (k_new, v_new) in enumerate(new_kv):
            pair = []
            for old, new in ((self.keys[i], k_new), (self.values[i], v_new)):
                new = new.detach() if self.detach else new
                new = new.to(device=self.device, dtype=self.dtype)
                t = new.clone() if old is None else torch.cat([old, new], dim=1)
                pair.append(t if select is None else t.index_select(1, select))
            self.keys[i], self.values[i] = pair
        self.frame_ids = keep
        self.next_frame = start + size


class StreamingAttention:
    """Attention of one chunk against a :class:`KVCache`; call :meth:`commit` after the forward to write it."""

    def __init__(self, cache: KVCache, size: int, grid: tuple[int, int], rope: Rope3D, write: bool) -> None:
        layout = cache.layout
        start = cache.next_frame
        layout.check_stream_position(start, size)
        past = list(cache.frame_ids)
        if past != layout.visible_frames(start):  # invariant kept by KVCache.append; guards hand-edited caches
            raise RuntimeError(f"KVCache holds frames {past}, expected {layout.visible_frames(start)} at {start}")
        qpos, kpos = layout.positions(start, size, past)
        rope.check(kpos)
        device = cache.device
        self.q_rope = rope.cos_sin(torch.tensor(qpos, device=device), *grid)  # [n, S, c]
        self.k_rope = rope.cos_sin(torch.tensor(kpos, device=device), *grid)  # [m, S, c]
        self.cache, self.start, self.size, self.write = cache, start, size, write
        # the cache as this chunk sees it: activation checkpointing recomputes a block in the backward pass, after
        # commit() moved the cache on; KVCache.append builds new tensors, so these references stay valid
        self.context = list(zip(cache.keys, cache.values, strict=True))
        self.pending: list[tuple[Tensor, Tensor] | None] = [None] * cache.num_layers
        cache.last_query_positions, cache.last_key_positions = qpos, kpos
        cache.last_key_frames = past + list(range(start, start + size))
        cache.max_rope_index = max(cache.max_rope_index, max(kpos))

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.write:
            self.pending[layer] = (k, v)  # un-roped; re-assigning on checkpoint recompute is harmless
        ck, cv = self.context[layer]
        if ck is not None:
            k = torch.cat([ck.to(k.dtype), k], dim=1)
            v = torch.cat([cv.to(v.dtype), v], dim=1)
        return _attend_frames(q, k, v, self.q_rope, self.k_rope)

    def commit(self) -> None:
        """Append the chunk's K/V to the cache (only if created with ``write=True``)."""
        if not self.write:
            return
        if any(p is None for p in self.pending):
            raise RuntimeError("StreamingAttention.commit: some layers did not run")
        self.cache.append(self.pending, self.start, self.size)  # type: ignore[arg-type]
        self.pending = [None] * self.cache.num_layers
