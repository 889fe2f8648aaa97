"""The public zoo API: look entries up, resolve names to verified files, load models. Never downloads.

``load_pretrained(name)`` takes the files from the cache, hashes them against the entry (or the local manifest),
and hands them to the entry's loader; a missing, partial, tampered or unverified file raises one
:class:`~dystream.zoo.cache.ZooError` whose message names the command that fixes it. Downloading is a separate,
explicit step (``dystream zoo download``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from dystream.zoo.cache import UnknownEntryError, ZooError, check_entry, entry_dir
from dystream.zoo.cache import cache_dir as cache_root
from dystream.zoo.entries import ENTRIES, PretrainedEntry

__all__ = [
    "entry_files",
    "get_entry",
    "get_pretrained_cfg",
    "is_entry",
    "list_pretrained",
    "load_pretrained",
    "load_text_context",
    "load_weights",
    "resolve",
]


def _index() -> dict[str, PretrainedEntry]:
    index: dict[str, PretrainedEntry] = {}
    for entry in ENTRIES:
        for key in (entry.name, *entry.aliases):
            if key in index:
                raise ZooError(f"zoo table: name {key!r} is used twice ({index[key].name}, {entry.name})")
            index[key] = entry
    return index


def list_pretrained(kind: str | None = None) -> list[str]:
    """Names of all entries (optionally of one ``kind``), in table order."""
    return [e.name for e in ENTRIES if kind is None or e.kind == kind]


def is_entry(name: str | os.PathLike) -> bool:
    """True if ``name`` is an entry name or alias."""
    return isinstance(name, str) and name in _index()


def get_entry(name: str) -> PretrainedEntry:
    """The entry called ``name`` (or with that alias)."""
    index = _index()
    if name not in index:
        close = difflib.get_close_matches(name, list(index), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownEntryError(f"unknown zoo entry {name!r}{hint} (`dystream zoo list` shows them all)")
    return index[name]


get_pretrained_cfg = get_entry  # timm's name for the same lookup


def entry_files(
    name: str | PretrainedEntry, cache_dir: str | os.PathLike | None = None, trust: bool = False
) -> list[Path]:
    """The verified cached files of an entry, in the order of ``entry.files``."""
    entry = name if isinstance(name, PretrainedEntry) else get_entry(name)
    return check_entry(entry, cache_root(cache_dir), trust=trust)


def resolve(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None, trust: bool = False) -> Path:
    """A checkpoint argument -> a file: an existing path as is, an entry name -> its verified cached file.

    Multi-file entries resolve to their cache directory (all files verified). Anything else is an error naming
    both readings (``UnknownEntryError``, a ``FileNotFoundError`` too).
    """
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if is_entry(str(path_or_name)):
        entry = get_entry(str(path_or_name))
        files = entry_files(entry, cache_dir, trust)
        return files[0] if len(files) == 1 else entry_dir(cache_root(cache_dir), entry)
    raise _Unresolved(
        f"{str(path_or_name)!r} is neither an existing file nor a zoo entry name; give a path to a weight file "
        "or one of the names `dystream zoo list` prints"
    )


class _Unresolved(UnknownEntryError, FileNotFoundError):
    pass


def load_pretrained(
    name: str, cache_dir: str | os.PathLike | None = None, trust: bool = False, **overrides: Any
) -> Any:
    """Load the zoo entry ``name`` from the cache, verified and strict; never downloads.

    Args:
        name: entry name or alias (``list_pretrained()``).
        cache_dir: cache root; default ``$DYSTREAM_CACHE`` or ``~/.cache/dystream``.
        trust: accept files that have no published sha256 and no pin (their hash is printed).
        overrides: passed to the entry's loader: config fields for DiT / audio presets (e.g. ``audio_dim``),
            ``map_location`` for dystream files, ``device`` for metric networks.

    Raises:
        ZooError: ``NotCachedError`` (missing or interrupted: run ``dystream zoo download NAME`` or
            ``dystream zoo import NAME PATH``), ``ChecksumError`` (tampered or wrong file), ``UnverifiedError``
            (no published hash and ``trust`` not given), ``UnknownEntryError``.
    """
    from dystream.zoo.loaders import LOADERS

    entry = get_entry(name)
    cache = cache_root(cache_dir)
    paths = check_entry(entry, cache, trust=trust)
    return LOADERS[entry.loader](entry, paths, dict(overrides), cache)


def load_weights(
    path_or_name: str | os.PathLike,
    arch: str,
    cache_dir: str | os.PathLike | None = None,
    adapter_overrides: dict[str, Any] | None = None,
) -> Any:
    """A network for a recipe argument that is a dystream weight file or a zoo entry of family ``arch``.

    Plain paths and local entries load exactly as :func:`dystream.zoo.files.load_model` (strict; the file carries
    its config). Foreign entries go through their adapter (:func:`load_pretrained`), built with
    ``adapter_overrides`` (e.g. the width of the audio modules the Wan2.2 base lacks).
    """
    from dystream.zoo.files import load_model

    if is_entry(str(path_or_name)) and not Path(path_or_name).exists():
        entry = get_entry(str(path_or_name))
        if entry.family != arch:
            raise ZooError(f"zoo entry {entry.name!r} holds a {entry.family!r} network, expected a {arch!r} one")
        if entry.loader != "dystream":
            return load_pretrained(entry.name, cache_dir=cache_dir, **(adapter_overrides or {}))
    return load_model(resolve(path_or_name, cache_dir=cache_dir), arch=arch)


def load_text_context(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Any:
    """The fixed-prompt context ``[L, text_dim]`` from a file (``.safetensors`` / torch tensor) or a zoo entry."""
    from dystream.zoo.loaders import read_text_context

    if is_entry(str(path_or_name)) and not Path(path_or_name).exists():
        entry = get_entry(str(path_or_name))
        if entry.family != "text-context":
            raise ZooError(f"zoo entry {entry.name!r} is not a text context (it is a {entry.kind!r} entry)")
        return load_pretrained(entry.name, cache_dir=cache_dir)
    return read_text_context(resolve(path_or_name, cache_dir=cache_dir))
