"""Training from cached latents: `LatentDataModule` windows equal the causal encoder's latents of the same frames,
with their audio and mask; validation stays on the clip shards; a teacher trains on them and refuses another VAE's."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from dystream.datamodules.format import SAMPLES_PER_FRAME, decode_video, iter_tar_samples, resolve_shards
from dystream.datamodules.latent_windows import LatentDataModule, LatentWindowDecoder
from dystream.datamodules.latents import export_latents, frames_to_tensor, read_latent_sample
from dystream.datamodules.speakervid import BadSample
from dystream.datamodules.synthetic import synthesize
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.stages.teacher import TeacherStage
from dystream.zoo.files import save_model

SIZE, T = 32, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_world")
    synthesize(root / "data", clips=3, val_clips=2, size=SIZE, seconds=2.0, workers=1)
    torch.manual_seed(0)
    vae = ReferenceGuidedVAE(VAEConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "to_out" in name:  # give the zero-initialised guidance an effect
                p.normal_(0, 0.05)
    vae_path = save_model(vae, root / "vae.safetensors", arch="vae")
    export_latents(vae_path, str(root / "data" / "train"), root / "latents", size=SIZE, log=False)
    return {"root": root, "vae": vae, "vae_path": str(vae_path), "latents": str(root / "latents")}


def _module(world, **kw) -> LatentDataModule:
    args = dict(train_shards=world["latents"], val_shards=str(world["root"] / "data" / "val"), window_frames=T,
                size=SIZE, batch_size=2, num_workers=0, synthesize_if_missing=False)  # fmt: skip
    return LatentDataModule(**{**args, **kw})


def test_a_window_is_the_causal_encoders_latents_of_its_frames_with_their_audio(world):
    vae = world["vae"]
    shard = resolve_shards(str(world["root"] / "data" / "train")).urls[0]
    clips = {s["__key__"]: s for s in iter_tar_samples(shard)}
    decoder = LatentWindowDecoder(T)
    for sample in iter_tar_samples(resolve_shards(world["latents"]).urls[0]):
        src = clips[sample["__key__"]]
        cached = read_latent_sample(sample)
        for seed in range(3):
            w = decoder(sample, np.random.default_rng(seed), [])
            start = w["start"]
            assert start >= 4 and start % 4 == 0  # the reference (frame 0) lies outside the window
            video = frames_to_tensor(decode_video(src["mp4"]), SIZE)  # [3, n, H, W]
            reference = video[:, :1]
            with torch.no_grad():  # a stream of the clip up to the window's end, guided by frame 0
                clip = torch.cat([reference, video[:, : start + T]], dim=1)[None]
                stream = vae.encode(clip, reference.transpose(0, 1)[None])[0]
            expected = torch.cat([stream[:, :1], stream[:, -(T // 4) :]], dim=1)
            torch.testing.assert_close(w["latents"], expected, atol=3e-3, rtol=1e-3)  # cached as float16
            torch.testing.assert_close(w["references"][0], reference[:, 0], atol=1 / 127, rtol=0)
            a0 = start * SAMPLES_PER_FRAME
            torch.testing.assert_close(w["audio_self"], cached["audio_self"][a0 : a0 + T * SAMPLES_PER_FRAME])
            torch.testing.assert_close(w["audio_other"], cached["audio_other"][a0 : a0 + T * SAMPLES_PER_FRAME])
            torch.testing.assert_close(w["mask"], cached["mask"][start : start + T])


def test_a_windows_keypoints_follow_the_encoded_frames(world, tmp_path):
    """Latents encoded at half the clips' size: the window's keypoints are the source keypoints of its frames,
    scaled to the encoded frames' pixels (so the teacher's mouth weight finds the lips)."""
    half = tmp_path / "half"
    export_latents(world["vae_path"], str(world["root"] / "data" / "train"), half, size=SIZE // 2, log=False)
    sample = next(iter_tar_samples(resolve_shards(str(half)).urls[0]))
    source = read_latent_sample(sample)["kpts"].numpy()  # [n, K, 3] in pixels of the 32x32 clip
    assert json.loads(sample["json"])["latents"]["source_hw"] == [SIZE, SIZE]
    w = LatentWindowDecoder(T)(sample, np.random.default_rng(3), [])
    expected = source[w["start"] : w["start"] + T].copy()
    expected[..., :2] *= 0.5
    expected[..., 2] = np.where((expected[..., :2] < 0).any(-1) | (expected[..., :2] >= SIZE // 2).any(-1), 0,
                                expected[..., 2])  # fmt: skip
    np.testing.assert_allclose(w["kpts"].numpy(), expected, rtol=0, atol=1e-5)
    meta = json.loads(sample["json"])
    meta["latents"].pop("source_hw")  # shards of an older `dystream data encode`: the clip json's size serves
    older = LatentWindowDecoder(T)(dict(sample, json=json.dumps(meta).encode()), np.random.default_rng(3), [])
    torch.testing.assert_close(older["kpts"], w["kpts"])
    unknown = {k: v for k, v in meta.items() if k not in ("height", "width")}
    assert "kpts" not in LatentWindowDecoder(T)(
        dict(sample, json=json.dumps(unknown).encode()), np.random.default_rng(3), []
    )


def test_training_batches_come_from_latents_and_validation_from_clips(world):
    dm = _module(world)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (2, 16, 1 + T // 4, SIZE // 8, SIZE // 8) and "video" not in batch
    assert batch["references"].shape == (2, 1, 3, SIZE, SIZE) and batch["audio_self"].shape == (2, T * 640)
    assert batch["mask"].shape == (2, T) and len(batch["key"]) == 2
    assert batch["kpts"].shape == (2, T, 134, 3)  # the windows' keypoints (dwpose134), for the mouth weight
    val = next(iter(dm.val_dataloader()))
    assert val["video"].shape == (2, 3, T, SIZE, SIZE) and "latents" not in val
    assert dm.vae_sha256 == json.loads((world["root"] / "latents" / "index.json").read_text())["vae_sha256"]


def test_bad_latent_inputs_name_the_fix(world, tmp_path):
    with pytest.raises(ValueError, match="holds clip shards, not dystream-latents/2 latent shards"):
        _module(world, train_shards=str(world["root"] / "data" / "train")).setup("fit")
    with pytest.raises(FileNotFoundError, match="dystream data encode --vae"):
        _module(world, train_shards=str(tmp_path / "none")).setup("fit")
    with pytest.raises(ValueError, match="encoded at size 32, the data module's size is 64"):
        _module(world, size=64).setup("fit")
    sample = next(iter_tar_samples(resolve_shards(world["latents"]).urls[0]))
    old = {k: v for k, v in sample.items() if k != "references.npy"}  # written before the format had references
    with pytest.raises(BadSample, match=r"missing \['references.npy'\].*re-encode"):
        LatentWindowDecoder(T)(old, np.random.default_rng(0), [])
    with pytest.raises(BadSample, match="the window needs 25"):
        LatentWindowDecoder(100)(sample, np.random.default_rng(0), [])


def test_teacher_trains_on_cached_latents_and_refuses_another_vaes(world, tmp_path):
    dm = _module(world)
    stage = TeacherStage(vae=world["vae_path"], export_dir=str(tmp_path / "teacher"), warmup_steps=1, sample_steps=1,
                         mouth_weight=4.0)  # fmt: skip
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")  # fmt: skip
    before = [p.detach().clone() for p in stage.dit.parameters()]
    trainer.fit(stage, datamodule=dm)
    assert any(not torch.equal(a, p) for a, p in zip(before, stage.dit.parameters(), strict=True))
    assert "val/loss" in trainer.callback_metrics  # validation ran on the clip shards

    torch.manual_seed(1)
    other = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "other.safetensors", arch="vae")
    stage = TeacherStage(vae=str(other), export_dir=str(tmp_path / "teacher2"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        accelerator="cpu", limit_val_batches=0)  # fmt: skip
    with pytest.raises(ValueError, match="re-encode them with `dystream data encode"):
        trainer.fit(stage, datamodule=_module(world))
