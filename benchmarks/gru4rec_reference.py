"""GRU4Rec training speed side by side with its authors' reference PyTorch implementation.

    OMP_NUM_THREADS=1 python benchmarks/gru4rec_reference.py --reference /path/to/gru4rec_pytorch.py

The reference code is not part of hnvm and is not shipped with it. Get `gru4rec_pytorch.py` from
https://github.com/hidasib/GRU4Rec_PyTorch_Official (a plain clone; no install is needed) and pass
its path with `--reference`; without it the script says so and exits.

What it does, on the Instacart sample (prepared into `--workdir`, or `--data DIR` for a prepared
data set):

* the train sessions with >= 2 events are taken in the order our trainer uses for
  `configs/gru4rec_instacart.toml` (`session_order = id`) and handed to the reference as its
  DataFrame (SessionId, ItemId, Time), with Time increasing along that order, so that the
  reference's time-ordered iterator visits exactly the same sessions in the same order;
* both implementations train with the same hyper-parameters (the rows of docs/design.md, "Reference figures":
  bpr-max, 100 units, batch 64, n_sample 2048, sample_alpha 0.4, lr 0.05, momentum 0.4, dropout
  0.5 / 0.05, bpreg 1.95, elu 0.5, constrained embedding; and the cross-entropy row) on the CPU
  with one torch thread (`--threads`);
* runs alternate in one process (ours, reference, ours, reference, ...: `--pairs` pairs of
  `--epochs` epochs each), so both see the same machine load. Two clocks per epoch: wall
  seconds, each fit loop's own per-epoch timer (setup excluded on both sides), and CPU seconds
  of this process (time.process_time) from the end of one epoch to the end of the next, which
  a machine shared with other jobs disturbs far less than wall time (an epoch's CPU time after
  the first; the first one also counts the setup). The figures reported are the medians over
  pairs of (reference s/epoch) / (our s/epoch), CPU and wall: above 1 means ours is faster;
* unless `--no-eval`, the last pair's models are evaluated the same way (next-item, test split,
  full ranking, conservative ties, our evaluator): the reference's trained weights are copied into
  our network (same GRU cell, item ids mapped back), so quality parity after the same number of
  epochs is checked with one protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import numpy as np
import pandas as pd
import torch

from hnvm.data.batches import Sequences
from hnvm.data.prepare import prepare
from hnvm.data.samples import instacart_sample_path
from hnvm.data.store import Dataset
from hnvm.evaluate import evaluate_next_item
from hnvm.models.gru4rec import GRU4Rec, GRU4RecConfig
from hnvm.models.gru4rec_net import training_order
from hnvm.training import TrainConfig

REFERENCE_URL = "https://github.com/hidasib/GRU4Rec_PyTorch_Official"

# the two rows of docs/design.md, "Reference figures", in the reference's own parameter names
SETTINGS: dict[str, dict[str, Any]] = {
    "bpr-max": dict(layers=[100], loss="bpr-max", batch_size=64, dropout_p_embed=0.5, dropout_p_hidden=0.05,
                    learning_rate=0.05, momentum=0.4, sample_alpha=0.4, n_sample=2048, embedding=0,
                    constrained_embedding=True, bpreg=1.95, elu_param=0.5, logq=0.0),
    "cross-entropy": dict(layers=[100], loss="cross-entropy", batch_size=32, dropout_p_embed=0.0,
                          dropout_p_hidden=0.4, learning_rate=0.2, momentum=0.2, sample_alpha=0.5, n_sample=2048,
                          embedding=0, constrained_embedding=True, bpreg=1.0, elu_param=0.5, logq=1.0),
}
_EPOCH_LINE = re.compile(r"Epoch(\d+) --> loss: (\S+) \t\(([\d.]+)s\)")


@dataclass
class Run:
    """One fit: per-epoch wall seconds (the implementation's own timer), per-epoch CPU seconds
    (between epoch ends; the first from the start of the fit), per-epoch loss, the fit's wall time."""

    model: Any
    wall: list[float]
    cpu: list[float]
    loss: list[float]
    fit_wall: float

    def cpu_per_epoch(self) -> float:
        """Mean CPU s/epoch over the epochs after the first (the first also holds the setup)."""
        return statistics.mean(self.cpu[1:] or self.cpu)


class _EpochEnds(logging.Handler):
    """Notes time.process_time() when hnvm's Trainer logs the end of an epoch."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("epoch %d"):
            self.marks.append(time.process_time())


class _EpochLines(io.StringIO):
    """stdout of the reference's fit, noting time.process_time() at each of its epoch lines."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[float] = []

    def write(self, text: str) -> int:
        if _EPOCH_LINE.search(text):
            self.marks.append(time.process_time())
        return super().write(text)


def _per_epoch(start: float, marks: list[float]) -> list[float]:
    return [b - a for a, b in zip([start, *marks], marks, strict=False)]


def load_reference(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("gru4rec_reference_code", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "GRU4Rec"):
        raise SystemExit(f"{path}: no GRU4Rec class; is this the reference's gru4rec_pytorch.py?")
    # Its compatibility-mode init computes `float32 array * float64 scalar`, which numpy >= 2 promotes
    # to float64 (numpy 1 kept float32) and then fails to set into float32 weights: cast back.
    model_cls = getattr(module, "GRU4RecModel", None)
    init = getattr(model_cls, "_init_numpy_weights", None)
    if model_cls is not None and init is not None:
        def init_float32(self: Any, shape: tuple[int, ...]) -> np.ndarray:
            return np.asarray(init(self, shape), dtype=np.float32)

        model_cls._init_numpy_weights = init_float32
    # With logq it calls torch.tensor(pandas.Series), which current torch refuses: hand it the array.
    module.torch = _TorchWithSeries("torch")
    return module


class _TorchWithSeries(ModuleType):
    """torch for the reference module, except that torch.tensor also takes pandas objects."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(data, pd.Series | pd.DataFrame):
            data = data.to_numpy()
        return torch.tensor(data, *args, **kwargs)


def load_dataset(data: Path | None, workdir: Path) -> Dataset:
    if data is not None:
        return Dataset.load(data)
    out = workdir / "instacart"
    if not (out / "meta.json").exists():
        prepare(instacart_sample_path(), out, preset="instacart")
    return Dataset.load(out)


def reference_frame(seq: Sequences, order: np.ndarray) -> pd.DataFrame:
    """The sessions `order` as the reference's input: SessionId = position in `order`, Time =
    running event index (strictly increasing, so sorting and time-ordering keep our order)."""
    lengths = np.diff(seq.offsets)[order]
    events = np.concatenate([np.arange(seq.offsets[s], seq.offsets[s + 1]) for s in order])
    return pd.DataFrame({
        "SessionId": np.repeat(np.arange(len(order)), lengths),
        "ItemId": seq.items[events],
        "Time": np.arange(len(events), dtype=np.int64),
    })


def our_config(p: dict[str, Any]) -> tuple[GRU4RecConfig, dict[str, Any]]:
    model = GRU4RecConfig(
        layers=tuple(p["layers"]), loss=p["loss"], batch_size=p["batch_size"],
        dropout_p_embed=p["dropout_p_embed"], dropout_p_hidden=p["dropout_p_hidden"],
        n_sample=p["n_sample"], sample_alpha=p["sample_alpha"], embedding=p["embedding"],
        constrained_embedding=p["constrained_embedding"], bpreg=p["bpreg"], elu_p=p["elu_param"],
        logq=p["logq"], session_order="id", train_on="train")
    return model, dict(optimizer="adagrad", lr=p["learning_rate"], momentum=p["momentum"], patience=0)


def run_ours(ds: Dataset, p: dict[str, Any], epochs: int, seed: int) -> Run:
    cfg, train = our_config(p)
    model = GRU4Rec(cfg)
    ends = _EpochEnds()
    logger = logging.getLogger("hnvm.training.loop")
    level = logger.level
    logger.addHandler(ends)
    logger.setLevel(logging.INFO)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        model.fit(ds, train_cfg=TrainConfig(epochs=epochs, seed=seed, **train))
        wall = time.perf_counter() - t0
    finally:
        logger.removeHandler(ends)
        logger.setLevel(level)
    hist = model.result_.history
    if len(ends.marks) != epochs:
        raise SystemExit(f"saw {len(ends.marks)} epoch ends of our Trainer in its log, expected {epochs}")
    return Run(model, [h["seconds"] for h in hist], _per_epoch(c0, ends.marks), [h["loss"] for h in hist], wall)


def run_reference(ref: ModuleType, frame: pd.DataFrame, p: dict[str, Any], epochs: int, seed: int) -> Run:
    torch.manual_seed(seed)  # dropout and negative samples; the weights come from numpy seed 42
    gru = ref.GRU4Rec(n_epochs=epochs, device=torch.device("cpu"), **p)
    out = _EpochLines()
    c0, t0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(out):
        gru.fit(frame.copy())
    wall = time.perf_counter() - t0
    if getattr(gru, "error_during_train", False):
        raise SystemExit("the reference run diverged (NaN)")
    found = _EPOCH_LINE.findall(out.getvalue())
    if len(found) != epochs or len(out.marks) != epochs:
        raise SystemExit(f"could not read the reference's per-epoch times from its output:\n{out.getvalue()}")
    return Run(gru, [float(s) for _, _, s in found], _per_epoch(c0, out.marks), [float(v) for _, v, _ in found],
               wall)


def reference_as_ours(gru: Any, cfg: GRU4RecConfig, n_items: int) -> GRU4Rec:
    """Our estimator holding the reference's trained weights (constrained or separate embedding;
    item rows mapped back to our ids; items the reference never saw get zero weights)."""
    model = GRU4Rec(cfg)
    net = model._build(n_items)
    src = gru.model
    ids = torch.from_numpy(np.array(gru.data_iterator.itemidmap.index.values, dtype=np.int64))
    with torch.no_grad():
        for ours, theirs in zip(net.G, src.G, strict=True):
            ours.load_state_dict(theirs.state_dict())
        for name in ("Wy", "By") + (("E",) if net.mode == "embedding" else ()):
            w = getattr(net, name).weight
            w.zero_()
            w[ids] = getattr(src, name).weight.detach()
    if net.mode == "onehot":
        raise SystemExit("evaluation of the one-hot input mode is not supported; use --no-eval")
    net.eval()
    model.net = net
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, help=f"the reference's gru4rec_pytorch.py (from {REFERENCE_URL})")
    ap.add_argument("--losses", default="bpr-max,cross-entropy", help="comma-separated: bpr-max, cross-entropy")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (CPU time is read from the 2nd on)")
    ap.add_argument("--pairs", type=int, default=3, help="(ours, reference) run pairs per loss")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both implementations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-eval", action="store_true", help="skip the quality check of the last pair")
    ap.add_argument("--data", type=Path, help="a prepared data set (default: the Instacart sample)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    args = ap.parse_args(argv)
    if args.reference is None or not args.reference.is_file():
        where = "no --reference given" if args.reference is None else f"{args.reference} does not exist"
        print(f"{where}: this benchmark needs the authors' reference implementation, which hnvm does not "
              f"ship.\nGet gru4rec_pytorch.py from {REFERENCE_URL} (git clone) and pass its path:\n"
              f"  python benchmarks/gru4rec_reference.py --reference GRU4Rec_PyTorch_Official/gru4rec_pytorch.py")
        sys.exit(0)
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    unknown = set(losses) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown loss {sorted(unknown)}; choose from {sorted(SETTINGS)}")

    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.data, args.workdir)
    seq = Sequences.from_events(ds.events, ds.n_users)
    order = training_order(seq, ds.events, ("train",), by="id")
    frame = reference_frame(seq, order)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), pandas {pd.__version__}; "
          f"reference: {args.reference}")
    print(f"train: {len(order):,} sessions, {len(frame):,} events, {frame['ItemId'].nunique():,} items; "
          f"{args.pairs} pair(s) x {args.epochs} epoch(s) per loss, runs alternate ours / reference\n")

    cpu_note = "epochs 2+" if args.epochs > 1 else "epoch 1, setup included"
    summary: list[str] = []
    for loss in losses:
        p = SETTINGS[loss]
        pairs: list[tuple[Run, Run]] = []
        print(f"== {loss}: " + ", ".join(f"{k}={v}" for k, v in p.items()))
        for i in range(args.pairs):
            for name, run in (("ours", run_ours(ds, p, args.epochs, args.seed)),
                              ("reference", run_reference(ref, frame, p, args.epochs, args.seed))):
                print(f"  pair {i + 1} {name:>9}: wall s/epoch {' '.join(f'{s:6.2f}' for s in run.wall)}; "
                      f"CPU s/epoch {' '.join(f'{s:6.2f}' for s in run.cpu)}; fit incl. setup {run.fit_wall:6.2f} s "
                      f"wall; loss by epoch {' '.join(f'{v:.4f}' for v in run.loss)}")
                if name == "ours":
                    ours = run
            pairs.append((ours, run))
            print(f"  pair {i + 1}: reference/ours CPU ({cpu_note}) "
                  f"{run.cpu_per_epoch() / ours.cpu_per_epoch():.3f}, wall "
                  f"{statistics.mean(run.wall) / statistics.mean(ours.wall):.3f}")
        cpu = [r.cpu_per_epoch() / o.cpu_per_epoch() for o, r in pairs]
        wall = [statistics.mean(r.wall) / statistics.mean(o.wall) for o, r in pairs]
        line = (f"{loss}: CPU s/epoch ({cpu_note}) ours {statistics.median(o.cpu_per_epoch() for o, _ in pairs):.2f}, "
                f"reference {statistics.median(r.cpu_per_epoch() for _, r in pairs):.2f}; wall s/epoch ours "
                f"{statistics.median(s for o, _ in pairs for s in o.wall):.2f}, reference "
                f"{statistics.median(s for _, r in pairs for s in r.wall):.2f} (medians)\n"
                f"    reference/ours, median of {len(pairs)} pair(s): CPU {statistics.median(cpu):.3f} "
                f"({', '.join(f'{x:.3f}' for x in cpu)}), wall {statistics.median(wall):.3f} "
                f"({', '.join(f'{x:.3f}' for x in wall)})")
        print("  " + line)
        if not args.no_eval and pairs:
            ours, gru = pairs[-1][0].model, pairs[-1][1].model
            cfg, _ = our_config(p)
            for name, model in (("ours", ours), ("reference", reference_as_ours(gru, cfg, ds.n_items))):
                m = evaluate_next_item(model, seq, "test").metrics
                txt = ", ".join(f"{k} {m[k]:.4f}" for k in ("recall@5", "mrr@5", "recall@20", "mrr@20") if k in m)
                print(f"  test after {args.epochs} epoch(s), {name:>9}: {txt}")
                line += f"\n    {name} after {args.epochs} epoch(s): {txt}"
        summary.append(line)
        print()
    print("summary\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
