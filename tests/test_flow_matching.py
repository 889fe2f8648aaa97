"""Teacher rectified-flow loss: parity with the formula, reference frame without loss, CFG dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dystream.diffusion.sampling import LISTEN_KEY, TALK_KEY
from dystream.objectives.flow_matching import (
    DropoutMasks,
    FlowMatchingConfig,
    FlowMatchingObjective,
    apply_audio_dropout,
    draw_dropout_masks,
    flow_matching_loss,
)

B, C, F, H, W, T, D = 3, 4, 4, 2, 3, 12, 5


def fake_denoiser(x, sigma, cond):
    """A fixed non-trivial function of every input (state, per-frame sigma, both audio keys)."""
    v = torch.sin(x) * (1 + sigma[:, None, :, None, None]) - 0.3 * x
    for key, w in ((TALK_KEY, 0.7), (LISTEN_KEY, -0.4)):
        if cond.get(key) is not None:
            v = v + w * cond[key].mean(dim=(1, 2))[:, None, None, None, None]
    return v


def tensors(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, C, F, H, W, generator=g, dtype=dtype)
    eps = torch.randn(B, C, F, H, W, generator=g, dtype=dtype)
    sigma = torch.tensor([0.1, 0.5, 0.95], dtype=dtype)
    cond = {
        TALK_KEY: torch.rand(B, T, D, generator=g, dtype=dtype),
        LISTEN_KEY: torch.rand(B, T, D, generator=g, dtype=dtype),
    }
    return x0, eps, sigma, cond


def test_loss_equals_direct_formula():
    x0, eps, sigma, cond = tensors()
    loss, logs = flow_matching_loss(fake_denoiser, x0, cond, sigma, eps)
    # direct, sample by sample: frame 0 clean at sigma 0, frames 1.. at the sample's sigma
    total = 0.0
    for i in range(B):
        s_frames = torch.tensor([0.0] + [float(sigma[i])] * (F - 1), dtype=x0.dtype)
        x_t = torch.stack([(1 - s_frames[j]) * x0[i, :, j] + s_frames[j] * eps[i, :, j] for j in range(F)], dim=1)
        c_i = {k: v[i : i + 1] for k, v in cond.items()}
        v = fake_denoiser(x_t[None], s_frames[None], c_i)[0]
        total = total + ((v[:, 1:] - (eps[i, :, 1:] - x0[i, :, 1:])) ** 2).mean()
    torch.testing.assert_close(loss, (total / B).float(), rtol=1e-6, atol=0)
    assert set(logs) >= {"loss", "sigma_mean", "drop_talk", "drop_listen", "drop_reference"}
    assert float(logs["drop_talk"]) == 0.0


def test_weighted_loss_is_a_weighted_mean_that_ignores_zero_weight_positions():
    x0, eps, sigma, cond = tensors()
    base, _ = flow_matching_loss(fake_denoiser, x0, cond, sigma, eps)
    uniform, _ = flow_matching_loss(fake_denoiser, x0, cond, sigma, eps, weight=torch.full((B, 1, F - 1, H, W), 3.0))
    torch.testing.assert_close(uniform, base)  # a constant weight leaves the loss unchanged
    weight = torch.zeros(B, 1, F - 1, H, W)
    weight[:, :, :, 0, 0] = 1.0  # only one latent cell per frame counts

    def wild_elsewhere(x, s, c):  # the prediction changes only where the weight is 0
        v = fake_denoiser(x, s, c).clone()
        v[:, :, 1:, 1:] += 100.0
        return v

    one_cell, _ = flow_matching_loss(fake_denoiser, x0, cond, sigma, eps, weight=weight)
    torch.testing.assert_close(flow_matching_loss(wild_elsewhere, x0, cond, sigma, eps, weight=weight)[0], one_cell)
    assert not torch.allclose(flow_matching_loss(wild_elsewhere, x0, cond, sigma, eps)[0], base)
    with pytest.raises(ValueError, match="does not broadcast"):
        flow_matching_loss(fake_denoiser, x0, cond, sigma, eps, weight=torch.ones(B, 1, F, H, W))


def test_reference_frame_gets_no_loss_and_stays_clean():
    x0, eps, sigma, cond = tensors()
    seen = {}

    def recording(x, s, c):
        seen["x"], seen["sigma"] = x, s
        return fake_denoiser(x, s, c)

    base, _ = flow_matching_loss(recording, x0, cond, sigma, eps)
    assert torch.equal(seen["x"][:, :, 0], x0[:, :, 0])  # bit-exact reference in the input
    assert seen["sigma"][:, 0].eq(0).all() and torch.equal(seen["sigma"][:, 1:], sigma[:, None].expand(B, F - 1))

    def wild_frame0(x, s, c):
        v = fake_denoiser(x, s, c).clone()
        v[:, :, 0] = 1e6
        return v

    assert torch.equal(flow_matching_loss(wild_frame0, x0, cond, sigma, eps)[0], base)
    # gradient reaches every prediction except the reference frame's
    pred = torch.randn(B, C, F, H, W, dtype=x0.dtype, requires_grad=True)
    loss, _ = flow_matching_loss(lambda x, s, c: pred, x0, cond, sigma, eps)
    loss.backward()
    assert pred.grad[:, :, 0].eq(0).all() and pred.grad[:, :, 1:].ne(0).all()


def test_audio_dropout_zeroes_features_per_sample():
    x0, eps, sigma, cond = tensors()
    cfg = FlowMatchingConfig()
    masks = DropoutMasks(
        talk=torch.tensor([False, True, True]),
        listen=torch.tensor([True, False, True]),
        reference=torch.ones(B, dtype=torch.bool),
    )
    out = apply_audio_dropout(cond, masks, cfg)
    assert out[TALK_KEY][0].eq(0).all() and torch.equal(out[TALK_KEY][1:], cond[TALK_KEY][1:])
    assert out[LISTEN_KEY][1].eq(0).all() and torch.equal(out[LISTEN_KEY][[0, 2]], cond[LISTEN_KEY][[0, 2]])
    assert apply_audio_dropout({TALK_KEY: None}, masks, cfg)[TALK_KEY] is None
    # the loss with dropped audio is the loss of the denoiser seeing zero features
    seen = {}

    def recording(x, s, c):
        seen.update(c)
        return fake_denoiser(x, s, c)

    loss, logs = flow_matching_loss(recording, x0, cond, sigma, eps, masks, cfg)
    assert seen[TALK_KEY][0].eq(0).all() and seen[LISTEN_KEY][1].eq(0).all()
    zeroed = dict(cond, **{TALK_KEY: out[TALK_KEY], LISTEN_KEY: out[LISTEN_KEY]})
    torch.testing.assert_close(loss, flow_matching_loss(fake_denoiser, x0, zeroed, sigma, eps)[0])
    assert float(logs["drop_talk"]) == pytest.approx(1 / 3) and float(logs["drop_listen"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode", ["zeros", "noise"])
def test_reference_dropout(mode):
    x0, eps, sigma, cond = tensors()
    cfg = FlowMatchingConfig(reference_drop=mode)
    masks = DropoutMasks.keep_all(B)
    masks.reference = torch.tensor([True, False, True])
    seen = {}

    def recording(x, s, c):
        seen["x"], seen["sigma"] = x, s
        return fake_denoiser(x, s, c)

    loss, logs = flow_matching_loss(recording, x0, cond, sigma, eps, masks, cfg)
    x_in, s_in = seen["x"], seen["sigma"]
    assert torch.equal(x_in[[0, 2], :, 0], x0[[0, 2], :, 0]) and s_in[[0, 2], 0].eq(0).all()
    if mode == "zeros":
        assert x_in[1, :, 0].eq(0).all() and s_in[1, 0] == 0
    else:
        assert torch.equal(x_in[1, :, 0], eps[1, :, 0]) and s_in[1, 0] == 1
    # generated frames and targets are unchanged by reference dropout
    torch.testing.assert_close(
        x_in[:, :, 1:], (1 - sigma.view(B, 1, 1, 1, 1)) * x0[:, :, 1:] + sigma.view(B, 1, 1, 1, 1) * eps[:, :, 1:]
    )
    assert float(logs["drop_reference"]) == pytest.approx(1 / 3)


def test_dropout_probabilities():
    g = torch.Generator().manual_seed(0)
    cfg = FlowMatchingConfig(p_drop_talk=0.3, p_drop_listen=0.0, p_drop_reference=1.0)
    m = draw_dropout_masks(20000, cfg, generator=g)
    assert (~m.talk).float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert m.listen.all() and not m.reference.any()
    # the three decisions are independent draws
    both = ((~m.talk) & (torch.rand(20000, generator=g) < 0.5)).float().mean().item()
    assert both == pytest.approx(0.15, abs=0.015)


def test_objective_is_the_pieces_in_order():
    x0, _, _, cond = tensors(torch.float32)
    obj = FlowMatchingObjective(FlowMatchingConfig(p_drop_talk=0.5, p_drop_listen=0.5, p_drop_reference=0.5))
    loss, _ = obj(fake_denoiser, x0, cond, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    sigma = obj.sample_sigma(B, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    masks = obj.sample_masks(B, generator=g)
    expected, _ = flow_matching_loss(fake_denoiser, x0, cond, sigma, eps, masks, obj.config)
    assert torch.equal(loss, expected)


def test_loss_goes_down_on_a_tiny_problem():
    torch.manual_seed(0)
    x0 = torch.randn(4, 2, 3, 4, 4) * 0.5 + 1.0
    cond = {TALK_KEY: torch.zeros(4, T, D), LISTEN_KEY: torch.zeros(4, T, D)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv3d(3, 32, 1), nn.SiLU(), nn.Conv3d(32, 2, 1))

        def forward(self, x, sigma, c):
            s = sigma[:, None, :, None, None].expand(x.shape[0], 1, *x.shape[2:])
            return self.net(torch.cat([x, s], dim=1))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    obj = FlowMatchingObjective(FlowMatchingConfig(shift=1.0))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss, _ = obj(net, x0, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_bad_input_and_config():
    x0, eps, sigma, cond = tensors()
    with pytest.raises(ValueError, match="p_drop_talk"):
        FlowMatchingConfig(p_drop_talk=1.5)
    with pytest.raises(ValueError, match="reference_drop"):
        FlowMatchingConfig(reference_drop="blur")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma must be"):
        flow_matching_loss(fake_denoiser, x0, cond, sigma[:2], eps)
    with pytest.raises(ValueError, match="eps"):
        flow_matching_loss(fake_denoiser, x0, cond, sigma, eps[:, :, :2])
    with pytest.raises(ValueError, match="latent frames"):
        flow_matching_loss(fake_denoiser, x0[:, :, :1], cond, sigma, eps[:, :, :1])
    with pytest.raises(ValueError, match="denoiser returned"):
        flow_matching_loss(lambda x, s, c: x[:, :, 1:], x0, cond, sigma, eps)


def test_region_loss_weight_marks_the_latent_cells_a_keypoint_box_touches():
    from dystream.datamodules.keypoints import MOUTH, NUM_KEYPOINTS
    from dystream.objectives.flow_matching import region_loss_weight

    kpts = torch.zeros(2, 8, NUM_KEYPOINTS, 3)
    n = MOUTH.stop - MOUTH.start
    kpts[:, :, MOUTH, 0] = torch.linspace(6.0, 9.0, n)  # lips over pixel columns 6..9: latent columns 0 and 1
    kpts[:, :, MOUTH, 1] = torch.linspace(10.0, 11.0, n)  # rows 10..11: latent row 1
    kpts[:, :, MOUTH, 2] = 1.0
    kpts[1, 4:, :, 2] = 0.0  # no confident lips in the second latent frame of sample 1
    w = region_loss_weight(kpts, MOUTH, (16, 16), (2, 2, 2), extra=4.0, pad=0.0)
    assert w.shape == (2, 1, 2, 2, 2)
    expected = torch.ones(2, 1, 2, 2, 2)
    expected[:, :, :, 1, :] = 5.0
    expected[1, :, 1] = 1.0
    assert torch.equal(w, expected)
    with pytest.raises(ValueError, match="do not divide"):
        region_loss_weight(kpts, MOUTH, (16, 16), (3, 2, 2), extra=4.0)
