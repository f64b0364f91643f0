"""A one-layer GRU over sequences for training on the CPU: torch's forward, operation for
operation, and a backward of two calls a time step instead of autograd's graph.

Training HNVM and HRNN runs their GRUs over a few dozen rows at a time (HNVM's length groups
at the paper's sizes: about 130 time steps a training step over [20-90, 200] states; HRNN's
windows of padded sessions). Autograd through
torch's CPU GRU records about ten operations a step and replays about twenty-five in the
backward, each on a few thousand floats, so the calls cost as much as their arithmetic. Here:

* **Forward** (`_GRUSequence.forward`): what aten/src/ATen/native/RNN.cpp computes for
  ``nn.GRU`` on the CPU (input gates ``W_ih x + b_ih`` for every step in one product, then per
  step ``GRUCell`` with pre-computed input gates), the same floats bit for bit (tested): the
  products and the sigmoid/tanh are torch's calls on tensors of the same shapes, strides and
  fresh allocations; the additions and products between them (one rounding each, no fused
  multiply-add, as torch's separate operations) run in three compiled loops. The gates are kept
  for the backward instead of autograd's graph.
* **Backward** (`_GRUSequence.backward`): per step, one compiled loop for the gates' gradients
  and one product for the hidden state's (``dh W_hh``); the weights' and the input's gradients
  as one product each over all steps. This is the gradient of the same function, summed in
  another order (autograd sums the weights' gradients step by step): it differs from
  autograd's in the last bits (1e-7 to 5e-7 of the largest gradient on the tests' shapes;
  tests/test_gru_train.py bounds it against a float64 reference), so trained weights differ
  from ``nn.GRU``'s and the quality is compared over seeds (docs/performance.md).

`gru_sequence` is what the models call (through hnvm.models.layers.gru_outputs, which imports
this module on the first training step: it imports numba). Importing this module imports numba.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hnvm.compiled import compiled
from hnvm.models.layers import module_outputs


@compiled
def _gates_in(gh: np.ndarray, gi: np.ndarray) -> None:
    """gh[:, :2H] += gi[:, :2H] (the r and z pre-activations; torch's two add_)."""
    n, h3 = gh.shape
    for i in range(n):
        for j in range(2 * (h3 // 3)):
            gh[i, j] = gh[i, j] + gi[i, j]


@compiled
def _new_in(out: np.ndarray, gh: np.ndarray, gi: np.ndarray) -> None:
    """out = gi_n + gh_n · r (the new gate's pre-activation; torch's mul then add)."""
    n, h = out.shape
    for i in range(n):
        for j in range(h):
            out[i, j] = gi[i, 2 * h + j] + gh[i, 2 * h + j] * gh[i, j]


@compiled
def _blend(out: np.ndarray, h: np.ndarray, new: np.ndarray, gh: np.ndarray) -> None:
    """out = (h - n) · z + n (the next state; torch's sub, mul_, add_)."""
    rows, width = out.shape
    for i in range(rows):
        for j in range(width):
            out[i, j] = (h[i, j] - new[i, j]) * gh[i, width + j] + new[i, j]


@compiled
def _step_backward(dh: np.ndarray, dout_prev: np.ndarray, gates: np.ndarray, new: np.ndarray, h_prev: np.ndarray,
                   dgi: np.ndarray, dgh: np.ndarray, base: np.ndarray, carry: bool) -> None:
    """One step's gradients from dh = dL/dh_t (Float[N, H]) and the step's gates (Float[N, 3H]:
    r, z after their sigmoid, h_n), new gate n and entering state h_prev (Float[N, H]): the input
    gates' dgi and the hidden gates' dgh (Float[N, 3H]; they differ in the new gate, whose hidden
    part is scaled by r), and base = dL/dh_{t-1} except through W_hh: dh · z, plus dout_prev (the
    output's gradient at t-1) where carry."""
    rows, width = dh.shape
    one = np.float32(1.0)
    for i in range(rows):
        for j in range(width):
            g = dh[i, j]
            r, z, hn = gates[i, j], gates[i, width + j], gates[i, 2 * width + j]
            nj = new[i, j]
            d_n = g * (one - z) * (one - nj * nj)  # through h' = (h - n) z + n, then tanh
            d_r = d_n * hn * r * (one - r)  # n = tanh(i_n + r · h_n), then sigmoid
            d_z = g * (h_prev[i, j] - nj) * z * (one - z)
            dgi[i, j] = d_r
            dgi[i, width + j] = d_z
            dgi[i, 2 * width + j] = d_n
            dgh[i, j] = d_r
            dgh[i, width + j] = d_z
            dgh[i, 2 * width + j] = d_n * r
            b = g * z
            if carry:
                b = b + dout_prev[i, j]
            base[i, j] = b


class _GRUSequence(torch.autograd.Function):
    """x Float[N, T, I], h0 Float[N, H] or None, the GRU's four tensors -> Float[N, T, H]."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, h0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                b_hh: Tensor) -> Tensor:
        N, T, _ = x.shape
        H = w_hh.shape[1]
        gi = F.linear(x.transpose(0, 1), w_ih, b_ih)  # [T, N, 3H], torch's call for a batch_first GRU
        h = x.new_zeros(N, H) if h0 is None else h0.detach()
        hs, gs, ns = [h], [], []
        gi_all = gi.numpy()  # its steps sliced in numpy: no torch operator call a step
        for t in range(T):
            gh = torch.addmm(b_hh, h, w_hh.t())  # [N, 3H] (r, z, n), a fresh tensor as torch's
            gh_a, gi_a = gh.numpy(), gi_all[t]
            _gates_in(gh_a, gi_a)
            h_r, h_z, _ = gh.unsafe_chunk(3, 1)
            h_r.sigmoid_()  # on [N, H] column chunks, as torch's: the bits of a vectorised
            h_z.sigmoid_()  # sigmoid depend on where a value falls in a contiguous run
            new = x.new_empty(N, H)
            _new_in(new.numpy(), gh_a, gi_a)
            new.tanh_()
            h_next = x.new_empty(N, H)
            _blend(h_next.numpy(), h.numpy(), new.numpy(), gh_a)
            h = h_next
            hs.append(h)
            gs.append(gh)  # r and z after their sigmoid, h_n before r scales it
            ns.append(new)
        states = torch.stack(hs)  # [T + 1, N, H]
        ctx.save_for_backward(x, states, w_ih, w_hh, *gs, *ns)  # the steps' tensors unstacked: a copy less
        ctx.h0 = h0 is not None
        return states[1:].transpose(0, 1)  # [N, T, H], as torch's stack and transpose

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        x, states, w_ih, w_hh, *steps = ctx.saved_tensors
        T, N, H = states.shape[0] - 1, states.shape[1], states.shape[2]
        gates, new = steps[:T], steps[T:]  # T of Float[N, 3H], T of Float[N, H]
        d_out = dout.transpose(0, 1).contiguous()  # [T, N, H]
        dgi, dgh = states.new_empty(T, N, 3 * H), states.new_empty(T, N, 3 * H)
        dh, base = d_out[T - 1].clone(), states.new_empty(N, H)
        need = ctx.needs_input_grad  # (x, h0, W_ih, W_hh, b_ih, b_hh)
        need_h0 = ctx.h0 and need[1]
        # numpy views of the steps (slicing a numpy array is not a torch operator call)
        d_out_a, states_a, dgi_a, dgh_a, base_a = (a.numpy() for a in (d_out, states, dgi, dgh, base))
        for t in range(T - 1, -1, -1):
            _step_backward(dh.numpy(), d_out_a[max(t - 1, 0)], gates[t].numpy(), new[t].numpy(), states_a[t],
                           dgi_a[t], dgh_a[t], base_a, t > 0)
            if t > 0 or need_h0:
                dh = torch.addmm(base, dgh[t], w_hh)  # dL/dh_{t-1}
        gi_rows, gh_rows = dgi.view(T * N, 3 * H), dgh.view(T * N, 3 * H)
        xt = x.transpose(0, 1)  # [T, N, I], the rows of gi_rows
        dx = (gi_rows @ w_ih).view(T, N, -1).transpose(0, 1) if need[0] else None
        d_w_ih = gi_rows.t() @ xt.reshape(T * N, -1) if need[2] else None
        d_w_hh = gh_rows.t() @ states[:-1].reshape(T * N, H) if need[3] else None
        return (dx, dh if need_h0 else None, d_w_ih, d_w_hh, gi_rows.sum(0) if need[4] else None,
                gh_rows.sum(0) if need[5] else None)


def applies(gru: nn.GRU, x: Tensor, h0: Tensor | None = None) -> bool:
    """Whether `gru_sequence` takes this call: autograd on, no autocast, a one-layer
    unidirectional batch_first GRU with biases, no projection and no module hooks (a forward
    pre-hook, e.g. pruning's or the old weight_norm's, changes the weights as the module runs),
    x Float[N, T, input_size] with N, T >= 1, the four weights float32 on the CPU, h0 None or a
    contiguous Float[N, H]. Elsewhere the module runs (and raises its own errors)."""
    hooks = (gru._forward_hooks, gru._forward_pre_hooks, gru._backward_hooks, gru._backward_pre_hooks,
             *(getattr(nn.modules.module, f"_global_{kind}_hooks", None)
               for kind in ("forward", "forward_pre", "backward", "backward_pre")))
    if (not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or any(hooks) or gru.num_layers != 1
            or gru.bidirectional or not gru.bias or not gru.batch_first or gru.proj_size != 0):
        return False
    weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    return (x.dim() == 3 and x.shape[0] > 0 and x.shape[1] > 0 and x.shape[2] == gru.input_size
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, *weights))
            and (h0 is None or (h0.shape == (x.shape[0], gru.hidden_size) and h0.is_contiguous()
                                and h0.device.type == "cpu" and h0.dtype == torch.float32)))


def gru_sequence(gru: nn.GRU, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """The outputs of `gru` over x: Float[N, T, I] (batch first) from h0: Float[N, H] (None:
    zeros) -> Float[N, T, H], what ``gru(x, h0[None])[0]`` gives, bit for bit, with the backward
    above (the same gradient summed in another order). Where `applies` does not hold, the module
    itself runs. Unlike the module's, the output may not be changed in place (autograd raises:
    it is a view made inside a custom Function), its gradient is not differentiable again
    (no double backward, no torch.func transforms) and x may not be an inference-mode tensor;
    the models' callers only index and concatenate it."""
    if not applies(gru, x, h0):
        return module_outputs(gru, x, h0)
    return _GRUSequence.apply(x, h0, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
