"""Keypoint metrics (HKC, HKV, LBKV, LHKV, LFKV) vs direct numpy, confidence filtering, layouts, DWPose plumbing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dystream.evaluation.keypoints import (
    COCO_WHOLEBODY_133,
    DWPOSE_134,
    KeypointLayout,
    ListeningVarianceConfig,
    PoseBackend,
    coco133_to_dwpose134,
    hkc,
    hkv,
    keypoint_variance,
    listening_segments,
    listening_variances,
    mean_over_videos,
)
from dystream.evaluation.networks.dwpose import DWPoseBackend, decode_simcc
from dystream.evaluation.weights import MetricDependencyMissing, MetricWeightsMissing

L = COCO_WHOLEBODY_133


def _random_kpts(t: int, seed: int = 0, conf: float = 0.9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = np.empty((t, 133, 3))
    k[..., :2] = rng.normal(200, 30, size=(t, 133, 2))
    k[..., 2] = conf
    return k


def _direct_kv(k: np.ndarray, idx) -> float:
    xy = k[:, list(idx), :2]
    return float((0.5 * (xy[..., 0].var(axis=0) + xy[..., 1].var(axis=0))).mean())


def test_variance_equals_direct_numpy():
    k = _random_kpts(50)
    for group in ("hands", "body_no_eyes_ears", "face", "left_hand"):
        assert keypoint_variance(k, L.indices(group)) == pytest.approx(_direct_kv(k, L.indices(group)), rel=1e-12)
    assert hkv(k, L, frame_height=512) == pytest.approx(_direct_kv(k, L.indices("hands")), rel=1e-12)
    assert hkv(k, L, frame_height=1024) == pytest.approx(_direct_kv(k, L.indices("hands")) / 4, rel=1e-12)
    assert hkc(k, L) == pytest.approx(0.9)


def test_frozen_video_scores_zero():
    frozen = np.repeat(_random_kpts(1), 60, axis=0)
    assert hkv(frozen, L, 512) == 0.0
    out = listening_variances(frozen, np.zeros(60), L, frame_height=512)
    assert out["LBKV"] == out["LHKV"] == out["LFKV"] == 0.0 and out["segments"] == 1


def test_confidence_filtering():
    k = _random_kpts(40, seed=1)
    clean = keypoint_variance(k, L.indices("hands"))
    noisy = k.copy()
    noisy[::5, 91:133, :2] = 1e4  # wild detections ...
    noisy[::5, 91:133, 2] = 0.1  # ... with low confidence are ignored
    keep = np.ones(40, bool)
    keep[::5] = False
    assert keypoint_variance(noisy, L.indices("hands")) == pytest.approx(_direct_kv(k[keep], L.indices("hands")))
    assert keypoint_variance(noisy, L.indices("hands")) != pytest.approx(clean)
    # a keypoint with fewer than 2 confident frames is dropped from the group mean
    sparse = k.copy()
    sparse[1:, 91, 2] = 0.0
    rest = [i for i in L.indices("hands") if i != 91]
    assert keypoint_variance(sparse, L.indices("hands")) == pytest.approx(_direct_kv(k, rest))
    # nothing confident: NaN, not zero
    assert np.isnan(keypoint_variance(_random_kpts(10, conf=0.2), L.indices("hands")))


def test_listening_variances_per_segment_weighted():
    t = 120
    k = _random_kpts(t, seed=2)
    mask = np.ones(t)
    mask[10:40] = 0  # 30 listening frames
    mask[50:60] = 0  # 10 frames: shorter than 25, ignored
    mask[70:120] = 0  # 50 listening frames
    k[mask == 1, :, :2] += 500.0 * np.random.default_rng(3).normal(size=(int(mask.sum()), 133, 2))  # speaking motion
    out = listening_variances(k, mask, L, frame_height=512)
    assert listening_segments(mask, 25) == [(10, 40), (70, 120)]
    body = L.indices("body_no_eyes_ears")
    expected = (30 * _direct_kv(k[10:40], body) + 50 * _direct_kv(k[70:120], body)) / 80
    assert out["LBKV"] == pytest.approx(expected, rel=1e-12)
    assert out["listening_frames"] == 80 and out["segments"] == 2
    # speaking frames never enter: replacing them changes nothing
    k2 = k.copy()
    k2[mask == 1] = _random_kpts(int(mask.sum()), seed=9)
    assert listening_variances(k2, mask, L, 512) == out


def test_face_centroid_removes_head_translation():
    t = 40
    k = np.repeat(_random_kpts(1, seed=4), t, axis=0)
    k[:, :, 0] += np.linspace(0, 80, t)[:, None]  # the whole person slides sideways
    cfg_raw = ListeningVarianceConfig(face_subtract_centroid=False)
    assert listening_variances(k, np.zeros(t), L, 512)["LFKV"] == pytest.approx(0.0, abs=1e-9)
    assert listening_variances(k, np.zeros(t), L, 512, cfg_raw)["LFKV"] > 100
    assert listening_variances(k, np.zeros(t), L, 512)["LBKV"] > 100  # body keeps the translation


def test_other_layouts_and_errors():
    tiny = KeypointLayout("synthetic_8", 8, {"body": (0, 1), "hands": (2, 3, 4), "face": (5, 6, 7)})
    k = _random_kpts(30)[:, :8]
    out = listening_variances(k, np.zeros(30), tiny, 512, ListeningVarianceConfig(body_group="body"))
    assert out["LHKV"] == pytest.approx(_direct_kv(k, (2, 3, 4)))
    with pytest.raises(KeyError, match="body_no_eyes_ears"):
        listening_variances(k, np.zeros(30), tiny, 512)
    with pytest.raises(ValueError, match="outside"):
        KeypointLayout("bad", 4, {"hands": (3, 4)})
    with pytest.raises(ValueError, match="layout"):
        listening_variances(_random_kpts(30), np.zeros(30), tiny, 512)
    with pytest.raises(ValueError, match="mask"):
        listening_variances(k, np.zeros(29), tiny, 512, ListeningVarianceConfig(body_group="body"))


COCO_BODY = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle")  # fmt: skip


def test_dwpose134_layout_matches_the_shard_format():
    shard = pytest.importorskip("dystream.datamodules.keypoints")
    assert DWPOSE_134.num_keypoints == shard.NUM_KEYPOINTS and DWPOSE_134.name == shard.LAYOUT_NAME
    for group, sl in shard.GROUPS.items():
        assert DWPOSE_134.indices(group) == tuple(range(sl.start, sl.stop))
    assert [shard.NAMES[i] for i in DWPOSE_134.indices("body_no_eyes_ears")] == list(shard.BODY_NAMES[:14])

    coco = np.zeros((2, 133, 3))
    coco[..., 0] = np.arange(133)  # x = COCO index
    coco[..., 2] = 0.9
    coco[1, 6, 2] = 0.1  # right shoulder not confident in frame 1
    out = coco133_to_dwpose134(coco)
    assert out.shape == (2, 134, 3)
    for coco_index, name in enumerate(COCO_BODY):
        assert out[0, shard.index(name), 0] == coco_index, name
    neck = shard.index("neck")
    assert out[0, neck, 0] == 5.5 and out[0, neck, 2] == 1.0 and out[1, neck, 2] == 0.0
    np.testing.assert_array_equal(out[:, 18:], coco[:, 17:])  # feet, face, hands shift by one


def test_mean_over_videos_skips_nan():
    rows = [{"LHKV": 1.0, "LFKV": float("nan")}, {"LHKV": 3.0, "LFKV": 2.0}, {"LFKV": 4.0}]
    out = mean_over_videos(rows, ["LHKV", "LFKV"])
    assert out == {"LHKV": 2.0, "LHKV_videos": 2.0, "LFKV": 3.0, "LFKV_videos": 2.0}


# ---- DWPose backend plumbing (no real weights: fake onnxruntime sessions) ------------------------------------------
class _Input:
    def __init__(self, shape):
        self.name, self.shape = "input", shape


class _FakeDet:
    """YOLOX output with one person anchor: stride 32, cell (10, 7) -> box centre (320, 240), size 200."""

    def get_inputs(self):
        return [_Input([1, 3, 640, 640])]

    def run(self, _names, feeds):
        assert feeds["input"].shape == (1, 3, 640, 640)
        pred = np.zeros((1, 8400, 85), dtype=np.float32)
        pred[0, 8000 + 7 * 20 + 10, :6] = [0.0, 0.5, np.log(200 / 32), np.log(200 / 32), 0.9, 0.9]
        return [pred]


class _FakePose:
    def __init__(self, bins_x, bins_y):
        self.bins_x, self.bins_y, self.inputs = bins_x, bins_y, []

    def get_inputs(self):
        return [_Input([1, 3, 384, 288])]

    def run(self, _names, feeds):
        self.inputs.append(feeds["input"])
        sx, sy = np.zeros((1, 133, 576), np.float32), np.zeros((1, 133, 768), np.float32)
        sx[0, np.arange(133), self.bins_x] = 0.8
        sy[0, np.arange(133), self.bins_y] = 0.6
        sy[0, 0, :] = -1.0  # keypoint 0 is not found anywhere
        return [sx, sy]


def test_dwpose_backend_with_fake_sessions(tmp_path):
    det, pose = tmp_path / "yolox_l.onnx", tmp_path / "dw-ll_ucoco_384.onnx"
    det.write_bytes(b"det")
    pose.write_bytes(b"pose")
    rng = np.random.default_rng(5)
    bins_x, bins_y = rng.integers(0, 576, 133), rng.integers(0, 768, 133)
    fake_pose = _FakePose(bins_x, bins_y)
    sessions = {str(det): _FakeDet(), str(pose): fake_pose}
    backend = DWPoseBackend(det, pose, session_factory=lambda p: sessions[p])
    assert isinstance(backend, PoseBackend) and backend.layout is COCO_WHOLEBODY_133

    yy, xx = np.mgrid[0:480, 0:640]
    frame = np.stack([xx * 0.25, yy * 0.25, np.full_like(xx, 50)], axis=-1).astype(np.uint8)
    kpts = backend(frame[None])
    assert kpts.shape == (1, 133, 3) and kpts.dtype == np.float32
    # box [220, 140, 420, 340] x 1.25 -> 250 x 250, widened to 288:384 -> scale (250, 333.3), centre (320, 240)
    scale, centre = np.array([250.0, 250.0 / 0.75]), np.array([320.0, 240.0])
    expected = np.stack([bins_x, bins_y], axis=1) / 2 / np.array([288, 384]) * scale + centre - scale / 2
    np.testing.assert_allclose(kpts[0, 1:, :2], expected[1:], rtol=1e-5)
    np.testing.assert_allclose(kpts[0, 1:, 2], 0.6)
    assert kpts[0, 0, 2] < 0 and (kpts[0, 0, :2] == -1).all()
    # the pose input is the warped box, ImageNet-normalised: output pixel (144, 192) is the frame pixel (320, 240)
    x = fake_pose.inputs[0][0]
    assert x.shape == (3, 384, 288)
    np.testing.assert_allclose(x[:, 192, 144] * [58.395, 57.12, 57.375] + [123.675, 116.28, 103.53],
                               frame[240, 320], atol=1e-3)  # fmt: skip
    # the shards' layout on request
    backend134 = DWPoseBackend(det, pose, session_factory=lambda p: sessions[p], output_layout="dwpose134")
    assert backend134.layout is DWPOSE_134
    np.testing.assert_allclose(backend134(frame[None]), coco133_to_dwpose134(kpts))


def test_decode_simcc_maps_model_pixels_to_frame_pixels():
    sx, sy = np.zeros((2, 576)), np.zeros((2, 768))
    sx[:, [0, 575]], sy[:, [0, 767]] = 1.0, 1.0
    out = decode_simcc(sx[:1], sy[:1], np.array([100.0, 50.0]), np.array([288.0, 384.0]), (288, 384))
    np.testing.assert_allclose(out[0], [100 - 144, 50 - 192, 1.0])


def test_dwpose_missing_files_and_runtime(tmp_path):
    with pytest.raises(MetricWeightsMissing, match="yolox_l.onnx"):
        DWPoseBackend(None, tmp_path / "pose.onnx")
    det, pose = tmp_path / "yolox_l.onnx", tmp_path / "dw-ll_ucoco_384.onnx"
    det.write_bytes(b"x")
    with pytest.raises(MetricWeightsMissing, match="dw-ll_ucoco_384.onnx"):
        DWPoseBackend(det, pose)
    pose.write_bytes(b"y")
    if importlib.util.find_spec("onnxruntime") is None:
        with pytest.raises(MetricDependencyMissing, match="onnxruntime"):
            DWPoseBackend(det, pose)
