"""GRU4Rec's compiled BPR-max gradient (hnvm.models.loss_kernels) against the torch operations it
replaces in `_BprMax.backward`: the same floats, bit for bit, over shapes, magnitudes and ELU
settings; and what it declines."""

from __future__ import annotations

import pytest
import torch

from hnvm.models import loss_kernels
from hnvm.models.gru4rec_net import in_batch_bpr_max_loss

COMPILED = loss_kernels.bpr_max_gradient


def _gradient(monkeypatch: pytest.MonkeyPatch, compiled: bool, scores: torch.Tensor, bpreg: float,
              elu_p: float, scale: float) -> tuple[torch.Tensor, int]:
    """dL/dscores of scale · in_batch_bpr_max_loss, the compiled loop or the torch operations;
    and how many backward passes the loop took."""
    taken = 0

    def counting(*args: object) -> bool:
        nonlocal taken
        done = COMPILED(*args) if compiled else False  # type: ignore[arg-type]
        taken += done
        return done

    monkeypatch.setattr(loss_kernels, "bpr_max_gradient", counting)
    x = scores.clone().requires_grad_()
    (in_batch_bpr_max_loss(x, bpreg, elu_p) * scale).backward()
    assert x.grad is not None
    return x.grad, taken


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (4, 4), (6, 15), (32, 2080), (64, 2112)])
@pytest.mark.parametrize("elu_p", [0.0, 0.5, 0.3])
def test_compiled_bpr_max_gradient_equals_the_torch_operations_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int], elu_p: float) -> None:
    # (fails if a product is fused into a multiply-add, a sum regrouped, the target's term or
    # ELU's factor misplaced)
    g = torch.Generator().manual_seed(shape[1])
    for magnitude, bpreg, scale in ((0.5, 1.95, 1 / 64), (3.0, 0.5, 1.0), (30.0, 1.95, 0.01), (1e-3, 0.0, 7.0)):
        scores = torch.randn(*shape, generator=g) * magnitude
        scores[0, -1] = -0.0
        got, taken = _gradient(monkeypatch, True, scores, bpreg, elu_p, scale)
        want, none = _gradient(monkeypatch, False, scores, bpreg, elu_p, scale)
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip("the compiled gradient declines on this CPU")
        assert (taken, none) == (1, 0)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # the bits (NaN: one row, no negative)


def test_other_dtypes_layouts_and_cpu_kernels_take_the_torch_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    n, m = 3, 5

    def call(g: torch.Tensor, r: torch.Tensor, s: torch.Tensor, row: torch.Tensor | None = None,
             d_b: torch.Tensor | None = None) -> bool:
        row = torch.ones(n) if row is None else row  # A, B, dL/dA and dL/dt
        d_b = torch.tensor(1.0) if d_b is None else d_b
        return COMPILED(g, r, s, row, row.clone(), row.clone(), d_b, row.clone(), 0.5)

    g, r, s = torch.ones(n, m), torch.ones(n, m), torch.ones(n, m)
    with torch.no_grad():  # as in a backward pass
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            assert call(g.clone(), r, s)  # (what each line below changes)
        assert not call(g.double(), r.double(), s.double(), torch.ones(n, dtype=torch.float64))
        assert not call(torch.ones(m, n).T, r, s)
        assert not call(*[t[:, :2].contiguous() for t in (g, r, s)])  # fewer columns than rows
        assert not call(g, r, s, torch.ones(2 * n)[::2])  # a row vector not contiguous
        assert not call(g, r, s, d_b=torch.tensor(1.0, requires_grad=True))
    assert not call(g, r, s)  # grad mode on: create_graph=True
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with torch.no_grad():
        assert not call(g, r, s)
    assert torch.equal(g, torch.ones(n, m))
    _, taken = _gradient(monkeypatch, True, torch.randn(4, 9), 1.95, 0.5, 1.0)
    assert taken == 0


def test_a_differentiated_gradient_takes_the_torch_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """create_graph=True with an upstream gradient that requires grad: the loop declines (it
    could not read that gradient through numpy), the torch operations build the graph, and the
    gradient is the same."""
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(3)).requires_grad_()
    v = torch.tensor(1.0, requires_grad=True)
    (g1,) = torch.autograd.grad(in_batch_bpr_max_loss(x, 1.95, 0.5), x, grad_outputs=v, create_graph=True)
    want, _ = _gradient(monkeypatch, False, x.detach(), 1.95, 0.5, 1.0)
    assert torch.equal(g1.detach(), want)
    (dv,) = torch.autograd.grad(g1.sum(), v)  # the gradient is linear in the upstream one
    assert torch.allclose(dv, want.sum())
