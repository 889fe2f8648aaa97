"""Streaming generation: StreamingAvatar, sample-file rendering, video/audio I/O."""
