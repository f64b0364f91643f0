"""`hnvm prepare`: raw log -> sessionized, filtered, split dataset directory."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from hnvm import __version__
from hnvm.data.readers import PRESETS, read_events_info
from hnvm.data.sessions import filter_fixed_point, parse_duration, run_starts, sessionize
from hnvm.data.splits import (
    HELD_OUT_ITEM_SPLITS,
    SPLIT_DTYPE,
    WHOLE_SESSION_SPLITS,
    clean_eval_sessions,
    split_leave_one_out,
    split_shan,
    split_time,
    split_user_last,
)
from hnvm.data.store import FORMAT, FORMAT_VERSION, Dataset, check_output_dir, kind_of_dir
from hnvm.errors import HnvmError, InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    """Parameters of `hnvm prepare` (recorded in meta.json)."""

    gap: str = "30m"
    min_item_support: int = 5
    min_session_length: int = 2
    min_sessions: int = 3
    split: str = "user-last"  # user-last | time | leave-one-out | shan
    valid_fraction: float | None = None  # time, shan; None: the split's default (fractions())
    test_fraction: float | None = None  # time, shan
    holdout_days: float = 30.0  # shan: test/valid sessions start in the log's last days
    min_item_users: int = 1  # distinct users per item (SHAN: 20)
    seed: int = 0  # shan: which sessions and items are held out
    # Exact duplicate rows (same user, item, timestamp to its finest unit, seq and session) are
    # logging artefacts far more often than real repeats, and each would become a target that
    # is trivially "predicted" by its twin: they are dropped (and counted in meta.json).
    keep_duplicates: bool = False

    def fractions(self) -> tuple[float, float]:
        """(valid, test) fractions: as given, else time 0.1/0.1, shan 0.1/0.2 (SHAN's 20%)."""
        valid = 0.1 if self.valid_fraction is None else self.valid_fraction
        test = (0.2 if self.split == "shan" else 0.1) if self.test_fraction is None else self.test_fraction
        return valid, test

    def validate(self) -> None:
        parse_duration(self.gap)
        if self.split not in WHOLE_SESSION_SPLITS + HELD_OUT_ITEM_SPLITS:
            raise HnvmError(f"--split must be one of {', '.join(WHOLE_SESSION_SPLITS + HELD_OUT_ITEM_SPLITS)}, "
                            f"not '{self.split}'")
        for name in ("min_item_support", "min_session_length", "min_sessions", "min_item_users"):
            if getattr(self, name) < 1:
                raise HnvmError(f"--{name.replace('_', '-')} must be >= 1")
        if self.split == "user-last" and self.min_sessions < 3:
            raise HnvmError(
                "--split user-last needs --min-sessions >= 3 (train, valid and test sessions)"
            )
        valid, test = self.fractions()
        if not (0 < valid < 1 and 0 < test < 1 and valid + test < 1):
            raise HnvmError(
                "--valid-fraction and --test-fraction must be in (0, 1) and sum below 1"
            )
        if not self.holdout_days > 0:
            raise HnvmError("--holdout-days must be > 0")


def preset_config(preset: str | None, **given: Any) -> PrepareConfig:
    """A PrepareConfig from a preset's own defaults (e.g. yoochoose: a time split and one
    session per user, since every session is its own user) overridden by the options `given`
    explicitly (None values count as not given)."""
    base = dict(PRESETS[preset].defaults) if preset in PRESETS else {}
    base.update({k: v for k, v in given.items() if v is not None})
    return PrepareConfig(**base)  # type: ignore[arg-type]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_dataset(
    raw: pl.DataFrame, cfg: PrepareConfig, *, source: dict[str, Any] | None = None
) -> Dataset:
    """Sessionize, filter to a fixed point, split and index a canonical frame (see readers)."""
    cfg.validate()
    t0 = time.perf_counter()
    where = f"{source.get('path')}: " if source and source.get("path") else ""
    if cfg.split in ("time", "shan") and source and source.get("time_unit", "?") is None:
        raise HnvmError(f"{where}--split {cfg.split} needs a time column (this log has none); "
                        "use --split user-last or leave-one-out")
    raw, n_dup = (raw, 0) if cfg.keep_duplicates else _drop_duplicates(raw, where)
    df = sessionize(raw, parse_duration(cfg.gap))
    # (by design for yoochoose, where every session is its own user)
    one_each = _one_session_per_user(df) if not (source and source.get("preset") == "yoochoose") else ""
    if one_each:
        log.warning("%s%s", where, one_each)
    df, steps = filter_fixed_point(
        df,
        min_item_support=cfg.min_item_support,
        min_session_length=cfg.min_session_length,
        min_sessions=cfg.min_sessions,
        min_item_users=cfg.min_item_users,
    )
    if df.height == 0:
        trail = "; ".join(s.describe() for s in steps)
        raise HnvmError(f"{where}the filters leave no data ({one_each + '; ' if one_each else ''}{trail})")
    df = _split(df, cfg)
    df = clean_eval_sessions(df, cfg.min_session_length, held_out_items=cfg.split in HELD_OUT_ITEM_SPLITS)
    n_split = df.select((pl.col("split") == s).sum().alias(s) for s in ("train", "test")).row(0)
    if 0 in n_split:
        raise HnvmError(f"{where}the split leaves no train or no test events "
                        f"({df.height:,} events after filtering)")
    events, item_table, user_table = _index(df)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hnvm_version": __version__,
        "source": source or {},
        "prepare": asdict(cfg),
        "filter_steps": [asdict(s) for s in steps],
        "duplicates_removed": n_dup,
    }
    ds = Dataset(events=events, items=item_table, users=user_table, meta=meta)
    meta["stats"] = dataset_stats(ds)
    log.info("built dataset in %.1fs: %s", time.perf_counter() - t0, meta["stats"])
    return ds


def _split(df: pl.DataFrame, cfg: PrepareConfig) -> pl.DataFrame:
    """`df` with `split` per event, by cfg.split (docs/design.md, "Data preparation")."""
    valid, test = cfg.fractions()
    if cfg.split == "user-last":
        return split_user_last(df)
    if cfg.split == "time":
        return split_time(df, valid, test)
    if cfg.split == "leave-one-out":
        return split_leave_one_out(df)
    return split_shan(df, test_fraction=test, valid_fraction=valid, holdout_days=cfg.holdout_days, seed=cfg.seed)


def _drop_duplicates(raw: pl.DataFrame, where: str) -> tuple[pl.DataFrame, int]:
    """The frame without exact duplicate rows (first kept, order kept) and how many went."""
    key = [c for c in ("user", "item", "ts", "seq", "session") if c in raw.columns]
    # one 64-bit hash per row first: `unique` over the text ids of every row held ~3x the log in
    # memory (8 GiB at 30M events); only rows whose hash repeats are compared exactly
    shared = raw.select(pl.struct(key).hash().is_duplicated()).to_series()
    if not shared.any():
        return raw, 0
    candidates = raw.with_row_index("_row").filter(shared)
    first = candidates.unique(subset=key, keep="first", maintain_order=True).get_column("_row")
    dropped = candidates.get_column("_row").filter(~candidates.get_column("_row").is_in(first.implode()))
    if dropped.is_empty():  # hash collisions only
        return raw, 0
    deduped = raw.with_row_index("_row").filter(~pl.col("_row").is_in(dropped.implode())).drop("_row")
    n_dup = len(dropped)
    log.warning("%sdropped %d exact duplicate rows (same %s; --keep-duplicates keeps them)",
                where, n_dup, ", ".join(key))
    return deduped, n_dup


def _index(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(events, items, users) with dense int ids for a split, sessionized frame.

    ids: 1..n in sorted order of the original ids (0 = padding / unknown user). The frame is
    sessionize's layout, sorted by user id then session, so user and session ids are running
    counts of run starts and the rows are already in (session, pos) order: no sort, and only
    item ids (train items only) need a lookup.
    """
    items = (
        df.select(pl.col("item").filter(pl.col("split") == "train"))
        .group_by("item").agg(pl.len().alias("train_count")).sort("item")
        .with_row_index("idx", offset=1)
    )
    users = (
        df.select(pl.col("user").filter(run_starts("user"))).rechunk()
        .with_row_index("uidx", offset=1)
    )
    events = (
        df.join(items.select("item", "idx"), on="item", how="left", maintain_order="left")
        .select(
            user=run_starts("user").cast(pl.Int32).cum_sum(),
            session=run_starts("sess").cast(pl.Int32).cum_sum() - 1,
            item=pl.col("idx").cast(pl.Int32),
            ts=pl.col("ts").cast(pl.Int64),
            pos=pl.col("pos").cast(pl.Int32),
            split=pl.col("split").cast(SPLIT_DTYPE),
        )
    )
    item_table = items.select(item=pl.col("idx").cast(pl.Int32), id=pl.col("item").cast(pl.Utf8),
                              train_count=pl.col("train_count").cast(pl.Int64))
    user_table = users.select(user=pl.col("uidx").cast(pl.Int32), id=pl.col("user").cast(pl.Utf8))
    return events, item_table, user_table


def _one_session_per_user(df: pl.DataFrame) -> str:
    """A warning when sessionization gave every user exactly one session (e.g. a basket
    number read as seconds, all inside the gap), else ''."""
    if df.height == 0:
        return ""
    users, sessions = df.select(run_starts("user").sum(), run_starts("sess").sum()).row(0)
    if users != sessions or users < 2:
        return ""
    return (f"sessionization gave every user exactly one session ({users:,} users): check the time "
            "column and its unit (--time-unit), the --gap, or give session=COLUMN; a log where each "
            "session is its own user needs --split time --min-sessions 1")


def prepare(
    input_path: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    columns: dict[str, str] | None = None,
    config: PrepareConfig | None = None,
    force: bool = False,
    time_unit: str = "auto",
) -> Dataset:
    """Read a raw log, build the dataset and write it atomically to `out`.

    `config` defaults to the preset's defaults (`preset_config`); `time_unit` states the unit
    of a numeric time column (auto: decided per row by magnitude; mixed units are refused)."""
    cfg = config or preset_config(preset)
    cfg.validate()
    input_path, out = Path(input_path), Path(out)
    # --force replaces a dataset (or an empty directory), never the input's folder, a run or
    # some other directory
    check_output_dir(out, "--out", inputs=(input_path,), may_be=("dataset",))
    if out.exists() and not force:
        raise HnvmError(f"{out}: output directory exists (use --force to replace it)")
    if out.is_dir() and kind_of_dir(out) is None and any(out.iterdir()):
        raise HnvmError(f"--out {out}: a directory that is not a dataset; --force replaces only datasets")
    raw, info = read_events_info(input_path, preset=preset, columns=columns, time_format=time_unit)
    source = {
        "path": str(input_path),
        "preset": preset,
        "columns": columns if preset is None else None,
        "bytes": input_path.stat().st_size,
        "sha256": file_sha256(input_path),
        "rows": raw.height,
        "time_unit": info.time_unit,
        "session_order": info.session_order,
    }
    ds = build_dataset(raw, cfg, source=source)
    try:
        ds.save(out, force=force)
    except OSError as exc:
        raise InputError(f"cannot write dataset: {exc}", path=out) from exc
    return ds


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    """The paper's Table 1 rows plus target counts per split.

    Sessions are counted the paper's way (§4.2, Table 1): a test session holds a test target,
    every other session is a training session, so training + test sessions = sessions
    (`table1_training_sessions`). `<split>_sessions` counts the sessions holding events of the
    split (under leave-one-out a user's last session holds training, validation and test
    events); `train_only_sessions` those with training events only."""
    ev = ds.events
    held_out = ds.held_out_items
    per_split = ev.group_by("split").agg(
        pl.len().alias("events"), pl.col("session").n_unique().alias("sessions"),
        pl.col("user").n_unique().alias("users"),
        # = next_item_targets(split).height: every held-out item, or positions >= 2
        (pl.len() if held_out else (pl.col("pos") >= 1).sum()).alias("targets"),
    )
    by = {r["split"]: r for r in per_split.to_dicts()}
    n_sessions = ev.get_column("session").n_unique()
    train_only = ev.group_by("session").agg((pl.col("split") == "train").all().alias("t")).get_column("t").sum()
    out: dict[str, Any] = {
        "users": ds.n_users,
        "items": ds.n_items,
        "events": ev.height,
        "sessions": n_sessions,
        "interactions_per_session": round(ev.height / max(n_sessions, 1), 3),
        "split": (ds.meta.get("prepare") or {}).get("split", "held-out items" if held_out else "whole sessions"),
        "train_only_sessions": int(train_only),
    }
    for split in ("train", "valid", "test"):
        r = by.get(split, {"events": 0, "sessions": 0, "users": 0, "targets": 0})
        out[f"{split}_events"] = int(r["events"])
        out[f"{split}_sessions"] = int(r["sessions"])
        out[f"{split}_users"] = int(r["users"])
        if split != "train":
            out[f"{split}_next_item_targets"] = int(r["targets"])
            out[f"{split}_next_session_targets"] = 0 if held_out else int(r["sessions"])
    out["table1_training_sessions"] = n_sessions - out["test_sessions"]
    return out
