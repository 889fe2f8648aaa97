"""The analytic cost model (dystream.bench.cost) against torch's FLOP counter, and the `bench` CLI's options."""

from __future__ import annotations

import argparse

import pytest
import torch

from dystream.bench import cli, cost
from dystream.models.audio import AudioEncoder
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig


def _close(model: float, counted: float) -> bool:
    return abs(model - counted) <= 0.05 * counted


@torch.inference_mode()
def test_student_chunk_matches_flop_counter_small():
    torch.manual_seed(0)
    dit = AvatarDiT(DiTConfig.from_preset("small")).eval()
    cfg, (h, w) = dit.config, (8, 8)
    cache = dit.new_kv_cache(1)
    dit.forward_chunk(torch.zeros(1, cfg.in_channels, 1, h, w), torch.zeros(1, 1), None, None, cache)
    c = cfg.chunk_frames
    x, sigma = torch.randn(1, cfg.in_channels, c, h, w), torch.full((1, c), 0.5)
    audio = torch.randn(1, cfg.chunk_audio_frames(c), cfg.audio_dim)
    while cache.num_frames < cfg.layout.max_cached_frames:  # steady state: sink + full window
        dit.forward_chunk(x, sigma, audio, audio, cache)
    with cost.flop_counter() as counter:
        dit.forward_chunk(x, sigma, audio, audio, cache, write_cache=False)
    counted = counter.get_total_flops()
    model = cost.student_chunk_flops(cfg, (h, w), steps=1)["total"]
    assert _close(model, counted), (model, counted)
    # the teacher's bidirectional forward over a short clip (reference without audio)
    f = 5
    sigma = torch.full((1, f), 0.5)
    sigma[:, 0] = 0
    audio = torch.randn(1, cfg.frames_per_latent * (f - 1), cfg.audio_dim)
    with cost.flop_counter() as counter:
        dit(torch.randn(1, cfg.in_channels, f, h, w), sigma, audio, audio)
    model = cost.teacher_step_flops(cfg, (h, w), f) / 3
    assert _close(model, counter.get_total_flops()), (model, counter.get_total_flops())


@pytest.mark.parametrize(("preset", "overrides"), [("tiny", {}), ("tiny-f4", {}), ("tiny", {"copy_warp": True})])
@torch.inference_mode()
def test_vae_decode_matches_flop_counter(preset, overrides):
    torch.manual_seed(0)
    vae = ReferenceGuidedVAE(VAEConfig.from_preset(preset, **overrides)).eval()
    size, r_s = 64, vae.config.spatial_factor
    cache = vae.new_decode_cache(torch.rand(1, 1, 3, size, size) * 2 - 1)
    z = torch.randn(1, vae.config.latent_channels, 2, size // r_s, size // r_s)
    vae.decode_chunk(z[:, :, :1], cache)  # the first latent frame: not the steady state
    with cost.flop_counter() as counter:
        vae.decode_chunk(z[:, :, 1:], cache)
    model = cost.vae_decode_flops(vae.config, size, size)["total"]
    assert _close(model, counter.get_total_flops()), (model, counter.get_total_flops())


@torch.inference_mode()
def test_audio_window_matches_flop_counter():
    enc = AudioEncoder("tiny")
    with cost.flop_counter() as counter:
        enc(torch.randn(1, 20 * 640))
    model = cost.audio_window_flops(enc.config, 20)
    assert _close(model, counter.get_total_flops()), (model, counter.get_total_flops())


def test_cost_table_paper_setting():
    table = cost.cost_table(cost.CostSetup(height=928, width=704, patch=1))
    assert "638 tokens per latent frame" in table["setup"]  # as Wan2.2's f16 VAE with 2x2 patches
    assert 0 < table["dit_rtf_bound"] < 1 and 0 < table["vae_rtf_bound"] < 1
    text = cost.render(table)
    assert "| DiT: one chunk" in text and "teacher training step" in text
    with pytest.raises(ValueError, match="--patch 1"):
        cost.cost_table(cost.CostSetup(height=928, width=704))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_cli_cost_and_bad_options(capsys, tmp_path):
    assert cli.run(_args("cost", "--preset", "small", "--vae", "tiny", "--size", "64x64")) == 0
    assert "| DiT: one chunk" in capsys.readouterr().out
    out = str(tmp_path / "b.md")
    assert cli.run(_args("data", "--preset", "small", "--out", out)) == 2
    assert "does not take --preset" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert cli.run(_args("dit", "--device", "cuda", "--out", out)) == 2
        assert "CUDA is not available" in capsys.readouterr().out
    assert cli.run(_args("dit", "--dtype", "fp16", "--out", out)) == 2


def test_report_keeps_hand_written_sections():
    first = cli.merge_report(None, "# Benchmarks\n\nold")
    edited = "intro\n" + first + "\n## By hand\n\nkept\n"
    merged = cli.merge_report(edited, "# Benchmarks\n\nnew")
    assert merged.startswith("intro\n") and "new" in merged and "old" not in merged and "kept" in merged
