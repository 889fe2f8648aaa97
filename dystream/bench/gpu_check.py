"""``make gpu-check``: run every GPU-only path once and write ``docs/gpu.md`` with the device's name.

Checks, in order (each one reports and the next one runs even if it failed):

1. FlexAttention vs SDPA: the block-causal full-sequence forward of a DiT without RAPR (the only layout the flex
   path serves) with ``attention_backend="flex"`` and ``"sdpa"``, max difference;
2. training steps of the teacher, SiD and GAN stages at ``small`` in ``bf16-mixed`` through Lightning: finite
   losses, and whether they fall over the steps (same batch every step);
3. one ``wan2.2-ti2v-5b`` student chunk at 928x704 in bf16 on the ``ref-dc-f32t4c16`` latents (1x1 patches: the
   paper's 638 tokens per frame): step time, chunk time, RTF, peak memory, MFU;
4. 20 streaming chunks at that size: per-module RTF and first-frame delay (VAE on a second GPU when there is one);
5. one ``wan2.2-ti2v-5b`` teacher training step on a whole 81-frame clip at that size (bf16 autocast over fp32
   weights, fused AdamW, activation checkpointing): step time, peak memory, MFU;
6. a single-device FSDP wrap (Lightning ``FSDPStrategy``, AvatarBlock units) training the teacher two steps;
7. (CUDA) ``StreamingConfig.compile`` (CUDA graphs) against eager on the tiny presets.

On a CPU (``make gpu-check DEVICE=cpu``) the same code runs at the tiny presets and 64x64 in well under a minute
(the test suite runs it so), FlexAttention and CUDA graphs are reported as skipped. On one H200 the whole check
took 166 s, 117 s of it compiling the CUDA graphs (``docs/gpu.md``). The report is rewritten after every check.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from dystream.bench import scaled

STEPS = {"cuda": 8, "cpu": 4}  # training steps per stage


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------- checks
def check_flex(device: str, real: bool) -> dict[str, Any]:
    from dystream.models.dit import AvatarDiT, DiTConfig

    if torch.device(device).type != "cuda":
        return {"status": "skipped", "why": "the FlexAttention path runs on CUDA only (AvatarDiT falls back to SDPA)"}
    preset = "small" if real else "tiny"
    torch.manual_seed(0)
    cfg = DiTConfig.from_preset(preset, rapr=False, audio_dim=32)
    sdpa = AvatarDiT(cfg).to(device).eval()
    flex = AvatarDiT(DiTConfig.from_preset(preset, rapr=False, audio_dim=32, attention_backend="flex")).to(device)
    flex.load_state_dict(sdpa.state_dict())
    flex.eval()
    f = 1 + 4 * cfg.chunk_frames
    x = torch.randn(1, cfg.in_channels, f, 16, 16, device=device)
    sigma = torch.rand(1, f, device=device)
    audio = torch.randn(1, cfg.frames_per_latent * (f - 1), 32, device=device)
    with torch.inference_mode():
        a = sdpa(x, sigma, audio, audio, attention="block_causal")
        b = flex(x, sigma, audio, audio, attention="block_causal")
    diff = float((a - b).abs().max())
    return {
        "status": "ok" if diff < 1e-3 else "FAILED",
        "what": f"{preset}, block-causal, {f} latent frames of 16x16, fp32",
        "max |flex - sdpa|": diff,
    }


def _batches(n: int, size: int, seed: int = 0) -> list[dict[str, Any]]:
    t = 12  # one chunk of video frames
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(2, 3, t, size, size, generator=g) * 2 - 1
    batch = {
        "video": video,
        "references": video[:, :, :1].transpose(1, 2).clone(),
        "audio_self": torch.randn(2, t * 640, generator=g) * 0.1,
        "audio_other": torch.randn(2, t * 640, generator=g) * 0.1,
        "mask": (torch.arange(t) < t // 2).float().expand(2, t).clone(),
        "key": ["a", "b"],
    }
    return [batch] * n


class _Losses:
    """Lightning callback collecting the named logged values after every training batch."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        import lightning as L

        outer = self
        self.values: dict[str, list[float]] = {k: [] for k in keys}

        class Cb(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                for k in keys:
                    if k in trainer.callback_metrics:
                        outer.values[k].append(float(trainer.callback_metrics[k]))

        self.callback = Cb()


def _fit(
    stage, device: str, root: Path, steps: int, keys: tuple[str, ...], strategy: Any = "auto", **extra: Any
) -> dict:
    import lightning as L

    losses = _Losses(keys)
    callbacks = [losses.callback, *extra.pop("callbacks", [])]
    precision = {} if extra.get("plugins") else {"precision": "bf16-mixed"}
    trainer = L.Trainer(
        accelerator="cuda" if torch.device(device).type == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=callbacks,
        **precision,
        **extra,
    )
    loader = torch.utils.data.DataLoader(_batches(steps, 64), batch_size=None)
    start = time.perf_counter()
    trainer.fit(stage, train_dataloaders=loader)
    return {"values": losses.values, "wall": time.perf_counter() - start}


def _loss_figures(values: dict[str, list[float]], falling_key: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    finite = all(v and all(math.isfinite(x) for x in v) for v in values.values())
    for k, v in values.items():
        out[k] = " ".join(f"{x:.4f}" for x in v) if v else "not logged"
    falling = None
    if falling_key and len(values.get(falling_key, [])) >= 4:
        v = values[falling_key]
        falling = sum(v[-2:]) < sum(v[:2])
        out[f"{falling_key} falls (last two < first two; informative: sigmas are drawn per step)"] = falling
    out["status"] = "ok" if finite else "FAILED (non-finite loss)"
    return out


def check_training(device: str, real: bool, root: Path) -> dict[str, Any]:
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
    from dystream.stages.stage1_sid import SiDStage
    from dystream.stages.stage2_gan import GANStage
    from dystream.stages.teacher import TeacherStage
    from dystream.zoo.files import save_model

    preset = "small" if real else "tiny"
    steps = STEPS[torch.device(device).type]
    torch.manual_seed(0)
    vae = str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), root / "vae.safetensors", arch="vae"))
    figures: dict[str, Any] = {"what": f"DiT {preset} on the tiny VAE at 64x64, batch 2 x 12 frames, bf16-mixed, "
                                       f"{steps} steps on one batch"}  # fmt: skip
    teacher = TeacherStage(vae=vae, dit_preset=preset, export_dir=str(root / "teacher"), lr=1e-3, warmup_steps=0)
    run = _fit(teacher, device, root, steps, ("train/loss",))
    figures["teacher"] = _loss_figures(run["values"], "train/loss") | {"wall": f"{run['wall']:.1f} s"}
    teacher.export()
    files = {
        "teacher": str(root / "teacher" / "teacher.safetensors"),
        "audio": str(root / "teacher" / "audio.safetensors"),
    }
    common = {"student": files["teacher"], "teacher": files["teacher"], "vae": vae, "audio": files["audio"]}
    del teacher
    _free(device)
    sid = SiDStage(**common, lr=1e-4, lr_fake=1e-3, export_dir=str(root / "sid"))
    run = _fit(sid, device, root, steps, ("train/loss_fake", "train/loss_generator"))
    figures["SiD"] = _loss_figures(run["values"], "train/loss_fake") | {"wall": f"{run['wall']:.1f} s"}
    del sid
    _free(device)
    gan = GANStage(**common, lr=1e-4, export_dir=str(root / "gan"))
    run = _fit(gan, device, root, steps, ("train/loss_d",))
    figures["GAN"] = _loss_figures(run["values"], None) | {"wall": f"{run['wall']:.1f} s"}
    del gan
    _free(device)
    figures["status"] = "ok" if all(figures[k]["status"] == "ok" for k in ("teacher", "SiD", "GAN")) else "FAILED"
    return figures


def _setup(device: str, real: bool, vae_device: str | None = None, compile: bool = False) -> scaled.Setup:
    if real:
        return scaled.Setup("wan2.2-ti2v-5b", "ref-dc-f32t4c16", 928, 704, torch.bfloat16, device, 1, vae_device)
    return scaled.Setup("tiny", "tiny", 64, 64, torch.bfloat16, device, None, vae_device, compile)


def check_student_chunk(device: str, real: bool) -> dict[str, Any]:
    figures = scaled.dit_chunk(_setup(device, real), repeats=5)
    figures["status"] = "ok"
    return figures


def check_teacher_step(device: str, real: bool) -> dict[str, Any]:
    """One teacher training step at the paper's size: a whole 81-frame clip (21 latent frames), batch 1."""
    frames = 21 if real else 3
    figures = scaled.training_step(_setup(device, real), repeats=3, frames=frames, warmup=1, checkpointing=True)
    figures["status"] = "ok"
    return figures


def check_stream(device: str, real: bool) -> dict[str, Any]:
    vae_device = None
    if torch.device(device).type == "cuda" and torch.cuda.device_count() > 1:
        vae_device = "cuda:1"  # the paper's split: DiT on one GPU, VAE decode on the other
    figures = scaled.stream(_setup(device, real, vae_device), chunks=20)
    figures["status"] = "ok"
    return figures


def check_fsdp(device: str, root: Path) -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy

    from dystream.models.dit import AvatarBlock
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
    from dystream.scale import FSDPMixedPrecision, FSDPUnits
    from dystream.stages.teacher import TeacherStage
    from dystream.zoo.files import save_model

    class SingleDeviceFSDP(FSDPStrategy):
        """Lightning's FSDPStrategy unchanged (a subclass passes its CUDA-only accelerator type check on a CPU)."""

    on_cuda = torch.device(device).type == "cuda"
    strategy = (FSDPStrategy if on_cuda else SingleDeviceFSDP)(
        auto_wrap_policy={AvatarBlock},
        sharding_strategy="FULL_SHARD",
        **({} if on_cuda else {"process_group_backend": "gloo"}),
    )
    torch.manual_seed(0)
    vae = str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), root / "vae_fsdp.safetensors", arch="vae"))
    stage = TeacherStage(vae=vae, dit_preset="tiny", export_dir=str(root / "fsdp"), lr=1e-3, warmup_steps=0)
    stage.dit.text_context.requires_grad_(False)  # the tiny preset's learned prompt; real presets have a fixed one
    # the recipes' way (recipes/scale/fsdp.yaml): FSDPUnits wraps each block as its own root; CPU autocast leaves
    # layer_norm's bf16-gathered weights uncast, so the CPU run is fp32
    precision = FSDPMixedPrecision("bf16-mixed" if on_cuda else "32-true")
    run = _fit(stage, device, root, 2, ("train/loss",), strategy, plugins=[precision], callbacks=[FSDPUnits()])
    units = sum(1 for m in stage.modules() if type(m).__name__ == "FullyShardedDataParallel")
    figures = _loss_figures(run["values"], None)
    figures["FSDP units"] = units
    if units == 0:
        figures["status"] = "FAILED"
    return figures | {
        "what": "teacher tiny, 2 steps, FSDPStrategy (FULL_SHARD, AvatarBlock units) + FSDPUnits, 1 device"
    }


def check_cuda_graphs(device: str) -> dict[str, Any]:
    import numpy as np

    from dystream.models.audio import AudioEncoder
    from dystream.models.dit import AvatarDiT, DiTConfig
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
    from dystream.streaming.avatar import StreamingAvatar

    if torch.device(device).type != "cuda":
        return {"status": "skipped", "why": "CUDA graphs need a CUDA device (the CPU compile path is a unit test)"}
    torch.manual_seed(0)
    nets = (AvatarDiT(DiTConfig.from_preset("tiny")), ReferenceGuidedVAE(VAEConfig.from_preset("tiny")))
    ref = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    own, other = (rng.standard_normal(12 * 640 * 8).astype(np.float32) * 0.1 for _ in range(2))
    frames, walls = [], []
    for compile in (False, True):
        session = StreamingAvatar(*nets, AudioEncoder("tiny"), ref, device=device, threaded=False, compile=compile)
        start = time.perf_counter()
        frames.append(np.stack(session.push(own, other, 1.0) + session.flush()).astype(int))
        walls.append(time.perf_counter() - start)
    diff = int(np.abs(frames[0] - frames[1]).max())
    return {
        "status": "ok" if diff <= 2 else "FAILED",
        "what": "tiny presets, 8 chunks, StreamingConfig.compile (mode reduce-overhead) vs eager",
        "max |compiled - eager| (uint8 frames)": diff,
        "wall eager / compiled (compiled includes compilation)": f"{walls[0]:.2f} s / {walls[1]:.2f} s",
    }


# ------------------------------------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.4g} {v['unit']} (min {v['min']:.4g}, max {v['max']:.4g}, n={v['n']})"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(device_name: str, device: str, results: dict[str, dict[str, Any]], wall: float) -> str:
    lines = [
        "# GPU check",
        "",
        "Written by `make gpu-check` (`python -m dystream.bench.gpu_check`): every GPU-only path run once.",
        "",
        f"- device: {device_name} (`{device}`), torch {torch.__version__}",
        f"- total wall time: {wall:.0f} s",
        "",
        "| check | status |",
        "|---|---|",
    ]
    lines += [f"| {name} | {fig.get('status', '?')} |" for name, fig in results.items()]
    for name, figures in results.items():
        lines += ["", f"## {name}", "", "| figure | value |", "|---|---|"]
        for key, value in figures.items():
            if isinstance(value, dict) and "median" not in value:
                lines += [f"| {key}: {k} | {_fmt(v)} |" for k, v in value.items()]
            else:
                lines.append(f"| {key} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dystream.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (real presets) or cpu (tiny presets, a smoke run)")
    parser.add_argument("--out", default="docs/gpu.md", help="markdown report")
    parser.add_argument("--real", choices=("auto", "yes", "no"), default="auto", help="real presets (auto: on CUDA)")
    args = parser.parse_args(argv)
    from dystream.bench.cli import check_device

    try:
        check_device(args.device)
    except ValueError as err:
        print(f"gpu-check: {err}; on a machine without a GPU run `make gpu-check DEVICE=cpu`")
        return 2
    real = args.real == "yes" or (args.real == "auto" and torch.device(args.device).type == "cuda")
    name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checks = {
            "FlexAttention vs SDPA": lambda: check_flex(args.device, real),
            "training steps (teacher, SiD, GAN), bf16": lambda: check_training(args.device, real, root),
            "student chunk": lambda: check_student_chunk(args.device, real),
            "streaming, 20 chunks": lambda: check_stream(args.device, real),
            "teacher training step, 81 frames": lambda: check_teacher_step(args.device, real),
            "FSDP, one device": lambda: check_fsdp(args.device, root),
            "CUDA graphs (StreamingConfig.compile)": lambda: check_cuda_graphs(args.device),
        }
        for label, fn in checks.items():
            t0 = time.perf_counter()
            print(f"[gpu-check] {label} ...", flush=True)
            try:
                results[label] = fn()
            except Exception as exc:  # report and go on: one broken path must not hide the others
                traceback.print_exc()
                results[label] = {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}"}
            results[label]["check wall time"] = f"{time.perf_counter() - t0:.1f} s"
            print(f"  -> {results[label]['status']} ({results[label]['check wall time']})", flush=True)
            with contextlib.suppress(Exception):
                _free(args.device)
            # written after every check: a run stopped by a time limit keeps the checks it finished
            out.write_text(render(name, args.device, results, time.perf_counter() - start))
    print(f"[gpu-check] wrote {out}")
    return 1 if any(str(r.get("status")).startswith("FAILED") for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
