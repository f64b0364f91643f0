"""Caser: convolutional sequence embedding (Tang & Wang, WSDM 2018, "Personalized Top-N
Sequential Recommendation via Convolutional Sequence Embedding").

    sequence          the user's items across sessions, oldest first (history + current prefix)
    image             E = [emb(i_{t-L}); ...; emb(i_{t-1})]                  [L, d]
    horizontal conv   for h = 1..L: nh filters of shape [h, d] slide over the L rows,
                      c = φ_c(conv(E)) [nh, L - h + 1] -> max over positions [nh]
                      o = concat over h                                       [nh · L]
    vertical conv     nv filters of shape [L, 1]: o' = conv(E)                [nv · d]
    fully connected   z = φ_a(W1 · dropout([o; o']) + b1)                     [d]
    output            y_j = W2[j] · [z; P_u] + b2[j]                          [n_items + 1]

Training (the paper's): every position of a user's training sequence gives one example, the
previous L items (left-padded with 0 where the sequence is shorter) and the next T items as
targets; loss = -mean log σ(y_target) - mean log(1 - σ(y_negative)) with `n_negatives`
negatives per target (paper and reference code: 3, i.e. 3·T per example), drawn uniformly from
the items the user has not interacted with in training (a sampled item the user has is left out
of the loss instead of being redrawn). The user embedding row 0 is the shared "unknown user":
no example reads it, so after training it becomes the mean user row (scores linear in P_u: the
average user's), which users without training examples get too (`population_user_rows_`).

Scoring reads only the last L items before the target: the history sessions and the
current session's items before the target position, flattened in time order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.config import choices, rng
from hnvm.contract import Batch
from hnvm.data.batches import SPLIT_CODE, Sequences
from hnvm.data.sampling import popularity_probs, train_counts
from hnvm.distributed import shard_indices
from hnvm.models.base import NetPersistence, register
from hnvm.models.layers import population_user_rows_
from hnvm.training import TrainConfig, fit

if TYPE_CHECKING:
    from hnvm.data.store import Dataset

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}


class CaserNet(nn.Module):
    def __init__(self, *, n_items: int, n_users: int, L: int = 5, d: int = 50, nv: int = 4,
                 nh: int = 16, dropout: float = 0.5, act_conv: str = "relu",
                 act_fc: str = "relu") -> None:
        super().__init__()
        self.n_items, self.L = n_items, L
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # row 0 = padding
        self.user_emb = nn.Embedding(n_users + 1, d)  # row 0 = unknown user
        self.conv_v = nn.Conv2d(1, nv, (L, 1))  # vertical: [L, 1]
        self.conv_h = nn.ModuleList(nn.Conv2d(1, nh, (h, d)) for h in range(1, L + 1))
        self.act_conv = ACTIVATIONS[act_conv]()
        self.act_fc = ACTIVATIONS[act_fc]()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(nv * d + nh * L, d)  # W1, b1
        self.W2 = nn.Embedding(n_items + 1, 2 * d)  # output weights: [z; P_u] per item
        self.b2 = nn.Embedding(n_items + 1, 1)
        # the reference code's init: N(0, 1/d) embeddings, N(0, 1/(2d)) output rows, b2 = 0
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        nn.init.normal_(self.user_emb.weight, std=d ** -0.5)
        nn.init.normal_(self.W2.weight, std=(2 * d) ** -0.5)
        nn.init.zeros_(self.b2.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def horizontal_maps(self, image: Tensor) -> list[Tensor]:
        """image: Float[B, 1, L, d] -> per height h: Float[B, nh, L - h + 1], the activation
        of each filter at each start position p (reads rows p .. p + h - 1)."""
        return [self.act_conv(conv(image).squeeze(3)) for conv in self.conv_h]

    def features(self, seq: Tensor, users: Tensor) -> Tensor:
        """seq: Long[B, L] (last L items, left-padded with 0), users: Long[B] -> [B, 2d]."""
        B = seq.shape[0]
        image = self.item_emb(seq).unsqueeze(1)  # [B, 1, L, d]
        o_v = self.conv_v(image).view(B, -1)  # [B, nv · d]
        o_h = torch.cat([c.max(dim=2).values for c in self.horizontal_maps(image)], 1)  # [B, nh·L]
        z = self.act_fc(self.fc(self.drop(torch.cat([o_v, o_h], 1))))  # [B, d]
        return torch.cat([z, self.user_emb(users)], 1)  # [B, 2d]

    def score_all(self, x: Tensor) -> Tensor:
        """x: Float[B, 2d] -> Float[B, n_items + 1] (column 0 = padding; callers mask it)."""
        return (x @ self.W2.weight.T).add_(self.b2.weight.squeeze(1))  # (in place: the same floats)

    def score_items(self, x: Tensor, item_ids: Tensor) -> Tensor:
        """x: Float[B, 2d], item_ids: Long[B, M] -> Float[B, M]."""
        return torch.einsum("bd,bmd->bm", x, self.W2(item_ids)) + self.b2(item_ids).squeeze(-1)


def last_items(items: Tensor, L: int) -> Tensor:
    """items: Long[K, N] with 0 = padding anywhere (time order left to right) -> Long[K, L],
    the last L real items of each row, left-padded with 0."""
    real = items > 0
    from_end = real.flip(-1).cumsum(-1).flip(-1)  # [K, N] real items at or after each slot
    keep = real & (from_end <= L)
    slot = torch.where(keep, L - from_end, torch.full_like(from_end, L))  # L = discard slot
    out = items.new_zeros(items.shape[0], L + 1)
    out.scatter_(1, slot, torch.where(keep, items, torch.zeros_like(items)))
    return out[:, :L]


@dataclass(frozen=True)
class CaserConfig:
    """Hyper-parameters of Caser (section [model] of a config file); paper / reference code
    defaults except where the validation split of the Instacart sample said otherwise."""

    L: int = field(default=5, metadata=rng(1, 200, "Markov order: items in the image (paper 5)"))
    T: int = field(default=3, metadata=rng(1, 50, "next items used as targets (paper 3)"))
    d: int = field(default=50, metadata=rng(4, 1024, "latent size (paper 50)"))
    nv: int = field(default=4, metadata=rng(1, 256, "vertical filters (paper 4)"))
    nh: int = field(default=16, metadata=rng(1, 256, "horizontal filters per height (paper 16)"))
    dropout: float = field(default=0.5, metadata=rng(0.0, 0.9, "dropout before W1 (paper 0.5)"))
    act_conv: str = field(default="relu", metadata=choices(*ACTIVATIONS, doc="φ_c"))
    act_fc: str = field(default="relu", metadata=choices(*ACTIVATIONS, doc="φ_a"))
    n_negatives: int = field(default=3, metadata=rng(1, 100_000, "negatives per target (paper 3)"))
    sample_alpha: float = field(default=0.0, metadata=rng(0.0, 1.0, "negatives ~ count^alpha"))
    batch_size: int = field(default=512, metadata=rng(1, 100_000, "examples per step"))


@register("caser")
class Caser(NetPersistence):
    """Caser as a Recommender: `Caser(CaserConfig(...)).fit(dataset)`."""

    name = "caser"
    config_class = CaserConfig
    dims = ("n_items", "n_users")

    def __init__(self, config: CaserConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or CaserConfig(), **overrides)
        self.net: CaserNet | None = None
        self.n_items = self.n_users = 0
        self.result_: Any = None

    def _build(self, n_items: int, n_users: int) -> CaserNet:
        c = self.config
        self.n_items, self.n_users = n_items, n_users
        return CaserNet(n_items=n_items, n_users=n_users, L=c.L, d=c.d, nv=c.nv, nh=c.nh,
                        dropout=c.dropout, act_conv=c.act_conv, act_fc=c.act_fc)

    def fit(self, train: Dataset, **options: Any) -> Caser:
        """Train on `train` (options: `hnvm.training.fit`); returns self."""
        return fit(self, train, **options)

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> _CaserTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        self.net = self._build(train.n_items, train.n_users)
        return _CaserTrainable(self, seq, train_counts(train))

    def after_fit(self, trainable: _CaserTrainable) -> None:
        """Cold start: row 0 (never trained) becomes the mean user; see population_user_rows_."""
        population_user_rows_([self.net.user_emb], torch.unique(trainable.users))

    # -- scoring ----------------------------------------------------------------------------------
    def _users(self, users: Tensor) -> Tensor:
        return torch.where(users <= self.n_users, users, torch.zeros_like(users))

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        net = self.network()
        B, _, T = batch.sessions.shape
        # each row's last L history items once, not its whole history once per target: the
        # last L items of (history, prefix) are those of (last L of history, prefix)
        history = last_items(batch.sessions[:, :-1].reshape(B, -1), net.L)[batch.target_rows]  # [K, L]
        current = batch.sessions[batch.target_rows, -1]  # [K, T]
        before = torch.arange(T, device=current.device).unsqueeze(0) < batch.target_pos.unsqueeze(1)  # [K, T]
        items = torch.cat([history, current * before], 1)  # nothing at or after the target
        x = net.features(last_items(items, net.L), self._users(batch.users[batch.target_rows]))
        return net.score_all(x)

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        net = self.network()
        items = batch.sessions.reshape(batch.sessions.shape[0], -1)  # [B, N·T]
        return net.score_all(net.features(last_items(items, net.L), self._users(batch.users)))



def training_examples(seq: Sequences, L: int, T: int) -> tuple[np.ndarray, ...]:
    """Every position of each user's train sequence (train sessions flattened in time order),
    except each user's first item: (users int64[E], inputs int64[E, L] left-padded,
    targets int64[E, T] right-padded with 0)."""
    lengths = np.diff(seq.offsets)
    train = seq.session_split == SPLIT_CODE["train"]
    ev_session = np.repeat(np.arange(seq.n_sessions), lengths)  # [n_events]
    keep = train[ev_session]
    items, ev_user = seq.items[keep], seq.session_user[ev_session[keep]]  # user-sorted
    n = len(items)
    starts = np.searchsorted(ev_user, ev_user, side="left")  # first event of each user
    ends = np.searchsorted(ev_user, ev_user, side="right")
    pos = np.arange(n)
    ex = pos[pos > starts]  # positions with at least one earlier item
    inp = ex[:, None] - L + np.arange(L)  # [E, L]
    inp_ok = inp >= starts[ex, None]
    tgt = ex[:, None] + np.arange(T)  # [E, T]
    tgt_ok = tgt < ends[ex, None]
    padded = np.concatenate([items, [0]])  # index n = a 0
    inputs = padded[np.where(inp_ok, inp, n)]
    targets = padded[np.where(tgt_ok, tgt, n)]
    return ev_user[ex], inputs, targets


class _CaserTrainable:
    """Sliding-window examples, BCE on the T targets and sampled negatives (the paper's)."""

    def __init__(self, model: Caser, seq: Sequences, counts: Tensor) -> None:
        assert model.net is not None
        self.model, self.cfg, self.module = model, model.config, model.net
        users, inputs, targets = training_examples(seq.view(("train",)), self.cfg.L, self.cfg.T)
        self.users, self.inputs = torch.from_numpy(users), torch.from_numpy(inputs)
        self.targets = torch.from_numpy(targets)
        # (user, item) pairs of training, as sorted keys user · (n_items + 1) + item
        self.stride = model.n_items + 1
        seen = np.unique(users * self.stride + inputs[:, -1])  # every train item but the first
        first = np.unique(users * self.stride + targets[:, 0])
        self.seen = torch.from_numpy(np.union1d(seen, first))
        self.neg_probs = popularity_probs(counts, self.cfg.sample_alpha)

    def to(self, device: torch.device) -> None:
        self.seen, self.neg_probs = self.seen.to(device), self.neg_probs.to(device)

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Any:
        chunks = torch.from_numpy(rng.permutation(len(self.users))).split(self.cfg.batch_size)
        for i in shard_indices(len(chunks), rank, world_size):
            idx = chunks[i]
            yield self.users[idx], self.inputs[idx], self.targets[idx]

    def batch_targets(self, batch: Any) -> int:
        return int((batch[2] > 0).sum())

    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        net, c = self.module, self.cfg
        users, inputs, targets = batch  # [B], [B, L], [B, T]
        B, M = len(users), c.n_negatives * c.T
        neg = torch.multinomial(self.neg_probs, B * M, replacement=True).view(B, M)  # [B, M]
        # a sampled item the user has interacted with in training is not a negative
        keys = users.unsqueeze(1) * self.stride + neg  # [B, M]
        at = torch.searchsorted(self.seen, keys).clamp(max=len(self.seen) - 1)
        neg_mask = self.seen[at] != keys  # [B, M]
        pos_mask = targets > 0  # [B, T]
        x = net.features(inputs, users)  # [B, 2d]
        y_pos = net.score_items(x, targets)  # [B, T]
        y_neg = net.score_items(x, neg)  # [B, M]
        pos_loss = -(F.logsigmoid(y_pos) * pos_mask).sum() / pos_mask.sum().clamp(min=1)
        neg_loss = -(F.logsigmoid(-y_neg) * neg_mask).sum() / neg_mask.sum().clamp(min=1)
        return {"loss": pos_loss + neg_loss, "pos": pos_loss.detach(), "neg": neg_loss.detach()}
