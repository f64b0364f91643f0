"""Run directories (issue #12, items 4, 5, 6, 8 and the empty validation split): evaluation
refuses data whose train split differs from the run's and records what it scored; a benchmark
re-run redoes what its settings or data changed; --resume checks before it writes; damaged run
files and bad export paths are one-line errors that change nothing."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import polars as pl
import pytest
from cli_checks import refused
from typer.testing import CliRunner

from hnvm.benchmark import run_benchmark
from hnvm.cli import app
from hnvm.data.prepare import PrepareConfig, prepare
from hnvm.data.samples import synthetic_log
from hnvm.data.splits import SPLIT_DTYPE
from hnvm.data.store import Dataset
from hnvm.errors import HnvmError
from hnvm.rundir import load_run, train_digest
from hnvm.runs import evaluate_run, train_run

runner = CliRunner()
BPR = ["model.dim=8", "train.epochs=1", "train.patience=0"]


# ---- fixtures and helpers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def log_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small log (40 users, 30 items, seconds) as a CSV file."""
    path = tmp_path_factory.mktemp("log") / "log.csv"
    synthetic_log(n_users=40, n_items=30, n_topics=4, seed=3).write_csv(path)
    return path


def _prepare(log_csv: Path, out: Path, split: str) -> Path:
    prepare(log_csv, out, columns={"user": "user_id", "item": "item_id", "time": "timestamp"},
            config=PrepareConfig(split=split))
    return out


@pytest.fixture(scope="module")
def data(log_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log prepared with the paper's split (user-last)."""
    return _prepare(log_csv, tmp_path_factory.mktemp("ul") / "data", "user-last")


@pytest.fixture(scope="module")
def data_time(log_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same log prepared with --split time: the same vocabularies, other train events."""
    return _prepare(log_csv, tmp_path_factory.mktemp("time") / "data", "time")


def _relabelled(src: Path, out: Path, keep: pl.Expr | None = None, *, valid_to_train: bool = False) -> Path:
    """A copy of a dataset whose validation split is empty (valid events become train events)
    or holds only one-event sessions (`keep` drops the others' later events)."""
    ds = Dataset.load(src)
    ev = ds.events
    if valid_to_train:
        ev = ev.with_columns(split=pl.when(pl.col("split") == "valid").then(pl.lit("train"))
                             .otherwise(pl.col("split").cast(pl.Utf8)).cast(SPLIT_DTYPE))
    if keep is not None:
        ev = ev.filter(keep)
    Dataset(events=ev, items=ds.items, users=ds.users, meta=ds.meta).save(out)
    return out


def _snapshot(d: Path) -> dict[str, str]:
    """Every file under d (hidden ones too) -> sha256: 'nothing written or changed' checks."""
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _train(data: Path, model: str, out: Path, sets: list[str] | None = None) -> Path:
    train_run(data, model, out, overrides=sets or [])
    return out


# ---- 4: evaluate --data checks the train split and records the data set -------------------

def test_evaluate_refuses_data_with_another_train_split(data: Path, data_time: Path, tmp_path: Path) -> None:
    run = _train(data_time, "pop", tmp_path / "run")
    assert json.loads((run / "config.json").read_text())["dataset"]["train_sha256"] == \
        train_digest(Dataset.load(data_time))
    evaluate_run(run)
    before = _snapshot(run)
    # same vocabularies (the old check passed): its test targets include the run's train events
    refused(["evaluate", str(run), "--data", str(data)], str(data), "train split differs")
    assert _snapshot(run) == before  # metrics.json not overwritten


def test_evaluate_refuses_data_reprepared_at_the_runs_path(log_csv: Path, tmp_path: Path) -> None:
    path = _prepare(log_csv, tmp_path / "data", "time")
    run = _train(path, "pop", tmp_path / "run")
    prepare(log_csv, path, columns={"user": "user_id", "item": "item_id", "time": "timestamp"},
            config=PrepareConfig(split="user-last"), force=True)
    with pytest.raises(HnvmError, match="train split differs"):
        evaluate_run(run)


def test_train_digest_ignores_paths_and_global_session_numbers(data: Path, tmp_path: Path) -> None:
    ds = Dataset.load(data)
    moved = ds.events.with_columns(session=pl.col("session") + 1000)  # other numbering, same sessions
    copy = Dataset(events=moved, items=ds.items, users=ds.users, meta=ds.meta)
    assert train_digest(copy) == train_digest(ds)
    shifted = ds.events.with_columns(ts=pl.when(pl.col("split") == "train").then(pl.col("ts") + 1)
                                     .otherwise(pl.col("ts")))
    assert train_digest(Dataset(events=shifted, items=ds.items, users=ds.users, meta=ds.meta)) != train_digest(ds)


def test_metrics_record_the_evaluated_data_set(data: Path, tmp_path: Path) -> None:
    run = _train(data, "pop", tmp_path / "run")
    copy = tmp_path / "copy"
    Dataset.load(data).save(copy)  # the same data elsewhere: accepted, and recorded as such
    r = runner.invoke(app, ["evaluate", str(run), "--data", str(copy)])
    assert r.exit_code == 0, r.output
    entry = json.loads((run / "metrics.json").read_text())["next-item/test"]
    assert entry["dataset"]["path"] == str(copy.resolve())
    assert entry["dataset"]["train_sha256"] == train_digest(Dataset.load(data))
    assert len(entry["dataset"]["sha256"]) == 64 and entry["include_first"] is False
    evaluate_run(run)
    entry2 = json.loads((run / "metrics.json").read_text())["next-item/test"]
    assert entry2["dataset"]["path"] == str(data.resolve())
    assert entry2["dataset"]["sha256"] == entry["dataset"]["sha256"]  # the same events


def test_run_without_train_digest_falls_back_to_the_vocabulary(data: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    run = _train(data, "pop", tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    del cfg["dataset"]["train_sha256"]  # a run written before the digest existed
    (run / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="hnvm.rundir"):
        res = evaluate_run(run)
    assert res.n_targets > 0 and "only the vocabulary" in caplog.text


# ---- 5: benchmark re-runs redo what changed ----------------------------------------------

def test_benchmark_rerun_with_other_epochs_retrains(data: Path, tmp_path: Path) -> None:
    out, steps = tmp_path / "bench", []
    sets, small = ["train.patience=0"], {"bprmf": ["model.dim=8"]}
    run_benchmark(data, ["pop", "bprmf"], "next-item", out, sets, epochs=1, model_overrides=small)
    first = json.loads((out / "results.json").read_text())["models"]
    res = run_benchmark(data, ["pop", "bprmf"], "next-item", out, sets, epochs=3, on_step=steps.append,
                        model_overrides=small)
    assert any("training bprmf" in s for s in steps)
    run = out / "runs" / "bprmf"
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2, 3]
    got = res["models"]["bprmf"]
    assert got["resolved"]["train"]["epochs"] == 3 and got["metrics"] != first["bprmf"]["metrics"]
    # the reported numbers are those of the 3-epoch run
    assert got["metrics"] == pytest.approx(evaluate_run(run).metrics)
    steps.clear()
    run_benchmark(data, ["pop", "bprmf"], "next-item", out, sets, epochs=3, on_step=steps.append,
                  model_overrides=small)
    assert sum("already done" in s for s in steps) == 2  # unchanged settings: nothing redone


def test_benchmark_rerun_with_include_first_reevaluates(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    a = run_benchmark(data, ["pop"], "next-item", out)["models"]["pop"]
    b = run_benchmark(data, ["pop"], "next-item", out, include_first=True)["models"]["pop"]
    n_sessions = Dataset.load(data).meta["stats"]["test_sessions"]
    assert b["n_targets"] == a["n_targets"] + n_sessions and b["include_first"] is True
    assert pl.read_parquet(out / "ranks" / "pop.parquet").height == b["n_targets"]


def test_benchmark_rerun_on_reprepared_data_retrains(log_csv: Path, tmp_path: Path) -> None:
    path, out, steps = _prepare(log_csv, tmp_path / "data", "user-last"), tmp_path / "bench", []
    run_benchmark(path, ["pop"], "next-item", out)
    prepare(log_csv, path, columns={"user": "user_id", "item": "item_id", "time": "timestamp"},
            config=PrepareConfig(split="time"), force=True)
    res = run_benchmark(path, ["pop"], "next-item", out, on_step=steps.append)
    assert any("training pop" in s for s in steps)
    assert res["models"]["pop"]["n_targets"] == Dataset.load(path).meta["stats"]["test_next_item_targets"]


def test_benchmark_damaged_results_file_is_one_line(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    (out).mkdir()
    (out / "results.json").write_text('{"task": ')
    refused(["benchmark", str(data), "--models", "pop", "--out", str(out)], "results.json", "damaged")


# ---- 6: --resume checks before it writes; consistent advice for unfinished runs ------------

def test_resume_with_other_model_settings_changes_nothing(data: Path, tmp_path: Path) -> None:
    run = _train(data, "bprmf", tmp_path / "run", BPR)
    before = _snapshot(run)
    base = ["train", str(data), "--model", "bprmf", "--out", str(run), "--resume"]
    sets = [a for s in BPR for a in ("--set", s)]
    refused([*base, *sets, "--set", "model.dim=16"], "model.dim: 8 -> 16")
    refused([*base, *sets, "--set", "train.lr=0.01"], "train.lr")
    refused(["train", str(data), "--model", "pop", "--out", str(run), "--resume"], "bprmf run", "--model pop")
    refused([*base, *sets, "--force"], "not both")
    assert _snapshot(run) == before


def test_resume_may_change_epochs(data: Path, tmp_path: Path) -> None:
    run = _train(data, "bprmf", tmp_path / "run", BPR)
    r = runner.invoke(app, ["train", str(data), "--model", "bprmf", "--out", str(run), "--resume",
                            *(a for s in [*BPR, "train.epochs=2"] for a in ("--set", s))])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]


def test_resume_of_a_missing_run_writes_nothing(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "nope"
    refused(["train", str(data), "--model", "bprmf", "--out", str(run), "--resume"], str(run), "no run to resume")
    assert not run.exists()
    pop = _train(data, "pop", tmp_path / "pop")  # no checkpoint to continue from
    before = _snapshot(pop)
    refused(["train", str(data), "--model", "pop", "--out", str(pop), "--resume"], "nothing to resume", "--force")
    assert _snapshot(pop) == before
    # plain train on the missing run still works afterwards
    r = runner.invoke(app, ["train", str(data), "--model", "pop", "--out", str(run)])
    assert r.exit_code == 0, r.output


def test_unfinished_runs_get_consistent_advice(data: Path, tmp_path: Path) -> None:
    # killed in its first epoch: config and vocabularies written, no checkpoint, no model
    run = _train(data, "bprmf", tmp_path / "run", BPR)
    for d in ("model", "last", "best"):
        for p in sorted((run / d).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (run / d).rmdir() if (run / d).exists() else None
    args = ["train", str(data), "--model", "bprmf", "--out", str(run), *(a for s in BPR for a in ("--set", s))]
    line = refused(args, "unfinished run", "--force")
    assert "--resume" not in line
    line = refused(["evaluate", str(run)], "no finished model", "--force")
    assert "--resume" not in line
    refused([*args, "--resume"], "nothing to resume", "--force")
    # killed after an epoch: a checkpoint in last/ -> both advise --resume, which works
    run2 = _train(data, "bprmf", tmp_path / "run2", BPR)
    for p in (run2 / "model").iterdir():
        p.unlink()
    (run2 / "model").rmdir()
    args2 = ["train", str(data), "--model", "bprmf", "--out", str(run2), *(a for s in BPR for a in ("--set", s))]
    refused(args2, "unfinished run", "--resume")
    refused(["evaluate", str(run2)], "no finished model", "--resume")
    assert runner.invoke(app, [*args2, "--resume"]).exit_code == 0
    assert load_run(run2)[1]["model"] == "bprmf"


def test_force_never_replaces_a_directory_that_is_not_a_run(data: Path, tmp_path: Path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    refused(["train", str(data), "--model", "pop", "--out", str(d), "--force"], "not a run directory")
    assert (d / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine to train into
    assert runner.invoke(app, ["train", str(data), "--model", "pop", "--out", str(empty)]).exit_code == 0


def test_resume_from_a_damaged_checkpoint_is_one_line(data: Path, tmp_path: Path) -> None:
    run = _train(data, "bprmf", tmp_path / "run", BPR)
    w = run / "last" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    before = _snapshot(run)
    refused(["train", str(data), "--model", "bprmf", "--out", str(run), "--resume",
            *(a for s in [*BPR, "train.epochs=2"] for a in ("--set", s))], "weights.safetensors")
    assert _snapshot(run) == before  # config.json keeps epochs=1


# ---- 8: export destination, damaged run files ---------------------------------------------

def test_export_ranks_into_a_new_folder(data: Path, tmp_path: Path) -> None:
    run = _train(data, "pop", tmp_path / "run")
    dest = tmp_path / "new" / "sub" / "ranks.parquet"  # missing parents are created
    r = runner.invoke(app, ["evaluate", str(run), "--export-ranks", str(dest)])
    assert r.exit_code == 0, r.output
    n = json.loads((run / "metrics.json").read_text())["next-item/test"]["n_targets"]
    assert pl.read_parquet(dest).height == n


def test_export_ranks_destination_checked_before_evaluating(data: Path, tmp_path: Path) -> None:
    run = _train(data, "pop", tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    refused(["evaluate", str(run), "--export-ranks", str(tmp_path / "afile" / "r.parquet")],
           "--export-ranks", "afile")
    refused(["evaluate", str(run), "--export-ranks", str(tmp_path)], "--export-ranks", "is a directory")
    assert not (run / "metrics.json").exists()


def test_failed_export_keeps_the_metrics(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _train(data, "pop", tmp_path / "run")

    def disk_full(res: object, path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hnvm.runs.export_ranks", disk_full)
    with pytest.raises(HnvmError, match="metrics were saved"):
        evaluate_run(run, export=tmp_path / "r.parquet")
    assert json.loads((run / "metrics.json").read_text())["next-item/test"]["n_targets"] > 0


@pytest.mark.parametrize("model", ["pop", "bprmf"])
def test_damaged_model_files_are_one_line(data: Path, tmp_path: Path, model: str) -> None:
    run = _train(data, model, tmp_path / "run", BPR if model == "bprmf" else [])
    st = run / "model" / "model.safetensors"
    good = st.read_bytes()
    st.write_bytes(good[: len(good) // 2])  # truncated
    refused(["evaluate", str(run)], "model.safetensors", "damaged")
    st.write_bytes(good)
    mj = run / "model" / "model.json"
    meta = json.loads(mj.read_text())
    if model == "bprmf":  # weights that do not fit the recorded dimensions
        meta["n_items"] += 3
        mj.write_text(json.dumps(meta))
        refused(["evaluate", str(run)], "model", "do not fit")
    mj.write_text("{")
    refused(["evaluate", str(run)], "model.json", "damaged")
    assert not (run / "metrics.json").exists()


def test_damaged_config_and_metrics_are_one_line(data: Path, tmp_path: Path) -> None:
    run = _train(data, "pop", tmp_path / "run")
    (run / "metrics.json").write_text("[1, 2")
    before = _snapshot(run)
    refused(["evaluate", str(run)], "metrics.json", "damaged")
    assert _snapshot(run) == before
    (run / "metrics.json").unlink()
    cfg = run / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    refused(["evaluate", str(run)], "config.json", "damaged")
    refused(["train", str(data), "--model", "pop", "--out", str(run), "--resume"], "config.json", "damaged")
    cfg.write_text(json.dumps({"format": "hnvm-run", "format_version": 1}))
    refused(["evaluate", str(run)], "config.json", "damaged")


# ---- empty validation split ----------------------------------------------------------------

def test_evaluate_a_split_without_targets_is_one_line(data: Path, tmp_path: Path) -> None:
    nv = _relabelled(data, tmp_path / "nv", valid_to_train=True)
    run = _train(nv, "pop", tmp_path / "run")
    refused(["evaluate", str(run), "--split", "valid"], "valid split has no next-item targets", str(nv))
    refused(["evaluate", str(run), "--split", "valid", "--task", "next-session"], "no next-session targets")
    assert not (run / "metrics.json").exists()


def test_training_without_validation_sessions_warns_and_keeps_the_last_epoch(
        data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nv = _relabelled(data, tmp_path / "nv", valid_to_train=True)
    with caplog.at_level(logging.WARNING, logger="hnvm.training.loop"):
        _train(nv, "bprmf", tmp_path / "run", ["model.dim=8", "train.epochs=2"])
    assert "no validation" in caplog.text
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["type"] == "warning" and log[0]["validation"] == "none"
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]


def test_validation_without_targets_does_not_stop_training_early(data: Path, tmp_path: Path) -> None:
    """Validation sessions of one event: no next-item target, so no score. Before, every epoch
    counted as 'no improvement' and patience stopped training after `patience` epochs."""
    one = _relabelled(data, tmp_path / "one", (pl.col("split") != "valid") | (pl.col("pos") == 0))
    rec, run = train_run(one, "bprmf", tmp_path / "run", overrides=["model.dim=8", "train.epochs=3",
                                                                     "train.patience=1"])
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2, 3]
    assert any(r["type"] == "warning" and r["validation"] == "none" for r in log)
    assert rec.result_.best_epoch == 3  # the last epoch's weights are the model
    from safetensors.torch import load_file

    last = load_file(str(run / "last" / "weights.safetensors"))
    saved = load_file(str(run / "model" / "model.safetensors"))
    for k in ("item.weight", "bias.weight"):  # (the user table's row 0 is set after training)
        assert (saved[k] == last[k]).all(), k


def test_export_never_replaces_the_runs_or_datasets_files(data: Path, tmp_path: Path) -> None:
    run = _train(data, "pop", tmp_path / "run")
    runner.invoke(app, ["evaluate", str(run)])
    before_run, before_data = _snapshot(run), _snapshot(data)
    for dest in (data / "events.parquet", run / "metrics.json", run / "items.parquet"):
        refused(["evaluate", str(run), "--export-ranks", str(dest), "--force"], "--export-ranks",
               "is inside")
    assert _snapshot(run) == before_run and _snapshot(data) == before_data
    # another existing file: only with --force
    other = tmp_path / "ranks.parquet"
    other.write_text("mine")
    refused(["evaluate", str(run), "--export-ranks", str(other)], "exists", "--force")
    assert other.read_text() == "mine"
    r = runner.invoke(app, ["evaluate", str(run), "--export-ranks", str(other), "--force"])
    assert r.exit_code == 0, r.output
    exported = pl.read_parquet(other)
    ds = Dataset.load(data)
    # the raw ids beside the internal ones
    assert exported["user_id"].to_list() == ds.user_ids(exported["user"].to_list())
    assert exported["item_id"].to_list() == ds.item_ids(exported["item"].to_list())


@pytest.mark.parametrize("name", ["items.parquet", "users.parquet"])
def test_damaged_run_vocabulary_is_one_line(data: Path, tmp_path: Path, name: str) -> None:
    run = _train(data, "pop", tmp_path / "run")
    with open(run / name, "r+b") as fh:
        fh.truncate(20)
    refused(["recommend", str(run), "--user", "u1"], name, "damaged")


def test_dataset_table_without_its_columns_is_one_line(data: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "d"
    shutil.copytree(data, bad)
    pl.DataFrame({"x": [1]}).write_parquet(bad / "events.parquet")
    refused(["stats", str(bad)], "events.parquet", "missing column")


def test_benchmark_checks_every_setting_before_training(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    refused(["benchmark", str(data), "--out", str(out), "--models", "bprmf,pop", "--set", "model.dim=8"],
           "pop", "no hyper-parameters")
    refused(["benchmark", str(data), "--out", str(out), "--models", "pop", "--epochs", "0"], "epochs")
    refused(["benchmark", str(tmp_path / "nope"), "--out", str(out), "--models", "pop"], "nope")
    assert not out.exists()
