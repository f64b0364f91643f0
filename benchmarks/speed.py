"""Every speed figure of the project in one run, as ratios where a reference exists.

    python benchmarks/speed.py                                   # everything but the GRU4Rec reference
    python benchmarks/speed.py --gru4rec-reference PATH/gru4rec_pytorch.py
    python benchmarks/speed.py --only models --datasets instacart --models hnvm,hrnn

Sections (each also runs on its own with the command it prints):

  models    per data set (Instacart sample, synthetic 60,750 items) and model: training
            throughput (target items/s of timed optimizer steps for SGD models, train events/s
            of one `fit` for the others) and next-item evaluation throughput (full ranking,
            conservative ties) as a ratio to the bare floor: a [K, H] x [H, n_items] matmul
            plus the conservative rank, measured in the same process, alternating with the
            model, median of --rounds rounds. HNVM twice: the paper's sizes and the defaults.
            For HNVM and HRNN also "history alone": the same batches' history encoding only
            (HNVM's context, HRNN's user state; nothing scored) against that floor, and "the
            rest alone": their scoring with that history given (the same scores, checked),
            each a bound of the model's ratio; and under HNVM, HRNN and NCF the FLOPs that
            bound it (history encoding, in the time a 0.5 ratio leaves it after the rest as
            measured, and in one floor's time, were the rest only the floor's own product and
            rank; NCF's tower over every (user, item) pair, in two floors' time) against this
            machine's fastest measured matmul. Under HNVM also what bounds its training step:
            the FLOPs of its matrix products (forward and backward) a target, the time they take
            replayed alone at their shapes, and the step's count of other operator calls.
  knn       TIFU-KNN's and V-SKNN's exact shortcuts against the long way, scores torch.equal
            (benchmarks/knn_paths.py: the Instacart sample, the 60,750-item set, 100,000
            short-history users, a heavy-head log)
  hnvm      HNVM's and STAMP's exact inference ways (hnvm.models.gru_inference, STAMP's W_1 table)
            against the modules' way, scores torch.equal, alternating per batch in one process
            (benchmarks/hnvm_inference.py)
  windows   HNVM (paper sizes) and HRNN on the Instacart sample: whole training epochs with the
            state entering each user window carried over from the user's previous window (the
            default) against re-encoded before every window (`carry_context` / `carry_state`
            false), alternating in one process, median of --rounds rounds
  gru4rec   our GRU4Rec against its authors' PyTorch code (benchmarks/gru4rec_reference.py;
            only with --gru4rec-reference, the file is not shipped)
  prepare   `hnvm prepare` of the 30M-event synthetic log (benchmarks/prepare.py)
  serve     `hnvm serve` latency and throughput (benchmarks/serve.py, shortened phases)

The child benchmarks run as separate processes (their memory and threads do not mix with the
models section) and their output is printed as they print it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from hnvm.contract import Batch
from hnvm.data.batches import Sequences
from hnvm.metrics import conservative_ranks
from hnvm.models.base import REGISTRY, get_model_class
from hnvm.models.ncf import _SCORE_CHUNK

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_eval import bare_scoring, first_test_batches, load_data, model_for, score_width, train_throughput

HERE = Path(__file__).resolve().parent
SECTIONS = ("models", "knn", "hnvm", "windows", "gru4rec", "prepare", "serve")


def history_only(model: object) -> Callable[[Batch], object] | None:
    """The part of a batch's scoring that reads the earlier sessions only (HNVM's context after
    them, HRNN's user state), for the models whose evaluation that bounds; None for the others."""
    name = getattr(model, "name", "")
    if name == "hnvm":
        return lambda b: model.encode_history(b.users, b.sessions[:, :-1])  # type: ignore[attr-defined]
    if name == "hrnn":
        return lambda b: model.network().user_state(model._trim(b.sessions[:, :-1]))  # type: ignore[attr-defined]
    return None


@contextlib.contextmanager
def history_given(model: object, history: object) -> Iterator[None]:
    """While active, the model's scoring reads `history` (what `history_only` computed for the
    batch it scores) instead of encoding the batch's earlier sessions: the rest of its scoring,
    timed alone. An instance attribute shadows the method that encodes them (HNVM's `_history`,
    HRNN's `user_state`) until the block ends; one already there is put back. HNVM's repeat
    channel, off in both of this benchmark's configurations, reads the earlier sessions itself:
    with it, the rest would include that reading. ValueError: a model without such a method."""
    kind = getattr(model, "name", "")
    if kind not in ("hnvm", "hrnn"):
        raise ValueError(f"history_given: {kind or type(model).__name__} encodes no history to give")
    owner, name = (model, "_history") if kind == "hnvm" else (model.network(), "user_state")  # type: ignore[attr-defined]
    missing = object()
    before = vars(owner).get(name, missing)
    setattr(owner, name, lambda *args: history)
    try:
        yield
    finally:
        if before is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


def history_flops(model: object, batches: list[Batch]) -> tuple[float, int] | None:
    """(the FLOPs of the batches' history encoding per target without padding, H of the GRU
    reading its items): the products of each real step, 2 · 3H · (input + H) for a GRU step
    (HNVM: encoder per history item, context GRU per history session; HRNN: session GRU per
    item, user GRU per session, plus its 2 · U · S session-state initialisation per session),
    except HNVM's encoder input gates, 2 · 3H · input once per row of its item table instead of
    per history item where the table has fewer rows than all the batches' history items (the
    fewest: the model builds the table at the first batch holding at least as many history
    events as rows, then keeps it; hnvm.models.gru_inference); what FlopCounterMode counts on a
    batch with no padding
    (tests/test_speed_bound.py). None for the models without `history_only` and for HNVM with
    `use_history` off."""
    name = getattr(model, "name", "")
    if history_only(model) is None or not getattr(model.config, "use_history", True):  # type: ignore[attr-defined]
        return None  # (HNVM's history-blind ablation encodes no history)
    net = model.network()  # type: ignore[attr-defined]
    per_item, per_session = (net.encoder, net.context) if name == "hnvm" else (net.session_gru, net.user_gru)
    gru = [6.0 * g.hidden_size * (g.input_size + g.hidden_size) for g in (per_item, per_session)]
    if name == "hrnn":
        gru[1] += 2.0 * net.init.in_features * net.init.out_features
    items = sessions = 0
    for b in batches:
        history = model._trim(b.sessions[:, :-1])  # type: ignore[attr-defined]
        items, sessions = items + int((history > 0).sum()), sessions + int((history > 0).any(2).sum())
    total = gru[0] * items + gru[1] * sessions
    if name == "hnvm":  # the input gates once per row of the item table where that is fewer
        gates = 6.0 * per_item.hidden_size * per_item.input_size
        total -= gates * (items - min(items, net.item_emb.num_embeddings))
    return total / sum(b.n_targets for b in batches), int(per_item.hidden_size)


def pair_flops(model: object, batches: list[Batch]) -> tuple[float, tuple[int, int, int]] | None:
    """NCF: (the FLOPs per target of what it computes for every (row's user, item) pair: 2 · a · b
    for each tower layer after the first and for the output layer, the shape of its widest such
    product, its row count that of `NCF.scores`' chunks in the first batch); its first layer is
    split into a user part and an item part (computed per user and per item, not per pair, so not
    counted). None for the other models."""
    if getattr(model, "name", "") != "ncf":
        return None
    net = model.network()  # type: ignore[attr-defined]
    layers = [*net.tower, net.out]
    per_pair = sum(2.0 * layer.in_features * layer.out_features for layer in layers)
    cols = net.item_gmf.num_embeddings  # all n_items + 1 columns
    pairs = sum(len(b.users) for b in batches) * cols
    # the rows of its products: a batch's users x the items of one of `scores`' chunks
    rows = len(batches[0].users)
    chunk = min(cols, max(1, _SCORE_CHUNK // max(1, rows * net.first_user.out_features)))
    return per_pair * pairs / sum(b.n_targets for b in batches), (rows * chunk, layers[0].in_features,
                                                                  layers[0].out_features)


def matmul_rate(m: int, k: int, n: int, repeats: int = 20) -> float:
    """FLOP/s of this machine's fp32 [m, k] x [k, n] matmul, the fastest of `repeats` timings."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    inner = max(1, int(2e8 // (2 * m * k * n)))  # ~0.2 GFLOP a timing
    for _ in range(inner):
        a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2.0 * m * k * n / best


_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten.baddbmm.default)


class Products(TorchDispatchMode):
    """While active, records every matrix product dispatched (forward and backward): its op and
    arguments, each tensor as its (shape, stride, dtype), so that `replay_seconds` can rerun it;
    and counts the other operator calls (`others`)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []
        self.others = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.others += func not in _PRODUCTS
        if func in _PRODUCTS:
            spec = [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, spec, dict(kwargs)))
        return func(*args, **kwargs)

    def flops(self) -> float:
        """The recorded products' FLOPs, by torch's own formulas (torch.utils.flop_counter)."""
        return float(sum(flop_registry[func._overloadpacket](*(a[0] if isinstance(a, tuple) else a for a in spec), **kw)
                         for func, spec, kw in self.calls))

    def replay_seconds(self, rounds: int = 3) -> float:
        """Seconds to rerun the recorded products one by one on random tensors of the same shapes,
        strides and dtypes (one tensor per distinct layout), the fastest of `rounds` rounds."""
        pool: dict[tuple[Any, ...], torch.Tensor] = {}

        def tensor(spec: tuple[Any, ...]) -> torch.Tensor:
            if spec not in pool:
                pool[spec] = torch.empty_strided(spec[0], spec[1], dtype=spec[2]).uniform_(-1.0, 1.0)
            return pool[spec]

        calls = [(func, [tensor(a) if isinstance(a, tuple) else a for a in spec], kw) for func, spec, kw in self.calls]
        best = float("inf")
        for _ in range(rounds + 1):  # (the first round warms up)
            t0 = time.perf_counter()
            for func, args, kw in calls:
                func(*args, **kw)
            best = min(best, time.perf_counter() - t0)
        return best


def training_products(trainable: Any, steps: int) -> tuple[float, float, float, float]:
    """(FLOPs of the matrix products per target, seconds per target to replay them alone, products
    a step, other operator calls a step) over the training steps `train_throughput` times (epoch
    0's batches 1..steps: forward and backward; the optimizer step, which has no product, is not
    counted). What the step's arithmetic costs at the shapes the model gives it, measured without
    everything else the step does."""
    module = trainable.module
    module.train()
    rec, n = Products(), 0
    batches = islice(trainable.train_batches(0, np.random.default_rng(0)), steps + 1)
    for i, batch in enumerate(batches):  # batch 0: the warm-up step, untimed in train_throughput too
        with rec if i > 0 else contextlib.nullcontext():  # the loss and its backward only
            trainable.loss(batch, i)["loss"].backward()
        module.zero_grad(set_to_none=True)
        n += trainable.batch_targets(batch) if i > 0 else 0
    module.eval()
    steps, n = max(steps, 1), max(n, 1)
    return rec.flops() / n, rec.replay_seconds() / n, len(rec.calls) / steps, rec.others / steps


def eval_ratio(model: object, seq: Sequences, n_items: int, hidden: int, targets: int,
               rounds: int) -> tuple[float, float, float, tuple[float, float] | None]:
    """(model targets/s, floor targets/s, ratio, (history alone, the rest alone) or None):
    medians over `rounds` alternating rounds of the first `targets` next-item test targets
    (batches of 512, as `hnvm evaluate`), each part as a ratio to the floor. The history part
    (`history_only`) is what the model must compute before it scores anything; the rest is its
    scoring with that history given (`history_given`: the same scores, checked). Each part's
    ratio bounds the model's."""
    batches = first_test_batches(seq, targets)
    n = sum(b.n_targets for b in batches)
    history = history_only(model)
    speeds, floors, alone, rest = [], [], [], []
    with torch.no_grad():
        for b in batches[:1]:  # warm-up (allocations, first-call set-up)
            conservative_ranks(model.score(b), b.targets)  # type: ignore[attr-defined]
        given = [history(b) for b in batches] if history is not None else []
        for b, h in zip(batches, given, strict=False):  # what is timed as the rest scores as the model does
            expected = model.score(b)  # type: ignore[attr-defined]
            with history_given(model, h):
                if not torch.equal(model.score(b), expected):  # type: ignore[attr-defined]
                    raise SystemExit(f"{getattr(model, 'name', model)}: its scores changed with the history given")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for b in batches:
                conservative_ranks(model.score(b), b.targets)  # type: ignore[attr-defined]
            speeds.append(n / (time.perf_counter() - t0))
            floors.append(bare_scoring(n_items, hidden, n))
            if history is not None:
                t0 = time.perf_counter()
                for b in batches:
                    history(b)
                alone.append(n / (time.perf_counter() - t0) / floors[-1])
                t0 = time.perf_counter()
                for b, h in zip(batches, given, strict=True):
                    with history_given(model, h):
                        conservative_ranks(model.score(b), b.targets)  # type: ignore[attr-defined]
                rest.append(n / (time.perf_counter() - t0) / floors[-1])
    ratios = [s / f for s, f in zip(speeds, floors, strict=True)]
    parts = (statistics.median(alone), statistics.median(rest)) if alone else None
    return statistics.median(speeds), statistics.median(floors), statistics.median(ratios), parts


def models_section(args: argparse.Namespace) -> None:
    names = args.models.split(",") if args.models != "all" else None
    get_model_class("pop")  # registers the built-in models
    peaks: dict[object, float] = {}  # the fastest matmul rates seen in this run
    for dname in args.datasets.split(","):
        ds = load_data(dname, args.workdir)
        seq = Sequences.from_events(ds.events, ds.n_users)
        n_train = ds.meta["stats"]["train_events"]
        print(f"\n== models on {dname}: {ds.n_users:,} users, {ds.n_items:,} items, {n_train:,} train events")
        print(f"   (python benchmarks/speed.py --only models --datasets {dname} --models NAME)")
        print(f"{'model':>12} | {'train':>26} | {'eval targets/s':>14} | {'floor/s':>8} | ratio")
        todo = [(n, False) for n in (names or sorted(REGISTRY))]
        if names is None or "hnvm" in names:
            todo.insert(0, ("hnvm", True))  # the paper's sizes first, then the defaults
        for name, paper in todo:
            torch.manual_seed(0)
            model = model_for(name, paper=paper)
            label = f"{name}{' (paper)' if paper else ''}"
            tr = train_throughput(model, ds, args.steps) if hasattr(model, "trainable") else None
            if tr is not None:
                train = f"{tr[0]:>9,.0f} target items/s"
            else:
                t0 = time.perf_counter()
                model.fit(ds)  # type: ignore[attr-defined]
                train = f"{n_train / (time.perf_counter() - t0):>9,.0f} events/s (fit)"
            hidden = score_width(model)
            ev, floor, ratio, parts = eval_ratio(model, seq, ds.n_items, hidden, args.eval_targets, args.rounds)
            alone = f" (history alone {parts[0]:.2f}, the rest alone {parts[1]:.2f})" if parts is not None else ""
            print(f"{label:>12} | {train:>26} | {ev:>14,.0f} | {floor:>8,.0f} | {ratio:.2f}{alone}", flush=True)
            if tr is not None and name == "hnvm":  # the bar: 10,000 target items/s at the paper's sizes
                flops, replay, products, others = training_products(tr[2], args.steps)
                print(f"{'':>12}   its training step: {flops / 1e6:.1f} MFLOP of products a target (forward and "
                      f"backward, padding included), replayed alone at their shapes {replay * 1e6:.0f} us a target "
                      f"({flops / replay / 1e9:,.0f} GFLOP/s); the whole step {1e6 / tr[0]:.0f} us a target; a step: "
                      f"{tr[1] / args.steps:,.0f} targets, {products:,.0f} products, {others:,.0f} other operator "
                      f"calls; 10,000 target items/s leaves 100 us a target", flush=True)
            batches = first_test_batches(seq, args.eval_targets)
            # what a ratio >= 0.5 leaves a part that the model computes before or as it scores: two
            # floors' time in all, less what the rest of its scoring takes alone (HNVM, HRNN: their
            # history; the rest as measured, history given), or all of it (NCF's tower: it ranks too)
            bound_by: tuple[str, float, tuple[int, int, int], float] | None = None
            if (hist := history_flops(model, batches)) is not None and parts is not None:
                bound_by = "its history", hist[0], (512, hist[1], 3 * hist[1]), (2.0 - 1.0 / parts[1]) / floor
            elif (pairs := pair_flops(model, batches)) is not None:
                bound_by = "its tower over every (user, item) pair", pairs[0], pairs[1], 2.0 / floor
            if bound_by is not None:
                what, flops, shape, budget = bound_by
                # measured again at each use and the fastest kept: the machine's load only slows it
                for key, dims in (("square", (2048, 2048, 2048)), (shape, shape)):
                    peaks[key] = max(peaks.get(key, 0.0), matmul_rate(*dims))
                m, k, n = shape
                left = (f"what a 0.5 ratio leaves it, {budget * 1e6:.0f} us a target, needs "
                        f"{flops / budget / 1e9:,.0f} GFLOP/s" if budget > 0 else
                        "a 0.5 ratio leaves it no time: the rest alone takes all of it or more")
                if parts is not None:  # and, were the rest only the floor's own product and rank, one floor's time
                    rest_us = 1e6 / (parts[1] * floor)
                    left = (f"{2e6 / floor:.0f} us a target in all, less the rest's {rest_us:.0f}: {left} (in one "
                            f"floor's time, {1e6 / floor:.0f} us, {flops * floor / 1e9:,.0f} GFLOP/s)")
                print(f"{'':>12}   {what}: {flops / 1e6:.1f} MFLOP a target at the fewest; {left}; this machine's "
                      f"matmul: {peaks[shape] / 1e9:,.0f} GFLOP/s at [{m}, {k}] x [{k}, {n}], "
                      f"{peaks['square'] / 1e9:,.0f} at 2048^3", flush=True)
        del ds, seq


def windows_section(args: argparse.Namespace) -> None:
    ds = load_data("instacart", args.workdir)
    print("\n== user windows: carried entering states against re-encoded ones, whole epochs, Instacart sample")
    print("   (python benchmarks/speed.py --only windows)")
    print(f"{'model':>12} | {'re-encoded':>20} | {'carried':>20} | ratio")
    for name, setting in (("hnvm", "carry_context"), ("hrnn", "carry_state")):
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for carry in (False, True):
                torch.manual_seed(0)
                model = model_for(name, paper=name == "hnvm")
                model.config = dataclasses.replace(model.config, **{setting: carry})  # type: ignore[attr-defined]
                tr = train_throughput(model, ds, 10**9)  # every step of epoch 0 but the first
                assert tr is not None
                speeds[carry].append(tr[0])
        off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
        ratios = [b / a for a, b in zip(speeds[False], speeds[True], strict=True)]
        label = f"{name}{' (paper)' if name == 'hnvm' else ''}"
        print(f"{label:>12} | {off:>12,.0f} items/s | {on:>12,.0f} items/s | {statistics.median(ratios):.2f}",
              flush=True)


def child(title: str, cmd: list[str]) -> None:
    """Run a child benchmark, printing its command line and its output as it comes."""
    print(f"\n== {title}\n   ({' '.join(cmd[1:]) if cmd[0] == sys.executable else ' '.join(cmd)})", flush=True)
    proc = subprocess.run([sys.executable, *cmd[1:]] if cmd[0] == sys.executable else cmd, check=False)
    if proc.returncode:
        print(f"   (exit status {proc.returncode})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--datasets", default="instacart,synthetic60k")
    ap.add_argument("--models", default="all", help="comma-separated, or 'all'")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per SGD model")
    ap.add_argument("--eval-targets", type=int, default=3000, help="next-item targets per evaluation round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating model/floor evaluation rounds")
    ap.add_argument("--gru4rec-reference", type=Path, help="the authors' gru4rec_pytorch.py (GRU4Rec section)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hnvm-bench")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if unknown := only - set(SECTIONS):
        raise SystemExit(f"unknown section(s) {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; python benchmarks/speed.py "
          + " ".join(argv if argv is not None else sys.argv[1:]), flush=True)
    t0 = time.perf_counter()
    if "models" in only:
        models_section(args)
    if "knn" in only:
        child("kNN baselines: each exact shortcut against the long way (next-item targets/s, one process)",
              [sys.executable, str(HERE / "knn_paths.py"), "--workdir", str(args.workdir)])
    if "hnvm" in only:
        child("HNVM's and STAMP's exact inference ways against the modules' way (next-item targets/s, one process)",
              [sys.executable, str(HERE / "hnvm_inference.py"), "--workdir", str(args.workdir)])
    if "windows" in only:
        windows_section(args)
    if "gru4rec" in only:
        if args.gru4rec_reference is None:
            print("\n== GRU4Rec against its authors' code: skipped (give --gru4rec-reference PATH)")
        else:
            child("GRU4Rec against its authors' code (CPU time per epoch, one thread, alternating pairs)",
                  [sys.executable, str(HERE / "gru4rec_reference.py"), "--reference", str(args.gru4rec_reference),
                   "--pairs", "2", "--no-eval"])
    if "prepare" in only:
        child("prepare, 30M synthetic events", [sys.executable, str(HERE / "prepare.py")])
    if "serve" in only:
        with tempfile.TemporaryDirectory() as serve_dir:  # a fresh run: never one of an older version
            child("serve (shortened: 10 s per phase)",
                  [sys.executable, str(HERE / "serve.py"), "--recommend", "5000", "--seconds", "10",
                   "--events", "50000", "--single-events", "3000", "--workdir", serve_dir])
    print(f"\nspeed.py: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
