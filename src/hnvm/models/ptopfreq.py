"""P-TopFreq: each user's own most frequent items, ties broken by global popularity.

The baseline that next-basket studies show most neural models fail to beat where people buy
again. Scores are count_u(i) + pop(i) / (max pop + 1), so a user's own frequency always
dominates and global popularity only orders ties (and users without history).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hnvm.contract import Batch
from hnvm.data.sampling import train_counts
from hnvm.models.base import load_model_files, register, save_model_files

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@register("ptopfreq")
class PTopFreq:
    name = "ptopfreq"

    def __init__(self, include_current: bool = True) -> None:
        # include_current: in next-item scoring, count the items of the session prefix too
        self.include_current = include_current
        self.pop_: torch.Tensor | None = None

    def fit(self, train: Dataset, **_: Any) -> PTopFreq:
        counts = train_counts(train)
        self.pop_ = counts / (counts.max() + 1.0)
        return self

    def _user_counts(self, sessions: torch.Tensor) -> torch.Tensor:
        """Float[B, n_items + 1]: item counts over the given sessions [B, N, T]."""
        assert self.pop_ is not None, "fit or load the model first"
        flat = sessions.reshape(sessions.shape[0], -1)
        out = torch.zeros(flat.shape[0], self.pop_.numel())
        out.scatter_add_(1, flat, torch.ones_like(flat, dtype=out.dtype))
        out[:, 0] = 0
        return out + self.pop_

    def score(self, batch: Batch) -> torch.Tensor:
        history = self._user_counts(batch.sessions[:, :-1])  # [B, I]
        scores = history[batch.target_rows]  # [K, I]
        if self.include_current:
            cur = batch.sessions[batch.target_rows, -1]  # [K, T]
            t = torch.arange(cur.shape[1]).unsqueeze(0)
            prefix = torch.where(t < batch.target_pos.unsqueeze(1), cur, torch.zeros_like(cur))
            add = torch.zeros_like(scores)
            add.scatter_add_(1, prefix, torch.ones_like(prefix, dtype=add.dtype))
            add[:, 0] = 0
            scores = scores + add
        return scores

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        return self._user_counts(batch.sessions)

    def config(self) -> dict[str, Any]:
        return {"include_current": self.include_current}

    def save(self, path: Path) -> None:
        assert self.pop_ is not None
        save_model_files(Path(path), self.name, self.config(), {"pop": self.pop_})

    @classmethod
    def load(cls, path: Path) -> PTopFreq:
        meta, t = load_model_files(Path(path))
        m = cls(**meta["config"])
        m.pop_ = t["pop"]
        return m
