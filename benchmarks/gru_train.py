"""HNVM's and HRNN's training steps with their GRUs in hnvm.models.gru_train against autograd
through torch's nn.GRU, in one run; and the quality of both over seeds.

    python benchmarks/gru_train.py [--models hnvm-paper,hnvm,hrnn] [--steps 40] [--threads 2]
    python benchmarks/gru_train.py --quality 0,1,2 [--epochs 3]

Speed: each model's trainable on the Instacart sample (HNVM also at the paper's sizes,
src/hnvm/paper_configs/hnvm.toml) takes `--steps` batches; each batch is stepped both ways
(forward, backward, optimizer step), in alternating order, so both see the same batches and
machine load. Prints milliseconds a step each way, target items a second and their ratio.

Quality: the two ways give the same forward floats but gradients summed in another order
(hnvm.models.gru_train), so trained weights differ; `--quality` trains HNVM at the paper's
sizes as `hnvm train DATA --model hnvm --config src/hnvm/paper_configs/hnvm.toml --set
train.epochs=E --set train.seed=S` does, each way, and prints the validation MRR@5 and
Recall@20 of the epoch kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_eval import ROOT, load_data, model_for

import hnvm.models.gru_train as gru_train
from hnvm.data.batches import Sequences
from hnvm.models.base import get_model_class
from hnvm.models.layers import module_outputs
from hnvm.runs import train_run
from hnvm.training import TrainConfig
from hnvm.training.optim import make_optimizer

COMPILED = gru_train.gru_sequence
PAPER = ROOT / "src" / "hnvm" / "paper_configs" / "hnvm.toml"


def use(compiled: bool) -> None:
    """gru_train's GRU (True) or autograd through the module, as before it (False)."""
    gru_train.gru_sequence = COMPILED if compiled else module_outputs  # type: ignore[assignment]


def speed(name: str, ds: Any, steps: int) -> None:
    model_name, paper = name.removesuffix("-paper"), name.endswith("-paper")
    torch.manual_seed(0)
    model = model_for(model_name, paper=paper)
    lr = 0.02 if paper else 0.05
    trainable = model.trainable(ds, Sequences.from_events(ds.events, ds.n_users), TrainConfig())  # type: ignore[attr-defined]
    opt = make_optimizer(trainable.module, TrainConfig(optimizer="adagrad", lr=lr))
    trainable.module.train()

    def step(i: int, batch: Any) -> float:
        t0 = time.perf_counter()
        loss = trainable.loss(batch, i)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    batches = list(islice(trainable.train_batches(0, np.random.default_rng(0)), steps + 1))
    for way in (False, True):  # warm-up: allocations, numba's first call
        use(way)
        step(0, batches[0])
    times: dict[bool, list[float]] = {False: [], True: []}
    targets = 0
    for i, batch in enumerate(batches[1:]):
        for way in ((True, False) if i % 2 else (False, True)):
            use(way)
            times[way].append(step(i, batch))
        targets += trainable.batch_targets(batch)
    use(True)
    ms = {w: 1e3 * statistics.mean(t) for w, t in times.items()}
    rate = {w: targets / sum(t) for w, t in times.items()}
    print(f"{name:>10} | nn.GRU {ms[False]:7.1f} ms a step ({rate[False]:>7,.0f} target items/s) | "
          f"gru_train {ms[True]:7.1f} ms ({rate[True]:>7,.0f}) | x {rate[True] / rate[False]:.3f}", flush=True)


def quality(data: Path, seeds: list[int], epochs: int) -> None:
    print(f"\nHNVM at the paper's sizes, {epochs} epochs: validation of the epoch kept (best MRR@5; MRR@5, "
          "Recall@20), and the largest difference between the two ways' last weights relative to that "
          "tensor's largest weight")
    for seed in seeds:
        row, weights = [], []
        for way in (False, True):
            use(way)
            with tempfile.TemporaryDirectory() as tmp:
                train_run(data, "hnvm", Path(tmp) / "run", config_path=PAPER,
                          overrides=[f"train.epochs={epochs}", f"train.seed={seed}"])
                log = [json.loads(line) for line in (Path(tmp) / "run" / "train_log.jsonl").open()]
                weights.append(load_file(Path(tmp) / "run" / "last" / "weights.safetensors"))
            kept = max((r for r in log if "valid" in r), key=lambda r: r["valid"]["mrr@5"])
            row.append(f"{kept['valid']['mrr@5']:.4f} / {kept['valid']['recall@20']:.4f}")
        use(True)
        a, b = weights
        apart = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)
        print(f"  seed {seed}: nn.GRU {row[0]}   gru_train {row[1]}   weights apart {apart:.1e}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="hnvm-paper,hnvm,hrnn")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality", default="", help="seeds, e.g. 0,1,2: train both ways and compare")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    get_model_class("pop")  # registers the built-in models
    ds = load_data("instacart", args.workdir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; python benchmarks/gru_train.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    if args.quality:
        quality(args.workdir / "instacart", [int(s) for s in args.quality.split(",")], args.epochs)
        return
    for name in args.models.split(","):
        speed(name, ds, args.steps)


if __name__ == "__main__":
    main()
