"""The synthetic dyadic world: the embedded default dataset, with exact ground truth.

Each clip shows one cartoon person (the "self") in a two-person conversation. Notable features:

- Identity = look + voice: skin, hair colour and style, clothes and collar, background, head and
  body proportions, eye spacing, mouth size, and a voice (pitch, formant scale, speaking rate,
  loudness) plus a motion style (gesture, nod and sway amplitudes). Identities are drawn from a
  seeded generator keyed by (seed, split, identity number), so the validation split's people
  are disjoint from the training split's.
- Conversation: turns that alternate between self and partner, made of phrases of voiced
  syllables, with gaps, occasional overlaps and short backchannels ("mm-hm") by the listener.
- Speech: additive harmonic synthesis of each syllable (per-identity f0 with declination, vowel
  formants from Peterson & Barney 1952 scaled per identity, a consonant noise burst), shaped by a
  designed amplitude envelope. Each syllable is normalised to unit RMS before the envelope, so
  the per-frame RMS of the audio follows the envelope.
- Motion: the mouth opening is the self track's own per-frame envelope; head bobbing and hand
  gestures (2-link arms with IK) while speaking; while listening, nods at the partner's phrase
  ends and small motions following the partner's envelope; blinks throughout.
- Exact labels: the mask is 1 on frames whose centre lies inside one of the self's phrases or
  backchannels; keypoints (dwpose134 layout, `keypoints.py`) come from the same geometry that is
  drawn.
- Rendering: numpy only, every shape drawn with anti-aliased coverage from a signed distance,
  vectorised over all frames of a clip; all geometry in units of the frame size, so any even
  `size` renders the same scene.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d

from dystream.datamodules import keypoints as kp
from dystream.datamodules.format import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    Clip,
    clip_to_sample,
    frame_rms,
    write_index,
    write_shard,
)

SPLITS = {"train": 0, "val": 1, "test": 2}
GENERATOR = "dystream.datamodules.synthetic/1"  # written into every clip's meta

# Vowel formants F1-F3 in Hz (adult male averages, Peterson & Barney 1952) and a jaw-openness
# factor: open vowels are louder and open the mouth more.
VOWELS = {
    "a": ((730.0, 1090.0, 2440.0), 1.0),
    "e": ((530.0, 1840.0, 2480.0), 0.7),
    "i": ((270.0, 2290.0, 3010.0), 0.35),
    "o": ((570.0, 840.0, 2410.0), 0.75),
    "u": ((300.0, 870.0, 2240.0), 0.4),
}
NASAL = ((250.0, 1200.0, 2200.0), 0.2)  # the "m" of a backchannel: low F1, lips nearly closed
NOISE_FLOOR = 1e-4  # room tone, about -80 dBFS, so silence is never exactly zero


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A person's look, voice and motion style. Lengths are in units of the frame size."""

    name: str
    skin: np.ndarray
    hair: np.ndarray
    clothes: np.ndarray
    clothes2: np.ndarray
    lips: np.ndarray
    iris: np.ndarray
    bg_top: np.ndarray
    bg_bottom: np.ndarray
    bg_blob: np.ndarray
    bg_blob_xy: tuple[float, float]
    bg_blob_r: float
    hair_style: int  # 0 short, 1 long, 2 buzz, 3 bun, 4 side part
    collar: int  # 0 plain, 1 collar band, 2 jacket lapels
    head_rx: float
    head_ry: float
    head_y: float
    neck_w: float
    shoulder_w: float
    shoulder_y: float
    eye_dx: float
    eye_y: float
    eye_rx: float
    eye_ry: float
    mouth_w: float
    mouth_y: float
    mouth_open: float  # full opening of the inner lips, as a fraction of head_ry
    hand_r: float
    f0: float  # Hz
    formant_scale: float
    rate: float  # syllables per second
    loudness: float  # peak amplitude of an open vowel
    gesture: float
    nod: float
    sway: float


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def sample_identity(name: str, rng: np.random.Generator) -> Identity:
    """Draw one person. Every draw comes from `rng`, so a seeded generator gives the same person."""
    light, dark = np.array([0.97, 0.82, 0.70]), np.array([0.38, 0.24, 0.16])
    skin = (light + (dark - light) * rng.uniform(0, 1)) * rng.uniform(0.95, 1.05, 3)
    hair_palette = [(0.08, 0.06, 0.05), (0.30, 0.18, 0.09), (0.85, 0.70, 0.40), (0.60, 0.25, 0.10), (0.70, 0.70, 0.72)]
    hair = np.array(hair_palette[rng.integers(len(hair_palette))]) * rng.uniform(0.85, 1.15, 3)
    clothes = _hsv(rng.uniform(), rng.uniform(0.35, 0.9), rng.uniform(0.35, 0.9))
    clothes2 = _hsv(rng.uniform(), rng.uniform(0.1, 0.6), rng.uniform(0.15, 0.95))
    bg_hue = rng.uniform()
    bg_top = _hsv(bg_hue, rng.uniform(0.05, 0.45), rng.uniform(0.55, 0.95))
    bg_bottom = _hsv((bg_hue + rng.uniform(-0.1, 0.1)) % 1.0, rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.8))
    head_rx = rng.uniform(0.12, 0.155)
    head_ry = head_rx * rng.uniform(1.15, 1.35)
    female = rng.uniform() < 0.5
    f0 = rng.uniform(165.0, 235.0) if female else rng.uniform(90.0, 140.0)
    return Identity(
        name=name,
        skin=np.clip(skin, 0, 1).astype(np.float32),
        hair=np.clip(hair, 0, 1).astype(np.float32),
        clothes=clothes,
        clothes2=clothes2,
        lips=np.clip(skin * np.array([0.85, 0.55, 0.55]), 0, 1).astype(np.float32),
        iris=_hsv(rng.uniform(0.05, 0.6), rng.uniform(0.3, 0.8), rng.uniform(0.15, 0.5)),
        bg_top=bg_top,
        bg_bottom=bg_bottom,
        bg_blob=_hsv(rng.uniform(), rng.uniform(0.1, 0.7), rng.uniform(0.4, 1.0)),
        bg_blob_xy=(float(rng.choice([rng.uniform(0.05, 0.22), rng.uniform(0.78, 0.95)])), rng.uniform(0.1, 0.5)),
        bg_blob_r=rng.uniform(0.06, 0.16),
        hair_style=int(rng.integers(5)),
        collar=int(rng.integers(3)),
        head_rx=head_rx,
        head_ry=head_ry,
        head_y=rng.uniform(0.31, 0.37),
        neck_w=head_rx * rng.uniform(0.38, 0.5),
        shoulder_w=rng.uniform(0.25, 0.33),
        shoulder_y=rng.uniform(0.66, 0.71),
        eye_dx=head_rx * rng.uniform(0.36, 0.46),
        eye_y=-head_ry * rng.uniform(0.02, 0.12),
        eye_rx=head_rx * rng.uniform(0.17, 0.23),
        eye_ry=head_rx * rng.uniform(0.10, 0.14),
        mouth_w=head_rx * rng.uniform(0.32, 0.45),
        mouth_y=head_ry * rng.uniform(0.45, 0.55),
        mouth_open=rng.uniform(0.16, 0.22),
        hand_r=rng.uniform(0.028, 0.036),
        f0=f0,
        formant_scale=rng.uniform(1.08, 1.2) if female else rng.uniform(0.9, 1.02),
        rate=rng.uniform(3.5, 5.5),
        loudness=rng.uniform(0.1, 0.17),
        gesture=rng.uniform(0.5, 1.4),
        nod=rng.uniform(0.6, 1.4),
        sway=rng.uniform(0.5, 1.5),
    )


def identity_rng(seed: int, split: str, identity: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], 1, identity])


# ---------------------------------------------------------------------------------------------
# Conversation schedule and speech
# ---------------------------------------------------------------------------------------------


@dataclass
class Phrase:
    t0: float  # seconds
    t1: float
    kind: str  # "speech" or "backchannel"


def sample_conversation(duration: float, rng: np.random.Generator) -> tuple[list[Phrase], list[Phrase]]:
    """Turn-taking between self (0) and partner (1): phrases per speaker, clipped to [0, duration]."""
    phrases: tuple[list[Phrase], list[Phrase]] = ([], [])
    t = -rng.uniform(0.0, 1.5)  # the clip usually starts mid-conversation
    speaker = int(rng.integers(2))
    while t < duration:
        end = t + rng.uniform(0.9, 2.8)
        p0 = t
        turn: list[Phrase] = []
        while p0 < end - 0.25:
            p1 = min(p0 + rng.uniform(0.45, 1.3), end)
            turn.append(Phrase(p0, p1, "speech"))
            p0 = p1 + rng.uniform(0.12, 0.3)
        phrases[speaker].extend(turn)
        # A backchannel by the listener at a phrase end inside the turn.
        if len(turn) > 1 and rng.uniform() < 0.45:
            at = turn[int(rng.integers(len(turn) - 1))].t1 + rng.uniform(0.0, 0.08)
            phrases[1 - speaker].append(Phrase(at, at + rng.uniform(0.2, 0.34), "backchannel"))
        last = turn[-1].t1 if turn else end
        gap = -rng.uniform(0.05, 0.3) if rng.uniform() < 0.2 else rng.uniform(0.1, 0.6)  # < 0: overlap
        t = last + gap
        if rng.uniform() < 0.85:
            speaker = 1 - speaker
    out = []
    for ps in phrases:
        kept = [Phrase(max(p.t0, 0.0), min(p.t1, duration), p.kind) for p in sorted(ps, key=lambda p: p.t0)]
        out.append([p for p in kept if p.t1 - p.t0 >= 0.08])
    return out[0], out[1]


def _raised_cosine_envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n, dtype=np.float64)
    attack, release = min(attack, n // 2), min(release, n // 2)
    if attack > 0:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    if release > 0:
        env[n - release :] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(release) + 1) / release)
    return env


def _voiced(n: int, f0_start: float, f0_end: float, formants: tuple[float, ...], scale: float) -> np.ndarray:
    """A unit-RMS voiced sound: harmonics of a gliding f0, weighted by a formant resonance curve."""
    t = np.arange(n) / SAMPLE_RATE
    f0 = np.linspace(f0_start, f0_end, n) * (1.0 + 0.006 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    harmonics = np.arange(1, int(3800.0 / max(f0_start, f0_end)) + 1)
    freq = harmonics * float(f0.mean())
    gain = np.zeros_like(freq)
    for k, (f, g, bw) in enumerate(zip(formants, (1.0, 0.6, 0.3), (70.0, 100.0, 140.0), strict=True)):
        gain += g / (1.0 + ((freq - f * scale) / (bw * (1 + 0.3 * k))) ** 2)
    gain *= harmonics**-0.4
    wave = gain @ np.sin(np.outer(harmonics, phase))
    return wave / max(float(np.sqrt(np.mean(wave**2))), 1e-8)


def synthesize_speech(
    phrases: list[Phrase], voice: Identity, n_samples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Render phrases into a waveform. Returns (audio float32 [N], amplitude envelope float32 [N]).

    The envelope is the designed amplitude of the voiced part; the audio is that envelope times
    unit-RMS voiced syllables, plus short consonant bursts and a noise floor.
    """
    audio = np.zeros(n_samples, dtype=np.float64)
    env = np.zeros(n_samples, dtype=np.float64)
    vowels = list(VOWELS.values())
    for phrase in phrases:
        s0, s1 = int(phrase.t0 * SAMPLE_RATE), min(int(phrase.t1 * SAMPLE_RATE), n_samples)
        backchannel = phrase.kind == "backchannel"
        n_syll = 2 if backchannel else max(1, round((s1 - s0) / SAMPLE_RATE * voice.rate))
        bounds = np.linspace(s0, s1, n_syll + 1).astype(int)
        # Declination: pitch falls over a phrase; a small accent per syllable.
        f0s = voice.f0 * np.linspace(1.08, 0.92, n_syll + 1) * (1.0 + 0.05 * rng.standard_normal(n_syll + 1))
        for j in range(n_syll):
            a, b = bounds[j], bounds[j + 1]
            n = b - a
            if n < 64:
                continue
            formants, openness = NASAL if backchannel else vowels[int(rng.integers(len(vowels)))]
            level = voice.loudness * (0.55 + 0.45 * openness) * rng.uniform(0.85, 1.1)
            shape = _raised_cosine_envelope(n, int(0.025 * SAMPLE_RATE), int(0.045 * SAMPLE_RATE)) * level
            audio[a:b] += _voiced(n, f0s[j], f0s[j + 1], formants, voice.formant_scale) * shape
            env[a:b] += shape
            if not backchannel and rng.uniform() < 0.7:  # consonant: a short high-passed noise burst
                m = min(int(rng.uniform(0.012, 0.03) * SAMPLE_RATE), n)
                burst = np.diff(rng.standard_normal(m + 1)) * 0.12 * level
                audio[a : a + m] += burst * _raised_cosine_envelope(m, m // 4, m // 2)
    audio += NOISE_FLOOR * rng.standard_normal(n_samples)
    peak = float(np.abs(audio).max())
    if peak > 0.95:  # a rare peak of the harmonic sum: lower the whole track, never clip it
        audio *= 0.95 / peak
    return audio.astype(np.float32), env.astype(np.float32)


def phrase_mask(phrases: list[Phrase], n_frames: int) -> np.ndarray:
    """uint8 [T]: 1 on frames whose centre time lies inside a phrase."""
    centres = (np.arange(n_frames) + 0.5) / FPS
    mask = np.zeros(n_frames, dtype=np.uint8)
    for p in phrases:
        mask[(centres >= p.t0) & (centres < p.t1)] = 1
    return mask


# ---------------------------------------------------------------------------------------------
# Motion
# ---------------------------------------------------------------------------------------------


def _slow_noise(t: np.ndarray, rng: np.random.Generator, fmin: float, fmax: float, k: int = 3) -> np.ndarray:
    """Smooth random motion in [-1, 1]: a sum of k sinusoids with random frequency and phase."""
    out = np.zeros_like(t)
    for _ in range(k):
        out += np.sin(2 * np.pi * rng.uniform(fmin, fmax) * t + rng.uniform(0, 2 * np.pi))
    return out / k


def _bump(t: np.ndarray, t0: float, width: float) -> np.ndarray:
    u = (t - t0) / width
    return np.where((u >= 0) & (u <= 1), np.sin(np.pi * np.clip(u, 0, 1)) ** 2, 0.0)


@dataclass
class Motion:
    """Per-frame animation parameters, each an array [T]."""

    head_dx: np.ndarray
    head_dy: np.ndarray
    tilt: np.ndarray  # radians
    look_down: np.ndarray  # features shift down inside the head during a nod
    body_dx: np.ndarray
    body_dy: np.ndarray
    eye_open: np.ndarray  # 1 open, ~0 closed
    mouth: np.ndarray  # 0 closed .. 1 fully open
    brow: np.ndarray  # 0 .. 1 raise
    wrists: np.ndarray  # [T, 2 (right, left), 2 (x, y)]


def sample_motion(
    person: Identity,
    self_phrases: list[Phrase],
    other_phrases: list[Phrase],
    self_env: np.ndarray,
    other_env: np.ndarray,
    n_frames: int,
    rng: np.random.Generator,
    partner_reactions: bool = True,
) -> Motion:
    """The clip's animation. partner_reactions=False leaves out everything the listener does in answer to the partner
    (the attentive tilt, the nods at phrase ends, the motion with their speech) with the same random draws, so the
    rest of the clip is unchanged: the listener of a muted partner (`remake_clip`)."""
    t = (np.arange(n_frames) + 0.5) / FPS
    reacts = 1.0 if partner_reactions else 0.0
    speaking = gaussian_filter1d(phrase_mask(self_phrases, n_frames).astype(np.float64), 2.0)
    partner = gaussian_filter1d(phrase_mask(other_phrases, n_frames).astype(np.float64), 2.0)
    listening = (1.0 - speaking) * partner * reacts
    # The mouth follows the self track's own per-frame envelope (RMS over each frame's 640 samples).
    mouth = np.clip(frame_rms(self_env, n_frames) / person.loudness, 0.0, 1.0)
    emph = gaussian_filter1d(mouth, 2.5)
    partner_emph = gaussian_filter1d(np.clip(frame_rms(other_env, n_frames) / 0.15, 0, 1), 3.0) * reacts

    g, s = person.gesture, person.sway
    head_dx = 0.008 * s * _slow_noise(t, rng, 0.08, 0.4) + 0.012 * g * speaking * _slow_noise(t, rng, 0.6, 2.0)
    head_dy = 0.004 * s * _slow_noise(t, rng, 0.08, 0.4) - 0.012 * g * speaking * (emph - emph.mean())
    tilt = 0.04 * s * _slow_noise(t, rng, 0.05, 0.3) + 0.06 * g * speaking * _slow_noise(t, rng, 0.4, 1.5)
    tilt += 0.05 * rng.choice([-1.0, 1.0]) * listening  # an attentive tilt while the partner talks
    # Listening: nods shortly after the partner's phrase ends, small motions with their speech.
    nods = np.zeros(n_frames)
    self_mask_at = phrase_mask(self_phrases, n_frames)
    for p in other_phrases:
        frame = min(int(p.t1 * FPS), n_frames - 1)
        if p.kind == "speech" and self_mask_at[frame] == 0 and rng.uniform() < 0.8:
            start = p.t1 + rng.uniform(0.05, 0.2)
            nods += reacts * _bump(t, start, 0.42)
            if rng.uniform() < 0.3:  # a double nod
                nods += reacts * 0.6 * _bump(t, start + 0.42, 0.38)
    nod_amp = 0.022 * person.nod
    head_dy = head_dy + nod_amp * nods + 0.006 * person.nod * listening * partner_emph
    look_down = 0.45 * nod_amp * nods
    body_dy = 0.3 * head_dy + 0.003 * np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6.3))  # breathing
    body_dx = 0.4 * head_dx

    # Blinks every 2-5 s, four frames each.
    eye_open = np.ones(n_frames)
    tb = rng.uniform(0.2, 3.0)
    while tb < n_frames / FPS:
        f = int(tb * FPS)
        for d, v in enumerate((0.45, 0.05, 0.05, 0.5)):
            if f + d < n_frames:
                eye_open[f + d] = min(eye_open[f + d], v)
        tb += rng.uniform(2.0, 5.0)

    # Hands: at rest below the frame; raised into view for gesturing phrases, with beats that
    # follow the speech emphasis.
    rest = np.array([[0.5 - 0.2, 1.12], [0.5 + 0.2, 1.12]])
    lift = np.zeros((2, n_frames))
    target = np.repeat(rest[:, None, :], n_frames, axis=1)  # [2, T, 2]
    for p in self_phrases:
        if p.kind != "speech" or rng.uniform() > 0.35 + 0.4 * min(g, 1.0):
            continue
        hands = [int(rng.integers(2))] if rng.uniform() < 0.6 else [0, 1]
        sel = (t >= p.t0 - 0.1) & (t < p.t1 + 0.1)
        for h in hands:
            side = -1.0 if h == 0 else 1.0
            lift[h, sel] = 1.0
            target[h, sel] = (0.5 + side * rng.uniform(0.12, 0.27), rng.uniform(0.7, 0.84))
    lift = gaussian_filter1d(lift, 3.0, axis=1)
    target = gaussian_filter1d(target, 4.0, axis=1)
    beat = gaussian_filter1d(np.diff(emph, prepend=emph[0]), 1.0)
    wrists = rest[:, None, :] * (1 - lift[..., None]) + target * lift[..., None]
    wrists[..., 1] -= 0.6 * g * beat[None] * lift
    wrists[..., 0] += 0.01 * g * lift * _slow_noise(t, rng, 0.5, 1.5)[None]
    wrists[..., 0] += body_dx[None]
    wrists[..., 1] += body_dy[None]
    return Motion(
        head_dx=head_dx,
        head_dy=head_dy,
        tilt=tilt,
        look_down=look_down,
        body_dx=body_dx,
        body_dy=body_dy,
        eye_open=eye_open,
        mouth=mouth,
        brow=emph * speaking,
        wrists=np.transpose(wrists, (1, 0, 2)),
    )


# ---------------------------------------------------------------------------------------------
# Geometry: every drawn part and every keypoint, per frame, in frame units
# ---------------------------------------------------------------------------------------------


def _rot(theta: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Rotate local offsets q [..., 2] by theta [T] (image coordinates, y down)."""
    c, s = np.cos(theta), np.sin(theta)
    while c.ndim < q.ndim - 1:
        c, s = c[..., None], s[..., None]
    return np.stack([c * q[..., 0] - s * q[..., 1], s * q[..., 0] + c * q[..., 1]], axis=-1)


def _ellipse_points(angles_deg: np.ndarray, rx: np.ndarray | float, ry: np.ndarray | float) -> np.ndarray:
    """Points on an axis-aligned ellipse at the given angles (0 = +x, 90 = +y = down). [..., n, 2]."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx, ry = np.asarray(rx, dtype=np.float64)[..., None], np.asarray(ry, dtype=np.float64)[..., None]
    return np.stack([rx * np.cos(a), ry * np.sin(a) + 0 * rx], axis=-1)


def _arm_ik(shoulder: np.ndarray, wrist: np.ndarray, l1: float, l2: float, outward: np.ndarray) -> np.ndarray:
    """Elbow of a 2-link arm. shoulder, wrist [T, 2]; outward [T] is -1 for the image-left arm, +1 else."""
    d_vec = wrist - shoulder
    d = np.linalg.norm(d_vec, axis=-1, keepdims=True).clip(1e-6, l1 + l2 - 1e-4)
    u = d_vec / np.linalg.norm(d_vec, axis=-1, keepdims=True).clip(1e-6)
    a = (l1**2 - l2**2 + d**2) / (2 * d)
    h = np.sqrt(np.clip(l1**2 - a**2, 0, None))
    perp = np.stack([-u[:, 1], u[:, 0]], axis=-1)
    # Of the two solutions, elbows hang down and a little away from the body.
    preference = perp[:, 1] + 0.3 * perp[:, 0] * outward
    sign = np.where(preference >= 0, 1.0, -1.0)[:, None]
    return shoulder + u * a + perp * h * sign


@dataclass
class Geometry:
    head_c: np.ndarray  # [T, 2] head centre
    tilt: np.ndarray  # [T]
    feat_dy: np.ndarray  # [T] local shift of face features (nod)
    torso_c: np.ndarray  # [T, 2]
    shoulders: np.ndarray  # [T, 2 (right, left), 2]
    elbows: np.ndarray
    wrists: np.ndarray
    palms: np.ndarray  # [T, 2, 2] palm centres
    hand_dir: np.ndarray  # [T, 2, 2] unit forearm direction
    eye_open: np.ndarray
    mouth: np.ndarray
    brow: np.ndarray


def make_geometry(person: Identity, motion: Motion, shift: tuple[float, float]) -> Geometry:
    n = motion.head_dx.shape[0]
    cx = 0.5 + shift[0]
    pivot = np.stack([cx + motion.head_dx, person.head_y + 0.9 * person.head_ry + shift[1] + motion.head_dy], -1)
    head_c = pivot + _rot(motion.tilt, np.broadcast_to(np.array([0.0, -0.9 * person.head_ry]), (n, 2)))
    torso_c = np.stack([cx + motion.body_dx, person.shoulder_y + shift[1] + motion.body_dy], -1)
    shoulder_off = np.array([[-person.shoulder_w + 0.045, 0.035], [person.shoulder_w - 0.045, 0.035]])
    shoulders = torso_c[:, None, :] + shoulder_off[None]
    wrists = motion.wrists + np.array(shift)[None, None]
    l1, l2 = 0.22, 0.2
    elbows = np.stack(
        [_arm_ik(shoulders[:, h], wrists[:, h], l1, l2, np.full(n, -1.0 if h == 0 else 1.0)) for h in (0, 1)], 1
    )
    fore = wrists - elbows
    hand_dir = fore / np.linalg.norm(fore, axis=-1, keepdims=True).clip(1e-6)
    palms = wrists + hand_dir * person.hand_r
    return Geometry(
        head_c=head_c,
        tilt=motion.tilt,
        feat_dy=motion.look_down,
        torso_c=torso_c,
        shoulders=shoulders,
        elbows=elbows,
        wrists=wrists,
        palms=palms,
        hand_dir=hand_dir,
        eye_open=motion.eye_open,
        mouth=motion.mouth,
        brow=motion.brow,
    )


# Finger fan: angle (degrees, from the forearm direction, toward the thumb side) and length factor.
_FINGERS = ((70.0, 0.75), (28.0, 1.0), (5.0, 1.08), (-17.0, 1.0), (-38.0, 0.8))


def _hand_points(palm: np.ndarray, direction: np.ndarray, wrist: np.ndarray, r: float, thumb_side: float) -> np.ndarray:
    """21 hand keypoints [T, 21, 2]: wrist, then thumb..pinky from MCP to tip."""
    n = palm.shape[0]
    pts = np.zeros((n, 21, 2))
    pts[:, 0] = wrist
    base = np.arctan2(direction[:, 1], direction[:, 0])
    for f, (angle, length) in enumerate(_FINGERS):
        a = base + thumb_side * np.deg2rad(angle)
        d = np.stack([np.cos(a), np.sin(a)], -1)
        start = palm + d * 0.45 * r if f else wrist + (palm - wrist) * 0.7 + d * 0.4 * r
        for j in range(4):
            pts[:, 1 + 4 * f + j] = start + d * r * length * (0.45 * j)
    return pts


def _face_local(person: Identity, geo: Geometry) -> np.ndarray:
    """The 68 face points in head-local coordinates (before tilt), [T, 68, 2]."""
    n = geo.tilt.shape[0]
    rx, ry = person.head_rx, person.head_ry
    dy = geo.feat_dy[:, None]
    pts = np.zeros((n, 68, 2))
    jaw = _ellipse_points(np.linspace(174.0, 6.0, 17), 0.93 * rx, 0.93 * ry)
    pts[:, 0:17] = jaw[None]
    pts[:, 0:17, 1] += 0.3 * dy  # the chin moves less than the inner face during a nod
    brow_y = person.eye_y - 1.9 * person.eye_ry - 0.05 * ry * geo.brow
    for side, sl in ((-1, slice(17, 22)), (1, slice(22, 27))):
        xs = side * person.eye_dx + np.linspace(-1.1, 1.1, 5) * person.eye_rx
        arch = -0.25 * person.eye_ry * np.cos(np.linspace(-1.2, 1.2, 5))
        pts[:, sl, 0] = xs[None]
        pts[:, sl, 1] = brow_y[:, None] + arch[None] + dy
    nose_tip = person.eye_y + 0.55 * (person.mouth_y - person.eye_y)
    pts[:, 27:31, 0] = 0.0
    pts[:, 27:31, 1] = np.linspace(person.eye_y, nose_tip, 4)[None] + dy
    pts[:, 31:36, 0] = np.linspace(-0.12, 0.12, 5)[None] * rx
    pts[:, 31:36, 1] = nose_tip + 0.05 * ry + dy
    angles = np.array([180.0, 240.0, 300.0, 0.0, 60.0, 120.0])
    for side, start in ((-1, 36), (1, 42)):
        eye = _ellipse_points(angles, np.full(n, person.eye_rx), person.eye_ry * geo.eye_open)
        pts[:, start : start + 6, 0] = side * person.eye_dx + eye[..., 0]
        pts[:, start : start + 6, 1] = person.eye_y + eye[..., 1] + dy
    open_half = 0.5 * person.mouth_open * ry * geo.mouth  # half the inner-lip gap
    lip = 0.045 * ry
    outer = _ellipse_points(180.0 + 30.0 * np.arange(12), np.full(n, person.mouth_w), open_half + lip)
    inner = _ellipse_points(180.0 + 45.0 * np.arange(8), np.full(n, 0.8 * person.mouth_w), open_half)
    pts[:, 48:60] = outer + np.stack([np.zeros(n), person.mouth_y + dy[:, 0]], -1)[:, None]
    pts[:, 60:68] = inner + np.stack([np.zeros(n), person.mouth_y + dy[:, 0]], -1)[:, None]
    return pts


def keypoints_from_geometry(person: Identity, geo: Geometry, size: int) -> np.ndarray:
    """float32 [T, 134, 3]: (x, y) in pixels of a `size` x `size` frame, confidence 1 inside it, else 0."""
    n = geo.tilt.shape[0]
    xy = np.zeros((n, kp.NUM_KEYPOINTS, 2))
    face = geo.head_c[:, None] + _rot(geo.tilt, _face_local(person, geo))
    xy[:, kp.FACE] = face
    rx, ry = person.head_rx, person.head_ry
    # Eye centres move with the face features during a nod, the ears stay with the skull.
    local = np.zeros((n, 4, 2))
    local[:, :, 0] = [-person.eye_dx, person.eye_dx, -rx, rx]
    local[:, :, 1] = person.eye_y + 0.1 * ry * np.array([0, 0, 1, 1])
    local[:, :2, 1] += geo.feat_dy[:, None]
    eyes_ears = geo.head_c[:, None] + _rot(geo.tilt, local)
    body = xy[:, kp.BODY]
    body[:, 0] = face[:, 30]  # nose tip
    body[:, 1] = geo.torso_c
    body[:, 2], body[:, 3], body[:, 4] = geo.shoulders[:, 0], geo.elbows[:, 0], geo.wrists[:, 0]
    body[:, 5], body[:, 6], body[:, 7] = geo.shoulders[:, 1], geo.elbows[:, 1], geo.wrists[:, 1]
    # hips, knees, ankles: below the frame (confidence 0), kept for the layout
    for first, side in ((8, -1.0), (11, 1.0)):
        for j, depth in enumerate((0.75, 1.25, 1.7)):
            body[:, first + j] = geo.torso_c + np.array([side * 0.6 * person.shoulder_w, depth])
    body[:, 14:18] = eyes_ears
    xy[:, kp.BODY] = body
    xy[:, kp.FEET] = geo.torso_c[:, None] + np.array([0.0, 2.0])
    xy[:, kp.RIGHT_HAND] = _hand_points(geo.palms[:, 0], geo.hand_dir[:, 0], geo.wrists[:, 0], person.hand_r, 1.0)
    xy[:, kp.LEFT_HAND] = _hand_points(geo.palms[:, 1], geo.hand_dir[:, 1], geo.wrists[:, 1], person.hand_r, -1.0)
    pix = xy * size
    conf = ((pix[..., 0] >= 0) & (pix[..., 0] < size) & (pix[..., 1] >= 0) & (pix[..., 1] < size)).astype(np.float64)
    return np.concatenate([pix, conf[..., None]], -1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Rendering: anti-aliased coverage from signed distances, vectorised over frames
# ---------------------------------------------------------------------------------------------


class _Canvas:
    """Frames [T, S, S, 3] float32 and the painter's-algorithm primitives (all sizes in frame units)."""

    def __init__(self, background: np.ndarray, n_frames: int) -> None:
        self.size = background.shape[0]
        self.img = np.repeat(background[None], n_frames, axis=0)
        self.coords = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size

    def _region(self, centres: np.ndarray, extent: float) -> tuple[slice, slice] | None:
        s = self.size
        c = np.asarray(centres).reshape(-1, 2)
        r0, r1 = int(math.floor((c[:, 1].min() - extent) * s)) - 1, int(math.ceil((c[:, 1].max() + extent) * s)) + 1
        c0, c1 = int(math.floor((c[:, 0].min() - extent) * s)) - 1, int(math.ceil((c[:, 0].max() + extent) * s)) + 1
        r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, s), min(c1, s)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _local(self, rows: slice, cols: slice, centre: np.ndarray, theta: np.ndarray | None):
        """Coordinates of the region's pixel centres relative to `centre` [T, 2], rotated by -theta."""
        y = self.coords[rows][None, :, None] - centre[:, 1, None, None].astype(np.float32)
        x = self.coords[cols][None, None, :] - centre[:, 0, None, None].astype(np.float32)
        if theta is None:
            return x, y
        c = np.cos(theta).astype(np.float32)[:, None, None]
        s = np.sin(theta).astype(np.float32)[:, None, None]
        return c * x + s * y, -s * x + c * y

    def _alpha(self, dist: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - dist * self.size, 0.0, 1.0)

    def _paint(self, rows: slice, cols: slice, alpha: np.ndarray, colour: np.ndarray) -> None:
        region = self.img[:, rows, cols]
        region += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - region)

    def ellipse_alpha(self, rows, cols, centre, rx, ry, theta=None) -> np.ndarray:
        u, v = self._local(rows, cols, centre, theta)
        rx = np.broadcast_to(np.asarray(rx, dtype=np.float32), centre.shape[:1])[:, None, None]
        ry = np.maximum(np.broadcast_to(np.asarray(ry, dtype=np.float32), centre.shape[:1]), 1e-4)[:, None, None]
        g = (u / rx) ** 2 + (v / ry) ** 2 - 1.0
        grad = 2.0 * np.sqrt((u / rx**2) ** 2 + (v / ry**2) ** 2) + 1e-6
        alpha = self._alpha(g / grad)
        return alpha * np.clip(2.0 * ry * self.size, 0.0, 1.0)  # thin ellipses fade with their thickness

    def ellipse(self, centre, rx, ry, colour, theta=None, extent=None, alpha_scale=1.0) -> None:
        extent = float(np.max(np.maximum(rx, ry))) if extent is None else extent
        region = self._region(centre, extent)
        if region is None:
            return
        a = self.ellipse_alpha(*region, centre, rx, ry, theta)
        self._paint(*region, a * alpha_scale, colour)

    def capsule(self, p0: np.ndarray, p1: np.ndarray, radius: float, colour, alpha_scale=1.0) -> None:
        """A segment p0-p1 [T, 2] with round ends."""
        region = self._region(np.concatenate([p0, p1]), radius)
        if region is None:
            return
        rows, cols = region
        x, y = self._local(rows, cols, p0, None)
        d = (p1 - p0).astype(np.float32)
        dx, dy = d[:, 0, None, None], d[:, 1, None, None]
        h = np.clip((x * dx + y * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        dist = np.sqrt((x - h * dx) ** 2 + (y - h * dy) ** 2) - radius
        alpha = self._alpha(dist) * np.clip(2.0 * radius * self.size, 0.0, 1.0)
        self._paint(rows, cols, alpha * alpha_scale, colour)

    def rounded_box(self, centre: np.ndarray, half: tuple[float, float], radius: float, colour) -> None:
        region = self._region(centre, max(half) + radius)
        if region is None:
            return
        rows, cols = region
        x, y = self._local(rows, cols, centre, None)
        qx, qy = np.abs(x) - (half[0] - radius), np.abs(y) - (half[1] - radius)
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        dist = outside + np.minimum(np.maximum(qx, qy), 0) - radius
        self._paint(rows, cols, self._alpha(dist), colour)


def _background(person: Identity, size: int, brightness: float) -> np.ndarray:
    y = ((np.arange(size) + 0.5) / size)[:, None, None]
    x = ((np.arange(size) + 0.5) / size)[None, :, None]
    bg = person.bg_top * (1 - y) + person.bg_bottom * y + 0 * x
    bx, by = person.bg_blob_xy
    d = np.sqrt((x - bx) ** 2 + (y - by) ** 2) - person.bg_blob_r
    a = np.clip(0.5 - d * size, 0, 1)
    bg = bg + a * (person.bg_blob - bg)
    return np.clip(bg * brightness, 0, 1).astype(np.float32)


def render(person: Identity, geo: Geometry, size: int, brightness: float = 1.0) -> np.ndarray:
    """uint8 [T, size, size, 3] frames of the person in the pose sequence `geo`."""
    n = geo.tilt.shape[0]
    cv = _Canvas(_background(person, size, brightness), n)
    b = brightness
    skin, hair, clothes = person.skin * b, person.hair * b, person.clothes * b
    rx, ry = person.head_rx, person.head_ry
    theta = geo.tilt

    def at(local: np.ndarray) -> np.ndarray:  # head-local point(s) [2] or [T, 2] -> world [T, 2]
        return geo.head_c + _rot(theta, np.broadcast_to(local, (n, 2)))

    def feat(x: float, y: float) -> np.ndarray:  # a face feature, shifted down during nods
        return at(np.stack([np.full(n, x), y + geo.feat_dy], -1))

    # Long hair falls behind the head onto the shoulders.
    if person.hair_style == 1:
        cv.ellipse(at(np.array([0.0, 0.25 * ry])), 1.22 * rx, 1.2 * ry, hair, theta)
    # Torso, arms behind nothing: shoulders and chest as one rounded box.
    torso_half = (person.shoulder_w, 0.45)
    cv.rounded_box(geo.torso_c + np.array([0.0, torso_half[1] - 0.02]), torso_half, 0.09, clothes)
    neck_top = at(np.array([0.0, 0.6 * ry]))
    cv.capsule(neck_top, geo.torso_c - np.array([0.0, 0.01]), person.neck_w, skin * 0.88)
    if person.collar == 1:
        cv.ellipse(geo.torso_c + np.array([0.0, 0.01]), person.neck_w * 1.7, 0.035, person.clothes2 * b)
        cv.ellipse(geo.torso_c + np.array([0.0, 0.0]), person.neck_w * 1.05, 0.022, skin * 0.85)
    elif person.collar == 2:
        for side in (-1.0, 1.0):
            top = geo.torso_c + np.array([side * person.neck_w * 1.3, 0.0])
            cv.capsule(top, geo.torso_c + np.array([side * 0.02, 0.22]), 0.028, person.clothes2 * b)
    # Head: ears, face, hair.
    for side in (-1.0, 1.0):
        cv.ellipse(at(np.array([side * rx, person.eye_y + 0.1 * ry])), 0.2 * rx, 0.3 * ry, skin * 0.9, theta)
    cv.ellipse(geo.head_c, rx, ry, skin, theta)
    style = person.hair_style
    region = cv._region(geo.head_c, 1.5 * ry)
    if region is not None and style != 2:
        rows, cols = region
        cap_c = at(np.array([0.0, -0.12 * ry]))
        cap = cv.ellipse_alpha(rows, cols, cap_c, 1.08 * rx, 1.0 * ry, theta)
        u, v = cv._local(rows, cols, geo.head_c, theta)
        line = -0.42 * ry + (0.3 * u if style == 4 else 0.0)
        if style == 1:  # long hair frames the face: the hair line dips at the sides
            line = line + 1.2 * np.maximum(np.abs(u) - 0.78 * rx, 0) * ry / rx
        cap *= cv._alpha(v - line)
        cv._paint(rows, cols, cap, hair)
    if style == 2:  # a buzz cut: a thin translucent cap
        cv.ellipse(at(np.array([0.0, -0.45 * ry])), 0.95 * rx, 0.55 * ry, hair, theta, alpha_scale=0.45)
    if style == 3:  # a bun on top
        cv.ellipse(at(np.array([0.0, -1.05 * ry])), 0.38 * rx, 0.32 * ry, hair, theta)
    # Eyes: white, iris (inside the white), a lash line that darkens as the lid closes.
    for side in (-1.0, 1.0):
        c = feat(side * person.eye_dx, person.eye_y)
        reg = cv._region(c, person.eye_rx * 1.3)
        if reg is None:
            continue
        white = cv.ellipse_alpha(*reg, c, person.eye_rx, person.eye_ry * geo.eye_open, theta)
        cv._paint(*reg, white, np.array([0.96, 0.96, 0.94]) * b)
        iris = cv.ellipse_alpha(*reg, c, 0.62 * person.eye_ry, 0.62 * person.eye_ry, theta)
        cv._paint(*reg, iris * white, person.iris * b)
        lash = cv.ellipse_alpha(*reg, c, person.eye_rx, 0.22 * person.eye_ry, theta)
        cv._paint(*reg, lash * (1.0 - geo.eye_open)[:, None, None], skin * 0.45)
        brow_y = person.eye_y - 1.9 * person.eye_ry - 0.05 * ry * geo.brow
        b0 = at(np.stack([np.full(n, side * (person.eye_dx - 1.1 * person.eye_rx)), brow_y + geo.feat_dy], -1))
        b1 = at(np.stack([np.full(n, side * (person.eye_dx + 1.1 * person.eye_rx)), brow_y + geo.feat_dy], -1))
        cv.capsule(b0, b1, 0.022 * ry + 0.3 / size, hair * 0.8)
    nose_tip = person.eye_y + 0.55 * (person.mouth_y - person.eye_y)
    cv.ellipse(feat(0.0, nose_tip), 0.11 * rx, 0.13 * ry, skin * 0.8, theta, alpha_scale=0.8)
    # Mouth: lips, then the dark inner mouth whose height is the opening.
    open_half = 0.5 * person.mouth_open * ry * geo.mouth
    c = feat(0.0, person.mouth_y)
    cv.ellipse(c, person.mouth_w, open_half + 0.045 * ry, person.lips * b, theta, extent=person.mouth_w * 1.2)
    cv.ellipse(c, 0.8 * person.mouth_w, open_half, np.array([0.18, 0.05, 0.07]) * b, theta, extent=person.mouth_w)
    # Arms and hands, in front of the body.
    for h in (0, 1):
        cv.capsule(geo.shoulders[:, h], geo.elbows[:, h], 0.05, clothes * 0.92)
        cv.capsule(geo.elbows[:, h], geo.wrists[:, h], 0.04, clothes * 0.92)
        cv.ellipse(geo.palms[:, h], person.hand_r, person.hand_r, skin)
    kpts = keypoints_from_geometry(person, geo, 1)  # fingers from the same points as the keypoints
    for sl in (kp.RIGHT_HAND, kp.LEFT_HAND):
        hand = kpts[:, sl, :2].astype(np.float64)
        for f in range(5):
            cv.capsule(hand[:, 1 + 4 * f], hand[:, 4 + 4 * f], 0.28 * person.hand_r, skin)
    return np.round(np.clip(cv.img, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Clips and the dataset
# ---------------------------------------------------------------------------------------------


def clip_key(split: str, seed: int, index: int) -> str:
    return f"{split}-{seed}-{index:06d}"


def make_clip(
    seed: int,
    split: str,
    index: int,
    size: int = 64,
    seconds: float = 4.0,
    clips_per_identity: int = 4,
    partner_reactions: bool = True,
) -> Clip:
    """Clip number `index` of a split: deterministic for (seed, split, index, size, seconds).

    partner_reactions=False: the same clip with the partner muted: their audio silent and the listener's reactions
    to them left out (`sample_motion`), everything else drawn identically.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    n_frames = int(round(seconds * FPS))
    if n_frames < 1:
        raise ValueError(f"seconds must give at least one frame at {FPS} fps, got {seconds}")
    return _make_clip(seed, split, index, index // clips_per_identity, size, n_frames, partner_reactions)


def _make_clip(
    seed: int, split: str, index: int, identity: int, size: int, n_frames: int, partner_reactions: bool
) -> Clip:
    person = sample_identity(f"synth-{split}-{seed}-{identity:05d}", identity_rng(seed, split, identity))
    rng = np.random.default_rng([seed, SPLITS[split], 2, index])
    partner = sample_identity("partner", rng)
    n_samples = n_frames * SAMPLES_PER_FRAME
    self_phrases, other_phrases = sample_conversation(n_frames / FPS, rng)
    audio_self, env_self = synthesize_speech(self_phrases, person, n_samples, rng)
    audio_other, env_other = synthesize_speech(other_phrases, partner, n_samples, rng)
    motion = sample_motion(person, self_phrases, other_phrases, env_self, env_other, n_frames, rng, partner_reactions)
    if not partner_reactions:
        audio_other = np.zeros_like(audio_other)
    shift = (rng.uniform(-0.025, 0.025), rng.uniform(-0.02, 0.02))  # the camera framing varies per clip
    geo = make_geometry(person, motion, shift)
    brightness = float(rng.uniform(0.9, 1.08))
    video = render(person, geo, size, brightness)
    kpts = keypoints_from_geometry(person, geo, size)
    mask = phrase_mask(self_phrases, n_frames)
    meta = {
        "identity": person.name,
        "source": "synthetic",
        "split": split,
        "seed": seed,
        "clip_index": index,
        "keypoints": kp.LAYOUT_NAME,
        "speaking_ratio": float(mask.mean()),
        "brightness": round(float(brightness), 6),
        "self_f0_hz": round(person.f0, 2),
        "other_f0_hz": round(partner.f0, 2),
        "generator": GENERATOR,
    }
    if not partner_reactions:
        meta["partner"] = "muted (no audio, no reactions)"
    return Clip(
        key=clip_key(split, seed, index),
        video=video,
        audio_self=audio_self,
        audio_other=audio_other,
        mask=mask,
        meta=meta,
        kpts=kpts,
    )


def remake_clip(meta: dict[str, Any], n_frames: int, size: int, partner_reactions: bool = True) -> Clip:
    """A synthetic clip rebuilt from its shard metadata (`make_clip`'s meta: seed, split, clip index, identity name),
    `n_frames` long at `size`; partner_reactions=False gives its muted-partner counterfactual. Raises ValueError
    naming the field for a clip this generator did not make."""
    if meta.get("source") != "synthetic" or meta.get("generator") != GENERATOR:
        source, generator = meta.get("source"), meta.get("generator")
        raise ValueError(f"not a clip of {GENERATOR} (source {source!r}, generator {generator!r})")
    try:
        seed, split, index = int(meta["seed"]), str(meta["split"]), int(meta["clip_index"])
        identity = int(str(meta["identity"]).rsplit("-", 1)[1])
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"synthetic clip metadata lacks seed / split / clip_index / identity: {e!r}") from None
    if split not in SPLITS:
        raise ValueError(f"synthetic clip metadata: split must be one of {sorted(SPLITS)}, got {split!r}")
    return _make_clip(seed, split, index, identity, size, n_frames, partner_reactions)


def _write_synthetic_shard(job: dict[str, Any]) -> dict[str, Any]:
    samples = (
        clip_to_sample(
            make_clip(job["seed"], job["split"], i, job["size"], job["seconds"], job["clips_per_identity"]), job["crf"]
        )
        for i in range(job["start"], job["stop"])
    )
    return write_shard(job["path"], samples)


def synthesize(
    out: str | os.PathLike,
    clips: int,
    val_clips: int = 0,
    size: int = 64,
    seconds: float = 4.0,
    seed: int = 0,
    clips_per_identity: int = 4,
    shard_samples: int = 8,
    workers: int | None = None,
    crf: int = 20,
    log: bool = False,
) -> dict[str, Any]:
    """Write the synthetic world: `out/train/` (and `out/val/` with other identities), with indexes.

    Each shard is rendered by one worker process. Returns {split: index}.
    """
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    if val_clips < 0:
        raise ValueError(f"val_clips must be >= 0, got {val_clips}")
    if shard_samples < 1:
        raise ValueError(f"shard_samples must be >= 1, got {shard_samples}")
    if clips_per_identity < 1:
        raise ValueError(f"clips_per_identity must be >= 1, got {clips_per_identity}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    workers = max(1, workers if workers is not None else min(os.cpu_count() or 1, 8))
    out = Path(out)
    jobs, splits = [], {"train": clips, "val": val_clips}
    for split, count in splits.items():
        if count == 0:
            continue
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        # drop an earlier synthetic run's shards (only ours, by name), so none outlives the new index
        for old in list(folder.glob(f"{split}-[0-9]*.tar")) + list(folder.glob("index.json")):
            old.unlink()
        for s, start in enumerate(range(0, count, shard_samples)):
            jobs.append(
                {
                    "split": split,
                    "seed": seed,
                    "start": start,
                    "stop": min(start + shard_samples, count),
                    "size": size,
                    "seconds": seconds,
                    "clips_per_identity": clips_per_identity,
                    "crf": crf,
                    "path": str(folder / f"{split}-{s:06d}.tar"),
                }
            )
    start_time = time.perf_counter()
    if workers == 1:
        results = [_write_synthetic_shard(j) for j in jobs]
    else:
        import multiprocessing

        # fork where available: no `if __name__ == "__main__"` guard needed in callers' scripts, and
        # the workers use only numpy / scipy / PyAV.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            results = list(pool.map(_write_synthetic_shard, jobs))
    elapsed = time.perf_counter() - start_time
    indexes = {}
    for split, count in splits.items():
        if count == 0:
            continue
        entries = [r for j, r in zip(jobs, results, strict=True) if j["split"] == split]
        identities = [f"synth-{split}-{seed}-{i:05d}" for i in range(math.ceil(count / clips_per_identity))]
        indexes[split] = write_index(
            out / split,
            entries,
            keypoints=kp.LAYOUT_NAME,
            source="synthetic",
            created_by=(
                f"dystream data synth --clips {clips} --val-clips {val_clips} --size {size} "
                f"--seconds {seconds} --seed {seed} --clips-per-identity {clips_per_identity}"
            ),
            identities=identities,
        )
    if log:
        total = clips + val_clips
        print(
            f"synthesized {total} clips ({total * seconds / 3600:.3f} h of {size}x{size} video) in "
            f"{elapsed:.1f} s with {workers} worker(s) -> {out}"
        )
    return indexes


def fingerprint(clip: Clip) -> int:
    """A checksum over every array of a clip (determinism tests)."""
    crc = 0
    for a in (clip.video, clip.audio_self, clip.audio_other, clip.mask, clip.kpts):
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return zlib.crc32(json.dumps(clip.meta, sort_keys=True).encode(), crc)
