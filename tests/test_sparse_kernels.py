"""The compiled sparse-gradient loops (hnvm.training.sparse_kernels), AdagradMomentum's update
and the per-row coalescing, against the torch operations they replace: the same floats, bit
for bit, over shapes, magnitudes and settings; and what they decline or refuse."""

from __future__ import annotations

import pytest
import torch

from hnvm.training import sparse_kernels
from hnvm.training.optim import AdagradMomentum

COMPILED = sparse_kernels.adagrad_momentum_rows


def _run(monkeypatch: pytest.MonkeyPatch, compiled: bool, n: int, h: int, group: dict[str, float], seed: int,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Ten sparse steps of random rows (magnitudes over 1e-4..1e4) from one seed; returns the
    parameter, the optimizer state and how many steps the compiled loops took."""
    taken = 0

    def counting(*args: object) -> bool:
        nonlocal taken
        done = COMPILED(*args) if compiled else False
        taken += done
        return done

    monkeypatch.setattr(sparse_kernels, "adagrad_momentum_rows", counting)
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n, h, generator=g, dtype=dtype))
    opt = AdagradMomentum([w], **group)
    for _ in range(10):
        rows = torch.randperm(n, generator=g)[:int(torch.randint(1, n + 1, (1,), generator=g))].sort().values
        vals = torch.randn(len(rows), h, generator=g, dtype=dtype)
        vals *= 10.0 ** (8 * torch.rand(len(rows), 1, generator=g, dtype=dtype) - 4)
        w.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (n, h), check_invariants=True).coalesce()
        opt.step()
    return w.detach(), opt.state[w], taken


@pytest.mark.parametrize("h", [1, 5, 100])
@pytest.mark.parametrize("group", [
    dict(lr=0.05, momentum=0.4), dict(lr=0.2, momentum=0.0), dict(lr=1e-3, momentum=0.9, weight_decay=0.01),
    dict(lr=0.1, momentum=0.5, eps=1e-8, initial_accumulator=0.1)], ids=["mom", "no-mom", "decay", "acc0"])
def test_compiled_sparse_adagrad_equals_the_torch_operations_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, h: int, group: dict[str, float]) -> None:
    # (fails if a fused multiply-add is rounded twice, or the square root is not torch's)
    for seed in range(3):
        p_c, st_c, taken = _run(monkeypatch, True, 60, h, group, seed)
        p_t, st_t, none = _run(monkeypatch, False, 60, h, group, seed)
        assert taken == 10 and none == 0
        assert torch.equal(p_c, p_t)
        assert st_c.keys() == st_t.keys() and all(torch.equal(st_c[k], st_t[k]) for k in st_c)


def test_other_dtypes_layouts_and_cpu_kernels_take_the_torch_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, taken = _run(monkeypatch, True, 20, 3, dict(lr=0.1, momentum=0.4), 0, dtype=torch.float64)
    assert taken == 0
    p = torch.zeros(4, 3).T  # not contiguous
    assert not COMPILED(p, torch.zeros(3, 4), None, torch.tensor([0]), torch.ones(1, 4), 0.1, 0.0, 1e-6)
    assert torch.equal(p, torch.zeros(3, 4))
    # torch's scalar kernels round addcmul_ and add(alpha=) twice: no fused multiply-add to match
    p, acc = torch.zeros(3, 4), torch.zeros(3, 4)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not COMPILED(p, acc, None, torch.tensor([0]), torch.ones(1, 4), 0.1, 0.0, 1e-6)
    assert torch.equal(p, torch.zeros(3, 4)) and torch.equal(acc, torch.zeros(3, 4))


def test_compiled_update_refuses_what_would_reach_outside_the_tables() -> None:
    p, acc, vel = torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        COMPILED(p, acc, vel, torch.tensor([0, 3]), torch.ones(2, 4), 0.1, 0.4, 1e-6)
    with pytest.raises(IndexError, match="do not fit"):
        COMPILED(p, acc, vel, torch.tensor([0, 1]), torch.ones(1, 4), 0.1, 0.4, 1e-6)
    with pytest.raises(IndexError, match="do not fit"):
        COMPILED(p, acc, vel, torch.tensor([0]), torch.ones(1, 2), 0.1, 0.4, 1e-6)
    with pytest.raises(IndexError, match="do not fit"):
        COMPILED(p, torch.zeros(3, 2), vel, torch.tensor([0]), torch.ones(1, 4), 0.1, 0.4, 1e-6)
    assert not acc.any() and not p.any() and not vel.any()
    assert COMPILED(p, acc, vel, torch.zeros(0, dtype=torch.long), torch.ones(0, 4), 0.1, 0.4, 1e-6)
    assert not p.any()


@pytest.mark.parametrize("h", [1, 7, 100])
def test_compiled_coalescing_equals_sort_and_embedding_bag_bit_for_bit(h: int) -> None:
    """Per-row sums in position order, as torch's stable sort, unique_consecutive and
    embedding_bag give them (sign of zero included), from heavy repeats to distinct ids."""
    g = torch.Generator().manual_seed(h)
    for n, n_rows in ((0, 4), (1, 1), (50, 3), (2_240, 5_216), (500, 20_000), (3_000, 40)):
        ids = torch.randint(0, n_rows, (n,), generator=g)
        grad = torch.randn(n, h, generator=g) * 10.0 ** (8 * torch.rand(n, 1, generator=g) - 4)
        grad[::7] = -0.0
        rows, sums = sparse_kernels.coalesce_rows(ids, grad, n_rows)
        sorted_ids, perm = torch.sort(ids, stable=True)
        want_rows, _, counts = torch.unique_consecutive(sorted_ids, return_counts=True, return_inverse=True)
        want = torch.embedding_bag(grad, perm, counts.cumsum(0) - counts)[0]
        assert torch.equal(rows, want_rows) and torch.equal(sums, want)
        assert torch.equal(sums.signbit(), want.signbit())


def test_coalescing_declines_where_a_sort_is_cheaper_and_refuses_foreign_ids() -> None:
    ids, grad = torch.tensor([3, 1, 3]), torch.ones(3, 2)
    assert sparse_kernels.coalesce_rows(ids, grad, 10**7) is None  # O(n_rows) for 3 ids
    assert sparse_kernels.coalesce_rows(ids, grad.double(), 10) is None
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        sparse_kernels.coalesce_rows(ids, grad, 3)
    with pytest.raises(ValueError, match="do not match"):
        sparse_kernels.coalesce_rows(ids, grad[:2], 10)
    rows, sums = sparse_kernels.coalesce_rows(ids, torch.arange(6.0).view(2, 3).T, 10)  # not contiguous
    assert rows.tolist() == [1, 3] and sums.tolist() == [[1.0, 4.0], [0.0 + 2.0, 3.0 + 5.0]]


@pytest.mark.parametrize("momentum", [0.0, 0.4])
def test_the_compiled_update_bumps_the_version_counters_of_what_it_writes(momentum: float) -> None:
    """It writes through numpy, which autograd and version-keyed caches (HNVM's input-gate table)
    would not see; it bumps the counters as torch's in-place operations do."""
    p, acc = torch.randn(6, 4), torch.zeros(6, 4)
    vel = torch.zeros(6, 4)
    before = [t._version for t in (p, acc, vel)]
    idx, val = torch.tensor([1, 4]), torch.randn(2, 4)
    if not COMPILED(p, acc, vel, idx, val, 0.1, momentum, 1e-10):
        pytest.skip("the compiled update declines on this CPU")
    after = [t._version for t in (p, acc, vel)]
    assert after[0] > before[0] and after[1] > before[1]
    assert (after[2] > before[2]) == (momentum > 0)
