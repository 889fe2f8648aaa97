"""Named adapters that load foreign checkpoints into dystream models, strictly, reporting what is new.

``load_wan22_state_dict`` loads an official Wan2.2 DiT state dict (``Wan-Video/Wan2.2`` ``WanModel``, e.g. the
TI2V-5B ``diffusion_pytorch_model*.safetensors`` shards merged into one dict) into an :class:`AvatarDiT`. The
AvatarDiT keeps Wan's parameter names, so the mapping is the identity; the adapter is strict about every Wan key
(missing, unexpected or mis-shaped keys are errors listing the keys) and reports the AvatarDiT extension
parameters the checkpoint cannot provide (audio attention, audio projection, learned prompt), which keep their
initialisation (zero output projections: the loaded model starts exactly as the base model, StreamAvatar §3.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from dystream.models.dit import AvatarDiT

__all__ = ["Wan22LoadReport", "load_wan22_state_dict"]


@dataclass
class Wan22LoadReport:
    """What :func:`load_wan22_state_dict` did.

    Attributes:
        loaded: state-dict keys taken from the checkpoint (all Wan2.2 keys of the model).
        new: model keys absent from the checkpoint (extension parameters), initialised by the model.
        new_modules: ``new`` grouped by module (``audio_proj``, ``blocks.0.audio_attn``, ...).
        materialized: True if extension parameters were on the meta device and were created and initialised
            on the checkpoint's device and dtype.
    """

    loaded: list[str]
    new: list[str]
    new_modules: list[str]
    materialized: bool = False

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} Wan2.2 tensors; {len(self.new)} new tensors not in the checkpoint, "
            f"in {len(self.new_modules)} modules: {', '.join(self.new_modules)}"
        )


def _module_of(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "blocks":
        return ".".join(parts[:3])
    return parts[0]


def _natural(module: str) -> tuple:
    """Sort key: top-level modules first, then blocks in numeric order."""
    parts = module.split(".")
    return (1, int(parts[1]), parts[2]) if parts[0] == "blocks" else (0, 0, module)


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_wan22_state_dict(model: AvatarDiT, state_dict: Mapping[str, Tensor]) -> Wan22LoadReport:
    """Load an official Wan2.2 DiT state dict into ``model``; raise on any mismatch of the Wan keys.

    Works for models on the meta device (the weights are assigned, not copied; extension parameters that are
    still meta afterwards are materialised and initialised on the checkpoint's device unless the checkpoint
    itself is on the meta device).
    """
    own = model.state_dict()
    new = model.extension_keys()
    expected = [k for k in own if k not in set(new)]
    given = set(state_dict)
    missing = [k for k in expected if k not in given]
    unexpected = sorted(given - set(expected))
    if missing or unexpected:
        raise ValueError(
            "load_wan22_state_dict: the state dict does not match the Wan2.2 layout of this AvatarDiT config "
            f"({model.config.num_layers} layers, dim {model.config.dim}). Missing: [{_listing(missing)}]. "
            f"Unexpected: [{_listing(unexpected)}]. Check the preset and that the keys carry no prefix."
        )
    bad_shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in expected
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise ValueError(f"load_wan22_state_dict: shape mismatches: {_listing(bad_shapes)}")

    on_meta = any(p.is_meta for p in model.parameters())
    result = model.load_state_dict({k: state_dict[k] for k in expected}, strict=False, assign=on_meta)
    if sorted(result.missing_keys) != sorted(new) or result.unexpected_keys:
        raise RuntimeError(f"load_wan22_state_dict: unexpected load result {result}")

    materialized = False
    ref = state_dict[expected[0]]
    if on_meta and not ref.is_meta:
        # create the extension parameters next to the loaded weights, then give them their init
        for module in {_module_of(k) for k in new}:
            sub = model.get_submodule(module) if module != "text_context" else None
            if sub is not None:
                sub.to_empty(device=ref.device).to(ref.dtype)
            else:
                model.text_context = torch.nn.Parameter(torch.empty_like(model.text_context, device=ref.device))
        with torch.no_grad():
            model.reset_extension_parameters()
        materialized = True
    modules = sorted({_module_of(k) for k in new}, key=_natural)
    return Wan22LoadReport(loaded=expected, new=list(new), new_modules=modules, materialized=materialized)
