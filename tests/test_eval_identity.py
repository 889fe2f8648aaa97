"""Identity drift: distances to the reference, per-bucket summaries and the drift slope."""

from __future__ import annotations

import numpy as np
import pytest

from dystream.evaluation.identity import frame_distances, identity_drift, pixel_embedding, summarise_drift


def _reference() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(40, 200, (32, 24, 3), dtype=np.uint8)


def test_frozen_stream_has_no_drift():
    ref = _reference()
    frames = np.repeat(ref[None], 50, axis=0)
    s = identity_drift(frames, ref, fps=25, bucket_s=1.0)
    assert s.distance == "pixel_rms_64"
    assert np.all(s.mean == 0) and s.slope_per_min == 0 and s.count.tolist() == [25, 25]


def test_pixel_distance_and_growing_drift():
    ref = _reference()
    t = 100
    frames = np.stack([np.clip(ref.astype(int) + i // 4, 0, 255).astype(np.uint8) for i in range(t)])
    d = frame_distances(frames, ref, batch_size=7)
    direct = np.sqrt(((pixel_embedding(frames) - pixel_embedding(ref[None])) ** 2).mean(axis=1))
    np.testing.assert_allclose(d, direct)
    s = summarise_drift(d, fps=25, bucket_s=1.0, distance="pixel_rms_64")
    assert s.bucket_start_s.tolist() == [0.0, 1.0, 2.0, 3.0] and s.count.sum() == t
    assert np.all(np.diff(s.mean) > 0) and s.slope_per_min > 0
    assert s.last_bucket_mean > s.first_bucket_mean and np.all(s.min <= s.mean) and np.all(s.mean <= s.max)


def test_embedding_distance_is_cosine():
    ref = _reference()
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (9, 32, 24, 3), dtype=np.uint8)

    def embed(x: np.ndarray) -> np.ndarray:  # mean colour as a 3-d "identity" feature
        return x.reshape(len(x), -1, 3).mean(axis=1)

    d = frame_distances(frames, ref, embed=embed, batch_size=4)
    e, r = embed(frames), embed(ref[None])[0]
    np.testing.assert_allclose(d, 1 - e @ r / np.linalg.norm(e, axis=1) / np.linalg.norm(r))
    assert identity_drift(frames, ref, embed=embed).distance == "cosine"


def test_slope_and_buckets_of_a_linear_curve():
    t = np.arange(250) / 25.0
    s = summarise_drift(0.01 * t, fps=25.0, bucket_s=4.0)
    assert s.slope_per_min == pytest.approx(0.6)
    assert s.mean.tolist() == pytest.approx([0.01 * t[t < 4].mean(), 0.01 * t[(t >= 4) & (t < 8)].mean(),
                                             0.01 * t[t >= 8].mean()])  # fmt: skip
    assert s.as_dict()["count"] == [100, 100, 50]


def test_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        frame_distances(np.zeros((3, 8, 8, 3)), _reference())
    with pytest.raises(ValueError, match="non-empty"):
        summarise_drift(np.zeros(0))
