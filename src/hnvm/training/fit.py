"""The one entry point that fits a model by gradient descent: `fit(model, train, ...)`.

A gradient-trained model offers two methods and nothing about the loop:

    model.trainable(train, seq, cfg) -> Trainable   # a fresh network + batches + loss
    model.after_fit(trainable) -> None              # optional: post-training fix-ups (cold start)

and its own `fit` is one line that calls this function. The caller (runs, tune, benchmark, a
user's script) chooses the validation policy: any `Validation` (in practice
`hnvm.evaluate.ValidationPolicy`: task, split and the number of targets), so that the loop knows
no evaluation code and the models know no validation policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from hnvm.data.batches import Sequences
from hnvm.training.config import Trainable, TrainConfig
from hnvm.training.loop import EpochCallback, ProgressCallback, Trainer, TrainResult

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


class Validation(Protocol):
    """A validation policy: which metrics early stopping reads, computed from the model."""

    def applies(self, seq: Sequences) -> bool:
        """Whether `seq` holds anything to validate on (else training runs without validation)."""
        ...

    def __call__(self, model: Any, seq: Sequences) -> dict[str, float]:
        """The validation metrics of `model` (in eval mode) on `seq`."""
        ...


class GradientModel(Protocol):
    """What `fit` needs of a model (`name` is its registered name, for progress reports)."""

    name: str
    result_: TrainResult | None

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> Trainable: ...


M = TypeVar("M", bound=GradientModel)


def fit(model: M, train: Dataset, *, train_cfg: TrainConfig | None = None, validation: Validation | None = None,
        seq: Sequences | None = None, run_dir: Path | None = None, resume: bool = False,
        show_progress: bool = False, on_progress: ProgressCallback | None = None,
        on_epoch: EpochCallback | None = None) -> M:
    """Fit `model` on `train` with the generic Trainer and return it.

    train_cfg: the loop's settings (default TrainConfig()). validation: early stopping on
    `train_cfg.metric` of what it returns; None trains every epoch and keeps the last. seq:
    `train` as Sequences if the caller has it (built here otherwise). run_dir/resume:
    checkpoints and the train log (see `hnvm.training.loop`). on_progress/on_epoch: the loop's
    callbacks; show_progress logs progress when on_progress is None. Sets `model.result_`;
    an unknown keyword (a misspelt option) is a TypeError, never silently ignored.
    """
    cfg = train_cfg or TrainConfig()
    seq = seq if seq is not None else Sequences.from_events(train.events, train.n_users, train.held_out_items)
    torch.manual_seed(cfg.seed)  # the network's initial weights
    trainable = model.trainable(train, seq, cfg)
    validate = None
    if validation is not None and validation.applies(seq) and not getattr(trainable, "fits_valid", False):
        def validate() -> dict[str, float]:
            return validation(model, seq)

    trainer = Trainer(cfg, run_dir, show_progress=show_progress, resume=resume, on_progress=on_progress,
                      on_epoch=on_epoch, name=model.name)
    model.result_ = trainer.fit(trainable, validate)
    after = getattr(model, "after_fit", None)
    if after is not None:
        after(trainable)
    trainable.module.eval()
    return model
