"""The aiohttp application of `dystream serve`: the web page, the signalling API and the registry of live calls.

Endpoints (JSON unless noted; every ``/api/`` call carries ``Authorization: Bearer TOKEN`` when the server has a
token, and a browser ``Origin`` must be the page's own or listed in ``allow_origins``):

* ``GET /`` and ``GET /static/<file>``: the page (plain HTML/JS shipped in the package);
* ``GET /api/info``: limits, active and maximum calls, the offered references and voices, ICE servers;
* ``POST /api/offer``: ``{"sdp", "type": "offer", "reference": {"name"} | {"data": base64},
  "voice": {"source": "none" | "track" | "hook" | "wav", "name" | "data": base64}}`` ->
  ``{"sdp", "type": "answer", "session", "size"}``. Audio m-lines in offer order: the first is the partner's
  microphone, the second (voice ``track``) the avatar's own voice; the offer must receive video;
* ``GET /api/sessions/<id>``: the call's statistics (:meth:`LiveSession.stats`; kept a minute after it ends);
* ``DELETE /api/sessions/<id>``: hang up; returns the final statistics.

Errors are ``{"error": "..."}`` with 400 (bad input), 401 (token), 403 (origin), 404, 413 (upload too large) or
503 (all call slots busy, with ``Retry-After``); a failing call never affects the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import io
import logging
import time
import wave
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from dystream.serving.config import AUDIO_RATES, ServeConfig
from dystream.serving.session import LiveSession, VoiceSource, to_mono16k

__all__ = ["create_app", "SessionRegistry", "decode_image", "decode_wav", "BadInput", "REGISTRY", "CONFIG"]

log = logging.getLogger("dystream.serve")

IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}  # and RIFF....WEBP, checked below
MAX_SDP_CHARS = 64 << 10
BUILTIN_REFERENCES = 4  # synthetic identities of the validation split, the world the embedded models learn
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
KEEP_CLOSED = 64  # final statistics of ended calls kept for the page (bounded)
KEEP_CLOSED_S = 60.0


class BadInput(ValueError):
    """A client error with its HTTP status; the message names the limit or field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ inputs
def decode_image(data: bytes, config: ServeConfig) -> np.ndarray:
    """Uploaded bytes -> uint8 ``[H, W, 3]``; PNG, JPEG or WebP within the size limits, checked before decoding
    the pixels (the header gives the size), so that a small file cannot expand into a huge image."""
    import av

    if len(data) > config.max_image_bytes:
        raise BadInput(f"reference image: {len(data)} bytes, more than max_image_bytes={config.max_image_bytes}", 413)
    kind = next((k for magic, k in IMAGE_MAGIC.items() if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        raise BadInput("reference image: not a PNG, JPEG or WebP file")
    try:
        with av.open(io.BytesIO(data), format=f"{kind}_pipe") as container:
            if not container.streams.video:
                raise BadInput("reference image: no picture in the file")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            side = config.max_image_side
            if max(w, h) > side:
                raise BadInput(f"reference image: {w}x{h} pixels, larger than max_image_side={side}", 413)
            for frame in container.decode(stream):
                if max(frame.width, frame.height) > side:
                    raise BadInput(f"reference image: larger than max_image_side={side}", 413)
                return frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise BadInput(f"reference image: cannot decode the {kind} file ({exc})") from exc
    raise BadInput("reference image: no decodable picture")


def decode_wav(data: bytes, config: ServeConfig) -> np.ndarray:
    """Uploaded bytes -> float32 mono at 16 kHz: PCM wav, 1-2 channels, an accepted rate, within the limits."""
    if len(data) > config.max_voice_bytes:
        raise BadInput(f"voice wav: {len(data)} bytes, more than max_voice_bytes={config.max_voice_bytes}", 413)
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            if rate not in AUDIO_RATES:
                raise BadInput(f"voice wav: {rate} Hz not accepted; use one of {AUDIO_RATES}")
            if channels not in (1, 2) or width not in (1, 2, 4):
                raise BadInput(f"voice wav: {channels} channels of {8 * width} bits; use mono/stereo 8/16/32-bit PCM")
            if n / rate > config.max_voice_seconds:
                raise BadInput(f"voice wav: {n / rate:.1f} s, longer than max_voice_seconds={config.max_voice_seconds}")
            raw = w.readframes(n)
    except (wave.Error, EOFError) as exc:
        raise BadInput(f"voice wav: not a PCM wav file ({exc})") from exc
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    x = np.frombuffer(raw[: len(raw) - len(raw) % (width * channels)], dtype=dtype).astype(np.float32)
    x = (x - 128) / 128 if width == 1 else x / float(np.iinfo(dtype).max + 1)
    x = x.reshape(-1, channels).mean(axis=1)
    if not x.size:
        raise BadInput("voice wav: no samples")
    return to_mono16k(x, rate, "voice wav")


def _b64(value: Any, field: str, limit: int, limit_name: str) -> bytes:
    if not isinstance(value, str):
        raise BadInput(f"{field}: expected base64 text")
    if "," in value[:100] and value.startswith("data:"):  # a data URL from FileReader.readAsDataURL
        value = value.split(",", 1)[1]
    if len(value) > limit * 4 // 3 + 8:
        raise BadInput(f"{field}: more than {limit_name}={limit} bytes", 413)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{field}: invalid base64 ({exc})") from exc


class Catalog:
    """Reference images and voices the page offers by name: built-in synthetic identities and files from the
    configured folders (listed once at start; names only, never paths, travel to the client)."""

    def __init__(self, config: ServeConfig, size: tuple[int, int]) -> None:
        self.config, self.size = config, size
        self.references: dict[str, Path | int] = {f"synthetic-{i + 1}": i for i in range(BUILTIN_REFERENCES)}
        self.voices: dict[str, Path] = {}
        if config.references_dir:
            for p in sorted(Path(config.references_dir).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    self.references[p.name] = p
        if config.voices_dir:
            for p in sorted(Path(config.voices_dir).iterdir()):
                if p.suffix.lower() == ".wav" and p.is_file():
                    self.voices[p.name] = p
        self._builtin: dict[int, np.ndarray] = {}

    def reference(self, name: str) -> np.ndarray:
        source = self.references.get(name)
        if source is None:
            raise BadInput(f"reference: unknown name {name!r}; offered: {sorted(self.references)}")
        if isinstance(source, int):
            if source not in self._builtin:
                from dystream.datamodules.synthetic import make_clip

                clip = make_clip(seed=0, split="val", index=4 * source, size=max(64, *self.size), seconds=0.04)
                self._builtin[source] = np.ascontiguousarray(np.asarray(clip.video)[0])
            return self._builtin[source]
        return decode_image(source.read_bytes(), self.config)

    def voice(self, name: str) -> np.ndarray:
        path = self.voices.get(name)
        if path is None:
            raise BadInput(f"voice: unknown name {name!r}; offered: {sorted(self.voices)}")
        return decode_wav(path.read_bytes(), self.config)


# ------------------------------------------------------------------------------------------------ registry
class SessionRegistry:
    """Live calls by id, with slots reserved while a call is being set up (so the limit holds under races)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sessions: dict[str, LiveSession] = {}
        self.reserved = 0
        self.closed: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()

    @property
    def active(self) -> int:
        return len(self.sessions)

    def reserve(self) -> None:
        if len(self.sessions) + self.reserved >= self.limit:
            raise BadInput(f"all {self.limit} call slots are busy (max_sessions); try again later", 503)
        self.reserved += 1

    def release(self) -> None:
        self.reserved -= 1

    def add(self, session: LiveSession) -> None:
        self.sessions[session.id] = session

    def ended(self, session: LiveSession) -> None:
        self.sessions.pop(session.id, None)
        self.closed[session.id] = (time.monotonic(), session.stats())
        self._prune()

    def final_stats(self, sid: str) -> dict[str, Any] | None:
        self._prune()
        item = self.closed.get(sid)
        return item[1] if item else None

    def _prune(self) -> None:
        now = time.monotonic()
        while self.closed and (
            len(self.closed) > KEEP_CLOSED or now - next(iter(self.closed.values()))[0] > KEEP_CLOSED_S
        ):
            self.closed.popitem(last=False)


# ------------------------------------------------------------------------------------------------ ICE
def restrict_ice_addresses(addresses: tuple[str, ...] | None) -> None:
    """Offer ICE host candidates only on ``addresses`` (aioice has no option for it: its address lookup is
    replaced process-wide). aioice never offers loopback on its own, so 127.0.0.1 is only usable this way."""
    if addresses is None:
        return
    import aioice.ice

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


def rtc_configuration(config: ServeConfig) -> Any:
    from aiortc import RTCConfiguration, RTCIceServer

    # an explicit empty list: aiortc would otherwise contact a public STUN server
    user, password = config.ice_username, config.ice_credential
    servers = [RTCIceServer(urls=u, username=user, credential=password) for u in config.ice_servers]
    return RTCConfiguration(iceServers=servers)


# ------------------------------------------------------------------------------------------------ the app
CONFIG = web.AppKey("config", ServeConfig)
REGISTRY = web.AppKey("registry", SessionRegistry)
CATALOG = web.AppKey("catalog", Catalog)
SIZE = web.AppKey("size", tuple)
FACTORY = web.AppKey("factory", object)
ON_SESSION = web.AppKey("on_session", object)

SessionFactory = Callable[[np.ndarray], Any]
"""``factory(reference uint8 [H, W, 3]) -> StreamingAvatar`` (run in a worker thread)."""


def create_app(
    factory: SessionFactory,
    config: ServeConfig,
    size: tuple[int, int],
    on_session: Callable[[LiveSession], Any] | None = None,
) -> web.Application:
    """The application. ``factory`` makes one :class:`StreamingAvatar` per call from its reference image (see
    :func:`dystream.serving.cli.avatar_factory`); ``size`` is the output (height, width); ``on_session(session)``
    runs on the event loop when a call starts: an agent pipeline keeps the session and feeds
    :meth:`LiveSession.push_self` (voice source ``hook``)."""
    restrict_ice_addresses(config.ice_addresses)
    registry = SessionRegistry(config.max_sessions)
    catalog = Catalog(config, size)
    # JSON bodies carry both uploads in base64 (4/3 of their size) plus the SDP
    max_body = (config.max_image_bytes + config.max_voice_bytes) * 4 // 3 + MAX_SDP_CHARS + (64 << 10)
    app = web.Application(client_max_size=max_body, middlewares=[_errors, _guard])
    app[CONFIG], app[REGISTRY], app[CATALOG], app[SIZE] = config, registry, catalog, size
    app[FACTORY], app[ON_SESSION] = factory, on_session
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/info", _info)
    app.router.add_post("/api/offer", _offer)
    app.router.add_get("/api/sessions/{sid}", _session_stats)
    app.router.add_delete("/api/sessions/{sid}", _hang_up)
    app.on_shutdown.append(_close_all)
    if config.warmup:
        app.on_startup.append(_warm_up)
    return app


async def _warm_up(app: web.Application) -> None:
    await asyncio.get_running_loop().run_in_executor(None, warm_up, app[FACTORY], app[SIZE])


def warm_up(factory: SessionFactory, size: tuple[int, int]) -> float:
    """One chunk of silence through a throw-away session (first-use costs: allocator, kernels, the VAD model);
    returns the seconds it took."""
    start = time.perf_counter()
    avatar = factory(np.full((*size, 3), 128, np.uint8))
    try:
        need = (avatar.frames_per_chunk + avatar.lookahead + 1) * 640 + avatar.audio_encoder.config.pad[1]
        avatar.push(np.zeros(need, np.float32))
        avatar.flush()
    finally:
        avatar.close()
    elapsed = time.perf_counter() - start
    log.info("warm-up: one chunk in %.2f s", elapsed)
    return elapsed


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure becomes a JSON ``{"error"}`` with a status; unexpected ones are logged and answered 500."""
    try:
        return await handler(request)
    except BadInput as exc:
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        registry: SessionRegistry = request.app[REGISTRY]
        extra = {"active": registry.active, "max_sessions": registry.limit} if exc.status == 503 else {}
        return web.json_response({"error": str(exc), **extra}, status=exc.status, headers=headers)
    except web.HTTPRequestEntityTooLarge as exc:
        return _json_error(413, f"request body too large ({exc.text}); see max_image_bytes and max_voice_bytes")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _json_error(exc.status, exc.reason)
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return _json_error(500, f"internal error: {type(exc).__name__}")


@web.middleware
async def _guard(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Origin check and token for the API (the page itself holds no secret)."""
    config: ServeConfig = request.app[CONFIG]
    if request.path.startswith("/api/"):
        origin = request.headers.get("Origin")
        if origin is not None:  # a browser: the page's own origin or an allowed one (blocks cross-site POSTs)
            own = {f"{scheme}://{request.host}" for scheme in ("http", "https")}
            if origin.rstrip("/") not in own | set(config.allow_origins):
                return _json_error(403, f"origin {origin} is not allowed (allow_origins)")
        if config.token is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {config.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return _json_error(401, "missing or wrong token (Authorization: Bearer TOKEN)")
    return await handler(request)


async def _index(request: web.Request) -> web.StreamResponse:
    return await _static_file("index.html")


async def _static(request: web.Request) -> web.StreamResponse:
    return await _static_file(request.match_info["name"])


async def _static_file(name: str) -> web.Response:
    types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
    suffix = Path(name).suffix
    if "/" in name or suffix not in types:
        raise web.HTTPNotFound()
    resource = resources.files("dystream.serving").joinpath("static", name)
    if not resource.is_file():
        raise web.HTTPNotFound()
    policy = "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:"
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": policy}
    return web.Response(body=resource.read_bytes(), content_type=types[suffix], headers=headers)


async def _info(request: web.Request) -> web.Response:
    config: ServeConfig = request.app[CONFIG]
    registry: SessionRegistry = request.app[REGISTRY]
    catalog: Catalog = request.app[CATALOG]
    ice = [
        {"urls": u, "username": config.ice_username, "credential": config.ice_credential} for u in config.ice_servers
    ]
    return web.json_response(
        {
            "active": registry.active,
            "max_sessions": registry.limit,
            "size": list(request.app[SIZE]),
            "references": list(catalog.references),
            "voices": list(catalog.voices),
            "voice_sources": ["none", "track", "wav", "hook"],
            "ice_servers": ice,
            "policy": "hold-last-frame-and-skip-ahead",
            "limits": {
                "max_image_bytes": config.max_image_bytes,
                "max_image_side": config.max_image_side,
                "max_voice_bytes": config.max_voice_bytes,
                "max_voice_seconds": config.max_voice_seconds,
                "audio_rates": list(AUDIO_RATES),
                "idle_timeout_s": config.idle_timeout_s,
                "max_session_s": config.max_session_s,
            },
        }
    )


async def _read_offer(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > request.app._client_max_size:
        raise BadInput(
            f"request body too large: {request.content_length} bytes (max_image_bytes + max_voice_bytes)", 413
        )
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise
    except ValueError as exc:
        raise BadInput(f"the body must be JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    return body


def _check_sdp(body: dict[str, Any]) -> tuple[str, int]:
    """The offer's SDP and its count of audio m-lines the client sends on (malformed text is refused here)."""
    from aiortc.sdp import SessionDescription

    sdp, kind = body.get("sdp"), body.get("type")
    if kind != "offer":
        raise BadInput(f"type must be 'offer', got {kind!r}")
    if not isinstance(sdp, str) or not sdp.strip():
        raise BadInput("sdp: expected the offer's SDP text")
    if len(sdp) > MAX_SDP_CHARS:
        raise BadInput(f"sdp: longer than {MAX_SDP_CHARS} characters", 413)
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:  # the parser raises whatever the text trips it on
        raise BadInput(f"sdp: not a valid session description ({type(exc).__name__}: {exc})") from exc
    kinds = [m.kind for m in parsed.media]
    if "video" not in kinds:
        raise BadInput("sdp: the offer must receive video (add a recvonly video transceiver)")
    sending = sum(m.kind == "audio" and m.direction in ("sendrecv", "sendonly") for m in parsed.media)
    return sdp, sending


def _voice(body: dict[str, Any], config: ServeConfig, catalog: Catalog) -> VoiceSource:
    voice = body.get("voice") or {"source": "none"}
    if not isinstance(voice, dict):
        raise BadInput("voice: expected an object {source, name | data}")
    source = voice.get("source", "none")
    if source in ("none", "track", "hook"):
        return VoiceSource(source)
    if source != "wav":
        raise BadInput(f"voice.source must be none, track, wav or hook, got {source!r}")
    if "data" in voice:
        return VoiceSource(
            "wav",
            decode_wav(_b64(voice["data"], "voice.data", config.max_voice_bytes, "max_voice_bytes"), config),
            "upload",
        )
    name = voice.get("name")
    if not isinstance(name, str):
        raise BadInput("voice: source 'wav' needs a name (GET /api/info lists them) or data (a base64 wav)")
    return VoiceSource("wav", catalog.voice(name), name)


def _reference(body: dict[str, Any], config: ServeConfig, catalog: Catalog) -> np.ndarray:
    ref = body.get("reference") or {"name": next(iter(catalog.references))}
    if not isinstance(ref, dict):
        raise BadInput("reference: expected an object {name} or {data}")
    if "data" in ref:
        return decode_image(_b64(ref["data"], "reference.data", config.max_image_bytes, "max_image_bytes"), config)
    name = ref.get("name")
    if not isinstance(name, str):
        raise BadInput("reference: give a name (GET /api/info lists them) or data (a base64 image)")
    return catalog.reference(name)


async def _offer(request: web.Request) -> web.Response:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    app = request.app
    config: ServeConfig = app[CONFIG]
    registry: SessionRegistry = app[REGISTRY]
    body = await _read_offer(request)
    sdp, sending = _check_sdp(body)  # every input is checked before any slot or compute is spent
    reference = _reference(body, config, app[CATALOG])
    voice = _voice(body, config, app[CATALOG])
    if voice.kind == "track" and sending < 2:
        raise BadInput("voice.source 'track' needs a second audio track in the offer (the avatar's voice)")
    registry.reserve()
    loop = asyncio.get_running_loop()
    session: LiveSession | None = None
    pc = None
    try:
        try:
            avatar = await loop.run_in_executor(None, app[FACTORY], reference)
        except ValueError as exc:  # prepare_reference: an image the model cannot use
            raise BadInput(f"reference image: {exc}") from exc
        session = LiveSession(avatar, voice, config, _shown_reference(avatar, reference), on_close=registry.ended)
        pc = session.pc = RTCPeerConnection(rtc_configuration(config))
        incoming: list[Any] = []
        pc.on("track", lambda track: incoming.append(track) if track.kind == "audio" else None)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:
            raise BadInput(f"sdp: the offer was refused ({type(exc).__name__}: {exc})") from exc
        # audio tracks in m-line order: the partner's microphone, then the avatar's own voice
        for role, track in zip(("partner", "own"), incoming, strict=False):
            session.attach(role, track)
        pc.addTrack(session.video)
        if any(t.kind == "audio" for t in pc.getTransceivers()):  # an answer cannot add an m-line of its own
            pc.addTrack(session.voice)

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed") and session is not None:
                await session.close("peer left", f"the connection is {pc.connectionState}")

        await pc.setLocalDescription(await pc.createAnswer())
        registry.release()
        registry.add(session)
        session.start()
    except BaseException:
        if session is None or session.id not in registry.sessions:
            registry.release()
        if session is not None:
            session._on_close = None
            await session.close("setup failed")
        elif pc is not None:
            await pc.close()
        raise
    log.info(
        "session %s started (voice %s, clock %s); %d active", session.id, voice.kind, session.clock, registry.active
    )
    if app[ON_SESSION] is not None:
        try:
            app[ON_SESSION](session)
        except Exception:  # the application's hook failing must not leave a call without its agent
            log.exception("session %s: on_session failed", session.id)
            await session.close("error", "the server's on_session hook failed")
            raise
    answer = pc.localDescription
    size = list(session.reference.shape[:2])
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": session.id, "size": size})


def _shown_reference(avatar: Any, reference: np.ndarray) -> np.ndarray:
    """The reference as the avatar sees it (cropped and resized to the output size), shown before the first frame."""
    ref = getattr(avatar, "reference", None)
    if ref is None:
        return reference
    return ((ref[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


async def _session_stats(request: web.Request) -> web.Response:
    sid = request.match_info["sid"]
    registry: SessionRegistry = request.app[REGISTRY]
    session = registry.sessions.get(sid)
    if session is not None:
        return web.json_response(session.stats())
    final = registry.final_stats(sid)
    if final is None:
        raise BadInput(f"no session {sid!r} (ended more than a minute ago, or never existed)", 404)
    return web.json_response(final)


async def _hang_up(request: web.Request) -> web.Response:
    sid = request.match_info["sid"]
    registry: SessionRegistry = request.app[REGISTRY]
    session = registry.sessions.get(sid)
    if session is None:
        final = registry.final_stats(sid)
        if final is None:
            raise BadInput(f"no session {sid!r}", 404)
        return web.json_response(final)
    await session.close("hung up")
    return web.json_response(registry.final_stats(sid) or session.stats())


async def _close_all(app: web.Application) -> None:
    registry: SessionRegistry = app[REGISTRY]
    await asyncio.gather(*(s.close("server shutdown") for s in list(registry.sessions.values())))
