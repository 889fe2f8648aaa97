"""Active-speaker detection for packing: Light-ASD and S3FD at their released key names, IoU tracking, the
multi-window scoring protocol, the mix.wav split, and `pack` with ASD end to end (stub networks through the hook)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dystream.datamodules.active_speaker import (
    ActiveSpeakerDetector,
    ASDConfig,
    FaceTrack,
    LightASDScorer,
    multi_window_scores,
    select_avatar_tracks,
    smooth_track_scores,
    track_faces,
)
from dystream.datamodules.format import encode_video, encode_wav, iter_tar_samples, read_index, sample_to_clip
from dystream.datamodules.pack import active_speaker_detector, pack, split_mix
from dystream.evaluation.networks.light_asd import PRESETS as ASD_PRESETS
from dystream.evaluation.networks.light_asd import LightASD, load_light_asd
from dystream.evaluation.networks.s3fd import (
    PRESETS as S3FD_PRESETS,
)
from dystream.evaluation.networks.s3fd import (
    S3FD,
    S3FDDetector,
    S3FDFaceBoxes,
    decode_boxes,
    load_s3fd,
    prior_boxes,
)
from dystream.evaluation.weights import MetricWeightsMissing, sha256_file

# ------------------------------------------------------------------------------------------------ helpers


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, so that a load that dropped any tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                r = torch.rand(t.shape, generator=g)
                t.copy_(0.5 + r if name.endswith(("running_var", "bn_last.weight")) else 0.2 * (r - 0.5))
    return net.eval()


def _release_light_asd(net: LightASD) -> dict[str, torch.Tensor]:
    """The layout of Light-ASD's released files, written out here independently of the loader's adapter: the
    training wrapper `ASD` holds `model` (ASD_Model) and the heads `lossAV.FC` / `lossV.FC`."""
    out = {}
    for k, v in net.state_dict().items():
        if k.startswith("head_av."):
            out["lossAV.FC." + k.split(".", 1)[1]] = v
        elif k.startswith("head_v."):
            out["lossV.FC." + k.split(".", 1)[1]] = v
        else:
            out["model." + k] = v
    return out


# (key, shape) read from weight/pretrain_AVA_CVPR.model of Junhua-Liao/Light-ASD (192 tensors)
RELEASED_LIGHT_ASD = {
    "model.visualEncoder.block1.s_3.weight": (32, 1, 1, 3, 3),
    "model.visualEncoder.block1.bn_s_3.num_batches_tracked": (),
    "model.visualEncoder.block2.t_5.weight": (64, 64, 5, 1, 1),
    "model.visualEncoder.block3.last.weight": (128, 128, 1, 1, 1),
    "model.audioEncoder.block1.m_3.weight": (32, 1, 3, 1),
    "model.audioEncoder.block3.t_5.weight": (128, 128, 1, 5),
    "model.audioEncoder.block2.bn_last.running_var": (64,),
    "model.GRU.gru_forward.weight_ih_l0": (384, 128),
    "model.GRU.gru_backward.bias_hh_l0": (384,),
    "lossAV.FC.weight": (2, 128),
    "lossV.FC.bias": (2,),
}

# sfd_face.pth = TalkNet-ASD `S3FDNet.state_dict()`: VGG convolutions at these ModuleList indices, three L2Norm scales,
# four extra convolutions and six loc / conf heads: 65 tensors
S3FD_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33)
RELEASED_S3FD = (
    [f"vgg.{i}.{p}" for i in S3FD_CONV_INDICES for p in ("weight", "bias")]
    + [f"L2Norm{n}.weight" for n in ("3_3", "4_3", "5_3")]
    + [f"extras.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    + [f"{h}.{i}.{p}" for h in ("loc", "conf") for i in range(6) for p in ("weight", "bias")]
)


# ------------------------------------------------------------------------------------------------ Light-ASD


def test_light_asd_loads_the_released_layout_and_reproduces_the_network(tmp_path):
    net = _randomize(LightASD(ASD_PRESETS["light-asd"]))
    state = _release_light_asd(net)
    assert len(state) == 192
    for key, shape in RELEASED_LIGHT_ASD.items():
        assert tuple(state[key].shape) == shape, key
    path = tmp_path / "pretrain_AVA_CVPR.model"
    torch.save(state, path)
    loaded, info = load_light_asd(path)
    assert info.path == str(path) and len(info.sha256) == 64
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    mfcc, faces = torch.randn(2, 4 * 6, 13) * 10, torch.rand(2, 6, 112, 112) * 255
    with torch.no_grad():
        want = net(mfcc, faces)
    got = loaded(mfcc, faces)
    assert got.shape == (2, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a DataParallel prefix is accepted too
    torch.save({"module." + k: v for k, v in state.items()}, path)
    torch.testing.assert_close(load_light_asd(path)[0](mfcc, faces), want, rtol=1e-5, atol=1e-6)


def test_light_asd_key_mismatch_and_truncation_are_clear_errors(tmp_path):
    state = _release_light_asd(LightASD(ASD_PRESETS["light-asd"]))
    path = tmp_path / "pretrain_AVA_CVPR.model"
    broken = dict(state)
    broken["model.extra.weight"] = broken.pop("model.GRU.gru_forward.weight_ih_l0")
    torch.save(broken, path)
    with pytest.raises(MetricWeightsMissing, match=r"missing keys \['GRU.gru_forward.weight_ih_l0'\].*extra.weight"):
        load_light_asd(path)
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MetricWeightsMissing, match="pretrain_AVA_CVPR.model.*not a loadable state dict"):
        load_light_asd(path)
    with pytest.raises(MetricWeightsMissing, match="no file at"):
        load_light_asd(tmp_path / "absent.model")


def test_light_asd_shapes_and_input_checks():
    net = LightASD(ASD_PRESETS["tiny"]).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 4 * 7, 13), torch.rand(3, 7, 32, 32) * 255)
        assert out.shape == (3, 7)
        assert net.forward_visual(torch.rand(3, 7, 32, 32)).shape == (3, 7)
    with pytest.raises(ValueError, match="4 MFCC frames per video frame"):
        net(torch.randn(1, 27, 13), torch.rand(1, 7, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, T, 32, 32\]"):
        net(torch.randn(1, 28, 13), torch.rand(1, 7, 48, 48))
    with pytest.raises(ValueError, match="crop_size must be a positive multiple of 8"):
        type(ASD_PRESETS["tiny"])(crop_size=30)


@pytest.mark.skipif(not os.environ.get("DYSTREAM_LIGHT_ASD_WEIGHTS"), reason="set DYSTREAM_LIGHT_ASD_WEIGHTS")
def test_a_released_light_asd_checkpoint_loads_strictly():
    net, info = load_light_asd(os.environ["DYSTREAM_LIGHT_ASD_WEIGHTS"])
    assert net(torch.zeros(1, 100, 13), torch.full((1, 25, 112, 112), 110.0)).shape == (1, 25)


# ------------------------------------------------------------------------------------------------ S3FD


def test_s3fd_loads_sfd_face_key_names_and_reproduces_the_network(tmp_path):
    net = _randomize(S3FD(S3FD_PRESETS["s3fd"]), seed=1)
    state = net.state_dict()
    assert sorted(state) == sorted(RELEASED_S3FD)
    assert tuple(state["conf.0.weight"].shape) == (4, 256, 3, 3)  # max-out background: 3 + 1 face score
    assert tuple(state["vgg.31.weight"].shape) == (1024, 512, 3, 3)  # fc6, dilated
    path = tmp_path / "sfd_face.pth"
    torch.save(state, path)
    loaded, info = load_s3fd(path)
    x = torch.randn(1, 3, 40, 56) * 50
    with torch.no_grad():
        want = net(x)
    got = loaded(x)
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MetricWeightsMissing, match="sfd_face.pth.*not a loadable state dict"):
        load_s3fd(path)


def test_s3fd_priors_follow_the_feature_maps_and_zero_offsets_decode_to_them():
    cfg = S3FD_PRESETS["tiny"]
    net = S3FD(cfg).eval()
    with torch.no_grad():
        loc, conf, sizes = net(torch.zeros(2, 3, 45, 70))
    # pool3 rounds up: 45 -> 22 -> 11 -> 6 (conv4_3) -> 3 -> 1
    assert sizes == [(11, 17), (6, 9), (3, 4), (1, 2), (1, 1), (1, 1)]
    n = sum(h * w for h, w in sizes)
    assert loc.shape == (2, n, 4) and conf.shape == (2, n, 2)
    pri = prior_boxes((45, 70), sizes, cfg)
    # first anchor of conv4_3 (stride 8, side 32): centre (4 / 70, 4 / 45), size (32 / 70, 32 / 45)
    torch.testing.assert_close(pri[11 * 17], torch.tensor([4 / 70, 4 / 45, 32 / 70, 32 / 45]))
    boxes = decode_boxes(torch.zeros(n, 4), pri, cfg.variances)
    torch.testing.assert_close((boxes[:, :2] + boxes[:, 2:]) / 2, pri[:, :2])
    torch.testing.assert_close(boxes[:, 2:] - boxes[:, :2], pri[:, 2:])


class _PlantedS3FD(S3FD):
    """A tiny S3FD whose outputs are planted: faces at two conv3_3 anchors (the second overlapping the first) and
    at one conv4_3 anchor (twice the size)."""

    def forward(self, x):
        loc, conf, sizes = super().forward(x)
        loc = torch.zeros_like(loc)
        conf = torch.zeros_like(conf)
        conf[..., 1] = -10.0  # background everywhere
        offsets = np.cumsum([0] + [h * w for h, w in sizes])
        for layer, i, j, logit in ((0, 2, 3, 5.0), (0, 2, 4, 4.0), (1, 4, 7, 3.0)):
            conf[:, offsets[layer] + i * sizes[layer][1] + j, 1] = logit
        return loc, conf, sizes


def test_s3fd_detector_thresholds_and_suppresses_and_returns_frame_pixels():
    det = S3FDDetector(_PlantedS3FD(S3FD_PRESETS["tiny"]), scale=0.5, conf_threshold=0.9)
    frames = np.zeros((3, 96, 160, 3), dtype=np.uint8)  # detected at 80 x 48: conv3_3 is 20 x 12 (stride 4)
    out = det(frames)
    assert len(out) == 3 and all(d.shape == (2, 5) for d in out)
    # conv3_3 anchor (row 2, col 3): centre (3.5, 2.5) x 4 = (14, 10) px of the 80 x 48 image, side 16; x2 in frame
    # pixels. Anchor (2, 4) overlaps it (IoU 0.6 > 0.3) with a lower score: suppressed. conv4_3 anchor (4, 7): centre
    # (7.5, 4.5) x 8 = (60, 36), side 32.
    np.testing.assert_allclose(out[0][0, :4], [12, 4, 44, 36], atol=1e-4)
    np.testing.assert_allclose(out[0][1, :4], [88, 40, 152, 104], atol=1e-4)
    assert out[0][0, 4] > out[0][1, 4] > 0.9
    boxes = S3FDFaceBoxes(det)(frames)
    assert boxes.shape == (3, 4)
    np.testing.assert_allclose(boxes, np.tile([88, 40, 152, 104], (3, 1)), atol=1e-4)  # the largest face
    assert len(S3FDDetector(_PlantedS3FD(S3FD_PRESETS["tiny"]), 0.99, scale=0.5)(frames)[0]) == 1
    none = S3FDFaceBoxes(S3FDDetector(_PlantedS3FD(S3FD_PRESETS["tiny"]), 0.9999, scale=0.5))(frames)
    assert np.isnan(none).all()
    with pytest.raises(ValueError, match="at least 32"):
        det(frames, scale=0.25)  # 40 x 24 pixels: too small for five VGG poolings
    # at scale 1 the same anchors are half as large in frame pixels
    np.testing.assert_allclose(det(frames[:1], scale=1.0)[0][0, :4], [6, 2, 22, 18], atol=1e-4)


# ------------------------------------------------------------------------------------------------ tracking


def _box(x: float, y: float, s: float = 40.0, score: float = 0.99) -> list[float]:
    return [x, y, x + s, y + s, score]


def test_two_crossing_faces_give_two_continuous_tracks():
    t = np.arange(40)
    a = [_box(5.0 * i, 100) for i in t]  # moving right
    b = [_box(195.0 - 5.0 * i, 120) for i in t]  # moving left, half a face lower: IoU with a < 0.5 at the crossing
    dets = [np.array([a[i], b[i]] if i % 2 else [b[i], a[i]]) for i in t]  # detection order must not matter
    tracks = track_faces(dets)
    assert len(tracks) == 2
    for track in tracks:
        assert track.frames.tolist() == t.tolist() and track.detections == 40
        steps = np.diff(track.boxes[:, 0])
        assert np.all(steps == steps[0]) and abs(steps[0]) == 5.0  # never jumps to the other face


def test_a_gap_within_the_tolerance_is_bridged_and_interpolated():
    # a slowly moving face: the box after the gap still overlaps the last one before it by IoU > 0.5
    dets = [np.array([_box(0.5 * i, 50)]) if not 10 <= i < 18 else np.zeros((0, 5)) for i in range(30)]
    (track,) = track_faces(dets, max_missed=10)
    assert track.frames.tolist() == list(range(30)) and track.detections == 22
    np.testing.assert_allclose(track.boxes[:, 0], 0.5 * np.arange(30))  # the gap linearly interpolated
    # one more missing frame than allowed: the track ends, the rest starts a new one
    dets = [np.array([_box(0.5 * i, 50)]) if not 10 <= i < 21 else np.zeros((0, 5)) for i in range(40)]
    assert [t.frames.tolist() for t in track_faces(dets, max_missed=10, min_track=5)] == [
        list(range(10)),
        list(range(21, 40)),
    ]


def test_tracks_need_more_than_min_track_detections():
    short = [np.array([_box(0, 0)])] * 10 + [np.zeros((0, 5))] * 20
    assert track_faces(short, min_track=10) == []  # exactly min_track: dropped (the reference's `>`)
    longer = [np.array([_box(0, 0)])] * 11 + [np.zeros((0, 5))] * 20
    assert len(track_faces(longer, min_track=10)) == 1
    with pytest.raises(ValueError, match="frame 1"):
        track_faces([np.zeros((0, 5)), np.ones((2, 3))])


def test_the_avatar_is_the_large_central_long_track_and_its_continuations():
    def track(frames, x, y, s):
        f = np.asarray(frames)
        return FaceTrack(f, np.tile([x, y, x + s, y + s], (len(f), 1)).astype(float), len(f))

    tracks = [
        track(range(0, 100), 0, 0, 30),  # small face in a corner for the whole clip
        track(range(0, 60), 70, 60, 100),  # the avatar: large and central
        track(range(75, 100), 75, 65, 100),  # the avatar again after a long miss
        track(range(50, 100), 180, 60, 50),  # someone else, overlapping in time
    ]
    assert select_avatar_tracks(tracks, (220, 240)) == [1, 2]


# ------------------------------------------------------------------------------------------------ scoring


def _context_scorer(mfcc: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """A scorer whose output depends on the whole window (so window lengths matter): per frame, its own audio level
    minus the window mean, plus a face brightness term."""
    level = mfcc[..., 0].reshape(mfcc.shape[0], -1, 4).mean(-1)  # [B, n]
    return level - level.mean(axis=1, keepdims=True) + faces.mean(axis=(2, 3)) / 255.0


def test_multi_window_scores_and_smoothing_equal_the_reference_loops():
    rng = np.random.default_rng(0)
    n_frames = 171  # 6.84 s: partial last windows for every duration
    mfcc = rng.normal(size=(4 * n_frames - 1, 13)) * 3  # the 4L - 1 MFCC frames of a track's audio
    faces = rng.integers(0, 256, size=(n_frames, 8, 8), dtype=np.uint8)
    got = multi_window_scores(_context_scorer, mfcc, faces, durations=(1, 2, 3, 4, 5, 6))
    # Light-ASD `evaluate_network`, one window at a time
    length = min((len(mfcc) - len(mfcc) % 4) / 100, len(faces))
    a, v = mfcc[: int(round(length * 100))], faces[: int(round(length * 25))]
    all_scores = []
    for d in (1, 2, 3, 4, 5, 6):
        scores = []
        for i in range(int(np.ceil(length / d))):
            scores.extend(
                _context_scorer(a[None, i * d * 100 : (i + 1) * d * 100], v[None, i * d * 25 : (i + 1) * d * 25])[0]
            )
        all_scores.append(scores)
    want = np.round(np.mean(np.array(all_scores), axis=0), 1)
    assert len(want) == n_frames - 1
    np.testing.assert_array_equal(got, want)
    # the demos' per-frame smoothing over the track's frames
    smooth = smooth_track_scores(got, n_frames)
    loop = [np.mean(got[max(f - 2, 0) : min(f + 3, len(got) - 1)]) for f in range(n_frames)]
    np.testing.assert_allclose(smooth, loop, rtol=0, atol=1e-12)
    assert smooth_track_scores(np.array([0.5]), 3).tolist() == [0.5, 0.5, 0.5]  # empty windows take the score


def test_batched_light_asd_windows_equal_one_window_at_a_time():
    net = _randomize(LightASD(ASD_PRESETS["tiny"]), seed=3)
    scorer = LightASDScorer(net)
    rng = np.random.default_rng(1)
    mfcc = rng.normal(size=(4 * 60, 13)).astype(np.float32) * 5
    faces = rng.integers(0, 256, size=(60, 32, 32), dtype=np.uint8)
    got = multi_window_scores(scorer, mfcc, faces, durations=(1, 2), round_decimals=None)
    want = []
    for d in (1, 2):
        w = 25 * d
        want.append(np.concatenate([scorer(mfcc[None, 4 * s : 4 * (s + w)], faces[None, s : s + w])[0]
                                    for s in range(0, 60, w)]))  # fmt: skip
    np.testing.assert_allclose(got, np.mean(want, axis=0), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ mix split


def test_split_mix_is_complete_silent_where_listening_and_fades_at_turns():
    rng = np.random.default_rng(2)
    mask = np.array([0] * 5 + [1] * 10 + [0] * 3 + [1] * 2, dtype=np.uint8)
    mix = rng.normal(size=mask.size * 640).astype(np.float32) * 0.1
    own, other = split_mix(mix, mask)
    frame = np.repeat(mask, 640)
    np.testing.assert_allclose(own + other, mix, rtol=0, atol=1e-7)
    assert not own[frame == 0].any()  # silent on every listening frame
    inner = np.repeat(np.convolve(mask, [1, 1, 1], "same") == 3, 640)  # speaking frames away from a turn
    np.testing.assert_array_equal(own[inner], mix[inner])
    assert not other[inner].any()
    # the fade: within the first speaking frame the gain rises from ~0 to 1 over 160 samples
    g = own[5 * 640 : 5 * 640 + 160] / mix[5 * 640 : 5 * 640 + 160]
    assert np.all(np.diff(g) > 0) and g[0] < 0.01 and g[-1] > 0.99
    np.testing.assert_array_equal(own[5 * 640 + 160 : 6 * 640], mix[5 * 640 + 160 : 6 * 640])
    with pytest.raises(ValueError, match=r"\[T \* 640\]"):
        split_mix(mix[:-1], mask)


# ------------------------------------------------------------------------------------------------ packing


class _StubDetect:
    """One face box in the middle of every bright frame, none on dark frames."""

    def __call__(self, frames: np.ndarray, scale: float) -> list[np.ndarray]:
        h, w = frames.shape[1:3]
        return [np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4, 0.99]]) if f.mean() > 40 else np.zeros((0, 5))
                for f in frames]  # fmt: skip


def _loud_scorer(mfcc: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """+1 where the frame's audio has energy (MFCC c0 = log frame energy), -1 where it is digital silence."""
    return np.where(mfcc[..., 0].reshape(mfcc.shape[0], -1, 4).mean(-1) > 0, 1.0, -1.0)


def _clip_folder(root: Path, name: str, brightness: int, with_self: bool = False) -> np.ndarray:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    frames = np.clip(brightness + rng.integers(-10, 10, size=(50, 64, 64, 3)), 0, 255).astype(np.uint8)
    (folder / "clip.mp4").write_bytes(encode_video(frames))
    mix = np.zeros(50 * 640, dtype=np.float32)
    mix[: 25 * 640] = (rng.normal(size=25 * 640) * 0.2).astype(np.float32)  # the avatar talks for 1 s, then silence
    (folder / "mix.wav").write_bytes(encode_wav(mix))
    if with_self:
        (folder / "self.wav").write_bytes(encode_wav(mix * 0.5))
    return np.round(np.clip(mix, -1, 1) * 32767) / 32767


def test_pack_with_asd_splits_a_mixed_track_and_round_trips(tmp_path):
    src = tmp_path / "raw"
    mix = _clip_folder(src, "talk", brightness=128)
    _clip_folder(src, "dark", brightness=5)  # no face anywhere
    _clip_folder(src, "own", brightness=128, with_self=True)
    asd = ActiveSpeakerDetector(_StubDetect(), _loud_scorer, crop_size=112)
    index = pack(src, tmp_path / "out", workers=1, asd=asd)
    assert index["skipped"] == {} and index["total_samples"] == 3
    clips = {}
    for entry in read_index(tmp_path / "out")["shards"]:
        for s in iter_tar_samples(tmp_path / "out" / entry["name"]):
            clips[s["__key__"]] = sample_to_clip(s)

    talk = clips["talk"]
    assert talk.meta["mask_source"] == "light-asd"
    np.testing.assert_array_equal(talk.mask, [1] * 25 + [0] * 25)
    assert talk.meta["asd"]["frames_without_face"] == 0 and talk.meta["asd"]["avatar_tracks"] == 1
    scores = talk.meta["asd_scores"]
    assert len(scores) == 50 and scores[0] == 1.0 and scores[-1] == -1.0
    assert "speaking frames" in talk.meta["self_audio"] and "listening frames" in talk.meta["partner_audio"]
    assert not talk.audio_self[25 * 640 :].any()  # silent while listening
    assert not talk.audio_other[: 24 * 640].any()  # the partner track is silent while the avatar talks
    np.testing.assert_allclose(talk.audio_self + talk.audio_other, mix, rtol=0, atol=2.5 / 32767)

    dark = clips["dark"]  # no face: not speaking, reported, scores null
    assert not dark.mask.any() and dark.meta["asd"]["frames_without_face"] == 50
    assert dark.meta["asd_scores"] == [None] * 50 and not dark.audio_self.any()

    own = clips["own"]  # self.wav given: kept as is, the partner is mix - self; the mask still from ASD
    assert own.meta["mask_source"] == "light-asd" and own.meta["partner_audio"] == "mix.wav - self.wav"
    np.testing.assert_array_equal(own.mask, talk.mask)
    np.testing.assert_allclose(own.audio_self, mix * 0.5, rtol=0, atol=1.5 / 32767)
    assert json.loads(json.dumps(own.meta)) == own.meta


def test_a_mixed_track_without_asd_is_skipped_naming_the_options(tmp_path):
    _clip_folder(tmp_path / "raw", "talk", brightness=128)
    _clip_folder(tmp_path / "raw", "own", brightness=128, with_self=True)
    index = pack(tmp_path / "raw", tmp_path / "out", workers=1)
    assert list(index["skipped"]) == ["talk"]
    assert "self.wav" in index["skipped"]["talk"] and "--asd-weights" in index["skipped"]["talk"]


def test_the_two_weight_options_go_together_and_are_checked_first(tmp_path):
    missing = tmp_path / "no-clips-here"  # the options fail before the input folder is looked at
    with pytest.raises(ValueError, match="--asd-weights needs --face-detector-weights"):
        pack(missing, tmp_path / "out", asd_weights="x.model")
    with pytest.raises(ValueError, match="--face-detector-weights needs --asd-weights"):
        pack(missing, tmp_path / "out", face_detector_weights="sfd_face.pth")
    with pytest.raises(FileNotFoundError, match="--asd-weights 'nope.model': no such file"):
        pack(missing, tmp_path / "out", asd_weights="nope.model", face_detector_weights="nope.pth")
    asd_path, det_path = tmp_path / "pretrain_AVA_CVPR.model", tmp_path / "sfd_face.pth"
    torch.save(_release_light_asd(LightASD()), asd_path)
    det_path.write_bytes(b"not a checkpoint")
    with pytest.raises(MetricWeightsMissing, match="sfd_face.pth"):
        pack(missing, tmp_path / "out", asd_weights=asd_path, face_detector_weights=det_path)

    from argparse import ArgumentParser

    from dystream.datamodules import cli

    parser = ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["pack", "--in", str(missing), "--out", str(tmp_path / "o"), "--asd-weights", "a"])
    assert cli.run(args) == 2


def test_weight_options_take_zoo_entry_names(tmp_path, monkeypatch):
    from dystream.zoo import get_entry
    from dystream.zoo.cache import import_files

    cache = tmp_path / "cache"
    monkeypatch.setenv("DYSTREAM_CACHE", str(cache))
    asd_path, det_path = tmp_path / "pretrain_AVA_CVPR.model", tmp_path / "sfd_face.pth"
    torch.save(_release_light_asd(LightASD()), asd_path)
    torch.save(S3FD(S3FD_PRESETS["s3fd"]).state_dict(), det_path)
    import_files(get_entry("light-asd.ava"), [asd_path], cache, trust=True)  # no published hash: pinned here
    import_files(get_entry("s3fd.sfd-face"), [det_path], cache, trust=True)
    asd = active_speaker_detector("light-asd.ava", "s3fd_face")  # an entry name and an alias
    assert asd.weights["asd"]["sha256"] == sha256_file(asd_path)
    assert asd.weights["face_detector"]["sha256"] == sha256_file(det_path)
    assert Path(asd.weights["asd"]["path"]).parent.name == "light-asd.ava"
    assert isinstance(asd.detect, S3FDDetector) and asd.crop_size == 112
    assert ASDConfig().durations == (1, 2, 3, 4, 5, 6)


def test_worker_processes_get_the_hook_or_load_the_checked_files(tmp_path):
    src = tmp_path / "raw"
    _clip_folder(src, "talk", brightness=128)
    _clip_folder(src, "own", brightness=128, with_self=True)
    asd = ActiveSpeakerDetector(_StubDetect(), _loud_scorer, crop_size=112)
    index = pack(src, tmp_path / "a", workers=2, asd=asd)  # the hook is pickled to the workers
    assert index["total_samples"] == 2 and index["skipped"] == {}
    # from weight files, each worker loads them itself; S3FD then refuses the 64 x 64 frames (16 px at x0.25)
    asd_path, det_path = tmp_path / "pretrain_AVA_CVPR.model", tmp_path / "sfd_face.pth"
    torch.save(_release_light_asd(LightASD()), asd_path)
    torch.save(S3FD(S3FD_PRESETS["s3fd"]).state_dict(), det_path)
    with pytest.raises(RuntimeError, match="S3FD needs at least 32"):
        pack(src, tmp_path / "b", workers=2, asd_weights=asd_path, face_detector_weights=det_path)
