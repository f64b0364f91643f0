"""TIFU-KNN (Hu, He, Gao & Zhang, SIGIR 2020, "Modeling Personalized Item Frequency Information
for Next-basket Recommendation"): time-decayed personal item frequency, blended with the
user's nearest neighbours.

A user's history of sessions (baskets) b_1 .. b_n, oldest first, becomes one vector over the
catalogue, as the authors' code (TIFUKNN.py, `temporal_decay_sum_history`) builds it:

    basket j (1-based)    v_j = within_decay^(n - j) * onehot(b_j)      (an item counts once)
    groups                the n baskets in order cut into n_groups consecutive groups (the first
                          ones floor(n / n_groups) baskets long, the last n mod n_groups ones a
                          basket longer; with n < n_groups each basket is its own group)
    group vector          g_i = mean of the v_j of group i
    user vector           u = sum_i group_decay^(n_groups - 1 - i) * g_i / (number of groups)

(the code's `group_size` is this number of groups; with n < n_groups it keeps the exponent
n_groups - 1 - i, so even the newest group is decayed, which we keep). The score of the next
basket is alpha * u + (1 - alpha) * mean of the k nearest training users' vectors (Euclidean,
brute force over every user with training sessions, the user itself excluded).

Both tasks read the user's history only: next session = the sessions before it; next item =
the sessions before the current one, plus (`include_current`) the current prefix as the
newest basket. TIFU-KNN is a next-basket model; items rarely recur inside one basket, so by
default the prefix is not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch

from hnvm.config import rng
from hnvm.contract import Batch
from hnvm.data.batches import Sequences
from hnvm.models.base import load_model_files, register, save_model_files

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@dataclass(frozen=True)
class TIFUKNNConfig:
    """Hyper-parameters of TIFU-KNN; defaults are the authors' settings for Instacart
    (README of their code: k 300, within 0.9, across 0.7, alpha 0.7, 7 groups; the paper's
    Table 3 lists alpha 0.9 for Instacart)."""

    k: int = field(default=300, metadata=rng(1, 100_000, "nearest neighbours"))
    within_decay: float = field(default=0.9, metadata=rng(0.0, 1.0, "decay between baskets, r_b"))
    group_decay: float = field(default=0.7, metadata=rng(0.0, 1.0, "decay between groups, r_g"))
    n_groups: int = field(default=7, metadata=rng(1, 1000, "groups of baskets (the code's group_size)"))
    alpha: float = field(default=0.9, metadata=rng(0.0, 1.0, "weight of the user's own vector"))
    include_current: bool = False  # next item: count the current prefix as the newest basket


_MAX_ENTRIES = 1 << 20  # (row, basket, item) entries at once: ~160 B each of temporaries
_MAX_KEY = 1 << 62
# a batch's distances come from its queries' items where those reach fewer training entries than
# this x the training vectors' entries x rows (measured ad hoc: at ~0.05, the Instacart sample,
# both products cost alike; at 0.004, 100,000 users of short histories, the items' one ~4x less)
SPARSE_CROSS = 0.02


def tifu_vectors(rows: np.ndarray, baskets: np.ndarray, items: np.ndarray, n_baskets: np.ndarray, n_cols: int,
                 cfg: TIFUKNNConfig, dtype: type = np.float32) -> sp.csr_matrix:
    """CSR [len(n_baskets), n_cols] of `dtype`: the TIFU vector of every row at once (the module
    docstring's definition, in float64 until the cast). Entry e says that basket baskets[e]
    (0-based, oldest first) of row rows[e] (ascending) holds items[e] (1 <= items[e] < n_cols);
    row r has n_baskets[r] baskets, some of them possibly empty. Every sum runs oldest first,
    baskets within a group, then groups, one addition at a time (the order of the loops in
    tests/test_tifuknn.py; numpy's own sums may pair terms differently). ValueError: an item
    id outside [1, n_cols)."""
    G, n_rows = cfg.n_groups, len(n_baskets)
    if len(items) == 0:
        return sp.csr_matrix((n_rows, n_cols), dtype=dtype)
    low, high = int(items.min()), int(items.max())
    if high >= n_cols or low < 1:
        raise ValueError(f"item id {high if high >= n_cols else low} is outside the model's {n_cols - 1} items")
    span = int(n_baskets.max())
    if n_rows > 1 and (len(items) > _MAX_ENTRIES or n_rows * max(span, G) * n_cols >= _MAX_KEY):
        # halves of the rows: bounded memory, and (row, basket or group, item) keys within int64
        half = n_rows // 2
        cut = int(np.searchsorted(rows, half))
        return sp.vstack([tifu_vectors(rows[:cut], baskets[:cut], items[:cut], n_baskets[:half], n_cols, cfg, dtype),
                          tifu_vectors(rows[cut:] - half, baskets[cut:], items[cut:], n_baskets[half:], n_cols, cfg,
                                       dtype)], format="csr")
    # one entry per (row, basket, item): an item counts once per basket; sorted row, basket, item
    key = np.unique((rows * span + baskets) * n_cols + items)
    item, rb = key % n_cols, key // n_cols
    row, j = rb // span, rb % span
    n = n_baskets[row]
    within = np.array([cfg.within_decay ** e for e in range(span)])  # Python's pow, as the definition
    grouped = n >= G
    base, extra = np.divmod(n, G)
    base = np.maximum(base, 1)
    cut = (G - extra) * base  # baskets in the shorter groups
    late = j >= cut
    group = np.where(grouped, np.where(late, G - extra + (j - cut) // (base + 1), j // base), j)
    size = np.where(grouped, base + late, 1)
    # group means: baskets of one (row, group, item) summed oldest first (np.add.at is sequential)
    gkey, inverse = np.unique((row * G + group) * n_cols + item, return_inverse=True)
    sums = np.zeros(len(gkey))
    np.add.at(sums, inverse, within[n - 1 - j])
    group_size = np.zeros(len(gkey))
    group_size[inverse] = size  # one value per (row, group)
    means = sums / group_size
    g_item, g_row = gkey % n_cols, gkey // n_cols // G
    decay = cfg.group_decay ** (G - 1 - np.arange(G))  # the definition's group weights
    # the user vector: groups of one (row, item) summed oldest first, over the number of groups
    ukey, inverse = np.unique(g_row * n_cols + g_item, return_inverse=True)
    vec = np.zeros(len(ukey))
    np.add.at(vec, inverse, decay[(gkey // n_cols) % G] * means)
    u_row = ukey // n_cols
    vec /= np.minimum(n_baskets[u_row], G)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(u_row, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((vec.astype(dtype), ukey % n_cols, indptr), shape=(n_rows, n_cols))


def user_vectors(sessions: list[list[np.ndarray]], n_cols: int, cfg: TIFUKNNConfig,
                 dtype: type = np.float32) -> sp.csr_matrix:
    """CSR [U, n_cols] of `dtype`: the TIFU vector of each user's baskets (item-id arrays,
    oldest first; ids <= 0 are padding, an empty basket still counts), as `tifu_vectors`, in
    slices of users of about _MAX_ENTRIES entries (the flat arrays of a slice bound the memory)."""
    sizes = [sum(len(b) for b in r) for r in sessions]
    parts, lo = [], 0
    while lo < len(sessions) or not parts:
        hi, size = lo, 0
        while hi < len(sessions) and (hi == lo or size + sizes[hi] <= _MAX_ENTRIES):
            size += sizes[hi]
            hi += 1
        parts.append(_slice_vectors(sessions[lo:hi], n_cols, cfg, dtype))
        lo = hi
    return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def _slice_vectors(sessions: list[list[np.ndarray]], n_cols: int, cfg: TIFUKNNConfig, dtype: type) -> sp.csr_matrix:
    n_baskets = np.array([len(r) for r in sessions], dtype=np.int64)
    flat = [b for r in sessions for b in r]
    if not flat:
        return sp.csr_matrix((len(sessions), n_cols), dtype=dtype)
    lengths = np.array([len(b) for b in flat], dtype=np.int64)
    items = np.concatenate(flat).astype(np.int64)
    basket = np.repeat(np.arange(len(flat)), lengths)  # running basket number
    rows = np.repeat(np.arange(len(sessions)), n_baskets)[basket]
    first = np.cumsum(n_baskets) - n_baskets  # each user's first running basket number
    keep = items > 0
    return tifu_vectors(rows[keep], (basket - first[rows])[keep], items[keep], n_baskets, n_cols, cfg, dtype)


@register("tifuknn")
class TIFUKNN:
    """TIFU-KNN as a Recommender: `TIFUKNN(TIFUKNNConfig(...)).fit(dataset)`."""

    name = "tifuknn"
    config_class = TIFUKNNConfig

    def __init__(self, config: TIFUKNNConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or TIFUKNNConfig(), **overrides)
        self.vectors_: sp.csr_matrix | None = None  # [U', n_items + 1]: training users' vectors
        self.users_: torch.Tensor | None = None  # Long[U']: their user ids, ascending
        self._sq: torch.Tensor | None = None  # their squared norms (derived, see _sq_norms)
        self._items: tuple[sp.csr_matrix, np.ndarray] | None = None  # derived, see _by_item

    def fit(self, train: Dataset, **_: Any) -> TIFUKNN:
        """The vector of every user with training sessions (their training events only)."""
        seq = Sequences.from_events(train.events, train.n_users, train.held_out_items).view(("train",))
        users = np.flatnonzero(seq.user_end > seq.user_first)
        baskets = [[seq.session(s) for s in range(seq.user_first[u], seq.user_end[u])] for u in users]
        self.vectors_ = user_vectors(baskets, train.n_items + 1, self.config)
        self._sq = self._items = None
        self.users_ = torch.from_numpy(users.astype(np.int64))
        return self

    def _query(self, sessions: torch.Tensor) -> sp.csr_matrix:
        """CSR float32 [B, n_items + 1]: the TIFU vectors of the rows' sessions [B, N, T] (empty
        sessions are padding)."""
        assert self.vectors_ is not None, "fit or load the model first"
        arr = sessions.cpu().numpy()
        nonempty = (arr > 0).any(2)  # [B, N]; empty sessions are padding
        basket = np.cumsum(nonempty, 1) - 1  # each session's number among its row's baskets
        b, s, t = np.nonzero(arr > 0)
        return tifu_vectors(b, basket[b, s], arr[b, s, t], nonempty.sum(1), self.vectors_.shape[1], self.config)

    def _sq_norms(self) -> torch.Tensor:
        """Float[U']: the training users' squared norms (computed once, on first use)."""
        if self._sq is None:
            assert self.vectors_ is not None
            v = self.vectors_
            self._sq = torch.from_numpy(np.asarray(v.multiply(v).sum(1)).ravel().astype(np.float32))
        return self._sq

    def _by_item(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """(CSR [n_items + 1, U']: the training users' vectors by item, users ascending; int64
        [n_items + 1]: the users holding each item), built once, on first use."""
        if self._items is None:
            assert self.vectors_ is not None
            v = self.vectors_
            self._items = v.T.tocsr(), np.bincount(v.indices, minlength=v.shape[1])
        return self._items

    def _items_way(self, query: sp.csr_matrix) -> bool:
        """Whether `_cross` takes the queries' items: the postings they reach are fewer than
        SPARSE_CROSS x the training vectors' entries x the batch's rows."""
        assert self.vectors_ is not None
        reach = int(np.bincount(query.indices, minlength=self.vectors_.shape[1]) @ self._by_item()[1])
        return reach < SPARSE_CROSS * self.vectors_.nnz * query.shape[0]

    def _cross(self, query: sp.csr_matrix, dense: np.ndarray) -> torch.Tensor:
        """Float[B, U']: each row's dot product with every training user's vector, summed over
        the items ascending whichever way it is computed (terms of 0 add nothing), so the floats
        are the same: from the queries' items (the users holding them) or every training entry
        against the dense queries `dense` (query.toarray(), which the caller has; `_items_way`
        decides)."""
        train = self.vectors_
        assert train is not None
        if self._items_way(query):
            return torch.from_numpy((query @ self._by_item()[0]).toarray())
        return torch.from_numpy(np.asarray(train @ dense.T).T.astype(np.float32))

    def _exclude_own(self, d: torch.Tensor, users: torch.Tensor) -> None:
        """d[r, j] = inf where training user j is row r's user (not its own neighbour), d: Float[B,
        U']; users_ is ascending (as `fit` builds it), so each row's column is a binary search."""
        assert self.users_ is not None
        ids = self.users_
        if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):  # (set by hand: unordered)
            d.masked_fill_(users[:, None] == ids[None], float("inf"))
            return
        col = torch.searchsorted(ids, users).clamp_(max=max(len(ids) - 1, 0))
        mine = (ids[col] == users).nonzero().squeeze(1) if len(ids) else col[:0]
        d[mine, col[mine]] = float("inf")

    def _blend(self, query: sp.csr_matrix, users: torch.Tensor) -> torch.Tensor:
        """alpha * query + (1 - alpha) * mean of each row's k nearest training users, Float[B,
        n_items + 1]."""
        assert self.vectors_ is not None and self.users_ is not None
        c, train = self.config, self.vectors_
        own = torch.from_numpy(query.toarray())
        k = min(c.k, train.shape[0] - 1)
        if k <= 0 or c.alpha >= 1.0:
            return own
        # squared Euclidean distances [B, U'] from one sparse product (no [B, U', I] differences):
        # (|q|^2 + |u|^2) - 2 q.u, the doubling exact, so in place is the same floats
        cross = self._cross(query, own.numpy())  # [B, U']
        d = torch.add(own.pow(2).sum(1, keepdim=True), self._sq_norms()[None]).sub_(cross, alpha=2)
        self._exclude_own(d, users)
        idx = d.topk(k, dim=1, largest=False).indices.numpy()  # [B, k]
        # the mean of each row's k neighbours, summed in topk order (the order `train[r].mean(0)`
        # sums them in, so that the floats are the same as row by row), in a compiled loop
        from hnvm.models.knn_kernels import neighbour_mean  # (numba: imported when first scoring)

        neighbours = neighbour_mean(idx, np.float32(1.0 / k), train)  # [B, n_items + 1]
        return c.alpha * own + (1 - c.alpha) * torch.from_numpy(neighbours)

    def score(self, batch: Batch) -> torch.Tensor:
        """Float[K, n_items + 1]: next item from the earlier sessions (and, with
        include_current, the prefix as the newest basket)."""
        history = batch.sessions[:, :-1]
        if not self.config.include_current:
            scores = self._blend(self._query(history), batch.users)
            return scores[batch.target_rows]
        cur = batch.sessions[batch.target_rows, -1]  # [K, T]
        t = torch.arange(cur.shape[1]).unsqueeze(0)
        prefix = torch.where(t < batch.target_pos.unsqueeze(1), cur, torch.zeros_like(cur))
        rows = torch.cat([history[batch.target_rows], prefix.unsqueeze(1)], dim=1)  # [K, N, T]
        return self._blend(self._query(rows), batch.users[batch.target_rows])

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        """Float[B, n_items + 1]: the next session from the rows' history."""
        return self._blend(self._query(batch.sessions), batch.users)

    def save(self, path: Path) -> None:
        assert self.vectors_ is not None and self.users_ is not None
        v = self.vectors_
        save_model_files(Path(path), self.name, {**dataclasses.asdict(self.config), "n_cols": v.shape[1]},
                         {"indptr": torch.from_numpy(v.indptr.astype(np.int64)),
                          "indices": torch.from_numpy(v.indices.astype(np.int64)),
                          "data": torch.from_numpy(v.data), "users": self.users_})

    @classmethod
    def load(cls, path: Path) -> TIFUKNN:
        meta, t = load_model_files(Path(path))
        cfg = dict(meta["config"])
        n_cols = cfg.pop("n_cols")
        m = cls(TIFUKNNConfig(**cfg))
        m.vectors_ = sp.csr_matrix((t["data"].numpy(), t["indices"].numpy(), t["indptr"].numpy()),
                                   shape=(len(t["users"]), n_cols))
        m.users_ = t["users"]
        return m
