"""Honest evaluation: full ranking over every train item, conservative ties (docs/design.md, "Evaluation").

Evaluation only calls `model.score` / `model.score_sessions` and ranks; it never sees model
internals. Memory is bounded: a batch holds at most MAX_SCORES scores ([K, n_items + 1]),
whatever the catalogue size. Under torchrun the batches are sharded over the ranks and the
ranks gathered, so every process gets the same metrics (early stopping agrees).
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

from hnvm import distributed
from hnvm.atomic import atomic_file
from hnvm.basket_metrics import repeat_explore_metrics, repeat_share
from hnvm.contract import Recommender
from hnvm.data.batches import Sequences, next_item_batches, next_session_batches
from hnvm.metrics import (
    DEFAULT_KS,
    conservative_ranks,
    item_metrics,
    pad_item_sets,
    session_rank_metrics,
    session_target_ranks,
    topk_items,
)

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


# scores are [targets, n_items + 1] floats: a batch holds at most this many of them (128 MiB),
# so that evaluation memory stays bounded whatever the catalogue size
MAX_SCORES = 1 << 25


def _device(model: Recommender) -> torch.device:
    d = getattr(model, "device", None)
    return d if isinstance(d, torch.device) else torch.device("cpu")


def _rows_cap(model: Recommender, seq: Sequences, wanted: int) -> int:
    """At most `wanted` rows per batch, fewer when the catalogue is large (MAX_SCORES)."""
    n_items = getattr(model, "n_items", 0) or int(seq.items.max(initial=0))
    return max(1, min(wanted, MAX_SCORES // (n_items + 1)))


def _in_order(ctx: distributed.DistContext, key: torch.Tensor, *cols: torch.Tensor) -> list[torch.Tensor]:
    """Gather per-row columns from all ranks and put the rows back in single-process order
    (`key` = global batch number of each row; ranks hold interleaved batches)."""
    if not ctx.distributed:
        return list(cols)
    key, *cols = ctx.gather_rows([key, *cols])  # type: ignore[assignment]
    order = torch.sort(key, stable=True).indices
    return [c[order] for c in cols]


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
    sessions and the session prefix. Under torchrun every rank scores its shard of the
    batches and all ranks get the same, complete result."""
    t0 = time.perf_counter()
    ctx, dev = distributed.current(), _device(model)
    all_ranks: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    meta: list[np.ndarray] = []
    batches = next_item_batches(seq, split, include_first=include_first,
                                max_targets=_rows_cap(model, seq, max_targets),
                                rank=ctx.rank, world_size=ctx.world_size)
    for i, batch in enumerate(batches):
        scores = model.score(batch.to(dev) if dev.type != "cpu" else batch)
        ranks = conservative_ranks(scores, batch.targets.to(dev)).cpu()
        all_ranks.append(ranks)
        keys.append(torch.full((len(ranks),), i * ctx.world_size + ctx.rank, dtype=torch.long))
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
    key = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)
    if keep_ranks:
        m_t = torch.from_numpy(np.concatenate(meta)) if meta else torch.zeros((0, 4), dtype=torch.long)
        ranks, m_t = _in_order(ctx, key, ranks, m_t)
    else:
        (ranks,) = _in_order(ctx, key, ranks)
    metrics = item_metrics(ranks, ks) if len(ranks) else {}
    frame = None
    if keep_ranks and len(m_t):
        m = m_t.numpy()
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
    """Predict the whole held-out session of each user from earlier sessions only (sharded
    over ranks under torchrun, like evaluate_next_item).

    Every target of a user's set S (the session's distinct items) gets its conservative
    full-catalogue rank, the next-item rule: every other item with an equal score, other
    targets included, ranks above it (`metrics.session_target_ranks`). The metrics come from
    these ranks alone (`metrics.session_rank_metrics`), so item ids never decide a tie.

    With `keep_ranks`, `ranks` has one row per user: user, session, n_targets (|S|), targets
    (the ids of S, ascending), target_ranks (each target's rank, aligned with targets),
    first_hit_rank (the best of them) and topk (the max(ks) items a user would be shown, ties
    to the lower id, 0-padded beyond the catalogue; only repeat_share@k reads it).
    Every reported metric can be recomputed from target_ranks with
    `metrics.session_rank_metrics`; target_repeat (aligned with targets: was the item in the
    user's earlier sessions?) gives the repeat/explore breakdown, recall_repeat@k and
    recall_explore@k, and topk_repeat repeat_share@k (`hnvm.basket_metrics`)."""
    t0 = time.perf_counter()
    ctx, dev = distributed.current(), _device(model)
    kmax = max(ks)
    tops: list[torch.Tensor] = []
    top_rep: list[torch.Tensor] = []  # per user: which of the shown items were in the user's history
    sets: list[torch.Tensor] = []  # per user: target ids [|S|]
    tranks: list[torch.Tensor] = []  # per user: their conservative ranks [|S|]
    repeats: list[torch.Tensor] = []  # per user: whether each target was in the user's history [|S|]
    users: list[torch.Tensor] = []
    sids: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    batches = next_session_batches(seq, split, max_users=_rows_cap(model, seq, max_users),
                                   rank=ctx.rank, world_size=ctx.world_size)
    for i, (batch, target_sets) in enumerate(batches):
        scores = model.score_sessions(batch.to(dev) if dev.type != "cpu" else batch)
        tsets = [torch.from_numpy(np.unique(s)).long() for s in target_sets]
        padded = pad_item_sets(tsets)
        # [b, m]: one pass over `scores` per set slot; 0 in the padding slots
        r = session_target_ranks(scores, padded.to(scores.device)).cpu()
        tranks.extend(r[j, : len(t)] for j, t in enumerate(tsets))
        repeats.extend(torch.isin(t, batch.sessions[j]) for j, t in enumerate(tsets))  # in its history?
        sets.extend(tsets)
        top = topk_items(scores, kmax).cpu()  # what each user would be shown
        tops.append(top)
        top_rep.append(torch.stack([torch.isin(top[j], batch.sessions[j]) for j in range(len(top))])
                       if len(top) else torch.zeros((0, kmax), dtype=torch.bool))
        users.append(batch.users)
        assert batch.session_ids is not None
        sids.append(batch.session_ids)
        keys.append(torch.full((len(target_sets),), i * ctx.world_size + ctx.rank, dtype=torch.long))
        if progress:
            progress(len(target_sets))

    def cat(xs: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat(xs) if xs else torch.zeros(shape, dtype=torch.long)

    key = cat(keys, (0,))
    topk, users_t, sids_t = cat(tops, (0, kmax)), cat(users, (0,)), cat(sids, (0,))
    topk_rep = torch.cat(top_rep) if top_rep else torch.zeros((0, kmax), dtype=torch.bool)
    if ctx.distributed:
        sets, tranks, rep_long = _gather_ragged(ctx, key, sets, tranks, [x.long() for x in repeats])
        repeats = [x.bool() for x in rep_long]
        users_t, sids_t, topk, rep_l = _in_order(ctx, key, users_t, sids_t, topk, topk_rep.long())
        topk_rep = rep_l.bool()
    if not sets:
        return EvalResult("next-session", split, {}, 0, time.perf_counter() - t0)
    ranks = pad_item_sets(tranks)  # [n_users, max |S|], 0 = padding
    repeat = pad_item_sets([x.long() for x in repeats]).bool()
    metrics = {**session_rank_metrics(ranks, ks), **repeat_explore_metrics(ranks, repeat, ks),
               **repeat_share(topk, topk_rep, ks)}
    frame = _session_frame(users_t, sids_t, sets, tranks, ranks, topk, repeats, topk_rep) if keep_ranks else None
    return EvalResult("next-session", split, metrics, len(sets), time.perf_counter() - t0, frame)


def _gather_ragged(ctx: distributed.DistContext, key: torch.Tensor,
                   *columns: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per-user ragged columns (target sets, their ranks, ...: one tensor of |S| values per user,
    aligned across columns) from every rank, in single-process order: they travel flat with
    their lengths."""
    lens_t = torch.tensor([len(x) for x in columns[0]], dtype=torch.long)
    flat = [torch.cat(c) if c else torch.zeros(0, dtype=torch.long) for c in columns]
    g_key, g_len, *g_flat = ctx.gather_rows([key, lens_t, *flat])
    order = torch.sort(g_key, stable=True).indices.tolist()
    lens = g_len.tolist()
    return [[parts[j] for j in order] for parts in (f.split(lens) for f in g_flat)]


def _session_frame(users: torch.Tensor, sessions: torch.Tensor, sets: list[torch.Tensor],
                   tranks: list[torch.Tensor], ranks: torch.Tensor, topk: torch.Tensor,
                   repeats: list[torch.Tensor], topk_repeat: torch.Tensor) -> pl.DataFrame:
    """The next-session ranks export: one row per user (see evaluate_next_session)."""
    first = ranks.masked_fill(ranks == 0, torch.iinfo(torch.long).max).amin(dim=1)
    return pl.DataFrame({
        "user": users.numpy(),
        "session": sessions.numpy(),
        "n_targets": np.array([len(s) for s in sets], dtype=np.int64),
        "targets": [s.tolist() for s in sets],
        "target_ranks": [r.tolist() for r in tranks],
        "target_repeat": [x.tolist() for x in repeats],
        "first_hit_rank": first.numpy(),
        "topk": topk.numpy().tolist(),
        "topk_repeat": topk_repeat.numpy().tolist(),
    }, schema_overrides={"targets": pl.List(pl.Int64), "target_ranks": pl.List(pl.Int64),
                         "target_repeat": pl.List(pl.Boolean),
                         "topk": pl.List(pl.Int64), "topk_repeat": pl.List(pl.Boolean)})


def export_ranks(result: EvalResult, path: Path) -> None:
    """Write the per-target ranks as parquet (atomically)."""
    if result.ranks is None:
        raise ValueError("evaluation was run without keep_ranks=True")
    ranks = result.ranks
    atomic_file(path, lambda tmp: ranks.write_parquet(tmp))


@dataclass(frozen=True)
class ValidationPolicy:
    """What early stopping reads during training (`hnvm.training.fit(validation=...)`): the
    full-ranking metrics of `task` on every target of `split`, scored `batch_targets` targets
    (next item) or users (next session) at a time. The metric early stopping compares is
    train.metric (TrainConfig)."""

    task: str = "next-item"  # or "next-session"
    split: str = "valid"
    batch_targets: int = 1024

    def __post_init__(self) -> None:
        if self.task not in ("next-item", "next-session"):
            raise ValueError(f"unknown validation task {self.task!r} (next-item or next-session)")

    def applies(self, seq: Sequences) -> bool:
        """Whether `seq` has sessions of the split to validate on."""
        return len(seq.sessions_of(self.split)) > 0

    def __call__(self, model: Recommender, seq: Sequences) -> dict[str, float]:
        if self.task == "next-item":
            return evaluate_next_item(model, seq, self.split, max_targets=self.batch_targets).metrics
        return evaluate_next_session(model, seq, self.split, max_users=self.batch_targets).metrics


NEXT_ITEM_VALIDATION = ValidationPolicy()  # the default of runs, tune and benchmark
