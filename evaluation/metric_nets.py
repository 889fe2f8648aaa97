"""Loading the synthetic world's metric networks (trained here, exported as self-describing safetensors).

`make eval` on the embedded default has none of the published metric weights, so it trains small networks on the
synthetic world and measures with them (docs/evaluation.md, "Synthetic metric networks"):

| name | file (default path) | network | recipe |
|---|---|---|---|
| `metric_syncnet` | `runs/metric_syncnet/syncnet.safetensors` | `SmallSyncNet` | `recipes/metric_syncnet.yaml` |
| `metric_pose` | `runs/metric_pose/pose.safetensors` | `PoseRegressor` | `recipes/metric_pose.yaml` |
| `metric_identity` | `runs/metric_identity/identity.safetensors` | `IdentityNet` | `recipes/metric_identity.yaml` |

The loaders return a frozen eval-mode network (`load_metric_identity`: an `IdentityEmbedder` over it) and a
`WeightsInfo` (path, sha256), and raise `MetricWeightsMissing`
(a `MetricUnavailable`) naming the file and the command that trains it when the file is absent, unreadable, or holds
another architecture. Numbers are never computed from random weights outside the tests.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dystream.evaluation.networks.identity_small import IdentityEmbedder
from dystream.evaluation.networks.pose_small import PoseRegressor
from dystream.evaluation.networks.syncnet_small import SmallSyncNet
from dystream.evaluation.weights import MetricWeightsMissing, WeightsInfo, require_weights

__all__ = [
    "DEFAULT_IDENTITY",
    "DEFAULT_POSE",
    "DEFAULT_SYNCNET",
    "load_metric_identity",
    "load_metric_pose",
    "load_metric_syncnet",
]

DEFAULT_SYNCNET = "runs/metric_syncnet/syncnet.safetensors"
DEFAULT_POSE = "runs/metric_pose/pose.safetensors"
DEFAULT_IDENTITY = "runs/metric_identity/identity.safetensors"


def _load(
    name: str, arch: str, path: str | os.PathLike | None, device: str | torch.device
) -> tuple[nn.Module, WeightsInfo]:
    from dystream.zoo.files import WeightFileError, load_model

    info = require_weights(name, path)
    try:
        net = load_model(info.path, arch=arch)
    except (WeightFileError, RuntimeError) as e:  # wrong architecture, truncated file, mismatched keys
        raise MetricWeightsMissing(name, f"{info.path!r} cannot be loaded as {arch!r} ({e})") from e
    info = WeightsInfo(info.name, info.path, info.sha256, "trained here (synthetic world); sha256 reported")
    return net.requires_grad_(False).eval().to(device), info


def load_metric_syncnet(
    path: str | os.PathLike | None = DEFAULT_SYNCNET, device: str | torch.device = "cpu"
) -> tuple[SmallSyncNet, WeightsInfo]:
    """The synthetic SyncNet (`SmallSyncNet`), frozen, for `SyncNetScorer(net, info)`."""
    net, info = _load("metric_syncnet", "metric_syncnet", path, device)
    return net, info  # type: ignore[return-value]


def load_metric_pose(
    path: str | os.PathLike | None = DEFAULT_POSE, device: str | torch.device = "cpu"
) -> tuple[PoseRegressor, WeightsInfo]:
    """The synthetic keypoint regressor (`PoseRegressor`), frozen, for `PoseNetBackend(net)`."""
    net, info = _load("metric_pose", "metric_pose", path, device)
    return net, info  # type: ignore[return-value]


def load_metric_identity(
    path: str | os.PathLike | None = DEFAULT_IDENTITY, device: str | torch.device = "cpu"
) -> IdentityEmbedder:
    """The synthetic identity network (`IdentityNet`), frozen, as an `Embedder` (uint8 [N, H, W, 3] -> unit [N, D])
    for `identity_drift` / `identity_similarity`; its `WeightsInfo` is the embedder's `weights_info`."""
    net, info = _load("metric_identity", "metric_identity", path, device)
    embed = IdentityEmbedder(net, device=device)  # type: ignore[arg-type]
    embed.weights_info = info
    return embed
