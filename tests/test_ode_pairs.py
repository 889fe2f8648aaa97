"""ODE pairs: shards round-trip exactly, recorded states lie on the teacher's trajectory, the AR teacher is causal."""

from __future__ import annotations

import json

import pytest
import torch
from test_stage1_common import WINDOW, files, prompt_batch, record_pairs  # noqa: F401  (files is a fixture)

from dystream.datamodules.ode_pairs import (
    ODEPairDataModule,
    ODEPromptDataModule,
    PairShardWriter,
    clip_noise_seed,
    read_pair_index,
    write_pair_index,
)
from dystream.diffusion.sampling import sample_euler
from dystream.diffusion.schedule import sampling_sigmas, student_sigmas
from dystream.stages.ode_pairs import ODEPairsStage


def _random_pair(g: torch.Generator, k: int = 3, f: int = 7, t: int = WINDOW) -> dict[str, torch.Tensor]:
    return {
        "states": torch.randn(k, 16, f, 8, 8, generator=g),
        "sigmas": student_sigmas(k, 5.0),
        "x0": torch.randn(16, f, 8, 8, generator=g),
        "audio_talk": torch.randn(t, 32, generator=g),
        "audio_listen": torch.randn(t, 32, generator=g),
        "mask": (torch.rand(t, generator=g) > 0.5).float(),
        "audio_self": torch.randn(t * 640, generator=g),
        "audio_other": torch.randn(t * 640, generator=g),
        "reference": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8),
    }


def test_pairs_round_trip_through_shards_and_the_datamodule(tmp_path):
    g = torch.Generator().manual_seed(0)
    written = {}
    for split, n in (("train", 5), ("val", 3)):
        writer = PairShardWriter(tmp_path, split, rank=0, max_samples=2)
        for i in range(n):
            key = f"{split}{i}"
            written[key] = _random_pair(g)
            writer.write(key, written[key], {"clip": key, "start": i})
        assert [s["samples"] for s in writer.close()] == [2] * (n // 2) + [n % 2] * (n % 2)
    index = write_pair_index(tmp_path, note="test")
    assert index["splits"] == {"train": 5, "val": 3} and index["note"] == "test"

    dm = ODEPairDataModule(pairs=str(tmp_path), batch_size=2, val_batch_size=2)
    dm.setup("fit")
    seen = {}
    for batch in dm.val_dataloader():
        for i, key in enumerate(batch["key"]):
            seen[key] = {k: batch[k][i] for k in ("states", "sigmas", "x0", "audio_talk", "audio_listen", "mask")}
            seen[key]["references"] = batch["references"][i, 0]
            seen[key]["reference_latent"] = batch["reference_latent"][i]
    train = dm.train_dataloader()
    assert len(train) == 3  # ceil(5 pairs / batch 2)
    for batch in train:
        assert batch["states"].shape == (2, 3, 16, 7, 8, 8)
        for i, key in enumerate(batch["key"]):
            seen[key] = {k: batch[k][i] for k in ("states", "sigmas", "x0", "audio_talk", "audio_listen", "mask")}
    assert {k for k in seen if k.startswith("val")} == {"val0", "val1", "val2"}
    for key, got in seen.items():
        for name, value in got.items():
            if name == "references":
                want = written[key]["reference"].float() / 127.5 - 1
            elif name == "reference_latent":
                want = written[key]["x0"][:, :1]
            else:
                want = written[key][name]
            assert value.dtype == want.dtype and torch.equal(value, want), (key, name)


def test_missing_or_foreign_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dystream predict --config recipes/ode_pairs.yaml"):
        read_pair_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else", "shards": []}))
    with pytest.raises(ValueError, match="dystream-ode-pairs/1"):
        ODEPairDataModule(pairs=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="batch_size"):
        ODEPairDataModule(pairs=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="key"):
        PairShardWriter(tmp_path, "train").write("a.b", _random_pair(torch.Generator()), {})


def test_teacher_steps_must_put_the_student_sigmas_on_the_grid(files):  # noqa: F811
    with pytest.raises(ValueError, match="teacher_steps=20 must be divisible by student_steps=3"):
        ODEPairsStage(teacher=files["teacher"], vae=files["vae"], audio=files["audio"], teacher_steps=20)


def test_predict_records_states_on_the_teachers_trajectory(files, tmp_path):  # noqa: F811
    out = record_pairs(files, tmp_path / "pairs", n_train=4, n_val=2, teacher_steps=6)
    index = read_pair_index(out)
    assert index["splits"] == {"train": 4, "val": 2}  # shards of at most 3 pairs
    assert index["record_steps"] == [0, 2, 4] and index["teacher_steps"] == 6
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-r000-000000.tar",
        "train-r000-000001.tar",
        "val-r000-000000.tar",
    ]

    stage = ODEPairsStage(teacher=files["teacher"], vae=files["vae"], audio=files["audio"], teacher_steps=6)
    dm = ODEPairDataModule(pairs=str(out), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    states, x0 = batch["states"], batch["x0"]
    z, f = states.shape[2], states.shape[3]
    # the first state is the per-clip starting noise (sigma 1) behind the clean reference latent
    noise = torch.randn(z, f - 1, 8, 8, generator=torch.Generator().manual_seed(clip_noise_seed(0, batch["key"][0])))
    torch.testing.assert_close(states[0, 0, :, 1:], noise)
    for k in range(3):
        torch.testing.assert_close(states[:, k, :, :1], x0[:, :, :1], rtol=0, atol=0)  # reference clean throughout
    # integrating the teacher on from any recorded state reaches the recorded end point: the states lie on the
    # trajectory at the student's sigmas (grid indices 0, 2, 4 of 6 steps)
    grid = sampling_sigmas(6, 5.0)
    cond = {"audio_talk": batch["audio_talk"], "audio_listen": batch["audio_listen"]}
    for k, i in enumerate([0, 2, 4]):
        end, _ = sample_euler(stage._denoiser("bidirectional"), states[:, k], cond, grid[i:], guidance=stage.guidance)
        torch.testing.assert_close(end, x0, atol=1e-5, rtol=1e-5)


def test_autoregressive_teacher_is_causal_across_chunks(files):  # noqa: F811
    stage = ODEPairsStage(
        teacher=files["teacher"],
        vae=files["vae"],
        audio=files["audio"],
        teacher_steps=3,
        guidance_scale=1.0,
        teacher_attention="block_causal",
    )
    batch = prompt_batch(["clip"])
    a = stage.record(batch)
    # different noise for the second chunk only
    stage._noise = lambda keys, shape, device, _orig=stage._noise: _orig(keys, shape, device).index_fill(
        2, torch.tensor([3, 4, 5]), 0.5
    )
    b = stage.record(batch)
    first, second = slice(0, 4), slice(4, 7)  # reference + chunk 0, chunk 1
    torch.testing.assert_close(a["x0"][:, :, first], b["x0"][:, :, first], rtol=0, atol=0)
    torch.testing.assert_close(a["states"][:, :, :, first], b["states"][:, :, :, first], rtol=0, atol=0)
    assert not torch.allclose(a["x0"][:, :, second], b["x0"][:, :, second])
    assert a["states"].shape == (1, 3, 16, 7, 8, 8)
    # and chunk 1 was generated after the clean chunk 0: its trajectory differs from the bidirectional one
    bidir = ODEPairsStage(
        teacher=files["teacher"], vae=files["vae"], audio=files["audio"], teacher_steps=3, guidance_scale=1.0
    ).record(batch)
    assert not torch.allclose(bidir["x0"][:, :, second], a["x0"][:, :, second])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    from dystream.datamodules.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, clips=6, val_clips=3, size=64, seconds=1.2, seed=0, shard_samples=2, workers=1)
    return str(root)


def _prompts(clips: str, **kw) -> ODEPromptDataModule:
    args = dict(
        train_shards=f"{clips}/train",
        val_shards=f"{clips}/val",
        window_frames=WINDOW,
        size=64,
        batch_size=2,
        num_workers=0,
        synthesize_if_missing=False,
    )
    dm = ODEPromptDataModule(**(args | kw))
    dm.setup("predict")
    return dm


def _windows(loader) -> list[tuple[str, int, str]]:
    return [(k, s, batch["split"]) for batch in loader for k, s in zip(batch["key"], batch["start"], strict=True)]


def test_prompt_loaders_are_deterministic_capped_and_split_across_ranks(clips, monkeypatch):
    train, val = _prompts(clips, num_clips=5).predict_dataloader()
    first = _windows(train)
    assert len(first) == 5 and len({k for k, _, _ in first}) == 5 and {s for _, _, s in first} == {"train"}
    assert _windows(train) == first  # window positions are seeded by the clip key
    assert [s for _, _, s in _windows(val)] == ["val"] * 3
    batch = next(iter(train))
    assert batch["references"].shape == (2, 1, 3, 64, 64) and batch["audio_self"].shape == (2, WINDOW * 640)
    # two ranks x two workers: disjoint windows that together are the same first five clips
    seen = []
    for rank in range(2):
        for worker in range(2):
            for name, value in (("RANK", rank), ("WORLD_SIZE", 2), ("WORKER", worker), ("NUM_WORKERS", 2)):
                monkeypatch.setenv(name, str(value))
            seen += _windows(_prompts(clips, num_clips=5).predict_dataloader()[0])
    assert sorted(seen) == sorted(first)
    with pytest.raises(ValueError, match="num_clips"):
        _prompts(clips, num_clips=-1)
