"""Shared building blocks: MLPs, Gaussian heads, KL, reparameterisation, ranking losses, init.

Everything here is either a tiny nn.Module or a pure function over tensors, so models share
infrastructure without sharing internals. Losses take score tensors (not models), which lets
every neural recommender pick any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# a finite "minus infinity": masked logits must stay finite so that gradients never become NaN
_NEG = -1e9


def mlp(in_dim: int, hidden: int, out_dim: int, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Two-layer MLP: Linear -> act -> Linear (the output layer is linear)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), act(), nn.Linear(hidden, out_dim))


class GaussianHead(nn.Module):
    """Diagonal Gaussian from a two-layer MLP: x -> (mu, logvar), both [..., out_dim].

    `var_scale` multiplies the variance, i.e. logvar = raw_logvar + log(var_scale). The paper
    (section 4.3) multiplies every prior and posterior covariance by 0.05 because large
    variances made the gradients unstable; doing it in log space keeps it a constant shift.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        out_dim: int,
        var_scale: float = 1.0,
        act: type[nn.Module] = nn.Tanh,
    ) -> None:
        super().__init__()
        if var_scale <= 0:
            raise ValueError(f"var_scale must be > 0, got {var_scale}")
        self.net = mlp(in_dim, hidden, 2 * out_dim, act)
        self.log_var_scale = math.log(var_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw_logvar = self.net(x).chunk(2, dim=-1)
        return mu, raw_logvar + self.log_var_scale


def gaussian_kl_dims(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)) of each dimension: [..., D]."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0
    )


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)), summed over the last dim."""
    return gaussian_kl_dims(mu_q, logvar_q, mu_p, logvar_p).sum(-1)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One sample mu + sigma * eps, eps ~ N(0, I), differentiable in mu and logvar."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + (0.5 * logvar).exp() * eps


# ---------------------------------------------------------------------------------------------
# Ranking losses. pos: Float[N] score of each target; neg: Float[N, M] scores of M negatives;
# neg_mask: Bool[N, M], True = a valid negative (False e.g. where a sampled negative equals the
# target, which must not be pushed down). reduction: "mean" over rows, "sum", or "none" -> [N].


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def _valid(neg: Tensor, neg_mask: Tensor | None) -> Tensor:
    return torch.ones_like(neg, dtype=torch.bool) if neg_mask is None else neg_mask


def bpr_loss(
    pos: Tensor, neg: Tensor, neg_mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """BPR: per row, the mean over valid negatives of -log σ(pos - neg_j). A row without valid
    negatives contributes 0. The gradient is the closed form (_BPR)."""
    return _reduce(_BPR.apply(pos, neg, neg_mask), reduction)


class _BPR(torch.autograd.Function):
    """Per-row BPR, Float[N]: the mean over valid j of softplus(neg_j - pos) = -log σ(pos - neg_j).
    Gradient in closed form: d/d neg_j = σ(neg_j - pos) · valid_j / n_valid, d/d pos = -Σ_j of
    those. Two passes over the [N, M] scores forward and three back, where autograd through the
    elementwise operations takes about twice as many (the BPR part of an HNVM step at paper sizes)."""

    @staticmethod
    def forward(ctx: Any, pos: Tensor, neg: Tensor, valid: Tensor | None) -> Tensor:
        diff = neg - pos.unsqueeze(-1)  # [N, M]
        pair = F.softplus(diff)
        if valid is not None:
            pair.mul_(valid)
            count = valid.sum(-1).clamp(min=1).to(pair.dtype)  # [N]
        else:
            count = pair.new_full(pos.shape, float(neg.shape[-1]))
        ctx.save_for_backward(diff, valid, count)
        return pair.sum(-1) / count

    @staticmethod
    @torch.autograd.function.once_differentiable  # (a second derivative is never taken of a loss here)
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        diff, valid, count = ctx.saved_tensors
        grad = torch.sigmoid(diff)
        if valid is not None:
            grad.mul_(valid)
        grad.mul_((grad_out / count).unsqueeze(-1))
        return -grad.sum(-1), grad, None


def bpr_max_loss(
    pos: Tensor,
    neg: Tensor,
    bpreg: float,
    neg_mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """GRU4Rec's BPR-max: s = softmax over the valid negatives' scores,
    loss = -log Σ_j s_j σ(pos - neg_j) + bpreg · Σ_j s_j neg_j².

    With a single negative (s = 1) it is BPR plus bpreg · neg². The log-sum is computed as a
    logsumexp of log s_j + log σ(·), so it never underflows to log 0."""
    valid = _valid(neg, neg_mask)
    has_valid = valid.any(-1)  # [N]
    log_s = torch.log_softmax(neg.masked_fill(~valid, _NEG), dim=-1)  # [N, M]
    s = log_s.exp() * valid  # exact zeros on masked entries
    log_term = torch.logsumexp(log_s + F.logsigmoid(pos.unsqueeze(-1) - neg), dim=-1)  # [N]
    loss = -log_term + bpreg * (s * neg.pow(2)).sum(-1)
    loss = torch.where(has_valid, loss, torch.zeros_like(loss))
    return _reduce(loss, reduction)


def sampled_softmax_loss(
    pos: Tensor,
    neg: Tensor,
    logq_pos: Tensor | None = None,
    logq_neg: Tensor | None = None,
    neg_mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the target among [pos, valid negatives].

    With log-Q correction (Bengio & Senécal; Yi et al. 2019) the log sampling probability of
    each candidate is subtracted from its logit, which makes the sampled softmax a consistent
    estimate of the full one under non-uniform (e.g. popularity) sampling. logq_pos: Float[N]
    or broadcastable; logq_neg: Float[N, M] or Float[M]."""
    if logq_pos is not None:
        pos = pos - logq_pos
    if logq_neg is not None:
        neg = neg - logq_neg
    neg = neg.masked_fill(~_valid(neg, neg_mask), _NEG)
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)  # [N, 1 + M]
    loss = -torch.log_softmax(logits, dim=-1)[:, 0]
    return _reduce(loss, reduction)


def full_softmax_loss(
    logits: Tensor,
    targets: Tensor,
    valid_cols: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy over the whole catalogue. logits: Float[N, C]; targets: Long[N];
    valid_cols: Bool[C], False columns (e.g. column 0 = padding) are left out of the softmax."""
    if valid_cols is not None:
        logits = logits.masked_fill(~valid_cols, _NEG)
    return F.cross_entropy(logits, targets, reduction=reduction)


RANKING_LOSSES = ("bpr", "bpr-max", "sampled-softmax", "full-softmax")


def ranking_loss(kind: str, hidden: Tensor, targets: Tensor, *, score_all: Callable[[Tensor], Tensor],
                 score_items: Callable[[Tensor, Tensor], Tensor], neg_probs: Tensor, n_negatives: int,
                 bpreg: float) -> Tensor:
    """Summed next-item loss of the states hidden Float[K, H] for targets Long[K].

    kind "full-softmax": cross-entropy over the catalogue (score_all: [K, H] -> [K, n_items + 1],
    column 0 = padding, left out). Otherwise n_negatives negatives ~ neg_probs Float[n_items + 1]
    are shared by all K targets (a negative equal to a row's target is masked) and scored with
    score_items(hidden, ids) ([K, H], Long[K, 1] -> [K, 1]; Long[M] -> [K, M]): "bpr", "bpr-max"
    (with bpreg) or "sampled-softmax" (log-Q corrected by the sampling probabilities)."""
    if kind == "full-softmax":
        logits = score_all(hidden)
        valid = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        valid[0] = False
        return full_softmax_loss(logits, targets, valid, reduction="sum")
    neg_ids = torch.multinomial(neg_probs, n_negatives, replacement=True)  # [M]
    pos = score_items(hidden, targets.unsqueeze(-1)).squeeze(-1)  # [K]
    neg = score_items(hidden, neg_ids)  # [K, M]
    neg_mask = neg_ids.unsqueeze(0) != targets.unsqueeze(1)
    if kind == "bpr":
        return bpr_loss(pos, neg, neg_mask, reduction="sum")
    if kind == "bpr-max":
        return bpr_max_loss(pos, neg, bpreg, neg_mask, reduction="sum")
    logq = (neg_probs * n_negatives).clamp(min=1e-12).log()
    return sampled_softmax_loss(pos, neg, logq[targets], logq[neg_ids], neg_mask, reduction="sum")


def keep_last_items(items: Tensor, max_len: int) -> Tensor:
    """Sessions Long[..., T] (right-padded) with only the last max_len items of each kept,
    left-aligned in [..., max_len]; max_len 0 (or T <= max_len) returns items unchanged."""
    if not max_len or items.shape[-1] <= max_len:
        return items
    lengths = (items > 0).sum(-1, keepdim=True)
    ar = torch.arange(max_len, device=items.device)
    idx = (lengths - max_len).clamp(min=0) + ar
    return items.gather(-1, idx.clamp(max=items.shape[-1] - 1)) * (ar < lengths)


def init_uniform_(module: nn.Module, std: float) -> None:
    """The paper's init (section 4.3): every weight ~ U(-a, a) with variance std² (a = √3·std),
    every bias = 0; embedding padding rows stay 0."""
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1].startswith("bias"):
                p.zero_()
            else:
                p.uniform_(-bound, bound)
        for m in module.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()


class _GatherRows(torch.autograd.Function):
    """table[ids] for a 1-D table with a sparse gradient (F.embedding needs a 2-D weight, and a
    view of the table would turn the gradient dense)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, table: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.n_rows = table.shape[0]  # type: ignore[attr-defined]
        return table[ids]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (ids,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.sparse_coo_tensor(ids.reshape(1, -1), grad.reshape(-1), (ctx.n_rows,),  # type: ignore[attr-defined]
                                       check_invariants=False), None


class ItemOutput(nn.Embedding):
    """The output layer over the catalogue, score_j = W[j]·h + b_j, as nn.Linear(H, n_rows)
    (same parameters `weight` [n_rows, H] and `bias` [n_rows], same init), plus `rows(ids)` for
    sampled losses. With sparse=True the rows a step scores get a sparse gradient, so that
    training cost and gradient memory do not grow with the catalogue. It is an nn.Embedding so
    that DistributedDataParallel (and `sparse_parameters`) know its gradients are sparse."""

    def __init__(self, in_features: int, n_rows: int, sparse: bool = False) -> None:
        super().__init__(n_rows, in_features, sparse=sparse, _weight=torch.empty(n_rows, in_features))
        self.bias = nn.Parameter(torch.empty(n_rows))
        # nn.Linear's init, so a dense model starts from the same weights as before
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: Tensor) -> Tensor:  # type: ignore[override]
        """Float[..., H] -> Float[..., n_rows]: every row's score (full ranking)."""
        return F.linear(hidden, self.weight, self.bias)

    def rows(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(W[ids] Float[..., H], b[ids] Float[...]) with sparse gradients if sparse=True."""
        if not self.sparse:
            return self.weight[ids], self.bias[ids]
        return F.embedding(ids, self.weight, sparse=True), _GatherRows.apply(self.bias, ids)


@torch.no_grad()
def population_user_rows_(tables: list[nn.Embedding], trained: Tensor) -> None:
    """Cold start for a user table whose row 0 (the unknown user) no training example reads:
    row 0 becomes the mean row of the users with training examples (for a model linear in the
    user vector: the average user's scores), and users without any (a time split) get row 0, as
    they would as unknown users. trained: Long[K] ids (1..n_users) of users with examples."""
    for table in tables:
        w = table.weight
        keep = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        keep[trained.to(w.device)] = True
        keep[0] = False
        if not keep.any():
            continue
        w[0] = w[keep].mean(0)
        w[~keep] = w[0].clone()


def length_groups(sorted_lengths: np.ndarray, step_rows: float, min_rows: int = 8) -> list[int]:
    """Where to cut rows sorted by length (int[N], ascending) into groups, each run as one
    padded GRU call: the cuts minimising sum over groups of (step_rows + rows) * longest row,
    i.e. GRU time when one time step costs as much fixed overhead as `step_rows` rows (about
    20 at H = 100..200 on CPU, forward and backward). Every group holds at least `min_rows`
    rows (one group when there are fewer): a GEMM of few rows takes other kernels whose last
    bits differ, so a row's result would depend on its group (measured with MKL's AVX512 kernels
    at K = 200: 1-3, 5-7 and 9-11 rows differ from a large call; the floor of 8 avoids the
    smallest calls, not all of them; raising it would change every trained model's floats,
    docs/design.md). Exact dynamic
    programme over the m distinct lengths (O(m^2)). -> the positions of the cuts (tensor_split)."""
    if len(sorted_lengths) == 0:
        return []
    u, counts = np.unique(sorted_lengths, return_counts=True)  # m distinct lengths, ascending
    c = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)  # rows up to each length
    m = len(u)
    best = np.full(m + 1, np.inf)
    best[0] = 0.0
    prev = np.zeros(m + 1, dtype=np.int64)
    for j in range(1, m + 1):  # best[j]: rows of the j shortest lengths; last group (i, j]
        rows = c[j] - c[:j]
        cost = best[:j] + (step_rows + rows) * u[j - 1]
        cost[rows < min_rows] = np.inf
        if j == m:  # one group of every row is always allowed (fewer than min_rows in all)
            cost[0] = (step_rows + c[m]) * u[m - 1]
        prev[j] = int(np.argmin(cost))
        best[j] = cost[prev[j]]
    cuts, j = [], m
    while j > 0:
        j = int(prev[j])
        if j > 0:
            cuts.append(int(c[j]))
    return cuts[::-1]


def unsort_rows(rows: Tensor, where: Tensor) -> Tensor:
    """rows[i] belongs at position where[i] (a permutation of 0..len-1): the rows in place."""
    inverse = torch.empty_like(where)
    inverse[where] = torch.arange(len(where), device=where.device)
    return rows[inverse]


def module_outputs(gru: nn.GRU, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """``gru(x, h0[None])[0]``: the module's own way (autograd through torch's GRU), x Float[N, T, I]
    batch first, h0 Float[N, H] or None (zeros) -> Float[N, T, H]."""
    return gru(x, None if h0 is None else h0.unsqueeze(0).contiguous())[0]


def gru_outputs(gru: nn.GRU, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """A batch_first GRU's outputs: x Float[N, T, I], h0 Float[N, H] or None (zeros) ->
    Float[N, T, H], the floats of ``gru(x, h0[None])[0]``. In CPU training the GRU runs in
    hnvm.models.gru_train (torch's forward operation for operation, a backward of two calls a
    step; imported, with numba, on the first training call; its output may not be changed in
    place); elsewhere the module runs."""
    if torch.is_grad_enabled() and x.device.type == "cpu":
        from hnvm.models import gru_train

        return gru_train.gru_sequence(gru, x, h0)
    return module_outputs(gru, x, h0)
