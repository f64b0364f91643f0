"""benchmarks/speed.py's bound on evaluation: the FLOPs it counts for a model's history encoding
are the ones the model computes when nothing is padded, and fewer when something is; NCF's
per-pair tower FLOPs are what its scoring computes beyond its per-user and per-item parts."""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hnvm.contract import Batch
from hnvm.data.batches import Sequences
from hnvm.data.samples import synthetic_dataset
from hnvm.models.gru_inference import InputGates
from hnvm.models.hnvm import HNVM
from hnvm.models.hrnn import HRNN
from hnvm.models.ncf import NCF
from hnvm.training import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed


def _counted(model: object, batch: Batch) -> float:
    if isinstance(model, HNVM):  # HNVM keeps its encoder's input-gate table between calls: count building it
        model.network().input_gates = InputGates()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        speed.history_only(model)(batch)
    return fc.get_total_flops() / batch.n_targets


@pytest.mark.parametrize("model", [HNVM(hidden=16, emb_dim=12, mlp_hidden=16, d_e=8, d_z=8, n_negatives=8),
                                   HRNN(emb_dim=12, session_hidden=16, user_hidden=10)], ids=["hnvm", "hrnn"])
def test_history_flops_are_what_the_model_computes_without_padding(model: object) -> None:
    model.fit(synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5),  # type: ignore[attr-defined]
              train_cfg=TrainConfig(epochs=1))
    g = torch.Generator().manual_seed(0)
    full = torch.randint(1, 20, (3, 4, 5), generator=g)  # 3 history sessions of 5 items + the current one
    rows = dict(users=torch.tensor([1, 2, 3]), target_rows=torch.tensor([0, 0, 2]), target_pos=torch.tensor([1, 2, 1]))
    flops, hidden = speed.history_flops(model, [Batch(sessions=full, **rows)])
    assert hidden == 16
    assert flops == pytest.approx(_counted(model, Batch(sessions=full, **rows)), rel=1e-12)
    padded = full.clone()
    padded[0, :2] = 0  # row 0 has one history session
    padded[1, 2, 3:] = 0  # a shorter session: 33 real history items in 7 sessions, not 45 in 9
    fewest, _ = speed.history_flops(model, [Batch(sessions=padded, **rows)])
    assert fewest == pytest.approx(_per_real(model, items=33, sessions=7), rel=1e-12)
    assert fewest < _counted(model, Batch(sessions=padded, **rows))


def _per_real(model: object, items: int, sessions: int) -> float:
    """The count for `items` real history items in `sessions` real sessions, over 3 targets,
    from FlopCounterMode on unpadded batches: one item-step and one session-step apart."""
    one = torch.tensor([[[3], [0]]])  # 1 history session of 1 item (+ the current session)
    two = torch.tensor([[[3, 4], [0, 0]]])  # 1 session of 2 items
    rows = dict(users=torch.tensor([1]), target_rows=torch.tensor([0]), target_pos=torch.tensor([0]))
    per_item = _counted(model, Batch(sessions=two, **rows)) - _counted(model, Batch(sessions=one, **rows))
    per_session = _counted(model, Batch(sessions=one, **rows)) - per_item
    return (items * per_item + sessions * per_session) / 3


def test_history_flops_count_what_max_len_keeps_and_nothing_without_history() -> None:
    """HNVM's max_len trims each history session to its last items before encoding: the count is
    of those items; with use_history off there is no history to count."""
    ds = synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5)
    trimmed = HNVM(hidden=16, emb_dim=12, mlp_hidden=16, d_e=8, d_z=8, n_negatives=8, max_len=2)
    trimmed.fit(ds, train_cfg=TrainConfig(epochs=1))
    full = torch.randint(1, 20, (3, 4, 5), generator=torch.Generator().manual_seed(1))
    batch = Batch(sessions=full, users=torch.tensor([1, 2, 3]), target_rows=torch.tensor([0, 1, 2]),
                  target_pos=torch.tensor([1, 1, 1]))
    flops, _ = speed.history_flops(trimmed, [batch])
    assert flops == pytest.approx(_counted(trimmed, batch), rel=1e-12)
    blind = HNVM(hidden=16, emb_dim=12, mlp_hidden=16, d_e=8, d_z=8, n_negatives=8, use_history=False)
    blind.fit(ds, train_cfg=TrainConfig(epochs=1))
    assert speed.history_flops(blind, [batch]) is None


def test_pair_flops_are_ncf_s_scoring_less_its_per_user_and_per_item_parts() -> None:
    """NCF scores every (user, item) pair with its tower: the count per target is everything
    FlopCounterMode sees in `scores` but the first layer's user part (per row) and item part
    (per item, once per call); no count for models that have no such tower."""
    ds = synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5)
    model = NCF(factors=4, mlp_layers=3, n_neg=2)
    model.fit(ds, train_cfg=TrainConfig(epochs=1))
    net = model.network()
    batch = Batch(sessions=torch.ones(3, 2, 4, dtype=torch.long), users=torch.tensor([1, 2, 3]),
                  target_rows=torch.tensor([0, 0, 1, 2, 2]), target_pos=torch.tensor([0, 1, 0, 0, 1]))
    flops, shape = speed.pair_flops(model, [batch, batch])
    # 3 users x all n_items + 1 columns in one chunk; tower 16 -> 8 -> 4, then [gmf 4; mlp 4] -> 1
    assert shape == (3 * (ds.n_items + 1), 16, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net.scores(batch.users)
    cols, emb, first = ds.n_items + 1, net.user_mlp.embedding_dim, net.first_user.out_features
    outside = 2 * 3 * emb * first + 2 * cols * emb * first  # W_1u per row, W_1i per item
    assert flops * batch.n_targets == pytest.approx(fc.get_total_flops() - outside, rel=1e-12)
    assert flops == pytest.approx(3 * cols * 2 * (16 * 8 + 8 * 4 + 8 * 1) / 5, rel=1e-12)
    assert speed.pair_flops(HRNN(), [batch]) is None


def test_hnvm_history_flops_count_the_input_gate_table_once_where_it_is_smaller(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With more history items than item-table rows HNVM's encoder takes its input gates from a
    table built once (hnvm.models.gru_inference): the count is what it computes so, fewer than
    the gates per history item."""
    model = HNVM(hidden=16, emb_dim=12, mlp_hidden=16, d_e=8, d_z=8, n_negatives=8)
    model.fit(synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5), train_cfg=TrainConfig(epochs=1))
    rows = model.network().item_emb.num_embeddings
    long = torch.randint(1, 20, (3, 4, 2 * rows), generator=torch.Generator().manual_seed(2))  # 18 * rows history items
    batch = Batch(sessions=long, users=torch.tensor([1, 2, 3]), target_rows=torch.tensor([0, 1, 2]),
                  target_pos=torch.tensor([1, 1, 1]))
    flops, _ = speed.history_flops(model, [batch])
    assert flops == pytest.approx(_counted(model, batch), rel=1e-12)
    monkeypatch.setattr(InputGates, "table", lambda *a: None)  # gates per history item
    per_event = _counted(model, batch)
    assert per_event - flops == pytest.approx(6.0 * 16 * 12 * (18 * rows - rows) / 3, rel=1e-12)


def test_training_products_are_every_product_of_the_timed_steps_and_replay_them() -> None:
    """The training bound's products: what FlopCounterMode counts over the same training steps
    (forward and backward; HNVM computes no FLOPs outside matrix products), per timed target;
    the products and the other operator calls counted per step; the replay runs each of them."""
    ds = synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5)
    model = HNVM(hidden=16, emb_dim=12, mlp_hidden=16, d_e=8, d_z=8, n_negatives=8, batch_size=4)
    trainable = model.trainable(ds, Sequences.from_events(ds.events, ds.n_users), TrainConfig())
    flops, replay, products, others = speed.training_products(trainable, steps=3)
    assert not trainable.module.training  # left in eval mode, as train_throughput leaves it
    batches = list(islice(trainable.train_batches(0, np.random.default_rng(0)), 4))[1:]  # the timed steps
    trainable.module.train()
    with FlopCounterMode(display=False) as fc:
        for i, b in enumerate(batches, start=1):
            trainable.loss(b, i)["loss"].backward()
    targets = sum(trainable.batch_targets(b) for b in batches)
    assert flops == pytest.approx(fc.get_total_flops() / targets, rel=1e-12)
    assert replay > 0 and products >= 3 * 4 and others > products  # a GRU step alone is several products

    rec = speed.Products()
    a, b = torch.randn(5, 3), torch.randn(3, 7)
    with rec:
        torch.addmm(torch.zeros(7), a, b).relu()
        torch.bmm(torch.randn(2, 5, 3), torch.randn(2, 3, 4))
    assert [c[0] for c in rec.calls] == [torch.ops.aten.addmm.default, torch.ops.aten.bmm.default]
    assert rec.calls[1][1] == [((2, 5, 3), (15, 3, 1), torch.float32), ((2, 3, 4), (12, 4, 1), torch.float32)]
    assert rec.others >= 1  # relu and the random tensors' operations
    assert rec.flops() == 2 * 5 * 3 * 7 + 2 * 2 * 5 * 3 * 4
    calls = []
    real = torch.ops.aten.addmm.default
    rec.calls[0] = (lambda *args, **kw: calls.append([tuple(x.shape) for x in args]) or real(*args, **kw),
                    *rec.calls[0][1:])
    rec.replay_seconds(rounds=2)
    assert calls == [[(7,), (5, 3), (3, 7)]] * 3  # a warm-up round, then 2 timed rounds


@pytest.mark.parametrize("model", [HNVM(hidden=16, emb_dim=12, mlp_hidden=16, d_e=8, d_z=8, n_negatives=8),
                                   HRNN(emb_dim=12, session_hidden=16, user_hidden=10)], ids=["hnvm", "hrnn"])
def test_the_rest_of_scoring_reads_the_history_it_is_given(model: object) -> None:
    """`history_given` times the rest of a model's scoring: with the history `history_only`
    computed for the batch, the same scores; with another one, other scores (it is read, not
    encoded again); afterwards the model encodes its history itself again."""
    model.fit(synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5),  # type: ignore[attr-defined]
              train_cfg=TrainConfig(epochs=1))
    sessions = torch.randint(1, 20, (3, 4, 5), generator=torch.Generator().manual_seed(3))
    batch = Batch(sessions=sessions, users=torch.tensor([1, 2, 3]), target_rows=torch.tensor([0, 1, 2]),
                  target_pos=torch.tensor([1, 2, 3]))
    with torch.no_grad():
        expected = model.score(batch)  # type: ignore[attr-defined]
        history = speed.history_only(model)(batch)
        with speed.history_given(model, history):
            assert torch.equal(model.score(batch), expected)  # type: ignore[attr-defined]
        with speed.history_given(model, torch.zeros_like(history)):
            assert not torch.equal(model.score(batch), expected)  # type: ignore[attr-defined]
        assert torch.equal(model.score(batch), expected)  # type: ignore[attr-defined]
    owner = model if isinstance(model, HNVM) else model.network()  # type: ignore[attr-defined]
    assert "_history" not in vars(owner) and "user_state" not in vars(owner)
    with torch.no_grad(), speed.history_given(model, torch.zeros_like(history)):  # nested: the outer one comes back
        with speed.history_given(model, history):
            assert torch.equal(model.score(batch), expected)  # type: ignore[attr-defined]
        assert not torch.equal(model.score(batch), expected)  # type: ignore[attr-defined]
    assert "_history" not in vars(owner) and "user_state" not in vars(owner)


def test_only_history_models_are_given_a_history() -> None:
    """A model with no history to shadow (NCF) is refused, not silently left encoding nothing."""
    with pytest.raises(ValueError, match="encodes no history"), speed.history_given(NCF(), torch.zeros(1)):
        pass
