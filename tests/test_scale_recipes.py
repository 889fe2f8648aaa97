"""Every scale-out overlay composes with every stage recipe (`dystream fit --config STAGE --config OVERLAY`)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from dystream import cli

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted((ROOT / "recipes" / "scale").glob("*.yaml"))
STAGES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if "model:" in p.read_text() and p.stem != "eval")


def print_config(stage: Path, overlay: Path) -> tuple[int, dict | None, str]:
    subcommand = "predict" if stage.stem == "ode_pairs" else "fit"
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([subcommand, "--config", str(stage), "--config", str(overlay), "--print_config"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    text = out.getvalue()
    text = text[text.find("# lightning") :]  # an import may print a line before the config
    return code, (yaml.safe_load(text) if code == 0 else None), err.getvalue()


def test_the_four_overlays_exist():
    assert [p.stem for p in OVERLAYS] == ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
    assert {"teacher", "stage1_sid", "vae"} <= {p.stem for p in STAGES}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
@pytest.mark.parametrize("stage", STAGES, ids=lambda p: p.stem)
def test_overlay_composes_with_stage_recipe(stage: Path, overlay: Path):
    code, config, err = print_config(stage, overlay)
    assert code == 0, err[-2000:]
    trainer = config["trainer"]
    stage_trainer = yaml.safe_load(stage.read_text())["trainer"]
    # the overlay appends its callbacks after the recipe's (ModelCheckpoint & co. survive)
    paths = [c["class_path"] for c in trainer["callbacks"]]
    recipe_paths = [c["class_path"] for c in stage_trainer.get("callbacks", [])]
    assert paths[: len(recipe_paths)] == recipe_paths
    assert {"dystream.scale.StrategyCheck", "dystream.scale.ResumeState"} <= set(paths)
    assert trainer["accelerator"] == "gpu"  # GPU-only paths are explicit; a CPU trial overrides it
    assert config["model"]["class_path"] == yaml.safe_load(stage.read_text())["model"]["class_path"]
    strategy = trainer["strategy"]
    if overlay.stem == "ddp":
        assert strategy == "ddp_find_unused_parameters_true" and trainer["precision"] == "bf16-mixed"
    elif overlay.stem == "fsdp":
        args = strategy["init_args"]
        assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
        assert args["auto_wrap_policy"] == ["dystream.models.dit.AvatarBlock"]
        assert args["activation_checkpointing_policy"] == ["dystream.models.dit.AvatarBlock"]
        assert args["sharding_strategy"] == "FULL_SHARD" and args["state_dict_type"] == "sharded"
        assert trainer["precision"] is None and trainer["plugins"][0]["init_args"]["precision"] == "bf16-mixed"
        assert "dystream.scale.FSDPUnits" in paths
    else:
        assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
        assert strategy["init_args"]["stage"] == (2 if overlay.stem.endswith("zero2") else 3)
        assert "dystream.scale.ActivationCheckpointing" in paths


def test_the_fsdp_overlay_builds_lightnings_strategy_with_the_block_policy():
    """The overlay's strategy and plugin, instantiated as the CLI does: a set of AvatarBlock, our precision plugin."""
    import torch
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    from dystream.models.dit import AvatarBlock
    from dystream.scale import FSDPMixedPrecision

    trainer = yaml.safe_load((ROOT / "recipes" / "scale" / "fsdp.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_subclass_arguments(FSDPStrategy, "strategy")
    parser.add_argument("--plugin", type=FSDPMixedPrecision)
    built = parser.instantiate_classes(
        parser.parse_object({"strategy": trainer["strategy"], "plugin": trainer["plugins"][0]})
    )
    assert type(built.strategy) is FSDPStrategy
    assert built.strategy.kwargs["auto_wrap_policy"]._module_classes == {AvatarBlock}
    assert built.strategy.kwargs["use_orig_params"] is True
    mp = built.plugin.mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, None)
