"""Compiled loops of the kNN baselines' scoring (numba), for the work that vectorised numpy or
sparse products do only in many passes over large temporaries: V-SKNN's neighbourhood of each
query (models/sknn.py) and TIFU-KNN's mean of each row's neighbours (models/tifuknn.py).

Each `*_rows` kernel fills the rows [lo, hi) of its output and holds no state; `vsknn_scores`
and `neighbour_mean` run a batch's rows in parts, one per torch thread, in numba's threads
(numba picks its threading layer: OpenMP where found). Each sum runs in the order of its
model's one-query definition, in IEEE arithmetic (no fastmath: no reassociation or fused
multiply-add), so the scores equal that definition's bit for bit, however the rows are split
(tested). Compiled on first use (seconds), then cached on disk where numba can write its cache.
With GNU OpenMP (numba's usual threading layer on Linux) a process forked after a parallel
launch cannot launch again: use spawn for worker processes, as this project does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numba
import numpy as np
import torch

from hnvm.compiled import compiled


@compiled
def _before(sim_a: float, sess_a: int, sim_b: float, sess_b: int) -> bool:
    """Neighbour a ranks before b: more similar, ties by recency (a later session first)."""
    return sim_a > sim_b or (sim_a == sim_b and sess_a > sess_b)


@compiled
def _candidates(items: np.ndarray, weights: np.ndarray, lo: int, hi: int, exclude: int, post_ptr: np.ndarray,
                post_sess: np.ndarray, dot: np.ndarray, cand: np.ndarray) -> int:
    """One query's candidates (models/sknn.py, step 2), from its items[lo:hi] (ascending) and
    their weights: the candidates' ids into cand[:n] (any order) and their dot products into
    dot[id], each summed over the items in ascending order (0 + w_1 + w_2 ...); `exclude` (-1:
    none) is not a candidate. Returns n."""
    n = 0
    for j in range(lo, hi):
        w = weights[j]
        for p in range(post_ptr[items[j]], post_ptr[items[j] + 1]):
            s = post_sess[p]
            cand[n] = s  # (kept where it is new: no branch to mispredict)
            n += dot[s] == 0.0  # (0: not yet a candidate, as every weight is > 0)
            dot[s] += w
    if exclude >= 0 and dot[exclude] != 0.0:
        dot[exclude] = 0.0
        for i in range(n):
            if cand[i] == exclude:
                cand[i] = cand[n - 1]
                return n - 1
    return n


@compiled
def _most_recent(cand: np.ndarray, n: int, sample_size: int, shift: int, bins: np.ndarray, in_bin: np.ndarray,
                 dot: np.ndarray) -> int:
    """Step 2's cut: keeps in cand[:m] the sample_size largest (most recent) of the n distinct
    ids, clearing the dot of the others; the cut from a histogram of the ids' high bits (id >>
    shift), then a sort of the one bin that holds it. Returns m."""
    if n <= sample_size:
        return n
    bins[:] = 0
    for i in range(n):
        bins[cand[i] >> shift] += 1
    b, above = len(bins) - 1, 0
    while above + bins[b] < sample_size:
        above += bins[b]
        b -= 1
    inside = 0
    for i in range(n):
        if cand[i] >> shift == b:
            in_bin[inside] = cand[i]
            inside += 1
    cut = np.sort(in_bin[:inside])[inside - (sample_size - above)]
    kept = 0
    for i in range(n):
        if cand[i] >= cut:
            cand[kept] = cand[i]
            kept += 1
        else:
            dot[cand[i]] = 0.0
    return kept


@compiled
def _neighbours(cand: np.ndarray, n: int, k: int, norm: float, root_len: np.ndarray, dot: np.ndarray,
                sim: np.ndarray, heap_sim: np.ndarray, heap_sess: np.ndarray) -> int:
    """Steps 3 and 4's neighbours: into cand[:m], their similarities into sim[:m], in summation
    order: all n in time order where n <= k, else the k most similar, best first (ties later first),
    found with a heap of the k best so far (the worst at its root); clears dot. Returns m."""
    if n <= k:
        cand[:n] = np.sort(cand[:n])
        for i in range(n):
            sim[i] = dot[cand[i]] / (norm * root_len[cand[i]])
            dot[cand[i]] = 0.0
        return n
    for i in range(n):
        sim[i] = dot[cand[i]] / (norm * root_len[cand[i]])
        dot[cand[i]] = 0.0
    size = 0
    for i in range(n):
        v, s = sim[i], cand[i]
        if size == k and v < heap_sim[0]:  # (the common case, decided without a call)
            continue
        if size < k:  # sift up
            at = size
            size += 1
            while at > 0 and _before(heap_sim[(at - 1) >> 1], heap_sess[(at - 1) >> 1], v, s):
                heap_sim[at], heap_sess[at] = heap_sim[(at - 1) >> 1], heap_sess[(at - 1) >> 1]
                at = (at - 1) >> 1
            heap_sim[at], heap_sess[at] = v, s
        elif _before(v, s, heap_sim[0], heap_sess[0]):  # replace the root, sift down
            at = 0
            while 2 * at + 1 < k:
                child = 2 * at + 1
                right = child + 1
                if right < k and _before(heap_sim[child], heap_sess[child], heap_sim[right], heap_sess[right]):
                    child = right
                if not _before(v, s, heap_sim[child], heap_sess[child]):
                    break
                heap_sim[at], heap_sess[at] = heap_sim[child], heap_sess[child]
                at = child
            heap_sim[at], heap_sess[at] = v, s
    for i in range(k):  # best first (insertion sort: k is small)
        v, s = heap_sim[i], heap_sess[i]
        at = i
        while at > 0 and _before(v, s, sim[at - 1], cand[at - 1]):
            sim[at], cand[at] = sim[at - 1], cand[at - 1]
            at -= 1
        sim[at], cand[at] = v, s
    return k


@compiled
def vsknn_rows(items: np.ndarray, weights: np.ndarray, ptr: np.ndarray, norms: np.ndarray, exclude: np.ndarray,
               post_ptr: np.ndarray, post_sess: np.ndarray, sess_ptr: np.ndarray, sess_items: np.ndarray,
               root_len: np.ndarray, sample_size: int, k: int, base: np.ndarray, out: np.ndarray, lo: int,
               hi: int) -> None:
    """out[r] = base + Σ_neighbours sim · binary(neighbour) for the queries r in [lo, hi) (V-SKNN,
    models/sknn.py's steps 2-4).

    Query r: distinct items items[ptr[r]:ptr[r + 1]] ascending (int64), their decay weights
    (float64, > 0) and the norm of those weights; exclude[r] a training session that is not its
    candidate (-1: none). Postings: the sessions of item i are post_sess[post_ptr[i]:post_ptr[i +
    1]] (any that hold every candidate a query needs: all, or each item's latest sample_size +
    1); session s holds sess_items[sess_ptr[s]:sess_ptr[s + 1]] and root_len[s] = sqrt of that
    count. base: float64[n_cols]; out: Double[R, n_cols], its rows [lo, hi) written in full.
    Sums: a dot over the query's items ascending (0 + w_1 + w_2 ...), a score over the
    neighbours in their order (by similarity, ties later first; in time order where a query
    has at most k candidates), then added to base (base + 0 = base where an item has no score).
    Each row is written in full and in order: cheaper than scattered writes into a large output
    after a separate fill of base."""
    widest = 1
    for r in range(lo, hi):
        reach = 0
        for j in range(ptr[r], ptr[r + 1]):
            reach += post_ptr[items[j] + 1] - post_ptr[items[j]]
        widest = max(widest, reach)
    dot = np.zeros(len(sess_ptr) - 1)  # by session id; 0 between queries
    shift = 0  # bins of 2^shift sessions, at most 1024 of them
    while (len(sess_ptr) - 2) >> shift >= 1024:
        shift += 1
    bins = np.zeros(((len(sess_ptr) - 2) >> shift) + 1, np.int64)
    cand, in_bin, sim = np.empty(widest, np.int64), np.empty(widest, np.int64), np.empty(widest)
    heap_sim, heap_sess = np.empty(k), np.empty(k, np.int64)
    acc = np.zeros(out.shape[1])
    for r in range(lo, hi):
        n = _candidates(items, weights, ptr[r], ptr[r + 1], exclude[r], post_ptr, post_sess, dot, cand)
        n = _most_recent(cand, n, sample_size, shift, bins, in_bin, dot)
        n = _neighbours(cand, n, k, norms[r], root_len, dot, sim, heap_sim, heap_sess)
        # the scores (step 4): each neighbour's items get its similarity, summed in the neighbours' order
        for i in range(n):
            for q in range(sess_ptr[cand[i]], sess_ptr[cand[i] + 1]):
                acc[sess_items[q]] += sim[i]
        for c in range(out.shape[1]):
            out[r, c] = base[c] + acc[c]
            acc[c] = 0.0


@compiled
def neighbour_mean_rows(idx: np.ndarray, weight: np.float32, indptr: np.ndarray, indices: np.ndarray,
                        data: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """out[b] = Σ_j weight · vectors[idx[b, j]] for the rows b in [lo, hi), j in the order of
    idx (TIFU-KNN's mean of the k neighbours, weight = 1 / k): idx int64[B, k] into the CSR
    vectors (indptr, indices, data float32); out Float[B, n_cols] of zeros; each product and
    sum rounded to float32 one at a time (as scipy's CSR product of the same operands)."""
    for b in range(lo, hi):
        for j in range(idx.shape[1]):
            u = idx[b, j]
            for e in range(indptr[u], indptr[u + 1]):
                out[b, indices[e]] += weight * data[e]


def _parallel(fn: Callable[..., Any]) -> Any:
    """`compiled` with numba.prange running in parallel, in numba's threads."""
    return compiled(fn, parallel=True)


@_parallel
def _vsknn_parts(items: np.ndarray, weights: np.ndarray, ptr: np.ndarray, norms: np.ndarray, exclude: np.ndarray,
                 post_ptr: np.ndarray, post_sess: np.ndarray, sess_ptr: np.ndarray, sess_items: np.ndarray,
                 root_len: np.ndarray, sample_size: int, k: int, base: np.ndarray, out: np.ndarray,
                 parts: int) -> None:
    n = len(ptr) - 1
    for p in numba.prange(parts):
        vsknn_rows(items, weights, ptr, norms, exclude, post_ptr, post_sess, sess_ptr, sess_items, root_len,
                   sample_size, k, base, out, n * p // parts, n * (p + 1) // parts)


@_parallel
def _neighbour_mean_parts(idx: np.ndarray, weight: np.float32, indptr: np.ndarray, indices: np.ndarray,
                          data: np.ndarray, out: np.ndarray, parts: int) -> None:
    n = idx.shape[0]
    for p in numba.prange(parts):
        neighbour_mean_rows(idx, weight, indptr, indices, data, out, n * p // parts, n * (p + 1) // parts)


# one batch at a time across Python threads: numba's fallback threading layer (workqueue, where
# no OpenMP runtime is found) aborts the process on concurrent launches, e.g. from a web
# server's request threads; one batch already uses every core
_LOCK = threading.Lock()


@contextlib.contextmanager
def _launch() -> Iterator[None]:
    """One parallel launch at a time (_LOCK), leaving torch's thread count as it found it:
    numba's OpenMP layer sets the OpenMP runtime's thread count, which torch shares, to
    numba's own (every core) when it starts, at the process's first launch, and
    torch.set_num_threads (a user's, `hnvm serve --threads`) would otherwise be lost after the
    first kNN batch; with it the floats of torch's products
    (MKL splits work by thread count)."""
    with _LOCK:
        threads = torch.get_num_threads()
        try:
            yield
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def _parts(n_rows: int) -> int:
    """How many parts a batch's rows run in: one per torch thread, of at least 64 rows each."""
    return max(1, min(torch.get_num_threads(), n_rows // 64))


def vsknn_scores(items: np.ndarray, weights: np.ndarray, ptr: np.ndarray, norms: np.ndarray, exclude: np.ndarray,
                 post_ptr: np.ndarray, post_sess: np.ndarray, sess_ptr: np.ndarray, sess_items: np.ndarray,
                 root_len: np.ndarray, sample_size: int, k: int, base: np.ndarray, out: np.ndarray) -> None:
    """`vsknn_rows` over every query (the arguments as there), the rows split in `_parts`."""
    with _launch():
        _vsknn_parts(items, weights, ptr, norms, exclude, post_ptr, post_sess, sess_ptr, sess_items, root_len,
                     sample_size, k, base, out, _parts(len(ptr) - 1))


def neighbour_mean(idx: np.ndarray, weight: np.float32, vectors: Any) -> np.ndarray:
    """float32[B, n_cols]: Σ_j weight · vectors[idx[b, j]] for each row b, the neighbours in the
    order of idx int64[B, k] (`neighbour_mean_rows`); vectors: float32 scipy CSR [U, n_cols].
    The rows are split in `_parts`. TypeError: vectors of another dtype (each sum would round
    to float32 at every step)."""
    if vectors.dtype != np.float32:
        raise TypeError(f"neighbour_mean: float32 vectors expected, got {vectors.dtype}")
    out = np.zeros((idx.shape[0], vectors.shape[1]), dtype=np.float32)
    with _launch():
        _neighbour_mean_parts(np.ascontiguousarray(idx, dtype=np.int64), np.float32(weight), vectors.indptr,
                              vectors.indices, vectors.data, out, _parts(idx.shape[0]))
    return out
