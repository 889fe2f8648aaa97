"""`dystream consolidate`: a stage checkpoint (single file, FSDP shards or DeepSpeed directory) -> the stage's export.

Under sharded parameters (FSDP, DeepSpeed ZeRO-3) a stage does not write its hand-over file at checkpoint time
(docs/scaling.md); this command writes it afterwards, from any checkpoint the stage saved:

    dystream consolidate runs/stage1_sid/checkpoints/last.ckpt --config recipes/stage1_sid.yaml

It reads the checkpoint into one full state dict on this machine, without a process group:

- a single file (DDP, one device, FSDP with ``state_dict_type: full``): read with ``torch.load(weights_only=True)``;
- an FSDP sharded directory (``meta.pt`` and ``*.distcp``): the shards are merged with torch's distributed-checkpoint
  reader (as ``python -m lightning.pytorch.utilities.consolidate_checkpoint`` does);
- a DeepSpeed directory (``checkpoint/`` with ``zero_pp_rank_*`` files): the fp32 weights are rebuilt by DeepSpeed's
  ``zero_to_fp32`` (which unpickles DeepSpeed's own files: consolidate only checkpoints you wrote);

then builds the stage named by the recipe (``model.class_path``) with the checkpoint's hyper-parameters (the recipe's
``init_args`` when the checkpoint has none), loads the state strictly (frozen networks a checkpoint leaves out come
from their files, as on resume) and calls the stage's own ``export()``: the same self-describing safetensors file(s)
the stage writes during single-device training (``teacher.safetensors`` + ``audio.safetensors``,
``student.safetensors``, ``vae.safetensors``). The stage is built on the CPU: it needs the memory of its networks.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Any

import torch
import yaml

HELP = "write a stage's export (safetensors) from a checkpoint, sharded ones included (FSDP, DeepSpeed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file, FSDP sharded directory or DeepSpeed checkpoint directory")
    parser.add_argument(
        "--config",
        required=True,
        help="the stage recipe the run used (its model.class_path names the stage; init_args fill in what the "
        "checkpoint lacks)",
    )
    parser.add_argument("--out-dir", default=None, help="where the export goes (default: the stage's export_dir)")


def checkpoint_kind(path: str | Path) -> str:
    """``file``, ``fsdp`` (sharded directory) or ``deepspeed`` (DeepSpeed directory); a clear error otherwise."""
    path = Path(path)
    if path.is_file():
        return "file"
    if path.is_dir():
        if (path / "meta.pt").is_file() and any(path.glob("*.distcp")):
            return "fsdp"
        if (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt")):
            return "deepspeed"
        raise ValueError(
            f"{path} is a directory but neither an FSDP sharded checkpoint (meta.pt + *.distcp) nor a DeepSpeed one "
            "(latest, <tag>/mp_rank_00_model_states.pt)"
        )
    raise FileNotFoundError(f"checkpoint not found: {path}")


def load_full_checkpoint(path: str | Path) -> dict[str, Any]:
    """One checkpoint dict with a full ``state_dict`` (and ``hyper_parameters`` where the format keeps them)."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "file":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an object that weights_only refuses: say which, never unpickle it
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) ({exc})") from exc
    if kind == "fsdp":
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        ckpt = _load_distributed_checkpoint(path)  # {"model": {...}, "optimizer_0": ..., + meta.pt's entries}
        ckpt["state_dict"] = ckpt.pop("model")
        return ckpt
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    # Lightning's DeepSpeed engine wraps the module; its keys may carry the wrapper's prefix
    return {"state_dict": {re.sub(r"^_forward_module\.", "", k): v for k, v in state.items()}}


def stage_from_recipe(config: str | Path, hyper_parameters: dict[str, Any] | None = None):
    """Build the recipe's stage (``model.class_path``) with ``hyper_parameters`` or the recipe's ``init_args``."""
    recipe = yaml.safe_load(Path(config).read_text())
    model = (recipe or {}).get("model") or {}
    if "class_path" not in model:
        raise ValueError(f"{config}: no model.class_path; pass the stage recipe the run used")
    module_name, _, class_name = model["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    args = dict(model.get("init_args") or {})
    args.update(hyper_parameters or {})
    return cls(**args)


def consolidate(checkpoint: str | Path, config: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the stage's export from ``checkpoint``; returns the files written."""
    ckpt = load_full_checkpoint(checkpoint)
    stage = stage_from_recipe(config, ckpt.get("hyper_parameters"))
    stage.on_load_checkpoint(ckpt)  # frozen networks a checkpoint leaves out come from their files, as on resume
    stage.load_state_dict(ckpt["state_dict"], strict=True)
    if out_dir is not None:
        stage.export_dir = Path(out_dir)
    before = {p: p.stat().st_mtime_ns for p in Path(stage.export_dir).glob("*.safetensors")}
    stage.export()
    written = [p for p in sorted(Path(stage.export_dir).glob("*.safetensors")) if before.get(p) != p.stat().st_mtime_ns]
    return written


def run(args: argparse.Namespace) -> int:
    for path in consolidate(args.checkpoint, args.config, args.out_dir):
        print(path)
    return 0
