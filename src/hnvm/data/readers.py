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
REQUIRED = ("user", "item")  # and time or session
TIME_UNITS = ("auto", "s", "ms", "us", "ns", "iso")
_SCALE = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Per-row unit classes for `auto`: the magnitude of a unix time in each unit. Seconds reach
# 1e11 only in the year 5138, ms 1e14 in 5138 too, and so on, so the classes do not overlap
# for real clocks; a column spanning two classes is refused instead of guessed.
_UNIT_BOUNDS = ((1e11, "s"), (1e14, "ms"), (1e17, "us"))
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


_MAGIC = (
    (b"PAR1", "parquet"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"PK\x03\x04", "zip"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def _sniff(path: Path) -> str:
    """What the file holds by its first bytes, whatever its name: parquet, gzip, zstd,
    bzip2, xz, zip or text."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise InputError(f"cannot read file: {exc}", path=path) from exc
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), "text")


def _first_line(path: Path, kind: str) -> str:
    try:
        if kind == "gzip":
            with gzip.open(path, "rt", encoding="utf-8-sig", errors="replace") as fh:
                return fh.readline()
        if kind == "zstd":  # polars decompresses zstd itself; ask it for the first line
            first = pl.read_csv(path, has_header=False, n_rows=1, separator="\x1f", quote_char=None,
                                infer_schema=False, new_columns=["_l"])
            return str(first.item(0, 0) or "") + "\n" if first.height else ""
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            return fh.readline()
    except (OSError, EOFError, pl.exceptions.PolarsError) as exc:
        raise InputError(f"cannot read file: {exc}", path=path) from exc


def _read_raw(path: Path, preset: Preset | None) -> tuple[pl.DataFrame, bool]:
    """Returns the raw frame (all columns as read; every column of a text file as text) and
    whether the file had a header."""
    if not path.exists():
        raise InputError("no such file", path=path)
    if path.is_dir():
        raise InputError(
            "is a directory, expected a file (csv, tsv, parquet, optionally .gz)", path=path
        )
    if path.stat().st_size == 0:
        raise InputError("file is empty", path=path)
    kind = _sniff(path)
    name = path.name.lower()
    if kind in ("bzip2", "xz", "zip"):
        raise InputError(f"the file is {kind}-compressed, which is not read directly; decompress it "
                         "(gzip and zstd are read as they are)", path=path)
    if kind in ("UTF-16", "UTF-32"):
        raise InputError(f"the file is {kind} text; save it as UTF-8 (e.g. iconv -f {kind} -t UTF-8)", path=path)
    if kind == "gzip":
        with gzip.open(path, "rb") as fh:
            try:
                inner = fh.read(4)
            except (OSError, EOFError) as exc:
                raise InputError(f"damaged gzip file ({exc})", path=path) from exc
        if inner.startswith(b"\x1f\x8b"):
            raise InputError("the file is gzip-compressed twice; decompress it once", path=path)
    if kind == "parquet" or (kind == "text" and name.endswith((".parquet", ".pq"))):
        try:
            df = pl.read_parquet(path)
        except Exception as exc:
            raise InputError(f"not a readable parquet file: {exc}", path=path) from exc
        if df.height == 0:
            raise InputError("file has no rows", path=path)
        return df, True

    first = _first_line(path, kind)
    if not first.strip():
        raise InputError("file is empty (first line is blank)", path=path)
    if "\x00" in first:  # UTF-16/32 without a byte-order mark (or inside gzip): every other byte is NUL
        raise InputError("the file looks like UTF-16 or UTF-32 text (NUL bytes in its first line); save it "
                         "as UTF-8", path=path)
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
            # every column as text: ids stay exactly as written (`007` is not `7`) and a column
            # that turns non-numeric after many rows loads like any other
            df = pl.read_csv(
                path,
                has_header=header,
                new_columns=names,
                separator=sep,
                infer_schema=False,
                # only an empty field is missing: `NA`, `NaN` or `null` may be somebody's id (a
                # time or seq field spelled so is then named as unparsable, with its row)
                null_values=[""],
                truncate_ragged_lines=False,
                try_parse_dates=False,
            )
    except pl.exceptions.NoDataError as exc:
        raise InputError("file is empty", path=path) from exc
    except Exception as exc:  # polars' own message names the offending line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        row = _first_non_utf8_line(path, kind) if "utf-8" in msg.lower() or "utf8" in msg.lower() else None
        if row is not None:
            raise InputError("not UTF-8 text (save the file as UTF-8, e.g. iconv -f LATIN1 -t UTF-8)",
                             path=path, row=row) from exc
        what = "TSV" if sep == "\t" else "CSV"
        raise InputError(f"cannot parse as {what}: {msg}", path=path) from exc
    dup = [c for c in df.columns if "_duplicated_" in c]
    if dup:  # polars renames a repeated header name instead of refusing it
        raise InputError(f"the header names column '{dup[0].split('_duplicated_')[0]}' twice", path=path, row=1)
    if preset and preset.name == "movielens" and "userId" in df.columns:
        df = df.rename({"userId": "UserID", "movieId": "MovieID", "timestamp": "Timestamp"})
    if df.height == 0:
        raise InputError("file has a header but no rows", path=path)
    return df, header


def _first_non_utf8_line(path: Path, kind: str) -> int | None:
    """The 1-based line of the first byte sequence that is not UTF-8 (error path only)."""
    opener = gzip.open if kind == "gzip" else open
    with opener(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return None


def _line_of(index: int, header: bool) -> int:
    return index + 1 + (1 if header else 0)


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
                         row=_line_of(i, header), column=name)
    return out


def _unit_of(x: pl.Series) -> pl.Series:
    """Per-row unit class (s|ms|us|ns) of numeric unix times by magnitude."""
    a = x.abs().cast(pl.Float64)
    expr = pl.when(pl.col("a") < _UNIT_BOUNDS[0][0]).then(pl.lit(_UNIT_BOUNDS[0][1]))
    for bound, unit in _UNIT_BOUNDS[1:]:
        expr = expr.when(pl.col("a") < bound).then(pl.lit(unit))
    return pl.DataFrame({"a": a}).select(expr.otherwise(pl.lit("ns")).alias("unit")).to_series()


def _refuse_mixed_seconds(x: pl.Series, col: pl.Series, path: Path, name: str, header: bool) -> None:
    """Unix seconds before 1973 (< 1e8) beside ones after 2001 (>= 1e9) in one column are two
    clocks (e.g. a compact date 20200913 among unix times), not one log spanning 28 years."""
    a = x.abs()
    small, large = a < 1e8, a >= 1e9
    if not (small.any() and large.any()):
        return
    i = int((small if bool(large[0]) else large).arg_true()[0])
    raise InputError(f"timestamps mix magnitudes: {col[i]!r} and {col[0]!r} (row {_line_of(0, header)}) cannot both "
                     "be unix seconds of one log (a date such as 20200913 among unix times?); fix the row, or "
                     "state --time-unit s to accept them", path=path, row=_line_of(i, header), column=name)


def _bad_time(value: object, expected: str = "") -> str:
    if value is None:  # polars fills the fields a short row lacks with nulls, like empty ones
        return "missing timestamp (an empty field, or a row with fewer fields than the header)"
    return f"unparsable timestamp {value!r}{expected}"


def _to_seconds(
    col: pl.Series, fmt: str, path: Path, name: str, header: bool
) -> tuple[pl.Series, pl.Series, str]:
    """Returns (ts seconds Int64, sub-second tie-breaker Int64, the unit used).

    `fmt`: auto | s | ms | us | ns | iso | mmdd. With `auto`, numbers get their unit from their
    magnitude row by row and a column whose rows fall in different units is refused (naming the
    first row that differs), so one odd row cannot rescale the others; text is ISO-8601.
    """
    zero = pl.Series("seq", [0] * len(col), dtype=pl.Int64)
    if fmt == "mmdd":
        v = col.cast(pl.Utf8).str.strip_chars().cast(pl.Int64, strict=False) if col.dtype == pl.Utf8 \
            else col.cast(pl.Int64, strict=False)
        month, day = v // 100, v % 100
        bad = v.is_null() | (month < 1) | (month > 12) | (day < 1) | (day > 31)
        if bad.any():
            i = int(bad.arg_true()[0])
            raise InputError(f"unparsable mmdd date {col[i]!r}", path=path,
                             row=_line_of(i, header), column=name)
        days = pl.DataFrame({"m": month, "d": day}).select(
            pl.date(2015, pl.col("m"), pl.col("d")).cast(pl.Int64).alias("x")
        ).to_series()
        return (days * 86400).rename("ts"), zero, "mmdd"
    if col.dtype == pl.Utf8 and fmt != "iso":
        stripped = col.str.strip_chars()
        as_num = stripped.cast(pl.Int64, strict=False)
        if as_num.null_count() == col.null_count():
            col = as_num
        else:
            as_float = stripped.cast(pl.Float64, strict=False)
            if as_float.null_count() == col.null_count():
                col = as_float
            elif fmt in _SCALE:
                bad = as_float.is_null() & col.is_not_null()
                i = int(bad.arg_true()[0])
                raise InputError(f"timestamp {col[i]!r} is not a number (--time-unit {fmt})", path=path,
                                 row=_line_of(i, header), column=name)
    if col.dtype.is_numeric():
        if fmt == "iso":
            raise InputError(f"timestamps are numbers, not ISO-8601 date-times (--time-unit iso); "
                             f"first value {col[0]!r}", path=path, column=name)
        if col.dtype.is_float():
            x = col.cast(pl.Float64)
            bad = x.is_null() | x.is_nan() | x.is_infinite()
        else:
            x = col.cast(pl.Int64)
            bad = x.is_null()
        if bad.any():
            i = int(bad.arg_true()[0])
            raise InputError(_bad_time(col[i]), path=path,
                             row=_line_of(i, header), column=name)
        unit = fmt
        if unit == "auto":
            units = _unit_of(x)
            first = units[0]
            differs = units != first
            if differs.any():
                i = int(differs.arg_true()[0])
                raise InputError(
                    f"timestamps mix units: {col[i]!r} looks like {units[i]} but {col[0]!r} "
                    f"(row {_line_of(0, header)}) looks like {first}; state the unit with --time-unit "
                    "s|ms|us|ns", path=path, row=_line_of(i, header), column=name)
            unit = first
            if unit == "s":
                _refuse_mixed_seconds(x, col, path, name, header)
        scale = _SCALE[unit]
        if x.dtype.is_float():
            ts = (x / scale).floor().cast(pl.Int64)
            sub = ((x / scale - ts.cast(pl.Float64)) * 1e6).round().cast(pl.Int64)
        else:
            ts = x // scale
            sub = x % scale
        return ts.rename("ts"), sub.rename("seq"), unit
    # strings: ISO-8601 date-times
    s = col.cast(pl.Utf8)
    parsed = s.str.strip_chars().str.to_datetime(time_unit="us", strict=False, time_zone="UTC")
    bad = parsed.is_null()
    if bad.any():
        numeric = s.str.strip_chars().cast(pl.Float64, strict=False).is_not_null()
        neither = bad & ~numeric
        # name a value that is neither a number nor a date-time first (`NA` among unix times)
        i = int((neither if neither.any() else bad).arg_true()[0])
        good = (~bad) & s.is_not_null()
        if fmt != "iso" and good.any() and bool(numeric[i]):  # a clock in two notations
            j = int(good.arg_true()[0])
            raise InputError(f"timestamps mix unix times and ISO-8601 date-times: {col[i]!r} is a number but "
                             f"{col[j]!r} (row {_line_of(j, header)}) is a date-time", path=path,
                             row=_line_of(i, header), column=name)
        expected = "an ISO-8601 date-time" if fmt == "iso" else "a unix time or an ISO-8601 date-time"
        raise InputError(_bad_time(col[i], f" (expected {expected})"), path=path,
                         row=_line_of(i, header), column=name)
    us = parsed.dt.epoch("us")
    return (us // 1_000_000).rename("ts"), (us % 1_000_000).rename("seq"), "iso"


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
                         row=_line_of(i, header), column=src)
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
    df, header = _read_raw(path, p)
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
        ts, sub, unit = _to_seconds(
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
