"""Chunked / streaming audio features against full-utterance features.

Streaming computes each chunk of video frames from a window of past context + the chunk + a bounded
look-ahead, so it cannot equal the full-utterance features exactly: the window's waveform
normalisation, the first conv layer's GroupNorm (over time) and the Wav2Vec2 self-attention all see
a shorter signal. With random weights (near-uniform attention) the gap is a pessimistic bound; the
tests print it, check it shrinks with context, and that a window covering the utterance is exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from dystream.models.audio import AudioEncoder, StreamingAudioEncoder, encode_chunked

SPF = 640


def speech_like(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Syllable-rate (4 Hz) bursts of a harmonic voice plus noise, with pauses: not stationary."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * SPF) / 16000
    f0 = 120 + 40 * torch.rand(batch, 1, generator=g)
    voice = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6))
    env = torch.clamp(torch.sin(2 * math.pi * 4 * t + torch.rand(batch, 1, generator=g) * 6), min=0)
    pause = (torch.sin(2 * math.pi * 0.7 * t) > -0.5).float()
    return (voice + 0.1 * torch.randn(batch, frames * SPF, generator=g)) * env * pause


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return AudioEncoder("tiny")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_chunked_close_to_full_and_improves_with_context(encoder):
    frames, chunk, lookahead = 72, 12, 2  # 2.88 s; chunks of 12 frames = 3 latent frames = 0.48 s
    wave = speech_like(2, frames)
    with torch.no_grad():
        full = encoder(wave)
        errs = {ctx: rel_err(encode_chunked(encoder, wave, chunk, lookahead, ctx), full) for ctx in (0, 12, 24, 48)}
        no_lookahead = rel_err(encode_chunked(encoder, wave, chunk, 0, 48), full)
        everything = encode_chunked(encoder, wave, chunk, frames, frames)
    print(f"\nchunked vs full relative error (tiny, random weights), chunk {chunk}, look-ahead {lookahead}:")
    for ctx, e in errs.items():
        print(f"  context {ctx:3d} frames ({ctx / 25:.2f} s): {e:.4f}")
    print(f"  context 48, no look-ahead: {no_lookahead:.4f}")
    values = list(errs.values())
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), errs  # more context, closer
    assert errs[48] < no_lookahead  # look-ahead helps too
    assert values[-1] < 0.35  # bounded even for random weights (see module docstring)
    torch.testing.assert_close(everything, full, rtol=0, atol=1e-6)  # a full window is the offline path


def test_streaming_equals_chunked_for_any_packet_sizes(encoder):
    frames = 40
    wave = speech_like(2, frames, seed=1)[:, : frames * SPF - 123]  # ends mid-frame
    stream = StreamingAudioEncoder(encoder, chunk_frames=12, lookahead_frames=2, context_frames=10)
    g = torch.Generator().manual_seed(0)
    outs, i, emitted = [], 0, []
    with torch.no_grad():
        while i < wave.shape[1]:
            n = int(torch.randint(1, 4000, (1,), generator=g))
            out = stream.push(wave[:, i : i + n])
            i += n
            # a chunk is only emitted once its look-ahead has arrived
            assert stream.frames_emitted * SPF + stream.latency_samples <= i or stream.frames_emitted == 0
            outs.append(out)
            emitted.append(out.shape[1])
        outs.append(stream.flush())
        padded = torch.nn.functional.pad(wave, (0, frames * SPF - wave.shape[1]))  # flush completes with silence
        offline = encode_chunked(encoder, padded, 12, 2, 10)
    streamed = torch.cat(outs, dim=1)
    assert streamed.shape == (2, frames, encoder.feature_dim)
    assert all(n % 12 == 0 for n in emitted)  # whole chunks until the flush
    torch.testing.assert_close(streamed, offline, rtol=0, atol=1e-6)
    # the buffer keeps only the context window, not the whole stream
    assert stream._buf.shape[1] <= (10 + 12 + 2 + 1) * SPF + 80
    with pytest.raises(RuntimeError, match="flushed"):
        stream.push(wave[:, :SPF])
    stream.reset()
    with torch.no_grad():
        again = torch.cat([stream.push(padded), stream.flush()], dim=1)
    torch.testing.assert_close(again, offline, rtol=0, atol=1e-6)


def test_streaming_rejects_bad_settings(encoder):
    with pytest.raises(ValueError, match="chunk_frames"):
        StreamingAudioEncoder(encoder, chunk_frames=0)
    with pytest.raises(ValueError, match="lookahead_frames"):
        encode_chunked(encoder, torch.randn(1, 4 * SPF), 2, -1, 0)
    with pytest.raises(RuntimeError, match="nothing was pushed"):
        StreamingAudioEncoder(encoder, chunk_frames=4).flush()
