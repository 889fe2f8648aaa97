"""Audio pretraining (wav2vec 2.0 on the shards' speech), its hand-over to the teacher, the Pre-Mask switch, and the
teacher's mouth-weighted loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dystream.diffusion.sampling import LISTEN_KEY, TALK_KEY
from dystream.models.audio import AudioEncoder, audio_conditions, mask_waveforms
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.stages.audio_pretrain import AudioPretrainStage
from dystream.stages.conditioning import build_audio_encoder, teacher_mask_mode
from dystream.zoo.files import save_model

T = 48  # video frames: 96 feature steps


def _speech(b: int = 4, t: int = T, seed: int = 0) -> dict:
    """Harmonic bursts with per-row pitch and syllable rate (structure a contrastive model can predict) + noise."""
    g = torch.Generator().manual_seed(seed)
    n = t * 640
    time = torch.arange(n) / 16000
    f0 = 120 + 80 * torch.rand(b, 1, generator=g)
    rate = 3 + 3 * torch.rand(b, 1, generator=g)
    envelope = torch.relu(torch.sin(2 * math.pi * rate * time))
    voice = envelope * sum(torch.sin(2 * math.pi * k * f0 * time) / k for k in range(1, 4))
    noise = 0.05 * torch.randn(b, n, generator=g)
    return {"audio_self": voice + noise, "audio_other": noise.roll(1, 0)}


def test_pretraining_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    np.random.seed(0)  # the masking and negative-sampling helpers draw from numpy's global generator
    stage = AudioPretrainStage(num_negatives=10)
    batch = _speech()
    opt = torch.optim.AdamW(stage.model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        stage.model.set_gumbel_temperature(stage.gumbel_temperature(step))
        loss = stage.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(11), abs=0.6)  # about chance: the target among 10 distractors
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15, losses  # seeds 0-3: falls by 0.24-0.39


def test_validation_masks_are_fixed_and_training_masks_are_not():
    stage = AudioPretrainStage()
    a = stage.masks(4, T * 640 + 80, np.random.default_rng(1))[0]
    b = stage.masks(4, T * 640 + 80, np.random.default_rng(1))[0]
    assert torch.equal(a, b) and 0.2 < a.float().mean() < 0.8
    c, d = stage.masks(4, T * 640 + 80, None)[0], stage.masks(4, T * 640 + 80, None)[0]
    assert not torch.equal(c, d)


def test_export_loads_strictly_and_stays_frozen_in_the_teacher(tmp_path):
    from dystream.stages.teacher import TeacherStage

    stage = AudioPretrainStage(export_dir=str(tmp_path / "audio"))
    with torch.no_grad():
        next(stage.model.wav2vec2.encoder.parameters()).add_(1.0)  # "pretrained": differs from the random init
    stage.export()
    path = tmp_path / "audio" / "audio.safetensors"
    encoder = build_audio_encoder(str(path))
    assert isinstance(encoder, AudioEncoder)
    exported = encoder.wav2vec2.state_dict()
    assert exported.keys() == stage.model.wav2vec2.state_dict().keys()
    for name, p in stage.model.wav2vec2.state_dict().items():
        assert torch.equal(p, exported[name]), name
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training

    vae = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", arch="vae")
    teacher = TeacherStage(vae=str(vae), audio=str(path), export_dir=str(tmp_path / "teacher"))
    teacher.train()
    with pytest.raises(ValueError, match="mask_mode"):
        TeacherStage(vae=str(vae), audio=str(path), mask_mode="before")
    assert not teacher.cond.audio.training and not any(p.requires_grad for p in teacher.cond.audio.parameters())
    assert torch.equal(teacher.cond.audio.wav2vec2.encoder.pos_conv_embed.conv.bias,
                       encoder.wav2vec2.encoder.pos_conv_embed.conv.bias)  # fmt: skip

    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    dropped = sorted(tensors)[3]
    del tensors[dropped]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(Exception, match="Missing|missing"):
        build_audio_encoder(str(broken))


def test_bad_recipe_values_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="mask_time_prob"):
        AudioPretrainStage(mask_time_prob=1.5)
    with pytest.raises(ValueError, match="codevector_dim"):
        AudioPretrainStage(codevector_dim=63, num_codevector_groups=2)
    stage = AudioPretrainStage(mask_time_length=10)
    with pytest.raises(ValueError, match="window_frames"):
        stage.losses(_speech(t=4))  # 8 feature steps < 2 spans of 10
    with pytest.raises(KeyError, match="audio_other"):
        stage.losses({"audio_self": torch.zeros(2, T * 640)})


def test_pre_mask_and_post_mask_differ_exactly_as_they_should():
    torch.manual_seed(0)
    encoder = AudioEncoder("tiny")
    batch = _speech(b=2, t=16)
    ones = torch.ones(2, 16)
    post = audio_conditions(encoder, batch["audio_self"], batch["audio_other"], ones)
    pre = audio_conditions(encoder, batch["audio_self"], batch["audio_other"], ones, mask_mode="waveform")
    torch.testing.assert_close(pre[TALK_KEY], post[TALK_KEY], rtol=0, atol=0)  # an all-ones mask: the same thing

    mask = (torch.arange(16) < 8).float().expand(2, 16).clone()
    masked_self, masked_other = mask_waveforms(batch["audio_self"], batch["audio_other"], mask)
    speaking = mask.repeat_interleave(640, dim=1).bool()
    assert torch.all(masked_self[~speaking] == 0) and torch.equal(masked_self[speaking], batch["audio_self"][speaking])
    assert torch.all(masked_other[speaking] == 0) and torch.equal(
        masked_other[~speaking], batch["audio_other"][~speaking]
    )

    heard = []
    hook = encoder.register_forward_pre_hook(lambda module, args: heard.append(args[0].clone()))
    post = audio_conditions(encoder, batch["audio_self"], batch["audio_other"], mask)
    pre = audio_conditions(encoder, batch["audio_self"], batch["audio_other"], mask, mask_mode="waveform")
    hook.remove()
    both = torch.cat([batch["audio_self"], batch["audio_other"]])
    assert torch.equal(heard[0], both)  # features mode: the encoder hears both full tracks
    heard_self, heard_other = heard[1][:2], heard[1][2:]  # waveform mode: what the encoder really receives
    assert torch.all(heard_self[~speaking] == 0) and torch.equal(heard_self[speaking], batch["audio_self"][speaking])
    assert torch.all(heard_other[speaking] == 0)
    assert torch.equal(heard_other[~speaking], batch["audio_other"][~speaking])
    assert torch.all(post[TALK_KEY][:, 8:] == 0) and torch.all(post[LISTEN_KEY][:, :8] == 0)
    assert (pre[TALK_KEY][:, 8:].abs().sum(-1) > 0).all()  # features of silence, not zeros
    assert not torch.allclose(pre[TALK_KEY][:, 8:], post[TALK_KEY][:, 8:])
    with pytest.raises(ValueError, match="mask_mode"):
        audio_conditions(encoder, batch["audio_self"], batch["audio_other"], mask, mask_mode="before")


def test_teacher_mouth_weight_needs_keypoints_and_weights_the_lip_cells(tmp_path):
    from dystream.datamodules.keypoints import MOUTH, NUM_KEYPOINTS
    from dystream.stages.teacher import TeacherStage

    vae = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", arch="vae")
    stage = TeacherStage(vae=str(vae), mouth_weight=4.0, export_dir=str(tmp_path / "t"), mask_mode="waveform")
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 8, 64, 64, generator=g) * 2 - 1
    batch = {
        "video": video,
        "references": video[:, :, :1].transpose(1, 2).clone(),
        "audio_self": torch.randn(2, 8 * 640, generator=g) * 0.1,
        "audio_other": torch.randn(2, 8 * 640, generator=g) * 0.1,
        "mask": torch.ones(2, 8),
    }
    with pytest.raises(KeyError, match="mouth_weight"):
        stage._loss(batch)
    kpts = torch.zeros(2, 8, NUM_KEYPOINTS, 3)
    kpts[:, :, MOUTH, 0] = torch.linspace(28.0, 36.0, MOUTH.stop - MOUTH.start)  # lips in latent column 3 and 4
    kpts[:, :, MOUTH, 1] = torch.linspace(43.0, 46.0, MOUTH.stop - MOUTH.start)  # latent row 5
    kpts[:, :, MOUTH, 2] = 1.0
    batch["kpts"] = kpts
    x0 = stage.cond.batch_latents(batch)
    weight = stage.region_weights(batch, x0)
    assert weight.shape == (2, 1, x0.shape[2] - 1, 8, 8)
    assert set(weight.unique().tolist()) == {1.0, 5.0} and torch.all(weight[:, :, :, 5, 3:5] == 5.0)
    loss, _ = stage._loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    stage.export()
    from dystream.zoo.files import read_metadata

    assert read_metadata(tmp_path / "t" / "teacher.safetensors")[2]["mask_mode"] == "waveform"
    assert teacher_mask_mode(tmp_path / "t" / "teacher.safetensors") == "waveform"  # ODE pairs, students follow it
    assert teacher_mask_mode(tmp_path / "missing.safetensors") == "features"


def test_teacher_listen_face_weight_weights_the_face_only_while_listening(tmp_path):
    from dystream.datamodules.keypoints import FACE, MOUTH, NUM_KEYPOINTS
    from dystream.stages.teacher import TeacherStage

    vae = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", arch="vae")
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 8, 64, 64, generator=g) * 2 - 1
    kpts = torch.zeros(2, 8, NUM_KEYPOINTS, 3)
    n_face = FACE.stop - FACE.start
    kpts[:, :, FACE, 0] = torch.linspace(17.0, 30.0, n_face)  # the face in latent columns 2 and 3
    kpts[:, :, FACE, 1] = torch.linspace(9.0, 22.0, n_face)  # latent rows 1 and 2
    kpts[:, :, FACE, 2] = 1.0
    n_mouth = MOUTH.stop - MOUTH.start
    kpts[:, :, MOUTH, 0] = torch.linspace(18.0, 22.0, n_mouth)  # lips inside the face's cell (2, 2)
    kpts[:, :, MOUTH, 1] = torch.linspace(18.0, 21.0, n_mouth)
    batch = {
        "video": video,
        "references": video[:, :, :1].transpose(1, 2).clone(),
        "audio_self": torch.randn(2, 8 * 640, generator=g) * 0.1,
        "audio_other": torch.randn(2, 8 * 640, generator=g) * 0.1,
        "mask": torch.tensor([[1.0] * 4 + [0.0] * 4, [1.0] * 8]),  # clip 0 listens in its second latent frame
        "kpts": kpts,
    }
    stage = TeacherStage(vae=str(vae), listen_face_weight=3.0, export_dir=str(tmp_path / "t"))
    x0 = stage.cond.batch_latents(batch)
    weight = stage.region_weights(batch, x0)  # [B, 1, 2, 8, 8]
    face_cells = torch.zeros(8, 8, dtype=torch.bool)
    face_cells[1:3, 2:4] = True
    assert torch.all(weight[0, 0, 1][face_cells] == 4.0) and torch.all(weight[0, 0, 1][~face_cells] == 1.0)
    assert torch.all(weight[0, 0, 0] == 1.0) and torch.all(weight[1] == 1.0)  # speaking frames: plain loss
    both = TeacherStage(vae=str(vae), mouth_weight=4.0, listen_face_weight=3.0, export_dir=str(tmp_path / "t"))
    assert both.region_weights(batch, x0)[0, 0, 1, 2, 2] == 8.0  # 1 + mouth 4 + listening face 3
    assert TeacherStage(vae=str(vae), export_dir=str(tmp_path / "t")).region_weights(batch, x0) is None
    del batch["kpts"]
    with pytest.raises(KeyError, match="listen_face_weight"):
        stage._loss(batch)


def test_audio_probe_scores_linear_targets_high_and_noise_near_zero():
    from dystream.bench.audio_probe import logistic_accuracy, ridge_r2

    rng = np.random.default_rng(0)
    x_train, x_test = rng.standard_normal((400, 8)), rng.standard_normal((200, 8))
    w = rng.standard_normal(8)
    assert ridge_r2(x_train, x_train @ w + 3.0, x_test, x_test @ w + 3.0) > 0.99
    noise = ridge_r2(x_train, rng.standard_normal(400), x_test, rng.standard_normal(200))
    assert -0.2 < noise < 0.05
    assert logistic_accuracy(x_train, (x_train @ w > 0).astype(float), x_test, (x_test @ w > 0).astype(float)) > 0.95
    coin = logistic_accuracy(x_train, rng.integers(0, 2, 400).astype(float), x_test, rng.integers(0, 2, 200) * 1.0)
    assert 0.3 < coin < 0.7


def test_windowed_features_equal_direct_indexing():
    from dystream.bench.audio_probe import windowed

    feats = np.random.default_rng(1).standard_normal((11, 3))
    for lo, hi in ((0, 0), (-3, 5), (-16, 5), (2, 4)):
        out = windowed(feats, lo, hi)
        for t in range(11):
            direct = [feats[t + k] if 0 <= t + k < 11 else np.zeros(3) for k in range(lo, hi + 1)]
            np.testing.assert_array_equal(out[t], np.concatenate(direct))


def test_reaction_probe_finds_a_lagged_answer_only_with_a_window_that_reaches_it():
    """A listener that reacts 7 frames after the partner's sound: explained by frames t-8..t+5, not by frame t."""
    from dystream.bench.audio_probe import reaction_probe

    class FrameEnergy(torch.nn.Module):  # stands in for the audio encoder: [1, T * 640] -> [1, T, 2]
        def forward(self, wave):
            frames = wave.reshape(1, -1, 640)
            return torch.stack([frames.mean(-1), frames.abs().mean(-1)], -1)

    rng = np.random.default_rng(0)

    def clip():
        t = 60
        level = rng.standard_normal(t)
        partner = np.repeat(level, 640).astype(np.float32)
        reaction = np.concatenate([np.zeros(7), level[:-7]])
        return dict(partner=partner, mask=np.zeros(t), reaction=reaction)

    r2 = reaction_probe(FrameEnergy(), [clip() for _ in range(12)], [clip() for _ in range(4)])
    assert r2["listener's reaction R² from partner frames t-8..t+5"] > 0.95
    assert r2["listener's reaction R² from partner frames t+0..t+0"] < 0.1
    assert r2["listener's reaction R² from partner frames t-3..t+5"] < 0.1
