"""`dystream generate`: DyStream-style sample files -> one mp4 per entry (H.264 + AAC), offline.

    dystream generate --samples samples.json --out outputs/ [--checkpoint runs/stage1_sid/student.safetensors]

The sample-file format is documented in :mod:`dystream.streaming.samples`; generation runs the same
:class:`~dystream.streaming.StreamingAvatar` as live use (so offline and online results are identical for the
same seed), feeding each recording as fast as possible. The model options shared with `dystream stream` live here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

HELP = "render DyStream-style sample files (reference image + speaker [+ listener] audio) to mp4 with sound"

# the final student of the stage chain first; a missing export is skipped when no --checkpoint is given
DEFAULT_CHECKPOINTS = ("runs/stage2_gan/student.safetensors", "runs/stage1_sid/student.safetensors")
DEFAULT_VAE = "runs/vae/vae.safetensors"
DEFAULT_AUDIO = "runs/teacher/audio.safetensors"
DEFAULT_SIZE = 64  # the embedded default's resolution, used when no export records its training size

# StreamingConfig fields offered on the command line (help text comes from the field's documentation)
CONFIG_FLAGS = (
    "seed",
    "steps",
    "shift",
    "renoise",
    "size",
    "audio_context_frames",
    "audio_lookahead_frames",
    "vad_context_frames",
    "vad_lookahead_frames",
    "decode_latents_per_call",
    "compile",
)


class CliError(RuntimeError):
    """A user-facing error: printed without a traceback, exit code 2."""


ToolRun = typing.Callable[[argparse.Namespace], int]


def reporting_cli_errors(body: ToolRun) -> ToolRun:
    """A tool subcommand's ``run``: ``body(args)``, with a :class:`CliError` printed as one line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


# ---------------------------------------------------------------------------------------------- shared options
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Networks and devices, shared by `generate` and `stream`."""
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        help=f"the student export (a DiT .safetensors); default: the first of {', '.join(DEFAULT_CHECKPOINTS)} "
        "that exists",
    )
    source.add_argument("--pretrained", metavar="NAME", help="a model zoo entry (dystream.zoo.load_pretrained)")
    group.add_argument("--vae", default=DEFAULT_VAE, help=f"the VAE export (default {DEFAULT_VAE})")
    group.add_argument("--audio", default=DEFAULT_AUDIO, help=f"the audio encoder export (default {DEFAULT_AUDIO})")
    group.add_argument("--device", default="cpu", help="device of the DiT and the audio encoder (cpu, cuda, cuda:0)")
    group.add_argument("--vae-device", default=None, help="device of the VAE decoder (default: --device)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The :class:`StreamingConfig` options, with their documented meaning as help."""
    from dystream.streaming.avatar import StreamingConfig

    group = parser.add_argument_group("generation")
    types = typing.get_type_hints(StreamingConfig)
    for name in CONFIG_FLAGS:
        f = next(f for f in dataclasses.fields(StreamingConfig) if f.name == name)
        flag = "--" + name.replace("_", "-")
        text = StreamingConfig.help(name)
        if name == "size":
            text = text.split(" (default")[0] + f" (default: the size the export records, else {DEFAULT_SIZE})"
            group.add_argument(flag, type=_parse_size, metavar="H[xW]", help=text)
        elif name == "renoise":
            group.add_argument(flag, choices=typing.get_args(types[name]), default=f.default, help=text)
        elif types[name] is bool:
            group.add_argument(flag, action="store_true", help=text)
        else:
            group.add_argument(flag, type=types[name], default=f.default, help=f"{text} (default {f.default})")
    group.add_argument("--single-thread", action="store_true", help="decode on the calling thread (no DiT/VAE overlap)")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be H or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be H or HxW with positive values, got {text!r}")
    return parts[0], parts[1]


def config_from_args(args: argparse.Namespace, generator: Any, vae: Any) -> Any:
    from dystream.streaming.avatar import StreamingConfig, _recorded_size

    values = {name: getattr(args, name) for name in CONFIG_FLAGS}
    if values["size"] is None:
        values["size"] = _recorded_size(generator, vae) or (DEFAULT_SIZE, DEFAULT_SIZE)
    return StreamingConfig(**values, threaded=not args.single_thread)


def load_networks(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(generator, vae, audio encoder) from --checkpoint/--pretrained, --vae and --audio."""
    generator = vae = audio = None
    if args.pretrained:
        generator, vae, audio = _from_zoo(args.pretrained)
    if generator is None:
        generator = _load(_checkpoint_path(args.checkpoint), "dit", "--checkpoint")
    if vae is None:
        vae = _load(_existing(args.vae, "--vae", "the VAE stage (make train RECIPE=vae)"), "vae", "--vae")
    if audio is None:
        made_by = "the teacher stage (make train RECIPE=teacher)"
        audio = _load(_existing(args.audio, "--audio", made_by), "audio", "--audio")
    return generator, vae, audio


def _load(path: str, arch: str, flag: str) -> Any:
    from dystream.zoo.files import WeightFileError, load_model

    try:
        return load_model(path, arch=arch)
    except WeightFileError as exc:
        raise CliError(f"{flag}: {exc}") from exc
    except RuntimeError as exc:  # load_state_dict: the file was written by other code than this checkout's
        first = str(exc).strip().splitlines()
        raise CliError(
            f"{flag}: {path} does not match this version's {arch!r} architecture ({' '.join(first[:2])}); "
            "re-export it with the current code"
        ) from exc


def _existing(path: str, flag: str, made_by: str) -> str:
    if not Path(path).is_file():
        raise CliError(f"{flag}: {path} does not exist; it is exported by {made_by}, or pass another file with {flag}")
    return path


def _checkpoint_path(checkpoint: str | None) -> str:
    if checkpoint is not None:
        return _existing(checkpoint, "--checkpoint", "the student stages (stage1_sid, stage2_gan)")
    for candidate in DEFAULT_CHECKPOINTS:
        if Path(candidate).is_file():
            print(f"using {candidate}", file=sys.stderr)
            return candidate
    raise CliError(
        f"no student checkpoint: none of {', '.join(DEFAULT_CHECKPOINTS)} exists; train one "
        "(make train RECIPE=stage1_sid) or pass --checkpoint PATH (any exported AvatarDiT streams)"
    )


def _from_zoo(name: str) -> tuple[Any, Any, Any]:
    """A zoo entry: an AvatarDiT, or a mapping / object with ``generator`` (or ``dit``), ``vae``, ``audio``."""
    import dystream.zoo as zoo

    if not hasattr(zoo, "load_pretrained"):
        raise CliError(
            "the model zoo is not available yet (dystream.zoo.load_pretrained does not exist); "
            "use --checkpoint with exported files (and --vae, --audio)"
        )
    entry = zoo.load_pretrained(name)
    from dystream.models.dit import AvatarDiT

    if isinstance(entry, AvatarDiT):
        return entry, None, None

    def get(*keys: str) -> Any:
        for key in keys:
            value = entry.get(key) if isinstance(entry, dict) else getattr(entry, key, None)
            if value is not None:
                return value
        return None

    generator = get("generator", "dit", "student")
    if generator is None:
        raise CliError(f"zoo entry {name!r} holds no generator (expected an AvatarDiT or keys generator/vae/audio)")
    return generator, get("vae"), get("audio", "audio_encoder")


# ---------------------------------------------------------------------------------------------- generate
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help="sample file: a JSON list of DyStream entries, or one entry")
    parser.add_argument("--out", required=True, help="output folder; each entry writes <out>/<video_id>.mp4")
    parser.add_argument(
        "--root", default=None, help="folder relative paths are resolved against (default: cwd, then the file's folder)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(parser)
    add_config_arguments(parser)


@reporting_cli_errors
def run(args: argparse.Namespace) -> int:
    from dystream.streaming.samples import SampleFileError, load_samples, render_sample

    try:
        entries = load_samples(args.samples, args.root)  # every entry checked before any generation
    except SampleFileError as exc:
        raise CliError(str(exc)) from exc
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from dystream.streaming.avatar import StreamingAvatar

    generator, vae, audio = load_networks(args)
    config = config_from_args(args, generator, vae)
    sessions: list[Any] = []

    def make_session(image: Any) -> StreamingAvatar:
        session = StreamingAvatar(generator, vae, audio, image, config, device=args.device, vae_device=args.vae_device)
        sessions.append(session)
        return session

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=args.quiet) as progress:
        for entry in entries:
            task = progress.add_task(entry.video_id, total=None)

            def advance(done: int, total: int, task: Any = task) -> None:
                progress.update(task, completed=done / 16000, total=total / 16000)

            try:
                path = render_sample(entry, make_session, args.out, advance)
            except SampleFileError as exc:
                raise CliError(str(exc)) from exc
            stats = sessions[-1].stats()
            progress.console.print(
                f"wrote {path}: {stats['frames']} frames ({stats['audio_seconds']:.2f} s), RTF DiT "
                f"{_fmt(stats['rtf_dit'])}, VAE {_fmt(stats['rtf_vae'])}, audio {_fmt(stats['rtf_audio'])}",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )
            sessions.clear()
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
