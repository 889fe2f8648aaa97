"""FVD: Fréchet distance between I3D Kinetics-400 logits of real and generated 16-frame clips.

Protocol (StyleGAN-V `fvd2048_16f`, notes/metrics.md §2): clips of 16 consecutive frames at the native 25 fps (no
subsampling), uint8 [B, 3, 16, H, W] fed whole to the TorchScript with rescale=True, resize=True (a direct 224x224
resize, no crop: a centre crop would cut the hands of portrait avatar video), 400-d logits, Fréchet distance. The same
clip-sampling rule and seed are used for real and generated videos; videos shorter than one clip are skipped and
counted. Standard N is 2048 clips; with N < 400 the covariances are singular and the exact "gram" form is used
(`frechet_distance(method="auto")`). FVD_16 and FVD_128 are different metrics, and numbers from the piergiaj I3D
(`i3d_pretrained_400.pt`, VideoGPT/TATS) are not comparable with these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dystream.evaluation.fid import to_uint8
from dystream.evaluation.frechet import FeatureStats, frechet_distance
from dystream.evaluation.networks.i3d import I3D_CALL_KWARGS, I3D_CLIP_LEN
from dystream.evaluation.weights import WeightsInfo

__all__ = ["ClipSampler", "I3DExtractor", "as_cthw", "fvd", "fvd_stats"]

ClipRule = Literal["uniform", "random", "first"]


def as_cthw(video: torch.Tensor | np.ndarray, layout: Literal["auto", "thwc", "cthw"] = "auto") -> torch.Tensor:
    """One video as uint8 [3, T, H, W]. Accepts [T, H, W, 3] (decoded frames) or [3, T, H, W] (model output, floats in
    [-1, 1] are converted with `to_uint8`)."""
    x = torch.as_tensor(video)
    if x.ndim != 4:
        raise ValueError(f"expected one video [T, H, W, 3] or [3, T, H, W], got shape {tuple(x.shape)}")
    if layout == "auto":
        thwc, cthw = x.shape[-1] == 3, x.shape[0] == 3
        if thwc and cthw:
            raise ValueError(f"video shape {tuple(x.shape)} is ambiguous: pass layout='thwc' or 'cthw'")
        if not (thwc or cthw):
            raise ValueError(f"video shape {tuple(x.shape)} has no 3-channel axis first or last")
        layout = "thwc" if thwc else "cthw"
    if layout == "thwc":
        x = x.permute(3, 0, 1, 2)
    return to_uint8(x)


@dataclass
class ClipSampler:
    """Which `clip_len`-frame clips each video contributes; identical for real and generated videos.

    rule: "first" (frames 0..clip_len-1, StyleGAN-V's generator side), "uniform" (`clips_per_video` evenly spaced
    starts, first and last clip included), "random" (starts drawn from a generator seeded with (seed, video index), so a
    rerun picks the same clips).
    """

    clip_len: int = I3D_CLIP_LEN
    clips_per_video: int = 1
    rule: ClipRule = "uniform"
    stride: int = 1  # frame subsampling inside a clip (StyleGAN-V subsample_factor); 1 = native fps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clip_len < 1:
            raise ValueError(f"ClipSampler.clip_len must be >= 1, got {self.clip_len}")
        if self.clips_per_video < 1:
            raise ValueError(f"ClipSampler.clips_per_video must be >= 1, got {self.clips_per_video}")
        if self.rule not in ("uniform", "random", "first"):
            raise ValueError(f"ClipSampler.rule must be 'uniform', 'random' or 'first', got {self.rule!r}")
        if self.rule == "first" and self.clips_per_video != 1:
            raise ValueError("ClipSampler.clips_per_video must be 1 with rule='first'")
        if self.stride < 1:
            raise ValueError(f"ClipSampler.stride must be >= 1, got {self.stride}")

    @property
    def span(self) -> int:
        return (self.clip_len - 1) * self.stride + 1

    def starts(self, n_frames: int, video_index: int = 0) -> list[int]:
        """Start frames of the clips of a video with `n_frames` frames ([] if it is shorter than one clip)."""
        last = n_frames - self.span
        if last < 0:
            return []
        if self.rule == "first":
            return [0]
        if self.rule == "uniform":
            return [int(s) for s in np.linspace(0, last, self.clips_per_video).round()]
        rng = np.random.default_rng([self.seed, video_index])
        return [int(s) for s in rng.integers(0, last + 1, size=self.clips_per_video)]

    def clips(self, video: torch.Tensor, video_index: int = 0) -> torch.Tensor:
        """uint8 [3, T, H, W] -> uint8 [n_clips, 3, clip_len, H, W]."""
        starts = self.starts(video.shape[1], video_index)
        if not starts:
            return video.new_zeros((0, 3, self.clip_len, *video.shape[2:]))
        return torch.stack([video[:, s : s + self.span : self.stride] for s in starts])


class I3DExtractor:
    """uint8 clips [B, 3, T, H, W] -> features [B, 400] through `module(clips, **I3D_CALL_KWARGS)`.

    `module` is the loaded TorchScript (`load_i3d_torchscript`) or any callable with the same convention (tests).
    """

    def __init__(
        self,
        module: Callable[..., torch.Tensor],
        info: WeightsInfo | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
    ):
        self.module = module
        self.info = info
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> np.ndarray:
        if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[1] != 3:
            got = f"{clips.dtype} {tuple(clips.shape)}"
            raise ValueError(f"I3DExtractor expects uint8 clips [B, 3, T, H, W], got {got}")
        out = []
        for i in range(0, clips.shape[0], self.batch_size):
            feats = self.module(clips[i : i + self.batch_size].to(self.device), **I3D_CALL_KWARGS)
            out.append(feats.detach().double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0))


def fvd_stats(
    videos: Iterable[torch.Tensor | np.ndarray],
    extractor: I3DExtractor,
    sampler: ClipSampler | None = None,
    keep_features: bool = True,
) -> FeatureStats:
    """I3D feature statistics of the clips `sampler` takes from each video.

    Raw features are kept by default (400-d, cheap) so that small N uses the exact gram form. `meta` records the
    protocol, the number of skipped (too short) videos and the weights.
    """
    sampler = sampler or ClipSampler()
    stats = FeatureStats(keep_features=keep_features)
    skipped = 0
    for index, video in enumerate(videos):
        clips = sampler.clips(as_cthw(video), index)
        if clips.shape[0] == 0:
            skipped += 1
            continue
        stats.update(extractor(clips))
    stats.meta = {
        "extractor": "i3d_torchscript_logits400",
        "clip_len": str(sampler.clip_len),
        "clips_per_video": str(sampler.clips_per_video),
        "rule": sampler.rule,
        "stride": str(sampler.stride),
        "seed": str(sampler.seed),
        "skipped_videos": str(skipped),
    }
    if extractor.info is not None:
        stats.meta.update(weights=extractor.info.path, sha256=extractor.info.sha256)
    return stats


def fvd(real: FeatureStats | np.ndarray, fake: FeatureStats | np.ndarray, method: str = "auto", ddof: int = 1) -> float:
    """FVD between two I3D feature sets; refuses statistics made with different clip protocols or weights.

    ddof=1 (np.cov) by default; StyleGAN-V normalises its covariances by 1/n: pass ddof=0 to reproduce its numbers.
    """
    if isinstance(real, FeatureStats) and isinstance(fake, FeatureStats):
        keys = ("extractor", "clip_len", "stride", "sha256")
        diff = {k: (real.meta.get(k), fake.meta.get(k)) for k in keys if real.meta.get(k) != fake.meta.get(k)}
        if diff:
            raise ValueError(f"fvd: real and generated statistics differ in protocol: {diff}")
    return frechet_distance(real, fake, method=method, ddof=ddof)
