"""Training and evaluation throughput of HNVM (and any other registered model).

    python benchmarks/train_eval.py                       # Instacart sample + synthetic 60K items
    python benchmarks/train_eval.py --datasets instacart,retailrocket --models all

For each data set and model it prints the time of one epoch of the model's own `fit` (setup
included; train events/s), for HNVM also the throughput of bare training steps (target
items/s over `--steps` steps after one warm-up step), evaluation throughput (next-item targets/s,
full ranking over the catalogue, conservative ties) and, in the same run, the bare scoring
throughput: a [K, H] x [H, n_items] matmul plus the conservative rank, which is the floor any
model's evaluation pays. Evaluation is reported as a ratio to it. Peak RSS at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from hnvm.config import build, load_toml
from hnvm.contract import Batch
from hnvm.data.batches import Sequences, next_item_batches
from hnvm.data.prepare import prepare
from hnvm.data.samples import instacart_sample_path, synthetic_dataset
from hnvm.data.store import Dataset
from hnvm.distributed import resolve_device, to_device
from hnvm.metrics import conservative_ranks
from hnvm.models.base import get_model_class
from hnvm.training import TrainConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def load_data(name: str, workdir: Path) -> Dataset:
    if name == "instacart":
        out = workdir / "instacart"
        if not out.exists():
            prepare(instacart_sample_path(), out, preset="instacart")
        return Dataset.load(out)
    if name == "retailrocket":
        out = workdir / "retailrocket"
        if not out.exists():
            prepare(ROOT.parent / "shared" / "data" / "retailrocket" / "events.csv", out, preset="retailrocket")
        return Dataset.load(out)
    if name == "synthetic60k":
        # a flatter popularity (zipf 0.6) keeps about 60K items above the support filter
        return synthetic_dataset(n_users=40_000, n_items=62_000, n_topics=200, seed=0, zipf=0.6)
    if name == "synthetic100kusers":  # many users (serve start-up), short histories: 3-12 sessions of 2-10
        return synthetic_dataset(n_users=100_000, n_items=20_000, n_topics=100, seed=0)
    if name.startswith("dir:"):
        return Dataset.load(name[4:])
    raise SystemExit(f"unknown dataset {name} (instacart, synthetic60k, synthetic100kusers, dir:PATH)")


def model_for(name: str, paper: bool, dense: bool = False) -> object:
    cls = get_model_class(name)
    cfg_cls = getattr(cls, "config_class", None)
    if cfg_cls is None:
        return cls()
    values = {}
    if paper and name == "hnvm":
        values = load_toml(ROOT / "src" / "hnvm" / "paper_configs" / "hnvm.toml")["model"]
    cfg = build(cfg_cls, values, "model")
    if dense and hasattr(cfg, "sparse"):
        cfg = dataclasses.replace(cfg, sparse=False)
    return cls(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(model: object, ds: Dataset, steps: int, device: torch.device | None = None,
                     optimizer: str = "adagrad") -> tuple[float, int, object] | None:
    """Target items per second of forward + backward + optimizer step (None: not trained by SGD).
    Models trained by the generic Trainer expose `trainable(dataset, seq, cfg)`. On CUDA the
    forward pass runs under bf16 autocast, as the Trainer does."""
    make = getattr(model, "trainable", None)
    if make is None:
        return None
    device = device or torch.device("cpu")
    trainable = make(ds, Sequences.from_events(ds.events, ds.n_users), TrainConfig(optimizer=optimizer))
    trainable.module.to(device)
    if callable(getattr(trainable, "to", None)):
        trainable.to(device)
    lr = 0.05 if optimizer == "adagrad" else 0.002
    opt = make_optimizer(trainable.module, TrainConfig(optimizer=optimizer, lr=lr))
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    it = iter(trainable.train_batches(0, np.random.default_rng(0)))
    n_targets, elapsed = 0, 0.0
    for i, batch in enumerate(islice(it, steps + 1)):
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = trainable.loss(to_device(batch, device), i)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        if i > 0:  # the first step pays one-off allocation costs
            elapsed += time.perf_counter() - t0
            n_targets += trainable.batch_targets(batch)
    trainable.module.eval()
    return n_targets / max(elapsed, 1e-9), n_targets, trainable


def first_test_batches(seq: Sequences, n_targets: int) -> list[Batch]:
    """Next-item test batches (512 targets each) until they hold at least n_targets targets."""
    kept, n = [], 0
    for b in next_item_batches(seq, "test", max_targets=512):
        kept.append(b)
        n += b.n_targets
        if n >= n_targets:
            break
    return kept


def score_width(model: object) -> int:
    """H of the model's final [K, H] x [H, n_items] product, the floor's width: HNVM's `hidden`,
    BPR-MF's `dim`, else 100 (GRU4Rec's and HRNN's GRU size, STAMP's d, Caser's 2d at the
    defaults; the KNN models and NCF have no such product)."""
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "hidden", None) or getattr(cfg, "dim", None) or 100)


def bare_scoring(n_items: int, hidden: int, n_targets: int, chunk: int = 512,
                 device: torch.device | None = None) -> float:
    """Targets/s of the floor: scores = h W^T + b over all n_items items, then the conservative rank."""
    device = device or torch.device("cpu")
    w = torch.randn(n_items + 1, hidden, device=device) * 0.1
    b = torch.zeros(n_items + 1, device=device)
    targets = torch.randint(1, n_items + 1, (n_targets,), device=device)
    _sync(device)
    t0 = time.perf_counter()
    for lo in range(0, n_targets, chunk):
        h = torch.randn(min(chunk, n_targets - lo), hidden, device=device)
        conservative_ranks(torch.addmm(b, h, w.T), targets[lo:lo + chunk])
    _sync(device)
    return n_targets / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="instacart,synthetic60k")
    ap.add_argument("--models", default="hnvm", help="comma-separated, or 'all'")
    ap.add_argument("--steps", type=int, default=20, help="training steps to time")
    ap.add_argument("--eval-targets", type=int, default=3000, help="next-item targets to evaluate")
    ap.add_argument("--max-fit-events", type=int, default=300_000,
                    help="skip the 1-epoch fit of SGD models above this many train events (the "
                         "step throughput and the evaluation still run)")
    ap.add_argument("--default-config", action="store_true",
                    help="HNVM with its defaults instead of the paper's sizes (src/hnvm/paper_configs/hnvm.toml)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--optimizer", default="adagrad", help="of the timed steps: adagrad (paper) or adam")
    ap.add_argument("--dense", action="store_true",
                    help="HNVM with dense item/user-table updates (model.sparse = false), as before sparse updates")
    ap.add_argument("--no-fit", action="store_true", help="skip the 1-epoch fit (steps and evaluation only)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.models == "all":
        from hnvm.models.base import REGISTRY

        get_model_class("pop")
        args.models = ",".join(sorted(REGISTRY))
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    for dname in args.datasets.split(","):
        ds = load_data(dname, args.workdir)
        seq = Sequences.from_events(ds.events, ds.n_users)
        print(f"\n== {dname}: {ds.n_users:,} users, {ds.n_items:,} items, "
              f"{ds.meta['stats']['train_events']:,} train events")
        for mname in args.models.split(","):
            model = model_for(mname, paper=not args.default_config, dense=args.dense)
            n_train = ds.meta["stats"]["train_events"]
            tr = (train_throughput(model, ds, args.steps, device, args.optimizer) if mname == "hnvm"
                  else None)
            if tr is not None:
                print(f"{mname:>10}: train steps {tr[0]:>9,.0f} targets/s ({tr[1]:,} targets in {args.steps} steps)")
            if (tr is None or n_train <= args.max_fit_events) and not args.no_fit:
                # one epoch of the model's own fit (setup included), no validation
                model = model_for(mname, paper=not args.default_config, dense=args.dense)
                t0 = time.perf_counter()
                model.fit(ds, train_cfg=TrainConfig(epochs=1, patience=0, device=str(device.type)))  # type: ignore[attr-defined]
                fit_s = time.perf_counter() - t0
                print(f"{mname:>10}: 1-epoch fit {fit_s:7.2f}s = {n_train / fit_s:>9,.0f} train events/s")
            if device.type != "cpu" and getattr(model, "net", None) is not None:
                model.to(device)  # type: ignore[attr-defined]
            # evaluation speed on the first --eval-targets test targets
            kept = first_test_batches(seq, args.eval_targets)
            n = sum(b.n_targets for b in kept)
            if device.type != "cpu" and getattr(model, "net", None) is not None:
                kept = [b.to(device) for b in kept]
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in kept:
                    conservative_ranks(model.score(b), b.targets)  # type: ignore[attr-defined]
            _sync(device)
            ev = n / (time.perf_counter() - t0)
            hidden = score_width(model)
            floor = bare_scoring(ds.n_items, hidden, n, device=device)
            print(f"{'':>10}  eval  {ev:>9,.0f} targets/s (full ranking, {n:,} targets); "
                  f"bare matmul+rank {floor:,.0f} targets/s (H={hidden}); ratio {ev / floor:.2f}")
        del ds, seq
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:,.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
