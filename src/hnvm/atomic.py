"""Atomic, durable writes: the one place where hnvm turns a temporary file into a real one.

Every file or directory hnvm writes (datasets, runs, checkpoints, models, reports, exports) is
first written beside its destination under a hidden temporary name, flushed to disk (fsync),
then renamed over the destination in one `os.replace`, and the parent directory is synced. A
reader thus sees the old file or the new one, never a half-written one; an error leaves the
destination as it was and removes the temporary. The temporary's name is fixed per destination
(`.NAME.tmp`), so the next write replaces what a killed process left behind: one destination
has one writer at a time (rank 0 writes a run; a dataset is prepared once). Directories get the
default permissions (the umask), like any `mkdir`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory's files and the directory itself (its entries), where supported."""
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            _fsync_file(f)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems do not support directory fsync
        pass


def _sync_parent(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a temporary sibling of `path`, then move it to `path`.
    Any error (or interruption) removes the temporary and leaves `path` untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_parent(path)


def atomic_text(path: str | Path, text: str, *, newline: str | None = None) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)

    atomic_file(path, write)


def atomic_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON (and a final newline) to `path` atomically."""
    atomic_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_dir(out: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmpdir)` to fill a temporary sibling directory of `out`, then put it in
    place of `out` (replacing an existing directory: the old one is moved aside first, then
    removed). Nothing is left behind on failure and `out` keeps its old contents."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):  # from a write that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_dir(tmp)
        if out.exists():
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_parent(out)
