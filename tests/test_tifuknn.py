"""TIFU-KNN against the authors' code on small cases (its grouping, decays and blend), and on
the Instacart sample against its published behaviour: far above POP for the next basket."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hnvm.contract import Batch
from hnvm.data.batches import Sequences
from hnvm.data.samples import synthetic_dataset
from hnvm.evaluate import evaluate_next_session
from hnvm.models.pop import Pop
from hnvm.models.tifuknn import TIFUKNN, TIFUKNNConfig, tifu_vectors, user_vectors


def reference_vector(baskets: list[list[int]], n_items: int, group_size: int, r_b: float, r_g: float) -> np.ndarray:
    """The authors' temporal_decay_sum_history + group_history_list (TIFUKNN.py), restated with
    their loops for one user: dense vectors, blocks of floor / ceil(n / group_size) baskets."""
    n = len(baskets)
    his = []
    for idx in range(1, n + 1):
        v = np.zeros(n_items)
        for e in baskets[idx - 1]:
            v[e] = r_b ** (n - idx)
        his.append(v)
    if n < group_size:
        groups, real = his, n
    else:
        est = n / group_size
        base = int(np.floor(est))
        extra = int(np.round((est - base) * group_size))
        groups, pos = [], 0
        for _ in range(group_size - extra):
            groups.append(sum(his[pos:pos + base]) / base)
            pos += base
        for _ in range(extra):
            groups.append(sum(his[pos:pos + base + 1]) / (base + 1))
            pos += base + 1
        real = group_size
    out = np.zeros(n_items)
    for i in range(real):
        out += groups[i] * r_g ** (group_size - 1 - i)
    return out / real


def user_vector(baskets: list[np.ndarray], cfg: TIFUKNNConfig) -> tuple[np.ndarray, np.ndarray]:
    """(items int64[m], weights float64[m]): the TIFU vector of one user's baskets (item-id
    arrays, oldest first), sparse: only the items the user has. The module docstring's
    definition one user and one item at a time, every sum oldest first in plain Python floats
    (the batched `tifu_vectors` must give these floats bit for bit; numpy's own means would
    pair the terms of a one-column array differently)."""
    n, G = len(baskets), cfg.n_groups
    items = np.unique(np.concatenate(baskets)) if n else np.zeros(0, dtype=np.int64)
    if n < G:
        groups = [[j] for j in range(n)]
    else:
        base, extra = divmod(n, G)
        bounds = np.cumsum([0] + [base] * (G - extra) + [base + 1] * extra)
        groups = [list(range(lo, hi)) for lo, hi in itertools.pairwise(bounds)]
    decay = cfg.group_decay ** (G - 1 - np.arange(G))  # the definition's group weights
    out = []
    for item in items:
        total = 0.0
        for g, members in enumerate(groups):
            s = 0.0
            for j in members:
                if item in baskets[j]:
                    s += cfg.within_decay ** (n - 1 - j)
            total += float(decay[g]) * (s / len(members) if n >= G else s)
        out.append(total / len(groups))
    return items.astype(np.int64), np.array(out)


@pytest.mark.parametrize("n_baskets,groups", [(3, 7), (7, 7), (9, 2), (12, 5), (1, 3)])
def test_user_vector_equals_the_authors_code(n_baskets: int, groups: int) -> None:
    rng = np.random.default_rng(n_baskets * 10 + groups)
    baskets = [list(rng.choice(np.arange(1, 12), size=int(rng.integers(1, 5)), replace=False))
               for _ in range(n_baskets)]
    cfg = TIFUKNNConfig(n_groups=groups, within_decay=0.9, group_decay=0.7)
    items, w = user_vector([np.array(b) for b in baskets], cfg)
    got = np.zeros(12)
    got[items] = w
    want = reference_vector(baskets, 12, groups, 0.9, 0.7)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    batched = user_vectors([[np.array(b) for b in baskets]], 12, cfg, dtype=np.float64).toarray()[0]
    np.testing.assert_allclose(batched, want, rtol=1e-12)  # the model's own vectors too


@pytest.mark.parametrize("groups,within,across", [(7, 0.9, 0.7), (3, 0.6, 0.95), (1, 1.0, 0.5), (40, 0.97, 0.8),
                                                   (1, 0.9000005712458081, 0.7)])
def test_batched_vectors_equal_the_one_user_definition_bit_for_bit(groups: int, within: float, across: float) -> None:
    """Users with 0..60 baskets (groups of more than 8 baskets, fewer baskets than groups,
    empty baskets, an item twice in one basket, one item only), as lists (`user_vectors`, fit)
    and as padded [B, N, T] rows (`_query`, scoring): the weights of `user_vector` bit for bit,
    in float64 (where a different order of the sums shows) and in float32 (what is kept)."""
    rng = np.random.default_rng(groups)
    cfg = TIFUKNNConfig(n_groups=groups, within_decay=within, group_decay=across)
    users = [[rng.integers(1, 30, size=int(rng.integers(0, 6))) for _ in range(int(rng.integers(0, 61)))]
             for _ in range(40)]
    users += [[np.array([7])] * 20, [np.array([3, 3])] * 60]  # one item: numpy's sums would pair terms
    want = np.zeros((len(users), 31))
    for r, baskets in enumerate(users):
        items, w = user_vector(baskets, cfg)
        want[r, items] = w
    assert (user_vectors(users, 31, cfg, dtype=np.float64).toarray() == want).all()
    assert (user_vectors(users, 31, cfg).toarray() == want.astype(np.float32)).all()
    # padded rows drop empty sessions (padding); the definition counts what is left
    padded = np.zeros((len(users), 61, 6), dtype=np.int64)
    for r, baskets in enumerate(users):
        for j, b in enumerate(baskets):
            padded[r, 61 - len(baskets) + j, :len(b)] = b
    kept = [[b for b in baskets if len(b)] for baskets in users]
    want = np.zeros((len(users), 31), dtype=np.float32)
    for r, baskets in enumerate(kept):
        items, w = user_vector(baskets, cfg)
        want[r, items] = w.astype(np.float32)
    m = TIFUKNN(cfg)
    m.vectors_ = user_vectors(users, 31, cfg)
    assert (m._query(torch.from_numpy(padded)).toarray() == want).all()
    empty = np.zeros(0, dtype=np.int64)
    assert tifu_vectors(empty, empty, empty, np.zeros(2, dtype=np.int64), 31, cfg).shape == (2, 31)
    with pytest.raises(ValueError, match="item id 31 is outside"):  # not another row's item
        tifu_vectors(np.array([0, 1]), np.array([0, 0]), np.array([31, 4]), np.array([1, 1]), 31, cfg)


def test_batched_vectors_in_row_halves_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the entry limit `user_vectors` takes slices of users, and where the sort keys
    would overflow int64 `tifu_vectors` takes halves of the rows; the vectors are the same bit
    for bit, with empty rows anywhere."""
    import hnvm.models.tifuknn as tifu

    rng = np.random.default_rng(5)
    cfg = TIFUKNNConfig(n_groups=4)
    users = [[rng.integers(1, 20, size=int(rng.integers(1, 5))) for _ in range(int(rng.integers(0, 12)))]
             for _ in range(37)]
    whole, whole64 = user_vectors(users, 21, cfg), user_vectors(users, 21, cfg, dtype=np.float64)
    monkeypatch.setattr(tifu, "_MAX_ENTRIES", 7)
    assert (user_vectors(users, 21, cfg, dtype=np.float64).toarray() == whole64.toarray()).all()
    halves = user_vectors(users, 21, cfg)
    assert (halves.toarray() == whole.toarray()).all() and halves.shape == whole.shape
    monkeypatch.undo()
    monkeypatch.setattr(tifu, "_MAX_KEY", 100)
    assert (user_vectors(users, 21, cfg).toarray() == whole.toarray()).all()


def test_blend_is_alpha_own_plus_mean_of_k_nearest_others() -> None:
    m = TIFUKNN(TIFUKNNConfig(k=2, alpha=0.75, n_groups=1, within_decay=1.0, group_decay=1.0))
    import scipy.sparse as sp

    train = np.array([[0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 0, 0]], dtype=np.float32)
    m.vectors_ = sp.csr_matrix(train)
    m.users_ = torch.tensor([1, 2, 3, 4])
    sessions = torch.tensor([[[1, 0]]])  # user 1's history: item 1 once
    batch = Batch(torch.tensor([1]), sessions, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    s = m.score_sessions(batch)[0].numpy()
    # own vector [0,1,0,0,0]; nearest others (user 1 excluded): user 2 (distance 1), user 4 (2)
    want = 0.75 * train[0] + 0.25 * (train[1] + train[3]) / 2
    np.testing.assert_allclose(s, want, rtol=1e-6)


@pytest.mark.parametrize("task", ["next-item", "next-session"])
def test_distances_from_the_queries_items_or_every_training_entry_score_alike(
        task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queries' dot products with the training users come from the queries' items (a
    sparse product reaching the users of each item) or from every training entry against the
    dense queries (SPARSE_CROSS): the same sums in the same order, so the scores are equal
    bit for bit."""
    import hnvm.models.tifuknn as tifu
    from hnvm.data.batches import next_item_batches, next_session_batches

    ds = synthetic_dataset(n_users=120, n_items=300, n_topics=6, seed=3, sessions_per_user=(4, 9))
    seq = Sequences.from_events(ds.events, ds.n_users)
    m = TIFUKNN(TIFUKNNConfig(k=10)).fit(ds)
    batch = (next(next_item_batches(seq, "test", max_targets=200)) if task == "next-item"
             else next(next_session_batches(seq, "test"))[0])
    run = m.score if task == "next-item" else m.score_sessions
    query = m._query(batch.sessions[:, :-1] if task == "next-item" else batch.sessions)
    ways = []
    for limit in (0.0, float("inf")):  # every training entry; the queries' items
        monkeypatch.setattr(tifu, "SPARSE_CROSS", limit)
        ways.append((m._cross(query, query.toarray()), run(batch)))
    assert torch.equal(ways[0][0], ways[1][0]) and ways[0][0].dtype == torch.float32
    assert torch.equal(ways[0][1], ways[1][1])


@pytest.mark.parametrize("parts", [1, 3])
def test_neighbour_mean_sums_in_topk_order_in_float32_as_the_sparse_product(
        parts: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled mean of each row's neighbours: weight x vector, rounded to float32, added
    one neighbour after another in the order given (a dense float32 loop), equal bit for bit to
    the CSR product it replaced, whatever the split of rows over threads."""
    import scipy.sparse as sp

    from hnvm.models import knn_kernels

    monkeypatch.setattr(knn_kernels, "_parts", lambda n_rows: parts)
    rng = np.random.default_rng(4)
    train = sp.random(60, 40, density=0.3, format="csr", dtype=np.float32, random_state=5)
    train.data = (train.data * rng.choice([1e-3, 1.0, 7.0], train.nnz)).astype(np.float32)
    train.sort_indices()
    k = 9
    idx = np.stack([rng.permutation(60)[:k] for _ in range(11)])  # [B, k], each row distinct
    weight = np.float32(1.0 / k)
    got = knn_kernels.neighbour_mean(idx, weight, train)
    dense = train.toarray()
    for b in range(len(idx)):
        want = np.zeros(40, dtype=np.float32)
        for u in idx[b]:
            want += weight * dense[u]
        assert np.array_equal(got[b], want), b
    pick = sp.csr_matrix((np.full(idx.size, weight), idx.ravel(), np.arange(0, idx.size + 1, k)), shape=(11, 60))
    assert got.dtype == np.float32 and np.array_equal(got, (pick @ train).toarray())
    shuffled = knn_kernels.neighbour_mean(idx[:, ::-1], weight, train)  # another order: other floats
    assert not np.array_equal(shuffled, got)


def test_a_row_s_own_user_is_never_its_neighbour_found_by_binary_search() -> None:
    """Exactly the entries a full comparison of every row's user with every training user would
    mark, ascending user ids (fit's) or not (set by hand), users without training sessions too."""
    g = torch.Generator().manual_seed(0)
    users = torch.tensor([5, 1, 9, 12, 40, 5, 0])
    for ids in (torch.tensor([1, 3, 5, 9, 12, 13]), torch.tensor([9, 1, 13, 5, 3, 12])):
        m = TIFUKNN()
        m.users_ = ids
        d = torch.rand(len(users), len(ids), generator=g)
        want = d.masked_fill(users[:, None] == ids[None], float("inf"))
        m._exclude_own(d, users)
        assert torch.equal(d, want) and int(torch.isinf(d).sum()) == 5


def test_next_basket_far_above_pop_where_people_buy_again() -> None:
    """Users re-buy their own staples (repeat-heavy synthetic baskets): TIFU-KNN, like the
    paper's finding on Instacart, is far above popularity for the next session."""
    ds = synthetic_dataset(n_users=150, n_items=120, n_topics=6, seed=4, topic_stickiness=0.95,
                           sessions_per_user=(6, 10))
    seq = Sequences.from_events(ds.events, ds.n_users)
    tifu = evaluate_next_session(TIFUKNN(TIFUKNNConfig(k=20)).fit(ds), seq, "test").metrics
    pop = evaluate_next_session(Pop().fit(ds), seq, "test").metrics
    # measured (seed 4): TIFU-KNN .610, POP .195, P-TopFreq .619
    assert tifu["recall@10"] > 2.5 * pop["recall@10"], (tifu["recall@10"], pop["recall@10"])


def test_include_current_counts_the_prefix_as_the_newest_basket() -> None:
    ds = synthetic_dataset(n_users=40, n_items=60, n_topics=3, seed=2)
    seq = Sequences.from_events(ds.events, ds.n_users)
    from hnvm.data.batches import next_item_batches

    batch = next(next_item_batches(seq, "test", max_targets=30))
    plain = TIFUKNN(TIFUKNNConfig(k=5)).fit(ds)
    current = TIFUKNN(TIFUKNNConfig(k=5, include_current=True)).fit(ds)
    a, b = plain.score(batch), current.score(batch)
    k = int((batch.target_pos > 0).nonzero()[0])
    row, pos = int(batch.target_rows[k]), int(batch.target_pos[k])
    seen = batch.sessions[row, -1, :pos]
    assert (b[k, seen] > a[k, seen] - 1e-6).all() and not torch.equal(a[k], b[k])
    # the prefix only: items at or after the target never count
    later = batch.sessions.clone()
    later[row, -1, pos:] = 1
    b2 = current.score(Batch(batch.users, later, batch.target_rows, batch.target_pos, batch.session_ids))
    assert torch.equal(b2[k], b[k])


def test_repeat_explore_breakdown_is_recomputable_from_the_export() -> None:
    """Next-session metrics carry recall on repeat and on explore targets; the export's
    target_repeat flags (was the item in the user's history?) recompute them, and a model that
    only recommends what the user had (P-TopFreq) explores far less well than it repeats."""
    from hnvm.basket_metrics import repeat_explore_metrics, repeat_share
    from hnvm.metrics import pad_item_sets
    from hnvm.models.ptopfreq import PTopFreq

    ds = synthetic_dataset(n_users=80, n_items=60, n_topics=4, seed=9, sessions_per_user=(5, 8))
    seq = Sequences.from_events(ds.events, ds.n_users)
    res = evaluate_next_session(PTopFreq().fit(ds), seq, "test", keep_ranks=True)
    assert res.ranks is not None
    f = res.ranks
    hist = {u: set(ds.events.filter((ds.events["user"] == u) & (ds.events["session"] < s))["item"].to_list())
            for u, s in zip(f["user"].to_list(), f["session"].to_list(), strict=True)}
    want = [[t in hist[u] for t in ts] for u, ts in zip(f["user"].to_list(), f["targets"].to_list(), strict=True)]
    assert f["target_repeat"].to_list() == want
    ranks = pad_item_sets([torch.tensor(r) for r in f["target_ranks"].to_list()])
    rep = pad_item_sets([torch.tensor(r, dtype=torch.long) for r in f["target_repeat"].to_list()]).bool()
    again = {**repeat_explore_metrics(ranks, rep),
             **repeat_share(torch.tensor(f["topk"].to_list()), torch.tensor(f["topk_repeat"].to_list()))}
    assert again == {k: v for k, v in res.metrics.items() if "repeat" in k or "explore" in k}
    assert res.metrics["recall_repeat@10"] > 2 * res.metrics["recall_explore@10"]
    # P-TopFreq shows what the user had first: its top 5 is nearly all repeats, POP's is not
    pop = evaluate_next_session(Pop().fit(ds), seq, "test").metrics
    assert res.metrics["repeat_share@5"] > 0.9 and pop["repeat_share@5"] < res.metrics["repeat_share@5"]
