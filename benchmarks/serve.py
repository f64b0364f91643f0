"""Latency and throughput of `hnvm serve` on loopback: a real server process and a load generator.

    python benchmarks/serve.py                                   # Instacart sample + synthetic 60K items
    python benchmarks/serve.py --datasets instacart --recommend 20000 --seconds 30
    python benchmarks/serve.py --datasets dir:PATH --run RUN      # an existing run
    python benchmarks/serve.py --datasets instacart --startup ''  # without the 100K-user start-up

Per data set it starts `hnvm serve` (fresh SQLite event log, synchronous=FULL, one torch thread),
prints the time to listen and to be ready (`/v1/ready`: every user's dataset context encoded by
the background warm-up), waits for ready, and runs, each phase bounded by a request count and a
time limit:

  recommend, first     POST /v1/recommend, 50 concurrent, each user's first request after the
                       start, for users the load sends no events (their states are read
                       from the warm-up's tables)
  events, batch 100    POST /v1/events with 100 events each, 4 concurrent clients (durable:
                       the server answers after the fsync'd commit)
  events, batch 1      one event per POST, 50 concurrent clients (group commit at work)
  recommend, catch-up  each first request of the users who got the events (tens to hundreds
                       each, in one open session): a user never scored is not advanced as its
                       events come, so this request runs the decoder over all of them
  recommend, 1 client  POST /v1/recommend one at a time (the latency of a request alone)
  recommend            POST /v1/recommend, 50 concurrent, k = 10, users with open sessions
  recommend + session  the same with 3 extra session items in the request (3 more decoder steps)

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio (uvloop when present),
so that the client, which shares the machine's cores with the server, costs little CPU.
Then it restarts the server on the same log and prints its time to ready (the warm-up saved
the contexts next to the log; ready also waits for the users with replayed events to be
advanced through them). For the --startup data sets (default: a synthetic set of 100,000
users) it prints only the start-up times, fresh and restarted, and the first requests' latency
while a fresh server warms up (a request for a user whose block is cold waits for the warm-up
to encode that block next).

Latency = from writing a request to reading its whole response, at the client. The Instacart
model is trained for --epochs (default 1); the synthetic 60K-item model is initialised but
untrained (latency does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


# ---- data and runs --------------------------------------------------------------------------------


def make_run(name: str, workdir: Path, epochs: int) -> Path:
    """A run directory for `name` (instacart | synthetic60k | dir:PATH), made once in workdir."""
    from train_eval import load_data  # the same data sets as the train/eval benchmark

    from hnvm.data.store import Dataset
    from hnvm.runs import train_run

    run = workdir / f"run-{name.replace(':', '_').replace('/', '_')}"
    if (run / "model" / "model.json").exists():
        from hnvm.errors import HnvmError
        from hnvm.rundir import load_run

        try:  # a run made by another version of the code may not load: make it again
            load_run(run)
            return run
        except HnvmError as exc:
            print(f"  {run}: {exc}; making it again", flush=True)
    data = workdir / f"data-{name.replace(':', '_').replace('/', '_')}"
    if name.startswith("dir:"):
        data = Path(name[4:])
    elif not data.exists():
        ds = load_data(name, workdir)
        if ds.path is None:
            ds.save(data)
        else:
            data = ds.path
    if epochs > 0:
        train_run(data, "hnvm", run, overrides=[f"train.epochs={epochs}"], force=True)
    else:
        untrained_run(Dataset.load(data), data, run)
    return run


def untrained_run(ds: object, data: Path, run: Path) -> None:
    """A run directory with an initialised, untrained HNVM (default config)."""
    import torch

    from hnvm.atomic import atomic_json
    from hnvm.config import as_dict
    from hnvm.models.hnvm import HNVM
    from hnvm.rundir import RUN_FORMAT, RUN_VERSION, vocab_digest
    from hnvm.training import TrainConfig

    torch.manual_seed(0)
    m = HNVM()
    m.net = m._build(ds.n_items, ds.n_users)  # type: ignore[attr-defined]
    m.counts_ = torch.zeros(ds.n_items + 1)  # type: ignore[attr-defined]
    run.mkdir(parents=True, exist_ok=True)
    atomic_json(run / "config.json", {
        "format": RUN_FORMAT, "format_version": RUN_VERSION, "model": "hnvm", "model_config": as_dict(m.config),
        "train": as_dict(TrainConfig(epochs=1)), "untrained": True,
        "dataset": {"path": str(data.resolve()), "vocab_sha256": vocab_digest(ds), "stats": {}}})
    ds.items.write_parquet(run / "items.parquet")  # type: ignore[attr-defined]
    ds.users.write_parquet(run / "users.parquet")  # type: ignore[attr-defined]
    m.save(run / "model")


# ---- a small HTTP/1.1 client ----------------------------------------------------------------------


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def open(self) -> Conn:
        self.r, self.w = await asyncio.open_connection(self.host, self.port)
        sock = self.w.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.r is not None and self.w is not None
        self.w.write(b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                     % (path.encode(), self.host.encode(), len(body)) + body)
        status = int((await self.r.readline()).split()[1])
        length = 0
        while (line := await self.r.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.r.readexactly(length)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


async def load(host: str, port: int, path: str, bodies: list[bytes], concurrency: int,
               seconds: float) -> dict[str, float]:
    """Send `bodies` over `concurrency` keep-alive connections (closed loop: each connection
    sends its next request when the previous answer is in), stop early after `seconds`."""
    conns = [await Conn(host, port).open() for _ in range(concurrency)]
    lat: list[float] = []
    errors = 0
    queue = list(reversed(bodies))  # per-connection order is preserved: requests are popped in turn
    deadline = time.perf_counter() + seconds

    async def worker(c: Conn, mine: list[bytes]) -> None:
        nonlocal errors
        for body in mine:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            status, resp = await c.post(path, body)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1
                if errors <= 3:
                    print(f"  {path}: HTTP {status}: {resp[:200]!r}", file=sys.stderr)

    # connection i gets requests i, i + C, ...: bodies of one user can be pinned to one connection
    shares = [queue[::-1][i::concurrency] for i in range(concurrency)]
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c, s) for c, s in zip(conns, shares, strict=True)))
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    ms = np.array(lat) * 1000
    return {"n": len(lat), "errors": errors, "seconds": wall, "rps": len(lat) / wall,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


# ---- the benchmark --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, db: Path, port: int, threads: int = 1, scoring: str = "auto") -> subprocess.Popen:
    """`scoring`: an `hnvm serve --scoring` value, optionally with ":process" or ":inline"
    (--rank-process / --no-rank-process; default: the server's choice)."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.Popen([sys.executable, "-m", "hnvm", "serve", str(run), "--port", str(port), "--db", str(db),
                          "--threads", str(threads), "--scoring", scoring.split(":")[0],
                          *{"process": ["--rank-process"], "inline": ["--no-rank-process"]}.get(
                              scoring.partition(":")[2], [])],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        if p.poll() is not None:
            raise SystemExit(f"hnvm serve exited: {p.stderr.read().decode() if p.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return p
        except httpx.TransportError:
            time.sleep(0.2)
    p.kill()
    raise SystemExit("server did not start in 2 min")


def wait_ready(port: int, t0: float, limit_s: float = 1800) -> tuple[float, dict]:
    """Seconds from `t0` until GET /v1/ready answers 200, and /v1/health then."""
    import httpx

    while time.perf_counter() - t0 < limit_s:
        if httpx.get(f"http://127.0.0.1:{port}/v1/ready", timeout=10).status_code == 200:
            return time.perf_counter() - t0, httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10).json()
        time.sleep(0.05)
    raise SystemExit(f"server not ready in {limit_s:.0f} s")


def start_timed(label: str, run: Path, db: Path, port: int, threads: int, scoring: str = "auto"
                ) -> subprocess.Popen:
    """Start a server, print its times to listening and to ready, return it once ready."""
    t0 = time.perf_counter()
    server = start_server(run, db, port, threads, scoring)
    listening = time.perf_counter() - t0
    ready, h = wait_ready(port, t0)
    w = h["warm_up"]
    how = {"file": "loaded from the saved warm-up", "encoded": f"warm-up {w['seconds']:.1f}s",
           "none": "nothing to warm"}[w["source"]]
    print(f"  {label:<20} listening after {listening:5.1f}s, ready after {ready:5.1f}s ({w['total']:,} users' "
          f"contexts, {how}; {h['replayed_at_start']:,} events replayed, {w['replayed_total']:,} users with "
          "events advanced)", flush=True)
    return server


def startup(name: str, run: Path, args: argparse.Namespace) -> None:
    """Start-up to ready on a fresh event log, then a restart on it; then a fresh start with
    first requests (random users, 50 clients) while it warms up."""
    import polars as pl

    with tempfile.TemporaryDirectory() as tmp:
        for label in ("start-up", "restart"):
            server = start_timed(label, run, Path(tmp) / "events.sqlite", free_port(), args.threads)
            server.terminate()
            server.wait(30)
    import httpx

    users = pl.read_parquet(run / "users.parquet").get_column("id").to_list()
    bodies = [json.dumps({"user": u, "k": 10}).encode() for u in random.Random(1).sample(users, min(len(users), 5000))]
    with tempfile.TemporaryDirectory() as tmp:
        port, t0 = free_port(), time.perf_counter()
        server = start_server(run, Path(tmp) / "events.sqlite", port, args.threads)
        r = asyncio.run(load("127.0.0.1", port, "/v1/recommend", bodies, 50, min(args.seconds, 10)))
        w = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10).json()["warm_up"]
        ready, _ = wait_ready(port, t0)
        print(f"  {'during warm-up':<20} {r['n']:>6} first requests, {r['rps']:,.0f}/s  p50 {r['p50']:6.2f}  "
              f"p99 {r['p99']:7.2f} ms (50 clients; {w['users']:,} of {w['total']:,} users warm after it); "
              f"ready after {ready:.1f}s", flush=True)
        server.terminate()
        server.wait(30)


def bench(name: str, run: Path, args: argparse.Namespace, scoring: str = "auto"
          ) -> list[tuple[str, int, dict[str, float], float]]:
    import httpx
    import polars as pl

    users = pl.read_parquet(run / "users.parquet").get_column("id").to_list()
    items = pl.read_parquet(run / "items.parquet").get_column("id").to_list()
    rng = random.Random(0)
    # half the users at most get the load's events; the others are the fresh users of "recommend, first"
    shuffled = rng.sample(users, len(users))
    pool = shuffled[: min(len(users) // 2, args.users)]
    fresh = shuffled[len(pool):][: args.users]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_timed("start-up", run, Path(tmp) / "events.sqlite", port, args.threads, scoring)
        proc = psutil.Process(server.pid)
        host = "127.0.0.1"
        rows = []

        def counters() -> dict[str, int]:
            return httpx.get(f"http://{host}:{port}/v1/health", timeout=10).json()

        health = counters()
        print(f"  scoring: {health['scoring']}, ranking {'in a process' if health['rank_process'] else 'in-process'} "
              f"(--scoring {scoring})", flush=True)

        def phase(label: str, path: str, bodies: list[bytes], conc: int, per_request: int = 1) -> None:
            me = psutil.Process()
            kids = proc.children()  # the ranking process, if any

            def kid_cpu() -> float:
                return sum(sum(k.cpu_times()[:2]) for k in kids)

            cpu0, mine0, kid0, c0 = sum(proc.cpu_times()[:2]), sum(me.cpu_times()[:2]), kid_cpu(), counters()
            r = asyncio.run(load(host, port, path, bodies, conc, args.seconds))
            cpu, c1 = sum(proc.cpu_times()[:2]) - cpu0, counters()
            mine, kid = sum(me.cpu_times()[:2]) - mine0, kid_cpu() - kid0
            r["per"] = per_request
            rows.append((label, conc, r, cpu))
            if path.endswith("events"):
                group = (c1["event_posts"] - c0["event_posts"]) / max(c1["event_commits"] - c0["event_commits"], 1)
                extra = f"{group:.1f} POSTs/commit"
            else:
                group = (c1["recommend_requests"] - c0["recommend_requests"]) / max(
                    c1["recommend_passes"] - c0["recommend_passes"], 1)
                extra = f"{group:.1f} requests/pass"
            ranking = f" + ranking process {kid / max(r['seconds'], 1e-9):.0%}" if kids else ""
            print(f"  {label:<20} {r['n']:>6} req  {r['rps'] * per_request:>8,.0f}/s  p50 {r['p50']:6.2f}  "
                  f"p95 {r['p95']:6.2f}  p99 {r['p99']:6.2f} ms  server CPU {cpu / max(r['seconds'], 1e-9):.0%} "
                  f"({cpu / max(r['n'], 1) * 1000:.2f} ms/req){ranking}, client {mine / max(r['seconds'], 1e-9):.0%}  "
                  f"{extra}  errors {r['errors']}", flush=True)

        try:
            first = [json.dumps({"user": u, "k": 10}).encode() for u in fresh]
            phase("recommend, first", "/v1/recommend", first, 50)
            t = time.time()
            # events: each connection owns a slice of the users, so that per-user time order holds
            n_batches, conc = args.events // 100, 4
            bodies = []
            for b in range(n_batches):
                c = b % conc
                owned = pool[c::conc]
                ev = [{"user": rng.choice(owned), "item": rng.choice(items), "ts": t + b * 1e-3 + i * 1e-6}
                      for i in range(100)]
                bodies.append(json.dumps({"events": ev}).encode())
            phase("events, batch 100", "/v1/events", bodies, conc, per_request=100)
            t = time.time()
            conc = 50
            bodies = [json.dumps({"events": [{"user": pool[i % len(pool)] if len(pool) >= conc else f"e{i % conc}",
                                              "item": rng.choice(items), "ts": t + i * 1e-6}]}).encode()
                      for i in range(args.single_events)]
            phase("events, batch 1", "/v1/events", bodies, conc)
            phase("recommend, catch-up", "/v1/recommend", [json.dumps({"user": u, "k": 10}).encode() for u in pool], 50)
            bodies = [json.dumps({"user": rng.choice(pool), "k": 10}).encode() for _ in range(args.recommend)]
            phase("recommend, 1 client", "/v1/recommend", bodies[: args.recommend // 5], 1)
            phase("recommend", "/v1/recommend", bodies, 50)
            bodies = [json.dumps({"user": rng.choice(pool), "k": 10, "session": rng.sample(items, 3)}).encode()
                      for _ in range(args.recommend // 2)]
            phase("recommend + session", "/v1/recommend", bodies, 50)
        finally:
            server.terminate()
            server.wait(30)
        server = start_timed("restart", run, Path(tmp) / "events.sqlite", port, args.threads, scoring)
        server.terminate()
        server.wait(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="instacart,synthetic60k")
    ap.add_argument("--startup", default=None, help="data sets whose start-up to ready is measured alone "
                    "(fresh, restarted, and with first requests during the warm-up; untrained model); '' for "
                    "none (default: synthetic100kusers, none with --run)")
    ap.add_argument("--run", type=Path, help="serve this run (with one data set) instead of making one")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench-serve")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: 1 for instacart, "
                    "0 = untrained for the others)")
    ap.add_argument("--users", type=int, default=2000, help="distinct users in the load")
    ap.add_argument("--events", type=int, default=100_000, help="events in batches of 100")
    ap.add_argument("--single-events", type=int, default=5000, help="one-event POSTs")
    ap.add_argument("--recommend", type=int, default=10_000, help="recommend requests")
    ap.add_argument("--seconds", type=float, default=30.0, help="time limit per phase")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (scoring)")
    ap.add_argument("--scoring", default="auto", help="hnvm serve --scoring, optionally with :process or "
                    ":inline (--rank-process / --no-rank-process); a list (e.g. exact:inline,bf16:process) "
                    "benchmarks each in turn on the same run and prints the ratios against the first")
    args = ap.parse_args()
    import polars as pl

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; server: 1 process, "
          f"{args.threads} torch thread(s); client: asyncio{' + uvloop' if _uvloop() else ''}, same machine",
          flush=True)
    for name in filter(None, args.datasets.split(",")):
        t0 = time.perf_counter()
        epochs = args.epochs if args.epochs is not None else (1 if name == "instacart" else 0)
        run = args.run or make_run(name, args.workdir, epochs)
        n_items = pl.read_parquet(run / "items.parquet").height
        print(f"\n{name}: {n_items:,} items, run {run} ({'trained' if epochs else 'untrained'}; ready in "
              f"{time.perf_counter() - t0:.0f}s)", flush=True)
        results = {sc: bench(name, run, args, sc) for sc in args.scoring.split(",")}
        if len(results) > 1:
            (ref, ref_rows), *others = results.items()
            for sc, rows in others:
                for (label, _, r, _), (_, _, r0, _) in zip(rows, ref_rows, strict=True):
                    if label.startswith("recommend"):
                        print(f"  {sc} vs {ref}, {label:<20} throughput x{r['rps'] / r0['rps']:.2f}  "
                              f"p99 {r['p99']:.2f} vs {r0['p99']:.2f} ms", flush=True)


    startup_sets = args.startup if args.startup is not None else "" if args.run else "synthetic100kusers"
    for name in filter(None, startup_sets.split(",")):
        run = make_run(name, args.workdir, 0)
        users = pl.read_parquet(run / "users.parquet").height
        print(f"\n{name}: {users:,} users, run {run} (untrained), start-up only", flush=True)
        startup(name, run, args)


def _uvloop() -> bool:
    try:
        import uvloop

        uvloop.install()
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
