"""The paper's protocols on small files (§4.2, Table 1): leave-one-out (RSC) and shan (IJC, the
protocol of Ying et al. 2018 the paper follows), their Table 1 accounting, their targets, what
training reads, and the refusals of what they do not define."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.batches import Sequences, next_item_batches, next_session_batches
from hnvm.data.prepare import PrepareConfig, prepare
from hnvm.data.store import Dataset
from hnvm.evaluate import evaluate_next_item
from hnvm.models.base import get_model_class
from hnvm.training import TrainConfig

runner = CliRunner()


def rsc_log(path: Path, n_users: int = 12, seed: int = 0) -> Path:
    """A generic log: every user 3-6 sessions (2 h apart) of 2-5 events over 10 items; user 1's
    last session has exactly 2 events (its validation item is then at position 1)."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, n_users + 1):
        t = 1_600_000_000 + u
        n_sess = int(rng.integers(3, 7))
        for s in range(n_sess):
            n = 2 if (u == 1 and s == n_sess - 1) else int(rng.integers(2, 6))
            for _ in range(n):
                lines.append(f"{u},{int(rng.integers(0, 10))},{t}")
                t += 60
            t += 7200
    path.write_text("uid,iid,ts\n" + "\n".join(lines) + "\n")
    return path


COLS = {"user": "uid", "item": "iid", "time": "ts"}


@pytest.fixture
def loo(tmp_path: Path) -> Dataset:
    return prepare(rsc_log(tmp_path / "log.csv"), tmp_path / "d", columns=COLS,
                   config=PrepareConfig(split="leave-one-out", min_item_support=1))


def test_leave_one_out_holds_out_each_users_last_two_items(loo: Dataset) -> None:
    ev = loo.events.sort("user", "session", "pos")
    last = ev.group_by("user", maintain_order=True).tail(2)
    assert last.get_column("split").to_list() == ["valid", "test"] * loo.n_users
    assert ev.filter(pl.col("split") != "train").height == 2 * loo.n_users
    # both in the user's last session, after its training events
    last_session = ev.group_by("user").agg(pl.col("session").max())
    held = ev.filter(pl.col("split") != "train").join(last_session, on="user", suffix="_last")
    assert (held.get_column("session") == held.get_column("session_last")).all()


def test_leave_one_out_table1_accounting(loo: Dataset) -> None:
    s = loo.meta["stats"]
    assert s["table1_training_sessions"] + s["test_sessions"] == s["sessions"]
    assert s["test_sessions"] == loo.n_users  # one test session per user (no cold test item here)
    assert s["test_next_item_targets"] == s["valid_next_item_targets"] == loo.n_users
    assert s["test_next_session_targets"] == 0
    r = runner.invoke(app, ["stats", str(loo.path)])
    assert r.exit_code == 0, r.output
    assert "leave-one-out" in r.output and "yes" in r.output


def test_leave_one_out_targets_and_rows(loo: Dataset) -> None:
    seq = Sequences.from_events(loo.events, loo.n_users, loo.held_out_items)
    ev = loo.events.sort("session", "pos")
    for split in ("valid", "test"):
        batches = list(next_item_batches(seq, split, max_targets=5))
        assert sum(b.n_targets for b in batches) == loo.n_users
        want = ev.filter(pl.col("split") == split)
        got = torch.cat([b.targets for b in batches]).tolist()
        assert got == want.get_column("item").to_list()
        for b in batches:
            for k in range(b.n_targets):
                row, pos = int(b.target_rows[k]), int(b.target_pos[k])
                shown = int((b.sessions[row, -1] > 0).sum())
                assert shown == pos + 1  # the validation row never shows the test item
    # user 1's last session has 2 events: the validation item is at position 1 and scored
    valid_1 = loo.next_item_targets("valid").filter(pl.col("user") == 1)
    assert valid_1.get_column("pos").to_list() == [0]


def test_training_reads_no_held_out_item(loo: Dataset) -> None:
    seq = Sequences.from_events(loo.events, loo.n_users, loo.held_out_items)
    view = seq.view(("train",))
    assert len(view.items) == loo.events.filter(pl.col("split") == "train").height
    # a session keeps its training prefix; a last session of 2 events (valid, test) has none
    assert view.n_sessions == loo.events.filter(pl.col("split") == "train").get_column("session").n_unique()
    assert view.n_sessions < loo.events.get_column("session").n_unique()
    assert set(view.session_split.tolist()) == {0}
    ev = loo.events.filter(pl.col("split") == "train").sort("session", "pos")
    assert view.items.tolist() == ev.get_column("item").to_list()


@pytest.mark.parametrize("name", ["hnvm", "gru4rec", "hrnn", "pop", "ptopfreq"])
def test_models_train_and_evaluate_under_leave_one_out(name: str, loo: Dataset) -> None:
    small = {"hnvm": {"hidden": 8, "emb_dim": 8, "d_e": 2, "d_z": 2, "mlp_hidden": 8, "n_negatives": 4},
             "gru4rec": {"layers": (8,), "batch_size": 4, "n_sample": 4, "sample_cache_size": 64},
             "hrnn": {"emb_dim": 8, "session_hidden": 8, "user_hidden": 8, "n_negatives": 4}}
    model = get_model_class(name)(**small.get(name, {}))
    model.fit(loo, train_cfg=TrainConfig(epochs=1, seed=0))  # (pop and ptopfreq ignore it)
    seq = Sequences.from_events(loo.events, loo.n_users, loo.held_out_items)
    res = evaluate_next_item(model, seq, "test", keep_ranks=True)
    assert res.n_targets == loo.n_users
    assert res.ranks is not None and (res.ranks.get_column("rank") >= 1).all()


def test_next_session_is_refused_under_held_out_items(loo: Dataset, tmp_path: Path) -> None:
    seq = Sequences.from_events(loo.events, loo.n_users, loo.held_out_items)
    with pytest.raises(ValueError, match="whole-session split"):
        next(next_session_batches(seq, "test"))
    with pytest.raises(ValueError, match="whole-session split"):
        loo.next_session_targets("test")


def ijcai_log(path: Path, n_users: int = 60, seed: int = 1) -> Path:
    """user_log_format1.csv: users shop on days of Sept-Nov; items 0-7 are common, item 99 is
    bought by 3 users only (SHAN drops items of < 20 users); some days hold one item."""
    rng = np.random.default_rng(seed)
    days = [f"{m:02d}{d:02d}" for m in (9, 10, 11) for d in (3, 9, 15, 21, 27) if (m, d) <= (11, 11)]
    lines = []
    for u in range(1, n_users + 1):
        for day in sorted(rng.choice(days, size=5, replace=False)):
            for _ in range(int(rng.integers(1, 5))):
                lines.append(f"{u},{int(rng.integers(0, 8))},7,8,9,{day},2")
        if u <= 3:
            lines.append(f"{u},99,7,8,9,1111,2")
    path.write_text("user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n" + "\n".join(lines) + "\n")
    return path


def test_shan_protocol_on_a_user_log_format1_file(tmp_path: Path) -> None:
    r = runner.invoke(app, ["prepare", str(ijcai_log(tmp_path / "user_log_format1.csv")), "--preset", "ijcai15",
                            "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    ds = Dataset.load(tmp_path / "d")
    assert ds.meta["prepare"]["split"] == "shan" and ds.held_out_items
    assert "99" not in ds.items.get_column("id").to_list()  # observed by 3 < 20 users
    ev = ds.events.sort("session", "pos")
    assert ev.group_by("session").len().get_column("len").min() >= 2  # no singleton session
    held = ev.filter(pl.col("split") != "train")
    assert held.group_by("session").len().get_column("len").max() == 1  # one held-out item per session
    # the held-out item is last in its session, after the session's other (training) items
    lengths = ev.group_by("session").agg(pl.len().alias("n"))
    assert (held.join(lengths, on="session").select(pl.col("pos") == pl.col("n") - 1).to_series()).all()
    # test sessions: 20% of the sessions that start in the last 30 days (before cold items go)
    ts_last = ev.get_column("ts").max()
    starts = ev.group_by("session").agg(pl.col("ts").min())
    recent = starts.filter(pl.col("ts") >= ts_last - 30 * 86400).height
    n_test = held.filter(pl.col("split") == "test").height
    assert 0 < n_test <= round(0.2 * recent) and n_test >= round(0.2 * recent) - 2
    assert held.join(starts, on="session", suffix="_start").select(
        pl.col("ts_start") >= ts_last - 30 * 86400).to_series().all()
    s = ds.meta["stats"]
    assert s["table1_training_sessions"] + s["test_sessions"] == s["sessions"]
    assert "Training + test = sessions" in r.output


def test_shan_seed_decides_and_is_recorded(tmp_path: Path) -> None:
    log = ijcai_log(tmp_path / "user_log_format1.csv")
    a = prepare(log, tmp_path / "a", preset="ijcai15")
    b = prepare(log, tmp_path / "b", preset="ijcai15")
    c = prepare(log, tmp_path / "c", preset="ijcai15",
                config=PrepareConfig(split="shan", min_item_users=20, min_item_support=1, min_sessions=1, seed=5))
    assert a.events.equals(b.events)
    assert not a.events.equals(c.events)
    assert c.meta["prepare"]["seed"] == 5


def test_cli_refuses_next_session_on_held_out_items(loo: Dataset, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", str(loo.path), "--model", "pop", "--out", str(run)])
    assert r.exit_code == 0, r.output
    refused(["evaluate", str(run), "--task", "next-session"], "whole-session split")


def test_prepare_refuses_unknown_split_and_shan_without_time(tmp_path: Path) -> None:
    log = rsc_log(tmp_path / "log.csv")
    refused(["prepare", str(log), "--columns", "user=uid,item=iid,time=ts", "--split", "random",
             "--out", str(tmp_path / "x")], "--split", "leave-one-out")
    assert not (tmp_path / "x").exists()
    refused(["prepare", str(log), "--columns", "user=uid,item=iid,time=ts", "--split", "shan",
             "--test-fraction", "0.95", "--out", str(tmp_path / "y")], "--test-fraction")


def test_benchmark_protocol_paper_runs_and_refuses_other_splits(loo: Dataset, tmp_path: Path) -> None:
    from hnvm.paper import PAPER_MODELS, paper_configs

    assert {"gru4rec", "hrnn", "hnvm"} <= {p.stem for p in paper_configs().glob("*.toml")}
    assert PAPER_MODELS[-1] == "hnvm" and "ptopfreq" not in PAPER_MODELS
    out = tmp_path / "bench"
    r = runner.invoke(app, ["benchmark", str(loo.path), "--protocol", "paper", "--models", "pop,gru4rec",
                            "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "paper"
    g = res["models"]["gru4rec"]
    assert g["config"].endswith("paper_configs/gru4rec.toml") and g["resolved"]["model_config"]["loss"] == "bpr"
    assert g["resolved"]["train"]["optimizer"] == "adagrad" and g["n_targets"] == loo.n_users
    # the paper's next-item protocol needs held-out items; its next-session one user-last
    ul = prepare(rsc_log(tmp_path / "log2.csv"), tmp_path / "ul", columns=COLS,
                 config=PrepareConfig(min_item_support=1))
    refused(["benchmark", str(ul.path), "--protocol", "paper", "--out", str(tmp_path / "b2")],
            "--split leave-one-out")
    refused(["benchmark", str(loo.path), "--protocol", "paper", "--task", "next-session",
             "--out", str(tmp_path / "b3")], "whole-session")
    refused(["benchmark", str(loo.path), "--protocol", "theirs", "--out", str(tmp_path / "b4")], "--protocol")


def test_no_row_shows_a_held_out_item_of_a_later_split() -> None:
    """A shan test session can precede the same user's validation session: the validation row
    must not show its test item (item 3 below), not even in the earlier session; the test row
    may show earlier validation items (they are the user's past)."""
    ev = pl.DataFrame({
        "user": [1] * 7, "session": [0, 0, 0, 1, 1, 2, 2], "pos": [0, 1, 2, 0, 1, 0, 1],
        "item": [1, 2, 3, 4, 5, 6, 7], "ts": list(range(7)),
        "split": ["train", "train", "test", "train", "valid", "train", "train"],
    }).with_columns(pl.col("split").cast(pl.Enum(["train", "valid", "test"])))
    seq = Sequences.from_events(ev, 1, held_out_items=True)
    (valid,) = list(next_item_batches(seq, "valid"))
    assert 3 not in valid.sessions.tolist()[0][0] and valid.targets.tolist() == [5]
    assert valid.session_ids.tolist() == [1]  # the data set's session id, not the view's
    (test,) = list(next_item_batches(seq, "test"))
    assert test.targets.tolist() == [3] and test.target_pos.tolist() == [2]
    assert seq.view(("train",)).items.tolist() == [1, 2, 4, 6, 7]


def test_online_state_keeps_the_row_of_a_user_whose_sessions_all_hold_held_out_items(tmp_path: Path) -> None:
    from hnvm.online.engine import Engine

    ds = prepare(ijcai_log(tmp_path / "user_log_format1.csv"), tmp_path / "d", preset="ijcai15",
                 config=PrepareConfig(split="shan", min_item_users=20, min_item_support=1, min_sessions=1,
                                      test_fraction=0.5, valid_fraction=0.4, holdout_days=200))
    per = ds.events.group_by("user", "session").agg((pl.col("split") != "train").any().alias("held"))
    all_held = per.group_by("user").agg(pl.col("held").all()).filter(pl.col("held")).get_column("user")
    assert all_held.len() > 0
    runner.invoke(app, ["train", str(tmp_path / "d"), "--model", "pop", "--out", str(tmp_path / "run")])
    eng = Engine.from_run(tmp_path / "run")
    user = ds.user_ids([int(all_held[0])])[0]
    assert eng.state(user).uid == int(all_held[0])  # trained on its events: not the unknown user


def test_sknn_never_takes_the_session_being_scored_as_its_neighbour(loo: Dataset, tmp_path: Path) -> None:
    from hnvm.models.sknn import SKNN

    m = SKNN().fit(loo)
    seq = Sequences.from_events(loo.events, loo.n_users, loo.held_out_items)
    batch = next(next_item_batches(seq, "test", max_targets=100))
    sessions = loo.events.filter(pl.col("split") == "train").get_column("session").unique().sort()
    # under leave-one-out the scored session holds training events (unless it is only 2 long)
    own = m._own_ranks(batch)
    for r in range(len(batch.users)):
        has_train = int(batch.session_ids[r]) in set(sessions.to_list())
        assert (own[r] >= 0) == has_train
    assert m.rank_of_session_ is not None and set(np.flatnonzero(m.rank_of_session_ >= 0)) == set(sessions.to_list())
    ul = prepare(rsc_log(tmp_path / "log2.csv"), tmp_path / "ul", columns=COLS,
                 config=PrepareConfig(min_item_support=1))
    m2 = SKNN().fit(ul)
    b2 = next(next_item_batches(Sequences.from_events(ul.events, ul.n_users), "test", max_targets=100))
    assert (m2._own_ranks(b2) == -1).all()  # whole sessions: nothing to exclude
    m.save(tmp_path / "m")
    assert torch.equal(SKNN.load(tmp_path / "m").score(batch), m.score(batch))
