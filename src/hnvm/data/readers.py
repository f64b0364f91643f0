"""Read raw interaction logs into one canonical frame.

Every reader returns a polars DataFrame with the canonical columns

    user     original user id: text exactly as written (`007` and `7` are two users), or Int64
             where every value is a canonical integer (then `str(value)` is the text as written)
    item     original item id (as `user`)
    ts       Int64, seconds since the epoch (or any monotone clock in seconds); 0 for logs
             without a time column (then `session` orders the events)
    seq      Int64, tie-breaker inside equal timestamps (in-basket order, sub-second part, ...)
    session  optional: an explicit session key (order id, day); when present no gap is used
    sorder   optional, logs without time only: the numeric session key, which orders sessions
    line     UInt32, the line of the source file the event came from (for error messages)

Presets map public formats onto these columns; `--columns` maps any other file. Text files are
read with every column as text, so nothing is re-typed by a guess from the first rows; the
timestamp unit is decided per row or stated (`time_unit`), never from the column's maximum.

This module holds the presets, the `--columns` mapping, id checks and `read_events`; opening
the file (format, compression, separator) is `rawfile`, the time column is `timestamps`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from hnvm.data.rawfile import read_raw
from hnvm.data.timestamps import TIME_UNITS, line_of, to_seconds
from hnvm.errors import InputError

log = logging.getLogger(__name__)

CANONICAL = ("user", "item", "time", "session", "seq", "event")
REQUIRED = ("user", "item")  # and time or session
# a canonical integer: its text is exactly str(int(text)), so reading it as Int64 loses nothing
_CANONICAL_INT = r"^(0|-?[1-9][0-9]{0,17})$"


@dataclass(frozen=True)
class Preset:
    """How one public log format maps onto the canonical columns."""

    name: str
    columns: dict[str, str]  # canonical role -> source column name
    header: bool = True
    names: tuple[str, ...] | None = None  # column names for files without a header
    separator: str | None = None  # None: sniff from the first line
    time_format: str = "auto"  # auto | s | ms | us | ns | mmdd | iso
    description: str = ""
    # prepare options that make the preset work out of the box (PrepareConfig field -> value)
    defaults: dict[str, object] = field(default_factory=dict)
    # turns the raw frame (source names) into canonical roles; runs before checks of `columns`
    transform: Callable[[pl.DataFrame, Path], pl.DataFrame] | None = None
    drop_events: tuple[str, ...] = field(default_factory=tuple)  # event values to remove


def _instacart(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """An order is a session ordered by add_to_cart_order; the clock is days since the
    user's first order (the sample has no absolute time), with order_number breaking ties."""
    _require(df, ("order_id", "user_id", "order_number", "product_id", "add_to_cart_order"), path)
    df = df.with_columns(
        order_number=_as_int(df.get_column("order_number"), path, "order_number"),
        add_to_cart_order=_as_int(df.get_column("add_to_cart_order"), path, "add_to_cart_order"),
    )
    days = pl.col("days_since_prior_order") if "days_since_prior_order" in df.columns else None
    orders = (
        df.select("user_id", "order_id", "order_number",
                  *(["days_since_prior_order"] if days is not None else []))
        .unique(subset=["order_id"], keep="first")
        .sort("user_id", "order_number")
    )
    if days is not None:
        orders = orders.with_columns(
            _day=pl.col("days_since_prior_order").cast(pl.Float64, strict=False).fill_null(0)
            .cum_sum().over("user_id")
        )
    else:
        orders = orders.with_columns(_day=pl.lit(0.0))
    orders = orders.select(
        "order_id",
        _ts=(pl.col("_day") * 86400).cast(pl.Int64) + pl.col("order_number").cast(pl.Int64),
    )
    return df.join(orders, on="order_id", how="left")


def _ijcai15(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """time_stamp is mmdd (year 2015); a (user, day) is a session, file order inside it."""
    return df.with_columns(_session=pl.col("time_stamp").cast(pl.Utf8, strict=False))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "xing2016",
            {"user": "user_id", "item": "item_id", "time": "created_at",
             "event": "interaction_type"},
            time_format="s",
            drop_events=("4",),
            description="RecSys Challenge 2016 interactions.csv; drops 'delete' (type 4) and holds out "
            "each user's last item (leave-one-out) as the paper's RSC protocol",
            defaults={"split": "leave-one-out"},
        ),
        Preset(
            "ijcai15",
            {"user": "user_id", "item": "item_id", "time": "time_stamp", "session": "_session"},
            time_format="mmdd",
            transform=_ijcai15,
            description="IJCAI-15 Tmall user_log_format1.csv; a day is a session; the paper's IJC "
            "protocol by default (SHAN: items of >= 20 users, one-item sessions dropped, 20% of the "
            "last 30 days' sessions hold out one random item)",
            defaults={"split": "shan", "min_item_users": 20, "min_item_support": 1, "min_sessions": 1},
        ),
        Preset(
            "taobao",
            {"user": "user", "item": "item", "time": "ts"},
            header=False,
            names=("user", "item", "category", "behavior", "ts"),
            time_format="s",
            description="Taobao UserBehavior.csv (no header)",
        ),
        Preset(
            "retailrocket",
            {"user": "visitorid", "item": "itemid", "time": "timestamp"},
            time_format="ms",
            description="Retailrocket events.csv (timestamp in ms)",
        ),
        Preset(
            "yoochoose",
            {"user": "SessionId", "item": "ItemId", "time": "Time", "session": "SessionId"},
            time_format="auto",
            description="YOOCHOOSE clicks: SessionId, ItemId, Time (or the original headerless "
            "clicks file); no users, so each session is its own user (hence a time split and "
            "one session per user by default)",
            defaults={"split": "time", "min_sessions": 1},
        ),
        Preset(
            "movielens",
            {"user": "UserID", "item": "MovieID", "time": "Timestamp"},
            time_format="s",
            description="MovieLens ratings.dat (UserID::MovieID::Rating::Timestamp) or ratings.csv",
        ),
        Preset(
            "instacart",
            {"user": "user_id", "item": "product_id", "time": "_ts", "session": "order_id",
             "seq": "add_to_cart_order"},
            time_format="s",
            transform=_instacart,
            description="Instacart orders (order = session, add_to_cart_order = sequence)",
        ),
    ]
}


def _require(df: pl.DataFrame, cols: tuple[str, ...] | list[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        found = ", ".join(c for c in df.columns if not c.startswith("_")) or "none"
        raise InputError(
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}"
            f" (found: {found})",
            path=path,
        )


def parse_columns(spec: str) -> dict[str, str]:
    """`user=visitorid,item=itemid,time=timestamp` -> {'user': 'visitorid', ...}.

    Roles: user and item are required, and time or session (a log without timestamps is
    ordered by its session key and file order, or by `seq`). Raises InputError naming --columns.
    """
    out: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise InputError(
                f"--columns: '{part}' is not ROLE=COLUMN (roles: {', '.join(CANONICAL)})"
            )
        role, col = (s.strip() for s in part.split("=", 1))
        if role not in CANONICAL:
            raise InputError(f"--columns: unknown role '{role}' (roles: {', '.join(CANONICAL)})")
        if role in out:
            raise InputError(f"--columns: role '{role}' is given twice")
        if not col:
            raise InputError(f"--columns: role '{role}' has no column name")
        out[role] = col
    missing = [r for r in REQUIRED if r not in out]
    if missing:
        raise InputError(
            f"--columns: missing role(s) {', '.join(missing)} (required: user, item, and time or session)"
        )
    if out["item"] in (out["user"], out.get("session"), out.get("time")):
        raise InputError(f"--columns: column '{out['item']}' cannot be the item and another role")
    if "time" not in out and "session" not in out:
        raise InputError("--columns: missing role time (a log without timestamps needs session=COLUMN, "
                         "e.g. a basket or order id; seq=COLUMN orders events inside it)")
    return out


def _as_int(col: pl.Series, path: Path, name: str, header: bool = True) -> pl.Series:
    """Integers from text or numbers (`3`, ` 3`, `3.0`); a missing or fractional value is an
    InputError naming its row."""
    if col.dtype.is_integer():
        out = col.cast(pl.Int64)
    else:
        x = col.str.strip_chars() if col.dtype == pl.Utf8 else col
        as_int = x.cast(pl.Int64, strict=False)
        f = x.cast(pl.Float64, strict=False)
        whole = (f.is_finite() & (f == f.floor()) & (f.abs() < 2.0**62)).fill_null(False)
        # "3.0" is 3; "3.5", "" and "x" stay missing
        out = as_int.fill_null(f.cast(pl.Int64, strict=False).zip_with(whole, as_int))
    bad = out.is_null()
    if bad.any():
        i = int(bad.arg_true()[0])
        raise InputError(f"missing or non-integer value {col[i]!r}", path=path,
                         row=line_of(i, header), column=name)
    return out


def _check_ids(df: pl.DataFrame, src: str, role: str, path: Path, header: bool) -> pl.Series:
    """The id column, text exactly as written (surrounding blanks removed). A column whose every
    value is a canonical integer comes back as Int64 (faster to sort and join, and
    `str(value)` is its text, so no two ids merge); an empty or missing id is an InputError."""
    s = df.get_column(src)
    bad = s.is_null()
    if s.dtype == pl.Utf8:
        s = s.str.strip_chars()
        bad = bad | (s.str.len_bytes() == 0)
    elif s.dtype.is_float():
        bad = bad | s.is_nan()
        if not bad.any() and bool((s == s.floor()).all()):
            s = s.cast(pl.Int64)
    elif not s.dtype.is_integer():
        s = s.cast(pl.Utf8)
    if bad.any():
        i = int(bad.arg_true()[0])
        raise InputError(f"empty or missing {role} id", path=path,
                         row=line_of(i, header), column=src)
    if s.dtype == pl.Utf8 and bool(s.str.contains(_CANONICAL_INT).all()):
        s = s.cast(pl.Int64)
    return s.rename(role)


@dataclass(frozen=True)
class ReadInfo:
    """How a log was read (recorded in the dataset's meta.json)."""

    time_unit: str | None  # s|ms|us|ns|iso|mmdd, or None for a log without a time column
    session_order: str | None  # logs without time: "key" (numeric session keys) or "first appearance"


def read_events(
    path: str | Path,
    *,
    preset: str | None = None,
    columns: dict[str, str] | None = None,
    time_format: str = "auto",
) -> pl.DataFrame:
    """Read a raw log (csv/tsv/parquet, optionally gzip- or zstd-compressed) into the canonical
    frame (see the module docstring). See `read_events_info` for the arguments."""
    return read_events_info(path, preset=preset, columns=columns, time_format=time_format)[0]


def read_events_info(
    path: str | Path,
    *,
    preset: str | None = None,
    columns: dict[str, str] | None = None,
    time_format: str = "auto",
) -> tuple[pl.DataFrame, ReadInfo]:
    """Read a raw log into the canonical frame, and say how it was read.

    Exactly one of `preset` (see PRESETS) or `columns` (role -> source column) is required.
    `time_format`: auto (per-row unit by magnitude, ISO-8601 for text; a preset's own format)
    or a stated unit s|ms|us|ns|iso, which also overrides a preset's. Raises InputError naming
    the file, line and column on bad input.
    """
    path = Path(path)
    if (preset is None) == (columns is None):
        raise InputError("give exactly one of --preset or --columns")
    if time_format not in (*TIME_UNITS, "mmdd"):
        raise InputError(f"--time-unit must be one of {', '.join(TIME_UNITS)} (got {time_format!r})")
    p: Preset | None = None
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
        p = PRESETS[preset]
        columns = p.columns
        if time_format == "auto":
            time_format = p.time_format
    assert columns is not None
    df, header = read_raw(path, p)
    if p and p.transform:
        df = p.transform(df, path)
    _require(df, list(columns.values()), path)

    if p and p.drop_events and "event" in columns:
        ev = df.get_column(columns["event"]).cast(pl.Utf8).str.strip_chars()
        keep = ~ev.is_in(list(p.drop_events))
        dropped = len(ev) - int(keep.sum())
        if dropped:
            log.info("%s: dropped %d events of type %s", path, dropped, ",".join(p.drop_events))
        df = df.with_row_index("_row").filter(keep)
    else:
        df = df.with_row_index("_row")
    if df.height == 0:
        raise InputError("no events left after dropping excluded event types", path=path)

    user = _check_ids(df, columns["user"], "user", path, header)
    item = _check_ids(df, columns["item"], "item", path, header)
    line = (df.get_column("_row").cast(pl.Int64) + 1 + (1 if header else 0)).cast(pl.UInt32)
    if "time" in columns:
        ts, sub, unit = to_seconds(
            df.get_column(columns["time"]), time_format, path, columns["time"], header
        )
    else:  # no clock: the session key and file order (or seq) order the events
        ts = pl.Series("ts", [0] * df.height, dtype=pl.Int64)
        sub, unit = pl.Series("seq", [0] * df.height, dtype=pl.Int64), None
    out = pl.DataFrame([user, item, ts, sub.rename("seq"), line.rename("line")])
    if "seq" in columns:
        seq = _as_int(df.get_column(columns["seq"]), path, columns["seq"], header)
        out = out.with_columns(seq=seq)
    order = None
    if "session" in columns:
        sess = _check_ids(df, columns["session"], "session", path, header)
        out = out.with_columns(session=sess.cast(pl.Utf8))
        if "time" not in columns:
            # sessions follow their numeric key (basket 1, 2, 10) where every key is a number,
            # else their first appearance in the file
            if sess.dtype.is_integer():
                out, order = out.with_columns(sorder=sess.cast(pl.Int64)), "key"
            else:
                order = "first appearance"
        if p is not None and p.name == "ijcai15":
            out = out.with_columns(seq=pl.col("line").cast(pl.Int64))
    if p is not None and p.name == "yoochoose":
        # no users: each session is its own user
        out = out.with_columns(user=pl.col("session"))
    return out, ReadInfo(unit, order)
