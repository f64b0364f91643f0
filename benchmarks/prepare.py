"""Benchmark `hnvm.data.prepare.prepare` on a large synthetic log (prints figures, asserts nothing).

    python benchmarks/prepare.py                    # ~30M events: 1M users, 100K items
    python benchmarks/prepare.py --users 100000     # a quick run (~3M events)
    python benchmarks/prepare.py --csv              # the CSV input path as well

The log is written once per parameter set under --workdir (default: a directory in the
system temp dir) and reused. Each prepare runs in a fresh spawned child process, so the
peak RSS reported is that of prepare alone, not of generating the log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

COLUMNS = {"user": "user_id", "item": "item_id", "time": "timestamp"}


def _params(users: int, items: int, seed: int) -> dict[str, Any]:
    # sessions_per_user (3, 12) and session_length (2, 6) average 7.5 x 4 = 30 events per user.
    return {
        "n_users": users,
        "n_items": items,
        "sessions_per_user": (3, 12),
        "session_length": (2, 6),
        "seed": seed,
    }


def _log_file(workdir: Path, params: dict[str, Any], fmt: str) -> tuple[Path, int]:
    """The synthetic log for `params` in `fmt`, generated unless already present."""
    from hnvm.data.samples import write_synthetic

    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = workdir / f"synthetic-{key}.{fmt}"
    info = path.with_suffix(path.suffix + ".json")
    if path.exists() and info.exists():
        recorded = json.loads(info.read_text())
        if recorded.get("params") == json.loads(json.dumps(params)):
            return path, int(recorded["events"])
    t0 = time.perf_counter()
    n = write_synthetic(path, fmt=fmt, **params)  # type: ignore[arg-type]
    info.write_text(json.dumps({"params": params, "events": n}))
    print(f"generated {n:,} events -> {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path, n


def _child(path: str, out: str, verbose: bool, conn: Any) -> None:
    """Runs in a spawned process: one prepare, timed, then this process's peak RSS."""
    from hnvm.data.prepare import prepare

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    t0 = time.perf_counter()
    ds = prepare(path, out, columns=COLUMNS, force=True)
    wall = time.perf_counter() - t0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    conn.send({"wall": wall, "rss_kib": rss_kib, "rows": ds.meta["source"]["rows"],
               "stats": ds.meta["stats"]})
    conn.close()


def _run(path: Path, out: Path, verbose: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(path), str(out), verbose, send))
    proc.start()
    send.close()
    result = recv.recv() if recv.poll(None) else None
    proc.join()
    if proc.exitcode != 0 or result is None:
        raise SystemExit(f"prepare failed in the child process (exit {proc.exitcode})")
    # Cross-check: the largest RSS among waited-for children (this one is the largest so far).
    result["children_rss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000, help="users (default 1M: ~30M events)")
    ap.add_argument("--items", type=int, default=100_000, help="items (default 100K)")
    ap.add_argument("--events-scale", type=float, default=1.0,
                    help="scale users (hence events) by this factor, e.g. 0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where logs are kept and reused (default: <tmp>/hnvm-bench)")
    ap.add_argument("--csv", action="store_true", help="also benchmark the CSV input path")
    ap.add_argument("--verbose", action="store_true", help="show prepare's log (in the child)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    users = max(1, round(args.users * args.events_scale))
    workdir = args.workdir or Path(tempfile.gettempdir()) / "hnvm-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    params = _params(users, args.items, args.seed)

    fmts = ["parquet", "csv"] if args.csv else ["parquet"]
    print(f"synthetic log: {users:,} users, {args.items:,} items, "
          f"sessions/user {params['sessions_per_user']}, length {params['session_length']}")
    for fmt in fmts:
        path, _ = _log_file(workdir, params, fmt)
        r = _run(path, workdir / f"out-{fmt}", args.verbose)
        s = r["stats"]
        print(
            f"[{fmt}] events {r['rows']:,} | prepare {r['wall']:.1f} s | "
            f"{r['rows'] / r['wall']:,.0f} events/s | peak RSS {r['rss_kib'] / 2**20:.2f} GiB "
            f"(children max {r['children_rss_kib'] / 2**20:.2f} GiB) | input "
            f"{path.stat().st_size / 2**20:,.0f} MiB",
            flush=True,
        )
        print(f"[{fmt}] kept: {s['events']:,} events, {s['users']:,} users, {s['items']:,} items, "
              f"{s['sessions']:,} sessions; test targets {s['test_next_item_targets']:,}",
              flush=True)


if __name__ == "__main__":
    main()
