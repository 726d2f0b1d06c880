"""Atomic writes: a crash or a full disk never leaves a half-written file under its final name."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from repair.errors import OutputError, UserError

UMASK = os.umask(0o022)
os.umask(UMASK)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, renamed into place once complete. A failed write
    (disk full, file too large, read-only or forbidden folder) leaves nothing behind and raises an
    OutputError naming `path`, which the CLI prints as one line."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; results are as shareable as any file the user writes
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(path, exc) from None
        raise


def check_writable(path: Path, flag: str) -> None:
    """Fail now, before any model work, if `path` could not be written at the end: its folder is
    missing, it is a folder, or the folder refuses new files (the probe file is removed again)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory (give {flag} a file name)")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist (create it or choose another {flag})")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc} (choose another {flag})") from None
    os.close(fd)
    os.unlink(tmp)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "tolist"):  # numpy and torch arrays and scalars
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
