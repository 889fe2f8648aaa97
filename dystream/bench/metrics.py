"""Metric benchmarks: our float64 Fréchet distance against the scipy `sqrtm` formula (pytorch-fid / StyleGAN-V) on
2048-d features (the FID feature size), for speed and agreement.

Figures: wall time of the two-eigh form (on `device`), of scipy's sqrtm(S1 S2) (always CPU, as every reference
implementation runs it), their ratio and relative difference; for N < D, the Gram form against the two-eigh form.
The features are random with a decaying spectrum plus a low-rank part, like pool3 features: full-rank covariances
for N > D and rank-deficient ones for N = 64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import torch

from dystream.bench.timing import ratio, summarize, time_call
from dystream.evaluation.frechet import frechet_distance, frechet_distance_from_stats

DIM = 2048
QUICK_DIM = 512  # quick mode: sqrtm and eigh cost D^3, so 512-d is 64x cheaper and still shows the ratio


def _features(n: int, seed: int, shift: float = 0.0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim) / 64.0)  # decaying spectrum
    low_rank = rng.normal(size=(n, 32)) @ rng.normal(size=(32, dim)) * 0.1
    return rng.normal(size=(n, dim)) * scales + low_rank + shift


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _scipy_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean[0] if isinstance(covmean, tuple) else covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def run(quick: bool = True, device: str = "cpu") -> dict[str, Any]:
    # quick: 512-d features (a 2048-d sqrtm takes 10 s on an idle desktop CPU and minutes on a loaded one), one
    # sqrtm, three two-eigh runs, and the N = 64 two-eigh value without timing it; full: the FID size, 2048-d
    repeats = 3 if quick else 5
    scipy_repeats = 1 if quick else 3
    dim = QUICK_DIM if quick else DIM
    out: dict[str, Any] = {}

    n_full = 1000 if quick else 5000
    x1, x2 = _features(n_full, 0, dim=dim), _features(n_full, 1, shift=0.05, dim=dim)
    (mu1, s1), (mu2, s2) = _stats(x1), _stats(x2)
    ours = frechet_distance_from_stats(mu1, s1, mu2, s2, device=device)  # also warms up the device
    ref = _scipy_fd(mu1, s1, mu2, s2)
    t_ours = summarize(time_call(lambda: frechet_distance_from_stats(mu1, s1, mu2, s2, device=device),
                                 repeats=repeats, warmup=0, device=device), "s")  # fmt: skip
    t_scipy = summarize(time_call(lambda: _scipy_fd(mu1, s1, mu2, s2), repeats=scipy_repeats, warmup=0), "s")
    out[f"FD two-eigh, N={n_full}, D={dim} ({device})"] = t_ours
    out[f"FD scipy sqrtm, N={n_full}, D={dim} (cpu)"] = t_scipy
    out["speed-up two-eigh vs sqrtm (median)"] = ratio(t_scipy, t_ours)
    out["FD value (two-eigh)"] = ours
    out["relative difference two-eigh vs sqrtm"] = abs(ours - ref) / abs(ref)

    # N < D: covariances of rank N - 1, where the Gram form is exact and cheap
    y1, y2 = _features(64, 2, dim=dim), _features(64, 3, shift=0.05, dim=dim)
    gram = frechet_distance(y1, y2, method="gram", device=device)
    eigh = frechet_distance(y1, y2, method="eigh", device=device)
    t_gram = summarize(time_call(lambda: frechet_distance(y1, y2, method="gram", device=device),
                                 repeats=repeats, warmup=1, device=device), "s")  # fmt: skip
    out[f"FD Gram form, N=64, D={dim} ({device})"] = t_gram
    out["relative difference Gram vs two-eigh at N=64"] = abs(gram - eigh) / abs(eigh)
    if not quick:
        t_eigh = summarize(time_call(lambda: frechet_distance(y1, y2, method="eigh", device=device),
                                     repeats=repeats, warmup=0, device=device), "s")  # fmt: skip
        out[f"FD two-eigh, N=64, D={dim} ({device})"] = t_eigh
        out["speed-up Gram vs two-eigh at N=64 (median)"] = ratio(t_eigh, t_gram)
        (m1, c1), (m2, c2) = _stats(y1), _stats(y2)
        out["relative difference Gram vs sqrtm at N=64"] = abs(gram - _scipy_fd(m1, c1, m2, c2)) / abs(gram)
    out["torch threads"] = torch.get_num_threads()
    return out
