"""The dataset directory: events.parquet + items.parquet + users.parquet + meta.json.

    events.parquet  user Int32 (1..n_users), session Int32 (0.., ordered by user then time),
                    item Int32 (1..n_items, train items only), ts Int64 (s), pos Int32
                    (0-based position in the session), split (train|valid|test)
    items.parquet   item Int32, id Utf8 (the original id), train_count Int64
    users.parquet   user Int32, id Utf8
    meta.json       format_version, parameters, input checksum, counts (paper Table 1)

Id 0 is reserved for padding (items) and the unknown user (users). Directories are written
to a temporary sibling and renamed into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from hnvm.data.splits import next_item_targets, next_session_targets
from hnvm.errors import HnvmError

FORMAT = "hnvm-dataset"
FORMAT_VERSION = 1


def atomic_write_dir(out: Path, write: Callable[[Path], None], *, force: bool = False) -> None:
    """Call `write(tmpdir)` then move tmpdir to `out`; nothing is left behind on failure."""
    out = Path(out)
    if out.exists() and not force:
        raise HnvmError(f"{out}: output directory exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise HnvmError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems do not support directory fsync
        pass


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# the columns every reader of these tables relies on
EVENTS_COLUMNS = ("user", "session", "item", "ts", "pos", "split")
VOCAB_COLUMNS = {"items.parquet": ("item", "id"), "users.parquet": ("user", "id")}


def read_table(path: Path, columns: tuple[str, ...]) -> pl.DataFrame:
    """A parquet table hnvm wrote (dataset or run), checked: unreadable, truncated or missing a
    column -> a one-line HnvmError naming the file."""
    try:
        df = pl.read_parquet(path)
    except FileNotFoundError:
        raise HnvmError(f"{path}: missing (the directory is incomplete)") from None
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise HnvmError(f"{path}: cannot read it, the file is damaged ({type(exc).__name__}: {msg})") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise HnvmError(f"{path}: not a table hnvm wrote (missing column(s) {', '.join(missing)})")
    return df


def check_output_file(path: Path, flag: str, *, force: bool = False, inputs: tuple[Path, ...] = (),
                      protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output file before any work: a directory, one of the command's `inputs` (even
    with --force), an existing file inside a `protected` directory (the run's or dataset's own
    files, even with --force), an existing file without `force`, or a destination under no
    writable directory (missing parent folders are created when it is written)."""
    path = Path(path)
    if path.is_dir():
        raise HnvmError(f"{flag} {path}: is a directory; give a file name")
    target = path.resolve()
    if any(target == Path(i).resolve() for i in inputs):
        raise HnvmError(f"{flag} {path}: is the command's own input; write to another file")
    if path.exists():
        for d in protected:
            if Path(d).resolve() in target.parents:
                raise HnvmError(f"{flag} {path}: would replace a file of {d}; write elsewhere")
        if not force:
            raise HnvmError(f"{flag} {path}: exists (use --force to replace it)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HnvmError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HnvmError(f"{flag} {path}: {parent} is not writable")


@dataclass
class Dataset:
    """A prepared dataset held in memory (polars frames)."""

    events: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_items(self) -> int:
        """Number of real items (ids 1..n_items)."""
        return self.items.height

    @property
    def n_users(self) -> int:
        return self.users.height

    def split(self, name: str) -> pl.DataFrame:
        return self.events.filter(pl.col("split") == name)

    def next_item_targets(self, split: str = "test", include_first: bool = False) -> pl.DataFrame:
        return next_item_targets(self.events, split, include_first)

    def next_session_targets(self, split: str = "test") -> pl.DataFrame:
        return next_session_targets(self.events, split)

    def item_ids(self, idx: list[int] | pl.Series) -> list[str]:
        """Internal item indices -> original ids."""
        lut = self.items.get_column("id")
        return [lut[int(i) - 1] for i in idx]

    def user_ids(self, idx: list[int] | pl.Series) -> list[str]:
        lut = self.users.get_column("id")
        return [lut[int(i) - 1] for i in idx]

    def save(self, out: str | Path, *, force: bool = False) -> None:
        def write(d: Path) -> None:
            self.events.write_parquet(d / "events.parquet", statistics=True)
            self.items.write_parquet(d / "items.parquet")
            self.users.write_parquet(d / "users.parquet")
            write_json(d / "meta.json", self.meta)

        atomic_write_dir(Path(out), write, force=force)
        self.path = Path(out)

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        path = Path(path)
        meta_path = path / "meta.json"
        if not path.is_dir():
            raise HnvmError(f"{path}: not a dataset directory (run `hnvm prepare` first)")
        if not meta_path.exists():
            raise HnvmError(f"{path}: no meta.json; not a dataset directory made by `hnvm prepare`")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise HnvmError(f"{meta_path}: not valid JSON ({exc})") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise HnvmError(
                f"{path}: dataset format {meta.get('format')!r} version "
                f"{meta.get('format_version')!r} is not supported (expected {FORMAT} version "
                f"{FORMAT_VERSION}); re-run `hnvm prepare`"
            )
        events = read_table(path / "events.parquet", EVENTS_COLUMNS)
        items = read_table(path / "items.parquet", (*VOCAB_COLUMNS["items.parquet"], "train_count"))
        users = read_table(path / "users.parquet", VOCAB_COLUMNS["users.parquet"])
        return cls(events=events, items=items, users=users, meta=meta, path=path)
