"""One generic training loop. It knows no model and no evaluation: it gets a `Trainable` (an
nn.Module, a batch iterator and a loss function), a validation callable that returns metrics
(or None) and explicit callbacks, as minGPT's trainer and implicit's `callback=` do.

Checkpoints (`hnvm.training.checkpoint`) go to RUN/last every epoch and RUN/best at the best
validation score; RUN/train_log.jsonl gets one JSON line per epoch (and per `log_every` steps).
`resume=True` continues from RUN/last. Callbacks: `on_progress(Progress)` at the start, after
each step and after each epoch (rank 0 only; the library never prints), and
`on_epoch(epoch, record) -> bool` after each epoch is logged and checkpointed (True ends
training there, the best epoch so far is kept: `hnvm tune` prunes trials and caps their time
with it).

Under torchrun (WORLD_SIZE > 1) the same loop runs in every process with the loss wrapped in
DistributedDataParallel: each rank takes its own shard of the batches (the same number of
steps on every rank), gradients are averaged, rank 0 alone writes checkpoints and logs, and
validation is sharded and gathered so that every rank sees the same score and stops together.
The batch size of a model is per process: the global batch is world_size times it. See
`hnvm.distributed` and the README ("Training across processes and machines").
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hnvm import distributed
from hnvm.errors import HnvmError, NonFiniteScores
from hnvm.training.checkpoint import load_checkpoint, read_weights, write_checkpoint
from hnvm.training.config import Trainable, TrainConfig
from hnvm.training.optim import clip_grad_norm, dense_gradients, make_optimizer, sparse_parameters

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 30.0  # show_progress without on_progress: one INFO log line per this many seconds


@dataclass(frozen=True)
class Progress:
    """One progress report of Trainer.fit (on rank 0) to its `on_progress` callback: kind
    "start" once, "step" after every optimizer step, "epoch" after each epoch is validated,
    logged and checkpointed. The library never prints: the caller decides how to show these
    (`hnvm` CLI: a live status line on a terminal, plain lines otherwise)."""

    kind: str  # "start" | "step" | "epoch"
    model: str  # the registered model name (or the name the caller gave)
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
    latent: dict[str, float] | None = None  # "epoch": the trainable's diagnostics (HNVM: KL/dim, active units)


ProgressCallback = Callable[[Progress], None]
# Sees each epoch's record after it is logged and checkpointed; returning True ends training there.
EpochCallback = Callable[[int, dict[str, Any]], bool]
Validate = Callable[[], dict[str, float]]
_Figures = tuple[int, float, dict[str, float]]  # an epoch's targets, seconds and mean losses


class _LogProgress:
    """The reporter of `show_progress=True` when the caller gave no `on_progress`: within long
    epochs, one INFO log line every PROGRESS_LOG_S seconds (each epoch is logged anyway)."""

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


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict[str, Any]]


@dataclass
class _State:
    """What the loop carries from epoch to epoch (and saves in RUN/last/state.json)."""

    epoch: int = 0  # the next epoch to run (0-based)
    step: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None


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
    `on_progress`; without one, `show_progress` logs it (INFO)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, *, show_progress: bool = False,
                 resume: bool = False, on_progress: ProgressCallback | None = None,
                 on_epoch: EpochCallback | None = None, name: str = "") -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.on_epoch = on_epoch
        self.name = name
        self._module_name = ""
        self.report = on_progress or (_LogProgress() if show_progress else None)
        self.ctx = distributed.DistContext()

    # -- logging ----------------------------------------------------------------------------------
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

    def _progress(self, kind: str, st: _State, targets: int, epoch_s: float, losses: dict[str, float],
                  record: dict[str, Any] | None = None) -> None:
        if self.report is None or not self.ctx.is_main:
            return
        scored = record is not None and "valid" in record and math.isfinite(st.best)
        self.report(Progress(kind, self.name or self._module_name, st.epoch + 1, self.cfg.epochs, st.step,
                             targets, epoch_s, time.perf_counter() - self._t0, losses, self.cfg.metric,
                             record.get("valid") if record else None, st.best if scored else None,
                             st.best_epoch if scored else None, record.get("latent") if record else None))

    # -- set-up -----------------------------------------------------------------------------------
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

    def _resume(self, module: nn.Module, opt: torch.optim.Optimizer, st: _State) -> None:
        """Restore RUN/last (every rank reads it; on several machines: a shared filesystem)."""
        last = self.run_dir / "last" if self.run_dir else None
        if last is None or not (last / "state.json").exists():
            raise HnvmError(f"{self.run_dir}: nothing to resume (no checkpoint in last/)")
        saved = load_checkpoint(last, module, opt)
        rng_state = saved.pop("_rng")
        torch.set_rng_state(rng_state["torch"])
        if "cuda" in rng_state and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng_state["cuda"])
        st.epoch, st.step = saved["epoch"] + 1, saved["step"]
        st.best, st.best_epoch, st.bad_epochs = saved["best"], saved["best_epoch"], saved["bad_epochs"]
        st.history = saved.get("history", [])
        log.info("resuming at epoch %d (step %d)", st.epoch, st.step)

    def _loss_fn(self, model: Trainable) -> Callable[[Any, int], dict[str, torch.Tensor]]:
        """The step's loss: the trainable's own, or wrapped in DDP under torchrun."""
        ctx, dev = self.ctx, self.ctx.device
        if not ctx.distributed:
            return model.loss
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(_LossModule(model), device_ids=[dev.index] if dev.type == "cuda" else None)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, model: Trainable, validate: Validate | None) -> TrainResult:
        """Train `model` for cfg.epochs (fewer with early stopping or on_epoch); returns the
        result, with the module holding the best epoch's weights (the last epoch's without
        validation). `validate` returns the validation metrics of the module in eval mode."""
        cfg = self.cfg
        ctx = self.ctx = distributed.context(cfg.device)
        dev = ctx.device
        torch.manual_seed(cfg.seed)
        module = model.module
        self._module_name = type(module).__name__  # progress names it when the caller gave no name
        if not ctx.sparse_grads_ok:
            dense_gradients(module)
        has_sparse = bool(sparse_parameters(module))
        module.to(dev)
        if callable(getattr(model, "to", None)):
            model.to(dev)  # type: ignore[attr-defined]
        opt = make_optimizer(module, cfg)
        st = _State()
        if self.run_dir is not None and ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._resume(module, opt, st)
        if validate is None:
            self._no_validation("no validation sessions (an empty validation split, or none given)")
        if ctx.distributed:
            # sampled negatives, dropout and reparameterisation noise differ between ranks
            # (rank 0 keeps the single-process stream); the initial weights come from rank 0
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank + 7919 * st.epoch)
        compute = self._loss_fn(model)
        if ctx.is_main:
            log.info("training on %s, %d process(es)%s", dev, ctx.world_size,
                     ", sparse item/user updates" if has_sparse else "")
        self._t0 = time.perf_counter()
        self._progress("start", st, 0, 0.0, {})
        while st.epoch < cfg.epochs and not (cfg.patience and st.bad_epochs >= cfg.patience):
            record, figures = self._train_epoch(model, compute, opt, st)
            validate = self._validate(model, validate, record, st)
            stop = self._end_epoch(model, opt, record, figures, st)
            st.epoch += 1
            if stop:
                break
        if st.best_weights is not None:
            module.load_state_dict(st.best_weights)
        elif validate is not None and self.run_dir is not None and (self.run_dir / "best").exists():
            module.load_state_dict(read_weights(self.run_dir / "best"))  # resumed after the best
        elif validate is not None and st.history:  # every epoch was before the end of a warm-up
            msg = (f"no epoch was selectable (the KL warm-up did not end within {len(st.history)} epoch(s)); "
                   "keeping the last epoch's weights, trained with beta < 1")
            if ctx.is_main:
                log.warning(msg)
            self._log({"type": "warning", "selection": "last", "message": msg})
            st.best_epoch = st.history[-1]["epoch"]
        ctx.barrier()  # no rank leaves (and, say, saves the model) before rank 0's checkpoint
        return TrainResult(st.best_epoch, st.best, len(st.history), st.history)

    def _train_epoch(self, model: Trainable, compute: Callable[[Any, int], dict[str, torch.Tensor]],
                     opt: torch.optim.Optimizer, st: _State) -> tuple[dict[str, Any], _Figures]:
        """One pass over the trainable's batches; returns the epoch's record for the train log
        and its figures for progress reports (targets, seconds, mean losses)."""
        cfg, ctx, dev, module = self.cfg, self.ctx, self.ctx.device, model.module
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and cfg.bf16
               else contextlib.nullcontext())
        module.train()
        gen = np.random.default_rng([cfg.seed, st.epoch])
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n_batches = n_targets = 0
        it = iter(self._batches(model, st.epoch, gen))
        batch = next(it, None)
        # the next batch is fetched before each update so that all ranks agree, in the one
        # small all-reduce per step that also carries the loss check, whether to go on
        (stop,) = ctx.any(batch is None)
        while not stop:
            with amp:
                parts = compute(distributed.to_device(batch, dev), st.step)
            loss = parts["loss"]
            following = next(it, None)
            bad, stop = ctx.any(not bool(torch.isfinite(loss)), following is None)
            if bad:
                where = (f"loss is {loss.item()}" if not torch.isfinite(loss)
                         else "the loss of another process is not finite")
                last = self.run_dir / "last" if self.run_dir else None
                raise TrainingDiverged(
                    f"{where} at epoch {st.epoch + 1}, step {st.step}; the last good checkpoint is "
                    f"kept in {last or 'memory'} (try a lower train.lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                clip_grad_norm(module.parameters(), cfg.grad_clip)
            opt.step()
            st.step += 1
            n_batches += 1
            n_targets += model.batch_targets(batch)
            for name, v in parts.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach())
            if self.report is not None:
                self._progress("step", st, n_targets, time.perf_counter() - t0,
                               {n: v / n_batches for n, v in sums.items()})
            if st.step % cfg.log_every == 0:
                self._log({"type": "step", "epoch": st.epoch + 1, "step": st.step,
                           **{n: float(v.detach()) for n, v in parts.items()}})
            batch = following
        secs = time.perf_counter() - t0
        if ctx.distributed:  # the epoch's figures over all ranks (step logs are rank 0's)
            names = sorted(sums)
            tot = ctx.sum([n_batches, n_targets, *(sums[n] for n in names)])
            n_batches, n_targets = int(tot[0]), int(tot[1])
            sums = dict(zip(names, tot[2:], strict=True))
        record: dict[str, Any] = {
            "type": "epoch", "epoch": st.epoch + 1, "step": st.step, "seconds": round(secs, 3),
            "targets_per_s": round(n_targets / max(secs, 1e-9), 1),
            **{n: v / max(n_batches, 1) for n, v in sums.items()},
        }
        if ctx.distributed:
            record["processes"] = ctx.world_size
        return record, (n_targets, secs, {n: v / max(n_batches, 1) for n, v in sums.items()})

    def _validate(self, model: Trainable, validate: Validate | None, record: dict[str, Any],
                  st: _State) -> Validate | None:
        """Score the epoch on validation (into `record`) and track the best epoch; returns the
        validation callable to use from now on (None once there is nothing to validate on).
        A trainable with `selectable(step) -> bool` (HNVM: β = 1 reached) keeps the epochs
        before it from being selected; they neither count as best nor against patience."""
        cfg, ctx, module = self.cfg, self.ctx, model.module
        if validate is None:
            st.best_epoch = st.epoch + 1
            return None
        module.eval()
        try:
            metrics = validate()  # sharded over ranks and gathered: the same on every rank
        except NonFiniteScores as exc:  # a finite loss can hide non-finite parameters
            raise TrainingDiverged(f"epoch {st.epoch + 1}: validation scores are NaN; the parameters "
                                   "diverged (try a lower train.lr or train.grad_clip)") from exc
        score = metrics.get(cfg.metric, float("nan"))
        record["valid"] = metrics
        if math.isnan(score):  # no validation targets (e.g. only one-item sessions)
            self._no_validation(f"the validation split has no targets for {cfg.metric}")
            st.best_epoch = st.epoch + 1
            return None
        selectable = getattr(model, "selectable", None)
        if selectable is not None and not selectable(st.step):
            record["selectable"] = False
            if ctx.is_main:
                log.info("epoch %d is not selectable yet (KL warm-up: beta < 1)", st.epoch + 1)
            return validate
        if score > st.best:
            st.best, st.best_epoch, st.bad_epochs = score, st.epoch + 1, 0
            st.best_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            if self.run_dir is not None and ctx.is_main:
                write_checkpoint(self.run_dir / "best", module, None,
                                 {"epoch": st.epoch, "score": score, "metric": cfg.metric})
        else:
            st.bad_epochs += 1
        return validate

    def _end_epoch(self, model: Trainable, opt: torch.optim.Optimizer, record: dict[str, Any],
                   figures: _Figures, st: _State) -> bool:
        """Log and checkpoint the epoch, report it, ask on_epoch; True = stop training."""
        ctx = self.ctx
        diagnostics = getattr(model, "diagnostics", None)
        if diagnostics is not None:  # e.g. what HNVM's latents carry (KL per dimension, active units)
            record["latent"] = diagnostics()
        st.history.append(record)
        self._log(record)
        if ctx.is_main:
            log.info("epoch %d: %s", st.epoch + 1, record)
        if self.run_dir is not None and ctx.is_main:
            write_checkpoint(self.run_dir / "last", model.module, opt, {
                "epoch": st.epoch, "step": st.step, "best": st.best, "best_epoch": st.best_epoch,
                "bad_epochs": st.bad_epochs, "history": st.history})
        n_targets, secs, losses = figures
        self._progress("epoch", st, n_targets, secs, losses, record)
        if self.on_epoch is not None and self.on_epoch(st.epoch + 1, record):
            log.info("training stopped by the on_epoch callback after epoch %d", st.epoch + 1)
            return True
        return False
