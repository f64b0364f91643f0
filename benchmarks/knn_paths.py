"""The kNN baselines' exact shortcuts, each timed against the long way in one process.

    python benchmarks/knn_paths.py                                  # all data sets below
    python benchmarks/knn_paths.py --datasets instacart --targets 3000

Both ways of each pair give the same floats (the script asserts torch.equal on every batch's
scores); what differs is the work:

  tifuknn  the distances to the training users from the batch queries' items, reaching only the
           users who hold them (taken when `SPARSE_CROSS` says so), against every training
           entry times the dense queries (SPARSE_CROSS = 0)
  sknn     V-SKNN's candidates from each query item's sample_size + 1 most recent sessions,
           against every session of each item

Next-item evaluation of the first --targets test targets (batches of 512, scores and the
conservative rank), the two ways alternating batch by batch (their order swapped every round),
--rounds rounds; targets/s of each and the ratio. Data sets: the Instacart sample, the synthetic
60,750-item set, 100,000 users of short histories and a heavy-head log (40,000 users over 600
items, Zipf 1.1: the popular items fill thousands of sessions each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hnvm.models.tifuknn as tifu
from hnvm.data.batches import Sequences
from hnvm.data.samples import synthetic_dataset
from hnvm.data.store import Dataset
from hnvm.metrics import conservative_ranks
from hnvm.models.base import get_model_class

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_eval import first_test_batches, load_data, model_for

DATASETS = ("instacart", "synthetic60k", "synthetic100kusers", "heavyhead")


def dataset(name: str, workdir: Path) -> Dataset:
    if name == "heavyhead":
        return synthetic_dataset(n_users=40_000, n_items=600, n_topics=20, seed=0, zipf=1.1, topic_stickiness=0.2)
    return load_data(name, workdir)


def tifu_ways(model: object) -> dict[str, Callable[[], None]]:
    model._sq_norms()  # type: ignore[attr-defined]  # (lazy caches: built before the timing, not in it)
    model._by_item()  # type: ignore[attr-defined]
    default = tifu.SPARSE_CROSS

    def every_entry() -> None:
        tifu.SPARSE_CROSS = 0.0

    def items() -> None:
        tifu.SPARSE_CROSS = default

    return {"every training entry": every_entry, "queries' items (rule)": items}


def tifu_rule(model: object, batches: list) -> str:
    """How many of the batches the rule sends the queries' items' way."""
    taken = sum(model._items_way(model._query(b.sessions[:, :-1])) for b in batches)  # type: ignore[attr-defined]
    return f"the rule takes the items' way in {taken} of {len(batches)} batches"


def sknn_ways(model: object) -> dict[str, Callable[[], None]]:
    recent = model._postings()  # type: ignore[attr-defined]
    everything = (model.item_ptr_, model.item_sessions_, recent[2])  # type: ignore[attr-defined]

    def all_postings() -> None:
        model._recent = everything  # type: ignore[attr-defined]

    def latest() -> None:
        model._recent = recent  # type: ignore[attr-defined]

    return {"all postings": all_postings, "latest sample_size + 1": latest}


def compare(name: str, ways: dict[str, Callable[[], None]], model: object, seq: Sequences, targets: int,
            rounds: int) -> None:
    batches = first_test_batches(seq, targets)
    seconds = dict.fromkeys(ways, 0.0)
    order = list(ways)
    with torch.no_grad():
        for way in order:  # (compiled loops and lazily built caches: before any timing)
            ways[way]()
            model.score(batches[0])  # type: ignore[attr-defined]
        for r in range(rounds):
            for b in batches:
                scores = []
                for way in (order if r % 2 == 0 else order[::-1]):
                    ways[way]()
                    t0 = time.perf_counter()
                    s = model.score(b)  # type: ignore[attr-defined]
                    conservative_ranks(s, b.targets)
                    seconds[way] += time.perf_counter() - t0
                    scores.append(s)
                assert torch.equal(scores[0], scores[1]), f"{name}: the two ways score differently"
    ways[order[-1]]()  # leave the model on its own rule
    n = rounds * sum(b.n_targets for b in batches)
    slow, fast = order
    print(f"{name:>9} | {slow}: {n / seconds[slow]:>8,.0f} targets/s | {fast}: {n / seconds[fast]:>8,.0f} "
          f"targets/s | x {seconds[slow] / seconds[fast]:.2f}", flush=True)
    if name == "tifuknn":
        print(f"{'':>9} | ({tifu_rule(model, batches)})", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated: {', '.join(DATASETS)}")
    ap.add_argument("--targets", type=int, default=3000, help="next-item test targets timed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench",
                    help="cache of prepared data")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    get_model_class("pop")  # registers the built-in models
    start = time.perf_counter()
    for dname in args.datasets.split(","):
        ds = dataset(dname, args.workdir)
        seq = Sequences.from_events(ds.events, ds.n_users)
        sessions = ds.split("train").get_column("session").n_unique()
        print(f"\n== {dname}: {ds.n_users:,} users, {ds.n_items:,} items, {sessions:,} training sessions")
        for mname, ways in (("tifuknn", tifu_ways), ("sknn", sknn_ways)):
            model = model_for(mname, paper=False)
            model.fit(ds)  # type: ignore[attr-defined]
            compare(mname, ways(model), model, seq, args.targets, args.rounds)
        del ds, seq
    print(f"\nknn_paths.py: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
