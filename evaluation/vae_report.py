"""`dystream vae-report`: score a VAE export on the evaluation clips and draw real vs reconstructed frames.

    dystream vae-report --vae runs/vae/vae.safetensors [--clips 16] [--sheet vae_sheet.png] [--json out.json]

The clips are those of `make eval` (`recipes/eval.yaml`: the first 16 validation clips, their last 96 frames, frame 0
as the reference image and the only guidance image), reconstructed as the DiT stages encode them
(:func:`dystream.evaluation.generation.reconstruct`). Prints PSNR, SSIM, the high-frequency energy ratio and the
colour error (:mod:`dystream.evaluation.reconstruction`), where the error lies (:func:`error_where_changed`: the
pixels that differ from the reference image against the rest; :func:`psnr_over_time`), the copy head's gate and warp
by region, and the encode+decode time; the metric-network columns
(Sync-C, mouth-voice r, hand keypoints) come with `make eval`. This is the command behind every row of the ladder in
docs/vae.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HELP = "score a VAE export's reconstructions of the evaluation clips (PSNR, SSIM, grain, colour) and draw them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True, help="VAE export (vae.safetensors)")
    parser.add_argument("--shards", default="data/synthetic/val", help="evaluation shards (default: the embedded set)")
    parser.add_argument("--clips", type=int, default=16, help="clips evaluated (the first N in shard order)")
    parser.add_argument("--frames", type=int, default=96, help="evaluated frames per clip (the last N)")
    parser.add_argument(
        "--references",
        type=int,
        default=1,
        help="guidance images K: 0 = none, 1 = the reference image (frame 0, as the DiT stages), K > 1 = frame 0 and "
        "K - 1 more frames spread evenly before the evaluated window (lower --frames to leave room)",
    )
    for name, what in (("logit", "window logits (1: the softmax it was trained with)"), ("gate", "gate logits")):
        parser.add_argument(
            f"--copy-{name}-scale",
            type=float,
            default=None,
            help=f"decode with the copy head's {what} times this instead of the export's value: above 1 sharper, "
            "trading error where the person moved for detail where nothing did (docs/vae.md, 'Sharper at decode')",
        )
    parser.add_argument(
        "--write-export",
        default=None,
        metavar="PATH",
        help="also write the VAE with these copy scales as a new export (the same weights and latent statistics), for "
        "`dystream eval` or the later stages to decode with",
    )
    parser.add_argument("--sheet", default=None, help="write a PNG contact sheet: real / reconstruction / |error| x4")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--device", default="cpu")


def contact_sheet(real: np.ndarray, recon: np.ndarray, path: str | Path, clips: int = 4, columns: int = 8) -> Path:
    """PNG: for each of the first `clips` clips, a row of real frames, the reconstructions below, then |error| x 4."""
    from PIL import Image

    n, t, h, w, _ = real.shape
    picks = np.linspace(0, t - 1, columns).round().astype(int)
    rows = []
    for i in range(min(clips, n)):
        error = np.clip(np.abs(real[i].astype(np.int16) - recon[i].astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        for video in (real[i], recon[i], error):
            rows.append(np.concatenate([video[j] for j in picks], axis=1))
        rows.append(np.full((2, columns * w, 3), 255, np.uint8))
    sheet = np.concatenate(rows, axis=0)
    image = Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def psnr_over_time(recon: np.ndarray, real: np.ndarray, frames_per_bin: int = 8) -> list[float]:
    """PSNR (dB, range 255) of each run of ``frames_per_bin`` frames, over all clips ``[N, T, H, W, 3]``: whether the
    error grows along a clip (a causal decoder's caches drifting) or follows how far the person is from the
    reference pose."""
    squared = ((recon.astype(np.float32) - real.astype(np.float32)) ** 2).mean(axis=(0, 2, 3, 4))  # [T]
    bins = [squared[a : a + frames_per_bin].mean() for a in range(0, len(squared), frames_per_bin)]
    return [float(10.0 * np.log10(255.0**2 / max(m, 1e-12))) for m in bins]


def error_where_changed(
    real: np.ndarray, references: np.ndarray, videos: dict[str, np.ndarray], threshold: float = 0.05
) -> dict[str, dict[str, float]]:
    """Where the reconstruction's error lies. ``changed``: the pixels whose real frame differs from the reference
    image by more than ``threshold`` of the range (mean over channels), where the person has moved; ``unchanged``:
    the rest. For each: the share of the pixels, the share of the first video's squared error, and the RMSE (0-255)
    and the high-frequency energy ratio (the HF ratio of :func:`reconstruction_quality` summed over the region's
    pixels: below 1 blur, above 1 grain) of every video in ``videos`` (``output``; with a copy head also
    ``estimate``, the decoder's own drawing before it, and ``copy``, what it copies). real and videos
    ``[N, T, H, W, 3]`` uint8, references ``[N, H, W, 3]``."""
    from dystream.evaluation.reconstruction import laplacian_response

    laplacian_real = laplacian_response(real)  # [N, T, H - 2, W - 2]
    laplacians = {name: laplacian_response(v) for name, v in videos.items()}
    real = real.astype(np.float32)
    changed = np.abs(real - references[:, None].astype(np.float32)).mean(-1) > threshold * 255.0
    squared = {name: ((v.astype(np.float32) - real) ** 2).mean(-1) for name, v in videos.items()}
    first = next(iter(squared.values()))
    out = {}
    for region, mask in (("changed", changed), ("unchanged", ~changed)):
        figures = {"pixels": float(mask.mean()), "error_share": float(first[mask].sum() / max(first.sum(), 1e-12))}
        inner = mask[..., 1:-1, 1:-1]  # the pixels the Laplacian is centred on
        real_energy = float(laplacian_real[inner].sum())
        for name, se in squared.items():
            figures[f"rmse_{name}"] = float(np.sqrt(se[mask].mean())) if mask.any() else float("nan")
            figures[f"hf_ratio_{name}"] = (
                float(laplacians[name][inner].sum()) / real_energy if real_energy > 0 else float("nan")
            )
        out[region] = figures
    return out


def mean_by_region(values: np.ndarray, frames: np.ndarray, kpts: list[np.ndarray | None]) -> dict[str, float]:
    """Mean of a per-pixel figure ``values [N, T, H, W]`` (the copy head's gate, 1 = the reference's pixels; the
    length of its warp in pixels) in the lips' box, in the hands' boxes (the clips' keypoint labels), where the real
    video moves (a pixel changing by more than 0.05 of the range from the previous frame) and where it is still. A
    gate that copies the reference as much where the person moves as where nothing moves cannot bring back what the
    reference does not show."""
    import torch

    from dystream.datamodules.keypoints import HANDS, MOUTH
    from dystream.objectives.vae import keypoint_box_mask

    n, t, h, w = values.shape
    if frames.shape[:4] != (n, t, h, w):
        raise ValueError(f"mean_by_region: values {values.shape} and frames {frames.shape} do not match")
    luma = frames.astype(np.float32).mean(-1) / 255.0
    moving = np.zeros((n, t, h, w), bool)
    moving[:, 1:] = np.abs(np.diff(luma, axis=1)) > 0.05
    still = np.ones_like(moving)
    still[:, 0] = False  # frame 0 has no previous frame to compare with
    still &= ~moving
    out = {
        "moving": float(values[moving].mean()) if moving.any() else float("nan"),
        "still": float(values[still].mean()),
    }
    labelled = [i for i, k in enumerate(kpts) if k is not None]
    if labelled:
        kp = torch.from_numpy(np.stack([kpts[i] for i in labelled])).float()
        half = (HANDS.stop - HANDS.start) // 2
        boxes = {
            "lips": keypoint_box_mask(kp, MOUTH, h, w),
            "hands": (
                keypoint_box_mask(kp, slice(HANDS.start, HANDS.start + half), h, w)
                + keypoint_box_mask(kp, slice(HANDS.start + half, HANDS.stop), h, w)
            ).clamp(max=1),
        }
        g = values[labelled]
        for name, box in boxes.items():
            m = box.numpy() > 0
            out[name] = float(g[m].mean()) if m.any() else float("nan")
    return out


def guidance_frames(args: argparse.Namespace) -> bool | np.ndarray:
    """False, True (the reference image) or uint8 [N, K, H, W, 3]: frame 0 and K - 1 frames spread evenly over the
    frames between it and the evaluated window (never frames the VAE reconstructs)."""
    from dystream.datamodules.format import read_shards, resolve_shards, sample_to_clip

    if args.references < 0:
        raise ValueError(f"vae-report: --references must be >= 0, got {args.references}")
    if args.references <= 1:
        return args.references == 1
    out = []
    for sample in read_shards(resolve_shards(args.shards).urls):
        clip = sample_to_clip(sample)
        before = clip.n_frames - args.frames  # frames 0 .. before - 1 lie outside the evaluated window
        if before < args.references:
            raise ValueError(
                f"vae-report: {clip.key} has {before} frame(s) before the evaluated window, fewer than "
                f"--references {args.references}; lower --frames"
            )
        out.append(clip.video[np.linspace(0, before - 1, args.references).round().astype(int)])
        if len(out) == args.clips:
            break
    return np.stack(out)


def run(args: argparse.Namespace) -> int:
    import torch

    from dystream.evaluation.cli import ClipsConfig, load_clips
    from dystream.evaluation.generation import _to_uint8, reconstruct
    from dystream.evaluation.reconstruction import reconstruction_quality

    if not Path(args.vae).is_file():
        print(f"vae-report: {args.vae} not found (train one with `make train RECIPE=vae`)")
        return 2
    from dystream.stages.common import load_frozen

    clips = load_clips(ClipsConfig(shards=args.shards, count=args.clips, frames=args.frames))
    vae = load_frozen(args.vae, "vae")
    scales = {f"copy_{n}_scale": v for n in ("logit", "gate") if (v := getattr(args, f"copy_{n}_scale")) is not None}
    try:
        vae.set_copy_scales(**scales)
    except ValueError as e:
        print(f"vae-report: {args.vae}: {e}")
        return 2
    if args.write_export:
        from dystream.zoo.files import read_metadata, save_model

        extra = {**read_metadata(args.vae)[2], "copy_scales_from": str(args.vae)}
        path = save_model(vae, args.write_export, arch="vae", extra=extra)
        print(
            f"vae-report: wrote {path} (copy_logit_scale {vae.config.copy_logit_scale:g}, "
            f"copy_gate_scale {vae.config.copy_gate_scale:g})"
        )
    head = vae.decoder.copy_head
    logits: list[torch.Tensor] = []  # the copy gate's logits [B, T, h, w, 3 p^2] of each decoded batch
    flows: list[torch.Tensor] = []  # the copy warp's flow [B, T, h, w, 2] (pixels) of each decoded batch
    parts: dict[str, list[torch.Tensor]] = {"estimate": [], "copy": []}  # the copy head's input and copy, as videos
    hooks = []

    def keep_parts(module, inputs, outputs) -> None:
        if outputs[1] is not None:
            parts["estimate"].append(vae.decoder._unpatchify(inputs[1]).detach())
            parts["copy"].append(vae.decoder._unpatchify(outputs[1]).detach())

    if head is not None:
        hooks.append(head.register_forward_hook(keep_parts))
        hooks.append(head.to_gate.register_forward_hook(lambda m, i, o: logits.append(o.detach())))
        if head.to_flow is not None:
            hooks.append(head.to_flow.register_forward_hook(lambda m, i, o: flows.append(o.detach())))
    torch.manual_seed(0)
    start = time.perf_counter()
    recon = np.stack(
        reconstruct(vae, clips.references, clips.frames, device=args.device, guidance=guidance_frames(args))
    )
    seconds = time.perf_counter() - start
    figures = reconstruction_quality(recon, clips.frames)
    for hook in hooks:
        hook.remove()
    p = vae.config.patch_size
    if logits:  # [N, T, H, W]: the gate per pixel, averaged over colours; the reference frame dropped
        gate = torch.cat(logits).float().mul(head.gate_scale).sigmoid()[:, 1:].unflatten(-1, (-1, p, p)).mean(-3)
        gate = gate.permute(0, 1, 2, 4, 3, 5).flatten(2, 3).flatten(3, 4).cpu().numpy()
        figures["copy_gate"] = mean_by_region(gate, clips.frames, clips.kpts)
    if flows:  # [N, T, H, W]: the warp's length per cell, repeated over its p x p pixels
        length = torch.cat(flows).float()[:, 1:].norm(dim=-1).repeat_interleave(p, -1).repeat_interleave(p, -2)
        figures["copy_flow_px"] = mean_by_region(length.cpu().numpy(), clips.frames, clips.kpts)
    videos = {"output": recon}
    for name, chunks in parts.items():
        if chunks:  # [N, 3, T, H, W] -> uint8 [N, T, H, W, 3] as the output, the reference frame dropped
            videos[name] = np.stack([_to_uint8(v) for v in torch.cat(chunks).float()[:, :, 1:]])
    figures["error_where_changed"] = error_where_changed(clips.frames, clips.references, videos)
    figures["psnr_over_time"] = psnr_over_time(recon, clips.frames)
    figures.update(clips=len(clips.keys), frames=int(clips.frames.shape[1]), references=args.references, **scales)
    figures["seconds_per_frame"] = seconds / (clips.frames.shape[0] * clips.frames.shape[1])
    print(
        f"{args.vae}: PSNR {figures['psnr']:.2f} dB  SSIM {figures['ssim']:.4f}  HF ratio {figures['hf_ratio']:.3f}  "
        f"colour error max {figures['colour_error_max']:.2f} / mean {figures['colour_error_mean']:.2f} (1/255)  "
        f"[{figures['clips']} clips x {figures['frames']} frames, K={args.references}"
        + "".join(f", {k} {v:g}" for k, v in scales.items())
        + "]"
    )
    if "copy_gate" in figures:
        print(
            "copy gate (mean, 1 = the reference's pixels): "
            + "  ".join(f"{k} {v:.3f}" for k, v in figures["copy_gate"].items())
        )
    if "copy_flow_px" in figures:
        print(
            "copy warp (mean length, pixels): " + "  ".join(f"{k} {v:.3f}" for k, v in figures["copy_flow_px"].items())
        )
    for region, f in figures["error_where_changed"].items():
        rmse = "  ".join(f"{k[5:]} {v:.2f}" for k, v in f.items() if k.startswith("rmse_"))
        hf = "  ".join(f"{k[9:]} {v:.3f}" for k, v in f.items() if k.startswith("hf_ratio_"))
        print(
            f"{region} pixels (vs the reference image): {100 * f['pixels']:.1f} % of the pixels, "
            f"{100 * f['error_share']:.1f} % of the squared error; RMSE (0-255) {rmse}; HF ratio {hf}"
        )
    print("PSNR over time (dB, 8 frames at a time): " + " ".join(f"{v:.1f}" for v in figures["psnr_over_time"]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if args.sheet:
        print(f"contact sheet: {contact_sheet(clips.frames, recon, args.sheet)}")
    return 0
