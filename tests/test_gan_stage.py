"""Stage 2 (adversarial refinement): which network gets which gradient in each update, the D/G schedule, the
accuracy monitor, validation metrics, checkpoints and resume, bad arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_stage1_common import files, prompt_batch  # noqa: F401  (files is a fixture)
from torch.utils.data import DataLoader

from dystream.stages.stage2_gan import GANStage, psnr
from dystream.stages.student import frozen
from dystream.zoo.files import load_model

ONE_CHUNK = 12  # video frames: 3 latent frames = one chunk of the tiny student


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP hand-offs that dominate (tens of times slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stage(files, **kw) -> GANStage:  # noqa: F811
    # the teacher file doubles as the SiD student: same architecture, block-causal layout in its config
    args = {"student": files["teacher"], "teacher": files["teacher"], "vae": files["vae"], "audio": files["audio"]}
    return GANStage(**{**args, **kw})


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


def _grad_sum(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def _no_grads(*modules: torch.nn.Module) -> bool:
    return all(p.grad is None for m in modules for p in m.parameters())


@pytest.mark.parametrize("penalty", ["exact", "finite_difference"])
def test_discriminator_update_trains_only_the_discriminator(files, penalty):  # noqa: F811
    stage = _stage(files, penalty=penalty, r1_gamma=1.0, r2_gamma=1.0)
    loss, logs = stage.discriminator_step_loss(prompt_batch(["a", "b"], t=ONE_CHUNK))
    assert torch.isfinite(loss)
    assert float(logs["r1"]) > 0 and float(logs["r2"]) > 0
    assert all(0.0 <= float(logs[k]) <= 1.0 for k in ("d_acc", "d_acc_frame", "d_acc_global"))
    torch.testing.assert_close(loss.detach(), logs["loss_d_adv"] + logs["r1"] + logs["r2"])
    loss.backward()
    disc = stage.discriminator
    assert _grad_sum(disc.qformers) > 0 and _grad_sum(disc.local_head) > 0 and _grad_sum(disc.global_head) > 0
    assert _grad_sum(disc.backbone.blocks[0]) > 0  # the backbone trains too (train_d_backbone)
    assert _no_grads(*disc.unused_modules())
    assert _no_grads(stage.student, stage.ema.shadow, stage.cond)  # the fake is a detached rollout


def test_generator_update_learns_only_through_the_discriminators_judgement(files):  # noqa: F811
    stage = _stage(files, grad_chunks=1)
    batch = prompt_batch(["a", "b"])  # two chunks; only the last carries gradient
    trainable = [p.requires_grad for p in stage.discriminator.parameters()]
    fakes = []
    rollout = stage.rollout
    stage.rollout = lambda *a, **k: fakes.append(rollout(*a, **k)) or fakes[-1]
    with frozen(stage.discriminator):
        loss, _ = stage.generator_step_loss(batch)
        assert all(not p.requires_grad for p in stage.discriminator.parameters())
        x_g, chunks = fakes[0]
        assert chunks == [1]
        # chain rule: the student's gradient is dL/dx_g (the discriminator's judgement of the sample) pulled back
        # through the frames of the chunk with gradient only
        (g_x,) = torch.autograd.grad(loss, x_g, retain_graph=True)
        assert g_x[:, :, 1:].abs().sum() > 0
        params = list(stage.student.parameters())
        via_sample = torch.autograd.grad((g_x[:, :, 4:] * x_g[:, :, 4:]).sum(), params, retain_graph=True)
        loss.backward()
    assert [p.requires_grad for p in stage.discriminator.parameters()] == trainable  # restored after the update
    assert _grad_sum(stage.student) > 0
    for p, g in zip(params, via_sample, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    assert _no_grads(stage.discriminator, stage.ema.shadow, stage.cond)


def test_a_discriminator_without_judgement_gives_the_generator_nothing(files):  # noqa: F811
    """With constant logits (zeroed output projections) the generator loss is constant: zero gradient."""
    stage = _stage(files)
    with torch.no_grad():
        for lin in (stage.discriminator.local_head, stage.discriminator.global_head.proj):
            lin.weight.zero_()
    with frozen(stage.discriminator):
        loss, _ = stage.generator_step_loss(prompt_batch(["a", "b"], t=ONE_CHUNK))
        loss.backward()
    grads = [p.grad for p in stage.student.parameters() if p.grad is not None]
    assert grads and all(not g.any() for g in grads)


def test_discriminator_starts_from_the_teacher_and_nothing_else_is_kept(files):  # noqa: F811
    stage = _stage(files)
    teacher = load_model(files["teacher"], arch="dit")
    for a, b in zip(stage.discriminator.backbone.state_dict().values(), teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not hasattr(stage, "teacher")
    stage.train()
    assert not stage.cond.vae.training and not stage.cond.audio.training
    assert all(not p.requires_grad for p in stage.cond.parameters())
    # the D's unused parts are frozen for good (DDP would wait for their gradients)
    assert all(not p.requires_grad for m in stage.discriminator.unused_modules() for p in m.parameters())


def test_text_context_reaches_the_student_and_the_discriminator(files, tmp_path):  # noqa: F811
    context = torch.randn(4, 32)  # [L, text_dim] of the tiny preset
    torch.save(context, tmp_path / "context.pt")
    stage = _stage(files, text_context=str(tmp_path / "context.pt"))
    for net in (stage.student, stage.ema.shadow, stage.discriminator.backbone):
        torch.testing.assert_close(net.fixed_text_context, context)


def test_ablations_global_branch_off_and_unconditioned_discriminator(files):  # noqa: F811
    stage = _stage(files, global_branch=False, d_audio=False, penalty="none")
    assert stage.discriminator.global_head is None
    loss, logs = stage.discriminator_step_loss(prompt_batch(["a", "b"], t=ONE_CHUNK))
    assert float(logs["r1"]) == 0 and float(logs["r2"]) == 0
    loss.backward()
    audio = [p for n, p in stage.discriminator.backbone.named_parameters() if "audio" in n or "interact" in n]
    assert audio and all(not p.requires_grad and p.grad is None for p in audio)
    frozen_backbone = _stage(files, train_d_backbone=False)
    trainable = {n for n, p in frozen_backbone.discriminator.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)


def test_schedule_warmup_and_update_ratio(files):  # noqa: F811
    stage = _stage(files, d_warmup_steps=2, generator_every=3)
    assert [stage.generator_due(s) for s in range(9)] == [False, False, True, False, False, True, False, False, True]
    opt_d, opt_g = stage.configure_optimizers()
    assert opt_d.param_groups[0]["lr"] == pytest.approx(stage.hparams.lr * stage.hparams.d_lr_multiplier)
    fast = _stage(files, lr=1e-4, d_lr_multiplier=4.0)
    opt_d, opt_g = fast.configure_optimizers()
    assert opt_d.param_groups[0]["lr"] == pytest.approx(4e-4) and opt_g.param_groups[0]["lr"] == pytest.approx(1e-4)
    d_params = {id(p) for p in opt_d.param_groups[0]["params"]}
    assert d_params == {id(p) for p in fast.discriminator.parameters() if p.requires_grad}
    assert {id(p) for p in opt_g.param_groups[0]["params"]} == {id(p) for p in fast.student.parameters()}


def test_accuracy_monitor_warns_once_when_stuck(files):  # noqa: F811
    stage = _stage(files, saturation_steps=5, saturation_margin=0.05)
    for _ in range(10):
        stage._monitor_accuracy(torch.tensor(0.5))
    assert stage._saturated() == 0.0
    with pytest.warns(UserWarning, match="always beats the generator") as record:
        for _ in range(60):
            stage._monitor_accuracy(torch.tensor(1.0))
    assert len(record) == 1 and stage._saturated() == 1.0
    for _ in range(3):
        stage._monitor_accuracy(torch.tensor(0.0))
    assert stage._saturated() == 0.0  # left the band: the count restarts
    with pytest.warns(UserWarning, match="collapsed"):
        for _ in range(60):
            stage._monitor_accuracy(torch.tensor(0.0))


def _loader(batches: int, t: int = ONE_CHUNK) -> DataLoader:
    return DataLoader([prompt_batch(["a", "b"], t=t, seed=i) for i in range(batches)], batch_size=None)


def _trainer(root, epochs: int = 1) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    )


def test_fit_updates_the_right_networks_exports_and_resumes(files, tmp_path):  # noqa: F811
    kw = {"d_warmup_steps": 1, "generator_every": 1, "ema_decay": 0.5, "export_dir": str(tmp_path)}
    stage = _stage(files, **kw)
    before = {name: _snapshot(getattr(stage, name)) for name in ("student", "discriminator", "cond")}
    ema_before = _snapshot(stage.ema.shadow)
    _trainer(tmp_path).fit(stage, train_dataloaders=_loader(2))  # step 0: D only (warm-up); step 1: D + G
    assert (int(stage.gan_step), int(stage.generator_steps)) == (2, 1)
    assert _changed(stage.student, before["student"]) and _changed(stage.discriminator, before["discriminator"])
    assert _changed(stage.ema.shadow, ema_before) and not _changed(stage.cond, before["cond"])

    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert len(ckpt["optimizer_states"]) == 2
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith("cond.") for k in keys)
    assert {"gan_step", "generator_steps", "d_acc_ema", "saturated_steps"} <= set(keys)
    assert any(k.startswith("discriminator.qformers.") for k in keys) and any(k.startswith("ema.shadow.") for k in keys)
    exported = load_model(tmp_path / "student.safetensors", arch="dit")
    for a, b in zip(exported.state_dict().values(), stage.ema.shadow.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert exported.file_extra["stage"] == "stage2_gan"

    resumed = _stage(files, **kw)
    _trainer(tmp_path, epochs=2).fit(resumed, train_dataloaders=_loader(2), ckpt_path=str(last))
    assert (int(resumed.gan_step), int(resumed.generator_steps)) == (4, 3)  # no second warm-up after a resume


def test_validation_reports_metrics_against_the_real_window(files, tmp_path):  # noqa: F811
    stage = _stage(files, export_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(stage, dataloaders=_loader(2))
    for name in ("val/psnr", "val/latent_mse", "val/latent_fd", "val/d_acc"):
        assert name in metrics and torch.isfinite(torch.tensor(metrics[name])), (name, metrics)
    # the same noises every validation: the metrics repeat exactly
    (again,) = trainer.validate(stage, dataloaders=_loader(2))
    assert again["val/psnr"] == pytest.approx(metrics["val/psnr"], rel=1e-6)


def test_psnr():
    a = torch.zeros(2, 3, 4, 8, 8)
    b = a.clone()
    b[1] += 0.2  # mse 0.04 over a data range of 2: 10 log10(4 / 0.04) = 20 dB
    torch.testing.assert_close(psnr(a, b)[1], torch.tensor(20.0))
    assert psnr(a, b)[0] > 90


def test_bad_arguments_and_batches_fail_clearly(files):  # noqa: F811
    with pytest.raises(ValueError, match="min_sigma"):
        _stage(files, min_sigma=0.5, max_sigma=0.4)
    with pytest.raises(ValueError, match="penalty"):
        _stage(files, penalty="approximate")
    with pytest.raises(ValueError, match="no loss"):
        _stage(files, frame_weight=0.0, global_branch=False)
    with pytest.raises(ValueError, match="feature_layers"):
        _stage(files, feature_layers=[0, 7, 1])
    stage = _stage(files)
    batch = prompt_batch(["a"], t=ONE_CHUNK)
    with pytest.raises(ValueError, match="SpeakerVidDataModule"):
        stage.discriminator_step_loss({k: v for k, v in batch.items() if k != "video"})
    with pytest.raises(ValueError, match="multiple of 12"):
        stage.discriminator_step_loss(prompt_batch(["a"], t=8))
