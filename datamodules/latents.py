"""Encode clip shards into cached-latent shards with a frozen VAE (`dystream data encode`).

Once the VAE is frozen, later stages need not decode mp4 nor run the VAE encoder at every step
(notes/data_and_vae.md §2.3: LTX, Mochi and FastVideo trainers all pre-compute latents). One
latent sample per source clip, keys unchanged, in WebDataset shards with an ``index.json``:

    KEY.latents.npy      float16 [z, 1 + n, h, w]   normalised VAE latents of cat([reference, frames 0 .. 4n-1])
    KEY.ref_latents.npy  float16 [R, z, h, w]       each reference frame encoded alone (latent frame 0 form)
    KEY.references.npy   uint8 [R, size, size, 3]    the reference frames as encoded (cropped, resized): the VAE
                                                     decoder's guidance when samples are decoded
    KEY.self.wav         16 kHz mono, copied from the source sample (all n_frames frames)
    KEY.other.wav        16 kHz mono, copied
    KEY.mask.npy         uint8 [n_frames], copied
    KEY.kpts.npy         copied when present (pixel coordinates of the source frames, `source_hw`)
    KEY.json             source metadata + "latents": {vae, vae_sha256, size, source_hw, covered_frames,
                         ref_indices, frames_per_latent, latent_channels, dtype}

How the latents are made (the same calls as the DiT stages' online path,
``dystream.stages.conditioning.AvatarConditioner``): frames are centre-cropped to a square and
resized to ``size``; the reference image is frame ``ref_indices[0]`` of the clip; the clip
``cat([reference, frames[0 : 4n]])`` (n = n_frames // 4) is encoded with the reference itself as
the VAE's only guidance image (K = 1), chunk by chunk through the streaming encoder (equal to one
shot), so latent frame 0 is the reference encoded alone and latent frame i >= 1 covers frames
``4(i-1) .. 4i-1``. ``ref_latents[r]`` is reference frame ``ref_indices[r]`` encoded alone with
itself as guidance, i.e. what latent frame 0 would be with that reference. The references are
``R`` frames spread evenly over the clip (``ref_indices[0] = 0``).

A window of F latent frames starting at latent frame ``1 + j`` is ``latents[:, 1 + j : 1 + j + F]``
with audio samples ``640 * 4j .. 640 * 4(j + F)``; for j > 0 these latents carry the causal
encoder's view of the frames before the window, as a stream does. :func:`read_latent_sample`
decodes a sample into tensors; `latent_windows.LatentDataModule` trains the DiT stages on windows of them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dystream.datamodules.format import (
    ShardWriter,
    decode_npy,
    decode_video,
    decode_wav,
    read_shards,
    resolve_shards,
)

if TYPE_CHECKING:  # torch is imported where it is used, so `dystream --help` stays fast
    import torch

HELP = "encode clip shards into cached-latent shards with a frozen VAE"
LATENT_FORMAT = "dystream-latents/2"  # /2 added references.npy
LATENT_FIELDS = ("latents.npy", "ref_latents.npy", "references.npy", "self.wav", "other.wav", "mask.npy", "json")
COPIED_FIELDS = ("self.wav", "other.wav", "mask.npy", "kpts.npy")


# ---------------------------------------------------------------------------------------------
# Loading the VAE
# ---------------------------------------------------------------------------------------------


def load_vae(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The frozen VAE from an exported ``vae.safetensors`` or a VAE-stage Lightning checkpoint (``.ckpt``)."""
    import torch

    from dystream.stages.common import freeze

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VAE weights not found: {path}. Train the VAE stage (`dystream fit --config recipes/vae.yaml`), which "
            "writes runs/vae/vae.safetensors and runs/vae/checkpoints/last.ckpt, or pass another file with --vae."
        )
    if path.suffix == ".ckpt":
        from dystream.models.vae import ReferenceGuidedVAE, VAEConfig

        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        hparams = checkpoint.get("hyper_parameters", {})
        if "preset" not in hparams:
            raise ValueError(f"{path}: not a VAE-stage checkpoint (no 'preset' in hyper_parameters)")
        vae = ReferenceGuidedVAE(VAEConfig.from_preset(hparams["preset"]))
        state = {k[len("vae.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("vae.")}
        vae.load_state_dict(state, strict=True)
    else:
        from dystream.zoo.files import load_model

        vae = load_model(path, arch="vae", map_location=map_location)
    return freeze(vae)


# ---------------------------------------------------------------------------------------------
# Encoding one clip
# ---------------------------------------------------------------------------------------------


def frames_to_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float32 ``[3, T, size, size]`` in [-1, 1] (centre square crop, antialiased resize)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def reference_indices(n_frames: int, num_references: int) -> list[int]:
    """``num_references`` frame indices spread evenly over the clip, the first one 0."""
    return [int(round(i)) for i in np.linspace(0, n_frames - 1, num_references)]


def encode_clip(
    vae: torch.nn.Module, video: torch.Tensor, ref_indices: list[int], chunk_latents: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``video [3, T, H, W]`` -> ``(latents [z, 1 + T//4, h, w], ref_latents [R, z, h, w])``, normalised.

    Streams through the clip ``chunk_latents`` latent frames at a time (bounded memory for long
    clips; equal to one-shot encoding, see tests/test_vae.py).
    """
    import torch

    with torch.no_grad():
        return _encode_clip(vae, video, ref_indices, chunk_latents)


def _encode_clip(
    vae: torch.nn.Module, video: torch.Tensor, ref_indices: list[int], chunk_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    r_t = vae.config.temporal_factor
    n = video.shape[1] // r_t
    if n < 1:
        raise ValueError(f"encode_clip: {video.shape[1]} frames, need at least {r_t}")
    refs = video[:, ref_indices].transpose(0, 1)  # [R, 3, H, W]
    reference = refs[:1]  # [1, 3, H, W]
    cache = vae.new_encode_cache(reference[:, None])  # the reference guides its own clip (K = 1)
    parts = [vae.encode_chunk(reference[:, :, None], cache)]
    frames = video[None, :, : n * r_t]
    step = chunk_latents * r_t
    for start in range(0, n * r_t, step):
        parts.append(vae.encode_chunk(frames[:, :, start : start + step], cache))
    latents = torch.cat(parts, dim=2)[0]
    ref_latents = vae.encode(refs[:, :, None], refs[:, None])[:, :, 0]  # each reference alone, self-guided
    # Reference 0 is the clip's latent frame 0 by construction (the same frame, alone, self-guided); the copy keeps
    # them bit-equal, which the batched encode above need not be (its attention kernels block by batch size).
    ref_latents[0] = latents[:, 0]
    return latents, ref_latents


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_sample(
    vae: torch.nn.Module,
    sample: dict[str, Any],
    size: int,
    num_references: int,
    vae_info: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """One raw clip sample (bytes per field) -> one latent sample (bytes per field)."""
    key = sample.get("__key__", "?")
    meta = json.loads(sample["json"])
    frames = decode_video(sample["mp4"])
    n_frames = int(meta.get("n_frames", frames.shape[0]))
    if frames.shape[0] != n_frames:
        raise ValueError(f"{key}: the mp4 has {frames.shape[0]} frames, json n_frames is {n_frames}")
    video = frames_to_tensor(frames, size).to(device)
    refs = reference_indices(n_frames, num_references)
    latents, ref_latents = encode_clip(vae, video, refs)
    covered = (latents.shape[1] - 1) * vae.config.temporal_factor
    meta["latents"] = {
        **vae_info,
        "size": size,
        "source_hw": [int(frames.shape[1]), int(frames.shape[2])],  # the frames kpts.npy's pixels refer to
        "covered_frames": covered,
        "ref_indices": refs,
        "frames_per_latent": vae.config.temporal_factor,
        "latent_channels": vae.config.latent_channels,
        "dtype": "float16",
    }
    pixels = ((video[:, refs].transpose(0, 1).permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255)
    out = {
        "__key__": key,
        "latents.npy": _npy(latents.cpu().numpy().astype(np.float16)),
        "ref_latents.npy": _npy(ref_latents.cpu().numpy().astype(np.float16)),
        "references.npy": _npy(pixels.cpu().numpy().astype(np.uint8)),  # [R, size, size, 3]
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    for name in COPIED_FIELDS:
        if name in sample:
            out[name] = sample[name]
    return out


# ---------------------------------------------------------------------------------------------
# Reading latent samples
# ---------------------------------------------------------------------------------------------


def read_latent_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw latent sample -> ``latents`` float32 [z, 1 + n, h, w], ``ref_latents`` [R, z, h, w], ``references``
    uint8 [R, size, size, 3], ``audio_self``/``audio_other`` float32 [n_frames * 640], ``mask`` float32 [n_frames],
    ``meta``, ``key``."""
    import torch

    key = sample.get("__key__", "?")
    missing = [f for f in LATENT_FIELDS if f not in sample]
    if missing:
        raise ValueError(
            f"latent sample {key}: missing {missing}; latent shards are written by `dystream data encode` "
            f"(format {LATENT_FORMAT}; re-encode shards written by an older version)"
        )
    meta = json.loads(sample["json"])
    out = {
        "key": key,
        "meta": meta,
        "latents": torch.from_numpy(decode_npy(sample["latents.npy"]).astype(np.float32)),
        "ref_latents": torch.from_numpy(decode_npy(sample["ref_latents.npy"]).astype(np.float32)),
        "references": torch.from_numpy(decode_npy(sample["references.npy"])),
        "audio_self": torch.from_numpy(decode_wav(sample["self.wav"])[0]),
        "audio_other": torch.from_numpy(decode_wav(sample["other.wav"])[0]),
        "mask": torch.from_numpy(decode_npy(sample["mask.npy"]).astype(np.float32)),
    }
    if "kpts.npy" in sample:
        out["kpts"] = torch.from_numpy(decode_npy(sample["kpts.npy"]))
    return out


# ---------------------------------------------------------------------------------------------
# The tool
# ---------------------------------------------------------------------------------------------


def export_latents(
    vae_path: str | Path,
    shards: str,
    out: str | Path,
    size: int = 64,
    num_references: int = 4,
    shard_samples: int = 256,
    device: str = "cpu",
    limit: int | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Encode every clip of ``shards`` into latent shards in ``out``; returns the written index."""
    import torch

    if num_references < 1:
        raise ValueError(f"--num-references must be >= 1, got {num_references}")
    dev = torch.device(device)
    vae = load_vae(vae_path).to(dev)
    r_s = vae.config.spatial_factor
    if size % r_s:
        raise ValueError(f"--size {size} must be a multiple of the VAE's spatial factor {r_s}")
    from dystream.zoo.cache import sha256_file

    vae_info = {"vae": str(vae_path), "vae_sha256": sha256_file(vae_path)}
    shard_set = resolve_shards(shards)
    index_extra = {"content": LATENT_FORMAT, "source": str(shards), **vae_info, "size": size}
    start, done = time.monotonic(), 0
    with ShardWriter(out, prefix="latents", max_samples=shard_samples, index_extra=index_extra) as writer:
        for sample in read_shards(shard_set.urls):
            writer.write(encode_sample(vae, sample, size, num_references, vae_info, dev))
            done += 1
            if log and done % 16 == 0:
                print(f"  encoded {done} clips ({done / (time.monotonic() - start):.2f} clips/s)", file=sys.stderr)
            if limit is not None and done >= limit:
                break
    index = json.loads((Path(out) / "index.json").read_text())
    if log:
        print(f"{out}: {index['total_samples']} latent samples in {len(index['shards'])} shards", file=sys.stderr)
    return index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True, help="exported vae.safetensors or a VAE-stage .ckpt")
    parser.add_argument(
        "--shards", required=True, help="clip shards: a folder with index.json, a brace pattern or a tar"
    )
    parser.add_argument("--out", required=True, help="output folder for latent shards and their index.json")
    parser.add_argument("--size", type=int, default=64, help="frames are centre-cropped and resized to size x size")
    parser.add_argument("--num-references", type=int, default=4, help="reference frames per clip (ref_latents)")
    parser.add_argument("--shard-samples", type=int, default=256, help="latent samples per shard")
    parser.add_argument("--device", default="cpu", help="torch device for the VAE, e.g. cpu or cuda")
    parser.add_argument("--limit", type=int, default=None, help="encode at most this many clips")


def run(args: argparse.Namespace) -> int:
    export_latents(
        args.vae,
        args.shards,
        args.out,
        size=args.size,
        num_references=args.num_references,
        shard_samples=args.shard_samples,
        device=args.device,
        limit=args.limit,
    )
    return 0
