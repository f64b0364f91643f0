"""Item-KNN (the paper's baseline): cosine similarity of session co-occurrence.

Every item is a binary vector over the training sessions; the similarity of two items is

    sim(i, j) = |S_i ∩ S_j| / sqrt(|S_i| |S_j|)

where S_i is the set of training sessions that contain i. The next item is scored by its
similarity to the *last* item of the session prefix (an empty prefix falls back to
popularity); the next session by the sum of the similarities to the items of the user's last
history session. Ties (including every item without co-occurrence) are ordered by training
popularity, added as pop(i) / (max pop + 1) * 1e-9 to float64 scores.

Only the `neighbours` most similar items of each item are kept (a CSR matrix), so memory is
O(n_items * neighbours) whatever the catalogue size; co-occurrences are counted in chunks of
sessions. No nn.Module and no loss: `fit` counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hnvm.config import rng
from hnvm.contract import Batch
from hnvm.data.sampling import train_counts
from hnvm.models.base import load_model_files, register, save_model_files

if TYPE_CHECKING:
    from hnvm.data.store import Dataset

TIE_EPS = 1e-9  # popularity tie-break weight: below any similarity difference that matters
_PAIRS_PER_CHUNK = 20_000_000  # co-occurrence pairs counted at once (bounds fit memory)


@dataclass(frozen=True)
class ItemKNNConfig:
    """Hyper-parameters of Item-KNN (section [model] of a config file)."""

    neighbours: int = field(default=100, metadata=rng(
        0, 10**7, "most similar items kept per item; 0 = all"))
    self_similarity: bool = False  # keep sim(i, i) = 1 (the last item is then always ranked first)
    use_valid: bool = False  # also count the valid sessions (a refit for test; valid metrics leak)


def session_item_sets(train: Dataset, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(items, offsets): the distinct items of every session of `splits`, CSR-style."""
    import polars as pl

    ev = (train.events.filter(pl.col("split").is_in(list(splits)))
          .select("session", "item").unique().sort("session", "item"))
    sess = ev.get_column("session").to_numpy().astype(np.int64)
    items = ev.get_column("item").to_numpy().astype(np.int64)
    starts = np.flatnonzero(np.r_[True, sess[1:] != sess[:-1]]) if len(sess) else sess
    return items, np.r_[starts, len(items)].astype(np.int64)


def cooccurrence(items: np.ndarray, offsets: np.ndarray, n_rows: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col, count) of every item pair that shares a session (the diagonal holds |S_i|).
    Sessions are processed in chunks of about `_PAIRS_PER_CHUNK` pairs."""
    lengths = np.diff(offsets)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    cost = np.cumsum(lengths.astype(np.int64) ** 2)
    lo = 0
    while lo < len(lengths):
        base = cost[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cost, base + _PAIRS_PER_CHUNK, side="right")))
        s_len = lengths[lo:hi]
        ev_start = np.repeat(offsets[lo:hi], s_len)  # session start of each event
        ev_len = np.repeat(s_len, s_len)
        left = np.repeat(items[offsets[lo]:offsets[hi]], ev_len)
        # for each event, the events of its session: start + 0..len-1
        pair_start = np.repeat(ev_start, ev_len)
        within = np.arange(len(left)) - np.repeat(np.cumsum(ev_len) - ev_len, ev_len)
        right = items[pair_start + within]
        keys, counts = np.unique(left * n_rows + right, return_counts=True)
        parts.append((keys, counts))
        lo = hi
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    keys = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    if len(parts) > 1:
        keys, inv = np.unique(keys, return_inverse=True)
        counts = np.bincount(inv, weights=counts).astype(np.int64)
    return keys // n_rows, keys % n_rows, counts


def top_n_csr(row: np.ndarray, col: np.ndarray, val: np.ndarray, n_rows: int, n: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, values) keeping the n largest values of each row (0 = all), each row
    sorted by value descending (ties by column id)."""
    order = np.lexsort((col, -val, row))
    row, col, val = row[order], col[order], val[order]
    counts = np.bincount(row, minlength=n_rows)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    if n > 0:
        keep = (np.arange(len(row)) - first) < n
        row, col, val = row[keep], col[keep], val[keep]
        counts = np.bincount(row, minlength=n_rows)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, col, val


def gather_rows(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                rows: torch.Tensor, out_rows: torch.Tensor, out: torch.Tensor) -> None:
    """out[out_rows[k], :] += dense(CSR row rows[k]) for every k (float64 accumulation)."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lens = ends - starts
    total = int(lens.sum())
    if total == 0:
        return
    seg = torch.repeat_interleave(torch.arange(len(rows)), lens)
    offset = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    pos = starts[seg] + offset
    flat = out_rows[seg] * out.shape[1] + indices[pos]
    out.view(-1).index_add_(0, flat, values[pos].to(out.dtype))


@register("itemknn")
class ItemKNN:
    """Item-KNN as a Recommender: `ItemKNN(ItemKNNConfig(...)).fit(dataset)`."""

    name = "itemknn"
    config_class = ItemKNNConfig

    def __init__(self, config: ItemKNNConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or ItemKNNConfig(), **overrides)
        self.indptr_: torch.Tensor | None = None  # Long[n_items + 2]
        self.indices_: torch.Tensor | None = None  # Long[nnz]
        self.values_: torch.Tensor | None = None  # Float[nnz]
        self.pop_: torch.Tensor | None = None  # Double[n_items + 1], in [0, 1)

    def fit(self, train: Dataset, **_: Any) -> ItemKNN:
        c = self.config
        n_rows = train.n_items + 1
        splits = ("train", "valid") if c.use_valid else ("train",)
        items, offsets = session_item_sets(train, splits)
        row, col, co = cooccurrence(items, offsets, n_rows)
        support = np.zeros(n_rows, dtype=np.float64)
        diag = row == col
        support[row[diag]] = co[diag]
        sim = co / np.sqrt(support[row] * support[col])
        if not c.self_similarity:
            row, col, sim = row[~diag], col[~diag], sim[~diag]
        indptr, indices, values = top_n_csr(row, col, sim, n_rows, c.neighbours)
        self.indptr_ = torch.from_numpy(indptr)
        self.indices_ = torch.from_numpy(indices.astype(np.int64))
        self.values_ = torch.from_numpy(values.astype(np.float32))
        counts = train_counts(train).double()  # POP's counts: train interactions
        self.pop_ = counts / (counts.max() + 1.0)
        return self

    # -- scoring ----------------------------------------------------------------------------------
    def _base(self, n: int) -> torch.Tensor:
        if self.pop_ is None:
            raise RuntimeError("fit or load the model first")
        return (self.pop_ * TIE_EPS).unsqueeze(0).repeat(n, 1)

    def _add_rows(self, out: torch.Tensor, out_rows: torch.Tensor, items: torch.Tensor) -> None:
        assert self.indptr_ is not None and self.indices_ is not None and self.values_ is not None
        gather_rows(self.indptr_, self.indices_, self.values_, items, out_rows, out)

    def score(self, batch: Batch) -> torch.Tensor:
        """Similarity to the last prefix item (item 0, an empty prefix, has no neighbours, so
        only the popularity term remains)."""
        out = self._base(batch.n_targets)
        last_pos = (batch.target_pos - 1).clamp(min=0)
        last = batch.sessions[batch.target_rows, -1, last_pos]
        last = torch.where(batch.target_pos > 0, last, torch.zeros_like(last))
        self._add_rows(out, torch.arange(batch.n_targets), last)
        return out

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        """Sum of similarities to the distinct items of each user's last history session."""
        n_rows = self._base(0).shape[1]
        out = self._base(len(batch.users))
        last = batch.sessions[:, -1]  # [B, T]; all padding for users without history
        keys = torch.unique(torch.arange(len(last)).unsqueeze(1) * n_rows + last)
        rows, items = keys // n_rows, keys % n_rows
        self._add_rows(out, rows, items)
        return out

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        if self.pop_ is None:
            raise RuntimeError("fit the model before saving it")
        assert self.indptr_ is not None and self.indices_ is not None and self.values_ is not None
        save_model_files(Path(path), self.name, dataclasses.asdict(self.config),
                         {"indptr": self.indptr_, "indices": self.indices_,
                          "values": self.values_, "pop": self.pop_})

    @classmethod
    def load(cls, path: Path) -> ItemKNN:
        meta, t = load_model_files(Path(path))
        m = cls(ItemKNNConfig(**meta["config"]))
        m.indptr_, m.indices_, m.values_, m.pop_ = t["indptr"], t["indices"], t["values"], t["pop"]
        return m
