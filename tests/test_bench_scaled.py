"""CPU smoke runs of the benchmarks at a chosen preset / size / dtype (small sizes, no timing assertions)."""

from __future__ import annotations

import argparse
import json

import pytest

from dystream.bench import cli


def _run(tmp_path, *argv: str) -> dict:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "bench.md"
    assert cli.run(parser.parse_args([*argv, "--quick", "--out", str(out)])) == 0
    return json.loads(out.with_suffix(".json").read_text())["results"][argv[0]]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dit_chunk_at_a_preset(tmp_path, dtype):
    figures = _run(tmp_path, "dit", "--preset", "tiny", "--size", "64x64", "--dtype", dtype)
    assert "error" not in figures
    assert figures["FLOPs per call (cost model)"] > 0 and 0 < figures["MFU (achieved / measured matmul peak)"]
    assert "peak memory" in figures and figures["DiT RTF (chunk time / 0.48 s)"] > 0


def test_vae_training_streaming_at_a_preset(tmp_path):
    vae = _run(tmp_path, "vae", "--preset", "tiny", "--size", "64x64")
    assert "error" not in vae and vae["decoded frames/s"] > 0
    train = _run(tmp_path, "training", "--preset", "tiny", "--size", "64x64", "--dtype", "bf16")
    assert "error" not in train and train["training step"]["median"] > 0
    stream = _run(tmp_path, "streaming", "--preset", "tiny", "--size", "64x64")
    assert "error" not in stream and stream["rtf DiT"] > 0 and stream["rtf VAE"] > 0


def test_bad_size_is_a_clear_error(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "bench.md"
    assert cli.run(parser.parse_args(["dit", "--preset", "tiny", "--size", "60x64", "--out", str(out)])) == 1
    figures = json.loads(out.with_suffix(".json").read_text())["results"]["dit"]
    assert "multiples of the VAE's spatial factor 8" in figures["error"]
