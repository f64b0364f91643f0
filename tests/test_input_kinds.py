"""Issue #12, data side: ids kept as written, timestamp units, durations, compressed files, presets
that work with their defaults, logs without time, duplicate rows, help at 80 columns.

Every test states the right value for one member of a fault kind and, where it is cheap, another
member of the same kind."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.prepare import PrepareConfig, prepare
from hnvm.data.readers import read_events, read_events_info
from hnvm.errors import InputError

runner = CliRunner()
COLS = "user=user,item=item,time=ts"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _ok(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


def _fails(args: list[str], *needles: str, out: Path | None = None) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    msg = r.output.strip()
    assert "Traceback" not in msg and len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, msg
    if out is not None:
        assert not out.exists()
    return msg


# --------------------------------------------------------------------------- 1. ids as written

def _zero_padded_log(tmp_path: Path) -> Path:
    # one user, three sessions a day apart, each holding the items 007, 7 and 07
    rows = [f"u1,{item},{1_600_000_000 + s * 86400 + k * 60}"
            for s in range(3) for k, item in enumerate(("007", "7", "07"))]
    return _write(tmp_path / "log.csv", "user,item,ts\n" + "\n".join(rows) + "\n")


def test_ids_are_opaque_text_end_to_end(tmp_path: Path) -> None:
    src = _zero_padded_log(tmp_path)
    _ok(["prepare", str(src), "--columns", COLS, "--min-item-support", "1", "--out", str(tmp_path / "d")])
    items = pl.read_parquet(tmp_path / "d" / "items.parquet")
    assert sorted(items.get_column("id").to_list()) == ["007", "07", "7"]
    assert items.get_column("train_count").to_list() == [1, 1, 1]
    _ok(["train", str(tmp_path / "d"), "--model", "pop", "--out", str(tmp_path / "run")])
    out = _ok(["recommend", str(tmp_path / "run"), "--user", "u1", "--session", "007", "-k", "3"])
    assert "unknown" not in out and "after 1 item(s) of the session" in out
    cells = {c.strip() for line in out.splitlines() for c in line.split("│")}
    assert {"007", "07", "7"} <= cells


def test_id_column_numeric_then_text_loads_with_every_id_kept(tmp_path: Path) -> None:
    rows = [f"{u},{1000 + u % 50},{1_600_000_000 + u}" for u in range(10_050)]
    rows.append("5,SKU-1,1600000001")
    raw = read_events(_write(tmp_path / "a.csv", "user,item,ts\n" + "\n".join(rows) + "\n"),
                      columns={"user": "user", "item": "item", "time": "ts"})
    assert raw.height == 10_051
    assert raw.get_column("item").dtype == pl.Utf8
    assert "SKU-1" in raw.get_column("item").to_list()


def test_words_that_mean_missing_elsewhere_are_ids_here(tmp_path: Path) -> None:
    rows = [f"u1,{item},{1_600_000_000 + i}" for i, item in enumerate(("NA", "NaN", "null", "nan"))]
    raw = read_events(_write(tmp_path / "a.csv", "user,item,ts\n" + "\n".join(rows) + "\n"),
                      columns={"user": "user", "item": "item", "time": "ts"})
    assert raw.get_column("item").to_list() == ["NA", "NaN", "null", "nan"]
    bad = _write(tmp_path / "b.csv", "user,item,ts\nu1,a,1600000000\nu1,b,NA\n")
    _fails(["prepare", str(bad), "--columns", COLS, "--out", str(tmp_path / "d")], "row 3", "'ts'", "'NA'",
           out=tmp_path / "d")


def test_canonical_integers_are_read_as_integers_and_written_back_exactly(tmp_path: Path) -> None:
    raw = read_events(_write(tmp_path / "a.csv", "user,item,ts\n1,-3,5\n2,10,6\n"),
                      columns={"user": "user", "item": "item", "time": "ts"})
    assert raw.get_column("item").dtype == pl.Int64  # every value is its own canonical text
    raw = read_events(_write(tmp_path / "b.csv", "user,item,ts\n1,+3,5\n2, 10,6\n1,3,7\n"),
                      columns={"user": "user", "item": "item", "time": "ts"})
    assert raw.get_column("item").to_list() == ["+3", "10", "3"]  # '+3' is not '3'


# --------------------------------------------------------------------------- 2. timestamp units

def _seconds_log_with_one_ms_row(tmp_path: Path) -> Path:
    rows, t = [], 1_600_000_000
    for s in range(6):  # six sessions of two events, 1 and 30 days apart
        rows += [f"1,a,{t}", f"1,b,{t + 60}"]
        t += 86400 if s % 2 == 0 else 30 * 86400
    rows.append("2,a,1600000000000")
    return _write(tmp_path / "mixed.csv", "user,item,ts\n" + "\n".join(rows) + "\n")


def test_mixed_timestamp_units_are_refused_naming_the_row(tmp_path: Path) -> None:
    src = _seconds_log_with_one_ms_row(tmp_path)
    _fails(["prepare", str(src), "--columns", COLS, "--min-item-support", "1", "--out", str(tmp_path / "d")],
           "mixed.csv", "row 14", "'ts'", "mix units", "--time-unit", out=tmp_path / "d")


def test_stated_time_unit_keeps_six_sessions_and_is_recorded(tmp_path: Path) -> None:
    src = _seconds_log_with_one_ms_row(tmp_path)
    ds = prepare(src, tmp_path / "d", columns={"user": "user", "item": "item", "time": "ts"},
                 config=PrepareConfig(min_item_support=1), time_unit="s")
    assert ds.events.filter(pl.col("user") == 1).get_column("session").n_unique() == 6
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["source"]["time_unit"] == "s"


@pytest.mark.parametrize(("scale", "unit"), [(1, "s"), (1000, "ms"), (10**6, "us"), (10**9, "ns")])
def test_time_unit_detected_per_row_and_recorded(tmp_path: Path, scale: int, unit: str) -> None:
    rows = [f"1,{i % 3},{(1_600_000_000 + i * 60) * scale}" for i in range(6)]
    _, info = read_events_info(_write(tmp_path / "a.csv", "user,item,ts\n" + "\n".join(rows) + "\n"),
                               columns={"user": "user", "item": "item", "time": "ts"})
    assert info.time_unit == unit


def test_time_unit_flag_is_validated(tmp_path: Path) -> None:
    src = _zero_padded_log(tmp_path)
    _fails(["prepare", str(src), "--columns", COLS, "--time-unit", "minutes", "--out", str(tmp_path / "d")],
           "--time-unit", out=tmp_path / "d")
    _fails(["prepare", str(src), "--columns", COLS, "--time-unit", "iso", "--out", str(tmp_path / "d")],
           "ISO-8601", out=tmp_path / "d")


# --------------------------------------------------------------------------- 9. durations, compression

@pytest.mark.parametrize("gap", ["inf", "-5m", "nan", "1e30", "-1", "soon"])
def test_bad_gap_is_one_line_error(tmp_path: Path, gap: str) -> None:
    src = _zero_padded_log(tmp_path)
    _fails(["prepare", str(src), "--columns", COLS, f"--gap={gap}", "--out", str(tmp_path / "d")],
           "--gap", out=tmp_path / "d")


def test_gzip_without_suffix_is_read(tmp_path: Path) -> None:
    body = _zero_padded_log(tmp_path).read_bytes()
    src = tmp_path / "log.csv"
    src.write_bytes(gzip.compress(body))
    ds = prepare(src, tmp_path / "d", columns={"user": "user", "item": "item", "time": "ts"},
                 config=PrepareConfig(min_item_support=1))
    assert ds.n_items == 3


def test_other_compression_is_named(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_bytes(bz2.compress(_zero_padded_log(tmp_path).read_bytes()))
    _fails(["prepare", str(src), "--columns", COLS, "--out", str(tmp_path / "d")],
           "log.csv", "bzip2-compressed", out=tmp_path / "d")


# --------------------------------------------------------------------------- 12. presets' defaults

def test_yoochoose_preset_works_with_its_defaults(tmp_path: Path) -> None:
    lines = [f"{s}\t{100 + (s + k) % 4}\t{1_400_000_000 + s * 10_000 + k * 30}.5"
             for s in range(1, 41) for k in range(3)]
    src = _write(tmp_path / "clicks.tsv", "SessionId\tItemId\tTime\n" + "\n".join(lines) + "\n")
    _ok(["prepare", str(src), "--preset", "yoochoose", "--out", str(tmp_path / "d")])
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["prepare"]["split"] == "time" and meta["prepare"]["min_sessions"] == 1
    assert meta["stats"]["test_sessions"] > 0


def test_real_yoochoose_with_defaults(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "yoochoose-100k" / "yoochoose-clicks-100k_train_full.txt"
    ds = prepare(src, tmp_path / "y", preset="yoochoose")
    assert ds.meta["stats"]["test_next_item_targets"] > 0


def test_explicit_options_override_preset_defaults(tmp_path: Path) -> None:
    lines = [f"{s}\t{100 + (s + k) % 4}\t{1_400_000_000 + s * 10_000 + k * 30}"
             for s in range(1, 41) for k in range(3)]
    src = _write(tmp_path / "clicks.tsv", "SessionId\tItemId\tTime\n" + "\n".join(lines) + "\n")
    _fails(["prepare", str(src), "--preset", "yoochoose", "--split", "user-last", "--out", str(tmp_path / "d")],
           "--min-sessions >= 3", out=tmp_path / "d")


# --------------------------------------------------------------------------- 15. logs without time

def _basket_log(tmp_path: Path, keys: tuple[str, ...] = ("1", "2", "10")) -> Path:
    # the file lists basket 10 first: with numeric keys the sessions follow the key, not the file
    rows = []
    for u in ("a", "b"):
        for key in reversed(keys):
            rows += [f"{u},x{key},{key}", f"{u},y,{key}"]
    return _write(tmp_path / "baskets.csv", "user,item,basket\n" + "\n".join(rows) + "\n")


def test_basket_log_without_time_prepares(tmp_path: Path) -> None:
    src = _basket_log(tmp_path)
    raw, info = read_events_info(src, columns={"user": "user", "item": "item", "session": "basket"})
    assert info.time_unit is None and info.session_order == "key"
    from hnvm.data.sessions import sessionize

    s = sessionize(raw, 1800).filter(pl.col("user") == "a")
    assert s["item"].to_list() == ["x1", "y", "x2", "y", "x10", "y"]  # by key, then file order
    # end to end through the CLI (the y items are known to train)
    rows = [f"{u},{item},{key}" for u in ("a", "b", "c") for key in (3, 1, 2) for item in ("y", "z")]
    src = _write(tmp_path / "b2.csv", "user,item,basket\n" + "\n".join(rows) + "\n")
    _ok(["prepare", str(src), "--columns", "user=user,item=item,session=basket", "--min-item-support", "1",
         "--out", str(tmp_path / "d")])
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["source"]["session_order"] == "key"
    assert (meta["stats"]["train_sessions"], meta["stats"]["test_sessions"]) == (3, 3)


def test_text_session_keys_follow_first_appearance(tmp_path: Path) -> None:
    src = _basket_log(tmp_path, keys=("c", "b", "a"))  # file order: a, b, c
    raw, info = read_events_info(src, columns={"user": "user", "item": "item", "session": "basket"})
    assert info.session_order == "first appearance"
    from hnvm.data.sessions import sessionize

    s = sessionize(raw, 1800).filter(pl.col("user") == "a")
    assert s["item"].to_list()[::2] == ["xa", "xb", "xc"]


def test_time_split_without_time_is_refused(tmp_path: Path) -> None:
    _fails(["prepare", str(_basket_log(tmp_path)), "--columns", "user=user,item=item,session=basket",
            "--split", "time", "--min-sessions", "1", "--out", str(tmp_path / "d")],
           "needs a time column", out=tmp_path / "d")


def test_one_session_per_user_is_named_as_the_cause(tmp_path: Path) -> None:
    # basket numbers mapped as the time: all within the 30-minute gap, one session per user
    _fails(["prepare", str(_basket_log(tmp_path)), "--columns", "user=user,item=item,time=basket",
            "--min-item-support", "1", "--out", str(tmp_path / "d")],
           "leave no data", "exactly one session", out=tmp_path / "d")


def test_columns_need_time_or_session() -> None:
    from hnvm.data.readers import parse_columns

    with pytest.raises(InputError, match="session=COLUMN"):
        parse_columns("user=u,item=i")
    assert parse_columns("user=u,item=i,session=b") == {"user": "u", "item": "i", "session": "b"}


# --------------------------------------------------------------------------- duplicates

def test_exact_duplicate_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    body = _zero_padded_log(tmp_path).read_text().splitlines()
    src = _write(tmp_path / "dup.csv", "\n".join([*body, body[1], body[2]]) + "\n")
    cols = {"user": "user", "item": "item", "time": "ts"}
    ds = prepare(src, tmp_path / "d", columns=cols, config=PrepareConfig(min_item_support=1))
    assert ds.events.height == 9 and ds.meta["duplicates_removed"] == 2
    kept = prepare(src, tmp_path / "k", columns=cols, config=PrepareConfig(min_item_support=1, keep_duplicates=True))
    assert kept.events.height == 11 and kept.meta["duplicates_removed"] == 0


# --------------------------------------------------------------------------- 17. help at 80 columns

def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", _commands())
def test_help_fits_80_columns(command: str) -> None:
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(x) for x in lines) <= 80, [x for x in lines if len(x) > 80]
    assert "…" not in r.output
    if command == "prepare":
        for word in ("session", "seq", "--time-unit", "[default: 30m]", "bare number is seconds"):
            assert word in r.output


# --------------------------------------------------------------------------- flags through the entry point

@pytest.mark.parametrize("args", [["serve", "run", "--port", "abc"], ["prepare", "x", "--out", "y", "--min-sessions",
                                                                      "1.5"], ["prepare"], ["bogus"],
                                  ["recommend", "run", "--user", "u", "-k", "x"]])
def test_bad_flags_are_one_line_errors(args: list[str], tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hnvm", *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_messages_are_text_not_console_markup(tmp_path: Path) -> None:
    r = runner.invoke(app, ["stats", str(tmp_path / "[/x]")])
    assert r.exit_code == 2 and "[/x]" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------------- text encodings

def test_utf16_latin1_and_double_gzip_are_named(tmp_path: Path) -> None:
    text = "user,item,ts\nu1,a,1600000000\nJosé,b,1600000060\n"
    cases = {"utf16.csv": text.encode("utf-16"), "latin1.csv": text.encode("latin-1"),
             "twice.csv": gzip.compress(gzip.compress(text.encode()))}
    needles = {"utf16.csv": ("UTF-16",), "latin1.csv": ("row 3", "not UTF-8"), "twice.csv": ("compressed twice",)}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        _fails(["prepare", str(tmp_path / name), "--columns", COLS, "--out", str(tmp_path / "d")], name,
               *needles[name], out=tmp_path / "d")


def test_unix_times_mixed_with_iso_dates_are_named(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.csv", "user,item,ts\n1,a,2024-01-01T10:00:00\n1,b,1704103200\n")
    _fails(["prepare", str(src), "--columns", COLS, "--out", str(tmp_path / "d")],
           "row 3", "mix unix times and ISO-8601", "(row 2)", out=tmp_path / "d")


def test_utf16_without_bom_utf16_in_gzip_and_utf32_are_named(tmp_path: Path) -> None:
    text = "user,item,ts\nu1,a,1600000000\n"
    cases = {"le.csv": text.encode("utf-16-le"), "gz.csv": gzip.compress(text.encode("utf-16")),
             "u32.csv": text.encode("utf-32")}
    needles = {"le.csv": "UTF-16 or UTF-32", "gz.csv": "UTF-16", "u32.csv": "UTF-32 text"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        _fails(["prepare", str(tmp_path / name), "--columns", COLS, "--out", str(tmp_path / "d")], name,
               needles[name], out=tmp_path / "d")


def test_a_compact_date_among_unix_seconds_is_refused(tmp_path: Path) -> None:
    rows = [f"1,{i % 3},{1_600_000_000 + i * 60}" for i in range(6)] + ["1,a,20200913"]
    src = _write(tmp_path / "a.csv", "user,item,ts\n" + "\n".join(rows) + "\n")
    _fails(["prepare", str(src), "--columns", COLS, "--out", str(tmp_path / "d")],
           "row 8", "mix magnitudes", "--time-unit s", out=tmp_path / "d")
    _, info = read_events_info(src, columns={"user": "user", "item": "item", "time": "ts"}, time_format="s")
    assert info.time_unit == "s"


# --------------------------------------------------------------------------- outputs that would destroy inputs

def test_prepare_force_never_replaces_its_inputs_folder_a_run_or_another_directory(tmp_path: Path) -> None:
    src = _zero_padded_log(tmp_path)
    folder = tmp_path / "p"
    folder.mkdir()
    log = folder / "log.csv"
    log.write_bytes(src.read_bytes())
    args = ["--columns", COLS, "--min-item-support", "1", "--force"]
    _fails(["prepare", str(log), "--out", str(folder), *args], "own input")
    assert log.exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "n.txt").write_text("mine")
    _fails(["prepare", str(src), "--out", str(other), *args], "not a dataset")
    assert (other / "n.txt").read_text() == "mine"
    _ok(["prepare", str(src), "--out", str(tmp_path / "d"), *args[:-1]])
    _ok(["train", str(tmp_path / "d"), "--model", "pop", "--out", str(tmp_path / "run")])
    _fails(["prepare", str(src), "--out", str(tmp_path / "run"), *args], "run directory")
    assert (tmp_path / "run" / "config.json").exists()
    _ok(["prepare", str(src), "--out", str(tmp_path / "d"), *args])  # a dataset is replaced
    r = runner.invoke(app, ["prepare", str(src), "--out", ".", *args])
    assert r.exit_code == 2 and "working directory" in r.output


def test_train_force_never_deletes_its_own_dataset(tmp_path: Path) -> None:
    src = _zero_padded_log(tmp_path)
    _ok(["prepare", str(src), "--columns", COLS, "--min-item-support", "1", "--out", str(tmp_path / "rp" / "ds")])
    (tmp_path / "rp" / "config.json").write_text('{"format": "hnvm-run"}')
    _fails(["train", str(tmp_path / "rp" / "ds"), "--model", "pop", "--out", str(tmp_path / "rp"), "--force"],
           "own input")
    assert (tmp_path / "rp" / "ds" / "events.parquet").exists()
    _fails(["train", str(tmp_path / "rp" / "ds"), "--model", "pop", "--out", str(tmp_path / "rp" / "ds" / "r")],
           "inside the dataset directory")


def test_export_stays_out_of_runs_datasets_and_the_raw_log(tmp_path: Path) -> None:
    src = _zero_padded_log(tmp_path)
    _ok(["prepare", str(src), "--columns", COLS, "--min-item-support", "1", "--out", str(tmp_path / "d")])
    _ok(["train", str(tmp_path / "d"), "--model", "pop", "--out", str(tmp_path / "run")])
    run, d = tmp_path / "run", tmp_path / "d"
    for dest in (run / "metrics.json", run / "best" / "x.parquet", d / "new.parquet"):
        _fails(["evaluate", str(tmp_path / "run"), "--export-ranks", str(dest)], "--export-ranks")
        assert not dest.exists()
    before = src.read_bytes()
    _fails(["evaluate", str(tmp_path / "run"), "--export-ranks", str(src), "--force"], "own input")
    assert src.read_bytes() == before


# --------------------------------------------------------------------------- damaged data set tables

@pytest.mark.parametrize(("column", "value", "needle"), [("item", 999, "'item' outside"), ("split", "bogus", "'bogus'"),
                                                          ("ts", None, "not integer")])
def test_damaged_events_table_is_one_line(tmp_path: Path, column: str, value: object, needle: str) -> None:
    src = _zero_padded_log(tmp_path)
    d = tmp_path / "d"
    _ok(["prepare", str(src), "--columns", COLS, "--min-item-support", "1", "--out", str(d)])
    ev = pl.read_parquet(d / "events.parquet")
    if column == "ts":
        ev = ev.with_columns(ts=pl.col("ts").cast(pl.Float64))
    elif column == "split":
        ev = ev.with_columns(split=pl.col("split").cast(pl.Utf8).str.replace("train", value))
    else:
        ev = ev.with_columns(pl.lit(value, dtype=pl.Int32).alias(column))
    ev.write_parquet(d / "events.parquet")
    for cmd in (["stats", str(d)], ["train", str(d), "--model", "pop", "--out", str(tmp_path / "r")]):
        _fails(cmd, "events.parquet", needle)
    assert not (tmp_path / "r").exists()


def test_one_column_for_item_and_another_role_and_a_repeated_header_are_refused(tmp_path: Path) -> None:
    src = _zero_padded_log(tmp_path)
    _fails(["prepare", str(src), "--columns", "user=user,item=user,time=ts", "--out", str(tmp_path / "d")],
           "--columns", "'user'", out=tmp_path / "d")
    dup = _write(tmp_path / "dup.csv", "user,item,item,ts\nu1,a,b,1600000000\n")
    _fails(["prepare", str(dup), "--columns", COLS, "--out", str(tmp_path / "d")], "row 1", "'item' twice",
           out=tmp_path / "d")


def test_non_numbers_in_set_are_plain_one_line_errors(tmp_path: Path) -> None:
    src = _zero_padded_log(tmp_path)
    _ok(["prepare", str(src), "--columns", COLS, "--min-item-support", "1", "--out", str(tmp_path / "d")])
    base = ["train", str(tmp_path / "d"), "--model", "bprmf", "--out", str(tmp_path / "r")]
    msg = _fails([*base, "--set", "model.dim=1e9"], "model.dim", "is not an integer", out=tmp_path / "r")
    assert "<class" not in msg


def test_a_short_row_is_named_as_missing_not_as_none(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.csv", "user,item,ts\nu1,a,1600000000\nu1,b\n")
    msg = _fails(["prepare", str(src), "--columns", COLS, "--out", str(tmp_path / "d")], "row 3", "missing timestamp",
                 out=tmp_path / "d")
    assert "None" not in msg


def test_duplicate_rows_are_dropped_as_unique_first_would() -> None:
    """The hash-first duplicate filter keeps exactly the rows `unique(keep="first")` keeps, in
    order, with text ids that differ only in leading zeros and null times among them."""
    import random

    from hnvm.data.prepare import _drop_duplicates

    rnd = random.Random(3)
    rows = [(rnd.choice(["7", "07", "007", "u1", "u2"]), rnd.choice(["a", "b", "0b", "c"]),
             rnd.choice([1, 2, 3, None])) for _ in range(400)]
    raw = pl.DataFrame(rows, schema={"user": pl.Utf8, "item": pl.Utf8, "ts": pl.Int64}, orient="row")
    out, n = _drop_duplicates(raw, "")
    want = raw.unique(subset=["user", "item", "ts"], keep="first", maintain_order=True)
    assert out.equals(want) and n == raw.height - want.height > 0
    same, none = _drop_duplicates(want, "")
    assert same is want and none == 0
