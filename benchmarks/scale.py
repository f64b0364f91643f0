"""How HNVM's costs grow with the catalogue and with the number of users.

    python benchmarks/scale.py                          # items 10K, 100K, 1M; users 10K, 100K
    python benchmarks/scale.py --items 10000,1000000 --users 10000 --dense   # dense updates

Each point (n_items, n_users) runs in its own subprocess, so that its peak RSS (ru_maxrss) is
its own: a synthetic data set where every item of the catalogue occurs in training (so the
model's tables have n_items rows), the network, `--steps` training steps (forward, backward,
optimizer step; sampled loss, sparse item/user updates unless --dense) and full-ranking
evaluation of `--eval-targets` test targets in bounded chunks (evaluate.MAX_SCORES). It prints,
per point: peak RSS after building the data, after training and after evaluation, the size of
the parameters and of the optimizer state, training targets/s and evaluation targets/s.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from itertools import islice

import numpy as np
import polars as pl
import torch

SESSION_LEN = 6  # items per session
MIN_SESSIONS = 5  # per user: 3+ train, 1 valid, 1 test (the user-last split)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_dataset(n_items: int, n_users: int, seed: int = 0):  # -> Dataset
    """Users with equal-length sessions one day apart; the train sessions hold every item once
    (shuffled), the remaining events follow a Zipf(0.8) popularity. No sequential signal: this
    measures cost, not accuracy."""
    from hnvm.data.prepare import PrepareConfig, build_dataset

    rng = np.random.default_rng(seed)
    train_sessions = max(MIN_SESSIONS - 2, math.ceil(1.05 * n_items / (n_users * SESSION_LEN)))
    per_user = train_sessions + 2
    n_events = n_users * per_user * SESSION_LEN
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=n_events, p=pop / pop.sum()) + 1
    pos_in_user = np.arange(n_events) % (per_user * SESSION_LEN)
    train_slots = np.flatnonzero(pos_in_user < train_sessions * SESSION_LEN)
    items[rng.choice(train_slots, size=n_items, replace=False)] = rng.permutation(n_items) + 1
    user = np.arange(n_events) // (per_user * SESSION_LEN) + 1
    session = pos_in_user // SESSION_LEN
    ts = session * 86_400 + (pos_in_user % SESSION_LEN) * 60
    raw = pl.DataFrame({"user": user.astype(str), "item": items.astype(str), "ts": ts.astype(np.int64),
                        "seq": np.zeros(n_events, dtype=np.int64),
                        "line": np.arange(1, n_events + 1, dtype=np.uint32)})
    return build_dataset(raw, PrepareConfig(min_item_support=1), source={"scale": [n_items, n_users]})


def point(n_items: int, n_users: int, steps: int, eval_targets: int, dense: bool) -> dict:
    """One measurement, in this process."""
    from hnvm.data.batches import Sequences, next_item_batches
    from hnvm.evaluate import MAX_SCORES
    from hnvm.metrics import conservative_ranks
    from hnvm.models.hnvm import HNVM, HNVMConfig
    from hnvm.training import TrainConfig, make_optimizer

    torch.manual_seed(0)
    t0 = time.perf_counter()
    ds = scale_dataset(n_items, n_users)
    seq = Sequences.from_events(ds.events, ds.n_users)
    data_s = time.perf_counter() - t0
    rss_data = rss_mib()
    cfg = HNVMConfig(batch_size=32, window=4, n_negatives=1024, sparse=not dense)  # H = 100
    model = HNVM(cfg)
    trainable = model.trainable(ds, seq, TrainConfig())
    opt = make_optimizer(trainable.module, TrainConfig(optimizer="adam"))
    n_targets, elapsed = 0, 0.0
    # a step is one batch; cycle over epochs when the data holds fewer than `steps` batches
    batches = (b for e in range(10**6) for b in trainable.train_batches(e, np.random.default_rng(e)))
    for i, batch in enumerate(islice(batches, steps + 1)):
        s0 = time.perf_counter()
        loss = trainable.loss(batch, i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:  # the first step pays one-off allocations
            elapsed += time.perf_counter() - s0
            n_targets += batch.n_targets
    rss_train = rss_mib()
    params = sum(p.numel() * p.element_size() for p in trainable.module.parameters())
    opt_state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if torch.is_tensor(v))
    model.net.eval()
    rows = max(1, min(512, MAX_SCORES // (ds.n_items + 1)))  # what evaluate() uses
    n_eval, e0 = 0, time.perf_counter()
    with torch.no_grad():
        for b in next_item_batches(seq, "test", max_targets=rows):
            conservative_ranks(model.score(b), b.targets)
            n_eval += b.n_targets
            if n_eval >= eval_targets:
                break
    eval_s = time.perf_counter() - e0
    return {
        "items": ds.n_items, "users": ds.n_users, "train_events": ds.meta["stats"]["train_events"],
        "sparse": not dense, "data_s": round(data_s, 1),
        "rss_data_mib": round(rss_data), "rss_train_mib": round(rss_train), "rss_eval_mib": round(rss_mib()),
        "params_mib": round(params / 2**20), "opt_state_mib": round(opt_state / 2**20),
        "train_targets_per_s": round(n_targets / max(elapsed, 1e-9)), "train_steps": steps,
        "eval_targets_per_s": round(n_eval / max(eval_s, 1e-9)), "eval_targets": n_eval, "eval_rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="10000,100000,1000000", help="catalogue sizes (at the first --users)")
    ap.add_argument("--users", default="10000,100000", help="user counts (at the middle --items)")
    ap.add_argument("--steps", type=int, default=200, help="training steps timed per point")
    ap.add_argument("--eval-targets", type=int, default=500)
    ap.add_argument("--dense", action="store_true", help="dense item/user-table updates (model.sparse = false)")
    ap.add_argument("--point", nargs=2, type=int, metavar=("ITEMS", "USERS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(point(*args.point, args.steps, args.eval_targets, args.dense)))
        return
    items = [int(x) for x in args.items.split(",")]
    users = [int(x) for x in args.users.split(",")]
    grid = [(n, users[0]) for n in items] + [(items[len(items) // 2], u) for u in users[1:]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); HNVM defaults (H = 100), "
          f"32 windows of <= 4 sessions of {SESSION_LEN} items, 1,024 sampled negatives, Adam, "
          f"{'dense' if args.dense else 'sparse'} item/user updates; {args.steps} steps per point")
    head = (f"{'items':>9} {'users':>8} {'events':>10} | {'RSS data':>8} {'train':>7} {'eval':>7} MiB | "
            f"{'params':>6} {'opt':>6} MiB | {'train tgt/s':>11} {'eval tgt/s':>10}")
    print(head)
    print("-" * len(head))
    for n_items, n_users in grid:
        cmd = [sys.executable, __file__, "--point", str(n_items), str(n_users), "--steps", str(args.steps),
               "--eval-targets", str(args.eval_targets), *(["--dense"] if args.dense else [])]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{n_items:>9,} {n_users:>8,}  failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{r['items']:>9,} {r['users']:>8,} {r['train_events']:>10,} | {r['rss_data_mib']:>8,} "
              f"{r['rss_train_mib']:>7,} {r['rss_eval_mib']:>7,}     | {r['params_mib']:>6,} "
              f"{r['opt_state_mib']:>6,}     | {r['train_targets_per_s']:>11,} {r['eval_targets_per_s']:>10,}",
              flush=True)


if __name__ == "__main__":
    main()
