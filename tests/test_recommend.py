"""`hnvm recommend`: one user (original ids, history from the dataset, current session, cold
start, unknown items, --exclude-seen) and batch mode (parquet, atomic, bad rows named)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import InputError
from hnvm.recommend import parse_items, recommend_batch, recommend_user
from hnvm.runs import train_run
from hnvm.serve.state import Engine

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rec")
    synthetic_dataset(n_users=40, n_items=30, n_topics=4, seed=6).save(d / "data")
    train_run(d / "data", "hnvm", d / "run", overrides=[
        "model.hidden=16", "model.emb_dim=16", "model.d_e=4", "model.d_z=4", "model.mlp_hidden=16",
        "model.n_negatives=32", "train.epochs=1", "train.seed=1"])
    return d / "run"


def test_parse_items() -> None:
    assert parse_items("a,b c , d") == ["a", "b", "c", "d"] and parse_items("") == [] and parse_items(None) == []


def test_one_user_with_history_and_session(run_dir: Path) -> None:
    eng = Engine.from_run(run_dir)
    user = next(iter(eng.user_index))
    items = eng.item_ids[1:4]
    base = recommend_user(run_dir, user, k=5)
    assert not base.cold_start and len(base.items) == 5 and base.session_length == 0 and base.new_session
    cur = recommend_user(run_dir, user, [*items, "no-such"], k=5)
    assert cur.session_length == 3 and cur.unknown_items == ["no-such"] and cur.items != base.items
    seen = {eng.item_ids[i] for i in eng.state(user).seen} | set(items)
    ex = recommend_user(run_dir, user, items, k=eng.n_items, exclude_seen=True)
    assert not set(ex.items) & seen
    cold = recommend_user(run_dir, "someone-new", k=5)
    assert cold.cold_start and len(cold.items) == 5


def test_cli_one_user(run_dir: Path) -> None:
    user = next(iter(Engine.from_run(run_dir).user_index))
    r = runner.invoke(app, ["recommend", str(run_dir), "--user", user, "--session", "1,zzz", "-k", "3"])
    assert r.exit_code == 0, r.output
    assert "rank" in r.output and "ignored unknown item(s): zzz" in r.output
    r = runner.invoke(app, ["recommend", str(run_dir), "--user", user, "-k", "0"])
    assert r.exit_code == 2 and "-k must be in 1..1000" in r.output
    r = runner.invoke(app, ["recommend", str(run_dir)])
    assert r.exit_code == 2 and "exactly one of --user" in r.output
    r = runner.invoke(app, ["recommend", str(run_dir.parent), "--user", user])
    assert r.exit_code == 2 and "not a run directory" in r.output


def test_batch_mode_writes_parquet(run_dir: Path, tmp_path: Path) -> None:
    eng = Engine.from_run(run_dir)
    user = next(iter(eng.user_index))
    csv = tmp_path / "users.csv"
    csv.write_text(f'user,session\n{user},"{eng.item_ids[1]},{eng.item_ids[2]}"\nnewbie,\n\n{user},\n')
    out = tmp_path / "out" / "recs.parquet"
    r = runner.invoke(app, ["recommend", str(run_dir), "--input", str(csv), "--out", str(out), "-k", "4"])
    assert r.exit_code == 0, r.output
    df = pl.read_parquet(out)
    assert df.columns == ["user", "rank", "item", "score"] and df.height == 12
    assert df.filter(pl.col("user") == "newbie").get_column("rank").to_list() == [1, 2, 3, 4]
    single = recommend_user(run_dir, user, [eng.item_ids[1], eng.item_ids[2]], k=4)
    assert df.head(4).get_column("item").to_list() == single.items
    assert not list(out.parent.glob(".*tmp"))


@pytest.mark.parametrize(("text", "message"), [
    ("user,session\nu1,a\n,b\n", "row 3, column 'user': empty user id"),
    ("user,session\nu1,a\nu2,a,b\n", "row 3: 3 fields, expected 2"),
    ("name\nu1\n", "no 'user' column"),
    ("user,colour\nu1,red\n", "unknown column(s) colour"),
    ("", "file is empty"),
    ("user\n", "no users to recommend for"),
])
def test_batch_mode_names_bad_rows_and_writes_nothing(run_dir: Path, tmp_path: Path, text: str, message: str) -> None:
    csv, out = tmp_path / "users.csv", tmp_path / "recs.parquet"
    csv.write_text(text)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        recommend_batch(run_dir, csv, out)
    assert str(csv) in str(exc.value)
    assert not out.exists()
    r = runner.invoke(app, ["recommend", str(run_dir), "--input", str(csv), "--out", str(out)])
    assert r.exit_code == 2 and "error:" in r.output and not out.exists()
