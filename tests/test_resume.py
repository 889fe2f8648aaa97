"""Kill and resume: a run killed mid-epoch and resumed from its last checkpoint continues exactly as the uninterrupted
run (same per-step losses, same weights, EMA and optimizer states at the end), for the teacher stage (automatic
optimization, Lightning's ModelCheckpoint every 2 steps) and the SiD stage (manual optimization, two optimizers,
step counters in buffers).

What makes it exact: Lightning restores weights, optimizers, schedulers and loop counters; the EMA is a submodule
updated before the checkpoint is written; :class:`dystream.scale.ResumeState` restores every rank's RNG; and the
in-memory loader here implements ``state_dict`` / ``load_state_dict``, so Lightning restores the data position
(the project's WebDataset loaders do not; docs/scaling.md states the approximation they make).
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_stage1_common import files, prompt_batch  # noqa: F401  (files is a fixture)

from dystream.scale import ResumeState


class Batches:
    """A resumable in-memory loader: Lightning saves its position in checkpoints and restores it on resume."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.start, self.served = batches, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.batches)):
            self.served = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict[str, int]:
        # called while a checkpoint is written after a training step: every batch handed out so far was trained
        return {"next": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["next"]


class Killed(Exception):
    pass


class Record(Callback):
    """Per-step losses keyed by the global batch index, and a kill before batch ``kill_at`` starts."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at, self.losses = kill_at, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.kill_at:
            raise Killed(f"killed before batch {batch_idx}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        key = "train/loss" if "train/loss" in metrics else "train/loss_fake"
        self.losses[batch_idx] = float(metrics[key])


def _fit(stage: L.LightningModule, batches, root: Path, record: Record, ckpt_path=None, every: int = 2, **trainer):
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, save_last=True)
    t = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoints, ResumeState(), record],
        **trainer,
    )
    try:
        t.fit(stage, train_dataloaders=Batches(batches), ckpt_path=ckpt_path)
    except Killed:
        pass
    return t


def _state(stage: L.LightningModule, trainer: L.Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in stage.state_dict().items()}
    for i, opt in enumerate(trainer.optimizers):
        for j, s in enumerate(opt.state_dict()["state"].values()):
            out.update({f"opt{i}.{j}.{k}": v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


def _assert_same_run(full: dict[int, float], resumed: dict[int, float], first_resumed: int) -> None:
    assert sorted(resumed) == list(range(first_resumed, len(full)))
    for i in resumed:
        assert resumed[i] == pytest.approx(full[i], rel=1e-6, abs=1e-7), (i, resumed[i], full[i])


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
    from dystream.zoo.files import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resume_vae") / "vae.safetensors"
    return str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), path, arch="vae"))


def _teacher(vae: str, out: Path):
    from dystream.stages.teacher import TeacherStage

    L.seed_everything(0, verbose=False)
    return TeacherStage(vae=vae, export_dir=str(out), warmup_steps=3, lr=1e-3, ema_decay=0.5)


def _teacher_batches() -> list[dict]:
    return [prompt_batch([f"c{i}a", f"c{i}b"], t=8, seed=i) for i in range(5)]


@pytest.fixture(scope="module")
def teacher_full(vae_file, tmp_path_factory):
    """The uninterrupted teacher run: per-step losses, final state, its checkpoints (after steps 2 and 4)."""
    root = tmp_path_factory.mktemp("teacher_full")
    full = Record()
    stage = _teacher(vae_file, root)
    trainer = _fit(stage, _teacher_batches(), root, full, gradient_clip_val=1.0)
    return full.losses, _state(stage, trainer), root


def test_teacher_killed_mid_epoch_resumes_on_the_same_trajectory(vae_file, teacher_full, tmp_path):
    kill_at = random.Random(7).choice([3, 4])  # a random step after the first checkpoint, seeded: reproducible
    losses, final, _ = teacher_full
    killed = Record(kill_at=kill_at)
    _fit(
        _teacher(vae_file, tmp_path / "killed"), _teacher_batches(), tmp_path / "killed", killed, gradient_clip_val=1.0
    )
    assert sorted(killed.losses) == list(range(kill_at))
    last = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    done = last["global_step"]
    assert done == 2 * (kill_at // 2) and "ResumeState" in str(last["callbacks"].keys())

    torch.manual_seed(1234)  # whatever the generators hold now, the checkpoint's states win
    resumed = Record()
    stage = _teacher(vae_file, tmp_path / "resumed")
    ckpt = tmp_path / "killed" / "last.ckpt"
    t = _fit(stage, _teacher_batches(), tmp_path / "resumed", resumed, ckpt_path=ckpt, gradient_clip_val=1.0)
    _assert_same_run(losses, resumed.losses, done)
    state = _state(stage, t)
    assert state.keys() == final.keys() and any(k.startswith("model.ema.") for k in state)
    for key in final:
        torch.testing.assert_close(state[key], final[key], rtol=1e-6, atol=1e-7, msg=key)


def test_without_the_rng_states_the_resumed_noise_differs(vae_file, teacher_full, tmp_path):
    """The control: the same resume minus ResumeState draws other noise, so the next loss moves."""
    losses, _, root = teacher_full
    ckpt = torch.load(root / "epoch=0-step=2.ckpt", weights_only=True)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if "ResumeState" not in k}
    torch.save(ckpt, tmp_path / "no_rng.ckpt")
    torch.manual_seed(1234)
    resumed = Record()
    stage = _teacher(vae_file, tmp_path / "r")
    _fit(stage, _teacher_batches(), tmp_path / "r", resumed, ckpt_path=tmp_path / "no_rng.ckpt", gradient_clip_val=1.0)
    assert sorted(resumed.losses) == [2, 3, 4]
    assert abs(resumed.losses[2] - losses[2]) > 1e-4


def test_sid_resumed_mid_epoch_continues_on_the_same_trajectory(files, tmp_path):  # noqa: F811
    from dystream.stages.stage1_sid import SiDStage

    def stage(out: Path) -> SiDStage:
        L.seed_everything(0, verbose=False)
        args = {"student": files["teacher"], "teacher": files["teacher"], "vae": files["vae"], "audio": files["audio"]}
        return SiDStage(**args, generator_every=2, ema_decay=0.5, export_dir=str(out))

    batches = [prompt_batch([f"p{i}"], t=12, seed=i) for i in range(4)]  # one chunk per window
    # optimizer steps per batch: 2 (generator + fake score), 1, 2, 1 -> global steps 2, 3, 5, 6; saved at 3
    full = Record()
    s_full = stage(tmp_path / "full")
    t_full = _fit(s_full, batches, tmp_path / "full", full, every=3)
    # the uninterrupted run's checkpoint after batch 1 is what a run killed later in the epoch leaves behind (the
    # teacher test kills one for real)
    ckpt = tmp_path / "full" / "epoch=0-step=3.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3

    torch.manual_seed(1234)
    resumed = Record()
    s = stage(tmp_path / "resumed")
    t = _fit(s, batches, tmp_path / "resumed", resumed, ckpt_path=ckpt, every=3)
    _assert_same_run(full.losses, resumed.losses, 2)
    assert (int(s.sid_step), int(s.generator_steps)) == (4, 2)
    a, b = _state(s_full, t_full), _state(s, t)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _checkpoint_args(recipe: Path) -> list[dict]:
    import yaml

    callbacks = (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("callbacks") or []
    return [c.get("init_args", {}) for c in callbacks if c.get("class_path", "").endswith("ModelCheckpoint")]


def test_every_recipe_keeps_last_ckpt_the_newest():
    """Every recipe that saves last.ckpt (the file docs/recipes.md resumes from) turns Lightning's version counter
    off: with it on, a run directory that was moved or copied (another machine, a renamed folder) writes last-v1.ckpt
    on resume, and a second resume from last.ckpt silently starts over from the first checkpoint."""
    recipes = sorted(RECIPES.rglob("*.yaml"))
    checked = [(r.name, a) for r in recipes for a in _checkpoint_args(r) if a.get("save_last")]
    assert len(checked) >= 9  # the chain's stages, the metric networks, the ablation arms
    for name, args in checked:
        assert args.get("enable_version_counter") is False, name


def test_a_moved_run_resumed_twice_continues_from_its_newest_step(tmp_path):
    """The recipes' checkpoint settings on a tiny model: train 4 steps, move the run directory, resume to 6 and then
    to 8 from last.ckpt each time; last.ckpt holds step 8 (Lightning's defaults leave it at 4)."""
    import shutil

    from lightning.pytorch.demos.boring_classes import BoringModel

    (args,) = _checkpoint_args(RECIPES / "teacher.yaml")
    settings = {k: v for k, v in args.items() if k not in ("dirpath", "every_n_train_steps")}

    def fit(run: Path, steps: int, resume: bool) -> None:
        checkpoint = ModelCheckpoint(dirpath=run / "checkpoints", every_n_train_steps=2, **settings)
        trainer = L.Trainer(max_steps=steps, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu")  # fmt: skip
        trainer.fit(BoringModel(), ckpt_path=run / "checkpoints" / "last.ckpt" if resume else None)

    fit(tmp_path / "first", 4, resume=False)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    fit(tmp_path / "moved", 6, resume=True)
    fit(tmp_path / "moved", 8, resume=True)
    last = torch.load(tmp_path / "moved" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    assert not list((tmp_path / "moved" / "checkpoints").glob("last-v*.ckpt"))
