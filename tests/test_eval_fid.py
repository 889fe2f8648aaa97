"""FID network: real key names, the TF1 resize, strict weights_only loading, missing-weights errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dystream.evaluation.fid import FIDExtractor, fid, load_fid_inception, to_uint8
from dystream.evaluation.frechet import FeatureStats
from dystream.evaluation.networks.inception import FIDInceptionV3, resize_bilinear_tf1
from dystream.evaluation.weights import MetricUnavailable, MetricWeightsMissing

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so that loading is observable
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_state_dict_keys_match_the_pytorch_fid_network(net):
    """pytorch-fid loads the weights file strictly into torchvision's InceptionV3(num_classes=1008, no aux)."""
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())


def _tf1_resize_loop(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF 1.x resize_bilinear (align_corners=False, no half-pixel centres), written out per output pixel."""
    in_h, in_w = img.shape
    sy, sx = np.float32(in_h / out_h), np.float32(in_w / out_w)
    out = np.zeros((out_h, out_w), dtype=np.float64)
    for i in range(out_h):
        y = np.float32(i) * sy
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, in_h - 1), float(y - y0)
        for j in range(out_w):
            x = np.float32(j) * sx
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, in_w - 1), float(x - x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (11, 4)), ((13, 9), (6, 17)), ((8, 8), (8, 8))])
def test_tf1_resize_matches_the_tf_formula(in_hw, out_hw):
    img = torch.randint(0, 256, (1, 2, *in_hw)).float()
    got = resize_bilinear_tf1(img, out_hw)
    for c in range(2):
        np.testing.assert_allclose(got[0, c].numpy(), _tf1_resize_loop(img[0, c].numpy(), *out_hw), atol=1e-3)
    if in_hw == out_hw:
        assert torch.equal(got, img)


def test_tf1_resize_differs_from_torch_half_pixel_bilinear():
    img = torch.randint(0, 256, (1, 3, 64, 64)).float()
    ours = resize_bilinear_tf1(img, (299, 299))
    torch_resize = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - torch_resize).abs().max() > 1.0  # the two conventions really differ: FID results name the resize


def test_forward_shapes_and_input_checks(net):
    images = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)
    with torch.no_grad():
        x = net.preprocess(images)
        feats = net(images)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() < 1
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert (feats >= 0).all()  # pool3 averages ReLU outputs
    with pytest.raises(ValueError, match="uint8"):
        net(images.float())


def test_load_roundtrip_reports_the_file(net, tmp_path):
    path = tmp_path / WEIGHTS_NAME
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # old-style file
    torch.save(state, path)
    loaded, info = load_fid_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.path == str(path) and "6726825d" in info.verification  # a random file: prefix MISMATCH reported
    ref = net.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items() if not k.endswith("num_batches_tracked"))


def test_missing_or_wrong_weights_raise_the_documented_error(net, tmp_path):
    with pytest.raises(MetricWeightsMissing, match=WEIGHTS_NAME) as err:
        load_fid_inception(None)
    assert "dystream zoo import fid_inception PATH" in str(err.value)
    with pytest.raises(MetricWeightsMissing, match="no file at"):
        load_fid_inception(tmp_path / "absent.pth")
    bad = tmp_path / "bad.pth"
    state = net.state_dict()
    state["Mixed_5b.extra.weight"] = torch.zeros(1)
    torch.save(state, bad)
    with pytest.raises(MetricWeightsMissing, match="unexpected keys"):
        load_fid_inception(bad)
    pickled = tmp_path / "pickled.pth"
    torch.save({"fc.weight": np.float64}, pickled)  # not loadable with weights_only=True
    with pytest.raises(MetricUnavailable):
        load_fid_inception(pickled)


class _TinyNet(torch.nn.Module):
    """A stand-in extractor for the pipeline tests: uint8 [B, 3, H, W] -> [B, 6]."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x):
        assert x.dtype == torch.uint8
        return self.proj(x.float().mean(dim=(2, 3)) / 255)


def test_extractor_pipeline_and_protocol_checks():
    ext = FIDExtractor(_TinyNet(), batch_size=3)
    videos = torch.rand(10, 3, 16, 16) * 2 - 1  # [-1, 1] floats are converted like StyleGAN-V
    feats = ext(videos)
    assert feats.shape == (10, 6) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, ext(to_uint8(videos).permute(0, 2, 3, 1).numpy()))  # [N, H, W, 3] accepted
    real = ext.stats([torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8) for _ in range(3)])
    fake = ext.stats([torch.randint(0, 128, (8, 3, 16, 16), dtype=torch.uint8) for _ in range(3)])
    assert real.n == 24 and real.meta["resize"] == "tf1-bilinear-299"
    assert fid(real, fake) > 0
    other = FeatureStats(meta={**fake.meta, "sha256": "0" * 64}).update(np.random.default_rng(0).normal(size=(9, 6)))
    with pytest.raises(ValueError, match="differ in protocol"):
        fid(real, other)
