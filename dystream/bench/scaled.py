"""Benchmarks at any preset, size, device and dtype: the DiT chunk step, the VAE decode, a training step, a stream.

``dystream bench dit|vae|training|streaming --preset NAME --size HxW --device cuda --dtype bf16`` run these
(CPU and fp32 stay the defaults). Every figure set reports the step time, the peak memory, the achieved FLOP/s and
the model FLOPs utilisation (MFU) against the matmul peak measured on the same device and dtype, once per process.

* FLOPs come from the analytic model (:mod:`dystream.bench.cost`), which agrees with ``FlopCounterMode``;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the measured calls (tensors only, not the caching
  allocator's reserve); on a CPU the process's resident high-water mark (``VmHWM``), reset before the measurement
  through ``/proc/self/clear_refs`` where Linux allows it. The CPU figure includes the Python runtime, torch and
  every model the process holds, so it is an upper bound on what the benchmarked call needs.

Weights are random (speed does not depend on them); real presets are built directly on the target device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dystream.bench import cost
from dystream.bench.timing import summarize, time_call

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the VAE a DiT preset is paired with when --vae is not given, and the default video size of that VAE
DEFAULT_VAE = {"wan2.2-ti2v-5b": "ref-dc-f32t4c16"}
DEFAULT_SIZE = {"ref-dc-f32t4c16": (928, 704)}
_PEAKS: dict[tuple[str, torch.dtype], dict[str, Any]] = {}


def torch_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: str, dtype: torch.dtype = torch.float32, repeats: int = 5) -> dict[str, Any]:
    """Measured FLOP/s of a large square matmul (2 n^3 FLOPs) on ``device``, once per process and dtype.

    n = 8192 on CUDA (large enough for the tensor cores' steady state), 1024 on a CPU (as the training benchmark).
    """
    key = (str(torch.device(device)), dtype)
    if key not in _PEAKS:
        n = 8192 if torch.device(device).type == "cuda" else 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = time_call(lambda: a @ b, repeats=repeats, warmup=2, device=device)
        _PEAKS[key] = summarize([2 * n**3 / t for t in times], "FLOP/s") | {"size": n}
    return _PEAKS[key]


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, Any]]:
    """``with peak_memory(dev) as mem: ...`` -> ``mem["bytes"]`` and ``mem["what"]`` (see the module docstring)."""
    mem: dict[str, Any] = {}
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        reset = _reset_cpu_peak()
    yield mem
    if dev.type == "cuda":
        sync(dev)
        mem["bytes"] = torch.cuda.max_memory_allocated(dev)
        mem["what"] = "torch.cuda.max_memory_allocated"
    else:
        mem["bytes"] = _cpu_peak_bytes()
        mem["what"] = "process peak RSS (VmHWM" + (", reset before the run)" if reset else ", since process start)")


def efficiency(flops: float, seconds: float, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Achieved FLOP/s and MFU against the measured matmul peak of ``device`` in ``dtype``."""
    peak = matmul_peak(device, dtype)
    achieved = flops / seconds
    return {
        "FLOPs per call (cost model)": flops,
        "achieved FLOP/s": achieved,
        f"matmul peak ({str(dtype).removeprefix('torch.')}, {peak['size']}^2, measured)": peak,
        "MFU (achieved / measured matmul peak)": achieved / peak["median"],
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def build(factory: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build a network directly on ``device`` (a 7B DiT would not fit a CPU's RAM twice) and cast it to ``dtype``."""
    with torch.device(device):
        module = factory()
    return module.to(dtype).eval()


def maybe_compile(fn: Callable, enabled: bool | None, mode: str | None = None) -> Callable:
    return torch.compile(fn, mode=mode) if enabled else fn


@dataclasses.dataclass
class Setup:
    """What a scaled benchmark runs: DiT and VAE presets, video size, dtype, devices."""

    preset: str
    vae: str
    height: int
    width: int
    dtype: torch.dtype
    device: str
    patch: int | None = None
    vae_device: str | None = None
    compile: bool = False

    @classmethod
    def from_options(
        cls,
        device: str,
        preset: str | None,
        size: str | None,
        dtype: str | None,
        vae: str | None,
        patch: int | None = None,
        vae_device: str | None = None,
        compile: bool | None = None,
        default_preset: str = "small",
    ) -> Setup:
        preset = preset or default_preset
        vae = vae or DEFAULT_VAE.get(preset, "tiny")
        height, width = cost.parse_size(size) if size else DEFAULT_SIZE.get(vae, (64, 64))
        return cls(preset, vae, height, width, torch_dtype(dtype), device, patch, vae_device, bool(compile))

    def configs(self):
        dit, vae = cost.paired_configs(self.preset, self.vae, self.patch)
        return dit, vae, cost.latent_grid(dit, vae, self.height, self.width)

    def describe(self) -> str:
        dit, vae, (h, w) = self.configs()
        _, ph, pw = dit.patch_size
        return (
            f"DiT {self.preset} (patch {ph}x{pw}, {dit.in_channels} latent channels) on VAE {self.vae}, "
            f"{self.height}x{self.width} video -> {h}x{w} latents, {(h // ph) * (w // pw)} tokens per latent frame, "
            f"{str(self.dtype).removeprefix('torch.')}, device {self.device}"
            + (f", VAE on {self.vae_device}" if self.vae_device else "")
            + (", torch.compile" if self.compile else "")
            + f", torch threads {torch.get_num_threads()}"
        )


# ---------------------------------------------------------------------------------------------------------- DiT
def dit_chunk(setup: Setup, repeats: int, steps: int = 3) -> dict[str, Any]:
    """Streaming student step at steady state (sink + full window in the cache): one denoising forward, and a
    chunk of ``steps`` forwards (the last writes the cache), per-chunk RTF against the chunk's 4C / 25 s."""
    from dystream.models.dit import AvatarDiT

    cfg, _, (h, w) = setup.configs()
    dev, dtype = setup.device, setup.dtype
    torch.manual_seed(0)
    model = build(lambda: AvatarDiT(cfg), dev, dtype)
    c = cfg.chunk_frames
    context = None
    if not cfg.learned_text_context:  # real presets take the precomputed prompt; any [L, text_dim] times the same
        context = torch.zeros(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)
    x = torch.randn(1, cfg.in_channels, c, h, w, device=dev, dtype=dtype)
    sigma = torch.full((1, c), 0.5, device=dev)
    audio = torch.randn(1, cfg.chunk_audio_frames(c), cfg.audio_dim, device=dev)
    forward = maybe_compile(model.forward_chunk, setup.compile)
    with torch.inference_mode():
        cache = model.new_kv_cache(1)
        model.forward_chunk(torch.randn_like(x[:, :, :1]), sigma[:, :1] * 0, None, None, cache, context)
        while cache.num_frames < cfg.layout.max_cached_frames:  # fast-forward: speed depends on shapes, not values
            kv = torch.zeros(1, c, (h // cfg.patch_size[1]) * (w // cfg.patch_size[2]), cfg.num_heads, cfg.head_dim)
            kv = kv.to(device=dev, dtype=dtype)
            cache.append([(kv, kv)] * cfg.num_layers, cache.next_frame, c)

        def denoise() -> None:
            forward(x, sigma, audio, audio, cache, context, write_cache=False)

        def chunk() -> None:
            fork = dataclasses.replace(cache, keys=list(cache.keys), values=list(cache.values))
            fork.frame_ids = list(cache.frame_ids)
            for k in range(steps):
                forward(x, sigma, audio, audio, fork, context, write_cache=k == steps - 1)

        with peak_memory(dev) as mem:
            step_t = time_call(denoise, repeats=repeats, warmup=2, device=dev)
            chunk_t = time_call(chunk, repeats=max(1, repeats // 2), warmup=1, device=dev)
    step_s = summarize(step_t, "s")
    chunk_s = summarize(chunk_t, "s")
    media = cfg.frames_per_latent * c / cost.FPS
    flops = cost.dit_forward_flops(cfg, (h, w), c, cfg.layout.max_cached_frames + c)["total"]
    params = sum(p.numel() for p in model.parameters())
    return {
        "setup": setup.describe() + f", {params / 1e6:.1f}M parameters, N={steps}, C={c}",
        "denoising forward (chunk of C frames, full window)": step_s,
        f"chunk ({steps} forwards, last writes the cache)": chunk_s,
        f"DiT RTF (chunk time / {media:.2f} s)": chunk_s["median"] / media,
        "peak memory": _gib(mem["bytes"]) + f" ({mem['what']})",
        "KV cache": f"{cache.num_frames} frames, {cache.nbytes() / 2**20:.1f} MiB",
    } | efficiency(flops, step_s["median"], dev, dtype)


# ---------------------------------------------------------------------------------------------------------- VAE
def vae_decode(setup: Setup, repeats: int) -> dict[str, Any]:
    """Streaming decode of one latent frame (-> 4 video frames) at steady state, with one reference image."""
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig

    cfg = VAEConfig.from_preset(setup.vae)
    cost.latent_grid(*cost.paired_configs("tiny", setup.vae, 1), setup.height, setup.width)  # size check only
    dev, dtype = setup.vae_device or setup.device, setup.dtype
    torch.manual_seed(0)
    vae = build(lambda: ReferenceGuidedVAE(cfg), dev, dtype)
    r_s, r_t = cfg.spatial_factor, cfg.temporal_factor
    refs = torch.rand(1, 1, 3, setup.height, setup.width, device=dev, dtype=dtype) * 2 - 1
    z = torch.randn(1, cfg.latent_channels, 1, setup.height // r_s, setup.width // r_s, device=dev, dtype=dtype)
    with torch.inference_mode():
        cache = vae.new_decode_cache(refs)
        vae.decode_chunk(z, cache)
        decode = maybe_compile(vae.decode_chunk, setup.compile)
        with peak_memory(dev) as mem:
            times = time_call(lambda: decode(z, cache), repeats=repeats, warmup=2, device=dev)
    lat = summarize(times, "s")
    flops = cost.vae_decode_flops(cfg, setup.height, setup.width)["total"]
    params = sum(p.numel() for p in vae.parameters())
    return {
        "setup": f"VAE {setup.vae} ({params / 1e6:.1f}M parameters), {setup.height}x{setup.width}, "
        f"{str(dtype).removeprefix('torch.')}, device {dev}" + (", torch.compile" if setup.compile else ""),
        f"decode one latent frame ({r_t} video frames)": lat,
        "decoded frames/s": r_t / lat["median"],
        f"VAE RTF (time / {r_t / cost.FPS:.2f} s)": lat["median"] / (r_t / cost.FPS),
        "peak memory": _gib(mem["bytes"]) + f" ({mem['what']})",
    } | efficiency(flops, lat["median"], dev, dtype)


# ------------------------------------------------------------------------------------------------------ training
def training_step(
    setup: Setup,
    repeats: int,
    batch: int = 1,
    frames: int = 5,
    autocast: bool = True,
    warmup: int = 2,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """A teacher flow-matching step on latents (what a cached-latent batch costs): bidirectional forward over
    ``frames`` latent frames (reference clean), velocity loss, backward, AdamW. Low precision runs as autocast
    over fp32 weights (Lightning's ``bf16-mixed``); fp32 runs plain. ``checkpointing`` recomputes each block in the
    backward pass (``DiTConfig.gradient_checkpointing``, what the paper-scale recipes set)."""
    from dystream.models.dit import AvatarDiT

    cfg, _, (h, w) = setup.configs()
    if checkpointing:
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
    dev = setup.device
    torch.manual_seed(0)
    model = build(lambda: AvatarDiT(cfg), dev, torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(dev).type == "cuda")
    x0 = torch.randn(batch, cfg.in_channels, frames, h, w, device=dev)
    noise = torch.randn_like(x0)
    sigma = torch.rand(batch, 1, device=dev).expand(batch, frames).clone()
    sigma[:, 0] = 0
    audio = torch.randn(batch, cfg.frames_per_latent * (frames - 1), cfg.audio_dim, device=dev)
    context = None if cfg.learned_text_context else torch.zeros(1, cfg.text_len, cfg.text_dim, device=dev)
    s = sigma[:, None, :, None, None]
    xt, target = (1 - s) * x0 + s * noise, noise - x0
    low = setup.dtype != torch.float32 and autocast
    forward = maybe_compile(model, setup.compile)
    losses: list[float] = []

    def step() -> None:
        with torch.autocast(torch.device(dev).type, dtype=setup.dtype, enabled=low):
            v = forward(xt, sigma, audio, audio, context)
        loss = (v.float() - target)[:, :, 1:].square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    with peak_memory(dev) as mem:
        times = time_call(step, repeats=repeats, warmup=warmup, device=dev)
    step_s = summarize(times, "s/step")
    flops = cost.teacher_step_flops(cfg, (h, w), frames, batch)
    params = sum(p.numel() for p in model.parameters())
    return {
        "setup": setup.describe() + f", {params / 1e6:.1f}M parameters, batch {batch} x {frames} latent frames, "
        f"{'autocast ' + str(setup.dtype).removeprefix('torch.') if low else 'fp32'}, AdamW"
        + (
            ", activation checkpointing per block (the FLOPs below count fwd + bwd, not the recomputed forward)"
            if checkpointing
            else ""
        ),
        "training step": step_s,
        "samples/s": batch / step_s["median"],
        "loss first / last": f"{losses[0]:.4f} / {losses[-1]:.4f}",
        "peak memory": _gib(mem["bytes"]) + f" ({mem['what']})",
    } | efficiency(flops, step_s["median"], dev, setup.dtype)


# ----------------------------------------------------------------------------------------------------- streaming
def stream(setup: Setup, chunks: int, audio_preset: str | None = None) -> dict[str, Any]:
    """``chunks`` chunks through a :class:`StreamingAvatar` (audio encoder, DiT, VAE decode on its own thread and,
    with ``vae_device``, its own device): per-module RTF and the first-frame delay. The speaking mask is given
    (alternating turns), so the voice-activity model is not part of the figures."""
    import numpy as np

    from dystream.models.audio import AudioEncoder
    from dystream.models.dit import AvatarDiT
    from dystream.models.vae import ReferenceGuidedVAE
    from dystream.streaming.avatar import StreamingAvatar

    cfg, vcfg, _ = setup.configs()
    dev, dtype = setup.device, setup.dtype
    audio_preset = audio_preset or ("tiny" if cfg.audio_dim == 32 else "wav2vec2-base-960h")
    torch.manual_seed(0)
    dit = build(lambda: AvatarDiT(cfg), dev, dtype)
    vae = build(lambda: ReferenceGuidedVAE(vcfg), setup.vae_device or dev, dtype)
    enc = build(lambda: AudioEncoder(audio_preset), dev, torch.float32)
    context = None
    if not cfg.learned_text_context:
        context = torch.zeros(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (setup.height, setup.width, 3), dtype=np.uint8)
    session = StreamingAvatar(
        dit, vae, enc, reference, size=(setup.height, setup.width), context=context, device=dev,
        vae_device=setup.vae_device, threaded=True, compile=setup.compile,
    )  # fmt: skip
    per_chunk = session.frames_per_chunk * 640
    total = (chunks * session.frames_per_chunk + session.lookahead + 1) * 640
    own = (rng.standard_normal(total) * 0.1).astype(np.float32)
    other = (rng.standard_normal(total) * 0.1).astype(np.float32)
    mask = ((np.arange(total) // (4 * per_chunk)) % 2 == 0).astype(np.float32)
    with peak_memory(dev) as mem:
        start = time.perf_counter()
        for lo in range(0, total, per_chunk):
            session.push(own[lo : lo + per_chunk], other[lo : lo + per_chunk], mask[lo : lo + per_chunk])
        session.flush()
        wall = time.perf_counter() - start
    stats = session.stats()
    return {
        "setup": setup.describe() + f", audio {audio_preset}, {chunks} chunks pushed chunk by chunk as fast as "
        "possible, decoder thread, mask given",
        "wall time / audio time": wall / (total / 16000),
        "rtf DiT": stats["rtf_dit"],
        "rtf VAE": stats["rtf_vae"],
        "rtf audio": stats["rtf_audio"],
        "first-frame delay (chunk audio complete -> first frame)": f"{stats['first_frame_delay_s']:.3f} s",
        "first-frame delay, DiT": f"{stats['ffd_dit_s']:.3f} s",
        "first-frame delay, VAE": f"{stats['ffd_vae_s']:.3f} s",
        "peak memory": _gib(mem["bytes"]) + f" ({mem['what']})",
    }
