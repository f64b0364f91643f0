"""HRNN-All, Caser and STAMP: the structural properties each paper describes (the HRNN session
reset, the user state moving only at session ends, Caser's filter geometry and example
windows) and that each learns far more than popularity on data with sequential structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hnvm.contract import Batch
from hnvm.data.batches import Sequences
from hnvm.data.samples import synthetic_dataset
from hnvm.evaluate import evaluate_next_item
from hnvm.models.caser import Caser, CaserConfig, CaserNet, last_items, training_examples
from hnvm.models.hrnn import HRNN, HRNNConfig, HRNNNet
from hnvm.models.pop import Pop
from hnvm.models.stamp import STAMP, STAMPConfig
from hnvm.training import TrainConfig

# ---- HRNN ----------------------------------------------------------------------------------------


def _hrnn_net(seed: int = 0) -> HRNNNet:
    torch.manual_seed(seed)
    return HRNNNet(n_items=30, emb_dim=8, session_hidden=6, user_hidden=5).eval()


def _sessions() -> torch.Tensor:
    """Long[3, 4, 5]: row 0 full, row 1 with a padding session first, row 2 short sessions."""
    return torch.tensor([
        [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 0, 0], [11, 12, 13, 14, 0]],
        [[0, 0, 0, 0, 0], [3, 4, 0, 0, 0], [5, 6, 7, 8, 9], [10, 11, 0, 0, 0]],
        [[2, 3, 0, 0, 0], [4, 5, 0, 0, 0], [6, 7, 0, 0, 0], [8, 9, 0, 0, 0]],
    ])


def test_hrnn_session_state_restarts_from_the_user_state() -> None:
    net, items = _hrnn_net(), _sessions()
    user0 = torch.randn(3, 5)
    with torch.no_grad():
        out = net(items, user0)
        real = (items > 0).any(-1)  # [B, W]
        # s_{m,0} = tanh(W_init c_{m-1} + b_init) at every real session start
        expected = net.session_init(out.user_in[real])
        assert torch.allclose(out.pred_states[..., 0, :][real], expected, atol=1e-6)
        # regression (the session-state reset bug): when the user state ignores session
        # content, the start of session m must not depend on session m-1's items at all;
        # a session GRU that carried its state over would depend on them
        net.user_gru.weight_ih.zero_()
        base = net(items, user0).pred_states
        changed = items.clone()
        changed[:, 1] = torch.where(changed[:, 1] > 0, (changed[:, 1] * 7) % 29 + 1, 0)
        start = net(changed, user0).pred_states[:, 2, 0]
        assert torch.equal(start, base[:, 2, 0])
        assert not torch.allclose(net(changed, user0).pred_states[:, 1, 1], base[:, 1, 1])


def test_hrnn_user_state_moves_only_at_session_ends() -> None:
    net, items = _hrnn_net(1), _sessions()
    with torch.no_grad():
        out = net(items)
        # the user state entering the window is the given one (0) ...
        assert torch.equal(out.user_in[:, 0], torch.zeros(3, 5))
        # session m reads the past only through c_{m-1}, the same user state at every step
        for w in range(4):
            real = (items[:, w] > 0).any(-1)
            alone = net.run_session(items[real, w], out.user_in[real, w])[:, :5]
            assert torch.allclose(out.pred_states[real, w], alone * (items[real, w] > 0)[..., None]
                                  + out.pred_states[real, w] * (items[real, w] == 0)[..., None])
        # ... an empty (padding) session leaves it unchanged, a real one changes it
        assert torch.equal(out.user_in[1, 1], out.user_in[1, 0])
        assert not torch.allclose(out.user_in[0, 1], out.user_in[0, 0])
        for w in range(3):
            for t in range(2):  # change item t of session w
                changed = items.clone()
                changed[0, w, t] = 29
                o2 = net(changed)
                # states of earlier sessions and the user state up to session w: unchanged
                assert torch.equal(o2.user_in[0, : w + 1], out.user_in[0, : w + 1])
                assert torch.equal(o2.pred_states[0, :w], out.pred_states[0, :w])
                # inside session w, only the states after the changed item move
                assert torch.equal(o2.pred_states[0, w, : t + 1], out.pred_states[0, w, : t + 1])
                # the user state changes once the session has ended
                assert not torch.allclose(o2.user_in[0, w + 1], out.user_in[0, w + 1])
        # "All": the user state is an input at every step, not only the initial state
        other = net(items, torch.randn(3, 5))
        assert (other.pred_states[0, 0, 1:] - out.pred_states[0, 0, 1:]).abs().amax(-1).gt(0).all()


# ---- Caser ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("L", "T"), [(1, 1), (3, 2), (5, 3)])
def test_caser_shapes_and_training_windows(L: int, T: int) -> None:
    net = CaserNet(n_items=20, n_users=4, L=L, d=6, nv=2, nh=3).eval()
    assert [tuple(c.weight.shape) for c in net.conv_h] == [(3, 1, h, 6) for h in range(1, L + 1)]
    assert tuple(net.conv_v.weight.shape) == (2, 1, L, 1)
    seqs, users = torch.randint(0, 21, (7, L)), torch.randint(0, 5, (7,))
    x = net.features(seqs, users)
    assert x.shape == (7, 12)  # [z; P_u]
    assert net.score_all(x).shape == (7, 21)
    # one user, two train sessions (1 2 3 | 4 5) and a test session: examples over the
    # flattened train sequence, L previous items (left-padded), T next items (right-padded)
    ds_items = np.array([1, 2, 3, 4, 5, 6, 7])
    seq = Sequences(ds_items, np.array([0, 3, 5, 7]), np.array([1, 1, 1]),
                    np.array([0, 0, 2], dtype=np.int8), np.array([0, 0]), np.array([0, 3]))
    u, inp, tgt = training_examples(seq, L, T)
    flat = [1, 2, 3, 4, 5]
    assert inp.shape == (4, L) and tgt.shape == (4, T) and (u == 1).all()
    for e, j in enumerate(range(1, 5)):
        want_in = ([0] * L + flat[:j])[-L:]
        want_t = (flat[j:j + T] + [0] * T)[:T]
        assert inp[e].tolist() == want_in and tgt[e].tolist() == want_t


def test_caser_last_items_of_history_then_prefix_need_only_the_history_tail() -> None:
    """Caser.score takes each row's last L history items once: the last L items of (history,
    prefix) are those of (last L of history, prefix), whatever the padding or prefix length."""
    g = torch.Generator().manual_seed(0)
    for L in (1, 3, 5):
        history = torch.randint(0, 4, (50, 12), generator=g)  # 0 = padding anywhere
        prefix = torch.randint(0, 4, (50, 4), generator=g)
        full = last_items(torch.cat([history, prefix], 1), L)
        assert torch.equal(last_items(torch.cat([last_items(history, L), prefix], 1), L), full)


def test_caser_last_items_flattens_history_in_time_order() -> None:
    items = torch.tensor([[1, 2, 0, 3, 0, 0, 4, 5, 0], [0, 0, 0, 0, 0, 0, 6, 0, 0]])
    assert last_items(items, 3).tolist() == [[3, 4, 5], [0, 0, 6]]
    assert last_items(items, 7).tolist() == [[0, 0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0, 6]]


@pytest.mark.parametrize("h", [1, 2, 3, 5])
def test_caser_horizontal_filter_sees_exactly_h_consecutive_items(h: int) -> None:
    L = 5
    torch.manual_seed(0)
    net = CaserNet(n_items=30, n_users=2, L=L, d=6, nv=2, nh=3, act_conv="identity").eval()
    seq = torch.tensor([[3, 8, 12, 17, 25]])
    with torch.no_grad():
        base = net.horizontal_maps(net.item_emb(seq).unsqueeze(1))[h - 1]  # [1, nh, L-h+1]
        assert base.shape == (1, 3, L - h + 1)
        for j in range(L):  # change the item at row j: exactly the windows covering j move
            changed = seq.clone()
            changed[0, j] = 29
            m = net.horizontal_maps(net.item_emb(changed).unsqueeze(1))[h - 1]
            moved = (m - base).abs().amax(1)[0] > 0  # [L-h+1]
            covering = torch.tensor([p <= j <= p + h - 1 for p in range(L - h + 1)])
            assert torch.equal(moved, covering), (h, j, moved)


# ---- all three beat popularity -------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth():
    ds = synthetic_dataset(n_users=400, n_items=150, n_topics=10, seed=11, topic_stickiness=0.8,
                           sequential=0.5)
    seq = Sequences.from_events(ds.events, ds.n_users)
    return ds, seq, evaluate_next_item(Pop().fit(ds), seq).metrics["mrr@5"]


@pytest.mark.parametrize(("model", "epochs", "lr"), [
    (HRNN(HRNNConfig(emb_dim=32, session_hidden=32, user_hidden=32, batch_size=32)), 4, 0.01),
    (Caser(CaserConfig(d=32)), 5, 0.005),
    (STAMP(STAMPConfig(d=32)), 5, 0.005),
], ids=["hrnn", "caser", "stamp"])
def test_beats_pop_next_item(model, epochs: int, lr: float, synth) -> None:
    ds, seq, mrr_pop = synth
    model.fit(ds, train_cfg=TrainConfig(epochs=epochs, optimizer="adam", lr=lr, patience=0,
                                              seed=1))
    mrr = evaluate_next_item(model, seq, "test").metrics["mrr@5"]
    assert mrr > 3 * mrr_pop, (mrr, mrr_pop)


def test_stamp_scores_each_prefix_and_popularity_where_there_is_none() -> None:
    """STAMP scores a target from its session's prefix (the previous session's items at the first
    position); a row with neither gets training popularity. A batch's rows are the same floats
    whether or not such a row is in it (with none, no popularity copy is made)."""
    ds = synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5)
    model = STAMP(STAMPConfig(d=8)).fit(ds, train_cfg=TrainConfig(epochs=1, seed=0))
    sessions = torch.tensor([[[0, 0, 0], [4, 5, 6]], [[7, 8, 0], [9, 3, 2]], [[0, 0, 0], [1, 2, 0]]])
    with_empty = Batch(users=torch.tensor([1, 2, 3]), sessions=sessions, target_rows=torch.tensor([0, 1, 1, 2]),
                       target_pos=torch.tensor([2, 0, 1, 0]))
    net = model.network()
    with torch.no_grad():
        scores = model.score(with_empty)
        expect = net.score_all(net(torch.tensor([[4, 5, 0], [7, 8, 0], [9, 0, 0]])))
        assert torch.equal(scores[:3], expect)  # prefix; previous session at position 0; prefix
        assert torch.equal(scores[3], model.pop_)  # no prefix, no earlier session
        without = Batch(users=with_empty.users, sessions=sessions, target_rows=torch.tensor([0, 1, 1]),
                        target_pos=torch.tensor([2, 0, 1]))
        assert torch.equal(model.score(without), scores[:3])
