"""Sync-C / Sync-D: the offset search against syncnet_python's loop, MFCC parity, SyncNet v2 layout, face crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fftpack
import torch
import torch.nn.functional as F

from dystream.evaluation.keypoints import COCO_WHOLEBODY_133
from dystream.evaluation.mfcc import fbank, mel_filterbank, mfcc, num_mfcc_frames
from dystream.evaluation.networks.syncnet import SyncNetConfig, SyncNetV2, load_syncnet
from dystream.evaluation.sync import (
    KeypointFaceBoxes,
    PoseFaceBoxes,
    SyncNetScorer,
    SyncScores,
    crop_faces,
    face_boxes_from_keypoints,
    framewise_confidence,
    speaking_segments,
    sync_scores,
)
from dystream.evaluation.weights import MetricWeightsMissing


# ---- the pure part: syncnet_python's calc_pdist + evaluate, written as loops ----------------------------------------
def _reference_scores(im_feat: torch.Tensor, cc_feat: torch.Tensor, vshift: int):
    win_size = vshift * 2 + 1
    feat2p = F.pad(cc_feat, (0, 0, vshift, vshift))
    dists = [F.pairwise_distance(im_feat[[i], :].repeat(win_size, 1), feat2p[i : i + win_size, :])
             for i in range(len(im_feat))]  # fmt: skip
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    return int(vshift - minidx), float(torch.median(mdist) - minval), float(minval), torch.stack(dists).numpy()


@pytest.mark.parametrize("vshift,t", [(15, 40), (5, 12), (15, 8)])
def test_sync_scores_match_the_reference_loop(vshift, t):
    g = torch.Generator().manual_seed(vshift + t)
    v = torch.randn(t, 32, generator=g, dtype=torch.float64)
    a = torch.randn(t, 32, generator=g, dtype=torch.float64)
    offset, conf, minval, dists = _reference_scores(v, a, vshift)
    got = sync_scores(v.numpy(), a.numpy(), vshift=vshift)
    assert got.offset == offset
    assert got.sync_c == pytest.approx(conf, rel=1e-12)
    assert got.sync_d == pytest.approx(minval, rel=1e-12)
    np.testing.assert_allclose(got.dists, dists, rtol=1e-12)
    assert framewise_confidence(got).shape == (t,)


@pytest.mark.parametrize("shift", [-4, 0, 3])
def test_sync_scores_recover_a_planted_offset(shift):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(80, 16))
    v = base[20:60]
    a = base[20 + shift : 60 + shift] + 0.05 * rng.normal(size=(40, 16))  # audio leads the video by `shift` frames
    got = sync_scores(v, a, vshift=15)
    assert got.offset == shift
    assert got.sync_c > 1.0 and got.sync_d < got.sync_c


def test_sync_scores_input_checks():
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        sync_scores(np.zeros((5, 4)), np.zeros((6, 4)))


# ---- MFCC -----------------------------------------------------------------------------------------------------------
def _reference_mfcc(sig: np.ndarray, fs: int = 16000) -> np.ndarray:
    """python_speech_features.mfcc with defaults, written out step by step with loops."""
    sig = np.append(sig[0], sig[1:] - 0.97 * sig[:-1])
    flen, fstep, nfft, nfilt = 400, 160, 512, 26
    nframes = 1 if len(sig) <= flen else 1 + int(math.ceil((len(sig) - flen) / fstep))
    pad = np.concatenate([sig, np.zeros((nframes - 1) * fstep + flen - len(sig))])
    frames = np.array([pad[i * fstep : i * fstep + flen] for i in range(nframes)])
    pspec = 1.0 / nfft * np.square(np.absolute(np.fft.rfft(frames, nfft)))
    energy = np.sum(pspec, 1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    mel = np.linspace(2595 * np.log10(1 + 0 / 700.0), 2595 * np.log10(1 + (fs / 2) / 700.0), nfilt + 2)
    bins = np.floor((nfft + 1) * (700 * (10 ** (mel / 2595.0) - 1)) / fs)
    fb = np.zeros([nfilt, nfft // 2 + 1])
    for j in range(nfilt):
        for i in range(int(bins[j]), int(bins[j + 1])):
            fb[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(int(bins[j + 1]), int(bins[j + 2])):
            fb[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feat = pspec @ fb.T
    feat = np.where(feat == 0, np.finfo(float).eps, feat)
    feat = scipy.fftpack.dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :13]
    feat = (1 + 11.0 * np.sin(np.pi * np.arange(13) / 22)) * feat
    feat[:, 0] = np.log(energy)
    return feat


def test_mfcc_matches_the_reference_computation():
    rng = np.random.default_rng(0)
    sig = (rng.normal(size=16000 + 123) * 3000).astype(np.int16)  # int16 scale, as SyncNet reads its wav files
    np.testing.assert_allclose(mfcc(sig), _reference_mfcc(sig.astype(np.float64)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mel_filterbank().sum(), _filterbank_sum_reference(), rtol=1e-12)


def _filterbank_sum_reference() -> float:
    # sum of all triangle weights, from the loop definition in _reference_mfcc
    mel = np.linspace(0, 2595 * np.log10(1 + 8000 / 700.0), 28)
    bins = np.floor(513 * (700 * (10 ** (mel / 2595.0) - 1)) / 16000)
    total = 0.0
    for j in range(26):
        total += sum((i - bins[j]) / (bins[j + 1] - bins[j]) for i in range(int(bins[j]), int(bins[j + 1])))
        total += sum((bins[j + 2] - i) / (bins[j + 2] - bins[j + 1]) for i in range(int(bins[j + 1]), int(bins[j + 2])))
    return total


def test_mfcc_frame_counts_at_100_hz():
    for t in (6, 25, 101):
        assert num_mfcc_frames(640 * t) == 4 * t - 1  # 4 MFCC frames per 25 fps video frame
        assert mfcc(np.ones(640 * t)).shape == (4 * t - 1, 13)
    assert num_mfcc_frames(400) == 1 and num_mfcc_frames(401) == 2
    assert mfcc(np.zeros(100)).shape == (1, 13)  # silence: eps floors, no -inf
    assert np.isfinite(mfcc(np.zeros(1000))).all()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_pure_tone_lands_in_the_right_mel_filter(freq):
    t = np.arange(16000) / 16000
    energies, _ = fbank(10000 * np.sin(2 * np.pi * freq * t), preemph=0.0)
    centres = np.array([np.argmax(row) for row in mel_filterbank()]) * 16000 / 513  # peak bin of each filter, in Hz
    assert np.argmax(energies.mean(axis=0)) == np.argmin(np.abs(centres - freq))


# ---- SyncNet v2 -----------------------------------------------------------------------------------------------------
# syncnet_python SyncNetModel.S, transcribed: (sequential index, weight shape) of every conv / linear and BatchNorm
_AUD_CONV = {0: (64, 1, 3, 3), 4: (192, 64, 3, 3), 8: (384, 192, 3, 3), 11: (256, 384, 3, 3), 14: (256, 256, 3, 3),
             18: (512, 256, 5, 4)}  # fmt: skip
_LIP_CONV = {0: (96, 3, 5, 7, 7), 4: (256, 96, 1, 5, 5), 8: (256, 256, 1, 3, 3), 11: (256, 256, 1, 3, 3),
             14: (256, 256, 1, 3, 3), 18: (512, 256, 1, 6, 6)}  # fmt: skip


def _expected_syncnet_keys() -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for stream, convs in (("netcnnaud", _AUD_CONV), ("netcnnlip", _LIP_CONV)):
        for i, shape in convs.items():
            keys[f"{stream}.{i}.weight"], keys[f"{stream}.{i}.bias"] = shape, (shape[0],)
            for b in ("weight", "bias", "running_mean", "running_var"):
                keys[f"{stream}.{i + 1}.{b}"] = (shape[0],)
            keys[f"{stream}.{i + 1}.num_batches_tracked"] = ()
    for head in ("netfcaud", "netfclip"):
        keys[f"{head}.0.weight"], keys[f"{head}.0.bias"] = (512, 512), (512,)
        for b in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{head}.1.{b}"] = (512,)
        keys[f"{head}.1.num_batches_tracked"] = ()
        keys[f"{head}.3.weight"], keys[f"{head}.3.bias"] = (1024, 512), (1024,)
    return keys


@pytest.fixture(scope="module")
def syncnet() -> SyncNetV2:
    torch.manual_seed(0)
    return SyncNetV2().eval()


def test_syncnet_v2_key_names_and_embedding_shapes(syncnet):
    assert {k: tuple(v.shape) for k, v in syncnet.state_dict().items()} == _expected_syncnet_keys()
    with torch.no_grad():
        assert syncnet.forward_aud(torch.randn(3, 1, 13, 20)).shape == (3, 1024)
        assert syncnet.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)
    with pytest.raises(ValueError, match=r"\[B, 1, 13, 20\]"):
        syncnet.forward_aud(torch.randn(1, 1, 13, 19))
    with pytest.raises(ValueError, match="crop_size"):
        SyncNetConfig(crop_size=112)


def test_syncnet_loading(syncnet, tmp_path):
    path = tmp_path / "syncnet_v2.model"
    torch.save({k: v for k, v in syncnet.state_dict().items() if "num_batches" not in k}, path)
    net, info = load_syncnet(path)
    assert info.name == "syncnet_v2" and not net.training
    x = torch.randn(2, 1, 13, 20)
    with torch.no_grad():
        assert torch.equal(net.forward_aud(x), syncnet.forward_aud(x))
    with pytest.raises(MetricWeightsMissing, match="syncnet_v2.model") as err:
        load_syncnet(None)
    assert "dystream zoo import syncnet_v2 PATH" in str(err.value)
    state = syncnet.state_dict()
    del state["netfclip.3.bias"]
    torch.save(state, tmp_path / "partial.model")
    with pytest.raises(MetricWeightsMissing, match="netfclip.3.bias"):
        load_syncnet(tmp_path / "partial.model")


def test_scorer_windows_match_the_reference_evaluate(syncnet):
    """SyncNetInstance.evaluate's tensor building (BGR stack, cct layout, 4v:4v+20 windows), as a loop."""
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)  # RGB
    audio = rng.normal(size=8 * 640 + 100) * 0.1  # float in [-1, 1]: scaled to int16 range inside
    scorer = SyncNetScorer(syncnet, min_segment_frames=6)
    v_emb, a_emb = scorer.embed(crops, audio)

    images = [c[:, :, ::-1] for c in crops]  # what cv2.imread of the RGB crops would give (BGR)
    im = np.transpose(np.expand_dims(np.stack(images, axis=3), 0), (0, 3, 4, 1, 2))
    imtv = torch.from_numpy(im.astype(float)).float()
    cc = mfcc(audio * 32768.0).T[None, None]
    cct = torch.from_numpy(cc.astype(float)).float()
    lastframe = min(len(images), math.floor(len(audio) / 640)) - 5
    with torch.no_grad():
        im_feat = syncnet.forward_lip(torch.cat([imtv[:, :, v : v + 5] for v in range(lastframe)]))
        cc_feat = syncnet.forward_aud(torch.cat([cct[:, :, :, 4 * v : 4 * v + 20] for v in range(lastframe)]))
    assert v_emb.shape == (3, 1024)
    torch.testing.assert_close(v_emb, im_feat)
    torch.testing.assert_close(a_emb, cc_feat)


def test_scorer_scores_speaking_segments_only(syncnet, monkeypatch):
    scorer = SyncNetScorer(syncnet, min_segment_frames=10)
    seen = []

    def fake_score(crops, audio):
        seen.append((crops.shape, len(audio)))
        value = float(len(seen))
        return SyncScores(0, value, 10.0 * value, np.zeros((len(crops) - 5, 31)))

    monkeypatch.setattr(scorer, "score_crops", fake_score)
    t = 60
    frames = np.zeros((t, 64, 48, 3), dtype=np.uint8)
    mask = np.zeros(t)
    mask[2:14] = 1  # 12 frames: scored
    mask[20:25] = 1  # 5 frames: too short
    mask[30:60] = 1  # 30 frames: scored
    boxes = np.tile([10.0, 10.0, 30.0, 34.0], (t, 1))
    result = scorer(frames, np.zeros(t * 640), box_source=lambda f: boxes, mask=mask, box_source_name="gt")
    assert result.segments == [(2, 14), (30, 60)]
    assert seen == [((12, 224, 224, 3), 12 * 640), ((30, 224, 224, 3), 30 * 640)]
    assert result.sync_c == pytest.approx((12 * 1 + 30 * 2) / 42)  # frame-weighted over segments
    assert result.sync_d == pytest.approx(10 * (12 * 1 + 30 * 2) / 42)
    assert result.as_dict()["box_source"] == "gt"


# ---- face crops and boxes -------------------------------------------------------------------------------------------
def test_crop_rule_geometry_padding_and_smoothing():
    h = w = 200
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    frames = np.repeat(frame[None], 15, axis=0)
    boxes = np.tile([80.0, 80.0, 120.0, 120.0], (15, 1))  # centre (100, 100), s = 20
    boxes[7] = [0, 0, 200, 200]  # one outlier detection, removed by the 13-frame median filter
    crops = crop_faces(frames, boxes)
    # rows [100 - 20, 100 + 20 * 1.8) = [80, 136), columns [100 - 28, 100 + 28) = [72, 128), resized 56 -> 224
    region = torch.from_numpy(frame[80:136, 72:128].copy()).permute(2, 0, 1)[None].float()
    expected = F.interpolate(region, size=(224, 224), mode="bilinear", align_corners=False)
    expected = expected[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(crops[7], expected)
    np.testing.assert_array_equal(crops[0], expected)
    # a box at the corner reads the constant 110 padding
    # box centred on the frame corner, s = 10: rows [-10, 18), columns [-14, 14), 28 -> 224 (x8)
    corner = crop_faces(frames[:1], np.array([[-10.0, -10.0, 10.0, 10.0]]))
    assert (corner[0, :76, :] == 110).all() and (corner[0, :, :108] == 110).all()
    assert (corner[0, 84:, 116:] != 110).any()


def test_face_boxes_from_keypoints_filter_confidence():
    layout = COCO_WHOLEBODY_133
    k = np.zeros((3, 133, 3))
    face = list(layout.indices("face"))
    k[:, face, 0] = np.linspace(50, 90, len(face))
    k[:, face, 1] = np.linspace(20, 60, len(face))
    k[:, face, 2] = 0.9
    k[0, face[0], :] = [0, 0, 0.1]  # a low-confidence outlier is ignored
    k[2, face, 2] = 0.1  # no confident face point: NaN box
    boxes = face_boxes_from_keypoints(k, face)
    np.testing.assert_allclose(boxes[1], [50, 20, 90, 60])
    assert boxes[0, 0] > 50 and np.isnan(boxes[2]).all()
    scaled = KeypointFaceBoxes(k, face, scale=2.0)(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    np.testing.assert_allclose(scaled[1], [30, 0, 110, 80])


def test_pose_backend_as_box_source():
    class FakePose:  # any PoseBackend works, e.g. DWPoseBackend with its ONNX files
        layout = COCO_WHOLEBODY_133

        def __call__(self, frames):
            k = np.zeros((len(frames), 133, 3), dtype=np.float32)
            k[:, 23:91] = [30.0, 40.0, 0.9]
            k[:, 23] = [10.0, 20.0, 0.9]
            return k

    boxes = PoseFaceBoxes(FakePose())(np.zeros((4, 64, 64, 3), dtype=np.uint8))
    np.testing.assert_allclose(boxes, np.tile([10.0, 20.0, 30.0, 40.0], (4, 1)))


def test_speaking_segments():
    mask = [0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert speaking_segments(mask, 3) == [(1, 4), (5, 11)]
    assert speaking_segments(mask, 4) == [(5, 11)]
