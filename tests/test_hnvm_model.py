"""HNVM as a trained recommender: learning, ablation margin, determinism, checkpoints, resume,
configuration errors and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.batches import Sequences
from hnvm.data.prepare import PrepareConfig
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import ConfigError, HnvmError
from hnvm.evaluate import evaluate_next_item, evaluate_next_session
from hnvm.models.hnvm import HNVM, HNVMConfig
from hnvm.models.pop import Pop
from hnvm.runs import evaluate_run, resolve_config, train_run
from hnvm.train import TrainConfig, Trainer, TrainingDiverged

SMALL = dict(hidden=32, emb_dim=32, d_e=8, d_z=8, mlp_hidden=32, n_negatives=64, batch_size=16)


def test_overfits_a_tiny_dataset() -> None:
    # 6 users replay fixed, user-specific orders of 8 items in every session
    ds = synthetic_dataset(n_users=6, n_items=8, n_topics=1, sessions_per_user=(6, 6),
                           session_length=(6, 6), sequential=1.0, n_successors=1, seed=2,
                           config=PrepareConfig(min_item_support=1))
    seq = Sequences.from_events(ds.events, ds.n_users)
    m = HNVM(HNVMConfig(**{**SMALL, "dropout": 0.0}, loss="full-softmax", kl_anneal_steps=0))
    m.fit(ds, None, train_cfg=TrainConfig(epochs=150, optimizer="adam", lr=0.02, patience=0))
    r = evaluate_next_item(m, seq, "train", ks=(1, 5))  # positions of sessions it was trained on
    assert r.metrics["recall@5"] >= 0.95, r.metrics


@pytest.fixture(scope="module")
def synth():
    ds = synthetic_dataset(n_users=200, n_items=150, n_topics=10, seed=11, topic_stickiness=0.8,
                           sequential=0.5)
    return ds, Sequences.from_events(ds.events, ds.n_users)


def test_beats_pop_and_history_blind_variant(synth) -> None:
    ds, seq = synth
    tc = TrainConfig(epochs=5, optimizer="adam", lr=0.005, patience=0, seed=1)
    full = HNVM(HNVMConfig(**SMALL)).fit(ds, None, train_cfg=tc)
    blind = HNVM(HNVMConfig(**SMALL, use_history=False, use_e=False)).fit(ds, None, train_cfg=tc)
    pop = Pop().fit(ds)
    # next session from history only: the blind model cannot know the user's drifting interest
    r_full = evaluate_next_session(full, seq, "test").metrics["recall@20"]
    r_blind = evaluate_next_session(blind, seq, "test").metrics["recall@20"]
    r_pop = evaluate_next_session(pop, seq, "test").metrics["recall@20"]
    # measured (seed 11/1): full .486, blind .243, POP .297
    assert r_full > 1.4 * r_pop, (r_full, r_pop)
    assert r_full > 1.5 * r_blind, (r_full, r_blind)
    # next item: sequential patterns inside sessions beat popularity by far
    m_full = evaluate_next_item(full, seq, "test").metrics["mrr@5"]
    m_pop = evaluate_next_item(pop, seq, "test").metrics["mrr@5"]
    assert m_full > 2 * m_pop, (m_full, m_pop)


def test_same_seed_same_metrics(synth, tmp_path: Path) -> None:
    ds, seq = synth
    tc = TrainConfig(epochs=1, seed=7)
    a = evaluate_next_item(HNVM(HNVMConfig(**SMALL)).fit(ds, ds, train_cfg=tc), seq).metrics
    b = evaluate_next_item(HNVM(HNVMConfig(**SMALL)).fit(ds, ds, train_cfg=tc), seq).metrics
    assert a == b


def _dataset_dir(tmp_path: Path) -> Path:
    ds = synthetic_dataset(n_users=80, n_items=60, n_topics=5, seed=4)
    ds.save(tmp_path / "data")
    return tmp_path / "data"


def _sets(epochs: int) -> list[str]:
    return [f"model.{k}={v}" for k, v in SMALL.items()] + [f"train.epochs={epochs}", "train.seed=5",
                                                            "train.patience=0"]


def test_resume_continues_from_saved_epoch(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    full, _ = train_run(data, "hnvm", tmp_path / "full", overrides=_sets(3))
    train_run(data, "hnvm", tmp_path / "part", overrides=_sets(2))
    state = json.loads((tmp_path / "part" / "last" / "state.json").read_text())
    assert state["epoch"] == 1  # 0-based: two epochs done
    resumed, _ = train_run(data, "hnvm", tmp_path / "part", overrides=_sets(3), resume=True)
    log = [json.loads(x) for x in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2, 3]
    # resuming gives the same parameters as training straight through
    for (k, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_run_dir_evaluate_and_export(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    train_run(data, "hnvm", tmp_path / "run", overrides=_sets(1))
    for name in ("config.json", "items.parquet", "users.parquet", "train_log.jsonl"):
        assert (tmp_path / "run" / name).exists()
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    res = evaluate_run(tmp_path / "run", export=tmp_path / "ranks.parquet")
    import polars as pl

    ranks = pl.read_parquet(tmp_path / "ranks.parquet")
    assert ranks.columns == ["user", "session", "position", "item", "rank"]
    assert ranks.height == res.n_targets
    # anyone can recompute the metrics from the exported ranks
    recall5 = (ranks.get_column("rank") <= 5).mean()
    assert recall5 == pytest.approx(res.metrics["recall@5"])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "next-item/test" in m


def test_evaluate_rejects_mismatched_vocabulary(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    train_run(data, "hnvm", tmp_path / "run", overrides=_sets(1))
    other = synthetic_dataset(n_users=70, n_items=50, n_topics=5, seed=9)
    other.save(tmp_path / "other")
    with pytest.raises(HnvmError, match="vocabulary does not match"):
        evaluate_run(tmp_path / "run", data=tmp_path / "other")


def test_config_errors_list_valid_keys_and_ranges(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"valid keys of \[model\]: hidden \(int in \[8, 2048\]\)"):
        resolve_config("hnvm", None, ["model.hiddn=10"])
    with pytest.raises(ConfigError, match=r"model\.dropout = '1\.5' is out of range \[0\.0, 0\.9\]"):
        resolve_config("hnvm", None, ["model.dropout=1.5"])
    with pytest.raises(ConfigError, match="choose one of bpr, bpr-max"):
        resolve_config("hnvm", None, ["model.loss=hinge"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'"):
        resolve_config("hnvm", None, ["train.lrr=1"])
    paper = Path(__file__).resolve().parents[1] / "configs" / "paper.toml"
    rc = resolve_config("hnvm", paper, [])
    assert rc.model_config.hidden == 200 and rc.model_config.loss == "bpr"
    assert rc.train.optimizer == "adagrad"


def test_nan_loss_stops_with_clear_error(tmp_path: Path, synth) -> None:
    ds, _ = synth
    m = HNVM(HNVMConfig(**SMALL))
    m.net = m._build(ds.n_items, ds.n_users)
    from hnvm.models.hnvm import _HNVMTrainable

    t = _HNVMTrainable(m, Sequences.from_events(ds.events, ds.n_users), torch.ones(ds.n_items + 1))
    real_loss = t.loss
    calls = {"n": 0}

    def bad_loss(batch, step):
        calls["n"] += 1
        out = real_loss(batch, step)
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    t.loss = bad_loss  # type: ignore[method-assign]
    trainer = Trainer(TrainConfig(epochs=3, patience=0), tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="step 3"):
        trainer.fit(t, None)


def test_cli_train_and_evaluate(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    runner = CliRunner()
    args = ["train", str(data), "--model", "hnvm", "--out", str(tmp_path / "r")]
    for s in _sets(1):
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "exists" in r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--task", "next-session"])
    assert r.exit_code == 0 and "recall" in r.output
    r = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "x"), "--set", "model.nope=1"])
    assert r.exit_code == 2 and "unknown key 'model.nope'" in r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "not a run directory" in r.output


def test_run_of_another_format_version_is_refused(tmp_path: Path) -> None:
    data = _dataset_dir(tmp_path)
    train_run(data, "pop", tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HnvmError, match="version 99 is not supported"):
        evaluate_run(tmp_path / "run")


def test_nan_parameters_with_a_finite_loss_stop_training(tmp_path: Path, synth) -> None:
    """Validation scores that are NaN (parameters diverged, loss still finite) end training with
    TrainingDiverged, which `hnvm tune` counts as a pruned trial instead of aborting the study."""
    from hnvm.metrics import conservative_ranks
    from hnvm.models.hnvm import _HNVMTrainable

    ds, _ = synth
    m = HNVM(HNVMConfig(**SMALL))
    m.net = m._build(ds.n_items, ds.n_users)
    t = _HNVMTrainable(m, Sequences.from_events(ds.events, ds.n_users), torch.ones(ds.n_items + 1))

    def validate() -> dict[str, float]:
        scores = torch.tensor([[0.0, float("nan"), 1.0]])
        conservative_ranks(scores, torch.tensor([1]))
        return {}

    with pytest.raises(TrainingDiverged, match="epoch 1: validation scores are NaN"):
        Trainer(TrainConfig(epochs=2, patience=0), tmp_path / "run").fit(t, validate)
