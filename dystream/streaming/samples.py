"""DyStream-style sample files: one reference image + the avatar's audio (+ the partner's) -> one mp4 each.

A sample file is a JSON list of entries, or a single entry (DyStream README, "Running with Your Own Data"):

```json
{
    "resampled_video_path": "img_files/3.png",
    "audio_path": "wav_files/full.wav",
    "audio_self_path": "wav_files/speaker.wav",
    "audio_other_path": "wav_files/listener.wav",
    "video_id": "my_clip"
}
```

* ``resampled_video_path`` (required): the reference image, or a video whose first frame is used;
* ``audio_self_path`` (required): the avatar's own voice;
* ``audio_other_path`` (optional, ``null`` for speaker-only, DyStream's scenario 1): the partner's voice;
* ``audio_path`` (optional): the mixed conversation, used only for the mp4's sound track (DyStream: "only used
  for final video rendering and audio merging, not for inference"); without it the sound track is
  ``audio_self + audio_other``;
* ``video_id`` (required): the output is ``<out>/<video_id>.mp4``; ids must be unique and plain file names;
* any other field (``origin_video_path``, ``motion_self_path``, ``mode``, ``dataset_type``, ...) is accepted
  and ignored.

Relative paths are resolved against ``root`` when given, else against the current directory (as DyStream's
``run.sh`` does) and, failing that, against the sample file's own folder. Audio is decoded and resampled to
16 kHz mono (any rate, any format PyAV reads). If the two tracks differ in length, the shorter one is padded with
silence; the sound track is cut or padded to the avatar's audio. The video has ``ceil(samples / 640)`` frames at
25 fps (the audio's duration rounded up to whole frames).

Every problem is a :class:`SampleFileError` naming the sample file, the entry (index and ``video_id``) and the
field: missing field, wrong type, missing file, unreadable image or audio.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dystream.streaming.video_io import SAMPLE_RATE, read_wav, write_mp4

__all__ = [
    "SampleEntry",
    "SampleFileError",
    "load_samples",
    "read_image",
    "read_sample_audio",
    "render_sample",
]

REQUIRED_FIELDS = ("resampled_video_path", "audio_self_path", "video_id")
OPTIONAL_PATH_FIELDS = ("audio_other_path", "audio_path")
PUSH_SECONDS = 0.48  # audio fed per push when rendering offline (one chunk at paper defaults)


class SampleFileError(ValueError):
    """A sample file or one of its entries is unusable; the message names the file, entry and field."""


@dataclass(frozen=True)
class SampleEntry:
    """One validated entry: resolved, existing paths."""

    index: int
    video_id: str
    reference: Path
    audio_self: Path
    audio_other: Path | None
    audio_mix: Path | None
    source: Path  # the sample file

    def where(self, field: str | None = None) -> str:
        text = f"{self.source}: entry {self.index} (video_id {self.video_id!r})"
        return f"{text}, field {field!r}" if field else text


def load_samples(path: str | Path, root: str | Path | None = None) -> list[SampleEntry]:
    """Read and validate a sample file (a JSON list of entries or one entry); every file must exist."""
    path = Path(path)
    if not path.is_file():
        raise SampleFileError(f"sample file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SampleFileError(f"{path}: not valid JSON ({exc})") from exc
    entries = [data] if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise SampleFileError(f"{path}: expected a JSON object (one entry) or a non-empty list of entries")
    bases = [Path(root)] if root is not None else [Path.cwd(), path.resolve().parent]
    out: list[SampleEntry] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        out.append(_validate_entry(entry, i, path, bases))
        vid = out[-1].video_id
        if vid in seen:
            raise SampleFileError(
                f"{path}: entry {i} (video_id {vid!r}), field 'video_id': the same id as entry {seen[vid]}; "
                "both would write the same mp4"
            )
        seen[vid] = i
    return out


def _validate_entry(entry: Any, index: int, source: Path, bases: list[Path]) -> SampleEntry:
    if not isinstance(entry, dict):
        raise SampleFileError(f"{source}: entry {index}: expected a JSON object, got {type(entry).__name__}")
    vid = entry.get("video_id")
    label = f"{source}: entry {index} (video_id {vid!r})" if isinstance(vid, str) else f"{source}: entry {index}"
    for name in REQUIRED_FIELDS:
        if name not in entry or entry[name] is None:
            raise SampleFileError(f"{label}: missing field {name!r} (required: {', '.join(REQUIRED_FIELDS)})")
    for name in (*REQUIRED_FIELDS, *OPTIONAL_PATH_FIELDS):
        value = entry.get(name)
        if value is not None and not isinstance(value, str):
            raise SampleFileError(
                f"{label}, field {name!r}: expected a string{' or null' if name in OPTIONAL_PATH_FIELDS else ''}, "
                f"got {type(value).__name__} {value!r}"
            )
    if not vid or vid in (".", "..") or "/" in vid or "\\" in vid or "\0" in vid:
        raise SampleFileError(f"{label}, field 'video_id': {vid!r} is not a plain file name (it names <out>/<id>.mp4)")

    def resolve(name: str) -> Path | None:
        value = entry.get(name)
        if value is None:
            return None
        p = Path(value).expanduser()
        candidates = [p] if p.is_absolute() else [base / p for base in bases]
        for c in candidates:
            if c.is_file():
                return c
        tried = ", ".join(str(c) for c in candidates)
        raise SampleFileError(f"{label}, field {name!r}: file not found: {value} (looked at {tried})")

    return SampleEntry(
        index=index,
        video_id=vid,
        reference=resolve("resampled_video_path"),  # type: ignore[arg-type]
        audio_self=resolve("audio_self_path"),  # type: ignore[arg-type]
        audio_other=resolve("audio_other_path"),
        audio_mix=resolve("audio_path"),
        source=source,
    )


def read_image(path: str | Path) -> np.ndarray:
    """The first frame of an image or video file as uint8 ``[H, W, 3]`` RGB (decoded with PyAV)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} holds no image or video stream")
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc
    raise ValueError(f"{path} holds no decodable frame")


def read_sample_audio(entry: SampleEntry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(audio_self, audio_other, sound_track)`` float32 at 16 kHz, the tracks of equal length ``n`` (the
    partner is silence when absent) and the sound track cut/padded to ``n``."""

    def read(p: Path, field: str) -> np.ndarray:
        try:
            audio = read_wav(p, SAMPLE_RATE)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise SampleFileError(f"{entry.where(field)}: unreadable audio: {exc}") from exc
        if not np.isfinite(audio).all():
            raise SampleFileError(f"{entry.where(field)}: {p} decodes to non-finite samples")
        return audio

    own = read(entry.audio_self, "audio_self_path")
    other = read(entry.audio_other, "audio_other_path") if entry.audio_other else np.zeros_like(own)
    n = max(own.shape[0], other.shape[0])
    own, other = np.pad(own, (0, n - own.shape[0])), np.pad(other, (0, n - other.shape[0]))
    if entry.audio_mix is not None:
        mix = read(entry.audio_mix, "audio_path")[:n]
        mix = np.pad(mix, (0, n - mix.shape[0]))
    else:
        mix = np.clip(own + other, -1.0, 1.0)
    return own, other, mix


def reference_image(entry: SampleEntry) -> np.ndarray:
    try:
        return read_image(entry.reference)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise SampleFileError(f"{entry.where('resampled_video_path')}: unreadable image: {exc}") from exc


def stream_frames(
    session: Any,
    audio_self: np.ndarray,
    audio_other: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[np.ndarray]:
    """Feed a whole recording to a :class:`~dystream.streaming.StreamingAvatar` in chunk-sized pushes;
    ``progress(samples_done, samples_total)`` after each push."""
    step, total = int(PUSH_SECONDS * SAMPLE_RATE), audio_self.shape[0]
    for start in range(0, total, step):
        yield from session.push(audio_self[start : start + step], audio_other[start : start + step])
        if progress is not None:
            progress(min(start + step, total), total)
    yield from session.flush()


def render_sample(
    entry: SampleEntry,
    make_session: Callable[[np.ndarray], Any],
    out_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate ``<out_dir>/<video_id>.mp4`` (H.264 + AAC) for one entry.

    ``make_session(reference_uint8)`` returns a fresh :class:`~dystream.streaming.StreamingAvatar`;
    ``progress(samples_done, samples_total)`` is called as audio is consumed. Frames are kept in memory until
    the mp4 is written.
    """
    image = reference_image(entry)
    own, other, mix = read_sample_audio(entry)
    if own.shape[0] == 0:
        raise SampleFileError(f"{entry.where('audio_self_path')}: the audio is empty")
    session = make_session(image)
    frames = list(stream_frames(session, own, other, progress))
    expected = -(-own.shape[0] // (SAMPLE_RATE // 25))
    if len(frames) != expected:  # guaranteed by StreamingAvatar.flush; checked because the mp4 must match
        raise RuntimeError(f"{entry.where()}: generated {len(frames)} frames, the audio covers {expected}")
    return write_mp4(Path(out_dir) / f"{entry.video_id}.mp4", np.stack(frames), fps=25, audio=mix)
