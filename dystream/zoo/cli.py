"""`dystream zoo`: list, download, import, verify and build the pretrained entries (docs/zoo.md).

dystream zoo list                          entries, where they come from, what is cached and verified
dystream zoo info NAME                     one entry in full
dystream zoo download NAME [--trust]       fetch into the cache (Hugging Face at the pinned revision, or URL)
dystream zoo import NAME PATH [--trust]    offline: check a file you obtained elsewhere and place it in the cache
dystream zoo verify [NAME ...]             re-hash cached files
dystream zoo build-local [--runs runs]     collect our own recipes' exports into the cache (make zoo)
dystream zoo text-context --out FILE       encode the fixed prompt with umT5 (downloads the encoder)
"""

from __future__ import annotations

import argparse
import sys

HELP = "pretrained entries: list, download, import (offline), verify, build local entries"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", default=None, help="cache root (default: $DYSTREAM_CACHE or ~/.cache/dystream)")
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", parents=[common], help="entries with their source, licence and cache status")
    p.add_argument("--kind", default=None, help="only entries of this kind (base, teacher, student, metric, ...)")

    p = sub.add_parser("info", parents=[common], help="everything about one entry")
    p.add_argument("name")

    p = sub.add_parser("download", parents=[common], help="download entries into the cache and verify them")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--trust", action="store_true", help="accept files without a published sha256 (prints, pins it)")
    p.add_argument("--force", action="store_true", help="download again even if a verified copy is cached")

    p = sub.add_parser(
        "import", parents=[common], help="offline: check files you obtained elsewhere and place them in the cache"
    )
    p.add_argument("name")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, or directories holding the entry's files")
    p.add_argument("--trust", action="store_true", help="accept files without a published sha256 (prints, pins it)")

    p = sub.add_parser("verify", parents=[common], help="re-hash cached files (all cached entries by default)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--trust", action="store_true", help="accept unpinned files without a published hash")

    p = sub.add_parser(
        "build-local", parents=[common], help="collect the stage exports under RUNS into the cache (local.json)"
    )
    p.add_argument("--runs", default="runs", help="the runs directory the recipes export into")

    p = sub.add_parser(
        "text-context", parents=[common], help="encode the fixed prompt with umT5-XXL (downloads the encoder)"
    )
    p.add_argument("--out", required=True, help="output .safetensors file; then `dystream zoo import ... --trust`")
    p.add_argument("--prompt", default=None, help="default: the paper's 'a person is speaking and listening'")
    p.add_argument("--revision", default=None, help="revision of Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from dystream.zoo.cache import ZooError

    try:
        return _COMMANDS[args.zoo_command](args)
    except ZooError as exc:
        print(f"dystream zoo {args.zoo_command}: {exc}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    from dystream.zoo.cache import cache_dir, status
    from dystream.zoo.registry import get_entry, list_pretrained

    cache = cache_dir(args.cache)
    rows = []
    for name in list_pretrained(args.kind):
        entry = get_entry(name)
        label = name + (f" ({', '.join(entry.aliases)})" if entry.aliases else "")
        hashes = "sha256" if entry.verified else "UNVERIFIED"
        rows.append((label, entry.kind, f"{entry.source}/{hashes}", status(entry, cache)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"cache: {cache}")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _info(args: argparse.Namespace) -> int:
    from dystream.zoo.cache import cache_dir, expected_hashes, fix_command, local_manifest, status
    from dystream.zoo.registry import get_entry

    entry = get_entry(args.name)
    cache = cache_dir(args.cache)
    print(f"{entry.name}  ({entry.kind}, arch {entry.arch}, loader {entry.loader})")
    if entry.aliases:
        print(f"  aliases:  {', '.join(entry.aliases)}")
    print(f"  source:   {entry.where()}")
    print(f"  license:  {entry.license}")
    if entry.produced_by:
        print(f"  recipe:   {entry.produced_by}")
    if entry.notes:
        print(f"  notes:    {entry.notes}")
    for path, expected, origin in expected_hashes(cache, entry):
        print(f"  file:     {path}\n            sha256 {expected or '-'} ({origin})")
    if entry.source == "local" and entry.name in local_manifest(cache):
        record = local_manifest(cache)[entry.name]
        print(f"  built:    {record['built']} from {record['source']} (commit {record['commit']})")
    print(f"  status:   {status(entry, cache)}")
    print(f"  provide:  {fix_command(entry)}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from dystream.zoo.cache import cache_dir, download
    from dystream.zoo.registry import get_entry

    cache = cache_dir(args.cache)
    for name in args.names:
        download(get_entry(name), cache, trust=args.trust, force=args.force)
    return 0


def _import(args: argparse.Namespace) -> int:
    from dystream.zoo.cache import cache_dir, import_files
    from dystream.zoo.registry import get_entry

    entry = get_entry(args.name)
    for path in import_files(entry, args.paths, cache_dir(args.cache), trust=args.trust):
        print(f"{entry.name}: imported {path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dystream.zoo.cache import NotCachedError, UnverifiedError, ZooError, cache_dir, check_entry, status
    from dystream.zoo.registry import get_entry, list_pretrained

    cache = cache_dir(args.cache)
    names = args.names or [
        n for n in list_pretrained() if status(get_entry(n), cache) not in ("not cached", "not built")
    ]
    if not names:
        print(f"nothing cached in {cache}")
        return 0
    failed = 0
    for name in names:
        entry = get_entry(name)
        try:
            paths = check_entry(entry, cache, trust=args.trust)
            print(f"OK    {entry.name} ({len(paths)} file{'s' * (len(paths) > 1)})")
        except (NotCachedError, UnverifiedError, ZooError) as exc:
            failed += 1
            print(f"FAIL  {entry.name}: {exc}")
    return 1 if failed else 0


def _build_local(args: argparse.Namespace) -> int:
    from dystream.zoo.cache import build_local, cache_dir
    from dystream.zoo.entries import ENTRIES

    cache = cache_dir(args.cache)
    report = build_local(ENTRIES, args.runs, cache)
    for name, what, detail in report:
        print(f"{what:8s} {name}: {detail}")
    print(f"manifest: {cache / 'local.json'}")
    return 0 if any(what == "built" for _, what, _ in report) else 1


def _text_context(args: argparse.Namespace) -> int:
    from dystream.zoo.text_context import PROMPT, make_text_context

    out = make_text_context(args.out, prompt=args.prompt or PROMPT, revision=args.revision, device=args.device)
    print(f"wrote {out}; register it with `dystream zoo import wan2.2-ti2v-5b.prompt-context {out} --trust`")
    return 0


_COMMANDS = {
    "list": _list,
    "info": _info,
    "download": _download,
    "import": _import,
    "verify": _verify,
    "build-local": _build_local,
    "text-context": _text_context,
}
