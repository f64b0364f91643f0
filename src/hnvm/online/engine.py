"""The online engine: a trained model served from an event stream.

An `Engine` holds a trained model, its vocabularies (original id <-> internal id), each known
user's history from the run's dataset, and one `UserState` per user seen since. Events are
checked (`check`) and applied in log order (`apply`; sessions as in `hnvm.online.sessions`);
recommendations (`recommend_many`) read the state. A recommendation is `prepare`
(state-dependent: the scorer's per-user model steps, on the thread that applies events), then
`rank` (pure: it reads the prepared tensors and the weights, so it may run on another thread, or
in a ranking process, `start_rank_process`), then `finish`. The scorer is `hnvm.online.scorers`'s
(incremental for HNVM, the model's own scoring for every other model).

Determinism (the crash test relies on it): the state is a pure function of the applied events
and every per-user tensor is computed by the same per-user operations, in the same order,
whenever they run (lazily, at the first recommendation that needs them). Replaying the log
after a restart therefore gives bit-identical states and recommendations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from hnvm.contract import Recommender
from hnvm.data.batches import Sequences
from hnvm.data.store import VOCAB_COLUMNS, Dataset, read_table
from hnvm.errors import HnvmError
from hnvm.online.scorers import Ranked, Scorer, make_scorer
from hnvm.online.sessions import (
    DEFAULT_GAP_S,
    Event,
    Job,
    Query,
    QueryError,
    Recommendation,
    Track,
    UserState,
    dataset_gap,
)
from hnvm.rundir import load_run, vocab_digest

if TYPE_CHECKING:
    from hnvm.online.worker import RankWorker

log = logging.getLogger(__name__)


def _model_uids(h: Sequences) -> np.ndarray:
    """Long[n_users + 1]: each dataset user's id in the model, 0 for a user without training
    events (time split: the model never learnt that row; they are served as cold-start users)."""
    if h.item_split is None:
        users = h.session_user[h.session_split == 0]
    else:
        users = np.repeat(h.session_user, np.diff(h.offsets))[h.item_split == 0]
    out = np.zeros(len(h.user_end), dtype=np.int64)
    out[users] = users
    return out


class Engine:
    """A trained model served from an event stream (see the module docstring)."""

    def __init__(self, model: Recommender, item_ids: Sequence[str], user_ids: Sequence[str],
                 history: Sequences | None = None, *, gap_s: float = DEFAULT_GAP_S,
                 max_session_length: int = 1000, scoring: str = "auto") -> None:
        self.model = model
        self.item_ids = ["", *item_ids]  # index = internal id; 0 = padding
        self.item_index = {s: i for i, s in enumerate(item_ids, start=1)}
        self.user_index = {s: i for i, s in enumerate(user_ids, start=1)}
        self.n_items = len(item_ids)
        self.history = history
        self.gap_s = float(gap_s)
        self.max_session_length = max_session_length
        self.users: dict[str, UserState] = {}
        self.n_events = 0
        self.scorer: Scorer = make_scorer(model, scoring)
        self.model_uid = _model_uids(history) if history is not None else np.zeros(1, dtype=np.int64)
        # the users' dataset contexts, encoded in blocks (lazily, or warmed: `hnvm serve`)
        self.contexts = self.scorer.use_history(history, self.model_uid) if history is not None else None
        self.rank_worker: RankWorker | None = None  # when ranking runs in a process

    def start_rank_process(self) -> bool:
        """Rank in a child process from now on (a scorer whose passes are [B, H] states for a
        `LinearRanker`: HNVM's); False where the scorer has nothing to hand over."""
        if self.scorer.ranker is None or self.rank_worker is not None:
            return self.rank_worker is not None
        from hnvm.online.worker import RankWorker

        self.rank_worker = RankWorker(self.scorer.ranker)
        return True

    def close(self) -> None:
        if self.rank_worker is not None:
            self.rank_worker.close()
            self.rank_worker = None

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run: str | Path, *, data: str | Path | None = None, gap_s: float | None = None,
                 max_session_length: int = 1000, scoring: str = "auto") -> Engine:
        """Load a run; the users' histories and the idle gap come from its dataset (or `data`).
        Without a readable dataset users start from no history and the gap is 30 min.
        `scoring` (HNVM): "exact" scores every item in fp32; "bf16" shortlists candidates with
        a bf16 pass and ranks them in fp32 (the same top-k, certified: `online.ranking`);
        "auto" = bf16 from AUTO_BF16_ITEMS items on."""
        run = Path(run)
        model, cfg = load_run(run)
        # ids are text, exactly as the vocabulary holds them (never re-typed: "007" is not "7")
        items = read_table(run / "items.parquet", VOCAB_COLUMNS["items.parquet"]).sort("item")
        users = read_table(run / "users.parquet", VOCAB_COLUMNS["users.parquet"]).sort("user")
        items, users = (t.get_column("id").cast(pl.Utf8).to_list() for t in (items, users))
        path = Path(data) if data is not None else Path(cfg.get("dataset", {}).get("path", ""))
        history, gap = None, None
        if data is not None or path.is_dir():
            ds = Dataset.load(path)
            if vocab_digest(ds) != cfg["dataset"]["vocab_sha256"]:
                raise HnvmError(f"{path}: item/user vocabulary does not match the one {run} was trained on")
            history = Sequences.from_events(ds.events, ds.n_users, ds.held_out_items)
            if gap_s is None:  # (an explicit --gap wins: the dataset's is not read)
                gap = dataset_gap(path, ds.meta)
        else:
            log.warning("%s: dataset %s not found; users start without history", run, path)
        g = gap_s if gap_s is not None else gap if gap is not None else DEFAULT_GAP_S
        return cls(model, items, users, history, gap_s=g, max_session_length=max_session_length,
                   scoring=scoring)

    # ---- state ---------------------------------------------------------------------------------
    def state(self, user: str) -> UserState:
        st = self.users.get(user)
        if st is None:
            uid = row = self.user_index.get(user, 0)
            hist: list[np.ndarray] = []
            seen: set[int] = set()
            h = self.history
            if uid and h is not None and uid < len(h.user_end):
                first, end = int(h.user_first[uid]), int(h.user_end[uid])
                if end > first:
                    bounds = h.offsets[first: end + 1].tolist()
                    hist = [h.items[a:b] for a, b in pairwise(bounds)]
                    seen = set(h.items[bounds[0]:bounds[-1]].tolist())
                uid = int(self.model_uid[uid])  # 0: no training events
            st = UserState(uid, hist, len(hist), seen=seen, row=row if hist else 0)
            self.users[user] = st
        return st

    def cold_block(self, user: str) -> int | None:
        """The block of `contexts` that a recommendation for `user` would encode first (not warm
        yet, and the user has no cached state), or None."""
        ctx = self.contexts
        if ctx is None or ctx.ready:
            return None
        st = self.users.get(user)
        row = self.user_index.get(user, 0)
        return ctx.cold(row) if row and (st is None or st.cache is None) else None

    def track(self, user: str) -> Track:
        st = self.users.get(user)
        return st.track.copy() if st is not None else Track()

    def check(self, events: Sequence[Event], overlay: dict[str, Track]) -> list[tuple[str, str]]:
        """Problems (kind "order", "key" or "size", message) with appending `events` (in order)
        after the current state and `overlay` (tracks of events accepted but not yet applied); on
        success `overlay` is updated. Nothing else changes: a rejected batch leaves no trace.
        "key": the event's session key names a session of the user that an earlier event closed
        (one open session per user; see `hnvm.online.sessions`)."""
        tracks: dict[str, Track] = {}
        problems: list[tuple[str, str]] = []
        for i, ev in enumerate(events):
            t = tracks.get(ev.user) or (overlay[ev.user].copy() if ev.user in overlay else self.track(ev.user))
            tracks[ev.user] = t
            if t.last_ts is not None and ev.ts < t.last_ts:
                problems.append(("order", f"events[{i}]: timestamp {ev.ts} is earlier than the previous event of "
                                 f"user {ev.user!r} ({t.last_ts}); a user's events must come in time order"))
                continue
            if ev.session is not None and t.has_open and ev.session != t.key and (
                    ev.session in t.closed or ev.session in self._closed_keys(ev.user)):
                problems.append(("key", f"events[{i}]: session {ev.session!r} of user {ev.user!r} was closed by a "
                                 "later session; a user has one open session, so keyed sessions must not "
                                 "interleave (give the event a new session key)"))
                continue
            prev = t.key if t.has_open else None
            if t.advance(ev.ts, ev.session, self.gap_s) and prev is not None:
                t.closed = (*t.closed, prev)
            if t.open_n > self.max_session_length:
                problems.append(("size", f"events[{i}]: the session of user {ev.user!r} would exceed "
                                 f"{self.max_session_length} events"))
        if not problems:
            overlay.update(tracks)
        return problems

    def _closed_keys(self, user: str) -> set[str]:
        st = self.users.get(user)
        return st.closed_keys if st is not None else set()

    def apply(self, ev: Event) -> bool:
        """Append one (validated, logged) event to its user's state; False if the item is unknown.
        (A log written before keys were checked may resume a closed key: that is a new session.)"""
        st = self.state(ev.user)
        prev = st.track.key if st.track.has_open else None
        if st.track.advance(ev.ts, ev.session, self.gap_s):
            if prev is not None:
                st.closed_keys.add(prev)
            if st.open_items:
                st.history.append(np.asarray(st.open_items, dtype=np.int64))
            st.open_items = []
            st.open_id += 1
        st.n_events += 1
        self.n_events += 1
        iid = self.item_index.get(ev.item, 0)
        if iid:
            st.open_items.append(iid)
            st.seen.add(iid)
        return iid > 0

    @torch.no_grad()
    def advance(self, users: Iterable[str], *, new: bool = False) -> None:
        """Bring the model state of users already scored up to date with their events (a
        closed session: encoder + context step; each event: one decoder step), so that their
        next recommendation costs only the scoring pass. Users never scored stay lazy (a
        restart's replay runs no model code) unless `new`: then they are built too, by the same
        steps a first recommendation would run (`hnvm serve` does it after a replay)."""
        for u in users:
            st = self.users.get(u)
            if st is not None and (st.cache is not None or new):
                self.scorer.advance(st)

    # ---- recommendations -----------------------------------------------------------------------
    def recommend(self, q: Query) -> Recommendation:
        return self.recommend_many([q])[0]

    def recommend_many(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Top-k for several queries with one scoring pass where the model allows it."""
        job = self.prepare(queries)
        return self.finish(job, self.rank(job))

    def session_problem(self, q: Query) -> str | None:
        """Why `q` cannot be served, or None: its session items plus the events of the user's
        open session (unless it timed out at `q.now`) must be at most `max_session_length`,
        the limit that `check` enforces on stored sessions."""
        st = self.users.get(q.user)
        t = st.track if st is not None else None
        stored = t.open_n if t is not None and t.has_open and not t.expired(q.now, self.gap_s) else 0
        n, cap = len(q.session), self.max_session_length
        if stored + n <= cap:
            return None
        if not stored:
            return f"session: {n} items (at most {cap})"
        return (f"session: {n} items plus the {stored} events of user {q.user!r}'s open session are "
                f"{stored + n}, over the limit of {cap} per session (stored and request items together)")

    @torch.no_grad()
    def prepare(self, queries: Sequence[Query]) -> Job:
        """The state-dependent part of `recommend_many`: per query the user's view and the
        scorer's per-user steps (they update the users' caches: run it where the events are
        applied). The job holds everything `rank` needs. Raises QueryError for a query that
        `session_problem` refuses (before any model step)."""
        views = []
        for q in queries:
            problem = self.session_problem(q)
            if problem is not None:
                raise QueryError(problem)
            st = self.users.get(q.user) or self._transient(q.user)
            extra = [self.item_index.get(s, 0) for s in q.session]
            unknown = list(dict.fromkeys(s for s, i in zip(q.session, extra, strict=True) if not i))
            extra = [i for i in extra if i]
            views.append((q, st, extra, unknown, st.track.expired(q.now, self.gap_s)))
        kmax = min(max(q.k for q in queries), self.n_items)
        excl = [sorted(st.seen | set(extra)) if q.exclude_seen else [] for q, st, extra, _, _ in views]
        prepared = self.scorer.prepare([(st, extra, expired) for _, st, extra, _, expired in views])
        out = []
        for q, st, extra, unknown, expired in views:
            # a timed-out open session is history now; the request's items still start a new one
            cur = len(extra) if expired else len(st.open_items) + len(extra)
            out.append(Recommendation(q.user, [], [], unknown, st.uid == 0, cur,
                                      cur == 0 and (expired or not st.track.has_open)))
        return Job([q.k for q in queries], kmax, excl, prepared, out)

    @torch.no_grad()
    def rank(self, job: Job) -> Ranked:
        """Top-k ids and scores of a prepared job. Reads only the job and the model's weights,
        so it may run on another thread while events are applied (torch releases the GIL)."""
        if self.rank_worker is not None:
            return self.rank_worker.rank(job.prepared, job.k, job.exclude)
        return self.scorer.rank(job.prepared, job.k, job.exclude)

    def finish(self, job: Job, ranked: Ranked) -> list[Recommendation]:
        for r, (rec, k) in enumerate(zip(job.out, job.ks, strict=True)):
            rec.items = [self.item_ids[i] for i in ranked[0][r][:k]]
            rec.scores = ranked[1][r][:k]
        return job.out

    def _transient(self, user: str) -> UserState:
        """A state for a user with no online events: not stored, so reads never grow memory.
        Known users are stored all the same, to keep the encoded history."""
        return self.state(user) if user in self.user_index else UserState(0, [], 0)

    def describe(self, user: str) -> dict[str, Any]:
        """The user's state, for debugging (GET /v1/users/{id})."""
        st = self.users.get(user) or self._transient(user)
        t = st.track
        return {
            "user": user, "known_to_model": st.uid > 0, "history_sessions": len(st.history),
            "dataset_sessions": st.n_dataset, "online_events": st.n_events,
            "session_open": t.has_open, "session_key": t.key, "session_events": t.open_n if t.has_open else 0,
            "session_items": [self.item_ids[i] for i in st.open_items], "last_event_ts": t.last_ts,
            "seen_items": len(st.seen), "model": self.model.name, "incremental": self.scorer.incremental,
            "scoring": self.scorer.scoring,
        }
