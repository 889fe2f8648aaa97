"""The synthetic dyadic world: determinism, labels that agree with the rendered audio and frames."""

from __future__ import annotations

import numpy as np
import pytest

from dystream.datamodules import keypoints as kp
from dystream.datamodules import synthetic as syn
from dystream.datamodules.format import SAMPLES_PER_FRAME, iter_tar_samples, read_index, sample_to_clip


@pytest.fixture(scope="module")
def clips() -> list:
    return [syn.make_clip(seed=3, split="train", index=i, size=96, seconds=2.0) for i in range(4)]


def test_clips_are_deterministic_for_a_seed():
    a = syn.make_clip(seed=7, split="train", index=5, size=32, seconds=1.0)
    b = syn.make_clip(seed=7, split="train", index=5, size=32, seconds=1.0)
    assert syn.fingerprint(a) == syn.fingerprint(b)
    assert syn.fingerprint(a) != syn.fingerprint(syn.make_clip(seed=8, split="train", index=5, size=32, seconds=1.0))
    assert syn.fingerprint(a) != syn.fingerprint(syn.make_clip(seed=7, split="train", index=6, size=32, seconds=1.0))


def test_clip_arrays_follow_the_format(clips):
    c = clips[0]
    assert c.video.shape == (50, 96, 96, 3) and c.video.dtype == np.uint8
    assert c.audio_self.shape == c.audio_other.shape == (50 * SAMPLES_PER_FRAME,)
    assert c.mask.shape == (50,) and set(np.unique(c.mask)) <= {0, 1}
    assert c.kpts.shape == (50, kp.NUM_KEYPOINTS, 3) and c.kpts.dtype == np.float32
    assert c.meta["identity"].startswith("synth-train-3-") and c.meta["source"] == "synthetic"


def test_mask_agrees_with_the_rendered_own_voice(clips):
    both = 0
    for c in clips:
        rms = syn.frame_rms(c.audio_self, c.n_frames)
        on, off = rms[c.mask == 1], rms[c.mask == 0]
        assert on.size and off.size, "each test clip should contain speaking and listening frames"
        assert np.median(on) > 100 * np.median(off)
        assert np.mean(on > 0.02) > 0.9  # speaking frames carry voice energy
        assert np.mean(off > 0.02) < 0.1  # listening frames are (nearly) silent on the own track
        # the partner's track is a different signal: where only the partner speaks, own track is silent
        other = syn.frame_rms(c.audio_other, c.n_frames)
        only_partner = (c.mask == 0) & (other > 0.05)
        both += int(only_partner.sum())
        if only_partner.any():
            assert np.median(rms[only_partner]) < 0.01
    assert both > 0


def test_mouth_keypoints_follow_the_speech_envelope(clips):
    for c in clips:
        opening = np.linalg.norm(c.kpts[:, kp.INNER_LIP_TOP, :2] - c.kpts[:, kp.INNER_LIP_BOTTOM, :2], axis=-1)
        envelope = syn.frame_rms(c.audio_self, c.n_frames)
        assert np.corrcoef(opening, envelope)[0, 1] > 0.7
        assert opening[c.mask == 0].mean() < 0.2 * opening[c.mask == 1].mean()


def _colour_at(video: np.ndarray, kpts: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel colours (float in [0, 1]) under keypoint `index` in every frame, and its confidence."""
    x = np.clip(np.floor(kpts[:, index, 0]).astype(int), 0, video.shape[2] - 1)
    y = np.clip(np.floor(kpts[:, index, 1]).astype(int), 0, video.shape[1] - 1)
    return video[np.arange(video.shape[0]), y, x].astype(np.float64) / 255.0, kpts[:, index, 2]


def test_keypoints_land_on_the_parts_they_name(clips):
    hand_hits = 0
    for i, c in enumerate(clips):
        person = syn.sample_identity("x", syn.identity_rng(3, "train", i // 4))
        b = c.meta["brightness"]
        # nose bridge (between the eyes) is skin
        colour, _ = _colour_at(c.video, c.kpts, kp.FACE.start + 28)
        assert np.median(np.abs(colour - person.skin * b).max(axis=1)) < 0.06
        # shoulders are clothes (the sleeve is the clothes colour, slightly darker)
        for name in ("right_shoulder", "left_shoulder"):
            colour, _ = _colour_at(c.video, c.kpts, kp.index(name))
            assert np.median(np.abs(colour - person.clothes * b).max(axis=1)) < 0.1
        # a visible hand's middle knuckle is skin
        for side in ("right", "left"):
            colour, conf = _colour_at(c.video, c.kpts, kp.index(f"{side}_hand_middle_mcp"))
            visible = conf > 0
            hand_hits += int(visible.sum())
            if visible.sum() >= 3:
                assert np.median(np.abs(colour[visible] - person.skin * b).max(axis=1)) < 0.08
        # an open mouth shows the dark inside between the inner lips
        open_frames = c.kpts[:, kp.INNER_LIP_BOTTOM, 1] - c.kpts[:, kp.INNER_LIP_TOP, 1] > 2.5
        if open_frames.any():
            mid = (c.kpts[:, kp.INNER_LIP_TOP] + c.kpts[:, kp.INNER_LIP_BOTTOM]) / 2
            tmp = c.kpts.copy()
            tmp[:, 0] = mid
            colour, _ = _colour_at(c.video, tmp, 0)
            assert np.median(colour[open_frames].max(axis=1)) < 0.3
    assert hand_hits > 0, "no clip raised a hand into view"


def test_hands_gesture_more_while_speaking(clips):
    speaking, listening = [], []
    for c in clips:
        wrist_y = c.kpts[:, kp.index("right_wrist"), 1]
        lift = np.minimum(c.kpts[:, kp.index("left_wrist"), 1], wrist_y)
        speaking += list(lift[c.mask == 1])
        listening += list(lift[c.mask == 0])
    assert np.mean(speaking) < np.mean(listening)  # y grows downwards: raised hands are higher


def test_synthesize_writes_disjoint_splits_and_round_trips(tmp_path):
    indexes = syn.synthesize(
        tmp_path, clips=3, val_clips=2, size=32, seconds=1.0, seed=1, clips_per_identity=1, shard_samples=2, workers=1
    )
    assert indexes["train"]["total_samples"] == 3 and len(indexes["train"]["shards"]) == 2
    assert read_index(tmp_path / "val")["total_samples"] == 2
    read = {split: [] for split in ("train", "val")}
    for split in read:
        for entry in read_index(tmp_path / split)["shards"]:
            read[split] += [sample_to_clip(s) for s in iter_tar_samples(tmp_path / split / entry["name"])]
    train_ids = {c.meta["identity"] for c in read["train"]}
    val_ids = {c.meta["identity"] for c in read["val"]}
    assert len(train_ids) == 3 and len(val_ids) == 2 and not train_ids & val_ids
    for got in read["train"]:
        want = syn.make_clip(1, "train", got.meta["clip_index"], 32, 1.0, clips_per_identity=1)
        assert got.key == want.key
        np.testing.assert_array_equal(got.mask, want.mask)
        np.testing.assert_array_equal(got.kpts, want.kpts)
        np.testing.assert_allclose(got.audio_self, want.audio_self, atol=1.0 / 32767 + 1e-7)
        np.testing.assert_allclose(got.audio_other, want.audio_other, atol=1.0 / 32767 + 1e-7)
        assert got.meta == want.full_meta()
        err = got.video.astype(np.float64) - want.video
        psnr = 10 * np.log10(255.0**2 / np.mean(err**2))
        assert got.video.shape == want.video.shape and psnr > 30.0, psnr


def test_listeners_nod_after_the_partners_phrases():
    """While listening, the head moves far more in the ~0.5 s after a partner phrase ends than otherwise."""
    after, elsewhere = [], []
    for i in range(8):
        c = syn.make_clip(seed=5, split="train", index=i, size=32, seconds=4.0)
        partner = syn.frame_rms(c.audio_other, c.n_frames) > 0.01
        window = np.zeros(c.n_frames, dtype=bool)
        for t in np.flatnonzero(partner[:-1] & ~partner[1:]) + 1:  # the partner just went quiet
            window[t : t + 14] = True
        speed = np.abs(np.diff(c.kpts[:, kp.index("nose"), 1], prepend=c.kpts[0, kp.index("nose"), 1]))
        listening = c.mask == 0
        after += list(speed[window & listening])
        elsewhere += list(speed[~window & listening])
    assert len(after) > 50 and len(elsewhere) > 50
    assert np.mean(after) > 3 * np.mean(elsewhere)


def test_muted_partner_clip_changes_only_the_listeners_reactions(clips):
    """partner_reactions=False: the same draws, so the own voice, mask and speaking frames stay; the partner is
    silent and the listener's face no longer nods and tilts in answer (face keypoints, centroid removed)."""
    moved = []
    for c in clips:
        muted = syn.make_clip(seed=3, split="train", index=c.meta["clip_index"], size=96, seconds=2.0,
                              partner_reactions=False)  # fmt: skip
        np.testing.assert_array_equal(muted.audio_self, c.audio_self)
        np.testing.assert_array_equal(muted.mask, c.mask)
        assert not muted.audio_other.any() and c.audio_other.any()
        assert muted.meta["partner"].startswith("muted")
        listening = c.mask == 0
        for clip in (c, muted):
            xy = clip.kpts[listening][:, kp.FACE, :2]
            moved.append((xy - xy.mean(axis=1, keepdims=True)).var(axis=0).mean())
    with_partner, without = np.array(moved[0::2]), np.array(moved[1::2])
    assert with_partner.mean() > 1.5 * without.mean()


def test_remake_clip_rebuilds_a_shard_clip_from_its_metadata(clips):
    c = clips[2]
    again = syn.remake_clip(c.meta, c.n_frames, 96)
    assert syn.fingerprint(again) == syn.fingerprint(c)
    muted = syn.remake_clip(c.meta, c.n_frames, 96, partner_reactions=False)
    np.testing.assert_array_equal(muted.mask, c.mask)
    with pytest.raises(ValueError, match="not a clip of dystream.datamodules.synthetic"):
        syn.remake_clip({**c.meta, "source": "speakervid"}, c.n_frames, 96)
    with pytest.raises(ValueError, match="lacks seed / split / clip_index / identity"):
        syn.remake_clip({k: v for k, v in c.meta.items() if k != "clip_index"}, c.n_frames, 96)
