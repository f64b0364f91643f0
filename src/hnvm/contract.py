"""The scoring contract: the bottom layer that data, models, evaluation and serving import.

Evaluation never sees model internals: it builds a `Batch`, calls `score` (next item) or
`score_sessions` (next session) and ranks the result over the full catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@dataclass
class Batch:
    """Consecutive sessions of B users, oldest first, right-aligned in the session axis.

    sessions[b, n, t] is the t-th item of user b's n-th session in this window (0 = padding).
    Empty sessions appear only at the start of the session axis (left padding), so the last
    session of every row sits at index N-1.

    For next-item scoring the last session is the one being predicted and the targets are
    (target_rows[k], target_pos[k]): the item at sessions[target_rows[k], -1, target_pos[k]]
    is predicted from the sessions before and items [0, target_pos[k]) of the last one.
    For next-session scoring `sessions` holds history only and targets are unused.
    """

    users: torch.Tensor  # Long[B], 0 = unknown user
    sessions: torch.Tensor  # Long[B, N, T]
    target_rows: torch.Tensor  # Long[K]
    target_pos: torch.Tensor  # Long[K]
    session_ids: torch.Tensor | None = None  # Long[B]: dataset id of each row's last session

    @property
    def targets(self) -> torch.Tensor:
        """Long[K]: the item id of each target."""
        return self.sessions[self.target_rows, -1, self.target_pos]

    @property
    def n_targets(self) -> int:
        return int(self.target_rows.numel())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.users.to(device), self.sessions.to(device), self.target_rows.to(device),
                     self.target_pos.to(device), self.session_ids)


@runtime_checkable
class Recommender(Protocol):
    """What every model offers. Hyper-parameters are constructor keyword arguments; learned
    state is set in `fit`, which returns self."""

    name: ClassVar[str]

    def fit(self, train: Dataset, **options: Any) -> Recommender:
        """Learn from `train`'s training split; returns self. Gradient-trained models take the
        options of `hnvm.training.fit` (train_cfg, validation, run_dir, callbacks, ...); the
        others ignore them."""
        ...

    def score(self, batch: Batch) -> torch.Tensor:
        """Float[K, n_items + 1]: scores of every item for each next-item target (column 0 is
        padding and is ignored by ranking)."""
        ...

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        """Float[B, n_items + 1]: scores for the next session of each row, from history only."""
        ...

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Recommender: ...
