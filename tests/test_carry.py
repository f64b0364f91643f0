"""Carried window states (hnvm.models.carry): each user's windows come in session order, and the
state a window enters with, carried over from the step that trained the user's previous window,
is the state re-encoding the earlier sessions gives (same weights, no dropout)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from hnvm.data.batches import Sequences, in_user_order, user_windows, window_batches
from hnvm.data.samples import synthetic_dataset
from hnvm.models.carry import CarriedStates
from hnvm.models.hnvm import HNVM, HNVMConfig
from hnvm.models.hrnn import HRNN, HRNNConfig
from hnvm.training import TrainConfig


@pytest.fixture(scope="module")
def synth() -> tuple[Any, Sequences]:
    ds = synthetic_dataset(n_users=60, n_items=80, n_topics=5, seed=4, sessions_per_user=(4, 30))
    return ds, Sequences.from_events(ds.events, ds.n_users)


def test_in_user_order_keeps_each_users_positions_and_puts_its_windows_in_session_order(synth) -> None:
    _, seq = synth
    windows = user_windows(seq.view(("train",)), 3)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(windows))
    got = in_user_order(windows, order)
    assert sorted(got.tolist()) == list(range(len(windows)))  # a permutation still
    for u in np.unique(windows[:, 0]):
        before = np.flatnonzero(windows[order, 0] == u)
        after = np.flatnonzero(windows[got, 0] == u)
        assert np.array_equal(before, after)  # the same positions
        firsts = windows[got[after], 1]
        assert np.all(np.diff(firsts) > 0)  # earlier sessions first
    assert not np.array_equal(got, order)  # some user's windows were moved


def test_successor_is_the_same_users_window_that_starts_where_it_ends() -> None:
    windows = np.array([[1, 8, 16], [1, 0, 8], [2, 20, 28], [1, 16, 20], [3, 30, 31], [2, 28, 30], [4, 40, 44],
                        [4, 45, 47]])
    carry = CarriedStates(windows)
    assert carry.successor.tolist() == [3, 0, 5, -1, -1, -1, -1, -1]  # user 4's windows are not adjacent


def _record(net: torch.nn.Module, kwarg: str, position: int) -> list[torch.Tensor | None]:
    """Wrap net.forward so that each call's entering state (kwarg, or positional argument
    `position`) is recorded."""
    seen: list[torch.Tensor | None] = []
    forward = net.forward

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get(kwarg, args[position] if len(args) > position else None))
        return forward(*args, **kwargs)

    net.forward = wrapped  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("name", ["hnvm", "hrnn"])
def test_carried_states_equal_re_encoded_ones_under_fixed_weights(synth, name: str) -> None:
    """One epoch of loss calls with the weights fixed and dropout off: every entering state,
    carried or encoded, equals encoding the window's whole prefix; most are carried."""
    ds, seq = synth
    if name == "hnvm":
        model: Any = HNVM(HNVMConfig(hidden=16, emb_dim=16, d_e=4, d_z=4, mlp_hidden=16, n_negatives=16,
                                     batch_size=4, window=3))
    else:
        model = HRNN(HRNNConfig(emb_dim=16, session_hidden=16, user_hidden=16, batch_size=4, window=3,
                                loss="bpr", n_negatives=16, carry_state=True))
    t = model.trainable(ds, seq, TrainConfig())
    net = t.module
    net.eval()  # no dropout: a carried state and a re-encoded one are the same function of the weights
    seen = _record(net, "h_con0" if name == "hnvm" else "user0", 2 if name == "hnvm" else 1)
    n_prefix = 0
    with torch.no_grad():
        for step, batch in enumerate(t.train_batches(0, np.random.default_rng(1))):
            t.loss(batch, step)
            entered = seen[-1]
            has_prefix = (batch.prefix > 0).flatten(1).any(1)
            if batch.prefix.shape[1] == 0:
                assert entered is None
                continue
            want = (net.encode_history(batch.users, batch.prefix) if name == "hnvm"
                    else net.user_state(batch.prefix))
            assert entered is not None
            torch.testing.assert_close(entered, want, atol=1e-5, rtol=1e-5)
            assert torch.equal(entered[~has_prefix], torch.zeros_like(entered[~has_prefix]))
            n_prefix += int(has_prefix.sum())
    assert t.carry.carried + t.carry.encoded == n_prefix
    assert t.carry.carried > 0.5 * n_prefix  # windows of one user in one batch are the exception
    assert not t.carry._states  # every kept state was used: none outlives the epoch

    # under torchrun (several processes) nothing is carried and the order is the plain shuffle
    windows = t.windows
    sharded = list(t.train_batches(1, np.random.default_rng(2), rank=0, world_size=2))
    assert not t.carry.active
    plain = np.random.default_rng(2).permutation(len(windows))
    assert np.array_equal(np.concatenate([b.ids for b in sharded]),
                          np.concatenate([plain[i * 4:(i + 1) * 4] for i in range(0, -(-len(plain) // 4), 2)]))
    # carry off (HRNN's default) = every state encoded
    off = (HNVM(HNVMConfig(hidden=16, emb_dim=16, batch_size=4, window=3, carry_context=False)) if name == "hnvm"
           else HRNN(HRNNConfig(emb_dim=16, session_hidden=16, user_hidden=16, batch_size=4, window=3)))
    t = off.trainable(ds, seq, TrainConfig())
    with torch.no_grad():
        for step, batch in enumerate(t.train_batches(0, np.random.default_rng(1))):
            t.loss(batch, step)
    assert t.carry.carried == 0 and t.carry.encoded > 0


def test_window_batches_name_their_windows() -> None:
    ds = synthetic_dataset(n_users=10, n_items=30, n_topics=3, seed=1)
    seq = Sequences.from_events(ds.events, ds.n_users).view(("train",))
    windows = user_windows(seq, 2)
    for b in window_batches(seq, windows, 3, np.random.default_rng(0), user_order=True):
        assert b.ids is not None and len(b.ids) == len(b.users)
        assert np.array_equal(windows[b.ids, 0], b.users.numpy())
