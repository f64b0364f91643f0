"""Training by gradient descent, for any model: the settings (`TrainConfig`), the generic loop
(`Trainer`, with explicit `on_progress` / `on_epoch` callbacks), optimizers, checkpoints, and
`fit`, the one entry point a model's own `fit` calls. Nothing here imports a model or the
evaluation code: the caller hands over a validation policy."""

from hnvm.training.config import Trainable, TrainConfig
from hnvm.training.fit import GradientModel, Validation, fit
from hnvm.training.loop import (
    EpochCallback,
    Progress,
    ProgressCallback,
    Trainer,
    TrainingDiverged,
    TrainResult,
)
from hnvm.training.optim import AdagradMomentum, LazyAdam, clip_grad_norm, make_optimizer

__all__ = [
    "AdagradMomentum", "EpochCallback", "GradientModel", "LazyAdam", "Progress", "ProgressCallback",
    "TrainConfig", "TrainResult", "Trainable", "Trainer", "TrainingDiverged", "Validation",
    "clip_grad_norm", "fit", "make_optimizer",
]
