"""Atomic writes: complete files only, with the permissions any file the user writes would get."""
import errno
import os
import stat

import pytest

from repair.errors import OutputError
from repair.io import write_json_atomic, write_text_atomic


def test_atomic_write_has_umask_permissions_and_no_leftovers(tmp_path):
    old = os.umask(0o027)
    try:
        import repair.io

        repair.io.UMASK, saved = 0o027, repair.io.UMASK
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
        repair.io.UMASK = saved
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'


def test_full_disk_keeps_the_old_file_and_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*a.txt: No space left on device \(free space"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
