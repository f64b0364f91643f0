"""What torch.optim.Optimizer's profiler ranges cost a small network's training step: GRU4Rec's
steps with AdagradMomentum's step and zero_grad as torch wraps them (a `record_function` range
around each call) against ours (hnvm.training.optim: the ranges only while the profiler runs or
a step hook is registered), in one run.

    python benchmarks/optimizer_ranges.py [--losses bpr-max,cross-entropy] [--steps 1600] [--threads 1] [--check 300]

One GRU4Rec per loss with the reference settings of benchmarks/gru4rec_reference.py (docs/design.md,
"Reference figures") on the Instacart sample trains `--steps` steps; the steps alternate between
the two ways (even steps torch's wrappers, odd steps ours), so both see the same batches, weights
and machine load; both run the same update (a second pass of `--check` steps, each way alone
from the same seed, confirms that the weights end equal). Prints mean and median milliseconds per
step (forward, backward, zero_grad and optimizer step) for each way and their ratio.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gru4rec_reference import SETTINGS, load_dataset
from sparse_kernels import check_weights, steps

from hnvm.data.batches import Sequences


def torch_wrappers(ours: bool, opt: torch.optim.Optimizer) -> None:
    """Our step and zero_grad (True) or torch.optim.Optimizer's: its zero_grad, and the update
    inside its profile_hook_step wrapper (False); set on the instance, over the class's."""
    for name in ("step", "zero_grad"):
        opt.__dict__.pop(name, None)
    if not ours:
        update = type(opt).step.__wrapped__  # type: ignore[attr-defined]  # (under our wrapper)
        opt.step = functools.partial(torch.optim.Optimizer.profile_hook_step(update), opt)  # type: ignore[method-assign]
        opt.zero_grad = functools.partial(torch.optim.Optimizer.zero_grad, opt)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default="bpr-max,cross-entropy")
    ap.add_argument("--steps", type=int, default=1600, help="alternating steps per loss")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", type=int, default=300, help="steps of each way alone for the weights check; 0: none")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(None, args.workdir)
    seq = Sequences.from_events(ds.events, ds.n_users)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); GRU4Rec, reference settings, "
          f"Instacart sample; {args.steps} steps alternating torch's optimizer wrappers / ours")
    for loss in [x.strip() for x in args.losses.split(",") if x.strip()]:
        if loss not in SETTINGS:
            raise SystemExit(f"unknown loss {loss}; choose from {sorted(SETTINGS)}")
        secs, _ = steps(ds, seq, loss, args.steps, (False, True), switch=torch_wrappers)
        ms = {w: (1e3 * statistics.mean(s), 1e3 * statistics.median(s)) for w, s in secs.items()}
        print(f"  {loss}: torch's wrappers {ms[False][0]:.2f} ms/step (median {ms[False][1]:.2f}), ours "
              f"{ms[True][0]:.2f} (median {ms[True][1]:.2f}); torch's/ours {ms[False][0] / ms[True][0]:.3f} "
              f"(medians {ms[False][1] / ms[True][1]:.3f})")
        if args.check:
            check_weights(ds, seq, loss, args.check, torch_wrappers)


if __name__ == "__main__":
    main()
