"""SpeakerVidDataModule: the batch contract, parity with an independent decode, rank/worker splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dystream.datamodules import SpeakerVidDataModule
from dystream.datamodules import speakervid as sv
from dystream.datamodules.format import (
    SAMPLES_PER_FRAME,
    decode_video,
    iter_tar_samples,
    read_index,
    resolve_shards,
    sample_to_clip,
)
from dystream.datamodules.synthetic import synthesize


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("synth")
    # 8 training clips in 8 shards (one per shard), 3 validation clips in 2 shards
    synthesize(root, clips=8, val_clips=3, size=64, seconds=1.2, seed=0, shard_samples=1, workers=1)
    return str(root)


def _module(data: str, **kw) -> SpeakerVidDataModule:
    args = dict(
        train_shards=f"{data}/train",
        val_shards=f"{data}/val",
        window_frames=8,
        num_references=2,
        size=32,
        batch_size=2,
        num_workers=0,
        synthesize_if_missing=False,
    )
    dm = SpeakerVidDataModule(**(args | kw))
    dm.setup("fit")
    return dm


def _clips(data: str, split: str) -> dict:
    out = {}
    for entry in read_index(f"{data}/{split}")["shards"]:
        for s in iter_tar_samples(f"{data}/{split}/{entry['name']}"):
            out[s["__key__"]] = sample_to_clip(s)
    return out


def test_batch_has_exactly_the_contract_shapes(data):
    dm = _module(data)
    batch = next(iter(dm.train_dataloader()))
    b, t, r, s = 2, 8, 2, 32
    assert set(batch) == {"video", "references", "audio_self", "audio_other", "mask", "kpts", "key"}
    assert batch["video"].shape == (b, 3, t, s, s) and batch["video"].dtype == torch.float32
    assert batch["references"].shape == (b, r, 3, s, s) and batch["references"].dtype == torch.float32
    assert batch["audio_self"].shape == batch["audio_other"].shape == (b, t * SAMPLES_PER_FRAME)
    assert batch["mask"].shape == (b, t) and batch["mask"].dtype == torch.float32
    assert batch["kpts"].shape == (b, t, 134, 3) and batch["kpts"].dtype == torch.float32
    assert isinstance(batch["key"], list) and len(batch["key"]) == b and all(isinstance(k, str) for k in batch["key"])
    for name in ("video", "references"):
        assert batch[name].min() >= -1.0 and batch[name].max() <= 1.0


def test_window_matches_an_independent_pyav_decode(data):
    """decord window + resize == PyAV full decode, sliced and resized; audio, mask, kpts sliced exactly."""
    dm = _module(data)
    stream = dm.train_dataloader().stream
    stream.repeat = False
    clips = _clips(data, "train")
    n = 0
    for w in stream.iter_samples():
        clip, start = clips[w["key"]], w["start"]
        frames = torch.from_numpy(decode_video(sample_to_raw(data, w["key"])["mp4"])).permute(0, 3, 1, 2).float()
        want = F.interpolate(frames[start : start + 8], size=(32, 32), mode="bilinear", antialias=True) / 127.5 - 1
        assert (w["video"].permute(1, 0, 2, 3) - want).abs().max() < 2.5 / 127.5  # decoders agree to ~1 level
        a0, a1 = start * SAMPLES_PER_FRAME, (start + 8) * SAMPLES_PER_FRAME
        np.testing.assert_array_equal(w["audio_self"].numpy(), clip.audio_self[a0:a1])
        np.testing.assert_array_equal(w["audio_other"].numpy(), clip.audio_other[a0:a1])
        np.testing.assert_array_equal(w["mask"].numpy(), clip.mask[start : start + 8].astype(np.float32))
        kp = clip.kpts[start : start + 8].copy()
        kp[..., :2] *= 32 / 64
        np.testing.assert_allclose(w["kpts"].numpy(), kp, rtol=1e-6, atol=1e-5)
        # references come from outside the window and show those frames
        refs = w["ref_indices"]
        assert np.all((refs < start) | (refs >= start + 8))
        want = F.interpolate(frames[refs], size=(32, 32), mode="bilinear", antialias=True) / 127.5 - 1
        assert (w["references"] - want).abs().max() < 2.5 / 127.5
        n += 1
    assert n == 8
    assert stream.ledger.snapshot()["repaired"] == 0  # decord did the decoding, not the PyAV fallback


def sample_to_raw(data: str, key: str) -> dict:
    for entry in read_index(f"{data}/train")["shards"]:
        for s in iter_tar_samples(f"{data}/train/{entry['name']}"):
            if s["__key__"] == key:
                return s
    raise KeyError(key)


def test_references_never_overlap_the_window():
    decoder = sv.ClipDecoder(window_frames=12, num_references=3, size=32)
    rng = np.random.default_rng(0)
    for n_frames in (13, 14, 20, 100):
        for _ in range(200):
            start, refs = decoder.window(n_frames, rng)
            assert 0 <= start <= n_frames - 12
            assert np.all((refs < start) | (refs >= start + 12)) and np.all((refs >= 0) & (refs < n_frames))


def _keys_seen(stream: sv.ShardStream, monkeypatch, rank: int, world: int, worker: int, workers: int) -> list[str]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(workers))
    return [w["key"] for w in stream.iter_samples()]


@pytest.mark.parametrize("split", ["shard", "sample"])
def test_two_ranks_two_workers_see_disjoint_samples_covering_the_set(data, monkeypatch, split):
    folder = f"{data}/train"
    shards = resolve_shards(folder)
    ledger = sv.BadSampleLedger("test", 0.0)
    decoder = sv.ClipDecoder(8, 1, 16)

    def stream() -> sv.ShardStream:  # each worker process holds its own copy of the dataset
        return sv.ShardStream(shards.urls, decoder, ledger, batch_size=0, split=split, shuffle=True, repeat=False)

    seen = [_keys_seen(stream(), monkeypatch, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert all(seen), "every (rank, worker) gets data"
    flat = [k for keys in seen for k in keys]
    assert len(flat) == len(set(flat)) == shards.total  # disjoint and covering
    assert set(flat) == set(_clips(data, "train"))


def test_the_trainers_rank_splits_shards_without_any_environment(data, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    shards = resolve_shards(f"{data}/train")
    ledger = sv.BadSampleLedger("test", 0.0)

    def keys(rank: int) -> set[str]:
        stream = sv.ShardStream(
            shards.urls, sv.ClipDecoder(8, 1, 16), ledger, batch_size=0, shuffle=False, repeat=False, node=(rank, 2)
        )
        return {w["key"] for w in stream.iter_samples()}

    a, b = keys(0), keys(1)
    assert len(a) == len(b) == 4 and not a & b and a | b == set(_clips(data, "train"))


def test_every_rank_gets_the_same_number_of_batches(data, monkeypatch):
    """8 clips over 3 ranks is uneven (3/3/2 shards); with_epoch on the loader still cuts equal epochs."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    counts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        dm = _module(data, batch_size=2)
        loader = dm.train_dataloader()
        for _ in range(2):  # two epochs
            counts.append(sum(1 for _ in loader))
        assert len(loader) == 2  # ceil(8 / (2 x 3))
    assert counts == [2] * 6


def test_multiprocess_workers_and_persistent_epochs(data):
    dm = _module(data, num_workers=2, samples_per_epoch=8, batch_size=2)
    loader = dm.train_dataloader()
    epochs = [[k for b in loader for k in b["key"]] for _ in range(2)]
    assert [len(e) for e in epochs] == [8, 8]
    assert loader.last_report["bad"] == 0 and loader.last_report["seen"] >= 8
    val = dm.val_dataloader()
    keys = [k for b in val for k in b["key"]]
    assert len(keys) == 4 and set(keys) == set(_clips(data, "val"))  # 3 clips, the last batch wraps around


def test_validation_windows_are_deterministic(data):
    dm = _module(data)
    first = [b["video"] for b in dm.val_dataloader()]
    second = [b["video"] for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_predict_samples_the_validation_windows(data):
    dm = _module(data)
    dm.setup("predict")  # what `dystream predict` calls first
    predict = [(b["key"], b["video"]) for b in dm.predict_dataloader()]
    val = [(b["key"], b["video"]) for b in dm.val_dataloader()]
    assert predict and len(predict) == len(val)
    assert all(kp == kv and torch.equal(p, v) for (kp, p), (kv, v) in zip(predict, val, strict=True))


def test_too_few_shards_for_ranks_x_workers_is_a_clear_error(data, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="fewer than ranks x workers"):
        _module(data, num_workers=2).train_dataloader()
    assert len(_module(data, num_workers=2, resampled=True).train_dataloader()) >= 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("window_frames", 10),
        ("window_frames", 0),
        ("num_references", 0),
        ("size", 31),
        ("batch_size", 0),
        ("num_workers", -1),
        ("samples_per_epoch", 0),
        ("max_bad_fraction", 1.5),
        ("decode_threads", 0),
        ("shuffle_buffer", 0),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        SpeakerVidDataModule(**{name: value})


def test_missing_shards_are_a_clear_error(tmp_path):
    dm = SpeakerVidDataModule(train_shards=str(tmp_path / "nothing"), val_shards=None)
    with pytest.raises(FileNotFoundError, match="dystream data"):
        dm.setup("fit")


def test_embedded_default_is_synthesized_once_under_a_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sv, "DEFAULT_SYNTH", dict(clips=2, val_clips=1, seconds=1.0, clips_per_identity=1, shard_samples=1)
    )
    root = tmp_path / "data" / "synthetic"
    root.mkdir(parents=True)
    (root / ".synthesize.lock").write_text(f"{os.uname().nodename}:999999999")  # left by a dead process
    dm = SpeakerVidDataModule(size=32, num_workers=0, window_frames=4, batch_size=1)
    dm.prepare_data()
    assert json.loads((root / "train" / "index.json").read_text())["total_samples"] == 2
    assert not (root / ".synthesize.lock").exists()
    mtime = (root / "train" / "index.json").stat().st_mtime_ns
    dm.setup("fit")  # a second call finds the data and writes nothing
    assert (root / "train" / "index.json").stat().st_mtime_ns == mtime
    assert next(iter(dm.train_dataloader()))["video"].shape == (1, 3, 4, 32, 32)


def test_lightning_fit_consumes_exact_epochs(data):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_keys: list[str] = []
            self.val_keys: list[str] = []

        def training_step(self, batch, _):
            self.train_keys += batch["key"]
            return (self.w * batch["video"].mean()).sum() + (self.w**2).sum()

        def validation_step(self, batch, _):
            self.val_keys += batch["key"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    dm = SpeakerVidDataModule(
        train_shards=f"{data}/train",
        val_shards=f"{data}/val",
        window_frames=4,
        size=16,
        batch_size=2,
        num_workers=0,
        synthesize_if_missing=False,
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert trainer.num_training_batches == 4  # 8 clips / batch 2, known from the index
    assert len(probe.train_keys) == 16 and set(probe.train_keys) <= set(_clips(data, "train"))
    assert len(probe.val_keys) == 2 * 4 and set(probe.val_keys) == set(_clips(data, "val"))


def _synthesize_default_in_child(root: str) -> None:
    sv.synthesize_default(Path(root), size=32, seed=0)


def test_concurrent_ranks_synthesize_the_default_only_once(tmp_path, monkeypatch):
    import multiprocessing

    from dystream.datamodules import synthetic

    calls = tmp_path / "calls.txt"
    real = synthetic.synthesize

    def counting(*args, **kwargs):
        with open(calls, "a") as f:
            f.write("call\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "synthesize", counting)
    monkeypatch.setattr(
        sv, "DEFAULT_SYNTH", dict(clips=2, val_clips=1, seconds=1.0, clips_per_identity=1, shard_samples=1)
    )
    ctx = multiprocessing.get_context("fork")  # children inherit the patches above
    procs = [ctx.Process(target=_synthesize_default_in_child, args=(str(tmp_path / "root"),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert calls.read_text().count("call") == 1
    assert json.loads((tmp_path / "root" / "train" / "index.json").read_text())["total_samples"] == 2
