"""`hnvm recommend`: one user (original ids, history from the dataset, current session, cold
start, unknown items, --exclude-seen) and batch mode (parquet, atomic, bad rows named)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner, Result

from hnvm.cli import app
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import HnvmError, InputError
from hnvm.online import Engine
from hnvm.recommend import parse_items, parse_session, recommend_batch, recommend_user
from hnvm.runs import train_run

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
    assert df.columns == ["user", "rank", "item", "score", "session_length", "unknown_items"] and df.height == 12
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


# ---- ids as text, sessions that name any id, input files as users write them ----------------------

# item ids that the short comma form cannot express, ids that differ only as text, and "x,y",
# which is also the items "x" and "y"
NAMED = {1: "Dune, Part 1", 2: "Dune", 3: "007", 4: "7", 5: "x,y", 6: "x", 7: "y", 8: "[/b] Alien",
         9: "a b"}


@pytest.fixture(scope="module")
def named_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("named")
    ds = synthetic_dataset(n_users=40, n_items=30, n_topics=4, seed=6)
    ds.items = ds.items.with_columns(pl.col("item").map_elements(lambda i: NAMED.get(i, f"i{i:02d}"),
                                                                 return_dtype=pl.Utf8).alias("id"))
    ds.users = ds.users.with_columns(pl.col("user").map_elements(lambda u: {1: "007", 2: "7"}.get(u, f"u{u}"),
                                                                 return_dtype=pl.Utf8).alias("id"))
    ds.save(d / "data")
    train_run(d / "data", "hnvm", d / "run", overrides=[
        "model.hidden=16", "model.emb_dim=16", "model.d_e=4", "model.d_z=4", "model.mlp_hidden=16",
        "model.n_negatives=32", "train.epochs=1", "train.seed=1"])
    return d / "run"


def test_parse_session_forms() -> None:
    cat = set(NAMED.values())
    assert parse_session(None) == [] and parse_session([]) == [] and parse_session([" "]) == []
    # repeated flags: one item each, exactly as written (surrounding blanks removed)
    assert parse_session(["Dune, Part 1", " 007 ", "x,y"], cat) == ["Dune, Part 1", "007", "x,y"]
    # one value: a JSON list, one catalogue id, or the short form
    assert parse_session('["Dune, Part 1", "7"]', cat) == ["Dune, Part 1", "7"]
    assert parse_session("Dune, Part 1", cat) == ["Dune, Part 1"]
    assert parse_session("[/b] Alien", cat) == ["[/b] Alien"]
    assert parse_session("007,7 Dune", cat) == ["007", "7", "Dune"]
    assert parse_session(",007,,7", None) == ["007", "7"]  # no empty ids from stray commas
    for value, message in [("x,y", "ambiguous"), (["a", ""], "value 2 is empty"), ("[1, 2]", "strings only"),
                           ('["a", " "]', "empty item id"), ("[oops", "neither a JSON list")]:
        with pytest.raises(HnvmError, match=message):
            parse_session(value, cat)
    with pytest.raises(HnvmError, match=r"--session: 1001 items in the session \(at most 1000\)"):
        parse_session([f"i{i}" for i in range(1001)], cat)


def _ok(r: Result) -> str:
    assert r.exit_code == 0, r.output
    return r.output


def test_session_items_with_commas_and_spaces(named_run: Path) -> None:
    base = ["recommend", str(named_run), "--user", "u5", "-k", "3"]
    # repeated --session: one item per flag; before, a comma or blank split "Dune, Part 1" into
    # unknown pieces and the request silently became a next-session one
    out = _ok(runner.invoke(app, [*base, "--session", "Dune, Part 1", "--session", "a b"]))
    assert "after 2 item(s) of the session" in out and "ignored" not in out
    out = _ok(runner.invoke(app, [*base, "--session", "Dune, Part 1"]))  # one catalogue id
    assert "after 1 item(s)" in out and "ignored" not in out
    out = _ok(runner.invoke(app, [*base, "--session", '["Dune, Part 1", "x,y", "[/b] Alien"]']))
    assert "after 3 item(s)" in out
    out = _ok(runner.invoke(app, [*base, "--session", "007,7 Dune"]))  # the short form still works
    assert "after 3 item(s)" in out
    eng = Engine.from_run(named_run)
    want = recommend_user(eng, "u5", ["Dune, Part 1", "a b"], k=3)
    assert want.session_length == 2 and not want.unknown_items
    r = runner.invoke(app, [*base, "--session", "x,y"])
    assert r.exit_code == 2 and "ambiguous" in r.output and "Traceback" not in r.output


def test_a_session_of_unknown_items_is_never_silently_dropped(named_run: Path, tmp_path: Path) -> None:
    base = ["recommend", str(named_run), "--user", "u5", "-k", "3"]
    r = runner.invoke(app, [*base, "--session", "Dune: Part 1"])  # pieces, none in the catalogue
    assert r.exit_code == 2 and "none of the 3 session item(s) is in the run's catalogue" in r.output
    with pytest.raises(HnvmError, match="none of the 1 session item"):
        recommend_user(named_run, "u5", ["nope"], k=3)
    assert _ok(runner.invoke(app, [*base, "--session", "nope", "--session", "Dune"])).count("after 1 item(s)")
    # batch: a session cell per row (JSON list, catalogue id, short form); a row whose session
    # has no known item is flagged in the output, not dropped
    csv = tmp_path / "users.csv"
    csv.write_text('user,session\nu5,"[""Dune, Part 1"", ""x""]"\nu5,"Dune, Part 1"\nu5,007 7\nu5,nope zilch\n'
                   "u5,\n")
    out = tmp_path / "recs.parquet"
    r = runner.invoke(app, ["recommend", str(named_run), "--input", str(csv), "--out", str(out), "-k", "2"])
    assert r.exit_code == 0, r.output
    assert "1 sessions with no known item got next-session recommendations" in r.output
    df = pl.read_parquet(out).filter(pl.col("rank") == 1)
    assert df.get_column("session_length").to_list() == [2, 1, 2, 0, 0]
    assert df.get_column("unknown_items").to_list() == [0, 0, 0, 2, 0]
    with pytest.raises(HnvmError, match="exists"):  # an existing output needs force
        recommend_batch(named_run, csv, out, k=2)
    res = recommend_batch(named_run, csv, out, k=2, force=True)
    assert res.unknown_sessions == 1


def test_ids_are_text_exactly_as_written(named_run: Path, tmp_path: Path) -> None:
    eng = Engine.from_run(named_run)
    assert {"007", "7"} <= set(eng.user_index) and {"007", "7"} <= set(eng.item_index)
    a, b = recommend_user(eng, "007", ["007"], k=5), recommend_user(eng, "7", ["7"], k=5)
    assert not a.cold_start and not b.cold_start and a.session_length == b.session_length == 1
    assert not a.unknown_items and not b.unknown_items
    csv, out = tmp_path / "u.csv", tmp_path / "r.parquet"
    csv.write_text("user,session\n007,007\n7,7\n")
    res = recommend_batch(named_run, csv, out, k=5)
    df = pl.read_parquet(out)
    assert res.cold_start == 0 and df.get_column("user").unique(maintain_order=True).to_list() == ["007", "7"]
    assert df.filter(pl.col("user") == "007").get_column("item").to_list() == a.items
    assert df.filter(pl.col("user") == "7").get_column("item").to_list() == b.items


@pytest.mark.parametrize("form", ["bom", "gzip", "tsv", "utf16", "crlf"])
def test_batch_input_as_users_save_it(run_dir: Path, tmp_path: Path, form: str) -> None:
    import codecs
    import gzip

    eng = Engine.from_run(run_dir)
    user = next(iter(eng.user_index))
    text = f"user,session\n{user},{eng.item_ids[1]}\nnewbie,\n"
    raw = {"bom": codecs.BOM_UTF8 + text.encode(), "gzip": gzip.compress(text.encode("utf-8-sig")),
           "tsv": text.replace(",", "\t").encode(), "utf16": text.encode("utf-16"),
           "crlf": text.replace("\n", "\r\n").encode()}[form]
    csv, out = tmp_path / "users.csv", tmp_path / "recs.parquet"  # (no .gz suffix for the gzip file)
    csv.write_bytes(raw)
    res = recommend_batch(run_dir, csv, out, k=3)
    df = pl.read_parquet(out)
    assert res.users == 2 and df.get_column("user").unique(maintain_order=True).to_list() == [user, "newbie"]
    assert df.get_column("session_length").to_list()[:3] == [1, 1, 1]


def test_batch_input_that_is_not_utf8_names_its_row(run_dir: Path, tmp_path: Path) -> None:
    csv, out = tmp_path / "users.csv", tmp_path / "recs.parquet"
    csv.write_bytes("user,session\nu1,a\nJosé,b\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"users.csv, row 3: not UTF-8 text"):
        recommend_batch(run_dir, csv, out)
    assert not out.exists()


def test_cli_numbers_and_markup_are_one_line_errors(run_dir: Path) -> None:
    for args, message in [(["-k", "99999999999999999999"], "-k must be in 1..1000"),
                          (["-k", "-1"], "-k must be in 1..1000"),
                          (["--session", "[/x]"], "is neither a JSON list of strings"),
                          ([a for i in range(1001) for a in ("--session", f"i{i}")],
                           "--session: 1001 items in the session (at most 1000)")]:
        r = runner.invoke(app, ["recommend", str(run_dir), "--user", "1", *args])
        assert r.exit_code == 2, r.output
        assert message in r.output and r.output.strip().count("\n") == 0, r.output
    r = runner.invoke(app, ["recommend", str(run_dir), "--user", " "])
    assert r.exit_code == 2 and "--user: empty user id" in r.output
    # a user id with rich markup in it is printed as written (it was a MarkupError traceback)
    r = runner.invoke(app, ["recommend", str(run_dir), "--user", "[/x]new", "-k", "2"])
    assert r.exit_code == 0 and "user [/x]new: top 2 (cold start" in r.output


def test_a_catalogue_id_shaped_like_json_is_that_item() -> None:
    cat = {"[1]", '["z"]', "a", "b", "[\"a\", \"b\"]"}
    assert parse_session("[1]", cat) == ["[1]"]
    assert parse_session('["z"]', cat) == ['["z"]']
    with pytest.raises(HnvmError, match="ambiguous"):  # one id, and also the ids a and b
        parse_session('["a", "b"]', cat)
    assert parse_session('["[1]"]', {"x"}) == ["[1]"]  # not in the catalogue: the JSON list


def test_batch_output_never_replaces_its_input_or_the_runs_files(run_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("user\nnewbie\n")
    before = {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file()}
    for out, message in [(csv, "own input"), (run_dir / "items.parquet", "is inside"),
                         (run_dir / "config.json", "is inside")]:
        with pytest.raises(HnvmError, match=message):
            recommend_batch(run_dir, csv, out, force=True)
    assert csv.read_text() == "user\nnewbie\n"
    assert {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file()} == before


def test_batch_ambiguity_advice_fits_a_file_cell(named_run: Path, tmp_path: Path) -> None:
    """A CSV cell cannot be repeated like a flag: the advice is a quoted JSON list, and following
    it works; the flag keeps its own advice."""
    import re

    src = tmp_path / "in.csv"
    src.write_text('user,session\nu5,"x,y"\n')
    with pytest.raises(InputError) as exc:
        recommend_batch(named_run, src, tmp_path / "o.parquet", k=3)
    msg = str(exc.value)
    assert "row 2, column 'session'" in msg and "ambiguous" in msg and "JSON list" in msg
    assert "one item per row" not in msg and "per --session" not in msg
    assert not (tmp_path / "o.parquet").exists()
    cell = re.search(r"e\.g\. (\"\[.*\]\")", msg)
    assert cell is not None, msg
    src.write_text(f"user,session\nu5,{cell.group(1)}\n")  # the advice, followed literally
    recommend_batch(named_run, src, tmp_path / "o.parquet", k=3)
    assert pl.read_parquet(tmp_path / "o.parquet")["session_length"].unique().to_list() == [1]
    with pytest.raises(HnvmError, match=r"give a JSON list \(e\.g\. \[\"x,y\"\]\) or one item per --session"):
        parse_session("x,y", set(NAMED.values()))


@pytest.mark.parametrize("prepare", [{"gap": [1]}, {"gap": "soon"}, {"gap": "inf"}, {"gap": "-5m"},
                                     {"gap": None}, {"gap": True}, 7])
def test_a_damaged_gap_in_meta_json_names_the_file_and_field(run_dir: Path, tmp_path: Path, prepare: object) -> None:
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(run_dir.parent / "data", data)
    meta = json.loads((data / "meta.json").read_text())
    meta["prepare"] = {**meta.get("prepare", {}), **prepare} if isinstance(prepare, dict) else prepare
    (data / "meta.json").write_text(json.dumps(meta))
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    r = runner.invoke(app, ["recommend", str(run_dir), "--data", str(data), "--user", "nobody"])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("error:") and r.output.strip().count("\n") == 0, r.output
    field = "prepare.gap" if isinstance(prepare, dict) else "field prepare is not an object"
    assert str(data / "meta.json") in r.output and field in r.output and "--gap:" not in r.output, r.output
    with pytest.raises(HnvmError, match=r"meta\.json: field prepare"):
        Engine.from_run(run_dir, data=data)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_a_session_of_separators_only_is_refused() -> None:
    for text in (",", " , ,", ",,"):
        with pytest.raises(HnvmError, match="holds no item id"):
            parse_session(text, {"a"})
    assert parse_session("[]", {"a"}) == [] and parse_session("  ", {"a"}) == []
