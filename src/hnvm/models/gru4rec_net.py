"""GRU4Rec's pieces (the estimator is `hnvm.models.gru4rec`): session-parallel mini-batches,
the reference's in-batch losses (scores R: Float[b, b + n_sample], column k < b is row k's
target), popularity-sampled extra negatives and the network with its three item-input modes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.data.batches import SPLIT_CODE, Sequences

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
    ev = events.select("session", "ts")
    ids = ev.get_column("session").to_numpy().astype(np.int64)
    start = np.full(int(ids.max(initial=-1)) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(start, ids, ev.get_column("ts").to_numpy().astype(np.int64))
    if seq.session_ids is not None:  # a view (`Sequences.view`): its sessions' dataset ids
        start = start[seq.session_ids]
    lengths = np.diff(seq.offsets)
    keep = np.isin(seq.session_split, [SPLIT_CODE[s] for s in splits]) & (lengths >= 2)
    sessions = np.flatnonzero(keep)
    if by == "id":
        return sessions
    return sessions[np.argsort(start[sessions], kind="stable")]


# ---- losses (scores R: Float[b, b + n_sample], column k < b is row k's target) ----------------


def in_batch_bpr_max_loss(scores: Tensor, bpreg: float, elu_p: float) -> Tensor:
    """The reference's BPR-max, summed over rows: the final activation ELU(·, elu_p) (off at 0)
    is applied to every score; s = softmax over the row without its diagonal (the target);
    loss = -log(Σ_j s_j σ(r_target - r_j) + 1e-24) + bpreg · Σ_j s_j r_j².

    The value is computed with the reference's operations (bit for bit); the gradient is the
    closed form (_BprMax), which takes a third of the passes over the [b, m] scores that autograd
    through those operations takes (on the CPU one compiled pass after two torch operations,
    hnvm.models.loss_kernels: the same floats)."""
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
        sig = torch.sub(t.unsqueeze(1), r).sigmoid_()  # [b, m]
        s_sig = sig * s
        a = s_sig.sum(1)  # [b]
        b = r.pow(2).mul_(s).sum(1)  # [b]  (in place: one [b, m] temporary less, the same floats)
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
        from hnvm.models.loss_kernels import bpr_max_gradient  # (imports numba: not at start-up)

        # on the CPU in one compiled pass, the same floats as the operations below
        if bpr_max_gradient(g, r, s, a, b, d_a.view(-1), d_b, d_t, ctx.elu_p):
            return g, None, None
        g.sub_(s * a.unsqueeze(1)).mul_(d_a)  # dL/dA · s (σ² - A)
        g.add_((r + 2.0).mul_(r).sub_(b.unsqueeze(1)).mul_(s).mul_(d_b))  # + dL/dB · s (r² + 2r - B)
        g.diagonal().add_(d_t)
        if ctx.elu_p > 0:
            g = torch.ops.aten.elu_backward(g, ctx.elu_p, 1, 1, True, r)
        return g, None, None


def in_batch_bpr_loss(scores: Tensor) -> Tensor:
    """Plain BPR (Rendle et al. 2009), the loss the HNVM paper trains every GRU model with
    (§4.3): per row, the mean over its negatives j (every column but the row's target) of
    -log σ(r_target - r_j), summed over rows. Scores are used raw (no final activation)."""
    m = scores.shape[1]
    t = scores.diagonal().unsqueeze(1)  # [b, 1]
    pair = -F.logsigmoid(t - scores)  # [b, m]; the diagonal is log 2, removed below
    return (pair.sum() - pair.diagonal().sum()) / max(m - 1, 1)


def in_batch_cross_entropy_loss(scores: Tensor, logq_cols: Tensor | None = None,
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


def stable_sort(ids: Tensor) -> tuple[Tensor, Tensor]:
    """torch.sort(ids, stable=True) of non-negative ids Long[n]: (sorted ids, their positions).
    On the CPU as one numpy sort of the keys id · 2^b + position (2^b ≥ n > every position, so
    the keys are distinct and any sort is stable): several times faster than torch's stable sort
    for the few thousand ids of a training step. Other devices, negative ids, or ids too large
    for 62-bit keys take torch.sort."""
    n = len(ids)
    shift = max(n - 1, 1).bit_length()
    if ids.device.type != "cpu" or ids.dtype != torch.long or n == 0:
        return torch.sort(ids, stable=True)
    low, high = torch.aminmax(ids)
    if int(low) < 0 or int(high) >= 1 << (62 - shift):
        return torch.sort(ids, stable=True)
    keys = ids.numpy() << shift
    keys |= np.arange(n)
    keys.sort()
    return torch.from_numpy(keys >> shift), torch.from_numpy(keys & ((1 << shift) - 1))


class _CoalescedRows(torch.autograd.Function):
    """weight[ids] (as nn.Embedding(sparse=True)) with its sparse gradient already coalesced: one
    entry per distinct row, sorted, summed over the row's occurrences in position order (on the
    CPU in a compiled counting sort, `hnvm.training.sparse_kernels.coalesce_rows`; else a stable
    sort and embedding_bag, the same sums). The optimizer's coalesce is then free; nn.Embedding
    hands over one entry per occurrence (here len(ids) = b + n_sample per step), which
    AdagradMomentum must sort and sum every step."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.n_rows = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (ids,) = ctx.saved_tensors
        from hnvm.training.sparse_kernels import coalesce_rows  # (imports numba: not at start-up)

        summed = coalesce_rows(ids, grad, ctx.n_rows)  # on the CPU: a compiled loop, the same sums
        if summed is None:
            sorted_ids, perm = stable_sort(ids)
            rows, _, counts = torch.ops.aten.unique_consecutive(sorted_ids, False, True)
            summed = rows, torch.embedding_bag(grad, perm, counts.cumsum(0) - counts)[0]  # [rows, H] sums
        rows, values = summed
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
        if x is None:  # else the caller looked the rows up
            if self.mode == "constrained":
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
            # (the bias added in place: the same floats, one [b, m] temporary fewer)
            return (h @ self.Wy.weight.T).add_(self.By.weight.squeeze(1))
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
