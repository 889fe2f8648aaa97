"""Quiet, useful logs: a tiny `dystream fit` (and the ODE pairs `predict`) of real recipes, in a subprocess as a user
runs it, prints no warning line (ours are fixed at their cause, known-harmless third-party ones filtered in
dystream.logs) and names each export once; a refused recipe value is reported in two lines, field first, without
the usage text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dystream.datamodules.latents import export_latents
from dystream.datamodules.synthetic import synthesize
from dystream.models.audio import AudioEncoder
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.recipe_errors import parse_refusal
from dystream.zoo.files import save_model

ROOT = Path(__file__).resolve().parents[1]
# what a warning looks like in a log: Python's "file.py:12: SomeWarning: ...", Lightning's "file.py:12: message",
# a deprecation notice, setuptools' "!!" banners
WARNING_LINE = re.compile(r"\.py:\d+: |\b\w*Warning\b|deprecat|^\s*!!", re.IGNORECASE)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    synthesize(root, clips=2, val_clips=2, size=32, seconds=2.0, clips_per_identity=1, shard_samples=2, workers=1)
    return root


def _fit(recipe: str, run_dir: Path, world: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Four steps of `dystream fit` on a recipe, validating (and so exporting) twice, all outputs under run_dir."""
    argv = [
        sys.executable, "-m", "dystream.cli", "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"),
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}", f"--model.init_args.export_dir={run_dir / recipe}",
        f"--data.init_args.train_shards={world / 'train'}", f"--data.init_args.val_shards={world / 'val'}",
        "--data.init_args.size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=1",
        "--data.init_args.window_frames=8", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=run_dir, timeout=600, check=False)


def _warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if WARNING_LINE.search(line)]


@pytest.mark.parametrize("recipe", ["vae", "teacher"])
def test_tiny_fit_prints_no_warning_and_names_the_export_once(recipe, tiny_world, tmp_path):
    overrides: list[str] = []
    if recipe == "teacher":  # frozen VAE and audio encoder: Lightning's "modules in eval mode" case
        torch.manual_seed(0)
        vae = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", arch="vae")
        overrides = [
            f"--model.init_args.vae={vae}",
            "--model.init_args.audio=tiny",  # the recipe's runs/audio export does not exist here
            "--model.init_args.dit_preset=tiny",
            "--model.init_args.sample_steps=2",
            # the recipe checkpoints every 200 steps; here every 2, so the export is rewritten twice
            "--trainer.callbacks.init_args.every_n_train_steps=2",
            # the recipe trains from the latents the chain caches with the frozen VAE: cache them here
            f"--data.init_args.train_shards={tmp_path / 'latents'}",
        ]
        export_latents(vae, str(tiny_world / "train"), tmp_path / "latents", size=32, log=False)
    proc = _fit(recipe, tmp_path, tiny_world, *overrides)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert _warning_lines(log) == [], "\n".join(_warning_lines(log))
    exported = [line for line in log.splitlines() if line.startswith("exported ")]
    assert len(exported) == 1 and str(tmp_path / recipe) in exported[0], exported
    assert "Tip:" not in log


def test_tiny_ode_pairs_predict_prints_no_warning(tiny_world, tmp_path):
    torch.manual_seed(0)
    teacher = save_model(AvatarDiT(DiTConfig.from_preset("tiny")), tmp_path / "teacher.safetensors", arch="dit")
    vae = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", arch="vae")
    audio = save_model(AudioEncoder("tiny"), tmp_path / "audio.safetensors", arch="audio")
    argv = [
        sys.executable, "-m", "dystream.cli", "predict", "--config", str(ROOT / "recipes" / "ode_pairs.yaml"),
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", f"--model.init_args.teacher={teacher}",
        f"--model.init_args.vae={vae}", f"--model.init_args.audio={audio}", "--model.init_args.teacher_steps=3",
        f"--model.init_args.out_dir={tmp_path / 'pairs'}", f"--data.init_args.train_shards={tiny_world / 'train'}",
        f"--data.init_args.val_shards={tiny_world / 'val'}", "--data.init_args.size=32",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=1", "--data.init_args.window_frames=24",
        "--data.init_args.num_clips=1", "--data.init_args.num_val_clips=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (tmp_path / "pairs" / "index.json").exists()
    assert _warning_lines(log) == [], "\n".join(_warning_lines(log))


def test_bad_recipe_value_is_refused_in_two_lines_naming_field_value_rule_and_recipe():
    proc = subprocess.run(
        [sys.executable, "-m", "dystream.cli", "fit", "--config", "recipes/vae.yaml", "--model.lr=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0] == (
        "error: model.init_args.lr = -1 is refused: PositiveFloat requires v>0 "
        "(dystream.stages.vae.VAEStage; recipe recipes/vae.yaml; value from the command line)"
    )
    assert "dystream fit --help" in lines[1]
    assert "usage:" not in proc.stderr and "Warning" not in proc.stderr


def test_a_class_refusing_its_arguments_is_reported_in_two_lines_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "dystream.cli", "fit", "--config", "recipes/vae.yaml", "--model.min_references=3",
         "--model.max_references=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-2] == (
        "error: dystream.stages.vae.VAEStage refused its arguments: VAEStage: min_references (3) > max_references (1) "
        "(recipe recipes/vae.yaml)"
    )
    assert "Traceback" not in proc.stderr and len(lines) <= 3


def test_refusal_parsing_of_jsonargparse_reports():
    nested = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'dystream.stages.teacher.TeacherStage':
        Parser key "dit_preset":
          Expected a typing.Literal['tiny', 'mini']. Got value: huge
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='dit_preset', val='huge')"""
    refusal = parse_refusal(nested)
    assert refusal is not None
    assert (refusal.field, refusal.value, refusal.rule) == (
        "model.init_args.dit_preset",
        "huge",
        "must be one of 'tiny', 'mini'",
    )
    assert refusal.class_path == "dystream.stages.teacher.TeacherStage"
    flat = parse_refusal("Parser key \"trainer.max_steps\":\n  Expected a <class 'int'>. Got value: abc")
    assert flat is not None and (flat.field, flat.value, flat.rule) == (
        "trainer.max_steps",
        "abc",
        "must be of type int",
    )
    assert parse_refusal("unrecognized arguments: --nosuch=1") is None
