"""How faithfully a VAE reconstructs real clips: fidelity, grain, colour, hands.

Every generator on a VAE is bounded by what the VAE's decoder can draw, so the VAE is scored on its own
reconstructions of the evaluation clips (the "VAE reconstruction" row of `make eval`, and the ladder in
docs/vae.md). Inputs are uint8 videos ``[N, T, H, W, 3]`` (real and reconstructed, same clips in the same order).

- ``psnr``: per clip over all its frames and pixels, then the mean over clips (data range 255).
- ``ssim``: Gaussian-window SSIM (torchmetrics, 11x11, sigma 1.5) per frame, mean over all frames.
- ``hf_ratio``: high-frequency energy of the reconstructions over that of the real frames: the mean squared
  response of the 3x3 Laplacian on the luma (BT.601) of every frame, summed over the set. 1 is right; above 1 the
  decoder adds grain (checkerboard, noise texture), below 1 it blurs.
- ``colour_error``: the per-channel mean colour of each clip (all frames and pixels) compared with the real clip's,
  in units of 1/255; ``colour_error_max`` is the worst channel of the worst clip, ``colour_error_mean`` the mean over
  clips and channels. A tint or a brightness shift shows here even when PSNR looks fine.
- :func:`keypoint_error`: the mean pixel distance between keypoints that one network finds on the reconstructions and
  on the real frames (both confident), e.g. over the hands: whether gesturing arms survive the VAE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

__all__ = ["keypoint_error", "laplacian_energy", "laplacian_response", "reconstruction_quality"]

_LUMA = torch.tensor([0.299, 0.587, 0.114])
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _check(recon: np.ndarray, real: np.ndarray) -> None:
    if recon.shape != real.shape:
        raise ValueError(f"reconstruction_quality: reconstructions {recon.shape} and real clips {real.shape} differ")
    if real.ndim != 5 or real.shape[-1] != 3:
        raise ValueError(f"reconstruction_quality: expected uint8 videos [N, T, H, W, 3], got {real.shape}")


def _frames(video: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [F, 3, H, W] in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(video)).reshape(-1, *video.shape[-3:])
    return x.permute(0, 3, 1, 2).float() / 255.0


def laplacian_response(video: np.ndarray) -> np.ndarray:
    """Squared 3x3-Laplacian response of the luma of uint8 frames ``[..., H, W, 3]`` at each valid pixel:
    ``[..., H - 2, W - 2]``, the pixel ``(i, j)`` of the result centred on ``(i + 1, j + 1)`` of the frame."""
    luma = torch.einsum("fchw,c->fhw", _frames(video), _LUMA)[:, None]
    response = F.conv2d(luma, _LAPLACIAN.view(1, 1, 3, 3)).pow(2)[:, 0]
    return response.reshape(*video.shape[:-3], *response.shape[-2:]).numpy()


def laplacian_energy(video: np.ndarray) -> float:
    """Mean squared 3x3-Laplacian response of the luma of uint8 frames ``[..., H, W, 3]`` (valid pixels only)."""
    return float(laplacian_response(video).mean())


def reconstruction_quality(recon: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM, high-frequency energy ratio and colour error of reconstructions (see the module docstring)."""
    _check(recon, real)
    psnr, ssim, colour = [], [], []
    hf_recon = hf_real = 0.0
    for fake_clip, real_clip in zip(recon, real, strict=True):
        a, b = _frames(fake_clip), _frames(real_clip)
        mse = float((a - b).pow(2).mean())
        psnr.append(10.0 * np.log10(1.0 / max(mse, 1e-12)))
        ssim.append(float(structural_similarity_index_measure(a, b, data_range=1.0)))
        colour.append((a.mean(dim=(0, 2, 3)) - b.mean(dim=(0, 2, 3))).abs().numpy() * 255.0)
        hf_recon += laplacian_energy(fake_clip)
        hf_real += laplacian_energy(real_clip)
    colour_arr = np.stack(colour)  # [N, 3]
    return {
        "psnr": float(np.mean(psnr)),
        "ssim": float(np.mean(ssim)),
        "hf_ratio": hf_recon / max(hf_real, 1e-12),
        "colour_error_max": float(colour_arr.max()),
        "colour_error_mean": float(colour_arr.mean()),
    }


def keypoint_error(kpts_recon: np.ndarray, kpts_real: np.ndarray, group: slice, min_confidence: float = 0.3) -> float:
    """Mean pixel distance between the keypoints of ``group`` found on reconstructions and on the real frames.

    ``kpts_*``: ``[T, K, 3]`` (x, y, confidence) from the same network. Points below ``min_confidence`` in either set
    are left out (a hand the network cannot see on the real frame says nothing about the VAE); NaN if none is left.
    """
    a, b = np.asarray(kpts_recon)[:, group], np.asarray(kpts_real)[:, group]
    if a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"keypoint_error: keypoints {a.shape} and {b.shape} must match and end in (x, y, c)")
    keep = (a[..., 2] >= min_confidence) & (b[..., 2] >= min_confidence)
    if not keep.any():
        return float("nan")
    return float(np.linalg.norm(a[..., :2] - b[..., :2], axis=-1)[keep].mean())


def keypoints_found(
    kpts_recon: np.ndarray, kpts_real: np.ndarray, group: slice, min_confidence: float = 0.3
) -> tuple[int, int]:
    """``(found, seen)``: of the ``seen`` keypoints of ``group`` the network finds on the real frames (confidence at
    least ``min_confidence``), how many it also finds on the reconstructions. :func:`keypoint_error` leaves the
    others out, so a VAE that erases a raised arm loses nothing there; this is the count that sees it."""
    a, b = np.asarray(kpts_recon)[:, group], np.asarray(kpts_real)[:, group]
    if a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"keypoints_found: keypoints {a.shape} and {b.shape} must match and end in (x, y, c)")
    seen = b[..., 2] >= min_confidence
    return int((seen & (a[..., 2] >= min_confidence)).sum()), int(seen.sum())
