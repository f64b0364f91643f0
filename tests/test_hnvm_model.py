"""HNVM as a trained recommender: learning, ablation margin, determinism, checkpoints, resume,
configuration errors and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.batches import Sequences
from hnvm.data.prepare import PrepareConfig
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import ConfigError, HnvmError
from hnvm.evaluate import NEXT_ITEM_VALIDATION, evaluate_next_item, evaluate_next_session
from hnvm.models.hnvm import HNVM, HNVMConfig
from hnvm.models.pop import Pop
from hnvm.runs import evaluate_run, resolve_config, train_run
from hnvm.training import TrainConfig, Trainer, TrainingDiverged

SMALL = dict(hidden=32, emb_dim=32, d_e=8, d_z=8, mlp_hidden=32, n_negatives=64, batch_size=16)


def test_overfits_a_tiny_dataset() -> None:
    # 6 users replay fixed, user-specific orders of 8 items in every session
    ds = synthetic_dataset(n_users=6, n_items=8, n_topics=1, sessions_per_user=(6, 6),
                           session_length=(6, 6), sequential=1.0, n_successors=1, seed=2,
                           config=PrepareConfig(min_item_support=1))
    seq = Sequences.from_events(ds.events, ds.n_users)
    m = HNVM(HNVMConfig(**{**SMALL, "dropout": 0.0}, loss="full-softmax", kl_anneal_epochs=0))
    m.fit(ds, train_cfg=TrainConfig(epochs=150, optimizer="adam", lr=0.02, patience=0))
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
    full = HNVM(HNVMConfig(**SMALL)).fit(ds, train_cfg=tc)
    blind = HNVM(HNVMConfig(**SMALL, use_history=False, use_e=False)).fit(ds, train_cfg=tc)
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
    v = NEXT_ITEM_VALIDATION
    a = evaluate_next_item(HNVM(HNVMConfig(**SMALL)).fit(ds, validation=v, train_cfg=tc), seq).metrics
    b = evaluate_next_item(HNVM(HNVMConfig(**SMALL)).fit(ds, validation=v, train_cfg=tc), seq).metrics
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
    assert ranks.columns == ["user", "session", "position", "item", "rank", "user_id", "item_id"]
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
    paper = Path(__file__).resolve().parents[1] / "src" / "hnvm" / "paper_configs" / "hnvm.toml"
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


# ---- cold start: the unknown-user row (issue 12, item 18) ---------------------------------------

def _with_unseen_users(ds, every: int = 5):
    """`ds` with every `every`-th user's sessions all moved to the test split: users that exist
    in users.parquet but have no training event, as a time split makes them."""
    import polars as pl

    from hnvm.data.store import Dataset

    held = [u for u in range(1, ds.n_users + 1) if u % every == 0]
    split = ds.events.schema["split"]
    ev = ds.events.with_columns(split=pl.when(pl.col("user").is_in(held)).then(pl.lit("test"))
                                .otherwise(pl.col("split").cast(pl.Utf8)).cast(split))
    return Dataset(ev, ds.items, ds.users, ds.meta), held


def _empty_history(users: list[int]):
    from hnvm.contract import Batch

    none = torch.zeros(0, dtype=torch.long)
    return Batch(torch.tensor(users), torch.zeros(len(users), 0, 1, dtype=torch.long), none, none)


USER_TABLES = ("e_prior_mu", "e_prior_logvar", "e_post_mu", "e_post_logvar")


def test_unknown_user_row_is_trained_and_seeded() -> None:
    ds = synthetic_dataset(n_users=40, n_items=30, n_topics=3, seed=5, config=PrepareConfig(min_item_support=1))
    tc = TrainConfig(epochs=2, lr=0.01, seed=3, patience=0)
    torch.manual_seed(tc.seed)  # fit builds the network right after seeding: the same initial rows
    init = HNVM(HNVMConfig(**SMALL))._build(ds.n_items, ds.n_users)
    off = HNVM(HNVMConfig(**SMALL, unknown_user_rate=0.0)).fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=tc)
    on = HNVM(HNVMConfig(**SMALL, unknown_user_rate=0.2)).fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=tc)
    again = HNVM(HNVMConfig(**SMALL, unknown_user_rate=0.2)).fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=tc)
    assert HNVMConfig().unknown_user_rate == 0  # the paper's training by default
    for name in USER_TABLES:
        start = getattr(init, name).weight[0]
        assert not torch.allclose(getattr(off.net, name).weight[0], start, atol=1e-4), name
        assert not torch.allclose(getattr(on.net, name).weight[0], start, atol=1e-4), name
    # rate 0: row 0 is the moment-matched aggregate of the trained users' posteriors
    mu, lv = off.net.e_post_mu.weight[1:], off.net.e_post_logvar.weight[1:]
    torch.testing.assert_close(off.net.e_post_mu.weight[0], mu.mean(0))
    torch.testing.assert_close(off.net.e_post_logvar.weight[0], (lv.exp().mean(0) + mu.var(0, unbiased=False)).log())
    # the known users' rows are their own (trained), not the aggregate
    for name in USER_TABLES:
        assert not torch.equal(getattr(off.net, name).weight[1:], getattr(init, name).weight[1:]), name
    for (k, a), (_, b) in zip(on.net.state_dict().items(), again.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # a seed still gives one result


def test_cold_start_beats_random_for_users_unseen_in_training(tmp_path: Path) -> None:
    """Users without training events (a time split) get the unknown row, are flagged cold start by
    recommend, and their recommendations (the population prior: no e of their own, no history)
    beat a random ranking of their first session by far."""
    from hnvm.recommend import recommend_user

    base = synthetic_dataset(n_users=150, n_items=100, n_topics=2, zipf=1.5, seed=3, sessions_per_user=(3, 6),
                             session_length=(2, 6), config=PrepareConfig(min_item_support=1))
    ds, held = _with_unseen_users(base)
    ds.save(tmp_path / "data")
    tc = ["train.epochs=3", "train.lr=0.01", "train.seed=1", "train.patience=0"]
    m, run = train_run(tmp_path / "data", "hnvm", tmp_path / "run",
                       overrides=[f"model.{k}={v}" for k, v in SMALL.items()] + tc)
    cold = m.score_sessions(_empty_history([0]))[0]
    # an unseen user's own id scores exactly as the unknown user (row 0)
    torch.testing.assert_close(m.score_sessions(_empty_history(held[:3])), cold.expand(3, -1), rtol=0, atol=1e-6)
    seq = Sequences.from_events(ds.events, ds.n_users)
    firsts = [set(seq.session(int(seq.user_first[u])).tolist()) for u in held]

    def recall_mrr(scores: torch.Tensor) -> tuple[float, float]:
        top = (torch.argsort(scores[1:], descending=True)[:20] + 1).tolist()
        rec = [len(s & set(top)) / len(s) for s in firsts]
        rr = [next((1 / (r + 1) for r, i in enumerate(top) if i in s), 0.0) for s in firsts]
        return sum(rec) / len(rec), sum(rr) / len(rr)

    g = torch.Generator().manual_seed(0)
    rand = [recall_mrr(torch.rand(ds.n_items + 1, generator=g)) for _ in range(20)]
    r_rand, m_rand = (sum(x) / len(rand) for x in zip(*rand, strict=True))
    r_cold, m_cold = recall_mrr(cold)
    # measured (seeds 3/1, default unknown_user_rate 0): cold recall@20 .406, MRR@20 .505; random .212, .142
    assert r_cold > 1.6 * r_rand and m_cold > 2.5 * m_rand, (r_cold, m_cold, r_rand, m_rand)
    # recommend (the serve engine): unseen users are cold start, users with training events are not
    unseen, known = ds.user_ids([held[0], held[0] - 1])
    assert recommend_user(run, unseen, k=5).cold_start  # its test sessions are its history
    assert not recommend_user(run, known, k=5).cold_start
    stranger = recommend_user(run, "nobody-at-all", k=5)  # no history: the population prior itself
    assert stranger.cold_start and stranger.items == ds.item_ids(torch.argsort(cold[1:], descending=True)[:5] + 1)


@pytest.mark.parametrize(("name", "tables", "sets"), [
    ("bprmf", ("user",), ["model.dim=8"]),
    ("ncf", ("user_gmf", "user_mlp"), ["model.factors=4", "model.batch_size=128"]),
    ("caser", ("user_emb",), ["model.L=3", "model.T=2", "model.d=8", "model.nv=2", "model.nh=4"]),
])
def test_user_table_models_give_unknown_users_the_mean_user(name: str, tables: tuple[str, ...],
                                                            sets: list[str]) -> None:
    """The same kind in the other models with a user table: row 0 (never trained) becomes the mean
    row of the trained users, and users without training events get it."""
    from hnvm.models.base import get_model_class

    ds, held = _with_unseen_users(synthetic_dataset(n_users=40, n_items=30, n_topics=3, seed=5,
                                                    config=PrepareConfig(min_item_support=1)))
    rc = resolve_config(name, None, [*sets, "train.epochs=1", "train.seed=2"])
    m = get_model_class(name)(rc.model_config).fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=rc.train)
    trained = sorted(set(range(1, ds.n_users + 1)) - set(held))
    for t in tables:
        w = getattr(m.net, t).weight
        torch.testing.assert_close(w[0], w[trained].mean(0))
        assert torch.equal(w[held], w[0].expand(len(held), -1)), t


def _session_row(sessions: list[list[int]]) -> torch.Tensor:
    """Long[1, N, T]: one user's sessions, right-padded (one empty session if there are none)."""
    out = torch.zeros(1, max(len(sessions), 1), max((len(s) for s in sessions), default=1), dtype=torch.long)
    for j, s in enumerate(sessions):
        out[0, j, : len(s)] = torch.tensor(s)
    return out


@pytest.mark.parametrize("overrides", [{}, {"max_len": 2}, {"use_z": False}, {"use_e": False, "use_history": False}])
def test_online_steps_equal_score_and_score_sessions(overrides: dict[str, object]) -> None:
    """The public online inference (fold sessions one by one, condition, decoder steps, score)
    gives `score` (next item) and `score_sessions` (next session), for users with and without
    history and for the unknown user 0."""
    from hnvm.contract import Batch

    ds = synthetic_dataset(n_users=20, n_items=25, n_topics=3, session_length=(2, 6), seed=3,
                           config=PrepareConfig(min_item_support=1))
    seq = Sequences.from_events(ds.events, ds.n_users)
    m = HNVM(HNVMConfig(**{**SMALL, "n_negatives": 16}, **overrides)).fit(ds, train_cfg=TrainConfig(epochs=1, seed=1))
    uid = max(range(1, ds.n_users + 1), key=lambda u: int(seq.user_end[u] - seq.user_first[u]))
    sessions = [seq.session(s).tolist() for s in range(int(seq.user_first[uid]), int(seq.user_end[uid]))]
    *hist, last = sessions
    assert len(hist) >= 2 and max(map(len, hist)) > 2  # (max_len=2 trims a history session)
    empty = torch.zeros(0, dtype=torch.long)
    cases = [(uid, hist, last[:2], last[2] if len(last) > 2 else 1), (uid, hist, [], last[0]),
             (uid, [], last[:3], 1), (0, [], [], 1), (0, hist[:1], [last[0]], 1)]
    for user, past, prefix, target in cases:
        users = torch.tensor([user])
        h_con = m.initial_context(1)
        for s in past:
            h_con = m.fold_session(h_con, torch.tensor(s))
        torch.testing.assert_close(h_con, m.encode_history(users, _session_row(past) if past else empty.view(1, 0, 1)),
                                   atol=1e-5, rtol=1e-5)
        cond = m.session_condition(h_con, m.general_preference(users))
        h = m.decoder_step(m.bos, None, cond)
        for item in prefix:
            h = m.decoder_step(item, h, cond)
        got = m.score_state(h)
        batch = Batch(users, _session_row([*past, [*prefix, target]]), torch.tensor([0]), torch.tensor([len(prefix)]))
        torch.testing.assert_close(got[:, 1:], m.score(batch)[:, 1:], atol=1e-5, rtol=1e-5)
        if not prefix:
            want = m.score_sessions(Batch(users, _session_row(past), empty, empty))
            torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    weight, bias = m.output_layer()
    torch.testing.assert_close(m.score_state(h), h @ weight.T + bias)


def test_kl_warm_up_is_in_epochs_and_no_epoch_is_selected_before_beta_is_one(synth, tmp_path: Path) -> None:
    """β reaches 1 after kl_anneal_epochs epochs whatever the batch size, and early stopping never
    selects an epoch that ended with β < 1 (marked "selectable": false in the train log)."""
    ds, seq = synth
    for batch_size in (8, 32):
        m = HNVM(HNVMConfig(**{**SMALL, "batch_size": batch_size}, kl_anneal_epochs=2.0))
        t = m.trainable(ds, seq, TrainConfig())
        list(t.train_batches(0, np.random.default_rng(0)))
        s = t.steps_per_epoch
        assert s == -(-len(t.windows) // batch_size)
        assert t.beta(0) == 0.0 and t.beta(s) == pytest.approx(0.5) and t.beta(2 * s) == 1.0
        assert not t.selectable(2 * s - 1) and t.selectable(2 * s)
    m = HNVM(HNVMConfig(**SMALL, kl_anneal_epochs=2.0))
    m.fit(ds, validation=NEXT_ITEM_VALIDATION, run_dir=tmp_path / "a",
          train_cfg=TrainConfig(epochs=4, patience=0, seed=3))
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["type"] == "epoch"]
    assert [r.get("selectable", True) for r in epochs] == [False, True, True, True]
    assert m.result_.best_epoch >= 2  # epoch 1 may score best on validation; it is never chosen
    # a run that ends inside its warm-up keeps its last epoch and says so
    m = HNVM(HNVMConfig(**SMALL, kl_anneal_epochs=5.0))
    m.fit(ds, validation=NEXT_ITEM_VALIDATION, run_dir=tmp_path / "b", train_cfg=TrainConfig(epochs=2, seed=3))
    assert m.result_.best_epoch == 2
    assert '"selection": "last"' in (tmp_path / "b" / "train_log.jsonl").read_text()


def test_latent_diagnostics_are_logged_and_do_not_change_training(synth, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each epoch's record carries KL per dimension and active units of z and e (Burda et al.);
    computing them draws no random numbers, so the weights are the same without them."""
    from hnvm.models.hnvm import _HNVMTrainable

    ds, _ = synth
    tc = TrainConfig(epochs=2, patience=0, seed=5)
    a = HNVM(HNVMConfig(**SMALL)).fit(ds, validation=NEXT_ITEM_VALIDATION, run_dir=tmp_path / "a", train_cfg=tc)
    epochs = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
              if '"type": "epoch"' in x]
    for r in epochs:
        lat = r["latent"]
        assert 0 <= lat["active_z"] <= SMALL["d_z"] and 0 <= lat["active_e"] <= SMALL["d_e"]
        assert lat["kl_z_per_dim"] >= 0 and lat["kl_e_per_dim"] >= 0
    monkeypatch.delattr(_HNVMTrainable, "diagnostics")
    b = HNVM(HNVMConfig(**SMALL)).fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=tc)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_score_refuses_a_target_outside_its_session() -> None:
    """score reads each target's state from the packed decoder states: a target position past
    its row's last session must be an error, not another row's state."""
    from hnvm.contract import Batch

    model = HNVM(HNVMConfig(hidden=8, emb_dim=8, d_e=2, d_z=2, mlp_hidden=8))
    model.net, model.counts_ = model._build(n_items=10, n_users=3), torch.zeros(11)
    sessions = torch.tensor([[[1, 2, 3, 0]], [[4, 5, 0, 0]]])  # [B=2, N=1, T=4]
    ok = Batch(torch.tensor([1, 2]), sessions, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 1]))
    assert model.score(ok).shape == (3, 11)
    bad = Batch(torch.tensor([1, 2]), sessions, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="not an item"):
        model.score(bad)
