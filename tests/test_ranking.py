"""The bf16 shortlist of the service: its rounding-error bound holds, its top-k equals the exact
fp32 top-k (ties to the lower id, excluded items, fall-backs), and an Engine with
`scoring="bf16"` recommends what one with `scoring="exact"` does."""

from __future__ import annotations

import math

import pytest
import torch

from hnvm.errors import HnvmError
from hnvm.online import Engine, Event, Query
from hnvm.online.ranking import _U, Bf16Shortlist, LinearRanker, top_k


def _weights(n: int, hidden: int, seed: int, spread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, hidden, generator=g) * 0.3
    b = torch.randn(n, generator=g) * 0.5
    if spread:  # item norms over four orders of magnitude
        w *= 10.0 ** (torch.rand(n, 1, generator=g) * 4 - 3)
    return w, b


def _states(rows: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(rows, hidden, generator=g) * 1.5)  # like a GRU state


def _exact(w: torch.Tensor, b: torch.Tensor, h: torch.Tensor, k: int, exclude: list[list[int]]):
    return top_k(torch.addmm(b, h, w.t().contiguous()), k, exclude)


@pytest.mark.parametrize("spread", [False, True])
def test_rounding_error_bound_holds(spread: bool) -> None:
    w, b = _weights(5000, 40, seed=1, spread=spread)
    sl = Bf16Shortlist(w, b)
    assert sl.enabled
    h = torch.cat([_states(64, 40, seed=2), torch.rand(64, 40) * 2 - 1, torch.ones(1, 40)])
    a = sl._approx(h)[:, : sl.n].double()
    e = torch.nn.functional.linear(h, w, b).double()
    err = (a - e).abs()
    bound = sl._slack(h)[:, None] + _U * a.abs()
    assert bool((err <= bound).all())
    # and the bound is not vacuous: within ~50x of the largest error actually made
    assert float(bound.max()) < 50 * float(err.max())
    # padding columns score -inf
    assert bool((sl._approx(h)[:, sl.n:] == -math.inf).all())


def test_self_check_disables_a_bound_that_fails() -> None:
    w, b = _weights(2000, 16, seed=3)
    sl = Bf16Shortlist(w, b, check=False)
    sl.c = 0.0  # claims bf16 is exact: the check must catch it
    sl._self_check()
    assert not sl.enabled
    ids, vals = sl.top_k(_states(8, 16, seed=4), 5, [[]] * 8)
    assert ids == [None] * 8 and vals == [None] * 8


@pytest.mark.parametrize("k", [1, 10, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("packed", [True, False])
def test_top_k_equals_exact_fp32(k: int, seed: int, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not packed:  # torch.mm's bf16 path, as on builds without oneDNN's packed linear
        monkeypatch.setattr(Bf16Shortlist, "_pack", staticmethod(lambda wb: None))
    w, b = _weights(6000, 32, seed=seed)
    sl = Bf16Shortlist(w, b, min_batch=1)
    assert packed or sl._packed is None
    h = _states(24, 32, seed=seed + 10)
    g = torch.Generator().manual_seed(seed)
    exclude = [torch.randperm(6000, generator=g)[: int(r) * 50].add(0).tolist() if r % 3 else [] for r in range(24)]
    exclude[5] = _exact(w, b, h[5:6], 30, [[]])[0][0]  # the row's exact favourites are excluded
    ids, vals = sl.top_k(h, k, exclude)
    assert sum(r is None for r in ids) == 0  # every row certified by the shortlist
    assert sl.stats["candidates"] < 24 * 40 * k  # and a short list, not the catalogue
    e_ids, e_vals = _exact(w, b, h, k, exclude)
    assert ids == e_ids
    for v, ev in zip(vals, e_vals, strict=True):
        assert v == pytest.approx(ev, rel=1e-5, abs=1e-6)
    for r, ex in enumerate(exclude):
        assert 0 not in ids[r] and not set(ids[r]) & set(ex)


def test_ties_go_to_the_lower_id() -> None:
    w, b = _weights(3000, 16, seed=5)
    h = _states(6, 16, seed=6)
    # item 7 beats everything for every row; items 2999, 1200 and 40 are exact copies of it
    w[7], b[7] = 0.0, 50.0
    for twin in (2999, 1200, 40):
        w[twin], b[twin] = w[7], b[7]
    sl = Bf16Shortlist(w, b)
    for k in (2, 4, 6):
        ids, _ = sl.top_k(h, k, [[]] * 6)
        assert ids == _exact(w, b, h, k, [[]] * 6)[0]
        assert all(row[:4] == [7, 40, 1200, 2999][: min(k, 4)] for row in ids)


def test_rows_it_cannot_certify_are_left_to_the_full_pass() -> None:
    w, b = torch.zeros(4000, 8), torch.zeros(4000)  # flat scores: every item is a candidate
    sl = Bf16Shortlist(w, b, max_candidates=500)
    ids, _ = sl.top_k(_states(8, 8, seed=7), 3, [[]] * 8)
    assert ids == [None] * 8 and sl.stats["full_rows"] == 8
    w, b = _weights(4000, 8, seed=8)
    sl = Bf16Shortlist(w, b, min_batch=4)
    h = _states(3, 8, seed=9)
    assert sl.top_k(h, 3, [[]] * 3)[0] == [None] * 3  # a batch too small for bf16 to pay
    # a row with fewer than k eligible blocks
    h = _states(4, 8, seed=9)
    ids, _ = sl.top_k(h, 3, [[], [], [], list(range(1, 4000 - 64))])
    assert ids[3] is None and ids[0] is not None


def _engine(scoring: str, n_items: int = 3000) -> Engine:
    """An initialised HNVM (small) over n_items items and 20 users."""
    from hnvm.models.hnvm import HNVM

    torch.manual_seed(0)
    m = HNVM(hidden=24, emb_dim=16, d_e=4, d_z=4, mlp_hidden=16)
    m.net = m._build(n_items, 20)
    m.counts_ = torch.zeros(n_items + 1)
    return Engine(m, [f"i{i}" for i in range(1, n_items + 1)], [f"u{u}" for u in range(1, 21)], scoring=scoring)


def test_engine_bf16_recommends_what_exact_does() -> None:
    fast, exact = _engine("bf16"), _engine("exact")
    assert fast.scorer.scoring == "bf16" and exact.scorer.scoring == "exact"
    assert _engine("auto").scorer.scoring == "exact"  # 3,000 items: below the auto threshold
    users = fast.user_index.keys()
    items = fast.item_ids[1:]
    for i, u in enumerate(list(users)[:12]):
        for j in range(i % 4):
            ev = Event(u, items[(37 * i + 11 * j) % len(items)], 1000.0 + j)
            fast.apply(ev)
            exact.apply(ev)
    queries = [Query(u, session=[items[i]] if i % 3 == 0 else [], k=10 + i, exclude_seen=i % 2 == 1)
               for i, u in enumerate(list(users)[:12])] + [Query("someone-new", k=5)]
    a, b = fast.recommend_many(queries), exact.recommend_many(queries)
    assert fast.scorer.ranker.shortlist.stats["rows"] == len(queries)
    assert fast.scorer.ranker.shortlist.stats["full_rows"] < len(queries)
    for ra, rb in zip(a, b, strict=True):
        assert ra.items == rb.items
        assert ra.scores == pytest.approx(rb.scores, rel=1e-5, abs=1e-6)
    with pytest.raises(HnvmError, match="scoring must be one of"):
        _engine("fp8")


def test_rank_process_ranks_what_the_parent_would() -> None:
    from hnvm.online.worker import RankWorker

    w, b = _weights(3000, 24, seed=11)
    for bf16 in (False, True):
        ranker = LinearRanker(w, b, bf16=bf16)
        worker = RankWorker(ranker)
        try:
            h = _states(10, 24, seed=12)
            exclude = [[], [1, 2, 3], list(range(1, 2996)), *[[]] * 7]  # row 2: only 4 items left
            got = worker.rank(h, 7, exclude)
            assert got == ranker.rank(h, 7, exclude)  # ids and float scores, bit for bit
            assert len(got[0][2]) == 4
            worker.proc.kill()  # a dead child: the parent ranks in-process, same answers
            worker.proc.wait()
            assert worker.rank(h, 7, exclude) == ranker.rank(h, 7, exclude)
            assert not worker.alive
        finally:
            worker.close()
