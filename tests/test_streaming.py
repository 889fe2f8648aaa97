"""StreamingAvatar: packet-size invariance, parity with student_rollout and one-shot VAE decoding, bounded VAD
look-ahead, exact frame counts, constant cache over a long stream, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dystream.diffusion.rollout import student_rollout
from dystream.models.audio import AudioEncoder, AudioEncoderConfig
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.streaming import StreamingAvatar
from dystream.streaming.avatar import SAMPLES_PER_FRAME, StreamingConfig, prepare_reference
from dystream.zoo.files import load_model, save_model

SIZE = 32  # 4x4 latents: every mechanism at a fraction of the 64x64 cost


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: at these sizes a pool only adds synchronisation, which on a loaded shared machine
    costs more than the work (measured: 20x slower with 2 threads at load 10 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _exports(root, **dit_overrides):
    """Tiny networks written and read back as stage exports, DiT weights perturbed so that every path matters."""
    torch.manual_seed(0)
    dit = AvatarDiT(DiTConfig.from_preset("tiny", **dit_overrides))
    with torch.no_grad():  # Wan's init zeroes the head and the audio outputs
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_model(dit, root / "student.safetensors", arch="dit", extra={"student_sigmas": [1.0, 0.9, 0.7]})
    save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), root / "vae.safetensors", arch="vae")
    save_model(AudioEncoder("tiny"), root / "audio.safetensors", arch="audio")
    return (
        load_model(root / "student.safetensors", "dit"),
        load_model(root / "vae.safetensors", "vae"),
        load_model(root / "audio.safetensors", "audio"),
    )


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return _exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def nets_lookbehind(tmp_path_factory):
    """A student whose latent frames also hear 6 past video frames: each chunk reads the previous chunk's audio."""
    return _exports(tmp_path_factory.mktemp("exports_lookbehind"), audio_lookbehind_frames=6)


def energy_mask(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """A cheap stand-in for silero-vad: 1 where a frame's RMS exceeds a threshold."""
    audio = np.pad(audio, (0, max(0, n_frames * SAMPLES_PER_FRAME - audio.shape[0])))
    rms = np.sqrt((audio[: n_frames * SAMPLES_PER_FRAME].reshape(n_frames, -1) ** 2).mean(1))
    return (rms > 0.08).astype(np.float32)


def _reference(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)


def _audio(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    gate = np.repeat(rng.random(n // 3200 + 1) > 0.5, 3200)[:n]  # 0.2 s on/off: the mask changes
    own = (rng.standard_normal(n) * 0.2 * gate).astype(np.float32)
    return own, (rng.standard_normal(n) * 0.1 * ~gate).astype(np.float32)


def _session(nets, **kw) -> StreamingAvatar:
    kw.setdefault("size", SIZE)
    kw.setdefault("mask_fn", energy_mask)
    return StreamingAvatar(*nets, _reference(), **kw)


def _run(session: StreamingAvatar, own, other, sizes=None, mask=None) -> list[np.ndarray]:
    frames, start = [], 0
    for size in sizes or [own.shape[0]]:
        m = None if mask is None else mask[start : start + size]
        frames += session.push(own[start : start + size], other[start : start + size], mask=m)
        start += size
    assert start == own.shape[0]
    return frames + session.flush()


def _random_sizes(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.choice([0, 1, 17, 320, 641, 1999, 7000])))
    sizes[-1] -= sum(sizes) - n
    return sizes


def test_random_packet_sizes_give_the_same_frames_as_one_push(nets):
    own, other = _audio(1.3)  # 32.5 frames -> 33 frames, 3 chunks, the last one partial
    whole = _run(_session(nets), own, other)
    packets = _run(_session(nets), own, other, _random_sizes(own.shape[0], 1))
    inline = _run(_session(nets, threaded=False), own, other, _random_sizes(own.shape[0], 2))
    assert len(whole) == math.ceil(own.shape[0] / 640) == 33
    assert whole[0].shape == (SIZE, SIZE, 3) and whole[0].dtype == np.uint8
    for a, b, c in zip(whole, packets, inline, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)  # the decoder thread computes what the caller's thread computes
    other_seed = _run(_session(nets, seed=1), own, other)
    assert any((a != b).any() for a, b in zip(whole, other_seed, strict=True))


def test_int16_and_tensor_input_equal_float32(nets):
    own, other = _audio(0.6, seed=3)
    own16 = (own * 32767).astype(np.int16)
    a = _run(_session(nets), own16.astype(np.float32) / 32768.0, other)
    b = _run(_session(nets), own16, torch.from_numpy(other))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("which", ["nets", "nets_lookbehind"])
def test_latents_equal_student_rollout_and_frames_equal_one_shot_decode(which, request):
    nets = request.getfixturevalue(which)
    dit, vae, audio = nets
    own, other = _audio(1.5, seed=4)
    session = _session(nets, record=True, seed=7, threaded=False)
    frames = _run(session, own, other, _random_sizes(own.shape[0], 5))
    rec = session.recorded()
    chunks = (rec["latents"].shape[2] - 1) // dit.config.chunk_frames
    assert chunks == math.ceil(len(frames) / 12) == 4
    # the sigmas come from the export's metadata
    assert session.sigmas.tolist() == [1.0, 0.9, 0.7]
    pad = 12 * chunks - rec["talk"].shape[1]  # past the end of the audio: zero features ("no audio")
    talk, listen = (torch.nn.functional.pad(rec[k], (0, 0, 0, pad)) for k in ("talk", "listen"))
    with torch.no_grad():
        ref = student_rollout(
            dit,
            rec["latents"][:, :, :1],
            chunks,
            session.sigmas,
            talk,
            listen,
            cache_write="noisy",
            generator=torch.Generator().manual_seed(7),
        ).latents
        torch.testing.assert_close(rec["latents"], ref, atol=1e-5, rtol=1e-5)
        # the streaming decode (one latent frame per call, on its feature cache) equals the one-shot decode
        video = vae.decode(rec["latents"], session.reference[:, None])[0, :, 1 : 1 + len(frames)]
    expected = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    diff = np.abs(np.stack(frames).astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # causal-conv chunking: float rounding only


def test_features_and_mask_follow_the_documented_blocks(nets):
    """Independent computation of the routed features: block j = frames [4Cj + L, 4C(j + 1) + L) (block 0 from
    0), Wav2Vec2 over the block plus audio_context_frames before, the mask per sample averaged per frame."""
    dit, _, audio = nets
    own, other = _audio(1.1, seed=6)
    n = own.shape[0]
    per_sample = (np.arange(n) // 4000 % 2).astype(np.float32)  # the caller's mask, per sample
    session = _session(nets, record=True, audio_context_frames=7)
    _run(session, own, other, _random_sizes(n, 7), mask=per_sample)
    rec = session.recorded()
    t = math.ceil(n / 640)
    wave = torch.from_numpy(np.stack([np.pad(own, (0, t * 640 - n)), np.pad(other, (0, t * 640 - n))]))
    mask_pad = np.pad(per_sample, (0, t * 640 - n), mode="edge")
    bounds = [0] + list(range(12 + dit.config.audio_lookahead_frames, t, 12)) + [t]
    talk, listen, masks = [], [], []
    with torch.no_grad():
        for s, e in zip(bounds, bounds[1:], strict=False):
            ws = max(s - 7, 0)
            feats = audio.encode_window(wave, ws, e)[:, s - ws :]
            m = torch.from_numpy((mask_pad[s * 640 : e * 640].reshape(-1, 640).mean(1) >= 0.5).astype(np.float32))
            talk.append(feats[:1] * m[None, :, None])
            listen.append(feats[1:] * (1 - m)[None, :, None])
            masks.append(m[None])
    torch.testing.assert_close(rec["talk"], torch.cat(talk, 1))
    torch.testing.assert_close(rec["listen"], torch.cat(listen, 1))
    torch.testing.assert_close(rec["mask"], torch.cat(masks, 1))


def test_silero_mask_depends_only_on_bounded_lookahead(nets):
    """The default mask (silero-vad): packet sizes do not matter, and changing the audio after sample X changes
    no mask of a block that ends (with its VAD look-ahead) before X."""
    from dystream.datamodules.synthetic import sample_conversation, sample_identity, synthesize_speech

    rng = np.random.default_rng(0)
    phrases, _ = sample_conversation(3.0, rng)
    speech, _ = synthesize_speech(phrases, sample_identity("a", rng), 48000, rng)
    silence = np.zeros_like(speech)
    cut = 30 * 640  # change everything from frame 30 on
    changed = speech.copy()
    changed[cut:] = np.random.default_rng(1).standard_normal(48000 - cut).astype(np.float32) * 0.3
    runs = {}
    for name, audio, sizes in (("a", speech, None), ("b", speech, _random_sizes(48000, 3)), ("c", changed, None)):
        session = StreamingAvatar(*nets, _reference(), size=SIZE, record=True, vad_lookahead_frames=2)
        _run(session, audio, silence, sizes)
        runs[name] = session.recorded()["mask"][0]
    assert 0 < runs["a"].sum() < runs["a"].numel()  # silero found speech and silence
    torch.testing.assert_close(runs["a"], runs["b"])
    # blocks ending at 14, 26, 38 (4C = 12, L = 2); with 2 frames of VAD look-ahead blocks ending at <= 28 are safe
    torch.testing.assert_close(runs["a"][:26], runs["c"][:26])
    # importing silero_vad calls torch.set_num_threads(1); the session restores the caller's setting
    torch.set_num_threads(2)
    StreamingAvatar(*nets, _reference(), size=SIZE).close()
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


@pytest.mark.parametrize("samples", [0, 1, 640, 641, 12 * 640, 12 * 640 + 1])
def test_flush_returns_exactly_the_frames_the_audio_covers(nets, samples):
    own = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1
    frames = _run(_session(nets), own, np.zeros_like(own)) if samples else _session(nets).flush()
    assert len(frames) == math.ceil(samples / 640)


def test_long_stream_keeps_cache_and_rope_indices_constant(nets):
    """60 s of audio (125 chunks): after the window fills, the KV cache holds sink + window = 10 frames of the
    same byte size, and every chunk sees reference 0, first chunk 1-3, window 4-9, itself 10-12 (RAPR).
    One denoising step and no audio context keep it fast; the cache does not depend on either."""
    session = _session(nets, threaded=False, sigmas=(1.0,), audio_context_frames=0)
    rng = np.random.default_rng(0)
    chunk = 12 * 640
    sizes, layouts = [], []
    for _ in range(125):
        packet = (rng.standard_normal(chunk) * 0.1).astype(np.float32)
        session.push(packet, mask=1.0)
        sizes.append(session.cache.nbytes())
        layouts.append((list(session.cache.last_key_positions), list(session.cache.frame_ids)))
    session.flush()
    # push k completes chunk k - 2 (a chunk waits for its 2 look-ahead frames): 1, 4, 7, then 10 frames cached
    per_frame = sizes[0]
    assert sizes[:3] == [per_frame, 4 * per_frame, 7 * per_frame]
    assert sizes[3:] == [10 * per_frame] * (len(sizes) - 3)
    for positions, frames in layouts[4:]:  # chunks 3, 4, ...: the window is full
        assert positions == list(range(13))
        assert frames[:4] == [0, 1, 2, 3] and frames[4:] == list(range(frames[4], frames[4] + 6))
    assert session.cache.max_rope_index == 12
    stats = session.stats()
    assert stats["chunks"] == 125 and stats["kv_cache_frames"] == 10


def test_stats_report_rtf_and_first_frame_delay(nets):
    own, other = _audio(1.0)
    session = _session(nets)
    _run(session, own, other, [640] * 25)
    stats = session.stats()
    for key in ("rtf_dit", "rtf_vae", "rtf_audio", "ffd_dit_s", "ffd_vae_s", "first_frame_delay_s", "latency_s"):
        assert stats[key] is not None and stats[key] > 0, key
    assert stats["frames"] == 25 and stats["chunks"] == 3
    assert stats["algorithmic_latency_s"] == pytest.approx((12 + 2) / 25 + 40 / 16000)
    assert stats["latency_s"] > stats["first_frame_delay_s"] >= stats["ffd_dit_s"]
    assert len(stats["chunk_dit_s"]) == len(stats["chunk_latency_s"]) == 3


def test_reference_is_cropped_and_resized():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre square is white, the sides black
    out = prepare_reference(img, (16, 16), multiple=16)
    assert out.shape == (1, 3, 16, 16)
    assert float(out.min()) > 0.99  # only the centred 40x40 square remains
    native = prepare_reference(torch.zeros(3, 37, 50), None, multiple=16)
    assert native.shape == (1, 3, 32, 48)


def test_bad_input_gives_clear_errors(nets):
    session = _session(nets)
    with pytest.raises(ValueError, match="audio_other has 10 samples, audio_self 20"):
        session.push(np.zeros(20, np.float32), np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="mono samples"):
        session.push(np.zeros((2, 20), np.float32))
    with pytest.raises(ValueError, match="float32 in \\[-1, 1\\] or int16"):
        session.push(np.zeros(20, np.int32))
    session.push(np.zeros(20, np.float32))
    with pytest.raises(ValueError, match="mask with every push or with none"):
        session.push(np.zeros(20, np.float32), mask=1)
    session.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        session.push(np.zeros(20, np.float32))
    with pytest.raises(ValueError, match="uint8 image must be \\[H, W, 3\\]"):
        StreamingAvatar(*nets, np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        StreamingAvatar(*nets, _reference(), size=20)
    with pytest.raises(TypeError, match="unknown option"):
        StreamingAvatar(*nets, _reference(), chunk=3)
    with pytest.raises(ValueError, match="StreamingConfig.sigmas"):
        StreamingConfig(sigmas=(0.5, 0.9))
    dit, vae, _ = nets
    with pytest.raises(ValueError, match="audio_dim 32, the audio encoder gives 64"):
        StreamingAvatar(
            dit, vae, AudioEncoder(AudioEncoderConfig.from_name("tiny", layer_combine="concat")), _reference()
        )
