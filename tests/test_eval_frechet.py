"""Fréchet distance: closed forms, scipy parity, agreement of the two exact forms, cached statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dystream.evaluation import frechet
from dystream.evaluation.frechet import FeatureStats, frechet_distance, frechet_distance_from_stats


def _scipy_fd(x1: np.ndarray, x2: np.ndarray) -> float:
    """pytorch-fid's formula: sqrtm of the product, real part."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean[0] if isinstance(covmean, tuple) else covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)
    # also through the public entry point with (mu, sigma) tuples and torch tensors
    got2 = frechet_distance((torch.tensor(mu1), torch.tensor(np.diag(v1))), (mu2, np.diag(v2)))
    assert got2 == pytest.approx(expected, rel=1e-10)


def test_matches_scipy_sqrtm_full_rank():
    rng = np.random.default_rng(1)
    d = 64
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    x1 = rng.normal(size=(400, d)) @ a
    x2 = rng.normal(size=(300, d)) @ (a + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.5
    expected = _scipy_fd(x1, x2)
    assert frechet_distance(x1, x2, method="eigh") == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(x1, x2) == pytest.approx(expected, rel=1e-6)  # auto: n > d -> eigh
    # the gram form is exact in any regime
    assert frechet_distance(x1, x2, method="gram") == pytest.approx(expected, rel=1e-6)


def test_gram_and_eigh_agree_when_samples_below_dims(monkeypatch):
    rng = np.random.default_rng(2)
    d = 256
    x1 = rng.normal(size=(40, d))
    x2 = rng.normal(size=(60, d)) * 1.3 + 0.2
    eigh = frechet_distance(x1, x2, method="eigh")
    gram = frechet_distance(x1, x2, method="gram")
    assert gram == pytest.approx(eigh, rel=1e-6)

    calls = []
    real = frechet.trace_sqrt_product_gram
    monkeypatch.setattr(frechet, "trace_sqrt_product_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert frechet_distance(x1, x2) == pytest.approx(gram, rel=1e-12)  # auto picked the gram form
    assert calls == [1]


def test_identical_and_symmetric():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 16))
    y = rng.normal(size=(150, 16)) + 1.0
    assert abs(frechet_distance(x, x)) < 1e-9
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y) > 0


def test_feature_stats_batches_cache_and_large_offset(tmp_path):
    rng = np.random.default_rng(4)
    # a large common offset would cancel catastrophically in sum(x x^T) - n mu mu^T; Chan's update keeps it exact
    x = rng.normal(size=(500, 8)) + 1e6
    stats = FeatureStats(meta={"extractor": "test"})
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    assert stats.n == 500
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-6, atol=1e-9)

    path = tmp_path / "ref_stats.npz"
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.n == 500 and loaded.meta == {"extractor": "test"}
    np.testing.assert_array_equal(loaded.cov(), stats.cov())
    y = rng.normal(size=(300, 8)) + 1e6 + 0.1
    assert frechet_distance(loaded, y) == pytest.approx(frechet_distance(x, y), rel=1e-6)
    # loaded statistics keep accumulating like the original ones
    loaded.update(y)
    np.testing.assert_allclose(loaded.cov(), np.cov(np.concatenate([x, y]), rowvar=False), rtol=1e-6)


def test_feature_stats_keep_features_enables_gram():
    rng = np.random.default_rng(5)
    a = FeatureStats(keep_features=True).update(rng.normal(size=(10, 32))).update(rng.normal(size=(10, 32)))
    b = FeatureStats(keep_features=True).update(rng.normal(size=(15, 32)) + 0.3)
    assert a.features.shape == (20, 32)
    assert frechet_distance(a, b, method="gram") == pytest.approx(frechet_distance(a, b, method="eigh"), rel=1e-6)
    with pytest.raises(ValueError, match="gram"):
        frechet_distance(FeatureStats().update(rng.normal(size=(20, 32))), b, method="gram")


def test_bad_input_errors():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="dims differ"):
        frechet_distance(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(rng.normal(size=(10, 4)), rng.normal(size=(10, 4)), method="sqrtm")
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats().update(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="too few"):
        frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))
