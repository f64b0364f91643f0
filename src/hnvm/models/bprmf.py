"""BPR-MF (Rendle et al. 2009): matrix factorisation trained with Bayesian personalised ranking.

    x_ui = p_u · q_i + b_i
    loss = -log σ(x_ui - x_uj) + λ (|p_u|² + |q_i|² + b_i² + |q_j|² + b_j²)

over triples (u, i, j): i an item the user interacted with in the training split, j an item
drawn uniformly from those the user did not interact with. Training goes through the generic
`hnvm.training` loop (SGD-style mini-batches; Adam by default), with early stopping on the
next-item validation metric.

A positive is a training *interaction*, so an item a user bought five times is a positive
five times per epoch (with `unique_pairs` each (user, item) pair counts once, Rendle's S).
The model is not sequential: scores depend on the user only, never on the session prefix or
the history in the batch (both the next-item and the next-session tasks get p_u · q + b).
A user unseen in training (id 0), or without training interactions, gets row 0 = the mean user
row (`population_user_rows_`): the average user's scores.

`hnvm.data.sampling.InteractionPairs` (positives and negative sampling) is shared with NCF.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.config import rng
from hnvm.data.batches import Sequences
from hnvm.data.sampling import InteractionPairs
from hnvm.models.base import NetPersistence, UserScoring, register
from hnvm.models.layers import population_user_rows_
from hnvm.training import TrainConfig, fit

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


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
        return (self.user(users) @ self.item.weight.T).add_(self.bias.weight.T)  # (in place: the same floats)


class PairsTrainable:
    """A trainable over (user, positive, negatives) batches of `InteractionPairs`; a subclass
    gives the loss. cfg needs batch_size and n_neg."""

    def __init__(self, net: nn.Module, pairs: InteractionPairs, cfg: Any) -> None:
        self.module, self.pairs, self.cfg = net, pairs, cfg

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Any:
        return self.pairs.batches(self.cfg.batch_size, self.cfg.n_neg, rng, rank, world_size)

    def batch_targets(self, batch: Any) -> int:
        return len(batch[0])


@register("bprmf")
class BPRMF(UserScoring, NetPersistence):
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

    def fit(self, train: Dataset, **options: Any) -> BPRMF:
        """Train on `train` (options: `hnvm.training.fit`); returns self."""
        return fit(self, train, **options)

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> _BPRTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        self.net = self._build(train.n_items, train.n_users)
        return _BPRTrainable(self.net, InteractionPairs(train, self.config.unique_pairs), self.config)

    def after_fit(self, trainable: _BPRTrainable) -> None:
        """Cold start: row 0 (never trained) becomes the mean user; see population_user_rows_."""
        population_user_rows_([self.net.user], torch.from_numpy(np.unique(trainable.pairs.users)))



class _BPRTrainable(PairsTrainable):
    """The BPR loss with L2 on the factors used."""

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
