"""Generating the evaluation set: the teacher row reproduces TeacherStage.sample, the student row is the seeded
few-step rollout, with the right shapes and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dystream.evaluation.generation import ModelSpec, clip_batch, generate
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.stages.common import EMA
from dystream.stages.teacher import TeacherStage
from dystream.zoo.files import load_model, save_model

T = 12


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: torch's intra-op threads only add synchronisation here
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    vae = str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), root / "vae.safetensors", arch="vae"))
    stage = TeacherStage(vae=vae, export_dir=str(root / "teacher"))
    with torch.no_grad():  # random everywhere (the zero-initialised head would make every sample the same)
        for p in stage.dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    stage.ema = EMA(stage.dit)
    stage.export()
    teacher, audio = str(root / "teacher" / "teacher.safetensors"), str(root / "teacher" / "audio.safetensors")
    student = save_model(load_model(teacher, "dit"), root / "student.safetensors", arch="dit",
                         extra={"student_sigmas": [1.0, 0.8, 0.5], "vae": vae, "audio": audio})  # fmt: skip
    return {"vae": vae, "teacher": teacher, "audio": audio, "student": str(student)}


def _clips(n: int = 2, size: int = 64):
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal((2, n, T * 640))).astype(np.float32)
    masks = (np.arange(T)[None] < 6).repeat(n, 0).astype(np.float32)
    return refs, audio[0], audio[1], masks


def test_teacher_row_reproduces_teacher_stage_sampling(files):
    spec = ModelSpec("teacher", "teacher", files["teacher"], vae=files["vae"], audio=files["audio"], steps=2)
    refs, a_self, a_other, masks = _clips()
    out = generate(spec, refs, a_self, a_other, masks, seed=3, batch_size=2)
    assert out.steps == 2 and len(out.videos) == 2 and out.videos[0].shape == (T, 64, 64, 3)
    assert out.videos[0].dtype == np.uint8 and out.seconds_per_clip > 0

    stage = TeacherStage(vae=files["vae"], audio=files["audio"], sample_steps=2)
    batch = clip_batch(refs, a_self, a_other, masks, torch.device("cpu"))
    batch["video"] = torch.zeros(2, 3, T, 64, 64)
    net = load_model(files["teacher"], "dit").eval()  # (building a model draws from the global RNG: before seeding)
    torch.manual_seed(3 * 100003)  # generate() seeds the first batch's generator with seed * 100003
    ref = stage.sample(batch, net=net)
    expect = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    np.testing.assert_array_equal(np.stack(out.videos), expect)


def test_partner_dropped_row_equals_sampling_with_a_silent_partner_while_listening(files):
    """Zeroing the listen condition = a partner whose audio features are 0 where the avatar listens; with the
    speaking mask at 1 everywhere the listen condition is 0 anyway, so dropping it changes nothing."""
    base = ModelSpec("teacher", "teacher", files["teacher"], vae=files["vae"], audio=files["audio"], steps=2)
    dropped = ModelSpec(**{**base.__dict__, "name": "dropped", "drop_partner": True})
    refs, a_self, a_other, masks = _clips()
    own = np.stack(generate(base, refs, a_self, a_other, masks, seed=3, batch_size=2).videos)
    assert not np.array_equal(own, np.stack(generate(dropped, refs, a_self, a_other, masks, seed=3).videos))
    speaking = np.ones_like(masks)
    np.testing.assert_array_equal(
        np.stack(generate(base, refs, a_self, a_other, speaking, seed=3, batch_size=2).videos),
        np.stack(generate(dropped, refs, a_self, a_other, speaking, seed=3, batch_size=2).videos),
    )


def test_partner_muted_row_is_sampling_with_the_partners_waveform_silent(files):
    """mute_partner: the partner's waveform at 0, encoded like any audio (not the dropped, zero condition)."""
    base = ModelSpec("teacher", "teacher", files["teacher"], vae=files["vae"], audio=files["audio"], steps=2)
    muted = ModelSpec(**{**base.__dict__, "name": "muted", "mute_partner": True})
    dropped = ModelSpec(**{**base.__dict__, "name": "dropped", "drop_partner": True})
    refs, a_self, a_other, masks = _clips()

    def videos(spec, other):
        return np.stack(generate(spec, refs, a_self, other, masks, seed=3, batch_size=2).videos)

    silent = videos(base, np.zeros_like(a_other))
    np.testing.assert_array_equal(videos(muted, a_other), silent)
    assert not np.array_equal(silent, videos(base, a_other))
    assert not np.array_equal(silent, videos(dropped, a_other))
    with pytest.raises(ValueError, match="drop_partner and mute_partner"):
        ModelSpec(**{**muted.__dict__, "drop_partner": True})


def test_separate_talk_guidance_equals_joint_guidance_while_the_partner_is_silent(files):
    """Joint CFG drops both audio conditions in its unconditional call, separate talk CFG only the own voice; with
    the speaking mask at 1 everywhere the listen condition is 0, so the two are the same sampler. With a mixed mask
    the partner's voice is heard and a listen scale changes the video."""
    base = ModelSpec("teacher", "teacher", files["teacher"], vae=files["vae"], audio=files["audio"], steps=2)
    talk = ModelSpec(**{**base.__dict__, "name": "talk", "guidance_scale": 1.0, "talk_scale": 3.0})
    listen = ModelSpec(**{**talk.__dict__, "name": "listen", "listen_scale": 4.0})
    refs, a_self, a_other, masks = _clips()
    speaking = np.ones_like(masks)

    def videos(spec, m):
        return np.stack(generate(spec, refs, a_self, a_other, m, seed=3, batch_size=2).videos).astype(int)

    # the two guidance formulas round differently in float32: equal up to 1/255 in a few pixels
    np.testing.assert_allclose(videos(base, speaking), videos(talk, speaking), atol=1, rtol=0)
    np.testing.assert_array_equal(videos(talk, speaking), videos(listen, speaking))
    assert not np.array_equal(videos(talk, masks), videos(listen, masks))


def test_windowed_teacher_samples_each_window_as_a_clip_of_its_own(files):
    """window_frames: the first window equals sampling the first window's frames alone (same seed, same noise);
    the later windows are drawn from the reference again, with their own audio."""
    base = ModelSpec("teacher", "teacher", files["teacher"], vae=files["vae"], audio=files["audio"], steps=2)
    windowed = ModelSpec(**{**base.__dict__, "name": "windowed", "window_frames": 4})
    refs, a_self, a_other, masks = _clips()
    w = 4
    whole = np.stack(generate(windowed, refs, a_self, a_other, masks, seed=3, batch_size=2).videos)
    first = generate(base, refs, a_self[:, : w * 640], a_other[:, : w * 640], masks[:, :w], seed=3, batch_size=2)
    assert whole.shape == (2, T, 64, 64, 3)
    np.testing.assert_array_equal(whole[:, :w], np.stack(first.videos))
    one_window = ModelSpec(**{**base.__dict__, "name": "one", "window_frames": T})
    np.testing.assert_array_equal(
        np.stack(generate(one_window, refs, a_self, a_other, masks, seed=3, batch_size=2).videos),
        np.stack(generate(base, refs, a_self, a_other, masks, seed=3, batch_size=2).videos),
    )
    with pytest.raises(ValueError, match="does not divide"):
        generate(ModelSpec(**{**base.__dict__, "window_frames": T - 4}), refs, a_self, a_other, masks)


def test_student_row_is_a_seeded_rollout(files):
    spec = ModelSpec("student", "student", files["student"])  # vae and audio from the export's metadata
    refs, a_self, a_other, masks = _clips()
    a = generate(spec, refs, a_self, a_other, masks, seed=0, batch_size=1)
    b = generate(spec, refs, a_self, a_other, masks, seed=0, batch_size=1)
    c = generate(spec, refs, a_self, a_other, masks, seed=1, batch_size=1)
    assert a.steps == 3 and a.videos[1].shape == (T, 64, 64, 3)
    np.testing.assert_array_equal(a.videos[1], b.videos[1])
    assert not np.array_equal(a.videos[1], c.videos[1])
    with pytest.raises(ValueError, match="multiple"):
        generate(spec, refs, a_self[:, : 8 * 640], a_other[:, : 8 * 640], masks[:, :8])
    with pytest.raises(ValueError, match="distilled for 3 steps"):
        generate(ModelSpec("student", "student", files["student"], steps=4), refs, a_self, a_other, masks)


def test_model_spec_reports_missing_files_and_bad_fields(tmp_path):
    spec = ModelSpec("sid", "student", str(tmp_path / "student.safetensors"), recipe="stage1_sid")
    assert spec.missing() == [str(tmp_path / "student.safetensors")]
    with pytest.raises(ValueError, match="kind must be"):
        ModelSpec("x", "gan", "w")
    with pytest.raises(ValueError, match="cache_write"):
        ModelSpec("x", "student", "w", cache_write="dirty")
    with pytest.raises(ValueError, match="guidance_scale: 1"):
        ModelSpec("x", "teacher", "w", listen_scale=4.0)  # the joint default 3 left with a separate scale
    with pytest.raises(ValueError, match="window_frames is for teachers"):
        ModelSpec("x", "student", "w", window_frames=24)
    with pytest.raises(ValueError, match="multiple of 4"):
        ModelSpec("x", "teacher", "w", window_frames=6)
