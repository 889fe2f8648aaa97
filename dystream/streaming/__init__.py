"""Streaming generation: StreamingAvatar, sample-file rendering, video/audio I/O.

``StreamingAvatar`` is imported on first use, so that ``dystream.streaming.video_io`` stays light for code that
only writes videos.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StreamingAvatar", "StreamingConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dystream.streaming import avatar

        return getattr(avatar, name)
    raise AttributeError(f"module 'dystream.streaming' has no attribute {name!r}")
