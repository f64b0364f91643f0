"""Open a log file as a raw polars frame: what the file is, and how its text is laid out.

The content is sniffed from the first bytes, whatever the file's name: parquet, or text
(plain, gzip or zstd) read as csv/tsv/`::` with every column as text. Compressions and
encodings that are not read directly (bzip2, xz, zip, UTF-16/32) are refused with the fix.
Presets' quirks of layout (no header, movielens `::`) are applied here; their columns are
mapped onto canonical roles by `readers`.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from hnvm.errors import InputError

if TYPE_CHECKING:  # readers imports this module; Preset is only a type here
    from hnvm.data.readers import Preset

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


def read_raw(path: Path, preset: Preset | None) -> tuple[pl.DataFrame, bool]:
    """Returns the raw frame (all columns as read; every column of a text file as text) and
    whether the file had a header."""
    kind = _file_kind(path)
    if kind == "parquet" or (kind == "text" and path.name.lower().endswith((".parquet", ".pq"))):
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
    header, names = _layout(first, preset)
    sep = _separator(first, preset)
    df = _read_text(path, kind, sep, header, names)
    dup = [c for c in df.columns if "_duplicated_" in c]
    if dup:  # polars renames a repeated header name instead of refusing it
        raise InputError(f"the header names column '{dup[0].split('_duplicated_')[0]}' twice", path=path, row=1)
    if preset and preset.name == "movielens" and "userId" in df.columns:
        df = df.rename({"userId": "UserID", "movieId": "MovieID", "timestamp": "Timestamp"})
    if df.height == 0:
        raise InputError("file has a header but no rows", path=path)
    return df, header


def _file_kind(path: Path) -> str:
    """The sniffed kind of a file that can be read (parquet, gzip, zstd or text); a missing,
    empty, doubly gzipped file, or one compressed or encoded in a way not read, is refused."""
    if not path.exists():
        raise InputError("no such file", path=path)
    if path.is_dir():
        raise InputError(
            "is a directory, expected a file (csv, tsv, parquet, optionally .gz)", path=path
        )
    if path.stat().st_size == 0:
        raise InputError("file is empty", path=path)
    kind = _sniff(path)
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
    return kind


def _layout(first: str, preset: Preset | None) -> tuple[bool, list[str] | None]:
    """(has a header, column names to give) from the preset and the file's first line, which
    tells the variants of one public format apart."""
    header = preset.header if preset else True
    names = list(preset.names) if preset and preset.names else None
    if preset and preset.name == "movielens" and "::" in first:
        header, names = False, ["UserID", "MovieID", "Rating", "Timestamp"]
    if preset and preset.name == "movielens" and first.startswith("userId"):
        # ratings.csv: rename to the .dat names so one mapping serves both
        names = None
    if preset and preset.name == "yoochoose" and not first.startswith("SessionId"):
        header, names = False, ["SessionId", "Time", "ItemId", "Category"]
    return header, names


def _separator(first: str, preset: Preset | None) -> str:
    if "::" in first:
        return "::"
    if preset and preset.separator:
        return preset.separator
    return "\t" if "\t" in first else (";" if first.count(";") > first.count(",") else ",")


def _read_text(path: Path, kind: str, sep: str, header: bool, names: list[str] | None) -> pl.DataFrame:
    """The text file as a frame of text columns; a parse failure is an InputError (naming the
    first line that is not UTF-8 where that is the cause)."""
    try:
        if sep == "::":
            # polars wants a one-byte separator: read lines and split
            lines = pl.read_csv(path, has_header=False, separator="\x1f", new_columns=["_l"],
                                quote_char=None, infer_schema=False)
            n = len(names or [])
            return lines.select(
                pl.col("_l").str.split_exact("::", n - 1)
                .struct.rename_fields(names or []).alias("_s")
            ).unnest("_s")
        # every column as text: ids stay exactly as written (`007` is not `7`) and a column
        # that turns non-numeric after many rows loads like any other
        return pl.read_csv(
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
