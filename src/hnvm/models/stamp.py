"""STAMP: short-term attention/memory priority model (Liu, Zeng, Mokhosi & Zhang, KDD 2018,
"STAMP: Short-Term Attention/Memory Priority Model for Session-based Recommendation").

Session-based: it reads only the current session's prefix x_1 .. x_t (item embeddings [t, d]).

    general interest   m_s = (1/t) Σ_i x_i
    last click         m_t = x_t
    attention          α_i = w_0 · σ(W_1 x_i + W_2 x_t + W_3 m_s + b_a)      (eq. 7, no softmax)
                       m_a = Σ_i α_i x_i
    MLP cells          h_s = tanh(W_s m_a + b_s),  h_t = tanh(W_t m_t + b_t)
    trilinear score    z_j = <h_s, h_t, x_j> = x_j · (h_s ⊙ h_t)                 (eq. 8)

Candidates share the input embedding table. Training: every prefix of every training session
predicts the next item, cross-entropy of softmax(z) over the whole catalogue (the paper's loss;
`sampled-softmax` for large catalogues). The paper writes z_j = σ(<h_s, h_t, x_j>); the authors'
code feeds the raw trilinear product to the softmax, as we do (σ is monotone, so ranking is
the same).

Beyond the paper (a session-based model has nothing to say before the first click): with an
empty prefix (the next-session task, or a first-position target) STAMP reads the user's
previous session as its session, and with no history at all it returns training popularity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from hnvm.config import choices, rng
from hnvm.contract import Batch
from hnvm.data.batches import SPLIT_CODE, Sequences
from hnvm.data.sampling import popularity_probs, train_counts
from hnvm.distributed import shard_indices
from hnvm.models.base import NetPersistence, register
from hnvm.models.gru_inference import MIN_ROWS, MIN_WIDTH, ItemTable, applies
from hnvm.models.layers import full_softmax_loss, sampled_softmax_loss
from hnvm.training import TrainConfig, fit

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


class STAMPNet(nn.Module):
    def __init__(self, *, n_items: int, d: int = 100, emb_std: float = 0.002,
                 weight_std: float = 0.05) -> None:
        super().__init__()
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # inputs and candidates
        self.W1 = nn.Linear(d, d, bias=False)
        self.W2 = nn.Linear(d, d, bias=False)
        self.W3 = nn.Linear(d, d, bias=False)
        self.b_a = nn.Parameter(torch.zeros(d))
        self.w0 = nn.Linear(d, 1, bias=False)
        self.mlp_s = nn.Linear(d, d)  # W_s, b_s
        self.mlp_t = nn.Linear(d, d)  # W_t, b_t
        # the paper's init: N(0, 0.002²) embeddings, N(0, 0.05²) weights, zero biases
        for name, p in self.named_parameters():
            if name.startswith("item_emb"):
                nn.init.normal_(p, std=emb_std)
            elif name.endswith("bias") or name == "b_a":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=weight_std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.w1_table = ItemTable()  # inference only: W_1 x per item

    def train(self, mode: bool = True) -> STAMPNet:
        if mode:  # training may change the weights in ways no version counter sees
            self.w1_table = ItemTable()
        return super().train(mode)

    def _inputs(self, prefix: Tensor, keep: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """(x, W_1 x or None), each Float[B, T, d]: the prefix's embeddings with the positions
        outside `keep` (Bool[B, T]; mask = its Float[B, T, 1]) zeroed, and their attention input
        where a table gives it (None: the caller applies W_1, after the terms it computes first,
        so that autograd sums x's gradient in the order it always has). In inference on the
        CPU, the attention input is the table's rows at the prefix's items (`w1_table`): at kept
        positions the floats of W_1 x (its product runs over B * T rows, at least `MIN_ROWS`,
        and d is at least `MIN_WIDTH`: row by row the same as the table's, gru_inference);
        elsewhere other values, which never reach the output (α is masked there and x is 0).
        There x skips the mask where it changes nothing (every position it drops holds the
        padding item, whose embedding is 0: whole right-padded prefixes): x · 1 is x."""
        emb, w1 = self.item_emb.weight, self.W1.weight
        if self.training or prefix.numel() < MIN_ROWS or emb.shape[1] < MIN_WIDTH or not applies(emb):
            return self.item_emb(prefix) * mask, None
        table = self.w1_table.get((emb, w1), lambda: nn.functional.linear(emb, w1),
                                  worth_building=len(emb) <= prefix.numel())
        x = self.item_emb(prefix)
        if bool(prefix.masked_fill(keep, 0).any()) or bool(emb[0].any()):  # the mask changes x
            x = x * mask
        return x, None if table is None else table[prefix]

    def forward(self, prefix: Tensor, max_len: int = 0) -> Tensor:
        """prefix: Long[B, T] right-padded, at least one item per row -> h_s ⊙ h_t: [B, d].
        max_len > 0: read only the last max_len items of each prefix."""
        lengths = (prefix > 0).sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        t = torch.arange(prefix.shape[1], device=prefix.device).unsqueeze(0)  # [1, T]
        keep = t < lengths
        if max_len:
            keep &= t >= lengths - max_len
        mask = keep.unsqueeze(-1).float()  # [B, T, 1]
        x, w1_x = self._inputs(prefix, keep, mask)  # [B, T, d] each (w1_x None: W_1 x below)
        m_s = x.sum(1) / mask.sum(1)  # [B, d]
        x_t = x[torch.arange(len(prefix), device=x.device), lengths.squeeze(1) - 1]  # [B, d]
        # W_1 x after m_s and x_t, as always: autograd sums x's gradient terms in node order
        w1_x = self.W1(x) if w1_x is None else w1_x
        act = torch.sigmoid(w1_x + (self.W2(x_t) + self.W3(m_s) + self.b_a).unsqueeze(1))
        alpha = self.w0(act) * mask  # [B, T, 1]
        m_a = (alpha * x).sum(1)  # [B, d]
        h_s = torch.tanh(self.mlp_s(m_a))
        h_t = torch.tanh(self.mlp_t(x_t))
        return h_s * h_t

    def score_all(self, h: Tensor) -> Tensor:
        """h: Float[B, d] -> Float[B, n_items + 1] (column 0 = padding; callers mask it)."""
        return h @ self.item_emb.weight.T

    def score_items(self, h: Tensor, item_ids: Tensor) -> Tensor:
        """h: Float[B, d]; item_ids: Long[B, M] per-row or Long[M] shared -> Float[B, M]."""
        w = self.item_emb(item_ids)
        return h @ w.T if item_ids.dim() == 1 else torch.einsum("bd,bmd->bm", h, w)


@dataclass(frozen=True)
class STAMPConfig:
    """Hyper-parameters of STAMP (section [model] of a config file); paper defaults."""

    d: int = field(default=100, metadata=rng(4, 2048, "embedding size (paper 100)"))
    emb_std: float = field(default=0.002, metadata=rng(1e-6, 1.0, "embedding init std"))
    weight_std: float = field(default=0.05, metadata=rng(1e-6, 1.0, "weight init std"))
    loss: str = field(default="full-softmax", metadata=choices("full-softmax", "sampled-softmax"))
    n_negatives: int = field(default=1024, metadata=rng(1, 100_000, "sampled-softmax negatives"))
    sample_alpha: float = field(default=0.5, metadata=rng(0.0, 1.0, "negatives ~ count^alpha"))
    batch_size: int = field(default=512, metadata=rng(1, 100_000, "prefixes per step (paper 512)"))
    max_len: int = field(default=0, metadata=rng(
        0, 100_000, "read only the last max_len items of a prefix; 0 = all"))


@register("stamp")
class STAMP(NetPersistence):
    """STAMP as a Recommender: `STAMP(STAMPConfig(...)).fit(dataset)`."""

    name = "stamp"
    config_class = STAMPConfig
    extra_tensors = ("pop_",)

    def __init__(self, config: STAMPConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or STAMPConfig(), **overrides)
        self.net: STAMPNet | None = None
        self.pop_: Tensor | None = None
        self.n_items = 0
        self.result_: Any = None

    def _build(self, n_items: int) -> STAMPNet:
        c = self.config
        self.n_items = n_items
        return STAMPNet(n_items=n_items, d=c.d, emb_std=c.emb_std, weight_std=c.weight_std)

    def fit(self, train: Dataset, **options: Any) -> STAMP:
        """Train on `train` (options: `hnvm.training.fit`); returns self."""
        return fit(self, train, **options)

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> _STAMPTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        self.net = self._build(train.n_items)
        counts = train_counts(train)
        self.pop_ = counts / counts.sum().clamp(min=1)
        return _STAMPTrainable(self, seq, counts)

    # -- scoring ----------------------------------------------------------------------------------
    def _score_prefixes(self, prefix: Tensor) -> Tensor:
        """prefix: Long[K, T] right-padded (rows may be empty) -> Float[K, n_items + 1];
        an empty row gets training popularity."""
        net = self.network()
        assert self.pop_ is not None
        nonempty = (prefix > 0).any(1)  # [K]
        if bool(nonempty.all()):  # the usual case: no [K, n_items] copy of popularity to overwrite
            return net.score_all(net(prefix, self.config.max_len))
        out = self.pop_.to(prefix.device).expand(len(prefix), -1).clone()
        rows = nonempty.nonzero().squeeze(1)
        if rows.numel():
            out[rows] = net.score_all(net(prefix[rows], self.config.max_len))
        return out

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        current = batch.sessions[batch.target_rows, -1]  # [K, T]
        T = current.shape[1]
        before = torch.arange(T, device=current.device).unsqueeze(0) < batch.target_pos.unsqueeze(1)  # [K, T]
        prefix = current * before  # nothing at or after the target
        empty = batch.target_pos == 0  # first position: read the previous session instead
        if empty.any() and batch.sessions.shape[1] > 1:
            prev = _last_sessions(batch.sessions[:, :-1])[batch.target_rows]  # [K, T']
            width = max(T, prev.shape[1])
            prefix = torch.nn.functional.pad(prefix, (0, width - T))
            prev = torch.nn.functional.pad(prev, (0, width - prev.shape[1]))
            prefix = torch.where(empty.unsqueeze(1), prev, prefix)
        return self._score_prefixes(prefix)

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        return self._score_prefixes(_last_sessions(batch.sessions))  # the previous session



def _last_sessions(sessions: Tensor) -> Tensor:
    """sessions: Long[B, N, T] (empty sessions only on the left) -> Long[B, T], each row's
    last non-empty session (all 0 where there is none)."""
    B, N, _ = sessions.shape
    if N == 0:
        return sessions.new_zeros(B, 1)
    nonempty = (sessions > 0).any(-1)  # [B, N]
    idx = torch.where(nonempty.any(1), N - 1 - nonempty.flip(1).int().argmax(1), 0)  # [B]
    out = sessions[torch.arange(B, device=sessions.device), idx]  # [B, T]
    return out * nonempty.any(1, keepdim=True)


def training_prefixes(seq: Sequences) -> tuple[np.ndarray, np.ndarray]:
    """Every (prefix, next item) of every train session: (starts int64[E], ends int64[E]) into
    seq.items, the prefix is items[start:end] and the target items[end]."""
    sessions = np.flatnonzero(seq.session_split == SPLIT_CODE["train"])
    lengths = seq.offsets[sessions + 1] - seq.offsets[sessions]
    n_ex = np.maximum(lengths - 1, 0)
    starts = np.repeat(seq.offsets[sessions], n_ex)
    first = np.repeat(np.cumsum(n_ex) - n_ex, n_ex)
    ends = starts + 1 + (np.arange(n_ex.sum()) - first)  # prefix lengths 1 .. len - 1
    return starts, ends


class _STAMPTrainable:
    """Every prefix of every training session predicts its next item (cross-entropy)."""

    def __init__(self, model: STAMP, seq: Sequences, counts: Tensor) -> None:
        assert model.net is not None
        self.model, self.cfg, self.module = model, model.config, model.net
        seq = seq.view(("train",))  # the training events only
        self.items = torch.from_numpy(np.concatenate([seq.items, [0]]))  # index -1 = padding
        starts, ends = training_prefixes(seq)
        if self.cfg.max_len:  # the same items the net would read of a longer prefix
            starts = np.maximum(starts, ends - self.cfg.max_len)
        self.starts, self.ends = torch.from_numpy(starts), torch.from_numpy(ends)
        self.neg_probs = popularity_probs(counts, self.cfg.sample_alpha)

    def to(self, device: torch.device) -> None:
        self.neg_probs = self.neg_probs.to(device)

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Any:
        chunks = torch.from_numpy(rng.permutation(len(self.starts))).split(self.cfg.batch_size)
        for i in shard_indices(len(chunks), rank, world_size):
            idx = chunks[i]
            s, e = self.starts[idx], self.ends[idx]
            T = int((e - s).max())
            pos = s.unsqueeze(1) + torch.arange(T)  # [B, T]
            pos = torch.where(pos < e.unsqueeze(1), pos, torch.full_like(pos, -1))
            yield self.items[pos], self.items[e]  # prefixes [B, T], targets [B]

    def batch_targets(self, batch: Any) -> int:
        return len(batch[1])

    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        net, c = self.module, self.cfg
        prefix, targets = batch
        h = net(prefix)  # [B, d]
        if c.loss == "full-softmax":
            valid = torch.ones(net.n_items + 1, dtype=torch.bool, device=h.device)
            valid[0] = False
            return {"loss": full_softmax_loss(net.score_all(h), targets, valid)}
        neg_ids = torch.multinomial(self.neg_probs, c.n_negatives, replacement=True)  # [M]
        pos = net.score_items(h, targets.unsqueeze(1)).squeeze(1)  # [B]
        neg = net.score_items(h, neg_ids)  # [B, M]
        logq = (self.neg_probs * c.n_negatives).clamp(min=1e-12).log()
        mask = neg_ids.unsqueeze(0) != targets.unsqueeze(1)
        return {"loss": sampled_softmax_loss(pos, neg, logq[targets], logq[neg_ids], mask)}
