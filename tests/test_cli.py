"""The `dystream` console script and the recipes: every recipe parses, bad values fail at parse time."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dystream import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
STAGE_RECIPES = [p for p in RECIPES if p.parent.name == "recipes" and p.stem != "eval"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse/jsonargparse exit after --help / --print_config / errors
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def test_help_lists_lightning_and_built_tool_commands():
    code, out, _ = run_cli(["--help"])
    assert code == 0
    for name in [*cli.LIGHTNING_COMMANDS, *cli.available_tool_commands()]:
        assert name in out


def test_unbuilt_tool_commands_do_not_exist():
    code, _, err = run_cli(["no-such-command"])
    assert code == 2 and "invalid choice" in err


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "dystream.cli", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "fit" in proc.stdout


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.stem)
def test_every_stage_recipe_parses(recipe: Path):
    subcommand = "predict" if recipe.stem == "ode_pairs" else "fit"
    code, out, err = run_cli([subcommand, "--config", str(recipe), "--print_config"])
    assert code == 0, err[-2000:]
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"].startswith("dystream.stages.")


@pytest.mark.parametrize("recipe", [p for p in STAGE_RECIPES if "lr:" in p.read_text()], ids=lambda p: p.stem)
def test_negative_learning_rate_fails_at_parse_time_naming_the_field(recipe: Path):
    subcommand = "predict" if recipe.stem == "ode_pairs" else "fit"
    code, _, err = run_cli([subcommand, "--config", str(recipe), "--model.init_args.lr=-1", "--print_config"])
    assert code != 0
    assert "lr" in err


def test_unknown_preset_fails_at_parse_time_naming_the_field():
    recipe = ROOT / "recipes" / "teacher.yaml"
    code, _, err = run_cli(["fit", "--config", str(recipe), "--model.init_args.dit_preset=huge", "--print_config"])
    assert code != 0
    assert "dit_preset" in err


@pytest.mark.parametrize(
    ("precision", "accelerator", "native", "warns"),
    [
        ("bf16-mixed", "cpu", False, True),
        ("bf16-mixed", "cpu", True, False),
        ("32-true", "cpu", False, False),
        ("bf16-mixed", "cuda", False, False),
    ],
)
def test_bf16_on_a_cpu_without_native_bf16_is_named_with_the_fix(monkeypatch, precision, accelerator, native, warns):
    """bf16-mixed pays on a CPU only where oneDNN has native bf16; elsewhere the run is told to use 32-true."""
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    from dystream.cli import warn_if_bf16_is_emulated

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    device = CPUAccelerator() if accelerator == "cpu" else CUDAAccelerator()
    trainer = SimpleNamespace(precision=precision, accelerator=device)
    if warns:
        with pytest.warns(UserWarning, match="--trainer.precision 32-true"):
            assert "without native bf16" in warn_if_bf16_is_emulated(trainer)
    else:
        assert warn_if_bf16_is_emulated(trainer) is None
