"""Online user state: sessions tracked from an event stream, and recommendations from it.

An `Engine` holds a trained model, its vocabularies (original id <-> internal id), each known
user's history from the run's dataset, and one `UserState` per user seen since. Events are
applied in log order (`apply`); recommendations (`recommend_many`) read the state.

Sessions: an event opens a new session when the user has none open, when its session key
differs from the open one's (explicit keys, e.g. an order id, win over time), or, without
keys, when it comes more than `gap_s` seconds after the user's previous event (the idle gap
of `hnvm prepare`; exactly `gap_s` stays in the session). The dataset history of a known user
counts as closed sessions before any online event. A user has one open session: a keyed
session is the run of that user's consecutive events with its key, and once another event has
closed it its key cannot come back (`check` refuses it, kind "key"). `hnvm prepare` groups all
events of a key into one session even when keys interleave in time; an online stream cannot
reopen a session that later ones followed, so it must not interleave them, and serve refuses
rather than silently split one key into two sessions.

HNVM is served incrementally (`_HNVMScorer`): per user the context state h_con after the closed
sessions and the decoder state of the open session are kept, so a closed session costs one
encoder pass + one context step, an event one decoder step, and a recommendation one scoring
pass (`serve.ranking.LinearRanker`: exact fp32, or a certified bf16 shortlist). Every other
model goes through `_GenericScorer`, which builds the user's history as a `Batch` and calls
the model's own `score` / `score_sessions`. A recommendation is `prepare` (state-dependent,
on the thread that applies events) then `rank` (pure; may run elsewhere) then `finish`.

Determinism (the crash test relies on it): the state is a pure function of the applied events
and every per-user tensor is computed by the same per-user operations, in the same order,
whenever they run (lazily, at the first recommendation that needs them). Replaying the log
after a restart therefore gives bit-identical states and recommendations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hnvm.data.batches import Sequences
from hnvm.errors import HnvmError
from hnvm.models.base import Batch, Recommender
from hnvm.serve.ranking import LinearRanker, top_k

log = logging.getLogger(__name__)

DEFAULT_GAP_S = 1800.0
SCORING = ("auto", "exact", "bf16")
AUTO_BF16_ITEMS = 20_000  # from here on the bf16 shortlist pays for itself (benchmarks/serve.py)


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


def _dataset_gap(path: Path, meta: dict[str, Any]) -> float:
    """The idle gap `hnvm prepare` recorded in the dataset's meta.json (`prepare.gap`; 30m when
    absent); a damaged value is a one-line error naming the file and the field, not `--gap`."""
    from hnvm.data.sessions import parse_duration

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
        from hnvm.models.hnvm import HNVM

        if scoring not in SCORING:
            raise HnvmError(f"scoring must be one of {', '.join(SCORING)}, got {scoring!r}")
        self.scorer: _Scorer = (_HNVMScorer(model, scoring) if isinstance(model, HNVM)
                                else _GenericScorer(model))
        self.rank_worker: Any = None  # serve.worker.RankWorker, when ranking runs in a process

    def start_rank_process(self) -> bool:
        """Rank in a child process from now on (HNVM only: its passes ship [B, H] states);
        False where the scorer has nothing to hand over."""
        if not isinstance(self.scorer, _HNVMScorer) or self.rank_worker is not None:
            return self.rank_worker is not None
        from hnvm.serve.worker import RankWorker

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
        a bf16 pass and ranks them in fp32 (the same top-k, certified: `serve.ranking`);
        "auto" = bf16 from AUTO_BF16_ITEMS items on."""
        import polars as pl

        from hnvm.data.store import VOCAB_COLUMNS, Dataset, read_table
        from hnvm.runs import load_run, vocab_digest

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
            history = Sequences.from_events(ds.events, ds.n_users)
            if gap_s is None:  # (an explicit --gap wins: the dataset's is not read)
                gap = _dataset_gap(path, ds.meta)
        else:
            log.warning("%s: dataset %s not found; users start without history", run, path)
        g = gap_s if gap_s is not None else gap if gap is not None else DEFAULT_GAP_S
        return cls(model, items, users, history, gap_s=g, max_session_length=max_session_length,
                   scoring=scoring)

    # ---- state ---------------------------------------------------------------------------------
    def peek(self, user: str) -> UserState | None:
        return self.users.get(user)

    def state(self, user: str) -> UserState:
        st = self.users.get(user)
        if st is None:
            uid = self.user_index.get(user, 0)
            hist: list[np.ndarray] = []
            if uid and self.history is not None and uid < len(self.history.user_end):
                h = self.history
                span = range(int(h.user_first[uid]), int(h.user_end[uid]))
                hist = [h.session(s) for s in span]
                if not (h.session_split[span.start:span.stop] == 0).any():
                    uid = 0  # no training events (time split): the model never learnt this user's row
            st = UserState(uid, hist, len(hist), seen={int(i) for s in hist for i in s})
            self.users[user] = st
        return st

    def track(self, user: str) -> Track:
        st = self.users.get(user)
        return st.track.copy() if st is not None else Track()

    def check(self, events: Sequence[Event], overlay: dict[str, Track]) -> list[tuple[str, str]]:
        """Problems (kind "order", "key" or "size", message) with appending `events` (in order)
        after the current state and `overlay` (tracks of events accepted but not yet applied); on
        success `overlay` is updated. Nothing else changes: a rejected batch leaves no trace.
        "key": the event's session key names a session of the user that an earlier event closed
        (serve keeps one open session per user; see the module docstring)."""
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
    def advance(self, users: Iterable[str]) -> None:
        """Bring the model state of users already scored up to date with their events (a
        closed session: encoder + context step; each event: one decoder step), so that their
        next recommendation costs only the scoring pass. Users never scored stay lazy: after a
        restart the replay runs no model code."""
        for u in users:
            st = self.users.get(u)
            if st is not None and st.cache is not None:
                self.scorer.advance(st)

    # ---- recommendations -----------------------------------------------------------------------
    def recommend(self, q: Query) -> Recommendation:
        return self.recommend_many([q])[0]

    def recommend_many(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Top-k for several queries with one scoring pass where the model allows it."""
        job = self.prepare(queries)
        return self.finish(job, self.rank(job))

    def _expired(self, st: UserState, now: float | None) -> bool:
        """The user's open session has no key and its last event is more than the gap before
        `now`: a recommendation at `now` treats it as closed."""
        t = st.track
        return (t.has_open and t.key is None and now is not None and t.last_ts is not None
                and now - t.last_ts > self.gap_s)

    def session_problem(self, q: Query) -> str | None:
        """Why `q` cannot be served, or None: its session items plus the events of the user's
        open session (unless it timed out at `q.now`) must be at most `max_session_length`,
        the limit that `check` enforces on stored sessions."""
        st = self.users.get(q.user)
        stored = st.track.open_n if st is not None and st.track.has_open and not self._expired(st, q.now) else 0
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
            views.append((q, st, extra, unknown, self._expired(st, q.now)))
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
    def rank(self, job: Job) -> tuple[list[list[int]], list[list[float]]]:
        """Top-k ids and scores of a prepared job. Reads only the job and the model's weights,
        so it may run on another thread while events are applied (torch releases the GIL)."""
        if self.rank_worker is not None:
            return self.rank_worker.rank(job.prepared, job.k, job.exclude)
        return self.scorer.rank(job.prepared, job.k, job.exclude)

    def finish(self, job: Job, ranked: tuple[list[list[int]], list[list[float]]]) -> list[Recommendation]:
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


# ---- scorers ---------------------------------------------------------------------------------

View = tuple[UserState, list[int], bool]  # (state, extra items of the request, open session timed out)


class _Scorer:
    incremental = False
    scoring = "exact"

    def scores(self, views: Sequence[View]) -> Tensor:
        """Float[len(views), n_items + 1]; column 0 is ignored."""
        raise NotImplementedError

    def prepare(self, views: Sequence[View]) -> Tensor:
        """What `rank` needs from the users' states (here: their scores)."""
        return self.scores(views)

    def rank(self, prepared: Tensor, k: int, exclude: Sequence[Sequence[int]]
             ) -> tuple[list[list[int]], list[list[float]]]:
        """`top_k` of the prepared rows; touches no user state."""
        return top_k(prepared, k, exclude)

    def advance(self, st: UserState) -> None:
        """Update the user's cached model state to the applied events (if the scorer keeps one)."""


class _GenericScorer(_Scorer):
    """Any Recommender: rebuild the user's history as a Batch and call the model's own scoring
    (cost grows with the history, as in evaluation)."""

    def __init__(self, model: Recommender) -> None:
        self.model = model

    def scores(self, views: Sequence[View]) -> Tensor:
        return torch.cat([self._one(*v) for v in views])

    def _one(self, st: UserState, extra: list[int], expired: bool) -> Tensor:
        hist = list(st.history)
        cur = list(st.open_items) + extra
        if expired and st.open_items:
            hist.append(np.asarray(st.open_items, dtype=np.int64))
            cur = extra
        users = torch.tensor([st.uid])
        if not cur:
            return self.model.score_sessions(Batch(users, _pad(hist), _EMPTY, _EMPTY))
        # the target slot holds a placeholder item: models never read a target (no-leakage test)
        sessions = _pad([*hist, np.asarray([*cur, 1], dtype=np.int64)])
        return self.model.score(Batch(users, sessions, torch.tensor([0]), torch.tensor([len(cur)])))


_EMPTY = torch.zeros(0, dtype=torch.long)


def _pad(sessions: list[np.ndarray]) -> Tensor:
    """Long[1, N, T]: one row of right-padded sessions (one empty session if there are none)."""
    n, t = max(len(sessions), 1), max((len(s) for s in sessions), default=1)
    out = np.zeros((1, n, t), dtype=np.int64)
    for j, s in enumerate(sessions):
        out[0, j, : len(s)] = s
    return torch.from_numpy(out)


@dataclass
class _HNVMCache:
    e: Tensor | None  # [1, d_e]
    h_con: Tensor  # [1, H] after the first n_folded history sessions
    n_folded: int
    open_id: int = -1  # the open session the decoder state belongs to
    cond: Tensor | None = None  # [1, C] decoder input [h_con; z] of that session
    h_dec: Tensor | None = None  # [1, H] after BOS + open_items[:n_dec]
    n_dec: int = 0


class _HNVMScorer(_Scorer):
    """HNVM step by step with the network's own modules (eval mode: dropout off); z is the prior
    mean, as in leakage-free scoring with mc_samples = 1 (samples would make replays differ)."""

    incremental = True

    def __init__(self, model: Any, scoring: str = "exact") -> None:
        self.model = model
        self.net = model._require()
        self.use_history = model.config.use_history
        self._h0 = torch.zeros(1, self.net.hidden)
        # the output layer as [H, n_items + 1]: h @ W^T with W^T contiguous is about twice as fast
        # as nn.Linear's layout for one row (MKL, measured on this project's CPUs); a served model's
        # weights do not change
        n_items = self.net.out.weight.shape[0] - 1
        self.ranker = LinearRanker(self.net.out.weight.detach(), self.net.out.bias.detach(),
                                   bf16=scoring == "bf16" or (scoring == "auto" and n_items >= AUTO_BF16_ITEMS))
        self.scoring = self.ranker.scoring
        if model.config.mc_samples > 1:
            log.warning("serving HNVM with the prior mean of z (mc_samples=%d is for evaluation)",
                        model.config.mc_samples)

    def scores(self, views: Sequence[View]) -> Tensor:
        return self.ranker.scores(self.prepare(views))

    def prepare(self, views: Sequence[View]) -> Tensor:
        return torch.cat([self._hidden(*v) for v in views])  # [B, H]

    def rank(self, hidden: Tensor, k: int, exclude: Sequence[Sequence[int]]
             ) -> tuple[list[list[int]], list[list[float]]]:
        return self.ranker.rank(hidden, k, exclude)

    # the per-user steps -------------------------------------------------------------------------
    def _e(self, uid: int) -> Tensor | None:
        net = self.net
        if not net.use_e:
            return None
        u = torch.tensor([uid])
        # posterior mean of q(e|u), as the model's own scoring; row 0 (unknown) is trained too
        return net.e_post_mu(u)

    def _fold(self, h_con: Tensor, items: np.ndarray) -> Tensor:
        """Encoder over one closed session + one context step."""
        if not self.use_history:
            return h_con
        x = self.model._trim(torch.from_numpy(np.asarray(items, dtype=np.int64))[None])
        h_enc = self.net._encode(x, torch.tensor([x.shape[1]]))
        return self.net.context(h_enc, h_con)

    def _cond(self, e: Tensor | None, h_con: Tensor) -> Tensor:
        net = self.net
        z = net._prior_z(h_con, e)[0] if net.use_z else None
        return net._cond(h_con, e, z)

    def _step(self, item: int, h: Tensor | None, cond: Tensor) -> Tensor:
        """One decoder step: input [emb(item); cond], state [1, H] (None = 0) -> [1, H].
        torch.gru_cell with the decoder's own weights: the same GRU as nn.GRU over a sequence,
        without its per-call set-up (a third of the cost of a one-step nn.GRU call)."""
        d = self.net.decoder
        x = torch.cat([self.net.item_emb.weight[item: item + 1], cond], -1)
        return torch.gru_cell(x, h if h is not None else self._h0, d.weight_ih_l0, d.weight_hh_l0,
                              d.bias_ih_l0, d.bias_hh_l0)

    def _cache(self, st: UserState) -> _HNVMCache:
        c = st.cache
        if c is None:
            h = torch.zeros(1, self.net.hidden)
            if st.n_dataset:  # the dataset history in one pass, as evaluation encodes it
                h = self.model._history(torch.tensor([st.uid]), _pad(st.history[: st.n_dataset]))
            c = st.cache = _HNVMCache(self._e(st.uid), h, st.n_dataset)
        while c.n_folded < len(st.history):
            c.h_con = self._fold(c.h_con, st.history[c.n_folded])
            c.n_folded += 1
            c.open_id = -1
        return c

    def advance(self, st: UserState) -> None:
        self._hidden(st, [], False)

    def _hidden(self, st: UserState, extra: list[int], expired: bool) -> Tensor:
        c = self._cache(st)
        bos = self.net.bos
        if expired:  # the open session timed out: close it in a scratch copy of the state
            h_con = self._fold(c.h_con, np.asarray(st.open_items)) if st.open_items else c.h_con
            cond = self._cond(c.e, h_con)
            h = self._step(bos, None, cond)
        else:
            if c.open_id != st.open_id or c.cond is None or c.h_dec is None:
                c.open_id, c.cond, c.n_dec = st.open_id, self._cond(c.e, c.h_con), 0
                c.h_dec = self._step(bos, None, c.cond)
            while c.n_dec < len(st.open_items):
                c.h_dec = self._step(st.open_items[c.n_dec], c.h_dec, c.cond)
                c.n_dec += 1
            h, cond = c.h_dec, c.cond
        for item in extra:
            h = self._step(item, h, cond)
        return h
