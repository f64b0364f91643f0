"""Each user's context state after the dataset history, encoded in fixed blocks of users.

A served HNVM user starts from h_con, the context GRU's state after the user's dataset sessions
(paper, section 3.2, eq. 9-10). Encoding one user at a time costs a GRU call per time step for
that user alone (about 5 ms per Instacart user); encoding a block of users at once costs about
1 ms per user (`benchmarks/serve.py` times the warm-up). So `HistoryContexts` encodes users in
blocks: `hnvm serve` warms every block in the background after it starts answering, and a
request for a user whose block is not warm yet encodes that whole block first.

Blocks are fixed by the data set alone: users with at least one dataset session, ordered by
their number of sessions (similar histories pad little), then by id, BLOCK_USERS at a time. A
user's state is always the output of encoding their whole block, whichever path ran it and
whenever, so its bits never depend on the order of requests: a restart replays to bit-identical
states (tests/test_serve.py). The states can be saved after a warm-up and loaded at the next
start (`save` / `load`, safetensors), keyed by everything they depend on (`digest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hnvm.atomic import atomic_file
from hnvm.data.batches import Sequences

log = logging.getLogger(__name__)

BLOCK_USERS = 32  # lazy cost of a cold block ~32 ms, warm-up ~1 ms per user (Instacart, 1 thread)
FORMAT = "hnvm-history-contexts/1"


class HistoryContexts:
    """h_con Float[H] after each user's dataset sessions (section 3.2, eq. 9-10), per block.

    `encode(users Long[B], sessions Long[B, N, T]) -> Float[B, H]` is the model's
    `encode_history`. Thread use: `encode_block` is pure (weights and history only) and may run
    on any thread; `context` and `install` change the table and run on one thread (the engine's).
    """

    def __init__(self, encode: Callable[[Tensor, Tensor], Tensor], history: Sequences, hidden: int,
                 block_users: int | None = None, device: torch.device | str = "cpu") -> None:
        self._encode, self.history, self.hidden, self.device = encode, history, hidden, torch.device(device)
        n_sessions = (history.user_end - history.user_first).astype(np.int64)  # [n_users + 1]
        users = np.flatnonzero(n_sessions > 0)
        users = users[np.argsort(n_sessions[users], kind="stable")]  # by sessions, then id
        block_users = block_users or BLOCK_USERS
        self.blocks = [users[i: i + block_users] for i in range(0, len(users), block_users)]
        self.block_of = np.full(len(n_sessions), -1, dtype=np.int64)
        for b, members in enumerate(self.blocks):
            self.block_of[members] = b
        # [n_users + 1, H]: row u is valid once u's block is done
        self.table = torch.zeros(len(n_sessions), hidden, device=self.device)
        self.done = np.zeros(len(self.blocks), dtype=bool)
        self.total = len(users)
        self.warm_users = 0

    @property
    def ready(self) -> bool:
        return bool(self.done.all())

    def pending(self) -> list[int]:
        """Blocks not encoded yet, in order."""
        return np.flatnonzero(~self.done).tolist()

    def context(self, user: int) -> Tensor:
        """h_con Float[1, H] after the dataset sessions of `user` (a dataset user id; zeros for a
        user without any), encoding the user's block first if it is not warm yet."""
        b = int(self.block_of[user]) if 0 <= user < len(self.block_of) else -1
        if b < 0:
            return torch.zeros(1, self.hidden, device=self.device)
        if not self.done[b]:
            self.install(b, self.encode_block(b))
        return self.table[user: user + 1]

    def install(self, b: int, states: Tensor) -> None:
        """Store block b's states (from `encode_block`); a block already stored is kept as is."""
        if self.done[b]:
            return
        self.table[torch.from_numpy(self.blocks[b]).to(self.device)] = states
        self.done[b] = True
        self.warm_users += len(self.blocks[b])

    def encode_block(self, b: int) -> Tensor:
        """Float[len(block b), H]: block b's users encoded in one pass, each user's sessions
        right-aligned as evaluation pads them (`data.batches.pad_sessions`)."""
        users = self.blocks[b]
        with torch.no_grad():
            return self._encode(torch.from_numpy(users).to(self.device),
                                self._sessions(users).to(self.device)).float()

    def _sessions(self, users: np.ndarray) -> Tensor:
        """Long[B, N, T]: the users' dataset sessions, right-aligned in N, right-padded in T."""
        h = self.history
        first = h.user_first[users]
        count = h.user_end[users] - first  # sessions per user, >= 1
        row = np.repeat(np.arange(len(users)), count)
        k = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)  # session's ordinal in its row
        sess = first[row] + k
        slot = count.max() - count[row] + k
        start, length = h.offsets[sess], h.offsets[sess + 1] - h.offsets[sess]
        ev = np.repeat(np.arange(len(sess)), length)
        pos = np.arange(len(ev)) - np.repeat(np.cumsum(length) - length, length)
        out = np.zeros((len(users), int(count.max()), int(length.max())), dtype=np.int64)
        out[row[ev], slot[ev], pos] = h.items[start[ev] + pos]
        return torch.from_numpy(out)

    # ---- persistence ---------------------------------------------------------------------------
    def digest(self, weights: Iterable[Tensor]) -> str:
        """What the states depend on: the model's tensors, the history, the blocks, and the
        arithmetic (torch version, CPU kernels): a file with another digest is not loaded."""
        sha = hashlib.sha256(FORMAT.encode())
        for t in weights:
            sha.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)
        h = self.history
        for a in (h.items, h.offsets, h.user_first, h.user_end, *self.blocks):
            sha.update(np.ascontiguousarray(a).data)
        sha.update(json.dumps([torch.__version__, torch.backends.cpu.get_cpu_capability(),
                               torch.get_num_threads()]).encode())
        return sha.hexdigest()

    def save(self, path: str | Path, key: str) -> None:
        """Write the table (once every block is warm) atomically, with `key` (`digest`)."""
        from safetensors.torch import save_file

        assert self.ready, "save after the warm-up"
        atomic_file(path, lambda tmp: save_file({"h_con": self.table}, str(tmp),
                                                metadata={"format": FORMAT, "key": key}))

    def load(self, path: str | Path, key: str) -> bool:
        """Take the table from `path` if it was saved with `key`; False (and nothing changed)
        when it is missing, unreadable or of other weights, data or arithmetic."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("key") != key:
                    log.info("%s: saved for other weights, data or arithmetic; encoding afresh", path)
                    return False
                table = f.get_tensor("h_con")
        except Exception as exc:  # a damaged file is derived data: encode afresh
            log.warning("%s: unreadable (%s); encoding afresh", path, exc)
            return False
        if table.shape != self.table.shape or table.dtype != self.table.dtype:
            return False
        self.table = table.to(self.device)
        self.done[:] = True
        self.warm_users = self.total
        return True
