"""V-SKNN: vector session kNN (Ludewig & Jannach 2018, `knn/vsknn.py` of session-rec).

For a query session q (the prefix of the current session, oldest item first):

1. weights: the item at position p (1-based) of a query of length L gets a decay weight
   w(p, L); `linear` is session-rec's default `div` weighting, p / L, so the last item weighs
   1 and the first 1 / L; `quadratic` is (p / L)^2 and `same` is 1 (plain cosine). A repeated
   item keeps the weight of its latest position.
2. candidates: the training sessions that share at least one item with q; of these only the
   `sample_size` most recent (by their last timestamp) are considered (session-rec's
   `sampling='recent'`). These, and their dot products, are found from each query item's
   `sample_size` + 1 most recent sessions only (exact; see `_postings`), so a query costs at
   most its items x (`sample_size` + 1) postings however popular its items are.
3. similarity: cosine of q's weight vector and the candidate's binary item vector,
   sim = Σ_{i ∈ q ∩ n} w_i / (||w|| · sqrt(|n|)); the `k` most similar candidates are the
   neighbours (ties by recency).
4. score(i) = Σ over neighbours n that contain i of sim(q, n).

The queries of a batch run in one compiled loop per thread (numba, models/knn_kernels.py), with
every sum in the order of the one-query definition (bit-identical scores, tested): a query
costs its items' cut postings, a histogram of its candidates' ids and a heap of its k best,
with no [R, S] temporaries. An empty query falls back to popularity, and ties everywhere are
ordered by popularity (pop(i) / (max pop + 1) * 1e-9 added to float64 scores).
Next-session uses the user's last history session as the query. Neighbours come from the
training sessions only, so the candidates of a test session may be later in time than it (the
user-last split's own property, the same for every model). No nn.Module and no loss: `fit` builds indexes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from hnvm.config import choices, rng
from hnvm.contract import Batch
from hnvm.data.sampling import train_counts
from hnvm.models.base import load_model_files, register, save_model_files

if TYPE_CHECKING:
    from hnvm.data.store import Dataset

TIE_EPS = 1e-9


@dataclass(frozen=True)
class SKNNConfig:
    """Hyper-parameters of V-SKNN (section [model] of a config file)."""

    k: int = field(default=50, metadata=rng(1, 100_000, "neighbour sessions"))
    sample_size: int = field(default=1000, metadata=rng(
        1, 10**8, "most recent candidate sessions considered"))
    weighting: str = field(default="linear", metadata=choices(
        "linear", "quadratic", "same", doc="position decay of the query items"))


def position_weights(length: int, weighting: str) -> np.ndarray:
    """float64[length]: decay weight of positions 1..length (oldest first)."""
    return decay_weights(np.arange(1, length + 1, dtype=np.float64), length, weighting)


def decay_weights(positions: np.ndarray, lengths: np.ndarray | int, weighting: str) -> np.ndarray:
    """float64[m]: the decay weight of each 1-based position (float64) in a query of the given
    length (one per position, or one for all)."""
    if weighting == "linear":
        return positions / lengths
    if weighting == "quadratic":
        return (positions / lengths) ** 2
    return np.ones(len(positions))


def _csr(keys: np.ndarray, vals: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, values) grouping `vals` by `keys` (stable: vals keep their order in a row)."""
    order = np.argsort(keys, kind="stable")
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n_rows), out=indptr[1:])
    return indptr, vals[order]


@register("sknn")
class SKNN:
    """V-SKNN as a Recommender: `SKNN(SKNNConfig(...)).fit(dataset)`."""

    name = "sknn"
    config_class = SKNNConfig

    def __init__(self, config: SKNNConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or SKNNConfig(), **overrides)
        for name in ("k", "sample_size"):  # (the compiled loop sizes its buffers by them)
            if getattr(self.config, name) < 1:
                raise ValueError(f"sknn: {name} must be at least 1, got {getattr(self.config, name)}")
        # training sessions are numbered 0..S-1 in time order (most recent = largest index)
        self.session_ptr_: np.ndarray | None = None  # int64[S + 1]
        self.session_items_: np.ndarray | None = None  # int64[nnz]: distinct items per session
        self.item_ptr_: np.ndarray | None = None  # int64[n_items + 2]
        self.item_sessions_: np.ndarray | None = None  # int64[nnz]: sessions per item, ascending
        self.pop_: torch.Tensor | None = None  # Double[n_items + 1] in [0, 1)
        # rank_of_session_[dataset session id] = its index above, -1 if not a training session
        self.rank_of_session_: np.ndarray | None = None
        self._recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # see _postings

    def fit(self, train: Dataset, **_: Any) -> SKNN:
        n_rows = train.n_items + 1
        ev = train.split("train").select("session", "item", "ts")
        order = (ev.group_by("session").agg(pl.col("ts").max()).sort("ts", "session")
                 .with_row_index("rank").select("session", pl.col("rank").cast(pl.Int64)))
        pairs = (ev.select("session", "item").unique().join(order, on="session")
                 .sort("rank", "item"))
        ranks = pairs.get_column("rank").to_numpy()
        items = pairs.get_column("item").to_numpy().astype(np.int64)
        self.session_ptr_, self.session_items_ = _csr(ranks, items, order.height)
        ids = order.get_column("session").to_numpy().astype(np.int64)
        self.rank_of_session_ = np.full(int(train.events.get_column("session").max()) + 1, -1, dtype=np.int64)
        self.rank_of_session_[ids] = order.get_column("rank").to_numpy()
        self.item_ptr_, self.item_sessions_ = _csr(items, ranks, n_rows)
        counts = train_counts(train).double()
        self.pop_ = counts / (counts.max() + 1.0)
        self._recent = None
        return self

    # -- the neighbourhood of one query -----------------------------------------------------------
    def _own_ranks(self, batch: Batch) -> np.ndarray:
        """int64[B]: the index of each row's own session among the training sessions, or -1:
        under a held-out-item split (leave-one-out, shan) the session being scored has training
        events and must not be its own neighbour."""
        ids, ranks = batch.session_ids, self.rank_of_session_
        out = np.full(len(batch.sessions), -1, dtype=np.int64)
        if ids is None or ranks is None:
            return out
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(ranks))
        out[inside] = ranks[ids[inside]]
        return out

    def _postings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ptr int64[n_items + 2], sessions int64[nnz'], root_len float64[S]): each item's
        `sample_size` + 1 most recent training sessions, ascending (those of item i are
        sessions[ptr[i]:ptr[i + 1]]), and the square root of each session's distinct items.

        The cut postings give every query its candidates and their dot products exactly: a
        session among the `sample_size` most recent candidates (one session excluded) has at
        most `sample_size` later sessions in any item's postings that hold it, so it lies among
        that item's `sample_size` + 1 latest, and so does every posting of its dot product. On a
        large log the popular items' postings run to many times `sample_size`
        (session-rec's V-SKNN likewise looks up the most recent sessions only)."""
        if self._recent is None:
            assert self.item_ptr_ is not None and self.item_sessions_ is not None
            assert self.session_ptr_ is not None
            lens = np.diff(self.item_ptr_)
            latest = self.config.sample_size + 1
            root_len = np.sqrt(np.diff(self.session_ptr_).astype(np.float64))
            if lens.max(initial=0) <= latest:
                self._recent = self.item_ptr_, self.item_sessions_, root_len
            else:  # each item's postings are ascending in time: keep the tail of each
                tail = np.arange(len(self.item_sessions_)) >= np.repeat(self.item_ptr_[1:] - latest, lens)
                ptr = np.concatenate(([0], np.cumsum(np.minimum(lens, latest))))
                self._recent = ptr, self.item_sessions_[tail], root_len
        return self._recent

    def _neighbour_scores(self, queries: list[np.ndarray], exclude: np.ndarray, base: np.ndarray,
                          out: np.ndarray) -> None:
        """out[r] = base + Σ_neighbours sim · binary(neighbour) for each query r (items oldest
        first, 0 = padding), base float64[n_items + 1], out float64[R, n_items + 1]; exclude:
        int64[R] a training session that is not a candidate of query r (its own; -1: none). The
        queries run in a compiled loop, in parts over threads (`knn_kernels.vsknn_scores`),
        every sum in the order of the one-query definition (items ascending for a dot product,
        neighbours by similarity for a score), so the scores are that definition's bit for bit.
        ValueError: an item id outside the fitted catalogue."""
        from hnvm.models.knn_kernels import vsknn_scores  # (numba: imported when first scoring)

        items, weights, ptr, norms = self._query_vectors(queries)
        post_ptr, post_sess, root_len = self._postings()
        assert self.session_ptr_ is not None and self.session_items_ is not None
        if len(exclude) and int(exclude.max()) >= len(root_len):  # (a read outside the arrays otherwise)
            raise ValueError(f"training session {int(exclude.max())} is outside the model's {len(root_len)}")
        c = self.config
        vsknn_scores(items, weights, ptr, norms, np.ascontiguousarray(exclude, dtype=np.int64), post_ptr, post_sess,
                     self.session_ptr_, self.session_items_, root_len, c.sample_size, c.k, base, out)

    def _query_vectors(self, queries: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(items int64[m], weights float64[m], ptr int64[R + 1], norms float64[R]) of the queries
        (item ids oldest first, 0 = padding), all at once: query r's distinct items ascending,
        items[ptr[r]:ptr[r + 1]], each with the weight of its latest position, and the norm of
        those weights (numpy's sum of one query's squares, as the one-query definition: a row
        sum of the queries of one length, which numpy sums as it does one row alone; 1 for an
        empty query). ValueError: an item id outside the fitted catalogue."""
        n_rows = len(self.item_ptr_) - 1  # type: ignore[arg-type]
        R = len(queries)
        flat = np.concatenate([np.zeros(0, dtype=np.int64), *queries]).astype(np.int64)
        query = np.repeat(np.arange(R), [len(q) for q in queries])
        real = flat > 0
        flat, query = flat[real], query[real]
        lengths = np.bincount(query, minlength=R)
        position = np.arange(len(flat)) - (np.cumsum(lengths) - lengths)[query] + 1  # 1-based, within its query
        if len(flat) and int(flat.max()) >= n_rows:
            first = int(query[flat >= n_rows].min())  # the first such query's largest id
            raise ValueError(f"item id {int(flat[query == first].max())} is outside the model's {n_rows - 1} items")
        order = np.lexsort((position, flat, query))  # by query, item, position
        q_sorted, i_sorted = query[order], flat[order]
        latest = np.ones(len(order), dtype=bool)  # the last entry of each (query, item)
        latest[:-1] = (q_sorted[1:] != q_sorted[:-1]) | (i_sorted[1:] != i_sorted[:-1])
        pick = order[latest]
        items, of = flat[pick], query[pick]
        weights = decay_weights(position[pick].astype(np.float64), lengths[of], self.config.weighting)
        ptr = np.zeros(R + 1, dtype=np.int64)
        np.cumsum(np.bincount(of, minlength=R), out=ptr[1:])
        squares = weights * weights
        norms = np.ones(R)
        distinct = np.diff(ptr)
        for n in np.unique(distinct[distinct > 0]).tolist():
            rows = np.flatnonzero(distinct == n)
            norms[rows] = np.sqrt(squares[ptr[rows][:, None] + np.arange(n)].sum(axis=1))
        return items, weights, ptr, norms

    def _scores(self, queries: list[np.ndarray], exclude: np.ndarray) -> torch.Tensor:
        """Double[R, n_items + 1]: the scores of the queries (`_neighbour_scores`) plus the
        popularity tie-breaker."""
        if self.pop_ is None:
            raise RuntimeError("fit or load the model first")
        out = torch.empty(len(queries), len(self.pop_), dtype=torch.float64)
        self._neighbour_scores(queries, exclude, (self.pop_ * TIE_EPS).numpy(), out.numpy())
        return out

    def score(self, batch: Batch) -> torch.Tensor:
        cur = batch.sessions[:, -1].numpy()
        rows, pos = batch.target_rows.tolist(), batch.target_pos.tolist()
        return self._scores([cur[r, :p] for r, p in zip(rows, pos, strict=True)], self._own_ranks(batch)[rows])

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        return self._scores(list(batch.sessions[:, -1].numpy()), self._own_ranks(batch))

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        if self.pop_ is None:
            raise RuntimeError("fit the model before saving it")
        arrays = {"session_ptr": self.session_ptr_, "session_items": self.session_items_,
                  "item_ptr": self.item_ptr_, "item_sessions": self.item_sessions_,
                  "rank_of_session": self.rank_of_session_}
        save_model_files(Path(path), self.name, dataclasses.asdict(self.config),
                         {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "pop": self.pop_})

    @classmethod
    def load(cls, path: Path) -> SKNN:
        meta, t = load_model_files(Path(path))
        m = cls(SKNNConfig(**meta["config"]))
        m.session_ptr_, m.session_items_ = t["session_ptr"].numpy(), t["session_items"].numpy()
        m.item_ptr_, m.item_sessions_ = t["item_ptr"].numpy(), t["item_sessions"].numpy()
        m.pop_ = t["pop"]
        if "rank_of_session" in t:  # (models saved before it: nothing to exclude)
            m.rank_of_session_ = t["rank_of_session"].numpy()
        return m
