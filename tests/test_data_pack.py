"""Packing real clips: constant 25 fps, 16 kHz mono, VAD masks, keys, bounded shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dystream.datamodules import synthetic as syn
from dystream.datamodules.format import (
    decode_video,
    encode_video,
    iter_tar_samples,
    read_index,
    resample_audio,
    sample_to_clip,
)
from dystream.datamodules.pack import pack, segments_to_mask


def _write_wav(path, audio: np.ndarray, rate: int, channels: int = 1) -> None:
    from scipy.io import wavfile

    x = resample_audio(audio, 16_000, rate)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype("<i2")
    wavfile.write(path, rate, np.stack([pcm] * channels, 1) if channels > 1 else pcm)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    src = tmp_path_factory.mktemp("clips")
    clip = syn.make_clip(0, "train", 1, 64, 2.0)
    # a) 50 fps video (each clip frame shown twice), self at 44.1 kHz stereo, partner given as a mix
    a = src / "speaker.01" / "take 1"
    a.mkdir(parents=True)
    (a / "clip.mp4").write_bytes(encode_video(np.repeat(clip.video, 2, axis=0), fps=50))
    _write_wav(a / "self.wav", clip.audio_self, 44_100, channels=2)
    _write_wav(a / "mix.wav", clip.audio_self + clip.audio_other, 16_000)
    (a / "meta.json").write_text(json.dumps({"identity": "speaker01", "scores": {"dover": 0.7}}))
    # b) 30 fps video whose frame j is a flat grey of level 4 j (so the shown frame can be read back)
    b = src / "b"
    b.mkdir()
    levels = (np.arange(60) * 4).astype(np.uint8)
    greys = np.broadcast_to(levels[:, None, None, None], (60, 32, 32, 3)).copy()
    (b / "clip.mp4").write_bytes(encode_video(greys, fps=30, crf=0))  # lossless, so levels read back exactly
    _write_wav(b / "self.wav", clip.audio_self[: 2 * 16_000], 16_000)
    np.save(b / "mask.npy", np.arange(50) % 2 == 0)
    # c) no self.wav: rejected with a reason
    c = src / "c"
    c.mkdir()
    (c / "clip.mp4").write_bytes((a / "clip.mp4").read_bytes())
    out = tmp_path_factory.mktemp("shards")
    index = pack(src, out, shard_samples=1, workers=1, crf=0)
    clips = {}
    for entry in read_index(out)["shards"]:
        for s in iter_tar_samples(out / entry["name"]):
            clips[s["__key__"]] = (sample_to_clip(s), s)
    return {"clip": clip, "index": index, "clips": clips, "b_source": (b / "clip.mp4").read_bytes()}


def test_keys_shards_and_skips(packed):
    index = packed["index"]
    assert set(packed["clips"]) == {"speaker_01_take_1", "b"}  # dots and spaces replaced
    assert index["total_samples"] == 2 and len(index["shards"]) == 2  # bounded by shard_samples=1
    assert list(index["skipped"]) == ["c"] and "self.wav" in index["skipped"]["c"]


def test_video_is_constant_25_fps(packed):
    got, raw = packed["clips"]["speaker_01_take_1"]
    clip = packed["clip"]
    assert got.meta["fps"] == 25 and got.n_frames == clip.n_frames == 50
    err = got.video.astype(np.float64) - clip.video
    assert 10 * np.log10(255.0**2 / np.mean(err**2)) > 28.0  # two H.264 encodes
    # 30 fps source: output frame i shows the source frame on screen at i / 25 s
    b, _ = packed["clips"]["b"]
    source = decode_video(packed["b_source"]).astype(np.float64).mean(axis=(1, 2, 3))
    output = decode_video(_raw(packed, "b")["mp4"]).astype(np.float64).mean(axis=(1, 2, 3))
    shown = np.abs(output[:, None] - source[None, :]).argmin(axis=1)  # greys differ by 4 levels per frame
    np.testing.assert_array_equal(shown, np.floor(np.arange(50) * 30 / 25 + 1e-6))


def _raw(packed, key):
    return packed["clips"][key][1]


def test_audio_is_16k_mono_and_partner_is_mix_minus_self(packed):
    got, _ = packed["clips"]["speaker_01_take_1"]
    clip = packed["clip"]
    assert got.audio_self.shape == clip.audio_self.shape == (50 * 640,)
    # FFmpeg's resampler (44.1 kHz -> 16 kHz) is not scipy's: compare by relative error energy
    for got_audio, want in ((got.audio_self, clip.audio_self), (got.audio_other, clip.audio_other)):
        assert np.sum((got_audio - want) ** 2) < 1e-3 * np.sum(want**2)
    assert got.meta["partner_audio"] == "mix.wav - self.wav"
    assert got.meta["identity"] == "speaker01" and got.meta["scores"] == {"dover": 0.7}


def test_vad_mask_agrees_with_the_true_speaking_frames(packed):
    got, _ = packed["clips"]["speaker_01_take_1"]
    assert got.meta["mask_source"] == "silero-vad"
    assert np.mean(got.mask == packed["clip"].mask) > 0.75


def test_a_provided_mask_is_used_as_is(packed):
    got, _ = packed["clips"]["b"]
    assert got.meta["mask_source"] == "mask.npy"
    np.testing.assert_array_equal(got.mask, (np.arange(50) % 2 == 0).astype(np.uint8))
    assert not got.audio_other.any() and got.meta["partner_audio"] == "none (silence)"


def test_segments_to_mask_takes_frames_at_least_half_covered():
    assert segments_to_mask([{"start": 0, "end": 320}], 2).tolist() == [1, 0]
    assert segments_to_mask([{"start": 0, "end": 319}], 2).tolist() == [0, 0]
    assert segments_to_mask([{"start": 300, "end": 1000}], 2).tolist() == [1, 1]


def test_an_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip.mp4"):
        pack(tmp_path, tmp_path / "out")
