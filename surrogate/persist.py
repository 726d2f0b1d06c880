"""Save and load fitted surrogates with joblib, guarded by a SHA-256 checksum.

Why the checksum: a pickle runs code when loaded, and a stale or swapped surrogate file would silently
steer the search; the run record keeps the hash and `load` refuses any other file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import joblib


class ChecksumError(ValueError):
    """The file on disk is not the one whose SHA-256 was recorded."""


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(model, path) -> str:
    """Write `model` to `path` (atomically, via a temporary file) and return the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    joblib.dump(model, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


def load(path, expected_sha256: str, *, inside=None):
    """Load a model saved by `save`, refusing it unless its SHA-256 equals `expected_sha256` and,
    with `inside`, unless it lies in that folder (the run directory that wrote it)."""
    if inside is not None and not Path(path).resolve().is_relative_to(Path(inside).resolve()):
        raise ChecksumError(f"{path}: not inside {inside}; surrogates are only read back from their own run directory")
    actual = sha256_file(path)
    if actual != str(expected_sha256).lower():
        raise ChecksumError(f"{path}: SHA-256 is {actual}, not the {expected_sha256} recorded when it was written; "
                            "refusing to unpickle it")
    return joblib.load(path)
