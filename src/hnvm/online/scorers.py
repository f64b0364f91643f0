"""Scorers: a user's state (`UserState`) -> what ranking needs, for the engine.

`make_scorer` picks one by what the model can do:

* `StepScorer`, for a model with step-by-step inference (`StepModel`: HNVM's public online
  methods, `hnvm.models.hnvm.HNVM`). Per user it keeps the context state h_con after the closed
  sessions and the decoder state of the open session (`_StepCache`), so a closed session costs
  one encoder pass + one context step, an event one decoder step, and a recommendation one
  scoring pass (`ranking.LinearRanker`: exact fp32, or a certified bf16 shortlist). Its passes
  hand [B, H] states to the ranker, which may run in another process (`worker`). With HNVM's
  repeat channel it also keeps the user's `RepeatMemory`, and its passes are full fp32 score
  rows (the linear scores plus the sparse repeat terms), ranked in this process.
* `GenericScorer`, for every other Recommender: it builds the user's history as a `Batch` and
  calls the model's own `score` / `score_sessions` (cost grows with the history, as in
  evaluation).

Determinism: every stored per-user tensor is computed by the same operations, in the same
order, whenever they run (lazily, at the first recommendation that needs them, or in
`advance`); a user's dataset states are always their fixed block's encoding (`online.contexts`),
warmed in the background or encoded at first use. So a state rebuilt by replaying the same
events is bit-identical, and so are the scores of a request scored in a pass of the same rows
(the rows of a pass share GEMMs, the scoring product's and the request items' decoder steps,
whose last bits can depend on how many rows there are).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from hnvm.contract import Batch, Recommender
from hnvm.data.batches import Sequences
from hnvm.errors import HnvmError
from hnvm.online.contexts import HistoryContexts
from hnvm.online.ranking import LinearRanker, top_k
from hnvm.online.sessions import UserState

log = logging.getLogger(__name__)

SCORING = ("auto", "exact", "bf16")
AUTO_BF16_ITEMS = 20_000  # from here on the bf16 shortlist pays for itself (benchmarks/serve.py)

View = tuple[UserState, list[int], bool]  # (state, extra items of the request, open session timed out)
Ranked = tuple[list[list[int]], list[list[float]]]  # per row: top-k ids, their scores


class StepModel(Protocol):
    """A Recommender with step-by-step inference (see `hnvm.models.hnvm.HNVM` for the contract)."""

    name: str
    config: Any  # read: mc_samples

    @property
    def bos(self) -> int: ...
    def initial_context(self, n: int = 1) -> Tensor: ...
    def general_preference(self, users: Tensor) -> Tensor | None: ...
    def encode_history(self, users: Tensor, sessions: Tensor) -> Tensor: ...
    def fold_session(self, h_con: Tensor, items: Any) -> Tensor: ...
    def session_condition(self, h_con: Tensor, e: Tensor | None) -> Tensor: ...
    def decoder_step(self, item: int | Tensor, h_dec: Tensor | None, cond: Tensor) -> Tensor: ...
    def output_layer(self) -> tuple[Tensor, Tensor]: ...
    def repeat_memory(self, sessions: Sequence[np.ndarray] = ()) -> Any: ...
    def repeat_fold(self, memory: Any, items: Any) -> None: ...
    def add_repeat(self, scores: Tensor, memory: Any, prefix: Sequence[int], cond: Tensor,
                   h_dec: Tensor) -> Tensor: ...


def make_scorer(model: Recommender, scoring: str = "auto") -> Scorer:
    """`StepScorer` for a model with step-by-step inference (it has `decoder_step`), else
    `GenericScorer`. `scoring` (step models): "exact", "bf16" or "auto" (see `StepScorer`)."""
    if scoring not in SCORING:
        raise HnvmError(f"scoring must be one of {', '.join(SCORING)}, got {scoring!r}")
    if callable(getattr(model, "decoder_step", None)):
        return StepScorer(model, scoring)  # type: ignore[arg-type]
    return GenericScorer(model)


class Scorer:
    incremental = False
    scoring = "exact"
    ranker: LinearRanker | None = None  # set where passes are [B, H] states ranked by a LinearRanker

    def scores(self, views: Sequence[View]) -> Tensor:
        """Float[len(views), n_items + 1]; column 0 is ignored."""
        raise NotImplementedError

    def prepare(self, views: Sequence[View]) -> Tensor:
        """What `rank` needs from the users' states (here: their scores)."""
        return self.scores(views)

    def rank(self, prepared: Tensor, k: int, exclude: Sequence[Sequence[int]]) -> Ranked:
        """`top_k` of the prepared rows; touches no user state."""
        return top_k(prepared, k, exclude)

    def advance(self, st: UserState) -> None:
        """Update the user's cached model state to the applied events (if the scorer keeps one)."""

    def use_history(self, history: Sequences, uids: np.ndarray) -> HistoryContexts | None:
        """Start users from block-encoded dataset contexts (`online.contexts`), where the scorer
        keeps per-user model state; returns them, or None. `uids`: the model's id of each
        dataset user (`online.contexts`)."""
        return None


class GenericScorer(Scorer):
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
            return self.model.score_sessions(Batch(users, one_user_sessions(hist), _EMPTY, _EMPTY))
        # the target slot holds a placeholder item: models never read a target (no-leakage test)
        sessions = one_user_sessions([*hist, np.asarray([*cur, 1], dtype=np.int64)])
        return self.model.score(Batch(users, sessions, torch.tensor([0]), torch.tensor([len(cur)])))


_EMPTY = torch.zeros(0, dtype=torch.long)


def one_user_sessions(sessions: list[np.ndarray]) -> Tensor:
    """Long[1, N, T]: one row of right-padded sessions (one empty session if there are none)."""
    n, t = max(len(sessions), 1), max((len(s) for s in sessions), default=1)
    out = np.zeros((1, n, t), dtype=np.int64)
    for j, s in enumerate(sessions):
        out[0, j, : len(s)] = s
    return torch.from_numpy(out)


@dataclass
class _StepCache:
    e: Tensor | None  # [1, d_e]
    h_con: Tensor  # [1, H] after the first n_folded history sessions
    n_folded: int
    open_id: int = -1  # the open session the decoder state belongs to
    cond: Tensor | None = None  # [1, C] decoder input [h_con; z] of that session
    h_dec: Tensor | None = None  # [1, H] after BOS + open_items[:n_dec]
    n_dec: int = 0
    memory: Any = None  # the repeat channel's RepeatMemory after the n_folded sessions (or None)


class StepScorer(Scorer):
    """A step model (HNVM) advanced session by session and event by event through its public
    online methods; z is the prior mean, as in leakage-free scoring with mc_samples = 1 (samples
    would make replays differ). `scoring`: "exact" scores every item in fp32; "bf16" shortlists
    candidates with a bf16 pass and ranks them in fp32 (the same top-k, certified:
    `ranking.Bf16Shortlist`); "auto" = bf16 from AUTO_BF16_ITEMS items on."""

    incremental = True

    def __init__(self, model: StepModel, scoring: str = "exact") -> None:
        self.model = model
        self.bos = model.bos
        weight, bias = model.output_layer()  # [n_items + 1, H], [n_items + 1]
        n_items = weight.shape[0] - 1
        # the repeat channel adds sparse per-user terms to h @ W^T + b: its rows are scored here
        # in fp32 and ranked by top_k (no bf16 shortlist, no ranking process)
        self.repeat = model.repeat_memory() is not None
        self.linear = LinearRanker(weight, bias, bf16=not self.repeat and (
            scoring == "bf16" or (scoring == "auto" and n_items >= AUTO_BF16_ITEMS)))
        self.ranker = None if self.repeat else self.linear
        self.scoring = self.linear.scoring
        if self.repeat and scoring == "bf16":
            log.warning("scoring bf16 ignored: the repeat channel's scores are ranked exactly in fp32")
        self.contexts: HistoryContexts | None = None
        if model.config.mc_samples > 1:
            log.warning("serving %s with the prior mean of z (mc_samples=%d is for evaluation)",
                        model.name.upper(), model.config.mc_samples)

    def scores(self, views: Sequence[View]) -> Tensor:
        prepared = self.prepare(views)
        return prepared if self.repeat else self.linear.scores(prepared)

    def prepare(self, views: Sequence[View]) -> Tensor:
        """[B, H] decoder states; with the repeat channel, their scores [B, n_items + 1]."""
        states = [self._hidden(*v) for v in views]
        h = torch.cat([s[0] for s in states])  # [B, H], before the requests' own items
        cond = torch.cat([s[1] for s in states])  # [B, C]
        h = self._extra_steps(h, cond, [v[1] for v in views])
        if not self.repeat:
            return h
        scores = self.linear.scores(h)  # one matmul for the batch
        for i, (_, _, memory, prefix) in enumerate(states):  # each row's sparse terms, in place
            self.model.add_repeat(scores[i: i + 1], memory, prefix, cond[i: i + 1], h[i: i + 1])
        return scores

    def _extra_steps(self, h: Tensor, cond: Tensor, extras: Sequence[list[int]]) -> Tensor:
        """The decoder over each row's request items (`View`'s extra; not stored), step t for
        every row that has a t-th item at once: h [B, H], cond [B, C] -> [B, H]. (A pass's rows
        share the step's GEMMs, as they share the scoring one: their last bits may depend on
        the pass; the stored states never do.)"""
        longest = max((len(e) for e in extras), default=0)
        for t in range(longest):
            rows = [r for r, e in enumerate(extras) if len(e) > t]
            items = torch.tensor([extras[r][t] for r in rows])
            if len(rows) == len(extras):
                h = self.model.decoder_step(items, h, cond)
            else:
                idx = torch.tensor(rows)
                h = h.index_copy(0, idx, self.model.decoder_step(items, h[idx], cond[idx]))
        return h

    def rank(self, prepared: Tensor, k: int, exclude: Sequence[Sequence[int]]) -> Ranked:
        return top_k(prepared, k, exclude) if self.repeat else self.linear.rank(prepared, k, exclude)

    def use_history(self, history: Sequences, uids: np.ndarray) -> HistoryContexts:
        h0 = self.model.initial_context(1)  # [1, H]
        self.contexts = HistoryContexts(self.model, history, uids, h0.shape[1], device=h0.device)
        return self.contexts

    # the per-user steps -------------------------------------------------------------------------
    def _cache(self, st: UserState) -> _StepCache:
        """The user's cache, with every closed session folded into h_con."""
        m, c = self.model, st.cache
        if c is None:
            if st.n_dataset and self.contexts is not None and st.row:  # its block, warm or encoded now
                h, e = self.contexts.context(st.row), self.contexts.preference(st.row)
            else:
                users = torch.tensor([st.uid])
                e = m.general_preference(users)
                # the dataset history in one pass, as evaluation encodes it
                h = (m.encode_history(users, one_user_sessions(st.history[: st.n_dataset])) if st.n_dataset
                     else m.initial_context(1))
            c = st.cache = _StepCache(e, h, st.n_dataset, memory=m.repeat_memory(st.history[: st.n_dataset])
                                      if self.repeat else None)
        while c.n_folded < len(st.history):
            c.h_con = m.fold_session(c.h_con, st.history[c.n_folded])
            if c.memory is not None:
                m.repeat_fold(c.memory, st.history[c.n_folded])
            c.n_folded += 1
            c.open_id = -1
        return c

    def advance(self, st: UserState) -> None:
        self._hidden(st, [], False)

    def _start(self, st: UserState, c: _StepCache) -> tuple[Tensor, Tensor]:
        """(cond [1, C], decoder state after BOS [1, H]) of a session after the closed sessions
        folded into c: after the dataset history alone, the user's block's (`online.contexts`)."""
        if self.contexts is not None and st.row and c.n_folded == st.n_dataset:
            return self.contexts.start(st.row)
        cond = self.model.session_condition(c.h_con, c.e)
        return cond, self.model.decoder_step(self.bos, None, cond)

    def _hidden(self, st: UserState, extra: list[int], expired: bool) -> tuple[Tensor, Tensor, Any, list[int]]:
        """(h, cond, memory, prefix): the decoder state h [1, H] after the user's current session
        (before `extra`, the request's items: `_extra_steps`), the session input cond [1, C], the
        repeat memory of the closed sessions (None without a repeat channel) and the session's
        items with `extra`; `expired`: the open session timed out, so it is history and a new
        one starts."""
        m, c = self.model, self._cache(st)
        memory = c.memory
        if expired:  # the open session timed out: close it in a scratch copy of the state
            if st.open_items:
                h_con = m.fold_session(c.h_con, np.asarray(st.open_items))
                cond = m.session_condition(h_con, c.e)
                h = m.decoder_step(self.bos, None, cond)
            else:
                cond, h = self._start(st, c)
            if memory is not None and st.open_items:
                memory = memory.copy()
                m.repeat_fold(memory, st.open_items)
            prefix = list(extra)
        else:
            if c.open_id != st.open_id or c.cond is None or c.h_dec is None:
                c.open_id, c.n_dec = st.open_id, 0
                c.cond, c.h_dec = self._start(st, c)
            while c.n_dec < len(st.open_items):
                c.h_dec = m.decoder_step(st.open_items[c.n_dec], c.h_dec, c.cond)
                c.n_dec += 1
            h, cond = c.h_dec, c.cond
            prefix = [*st.open_items, *extra] if memory is not None else []
        return h, cond, memory, prefix
