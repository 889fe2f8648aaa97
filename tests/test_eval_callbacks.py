"""Evaluation and video-logging callbacks on a tiny fake stage: metrics logged, cached real statistics, "n/a" for a
missing network, TensorBoard video/strip/audio summaries."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from dystream.callbacks.evaluation import EvaluationCallback, stage_samples
from dystream.callbacks.video_logger import VideoLogger, encode_gif
from dystream.datamodules.synthetic import make_clip
from dystream.evaluation.networks.syncnet_small import PRESETS, SmallSyncNet
from dystream.zoo.files import save_model


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: torch's intra-op threads only add synchronisation here (several times slower on a busy 2-core
    # machine), so these tests run single-threaded and restore the setting afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


T = 36


def _batches() -> list[dict]:
    clips = [make_clip(seed=2, split="val", index=i, size=32, seconds=1.5) for i in range(4)]

    def video(c):
        return torch.from_numpy(c.video[1 : 1 + T]).permute(3, 0, 1, 2).float() / 127.5 - 1

    def batch(cs):
        return {
            "video": torch.stack([video(c) for c in cs]),
            "references": torch.stack([torch.from_numpy(c.video[0]).permute(2, 0, 1).float() / 127.5 - 1 for c in cs])[
                :, None
            ],
            "audio_self": torch.stack([torch.from_numpy(c.audio_self[640 : 640 * (1 + T)]) for c in cs]),
            "audio_other": torch.stack([torch.from_numpy(c.audio_other[640 : 640 * (1 + T)]) for c in cs]),
            "mask": torch.stack([torch.from_numpy(c.mask[1 : 1 + T].astype(np.float32)) for c in cs]),
            "kpts": torch.stack([torch.from_numpy(c.kpts[1 : 1 + T]) for c in cs]),
            "key": [c.key for c in cs],
        }

    return [batch(clips[:2]), batch(clips[2:])]


class FakeStage(L.LightningModule):
    """A stage whose `sample` returns the real video, slightly noised: what the callbacks see of any stage."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, batch):
        self.calls += 1
        return (batch["video"] + 0.05 * torch.randn_like(batch["video"])).clamp(-1, 1)


@pytest.fixture(scope="module")
def batches():
    return _batches()


def _trainer(tmp_path, callbacks):
    return L.Trainer(
        max_steps=1,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def _loader(batches):
    return DataLoader(batches, batch_size=None)


def _tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "audio": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_evaluation_callback_logs_metrics_caches_real_stats_and_reports_na(tmp_path, batches):
    syncnet = save_model(SmallSyncNet(PRESETS["tiny"]), tmp_path / "syncnet.safetensors", arch="metric_syncnet")
    cb = EvaluationCallback(
        metrics=["fd_sync", "sync_c", "sync_d", "fd_pose", "hkv", "drift_mean"],
        syncnet=str(syncnet),
        pose=str(tmp_path / "missing_pose.safetensors"),
        vshift=5,
        cache_dir=str(tmp_path / "cache"),
    )
    stage = FakeStage()
    trainer = _trainer(tmp_path, [cb, VideoLogger(num_videos=1)])
    trainer.validate(stage, dataloaders=_loader(batches))
    m = trainer.callback_metrics
    assert {"val/fd_sync", "val/sync_c", "val/sync_d", "val/drift_mean"} <= set(m)
    assert "val/fd_pose" not in m and "val/hkv" not in m
    assert m["val/fd_sync"] > 0 and m["val/drift_mean"] > 0
    assert "metric_pose" in cb.unavailable["hkv"] and "no file at" in cb.unavailable["fd_pose"]
    assert str(cb.last["hkv"]).startswith("n/a (metric weights 'pose.safetensors'")
    assert stage.calls == 2  # one sampling run per batch, shared by both callbacks
    cached = list((tmp_path / "cache").glob("real_fd_sync_*.npz"))
    assert len(cached) == 1
    first, stamp = float(m["val/fd_sync"]), cached[0].stat().st_mtime_ns

    trainer.validate(stage, dataloaders=_loader(batches))  # the same noise, the cached real statistics
    assert cached[0].stat().st_mtime_ns == stamp
    assert float(trainer.callback_metrics["val/fd_sync"]) == pytest.approx(first, rel=1e-4)

    acc = _tags(tmp_path / "tb")
    assert "eval/unavailable/hkv/text_summary" in acc.Tags()["tensors"]


def test_cached_real_stats_from_other_clips_are_not_used(tmp_path, batches):
    syncnet = save_model(SmallSyncNet(PRESETS["tiny"]), tmp_path / "syncnet.safetensors", arch="metric_syncnet")
    kw = dict(metrics=["fd_sync"], syncnet=str(syncnet), pose=None, vshift=5, cache_dir=str(tmp_path / "cache"))
    trainer = _trainer(tmp_path, [EvaluationCallback(**kw, max_batches=1)])
    trainer.validate(FakeStage(), dataloaders=_loader(batches))
    cb = EvaluationCallback(**kw, max_batches=1)
    trainer = _trainer(tmp_path, [cb])
    trainer.validate(FakeStage(), dataloaders=_loader(batches[::-1]))  # other clips, same settings: same cache file
    assert "other validation clips" in str(cb.last["fd_sync"])
    assert not list((tmp_path / "cache").glob("*.npz"))  # dropped, recomputed next time


def test_video_logger_writes_animated_clips_strips_and_audio(tmp_path, batches):
    vl = VideoLogger(num_videos=2, strip_stride=4)
    trainer = _trainer(tmp_path, [vl])
    trainer.validate(FakeStage(), dataloaders=_loader(batches))
    assert any(t.endswith("(gif)") or t.endswith("(add_video)") for t in vl.logged)
    acc = _tags(tmp_path / "tb")
    images = acc.Tags()["images"]
    assert {"val/samples/video_0", "val/samples/video_1", "val/samples/strip_0"} <= set(images)
    assert "val/samples/audio_0" in acc.Tags()["audio"]
    clip = acc.Images("val/samples/video_0")[0]
    assert clip.encoded_image_string[:6] in (b"GIF87a", b"GIF89a") and clip.width == 64  # real | sample
    strip = acc.Images("val/samples/strip_0")[0]
    assert (strip.height, strip.width) == (64, 32 * T // 4)


def test_gif_round_trip():
    from PIL import Image, ImageSequence

    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    import io

    img = Image.open(io.BytesIO(encode_gif(frames, fps=25)))
    assert sum(1 for _ in ImageSequence.Iterator(img)) == 5 and img.info["duration"] == 40


def test_stage_samples_decodes_latents_and_checks_the_method(batches):
    class Cond(torch.nn.Module):
        def decode(self, z, ref):  # latents [B, 3, F, h, w] -> "video" [B, 3, 1 + 4 (F - 1), h, w]
            return torch.cat([ref[:, :, None], z[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)

    class LatentStage(FakeStage):
        def __init__(self):
            super().__init__()
            self.cond = Cond()

        def sample(self, batch):
            return torch.zeros(batch["video"].shape[0], 3, 1 + T // 4, 32, 32)

    out = stage_samples(LatentStage(), batches[0], 0, output="latents")
    assert out.shape == batches[0]["video"].shape and float(out.abs().max()) == 0.0
    with pytest.raises(AttributeError, match="no method 'generate'"):
        stage_samples(FakeStage(), batches[0], 1, method="generate")
    with pytest.raises(ValueError, match="unknown"):
        EvaluationCallback(metrics=["fid", "lpips"])


def test_evaluation_callback_reports_batches_it_cannot_use(tmp_path, batches):
    cb = EvaluationCallback(metrics=["drift_mean"], syncnet=None, pose=None, cache_dir=str(tmp_path / "cache"))
    pairs = [{k: v for k, v in b.items() if k not in ("video", "audio_self")} for b in batches]  # e.g. ODE pairs
    stage = FakeStage()
    _trainer(tmp_path, [cb]).validate(stage, dataloaders=_loader(pairs))
    assert stage.calls == 0 and "no ['video', 'audio_self']" in cb.unavailable["drift_mean"]
