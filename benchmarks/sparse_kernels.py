"""GRU4Rec's training steps with its compiled loops against the torch operations they replace, in
one run (hnvm.training.sparse_kernels: the per-row sums of a lookup's gradient and
AdagradMomentum's update of those rows; hnvm.models.loss_kernels: the BPR-max gradient).

    python benchmarks/sparse_kernels.py [--losses bpr-max,cross-entropy] [--steps 1600] [--threads 1] [--loops NAMES]

One GRU4Rec per loss with the reference settings of benchmarks/gru4rec_reference.py (docs/design.md,
"Reference figures") on the Instacart sample trains `--steps` steps; the steps alternate between
the two ways (even steps the torch operations, odd steps the compiled loops), so both see the
same batches, weights and machine load. The two ways give the same floats, so the run follows
one trajectory; a second pass of `--check` steps, each way alone from the same seed, confirms
that the weights end equal. Prints mean and median milliseconds per step (forward, backward,
optimizer step) for each way and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gru4rec_reference import SETTINGS, load_dataset, our_config

import hnvm.models.loss_kernels as loss_kernels
import hnvm.training.sparse_kernels as kernels
from hnvm.data.batches import Sequences
from hnvm.data.store import Dataset
from hnvm.models.gru4rec import GRU4Rec
from hnvm.training import TrainConfig
from hnvm.training.optim import make_optimizer

LOOPS = ((kernels, "adagrad_momentum_rows", False), (kernels, "coalesce_rows", None),
         (loss_kernels, "bpr_max_gradient", False))  # (module, loop, what it returns when it declines)
COMPILED = {name: getattr(module, name) for module, name, _ in LOOPS}


TOGGLED = set(COMPILED)  # the loops `use` switches (--loops); the others stay compiled


def use(compiled: bool, opt: torch.optim.Optimizer | None = None) -> None:
    """The compiled loops (True) or the torch operations (each loop of TOGGLED declines: False)."""
    for module, name, declined in LOOPS:
        off = not compiled and name in TOGGLED
        setattr(module, name, (lambda *a, _d=declined: _d) if off else COMPILED[name])


def steps(ds: Dataset, seq: Sequences, loss: str, n: int, ways: tuple[bool, ...],
          switch: Callable[[bool, torch.optim.Optimizer], None] = use
          ) -> tuple[dict[bool, list[float]], dict[str, torch.Tensor]]:
    """n training steps from seed 0, step i the way ways[i % len(ways)] (`switch(way, optimizer)`
    sets it): seconds per step by way (after 10 warm-up steps) and the final weights."""
    cfg, train = our_config(SETTINGS[loss])
    tc = TrainConfig(seed=0, **train)
    torch.manual_seed(0)
    trainable = GRU4Rec(cfg).trainable(ds, seq, tc)
    opt = make_optimizer(trainable.module, tc)
    trainable.module.train()
    secs: dict[bool, list[float]] = {w: [] for w in ways}
    for i, batch in enumerate(islice(iter(trainable.train_batches(0, np.random.default_rng(0))), n)):
        way = ways[i % len(ways)]
        switch(way, opt)
        t0 = time.perf_counter()
        loss_value = trainable.loss(batch, i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss_value.backward()
        opt.step()
        if i >= 10:
            secs[way].append(time.perf_counter() - t0)
    switch(True, opt)
    return secs, {k: v.clone() for k, v in trainable.module.state_dict().items()}


def check_weights(ds: Dataset, seq: Sequences, loss: str, n: int,
                  switch: Callable[[bool, torch.optim.Optimizer], None] = use) -> None:
    """n steps of each way alone from the same seed: print whether the weights end equal (exit
    status 1 where they do not)."""
    same = [steps(ds, seq, loss, n, (w,), switch)[1] for w in (False, True)]
    equal = all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    print(f"  {loss}: weights after {n} steps of each way alone: "
          f"{'equal (torch.equal, every tensor)' if equal else 'DIFFERENT'}")
    if not equal:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default="bpr-max,cross-entropy")
    ap.add_argument("--steps", type=int, default=1600, help="alternating steps per loss")
    ap.add_argument("--check", type=int, default=300, help="steps of each way alone for the weights check; 0: none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loops", default=",".join(COMPILED),
                    help="the loops to compare with their torch operations (the others run compiled both ways)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    args = ap.parse_args(argv)
    TOGGLED.clear()
    TOGGLED.update(x.strip() for x in args.loops.split(",") if x.strip())
    if TOGGLED - set(COMPILED):
        raise SystemExit(f"unknown loop(s) {sorted(TOGGLED - set(COMPILED))}; choose from {sorted(COMPILED)}")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(None, args.workdir)
    seq = Sequences.from_events(ds.events, ds.n_users)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); GRU4Rec, reference settings, "
          f"Instacart sample; {args.steps} steps alternating torch operations / compiled loops "
          f"({', '.join(sorted(TOGGLED))})")
    for loss in [x.strip() for x in args.losses.split(",") if x.strip()]:
        if loss not in SETTINGS:
            raise SystemExit(f"unknown loss {loss}; choose from {sorted(SETTINGS)}")
        secs, _ = steps(ds, seq, loss, args.steps, (False, True))
        ms = {w: (1e3 * statistics.mean(s), 1e3 * statistics.median(s)) for w, s in secs.items()}
        print(f"  {loss}: torch operations {ms[False][0]:.2f} ms/step (median {ms[False][1]:.2f}), compiled loops "
              f"{ms[True][0]:.2f} (median {ms[True][1]:.2f}); torch/compiled {ms[False][0] / ms[True][0]:.3f} "
              f"(medians {ms[False][1] / ms[True][1]:.3f})")
        if args.check:
            check_weights(ds, seq, loss, args.check)


if __name__ == "__main__":
    main()
