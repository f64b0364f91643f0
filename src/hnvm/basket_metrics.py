"""Next-basket metrics beyond the ranking ones of `hnvm.metrics`: the repeat/explore breakdown
of Li et al., "A Next Basket Recommendation Reality Check" (TOIS 2023). A *repeat* item is one the
user had in an earlier session, an *explore* item is new to the user (docs/design.md,
"Evaluation")."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from hnvm.metrics import DEFAULT_KS, _check_ks, _check_target_ranks

__all__ = ["repeat_explore_metrics", "repeat_share"]


def repeat_explore_metrics(target_ranks: Tensor, repeat: Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """The repeat/explore breakdown of next-basket recall (Li et al., "A Next Basket
    Recommendation Reality Check", TOIS 2023): a target is a *repeat* item when the user had it
    in an earlier session, else an *explore* item. recall_repeat@k is the mean, over users with
    at least one repeat target, of the share of their repeat targets ranked <= k; recall_explore@k
    likewise over users with an explore target. target_ranks: Long[n_users, m] conservative
    ranks (0 = padding); repeat: Bool[n_users, m] aligned with them. Keys are absent when no
    user has that kind of target."""
    ks = _check_ks(ks)
    ranks, _ = _check_target_ranks(target_ranks)
    repeat = torch.as_tensor(repeat, dtype=torch.bool)
    if repeat.shape != ranks.shape:
        raise ValueError(f"repeat flags {tuple(repeat.shape)} do not match the ranks {tuple(ranks.shape)}")
    real = ranks > 0
    out: dict[str, float] = {}
    for name, kind in (("repeat", repeat & real), ("explore", ~repeat & real)):
        n = kind.sum(1)
        users = n > 0
        if not bool(users.any()):
            continue
        for k in ks:
            hits = (kind & (ranks <= k)).sum(1)
            out[f"recall_{name}@{k}"] = float((hits[users].double() / n[users].double()).mean())
    return out


def repeat_share(topk: Tensor, repeat: Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """repeat_share@k: the mean over users of the share of repeat items (ones the user had in
    an earlier session) among the first k items shown (Li et al. 2023's repetition ratio).
    topk: Long[n_users, >= max k] items, best first, 0 = padding (not counted); repeat:
    Bool, aligned with topk. Empty when there are no users."""
    ks = _check_ks(ks)
    if topk.shape[0] == 0:
        return {}
    out: dict[str, float] = {}
    for k in ks:
        shown = topk[:, :k] > 0
        n = shown.sum(1).clamp(min=1).double()
        out[f"repeat_share@{k}"] = float(((repeat[:, :k] & shown).sum(1).double() / n).mean())
    return out
