"""What HNVM's repeat channel costs: training and evaluation throughput with and without it,
measured in one process on the same batches, runs alternating (off, on, off, on, ...).

    python benchmarks/repeat_cost.py                          # Instacart sample + synthetic 60K items
    python benchmarks/repeat_cost.py --datasets instacart --rounds 3 --config paper

Training: target items/s of forward + backward + optimizer step (`train_eval.train_throughput`,
Adam as in the demo config); evaluation: next-item targets/s of `score` + the conservative
rank over the full catalogue. Prints each round and the median ratio on/off.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_eval import first_test_batches, load_data, train_throughput

from hnvm.config import build, load_toml
from hnvm.data.batches import Sequences
from hnvm.metrics import conservative_ranks
from hnvm.models.hnvm import HNVM, HNVMConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"demo": ROOT / "src/hnvm/demo_configs/hnvm.toml", "paper": ROOT / "src/hnvm/paper_configs/hnvm.toml"}


def eval_throughput(model: HNVM, batches: list) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            conservative_ranks(model.score(b), b.targets)
    return sum(b.n_targets for b in batches) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="instacart,synthetic60k")
    ap.add_argument("--config", default="demo", choices=sorted(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-targets", type=int, default=3000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = build(HNVMConfig, load_toml(CONFIGS[args.config])["model"], "model")
    optimizer = "adam" if args.config == "demo" else "adagrad"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, HNVM {args.config} config "
          f"({CONFIGS[args.config].relative_to(ROOT)}), {optimizer}")
    for dname in args.datasets.split(","):
        ds = load_data(dname, args.workdir)
        seq = Sequences.from_events(ds.events, ds.n_users)
        batches = first_test_batches(seq, args.eval_targets)
        print(f"\n== {dname}: {ds.n_users:,} users, {ds.n_items:,} items")
        ratios: dict[str, list[float]] = {"train": [], "eval": []}
        for r in range(args.rounds):
            got = {}
            for repeat in (False, True):
                torch.manual_seed(r)
                model = HNVM(dataclasses.replace(base, repeat=repeat))
                tr = train_throughput(model, ds, args.steps, optimizer=optimizer)
                assert tr is not None
                model.counts_ = tr[2].model.counts_
                got[repeat] = (tr[0], eval_throughput(model, batches))
            for i, what in enumerate(("train", "eval")):
                ratios[what].append(got[True][i] / got[False][i])
            print(f"round {r + 1}: train {got[False][0]:,.0f} -> {got[True][0]:,.0f} targets/s, "
                  f"eval {got[False][1]:,.0f} -> {got[True][1]:,.0f} targets/s")
        print(f"median ratio repeat on / off: train {statistics.median(ratios['train']):.2f}, "
              f"eval {statistics.median(ratios['eval']):.2f}")


if __name__ == "__main__":
    main()
