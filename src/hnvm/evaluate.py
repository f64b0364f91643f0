"""Honest evaluation: full ranking over every train item, conservative ties (DESIGN §7).

Evaluation only calls `model.score` / `model.score_sessions` and ranks; it never sees model
internals. Memory is bounded by the batch size in targets (scores are [K, n_items + 1]).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from hnvm.data.batches import Sequences, next_item_batches, next_session_batches
from hnvm.metrics import (
    DEFAULT_KS,
    conservative_ranks,
    item_metrics,
    session_first_hit_ranks,
    session_metrics,
    topk_items,
)
from hnvm.models.base import Recommender

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    task: str
    split: str
    metrics: dict[str, float]
    n_targets: int
    seconds: float
    ranks: pl.DataFrame | None = None  # one row per target (next-item) or per user (next-session)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "split": self.split, "n_targets": self.n_targets,
                "seconds": round(self.seconds, 3), "metrics": self.metrics, **self.extra}


@torch.no_grad()
def evaluate_next_item(
    model: Recommender,
    seq: Sequences,
    split: str = "test",
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    include_first: bool = False,
    max_targets: int = 512,
    keep_ranks: bool = False,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Rank each target item of `split` sessions among all items given the user's earlier
    sessions and the session prefix."""
    t0 = time.perf_counter()
    all_ranks: list[torch.Tensor] = []
    meta: list[np.ndarray] = []
    for batch in next_item_batches(seq, split, include_first=include_first, max_targets=max_targets):
        scores = model.score(batch)
        ranks = conservative_ranks(scores, batch.targets)
        all_ranks.append(ranks)
        if keep_ranks:
            assert batch.session_ids is not None
            meta.append(np.stack([
                batch.users[batch.target_rows].numpy(),
                batch.session_ids[batch.target_rows].numpy(),
                batch.target_pos.numpy(),
                batch.targets.numpy(),
            ], axis=1))
        if progress:
            progress(batch.n_targets)
    ranks = torch.cat(all_ranks) if all_ranks else torch.zeros(0, dtype=torch.long)
    metrics = item_metrics(ranks, ks) if len(ranks) else {}
    frame = None
    if keep_ranks and meta:
        m = np.concatenate(meta)
        frame = pl.DataFrame({"user": m[:, 0], "session": m[:, 1], "position": m[:, 2], "item": m[:, 3],
                              "rank": ranks.numpy()})
    return EvalResult("next-item", split, metrics, len(ranks), time.perf_counter() - t0, frame)


@torch.no_grad()
def evaluate_next_session(
    model: Recommender,
    seq: Sequences,
    split: str = "test",
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    max_users: int = 256,
    keep_ranks: bool = False,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Predict the whole held-out session of each user from earlier sessions only."""
    t0 = time.perf_counter()
    kmax = max(ks)
    tops, sets, users, sids, first = [], [], [], [], []
    for batch, target_sets in next_session_batches(seq, split, max_users=max_users):
        scores = model.score_sessions(batch)
        tops.append(topk_items(scores, kmax))
        tsets = [torch.from_numpy(s) for s in target_sets]
        sets.extend(tsets)
        users.append(batch.users.numpy())
        assert batch.session_ids is not None
        sids.append(batch.session_ids.numpy())
        if keep_ranks:
            first.append(session_first_hit_ranks(scores, tsets))
        if progress:
            progress(len(target_sets))
    if not tops:
        return EvalResult("next-session", split, {}, 0, time.perf_counter() - t0)
    topk = torch.cat(tops)
    metrics = session_metrics(topk, sets, ks)
    frame = None
    if keep_ranks:
        frame = pl.DataFrame({
            "user": np.concatenate(users),
            "session": np.concatenate(sids),
            "n_targets": [len(s) for s in sets],
            "first_hit_rank": torch.cat(first).numpy(),
            "topk": topk.numpy().tolist(),
        })
    return EvalResult("next-session", split, metrics, len(sets), time.perf_counter() - t0, frame)


def export_ranks(result: EvalResult, path: Path) -> None:
    """Write the per-target ranks as parquet (atomically)."""
    if result.ranks is None:
        raise ValueError("evaluation was run without keep_ranks=True")
    tmp = path.with_name(f".{path.name}.tmp")
    result.ranks.write_parquet(tmp)
    tmp.replace(path)
