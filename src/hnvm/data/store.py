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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from hnvm.atomic import atomic_dir, atomic_json
from hnvm.data.splits import (
    HELD_OUT_ITEM_SPLITS,
    SPLIT_DTYPE,
    has_held_out_items,
    next_item_targets,
    next_session_targets,
)
from hnvm.errors import HnvmError, one_line

FORMAT = "hnvm-dataset"
FORMAT_VERSION = 1


def read_json_object(path: Path, what: str, advice: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object (meta.json, config.json, model.json, ...), or a
    one-line HnvmError naming the file: `{path}: damaged {what} (...){advice}`."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HnvmError(f"{path}: damaged {what} ({one_line(exc)}){advice}") from exc
    if not isinstance(obj, dict):
        raise HnvmError(f"{path}: damaged {what} (not a JSON object){advice}")
    return obj


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
        raise HnvmError(f"{path}: cannot read it, the file is damaged ({one_line(exc, 200)})") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise HnvmError(f"{path}: not a table hnvm wrote (missing column(s) {', '.join(missing)})")
    return df


def kind_of_dir(path: Path) -> str | None:
    """'dataset' (made by prepare), 'run' (made by train) or None, by the `format` their JSON
    marker file records (a damaged marker still marks the directory as ours)."""
    for name, fmt, kind in (("meta.json", FORMAT, "dataset"), ("config.json", "hnvm-run", "run")):
        f = Path(path) / name
        if not f.is_file():
            continue
        try:
            found = json.loads(f.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            found = None if name == "config.json" else fmt  # unreadable: ours only beside our tables
            if name == "meta.json" and not (Path(path) / "events.parquet").exists():
                found = None
        if found == fmt:
            return kind
    return None


def refuse_inside_managed_dir(path: Path, flag: str) -> None:
    """No output goes inside a dataset or run directory: their files are theirs, and even a new
    file there can shadow one they write later. Raises a one-line HnvmError naming it."""
    above = next((d for d in Path(path).resolve().parents if kind_of_dir(d) is not None), None)
    if above is not None:
        raise HnvmError(f"{flag} {path}: is inside the {kind_of_dir(above)} directory {above}; write elsewhere")


def check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` is a writable directory (missing folders in
    between are created when the output is written)."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HnvmError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HnvmError(f"{flag} {path}: {parent} is not writable")


def check_output_dir(path: Path, flag: str, *, inputs: tuple[Path, ...] = (), may_be: tuple[str, ...] = ()) -> None:
    """Refuse an output directory before any work: a file, a directory holding (or being) one of
    the command's `inputs`, a dataset or run directory unless its kind is in `may_be`, and a
    place inside a dataset or run directory. (Whether an existing one may be replaced or resumed
    is the command's own rule.)"""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HnvmError(f"{flag} {path}: is a file, not a directory")
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise HnvmError(f"{flag} {path}: holds the working directory; name a directory to create")
    for i in inputs:
        src = Path(i).resolve()
        if src == target or target in src.parents:
            raise HnvmError(f"{flag} {path}: holds the command's own input {i}; write elsewhere")
    kind = kind_of_dir(target) if target.is_dir() else None
    if kind is not None and kind not in may_be:
        raise HnvmError(f"{flag} {path}: is a {kind} directory; write elsewhere")
    refuse_inside_managed_dir(path, flag)


def check_output_file(path: Path, flag: str, *, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output file before any work: a directory, one of the command's `inputs` (even
    with --force), any place inside a dataset or run directory (the run's and its data set's own
    files included), an existing file without `force`, or a destination under no writable
    directory."""
    path = Path(path)
    if path.is_dir():
        raise HnvmError(f"{flag} {path}: is a directory; give a file name")
    target = path.resolve()
    if any(target == Path(i).resolve() for i in inputs):
        raise HnvmError(f"{flag} {path}: is the command's own input; write to another file")
    refuse_inside_managed_dir(path, flag)
    if path.exists() and not force:
        raise HnvmError(f"{flag} {path}: exists (use --force to replace it)")
    check_writable_parent(path, flag)


def _check_events(path: Path, ev: pl.DataFrame, n_items: int, n_users: int) -> None:
    """The invariants every reader of events.parquet relies on (one pass of min/max/null counts):
    integer columns without nulls, ids in range, known split names. A one-line HnvmError names
    the file and column otherwise."""
    for col in ("user", "session", "item", "ts", "pos"):
        if not ev.schema[col].is_integer():
            raise HnvmError(f"{path}: column '{col}' is {ev.schema[col]}, not integer; re-run `hnvm prepare`")
    split = ev.get_column("split").cast(pl.Utf8)
    stats = ev.select(
        *(pl.col(c).null_count().alias(f"{c}_nulls") for c in ("user", "session", "item", "ts", "pos")),
        pl.col("user").min().alias("user_min"), pl.col("user").max().alias("user_max"),
        pl.col("item").min().alias("item_min"), pl.col("item").max().alias("item_max"),
        pl.col("session").min().alias("session_min"), pl.col("pos").min().alias("pos_min"),
    ).row(0, named=True)
    problems = [f"'{c}' has missing values" for c in ("user", "session", "item", "ts", "pos")
                if stats[f"{c}_nulls"]]
    if ev.height:
        if not 1 <= stats["user_min"] <= stats["user_max"] <= n_users:
            problems.append(f"'user' outside 1..{n_users}")
        if not 1 <= stats["item_min"] <= stats["item_max"] <= n_items:
            problems.append(f"'item' outside 1..{n_items}")
        if stats["session_min"] < 0 or stats["pos_min"] < 0:
            problems.append("negative 'session' or 'pos'")
    bad = split.filter(~split.is_in(["train", "valid", "test"]) | split.is_null())
    if bad.len():
        problems.append(f"'split' value {bad[0]!r} (expected train, valid or test)")
    if problems:
        raise HnvmError(f"{path}: damaged events table ({'; '.join(problems)}); re-run `hnvm prepare`")


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

    @property
    def held_out_items(self) -> bool:
        """Whether its split holds out single items (leave-one-out, shan) rather than whole
        sessions (user-last, time): from meta.json, else from the events."""
        prep = self.meta.get("prepare")
        split = prep.get("split") if isinstance(prep, dict) else None
        if isinstance(split, str):
            return split in HELD_OUT_ITEM_SPLITS
        if "_held_out" not in self.__dict__:
            self.__dict__["_held_out"] = has_held_out_items(self.events)
        return bool(self.__dict__["_held_out"])

    def next_item_targets(self, split: str = "test", include_first: bool = False) -> pl.DataFrame:
        return next_item_targets(self.events, split, include_first, self.held_out_items)

    def next_session_targets(self, split: str = "test") -> pl.DataFrame:
        """ValueError for a held-out-item split (no held-out sessions)."""
        return next_session_targets(self.events, split, self.held_out_items)

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
            atomic_json(d / "meta.json", self.meta)

        out = Path(out)
        if out.exists() and not force:
            raise HnvmError(f"{out}: output directory exists (use --force to replace it)")
        if out.exists() and not out.is_dir():
            raise HnvmError(f"{out}: exists and is not a directory")
        atomic_dir(out, write)
        self.path = Path(out)

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        path = Path(path)
        meta_path = path / "meta.json"
        if not path.is_dir():
            raise HnvmError(f"{path}: not a dataset directory (run `hnvm prepare` first)")
        if not meta_path.exists():
            raise HnvmError(f"{path}: no meta.json; not a dataset directory made by `hnvm prepare`")
        meta = read_json_object(meta_path, "dataset meta file", "; re-run `hnvm prepare`")
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise HnvmError(
                f"{path}: dataset format {meta.get('format')!r} version "
                f"{meta.get('format_version')!r} is not supported (expected {FORMAT} version "
                f"{FORMAT_VERSION}); re-run `hnvm prepare`"
            )
        events = read_table(path / "events.parquet", EVENTS_COLUMNS)
        items = read_table(path / "items.parquet", (*VOCAB_COLUMNS["items.parquet"], "train_count"))
        users = read_table(path / "users.parquet", VOCAB_COLUMNS["users.parquet"])
        _check_events(path / "events.parquet", events, items.height, users.height)
        if events.schema["split"] != SPLIT_DTYPE:  # e.g. written by another tool as text
            events = events.with_columns(split=pl.col("split").cast(pl.Utf8).cast(SPLIT_DTYPE))
        return cls(events=events, items=items, users=users, meta=meta, path=path)
