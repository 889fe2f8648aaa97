"""Scale-out on Lightning's own strategies (DDP, FSDP, DeepSpeed ZeRO): the pieces the recipes in recipes/scale/ name.

Nothing here is a distributed layer of its own; everything plugs into Lightning's extension points
(docs/scaling.md explains when each piece matters):

- :class:`AvatarWrapPolicy`: the FSDP auto-wrap policy. One FSDP unit per :class:`~dystream.models.dit.AvatarBlock`
  and one per other child of every AvatarDiT (patch / text / time embeddings, head, audio tokenizer) and of the
  stage-2 discriminator, in every network of a stage: trained, EMA and frozen teacher alike, so the frozen
  teacher is sharded too.
- :class:`FSDPUnits`: applies the strategy's policy unit by unit at ``setup``, so Lightning adds no root unit around
  the LightningModule. A stage with manual optimization (SiD, GAN) calls backward inside ``training_step``, which
  under a root unit is inside that unit's forward, where FSDP's end-of-backward never runs
  (Lightning-AI/pytorch-lightning#19685). A trainable parameter outside every unit is refused at startup.
- :class:`FSDPMixedPrecision`: Lightning's FSDP precision plugin with fp32 buffers and gradient reductions, autocast
  on the device in use, and gradient-norm clipping per optimizer, which Lightning does not offer under FSDP: the norm
  of sharded gradients is the square root of the all-reduced sum of the local squares.
- :class:`ActivationCheckpointing`: per-block activation checkpointing for DDP and DeepSpeed (FSDP has its own).
- :class:`StrategyCheck`: fails at startup, naming the stage and the strategy, where a combination cannot work
  (two optimizers under DeepSpeed, manual optimization under DDP without ``find_unused_parameters`` or under FSDP
  without :class:`FSDPUnits`, double-backward penalties under FSDP, clipping under an FSDP sharding that replicates
  gradients).
- :class:`ResumeState`: every rank's RNG states (torch, CUDA, numpy, python) in every checkpoint, restored right
  before the first training batch after a resume, so a resumed run draws the same noise as an uninterrupted one.
- :func:`shards_parameters`: whether a strategy shards the parameters (FSDP, ZeRO-3); stages then skip their
  rank-0 hand-over export at checkpoint time (``dystream consolidate`` writes it from the sharded checkpoint).
- the memory table of docs/scaling.md: ``python -m dystream.scale memory-table`` (parameter counts from the
  presets built on the meta device, activations measured from a real-width forward, see :func:`memory_table`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

__all__ = [
    "ActivationCheckpointing",
    "AvatarWrapPolicy",
    "FSDPMixedPrecision",
    "FSDPUnits",
    "ResumeState",
    "StrategyCheck",
    "default_block_classes",
    "default_container_classes",
    "exports_during_training",
    "loads_state_before_hooks",
    "memory_table",
    "shards_parameters",
    "sharded_grad_norm",
]


# --------------------------------------------------------------------------------------------------------------
# FSDP wrapping
# --------------------------------------------------------------------------------------------------------------


def default_block_classes() -> list[type[nn.Module]]:
    """Module classes that are one FSDP unit (and one activation-checkpointing unit) each: the transformer blocks."""
    from dystream.models.dit import AvatarBlock

    return [AvatarBlock]


def default_container_classes() -> list[type[nn.Module]]:
    """Networks whose every child module becomes its own FSDP unit (their children are only called as modules)."""
    from dystream.models.discriminator import ConsistencyAwareDiscriminator
    from dystream.models.dit import AvatarDiT

    return [AvatarDiT, ConsistencyAwareDiscriminator]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


class AvatarWrapPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap policy: transformer blocks, and every child of the DiT-like networks, each one unit.

    Why not wrap a whole AvatarDiT: the student streams through ``forward_chunk``, a method FSDP does not hook, so the
    DiT's own parameters must live in units that are called as modules (its embeddings and head are). Whatever is left
    (the frozen VAE and audio encoder, direct parameters such as a learned prompt) belongs to no unit.

    Args:
        module_classes: classes wrapped wherever they occur; default the AvatarBlock.
        container_classes: classes whose children (and the elements of their ModuleLists) are wrapped; default the
            AvatarDiT and the stage-2 discriminator.
    """

    def __init__(
        self,
        module_classes: list[type[nn.Module]] | None = None,
        container_classes: list[type[nn.Module]] | None = None,
    ) -> None:
        super().__init__(module_classes or default_block_classes())
        self.container_classes = tuple(container_classes or default_container_classes())

    def _container_units(self, container: nn.Module) -> Iterator[nn.Module]:
        for child in container.children():
            if isinstance(child, nn.ModuleList):
                yield from (m for m in child if _has_parameters(m) and not isinstance(m, self.container_classes))
            elif not isinstance(child, self.container_classes) and _has_parameters(child):
                yield child  # a nested container is visited on its own

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        if isinstance(root_module, L.LightningModule) and not root_module.automatic_optimization:
            raise RuntimeError(
                f"{type(root_module).__name__} uses manual optimization and Lightning is wrapping it in one root FSDP "
                "unit: its backward passes would run inside that unit's forward, where FSDP neither reduces the root's "
                "gradients nor finalises the others (Lightning-AI/pytorch-lightning#19685). Add the "
                "dystream.scale.FSDPUnits callback (recipes/scale/fsdp.yaml does): it wraps the units without a root."
            )
        targets = super()._run_policy(root_module, ignored_modules, root_kwargs)
        for module in root_module.modules():
            if isinstance(module, self.container_classes) and module not in ignored_modules:
                for unit in self._container_units(module):
                    if unit not in ignored_modules and unit is not root_module:
                        targets.setdefault(unit, copy.copy(root_kwargs))
        return targets

    def units(self, root: nn.Module) -> list[nn.Module]:
        """The modules this policy wraps under ``root``, children before parents."""
        targets = self._run_policy_without_checks(root)
        return [m for m in _post_order(root) if m in targets and m is not root]

    def _run_policy_without_checks(self, root: nn.Module) -> dict[nn.Module, dict[str, Any]]:
        targets = ModuleWrapPolicy._run_policy(self, root, set(), {})
        for module in root.modules():
            if isinstance(module, self.container_classes):
                for unit in self._container_units(module):
                    targets.setdefault(unit, {})
        return targets


def _post_order(module: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in module.children():
        out.extend(_post_order(child))
    out.append(module)
    return out


def root_trainable_parameters(root: nn.Module, units: Iterable[nn.Module]) -> list[str]:
    """Names of the trainable parameters of ``root`` that no module in ``units`` holds."""
    covered = {id(p) for unit in units for p in unit.parameters()}
    return [name for name, p in root.named_parameters() if p.requires_grad and id(p) not in covered]


class FSDPUnits(Callback):
    """Wrap a stage's units with Lightning's FSDPStrategy settings, without a root unit around the LightningModule.

    Lightning's FSDPStrategy wraps the whole LightningModule in one root FSDP unit and runs ``training_step`` as that
    unit's forward. A stage with manual optimization (SiD, GAN) calls backward inside that forward, where FSDP never
    runs its end-of-backward work (reducing the root's gradients, finalising every unit's gradient shards;
    Lightning-AI/pytorch-lightning#19685). This callback applies the strategy's ``auto_wrap_policy`` itself at
    ``setup``, before Lightning wraps anything: each unit becomes its own FSDP root with the strategy's sharding,
    mixed precision, CPU offload and keyword arguments, so every backward, wherever it is called, is a complete FSDP
    backward. Lightning then sees a wrapped model and adds no root (its documented manual-wrapping path), and still
    applies the activation-checkpointing policy. The policy's classes (a set of block classes in the recipe) are
    completed into an :class:`AvatarWrapPolicy`. Parameters outside every unit are not sharded and their gradients
    are not reduced, so a trainable one is refused at startup, by name; frozen ones (VAE, audio encoder) are
    replicated and moved to the device here.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        strategy = trainer.strategy
        if not isinstance(strategy, FSDPStrategy) or any(isinstance(m, FSDP) for m in pl_module.modules()):
            return
        policy = strategy.kwargs.pop("auto_wrap_policy", None)
        if policy is not None and not isinstance(policy, ModuleWrapPolicy):
            raise TypeError(
                f"FSDPUnits needs FSDPStrategy(auto_wrap_policy=...) as a set of module classes or a ModuleWrapPolicy, "
                f"got {type(policy).__name__}"
            )
        if not isinstance(policy, AvatarWrapPolicy):
            policy = AvatarWrapPolicy(sorted(policy._module_classes, key=str) if policy is not None else None)
        units = policy.units(pl_module)
        left = root_trainable_parameters(pl_module, units)
        if left:
            shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            raise RuntimeError(
                f"{type(pl_module).__name__} under {type(strategy).__name__}: these trainable parameters belong to no "
                f"FSDP unit, so their gradients would not be reduced across ranks: {shown}. Add their module classes "
                "to the auto_wrap_policy (or AvatarWrapPolicy container_classes), freeze them, or train this stage "
                "with recipes/scale/ddp.yaml (docs/scaling.md)."
            )
        kwargs = {
            "cpu_offload": strategy.cpu_offload,
            "mixed_precision": strategy.mixed_precision_config,
            "sharding_strategy": strategy.sharding_strategy,
            "device_id": strategy.root_device,  # a torch.device: also right on CPU, where FSDP needs it explicitly
            **strategy.kwargs,
        }
        parents = {id(c): (parent, name) for parent in pl_module.modules() for name, c in parent.named_children()}
        for unit in units:  # children before parents
            parent, name = parents[id(unit)]
            setattr(parent, name, FSDP(unit, **kwargs))
        pl_module.to(strategy.root_device)  # what no unit holds; the units were moved while being sharded
        rank_zero_info(f"FSDPUnits: {len(units)} FSDP units in {type(pl_module).__name__}, no root unit")


# --------------------------------------------------------------------------------------------------------------
# Precision and gradient clipping under FSDP
# --------------------------------------------------------------------------------------------------------------


def sharded_grad_norm(parameters: Iterable[Tensor], group: Any = None) -> Tensor:
    """2-norm of the gradients of ``parameters`` when every gradient element lives on exactly one rank.

    That holds for FSDP's FULL_SHARD and SHARD_GRAD_OP with ``use_orig_params=True``: each original parameter's
    ``.grad`` is its slice of the local gradient shard (empty when the shard does not hold it). Without a process
    group it is the plain local norm.
    """
    grads = [p.grad for p in parameters if p.grad is not None and p.grad.numel() > 0]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        total += g.detach().double().pow(2).sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if not grads:  # a rank whose shards hold none of these parameters still joins the reduction
            total = total.to(_collective_device())
        torch.distributed.all_reduce(total, group=group)
    return total.sqrt()


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class FSDPMixedPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin with fp32 reductions and buffers, device-aware autocast and norm clipping.

    Lightning's plugin uses the low precision for parameters, gradient reductions *and buffers*; here only the
    gathered parameters (and so the matmuls) are low precision: gradients are reduced in fp32 and buffers (latent
    statistics, fixed prompt contexts) keep their dtype. ``clip_gradients(..., "norm")`` clips the optimizer's own
    parameters by their global norm (:func:`sharded_grad_norm`), so each of a stage's optimizers is clipped alone;
    it assumes FULL_SHARD or SHARD_GRAD_OP (checked by :class:`StrategyCheck`).

    Args:
        precision: ``bf16-mixed`` (the recipes), ``16-mixed``, ``bf16-true`` or ``32-true``.
    """

    def __init__(self, precision: Literal["bf16-mixed", "16-mixed", "bf16-true", "32-true"] = "bf16-mixed") -> None:
        super().__init__(precision=precision)

    @property
    def mixed_precision_config(self):
        from torch.distributed.fsdp import MixedPrecision

        low = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}
        return MixedPrecision(
            param_dtype=low.get(self.precision, torch.float32),
            reduce_dtype=torch.float32,
            buffer_dtype=None,
            cast_root_forward_inputs=False,  # autocast picks op dtypes; the fp32 time modulation stays fp32
        )

    def forward_context(self) -> AbstractContextManager:
        if "mixed" in self.precision:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
            return torch.autocast(device, dtype=dtype)
        return super().forward_context()

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = sharded_grad_norm(params)
        scale = float(clip_val) / (float(norm) + 1e-6)
        if scale < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(scale)


# --------------------------------------------------------------------------------------------------------------
# Strategies: what shards, what cannot work
# --------------------------------------------------------------------------------------------------------------


def shards_parameters(strategy: Any) -> bool:
    """Whether ``strategy`` keeps only a shard of each parameter per rank (FSDP other than NO_SHARD, ZeRO-3).

    Then a parameter is whole only inside a collective call on every rank: a rank-0-only ``state_dict()`` or
    forward would hang or read shards.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy)) != "NO_SHARD"
    if isinstance(strategy, DeepSpeedStrategy):
        return isinstance(strategy.config, dict) and strategy.config.get("zero_optimization", {}).get("stage") == 3
    return False


def loads_state_before_hooks(strategy: Any) -> bool:
    """Whether ``strategy`` loads module weights itself, strictly, before ``LightningModule.on_load_checkpoint`` runs
    (FSDP, DeepSpeed): a checkpoint for it must hold every parameter, frozen networks included."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy))


_told: set[str] = set()


def exports_during_training(module: L.LightningModule) -> bool:
    """Whether a stage may write its hand-over file at checkpoint time (not under sharded parameters, see above)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not shards_parameters(trainer.strategy):
        return True
    name = type(module).__name__
    if name not in _told:
        _told.add(name)
        rank_zero_info(
            f"{name}: parameters are sharded ({type(trainer.strategy).__name__}); the hand-over file is not written "
            "at checkpoint time. Write it with `dystream consolidate CHECKPOINT --config RECIPE` (docs/scaling.md)."
        )
    return False


def _optimizers(configured: Any) -> list[Any]:
    """The optimizers in whatever ``configure_optimizers`` returned (one, a list, a dict, (optimizers, schedulers))."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return [configured["optimizer"]]
    if isinstance(configured, (list, tuple)):
        if len(configured) == 2 and isinstance(configured[0], (list, tuple)):
            return list(configured[0])
        return [o for c in configured for o in _optimizers(c)]
    return []


class StrategyCheck(Callback):
    """Fail at startup, naming the stage and the strategy, on combinations that cannot train (docs/scaling.md)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

        strategy = trainer.strategy
        name, where = type(pl_module).__name__, type(strategy).__name__
        if isinstance(strategy, DeepSpeedStrategy):
            optimizers = _optimizers(pl_module.configure_optimizers())
            ema = [m for m in pl_module.modules() if type(m).__name__ == "EMA" and getattr(m, "decay", 0) > 0.99]
            if ema and "bf16" in str(trainer.precision):
                rank_zero_warn(
                    f"{name} under {where} with {trainer.precision}: DeepSpeed casts the whole module to bf16, the "
                    f"EMA copy included, and an EMA step of (1 - {ema[0].decay}) x the change is mostly below bf16 "
                    "resolution. Prefer recipes/scale/fsdp.yaml, which keeps fp32 weights (docs/scaling.md)."
                )
            if len(optimizers) > 1:
                raise RuntimeError(
                    f"{name} trains {len(optimizers)} networks with their own optimizers, and Lightning's {where} "
                    "drives exactly one optimizer (one DeepSpeed engine per model). Train this stage with "
                    "recipes/scale/fsdp.yaml or recipes/scale/ddp.yaml (docs/scaling.md)."
                )
        elif isinstance(strategy, DDPStrategy) and not pl_module.automatic_optimization:
            if not strategy._ddp_kwargs.get("find_unused_parameters", False):
                raise RuntimeError(
                    f"{name} alternates updates of different networks (manual optimization): under {where} each "
                    "backward leaves the other network without gradients. Set "
                    "--trainer.strategy.init_args.find_unused_parameters=true (recipes/scale/ddp.yaml does)."
                )
        elif isinstance(strategy, FSDPStrategy) and not pl_module.automatic_optimization:
            if getattr(pl_module, "hparams", {}).get("penalty") == "exact":
                raise RuntimeError(
                    f"{name} with penalty=exact under {where}: the exact R1/R2 penalties differentiate a gradient "
                    "(double backward), which FSDP does not support. Set --model.init_args.penalty=finite_difference "
                    "(the variant meant for large, sharded models)."
                )
            if not any(isinstance(c, FSDPUnits) for c in trainer.callbacks):
                raise RuntimeError(
                    f"{name} uses manual optimization; under {where} it needs the dystream.scale.FSDPUnits callback "
                    "(recipes/scale/fsdp.yaml adds it): without it Lightning wraps the stage in one root FSDP unit and "
                    "the backward passes inside training_step are incomplete (Lightning-AI/pytorch-lightning#19685)."
                )
        if isinstance(strategy, FSDPStrategy) and isinstance(strategy.precision_plugin, FSDPMixedPrecision):
            sharding = getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy))
            if sharding not in ("FULL_SHARD", "SHARD_GRAD_OP"):
                raise RuntimeError(
                    f"{name} under {where} with sharding_strategy {sharding}: FSDPMixedPrecision clips gradient norms "
                    "over gradient shards and supports FULL_SHARD and SHARD_GRAD_OP only."
                )


class ActivationCheckpointing(Callback):
    """Activation checkpointing per block (torch's non-reentrant checkpoint wrapper) for DDP and DeepSpeed.

    FSDP has its own (``activation_checkpointing_policy``), so under FSDPStrategy this does nothing. Every block of
    every network is wrapped; in frozen or no-grad forwards the wrapper costs nothing, and the frozen teacher's
    forwards that SiD differentiates with respect to their input are checkpointed too. The wrapper's prefix never
    reaches a checkpoint or an export (it strips it from state dicts), and the EMA shadow is wrapped like the network
    it tracks, so their parameter names still match.

    Args:
        module_classes: classes to checkpoint; default the AvatarBlock.
    """

    def __init__(self, module_classes: list[type[nn.Module]] | None = None) -> None:
        self.module_classes = tuple(module_classes or default_block_classes())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            CheckpointWrapper,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        if stage != "fit" or isinstance(trainer.strategy, FSDPStrategy):
            return
        if any(isinstance(m, CheckpointWrapper) for m in pl_module.modules()):
            return
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(
            pl_module, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, self.module_classes)
        )


# --------------------------------------------------------------------------------------------------------------
# Resumable runs: RNG states per rank
# --------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(Callback):
    """Every rank's RNG states in each checkpoint; restored before the first training batch after a resume.

    Lightning restores model, optimizers, schedulers, loop counters and (for loaders with ``state_dict``) the data
    position, but not the random generators, so a resumed run would draw other noise, dropout and sigmas than the
    run it continues. The states of all ranks are gathered into the checkpoint (it is written by rank 0, or as shards
    plus rank 0's metadata); each rank takes its own back. They are applied at the first ``on_train_batch_start``
    rather than at load time because setting up the data loaders in between draws from the generators.
    Resuming on a different number of ranks reuses the saved states round-robin, with a warning.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        mine = rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self._pending is None:
            return
        states, self._pending = self._pending["rng"], None
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"ResumeState: the checkpoint holds RNG states of {len(states)} rank(s), this run has "
                f"{trainer.world_size}; reusing them round-robin, so the noise differs from the interrupted run"
            )
        set_rng_state(states[trainer.global_rank % len(states)])


# --------------------------------------------------------------------------------------------------------------
# Memory table (docs/scaling.md)
# --------------------------------------------------------------------------------------------------------------

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
STAGES = ("teacher", "stage1_ode", "stage1_sid", "stage2_gan")
GiB = 2**30


@dataclasses.dataclass
class Geometry:
    """The training clip a memory row assumes (docs/scaling.md states the defaults and why)."""

    height: int = 704  # Wan2.2's 720p training height (a multiple of the VAE's 32 x the DiT's 2)
    width: int = 1280
    teacher_frames: int = 80  # video frames per teacher window (3.2 s at 25 fps)
    student_frames: int = 72  # student windows: 6 chunks of 3 latent frames (2.9 s)
    batch: int = 1  # samples per GPU
    gpus: int = 8  # ranks sharing one model under FSDP / ZeRO


@dataclasses.dataclass
class Networks:
    """Parameter counts of a stage's networks (meta-device builds of the presets)."""

    dit: int
    dit_without_audio: int  # the Wan2.2 layout alone (audio_attention=False)
    vae: int
    audio: int
    discriminator_heads: int  # Q-Formers and heads on top of the discriminator's backbone copy


def count_parameters(dit_preset: str, vae_preset: str, audio_preset: str, d_preset: str) -> Networks:
    """Parameter counts of the presets, built on the meta device (no memory, no weights)."""
    from dystream.models.audio import AudioEncoder, AudioEncoderConfig
    from dystream.models.discriminator import ConsistencyAwareDiscriminator, DiscriminatorConfig
    from dystream.models.dit import AvatarDiT, DiTConfig
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig

    with torch.device("meta"):
        vae = ReferenceGuidedVAE(VAEConfig.from_preset(vae_preset))
        audio = AudioEncoder(AudioEncoderConfig.from_name(audio_preset))
        z = vae.config.latent_channels
        dit_config = DiTConfig.from_preset(dit_preset, in_channels=z, out_channels=z, audio_dim=audio.feature_dim)
        dit = AvatarDiT(dit_config)
        plain = AvatarDiT(dataclasses.replace(dit_config, audio_attention=False))
        disc = ConsistencyAwareDiscriminator(DiscriminatorConfig.from_preset(d_preset, backbone=dit_config))

    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return Networks(
        dit=n(dit),
        dit_without_audio=n(plain),
        vae=n(vae),
        audio=n(audio),
        discriminator_heads=n(disc) - n(disc.backbone),
    )


@dataclasses.dataclass
class ActivationModel:
    """Activation bytes one DiT forward with gradient saves for backward, per latent frame of a given token grid.

    ``per_frame_block``: bytes per latent frame per AvatarBlock; ``per_frame_stem``: the embeddings and head;
    ``per_frame_input``: one block's input (all that per-block activation checkpointing keeps of a block).
    """

    per_frame_block: float
    per_frame_stem: float
    per_frame_input: float
    num_layers: int
    tokens_per_frame: int

    def bytes(self, frames: int, checkpointing: bool) -> float:
        if checkpointing:  # block inputs of every layer, plus one block's internals while it is recomputed
            return frames * (self.num_layers * self.per_frame_input + self.per_frame_block + self.per_frame_stem)
        return frames * (self.num_layers * self.per_frame_block + self.per_frame_stem)


def measure_activations(
    dit_preset: str, latent_channels: int, audio_dim: int, grid: tuple[int, int]
) -> ActivationModel:
    """Saved-tensor bytes of a real-width one-block DiT under bf16 autocast, on the real token grid (CPU).

    ``grid`` is the latent (h, w) of one frame. The forward runs twice, on 2 and 3 latent frames, and the difference
    is the cost of one latent frame (per-sample constants such as the text context's keys and values cancel out).
    The bytes depend only on shapes, so the weights are random; hooks around the block tell its share apart from
    the embeddings and head. The model upcasts its norms and modulations itself, so CPU and CUDA autocast save
    nearly the same tensors; the attention kernel's own extras (e.g. flash attention's log-sum-exp) may differ.
    """
    from dystream.models.dit import AvatarDiT, DiTConfig

    config = DiTConfig.from_preset(
        dit_preset, num_layers=1, in_channels=latent_channels, out_channels=latent_channels, audio_dim=audio_dim
    )
    with torch.device("meta"):
        model = AvatarDiT(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if not config.learned_text_context:
        model.set_text_context(torch.zeros(config.text_len, config.text_dim))
    h, w = grid
    saved = {}
    for frames in (2, 3):
        inside, counts = [False], {"block": 0, "stem": 0}

        def pack(t: Tensor, inside: list[bool] = inside, counts: dict[str, int] = counts) -> Tensor:
            counts["block" if inside[0] else "stem"] += t.numel() * t.element_size()
            return t

        hooks = [
            model.blocks[0].register_forward_pre_hook(lambda *_, inside=inside: inside.__setitem__(0, True)),
            model.blocks[0].register_forward_hook(lambda *_, inside=inside: inside.__setitem__(0, False)),
        ]
        x = torch.zeros(1, latent_channels, frames, h, w, requires_grad=True)
        sigma = torch.full((1, frames), 0.5)
        audio = torch.ones(1, config.frames_per_latent * (frames - 1), audio_dim)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, sigma, audio, audio, attention="bidirectional")
        for hook in hooks:
            hook.remove()
        saved[frames] = counts
    tokens = (h // config.patch_size[1]) * (w // config.patch_size[2])
    return ActivationModel(
        per_frame_block=saved[3]["block"] - saved[2]["block"],
        per_frame_stem=saved[3]["stem"] - saved[2]["stem"],
        per_frame_input=tokens * config.dim * 2,  # the block input [tokens, dim] in bf16
        num_layers=DiTConfig.from_preset(dit_preset).num_layers,
        tokens_per_frame=tokens,
    )


def _latents(vae_preset: str, frames: int, geometry: Geometry) -> tuple[int, tuple[int, int]]:
    """(latent frames, latent grid) of a window of ``frames`` video frames plus the reference frame."""
    from dystream.models.vae import VAEConfig

    _, f, h, w = VAEConfig.from_preset(vae_preset).latent_shape(1 + frames, geometry.height, geometry.width)
    return f, (h, w)


@dataclasses.dataclass
class MemoryRow:
    stage: str
    strategy: str
    params: float  # bytes per GPU, weights of every network the stage holds
    grads: float
    optimizer: float  # optimizer states (and fp32 master weights where the engine keeps them apart)
    activations: float  # with per-block activation checkpointing
    activations_full: float  # without
    kv_cache: float
    note: str = ""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.kv_cache


def _stage_networks(stage: str, nets: Networks) -> tuple[list[int], list[int]]:
    """(trainable networks, frozen networks) of a stage, as parameter counts; EMA copies count as frozen."""
    cond = [nets.vae, nets.audio]
    if stage == "teacher":
        return [nets.dit], [nets.dit, *cond]
    if stage == "stage1_ode":
        return [nets.dit], [nets.dit, *cond]
    if stage == "stage1_sid":  # student + fake score trained; teacher and EMA frozen
        return [nets.dit, nets.dit], [nets.dit, nets.dit, *cond]
    if stage == "stage2_gan":  # student + discriminator (backbone copy + heads) trained; EMA frozen
        return [nets.dit, nets.dit + nets.discriminator_heads], [nets.dit, *cond]
    raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")


def _activation_bytes(stage: str, act: ActivationModel, teacher_frames: int, student_frames: int, ckpt: bool) -> float:
    """Activations kept for backward in the heaviest update of a stage, per sample.

    teacher: one bidirectional forward. ODE init: one block-causal forward of the student window. SiD generator
    update: the student's rollout with gradient (one forward's worth of chunks) plus the teacher's guided estimate
    (two forwards, conditional and unconditional) and the fake score's (one), all differentiated with respect to
    their input. GAN generator update: the rollout plus the discriminator on real and fake clips (two forwards of the
    backbone); exact R1/R2 penalties (double backward) need more, the finite-difference variant does not.
    """
    per = {
        "teacher": (teacher_frames, 1),
        "stage1_ode": (student_frames, 1),
        "stage1_sid": (student_frames, 4),
        "stage2_gan": (student_frames, 3),
    }
    frames, forwards = per[stage]
    return forwards * act.bytes(frames, ckpt)


def memory_rows(
    dit_preset: str = "wan2.2-ti2v-5b",
    vae_preset: str = "ref-dc-f32t4c16",
    audio_preset: str = "wav2vec2-base-960h",
    d_preset: str = "wan2.2-ti2v-5b",
    geometry: Geometry | None = None,
    activations: ActivationModel | None = None,
) -> list[MemoryRow]:
    """Per-GPU memory of every stage under every strategy (bytes); see docs/scaling.md for the accounting rules.

    Accounting (bf16 mixed precision, AdamW): DDP keeps fp32 weights, fp32 gradients and two fp32 Adam moments
    (16 bytes per trained parameter, 4 per frozen one) on every GPU. FSDP (FULL_SHARD, :class:`FSDPMixedPrecision`)
    shards the fp32 weights, gradients and moments of every wrapped network over ``gpus`` (frozen networks too), and
    gathers one unit at a time in bf16; the VAE and audio encoder stay whole in the root unit. DeepSpeed keeps bf16
    weights (2 bytes) and fp32 master weights + moments (12 bytes) per trained parameter: ZeRO-2 shards gradients and
    optimizer states, ZeRO-3 the weights too. Stages with two optimizers are refused under DeepSpeed.
    """
    from dystream.models.dit import DiTConfig

    g = geometry or Geometry()
    nets = count_parameters(dit_preset, vae_preset, audio_preset, d_preset)
    dit_config = DiTConfig.from_preset(dit_preset)
    t_frames, grid = _latents(vae_preset, g.teacher_frames, g)
    s_frames, _ = _latents(vae_preset, g.student_frames, g)
    if activations is None:
        from dystream.models.audio import AudioEncoderConfig
        from dystream.models.vae import VAEConfig

        z = VAEConfig.from_preset(vae_preset).latent_channels
        audio_dim = AudioEncoderConfig.from_name(audio_preset).hidden_size
        activations = measure_activations(dit_preset, z, audio_dim, grid)
    per_frame = activations.tokens_per_frame
    layout = dit_config.layout
    cache_frames = layout.sink_frames + (layout.window_frames or s_frames)
    kv_bytes = 2 * dit_config.num_layers * cache_frames * per_frame * dit_config.dim * 2 * g.batch  # K and V, bf16
    unit = 2 * max(
        sum(p.numel() for p in block.parameters()) for block in _meta_blocks(dit_preset, nets)
    )  # one gathered block in bf16
    rows = []
    for stage in STAGES:
        trained, frozen = _stage_networks(stage, nets)
        n_trained, n_frozen = sum(trained), sum(frozen)
        n_cond = nets.vae + nets.audio
        act_ckpt = g.batch * _activation_bytes(stage, activations, t_frames, s_frames, True)
        act_full = g.batch * _activation_bytes(stage, activations, t_frames, s_frames, False)
        kv = kv_bytes if stage in ("stage1_sid", "stage2_gan") else 0.0
        two_optimizers = len(trained) > 1
        for strategy in STRATEGIES:
            n = g.gpus
            if strategy == "ddp":
                row = (4 * (n_trained + n_frozen), 4 * n_trained, 8 * n_trained, "")
            elif strategy == "fsdp":
                sharded = n_trained + n_frozen - n_cond
                row = (4 * sharded / n + 4 * n_cond + 2 * unit, 4 * n_trained / n, 8 * n_trained / n, "")
            elif strategy == "zero2":
                row = (2 * (n_trained + n_frozen), 2 * n_trained / n, 12 * n_trained / n, "")
            else:
                row = (2 * (n_trained + n_frozen) / n + 2 * unit, 2 * n_trained / n, 12 * n_trained / n, "")
            note = "refused: two optimizers" if two_optimizers and strategy.startswith("zero") else row[3]
            rows.append(MemoryRow(stage, strategy, row[0], row[1], row[2], act_ckpt, act_full, kv, note))
    return rows


def _meta_blocks(dit_preset: str, nets: Networks) -> list[nn.Module]:
    from dystream.models.dit import AvatarBlock, DiTConfig

    with torch.device("meta"):
        return [AvatarBlock(DiTConfig.from_preset(dit_preset))]


def format_memory_table(
    rows: Sequence[MemoryRow], geometry: Geometry, nets: Networks, vae_preset: str, act: ActivationModel
) -> str:
    """Markdown table in GiB per GPU, with the counts and the clip it assumes."""

    def gib(v: float) -> str:
        return f"{v / GiB:.1f}"

    t_frames, grid = _latents(vae_preset, geometry.teacher_frames, geometry)
    s_frames, _ = _latents(vae_preset, geometry.student_frames, geometry)
    lines = [
        f"Parameters (meta-device builds): DiT {nets.dit / 1e9:.2f} B ({nets.dit_without_audio / 1e9:.2f} B without "
        f"the talk/listen audio attentions), VAE {nets.vae / 1e6:.0f} M, audio encoder {nets.audio / 1e6:.0f} M, "
        f"discriminator heads {nets.discriminator_heads / 1e6:.1f} M.",
        f"Clip: {geometry.width}x{geometry.height} -> {grid[0]}x{grid[1]} latents ({vae_preset}), "
        f"{act.tokens_per_frame} tokens per latent frame; teacher window {geometry.teacher_frames} frames "
        f"({t_frames} latent frames), student window {geometry.student_frames} frames ({s_frames}); "
        f"{geometry.batch} sample(s) per GPU, {geometry.gpus} GPUs per model (FSDP, ZeRO).",
        f"Activations measured: {act.per_frame_block / 2**20:.1f} MiB per latent frame per block without "
        f"checkpointing, {act.per_frame_input / 2**20:.2f} MiB with (the block input).",
        "",
        "| stage | strategy | params | grads | optimizer | activations (AC / none) | KV cache | total (AC) | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.stage} | {r.strategy} | {gib(r.params)} | {gib(r.grads)} | {gib(r.optimizer)} | "
            f"{gib(r.activations)} / {gib(r.activations_full)} | {gib(r.kv_cache)} | {gib(r.total)} | {r.note} |"
        )
    return "\n".join(lines)


def memory_table(
    dit_preset: str = "wan2.2-ti2v-5b",
    vae_preset: str = "ref-dc-f32t4c16",
    audio_preset: str = "wav2vec2-base-960h",
    d_preset: str = "wan2.2-ti2v-5b",
    geometry: Geometry | None = None,
) -> str:
    """The memory table of docs/scaling.md as markdown (GiB per GPU)."""
    from dystream.models.audio import AudioEncoderConfig
    from dystream.models.vae import VAEConfig

    geometry = geometry or Geometry()
    _, grid = _latents(vae_preset, geometry.teacher_frames, geometry)
    z = VAEConfig.from_preset(vae_preset).latent_channels
    act = measure_activations(dit_preset, z, AudioEncoderConfig.from_name(audio_preset).hidden_size, grid)
    rows = memory_rows(dit_preset, vae_preset, audio_preset, d_preset, geometry, act)
    nets = count_parameters(dit_preset, vae_preset, audio_preset, d_preset)
    return format_memory_table(rows, geometry, nets, vae_preset, act)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dystream.scale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("memory-table", help="per-GPU memory of every stage and strategy (markdown)")
    table.add_argument("--dit-preset", default="wan2.2-ti2v-5b")
    table.add_argument("--vae-preset", default="ref-dc-f32t4c16")
    table.add_argument("--audio-preset", default="wav2vec2-base-960h")
    table.add_argument("--discriminator-preset", default="wan2.2-ti2v-5b")
    for field in dataclasses.fields(Geometry):
        table.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    args = parser.parse_args(argv)
    geometry = Geometry(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Geometry)})
    print(memory_table(args.dit_preset, args.vae_preset, args.audio_preset, args.discriminator_preset, geometry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
