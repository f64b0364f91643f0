"""GRU4Rec (Hidasi et al. 2016; Hidasi & Karatzoglou 2018) as its authors' reference PyTorch
implementation (hidasib/GRU4Rec_PyTorch_Official) trains and scores it.

* Session-parallel mini-batches: slot b of a batch walks through one session; when it ends, the
  slot's hidden state is reset to 0 and the next session (by start time) takes the slot; once no
  session is left the batch shrinks. A step is one input -> next-item pair per slot and
  backpropagates through that step only (the carried states are detached).
* Item input: constrained_embedding: x = W_y[i] (input = output weights); embedding > 0:
  x = E[i]; otherwise the first GRU layer reads the one-hot item (its input weights are an item
  table).
* Network: x -> dropout_p_embed -> GRU layers; each layer's output -> dropout_p_hidden, and that
  dropped-out output is also the carried hidden state (as in the reference).
* Scores: r_j = W_y[j] · h + b_j against the mini-batch's targets plus n_sample items drawn from
  count^sample_alpha (drawn in bulk and cached).
* Losses: bpr-max (final ELU(elu_p), softmax weights over the negatives, bpreg · Σ s_j r_j²) and
  cross-entropy (optional log-Q correction), summed over the batch and divided by the nominal
  batch size.
* Optimizer: Adagrad with momentum (train.optimizer = "adagrad", hnvm.train.AdagradMomentum,
  the reference's update and eps); the item tables then get sparse gradients so that, as in the
  reference, only the rows a step used are updated (dense with Adam or train.grad_clip > 0).
* Init: the reference's default (compatibility mode): each weight block (each gate separately)
  ~ U(±sqrt(6 / (fan_in + fan_out))), biases 0.

GRU4Rec is session-based: it ignores users and earlier sessions. `score` runs the GRU over the
prefix of the session being predicted (a target at position 0 has an empty prefix, so a zero
state and its scores are the output biases). `score_sessions` has no current session, so it
uses the user's most recent history session as the prefix (the state at its end).

Differences from the reference that do not change the model: item ids are 1..n_items with row 0
unused (padding), the initial weights come from torch seeded with `train.seed` rather than numpy
seeded with 42, and ties in session start time are ordered by session id. For speed, bpr-max's
gradient is taken in closed form (_BprMax) and the item tables' sparse gradients arrive summed
per row (_CoalescedRows): the same numbers up to float rounding, in fewer passes
(benchmarks/gru4rec_reference.py compares the two implementations' speed side by side).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.config import choices, rng
from hnvm.models.base import Batch, NetPersistence, register
from hnvm.train import TrainConfig

if TYPE_CHECKING:
    from hnvm.data.batches import Sequences
    from hnvm.data.store import Dataset

_LOG_EPS = 1e-24  # the reference's floor inside every log


# ---- session-parallel mini-batches ------------------------------------------------------------


@dataclass
class ParallelStep:
    """One step of session-parallel training. Before the step, the hidden state rows of the
    previous step are first selected with `keep` (slots whose session ended with no session left
    to take their place are dropped), then rows flagged in `reset` (a new session starts in
    the slot) are set to 0."""

    inputs: Tensor  # Long[b] item of each slot at this step
    targets: Tensor  # Long[b] the next item of the same session
    keep: Tensor | None  # Long[b] rows of the previous step's state carried over (None = all)
    reset: Tensor | None  # Bool[b] slots starting a new session (None = none)
    events: np.ndarray  # int64[b] flat index (into Sequences.items) of each input event
    sessions: np.ndarray  # int64[b] session of each slot


def session_parallel_steps(items: np.ndarray, offsets: np.ndarray, order: np.ndarray,
                           batch_size: int) -> Iterator[ParallelStep]:
    """Session-parallel steps over the sessions `order` (in that order; each must have >= 2
    events). items/offsets: flat events and session offsets as in `Sequences`.

    The first `batch_size` sessions fill the slots; all slots advance together for as many steps
    as the shortest remaining session allows; then every finished slot takes the next session
    (in slot order) or, when none is left, leaves the batch."""
    n = len(order)
    if n == 0:
        return
    slots = np.arange(min(batch_size, n))  # index into `order` of each slot's session
    nxt = len(slots)
    start = offsets[order[slots]].copy()  # current input event of each slot
    end = offsets[order[slots] + 1].copy()
    keep: np.ndarray | None = None
    reset: np.ndarray | None = np.ones(len(slots), dtype=bool)
    while len(slots):
        steps = int((end - start).min()) - 1  # >= 1: every active session has a next item
        for i in range(steps):
            ev = start + i
            yield ParallelStep(
                inputs=torch.from_numpy(items[ev]), targets=torch.from_numpy(items[ev + 1]),
                keep=None if keep is None else torch.from_numpy(keep),
                reset=None if reset is None else torch.from_numpy(reset),
                events=ev, sessions=order[slots])
            keep = reset = None
        start += steps
        finished = end - start <= 1
        n_new = min(int(finished.sum()), n - nxt)
        refill = np.flatnonzero(finished)[:n_new]  # the first finished slots get new sessions
        slots[refill] = np.arange(nxt, nxt + n_new)
        nxt += n_new
        alive = ~finished
        alive[refill] = True
        s = order[slots[refill]]
        start[refill], end[refill] = offsets[s], offsets[s + 1]
        fresh = np.zeros(len(slots), dtype=bool)
        fresh[refill] = True
        keep = np.flatnonzero(alive) if not alive.all() else None
        slots, start, end, reset = slots[alive], start[alive], end[alive], fresh[alive]


def training_order(seq: Sequences, events: pl.DataFrame, splits: tuple[str, ...],
                   by: str = "time") -> np.ndarray:
    """Sessions of `splits` with >= 2 events in the reference's session_order: by start time
    ("time", ties by session id) or by session id ("id": the dataset's order, user by user)."""
    from hnvm.data.batches import SPLIT_CODE

    ev = events.select("session", "ts")
    start = np.full(seq.n_sessions, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(start, ev.get_column("session").to_numpy().astype(np.int64),
                  ev.get_column("ts").to_numpy().astype(np.int64))
    lengths = np.diff(seq.offsets)
    keep = np.isin(seq.session_split, [SPLIT_CODE[s] for s in splits]) & (lengths >= 2)
    sessions = np.flatnonzero(keep)
    if by == "id":
        return sessions
    return sessions[np.argsort(start[sessions], kind="stable")]


# ---- losses (scores R: Float[b, b + n_sample], column k < b is row k's target) ----------------


def bpr_max_loss(scores: Tensor, bpreg: float, elu_p: float) -> Tensor:
    """The reference's BPR-max, summed over rows: the final activation ELU(·, elu_p) (off at 0)
    is applied to every score; s = softmax over the row without its diagonal (the target);
    loss = -log(Σ_j s_j σ(r_target - r_j) + 1e-24) + bpreg · Σ_j s_j r_j².

    The value is computed with the reference's operations (bit for bit); the gradient is the
    closed form (_BprMax), which takes a third of the passes over the [b, m] scores that autograd
    through those operations takes."""
    return _BprMax.apply(scores, bpreg, elu_p)


class _BprMax(torch.autograd.Function):
    """BPR-max with its gradient in closed form. With r = ELU(scores), s_j the softmax weights
    over the negatives, σ_j = σ(t - r_j), A = Σ_j s_j σ_j and B = Σ_j s_j r_j² (per row):
    dA/dr_j = s_j (σ_j² - A), dB/dr_j = s_j (r_j² + 2 r_j - B), dA/dt = Σ_j s_j σ_j (1 - σ_j)
    = A - Σ_j s_j σ_j², and the loss is Σ_rows -log(A + 1e-24) + bpreg · B."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, bpreg: float, elu_p: float) -> Tensor:
        r = F.elu(scores, elu_p) if elu_p > 0 else scores.clone()  # [b, m]; r is ours to modify
        t = r.diagonal().clone()  # [b] the targets' scores
        r.diagonal().zero_()  # the reference's r * (1 - I): the shift below includes these zeros
        e = (r - r.amax(dim=1, keepdim=True)).exp_()
        e.diagonal().zero_()
        s = e.div_(e.sum(dim=1, keepdim=True))  # [b, m] softmax over the negatives
        r.diagonal().copy_(t)
        sig = torch.sigmoid(t.unsqueeze(1) - r)  # [b, m]
        s_sig = sig * s
        a = s_sig.sum(1)  # [b]
        b = (r.pow(2) * s).sum(1)  # [b]
        ctx.save_for_backward(r, s, sig, s_sig, a, b)
        ctx.bpreg, ctx.elu_p = bpreg, elu_p
        return torch.sum(-torch.log(a + _LOG_EPS) + bpreg * b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        r, s, sig, s_sig, a, b = ctx.saved_tensors
        d_a = (-grad / (a + _LOG_EPS)).unsqueeze(1)  # [b, 1] dL/dA
        d_b = grad * ctx.bpreg  # dL/dB
        g = s_sig * sig  # s σ²
        d_t = (a - g.sum(1)) * d_a.squeeze(1)  # [b]
        g.sub_(s * a.unsqueeze(1)).mul_(d_a)  # dL/dA · s (σ² - A)
        g.add_((r + 2.0).mul_(r).sub_(b.unsqueeze(1)).mul_(s).mul_(d_b))  # + dL/dB · s (r² + 2r - B)
        g.diagonal().add_(d_t)
        if ctx.elu_p > 0:
            g = torch.ops.aten.elu_backward(g, ctx.elu_p, 1, 1, True, r)
        return g, None, None


def cross_entropy_loss(scores: Tensor, logq_cols: Tensor | None = None,
                       logq: float = 0.0) -> Tensor:
    """The reference's cross-entropy, summed over rows: -log(softmax(r - logq · log Q)_target +
    1e-24), where log Q (Float[m], one per column) is the log sampling weight of each column."""
    if logq > 0 and logq_cols is not None:
        scores = scores - logq * logq_cols
    p = torch.softmax(scores, dim=1).diagonal()  # [b]
    return -torch.sum(torch.log(p + _LOG_EPS))


class PopularitySampleCache:
    """Negatives ~ pop^alpha, drawn in bulk: `cache_size // n_sample` rows of n_sample items are
    sampled at once (inverse CDF) and handed out one row per step, then redrawn."""

    def __init__(self, counts: Tensor, alpha: float, n_sample: int, cache_size: int) -> None:
        w = counts.double().clamp(min=0) ** alpha
        w[counts <= 0] = 0  # 0 ** 0 = 1: items never seen (and padding id 0) are never drawn
        cdf = torch.cumsum(w, 0) / w.sum()
        cdf[-1] = 1.0
        self.cdf = cdf.float()  # Float[n_items + 1]
        self.n_sample = n_sample
        self.rows = max(1, cache_size // max(n_sample, 1))
        self.cache = torch.zeros(0, n_sample, dtype=torch.long)  # on cdf's device once drawn
        self.pointer = 0

    def get(self) -> Tensor:
        """Long[n_sample]."""
        if self.pointer >= len(self.cache):
            u = torch.rand(self.rows * self.n_sample, device=self.cdf.device)
            self.cache = torch.searchsorted(self.cdf, u, right=True).clamp_(max=len(self.cdf) - 1)
            self.cache = self.cache.view(self.rows, self.n_sample)
            self.pointer = 0
        self.pointer += 1
        return self.cache[self.pointer - 1]


# ---- the network ------------------------------------------------------------------------------


def lookup(table: nn.Embedding, ids: Tensor) -> Tensor:
    """table(ids); when the table has sparse gradients, through _CoalescedRows."""
    if table.sparse and table.weight.requires_grad and torch.is_grad_enabled():
        return _CoalescedRows.apply(table.weight, ids)
    return table(ids)


class _CoalescedRows(torch.autograd.Function):
    """weight[ids] (as nn.Embedding(sparse=True)) with its sparse gradient already coalesced: one
    entry per distinct row, sorted, summed over the row's occurrences by embedding_bag. The
    optimizer's coalesce is then free; nn.Embedding hands over one entry per occurrence (here
    len(ids) = b + n_sample per step), which AdagradMomentum must sort and sum every step."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.n_rows = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (ids,) = ctx.saved_tensors
        sorted_ids, perm = torch.sort(ids, stable=True)
        rows, _, counts = torch.ops.aten.unique_consecutive(sorted_ids, False, True)
        values = torch.embedding_bag(grad, perm, counts.cumsum(0) - counts)[0]  # [rows, H] sums
        out = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (ctx.n_rows, *grad.shape[1:]),
                                      is_coalesced=True, check_invariants=False)
        # Autograd stores a sparse gradient it alone references as a new tensor around the same
        # indices and values, which drops the coalesced flag; one it does not alone reference it
        # clones, which keeps it: hold a reference until the gradient is stored.
        ctx.grad_ref = out
        return out, None


class OneHotGRUCell(nn.Module):
    """The reference's first layer when items are fed one-hot (no embedding): a GRU whose input
    weights are an item table W_x[n_items+1, 3H] (gates: candidate, reset, update);
    h' = (1 - z) h + z tanh(r · (h W_h)_c + x_c)."""

    def __init__(self, n_rows: int, hidden: int, sparse: bool) -> None:
        super().__init__()
        self.Wx = nn.Embedding(n_rows, 3 * hidden, sparse=sparse)
        self.Wh = nn.Parameter(torch.empty(hidden, 3 * hidden))
        self.bias = nn.Parameter(torch.zeros(3 * hidden))

    def forward(self, items: Tensor, h: Tensor) -> Tensor:
        vx_c, vx_r, vx_z = (self.Wx(items) + self.bias).chunk(3, 1)  # each [b, H]
        vh_c, vh_r, vh_z = (h @ self.Wh).chunk(3, 1)
        r = torch.sigmoid(vx_r + vh_r)
        z = torch.sigmoid(vx_z + vh_z)
        return (1.0 - z) * h + z * torch.tanh(r * vh_c + vx_c)


class GRU4RecNet(nn.Module):
    """Item input -> GRU layers -> scores against the output item table W_y (+ bias b_y)."""

    def __init__(self, n_items: int, layers: tuple[int, ...], embedding: int,
                 constrained_embedding: bool, dropout_p_embed: float, dropout_p_hidden: float,
                 sparse: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.n_items, self.layers = n_items, tuple(layers)
        n_rows = n_items + 1  # id 0 = padding, never trained
        self.mode = ("constrained" if constrained_embedding
                     else "embedding" if embedding else "onehot")
        if self.mode == "constrained":
            n_input = layers[-1]
        elif self.mode == "embedding":
            self.E = nn.Embedding(n_rows, embedding, sparse=sparse)
            n_input = embedding
        else:
            self.GE = OneHotGRUCell(n_rows, layers[0], sparse)
            n_input = layers[0]
        self.first = 1 if self.mode == "onehot" else 0  # layers[0] is GE in one-hot mode
        self.drop_embed = nn.Dropout(dropout_p_embed)
        self.G = nn.ModuleList(nn.GRUCell(layers[i - 1] if i > 0 else n_input, layers[i])
                               for i in range(self.first, len(layers)))
        self.drop_hidden = nn.Dropout(dropout_p_hidden)
        self.Wy = nn.Embedding(n_rows, layers[-1], sparse=sparse)
        self.By = nn.Embedding(n_rows, 1, sparse=sparse)
        self.reset_parameters(torch.Generator().manual_seed(seed))

    def reset_parameters(self, g: torch.Generator) -> None:
        def uniform_(w: Tensor, fan_in: int, fan_out: int) -> None:
            a = math.sqrt(6.0 / (fan_in + fan_out))
            w.copy_(torch.rand(w.shape, generator=g) * 2 * a - a)

        with torch.no_grad():
            if self.mode == "embedding":
                uniform_(self.E.weight, self.n_items, self.E.weight.shape[1])
            elif self.mode == "onehot":
                H = self.layers[0]
                uniform_(self.GE.Wx.weight, self.n_items, H)  # each of the 3 gate blocks
                uniform_(self.GE.Wh, H, H)
                self.GE.bias.zero_()
            for cell in self.G:
                H = cell.hidden_size
                uniform_(cell.weight_ih, cell.input_size, H)
                uniform_(cell.weight_hh, H, H)
                cell.bias_ih.zero_()
                cell.bias_hh.zero_()
            uniform_(self.Wy.weight, self.n_items, self.layers[-1])
            self.By.weight.zero_()

    def init_state(self, b: int) -> list[Tensor]:
        """Zero hidden state of every layer: [b, H_i] each."""
        return [torch.zeros(b, h, device=self.Wy.weight.device) for h in self.layers]

    def advance(self, items: Tensor, state: list[Tensor],
                x: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Read one item per row. items: Long[b]; state: [b, H_i] per layer. Returns the final
        layer's output Float[b, H_last] and the new state. Dropout acts in training mode only;
        as in the reference, the dropped-out outputs are also the carried state. x: the items'
        input rows when the caller looked them up (constrained mode: W_y[items])."""
        state = list(state)
        if x is not None:
            pass
        elif self.mode == "constrained":
            x = self.Wy(items)  # input weights = output weights
        elif self.mode == "embedding":
            x = self.E(items)
        else:
            x = self.GE(items, state[0])
        x = self.drop_embed(x)  # [b, n_input]
        if self.mode == "onehot":
            state[0] = x
        for i, cell in enumerate(self.G, start=self.first):
            x = self.drop_hidden(cell(x, state[i]))  # [b, H_i]
            state[i] = x
        return x, state

    def score_items(self, h: Tensor, items: Tensor | None = None) -> Tensor:
        """h: Float[b, H_last] -> scores Float[b, m] of items Long[m] (every item, i.e.
        m = n_items + 1 with column 0 = padding, when items is None)."""
        if items is None:
            return h @ self.Wy.weight.T + self.By.weight.squeeze(1)
        return h @ self.Wy(items).T + self.By(items).squeeze(1)

    def train_step(self, items: Tensor, state: list[Tensor], cols: Tensor) -> tuple[Tensor, list[Tensor]]:
        """One training step: read items Long[b], score items cols Long[m] -> (scores Float[b, m],
        new state); what `advance` then `score_items(h, cols)` give, with the item tables read
        through `lookup` (in constrained mode W_y[items] and W_y[cols] in one lookup, so that W_y
        gets one already-summed sparse gradient, as the reference's single W_y(cat(X, Y)))."""
        x = None
        if self.mode == "constrained":
            x, w = lookup(self.Wy, torch.cat([items, cols])).split([len(items), len(cols)])
        else:
            w = lookup(self.Wy, cols)
        h, state = self.advance(items, state, x=x)
        return h @ w.T + lookup(self.By, cols).squeeze(1), state

    def run(self, items: Tensor) -> Tensor:
        """Final-layer output after each item of padded sessions: items Long[B, T] ->
        Float[B, T, H_last] (step t has read items 0..t; steps on padding are never used)."""
        state = self.init_state(items.shape[0])
        outs = []
        for t in range(items.shape[1]):
            h, state = self.advance(items[:, t], state)
            outs.append(h)
        if not outs:
            return self.Wy.weight.new_zeros(items.shape[0], 0, self.layers[-1])
        return torch.stack(outs, 1)


# ---- the estimator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GRU4RecConfig:
    """Hyper-parameters of GRU4Rec (section [model]); names and defaults are the reference's.
    Learning rate, momentum and epochs are [train] settings (train.lr, train.momentum,
    train.epochs with train.optimizer = "adagrad")."""

    layers: tuple[int, ...] = (100,)  # GRU layer sizes, e.g. --set model.layers=100,100
    loss: str = field(default="cross-entropy", metadata=choices("cross-entropy", "bpr-max"))
    batch_size: int = field(default=64, metadata=rng(1, 100_000, "session-parallel slots"))
    dropout_p_embed: float = field(default=0.0, metadata=rng(0.0, 0.99, "on the item input"))
    dropout_p_hidden: float = field(default=0.0, metadata=rng(0.0, 0.99, "on GRU outputs"))
    n_sample: int = field(default=2048, metadata=rng(
        0, 1_000_000, "extra popularity-sampled negatives; 0 = in-batch only"))
    sample_alpha: float = field(default=0.5, metadata=rng(0.0, 1.0, "negatives ~ count^alpha"))
    sample_cache_size: int = field(default=10_000_000, metadata=rng(
        1, 10**9, "negative item ids drawn at once"))
    embedding: int = field(default=0, metadata=rng(
        0, 100_000, "item embedding size; 0 = one-hot input"))
    constrained_embedding: bool = True  # input embedding = output weights W_y (overrides embedding)
    bpreg: float = field(default=1.0, metadata=rng(0.0, 100.0, "bpr-max score regulariser"))
    elu_p: float = field(default=0.5, metadata=rng(0.0, 100.0, "bpr-max final ELU alpha; 0 = off"))
    logq: float = field(default=0.0, metadata=rng(0.0, 10.0, "cross-entropy log-Q weight"))
    session_order: str = field(default="time", metadata=choices(
        "time", "id", doc="training order of sessions: by start time (reference) or dataset id"))
    train_on: str = field(default="train", metadata=choices(
        "train", "train+valid", doc="train+valid: fit on both, no validation (final test runs)"))

    def __post_init__(self) -> None:
        from hnvm.errors import ConfigError

        layers = self.layers
        if isinstance(layers, int):  # `--set model.layers=100` arrives as an int
            layers = (layers,)
        if not isinstance(layers, tuple | list) or not layers or any(
                not isinstance(h, int) or h < 1 for h in layers):
            raise ConfigError(f"model.layers = {self.layers!r}: need one or more sizes >= 1")
        object.__setattr__(self, "layers", tuple(layers))


@register("gru4rec")
class GRU4Rec(NetPersistence):
    """GRU4Rec as a Recommender: `GRU4Rec(GRU4RecConfig(...)).fit(dataset, train_cfg=...)`."""

    name = "gru4rec"
    config_class = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or GRU4RecConfig(), **overrides)
        self.net: GRU4RecNet | None = None
        self.n_items = 0
        self.result_: Any = None

    def _build(self, n_items: int, sparse: bool = False, seed: int = 0) -> GRU4RecNet:
        c = self.config
        self.n_items = n_items
        return GRU4RecNet(n_items, c.layers, c.embedding,
                          c.constrained_embedding, c.dropout_p_embed, c.dropout_p_hidden,
                          sparse=sparse, seed=seed)

    def fit(self, train: Dataset, valid: Dataset | None = None, *,
            train_cfg: TrainConfig | None = None, run_dir: Path | None = None,
            resume: bool = False, show_progress: bool = False, **_: Any) -> GRU4Rec:
        from hnvm.data.batches import Sequences
        from hnvm.evaluate import evaluate_next_item
        from hnvm.train import Trainer

        cfg = train_cfg or TrainConfig()
        seq = Sequences.from_events(train.events, train.n_users)
        splits = ("train", "valid") if self.config.train_on == "train+valid" else ("train",)
        # sparse item-table gradients make Adagrad update only the rows a step used (reference);
        # Adam and gradient clipping need dense ones
        sparse = cfg.optimizer == "adagrad" and not cfg.grad_clip
        self.net = self._build(train.n_items, sparse=sparse, seed=cfg.seed)
        in_fit = pl.col("split").cast(pl.Utf8).is_in(splits)
        fit_items = train.events.filter(in_fit).get_column("item")
        counts = torch.from_numpy(np.bincount(fit_items.to_numpy(), minlength=train.n_items + 1)
                                  .astype(np.float32))
        order = training_order(seq, train.events, splits, self.config.session_order)
        trainable = _GRU4RecTrainable(self, seq, order, counts)

        def validate() -> dict[str, float]:
            return evaluate_next_item(self, seq, "valid", max_targets=1024).metrics

        has_valid = (valid is not None and "valid" not in splits
                     and len(seq.sessions_of("valid")) > 0)
        self.result_ = Trainer(cfg, run_dir, show_progress=show_progress, resume=resume).fit(
            trainable, validate if has_valid else None)
        self.net.eval()
        return self

    # -- scoring: the session prefix only ----------------------------------------------------------
    def _require(self) -> GRU4RecNet:
        if self.net is None:
            raise RuntimeError("fit or load the model first")
        self.net.eval()
        return self.net

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        net = self._require()
        current = batch.sessions[:, -1]  # [B, T]: history sessions are ignored (session-based)
        outs = net.run(current)  # [B, T, H]
        h = outs.new_zeros(batch.n_targets, net.layers[-1])  # [K, H]; empty prefix: zero state
        has_prefix = batch.target_pos > 0
        h[has_prefix] = outs[batch.target_rows[has_prefix], batch.target_pos[has_prefix] - 1]
        return net.score_items(h)  # [K, n_items + 1]

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        """No current session: the prefix is the user's last history session (zero state when the
        user has none)."""
        net = self._require()
        last = batch.sessions[:, -1]  # [B, T]
        lengths = (last > 0).sum(1)  # [B]
        outs = net.run(last)  # [B, T, H]
        h = outs.new_zeros(len(last), net.layers[-1])  # [B, H]
        rows = torch.nonzero(lengths > 0).squeeze(1)
        h[rows] = outs[rows, lengths[rows] - 1]
        return net.score_items(h)

    # -- persistence ------------------------------------------------------------------------------


class _GRU4RecTrainable:
    """What the generic Trainer needs: session-parallel steps and the reference's losses. The
    hidden state is carried from step to step here (detached: one-step backpropagation)."""

    def __init__(self, model: GRU4Rec, seq: Sequences, order: np.ndarray, counts: Tensor) -> None:
        assert model.net is not None
        self.module: GRU4RecNet = model.net
        self.cfg = model.config
        self.seq, self.order = seq, order
        self.state: list[Tensor] | None = None
        c = self.cfg
        self.sampler = None
        if c.n_sample > 0:
            self.sampler = PopularitySampleCache(counts, c.sample_alpha, c.n_sample,
                                                 c.sample_cache_size)
        # log Q of each column for the CE log-Q correction: in-batch targets are drawn from the
        # data (count), extra negatives from count^alpha (unnormalised, as the reference)
        self.log_count = counts.clamp(min=1e-12).log()  # Float[n_items + 1]

    def to(self, device: torch.device) -> None:
        self.log_count = self.log_count.to(device)
        if self.sampler is not None:
            self.sampler.cdf = self.sampler.cdf.to(device)

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Iterator[ParallelStep]:
        self.state = None  # every epoch starts from zero states
        # session-parallel steps carry state from step to step, so a rank takes every
        # world_size-th session and runs its own slots (the ranks' step counts differ by a few;
        # the Trainer stops every rank at the first one's end)
        order = self.order if world_size <= 1 else self.order[rank::world_size]
        steps = session_parallel_steps(self.seq.items, self.seq.offsets, order,
                                       self.cfg.batch_size)
        for step in steps:
            if self.cfg.n_sample == 0 and len(step.inputs) < 2:
                return  # no negatives left (the reference stops the epoch here too)
            yield step

    def batch_targets(self, batch: ParallelStep) -> int:
        return len(batch.targets)

    def loss(self, batch: ParallelStep, step: int) -> dict[str, Tensor]:
        net, c = self.module, self.cfg
        b = len(batch.inputs)
        state = self.state or net.init_state(b)
        state = [h.detach() for h in state]
        if batch.keep is not None:
            state = [h[batch.keep] for h in state]
        if batch.reset is not None:
            state = [h.masked_fill(batch.reset.unsqueeze(1), 0.0) for h in state]
        cols = batch.targets  # [m] targets of every slot, then the extra negatives
        if self.sampler is not None:
            cols = torch.cat([batch.targets, self.sampler.get()])
        scores, self.state = net.train_step(batch.inputs, state, cols)  # [b, m]; column k < b: row k's target
        if c.loss == "bpr-max":
            total = bpr_max_loss(scores, c.bpreg, c.elu_p)
        else:
            logq_cols = None
            if c.logq > 0:
                logq_cols = self.log_count.index_select(0, cols)
                logq_cols[b:] *= c.sample_alpha
            total = cross_entropy_loss(scores, logq_cols, c.logq)
        return {"loss": total / c.batch_size}  # the reference divides by the nominal batch size
