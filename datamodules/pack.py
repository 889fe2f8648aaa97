"""Packing real clips into shards: re-encode to constant 25 fps H.264, 16 kHz mono audio, masks.

Input: a folder tree; every folder holding a `clip.mp4` is one clip:

    clip.mp4    any frame rate / codec PyAV reads (its own audio track is ignored)
    self.wav    the voice of the person in the video (any format PyAV reads, any rate, any channels)
    other.wav   optional: the partner's voice
    mix.wav     optional, instead of other.wav: the mixed conversation; other = mix - self. Without self.wav it
                is the only track, which needs active-speaker detection (below) to be split
    mask.npy    optional: a precomputed per-frame speaking mask at 25 fps (e.g. from TalkNet run
                elsewhere), used instead of voice activity or active-speaker detection
    meta.json   optional: merged into KEY.json (identity, source, scores, ...)

The key is the folder's path relative to the input root, with every character outside
[A-Za-z0-9_-] replaced by `_` (so keys never contain dots).

Masks, in order of precedence: `mask.npy`; active-speaker detection when its weights are given
(`asd_weights` + `face_detector_weights`, `dystream data pack --asd-weights --face-detector-weights`):
S3FD faces, IoU tracks, Light-ASD scores of the avatar's face with the person's own audio (self.wav, else mix.wav),
`dystream.datamodules.active_speaker`, `mask_source` "light-asd", the per-frame scores in KEY.json `asd_scores`;
otherwise silero-vad on the person's own track (the `silero_vad` package bundles its model, nothing is downloaded).

A clip with only `mix.wav` (SpeakerVid ships one mixed track, notes/data_and_vae.md §1.5) packs only with
active-speaker detection, by a masking heuristic (`split_mix`): self = mix on the frames where the avatar speaks,
other = mix on the frames where it listens, with 10 ms linear fades inside the speaking runs against clicks
(self + other = mix everywhere). Overlapping speech goes wholly to the avatar, and a partner's voice under the
avatar's turns is kept in self: a separation model would do better, and the heuristic is recorded in KEY.json
(`self_audio`, `partner_audio`). Without ASD weights such a clip is skipped, naming the options to pass.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
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
MIX_FADE_SAMPLES = 160  # 10 ms at 16 kHz: the fades of `split_mix`

# clip frames uint8 [T, H, W, 3], the person's audio [T * 640], frames' size / source size -> an object with
# `mask` uint8 [T] and `meta()` (an `ActiveSpeakerDetector` returns an `ASDResult`)
ASDFunction = Callable[[np.ndarray, np.ndarray, float], Any]


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


def split_mix(mix: np.ndarray, mask: np.ndarray, fade: int = MIX_FADE_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Split a mixed track [T * 640] by a speaking mask [T] -> (self, other), float32, self + other = mix.

    self = mix x g, other = mix x (1 - g), with g = 1 on speaking frames and 0 on listening frames, except that each
    speaking run ramps linearly over its first and last `fade` samples (at most half the run; not at the clip's
    ends), so self is exactly silent on listening frames and neither track clicks at a turn change.
    """
    from dystream.evaluation.keypoints import mask_runs

    mix = np.asarray(mix, dtype=np.float32)
    mask = np.asarray(mask).reshape(-1)
    if mix.ndim != 1 or mix.shape[0] != mask.shape[0] * SAMPLES_PER_FRAME:
        raise ValueError(f"split_mix: mix must be [T * 640] = [{mask.shape[0] * SAMPLES_PER_FRAME}], got {mix.shape}")
    gain = np.repeat((mask > 0).astype(np.float32), SAMPLES_PER_FRAME)
    for start, end in mask_runs(mask > 0, 1):
        a, b = start * SAMPLES_PER_FRAME, end * SAMPLES_PER_FRAME
        f = min(fade, (b - a) // 2)
        if f <= 0:
            continue
        ramp = ((np.arange(f) + 0.5) / f).astype(np.float32)  # strictly inside (0, 1)
        if a > 0:
            gain[a : a + f] = ramp
        if b < gain.shape[0]:
            gain[b - f : b] = ramp[::-1]
    return mix * gain, mix * (1.0 - gain)


def probe_video_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the first video stream, from its header."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        ctx = container.streams.video[0].codec_context
        return int(ctx.width), int(ctx.height)


def pack_folder(
    folder: Path,
    key: str,
    max_side: int | None = None,
    crf: int = 20,
    vad: dict | None = None,
    asd: ASDFunction | None = None,
) -> Clip:
    """Read one clip folder into a Clip in the shard format. `asd`: active-speaker detection (an
    `ActiveSpeakerDetector`, or any callable of its signature), used for the mask unless mask.npy is given."""
    video = read_video(folder / "clip.mp4", max_side)
    n_frames = video.shape[0]
    n_samples = n_frames * SAMPLES_PER_FRAME
    has_mask = (folder / "mask.npy").exists()
    has_self, has_mix = (folder / "self.wav").exists(), (folder / "mix.wav").exists()
    if not has_self and not (has_mix and asd is not None):
        raise FileNotFoundError(
            f"{folder}: no self.wav. The person's own voice track is needed for the speaking mask and for audio_self"
            + (
                "; a clip with only mix.wav is split by active-speaker detection: pass --asd-weights and "
                "--face-detector-weights (Light-ASD and S3FD weights, docs/data.md)"
                if has_mix
                else "; give self.wav (or mix.wav with --asd-weights and --face-detector-weights)"
            )
        )
    meta: dict[str, Any] = {"identity": key, "source": "packed"}
    if (folder / "meta.json").exists():
        meta |= json.loads((folder / "meta.json").read_text())
    mix = fit_length(read_audio(folder / "mix.wav"), n_samples) if has_mix else None
    own = fit_length(read_audio(folder / "self.wav"), n_samples) if has_self else mix
    if has_mask:
        mask = np.load(folder / "mask.npy", allow_pickle=False).astype(np.uint8).reshape(-1)
        if mask.shape[0] != n_frames:
            raise ValueError(f"{folder}/mask.npy has {mask.shape[0]} frames, the clip has {n_frames} at {FPS} fps")
        meta["mask_source"] = "mask.npy"
    elif asd is not None:
        source_scale = 1.0
        if max_side:  # detect faces at the protocol's fraction of the source resolution, not of the downscaled one
            source_scale = min(1.0, max(video.shape[1:3]) / max(probe_video_size(folder / "clip.mp4")))
        result = asd(video, own, source_scale)
        mask = np.asarray(result.mask, dtype=np.uint8)
        meta |= result.meta()
        meta["mask_source"] = "light-asd"
    else:
        mask = vad_mask(own, n_frames, **(vad or {}))
        meta["mask_source"] = "silero-vad"
    if has_self:
        audio_self = own
        if (folder / "other.wav").exists():
            audio_other = fit_length(read_audio(folder / "other.wav"), n_samples)
            meta["partner_audio"] = "other.wav"
        elif mix is not None:
            audio_other = mix - audio_self
            meta["partner_audio"] = "mix.wav - self.wav"
        else:
            audio_other = np.zeros(n_samples, dtype=np.float32)
            meta["partner_audio"] = "none (silence)"
    else:
        audio_self, audio_other = split_mix(mix, mask)
        meta["self_audio"] = f"mix.wav on the speaking frames ({meta['mask_source']} mask, 10 ms fades)"
        meta["partner_audio"] = f"mix.wav on the listening frames ({meta['mask_source']} mask, 10 ms fades)"
    meta["speaking_ratio"] = float(mask.mean())
    return Clip(key=key, video=video, audio_self=audio_self, audio_other=audio_other, mask=mask, meta=meta)


_ASD_CACHE: dict[tuple[str, str, str], Any] = {}


def _asd_for(spec: Any) -> ASDFunction | None:
    """A job's ASD: None, a ready callable, or ("weights", asd path, detector path, device), loaded once per
    process."""
    if spec is None or callable(spec):
        return spec
    _, asd_path, det_path, device = spec
    if (asd_path, det_path, device) not in _ASD_CACHE:
        from dystream.datamodules.active_speaker import ActiveSpeakerDetector

        _ASD_CACHE[(asd_path, det_path, device)] = ActiveSpeakerDetector.from_weights(asd_path, det_path, device)
    return _ASD_CACHE[(asd_path, det_path, device)]


def _pack_job(job: tuple[str, str, int | None, int, dict, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    folder, key, max_side, crf, vad, asd = job
    try:
        import torch

        torch.set_num_threads(1)
        clip = pack_folder(Path(folder), key, max_side, crf, vad, _asd_for(asd))
        return key, clip_to_sample(clip, crf), None
    except Exception as exn:  # one bad clip must not stop the others; it is reported by the caller
        return key, None, f"{type(exn).__name__}: {exn}"


def resolve_weights(value: str | os.PathLike, option: str) -> str:
    """A weights option's value -> an existing file: a path as is, a zoo entry name -> its verified cached file."""
    path = Path(value).expanduser()
    if path.is_file():
        return str(path)
    from dystream.zoo import is_entry, resolve

    if is_entry(str(value)):
        return str(resolve(str(value)))  # ZooError naming `dystream zoo import NAME PATH` if it is not cached
    raise FileNotFoundError(
        f"{option} {str(value)!r}: no such file, and not a zoo entry name (`dystream zoo list --kind metric`); "
        "give the path of the weights file"
    )


def active_speaker_detector(
    asd_weights: str | os.PathLike | None, face_detector_weights: str | os.PathLike | None, device: str = "cpu"
) -> Any:
    """Check the two ASD weight options together and load them once: None when neither is given."""
    if asd_weights is None and face_detector_weights is None:
        return None
    if asd_weights is None or face_detector_weights is None:
        given, missing = (
            ("--asd-weights", "--face-detector-weights")
            if asd_weights
            else ("--face-detector-weights", "--asd-weights")
        )
        raise ValueError(
            f"{given} needs {missing} too: active-speaker detection runs the S3FD face detector "
            "(--face-detector-weights, sfd_face.pth) in front of Light-ASD (--asd-weights, pretrain_AVA_CVPR.model)"
        )
    from dystream.datamodules.active_speaker import ActiveSpeakerDetector

    asd_path = resolve_weights(asd_weights, "--asd-weights")
    det_path = resolve_weights(face_detector_weights, "--face-detector-weights")
    return ActiveSpeakerDetector.from_weights(asd_path, det_path, device)


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
    asd_weights: str | os.PathLike | None = None,
    face_detector_weights: str | os.PathLike | None = None,
    asd_device: str = "cpu",
    asd: ASDFunction | None = None,
) -> dict[str, Any]:
    """Pack every clip folder under `in_dir` into shards in `out_dir` (with index.json).

    Clips that fail are skipped and listed in the index under `skipped` with the reason.
    `asd_weights` (Light-ASD) and `face_detector_weights` (S3FD), paths or zoo entry names, go together: they turn
    on active-speaker detection and are checked (and loaded) before any clip is read; `asd_device` runs them.
    `asd` is the hook for another detector: a ready `ActiveSpeakerDetector` (or any callable
    (frames, audio, source_scale) -> object with `mask` and `meta()`), used instead of the weight options; with
    several workers it is pickled to them.
    """
    start = time.perf_counter()
    workers = max(1, workers if workers is not None else min(os.cpu_count() or 1, 8))
    # with worker processes the parent only checks the files, on the CPU (a CUDA context does not survive a fork)
    loaded = active_speaker_detector(asd_weights, face_detector_weights, asd_device if workers == 1 else "cpu")
    if asd is not None and loaded is not None:
        raise ValueError("pack: give either asd (a ready detector) or the ASD weight options, not both")
    folders = find_clips(in_dir)
    if not folders:
        raise FileNotFoundError(f"no clip folders (holding clip.mp4) under {in_dir}")
    root = Path(in_dir)
    keys = [sanitize_key(str(f.relative_to(root)) if f != root else root.name) for f in folders]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"clip folders map to the same key(s) {dupes}; rename those folders")
    asd_spec: Any = asd if asd is not None else loaded
    if loaded is not None and workers > 1:  # each worker loads the checked files once (nothing large is pickled)
        asd_spec = ("weights", loaded.weights["asd"]["path"], loaded.weights["face_detector"]["path"], asd_device)
    jobs = [(str(f), k, max_side, crf, vad or {}, asd_spec) for f, k in zip(folders, keys, strict=True)]
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
