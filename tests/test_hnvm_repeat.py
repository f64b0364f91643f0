"""HNVM's repeat channel: its features equal a direct count, its sparse terms agree across the
three ways training and scoring read them, it starts silent (zero weights = the paper's HNVM),
the online steps give `score` / `score_sessions`, and it learns what a user buys again."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from hnvm.contract import Batch
from hnvm.data.batches import Sequences, next_item_batches, next_session_batches
from hnvm.data.prepare import PrepareConfig, build_dataset
from hnvm.data.samples import synthetic_dataset
from hnvm.evaluate import evaluate_next_session
from hnvm.models.hnvm import HNVM, HNVMConfig
from hnvm.models.hnvm_repeat import DECAYS, RepeatChannel, RepeatMemory, history_pairs, prefix_pairs
from hnvm.training import TrainConfig

SMALL = dict(hidden=16, emb_dim=16, d_e=4, d_z=4, mlp_hidden=16, n_negatives=16, batch_size=16)


def _random_sessions(g: np.random.Generator, B: int, S: int, T: int, n_items: int) -> torch.Tensor:
    """Long[B, S, T]: right-padded sessions, some empty (padding), items may repeat."""
    out = np.zeros((B, S, T), dtype=np.int64)
    for b in range(B):
        for s in range(S):
            n = int(g.integers(0, T + 1)) if g.random() < 0.8 else 0
            out[b, s, :n] = g.integers(1, n_items + 1, n)
    return torch.from_numpy(out)


def test_history_and_prefix_features_equal_a_direct_count() -> None:
    g = np.random.default_rng(0)
    hist, win = _random_sessions(g, 5, 4, 5, 9), _random_sessions(g, 5, 3, 6, 9)
    pairs = history_pairs(hist, win)
    got = {(int(r), int(i)): f.tolist() for r, i, f in zip(pairs.row, pairs.item, pairs.feat, strict=True)}
    want = {}
    for b in range(5):
        for w in range(3):
            before = [set(s[s > 0].tolist()) for s in [*hist[b], *win[b, :w]]]
            before = [s for s in before if s]  # empty sessions are not sessions
            for item in set().union(*before):
                c = sum(item in s for s in before)
                since = len(before) - max(n for n, s in enumerate(before) if item in s)
                decayed = [sum(r ** (len(before) - 1 - n) for n, s in enumerate(before) if item in s)
                           / sum(r**i for i in range(len(before))) for r in DECAYS]
                want[(b * 3 + w, item)] = [1.0, float(np.log1p(c)), c / len(before), 1 / since, float(since == 1),
                                           *decayed]
    assert got.keys() == want.keys()
    for key, f in want.items():
        np.testing.assert_allclose(got[key], f, rtol=1e-6)

    flat = win.reshape(15, 6)
    rows, pos = (flat > 0).nonzero(as_tuple=True)  # every target position
    pp = prefix_pairs(flat, rows, pos)
    got = {(int(k), int(i)): f.tolist() for k, i, f in zip(pp.row, pp.item, pp.feat, strict=True)}
    want = {}
    for k, (r, t) in enumerate(zip(rows.tolist(), pos.tolist(), strict=True)):
        prefix = flat[r, :t].tolist()
        for item in set(prefix):
            want[(k, item)] = [float(np.log1p(prefix.count(item))), float(item == prefix[-1])]
    assert got.keys() == want.keys()
    for key, f in want.items():
        np.testing.assert_allclose(got[key], f, rtol=1e-6)


def test_memory_features_equal_history_pairs() -> None:
    g = np.random.default_rng(1)
    hist = _random_sessions(g, 1, 6, 5, 12)
    memory = RepeatMemory()
    for s in hist[0]:
        memory.fold(s[s > 0].numpy())
    pairs = history_pairs(hist, torch.zeros(1, 1, 1, dtype=torch.long))
    m = memory.features()
    assert sorted(pairs.item.tolist()) == sorted(m.item.tolist())
    a, b = pairs.feat[pairs.item.argsort()], m.feat[m.item.argsort()]
    assert torch.equal(a[:, :5], b[:, :5])  # the same integers through the same function
    torch.testing.assert_close(a, b)  # the decayed shares: another summation order


def _random_channel(seed: int, B: int, n_items: int, cond_dim: int, hidden: int) -> tuple:
    """A channel with random weights and the inputs of every target of B rows x 2 window sessions:
    (channel, cond [2B, cond_dim], history pairs, hidden [K, hidden], rows [K], prefix pairs)."""
    torch.manual_seed(seed)
    g = np.random.default_rng(seed + 2)
    hist, win = _random_sessions(g, B, 3, 4, n_items), _random_sessions(g, B, 2, 5, n_items)
    channel = RepeatChannel(cond_dim=cond_dim, hidden=hidden, n_items=n_items, sparse=False)
    for p in channel.parameters():
        torch.nn.init.normal_(p)
    b, w, t = (win > 0).nonzero(as_tuple=True)
    rows = b * 2 + w
    return (channel, torch.randn(2 * B, cond_dim), history_pairs(hist, win), torch.randn(len(rows), hidden), rows,
            prefix_pairs(win.reshape(2 * B, 5), rows, t))


def test_sparse_terms_agree_dense_shared_and_per_target() -> None:
    n_items = 11
    g = np.random.default_rng(2)
    channel, cond, hp, hidden, rows, pp = _random_channel(0, 3, n_items, cond_dim=6, hidden=5)
    terms = channel.terms(cond, hp, hidden, rows, pp, n_items)
    dense = terms.add_to(torch.zeros(len(rows), n_items + 1))
    assert (dense != 0).any()
    ids = torch.tensor([3, 1, 3, 7, 11, 2])  # shared candidates, with a duplicate
    torch.testing.assert_close(terms.shared(ids), dense[:, ids])
    items = torch.from_numpy(g.integers(1, n_items + 1, len(rows)))
    torch.testing.assert_close(terms.at(items), dense[torch.arange(len(rows)), items])


def test_terms_follow_the_formula() -> None:
    """score += g_k·(rho_j·had + a_n·phi(n, j)) + c_k·psi(k, j), written out for every (k, j)."""
    n_items = 9
    channel, cond, hp, hidden, rows, pp = _random_channel(1, 2, n_items, cond_dim=3, hidden=4)
    got = channel.terms(cond, hp, hidden, rows, pp, n_items).add_to(torch.zeros(len(rows), n_items + 1))
    gain = 10.0
    a = cond @ channel.session_gate.weight.T + gain * channel.session_gate.bias  # [4, 7]
    tg = hidden @ channel.target_gate.weight.T + gain * channel.target_gate.bias  # [K, 3]
    want = torch.zeros_like(got)
    for k in range(len(rows)):
        for r, i, f in zip(hp.row.tolist(), hp.item.tolist(), hp.feat, strict=True):
            if r == int(rows[k]):
                rho = gain * channel.propensity.weight[i, 0]
                want[k, i] += (1 + torch.tanh(tg[k, 0])) * (rho * f[0] + a[r] @ f)
        for q, i, f in zip(pp.row.tolist(), pp.item.tolist(), pp.feat, strict=True):
            if q == k:
                want[k, i] += tg[k, 1:] @ f
    torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def small_data():
    return synthetic_dataset(n_users=20, n_items=25, n_topics=3, session_length=(2, 6), seed=3,
                             config=PrepareConfig(min_item_support=1))


def test_a_silent_channel_is_the_paper_model(small_data) -> None:
    """With its weights at their init (0) the channel adds nothing: the same network weights
    give the paper's scores, next item and next session."""
    seq = Sequences.from_events(small_data.events, small_data.n_users)
    off = HNVM(HNVMConfig(**SMALL)).fit(small_data, train_cfg=TrainConfig(epochs=1, seed=1))
    on = HNVM(HNVMConfig(**SMALL, repeat=True))
    on.net, on.counts_ = on._build(small_data.n_items, small_data.n_users), off.counts_
    missing = on.net.load_state_dict(off.net.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("repeat.") for k in missing)
    batch = next(next_item_batches(seq, "test"))
    assert torch.equal(on.score(batch), off.score(batch))
    batch = next(next_session_batches(seq, "test"))[0]
    assert torch.equal(on.score_sessions(batch), off.score_sessions(batch))


def _session_row(sessions: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(1, max(len(sessions), 1), max((len(s) for s in sessions), default=1), dtype=torch.long)
    for j, s in enumerate(sessions):
        out[0, j, : len(s)] = torch.tensor(s)
    return out


def test_a_batch_scores_each_row_as_it_would_alone(small_data) -> None:
    """Rows of one evaluation batch (histories and prefixes of different lengths) get the scores
    they get alone: the sparse terms never cross rows."""
    seq = Sequences.from_events(small_data.events, small_data.n_users)
    m = HNVM(HNVMConfig(**SMALL, repeat=True)).fit(small_data, train_cfg=TrainConfig(epochs=2, seed=1))
    batch = next(next_item_batches(seq, "test", max_targets=40))
    full = m.score(batch)
    for k in range(batch.n_targets):
        r = int(batch.target_rows[k])
        one = Batch(batch.users[r:r + 1], batch.sessions[r:r + 1], torch.tensor([0]), batch.target_pos[k:k + 1])
        torch.testing.assert_close(full[k:k + 1], m.score(one), atol=1e-5, rtol=1e-5)
    sb = next(next_session_batches(seq, "test"))[0]
    full = m.score_sessions(sb)
    for r in range(len(sb.users)):
        one = Batch(sb.users[r:r + 1], sb.sessions[r:r + 1], torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long))
        torch.testing.assert_close(full[r:r + 1], m.score_sessions(one), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"max_len": 2}, {"use_e": False, "use_history": False}])
def test_online_steps_with_repeat_equal_score_and_score_sessions(small_data, overrides) -> None:
    seq = Sequences.from_events(small_data.events, small_data.n_users)
    m = HNVM(HNVMConfig(**SMALL, repeat=True, **overrides)).fit(small_data, train_cfg=TrainConfig(epochs=2, seed=1))
    assert any(bool((p != 0).any()) for p in m.net.repeat.parameters())  # it trained
    uid = max(range(1, small_data.n_users + 1), key=lambda u: int(seq.user_end[u] - seq.user_first[u]))
    sessions = [seq.session(s).tolist() for s in range(int(seq.user_first[uid]), int(seq.user_end[uid]))]
    *hist, last = sessions
    hist = [*hist, hist[0]]  # a repeated session: counts above 1
    empty = torch.zeros(0, dtype=torch.long)
    for user, past, prefix in ((uid, hist, last[:2]), (uid, hist, []), (uid, hist, [last[0], last[0]]), (0, [], [])):
        users = torch.tensor([user])
        h_con, memory = m.initial_context(1), m.repeat_memory()
        for s in past:
            h_con = m.fold_session(h_con, torch.tensor(s))
            m.repeat_fold(memory, s)
        cond = m.session_condition(h_con, m.general_preference(users))
        h = m.decoder_step(m.bos, None, cond)
        for item in prefix:
            h = m.decoder_step(item, h, cond)
        got = m.add_repeat(m.score_state(h), memory, prefix, cond, h)
        batch = Batch(users, _session_row([*past, [*prefix, 1]]), torch.tensor([0]), torch.tensor([len(prefix)]))
        torch.testing.assert_close(got[:, 1:], m.score(batch)[:, 1:], atol=1e-5, rtol=1e-5)
        if not prefix:
            want = m.score_sessions(Batch(users, _session_row(past) if past else empty.view(1, 0, 1), empty, empty))
            torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)


def repeat_log(n_users: int = 150, n_items: int = 300, seed: int = 0) -> pl.DataFrame:
    """Each user buys 3-5 items per day from a personal set of 8 (their staples, drawn from the
    whole catalogue), plus one random item: most of a basket was bought before."""
    g = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        staples = g.choice(np.arange(1, n_items + 1), 8, replace=False)
        for day in range(10):
            basket = [*g.choice(staples, int(g.integers(3, 6)), replace=False), int(g.integers(1, n_items + 1))]
            for j, item in enumerate(dict.fromkeys(int(i) for i in g.permutation(basket))):
                rows.append((u, item, 1_600_000_000 + day * 86_400 + j * 60))
    return pl.DataFrame(rows, schema=["user", "item", "ts"], orient="row")


def test_learns_what_users_buy_again() -> None:
    raw = repeat_log()
    canonical = raw.with_columns(seq=pl.lit(0, dtype=pl.Int64), line=pl.int_range(1, pl.len() + 1, dtype=pl.UInt32))
    ds = build_dataset(canonical, PrepareConfig(min_item_support=1, min_session_length=1), source={"test": "repeat"})
    seq = Sequences.from_events(ds.events, ds.n_users)
    cfg = TrainConfig(epochs=4, seed=0, lr=0.01)
    on = HNVM(HNVMConfig(**SMALL, repeat=True)).fit(ds, train_cfg=cfg)
    off = HNVM(HNVMConfig(**SMALL)).fit(ds, train_cfg=cfg)
    mrr_on, mrr_off = (evaluate_next_session(m, seq).metrics["mrr@5"] for m in (on, off))
    assert mrr_on > 0.5 and mrr_on > 1.5 * mrr_off, (mrr_on, mrr_off)
