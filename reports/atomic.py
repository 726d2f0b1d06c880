"""Publishing a set of files as a directory, all or nothing.

The files are written into a fresh hidden directory beside the target (same filesystem, so renames
are atomic), flushed to disk, and only then moved into place. If anything fails before that, the
temporary directory is removed and an existing target is untouched.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Mapping


def write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fresh_dir(parent: Path, stem: str) -> Path:
    """A new empty directory `parent/stem-<random>`, created with the usual umask-derived permissions."""
    for _ in range(100):
        path = parent / f"{stem}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary directory in {parent}")


def publish_dir(out_dir: Path, files: Mapping[str, str]) -> Path:
    """Make `out_dir` hold exactly `files` (name -> text) without ever exposing a partial set.

    If `out_dir` exists and holds only files of these names (an earlier report), it is swapped for the
    new directory: renamed aside, the new one renamed in, the old one deleted; should the second rename
    fail, the old one is put back. If `out_dir` holds anything else, it is not deleted; instead each
    file is replaced on its own with os.replace (each one atomic; all of them complete on disk first).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory; choose another report folder")
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(parent, f".{out_dir.name}.tmp")
    try:
        for name, text in files.items():
            write_file(tmp / name, text)
        _fsync_dir(tmp)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        elif {p.name for p in out_dir.iterdir()} <= set(files):
            _swap(tmp, out_dir)
        else:
            for name in files:
                os.replace(tmp / name, out_dir / name)
            os.rmdir(tmp)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap(new: Path, target: Path) -> None:
    old = _fresh_dir(target.parent, f".{target.name}.old")
    try:
        os.replace(target, old)  # onto an empty directory: allowed by POSIX rename
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
