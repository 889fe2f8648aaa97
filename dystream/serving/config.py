"""Options of `dystream serve`: where it listens, who may use it, and the limits that keep one client from hurting
the others. The CLI takes its help from the field documentation (see :meth:`ServeConfig.help`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["ServeConfig", "is_loopback"]

# the sample rates a WebRTC peer or an uploaded wav may use: the rates Opus and common recorders produce
AUDIO_RATES = (8000, 16000, 24000, 32000, 44100, 48000)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1): only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0: reachable from elsewhere


@dataclass
class ServeConfig:
    """Server options; every limit is enforced per request or per session and reported to the client by name."""

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to listen on; anything but a loopback address needs --token"},
    )
    port: int = field(default=8080, metadata={"help": "TCP port of the page and the API (0: any free port)"})
    token: str | None = field(
        default=None,
        metadata={
            "help": "shared secret every API call must carry (Authorization: Bearer TOKEN); required when --host is "
            "not a loopback address (env DYSTREAM_SERVE_TOKEN also sets it, keeping it out of the process list)"
        },
    )
    max_sessions: int = field(
        default=2, metadata={"help": "concurrent calls; one more is refused with HTTP 503 and a JSON reason"}
    )
    allow_origins: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "extra browser origins allowed to call the API (scheme://host[:port]); the page's own origin "
            "always is (a reverse proxy that rewrites Host needs its public origin here)"
        },
    )
    max_image_bytes: int = field(default=4 << 20, metadata={"help": "largest reference image upload (bytes)"})
    max_image_side: int = field(default=4096, metadata={"help": "largest reference image width or height (pixels)"})
    max_voice_bytes: int = field(default=16 << 20, metadata={"help": "largest voice wav upload (bytes)"})
    max_voice_seconds: float = field(default=600.0, metadata={"help": "longest voice wav (seconds)"})
    idle_timeout_s: float = field(
        default=20.0,
        metadata={"help": "a call whose peer sends no audio for this long is closed (a vanished peer)"},
    )
    max_session_s: float = field(default=3600.0, metadata={"help": "a call is closed after this long in any case"})
    playout_delay_s: float = field(
        default=0.12,
        metadata={
            "help": "jitter buffer: the first frame is shown this long after it was generated, and the rest "
            "on a fixed 25 fps grid from there"
        },  # fmt: skip
    )
    max_backlog_s: float = field(
        default=1.0,
        metadata={
            "help": "audio that may wait for a generator slower than real time; beyond it the oldest half is "
            "skipped (the video skips ahead)"
        },
    )
    max_hook_buffer_s: float = field(
        default=120.0, metadata={"help": "own-voice audio an agent may queue ahead with push_self (seconds)"}
    )
    references_dir: str | None = field(
        default=None, metadata={"help": "folder of reference images the page offers (besides built-in ones)"}
    )
    voices_dir: str | None = field(default=None, metadata={"help": "folder of wav files the page offers as voices"})
    ice_servers: tuple[str, ...] = field(
        default=(),
        metadata={"help": "STUN/TURN URLs for both ends (e.g. turn:turn.example.org:3478); none: direct only"},
    )
    ice_username: str | None = field(default=None, metadata={"help": "TURN user name"})
    ice_credential: str | None = field(default=None, metadata={"help": "TURN password"})
    ice_addresses: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "the server's own ICE host addresses (default: every non-loopback interface, as aioice "
            "chooses); 127.0.0.1 keeps all media on loopback"
        },
    )

    warmup: bool = field(
        default=True,
        metadata={
            "help": "run one chunk through a throw-away session before serving: the first call of a cold process "
            "otherwise pays one-off costs in its first frame, and its playout grid keeps that latency all call"
        },
    )

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("ServeConfig.host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServeConfig.port must be in [0, 65535], got {self.port}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("ServeConfig.token must be at least 8 characters (it is the only lock on the server)")
        if not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"ServeConfig.token: listening on {self.host!r} (not a loopback address) exposes the server to other "
                "machines; pass --token (or set DYSTREAM_SERVE_TOKEN), or listen on 127.0.0.1"
            )
        if self.max_sessions < 1:
            raise ValueError(f"ServeConfig.max_sessions must be >= 1, got {self.max_sessions}")
        for name in ("max_image_bytes", "max_image_side", "max_voice_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_voice_seconds", "idle_timeout_s", "max_session_s", "max_backlog_s", "max_hook_buffer_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServeConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_backlog_s < 0.08:
            raise ValueError(f"ServeConfig.max_backlog_s must be >= 0.08 (two video frames), got {self.max_backlog_s}")
        if self.playout_delay_s < 0:
            raise ValueError(f"ServeConfig.playout_delay_s must be >= 0, got {self.playout_delay_s}")
        self.allow_origins = tuple(o.rstrip("/") for o in self.allow_origins)
        for origin in self.allow_origins:
            if not origin.startswith(("http://", "https://")):
                raise ValueError(f"ServeConfig.allow_origins: {origin!r} must be scheme://host[:port]")
        self.ice_servers = tuple(self.ice_servers)
        for url in self.ice_servers:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ValueError(f"ServeConfig.ice_servers: {url!r} must start with stun:, turn: or turns:")
        for name in ("references_dir", "voices_dir"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"ServeConfig.{name}: {folder} is not a folder")
        if self.ice_addresses is not None:
            self.ice_addresses = tuple(self.ice_addresses)
            for address in self.ice_addresses:
                try:
                    ipaddress.ip_address(address)
                except ValueError:
                    raise ValueError(f"ServeConfig.ice_addresses: {address!r} is not an IP address") from None

    @classmethod
    def help(cls, name: str) -> str:
        """The documented meaning of a field (for CLI help)."""
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)
