"""The shared contract of every registered model (implicit-style mixin, as parametrised tests):
fits tiny data, score shapes, save/load gives identical scores, same seed same result, and no
leakage: changing items at or after a target never changes that target's scores."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from hnvm.data.batches import Sequences, next_item_batches, next_session_batches
from hnvm.data.samples import synthetic_dataset
from hnvm.evaluate import NEXT_ITEM_VALIDATION
from hnvm.models.base import REGISTRY, get_model_class, load_model
from hnvm.training import TrainConfig

get_model_class("pop")  # registers the built-in models

# small, fast hyper-parameters per model (one line each)
FAST: dict[str, dict] = {
    "hnvm": {"hidden": 16, "emb_dim": 16, "d_e": 4, "d_z": 4, "mlp_hidden": 16, "n_negatives": 32, "batch_size": 32},
    "ncf": {"factors": 4, "mlp_layers": 2, "batch_size": 128},
    "bprmf": {"dim": 8, "batch_size": 128},
    "gru4rec": {"layers": (16,), "batch_size": 16, "n_sample": 16, "sample_cache_size": 4096},
    "sknn": {"k": 10, "sample_size": 50},
    "itemknn": {"neighbours": 10},
    "stamp": {"d": 16, "batch_size": 64},
    "caser": {"L": 3, "T": 2, "d": 8, "nv": 2, "nh": 4, "batch_size": 64},
    "hrnn": {"emb_dim": 16, "session_hidden": 16, "user_hidden": 16, "n_negatives": 32, "batch_size": 32},
}
FAST["hnvm-repeat"] = {**FAST["hnvm"], "repeat": True}  # HNVM with its repeat channel keeps the contract too
CASES = [*sorted(REGISTRY), "hnvm-repeat"]
TRAIN = TrainConfig(epochs=2, optimizer="adam", lr=0.01, seed=3)


@pytest.fixture(scope="module")
def tiny():
    ds = synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5)
    return ds, Sequences.from_events(ds.events, ds.n_users)


def make(name: str):
    cls = get_model_class(name.removesuffix("-repeat"))
    cfg_cls = getattr(cls, "config_class", None)
    return cls(cfg_cls(**FAST.get(name, {}))) if cfg_cls else cls()


def fit(name: str, ds):
    torch.manual_seed(0)
    return make(name).fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=TRAIN)


@pytest.mark.parametrize("name", CASES)
def test_scores_have_catalogue_shape(name: str, tiny) -> None:
    ds, seq = tiny
    m = fit(name, ds)
    batch = next(next_item_batches(seq, "test", max_targets=50))
    s = m.score(batch)
    assert s.shape == (batch.n_targets, ds.n_items + 1)
    assert torch.isfinite(s[:, 1:]).all()
    batch, _sets = next(next_session_batches(seq, "test", max_users=7))
    assert m.score_sessions(batch).shape == (7, ds.n_items + 1)


@pytest.mark.parametrize("name", CASES)
def test_save_load_identical_scores(name: str, tiny, tmp_path: Path) -> None:
    ds, seq = tiny
    m = fit(name, ds)
    m.save(tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    batch = next(next_item_batches(seq, "test", max_targets=80))
    assert torch.equal(m.score(batch), m2.score(batch))
    hb, _ = next(next_session_batches(seq, "test", max_users=9))
    assert torch.equal(m.score_sessions(hb), m2.score_sessions(hb))


@pytest.mark.parametrize("name", CASES)
def test_same_seed_same_scores(name: str, tiny) -> None:
    ds, seq = tiny
    batch = next(next_item_batches(seq, "test", max_targets=60))
    assert torch.equal(fit(name, ds).score(batch), fit(name, ds).score(batch))


@pytest.mark.parametrize("name", CASES)
def test_no_leakage_from_items_at_or_after_target(name: str, tiny) -> None:
    ds, seq = tiny
    m = fit(name, ds)
    batch = next(next_item_batches(seq, "test", max_targets=80))
    base = m.score(batch)
    g = torch.Generator().manual_seed(0)
    for k in range(0, batch.n_targets, 7):
        row, pos = int(batch.target_rows[k]), int(batch.target_pos[k])
        changed = batch.sessions.clone()
        cur = changed[row, -1]
        n = int((cur > 0).sum())
        cur[pos:n] = torch.randint(1, ds.n_items + 1, (n - pos,), generator=g)
        b2 = type(batch)(batch.users, changed, batch.target_rows, batch.target_pos, batch.session_ids)
        # every target of that row at or before `pos` must keep its scores
        same = (batch.target_rows == row) & (batch.target_pos <= pos)
        assert torch.equal(m.score(b2)[same], base[same]), (name, row, pos)


@pytest.fixture(scope="module")
def tiny_loo():
    """The leave-one-out split of a tiny log, and the same data set with every held-out item
    (validation and test) replaced by another item."""
    from hnvm.data.prepare import PrepareConfig
    from hnvm.data.store import Dataset

    ds = synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5, config=PrepareConfig(split="leave-one-out"))
    held = pl.col("split") != "train"
    swapped = ds.events.with_columns(item=pl.when(held).then(pl.col("item") % ds.n_items + 1).otherwise(pl.col("item")))
    return ds, Dataset(events=swapped, items=ds.items, users=ds.users, meta=ds.meta)


@pytest.mark.parametrize("name", CASES)
def test_training_never_reads_held_out_items(name: str, tiny_loo) -> None:
    """Under a held-out-item split (leave-one-out) what a model learns does not depend on the
    held-out items: replacing them all leaves its scores bit-identical."""
    ds, swapped = tiny_loo
    seq = Sequences.from_events(ds.events, ds.n_users, ds.held_out_items)
    batch = next(next_item_batches(seq, "test", max_targets=60))

    def trained(data) -> torch.Tensor:
        torch.manual_seed(0)
        return make(name).fit(data, train_cfg=TRAIN).score(batch)

    assert torch.equal(trained(ds), trained(swapped))
