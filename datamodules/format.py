"""The shard format: one WebDataset sample per clip, its fields, codecs and the shard index.

A shard is a plain tar file; a sample is the group of consecutive members that share a key
(WebDataset splits a member name at the first dot of its basename, so keys never contain dots):

    KEY.mp4        H.264 video, yuv420p, constant 25 fps, no B-frames, a keyframe every second
    KEY.self.wav   16 kHz mono PCM16, the person in the video
    KEY.other.wav  16 kHz mono PCM16, the conversation partner (silence if none)
    KEY.mask.npy   uint8 [T], 1 where the person in the video speaks, 0 where they listen
    KEY.json       metadata (fps, n_frames, width, height, sample_rate, identity, source, ...)
    KEY.kpts.npy   optional float32 [T, K, 3] keypoints, layout in `keypoints.py`

Beside the shards, `index.json` lists every shard with its sample count, so that epoch lengths
are known without reading the tars. docs/data.md documents every field with dtype and unit.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FPS = 25
SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 audio samples own one video frame
FORMAT_VERSION = "dystream-shards/1"
INDEX_NAME = "index.json"

REQUIRED_FIELDS = ("mp4", "self.wav", "other.wav", "mask.npy", "json")
OPTIONAL_FIELDS = ("kpts.npy",)
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
REQUIRED_META = ("fps", "n_frames", "identity", "source")

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# A fixed tar member mtime keeps shards byte-identical for the same content.
_TAR_MTIME = 1_700_000_000


def frame_rms(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """Per-frame RMS of a 16 kHz signal, the samples each video frame owns: [>= T * 640] -> float64 [T]."""
    x = np.asarray(audio)[: n_frames * SAMPLES_PER_FRAME]
    if len(x) < n_frames * SAMPLES_PER_FRAME:
        raise ValueError(f"frame_rms: {len(x)} samples for {n_frames} frames (need {n_frames * SAMPLES_PER_FRAME})")
    return np.sqrt(np.mean(x.reshape(n_frames, -1).astype(np.float64) ** 2, axis=1))


def check_key(key: str) -> str:
    """Return `key` if it is a valid sample key (letters, digits, `_`, `-`), else raise."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: keys may contain only letters, digits, '_' and '-' "
            "(WebDataset splits member names at the first dot, so a dotted key breaks the sample apart)"
        )
    return key


def sanitize_key(name: str) -> str:
    """Turn a free-form name (a folder path, a file name) into a valid key."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key out of {name!r}")
    return key


# ---------------------------------------------------------------------------------------------
# Field codecs
# ---------------------------------------------------------------------------------------------


def encode_video(frames: np.ndarray, fps: int = FPS, crf: int = 20, keyint: int = FPS, preset: str = "fast") -> bytes:
    """uint8 [T, H, W, 3] RGB frames -> H.264 mp4 bytes (yuv420p, constant fps, no B-frames).

    No B-frames and a keyframe every `keyint` frames keep random-access decoding exact and cheap
    (decord pitfalls with B-frame-heavy files, notes/data_and_vae.md section 2.5).
    """
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("cannot encode a video with no frames")
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0",
        }
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_video(data: bytes) -> np.ndarray:
    """mp4 bytes -> uint8 [T, H, W, 3] RGB, every frame, with PyAV (for tools and tests)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("video has no decodable frames")
    return np.stack(frames)


def encode_wav(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """float32 [N] in [-1, 1] -> 16-bit PCM mono wav bytes (values beyond [-1, 1] are clipped)."""
    from scipy.io import wavfile

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {tuple(audio.shape)}")
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    wavfile.write(buf, sample_rate, pcm)
    return buf.getvalue()


def resample_audio(audio: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited polyphase resampling (scipy `resample_poly`), float32 in and out."""
    if source_rate == target_rate:
        return audio.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(int(source_rate), int(target_rate))
    return resample_poly(audio.astype(np.float64), target_rate // g, source_rate // g).astype(np.float32)


def decode_wav(data: bytes, target_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """wav bytes -> (float32 mono [N] at `target_rate`, the file's own sample rate).

    Repairs, documented in docs/data.md: several channels are averaged to mono, another sample
    rate is resampled to `target_rate`. Raises ValueError on an empty or unreadable file.
    """
    from scipy.io import wavfile

    if not data:
        raise ValueError("empty wav file (0 bytes)")
    try:
        rate, pcm = wavfile.read(io.BytesIO(data))
    except Exception as exn:  # scipy raises ValueError, EOFError, struct.error ... on broken headers
        raise ValueError(f"unreadable wav file: {exn}") from exn
    if pcm.size == 0:
        raise ValueError("wav file has no samples")
    if pcm.dtype == np.uint8:
        audio = (pcm.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(pcm.dtype, np.integer):
        audio = pcm.astype(np.float32) / float(np.iinfo(pcm.dtype).max)
    else:
        audio = pcm.astype(np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    return resample_audio(audio, int(rate), target_rate), int(rate)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Clips <-> samples
# ---------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """One clip, fully decoded. Arrays follow the shard format exactly."""

    key: str
    video: np.ndarray  # uint8 [T, H, W, 3] RGB
    audio_self: np.ndarray  # float32 [T * 640] at 16 kHz
    audio_other: np.ndarray  # float32 [T * 640] at 16 kHz
    mask: np.ndarray  # uint8 [T], 1 = speaking
    meta: dict[str, Any] = field(default_factory=dict)
    kpts: np.ndarray | None = None  # float32 [T, K, 3]

    def __post_init__(self) -> None:
        check_key(self.key)
        if self.video.dtype != np.uint8 or self.video.ndim != 4 or self.video.shape[-1] != 3:
            raise ValueError(f"{self.key}: video must be uint8 [T, H, W, 3], got {self.video.dtype} {self.video.shape}")
        t = self.video.shape[0]
        for name in ("audio_self", "audio_other"):
            a = getattr(self, name)
            if a.ndim != 1 or a.shape[0] != t * SAMPLES_PER_FRAME:
                raise ValueError(f"{self.key}: {name} must be [T * 640] = [{t * SAMPLES_PER_FRAME}], got {a.shape}")
        if self.mask.shape != (t,) or self.mask.dtype != np.uint8 or self.mask.max(initial=0) > 1:
            raise ValueError(
                f"{self.key}: mask must be uint8 [T] = [{t}] of 0/1, got {self.mask.dtype} {self.mask.shape}"
            )
        if self.kpts is not None and (
            self.kpts.dtype != np.float32 or self.kpts.ndim != 3 or self.kpts.shape[0] != t or self.kpts.shape[2] != 3
        ):
            raise ValueError(f"{self.key}: kpts must be float32 [T, K, 3], got {self.kpts.dtype} {self.kpts.shape}")

    @property
    def n_frames(self) -> int:
        return int(self.video.shape[0])

    def full_meta(self) -> dict[str, Any]:
        """The metadata written to KEY.json: the format's own fields plus everything in `meta`."""
        t, h, w, _ = self.video.shape
        meta = {"identity": self.key, "source": "unknown"} | dict(self.meta)
        meta |= {"fps": FPS, "n_frames": int(t), "width": int(w), "height": int(h), "sample_rate": SAMPLE_RATE}
        if self.kpts is not None:
            meta.setdefault("keypoints", f"K={self.kpts.shape[1]}")
        return meta


def clip_to_sample(clip: Clip, crf: int = 20) -> dict[str, Any]:
    """Encode a clip into the dict of bytes that a WebDataset TarWriter writes."""
    sample: dict[str, Any] = {
        "__key__": clip.key,
        "mp4": encode_video(clip.video, crf=crf),
        "self.wav": encode_wav(clip.audio_self),
        "other.wav": encode_wav(clip.audio_other),
        "mask.npy": encode_npy(clip.mask.astype(np.uint8)),
        "json": json.dumps(clip.full_meta(), sort_keys=True).encode(),
    }
    if clip.kpts is not None:
        sample["kpts.npy"] = encode_npy(clip.kpts.astype(np.float32))
    return sample


def sample_to_clip(sample: dict[str, Any]) -> Clip:
    """Decode a raw sample (bytes per field, as read from a tar) into a Clip, strictly."""
    key = sample.get("__key__", "?")
    missing = [f for f in REQUIRED_FIELDS if f not in sample]
    if missing:
        raise ValueError(f"sample {key}: missing fields {missing}")
    audio_self, _ = decode_wav(sample["self.wav"])
    audio_other, _ = decode_wav(sample["other.wav"])
    kpts = decode_npy(sample["kpts.npy"]) if "kpts.npy" in sample else None
    return Clip(
        key=key,
        video=decode_video(sample["mp4"]),
        audio_self=audio_self,
        audio_other=audio_other,
        mask=decode_npy(sample["mask.npy"]),
        meta=json.loads(sample["json"]),
        kpts=kpts,
    )


def read_shards(urls: Iterable[str], handler: Any = None) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per field) of the shards in order, grouped exactly as WebDataset groups them.

    Each shard is opened here and closed in a `finally`, so a stream abandoned mid-shard (an
    epoch cut by `with_epoch`) releases its file at once instead of whenever GC runs. `handler`
    is a WebDataset exception handler (return True to skip and go on); None re-raises.
    """
    from webdataset.filters import reraise_exception
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    handler = handler or reraise_exception

    def opened() -> Iterator[dict[str, Any]]:
        for url in urls:
            try:
                stream = gopen(url)
            except Exception as exn:
                exn.args = exn.args + (url,)
                if handler(exn):
                    continue
                raise
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    return group_by_keys(tar_file_expander(opened(), handler=handler), handler=handler)


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (bytes per field)."""
    return read_shards([str(path)])


# ---------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write samples to one tar (atomically: a temporary name, then a rename). Returns its index entry."""
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=_TAR_MTIME)
        for sample in samples:
            check_key(sample["__key__"])
            writer.write(sample)
            count += 1
        writer.close()
    os.replace(tmp, path)
    return {"name": path.name, "samples": count, "bytes": path.stat().st_size}


class ShardWriter:
    """Writes samples into `PREFIX-000000.tar`, `PREFIX-000001.tar`, ... of bounded size.

    A shard is closed once it holds `max_samples` samples or `max_bytes` bytes, whichever comes
    first. `close()` writes `index.json` and returns its content.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 512 * 2**20,
        index_extra: dict[str, Any] | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.index_extra = dict(index_extra or {})
        self.shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._writer = None
        self._file = None
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        import webdataset as wds

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = self.folder / name
        self._file = open(self._path.with_name(name + ".tmp"), "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
        self.shards.append({"name": self._path.name, "samples": self._count, "bytes": self._path.stat().st_size})
        self._writer = self._file = None

    def write(self, sample: dict[str, Any]) -> None:
        key = check_key(sample["__key__"])
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._writer is not None and (self._count >= self.max_samples or self._bytes + size > self.max_bytes):
            self._finish()
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    def close(self) -> dict[str, Any]:
        self._finish()
        return write_index(self.folder, self.shards, **self.index_extra)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._writer is not None:  # leave no half-written shard that looks complete
            self._writer.close()
            self._file.close()
            os.remove(self._path.with_name(self._path.name + ".tmp"))


# ---------------------------------------------------------------------------------------------
# The shard index
# ---------------------------------------------------------------------------------------------


def write_index(folder: str | os.PathLike, shards: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write `folder/index.json` (atomically) and return it."""
    index = {
        "format": FORMAT_VERSION,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "total_samples": int(sum(s["samples"] for s in shards)),
        "shards": list(shards),
    } | extra
    path = Path(folder) / INDEX_NAME
    tmp = path.with_name(INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, path)
    return index


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard index {path}; build it with `dystream data index {folder}`") from None
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); rebuild it with `dystream data index {folder}`") from None
    if index.get("format") != FORMAT_VERSION or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path} is not a {FORMAT_VERSION} index; rebuild it with `dystream data index {folder}`")
    return index


def scan_shard(path: str | os.PathLike) -> dict[str, Any]:
    """Count the samples of one tar by reading member names only (no payload is decoded).

    Returns its index entry plus `problems`: keys that lack a required field or carry fields
    the format does not know (the signature of a key with dots in it).
    """
    from webdataset.tariterators import base_plus_ext

    fields: dict[str, set[str]] = {}
    order: list[str] = []
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if key not in fields:
                fields[key] = set()
                order.append(key)
            fields[key].add(ext.lower())
    problems = []
    for key in order:
        missing = [f for f in REQUIRED_FIELDS if f not in fields[key]]
        unknown = sorted(fields[key] - set(ALL_FIELDS))
        if missing or unknown:
            problems.append({"key": key, "missing": missing, "unknown": unknown})
    return {"name": Path(path).name, "samples": len(order), "bytes": Path(path).stat().st_size, "problems": problems}


def build_index(folder: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Scan every `*.tar` in `folder` and (re)write its index.json. Problems are reported, not fixed."""
    folder = Path(folder)
    tars = sorted(p for p in folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {folder}")
    old: dict[str, Any] = {}
    if (folder / INDEX_NAME).exists():
        try:
            old = read_index(folder)
        except ValueError:
            old = {}
    entries, problems = [], {}
    for tar in tars:
        entry = scan_shard(tar)
        if entry["problems"]:
            problems[entry["name"]] = entry["problems"]
        entries.append({k: entry[k] for k in ("name", "samples", "bytes")})
    keep = {k: v for k, v in old.items() if k not in ("format", "fps", "sample_rate", "total_samples", "shards")}
    return write_index(folder, entries, **(keep | extra | {"problems": problems}))


@dataclass
class ShardSet:
    """Resolved shard list: local paths (or URLs) and, where known, each shard's sample count."""

    spec: str
    urls: list[str]
    counts: list[int] | None  # None when no index describes these shards

    @property
    def total(self) -> int | None:
        return None if self.counts is None else int(sum(self.counts))


def resolve_shards(spec: str) -> ShardSet:
    """Resolve a shard specification: a folder with index.json, a brace pattern, or one tar.

    A brace pattern (`data/x/shard-{000000..000099}.tar`) takes its counts from the index.json
    beside the shards if there is one that lists every expanded name.
    """
    import braceexpand

    path = Path(spec)
    if path.is_dir():
        index = read_index(path)
        urls, counts = [], []
        for entry in index["shards"]:
            shard = path / entry["name"]
            if not shard.exists():
                raise FileNotFoundError(
                    f"{path / INDEX_NAME} lists {entry['name']} but {shard} does not exist; "
                    f"rebuild the index with `dystream data index {path}`"
                )
            urls.append(str(shard))
            counts.append(int(entry["samples"]))
        if not urls:
            raise ValueError(f"{path / INDEX_NAME} lists no shards")
        return ShardSet(spec, urls, counts)
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"shard specification {spec!r} expands to nothing")
    local = [Path(u) for u in urls]
    if all("://" not in u for u in urls):
        absent = [str(p) for p in local if not p.exists()]
        if absent:
            raise FileNotFoundError(
                f"shard specification {spec!r}: {len(absent)} file(s) do not exist, e.g. {absent[0]}; "
                "give a folder with index.json, a brace pattern of existing tars, or create data with "
                "`dystream data synth` / `dystream data pack`"
            )
    counts = None
    folders = {p.parent for p in local}
    if len(folders) == 1 and (next(iter(folders)) / INDEX_NAME).exists():
        by_name = {e["name"]: int(e["samples"]) for e in read_index(next(iter(folders)))["shards"]}
        if all(p.name in by_name for p in local):
            counts = [by_name[p.name] for p in local]
    return ShardSet(spec, urls, counts)
