"""Self-describing weight files: safetensors with the architecture config in the metadata.

Every network a stage hands to the next one (and every zoo entry) is one ``.safetensors`` file:

    metadata["dystream.arch"]    registered architecture name, e.g. "dit", "vae", "audio"
    metadata["dystream.config"]  JSON of the model's config dataclass
    metadata["dystream.extra"]   JSON of anything else (recipe, source commit, latent statistics, ...)

so ``load_model(path)`` rebuilds the exact module and loads it strictly, without executing
pickled code (k-diffusion keeps its config in safetensors metadata the same way).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

# arch name -> "module:ModelClass:ConfigClass"
ARCHITECTURES: dict[str, str] = {
    "dit": "dystream.models.dit:AvatarDiT:DiTConfig",
    "vae": "dystream.models.vae:ReferenceGuidedVAE:VAEConfig",
    "audio": "dystream.models.audio:AudioEncoder:AudioEncoderConfig",
    "metric_syncnet": "dystream.evaluation.networks.syncnet_small:SmallSyncNet:SmallSyncNetConfig",
    "metric_pose": "dystream.evaluation.networks.pose_small:PoseRegressor:PoseRegressorConfig",
    "metric_identity": "dystream.evaluation.networks.identity_small:IdentityNet:IdentityNetConfig",
}


class WeightFileError(RuntimeError):
    """A weight file is missing, truncated, of the wrong architecture, or does not match its model."""


def _resolve(arch: str) -> tuple[type[nn.Module], type]:
    if arch not in ARCHITECTURES:
        raise WeightFileError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    module_name, model_name, config_name = ARCHITECTURES[arch].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


def source_commit() -> str:
    """The git commit of the working tree, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_model(model: nn.Module, path: str | Path, arch: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (which must carry a dataclass ``config``) to ``path`` as self-describing safetensors."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise WeightFileError(f"{type(model).__name__} has no dataclass `config`; cannot describe it in the file")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "dystream.arch": arch,
        "dystream.config": json.dumps(dataclasses.asdict(config)),
        "dystream.extra": json.dumps({"commit": source_commit(), **(extra or {})}),
    }
    tmp = path.with_suffix(path.suffix + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a crash never leaves a half-written file under the final name
    return path


def read_metadata(path: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(arch, config dict, extra dict) of a weight file."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightFileError(
            f"{path} is not a readable safetensors file ({exc}); re-export or re-download it"
        ) from exc
    if "dystream.arch" not in meta:
        raise WeightFileError(f"{path} has no dystream metadata; convert foreign checkpoints with their adapter")
    return meta["dystream.arch"], json.loads(meta["dystream.config"]), json.loads(meta.get("dystream.extra", "{}"))


def load_model(path: str | Path, arch: str | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the module described by ``path`` and load its weights strictly."""
    from safetensors.torch import load_file

    file_arch, config_dict, extra = read_metadata(path)
    if arch is not None and file_arch != arch:
        raise WeightFileError(f"{path} holds a {file_arch!r} model, expected {arch!r}")
    model_cls, config_cls = _resolve(file_arch)
    config = config_cls(**_restore_tuples(config_cls, config_dict))
    model = model_cls(config)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise WeightFileError(f"{path} is truncated or corrupt ({exc}); re-export or re-download it") from exc
    model.load_state_dict(state, strict=True)
    model.file_extra = extra  # e.g. latent statistics, recipe, commit
    return model


def _restore_tuples(config_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; give tuple-typed fields their tuples back."""
    out = dict(values)
    for field in dataclasses.fields(config_cls):
        if field.name in out and isinstance(out[field.name], list) and "tuple" in str(field.type).lower():
            out[field.name] = tuple(out[field.name])
    return out
