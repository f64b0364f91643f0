"""The recommendation service: online state (incremental HNVM equals the model's own scoring,
every registry model served, sessions closed by gap or key), the durable event log, bad input
(each a 4xx that changes nothing), restart replay, and a real `hnvm serve` killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch

from hnvm.contract import Batch
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import HnvmError
from hnvm.models.base import REGISTRY, get_model_class
from hnvm.online import Engine, Event, Query
from hnvm.runs import train_run
from hnvm.serve.app import create_app
from hnvm.serve.schemas import Limits
from hnvm.serve.service import Service
from hnvm.serve.store import EventLog

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what it supports today
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

get_model_class("pop")  # registers the built-in models

SMALL = ["model.hidden=16", "model.emb_dim=16", "model.d_e=4", "model.d_z=4", "model.mlp_hidden=16",
         "model.n_negatives=32", "model.batch_size=32", "train.epochs=1", "train.seed=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("serve") / "data"
    synthetic_dataset(n_users=40, n_items=30, n_topics=4, seed=5).save(d)
    return d


@pytest.fixture(scope="module")
def run_dir(data_dir: Path) -> Path:
    out = data_dir.parent / "run"
    train_run(data_dir, "hnvm", out, overrides=SMALL)
    return out


@pytest.fixture(scope="module")
def engine(run_dir: Path) -> Engine:
    return Engine.from_run(run_dir)


def client(run_dir: Path, db: Path, rank_process: bool = False, **limits: int) -> TestClient:
    return TestClient(create_app(Service.open(run_dir, db, limits=Limits(**limits), rank_process=rank_process)))


def items_of(engine: Engine, n: int, start: int = 1) -> list[str]:
    return engine.item_ids[start: start + n]


# ---- online state --------------------------------------------------------------------------------


def _model_scores(engine: Engine, uid: int, sessions: list[list[int]], prefix: list[int]) -> torch.Tensor:
    """The model's own scoring of the same history (what `hnvm evaluate` calls)."""
    from hnvm.online.scorers import one_user_sessions as _pad

    m = engine.model
    if not prefix:
        return m.score_sessions(Batch(torch.tensor([uid]), _pad([np.array(s) for s in sessions]),
                                      torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
    rows = _pad([np.array(s) for s in [*sessions, [*prefix, 1]]])
    return m.score(Batch(torch.tensor([uid]), rows, torch.tensor([0]), torch.tensor([len(prefix)])))


@pytest.fixture(scope="module")
def repeat_run_dir(data_dir: Path) -> Path:
    out = data_dir.parent / "run-repeat"
    train_run(data_dir, "hnvm", out, overrides=[*SMALL, "model.repeat=true"])
    return out


@pytest.mark.parametrize("repeat", [False, True])
def test_incremental_hnvm_equals_model_scoring(run_dir: Path, repeat_run_dir: Path, repeat: bool) -> None:
    """Also with the repeat channel, whose per-user memory is folded session by session."""
    eng = Engine.from_run(repeat_run_dir if repeat else run_dir)
    assert eng.scorer.incremental and (eng.scorer.ranker is None) == repeat
    seq = eng.history
    assert seq is not None
    uid = 3
    user = next(u for u, i in eng.user_index.items() if i == uid)
    hist = [seq.session(s).tolist() for s in range(int(seq.user_first[uid]), int(seq.user_end[uid]))]
    online = [[1, 2, 3], [4, 5]]  # two online sessions (explicit keys), the second left open
    if repeat:  # items the user had: the repeat terms are not all 0
        online = [[*hist[-1][:2], 3], [hist[-1][0], 5]]
    t = 2e9
    for key, sess in zip(("a", "b"), online, strict=True):
        for i in sess[:-1] if key == "b" else sess:
            t += 1
            eng.apply(Event(user, eng.item_ids[i], t, key))
    # prefix of the open session = [4]; then [4, 5] after one more event
    for prefix in (online[1][:1], online[1]):
        got = eng.scorer.scores([(eng.users[user], [], False)])
        want = _model_scores(eng, uid, [*hist, online[0]], prefix)
        torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
        if len(prefix) == 1:
            t += 1
            eng.apply(Event(user, eng.item_ids[online[1][1]], t, "b"))
    # the next session, from history only (a new key closes "b")
    got = eng.scorer.scores([(eng.users[user], [], True)])
    want = _model_scores(eng, uid, [*hist, *online], [])
    torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    # a request's own items (extra), in the open session and after it timed out
    extra = [hist[0][0], 2]
    got = eng.scorer.scores([(eng.users[user], extra, False)])
    want = _model_scores(eng, uid, [*hist, online[0]], [*online[1], *extra])
    torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    got = eng.scorer.scores([(eng.users[user], extra, True)])
    want = _model_scores(eng, uid, [*hist, *online], extra)
    torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("repeat", [False, True])
def test_a_pass_scores_request_items_of_any_length_as_each_row_alone(run_dir: Path, repeat_run_dir: Path,
                                                                       repeat: bool) -> None:
    """The request items' decoder steps run for the whole pass at once (`_extra_steps`)."""
    eng = Engine.from_run(repeat_run_dir if repeat else run_dir)
    users = list(eng.user_index)[:5]
    extras = [[], [1], [2, 3, 4], [], [5, 3]]
    views = [(eng.state(u), e, i == 3) for i, (u, e) in enumerate(zip(users, extras, strict=True))]
    together = eng.scorer.scores(views)
    alone = torch.cat([eng.scorer.scores([v]) for v in views])
    torch.testing.assert_close(together[:, 1:], alone[:, 1:], atol=1e-5, rtol=1e-5)
    st = views[2][0]  # and the model's own scoring of a row with items
    want = _model_scores(eng, st.uid, [s.tolist() for s in st.history], extras[2])
    torch.testing.assert_close(together[2:3, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)


def test_session_closes_after_the_gap_or_a_new_key(engine: Engine) -> None:
    gap = engine.gap_s
    assert gap == 1800
    it = items_of(engine, 4)
    for ts, item in ((1000, it[0]), (1000 + gap, it[1]), (1001 + 2 * gap, it[2])):  # exactly the gap stays
        engine.apply(Event("gap-user", item, ts, None))
    d = engine.describe("gap-user")
    assert d["history_sessions"] == 1 and d["session_items"] == [it[2]]
    engine.apply(Event("key-user", it[0], 5, "o1"))
    engine.apply(Event("key-user", it[1], 5 + 10 * gap, "o1"))  # same key: same session, however late
    engine.apply(Event("key-user", it[2], 5 + 10 * gap, "o2"))
    d = engine.describe("key-user")
    assert d["history_sessions"] == 1 and d["session_items"] == [it[2]] and d["session_key"] == "o2"


def test_recommendations_follow_the_session_and_time_out(engine: Engine) -> None:
    it = items_of(engine, 6)
    recs = [engine.recommend(Query("walker", (), 5, now=0)).items]
    for n, item in enumerate(it[:3]):
        engine.apply(Event("walker", item, 100 + n, None))
        r = engine.recommend(Query("walker", (), 5, now=100 + n))
        assert r.session_length == n + 1 and not r.new_session
        recs.append(r.items)
    assert len({tuple(r) for r in recs}) > 1  # the session moves the recommendations
    late = engine.recommend(Query("walker", (), 5, now=102 + engine.gap_s + 1))
    assert late.new_session and late.session_length == 0


def test_cold_start_unknown_items_and_exclude_seen(engine: Engine) -> None:
    r = engine.recommend(Query("never-seen", ["nope", engine.item_ids[1], "nope"], 5))
    assert r.cold_start and r.unknown_items == ["nope"] and len(r.items) == 5 and r.session_length == 1
    assert "never-seen" not in engine.users  # reads do not create state
    known = next(iter(engine.user_index))
    st = engine.state(known)
    seen = {engine.item_ids[i] for i in st.seen}
    r = engine.recommend(Query(known, (), engine.n_items, exclude_seen=True))
    assert not r.cold_start and not (set(r.items) & seen)
    assert len(r.items) == engine.n_items - len(seen)
    assert r.scores == sorted(r.scores, reverse=True)


FAST = {
    "hnvm": SMALL[:-2], "ncf": ["model.factors=4", "model.batch_size=128"], "bprmf": ["model.dim=8"],
    "gru4rec": ["model.layers=16", "model.batch_size=16", "model.n_sample=16"],
    "stamp": ["model.d=16"], "caser": ["model.L=3", "model.T=2", "model.d=8", "model.nv=2", "model.nh=4"],
    "hrnn": ["model.emb_dim=16", "model.session_hidden=16", "model.user_hidden=16", "model.n_negatives=32"],
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registry_model_is_served(name: str, data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / name
    train_run(data_dir, name, run, overrides=[*FAST.get(name, []), "train.epochs=1", "train.seed=2"])
    with client(run, tmp_path / "ev.sqlite") as c:
        it = c.get("/v1/health").json()
        assert it["model"] == name and it["incremental_state"] == (name == "hnvm")
        eng: Engine = c.app.state.service.engine  # type: ignore[attr-defined]
        user = next(iter(eng.user_index))
        ev = [{"user": user, "item": eng.item_ids[i], "ts": 1e10 + i} for i in (1, 2, 3)]
        assert c.post("/v1/events", json={"events": ev}).status_code == 200
        r = c.post("/v1/recommend", json={"user": user, "k": 7, "ts": 1e10 + 4}).json()
        assert len(r["items"]) == 7 and r["session_length"] == 3
        # the generic path is the model's own scoring of the stored history
        st = eng.users[user]
        want = _model_scores(eng, st.uid, [s.tolist() for s in st.history], st.open_items)
        got = eng.scorer.scores([(st, [], False)])
        torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
        cold = c.post("/v1/recommend", json={"user": "stranger", "k": 3}).json()
        assert cold["cold_start"] and len(cold["items"]) == 3


# ---- the event log and restarts ----------------------------------------------------------------


def test_event_log_is_wal_full_and_single_writer(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "ev.sqlite")
    assert log.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert log.append([Event("u", "i", 1.0), Event("u", "j", 2.0, "s")]) == (1, 2)
    with pytest.raises(HnvmError, match="in use by another process"):
        EventLog(tmp_path / "ev.sqlite")
    log.close()
    again = EventLog(tmp_path / "ev.sqlite")
    assert [(e.item, e.session) for e in again.replay()] == [("i", None), ("j", "s")]
    again.close()


def test_restart_replays_to_identical_recommendations(run_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "ev.sqlite"
    eng = Engine.from_run(run_dir)
    users = [*list(eng.user_index)[:3], "newcomer"]
    rng = np.random.default_rng(0)
    batches = [[{"user": str(rng.choice(users)), "item": eng.item_ids[int(rng.integers(1, eng.n_items + 1))],
                 "ts": 1e9 + 600 * b + i} for i in range(20)] for b in range(6)]  # some gaps close sessions
    queries = [{"user": u, "k": 10, "ts": 1e9 + 10_000} for u in users]
    with client(run_dir, db) as c:
        for b in batches:  # recommending between batches makes the service advance state eagerly
            assert all(c.post("/v1/recommend", json=q).status_code == 200 for q in queries)
            assert c.post("/v1/events", json={"events": b}).status_code == 200
        served = c.app.state.service.engine.users  # type: ignore[attr-defined]
        assert all(st.cache.n_dec == len(st.open_items) for st in served.values() if st.cache is not None)
        before = [c.post("/v1/recommend", json=q).json() for q in queries]
    # replayed lazily: no model code until the first recommendation; ranked in a child process
    # this time (`--rank-process`), which must not change a thing
    with client(run_dir, db, rank_process=True) as c:
        health = c.get("/v1/health").json()
        assert health["replayed_at_start"] == 120 and health["rank_process"]
        after = [c.post("/v1/recommend", json=q).json() for q in queries]
        proc = c.app.state.service.engine.rank_worker.proc  # type: ignore[attr-defined]
    assert before == after
    assert proc.wait(10) == 0  # the service's shutdown ended the child


# ---- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def svc(run_dir: Path, tmp_path: Path):
    with client(run_dir, tmp_path / "ev.sqlite", max_events=5, max_session_length=4,
                max_body_bytes=4096) as c:
        eng: Engine = c.app.state.service.engine  # type: ignore[attr-defined]
        good = [{"user": "u1", "item": eng.item_ids[1], "ts": 100.0}]
        assert c.post("/v1/events", json={"events": good}).status_code == 200
        yield c


def _snapshot(c: TestClient) -> tuple:
    svc = c.app.state.service  # type: ignore[attr-defined]
    return svc.log.count(), json.dumps(c.get("/v1/users/u1").json()), svc.engine.n_events


BAD_EVENTS = [
    ("{not json", 400, "malformed JSON"),
    ('{"events": [{"user": "u1", "item": "1", "ts": "yesterday"}]}', 422, "events.0.ts"),
    ('{"events": [{"user": ["u1"], "item": "1", "ts": 200}]}', 422, "events.0.user"),
    ('{"events": [{"user": "u1", "ts": 200}]}', 422, "events.0.item: Field required"),
    ('{"events": [{"user": "u1", "item": "1", "ts": 200, "colour": 1}]}', 422, "Extra inputs"),
    ('{"events": [{"user": "", "item": "1", "ts": 200}]}', 422, "at least 1 character"),
    ('{"events": []}', 422, "at least 1 item"),
    ('{"events": [' + ",".join(['{"user": "u2", "item": "1", "ts": 1}'] * 6) + "]}", 413, "at most 5"),
    ('{"events": [{"user": "u1", "item": "1", "ts": 99}]}', 409, "earlier than the previous event of user 'u1'"),
    # the whole batch is refused when one event is out of order: the good first event is not kept
    ('{"events": [{"user": "u3", "item": "1", "ts": 5}, {"user": "u3", "item": "1", "ts": 4}]}', 409,
     "events[1]"),
    ('{"events": [' + ",".join(['{"user": "u1", "item": "1", "ts": 101}'] * 4) + "]}", 422, "exceed 4 events"),
    ('{"events": [{"user": "u1", "item": "1", "ts": 200}], "pad": "' + "x" * 5000 + '"}', 413, "body over"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_EVENTS)
def test_bad_events_are_refused_and_change_nothing(svc: TestClient, body: str, status: int, message: str) -> None:
    before = _snapshot(svc)
    r = svc.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert _snapshot(svc) == before
    assert svc.get("/v1/users/u3").json()["online_events"] == 0


BAD_RECOMMEND = [
    ('{"user": "u1", "k": 0}', "k: Input should be greater than or equal to 1"),
    ('{"user": "u1", "k": -3}', "greater than or equal to 1"),
    ('{"user": "u1", "k": 1001}', "k: Input should be less than or equal to 1000"),
    ('{"user": "u1", "k": "ten"}', "k: Input should be a valid integer"),
    ('{"user": "u1", "k": 2.5}', "k: Input should be a valid integer"),
    ('{"user": "u1", "exclude_seen": "yes"}', "exclude_seen"),
    ('{"user": "u1", "session": "1,2"}', "session: Input should be a valid list"),
    ('{"k": 3}', "user: Field required"),
    ('{"user": null}', "user"),
]


@pytest.mark.parametrize(("body", "message"), BAD_RECOMMEND)
def test_bad_recommend_requests_get_422(svc: TestClient, body: str, message: str) -> None:
    before = _snapshot(svc)
    r = svc.post("/v1/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert _snapshot(svc) == before


def test_oversized_recommend_session_gets_413(svc: TestClient) -> None:
    r = svc.post("/v1/recommend", json={"user": "u1", "session": ["1", "2", "3", "4", "5"]})
    assert r.status_code == 413 and "session: 5 items (at most 4)" in r.json()["error"]


def test_good_requests_and_docs(svc: TestClient) -> None:
    eng: Engine = svc.app.state.service.engine  # type: ignore[attr-defined]
    r = svc.post("/v1/events", json={"events": [{"user": 7000, "item": "no-such-item"},
                                                {"user": 7000, "item": eng.item_ids[2]}]})
    assert r.status_code == 200 and r.json()["unknown_items"] == ["no-such-item"]
    u = svc.get("/v1/users/7000").json()  # numeric ids name the same user as their string
    assert u["online_events"] == 2 and u["session_items"] == [eng.item_ids[2]] and not u["known_to_model"]
    r = svc.post("/v1/recommend", json={"user": "7000", "session": ["zz", eng.item_ids[3]], "k": 3}).json()
    assert r["unknown_items"] == ["zz"] and r["session_length"] == 2 and r["cold_start"]
    assert svc.get("/v1/users/7000").json()["session_items"] == [eng.item_ids[2]]  # request items not stored
    assert svc.get("/docs").status_code == 200
    paths = svc.get("/openapi.json").json()["paths"]
    assert {"/v1/events", "/v1/recommend", "/v1/users/{user_id}", "/v1/health"} <= set(paths)


def test_recommend_fast_path_answers_as_the_route(svc: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from hnvm.serve.asgi import FastRecommend as _FastRecommend

    eng: Engine = svc.app.state.service.engine  # type: ignore[attr-defined]
    seen: list[object] = []
    parse = _FastRecommend._query
    monkeypatch.setattr(_FastRecommend, "_query", lambda self, scope, body: seen.append(parse(self, scope, body))
                        or seen[-1])
    bodies = [{"user": "u1", "k": 4, "ts": 500.0}, {"user": 42, "session": [eng.item_ids[3], "zz"], "k": 2,
                                                    "exclude_seen": True, "ts": 500.0}]
    fast = [svc.post("/v1/recommend", json=b) for b in bodies]
    assert all(q is not None for q in seen) and len(seen) == 2  # both went the fast way
    assert svc.post("/v1/recommend", json={"user": "u1", "k": 0}).status_code == 422  # errors: the route's
    assert seen[-1] is None
    monkeypatch.setattr(_FastRecommend, "_query", lambda self, scope, body: None)  # everything via the route
    slow = [svc.post("/v1/recommend", json=b) for b in bodies]
    assert [r.status_code for r in fast] == [r.status_code for r in slow] == [200, 200]
    assert [r.json() for r in fast] == [r.json() for r in slow]
    assert [r.headers["content-type"] for r in fast] == [r.headers["content-type"] for r in slow]


# ---- a real server process -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, db: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "hnvm", "serve", str(run_dir), "--port", str(port), "--db", str(db),
                          *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 90
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"hnvm serve exited: {p.stderr.read().decode() if p.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return p
        except httpx.TransportError:
            time.sleep(0.2)
    p.kill()
    raise AssertionError("hnvm serve did not come up in 90 s")


def test_kill_9_and_restart_give_the_same_recommendations(run_dir: Path, tmp_path: Path) -> None:
    db, port = tmp_path / "events.sqlite", _free_port()
    url = f"http://127.0.0.1:{port}"
    eng = Engine.from_run(run_dir)
    users = [*list(eng.user_index)[:2], "walk-in"]
    queries = [{"user": u, "k": 10, "ts": 5e9} for u in users]
    p = _start(run_dir, db, port)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            for b in range(5):
                ev = [{"user": users[(b + i) % 3], "item": eng.item_ids[1 + (7 * b + i) % eng.n_items],
                       "ts": 5e9 - 5000 + 900 * b + i} for i in range(8)]
                assert c.post("/v1/events", json={"events": ev}).status_code == 200
            # the real server refuses bad input too
            bad = c.post("/v1/events", content=b'{"events": [', headers={"content-type": "application/json"})
            assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
            assert c.post("/v1/recommend", json={"user": "x", "k": 0}).status_code == 422
            before = [c.post("/v1/recommend", json=q).json() for q in queries]
    finally:
        p.send_signal(signal.SIGKILL)  # no shutdown handler runs
        p.wait(10)
    with sqlite3.connect(db) as con:  # every acknowledged event is on disk
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 40
    # the restarted server ranks in a child process: same answers; and a SIGKILL of the server
    # ends the child too (its pipe closes)
    p = _start(run_dir, db, port, "--rank-process", "--scoring", "bf16")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            health = c.get("/v1/health").json()
            assert health["replayed_at_start"] == 40 and health["rank_process"]
            after = [c.post("/v1/recommend", json=q).json() for q in queries]
        children = psutil.Process(p.pid).children()
        assert len(children) == 1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    assert before == after
    assert any(r["session_length"] > 0 for r in before)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_fast_top_k_agrees_with_topk_items() -> None:
    from hnvm.metrics import topk_items
    from hnvm.online.ranking import top_k

    g = torch.Generator().manual_seed(0)
    for scores in (torch.randn(6, 50, generator=g), torch.randint(0, 4, (6, 50), generator=g).float()):  # ties
        exclude = [[], [1, 2, 3], list(range(1, 48)), list(range(1, 50)), [7], []]
        want = topk_items(scores.clone(), 10, exclude=[torch.tensor(e, dtype=torch.long) for e in exclude])
        ids, vals = top_k(scores.clone(), 10, exclude)
        for r in range(6):
            w = [i for i in want[r].tolist() if i]
            assert ids[r] == w and vals[r] == scores[r, w].tolist()


def test_chunked_oversized_body_and_unknown_paths(svc: TestClient) -> None:
    before = _snapshot(svc)

    def chunks():
        yield b'{"events": ['
        for _ in range(200):
            yield b'{"user": "u1", "item": "1", "ts": 300},'
        yield b'{"user": "u1", "item": "1", "ts": 300}]}'

    r = svc.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body over 4096 bytes" in r.json()["error"]
    assert svc.get("/v1/nowhere").json() == {"error": "Not Found"}
    assert svc.get("/v1/events").status_code == 405
    assert _snapshot(svc) == before


def test_serve_cli_errors(run_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hnvm.cli import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", str(run_dir), "--port", str(port), "--db", str(tmp_path / "e.sqlite")])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output
    r = CliRunner().invoke(app, ["serve", str(run_dir), "--port", str(_free_port()), "--db", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", str(_free_port())])
    assert r.exit_code == 2 and "not a run directory" in r.output
    r = CliRunner().invoke(app, ["serve", str(run_dir), "--port", str(_free_port()), "--scoring", "fp8"])
    assert r.exit_code == 2 and "--scoring must be one of auto, exact, bf16" in r.output


# ---- ids, session limits and session keys ---------------------------------------------------------


def test_user_ids_with_slashes_and_reserved_characters(svc: TestClient) -> None:
    eng: Engine = svc.app.state.service.engine  # type: ignore[attr-defined]
    ids = ["a/b", "/lead", "tail/", "a b", "50%", "x?y#z", "ü/ß"]
    ev = [{"user": u, "item": eng.item_ids[1], "ts": 10.0} for u in ids]
    assert all(svc.post("/v1/events", json={"events": ev[i: i + 4]}).status_code == 200 for i in (0, 4))
    from urllib.parse import quote

    for u in ids:
        for url in (f"/v1/users/{quote(u, safe='')}", f"/v1/users/{quote(u, safe='/')}"):  # %2F or a plain /
            r = svc.get(url)
            assert r.status_code == 200 and r.json()["user"] == u and r.json()["online_events"] == 1, (u, url)
    r = svc.get("/v1/users/")
    assert r.status_code == 422 and "user id must have 1..256 characters" in r.json()["error"]
    assert "/v1/users/{user_id}" in svc.get("/openapi.json").json()["paths"]


def test_numeric_ids_are_their_text_and_never_merge(svc: TestClient) -> None:
    eng: Engine = svc.app.state.service.engine  # type: ignore[attr-defined]
    item = eng.item_ids[1]
    ev = [{"user": 7, "item": item, "ts": 10.0}, {"user": "007", "item": item, "ts": 10.0},
          {"user": "07", "item": item, "ts": 10.0}, {"user": 12345678901234567890123, "item": item, "ts": 10.0}]
    assert svc.post("/v1/events", json={"events": ev}).status_code == 200
    for u in ("7", "007", "07", "12345678901234567890123"):
        assert svc.get(f"/v1/users/{u}").json()["online_events"] == 1, u
    # a float or a boolean is not an id's text: refused, not re-typed
    for bad in (7.0, True, 1e3):
        r = svc.post("/v1/events", json={"events": [{"user": bad, "item": item, "ts": 11.0}]})
        assert r.status_code == 422 and "events.0.user" in r.json()["error"], bad
        r = svc.post("/v1/recommend", json={"user": "u1", "session": [bad]})
        assert r.status_code == 422 and "session.0" in r.json()["error"], bad
    r = svc.post("/v1/recommend", json={"user": 7, "session": [7, "007"], "k": 2, "ts": 10.0}).json()
    assert "7" in eng.item_index and "007" not in eng.item_index  # the item 7 is "7", not "007"
    assert r["user"] == "7" and r["unknown_items"] == ["007"] and r["session_length"] == 2


def test_session_limit_counts_stored_and_request_items(svc: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from hnvm.serve.asgi import FastRecommend as _FastRecommend

    eng: Engine = svc.app.state.service.engine  # type: ignore[attr-defined]
    items = items_of(eng, 4)
    before = _snapshot(svc)
    # u1 has 1 stored event (limit 4): 3 more in a request fit, 4 do not (before: accepted)
    assert svc.post("/v1/recommend", json={"user": "u1", "session": items[:3], "ts": 100.0}).status_code == 200
    for route in (False, True):  # the fast path and the FastAPI route answer alike
        if route:
            monkeypatch.setattr(_FastRecommend, "_query", lambda self, scope, body: None)
        r = svc.post("/v1/recommend", json={"user": "u1", "session": items, "ts": 100.0})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == ("session: 4 items plus the 1 events of user 'u1''s open session are 5, over the "
                                     "limit of 4 per session (stored and request items together)")
    # once the open session timed out it is not the current session any more
    late = svc.post("/v1/recommend", json={"user": "u1", "session": items, "ts": 100.0 + 10 * eng.gap_s})
    assert late.status_code == 200 and late.json()["session_length"] == 4
    assert _snapshot(svc) == before
    # stored events themselves stay within the limit (422 for a 5th)
    ev = [{"user": "u1", "item": i, "ts": 101.0} for i in items[:3]]
    assert svc.post("/v1/events", json={"events": ev}).status_code == 200
    r = svc.post("/v1/events", json={"events": [{"user": "u1", "item": items[0], "ts": 102.0}]})
    assert r.status_code == 422 and "exceed 4 events" in r.json()["error"]
    r = svc.post("/v1/recommend", json={"user": "u1", "session": items[:1], "ts": 102.0})
    assert r.status_code == 422 and "plus the 4 events" in r.json()["error"]


def test_session_limit_rechecked_when_the_pass_runs(run_dir: Path, tmp_path: Path) -> None:
    """Events applied between a request's check and its scoring pass: 422, not a 500 or an
    over-long session (the engine checks again)."""
    import asyncio

    from hnvm.online import QueryError
    from hnvm.serve.service import ServiceError

    svc = Service.open(run_dir, tmp_path / "ev.sqlite", limits=Limits(max_session_length=3))
    eng = svc.engine
    it = items_of(eng, 3)

    async def main() -> str:
        await svc.start()
        try:
            task = asyncio.create_task(svc.recommend(Query("racer", it[:2], 3, now=50.0)))
            await asyncio.sleep(0)  # the request passed its check and waits for its pass
            for n, item in enumerate(it[:2]):
                eng.apply(Event("racer", item, 40.0 + n))
            with pytest.raises(ServiceError) as exc:
                await task
            assert exc.value.status == 422
            return exc.value.message
        finally:
            await svc.stop()

    assert "plus the 2 events of user 'racer'" in asyncio.run(main())
    with pytest.raises(QueryError, match="over the limit of 3"):
        eng.recommend(Query("racer", it[:2], 3, now=50.0))


def test_keyed_sessions_are_one_run_of_a_key(svc: TestClient) -> None:
    eng: Engine = svc.app.state.service.engine  # type: ignore[attr-defined]
    it = items_of(eng, 3)

    def post(*events: tuple[str, str | None, float]) -> httpx.Response:
        return svc.post("/v1/events", json={"events": [{"user": u, "item": it[0], "ts": ts, "session": key}
                                                       for u, key, ts in events]})

    assert post(("k1", "A", 1), ("k1", "A", 2), ("k1", "B", 3)).status_code == 200
    state = svc.get("/v1/users/k1").json()
    assert state["history_sessions"] == 1 and state["session_key"] == "B"
    before = _snapshot(svc), svc.get("/v1/users/k1").json()
    # "A" again, after "B" closed it: prepare would merge the two runs into one session, serve
    # cannot reopen it: refused (before: silently a third session)
    r = post(("k1", "A", 4))
    assert r.status_code == 409 and "events[0]: session 'A' of user 'k1' was closed by a later session" in r.json()[
        "error"]
    # also inside one batch, and after an unkeyed event closed it
    r = post(("k2", "C", 1), ("k2", "D", 2), ("k2", "C", 3))
    assert r.status_code == 409 and "events[2]: session 'C'" in r.json()["error"]
    assert (_snapshot(svc), svc.get("/v1/users/k1").json()) == before  # nothing written or changed
    assert svc.get("/v1/users/k2").json()["online_events"] == 0
    assert post(("k3", "E", 1)).status_code == 200 and post(("k3", None, 2)).status_code == 200
    assert post(("k3", "E", 3)).status_code == 409
    # other users may use the same key; the open key goes on however late
    assert post(("k4", "A", 1), ("k1", "B", 10 + 100 * eng.gap_s)).status_code == 200
    assert svc.get("/v1/users/k1").json()["session_events"] == 2


def test_a_log_with_interleaved_keys_still_replays(run_dir: Path, tmp_path: Path) -> None:
    """Logs written before keys were checked may resume a key: the replay keeps them (as a new
    session) and the key stays closed afterwards."""
    db = tmp_path / "ev.sqlite"
    log = EventLog(db)
    eng = Engine.from_run(run_dir)
    log.append([Event("old", eng.item_ids[i], float(i), key) for i, key in ((1, "A"), (2, "B"), (3, "A"))])
    log.close()
    with client(run_dir, db) as c:
        d = c.get("/v1/users/old").json()
        assert d["history_sessions"] == 2 and d["session_key"] == "A" and d["online_events"] == 3
        r = c.post("/v1/events", json={"events": [{"user": "old", "item": eng.item_ids[1], "ts": 9, "session": "B"}]})
        assert r.status_code == 409


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port must be in 1..65535, got 70000"),
    (["--port", "-1"], "--port must be in 1..65535, got -1"),
    (["--port", "0"], "--port must be in 1..65535, got 0"),
    (["--port", "99999999999999999999999"], "--port must be in 1..65535"),
    (["--threads", "0"], "--threads must be in 1..1024, got 0"),
    (["--threads", "100000000000000000000"], "--threads must be in 1..1024"),
    (["--gap", "inf"], "--gap"),
    (["--gap", "nan"], "--gap"),
    (["--gap=-5m"], "--gap"),
    (["--gap", "soon"], "--gap"),
    (["--host", "bad\0host"], "--host/--port: cannot listen on"),
])
def test_serve_cli_bad_numbers_are_one_line_errors(run_dir: Path, tmp_path: Path, args: list[str],
                                                   message: str) -> None:
    from typer.testing import CliRunner

    from hnvm.cli import app

    r = CliRunner().invoke(app, ["serve", str(run_dir), "--db", str(tmp_path / "e.sqlite"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and r.output.strip().count("\n") == 0, r.output
    assert not (tmp_path / "e.sqlite").exists()


def test_json_bodies_with_a_byte_order_mark_are_read(svc: TestClient) -> None:
    eng: Engine = svc.app.state.service.engine  # type: ignore[attr-defined]
    body = json.dumps({"events": [{"user": "bom", "item": eng.item_ids[1], "ts": 5.0}]}).encode("utf-8-sig")
    assert svc.post("/v1/events", content=body, headers={"content-type": "application/json"}).status_code == 200
    body = json.dumps({"user": "bom", "k": 2, "ts": 5.0}).encode("utf-8-sig")
    r = svc.post("/v1/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["session_length"] == 1


def _files(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for r in roots for p in sorted(r.rglob("*"))}


def _serve_refused(args: list[str], *needles: str) -> None:
    from typer.testing import CliRunner

    from hnvm.cli import app

    r = CliRunner().invoke(app, ["serve", *args, "--port", str(_free_port())])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("error:") and r.output.strip().count("\n") == 0, r.output
    for n in needles:
        assert n in r.output, r.output


def test_serve_db_inside_a_run_or_dataset_or_not_an_event_log_is_refused_leaving_nothing(
        run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    cases = [(run_dir / "items.parquet", "inside the run directory"),
             (run_dir / "metrics.json", "inside the run directory"),  # a new file there too
             (run_dir / "logs" / "e.sqlite", "inside the run directory"),
             (data_dir / "events.parquet", "inside the dataset directory"),
             (data_dir / "e.sqlite", "inside the dataset directory"),
             (notes, "is not an SQLite event log"),
             (foreign, "SQLite database of something else"),
             (tmp_path / "new" / "deeper" / "e.sqlite" / "x.sqlite", "")]  # parent is a file: below
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "deeper").write_text("a file, not a folder\n")
    before = _files(run_dir, data_dir, tmp_path)
    for db, why in cases:
        _serve_refused([str(run_dir), "--db", str(db)], "--db", why)
        with pytest.raises(HnvmError, match="--db"):
            EventLog(db)
        with pytest.raises(HnvmError, match="--db"):
            Service.open(run_dir, db)
        assert _files(run_dir, data_dir, tmp_path) == before, db  # no .lock, no SQLite file, no folder
    # the normal restart: a new log elsewhere (its folder created), then reopened with its events
    db = tmp_path / "logs" / "ev.sqlite"
    log = EventLog(db)
    log.append([Event("u", "i", 1.0, None)])
    log.close()
    again = EventLog(db)
    assert again.count() == 1
    again.close()


def test_serve_damaged_gap_in_meta_json_names_the_file_not_the_flag(run_dir: Path, data_dir: Path,
                                                                     tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["prepare"] = {**(meta.get("prepare") or {}), "gap": [1]}
    (data / "meta.json").write_text(json.dumps(meta))
    db = tmp_path / "e.sqlite"
    _serve_refused([str(run_dir), "--data", str(data), "--db", str(db)], str(data / "meta.json"), "prepare.gap")
    assert not db.exists() and not (tmp_path / "e.sqlite.lock").exists()
    with pytest.raises(HnvmError, match=r"meta\.json: field prepare\.gap \[1\]"):
        Service.open(run_dir, db, data=data)
    assert not db.exists()


def test_event_timestamps_out_of_any_clock_are_refused(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "pop"
    train_run(data_dir, "pop", run)
    with client(run, tmp_path / "ev.sqlite") as c:
        eng: Engine = c.app.state.service.engine  # type: ignore[attr-defined]
        item = eng.item_ids[1]
        for ts, needle in [(1e30, "events.0.ts"), (-5e15, "events.0.ts"), (time.time() * 1000, "events.0.ts")]:
            r = c.post("/v1/events", json={"events": [{"user": "x2", "item": item, "ts": ts}]})
            assert r.status_code == 422 and needle in r.json()["error"], r.text
        assert c.get("/v1/users/x2").json()["online_events"] == 0  # nothing stored
        ok = c.post("/v1/events", json={"events": [{"user": "x2", "item": item, "ts": time.time()}]})
        assert ok.status_code == 200


# ---- warm-up: users' dataset contexts in fixed blocks ------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hnvm.online.contexts.BLOCK_USERS", 6)  # 40 users: several blocks


def test_block_states_equal_one_user_encoding(run_dir: Path, small_blocks: None) -> None:
    from hnvm.online.scorers import one_user_sessions as _pad

    eng = Engine.from_run(run_dir)
    ctx, seq = eng.contexts, eng.history
    assert ctx is not None and seq is not None and len(ctx.blocks) > 3 and not ctx.ready
    n_sessions = seq.user_end - seq.user_first
    order = np.concatenate(ctx.blocks)  # every user with sessions once, by number of sessions
    assert sorted(order.tolist()) == np.flatnonzero(n_sessions > 0).tolist()
    assert (np.diff(n_sessions[order]) >= 0).all()
    assert ctx.pending() == list(range(len(ctx.blocks)))[::-1]  # warmed: most sessions first
    assert ctx.cold(int(ctx.blocks[0][0])) == 0 and ctx.cold(0) is None  # (user 0: no sessions)
    for u in range(1, len(seq.user_end)):
        got = ctx.context(u)
        sessions = [seq.session(s) for s in range(int(seq.user_first[u]), int(seq.user_end[u]))]
        m = eng.model
        want = m.encode_history(torch.tensor([u]), _pad(sessions))  # type: ignore[attr-defined]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.abs().sum() > 0
        e = m.general_preference(torch.tensor([eng.model_uid[u]]))  # type: ignore[attr-defined]
        assert torch.equal(ctx.preference(u), e)  # type: ignore[arg-type]
        cond = m.session_condition(want, e)  # type: ignore[attr-defined]
        for a, b in zip(ctx.start(u), (cond, m.decoder_step(m.bos, None, cond)), strict=True):  # type: ignore
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ctx.ready and ctx.warm_users == ctx.total == len(order) and ctx.done.all()
    assert ctx.cold(int(ctx.blocks[0][0])) is None
    assert ctx.context(0).abs().sum() == 0  # no dataset user: the initial context


def test_user_state_does_not_depend_on_warm_up_or_request_order(run_dir: Path, small_blocks: None) -> None:
    """Warmed on another thread, or encoded block by block as requests come (in another order):
    bit-identical scores."""
    from concurrent.futures import ThreadPoolExecutor

    warm, lazy = Engine.from_run(run_dir), Engine.from_run(run_dir)
    assert warm.contexts is not None and lazy.contexts is not None
    with ThreadPoolExecutor(1) as pool:
        for b, states in zip(warm.contexts.pending(), pool.map(warm.contexts.encode_block, warm.contexts.pending()),
                             strict=True):
            warm.contexts.install(b, states)
    users = list(warm.user_index)
    queries = [Query(u, [], 10, False, 0.0) for u in users]
    got_lazy = [lazy.recommend(q) for q in reversed(queries)][::-1]
    assert lazy.contexts.ready  # every block was encoded on the requests' path
    got_warm = [warm.recommend(q) for q in queries]  # (one per pass: a pass's size may move last bits)
    assert [(r.items, r.scores) for r in got_warm] == [(r.items, r.scores) for r in got_lazy]
    assert set(warm.contexts.tables) == set(lazy.contexts.tables) == {"h_con", "cond", "h_bos", "e"}
    assert all(torch.equal(warm.contexts.tables[k], lazy.contexts.tables[k]) for k in warm.contexts.tables)


def test_saved_contexts_load_only_for_the_same_key(run_dir: Path, tmp_path: Path) -> None:
    eng = Engine.from_run(run_dir)
    ctx = eng.contexts
    assert ctx is not None
    for b in ctx.pending():
        ctx.install(b, ctx.encode_block(b))
    key = ctx.digest(eng.model.net.state_dict().values())  # type: ignore[attr-defined]
    path = tmp_path / "ctx.safetensors"
    ctx.save(path, key)
    fresh = Engine.from_run(run_dir).contexts
    assert fresh is not None and not fresh.load(path, "other key") and not fresh.ready
    assert fresh.load(path, key) and fresh.ready
    assert set(fresh.tables) == set(ctx.tables)
    for k in ctx.tables:
        torch.testing.assert_close(fresh.tables[k], ctx.tables[k], atol=1e-5, rtol=1e-5)
    assert ctx.digest(eng.model.net.state_dict().values(), "max_len=5") != key  # type: ignore[attr-defined]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:  # numbers changed under an intact header
        meta, tables = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file({k: v.fill_(0.5) for k, v in tables.items()}, str(path), metadata=meta)
    assert not Engine.from_run(run_dir).contexts.load(path, key)  # type: ignore[union-attr]

    save_file({k: v for k, v in ctx.tables.items() if k != "e"}, str(path),  # a table missing, right key
              metadata={"format": "hnvm-history-contexts/2", "key": key})
    assert not Engine.from_run(run_dir).contexts.load(path, key)  # type: ignore[union-attr]
    path.write_bytes(path.read_bytes()[:100])  # damaged: encoded afresh, never a crash
    assert not Engine.from_run(run_dir).contexts.load(path, key)  # type: ignore[union-attr]


def test_service_warms_in_the_background_and_reports_readiness(run_dir: Path, tmp_path: Path,
                                                               small_blocks: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the warm-up: /v1/ready 503, a request for a cold user waits for the warm-up thread
    to encode its block while the server answers others (same answer as after); after: ready,
    the states saved next to the log; a restart loads them, ready at once."""
    import threading

    from hnvm.online.contexts import HistoryContexts

    gate = threading.Event()
    encode = HistoryContexts.encode_block

    def gated(self: HistoryContexts, b: int) -> torch.Tensor:  # the warm-up waits for the gate
        if threading.current_thread().name.startswith("hnvm-warm"):
            gate.wait(30)
        return encode(self, b)

    monkeypatch.setattr(HistoryContexts, "encode_block", gated)
    db = tmp_path / "ev.sqlite"
    user = next(iter(Engine.from_run(run_dir).user_index))
    with client(run_dir, db) as c:
        h = c.get("/v1/health").json()
        assert not h["ready"] and h["warm_up"]["users"] == 0 and h["warm_up"]["total"] == 40
        assert c.get("/v1/ready").status_code == 503
        box: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: box.update(
            first=c.post("/v1/recommend", json={"user": user, "k": 5}).json()))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # waits for its block: the warm-up thread is held at the gate
        assert c.get("/v1/health").json()["warm_up"]["users"] == 0  # the loop answers, encodes nothing
        gate.set()
        waiter.join(30)
        first = box["first"]
        for _ in range(300):
            if (r := c.get("/v1/ready")).status_code == 200:
                break
            time.sleep(0.02)
        assert r.status_code == 200 and r.json()["warm_up"]["users"] == 40
        assert c.post("/v1/recommend", json={"user": user, "k": 5}).json() == first
        svc = c.app.state.service  # type: ignore[attr-defined]
        want = Engine.from_run(run_dir).contexts
        for b in want.pending():  # type: ignore[union-attr]
            want.install(b, want.encode_block(b))  # type: ignore[union-attr]
        got = svc.engine.contexts.tables  # type: ignore[union-attr]
        assert all(torch.equal(got[k], want.tables[k]) for k in got)  # type: ignore[union-attr]
    saved = Path(f"{db}-contexts.safetensors")
    assert saved.is_file()
    svc = Service.open(run_dir, db)
    try:
        assert svc.ready and svc.health()["warm_up"]["source"] == "file"
    finally:
        svc.engine.close()
        svc.log.close()


def test_a_failed_warm_up_is_reported_not_ready_and_requests_still_answered(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from hnvm.online.contexts import HistoryContexts

    encode = HistoryContexts.encode_block

    def failing(self: HistoryContexts, b: int) -> dict[str, torch.Tensor]:
        if threading.current_thread().name.startswith("hnvm-warm"):
            raise MemoryError("no room")
        return encode(self, b)

    monkeypatch.setattr(HistoryContexts, "encode_block", failing)
    user = next(iter(Engine.from_run(run_dir).user_index))
    with client(run_dir, tmp_path / "ev.sqlite") as c:
        for _ in range(200):
            if (h := c.get("/v1/health").json())["warm_up"]["error"]:
                break
            time.sleep(0.02)
        assert "MemoryError" in h["warm_up"]["error"] and not h["ready"]
        assert c.get("/v1/ready").status_code == 503
        assert c.post("/v1/recommend", json={"user": user, "k": 3}).status_code == 200
    assert not Path(f"{tmp_path / 'ev.sqlite'}-contexts.safetensors").exists()


def test_after_a_replay_the_users_with_events_are_advanced_before_ready(run_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "ev.sqlite"
    eng = Engine.from_run(run_dir)
    users = [*list(eng.user_index)[:3], "walk-in"]
    with client(run_dir, db) as c:
        ev = [{"user": u, "item": eng.item_ids[1 + i], "ts": 1e9 + i} for i, u in enumerate(users)]
        assert c.post("/v1/events", json={"events": ev}).status_code == 200
        before = [c.post("/v1/recommend", json={"user": u, "k": 5, "ts": 1e9 + 10}).json() for u in users]
    with client(run_dir, db) as c:
        for _ in range(300):
            if (h := c.get("/v1/health").json())["ready"]:
                break
            time.sleep(0.02)
        w = h["warm_up"]
        assert h["ready"] and w["replayed_total"] == len(users) == w["replayed_users"]
        svc = c.app.state.service  # type: ignore[attr-defined]
        assert all(svc.engine.users[u].cache is not None for u in users)  # built before any request
        assert [c.post("/v1/recommend", json={"user": u, "k": 5, "ts": 1e9 + 10}).json() for u in users] == before
