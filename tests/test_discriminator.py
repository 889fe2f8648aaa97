"""Consistency-aware discriminator: block-feature taps of the backbone, logit shapes, what each head responds to,
teacher initialisation, config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from dystream.models.discriminator import (
    ConsistencyAwareDiscriminator,
    DiscriminatorConfig,
    default_feature_layers,
)
from dystream.models.dit import AvatarDiT, DiTConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP hand-offs that dominate (tens of times slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Wan's init zeroes the head and the audio outputs; perturb everything so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _inputs(b: int = 2, f: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, 8, 8, generator=g)
    sigma = torch.full((b, f), 0.6)
    sigma[:, 0] = 0  # the clean reference frame
    talk = torch.randn(b, 4 * (f - 1), 32, generator=g)
    listen = torch.randn(b, 4 * (f - 1), 32, generator=g)
    return x, sigma, talk, listen


@pytest.fixture(scope="module")
def backbone() -> AvatarDiT:
    torch.manual_seed(0)
    return _randomise(AvatarDiT(DiTConfig.from_preset("tiny", num_layers=3))).eval()


@pytest.fixture(scope="module")
def disc(backbone) -> ConsistencyAwareDiscriminator:
    torch.manual_seed(1)
    return ConsistencyAwareDiscriminator.from_backbone(backbone).eval()


# -------------------------------------------------------------------------------------------- backbone taps
def test_block_features_equal_the_block_outputs_of_a_full_forward(backbone):
    x, sigma, talk, listen = _inputs()
    seen = {}
    hooks = [
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach().clone()))
        for i, blk in enumerate(backbone.blocks)
    ]
    try:
        v = backbone(x, sigma, talk, listen)  # full forward, velocity
        feats = backbone(x, sigma, talk, listen, return_block_features=[0, 2, 2])
    finally:
        for h in hooks:
            h.remove()
    assert v.shape == x.shape
    assert len(feats) == 3
    for tap, layer in zip(feats, (0, 2, 2), strict=True):
        assert tap.shape == (2, 4, 16, backbone.config.dim)  # [B, F, S, dim]
        torch.testing.assert_close(tap, seen[layer])
    # the last block's tokens through the head give the velocity: the tap is the true residual stream
    e, _ = backbone._embed_time(sigma)
    v2 = rearrange(backbone.head(feats[-1], e), "b f (h w) (q r c) -> b c f (h q) (w r)", h=4, q=2, r=2)
    torch.testing.assert_close(v2, v, atol=1e-5, rtol=1e-5)


def test_block_features_stop_after_the_last_tap(backbone):
    x, sigma, talk, listen = _inputs()
    ran = []
    hooks = [blk.register_forward_hook(lambda *a, i=i: ran.append(i)) for i, blk in enumerate(backbone.blocks)]
    try:
        backbone(x, sigma, talk, listen, return_block_features=[1])
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]


@pytest.mark.parametrize("bad", [[], [3], [-1], [2, 1]])
def test_block_features_reject_bad_indices(backbone, bad):
    x, sigma, _, _ = _inputs()
    with pytest.raises(ValueError, match="return_block_features"):
        backbone(x, sigma, return_block_features=bad)


# -------------------------------------------------------------------------------------------- logits
def test_one_logit_per_generated_frame_and_one_per_clip(disc):
    for f in (2, 4, 7):
        x, sigma, talk, listen = _inputs(b=3, f=f)
        out = disc(x, sigma, talk, listen)
        assert out.frame_logits.shape == (3, f - 1)
        assert out.global_logit.shape == (3,)
        assert out.features.shape == (3, f, disc.config.feature_dim)
        assert torch.isfinite(out.frame_logits).all() and torch.isfinite(out.global_logit).all()


def test_samples_are_judged_independently(disc):
    x, sigma, talk, listen = _inputs(b=3)
    out = disc(x, sigma, talk, listen)
    one = disc(x[1:2], sigma[1:2], talk[1:2], listen[1:2])
    torch.testing.assert_close(one.frame_logits, out.frame_logits[1:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.global_logit, out.global_logit[1:2], atol=1e-5, rtol=1e-5)


def test_local_head_is_per_frame(disc):
    """Local logits read only their own frame's feature: changing frame j's feature changes logit j alone."""
    feats = torch.randn(2, 5, disc.config.feature_dim)
    base = disc.heads(feats)
    swapped = feats.clone()
    swapped[:, 2] = torch.randn(2, disc.config.feature_dim)
    out = disc.heads(swapped)
    changed = (out.frame_logits - base.frame_logits).abs() > 1e-6
    assert changed[:, 1].all()  # frame 2 is generated frame index 1
    assert not changed[:, [0, 2, 3]].any()


def test_global_logit_responds_to_one_frames_identity_and_ignores_frame_order(disc):
    """The global branch compares the reference with the set of following frames (§3.1.2)."""
    g = torch.Generator().manual_seed(3)
    d = disc.config.feature_dim
    clip_a = torch.randn(1, 1, d, generator=g) + 0.1 * torch.randn(1, 5, d, generator=g)  # one identity
    clip_b = torch.randn(1, 1, d, generator=g) + 0.1 * torch.randn(1, 5, d, generator=g)  # another identity
    base = disc.heads(clip_a).global_logit
    for j in range(1, 5):
        swapped = clip_a.clone()
        swapped[:, j] = clip_b[:, j]  # frame j now shows clip b's person
        assert (disc.heads(swapped).global_logit - base).abs().item() > 1e-4
    permuted = clip_a[:, [0, 3, 1, 4, 2]]  # same frames, another order (the reference stays first)
    torch.testing.assert_close(disc.heads(permuted).global_logit, base, atol=1e-6, rtol=1e-5)
    # ... and the full model: swapping one latent frame for another clip's moves the clip's global logit
    x, sigma, talk, listen = _inputs(b=2)
    out = disc(x, sigma, talk, listen)
    x_swap = x.clone()
    x_swap[0, :, 2] = x[1, :, 2]
    out_swap = disc(x_swap, sigma, talk, listen)
    assert (out_swap.global_logit[0] - out.global_logit[0]).abs().item() > 1e-5
    torch.testing.assert_close(out_swap.global_logit[1], out.global_logit[1])


def test_global_branch_learns_identity_consistency_that_the_local_branch_cannot_see():
    """Clips whose frames share one identity vs. clips with one frame from another identity: every single frame is
    equally plausible (same marginal), so only the reference-to-frames branch can separate them."""
    torch.manual_seed(0)
    cfg = DiscriminatorConfig.from_preset("tiny")
    disc = ConsistencyAwareDiscriminator(cfg)
    d, f = cfg.feature_dim, 4

    def clips(n: int, g: torch.Generator):
        real = torch.randn(n, 1, d, generator=g) + 0.1 * torch.randn(n, f, d, generator=g)
        fake = real.clone()
        j = torch.randint(1, f, (n,), generator=g)
        fake[torch.arange(n), j] = torch.randn(n, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
        return real, fake, j

    params = [*disc.local_head.parameters(), *disc.global_head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        real, fake, _ = clips(32, g)
        r, k = disc.heads(real), disc.heads(fake)
        loss = F.softplus(k.global_logit - r.global_logit).mean()
        loss = loss + F.softplus(k.frame_logits - r.frame_logits).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake, j = clips(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        r, k = disc.heads(real), disc.heads(fake)
    global_acc = (r.global_logit > k.global_logit).float().mean().item()
    idx = torch.arange(512)
    local_acc = (r.frame_logits[idx, j - 1] > k.frame_logits[idx, j - 1]).float().mean().item()
    assert global_acc > 0.85, global_acc
    assert abs(local_acc - 0.5) < 0.1, local_acc


def test_without_the_global_branch_there_is_no_global_logit(backbone):
    disc = ConsistencyAwareDiscriminator.from_backbone(backbone, global_branch=False)
    assert disc.global_head is None
    out = disc(*_inputs())
    assert out.global_logit is None and out.frame_logits.shape == (2, 3)


# -------------------------------------------------------------------------------------------- init and config
def test_backbone_starts_from_the_teacher_and_is_a_copy(backbone, disc):
    for (k, a), b in zip(disc.backbone.state_dict().items(), backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    p = next(disc.backbone.parameters())
    assert p.data_ptr() != next(backbone.parameters()).data_ptr()


def test_unused_modules_get_no_gradient_and_everything_else_does(backbone):
    disc = ConsistencyAwareDiscriminator.from_backbone(backbone, feature_layers=(0, 0, 1))
    out = disc(*_inputs())
    (out.frame_logits.sum() + out.global_logit.sum()).backward()
    unused = {id(p) for m in disc.unused_modules() for p in m.parameters()}
    assert unused == {id(p) for m in (disc.backbone.head, disc.backbone.blocks[2]) for p in m.parameters()}
    for name, p in disc.named_parameters():
        assert (p.grad is None) == (id(p) in unused), name


def test_default_feature_layers_and_presets():
    assert default_feature_layers(30, 3) == (9, 19, 29)
    assert default_feature_layers(2, 3) == (0, 0, 1)
    assert default_feature_layers(6, 3) == (1, 3, 5)
    wan = DiscriminatorConfig.from_preset("wan2.2-ti2v-5b")
    assert wan.feature_layers == (13, 21, 29) and wan.num_qformers == 3  # Self-Forcing's taps, N_Q = 3 (§4.1)
    deeper = DiscriminatorConfig.from_preset("tiny", backbone=DiTConfig.from_preset("tiny", num_layers=6))
    assert deeper.feature_layers == (1, 3, 5)
    two = DiscriminatorConfig.from_preset("tiny", num_qformers=2)
    assert two.feature_layers == (0, 1)
    rebuilt = DiscriminatorConfig(**dataclasses.asdict(wan))  # from a JSON-like dict
    assert rebuilt == wan


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"feature_layers": (0, 5, 1)}, "feature_layers"),
        ({"feature_layers": (0, 1)}, "feature_layers"),
        ({"num_qformers": 0}, "num_qformers"),
        ({"qformer_dim": 30, "qformer_heads": 4}, "qformer_dim"),
        ({"feature_dim": 30, "global_heads": 4}, "feature_dim"),
        ({"queries_per_frame": 0}, "queries_per_frame"),
    ],
)
def test_bad_config_fails_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"DiscriminatorConfig.{field}"):
        DiscriminatorConfig(backbone=DiTConfig.from_preset("tiny"), **overrides)


def test_bad_inputs_fail_clearly(disc):
    x, sigma, _, _ = _inputs(f=1)
    with pytest.raises(ValueError, match="F >= 2"):
        disc(x, sigma)
    with pytest.raises(KeyError, match="unknown discriminator preset"):
        DiscriminatorConfig.from_preset("huge")
    other = AvatarDiT(DiTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="differs"):
        ConsistencyAwareDiscriminator.from_backbone(other, DiscriminatorConfig.from_preset("wan2.2-ti2v-5b"))
