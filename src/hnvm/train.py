"""One generic training loop. It knows nothing about any model: a model hands it a
`Trainable` (an nn.Module, a batch iterator and a loss function) and a validation callback.

Checkpoints (safetensors + JSON, written atomically) go to RUN/last every epoch and RUN/best
at the best validation score; RUN/train_log.jsonl gets one JSON line per epoch (and per
`log_every` steps). `resume=True` continues from RUN/last. Progress (start, each step, each
epoch) goes to the reporter installed with `report_progress`; the library never prints.

Under torchrun (WORLD_SIZE > 1) the same loop runs in every process with the loss wrapped in
DistributedDataParallel: each rank takes its own shard of the batches (the same number of
steps on every rank), gradients are averaged, rank 0 alone writes checkpoints and logs, and
validation is sharded and gathered so that every rank sees the same score and stops together.
`model.batch_size` is per process: the global batch is world_size times it. See
`hnvm.distributed` and the README ("Training across processes and machines").
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hnvm import distributed
from hnvm.config import choices, rng
from hnvm.errors import HnvmError, one_line
from hnvm.metrics import NonFiniteScores

log = logging.getLogger(__name__)

# Sees each epoch's record after it is logged and checkpointed; returning True ends training there
# (the best epoch so far is kept). `hnvm tune` prunes trials and caps their time through it.
EpochObserver = Callable[[int, dict[str, Any]], bool]
_EPOCH_OBSERVER: ContextVar[EpochObserver | None] = ContextVar("hnvm_epoch_observer", default=None)


@contextlib.contextmanager
def observe_epochs(observer: EpochObserver) -> Iterator[None]:
    """Within the block, every Trainer.fit calls `observer(epoch, record)` after each epoch."""
    token = _EPOCH_OBSERVER.set(observer)
    try:
        yield
    finally:
        _EPOCH_OBSERVER.reset(token)


@dataclass(frozen=True)
class Progress:
    """One progress report of Trainer.fit (on rank 0) to the reporter of `report_progress`:
    kind "start" once, "step" after every optimizer step, "epoch" after each epoch is validated,
    logged and checkpointed. The library never prints: the caller decides how to show these
    (`hnvm` CLI: a live status line on a terminal, plain lines otherwise)."""

    kind: str  # "start" | "step" | "epoch"
    model: str  # the registered model name (type of the trained module if not registered)
    epoch: int  # 1-based
    epochs: int  # train.epochs (early stopping may end sooner)
    step: int  # optimizer steps since training began
    targets: int  # targets trained on in this epoch so far
    epoch_s: float  # seconds since this epoch began
    fit_s: float  # seconds since this fit began
    losses: dict[str, float] = field(default_factory=dict)  # running means over the epoch
    metric: str = ""  # train.metric (early stopping)
    valid: dict[str, float] | None = None  # "epoch": validation metrics (None: not validated)
    best: float | None = None  # "epoch": best validation score so far
    best_epoch: int | None = None


ProgressReporter = Callable[[Progress], None]
_PROGRESS: ContextVar[ProgressReporter | None] = ContextVar("hnvm_progress", default=None)
PROGRESS_LOG_S = 30.0  # show_progress without a reporter: one INFO log line per this many seconds


@contextlib.contextmanager
def report_progress(reporter: ProgressReporter) -> Iterator[None]:
    """Within the block, every Trainer.fit reports its progress to `reporter` (rank 0 only)."""
    token = _PROGRESS.set(reporter)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _model_name(trainable: Any) -> str:
    """The registered name of the model a trainable fits: the model whose config class is the
    trainable's `cfg` (every built-in trainable keeps its model's config there)."""
    from hnvm.models.base import REGISTRY

    cfg = getattr(trainable, "cfg", None)
    for name, cls in REGISTRY.items():
        if cfg is not None and getattr(cls, "config_class", None) is type(cfg):
            return name
    return type(trainable.module).__name__


class _LogProgress:
    """The reporter of `show_progress=True` when the caller installed none: within long epochs,
    one INFO log line every PROGRESS_LOG_S seconds (each epoch is logged anyway)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, p: Progress) -> None:
        now = time.perf_counter()
        if p.kind == "step" and now - self.last >= PROGRESS_LOG_S:
            self.last = now
            log.info("%s epoch %d/%d: %d targets, loss %.4g, %.0fs", p.model, p.epoch, p.epochs, p.targets,
                     p.losses.get("loss", math.nan), p.epoch_s)
        elif p.kind == "epoch":
            self.last = now


class TrainingDiverged(HnvmError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop (section [train] of a config file)."""

    epochs: int = field(default=20, metadata=rng(1, 10_000))
    optimizer: str = field(default="adam", metadata=choices("adagrad", "adam"))
    lr: float = field(default=0.002, metadata=rng(1e-6, 10.0))
    momentum: float = field(default=0.0, metadata=rng(0.0, 0.999, "Adagrad momentum (paper)"))
    weight_decay: float = field(default=0.0, metadata=rng(0.0, 1.0))
    grad_clip: float = field(default=0.0, metadata=rng(0.0, 1e6, "max grad norm; 0 = off"))
    patience: int = field(default=3, metadata=rng(0, 1000, "epochs without improvement; 0 = off"))
    metric: str = field(default="mrr@5", metadata=choices(
        "mrr@5", "recall@5", "ndcg@5", "mrr@10", "recall@10", "mrr@20", "recall@20"))
    seed: int = field(default=0, metadata=rng(0, 2**31 - 1))
    log_every: int = field(default=50, metadata=rng(1, 10**9))
    device: str = field(default="auto", metadata=choices(
        "auto", "cpu", "cuda", doc="auto = CUDA when available (one GPU per process under torchrun)"))
    bf16: bool = True  # bf16 autocast of the training forward pass on CUDA (evaluation stays fp32)


class Trainable(Protocol):
    """What a model hands the Trainer. Optional extras: `train_batches` may take keyword
    arguments `rank` and `world_size` and return only that rank's shard (the same number of
    batches on every rank); otherwise the Trainer strides over the full sequence. A method
    `to(device)` moves the trainable's own tensors (sampling tables, ...) to the device."""

    module: nn.Module

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]: ...

    def loss(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """'loss' is minimised; other entries (scalars) are logged."""
        ...

    def batch_targets(self, batch: Any) -> int: ...


class AdagradMomentum(torch.optim.Optimizer):
    """Adagrad with (heavy-ball) momentum, as GRU4Rec's reference code and the paper use:
    G += g²;  v = μ v - lr g / sqrt(G + eps);  p += v.

    A sparse gradient (nn.Embedding(sparse=True)) updates only the rows it holds, as the
    reference's IndexedAdagradM does: G, v and the parameter of every other row stay as they
    are (their momentum is neither applied nor decayed)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.0,
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["sum"] = torch.zeros_like(p)
                    if group["momentum"]:
                        st["velocity"] = torch.zeros_like(p)
                if g.is_sparse:
                    self._sparse_step(p, g.coalesce(), st, group)
                    continue
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                st["sum"].addcmul_(g, g)
                upd = g / (st["sum"] + group["eps"]).sqrt()
                if group["momentum"]:
                    v = st["velocity"]
                    v.mul_(group["momentum"]).add_(upd, alpha=-group["lr"])
                    p.add_(v)
                else:
                    p.add_(upd, alpha=-group["lr"])
        return None

    @staticmethod
    def _sparse_step(p: torch.Tensor, g: torch.Tensor, st: dict[str, Any],
                     group: dict[str, Any]) -> None:
        """The update above restricted to the rows of a coalesced sparse gradient."""
        idx, val = g.indices()[0], g.values()  # index_select: much faster than t[idx] on CPU
        if group["weight_decay"]:
            val = val.add(p.index_select(0, idx), alpha=group["weight_decay"])
        acc = st["sum"].index_select(0, idx).addcmul_(val, val)
        st["sum"].index_copy_(0, idx, acc)
        upd = val / (acc + group["eps"]).sqrt()
        if group["momentum"]:
            v = st["velocity"].index_select(0, idx).mul_(group["momentum"]).add_(upd, alpha=-group["lr"])
            st["velocity"].index_copy_(0, idx, v)
            p.index_add_(0, idx, v)
        else:
            p.index_add_(0, idx, upd, alpha=-group["lr"])


class LazyAdam(torch.optim.Optimizer):
    """Adam (L2 weight decay as torch.optim.Adam) that also takes sparse gradients: a sparse
    gradient updates only the rows it holds, moments included (torch.optim.SparseAdam's
    semantics, with weight decay on those rows). An item table then costs O(rows used) per
    step instead of O(catalogue). Dense gradients get the plain Adam update."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = float(st["step"])
                c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                if g.is_sparse:
                    g = g.coalesce()
                    idx, val = g.indices()[0], g.values()
                    if wd:
                        val = val.add(p[idx], alpha=wd)
                    m_rows = m[idx].mul_(b1).add_(val, alpha=1 - b1)
                    v_rows = v[idx].mul_(b2).addcmul_(val, val, value=1 - b2)
                    m.index_copy_(0, idx, m_rows)
                    v.index_copy_(0, idx, v_rows)
                    p.index_add_(0, idx, m_rows / (v_rows.sqrt() / c2 + eps), alpha=-lr / c1)
                    continue
                if wd:
                    g = g.add(p, alpha=wd)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m, v.sqrt().div_(c2).add_(eps), value=-lr / c1)
        return None


def sparse_parameters(module: nn.Module) -> set[nn.Parameter]:
    """Parameters whose gradients are sparse: those of embedding modules built with
    sparse=True (which is how DDP decides it too)."""
    return {p for m in module.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse
            for p in m.parameters(recurse=False)}


def dense_gradients(module: nn.Module) -> None:
    """Make every sparse embedding produce dense gradients (NCCL cannot all-reduce sparse
    tensors); the numbers are the same, only the cost differs."""
    for m in module.modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse:
            m.sparse = False


def make_optimizer(params: Iterable[Any] | nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over a module's parameters (or an iterable of parameters, taken as
    dense). Adam over a module with sparse embeddings is LazyAdam; Adagrad handles both."""
    sparse = False
    if isinstance(params, nn.Module):
        sparse = bool(sparse_parameters(params))
        params = params.parameters()
    if cfg.optimizer == "adam":
        if sparse:
            return LazyAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return AdagradMomentum(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """nn.utils.clip_grad_norm_ that also takes sparse gradients (coalesced first, so that a
    row used twice in a batch counts once)."""
    params = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())
        else:
            grads.append(p.grad)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))


# ----------------------------------------------------------------------------- checkpoints

def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors + JSON (no pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = torch.tensor(v) if k == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(directory: Path, module: nn.Module, opt: torch.optim.Optimizer | None,
                     state: dict[str, Any]) -> None:
    """Write module (+ optimizer, + trainer state) to `directory` atomically."""
    from safetensors.torch import save_file

    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
              str(tmp / "weights.safetensors"))
    if opt is not None:
        tensors, meta = _flatten_optimizer(opt)
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        rng_state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng_state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
        save_file(rng_state, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = directory / "weights.safetensors"
    if not f.exists():
        raise HnvmError(f"{directory}: no weights.safetensors (not a checkpoint)")
    return load_file(str(f))


def _load_checkpoint(directory: Path, module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore module and optimizer from a checkpoint written by write_checkpoint; returns its
    state.json with the RNG states under "_rng". A missing, truncated or mismatched file is a
    one-line HnvmError naming it (the run directory is left as it is)."""
    from safetensors.torch import load_file

    def fail(name: str, exc: BaseException) -> HnvmError:
        return HnvmError(f"{directory / name}: cannot resume from it ({one_line(exc)}); the checkpoint is damaged or "
                         "was written with other model settings (replace the run with --force)")

    # each step names the file it reads; any failure of the libraries below means a bad file
    name = "state.json"
    try:
        st = json.loads((directory / name).read_text(encoding="utf-8"))
        for key in ("epoch", "step", "best", "best_epoch", "bad_epochs"):
            if not isinstance(st.get(key), int | float):
                raise ValueError(f"no numeric {key!r}")
        name = "weights.safetensors"
        module.load_state_dict(load_file(str(directory / name)))
        name = "optimizer.json"
        meta = json.loads((directory / name).read_text(encoding="utf-8"))
        name = "optimizer.safetensors"
        # load_state_dict moves the moments to each parameter's device
        _restore_optimizer(opt, load_file(str(directory / name)), meta)
        name = "rng.safetensors"
        st["_rng"] = load_file(str(directory / name))
        if "torch" not in st["_rng"]:
            raise ValueError("no torch RNG state")
    except Exception as exc:
        raise fail(name, exc) from exc
    return st


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict[str, Any]]


class _LossModule(nn.Module):
    """The trainable's loss as a module, so that DistributedDataParallel sees the whole step:
    a trainable computes its loss by calling any methods of its network (not only forward),
    and DDP only synchronises gradients of work done inside its own forward."""

    def __init__(self, trainable: Trainable) -> None:
        super().__init__()
        self.net = trainable.module
        self._trainable = (trainable,)  # a tuple, so it is not registered as a submodule

    def forward(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        return self._trainable[0].loss(batch, step)


def _takes_shard(trainable: Trainable) -> bool:
    params = inspect.signature(trainable.train_batches).parameters
    return "rank" in params and "world_size" in params


class Trainer:
    """Fits a Trainable: optimizer, early stopping on a validation metric, checkpoints; on one
    device or, under torchrun, with DistributedDataParallel over all processes. Progress goes to
    the reporter of `report_progress`; without one, `show_progress` logs it (INFO)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, *,
                 show_progress: bool = False, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.show_progress = show_progress
        self.resume = resume
        self.ctx = distributed.DistContext()

    def _log(self, record: dict[str, Any]) -> None:
        if self.run_dir is None or not self.ctx.is_main:
            return
        with open(self.run_dir / "train_log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _no_validation(self, reason: str) -> None:
        """No validation score: say so (log and train log); the caller then trains every epoch
        without early stopping and keeps the last epoch's weights."""
        msg = (f"no validation: {reason}; training all {self.cfg.epochs} epochs without early stopping "
               "and keeping the last epoch's weights")
        if self.ctx.is_main:
            log.warning(msg)
        self._log({"type": "warning", "validation": "none", "message": msg})

    def _batches(self, model: Trainable, epoch: int, gen: np.random.Generator) -> Iterable[Any]:
        ctx = self.ctx
        if not ctx.distributed:
            return model.train_batches(epoch, gen)
        if _takes_shard(model):
            return model.train_batches(epoch, gen, rank=ctx.rank, world_size=ctx.world_size)  # type: ignore[call-arg]
        # a trainable that does not shard itself: every rank walks the same sequence and keeps
        # every world_size-th batch (the step loop stops all ranks when the first runs out)
        return (b for i, b in enumerate(model.train_batches(epoch, gen))
                if i % ctx.world_size == ctx.rank)

    def fit(self, model: Trainable, validate: Callable[[], dict[str, float]] | None) -> TrainResult:
        cfg = self.cfg
        ctx = self.ctx = distributed.context(cfg.device)
        dev = ctx.device
        torch.manual_seed(cfg.seed)
        module = model.module
        if not ctx.sparse_grads_ok:
            dense_gradients(module)
        has_sparse = bool(sparse_parameters(module))
        module.to(dev)
        if callable(getattr(model, "to", None)):
            model.to(dev)  # type: ignore[attr-defined]
        opt = make_optimizer(module, cfg)
        start_epoch, step = 0, 0
        best, best_epoch, bad_epochs = -math.inf, -1, 0
        history: list[dict[str, Any]] = []
        best_state: dict[str, torch.Tensor] | None = None
        if self.run_dir is not None and ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        last = self.run_dir / "last" if self.run_dir else None
        if self.resume:
            # every rank reads RUN/last (on several machines: a shared filesystem)
            if last is None or not (last / "state.json").exists():
                raise HnvmError(f"{self.run_dir}: nothing to resume (no checkpoint in last/)")
            st = _load_checkpoint(last, module, opt)
            rng_state = st.pop("_rng")
            torch.set_rng_state(rng_state["torch"])
            if "cuda" in rng_state and dev.type == "cuda":
                torch.cuda.set_rng_state(rng_state["cuda"])
            start_epoch, step = st["epoch"] + 1, st["step"]
            best, best_epoch, bad_epochs = st["best"], st["best_epoch"], st["bad_epochs"]
            history = st.get("history", [])
            log.info("resuming at epoch %d (step %d)", start_epoch, step)
        if validate is None:
            self._no_validation("no validation sessions (an empty validation split, or none given)")
        if ctx.distributed:
            # sampled negatives, dropout and reparameterisation noise differ between ranks
            # (rank 0 keeps the single-process stream); the initial weights come from rank 0
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank + 7919 * start_epoch)
        compute: Callable[[Any, int], dict[str, torch.Tensor]] = model.loss
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            compute = DistributedDataParallel(
                _LossModule(model), device_ids=[dev.index] if dev.type == "cuda" else None)
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and cfg.bf16
               else contextlib.nullcontext())
        if ctx.is_main:
            log.info("training on %s, %d process(es)%s", dev, ctx.world_size,
                     ", sparse item/user updates" if has_sparse else "")
        report = _PROGRESS.get() or (_LogProgress() if self.show_progress else None)
        if not ctx.is_main:
            report = None
        model_name, fit_t0 = _model_name(model), time.perf_counter()
        if report is not None:
            report(Progress("start", model_name, start_epoch + 1, cfg.epochs, step, 0, 0.0, 0.0, metric=cfg.metric))

        for epoch in range(start_epoch, cfg.epochs):
            if cfg.patience and bad_epochs >= cfg.patience:
                break
            module.train()
            gen = np.random.default_rng([cfg.seed, epoch])
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            n_batches = n_targets = 0
            it = iter(self._batches(model, epoch, gen))
            batch = next(it, None)
            # the next batch is fetched before each update so that all ranks agree, in the one
            # small all-reduce per step that also carries the loss check, whether to go on
            (stop,) = ctx.any(batch is None)
            while not stop:
                with amp:
                    parts = compute(distributed.to_device(batch, dev), step)
                loss = parts["loss"]
                following = next(it, None)
                bad, stop = ctx.any(not bool(torch.isfinite(loss)), following is None)
                if bad:
                    where = (f"loss is {loss.item()}" if not torch.isfinite(loss)
                             else "the loss of another process is not finite")
                    raise TrainingDiverged(
                        f"{where} at epoch {epoch + 1}, step {step}; the last good checkpoint is "
                        f"kept in {last or 'memory'} (try a lower train.lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    clip_grad_norm(module.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                n_batches += 1
                k = model.batch_targets(batch)
                n_targets += k
                for name, v in parts.items():
                    sums[name] = sums.get(name, 0.0) + float(v.detach())
                if report is not None:
                    now = time.perf_counter()
                    report(Progress("step", model_name, epoch + 1, cfg.epochs, step, n_targets, now - t0, now - fit_t0,
                                    {n: v / n_batches for n, v in sums.items()}, cfg.metric))
                if step % cfg.log_every == 0:
                    self._log({"type": "step", "epoch": epoch + 1, "step": step,
                               **{n: float(v.detach()) for n, v in parts.items()}})
                batch = following
            secs = time.perf_counter() - t0
            if ctx.distributed:  # the epoch's figures over all ranks (step logs are rank 0's)
                names = sorted(sums)
                tot = ctx.sum([n_batches, n_targets, *(sums[n] for n in names)])
                n_batches, n_targets = int(tot[0]), int(tot[1])
                sums = dict(zip(names, tot[2:], strict=True))
            record: dict[str, Any] = {
                "type": "epoch", "epoch": epoch + 1, "step": step, "seconds": round(secs, 3),
                "targets_per_s": round(n_targets / max(secs, 1e-9), 1),
                **{n: v / max(n_batches, 1) for n, v in sums.items()},
            }
            if ctx.distributed:
                record["processes"] = ctx.world_size
            if validate is not None:
                module.eval()
                try:
                    metrics = validate()  # sharded over ranks and gathered: the same on every rank
                except NonFiniteScores as exc:  # a finite loss can hide non-finite parameters
                    raise TrainingDiverged(f"epoch {epoch + 1}: validation scores are NaN; the parameters "
                                           "diverged (try a lower train.lr or train.grad_clip)") from exc
                score = metrics.get(cfg.metric, float("nan"))
                record["valid"] = metrics
                if math.isnan(score):  # no validation targets (e.g. only one-item sessions)
                    self._no_validation(f"the validation split has no targets for {cfg.metric}")
                    validate = None
                    best_epoch = epoch + 1
                elif score > best:
                    best, best_epoch, bad_epochs = score, epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                    if self.run_dir is not None and ctx.is_main:
                        write_checkpoint(self.run_dir / "best", module, None,
                                         {"epoch": epoch, "score": score, "metric": cfg.metric})
                else:
                    bad_epochs += 1
            else:
                best_epoch = epoch + 1
            history.append(record)
            self._log(record)
            if ctx.is_main:
                log.info("epoch %d: %s", epoch + 1, record)
            if self.run_dir is not None and ctx.is_main:
                write_checkpoint(last, module, opt, {  # type: ignore[arg-type]
                    "epoch": epoch, "step": step, "best": best, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "history": history})
            if report is not None:
                scored = "valid" in record and math.isfinite(best)
                report(Progress("epoch", model_name, epoch + 1, cfg.epochs, step, n_targets, secs,
                                time.perf_counter() - fit_t0, {n: v / max(n_batches, 1) for n, v in sums.items()},
                                cfg.metric, record.get("valid"), best if scored else None,
                                best_epoch if scored else None))
            observer = _EPOCH_OBSERVER.get()
            if observer is not None and observer(epoch + 1, record):
                log.info("training stopped by the epoch observer after epoch %d", epoch + 1)
                break
        if best_state is not None:
            module.load_state_dict(best_state)
        elif validate is not None and self.run_dir is not None and (self.run_dir / "best").exists():
            module.load_state_dict(read_weights(self.run_dir / "best"))  # resumed after the best
        ctx.barrier()  # no rank leaves (and, say, saves the model) before rank 0's checkpoint
        return TrainResult(best_epoch, best, len(history), history)

