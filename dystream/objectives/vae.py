"""VAE objective: L1 + LPIPS + KL, then a delayed hinge PatchGAN with LDM's adaptive weight.

Follows the LDM ``LPIPSWithDiscriminator`` recipe (``notes/data_and_vae.md`` §3.8) without the
learnable log-variance: ``L_G = w_l1 |x - x^| + w_p LPIPS(x, x^) + w_kl KL + f_d d_w L_adv``
with ``d_w = disc_weight * ||grad_last(NLL)|| / (||grad_last(L_adv)|| + 1e-4)`` clamped to
[0, 1e4], ``f_d = 0`` before ``disc_start``, ``L_adv = -E[D(x^)]`` and the hinge discriminator
loss ``1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x^))])``.

Every term is a *mean*: L1 and LPIPS over pixels/frames, KL over latent elements. (LDM sums
both over elements; its KL weight 1e-6 on sums corresponds to 1e-6 * latent/pixel counts here.)

An optional *region* L1 (:func:`keypoint_box_mask`, :func:`region_l1_loss`) adds the mean error inside each
frame's face box, taken from the shards' keypoints. At 64x64 the face is ~5 % of the frame and the mouth under 1 %,
so a plain mean L1 spends the latent capacity on background and clothes and blurs the mouth away, and the mouth is
what a talking avatar must get right.

LPIPS needs ImageNet backbone weights, which are never downloaded: :func:`build_lpips` takes a
torchvision ``vgg16``/``alexnet`` state dict path (read with ``weights_only=True``) and the
``lpips`` package's own linear-head weights; without a path it returns ``None`` and the caller
must say that it runs without the perceptual term.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "adaptive_gan_weight",
    "build_lpips",
    "edge_l1_loss",
    "generator_adversarial_loss",
    "hinge_discriminator_loss",
    "keypoint_box_mask",
    "kl_loss",
    "l1_loss",
    "lpips_video",
    "region_l1_loss",
    "shut_gate_loss",
]


def l1_loss(recon: Tensor, target: Tensor) -> Tensor:
    return (recon - target).abs().mean()


def keypoint_box_mask(
    kpts: Tensor, points: slice, height: int, width: int, pad: float = 0.25, tau: float = 0.3
) -> Tensor:
    """Keypoints ``[B, T, K, 3]`` (x, y, confidence in pixels) -> ``[B, T, H, W]`` masks of each frame's box
    around the confident ``points`` (e.g. the face group), enlarged by ``pad`` of its size on every side.

    A frame with fewer than 3 confident points gets an empty mask.
    """
    if kpts.ndim != 4 or kpts.shape[-1] != 3:
        raise ValueError(f"keypoint_box_mask: keypoints must be [B, T, K, 3], got {tuple(kpts.shape)}")
    group = kpts[:, :, points].float()  # [B, T, G, 3]
    ok = group[..., 2] > tau
    big = torch.finfo(group.dtype).max
    x, y = group[..., 0], group[..., 1]
    x0 = torch.where(ok, x, big).amin(-1)
    x1 = torch.where(ok, x, -big).amax(-1)
    y0 = torch.where(ok, y, big).amin(-1)
    y1 = torch.where(ok, y, -big).amax(-1)
    px, py = pad * (x1 - x0), pad * (y1 - y0)
    cols = torch.arange(width, device=kpts.device, dtype=group.dtype) + 0.5  # pixel centres (datamodules/keypoints.py)
    rows = torch.arange(height, device=kpts.device, dtype=group.dtype) + 0.5
    in_x = (cols >= (x0 - px)[..., None]) & (cols <= (x1 + px)[..., None])  # [B, T, W]
    in_y = (rows >= (y0 - py)[..., None]) & (rows <= (y1 + py)[..., None])  # [B, T, H]
    found = (ok.sum(-1) >= 3)[..., None, None]
    return (in_y[..., :, None] & in_x[..., None, :] & found).to(kpts.dtype)


def region_l1_loss(recon: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """Mean ``|recon - target|`` over the pixels (all channels) where ``region [B, T, H, W]`` is set; 0 if empty."""
    if recon.shape != target.shape or recon.ndim != 5:
        raise ValueError(f"region_l1_loss: recon {tuple(recon.shape)} and target {tuple(target.shape)} must match, 5-D")
    b, c, t, h, w = recon.shape
    if region.shape != (b, t, h, w):
        raise ValueError(f"region_l1_loss: region must be [B, T, H, W] = {(b, t, h, w)}, got {tuple(region.shape)}")
    return _region_mean((recon - target).abs(), region)


def _region_mean(values: Tensor, region: Tensor) -> Tensor:
    """Mean of ``values [B, C, T, H, W]`` over the pixels (all channels) where ``region [B, T, H, W]`` is set; 0 if
    empty."""
    weight = region[:, None].to(values.dtype)
    return (values * weight).sum() / (weight.sum() * values.shape[1]).clamp_min(1.0)


def changed_pixels(clip: Tensor, threshold: float) -> Tensor:
    """``[B, T, H, W]``: where a frame of ``clip [B, C, T, H, W]`` (pixels in [-1, 1]) differs from the clip's first
    frame, the reference image in the latent layout, by more than ``threshold`` (mean over channels). On the
    synthetic clips these are ~6 % of the pixels and carry ~79 % of the squared error (docs/vae.md)."""
    if clip.ndim != 5:
        raise ValueError(f"changed_pixels: clip must be 5-D [B, C, T, H, W], got {tuple(clip.shape)}")
    return (clip - clip[:, :, :1]).abs().mean(dim=1) > threshold


@torch.no_grad()
def unshown_pixels(clip: Tensor, references: Tensor, threshold: float, radius: int) -> Tensor:
    """``[B, T, H, W]``: where no guidance image shows a frame's pixel near its place: for every reference ``[B, K, C,
    H, W]`` and every shift of up to ``radius`` pixels in each direction, the mean over channels of ``|frame -
    shifted reference|`` exceeds ``threshold`` (pixels in [-1, 1]; the border repeated outside the frame). A raised
    arm or an open mouth is unshown; a body that sways by a pixel or two is not (the copy head's window can follow
    it). What the copy head copies from, so the pixels it cannot copy right from anywhere it looks."""
    if clip.ndim != 5 or references.ndim != 5 or references.shape[0] != clip.shape[0]:
        raise ValueError(
            f"unshown_pixels: clip must be [B, C, T, H, W] and references [B, K, C, H, W], got {tuple(clip.shape)} "
            f"and {tuple(references.shape)}"
        )
    b, _, _, h, w = clip.shape
    padded = F.pad(references.flatten(0, 1), (radius,) * 4, mode="replicate").unflatten(0, (b, -1))
    nearest = None
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            shifted = padded[..., dy : dy + h, dx : dx + w]  # [B, K, C, H, W]
            distance = (clip[:, None] - shifted[:, :, :, None]).abs().mean(dim=2).amin(dim=1)  # [B, T, H, W]
            nearest = distance if nearest is None else torch.minimum(nearest, distance)
    return nearest > threshold


def colour_l1_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Mean over clips, channels and frames of ``|mean colour of recon - mean colour of target|`` (the frame's mean
    over its pixels): the per-pixel L1 is median-seeking and leaves a clip-wide tint it hardly pays for."""
    if recon.shape != target.shape or recon.ndim != 5:
        raise ValueError(f"colour_l1_loss: recon {tuple(recon.shape)} and target {tuple(target.shape)} must match, 5-D")
    return (recon.mean(dim=(-2, -1)) - target.mean(dim=(-2, -1))).abs().mean()


def edge_l1_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Mean ``|grad recon - grad target|`` over the horizontal and vertical pixel differences of every frame (the
    image-gradient term of Mathieu et al. 2016): a blurred edge pays for its lost step where a flat tint pays
    nothing."""
    if recon.shape != target.shape or recon.ndim != 5:
        raise ValueError(f"edge_l1_loss: recon {tuple(recon.shape)} and target {tuple(target.shape)} must match, 5-D")
    error = recon - target
    return error.diff(dim=-1).abs().mean() + error.diff(dim=-2).abs().mean()


def _check_gate_region(name: str, gate: Tensor, region: Tensor) -> None:
    if gate.ndim != 5 or region.shape != (gate.shape[0], *gate.shape[2:]):
        raise ValueError(
            f"{name}: region must be [B, T, H, W] = {(gate.shape[0], *gate.shape[2:])}, got "
            f"{tuple(region.shape)} for a gate of {tuple(gate.shape)}"
        )


def shut_gate_loss(gate: Tensor, region: Tensor) -> Tensor:
    """Mean binary cross-entropy of the copy gate ``[B, C, T, H, W]`` against 0 (the decoder's own drawing) over the
    pixels (all channels) where ``region [B, T, H, W]`` is set; 0 if empty."""
    _check_gate_region("shut_gate_loss", gate, region)
    return _region_mean(-torch.log1p(-gate.clamp(max=1 - 1e-6)), region)


def open_gate_loss(gate: Tensor, region: Tensor) -> Tensor:
    """Mean binary cross-entropy of the copy gate against 1 (the reference's pixels) over ``region``; the mirror of
    :func:`shut_gate_loss`."""
    _check_gate_region("open_gate_loss", gate, region)
    return _region_mean(-torch.log(gate.clamp(min=1e-6)), region)


def copy_gate_loss(gate: Tensor, copy: Tensor, target: Tensor, tolerance: float) -> Tensor:
    """Binary cross-entropy of the reference copy head's gate against where its copy is right (``|copy - target|
    <= tolerance`` per pixel and channel). Without it the gate learns only through the pixel loss, whose gradient
    vanishes where the copy and the decoder's drawing agree: a raised arm that the drawing leaves faint and the
    reference does not show keeps the gate open, so the drawing never gets the gradient to draw it."""
    if not gate.shape == copy.shape == target.shape:
        raise ValueError(
            f"copy_gate_loss: gate {tuple(gate.shape)}, copy {tuple(copy.shape)} and target {tuple(target.shape)} "
            "must match"
        )
    right = ((copy - target).abs() <= tolerance).to(gate.dtype)
    eps = 1e-6
    return F.binary_cross_entropy(gate.clamp(eps, 1 - eps), right)


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """Mean over latent elements of ``KL(N(mean, exp(logvar)) || N(0, 1))`` (Kingma & Welling, App. B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge loss for D (Lim & Ye 2017; LDM ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: ``-E[D(x^)]``."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    nll: Tensor, adv: Tensor, last_layer: Tensor, disc_weight: float, max_weight: float = 1e4
) -> Tensor:
    """LDM's adaptive weight (Esser et al. 2021, eq. 7): balances gradient norms at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (adv_grad.norm() + 1e-4)
    return (weight.clamp(0.0, max_weight) * disc_weight).detach()


def lpips_video(lpips: nn.Module, recon: Tensor, target: Tensor, frames: int | None = None) -> Tensor:
    """Mean LPIPS over frames of ``[B, 3, T, H, W]`` videos in [-1, 1]; ``frames`` random frames per clip if set."""
    b, c, t, h, w = target.shape
    if frames is not None and frames < t:
        idx = torch.randperm(t, device=target.device)[:frames]
        recon, target, t = recon[:, :, idx], target[:, :, idx], frames
    flat = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w)  # noqa: E731
    return lpips(flat(recon), flat(target)).mean()


def build_lpips(net: str, backbone_path: str | os.PathLike | None) -> nn.Module | None:
    """Frozen ``lpips.LPIPS`` with a torchvision backbone read from ``backbone_path``, or ``None`` without one.

    ``backbone_path``: a torchvision ``vgg16`` (net="vgg") or ``alexnet`` (net="alex") state dict
    (``.pth`` read with ``torch.load(weights_only=True)``, or ``.safetensors``), keys
    ``features.N.weight`` as torchvision writes them (classifier keys are ignored).
    """
    if backbone_path is None:
        return None
    if net not in ("vgg", "alex"):
        raise ValueError(f"build_lpips: net must be 'vgg' or 'alex', got {net!r}")
    path = Path(backbone_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS backbone weights not found: {path}. Provide a torchvision {'vgg16' if net == 'vgg' else 'alexnet'} "
            "state dict (e.g. saved from torchvision.models with IMAGENET1K_V1 weights on a machine with network), "
            "or leave lpips_backbone unset to train without the perceptual term."
        )
    import lpips as lpips_pkg

    # pnet_rand=True: build the backbone without torchvision's download; its weights come from `path`.
    model = lpips_pkg.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"LPIPS backbone {path}: no 'features.*' keys; expected a torchvision {net} state dict")
    # lpips splits torchvision's `features` Sequential into slices that keep the original indices.
    mapped = {}
    for name, _ in model.net.named_parameters():
        slice_name, index_and_param = name.split(".", 1)
        if index_and_param not in features:
            raise ValueError(f"LPIPS backbone {path}: missing key features.{index_and_param}")
        mapped[name] = features[index_and_param]
    model.net.load_state_dict(mapped, strict=True)
    # The linear heads ship inside the lpips package.
    head_path = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    model.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True), strict=False)
    model.eval().requires_grad_(False)
    return model
