"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


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


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), for error lines."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
