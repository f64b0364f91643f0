"""GRU4Rec's BPR-max gradient (hnvm.models.gru4rec_net, `_BprMax`) in one compiled pass on the
CPU (numba), in place of about ten torch operations over the step's [b, b + n_sample] scores,
three of them allocating a temporary of that size (the reference settings: [64, 2112] a step).

The loop gives the floats of the torch operations it replaces, bit for bit (tested against them;
NaN aside: a row whose target score is infinite or NaN gives NaN either way, its sign bit may differ):
each product, sum and difference is rounded once as IEEE arithmetic rounds it, in the same
order, and none of those operations fuses a multiply-add in torch's kernels (their `+ 1 · x`
and `- 1 · x` forms are exact either way). The row sums stay torch's. It runs where torch's CPU
kernels are the AVX2 or AVX512 ones it was checked against; elsewhere the torch operations run.
Importing this module imports numba: `_BprMax` imports it on first use."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hnvm.compiled import compiled, torch_kernels_checked


@compiled
def _bpr_max_gradient(g: np.ndarray, r: np.ndarray, s: np.ndarray, a: np.ndarray, b: np.ndarray,
                      d_a: np.ndarray, d_b: float, d_t: np.ndarray, elu_p: float) -> None:
    """g (s σ² on entry) becomes dL/dscores, as `_BprMax.backward`'s torch operations compute it."""
    n, m = g.shape
    two, zero = np.float32(2.0), np.float32(0.0)
    db, alpha = np.float32(d_b), np.float32(elu_p)  # (float32 values handed over as float64: exact)
    for i in range(n):
        a_i, b_i, da_i = a[i], b[i], d_a[i]
        for j in range(m):
            s_j, r_j = s[i, j], r[i, j]
            x = (g[i, j] - s_j * a_i) * da_i  # dL/dA · s (σ² - A)
            x = x + (((r_j + two) * r_j - b_i) * s_j) * db  # + dL/dB · s (r² + 2r - B)
            if j == i:
                x = x + d_t[i]  # the target's column
            if elu_p > 0 and r_j <= zero:  # ELU's backward from its result: g · (r + alpha) below 0
                x = x * (r_j + alpha)
            g[i, j] = x


def bpr_max_gradient(g: Tensor, r: Tensor, s: Tensor, a: Tensor, b: Tensor, d_a: Tensor, d_b: Tensor,
                     d_t: Tensor, elu_p: float) -> bool:
    """In place, g (Float[n, m], s σ² on entry) := dL/dscores of `_BprMax` (its docstring has the
    terms): (g - s · A) · dL/dA + ((r + 2) · r - B) · s · dL/dB, plus dL/dt on the diagonal, then
    ELU's backward (elu_p > 0) from r. r, s: Float[n, m]; a, b, d_a, d_t: Float[n]; d_b: a
    0-dim tensor. Returns False, touching nothing, where the loop does not apply (not all on the
    CPU, float32 and contiguous, torch's CPU kernels are not the AVX2/AVX512 ones checked, or the
    gradient is itself differentiated: `create_graph=True`)."""
    matrices, rows = (g, r, s), (a, b, d_a, d_t)
    n, m = g.shape
    if (torch.is_grad_enabled() or any(t.requires_grad for t in (*matrices, *rows, d_b))
            or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
                   for t in (*matrices, *rows))
            or any(t.shape != (n, m) for t in matrices) or any(t.shape != (n,) for t in rows) or m < n
            or not torch_kernels_checked()):
        return False
    _bpr_max_gradient(g.numpy(), r.numpy(), s.numpy(), a.numpy(), b.numpy(), d_a.numpy(), float(d_b), d_t.numpy(),
                      float(elu_p))
    return True
