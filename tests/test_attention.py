"""Block-causal layout, RAPR indices, RoPE and the KV cache, each against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

from dystream.models.attention import (
    BidirectionalAttention,
    BlockCausalAttention,
    CausalLayout,
    KVCache,
    StreamingAttention,
)
from dystream.models.rope import Rope3D, apply_rope

PAPER = CausalLayout(chunk_frames=3, sink_chunks=1, window_frames=6, rapr=True, rapr_max_distance=10)


# ------------------------------------------------------------------------------------------------ layout


def test_paper_layout_identity():
    """StreamAvatar §4.1 numbers: once the window is full every chunk sees ref 0, first chunk 1-3, window 4-9,
    itself 10-12, and its keys are the true frames (sink + the 6 frames right before it)."""
    assert PAPER.sink_frames == 4 and PAPER.max_rope_index == 12
    for k in range(4, 60):
        start = 1 + (k - 1) * 3
        past = PAPER.visible_frames(start)
        assert past == [0, 1, 2, 3] + list(range(start - 6, start))
        q, kpos = PAPER.positions(start, 3, past)
        assert q == [10, 11, 12]
        assert kpos == list(range(13))


def test_layout_before_window_fills_is_absolute():
    for start in (0, 1, 4, 7, 10):
        size = PAPER.chunk_size(start)
        past = PAPER.visible_frames(start)
        assert past == list(range(start))  # nothing evicted yet
        q, k = PAPER.positions(start, size, past)
        assert q == list(range(start, start + size)) and k == list(range(start + size))


def test_layout_without_rapr_uses_absolute_indices_and_guards_table():
    lay = CausalLayout(chunk_frames=3, sink_chunks=1, window_frames=6, rapr=False, rope_max_positions=1024)
    past = lay.visible_frames(100)
    assert lay.positions(100, 3, past) == ([100, 101, 102], past + [100, 101, 102])
    lay.check_stream_position(1021, 3)  # frames 1021..1023 fit
    with pytest.raises(ValueError, match="enable DiTConfig.rapr"):
        lay.check_stream_position(1024, 3)


def test_layout_unlimited_window_is_plain_block_causal():
    lay = CausalLayout(chunk_frames=2, sink_chunks=0, window_frames=None, rapr=False)
    assert lay.visible_frames(7) == list(range(7))
    assert lay.chunks(7) == [(0, 1), (1, 2), (3, 2), (5, 2)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window_frames": 4}, "multiple of chunk_frames"),
        ({"chunk_frames": 0}, "chunk_frames"),
        ({"sink_chunks": -1}, "sink_chunks"),
        ({"window_frames": None}, "finite window_frames"),
        ({"rapr_max_distance": 9}, "sink_frames \\+ window_frames"),
        ({"rope_max_positions": 12}, "rope_max_positions"),
    ],
)
def test_layout_rejects_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLayout(**{**dict(chunk_frames=3, sink_chunks=1, window_frames=6, rapr=True), **kwargs})


def test_chunks_reject_bad_frame_count():
    with pytest.raises(ValueError, match="F = 1 \\+ k \\* chunk_frames"):
        PAPER.chunks(6)


# ------------------------------------------------------------------------------------------------ RoPE


def _wan_style_rope(x, frame_pos, h, w, head_dim, theta=10000.0):
    """Independent complex-number RoPE in Wan2.2's split (t: c - 2(c//3) pairs, h, w: c//3 pairs each)."""
    c = head_dim // 2
    sizes = [c - 2 * (c // 3), c // 3, c // 3]

    def table(pos, pairs):
        inv = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        return torch.polar(torch.ones(len(pos), pairs, dtype=torch.float64), torch.outer(pos.double(), inv))

    tt = table(frame_pos, sizes[0])[:, None, None].expand(-1, h, w, -1)
    th = table(torch.arange(h), sizes[1])[None, :, None].expand(len(frame_pos), -1, w, -1)
    tw = table(torch.arange(w), sizes[2])[None, None, :].expand(len(frame_pos), h, -1, -1)
    rot = torch.cat([tt, th, tw], dim=-1).reshape(len(frame_pos), h * w, 1, c)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], c, 2))
    return torch.view_as_real(xc * rot).flatten(-2).float()


def test_rope_matches_complex_reference():
    rope = Rope3D(head_dim=16)
    pos = torch.tensor([0, 3, 10, 1023])
    x = torch.randn(4, 6, 2, 16)  # [F, S=(2x3), H, d]
    cos, sin = rope.cos_sin(pos, 2, 3)
    torch.testing.assert_close(apply_rope(x, cos, sin), _wan_style_rope(x, pos, 2, 3, 16), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_temporal_distance():
    rope = Rope3D(head_dim=24)
    q, k = torch.randn(1, 4, 3, 24), torch.randn(1, 4, 3, 24)

    def score(a, b):
        qa = apply_rope(q, *rope.cos_sin(torch.tensor([a]), 2, 2))
        kb = apply_rope(k, *rope.cos_sin(torch.tensor([b]), 2, 2))
        return (qa * kb).sum(-1)

    torch.testing.assert_close(score(12, 5), score(107, 100), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(12, 5), score(12, 6), atol=1e-3)


def test_rope_refuses_index_beyond_table():
    rope = Rope3D(head_dim=16, max_positions=32)
    with pytest.raises(ValueError, match="outside the table of 32"):
        rope.cos_sin(torch.tensor([31, 32]), 2, 2)
    with pytest.raises(ValueError, match="head_dim"):
        Rope3D(head_dim=4)


# ------------------------------------------------------------------------------------------------ attention


def _naive_attention(layout, q, k, v, rope, grid):
    """Frame-by-frame softmax attention with the layout's visible frames and positions (no grouping, no SDPA)."""
    b, f, s, h, d = q.shape
    out = torch.zeros_like(q)
    for start, size in layout.chunks(f):
        past = layout.visible_frames(start)
        keys = past + list(range(start, start + size))
        qpos, kpos = layout.positions(start, size, past)
        qr = apply_rope(q[:, start : start + size], *rope.cos_sin(torch.tensor(qpos), *grid))
        kr = apply_rope(k[:, keys], *rope.cos_sin(torch.tensor(kpos), *grid))
        qf = qr.reshape(b, -1, h, d)
        kf = kr.reshape(b, -1, h, d)
        vf = v[:, keys].reshape(b, -1, h, d)
        att = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(d)
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), vf)
        out[:, start : start + size] = o.reshape(b, size, s, h, d)
    return out


@pytest.mark.parametrize(
    "layout",
    [
        PAPER,
        CausalLayout(chunk_frames=2, sink_chunks=0, window_frames=2, rapr=True, rapr_max_distance=3),
        CausalLayout(chunk_frames=2, sink_chunks=1, window_frames=4, rapr=False),
        CausalLayout(chunk_frames=3, sink_chunks=1, window_frames=None, rapr=False),
    ],
)
def test_block_causal_matches_naive_per_frame_attention(layout):
    rope, grid = Rope3D(8), (2, 2)
    f = 1 + 7 * layout.chunk_frames
    q, k, v = (torch.randn(2, f, 4, 2, 8) for _ in range(3))
    plan = BlockCausalAttention(layout, f, grid, rope, torch.device("cpu"))
    torch.testing.assert_close(plan(0, q, k, v), _naive_attention(layout, q, k, v, rope, grid), atol=1e-5, rtol=1e-5)


def test_block_causal_without_rapr_equals_one_masked_call():
    """Without RAPR the grouped computation equals a single SDPA over absolute-roped tokens with a frame mask."""
    layout = CausalLayout(chunk_frames=2, sink_chunks=1, window_frames=2, rapr=False)
    rope, grid, f = Rope3D(8), (1, 3), 9
    q, k, v = (torch.randn(1, f, 3, 2, 8) for _ in range(3))
    out = BlockCausalAttention(layout, f, grid, rope, torch.device("cpu"))(0, q, k, v)
    cs = rope.cos_sin(torch.arange(f), *grid)
    qa, ka = apply_rope(q, *cs).flatten(1, 2), apply_rope(k, *cs).flatten(1, 2)
    vis = torch.zeros(f, f, dtype=torch.bool)
    for start, size in layout.chunks(f):
        for i in range(start, start + size):
            vis[i, layout.visible_frames(start) + list(range(start, start + size))] = True
    mask = vis.repeat_interleave(3, 0).repeat_interleave(3, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        qa.transpose(1, 2), ka.transpose(1, 2), v.flatten(1, 2).transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(out.flatten(1, 2), ref, atol=1e-5, rtol=1e-5)


def test_bidirectional_is_full_attention_at_absolute_positions():
    rope, grid, f = Rope3D(8), (2, 1), 4
    q, k, v = (torch.randn(1, f, 2, 1, 8) for _ in range(3))
    out = BidirectionalAttention(f, grid, rope, torch.device("cpu"))(0, q, k, v)
    full = CausalLayout(chunk_frames=f - 1, sink_chunks=0, window_frames=None, rapr=False)
    # one chunk of F-1 frames after the reference sees everything; the reference row differs, so compare rows 1:
    ref = _naive_attention(full, q, k, v, rope, grid)
    torch.testing.assert_close(out[:, 1:], ref[:, 1:], atol=1e-5, rtol=1e-5)


def test_streaming_plan_matches_block_causal_and_cache_stays_constant():
    layout = CausalLayout(chunk_frames=2, sink_chunks=1, window_frames=2, rapr=True, rapr_max_distance=5)
    rope, grid, f = Rope3D(8), (2, 2), 1 + 2 * 6
    q, k, v = (torch.randn(1, f, 4, 2, 8) for _ in range(3))
    ref = BlockCausalAttention(layout, f, grid, rope, torch.device("cpu"))(0, q, k, v)
    cache = KVCache(layout, num_layers=1, batch_size=1, device="cpu", dtype=torch.float32)
    sizes = []
    for start, size in layout.chunks(f):
        sl = slice(start, start + size)
        noop = StreamingAttention(cache, size, grid, rope, write=False)  # a denoising step: attends, never writes
        noop(0, torch.randn_like(q[:, sl]), torch.randn_like(k[:, sl]), torch.randn_like(v[:, sl]))
        noop.commit()
        plan = StreamingAttention(cache, size, grid, rope, write=True)
        torch.testing.assert_close(plan(0, q[:, sl], k[:, sl], v[:, sl]), ref[:, sl], atol=1e-5, rtol=1e-5)
        plan.commit()
        sizes.append((cache.num_frames, cache.nbytes()))
        assert cache.frame_ids[:3] == [0, 1, 2][: cache.num_frames]  # the sink is never evicted
    assert sizes[-1] == sizes[-2] == sizes[-3]
    assert sizes[-1][0] == layout.max_cached_frames == 5
    assert cache.max_rope_index <= layout.max_rope_index


def test_kv_cache_refuses_out_of_order_writes():
    cache = KVCache(PAPER, num_layers=1, batch_size=1, device="cpu", dtype=torch.float32)
    kv = (torch.zeros(1, 3, 1, 1, 8), torch.zeros(1, 3, 1, 1, 8))
    with pytest.raises(ValueError, match="expects 0"):
        cache.append([kv], start=1, size=3)
    with pytest.raises(ValueError, match="layers"):
        cache.append([kv, kv], start=0, size=1)


def test_kv_cache_owns_what_it_stores():
    # StreamingConfig.compile replays a CUDA graph whose outputs live in buffers the next replay overwrites; the
    # cache must hold copies, never the caller's tensors (on a GPU: tests/test_compile.py, make gpu-check)
    layout = CausalLayout(chunk_frames=2, sink_chunks=1, window_frames=2)
    cache = KVCache(layout, num_layers=1, batch_size=1, device="cpu", dtype=torch.float32)
    for start, size in layout.chunks(1 + 2 * 3):
        k, v = torch.randn(1, size, 4, 2, 8), torch.randn(1, size, 4, 2, 8)
        cache.append([(k, v)], start, size)
        kept = (cache.keys[0], cache.values[0])
        k.zero_(), v.zero_()  # what a replay does to its output buffers
        assert all(t.abs().sum() > 0 for t in kept), f"chunk at {start}: the cache aliases the written K/V"
