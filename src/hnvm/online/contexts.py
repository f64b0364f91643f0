"""Each user's state after the dataset history, encoded in fixed blocks of users.

A served HNVM user starts from h_con, the context GRU's state after the user's dataset sessions
(paper, section 3.2, eq. 9-10), and the next session starts from cond = [h_con; z] (z the prior
mean, eq. 12) and the decoder state after BOS (eq. 11). Encoding one user at a time costs a GRU
call per time step for that user alone (about 5 ms per Instacart user); encoding a block of users
at once costs about 1 ms per user (`benchmarks/serve.py` times the warm-up). So
`HistoryContexts` encodes users in blocks: `hnvm serve` warms every block in the background
after it starts answering (a request for a cold user waits for its block to be encoded next);
elsewhere, the first request for a user whose block is not warm yet encodes that whole block.

Blocks are fixed by the data set alone: users with at least one dataset session, ordered by
their number of sessions (similar histories pad little), then by id, BLOCK_USERS at a time. A
user's states are always the output of encoding their whole block, whichever path ran it and
whenever, so their bits never depend on the order of requests: a restart replays to
bit-identical states (tests/test_serve.py). The states can be saved after a warm-up and loaded
at the next start (`save` / `load`, safetensors), keyed by everything they depend on (`digest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from hnvm.atomic import atomic_file
from hnvm.data.batches import Sequences

log = logging.getLogger(__name__)

BLOCK_USERS = 32  # lazy cost of a cold block ~32 ms, warm-up ~1 ms per user (Instacart, 1 thread)
FORMAT = "hnvm-history-contexts/2"
TABLES = ("h_con", "cond", "h_bos", "e")  # e: only for a model with a general preference


class _Encoder(Protocol):  # the parts of `online.scorers.StepModel` (HNVM) used here
    @property
    def bos(self) -> int: ...
    def encode_history(self, users: Tensor, sessions: Tensor) -> Tensor: ...
    def general_preference(self, users: Tensor) -> Tensor | None: ...
    def session_condition(self, h_con: Tensor, e: Tensor | None) -> Tensor: ...
    def decoder_step(self, item: int | Tensor, h_dec: Tensor | None, cond: Tensor) -> Tensor: ...


class HistoryContexts:
    """Per user with dataset sessions, after them (section 3.2): h_con Float[H] (eq. 9-10), and
    the next session's start: cond Float[C] (eq. 11-12, z = the prior mean) and the decoder
    state after BOS, h_bos Float[H] (eq. 11).

    `model`: HNVM (`online.scorers.StepModel`); `uids` Long[n_users + 1]: the model's user id of
    each dataset user (0 for one the model never trained on). Thread use: `encode_block` is pure
    (weights and history only) and may run on any thread; `context`, `start` and `install`
    change the tables and run on one thread (the engine's).
    """

    def __init__(self, model: _Encoder, history: Sequences, uids: np.ndarray, hidden: int,
                 block_users: int | None = None, device: torch.device | str = "cpu") -> None:
        self.model, self.history, self.uids, self.hidden = model, history, uids, hidden
        self.device = torch.device(device)
        n_sessions = (history.user_end - history.user_first).astype(np.int64)  # [n_users + 1]
        users = np.flatnonzero(n_sessions > 0)
        users = users[np.argsort(n_sessions[users], kind="stable")]  # by sessions, then id
        block_users = block_users or BLOCK_USERS
        self.blocks = [users[i: i + block_users] for i in range(0, len(users), block_users)]
        self.block_of = np.full(len(n_sessions), -1, dtype=np.int64)
        for b, members in enumerate(self.blocks):
            self.block_of[members] = b
        self.tables: dict[str, Tensor] = {}  # name -> [n_users + 1, width]; row u valid once u's block is done
        self.done = np.zeros(len(self.blocks), dtype=bool)
        self.total = len(users)
        self.warm_users = 0

    @property
    def ready(self) -> bool:
        return self.warm_users == self.total  # (read per request: a counter, not a scan of `done`)

    def cold(self, user: int) -> int | None:
        """The block of `user` (a dataset user id) if it is not encoded yet, else None (also for
        a user without dataset sessions)."""
        b = self._block(user)
        return b if b >= 0 and not self.done[b] else None

    def _block(self, user: int) -> int:
        return int(self.block_of[user]) if 0 <= user < len(self.block_of) else -1

    def pending(self) -> list[int]:
        """Blocks not encoded yet, the users with the most sessions first (the likeliest to be
        active, and the dearest to encode at a request)."""
        return np.flatnonzero(~self.done)[::-1].tolist()

    def context(self, user: int) -> Tensor:
        """h_con Float[1, H] after the dataset sessions of `user` (a dataset user id; zeros for a
        user without any), encoding the user's block first if it is not warm yet."""
        return self._row(user, "h_con")

    def preference(self, user: int) -> Tensor | None:
        """e Float[1, d_e] of `user` (a user with dataset sessions; None for a model without e),
        as `general_preference` of the user's model id gives it."""
        return self._row(user, "e")

    def start(self, user: int) -> tuple[Tensor, Tensor]:
        """(cond Float[1, C], h_bos Float[1, H]): how the session after the dataset history of
        `user` (a user with dataset sessions) starts; encodes the user's block if it is cold."""
        return self._row(user, "cond"), self._row(user, "h_bos")

    def _row(self, user: int, table: str) -> Tensor:
        b = self._block(user)
        if b < 0:
            if table != "h_con":
                raise ValueError(f"user {user} has no dataset sessions: no block")
            return torch.zeros(1, self.hidden, device=self.device)
        if not self.done[b]:
            self.install(b, self.encode_block(b))
        t = self.tables.get(table)
        return t[user: user + 1] if t is not None else None  # type: ignore[return-value]

    def install(self, b: int, states: dict[str, Tensor]) -> None:
        """Store block b's states (`encode_block`); a block already stored is kept as is."""
        if self.done[b]:
            return
        rows = torch.from_numpy(self.blocks[b]).to(self.device)
        for name, t in states.items():
            if name not in self.tables:
                self.tables[name] = torch.zeros(len(self.block_of), t.shape[1], device=self.device)
            self.tables[name][rows] = t
        self.done[b] = True
        self.warm_users += len(self.blocks[b])

    def encode_block(self, b: int) -> dict[str, Tensor]:
        """{h_con, cond, h_bos[, e]} of block b's users, each Float[len(block), width], encoded in
        one pass; each user's sessions right-aligned as evaluation pads them (`pad_sessions`)."""
        users, m = self.blocks[b], self.model
        with torch.no_grad():
            h_con = m.encode_history(torch.from_numpy(users).to(self.device),
                                     self._sessions(users).to(self.device)).float()
            e = m.general_preference(torch.from_numpy(self.uids[users]).to(self.device))
            cond = m.session_condition(h_con, e)
            out = {"h_con": h_con, "cond": cond, "h_bos": m.decoder_step(m.bos, None, cond)}
            return out if e is None else {**out, "e": e}

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
    def digest(self, weights: Iterable[Tensor], config: str = "") -> str:
        """What the states depend on: the model's tensors and `config` (its settings, as text),
        the history, the blocks, and the arithmetic (torch version, CPU kernels, threads): a
        file with another digest is not loaded. Each array enters with its dtype and shape."""
        sha = hashlib.sha256(FORMAT.encode())

        def add(kind: str, raw: np.ndarray) -> None:
            sha.update(f"|{kind}|{raw.nbytes}|".encode())
            sha.update(raw.data)

        for t in weights:
            add(f"{t.dtype}{tuple(t.shape)}", t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
        h = self.history
        for a in (h.items, h.offsets, h.user_first, h.user_end, self.uids, *self.blocks):
            a = np.ascontiguousarray(a)
            add(f"{a.dtype}{a.shape}", a.reshape(-1).view(np.uint8))
        sha.update(json.dumps([config, torch.__version__, torch.backends.cpu.get_cpu_capability(),
                               torch.get_num_threads()]).encode())
        return sha.hexdigest()

    def save(self, path: str | Path, key: str) -> None:
        """Write the tables (once every block is warm) atomically, with `key` (`digest`)."""
        from safetensors.torch import save_file

        assert self.ready, "save after the warm-up"
        tables = {k: v.cpu().contiguous() for k, v in self.tables.items()}
        meta = {"format": FORMAT, "key": key, "sha256": _tables_sha(tables)}
        atomic_file(path, lambda tmp: save_file(tables, str(tmp), metadata=meta))

    def load(self, path: str | Path, key: str) -> bool:
        """Take the tables from `path` if they were saved with `key`; False (and nothing changed)
        when it is missing, unreadable or of other weights, data or arithmetic."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("key") != key:
                    log.warning("%s: saved for other weights, data, settings or --threads; encoding afresh", path)
                    return False
                tables = {k: f.get_tensor(k) for k in f.keys() if k in TABLES}  # noqa: SIM118
            if meta.get("sha256") != _tables_sha(tables):
                raise ValueError("its tables do not match their checksum")
        except Exception as exc:  # a damaged file is derived data: encode afresh
            log.warning("%s: unreadable (%s); encoding afresh", path, exc)
            return False
        # the tables this model makes, and their widths (from its smallest block)
        widths = {k: v.shape[1] for k, v in self.encode_block(0).items()} if self.blocks else {}
        if set(tables) != set(widths) or any(t.dim() != 2 or t.shape != (len(self.block_of), widths[k])
                                             or t.dtype != torch.float32 for k, t in tables.items()):
            log.warning("%s: tables of another shape; encoding afresh", path)
            return False
        self.tables = {k: t.to(self.device) for k, t in tables.items()}
        self.done[:] = True
        self.warm_users = self.total
        return True


def _tables_sha(tables: dict[str, Tensor]) -> str:
    """sha256 over the tables' names and bytes (in name order): what `load` checks."""
    sha = hashlib.sha256()
    for name in sorted(tables):
        t = tables[name].detach().cpu().contiguous()
        sha.update(f"|{name}{tuple(t.shape)}|".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return sha.hexdigest()
