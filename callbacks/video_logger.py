"""TensorBoard video logging of the stage's validation samples, next to the real video, with the driving audio.

    callbacks:
      - class_path: dystream.callbacks.video_logger.VideoLogger
        init_args:
          sample_method: sample
          num_videos: 2

On the first validation batch of every `every_n_epochs`-th epoch the callback samples the batch with the stage method
named `sample_method` (the same contract and the same shared, seeded sampling run as `EvaluationCallback`: a method
returning videos [B, 3, T, H, W] in [-1, 1], or latents with `output: latents`) and logs, per video i < num_videos:

- `<prefix>/video_<i>`: an animated clip, real (left) | sample (right), at `fps`. TensorBoard's `add_video` needs
  moviepy, which is not a dystream dependency; without it the same summary (an image summary holding an animated
  GIF, which is what `add_video` writes) is encoded with Pillow, so the Images tab plays it either way;
- `<prefix>/strip_<i>`: a still strip, real frames above sample frames (every `strip_stride`-th frame);
- `<prefix>/audio_<i>`: the avatar's own voice and the partner's, mixed (16 kHz), when the batch has them.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from dystream.callbacks.evaluation import stage_samples, to_frames

__all__ = ["VideoLogger", "encode_gif", "log_video"]

log = logging.getLogger("dystream.eval")


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """uint8 [T, H, W, 3] -> animated GIF bytes (Pillow; loops forever)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
    return buf.getvalue()


def log_video(experiment: Any, tag: str, frames: np.ndarray, step: int, fps: float = 25.0) -> str:
    """Log uint8 frames [T, H, W, 3] as a TensorBoard video; returns how ("add_video" or "gif")."""
    try:
        import moviepy  # noqa: F401

        has_moviepy = True
    except ImportError:
        has_moviepy = False
    if has_moviepy and hasattr(experiment, "add_video"):
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W]
        experiment.add_video(tag, video, step, fps=int(round(fps)))
        return "add_video"
    from torch.utils.tensorboard.summary import Summary

    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=encode_gif(frames, fps))
    experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    return "gif"


class VideoLogger(Callback):
    """Logs sample videos (real | sample), frame strips and the driving audio to TensorBoard.

    Args:
        sample_method: name of the stage method that generates videos for a batch (see `EvaluationCallback`).
        output: what that method returns: "video" or "latents" (decoded with the stage's `cond`).
        num_videos: videos of the first validation batch to log.
        every_n_epochs: log on every n-th validation epoch.
        fps: playback rate of the logged clips.
        strip_stride: every n-th frame goes into the still strip.
        log_audio: also log the mixed audio of each video.
        seed: base seed of the sampling (shared with EvaluationCallback's, so both see the same samples).
        prefix: tag prefix.
    """

    def __init__(
        self,
        sample_method: str = "sample",
        output: Literal["video", "latents"] = "video",
        num_videos: int = 2,
        every_n_epochs: int = 1,
        fps: float = 25.0,
        strip_stride: int = 2,
        log_audio: bool = True,
        seed: int = 0,
        prefix: str = "val/samples",
    ) -> None:
        super().__init__()
        if num_videos < 1 or every_n_epochs < 1 or strip_stride < 1 or fps <= 0:
            raise ValueError("VideoLogger: num_videos, every_n_epochs, strip_stride must be >= 1 and fps > 0")
        if output not in ("video", "latents"):
            raise ValueError(f"VideoLogger.output must be 'video' or 'latents', got {output!r}")
        self.sample_method, self.output = sample_method, output
        self.num_videos, self.every_n_epochs = num_videos, every_n_epochs
        self.fps, self.strip_stride, self.log_audio = fps, strip_stride, log_audio
        self.seed, self.prefix = seed, prefix
        self.logged: list[str] = []  # tags logged by the last call (tests, debugging)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        videos = stage_samples(pl_module, batch, batch_idx, self.sample_method, self.output, self.seed)
        self._log(experiment, batch, videos, trainer.global_step)

    @rank_zero_only
    def _log(self, experiment: Any, batch: dict[str, Any], videos: Tensor, step: int) -> None:
        self.logged = []
        real = batch.get("video")
        for i in range(min(self.num_videos, videos.shape[0])):
            fake = to_frames(videos[i])  # [T, H, W, 3]
            pair = fake if real is None else np.concatenate([to_frames(real[i][:, : fake.shape[0]]), fake], axis=2)
            how = log_video(experiment, f"{self.prefix}/video_{i}", pair, step, self.fps)
            self.logged.append(f"{self.prefix}/video_{i} ({how})")
            rows = [fake[:: self.strip_stride]]
            if real is not None:
                rows.insert(0, to_frames(real[i][:, : fake.shape[0]])[:: self.strip_stride])
            strip = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)  # [rows H, n W, 3]
            experiment.add_image(f"{self.prefix}/strip_{i}", strip, step, dataformats="HWC")
            self.logged.append(f"{self.prefix}/strip_{i}")
            if self.log_audio and "audio_self" in batch:
                n = fake.shape[0] * 640
                mix = batch["audio_self"][i, :n].float()
                if "audio_other" in batch:
                    mix = mix + batch["audio_other"][i, :n].float()
                experiment.add_audio(f"{self.prefix}/audio_{i}", mix.clamp(-1, 1).cpu()[None], step, sample_rate=16000)
                self.logged.append(f"{self.prefix}/audio_{i}")
