"""Pretrained model zoo: entries, offline cache, sha256 verification, strict loading."""
