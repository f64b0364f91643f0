"""Sessions from an event stream, and the records the engine reads and returns.

Session rules (`Track`): an event opens a new session when the user has none open, when its
session key differs from the open one's (explicit keys, e.g. an order id, win over time), or,
without keys, when it comes more than `gap_s` seconds after the user's previous event (the idle
gap of `hnvm prepare`, `dataset_gap`; exactly `gap_s` stays in the session). The dataset history
of a known user counts as closed sessions before any online event. A user has one open session:
a keyed session is the run of that user's consecutive events with its key, and once another
event has closed it its key cannot come back (`Engine.check` refuses it, kind "key"). `hnvm
prepare` groups all events of a key into one session even when keys interleave in time; an
online stream cannot reopen a session that later ones followed, so it must not interleave them,
and the engine refuses rather than silently split one key into two sessions. An unkeyed open
session whose last event is more than the gap before a request's time is treated as closed by
that request (`expired`).

Records: `Event` (one interaction, original ids), `UserState` (a user's closed sessions, open
session and the scorer's cache), `Query` / `Recommendation` (a request and its answer),
`QueryError` (a request the user's state makes invalid) and `Job` (queries between
`Engine.prepare` and `Engine.finish`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from hnvm.data.sessions import parse_duration
from hnvm.errors import HnvmError

DEFAULT_GAP_S = 1800.0


@dataclass
class Track:
    """What session tracking and input validation need to know about a user's event stream."""

    has_open: bool = False
    last_ts: float | None = None  # of the user's last online event
    key: str | None = None  # session key of the open session
    open_n: int = 0  # events (known items or not) in the open session
    closed: tuple[str, ...] = ()  # keys closed by events checked but not yet applied (`Engine.check`)

    def starts_new(self, ts: float, key: str | None, gap_s: float) -> bool:
        if not self.has_open:
            return True
        if key is not None or self.key is not None:
            return key != self.key
        return self.last_ts is None or ts - self.last_ts > gap_s

    def advance(self, ts: float, key: str | None, gap_s: float) -> bool:
        """Move past one event; returns whether it opened a new session."""
        new = self.starts_new(ts, key, gap_s)
        self.open_n = 1 if new else self.open_n + 1
        self.has_open, self.last_ts, self.key = True, ts, key
        return new

    def expired(self, now: float | None, gap_s: float) -> bool:
        """The open session has no key and its last event is more than the gap before `now`: a
        recommendation at `now` treats it as closed."""
        return (self.has_open and self.key is None and now is not None and self.last_ts is not None
                and now - self.last_ts > gap_s)

    def copy(self) -> Track:
        return Track(self.has_open, self.last_ts, self.key, self.open_n, self.closed)


@dataclass
class UserState:
    uid: int  # internal user id; 0 = unknown to the model (cold start)
    history: list[np.ndarray]  # closed sessions (known items, non-empty), dataset ones first
    n_dataset: int  # how many of `history` come from the dataset
    track: Track = field(default_factory=Track)
    open_items: list[int] = field(default_factory=list)  # known items of the open session
    open_id: int = 0  # counts sessions opened online; scorer caches key on it
    n_events: int = 0  # online events applied
    seen: set[int] = field(default_factory=set)
    closed_keys: set[str] = field(default_factory=set)  # keys of the user's closed online sessions
    cache: Any = None  # the scorer's per-user tensors
    row: int = 0  # the user's id in the dataset whose sessions open `history` (0: none)


@dataclass
class Event:
    user: str
    item: str
    ts: float
    session: str | None = None


@dataclass
class Query:
    """One recommendation request. `session`: items appended to the user's open session for
    this request only (not stored). `now`: the request time; an open session without a key
    whose last event is more than the gap before `now` is treated as closed."""

    user: str
    session: Sequence[str] = ()
    k: int = 10
    exclude_seen: bool = False
    now: float | None = None


class QueryError(HnvmError):
    """A recommendation request that the user's current state makes invalid (its session items
    plus the open session's events over the limit)."""


@dataclass
class Recommendation:
    user: str
    items: list[str]
    scores: list[float]
    unknown_items: list[str]  # of the query's `session` (ignored)
    cold_start: bool  # the user is not in the model's vocabulary
    session_length: int  # known items of the current session the scores condition on
    new_session: bool  # no open session (or it timed out): next-session recommendations


@dataclass
class Job:
    """Queries between `Engine.prepare` and `Engine.finish`."""

    ks: list[int]
    k: int  # the largest k (capped at the catalogue)
    exclude: list[list[int]]
    prepared: Tensor  # the scorer's `prepare` output
    out: list[Recommendation]  # everything but items and scores


def dataset_gap(path: Path, meta: dict[str, Any]) -> float:
    """The idle gap `hnvm prepare` recorded in the dataset's meta.json (`prepare.gap`; 30m when
    absent); a damaged value is a one-line error naming the file and the field, not `--gap`."""

    where = f"{Path(path) / 'meta.json'}: field"
    prep = meta.get("prepare", {})
    if prep is None:
        prep = {}
    if not isinstance(prep, dict):
        raise HnvmError(f"{where} prepare is not an object ({json.dumps(prep)[:80]}); the dataset is damaged, "
                        "re-run `hnvm prepare` (or give serve --gap)")
    raw = prep.get("gap", "30m")
    why = None
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        why = "not a duration"
    else:
        try:
            return float(parse_duration(raw))
        except (ValueError, OverflowError) as exc:
            why = str(exc).removeprefix("--gap: ").split(" (a duration")[0]
    raise HnvmError(f"{where} prepare.gap {json.dumps(raw)[:80]} is not a valid idle gap ({why}); the dataset "
                    "is damaged: re-run `hnvm prepare` (or give serve --gap)")
