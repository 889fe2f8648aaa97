"""Live calls with the avatar: `dystream serve` (an aiohttp app with WebRTC through aiortc) and its web page.

:mod:`dystream.serving.session` holds one call (the real-time policy and statistics), :mod:`dystream.serving.app`
the page and the signalling API, :mod:`dystream.serving.client` a Python client (tests, benchmarks, agents).
docs/serving.md documents the protocol and deployment.
"""

from dystream.serving.config import ServeConfig

__all__ = ["ServeConfig"]
