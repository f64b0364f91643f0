"""A ranking process for the engine (`Engine.start_rank_process`, which `hnvm serve` uses):
`LinearRanker.rank` on another core.

Why a process: the service's event loop spends its CPU in Python (HTTP, validation, per-user
model steps) and ranking a large catalogue spends it in the scoring product. A thread would
share the GIL with the loop and hand it back and forth dozens of times per pass; a process
runs the whole ranking in parallel with the loop. Only HNVM's hidden states ([B, H] floats)
cross over, and the top-k (ids, scores) come back.

The protocol is little-endian binary frames on the child's stdin/stdout (no pickle):

    request   u32 rows, u32 hidden, u32 k, u32 n_exclude | f32 hidden[rows*hidden]
              | u32 exclude_counts[rows] | i64 exclude_ids[n_exclude]
    response  u32 rows, u32 k | i64 ids[rows*k] (-1: no item) | f32 scores[rows*k]

The weights go to the child once, as a safetensors file it reads at start and the parent
deletes once the child is ready. The child computes with the same code and weights as the
parent would, so results are identical; if the child dies, the parent ranks in-process.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from hnvm.online.ranking import LinearRanker

log = logging.getLogger(__name__)

_REQ = struct.Struct("<IIII")
_RESP = struct.Struct("<II")
_READY = b"hnvm-rank-ready\n"


def encode_request(hidden: Tensor, k: int, exclude: Sequence[Sequence[int]]) -> bytes:
    rows, width = hidden.shape
    counts = np.fromiter((len(e) for e in exclude), dtype=np.uint32, count=rows)
    ids = np.fromiter((i for e in exclude for i in e), dtype=np.int64, count=int(counts.sum()))
    return b"".join([_REQ.pack(rows, width, k, len(ids)), hidden.numpy().astype(np.float32, copy=False).tobytes(),
                     counts.tobytes(), ids.tobytes()])


def _read(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"ranking process stream closed ({len(data)} of {n} bytes)")
    return data


def read_request(stream: BinaryIO) -> tuple[Tensor, int, list[list[int]]]:
    rows, width, k, n_ex = _REQ.unpack(_read(stream, _REQ.size))
    raw = bytearray(_read(stream, rows * width * 4))  # writable: torch warns on read-only buffers
    hidden = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(rows, width))
    counts = np.frombuffer(_read(stream, rows * 4), dtype=np.uint32)
    ids = np.frombuffer(_read(stream, n_ex * 8), dtype=np.int64).tolist()
    exclude, start = [], 0
    for c in counts.tolist():
        exclude.append(ids[start: start + c])
        start += c
    return hidden, k, exclude


def encode_response(ids: list[list[int]], vals: list[list[float]], k: int) -> bytes:
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_vals = np.zeros((len(ids), k), dtype=np.float32)
    for r, (i, v) in enumerate(zip(ids, vals, strict=True)):
        out_ids[r, : len(i)] = i
        out_vals[r, : len(v)] = v
    return _RESP.pack(len(ids), k) + out_ids.tobytes() + out_vals.tobytes()


def read_response(stream: BinaryIO) -> tuple[list[list[int]], list[list[float]]]:
    rows, k = _RESP.unpack(_read(stream, _RESP.size))
    ids = np.frombuffer(_read(stream, rows * k * 8), dtype=np.int64).reshape(rows, k)
    vals = np.frombuffer(_read(stream, rows * k * 4), dtype=np.float32).reshape(rows, k)
    out_ids, out_vals = [], []
    for i, v in zip(ids.tolist(), vals.tolist(), strict=True):
        n = i.index(-1) if -1 in i else k
        out_ids.append(i[:n])
        out_vals.append(v[:n])
    return out_ids, out_vals


class RankWorker:
    """The parent's handle: `rank` sends a pass to the child and waits for its answer (GIL
    released); one pass at a time. After a failure every pass is ranked in-process by
    `fallback`."""

    def __init__(self, fallback: LinearRanker) -> None:
        from safetensors.torch import save_file

        self.fallback = fallback
        self.alive = False
        self._lock = threading.Lock()
        fd, name = tempfile.mkstemp(prefix="hnvm-rank-", suffix=".safetensors")
        os.close(fd)
        weights = Path(name)
        try:
            save_file({"weight": fallback.w_t.t().contiguous(), "bias": fallback.bias.contiguous()}, str(weights))
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hnvm.online.worker", str(weights), fallback.scoring],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if line != _READY:
                self.proc.kill()
                raise RuntimeError(f"ranking process did not start (said {line[:200]!r})")
            self.alive = True
        finally:
            weights.unlink(missing_ok=True)

    def rank(self, hidden: Tensor, k: int, exclude: Sequence[Sequence[int]]
             ) -> tuple[list[list[int]], list[list[float]]]:
        frame = encode_request(hidden, k, exclude)
        with self._lock:
            if self.alive:
                try:
                    assert self.proc.stdin is not None and self.proc.stdout is not None
                    self.proc.stdin.write(frame)
                    self.proc.stdin.flush()
                    return read_response(self.proc.stdout)
                except (OSError, EOFError, ValueError) as exc:
                    self._died(exc)
        return self.fallback.rank(hidden, k, exclude)

    def _died(self, exc: BaseException) -> None:
        if self.alive:
            self.alive = False
            log.error("ranking process failed (%s); ranking in-process from now on", exc)

    def close(self) -> None:
        with self._lock:
            self.alive = False
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str]) -> int:
    """The child: load the weights, say ready, rank frames until stdin closes."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    weights, scoring = argv
    t = load_file(weights)
    ranker = LinearRanker(t["weight"], t["bias"], bf16=scoring == "bf16")
    # frames get the pipe to themselves: anything printed (Python or native) goes to stderr
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stdout.write(_READY)
    stdout.flush()
    with torch.no_grad():
        while True:
            try:
                hidden, k, exclude = read_request(stdin)
            except EOFError:
                return 0
            ids, vals = ranker.rank(hidden, k, exclude)
            stdout.write(encode_response(ids, vals, k))
            stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
