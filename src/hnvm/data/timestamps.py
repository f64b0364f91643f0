"""Turn a log's time column into canonical seconds (`ts`) and a sub-second tie-breaker (`seq`).

The unit is stated (`--time-unit s|ms|us|ns|iso`, or a preset's own, e.g. `mmdd`) or, with
`auto`, decided per row by magnitude: a column whose rows fall in different units is refused
naming the first row that differs, never rescaled by its maximum. Text that is not a number is
read as ISO-8601. Every error names the file, its line (`line_of`) and the column.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from hnvm.errors import InputError

TIME_UNITS = ("auto", "s", "ms", "us", "ns", "iso")
_SCALE = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Per-row unit classes for `auto`: the magnitude of a unix time in each unit. Seconds reach
# 1e11 only in the year 5138, ms 1e14 in 5138 too, and so on, so the classes do not overlap
# for real clocks; a column spanning two classes is refused instead of guessed.
_UNIT_BOUNDS = ((1e11, "s"), (1e14, "ms"), (1e17, "us"))


def line_of(index: int, header: bool) -> int:
    return index + 1 + (1 if header else 0)


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
    raise InputError(f"timestamps mix magnitudes: {col[i]!r} and {col[0]!r} (row {line_of(0, header)}) cannot both "
                     "be unix seconds of one log (a date such as 20200913 among unix times?); fix the row, or "
                     "state --time-unit s to accept them", path=path, row=line_of(i, header), column=name)


def _bad_time(value: object, expected: str = "") -> str:
    if value is None:  # polars fills the fields a short row lacks with nulls, like empty ones
        return "missing timestamp (an empty field, or a row with fewer fields than the header)"
    return f"unparsable timestamp {value!r}{expected}"


def to_seconds(
    col: pl.Series, fmt: str, path: Path, name: str, header: bool
) -> tuple[pl.Series, pl.Series, str]:
    """Returns (ts seconds Int64, sub-second tie-breaker Int64, the unit used).

    `fmt`: auto | s | ms | us | ns | iso | mmdd. With `auto`, numbers get their unit from their
    magnitude row by row and a column whose rows fall in different units is refused (naming the
    first row that differs), so one odd row cannot rescale the others; text is ISO-8601.
    """
    if fmt == "mmdd":
        return _mmdd_to_seconds(col, path, name, header)
    if col.dtype == pl.Utf8 and fmt != "iso":
        col = _text_as_number(col, fmt, path, name, header)
    if col.dtype.is_numeric():
        return _numbers_to_seconds(col, fmt, path, name, header)
    return _iso_to_seconds(col, fmt, path, name, header)


def _mmdd_to_seconds(col: pl.Series, path: Path, name: str, header: bool) -> tuple[pl.Series, pl.Series, str]:
    """mmdd dates of 2015 (ijcai15) -> midnight in seconds; no sub-second part."""
    zero = pl.Series("seq", [0] * len(col), dtype=pl.Int64)
    v = col.cast(pl.Utf8).str.strip_chars().cast(pl.Int64, strict=False) if col.dtype == pl.Utf8 \
        else col.cast(pl.Int64, strict=False)
    month, day = v // 100, v % 100
    bad = v.is_null() | (month < 1) | (month > 12) | (day < 1) | (day > 31)
    if bad.any():
        i = int(bad.arg_true()[0])
        raise InputError(f"unparsable mmdd date {col[i]!r}", path=path,
                         row=line_of(i, header), column=name)
    days = pl.DataFrame({"m": month, "d": day}).select(
        pl.date(2015, pl.col("m"), pl.col("d")).cast(pl.Int64).alias("x")
    ).to_series()
    return (days * 86400).rename("ts"), zero, "mmdd"


def _text_as_number(col: pl.Series, fmt: str, path: Path, name: str, header: bool) -> pl.Series:
    """A text column as Int64 or Float64 where every value is a number; else unchanged (read as
    ISO-8601 later), except that a stated numeric unit refuses the first non-number."""
    stripped = col.str.strip_chars()
    as_num = stripped.cast(pl.Int64, strict=False)
    if as_num.null_count() == col.null_count():
        return as_num
    as_float = stripped.cast(pl.Float64, strict=False)
    if as_float.null_count() == col.null_count():
        return as_float
    if fmt in _SCALE:
        bad = as_float.is_null() & col.is_not_null()
        i = int(bad.arg_true()[0])
        raise InputError(f"timestamp {col[i]!r} is not a number (--time-unit {fmt})", path=path,
                         row=line_of(i, header), column=name)
    return col


def _numbers_to_seconds(
    col: pl.Series, fmt: str, path: Path, name: str, header: bool
) -> tuple[pl.Series, pl.Series, str]:
    """Numeric unix times in the stated unit (or, with `auto`, the one unit all rows share)."""
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
                         row=line_of(i, header), column=name)
    unit = _auto_unit(x, col, path, name, header) if fmt == "auto" else fmt
    scale = _SCALE[unit]
    if x.dtype.is_float():
        ts = (x / scale).floor().cast(pl.Int64)
        sub = ((x / scale - ts.cast(pl.Float64)) * 1e6).round().cast(pl.Int64)
    else:
        ts = x // scale
        sub = x % scale
    return ts.rename("ts"), sub.rename("seq"), unit


def _auto_unit(x: pl.Series, col: pl.Series, path: Path, name: str, header: bool) -> str:
    """The unit every row's magnitude agrees on; rows in two units (or seconds of two clocks)
    are refused rather than guessed."""
    units = _unit_of(x)
    first = units[0]
    differs = units != first
    if differs.any():
        i = int(differs.arg_true()[0])
        raise InputError(
            f"timestamps mix units: {col[i]!r} looks like {units[i]} but {col[0]!r} "
            f"(row {line_of(0, header)}) looks like {first}; state the unit with --time-unit "
            "s|ms|us|ns", path=path, row=line_of(i, header), column=name)
    if first == "s":
        _refuse_mixed_seconds(x, col, path, name, header)
    return first


def _iso_to_seconds(
    col: pl.Series, fmt: str, path: Path, name: str, header: bool
) -> tuple[pl.Series, pl.Series, str]:
    """ISO-8601 date-times (read in UTC) -> seconds and microseconds."""
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
                             f"{col[j]!r} (row {line_of(j, header)}) is a date-time", path=path,
                             row=line_of(i, header), column=name)
        expected = "an ISO-8601 date-time" if fmt == "iso" else "a unix time or an ISO-8601 date-time"
        raise InputError(_bad_time(col[i], f" (expected {expected})"), path=path,
                         row=line_of(i, header), column=name)
    us = parsed.dt.epoch("us")
    return (us // 1_000_000).rename("ts"), (us % 1_000_000).rename("seq"), "iso"
