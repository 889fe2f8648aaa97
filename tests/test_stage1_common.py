"""Shared builders for the stage-1 tests (tiny VAE / teacher / audio files, prompt batches, recorded pairs),
and the student's construction from the teacher file."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.stages.common import EMA
from dystream.stages.ode_pairs import ODEPairsStage
from dystream.stages.student import build_student
from dystream.stages.teacher import TeacherStage
from dystream.zoo.files import load_model, save_model

WINDOW = 24  # video frames = 6 latent frames = 2 chunks of 3


def make_files(root: Path) -> dict[str, str]:
    """Tiny VAE, teacher and audio files; the teacher's weights are random everywhere (Wan's init zeroes the
    head and the audio outputs, which would make every velocity zero and every path trivially equal)."""
    torch.manual_seed(0)
    vae = str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), root / "vae.safetensors", arch="vae"))
    stage = TeacherStage(vae=vae, export_dir=str(root / "teacher"))
    with torch.no_grad():
        for p in stage.dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    stage.ema = EMA(stage.dit)
    stage.export()
    return {
        "vae": vae,
        "teacher": str(root / "teacher" / "teacher.safetensors"),
        "audio": str(root / "teacher" / "audio.safetensors"),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return make_files(tmp_path_factory.mktemp("stage1_files"))


def prompt_batch(keys: list[str], t: int = WINDOW, size: int = 64, seed: int = 0, split: str | None = None) -> dict:
    """A SpeakerVid-style batch (docs/architecture.md): reference, both audio tracks, mask."""
    g = torch.Generator().manual_seed(seed)
    b = len(keys)
    video = torch.rand(b, 3, t, size, size, generator=g) * 2 - 1
    batch = {
        "video": video,
        "references": (torch.rand(b, 1, 3, size, size, generator=g) * 2 - 1),
        "audio_self": torch.randn(b, t * 640, generator=g) * 0.1,
        "audio_other": torch.randn(b, t * 640, generator=g) * 0.1,
        "mask": (torch.arange(t) < t // 2).float().expand(b, t).clone(),
        "key": list(keys),
    }
    if split is not None:
        batch["split"] = split
    return batch


def record_pairs(
    files: dict[str, str], out_dir: Path, n_train: int = 4, n_val: int = 2, teacher_steps: int = 3, **stage_args
) -> Path:
    """Record pairs with a real Lightning predict run over in-memory prompt batches of 2."""
    stage = ODEPairsStage(
        teacher=files["teacher"],
        vae=files["vae"],
        audio=files["audio"],
        teacher_steps=teacher_steps,
        out_dir=str(out_dir),
        shard_samples=3,
        **stage_args,
    )
    loaders = [
        [prompt_batch([f"tr{i}", f"tr{i + 1}"], seed=i, split="train") for i in range(0, n_train, 2)],
        [prompt_batch([f"va{i}", f"va{i + 1}"], seed=100 + i, split="val") for i in range(0, n_val, 2)],
    ]

    loaders = [DataLoader(batches, batch_size=None) for batches in loaders]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.predict(stage, dataloaders=loaders, return_predictions=False)
    return out_dir


def test_student_starts_from_the_teacher_with_the_presets_block_causal_layout(files):
    from dystream.stages.conditioning import AvatarConditioner

    cond = AvatarConditioner(vae=files["vae"], audio=files["audio"])
    teacher = load_model(files["teacher"], arch="dit")
    student = build_student(files["teacher"], cond)
    for (name, a), b in zip(student.state_dict().items(), teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    cfg = student.config
    assert (cfg.chunk_frames, cfg.sink_chunks, cfg.window_frames, cfg.rapr, cfg.rapr_max_distance) == (
        3,
        1,
        6,
        True,
        10,
    )
    wider = build_student(files["teacher"], cond, {"window_frames": 9, "rapr_max_distance": 13})
    assert wider.config.window_frames == 9 and torch.equal(wider.head.head.weight, teacher.head.head.weight)
    with pytest.raises(ValueError, match="dim"):
        build_student(files["teacher"], cond, {"dim": 32})
    with pytest.raises(ValueError, match="rapr_max_distance"):
        build_student(files["teacher"], cond, {"rapr_max_distance": 0})
