"""Bad input: every kind is repaired (documented) or skipped with a warning naming shard and key."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import webdataset as wds

from dystream.datamodules import SpeakerVidDataModule
from dystream.datamodules import speakervid as sv
from dystream.datamodules import synthetic as syn
from dystream.datamodules.format import (
    SAMPLES_PER_FRAME,
    ShardWriter,
    check_key,
    clip_to_sample,
    encode_npy,
    resample_audio,
    write_index,
)

WINDOW = 12


def _good(index: int, size: int = 64, seconds: float = 1.0) -> dict:
    return clip_to_sample(syn.make_clip(0, "train", index, size, seconds))


def _wav_at(audio: np.ndarray, rate: int, channels: int = 1) -> bytes:
    import io

    from scipy.io import wavfile

    x = resample_audio(audio, 16_000, rate)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype("<i2")
    if channels > 1:
        pcm = np.stack([pcm] * channels, axis=1)
    buf = io.BytesIO()
    wavfile.write(buf, rate, pcm)
    return buf.getvalue()


def _write_raw(path, samples: list[dict]) -> None:
    """Write samples as an external tool would: no key checks (so dotted keys get through)."""
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        for s in samples:
            writer.write(s)
        writer.close()


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    clean = syn.make_clip(0, "train", 1, 64, 1.0)  # the person speaks 76 % of this clip
    base = clip_to_sample(clean)
    bad = {}
    bad["corrupt"] = base | {"__key__": "corrupt", "mp4": np.random.default_rng(0).bytes(4000)}
    bad["truncated"] = base | {"__key__": "truncated", "mp4": base["mp4"][: len(base["mp4"]) // 2]}
    bad["noself"] = {k: v for k, v in base.items() if k != "self.wav"} | {"__key__": "noself"}
    bad["emptyother"] = base | {"__key__": "emptyother", "other.wav": b""}
    bad["shortmask"] = base | {"__key__": "shortmask", "mask.npy": encode_npy(clean.mask[:-3])}
    bad["fps30"] = base | {"__key__": "fps30", "json": json.dumps(clean.full_meta() | {"fps": 30}).encode()}
    bad["tooshort"] = clip_to_sample(syn.make_clip(0, "train", 0, 64, 0.4)) | {"__key__": "tooshort"}  # 10 frames
    dotted = {"__key__": "dotted.key"} | {k: v for k, v in base.items() if k != "__key__"}
    repaired = {
        "rate8k": base | {"__key__": "rate8k", "self.wav": _wav_at(clean.audio_self, 8_000)},
        "rate44k": base | {"__key__": "rate44k", "other.wav": _wav_at(clean.audio_other, 44_100, channels=2)},
        "narrow": _good(2, size=48) | {"__key__": "narrow"},  # decord cannot decode 48-wide frames; PyAV can
    }
    goods = [_good(i) | {"__key__": f"good{i}"} for i in range(3, 6)]
    _write_raw(root / "a.tar", goods[:2] + list(bad.values())[:4] + [repaired["rate8k"]])
    _write_raw(root / "b.tar", goods[2:] + list(bad.values())[4:] + [dotted, repaired["rate44k"], repaired["narrow"]])
    write_index(root, [{"name": "a.tar", "samples": 7}, {"name": "b.tar", "samples": 7}])
    return {"root": root, "clean": clean, "goods": {g["__key__"] for g in goods}, "repaired": set(repaired)}


def _stream(root, max_bad_fraction: float = 1.0, **kw) -> sv.ShardStream:
    urls = [str(root / "a.tar"), str(root / "b.tar")]
    ledger = sv.BadSampleLedger("test", max_bad_fraction)
    args = dict(batch_size=0, split="shard", shuffle=False, repeat=False) | kw
    return sv.ShardStream(urls, sv.ClipDecoder(WINDOW, 1, 64), ledger, **args)


def test_each_bad_input_is_skipped_or_repaired_as_documented(bad_shards, caplog):
    stream = _stream(bad_shards["root"])
    with caplog.at_level(logging.WARNING, logger="dystream.data"):
        windows = {w["key"]: w for w in stream.iter_samples()}
    assert set(windows) == bad_shards["goods"] | bad_shards["repaired"]
    report = stream.ledger.snapshot()
    assert report["reasons"] == {
        "corrupt_video": 2,  # random bytes, and an mp4 cut in half
        "missing_field": 1,  # no self.wav
        "bad_audio": 1,  # empty other.wav
        "length_mismatch": 1,  # mask shorter than the video
        "bad_metadata": 1,  # 30 fps
        "too_short": 1,  # 10 frames < 12 + 1
        "dotted_key": 1,
    }
    assert report["bad"] == 8 and report["repaired"] == 3 and report["seen"] == 14
    messages = [r.getMessage() for r in caplog.records]
    for key, shard in [("corrupt", "a.tar"), ("truncated", "a.tar"), ("noself", "a.tar"), ("emptyother", "a.tar")]:
        assert any(f"'{key}'" in m and shard in m for m in messages), key
    for key in ("shortmask", "fps30", "tooshort"):
        assert any(f"'{key}'" in m and "b.tar" in m for m in messages), key
    assert any("dot" in m and "b.tar" in m for m in messages)


def test_resampled_audio_matches_the_original(bad_shards):
    """The loader's repair equals an independent round trip 16 kHz -> rate -> 16 kHz (up to PCM16 steps)."""
    clean = bad_shards["clean"]
    windows = {w["key"]: w for w in _stream(bad_shards["root"]).iter_samples()}
    for key, field, rate in (("rate8k", "audio_self", 8_000), ("rate44k", "audio_other", 44_100)):
        w = windows[key]
        assert w[field].shape == (WINDOW * SAMPLES_PER_FRAME,)
        original = getattr(clean, field)
        round_trip = resample_audio(resample_audio(original, 16_000, rate), rate, 16_000)
        a0 = w["start"] * SAMPLES_PER_FRAME
        want = round_trip[a0 : a0 + WINDOW * SAMPLES_PER_FRAME]
        np.testing.assert_allclose(w[field].numpy(), want, atol=3e-4)
        if rate > 16_000:  # nothing is lost going up
            np.testing.assert_allclose(w[field].numpy(), original[a0 : a0 + want.shape[0]], atol=2e-3)


def test_writers_refuse_dotted_keys(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        check_key("clip.001")
    writer = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="dot"):
        writer.write({"__key__": "a.b", "mp4": b"x"})


def test_truncated_shard_is_counted_not_fatal(bad_shards, tmp_path):
    data = (bad_shards["root"] / "b.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 3])
    ledger = sv.BadSampleLedger("test", 1.0)
    stream = sv.ShardStream(
        [str(tmp_path / "cut.tar"), str(bad_shards["root"] / "a.tar")],
        sv.ClipDecoder(WINDOW, 1, 64),
        ledger,
        batch_size=0,
        shuffle=False,
        repeat=False,
    )
    keys = [w["key"] for w in stream.iter_samples()]
    assert {"good3", "good4"} <= set(keys)  # the next shard is still read
    assert ledger.snapshot()["reasons"].get("tar_error", 0) + ledger.snapshot()["reasons"].get("missing_field", 0) >= 1


def _module(root, **kw) -> SpeakerVidDataModule:
    args = dict(
        train_shards=str(root),
        val_shards=None,
        window_frames=WINDOW,
        size=32,
        batch_size=2,
        num_workers=0,
        synthesize_if_missing=False,
    )
    dm = SpeakerVidDataModule(**(args | kw))
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_bad_samples_stop_the_run_with_a_clear_error(bad_shards, workers):
    dm = _module(bad_shards["root"], max_bad_fraction=0.05, num_workers=workers, samples_per_epoch=16)
    with pytest.raises(sv.BadDataError, match="max_bad_fraction=0.05"):
        for _ in dm.train_dataloader():
            pass


def test_under_the_threshold_the_epoch_completes_and_is_reported(bad_shards, caplog):
    dm = _module(bad_shards["root"], max_bad_fraction=0.9, samples_per_epoch=8)
    loader = dm.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="dystream.data"):
        n = sum(1 for _ in loader)
    assert n == len(loader) == 4
    assert loader.last_report["bad"] > 0 and loader.last_report["reasons"]["corrupt_video"] >= 1
    assert any("epoch 0" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert dm.bad_sample_report()["train"]["seen"] == loader.last_report["seen"]


def test_ranks_with_bad_samples_still_yield_equal_epochs(bad_shards, monkeypatch):
    """Shard a (4 bad of 7) goes to rank 0, shard b (4 bad of 7) to rank 1: same batch count, no hang."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loader = _module(bad_shards["root"], max_bad_fraction=0.9, samples_per_epoch=12).train_dataloader()
        counts.append(sum(1 for _ in loader))
    assert counts == [3, 3]


def test_a_shard_with_only_bad_samples_is_an_error_not_a_hang(bad_shards, tmp_path):
    base = clip_to_sample(bad_shards["clean"])
    _write_raw(tmp_path / "x.tar", [base | {"__key__": f"bad{i}", "mp4": b"garbage"} for i in range(3)])
    write_index(tmp_path, [{"name": "x.tar", "samples": 3}])
    dm = _module(tmp_path, max_bad_fraction=1.0)
    with pytest.raises(sv.BadDataError, match="no usable sample"):
        next(iter(dm.train_dataloader()))
