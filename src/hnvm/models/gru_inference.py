"""Inference-only ways to run HNVM's GRUs with less work and the same floats.

Evaluation encodes every user's history before it scores anything (docs/design.md, "What bounds
evaluation"); two costs of that encoding are not the GRUs' own, and scoring runs more than it reads
(`prior_states`: the decoder alone over the scored sessions):

* the encoder's input gates ``W_ih x + b_ih`` are computed per history *event*, though they
  depend on the item only: `InputGates` computes them once per item (a table, [n_items + 1, 3H])
  and reuses them while the weights stay the same, and `gru_last_states` runs the recurrence
  from gathered rows of it;
* the context GRU runs over every session slot of a batch, padding included (a batch's slots
  are as many as its longest history): `context_after` runs it over the rows whose slot holds a
  session, and computes the input half of each cell for all sessions at once.

The first two compute what torch's CPU GRU computes, operation for operation
(aten/src/ATen/native/RNN.cpp, ``GRUCell`` with pre-computed input gates), so the floats are the
ones of ``nn.GRU`` / ``nn.GRUCell`` provided each row's products do not depend on the other rows
of the call. They do not with MKL's AVX2/AVX512 kernels for calls of at least `MIN_ROWS` rows (a
GEMM of fewer rows takes other kernels, whose last bits differ), and element-wise operations do
not while a call stays within one thread's grain (torch splits larger ones between threads
mid-row). The callers take these ways only where both hold and fall back to the modules
otherwise. The third makes the decoder call forward makes, on the same inputs. The same floats
either way: tested (tests/test_gru_inference.py), compared batch by batch
(benchmarks/hnvm_inference.py) and checked on the exported ranks (benchmarks/fingerprint.py).

`ItemTable`, the cache behind the input-gate table, also keeps STAMP's attention input per item
(hnvm.models.stamp), under the same conditions (`applies`, `MIN_ROWS`) and at widths of at least
`MIN_WIDTH`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from hnvm.models.hnvm_net import HNVMNet

MIN_ROWS = 16  # GEMMs of fewer rows may take kernels whose last bits differ (here 1-3, 5-7, 9-11 rows, K = 200)
# and narrower ones, at any row count: square products of width 5-7 or 9-11 gave a row other bits
# by its place in the call (MKL, AVX512 and AVX2, one and two threads; widths 12-300 did not)
MIN_WIDTH = 16
GRAIN = 32768  # torch's element-wise grain (at::internal::GRAIN_SIZE): larger ops are split between threads
_MEASURED = ("AVX2", "AVX512")  # the CPU kernels (with MKL) whose row independence the tests measure


def applies(x: Tensor) -> bool:
    """Whether these exact ways apply to a computation on x: inference (no autograd), CPU with
    torch's AVX2/AVX512 kernels and MKL (elsewhere, e.g. oneDNN/ACL on aarch64, a row's GEMM
    result may depend on the call's row count), float32, no autocast. On GPUs the fused cuDNN GRU
    is faster than a loop of steps."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkl.is_available()
            and torch.backends.cpu.get_cpu_capability() in _MEASURED)


def gru_cell(gates_in: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """One step of torch's CPU GRU cell from pre-computed input gates, operation for operation:
    gates_in Float[n, 3H] (W_ih x + b_ih, gates r, z, n), h Float[n, H] -> Float[n, H].
    The sigmoids run on [n, H] column chunks of [n, 3H] products, i.e. row by row, as torch's
    do: a vectorised sigmoid's tail differs from its body, so on a contiguous tensor a value's
    bits would depend on its position."""
    i_r, i_z, i_n = gates_in.unsafe_chunk(3, 1)
    h_r, h_z, h_n = torch.addmm(b_hh, h, w_hh.t()).unsafe_chunk(3, 1)
    r = h_r.add_(i_r).sigmoid_()
    z = h_z.add_(i_z).sigmoid_()
    n = i_n.add(h_n.mul_(r)).tanh_()
    return (h - n).mul_(z).add_(n)


class ItemTable:
    """A product of an item embedding's whole table, kept between calls: built by the caller's
    `build` from the weights `tensors` and reused while they are the same tensors, at the same
    addresses, with the same version counters. torch's in-place operations bump the counters,
    hnvm's compiled optimizer loops bump them too, and the models drop their tables when they
    switch to training mode. A write through ``.data`` or numpy, or a fused optimizer's step
    (``torch.optim.Adam(fused=True)`` on the CPU), does not bump them: after one, outside
    training mode, call `clear`. Thread-safe: one build at a time. A copy (``copy.deepcopy``,
    pickling) starts empty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (the weights it was built from, held so their addresses are not reused; their
        # addresses and versions; the table)
        self._built: tuple[tuple[Tensor, ...], tuple[int, ...], Tensor] | None = None

    def clear(self) -> None:
        """Drop the table: the next `get` builds it again (or declines)."""
        with self._lock:
            self._built = None

    def __getstate__(self) -> dict[str, object]:
        return {}  # a lock does not copy, and a table is rebuilt from the copy's own weights

    def __setstate__(self, state: dict[str, object]) -> None:
        self._lock = threading.Lock()
        self._built = None

    def get(self, tensors: tuple[Tensor, ...], build: Callable[[], Tensor], worth_building: bool) -> Tensor | None:
        """The table built from `tensors` (their first is the item embedding's weight, one row per
        item), or None where it is not built for these weights and `worth_building` is False (the
        caller's direct products would cost less), where the table's own product would be a small
        call (under `MIN_ROWS` items) or where a weight is an inference tensor (no version
        counter)."""
        if len(tensors[0]) < MIN_ROWS or any(t.is_inference() for t in tensors):
            return None
        key = tuple(v for t in tensors for v in (t.data_ptr(), t._version))
        with self._lock:
            built = self._built
            if built is not None and all(a is b for a, b in zip(built[0], tensors, strict=True)) and built[1] == key:
                return built[2]
            self._built = None
            if not worth_building:
                return None
            table = build()
            self._built = (tensors, key, table)
            return table


class InputGates(ItemTable):
    """The input gates of a one-layer GRU over an item embedding, per item: a table
    Float[n_items + 1, 3H] equal row for row to what the GRU computes per event where its input
    is a non-contiguous [t, n, E] view (``linear_ih`` folded into one matmul, then the bias
    added; `uses_table` says where); kept as `ItemTable` keeps it."""

    def table(self, emb: nn.Embedding, gru: nn.GRU, events: int) -> Tensor | None:
        """The table, or None where building it would cost more than computing the gates of
        `events` events directly and it is not already built for these weights, or where
        `ItemTable.get` declines."""
        w, b = gru.weight_ih_l0, gru.bias_ih_l0
        return self.get((emb.weight, w, b), lambda: torch.matmul(emb.weight, w.t()).add_(b),  # [n_items + 1, 3H]
                        worth_building=emb.num_embeddings <= events)


def uses_table(gru: nn.GRU, items: Tensor) -> bool:
    """Whether the GRU's own input gates for items Long[n, t] are the table's rows: its
    time-major input [t, n, E] is then a non-contiguous view that ``linear`` folds into one
    matmul of t * n rows (>= `MIN_ROWS`) before adding the bias. Not for t = 1 or n = 1 (a
    contiguous view: one addmm with the bias inside the sum, other bits once E exceeds the
    BLAS's K block) nor for frozen input weights (then matmul does not fold but runs a batched
    product per time step)."""
    n, t = items.shape
    return n > 1 and t > 1 and n * t >= MIN_ROWS and gru.weight_ih_l0.requires_grad


def gru_last_states(table: Tensor, gru: nn.GRU, seqs: Tensor, lengths: Tensor) -> Tensor:
    """State after each row's last real item, as ``gru(emb(seqs))[0][arange(n), lengths - 1]``
    computes it: table Float[n_items + 1, 3H] (`InputGates`), seqs Long[n, t] right-padded,
    lengths Long[n] in 1..t -> Float[n, H]."""
    n, t = seqs.shape
    gates = table[seqs.t()]  # [t, n, 3H], time-major as the GRU's own pre-computed input
    h = gates.new_zeros(n, gru.hidden_size)
    states = []
    for s in range(t):
        h = gru_cell(gates[s], h, gru.weight_hh_l0, gru.bias_hh_l0)
        states.append(h)
    return torch.stack(states)[lengths - 1, torch.arange(n, device=seqs.device)]  # [n, H]


def context_after(cell: nn.GRUCell, h_enc: Tensor, session_mask: Tensor, h0: Tensor | None) -> Tensor | None:
    """The context state after every session, as stepping `cell` over all W slots with
    ``where(session_mask[:, w], cell(h_enc[:, w], h), h)`` computes it, but only over the rows
    whose slot w holds a session: h_enc Float[B, W, H], session_mask Bool[B, W], h0 Float[B, H]
    or None (zeros) -> Float[B, H]. None where this way does not apply (training, not `applies`)
    or its exact conditions do not hold (fewer than `MIN_ROWS` rows or sessions, or a step
    larger than one thread's grain): the caller steps the cell itself."""
    B, W, H = h_enc.shape
    if cell.training or not applies(h_enc) or B < MIN_ROWS or B * cell.hidden_size > GRAIN:
        return None
    real = session_mask.reshape(-1).nonzero().squeeze(1)  # [N] flat slots holding a session
    if len(real) < MIN_ROWS:
        return None
    gates = torch.addmm(cell.bias_ih, h_enc.reshape(B * W, H)[real], cell.weight_ih.t())  # [N, 3H]
    where = torch.full((B * W,), -1, dtype=torch.long, device=h_enc.device)
    where[real] = torch.arange(len(real), device=h_enc.device)  # slot -> row of gates
    h = h_enc.new_zeros(B, cell.hidden_size) if h0 is None else h0.clone()
    for w in range(W):
        rows = session_mask[:, w].nonzero().squeeze(1)  # [k]
        k = len(rows)
        if k == 0:
            continue
        run = rows.repeat(-(-MIN_ROWS // k))[:MIN_ROWS] if k < MIN_ROWS else rows  # repeats fill a small call
        new = gru_cell(gates[where[run * W + w]], h[run], cell.weight_hh, cell.bias_hh)
        h.index_copy_(0, rows, new[:k])
    return h


def prior_states(net: HNVMNet, users: Tensor, items: Tensor, h_con0: Tensor,
                 mc_samples: int = 1) -> tuple[Tensor, Tensor] | None:
    """The decoder states of `net.forward(users, items[:, None], h_con0, sample=False).states`
    (z at the prior mean, eq. 12) without what forward also computes and scoring does not read:
    the encoder's pass over the scored sessions, their posterior and KL terms, the context after
    them. users Long[B], items Long[B, T] right-padded, h_con0 Float[B, H] -> (states
    Float[sum(lengths), H] row by row, lengths Long[B]); the same floats (the same decoder call
    on the same inputs). None with mc_samples > 1 (forward averages prior draws), where a row
    has no item (forward skips it) or a session is not right-padded."""
    lengths = (items > 0).sum(-1)  # [B]
    right_padded = torch.equal(items > 0, torch.arange(items.shape[1], device=items.device) < lengths[:, None])
    if mc_samples > 1 or not right_padded or not bool((lengths > 0).all()):
        return None  # (forward raises on a session that is not right-padded)
    cond = net.session_condition(h_con0, net.general_preference(users))  # [B, C]
    return net.drop(net._decode_valid(items[:, : int(lengths.max())], lengths, cond)), lengths
