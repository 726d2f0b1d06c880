"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""
import errno


class UserError(Exception):
    """Something the user can fix: the message names the problem and the fix."""


class DataError(UserError):
    """A data file is missing or malformed; the message names the file and, where known, the line."""

    def __init__(self, path, problem: str, line: int | None = None, fix: str | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)
        self.path, self.line, self.problem = path, line, problem


class ModelError(UserError):
    """A model could not be found or loaded."""


class OutputError(UserError):
    """A file could not be written (disk full, file size limit, read-only or forbidden folder)."""

    def __init__(self, path, exc: OSError):
        super().__init__(f"cannot write {path}: {exc.strerror or one_line(exc)} ({_write_fix(exc)})")
        self.path, self.errno = path, exc.errno


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _write_fix(exc: OSError) -> str:
    if exc.errno in _NO_SPACE:
        return "free space or choose another location"
    return "choose a writable location"


def os_error_message(exc: OSError) -> str:
    """One line for an OSError that escaped to the CLI (a write outside repair.io, a folder that vanished):
    the file, the reason, the fix. Names the file where the OSError carries one."""
    name = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or one_line(exc)
    if exc.errno in _NO_SPACE or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {name}: {reason} ({_write_fix(exc)})"
    return f"{name}: {reason} (check the path, or choose another location)"


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), for error lines."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
