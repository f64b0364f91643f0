"""AdagradMomentum's update of the rows of a sparse gradient (hnvm.training.optim) on the CPU in
two compiled passes (numba) instead of about a dozen torch operations, most of them over a
[rows, H] temporary: a training step of a small network is mostly per-operation cost. GRU4Rec's
optimizer step, for one, took 1.75 of its 6 ms steps; 1.25 with these loops.

The loops give the floats of the torch operations they replace, bit for bit (tested against
them): each operation rounds as torch's CPU kernel rounds it, fused multiply-adds included
(`hnvm.compiled.fma`), and the square root is torch's own (`Tensor.sqrt_`: MKL's on x86 builds,
which is not the correctly rounded one). Importing this module imports numba: the optimizer
imports it at its first sparse update."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hnvm.compiled import compiled, fma


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
    p with their gradient val (Float[u, H]): acc[idx] += val²; step = val / sqrt(acc[idx] +
    eps); then with momentum v[idx] = momentum · v[idx] - lr · step, p[idx] += v[idx], else
    p[idx] -= lr · step. p, acc and velocity are updated in place. Returns False, touching
    nothing, where the loop does not apply (not all on the CPU, float32 and contiguous)."""
    tables = (p, acc) if not momentum else (p, acc, velocity)
    if (idx.device.type != "cpu" or idx.dtype != torch.long
            or any(t is None or t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2
                   or not t.is_contiguous() for t in (*tables, val))):
        return False
    ids, grad = idx.contiguous().numpy(), val.contiguous().numpy()
    step = torch.empty(val.shape, dtype=torch.float32)
    _accumulate(acc.numpy(), ids, grad, eps, step.numpy())
    step.sqrt_()  # torch's square root (MKL's on x86 builds), as the torch update takes it
    torch.div(val, step, out=step)
    _descend(p.numpy(), (velocity if momentum else p).numpy(), ids, step.numpy(), lr, momentum)
    return True
