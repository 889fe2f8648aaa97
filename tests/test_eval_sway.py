"""The pixel sway diagnostic (evaluation/sway.py): follows sub-pixel shifts, counts only the listening frames."""

import numpy as np
import pytest

from dystream.evaluation.sway import colour_centroids, listening_sway

BACKGROUND = np.array([120.0, 140.0, 200.0])
SHIRT = np.array([220.0, 40.0, 160.0])
SKIN = np.array([110.0, 70.0, 50.0])


def _render(shirt_dx: np.ndarray, face_dy: np.ndarray, size: int = 64) -> np.ndarray:
    """Frames of an anti-aliased shirt (a box at the bottom, shifted by shirt_dx px) and face (a box, shifted by
    face_dy px): each pixel mixes the colours by its exact coverage."""

    def coverage(lo: float, hi: float) -> np.ndarray:  # fraction of each pixel [i, i + 1) inside [lo, hi)
        edges = np.arange(size, dtype=np.float64)
        return np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0, 1)

    frames = []
    for dx, dy in zip(shirt_dx, face_dy, strict=True):
        shirt = coverage(44, 64)[:, None] * coverage(14 + dx, 50 + dx)[None, :]
        face = coverage(12 + dy, 30 + dy)[:, None] * coverage(24, 40)[None, :]
        img = BACKGROUND + shirt[..., None] * (SHIRT - BACKGROUND)
        img = img + face[..., None] * (SKIN - img)
        frames.append(img)
    return np.stack(frames).round().clip(0, 255).astype(np.uint8)


def test_colour_centroid_follows_a_sub_pixel_shift():
    shifts = np.linspace(-0.6, 0.6, 7)
    video = _render(shifts, np.zeros(7))
    tol = float(np.linalg.norm(SHIRT - BACKGROUND))  # weight = coverage at this tolerance
    x = colour_centroids(video, SHIRT, tol)[:, 0]
    np.testing.assert_allclose(x - x[3], shifts, atol=0.03)


def test_listening_sway_reads_the_listening_frames_only():
    rng = np.random.default_rng(0)
    t = 80
    mask = np.r_[np.ones(40), np.zeros(40)]  # speaking, then listening
    shirt_dx = np.where(mask > 0, rng.uniform(-3, 3, t), rng.normal(0, 0.3, t))  # big moves while speaking
    face_dy = np.where(mask > 0, 0.0, rng.normal(0, 0.5, t))
    video = _render(shirt_dx, face_dy)
    reference = _render(np.zeros(1), np.zeros(1))[0]
    sway = listening_sway(video, reference, nose_xy=(32.0, 21.0), mask=mask)
    listening = mask < 0.5
    assert sway["body"] == pytest.approx(shirt_dx[listening].var(), rel=0.1)
    assert sway["face"] == pytest.approx(face_dy[listening].var(), rel=0.1)
    still = listening_sway(_render(np.zeros(t), np.zeros(t)), reference, (32.0, 21.0), mask)
    assert still["body"] < 1e-6 and still["face"] < 1e-6
    short = listening_sway(video, reference, (32.0, 21.0), np.r_[np.ones(70), np.zeros(10)])
    assert np.isnan(short["body"]) and np.isnan(short["face"])
    # per listening segment, as Table 2: where the body rests in each segment is not sway; a 10-frame one is skipped
    two = np.r_[np.zeros(30), np.ones(10), np.zeros(30), np.ones(5), np.zeros(10)]
    n = len(two)
    rest = np.r_[np.zeros(40), np.full(n - 40, 2.0)] + rng.normal(0, 0.3, n)
    two_sway = listening_sway(_render(rest, np.zeros(n)), reference, (32.0, 21.0), two)
    inside = [rest[0:30].var(), rest[40:70].var()]
    assert two_sway["body"] == pytest.approx(np.mean(inside), rel=0.1)
    with pytest.raises(ValueError, match="mask values"):
        listening_sway(video, reference, (32.0, 21.0), mask[:10])
