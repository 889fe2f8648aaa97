"""A Python client of `dystream serve` (aiortc): what the web page does, for tests, benchmarks and programs that
call the avatar without a browser::

    async with CallClient("http://127.0.0.1:8080") as call:
        await call.start(partner=mic_16k, reference={"name": "synthetic-1"}, voice={"source": "none"})
        await asyncio.sleep(5)
        print(await call.stats(), len(call.frames))

Every request has a timeout; received frames are kept in bounded buffers.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import fractions
import time
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from dystream.serving.app import restrict_ice_addresses
from dystream.serving.config import ServeConfig

__all__ = ["CallClient", "ArrayAudioTrack", "CallError", "b64"]

SAMPLE_RATE = 16_000
PACKET = 320  # 20 ms


class CallError(RuntimeError):
    """The server refused a request: ``status`` and the server's ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ArrayAudioTrack(MediaStreamTrack):
    """16 kHz mono samples sent in real time as 20 ms packets; silence after the end (or a loop)."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, loop: bool = False) -> None:
        super().__init__()
        self.samples = (np.clip(np.asarray(samples, np.float32), -1, 1) * 32767).astype(np.int16)
        self.loop = loop
        self._i = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.perf_counter()
        wait = self._start + self._i * PACKET / SAMPLE_RATE - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        n = self.samples.shape[0]
        lo = self._i * PACKET
        if self.loop and n:
            idx = np.arange(lo, lo + PACKET) % n
            pcm = self.samples[idx]
        else:
            pcm = self.samples[lo : lo + PACKET]
            pcm = np.pad(pcm, (0, PACKET - pcm.shape[0]))
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, lo, fractions.Fraction(1, SAMPLE_RATE)
        self._i += 1
        return frame


class CallClient:
    """One call to a server. ``frames`` keeps the last ``keep`` video frames as ``(arrival time, uint8 HxWx3)``;
    ``frame_times`` the arrival time of every frame (bounded), ``audio_samples`` and ``audio_peak`` the count and
    the largest magnitude (in [0, 1]) of the received own-voice samples."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        ice_addresses: tuple[str, ...] | None = ("127.0.0.1",),
        keep: int = 50,
        timeout_s: float = 30.0,
    ) -> None:
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        restrict_ice_addresses(ice_addresses)
        self.frames: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=keep)
        self.frame_times: collections.deque[float] = collections.deque(maxlen=100_000)
        self.audio_samples = 0
        self.audio_peak = 0.0
        self.session: str | None = None
        self.pc: RTCPeerConnection | None = None
        self._http: Any = None
        self._tasks: list[asyncio.Task] = []
        self._sent: list[ArrayAudioTrack] = []

    async def __aenter__(self) -> CallClient:
        import aiohttp

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, method: str, path: str, json: Any = None, data: Any = None, **headers: str) -> Any:
        """An API call; raises :class:`CallError` on an error status."""
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        async with self._http.request(method, self.url + path, json=json, data=data, headers=headers) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {"error": (await resp.text())[:200]}
            if resp.status >= 400:
                raise CallError(resp.status, (body or {}).get("error", ""))
            return body

    async def start(
        self,
        partner: np.ndarray | None = None,
        reference: dict[str, Any] | None = None,
        voice: dict[str, Any] | None = None,
        own: np.ndarray | None = None,
        loop: bool = False,
        ice: ServeConfig | None = None,
    ) -> dict[str, Any]:
        """Offer a call: ``partner`` (16 kHz) is sent as the microphone track, ``own`` as the second (voice
        ``track``) track; returns the server's answer (with ``session``)."""
        from dystream.serving.app import rtc_configuration

        pc = self.pc = RTCPeerConnection(rtc_configuration(ice or ServeConfig()))
        for samples in (partner, own):
            if samples is not None:
                track = ArrayAudioTrack(samples, loop=loop)
                self._sent.append(track)
                pc.addTrack(track)
        if partner is None and own is None:  # no microphone: still receive the avatar's voice
            pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.ensure_future(self._consume(track)))

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate here
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "reference": reference, "voice": voice}
        answer = await self.request("POST", "/api/offer", json=offer)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        self.session = answer["session"]
        return answer

    async def _consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.perf_counter()
                if track.kind == "video":
                    self.frame_times.append(now)
                    self.frames.append((now, frame.to_ndarray(format="rgb24")))
                else:
                    self.audio_samples += frame.samples
                    pcm = frame.to_ndarray()
                    if pcm.size:
                        self.audio_peak = max(self.audio_peak, float(np.abs(pcm).max()) / 32768.0)
        except (MediaStreamError, asyncio.CancelledError):
            return

    async def stats(self) -> dict[str, Any]:
        return await self.request("GET", f"/api/sessions/{self.session}")

    async def stop(self) -> dict[str, Any]:
        """Hang up (the server frees the call) and close the connection; returns the final statistics."""
        final = await self.request("DELETE", f"/api/sessions/{self.session}")
        await self.close()
        return final

    async def vanish(self) -> None:
        """Disappear without hanging up or closing the connection: the audio stops (a closed laptop lid); the
        server notices by its idle timeout. :meth:`close` later releases the local side."""
        for track in self._sent:
            track.stop()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()
            self.pc = None
        if self._http is not None:
            await self._http.close()
            self._http = None
