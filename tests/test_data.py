"""Data preparation: readers, sessionization, filtering, splits, store, CLI errors."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.prepare import PrepareConfig, build_dataset, prepare
from hnvm.data.readers import read_events
from hnvm.data.sessions import filter_fixed_point, sessionize
from hnvm.data.store import Dataset

runner = CliRunner()


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def log_rows(n_users: int = 6, n_sessions: int = 4, length: int = 3, n_items: int = 4,
             gap: int = 7200) -> list[tuple[int, int, int]]:
    """Every user: n_sessions sessions of `length` events over a small catalogue."""
    rows = []
    for u in range(1, n_users + 1):
        t = 1_600_000_000 + u * 10
        for s in range(n_sessions):
            for k in range(length):
                rows.append((u, 100 + (u + s + k) % n_items, t))
                t += 60
            t += gap
    return rows


def generic_csv(path: Path, rows: list[tuple[int, int, int]]) -> Path:
    return write_csv(path, "uid,iid,ts", [f"{u},{i},{t}" for u, i, t in rows])


COLS = {"user": "uid", "item": "iid", "time": "ts"}


# --------------------------------------------------------------------------- sessionization

def test_gap_boundary_exact_gap_stays_in_session(tmp_path: Path) -> None:
    rows = ["1,10,1000", "1,11,2800", "1,12,4601"]  # +1800 s (exactly the gap), then +1801 s
    raw = read_events(write_csv(tmp_path / "a.csv", "uid,iid,ts", rows), columns=COLS)
    s = sessionize(raw, 1800)
    assert s.get_column("sess").to_list() == [0, 0, 1]
    assert s.get_column("pos").to_list() == [0, 1, 0]


def test_sessions_never_span_users(tmp_path: Path) -> None:
    rows = ["1,10,1000", "2,11,1001", "1,12,1002"]
    s = sessionize(read_events(write_csv(tmp_path / "a.csv", "uid,iid,ts", rows), columns=COLS), 1800)
    per_user = s.group_by("sess").agg(pl.col("user").n_unique())
    assert per_user.get_column("user").max() == 1
    assert s.get_column("sess").n_unique() == 2


def test_explicit_session_key_orders_by_first_event(tmp_path: Path) -> None:
    rows = ["1,10,5000,b", "1,11,1000,a", "1,12,1001,a"]
    raw = read_events(write_csv(tmp_path / "a.csv", "uid,iid,ts,sid", rows),
                      columns={**COLS, "session": "sid"})
    s = sessionize(raw, 1)  # gap is ignored with an explicit key
    assert s.get_column("item").to_list() == [11, 12, 10]
    assert s.get_column("sess").to_list() == [0, 0, 1]


# --------------------------------------------------------------------------- filtering

events_strategy = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 12), st.integers(0, 40)), min_size=1, max_size=250
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events_strategy, st.integers(1, 4), st.integers(1, 3), st.integers(1, 4))
def test_filter_reaches_fixed_point(rows, min_item, min_len, min_sess) -> None:
    df = pl.DataFrame(
        {"user": [r[0] for r in rows], "item": [r[1] for r in rows],
         "ts": [r[2] * 1000 for r in rows], "seq": [0] * len(rows),
         "line": list(range(len(rows)))},
        schema={"user": pl.Int64, "item": pl.Int64, "ts": pl.Int64, "seq": pl.Int64, "line": pl.UInt32},
    )
    s = sessionize(df, 1800)
    f, steps = filter_fixed_point(s, min_item_support=min_item, min_session_length=min_len,
                                  min_sessions=min_sess)
    if f.height:
        assert f.group_by("item").len().get_column("len").min() >= min_item
        assert f.group_by("sess").len().get_column("len").min() >= min_len
        assert f.group_by("user").agg(pl.col("sess").n_unique()).get_column("sess").min() >= min_sess
    # nothing removed that satisfies all thresholds: running again changes nothing
    g, _ = filter_fixed_point(f, min_item_support=min_item, min_session_length=min_len,
                              min_sessions=min_sess)
    assert g.height == f.height
    assert steps[-1].events == f.height


# --------------------------------------------------------------------------- splits

def test_user_last_split_properties(tmp_path: Path) -> None:
    rows = log_rows(n_users=8, n_sessions=5, length=4, n_items=5)
    ds = build_dataset(read_events(generic_csv(tmp_path / "a.csv", rows), columns=COLS),
                       PrepareConfig(min_item_support=2))
    ev = ds.events
    # each session is in exactly one split
    assert ev.group_by("session").agg(pl.col("split").n_unique()).get_column("split").max() == 1
    last = ev.group_by("user").agg(pl.col("session").max().alias("last"))
    test = ev.filter(pl.col("split") == "test").select("user", "session").unique()
    joined = test.join(last, on="user")
    assert (joined.get_column("session") == joined.get_column("last")).all()
    # test is later than valid, valid later than train, per user
    order = ev.group_by("user", "split").agg(pl.col("ts").min().alias("t0"), pl.col("ts").max().alias("t1"))
    for u in order.get_column("user").unique().to_list():
        r = {x["split"]: x for x in order.filter(pl.col("user") == u).to_dicts()}
        assert r["train"]["t1"] < r["valid"]["t0"] <= r["valid"]["t1"] < r["test"]["t0"]
    train_items = set(ev.filter(pl.col("split") == "train").get_column("item").to_list())
    assert set(ev.get_column("item").to_list()) <= train_items
    assert set(ds.items.get_column("item").to_list()) == train_items
    # eval sessions keep >= 2 events
    assert ev.filter(pl.col("split") != "train").group_by("session").len().get_column("len").min() >= 2


def test_unseen_items_removed_from_eval_sessions(tmp_path: Path) -> None:
    rows = log_rows(n_users=6, n_sessions=4, length=3, n_items=3)
    # a new item appears only in user 1's last session: it must vanish from test
    u1_last_t = max(t for u, _, t in rows if u == 1)
    rows.append((1, 999, u1_last_t + 1))
    ds = build_dataset(read_events(generic_csv(tmp_path / "a.csv", rows), columns=COLS),
                       PrepareConfig(min_item_support=1))
    assert "999" not in ds.items.get_column("id").to_list()
    assert ds.events.filter(pl.col("item").is_null()).height == 0


def test_time_split_has_no_cross_user_leakage(tmp_path: Path) -> None:
    rows = log_rows(n_users=10, n_sessions=6, length=3, n_items=4)
    ds = build_dataset(read_events(generic_csv(tmp_path / "a.csv", rows), columns=COLS),
                       PrepareConfig(split="time", min_item_support=1, min_sessions=1))
    ev = ds.events
    train_end = ev.filter(pl.col("split") == "train").get_column("ts").max()
    for split in ("valid", "test"):
        sess_end = ev.filter(pl.col("split") == split).group_by("session").agg(pl.col("ts").max())
        assert sess_end.get_column("ts").min() > train_end


def test_targets(tmp_path: Path) -> None:
    rows = log_rows(n_users=5, n_sessions=4, length=4, n_items=4)
    ds = build_dataset(read_events(generic_csv(tmp_path / "a.csv", rows), columns=COLS),
                       PrepareConfig(min_item_support=1))
    t = ds.next_item_targets("test")
    assert t.height == 5 * 3  # positions 2..4 of each 4-item test session
    assert t.get_column("pos").min() == 1
    assert ds.next_item_targets("test", include_first=True).height == 5 * 4
    ns = ds.next_session_targets("test")
    assert ns.height == 5
    assert all(len(x) >= 1 for x in ns.get_column("items").to_list())


# --------------------------------------------------------------------------- store

def test_deterministic_output_and_id_round_trip(tmp_path: Path) -> None:
    rows = log_rows(n_users=7, n_sessions=4, length=3, n_items=6)
    src = generic_csv(tmp_path / "a.csv", rows)
    prepare(src, tmp_path / "d1", columns=COLS, config=PrepareConfig(min_item_support=1))
    prepare(src, tmp_path / "d2", columns=COLS, config=PrepareConfig(min_item_support=1))
    for name in ("events.parquet", "items.parquet", "users.parquet", "meta.json"):
        a, b = (tmp_path / d / name for d in ("d1", "d2"))
        if name == "meta.json":  # meta records the output-independent source and counts
            assert a.read_text() == b.read_text()
        else:
            assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    ds = Dataset.load(tmp_path / "d1")
    ev = ds.events.sort("session", "pos")
    back = pl.DataFrame({"u": ds.user_ids(ev.get_column("user")), "i": ds.item_ids(ev.get_column("item")),
                         "t": ev.get_column("ts")})
    original = {(str(u), str(i), t) for u, i, t in rows}
    assert {tuple(r) for r in back.iter_rows()} <= original
    assert back.height == len(rows)  # min_item_support=1 keeps every event


def test_load_rejects_other_format_version(tmp_path: Path) -> None:
    rows = log_rows()
    prepare(generic_csv(tmp_path / "a.csv", rows), tmp_path / "d", columns=COLS,
            config=PrepareConfig(min_item_support=1))
    meta = (tmp_path / "d" / "meta.json").read_text().replace('"format_version": 1', '"format_version": 99')
    (tmp_path / "d" / "meta.json").write_text(meta)
    from hnvm.errors import HnvmError
    with pytest.raises(HnvmError, match="version 99"):
        Dataset.load(tmp_path / "d")


# --------------------------------------------------------------------------- presets

def _gen(n_users: int = 5, n_sessions: int = 4, length: int = 3) -> list[tuple[int, int, int]]:
    return log_rows(n_users=n_users, n_sessions=n_sessions, length=length, n_items=3)


def _check_preset(path: Path, preset: str, tmp_path: Path, users: int, sessions: int) -> Dataset:
    ds = prepare(path, tmp_path / f"out-{preset}", preset=preset, config=PrepareConfig(min_item_support=1))
    st_ = ds.meta["stats"]
    assert st_["users"] == users
    assert st_["sessions"] == sessions
    return ds


def test_preset_xing2016_drops_deletes(tmp_path: Path) -> None:
    rows = _gen()
    lines = [f"{u}\t{i}\t1\t{t}" for u, i, t in rows]
    lines.append(f"1\t555\t4\t{rows[0][2] + 1}")  # a delete: must vanish
    p = write_csv(tmp_path / "interactions.csv", "user_id\titem_id\tinteraction_type\tcreated_at", lines)
    ds = _check_preset(p, "xing2016", tmp_path, 5, 20)
    assert "555" not in ds.items.get_column("id").to_list()
    assert ds.events.height == len(rows)


def test_preset_ijcai15_day_is_session(tmp_path: Path) -> None:
    lines = []
    for u in range(1, 5):
        for day in ("1101", "1102", "1105"):
            for k in range(3):
                lines.append(f"{u},{100 + (u + k) % 3},7,8,9,{day},0")
    p = write_csv(tmp_path / "user_log_format1.csv",
                  "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type", lines)
    _check_preset(p, "ijcai15", tmp_path, 4, 12)


def test_preset_taobao(tmp_path: Path) -> None:
    p = tmp_path / "UserBehavior.csv"
    p.write_text("\n".join(f"{u},{i},1,pv,{t}" for u, i, t in _gen()) + "\n")
    _check_preset(p, "taobao", tmp_path, 5, 20)


def test_preset_retailrocket_gzip(tmp_path: Path) -> None:
    p = tmp_path / "events.csv.gz"
    body = "timestamp,visitorid,event,itemid\n" + "".join(
        f"{t * 1000 + 7},{u},view,{i}\n" for u, i, t in _gen())
    with gzip.open(p, "wt") as fh:
        fh.write(body)
    _check_preset(p, "retailrocket", tmp_path, 5, 20)


def test_preset_yoochoose_sessions_are_users(tmp_path: Path) -> None:
    lines = [f"{s}\t{100 + (s + k) % 3}\t{1_400_000_000 + s * 10000 + k}.5" for s in range(1, 6) for k in range(3)]
    p = write_csv(tmp_path / "clicks.tsv", "SessionId\tItemId\tTime", lines)
    ds = prepare(p, tmp_path / "y", preset="yoochoose",
                 config=PrepareConfig(min_item_support=1, min_sessions=1, split="time",
                                      valid_fraction=0.2, test_fraction=0.2))
    assert ds.n_users == ds.events.get_column("session").n_unique()


def test_preset_movielens_dat_and_csv(tmp_path: Path) -> None:
    rows = _gen()
    dat = tmp_path / "ratings.dat"
    dat.write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in rows))
    _check_preset(dat, "movielens", tmp_path, 5, 20)
    csv = write_csv(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp",
                    [f"{u},{i},4.0,{t}" for u, i, t in rows])
    ds = prepare(csv, tmp_path / "ml2", preset="movielens", config=PrepareConfig(min_item_support=1))
    assert ds.meta["stats"]["sessions"] == 20


def test_preset_instacart_order_is_session(tmp_path: Path) -> None:
    lines = []
    oid = 0
    for u in range(1, 4):
        for n in range(1, 5):
            oid += 1
            for k in (3, 1, 2):  # add_to_cart_order out of file order
                lines.append(f"{oid},{oid},{u},{n},1,9,{'' if n == 1 else 0},{100 + k},{k}.0,0.0")
    p = write_csv(tmp_path / "df.csv", ",order_id,user_id,order_number,order_dow,order_hour_of_day,"
                  "days_since_prior_order,product_id,add_to_cart_order,reordered", lines)
    ds = _check_preset(p, "instacart", tmp_path, 3, 12)
    first = ds.events.filter(pl.col("session") == 0).sort("pos")
    assert ds.item_ids(first.get_column("item")) == ["101", "102", "103"]


def test_parquet_input(tmp_path: Path) -> None:
    rows = _gen()
    p = tmp_path / "log.parquet"
    pl.DataFrame({"uid": [r[0] for r in rows], "iid": [str(r[1]) for r in rows],
                  "ts": [r[2] for r in rows]}).write_parquet(p)
    ds = prepare(p, tmp_path / "o", columns=COLS, config=PrepareConfig(min_item_support=1))
    assert ds.events.height == len(rows)


def test_iso_timestamps(tmp_path: Path) -> None:
    rows = ["1,10,2024-01-01T10:00:00", "1,11,2024-01-01T10:30:00", "1,12,2024-01-01T11:00:01"]
    s = sessionize(read_events(write_csv(tmp_path / "a.csv", "uid,iid,ts", rows), columns=COLS), 1800)
    assert s.get_column("sess").to_list() == [0, 0, 1]


# --------------------------------------------------------------------------- real files

def test_real_retailrocket(shared_data: Path, tmp_path: Path) -> None:
    ds = prepare(shared_data / "retailrocket" / "events.csv", tmp_path / "rr", preset="retailrocket")
    s = ds.meta["stats"]
    assert (s["users"], s["items"], s["test_next_item_targets"]) == (50, 118, 72)


def test_real_taobao_and_movielens(shared_data: Path, tmp_path: Path) -> None:
    raw = read_events(shared_data / "taobao" / "UserBehavior.csv", preset="taobao")
    assert raw.height == 4321
    assert sessionize(raw, 1800).get_column("sess").n_unique() == 722
    ml = read_events(shared_data / "movielens-1m-sample" / "ratings.dat", preset="movielens")
    assert ml.height == 100_000 and ml.get_column("user").n_unique() == 5958


def test_real_yoochoose(shared_data: Path) -> None:
    raw = read_events(shared_data / "yoochoose-100k" / "yoochoose-clicks-100k_train_full.txt",
                      preset="yoochoose")
    assert (raw.get_column("user") == raw.get_column("session")).all()


def test_instacart_sample_matches_reference(tmp_path: Path) -> None:
    from hnvm.data.samples import instacart_sample_path

    ds = prepare(instacart_sample_path(), tmp_path / "ic", preset="instacart")
    s = ds.meta["stats"]
    assert (s["users"], s["items"]) == (589, 5214)
    assert (s["train_events"], s["train_sessions"]) == (121_337, 12_939)
    assert (s["valid_events"], s["test_events"]) == (5_598, 5_740)
    assert s["test_next_item_targets"] == 5_151
    assert s["test_next_session_targets"] == 589


# --------------------------------------------------------------------------- bad input (CLI)

def _cli_fails(args: list[str], *needles: str, out: Path | None = None) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    msg = r.output.strip()
    assert "Traceback" not in msg
    for n in needles:
        assert n in msg, msg
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())
    return msg


def test_bad_missing_column(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "a.csv", "uid,item,ts", ["1,2,3"])
    _cli_fails(["prepare", str(p), "--columns", "user=uid,item=iid,time=ts", "--out", str(tmp_path / "o")],
               "a.csv", "'iid'", "found: uid, item, ts", out=tmp_path / "o")


def test_bad_preset_misnamed_column(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "events.csv", "timestamp,visitor,event,itemid", ["1430624498579,1,view,2"])
    _cli_fails(["prepare", str(p), "--preset", "retailrocket", "--out", str(tmp_path / "o")],
               "events.csv", "'visitorid'", out=tmp_path / "o")


def test_bad_timestamp_names_row(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "a.csv", "uid,iid,ts", ["1,2,2024-01-01T00:00:00", "1,3,yesterday"])
    _cli_fails(["prepare", str(p), "--columns", "user=uid,item=iid,time=ts", "--out", str(tmp_path / "o")],
               "a.csv", "row 3", "'ts'", "yesterday", out=tmp_path / "o")


def test_bad_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("")
    _cli_fails(["prepare", str(p), "--columns", "user=uid,item=iid,time=ts", "--out", str(tmp_path / "o")],
               "a.csv", "empty", out=tmp_path / "o")
    h = write_csv(tmp_path / "h.csv", "uid,iid,ts", [])
    h.write_text("uid,iid,ts\n")
    _cli_fails(["prepare", str(h), "--columns", "user=uid,item=iid,time=ts", "--out", str(tmp_path / "o")],
               "h.csv", "no rows", out=tmp_path / "o")


@pytest.mark.parametrize("bad", ["1,,100", ",5,100", "1, ,100"])
def test_bad_missing_ids(tmp_path: Path, bad: str) -> None:
    p = write_csv(tmp_path / "a.csv", "uid,iid,ts", ["1,2,50", bad])
    _cli_fails(["prepare", str(p), "--columns", "user=uid,item=iid,time=ts", "--out", str(tmp_path / "o")],
               "a.csv", "row 3", "id", out=tmp_path / "o")


def test_bad_directory_input(tmp_path: Path) -> None:
    _cli_fails(["prepare", str(tmp_path), "--columns", "user=uid,item=iid,time=ts",
                "--out", str(tmp_path / "o")], "is a directory", out=tmp_path / "o")


def test_bad_existing_output_needs_force(tmp_path: Path) -> None:
    src = generic_csv(tmp_path / "a.csv", log_rows())
    o = tmp_path / "o"
    o.mkdir()
    (o / "keep.txt").write_text("mine")
    args = ["prepare", str(src), "--columns", "user=uid,item=iid,time=ts", "--out", str(o),
            "--min-item-support", "1"]
    _cli_fails(args, "exists", "--force")
    assert (o / "keep.txt").read_text() == "mine"
    # --force replaces a dataset, never a directory of other files
    _cli_fails([*args, "--force"], "not a dataset")
    assert (o / "keep.txt").read_text() == "mine"
    (o / "keep.txt").unlink()
    assert runner.invoke(app, args).exit_code == 2  # exists, even empty: --force
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--force"])  # and now a dataset: replaced
    assert r.exit_code == 0, r.output
    assert (o / "meta.json").exists()


def test_bad_filters_leave_nothing(tmp_path: Path) -> None:
    src = generic_csv(tmp_path / "a.csv", log_rows(n_users=3, n_sessions=2))
    msg = _cli_fails(["prepare", str(src), "--columns", "user=uid,item=iid,time=ts",
                      "--out", str(tmp_path / "o")], "a.csv", "leave no data", "sessions per user >= 3",
                     out=tmp_path / "o")
    assert "after item support >= 5" in msg


def test_stats_cli(tmp_path: Path) -> None:
    src = generic_csv(tmp_path / "a.csv", log_rows())
    prepare(src, tmp_path / "d", columns=COLS, config=PrepareConfig(min_item_support=1))
    r = runner.invoke(app, ["stats", str(tmp_path / "d")])
    assert r.exit_code == 0
    assert "Training sessions" in r.output and "Next-item targets" in r.output
    r = runner.invoke(app, ["stats", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a dataset directory" in r.output
