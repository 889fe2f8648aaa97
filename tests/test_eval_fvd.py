"""FVD: hash-checked TorchScript loading, clip sampling, the StyleGAN-V call convention, the distance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from dystream.evaluation.fvd import ClipSampler, I3DExtractor, as_cthw, fvd, fvd_stats
from dystream.evaluation.networks import i3d
from dystream.evaluation.networks.i3d import I3D_CALL_KWARGS, load_i3d_torchscript
from dystream.evaluation.weights import MetricWeightsMissing

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # the I3D artefact is TorchScript


class _ScriptedI3D(torch.nn.Module):
    """A small stand-in with the I3D TorchScript's signature: uint8 [B, 3, T, H, W] -> [B, 400]."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        v = x.float()
        if rescale:
            v = v / 127.5 - 1
        return self.proj(v.mean(dim=(2, 3, 4)))


@pytest.fixture()
def scripted(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_ScriptedI3D()), str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_loader_refuses_a_wrong_hash_before_deserialising(scripted, monkeypatch):
    path, digest = scripted
    calls = []
    monkeypatch.setattr(i3d.torch.jit, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(MetricWeightsMissing, match="expected " + "0" * 64):
        load_i3d_torchscript(path, sha256="0" * 64)
    with pytest.raises(MetricWeightsMissing, match="sha256"):
        load_i3d_torchscript(path, sha256=None)  # no hash, no load
    assert calls == []


def test_loader_accepts_the_matching_hash(scripted):
    path, digest = scripted
    module, info = load_i3d_torchscript(path, sha256=digest.upper())
    assert info.sha256 == digest and "unverified" in info.verification
    out = module(torch.zeros(2, 3, 16, 8, 8, dtype=torch.uint8), **I3D_CALL_KWARGS)
    assert out.shape == (2, 400)


def test_loader_missing_file_messages(tmp_path):
    with pytest.raises(MetricWeightsMissing, match="i3d_torchscript.pt") as err:
        load_i3d_torchscript(None, sha256=None)
    assert "dystream zoo import i3d_torchscript PATH" in str(err.value)
    with pytest.raises(MetricWeightsMissing, match="no file at"):
        load_i3d_torchscript(tmp_path / "nope.pt", sha256="0" * 64)


def test_clip_sampler_rules():
    s = ClipSampler(clip_len=16, clips_per_video=3, rule="uniform")
    assert s.starts(100) == [0, 42, 84] and s.starts(16) == [0, 0, 0] and s.starts(15) == []
    r = ClipSampler(clips_per_video=4, rule="random", seed=7)
    assert r.starts(100, video_index=3) == r.starts(100, video_index=3)  # reproducible
    assert r.starts(100, 3) != r.starts(100, 4) and all(0 <= x <= 84 for x in r.starts(100, 3))
    assert ClipSampler(rule="first").starts(40) == [0]
    strided = ClipSampler(clip_len=4, stride=3, rule="first")
    video = torch.arange(20, dtype=torch.uint8).view(1, 20, 1, 1).expand(3, 20, 2, 2)
    clip = strided.clips(video)
    assert clip.shape == (1, 3, 4, 2, 2) and clip[0, 0, :, 0, 0].tolist() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="clips_per_video"):
        ClipSampler(rule="first", clips_per_video=2)


def test_video_layouts():
    thwc = np.random.default_rng(0).integers(0, 256, (20, 8, 10, 3), dtype=np.uint8)
    cthw = as_cthw(thwc)
    assert cthw.shape == (3, 20, 8, 10) and torch.equal(cthw.permute(1, 2, 3, 0), torch.from_numpy(thwc))
    model_out = torch.rand(3, 20, 8, 10) * 2 - 1
    assert as_cthw(model_out).dtype == torch.uint8
    with pytest.raises(ValueError, match="ambiguous"):
        as_cthw(torch.zeros(3, 5, 5, 3))


class _RecordingExtractor:
    """Fake I3D that records the call convention and returns a feature of the clip content."""

    def __init__(self):
        self.calls = []

    def __call__(self, clips, **kwargs):
        self.calls.append((clips.dtype, tuple(clips.shape), kwargs))
        v = clips.double()
        per_frame = v.mean(dim=(1, 3, 4))  # [B, T]
        return torch.cat([per_frame, per_frame.std(dim=1, keepdim=True)], dim=1)  # [B, T + 1]


def test_fvd_pipeline_call_convention_and_distance():
    rng = np.random.default_rng(1)
    real = [rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8) for _ in range(6)]
    fake = [np.clip(v.astype(int) // 2 + 60, 0, 255).astype(np.uint8) for v in real]
    short = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    fake_i3d = _RecordingExtractor()
    ext = I3DExtractor(fake_i3d, batch_size=2)
    sampler = ClipSampler(clips_per_video=2, rule="uniform")
    s_real = fvd_stats(real + [short], ext, sampler)
    s_fake = fvd_stats(fake, ext, sampler)
    assert all(c == (torch.uint8, (2, 3, 16, 12, 12), I3D_CALL_KWARGS) for c in fake_i3d.calls)
    assert s_real.n == 12 and s_real.meta["skipped_videos"] == "1" and s_fake.meta["skipped_videos"] == "0"
    # the first clip of the first video is frames 0..15, the second frames 24..39
    np.testing.assert_allclose(s_real.features[0, :16], real[0][:16].astype(np.float64).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(s_real.features[1, :16], real[0][24:40].astype(np.float64).mean(axis=(1, 2, 3)))
    assert abs(fvd(s_real, fvd_stats(real, ext, sampler))) < 1e-6
    assert fvd(s_real, s_fake) > 1.0
    with pytest.raises(ValueError, match="differ in protocol"):
        fvd(s_real, fvd_stats(real, ext, ClipSampler(clip_len=17)))
