"""Pretrained model zoo: entries, offline cache, sha256 verification, strict loading.

    from dystream.zoo import list_pretrained, load_pretrained
    model = load_pretrained("avatar-dit.sid")        # verified file from the cache; never downloads

Entries live in :mod:`dystream.zoo.entries`; the cache and the only downloading code in :mod:`dystream.zoo.cache`;
the file-to-model loaders in :mod:`dystream.zoo.loaders`; ``dystream zoo list|download|import|verify|build-local``
in :mod:`dystream.zoo.cli`. Importing this package reads, builds and downloads nothing. See docs/zoo.md.
"""

from __future__ import annotations

from dystream.zoo.cache import (
    ChecksumError,
    DownloadError,
    NotCachedError,
    UnknownEntryError,
    UnverifiedError,
    ZooError,
    cache_dir,
)
from dystream.zoo.entries import ENTRIES, PretrainedEntry, RemoteFile
from dystream.zoo.registry import (
    entry_files,
    get_entry,
    get_pretrained_cfg,
    is_entry,
    list_pretrained,
    load_pretrained,
    load_text_context,
    load_weights,
    resolve,
)

__all__ = [
    "ENTRIES",
    "ChecksumError",
    "DownloadError",
    "NotCachedError",
    "PretrainedEntry",
    "RemoteFile",
    "UnknownEntryError",
    "UnverifiedError",
    "ZooError",
    "cache_dir",
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
