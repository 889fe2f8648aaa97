"""Packing real clips into shards: re-encode to constant 25 fps H.264, 16 kHz mono audio, masks.

Input: a folder tree; every folder holding a `clip.mp4` is one clip:

    clip.mp4    any frame rate / codec PyAV reads (its own audio track is ignored)
    self.wav    the voice of the person in the video (any format PyAV reads, any rate, any channels)
    other.wav   optional: the partner's voice
    mix.wav     optional, instead of other.wav: the mixed conversation; other = mix - self
    mask.npy    optional: a precomputed per-frame speaking mask at 25 fps (e.g. from TalkNet run
                elsewhere), used instead of voice activity detection
    meta.json   optional: merged into KEY.json (identity, source, scores, ...)

The key is the folder's path relative to the input root, with every character outside
[A-Za-z0-9_-] replaced by `_` (so keys never contain dots). Masks come from silero-vad on the
person's own track (the `silero_vad` package bundles its model, nothing is downloaded).

Active-speaker detection (TalkNet / Light-ASD) from the video is not implemented: it needs a
face detector and tracker in front of the ASD network, and a clip with only a mixed track and no
`self.wav` or `mask.npy` is therefore rejected with an error saying so.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from dystream.datamodules.format import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    Clip,
    ShardWriter,
    clip_to_sample,
    sanitize_key,
)

VAD_DEFAULTS = {"threshold": 0.5, "min_speech_duration_ms": 120, "min_silence_duration_ms": 100, "speech_pad_ms": 30}


def find_clips(root: str | os.PathLike) -> list[Path]:
    """Every folder under `root` (itself included) that holds a clip.mp4, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    return sorted(p.parent for p in root.rglob("clip.mp4"))


def read_video(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Decode a video to uint8 [T, H, W, 3] RGB at a constant 25 fps.

    Output frame i shows the source frame on screen at time i / 25 s (the last one whose
    timestamp is <= that time), so variable frame rates and other rates are handled alike.
    Width and height are made even (yuv420p) by cropping one pixel; `max_side` downscales.
    """
    import av

    frames, times = [], []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(FPS)
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            w, h = frame.width, frame.height
            if max_side and max(w, h) > max_side:
                s = max_side / max(w, h)
                w, h = max(2, round(w * s)), max(2, round(h * s))
            frames.append(frame.reformat(width=w, height=h, format="rgb24").to_ndarray())
            times.append(float(frame.time))
    if not frames:
        raise ValueError(f"{path}: no decodable video frames")
    times_arr = np.asarray(times) - times[0]
    order = np.argsort(times_arr, kind="stable")
    times_arr = times_arr[order]
    duration = times_arr[-1] + 1.0 / float(rate)
    n_out = int(np.floor(duration * FPS + 1e-6))
    if n_out < 1:
        raise ValueError(f"{path}: shorter than one frame at {FPS} fps")
    pick = np.searchsorted(times_arr, np.arange(n_out) / FPS + 1e-6, side="right") - 1
    video = np.stack([frames[order[max(i, 0)]] for i in pick])
    h, w = video.shape[1] - video.shape[1] % 2, video.shape[2] - video.shape[2] % 2
    return np.ascontiguousarray(video[:, :h, :w])


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Decode any audio file PyAV reads to float32 mono [N] at 16 kHz.

    Channels are averaged (as `format.decode_wav` does) rather than left to FFmpeg's downmix,
    which sums stereo at -3 dB per channel and so raises identical channels by 3 dB.
    """
    import av

    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)  # keeps the channel layout
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().mean(axis=0))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().mean(axis=0))
    if not chunks:
        raise ValueError(f"{path}: no audio samples")
    return np.concatenate(chunks).astype(np.float32)


def fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Trim, or pad with silence, to exactly n_samples."""
    return np.pad(audio[:n_samples], (0, max(0, n_samples - audio.shape[0]))).astype(np.float32)


def segments_to_mask(segments: list[dict[str, int]], n_frames: int) -> np.ndarray:
    """Speech segments in samples ({'start', 'end'}) -> uint8 [T]: 1 where at least half a frame is speech."""
    covered = np.zeros(n_frames * SAMPLES_PER_FRAME, dtype=np.int8)
    for seg in segments:
        covered[max(0, int(seg["start"])) : max(0, int(seg["end"]))] = 1
    return (covered.reshape(n_frames, SAMPLES_PER_FRAME).mean(axis=1) >= 0.5).astype(np.uint8)


_VAD_MODEL = None


def vad_mask(audio: np.ndarray, n_frames: int, **vad: Any) -> np.ndarray:
    """Per-frame speaking mask of a 16 kHz track from silero-vad (its bundled model, offline)."""
    global _VAD_MODEL
    import silero_vad
    import torch

    if _VAD_MODEL is None:
        _VAD_MODEL = silero_vad.load_silero_vad()
    params = VAD_DEFAULTS | vad
    segments = silero_vad.get_speech_timestamps(
        torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), _VAD_MODEL, sampling_rate=SAMPLE_RATE, **params
    )
    return segments_to_mask(segments, n_frames)


def pack_folder(folder: Path, key: str, max_side: int | None = None, crf: int = 20, vad: dict | None = None) -> Clip:
    """Read one clip folder into a Clip in the shard format."""
    video = read_video(folder / "clip.mp4", max_side)
    n_frames = video.shape[0]
    n_samples = n_frames * SAMPLES_PER_FRAME
    has_mask = (folder / "mask.npy").exists()
    if not (folder / "self.wav").exists():
        raise FileNotFoundError(
            f"{folder}: no self.wav. The person's own voice track is needed for VAD masks and for audio_self; "
            "active-speaker detection from video (for a mixed track only) is not available in this version"
        )
    audio_self = fit_length(read_audio(folder / "self.wav"), n_samples)
    meta: dict[str, Any] = {"identity": key, "source": "packed"}
    if (folder / "meta.json").exists():
        meta |= json.loads((folder / "meta.json").read_text())
    if (folder / "other.wav").exists():
        audio_other = fit_length(read_audio(folder / "other.wav"), n_samples)
        meta["partner_audio"] = "other.wav"
    elif (folder / "mix.wav").exists():
        audio_other = fit_length(read_audio(folder / "mix.wav"), n_samples) - audio_self
        meta["partner_audio"] = "mix.wav - self.wav"
    else:
        audio_other = np.zeros(n_samples, dtype=np.float32)
        meta["partner_audio"] = "none (silence)"
    if has_mask:
        mask = np.load(folder / "mask.npy", allow_pickle=False).astype(np.uint8).reshape(-1)
        if mask.shape[0] != n_frames:
            raise ValueError(f"{folder}/mask.npy has {mask.shape[0]} frames, the clip has {n_frames} at {FPS} fps")
        meta["mask_source"] = "mask.npy"
    else:
        mask = vad_mask(audio_self, n_frames, **(vad or {}))
        meta["mask_source"] = "silero-vad"
    meta["speaking_ratio"] = float(mask.mean())
    return Clip(key=key, video=video, audio_self=audio_self, audio_other=audio_other, mask=mask, meta=meta)


def _pack_job(job: tuple[str, str, int | None, int, dict]) -> tuple[str, dict[str, Any] | None, str | None]:
    folder, key, max_side, crf, vad = job
    try:
        import torch

        torch.set_num_threads(1)
        clip = pack_folder(Path(folder), key, max_side, crf, vad)
        return key, clip_to_sample(clip, crf), None
    except Exception as exn:  # one bad clip must not stop the others; it is reported by the caller
        return key, None, f"{type(exn).__name__}: {exn}"


def pack(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_samples: int = 256,
    max_shard_mb: float = 512.0,
    workers: int | None = None,
    max_side: int | None = None,
    crf: int = 20,
    vad: dict | None = None,
    log: bool = False,
) -> dict[str, Any]:
    """Pack every clip folder under `in_dir` into shards in `out_dir` (with index.json).

    Clips that fail are skipped and listed in the index under `skipped` with the reason.
    """
    start = time.perf_counter()
    folders = find_clips(in_dir)
    if not folders:
        raise FileNotFoundError(f"no clip folders (holding clip.mp4) under {in_dir}")
    root = Path(in_dir)
    keys = [sanitize_key(str(f.relative_to(root)) if f != root else root.name) for f in folders]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"clip folders map to the same key(s) {dupes}; rename those folders")
    jobs = [(str(f), k, max_side, crf, vad or {}) for f, k in zip(folders, keys, strict=True)]
    workers = max(1, workers if workers is not None else min(os.cpu_count() or 1, 8))
    skipped = {}
    writer = ShardWriter(
        out_dir,
        prefix="shard",
        max_samples=shard_samples,
        max_bytes=int(max_shard_mb * 2**20),
        index_extra={"source": "packed", "created_by": f"dystream data pack --in {in_dir}"},
    )
    if workers == 1:
        results = map(_pack_job, jobs)
        pool = None
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        results = pool.map(_pack_job, jobs)
    try:
        for key, sample, error in results:
            if error is not None:
                skipped[key] = error
                if log:
                    print(f"skipped {key}: {error}")
                continue
            writer.write(sample)
    finally:
        if pool is not None:
            pool.shutdown()
    writer.index_extra["skipped"] = skipped
    if not writer.shards and writer._writer is None:
        raise RuntimeError(f"no clip under {in_dir} could be packed: {skipped}")
    index = writer.close()
    if log:
        n = len(index["shards"])
        print(
            f"packed {index['total_samples']} clip(s) into {n} shard(s) in {out_dir} "
            f"({time.perf_counter() - start:.1f} s), {len(skipped)} skipped.\n"
            f"Shard count guidance: training needs at least ranks x workers shards without resampling "
            f"({n} shards serve e.g. {max(1, n // 2)} rank(s) x 2 workers); aim for a multiple of it, or set "
            "resampled=True."
        )
    return index
