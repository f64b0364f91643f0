"""`hnvm recommend`: top-k for one user or a CSV of users, from a trained run.

Ids are the ORIGINAL ids of the raw log (the run's items.parquet / users.parquet map them).
A user's history is their sessions in the run's dataset; `session` is the current session
(empty: recommend the next session). Unknown users get cold-start recommendations, unknown
items are ignored and reported. The same `Engine` as `hnvm serve` computes the scores.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from hnvm.errors import HnvmError, InputError
from hnvm.serve.state import Engine, Query, Recommendation

log = logging.getLogger(__name__)

MAX_K = 1000
_SPLIT = re.compile(r"[,\s]+")


def parse_items(text: str | None) -> list[str]:
    """'i1,i2 i3' -> ['i1', 'i2', 'i3'] (commas and/or spaces separate items)."""
    return [s for s in _SPLIT.split(text.strip())] if text and text.strip() else []


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise HnvmError(f"-k must be in 1..{MAX_K}, got {k}")


def recommend_user(run: str | Path, user: str, session: Sequence[str] = (), *, k: int = 10,
                   exclude_seen: bool = False, data: str | Path | None = None) -> Recommendation:
    _check_k(k)
    engine = Engine.from_run(run, data=data)
    return engine.recommend(Query(str(user), list(session), k, exclude_seen))


@dataclass
class BatchResult:
    users: int
    rows: int
    cold_start: int
    unknown_items: int
    out: Path


def read_queries(path: Path, k: int, exclude_seen: bool, max_session: int = 1000) -> list[Query]:
    """users.csv: a header with `user` and optionally `session` (items separated by commas or
    spaces; quote the field). Bad rows are named by their line number; nothing is computed
    unless every row is valid."""
    if not path.is_file():
        raise InputError("no such file", path=path)
    queries: list[Query] = []
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        try:
            reader = csv.reader(fh)
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
                items = parse_items(row[si]) if si is not None else []
                if len(items) > max_session:
                    problems.append(f"row {line}, column 'session': {len(items)} items (at most {max_session})")
                    continue
                queries.append(Query(user, items, k, exclude_seen))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"cannot parse CSV ({exc})", path=path) from exc
    if problems:
        more = f" (and {len(problems) - 5} more bad rows)" if len(problems) > 5 else ""
        raise InputError("; ".join(problems[:5]) + more, path=path)
    if not queries:
        raise InputError("no users to recommend for", path=path)
    return queries


def recommend_batch(run: str | Path, input_csv: str | Path, out: str | Path, *, k: int = 10,
                    exclude_seen: bool = False, data: str | Path | None = None,
                    chunk: int = 256) -> BatchResult:
    """Recommendations for every row of `input_csv`, written to `out` (parquet, long format:
    user, rank, item, score) atomically: a failed run leaves no output file."""
    _check_k(k)
    input_csv, out = Path(input_csv), Path(out)
    queries = read_queries(input_csv, k, exclude_seen)
    engine = Engine.from_run(run, data=data)
    users: list[str] = []
    ranks: list[int] = []
    items: list[str] = []
    scores: list[float] = []
    cold = unknown = 0
    for lo in range(0, len(queries), chunk):
        for r in engine.recommend_many(queries[lo: lo + chunk]):
            users.extend([r.user] * len(r.items))
            ranks.extend(range(1, len(r.items) + 1))
            items.extend(r.items)
            scores.extend(r.scores)
            cold += r.cold_start
            unknown += len(r.unknown_items)
    frame = pl.DataFrame({"user": users, "rank": ranks, "item": items, "score": scores},
                         schema={"user": pl.Utf8, "rank": pl.Int32, "item": pl.Utf8, "score": pl.Float32})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise InputError(f"cannot write recommendations: {exc}", path=out) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return BatchResult(len(queries), frame.height, cold, unknown, out)
