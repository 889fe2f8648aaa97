"""The synthetic identity network (CosFace training, embedder, verification metrics), `identity_similarity`, the
suite's drift wiring, and the ArcFace IResNet-50 key layout with its strict loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dystream.datamodules.synthetic import make_clip
from dystream.evaluation.identity import frame_distances, identity_drift, identity_similarity
from dystream.evaluation.metric_nets import load_metric_identity
from dystream.evaluation.networks.identity_small import PRESETS, IdentityEmbedder, IdentityNet
from dystream.evaluation.networks.iresnet import PRESETS as IRESNET_PRESETS
from dystream.evaluation.networks.iresnet import ArcFaceEmbedder, IResNet, load_arcface_iresnet50
from dystream.evaluation.suite import EvalVideo, MetricSuite, SuiteConfig
from dystream.evaluation.weights import MetricWeightsMissing
from dystream.stages.metric_identity import (
    IdentityTrainer,
    best_accuracy,
    identity_labels,
    roc_auc,
    separation,
    verification_metrics,
)
from dystream.zoo.files import save_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clips():
    # two people of the validation split (clips 0, 1 are person 0; clips 4, 5 person 1), 64x64, 1 s
    return [make_clip(seed=0, split="val", index=i, size=64, seconds=1.0) for i in (0, 1, 4, 5)]


def _batch(clips, t: int = 6) -> dict:
    video = torch.stack([torch.from_numpy(c.video[:t]).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
    refs = torch.stack([torch.from_numpy(c.video[-1:]).permute(0, 3, 1, 2).float() / 127.5 - 1 for c in clips])
    return {"video": video, "references": refs, "key": [c.key for c in clips]}


def test_labels_come_from_the_clip_keys():
    assert identity_labels(["train-0-000000", "train-0-000003", "train-0-000004", "val-7-000013"], 4).tolist() == [
        0, 0, 1, 3
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a synthetic clip key"):
        identity_labels(["my.clip"], 4)


def test_training_steps_lower_the_cosface_loss(clips):
    torch.manual_seed(0)
    trainer = IdentityTrainer(preset="tiny", num_identities=2, frames_per_clip=3, augment=False)
    batch = _batch(clips)
    opt = torch.optim.Adam(trainer.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        x, rows = trainer.frames(batch, gen)
        from dystream.stages.metric_identity import cosface_loss

        labels = identity_labels(batch["key"], 4)[rows]
        loss, _ = cosface_loss(trainer.net(x), trainer.centres, labels, 16.0, 0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_augment_keeps_shape_and_range(clips):
    trainer = IdentityTrainer(preset="tiny", num_identities=2)
    x, _ = trainer.frames(_batch(clips), torch.Generator().manual_seed(0))
    y = trainer.augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)


def test_embedder_unit_norm_and_rejects_bad_input():
    embed = IdentityEmbedder(IdentityNet(PRESETS["tiny"]))
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 30, 3), dtype=np.uint8)  # any size: resized
    e = embed(frames)
    assert e.shape == (5, 16) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        embed(frames.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        embed(frames[0])  # [H, W, 3]: no batch axis
    with pytest.raises(ValueError, match="uint8 RGB"):
        embed(frames[..., :2])


def test_identity_similarity_is_the_numpy_cosine():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    w = rng.normal(size=(16 * 16 * 3, 5))
    embed = lambda f: f.reshape(len(f), -1).astype(np.float64) @ w  # noqa: E731  unnormalised, on purpose
    e, r = embed(frames), embed(ref[None])[0]
    expected = e @ r / (np.linalg.norm(e, axis=1) * np.linalg.norm(r))
    np.testing.assert_allclose(identity_similarity(frames, ref, embed), expected, rtol=1e-10)
    np.testing.assert_allclose(frame_distances(frames, ref, embed), 1 - expected, rtol=1e-10)
    with pytest.raises(ValueError, match="needs an embedder"):
        identity_similarity(frames, ref, None)


def test_roc_auc_and_best_accuracy_against_hand_values():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    pos = np.array([1, 1, 0, 1, 0], dtype=bool)
    # positive-negative pairs ranked right: (0.9, 0.7), (0.9, 0.5), (0.8, 0.7), (0.8, 0.5), (0.6, 0.5) of 6
    assert roc_auc(scores, pos) == pytest.approx(5 / 6)
    assert roc_auc(-scores, pos) == pytest.approx(1 / 6)
    assert roc_auc(np.zeros(4), np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)  # ties count half
    assert best_accuracy(scores, pos) == pytest.approx(4 / 5)  # threshold 0.8 or 0.6


def test_verification_metrics_separates_identities_with_a_colour_embedding(clips):
    # mean colour is an identity cue in the synthetic world: its AUC must be high, and the report complete
    frames = np.concatenate([c.video[:5] for c in clips])
    labels = np.repeat([0, 0, 1, 1], 5)
    clip = np.repeat(np.arange(4), 5)
    refs = np.stack([c.video[-1] for c in clips])
    m = verification_metrics(frames, labels, clip, refs, lambda f: f.reshape(len(f), -1, 3).mean(1) - 128)
    assert m["auc"] > 0.9 and m["cos_own_reference"] > m["cos_other_identity"]
    assert 0 <= m["pixel_rms_auc"] <= 1 and 0.5 <= m["acc"] <= 1
    assert m["dprime"] > 1.0 and np.isfinite(m["pixel_rms_dprime"])
    assert separation(np.array([1.0, 3.0, 0.0, 2.0]), np.array([1, 1, 0, 0], bool)) == pytest.approx(1.0)


def test_loader_round_trip_and_missing_file(tmp_path):
    net = IdentityNet(PRESETS["tiny"]).eval()
    path = save_model(net, tmp_path / "identity.safetensors", arch="metric_identity")
    embed = load_metric_identity(path)
    frames = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(embed(frames), IdentityEmbedder(net)(frames), atol=1e-6)
    assert embed.weights_info.sha256 and embed.name == "metric_identity"
    with pytest.raises(MetricWeightsMissing, match="metric_identity.yaml"):
        load_metric_identity(tmp_path / "absent.safetensors")


def test_suite_uses_the_identity_embedder_and_falls_back_to_pixels(clips, tmp_path):
    c = clips[0]
    mask = c.mask[:25].astype(np.float32)
    video = EvalVideo(key=c.key, frames=c.video[:25], audio=c.audio_self[: 25 * 640], mask=mask, reference=c.video[-1])
    embed = IdentityEmbedder(IdentityNet(PRESETS["tiny"]))
    with_net = MetricSuite(SuiteConfig(syncnet=None, pose=None), identity=embed)
    assert with_net.drift_distance == "cosine (metric_identity)"
    got = with_net.evaluate([video]).values["drift_mean"]
    assert got == pytest.approx(frame_distances(video.frames, video.reference, embed).mean())
    missing = MetricSuite(SuiteConfig(syncnet=None, pose=None, identity=str(tmp_path / "none.safetensors")))
    assert missing.identity is None and "metric_identity.yaml" in missing.identity_fallback
    assert "identity" not in missing.unavailable  # drift is computed either way
    assert with_net.identity_fallback is None
    assert missing.drift_distance == "pixel_rms_64"
    fallback = missing.evaluate([video]).values["drift_mean"]
    assert fallback == pytest.approx(frame_distances(video.frames, video.reference, None).mean())
    assert identity_drift(video.frames, video.reference, embed).distance == "cosine (metric_identity)"


# -- ArcFace IResNet-50 ----------------------------------------------------------------------------------


def test_iresnet50_has_the_insightface_key_names():
    keys = IResNet(IRESNET_PRESETS["iresnet50"]).state_dict().keys()
    for k in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
              "layer1.0.bn2.weight", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer3.13.conv2.weight",
              "layer4.2.bn3.bias", "bn2.weight", "fc.weight", "features.weight", "features.running_mean"):  # fmt: skip
        assert k in keys, k
    assert "layer3.14.conv1.weight" not in keys and "layer4.3.conv1.weight" not in keys  # 3, 4, 14, 3 blocks
    assert IResNet(IRESNET_PRESETS["iresnet50"]).fc.weight.shape == (512, 512 * 7 * 7)


def test_arcface_loader_is_strict_and_names_bad_keys(tmp_path, monkeypatch):
    import dystream.evaluation.networks.iresnet as iresnet

    tiny = IRESNET_PRESETS["tiny"]
    monkeypatch.setitem(iresnet.PRESETS, "iresnet50", tiny)  # the real one is 44M parameters: same code, tiny size
    src = IResNet(tiny).eval()
    torch.nn.init.normal_(src.fc.weight)
    state = src.state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    net = load_arcface_iresnet50(tmp_path / "backbone.pth")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(net(x), src(x))
    e = ArcFaceEmbedder(net)(np.zeros((2, 20, 20, 3), np.uint8))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    renamed = dict(state)
    renamed["layer2.0.prelu.alpha"] = renamed.pop("layer2.0.prelu.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layer2.0.prelu.weight'\].*unexpected keys.*prelu.alpha"):
        load_arcface_iresnet50(tmp_path / "renamed.pth")
    with pytest.raises(FileNotFoundError, match="backbone.pth"):
        load_arcface_iresnet50(tmp_path / "absent.pth")
