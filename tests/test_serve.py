"""`dystream serve` through a Python aiortc client on loopback: isolated concurrent calls, the three own-voice
sources and their alignment, every refusal (bad SDP, token, origin, session limit, uploads, audio rates), vanished
peers and timeouts freeing their calls, and the real-time policy under a generator slower than real time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from serve_common import build_app, png_bytes, speech_like, wav_bytes, write_exports

from dystream.serving.app import CATALOG, REGISTRY, BadInput, decode_image, decode_wav
from dystream.serving.client import CallClient, CallError, b64
from dystream.serving.config import ServeConfig
from dystream.serving.local import LocalServer
from dystream.serving.session import LiveSession, SessionClosed, VoiceSource
from dystream.streaming.avatar import prepare_reference

TOKEN = "serve-test-token"
HOOKED: list[LiveSession] = []  # calls as the server's on_session hook saw them
TONE = (0.5 * np.sin(2 * np.pi * 300 * np.arange(48000) / 16000)).astype(np.float32)
FLAGS = ("--token", TOKEN, "--max-sessions", "2", "--idle-timeout", "1.5", "--ice-address", "127.0.0.1",
         "--max-image-bytes", "100000", "--max-voice-bytes", "400000")  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread per call: two calls share two cores with the rest of the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return write_exports(tmp_path_factory.mktemp("serve_exports"))


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    offered = tmp_path_factory.mktemp("offered")  # --references / --voices: files the page offers by name
    (offered / "face.png").write_bytes(png_bytes(36, 36, seed=4))
    (offered / "tone.wav").write_bytes(wav_bytes(TONE, 16000))
    app = build_app(exports, *FLAGS, "--references", str(offered), "--voices", str(offered), on_session=HOOKED.append)
    with LocalServer(app) as s:
        yield s
    assert s.app[REGISTRY].active == 0


def run(coro, timeout_s: float = 60):
    """Every scenario is bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def until_sent(call: CallClient, frames: int, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await call.stats()
        if stats["frames_sent"] >= frames:
            return stats
        if time.monotonic() > deadline or stats["state"] == "closed":
            raise AssertionError(f"the call sent {stats['frames_sent']} < {frames} frames: {stats}")
        await asyncio.sleep(0.1)


def _client(server) -> CallClient:
    return CallClient(server.url, token=TOKEN)


def test_two_calls_are_isolated_and_bad_requests_do_not_disturb_them(server):
    """Two calls run two avatars, each on its own reference; while both run, a third call is refused (503)
    and every bad request gets its own clear error; then a hang-up and a vanished peer both free their calls."""
    partner = speech_like(20.0)

    async def scenario():
        async with _client(server) as a, _client(server) as b, _client(server) as c:
            await asyncio.gather(
                a.start(partner, reference={"name": "synthetic-1"}),
                b.start(partner, reference={"data": b64(png_bytes(48, 40, seed=1))}),
            )
            assert server.app[REGISTRY].active == 2
            sa, sb = await asyncio.gather(until_sent(a, 15), until_sent(b, 15))
            for stats in (sa, sb):
                assert stats["state"] == "live" and stats["policy"] == "hold-last-frame-and-skip-ahead"
                assert stats["latency_s"]["median"] > stats["algorithmic_latency_s"]  # audio in -> frame out
                assert stats["rtf_dit"] is not None and stats["first_frame_delay_s"] is not None
            await until(lambda: len(a.frames) > 5 and len(b.frames) > 5, 5, "received frames")
            fa, fb = a.frames[-1][1], b.frames[-1][1]
            assert fa.shape == fb.shape == (32, 32, 3)
            # Each call streams its own avatar, conditioned on its own reference. (The frames of these random
            # weights change more over time than between references, so the pixels themselves cannot show it.)
            calls = {s.id: s for s in HOOKED}
            call_a, call_b = calls[a.session], calls[b.session]
            assert call_a.avatar is not call_b.avatar
            uploaded = decode_image(png_bytes(48, 40, seed=1), ServeConfig())
            sent = {call_a: server.app[CATALOG].reference("synthetic-1"), call_b: uploaded}
            for call, image in sent.items():
                expected = prepare_reference(image, (32, 32))
                torch.testing.assert_close(call.avatar.reference.float().cpu(), expected, atol=1e-3, rtol=0)
            assert (call_a.avatar.reference - call_b.avatar.reference).abs().mean() > 0.2

            with pytest.raises(CallError) as full:  # the limit: a clear refusal, before any work
                await c.start(partner, reference={"name": "synthetic-2"})
            assert full.value.status == 503 and "max_sessions" in full.value.message
            await c.close()
            await _bad_requests(server)

            before = len(a.frame_times), len(b.frame_times)
            await asyncio.sleep(1.0)
            assert len(a.frame_times) > before[0] + 10 and len(b.frame_times) > before[1] + 10, "calls kept running"
            assert (await a.stats())["state"] == (await b.stats())["state"] == "live"

            final = await a.stop()
            assert final["state"] == "closed" and final["reason"] == "hung up"
            assert server.app[REGISTRY].active == 1
            await b.vanish()  # no hang-up, no audio: the idle timeout (1.5 s) frees the call
            await until(lambda: server.app[REGISTRY].active == 0, 6, "the vanished call to be freed")
            final = await b.request("GET", f"/api/sessions/{b.session}")
            assert final["state"] == "closed" and final["reason"] == "idle" and "no audio" in final["error"]

    run(scenario())


async def _bad_requests(server) -> None:
    """Each bad input answered with its status and a message naming the problem."""
    import aiohttp

    url = server.url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    offer = {"sdp": "v=0\r\ngarbage\r\n", "type": "offer"}
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def post(body=None, headers=auth, data=None):
            async with http.post(url + "/api/offer", json=body, data=data, headers=headers) as r:
                return r.status, await r.json(content_type=None)

        status, body = await post(offer)
        assert status == 400 and "sdp" in body["error"]
        status, body = await post({"sdp": "not an sdp at all", "type": "offer"})
        assert status == 400 and "sdp" in body["error"]
        status, body = await post(offer, headers={"Authorization": "Bearer wrong-token"})
        assert status == 401 and "token" in body["error"]
        status, body = await post(offer, headers={})
        assert status == 401
        status, body = await post(offer, headers={**auth, "Origin": "http://evil.example"})
        assert status == 403 and "origin" in body["error"]
        status, body = await post(data=b"{not json", headers={**auth, "Content-Type": "application/json"})
        assert status == 400 and "JSON" in body["error"]
        # uploads: too large, wrong format, too many pixels, a refused sample rate
        sdp = await _real_offer_sdp()
        big = {"sdp": sdp, "type": "offer", "reference": {"data": b64(png_bytes(200, 200))}}
        status, body = await post(big)
        assert status == 413 and "max_image_bytes" in body["error"]
        status, body = await post(data=b"x" * 2_000_000, headers={**auth, "Content-Type": "application/json"})
        assert status == 413 and "too large" in body["error"]
        status, body = await post({**big, "reference": {"data": b64(b"GIF89a not an image")}})
        assert status == 400 and "PNG, JPEG or WebP" in body["error"]
        rate = {"sdp": sdp, "type": "offer", "voice": {"source": "wav", "data": b64(wav_bytes(np.zeros(1100), 11025))}}
        status, body = await post(rate)
        assert status == 400 and "11025" in body["error"]
        status, body = await post({"sdp": sdp, "type": "offer", "voice": {"source": "track"}})
        assert status == 400 and "second audio track" in body["error"]
        async with http.get(url + "/api/sessions/nope", headers=auth) as r:
            assert r.status == 404
    assert server.app[REGISTRY].reserved == 0


async def _real_offer_sdp() -> str:
    """A well-formed offer (one microphone track, video received), never answered."""
    from aiortc import RTCPeerConnection

    from dystream.serving.app import rtc_configuration
    from dystream.serving.client import ArrayAudioTrack

    pc = RTCPeerConnection(rtc_configuration(ServeConfig()))
    pc.addTrack(ArrayAudioTrack(np.zeros(320)))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def test_voice_sources_hook_wav_track_and_no_microphone(server):
    """The own voice from the push_self hook (with no client audio at all: the wall clock drives the call), from
    a wav the server offers (the upload is in the browser test), and from the client's second track; it comes
    back on the audio track, released with the frame it belongs to (av_offset_ms)."""
    tone = TONE
    hooked = HOOKED

    async def scenario():
        async with _client(server) as hook_call, _client(server) as wav_call:
            await hook_call.start(None, voice={"source": "hook"})  # no microphone: an agent-only call
            session = hooked[-1]
            assert session.id == hook_call.session and session.clock == "ticker"
            session.push_self((np.repeat(tone, 3) * 32767).astype(np.int16), sample_rate=48000)  # int16 at 48 kHz
            info = await wav_call.request("GET", "/api/info")
            assert "face.png" in info["references"] and info["voices"] == ["tone.wav"]
            await wav_call.start(
                speech_like(10.0), reference={"name": "face.png"}, voice={"source": "wav", "name": "tone.wav"}
            )
            for call in (hook_call, wav_call):
                stats = await until_sent(call, 20)
                assert stats["av_offset_ms"]["n"] > 5 and abs(stats["av_offset_ms"]["median"]) < 20
            await until(lambda: hook_call.audio_peak > 0.1 and wav_call.audio_peak > 0.1, 5, "the own voice")
            with pytest.raises(ValueError, match="max_hook_buffer_s"):
                session.push_self(np.zeros(16000 * 200, np.float32))
            await asyncio.gather(hook_call.stop(), wav_call.stop())
            with pytest.raises(SessionClosed):
                session.push_self(tone)
        async with _client(server) as track_call, _client(server) as silent_call:
            await track_call.start(speech_like(10.0), own=tone, voice={"source": "track"})
            await silent_call.start(speech_like(10.0, seed=3), voice={"source": "none"})
            stats = await until_sent(track_call, 20)
            assert stats["voice"] == "track" and stats["clock"] == "partner"
            await until_sent(silent_call, 20)
            await until(lambda: track_call.audio_peak > 0.1, 5, "the own voice from the second track")
            assert silent_call.audio_peak < 0.02, "no voice source: the avatar is silent"
            await track_call.stop()
            await silent_call.pc.close()  # the peer drops the connection without hanging up
            await until(lambda: server.app[REGISTRY].active == 0, 8, "the dropped call to be freed")
            final = await silent_call.request("GET", f"/api/sessions/{silent_call.session}")
            assert final["state"] == "closed" and final["reason"] == "peer left"
            await silent_call.close()

    run(scenario(), timeout_s=90)


def test_total_time_limit_closes_the_call(exports):
    app = build_app(exports, "--ice-address", "127.0.0.1", "--max-session-time", "1.5")
    with LocalServer(app) as server:

        async def scenario():
            async with CallClient(server.url) as call:
                await call.start(speech_like(6.0))
                await until(lambda: server.app[REGISTRY].active == 0, 6, "the time limit")
                final = await call.stats()
                assert final["reason"] == "time limit" and "max_session_s" in final["error"]

        run(scenario())


class _SlowAvatar:
    """Twice slower than real time: 80 ms of work per 40 ms unit, one frame per unit."""

    def __init__(self) -> None:
        self.closed = False

    def push(self, own, other):
        frames = own.shape[0] // 640
        time.sleep(0.08 * frames)
        return [np.full((8, 8, 3), 100, np.uint8)] * frames

    def stats(self):
        return {"rtf_dit": 2.0}

    def close(self):
        self.closed = True


def test_slower_than_real_time_holds_frames_skips_input_and_stays_bounded():
    config = ServeConfig(max_backlog_s=0.4, playout_delay_s=0.0)
    avatar = _SlowAvatar()

    async def scenario():
        session = LiveSession(avatar, VoiceSource("none"), config, np.zeros((8, 8, 3), np.uint8))
        session.start()  # no tracks: the wall-clock ticker feeds real-time audio
        backlog = []
        for _ in range(75):  # 3 s of video slots
            await session.video.recv()
            backlog.append(len(session._backlog))
        stats = session.stats()
        await session.close("done")
        return stats, backlog

    stats, backlog = run(scenario(), timeout_s=30)
    assert max(backlog) <= 10  # max_backlog_s * 25
    assert stats["input_skipped_frames"] > 0 and stats["frames_late"] > 0 and not stats["realtime"]
    assert stats["rtf"] > 1.2
    assert avatar.closed


def test_upload_decoders_check_limits_before_decoding():
    config = ServeConfig(max_image_side=64, max_voice_seconds=1.0)
    image = decode_image(png_bytes(40, 50, seed=2), config)
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    with pytest.raises(BadInput, match="max_image_side") as err:
        decode_image(png_bytes(80, 10), config)  # small file, too many pixels
    assert err.value.status == 413
    with pytest.raises(BadInput, match="cannot decode the png"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, config)  # a PNG signature, then garbage
    audio = decode_wav(wav_bytes(np.full(24000, 0.25), 48000), config)
    assert audio.shape == (8000,) and abs(float(audio[4000]) - 0.25) < 1e-3
    with pytest.raises(BadInput, match="max_voice_seconds"):
        decode_wav(wav_bytes(np.zeros(20000)), config)
    with pytest.raises(BadInput, match="not a PCM wav"):
        decode_wav(b"RIFF....WAVEjunk", config)


def test_exposed_address_needs_a_token_and_config_names_fields(capsys, monkeypatch):
    from dystream.cli import main

    monkeypatch.delenv("DYSTREAM_SERVE_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--checkpoint", "missing.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "--token" in err and "0.0.0.0" in err
    assert ServeConfig(host="0.0.0.0", token="long-enough-secret").host == "0.0.0.0"
    bad_values = [
        ({"max_sessions": 0}, "max_sessions"),
        ({"token": "short"}, "token"),
        ({"allow_origins": ("evil.example",)}, "allow_origins"),
        ({"port": 70000}, "port"),
        ({"ice_servers": ("http://x",)}, "ice_servers"),
        ({"voices_dir": "/nonexistent"}, "voices_dir"),
    ]
    for bad, field in bad_values:
        with pytest.raises(ValueError, match=field):
            ServeConfig(**bad)
