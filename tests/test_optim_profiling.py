"""Our optimizers open torch's profiler ranges only while the profiler runs (hnvm.training.optim:
`_unprofiled_step`, `_Unprofiled.zero_grad`), and keep what torch.optim.Optimizer promises: step
hooks (their own and the global ones), zero_grad both ways, LR schedulers, the ranges under the
profiler."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.optim import optimizer as torch_optimizer

from hnvm.training.optim import AdagradMomentum, LazyAdam

OPTIMIZERS = [lambda ps: AdagradMomentum(ps, lr=0.1, momentum=0.4), lambda ps: LazyAdam(ps, lr=0.01)]


def _model() -> tuple[torch.nn.Parameter, torch.nn.Embedding]:
    return torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Embedding(6, 4, sparse=True)


def _backward(w: torch.nn.Parameter, table: torch.nn.Embedding) -> None:
    (w.sum() + table(torch.tensor([1, 4, 1])).pow(2).sum()).backward()


@pytest.fixture
def ranges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the profiler ranges torch's optimizer code opens (record_function)."""
    opened: list[str] = []
    real = torch.autograd.profiler.record_function

    @contextlib.contextmanager
    def counting(name: str, *args: Any) -> Iterator[None]:
        opened.append(name)
        with real(name, *args):
            yield

    monkeypatch.setattr(torch.autograd.profiler, "record_function", counting)
    return opened


@pytest.mark.parametrize("make", OPTIMIZERS, ids=["adagrad", "lazyadam"])
def test_no_profiler_range_without_the_profiler_or_hooks_and_the_same_update(make: Any, ranges: list[str]) -> None:
    w, table = _model()
    w2, table2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Embedding(6, 4, sparse=True)
    table2.load_state_dict(table.state_dict())
    lean, full = make([w, table.weight]), make([w2, table2.weight])
    for _ in range(3):
        lean.zero_grad()
        _backward(w, table)
        lean.step()
        full.zero_grad()
        _backward(w2, table2)
        torch.optim.Optimizer.profile_hook_step(type(full).step.__wrapped__)(full)  # torch's own wrapper
    assert ranges.count(f"Optimizer.step#{type(full).__name__}.step") == 3  # only the reference's calls
    assert not any("zero_grad" in n for n in ranges)
    assert torch.equal(w, w2) and torch.equal(table.weight, table2.weight)
    assert w.grad is not None and table.weight.grad is not None
    lean.zero_grad()
    assert w.grad is None and table.weight.grad is None


HOOKS = {
    "own pre": lambda opt, f: opt.register_step_pre_hook(f),
    "own post": lambda opt, f: opt.register_step_post_hook(f),
    "global pre": lambda opt, f: torch_optimizer.register_optimizer_step_pre_hook(f),
    "global post": lambda opt, f: torch_optimizer.register_optimizer_step_post_hook(f),
}


@pytest.mark.parametrize("make", OPTIMIZERS, ids=["adagrad", "lazyadam"])
@pytest.mark.parametrize("kind", list(HOOKS))
def test_each_kind_of_step_hook_still_runs(make: Any, kind: str, ranges: list[str]) -> None:
    w, table = _model()
    opt = make([w, table.weight])
    calls: list[str] = []
    _backward(w, table)
    handle = HOOKS[kind](opt, lambda *a: calls.append(kind))
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls == [kind] and len(ranges) == 1  # torch's own wrapper ran it, in its range
    opt.step()
    assert calls == [kind] and len(ranges) == 1  # no hook left: the lean way again


@pytest.mark.parametrize("make", OPTIMIZERS, ids=["adagrad", "lazyadam"])
def test_the_profiler_sees_the_ranges_and_zero_grad_can_zero(make: Any) -> None:
    w, table = _model()
    opt = make([w, table.weight])
    _backward(w, table)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
        opt.zero_grad()
    names = {e.name for e in prof.events()}
    cls = type(opt).__name__
    assert {f"Optimizer.step#{cls}.step", f"Optimizer.zero_grad#{cls}.zero_grad"} <= names
    _backward(w, table)
    opt.zero_grad(set_to_none=False)
    assert w.grad is not None and not w.grad.any()


def test_an_lr_scheduler_sees_the_steps() -> None:
    w, table = _model()
    opt = AdagradMomentum([w, table.weight], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would fail here
        _backward(w, table)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
