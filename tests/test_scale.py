"""dystream.scale: FSDP units, startup refusals, activation checkpointing, clipping, RNG states, memory table."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_stage1_common import files, prompt_batch  # noqa: F401  (files is a fixture)

from dystream import scale
from dystream.models.dit import AvatarBlock, AvatarDiT, DiTConfig


def _sid(files, **kw):  # noqa: F811
    from dystream.stages.stage1_sid import SiDStage

    args = {"student": files["teacher"], "teacher": files["teacher"], "vae": files["vae"], "audio": files["audio"]}
    return SiDStage(**{**args, **kw})


def _trainer(strategy, callbacks=(), precision="32-true"):
    return SimpleNamespace(strategy=strategy, callbacks=list(callbacks), precision=precision)


# -- FSDP units ---------------------------------------------------------------------------------------------------


def test_policy_puts_every_trainable_dit_parameter_in_a_unit_and_shards_the_frozen_teacher(files):  # noqa: F811
    stage = _sid(files)
    units = scale.AvatarWrapPolicy().units(stage)
    left = scale.root_trainable_parameters(stage, units)
    assert left == ["student.text_context", "fake_score.text_context"]  # the tiny presets' learned prompt only
    in_units = {id(p) for u in units for p in u.parameters()}
    assert all(id(p) in in_units for b in stage.teacher.blocks for p in b.parameters())  # frozen teacher sharded
    assert all(id(p) in in_units for p in stage.teacher.head.parameters())
    assert not any(id(p) in in_units for p in stage.cond.parameters())  # VAE and audio encoder stay whole
    assert sum(isinstance(u, AvatarBlock) for u in units) == 4 * stage.student.config.num_layers  # 4 DiTs
    # children come before their parents, and no unit contains another (they are wrapped one by one)
    assert not any(a is not b and any(m is b for m in a.modules()) for a in units for b in units)


def test_policy_covers_the_discriminator_heads():
    from dystream.models.discriminator import ConsistencyAwareDiscriminator, DiscriminatorConfig

    disc = ConsistencyAwareDiscriminator(DiscriminatorConfig.from_preset("tiny"))
    units = scale.AvatarWrapPolicy().units(disc)
    left = scale.root_trainable_parameters(disc, units)
    assert left == ["backbone.text_context"]  # the tiny backbone's learned prompt, nothing of the heads


def test_lightning_root_wrapping_of_a_manual_optimization_stage_is_refused(files):  # noqa: F811
    with pytest.raises(RuntimeError, match=r"SiDStage uses manual optimization.*FSDPUnits"):
        scale.AvatarWrapPolicy()._run_policy(_sid(files), set(), {})


def test_fsdp_units_refuses_a_trainable_parameter_outside_every_unit(files):  # noqa: F811
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy(auto_wrap_policy={AvatarBlock})
    with pytest.raises(RuntimeError, match=r"SiDStage under FSDPStrategy.*student\.text_context.*ddp\.yaml"):
        scale.FSDPUnits().setup(_trainer(strategy), _sid(files), "fit")


# -- startup checks -----------------------------------------------------------------------------------------------


def test_two_optimizers_under_deepspeed_fail_at_startup_naming_stage_and_strategy(files):  # noqa: F811
    from lightning.pytorch.strategies import DeepSpeedStrategy

    for stage_ in (2, 3):
        trainer = _trainer(DeepSpeedStrategy(stage=stage_))
        with pytest.raises(RuntimeError, match=r"SiDStage trains 2 networks.*DeepSpeedStrategy.*fsdp\.yaml"):
            scale.StrategyCheck().setup(trainer, _sid(files), "fit")


def test_one_optimizer_under_deepspeed_passes_with_a_warning_about_a_bf16_ema(files):  # noqa: F811
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from dystream.stages.teacher import TeacherStage

    teacher = TeacherStage(vae=files["vae"], export_dir="unused", ema_decay=0.999)
    with pytest.warns(UserWarning, match="EMA"):
        scale.StrategyCheck().setup(_trainer(DeepSpeedStrategy(stage=2), precision="bf16-mixed"), teacher, "fit")


def test_manual_optimization_under_ddp_needs_find_unused_parameters(files):  # noqa: F811
    from lightning.pytorch.strategies import DDPStrategy

    stage = _sid(files)
    with pytest.raises(RuntimeError, match=r"SiDStage alternates.*find_unused_parameters"):
        scale.StrategyCheck().setup(_trainer(DDPStrategy()), stage, "fit")
    scale.StrategyCheck().setup(_trainer(DDPStrategy(find_unused_parameters=True)), stage, "fit")


def test_manual_optimization_under_fsdp_needs_the_units_callback(files):  # noqa: F811
    from lightning.pytorch.strategies import FSDPStrategy

    stage = _sid(files)
    with pytest.raises(RuntimeError, match="FSDPUnits"):
        scale.StrategyCheck().setup(_trainer(FSDPStrategy()), stage, "fit")
    scale.StrategyCheck().setup(_trainer(FSDPStrategy(), [scale.FSDPUnits()]), stage, "fit")


def test_exact_double_backward_penalties_under_fsdp_are_refused():
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    class GANLike(L.LightningModule):
        def __init__(self, penalty: str) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.automatic_optimization = False

    trainer = _trainer(FSDPStrategy(), [scale.FSDPUnits()])
    with pytest.raises(RuntimeError, match=r"GANLike with penalty=exact under FSDPStrategy.*finite_difference"):
        scale.StrategyCheck().setup(trainer, GANLike("exact"), "fit")
    scale.StrategyCheck().setup(trainer, GANLike("finite_difference"), "fit")


def test_which_strategies_shard_parameters():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    assert scale.shards_parameters(FSDPStrategy())
    assert not scale.shards_parameters(FSDPStrategy(sharding_strategy="NO_SHARD"))
    assert scale.shards_parameters(DeepSpeedStrategy(stage=3))
    assert not scale.shards_parameters(DeepSpeedStrategy(stage=2))
    assert not scale.shards_parameters(DDPStrategy())
    assert scale.loads_state_before_hooks(DeepSpeedStrategy(stage=2)) and not scale.loads_state_before_hooks(None)


# -- activation checkpointing -------------------------------------------------------------------------------------


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
        for n, p in module.named_parameters()
        if p.grad is not None
    }


def test_activation_checkpointing_keeps_losses_gradients_names_and_ema(files):  # noqa: F811
    """Through the student's streaming rollout (stateful KV cache) too: the recompute sees the cache as it was."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from dystream.stages.student import frozen

    results = []
    for wrap in (False, True):
        stage = _sid(files, grad_chunks=None)
        stage.train()
        if wrap:
            scale.ActivationCheckpointing().setup(_trainer(SingleDeviceStrategy("cpu")), stage, "fit")
            assert any(type(m).__name__ == "CheckpointWrapper" for m in stage.student.modules())
        torch.manual_seed(3)
        with frozen(stage.fake_score):
            loss, _ = stage.generator_loss(prompt_batch(["a", "b"]))
            loss.backward()
        stage.ema.update(stage.student, 1)
        results.append((loss.detach(), _grads(stage.student), stage.ema.shadow.state_dict(), stage.student))
    (l0, g0, e0, _), (l1, g1, e1, wrapped) = results
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
    assert e0.keys() == e1.keys() == wrapped.state_dict().keys()  # no wrapper prefix in checkpoints or exports
    for k in e0:
        torch.testing.assert_close(e1[k], e0[k])


# -- gradient clipping, EMA partitions, RNG states ------------------------------------------------------------------


def test_plugin_clips_one_optimizers_parameters_by_their_own_norm():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(5, 2)
    for p in [*a.parameters(), *b.parameters()]:
        p.grad = torch.randn_like(p) * 10
    b_before = [p.grad.clone() for p in b.parameters()]
    expected = [p.grad.clone() for p in a.parameters()]
    torch.nn.utils.clip_grad_norm_(expected_params := [torch.nn.Parameter(g.clone()) for g in expected], 1.0)
    for p, g in zip(expected_params, expected, strict=True):
        p.grad = g.clone()
    reference_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in expected]))
    assert float(scale.sharded_grad_norm(a.parameters())) == pytest.approx(float(reference_norm), rel=1e-6)
    torch.nn.utils.clip_grad_norm_(expected_params, 1.0)
    scale.FSDPMixedPrecision("32-true").clip_grad_by_norm(torch.optim.SGD(a.parameters(), lr=1.0), 1.0)
    for p, e in zip(a.parameters(), expected_params, strict=True):
        torch.testing.assert_close(p.grad, e.grad, rtol=1e-5, atol=1e-6)
    assert float(scale.sharded_grad_norm(a.parameters())) == pytest.approx(1.0, rel=1e-4)
    assert all(torch.equal(p.grad, g) for p, g in zip(b.parameters(), b_before, strict=True))  # other optimizer


def test_ema_updates_zero3_partitions_where_the_parameters_are_empty():
    from dystream.stages.common import EMA

    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.5)
    for p, s in zip(net.parameters(), ema.shadow.parameters(), strict=True):  # DeepSpeed ZeRO-3's layout
        p.ds_tensor, s.ds_tensor = torch.ones(2), torch.zeros(2)
        p.data, s.data = torch.empty(0), torch.empty(0)
    ema.update(net, step=1)
    for s in ema.shadow.parameters():
        torch.testing.assert_close(s.ds_tensor, torch.full((2,), 0.5))


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    state = scale.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    scale.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_resume_state_restores_this_ranks_states_before_the_first_batch():
    callback = scale.ResumeState()
    saved = callback.state_dict()
    expected = torch.rand(4)
    torch.manual_seed(5)
    callback.load_state_dict(saved)
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    callback.on_train_batch_start(trainer, None, None, 0)
    assert torch.equal(torch.rand(4), expected)
    callback.on_train_batch_start(trainer, None, None, 1)  # only once
    assert not torch.equal(torch.rand(4), expected)


# -- memory table -------------------------------------------------------------------------------------------------


def test_parameter_counts_match_the_built_networks():
    from dystream.models.audio import AudioEncoder, AudioEncoderConfig
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig

    nets = scale.count_parameters("tiny", "tiny", "tiny", "tiny")
    audio = AudioEncoder(AudioEncoderConfig.from_name("tiny"))
    dit = AvatarDiT(DiTConfig.from_preset("tiny", audio_dim=audio.feature_dim))
    assert nets.dit == sum(p.numel() for p in dit.parameters())
    assert nets.vae == sum(p.numel() for p in ReferenceGuidedVAE(VAEConfig.from_preset("tiny")).parameters())
    assert nets.audio == sum(p.numel() for p in audio.parameters())
    assert nets.dit_without_audio < nets.dit


def test_measured_activations_predict_a_full_forward():
    """The per-frame model (one block, two frame counts) against the saved bytes of the whole 2-block tiny DiT."""
    act = scale.measure_activations("tiny", 16, 32, (8, 8))
    config = DiTConfig.from_preset("tiny")
    model = AvatarDiT(config)
    saved = {}
    for frames in (4, 7):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        x = torch.zeros(1, 16, frames, 8, 8, requires_grad=True)
        audio = torch.ones(1, 4 * (frames - 1), 32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, torch.full((1, frames), 0.5), audio, audio)
        saved[frames] = total[0]
    per_frame = (saved[7] - saved[4]) / 3
    assert act.bytes(1, checkpointing=False) == pytest.approx(per_frame, rel=1e-6)
    assert act.bytes(1, checkpointing=True) < act.bytes(1, checkpointing=False)
    assert act.tokens_per_frame == 16


def test_memory_rows_follow_the_accounting_rules():
    g = scale.Geometry(height=64, width=64, teacher_frames=8, student_frames=12, batch=1, gpus=4)
    act = scale.measure_activations("tiny", 16, 32, (8, 8))
    rows = {(r.stage, r.strategy): r for r in scale.memory_rows("tiny", "tiny", "tiny", "tiny", g, act)}
    nets = scale.count_parameters("tiny", "tiny", "tiny", "tiny")
    teacher = rows["teacher", "ddp"]
    assert teacher.params == 4 * (2 * nets.dit + nets.vae + nets.audio)  # DiT + EMA + frozen VAE and audio, fp32
    assert teacher.grads == 4 * nets.dit and teacher.optimizer == 8 * nets.dit
    assert rows["teacher", "fsdp"].grads == teacher.grads / 4 and rows["teacher", "fsdp"].params < teacher.params
    assert rows["teacher", "zero3"].params < rows["teacher", "zero2"].params
    assert rows["stage1_sid", "ddp"].optimizer == 2 * teacher.optimizer  # student + fake score
    assert rows["stage1_sid", "zero2"].note.startswith("refused") and not rows["teacher", "zero2"].note
    assert teacher.kv_cache == 0 < rows["stage1_sid", "fsdp"].kv_cache
    assert all(r.activations < r.activations_full for r in rows.values())
