"""Shared by the `dystream serve` tests: tiny random-weight exports, the app built through the CLI's own option
parsing, and small media files."""

from __future__ import annotations

import struct
import wave
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dystream.models.audio import AudioEncoder
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.zoo.files import save_model

SIZE = 32  # 4x4 latents: every mechanism at a fraction of the 64x64 cost


def write_exports(root: Path) -> dict[str, str]:
    """Tiny networks saved as stage exports; DiT weights perturbed (Wan's init zeroes the head) so that the
    audio and the reference both change the frames."""
    torch.manual_seed(0)
    dit = AvatarDiT(DiTConfig.from_preset("tiny"))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return {
        "checkpoint": str(save_model(dit, root / "student.safetensors", arch="dit")),
        "vae": str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), root / "vae.safetensors", arch="vae")),
        "audio": str(save_model(AudioEncoder("tiny"), root / "audio.safetensors", arch="audio")),
    }


def energy_mask(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """A cheap stand-in for silero-vad: 1 where a frame's RMS exceeds a threshold."""
    audio = np.pad(audio, (0, max(0, n_frames * 640 - audio.shape[0])))
    return (np.sqrt((audio[: n_frames * 640].reshape(n_frames, -1) ** 2).mean(1)) > 0.05).astype(np.float32)


def build_app(exports: dict[str, str], *flags: str, **create_kw: Any):
    """`dystream serve --checkpoint ... FLAGS` parsed by the real CLI, the app built as `serve` builds it."""
    from dystream.cli import build_parser
    from dystream.serving.app import create_app
    from dystream.serving.cli import avatar_factory, serve_config_from_args
    from dystream.streaming.cli import config_from_args, load_networks

    argv = ["serve", "--checkpoint", exports["checkpoint"], "--vae", exports["vae"], "--audio", exports["audio"]]
    args = build_parser({"serve": "dystream.serving.cli"}).parse_args([*argv, "--size", str(SIZE), *flags])
    serve = serve_config_from_args(args)
    networks = load_networks(args)
    config = config_from_args(args, networks[0], networks[1])
    factory = avatar_factory(networks, config, args.device, args.vae_device, mask_fn=energy_mask)
    return create_app(factory, serve, config.size, **create_kw)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """16 kHz bursts of noise, on and off every 0.4 s (both mask states occur)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    gate = np.repeat(rng.random(n // 6400 + 1) > 0.5, 6400)[:n]
    return (rng.standard_normal(n) * 0.2 * gate).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    import io

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    """A random RGB PNG (written by hand: filter 0 rows, zlib, CRC'd chunks)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
