"""`dystream generate` on DyStream sample files (both scenarios) and `dystream stream`: mp4s whose duration
matches the audio and which carry the sound; bad sample files fail naming the entry and the field."""

from __future__ import annotations

import contextlib
import io
import json
import math
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dystream import cli
from dystream.models.audio import AudioEncoder
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.streaming.samples import SampleFileError, load_samples, read_sample_audio
from dystream.zoo.files import save_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread (see tests/test_streaming.py): much faster at these sizes on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    paths = {
        "checkpoint": save_model(AvatarDiT(DiTConfig.from_preset("tiny")), root / "student.safetensors", arch="dit"),
        "vae": save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), root / "vae.safetensors", arch="vae"),
        "audio": save_model(AudioEncoder("tiny"), root / "audio.safetensors", arch="audio"),
    }
    return {k: str(v) for k, v in paths.items()}


def _write_wav(path: Path, seconds: float, rate: int = 16000, seed: int = 0) -> Path:
    samples = (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 3000).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A DyStream-like folder: img_files/ and wav_files/, one track at 22.05 kHz (resampled on reading)."""
    root = tmp_path_factory.mktemp("media")
    (root / "img_files").mkdir()
    (root / "wav_files").mkdir()
    img = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "img_files" / "11.png")
    _write_wav(root / "wav_files" / "11.wav", 0.7)
    _write_wav(root / "wav_files" / "self.wav", 0.9, seed=1)
    _write_wav(root / "wav_files" / "other.wav", 0.9, rate=22050, seed=2)
    _write_wav(root / "wav_files" / "full.wav", 0.9, seed=3)
    (root / "wav_files" / "broken.wav").write_bytes(b"RIFF\x00\x00garbage, not audio" * 10)
    return root


def _speaker_only(**changes) -> dict:
    entry = {  # DyStream README, scenario 1 (motion and mode fields are accepted and ignored)
        "origin_video_path": None,
        "resampled_video_path": "img_files/11.png",
        "audio_path": "wav_files/11.wav",
        "audio_self_path": "wav_files/11.wav",
        "audio_other_path": None,
        "motion_self_path": "img_files/11.npz",
        "motion_other_path": None,
        "mode": "test_wild",
        "dataset_type": "dyadic",
        "video_id": "single_speaker_11_11",
    }
    return {**entry, **changes}


def _dyadic(**changes) -> dict:
    entry = _speaker_only(  # scenario 2: speaker and listener tracks, audio_path the mixed conversation
        audio_path="wav_files/full.wav",
        audio_self_path="wav_files/self.wav",
        audio_other_path="wav_files/other.wav",
        video_id="_sgIH81kj78-Scene-005+audio_v3_2",
    )
    return {**entry, **changes}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _model_args(exports: dict[str, str]) -> list[str]:
    return ["--checkpoint", exports["checkpoint"], "--vae", exports["vae"], "--audio", exports["audio"], "--size", "32"]


def _probe(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(video frames, audio seconds, (H, W)) decoded back with PyAV."""
    with av.open(str(path)) as container:
        assert container.streams.audio, f"{path} has no audio stream"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
        rate = container.streams.audio[0].rate
    return len(frames), samples / rate, frames[0].shape[:2]


def test_generate_both_dystream_scenarios(exports, media, tmp_path, monkeypatch):
    monkeypatch.chdir(media)  # DyStream resolves relative paths against the working directory
    samples = tmp_path / "sample_files.json"
    samples.write_text(json.dumps([_speaker_only(), _dyadic()]))
    code, out, err = run_cli(["generate", "--samples", str(samples), "--out", str(tmp_path / "out"), "--quiet",
                              *_model_args(exports)])  # fmt: skip
    assert code == 0, err
    for vid, seconds in (("single_speaker_11_11", 0.7), ("_sgIH81kj78-Scene-005+audio_v3_2", 0.9)):
        frames, audio_seconds, hw = _probe(tmp_path / "out" / f"{vid}.mp4")
        assert frames == math.ceil(seconds * 25)
        assert hw == (32, 32)
        assert abs(audio_seconds - seconds) < 0.07  # AAC pads to whole 1024-sample frames
        assert f"{vid}.mp4" in out


def test_single_entry_file_and_paths_relative_to_the_sample_file(exports, media, tmp_path):
    samples = media / "one.json"  # not run from media/: paths resolve against the file's folder
    samples.write_text(json.dumps(_dyadic(audio_path=None, video_id="mixed_here")))
    code, _, err = run_cli(["generate", "--samples", str(samples), "--out", str(tmp_path), "--quiet",
                            *_model_args(exports)])  # fmt: skip
    assert code == 0, err
    frames, audio_seconds, _ = _probe(tmp_path / "mixed_here.mp4")
    assert frames == math.ceil(0.9 * 25) and abs(audio_seconds - 0.9) < 0.07


@pytest.mark.parametrize(
    "entry, message",
    [
        (_speaker_only(audio_self_path="wav_files/nope.wav"), "field 'audio_self_path': file not found"),
        (_dyadic(audio_other_path="wav_files/missing.wav"), "field 'audio_other_path': file not found"),
        (_speaker_only(resampled_video_path=12), "field 'resampled_video_path': expected a string, got int"),
        (_dyadic(audio_other_path=["a.wav"]), "field 'audio_other_path': expected a string or null, got list"),
        ({k: v for k, v in _speaker_only().items() if k != "audio_self_path"}, "missing field 'audio_self_path'"),
        (_speaker_only(video_id=None), "missing field 'video_id'"),
        (_speaker_only(video_id="../escape"), "field 'video_id': '../escape' is not a plain file name"),
    ],
)
def test_bad_entries_name_the_entry_and_the_field(media, tmp_path, entry, message):
    samples = tmp_path / "bad.json"
    samples.write_text(json.dumps([_speaker_only(video_id="fine"), entry]))
    with pytest.raises(SampleFileError, match="entry 1") as info:
        load_samples(samples, root=media)
    assert message in str(info.value)
    if isinstance(entry.get("video_id"), str) and "/" not in entry["video_id"]:
        assert repr(entry["video_id"]) in str(info.value)


def test_unreadable_audio_names_entry_and_field(exports, media, tmp_path):
    samples = tmp_path / "broken.json"
    samples.write_text(json.dumps([_dyadic(audio_other_path="wav_files/broken.wav", video_id="b")]))
    (entry,) = load_samples(samples, root=media)
    with pytest.raises(SampleFileError, match="entry 0 \\(video_id 'b'\\), field 'audio_other_path': unreadable"):
        read_sample_audio(entry)
    code, _, err = run_cli(["generate", "--samples", str(samples), "--out", str(tmp_path), "--root", str(media),
                            "--quiet", *_model_args(exports)])  # fmt: skip
    assert code == 2 and "field 'audio_other_path': unreadable audio" in err and "Traceback" not in err


def test_resampling_and_length_rules(media, tmp_path):
    samples = tmp_path / "s.json"
    samples.write_text(json.dumps(_dyadic(audio_self_path="wav_files/11.wav")))
    (entry,) = load_samples(samples, root=media)
    own, other, mix = read_sample_audio(entry)
    # the 22.05 kHz partner track is resampled to 16 kHz; the shorter self track is padded with silence
    assert own.shape == other.shape == mix.shape and abs(own.shape[0] - 0.9 * 16000) < 64
    assert not own[int(0.7 * 16000) + 10 :].any()


def test_file_level_errors(media, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(SampleFileError, match="not valid JSON"):
        load_samples(bad)
    bad.write_text("[]")
    with pytest.raises(SampleFileError, match="non-empty list"):
        load_samples(bad)
    bad.write_text(json.dumps([_speaker_only(), _speaker_only()]))
    with pytest.raises(SampleFileError, match="entry 1 .*same id as entry 0"):
        load_samples(bad, root=media)
    with pytest.raises(SampleFileError, match="sample file not found"):
        load_samples(tmp_path / "absent.json")


def test_missing_checkpoint_and_zoo_errors(media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    samples = tmp_path / "s.json"
    samples.write_text(json.dumps(_speaker_only()))
    base = ["generate", "--samples", str(samples), "--out", str(tmp_path), "--root", str(media), "--quiet"]
    code, _, err = run_cli(base)
    assert code == 2 and "no student checkpoint" in err and "--checkpoint" in err
    import dystream.zoo

    monkeypatch.delattr(dystream.zoo, "load_pretrained", raising=False)
    code, _, err = run_cli([*base, "--pretrained", "tiny"])
    assert code == 2 and "the model zoo is not available yet" in err


def test_stream_cli_writes_the_video_and_prints_latency(exports, media, tmp_path):
    out = tmp_path / "live.mp4"
    stats = tmp_path / "stats.json"
    argv = ["stream", "--image", str(media / "img_files" / "11.png"), "--audio-self", str(media / "wav_files" /
            "self.wav"), "--audio-other", str(media / "wav_files" / "other.wav"), "--out", str(out), "--packet-ms",
            "20", "--stats-json", str(stats), *_model_args(exports)]  # fmt: skip
    code, printed, err = run_cli(argv)  # real-time pace: 0.9 s of audio
    assert code == 0, err
    frames, audio_seconds, _ = _probe(out)
    assert frames == math.ceil(0.9 * 25) and abs(audio_seconds - 0.9) < 0.07
    summary = json.loads(stats.read_text())
    assert summary["frames"] == frames and summary["frame_latency_s"]["median"] > 0
    assert "first_frame_delay_s" in printed and "rtf_dit" in printed
    code, _, err = run_cli([*argv, "--no-realtime", "--out", str(tmp_path / "fast.mp4")])
    assert code == 0, err
    assert _probe(tmp_path / "fast.mp4")[0] == frames
