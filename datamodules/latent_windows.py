"""Training windows from cached-latent shards (`dystream data encode`), validation from the clip shards.

Once the VAE is frozen, encoding every training window again is wasted work (at 64x64 on a CPU the tiny-f4 encoder
costs as much as a mini DiT step; at Wan2.2 scale it dominates). `LatentDataModule` reads the latent shards of
`dystream.datamodules.latents` for training and the clip shards for validation, so validation losses, sampled videos
and metrics are computed exactly as with `SpeakerVidDataModule` (online encoding of a few batches).

A training batch holds what the DiT stages would have encoded, taken from the cache:

    latents      float32 [B, z, 1 + F, h, w]  latent frame 0: reference frame 0 encoded alone; then the F = T / 4
                                              latent frames of the window (video frames 4j .. 4(j + F) - 1, j >= 1)
    references   float32 [B, 1, 3, H, W]      reference frame 0 in [-1, 1] (the decoder's guidance for samples)
    audio_self, audio_other  float32 [B, T * 640]; mask float32 [B, T]; key list of str
    kpts         float32 [B, T, K, 3]         the window's keypoints in pixels of the encoded frames, when the
                                              shards carry them (the teacher's `mouth_weight` reads them)

The reference is always the clip's frame 0, because the cached latents were encoded with it as the VAE's guidance;
the window starts at latent frame 1 + j with j >= 1, so the reference lies outside it, as `ClipDecoder` draws it.
Unlike online encoding, a window's latents carry the causal encoder's view of the frames before it (as in a stream).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dystream.datamodules.format import SAMPLES_PER_FRAME, resolve_shards
from dystream.datamodules.latents import LATENT_FORMAT, read_latent_sample
from dystream.datamodules.speakervid import (
    DEFAULT_TRAIN_SHARDS,
    DEFAULT_VAL_SHARDS,
    BadSample,
    SpeakerVidDataModule,
    square_crop_keypoints,
    synthesize_default,
)

__all__ = ["LatentDataModule", "LatentWindowDecoder", "latent_collate", "read_latent_index"]


class LatentWindowDecoder:
    """One cached-latent sample -> a training window of `window_frames` video frames (module docstring)."""

    def __init__(self, window_frames: int) -> None:
        self.window_frames = window_frames

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, repairs: list[str]) -> dict[str, Any]:
        try:
            s = read_latent_sample(sample)
        except ValueError as exn:
            raise BadSample("missing_field", str(exn)) from None
        except Exception as exn:  # a truncated npy / wav member
            raise BadSample("bad_latents", f"unreadable latent sample ({type(exn).__name__}: {exn})") from None
        info = s["meta"].get("latents", {})
        per_latent = int(info.get("frames_per_latent", 4))
        t = self.window_frames
        if t % per_latent:
            raise BadSample("bad_latents", f"window of {t} frames is not a multiple of {per_latent} frames per latent")
        f = t // per_latent
        latents = s["latents"]  # [z, 1 + n, h, w]
        n = latents.shape[1] - 1
        if n < f + 1:
            raise BadSample(
                "too_short", f"{n} cached latent frames; the window needs {f} after the reference frame's first latent"
            )
        n_frames = int(s["meta"].get("n_frames", len(s["mask"])))
        if len(s["mask"]) != n_frames:
            raise BadSample("length_mismatch", f"mask has {len(s['mask'])} frames, json n_frames is {n_frames}")
        for name in ("audio_self", "audio_other"):
            if len(s[name]) < n_frames * SAMPLES_PER_FRAME:
                raise BadSample(
                    "length_mismatch", f"{name} has {len(s[name])} samples for {n_frames} frames (need x640)"
                )
        j = int(rng.integers(1, n - f + 1))  # latent frames 1 + j .. j + f, video frames 4j .. 4(j + f) - 1
        start = j * per_latent
        a0, a1 = start * SAMPLES_PER_FRAME, (start + t) * SAMPLES_PER_FRAME
        reference = s["references"][0].permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]
        window = {
            "latents": torch.cat([latents[:, :1], latents[:, 1 + j : 1 + j + f]], dim=1).contiguous(),
            "references": reference[None].contiguous(),
            "audio_self": s["audio_self"][a0:a1].float().contiguous(),
            "audio_other": s["audio_other"][a0:a1].float().contiguous(),
            "mask": s["mask"][start : start + t].contiguous(),
            "key": s["key"],
            "start": start,  # the window's first video frame: not collated, for tests and tools
        }
        kpts = window_keypoints(s, start, t)
        if kpts is not None:
            window["kpts"] = kpts
        return window


def window_keypoints(s: dict[str, Any], start: int, frames: int) -> torch.Tensor | None:
    """A latent sample's keypoints for video frames ``start .. start + frames - 1``, mapped from the source frames'
    pixels to the encoded frames' (`square_crop_keypoints`); None when the sample has none or its source size is
    unknown (shards of an older `dystream data encode` without `source_hw` and a clip json without height/width)."""
    if "kpts" not in s:
        return None
    info = s["meta"].get("latents", {})
    hw = info.get("source_hw") or [s["meta"].get("height"), s["meta"].get("width")]
    if None in hw or "size" not in info:
        return None
    kpts = s["kpts"].numpy()
    if kpts.ndim != 3 or kpts.shape[-1] != 3 or kpts.shape[0] < start + frames:
        raise BadSample("bad_keypoints", f"kpts must be float [T, K, 3] covering the window, got {tuple(kpts.shape)}")
    return torch.from_numpy(square_crop_keypoints(kpts[start : start + frames], int(hw[0]), int(hw[1]), info["size"]))


def latent_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latent windows into a batch (module docstring)."""
    batch: dict[str, Any] = {
        k: torch.stack([s[k] for s in samples]) for k in ("latents", "references", "audio_self", "audio_other", "mask")
    }
    if all("kpts" in s for s in samples) and len({tuple(s["kpts"].shape) for s in samples}) == 1:
        batch["kpts"] = torch.stack([s["kpts"] for s in samples])
    batch["key"] = [s["key"] for s in samples]
    return batch


def read_latent_index(spec: str) -> dict[str, Any]:
    """The index.json of a folder of latent shards, checked to be one; errors say how to write them."""
    folder = Path(spec)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"LatentDataModule: no latent shards at {spec!r} (no index.json). Write them from clip shards with "
            "`dystream data encode --vae runs/vae/vae.safetensors --shards data/synthetic/train --out "
            f"{spec}`"
        )
    index = json.loads(index_path.read_text())
    content = index.get("content")
    if content != LATENT_FORMAT:
        what = "clip shards" if content is None else f"content {content!r}"
        raise ValueError(
            f"LatentDataModule: {spec} holds {what}, not {LATENT_FORMAT} latent shards; (re-)write them with "
            "`dystream data encode`"
        )
    return index


class LatentDataModule(SpeakerVidDataModule):
    """SpeakerVid windows whose training split comes from cached-latent shards (module docstring).

    Args:
        train_shards: a folder of latent shards written by `dystream data encode` (with its index.json).
        **kwargs: SpeakerVidDataModule's arguments, with these meanings here: `val_shards` are clip shards
            (validation windows are decoded and encoded online); `window_frames` is a multiple of the VAE's 4
            frames per latent frame; `num_references` applies to validation windows (training windows take the
            cached frame 0); `size` must equal the size the latents were encoded at.

    After `setup("fit")`, `vae_sha256` names the VAE that wrote the latents; stages compare it with their own
    (`dystream.stages.conditioning.check_cached_latents`).
    """

    def __init__(self, train_shards: str = "runs/latents/train", **kwargs: Any) -> None:
        super().__init__(train_shards=train_shards, **kwargs)
        self.vae_sha256: str | None = None

    def _val_is_embedded_default(self) -> bool:
        return self.val_shards is not None and os.path.normpath(self.val_shards) == os.path.normpath(DEFAULT_VAL_SHARDS)

    def prepare_data(self) -> None:
        if self.synthesize_if_missing and self._val_is_embedded_default():
            synthesize_default(Path(DEFAULT_TRAIN_SHARDS).parent, size=self.size, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # every process: waits for the one that synthesizes
        if stage in (None, "fit") and self.vae_sha256 is None:
            index = read_latent_index(self.train_shards)
            if int(index.get("size", self.size)) != self.size:
                raise ValueError(
                    f"LatentDataModule: {self.train_shards} was encoded at size {index.get('size')}, the data "
                    f"module's size is {self.size}; set data.init_args.size to {index.get('size')} or re-encode"
                )
            self.vae_sha256 = index.get("vae_sha256")
            self._train_set = resolve_shards(self.train_shards)
        super().setup(stage)

    def make_decoder(self, split: str):
        if split == "train":
            return LatentWindowDecoder(self.window_frames)
        return super().make_decoder(split)

    def make_collate(self, split: str):
        return latent_collate if split == "train" else super().make_collate(split)
