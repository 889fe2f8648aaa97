"""Light-ASD (Liao et al., "A Light Weight Model for Active Speaker Detection", CVPR 2023): per-frame speaking logits.

One face track and its audio in, one logit per video frame out (>= 0: the face is speaking):
- visual encoder on grayscale 112x112 face crops [B, T, 112, 112], raw 0-255 values normalised inside the network
  ((x / 255 - 0.4161) / 0.1688); three blocks, each the sum of a 3x3 and a 5x5 path, every path a spatial conv
  (1, k, k) then a temporal conv (k, 1, 1) ((2+1)-D factorisation, paper §3.1), then a 1x1x1 conv; stride 2 in the
  first block and max pools between blocks (112 -> 56 -> 28 -> 14), global spatial max -> [B, T, C];
- audio encoder on 13-d MFCC at 100 Hz, 4 audio frames per video frame [B, 4T, 13]; the same two-path blocks in 2-D,
  each path an MFCC-axis conv (k, 1) then a time conv (1, k); two stride-2 max pools over time bring 4T to T, the
  mean over the MFCC axis gives [B, T, C];
- fusion by addition, then the detector: a forward GRU, GELU, a second GRU run over the reversed sequence, GELU
  (paper §3.2, the "bidirectional" GRU of two single-direction GRUs), and a linear head of 2 classes whose class-1
  logit is the score (Light-ASD `lossAV.forward(labels=None)` returns `FC(x)[:, 1]`, no softmax).

Every BatchNorm uses eps 1e-3 (and momentum 0.01), as the released weights were trained with; eps matters in eval.

Released checkpoints (`Junhua-Liao/Light-ASD`, folder `weight/`: `pretrain_AVA_CVPR.model`,
`finetuning_TalkSet.model`) are state dicts of the training wrapper: `model.visualEncoder.*`, `model.audioEncoder.*`,
`model.GRU.*`, and the heads `lossAV.FC.*` (audio-visual) and `lossV.FC.*` (visual-only auxiliary head), 192
tensors. `light_asd_state_dict` is the named adapter from that layout to this module's (`model.` prefix dropped,
`lossAV.FC` -> `head_av`, `lossV.FC` -> `head_v`; a `module.` prefix from DataParallel is dropped too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dystream.evaluation.weights import WeightsInfo, load_state_dict_checked, require_weights

__all__ = ["PRESETS", "LightASD", "LightASDConfig", "light_asd_state_dict", "load_light_asd"]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass
class LightASDConfig:
    channels: tuple[int, int, int] = (32, 64, 128)  # widths of blocks 1-3 of both encoders; the last is the GRU width
    crop_size: int = 112  # grayscale face crop side
    num_cepstra: int = 13  # MFCC coefficients per audio frame
    pixel_mean: float = 0.4161  # of x / 255 over the training crops (Light-ASD `forward_visual_frontend`)
    pixel_std: float = 0.1688

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 3 or any(c <= 0 for c in self.channels):
            raise ValueError(f"LightASDConfig.channels must be three positive widths, got {self.channels}")
        if self.crop_size <= 0 or self.crop_size % 8:
            # stride-2 block and two stride-2 pools: the spatial size must survive three halvings exactly
            raise ValueError(f"LightASDConfig.crop_size must be a positive multiple of 8, got {self.crop_size}")
        if self.num_cepstra <= 0:
            raise ValueError(f"LightASDConfig.num_cepstra must be positive, got {self.num_cepstra}")
        if self.pixel_std <= 0:
            raise ValueError(f"LightASDConfig.pixel_std must be positive, got {self.pixel_std}")

    @property
    def embed_dim(self) -> int:
        return self.channels[-1]


def _bn(dim: int, c: int) -> nn.Module:
    return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class TwoPathBlock(nn.Module):
    """Sum of a 3- and a 5-wide path, each a factorised conv pair (conv A, BN, ReLU, conv B, BN, ReLU), then 1x1.

    Visual (dim 3, input [B, C, T, H, W]): conv A = spatial (1, k, k) named `s_k`, conv B = temporal (k, 1, 1).
    Audio (dim 2, input [B, C, 13, Ta]): conv A = along the MFCC axis (k, 1) named `m_k`, conv B = time (1, k).
    Conv B is always named `t_k`, the BN after conv X is `bn_X`; these are the released checkpoint's names.
    """

    def __init__(self, dim: int, c_in: int, c_out: int, down: bool = False) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"TwoPathBlock: dim must be 2 (audio) or 3 (visual), got {dim}")
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.first = "m" if dim == 2 else "s"
        for k in (3, 5):
            p = k // 2
            if dim == 3:
                a_kernel, a_pad, b_kernel, b_pad = (1, k, k), (0, p, p), (k, 1, 1), (p, 0, 0)
                stride = (1, 2, 2) if down else 1
            else:
                a_kernel, a_pad, b_kernel, b_pad = (k, 1), (p, 0), (1, k), (0, p)
                stride = 1
            setattr(self, f"{self.first}_{k}", conv(c_in, c_out, a_kernel, stride=stride, padding=a_pad, bias=False))
            setattr(self, f"bn_{self.first}_{k}", _bn(dim, c_out))
            setattr(self, f"t_{k}", conv(c_out, c_out, b_kernel, padding=b_pad, bias=False))
            setattr(self, f"bn_t_{k}", _bn(dim, c_out))
        self.last = conv(c_out, c_out, 1, bias=False)
        self.bn_last = _bn(dim, c_out)

    def _path(self, x: torch.Tensor, k: int) -> torch.Tensor:
        a = getattr(self, f"{self.first}_{k}")
        x = F.relu(getattr(self, f"bn_{self.first}_{k}")(a(x)))
        return F.relu(getattr(self, f"bn_t_{k}")(getattr(self, f"t_{k}")(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_last(self.last(self._path(x, 3) + self._path(x, 5))))


class VisualEncoder(nn.Module):
    """[B, 1, T, S, S] normalised crops -> [B, T, C]."""

    def __init__(self, channels: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.block1 = TwoPathBlock(3, 1, c1, down=True)  # S -> S/2
        self.block2 = TwoPathBlock(3, c1, c2)
        self.block3 = TwoPathBlock(3, c2, c3)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(x, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))  # S -> S/2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self._pool(self.block2(self._pool(self.block1(x)))))  # [B, C, T, S/8, S/8]
        return x.amax(dim=(3, 4)).transpose(1, 2)  # global spatial max per frame -> [B, T, C]


class AudioEncoder(nn.Module):
    """[B, 1, 13, 4T] MFCC -> [B, T, C]."""

    def __init__(self, channels: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.block1 = TwoPathBlock(2, 1, c1)
        self.block2 = TwoPathBlock(2, c1, c2)
        self.block3 = TwoPathBlock(2, c2, c3)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        # time only: Ta -> ceil(Ta / 2) (Light-ASD applies a MaxPool3d (1, 1, 3) to the 4-D tensor: the same window)
        return F.max_pool2d(x, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self._pool(self.block2(self._pool(self.block1(x)))))  # [B, C, 13, T]
        return x.mean(dim=2).transpose(1, 2)  # mean over the MFCC axis -> [B, T, C]


class BiGRU(nn.Module):
    """GRU forward, GELU, GRU over the reversed sequence, reversed back, GELU: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gru_forward = nn.GRU(dim, dim, num_layers=1, batch_first=True)
        self.gru_backward = nn.GRU(dim, dim, num_layers=1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.gru_forward(x)[0])
        x = self.gru_backward(x.flip(1))[0].flip(1)
        return F.gelu(x)


class LightASD(nn.Module):
    """Light-ASD: (MFCC [B, 4T, 13], face crops [B, T, 112, 112] gray 0-255) -> speaking logits [B, T]."""

    def __init__(self, config: LightASDConfig | None = None) -> None:
        super().__init__()
        self.config = config or LightASDConfig()
        c = self.config.channels
        self.visualEncoder = VisualEncoder(c)
        self.audioEncoder = AudioEncoder(c)
        self.GRU = BiGRU(c[-1])
        self.head_av = nn.Linear(c[-1], 2)  # released as lossAV.FC
        self.head_v = nn.Linear(c[-1], 2)  # released as lossV.FC: the visual-only auxiliary head of training

    def embed_visual(self, faces: torch.Tensor) -> torch.Tensor:
        """[B, T, S, S] grayscale 0-255 -> [B, T, C]."""
        s = self.config.crop_size
        if faces.ndim != 4 or tuple(faces.shape[2:]) != (s, s):
            raise ValueError(f"LightASD: face crops must be [B, T, {s}, {s}] grayscale, got {tuple(faces.shape)}")
        x = (faces.float() / 255.0 - self.config.pixel_mean) / self.config.pixel_std
        return self.visualEncoder(x.unsqueeze(1))

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """[B, Ta, 13] MFCC (100 Hz) -> [B, ceil(ceil(Ta / 2) / 2), C]."""
        n = self.config.num_cepstra
        if mfcc.ndim != 3 or mfcc.shape[2] != n:
            raise ValueError(f"LightASD: MFCC must be [B, 4T, {n}], got {tuple(mfcc.shape)}")
        return self.audioEncoder(mfcc.float().transpose(1, 2).unsqueeze(1))

    def forward(self, mfcc: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        if (
            mfcc.ndim == 3
            and faces.ndim == 4
            and (mfcc.shape[0] != faces.shape[0] or mfcc.shape[1] != 4 * faces.shape[1])
        ):
            raise ValueError(
                f"LightASD: audio must have 4 MFCC frames per video frame and the same batch, got MFCC "
                f"{tuple(mfcc.shape)} for faces {tuple(faces.shape)}"
            )
        fused = self.embed_audio(mfcc) + self.embed_visual(faces)  # fusion by addition (paper §3.2)
        return self.head_av(self.GRU(fused))[..., 1]

    def forward_visual(self, faces: torch.Tensor) -> torch.Tensor:
        """Visual-only logits [B, T] of the auxiliary head (training supervision; not used for masks)."""
        return self.head_v(self.embed_visual(faces))[..., 1]


_RENAMES = (("lossAV.FC.", "head_av."), ("lossV.FC.", "head_v."))


def light_asd_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter: a released Light-ASD checkpoint's keys -> `LightASD` keys (other keys pass through unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key.removeprefix("module.").removeprefix("model.")
        for old, repl in _RENAMES:
            if new.startswith(old):
                new = repl + new[len(old) :]
        if new in out:
            raise ValueError(f"Light-ASD checkpoint: keys {key!r} and another map to the same name {new!r}")
        out[new] = value
    return out


def load_light_asd(
    path: str | os.PathLike | None,
    name: str = "light_asd_ava",
    device: str | torch.device = "cpu",
    config: LightASDConfig | None = None,
) -> tuple[LightASD, WeightsInfo]:
    """Load a released Light-ASD checkpoint (weights_only, strict after the key adapter) -> (frozen eval net, info).

    `name` is the weights entry the file stands for (`light_asd_ava` = pretrain_AVA_CVPR.model, `light_asd_talkset`
    = finetuning_TalkSet.model); it only changes the messages. Raises `MetricWeightsMissing` naming the file if it
    is absent, truncated or not a state dict, or if keys are missing or unexpected (listed).
    """
    info = require_weights(name, path)
    net = LightASD(config or PRESETS["light-asd"])
    load_state_dict_checked(net, info, adapt=light_asd_state_dict)
    net.requires_grad_(False).eval().to(device)
    return net, info


# Presets. "light-asd": Junhua-Liao/Light-ASD `ASD_Model` (visual_encoder / audio_encoder 32-64-128, BGRU(128)),
# the layout of weight/pretrain_AVA_CVPR.model and weight/finetuning_TalkSet.model (1.0 M parameters).
# "tiny": the same layout at widths 4-8-8 and 32x32 crops, for CPU tests.
PRESETS: dict[str, LightASDConfig] = {
    "light-asd": LightASDConfig(),
    "tiny": LightASDConfig(channels=(4, 8, 8), crop_size=32),
}
