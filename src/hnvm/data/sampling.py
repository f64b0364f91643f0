"""Item counts and negative sampling, shared by every model that needs them: training counts,
popularity sampling (count^alpha) and the (user, item) positives with uniform negatives of the
pairwise models (BPR-MF, NCF)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from torch import Tensor

from hnvm.distributed import shard_indices

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


def train_counts(train: Dataset, splits: tuple[str, ...] = ("train",)) -> torch.Tensor:
    """Float[n_items + 1]: interactions per item in the given splits (index 0 = padding, 0)."""
    items = train.events.filter(pl.col("split").cast(pl.Utf8).is_in(list(splits))).get_column("item")
    return torch.from_numpy(np.bincount(items.to_numpy(), minlength=train.n_items + 1).astype(np.float32))


def popularity_probs(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Float[n_items + 1]: the distribution negatives are drawn from, count^alpha normalised
    (alpha 0 = uniform over items, 1 = popularity); padding (index 0) is never drawn."""
    probs = counts.clamp(min=0) ** alpha
    probs[0] = 0
    return probs / probs.sum()


class InteractionPairs:
    """The (user, item) positives of the training split and exact uniform sampling of
    negatives among the items a user never interacted with (no rejection loop)."""

    def __init__(self, train: Dataset, unique_pairs: bool = False) -> None:
        ev = train.split("train")
        users = ev.get_column("user").to_numpy().astype(np.int64)
        items = ev.get_column("item").to_numpy().astype(np.int64)
        self.n_rows = train.n_items + 1
        self.known = np.unique(users * self.n_rows + items)  # sorted keys of observed pairs
        # free[g]: user * n_rows + the number of the user's non-positive items below the g-th
        # known item (items p_0 < p_1 < ... of one user: p_t - 1 - t), non-decreasing in g
        k_user, k_item = self.known // self.n_rows, self.known % self.n_rows
        rank = np.arange(len(self.known)) - np.searchsorted(self.known, k_user * self.n_rows)
        self.free = k_user * self.n_rows + k_item - 1 - rank
        if unique_pairs:
            users, items = k_user, k_item
        self.users, self.items = users, items

    def __len__(self) -> int:
        return len(self.users)

    def negatives(self, users: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """int64[len(users), n]: items drawn uniformly from those in 1..n_items that the user
        has no training interaction with (any item for a user who has them all)."""
        lo = np.searchsorted(self.known, users * self.n_rows)
        n_pos = np.searchsorted(self.known, (users + 1) * self.n_rows) - lo
        n_free = (self.n_rows - 1 - n_pos)[:, None]
        r = np.floor(rng.random((len(users), n)) * np.maximum(n_free, 1)).astype(np.int64)
        # the r-th free item is r + 1 + (the user's positives with fewer than r + 1 free items
        # below them)
        below = np.searchsorted(self.free, users[:, None] * self.n_rows + r, side="right")
        neg = r + 1 + below - lo[:, None]
        return np.where(n_free > 0, neg, r % (self.n_rows - 1) + 1)

    def batches(self, batch_size: int, n_neg: int, rng: np.random.Generator, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Shuffled (users Long[b], positives Long[b], negatives Long[b, n_neg]) batches; under
        torchrun, rank's shard of them (`shard_indices`)."""
        order = rng.permutation(len(self))
        for i in shard_indices(-(-len(order) // batch_size), rank, world_size):
            sel = order[i * batch_size:(i + 1) * batch_size]
            u = self.users[sel]
            yield (torch.from_numpy(u), torch.from_numpy(self.items[sel]),
                   torch.from_numpy(self.negatives(u, n_neg, rng)))
