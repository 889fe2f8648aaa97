"""The shard format: keys, codecs, bounded shard writing, the index and shard resolution."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds
from scipy.io import wavfile

from dystream.datamodules.format import (
    SAMPLE_RATE,
    ShardWriter,
    build_index,
    check_key,
    decode_wav,
    encode_wav,
    iter_tar_samples,
    read_index,
    resolve_shards,
    sanitize_key,
)


def test_keys():
    assert check_key("spk_01-take-2") == "spk_01-take-2"
    for bad in ("a.b", "a/b", "", "a b"):
        with pytest.raises(ValueError, match="invalid sample key"):
            check_key(bad)
    assert sanitize_key("speaker.01/take 1.mp4") == "speaker_01_take_1_mp4"


def _wav(rate: int, pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    wavfile.write(buf, rate, pcm)
    return buf.getvalue()


def test_wav_codec_round_trip_and_repairs():
    x = (0.5 * np.sin(np.arange(1600) / 7.0)).astype(np.float32)
    got, rate = decode_wav(encode_wav(x))
    assert rate == SAMPLE_RATE and np.abs(got - x).max() <= 0.5 / 32767 + 1e-7
    stereo = np.stack([x, -x], axis=1)  # channels are averaged
    got, _ = decode_wav(_wav(SAMPLE_RATE, stereo))
    assert np.abs(got).max() < 1e-6
    got, rate = decode_wav(_wav(32_000, np.repeat(x, 2)))  # another rate is resampled
    assert rate == 32_000 and got.shape == (1600,) and np.abs(got[50:-50] - x[50:-50]).max() < 0.02
    with pytest.raises(ValueError, match="empty"):
        decode_wav(b"")
    with pytest.raises(ValueError, match="unreadable"):
        decode_wav(b"RIFF0000WAVEjunk")


def _sample(key: str, size: int = 1000) -> dict:
    return {"__key__": key} | {f: b"x" * size for f in ("mp4", "self.wav", "other.wav", "mask.npy", "json")}


def test_shard_writer_bounds_shards_and_writes_the_index(tmp_path):
    with ShardWriter(tmp_path, max_samples=3, max_bytes=12_000) as writer:
        for i in range(7):
            writer.write(_sample(f"k{i}"))
    index = read_index(tmp_path)
    # 5000 bytes per sample: the byte bound (2 per shard) bites before the count bound (3)
    assert [s["samples"] for s in index["shards"]] == [2, 2, 2, 1] and index["total_samples"] == 7
    keys = [s["__key__"] for e in index["shards"] for s in iter_tar_samples(tmp_path / e["name"])]
    assert keys == [f"k{i}" for i in range(7)]
    w = ShardWriter(tmp_path / "y")
    w.write(_sample("a"))
    with pytest.raises(ValueError, match="duplicate"):
        w.write(_sample("a"))
    w.close()


def test_build_index_counts_and_lists_incomplete_samples(tmp_path):
    with open(tmp_path / "a.tar", "wb") as f:
        w = wds.TarWriter(f, encoder=False)
        w.write(_sample("good"))
        w.write(_sample("dotted.key"))  # read back as key "dotted" with extensions "key.mp4", ...
        w.write({"__key__": "partial", "mp4": b"x"})
        w.close()
    index = build_index(tmp_path)
    assert index["total_samples"] == 3
    problems = {p["key"]: p for p in index["problems"]["a.tar"]}
    assert set(problems) == {"dotted", "partial"}
    assert "key.mp4" in problems["dotted"]["unknown"] and "self.wav" in problems["partial"]["missing"]


def test_resolve_shards(tmp_path):
    with ShardWriter(tmp_path, max_samples=1) as writer:
        for i in range(3):
            writer.write(_sample(f"k{i}", 10))
    by_folder = resolve_shards(str(tmp_path))
    assert len(by_folder.urls) == 3 and by_folder.total == 3
    by_pattern = resolve_shards(str(tmp_path / "shard-{000000..000001}.tar"))
    assert len(by_pattern.urls) == 2 and by_pattern.counts == [1, 1]
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_shards(str(tmp_path / "shard-{000000..000009}.tar"))
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="dystream data index"):
        resolve_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dystream data synth"):
        resolve_shards(str(tmp_path / "missing_folder"))


def test_video_codec_settings_allow_exact_random_access():
    import av

    from dystream.datamodules.format import decode_video, encode_video

    frames = np.random.default_rng(0).integers(0, 255, (60, 32, 48, 3), dtype=np.uint8)
    data = encode_video(frames)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 25 and stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        packets = [p for p in container.demux(stream) if p.size]
    assert [i for i, p in enumerate(packets) if p.is_keyframe] == [0, 25, 50]  # a keyframe every second
    pts = [p.pts for p in packets]
    assert pts == sorted(pts)  # decode order = display order: no B-frames
    assert decode_video(data).shape == frames.shape
    with pytest.raises(ValueError, match="even"):
        encode_video(frames[:, :31])
