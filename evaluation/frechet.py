"""Fréchet distance between two feature distributions (FID, FVD), in float64.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

Only the last trace is hard. Two exact forms are implemented (notes/metrics.md §1.2):

- "eigh" (TF-GAN's `trace_sqrt_product`): A = S1^{1/2} by a symmetric eigendecomposition, then
  tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(A S2 A)), because S1 S2 is similar to the PSD matrix A S2 A. Both steps are
  symmetric, so tiny negative eigenvalues from rounding are clamped to 0 instead of producing complex numbers (scipy's
  `sqrtm(S1 @ S2)` returns a complex matrix and is several times slower).
- "gram" (exact when samples < feature dims, where both covariances are rank deficient): with centred feature matrices
  X1 [n1, d], X2 [n2, d], S_i = X_i^T X_i / (n_i - ddof), the non-zero eigenvalues of S1 S2 are the squared singular
  values of X1 X2^T / sqrt((n1 - ddof)(n2 - ddof)), so tr((S1 S2)^{1/2}) is the nuclear norm of that n1 x n2 matrix.
  Costs O(n1 n2 d) instead of O(d^3); needs the raw features.

`frechet_distance` picks the form ("auto": gram when raw features are at hand and min(n1, n2) < d) and lets the
caller force one. `FeatureStats` accumulates float64 statistics batch by batch (Chan's parallel update, so a large
feature mean does not cancel the covariance) and saves/loads them as npz (mu, sigma, n) for a cached reference set.

Covariance normalisation: ddof=1 (np.cov, pytorch-fid, torchmetrics). StyleGAN-V's FVD uses 1/n (ddof=0); the
difference is O(1/n) and is selectable. Only compare numbers computed with the same N, extractor and preprocessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "trace_sqrt_product_eigh",
    "trace_sqrt_product_gram",
]

Method = Literal["auto", "eigh", "gram"]


def _as_f64(x: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)


class FeatureStats:
    """Running float64 mean and covariance of feature vectors [N, D], mergeable and cacheable.

    Keeps `n`, the mean and M2 = sum of centred outer products, updated per batch with Chan et al.'s parallel formula.
    With `keep_features=True` it also keeps the raw features, which the exact "gram" form needs when N < D.
    `meta` (str -> str) travels with the npz cache: store the extractor, its weights' sha256 and the protocol there so
    that statistics of different extractors are never compared by accident.
    """

    def __init__(self, dim: int | None = None, keep_features: bool = False, meta: Mapping[str, str] | None = None):
        self.dim = dim
        self.keep_features = keep_features
        self.meta: dict[str, str] = dict(meta or {})
        self.n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None
        self._features: list[np.ndarray] = []

    def update(self, feats: np.ndarray | torch.Tensor) -> FeatureStats:
        """Add a batch of features [N, D]."""
        if isinstance(feats, torch.Tensor):
            feats = feats.detach().cpu().numpy()
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.update: features must be [N, D], got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: feature dim {x.shape[1]} != {self.dim} of earlier batches")
        nb = x.shape[0]
        if nb == 0:
            return self
        if not np.all(np.isfinite(x)):
            raise ValueError("FeatureStats.update: features contain NaN or inf")
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        if self._mean is None:
            self._mean, self._m2 = mean_b, m2_b
        else:
            n = self.n + nb
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (nb / n)
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n += nb
        if self.keep_features:
            self._features.append(x)
        return self

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise ValueError("FeatureStats: no features were added")
        return self._mean

    def cov(self, ddof: int = 1) -> np.ndarray:
        """Covariance [D, D] with normaliser n - ddof."""
        if self._m2 is None:
            raise ValueError("FeatureStats: no features were added")
        if self.n - ddof <= 0:
            raise ValueError(f"FeatureStats: {self.n} samples are too few for a covariance with ddof={ddof}")
        return self._m2 / (self.n - ddof)

    @property
    def features(self) -> np.ndarray | None:
        """The raw features [N, D] when kept, else None."""
        if not self.keep_features or not self._features:
            return None
        if len(self._features) > 1:
            self._features = [np.concatenate(self._features, axis=0)]
        return self._features[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write mu, sigma (ddof=1), n and meta to an npz file (no pickles)."""
        np.savez(
            path,
            mu=self.mean,
            sigma=self.cov(ddof=1),
            n=np.int64(self.n),
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by `save`; they can be updated further or passed to `frechet_distance`."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "n"} - set(data.files)
            if missing:
                raise ValueError(f"{os.fspath(path)!r} is not a FeatureStats npz: missing {sorted(missing)}")
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
            n = int(data["n"])
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or n < 2:
            raise ValueError(f"{os.fspath(path)!r}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}, n={n}")
        stats = cls(dim=mu.shape[0], meta=meta)
        stats.n, stats._mean, stats._m2 = n, mu, sigma * (n - 1)
        return stats


Distribution = np.ndarray | torch.Tensor | FeatureStats | tuple


def trace_sqrt_product_eigh(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 (float64) by the symmetric two-eigh form."""
    w, v = torch.linalg.eigh(sigma1)
    sqrt1 = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^{1/2}, rounding negatives of a PSD matrix clamped
    m = sqrt1 @ sigma2 @ sqrt1
    m = 0.5 * (m + m.T)  # exactly symmetric for eigvalsh
    lam = torch.linalg.eigvalsh(m)
    return lam.clamp(min=0).sqrt().sum()


def trace_sqrt_product_gram(x1c: torch.Tensor, x2c: torch.Tensor, ddof: int = 1) -> torch.Tensor:
    """tr((S1 S2)^{1/2}) from centred features x1c [n1, d], x2c [n2, d] (float64): nuclear norm of the cross-Gram."""
    n1, n2 = x1c.shape[0], x2c.shape[0]
    s = torch.linalg.svdvals(x1c @ x2c.T)  # [min(n1, n2)]
    return s.sum() / np.sqrt((n1 - ddof) * (n2 - ddof))


def frechet_distance_from_stats(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    device: str | torch.device = "cpu",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), two-eigh form, float64."""
    m1, m2 = _as_f64(mu1, device), _as_f64(mu2, device)
    s1, s2 = _as_f64(sigma1, device), _as_f64(sigma2, device)
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"frechet_distance: means must be [D] of equal size, got {tuple(m1.shape)}, {tuple(m2.shape)}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: covariances must be [{d}, {d}], got {tuple(s1.shape)}, {tuple(s2.shape)}")
    if not all(torch.isfinite(t).all() for t in (m1, m2, s1, s2)):
        raise ValueError("frechet_distance: statistics contain NaN or inf")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    diff = m1 - m2
    fd = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * trace_sqrt_product_eigh(s1, s2)
    return float(fd)


def _unpack(x: Distribution, ddof: int, device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """-> (raw features or None, mu, sigma or None: computed lazily from raw features)."""
    if isinstance(x, FeatureStats):
        feats = x.features
        if feats is not None:
            return _as_f64(feats, device), _as_f64(x.mean, device), None
        return None, _as_f64(x.mean, device), _as_f64(x.cov(ddof), device)
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError("frechet_distance: a statistics tuple must be (mu, sigma)")
        return None, _as_f64(x[0], device), _as_f64(x[1], device)
    feats = _as_f64(x, device)
    if feats.ndim != 2:
        raise ValueError(f"frechet_distance: features must be [N, D], got shape {tuple(feats.shape)}")
    if feats.shape[0] - ddof <= 0:
        raise ValueError(f"frechet_distance: {feats.shape[0]} samples are too few (ddof={ddof})")
    return feats, feats.mean(dim=0), None


def frechet_distance(
    a: Distribution,
    b: Distribution,
    method: Method = "auto",
    ddof: int = 1,
    device: str | torch.device = "cpu",
) -> float:
    """Fréchet distance between two feature sets, each given as raw features [N, D], `FeatureStats` or (mu, sigma).

    method: "eigh" (two symmetric eigendecompositions, works from statistics), "gram" (nuclear norm of the centred
    cross-Gram matrix, needs raw features on both sides, exact and fast when N < D), or "auto" (gram when raw features
    are available on both sides and min(n1, n2) < D, else eigh). ddof: covariance normaliser n - ddof (1 = np.cov).
    """
    if method not in ("auto", "eigh", "gram"):
        raise ValueError(f"frechet_distance: method must be 'auto', 'eigh' or 'gram', got {method!r}")
    f1, mu1, s1 = _unpack(a, ddof, device)
    f2, mu2, s2 = _unpack(b, ddof, device)
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: feature dims differ: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    d = mu1.shape[0]
    have_raw = f1 is not None and f2 is not None
    if method == "gram" and not have_raw:
        raise ValueError("frechet_distance: method='gram' needs raw features on both sides, not only (mu, sigma)")
    use_gram = method == "gram" or (method == "auto" and have_raw and min(f1.shape[0], f2.shape[0]) < d)
    if use_gram:
        x1c, x2c = f1 - mu1, f2 - mu2
        n1, n2 = x1c.shape[0], x2c.shape[0]
        diff = mu1 - mu2
        tr1 = (x1c * x1c).sum() / (n1 - ddof)
        tr2 = (x2c * x2c).sum() / (n2 - ddof)
        fd = diff @ diff + tr1 + tr2 - 2.0 * trace_sqrt_product_gram(x1c, x2c, ddof)
        return float(fd)
    if s1 is None:
        x1c = f1 - mu1
        s1 = x1c.T @ x1c / (x1c.shape[0] - ddof)
    if s2 is None:
        x2c = f2 - mu2
        s2 = x2c.T @ x2c / (x2c.shape[0] - ddof)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, device=device)
