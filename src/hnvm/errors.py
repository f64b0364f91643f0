"""Errors the CLI turns into a one-line message and exit status 2."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most `limit` characters, its type first (library messages
    span lines, and torch lists every mismatched key)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class HnvmError(Exception):
    """A user-facing error: bad input, bad configuration, incompatible files."""

    exit_code = 2


class InputError(HnvmError):
    """Bad input data: names the file and, where one applies, the row and column."""

    def __init__(self, message: str, *, path: object = None, row: int | None = None,
                 column: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)
        self.path, self.row, self.column = path, row, column


class ConfigError(HnvmError):
    """An unknown configuration key or a value out of its range."""


class NonFiniteScores(ValueError):
    """A model produced NaN scores (during training: its parameters diverged)."""
