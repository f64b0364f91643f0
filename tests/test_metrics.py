"""Metrics: hand-computed tables plus brute-force property checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hnvm.metrics import (
    conservative_ranks,
    item_metrics,
    pad_item_sets,
    per_target_item_metrics,
    per_user_session_metrics,
    per_user_session_rank_metrics,
    session_first_hit_ranks,
    session_metrics,
    session_rank_metrics,
    session_target_ranks,
    topk_items,
)

NAN = float("nan")


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# --- conservative ranks -------------------------------------------------------------------


def test_ranks_hand_table_with_ties_and_huge_padding_score() -> None:
    # Column 0 (padding) scores highest of all; it must not push any target down.
    row = [1e9, 0.5, 0.9, 0.5, 0.1]
    scores = torch.tensor([row] * 4)
    ranks = conservative_ranks(scores, torch.tensor([1, 2, 3, 4]))
    # item 1: 0.9 above + item 3 tied -> 3; item 2: best -> 1; item 3: like item 1 -> 3;
    # item 4: all three others above -> 4.
    assert ranks.tolist() == [3, 1, 3, 4]
    assert ranks.dtype == torch.long
    assert scores[0, 0].item() == 1e9  # caller's tensor untouched


def test_ranks_all_equal_scores_are_worst() -> None:
    n_items = 6
    scores = torch.zeros(3, n_items)
    ranks = conservative_ranks(scores, torch.tensor([1, 3, 5]))
    assert ranks.tolist() == [n_items - 1] * 3


def test_ranks_infinite_scores_tie_conservatively() -> None:
    inf = math.inf
    scores = torch.tensor([[0.0, inf, inf, 1.0, -inf], [0.0, 2.0, -inf, 1.0, -inf]])
    assert conservative_ranks(scores, torch.tensor([1, 4])).tolist() == [2, 4]


def test_ranks_reject_nan_but_ignore_nan_in_padding_column() -> None:
    with pytest.raises(ValueError, match="NaN"):
        conservative_ranks(torch.tensor([[0.0, 0.2, NAN, 0.1]]), torch.tensor([1]))
    ok = conservative_ranks(torch.tensor([[NAN, 0.2, 0.3, 0.1]]), torch.tensor([1]))
    assert ok.tolist() == [2]


@pytest.mark.parametrize("bad", [[0], [5], [-1]])
def test_ranks_reject_padding_and_out_of_range_targets(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="targets"):
        conservative_ranks(torch.rand(1, 5), torch.tensor(bad))


def test_ranks_reject_length_mismatch() -> None:
    with pytest.raises(ValueError, match="length"):
        conservative_ranks(torch.rand(2, 5), torch.tensor([1]))


@st.composite
def int_scores_and_targets(draw: st.DrawFn) -> tuple[list[list[int]], list[int]]:
    n = draw(st.integers(1, 6))
    n_items = draw(st.integers(2, 9))
    # Few distinct values make ties frequent.
    scores = [[draw(st.integers(-3, 3)) for _ in range(n_items)] for _ in range(n)]
    targets = [draw(st.integers(1, n_items - 1)) for _ in range(n)]
    return scores, targets


@settings(max_examples=300, deadline=None)
@given(int_scores_and_targets())
def test_ranks_match_brute_force(case: tuple[list[list[int]], list[int]]) -> None:
    scores, targets = case
    expected = []
    for row, t in zip(scores, targets, strict=True):
        above = sum(1 for j in range(1, len(row)) if row[j] > row[t])
        tied = sum(1 for j in range(1, len(row)) if j != t and row[j] == row[t])
        expected.append(1 + above + tied)
    got = conservative_ranks(torch.tensor(scores, dtype=torch.float32), torch.tensor(targets))
    assert got.tolist() == expected


# --- top-k --------------------------------------------------------------------------------


def test_topk_excludes_padding_and_seen_items_ties_by_lower_id() -> None:
    scores = torch.tensor([[9.0, 0.3, 0.8, 0.8, 0.1, 0.8, 0.5]])
    before = scores.clone()
    # Ties inside the top-k, decided by id.
    assert topk_items(scores, 3).tolist() == [[2, 3, 5]]
    # Ties straddling the cut: lower ids win the last slots.
    assert topk_items(scores, 2).tolist() == [[2, 3]]
    assert topk_items(scores, 1).tolist() == [[2]]
    # Seen item 3 is excluded; a padding 0 in the padded form excludes nothing more.
    assert topk_items(scores, 3, exclude=[torch.tensor([3])]).tolist() == [[2, 5, 6]]
    assert topk_items(scores, 3, exclude=torch.tensor([[3, 0, 0]])).tolist() == [[2, 5, 6]]
    assert torch.equal(scores, before)


def test_topk_tie_order_on_a_wide_catalogue() -> None:
    # torch.topk returns these tied items in an arbitrary order on a wide row.
    scores = torch.zeros(2, 3000)
    scores[:, [2900, 5, 1700, 40]] = 1.0
    scores[1, 1700] = 2.0
    assert topk_items(scores, 4).tolist() == [[5, 40, 1700, 2900], [1700, 5, 40, 2900]]
    assert topk_items(scores, 5).tolist() == [[5, 40, 1700, 2900, 1], [1700, 5, 40, 2900, 1]]


def test_topk_fills_with_padding_when_too_few_eligible_items() -> None:
    scores = torch.tensor([[5.0, 0.1, 0.2, 0.3, -math.inf], [5.0, 0.4, 0.3, 0.2, 0.1]])
    got = topk_items(scores, 3, exclude=[torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)])
    # Row 0: items 1 and 2 are seen, item 4 is masked by the model (-inf).
    assert got.tolist() == [[3, 0, 0], [1, 2, 3]]


def test_topk_rejects_nan_and_bad_k() -> None:
    with pytest.raises(ValueError, match="NaN"):
        topk_items(torch.tensor([[0.0, NAN, 1.0]]), 1)
    with pytest.raises(ValueError, match="k must be"):
        topk_items(torch.rand(2, 4), 0)


def test_topk_beyond_the_catalogue_is_the_whole_catalogue_padded() -> None:
    # 3 real items, k = 20: the top-20 of a 3-item catalogue is the catalogue, then padding 0
    scores = torch.tensor([[9.0, 0.2, 0.7, 0.2], [9.0, 0.1, 0.2, 0.3]])
    got = topk_items(scores, 20)
    assert got.shape == (2, 20)
    assert got[:, :3].tolist() == [[2, 1, 3], [3, 2, 1]] and not got[:, 3:].any()
    assert topk_items(scores, 5, exclude=[torch.tensor([2]), torch.tensor([], dtype=torch.long)]).tolist() == [
        [1, 3, 0, 0, 0], [3, 2, 1, 0, 0]]
    assert topk_items(scores, 3).tolist() == got[:, :3].tolist()


@settings(max_examples=300, deadline=None)
@given(int_scores_and_targets(), st.data())
def test_topk_matches_brute_force(
    case: tuple[list[list[int]], list[int]], data: st.DataObject
) -> None:
    scores, seen = case
    n_items = len(scores[0])
    k = data.draw(st.integers(1, n_items - 1))
    expected = []
    for row, s in zip(scores, seen, strict=True):
        order = sorted((j for j in range(1, n_items) if j != s), key=lambda j: (-row[j], j))
        expected.append((order + [0] * k)[:k])
    exclude = [torch.tensor([s]) for s in seen]
    got = topk_items(torch.tensor(scores, dtype=torch.float32), k, exclude=exclude)
    assert got.tolist() == expected


# --- next-item metrics --------------------------------------------------------------------


def test_item_metrics_hand_values() -> None:
    ranks = torch.tensor([1, 2, 6, 3])
    m = item_metrics(ranks, ks=(1, 2, 5))
    assert m["recall@5"] == approx(0.75)
    assert m["precision@5"] == approx(0.75 / 5)
    assert m["mrr@5"] == approx((1 + 1 / 2 + 0 + 1 / 3) / 4)
    assert m["ndcg@5"] == approx((1 + 1 / math.log2(3) + 0 + 1 / math.log2(4)) / 4)
    assert m["recall@2"] == approx(0.5)
    assert m["precision@2"] == approx(0.25)
    assert m["mrr@2"] == approx((1 + 0.5) / 4)
    assert m["ndcg@2"] == approx((1 + 1 / math.log2(3)) / 4)
    assert m["recall@1"] == m["mrr@1"] == m["ndcg@1"] == m["precision@1"] == approx(0.25)
    assert set(m) == {f"{name}@{k}" for name in ("recall", "precision", "mrr", "ndcg")
                      for k in (1, 2, 5)}


def test_item_metrics_default_ks_and_per_target_alignment() -> None:
    ranks = torch.tensor([1, 7, 15, 30])
    m = item_metrics(ranks)
    assert m["recall@5"] == approx(0.25)
    assert m["recall@10"] == approx(0.5)
    assert m["recall@20"] == approx(0.75)
    per = per_target_item_metrics(ranks, 10)
    assert per["mrr@10"].tolist() == pytest.approx([1.0, 1 / 7, 0.0, 0.0])
    assert per["ndcg@10"].tolist() == pytest.approx([1.0, 1 / math.log2(8), 0.0, 0.0])
    assert per["recall@10"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_item_metrics_reject_empty_and_zero_ranks() -> None:
    with pytest.raises(ValueError):
        item_metrics(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="1-based"):
        item_metrics(torch.tensor([0, 1]))


# --- next-session metrics -----------------------------------------------------------------

TOPK = torch.tensor([[3, 7, 1, 9, 2], [4, 5, 6, 1, 2]])


def test_session_metrics_hand_values() -> None:
    # User 0: S = {7, 2, 8} (7 listed twice: a set, counted once); hits at slots 2 and 5.
    # User 1: S = {4}; hit at slot 1.
    sets = [torch.tensor([7, 2, 8, 7]), torch.tensor([4])]
    u = per_user_session_metrics(TOPK, sets, 5)
    assert u["recall@5"].tolist() == pytest.approx([2 / 3, 1.0])
    assert u["precision@5"].tolist() == pytest.approx([2 / 5, 1 / 5])
    assert u["mrr@5"].tolist() == pytest.approx([1 / 2, 1.0])
    dcg0 = 1 / math.log2(3) + 1 / math.log2(6)
    idcg0 = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(|S|, k) = 3 ideal hits
    assert u["ndcg@5"].tolist() == pytest.approx([dcg0 / idcg0, 1.0])

    u2 = per_user_session_metrics(TOPK, sets, 2)
    assert u2["recall@2"].tolist() == pytest.approx([1 / 3, 1.0])
    assert u2["precision@2"].tolist() == pytest.approx([1 / 2, 1 / 2])
    assert u2["mrr@2"].tolist() == pytest.approx([1 / 2, 1.0])
    # IDCG over min(3, 2) = 2 slots.
    assert u2["ndcg@2"].tolist() == pytest.approx(
        [(1 / math.log2(3)) / (1 + 1 / math.log2(3)), 1.0]
    )

    u1 = per_user_session_metrics(TOPK, sets, 1)
    assert u1["recall@1"].tolist() == [0.0, 1.0]
    assert u1["mrr@1"].tolist() == [0.0, 1.0]
    assert u1["ndcg@1"].tolist() == [0.0, 1.0]

    m = session_metrics(TOPK, sets, ks=(2, 5))
    assert m["recall@5"] == approx((2 / 3 + 1) / 2)
    assert m["precision@5"] == approx((2 / 5 + 1 / 5) / 2)
    assert m["mrr@5"] == approx((1 / 2 + 1) / 2)
    assert m["ndcg@5"] == approx((dcg0 / idcg0 + 1) / 2)
    assert m["precision@2"] == approx(0.5)


def test_session_metrics_padded_sets_equal_list_sets() -> None:
    sets = [torch.tensor([7, 2, 8]), torch.tensor([4])]
    padded = torch.tensor([[7, 2, 8], [4, 0, 0]])
    assert session_metrics(TOPK, padded, ks=(1, 3, 5)) == session_metrics(TOPK, sets, (1, 3, 5))


def test_session_metrics_padding_in_topk_never_hits() -> None:
    topk = torch.tensor([[5, 0, 0]])
    m = session_metrics(topk, torch.tensor([[5, 0]]), ks=(3,))
    assert m["recall@3"] == approx(1.0)
    assert m["precision@3"] == approx(1 / 3)


def test_session_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        session_metrics(TOPK, [torch.tensor([7]), torch.tensor([], dtype=torch.long)], (5,))
    with pytest.raises(ValueError, match="fewer than"):
        session_metrics(TOPK, [torch.tensor([7]), torch.tensor([4])], (10,))
    with pytest.raises(ValueError, match="repeat"):
        session_metrics(torch.tensor([[1, 1]]), [torch.tensor([1])], (2,))
    with pytest.raises(ValueError, match="target sets"):
        session_metrics(TOPK, [torch.tensor([7])], (5,))


def test_session_target_and_first_hit_ranks() -> None:
    scores = torch.tensor([[1e9, 0.5, 0.9, 0.5, 0.1], [0.0, 0.1, 0.2, 0.3, 0.4]])
    sets = [torch.tensor([4, 1]), torch.tensor([2])]
    ranks = session_target_ranks(scores, sets)
    assert pad_item_sets(sets).tolist() == [[4, 1], [2, 0]]
    # Row 0 as in the next-item table; row 1: item 2 has items 3 and 4 above it.
    assert ranks.tolist() == [[4, 3], [3, 0]]
    assert session_first_hit_ranks(scores, sets).tolist() == [3, 3]
    with pytest.raises(ValueError, match="NaN"):
        session_target_ranks(torch.tensor([[0.0, NAN, 1.0]]), [torch.tensor([1])])
    with pytest.raises(ValueError, match="non-empty"):
        session_first_hit_ranks(scores, [torch.tensor([1]), torch.tensor([], dtype=torch.long)])


@settings(max_examples=200, deadline=None)
@given(int_scores_and_targets(), st.data())
def test_session_metrics_match_brute_force(
    case: tuple[list[list[int]], list[int]], data: st.DataObject
) -> None:
    scores, _ = case
    n_items = len(scores[0])
    ids = st.integers(1, n_items - 1)
    sets = [data.draw(st.lists(ids, min_size=1, max_size=4)) for _ in scores]
    k = data.draw(st.integers(1, n_items - 1))
    topk = topk_items(torch.tensor(scores, dtype=torch.float32), k)
    got = per_user_session_metrics(topk, [torch.tensor(s) for s in sets], k)
    for u, (row, s) in enumerate(zip(topk.tolist(), sets, strict=True)):
        target = set(s)
        hit = [item in target for item in row]
        first = next((i + 1 for i, h in enumerate(hit) if h), None)
        dcg = sum(1 / math.log2(i + 2) for i, h in enumerate(hit) if h)
        idcg = sum(1 / math.log2(i + 2) for i in range(min(len(target), k)))
        assert got[f"recall@{k}"][u].item() == approx(sum(hit) / len(target))
        assert got[f"precision@{k}"][u].item() == approx(sum(hit) / k)
        assert got[f"mrr@{k}"][u].item() == approx(1 / first if first else 0.0)
        assert got[f"ndcg@{k}"][u].item() == approx(dcg / idcg)
        # A hit within k exists iff the best target's conservative rank is at most k,
        # unless ties at the cut-off went to a lower id.
        best = session_first_hit_ranks(
            torch.tensor([scores[u]], dtype=torch.float32), [torch.tensor(s)]
        ).item()
        if best <= k:
            assert first is not None


# --- next-session metrics from conservative per-target ranks (issue #12, item 3) ----------


def test_session_target_ranks_count_a_repeated_target_once() -> None:
    scores = torch.tensor([[0.0, 0.5, 0.9, 0.5, 0.1]])
    assert session_target_ranks(scores, [torch.tensor([3, 2, 3, 3])]).tolist() == [[3, 1, 0, 0]]
    assert session_target_ranks(scores, torch.tensor([[2, 0, 2]])).tolist() == [[1, 0, 0]]


def test_session_rank_metrics_hand_values() -> None:
    # User 0: S = {a, b, c} with ranks 2, 5, 9; user 1: S = {d} with rank 1.
    ranks = torch.tensor([[2, 5, 9], [1, 0, 0]])
    u = per_user_session_rank_metrics(ranks, 5)
    assert set(u) == {"recall@5", "precision@5", "mrr@5", "ndcg@5", "phr@5"}
    assert u["recall@5"].tolist() == pytest.approx([2 / 3, 1.0])
    assert u["precision@5"].tolist() == pytest.approx([2 / 5, 1 / 5])
    assert u["mrr@5"].tolist() == pytest.approx([1 / 2, 1.0])
    dcg0 = 1 / math.log2(3) + 1 / math.log2(6)
    idcg0 = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(|S|, k) = 3 ideal slots
    assert u["ndcg@5"].tolist() == pytest.approx([dcg0 / idcg0, 1.0])
    assert u["phr@5"].tolist() == [1.0, 1.0]
    u1 = per_user_session_rank_metrics(ranks, 1)
    assert u1["recall@1"].tolist() == [0.0, 1.0] and u1["phr@1"].tolist() == [0.0, 1.0]
    assert u1["mrr@1"].tolist() == [0.0, 1.0] and u1["ndcg@1"].tolist() == [0.0, 1.0]
    m = session_rank_metrics(ranks, ks=(1, 5))
    assert m["mrr@5"] == approx(0.75) and m["phr@1"] == approx(0.5)
    assert m["ndcg@5"] == approx((dcg0 / idcg0 + 1) / 2)


def test_session_rank_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        session_rank_metrics(torch.tensor([[1, 0], [0, 0]]), (5,))
    with pytest.raises(ValueError, match="integers"):
        session_rank_metrics(torch.tensor([[1.0]]), (5,))
    with pytest.raises(ValueError, match="2-D"):
        session_rank_metrics(torch.tensor([1, 2]), (5,))
    with pytest.raises(ValueError, match="no users"):
        session_rank_metrics(torch.zeros((0, 1), dtype=torch.long), (5,))


def test_all_tied_scores_give_no_hit_whatever_the_ids() -> None:
    # POP with every train count equal: every score ties, so every target ranks last-equal
    # (n_items - 1 = 30) whether the targets have the lowest ids or the highest.
    scores = torch.ones(4, 31)
    for ids in ([1, 2, 3], [28, 29, 30]):
        ranks = session_target_ranks(scores, [torch.tensor(ids)] * 4)
        assert ranks.tolist() == [[30, 30, 30]] * 4
        m = session_rank_metrics(ranks, (5, 10, 20, 30))
        assert all(v == 0.0 for k, v in m.items() if not k.endswith("@30")), m
        assert m["recall@30"] == approx(1.0) and m["mrr@30"] == approx(1 / 30)
    # the id-ordered list would have "hit" the low ids: the shown list is not the metric
    topk = topk_items(scores, 5)
    assert session_metrics(topk, [torch.tensor([1, 2, 3])] * 4, (5,))["recall@5"] == 1.0


def test_ties_among_targets_count_against_each_other() -> None:
    # items 1 and 2 (both targets) tie at the top: each has the other above it -> rank 2
    scores = torch.tensor([[0.0, 1.0, 1.0, 0.5, 0.2]])
    ranks = session_target_ranks(scores, [torch.tensor([1, 2])])
    assert ranks.tolist() == [[2, 2]]
    u = per_user_session_rank_metrics(ranks, 1)
    assert u["recall@1"].item() == 0.0 and u["mrr@1"].item() == 0.0
    u = per_user_session_rank_metrics(ranks, 2)
    assert u["recall@2"].item() == 1.0 and u["mrr@2"].item() == approx(0.5)
    assert u["ndcg@2"].item() == approx((2 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_cutoff_beyond_the_catalogue_is_well_defined() -> None:
    # 3 real items, k = 20: every target is within the top 20
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.5]])
    ranks = session_target_ranks(scores, [torch.tensor([1, 3])])
    m = session_rank_metrics(ranks, (1, 5, 20))
    assert ranks.tolist() == [[3, 2]]
    assert m["recall@20"] == m["phr@20"] == approx(1.0) and m["precision@20"] == approx(2 / 20)
    assert m["ndcg@20"] == approx((1 / math.log2(4) + 1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["mrr@20"] == approx(1 / 2) and m["recall@1"] == 0.0


@settings(max_examples=300, deadline=None)
@given(int_scores_and_targets(), st.data())
def test_session_rank_metrics_match_brute_force(
    case: tuple[list[list[int]], list[int]], data: st.DataObject
) -> None:
    """Brute force over the definition: each target's rank = 1 + #(items above) + #(other items
    tied, other targets included); metrics from those ranks. NDCG and precision stay <= 1."""
    scores, _ = case
    n_items = len(scores[0])
    ids = st.integers(1, n_items - 1)
    sets = [data.draw(st.lists(ids, min_size=1, max_size=5)) for _ in scores]
    k = data.draw(st.integers(1, n_items + 2))  # k may exceed the catalogue
    ranks = session_target_ranks(torch.tensor(scores, dtype=torch.float32), [torch.tensor(s) for s in sets])
    got = per_user_session_rank_metrics(ranks, k)
    for u, (row, s) in enumerate(zip(scores, sets, strict=True)):
        target = sorted(set(s))
        rk = [1 + sum(1 for j in range(1, n_items) if row[j] > row[t])
              + sum(1 for j in range(1, n_items) if j != t and row[j] == row[t]) for t in target]
        assert sorted(r for r in ranks[u].tolist() if r) == sorted(rk)
        hits = [r for r in rk if r <= k]
        idcg = sum(1 / math.log2(i + 2) for i in range(min(len(target), k)))
        ndcg = sum(1 / math.log2(r + 1) for r in hits) / idcg
        assert got[f"recall@{k}"][u].item() == approx(len(hits) / len(target))
        assert got[f"precision@{k}"][u].item() == approx(len(hits) / k)
        assert got[f"mrr@{k}"][u].item() == approx(1 / min(rk) if min(rk) <= k else 0.0)
        assert got[f"ndcg@{k}"][u].item() == approx(ndcg)
        assert got[f"phr@{k}"][u].item() == (1.0 if hits else 0.0)
        assert 0.0 <= ndcg <= 1.0 + 1e-12 and len(hits) <= k
        # the same ranks, one target at a time, are the next-item ranks
        nxt = conservative_ranks(torch.tensor([row] * len(target), dtype=torch.float32), torch.tensor(target))
        assert nxt.tolist() == rk


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_session_rank_metrics_equal_list_metrics_without_ties(data: st.DataObject) -> None:
    """With distinct scores the conservative ranks and the shown top-k list agree exactly; with
    ties the rank metrics are never above the list's (ties go against the targets)."""
    n_items = data.draw(st.integers(2, 12))
    n = data.draw(st.integers(1, 4))
    distinct = data.draw(st.booleans())
    ids = st.integers(1, n_items - 1)
    if distinct:
        scores = torch.stack([torch.randperm(n_items).to(torch.float32) for _ in range(n)])
    else:
        scores = torch.tensor([[data.draw(st.integers(0, 2)) for _ in range(n_items)] for _ in range(n)],
                              dtype=torch.float32)
    sets = [torch.tensor(data.draw(st.lists(ids, min_size=1, max_size=4))) for _ in range(n)]
    k = data.draw(st.integers(1, n_items + 1))
    by_rank = session_rank_metrics(session_target_ranks(scores, sets), (k,))
    by_list = session_metrics(topk_items(scores, k), sets, (k,))
    for name, v in by_rank.items():
        if distinct:
            assert v == approx(by_list[name]), name
        elif not name.startswith("ndcg"):  # the list's DCG may place hits differently
            assert v <= by_list[name] + 1e-12, name


def test_repeat_explore_recall_per_kind_over_users_with_that_kind() -> None:
    from hnvm.basket_metrics import repeat_explore_metrics

    ranks = torch.tensor([[1, 7, 3], [2, 9, 0], [4, 0, 0]])
    repeat = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    m = repeat_explore_metrics(ranks, repeat, ks=(5,))
    # repeat: user 0 has 2 (rank 1 hits, 7 not) -> 1/2, user 2 has 1 (rank 4 hits) -> 1; mean .75
    # explore: user 0 one (rank 3 hits) -> 1, user 1 two (2 hits, 9 not) -> 1/2; mean .75
    assert m == {"recall_repeat@5": 0.75, "recall_explore@5": 0.75}
    assert "recall_repeat@5" not in repeat_explore_metrics(ranks, torch.zeros_like(repeat), ks=(5,))
    with pytest.raises(ValueError, match="do not match"):
        repeat_explore_metrics(ranks, repeat[:, :2], ks=(5,))


def test_repeat_share_counts_shown_items_only() -> None:
    from hnvm.basket_metrics import repeat_share

    top = torch.tensor([[5, 3, 0], [1, 2, 4]])
    rep = torch.tensor([[True, False, False], [True, True, True]])
    # user 0: 1 of 2 shown items (0 = padding) at k = 3; user 1: 3 of 3
    assert repeat_share(top, rep, ks=(1, 3)) == {"repeat_share@1": 1.0, "repeat_share@3": 0.75}
    assert repeat_share(top[:0], rep[:0], ks=(1,)) == {}
