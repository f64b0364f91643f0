"""HNVM's repeat channel: what a user did with an item before, added to the item's score.

Not in the paper: an option (`HNVMConfig.repeat`), off by default, and off is the paper's HNVM
exactly. In basket data most of what a user buys next they bought before (Li et al., "A Next
Basket Recommendation Reality Check", TOIS 2023), and personal frequency with recency
(P-TopFreq; TIFU-KNN, Hu et al. KDD 2020) beats most neural models there; a decoder that scores
items through one softmax over embeddings cannot say "this user, this item, again" without
memorising every (user, item) pair. The channel (docs/design.md, "Repeat channel"):

    score(k, j) = W_out[j]·h_k + b_j                          the paper's decoder (eq. 11)
                + g_k · (rho_j·had + a_n·phi(n, j))           the user's earlier sessions
                + c_k·psi(k, j)                               the current session's prefix

    phi(n, j) = [had, log(1 + c), c / N, 1 / d, [d = 1], f_0.9, f_0.6]    0 for items never had;
        c = closed sessions before session n holding j, N = closed sessions before n,
        d = sessions since the last one holding j (1 = the previous session),
        f_r = sum of r^(d_s - 1) over the sessions s holding j (d_s sessions ago) / sum_{i<N} r^i, the
        time-decayed share of TIFU-KNN's user vectors (Hu et al. 2020) at two decay rates
    psi(k, j) = [log(1 + m), [j = i_{t-1}]]                    m = times j is in i_1..i_{t-1}
    a_n = A·cond_n + a_0       cond_n = [h_con_{n-1}; z_n] with z_n the prior mean (eq. 12), also in
                               training: the gate never reads the posterior of the session it scores
    g_k = 1 + tanh(v·h_k + v_0),  c_k = C·h_k + c_0            h_k: the decoder state of target k
    rho_j                      a learned per-item repeat propensity (milk comes back, a kettle not)

Why an additive feature term and not RepeatNet's repeat/explore mixture (Ren et al. AAAI 2019):
the mixture is a probability over two softmaxes, which needs the full softmax in training; an
additive term keeps scores as logits, so every loss of `ranking_loss` (BPR, BPR-max, sampled
softmax) trains it end to end unchanged, and it is sparse: only items of the user's history get
a term, so training and full-catalogue scoring pay O(history), not O(catalogue). The gates let
the model's state (z, h_con, e through z's prior, h_dec) decide how much this user, this
session and this position repeat. Every weight starts at 0: the channel begins silent.

Leakage: phi reads only the closed sessions before n, psi only the items before position t,
which is exactly what `score` / `score_sessions` are given. Serving: `RepeatMemory` keeps
(c, last session) per item a user had and folds one closed session at a time; its `features`
build phi from the same integers through the same `session_features`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_SESSION = 7  # phi
DECAYS = (0.9, 0.6)  # the decay rates of phi's decayed shares
N_PREFIX = 2  # psi
# The gate biases and rho are read times GAIN: Adam and Adagrad move a weight by about lr per
# step, and a small data set's few hundred steps at lr 0.002 would leave them near 0.
GAIN = 10.0


def session_features(count: Tensor, since: Tensor, n_prev: Tensor, decayed: Tensor) -> Tensor:
    """phi of items a user had: count (closed sessions holding the item, >= 1), since (sessions
    since the last one holding it, >= 1), n_prev (closed sessions, >= 1), each Long[P]; decayed
    Float[P, len(DECAYS)]: sum of r^(since - 1) over the sessions holding it -> Float[P, N_SESSION]."""
    c, n = count.to(torch.float32), n_prev.to(torch.float32)
    rates = torch.tensor(DECAYS, device=c.device)
    norm = (1 - rates.pow(n[:, None])) / (1 - rates)  # sum_{i<N} r^i
    return torch.cat([torch.stack([torch.ones_like(c), torch.log1p(c), c / n, 1.0 / since.to(torch.float32),
                                   (since == 1).to(torch.float32)], -1), decayed / norm], -1)


def prefix_features(count: Tensor, is_last: Tensor) -> Tensor:
    """psi: count Long[Q] (times the item is in the prefix), is_last Bool[Q] -> Float[Q, N_PREFIX]."""
    return torch.stack([torch.log1p(count.to(torch.float32)), is_last.to(torch.float32)], -1)


@dataclass
class Pairs:
    """Sparse features: (row, item) -> feat, at most one entry per (row, item)."""

    row: Tensor  # Long[P]
    item: Tensor  # Long[P]
    feat: Tensor  # Float[P, F]


def history_pairs(history: Tensor, window: Tensor, wanted: Tensor | None = None) -> Pairs:
    """phi for each session of `window` from the sessions before it: `history` and the window's
    earlier sessions. history: Long[B, S, T], window: Long[B, W, T'] (right-padded items; an
    all-0 session is padding and not counted); wanted: Bool[B, W] (None = all) the window
    sessions to return. Rows of the result: b * W + w."""
    S = history.shape[1]
    W = window.shape[1]
    T = max(history.shape[2], window.shape[2])
    items = torch.cat([F.pad(history, (0, T - history.shape[2])), F.pad(window, (0, T - window.shape[2]))], 1)
    real = (items > 0).any(-1)  # [B, S + W]
    before = real.cumsum(1) - real.long()  # closed real sessions before each session
    base = int(items.max()) + 1
    b, s, t = (items > 0).nonzero(as_tuple=True)
    occ = torch.unique((b * base + items[b, s, t]) * (S + W) + s)  # one per (row, item, session)
    s = occ % (S + W)
    pair, v = torch.unique(occ // (S + W), return_inverse=True)  # V (row, item) pairs
    b_v, item_v = pair // base, pair % base
    n_v = len(pair)
    order = before[b_v[v], s] + 1  # ordinal of the occurrence's session (1 = the row's first)
    old = s < S
    dev = items.device
    count = torch.zeros(n_v, dtype=torch.long, device=dev).index_add_(0, v[old], torch.ones_like(v[old]))
    last = torch.zeros(n_v, dtype=torch.long, device=dev).scatter_reduce_(0, v[old], order[old], "amax")
    in_w = torch.zeros(n_v, W, dtype=torch.long, device=dev)
    in_w[v[~old], s[~old] - S] = 1
    # the decayed counts: r^(sessions since) summed over the history (at the window's start),
    # then carried across the window, times r at each real session
    rates = torch.tensor(DECAYS, device=dev)
    since_old = (before[b_v[v], S] - order)[old].to(torch.float32)
    decayed = torch.zeros(n_v, len(DECAYS), device=dev).index_add_(0, v[old], rates.pow(since_old[:, None]))
    real_w = real[b_v, S:]  # [V, W]
    cols = []
    for w in range(W):
        cols.append(decayed)
        decayed = torch.where(real_w[:, w, None], rates * decayed + in_w[:, w, None], decayed)
    decayed = torch.stack(cols, 1)  # [V, W, len(DECAYS)]
    # before window session w: the history plus window sessions < w
    count = count[:, None] + in_w.cumsum(1) - in_w  # [V, W]
    seen = (in_w * before[b_v, S:] + in_w).cummax(1).values  # last ordinal up to and including w
    last = torch.maximum(last[:, None], F.pad(seen, (1, 0))[:, :W])
    n_prev = before[b_v, S:]  # [V, W]
    keep = count > 0
    if wanted is not None:
        keep &= wanted[b_v]
    vi, wi = keep.nonzero(as_tuple=True)
    feat = session_features(count[vi, wi], n_prev[vi, wi] - last[vi, wi] + 1, n_prev[vi, wi], decayed[vi, wi])
    return Pairs(b_v[vi] * W + wi, item_v[vi], feat)


def prefix_pairs(sessions: Tensor, rows: Tensor, pos: Tensor) -> Pairs:
    """psi for targets k = sessions[rows[k], pos[k]] from sessions[rows[k], :pos[k]].
    sessions: Long[R, T]; rows, pos: Long[K]. Rows of the result: k (sorted by (k, item))."""
    K = len(rows)
    k = torch.repeat_interleave(torch.arange(K, device=rows.device), pos)  # [Q0] one per prefix item
    if not len(k):
        return Pairs(k, k, torch.zeros(0, N_PREFIX, device=rows.device))
    t = torch.arange(len(k), device=k.device) - (pos.cumsum(0) - pos)[k]
    base = int(sessions.max()) + 1
    key, count = torch.unique(k * base + sessions[rows[k], t], return_counts=True)
    k, item = key // base, key % base
    last = sessions[rows, (pos - 1).clamp(min=0)]  # [K] the item before each target
    return Pairs(k, item, prefix_features(count, item == last[k]))


class RepeatChannel(nn.Module):
    """The learned part: gates from the decoder's session input and state, and rho."""

    def __init__(self, cond_dim: int, hidden: int, n_items: int, sparse: bool) -> None:
        super().__init__()
        self.session_gate = nn.Linear(cond_dim, N_SESSION)  # A, a_0
        self.target_gate = nn.Linear(hidden, 1 + N_PREFIX)  # (v, v_0) and (C, c_0)
        self.propensity = nn.Embedding(n_items + 2, 1, sparse=sparse)  # rho (+ padding, BOS rows)
        for p in self.parameters():
            nn.init.zeros_(p)

    def session_values(self, cond: Tensor, pairs: Pairs) -> Tensor:
        """cond Float[R, C] (row r's session input), pairs of phi -> Float[P]: rho·had + a_r·phi."""
        gates = F.linear(cond, self.session_gate.weight) + GAIN * self.session_gate.bias  # [R, N_SESSION]
        rho = GAIN * self.propensity(pairs.item).squeeze(-1)
        return rho * pairs.feat[:, 0] + (gates.index_select(0, pairs.row) * pairs.feat).sum(-1)

    def target_gates(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """hidden Float[K, H] -> (g Float[K], c Float[K, N_PREFIX])."""
        out = F.linear(hidden, self.target_gate.weight) + GAIN * self.target_gate.bias
        return 1.0 + torch.tanh(out[:, 0]), out[:, 1:]

    def terms(self, cond: Tensor, hist: Pairs, hidden: Tensor, target_row: Tensor,
              prefix: Pairs | None, n_items: int) -> RepeatTerms:
        """The repeat terms of K targets: cond Float[R, C] per session row, hist its phi,
        hidden Float[K, H], target_row Long[K] (each target's session row), prefix the targets'
        psi (rows = k; None = no prefix)."""
        g, c = self.target_gates(hidden)
        sess_val = self.session_values(cond, hist)
        if prefix is None or not len(prefix.row):
            prefix_val = hidden.new_zeros(0)
            prefix = Pairs(target_row.new_zeros(0), target_row.new_zeros(0), prefix_val)
        else:
            prefix_val = (c.index_select(0, prefix.row) * prefix.feat).sum(-1)
        return RepeatTerms(n_items, hist.row, hist.item, sess_val, len(cond), target_row, g,
                           prefix.row, prefix.item, prefix_val)


@dataclass
class RepeatTerms:
    """The repeat term of K targets, sparse: values of session rows (shared by their targets,
    times g) and of the targets themselves. Scores with it: `add_to`, `shared`, `at`."""

    n_items: int
    sess_row: Tensor  # Long[P]
    sess_item: Tensor  # Long[P]
    sess_val: Tensor  # Float[P]
    n_rows: int
    target_row: Tensor  # Long[K]
    g: Tensor  # Float[K]
    tgt_k: Tensor  # Long[Q]
    tgt_item: Tensor  # Long[Q]
    tgt_val: Tensor  # Float[Q]

    def add_to(self, scores: Tensor) -> Tensor:
        """scores Float[K, n_items + 1] (full catalogue) + the repeat terms: a new tensor where
        autograd records, else `scores` itself, updated in place."""
        order = torch.argsort(self.sess_row, stable=True)
        n_of = torch.bincount(self.sess_row, minlength=self.n_rows)
        start = n_of.cumsum(0) - n_of
        n_k = n_of[self.target_row]  # pairs of each target's session
        k = torch.repeat_interleave(torch.arange(len(n_k), device=n_k.device), n_k)
        idx = order[start[self.target_row][k] + torch.arange(len(k), device=k.device) - (n_k.cumsum(0) - n_k)[k]]
        rows = torch.cat([k, self.tgt_k])
        cols = torch.cat([self.sess_item[idx], self.tgt_item])
        vals = torch.cat([self.g[k] * self.sess_val[idx], self.tgt_val]).to(scores.dtype)
        if torch.is_grad_enabled() and (scores.requires_grad or vals.requires_grad):
            return scores.index_put((rows, cols), vals, accumulate=True)
        return scores.index_put_((rows, cols), vals, accumulate=True)  # scoring: no copy

    def shared(self, ids: Tensor) -> Tensor:
        """The terms of shared candidates ids Long[M] -> Float[K, M]."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        slot = torch.full((self.n_items + 2,), -1, dtype=torch.long, device=ids.device)
        slot[uniq] = torch.arange(len(uniq), device=ids.device)
        ps, pt = slot[self.sess_item], slot[self.tgt_item]
        s_keep, t_keep = ps >= 0, pt >= 0
        rows = torch.zeros(self.n_rows, len(uniq), dtype=self.sess_val.dtype, device=ids.device)
        rows = rows.index_put((self.sess_row[s_keep], ps[s_keep]), self.sess_val[s_keep], accumulate=True)
        # index_select, not [...] indexing: its backward is an index_add, several times faster
        out = self.g[:, None] * rows.index_select(0, self.target_row)  # [K, U]
        out = out.index_put((self.tgt_k[t_keep], pt[t_keep]), self.tgt_val[t_keep], accumulate=True)
        return out.index_select(1, inv)

    def at(self, items: Tensor) -> Tensor:
        """The term of each target's own candidate items Long[K] -> Float[K]."""
        base = self.n_items + 2
        return (self.g * _lookup(self.sess_row * base + self.sess_item, self.sess_val,
                                 self.target_row * base + items)
                + _lookup(self.tgt_k * base + self.tgt_item, self.tgt_val,
                          torch.arange(len(items), device=items.device) * base + items))


def _lookup(keys: Tensor, values: Tensor, queries: Tensor) -> Tensor:
    """values[i] where keys[i] == query (unique keys), 0 where none: Float[len(queries)]."""
    if not len(keys):
        return values.new_zeros(len(queries))
    order = torch.argsort(keys)
    sk = keys[order]
    i = torch.searchsorted(sk, queries).clamp(max=len(sk) - 1)
    return torch.where(sk[i] == queries, values[order[i]], values.new_zeros(()))


def loss_scorers(net: Any, prefix: Tensor, window: Tensor, out: Any, hidden: Tensor
                 ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """`ranking_loss`'s scorers of a training window batch with the repeat terms added: phi of
    each window session from the sessions before it (prefix: Long[B, P, T], window: Long[B, W,
    T']), psi of each target from its session's prefix. net: an HNVMNet with a repeat channel;
    out: its HNVMOutput; hidden: Float[K, H] = out.dec_hidden[out.item_mask]."""
    B, W, T = window.shape
    b, w, t = out.item_mask.nonzero(as_tuple=True)  # the order of dec_hidden[item_mask]
    rows = b * W + w
    terms = net.repeat.terms(out.cond.reshape(B * W, -1), history_pairs(prefix, window, out.session_mask),
                             hidden, rows, prefix_pairs(window.reshape(B * W, T), rows, t), net.n_items)

    def score_items(h: Tensor, ids: Tensor) -> Tensor:
        if ids.dim() == 2 and ids.shape[1] != 1:
            raise ValueError("per-row candidates: one per row ([K, 1]); shared ones: [M]")
        extra = terms.at(ids[:, 0])[:, None] if ids.dim() == 2 else terms.shared(ids)
        return net.score_items(h, ids) + extra

    return (lambda h: terms.add_to(net.score(h))), score_items


class RepeatMemory:
    """A user's repeat statistics for serving, folded one closed session at a time: per item
    the user had, the closed sessions holding it and the ordinal of the last one (O(session)
    per fold). `features()` gives phi for the next session exactly as `history_pairs` does."""

    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        self.items: list[int] = []
        self.count: list[int] = []
        self.last: list[int] = []
        self.decayed: list[list[float]] = []  # per DECAYS rate: sum of r^(last - session) at `last`
        self.n = 0  # closed sessions

    def fold(self, items: np.ndarray | list[int]) -> None:
        """One closed session (its item ids; an empty one is not a session)."""
        distinct = {int(i) for i in items if int(i) > 0}
        if not distinct:
            return
        self.n += 1
        for i in distinct:
            j = self.index.get(i)
            if j is None:
                self.index[i] = len(self.items)
                self.items.append(i)
                self.count.append(1)
                self.last.append(self.n)
                self.decayed.append([1.0] * len(DECAYS))
            else:
                gap = self.n - self.last[j]
                self.decayed[j] = [d * r**gap + 1.0 for d, r in zip(self.decayed[j], DECAYS, strict=True)]
                self.count[j] += 1
                self.last[j] = self.n

    def copy(self) -> RepeatMemory:
        out = RepeatMemory()
        out.index, out.items, out.n = dict(self.index), list(self.items), self.n
        out.count, out.last, out.decayed = list(self.count), list(self.last), [list(d) for d in self.decayed]
        return out

    def features(self) -> Pairs:
        """phi of every item had, for the next session: Pairs with row 0."""
        items = torch.tensor(self.items, dtype=torch.long)
        n_prev = torch.full_like(items, self.n)
        since = n_prev - torch.tensor(self.last, dtype=torch.long) + 1
        decayed = torch.tensor(self.decayed, dtype=torch.float32).reshape(-1, len(DECAYS))
        decayed = decayed * torch.tensor(DECAYS).pow((since - 1).to(torch.float32)[:, None])
        feat = session_features(torch.tensor(self.count, dtype=torch.long), since, n_prev, decayed)
        return Pairs(torch.zeros_like(items), items, feat.reshape(-1, N_SESSION))
