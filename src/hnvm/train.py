"""One generic training loop. It knows nothing about any model: a model hands it a
`Trainable` (an nn.Module, a batch iterator and a loss function) and a validation callback.

Checkpoints (safetensors + JSON, written atomically) go to RUN/last every epoch and RUN/best
at the best validation score; RUN/train_log.jsonl gets one JSON line per epoch (and per
`log_every` steps). `resume=True` continues from RUN/last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hnvm.config import choices, rng
from hnvm.errors import HnvmError

log = logging.getLogger(__name__)


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


class Trainable(Protocol):
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
        idx, val = g.indices()[0], g.values()
        if group["weight_decay"]:
            val = val.add(p[idx], alpha=group["weight_decay"])
        acc = st["sum"][idx].addcmul_(val, val)
        st["sum"].index_copy_(0, idx, acc)
        upd = val / (acc + group["eps"]).sqrt()
        if group["momentum"]:
            v = st["velocity"][idx].mul_(group["momentum"]).add_(upd, alpha=-group["lr"])
            st["velocity"].index_copy_(0, idx, v)
            p.index_add_(0, idx, v)
        else:
            p.index_add_(0, idx, upd, alpha=-group["lr"])


def make_optimizer(params: Iterable[Any], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return AdagradMomentum(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
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


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict[str, Any]]


class Trainer:
    """Fits a Trainable: optimizer, early stopping on a validation metric, checkpoints."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, *,
                 show_progress: bool = False, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.show_progress = show_progress
        self.resume = resume

    def _log(self, record: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "train_log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def fit(self, model: Trainable, validate: Callable[[], dict[str, float]] | None) -> TrainResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        module = model.module
        opt = make_optimizer(module.parameters(), cfg)
        start_epoch, step = 0, 0
        best, best_epoch, bad_epochs = -math.inf, -1, 0
        history: list[dict[str, Any]] = []
        best_state: dict[str, torch.Tensor] | None = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        last = self.run_dir / "last" if self.run_dir else None
        if self.resume:
            if last is None or not (last / "state.json").exists():
                raise HnvmError(f"{self.run_dir}: nothing to resume (no checkpoint in last/)")
            st = json.loads((last / "state.json").read_text())
            module.load_state_dict(read_weights(last))
            from safetensors.torch import load_file

            _restore_optimizer(opt, load_file(str(last / "optimizer.safetensors")),
                               json.loads((last / "optimizer.json").read_text()))
            torch.set_rng_state(load_file(str(last / "rng.safetensors"))["torch"])
            start_epoch, step = st["epoch"] + 1, st["step"]
            best, best_epoch, bad_epochs = st["best"], st["best_epoch"], st["bad_epochs"]
            history = st.get("history", [])
            log.info("resuming at epoch %d (step %d)", start_epoch, step)

        for epoch in range(start_epoch, cfg.epochs):
            if cfg.patience and bad_epochs >= cfg.patience:
                break
            module.train()
            gen = np.random.default_rng([cfg.seed, epoch])
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            n_batches = n_targets = 0
            bar = self._bar(epoch)
            for batch in model.train_batches(epoch, gen):
                parts = model.loss(batch, step)
                loss = parts["loss"]
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {step}; the last good "
                        f"checkpoint is kept in {last or 'memory'} (try a lower train.lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                n_batches += 1
                k = model.batch_targets(batch)
                n_targets += k
                for name, v in parts.items():
                    sums[name] = sums.get(name, 0.0) + float(v.detach())
                if bar is not None:
                    rate = n_targets / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix({n: f"{v / n_batches:.4g}" for n, v in sums.items()}
                                    | {"tgt/s": f"{rate:,.0f}"}, refresh=False)
                    bar.update(k)
                if step % cfg.log_every == 0:
                    self._log({"type": "step", "epoch": epoch + 1, "step": step,
                               **{n: float(v.detach()) for n, v in parts.items()}})
            if bar is not None:
                bar.close()
            secs = time.perf_counter() - t0
            record: dict[str, Any] = {
                "type": "epoch", "epoch": epoch + 1, "step": step, "seconds": round(secs, 3),
                "targets_per_s": round(n_targets / max(secs, 1e-9), 1),
                **{n: v / max(n_batches, 1) for n, v in sums.items()},
            }
            if validate is not None:
                module.eval()
                metrics = validate()
                score = metrics.get(cfg.metric, float("nan"))
                record["valid"] = metrics
                if score > best:
                    best, best_epoch, bad_epochs = score, epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                    if self.run_dir is not None:
                        write_checkpoint(self.run_dir / "best", module, None,
                                         {"epoch": epoch, "score": score, "metric": cfg.metric})
                else:
                    bad_epochs += 1
            else:
                best_epoch = epoch + 1
            history.append(record)
            self._log(record)
            log.info("epoch %d: %s", epoch + 1, record)
            if self.run_dir is not None:
                write_checkpoint(last, module, opt, {  # type: ignore[arg-type]
                    "epoch": epoch, "step": step, "best": best, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "history": history})
        if best_state is not None:
            module.load_state_dict(best_state)
        elif validate is not None and self.run_dir is not None and (self.run_dir / "best").exists():
            module.load_state_dict(read_weights(self.run_dir / "best"))  # resumed after the best
        return TrainResult(best_epoch, best, len(history), history)

    def _bar(self, epoch: int) -> Any:
        if not self.show_progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="tgt", leave=False,
                    dynamic_ncols=True)
