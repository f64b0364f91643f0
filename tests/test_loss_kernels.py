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
    g, r, s = torch.ones(n, m), torch.ones(n, m), torch.ones(n, m)
    rows = [torch.ones(n) for _ in range(4)]
    d_b = torch.tensor(1.0)
    assert not COMPILED(g.double(), r.double(), s.double(), *[t.double() for t in rows], d_b, 0.5)  # type: ignore[misc]
    assert not COMPILED(torch.ones(m, n).T, r, s, *rows, d_b, 0.5)  # type: ignore[misc]
    assert not COMPILED(g[:, :2], r[:, :2], s[:, :2], *rows, d_b, 0.5)  # type: ignore[misc]  # fewer columns than rows
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not COMPILED(g, r, s, *rows, d_b, 0.5)  # type: ignore[misc]
    assert torch.equal(g, torch.ones(n, m))
    _, taken = _gradient(monkeypatch, True, torch.randn(4, 9), 1.95, 0.5, 1.0)
    assert taken == 0
