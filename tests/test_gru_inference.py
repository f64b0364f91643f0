"""hnvm.models.gru_inference: HNVM's history encoding in inference with per-item input gates and
the context GRU over occupied slots only gives the floats of nn.GRU / nn.GRUCell (torch.equal),
takes its way only where that holds, and rebuilds its table when a weight changes; HNVM's scores
with these ways and the decoder alone over the scored session are the modules' scores."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import hnvm.models.gru_inference as gi
import hnvm.models.hnvm as hnvm_model
import hnvm.models.hnvm_net as hnvm_net
from hnvm.data.batches import Sequences, next_item_batches
from hnvm.data.samples import synthetic_dataset
from hnvm.models.hnvm import HNVM
from hnvm.training import TrainConfig


def _gru(emb_dim: int, hidden: int, n_items: int = 50, seed: int = 0) -> tuple[nn.Embedding, nn.GRU]:
    torch.manual_seed(seed)
    emb, gru = nn.Embedding(n_items + 1, emb_dim, padding_idx=0), nn.GRU(emb_dim, hidden, batch_first=True)
    for p in gru.parameters():
        nn.init.uniform_(p, -0.4, 0.4)
    return emb, gru


@pytest.mark.parametrize(("n", "t", "hidden"), [(16, 1, 8), (4, 5, 16), (40, 9, 24), (130, 7, 200)])
def test_last_states_from_the_item_table_are_the_gru_s(n: int, t: int, hidden: int) -> None:
    emb, gru = _gru(12, hidden)
    g = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0] = t
    seqs = torch.randint(1, 51, (n, t), generator=g) * (torch.arange(t) < lengths[:, None])
    with torch.no_grad():
        table = gi.InputGates().table(emb, gru, events=10_000)
        assert table is not None and table.shape == (51, 3 * hidden)
        want = gru(emb(seqs))[0][torch.arange(n), lengths - 1]
        assert torch.equal(gi.gru_last_states(table, gru, seqs, lengths), want)


def test_the_table_is_built_once_and_again_after_any_change_of_its_weights() -> None:
    emb, gru = _gru(12, 16)
    gates = gi.InputGates()
    with torch.no_grad():
        assert gates.table(emb, gru, events=10) is None  # 51 items: dearer than 10 events' gates
        first = gates.table(emb, gru, events=100)
        assert first is not None and gates.table(emb, gru, events=1) is first  # kept: weights unchanged
        emb.weight[3] += 1.0  # an optimizer's in-place step
        second = gates.table(emb, gru, events=100)
        assert second is not first and not torch.equal(second, first)
        assert torch.equal(second, torch.matmul(emb.weight, gru.weight_ih_l0.t()).add_(gru.bias_ih_l0))
        gru.load_state_dict(_gru(12, 16, seed=1)[1].state_dict())  # copies in place
        third = gates.table(emb, gru, events=100)
        assert third is not None and third is not second
        old_bias = gru.bias_ih_l0
        gru.bias_ih_l0 = nn.Parameter(torch.zeros(48))  # a replaced tensor...
        while gru.bias_ih_l0._version < old_bias._version:  # ...with the same version counter
            torch.autograd.graph.increment_version(gru.bias_ih_l0)
        assert gates.table(emb, gru, events=1) is None  # not `third`: rebuilt (then dearer than 1 event)
        assert torch.allclose(gates.table(emb, gru, events=100)[1], gru.weight_ih_l0 @ emb.weight[1], atol=1e-6)
        # a change that makes the table dearer than the events' own gates drops it
        emb.weight[1] += 1.0
        assert gates.table(emb, gru, events=1) is None


def _stepped(cell: nn.GRUCell, h_enc: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    h = h_enc.new_zeros(h_enc.shape[0], cell.hidden_size) if h0 is None else h0
    for w in range(h_enc.shape[1]):
        h = torch.where(mask[:, w, None], cell(h_enc[:, w], h), h)
    return h


@pytest.mark.parametrize(("rows", "hidden", "layout"), [(16, 8, "left"), (40, 24, "random"), (60, 200, "left"),
                                                        (17, 100, "random")])
@pytest.mark.parametrize("with_h0", [False, True])
def test_context_over_occupied_slots_is_the_cell_stepped_over_every_slot(rows: int, hidden: int, layout: str,
                                                                         with_h0: bool) -> None:
    torch.manual_seed(rows)
    cell = nn.GRUCell(hidden, hidden).eval()
    W = 12
    h_enc = torch.randn(rows, W, hidden)
    if layout == "left":  # histories of 1..W sessions, the latest last (as evaluation batches hold them)
        counts = torch.randint(1, W + 1, (rows,))
        mask = torch.arange(W) >= W - counts[:, None]
    else:  # any slots, some rows with none, some slots with one to a few rows
        mask = torch.rand(rows, W) < 0.3
        mask[:3] = False
    h_enc = h_enc * mask[..., None]
    h0 = torch.randn(rows, hidden) if with_h0 else None
    with torch.no_grad():
        got = gi.context_after(cell, h_enc, mask, h0)
        assert got is not None
        assert torch.equal(got, _stepped(cell, h_enc, mask, h0))
        if h0 is not None:
            assert not torch.equal(h0, got)  # h0 itself is not updated in place


def test_context_declines_where_its_floats_could_differ_or_autograd_needs_the_module() -> None:
    cell = nn.GRUCell(8, 8).eval()
    mask = torch.ones(20, 3, dtype=torch.bool)
    with torch.no_grad():
        assert gi.context_after(cell, torch.randn(20, 3, 8), mask, None) is not None
        assert gi.context_after(cell, torch.randn(15, 3, 8), mask[:15], None) is None  # a GEMM of < 16 rows
        sparse = torch.zeros(20, 3, dtype=torch.bool)
        sparse[:5] = True
        assert gi.context_after(cell, torch.randn(20, 3, 8), sparse, None) is None  # < 16 sessions in all
        big = nn.GRUCell(400, 400).eval()  # a step of 100 x 400 gates exceeds one thread's grain
        assert gi.context_after(big, torch.randn(100, 3, 400), torch.ones(100, 3, dtype=torch.bool), None) is None
        cell.train()
        assert gi.context_after(cell, torch.randn(20, 3, 8), mask, None) is None
        cell.eval()
        assert gi.context_after(cell, torch.randn(20, 3, 8, dtype=torch.float64), mask, None) is None
    assert gi.context_after(cell, torch.randn(20, 3, 8), mask, None) is None  # autograd on


@pytest.mark.parametrize("options", [{}, {"repeat": True}, {"use_z": False}, {"use_e": False, "use_z": False}],
                         ids=["paper", "repeat", "no-z", "no-e-no-z"])
def test_hnvm_scores_are_the_modules_scores_bit_for_bit(monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    """Scores with the three ways (item table, occupied context slots, decoder alone over the
    scored session) against the modules' way (nn.GRU, every context slot, the whole forward)."""
    ds = synthetic_dataset(n_users=120, n_items=60, n_topics=6, seed=3)
    model = HNVM(hidden=24, emb_dim=16, mlp_hidden=16, d_e=8, d_z=8, n_negatives=16, **options)
    model.fit(ds, train_cfg=TrainConfig(epochs=1, seed=0))
    seq = Sequences.from_events(ds.events, ds.n_users)
    batches = list(next_item_batches(seq, "test", max_targets=256))
    assert max(len(b.users) for b in batches) >= gi.MIN_ROWS
    taken: list[object] = []
    spy = (lambda real: lambda *a: taken.append(r := real(*a)) or r)  # noqa: E731
    monkeypatch.setattr(hnvm_net, "context_after", spy(gi.context_after))
    monkeypatch.setattr(hnvm_model, "prior_states", spy(gi.prior_states))
    fast = [model.score(b) for b in batches]
    assert model.network().input_gates._built is not None  # the ways were taken, not declined
    assert sum(r is not None for r in taken) >= 2 * len(batches) - 1
    monkeypatch.setattr(hnvm_net, "applies", lambda x: False)
    monkeypatch.setattr(hnvm_net, "context_after", lambda *a: None)
    monkeypatch.setattr(hnvm_model, "prior_states", lambda *a: None)
    for b, scores in zip(batches, fast, strict=True):
        assert torch.equal(scores, model.score(b))


def test_the_table_declines_tiny_catalogues_inference_tensors_and_other_cpu_kernels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.no_grad():
        assert gi.InputGates().table(*_gru(12, 16, n_items=14), events=10_000) is None  # a 15-row product
        with torch.inference_mode():
            frozen = _gru(12, 16)  # inference tensors: no version counter
        assert gi.InputGates().table(*frozen, events=10_000) is None
        x = torch.zeros(2)
        assert gi.applies(x)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        assert not gi.applies(x)  # kernels whose row independence is not measured


def test_the_table_is_built_once_under_concurrent_calls() -> None:
    emb, gru = _gru(12, 16)
    gates = gi.InputGates()
    with ThreadPoolExecutor(4) as pool, torch.no_grad():
        tables = list(pool.map(lambda _: gates.table(emb, gru, events=100), range(16)))
    assert all(t is tables[0] for t in tables)


def _net(emb_dim: int) -> hnvm_net.HNVMNet:
    torch.manual_seed(0)
    net = hnvm_net.HNVMNet(n_items=60, n_users=10, hidden=24, emb_dim=emb_dim, d_e=8, d_z=8, mlp_hidden=16)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "bias" in name:  # the paper's init zeroes them, which would hide a bias added in another order
                p.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("emb_dim", [16, 256])
def test_one_item_sessions_single_sessions_and_frozen_weights_keep_the_modules_floats(
        monkeypatch: pytest.MonkeyPatch, emb_dim: int) -> None:
    """Buckets of one step (t = 1) or one row (n = 1: `fold_session`) feed nn.GRU a contiguous
    input, which adds the bias inside the product: other bits than the table's once the
    embedding is wider than the BLAS's K block; frozen input weights make matmul run per time
    step. These keep nn.GRU, with the table built (events enough) and at the paper's width 200+."""
    net = _net(emb_dim)
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, 61, (20, 5, 6), generator=g)
    items[:, :3, 1:] = 0  # 60 one-item sessions in the first three slots: a bucket of t = 1
    single = torch.randint(1, 61, (1, 20), generator=g)  # one session of 20 items: n = 1
    h0 = torch.randn(1, 24, generator=g)
    few = torch.randint(1, 61, (3, 1, 10), generator=g)  # after the table is built: a bucket of n = 3, t = 10

    def both() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return (net.encode_history(torch.arange(20), items), net.fold_session(h0, single),
                    net.encode_history(torch.arange(3), few))

    def modules() -> tuple[torch.Tensor, ...]:
        with monkeypatch.context() as m:
            m.setattr(hnvm_net, "applies", lambda x: False)
            m.setattr(hnvm_net, "context_after", lambda *a: None)
            return both()

    fast = both()
    assert net.input_gates._built is not None  # the table is built and used for the other buckets
    assert all(torch.equal(a, b) for a, b in zip(fast, modules(), strict=True))
    net.encoder.weight_ih_l0.requires_grad_(False)  # nn.GRU's own floats change: compare with them
    assert all(torch.equal(a, b) for a, b in zip(both(), modules(), strict=True))


def test_training_mode_drops_the_table_and_prior_states_declines_left_padding() -> None:
    net = _net(16)
    with torch.no_grad():
        net.encode_history(torch.arange(20), torch.randint(1, 61, (20, 4, 6)))
        assert net.input_gates._built is not None
        net.train()
        assert net.input_gates._built is None
        net.eval()
        left = torch.tensor([[0, 3, 4], [5, 6, 0]])
        assert gi.prior_states(net, torch.tensor([1, 2]), left, torch.zeros(2, 24)) is None
        right = torch.tensor([[3, 4, 0], [5, 6, 0]])
        assert gi.prior_states(net, torch.tensor([1, 2]), right, torch.zeros(2, 24)) is not None
