"""Settings of the training loop (section [train] of a config file) and what a model hands
the loop to be trained (`Trainable`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hnvm.config import choices, rng


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop (section [train] of a config file)."""

    epochs: int = field(default=20, metadata=rng(1, 10_000))
    optimizer: str = field(default="adam", metadata=choices("adagrad", "adam"))
    lr: float = field(default=0.002, metadata=rng(1e-6, 10.0))
    momentum: float = field(default=0.0, metadata=rng(0.0, 0.999, "Adagrad momentum (paper)"))
    adagrad_initial_accumulator: float = field(default=0.0, metadata=rng(
        0.0, 100.0, "Adagrad's initial sum of squared gradients (0: torch, GRU4Rec; TensorFlow: 0.1)"))
    weight_decay: float = field(default=0.0, metadata=rng(0.0, 1.0))
    grad_clip: float = field(default=0.0, metadata=rng(0.0, 1e6, "max grad norm; 0 = off"))
    patience: int = field(default=3, metadata=rng(0, 1000, "epochs without improvement; 0 = off"))
    metric: str = field(default="mrr@5", metadata=choices(
        "mrr@5", "recall@5", "ndcg@5", "mrr@10", "recall@10", "mrr@20", "recall@20"))
    # what early stopping, best-epoch selection and `hnvm tune` read on the validation split
    validate: str = field(default="next-item", metadata=choices(
        "next-item", "next-session", doc="validation task of early stopping and tuning (train.metric on it)"))
    seed: int = field(default=0, metadata=rng(0, 2**31 - 1))
    log_every: int = field(default=50, metadata=rng(1, 10**9))
    device: str = field(default="auto", metadata=choices(
        "auto", "cpu", "cuda", doc="auto = CUDA when available (one GPU per process under torchrun)"))
    bf16: bool = True  # bf16 autocast of the training forward pass on CUDA (evaluation stays fp32)


class Trainable(Protocol):
    """What a model hands the Trainer (its `trainable(...)` method builds one). Optional extras:
    `train_batches` may take keyword arguments `rank` and `world_size` and return only that
    rank's shard (the same number of batches on every rank), otherwise the Trainer strides over
    the full sequence; a method `to(device)` moves the trainable's own tensors (sampling tables,
    ...) to the device; `fits_valid = True` says it trains on the validation split too, so
    `hnvm.training.fit` does not validate on it; `selectable(step) -> bool` says whether the
    weights after `step` optimizer steps may be selected as the best epoch (HNVM: once its KL
    warm-up has ended); `diagnostics() -> dict` adds figures to each epoch's record (under
    "latent"; it must not draw random numbers)."""

    module: nn.Module

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]: ...

    def loss(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """'loss' is minimised; other entries (scalars) are logged."""
        ...

    def batch_targets(self, batch: Any) -> int: ...
