"""Ranking the items for a batch of user states: the top-k of `h @ W^T + b` (HNVM's output layer).

`top_k` is the service's tie-safe top-k of a score matrix; `LinearRanker` ranks from hidden
states, exactly in fp32 or through `Bf16Shortlist`.

Bf16Shortlist: a certified top-k over a large catalogue, a bf16 pass shortlists, fp32 ranks.

Scoring every item in fp32 is what bounds a served model with tens of thousands of items: on
one CPU core the product [B, H] x [H, n_items] runs at ~30 GFLOP/s (MKL with a skinny left
operand), while the same product in bf16 runs 2-3.5x faster (AVX512-BF16). Rounding to bf16
alone would change rankings, so this class uses it only to *find* the candidates:

  1. a = bf16([h, 1]) @ bf16([W; b])                         approximate scores, [B, n_pad]
  2. per block of 64 items the largest a; the k-th largest block maximum v_k. There are k
     items with a >= v_k, so the k-th best exact score is at least L = v_k - err(v_k).
  3. candidates: every item whose a could belong to an exact score >= L (a >= t(L)); only
     blocks whose maximum reaches t are read.
  4. the candidates are scored exactly in fp32 and ranked (score descending, lower id first).

The rounding-error bound (`err`) makes step 3 certain, not probable. With unit roundoff
u = 2^-8 for bf16 and g = gamma_{H+1} for fp32 accumulation, for item j and row h:

  |a_j - e_j| <= A + u |a_j|,   A = c ||[h, 1]|| max_j ||[w_j, b_j]||,   c = 2u + u^2 + 3g(1+u)^2

where e_j is the fp32 score (rounding of both inputs to bf16 gives 2u + u^2 per product, the
fp32 sums of both passes contribute the g terms, and the bf16 rounding of the output u|a_j|).
`c` carries a further 25% margin. A self-check on construction verifies the bound on this
machine's kernels and disables the shortlist where it does not hold (e.g. a backend that
accumulates in bf16). Rows where the shortlist would not pay (too few eligible items, or so
many candidates that the model's scores are nearly flat) are scored exactly in full.

The result is the exact top-k, with scores that equal the full fp32 pass up to the order of
the fp32 summation (a few ulps; an exact tie broken differently by that is the one way the
two can differ).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hnvm.metrics import topk_items

log = logging.getLogger(__name__)

BLOCK = 64
_U = 2.0**-8  # bf16 unit roundoff (8 significant bits)


class Bf16Shortlist:
    """Exact top-k of `h @ weight.T + bias` (item 0 and excluded items never returned).

    weight: [n, H] fp32 (row = item, nn.Linear's layout), bias: [n]. `min_batch`: below it a
    batch goes to the fp32 pass (default 4). `max_candidates`:
    per row, beyond it the row is scored in full (flat scores, e.g. an untrained model)."""

    def __init__(self, weight: Tensor, bias: Tensor, *, min_batch: int | None = None,
                 max_candidates: int = 4096, check: bool = True) -> None:
        self.weight, self.bias = weight, bias  # row gathers for the exact pass read whole rows
        n, hidden = weight.shape
        self.n = n
        self.max_candidates = max_candidates
        self.n_blocks = -(-n // BLOCK)
        self.k_pad = hidden + 1 + (hidden + 1) % 2  # AVX512-BF16 multiplies pairs: an even depth
        wb = torch.zeros(self.k_pad, self.n_blocks * BLOCK, dtype=torch.bfloat16)
        wb[:hidden, :n] = weight.t()
        wb[hidden, :n] = bias
        wb[hidden, n:] = -math.inf  # padding columns: -inf (their weights are 0)
        self.n_pad = wb.shape[1]
        self.wb: Tensor | None = wb
        self._packed = self._pack(wb)
        if self._packed is not None:
            self.wb = None  # the packed copy replaces it
        # below 4 rows the fp32 pass: torch.mm's bf16 path is slower there, and the packed one,
        # though faster in isolation (0.91 against 1.02 ms for one row at 60K items), measured
        # slower inside the service (one client: p50 3.1-3.3 against 2.3-2.6 ms)
        self.min_batch = min_batch if min_batch is not None else 4
        norms = (weight.double().square().sum(1) + bias.double().square()).sqrt()
        self.w_norm = float(norms.max())
        gamma = (hidden + 1) * 2.0**-24 / (1 - (hidden + 1) * 2.0**-24)
        self.c = 1.25 * (2 * _U + _U * _U + 3 * gamma * (1 + _U) ** 2)
        self.enabled = True
        self._buf_bf16 = torch.empty(0, self.n_pad, dtype=torch.bfloat16)  # (unpacked path only)
        self._buf_f32 = torch.empty(0, self.n_pad)
        self.stats = {"rows": 0, "full_rows": 0, "candidates": 0}
        if check:
            self._self_check()

    # ---- the bound ---------------------------------------------------------------------------------
    def _approx(self, h: Tensor, scratch: bool = False) -> Tensor:
        """[B, H] fp32 -> [B, n_pad] bf16 approximate scores (bias included); `scratch`: into a
        reused buffer (valid until the next call) where the kernel takes one."""
        h1 = torch.zeros(h.shape[0], self.k_pad, dtype=torch.bfloat16)
        h1[:, : h.shape[1]] = h
        h1[:, h.shape[1]] = 1.0
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(h1, self._packed, None, "none", [], "")
        assert self.wb is not None
        if not scratch:
            return h1 @ self.wb
        self._buf_bf16 = _scratch(self._buf_bf16, h.shape[0])
        return torch.mm(h1, self.wb, out=self._buf_bf16[: h.shape[0]])

    @staticmethod
    def _pack(wb: Tensor) -> Tensor | None:
        """The weights in oneDNN's blocked layout (20-50% faster passes here), if this torch build
        has the op and its results equal torch.mm's bit for bit; None otherwise."""
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(wb.t().contiguous(), 32)
            g = torch.Generator().manual_seed(0)
            for rows in (1, 5, 32, 70):
                x = torch.randn(rows, wb.shape[0], generator=g).to(torch.bfloat16)
                if not torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), x @ wb):
                    return None
            return packed
        except (RuntimeError, AttributeError, NotImplementedError):
            return None

    def _slack(self, h: Tensor) -> Tensor:
        """A per row (float64 [B])."""
        return self.c * (h.double().square().sum(1) + 1).sqrt() * self.w_norm

    def _self_check(self) -> None:
        """Verify |a - e| <= A + u|a| on rows like a GRU state (entries in [-1, 1])."""
        g = torch.Generator().manual_seed(0)
        h = torch.rand(8, self.weight.shape[1], generator=g) * 2 - 1
        h[0] = 1.0  # the row with the largest norm
        a = self._approx(h)[:, : self.n].double()
        e = torch.nn.functional.linear(h, self.weight, self.bias).double()
        bound = self._slack(h)[:, None] + _U * a.abs()
        excess = float(((a - e).abs() - bound).max())
        if excess > 0:
            self.enabled = False
            log.warning("bf16 shortlist disabled: the rounding-error bound does not hold on this machine "
                        "(exceeded by %.3g); scoring stays exact fp32", excess)

    # ---- top-k -------------------------------------------------------------------------------------
    def top_k(self, h: Tensor, k: int, exclude: Sequence[Sequence[int]]
              ) -> tuple[list[list[int] | None], list[list[float] | None]]:
        """Per row of h [B, H]: (ids, scores) best first, or None where the row must be scored
        in full by the caller (batch too small, shortlist disabled, too few or too many items)."""
        n_rows = h.shape[0]
        none: list[list[int] | None] = [None] * n_rows
        if not self.enabled or n_rows < self.min_batch or k > self.n_blocks:
            return none, list(none)  # type: ignore[arg-type]
        self.stats["rows"] += n_rows
        approx = _mask(self._approx(h, scratch=True), exclude)  # [B, n_pad] bf16
        # fp32 from here: reductions over bf16 run 3x slower than the conversion plus fp32 ones
        self._buf_f32 = _scratch(self._buf_f32, n_rows)
        blocks_t = self._buf_f32[:n_rows].copy_(approx).view(n_rows, self.n_blocks, BLOCK)
        block_max_t = blocks_t.amax(2)  # [B, n_blocks]
        # the small steps in numpy: a torch op on a few hundred values costs more than the work
        v_k = block_max_t.topk(k, dim=1).values[:, -1].numpy().astype(np.float64)  # [B]
        slack = self._slack(h).numpy()
        lower = v_k - slack - _U * np.abs(v_k)  # the k-th best exact score is >= lower
        y = lower - slack
        with np.errstate(invalid="ignore", over="ignore"):  # (rows without k eligible blocks; casts to fp32)
            t = np.where(y >= 0, y / (1 + _U), y / (1 - _U))  # a_j >= t for every e_j >= lower
            t32 = t.astype(np.float32)
            t32 = np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-np.inf)), t32)
        usable = np.isfinite(v_k)  # rows with fewer than k eligible blocks: scored in full
        t32[~usable] = np.inf
        blocks, block_max = blocks_t.numpy(), block_max_t.numpy()
        cb_row, cb_block = np.nonzero(block_max >= t32[:, None])
        hit_r, hit_c = np.nonzero(blocks[cb_row, cb_block] >= t32[cb_row][:, None])  # [n_cand_blocks, BLOCK]
        cand_row = cb_row[hit_r]
        cand_item = cb_block[hit_r] * BLOCK + hit_c  # (row, item) order
        counts = np.bincount(cand_row, minlength=n_rows)
        self.stats["candidates"] += len(cand_item)
        # exact fp32 scores of the candidates
        # every row against every candidate is one small GEMM ([B, H] x [H, m]), cheaper than
        # gathering a state per candidate; each candidate then reads its own row's entry
        items_t = torch.from_numpy(cand_item)
        cand_w = self.weight.index_select(0, items_t)  # [m, H]
        exact = (torch.mm(h, cand_w.t())[torch.from_numpy(cand_row), torch.arange(len(cand_item))]
                 + self.bias.index_select(0, items_t)).numpy()
        # per row: score descending, the lower id first among equal scores; the first k
        order = np.lexsort((cand_item, -exact, cand_row))
        first = np.cumsum(counts) - counts
        rank = np.arange(len(order)) - np.repeat(first, counts)
        keep = order[rank < k]
        ids_l, vals_l = cand_item[keep].tolist(), exact[keep].tolist()
        ids_out: list[list[int] | None] = []
        vals_out: list[list[float] | None] = []
        start = 0
        for r, m in enumerate(counts.tolist()):
            taken = min(m, k)
            if not usable[r] or m > self.max_candidates or m < k:
                ids_out.append(None)
                vals_out.append(None)
                self.stats["full_rows"] += 1
            else:
                ids_out.append(ids_l[start: start + taken])
                vals_out.append(vals_l[start: start + taken])
            start += taken
        return ids_out, vals_out


class LinearRanker:
    """Top-k of `hidden @ weight.T + bias` per row, exact fp32 or through a `Bf16Shortlist`
    (`bf16`; it falls back to fp32 where its self-check fails). Reads nothing but its weights,
    so a service can run it off the thread that owns the user states."""

    def __init__(self, weight: Tensor, bias: Tensor, *, bf16: bool = False) -> None:
        # h @ W^T with W^T contiguous is about twice as fast as nn.Linear's layout for one row
        # (MKL, measured on this project's CPUs); a served model's weights do not change
        self.w_t = weight.t().contiguous()  # [H, n]
        self.bias = bias
        self.shortlist = Bf16Shortlist(weight, bias) if bf16 else None
        if self.shortlist is not None and not self.shortlist.enabled:
            self.shortlist = None
        self.scoring = "bf16" if self.shortlist is not None else "exact"
        self._buf = torch.empty(0, self.w_t.shape[1])
        self._lock = threading.Lock()  # the scratch buffers are shared

    def scores(self, hidden: Tensor) -> Tensor:
        return torch.addmm(self.bias, hidden, self.w_t)  # [B, n]

    def _scratch_scores(self, hidden: Tensor) -> Tensor:
        """`scores` into a reused buffer (see `_scratch`); valid until the next call."""
        self._buf = _scratch(self._buf, hidden.shape[0])
        return torch.addmm(self.bias, hidden, self.w_t, out=self._buf[: hidden.shape[0]])

    def rank(self, hidden: Tensor, k: int, exclude: Sequence[Sequence[int]]
             ) -> tuple[list[list[int]], list[list[float]]]:
        with self._lock:
            return self._rank(hidden, k, exclude)

    def _rank(self, hidden: Tensor, k: int, exclude: Sequence[Sequence[int]]
              ) -> tuple[list[list[int]], list[list[float]]]:
        if self.shortlist is None:
            return top_k(self._scratch_scores(hidden), k, exclude)
        ids, vals = self.shortlist.top_k(hidden, k, exclude)
        full = [r for r, row in enumerate(ids) if row is None]
        if full:  # rows the shortlist leaves to the full fp32 pass
            f_ids, f_vals = top_k(self._scratch_scores(hidden[full]), k, [exclude[r] for r in full])
            for r, i, v in zip(full, f_ids, f_vals, strict=True):
                ids[r], vals[r] = i, v
        return ids, vals  # type: ignore[return-value]


def top_k(scores: Tensor, k: int, exclude: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """`metrics.topk_items` (column 0 and `exclude` never returned, ties to the lower id) with
    a fast path for the service: `scores` is scratch (masked in place), the order inside the
    top-k is fixed in Python, and the full tie-safe sort runs only for rows where items outside
    the top-k tie with the k-th score or that run out of items.
    -> per row, up to k (ids, scores), best first."""
    _mask(scores, exclude)
    # one more than asked: an item outside the top-k ties with the k-th iff the (k+1)-th does
    extra = int(k < scores.shape[1] - 1)
    vals, idx = scores.topk(k + extra, dim=1)
    s, v = scores.detach().numpy(), vals.detach().numpy()
    slow = v[:, k - 1] == -math.inf
    if extra:
        slow |= v[:, k - 1] == v[:, k]
    ids_out, vals_out = [], []
    for r, (ids, vs) in enumerate(zip(idx[:, :k].tolist(), v[:, :k].tolist(), strict=True)):
        if slow[r]:
            ids = topk_items(scores[r: r + 1], k)[0].tolist()
            ids = ids[: ids.index(0)] if 0 in ids else ids
            vs = [float(x) for x in s[r, ids]]
        else:  # equal scores inside the top-k: the lower id first
            pairs = sorted(zip(ids, vs, strict=True), key=lambda p: (-p[1], p[0]))
            ids, vs = [p[0] for p in pairs], [p[1] for p in pairs]
        ids_out.append(ids)
        vals_out.append(vs)
    return ids_out, vals_out


def _mask(scores: Tensor, exclude: Sequence[Sequence[int]]) -> Tensor:
    """Column 0 and, per row, the `exclude` ids set to -inf (in place)."""
    scores[:, 0] = -math.inf
    rows = [r for r, ex in enumerate(exclude) for _ in ex]
    if rows:
        scores[torch.tensor(rows), torch.tensor([i for ex in exclude for i in ex])] = -math.inf
    return scores


def _scratch(buf: Tensor, rows: int) -> Tensor:
    """`buf`, or a larger one if it has fewer than `rows` rows. Scratch score matrices are reused
    across passes: fresh multi-MB tensors each pass cost page faults (the allocator maps them
    anew) that took as long as the bf16 -> fp32 conversion itself."""
    if buf.shape[0] >= rows:
        return buf
    return torch.empty(-(-rows // 16) * 16, *buf.shape[1:], dtype=buf.dtype)
