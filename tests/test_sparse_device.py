"""Sparse item/user-table updates (LazyAdam, sparse clipping, HNVM's sparse tables), the
--device option, and bounded evaluation chunks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hnvm import evaluate as evaluate_mod
from hnvm.data.batches import Sequences
from hnvm.data.samples import synthetic_dataset
from hnvm.distributed import resolve_device
from hnvm.errors import HnvmError
from hnvm.evaluate import NEXT_ITEM_VALIDATION, evaluate_next_item, evaluate_next_session
from hnvm.models.hnvm import HNVM, HNVMConfig
from hnvm.models.hnvm_net import HNVMNet
from hnvm.models.layers import ItemOutput
from hnvm.training import LazyAdam, TrainConfig, clip_grad_norm, make_optimizer
from hnvm.training.optim import sparse_parameters

FAST = HNVMConfig(hidden=16, emb_dim=16, d_e=4, d_z=4, mlp_hidden=16, n_negatives=16, batch_size=16)


@pytest.fixture(scope="module")
def tiny():
    ds = synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5)
    return ds, Sequences.from_events(ds.events, ds.n_users)


def test_lazy_adam_is_adam_on_dense_gradients() -> None:
    torch.manual_seed(0)
    a = nn.Linear(5, 3)
    b = nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.Adam(a.parameters(), lr=0.01, weight_decay=0.1)
    ob = LazyAdam(b.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(4, 5)
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_lazy_adam_on_sparse_rows_is_sparse_adam_and_leaves_other_rows() -> None:
    torch.manual_seed(0)
    a = nn.Embedding(20, 4, sparse=True)
    b = nn.Embedding(20, 4, sparse=True)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.SparseAdam(a.parameters(), lr=0.05)
    ob = LazyAdam(b.parameters(), lr=0.05)
    before = b.weight.detach().clone()
    for step in range(4):
        ids = torch.tensor([1, 3, 3, 7 + step])
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(ids).sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)
    untouched = [i for i in range(20) if i not in (1, 3, 7, 8, 9, 10)]
    assert torch.equal(b.weight[untouched], before[untouched])


def test_make_optimizer_picks_lazy_adam_only_for_sparse_modules() -> None:
    dense = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 2))
    sparse = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2))
    cfg = TrainConfig(optimizer="adam")
    assert type(make_optimizer(dense, cfg)) is torch.optim.Adam
    assert type(make_optimizer(sparse, cfg)) is LazyAdam
    assert sparse_parameters(sparse) == {sparse[0].weight}


def test_clip_grad_norm_counts_sparse_rows_like_dense_ones() -> None:
    torch.manual_seed(0)
    a = nn.Embedding(10, 3, sparse=True)
    b = nn.Embedding(10, 3)
    b.load_state_dict(a.state_dict())
    ids = torch.tensor([1, 2, 2, 5])
    for net in (a, b):
        (net(ids) * 10).sum().backward()
    clip_grad_norm(a.parameters(), 0.5)
    nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    torch.testing.assert_close(a.weight.grad.to_dense(), b.weight.grad)


def test_item_output_is_a_linear_layer_with_sparse_rows() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(6, 30)
    torch.manual_seed(1)
    out = ItemOutput(6, 30, sparse=True)
    assert torch.equal(lin.weight, out.weight) and torch.equal(lin.bias, out.bias)
    h = torch.randn(4, 6)
    torch.testing.assert_close(out(h), lin(h))
    ids = torch.tensor([3, 3, 9])
    w, b = out.rows(ids)
    (h[:, None] * w).sum().add(b.sum()).backward()
    assert out.weight.grad.is_sparse and out.bias.grad.is_sparse
    assert set(out.bias.grad.coalesce().indices()[0].tolist()) == {3, 9}


def test_hnvm_sparse_tables_same_forward_sparse_gradients(tiny) -> None:
    ds, _ = tiny
    nets = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        nets[sparse] = HNVMNet(n_items=ds.n_items, n_users=ds.n_users, hidden=8, emb_dim=8, d_e=4,
                               d_z=4, mlp_hidden=8, sparse=sparse)
    for (ka, a), (kb, b) in zip(nets[False].state_dict().items(), nets[True].state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b)  # the same parameters, names and init
    m = HNVM(FAST)
    tr = m.trainable(ds, Sequences.from_events(ds.events, ds.n_users), TrainConfig())
    batch = next(iter(tr.train_batches(0, __import__("numpy").random.default_rng(0))))
    tr.loss(batch, 0)["loss"].backward()
    net = tr.module
    for p in (net.item_emb.weight, net.out.weight, net.out.bias, net.e_post_mu.weight):
        assert p.grad.is_sparse
    assert not net.decoder.weight_ih_l0.grad.is_sparse


def test_hnvm_sparse_and_dense_learn_alike(tiny) -> None:
    ds, seq = tiny
    scores = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        m = HNVM(dataclasses.replace(FAST, sparse=sparse)).fit(
            ds, validation=NEXT_ITEM_VALIDATION,
            train_cfg=TrainConfig(epochs=3, optimizer="adam", lr=0.01, seed=3, patience=0))
        scores[sparse] = evaluate_next_item(m, seq, "test").metrics["recall@20"]
    assert scores[True] > 0.2 and abs(scores[True] - scores[False]) < 0.1


def test_full_softmax_keeps_dense_tables() -> None:
    m = HNVM(dataclasses.replace(FAST, loss="full-softmax"))
    net = m._build(30, 10)
    assert not sparse_parameters(net)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(HnvmError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(HnvmError, match="not one of"):
        resolve_device("tpu")
    from hnvm.cli import app

    ds = synthetic_dataset(n_users=30, n_items=20, n_topics=2, seed=1)
    ds.save(tmp_path / "data")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                   "--model", "bprmf", "--device", "cuda"])
    assert res.exit_code == 2
    assert "CUDA is not available" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_evaluation_chunks_are_bounded_and_do_not_change_metrics(tiny, monkeypatch) -> None:
    ds, seq = tiny
    torch.manual_seed(0)
    m = HNVM(FAST).fit(ds, train_cfg=TrainConfig(epochs=1, seed=3))
    full = evaluate_next_item(m, seq, "test").metrics
    full_s = evaluate_next_session(m, seq, "test").metrics
    seen: list[int] = []
    score = m.score
    monkeypatch.setattr(m, "score", lambda b: seen.append(b.n_targets) or score(b))
    monkeypatch.setattr(evaluate_mod, "MAX_SCORES", 5 * (ds.n_items + 1))
    small = evaluate_next_item(m, seq, "test").metrics
    assert max(seen) < 5 + 20  # about 5 targets per batch (whole sessions are kept together)
    assert small == pytest.approx(full, abs=1e-9)
    assert evaluate_next_session(m, seq, "test").metrics == pytest.approx(full_s, abs=1e-9)
