"""Stage 1b (SiD with student forcing): which network gets which gradient, what one training step updates,
rank-synchronised draws, and resuming from a checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_stage1_common import files, prompt_batch  # noqa: F401  (files is a fixture)
from torch.utils.data import DataLoader

from dystream.stages.stage1_sid import SiDStage
from dystream.stages.student import frozen


def _stage(files, **kw) -> SiDStage:  # noqa: F811
    # the teacher file doubles as the ODE-init student: same architecture, block-causal layout in its config
    args = {"student": files["teacher"], "teacher": files["teacher"], "vae": files["vae"], "audio": files["audio"]}
    return SiDStage(**{**args, **kw})


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


def _grad_sum(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_generator_loss_trains_only_the_student_through_the_chosen_chunks(files):  # noqa: F811
    stage = _stage(files, grad_chunks=1)
    batch = prompt_batch(["a", "b"])
    rollouts = []
    rollout = stage.rollout
    stage.rollout = lambda *a, **k: rollouts.append(rollout(*a, **k)) or rollouts[-1]
    with frozen(stage.fake_score):
        loss, logs = stage.generator_loss(batch)
        assert all(not p.requires_grad for p in stage.fake_score.parameters())
        x_g, chunks, exits, _ = rollouts[0]
        assert chunks == [1] and len(exits) == 2 and 0.02 <= logs["sigma"] <= 0.98
        # chain rule: the student's gradient is dL/dx_g pulled back through the chosen chunk's frames only; the
        # frames of chunk 0 (and the reference) are constants for the optimiser, though the bidirectional scores
        # make dL/dx_g non-zero there too
        (g_x,) = torch.autograd.grad(loss, x_g, retain_graph=True)
        params = list(stage.student.parameters())
        via_chunk1 = torch.autograd.grad((g_x[:, :, 4:] * x_g[:, :, 4:]).sum(), params, retain_graph=True)
        via_rest = torch.autograd.grad(
            (g_x[:, :, :4] * x_g[:, :, :4]).sum(), params, allow_unused=True, retain_graph=True
        )
        assert all(g is None or not g.any() for g in via_rest)
        loss.backward()
    # ... and the parameters of the student only: the fake score was frozen, the teacher is frozen for good
    assert all(p.requires_grad for p in stage.fake_score.parameters())  # restored after the update
    assert _grad_sum(stage.student) > 0
    for p, g in zip(params, via_chunk1, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    for net in (stage.fake_score, stage.teacher, stage.cond, stage.ema.shadow):
        assert all(p.grad is None for p in net.parameters())


def test_fake_score_loss_trains_only_the_fake_score(files):  # noqa: F811
    stage = _stage(files)
    loss = stage.fake_score_loss(prompt_batch(["a", "b"]))
    loss.backward()
    assert _grad_sum(stage.fake_score) > 0
    for net in (stage.student, stage.teacher, stage.cond, stage.ema.shadow):
        assert all(p.grad is None for p in net.parameters())


def test_teacher_is_frozen_in_eval_mode_and_fake_score_starts_from_it(files):  # noqa: F811
    stage = _stage(files)
    stage.train()
    assert not stage.teacher.training and all(not p.requires_grad for p in stage.teacher.parameters())
    assert stage.fake_score.training and all(p.requires_grad for p in stage.fake_score.parameters())
    for a, b in zip(stage.fake_score.state_dict().values(), stage.teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_exit_steps_and_sigmas(files):  # noqa: F811
    stage = _stage(files)
    torch.manual_seed(0)
    draws = [stage.draw_exit_steps(4) for _ in range(20)]
    assert all(len(d) == 4 and all(0 <= e < 3 for e in d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    same = _stage(files, same_exit_step=True)
    assert all(len(set(same.draw_exit_steps(4))) == 1 for _ in range(10))
    sigma = stage.draw_sigma(1000, torch.device("cpu"))
    assert float(sigma.min()) >= 0.02 - 1e-6 and float(sigma.max()) <= 0.98 + 1e-6
    assert float(sigma.median()) > 0.5  # the shift (5) pushes noise levels up
    with pytest.raises(ValueError, match="min_sigma"):
        _stage(files, min_sigma=0.5, max_sigma=0.4)


def _fit(stage: SiDStage, batches: int, root, ckpt_path=None, epochs: int = 1) -> L.Trainer:
    loader = DataLoader([prompt_batch(["a", "b"], seed=i) for i in range(batches)], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    )
    trainer.fit(stage, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def test_one_sid_step_updates_the_right_parameters_and_resumes(files, tmp_path):  # noqa: F811
    stage = _stage(files, generator_every=2, ema_decay=0.5, export_dir=str(tmp_path))
    before = {name: _snapshot(getattr(stage, name)) for name in ("student", "fake_score", "teacher", "cond")}
    ema_before = _snapshot(stage.ema.shadow)
    _fit(stage, 1, tmp_path)  # step 0: a generator update and a fake-score update
    assert (int(stage.sid_step), int(stage.generator_steps)) == (1, 1)
    assert _changed(stage.student, before["student"]) and _changed(stage.fake_score, before["fake_score"])
    assert _changed(stage.ema.shadow, ema_before)
    assert not _changed(stage.teacher, before["teacher"]) and not _changed(stage.cond, before["cond"])

    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert len(ckpt["optimizer_states"]) == 2
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith(("teacher.", "cond.")) for k in keys)
    assert {"sid_step", "generator_steps"} <= set(keys) and any(k.startswith("ema.shadow.") for k in keys)
    assert (tmp_path / "student.safetensors").is_file()

    # resumed: step 1 is a fake-score update only (generator every 2 steps): the student stays as it was
    resumed = _stage(files, generator_every=2, ema_decay=0.5, export_dir=str(tmp_path))
    student_after_step0 = _snapshot(stage.student)
    fake_after_step0 = _snapshot(stage.fake_score)
    _fit(resumed, 1, tmp_path, ckpt_path=str(last), epochs=2)
    assert (int(resumed.sid_step), int(resumed.generator_steps)) == (2, 1)
    assert not _changed(resumed.student, student_after_step0)
    assert _changed(resumed.fake_score, fake_after_step0)
    assert not _changed(resumed.teacher, before["teacher"])
