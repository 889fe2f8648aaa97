"""StreamingAvatar: live audio in, avatar video frames out, chunk by chunk (StreamAvatar §3.1, §4.1, §7).

One session streams one avatar (one reference image) for one conversation::

    session = StreamingAvatar(generator, vae, audio_encoder, reference_uint8_hw3)
    for packet_self, packet_other in source:          # any number of 16 kHz samples per call
        frames = session.push(packet_self, packet_other)   # list of uint8 [H, W, 3], possibly empty
    frames = session.flush()                           # the rest; the stream is over
    print(session.stats())                             # RTF per module, first-frame delay, ...

Pipeline (one chunk = C latent frames = 4C video frames = 0.48 s at the paper's C = 3):

1. **Audio buffering.** Samples of both tracks are buffered; the avatar's video frame ``t`` owns samples
   ``640 t .. 640 (t + 1) - 1``. Features are computed in fixed *blocks* of video frames (block 0 is frames
   ``[0, 4C + L)``, block ``j >= 1`` is ``[4Cj + L, 4C(j + 1) + L)``, where ``L`` is the DiT's audio look-ahead),
   so that every block ends exactly where DiT chunk ``j`` stops hearing. Block ``j`` is computed as soon as the
   audio it needs has arrived, and not before:

   * Wav2Vec2 features (:meth:`AudioEncoder.encode_window`) of both tracks in one batch, from a window with
     ``audio_context_frames`` of past audio and ``audio_lookahead_frames`` of future audio (+ the 40-sample
     alignment pad);
   * the speaking mask: given by the caller with every ``push`` (per sample, or one value per packet) or computed
     by a mask function (default: silero-vad through :func:`dystream.datamodules.pack.vad_mask`, the function
     that makes the training masks) on the avatar's *own* track over the window ``[block start -
     vad_context_frames, block end + vad_lookahead_frames)``; a frame's mask is that of the block it belongs to.

   **Why packet sizes do not matter**: a block's windows are fixed by the block index (never by where packets
   happened to end), the block waits until its whole window has arrived, and only at ``flush`` are windows
   clipped to the end of the audio, which is the same for every way of cutting the audio into packets. So the
   mask of frame ``t`` depends on audio up to ``block end + vad_lookahead_frames`` video frames only (at most
   ``4C + L + vad_lookahead_frames`` frames past ``t``), features likewise, and frames are bit-identical for any
   packetisation (tested).

2. **Routing** (§3.2): talk = own features x mask, listen = partner features x (1 - mask)
   (:func:`route_audio_features`); a missing partner track is silence, as in the training data.

3. **DiT** (§3.1.1): the reference latent was pushed first as a 1-frame chunk at sigma 0. Each chunk is denoised
   in N steps (``student_sigmas(3, 5)`` unless the export says otherwise) through the KV cache with the Reference
   Sink and RAPR; the last step writes its *noisy input*'s K/V into the cache (the paper's cache write, no extra
   forward). Noise comes from a seeded ``torch.Generator`` on the CPU, drawn exactly as
   :func:`dystream.diffusion.rollout.student_rollout` draws it, so the session's latents equal
   ``student_rollout(..., cache_write="noisy")`` on the same features and seed (tested).

4. **VAE** (paper 002): streaming decode with the VAE's feature cache, one latent frame (4 video frames) per
   call, on its own thread (and optionally its own device, as the paper runs DiT and VAE on two GPUs), fed by
   a bounded queue; ``push`` returns the frames the decoder has finished, ``flush`` joins it.

Frame count: ``flush`` returns the last frames so that the whole stream has exactly ``ceil(samples / 640)``
frames (the audio's duration at 25 fps rounded up to whole frames); the last partial chunk is generated with
silence (zero features: "no audio") past the end and cut.

Latency: a chunk can start once its audio *and* its look-ahead arrived, ``4C + L + max(audio_lookahead_frames,
vad_lookahead_frames)`` frames plus 40 samples after its first sample (0.56 s at paper defaults); the first frame
then comes out after the first-frame delay (DiT + VAE time). :meth:`stats` reports real-time factors and
first-frame delays per module, as StreamAvatar's Table 5.

Memory is constant over a stream: the KV cache holds at most sink + window frames, audio buffers keep only what
the next windows read, and frames are handed to the caller. ``record=True`` (tests, debugging) keeps every latent
and feature and so grows.
"""

from __future__ import annotations

import collections
import contextlib
import math
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dystream.diffusion.rollout import chunk_noises, renoise
from dystream.diffusion.schedule import student_sigmas
from dystream.models.audio import AudioEncoder, route_audio_features
from dystream.models.dit import AvatarDiT, frames_window
from dystream.models.vae import ReferenceGuidedVAE

__all__ = ["StreamingAvatar", "StreamingConfig", "MaskFn", "prepare_reference", "silero_mask"]

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640

MaskFn = Callable[[np.ndarray, int], np.ndarray]
"""``mask_fn(audio_self float32 [n_samples], n_frames) -> [n_frames]`` speaking mask in [0, 1] (1 = speaking)."""

_VAD_LOCK = threading.Lock()


def silero_mask(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """The default mask function: silero-vad via :func:`dystream.datamodules.pack.vad_mask` (thread-safe).

    The bundled silero model is stateful and shared by the process, hence the lock.
    """
    _import_silero()
    from dystream.datamodules.pack import vad_mask

    with _VAD_LOCK, warnings.catch_warnings():
        # the first call loads silero's TorchScript model, which warns about torch.jit.load and importlib paths
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return vad_mask(audio, n_frames)


def _import_silero() -> None:
    """Import silero_vad without its side effect: its model module calls ``torch.set_num_threads(1)`` on import,
    which would change the thread count (and so the exact float results) of everything after the first mask."""
    threads = torch.get_num_threads()
    import silero_vad  # noqa: F401

    torch.set_num_threads(threads)


@dataclass
class StreamingConfig:
    """Options of a :class:`StreamingAvatar` session; ``dystream generate`` / ``stream`` take their help from here."""

    seed: int = field(default=0, metadata={"help": "seed of the generation noise (same seed, same video)"})
    steps: int = field(
        default=3, metadata={"help": "student denoising steps N (used when the checkpoint does not list its sigmas)"}
    )
    shift: float = field(
        default=5.0,
        metadata={"help": "timestep shift of the student's sigmas (when the checkpoint does not list them)"},
    )
    sigmas: tuple[float, ...] | None = field(
        default=None,
        metadata={"help": "explicit student sigmas, decreasing in (0, 1]; default: the export's, else shift/steps"},
    )
    renoise: Literal["fresh", "ode"] = field(
        default="fresh", metadata={"help": "re-noising between steps: fresh noise (as trained) or the ODE direction"}
    )
    size: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "output height and width; the reference is centre-cropped and resized to it "
            "(default: the export's recorded size, else the reference's own size cropped to a valid multiple)"
        },
    )
    audio_context_frames: int = field(
        default=50, metadata={"help": "past audio (video frames) each Wav2Vec2 window sees (50 = 2 s)"}
    )
    audio_lookahead_frames: int = field(
        default=0,
        metadata={"help": "future audio (video frames) past a block each Wav2Vec2 window sees (adds latency)"},
    )
    vad_context_frames: int = field(
        default=25, metadata={"help": "past audio (video frames) each voice-activity window sees"}
    )
    vad_lookahead_frames: int = field(
        default=0, metadata={"help": "future audio (video frames) past a block each voice-activity window sees"}
    )
    decode_latents_per_call: int = field(
        default=1, metadata={"help": "latent frames per VAE decode call (1 = 4 video frames: lowest latency)"}
    )
    threaded: bool = field(default=True, metadata={"help": "decode on a separate thread, overlapping the DiT"})
    max_pending_chunks: int = field(
        default=4, metadata={"help": "chunks that may wait for the decoder before push blocks (back-pressure)"}
    )
    record: bool = field(default=False, metadata={"help": "keep all latents and features (tests; memory grows)"})
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the DiT chunk step (on CUDA with CUDA graphs, mode reduce-overhead: every chunk "
            "after the window fills has the same shapes); the first chunks pay the compilation"
        },
    )

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"StreamingConfig.steps must be >= 1, got {self.steps}")
        if not self.shift > 0:
            raise ValueError(f"StreamingConfig.shift must be > 0, got {self.shift}")
        if self.sigmas is not None:
            self.sigmas = tuple(float(s) for s in self.sigmas)
            s = self.sigmas
            if not s or any(not 0 < x <= 1 for x in s) or any(a <= b for a, b in zip(s, s[1:], strict=False)):
                raise ValueError(f"StreamingConfig.sigmas must be decreasing values in (0, 1], got {list(s)}")
        if self.renoise not in ("fresh", "ode"):
            raise ValueError(f"StreamingConfig.renoise must be 'fresh' or 'ode', got {self.renoise!r}")
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(v) for v in self.size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"StreamingConfig.size must be an int or (height, width), got {self.size}")
            self.size = size  # type: ignore[assignment]
        for name in ("audio_context_frames", "audio_lookahead_frames", "vad_context_frames", "vad_lookahead_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"StreamingConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("decode_latents_per_call", "max_pending_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"StreamingConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def help(cls, name: str) -> str:
        """The documented meaning of a field (for CLI help)."""
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def prepare_reference(image: Any, size: tuple[int, int] | None, multiple: int = 1) -> Tensor:
    """Reference image -> float ``[1, 3, H, W]`` in [-1, 1], centre-cropped to the aspect of ``size`` and resized.

    ``image``: uint8 ``[H, W, 3]`` (numpy or tensor), float ``[3, H, W]`` in [-1, 1] (numpy or tensor), or the
    path of an image or video file (its first frame). ``size=None`` keeps the image's size, centre-cropped down
    to a multiple of ``multiple``.
    """
    if isinstance(image, (str, Path)):
        from dystream.streaming.samples import read_image

        image = read_image(image)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, Tensor):
        raise TypeError(f"reference must be a uint8 HxWx3 array, a float 3xHxW tensor or a path, got {type(image)}")
    if image.dtype == torch.uint8:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"reference: a uint8 image must be [H, W, 3], got {tuple(image.shape)}")
        x = image.permute(2, 0, 1).float() / 127.5 - 1.0
    elif image.is_floating_point():
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"reference: a float image must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
        x = image.float()
    else:
        raise ValueError(f"reference: dtype {image.dtype} not supported (uint8 HxWx3 or float 3xHxW in [-1, 1])")
    h, w = x.shape[1:]
    if size is None:
        th, tw = h - h % multiple, w - w % multiple
        if th < multiple or tw < multiple:
            raise ValueError(f"reference: image {h}x{w} is smaller than the model's size multiple {multiple}")
    else:
        th, tw = size
        if th % multiple or tw % multiple:
            raise ValueError(f"size {th}x{tw} must be a multiple of {multiple} (VAE spatial factor x DiT patch)")
    # centre crop to the target aspect ratio, then resize (antialiased when shrinking)
    if h * tw > w * th:  # too tall
        ch, cw = max(1, round(w * th / tw)), w
    else:
        ch, cw = h, max(1, round(h * tw / th))
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[:, top : top + ch, left : left + cw][None]
    if (ch, cw) != (th, tw):
        x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1.0, 1.0)


def _as_samples(audio: Any, name: str) -> np.ndarray:
    """float32 / int16 numpy or tensor, ``[n]`` or ``[1, n]`` -> float32 ``[n]``."""
    if isinstance(audio, Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim == 2 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.ndim != 1:
        raise ValueError(f"push: {name} must be mono samples [n] (or [1, n]) at 16 kHz, got shape {audio.shape}")
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"push: {name} must be float32 in [-1, 1] or int16 samples, got {audio.dtype}")
    return audio.astype(np.float32, copy=False)


def _float_mask(mask: Any, n: int) -> np.ndarray:
    """A per-sample mask for a packet of ``n`` samples: a scalar (the whole packet) or ``[n]`` values in [0, 1]."""
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim == 0:
        m = np.full(n, float(m), dtype=np.float32)
    if m.shape != (n,):
        raise ValueError(f"push: mask must be a scalar or one value per sample ({n}), got shape {m.shape}")
    if ((m < 0) | (m > 1)).any():
        raise ValueError("push: mask values must lie in [0, 1] (1 = the avatar speaks, 0 = it listens)")
    return m


# --------------------------------------------------------------------------------------------------------------
# Decoder thread
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _ChunkTiming:
    index: int
    ready: float  # when the chunk's audio (with look-ahead) had arrived: the start of the push that completed it
    audio_s: float = 0.0
    dit_s: float = 0.0
    vae_s: float = 0.0
    handed_over: float = 0.0  # latents queued for the decoder
    first_frame: float | None = None
    last_frame: float | None = None


class _Decoder:
    """Streaming VAE decode of latents, inline or on a thread; finished frames collect in ``ready``."""

    def __init__(self, vae: ReferenceGuidedVAE, cache, device: torch.device, per_call: int, threaded: bool, depth: int):
        self.vae, self.cache, self.device, self.per_call = vae, cache, device, per_call
        self.dtype = next(vae.parameters()).dtype
        self.ready: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self.latent_frames = 0
        self.thread: threading.Thread | None = None
        if threaded:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.threads = torch.get_num_threads()
            self.thread = threading.Thread(target=self._loop, name="StreamingAvatar-VAE", daemon=True)
            self.thread.start()

    def submit(self, latents: Tensor, skip: int, timing: _ChunkTiming | None) -> None:
        """Decode ``latents [1, z, n, h, w]``, dropping the first ``skip`` frames (the reference's own frame)."""
        self.check()
        if self.thread is None:
            self._decode(latents, skip, timing)
            return
        while True:  # bounded queue: back-pressure on the DiT when the decoder lags; never hang on a dead thread
            try:
                self.queue.put((latents, skip, timing), timeout=0.1)
                return
            except queue.Full:
                self.check()
                if not self.thread.is_alive():
                    raise RuntimeError("StreamingAvatar: the VAE decoder thread stopped") from None

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"StreamingAvatar: VAE decoding failed: {self.error!r}") from self.error

    def take(self) -> list[np.ndarray]:
        with self.lock:
            out, self.ready = self.ready, []
        return out

    def stop(self) -> None:
        """Ask the thread to end without waiting (a session dropped without flush or close)."""
        if self.thread is not None:
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)

    def close(self) -> None:
        """Finish every queued chunk and stop the thread."""
        if self.thread is not None and self.thread.is_alive():
            while True:
                try:
                    self.queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if self.error is not None or not self.thread.is_alive():
                        break
            self.thread.join()
        self.check()

    def _loop(self) -> None:
        # OpenMP settings are per thread: without this a new thread uses every core, splits reductions
        # differently and decodes (slightly) different pixels than the same decode on the caller's thread
        torch.set_num_threads(self.threads)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        if item[0].device == self.device:  # the DiT's stream must not reuse it while we read it
                            item[0].record_stream(stream)
                        self._decode(*item)
                else:
                    self._decode(*item)
            except BaseException as exc:  # surfaced to the caller by check()
                self.error = exc
                return

    def _decode(self, latents: Tensor, skip: int, timing: _ChunkTiming | None) -> None:
        start = time.perf_counter()
        with torch.inference_mode():
            z = latents.to(self.device, self.dtype)
            for i in range(0, z.shape[2], self.per_call):
                video = self.vae.decode_chunk(z[:, :, i : i + self.per_call], self.cache)  # [1, 3, n, H, W]
                frames = ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
                frames = list(frames.cpu().numpy()[skip:])
                skip = max(0, skip - video.shape[2])
                now = time.perf_counter()
                if timing is not None and frames:
                    timing.first_frame = timing.first_frame or now
                    timing.last_frame = now
                with self.lock:
                    self.ready.extend(frames)
        if timing is not None:  # the reference's priming decode is setup, not streaming work
            timing.vae_s = time.perf_counter() - start
            self.busy_s += timing.vae_s
            self.latent_frames += latents.shape[2]


# --------------------------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------------------------


class StreamingAvatar:
    """A live avatar stream: 16 kHz audio packets in, uint8 video frames out (see the module docstring).

    Args:
        generator: the block-causal student :class:`AvatarDiT` (any DiT streams; a student export is meant).
        vae: the :class:`ReferenceGuidedVAE` the generator was trained on.
        audio_encoder: the :class:`AudioEncoder` the generator was trained with (16 kHz, 25 fps).
        reference: the avatar's image: uint8 ``[H, W, 3]``, float ``[3, H, W]`` in [-1, 1], or a file path.
        config: a :class:`StreamingConfig`; keyword ``overrides`` replace its fields.
        context: text context for generators without a learned or fixed prompt (see ``AvatarDiT.forward``).
        mask_fn: speaking-mask function used when ``push`` gets no ``mask`` (default :func:`silero_mask`).
        device: device of the DiT and the audio encoder (default: where the generator is); models are moved.
        vae_device: device of the VAE decoder (default: ``device``); a second GPU overlaps DiT and VAE.
    """

    def __init__(
        self,
        generator: AvatarDiT,
        vae: ReferenceGuidedVAE,
        audio_encoder: AudioEncoder,
        reference: Any,
        config: StreamingConfig | None = None,
        *,
        context: Tensor | None = None,
        mask_fn: MaskFn | None = None,
        device: str | torch.device | None = None,
        vae_device: str | torch.device | None = None,
        **overrides: Any,
    ) -> None:
        cfg = config or StreamingConfig()
        if overrides:
            known = {f.name for f in fields(StreamingConfig)}
            bad = sorted(set(overrides) - known)
            if bad:
                raise TypeError(f"StreamingAvatar: unknown option(s) {bad}; StreamingConfig fields are {sorted(known)}")
            cfg = StreamingConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, **overrides})
        self.config = cfg
        dcfg = generator.config
        self._check_compatible(generator, vae, audio_encoder)
        self.device = torch.device(device) if device is not None else next(generator.parameters()).device
        self.vae_device = torch.device(vae_device) if vae_device is not None else self.device
        self.generator = generator.to(self.device).eval()
        self.audio_encoder = audio_encoder.to(self.device).eval()
        self.vae = vae.to(self.vae_device).eval()
        self.context = context
        if mask_fn is None:
            _import_silero()  # before any thread count is captured (see _import_silero)
        self.mask_fn = mask_fn or silero_mask

        # layout numbers
        self.chunk_frames = dcfg.chunk_frames  # C latent frames
        self.frames_per_chunk = dcfg.frames_per_latent * dcfg.chunk_frames  # 4C video frames
        self.lookahead = dcfg.audio_lookahead_frames  # L
        self.lookbehind = dcfg.audio_lookbehind_frames  # past frames a chunk's latent frames also hear
        self.sigmas = self._sigmas(generator, cfg)  # [N] float64

        # reference -> latent frame 0, prefilled into the KV cache; decoder cache primed with it
        multiple = vae.config.spatial_factor * max(dcfg.patch_size[1], dcfg.patch_size[2])
        size = cfg.size or _recorded_size(generator, vae)
        vae_dtype = next(vae.parameters()).dtype
        start = time.perf_counter()
        self.reference = prepare_reference(reference, size, multiple).to(self.vae_device, vae_dtype)
        self.height, self.width = self.reference.shape[-2:]
        with torch.inference_mode():
            z_ref = self.vae.encode(self.reference[:, :, None], references=self.reference[:, None])  # [1, z, 1, h, w]
            self.z_ref = z_ref.float().to(self.device)
            self.cache = self.generator.new_kv_cache(1, device=self.device)
            zero = torch.zeros(1, 1, device=self.device)
            self.generator.forward_chunk(self.z_ref, zero, None, None, self.cache, context, write_cache=True)
            decode_cache = self.vae.new_decode_cache(self.reference[:, None])
        self._decoder = _Decoder(
            self.vae, decode_cache, self.vae_device, cfg.decode_latents_per_call, cfg.threaded, cfg.max_pending_chunks
        )
        self._decoder.submit(self.z_ref, skip=1, timing=None)  # primes the causal decoder; its 1 frame is dropped
        weakref.finalize(self, self._decoder.stop)  # a session dropped without flush/close ends its thread
        self._setup_s = time.perf_counter() - start
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self._forward_chunk = self.generator.forward_chunk
        if cfg.compile:
            # CUDA graphs replay the fixed-shape steady-state step without launch overhead; on a CPU the inductor
            # backend fuses the elementwise work around the matmuls
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._forward_chunk = torch.compile(self.generator.forward_chunk, mode=mode, dynamic=False)

        # audio state: buffers hold samples [buf_start, total) of both tracks (and of the mask, when given)
        self._self = np.zeros(0, np.float32)
        self._other = np.zeros(0, np.float32)
        self._mask: np.ndarray | None = None
        self._mask_given: bool | None = None  # decided by the first push
        self._buf_start = 0
        self._total = 0
        self._end_frames: int | None = None  # ceil(total / 640), known at flush
        # features: routed talk / listen [1, n, D] of frames [feat_start, feat_start + n)
        self._block = 0
        self._feat_start = 0
        self._talk = torch.zeros(1, 0, dcfg.audio_dim, device=self.device)
        self._listen = torch.zeros(1, 0, dcfg.audio_dim, device=self.device)
        self._chunk = 0
        self._returned = 0
        self._closed = False
        # statistics
        self._timings: collections.deque[_ChunkTiming] = collections.deque(maxlen=4096)
        self._first: _ChunkTiming | None = None
        self._audio_busy_s = 0.0
        self._pending_audio_s = 0.0  # audio time of blocks not yet charged to a chunk
        self._audio_frames = 0
        self._dit_busy_s = 0.0
        self._recorded: dict[str, list[Tensor]] = {"latents": [self.z_ref.cpu()], "talk": [], "listen": [], "mask": []}

    # ------------------------------------------------------------------------------------------------- public
    def push(self, audio_self: Any, audio_other: Any = None, mask: Any = None) -> list[np.ndarray]:
        """Add 16 kHz samples (float32 in [-1, 1] or int16, numpy or tensor, any count) of the avatar's own voice
        and, optionally, of its partner (same count; None = silence). ``mask`` (optional, then with every push):
        the speaking mask of these samples, a scalar or one value per sample in [0, 1]; without it the mask
        function decides. Returns the video frames finished since the last call (uint8 ``[H, W, 3]``)."""
        if self._closed:
            raise RuntimeError("StreamingAvatar.push: the stream was flushed; start a new session")
        called = time.perf_counter()
        own = _as_samples(audio_self, "audio_self")
        other = np.zeros_like(own) if audio_other is None else _as_samples(audio_other, "audio_other")
        if other.shape != own.shape:
            raise ValueError(
                f"push: audio_other has {other.shape[0]} samples, audio_self {own.shape[0]}; push the same span "
                "of both tracks (pad the partner with silence)"
            )
        given = mask is not None
        if self._mask_given is None:
            self._mask_given = given
        elif given != self._mask_given:
            raise ValueError(
                "push: give a mask with every push or with none (the first push "
                f"{'had' if self._mask_given else 'had no'} mask)"
            )
        self._self = np.concatenate([self._self, own])
        self._other = np.concatenate([self._other, other])
        if given:
            m = _float_mask(mask, own.shape[0])
            self._mask = m if self._mask is None else np.concatenate([self._mask, m])
        self._total += own.shape[0]
        self._advance(called)
        return self._take()

    def flush(self) -> list[np.ndarray]:
        """End the stream: the last partial chunk is completed with silence, every remaining frame is decoded and
        returned, so that the stream has exactly ``ceil(samples / 640)`` frames in all. Joins the decoder."""
        if self._closed:
            raise RuntimeError("StreamingAvatar.flush: the stream was already flushed")
        called = time.perf_counter()
        spf = SAMPLES_PER_FRAME
        self._end_frames = math.ceil(self._total / spf)
        pad = self._end_frames * spf - self._total
        if pad:  # complete the last video frame with silence (the mask keeps its last value)
            self._self = np.pad(self._self, (0, pad))
            self._other = np.pad(self._other, (0, pad))
            if self._mask is not None and self._mask.size:
                self._mask = np.pad(self._mask, (0, pad), mode="edge")
        try:
            self._advance(called)
        finally:
            self._closed = True
            self._decoder.close()
        frames = self._take()
        return frames

    def close(self) -> None:
        """Stop without finishing the stream (frames in flight are dropped)."""
        self._closed = True
        self._decoder.close()

    def __enter__(self) -> StreamingAvatar:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.close()

    @property
    def frames_returned(self) -> int:
        return self._returned

    @property
    def samples_pushed(self) -> int:
        return self._total

    @property
    def latency_frames(self) -> int:
        """Video frames of audio that must arrive after a chunk's first sample before it can be generated."""
        c = self.config
        return self.frames_per_chunk + self.lookahead + max(c.audio_lookahead_frames, c.vad_lookahead_frames)

    def stats(self) -> dict[str, Any]:
        """Real-time performance, in the terms of StreamAvatar Table 5 (RTF = processing time / media duration).

        ``rtf_dit`` / ``rtf_vae`` / ``rtf_audio``: busy time of each module over the duration it processed;
        ``ffd_*_s``: the first chunk's time in each module; ``first_frame_delay_s``: from the moment the first
        chunk's audio (with look-ahead) had arrived to its first decoded frame; ``latency_s`` adds the audio the
        first chunk waits for (``algorithmic_latency_s``), as the paper's 0.48 s + FFD = 1.20 s.
        Per-chunk lists (last 4096 chunks): ``chunk_dit_s``, ``chunk_vae_s``, ``chunk_audio_s``,
        ``chunk_latency_s`` (audio complete -> last frame of the chunk decoded).
        """
        chunk_s = self.frames_per_chunk / FPS
        timings = list(self._timings)
        dit_chunks = self._chunk
        first = self._first
        out: dict[str, Any] = {
            "audio_seconds": self._total / SAMPLE_RATE,
            "frames": self._returned,
            "chunks": dit_chunks,
            "setup_s": self._setup_s,
            "rtf_dit": self._dit_busy_s / (dit_chunks * chunk_s) if dit_chunks else None,
            "rtf_vae": (
                self._decoder.busy_s / (self._decoder.latent_frames * 4 / FPS) if self._decoder.latent_frames else None
            ),
            "rtf_audio": self._audio_busy_s / (self._audio_frames / FPS) if self._audio_frames else None,
            "ffd_audio_s": first.audio_s if first else None,
            "ffd_dit_s": first.dit_s if first else None,
            "ffd_vae_s": (first.first_frame - first.handed_over) if first and first.first_frame else None,
            "first_frame_delay_s": (first.first_frame - first.ready) if first and first.first_frame else None,
            "algorithmic_latency_s": self.latency_frames / FPS + self.audio_encoder.config.pad[1] / SAMPLE_RATE,
            "kv_cache_bytes": self.cache.nbytes(),
            "kv_cache_frames": self.cache.num_frames,
            "max_rope_index": self.cache.max_rope_index,
            "chunk_dit_s": [t.dit_s for t in timings],
            "chunk_vae_s": [t.vae_s for t in timings],
            "chunk_audio_s": [t.audio_s for t in timings],
            "chunk_latency_s": [t.last_frame - t.ready for t in timings if t.last_frame is not None],
        }
        if out["first_frame_delay_s"] is not None:
            out["latency_s"] = out["algorithmic_latency_s"] + out["first_frame_delay_s"]
        return out

    def recorded(self) -> dict[str, Tensor]:
        """With ``record=True``: ``latents [1, z, 1 + n C, h, w]`` (reference first) and the routed ``talk`` /
        ``listen`` features ``[1, T, D]`` and ``mask [1, T]`` of every frame the session computed."""
        if not self.config.record:
            raise RuntimeError("StreamingAvatar.recorded: create the session with record=True")
        r = self._recorded
        return {
            "latents": torch.cat(r["latents"], dim=2),
            **{k: torch.cat(r[k], dim=1) for k in ("talk", "listen", "mask") if r[k]},
        }

    # ------------------------------------------------------------------------------------------------- internals
    @staticmethod
    def _check_compatible(generator: AvatarDiT, vae: ReferenceGuidedVAE, audio: AudioEncoder) -> None:
        d, v, a = generator.config, vae.config, audio.config
        problems = []
        if d.in_channels != v.latent_channels or d.out_channels != v.latent_channels:
            problems.append(f"the DiT has {d.in_channels} latent channels, the VAE {v.latent_channels}")
        if d.frames_per_latent != v.temporal_factor:
            problems.append(f"the DiT expects {d.frames_per_latent} frames per latent, the VAE has {v.temporal_factor}")
        if d.audio_attention and d.audio_dim != a.feature_dim:
            problems.append(f"the DiT expects audio_dim {d.audio_dim}, the audio encoder gives {a.feature_dim}")
        if a.sample_rate != SAMPLE_RATE or a.fps != FPS:
            problems.append(f"the audio encoder runs at {a.sample_rate} Hz / {a.fps} fps, streaming needs 16 kHz / 25")
        if problems:
            raise ValueError("StreamingAvatar: the networks do not belong together: " + "; ".join(problems))

    @staticmethod
    def _sigmas(generator: AvatarDiT, cfg: StreamingConfig) -> Tensor:
        if cfg.sigmas is not None:
            return torch.tensor(cfg.sigmas, dtype=torch.float64)
        recorded = (getattr(generator, "file_extra", None) or {}).get("student_sigmas")
        if recorded:
            return torch.tensor([float(s) for s in recorded], dtype=torch.float64)
        return student_sigmas(cfg.steps, cfg.shift)

    def _block_bounds(self, j: int) -> tuple[int, int]:
        """Video frames ``[start, end)`` of feature block ``j``: it ends where DiT chunk ``j`` stops hearing."""
        end = self.frames_per_chunk * (j + 1) + self.lookahead
        return (0 if j == 0 else end - self.frames_per_chunk), end

    def _block_needs(self, end: int) -> int:
        """Samples that must have arrived before a block ending at video frame ``end`` can be computed."""
        c, spf = self.config, SAMPLES_PER_FRAME
        need = (end + c.audio_lookahead_frames) * spf + self.audio_encoder.config.pad[1]
        if not self._mask_given:
            need = max(need, (end + c.vad_lookahead_frames) * spf)
        return need

    def _advance(self, called: float) -> None:
        """Compute every block and chunk whose audio has arrived (all of them at the end of the stream)."""
        final = self._end_frames is not None
        while True:
            start, end = self._block_bounds(self._block)
            if final:
                if start >= self._end_frames:
                    break
            elif self._total < self._block_needs(end):
                break
            self._compute_block(start, min(end, self._end_frames) if final else end)
            self._block += 1
        with torch.inference_mode():
            while True:
                j = self._chunk
                if final:
                    if self.frames_per_chunk * j >= self._end_frames:
                        break
                elif self._block <= j:
                    break
                self._generate_chunk(j, called)
                self._chunk += 1

    def _compute_block(self, start: int, end: int) -> None:
        """Wav2Vec2 features and speaking mask of video frames ``[start, end)`` -> routed talk / listen."""
        t0 = time.perf_counter()
        c, spf = self.config, SAMPLES_PER_FRAME
        pad_l, pad_r = self.audio_encoder.config.pad
        avail = self._total if self._end_frames is None else self._end_frames * spf  # flush padded the last frame
        ws, we = max(start - c.audio_context_frames, 0), min(end + c.audio_lookahead_frames, avail // spf)
        lo, hi = max(ws * spf - pad_l, 0), min(we * spf + pad_r, avail)
        wave = np.stack([self._self[lo - self._buf_start : hi - self._buf_start],
                         self._other[lo - self._buf_start : hi - self._buf_start]])  # fmt: skip
        with torch.inference_mode():
            feats = self.audio_encoder.encode_window(torch.from_numpy(wave), ws, we, offset=lo)
            feats = feats[:, start - ws : end - ws].to(self.device)  # [2, n, D]
        if self._mask_given:
            m = self._mask[start * spf - self._buf_start : end * spf - self._buf_start]
            mask = (m.reshape(end - start, spf).mean(axis=1) >= 0.5).astype(np.float32)
        else:
            vs = max(start - c.vad_context_frames, 0)
            ve = end + c.vad_lookahead_frames
            if self._end_frames is not None:
                ve = min(ve, self._end_frames)
            audio = self._self[vs * spf - self._buf_start : ve * spf - self._buf_start]
            full = np.asarray(self.mask_fn(np.ascontiguousarray(audio), ve - vs), dtype=np.float32).reshape(-1)
            if full.shape != (ve - vs,):
                raise ValueError(f"mask_fn returned {full.shape[0]} values for {ve - vs} frames")
            mask = full[start - vs : end - vs]
        mask_t = torch.from_numpy(np.ascontiguousarray(mask))[None].to(self.device)
        talk, listen = route_audio_features(feats[:1], feats[1:], mask_t)
        self._talk = torch.cat([self._talk, talk], dim=1)
        self._listen = torch.cat([self._listen, listen], dim=1)
        if c.record:
            for key, value in (("talk", talk), ("listen", listen), ("mask", mask_t)):
                self._recorded[key].append(value.cpu())
        self._drop_samples_before(end)
        elapsed = time.perf_counter() - t0
        self._audio_busy_s += elapsed
        self._audio_frames += end - start
        self._pending_audio_s += elapsed

    def _drop_samples_before(self, next_start: int) -> None:
        """Keep only the samples that the windows of the block starting at ``next_start`` read."""
        c, spf = self.config, SAMPLES_PER_FRAME
        keep = max(next_start - c.audio_context_frames, 0) * spf - self.audio_encoder.config.pad[0]
        if not self._mask_given:
            keep = min(keep, max(next_start - c.vad_context_frames, 0) * spf)
        keep = min(keep, next_start * spf)
        cut = keep - self._buf_start
        if cut > 0:
            self._self, self._other = self._self[cut:], self._other[cut:]
            if self._mask is not None:
                self._mask = self._mask[cut:]
            self._buf_start = keep

    def _generate_chunk(self, j: int, called: float) -> None:
        """Few-step denoising of chunk ``j`` through the KV cache (``student_rollout``'s inner loop), then decode."""
        timing = _ChunkTiming(index=j, ready=called, audio_s=self._pending_audio_s)
        self._pending_audio_s = 0.0
        t0 = time.perf_counter()
        gen, cfg = self.generator, self.config
        n_c, f = self.chunk_frames, self.frames_per_chunk
        lo = f * j - self.lookbehind - self._feat_start
        width = gen.config.chunk_audio_frames(n_c)
        talk = frames_window(self._talk, lo, width) if gen.config.audio_attention else None
        listen = frames_window(self._listen, lo, width) if gen.config.audio_attention else None
        _, z, _, h, w = self.z_ref.shape
        noises = chunk_noises((1, z, n_c, h, w), self.sigmas.numel(), self._generator, self.device, self.z_ref.dtype)
        x, out, n = noises[0], None, self.sigmas.numel()
        for k in range(n):
            s = self.sigmas[k].to(x.dtype)
            v = self._forward_chunk(x, s.expand(1, n_c), talk, listen, self.cache, self.context, write_cache=k == n - 1)
            out = x - s * v
            if k < n - 1:
                x = renoise(out, x, s, self.sigmas[k + 1].to(x.dtype), cfg.renoise, noises[k + 1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # features of frames before the next chunk's look-behind are never read again
        drop = max(f * (j + 1) - self.lookbehind - self._feat_start, 0)
        self._talk, self._listen = self._talk[:, drop:], self._listen[:, drop:]
        self._feat_start += drop
        timing.dit_s = time.perf_counter() - t0
        self._dit_busy_s += timing.dit_s
        if cfg.record:
            self._recorded["latents"].append(out.cpu())
        latents = out.to(self.vae_device) if self.vae_device != self.device else out
        timing.handed_over = time.perf_counter()
        self._timings.append(timing)
        if self._first is None:
            self._first = timing
        self._decoder.submit(latents, skip=0, timing=timing)

    def _take(self) -> list[np.ndarray]:
        self._decoder.check()
        frames = self._decoder.take()
        if self._end_frames is not None:  # the last chunk runs past the audio: cut to ceil(samples / 640)
            frames = frames[: max(0, self._end_frames - self._returned)]
        self._returned += len(frames)
        return frames


def _recorded_size(*networks: Any) -> tuple[int, int] | None:
    """The training size an export recorded in its metadata (``extra["size"]``: int or [H, W]), if any."""
    for net in networks:
        size = (getattr(net, "file_extra", None) or {}).get("size")
        if size is not None:
            return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    return None
