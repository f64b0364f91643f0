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

Both compute what torch's CPU GRU computes, operation for operation (aten/src/ATen/native/RNN.cpp,
``GRUCell`` with pre-computed input gates), so the floats are the ones of ``nn.GRU`` /
``nn.GRUCell`` provided each row's products do not depend on the other rows of the call. They
do not on the CPU BLAS for calls of at least `MIN_ROWS` rows (a GEMM of fewer rows takes other
kernels, whose last bits differ), and element-wise operations do not while a call stays within
one thread's grain (torch splits larger ones between threads mid-row). The callers take these
ways only where both hold and fall back to the modules otherwise: the same floats either way,
tested (tests/test_gru_inference.py) and checked on the exported ranks
(benchmarks/fingerprint.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from hnvm.models.hnvm_net import HNVMNet

MIN_ROWS = 16  # GEMMs of fewer rows may take kernels whose last bits differ (measured: 1-3, 5-7, 9-11)
GRAIN = 32768  # torch's element-wise grain (at::internal::GRAIN_SIZE): larger ops are split between threads


def applies(x: Tensor) -> bool:
    """Whether these exact ways apply to a computation on x: inference (no autograd), CPU,
    float32, no autocast. On GPUs the fused cuDNN GRU is faster than a loop of steps."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def gru_cell(gates_in: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """One step of torch's CPU GRU cell from pre-computed input gates, operation for operation:
    gates_in Float[n, 3H] (W_ih x + b_ih, gates r, z, n), h Float[n, H] -> Float[n, H]."""
    i_r, i_z, i_n = gates_in.unsafe_chunk(3, 1)
    h_r, h_z, h_n = torch.addmm(b_hh, h, w_hh.t()).unsafe_chunk(3, 1)
    r = h_r.add_(i_r).sigmoid_()
    z = h_z.add_(i_z).sigmoid_()
    n = i_n.add(h_n.mul_(r)).tanh_()
    return (h - n).mul_(z).add_(n)


class InputGates:
    """The input gates of a one-layer GRU over an item embedding, per item: a table
    Float[n_items + 1, 3H] equal row for row to what the GRU computes per event (``linear_ih``:
    a matmul, then the bias added), kept until a weight changes (the tensors' version counters:
    an optimizer step or a `load_state_dict` changes them in place)."""

    def __init__(self) -> None:
        self._of: tuple[Tensor, ...] = ()  # the weights the table was built from, held (so never reused)
        self._versions: tuple[int, ...] = ()
        self._table: Tensor | None = None

    def table(self, emb: nn.Embedding, gru: nn.GRU, events: int) -> Tensor | None:
        """The table, or None where building it would cost more than computing the gates of
        `events` events directly and it is not already built for these weights."""
        tensors = (emb.weight, gru.weight_ih_l0, gru.bias_ih_l0)
        versions = tuple(t._version for t in tensors)
        same = len(self._of) == 3 and all(a is b for a, b in zip(self._of, tensors, strict=True))
        if not same or versions != self._versions:
            self._of, self._versions, self._table = (), (), None
            if emb.num_embeddings > events:
                return None
            table = torch.matmul(emb.weight, gru.weight_ih_l0.t())  # [n_items + 1, 3H]
            self._of, self._versions, self._table = tensors, versions, table.add_(gru.bias_ih_l0)
        return self._table


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
    if cell.training or not applies(h_enc) or B < MIN_ROWS or B * H > GRAIN:
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
    on the same inputs). None with mc_samples > 1 (forward averages prior draws) or where a row
    has no item (forward skips it)."""
    lengths = (items > 0).sum(-1)  # [B]
    if mc_samples > 1 or not bool((lengths > 0).all()):
        return None
    cond = net.session_condition(h_con0, net.general_preference(users))  # [B, C]
    return net.drop(net._decode_valid(items[:, : int(lengths.max())], lengths, cond)), lengths
