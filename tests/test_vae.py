"""ReferenceGuidedVAE: causality, streaming parity, shapes, reference handling, residual shortcuts, bad input."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from dystream.models.vae import (
    DISCRIMINATOR_PRESETS,
    VAE_PRESETS,
    DiscriminatorConfig,
    LocalReferenceAttention,
    PatchDiscriminator3D,
    ReferenceCopyHead,
    ReferenceFeatures,
    ReferenceGuidedVAE,
    VAEConfig,
)

H = W = 32  # tiny preset: 32x32 frames -> 4x4 latents (keeps every test fast)


def _vae(preset: str = "tiny", **overrides) -> ReferenceGuidedVAE:
    vae = ReferenceGuidedVAE(VAEConfig.from_preset(preset, **overrides)).eval()
    # The reference attention output is zero-initialised; give it weights so guidance has an effect.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "to_out" in name or "null_kv" in name:
                p.normal_(0, 0.05)
    return vae


def _video(b: int = 2, frames: int = 13) -> torch.Tensor:
    return torch.rand(b, 3, frames, H, W) * 2 - 1


def _refs(b: int = 2, k: int = 2) -> torch.Tensor:
    return torch.rand(b, k, 3, H, W) * 2 - 1


def _latent_index(frame: int, r_t: int = 4) -> int:
    return 0 if frame == 0 else (frame - 1) // r_t + 1


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("preset", sorted(VAE_PRESETS))
def test_shapes_and_compression_ratio(preset):
    cfg = VAEConfig.from_preset(preset)
    assert cfg.temporal_factor == 4
    expected = {"tiny": (8, 48.0), "tiny-f4": (4, 48.0), "ref-dc-f32t4c16": (32, 768.0)}[preset]
    assert (cfg.spatial_factor, cfg.compression_ratio) == expected
    cpu = preset.startswith("tiny")
    size = 64 if cpu else 512
    device = "cpu" if cpu else "meta"  # paper scale: shape inference without memory or compute
    with torch.device(device), torch.no_grad():
        vae = ReferenceGuidedVAE(cfg)
        video = torch.zeros(1, 3, 9, size, size)
        refs = torch.zeros(1, 2, 3, size, size)
        z = vae.encode(video, refs)
        assert tuple(z.shape) == (1, *cfg.latent_shape(9, size, size))
        assert tuple(z.shape) == (1, cfg.latent_channels, 3, size // cfg.spatial_factor, size // cfg.spatial_factor)
        # The 4k frames after the first one map to k latent frames at the nominal ratio.
        ratio = video[:, :, 1:].numel() / z[:, :, 1:].numel()
        assert ratio == pytest.approx(cfg.compression_ratio)
        assert vae.decode(z, refs).shape == video.shape


def test_contract_reference_then_window():
    """docs/architecture.md: cat([reference, video]) of 1 + T frames -> 1 + T/4 latent frames."""
    vae = _vae()
    reference, window = _video(1, 1), _video(1, 8)
    with torch.no_grad():
        z = vae.encode(torch.cat([reference, window], dim=2))
        z_ref = vae.encode(reference)
    assert z.shape[2] == 1 + 8 // 4
    torch.testing.assert_close(z[:, :, :1], z_ref, rtol=0, atol=1e-6)  # latent frame 0 = reference alone


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("changed", [1, 5, 8])
def test_encode_is_causal(changed):
    vae, refs = _vae(), _refs()
    x = _video()
    y = x.clone()
    y[:, :, changed:] = torch.rand_like(y[:, :, changed:])
    with torch.no_grad():
        zx, zy = vae.encode(x, refs), vae.encode(y, refs)
    first = _latent_index(changed)
    torch.testing.assert_close(zx[:, :, :first], zy[:, :, :first], rtol=0, atol=1e-6)
    assert (zx[:, :, first] - zy[:, :, first]).abs().max() > 1e-4  # the change does reach its own latent frame


@pytest.mark.parametrize("changed", [1, 2])
def test_decode_is_causal(changed):
    vae, refs = _vae(), _refs()
    z = torch.randn(2, 16, 4, H // 8, W // 8)
    z2 = z.clone()
    z2[:, :, changed:] = torch.randn_like(z2[:, :, changed:])
    with torch.no_grad():
        vx, vy = vae.decode(z, refs), vae.decode(z2, refs)
    last_unchanged = 1 + 4 * (changed - 1)  # frames decoded from latent frames < changed
    torch.testing.assert_close(vx[:, :, :last_unchanged], vy[:, :, :last_unchanged], rtol=0, atol=1e-6)
    assert (vx[:, :, last_unchanged:] - vy[:, :, last_unchanged:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- streaming parity


@pytest.mark.parametrize("preset", ["tiny", "tiny-f4"])
@pytest.mark.parametrize("chunks", [[1, 4, 4, 4], [5, 8], [1, 12], [13]])
def test_chunked_encode_equals_one_shot(chunks, preset):
    vae, refs = _vae(preset), _refs()
    x = _video(frames=sum(chunks))
    with torch.no_grad():
        full = vae.encode(x, refs)
        cache = vae.new_encode_cache(refs)
        parts, start = [], 0
        for n in chunks:
            parts.append(vae.encode_chunk(x[:, :, start : start + n], cache))
            start += n
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max().item() <= 1e-5


def _decode_in_chunks(vae, z: torch.Tensor, refs, chunks: list[int]) -> list[torch.Tensor]:
    """Decode ``z`` latent frame chunk by chunk through one streaming cache; the decoded chunks in order."""
    cache = vae.new_decode_cache(refs)
    parts, start = [], 0
    for n in chunks:
        parts.append(vae.decode_chunk(z[:, :, start : start + n], cache))
        start += n
    return parts


@pytest.mark.parametrize("preset", ["tiny", "tiny-f4"])
@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [2, 2], [1, 3]])
def test_chunked_decode_equals_one_shot(chunks, preset):
    vae, refs = _vae(preset), _refs()
    f = vae.config.spatial_factor
    z = torch.randn(2, vae.config.latent_channels, sum(chunks), H // f, W // f)
    with torch.no_grad():
        full = vae.decode(z, refs)
        parts = _decode_in_chunks(vae, z, refs, chunks)
    for i, (n, out) in enumerate(zip(chunks, parts, strict=True)):
        assert out.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == full.shape == (2, 3, 1 + 4 * (sum(chunks) - 1), H, W)
    assert (streamed - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [2, 2], [1, 3]])
def test_chunked_decode_with_a_motion_aware_copy_gate_equals_one_shot(chunks):
    """The gate's motion cue (the drawing's temporal difference) is causal and cached: chunked decoding equals one
    shot, and the cue changes the output (so a chunk that forgot the previous frame would fail here)."""
    vae, refs = _vae(copy_gate_motion=True), _refs()
    head = vae.decoder.copy_head
    with torch.no_grad():
        head.to_gate.weight.normal_(0, 0.5)
    f = vae.config.spatial_factor
    z = torch.randn(2, vae.config.latent_channels, sum(chunks), H // f, W // f)
    with torch.no_grad():
        full = vae.decode(z, refs)
        parts = _decode_in_chunks(vae, z, refs, chunks)
        head.to_gate.weight[:, -head.to_gate.out_features :] = 0.0  # blind the gate to motion
        blind = vae.decode(z, refs)
    assert (torch.cat(parts, dim=2) - full).abs().max().item() <= 1e-5
    assert (blind - full).abs().max().item() > 1e-3


def test_motion_cue_starts_as_the_drawings_temporal_difference():
    """At initialisation the cue is estimate_t - estimate_{t-1} (zero before the first frame): a still drawing has
    no motion after its first frame, and a pixel that changes has motion only where and when it changes."""
    head = _vae(copy_gate_motion=True).decoder.copy_head
    cells = torch.randn(1, head.to_gate.out_features, 1, 4, 4).expand(-1, -1, 5, -1, -1).clone()
    cells[0, 3, 2:, 1, 2] += 0.7  # one value changes at frame 2 and stays
    with torch.no_grad():
        motion = head.motion(cells)
    torch.testing.assert_close(motion[:, :, 0], cells[:, :, 0])
    expected = torch.zeros_like(motion[:, :, 1:])
    expected[0, 3, 1, 1, 2] = 0.7
    torch.testing.assert_close(motion[:, :, 1:], expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("k", [0, 1, 3])
def test_variable_number_of_references(k):
    vae = _vae()
    x = _video()
    refs = _refs(k=k)
    with torch.no_grad():
        z = vae.encode(x, refs)
        recon = vae.decode(z, refs)
        z_none = vae.encode(x, None)
    assert z.shape == (2, 16, 4, H // 8, W // 8) and recon.shape == x.shape
    assert torch.isfinite(recon).all()
    if k == 0:
        torch.testing.assert_close(z, z_none, rtol=0, atol=0)  # [B, 0, ...] is the same as no references
    else:
        assert (z - z_none).abs().max() > 1e-4  # guidance changes the latents


def test_reference_mask_equals_dropping_the_reference():
    vae = _vae()
    x, refs = _video(), _refs(k=3)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    with torch.no_grad():
        masked = vae.encode(x, refs, mask)
        sample0 = vae.encode(x[:1], refs[:1, [0, 2]])
        sample1 = vae.encode(x[1:], None)
    torch.testing.assert_close(masked[:1], sample0, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked[1:], sample1, rtol=0, atol=1e-5)  # all masked == K = 0, no NaN


def test_gradients_reach_reference_encoder_and_not_beyond_inputs():
    vae = _vae().train()
    x, refs = _video(), _refs(k=2).requires_grad_(True)
    out = vae(x, refs)
    out.recon.abs().mean().backward()
    assert refs.grad is not None and refs.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vae.reference_encoder.parameters())
    assert vae.latent_mean.grad is None  # buffers are not trained


@pytest.mark.parametrize("offset", [(0, 0), (1, 0), (-2, 1)])
def test_local_reference_attention_reads_the_window_cell_it_prefers(offset):
    """With identity projections and a bias that picks one window offset, every position receives the reference's
    value at that offset (zero-padded frame borders excluded): the unfold/rearrange bookkeeping puts each key where
    it belongs, and the masking of cells outside the frame keeps border positions from reading padding."""
    cfg = VAEConfig.from_preset("tiny")
    c, h, w = 24, 6, 7
    block = LocalReferenceAttention(c, cfg)
    with torch.no_grad():
        block.norm.weight.fill_(1.0)
        block.to_q.weight.zero_()
        block.to_q.bias.zero_()  # queries 0: the logits are the offset biases alone (the null token: 0)
        block.to_kv.weight.zero_()
        block.to_kv.bias.zero_()
        block.to_kv.weight[c:, :, 0, 0] = torch.eye(c)  # values = the (normalised) reference features
        block.to_out.weight.copy_(torch.eye(c))
        block.null_kv.zero_()
        block.null_kv[1].fill_(0.5)  # a null value unlike any frame cell or the zero padding
        r = cfg.local_window // 2
        dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
        chosen = (dy.flatten() == offset[0]) & (dx.flatten() == offset[1])
        block.offset_bias.copy_(torch.where(chosen, 50.0, -50.0).expand_as(block.offset_bias))
    x = torch.randn(1, c, 2, h, w)
    refs = torch.randn(1, 1, c, h, w)
    out = block(x, refs, None) - x  # [1, C, T, h, w]
    values = block.norm_ref(refs[:, 0])  # [1, C, h, w]
    for y in range(h):
        for xx in range(w):
            sy, sx = y + offset[0], xx + offset[1]
            if 0 <= sy < h and 0 <= sx < w:
                torch.testing.assert_close(out[0, :, :, y, xx], values[0, :, sy, sx, None].expand(c, 2))
            else:  # the preferred cell is the zero padding, which is excluded: the null token (logit 0) wins
                torch.testing.assert_close(out[0, :, :, y, xx], torch.full((c, 2), 0.5))


def _window_attention_by_loops(q, keys, values, prior, mask, window, logit_scale=1.0, null=None):
    """The window attention written out place by place: q ``[T, h, w, d]`` (one head), keys/values ``[K, d|p, h, w]``,
    prior ``[w^2]``, mask ``[K]``; null ``(key, value)`` or None. Returns ``[T, h, w, p]``."""
    t, h, w, d = q.shape
    r = window // 2
    out = torch.zeros(t, h, w, values.shape[1])
    for y in range(h):
        for x in range(w):
            ks, vs, bias = [], [], []
            if null is not None:
                ks.append(null[0]), vs.append(null[1]), bias.append(torch.tensor(0.0))
            for k in range(keys.shape[0]):
                for j, (dy, dx) in enumerate((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)):
                    if mask[k] and 0 <= y + dy < h and 0 <= x + dx < w:
                        ks.append(keys[k, :, y + dy, x + dx]), vs.append(values[k, :, y + dy, x + dx])
                        bias.append(prior[j])
            logits = logit_scale * (q[:, y, x] @ torch.stack(ks).T * d**-0.5 + torch.stack(bias))
            out[:, y, x] = logits.softmax(-1) @ torch.stack(vs)
    return out


@pytest.mark.parametrize("mask", [[True, True], [False, True]])
def test_window_attentions_match_a_loop_over_places(mask):
    """The local reference attention (with its null token) and the copy head's window attention (with its logit
    scale) against the same attention written out place by place: random weights, two references (one masked in the
    second case), the frame borders inside the window."""
    torch.manual_seed(0)
    cfg = VAEConfig.from_preset("tiny", copy_logit_scale=3.0)
    c, t, h, w = 24, 3, 5, 6
    x, refs = torch.randn(1, c, t, h, w), torch.randn(1, 2, c, h, w)
    mask_t = torch.tensor([mask])
    block = LocalReferenceAttention(c, cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
        out = (block(x, refs, mask_t) - x)[0]  # [C, T, h, w]
        q = block.to_q(block.norm(x)[0].permute(1, 2, 3, 0))  # [T, h, w, C]
        keys, values = block.to_kv(block.norm_ref(refs[0])).chunk(2, dim=1)  # [K, C, h, w]
        expected = _window_attention_by_loops(
            q, keys, values, block.offset_bias[0], mask, cfg.local_window, null=tuple(block.null_kv)
        )
        torch.testing.assert_close(out, block.to_out(expected).permute(3, 0, 1, 2), rtol=1e-4, atol=1e-5)

    head = ReferenceCopyHead(c, 12, cfg)
    pixels = torch.randn(1, 2, 12, h, w)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
        _, copy, _ = head(x, torch.randn(1, 12, t, h, w), ReferenceFeatures({0: refs}, mask_t, pixels))
        q = head.to_q(head.norm(x)[0].permute(1, 2, 3, 0))
        keys = head.to_k(head.norm_ref(refs[0]))
        expected = _window_attention_by_loops(q, keys, pixels[0], head.offset_bias[0], mask, cfg.local_window, 3.0)
        torch.testing.assert_close(copy[0], expected.permute(3, 0, 1, 2), rtol=1e-4, atol=1e-5)


def _open_copy_gate(vae: ReferenceGuidedVAE) -> None:
    """Gate fully open, queries zero: the decoder draws exactly the copy, whose attention is the offset prior alone."""
    head = vae.decoder.copy_head
    with torch.no_grad():
        head.to_gate.weight.zero_()
        head.to_gate.bias.fill_(60.0)
        head.to_q.weight.zero_()
        head.to_q.bias.zero_()


def _open_centre_copy(vae: ReferenceGuidedVAE) -> None:
    """Gate fully open, copy attention on the same cell: the decoder draws exactly what the copy carries."""
    _open_copy_gate(vae)
    head = vae.decoder.copy_head
    with torch.no_grad():
        head.offset_bias.fill_(-60.0)
        head.offset_bias[0, head.offset_bias.numel() // 2] = 60.0


def test_reference_copy_head_with_an_open_gate_draws_the_reference_exactly():
    """Gate fully open and attention on the same cell: every decoded frame is the reference image, pixel for pixel,
    whatever the latents say (the copy path carries the reference's own pixels, in the decoder's cell order)."""
    vae = _vae(reference_copy=True)
    _open_centre_copy(vae)
    with torch.no_grad():
        refs = _refs(k=1)
        z = torch.randn(2, 16, 3, H // 8, W // 8)
        out = vae.decode(z, refs)
        mask = torch.tensor([[True], [False]])
        masked = vae.decode(z, refs, mask)
        plain = vae.decode(z, None)
    torch.testing.assert_close(out, refs[:, 0, :, None].expand_as(out), rtol=0, atol=1e-5)
    torch.testing.assert_close(masked[0], out[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked[1], plain[1], rtol=0, atol=1e-6)  # a masked reference is not copied


def test_copy_logit_scale_sharpens_the_copy_to_the_same_cell():
    """Gate open, queries zero, so the copy's window attention is the offset prior alone (-3 (dy^2 + dx^2)): at the
    default scale that is a blend of the neighbouring reference cells; scaled by 10 it is the reference's own cell
    (e^-30 left on the neighbours), pixel for pixel."""
    refs, z = _refs(k=1), torch.randn(2, 16, 2, H // 8, W // 8)
    decoded = {}
    for scale in (1.0, 10.0):
        vae = _vae(copy_logit_scale=scale)
        _open_copy_gate(vae)
        with torch.no_grad():
            decoded[scale] = vae.decode(z, refs)
    same_cell = refs[:, 0, :, None].expand_as(decoded[10.0])
    torch.testing.assert_close(decoded[10.0], same_cell, rtol=0, atol=1e-5)
    assert (decoded[1.0] - same_cell).abs().mean() > 0.05  # the default's soft copy blurs a random reference


def test_hard_copy_gate_picks_the_copy_or_the_drawing_and_still_learns():
    """With ``copy_gate_hard`` every output value is exactly the copy or the decoder's own drawing (no blend), the gate
    reads 0 or 1, and the pixel loss still reaches the gate's weights (straight-through)."""
    vae = _vae(copy_gate_hard=True).train()
    with torch.no_grad():
        vae.decoder.copy_head.to_gate.weight.normal_(0, 0.5)  # some values open, some shut
    out = vae(_video(frames=9), _refs(k=1))
    assert set(out.copy_gate.unique().tolist()) == {0.0, 1.0}
    picked = torch.where(out.copy_gate > 0.5, out.copy, out.estimate)
    torch.testing.assert_close(out.recon, picked, rtol=0, atol=1e-6)
    (out.recon - _video(frames=9)).abs().mean().backward()
    assert vae.decoder.copy_head.to_gate.weight.grad.abs().sum() > 0


def test_copy_logit_scale_must_be_positive():
    with pytest.raises(ValueError, match="copy_logit_scale must be > 0"):
        VAEConfig.from_preset("tiny", copy_logit_scale=0.0)


def test_copy_gate_scale_multiplies_the_gate_logits_and_set_copy_scales_needs_no_new_weights():
    """Set to decode with ``copy_gate_scale`` 1.5 (same weights), the gate is sigmoid(1.5 x) of the same logits x that
    gave sigmoid(x) before; with ``copy_logit_scale`` 2 as well, the output equals that of a VAE built with both fields
    and loaded with the weights, and the config (what an export records) carries them."""
    torch.manual_seed(0)
    trained = _vae()
    with torch.no_grad():
        trained.decoder.copy_head.to_gate.weight.normal_(0, 0.05)
    video, refs = _video(frames=9), _refs(k=1)
    raw = []
    trained.decoder.copy_head.to_gate.register_forward_hook(lambda module, args, out: raw.append(out))
    with torch.no_grad():
        before = trained(video, refs, sample=False).copy_gate
        trained.set_copy_scales(copy_gate_scale=1.5)
        after = trained(video, refs, sample=False).copy_gate
    torch.testing.assert_close(raw[1], raw[0], rtol=0, atol=0)  # the gate's input did not change

    def as_pixels(logits):  # [B, T, h, w, P] -> [B, 3, T, H, W], the layout of VAEOutput.copy_gate
        return trained.decoder._unpatchify(rearrange(torch.sigmoid(logits), "b t h w p -> b p t h w"))

    torch.testing.assert_close(before, as_pixels(raw[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(after, as_pixels(1.5 * raw[0]), rtol=0, atol=1e-6)
    assert (after - 0.5).abs().mean() > (before - 0.5).abs().mean()  # further from one half
    with torch.no_grad():
        trained.set_copy_scales(copy_logit_scale=2.0)
        sharp = trained(video, refs, sample=False).recon
    assert (trained.config.copy_logit_scale, trained.config.copy_gate_scale) == (2.0, 1.5)
    built = ReferenceGuidedVAE(VAEConfig.from_preset("tiny", copy_logit_scale=2.0, copy_gate_scale=1.5)).eval()
    built.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(built(video, refs, sample=False).recon, sharp, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("scales", "overrides", "message"),
    [
        ({"copy_window": 2.0}, {}, r"\['copy_window'\] are not copy scales"),
        ({"copy_gate_scale": 0.0}, {}, "copy_gate_scale must be > 0"),
        ({"copy_gate_scale": 2.0}, {"reference_copy": False}, "need the reference copy head"),
    ],
)
def test_set_copy_scales_refuses_bad_values(scales, overrides, message):
    vae = _vae(**overrides)
    with pytest.raises(ValueError, match=message):
        vae.set_copy_scales(**scales)
    assert vae.config.copy_gate_scale == 1.0  # nothing changed


@pytest.mark.parametrize(("dx", "dy"), [(1.0, 0.0), (0.0, -1.0), (0.5, 0.0), (-0.25, 0.5)])
def test_copy_warp_moves_the_copy_by_the_flow(dx, dy):
    """With a constant flow (dx, dy) every decoded frame is the reference sampled at (x + dx, y + dy): bilinear
    between pixels, the border repeated. Compared with an independent computation (torch.roll for whole pixels, a
    hand-written bilinear blend for fractions), away from the border."""
    vae = _vae(copy_warp=True)
    _open_centre_copy(vae)
    with torch.no_grad():
        vae.decoder.copy_head.to_flow.bias.copy_(torch.tensor([dx, dy]))
        refs = _refs(k=1)
        out = vae.decode(torch.randn(2, 16, 2, H // 8, W // 8), refs)
    ref = refs[:, 0]

    def sample(img, sx, sy):  # img(x + sx, y + sy) for whole-pixel shifts
        return torch.roll(img, shifts=(-sy, -sx), dims=(-2, -1))

    x0, y0, fx, fy = int(torch.floor(torch.tensor(dx))), int(torch.floor(torch.tensor(dy))), dx % 1, dy % 1
    expected = (
        (1 - fx) * (1 - fy) * sample(ref, x0, y0)
        + fx * (1 - fy) * sample(ref, x0 + 1, y0)
        + (1 - fx) * fy * sample(ref, x0, y0 + 1)
        + fx * fy * sample(ref, x0 + 1, y0 + 1)
    )
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    for frame in range(out.shape[2]):
        torch.testing.assert_close(out[:, :, frame][inner], expected[inner], rtol=0, atol=1e-5)


def test_copy_warp_with_zero_flow_is_the_plain_copy_and_its_flow_learns():
    """At initialisation (zero flow) a warping copy head decodes exactly what the same weights decode without the
    warp; the reconstruction loss reaches the flow head, and a flow changes the output."""
    warp = _vae(copy_warp=True)
    plain = _vae()
    plain.load_state_dict({k: v for k, v in warp.state_dict().items() if "to_flow" not in k})
    head = warp.decoder.copy_head
    with torch.no_grad():
        head.to_gate.weight.normal_(0, 0.5)
        plain.decoder.copy_head.to_gate.weight.copy_(head.to_gate.weight)
    refs, z = _refs(k=1), torch.randn(2, 16, 3, H // 8, W // 8)
    with torch.no_grad():
        torch.testing.assert_close(warp.decode(z, refs), plain.decode(z, refs), rtol=0, atol=1e-5)
    target = torch.rand(2, 3, 9, H, W) * 2 - 1
    (warp.decode(z, refs) - target).abs().mean().backward()
    assert head.to_flow.weight.grad.abs().sum() > 0 and head.to_flow.bias.grad.abs().sum() > 0
    with torch.no_grad():
        head.to_flow.weight.normal_(0, 0.3)
        assert (warp.decode(z, refs) - plain.decode(z, refs)).abs().max() > 1e-2


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [2, 2], [1, 3]])
def test_chunked_decode_with_a_warping_copy_equals_one_shot(chunks):
    vae, refs = _vae(copy_warp=True), _refs()
    with torch.no_grad():
        vae.decoder.copy_head.to_flow.weight.normal_(0, 0.3)
        vae.decoder.copy_head.to_gate.weight.normal_(0, 0.5)
    f = vae.config.spatial_factor
    z = torch.randn(2, vae.config.latent_channels, sum(chunks), H // f, W // f)
    with torch.no_grad():
        full = vae.decode(z, refs)
        streamed = torch.cat(_decode_in_chunks(vae, z, refs, chunks), dim=2)
    assert (streamed - full).abs().max().item() <= 1e-5


def test_copy_refinements_need_the_copy_head():
    for name in ("copy_warp", "copy_gate_motion", "copy_gate_hard"):
        with pytest.raises(ValueError, match=f"VAEConfig.{name}.*reference_copy: true"):
            VAEConfig.from_preset("tiny", reference_copy=False, **{name: True})


# ----------------------------------------------------------------------------- residual shortcuts


@pytest.mark.parametrize("value", [-0.5, 0.25, 0.7])
def test_shortcut_only_reconstructs_constant_video_exactly(value):
    vae = ReferenceGuidedVAE(VAEConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for module in vae.modules():  # zero every learned branch; only the non-parametric shortcuts remain
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                module.weight.zero_()
                module.bias.zero_()
        for name, p in vae.named_parameters():
            if "null_kv" in name:
                p.zero_()
            if "to_gate.bias" in name:  # the reference copy head: a closed gate (sigmoid(-1e4) == 0)
                p.fill_(-1e4)
    video = torch.full((2, 3, 9, H, W), value)
    with torch.no_grad():
        z = vae.encode(video, _refs(k=2))
        recon = vae.decode(z, _refs(k=2))
    torch.testing.assert_close(z, torch.full_like(z, value), rtol=0, atol=1e-6)
    torch.testing.assert_close(recon, video, rtol=0, atol=1e-6)
    if value in (-0.5, 0.25):  # dyadic values: every average is exact in binary floating point
        assert torch.equal(recon, video)


def test_latent_normalisation_round_trip():
    vae, refs = _vae(), _refs()
    x = _video(frames=5)
    with torch.no_grad():
        raw, _ = vae.encode_posterior(x, refs)
        recon_identity = vae.decode(vae.encode(x, refs), refs)
        vae.set_latent_stats(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
        z = vae.encode(x, refs)
        recon = vae.decode(z, refs)
    torch.testing.assert_close(z, (raw - vae.latent_mean.view(1, -1, 1, 1, 1)) / vae.latent_std.view(1, -1, 1, 1, 1))
    torch.testing.assert_close(recon, recon_identity, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="std > 0"):
        vae.set_latent_stats(torch.zeros(16), torch.zeros(16))


def test_discriminator_presets():
    d = PatchDiscriminator3D(DiscriminatorConfig.from_preset("tiny"))
    logits = d(torch.randn(2, 3, 9, 64, 64))
    assert logits.shape[:2] == (2, 1) and logits.ndim == 5
    assert set(DISCRIMINATOR_PRESETS) >= {"tiny", "patchgan3d"}


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clearly():
    vae = _vae()
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(_video(frames=8))
    with pytest.raises(ValueError, match="\\[B, 3, T, H, W\\]"):
        vae.encode(torch.zeros(1, 4, 5, H, W))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 5, 30, 32))
    with pytest.raises(ValueError, match="references must be"):
        vae.encode(_video(), torch.zeros(2, 1, 1, H, W))
    with pytest.raises(ValueError, match="reference_mask"):
        vae.encode(_video(), _refs(k=2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))
    cache = vae.new_encode_cache()
    vae.encode_chunk(_video(frames=1), cache)
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode_chunk(_video(frames=3), cache)
    with pytest.raises(ValueError, match="new_encode_cache"):
        vae.decode_chunk(torch.zeros(2, 16, 1, 4, 4), cache)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="temporal_down"):
        VAEConfig(temporal_down=(True,))
    with pytest.raises(ValueError, match="latent_channels"):
        VAEConfig(latent_channels=7)
    with pytest.raises(ValueError, match="widths"):
        VAEConfig(widths=(24, 40, 96))
    with pytest.raises(ValueError, match="attn_levels"):
        VAEConfig(attn_levels=(5,))
    with pytest.raises(ValueError, match="local_attn_levels"):
        VAEConfig(local_attn_levels=(3,))
    with pytest.raises(ValueError, match="local_window"):
        VAEConfig(local_attn_levels=(0,), local_window=4)
    with pytest.raises(KeyError, match="unknown VAE preset"):
        VAEConfig.from_preset("huge")
