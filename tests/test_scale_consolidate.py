"""`dystream consolidate` on single-file checkpoints (the sharded FSDP case is in test_scale_fsdp.py): it writes the
same export the stage writes while training, frozen networks dropped from a checkpoint come back from their files,
and bad inputs fail clearly."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_stage1_common import files, prompt_batch  # noqa: F401  (files is a fixture)
from torch.utils.data import DataLoader

from dystream import cli
from dystream.consolidate import checkpoint_kind, consolidate, load_full_checkpoint
from dystream.zoo.files import load_model


def _fit(stage: L.LightningModule, batches: list[dict], root: Path) -> Path:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True)],
    )
    trainer.fit(stage, train_dataloaders=DataLoader(batches, batch_size=None))
    return root / "last.ckpt"


def _same_file(a: Path, b: Path) -> None:
    x, y = load_model(a).state_dict(), load_model(b).state_dict()
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_teacher_checkpoint_consolidates_to_the_stages_own_export(files, tmp_path):  # noqa: F811
    from dystream.stages.teacher import TeacherStage

    stage = TeacherStage(vae=files["vae"], export_dir=str(tmp_path / "train"), ema_decay=0.5, warmup_steps=1)
    ckpt = _fit(stage, [prompt_batch(["a", "b"], t=8, seed=i) for i in range(2)], tmp_path / "ckpt")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "teacher.yaml"
    code = 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["consolidate", str(ckpt), "--config", str(recipe), "--out-dir", str(tmp_path / "zoo")])
    assert code == 0 and "teacher.safetensors" in out.getvalue()
    for name in ("teacher.safetensors", "audio.safetensors"):
        _same_file(tmp_path / "zoo" / name, tmp_path / "train" / name)
    assert load_model(tmp_path / "zoo" / "teacher.safetensors").file_extra["stage"] == "teacher"


def test_student_checkpoint_without_its_frozen_networks_consolidates(files, tmp_path):  # noqa: F811
    from dystream.stages.stage1_sid import SiDStage

    args = {"student": files["teacher"], "teacher": files["teacher"], "vae": files["vae"], "audio": files["audio"]}
    stage = SiDStage(**args, export_dir=str(tmp_path / "train"), ema_decay=0.5)
    ckpt = _fit(stage, [prompt_batch(["a"], t=12, seed=0)], tmp_path / "ckpt")
    state = load_full_checkpoint(ckpt)["state_dict"]
    assert not any(k.startswith(("teacher.", "cond.")) for k in state)  # dropped at save, as on a single device
    recipe = tmp_path / "sid.yaml"
    recipe.write_text("model:\n  class_path: dystream.stages.stage1_sid.SiDStage\n")
    (path,) = consolidate(ckpt, recipe, tmp_path / "zoo")
    _same_file(path, tmp_path / "train" / "student.safetensors")


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint_kind(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an FSDP sharded checkpoint"):
        checkpoint_kind(tmp_path / "empty")
    deepspeed = tmp_path / "ds"
    (deepspeed / "checkpoint").mkdir(parents=True)
    (deepspeed / "latest").write_text("checkpoint")
    assert checkpoint_kind(deepspeed) == "deepspeed"
    torch.save({"state_dict": {}, "object": Path("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_full_checkpoint(tmp_path / "pickled.ckpt")
    (tmp_path / "norecipe.yaml").write_text("trainer: {}\n")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="model.class_path"):
        consolidate(tmp_path / "plain.ckpt", tmp_path / "norecipe.yaml")
