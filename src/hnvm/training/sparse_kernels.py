"""Sparse item-table gradients on the CPU in compiled loops (numba), each in place of about a
dozen torch operations, most of them over a [rows, H] temporary (a training step of a small
network is mostly per-operation cost):

* `coalesce_rows`: a lookup's gradient summed per distinct row (GRU4Rec's `_CoalescedRows`),
  by a counting sort of the ids instead of a sort, `unique_consecutive` and `embedding_bag`;
* `adagrad_momentum_rows`: AdagradMomentum's update of those rows (hnvm.training.optim), in
  two passes around torch's square root.

`benchmarks/sparse_kernels.py` times GRU4Rec's steps both ways, alternating in one run, and
checks that each way alone ends with the same weights.

Both give the floats of the torch operations they replace, bit for bit (tested against them):
sums run in the same order and each operation rounds as torch's CPU kernel rounds it, fused
multiply-adds included (`hnvm.compiled.fma`; torch's AVX2 and AVX512 kernels fuse them, its
scalar ones do not: elsewhere the update takes the torch operations); the square root is
torch's own (`Tensor.sqrt_`: MKL's on x86 builds, which is not the correctly rounded one).
Importing this module imports numba: the optimizer and the lookup import it on first use."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hnvm.compiled import compiled, fma, torch_kernels_checked


@compiled
def _coalesce(ids: np.ndarray, grad: np.ndarray, n_rows: int, rows: np.ndarray, out: np.ndarray) -> int:
    """The distinct ids ascending into rows[:u] and, in out[:u], each one's sum of grad's rows,
    0 + g_1 + g_2 ... in the order of the ids' positions (a stable counting sort); returns u."""
    n = ids.shape[0]
    start = np.zeros(n_rows + 1, dtype=np.int64)
    for i in range(n):
        start[ids[i] + 1] += 1
    for r in range(n_rows):
        start[r + 1] += start[r]
    order = np.empty(n, dtype=np.int64)
    for i in range(n):  # positions ascending within each id
        order[start[ids[i]]] = i
        start[ids[i]] += 1
    u = 0
    for p in range(n):
        i = order[p]
        if u == 0 or rows[u - 1] != ids[i]:
            rows[u] = ids[i]
            out[u, :] = 0.0
            u += 1
        for j in range(grad.shape[1]):
            out[u - 1, j] += grad[i, j]
    return u


def coalesce_rows(ids: Tensor, grad: Tensor, n_rows: int) -> tuple[Tensor, Tensor] | None:
    """The gradient of weight[ids] summed per distinct row: (rows Long[u] ascending, sums
    Float[u, H]), each row's sum over its occurrences in the order of their positions, as
    torch.sort(ids, stable=True), unique_consecutive and embedding_bag give them. ids: Long[n]
    in [0, n_rows); grad: Float[n, H]. None where the loop does not apply (not on the CPU, not
    int64 and float32, or a table much larger than the lookup, where the counting sort's
    O(n_rows) would cost more than a sort): the caller then takes the torch operations.
    ValueError: an id outside [0, n_rows), or ids and grad of other shapes."""
    n = len(ids)
    if (ids.device.type != "cpu" or grad.device.type != "cpu" or ids.dtype != torch.long
            or grad.dtype != torch.float32 or grad.dim() != 2 or n_rows > 32 * n + 4096):
        return None
    if ids.dim() != 1 or grad.shape[0] != n:
        raise ValueError(f"coalesce_rows: ids {tuple(ids.shape)} and gradient {tuple(grad.shape)} do not match")
    low, high = torch.aminmax(ids) if n else (0, 0)
    if int(low) < 0 or int(high) >= n_rows:
        raise ValueError(f"coalesce_rows: ids must lie in [0, {n_rows})")
    rows = torch.empty(n, dtype=torch.long)
    out = torch.empty(n, grad.shape[1], dtype=torch.float32)
    u = _coalesce(ids.contiguous().numpy(), grad.detach().contiguous().numpy(), n_rows, rows.numpy(), out.numpy())
    return rows[:u], out[:u]


@compiled
def _accumulate(acc: np.ndarray, idx: np.ndarray, val: np.ndarray, eps: float, out: np.ndarray) -> None:
    """acc[idx] += val² (torch's addcmul_: one fused multiply-add), out = acc[idx] + eps."""
    e = np.float32(eps)
    for i in range(idx.shape[0]):
        r = idx[i]
        for j in range(acc.shape[1]):
            a = fma(val[i, j], val[i, j], acc[r, j])
            acc[r, j] = a
            out[i, j] = a + e


@compiled
def _descend(p: np.ndarray, velocity: np.ndarray, idx: np.ndarray, step: np.ndarray, lr: float,
             momentum: float) -> None:
    """v[idx] = momentum · v[idx] - lr · step and p[idx] += v[idx] (momentum > 0), else
    p[idx] -= lr · step; each `- lr · x` as torch's add(x, alpha=-lr): one fused multiply-add."""
    neg_lr, mom = np.float32(-lr), np.float32(momentum)
    for i in range(idx.shape[0]):
        r = idx[i]
        if momentum:
            for j in range(p.shape[1]):
                v = fma(step[i, j], neg_lr, velocity[r, j] * mom)
                velocity[r, j] = v
                p[r, j] = p[r, j] + v
        else:
            for j in range(p.shape[1]):
                p[r, j] = fma(step[i, j], neg_lr, p[r, j])


def adagrad_momentum_rows(p: Tensor, acc: Tensor, velocity: Tensor | None, idx: Tensor, val: Tensor,
                          lr: float, momentum: float, eps: float) -> bool:
    """AdagradMomentum's update (hnvm.training.optim) of the rows idx (Long[u], distinct) of
    p (Float[n, H]) with their gradient val (Float[u, H]): acc[idx] += val²; step = val /
    sqrt(acc[idx] + eps); then with momentum v[idx] = momentum · v[idx] - lr · step, p[idx] +=
    v[idx], else p[idx] -= lr · step. p, acc and velocity (Float[n, H]; None without momentum)
    are updated in place. Returns False, touching nothing, where the loop does not apply (not
    all on the CPU, float32 and contiguous, or torch's CPU kernels are not the AVX2/AVX512 ones
    whose roundings it reproduces). IndexError: an index outside [0, n), or shapes that do not
    match (what torch's index_select raises for the first)."""
    tables = (p, acc) if not momentum else (p, acc, velocity)
    if (idx.device.type != "cpu" or idx.dtype != torch.long
            or any(t is None or t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2
                   or not t.is_contiguous() for t in (*tables, val))
            or not torch_kernels_checked()):
        return False
    if idx.dim() != 1 or len(idx) != len(val) or any(t.shape != p.shape for t in tables) or val.shape[1] != p.shape[1]:
        raise IndexError(f"adagrad_momentum_rows: rows {tuple(idx.shape)} and gradient {tuple(val.shape)} "
                         f"do not fit a table of {tuple(p.shape)}")
    low, high = torch.aminmax(idx) if len(idx) else (0, 0)
    if int(low) < 0 or int(high) >= len(p):
        raise IndexError(f"adagrad_momentum_rows: row indices must lie in [0, {len(p)})")
    # every view before the first loop: nothing is touched if one of them fails
    p_, acc_, ids = p.detach().numpy(), acc.detach().numpy(), idx.contiguous().numpy()
    vel_ = tables[2].detach().numpy() if momentum else p_  # (unused without momentum)
    step = torch.empty(val.shape, dtype=torch.float32)
    _accumulate(acc_, ids, val.detach().numpy(), eps, step.numpy())
    step.sqrt_()  # torch's square root (MKL's on x86 builds), as the torch update takes it
    torch.div(val, step, out=step)
    _descend(p_, vel_, ids, step.numpy(), lr, momentum)
    for t in tables:
        torch.autograd.graph.increment_version(t)  # written through numpy: say so, as an in-place op would
    return True
