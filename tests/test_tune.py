"""`hnvm tune`: search space from config dataclasses, the Optuna study, resume, outputs."""

from __future__ import annotations

import csv
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from cli_checks import refused, snapshot
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.config import choices, rng
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import HnvmError
from hnvm.models.base import get_model_class
from hnvm.runs import resolve_config
from hnvm.search_space import Param, search_space, space_from_config
from hnvm.tune import tune

TINY_HNVM = ["model.hidden=16", "model.emb_dim=16", "model.mlp_hidden=16", "model.d_e=4",
             "model.d_z=4", "model.n_negatives=32", "model.batch_size=32", "model.window=4",
             "train.epochs=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "ds"
    synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5).save(path)
    return path


@dataclass(frozen=True)
class _Cfg:
    size: int = field(default=8, metadata=rng(1, 64))
    width: int = field(default=100, metadata=rng(1, 10_000))
    lr: float = field(default=0.01, metadata=rng(1e-5, 1.0))
    dropout: float = field(default=0.1, metadata=rng(0.0, 0.9))
    act: str = field(default="relu", metadata=choices("relu", "tanh"))
    seed: int = field(default=0, metadata=rng(0, 2**31 - 1))
    skip: int = field(default=1, metadata=rng(1, 5))
    flag: bool = True


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_space_from_config_kinds_ranges_and_exclusions() -> None:
    space = {p.name: p for p in space_from_config(
        _Cfg, exclude=frozenset({"skip"}), override={"width": (10, 1000)})}
    assert set(space) == {"model.size", "model.width", "model.lr", "model.dropout", "model.act"}
    assert space["model.size"] == Param("model.size", "int", 1, 64, False)
    assert space["model.width"] == Param("model.width", "int", 10, 1000, True)  # capped, wide -> log
    assert space["model.lr"] == Param("model.lr", "float", 1e-5, 1.0, True)
    assert space["model.dropout"] == Param("model.dropout", "float", 0.0, 0.9, False)
    assert space["model.act"].kind == "categorical" and space["model.act"].choices == ("relu", "tanh")
    with pytest.raises(ValueError, match="outside"):  # a cap may only narrow the field's range
        space_from_config(_Cfg, override={"size": (1, 128)})


def test_model_search_spaces() -> None:
    hn = {p.name: p for p in search_space("hnvm")}
    assert hn["train.lr"] == Param("train.lr", "float", 1e-4, 1e-1, True)
    assert hn["train.optimizer"].choices == ("adagrad", "adam")
    assert hn["model.loss"].kind == "categorical"
    assert not {"model.mc_samples", "model.use_e", "model.use_z", "model.use_history",
                "model.max_len", "train.seed", "train.epochs"} & set(hn)
    assert hn["model.hidden"].kind == "int" and 8 <= hn["model.hidden"].lo < hn["model.hidden"].hi <= 256
    assert "model.hidden" not in {p.name for p in search_space("hnvm", frozenset({"model.hidden"}))}
    # non-SGD models tune only their own fields; every model's caps lie inside its ranges
    assert [p.name for p in search_space("itemknn")] == ["model.neighbours"]
    for name in ("bprmf", "ncf", "gru4rec", "hrnn", "caser", "stamp", "sknn"):
        cfg = get_model_class(name).config_class  # type: ignore[attr-defined]
        ranges = {f"model.{f.name}": f.metadata.get("range") for f in dataclasses.fields(cfg)}
        for p in search_space(name):
            if p.kind != "categorical" and p.name in ranges:
                lo, hi = ranges[p.name]
                assert lo <= p.lo < p.hi <= hi, (name, p)
            assert "seed" not in p.name


def test_suggestions_respect_the_space() -> None:
    space = search_space("hnvm")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        for p in space:
            v = p.suggest(trial)
            if p.kind == "categorical":
                assert v in p.choices
            else:
                assert isinstance(v, int if p.kind == "int" else float) and p.lo <= v <= p.hi
        study.tell(trial, 0.0)


def test_nothing_to_tune(data: Path, tmp_path: Path) -> None:
    for model in ("pop", "ptopfreq"):
        with pytest.raises(HnvmError, match="nothing to tune"):
            tune(data, model, tmp_path / model, 2)
    with pytest.raises(HnvmError, match="nothing to tune"):  # everything fixed by the base
        tune(data, "itemknn", tmp_path / "fixed", 2, base_overrides=["model.neighbours=5"])
    r = CliRunner().invoke(app, ["tune", str(data), "--model", "pop", "--trials", "2",
                                 "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "nothing to tune" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["tune", str(data), "--model", "nope", "--trials", "2",
                                 "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "unknown model" in r.output


def test_itemknn_tune_writes_best_and_trials_then_resumes(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "knn"
    res = tune(data, "itemknn", out, 3)
    rows = _rows(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert all(r["state"] == "COMPLETE" for r in rows)
    values = [float(r["value"]) for r in rows]
    assert res["best_value"] == max(values) > 0
    best = rows[values.index(max(values))]
    rc = resolve_config("itemknn", out / "best.toml", [])
    assert rc.model_config.neighbours == int(best["model.neighbours"]) == res["best_params"][
        "model.neighbours"]
    assert 10 <= rc.model_config.neighbours <= 1000
    assert (out / "optuna.db").is_file()

    res = tune(data, "itemknn", out, 5)  # 3 kept, 2 more run
    rows2 = _rows(out / "trials.csv")
    assert [r["number"] for r in rows2] == ["0", "1", "2", "3", "4"]
    assert rows2[:3] == rows
    assert res["n_complete"] == 5
    tune(data, "itemknn", out, 4)  # already enough: nothing runs
    assert len(_rows(out / "trials.csv")) == 5
    with pytest.raises(HnvmError, match="different base"):  # other base settings: refused
        tune(data, "itemknn", out, 6, base_overrides=["model.self_similarity=true"])


def test_one_tiny_hnvm_trial(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "hnvm"
    r = CliRunner().invoke(app, ["tune", str(data), "--model", "hnvm", "--trials", "1",
                                 "--out", str(out), *(a for s in TINY_HNVM for a in ("--set", s))])
    assert r.exit_code == 0, r.output
    assert "best.toml" in r.output
    rows = _rows(out / "trials.csv")
    assert len(rows) == 1 and rows[0]["state"] == "COMPLETE"
    assert "model.hidden" not in rows[0] and "train.lr" in rows[0]  # base keys are not searched
    tree = tomllib.loads((out / "best.toml").read_text())
    assert tree["model"]["hidden"] == 16 and tree["train"]["epochs"] == 1
    assert tree["train"]["lr"] == pytest.approx(float(rows[0]["train.lr"]))
    rc = resolve_config("hnvm", out / "best.toml", [])
    assert rc.model_config.hidden == 16 and rc.train.epochs == 1
    assert rc.model_config.window == 4 and rc.train.optimizer == rows[0]["train.optimizer"]


def test_first_trial_is_the_defaults(data: Path, tmp_path: Path) -> None:
    from hnvm.search_space import default_params

    space = search_space("itemknn")
    defaults = default_params("itemknn", space)
    cfg = get_model_class("itemknn").config_class()
    assert defaults and all(getattr(cfg, k.split(".", 1)[1]) == v for k, v in defaults.items())
    tune(data, "itemknn", tmp_path / "t", trials=2)
    study = optuna.load_study(study_name="itemknn", storage=f"sqlite:///{tmp_path / 't' / 'optuna.db'}")
    assert study.trials[0].params == defaults


def test_default_params_clip_into_narrowed_ranges() -> None:
    from hnvm.search_space import default_params

    space = [Param("model.hidden", "int", 16, 64), Param("train.lr", "float", 0.01, 0.1, True),
             Param("train.optimizer", "categorical", choices=("adagrad", "adam"))]
    got = default_params("hnvm", space)
    assert got["model.hidden"] == 64  # default 100, clipped to the searched range
    assert got["train.lr"] == 0.01  # default 0.002, clipped
    assert got["train.optimizer"] == "adam"


def test_epoch_observer_stops_training_and_trial_timeout(data: Path, tmp_path: Path) -> None:
    from hnvm.runs import make_model

    rc = resolve_config("hnvm", None, [*TINY_HNVM, "train.epochs=5", "train.patience=5"])
    seen: list[int] = []
    make_model(rc).fit(synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5), train_cfg=rc.train,
                       on_epoch=lambda epoch, record: seen.append(epoch) or epoch == 2)
    assert seen == [1, 2]  # stopped after epoch 2 of 5
    # a trial timeout of 0 s: every trial ends after its first epoch, and still completes
    res = tune(data, "hnvm", tmp_path / "t", trials=2, base_overrides=[*TINY_HNVM[:-1], "train.epochs=4"],
               trial_timeout=0.0)
    rows = _rows(Path(res["trials_csv"]))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    study = optuna.load_study(study_name="hnvm", storage=f"sqlite:///{tmp_path / 't' / 'optuna.db'}")
    assert [t.user_attrs["epochs"] for t in study.trials] == [1, 1]  # 1 of 4 epochs each


def test_study_refuses_data_reprepared_with_another_split(tmp_path: Path) -> None:
    # the same log (same vocabularies) split another way: the trials so far scored other targets
    from hnvm.data.prepare import PrepareConfig

    path = tmp_path / "ds"
    synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5).save(path)
    tune(path, "itemknn", tmp_path / "knn", 1)
    other = synthetic_dataset(PrepareConfig(split="time", min_sessions=3), n_users=60, n_items=40, n_topics=4,
                              seed=5)
    other.save(path, force=True)
    with pytest.raises(HnvmError, match="different dataset_sha256"):
        tune(path, "itemknn", tmp_path / "knn", 2)


def test_tune_refuses_an_out_that_is_a_file_or_a_dataset_or_run_directory(data: Path, tmp_path: Path) -> None:
    from hnvm.runs import train_run

    run = tmp_path / "run"
    train_run(data, "pop", run)
    log_csv = tmp_path / "log.csv"
    log_csv.write_text("a,b\n1,2\n")
    for out, why in ((log_csv, "is a file"), (data, "own input"), (run, "is a run directory"),
                     (data / "sub", "inside the dataset directory"), (run / "tune", "inside the run directory")):
        before = {**snapshot(data), **snapshot(run), **snapshot(log_csv)}
        refused(["tune", str(data), "--model", "itemknn", "--trials", "1", "--out", str(out)], "--out", why)
        assert {**snapshot(data), **snapshot(run), **snapshot(log_csv)} == before
        assert not (data / "sub").exists() and not (run / "tune").exists()


def test_tune_refuses_another_models_study_and_a_damaged_study(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    tune(data, "itemknn", out, 1)
    before = snapshot(out)
    refused(["tune", str(data), "--model", "bprmf", "--trials", "1", "--set", "train.epochs=1", "--out", str(out)],
             "another model (itemknn)", "another --out")
    assert snapshot(out) == before
    # a best.toml of another model, without the study: refused too (it would be overwritten)
    other = tmp_path / "toml-only"
    other.mkdir()
    (other / "best.toml").write_bytes((out / "best.toml").read_bytes())
    refused(["tune", str(data), "--model", "bprmf", "--trials", "1", "--out", str(other)], "itemknn")
    # optuna.db that is a text file, a directory, or an SQLite database of something else
    for kind in ("text", "dir", "foreign"):
        bad = tmp_path / kind
        bad.mkdir()
        db = bad / "optuna.db"
        if kind == "text":
            db.write_text("not a database\n")
        elif kind == "dir":
            db.mkdir()
        else:
            import sqlite3

            with sqlite3.connect(db) as conn:
                conn.execute("CREATE TABLE notes (x TEXT)")
        before = snapshot(bad)
        refused(["tune", str(data), "--model", "itemknn", "--trials", "1", "--out", str(bad)], "optuna.db")
        assert snapshot(bad) == before
    # the same model's study still resumes
    assert tune(data, "itemknn", out, 2)["n_trials"] == 2
