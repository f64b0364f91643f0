"""Ranking and metrics: pure functions over score matrices, ranks and top-k lists.

Conventions (docs/design.md, "Evaluation"):

* Item id 0 is padding. Every score matrix has ``n_items`` columns including column 0, which is
  treated as ``-inf``: it is never ranked, never recommended and never a target.
* Next-item ranks are full-catalogue and *conservative*: a target tied with other items is
  placed after all of them, so ``rank = 1 + #(score > s_t) + #(other items with score == s_t)``.
  A model that scores everything equally therefore gets the worst rank, not an average one.
* Next-session metrics use the same rule: for a set of targets, every other item with an equal
  score (including the other targets) ranks above each of them, so each target's rank is its
  next-item conservative rank (:func:`session_target_ranks`), and the metrics are computed from
  these per-target ranks (:func:`session_rank_metrics`). Item ids never break a tie in a metric.
* :func:`topk_items` gives the list a user would be shown, in a fully deterministic order
  (score descending, then lower item id first); :func:`session_metrics` scores such a given
  list. Evaluation does not use it for metrics: with ties at the cut-off a list favours
  whichever ids are lower.
* A cut-off ``k`` larger than the catalogue is well defined: the top-k of a catalogue of fewer
  than ``k`` items is the whole catalogue (``topk_items`` pads the list with 0).
* Target sets are given either as a sequence of 1-D id tensors or as a padded ``[n, m]``
  LongTensor with 0 as padding (see :func:`pad_item_sets`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from hnvm.errors import NonFiniteScores

__all__ = [
    "DEFAULT_KS",
    "conservative_ranks",
    "item_metrics",
    "pad_item_sets",
    "per_target_item_metrics",
    "per_user_session_metrics",
    "per_user_session_rank_metrics",
    "session_first_hit_ranks",
    "session_metrics",
    "session_rank_metrics",
    "session_target_ranks",
    "topk_items",
]

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)

ItemSets = Sequence[Tensor] | Tensor


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [n, n_items], got shape {tuple(scores.shape)}")
    if scores.shape[1] < 2:
        raise ValueError("scores need at least one real item besides padding column 0")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real-valued, got dtype {scores.dtype}")
    # NaN compares False with everything, which would silently rank it last (or the target
    # first); a NaN score is a model bug, so refuse it. Column 0 is ignored anyway.
    if scores.is_floating_point() and torch.isnan(scores[:, 1:]).any():
        raise NonFiniteScores("scores contain NaN")


def _check_ids(ids: Tensor, n_items: int, what: str, *, allow_padding: bool) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{what} must be integer item ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    lo = 0 if allow_padding else 1
    if int(ids.min()) < lo or int(ids.max()) >= n_items:
        raise ValueError(f"{what} must be item ids in [{lo}, {n_items - 1}]")


def _ranks_unchecked(scores: Tensor, targets: Tensor) -> Tensor:
    target_scores = scores.gather(1, targets.unsqueeze(1))
    # One [n, n_items - 1] bool pass; ">=" counts the target itself once, which supplies the
    # "1 +" of the formula, and every other tied item adds one (conservative ties). The slice
    # skips column 0 without copying or mutating the caller's tensor.
    return (scores[:, 1:] >= target_scores).sum(dim=1)


def conservative_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """Full-catalogue rank of each target with conservative ties.

    ``scores``: ``[n, n_items]`` (column 0 is padding and never counts); ``targets``: ``[n]``
    item ids in ``[1, n_items)``. Returns a LongTensor ``[n]`` with values in
    ``[1, n_items - 1]``: ``1 + #(items scoring above the target) + #(other items tied with
    it)``. Raises ``ValueError`` on NaN scores, bad shapes or out-of-range targets.

    Memory: one ``[n, n_items]`` bool at a time; callers bound it by chunking rows.
    """
    _check_scores(scores)
    targets = torch.as_tensor(targets, device=scores.device)
    if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets must be 1-D of length {scores.shape[0]}, got shape {tuple(targets.shape)}"
        )
    _check_ids(targets, scores.shape[1], "targets", allow_padding=False)
    return _ranks_unchecked(scores, targets.long())


def pad_item_sets(sets: ItemSets, *, device: torch.device | str | None = None) -> Tensor:
    """Item-id sets as a padded ``[n, m]`` LongTensor (0 = padding), order kept.

    A 2-D tensor is returned as is (already padded); a sequence of 1-D tensors is padded to the
    longest. ``m`` is at least 1 so that empty inputs still have a well-defined shape.
    """
    if isinstance(sets, Tensor):
        if sets.dim() != 2:
            raise ValueError(f"padded item sets must be 2-D [n, m], got {tuple(sets.shape)}")
        return sets.to(device=device) if device is not None else sets
    rows = [torch.as_tensor(s).reshape(-1) for s in sets]
    width = max([1, *(r.numel() for r in rows)])
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r.dtype.is_floating_point or r.dtype == torch.bool:
            raise ValueError(f"item set {i} must hold integer ids, got dtype {r.dtype}")
        out[i, : r.numel()] = r.cpu()
    return out.to(device) if device is not None else out


def topk_items(scores: Tensor, k: int, exclude: ItemSets | None = None) -> Tensor:
    """Top-``k`` item ids per row, best first: LongTensor ``[n, k]``.

    Column 0 and, per row, the ids in ``exclude`` (e.g. already-seen items; a sequence of 1-D
    tensors or a 0-padded ``[n, m]`` tensor) are never returned. Order is deterministic:
    score descending, ties broken by the lower item id, so results do not depend on the
    backend's ``topk`` implementation. Items scored ``-inf`` count as masked by the model and
    are never returned either; if a row has fewer than ``k`` eligible items, the remaining
    slots are 0 (padding), which matches no target. ``k`` may exceed the catalogue
    (``n_items - 1`` real items): the whole catalogue is returned, padded with 0 to ``k``.

    Memory: one float copy of ``scores`` plus one bool of the same shape.
    """
    _check_scores(scores)
    n, n_items = scores.shape
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n_items - 1:
        # The top-k of a catalogue smaller than k is the whole catalogue, then padding.
        top = topk_items(scores, n_items - 1, exclude)
        return torch.cat([top, top.new_zeros((n, k - (n_items - 1)))], dim=1)
    # Integer scores go to float64 (exact up to 2**53) so that -inf can mask them.
    masked = scores.to(scores.dtype if scores.is_floating_point() else torch.float64, copy=True)
    masked[:, 0] = -math.inf
    if exclude is not None:
        ex = pad_item_sets(exclude, device=scores.device)
        if ex.shape[0] != n:
            raise ValueError(f"exclude must have {n} rows, got {ex.shape[0]}")
        _check_ids(ex, n_items, "exclude", allow_padding=True)
        # Padding zeros in `ex` only re-mask column 0.
        masked.scatter_(1, ex.long(), -math.inf)

    values, idx = masked.topk(k, dim=1)
    # torch.topk's order among equal scores is unspecified. Sorting the chosen ids and then
    # stable-sorting by score fixes the order inside the top-k.
    idx, _ = idx.sort(dim=1)
    values = masked.gather(1, idx)
    order = values.sort(dim=1, descending=True, stable=True).indices
    idx, values = idx.gather(1, order), values.gather(1, order)
    # Which items make the top-k is ambiguous only when items outside it tie with the k-th
    # score; those rows fall back to a full stable sort (lower ids win the tie).
    kth = values[:, -1:]
    # A -inf k-th score means the row ran out of eligible items: nothing to disambiguate.
    ambiguous = ((masked >= kth).sum(dim=1) > k) & (kth.squeeze(1) != -math.inf)
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        sub = masked[rows].sort(dim=1, descending=True, stable=True)
        idx[rows], values[rows] = sub.indices[:, :k], sub.values[:, :k]
    idx[values == -math.inf] = 0
    return idx


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in ks)
    if not out or any(k < 1 for k in out):
        raise ValueError(f"ks must be positive integers, got {out}")
    return out


def per_target_item_metrics(ranks: Tensor, k: int) -> dict[str, Tensor]:
    """Per-target next-item metrics at cut-off ``k`` from 1-based ranks ``[n]``.

    Keys ``recall@k`` (hit), ``precision@k`` (hit / k), ``mrr@k`` (1/rank within k, else 0),
    ``ndcg@k`` (1/log2(rank + 1) within k, else 0); float64 tensors ``[n]``, aligned with
    ``ranks`` for paired significance tests.
    """
    (k,) = _check_ks((k,))
    ranks = torch.as_tensor(ranks)
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be 1-D, got shape {tuple(ranks.shape)}")
    if ranks.numel() and int(ranks.min()) < 1:
        raise ValueError("ranks are 1-based; got a rank below 1")
    r = ranks.to(torch.float64)
    hit = r <= k
    zero = torch.zeros_like(r)
    return {
        f"recall@{k}": hit.to(torch.float64),
        f"precision@{k}": hit.to(torch.float64) / k,
        f"mrr@{k}": torch.where(hit, 1.0 / r, zero),
        f"ndcg@{k}": torch.where(hit, 1.0 / torch.log2(r + 1.0), zero),
    }


def item_metrics(ranks: Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean next-item Recall/Precision/MRR/NDCG@k over targets, for each ``k`` in ``ks``."""
    ks = _check_ks(ks)
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise ValueError("no ranks to average")
    out: dict[str, float] = {}
    for k in ks:
        out.update({name: float(v.mean()) for name, v in per_target_item_metrics(ranks, k).items()})
    return out


def _unique_sets(sets: Tensor) -> Tensor:
    # Sets, not multisets: a duplicated target must not count twice in |S| or in hits.
    srt = sets.long().sort(dim=1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    return srt.masked_fill(dup, 0)


def _hits(topk: Tensor, target_sets: ItemSets) -> tuple[Tensor, Tensor]:
    """Bool ``[n, K]`` (is the item at each top-k slot a target?) and float ``|S|`` ``[n]``."""
    if topk.dim() != 2:
        raise ValueError(f"topk must be 2-D [n_users, K], got shape {tuple(topk.shape)}")
    if topk.dtype.is_floating_point or topk.dtype == torch.bool:
        raise ValueError(f"topk must hold integer item ids, got dtype {topk.dtype}")
    sets = _unique_sets(pad_item_sets(target_sets, device=topk.device))
    if sets.shape[0] != topk.shape[0]:
        raise ValueError(f"{topk.shape[0]} top-k rows but {sets.shape[0]} target sets")
    if sets.numel() and int(sets.min()) < 0:
        raise ValueError("target sets hold negative item ids")
    size = (sets != 0).sum(dim=1)
    if topk.shape[0] and int(size.min()) == 0:
        raise ValueError("every user needs a non-empty target set (recall is undefined)")
    srt = topk.long().sort(dim=1).values
    if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != 0)).any()):
        raise ValueError("topk rows must not repeat an item")
    # [n, K, m] comparison; m (set size) and K are small. Padding 0 never hits.
    hits = ((topk.long().unsqueeze(2) == sets.unsqueeze(1)) & (sets != 0).unsqueeze(1)).any(2)
    return hits, size.to(torch.float64)


def per_user_session_metrics(topk: Tensor, target_sets: ItemSets, k: int) -> dict[str, Tensor]:
    """Per-user next-session metrics at ``k`` of *given* top-k lists ``[n_users, K]`` (``K >= k``).

    ``recall@k`` = |top-k ∩ S| / |S|, ``precision@k`` = |top-k ∩ S| / k, ``mrr@k`` = 1 / (slot
    of the first hit) or 0, ``ndcg@k`` = DCG / IDCG with binary gains and the ideal DCG over
    min(|S|, k) hits, ``phr@k`` = 1 if any hit; float64 tensors ``[n_users]``. The list's order
    is taken as given, so the ids that won ties when the list was made count as hits: this
    scores a list that was shown, not a model. Evaluation uses :func:`per_user_session_rank_metrics`
    (conservative ties), which equals this for lists from :func:`topk_items` when no score ties.
    """
    (k,) = _check_ks((k,))
    if topk.dim() == 2 and topk.shape[1] < k:
        raise ValueError(f"topk has {topk.shape[1]} columns, fewer than k={k}")
    hits, size = _hits(topk, target_sets)
    return _session_at_k(hits, size, k)


def _session_at_k(hits: Tensor, size: Tensor, k: int) -> dict[str, Tensor]:
    h = hits[:, :k].to(torch.float64)
    n_hit = h.sum(dim=1)
    slots = torch.arange(1, k + 1, dtype=torch.float64, device=h.device)
    discount = 1.0 / torch.log2(slots + 1.0)
    # IDCG: the best possible list puts min(|S|, k) hits in the first slots.
    ideal = torch.cat([discount.new_zeros(1), discount.cumsum(0)])
    idcg = ideal[size.clamp(max=k).long()]
    # First hit: the largest of (hit / slot) over slots is 1 / (first hit slot), 0 if none.
    rr = (h / slots).amax(dim=1)
    return {
        f"recall@{k}": n_hit / size,
        f"precision@{k}": n_hit / k,
        f"mrr@{k}": rr,
        f"ndcg@{k}": (h * discount).sum(dim=1) / idcg,
        f"phr@{k}": (n_hit > 0).to(torch.float64),
    }


def session_metrics(
    topk: Tensor, target_sets: ItemSets, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean next-session Recall/Precision/MRR/NDCG/PHR@k over users of given top-k lists (see
    :func:`per_user_session_metrics`; evaluation uses :func:`session_rank_metrics`); ``topk``
    needs at least ``max(ks)`` columns."""
    ks = _check_ks(ks)
    if topk.dim() == 2 and topk.shape[1] < max(ks):
        raise ValueError(f"topk has {topk.shape[1]} columns, fewer than max(ks)={max(ks)}")
    hits, size = _hits(topk, target_sets)
    if hits.shape[0] == 0:
        raise ValueError("no users to average")
    out: dict[str, float] = {}
    for k in ks:
        out.update({name: float(v.mean()) for name, v in _session_at_k(hits, size, k).items()})
    return out


def _first_occurrences(sets: Tensor) -> Tensor:
    """``sets`` ``[n, m]`` with every repeat of an id earlier in its row set to 0 (order kept)."""
    if sets.shape[1] < 2:
        return sets
    srt, order = sets.sort(dim=1, stable=True)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    # the stable sort keeps the first occurrence of each id before its repeats
    return sets.masked_fill(torch.zeros_like(dup).scatter_(1, order, dup), 0)


def session_target_ranks(scores: Tensor, target_sets: ItemSets) -> Tensor:
    """Conservative full-catalogue rank of every target of every user's set.

    ``scores``: ``[n_users, n_items]`` (column 0 is padding); ``target_sets``: a sequence of 1-D
    id tensors or a 0-padded ``[n_users, m]`` tensor. Returns a LongTensor ``[n_users, m]``
    aligned with ``pad_item_sets(target_sets)``: the rank of that target,
    ``1 + #(items scoring above it) + #(other items tied with it, other targets included)``,
    i.e. its next-item conservative rank (docs/design.md, "Evaluation"), and 0 where the slot is padding or
    repeats an id seen earlier in the row (a set, not a multiset). One ``[n_users, n_items]``
    pass per set slot, not per item.
    """
    _check_scores(scores)
    sets = pad_item_sets(target_sets, device=scores.device)
    if sets.shape[0] != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {sets.shape[0]} target sets")
    _check_ids(sets, scores.shape[1], "target sets", allow_padding=True)
    sets = _first_occurrences(sets.long())
    out = torch.zeros_like(sets)
    for j in range(sets.shape[1]):
        col = sets[:, j]
        valid = col != 0
        if valid.any():
            # Padding slots rank a stand-in item 1 and are zeroed after.
            ranks = _ranks_unchecked(scores, col.clamp(min=1))
            out[:, j] = torch.where(valid, ranks, 0)
    return out


def session_first_hit_ranks(scores: Tensor, target_sets: ItemSets) -> Tensor:
    """Per user, the conservative rank of the best-ranked item of the target set: ``[n_users]``.

    ``rank <= k`` iff the user has a hit in a conservative top-k, and ``1 / rank`` is the
    conservative reciprocal rank of the first hit. Users with an empty set raise ValueError.
    """
    ranks = session_target_ranks(scores, target_sets)
    if ranks.shape[0] and bool((ranks == 0).all(dim=1).any()):
        raise ValueError("every user needs a non-empty target set")
    big = torch.iinfo(torch.long).max
    return ranks.masked_fill(ranks == 0, big).amin(dim=1)


def _check_target_ranks(target_ranks: Tensor) -> tuple[Tensor, Tensor]:
    """Validated ``[n, m]`` ranks (0 = padding) and the set sizes ``[n]`` (float64)."""
    ranks = torch.as_tensor(target_ranks)
    if ranks.dim() != 2:
        raise ValueError(f"target ranks must be 2-D [n_users, m], got shape {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool or ranks.is_complex():
        raise ValueError(f"target ranks must be integers, got dtype {ranks.dtype}")
    if ranks.numel() and int(ranks.min()) < 0:
        raise ValueError("target ranks are 1-based (0 = padding); got a negative rank")
    size = (ranks > 0).sum(dim=1)
    if ranks.shape[0] and int(size.min()) == 0:
        raise ValueError("every user needs a non-empty target set (recall is undefined)")
    return ranks.long(), size.to(torch.float64)


def _session_ranks_at_k(ranks: Tensor, size: Tensor, k: int) -> dict[str, Tensor]:
    r = ranks.to(torch.float64)
    hit = (ranks > 0) & (ranks <= k)
    n_hit = hit.sum(dim=1).to(torch.float64)
    zero = torch.zeros_like(r)
    # the ideal list puts min(|S|, k) targets in the first slots
    slots = torch.arange(1, k + 1, dtype=torch.float64, device=r.device)
    ideal = torch.cat([slots.new_zeros(1), (1.0 / torch.log2(slots + 1.0)).cumsum(0)])
    idcg = ideal[size.clamp(max=k).long()]
    big = torch.iinfo(torch.long).max
    best = ranks.masked_fill(ranks == 0, big).amin(dim=1).to(torch.float64)
    return {
        f"recall@{k}": n_hit / size,
        f"precision@{k}": n_hit / k,
        f"mrr@{k}": torch.where(best <= k, 1.0 / best, torch.zeros_like(best)),
        f"ndcg@{k}": torch.where(hit, 1.0 / torch.log2(r + 1.0), zero).sum(dim=1) / idcg,
        f"phr@{k}": (n_hit > 0).to(torch.float64),
    }


def per_user_session_rank_metrics(target_ranks: Tensor, k: int) -> dict[str, Tensor]:
    """Per-user next-session metrics at ``k`` from conservative per-target ranks.

    ``target_ranks``: integer ``[n_users, m]``, the rank of each distinct target of the user's
    set ``S`` (from :func:`session_target_ranks`), 0 = padding. A target is a hit iff its rank
    is at most ``k``. Keys (float64 tensors ``[n_users]``, aligned for paired tests):

    * ``recall@k`` = #hits / |S|; ``precision@k`` = #hits / k;
    * ``mrr@k`` = 1 / min rank if that is at most ``k``, else 0;
    * ``ndcg@k`` = Σ over hit targets of 1 / log2(rank + 1), divided by the ideal DCG over
      min(|S|, k) slots (binary gains, as in the next-basket literature). It is at most 1:
      targets tied in a group of ``g`` items all take the group's last rank, which is no better
      than distinct slots at the group's end would be;
    * ``phr@k`` = 1 if the user has at least one hit (PHR: the share of users with a hit).

    A cut-off beyond the catalogue is fine: every target then ranks within ``k``.
    """
    (k,) = _check_ks((k,))
    ranks, size = _check_target_ranks(target_ranks)
    return _session_ranks_at_k(ranks, size, k)


def session_rank_metrics(target_ranks: Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean next-session Recall/Precision/MRR/NDCG/PHR@k over users from conservative
    per-target ranks ``[n_users, m]`` (see :func:`per_user_session_rank_metrics`)."""
    ks = _check_ks(ks)
    ranks, size = _check_target_ranks(target_ranks)
    if ranks.shape[0] == 0:
        raise ValueError("no users to average")
    out: dict[str, float] = {}
    for k in ks:
        out.update({name: float(v.mean()) for name, v in _session_ranks_at_k(ranks, size, k).items()})
    return out
