"""Mouth-voice correlation: the inner-lip gap against the voice's loudness (`evaluation/mouth_voice.py`)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr

from dystream.datamodules import synthetic as syn
from dystream.datamodules.format import SAMPLES_PER_FRAME, frame_rms
from dystream.evaluation.keypoints import COCO_WHOLEBODY_133, DWPOSE_134
from dystream.evaluation.mouth_voice import (
    lagged_mouth_voice_r,
    mouth_opening,
    mouth_voice_correlation,
    mouth_voice_split,
    pearson_r,
)


@pytest.fixture(scope="module")
def clips() -> list:
    return [syn.make_clip(seed=5, split="val", index=i, size=64, seconds=6.0) for i in range(3)]


def test_exact_keypoints_follow_their_own_voice_and_no_other(clips):
    """The synthetic world draws the mouth from the own voice's envelope: r ~ 1 with it, ~ 0 with another voice."""
    for i, c in enumerate(clips):
        opening = mouth_opening(c.kpts, DWPOSE_134)
        assert np.isfinite(opening).all()
        assert mouth_voice_correlation(opening, c.audio_self) > 0.95
        assert mouth_voice_correlation(opening, c.audio_self, c.mask) > 0.9  # syllable by syllable, not the mask
        other = clips[(i + 1) % len(clips)].audio_self
        assert abs(mouth_voice_correlation(opening, other)) < 0.4
        # the partner's voice is anti-correlated at most: the own mouth is closed while the partner speaks
        assert mouth_voice_correlation(opening, c.audio_other) < 0.2


def test_opening_is_the_inner_lip_gap_over_the_face_scale_and_ignores_pose(clips):
    k = clips[0].kpts.astype(np.float64)
    opening = mouth_opening(k, DWPOSE_134)
    face = k[:, 24:92, :2]
    scale = np.sqrt(((face - face.mean(1, keepdims=True)) ** 2).sum(-1).mean(1))
    direct = np.mean([np.linalg.norm(face[:, a] - face[:, b], axis=-1) for a, b in ((61, 67), (62, 66), (63, 65))], 0)
    np.testing.assert_allclose(opening, direct / scale, rtol=1e-12)
    # rotate, zoom and move the whole frame's keypoints: the same opening
    theta, zoom, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = k.copy()
    moved[..., :2] = zoom * k[..., :2] @ rot.T + shift
    np.testing.assert_allclose(mouth_opening(moved, DWPOSE_134), opening, rtol=1e-9)
    # the same face in DWPose's raw COCO-WholeBody order (no neck: the face starts one index earlier)
    coco = np.delete(k, 17, axis=1)
    np.testing.assert_allclose(mouth_opening(coco, COCO_WHOLEBODY_133), opening, rtol=1e-12)


def test_unconfident_lips_and_constant_series_give_nan(clips):
    k = clips[0].kpts.copy()
    k[:10, 24 + 62, 2] = 0.0  # an inner-lip point lost on the first 10 frames
    opening = mouth_opening(k, DWPOSE_134)
    assert np.isnan(opening[:10]).all() and np.isfinite(opening[10:]).all()
    assert np.isfinite(mouth_voice_correlation(opening, clips[0].audio_self))  # NaN frames are skipped
    assert np.isnan(mouth_voice_correlation(np.full(len(opening), 0.1), clips[0].audio_self))  # a frozen mouth
    silent = np.zeros(len(opening) * SAMPLES_PER_FRAME, dtype=np.float32)
    assert np.isnan(mouth_voice_correlation(opening, silent))
    assert np.isnan(pearson_r(np.arange(5.0), np.arange(5.0), min_frames=10))  # too few frames
    with pytest.raises(ValueError, match="need 3200"):
        mouth_voice_correlation(np.zeros(5), np.zeros(100))
    with pytest.raises(ValueError, match=r"keypoints must be \[T, 134, 3\]"):
        mouth_opening(k[:, :133], DWPOSE_134)


def test_pearson_r_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.4 * x + rng.normal(size=200)
    assert pearson_r(x, y) == pytest.approx(pearsonr(x, y).statistic, abs=1e-12)
    x[[3, 50]] = np.nan
    keep = np.isfinite(x)
    assert pearson_r(x, y) == pytest.approx(pearsonr(x[keep], y[keep]).statistic, abs=1e-12)


def test_lagged_r_peaks_where_the_mouth_was_shifted(clips):
    """Lag 0 is `mouth_voice_correlation`; a mouth drawn two frames late peaks at lag 2, and r at lag k equals
    scipy's r of the explicitly shifted series over the speaking frames."""
    c = clips[0]
    opening = mouth_opening(c.kpts, DWPOSE_134)
    lags = lagged_mouth_voice_r(opening, c.audio_self, c.mask, lags=range(-3, 4))
    assert lags[0] == pytest.approx(mouth_voice_correlation(opening, c.audio_self, c.mask))
    assert max(lags, key=lags.get) == 0 and lags[1] < lags[0] - 0.2  # frame-exact: r falls one frame off
    late = np.concatenate([np.full(2, opening[0]), opening[:-2]])  # the same mouth, two frames late
    shifted = lagged_mouth_voice_r(late, c.audio_self, c.mask, lags=range(-3, 4))
    assert max(shifted, key=shifted.get) == 2
    loud = np.sqrt(
        (c.audio_self[: len(opening) * SAMPLES_PER_FRAME].astype(np.float64).reshape(len(opening), -1) ** 2).mean(1)
    )
    speak = np.flatnonzero(c.mask > 0.5)
    speak = speak[speak + 1 < len(opening)]
    assert shifted[1] == pytest.approx(pearsonr(late[speak + 1], loud[speak]).statistic, abs=1e-9)
    with pytest.raises(ValueError, match="mask has shape"):
        lagged_mouth_voice_r(opening, c.audio_self, c.mask[:-1])


def test_split_recovers_the_response_and_the_unrelated_motion_of_a_known_mouth(clips):
    """A mouth drawn as a x loudness + noise of std s uncorrelated with the loudness over the speaking frames: the
    split gives back a x std(loudness) and s, and r = response / sqrt(response^2 + unrelated^2)."""
    rng = np.random.default_rng(0)
    c = clips[0]
    t = len(c.mask)
    loud = frame_rms(c.audio_self, t)
    keep = (c.mask > 0.5) & (np.arange(t) != 3)  # frame 3's opening is unusable (NaN): left out of both
    basis = np.stack([np.ones(keep.sum()), loud[keep]], 1)
    for a, s in ((2.0, 0.0), (2.0, 0.02), (0.5, 0.05), (-1.0, 0.01)):
        noise = rng.standard_normal(keep.sum())
        noise -= basis @ np.linalg.lstsq(basis, noise, rcond=None)[0]  # no part of it follows the loudness
        opening = a * loud
        opening[keep] += s * noise / noise.std()
        opening[3] = np.nan
        response, unrelated = mouth_voice_split(opening, c.audio_self, c.mask)
        r = mouth_voice_correlation(opening, c.audio_self, c.mask)
        assert response / np.hypot(response, unrelated) == pytest.approx(r, abs=1e-12)
        assert response == pytest.approx(a * loud[keep].std(), rel=1e-9)
        assert unrelated == pytest.approx(s, rel=1e-6, abs=1e-9)
    assert all(np.isnan(mouth_voice_split(np.full(t, 0.3), c.audio_self, c.mask)))  # a frozen mouth: r is NaN
