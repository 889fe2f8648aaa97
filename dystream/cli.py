"""The `dystream` console script.

`dystream fit|validate|test|predict` is the Lightning CLI (OmegaConf mode, so recipes may use
`${...}` interpolation); the other subcommands (`data`, `generate`, `eval`, `zoo`, `bench`, ...)
live in the package that owns them and are listed here only once they exist.

A tool subcommand is a module exposing::

    HELP: str                                    # one line for `dystream --help`
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int     # exit code
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

LIGHTNING_COMMANDS = {
    "fit": "train a stage from a recipe (--config recipes/<stage>.yaml)",
    "validate": "run a stage's validation loop",
    "test": "run a stage's test loop",
    "predict": "run a stage's predict loop (e.g. ODE pairs, sample videos)",
}

# name -> module implementing it. A module that does not exist yet is not offered.
TOOL_COMMANDS = {
    "train": "dystream.train",
    "data": "dystream.datamodules.cli",
    "generate": "dystream.streaming.cli",
    "stream": "dystream.streaming.stream_cli",
    "serve": "dystream.serving.cli",
    "eval": "dystream.evaluation.cli",
    "vae-report": "dystream.evaluation.vae_report",
    "zoo": "dystream.zoo.cli",
    "bench": "dystream.bench.cli",
    "consolidate": "dystream.consolidate",
    "chain": "dystream.chain",
    "demo": "dystream.streaming.demo",
    "ablation": "dystream.ablation",
}


def available_tool_commands() -> dict[str, str]:
    """The tool subcommands whose module is installed."""
    found = {}
    for name, module in TOOL_COMMANDS.items():
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            found[name] = module
    return found


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX) rather than emulating it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_bf16_is_emulated(trainer) -> str | None:
    """On a CPU, ``bf16-mixed`` pays only where oneDNN has native bf16 (AVX512-BF16 or AMX): the VAE recipe's
    convolutions run ~25 % faster there (docs/vae.md). Elsewhere oneDNN emulates it, slower than float32. Returns
    (and warns) the advice, or None."""
    import warnings

    from lightning.pytorch.accelerators import CPUAccelerator

    precision = str(trainer.precision)
    on_cpu = isinstance(trainer.accelerator, CPUAccelerator)
    if not (on_cpu and precision.startswith("bf16")) or cpu_has_native_bf16():
        return None
    advice = (
        f"trainer.precision is {precision} on a CPU without native bf16 (AVX512-BF16 or AMX): oneDNN emulates it, "
        "which is slower than float32; add --trainer.precision 32-true"
    )
    warnings.warn(advice, stacklevel=2)
    return advice


def lightning_cli(args: Sequence[str] | None = None, run: bool = True):
    """Build (and by default run) the Lightning CLI for any stage and any DataModule.

    ``args`` (default: ``sys.argv[1:]``) is the whole command line, so it is handed to Lightning as ``sys.argv``
    for the duration of the call: Lightning reads ``sys.argv`` when given no ``args`` and warns when given both.
    """
    from lightning.pytorch.cli import LightningCLI

    from dystream.logs import filter_known_warnings
    from dystream.recipe_errors import RecipeArgumentParser, explain_instantiation

    class StageCLI(LightningCLI):
        def before_fit(self) -> None:
            warn_if_bf16_is_emulated(self.trainer)

    filter_known_warnings()
    saved = sys.argv
    if args is not None:
        sys.argv = [saved[0] if saved else "dystream", *args]
    try:
        return StageCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            parser_class=RecipeArgumentParser,
            save_config_kwargs={"overwrite": True},
            run=run,
        )
    except ValueError as exc:  # a recipe class refused its arguments: say why in two lines, exit 2
        short = None if os.environ.get("JSONARGPARSE_DEBUG") else explain_instantiation(exc, sys.argv[1:])
        if short is None:
            raise
        sys.stderr.write(short)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved


def build_parser(tools: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dystream",
        description="Train, evaluate and run real-time streaming talking-and-listening avatars.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    for name, module_name in tools.items():
        module = importlib.import_module(module_name)
        tool_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(tool_parser)
        tool_parser.set_defaults(_tool=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        lightning_cli(argv)
        return 0
    parser = build_parser(available_tool_commands())
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._tool.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
