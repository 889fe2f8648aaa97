"""Analytic cost model: FLOPs of the streaming student, the VAE decoder, the audio encoder and the teacher's training
step, and the time and real-time-factor bounds they imply on a given accelerator peak.

``dystream bench cost --preset wan2.2-ti2v-5b --vae ref-dc-f32t4c16 --size 928x704`` prints the table that
docs/benchmarks.md sets beside StreamAvatar's Table 5 (DiT RTF 0.69, VAE RTF 0.82 on two H800s at 928x704).

Counting rule: a matmul of ``[M, K] x [K, N]`` is ``2 M K N`` FLOPs, a convolution ``2 x output elements x
C_in x kernel volume``, attention ``4 x queries x keys x head width x heads`` (QK^T and AV), the same rule as
``torch.utils.flop_counter.FlopCounterMode``, which tests/test_bench_cost.py checks this model against. Norms,
activations, RoPE, modulation and softmax are left out (a few per cent of the work, memory-bound anyway), so the
time bound ``FLOPs / peak`` is a floor: no implementation can run faster on that peak, and a real one reaches
30-60 % of it for the large matmuls of the 5B DiT and less for the VAE's convolutions.

What one streaming chunk costs (StreamAvatar §3.1.1, §4.1): the student runs N forwards over C latent frames
(the last one also writes the chunk's K/V into the cache); each attends to the Reference Sink and the rolling
window plus the chunk itself (``sink + window + C`` key frames once the window is full), to the text context
(Wan2.2 zero-pads the prompt to ``text_len`` tokens and attends to the padding, and this implementation recomputes
the text embedding and its K/V on every forward) and, per latent frame, to the audio tokens of its own video frames
plus the look-ahead (talk and listen modules). A chunk is ``4 C`` video frames, i.e. ``4 C / 25`` s of media.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from dystream.models.audio import AudioEncoderConfig
from dystream.models.dit import DiTConfig
from dystream.models.vae import POS_DIM, VAEConfig

FPS = 25


@dataclass(frozen=True)
class Peak:
    """Dense (no structured sparsity) tensor-core throughput of one accelerator, from its vendor datasheet."""

    name: str
    bf16: float  # FLOP/s, dense
    source: str


# Datasheets quote bf16 "with sparsity"; the dense figure is half of it.
PEAKS: dict[str, Peak] = {
    "h100": Peak(
        "NVIDIA H100 SXM5", 989.4e12, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity"
    ),
    "h200": Peak("NVIDIA H200 SXM", 989.4e12, "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity"),
    "h800": Peak("NVIDIA H800 SXM5", 989.4e12, "NVIDIA H800 datasheet: BF16 1,979 TFLOPS with sparsity (H100 compute)"),
    "h100-pcie": Peak("NVIDIA H100 PCIe", 756.5e12, "NVIDIA H100 datasheet: BF16 1,513 TFLOPS with sparsity"),
    "a100": Peak("NVIDIA A100 SXM4", 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
}


def _linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(queries: float, keys: float, width: int) -> float:
    """QK^T and AV over all heads: ``width`` = heads x head_dim (value width equal to the key width)."""
    return 4.0 * queries * keys * width


def flop_counter(display: bool = False):
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU's fused attention kernels.

    torch registers formulas for the CUDA SDPA kernels only; on a CPU every attention call would count as zero,
    which under-states the achieved FLOP/s of the benchmarks and breaks the comparison with this model.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return FlopCounterMode(display=display, custom_mapping=mapping)


# ----------------------------------------------------------------------------------------------------------- DiT
def dit_forward_flops(
    cfg: DiTConfig, latent_hw: tuple[int, int], frames: int, key_frames: int, audio_frames: int | None = None
) -> dict[str, float]:
    """FLOPs of one AvatarDiT forward over ``frames`` latent frames whose queries see ``key_frames`` frames each.

    Streaming chunk: ``frames = C``, ``key_frames = cached + C``; bidirectional teacher: ``key_frames = frames``.
    ``audio_frames``: latent frames that get audio (default ``frames``; the teacher's reference frame gets none).
    Returns the parts (summed over layers) and ``"total"``.
    """
    _, ph, pw = cfg.patch_size
    h, w = latent_hw
    if h % ph or w % pw:
        raise ValueError(f"latent grid {h}x{w} is not divisible by the DiT patch {ph}x{pw}")
    s = (h // ph) * (w // pw)  # tokens per latent frame
    t = frames * s
    d, L = cfg.dim, cfg.num_layers
    audio_frames = frames if audio_frames is None else audio_frames
    parts: dict[str, float] = {}
    parts["patch embedding + head"] = _linear(t, cfg.in_channels * ph * pw, d) + _linear(
        t, d, ph * pw * cfg.out_channels
    )
    parts["time + text embedding"] = (
        frames * (_linear(1, cfg.freq_dim, d) + _linear(1, d, d) + _linear(1, d, 6 * d))
        + _linear(cfg.text_len, cfg.text_dim, d)
        + _linear(cfg.text_len, d, d)
    )
    parts["self-attention projections"] = L * 4 * _linear(t, d, d)
    parts["self-attention (sink + window + chunk)"] = L * _attention(t, key_frames * s, d)
    lt = cfg.text_len
    parts["text cross-attention"] = L * (2 * _linear(t, d, d) + 2 * _linear(lt, d, d) + _attention(t, lt, d))
    if cfg.audio_attention and audio_frames:
        a = cfg.audio_attn_dim or d
        ta = audio_frames * s
        keys = cfg.audio_window_frames * cfg.audio_tokens_per_frame  # per latent frame
        video_frames = cfg.chunk_audio_frames(audio_frames)
        tokenizer = _linear(video_frames, cfg.audio_dim, d) + _linear(video_frames, d, cfg.audio_tokens_per_frame * d)
        per_module = (
            _linear(ta, d, a) + 2 * _linear(audio_frames * keys, d, a) + _linear(ta, a, d) + _attention(ta, keys, a)
        )
        parts["audio attention (talk + listen)"] = 2 * (tokenizer + L * per_module)
    parts["FFN"] = L * 2 * _linear(t, d, cfg.ffn_dim)
    parts["total"] = sum(parts.values())
    return parts


def student_chunk_flops(cfg: DiTConfig, latent_hw: tuple[int, int], steps: int) -> dict[str, float]:
    """One streaming chunk once the window is full: ``steps`` forwards of C frames over ``sink + window + C`` keys."""
    layout = cfg.layout
    cached = layout.max_cached_frames
    if cached is None:
        raise ValueError("student_chunk_flops: an unlimited window (window_frames=None) has no steady-state cost")
    one = dit_forward_flops(cfg, latent_hw, cfg.chunk_frames, cached + cfg.chunk_frames)
    return {k: steps * v for k, v in one.items()}


def teacher_step_flops(cfg: DiTConfig, latent_hw: tuple[int, int], latent_frames: int, batch: int = 1) -> float:
    """Training FLOPs of the bidirectional teacher on ``batch`` clips of ``latent_frames`` (reference included):
    forward + backward ~ 3 x forward (the backward computes gradients of activations and of weights)."""
    fwd = dit_forward_flops(cfg, latent_hw, latent_frames, latent_frames, latent_frames - 1)["total"]
    return 3.0 * batch * fwd


# ----------------------------------------------------------------------------------------------------------- VAE
def vae_decode_flops(cfg: VAEConfig, height: int, width: int, references: int = 1) -> dict[str, float]:
    """FLOPs of ``decode_chunk`` for one latent frame in steady state (-> ``r_t`` video frames), with ``references``
    reference images at the video size (their feature maps are cached; their K/V projections are not)."""
    r_s = cfg.spatial_factor
    if height % r_s or width % r_s:
        raise ValueError(f"frame size {height}x{width} is not divisible by the VAE's spatial factor {r_s}")
    n, p, kt = cfg.num_levels, cfg.patch_size, cfg.temporal_kernel
    # frames and grid of every level for one latent frame: the top level has 1 frame, each up block multiplies
    frames = [1] * n
    for lvl in reversed(range(n - 1)):
        frames[lvl] = frames[lvl + 1] * (2 if cfg.temporal_down[lvl] else 1)
    grid = [(height // (p * 2**lvl)) * (width // (p * 2**lvl)) for lvl in range(n)]

    def conv(lvl: int, c_in: int, c_out: int, kernel: int) -> float:
        return 2.0 * frames[lvl] * grid[lvl] * c_out * c_in * kernel

    parts = {"convolutions": 0.0, "up blocks": 0.0, "reference attention": 0.0}
    if cfg.local_attn_levels:
        parts["local reference attention"] = 0.0
    parts["convolutions"] += conv(n - 1, cfg.latent_channels, cfg.widths[-1], kt * 9)
    for lvl in range(n):
        c = cfg.widths[lvl]
        parts["convolutions"] += cfg.decoder_blocks[lvl] * 2 * conv(lvl, c, c, kt * 9)
        if lvl in cfg.attn_levels:
            q = frames[lvl] * grid[lvl]
            refs = references * grid[lvl]
            heads = c // cfg.head_dim
            # key width head_dim + POS_DIM; values are zero-padded to it as well (one fused SDPA kernel)
            parts["reference attention"] += (
                2 * _linear(q, c, c)
                + 2 * _linear(refs, c, c)
                + _attention(q, refs + 1, heads * (cfg.head_dim + POS_DIM))
            )
        if lvl in cfg.local_attn_levels:
            q = frames[lvl] * grid[lvl]
            # q and out projections per frame; K/V (one 1x1 conv, 2c wide) of every reference cell; each query
            # against its K x window^2 keys
            parts["local reference attention"] += (
                2 * _linear(q, c, c)
                + _linear(references * grid[lvl], c, 2 * c)
                + _attention(q, references * cfg.local_window**2 + 1, c)
            )
        if lvl < n - 1:
            r_t = 2 if cfg.temporal_down[lvl] else 1
            parts["up blocks"] += conv(lvl + 1, cfg.widths[lvl + 1], c * r_t * 4, 9)
    parts["convolutions"] += conv(0, cfg.widths[0], cfg.in_channels * p * p, kt * 9)
    if cfg.reference_copy:  # queries, reference keys, logits over K window^2 cells, the pixel copy, the gate
        q, c, px, cells = frames[0] * grid[0], cfg.widths[0], cfg.in_channels * p * p, references * cfg.local_window**2
        parts["reference copy head"] = (
            _linear(q, c, c)
            + _linear(references * grid[0], c, c)
            + 2.0 * q * cells * (c + px)
            + _linear(q, c + (3 if cfg.copy_gate_motion else 2) * px, px)
            + (_linear(q, 2 * px, px) if cfg.copy_gate_motion else 0.0)
        )
        if cfg.copy_warp:  # the flow head, then a bilinear warp of every reference per frame (4 taps, 3 channels)
            parts["reference copy head"] += _linear(q, c, 2) + 8.0 * references * q * px
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------------------- audio
def audio_window_flops(cfg: AudioEncoderConfig, video_frames: int) -> float:
    """FLOPs of ``AudioEncoder.encode_window`` over ``video_frames`` frames (one waveform; 2 features per frame)."""
    pad_l, pad_r = cfg.pad
    length = video_frames * cfg.samples_per_frame + pad_l + pad_r
    total, c_in = 0.0, 1
    for c_out, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, strict=True):
        length = (length - k) // s + 1
        total += 2.0 * length * c_out * c_in * k
        c_in = c_out
    h, f = cfg.hidden_size, cfg.intermediate_size
    total += _linear(length, c_in, h)  # feature projection
    total += 2.0 * (length + 1) * h * (h // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
    total += cfg.num_hidden_layers * (
        4 * _linear(length, h, h) + _attention(length, length, h) + 2 * _linear(length, h, f)
    )
    return total


# --------------------------------------------------------------------------------------------------------- table
@dataclass
class CostSetup:
    """One model combination at one video size (the options of ``dystream bench cost``)."""

    preset: str = "wan2.2-ti2v-5b"
    vae: str = "ref-dc-f32t4c16"
    audio: str = "wav2vec2-base-960h"
    height: int = 928
    width: int = 704
    steps: int = 3  # student denoising steps N (StreamAvatar §4.1)
    patch: int | None = None  # DiT spatial patch override (None: the preset's)
    train_frames: int = 81  # video frames of a teacher training clip (Wan2.2: 1 + 4k)
    audio_context_frames: int = 50  # past video frames each streaming Wav2Vec2 window sees (StreamingConfig)
    peak: str = "h800"

    def __post_init__(self) -> None:
        if self.peak not in PEAKS:
            raise ValueError(f"CostSetup.peak must be one of {sorted(PEAKS)}, got {self.peak!r}")
        for name in ("height", "width", "steps", "train_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"CostSetup.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch is not None and self.patch < 1:
            raise ValueError(f"CostSetup.patch must be >= 1, got {self.patch}")

    def configs(self) -> tuple[DiTConfig, VAEConfig, AudioEncoderConfig]:
        """The three configs; the DiT takes the VAE's latent channels (and the patch override)."""
        dit, vae = paired_configs(self.preset, self.vae, self.patch)
        return dit, vae, AudioEncoderConfig.from_name(self.audio)


def paired_configs(preset: str, vae: str, patch: int | None = None) -> tuple[DiTConfig, VAEConfig]:
    """A DiT preset on a VAE preset: the DiT takes the VAE's latent channels (a preset's own channel count belongs
    to the VAE it was made for, e.g. Wan2.2's 48) and, when given, a spatial ``patch`` instead of its own."""
    vae_cfg = VAEConfig.from_preset(vae)
    overrides: dict[str, Any] = {"in_channels": vae_cfg.latent_channels, "out_channels": vae_cfg.latent_channels}
    if patch is not None:
        overrides["patch_size"] = (1, patch, patch)
    return DiTConfig.from_preset(preset, **overrides), vae_cfg


def latent_grid(dit: DiTConfig, vae: VAEConfig, height: int, width: int) -> tuple[int, int]:
    """Latent grid of a ``height x width`` video, checked against the VAE factor and the DiT patch."""
    r_s = vae.spatial_factor
    if height % r_s or width % r_s:
        raise ValueError(f"--size {height}x{width}: both sides must be multiples of the VAE's spatial factor {r_s}")
    h, w = height // r_s, width // r_s
    _, ph, pw = dit.patch_size
    if h % ph or w % pw:
        raise ValueError(
            f"--size {height}x{width} gives {h}x{w} latents, not divisible by the DiT patch {ph}x{pw}; pass --patch 1 "
            "(or a size whose latent grid the patch divides)"
        )
    return h, w


def cost_table(setup: CostSetup) -> dict[str, Any]:
    """Every figure of ``dystream bench cost`` as a dict (FLOPs, bounds on ``setup.peak``, RTF bounds)."""
    dit, vae, audio = setup.configs()
    r_s = vae.spatial_factor
    latent_hw = latent_grid(dit, vae, setup.height, setup.width)
    _, ph, pw = dit.patch_size
    peak = PEAKS[setup.peak]
    c = dit.chunk_frames
    chunk_s = dit.frames_per_latent * c / FPS
    chunk = student_chunk_flops(dit, latent_hw, setup.steps)
    dec = vae_decode_flops(vae, setup.height, setup.width)
    frames_per_latent = vae.temporal_factor
    window = audio_window_flops(audio, setup.audio_context_frames + dit.frames_per_latent * c)
    latent_frames = 1 + (setup.train_frames - 1) // frames_per_latent
    teacher = teacher_step_flops(dit, latent_hw, latent_frames)
    tokens = (latent_hw[0] // ph) * (latent_hw[1] // pw)
    params = _dit_params(dit)
    out: dict[str, Any] = {
        "setup": (
            f"DiT {setup.preset} ({params / 1e9:.2f}B parameters, {dit.in_channels} latent channels, patch {ph}x{pw}),"
            f" VAE {setup.vae} (f{r_s} t{frames_per_latent} c{vae.latent_channels}), audio {setup.audio}; "
            f"{setup.height}x{setup.width} -> {latent_hw[0]}x{latent_hw[1]} latents, {tokens} tokens per latent "
            f"frame; N={setup.steps} steps, C={c} latent frames = {dit.frames_per_latent * c} video frames = "
            f"{chunk_s:.2f} s per chunk; sink {dit.layout.sink_frames} + window {dit.window_frames} + chunk {c} "
            f"key frames; peak {peak.name} bf16 dense {peak.bf16 / 1e12:.0f} TFLOP/s ({peak.source})"
        ),
        "dit_chunk_parts": {k: v for k, v in chunk.items() if k != "total"},
        "dit_chunk_flops": chunk["total"],
        "dit_chunk_time_bound_s": chunk["total"] / peak.bf16,
        "dit_rtf_bound": chunk["total"] / peak.bf16 / chunk_s,
        "vae_decode_flops_per_frame": dec["total"] / frames_per_latent,
        "vae_decode_parts_per_latent_frame": {k: v for k, v in dec.items() if k != "total"},
        "vae_time_bound_per_chunk_s": c * dec["total"] / peak.bf16,
        "vae_rtf_bound": dec["total"] / peak.bf16 / (frames_per_latent / FPS),
        "audio_flops_per_second_offline": audio_window_flops(audio, FPS) * 2,  # both speakers
        "audio_flops_per_second_streaming": 2 * window / chunk_s,
        "audio_rtf_bound_streaming": 2 * window / peak.bf16 / chunk_s,
        "teacher_clip": f"{setup.train_frames} video frames = {latent_frames} latent frames, batch 1",
        "teacher_step_flops": teacher,
        "teacher_step_time_bound_s": teacher / peak.bf16,
        "peak": peak,
        "chunk_seconds": chunk_s,
    }
    return out


def _dit_params(cfg: DiTConfig) -> int:
    import torch

    from dystream.models.dit import AvatarDiT

    with torch.device("meta"):
        model = AvatarDiT(cfg)
    return sum(p.numel() for p in model.parameters())


def render(table: dict[str, Any]) -> str:
    """Markdown of :func:`cost_table`."""

    def flops(v: float) -> str:
        return f"{v / 1e12:.3g} TFLOP" if v >= 1e11 else f"{v / 1e9:.3g} GFLOP"

    peak = table["peak"]
    lines = [table["setup"], "", "| quantity | FLOPs | time bound at peak | RTF bound |", "|---|---|---|---|"]
    lines.append(
        f"| DiT: one chunk ({table['chunk_seconds']:.2f} s of video) | {flops(table['dit_chunk_flops'])} | "
        f"{1000 * table['dit_chunk_time_bound_s']:.1f} ms | {table['dit_rtf_bound']:.3f} |"
    )
    for name, v in table["dit_chunk_parts"].items():
        lines.append(f"| &nbsp;&nbsp;{name} | {flops(v)} | {1000 * v / peak.bf16:.1f} ms | |")
    lines.append(
        f"| VAE decode: one video frame | {flops(table['vae_decode_flops_per_frame'])} | "
        f"{1000 * table['vae_decode_flops_per_frame'] / peak.bf16:.2f} ms | {table['vae_rtf_bound']:.3f} |"
    )
    lines.append(
        f"| VAE decode: one chunk | {flops(table['vae_decode_flops_per_frame'] * table['chunk_seconds'] * FPS)} | "
        f"{1000 * table['vae_time_bound_per_chunk_s']:.1f} ms | |"
    )
    for name, v in table["vae_decode_parts_per_latent_frame"].items():
        lines.append(f"| &nbsp;&nbsp;{name} (per latent frame) | {flops(v)} | {1000 * v / peak.bf16:.2f} ms | |")
    lines.append(
        f"| audio encoder: 1 s, both voices, offline | {flops(table['audio_flops_per_second_offline'])} | "
        f"{1000 * table['audio_flops_per_second_offline'] / peak.bf16:.2f} ms | |"
    )
    streaming = table["audio_flops_per_second_streaming"]
    lines.append(
        f"| audio encoder: 1 s, both voices, streaming windows | {flops(streaming)} | "
        f"{1000 * streaming / peak.bf16:.2f} ms | {table['audio_rtf_bound_streaming']:.4f} |"
    )
    lines.append(
        f"| teacher training step ({table['teacher_clip']}, fwd + bwd = 3x fwd) | "
        f"{flops(table['teacher_step_flops'])} | {table['teacher_step_time_bound_s']:.2f} s | |"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options only ``dystream bench cost`` takes (``--preset``, ``--size``, ``--vae``, ``--patch`` are shared)."""
    defaults = CostSetup()
    parser.add_argument("--audio", default=defaults.audio, help="cost: audio encoder preset")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="cost: student denoising steps N")
    parser.add_argument(
        "--train-frames", type=int, default=defaults.train_frames, help="cost: video frames of a teacher training clip"
    )
    parser.add_argument("--peak", default=defaults.peak, choices=sorted(PEAKS), help="cost: accelerator of the bounds")


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` -> ``(H, W)``; one number means a square."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"--size must be HxW (e.g. 928x704) or one number, got {text!r}")
    return parts[0], parts[1]


def main(args: argparse.Namespace) -> int:
    defaults = CostSetup()
    height, width = parse_size(args.size) if args.size else (defaults.height, defaults.width)
    setup = CostSetup(
        preset=args.preset or defaults.preset,
        vae=args.vae or defaults.vae,
        audio=args.audio,
        height=height,
        width=width,
        steps=args.steps,
        patch=args.patch,
        train_frames=args.train_frames,
        peak=args.peak,
    )
    print(render(cost_table(setup)))
    return 0


__all__ = [
    "PEAKS",
    "CostSetup",
    "audio_window_flops",
    "cost_table",
    "dit_forward_flops",
    "flop_counter",
    "latent_grid",
    "paired_configs",
    "student_chunk_flops",
    "teacher_step_flops",
    "vae_decode_flops",
]
