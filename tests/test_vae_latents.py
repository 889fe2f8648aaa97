"""`dystream data encode`: cached-latent shards equal the VAE's own one-shot encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dystream.cli import main as dystream_main
from dystream.datamodules.format import Clip, clip_to_sample, decode_video, iter_tar_samples, write_index, write_shard
from dystream.datamodules.latents import (
    frames_to_tensor,
    load_vae,
    read_latent_sample,
    reference_indices,
)
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.zoo.files import save_model


def _clip(key: str, frames: int = 10, size: int = 32, seed: int = 0) -> Clip:
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    video = np.stack(
        [np.stack([(xs * 7 + t * 5) % 256, (ys * 5 + t * 3) % 256, (xs + ys) * 3 % 256], -1) for t in range(frames)]
    ).astype(np.uint8)
    audio = (rng.standard_normal(frames * 640) * 0.1).astype(np.float32)
    return Clip(key, video, audio, audio * 0.5, (np.arange(frames) % 2).astype(np.uint8), meta={"identity": key})


@pytest.fixture()
def shards_and_vae(tmp_path):
    shard_dir = tmp_path / "clips"
    shard_dir.mkdir()
    entries = [write_shard(shard_dir / "shard-000000.tar", [clip_to_sample(_clip(f"c{i}", seed=i)) for i in range(2)])]
    write_index(shard_dir, entries)
    vae = ReferenceGuidedVAE(VAEConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "to_out" in name:  # give the zero-initialised guidance an effect
                p.normal_(0, 0.05)
        vae.set_latent_stats(torch.linspace(-0.5, 0.5, 16), torch.linspace(0.5, 1.5, 16))
    path = save_model(vae, tmp_path / "vae.safetensors", arch="vae")
    return shard_dir, path, vae


def test_encode_tool_writes_latents_equal_to_one_shot(tmp_path, shards_and_vae):
    shard_dir, vae_path, vae = shards_and_vae
    out = tmp_path / "latents"
    rc = dystream_main(
        ["data", "encode", "--vae", str(vae_path), "--shards", str(shard_dir), "--out", str(out), "--size", "32",
         "--num-references", "3"]
    )  # fmt: skip
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == 2 and index["content"] == "dystream-latents/2"
    source = {s["__key__"]: s for s in iter_tar_samples(shard_dir / "shard-000000.tar")}
    written = list(iter_tar_samples(out / index["shards"][0]["name"]))
    assert [s["__key__"] for s in written] == ["c0", "c1"]
    for sample in written:
        got = read_latent_sample(sample)
        src = source[got["key"]]
        video = frames_to_tensor(decode_video(src["mp4"]), 32)  # [3, 10, 32, 32]
        refs = reference_indices(10, 3)
        assert refs[0] == 0 and got["meta"]["latents"]["ref_indices"] == refs
        reference = video[:, :1]
        with torch.no_grad():
            expected = vae.encode(torch.cat([reference, video[:, :8]], dim=1)[None], video[None, :, 0][:, None])[0]
            expected_refs = vae.encode(
                video[:, refs].transpose(0, 1)[:, :, None], video[:, refs].transpose(0, 1)[:, None]
            )
        assert got["latents"].shape == (16, 3, 4, 4)  # 1 + 8 // 4 latent frames; 2 trailing frames not covered
        torch.testing.assert_close(got["latents"], expected, atol=2e-3, rtol=1e-3)  # stored as float16
        torch.testing.assert_close(got["ref_latents"], expected_refs[:, :, 0], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got["ref_latents"][0], got["latents"][:, 0], atol=0, rtol=0)
        assert sample["self.wav"] == src["self.wav"] and sample["mask.npy"] == src["mask.npy"]
        # the reference pixels, as encoded (no resize at 32: the decoded frames exactly)
        assert torch.equal(got["references"], torch.from_numpy(decode_video(src["mp4"])[refs]))
        assert got["meta"]["latents"]["covered_frames"] == 8 and got["meta"]["identity"] == got["key"]
        assert got["mask"].shape == (10,) and got["audio_self"].shape == (6400,)


def test_encode_tool_rejects_bad_input(tmp_path, shards_and_vae):
    shard_dir, vae_path, _ = shards_and_vae
    with pytest.raises(FileNotFoundError, match="recipes/vae.yaml"):
        load_vae(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="spatial factor 8"):
        dystream_main(
            ["data", "encode", "--vae", str(vae_path), "--shards", str(shard_dir), "--out", str(tmp_path / "o"),
             "--size", "36"]
        )  # fmt: skip
