"""`dystream serve`: live calls with the avatar in a web browser (WebRTC), one StreamingAvatar per call.

    dystream serve --checkpoint runs/stage1_sid/student.safetensors      # then open http://127.0.0.1:8080/

The model options are those of `dystream generate` / `stream` (:mod:`dystream.streaming.cli`); the server options
come from :class:`~dystream.serving.config.ServeConfig`. docs/serving.md describes the protocol and deployment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from dystream.serving.config import ServeConfig
from dystream.streaming.cli import (
    CliError,
    add_config_arguments,
    add_model_arguments,
    config_from_args,
    load_networks,
    reporting_cli_errors,
)

HELP = "serve live calls: a web page and a WebRTC API, the avatar listens to the microphone and speaks a voice"

TOKEN_ENV = "DYSTREAM_SERVE_TOKEN"
# ServeConfig fields offered on the command line, with their flag type
FLAGS: dict[str, Any] = {
    "host": str,
    "port": int,
    "token": str,
    "max_sessions": int,
    "allow_origins": str,
    "idle_timeout_s": float,
    "max_session_s": float,
    "playout_delay_s": float,
    "max_backlog_s": float,
    "max_image_bytes": int,
    "max_voice_bytes": int,
    "references_dir": str,
    "voices_dir": str,
    "ice_servers": str,
    "ice_username": str,
    "ice_credential": str,
    "ice_addresses": str,
}
REPEATED = ("allow_origins", "ice_servers", "ice_addresses")
FLAG_NAMES = {
    "idle_timeout_s": "idle-timeout",
    "max_session_s": "max-session-time",
    "playout_delay_s": "playout-delay",
    "max_backlog_s": "max-backlog",
    "references_dir": "references",
    "voices_dir": "voices",
    "allow_origins": "allow-origin",
    "ice_servers": "ice-server",
    "ice_addresses": "ice-address",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    defaults = ServeConfig()
    for name, kind in FLAGS.items():
        flag = "--" + FLAG_NAMES.get(name, name.replace("_", "-"))
        text = ServeConfig.help(name)
        if name in REPEATED:
            group.add_argument(flag, dest=name, action="append", type=kind, help=f"{text} (repeatable)")
        else:
            default = getattr(defaults, name)
            suffix = f" (default {default})" if default is not None else ""
            group.add_argument(flag, dest=name, type=kind, default=default, help=text + suffix)
    group.add_argument("--no-warmup", dest="warmup", action="store_false", help=ServeConfig.help("warmup"))
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of each call's worker and decoder thread (default: torch's, all cores; with "
        "several calls on a CPU, cores / calls avoids oversubscription)",
    )
    group.add_argument("--log-level", default="INFO", help="logging level of the server (DEBUG, INFO, WARNING)")
    add_model_arguments(parser)
    add_config_arguments(parser)


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = {name: getattr(args, name) for name in FLAGS}
    values["warmup"] = args.warmup
    values["token"] = values["token"] or os.environ.get(TOKEN_ENV) or None
    for name in REPEATED:
        values[name] = tuple(values[name] or ())
    values["ice_addresses"] = values["ice_addresses"] or None
    try:
        return ServeConfig(**values)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def avatar_factory(networks: tuple[Any, Any, Any], config: Any, device: str, vae_device: str | None, **kw: Any):
    """``factory(reference) -> StreamingAvatar`` sharing the loaded networks between calls (each call has its own
    KV cache, decode cache, audio buffers and noise generator; the weights are read-only)."""
    from dystream.streaming.avatar import StreamingAvatar

    generator, vae, audio = networks

    def factory(reference: Any) -> StreamingAvatar:
        return StreamingAvatar(generator, vae, audio, reference, config, device=device, vae_device=vae_device, **kw)

    return factory


@reporting_cli_errors
def run(args: argparse.Namespace) -> int:
    serve = serve_config_from_args(args)  # refuses an exposed address without a token before loading anything
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    networks = load_networks(args)
    config = config_from_args(args, networks[0], networks[1])
    from aiohttp import web

    from dystream.serving.app import create_app

    app = create_app(avatar_factory(networks, config, args.device, args.vae_device), serve, config.size)
    shown = "127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host
    print(f"dystream serve: open http://{shown}:{serve.port}/ (max {serve.max_sessions} calls)", file=sys.stderr)
    web.run_app(app, host=serve.host, port=serve.port, print=None)
    return 0
