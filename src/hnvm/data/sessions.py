"""Sessionization and iterative filtering (the paper's section 4.2, generalised)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import polars as pl

log = logging.getLogger(__name__)


def parse_duration(text: str | int | float) -> int:
    """'30m' -> 1800; '45s', '2h', '1d' and plain seconds are accepted."""
    if isinstance(text, int | float):
        return int(text)
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise ValueError(f"cannot parse duration '{text}' (examples: 30m, 1800s, 2h)") from None


def sessionize(events: pl.DataFrame, gap_s: int) -> pl.DataFrame:
    """Assign each event to a session and order events inside it.

    With an explicit `session` column that key is used (sessions are ordered by their first
    event); otherwise a new session starts when the idle time since the user's previous event
    exceeds `gap_s` (an idle time of exactly `gap_s` stays in the session).

    Returns columns user, item, ts, sess (Int64, global, ordered by user then time), pos
    (0-based position inside the session), sorted by (user, sess, pos).
    """
    if "session" in events.columns:
        df = events.sort("user", "ts", "seq", "line")
        first = (
            df.group_by("user", "session", maintain_order=True)
            .agg(pl.col("ts").first().alias("_t0"), pl.col("seq").first().alias("_s0"),
                 pl.col("line").first().alias("_l0"))
            .sort("user", "_t0", "_s0", "_l0")
            .with_row_index("sess")
            .select("user", "session", pl.col("sess").cast(pl.Int64))
        )
        df = df.join(first, on=["user", "session"], how="left").sort("sess", "ts", "seq", "line")
    else:
        df = events.sort("user", "ts", "seq", "line")
        new = (pl.col("user") != pl.col("user").shift(1)) | (
            (pl.col("ts") - pl.col("ts").shift(1)) > gap_s
        )
        df = df.with_columns(sess=(new.fill_null(True).cast(pl.Int64).cum_sum() - 1))
    return df.select(
        "user", "item", "ts",
        pl.col("sess"),
        pos=pl.int_range(pl.len(), dtype=pl.Int32).over("sess"),
    )


@dataclass(frozen=True)
class FilterStep:
    """Counts after one filter pass (reported when the filters leave nothing)."""

    iteration: int
    step: str
    events: int
    users: int
    items: int
    sessions: int

    def describe(self) -> str:
        return (f"pass {self.iteration}, after {self.step}: {self.events:,} events, "
                f"{self.users:,} users, {self.items:,} items, {self.sessions:,} sessions")


def _counts(df: pl.DataFrame) -> tuple[int, int, int, int]:
    if df.height == 0:
        return 0, 0, 0, 0
    row = df.select(
        pl.len(), pl.col("user").n_unique(), pl.col("item").n_unique(), pl.col("sess").n_unique()
    ).row(0)
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def filter_fixed_point(
    df: pl.DataFrame,
    *,
    min_item_support: int = 5,
    min_session_length: int = 2,
    min_sessions: int = 3,
    max_iterations: int = 100,
) -> tuple[pl.DataFrame, list[FilterStep]]:
    """Drop rare items, short sessions and users with few sessions until nothing changes.

    Item support counts events. Returns the filtered frame (positions renumbered) and the
    counts after every step, so a caller can say where the data ran out.
    """
    steps: list[FilterStep] = [FilterStep(0, "sessionization", *_counts(df))]
    for it in range(1, max_iterations + 1):
        before = df.height
        df = df.filter(pl.len().over("item") >= min_item_support)
        steps.append(FilterStep(it, f"item support >= {min_item_support}", *_counts(df)))
        df = df.filter(pl.len().over("sess") >= min_session_length)
        steps.append(FilterStep(it, f"session length >= {min_session_length}", *_counts(df)))
        df = df.filter(pl.col("sess").n_unique().over("user") >= min_sessions)
        steps.append(FilterStep(it, f"sessions per user >= {min_sessions}", *_counts(df)))
        log.debug("filter pass %d: %d -> %d events", it, before, df.height)
        if df.height == before or df.height == 0:
            break
    df = df.with_columns(pos=pl.int_range(pl.len(), dtype=pl.Int32).over("sess"))
    return df, steps
