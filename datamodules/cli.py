"""`dystream data synth|pack|index[|encode]`: write and maintain shards (docs/data.md).

`encode` (latent export) appears once `dystream.datamodules.latents` exists; it exposes
`add_arguments(parser)` and `run(args)` itself.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

HELP = "data tools: synthesize the synthetic dyadic world, pack real clips into shards, rebuild an index"

LATENTS_MODULE = "dystream.datamodules.latents"


def _latents_available() -> bool:
    try:
        return importlib.util.find_spec(LATENTS_MODULE) is not None
    except ModuleNotFoundError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    synth = sub.add_parser(
        "synth",
        help="render the synthetic dyadic world into shards (OUT/train, OUT/val)",
        description="Render the synthetic dyadic world (the embedded default dataset) into OUT/train and, "
        "with --val-clips, OUT/val with identities disjoint from train. Deterministic for a seed.",
    )
    synth.add_argument("--out", required=True, help="output folder; train/ and val/ are written inside it")
    synth.add_argument("--clips", type=int, required=True, help="training clips")
    synth.add_argument("--val-clips", type=int, default=0, help="validation clips (other identities)")
    synth.add_argument("--size", type=int, default=64, help="frame width and height in pixels (even)")
    synth.add_argument("--seconds", type=float, default=4.0, help="clip length in seconds (25 fps)")
    synth.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same clips")
    synth.add_argument("--clips-per-identity", type=int, default=4, help="clips that show the same person")
    synth.add_argument("--shard-samples", type=int, default=8, help="clips per shard")
    synth.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count, at most 8)")
    synth.add_argument("--crf", type=int, default=20, help="x264 constant rate factor (lower = better)")

    pack = sub.add_parser(
        "pack",
        help="pack folders of clip.mp4 + self.wav (+ other.wav | mix.wav) into shards",
        description="Re-encode clips to constant 25 fps H.264, resample audio to 16 kHz mono, compute "
        "speaking masks with silero-vad on each person's own track, or by active-speaker detection (S3FD + "
        "Light-ASD) when --asd-weights and --face-detector-weights are given (then a clip with only mix.wav is "
        "split by the mask), and write bounded shards plus index.json. See docs/data.md for the input layout.",
    )
    pack.add_argument("--in", dest="in_dir", required=True, help="input root; every folder with a clip.mp4 is a clip")
    pack.add_argument("--out", required=True, help="output shard folder")
    pack.add_argument("--shard-samples", type=int, default=256, help="at most this many clips per shard")
    pack.add_argument("--max-shard-mb", type=float, default=512.0, help="at most this many MiB per shard")
    pack.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count, at most 8)")
    pack.add_argument("--max-side", type=int, default=None, help="downscale so that the longer side is at most this")
    pack.add_argument("--crf", type=int, default=20, help="x264 constant rate factor (lower = better)")
    pack.add_argument("--vad-threshold", type=float, default=0.5, help="silero-vad speech probability threshold")
    pack.add_argument(
        "--asd-weights",
        default=None,
        metavar="PATH",
        help="Light-ASD weights (pretrain_AVA_CVPR.model or finetuning_TalkSet.model, or the zoo entry "
        "light-asd.ava / light-asd.talkset): masks by active-speaker detection instead of VAD; needs "
        "--face-detector-weights",
    )
    pack.add_argument(
        "--face-detector-weights",
        default=None,
        metavar="PATH",
        help="S3FD weights for --asd-weights (sfd_face.pth of TalkNet-ASD, or the zoo entry s3fd.sfd-face)",
    )
    pack.add_argument("--asd-device", default="cpu", help="torch device of the ASD networks, e.g. cpu or cuda")

    index = sub.add_parser(
        "index",
        help="rebuild index.json of a shard folder (sample counts; lists incomplete samples)",
        description="Scan every *.tar in DIR (member names only) and rewrite DIR/index.json.",
    )
    index.add_argument("dir", help="shard folder")

    if _latents_available():
        latents = importlib.import_module(LATENTS_MODULE)
        encode = sub.add_parser(
            "encode",
            help="encode shards into cached-latent shards with a frozen VAE",
            description=(latents.__doc__ or "").strip().splitlines()[0] if latents.__doc__ else None,
        )
        latents.add_arguments(encode)


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "data_command", None)
    if command == "synth":
        from dystream.datamodules.synthetic import synthesize

        indexes = synthesize(
            args.out,
            clips=args.clips,
            val_clips=args.val_clips,
            size=args.size,
            seconds=args.seconds,
            seed=args.seed,
            clips_per_identity=args.clips_per_identity,
            shard_samples=args.shard_samples,
            workers=args.workers,
            crf=args.crf,
            log=True,
        )
        for split, index in indexes.items():
            print(f"  {Path(args.out) / split}: {index['total_samples']} clips in {len(index['shards'])} shards")
        return 0
    if command == "pack":
        from dystream.datamodules.pack import pack
        from dystream.zoo.cache import ZooError

        try:
            index = pack(
                args.in_dir,
                args.out,
                shard_samples=args.shard_samples,
                max_shard_mb=args.max_shard_mb,
                workers=args.workers,
                max_side=args.max_side,
                crf=args.crf,
                vad={"threshold": args.vad_threshold},
                log=True,
                asd_weights=args.asd_weights,
                face_detector_weights=args.face_detector_weights,
                asd_device=args.asd_device,
            )
        except (
            ValueError,
            LookupError,
            FileNotFoundError,
            ZooError,
        ) as exn:  # bad options or input: one line, no traceback
            print(f"dystream data pack: {exn}", file=sys.stderr)
            return 2
        return 1 if index.get("skipped") else 0
    if command == "index":
        from dystream.datamodules.format import build_index

        index = build_index(args.dir)
        print(f"{args.dir}: {index['total_samples']} samples in {len(index['shards'])} shards")
        if index["problems"]:
            print("incomplete samples (a key with a dot shows up as unknown fields):")
            print(json.dumps(index["problems"], indent=1))
            return 1
        return 0
    if command == "encode" and _latents_available():
        return int(importlib.import_module(LATENTS_MODULE).run(args) or 0)
    print("usage: dystream data {synth,pack,index" + (",encode" if _latents_available() else "") + "} ... (see --help)")
    return 2
