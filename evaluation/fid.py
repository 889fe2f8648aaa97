"""FID: Fréchet distance between InceptionV3 pool3 features of real and generated frames.

Protocol (notes/metrics.md §1.1): frames as uint8 RGB, the TF graph's own bilinear resize to 299 and (x - 128) / 128
(`FIDInceptionV3.preprocess`), 2048-d pool3 features, float64 statistics, Fréchet distance in the two-eigh form
(`dystream.evaluation.frechet`). The network is `pt_inception-2015-12-05-6726825d.pth`, loaded strictly from a path
the user gives with `torch.load(weights_only=True)`; every result says which file (and sha256) produced it. Reference
statistics are computed once and cached with `FeatureStats.save`; compare only numbers with the same N and resize.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from dystream.evaluation.frechet import FeatureStats, frechet_distance
from dystream.evaluation.networks.inception import PRESETS, FIDInceptionConfig, FIDInceptionV3
from dystream.evaluation.weights import WeightsInfo, load_state_dict_checked, require_weights

__all__ = ["FIDExtractor", "fid", "load_fid_inception", "to_uint8"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float video/images in [-1, 1] -> uint8 [0, 255], rounding as StyleGAN-V does (x * 127.5 + 128, truncated)."""
    if x.dtype == torch.uint8:
        return x
    return (x.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def load_fid_inception(
    path: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    config: FIDInceptionConfig | None = None,
) -> tuple[FIDInceptionV3, WeightsInfo]:
    """Load the FID InceptionV3 from `path` (strict, weights_only) -> (frozen eval-mode network, WeightsInfo).

    Raises `MetricWeightsMissing` if `path` is None, absent, not a state dict, or its keys do not match.
    """
    info = require_weights("fid_inception", path)
    net = FIDInceptionV3(config or PRESETS["pt_inception-2015-12-05"])
    load_state_dict_checked(net, info)
    net.requires_grad_(False).eval().to(device)
    return net, info


class FIDExtractor:
    """Frames -> pool3 features, batched, under no_grad. `net` is any module mapping uint8 [B, 3, H, W] -> [B, D]."""

    def __init__(self, net: torch.nn.Module, info: WeightsInfo | None = None, batch_size: int = 64):
        self.net = net
        self.info = info
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """images: uint8 [N, 3, H, W] (or [N, H, W, 3] numpy) -> float64 features [N, D]."""
        x = torch.as_tensor(images)
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = to_uint8(x)
        bs = self.batch_size
        out = [self.net(x[i : i + bs].to(self.device)).double().cpu() for i in range(0, len(x), bs)]
        return torch.cat(out).numpy() if out else np.zeros((0, 0))

    def stats(self, batches: Iterable[torch.Tensor | np.ndarray], keep_features: bool = False) -> FeatureStats:
        """Accumulate statistics over an iterable of image batches; meta records the weights and the resize."""
        meta = {"extractor": "fid_inception_pool3", "resize": "tf1-bilinear-299"}
        if self.info is not None:
            meta.update(weights=self.info.path, sha256=self.info.sha256)
        stats = FeatureStats(keep_features=keep_features, meta=meta)
        for batch in batches:
            stats.update(self(batch))
        return stats


def fid(real: FeatureStats | np.ndarray, fake: FeatureStats | np.ndarray, method: str = "auto", ddof: int = 1) -> float:
    """FID between two feature sets (statistics or raw features); see `frechet_distance` for `method`.

    Refuses statistics that record different extractors, resizes or weight hashes.
    """
    if isinstance(real, FeatureStats) and isinstance(fake, FeatureStats):
        keys = ("extractor", "resize", "sha256")
        diff = {k: (real.meta.get(k), fake.meta.get(k)) for k in keys if real.meta.get(k) != fake.meta.get(k)}
        if diff:
            raise ValueError(f"fid: real and generated statistics differ in protocol: {diff}")
    return frechet_distance(real, fake, method=method, ddof=ddof)
