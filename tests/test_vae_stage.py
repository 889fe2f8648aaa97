"""VAEStage: training on a fixed batch lowers the loss, the GAN phase, validation statistics, export, LPIPS."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dystream.datamodules.latents import load_vae
from dystream.objectives.vae import build_lpips, generator_adversarial_loss, hinge_discriminator_loss, kl_loss
from dystream.stages.vae import VAEStage
from dystream.zoo.files import load_model


def _batch(b: int = 2, t: int = 4, r: int = 3, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    # Smooth, structured frames (a moving gradient), so a few steps can really fit them.
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    frames = []
    for i in range(t + r):
        phase = 0.3 * i
        frames.append(torch.stack([torch.sin(3 * xs + phase), torch.cos(2 * ys - phase), xs * ys]))
    frames = torch.stack(frames, dim=1)  # [3, t + r, H, W]
    video = frames[:, r:].expand(b, -1, -1, -1, -1) * (0.5 + 0.5 * torch.rand(b, 1, 1, 1, 1, generator=g))
    refs = frames[:, :r].transpose(0, 1).expand(b, -1, -1, -1, -1).clone()
    return {"video": video.contiguous(), "references": refs, "key": [f"clip{i}" for i in range(b)]}


class _Repeat(Dataset):
    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


def _loader(batch: dict, n: int) -> DataLoader:
    return DataLoader(_Repeat(batch, n), batch_size=None)


class _Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.l1: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        self.l1.append(float(trainer.callback_metrics["train/l1"]))


def _trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    stage = VAEStage(lr=1e-3, disc_weight=0.0, max_references=2, sample_posterior=False, export_dir=str(tmp_path))
    record = _Record()
    trainer = _trainer(tmp_path, 16, callbacks=[record])
    trainer.fit(stage, _loader(_batch(), 16))
    assert trainer.global_step == 16
    assert all(torch.isfinite(torch.tensor(record.losses)))
    first, last = record.l1[0], sum(record.l1[-3:]) / 3
    assert last < 0.7 * first, record.l1


def test_gan_phase_trains_discriminator_and_counts_iterations(tmp_path):
    stage = VAEStage(disc_weight=0.05, disc_start=2, max_references=1, export_dir=str(tmp_path))
    d_before = [p.detach().clone() for p in stage.disc.parameters()]
    trainer = _trainer(tmp_path, 4)
    trainer.fit(stage, _loader(_batch(), 4))
    # Two optimizers step per iteration, but global_step (max_steps, disc_start) counts iterations.
    assert trainer.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(d_before, stage.disc.parameters(), strict=True))
    assert {"train/gan_d", "train/gan_g", "train/d_weight"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/d_weight"])


def test_fixed_gan_weight_is_the_weight_and_reaches_the_decoder(tmp_path):
    stage = VAEStage(disc_weight=0.01, disc_weighting="fixed", disc_start=0, max_references=1, export_dir=str(tmp_path))
    trainer = _trainer(tmp_path, 2)
    trainer.fit(stage, _loader(_batch(), 2))
    assert float(trainer.callback_metrics["train/d_weight"]) == pytest.approx(0.01)
    # the generator's adversarial term alone sends a gradient to the decoder and none to the discriminator
    clip, guidance = stage.clip_and_references(_batch(), 1)
    stage.disc.requires_grad_(False)
    stage.vae.zero_grad(set_to_none=True)
    stage.disc.zero_grad(set_to_none=True)
    generator_adversarial_loss(stage.disc(stage.vae(clip, guidance, sample=False).recon)).backward()
    assert stage.vae.last_layer.grad is not None and stage.vae.last_layer.grad.abs().sum() > 0
    assert all(p.grad is None for p in stage.disc.parameters())


def test_discriminator_untouched_before_disc_start(tmp_path):
    stage = VAEStage(disc_weight=0.05, disc_start=100, export_dir=str(tmp_path))
    d_before = [p.detach().clone() for p in stage.disc.parameters()]
    _trainer(tmp_path, 2).fit(stage, _loader(_batch(), 2))
    assert all(torch.equal(a, b) for a, b in zip(d_before, stage.disc.parameters(), strict=True))


def test_validation_sets_latent_statistics_and_exports(tmp_path):
    batch = _batch()
    stage = VAEStage(disc_weight=0.0, max_references=2, export_dir=str(tmp_path / "export"))
    trainer = _trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(stage, _loader(batch, 2), _loader(batch, 1))
    metrics = trainer.callback_metrics
    assert {"val/psnr", "val/ssim", "val/l1", "val/psnr_k0"} <= set(metrics)
    assert float(metrics["val/psnr"]) > 0
    # The statistics come from the validation batch: its normalised posterior mean has unit scale.
    stage.eval()
    with torch.no_grad():
        clip, guidance = stage.clip_and_references(batch, 2)
        z = stage.vae.encode(clip, guidance)
    per_channel = z.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    # Export: a self-describing file that rebuilds the same VAE, statistics included.
    path = stage.export()
    vae = load_model(path, arch="vae")
    assert torch.equal(vae.latent_std, stage.vae.latent_std)
    assert vae.file_extra["latent_stats_from_data"] is True
    # A Lightning checkpoint of the stage loads too (weights_only=True), for `dystream data encode --vae x.ckpt`.
    trainer.save_checkpoint(tmp_path / "stage.ckpt")
    from_ckpt = load_vae(tmp_path / "stage.ckpt")
    for (name, a), (_, b) in zip(from_ckpt.state_dict().items(), stage.vae.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_batches_raise_clearly(tmp_path):
    stage = VAEStage(min_references=2, max_references=3, export_dir=str(tmp_path))
    with pytest.raises(ValueError, match="multiple of 4"):
        stage.clip_and_references(_batch(t=6), 0)
    with pytest.raises(KeyError, match="references"):
        stage.clip_and_references({"video": torch.zeros(1, 3, 4, 16, 16)}, 0)
    with pytest.raises(ValueError, match="num_references"):
        stage._draw_k(1)
    with pytest.raises(ValueError, match="min_references"):
        VAEStage(min_references=3, max_references=1)


def test_lpips_needs_a_backbone_file(tmp_path):
    assert build_lpips("vgg", None) is None
    with pytest.warns(UserWarning, match="WITHOUT the LPIPS"):
        VAEStage(export_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="torchvision vgg16"):
        build_lpips("vgg", tmp_path / "missing.pth")


def test_lpips_from_a_torchvision_state_dict(tmp_path):
    import torchvision

    features = torchvision.models.alexnet(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "alex.pth")
    net = build_lpips("alex", tmp_path / "alex.pth")
    assert torch.equal(net.net.slice1[0].weight, features[0].weight)  # the backbone came from the file
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x, x).abs().max() < 1e-6 and net(x, -x).mean() > 0
    stage = VAEStage(
        lpips_net="alex", lpips_backbone=str(tmp_path / "alex.pth"), disc_weight=0.0, export_dir=str(tmp_path)
    )
    assert not any(k.startswith("_lpips") or "lin0" in k for k in stage.state_dict())  # not checkpointed
    trainer = _trainer(tmp_path, 1)
    trainer.fit(stage, _loader(_batch(size=32), 1))  # AlexNet's pooling needs frames of at least 32 pixels
    assert "train/lpips" in trainer.callback_metrics


def test_objective_terms():
    assert kl_loss(torch.zeros(4), torch.zeros(4)) == 0
    assert kl_loss(torch.ones(4), torch.zeros(4)) == pytest.approx(0.5)
    real, fake = torch.full((3,), 2.0), torch.full((3,), -2.0)
    assert hinge_discriminator_loss(real, fake) == 0  # both beyond the margin
    assert hinge_discriminator_loss(torch.zeros(3), torch.zeros(3)) == pytest.approx(1.0)


def _face_kpts(b: int, t: int, box: tuple[float, float, float, float]) -> torch.Tensor:
    """dwpose134 keypoints whose face group spans ``box`` (x0, y0, x1, y1); every other point unconfident."""
    from dystream.datamodules.keypoints import FACE, NUM_KEYPOINTS

    kpts = torch.zeros(b, t, NUM_KEYPOINTS, 3)
    n = FACE.stop - FACE.start
    x0, y0, x1, y1 = box
    kpts[:, :, FACE, 0] = torch.linspace(x0, x1, n)
    kpts[:, :, FACE, 1] = torch.linspace(y0, y1, n).flip(0)
    kpts[:, :, FACE, 2] = 1.0
    return kpts


def test_face_box_mask_and_region_l1_match_a_direct_computation():
    from dystream.datamodules.keypoints import FACE
    from dystream.objectives.vae import keypoint_box_mask, region_l1_loss

    kpts = _face_kpts(2, 3, (4.0, 2.0, 8.0, 10.0))
    kpts[1, 2, :, 2] = 0.0  # a frame without a face
    mask = keypoint_box_mask(kpts, FACE, 16, 16, pad=0.25)  # box 4..8 x 2..10, padded by 1 and 2 px
    expected = torch.zeros(16, 16)
    expected[0:12, 3:9] = 1  # pixel centres j + 0.5 in [3, 9] and i + 0.5 in [0, 12]
    assert torch.equal(mask[0, 0], expected)
    assert mask[1, 2].sum() == 0
    recon = torch.randn(2, 3, 3, 16, 16, requires_grad=True)
    target = torch.randn(2, 3, 3, 16, 16)
    loss = region_l1_loss(recon, target, mask)
    sel = mask[:, None].expand_as(recon).bool()
    assert loss.item() == pytest.approx((recon - target).abs()[sel].mean().item(), rel=1e-6)
    loss.backward()
    assert torch.all(recon.grad[~sel] == 0) and torch.all(recon.grad[sel] != 0)  # only face pixels get a gradient


def test_colour_term_sees_a_tint_but_not_a_zero_mean_error(tmp_path):
    from dystream.objectives.vae import colour_l1_loss, l1_loss

    target = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    pattern = torch.randn(2, 3, 4, 8, 8)
    pattern = pattern - pattern.mean(dim=(-2, -1), keepdim=True)  # per-frame zero mean: texture, no tint
    assert colour_l1_loss(target + pattern, target).item() == pytest.approx(0.0, abs=1e-6)
    assert l1_loss(target + pattern, target).item() > 0.5  # while the per-pixel L1 pays for it
    tint = torch.tensor([0.02, -0.01, 0.0]).view(1, 3, 1, 1, 1)
    recon = (target + tint).requires_grad_()
    assert colour_l1_loss(recon, target).item() == pytest.approx(0.01, rel=1e-4)  # mean of |0.02|, |-0.01|, 0
    colour_l1_loss(recon, target).backward()
    grad = recon.grad
    assert torch.all(grad[:, 0] > 0) and torch.all(grad[:, 1] < 0)  # every pixel is pushed against its tint
    assert torch.allclose(grad[:, 0], grad[0, 0, 0, 0, 0].expand_as(grad[:, 0]))  # evenly
    with pytest.raises(ValueError, match="colour_l1_loss"):
        colour_l1_loss(recon[:, :, 0], target[:, :, 0])
    stage = VAEStage(colour_weight=1.0, disc_weight=0.0, max_references=1, export_dir=str(tmp_path))
    _trainer(tmp_path, 2).fit(stage, _loader(_batch(), 2))
    assert "train/colour_l1" in stage.trainer.logged_metrics


def test_face_weight_adds_the_face_term_and_needs_keypoints(tmp_path):
    batch = _batch(t=4)
    stage = VAEStage(face_weight=2.0, disc_weight=0.0, export_dir=str(tmp_path))
    with pytest.raises(KeyError, match="face_weight"):
        stage.face_l1(batch, torch.zeros(2, 3, 5, 16, 16), torch.zeros(2, 3, 5, 16, 16))
    batch["kpts"] = _face_kpts(2, 4, (4.0, 4.0, 10.0, 10.0))
    clip = torch.zeros(2, 3, 5, 16, 16)
    recon = clip.clone()
    recon[:, :, 0] = 1.0  # an error on the reference frame only: it has no keypoints, so no face loss
    assert stage.face_l1(batch, recon, clip).item() == 0.0
    recon[:, :, 1:, 5, 5] = 1.0  # an error inside the face box
    assert stage.face_l1(batch, recon, clip).item() > 0.0
    _trainer(tmp_path, 2).fit(stage, _loader(batch, 2))


def test_mouth_and_hands_weights_cover_only_their_boxes_and_train(tmp_path):
    from dystream.datamodules.keypoints import LEFT_HAND, MOUTH, NUM_KEYPOINTS, RIGHT_HAND

    batch = _batch(t=4)
    kpts = torch.zeros(2, 4, NUM_KEYPOINTS, 3)
    for group, (x0, y0, x1, y1) in ((MOUTH, (6.0, 10.0, 9.0, 11.0)), (LEFT_HAND, (1, 1, 3, 3)),
                                    (RIGHT_HAND, (12, 12, 14, 14))):  # fmt: skip
        n = group.stop - group.start
        kpts[:, :, group, 0] = torch.linspace(x0, x1, n)
        kpts[:, :, group, 1] = torch.linspace(y0, y1, n)
        kpts[:, :, group, 2] = 1.0
    batch["kpts"] = kpts
    stage = VAEStage(mouth_weight=8.0, hands_weight=4.0, disc_weight=0.0, export_dir=str(tmp_path))
    clip = torch.zeros(2, 3, 5, 16, 16)
    hp = stage.hparams
    mouth = lambda r: stage.region_l1(batch, r, clip, (MOUTH,), hp.mouth_pad).item()  # noqa: E731
    hands = lambda r: stage.region_l1(batch, r, clip, (LEFT_HAND, RIGHT_HAND), hp.hands_pad).item()  # noqa: E731
    recon = clip.clone()
    recon[:, :, 1:, 2, 2] = 1.0  # inside the left hand's box only
    assert mouth(recon) == 0.0 and hands(recon) > 0.0
    recon = clip.clone()
    recon[:, :, 1:, 13, 13] = 1.0  # the right hand counts too
    assert hands(recon) > 0.0
    recon = clip.clone()
    recon[:, :, 1:, 10, 7] = 1.0  # on the lips
    assert mouth(recon) > 0.0 and hands(recon) == 0.0
    recon[:, :, 1:, 2, 12] = 1.0  # and an error outside every box changes neither term
    assert hands(recon) == 0.0
    _trainer(tmp_path, 2).fit(stage, _loader(batch, 2))
    assert {"train/mouth_l1", "train/hands_l1"} <= set(stage.trainer.logged_metrics)


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    from dystream.stages.common import lr_factor as _lr_factor

    f = [_lr_factor(s, warmup=10, total=110, cosine=True, floor=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)  # half-way down the cosine
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)  # the floor, then held
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert _lr_factor(500, warmup=10, total=110, cosine=False, floor=0.1) == 1.0


def test_cosine_schedule_steps_the_vae_optimizer(tmp_path):
    batch = _batch()
    stage = VAEStage(lr=1e-3, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.0, disc_weight=0.0,
                     max_references=1, export_dir=str(tmp_path))  # fmt: skip
    _trainer(tmp_path, max_steps=6).fit(stage, _loader(batch, 6))
    lr = stage.optimizers().param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 4)), abs=1e-9)  # at the end: 0


def test_architecture_overrides_the_preset_and_is_exported(tmp_path):
    stage = VAEStage(architecture={"widths": [36, 72, 144], "head_dim": 36}, disc_weight=0.0, export_dir=str(tmp_path))
    assert stage.vae.config.widths == (36, 72, 144) and stage.vae.config.latent_channels == 16
    vae = load_vae(str(stage.export()))
    assert vae.config.widths == (36, 72, 144)
    with pytest.raises(ValueError, match="VAEStage.architecture"):
        VAEStage(architecture={"width": [36, 72, 144]}, disc_weight=0.0)


def test_export_architecture_reaches_the_export_only(tmp_path):
    """The copy scales of ``export_architecture`` are in the exported file, and the file decodes with them; the
    stage keeps training with the trained ones. A name that is not a copy scale is refused before training."""
    stage = VAEStage(export_architecture={"copy_logit_scale": 2.0, "copy_gate_scale": 1.5}, disc_weight=0.0,
                     export_dir=str(tmp_path))  # fmt: skip
    vae = load_vae(str(stage.export()))
    assert (vae.config.copy_logit_scale, vae.config.copy_gate_scale) == (2.0, 1.5)
    assert (vae.decoder.copy_head.logit_scale, vae.decoder.copy_head.gate_scale) == (2.0, 1.5)
    head = stage.vae.decoder.copy_head
    assert (stage.vae.config.copy_gate_scale, head.logit_scale, head.gate_scale) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"VAEStage.export_architecture: \['widths'\] are not copy scales"):
        VAEStage(export_architecture={"widths": [36, 72, 144]}, disc_weight=0.0)


def _cartoon_batch(size: int = 32, t: int = 4) -> dict:
    """Two cartoon clips (a flat disc and a bar moving over a vertical gradient, as in the synthetic world)."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )

    def frame(j: int, colour: tuple[int, int, int]) -> torch.Tensor:
        f = torch.stack([60 + 2 * ys, 80 + ys, 160 + ys], dim=-1)
        cy, cx = size / 2 + 0.7 * j, size / 2 - 0.5 * j
        f[(ys - cy) ** 2 + (xs - cx) ** 2 < (size / 4) ** 2] = torch.tensor(colour, dtype=f.dtype)
        f[((ys - 24).abs() < 3) & ((xs - cx).abs() < 10)] = torch.tensor((200.0, 40.0, 140.0), dtype=f.dtype)
        return f.clamp(0, 255).round()

    clips = torch.stack([torch.stack([frame(j, c) for j in range(t + 1)]) for c in ((190, 120, 70), (90, 60, 40))])
    x = (clips.permute(0, 4, 1, 2, 3) / 127.5 - 1).float()  # [2, 3, 1 + t, H, W]
    return {"video": x[:, :, 1:].contiguous(), "references": x[:, :, :1].transpose(1, 2).contiguous()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_recipe_optimiser_fits_a_fixed_batch_without_grain_or_tint(tmp_path, precision):
    """The embedded recipe's optimiser settings on a tiny fixed cartoon batch: no grain (high-frequency energy ratio
    near 1; Adam betas (0.5, 0.9) at a constant 1e-3, the old recipe, gave 1.58 here) and no tint (< 2/255), in
    float32 and in bf16-mixed (docs/vae.md, row ad: bf16 rounding must not come back as grain or a tint)."""
    from pathlib import Path

    import yaml

    from dystream.cli import cpu_has_native_bf16
    from dystream.evaluation.reconstruction import reconstruction_quality

    if precision.startswith("bf16") and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX); bf16-mixed is not what it would train in")
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "vae.yaml").read_text())["model"]["init_args"]
    keys = ("lr", "beta1", "beta2", "lr_schedule", "warmup_steps", "min_lr_ratio", "sample_posterior", "kl_weight")
    torch.manual_seed(0)
    stage = VAEStage(**{k: recipe[k] for k in keys if k in recipe}, disc_weight=0.0, face_weight=0.0,
                     max_references=0, export_dir=str(tmp_path))  # fmt: skip
    batch = _cartoon_batch()
    _trainer(tmp_path, max_steps=150, precision=precision).fit(stage, _loader(batch, 150))
    clip, _ = stage.clip_and_references(batch, 0)
    with torch.no_grad():
        recon = stage.vae(clip, None, sample=False).recon
    to_uint8 = lambda v: ((v.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()  # noqa: E731
    q = reconstruction_quality(to_uint8(recon), to_uint8(clip))
    assert 0.7 < q["hf_ratio"] < 1.25, q
    assert q["colour_error_max"] < 2.0, q
    assert q["psnr"] > 25.0, q


@pytest.mark.parametrize("estimate_weight", [0.0, 0.5])
def test_estimate_term_trains_the_drawing_that_an_open_copy_gate_hides(tmp_path, estimate_weight):
    """With the copy gate fully open the output is the reference's pixels, so the output's loss leaves the decoder's
    own drawing (conv_out) without gradient; ``estimate_weight`` puts its pixel terms on that drawing."""
    stage = VAEStage(architecture={"reference_copy": True}, estimate_weight=estimate_weight, disc_weight=0.0,
                     lpips_weight=0.0, max_references=1, export_dir=str(tmp_path))  # fmt: skip
    head = stage.vae.decoder.copy_head
    with torch.no_grad():
        head.to_gate.bias.fill_(60.0)
    batch = _batch(size=32)
    clip, guidance = stage.clip_and_references(batch, 1)
    out = stage.vae(clip, guidance, sample=False)
    assert out.estimate is not None and out.estimate.shape == out.recon.shape
    nll, logs = stage.reconstruction_nll(batch, out, clip)
    nll.backward()
    grad = stage.vae.decoder.conv_out.weight.grad
    if estimate_weight == 0:
        assert grad is None or grad.abs().max().item() == 0.0
        assert "estimate_l1" not in logs
    else:
        assert grad.abs().max().item() > 0.0
        expected = (
            stage.pixel_losses(batch, out.recon, clip)[0]
            + estimate_weight * stage.pixel_losses(batch, out.estimate, clip)[0]
        )
        assert nll.item() == pytest.approx(expected.item(), rel=1e-6)
    no_copy = VAEStage(architecture={"reference_copy": False}, estimate_weight=0.5, disc_weight=0.0,
                       lpips_weight=0.0, export_dir=str(tmp_path))  # fmt: skip
    assert no_copy.vae(clip, guidance, sample=False).estimate is None  # nothing to add without a copy head


def test_copy_head_parts_recompose_the_output(tmp_path):
    """The copy head's estimate, copy and gate, returned for the gate term, are the ones that made the output:
    recon = estimate + gate (copy - estimate); without guidance there is no copy and no gate."""
    stage = VAEStage(architecture={"reference_copy": True}, disc_weight=0.0, lpips_weight=0.0, max_references=1,
                     export_dir=str(tmp_path))  # fmt: skip
    with torch.no_grad():
        stage.vae.decoder.copy_head.to_gate.weight.normal_(0.0, 0.1)  # a gate that varies over the frame
    batch = _batch(size=32)
    clip, guidance = stage.clip_and_references(batch, 1)
    out = stage.vae(clip, guidance, sample=False)
    assert out.copy.shape == out.copy_gate.shape == out.recon.shape
    assert out.copy_gate.std() > 0.01 and 0 <= out.copy_gate.min() and out.copy_gate.max() <= 1
    torch.testing.assert_close(out.recon, out.estimate + out.copy_gate * (out.copy - out.estimate))
    unguided = stage.vae(clip, None, sample=False)
    assert unguided.copy is None and unguided.copy_gate is None


def test_copy_gate_loss_is_the_cross_entropy_against_where_the_copy_is_right():
    from dystream.objectives.vae import copy_gate_loss

    g = torch.Generator().manual_seed(0)
    gate, copy, real = torch.rand(3, 2, 3, 2, 4, 4, generator=g)
    right = ((copy - real).abs() <= 0.3).float()
    direct = -(right * gate.log() + (1 - right) * (1 - gate).log()).mean()
    torch.testing.assert_close(copy_gate_loss(gate, copy, real, 0.3), direct)
    assert copy_gate_loss(right, copy, real, 0.3) < 1e-4  # a gate that knows where the copy is right pays nothing
    with pytest.raises(ValueError, match="must match"):
        copy_gate_loss(gate[:, :1], copy, real, 0.3)


@pytest.mark.parametrize("gate_weight", [0.0, 1.0])
def test_gate_term_trains_the_gate_towards_where_the_copy_is_right(tmp_path, gate_weight):
    """``gate_weight`` adds the gate's cross-entropy to the pixel terms; a few steps of it alone on a fixed batch
    (the moving gradient frames, whose references differ from them in places) lower it."""
    from dystream.objectives.vae import copy_gate_loss

    stage = VAEStage(architecture={"reference_copy": True}, gate_weight=gate_weight, disc_weight=0.0,
                     lpips_weight=0.0, max_references=1, export_dir=str(tmp_path))  # fmt: skip
    batch = _batch(size=32)
    clip, guidance = stage.clip_and_references(batch, 1)
    out = stage.vae(clip, guidance, sample=False)
    nll, logs = stage.reconstruction_nll(batch, out, clip)
    gate_bce = copy_gate_loss(out.copy_gate, out.copy, clip, stage.hparams.gate_tolerance)
    expected = stage.pixel_losses(batch, out.recon, clip)[0] + gate_weight * gate_bce
    assert nll.item() == pytest.approx(expected.item(), rel=1e-6)
    assert ("copy_gate_bce" in logs) == (gate_weight > 0)
    if gate_weight == 0:
        return
    head = stage.vae.decoder.copy_head
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = stage.vae(clip, guidance, sample=False)
        loss = copy_gate_loss(out.copy_gate, out.copy, clip, stage.hparams.gate_tolerance)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_edge_term_sees_a_blurred_edge_but_not_a_tint(tmp_path):
    from dystream.objectives.vae import edge_l1_loss

    target = torch.zeros(1, 3, 2, 8, 8)
    target[..., 4:] = 1.0  # a vertical step edge
    assert edge_l1_loss(target + 0.3, target).item() == pytest.approx(0.0, abs=1e-7)  # a tint: no gradient error
    blurred = target.clone()
    blurred[..., 3], blurred[..., 4] = 1 / 3, 2 / 3  # the same step spread over three pixels
    # Direct count: per row, the step of 1 becomes three steps of 1/3, so |error diff| = 1/3 + 1/3 + 2/3 over 7 columns
    assert edge_l1_loss(blurred, target).item() == pytest.approx((4 / 3) / 7, rel=1e-5)
    with pytest.raises(ValueError, match="edge_l1_loss"):
        edge_l1_loss(blurred[:, :, 0], target[:, :, 0])
    stage = VAEStage(edge_weight=1.0, disc_weight=0.0, lpips_weight=0.0, max_references=1, export_dir=str(tmp_path))
    _trainer(tmp_path, 2).fit(stage, _loader(_batch(), 2))
    assert "train/edge_l1" in stage.trainer.logged_metrics


@pytest.mark.parametrize("copy_weight", [0.0, 0.5])
def test_copy_term_teaches_the_warp_where_the_gate_is_closed(tmp_path, copy_weight):
    """``copy_weight`` adds the L1 of the copy itself: with the gate shut, the pixel loss gives the warp's flow no
    gradient, the copy term does; a few steps of it alone on a fixed batch lower it."""
    stage = VAEStage(architecture={"reference_copy": True, "copy_warp": True}, copy_weight=copy_weight,
                     disc_weight=0.0, lpips_weight=0.0, max_references=1, export_dir=str(tmp_path))  # fmt: skip
    head = stage.vae.decoder.copy_head
    with torch.no_grad():
        head.to_gate.bias.fill_(-200.0)  # sigmoid underflows to 0: the output is exactly the decoder's drawing
    batch = _batch(size=32)
    clip, guidance = stage.clip_and_references(batch, 1)
    out = stage.vae(clip, guidance, sample=False)
    nll, logs = stage.reconstruction_nll(batch, out, clip)
    expected = stage.pixel_losses(batch, out.recon, clip)[0] + copy_weight * (out.copy - clip).abs().mean()
    assert nll.item() == pytest.approx(expected.item(), rel=1e-6)
    assert ("copy_l1" in logs) == (copy_weight > 0)
    nll.backward()
    flow_grad = head.to_flow.weight.grad
    if copy_weight == 0:
        assert flow_grad is None or flow_grad.abs().max().item() == 0.0
        return
    assert flow_grad.abs().max().item() > 0.0
    opt = torch.optim.Adam([*head.to_flow.parameters(), *head.to_q.parameters(), *head.to_k.parameters()], lr=1e-2)
    losses = []
    for _ in range(20):
        out = stage.vae(clip, guidance, sample=False)
        loss = (out.copy - clip).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


def test_changed_pixels_are_where_the_frame_left_the_reference_and_the_term_weighs_them(tmp_path):
    """``changed_pixels`` marks exactly the pixels farther than the threshold from the clip's first frame (mean over
    channels), never the first frame itself; ``changed_weight`` adds the L1 over them to the pixel terms."""
    from dystream.objectives.vae import changed_pixels

    clip = torch.zeros(1, 3, 3, 8, 8)
    clip[:, :, 1, 2:4, 2:6] = 0.5  # moved in frame 1
    clip[:, 0, 2, 0, 0] = 0.25  # one channel by 0.25: 0.083 over the three, under the threshold
    changed = changed_pixels(clip, 0.1)
    expected = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    expected[:, 1, 2:4, 2:6] = True
    assert torch.equal(changed, expected)
    with pytest.raises(ValueError, match="changed_pixels"):
        changed_pixels(clip[:, :, 0], 0.1)

    stage = VAEStage(changed_weight=0.5, face_weight=0.0, disc_weight=0.0, lpips_weight=0.0, max_references=1,
                     export_dir=str(tmp_path))  # fmt: skip
    plain = VAEStage(face_weight=0.0, disc_weight=0.0, lpips_weight=0.0, max_references=1, export_dir=str(tmp_path))
    batch = _batch(size=32)
    clip, _ = stage.clip_and_references(batch, 1)
    video = clip + 0.1 * torch.randn_like(clip)
    nll, logs = stage.pixel_losses(batch, video, clip)
    mask = changed_pixels(clip, 0.1)
    assert 0 < mask.float().mean() < 1  # the moving test clip has both
    changed_l1 = ((video - clip).abs() * mask[:, None]).sum() / (mask.sum() * 3)  # mean over the changed values
    direct = plain.pixel_losses(batch, video, clip)[0] + 0.5 * changed_l1
    assert nll.item() == pytest.approx(direct.item(), rel=1e-6) and "changed_l1" in logs


class _GateValues(L.Callback):
    """Per training step: whether every copy-gate value of that step's forward pass was exactly 0 or 1."""

    def __init__(self) -> None:
        self.rounded: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        head = pl_module.vae.decoder.copy_head
        self._hook = head.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        gate = output[2]
        if gate is not None:
            self.rounded.append(bool(((gate == 0) | (gate == 1)).all()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._hook.remove()


def test_copy_gate_blends_for_its_soft_steps_then_is_rounded(tmp_path):
    """``copy_gate_soft_steps: 2`` with a rounded gate: steps 0-1 blend (gate values strictly between 0 and 1 exist),
    steps 2-3 pick the copy or the drawing; the export keeps the rounded gate."""
    stage = VAEStage(architecture={"reference_copy": True, "copy_gate_hard": True}, copy_gate_soft_steps=2,
                     disc_weight=0.0, lpips_weight=0.0, min_references=1, max_references=1,
                     export_dir=str(tmp_path))  # fmt: skip
    with torch.no_grad():
        stage.vae.decoder.copy_head.to_gate.weight.normal_(0.0, 0.5)  # a gate that varies over the frame
    gates = _GateValues()
    _trainer(tmp_path, 4, callbacks=[gates]).fit(stage, _loader(_batch(size=32), 4))
    assert gates.rounded == [False, False, True, True]
    loaded = load_model(stage.export(), arch="vae")
    assert loaded.config.copy_gate_hard


def test_copy_gate_soft_steps_need_a_rounded_gate():
    with pytest.raises(ValueError, match="copy_gate_soft_steps=10 needs a rounded copy gate.*copy_gate_hard: true"):
        VAEStage(architecture={"reference_copy": True}, copy_gate_soft_steps=10)


def test_validation_metrics_are_float32_under_bf16_autocast():
    """bf16-mixed validation runs the stage under autocast; SSIM's local variances (E[x^2] - E[x]^2) must still be
    computed in float32 (in bf16 they cancel: a 0.95-SSIM pair read 0.98, and training logs went negative)."""
    stage = VAEStage(disc_weight=0.0, lpips_weight=0.0, export_dir="unused")
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 4, 64, 64, generator=g) * 0.4
    recon = target + 0.04 * torch.randn(2, 3, 4, 64, 64, generator=g)
    exact = stage.reconstruction_metrics(recon, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = stage.reconstruction_metrics(recon.bfloat16(), target)
    assert exact["ssim"] < 0.97
    for name in ("psnr", "ssim"):
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], exact[name], rtol=0, atol=2e-3)


def test_shut_gate_loss_is_the_cross_entropy_against_the_drawing_inside_the_region():
    from dystream.objectives.vae import shut_gate_loss

    g = torch.Generator().manual_seed(0)
    gate = torch.rand(2, 3, 4, 8, 8, generator=g)
    region = torch.zeros(2, 4, 8, 8, dtype=torch.bool)
    region[:, 1:, 2:4, 3:6] = True
    inside = gate.permute(0, 2, 3, 4, 1)[region]  # [N, 3]
    torch.testing.assert_close(shut_gate_loss(gate, region), -(1 - inside).log().mean())
    outside_changed = torch.where(region[:, None], gate, torch.ones_like(gate) * 0.999)
    torch.testing.assert_close(shut_gate_loss(outside_changed, region), shut_gate_loss(gate, region))
    assert shut_gate_loss(gate, torch.zeros_like(region)) == 0.0
    with pytest.raises(ValueError, match="region must be"):
        shut_gate_loss(gate, region[:, :2])


def test_mouth_gate_term_shuts_the_copy_gate_over_the_lips_only(tmp_path):
    """``mouth_gate_weight`` adds the cross-entropy of the gate against 0 over the lips' boxes. The gate opened wide,
    then a few steps of the whole objective with and without the term: with it the gate shuts over the lips. Without
    keypoints the stage says what is missing."""
    from dystream.datamodules.keypoints import MOUTH, NUM_KEYPOINTS
    from dystream.objectives.vae import shut_gate_loss

    batch = _batch(t=4, size=32)
    kpts = torch.zeros(2, 4, NUM_KEYPOINTS, 3)
    n = MOUTH.stop - MOUTH.start
    kpts[:, :, MOUTH, 0] = torch.linspace(12.0, 20.0, n)
    kpts[:, :, MOUTH, 1] = torch.linspace(18.0, 22.0, n)
    kpts[:, :, MOUTH, 2] = 1.0
    batch["kpts"] = kpts
    gates = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        stage = VAEStage(architecture={"reference_copy": True}, mouth_gate_weight=weight, disc_weight=0.0,
                         lpips_weight=0.0, min_references=1, max_references=1, export_dir=str(tmp_path))  # fmt: skip
        clip, guidance = stage.clip_and_references(batch, 1)
        lips = stage.region_mask(batch, clip, (MOUTH,), stage.hparams.mouth_pad) > 0
        out = stage.vae(clip, guidance, sample=False)
        nll, logs = stage.reconstruction_nll(batch, out, clip)
        expected = stage.pixel_losses(batch, out.recon, clip)[0] + weight * shut_gate_loss(out.copy_gate, lips)
        assert nll.item() == pytest.approx(expected.item(), rel=1e-6) and ("mouth_gate_bce" in logs) == (weight > 0)
        with torch.no_grad():
            stage.vae.decoder.copy_head.to_gate.bias.fill_(2.0)  # open everywhere (0.88)
        opt = torch.optim.Adam(stage.vae.decoder.copy_head.to_gate.parameters(), lr=5e-2)
        for _ in range(40):
            loss = stage.reconstruction_nll(batch, stage.vae(clip, guidance, sample=False), clip)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        gates[weight] = stage.vae(clip, guidance, sample=False).copy_gate.mean(1).detach()  # [B, T, H, W]
    assert gates[1.0][lips].mean() < 0.05 < 0.2 < gates[0.0][lips].mean()
    # here a linear gate on an untrained decoder's features cannot single the lips out, so it also closes
    # elsewhere, but an order of magnitude less
    assert gates[1.0][~lips].mean() > 10 * gates[1.0][lips].mean()
    del batch["kpts"]
    with pytest.raises(KeyError, match="mouth_gate_weight > 0 needs keypoints"):
        stage.reconstruction_nll(batch, out, clip)


def test_unshown_pixels_are_those_no_reference_shows_nearby():
    """``unshown_pixels`` against a direct loop over pixels: a square that moved 2 pixels is shown with radius 2 and
    unshown with radius 1; a square the reference lacks is unshown whatever the radius; a second reference that
    shows it makes it shown. Bad shapes are refused."""
    from dystream.objectives.vae import unshown_pixels

    torch.manual_seed(0)
    ref = torch.full((1, 1, 3, 16, 16), -1.0)
    ref[..., 4:8, 4:8] = 1.0
    clip = ref[:, 0, :, None].repeat(1, 1, 3, 1, 1)  # [1, 3, T=3, 16, 16]: frame 0 = the reference
    clip[:, :, 1] = -1.0
    clip[:, :, 1, 6:10, 4:8] = 1.0  # the square moved 2 pixels down
    clip[:, :, 2, 12:15, 12:15] = 0.5  # a new patch the reference does not show

    def direct(clip, refs, threshold, radius):
        _, _, t, h, w = clip.shape
        out = torch.zeros(1, t, h, w, dtype=torch.bool)
        for f in range(t):
            for y in range(h):
                for x in range(w):
                    near = min(
                        (clip[0, :, f, y, x] - refs[0, k, :, min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)])
                        .abs().mean().item()
                        for k in range(refs.shape[1])
                        for dy in range(-radius, radius + 1)
                        for dx in range(-radius, radius + 1)
                    )  # fmt: skip
                    out[0, f, y, x] = near > threshold
        return out

    for radius in (0, 1, 2):
        mask = unshown_pixels(clip, ref, 0.1, radius)
        assert torch.equal(mask, direct(clip, ref, 0.1, radius)), radius
    assert not unshown_pixels(clip, ref, 0.1, 2)[0, :2].any()  # the moved square: shown 2 pixels away
    assert unshown_pixels(clip, ref, 0.1, 1)[0, 1].any()
    assert unshown_pixels(clip, ref, 0.1, 2)[0, 2, 12:15, 12:15].all()
    second = clip[:, :, 2][:, None]  # a reference that shows the new patch
    assert not unshown_pixels(clip, torch.cat([ref, second], dim=1), 0.1, 0)[0, 2].any()
    with pytest.raises(ValueError, match="unshown_pixels"):
        unshown_pixels(clip, ref[:, 0], 0.1, 1)


def test_unshown_gate_term_shuts_the_copy_gate_where_no_reference_shows_the_frame(tmp_path):
    """``unshown_gate_weight`` adds the cross-entropy of the gate against 0 over the pixels that no guidance image shows
    (``unshown_pixels``). The gate opened wide, then a few steps of the whole objective with and without the term:
    with it the gate shuts over those pixels and stays open elsewhere; without guidance images the term is absent."""
    from dystream.objectives.vae import open_gate_loss, shut_gate_loss, unshown_pixels

    batch = _batch(t=4, size=32)
    still = batch["references"][:, :1].clone()  # a still scene: every reference and frame the same image ...
    batch["references"] = still.repeat(1, 3, 1, 1, 1)
    batch["video"] = still[:, 0, :, None].repeat(1, 1, 4, 1, 1)
    batch["video"][:, :, :, 8:16, 8:16] = 1.0  # ... but for a patch that no reference shows
    batch["references"][:, :, :, 8:16, 8:16] = -1.0
    gates = {}
    for weight, still_weight in ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0)):
        torch.manual_seed(0)
        stage = VAEStage(architecture={"reference_copy": True}, unshown_gate_weight=weight,
                         still_gate_weight=still_weight, disc_weight=0.0, lpips_weight=0.0, min_references=1,
                         max_references=1, export_dir=str(tmp_path))  # fmt: skip
        clip, guidance = stage.clip_and_references(batch, 1)
        unshown = unshown_pixels(clip, guidance, stage.hparams.changed_threshold, stage.hparams.unshown_radius)
        still = ~unshown_pixels(clip, guidance, stage.hparams.changed_threshold, 0)
        assert unshown[:, 1:, 10:14, 10:14].all() and unshown.float().mean() < 0.5 and not (still & unshown).any()
        out = stage.vae(clip, guidance, sample=False)
        nll, logs = stage.reconstruction_nll(batch, out, clip, guidance)
        expected = (stage.pixel_losses(batch, out.recon, clip)[0] + weight * shut_gate_loss(out.copy_gate, unshown)
                    + still_weight * open_gate_loss(out.copy_gate, still))  # fmt: skip
        assert nll.item() == pytest.approx(expected.item(), rel=1e-6) and ("unshown_gate_bce" in logs) == (weight > 0)
        assert ("still_gate_bce" in logs) == (still_weight > 0)
        assert not {"unshown_gate_bce", "still_gate_bce"} & set(stage.reconstruction_nll(batch, out, clip)[1])
        with torch.no_grad():
            stage.vae.decoder.copy_head.to_gate.bias.fill_(2.0)  # open everywhere (0.88)
        opt = torch.optim.Adam(stage.vae.decoder.copy_head.to_gate.parameters(), lr=5e-2)
        for _ in range(40):
            loss = stage.reconstruction_nll(batch, stage.vae(clip, guidance, sample=False), clip, guidance)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        gates[weight, still_weight] = stage.vae(clip, guidance, sample=False).copy_gate.mean(1).detach()
    # the pixel loss alone already narrows the gate over this patch (the copy is far off everywhere in it); the
    # term shuts it two orders of magnitude further, while it stays open over what the references show ...
    assert gates[1.0, 0.0][unshown].mean() < 0.01 * gates[0.0, 0.0][unshown].mean()
    assert gates[1.0, 0.0][still].mean() > 0.5
    # ... but less open than without it (a linear gate on an untrained decoder's features cannot single the patch
    # out), which the still term undoes without reopening the patch
    assert gates[1.0, 0.0][still].mean() < gates[1.0, 1.0][still].mean() - 0.1
    assert gates[1.0, 1.0][unshown].mean() < 0.1 * gates[0.0, 0.0][unshown].mean()
