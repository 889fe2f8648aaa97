"""Stage 1a (ODE init): the loss on recorded pairs read back through the DataModule equals a direct computation;
a fit run checkpoints, exports and resumes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_stage1_common import files, record_pairs  # noqa: F401  (files is a fixture)

from dystream.datamodules.ode_pairs import ODEPairDataModule
from dystream.stages.stage1_ode import ODEInitStage
from dystream.stages.student import teacher_distances
from dystream.zoo.files import load_model


@pytest.fixture(scope="module")
def pairs(files, tmp_path_factory):  # noqa: F811
    return record_pairs(files, tmp_path_factory.mktemp("pairs") / "pairs", n_train=2, n_val=2)


def _stage(files, **kw) -> ODEInitStage:  # noqa: F811
    return ODEInitStage(teacher=files["teacher"], vae=files["vae"], audio=files["audio"], **kw)


def _batch(pairs, split: str = "train") -> dict:
    dm = ODEPairDataModule(pairs=str(pairs), batch_size=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader() if split == "train" else dm.val_dataloader()))


def _direct_loss(student, batch, index: torch.Tensor, context: str) -> torch.Tensor:
    """Per-chunk loop: gather x_t by hand, predict, MSE of x0 over the generated frames."""
    states, x0, sig = batch["states"], batch["x0"], batch["sigmas"][0]
    b, _, _, f = states.shape[:4]
    x_t, sigma = x0.clone(), torch.zeros(b, f)
    for i in range(b):
        for j in range(index.shape[1]):
            fr = slice(1 + 3 * j, 4 + 3 * j)
            x_t[i, :, fr] = states[i, index[i, j], :, fr]
            sigma[i, fr] = sig[index[i, j]]
    talk, listen = batch["audio_talk"], batch["audio_listen"]
    if context == "noisy":
        v = student(x_t, sigma, talk, listen, attention="block_causal")
        pred = x_t - sigma[:, None, :, None, None] * v
    else:
        pred = x0.clone()
        for j in range(index.shape[1]):
            hi = 4 + 3 * j
            x_in = torch.cat([x0[:, :, : hi - 3], x_t[:, :, hi - 3 : hi]], dim=2)
            s_in = torch.cat([torch.zeros(b, hi - 3), sigma[:, hi - 3 : hi]], dim=1)
            pad = 4 * (hi - 1) + 2 - talk.shape[1]
            t_in, l_in = (
                torch.nn.functional.pad(a[:, : 4 * (hi - 1) + 2], (0, 0, 0, max(0, pad))) for a in (talk, listen)
            )
            v = student(x_in, s_in, t_in, l_in, attention="block_causal")[:, :, -3:]
            pred[:, :, hi - 3 : hi] = x_t[:, :, hi - 3 : hi] - sigma[:, None, hi - 3 : hi, None, None] * v
    return (pred[:, :, 1:] - x0[:, :, 1:]).pow(2).mean()


@pytest.mark.parametrize("context", ["noisy", "clean"])
def test_ode_loss_on_stored_pairs_equals_direct_computation(files, pairs, context):  # noqa: F811
    stage = _stage(files, context=context)
    batch = _batch(pairs)
    assert batch["states"].shape == (2, 3, 16, 7, 8, 8)
    loss = stage.loss(batch, generator=torch.Generator().manual_seed(7))
    index = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = _direct_loss(stage.student, batch, index, context)
    torch.testing.assert_close(loss.detach(), want, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in stage.ema.shadow.parameters())
    assert all(p.grad is None for p in stage.cond.parameters())
    assert sum(float(p.grad.abs().sum()) for p in stage.student.parameters() if p.grad is not None) > 0


def test_pairs_recorded_at_other_sigmas_are_refused(files, pairs):  # noqa: F811
    stage = _stage(files, student_steps=4)
    with pytest.raises(ValueError, match="student_steps=4"):
        stage.loss(_batch(pairs))


def test_loss_goes_down_on_a_fixed_batch(files, pairs):  # noqa: F811
    stage = _stage(files)
    batch = _batch(pairs)
    opt = torch.optim.Adam(stage.student.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        loss = stage.loss(batch, generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses


def test_fit_checkpoints_exports_and_resumes(files, pairs, tmp_path):  # noqa: F811
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(max_steps: int) -> L.Trainer:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
        return L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            callbacks=[ckpt],
            limit_val_batches=1,
            num_sanity_val_steps=0,
        )

    stage = _stage(files, export_dir=str(tmp_path), ema_decay=0.5)
    trainer(1).fit(stage, datamodule=ODEPairDataModule(pairs=str(pairs), batch_size=2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith("cond.") for k in keys)  # frozen networks are reloaded from their files
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("ema.shadow.") for k in keys)
    exported = load_model(tmp_path / "student.safetensors", arch="dit")
    assert exported.file_extra["student_sigmas"] == pytest.approx(stage.sigmas.tolist())
    assert exported.file_extra["audio"] == files["audio"]
    for a, b in zip(exported.state_dict().values(), stage.ema.shadow.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert exported.config.chunk_frames == 3 and exported.config.rapr

    # the offline comparison: the teacher re-sampled from the recorded noise with the recorded step count
    # reproduces the recorded samples (distance 0), which anchors the students' numbers
    result = teacher_distances(
        {"ode": str(tmp_path / "student.safetensors")}, str(pairs), teacher=files["teacher"], fresh_samples=1
    )
    assert set(result) == {"ode", "teacher@3"}
    assert result["teacher@3"]["mse"] < 1e-10 and result["teacher@3"]["fd"] > 0  # fresh noise: a sampling floor
    assert result["ode"]["mse"] > 0 and result["ode"]["fd"] > 0

    resumed = _stage(files, export_dir=str(tmp_path), ema_decay=0.5)
    t = trainer(2)
    t.fit(resumed, datamodule=ODEPairDataModule(pairs=str(pairs), batch_size=2), ckpt_path=str(last))
    assert t.global_step == 2
