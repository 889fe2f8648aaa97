"""Teacher stage: a CPU smoke run on tiny presets; gradients reach the DiT only; predict writes mp4 + audio."""

from __future__ import annotations

import av
import pytest
import torch

from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.stages.teacher import TeacherStage
from dystream.zoo.files import save_model


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    torch.manual_seed(0)
    return str(save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), path, arch="vae"))


def _batch(b: int = 2, t: int = 8, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    video = torch.rand(b, 3, t, size, size, generator=g) * 2 - 1
    return {
        "video": video,
        "references": video[:, :, :1].transpose(1, 2).clone(),
        "audio_self": torch.randn(b, t * 640, generator=g) * 0.1,
        "audio_other": torch.randn(b, t * 640, generator=g) * 0.1,
        "mask": (torch.arange(t) < t // 2).float().expand(b, t).clone(),
        "key": [f"clip{i}" for i in range(b)],
    }


def test_training_step_updates_the_dit_only(vae_file, tmp_path):
    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path), warmup_steps=1)
    loss = stage.training_step(_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.dit.parameters())
    for frozen in (stage.cond.vae, stage.cond.audio, stage.ema.shadow):
        assert all(p.grad is None for p in frozen.parameters())
        assert not frozen.training
    stage.train()
    assert not stage.cond.vae.training and not stage.cond.audio.training  # frozen networks stay in eval mode


def test_loss_goes_down_on_a_fixed_batch(vae_file, tmp_path):
    torch.manual_seed(0)
    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path), p_drop_talk=0, p_drop_listen=0, p_drop_reference=0)
    batch = _batch()
    opt = torch.optim.AdamW(stage.dit.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss, _ = stage._loss(batch, generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_cosine_schedule_warms_up_then_decays_the_teacher_lr_to_the_floor(vae_file, tmp_path):
    import lightning as L

    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path), lr=1e-3, warmup_steps=2, lr_schedule="cosine",
                         min_lr_ratio=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="TeacherStage.lr_schedule"):
        stage.configure_optimizers()  # no trainer: no max_steps to decay towards
    stage.trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    config = stage.configure_optimizers()
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # linear warm-up
    assert lrs[7] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert lrs[12] == pytest.approx(1e-4) and lrs[13] == pytest.approx(1e-4)  # the floor at max_steps, then held
    constant = TeacherStage(vae=vae_file, export_dir=str(tmp_path), lr=1e-3, warmup_steps=2)
    constant.trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert constant.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0](11) == 1.0


def test_predict_writes_mp4_with_audio_of_the_right_duration(vae_file, tmp_path):
    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path), sample_steps=2)
    batch = _batch(b=1, t=8)
    (path,) = stage.predict_step(batch, 0)
    with av.open(path) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.frames == 8
        seconds = float(audio.duration * audio.time_base)
        assert abs(seconds - 8 / 25) < 0.1


def test_export_writes_loadable_teacher_and_audio(vae_file, tmp_path):
    from dystream.zoo.files import load_model

    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path))
    stage.export()
    dit = load_model(tmp_path / "teacher.safetensors", arch="dit")
    audio = load_model(tmp_path / "audio.safetensors", arch="audio")
    for a, b in zip(dit.state_dict().values(), stage.ema.shadow.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert audio.feature_dim == stage.cond.audio_dim


def test_dit_overrides_reach_the_export_and_the_students_built_from_it(vae_file, tmp_path):
    from dystream.stages.stage1_sid import SiDStage

    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path), dit_overrides={"audio_lookbehind_frames": 6})
    assert stage.dit.config.audio_lookbehind_frames == 6
    assert stage.dit.audio_proj.pos.shape[0] == 6 + 4 + stage.dit.config.audio_lookahead_frames
    stage._loss(_batch())[0].backward()  # the whole-clip forward pads the look-behind before the first frame
    stage.export()
    teacher, audio = str(tmp_path / "teacher.safetensors"), str(tmp_path / "audio.safetensors")
    sid = SiDStage(student=teacher, teacher=teacher, vae=vae_file, audio=audio)
    assert sid.student.config.audio_lookbehind_frames == sid.teacher.config.audio_lookbehind_frames == 6
    with pytest.raises(ValueError, match="audio_lookbehind_frames must be >= 0"):
        TeacherStage(vae=vae_file, export_dir=str(tmp_path), dit_overrides={"audio_lookbehind_frames": -1})


def test_export_records_the_training_shift_and_later_stages_default_to_it(vae_file, tmp_path):
    from dystream.diffusion.schedule import student_sigmas
    from dystream.stages.common import WAN_SHIFT, teacher_shift
    from dystream.stages.stage1_sid import SiDStage

    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path), shift=1.5)
    stage.export()
    teacher = str(tmp_path / "teacher.safetensors")
    assert teacher_shift(teacher) == 1.5
    assert teacher_shift(teacher, 3.0) == 3.0  # an explicit value wins
    bare = save_model(stage.dit, tmp_path / "bare.safetensors", arch="dit")  # no record: Wan2.2's shift
    assert teacher_shift(str(bare)) == WAN_SHIFT
    audio = str(tmp_path / "audio.safetensors")
    sid = SiDStage(student=teacher, teacher=teacher, vae=vae_file, audio=audio)
    assert sid.shift == sid.sigma_shift == 1.5
    assert torch.equal(sid.sigmas, student_sigmas(3, 1.5))
    assert not torch.equal(sid.sigmas, student_sigmas(3, WAN_SHIFT))


def test_stage_optimisers_use_the_fused_adamw_with_the_same_update(vae_file, tmp_path):
    """`stages.common.adamw` picks torch's fused kernel for plain CPU parameters; its steps equal the per-parameter
    loop's (float rounding), so the faster optimiser changes no result."""
    import lightning as L

    from dystream.stages.common import adamw

    stage = TeacherStage(vae=vae_file, export_dir=str(tmp_path))
    opt = stage.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    # under a mixed-precision plugin Lightning refuses to clip a fused optimiser's gradients: the loop then
    stage.trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False)
    assert not stage.configure_optimizers()["optimizer"].defaults["fused"]
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = adamw(None, a, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    loop = torch.optim.AdamW(b, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01, foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for params, opt in ((a, fused), (b, loop)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        assert not torch.equal(x, torch.zeros_like(x))
    meta = torch.nn.Parameter(torch.randn(3, device="meta"))
    assert not adamw(None, [meta], lr=1e-3).defaults["fused"]  # another device: the default implementation
