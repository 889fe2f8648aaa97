"""One live call: WebRTC audio in, a :class:`~dystream.streaming.StreamingAvatar` in a worker thread, a 25 fps video
track and the avatar's own voice out, with the real-time policy and the per-call statistics.

Timeline. Audio is cut into *units* of 640 samples at 16 kHz (one video frame, 40 ms); unit ``m`` holds both
voices of media frame ``m``. Units are made by the *clock* track: the partner's microphone when the client sends
it, else the avatar's own-voice track, else a wall-clock ticker (an agent that only uses :meth:`LiveSession.push_self`).
Each clock sample takes one sample of the own voice from its source (a wav, the hook buffer, or the second track's
buffer; silence when the source has nothing), so both voices of a unit cover the same 40 ms.

Real-time policy ("hold the last frame and skip ahead"):

* Input: units wait for the worker thread in a bounded backlog (``max_backlog_s``). When it is full (the generator
  is slower than real time), the oldest half is skipped: never generated, counted in ``input_skipped_frames``.
  The generator hears a cut, the video jumps ahead, latency and memory stay bounded.
* Output: frames are shown on a fixed 25 fps grid that starts ``playout_delay_s`` after the first frame was made;
  grid slot ``k`` is due to show media frame ``m0 + k - k0``. A slot shows the newest generated frame not after
  the due one; a slot whose due frame is not ready holds the last frame (``frames_late``), and generated frames
  overtaken by a newer one before their slot are never shown (``frames_dropped``).
* The avatar's own voice is sent unchanged and never stretched: audio packet ``2k`` and ``2k + 1`` (20 ms each)
  carry the own-voice samples of the frame due in slot ``k`` and are released at the same grid instant as that
  slot. Sound and picture share one media timeline (RTP timestamps from the same origin: video 3600 k at 90 kHz,
  audio 320 i at 16 kHz), and the measured wall-clock gap between releasing video slot ``k`` and audio packet
  ``2k`` is reported as ``av_offset_ms``. When the video is late, the sound keeps time and the picture holds.

Latency: ``latency_s`` is audio-in -> frame-out, from the moment the server had the last sample of media frame
``m`` to the moment frame ``m`` was handed to the video encoder (algorithmic latency + compute + playout delay).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import av
import numpy as np
import torch
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from dystream.serving.config import AUDIO_RATES, ServeConfig

__all__ = ["LiveSession", "VoiceSource", "SessionClosed"]

log = logging.getLogger("dystream.serve")

SAMPLE_RATE = 16_000
FPS = 25
UNIT = SAMPLE_RATE // FPS  # 640 samples: one video frame of audio
PACKET = UNIT // 2  # 20 ms audio packets out
POLICY = "hold-last-frame-and-skip-ahead"
VIDEO_CLOCK = 90_000

VoiceKind = Literal["none", "wav", "track", "hook"]


class SessionClosed(RuntimeError):
    """push_self on a call that has ended."""


@dataclass
class VoiceSource:
    """Where the avatar's own voice comes from: ``none`` (it only listens), ``wav`` (``samples`` at 16 kHz, played
    from the start of the call), ``track`` (the client's second audio track) or ``hook`` (:meth:`push_self`)."""

    kind: VoiceKind = "none"
    samples: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("none", "wav", "track", "hook"):
            raise ValueError(f"VoiceSource.kind must be none, wav, track or hook, got {self.kind!r}")
        if (self.kind == "wav") != (self.samples is not None):
            raise ValueError("VoiceSource.samples: give samples exactly when kind is 'wav'")


@dataclass
class _Unit:
    m: int  # media frame index
    own: np.ndarray  # [640] float32
    other: np.ndarray  # [640] float32
    arrived: float  # perf_counter when its last sample reached the server


@dataclass
class _Frame:
    m: int
    pixels: np.ndarray  # uint8 [H, W, 3]
    arrived: float
    made: float


class _SampleBuffer:
    """A thread-safe FIFO of float32 samples holding at most ``limit``; ``overflow`` says what happens beyond."""

    def __init__(self, limit: int, overflow: Literal["drop-oldest", "raise"]) -> None:
        self.limit, self.overflow = limit, overflow
        self._parts: collections.deque[np.ndarray] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, samples: np.ndarray) -> None:
        with self._lock:
            if self._size + samples.shape[0] > self.limit:
                if self.overflow == "raise":
                    raise ValueError(
                        f"push_self: {self._size + samples.shape[0]} samples would be queued, more than the "
                        f"{self.limit / SAMPLE_RATE:.0f} s limit (max_hook_buffer_s); push closer to real time"
                    )
                excess = self._size + samples.shape[0] - self.limit
                self._take_locked(excess)
                self.dropped += excess
            self._parts.append(samples)
            self._size += samples.shape[0]

    def take(self, n: int) -> np.ndarray:
        """``n`` samples, silence where the buffer runs out."""
        with self._lock:
            out = self._take_locked(n)
        return out if out.shape[0] == n else np.pad(out, (0, n - out.shape[0]))

    def _take_locked(self, n: int) -> np.ndarray:
        got, need = [], n
        while need and self._parts:
            head = self._parts[0]
            if head.shape[0] <= need:
                got.append(self._parts.popleft())
                need -= head.shape[0]
            else:
                got.append(head[:need])
                self._parts[0] = head[need:]
                need = 0
        self._size -= n - need
        return np.concatenate(got) if got else np.zeros(0, np.float32)

    def __len__(self) -> int:
        return self._size


def _percentiles(values: Any) -> dict[str, float] | None:
    arr = np.asarray(list(values), dtype=np.float64)
    if not arr.size:
        return None
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95)), "max": float(arr.max()),
            "n": int(arr.size)}  # fmt: skip


class LiveSession:
    """One call. Created by the app with a ready :class:`StreamingAvatar`; the app attaches the client's tracks,
    adds :attr:`video` and :attr:`voice` to the peer connection and calls :meth:`start`.

    Threads: the event loop reads the client's audio and paces the outgoing tracks; one worker thread per call runs
    the avatar (its VAE decoder has its own thread), so generation never blocks the loop or another call.
    """

    def __init__(
        self,
        avatar: Any,
        voice: VoiceSource,
        config: ServeConfig,
        reference: np.ndarray,
        on_close: Callable[[LiveSession], Any] | None = None,
    ) -> None:
        self.id = secrets.token_urlsafe(12)
        self.avatar, self.voice_source, self.config = avatar, voice, config
        self.reference = np.ascontiguousarray(reference)  # shown until the first frame is generated
        self._on_close = on_close
        self.state: Literal["starting", "live", "closed"] = "starting"
        self.reason: str | None = None
        self.error: str | None = None
        self.created = time.perf_counter()
        self.clock: Literal["partner", "own", "ticker"] | None = None
        self._tracks: dict[str, Any] = {}
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pc: Any = None  # the RTCPeerConnection, set by the app
        # own voice
        self._wav_pos = 0
        self._own_in = 0 if voice.samples is None else voice.samples.shape[0]  # own-voice samples received
        self._hook = _SampleBuffer(int(config.max_hook_buffer_s * SAMPLE_RATE), "raise")
        self._own_track = _SampleBuffer(SAMPLE_RATE, "drop-oldest")  # a non-clock own track: at most 1 s ahead
        # units being assembled from clock samples
        self._pend_clock: list[np.ndarray] = []
        self._pend_own: list[np.ndarray] = []
        self._pend_n = 0
        self._next_m = 0
        self.last_audio = time.perf_counter()
        # input backlog (bounded) -> worker
        self._backlog: collections.deque[_Unit] = collections.deque()
        self._backlog_max = max(2, int(config.max_backlog_s * FPS))
        self._cond = threading.Condition()
        self.input_skipped = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name=f"dystream-session-{self.id[:6]}", daemon=True)
        self._threads = torch.get_num_threads()  # OpenMP settings are per thread: the worker takes the server's
        self._pushed: collections.deque[tuple[int, float]] = collections.deque()
        self._busy_s = 0.0
        self._units_pushed = 0
        self.frames_generated = 0
        self._avatar_stats: dict[str, Any] = {}
        # output (worker -> tracks), bounded
        self._out_lock = threading.Lock()
        self._frames: collections.deque[_Frame] = collections.deque()
        self._frames_max = self._backlog_max + 4 * FPS
        self._voice_out: collections.deque[tuple[int, np.ndarray]] = collections.deque(maxlen=self._frames_max * 2)
        self.frames_dropped = 0
        self.frames_late = 0
        self.frames_sent = 0
        self._grid: float | None = None  # perf_counter of slot 0 / audio packet 0
        self._k0: int | None = None
        self._m0 = 0
        self._last_pixels = self.reference
        self._latency: collections.deque[float] = collections.deque(maxlen=2000)
        self._video_release: dict[int, float] = {}
        self._audio_release: dict[int, float] = {}
        self._av_offset: collections.deque[float] = collections.deque(maxlen=2000)
        self.video = AvatarVideoTrack(self)
        self.voice = AvatarVoiceTrack(self)

    # ------------------------------------------------------------------------------------------------ public
    def push_self(self, pcm: Any, sample_rate: int = SAMPLE_RATE) -> None:
        """The server-side hook: queue the avatar's own voice (an agent's speech), from any thread. ``pcm``: mono
        float32 in [-1, 1] or int16; ``sample_rate`` one of the accepted rates (resampled to 16 kHz). Samples play
        in order as the call's clock advances; when the queue is empty the avatar is silent (it listens).
        Raises :class:`SessionClosed` once the call has ended and ``ValueError`` beyond ``max_hook_buffer_s``."""
        if self.state == "closed":
            raise SessionClosed(f"push_self: session {self.id} is closed ({self.reason})")
        if self.voice_source.kind != "hook":
            raise ValueError(f"push_self: session {self.id} takes its voice from {self.voice_source.kind!r}, not hook")
        samples = to_mono16k(pcm, sample_rate, "push_self")
        self._hook.put(samples)
        self._own_in += samples.shape[0]

    def attach(self, role: Literal["partner", "own"], track: Any) -> None:
        """A client audio track: ``partner`` (the microphone: the avatar listens to it) or ``own`` (its voice)."""
        if role in self._tracks:
            raise ValueError(f"the offer has more than one {role} audio track")
        if role == "own" and self.voice_source.kind != "track":
            return  # a second track the session was not asked to use: ignored
        self._tracks[role] = track

    def start(self) -> None:
        """Start reading tracks (or the ticker), the worker and the watchdog; call on the event loop."""
        self._loop = asyncio.get_running_loop()
        self.clock = "partner" if "partner" in self._tracks else "own" if "own" in self._tracks else "ticker"
        now = time.perf_counter()
        self.created = self.last_audio = now
        self._grid = now
        self.state = "live"
        self._worker.start()
        for role, track in self._tracks.items():
            self._tasks.append(asyncio.ensure_future(self._read(role, track)))
        if self.clock == "ticker":
            self._tasks.append(asyncio.ensure_future(self._tick()))
        self._tasks.append(asyncio.ensure_future(self._watchdog()))

    async def close(self, reason: str, error: str | None = None) -> None:
        """End the call (idempotent): stop the tracks and the worker, close the peer connection, free the avatar."""
        if self.state == "closed":
            return
        self.state, self.reason, self.error = "closed", reason, error
        log.info("session %s closed: %s%s", self.id, reason, f" ({error})" if error else "")
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self.video.stop()
        self.voice.stop()
        if self.pc is not None:
            try:
                await asyncio.wait_for(self.pc.close(), timeout=5)
            except Exception as exc:  # a broken transport must not keep the session alive
                log.warning("session %s: closing the peer connection failed: %r", self.id, exc)
        if self._worker.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._worker.join, 10.0)
        if not self._worker.ident:  # never started: free the avatar here
            self.avatar.close()
        with self._out_lock:
            self._frames.clear()
            self._voice_out.clear()
        if self._on_close is not None:
            self._on_close(self)

    def latencies(self) -> list[float]:
        """Audio-in -> frame-out latency (s) of the last shown frames (at most 2000), oldest first."""
        with self._out_lock:
            return list(self._latency)

    def av_offsets(self) -> list[float]:
        """Release time of audio packet 2k minus that of video slot k (ms), for the last paired slots."""
        with self._out_lock:
            return list(self._av_offset)

    def stats(self) -> dict[str, Any]:
        """Per-call statistics (JSON-ready); see the module docstring for the terms."""
        a = self._avatar_stats
        media_s = self._units_pushed / FPS
        return {
            "session": self.id,
            "state": self.state,
            "reason": self.reason,
            "error": self.error,
            "uptime_s": time.perf_counter() - self.created,
            "voice": self.voice_source.kind,
            "clock": self.clock,
            "policy": POLICY,
            "size": list(self.reference.shape[:2]),
            "audio_in_s": self._next_m / FPS,
            "own_voice_in_s": self._own_in / SAMPLE_RATE,
            "frames_generated": self.frames_generated,
            "frames_sent": self.frames_sent,
            "frames_late": self.frames_late,
            "frames_dropped": self.frames_dropped,
            "input_skipped_frames": self.input_skipped,
            "backlog_frames": len(self._backlog),
            "rtf": self._busy_s / media_s if media_s else None,
            "rtf_dit": a.get("rtf_dit"),
            "rtf_vae": a.get("rtf_vae"),
            "rtf_audio": a.get("rtf_audio"),
            "first_frame_delay_s": a.get("first_frame_delay_s"),
            "algorithmic_latency_s": a.get("algorithmic_latency_s"),
            "latency_s": _percentiles(self._latency),
            "av_offset_ms": _percentiles(self._av_offset),
            "realtime": self.input_skipped == 0 and (self._busy_s <= media_s or not media_s),
        }

    # ------------------------------------------------------------------------------------------------ input
    async def _read(self, role: str, track: Any) -> None:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            while True:
                frame = await track.recv()
                if frame.sample_rate not in AUDIO_RATES:
                    await self.close("bad input", f"{role} audio at {frame.sample_rate} Hz; accepted: {AUDIO_RATES}")
                    return
                samples = np.concatenate([f.to_ndarray().reshape(-1) for f in resampler.resample(frame)] or
                                         [np.zeros(0, np.float32)]).astype(np.float32)  # fmt: skip
                self._add(role, samples)
        except MediaStreamError:
            await self.close("peer left", f"the client's {role} audio track ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("session %s: reading the %s track failed", self.id, role)
            await self.close("error", f"reading the {role} track failed: {exc!r}")

    async def _tick(self) -> None:
        """The clock of a call without client audio: 20 ms of partner silence at a time, on the wall clock."""
        produced = 0
        while True:
            due = int((time.perf_counter() - self.created) * SAMPLE_RATE)
            if due > produced:
                self._add("ticker", np.zeros(due - produced, np.float32))
                produced = due
            await asyncio.sleep(PACKET / SAMPLE_RATE)

    def _add(self, role: str, samples: np.ndarray) -> None:
        now = time.perf_counter()
        if role == "own":
            self._own_in += samples.shape[0]
            if self.clock != "own":  # waits in its buffer for the microphone's clock
                self._own_track.put(samples)
                return
        self.last_audio = now
        own = self._pull_own(samples.shape[0]) if role != "own" else samples
        other = samples if role == "partner" else np.zeros_like(samples)
        self._pend_clock.append(other)
        self._pend_own.append(own)
        self._pend_n += samples.shape[0]
        if self._pend_n < UNIT:
            return
        clock, mine = np.concatenate(self._pend_clock), np.concatenate(self._pend_own)
        whole = self._pend_n - self._pend_n % UNIT
        self._pend_clock, self._pend_own = [clock[whole:]], [mine[whole:]]
        self._pend_n -= whole
        units = []
        for lo in range(0, whole, UNIT):
            units.append(_Unit(self._next_m, mine[lo : lo + UNIT], clock[lo : lo + UNIT], now))
            self._next_m += 1
        with self._out_lock:
            self._voice_out.extend((u.m, u.own) for u in units)
        with self._cond:
            for unit in units:
                if len(self._backlog) >= self._backlog_max:  # slower than real time: skip the oldest half
                    skip = self._backlog_max // 2
                    for _ in range(skip):
                        self._backlog.popleft()
                    self.input_skipped += skip
                self._backlog.append(unit)
            self._cond.notify()

    def _pull_own(self, n: int) -> np.ndarray:
        kind = self.voice_source.kind
        if kind == "wav":
            wav = self.voice_source.samples
            part = wav[self._wav_pos : self._wav_pos + n]
            self._wav_pos += n
            return part if part.shape[0] == n else np.pad(part, (0, n - part.shape[0]))
        if kind == "hook":
            return self._hook.take(n)
        if kind == "track":
            return self._own_track.take(n)
        return np.zeros(n, np.float32)

    # ------------------------------------------------------------------------------------------------ worker
    def _work(self) -> None:
        """The worker thread: backlog -> StreamingAvatar.push -> generated frames."""
        last_snapshot = 0.0
        torch.set_num_threads(self._threads)
        try:
            while not self._stop.is_set():
                with self._cond:
                    if not self._backlog:
                        self._cond.wait(timeout=0.02)
                    units = list(self._backlog)
                    self._backlog.clear()
                if self._stop.is_set():
                    break
                own = np.concatenate([u.own for u in units]) if units else np.zeros(0, np.float32)
                other = np.concatenate([u.other for u in units]) if units else np.zeros(0, np.float32)
                self._pushed.extend((u.m, u.arrived) for u in units)
                start = time.perf_counter()
                pixels = self.avatar.push(own, other)  # no units: collects frames the decoder finished meanwhile
                now = time.perf_counter()
                self._busy_s += now - start
                self._units_pushed += len(units)
                frames = []
                for p in pixels:
                    m, arrived = self._pushed.popleft()
                    frames.append(_Frame(m, p, arrived, now))
                self.frames_generated += len(frames)
                if frames:
                    with self._out_lock:
                        self._frames.extend(frames)
                        while len(self._frames) > self._frames_max:  # the tracks stopped pulling: stay bounded
                            self._frames.popleft()
                            self.frames_dropped += 1
                        if self._k0 is None and self._grid is not None:
                            self._m0 = frames[0].m
                            self._k0 = math.ceil((now + self.config.playout_delay_s - self._grid) * FPS)
                if now - last_snapshot > 0.25:
                    self._avatar_stats = {k: v for k, v in self.avatar.stats().items() if not isinstance(v, list)}
                    last_snapshot = now
        except BaseException as exc:
            log.exception("session %s: generation failed", self.id)
            if self._loop is not None and not self._loop.is_closed():
                asyncio.run_coroutine_threadsafe(self.close("error", f"generation failed: {exc!r}"), self._loop)
        finally:
            self.avatar.close()

    # ------------------------------------------------------------------------------------------------ output
    def video_slot(self, k: int) -> np.ndarray:
        """The picture of grid slot ``k`` (the policy of the module docstring)."""
        now = time.perf_counter()
        with self._out_lock:
            if self._k0 is None or k < self._k0:
                return self._last_pixels
            due = self._m0 + k - self._k0
            chosen = None
            while self._frames and self._frames[0].m <= due:
                if chosen is not None:
                    self.frames_dropped += 1
                chosen = self._frames.popleft()
            if chosen is None or chosen.m < due:
                self.frames_late += 1
            if chosen is not None:
                self.frames_sent += 1
                self._last_pixels = chosen.pixels
                self._latency.append(now - chosen.arrived)
            self._release("video", k, now)
            return self._last_pixels

    def voice_packet(self, i: int) -> np.ndarray:
        """The own-voice samples of audio packet ``i`` (20 ms): those of the frame due in slot ``i // 2``."""
        now = time.perf_counter()
        with self._out_lock:
            if self._k0 is None or i < 2 * self._k0:
                return np.zeros(PACKET, np.float32)
            pos = self._m0 * UNIT + PACKET * (i - 2 * self._k0)
            m, half = divmod(pos, UNIT)
            while self._voice_out and self._voice_out[0][0] < m:
                self._voice_out.popleft()
            out = np.zeros(PACKET, np.float32)
            if self._voice_out and self._voice_out[0][0] == m:
                out = self._voice_out[0][1][half : half + PACKET]
            if half == 0:
                self._release("audio", i // 2, now)
            return out

    def _release(self, kind: str, k: int, now: float) -> None:
        """Pair the release times of video slot k and audio packet 2k (caller holds the lock)."""
        mine, theirs = (self._video_release, self._audio_release)[:: 1 if kind == "video" else -1]
        if k in theirs:
            other = theirs.pop(k)
            video, audio = (now, other) if kind == "video" else (other, now)
            self._av_offset.append((audio - video) * 1000)
        else:
            mine[k] = now
            if len(mine) > 256:  # the other track is not pulling: stay bounded
                mine.pop(next(iter(mine)))

    async def _watchdog(self) -> None:
        cfg = self.config
        while self.state != "closed":
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            if now - self.created > cfg.max_session_s:
                await self.close("time limit", f"calls last at most {cfg.max_session_s:.0f} s (max_session_s)")
            elif self.clock != "ticker" and now - self.last_audio > cfg.idle_timeout_s:
                await self.close("idle", f"no audio from the client for {cfg.idle_timeout_s:.0f} s (idle_timeout_s)")
            elif self.clock == "ticker" and self.pc is not None and self.pc.connectionState != "connected":
                if now - self.created > cfg.idle_timeout_s:
                    await self.close("idle", f"not connected after {cfg.idle_timeout_s:.0f} s (idle_timeout_s)")


def to_mono16k(pcm: Any, sample_rate: int, what: str) -> np.ndarray:
    """float32 [-1, 1] or int16, ``[n]`` or ``[n, channels]`` at an accepted rate -> float32 mono at 16 kHz."""
    if sample_rate not in AUDIO_RATES:
        raise ValueError(f"{what}: sample rate {sample_rate} Hz not accepted; use one of {AUDIO_RATES}")
    x = np.asarray(pcm)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.dtype.kind == "f" else x.astype(np.float32).mean(axis=1) / 32768.0
    if x.ndim != 1:
        raise ValueError(f"{what}: expected mono samples [n] or [n, channels], got shape {x.shape}")
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif x.dtype.kind != "f":
        raise ValueError(f"{what}: samples must be float32 in [-1, 1] or int16, got {x.dtype}")
    x = np.clip(x.astype(np.float32), -1.0, 1.0)
    if sample_rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(sample_rate, SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, sample_rate // g).astype(np.float32)
    return x


# ---------------------------------------------------------------------------------------------------- tracks
class _PacedTrack(MediaStreamTrack):
    """Item ``i`` is released at ``grid + i * period``; a track that falls behind skips items so that the stream
    stays in real time (its timestamps keep the gap)."""

    period: float

    def __init__(self, session: LiveSession) -> None:
        super().__init__()
        self.session = session
        self._i = -1

    async def _next_index(self) -> int:
        if self.readyState != "live":
            raise MediaStreamError
        grid = self.session._grid
        if grid is None:
            raise RuntimeError("the session has not started")
        now = time.perf_counter()
        self._i = max(self._i + 1, math.floor((now - grid) / self.period))
        wait = grid + self._i * self.period - now
        if wait > 0:
            await asyncio.sleep(wait)
        if self.readyState != "live":
            raise MediaStreamError
        return self._i


class AvatarVideoTrack(_PacedTrack):
    """25 fps frames of the avatar (the reference image until the first frame is generated)."""

    kind = "video"
    period = 1 / FPS

    async def recv(self) -> av.VideoFrame:
        k = await self._next_index()
        frame = av.VideoFrame.from_ndarray(self.session.video_slot(k), format="rgb24")
        frame.pts, frame.time_base = k * (VIDEO_CLOCK // FPS), fractions.Fraction(1, VIDEO_CLOCK)
        return frame


class AvatarVoiceTrack(_PacedTrack):
    """The avatar's own voice in 20 ms packets on the video's grid (silence while it has no voice)."""

    kind = "audio"
    period = PACKET / SAMPLE_RATE

    async def recv(self) -> av.AudioFrame:
        i = await self._next_index()
        pcm = (np.clip(self.session.voice_packet(i), -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, i * PACKET, fractions.Fraction(1, SAMPLE_RATE)
        return frame
