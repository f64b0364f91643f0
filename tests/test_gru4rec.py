"""GRU4Rec against its reference implementation's definitions: session-parallel mini-batches,
the bpr-max / cross-entropy losses, popularity sampling, the indexed Adagrad-with-momentum
update, prefix-only scoring, and that it learns sequences (beats POP on synthetic data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hnvm.contract import Batch
from hnvm.data.batches import Sequences
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import ConfigError
from hnvm.evaluate import evaluate_next_item
from hnvm.models.gru4rec import GRU4Rec, GRU4RecConfig, _GRU4RecTrainable
from hnvm.models.gru4rec_net import (
    GRU4RecNet,
    PopularitySampleCache,
    in_batch_bpr_loss,
    in_batch_bpr_max_loss,
    in_batch_cross_entropy_loss,
    lookup,
    session_parallel_steps,
    stable_sort,
    training_order,
)
from hnvm.models.layers import bpr_loss as shared_bpr
from hnvm.models.layers import bpr_max_loss as shared_bpr_max
from hnvm.models.layers import sampled_softmax_loss
from hnvm.models.pop import Pop
from hnvm.runs import resolve_config
from hnvm.training import AdagradMomentum, TrainConfig

SMALL = dict(layers=(24,), batch_size=8, n_sample=16, sample_cache_size=2048)


def _flat(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.arange(1, offsets[-1] + 1, dtype=np.int64), offsets  # item = event index + 1


# ---- session-parallel mini-batches ------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 5, 40])
def test_every_event_once_and_resets_exactly_at_session_starts(batch_size: int) -> None:
    rs = np.random.default_rng(batch_size)
    lengths = rs.integers(2, 9, size=23).tolist()
    items, offsets = _flat(lengths)
    order = rs.permutation(len(lengths))
    session_of = np.repeat(np.arange(len(lengths)), lengths)
    seen: list[int] = []
    prev: np.ndarray | None = None
    first_seen: list[int] = []
    for st in session_parallel_steps(items, offsets, order, batch_size):
        ev = st.events
        assert 1 <= len(ev) <= batch_size
        assert torch.equal(st.inputs, torch.from_numpy(items[ev]))
        assert torch.equal(st.targets, torch.from_numpy(items[ev + 1]))  # same session's next
        assert (session_of[ev + 1] == session_of[ev]).all()
        assert (session_of[ev] == st.sessions).all()
        starts = ev == offsets[st.sessions]
        if prev is None:
            assert starts.all() and st.reset is not None and bool(st.reset.all())
        else:
            if st.keep is not None:
                assert len(st.keep) < len(prev)  # slots only leave when nothing can refill them
                prev = prev[st.keep.numpy()]
            assert len(prev) == len(ev)
            reset = np.zeros(len(ev), bool) if st.reset is None else st.reset.numpy()
            assert (reset == starts).all()  # a reset exactly where a session begins
            assert (ev[~reset] == prev[~reset] + 1).all()  # otherwise the slot continues
        first_seen.extend(st.sessions[starts].tolist())
        seen.extend(ev.tolist())
        prev = ev
    expected = np.setdiff1d(np.arange(offsets[-1]), offsets[1:] - 1)  # all but session-last
    assert sorted(seen) == expected.tolist()  # every input -> target pair exactly once
    assert first_seen == order.tolist()  # sessions enter in the given order


def test_training_order_is_by_start_time_and_skips_single_events() -> None:
    import polars as pl

    events = pl.DataFrame({
        "user": [1, 1, 1, 2, 2, 2, 2, 3], "session": [0, 0, 1, 2, 2, 3, 3, 4],
        "item": [1, 2, 3, 1, 2, 3, 1, 2], "ts": [50, 51, 90, 10, 11, 50, 52, 5],
        "pos": [0, 1, 0, 0, 1, 0, 1, 0],
        "split": pl.Series(["train"] * 7 + ["valid"]).cast(pl.Enum(["train", "valid", "test"])),
    })
    seq = Sequences.from_events(events, 3)
    assert training_order(seq, events, ("train",)).tolist() == [2, 0, 3]  # 1: one event only
    assert training_order(seq, events, ("train", "valid")).tolist() == [2, 0, 3]
    assert training_order(seq, events, ("train",), by="id").tolist() == [0, 2, 3]


def test_trainer_state_follows_each_session_from_its_start() -> None:
    """With dropout off, the state carried by the trainable after every step equals the GRU
    run over that slot's session prefix from a zero state (keep/reset applied correctly)."""
    ds = synthetic_dataset(n_users=30, n_items=30, n_topics=3, seed=4)
    model = GRU4Rec(GRU4RecConfig(**{**SMALL, "batch_size": 4}))
    seq = Sequences.from_events(ds.events, ds.n_users)
    model.net = model._build(ds.n_items)
    counts = torch.ones(ds.n_items + 1)
    tr = _GRU4RecTrainable(model, seq, training_order(seq, ds.events, ("train",)), counts)
    net = tr.module.eval()
    for i, st in enumerate(tr.train_batches(0, np.random.default_rng(0))):
        tr.loss(st, i)
        assert tr.state is not None
        for r in range(0, len(st.events), 2):
            s = int(st.sessions[r])
            k = int(st.events[r] - seq.offsets[s])  # position of the input in its session
            want = net.run(torch.from_numpy(seq.session(s)[: k + 1]).unsqueeze(0))[0, -1]
            torch.testing.assert_close(tr.state[-1][r], want)
        if i > 30:
            break


# ---- losses and sampling ----------------------------------------------------------------------


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    b, m = x.shape
    keep = ~torch.eye(b, m, dtype=torch.bool)
    return x[keep].view(b, m - 1)


def test_bpr_max_hand_values() -> None:
    s = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    # one negative per row: softmax weight 1 -> -log σ(target - neg) + bpreg · neg²
    want = (-math.log(1 / (1 + math.exp(-(1.0 + 2.0)))) + 0.5 * 4.0
            - math.log(1 / (1 + math.exp(-(3.0 - 0.5)))) + 0.5 * 0.25)
    assert in_batch_bpr_max_loss(s, bpreg=0.5, elu_p=0.0).item() == pytest.approx(want, rel=1e-6)
    # the final ELU(elu_p) acts on every score first: -2 -> 0.5 (e^-2 - 1)
    e = 0.5 * (math.exp(-2.0) - 1.0)
    want_elu = (-math.log(1 / (1 + math.exp(-(1.0 - e)))) + 0.5 * e * e
                - math.log(1 / (1 + math.exp(-(3.0 - 0.5)))) + 0.5 * 0.25)
    assert in_batch_bpr_max_loss(s, bpreg=0.5, elu_p=0.5).item() == pytest.approx(want_elu, rel=1e-6)


def test_bpr_max_matches_the_shared_definition() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 6 + 9, generator=g) * 2
    act = F.elu(scores, 0.5)
    want = shared_bpr_max(act.diagonal(), _off_diagonal(act), bpreg=1.95, reduction="sum")
    torch.testing.assert_close(in_batch_bpr_max_loss(scores, 1.95, 0.5), want)


def test_plain_bpr_matches_the_shared_definition() -> None:
    """In-batch BPR = the shared BPR (mean over the negatives, summed over rows) with the other
    columns of a row as its negatives; its gradient flows to targets and negatives only."""
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(5, 5 + 7, generator=g) * 2).requires_grad_()
    want = shared_bpr(scores.diagonal(), _off_diagonal(scores), reduction="sum")
    got = in_batch_bpr_loss(scores)
    torch.testing.assert_close(got, want)
    got.backward()
    assert (scores.grad.diagonal() < 0).all() and (_off_diagonal(scores.grad) > 0).all()


def _bpr_max_autograd(scores: torch.Tensor, bpreg: float, elu_p: float) -> torch.Tensor:
    """The reference's bpr_max_loss_with_elu, operation for operation (gradient by autograd)."""
    if elu_p > 0:
        scores = F.elu(scores, elu_p)
    hm = 1.0 - torch.eye(*scores.shape, dtype=scores.dtype)
    x = scores * hm
    e = torch.exp(x - x.max(dim=1, keepdim=True)[0]) * hm
    s = e / e.sum(dim=1, keepdim=True)
    target = torch.diag(scores).reshape(scores.shape[0], -1)
    return torch.sum(-torch.log(torch.sum(torch.sigmoid(target - scores) * s, dim=1) + 1e-24)
                     + bpreg * torch.sum(scores**2 * s, dim=1))


@pytest.mark.parametrize("shape", [(6, 15), (4, 4), (1, 3), (64, 2112)])
@pytest.mark.parametrize("elu_p", [0.0, 0.5])
def test_bpr_max_value_is_the_reference_s_and_its_closed_form_gradient_autograd_s(
        shape: tuple[int, int], elu_p: float) -> None:
    g = torch.Generator().manual_seed(shape[1])
    scores = torch.randn(*shape, generator=g) * 3
    a, b = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    want, got = _bpr_max_autograd(a, 1.95, elu_p), in_batch_bpr_max_loss(b, 1.95, elu_p)
    assert torch.equal(got, want)  # the same operations: the same bits
    (want * 0.3).backward()
    (got * 0.3).backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    x = (torch.randn(3, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: in_batch_bpr_max_loss(z, 0.7, elu_p), (x,))


def test_cross_entropy_with_logq_matches_the_shared_sampled_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 5 + 7, generator=g)
    logq_cols = torch.rand(12, generator=g) * 3
    got = in_batch_cross_entropy_loss(scores, logq_cols, logq=1.0)
    lq = logq_cols.expand(5, -1)
    want = sampled_softmax_loss(scores.diagonal(), _off_diagonal(scores), lq.diagonal(),
                                _off_diagonal(lq), reduction="sum")
    torch.testing.assert_close(got, want)
    plain = -torch.log_softmax(scores, 1).diagonal().sum()
    torch.testing.assert_close(in_batch_cross_entropy_loss(scores, logq_cols, logq=0.0), plain)


def test_popularity_sampling_follows_count_to_the_alpha_and_is_cached() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([0.0, 1.0, 4.0, 9.0, 0.0])  # id 0 = padding, id 4 never seen
    cache = PopularitySampleCache(counts, alpha=0.5, n_sample=1000, cache_size=200_000)
    first = cache.get()
    assert cache.cache.shape == (200, 1000) and cache.pointer == 1
    draws = torch.cat([first] + [cache.get() for _ in range(199)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0, 1, 2, 3, 0]) / 6.0, atol=5e-3, rtol=0)
    old = cache.cache
    cache.get()  # exhausted: one bulk redraw
    assert cache.pointer == 1 and cache.cache is not old


# ---- the optimizer --------------------------------------------------------------------------


def test_adagrad_momentum_sparse_rows_only_as_the_reference() -> None:
    """IndexedAdagradM: acc += g², v = μ v - lr g / sqrt(acc + eps), p += v on the rows of the
    sparse gradient only; other rows keep their value, accumulator and velocity."""
    emb = torch.nn.Embedding(4, 2, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.arange(8.0).view(4, 2))
    opt = AdagradMomentum(emb.parameters(), lr=0.1, momentum=0.5, eps=1e-6)
    p = emb.weight.detach().clone()
    acc, vel = torch.zeros(4, 2), torch.zeros(4, 2)
    for rows, scale in (([0, 1, 1], 1.0), ([2, 3], -2.0), ([1], 0.5)):
        opt.zero_grad()
        (emb(torch.tensor(rows)) * scale).sum().backward()
        opt.step()
        g = torch.zeros(4, 2)
        for r in rows:
            g[r] += scale
        touched = torch.tensor(sorted(set(rows)))
        acc[touched] += g[touched] ** 2
        vel[touched] = 0.5 * vel[touched] - 0.1 * g[touched] / (acc[touched] + 1e-6).sqrt()
        p[touched] += vel[touched]
        torch.testing.assert_close(emb.weight.detach(), p)
    # dense gradients: the same formula on every entry (momentum applies everywhere)
    w = torch.nn.Parameter(torch.ones(3))
    opt = AdagradMomentum([w], lr=0.1, momentum=0.5)
    for _ in range(2):
        opt.zero_grad()
        (w * torch.tensor([1.0, 0.0, 2.0])).sum().backward()
        opt.step()
    a = torch.tensor([1.0, 0.0, 4.0])
    v1 = -0.1 * torch.tensor([1.0, 0.0, 2.0]) / (a + 1e-6).sqrt()
    v2 = 0.5 * v1 - 0.1 * torch.tensor([1.0, 0.0, 2.0]) / (2 * a + 1e-6).sqrt()
    torch.testing.assert_close(w.detach(), 1 + v1 + v2)
    # an initial accumulator G0 (TensorFlow's 0.1) replaces the sign-like first step lr·g/|g|
    for sparse in (False, True):
        e = torch.nn.Embedding(2, 1, sparse=sparse)
        with torch.no_grad():
            e.weight.fill_(1.0)
        opt = AdagradMomentum(e.parameters(), lr=0.1, initial_accumulator=0.1)
        opt.zero_grad()
        (e(torch.tensor([0])) * 0.01).sum().backward()
        opt.step()
        want = torch.tensor([[1 - 0.1 * 0.01 / (0.1 + 1e-4 + 1e-6) ** 0.5], [1.0]])
        torch.testing.assert_close(e.weight.detach(), want)


def test_sparse_lookup_gives_the_embedding_gradient_already_coalesced() -> None:
    """lookup(table, ids): nn.Embedding's values and (summed) sparse gradient, with one sorted
    entry per row and marked coalesced, so that the optimizer's update is the same without the
    coalesce; tables with dense gradients and no-grad calls take nn.Embedding's own path."""
    torch.manual_seed(0)
    ids = torch.tensor([5, 1, 5, 7, 1, 1, 9, 0])
    for width in (3, 1):
        ours, plain = (torch.nn.Embedding(10, width, sparse=True) for _ in range(2))
        plain.load_state_dict(ours.state_dict())
        up = torch.randn(len(ids), width)
        (lookup(ours, ids) * up).sum().backward()
        (plain(ids) * up).sum().backward()
        g = ours.weight.grad
        assert g.is_sparse and g.is_coalesced() and g.indices()[0].tolist() == [0, 1, 5, 7, 9]
        torch.testing.assert_close(g.to_dense(), plain.weight.grad.to_dense())
        steps = [AdagradMomentum(t.parameters(), lr=0.1, momentum=0.4) for t in (ours, plain)]
        for opt in steps:
            opt.step()
        torch.testing.assert_close(ours.weight, plain.weight)
    dense = torch.nn.Embedding(10, 3)
    lookup(dense, ids).sum().backward()
    assert not dense.weight.grad.is_sparse
    with torch.no_grad():
        assert torch.equal(lookup(ours, ids), ours(ids))


@pytest.mark.parametrize("mode", [dict(constrained_embedding=True),
                                  dict(constrained_embedding=False, embedding=12)])
def test_train_step_is_advance_then_score_items(mode: dict) -> None:
    """The training step's single item-table lookup gives the scores, state and gradients of
    advance + score_items (nn.Embedding's lookups)."""
    c = GRU4RecConfig(**{**SMALL, "layers": (16,), **mode})
    nets = [GRU4RecNet(50, c.layers, c.embedding, c.constrained_embedding, 0.0, 0.0,
                       sparse=True, seed=3) for _ in range(2)]
    items, cols = torch.tensor([1, 2, 3, 2]), torch.tensor([4, 2, 9, 1, 4, 4, 30])
    state = [torch.randn(4, 16)]
    scores, new = nets[0].train_step(items, state, cols)
    h, want_state = nets[1].advance(items, state)
    want = nets[1].score_items(h, cols)
    torch.testing.assert_close(scores, want)
    torch.testing.assert_close(new[0], want_state[0])
    up = torch.randn(scores.shape)
    (scores * up).sum().backward()
    (want * up).sum().backward()
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
        a, b = (t.grad.to_dense() if t.grad.is_sparse else t.grad for t in (p, q))
        torch.testing.assert_close(a, b, msg=name)


# ---- the network and scoring ------------------------------------------------------------------


@pytest.mark.parametrize("mode", [dict(constrained_embedding=True),
                                  dict(constrained_embedding=False, embedding=12),
                                  dict(constrained_embedding=False, embedding=0, layers=(16, 8))])
def test_input_modes_and_reference_init(mode: dict) -> None:
    c = GRU4RecConfig(**{**SMALL, "layers": (16,), **mode})
    net = GRU4RecNet(50, c.layers, c.embedding, c.constrained_embedding, 0.0, 0.0, seed=3)
    if net.mode == "constrained":
        assert not hasattr(net, "E") and not hasattr(net, "GE")
    a = math.sqrt(6 / (50 + c.layers[-1]))
    assert net.Wy.weight.abs().max() <= a and net.Wy.weight.abs().max() > 0.9 * a
    assert net.By.weight.abs().sum() == 0
    for cell in net.G:
        assert cell.bias_ih.abs().sum() == 0
        lim = math.sqrt(6 / (cell.input_size + cell.hidden_size))
        assert lim * 0.9 < cell.weight_ih.abs().max() <= lim
    h, state = net.advance(torch.tensor([1, 2, 3]), net.init_state(3))
    assert h.shape == (3, c.layers[-1]) and [s.shape[1] for s in state] == list(c.layers)
    assert net.score_items(h).shape == (3, 51)
    assert net.score_items(h, torch.tensor([4, 5])).shape == (3, 2)


def test_scores_read_the_current_session_prefix_only() -> None:
    m = GRU4Rec(GRU4RecConfig(**SMALL))
    m.net = m._build(20)
    sessions = torch.tensor([[[3, 4, 5, 0], [7, 8, 9, 10]], [[0, 0, 0, 0], [2, 6, 0, 0]]])
    batch = Batch(torch.tensor([1, 2]), sessions, torch.tensor([0, 0, 0, 1]),
                  torch.tensor([0, 1, 3, 1]))
    s = m.score(batch)
    net = m.net
    torch.testing.assert_close(s[0], net.By.weight.squeeze(1))  # empty prefix: zero state
    torch.testing.assert_close(s[1], net.score_items(net.run(torch.tensor([[7]]))[:, -1])[0])
    torch.testing.assert_close(s[2], net.score_items(net.run(torch.tensor([[7, 8, 9]]))[:, -1])[0])
    other = sessions.clone()
    other[0, 0] = torch.tensor([11, 12, 13, 14])  # history never matters (session-based)
    assert torch.equal(m.score(Batch(batch.users, other, batch.target_rows, batch.target_pos)), s)
    # next session: the user's last history session is the prefix
    hist = Batch(torch.tensor([1, 2]), sessions, torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, dtype=torch.long))
    ns = m.score_sessions(hist)
    for row, prefix in ((0, [7, 8, 9, 10]), (1, [2, 6])):
        want = net.score_items(net.run(torch.tensor([prefix]))[:, -1])[0]
        torch.testing.assert_close(ns[row], want)


def test_scores_run_only_the_steps_a_target_reads_and_equal_the_full_run_bit_for_bit() -> None:
    """The batch's sessions are as wide as its longest session of any kind (history included);
    scoring runs the GRU over the current sessions only up to the last step a target reads,
    which gives the states of the full run bit for bit (the GRU is causal and each step the
    same [B] computation), and `run` is not asked for the steps past them."""
    m = GRU4Rec(GRU4RecConfig(**SMALL))
    m.net = m._build(20)
    sessions = torch.zeros(3, 2, 9, dtype=torch.long)
    sessions[:, 0] = torch.arange(1, 10)  # a long history session widens the batch to 9 steps
    sessions[0, 1, :4] = torch.tensor([3, 4, 5, 6])
    sessions[1, 1, :2] = torch.tensor([7, 8])
    sessions[2, 1, :3] = torch.tensor([2, 9, 11])
    rows, pos = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2])
    batch = Batch(torch.tensor([1, 2, 3]), sessions, rows, pos)
    net = m.net
    full = net.run(sessions[:, -1])  # [3, 9, H]
    h = torch.zeros(len(rows), net.layers[-1])
    h[pos > 0] = full[rows[pos > 0], pos[pos > 0] - 1]
    widths = []
    real_run = net.run
    net.run = lambda items: widths.append(items.shape[1]) or real_run(items)  # type: ignore[method-assign]
    assert torch.equal(m.score(batch), net.score_items(h)) and widths == [3]
    hist = Batch(batch.users, sessions, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    last = torch.stack([full[0, 3], full[1, 1], full[2, 2]])
    assert torch.equal(m.score_sessions(hist), net.score_items(last)) and widths == [3, 4]
    # every target at the first position (no step read), and no targets at all
    first = Batch(batch.users, sessions, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long))
    assert torch.equal(m.score(first), net.score_items(torch.zeros(3, net.layers[-1]))) and widths[-1] == 0
    none = Batch(batch.users, sessions, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert m.score(none).shape == (0, 21)


def test_layers_from_config_and_command_line(tmp_path) -> None:
    rc = resolve_config("gru4rec", None, ["model.layers=50", "model.loss=bpr-max"])
    assert rc.model_config.layers == (50,) and rc.model_config.loss == "bpr-max"
    (tmp_path / "c.toml").write_text("[model]\nlayers = [50, 20]\n")
    assert resolve_config("gru4rec", tmp_path / "c.toml", []).model_config.layers == (50, 20)
    with pytest.raises(ConfigError):
        GRU4RecConfig(layers=(50, 0))


# ---- it learns sequences ----------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["bpr-max", "cross-entropy", "bpr"])
def test_beats_pop_on_sequential_synthetic_data(loss: str) -> None:
    ds = synthetic_dataset(n_users=100, n_items=60, n_topics=3, sequential=0.9, seed=7)
    seq = Sequences.from_events(ds.events, ds.n_users)
    pop = evaluate_next_item(Pop().fit(ds), seq, "test").metrics["mrr@5"]
    m = GRU4Rec(GRU4RecConfig(**{**SMALL, "loss": loss, "layers": (32,), "batch_size": 32}))
    m.fit(ds, train_cfg=TrainConfig(epochs=1, optimizer="adagrad", lr=0.1, momentum=0.3,
                                          patience=0, seed=1))
    gru = evaluate_next_item(m, seq, "test").metrics["mrr@5"]
    assert gru > 3 * pop + 0.1, (gru, pop)  # seen: about 0.6 against 0.09


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 65, 2176, 4097, 5000])
def test_stable_sort_is_torch_s_stable_sort(n: int) -> None:
    """stable_sort (numpy keys id · 2^b + position) gives torch.sort(stable=True)'s ids and
    positions, repeated ids included, and falls back to it for ids the keys cannot hold."""
    g = torch.Generator().manual_seed(n)
    for high in (3, 5216, 1 << 40):
        ids = torch.randint(0, high, (n,), generator=g)
        got, want = stable_sort(ids), torch.sort(ids, stable=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    big = torch.tensor([1 << 61, 3, 1 << 61, 0])
    assert torch.equal(stable_sort(big)[1], torch.tensor([3, 1, 0, 2]))
    negative = torch.tensor([2, -1, 2, 0])
    assert torch.equal(stable_sort(negative)[1], torch.tensor([1, 3, 0, 2]))


def test_sparse_adagrad_step_is_the_update_written_out_bit_for_bit() -> None:
    """AdagradMomentum's sparse step (temporaries reused in place) gives exactly the floats of the
    update in out-of-place operations: G[r] += g²; v[r] = μ v[r] - lr g / sqrt(G[r] + eps);
    p[r] += v[r], for the gradient's rows r only (torch's addcmul / add with alpha, as before)."""
    g = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(12, 5, generator=g))
    opt = AdagradMomentum([w], lr=0.07, momentum=0.4)
    G, v, p = torch.zeros(12, 5), torch.zeros(12, 5), w.detach().clone()
    for _ in range(3):
        rows = torch.tensor([1, 4, 7, 10])
        vals = torch.randn(4, 5, generator=g)
        w.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (12, 5), check_invariants=True).coalesce()
        opt.step()
        G[rows] = torch.addcmul(G[rows], vals, vals)
        v[rows] = torch.add(v[rows] * 0.4, vals / (G[rows] + 1e-6).sqrt(), alpha=-0.07)
        p[rows] = p[rows] + v[rows]
    assert torch.equal(w.detach(), p)
    assert torch.equal(opt.state[w]["sum"], G) and torch.equal(opt.state[w]["velocity"], v)
