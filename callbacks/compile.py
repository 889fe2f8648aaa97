"""``torch.compile`` for the networks a stage trains, as a recipe option (no stage code changes).

Add to a recipe's trainer callbacks::

    trainer:
      callbacks:
        - class_path: dystream.callbacks.compile.CompileModules
          init_args: {modules: [dit]}          # teacher: dit; ODE init / SiD / GAN: student (and fake_score)

Each named submodule is compiled **in place** (``nn.Module.compile``) when fitting starts, so parameter names,
checkpoints, the EMA and the exported weights stay exactly as without it (``torch.compile(module)`` would wrap it
and prefix every key with ``_orig_mod.``). The first steps pay the compilation; every later step runs the fused
kernels. On a CPU the inductor backend needs a C++ compiler; on CUDA it generates Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
from torch import nn

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileOptions:
    """What :class:`CompileModules` compiles and how."""

    modules: list[str] = field(default_factory=lambda: ["dit"])  # attribute names of the stage's networks
    mode: str | None = None  # torch.compile mode; None = "default"
    dynamic: bool | None = None  # None: torch decides (shapes that change between batches become dynamic)

    def __post_init__(self) -> None:
        self.modules = list(self.modules)
        if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
            raise ValueError(f"CompileModules.modules must be non-empty attribute names, got {self.modules}")
        if self.mode not in MODES:
            raise ValueError(f"CompileModules.mode must be one of {MODES}, got {self.mode!r}")


class CompileModules(L.Callback):
    """Compile the stage's networks named in ``modules`` in place at the start of fitting.

    Args:
        modules: attribute names of the stage's trained networks (``dit`` for the teacher, ``student`` for the
            student stages, ``fake_score`` too for SiD).
        mode: ``torch.compile`` mode (``reduce-overhead`` adds CUDA graphs; for fixed batch shapes only).
        dynamic: ``torch.compile``'s ``dynamic`` flag.
    """

    def __init__(self, modules: list[str] | None = None, mode: str | None = None, dynamic: bool | None = None):
        super().__init__()
        self.options = CompileOptions(modules=modules or ["dit"], mode=mode, dynamic=dynamic)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            compile_in_place(pl_module, self.options)


def compile_in_place(owner: nn.Module, options: CompileOptions) -> list[str]:
    """Compile ``owner.<name>`` for every name in ``options.modules``; returns the names compiled."""
    for name in options.modules:
        module = getattr(owner, name, None)
        if not isinstance(module, nn.Module):
            found = sorted(n for n, _ in owner.named_children())
            raise ValueError(f"CompileModules: {type(owner).__name__} has no network {name!r}; its networks: {found}")
        kwargs = {} if options.mode is None else {"mode": options.mode}
        module.compile(dynamic=options.dynamic, **kwargs)
    return list(options.modules)
