"""SpeakerVidDataModule: training windows from SpeakerVid-style WebDataset shards.

Pipeline, per DataLoader worker (notes/data_and_vae.md section 2 for the why of each step):

    shard list -> split_by_node -> split_by_worker -> (per pass) shuffle shards -> read tar
    -> shuffle the undecoded samples -> decode a random window with decord -> batch in the worker
    WebLoader(batch_size=None).with_epoch(batches per rank)

- The stream of each worker repeats its shards forever and the epoch is cut on the loader, so
  every rank yields exactly the same number of batches and no rank waits at the end of an
  epoch for another (webdataset #225, #194); `with_epoch` sits on the loader, not the dataset,
  so it is not multiplied by the number of workers (#303).
- Shuffling happens on raw bytes, before decoding (FAQ #439); batches are formed inside the
  workers (FAQ #187).
- decord decodes one random window plus the reference frames with a single sorted `get_batch`
  from an in-memory mp4, with `num_threads` bounded; the reader is dropped right after (memory
  pitfalls #208, #279). Shards are re-encoded at packing time to constant 25 fps, no B-frames, a
  keyframe per second, so frame indices are exact.
- Validation splits by *sample* rather than by shard (every worker reads every validation shard
  and keeps every (ranks x workers)-th sample), so any shard count works for a small val set.
- Bad samples are skipped with a warning naming shard, key and reason, counted across workers
  in shared memory, reported at the end of every epoch; over `max_bad_fraction` the run stops
  with an error.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from dystream.datamodules.format import (
    ALL_FIELDS,
    FPS,
    INDEX_NAME,
    REQUIRED_FIELDS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    ShardSet,
    decode_npy,
    decode_wav,
    read_shards,
    resolve_shards,
    scan_shard,
)

log = logging.getLogger("dystream.data")

DEFAULT_TRAIN_SHARDS = "data/synthetic/train"
DEFAULT_VAL_SHARDS = "data/synthetic/val"
# The embedded default dataset written by prepare_data when it is missing (about a minute on 2 cores).
DEFAULT_SYNTH = {"clips": 64, "val_clips": 16, "seconds": 4.0, "clips_per_identity": 4, "shard_samples": 8}

REASONS = (
    "dotted_key",  # a key with a dot in it: its files were split into another key plus extensions
    "missing_field",  # a required member is absent or empty
    "bad_metadata",  # unreadable json, missing fps/n_frames, fps other than 25
    "corrupt_video",  # the mp4 cannot be opened or decoded (truncated, garbage)
    "bad_audio",  # a wav that is empty or unreadable
    "length_mismatch",  # mask, keypoints, audio or decoded video disagree with n_frames
    "too_short",  # fewer frames than the window plus one reference frame
    "bad_keypoints",  # kpts.npy with the wrong dtype or shape
    "tar_error",  # the tar itself is unreadable (truncated shard, missing file)
)


class BadDataError(RuntimeError):
    """Too many bad samples: raised when the skipped fraction exceeds `max_bad_fraction`."""


class BadSample(Exception):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


# ---------------------------------------------------------------------------------------------
# Bad-sample accounting shared by the worker processes of one rank
# ---------------------------------------------------------------------------------------------


class BadSampleLedger:
    """Counts seen, skipped and repaired samples across DataLoader workers (shared memory).

    Created inside the rank's process (in `*_dataloader()`), inherited by its workers.
    """

    _LAST = 512

    def __init__(self, name: str, max_bad_fraction: float, min_samples: int = 32) -> None:
        ctx = multiprocessing.get_context()
        self.name, self.max_bad_fraction, self.min_samples = name, max_bad_fraction, min_samples
        # [seen, bad, repaired, one counter per reason]
        self._counts = ctx.Array("q", 3 + len(REASONS))
        self._last = ctx.Array("c", self._LAST)

    def reset(self) -> None:
        with self._counts.get_lock():
            for i in range(len(self._counts)):
                self._counts[i] = 0

    def seen(self) -> None:
        with self._counts.get_lock():
            self._counts[0] += 1

    def repaired(self, shard: str, key: str, what: str) -> None:
        with self._counts.get_lock():
            self._counts[2] += 1
        log.debug("%s: repaired sample %s in %s: %s", self.name, key, shard, what)

    def bad(self, shard: str, key: str, reason: str, message: str, count_as_seen: bool = False) -> None:
        line = f"{self.name}: skipping sample {key!r} in shard {shard}: {reason}: {message}"
        log.warning(line)
        with self._counts.get_lock():
            if count_as_seen:
                self._counts[0] += 1
            self._counts[1] += 1
            self._counts[3 + REASONS.index(reason)] += 1
            self._last.value = line.encode("utf-8", "replace")[: self._LAST - 1]
            seen, bad = self._counts[0], self._counts[1]
        if seen >= self.min_samples and bad > self.max_bad_fraction * seen:
            raise BadDataError(self._over_message(seen, bad))

    def tar_handler(self, exn: Exception) -> bool:
        """WebDataset exception handler: a broken tar is counted as one bad sample, then skipped."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and (".tar" in a or "/" in a)), "?")
        self.bad(url, "?", "tar_error", f"{type(exn).__name__}: {exn}", count_as_seen=True)
        return True

    def _over_message(self, seen: int, bad: int) -> str:
        return (
            f"{self.name}: {bad} of {seen} samples were bad ({bad / max(seen, 1):.1%}), more than "
            f"max_bad_fraction={self.max_bad_fraction}; last: {self._last.value.decode('utf-8', 'replace')}. "
            "Fix or drop those samples (`dystream data index DIR` lists incomplete samples) or raise max_bad_fraction."
        )

    def snapshot(self) -> dict[str, Any]:
        with self._counts.get_lock():
            counts = list(self._counts)
            last = self._last.value.decode("utf-8", "replace")
        return {
            "seen": counts[0],
            "bad": counts[1],
            "repaired": counts[2],
            "reasons": {r: c for r, c in zip(REASONS, counts[3:], strict=True) if c},
            "last": last,
        }

    def end_of_epoch(self, epoch: int) -> dict[str, Any]:
        """Log the epoch's counts; raise BadDataError over the threshold. Returns the counts."""
        report = self.snapshot()
        if report["bad"] or report["repaired"]:
            log.warning(
                "%s epoch %d: %d of %d samples skipped %s, %d repaired",
                self.name,
                epoch,
                report["bad"],
                report["seen"],
                report["reasons"],
                report["repaired"],
            )
        if report["seen"] and report["bad"] > self.max_bad_fraction * report["seen"]:
            raise BadDataError(self._over_message(report["seen"], report["bad"]))
        return report


# ---------------------------------------------------------------------------------------------
# Decoding one sample into one training window
# ---------------------------------------------------------------------------------------------


class ClipDecoder:
    """Raw sample (bytes per field) -> one window of the batch contract (docs/architecture.md).

    Args:
        window_frames: T, frames per window.
        num_references: R, reference frames taken from outside the window.
        size: output frames are size x size (centre square crop, then antialiased resize).
        decode_threads: decord threads per reader.
    """

    def __init__(self, window_frames: int, num_references: int, size: int, decode_threads: int = 1) -> None:
        self.window_frames, self.num_references = window_frames, num_references
        self.size, self.decode_threads = size, decode_threads

    # -- checks that need no video decoding ----------------------------------------------------
    def _fields(self, sample: dict[str, Any]) -> None:
        present = {k for k in sample if not k.startswith("__")}
        unknown = present - set(ALL_FIELDS)
        dotted = sorted(e for e in unknown if e.split(".", 1)[-1] in ALL_FIELDS)
        if dotted:
            raise BadSample(
                "dotted_key",
                f"the key contains a dot: its members were read as key {sample['__key__']!r} with extensions "
                f"{dotted}; re-pack with dot-free keys",
            )
        missing = [f for f in REQUIRED_FIELDS if f not in sample]
        if missing:
            raise BadSample("missing_field", f"missing {missing} (has {sorted(present)})")
        empty = [f for f in REQUIRED_FIELDS if not sample[f]]
        if empty:
            reason = "bad_audio" if all(f.endswith(".wav") for f in empty) else "missing_field"
            raise BadSample(reason, f"empty member(s) {empty}")

    def _meta(self, sample: dict[str, Any]) -> tuple[dict[str, Any], int]:
        try:
            meta = json.loads(sample["json"])
            fps, n_frames = float(meta["fps"]), int(meta["n_frames"])
        except (ValueError, KeyError, TypeError) as exn:
            raise BadSample("bad_metadata", f"json unreadable or without fps/n_frames ({exn})") from None
        if abs(fps - FPS) > 1e-3:
            raise BadSample("bad_metadata", f"fps is {fps}, the format needs {FPS}; re-pack with `dystream data pack`")
        return meta, n_frames

    def _audio(self, sample: dict[str, Any], name: str, n_frames: int, repairs: list[str]) -> np.ndarray:
        try:
            audio, rate = decode_wav(sample[name], SAMPLE_RATE)
        except ValueError as exn:
            raise BadSample("bad_audio", f"{name}: {exn}") from None
        if rate != SAMPLE_RATE:
            repairs.append(f"{name} resampled {rate} -> {SAMPLE_RATE} Hz")
        expected = n_frames * SAMPLES_PER_FRAME
        if abs(audio.shape[0] - expected) > SAMPLES_PER_FRAME:
            raise BadSample(
                "length_mismatch",
                f"{name} has {audio.shape[0]} samples, {n_frames} frames need {expected} (16 kHz, 640 per frame)",
            )
        if audio.shape[0] != expected:  # off by less than one frame: pad with silence or trim
            repairs.append(f"{name} length {audio.shape[0]} -> {expected}")
            audio = np.pad(audio[:expected], (0, max(0, expected - audio.shape[0])))
        return audio

    def window(self, n_frames: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """A random window start and R reference indices from outside the window."""
        t = self.window_frames
        start = int(rng.integers(0, n_frames - t + 1))
        outside = np.concatenate([np.arange(0, start), np.arange(start + t, n_frames)])
        refs = rng.choice(outside, self.num_references, replace=outside.size < self.num_references)
        return start, refs.astype(np.int64)

    @staticmethod
    def _frames_pyav(data: bytes, order: np.ndarray) -> np.ndarray:
        """Sorted frame indices decoded sequentially with PyAV (the fallback decoder)."""
        import av

        wanted, out = set(order.tolist()), {}
        with av.open(io.BytesIO(data)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= order[-1]:
                    break
        if len(out) != order.size:
            raise ValueError(f"PyAV decoded only {len(out)} of {order.size} requested frames")
        return np.stack([out[i] for i in order.tolist()])

    def _frames(self, data: bytes, indices: np.ndarray, n_frames: int, repairs: list[str]) -> np.ndarray:
        import decord

        try:
            reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=self.decode_threads)
        except Exception as exn:  # decord raises DECORDError / RuntimeError on unreadable containers
            raise BadSample("corrupt_video", f"cannot open mp4 ({type(exn).__name__}: {str(exn)[:200]})") from None
        order = np.unique(indices)  # one forward pass over sorted indices
        try:
            if len(reader) != n_frames:
                raise BadSample(
                    "length_mismatch", f"mp4 has {len(reader)} frames, json n_frames is {n_frames} (truncated?)"
                )
            try:
                frames = reader.get_batch(order.tolist()).asnumpy()
            except Exception as exn:
                # decord fails on some narrow frames (e.g. 16 or 48 pixels wide: "The size must exactly
                # match"); PyAV decodes those, so only a file that PyAV cannot decode either is corrupt.
                try:
                    frames = self._frames_pyav(data, order)
                except Exception as exn2:
                    raise BadSample(
                        "corrupt_video", f"decoding failed (decord: {str(exn)[-160:]}; PyAV: {str(exn2)[:160]})"
                    ) from None
                repairs.append(f"decoded with PyAV after decord failed ({str(exn)[-80:]})")
        finally:
            del reader
        if frames.ndim != 4 or frames.shape[0] != order.size or frames.shape[-1] != 3:
            raise BadSample("corrupt_video", f"decoded an unexpected array {frames.shape}")
        return frames[np.searchsorted(order, indices)]

    def _resize(self, frames: np.ndarray, kpts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [N, H, W, 3] -> float32 [N, 3, size, size] in [-1, 1]; keypoints follow the same map.

        Per-sample arithmetic stays in numpy (single-threaded): torch's intra-op threads on tiny
        tensors cost more than they save when the cores are busy (4x slower measured on 2 cores);
        torch is used only for the antialiased resize.
        """
        h, w = frames.shape[1:3]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = frames[:, top : top + side, left : left + side].transpose(0, 3, 1, 2)  # [N, 3, side, side]
        if side != self.size:
            t = torch.from_numpy(np.ascontiguousarray(x)).float()
            t = F.interpolate(t, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            x = np.clip(t.numpy() * (1.0 / 127.5) - 1.0, -1.0, 1.0)
        else:
            x = x.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
        if kpts is not None:
            kpts = square_crop_keypoints(kpts, h, w, self.size)
        return x.astype(np.float32, copy=False), kpts

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, repairs: list[str]) -> dict[str, Any]:
        self._fields(sample)
        meta, n_frames = self._meta(sample)
        t, r = self.window_frames, self.num_references
        try:
            mask = decode_npy(sample["mask.npy"])
        except Exception as exn:
            raise BadSample("missing_field", f"mask.npy unreadable ({exn})") from None
        if mask.ndim != 1 or mask.shape[0] != n_frames:
            raise BadSample("length_mismatch", f"mask has shape {mask.shape}, json n_frames is {n_frames}")
        if n_frames < t + 1:
            raise BadSample("too_short", f"{n_frames} frames, the window needs {t} plus 1 reference frame outside it")
        kpts = None
        if "kpts.npy" in sample:
            try:
                kpts = decode_npy(sample["kpts.npy"])
            except Exception as exn:
                raise BadSample("bad_keypoints", f"kpts.npy unreadable ({exn})") from None
            if kpts.ndim != 3 or kpts.shape[2] != 3 or not np.issubdtype(kpts.dtype, np.floating):
                raise BadSample("bad_keypoints", f"kpts must be float [T, K, 3], got {kpts.dtype} {kpts.shape}")
            if kpts.shape[0] != n_frames:
                raise BadSample("length_mismatch", f"kpts has {kpts.shape[0]} frames, json n_frames is {n_frames}")
        audio_self = self._audio(sample, "self.wav", n_frames, repairs)
        audio_other = self._audio(sample, "other.wav", n_frames, repairs)
        start, refs = self.window(n_frames, rng)
        indices = np.concatenate([np.arange(start, start + t), refs])
        frames = self._frames(sample["mp4"], indices, n_frames, repairs)
        win_kpts = None if kpts is None else kpts[start : start + t].astype(np.float32)
        pixels, win_kpts = self._resize(frames, win_kpts)
        a0, a1 = start * SAMPLES_PER_FRAME, (start + t) * SAMPLES_PER_FRAME
        out = {
            "video": torch.from_numpy(np.ascontiguousarray(pixels[:t].transpose(1, 0, 2, 3))),  # [3, T, H, W]
            "references": torch.from_numpy(np.ascontiguousarray(pixels[t:])),  # [R, 3, H, W]
            "audio_self": torch.from_numpy(np.ascontiguousarray(audio_self[a0:a1])),
            "audio_other": torch.from_numpy(np.ascontiguousarray(audio_other[a0:a1])),
            "mask": torch.from_numpy(mask[start : start + t].astype(np.float32)),
            "key": sample["__key__"],
            "start": start,  # window position and reference frame indices: not collated, for tests and tools
            "ref_indices": refs,
        }
        assert out["references"].shape[0] == r
        if win_kpts is not None:
            out["kpts"] = torch.from_numpy(win_kpts)
        return out


def square_crop_keypoints(kpts: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Keypoints ``[..., K, 3]`` (x, y, confidence) in pixels of ``height x width`` frames -> pixels of the frames
    centre-cropped to a square and resized to ``size`` (the map of `ClipDecoder` and `dystream data encode`); a point
    that leaves the frame gets confidence 0."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    kpts = np.array(kpts, dtype=np.float32)
    scale = size / side
    kpts[..., 0] = (kpts[..., 0] - left) * scale
    kpts[..., 1] = (kpts[..., 1] - top) * scale
    outside = (kpts[..., 0] < 0) | (kpts[..., 0] >= size) | (kpts[..., 1] < 0) | (kpts[..., 1] >= size)
    kpts[..., 2] = np.where(outside, 0.0, kpts[..., 2])
    return kpts


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack windows into the batch contract. `kpts` is kept only if every sample has it with the same K."""
    keys = ["video", "references", "audio_self", "audio_other", "mask"]
    shapes = {tuple(s["kpts"].shape) if "kpts" in s else None for s in samples}
    if len(shapes) == 1 and None not in shapes:
        keys.append("kpts")
    # numpy stacks single-threaded (see ClipDecoder._resize); from_numpy shares the memory
    batch: dict[str, Any] = {k: torch.from_numpy(np.stack([s[k].numpy() for s in samples])) for k in keys}
    batch["key"] = [s["key"] for s in samples]
    return batch


# ---------------------------------------------------------------------------------------------
# The per-worker stream
# ---------------------------------------------------------------------------------------------


def worker_info() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers), as WebDataset's splitters see them."""
    from webdataset.utils import pytorch_worker_info

    return pytorch_worker_info()


class ShardStream(IterableDataset):
    """Decoded windows from shards, batched inside each worker.

    Args:
        urls: shard paths.
        decoder: `(raw sample, rng, repairs) -> window dict`, raising BadSample to skip a sample.
        ledger: bad-sample counters.
        batch_size: windows per batch; 0 yields single windows (tests, tools).
        split: "shard" (split_by_node + split_by_worker on the shard list) or "sample" (every
            worker reads every shard and keeps every (ranks x workers)-th sample).
        shuffle: shuffle shard order per pass and samples in a buffer of `shuffle_buffer`.
        deterministic: windows seeded by the key (validation) instead of by the stream.
        resampled: draw shards with replacement instead of splitting them.
        repeat: loop over the worker's shards forever (the loader cuts epochs).
        collate_fn: list of decoded samples -> batch; default `collate` (the video batch contract).
        node: (rank, world size) as the Trainer reports them; None = as WebDataset's
            `split_by_node` finds them (RANK/WORLD_SIZE or torch.distributed). Passing them keeps
            worker processes correct however they were started (a spawned worker does not
            inherit the process group).
    """

    def __init__(
        self,
        urls: list[str],
        decoder: Callable[[dict[str, Any], np.random.Generator, list[str]], dict[str, Any]],
        ledger: BadSampleLedger,
        batch_size: int,
        split: str = "shard",
        shuffle: bool = True,
        shuffle_buffer: int = 64,
        seed: int = 0,
        deterministic: bool = False,
        resampled: bool = False,
        repeat: bool = True,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        node: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if split not in ("shard", "sample"):
            raise ValueError(f"split must be 'shard' or 'sample', got {split!r}")
        self.urls, self.decoder, self.ledger = list(urls), decoder, ledger
        self.batch_size, self.split, self.shuffle, self.shuffle_buffer = batch_size, split, shuffle, shuffle_buffer
        self.seed, self.deterministic, self.resampled, self.repeat = seed, deterministic, resampled, repeat
        self.collate_fn = collate_fn or collate
        self.node = node
        self.epoch = 0  # set from the main process before each epoch (fresh workers pick it up)
        self._iterations = 0  # counts restarts inside a persistent worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _info(self) -> tuple[int, int, int, int]:
        rank, world, worker, workers = worker_info()
        if self.node is not None:
            rank, world = self.node
        return rank, world, worker, workers

    def _split_by_node(self, src: Iterator[str]) -> Iterator[str]:
        import webdataset as wds

        if self.node is None:  # rank and world size from the environment or torch.distributed
            return wds.split_by_node(src)
        rank, world = self.node  # the same slicing, with the rank the Trainer reported
        return itertools.islice(src, rank, None, world)

    def _worker_shards(self) -> list[str]:
        import webdataset as wds

        if self.resampled or self.split == "sample":
            return self.urls
        shards = list(wds.split_by_worker(self._split_by_node(iter(self.urls))))
        if not shards:
            rank, world, worker, workers = self._info()
            raise RuntimeError(
                f"rank {rank} worker {worker} got no shard: {len(self.urls)} shard(s) for {world} rank(s) x "
                f"{workers} worker(s); use at least ranks x workers shards (re-pack with a smaller --shard-samples) "
                "or resampled=True"
            )
        return shards

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        """Decoded windows of this worker, unbatched."""
        from webdataset.filters import _shuffle

        rank, world, worker, workers = self._info()
        shards = self._worker_shards()
        self._iterations += 1
        base = [self.seed, self.epoch, self._iterations]
        for p in itertools.count():
            rng = np.random.default_rng(base + [p, rank, worker])
            if self.resampled:
                order = [shards[i] for i in rng.integers(0, len(shards), max(1, len(shards) // (world * workers)))]
            elif self.shuffle:
                # split by sample: every worker must read the shards in the same order to stay disjoint
                order_rng = np.random.default_rng(base + [p]) if self.split == "sample" else rng
                order = [shards[i] for i in order_rng.permutation(len(shards))]
            else:
                order = shards
            raw = read_shards(order, self.ledger.tar_handler)
            if self.split == "sample":
                raw = itertools.islice(raw, rank * workers + worker, None, world * workers)
            if self.shuffle and self.shuffle_buffer > 1:
                pyrng = random.Random(int(rng.integers(2**63)))
                raw = _shuffle(raw, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=pyrng)
            good = 0
            for sample in raw:
                out = self._decode(sample, rng)
                if out is not None:
                    good += 1
                    yield out
            if good == 0 and not self.resampled:
                raise BadDataError(
                    f"{self.ledger.name}: rank {rank} worker {worker} found no usable sample in a full pass over "
                    f"{len(order)} shard(s) ({order[:3]}...); see the warnings above"
                )
            if not self.repeat:
                return

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
        self.ledger.seen()
        if self.deterministic:
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        repairs: list[str] = []
        try:
            out = self.decoder(sample, rng, repairs)
        except BadSample as exn:
            self.ledger.bad(shard, key, exn.reason, exn.message)
            return None
        except BadDataError:
            raise
        except Exception as exn:  # anything unforeseen is still one bad sample, never a dead worker
            self.ledger.bad(shard, key, "corrupt_video", f"unexpected {type(exn).__name__}: {exn}")
            return None
        if repairs:
            self.ledger.repaired(shard, key, "; ".join(repairs))
        out["shard"] = shard
        return out

    def __iter__(self) -> Iterator[Any]:
        if self.batch_size == 0:
            yield from self.iter_samples()
            return
        buf: list[dict[str, Any]] = []
        for sample in self.iter_samples():
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield self.collate_fn(buf)
                buf = []


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # resizing in the workers must not oversubscribe the cores


class EpochLoader:
    """Exactly `n_batches` batches per epoch from a WebLoader; reports bad samples when an epoch ends."""

    def __init__(self, loader: Any, n_batches: int, stream: ShardStream, ledger: BadSampleLedger) -> None:
        self.loader, self.n_batches, self.stream, self.ledger = loader, n_batches, stream, ledger
        self.epoch = 0
        self.last_report: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(self.epoch)
        self.ledger.reset()
        yield from self.loader
        self.last_report = self.ledger.end_of_epoch(self.epoch)
        self.epoch += 1


# ---------------------------------------------------------------------------------------------
# The DataModule
# ---------------------------------------------------------------------------------------------


def _has_shards(folder: Path) -> bool:
    return (folder / INDEX_NAME).exists() or any(folder.glob("*.tar"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def synthesize_default(root: Path, size: int, seed: int, timeout_s: float = 3600.0) -> None:
    """Write the embedded default dataset under `root` once, however many processes ask at once.

    The first process to create `root/.synthesize.lock` writes; the others wait for the index
    (written last). A lock left by a dead process on this host is removed.
    """
    from dystream.datamodules.synthetic import synthesize

    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".synthesize.lock"
    deadline = time.monotonic() + timeout_s
    while True:
        if (root / "train" / INDEX_NAME).exists():
            return
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split(":")
                if host == socket.gethostname() and not _pid_alive(int(pid)):
                    lock.unlink(missing_ok=True)
                    continue
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {timeout_s:.0f} s for another process to synthesize {root} ({lock})"
                ) from None
            time.sleep(1.0)
            continue
        try:
            os.write(fd, f"{socket.gethostname()}:{os.getpid()}".encode())
            os.close(fd)
            log.warning("no shards in %s: synthesizing the embedded default dataset there (%s)", root, DEFAULT_SYNTH)
            synthesize(root, size=size, seed=seed, workers=min(os.cpu_count() or 1, 4), log=True, **DEFAULT_SYNTH)
        finally:
            lock.unlink(missing_ok=True)
        return


def _int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _path(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


# Argument checks of SpeakerVidDataModule: name -> (predicate, what it must be).
_ARG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train_shards": (_path, "a non-empty path or brace pattern"),
    "val_shards": (lambda v: v is None or _path(v), "None or a non-empty path or brace pattern"),
    "window_frames": (lambda v: _int(v, 4) and v % 4 == 0, "a positive multiple of 4"),
    "num_references": (lambda v: _int(v, 1), "an int >= 1"),
    "size": (lambda v: _int(v, 16) and v % 2 == 0, "an even int >= 16"),
    "batch_size": (lambda v: _int(v, 1), "an int >= 1"),
    "num_workers": (lambda v: _int(v, 0), "an int >= 0"),
    "samples_per_epoch": (lambda v: v is None or _int(v, 1), "None or an int >= 1"),
    "shuffle_buffer": (lambda v: _int(v, 1), "an int >= 1"),
    "max_bad_fraction": (lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "decode_threads": (lambda v: _int(v, 1), "an int >= 1"),
    "seed": (lambda v: isinstance(v, int), "an int"),
}


class SpeakerVidDataModule(L.LightningDataModule):
    """Windows of talking/listening clips from SpeakerVid-style WebDataset shards (docs/data.md).

    Every batch is a dict: `video` float32 [B, 3, T, H, W] in [-1, 1]; `references` float32
    [B, R, 3, H, W] (frames of the same clip outside the window); `audio_self`, `audio_other`
    float32 [B, T * 640] (16 kHz); `mask` float32 [B, T] (1 = the person speaks); `kpts` float32
    [B, T, K, 3] when every sample has keypoints; `key` list of str.

    Args:
        train_shards: training shards: a folder with index.json, a brace pattern
            (`dir/shard-{000000..000099}.tar`), or one tar.
        val_shards: validation shards, same forms; None disables validation.
        window_frames: T, frames per training window; a multiple of 4 (one latent frame = 4 video frames).
        num_references: R, reference frames per window, drawn from outside the window.
        size: frames are centre-cropped to a square and resized to size x size pixels.
        batch_size: windows per batch, per rank.
        num_workers: DataLoader worker processes per rank (0 = decode in the main process).
        samples_per_epoch: training windows per epoch over all ranks; None = the number of
            training clips in the index. Each rank yields ceil(samples_per_epoch / (batch_size x ranks)) batches.
        shuffle_buffer: undecoded samples held in each worker's shuffle buffer.
        resampled: draw training shards with replacement (any shard count works for any number of ranks x workers).
        max_bad_fraction: stop with an error when more than this fraction of samples is bad.
        decode_threads: decord decoding threads per worker.
        seed: seed of shard order, shuffling and window positions.
        synthesize_if_missing: when `train_shards` is the embedded default (`data/synthetic/train`)
            and holds no shards, write the synthetic dataset there in `prepare_data` (64 train and
            16 validation clips of 4 s at `size`).
    """

    def __init__(
        self,
        train_shards: str = DEFAULT_TRAIN_SHARDS,
        val_shards: str | None = DEFAULT_VAL_SHARDS,
        window_frames: int = 12,
        num_references: int = 1,
        size: int = 64,
        batch_size: int = 4,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 64,
        resampled: bool = False,
        max_bad_fraction: float = 0.05,
        decode_threads: int = 1,
        seed: int = 0,
        synthesize_if_missing: bool = True,
    ) -> None:
        super().__init__()
        args = locals()
        for name, (ok, need) in _ARG_RULES.items():
            if not ok(args[name]):
                raise ValueError(f"SpeakerVidDataModule: {name} must be {need}, got {args[name]!r}")
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.window_frames, self.num_references, self.size = window_frames, num_references, size
        self.batch_size, self.num_workers, self.samples_per_epoch = batch_size, num_workers, samples_per_epoch
        self.shuffle_buffer, self.resampled, self.max_bad_fraction = shuffle_buffer, resampled, float(max_bad_fraction)
        self.decode_threads, self.seed, self.synthesize_if_missing = decode_threads, seed, synthesize_if_missing
        self._train_set: ShardSet | None = None
        self._val_set: ShardSet | None = None
        self.loaders: dict[str, EpochLoader] = {}

    # -- data preparation ----------------------------------------------------------------------
    def _is_embedded_default(self) -> bool:
        return os.path.normpath(self.train_shards) == os.path.normpath(DEFAULT_TRAIN_SHARDS)

    def prepare_data(self) -> None:
        train = Path(self.train_shards)
        if self.synthesize_if_missing and self._is_embedded_default() and not _has_shards(train):
            synthesize_default(train.parent, size=self.size, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.synthesize_if_missing and self._is_embedded_default():
            # prepare_data runs on one process per node; the others may arrive before it is done.
            synthesize_default(Path(self.train_shards).parent, size=self.size, seed=self.seed)
        if stage in (None, "fit") and self._train_set is None:
            self._train_set = resolve_shards(self.train_shards)
        evaluated = stage in (None, "fit", "validate", "test", "predict")
        if self.val_shards is not None and evaluated and self._val_set is None:
            self._val_set = resolve_shards(self.val_shards)

    # -- hooks for subclasses (e.g. cached-latent shards, see docs/data.md) ----------------------
    def make_decoder(self, split: str) -> Callable[[dict[str, Any], np.random.Generator, list[str]], dict[str, Any]]:
        """The per-sample decoder of a split ("train" or "val"): `(raw sample, rng, repairs) -> window`.

        It raises `BadSample(reason, message)` for a sample to skip and appends to `repairs` what
        it fixed. Override (with `make_collate`) to read another shard format, e.g. the cached
        latents of `dystream.datamodules.latents`; sharding, epochs and bad-sample accounting stay.
        """
        return ClipDecoder(self.window_frames, self.num_references, self.size, self.decode_threads)

    def make_collate(self, split: str) -> Callable[[list[dict[str, Any]]], Any]:
        """Decoded windows -> one batch; the default builds the video batch of docs/architecture.md."""
        return collate

    # -- loaders --------------------------------------------------------------------------------
    def _node(self) -> tuple[int, int] | None:
        """(global rank, world size) from the attached Trainer, else None (environment / torch.distributed)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return None

    def _world(self) -> int:
        node = self._node()
        return node[1] if node is not None else worker_info()[1]

    def _loader(self, stream: ShardStream, workers: int, n_batches: int, ledger: BadSampleLedger) -> EpochLoader:
        import webdataset as wds

        loader = wds.WebLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        ).with_epoch(n_batches)
        return EpochLoader(loader, n_batches, stream, ledger)

    def train_dataloader(self) -> EpochLoader:
        if self._train_set is None:
            self.setup("fit")
        shards = self._train_set
        world = self._world()
        if not self.resampled and len(shards.urls) < world * max(1, self.num_workers):
            raise ValueError(
                f"train_shards={self.train_shards!r} has {len(shards.urls)} shard(s), fewer than ranks x workers = "
                f"{world} x {max(1, self.num_workers)}: some worker would get no data. Re-pack into more shards "
                "(`dystream data pack --shard-samples`), lower num_workers, or set resampled=True."
            )
        total = self.samples_per_epoch or shards.total or self._count(shards)
        n_batches = math.ceil(total / (self.batch_size * world))
        ledger = BadSampleLedger("train", self.max_bad_fraction)
        stream = ShardStream(
            shards.urls,
            self.make_decoder("train"),
            ledger,
            self.batch_size,
            split="shard",
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            resampled=self.resampled,
            collate_fn=self.make_collate("train"),
            node=self._node(),
        )
        self.loaders["train"] = self._loader(stream, self.num_workers, n_batches, ledger)
        return self.loaders["train"]

    def val_dataloader(self) -> EpochLoader | list:
        if self.val_shards is None:
            return []
        if self._val_set is None:
            self.setup("validate")
        shards = self._val_set
        world = self._world()
        total = shards.total if shards.total is not None else self._count(shards)
        if total < world:
            raise ValueError(f"val_shards={self.val_shards!r} has {total} sample(s), fewer than the {world} ranks")
        # Every (rank, worker) slot must own at least one sample, or its stream would be empty.
        workers = min(self.num_workers, total // world)
        n_batches = math.ceil(total / world / self.batch_size)
        ledger = BadSampleLedger("val", self.max_bad_fraction)
        stream = ShardStream(
            shards.urls,
            self.make_decoder("val"),
            ledger,
            self.batch_size,
            split="sample",
            shuffle=False,
            seed=self.seed,
            deterministic=True,
            collate_fn=self.make_collate("val"),
            node=self._node(),
        )
        self.loaders["val"] = self._loader(stream, workers, n_batches, ledger)
        return self.loaders["val"]

    def test_dataloader(self) -> EpochLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> EpochLoader | list:
        """The validation windows: `dystream predict` with a teacher recipe samples videos for them."""
        return self.val_dataloader()

    @staticmethod
    def _count(shards: ShardSet) -> int:
        log.info("no index for %s: counting samples by scanning tar headers", shards.spec)
        return sum(scan_shard(u)["samples"] for u in shards.urls)

    def bad_sample_report(self) -> dict[str, Any]:
        """Counts of the current epoch per loader: seen, bad (by reason), repaired, last message."""
        return {name: loader.ledger.snapshot() for name, loader in self.loaders.items()}
