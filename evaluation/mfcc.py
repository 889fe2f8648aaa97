"""MFCC exactly as `python_speech_features.mfcc` computes it (the SyncNet / TalkNet audio input), in numpy/scipy.

python_speech_features is a pure-Python sdist and not a dependency, so its algorithm is re-implemented here with
its defaults (notes/metrics.md §3.1):

1. pre-emphasis y[0] = x[0], y[n] = x[n] - 0.97 x[n-1];
2. framing: 25 ms frames (400 samples) every 10 ms (160 samples), i.e. 100 Hz; the signal is zero-padded so that
   numframes = 1 + ceil((N - 400) / 160) (1 if N <= 400); rectangular window (the library's default `winfunc` is
   ones, no Hamming);
3. power spectrum |rfft(frame, 512)|^2 / 512; frame energy = its sum (eps where 0);
4. 26 triangular mel filters between 0 Hz and fs/2, on fft bins floor((nfft + 1) * mel2hz(m) / fs), mel = 2595
   log10(1 + f / 700); filterbank energies (eps where 0), natural log;
5. DCT-II, orthonormal, first 13 coefficients; lifter c_n *= 1 + (22 / 2) sin(pi n / 22);
6. appendEnergy: c_0 replaced by log(frame energy).

SyncNet reads 16 kHz int16 wav files with scipy and feeds the int16 values unscaled, so the scale matters (it shifts
c_0 and every log energy): pass int16-range samples (float audio in [-1, 1] times 32768).
"""

from __future__ import annotations

import decimal
import math

import numpy as np
from scipy.fft import dct

__all__ = ["fbank", "mel_filterbank", "mfcc", "mfcc_pcm16", "num_mfcc_frames"]


def _round_half_up(x: float) -> int:
    # the library rounds frame lengths with decimal ROUND_HALF_UP; 0.025 * 16000 is 400.00000000000006 in floats
    return int(decimal.Decimal(x).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


def num_mfcc_frames(n_samples: int, samplerate: int = 16000, winlen: float = 0.025, winstep: float = 0.01) -> int:
    """Number of MFCC frames python_speech_features returns for `n_samples` samples (4T - 1 for T video frames)."""
    frame_len = _round_half_up(winlen * samplerate)
    frame_step = _round_half_up(winstep * samplerate)
    if n_samples <= frame_len:
        return 1
    return 1 + math.ceil((n_samples - frame_len) / frame_step)


def _hz2mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel2hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mel_filterbank(
    nfilt: int = 26, nfft: int = 512, samplerate: int = 16000, lowfreq: float = 0.0, highfreq: float | None = None
) -> np.ndarray:
    """Triangular mel filters [nfilt, nfft // 2 + 1] on python_speech_features' integer fft-bin grid."""
    highfreq = highfreq or samplerate / 2
    if highfreq > samplerate / 2:
        raise ValueError(f"mel_filterbank: highfreq {highfreq} exceeds samplerate / 2 = {samplerate / 2}")
    mels = np.linspace(_hz2mel(lowfreq), _hz2mel(highfreq), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel2hz(mels) / samplerate)
    k = np.arange(nfft // 2 + 1, dtype=np.float64)[None, :]
    left, centre, right = bins[:-2, None], bins[1:-1, None], bins[2:, None]
    # rising edge on [left, centre), falling edge on [centre, right), zero elsewhere (half-open, as the library loops)
    rising = np.where((k >= left) & (k < centre), (k - left) / np.maximum(centre - left, 1e-300), 0.0)
    falling = np.where((k >= centre) & (k < right), (right - k) / np.maximum(right - centre, 1e-300), 0.0)
    return rising + falling


def fbank(
    signal: np.ndarray,
    samplerate: int = 16000,
    winlen: float = 0.025,
    winstep: float = 0.01,
    nfilt: int = 26,
    nfft: int = 512,
    preemph: float = 0.97,
) -> tuple[np.ndarray, np.ndarray]:
    """Mel filterbank energies [numframes, nfilt] and total frame energies [numframes] (steps 1-4, before the log)."""
    x = np.asarray(signal)
    if x.ndim != 1:
        raise ValueError(f"mfcc: expected a mono signal [N], got shape {x.shape}")
    if x.size == 0:
        raise ValueError("mfcc: empty signal")
    x = x.astype(np.float64)
    x = np.append(x[0], x[1:] - preemph * x[:-1])

    frame_len = _round_half_up(winlen * samplerate)
    frame_step = _round_half_up(winstep * samplerate)
    n = num_mfcc_frames(x.size, samplerate, winlen, winstep)
    padded = np.zeros((n - 1) * frame_step + frame_len)
    padded[: x.size] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_len)[::frame_step][:n]  # [n, frame_len]
    if frame_len > nfft:  # the library truncates (with a warning); keep that behaviour explicit
        frames = frames[:, :nfft]

    pspec = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft  # [n, nfft // 2 + 1]
    eps = np.finfo(np.float64).eps
    energy = pspec.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)
    feat = pspec @ mel_filterbank(nfilt, nfft, samplerate).T
    feat = np.where(feat == 0, eps, feat)
    return feat, energy


def mfcc(
    signal: np.ndarray,
    samplerate: int = 16000,
    winlen: float = 0.025,
    winstep: float = 0.01,
    numcep: int = 13,
    nfilt: int = 26,
    nfft: int = 512,
    preemph: float = 0.97,
    ceplifter: int = 22,
    append_energy: bool = True,
) -> np.ndarray:
    """MFCC [numframes, numcep] (float64) of a mono signal, python_speech_features defaults."""
    feat, energy = fbank(signal, samplerate, winlen, winstep, nfilt, nfft, preemph)
    cep = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :numcep]
    if ceplifter > 0:
        cep = cep * (1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter))
    if append_energy:
        cep[:, 0] = np.log(energy)
    return cep


def mfcc_pcm16(audio: np.ndarray, samplerate: int = 16000) -> np.ndarray:
    """MFCC [numframes, 13] of audio on the scale the reference tools (SyncNet, TalkNet, Light-ASD) read from 16-bit
    wav files: float audio in [-1, 1] is scaled to the int16 range (x 32768), integer samples are taken as they are."""
    a = np.asarray(audio)
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64) * 32768.0
    return mfcc(a, samplerate=samplerate)
