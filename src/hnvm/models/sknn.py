"""V-SKNN: vector session kNN (Ludewig & Jannach 2018, `knn/vsknn.py` of session-rec).

For a query session q (the prefix of the current session, oldest item first):

1. weights: the item at position p (1-based) of a query of length L gets a decay weight
   w(p, L); `linear` is session-rec's default `div` weighting, p / L, so the last item weighs
   1 and the first 1 / L; `quadratic` is (p / L)^2 and `same` is 1 (plain cosine). A repeated
   item keeps the weight of its latest position.
2. candidates: the training sessions that share at least one item with q; of these only the
   `sample_size` most recent (by their last timestamp) are considered (session-rec's
   `sampling='recent'`). These, and their dot products, are found from each query item's
   `sample_size` + 1 most recent sessions only (exact; see `_matrices`), so a query costs at
   most its items x (`sample_size` + 1) postings however popular its items are.
3. similarity: cosine of q's weight vector and the candidate's binary item vector,
   sim = Σ_{i ∈ q ∩ n} w_i / (||w|| · sqrt(|n|)); the `k` most similar candidates are the
   neighbours (ties by recency).
4. score(i) = Σ over neighbours n that contain i of sim(q, n).

The queries of a batch are computed together as sparse products (scipy.sparse): query vectors
× item-session matrix (or, where the training sessions hold fewer postings than the queries
reach, session-item matrix × query vectors) give every candidate's dot product, the k
neighbours × session-item matrix give the scores, with every sum in the order of the one-query
definition (bit-identical scores, tested). An empty query falls back to popularity, and ties
everywhere are ordered by popularity (pop(i) / (max pop + 1) * 1e-9 added to float64 scores).
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
import scipy.sparse as sp
import torch

from hnvm.config import choices, rng
from hnvm.contract import Batch
from hnvm.data.sampling import train_counts
from hnvm.models.base import load_model_files, register, save_model_files

if TYPE_CHECKING:
    from hnvm.data.store import Dataset

TIE_EPS = 1e-9
MAX_POSTINGS = 1 << 22  # item-session postings per chunk of queries (~100 MiB of temporaries)
# a chunk's dot products come from all training sessions at once when those hold at most
# SCAN_ALL x the postings its queries reach (else from the queries' postings, then sorted)
SCAN_ALL = 1.0


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
        # training sessions are numbered 0..S-1 in time order (most recent = largest index)
        self.session_ptr_: np.ndarray | None = None  # int64[S + 1]
        self.session_items_: np.ndarray | None = None  # int64[nnz]: distinct items per session
        self.item_ptr_: np.ndarray | None = None  # int64[n_items + 2]
        self.item_sessions_: np.ndarray | None = None  # int64[nnz]: sessions per item, ascending
        self.pop_: torch.Tensor | None = None  # Double[n_items + 1] in [0, 1)
        # rank_of_session_[dataset session id] = its index above, -1 if not a training session
        self.rank_of_session_: np.ndarray | None = None
        self._mats: tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix] | None = None  # built from the arrays above

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
        self._mats = None
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

    def _matrices(self) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
        """Binary CSR matrices of the training sessions: (item x session, session x item) of each
        item's `sample_size` + 1 most recent sessions only, and the whole session x item.

        The cut postings give every query its candidates and their dot products exactly: a
        session among the `sample_size` most recent candidates (one session excluded) has at
        most `sample_size` later sessions in any item's postings that hold it, so it lies among
        that item's `sample_size` + 1 latest, and so does every posting of its dot product. On a
        large log the popular items' postings run to many times `sample_size`
        (session-rec's V-SKNN likewise looks up the most recent sessions only)."""
        if self._mats is None:
            assert self.item_ptr_ is not None and self.item_sessions_ is not None
            assert self.session_ptr_ is not None and self.session_items_ is not None
            n_rows, n_sess = len(self.item_ptr_) - 1, len(self.session_ptr_) - 1
            sess_item = sp.csr_matrix((np.ones(len(self.session_items_)), self.session_items_, self.session_ptr_),
                                      shape=(n_sess, n_rows))
            lens = np.diff(self.item_ptr_)
            latest = min(self.config.sample_size + 1, n_sess)
            if lens.max(initial=0) <= latest:
                recent_sess, recent_ptr = self.item_sessions_, self.item_ptr_
                recent_t = sess_item
            else:  # each item's postings are ascending in time: keep the tail of each
                tail = np.arange(len(self.item_sessions_)) >= np.repeat(self.item_ptr_[1:] - latest, lens)
                recent_sess = self.item_sessions_[tail]
                recent_ptr = np.concatenate(([0], np.cumsum(np.minimum(lens, latest))))
                recent_t = None
            recent = sp.csr_matrix((np.ones(len(recent_sess)), recent_sess, recent_ptr), shape=(n_rows, n_sess))
            if recent_t is None:  # (items ascending within each session: the dot's summation order)
                recent_t = recent.T.tocsr()
                recent_t.sort_indices()
            self._mats = (recent, recent_t, sess_item)
        return self._mats

    def _neighbour_scores(self, queries: list[np.ndarray], exclude: np.ndarray, out: np.ndarray) -> None:
        """out[r] += Σ_neighbours sim · binary(neighbour) for each query r (items oldest first,
        0 = padding), the queries at once as sparse products (in chunks of at most MAX_POSTINGS
        item-session postings, which bound the memory); exclude: int64[R] a training session
        that is not a candidate of query r (its own; -1: none). Every sum runs in the order of the
        one-query definition (items ascending for a dot product, neighbours by similarity for a
        score), so the scores are that definition's bit for bit. ValueError: an item id outside
        the fitted catalogue."""
        items, weights, ptr, norms = self._query_vectors(queries)
        reach = np.diff(self._matrices()[0].indptr)[items]  # each query item's (cut) postings
        running = np.concatenate(([0], np.cumsum(reach)))
        postings = running[ptr[1:]] - running[ptr[:-1]]
        lo = 0
        while lo < len(queries):  # chunks: summed postings, and rows x the largest, within the cap
            hi, total, widest = lo + 1, int(postings[lo]), int(postings[lo])
            while hi < len(queries) and (total + postings[hi] <= MAX_POSTINGS
                                         and (hi + 1 - lo) * max(widest, postings[hi]) <= MAX_POSTINGS):
                total, widest = total + int(postings[hi]), max(widest, int(postings[hi]))
                hi += 1
            a, b = ptr[lo], ptr[hi]
            self._chunk_scores(items[a:b], weights[a:b], ptr[lo:hi + 1] - a, norms[lo:hi], exclude[lo:hi],
                               out[lo:hi], total)
            lo = hi

    def _query_vectors(self, queries: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(items int64[m], weights float64[m], ptr int64[R + 1], norms float64[R]) of the queries
        (item ids oldest first, 0 = padding), all at once: query r's distinct items ascending,
        items[ptr[r]:ptr[r + 1]], each with the weight of its latest position, and the norm of
        those weights (numpy's sum of one query's squares, as the one-query definition; 1 for an
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
        filled = ptr[1:] > ptr[:-1]
        if filled.any():
            norms[filled] = np.sqrt(np.array([part.sum() for part in np.split(squares, ptr[1:-1])]))[filled]
        return items, weights, ptr, norms

    def _chunk_scores(self, items: np.ndarray, weights: np.ndarray, ptr: np.ndarray, norms: np.ndarray,
                      exclude: np.ndarray, out: np.ndarray, postings: int) -> None:
        """`_neighbour_scores` of the queries (`_query_vectors`' arrays for them) that reach
        `postings` item-session postings in all."""
        c = self.config
        item_sess, sess_item_recent, sess_item = self._matrices()
        n_sess, n = item_sess.shape[1], len(ptr) - 1
        if ptr[-1] == 0:
            return
        q = sp.csr_matrix((weights, items, ptr), shape=(n, item_sess.shape[0]))
        # 2. dot products with every candidate (sessions sharing an item), in session (= time) order
        if sess_item_recent.nnz <= SCAN_ALL * postings:
            # every training session against the chunk's queries: [S, R] by columns lists each
            # query's candidates in session order with no sort (each dot still sums the items
            # ascending); cheaper than sorting each query's candidates when the training
            # sessions hold fewer item postings than the chunk's queries reach
            dots = (sess_item_recent @ q.T.tocsr()).tocsc()  # [S, R]
        else:
            dots = q @ item_sess  # [R, S]
            dots.sort_indices()
        lens = np.diff(dots.indptr)
        rows = np.repeat(np.arange(n), lens)
        cand, dot = dots.indices.astype(np.int64), dots.data
        keep = cand != exclude[rows]
        # 3. the sample_size most recent candidates of each query
        lens = np.bincount(rows[keep], minlength=n)
        rows, cand, dot = rows[keep], cand[keep], dot[keep]
        starts = np.cumsum(lens) - lens
        keep = np.arange(len(rows)) - starts[rows] >= (lens - c.sample_size)[rows]
        rows, cand, dot = rows[keep], cand[keep], dot[keep]
        lens = np.minimum(lens, c.sample_size)
        n_len = (self.session_ptr_[cand + 1] - self.session_ptr_[cand]).astype(np.float64)  # type: ignore[index]
        sim = dot / (norms[rows] * np.sqrt(n_len))
        # 4. the k most similar of each query (ties by recency, later first); a query with at
        # most k candidates keeps them all in time order
        big = lens > c.k
        if big.any():
            sel = big[rows]
            b_rows = np.cumsum(big) - 1  # index among the big queries
            width = int(lens[big].max())
            starts = np.cumsum(lens) - lens
            pad = np.full((int(big.sum()), width), -np.inf)
            pad[b_rows[rows[sel]], (np.arange(len(rows)) - starts[rows])[sel]] = sim[sel]
            kth = -np.partition(-pad, c.k - 1, axis=1)[:, c.k - 1]  # k-th largest similarity
            sel &= sim >= kth[b_rows[rows]]
            order = np.lexsort((-cand[sel], -sim[sel], rows[sel]))
            top = np.flatnonzero(sel)[order]
            first = np.concatenate(([True], rows[top][1:] != rows[top][:-1]))
            rank_in_row = np.arange(len(top)) - np.maximum.accumulate(np.where(first, np.arange(len(top)), 0))
            top = top[rank_in_row < c.k]
            small = np.flatnonzero(~big[rows])
            pick = np.concatenate([small, top])
            pick = pick[np.argsort(rows[pick], kind="stable")]  # rows in order, each row's order kept
            rows, cand, sim = rows[pick], cand[pick], sim[pick]
        # 5. scores: each neighbour's items get its similarity, summed in the neighbours' order
        counts = np.bincount(rows, minlength=n)
        w_ptr = np.concatenate(([0], np.cumsum(counts)))
        # (the product runs over each row's entries in their stored order: the summation order)
        scores = sp.csr_matrix((sim, cand, w_ptr), shape=(n, n_sess)) @ sess_item
        # (each (row, item) once in a product: a fancy-index add, no dense [R, items] temporary)
        out[np.repeat(np.arange(n), np.diff(scores.indptr)), scores.indices] += scores.data

    def _base(self, n: int) -> torch.Tensor:
        if self.pop_ is None:
            raise RuntimeError("fit or load the model first")
        return (self.pop_ * TIE_EPS).unsqueeze(0).repeat(n, 1)

    def score(self, batch: Batch) -> torch.Tensor:
        out = self._base(batch.n_targets)
        cur = batch.sessions[:, -1].numpy()
        rows, pos = batch.target_rows.tolist(), batch.target_pos.tolist()
        own = self._own_ranks(batch)
        self._neighbour_scores([cur[r, :p] for r, p in zip(rows, pos, strict=True)], own[rows], out.numpy())
        return out

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        out = self._base(len(batch.users))
        last = batch.sessions[:, -1].numpy()
        self._neighbour_scores(list(last), self._own_ranks(batch), out.numpy())
        return out

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
