"""Read raw interaction logs into one canonical frame.

Every reader returns a polars DataFrame with the canonical columns

    user     original user id (native dtype: integer or string)
    item     original item id
    ts       Int64, seconds since the epoch (or any monotone clock in seconds)
    seq      Int64, tie-breaker inside equal timestamps (in-basket order, milliseconds, ...)
    session  optional: an explicit session key (order id, day); when present no gap is used
    line     UInt32, the line of the source file the event came from (for error messages)

Presets map public formats onto these columns; `--columns` maps any other file.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from hnvm.errors import InputError

log = logging.getLogger(__name__)

CANONICAL = ("user", "item", "time", "session", "seq", "event")
REQUIRED = ("user", "item", "time")


@dataclass(frozen=True)
class Preset:
    """How one public log format maps onto the canonical columns."""

    name: str
    columns: dict[str, str]  # canonical role -> source column name
    header: bool = True
    names: tuple[str, ...] | None = None  # column names for files without a header
    separator: str | None = None  # None: sniff from the first line
    time_format: str = "auto"  # auto | s | ms | mmdd | iso
    description: str = ""
    # turns the raw frame (source names) into canonical roles; runs before checks of `columns`
    transform: Callable[[pl.DataFrame, Path], pl.DataFrame] | None = None
    drop_events: tuple[str, ...] = field(default_factory=tuple)  # event values to remove


def _instacart(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """An order is a session ordered by add_to_cart_order; the clock is days since the
    user's first order (the sample has no absolute time), with order_number breaking ties."""
    _require(df, ("order_id", "user_id", "order_number", "product_id", "add_to_cart_order"), path)
    days = pl.col("days_since_prior_order") if "days_since_prior_order" in df.columns else None
    orders = (
        df.select("user_id", "order_id", "order_number",
                  *(["days_since_prior_order"] if days is not None else []))
        .unique(subset=["order_id"], keep="first")
        .sort("user_id", "order_number")
    )
    if days is not None:
        orders = orders.with_columns(
            _day=pl.col("days_since_prior_order").fill_null(0).cast(pl.Float64).cum_sum().over("user_id")
        )
    else:
        orders = orders.with_columns(_day=pl.lit(0.0))
    orders = orders.select(
        "order_id",
        _ts=(pl.col("_day") * 86400).cast(pl.Int64) + pl.col("order_number").cast(pl.Int64),
    )
    return df.join(orders, on="order_id", how="left").with_columns(
        pl.col("add_to_cart_order").cast(pl.Int64, strict=False)
    )


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
            description="RecSys Challenge 2016 interactions.csv; drops 'delete' (type 4) as "
            "the paper",
        ),
        Preset(
            "ijcai15",
            {"user": "user_id", "item": "item_id", "time": "time_stamp", "session": "_session"},
            time_format="mmdd",
            transform=_ijcai15,
            description="IJCAI-15 Tmall user_log_format1.csv; a day is a session",
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
            "clicks file); no users, so each session is its own user",
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
    """`user=visitorid,item=itemid,time=timestamp` -> {'user': 'visitorid', ...}."""
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
        out[role] = col
    missing = [r for r in REQUIRED if r not in out]
    if missing:
        raise InputError(
            f"--columns: missing role(s) {', '.join(missing)} (required: user, item, time)"
        )
    return out


def _first_line(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            return fh.readline()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read file: {exc}", path=path) from exc


def _read_raw(path: Path, preset: Preset | None) -> tuple[pl.DataFrame, bool]:
    """Returns the raw frame (all columns as read) and whether the file had a header."""
    if not path.exists():
        raise InputError("no such file", path=path)
    if path.is_dir():
        raise InputError(
            "is a directory, expected a file (csv, tsv, parquet, optionally .gz)", path=path
        )
    if path.stat().st_size == 0:
        raise InputError("file is empty", path=path)
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        try:
            df = pl.read_parquet(path)
        except Exception as exc:
            raise InputError(f"not a readable parquet file: {exc}", path=path) from exc
        if df.height == 0:
            raise InputError("file has no rows", path=path)
        return df, True

    first = _first_line(path)
    if not first.strip():
        raise InputError("file is empty (first line is blank)", path=path)
    header = preset.header if preset else True
    names = list(preset.names) if preset and preset.names else None
    if preset and preset.name == "movielens" and "::" in first:
        header, names = False, ["UserID", "MovieID", "Rating", "Timestamp"]
    if preset and preset.name == "movielens" and first.startswith("userId"):
        # ratings.csv: rename to the .dat names so one mapping serves both
        names = None
    if preset and preset.name == "yoochoose" and not first.startswith("SessionId"):
        header, names = False, ["SessionId", "Time", "ItemId", "Category"]

    if "::" in first:
        sep = "::"
    elif preset and preset.separator:
        sep = preset.separator
    else:
        sep = "\t" if "\t" in first else (";" if first.count(";") > first.count(",") else ",")
    try:
        if sep == "::":
            # polars wants a one-byte separator: read lines and split
            lines = pl.read_csv(path, has_header=False, separator="\x1f", new_columns=["_l"],
                                quote_char=None, infer_schema=False)
            n = len(names or [])
            df = lines.select(
                pl.col("_l").str.split_exact("::", n - 1)
                .struct.rename_fields(names or []).alias("_s")
            ).unnest("_s")
        else:
            df = pl.read_csv(
                path,
                has_header=header,
                new_columns=names,
                separator=sep,
                infer_schema_length=10000,
                null_values=["", "NA", "NaN", "nan", "null", "NULL"],
                truncate_ragged_lines=False,
                try_parse_dates=False,
            )
    except pl.exceptions.NoDataError as exc:
        raise InputError("file is empty", path=path) from exc
    except Exception as exc:  # polars' own message names the offending line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "TSV" if sep == "\t" else "CSV"
        raise InputError(f"cannot parse as {kind}: {msg}", path=path) from exc
    if preset and preset.name == "movielens" and "userId" in df.columns:
        df = df.rename({"userId": "UserID", "movieId": "MovieID", "timestamp": "Timestamp"})
    if df.height == 0:
        raise InputError("file has a header but no rows", path=path)
    return df, header


def _line_of(index: int, header: bool) -> int:
    return index + 1 + (1 if header else 0)


def _to_seconds(
    col: pl.Series, fmt: str, path: Path, name: str, header: bool
) -> tuple[pl.Series, pl.Series]:
    """Returns (ts seconds Int64, sub-second tie-breaker Int64)."""
    zero = pl.Series("seq", [0] * len(col), dtype=pl.Int64)
    if fmt == "mmdd":
        v = col.cast(pl.Int64, strict=False)
        month, day = v // 100, v % 100
        bad = v.is_null() | (month < 1) | (month > 12) | (day < 1) | (day > 31)
        if bad.any():
            i = int(bad.arg_true()[0])
            raise InputError(f"unparsable mmdd date {col[i]!r}", path=path,
                             row=_line_of(i, header), column=name)
        days = pl.DataFrame({"m": month, "d": day}).select(
            pl.date(2015, pl.col("m"), pl.col("d")).cast(pl.Int64).alias("x")
        ).to_series()
        return (days * 86400).rename("ts"), zero
    if col.dtype == pl.Utf8:
        as_num = col.str.strip_chars().cast(pl.Int64, strict=False)
        if as_num.null_count() == col.null_count():
            col = as_num
        else:
            as_float = col.str.strip_chars().cast(pl.Float64, strict=False)
            if as_float.null_count() == col.null_count():
                col = as_float
    if col.dtype.is_numeric():
        if col.dtype.is_float():
            x = col.cast(pl.Float64)
            bad = x.is_null() | x.is_nan() | x.is_infinite()
        else:
            x = col.cast(pl.Int64)
            bad = x.is_null()
        if bad.any():
            i = int(bad.arg_true()[0])
            raise InputError(f"unparsable timestamp {col[i]!r}", path=path,
                             row=_line_of(i, header), column=name)
        unit = fmt
        if unit == "auto":
            mx = float(x.abs().max() or 0)
            unit = "ns" if mx > 1e17 else "us" if mx > 1e14 else "ms" if mx > 1e11 else "s"
        scale = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}.get(unit, 1)
        if x.dtype.is_float():
            ts = (x / scale).floor().cast(pl.Int64)
            sub = ((x / scale - ts.cast(pl.Float64)) * 1e6).round().cast(pl.Int64)
        else:
            ts = x // scale
            sub = x % scale
        return ts.rename("ts"), sub.rename("seq")
    # strings: ISO-8601 date-times
    s = col.cast(pl.Utf8)
    parsed = s.str.strip_chars().str.to_datetime(time_unit="us", strict=False, time_zone="UTC")
    bad = parsed.is_null()
    if bad.any():
        i = int(bad.arg_true()[0])
        raise InputError(f"unparsable timestamp {col[i]!r}", path=path,
                         row=_line_of(i, header), column=name)
    us = parsed.dt.epoch("us")
    return (us // 1_000_000).rename("ts"), (us % 1_000_000).rename("seq")


def _check_ids(df: pl.DataFrame, src: str, role: str, path: Path, header: bool) -> pl.Series:
    s = df.get_column(src)
    bad = s.is_null()
    if s.dtype == pl.Utf8:
        s = s.str.strip_chars()
        bad = bad | (s.str.len_bytes() == 0)
    elif s.dtype.is_float():
        bad = bad | s.is_nan()
        if not bad.any() and bool((s == s.floor()).all()):
            s = s.cast(pl.Int64)
    if bad.any():
        i = int(bad.arg_true()[0])
        raise InputError(f"empty or missing {role} id", path=path,
                         row=_line_of(i, header), column=src)
    return s.rename(role)


def read_events(
    path: str | Path,
    *,
    preset: str | None = None,
    columns: dict[str, str] | None = None,
    time_format: str = "auto",
) -> pl.DataFrame:
    """Read a raw log (csv/tsv/parquet, optionally gzipped) into the canonical frame.

    Exactly one of `preset` (see PRESETS) or `columns` (role -> source column) is required.
    Raises InputError naming the file, line and column on bad input.
    """
    path = Path(path)
    if (preset is None) == (columns is None):
        raise InputError("give exactly one of --preset or --columns")
    p: Preset | None = None
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
        p = PRESETS[preset]
        columns = p.columns
        time_format = p.time_format
    assert columns is not None
    df, header = _read_raw(path, p)
    if p and p.transform:
        df = p.transform(df, path)
    _require(df, list(columns.values()), path)

    if p and p.drop_events and "event" in columns:
        ev = df.get_column(columns["event"]).cast(pl.Utf8)
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
    ts, sub = _to_seconds(
        df.get_column(columns["time"]), time_format, path, columns["time"], header
    )
    line = (df.get_column("_row").cast(pl.Int64) + 1 + (1 if header else 0)).cast(pl.UInt32)
    out = pl.DataFrame([user, item, ts, sub.rename("seq"), line.rename("line")])
    if "seq" in columns:
        seq = df.get_column(columns["seq"]).cast(pl.Int64, strict=False)
        if seq.null_count():
            i = int(seq.is_null().arg_true()[0])
            raise InputError("missing or non-integer sequence value", path=path,
                             row=int(line[i]), column=columns["seq"])
        out = out.with_columns(seq=seq)
    if "session" in columns:
        sess = _check_ids(df, columns["session"], "session", path, header)
        out = out.with_columns(session=sess.cast(pl.Utf8))
        if p is not None and p.name == "ijcai15":
            out = out.with_columns(seq=pl.col("line").cast(pl.Int64))
    if p is not None and p.name == "yoochoose":
        # no users: each session is its own user
        out = out.with_columns(user=pl.col("session"))
    return out
