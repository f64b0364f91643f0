"""NCF / NeuMF (He et al. 2017): a GMF and an MLP tower fused into one score.

    GMF:   φ_G = p_u^G ⊙ q_i^G                               (factors)
    MLP:   φ_M = a_L(… a_1(W_1 [p_u^M; q_i^M] + b_1) …)         (ReLU tower, halving widths)
    NeuMF: ŷ_ui = σ(h^T [φ_G; φ_M] + b)

With `factors` = f and `mlp_layers` = L the tower widths are f·2^(L-1), …, 2f, f and each MLP
embedding has f·2^(L-1) dimensions, as in the paper (f = 8, L = 3: input 64 → 32 → 16 → 8).

Training (through the generic `hnvm.training` loop): each training interaction is a positive
with `n_neg` sampled negatives (uniform over the items the user never interacted with), and
`loss = "bce"` is the paper's pointwise log loss over the 1 + n_neg labels; `loss = "bpr"`
trains the same network with pairwise BPR instead. Differences from the paper: the GMF and
MLP parts are trained jointly from a random init (the paper optionally pre-trains each part
and mixes them with α = 0.5; without pre-training it reports slightly lower accuracy), and
`unique_pairs` decides whether a repeated interaction counts once (the paper's binary y_ui)
or every time.

Like BPR-MF it is not sequential: scores depend on the user only. Scoring the full catalogue
splits the first MLP layer into a user part and an item part (W_1 [p; q] = W_1u p + W_1i q),
so the item part is computed once per call, and runs over item chunks to bound memory.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.config import choices, rng
from hnvm.data.batches import Sequences
from hnvm.data.sampling import InteractionPairs
from hnvm.models.base import NetPersistence, UserScoring, register
from hnvm.models.bprmf import PairsTrainable
from hnvm.models.layers import population_user_rows_
from hnvm.training import TrainConfig, fit

if TYPE_CHECKING:
    from hnvm.data.store import Dataset

# users x items x first-layer width at once: small enough to stay in cache (2^24 ran 1.5x slower)
_SCORE_CHUNK = 1 << 20


@dataclass(frozen=True)
class NCFConfig:
    """Hyper-parameters of NeuMF (section [model] of a config file)."""

    factors: int = field(default=32, metadata=rng(
        1, 1024, "predictive factors f (GMF size, last MLP layer)"))
    mlp_layers: int = field(default=3, metadata=rng(1, 8, "MLP hidden layers L"))
    n_neg: int = field(default=4, metadata=rng(1, 1000, "sampled negatives per positive (paper 4)"))
    loss: str = field(default="bce", metadata=choices("bce", "bpr"))
    batch_size: int = field(default=1024, metadata=rng(1, 10**7, "positives per step"))
    init_std: float = field(default=0.01, metadata=rng(0.0, 10.0, "normal init of the embeddings"))
    unique_pairs: bool = False  # positives: distinct (user, item) pairs instead of interactions


class NeuMFNet(nn.Module):
    def __init__(self, n_users: int, n_items: int, factors: int, mlp_layers: int,
                 init_std: float) -> None:
        super().__init__()
        emb = factors * 2 ** (mlp_layers - 1)
        self.user_gmf = nn.Embedding(n_users + 1, factors)
        self.item_gmf = nn.Embedding(n_items + 1, factors)
        self.user_mlp = nn.Embedding(n_users + 1, emb)
        self.item_mlp = nn.Embedding(n_items + 1, emb)
        for e in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            nn.init.normal_(e.weight, std=init_std)
        widths = [factors * 2 ** (mlp_layers - 1 - k) for k in range(mlp_layers)]
        self.first_user = nn.Linear(emb, widths[0])  # W_1u (+ b_1)
        self.first_item = nn.Linear(emb, widths[0], bias=False)  # W_1i
        self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.out = nn.Linear(2 * factors, 1)

    def _fuse(self, gmf: Tensor, first: Tensor) -> Tensor:
        h = F.relu(first)
        for layer in self.tower:
            h = F.relu(layer(h))
        return self.out(torch.cat([gmf, h], -1)).squeeze(-1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """Logits Float[b, m] of users Long[b] for items Long[b, m]."""
        gmf = self.user_gmf(users).unsqueeze(1) * self.item_gmf(items)
        first = (self.first_user(self.user_mlp(users)).unsqueeze(1)
                 + self.first_item(self.item_mlp(items)))
        return self._fuse(gmf, first)

    def scores(self, users: Tensor) -> Tensor:
        """Float[B, n_items + 1]: logits of every item for each user."""
        pu_g, hu = self.user_gmf(users), self.first_user(self.user_mlp(users))  # [B, f], [B, h1]
        n_items = self.item_gmf.num_embeddings
        chunk = max(1, _SCORE_CHUNK // max(1, len(users) * hu.shape[1]))
        out = []
        for lo in range(0, n_items, chunk):
            idx = torch.arange(lo, min(lo + chunk, n_items), device=users.device)
            gmf = pu_g.unsqueeze(1) * self.item_gmf(idx).unsqueeze(0)  # [B, c, f]
            first = hu.unsqueeze(1) + self.first_item(self.item_mlp(idx)).unsqueeze(0)
            out.append(self._fuse(gmf, first))
        return torch.cat(out, 1)


@register("ncf")
class NCF(UserScoring, NetPersistence):
    """NeuMF as a Recommender: `NCF(NCFConfig(...)).fit(dataset)`."""

    name = "ncf"
    config_class = NCFConfig
    dims = ("n_items", "n_users")

    def __init__(self, config: NCFConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or NCFConfig(), **overrides)
        self.net: NeuMFNet | None = None
        self.n_items = self.n_users = 0
        self.result_: Any = None

    def _build(self, n_items: int, n_users: int) -> NeuMFNet:
        c = self.config
        self.n_items, self.n_users = n_items, n_users
        return NeuMFNet(n_users, n_items, c.factors, c.mlp_layers, c.init_std)

    def fit(self, train: Dataset, **options: Any) -> NCF:
        """Train on `train` (options: `hnvm.training.fit`); returns self."""
        return fit(self, train, **options)

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> _NCFTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        self.net = self._build(train.n_items, train.n_users)
        return _NCFTrainable(self.net, InteractionPairs(train, self.config.unique_pairs), self.config)

    def after_fit(self, trainable: _NCFTrainable) -> None:
        """Cold start: row 0 (never trained) becomes the mean user; see population_user_rows_."""
        population_user_rows_([self.net.user_gmf, self.net.user_mlp],
                              torch.from_numpy(np.unique(trainable.pairs.users)))



class _NCFTrainable(PairsTrainable):
    """The pointwise log loss (or BPR) over the positive and its sampled negatives."""

    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        users, pos, neg = batch
        logits = self.module(users, torch.cat([pos.unsqueeze(1), neg], 1))  # [b, 1 + n_neg]
        if self.cfg.loss == "bpr":
            loss = -F.logsigmoid(logits[:, :1] - logits[:, 1:]).mean()
        else:
            labels = torch.zeros_like(logits)
            labels[:, 0] = 1.0
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        return {"loss": loss}
