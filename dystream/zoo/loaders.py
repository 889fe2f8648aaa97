"""Loaders: verified entry files -> a working model. One function per file format, named in the entry table.

Each loader takes ``(entry, paths, overrides, cache)``: the entry, its files in the order of ``entry.files`` (already
hashed and matched by :func:`dystream.zoo.cache.check_entry`), the keyword overrides of ``load_pretrained`` and the
cache root (for loaders that need a second entry).
Everything is loaded strictly; foreign checkpoints go through their named adapters. Heavy imports happen inside the
loaders, so importing the zoo builds nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dystream.zoo.entries import PretrainedEntry

__all__ = ["LOADERS", "load_wan22_shards", "read_text_context"]

Loader = Callable[[PretrainedEntry, Sequence[Path], dict[str, Any], Path], Any]


def load_dystream_file(
    entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path
) -> torch.nn.Module:
    """A self-describing dystream file (:mod:`dystream.zoo.files`), strictly.

    ``map_location`` picks the device; other overrides replace config fields that do not change the weights
    (``attention_backend``, ``window_frames`` ...): the model is rebuilt with them and the same state dict is
    loaded strictly again, so an override that changes a shape fails loudly.
    """
    from dystream.zoo.files import load_model

    map_location = overrides.pop("map_location", "cpu")
    model = load_model(paths[0], arch=entry.family, map_location=map_location)
    if overrides:
        config = dataclasses.replace(model.config, **overrides)
        rebuilt = type(model)(config).to(map_location)
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        rebuilt.file_extra = model.file_extra
        model = rebuilt
    return model


def load_wan22_shards(paths: Sequence[Path], preset: str = "wan2.2-ti2v-5b", **overrides: Any) -> torch.nn.Module:
    """Build the ``preset`` AvatarDiT on the meta device and load the official Wan2.2 DiT shards into it.

    The shards are merged into one state dict (a key in two shards is an error) and handed to the strict adapter
    :func:`dystream.models.adapters.load_wan22_state_dict`; the audio modules the checkpoint lacks are materialised
    with their initialisation (zero output projections) and listed in ``model.load_report``. Building on the meta
    device means the 5B model is allocated once, by the checkpoint tensors themselves.
    """
    from safetensors.torch import load_file

    from dystream.models.adapters import load_wan22_state_dict
    from dystream.models.dit import AvatarDiT, DiTConfig

    config = DiTConfig.from_preset(preset, **overrides)
    with torch.device("meta"):
        model = AvatarDiT(config)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        for key, value in load_file(str(path), device="cpu").items():
            if key in state:
                raise ValueError(f"Wan2.2 shards: key {key!r} is in both {origin[key]} and {path}")
            state[key] = value
            origin[key] = path
    model.load_report = load_wan22_state_dict(model, state)
    return model


def _load_wan22(
    entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path
) -> torch.nn.Module:
    return load_wan22_shards(paths, preset=entry.preset or "wan2.2-ti2v-5b", **overrides)


def _load_wav2vec2(
    entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path
) -> torch.nn.Module:
    from dystream.models.audio import AudioEncoder, AudioEncoderConfig, load_wav2vec2_weights

    encoder = AudioEncoder(AudioEncoderConfig.from_name(entry.preset or "wav2vec2-base-960h", **overrides))
    encoder.load_report = load_wav2vec2_weights(encoder, paths[0])
    return encoder


def _attach(module: Any, info: Any) -> Any:
    try:
        module.weights_info = info  # what metric results print (file, sha256, verification)
    except (AttributeError, RuntimeError):  # TorchScript modules reject new attributes
        pass
    return module


def _load_fid_inception(entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path) -> Any:
    from dystream.evaluation.fid import load_fid_inception

    net, info = load_fid_inception(paths[0], **overrides)
    return _attach(net, info)


def _load_i3d(entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path) -> Any:
    from dystream.evaluation.networks.i3d import load_i3d_torchscript

    # the hash the zoo just checked (published, or the user's pin); the loader re-checks it before torch.jit.load
    from dystream.zoo.cache import sha256_file

    sha = entry.files[0].sha256 or sha256_file(paths[0])
    module, info = load_i3d_torchscript(paths[0], sha256=sha, **overrides)
    return _attach(module, info)


def _load_syncnet(entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path) -> Any:
    from dystream.evaluation.networks.syncnet import load_syncnet

    net, info = load_syncnet(paths[0], **overrides)
    return _attach(net, info)


def _load_dwpose(entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path) -> Any:
    """The DWPose backend needs both ONNX files; whichever entry is loaded, the other one is resolved too."""
    from dystream.evaluation.networks.dwpose import DWPoseBackend
    from dystream.zoo.registry import resolve

    det = paths[0] if entry.preset == "yolox_l" else resolve("dwpose_det", cache_dir=cache)
    pose = paths[0] if entry.preset == "dw-ll_ucoco_384" else resolve("dwpose_pose", cache_dir=cache)
    return DWPoseBackend(det, pose, **overrides)


def _load_light_asd(entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path) -> Any:
    from dystream.evaluation.networks.light_asd import load_light_asd

    net, info = load_light_asd(paths[0], name=entry.aliases[0], **overrides)
    return _attach(net, info)


def _load_s3fd(entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path) -> Any:
    from dystream.evaluation.networks.s3fd import load_s3fd

    net, info = load_s3fd(paths[0], **overrides)
    return _attach(net, info)


def _load_arcface(entry: PretrainedEntry, paths: Sequence[Path], overrides: dict[str, Any], cache: Path) -> Any:
    from dystream.evaluation.networks.iresnet import load_arcface_iresnet50

    return load_arcface_iresnet50(paths[0], **overrides)


def read_text_context(path: str | Path) -> torch.Tensor:
    """A fixed-prompt context ``[L, text_dim]``: safetensors with key ``context``, or a tensor saved by torch."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "context" not in tensors:
            raise ValueError(f"{path}: a text-context file holds one tensor named 'context', found {sorted(tensors)}")
        context = tensors["context"]
    else:
        context = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    if not isinstance(context, torch.Tensor) or context.dim() != 2:
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{path}: a text context must be a [L, text_dim] tensor, got {got}")
    return context


def _load_text_context(
    entry: PretrainedEntry, paths: Sequence[Path], overrides: Mapping[str, Any], cache: Path
) -> torch.Tensor:
    if overrides:
        raise TypeError(f"zoo entry {entry.name!r} takes no overrides, got {sorted(overrides)}")
    return read_text_context(paths[0])


LOADERS: dict[str, Loader] = {
    "dystream": load_dystream_file,
    "wan22": _load_wan22,
    "wav2vec2": _load_wav2vec2,
    "fid-inception": _load_fid_inception,
    "i3d": _load_i3d,
    "syncnet": _load_syncnet,
    "dwpose": _load_dwpose,
    "light-asd": _load_light_asd,
    "s3fd": _load_s3fd,
    "arcface-iresnet": _load_arcface,
    "text-context": _load_text_context,
}
