"""BPR-MF (Rendle et al. 2009): matrix factorisation trained with Bayesian personalised ranking.

    x_ui = p_u · q_i + b_i
    loss = -log σ(x_ui - x_uj) + λ (|p_u|² + |q_i|² + b_i² + |q_j|² + b_j²)

over triples (u, i, j): i an item the user interacted with in the training split, j an item
drawn uniformly from those the user did not interact with. Training goes through the generic
`hnvm.train.Trainer` (SGD-style mini-batches; Adam by default), with early stopping on the
next-item validation metric.

A positive is a training *interaction*, so an item a user bought five times is a positive
five times per epoch (with `unique_pairs` each (user, item) pair counts once, Rendle's S).
The model is not sequential: scores depend on the user only, never on the session prefix or
the history in the batch (both the next-item and the next-session tasks get p_u · q + b).
A user unseen in training (id 0), or without training interactions, gets row 0 = the mean user
row (`population_user_rows_`): the average user's scores.

`InteractionPairs` (positives and negative sampling) is shared with NCF.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.config import rng
from hnvm.models.base import Batch, NetPersistence, register
from hnvm.models.layers import population_user_rows_

if TYPE_CHECKING:
    from hnvm.data.store import Dataset
    from hnvm.train import TrainConfig


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
        from hnvm.distributed import shard_indices

        order = rng.permutation(len(self))
        for i in shard_indices(-(-len(order) // batch_size), rank, world_size):
            sel = order[i * batch_size:(i + 1) * batch_size]
            u = self.users[sel]
            yield (torch.from_numpy(u), torch.from_numpy(self.items[sel]),
                   torch.from_numpy(self.negatives(u, n_neg, rng)))


def fit_with_trainer(model: Any, trainable: Any, train: Dataset, valid: Dataset | None,
                     train_cfg: TrainConfig | None, run_dir: Path | None, resume: bool,
                     show_progress: bool) -> Any:
    """Run the generic Trainer, early-stopping on the next-item validation metric."""
    from hnvm.data.batches import Sequences
    from hnvm.evaluate import evaluate_next_item
    from hnvm.train import TrainConfig, Trainer

    cfg = train_cfg or TrainConfig()
    seq = Sequences.from_events(train.events, train.n_users)

    def validate() -> dict[str, float]:
        return evaluate_next_item(model, seq, "valid", max_targets=1024).metrics

    has_valid = valid is not None and len(seq.sessions_of("valid")) > 0
    return Trainer(cfg, run_dir, show_progress=show_progress, resume=resume).fit(
        trainable, validate if has_valid else None)


@dataclass(frozen=True)
class BPRMFConfig:
    """Hyper-parameters of BPR-MF (section [model] of a config file)."""

    dim: int = field(default=64, metadata=rng(1, 4096, "latent factors"))
    reg: float = field(default=1e-5, metadata=rng(0.0, 10.0, "L2 weight λ on the factors used"))
    n_neg: int = field(default=1, metadata=rng(1, 10_000, "sampled negatives per positive"))
    batch_size: int = field(default=1024, metadata=rng(1, 10**7, "positives per step"))
    init_std: float = field(default=0.01, metadata=rng(0.0, 10.0, "normal init of the factors"))
    unique_pairs: bool = False  # positives: distinct (user, item) pairs instead of interactions


class BPRMFNet(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim)
        self.bias = nn.Embedding(n_items + 1, 1)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        nn.init.zeros_(self.bias.weight)

    def scores(self, users: Tensor) -> Tensor:
        """Float[B, n_items + 1]: x_ui for every item."""
        return self.user(users) @ self.item.weight.T + self.bias.weight.T


@register("bprmf")
class BPRMF(NetPersistence):
    """BPR-MF as a Recommender: `BPRMF(BPRMFConfig(...)).fit(dataset)`."""

    name = "bprmf"
    config_class = BPRMFConfig
    dims = ("n_items", "n_users")

    def __init__(self, config: BPRMFConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or BPRMFConfig(), **overrides)
        self.net: BPRMFNet | None = None
        self.n_items = self.n_users = 0
        self.result_: Any = None

    def _build(self, n_items: int, n_users: int) -> BPRMFNet:
        self.n_items, self.n_users = n_items, n_users
        return BPRMFNet(n_users, n_items, self.config.dim, self.config.init_std)

    def fit(self, train: Dataset, valid: Dataset | None = None, *,
            train_cfg: TrainConfig | None = None, run_dir: Path | None = None,
            resume: bool = False, show_progress: bool = False, **_: Any) -> BPRMF:
        from hnvm.train import TrainConfig

        torch.manual_seed((train_cfg or TrainConfig()).seed)
        self.net = self._build(train.n_items, train.n_users)
        trainable = _BPRTrainable(self.net, InteractionPairs(train, self.config.unique_pairs),
                                  self.config)
        self.result_ = fit_with_trainer(self, trainable, train, valid, train_cfg, run_dir, resume,
                                        show_progress)
        population_user_rows_([self.net.user], torch.from_numpy(np.unique(trainable.pairs.users)))
        self.net.eval()
        return self

    def _require(self) -> BPRMFNet:
        if self.net is None:
            raise RuntimeError("fit or load the model first")
        return self.net

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        """p_u · q + b for the user of each target (the prefix is not used)."""
        return self._require().scores(batch.users)[batch.target_rows]

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        return self._require().scores(batch.users)



class _BPRTrainable:
    """What the generic Trainer needs: the module, batches of triples and the BPR loss."""

    def __init__(self, net: BPRMFNet, pairs: InteractionPairs, cfg: BPRMFConfig) -> None:
        self.module, self.pairs, self.cfg = net, pairs, cfg

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Any:
        return self.pairs.batches(self.cfg.batch_size, self.cfg.n_neg, rng, rank, world_size)

    def batch_targets(self, batch: Any) -> int:
        return len(batch[0])

    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        users, pos, neg = batch
        net = self.module
        p = net.user(users)  # [b, d]
        qi, qj = net.item(pos), net.item(neg)  # [b, d], [b, n, d]
        bi, bj = net.bias(pos).squeeze(-1), net.bias(neg).squeeze(-1)  # [b], [b, n]
        x_ui = (p * qi).sum(-1) + bi
        x_uj = (p.unsqueeze(1) * qj).sum(-1) + bj
        bpr = -F.logsigmoid(x_ui.unsqueeze(1) - x_uj).mean()
        reg = (p.pow(2).sum(-1) + qi.pow(2).sum(-1) + bi.pow(2)).mean() + \
            (qj.pow(2).sum(-1) + bj.pow(2)).mean()
        return {"loss": bpr + self.cfg.reg * reg, "bpr": bpr.detach()}
