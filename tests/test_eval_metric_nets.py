"""The synthetic world's metric networks: SmallSyncNet (contrastive training, Sync-C on real vs shifted audio) and the
SimCC keypoint regressor; their export, loading and the "missing weights" message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dystream.datamodules.synthetic import make_clip
from dystream.evaluation.keypoints import DWPOSE_134
from dystream.evaluation.metric_nets import load_metric_pose, load_metric_syncnet
from dystream.evaluation.networks.pose_small import (
    PRESETS as POSE_PRESETS,
)
from dystream.evaluation.networks.pose_small import (
    PoseNetBackend,
    PoseRegressor,
    PoseRegressorConfig,
    frames_to_input,
)
from dystream.evaluation.networks.syncnet_small import PRESETS, SmallSyncNet, SmallSyncNetConfig
from dystream.evaluation.sync import KeypointFaceBoxes, SyncNetScorer
from dystream.evaluation.train_pose import augment, simcc_loss
from dystream.evaluation.train_syncnet import (
    contrastive_sync_loss,
    lip_sequence,
    make_pairs,
    mfcc_sequence,
)
from dystream.evaluation.weights import MetricUnavailable, MetricWeightsMissing
from dystream.stages.metric_pose import PoseTrainer
from dystream.stages.metric_syncnet import SyncNetTrainer
from dystream.zoo.files import save_model


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: torch's intra-op threads only add synchronisation here (several times slower on a busy 2-core
    # machine), so these tests run single-threaded and restore the setting afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clips():
    # four validation clips of the synthetic world, 64x64, 3 s: exact keypoints, masks and voices
    return [make_clip(seed=0, split="val", index=i, size=64, seconds=3.0) for i in range(4)]


def _batch(clips, t: int) -> dict:
    video = torch.stack([torch.from_numpy(c.video[:t]).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
    return {
        "video": video,  # [B, 3, T, H, W] in [-1, 1]
        "audio_self": torch.stack([torch.from_numpy(c.audio_self[: t * 640]) for c in clips]),
        "mask": torch.stack([torch.from_numpy(c.mask[:t].astype(np.float32)) for c in clips]),
        "kpts": torch.stack([torch.from_numpy(c.kpts[:t]) for c in clips]),
    }


# -- SmallSyncNet -----------------------------------------------------------------------------------


def test_small_syncnet_shapes_and_pooling_commutes_with_windowing():
    net = SmallSyncNet(PRESETS["tiny"]).eval()
    crops = torch.rand(2, 3, 9, 224, 224) * 255
    pooled = net.prepare_lip(crops)  # [2, 3, 9, 16, 16]
    assert pooled.shape == (2, 3, 9, 16, 16)
    with torch.no_grad():
        full = net.forward_lip(crops[:, :, 2:7])  # the scorer's 224x224 windows
        pre = net.forward_lip(pooled[:, :, 2:7])  # windows of a pooled sequence (training)
        aud = net.forward_aud(torch.randn(2, 1, 13, 20))
    torch.testing.assert_close(full, pre)
    assert full.shape == aud.shape == (2, 16)
    with pytest.raises(ValueError, match="5 frames"):
        net.forward_lip(pooled[:, :, :4])
    with pytest.raises(ValueError, match=r"\[B, 1, 13, 20\]"):
        net.forward_aud(torch.randn(2, 1, 13, 21))


def test_small_syncnet_config_names_bad_fields():
    with pytest.raises(ValueError, match="crop_size"):
        SmallSyncNetConfig(crop_size=20)
    with pytest.raises(ValueError, match="lip_frames"):
        SmallSyncNetConfig(lip_frames=4)
    with pytest.raises(ValueError, match="width"):
        SmallSyncNetConfig(width=0)


def test_contrastive_loss_matches_its_equation():
    lip = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    aud = torch.tensor([[3.0, 4.0], [3.0, 4.0], [30.0, 40.0]])  # distances 5, 5, 50
    label = torch.tensor([1, 0, 0])
    # y d^2 / 2 = 12.5; (margin - d)^2 / 2 = 12.5 with margin 10; beyond the margin: 0
    assert contrastive_sync_loss(lip, aud, label, margin=10.0).item() == pytest.approx((12.5 + 12.5 + 0.0) / 3)


def test_pairs_are_off_sync_by_the_configured_shifts_and_skip_silent_negatives():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 40))
    masks[:, 10:30] = 1
    pairs = make_pairs(masks, positions=20, min_shift=3, max_shift=15, p_other_clip=0.3, rng=rng)
    pos = [p for p in pairs if p[4] == 1]
    neg = [p for p in pairs if p[4] == 0]
    assert len(pos) == 3 * 20 and all(i == j and v == u for i, v, j, u, _ in pos)
    assert neg and all(3 <= abs(u - v) <= 15 for i, v, j, u, _ in neg if i == j)
    assert any(i != j for i, _, j, _, _ in neg)  # some shuffled-audio negatives
    silent = lambda i, v: masks[i, v : v + 5].max() == 0  # noqa: E731
    assert not any(silent(i, v) and silent(j, u) for i, v, j, u, _ in neg)


def test_syncnet_training_step_lowers_the_loss(clips):
    torch.manual_seed(0)
    trainer = SyncNetTrainer(preset="tiny", positions=8, lr=3e-3)
    batch = _batch(clips[:2], 24)
    lip, aud, label = trainer.pair_tensors(batch, np.random.default_rng(0), jitter=0.0)
    opt = torch.optim.Adam(trainer.net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = contrastive_sync_loss(trainer.net.forward_lip(lip), trainer.net.forward_aud(aud), label, 10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_brief_syncnet_training_scores_real_audio_above_shifted_audio(clips):
    """On synthetic ground truth, in-sync audio gets a higher Sync-C than the same audio shifted by 2 s."""
    torch.manual_seed(0)
    trainer = SyncNetTrainer(preset="tiny", margin=10.0)
    net = trainer.net
    # the clips' lip sequences and MFCCs once (no box jitter), then many cheap steps on sampled pairs
    lips = [lip_sequence(net, c.video, c.kpts) for c in clips]
    mfccs = [mfcc_sequence(c.audio_self) for c in clips]
    masks = np.stack([c.mask for c in clips]).astype(np.float64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(150):
        pairs = make_pairs(masks, positions=16, min_shift=3, max_shift=15, p_other_clip=0.3, rng=rng)
        lip = torch.stack([lips[i][:, v : v + 5] for i, v, _, _, _ in pairs])
        aud = torch.stack([mfccs[j][None, :, 4 * u : 4 * u + 20] for _, _, j, u, _ in pairs])
        label = torch.tensor([p[4] for p in pairs])
        loss = contrastive_sync_loss(net.forward_lip(lip), net.forward_aud(aud), label, 10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scorer = SyncNetScorer(net.eval())
    real, shifted = [], []
    for c in clips:
        boxes = KeypointFaceBoxes(c.kpts, DWPOSE_134.indices("face"))
        real.append(scorer(c.video, c.audio_self, boxes).sync_c)
        shifted.append(scorer(c.video, np.roll(c.audio_self, 50 * 640), boxes).sync_c)
    assert np.mean(real) > np.mean(shifted) + 0.5, (real, shifted)
    assert sum(r > s for r, s in zip(real, shifted, strict=True)) >= 3


# -- keypoint regressor -------------------------------------------------------------------------


def test_pose_regressor_decodes_a_peaked_simcc_to_its_bin_centre():
    net = PoseRegressor(POSE_PRESETS["tiny"])
    k, bins = net.config.num_keypoints, net.config.num_bins
    x = torch.full((1, k, bins), -1e4)
    y = torch.full((1, k, bins), -1e4)
    x[..., 5] = 0.0  # bin 5 of a split ratio of 2 -> pixel (5 + 0.5) / 2
    y[..., 10] = 0.0
    from dystream.evaluation.networks.pose_small import PoseOutput

    out = net.decode(PoseOutput(x, y, torch.zeros(1, k)))
    assert torch.allclose(out[0, :, 0], torch.tensor(2.75)) and torch.allclose(out[0, :, 1], torch.tensor(5.25))
    assert torch.allclose(out[0, :, 2], torch.tensor(0.5))


def test_pose_config_names_bad_fields():
    with pytest.raises(ValueError, match="input_size"):
        PoseRegressorConfig(input_size=30)
    with pytest.raises(ValueError, match="head_kernel"):
        PoseRegressorConfig(head_kernel=4)


def test_pose_backend_scales_coordinates_to_the_frame(clips):
    net = PoseRegressor(POSE_PRESETS["tiny"]).eval()  # input 16x16
    backend = PoseNetBackend(net)
    frames = clips[0].video[:3]  # 64x64
    k = backend(frames)
    with torch.no_grad():
        direct = net.decode(net(frames_to_input(frames, 16))).numpy()
    assert k.shape == (3, 134, 3) and backend.layout is DWPOSE_134
    np.testing.assert_allclose(k[..., :2], direct[..., :2] * 4, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(k[..., 2], direct[..., 2], rtol=1e-6)
    assert backend.features(frames).shape == (3, 16)


def test_pose_training_loss_falls(clips):
    torch.manual_seed(0)
    trainer = PoseTrainer(preset="tiny", frames_per_clip=4, lr=1e-2)
    batch = _batch(clips[:2], 8)
    from dystream.evaluation.train_pose import batch_frames

    frames, target = batch_frames(batch, 4, 16, torch.Generator().manual_seed(0))
    assert frames.shape == (8, 3, 16, 16) and target.shape == (8, 134, 3)
    assert target[..., 0].max() <= 16.5  # keypoints follow the resize to the network's input
    opt = torch.optim.Adam(trainer.net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = simcc_loss(trainer.net(frames), target, 2.0, 1.5, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def test_pose_augmentation_moves_keypoints_with_the_frame():
    s, n = 32, 6
    frames = -torch.ones(n, 3, s, s)
    target = torch.zeros(n, 2, 3)
    for i in range(n):
        x, y = 6 + 4 * i, 20 - 2 * i
        frames[i, :, y, x] = 1.0  # one bright pixel, centred at (x + 0.5, y + 0.5)
        target[i, 0] = torch.tensor([x + 0.5, y + 0.5, 1.0])
        target[i, 1] = torch.tensor([0.5, s - 0.5, 1.0])  # a corner point: the shift may push it out of the frame
    out, kp = augment(frames, target, torch.Generator().manual_seed(0), shift=0.2)
    for i in range(n):
        y, x = divmod(int(out[i].sum(0).argmax()), s)  # gains and channel order keep the dot the brightest spot
        assert abs(float(kp[i, 0, 0]) - (x + 0.5)) <= 1.0 and abs(float(kp[i, 0, 1]) - (y + 0.5)) <= 1.0
    outside = ((kp[..., :2] < 0) | (kp[..., :2] > s)).any(-1)
    assert outside.any() and bool((kp[..., 2][outside] == 0).all()) and bool((kp[..., 2][~outside] == 1).all())


# -- export, loading, the missing-weights message -------------------------------------------------


def test_export_round_trip_and_missing_weights_message(tmp_path):
    net = SmallSyncNet(PRESETS["tiny"]).eval()
    path = save_model(net, tmp_path / "syncnet.safetensors", arch="metric_syncnet")
    loaded, info = load_metric_syncnet(path)
    x = torch.rand(2, 3, 5, 16, 16) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_lip(x), net.forward_lip(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert len(info.sha256) == 64

    with pytest.raises(MetricWeightsMissing) as err:
        load_metric_syncnet(tmp_path / "absent.safetensors")
    msg = str(err.value)
    assert "syncnet.safetensors" in msg and "no file at" in msg
    assert "dystream fit --config recipes/metric_syncnet.yaml" in msg and "make eval" in msg
    assert isinstance(err.value, MetricUnavailable)

    with pytest.raises(MetricWeightsMissing, match="recipes/metric_pose.yaml"):
        load_metric_pose(None)
    with pytest.raises(MetricWeightsMissing, match="cannot be loaded as 'metric_pose'"):
        load_metric_pose(path)  # a SyncNet file is not a pose network
