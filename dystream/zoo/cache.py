"""The zoo cache: where entry files live, how they are checked, and the only code that downloads anything.

Layout of ``<cache>`` (explicit argument, else ``$DYSTREAM_CACHE``, else ``~/.cache/dystream``; EDM2's precedence)::

    files/<entry name>/<file>        remote and manual entries (downloaded or imported)
    local/<entry name>.safetensors   local entries (collected from runs/ by build-local)
    local.json                       manifest of the local entries: sha256, source file, recipe, commit
    trusted.json                     sha256 the user accepted with --trust for files without a published hash
    verified.json                    (size, mtime) stamps of the last full check, for `dystream zoo list` only

Every load re-hashes the files (``check_entry``); the stamps never replace that check. A file is written under its
final name only after its hash matched (downloads go to ``*.partial`` first, copies to a temporary name), so a
crash never leaves a file that looks complete.

Downloads happen only in :func:`download` (``dystream zoo download``): ``huggingface_hub.hf_hub_download`` at the
entry's revision, or ``urllib`` for URL entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dystream.zoo.entries import PretrainedEntry, RemoteFile

__all__ = [
    "ENV_VAR",
    "ChecksumError",
    "DownloadError",
    "NotCachedError",
    "UnknownEntryError",
    "UnverifiedError",
    "ZooError",
    "build_local",
    "cache_dir",
    "check_entry",
    "download",
    "import_files",
    "sha256_file",
    "status",
]

ENV_VAR = "DYSTREAM_CACHE"
PARTIAL = ".partial"


# ---------------------------------------------------------------------------------------------------------- errors
class ZooError(RuntimeError):
    """Base class of every zoo error; the message says which command fixes the problem."""


class UnknownEntryError(ZooError, LookupError):
    """The name is not a zoo entry (nor an existing path, for ``resolve``)."""


class NotCachedError(ZooError, FileNotFoundError):
    """An entry file is not in the cache (never provided, or its download was interrupted)."""


class ChecksumError(ZooError):
    """A file's sha256 differs from the expected one (tampered, truncated, or simply another file)."""


class UnverifiedError(ZooError):
    """The entry has no published sha256 for a file and the user did not pass ``--trust`` / ``trust=True``."""


class DownloadError(ZooError):
    """A download failed (network, missing huggingface_hub, HTTP error)."""


# ---------------------------------------------------------------------------------------------------------- paths
def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The cache root: ``explicit``, else ``$DYSTREAM_CACHE``, else ``~/.cache/dystream``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dystream"


def file_path(cache: Path, entry: PretrainedEntry, rf: RemoteFile) -> Path:
    return cache / "files" / entry.name / rf.basename


def local_path(cache: Path, entry: PretrainedEntry) -> Path:
    return cache / "local" / f"{entry.name}.safetensors"


def entry_dir(cache: Path, entry: PretrainedEntry) -> Path:
    return cache / "local" if entry.source == "local" else cache / "files" / entry.name


def fix_command(entry: PretrainedEntry) -> str:
    """The command that provides (or re-provides) an entry's files."""
    if entry.source == "local":
        return f"`make zoo` (or `dystream zoo build-local --runs RUNS`) after training recipe {entry.produced_by}"
    if entry.source == "manual":
        return (
            f"`dystream zoo import {entry.name} PATH` with the file made by `{entry.produced_by}` "
            "(add --trust: it has no published sha256)"
        )
    trust = "" if entry.verified else " --trust"
    return (
        f"`dystream zoo download {entry.name}{trust}`, or offline `dystream zoo import {entry.name} PATH{trust}` "
        f"with the file(s) from {entry.where()}"
    )


# ---------------------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy ``src`` to a temporary file next to ``dst``; return its sha256 (the caller renames or removes it)."""
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(1 << 20):
            digest.update(block)
            fout.write(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------- manifests
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZooError(f"{path} is not valid JSON ({exc}); delete it and rebuild (it is only a cache record)") from exc
    if not isinstance(data, dict):
        raise ZooError(f"{path} does not hold a JSON object; delete it and rebuild")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)  # atomic: readers see the old or the new manifest, never half of one


def local_manifest(cache: Path) -> dict[str, Any]:
    return _read_json(cache / "local.json").get("entries", {})


def _trusted(cache: Path) -> dict[str, dict[str, str]]:
    return _read_json(cache / "trusted.json")


def _pin(cache: Path, entry: PretrainedEntry, rf: RemoteFile, digest: str) -> None:
    pins = _trusted(cache)
    pins.setdefault(entry.name, {})[rf.basename] = digest
    _write_json(cache / "trusted.json", pins)


def _stamp(cache: Path, path: Path, digest: str) -> None:
    stamps = _read_json(cache / "verified.json")
    st = path.stat()
    stamps[str(path.relative_to(cache))] = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_json(cache / "verified.json", stamps)


# ---------------------------------------------------------------------------------------------------------- checking
def expected_hashes(cache: Path, entry: PretrainedEntry) -> list[tuple[Path, str | None, str]]:
    """(cached path, expected sha256 or None, where the expectation comes from) for every file of ``entry``."""
    if entry.source == "local":
        record = local_manifest(cache).get(entry.name)
        return [(local_path(cache, entry), record["sha256"] if record else None, "local manifest")]
    pins = _trusted(cache).get(entry.name, {})
    out = []
    for rf in entry.files:
        if rf.sha256 is not None:
            out.append((file_path(cache, entry, rf), rf.sha256, "published sha256"))
        else:
            pin = pins.get(rf.basename)
            out.append((file_path(cache, entry, rf), pin, "your --trust pin" if pin else "none published"))
    return out


def check_entry(entry: PretrainedEntry, cache: Path, trust: bool = False) -> list[Path]:
    """Hash every file of ``entry`` and return their paths; raise one :class:`ZooError` naming the fix otherwise."""
    if entry.source == "local" and entry.name not in local_manifest(cache):
        raise NotCachedError(f"zoo entry {entry.name!r} has not been built into {cache}: run {fix_command(entry)}")
    paths = []
    for path, expected, origin in expected_hashes(cache, entry):
        if not path.is_file():
            partial = path.with_name(path.name + PARTIAL)
            why = "its download was interrupted" if partial.exists() else "it is not in the cache"
            raise NotCachedError(
                f"zoo entry {entry.name!r}: {why} ({path}). Nothing is downloaded at run time: run {fix_command(entry)}"
            )
        digest = sha256_file(path)
        if expected is None:
            if not trust:
                raise UnverifiedError(
                    f"zoo entry {entry.name!r}: {path.name} has no published sha256 and you have not trusted it; "
                    f"its sha256 is {digest}. Pass trust=True (or re-import it with "
                    f"`dystream zoo import {entry.name} PATH --trust`, which pins this hash)"
                )
            print(f"dystream zoo: trusting unverified {path} (sha256 {digest})", file=sys.stderr)
        elif digest != expected:
            raise ChecksumError(
                f"zoo entry {entry.name!r}: {path} is corrupt, incomplete or not the expected file: sha256 {digest}, "
                f"expected {expected} ({origin}). Replace it: run {fix_command(entry)}"
            )
        else:
            _stamp(cache, path, digest)
        paths.append(path)
    return paths


def status(entry: PretrainedEntry, cache: Path) -> str:
    """One-line cache status for `dystream zoo list` (cheap: uses the stamps of the last full check)."""
    stamps = _read_json(cache / "verified.json")
    if entry.source == "local" and entry.name not in local_manifest(cache):
        return "not built"
    states = []
    for path, expected, origin in expected_hashes(cache, entry):
        if not path.is_file():
            states.append("partial download" if path.with_name(path.name + PARTIAL).exists() else "missing")
            continue
        if expected is None:
            states.append("unverified (no published sha256; --trust)")
            continue
        stamp = stamps.get(str(path.relative_to(cache)))
        st = path.stat()
        if stamp and stamp["sha256"] == expected and (stamp["size"], stamp["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            states.append("verified" if origin != "your --trust pin" else "verified (your pin)")
        elif stamp:
            states.append("changed since verified")
        else:
            states.append("not checked yet")
    if all(s == "missing" for s in states):
        return "not cached"
    if len(set(states)) == 1:
        return states[0] if states[0] == "partial download" else f"cached, {states[0]}"
    return "; ".join(f"{p.name}: {s}" for (p, _, _), s in zip(expected_hashes(cache, entry), states, strict=True))


# ---------------------------------------------------------------------------------------------------------- providing
def _accept(cache: Path, entry: PretrainedEntry, rf: RemoteFile, tmp: Path, digest: str, trust: bool) -> Path:
    """Move a fully written ``tmp`` into place if its hash is acceptable; remove it otherwise."""
    final = file_path(cache, entry, rf)
    pin = None if rf.sha256 else _trusted(cache).get(entry.name, {}).get(rf.basename)
    if rf.sha256 is not None:
        if digest != rf.sha256:
            tmp.unlink(missing_ok=True)
            raise ChecksumError(
                f"zoo entry {entry.name!r}: {rf.basename} has sha256 {digest}, expected the published {rf.sha256}; "
                "refused (not the published file, or damaged in transit)"
            )
    elif trust:
        _pin(cache, entry, rf, digest)
        print(f"{entry.name}: {rf.basename} sha256 {digest} (unverified; pinned in {cache / 'trusted.json'})")
    elif pin is not None:
        if digest != pin:
            tmp.unlink(missing_ok=True)
            raise ChecksumError(
                f"zoo entry {entry.name!r}: {rf.basename} has sha256 {digest}, expected {pin} (the hash you pinned "
                "with --trust); refused. Pass --trust again to replace your pin"
            )
    else:
        tmp.unlink(missing_ok=True)
        raise UnverifiedError(
            f"zoo entry {entry.name!r}: {rf.basename} has no published sha256 (this copy: {digest}); refused. "
            "Re-run with --trust to accept it: its hash is then recorded as your pin"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    _stamp(cache, final, digest)
    return final


def import_files(
    name_or_entry: PretrainedEntry, paths: Sequence[str | os.PathLike], cache: Path, trust: bool = False
) -> list[Path]:
    """Copy files the user obtained elsewhere into the cache, after checking each against its sha256 (offline path).

    ``paths`` are files (matched to the entry's files by base name; a single-file entry takes any name) or
    directories searched for the entry's base names (e.g. a Hugging Face snapshot).
    """
    entry = name_or_entry
    if entry.source == "local":
        raise ZooError(f"zoo entry {entry.name!r} is built from runs/, not imported: run {fix_command(entry)}")
    given = [Path(p).expanduser() for p in paths]
    for p in given:
        if not p.exists():
            raise ZooError(f"dystream zoo import {entry.name}: no such file or directory: {p}")
    chosen: dict[str, Path] = {}
    for rf in entry.files:
        for p in given:
            if p.is_dir():
                for cand in (p / rf.filename, p / rf.basename):
                    if cand.is_file():
                        chosen.setdefault(rf.basename, cand)
            elif p.name == rf.basename or len(entry.files) == 1 and len(given) == 1:
                chosen.setdefault(rf.basename, p)
    unmatched = [p for p in given if p.is_file() and p not in chosen.values()]
    if unmatched:
        raise ZooError(
            f"dystream zoo import {entry.name}: {[str(p) for p in unmatched]} match none of the entry's files "
            f"{[rf.basename for rf in entry.files]}"
        )
    if not chosen:
        raise ZooError(
            f"dystream zoo import {entry.name}: none of the entry's files {[rf.basename for rf in entry.files]} "
            f"found in {[str(p) for p in given]}"
        )
    out = []
    for rf in entry.files:
        src = chosen.get(rf.basename)
        if src is None:
            continue
        final = file_path(cache, entry, rf)
        tmp = final.with_name(f".{final.name}.import")
        digest = _copy_hashed(src, tmp)
        try:
            out.append(_accept(cache, entry, rf, tmp, digest, trust))
        except ZooError as exc:
            raise type(exc)(f"{exc} [import of {src}]") from None
    missing = [rf.basename for rf in entry.files if rf.basename not in chosen]
    if missing:
        print(f"{entry.name}: still missing {missing}; import them too before loading", file=sys.stderr)
    return out


def download(entry: PretrainedEntry, cache: Path, trust: bool = False, force: bool = False) -> list[Path]:
    """Download an entry's files into the cache and verify them (the only function in dystream that downloads)."""
    if entry.source == "local":
        raise ZooError(f"zoo entry {entry.name!r} is built locally, not downloaded: run {fix_command(entry)}")
    if entry.source == "manual":
        raise ZooError(f"zoo entry {entry.name!r} cannot be downloaded: run {fix_command(entry)}")
    pins = _trusted(cache).get(entry.name, {})
    unverified = [rf.basename for rf in entry.files if rf.sha256 is None and rf.basename not in pins]
    if unverified and not trust:
        raise UnverifiedError(
            f"zoo entry {entry.name!r}: {unverified} have no published sha256; refused. Re-run with --trust to "
            "download them anyway: their hashes are printed and pinned in the cache"
        )
    if entry.source == "hf" and not entry.pinned:
        warnings.warn(
            f"zoo entry {entry.name!r}: revision {entry.revision!r} is not a commit; the files may change upstream "
            "(pin a commit in dystream/zoo/entries.py)",
            stacklevel=2,
        )
    out = []
    for rf in entry.files:
        final = file_path(cache, entry, rf)
        if final.is_file() and not force:
            expected = rf.sha256 or _trusted(cache).get(entry.name, {}).get(rf.basename)
            if expected is not None and sha256_file(final) == expected:
                print(f"{entry.name}: {rf.basename} already cached and verified")
                out.append(final)
                continue
        final.parent.mkdir(parents=True, exist_ok=True)
        if entry.source == "hf":
            tmp, digest = _download_hf(entry, rf, final)
        else:
            tmp, digest = _download_url(rf, final)
        out.append(_accept(cache, entry, rf, tmp, digest, trust))
        print(f"{entry.name}: {rf.basename} downloaded and verified")
    return out


def _download_hf(entry: PretrainedEntry, rf: RemoteFile, final: Path) -> tuple[Path, str]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise DownloadError("downloading Hugging Face entries needs the huggingface_hub package") from exc
    staging = final.parent / ".download"
    try:
        got = Path(hf_hub_download(entry.hf_repo, rf.filename, revision=entry.revision, local_dir=staging))
    except Exception as exc:  # network, auth, 404 ...: one error type for the CLI
        raise DownloadError(
            f"zoo entry {entry.name!r}: downloading {rf.filename} from {entry.where()} failed ({exc}); "
            f"offline, import the file instead: `dystream zoo import {entry.name} PATH`"
        ) from exc
    tmp = final.with_name(final.name + PARTIAL)
    os.replace(got, tmp)
    shutil.rmtree(staging, ignore_errors=True)
    return tmp, sha256_file(tmp)


def _download_url(rf: RemoteFile, final: Path) -> tuple[Path, str]:
    import urllib.request

    tmp = final.with_name(final.name + PARTIAL)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(rf.url, timeout=60) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
    except OSError as exc:  # URLError and HTTPError are OSErrors; the .partial file stays as evidence
        raise DownloadError(
            f"downloading {rf.url} failed ({exc}); offline, import the file instead: `dystream zoo import NAME PATH`"
        ) from exc
    return tmp, digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------- local
def build_local(entries: Iterable[PretrainedEntry], runs: str | os.PathLike, cache: Path) -> list[tuple[str, str, str]]:
    """Collect the stage exports under ``runs`` into the cache; record their sha256 in ``<cache>/local.json``.

    Returns (entry name, "built" / "skipped", detail) per local entry. A file whose metadata names another
    architecture or another recipe than the entry expects is an error (a wrong file at that place).
    """
    from dystream.zoo.files import read_metadata

    runs = Path(runs)
    manifest_path = cache / "local.json"
    manifest = _read_json(manifest_path)
    records = manifest.setdefault("entries", {})
    report = []
    for entry in entries:
        if entry.source != "local":
            continue
        src = runs / entry.export
        if not src.is_file():
            report.append((entry.name, "skipped", f"no {src} (train recipe {entry.produced_by} first)"))
            continue
        arch, _config, extra = read_metadata(src)
        if arch != entry.family:
            raise ZooError(f"{src} holds a {arch!r} model, but zoo entry {entry.name!r} expects {entry.family!r}")
        stage = extra.get("stage")
        if stage is not None and stage != entry.produced_by:
            raise ZooError(
                f"{src} was exported by stage {stage!r}, but zoo entry {entry.name!r} is produced by recipe "
                f"{entry.produced_by!r}; is the runs directory mixed up?"
            )
        final = local_path(cache, entry)
        tmp = final.with_name(f".{final.name}.build")
        digest = _copy_hashed(src, tmp)
        os.replace(tmp, final)
        _stamp(cache, final, digest)
        records[entry.name] = {
            "file": str(final.relative_to(cache)),
            "sha256": digest,
            "size": final.stat().st_size,
            "source": str(src.resolve()),
            "recipe": entry.produced_by,
            "commit": extra.get("commit", "unknown"),
            "step": extra.get("step"),
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        report.append((entry.name, "built", f"{src} -> {final} (sha256 {digest[:16]}...)"))
    manifest["version"] = 1
    _write_json(manifest_path, manifest)
    return report
