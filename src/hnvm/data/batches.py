"""Padded tensors from a dataset: user windows for training, evaluation batches.

`Sequences` holds every session of a dataset as flat numpy arrays (sessions are numbered by
user, then time, so each user's sessions form one contiguous range); batches are cut from it
without touching polars again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from hnvm.contract import Batch
from hnvm.distributed import shard_indices

SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}


@dataclass
class Sequences:
    """All sessions of a dataset, flat.

    Whole-session protocols (user-last, time) give every event of a session the same split.
    Held-out-item protocols (leave-one-out, shan) mix them: the session that holds a held-out
    item has training events before it (docs/design.md, "Data preparation"). `session_split`
    is then the highest split code in the session (test > valid > train), `item_split` keeps
    each event's own, and `view(("train",))` is what training reads."""

    items: np.ndarray  # int64[n_events], items in (session, pos) order
    offsets: np.ndarray  # int64[n_sessions + 1]
    session_user: np.ndarray  # int64[n_sessions]
    session_split: np.ndarray  # int8[n_sessions]
    user_first: np.ndarray  # int64[n_users + 1]: first session of each user (index by user id)
    user_end: np.ndarray  # int64[n_users + 1]: one past the user's last session
    item_split: np.ndarray | None = None  # int8[n_events]: a held-out-item split; None: whole sessions
    session_ids: np.ndarray | None = None  # int64[n_sessions]: dataset ids (a view); None: = index

    @classmethod
    def from_events(cls, events: pl.DataFrame, n_users: int, held_out_items: bool | None = None) -> Sequences:
        """From a data set's events; `held_out_items` says whether its split holds out single
        items (`Dataset.held_out_items`; None: whether some session mixes splits)."""
        ev = events.sort("session", "pos")
        sess = ev.get_column("session").to_numpy().astype(np.int64)
        codes = (ev.get_column("split").cast(pl.Utf8)
                 .replace_strict(SPLIT_CODE, return_dtype=pl.Int8).to_numpy())
        return cls._build(ev.get_column("item").to_numpy().astype(np.int64), sess,
                          ev.get_column("user").to_numpy().astype(np.int64), codes, n_users,
                          held_out_items=held_out_items)

    @classmethod
    def _build(cls, items: np.ndarray, sess: np.ndarray, users: np.ndarray, codes: np.ndarray,
               n_users: int, session_ids: np.ndarray | None = None,
               held_out_items: bool | None = None) -> Sequences:
        """From per-event arrays in (session, pos) order; `sess` numbers sessions 0.. densely."""
        n_sessions = int(sess.max()) + 1 if len(sess) else 0
        counts = np.bincount(sess, minlength=n_sessions)
        offsets = np.zeros(n_sessions + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        firsts = offsets[:-1]
        session_user = users[firsts]
        session_split = np.maximum.reduceat(codes, firsts) if n_sessions else codes[:0]
        mixed = bool(len(codes) and (codes != session_split[sess]).any())
        if held_out_items is not None:
            mixed = held_out_items
        user_first = np.zeros(n_users + 1, dtype=np.int64)
        user_end = np.zeros(n_users + 1, dtype=np.int64)
        order = np.arange(n_sessions)
        # sessions are sorted by user, so first/last occurrences delimit each user's range
        np.maximum.at(user_end, session_user, order + 1)
        user_first[:] = n_sessions
        np.minimum.at(user_first, session_user, order)
        user_first[user_end == 0] = 0
        return cls(items, offsets, session_user, session_split.astype(np.int8), user_first, user_end,
                   codes.astype(np.int8) if mixed else None, session_ids)

    @property
    def n_sessions(self) -> int:
        return len(self.session_user)

    def session(self, s: int) -> np.ndarray:
        return self.items[self.offsets[s]:self.offsets[s + 1]]

    def length(self, s: int) -> int:
        return int(self.offsets[s + 1] - self.offsets[s])

    def sessions_of(self, split: str) -> np.ndarray:
        """Sessions holding events of `split` (for a held-out-item protocol, the session of a
        held-out item is a session of its split and of "train")."""
        code = SPLIT_CODE[split]
        if self.item_split is None:
            return np.flatnonzero(self.session_split == code)
        ev_session = np.repeat(np.arange(self.n_sessions), np.diff(self.offsets))
        return np.unique(ev_session[self.item_split == code])

    def targets_in(self, s: int, split: str, include_first: bool) -> tuple[list[int], int]:
        """(positions, end) of `split`'s next-item targets in session s: a whole session's
        positions from 1 (from 0 with include_first), a mixed session's held-out positions
        (position 0 included: the protocol scores every held-out item); `end` = one past the
        last target, where the row's session is cut (later events are not shown)."""
        n, code = self.length(s), SPLIT_CODE[split]
        if self.item_split is None:
            if self.session_split[s] != code:
                return [], 0
            return list(range(0 if include_first else 1, n)), n
        pos = np.flatnonzero(self.item_split[self.offsets[s]:self.offsets[s + 1]] == code)
        return pos.tolist(), (int(pos[-1]) + 1 if len(pos) else 0)

    @property
    def has_held_out_items(self) -> bool:
        """Whether the split holds out single items (leave-one-out, shan)."""
        return self.item_split is not None

    def view(self, splits: tuple[str, ...] = ("train",)) -> Sequences:
        """The events of `splits` only, as their own Sequences (sessions left empty are dropped,
        `session_ids` maps back to this one's): what a model trains on. For a whole-session
        split this is the sessions of `splits`; for a held-out-item protocol the held-out items
        (and, for shan, the events after them) are gone from their sessions."""
        codes = self.item_split if self.item_split is not None else np.repeat(
            self.session_split, np.diff(self.offsets))
        keep = np.isin(codes, [SPLIT_CODE[x] for x in splits])
        base = self.session_ids if self.session_ids is not None else np.arange(self.n_sessions)
        if keep.all():
            return self
        ev_session = np.repeat(np.arange(self.n_sessions), np.diff(self.offsets))[keep]
        kept, dense = np.unique(ev_session, return_inverse=True)
        # a view keeps the held-out-item marking when it keeps held-out items (train + valid)
        held = True if self.item_split is not None and splits != ("train",) else None
        return Sequences._build(self.items[keep], dense.astype(np.int64), self.session_user[ev_session],
                                codes[keep], len(self.user_first) - 1, base[kept], held_out_items=held)


def pad_sessions(
    seq: Sequences, rows: list[list[int]], max_len: int | None = None,
    last_end: list[int] | None = None,
) -> torch.Tensor:
    """Long[B, N, T]: each row's sessions right-aligned in N (empty sessions first).
    A session longer than `max_len` keeps its last `max_len` items (only where a setting asks);
    `last_end[b]` cuts row b's last session after that many items (a held-out item's row)."""
    n = max((len(r) for r in rows), default=0)
    if last_end is None:
        t = max((seq.length(s) for r in rows for s in r), default=1)
    else:
        t = max((min(last_end[b], seq.length(s)) if j == len(r) - 1 else seq.length(s)
                 for b, r in enumerate(rows) for j, s in enumerate(r)), default=1)
    if max_len is not None:
        t = min(t, max_len)
    out = np.zeros((len(rows), max(n, 1), max(t, 1)), dtype=np.int64)
    for b, r in enumerate(rows):
        shift = n - len(r)
        for j, s in enumerate(r):
            items = seq.session(s)
            if last_end is not None and j == len(r) - 1:
                items = items[:last_end[b]]
            if max_len is not None and len(items) > max_len:
                items = items[-max_len:]
            out[b, shift + j, : len(items)] = items
    return torch.from_numpy(out)


def history_of(seq: Sequences, s: int, max_history: int | None) -> list[int]:
    """Sessions of the same user strictly before session s (optionally the last few)."""
    lo = int(seq.user_first[seq.session_user[s]])
    if max_history is not None:
        lo = max(lo, s - max_history)
    return list(range(lo, s))


def next_item_batches(
    seq: Sequences,
    split: str = "test",
    *,
    include_first: bool = False,
    max_targets: int = 512,
    max_history: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Evaluation batches for next-item prediction: each row is one session of `split` (last
    in the session axis) with the user's earlier sessions before it; targets are
    `Sequences.targets_in` (a whole session's positions >= 1, >= 0 with include_first; a
    held-out item wherever it is), at most about `max_targets` per batch. With world_size > 1
    only batches number rank, rank + world_size, ... are built (an evaluation shard)."""
    if split == "valid" and seq.has_held_out_items:
        # no test item in a validation row, not even in an earlier session (shan can hold a
        # user's test session before their validation session)
        seq = seq.view(("train", "valid"))
    n_batches = 0
    rows: list[list[int]] = []
    ends: list[int] | None = [] if seq.has_held_out_items else None
    users: list[int] = []
    t_rows: list[int] = []
    t_pos: list[int] = []
    for s in seq.sessions_of(split):
        s = int(s)
        positions, end = seq.targets_in(s, split, include_first)
        if not positions:
            continue
        rows.append([*history_of(seq, s, max_history), s])
        if ends is not None:
            ends.append(end)
        users.append(int(seq.session_user[s]))
        t_rows.extend([len(rows) - 1] * len(positions))
        t_pos.extend(positions)
        if len(t_rows) >= max_targets:
            if n_batches % world_size == rank:
                yield _batch(seq, users, rows, t_rows, t_pos, last_end=ends)
            n_batches += 1
            rows, users, t_rows, t_pos = [], [], [], []
            ends = [] if ends is not None else None
    if rows and n_batches % world_size == rank:
        yield _batch(seq, users, rows, t_rows, t_pos, last_end=ends)


def _batch(seq: Sequences, users: list[int], rows: list[list[int]], t_rows: list[int],
           t_pos: list[int], sessions: list[int] | None = None, last_end: list[int] | None = None) -> Batch:
    ids = sessions if sessions is not None else [r[-1] if r else -1 for r in rows]
    if seq.session_ids is not None:  # a view: the data set's session ids
        ids = [int(seq.session_ids[i]) if i >= 0 else -1 for i in ids]
    return Batch(
        session_ids=torch.tensor(ids, dtype=torch.long),
        users=torch.tensor(users, dtype=torch.long),
        sessions=pad_sessions(seq, rows, last_end=last_end),
        target_rows=torch.tensor(t_rows, dtype=torch.long),
        target_pos=torch.tensor(t_pos, dtype=torch.long),
    )


def next_session_batches(
    seq: Sequences, split: str = "test", *, max_users: int = 256, max_history: int | None = None,
    rank: int = 0, world_size: int = 1,
) -> Iterator[tuple[Batch, list[np.ndarray]]]:
    """Batches of history-only rows for next-session prediction, with each row's target set
    (the unique items of the held-out session); rank's shard of them as in next_item_batches.
    A held-out-item protocol has no held-out sessions: ValueError."""
    if seq.has_held_out_items:
        raise ValueError("the next-session task needs a whole-session split (user-last or time); this "
                         "data set holds out single items (leave-one-out or shan)")
    n_batches = 0
    rows: list[list[int]] = []
    users: list[int] = []
    sets: list[np.ndarray] = []
    held_out: list[int] = []
    for s in seq.sessions_of(split):
        s = int(s)
        hist = history_of(seq, s, max_history)
        rows.append(hist)
        users.append(int(seq.session_user[s]))
        sets.append(np.unique(seq.session(s)))
        held_out.append(s)
        if len(rows) >= max_users:
            if n_batches % world_size == rank:
                yield _batch(seq, users, rows, [], [], held_out), sets
            n_batches += 1
            rows, users, sets, held_out = [], [], [], []
    if rows and n_batches % world_size == rank:
        yield _batch(seq, users, rows, [], [], held_out), sets


@dataclass
class WindowBatch:
    """A training batch: up to W consecutive train sessions per user, plus the sessions
    before the window (context only, no gradient). Both right-aligned like `Batch`."""

    users: torch.Tensor  # Long[B]
    prefix: torch.Tensor  # Long[B, P, T] (P may be 0)
    window: torch.Tensor  # Long[B, W, T]
    ids: np.ndarray | None = None  # int64[B] rows of the `user_windows` array (None: not given)

    @property
    def n_targets(self) -> int:
        return int((self.window != 0).sum())


def user_windows(seq: Sequences, window: int, splits: tuple[str, ...] = ("train",)) -> np.ndarray:
    """int64[n_windows, 3]: (user, first session, end session) cutting each user's sessions of
    `splits` into windows of at most `window` sessions."""
    keep = np.isin(seq.session_split, [SPLIT_CODE[s] for s in splits])
    out = []
    for u in np.flatnonzero(seq.user_end > 0):
        ss = np.arange(seq.user_first[u], seq.user_end[u])
        ss = ss[keep[ss]]
        if len(ss) == 0:
            continue
        # train sessions are contiguous at the start of a user's range (user-last split);
        # windows aligned to the end keep the most recent sessions in one window
        for end in range(len(ss), 0, -window):
            lo = max(0, end - window)
            out.append((u, ss[lo], ss[end - 1] + 1))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def window_batches(
    seq: Sequences,
    windows: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None,
    *,
    max_len: int | None = None,
    max_prefix: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    user_order: bool = False,
) -> Iterator[WindowBatch]:
    """Shuffled training batches of windows. Under torchrun rank r of world_size takes its
    shard of the batches (`shard_indices`: disjoint, the same count on every rank).
    user_order: each user's windows come in session order (`in_user_order`), so that a window's
    entering state can be carried over from the user's previous window (`CarriedStates`)."""

    order = rng.permutation(len(windows)) if rng is not None else np.arange(len(windows))
    if user_order:
        order = in_user_order(windows, order)
    n_batches = (len(order) + batch_size - 1) // batch_size
    for i in shard_indices(n_batches, rank, world_size):
        sel = windows[order[i * batch_size:(i + 1) * batch_size]]
        prefixes, wins = [], []
        for u, lo, hi in sel:
            first = int(seq.user_first[u])
            if max_prefix is not None:
                first = max(first, int(lo) - max_prefix)
            prefixes.append(list(range(first, int(lo))))
            wins.append(list(range(int(lo), int(hi))))
        prefix = (pad_sessions(seq, prefixes, max_len) if any(prefixes)
                  else torch.zeros((len(sel), 0, 1), dtype=torch.long))
        yield WindowBatch(
            users=torch.from_numpy(sel[:, 0].copy()),
            prefix=prefix,
            window=pad_sessions(seq, wins, max_len),
            ids=order[i * batch_size:(i + 1) * batch_size].copy(),
        )


def in_user_order(windows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`order` (a permutation of the rows of `windows`, int64[n, 3] as from `user_windows`) with
    each user's windows reassigned, among the positions that user holds, in session order: every
    user keeps the same positions, and the earlier window takes the earlier position."""
    positions = np.lexsort((np.arange(len(order)), windows[order, 0]))  # by user, then position
    chronological = np.lexsort((windows[:, 1], windows[:, 0]))  # by user, then first session
    out = np.empty_like(order)
    out[positions] = chronological
    return out
