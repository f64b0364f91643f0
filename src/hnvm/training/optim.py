"""Optimizers of the training loop: Adagrad with momentum (the paper's and GRU4Rec's), Adam
that takes sparse gradients (LazyAdam), and gradient clipping that handles sparse gradients."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from hnvm.training.config import TrainConfig

_Step = Callable[..., Any]


def _step_hooks(opt: torch.optim.Optimizer) -> bool:
    """Has any step hook been registered, on `opt` or for every optimizer? (True where torch
    keeps them elsewhere than this version does: then torch's own wrapper runs them.)"""
    return bool(getattr(opt, "_optimizer_step_pre_hooks", True) or getattr(opt, "_optimizer_step_post_hooks", True)
                or getattr(torch_optimizer, "_global_optimizer_pre_hooks", True)
                or getattr(torch_optimizer, "_global_optimizer_post_hooks", True))


def _unprofiled_step(step: _Step) -> _Step:
    """An optimizer's step without the profiler range that torch.optim.Optimizer opens around
    every call (`record_function`), except while the profiler runs in this thread
    (`torch.autograd._profiler_enabled`; an observer alone, e.g. ExecutionTraceObserver, or a
    profiler started in another thread does not count) or a step hook is registered: then
    torch's own wrapper runs (range, hooks and all). Opening the range costs about 0.15 ms
    a call inside a CPU training step (a cold dispatcher path), 2% of GRU4Rec's step; zero_grad's
    range costs as much (`_Unprofiled.zero_grad`)."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if torch.autograd._profiler_enabled() or _step_hooks(self):
            return hooked(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    wrapper.hooked = True  # type: ignore[attr-defined]  # torch's __init__ then leaves it as it is
    return wrapper


class _Unprofiled(torch.optim.Optimizer):
    """torch.optim.Optimizer whose zero_grad (set_to_none) opens no profiler range unless the
    profiler runs in this thread; subclasses wrap their step in `_unprofiled_step`."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none or torch.autograd._profiler_enabled():
            super().zero_grad(set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


class AdagradMomentum(_Unprofiled):
    """Adagrad with (heavy-ball) momentum, as GRU4Rec's reference code and the paper use:
    G += g²;  v = μ v - lr g / sqrt(G + eps);  p += v,  G starting at `initial_accumulator`
    (0 as in torch and GRU4Rec's code, which makes the first step lr·sign(g) for every weight;
    TensorFlow's Adagrad starts at 0.1).

    A sparse gradient (nn.Embedding(sparse=True)) updates only the rows it holds, as the
    reference's IndexedAdagradM does: G, v and the parameter of every other row stay as they
    are (their momentum is neither applied nor decayed)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.0,
                 eps: float = 1e-6, weight_decay: float = 0.0, initial_accumulator: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "eps": eps,
                                  "weight_decay": weight_decay, "initial_accumulator": initial_accumulator})

    @_unprofiled_step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            dense: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["sum"] = torch.full_like(p, group.get("initial_accumulator", 0.0))
                    if group["momentum"]:
                        st["velocity"] = torch.zeros_like(p)
                if p.grad.is_sparse:
                    self._sparse_step(p, p.grad.coalesce(), st, group)
                else:
                    dense.append((p, p.grad, st))
            if dense:
                self._dense_step(dense, group)
        return None

    @staticmethod
    def _dense_step(dense: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]], group: dict[str, Any]) -> None:
        """The update above for dense gradients, every tensor of the group in each foreach call
        (the same element-wise operations as one tensor at a time, bit-identical for fp32 and
        fp64 parameters, the Trainer's; a few calls instead of ~6 per tensor: the optimizer step
        of a small network is per-call overhead)."""
        params, grads = [d[0] for d in dense], [d[1] for d in dense]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        sums = [d[2]["sum"] for d in dense]
        torch._foreach_addcmul_(sums, grads, grads)
        denom = torch._foreach_add(sums, group["eps"])
        torch._foreach_sqrt_(denom)
        upd = torch._foreach_div(grads, denom)
        if group["momentum"]:
            vel = [d[2]["velocity"] for d in dense]
            torch._foreach_mul_(vel, group["momentum"])
            torch._foreach_add_(vel, upd, alpha=-group["lr"])
            torch._foreach_add_(params, vel)
        else:
            torch._foreach_add_(params, upd, alpha=-group["lr"])

    @staticmethod
    def _sparse_step(p: torch.Tensor, g: torch.Tensor, st: dict[str, Any],
                     group: dict[str, Any]) -> None:
        """The update above restricted to the rows of a coalesced sparse gradient."""
        idx, val = g.indices()[0], g.values()  # index_select: much faster than t[idx] on CPU
        if group["weight_decay"]:
            val = val.add(p.index_select(0, idx), alpha=group["weight_decay"])
        from hnvm.training.sparse_kernels import adagrad_momentum_rows  # (imports numba: not at start-up)

        # on the CPU in two compiled passes, the same floats as the operations below
        if adagrad_momentum_rows(p, st["sum"], st.get("velocity"), idx, val, group["lr"], group["momentum"],
                                 group["eps"]):
            return
        acc = st["sum"].index_select(0, idx).addcmul_(val, val)
        st["sum"].index_copy_(0, idx, acc)
        upd = torch.div(val, acc.add_(group["eps"]).sqrt_(), out=acc)  # in acc's memory: one [rows, H] less
        if group["momentum"]:
            v = st["velocity"].index_select(0, idx).mul_(group["momentum"]).add_(upd, alpha=-group["lr"])
            st["velocity"].index_copy_(0, idx, v)
            p.index_add_(0, idx, v)
        else:
            p.index_add_(0, idx, upd, alpha=-group["lr"])


class LazyAdam(_Unprofiled):
    """Adam (L2 weight decay as torch.optim.Adam) that also takes sparse gradients: a sparse
    gradient updates only the rows it holds, moments included (torch.optim.SparseAdam's
    semantics, with weight decay on those rows). An item table then costs O(rows used) per
    step instead of O(catalogue). Dense gradients get the plain Adam update."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @_unprofiled_step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = float(st["step"])
                c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                if g.is_sparse:
                    g = g.coalesce()
                    idx, val = g.indices()[0], g.values()
                    if wd:
                        val = val.add(p[idx], alpha=wd)
                    m_rows = m[idx].mul_(b1).add_(val, alpha=1 - b1)
                    v_rows = v[idx].mul_(b2).addcmul_(val, val, value=1 - b2)
                    m.index_copy_(0, idx, m_rows)
                    v.index_copy_(0, idx, v_rows)
                    p.index_add_(0, idx, m_rows / (v_rows.sqrt() / c2 + eps), alpha=-lr / c1)
                    continue
                if wd:
                    g = g.add(p, alpha=wd)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m, v.sqrt().div_(c2).add_(eps), value=-lr / c1)
        return None


def sparse_parameters(module: nn.Module) -> set[nn.Parameter]:
    """Parameters whose gradients are sparse: those of embedding modules built with
    sparse=True (which is how DDP decides it too)."""
    return {p for m in module.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse
            for p in m.parameters(recurse=False)}


def dense_gradients(module: nn.Module) -> None:
    """Make every sparse embedding produce dense gradients (NCCL cannot all-reduce sparse
    tensors); the numbers are the same, only the cost differs."""
    for m in module.modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse:
            m.sparse = False


def make_optimizer(params: Iterable[Any] | nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over a module's parameters (or an iterable of parameters, taken as
    dense). Adam over a module with sparse embeddings is LazyAdam; Adagrad handles both."""
    sparse = False
    if isinstance(params, nn.Module):
        sparse = bool(sparse_parameters(params))
        params = params.parameters()
    if cfg.optimizer == "adam":
        if sparse:
            return LazyAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return AdagradMomentum(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           initial_accumulator=cfg.adagrad_initial_accumulator)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """nn.utils.clip_grad_norm_ that also takes sparse gradients (coalesced first, so that a
    row used twice in a batch counts once)."""
    params = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())
        else:
            grads.append(p.grad)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
