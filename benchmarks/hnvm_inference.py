"""HNVM's and STAMP's evaluation with their exact inference ways against the modules' way, in one
process.

    python benchmarks/hnvm_inference.py [--targets 3000] [--rounds 3] [--train-steps 3]

hnvm.models.gru_inference gives HNVM's scoring three ways to do less work with the same floats:
the encoder's input gates from a per-item table, the context GRU over occupied session slots
only, and the decoder alone over the scored session (no encoder pass, posterior or KL over it).
STAMP takes its attention input W_1 x from a per-item table of the same kind and skips masking
prefixes the mask does not change (hnvm.models.stamp). This script scores the first `--targets`
next-item test targets of the Instacart sample with a briefly trained HNVM (the paper's sizes
and the defaults) and STAMP, batch by batch alternating the two ways (every batch scored both
ways, in alternating order), asserts the scores `torch.equal` on every batch, and prints
next-item targets per second of each way (full ranking, conservative ties, as `hnvm evaluate`)
and their ratio, the median of `--rounds` rounds. The tables are built in the warm-up batch, as
an evaluation builds them once: their one product each ([n_items + 2, E] x [E, 3H], [n_items +
1, d] x [d, d]) is outside the timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_eval import first_test_batches, load_data, model_for, train_throughput

import hnvm.models.hnvm as hnvm_model
import hnvm.models.hnvm_net as hnvm_net
import hnvm.models.stamp as stamp
from hnvm.data.batches import Sequences
from hnvm.metrics import conservative_ranks
from hnvm.models.base import get_model_class


@contextmanager
def modules_way() -> Iterator[None]:
    """Every exact way declined: nn.GRU per event, every context slot, the whole forward; STAMP's
    W_1 over every masked prefix position."""
    saved = hnvm_net.applies, hnvm_net.context_after, hnvm_model.prior_states, stamp.applies
    hnvm_net.applies, hnvm_net.context_after, hnvm_model.prior_states, stamp.applies = (
        lambda x: False, lambda *a: None, lambda *a: None, lambda x: False)
    try:
        yield
    finally:
        hnvm_net.applies, hnvm_net.context_after, hnvm_model.prior_states, stamp.applies = saved


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=3000, help="next-item test targets per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3, help="training steps before scoring (weights off init)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    args = ap.parse_args(argv)
    get_model_class("pop")  # registers the built-in models
    ds = load_data("instacart", args.workdir)
    seq = Sequences.from_events(ds.events, ds.n_users)
    batches = first_test_batches(seq, args.targets)
    n = sum(b.n_targets for b in batches)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Instacart sample, {n:,} next-item targets "
          f"in {len(batches)} batches; scores with the exact ways against the modules' way")
    for name, paper in (("hnvm", True), ("hnvm", False), ("stamp", False)):
        torch.manual_seed(0)
        model = model_for(name, paper=paper)
        train_throughput(model, ds, args.train_steps)
        secs: dict[bool, list[float]] = {True: [], False: []}
        with torch.no_grad():
            for b in batches[:1]:  # warm-up: first-call set-up, the tables
                conservative_ranks(model.score(b), b.targets)  # type: ignore[attr-defined]
            for r in range(args.rounds):
                spent = {True: 0.0, False: 0.0}
                for i, b in enumerate(batches):
                    scores = {}
                    for exact in ((True, False) if (i + r) % 2 == 0 else (False, True)):
                        t0 = time.perf_counter()
                        if exact:
                            scores[exact] = model.score(b)  # type: ignore[attr-defined]
                        else:
                            with modules_way():
                                scores[exact] = model.score(b)  # type: ignore[attr-defined]
                        conservative_ranks(scores[exact], b.targets)
                        spent[exact] += time.perf_counter() - t0
                    if not torch.equal(scores[True], scores[False]):
                        raise SystemExit(f"scores differ on batch {i}")
                for way in spent:
                    secs[way].append(spent[way])
        ratio = statistics.median(m / e for m, e in zip(secs[False], secs[True], strict=True))
        label = "hnvm, paper sizes" if paper else "hnvm, defaults" if name == "hnvm" else name
        print(f"  {label:>17}: modules' way {n / statistics.median(secs[False]):>7,.0f} targets/s, exact ways "
              f"{n / statistics.median(secs[True]):>7,.0f} targets/s: x {ratio:.2f}; scores torch.equal on every batch")


if __name__ == "__main__":
    main()
