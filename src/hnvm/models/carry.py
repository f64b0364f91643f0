"""The state entering a training window, carried over from the step that trained the same user's
previous window (docs/design.md, "HNVM", user windows).

HNVM and HRNN train on user windows: up to W consecutive sessions of one user, entering with the
state (HNVM's context h_con, HRNN's user state) after the user's earlier sessions, without
gradient. Re-encoding those earlier sessions before every window costs O(S²/W) session encodings
per user and epoch (about a sixth of an HNVM step at the paper's sizes on the Instacart sample).
With the windows of each user in session order within an epoch (`in_user_order`), the state
after a window is already computed when it is trained; kept (detached), it is the next window's
entering state. It is the state under the weights of that earlier step (truncated backpropagation through
time, as session-parallel GRU training carries hidden states across steps), where re-encoding
gives it under the current weights. A window whose predecessor is in the same batch is
re-encoded as before. Under torchrun nothing is carried (and the order is the plain shuffle):
batches are dealt to the processes in turn, so a window's predecessor is mostly another
process's, and carrying would change the order and keep states for little gain.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


class CarriedStates:
    """Entering states of training windows, kept between steps of one epoch.

    windows: int64[n, 3] (user, first session, end session) as from `user_windows`; a window's
    successor is the same user's window that starts where it ends. enabled=False: every entering
    state is encoded (the model setting `carry_context = false`, HRNN's `carry_state = false`).
    Windows come in session order per user (`in_user_order`), so a successor is always in a
    later batch than its window or in the same one: no kept state outlives its use."""

    def __init__(self, windows: np.ndarray, enabled: bool = True) -> None:
        self.enabled = enabled
        self.successor = np.full(len(windows), -1, dtype=np.int64)
        by_user = np.lexsort((windows[:, 1], windows[:, 0]))  # by user, then first session
        a, b = by_user[:-1], by_user[1:]
        follows = (windows[a, 0] == windows[b, 0]) & (windows[a, 2] == windows[b, 1])
        self.successor[a[follows]] = b[follows]
        self._states: dict[int, Tensor] = {}
        self.active = enabled  # this epoch carries (enabled, and one process)
        self.carried = self.encoded = 0  # windows with a prefix, by where their state came from

    def reset(self, world_size: int = 1) -> bool:
        """Start an epoch: forget every kept state (they are of one epoch only); carry in it only
        when enabled and in one process. Returns whether it carries (then the epoch's batches
        must put each user's windows in session order: `window_batches(user_order=True)`)."""
        self._states.clear()
        self.active = self.enabled and world_size <= 1
        return self.active

    def entering(self, ids: np.ndarray | None, prefix: Tensor,
                 encode: Callable[[Tensor], Tensor]) -> Tensor | None:
        """The state entering each window: Float[B, H], or None when no window has a prefix.
        ids: int64[B] window rows (None: nothing is carried); prefix: Long[B, P, T] the earlier
        sessions; encode: prefix rows Long[B', P, T] -> Float[B', H], without gradient (rows
        without a carried state; every row when none is carried: the same call as without
        carrying)."""
        if prefix.shape[1] == 0:
            return None
        has_prefix = (prefix > 0).flatten(1).any(1).tolist()
        kept: list[Tensor | None] = [None] * len(has_prefix)
        if ids is not None and self.active:
            kept = [self._states.pop(int(i), None) for i in ids]
        hits = [b for b, s in enumerate(kept) if s is not None and has_prefix[b]]
        self.carried += len(hits)
        misses = [b for b, s in enumerate(kept) if s is None and has_prefix[b]]
        self.encoded += len(misses)
        if not hits:
            return encode(prefix)
        first = kept[hits[0]]
        assert first is not None
        h0 = first.new_zeros(len(kept), first.shape[-1])  # rows without a prefix enter with 0
        h0[hits] = torch.stack([t for b in hits if (t := kept[b]) is not None])
        if misses:
            h0[misses] = encode(prefix[misses]).to(h0.dtype)
        return h0

    def store(self, ids: np.ndarray | None, after: Tensor) -> None:
        """Keep after: Float[B, H], the state after each window's last session, for the windows
        that follow them."""
        if ids is None or not self.active:
            return
        succ = self.successor[ids]
        rows = np.flatnonzero((succ >= 0) & ~np.isin(succ, ids))  # (a successor in this batch is trained)
        if len(rows) == 0:
            return
        after = after.detach()[torch.from_numpy(rows).to(after.device)]  # a copy of the kept rows only
        for k, b in enumerate(rows.tolist()):
            self._states[int(succ[b])] = after[k]
