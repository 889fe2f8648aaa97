"""AvatarDiT: streaming == block-causal, RAPR over long streams, audio causality, Wan2.2 parity and key names."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dystream.models.adapters import load_wan22_state_dict
from dystream.models.dit import AvatarDiT, DiTConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops are faster on one thread than on two contended ones; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomize(model: AvatarDiT, std: float = 0.05) -> AvatarDiT:
    """Give zero-initialised tensors (head, audio outputs) random values, as after some training."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().any():
                p.normal_(0.0, std)
    return model


def _model(**overrides) -> AvatarDiT:
    return _randomize(AvatarDiT(DiTConfig.from_preset("tiny", **overrides)).eval())


def _inputs(cfg: DiTConfig, n_chunks: int, batch: int = 2, hw: int = 8):
    f = 1 + n_chunks * cfg.chunk_frames
    x = torch.randn(batch, cfg.in_channels, f, hw, hw)
    sigma = torch.rand(batch, f)
    sigma[:, 0] = 0.0  # the reference frame is clean
    t = cfg.frames_per_latent * (f - 1)
    return x, sigma, torch.randn(batch, t, cfg.audio_dim), torch.randn(batch, t, cfg.audio_dim)


def _stream(model: AvatarDiT, x, sigma, talk, listen, denoise_steps: int = 0):
    """Push the reference, then every chunk; optional extra non-writing calls on other inputs before each write."""
    cfg = model.config
    cache = model.new_kv_cache(x.shape[0])
    outs = [model.forward_chunk(x[:, :, :1], sigma[:, :1], None, None, cache)]
    for start in range(1, x.shape[2], cfg.chunk_frames):
        sl = slice(start, start + cfg.chunk_frames)
        a_t = model.audio_window(talk, start, cfg.chunk_frames)
        a_l = model.audio_window(listen, start, cfg.chunk_frames)
        for _ in range(denoise_steps):  # SiD-style denoising steps: attend to the cache, never write it
            model.forward_chunk(
                torch.randn_like(x[:, :, sl]), torch.rand_like(sigma[:, sl]), a_t, a_l, cache, write_cache=False
            )
        outs.append(model.forward_chunk(x[:, :, sl], sigma[:, sl], a_t, a_l, cache))
    return torch.cat(outs, dim=2), cache


# ------------------------------------------------------------------------------------------------ streaming parity


@pytest.mark.parametrize(
    "overrides, n_chunks",
    [
        ({}, 1),  # paper layout (sink 4, window 6, D 10), before eviction
        ({}, 6),  # paper layout past eviction (window full from chunk 4)
        ({"window_frames": 3, "rapr_max_distance": 7}, 5),  # small window: evicts from chunk 3
        ({"sink_chunks": 0, "window_frames": 3, "rapr_max_distance": 4}, 4),  # sink = reference only
        ({"rapr": False, "window_frames": 3}, 5),  # absolute indices with eviction
        ({"rapr": False, "window_frames": None}, 3),  # plain block-causal, no eviction
        ({"rapr": False, "attention_backend": "flex"}, 3),  # flex is CUDA-only: on CPU the SDPA path runs
        ({"patch_size": (1, 4, 4), "in_channels": 4, "out_channels": 4}, 6),  # 4x4 patches on tiny-f4 latents
        ({"audio_lookbehind_frames": 8}, 4),  # chunks hear 8 frames of the previous chunk's audio
        ({"audio_lookbehind_frames": 13, "window_frames": 3, "rapr_max_distance": 7}, 5),  # further than a chunk
        ({"audio_lookbehind_frames": 8, "talk_lookbehind_frames": 2}, 4),  # the own voice's window narrower
    ],
)
def test_streaming_equals_block_causal_forward(overrides, n_chunks):
    model = _model(**overrides)
    x, sigma, talk, listen = _inputs(model.config, n_chunks, hw=4 * model.config.patch_size[-1])
    with torch.no_grad():
        full = model(x, sigma, talk, listen, attention="block_causal")
        streamed, cache = _stream(model, x, sigma, talk, listen, denoise_steps=1)
    assert streamed.shape == full.shape == x.shape
    assert (streamed - full).abs().max() <= 1e-5
    assert cache.next_frame == x.shape[2]


def test_block_causal_outputs_ignore_future_frames_but_bidirectional_does_not():
    model = _model()
    x, sigma, talk, listen = _inputs(model.config, 3)
    x2 = x.clone()
    x2[:, :, 7:] += 1.0  # change the last chunk only
    with torch.no_grad():
        a, b = (model(v, sigma, talk, listen, attention="block_causal") for v in (x, x2))
        c, d = (model(v, sigma, talk, listen, attention="bidirectional") for v in (x, x2))
    assert torch.equal(a[:, :, :7], b[:, :, :7]) and not torch.allclose(a[:, :, 7:], b[:, :, 7:])
    assert not torch.allclose(c[:, :, :7], d[:, :, :7])


# ------------------------------------------------------------------------------------------------ long streams


def test_rapr_streams_2000_frames_with_constant_cache_and_bounded_indices():
    model = AvatarDiT(DiTConfig.from_preset("tiny")).eval()
    cfg, layout = model.config, model.config.layout
    cache = model.new_kv_cache(1)
    x, sigma = torch.randn(1, cfg.in_channels, cfg.chunk_frames, 4, 4), torch.rand(1, cfg.chunk_frames)
    audio = torch.randn(1, 4 * cfg.chunk_frames + cfg.audio_lookahead_frames, cfg.audio_dim)
    sizes = set()
    with torch.no_grad():
        model.forward_chunk(torch.randn(1, cfg.in_channels, 1, 4, 4), torch.zeros(1, 1), None, None, cache)
        while cache.next_frame < 2000:
            model.forward_chunk(x, sigma, audio, audio, cache)
            if cache.next_frame > layout.sink_frames + layout.window_frames:
                sizes.add((cache.num_frames, cache.nbytes()))
                assert cache.last_query_positions == [10, 11, 12]
                assert cache.last_key_positions == list(range(13))
    assert cache.next_frame >= 2000
    assert len(sizes) == 1  # one constant cache size (frames, bytes) once the window is full
    assert next(iter(sizes))[0] == layout.max_cached_frames == cache.num_frames == 10
    assert cache.max_rope_index == layout.max_rope_index == 12 <= cfg.rapr_max_distance + cfg.window_frames


def test_absolute_indices_refuse_to_overflow_the_rope_table():
    model = AvatarDiT(DiTConfig.from_preset("tiny", rapr=False)).eval()
    cfg = model.config
    cache = model.new_kv_cache(1)
    x, sigma = torch.randn(1, cfg.in_channels, 3, 4, 4), torch.rand(1, 3)
    audio = torch.randn(1, 14, cfg.audio_dim)
    with torch.no_grad():
        model.forward_chunk(torch.randn(1, cfg.in_channels, 1, 4, 4), torch.zeros(1, 1), None, None, cache)
        with pytest.raises(ValueError, match="enable DiTConfig.rapr"):
            while cache.next_frame < 2000:
                model.forward_chunk(x, sigma, audio, audio, cache)
    assert cache.next_frame == 1 + 3 * 341  # frames 0..1023 were generated, frame 1024 was refused
    assert cache.max_rope_index == 1023
    with pytest.raises(
        ValueError, match="RoPE frame index 1024 is outside the table"
    ):  # bidirectional teacher sequences are bounded the same way
        model(torch.randn(1, cfg.in_channels, 1025, 2, 2), torch.rand(1, 1025))


# ------------------------------------------------------------------------------------------------ audio


def test_future_audio_beyond_lookahead_does_not_change_earlier_frames():
    model = _model()
    cfg = model.config
    x, sigma, talk, listen = _inputs(cfg, 4)
    end = 2 * cfg.chunk_frames  # last latent frame of chunk 2 -> video frames up to 4 * end - 1
    first_future = cfg.frames_per_latent * end + cfg.audio_lookahead_frames
    with torch.no_grad():
        base = model(x, sigma, talk, listen, attention="block_causal")
        for audio_name in ("talk", "listen"):
            t2, l2 = talk.clone(), listen.clone()
            (t2 if audio_name == "talk" else l2)[:, first_future:] += 3.0
            out = model(x, sigma, t2, l2, attention="block_causal")
            assert torch.equal(out[:, :, : end + 1], base[:, :, : end + 1])
            assert not torch.allclose(out[:, :, end + 1 :], base[:, :, end + 1 :])
            # the last look-ahead frame of latent frame `end` does reach it (and its chunk, bidirectional inside)
            t3, l3 = talk.clone(), listen.clone()
            (t3 if audio_name == "talk" else l3)[:, first_future - 1] += 3.0
            out = model(x, sigma, t3, l3, attention="block_causal")
            chunk_start = end - cfg.chunk_frames + 1
            assert torch.equal(out[:, :, :chunk_start], base[:, :, :chunk_start])
            assert not torch.allclose(out[:, :, end], base[:, :, end])


@pytest.mark.parametrize("behind, ahead, talk_behind", [(0, 2, None), (5, 2, None), (8, 0, None), (8, 2, 0), (8, 2, 3)])
def test_each_latent_frame_hears_exactly_its_audio_window(behind, ahead, talk_behind):
    """One block: the audio attention's update of latent frame i (own video frames 4(i-1) .. 4i-1) reaches only that
    frame's output, so a change of video frame v's audio moves exactly the frames whose window
    4(i-1) - lookbehind .. 4i-1 + lookahead holds v (the look-behind of the first frames is silence); the own
    voice's window starts `talk_lookbehind_frames` before the frame's own when that is set."""
    model = _model(
        num_layers=1, audio_lookbehind_frames=behind, audio_lookahead_frames=ahead, talk_lookbehind_frames=talk_behind
    )
    x, sigma, talk, listen = _inputs(model.config, 3)
    f = x.shape[2]
    with torch.no_grad():
        base = model(x, sigma, talk, listen, attention="bidirectional")
        for v in (0, 5, 13, 4 * (f - 1) - 1):
            for which in ("talk", "listen"):
                t2, l2 = talk.clone(), listen.clone()
                (t2 if which == "talk" else l2)[:, v] += 3.0
                out = model(x, sigma, t2, l2, attention="bidirectional")
                moved = {i for i in range(f) if not torch.allclose(out[:, :, i], base[:, :, i], atol=1e-6)}
                back = behind if which == "listen" or talk_behind is None else talk_behind
                hears = {i for i in range(1, f) if 4 * (i - 1) - back <= v <= 4 * i - 1 + ahead}
                assert moved == hears, (which, v, moved, hears)


def test_reference_frame_gets_no_audio_update_in_bidirectional_model():
    model = _model(num_layers=1)
    x, sigma, talk, listen = _inputs(model.config, 2)
    with torch.no_grad():
        a = model(x, sigma, talk, listen, attention="block_causal")
        b = model(x, sigma, talk * 5, listen * 5, attention="block_causal")
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and not torch.allclose(a[:, :, 1:], b[:, :, 1:])


def test_listen_audio_acts_only_through_interact_attention():
    model = _model()
    x, sigma, talk, listen = _inputs(model.config, 2)
    with torch.no_grad():
        for mode in ("bidirectional", "block_causal"):
            a = model(x, sigma, talk, listen, attention=mode)
            b = model(x, sigma, talk, torch.randn_like(listen), attention=mode)
            assert not torch.allclose(a, b)
        for block in model.blocks:
            block.interact_attn.attn.o.weight.zero_()
            block.interact_attn.attn.o.bias.zero_()
        for mode in ("bidirectional", "block_causal"):
            a = model(x, sigma, talk, listen, attention=mode)
            b = model(x, sigma, talk, torch.randn_like(listen), attention=mode)
            c = model(x, sigma, talk, None, attention=mode)
            assert torch.equal(a, b) and torch.equal(a, c)
            assert not torch.allclose(a, model(x, sigma, torch.randn_like(talk), listen, attention=mode))


def test_dropped_audio_equals_module_contributing_nothing():
    model = _model()
    x, sigma, talk, listen = _inputs(model.config, 2)
    with torch.no_grad():
        dropped = model(x, sigma, None, listen)
        for block in model.blocks:
            block.audio_attn.attn.o.weight.zero_()
            block.audio_attn.attn.o.bias.zero_()
        zeroed = model(x, sigma, talk, listen)
    torch.testing.assert_close(dropped, zeroed, atol=0, rtol=0)


def test_zero_features_mean_no_audio_like_a_dropped_condition():
    """Per-sample dropout zeroes features in training; sampling passes None: both must be the same branch."""
    model = _model()
    x, sigma, talk, listen = _inputs(model.config, 2)
    with torch.no_grad():
        for mode in ("bidirectional", "block_causal"):
            torch.testing.assert_close(model(x, sigma, torch.zeros_like(talk), listen, attention=mode),
                                       model(x, sigma, None, listen, attention=mode), atol=0, rtol=0)  # fmt: skip
            # sample 1 dropped by zeroing: equals sample 1 run alone with None; sample 0 unaffected
            t2 = talk.clone()
            t2[1] = 0
            out = model(x, sigma, t2, listen, attention=mode)
            alone = model(x[1:], sigma[1:], None, listen[1:], attention=mode)
            torch.testing.assert_close(out[1:], alone, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out[:1], model(x[:1], sigma[:1], talk[:1], listen[:1], attention=mode))
        # a silent stretch (mask = 0) over whole latent windows gives those frames no talk update at all
        t3 = talk.clone()
        t3[:, :16] = 0  # latent frames 1..3 hear video frames 0..13: silent; frame 4 hears 12..17: not silent
        a = model(x, sigma, t3, None, attention="block_causal")
        for block in model.blocks:
            block.audio_attn.attn.o.weight.zero_()
            block.audio_attn.attn.o.bias.zero_()
        b = model(x, sigma, talk, None, attention="block_causal")
    assert torch.equal(a[:, :, :4], b[:, :, :4]) and not torch.allclose(a[:, :, 4:], b[:, :, 4:])


def test_zero_initialised_audio_modules_equal_the_model_without_them():
    with_audio = AvatarDiT(DiTConfig.from_preset("tiny")).eval()
    base = AvatarDiT(DiTConfig.from_preset("tiny", audio_attention=False)).eval()
    result = with_audio.load_state_dict(base.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in with_audio.extension_keys() if k != "text_context")
    with torch.no_grad():
        with_audio.text_context.copy_(base.text_context)
        _randomize(base)  # head etc.; copy again so both are identical on the shared keys
        with_audio.load_state_dict(base.state_dict(), strict=False)
        x, sigma, talk, listen = _inputs(with_audio.config, 2)
        for mode in ("bidirectional", "block_causal"):
            torch.testing.assert_close(
                with_audio(x, sigma, talk, listen, attention=mode), base(x, sigma, attention=mode)
            )


# ------------------------------------------------------------------------------------------------ Wan2.2 parity


def _wan_reference(sd: dict, cfg: DiTConfig, x, sigma, context):
    """Wan2.2 `WanModel.forward` written from its equations, token-major with complex RoPE (independent code)."""
    lin = F.linear
    dim, heads = cfg.dim, cfg.num_heads
    d = dim // heads
    tok = F.conv3d(x, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=cfg.patch_size)
    f, h, w = tok.shape[2:]
    tok = tok.flatten(2).transpose(1, 2)  # [B, L, dim]
    t = (sigma * 1000).repeat_interleave(h * w, dim=1).double()  # one timestep per token
    half = cfg.freq_dim // 2
    ang = t[..., None] * torch.pow(10000, -torch.arange(half, dtype=torch.float64) / half)
    sin_emb = torch.cat([ang.cos(), ang.sin()], -1).float()
    e = lin(
        F.silu(lin(sin_emb, sd["time_embedding.0.weight"], sd["time_embedding.0.bias"])),
        sd["time_embedding.2.weight"],
        sd["time_embedding.2.bias"],
    )
    e0 = lin(F.silu(e), sd["time_projection.1.weight"], sd["time_projection.1.bias"]).unflatten(2, (6, dim))
    ctx = torch.cat([context, context.new_zeros(context.shape[0], cfg.text_len - context.shape[1], cfg.text_dim)], 1)
    ctx = lin(
        F.gelu(lin(ctx, sd["text_embedding.0.weight"], sd["text_embedding.0.bias"]), approximate="tanh"),
        sd["text_embedding.2.weight"],
        sd["text_embedding.2.bias"],
    )
    c = d // 2
    sizes = [c - 2 * (c // 3), c // 3, c // 3]

    def polar(n, pairs):
        inv = 1.0 / 10000 ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        return torch.polar(torch.ones(n, pairs, dtype=torch.float64), torch.outer(torch.arange(n).double(), inv))

    rot = torch.cat(
        [
            polar(f, sizes[0])[:, None, None].expand(f, h, w, -1),
            polar(h, sizes[1])[None, :, None].expand(f, h, w, -1),
            polar(w, sizes[2])[None, None, :].expand(f, h, w, -1),
        ],
        -1,
    ).reshape(f * h * w, 1, c)

    def rope(z):
        zc = torch.view_as_complex(z.double().reshape(*z.shape[:-1], c, 2))
        return torch.view_as_real(zc * rot).flatten(-2).float()

    def rms(z, wgt):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + cfg.eps) * wgt

    def attention(q, k, v):
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        return torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).flatten(2)

    def ln(z):
        return F.layer_norm(z, (dim,), eps=cfg.eps)

    b = x.shape[0]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        m = (sd[p + "modulation"].unsqueeze(0) + e0).chunk(6, dim=2)
        m = [u.squeeze(2) for u in m]
        y = ln(tok) * (1 + m[1]) + m[0]
        q = rms(lin(y, sd[p + "self_attn.q.weight"], sd[p + "self_attn.q.bias"]), sd[p + "self_attn.norm_q.weight"])
        k = rms(lin(y, sd[p + "self_attn.k.weight"], sd[p + "self_attn.k.bias"]), sd[p + "self_attn.norm_k.weight"])
        v = lin(y, sd[p + "self_attn.v.weight"], sd[p + "self_attn.v.bias"])
        a = attention(rope(q.view(b, -1, heads, d)), rope(k.view(b, -1, heads, d)), v.view(b, -1, heads, d))
        tok = tok + lin(a, sd[p + "self_attn.o.weight"], sd[p + "self_attn.o.bias"]) * m[2]
        y = F.layer_norm(tok, (dim,), sd[p + "norm3.weight"], sd[p + "norm3.bias"], eps=cfg.eps)
        q = rms(lin(y, sd[p + "cross_attn.q.weight"], sd[p + "cross_attn.q.bias"]), sd[p + "cross_attn.norm_q.weight"])
        k = rms(
            lin(ctx, sd[p + "cross_attn.k.weight"], sd[p + "cross_attn.k.bias"]), sd[p + "cross_attn.norm_k.weight"]
        )
        v = lin(ctx, sd[p + "cross_attn.v.weight"], sd[p + "cross_attn.v.bias"])
        a = attention(q.view(b, -1, heads, d), k.view(b, -1, heads, d), v.view(b, -1, heads, d))
        tok = tok + lin(a, sd[p + "cross_attn.o.weight"], sd[p + "cross_attn.o.bias"])
        y = ln(tok) * (1 + m[4]) + m[3]
        y = lin(
            F.gelu(lin(y, sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"]), approximate="tanh"),
            sd[p + "ffn.2.weight"],
            sd[p + "ffn.2.bias"],
        )
        tok = tok + y * m[5]
    shift, scale = (sd["head.modulation"].unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)
    out = lin(ln(tok) * (1 + scale.squeeze(2)) + shift.squeeze(2), sd["head.head.weight"], sd["head.head.bias"])
    pt, ph, pw = cfg.patch_size
    out = out.view(b, f, h, w, pt, ph, pw, cfg.out_channels)
    return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(b, cfg.out_channels, f * pt, h * ph, w * pw)


def test_bidirectional_forward_matches_wan22_equations():
    cfg = DiTConfig.from_preset("tiny", learned_text_context=False, num_layers=2)
    model = _randomize(AvatarDiT(cfg).eval())
    x, sigma, talk, listen = _inputs(cfg, 1, hw=4)
    context = torch.randn(2, 5, cfg.text_dim)  # shorter than text_len: zero-padded like Wan
    sd = {k: v for k, v in model.state_dict().items() if k not in model.extension_keys()}
    with torch.no_grad():
        ours = model(x, sigma, None, None, context)
        ref = _wan_reference(sd, cfg, x, sigma, context)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ Wan2.2 key names

# Read from Wan-Video/Wan2.2 wan/modules/model.py (WanModel, WanAttentionBlock, WanSelfAttention, Head): the norms
# norm1/norm2/head.norm have no parameters (elementwise_affine=False); norm3 is affine with cross_attn_norm; the
# RoPE table `freqs` is a plain attribute, not a buffer.
WAN_BLOCK_KEYS = {
    f"{attn}.{proj}.{kind}" for attn in ("self_attn", "cross_attn") for proj in "qkvo" for kind in ("weight", "bias")
} | {
    "self_attn.norm_q.weight",
    "self_attn.norm_k.weight",
    "cross_attn.norm_q.weight",
    "cross_attn.norm_k.weight",
    "norm3.weight",
    "norm3.bias",
    "ffn.0.weight",
    "ffn.0.bias",
    "ffn.2.weight",
    "ffn.2.bias",
    "modulation",
}
WAN_TOP_KEYS = {
    "patch_embedding.weight",
    "patch_embedding.bias",
    "text_embedding.0.weight",
    "text_embedding.0.bias",
    "text_embedding.2.weight",
    "text_embedding.2.bias",
    "time_embedding.0.weight",
    "time_embedding.0.bias",
    "time_embedding.2.weight",
    "time_embedding.2.bias",
    "time_projection.1.weight",
    "time_projection.1.bias",
    "head.head.weight",
    "head.head.bias",
    "head.modulation",
}


def _wan_keys(num_layers: int) -> set[str]:
    return WAN_TOP_KEYS | {f"blocks.{i}.{k}" for i in range(num_layers) for k in WAN_BLOCK_KEYS}


def _wan_param_count(cfg: DiTConfig) -> int:
    dim, ffn = cfg.dim, cfg.ffn_dim
    attn = 4 * (dim * dim + dim) + 2 * dim
    block = 2 * attn + 2 * dim + (dim * ffn + ffn) + (ffn * dim + dim) + 6 * dim
    out = math.prod(cfg.patch_size) * cfg.out_channels
    top = (
        dim * cfg.in_channels * math.prod(cfg.patch_size) + dim
        + (cfg.text_dim * dim + dim) + (dim * dim + dim)
        + (cfg.freq_dim * dim + dim) + (dim * dim + dim)
        + (dim * 6 * dim + 6 * dim)
        + (dim * out + out) + 2 * dim
    )  # fmt: skip
    return cfg.num_layers * block + top


@pytest.fixture(scope="module")
def wan5b():
    with torch.device("meta"):
        return AvatarDiT(DiTConfig.from_preset("wan2.2-ti2v-5b"))


def test_wan22_5b_preset_keys_and_parameter_count(wan5b):
    cfg = wan5b.config
    sd = wan5b.state_dict()
    new = set(wan5b.extension_keys())
    assert set(sd) == _wan_keys(30) | new and not (_wan_keys(30) & new)
    assert {k.split(".")[2] for k in new if k.startswith("blocks.")} == {"audio_attn", "interact_attn"}
    assert {k.split(".")[0] for k in new} == {"blocks", "audio_proj"}
    base = sum(v.numel() for k, v in sd.items() if k not in new)
    assert base == _wan_param_count(cfg) == 4_999_787_712  # Wan2.2-TI2V-5B
    shapes = {
        "patch_embedding.weight": (3072, 48, 1, 2, 2),
        "text_embedding.0.weight": (3072, 4096),
        "time_embedding.0.weight": (3072, 256),
        "time_projection.1.weight": (18432, 3072),
        "blocks.29.ffn.0.weight": (14336, 3072),
        "blocks.0.self_attn.norm_q.weight": (3072,),
        "blocks.0.modulation": (1, 6, 3072),
        "head.head.weight": (192, 3072),
        "head.modulation": (1, 2, 3072),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    print(f"wan2.2-ti2v-5b: {base:,} Wan2.2 parameters + {sum(sd[k].numel() for k in new):,} audio = "
          f"{sum(p.numel() for p in wan5b.parameters()):,}")  # fmt: skip


def test_adapter_maps_official_key_names_on_meta(wan5b):
    with torch.device("meta"):
        ckpt = {k: torch.empty(v.shape) for k, v in wan5b.state_dict().items() if k in _wan_keys(30)}
    report = load_wan22_state_dict(wan5b, ckpt)
    assert sorted(report.loaded) == sorted(_wan_keys(30))
    assert sorted(report.new) == sorted(wan5b.extension_keys())
    expected_modules = ["audio_proj"] + [f"blocks.{i}.{m}" for i in range(30) for m in ("audio_attn", "interact_attn")]
    assert sorted(report.new_modules) == sorted(expected_modules)
    assert not report.materialized  # a meta checkpoint leaves the model on meta
    with pytest.raises(ValueError, match="Missing: \\[blocks.3.ffn.0.bias\\]"):
        load_wan22_state_dict(wan5b, {k: v for k, v in ckpt.items() if k != "blocks.3.ffn.0.bias"})
    with pytest.raises(ValueError, match="Unexpected: \\[blocks.0.self_attn.extra\\]"):
        load_wan22_state_dict(wan5b, {**ckpt, "blocks.0.self_attn.extra": torch.empty(1, device="meta")})
    with pytest.raises(ValueError, match="shape mismatches: head.modulation"):
        load_wan22_state_dict(wan5b, {**ckpt, "head.modulation": torch.empty(1, 3, 3072, device="meta")})


def test_adapter_loads_real_weights_into_meta_model_and_matches_base():
    base_cfg = DiTConfig.from_preset("tiny", audio_attention=False, learned_text_context=False)
    base = _randomize(AvatarDiT(base_cfg).eval())
    with torch.device("meta"):
        model = AvatarDiT(dataclasses.replace(base_cfg, audio_attention=True))
    report = load_wan22_state_dict(model, base.state_dict())
    assert report.materialized and not any(p.is_meta for p in model.parameters())
    assert "audio_proj" in str(report) and "blocks.1.interact_attn" in report.new_modules
    model.eval()
    x, sigma, talk, listen = _inputs(base_cfg, 2)
    context = torch.randn(1, 3, base_cfg.text_dim)
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, talk, listen, context), base(x, sigma, None, None, context))


# ------------------------------------------------------------------------------------------------ training


def test_gradients_reach_every_parameter_in_block_causal_mode():
    model = _model()
    model.train()
    x, sigma, talk, listen = _inputs(model.config, 2)
    model(x, sigma, talk, listen, attention="block_causal").square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().any()]
    assert not no_grad, no_grad
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    model.config.gradient_checkpointing = True  # same gradients with activation checkpointing
    model(x, sigma, talk, listen, attention="block_causal").square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_streaming_cache_is_detached_by_default():
    model = _model()
    x, sigma, talk, listen = _inputs(model.config, 2, batch=1)
    cache = model.new_kv_cache(1)
    model.forward_chunk(x[:, :, :1], sigma[:, :1], None, None, cache)
    assert all(not k.requires_grad for k in cache.keys)
    model.forward_chunk(x[:, :, 1:4], sigma[:, 1:4], model.audio_window(talk, 1, 3), None, cache).sum().backward()
    assert model.patch_embedding.weight.grad is not None


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    model = _model()
    cfg = model.config
    x, sigma, talk, listen = _inputs(cfg, 2)
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :8], sigma)
    with pytest.raises(ValueError, match="F = 1 \\+ k \\* chunk_frames"):
        model(x[:, :, :6], sigma[:, :6], attention="block_causal")
    with pytest.raises(ValueError, match="sigma must be \\[B, F\\]"):
        model(x, sigma[:, 1:])
    with pytest.raises(ValueError, match="audio_talk covers 23 video frames, expected 24 or 26"):
        model(x, sigma, talk[:, :23])
    with pytest.raises(ValueError, match="audio_dim=32"):
        model(x, sigma, None, torch.randn(2, 24, 7))
    with pytest.raises(ValueError, match="attention must be"):
        model(x, sigma, attention="causal")
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(x[..., :7], sigma)
    cache = model.new_kv_cache(2)
    with pytest.raises(ValueError, match="expects the reference frame"):
        model.forward_chunk(x[:, :, :3], sigma[:, :3], None, None, cache)
    with pytest.raises(ValueError, match="reference chunk has no audio"):
        model.forward_chunk(x[:, :, :1], sigma[:, :1], talk, None, cache)
    model.forward_chunk(x[:, :, :1], sigma[:, :1], None, None, cache)
    with pytest.raises(ValueError, match="expected 14"):
        model.forward_chunk(x[:, :, 1:4], sigma[:, 1:4], talk[:, :12], None, cache)
    with pytest.raises(ValueError, match="batch 1"):
        model.forward_chunk(x[:1, :, 1:4], sigma[:1, 1:4], None, None, cache)
    with pytest.raises(ValueError, match="tokens per frame"):
        model.forward_chunk(x[:, :, 1:4, :4, :4], sigma[:, 1:4], None, None, cache)
    no_audio = AvatarDiT(DiTConfig.from_preset("tiny", audio_attention=False))
    with pytest.raises(ValueError, match="no audio modules"):
        no_audio(x, sigma, talk)
    with torch.device("meta"):
        real = AvatarDiT(DiTConfig.from_preset("wan2.2-ti2v-5b", num_layers=1))
    with pytest.raises(ValueError, match="no text context"):
        real._context(None, 1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"dim": 66}, "divisible by num_heads"),
        ({"dim": 20}, "head_dim = dim / num_heads = 5 must be even"),
        ({"in_channels": 0}, "in_channels"),
        ({"patch_size": (2, 2, 2)}, "patch_size\\[0\\] must be 1"),
        ({"window_frames": 4}, "DiTConfig.window_frames"),
        ({"rapr_max_distance": 5}, "DiTConfig.rapr_max_distance"),
        ({"attention_backend": "xformers"}, "attention_backend"),
        ({"audio_attn_dim": 10}, "audio_attn_dim"),
        ({"audio_lookahead_frames": -1}, "audio_lookahead_frames"),
    ],
)
def test_config_validation_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig.from_preset("tiny", **overrides)
    with pytest.raises(KeyError, match="unknown DiT preset"):
        DiTConfig.from_preset("huge")


def test_context_defaults_and_padding():
    cfg = DiTConfig.from_preset("tiny")
    model = _model()
    x, sigma, _, _ = _inputs(cfg, 1)
    with torch.no_grad():
        learned = model(x, sigma)
        explicit = model(x, sigma, context=model.text_context[None])
        short = torch.randn(1, 3, cfg.text_dim)
        padded = torch.cat([short, torch.zeros(1, cfg.text_len - 3, cfg.text_dim)], 1)
        torch.testing.assert_close(model(x, sigma, context=short), model(x, sigma, context=padded))
        model.set_text_context(short[0])
    torch.testing.assert_close(learned, explicit)


def test_mini_p4_is_mini_with_4x4_patches():
    """The tiny-f4 VAE's 16x16 latents at 4x4 patches give mini's 16 tokens per frame; nothing else differs."""
    import dataclasses

    mini, p4 = DiTConfig.from_preset("mini"), DiTConfig.from_preset("mini-p4")
    assert p4.patch_size == (1, 4, 4) and dataclasses.replace(p4, patch_size=mini.patch_size) == mini
