"""S3FD face detector (Zhang et al., "S3FD: Single Shot Scale-invariant Face Detector", ICCV 2017), as TalkNet-ASD and
Light-ASD run it (`model/faceDetector/s3fd`, weights `sfd_face.pth`) in front of active-speaker detection.

Network (S3FD §3.1): the VGG16 trunk with fc6/fc7 as convolutions (fc6 3x3 dilation 6, fc7 1x1), two extra stages
(1x1 then 3x3 stride 2, twice), and six detection layers on conv3_3, conv4_3, conv5_3, fc7, conv6_2 and conv7_2 with
anchor strides 4..128 and square anchors of 4 x stride (16..512 px; one anchor per location, §3.1 "scale-equitable").
conv3_3/conv4_3/conv5_3 are L2-normalised with learned per-channel scales initialised to 10, 8, 5 (ParseNet). The
first layer's classifier predicts 3 background scores and keeps their maximum ("max-out background label", §3.3)
against small false positives. Boxes are SSD offsets decoded with variances (0.1, 0.2).

Detection (TalkNet `S3FD.detect_faces`): RGB frames, resized by `scale` (0.25 in the ASD demos: `--facedetScale`)
with bilinear interpolation (cv2 INTER_LINEAR), minus the mean (123, 117, 104) per RGB channel, no scaling to
[0, 1]. Per image: face probability (softmax) > `conf_threshold` (0.9 in the demos), greedy NMS at IoU 0.3 over at
most 5000 candidates keeping at most 750 (the `Detect` layer), boxes back in pixels of the unscaled frame, then a
second NMS at IoU 0.1 (`nms_`). NMS is `torchvision.ops.nms` (keeps boxes with IoU <= threshold against every
higher-scoring kept box, as the reference).

Key names are those of `sfd_face.pth` (the `S3FDNet` module of TalkNet-ASD, `model/faceDetector/s3fd/nets.py`):
`vgg.{0,2,5,7,10,12,14,17,19,21,24,26,28,31,33}.{weight,bias}` (ReLUs and pools keep their indices in the module
list), `L2Norm3_3.weight`, `L2Norm4_3.weight`, `L2Norm5_3.weight`, `extras.{0..3}.*`, `loc.{0..5}.*`, `conf.{0..5}.*`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dystream.evaluation.weights import WeightsInfo, load_state_dict_checked, require_weights

__all__ = [
    "PRESETS",
    "S3FD",
    "S3FDConfig",
    "S3FDDetector",
    "S3FDFaceBoxes",
    "decode_boxes",
    "load_s3fd",
    "prior_boxes",
]

STAGE_CONVS = (2, 2, 3, 3, 3)  # VGG16: convolutions per stage


@dataclass
class S3FDConfig:
    stage_channels: tuple[int, ...] = (64, 128, 256, 512, 512)  # VGG16 widths of conv stages 1-5
    fc_channels: int = 1024  # fc6 / fc7 as convolutions
    extra_channels: tuple[int, ...] = (256, 512, 128, 256)  # conv6_1, conv6_2, conv7_1, conv7_2
    l2norm_scales: tuple[float, ...] = (10.0, 8.0, 5.0)  # conv3_3, conv4_3, conv5_3 (S3FD §3.1)
    min_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)  # anchor side per detection layer, pixels
    steps: tuple[int, ...] = (4, 8, 16, 32, 64, 128)  # anchor stride per detection layer, pixels
    variances: tuple[float, float] = (0.1, 0.2)  # SSD box-offset variances (centre, size)
    maxout_background: int = 3  # background scores of the first detection layer (max-out label, S3FD §3.3)
    pixel_mean: tuple[float, float, float] = (123.0, 117.0, 104.0)  # RGB means subtracted from 0-255 pixels

    def __post_init__(self) -> None:
        for name, n in (("stage_channels", 5), ("extra_channels", 4), ("l2norm_scales", 3), ("min_sizes", 6),
                        ("steps", 6), ("variances", 2), ("pixel_mean", 3)):  # fmt: skip
            value = tuple(getattr(self, name))
            setattr(self, name, value)
            if len(value) != n:
                raise ValueError(f"S3FDConfig.{name} must have {n} entries, got {value}")
        positive = ("stage_channels", "extra_channels", "min_sizes", "steps", "variances")
        for name in positive:
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"S3FDConfig.{name} must be positive, got {getattr(self, name)}")
        if self.fc_channels <= 0:
            raise ValueError(f"S3FDConfig.fc_channels must be positive, got {self.fc_channels}")
        if self.maxout_background < 1:
            raise ValueError(f"S3FDConfig.maxout_background must be >= 1, got {self.maxout_background}")

    @property
    def source_channels(self) -> tuple[int, ...]:
        c = self.stage_channels
        return (c[2], c[3], c[4], self.fc_channels, self.extra_channels[1], self.extra_channels[3])


class L2Norm(nn.Module):
    """x / ||x||_2 over channels, times a learned per-channel scale (ParseNet); [B, C, H, W] -> same."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10  # the reference adds eps to the norm
        return x / norm * self.weight[None, :, None, None]


class S3FD(nn.Module):
    """[B, 3, H, W] mean-subtracted RGB -> (box offsets [B, P, 4], class logits [B, P, 2], feature sizes)."""

    def __init__(self, config: S3FDConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or S3FDConfig()
        layers: list[nn.Module] = []
        self._taps: list[int] = []  # index in `vgg` after which conv3_3 / conv4_3 / conv5_3 are taken (their ReLU)
        c_in = 3
        for stage, (n_convs, c_out) in enumerate(zip(STAGE_CONVS, cfg.stage_channels, strict=True)):
            for _ in range(n_convs):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c_out
            if stage >= 2:
                self._taps.append(len(layers) - 1)
            # pool3 rounds up (ceil_mode) so that strides stay aligned for odd sizes, as in the released model
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=stage == 2))
        layers += [nn.Conv2d(c_in, cfg.fc_channels, 3, padding=6, dilation=6), nn.ReLU(inplace=True)]  # fc6
        layers += [nn.Conv2d(cfg.fc_channels, cfg.fc_channels, 1), nn.ReLU(inplace=True)]  # fc7
        self.vgg = nn.ModuleList(layers)
        c3, c4, c5 = cfg.stage_channels[2:]
        self.L2Norm3_3 = L2Norm(c3, cfg.l2norm_scales[0])
        self.L2Norm4_3 = L2Norm(c4, cfg.l2norm_scales[1])
        self.L2Norm5_3 = L2Norm(c5, cfg.l2norm_scales[2])
        e = cfg.extra_channels
        self.extras = nn.ModuleList(
            [
                nn.Conv2d(cfg.fc_channels, e[0], 1),
                nn.Conv2d(e[0], e[1], 3, stride=2, padding=1),
                nn.Conv2d(e[1], e[2], 1),
                nn.Conv2d(e[2], e[3], 3, stride=2, padding=1),
            ]
        )
        src = cfg.source_channels
        self.loc = nn.ModuleList([nn.Conv2d(c, 4, 3, padding=1) for c in src])
        n_conf = [cfg.maxout_background + 1] + [2] * (len(src) - 1)
        self.conf = nn.ModuleList([nn.Conv2d(c, n, 3, padding=1) for c, n in zip(src, n_conf, strict=True)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"S3FD expects [B, 3, H, W] images, got {tuple(x.shape)}")
        norms = (self.L2Norm3_3, self.L2Norm4_3, self.L2Norm5_3)
        sources = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in self._taps:
                sources.append(norms[self._taps.index(i)](x))
        sources.append(x)  # fc7
        for k, layer in enumerate(self.extras):
            x = F.relu(layer(x))
            if k % 2 == 1:
                sources.append(x)  # conv6_2, conv7_2
        locs, confs, sizes = [], [], []
        for k, s in enumerate(sources):
            c = self.conf[k](s)
            if k == 0:  # max-out background: the largest of the background scores against the face score
                m = self.config.maxout_background
                c = torch.cat([c[:, :m].amax(dim=1, keepdim=True), c[:, m:]], dim=1)
            locs.append(self.loc[k](s).permute(0, 2, 3, 1).flatten(1, 2))  # [B, h w, 4], row-major locations
            confs.append(c.permute(0, 2, 3, 1).flatten(1, 2))  # [B, h w, 2]
            sizes.append((int(s.shape[2]), int(s.shape[3])))
        return torch.cat(locs, 1), torch.cat(confs, 1), sizes


def prior_boxes(image_hw: tuple[int, int], feature_sizes: list[tuple[int, int]], config: S3FDConfig) -> torch.Tensor:
    """Anchors [P, 4] (cx, cy, w, h), normalised by the image size, in the order of `S3FD.forward`'s outputs."""
    imh, imw = image_hw
    out = []
    for (fh, fw), step, size in zip(feature_sizes, config.steps, config.min_sizes, strict=True):
        cy, cx = torch.meshgrid(torch.arange(fh, dtype=torch.float64), torch.arange(fw, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
        wh = torch.tensor([size / imw, size / imh], dtype=torch.float64).expand(fh * fw, 2)
        centres = torch.stack([(cx.flatten() + 0.5) * step / imw, (cy.flatten() + 0.5) * step / imh], dim=1)
        out.append(torch.cat([centres, wh], dim=1))
    return torch.cat(out).float()


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """SSD offsets [..., P, 4] on anchors [P, 4] (cx, cy, w, h) -> boxes [..., P, 4] (x1, y1, x2, y2), normalised."""
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    wh = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centre - wh / 2, centre + wh / 2], dim=-1)


class S3FDDetector:
    """Per-frame face detections of the ASD protocol: frames uint8 [T, H, W, 3] RGB -> list of [N_t, 5] arrays
    (x1, y1, x2, y2 in pixels of the given frames, face probability), highest probability first."""

    def __init__(
        self,
        net: S3FD,
        conf_threshold: float = 0.9,
        scale: float = 0.25,
        nms_threshold: float = 0.3,
        final_nms_threshold: float = 0.1,
        candidates: int = 5000,
        keep: int = 750,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        info: WeightsInfo | None = None,
    ) -> None:
        if not 0.0 < scale <= 4.0:
            raise ValueError(f"S3FDDetector: scale must be in (0, 4], got {scale}")
        if not 0.0 <= conf_threshold < 1.0:
            raise ValueError(f"S3FDDetector: conf_threshold must be in [0, 1), got {conf_threshold}")
        if batch_size < 1:
            raise ValueError(f"S3FDDetector: batch_size must be >= 1, got {batch_size}")
        self.net = net.eval().to(device)
        self.conf_threshold, self.scale = conf_threshold, scale
        self.nms_threshold, self.final_nms_threshold = nms_threshold, final_nms_threshold
        self.candidates, self.keep, self.batch_size = candidates, keep, batch_size
        self.device = torch.device(device)
        self.info = info

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None, device: str | torch.device = "cpu", **kw) -> S3FDDetector:
        net, info = load_s3fd(path, device=device)
        return cls(net, device=device, info=info, **kw)

    def preprocess(self, frames: np.ndarray, scale: float | None = None) -> torch.Tensor:
        """uint8 [B, H, W, 3] RGB -> [B, 3, round(H s), round(W s)] float, resized and mean-subtracted."""
        s = self.scale if scale is None else scale
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        h, w = frames.shape[1:3]
        size = (round(h * s), round(w * s))
        if min(size) < 32:  # five 2x2 poolings before fc6
            raise ValueError(
                f"S3FDDetector: frames of {w}x{h} at scale {s} give {size[1]}x{size[0]} pixels; S3FD needs at least "
                "32 on each side (raise the scale, or do not downscale the video as much)"
            )
        if size != (h, w):
            # cv2.resize INTER_LINEAR: half-pixel centres, no antialiasing, uint8 result
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        mean = torch.tensor(self.net.config.pixel_mean, dtype=x.dtype)[None, :, None, None]
        return x - mean

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, scale: float | None = None) -> list[np.ndarray]:
        """Detections per frame; `scale` overrides the resize factor (e.g. for frames already downscaled)."""
        from torchvision.ops import nms

        if scale is not None and not 0.0 < scale <= 4.0:
            raise ValueError(f"S3FDDetector: scale must be in (0, 4], got {scale}")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"S3FDDetector: frames must be uint8 [T, H, W, 3] RGB, got {frames.dtype} {frames.shape}")
        h, w = frames.shape[1:3]
        pixels = torch.tensor([w, h, w, h], dtype=torch.float32)
        out: list[np.ndarray] = []
        for i in range(0, len(frames), self.batch_size):
            x = self.preprocess(frames[i : i + self.batch_size], scale).to(self.device)
            loc, conf, sizes = self.net(x)
            priors = prior_boxes(tuple(x.shape[2:]), sizes, self.net.config).to(self.device)
            boxes = decode_boxes(loc, priors, self.net.config.variances).float().cpu()  # [B, P, 4]
            probs = conf.softmax(dim=-1)[..., 1].float().cpu()  # [B, P]
            for b in range(len(boxes)):
                # filtering at the final threshold first is exact: a box below it can never suppress one above it
                ok = probs[b] > self.conf_threshold
                score, box = probs[b][ok], boxes[b][ok]
                order = score.argsort(descending=True)[: self.candidates]
                score, box = score[order], box[order]
                kept = nms(box, score, self.nms_threshold)[: self.keep]
                score, box = score[kept], box[kept] * pixels
                kept = nms(box, score, self.final_nms_threshold)
                out.append(torch.cat([box[kept], score[kept, None]], dim=1).numpy().astype(np.float64))
        return out


@dataclass
class S3FDFaceBoxes:
    """BoxSource (`dystream.evaluation.sync`) from S3FD: frames uint8 [T, H, W, 3] -> [T, 4] boxes, one per frame:
    the largest detected face (the avatar fills its own video), a NaN row where none is found."""

    detector: S3FDDetector

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        boxes = np.full((len(frames), 4), np.nan)
        for t, det in enumerate(self.detector(frames)):
            if len(det):
                area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
                boxes[t] = det[int(np.argmax(area)), :4]
        return boxes


def load_s3fd(
    path: str | os.PathLike | None, device: str | torch.device = "cpu", config: S3FDConfig | None = None
) -> tuple[S3FD, WeightsInfo]:
    """Load `sfd_face.pth` (a plain state dict; weights_only, strict) -> (frozen eval-mode net, WeightsInfo).

    Raises `MetricWeightsMissing` naming the file if it is absent, truncated, not a state dict or of another layout
    (e.g. face_alignment's `s3fd-619a316812.pth`, whose keys are `conv1_1.*`...: missing and unexpected keys are
    listed).
    """
    info = require_weights("s3fd_face", path)
    net = S3FD(config or PRESETS["s3fd"])
    load_state_dict_checked(net, info, adapt=lambda s: {k.removeprefix("module."): v for k, v in s.items()})
    net.requires_grad_(False).eval().to(device)
    return net, info


# Presets. "s3fd": TalkNet-ASD / Light-ASD `S3FDNet` (VGG16 + extras, 22.1 M parameters), the layout of sfd_face.pth
# (from cs-giung/face-detection-pytorch). "tiny": the same layout at small widths, for CPU tests.
PRESETS: dict[str, S3FDConfig] = {
    "s3fd": S3FDConfig(),
    "tiny": S3FDConfig(stage_channels=(4, 4, 8, 8, 8), fc_channels=8, extra_channels=(4, 8, 4, 8)),
}
