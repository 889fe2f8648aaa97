"""What a run prints: known-harmless third-party warnings filtered, and each stage export announced once.

A training log should hold only lines a user can act on. The warnings filtered here were each looked at and are
harmless for dystream; every filter matches one message (and its category and, where stable, the module that
issues it), so any other warning from the same library still shows. Warnings our own code would cause are fixed
at their cause instead (``tests/test_quiet_logs.py`` runs a tiny ``dystream fit`` and fails on any warning line).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

__all__ = ["announce_export", "filter_known_warnings"]


def filter_known_warnings() -> None:
    """Install the filters for the known-harmless third-party warnings of a Lightning run (idempotent)."""
    # Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py) still builds torch's `LeafSpec`, which
    # torch >= 2.10 deprecates; it fires once per run at the first training step. Nothing in dystream uses the
    # class, the result is unchanged, and only a Lightning release can move off it.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Lightning warns when any submodule is in eval mode as training starts. In dystream that is by design: the
    # frozen networks (VAE, audio encoder, teacher, EMA shadows) are frozen and kept in eval mode in one place,
    # dystream.stages.common.freeze (DESIGN.md, Style 6), so "Found N module(s) in eval mode" is always expected.
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning,
        module=r"lightning\.pytorch\.loops\.fit_loop",
    )
    # Lightning's model summary has no entry for "bf16-mixed" in its size table and says so in every such run; the
    # parameters it prints are exact and only the "estimated size in MB" line assumes 32 bits, which mixed
    # precision keeps for the weights anyway (bf16-mixed VAE training: docs/vae.md, row ad).
    warnings.filterwarnings(
        "ignore",
        message=r"Precision bf16-mixed is not supported by the model summary",
        category=UserWarning,
        module=r"lightning\.pytorch\.utilities\.model_summary\.model_summary",
    )
    # Not a warning but the same kind of noise: Lightning advertises its optional cloud services (litlogger,
    # litmodels) with a "💡 Tip:" line in every run; dystream logs to TensorBoard and writes its own exports.
    # (rank_zero_info logs through the logger of whichever of these two modules was imported last)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        tips = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in tips.filters):
            tips.addFilter(_DropLightningTips())


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def announce_export(stage: Any, path: str | Path, what: str = "") -> None:
    """Log where a stage writes its export, once per run.

    Stages refresh their export at every checkpoint save (so the file always matches ``last.ckpt``); saying so
    once, with the path, tells the user where the file is without one line per validation.
    """
    if getattr(stage, "_export_announced", False):
        return
    stage._export_announced = True
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"exported {path}{f' {what}' if what else ''} (rewritten at every checkpoint save)")
