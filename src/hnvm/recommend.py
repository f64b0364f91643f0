"""`hnvm recommend`: top-k for one user or a CSV of users, from a trained run.

Ids are the ORIGINAL ids of the raw log (the run's items.parquet / users.parquet map them),
opaque text: `007` and `7` are different ids; only surrounding blanks are removed, as
`hnvm prepare` removes them. A user's history is their sessions in the run's dataset;
`session` is the current session (empty: recommend the next session). Unknown users get
cold-start recommendations, unknown items are ignored and reported; a non-empty session none of
whose items is known is never silently turned into a next-session request (an error for one
user, flagged in the batch output). The same `Engine` as `hnvm serve` computes the scores.

Session syntax (`--session` and the batch file's `session` column), see `parse_session`:
several `--session` flags give one item each, exactly as written; a single value is a JSON list
of strings (`["Dune, Part 1","x"]`), or exactly one catalogue item id, or items separated by
commas and/or blanks (the short form, for ids without commas or blanks).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import logging
import re
import zlib
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from hnvm.atomic import atomic_file
from hnvm.data.store import check_output_file
from hnvm.errors import HnvmError, InputError
from hnvm.online import Engine, Query, Recommendation

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_SESSION = 1000  # items of one session: the same limit as `hnvm serve` (`serve.schemas.Limits`)
_SPLIT = re.compile(r"[,\s]+")


def parse_items(text: str | None) -> list[str]:
    """The short form: 'i1,i2 i3' -> ['i1', 'i2', 'i3'] (commas and/or blanks separate items;
    empty pieces are skipped). It cannot express ids that contain commas or blanks: see
    `parse_session`."""
    return [s for s in _SPLIT.split(text.strip()) if s] if text and text.strip() else []


def parse_session(values: str | Sequence[str] | None, catalogue: Container[str] | None = None, *,
                  where: str = "--session", max_items: int = MAX_SESSION) -> list[str]:
    """The items of a current session, losslessly, from the `--session` values (or one CSV cell).

    * Several values (the flag repeated): one item each, exactly as written (surrounding blanks
      removed); an empty one is an error.
    * One value, blank: the empty session (recommend the next session).
    * One value that is exactly an item id of `catalogue` (even `[1]`): that one item. If it also
      reads as several catalogue items (split at commas/blanks, or as a JSON list), it is
      ambiguous: an error.
    * One value that is a JSON list of strings, e.g. `["Dune, Part 1", "x"]`: one item per string.
      Another value that starts with `[` is an error.
    * Otherwise the short form: items separated by commas and/or blanks.

    At most `max_items` items. Errors are HnvmError messages starting with `where`."""
    if values is None:
        return []
    if not isinstance(values, str):
        if len(values) == 0:
            return []
        if len(values) > 1:
            items = [v.strip() for v in values]
            empty = [i for i, v in enumerate(items, start=1) if not v]
            if empty:
                raise HnvmError(f"{where}: value {empty[0]} is empty (each repeated {where} is one item id)")
            return _cap(items, where, max_items)
        values = values[0]
    text = values.strip()
    if not text:
        return []
    if catalogue is not None and text in catalogue:
        # exactly one catalogue id (even one shaped like a list, `[1]`), unless it also reads as
        # several catalogue ids: then the user has to say which
        try:
            alt = json.loads(text) if text.startswith("[") else parse_items(text)
        except ValueError:
            alt = []
        if isinstance(alt, list) and len(alt) > (0 if text.startswith("[") else 1) and all(
                isinstance(a, str) and a.strip() in catalogue for a in alt):
            shown = ", ".join(repr(a) for a in alt[:5])
            raise HnvmError(f"{where}: {text!r} is ambiguous: it is one catalogue item and also the items "
                            f"{shown}; {_list_advice(where, [text])}")
        return [text]
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            parsed = exc
        if isinstance(parsed, list):
            if not all(isinstance(v, str) for v in parsed):
                raise HnvmError(f"{where}: a JSON list of item ids must hold strings only "
                                f"(write \"7\", not 7), got {text!r}")
            items = [v.strip() for v in parsed]
            if not all(items):
                raise HnvmError(f"{where}: the JSON list holds an empty item id ({text!r})")
            return _cap(items, where, max_items)
        why = parsed.args[0] if isinstance(parsed, ValueError) else "not a list"
        raise HnvmError(f"{where}: {text!r} starts with '[' but is neither a JSON list of strings ({why}) nor "
                        'a catalogue item id; write e.g. ["a", "b, c"]')
    items = parse_items(text)
    if not items:  # only separators: not the empty session, which is a blank value or []
        raise HnvmError(f"{where}: {text!r} holds no item id (leave the session out for next-session "
                        "recommendations)")
    return _cap(items, where, max_items)


def _list_advice(where: str, example: Sequence[str] | None = None) -> str:
    """How to give item ids that hold commas, blanks or brackets: a flag can be repeated (one item
    per flag); a file cell cannot, so there it is a JSON list (quoted as a CSV field)."""
    if where.startswith("-"):
        shown = f" (e.g. {json.dumps(list(example))})" if example else ""
        return f"give a JSON list{shown} or one item per {where}"
    cell = json.dumps(list(example) if example else ["a", "b, c"])
    quoted = '"' + cell.replace('"', '""') + '"'
    return f"give the cell a JSON list of strings, written as a quoted CSV field, e.g. {quoted}"


def _cap(items: list[str], where: str, max_items: int) -> list[str]:
    if len(items) > max_items:
        raise HnvmError(f"{where}: {len(items)} items in the session (at most {max_items})")
    return items


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise HnvmError(f"-k must be in 1..{MAX_K}, got {k}")



def _unknown_session_message(session: Sequence[str], unknown: Sequence[str], where: str) -> str:
    shown = ", ".join(repr(u) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    return (f"{where}: none of the {len(session)} session item(s) is in the run's catalogue (unknown: {shown}); "
            "the recommendations would silently be for the next session instead: give known item ids "
            f"(ids with commas or blanks: {_list_advice(where)}), or leave the session out")


def recommend_user(run: str | Path | Engine, user: str, session: Sequence[str] = (), *, k: int = 10,
                   exclude_seen: bool = False, data: str | Path | None = None) -> Recommendation:
    """Top-k for one user. `run`: a run directory (or an Engine already loaded from one);
    `session`: the current session's item ids (a list; see `parse_session` for the CLI's text
    forms). Raises HnvmError for an empty user id, a session over MAX_SESSION items and a
    non-empty session none of whose items is in the catalogue (it would otherwise silently
    become a next-session request); other unknown items are ignored and reported."""
    check_k(k)
    user = str(user).strip()
    if not user:
        raise HnvmError("--user: empty user id")
    session = _cap([str(s) for s in session], "--session", MAX_SESSION)
    engine = run if isinstance(run, Engine) else Engine.from_run(run, data=data)
    r = engine.recommend(Query(user, session, k, exclude_seen))
    if session and len(r.unknown_items) == len(set(session)):
        raise HnvmError(_unknown_session_message(session, r.unknown_items, "--session"))
    return r


@dataclass
class BatchResult:
    users: int
    rows: int
    cold_start: int
    unknown_items: int
    out: Path
    unknown_sessions: int = 0  # rows with a non-empty session none of whose items is known


def _read_text(path: Path) -> str:
    """The whole file as text: UTF-8 with or without a byte-order mark (or UTF-16 with one),
    gzip-compressed or not (recognised by its content, not its name)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read the file ({exc})", path=path) from exc
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise InputError(f"not valid UTF-16 text ({exc.reason})", path=path) from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"not UTF-8 text (byte {raw[exc.start]:#04x}: {exc.reason}); save the file as UTF-8",
                         path=path, row=row) from exc


def read_queries(path: Path, k: int, exclude_seen: bool, max_session: int = MAX_SESSION,
                 catalogue: Container[str] | None = None) -> list[Query]:
    """users.csv: a header with `user` and optionally `session`; comma- or tab-separated, UTF-8
    (a byte-order mark is removed), optionally gzip-compressed. Each `session` cell is read by
    `parse_session` (a JSON list of strings, a catalogue item id, or the short comma/blank form;
    quote a cell that contains commas). Ids keep their text (surrounding blanks removed). Bad
    rows are named by their line number; nothing is computed unless every row is valid."""
    if not path.is_file():
        raise InputError("no such file", path=path)
    text = _read_text(path)
    first = text.split("\n", 1)[0]
    # a tab-separated file (its header has tabs but no commas) is read as such
    delimiter = "\t" if "\t" in first and "," not in first else ","
    queries: list[Query] = []
    problems: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise InputError("file is empty (expected a header with a 'user' column)", path=path)
        cols = [h.strip() for h in header]
        if "user" not in cols:
            raise InputError(f"no 'user' column in the header (found: {', '.join(cols) or 'none'}); "
                             "expected user[,session]", path=path, row=1)
        unknown = [c for c in cols if c not in ("user", "session")]
        if unknown:
            raise InputError(f"unknown column(s) {', '.join(unknown)} (expected user[,session])",
                             path=path, row=1)
        ui, si = cols.index("user"), cols.index("session") if "session" in cols else None
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            if len(row) != len(cols):
                problems.append(f"row {line}: {len(row)} fields, expected {len(cols)} "
                                "(quote a session that contains commas)")
                continue
            user = row[ui].strip()
            if not user:
                problems.append(f"row {line}, column 'user': empty user id")
                continue
            try:
                items = (parse_session(row[si], catalogue, where=f"row {line}, column 'session'",
                                       max_items=max_session) if si is not None else [])
            except HnvmError as exc:
                problems.append(str(exc))
                continue
            queries.append(Query(user, items, k, exclude_seen))
    except csv.Error as exc:
        raise InputError(f"cannot parse CSV ({exc})", path=path, row=reader.line_num or None) from exc
    if problems:
        more = f" (and {len(problems) - 5} more bad rows)" if len(problems) > 5 else ""
        raise InputError("; ".join(problems[:5]) + more, path=path)
    if not queries:
        raise InputError("no users to recommend for", path=path)
    return queries


def recommend_batch(run: str | Path, input_csv: str | Path, out: str | Path, *, k: int = 10,
                    exclude_seen: bool = False, data: str | Path | None = None,
                    chunk: int = 256, force: bool = False) -> BatchResult:
    """Recommendations for every row of `input_csv`, written to `out` (parquet, long format:
    user, rank, item, score, session_length, unknown_items) atomically: a failed run leaves no
    output file. `session_length` is the number of the row's session items the scores condition
    on and `unknown_items` the number of its distinct items not in the catalogue (ignored); a row
    with a session but session_length 0 got next-session recommendations because none of its
    items is known (counted in `BatchResult.unknown_sessions` and logged)."""
    check_k(k)
    input_csv, out = Path(input_csv), Path(out)
    if not input_csv.is_file():
        raise InputError("no such file", path=input_csv)
    if out.is_dir():
        raise InputError("is a directory; --out names the parquet file to write", path=out)
    # never the input, nor a file of the run or its data set; another existing file needs force
    check_output_file(out, "--out", force=force, inputs=(input_csv,))
    engine = Engine.from_run(run, data=data)
    queries = read_queries(input_csv, k, exclude_seen, catalogue=engine.item_index)
    users: list[str] = []
    ranks: list[int] = []
    items: list[str] = []
    scores: list[float] = []
    lengths: list[int] = []
    unknowns: list[int] = []
    cold = unknown = dropped = 0
    for lo in range(0, len(queries), chunk):
        part = queries[lo: lo + chunk]
        for q, r in zip(part, engine.recommend_many(part), strict=True):
            n = len(r.items)
            users.extend([r.user] * n)
            ranks.extend(range(1, n + 1))
            items.extend(r.items)
            scores.extend(r.scores)
            lengths.extend([r.session_length] * n)
            unknowns.extend([len(r.unknown_items)] * n)
            cold += r.cold_start
            unknown += len(r.unknown_items)
            dropped += bool(q.session) and r.session_length == 0
    if dropped:
        log.warning("%s: %d row(s) have a session none of whose items is in the catalogue: next-session "
                    "recommendations (session_length 0 in the output)", input_csv, dropped)
    frame = pl.DataFrame({"user": users, "rank": ranks, "item": items, "score": scores,
                          "session_length": lengths, "unknown_items": unknowns},
                         schema={"user": pl.Utf8, "rank": pl.Int32, "item": pl.Utf8, "score": pl.Float32,
                                 "session_length": pl.Int32, "unknown_items": pl.Int32})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(out, frame.write_parquet)
    except OSError as exc:
        raise InputError(f"cannot write recommendations: {exc}", path=out) from exc
    return BatchResult(len(queries), frame.height, cold, unknown, out, dropped)
