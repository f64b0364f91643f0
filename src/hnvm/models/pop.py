"""POP: recommend the items with the most training interactions to everyone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hnvm.contract import Batch
from hnvm.data.sampling import train_counts
from hnvm.models.base import load_model_files, register, save_model_files

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@register("pop")
class Pop:
    """The paper's POP baseline: global popularity in the training split."""

    name = "pop"

    def __init__(self) -> None:
        self.counts_: torch.Tensor | None = None

    def fit(self, train: Dataset, **_: Any) -> Pop:
        self.counts_ = train_counts(train)
        return self

    def _scores(self, n: int) -> torch.Tensor:
        assert self.counts_ is not None, "fit or load the model first"
        return self.counts_.unsqueeze(0).expand(n, -1)

    def score(self, batch: Batch) -> torch.Tensor:
        return self._scores(batch.n_targets)

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        return self._scores(len(batch.users))

    def config(self) -> dict[str, Any]:
        return {}

    def save(self, path: Path) -> None:
        assert self.counts_ is not None
        save_model_files(Path(path), self.name, self.config(), {"counts": self.counts_})

    @classmethod
    def load(cls, path: Path) -> Pop:
        _, t = load_model_files(Path(path))
        m = cls()
        m.counts_ = t["counts"]
        return m
