"""ODE pairs: the teacher's sampling trajectories at the student's timesteps, as WebDataset shards.

StreamAvatar §3.1.1 (after CausVid): the teacher generates avatar videos from reference images and
audio; its denoising trajectories, kept only at the few-step student's noise levels, become the
dataset of the ODE-regression initialisation. The SiD stage reuses the same shards as its prompt
set (reference + audio, no video) and their held-out split as a teacher-distance check.

One sample per clip window, two members (keys without dots, as in docs/data.md):

    KEY.pair.safetensors   tensors (safetensors: no pickled code is ever loaded)
        states        float32 [K, z, F, h, w]  sampler state before each recorded step; latent frame 0 is
                                               the clean reference; states[0] at sigma 1 is the start noise
        sigmas        float64 [K]              noise level of each state (the student's sigmas, decreasing)
        x0            float32 [z, F, h, w]     the trajectory's clean end point (frame 0 = reference latent)
        audio_talk    float32 [T, D]           own-voice features x speaking mask (what the DiT consumes)
        audio_listen  float32 [T, D]           partner features x (1 - mask)
        mask          float32 [T]              speaking (1) / listening (0)
        audio_self    float32 [T * 640]        the raw 16 kHz tracks, so features can be recomputed
        audio_other   float32 [T * 640]
        reference     uint8   [3, H, W]        the reference image (the reference-guided VAE decodes with it)
    KEY.json               {"key", "clip", "start", "split", ...}

Shards are named ``<split>-r<rank>-<n>.tar`` (split ``train`` or ``val``; every rank of a predict run
writes its own), and ``index.json`` beside them lists them with their sample counts and the recording
settings. The index is written last, once every rank has finished, so its presence means "done".
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from dystream.datamodules.speakervid import BadSampleLedger, ShardStream, SpeakerVidDataModule, collate, worker_info

PAIR_FORMAT = "dystream-ode-pairs/1"
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
TENSOR_MEMBER = "pair.safetensors"
# every tensor a pair holds, and its dtype
PAIR_TENSORS = {
    "states": torch.float32,
    "sigmas": torch.float64,
    "x0": torch.float32,
    "audio_talk": torch.float32,
    "audio_listen": torch.float32,
    "mask": torch.float32,
    "audio_self": torch.float32,
    "audio_other": torch.float32,
    "reference": torch.uint8,
}
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_SHARD_RE = re.compile(r"^(train|val)-r\d+-\d+\.tar$")


# ---------------------------------------------------------------------------------------------
# One pair <-> bytes
# ---------------------------------------------------------------------------------------------


def encode_pair(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, bytes]:
    """Per-clip tensors (see the module docstring) -> the members of one WebDataset sample."""
    missing = sorted(set(PAIR_TENSORS) - set(tensors))
    unknown = sorted(set(tensors) - set(PAIR_TENSORS))
    if missing or unknown:
        raise ValueError(f"encode_pair: missing tensors {missing}, unknown tensors {unknown}")
    k, z, f = tensors["states"].shape[:3]
    if tensors["sigmas"].shape != (k,) or tensors["x0"].shape != tensors["states"].shape[1:]:
        raise ValueError(
            f"encode_pair: states {tuple(tensors['states'].shape)}, sigmas {tuple(tensors['sigmas'].shape)} and "
            f"x0 {tuple(tensors['x0'].shape)} disagree (need [K, z, F, h, w], [K], [z, F, h, w])"
        )
    out = {name: tensors[name].detach().to("cpu", dtype).contiguous() for name, dtype in PAIR_TENSORS.items()}
    return {
        TENSOR_MEMBER: save_safetensors(out),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def decode_pair(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw WebDataset sample (member bytes) -> tensors + meta, with a clear error naming the sample."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    if TENSOR_MEMBER not in sample:
        raise ValueError(f"ODE pair {key!r} in {url} has no {TENSOR_MEMBER} member (members: {sorted(sample)})")
    tensors = load_safetensors(sample[TENSOR_MEMBER])
    missing = sorted(set(PAIR_TENSORS) - set(tensors))
    if missing:
        raise ValueError(f"ODE pair {key!r} in {url} lacks tensors {missing}; regenerate the pairs")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return {**tensors, "key": key, "meta": meta}


def collate_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded pairs into a batch.

    Keys: ``states [B, K, z, F, h, w]``, ``sigmas [B, K]``, ``x0 [B, z, F, h, w]``, ``reference_latent
    [B, z, 1, h, w]``, ``audio_talk``/``audio_listen [B, T, D]``, ``mask [B, T]``, ``audio_self``/
    ``audio_other [B, T * 640]``, ``references [B, 1, 3, H, W]`` float in [-1, 1] (the batch contract's
    reference key, so a stage can decode with the reference-guided VAE), ``key``.
    """
    shapes = {tuple(s["states"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate_pairs: pairs of different shapes in one batch {sorted(shapes)}")
    batch: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in PAIR_TENSORS if k != "reference"}
    batch["reference_latent"] = batch["x0"][:, :, :1]
    ref = torch.stack([s["reference"] for s in samples]).float() / 127.5 - 1.0  # [B, 3, H, W]
    batch["references"] = ref[:, None]
    batch["key"] = [s["key"] for s in samples]
    return batch


def reference_to_uint8(image: Tensor) -> Tensor:
    """A reference image in [-1, 1] ``[3, H, W]`` -> uint8 for storage."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Writing shards and the index
# ---------------------------------------------------------------------------------------------


class PairShardWriter:
    """Writes pairs of one split from one rank into ``<split>-r<rank>-<n>.tar`` of at most ``max_samples``.

    A shard is written under a ``.tmp`` name and renamed when complete, so a crash never leaves a
    half-written shard that looks complete.
    """

    def __init__(self, folder: str | os.PathLike, split: str, rank: int = 0, max_samples: int = 256) -> None:
        if split not in SPLITS:
            raise ValueError(f"PairShardWriter: split must be one of {SPLITS}, got {split!r}")
        if max_samples < 1:
            raise ValueError(f"PairShardWriter: max_samples must be >= 1, got {max_samples}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.rank, self.max_samples = split, rank, max_samples
        self.shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._writer = self._file = self._path = None
        self._count = 0

    def write(self, key: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        import webdataset as wds

        if not _KEY_RE.match(key):
            raise ValueError(f"PairShardWriter: key {key!r} must match {_KEY_RE.pattern} (no dots, no slashes)")
        if key in self._keys:
            raise ValueError(f"PairShardWriter: duplicate key {key!r}")
        self._keys.add(key)
        members = encode_pair(tensors, {**meta, "key": key, "split": self.split})
        if self._writer is not None and self._count >= self.max_samples:
            self._finish()
        if self._writer is None:
            name = f"{self.split}-r{self.rank:03d}-{len(self.shards):06d}.tar"
            self._path = self.folder / name
            self._file = open(self.folder / (name + ".tmp"), "wb")
            self._writer = wds.TarWriter(self._file, encoder=False)
            self._count = 0
        self._writer.write({"__key__": key, **members})
        self._count += 1

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        os.replace(self.folder / (self._path.name + ".tmp"), self._path)
        self.shards.append({"name": self._path.name, "split": self.split, "samples": self._count})
        self._writer = self._file = None

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def clear_pairs(folder: str | os.PathLike) -> None:
    """Remove the index and the pair shards (and leftovers of a crashed run) from ``folder``."""
    folder = Path(folder)
    (folder / INDEX_NAME).unlink(missing_ok=True)
    if folder.is_dir():
        for path in folder.iterdir():
            if _SHARD_RE.match(path.name) or (path.name.endswith(".tar.tmp") and _SHARD_RE.match(path.name[:-4])):
                path.unlink()


def count_tar_samples(path: str | os.PathLike) -> int:
    """Samples in one tar, from member names only."""
    keys = set()
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if member.isfile():
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def write_pair_index(folder: str | os.PathLike, **settings: Any) -> dict[str, Any]:
    """Scan the pair shards of ``folder`` and write ``index.json`` (atomically) with the recording settings."""
    folder = Path(folder)
    shards = []
    for path in sorted(p for p in folder.iterdir() if _SHARD_RE.match(p.name)):
        shards.append({"name": path.name, "split": path.name.split("-", 1)[0], "samples": count_tar_samples(path)})
    if not any(s["samples"] for s in shards):
        raise RuntimeError(f"write_pair_index: no ODE pairs were written to {folder}")
    index = {
        "format": PAIR_FORMAT,
        "total_samples": sum(s["samples"] for s in shards),
        "splits": {split: sum(s["samples"] for s in shards if s["split"] == split) for split in SPLITS},
        "shards": shards,
        **settings,
    }
    tmp = folder / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, folder / INDEX_NAME)
    return index


def read_pair_index(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no ODE pairs at {folder} ({path} is missing): record them with "
            "`dystream predict --config recipes/ode_pairs.yaml` (or `make train RECIPE=stage1_ode`, which builds them)"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); record the pairs again") from None
    if index.get("format") != PAIR_FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path} is not a {PAIR_FORMAT} index; record the pairs again")
    for shard in index["shards"]:
        if not (Path(folder) / shard["name"]).is_file():
            raise FileNotFoundError(f"{path} lists {shard['name']}, which is missing; record the pairs again")
    return index


# ---------------------------------------------------------------------------------------------
# Reading: a stream of decoded pairs per DataLoader worker
# ---------------------------------------------------------------------------------------------


class PairStream(IterableDataset):
    """Decoded, batched pairs.

    Training (``train=True``): every (rank, worker) reads the shards in its own random order, over
    and over (resampling, so any shard count serves any number of ranks x workers), through a
    shuffle buffer; the loader cuts epochs. Validation: one deterministic pass, every (rank, worker)
    keeps every (ranks x workers)-th pair.
    """

    def __init__(self, urls: list[str], batch_size: int, train: bool, shuffle_buffer: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.urls, self.batch_size, self.train = list(urls), batch_size, train
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch = 0

    def _raw(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        rank, world, worker, workers = worker_info()
        if not self.train:
            raw = wds.tarfile_samples([{"url": u} for u in self.urls])
            yield from itertools.islice(raw, rank * workers + worker, None, world * workers)
            return
        for p in itertools.count():
            rng = np.random.default_rng([self.seed, self.epoch, p, rank, worker])
            order = [self.urls[i] for i in rng.permutation(len(self.urls))]
            raw = wds.tarfile_samples([{"url": u} for u in order])
            buffer: list[dict[str, Any]] = []
            pyrng = random.Random(int(rng.integers(2**63)))
            for sample in raw:
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(pyrng.randrange(len(buffer)))
            pyrng.shuffle(buffer)
            yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        for sample in self._raw():
            batch.append(decode_pair(sample))
            if len(batch) == self.batch_size:
                yield collate_pairs(batch)
                batch = []
        if batch and not self.train:
            yield collate_pairs(batch)


class _Epochs:
    """Exactly ``n_batches`` batches per pass of an endless loader; tells the stream its epoch."""

    def __init__(self, loader: DataLoader, stream: PairStream, n_batches: int) -> None:
        self.loader, self.stream, self.n_batches = loader, stream, n_batches
        self.epoch = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.epoch = self.epoch
        self.epoch += 1
        yield from itertools.islice(self.loader, self.n_batches)


class ODEPairDataModule(L.LightningDataModule):
    """Batches of ODE pairs (see :func:`collate_pairs` for the keys) from ``recipes/ode_pairs.yaml``'s output.

    Args:
        pairs: the folder with the pair shards and ``index.json``.
        batch_size: pairs per batch, per rank.
        val_batch_size: pairs per validation batch (default: ``batch_size``).
        num_workers: DataLoader workers per rank (pairs need no decoding beyond safetensors: 0 is fine).
        samples_per_epoch: training pairs per epoch over all ranks; None = the training split's size.
        shuffle_buffer: pairs held in each worker's shuffle buffer.
        seed: seed of shard order and shuffling.
    """

    def __init__(
        self,
        pairs: str = "runs/ode_pairs/pairs",
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("val_batch_size", val_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("samples_per_epoch", samples_per_epoch, 1),
            ("shuffle_buffer", shuffle_buffer, 1),
        ):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"ODEPairDataModule: {name} must be an int >= {low}, got {value!r}")
        self.save_hyperparameters()
        self.pairs = pairs
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.samples_per_epoch = num_workers, samples_per_epoch
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.index: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.index is None:
            self.index = read_pair_index(self.pairs)

    def _urls(self, split: str) -> list[str]:
        self.setup()
        return [str(Path(self.pairs) / s["name"]) for s in self.index["shards"] if s["split"] == split and s["samples"]]

    def _world(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def train_dataloader(self) -> _Epochs:
        urls = self._urls("train")
        if not urls:
            raise ValueError(f"{self.pairs}: the index lists no training pairs; record them with more clips")
        total = self.samples_per_epoch or self.index["splits"]["train"]
        stream = PairStream(urls, self.batch_size, train=True, shuffle_buffer=self.shuffle_buffer, seed=self.seed)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers)
        return _Epochs(loader, stream, math.ceil(total / (self.batch_size * self._world())))

    def val_dataloader(self) -> DataLoader | list:
        urls = self._urls("val")
        if not urls:
            return []
        workers = min(self.num_workers, self.index["splits"]["val"] // self._world())  # no worker without pairs
        stream = PairStream(urls, self.val_batch_size, train=False)
        return DataLoader(stream, batch_size=None, num_workers=workers)


# ---------------------------------------------------------------------------------------------
# The prompts of a pair-recording run: clip windows from SpeakerVid shards
# ---------------------------------------------------------------------------------------------


class _PromptBatches(IterableDataset):
    """One deterministic pass over clip windows (reference + audio), capped at ``limit`` windows in all."""

    def __init__(self, stream: ShardStream, batch_size: int, limit: int | None, split: str) -> None:
        super().__init__()
        self.stream, self.batch_size, self.limit, self.split = stream, batch_size, limit, split

    def _batch(self, windows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(windows)
        batch["start"] = [int(w["start"]) for w in windows]
        batch["split"] = self.split
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = worker_info()
        slot, slots = rank * workers + worker, world * workers
        windows = self.stream.iter_samples()
        if self.limit is not None:  # this slot's share of the first `limit` windows
            windows = itertools.islice(windows, max(0, math.ceil((self.limit - slot) / slots)))
        buf: list[dict[str, Any]] = []
        for window in windows:
            buf.append(window)
            if len(buf) == self.batch_size:
                yield self._batch(buf)
                buf = []
        if buf:
            yield self._batch(buf)


class ODEPromptDataModule(SpeakerVidDataModule):
    """SpeakerVid windows as the prompts of an ODE-pair recording run (``dystream predict``).

    ``predict_dataloader`` returns two loaders, training and validation prompts, each one
    deterministic pass (window positions seeded by the clip key) split by sample across ranks and
    workers; every batch says its ``split``. All arguments of :class:`SpeakerVidDataModule` apply
    (``window_frames`` must be a multiple of 4 x the student's chunk).

    Args:
        num_clips: training clips to record (one window each); None = every training clip.
        num_val_clips: validation clips to record; None = every validation clip, 0 = none.
    """

    def __init__(self, num_clips: int | None = None, num_val_clips: int | None = None, **kwargs: Any) -> None:
        for name, value in (("num_clips", num_clips), ("num_val_clips", num_val_clips)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"ODEPromptDataModule: {name} must be None or an int >= 0, got {value!r}")
        super().__init__(**kwargs)
        self.num_clips, self.num_val_clips = num_clips, num_val_clips

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage == "predict":
            from dystream.datamodules.format import resolve_shards

            if self._train_set is None:
                self._train_set = resolve_shards(self.train_shards)
            if self.val_shards is not None and self._val_set is None and self.num_val_clips != 0:
                self._val_set = resolve_shards(self.val_shards)

    def _prompt_loader(self, split: str, shards: Any, limit: int | None) -> DataLoader:
        total = shards.total if shards.total is not None else self._count(shards)
        n = total if limit is None else min(limit, total)
        workers = min(self.num_workers, n // self._world())  # every worker must own at least one clip
        stream = ShardStream(
            shards.urls,
            self.make_decoder(split),
            BadSampleLedger(f"{split} prompts", self.max_bad_fraction),
            batch_size=0,
            split="sample",
            shuffle=False,
            seed=self.seed,
            deterministic=True,
            repeat=False,
        )
        return DataLoader(_PromptBatches(stream, self.batch_size, limit, split), batch_size=None, num_workers=workers)

    def predict_dataloader(self) -> list[DataLoader]:
        self.setup("predict")
        loaders = [self._prompt_loader("train", self._train_set, self.num_clips)]
        if self._val_set is not None and self.num_val_clips != 0:
            loaders.append(self._prompt_loader("val", self._val_set, self.num_val_clips))
        return loaders


def clip_noise_seed(seed: int, key: str) -> int:
    """A per-clip seed: the recorded noise depends on the clip, not on batch composition or rank."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


__all__ = [
    "ODEPairDataModule",
    "ODEPromptDataModule",
    "PairShardWriter",
    "PairStream",
    "clear_pairs",
    "clip_noise_seed",
    "collate_pairs",
    "decode_pair",
    "encode_pair",
    "read_pair_index",
    "reference_to_uint8",
    "write_pair_index",
]
