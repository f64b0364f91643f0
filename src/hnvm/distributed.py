"""Beyond one process: torchrun's environment, the process group, the device, and the few
collectives that training and evaluation need.

`torchrun --nproc_per_node N -m hnvm train ...` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment. The first call to
`context()` joins the process group (gloo for CPU tensors, NCCL for CUDA ones); a plain
`hnvm train` (WORLD_SIZE unset or 1) never touches torch.distributed, so one process behaves
exactly as before. Every helper here is a no-op in a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hnvm.errors import HnvmError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among world_size processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs, metrics and the final model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sparse_grads_ok(self) -> bool:
        """Sparse gradients only in one process. NCCL cannot all-reduce sparse tensors; gloo can,
        but its sparse all-reduce under DDP crashed a 2-process CPU run now and then (heap
        corruption, SIGABRT, about 1 run in 3 on a loaded machine), so several processes all-reduce
        dense gradients, DDP's well-trodden path."""
        return not self.distributed

    # ---- collectives (no-ops in one process) -------------------------------------------------

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """For each flag: is it true on any rank? One small all-reduce for all of them."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather_rows(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Concatenate CPU tensors along dim 0 over ranks, in rank order. Each rank may hold a
        different number of rows; each tensor of the list is gathered separately (tensors as
        wire format: no pickle, unlike all_gather_object)."""
        if not self.distributed:
            return list(tensors)
        out = []
        for t in tensors:
            t = t.detach().cpu().contiguous()
            n = torch.tensor([t.shape[0]], dtype=torch.long)
            sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
            dist.all_gather(sizes, n)
            counts = [int(s) for s in sizes]
            padded = t.new_zeros((max(counts), *t.shape[1:]))
            padded[: t.shape[0]] = t
            parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            out.append(torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]))
        return out

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; every rank raises if it failed (the others would otherwise
        wait for rank 0 forever). Returns fn's result on rank 0, None elsewhere."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, after telling the other ranks
                error = exc
        (failed,) = self.any(error is not None)
        if error is not None:
            raise error
        if failed:
            raise HnvmError("rank 0 failed (its error message says why)")
        return result


_CTX: DistContext | None = None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA is an error."""
    if device not in DEVICES:
        raise HnvmError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise HnvmError("device 'cuda' requested but CUDA is not available (torch "
                            f"{torch.__version__}, built with CUDA {torch.version.cuda}); "
                            "use --device cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def context(device: str = "auto") -> DistContext:
    """This process's context. Under torchrun (WORLD_SIZE > 1) the first call joins the process
    group; later calls reuse it (the device is resolved on every call)."""
    global _CTX
    if _CTX is None:
        world = env_world_size()
        if world > 1 or (dist.is_available() and dist.is_initialized()):
            if not dist.is_initialized():
                # gloo carries CPU tensors (evaluation gathers, flags, CPU training); NCCL the
                # CUDA ones. NCCL communicators are created lazily, so a CPU run never needs it.
                backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
                dist.init_process_group(backend, timeout=datetime.timedelta(
                    seconds=int(os.environ.get("HNVM_DIST_TIMEOUT", "1800"))))
                log.info("joined process group: rank %d of %d (%s)", dist.get_rank(),
                         dist.get_world_size(), backend)
            _CTX = DistContext(dist.get_rank(), dist.get_world_size(),
                               int(os.environ.get("LOCAL_RANK", "0")))
        else:
            _CTX = DistContext()
    dev = resolve_device(device, _CTX.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistContext(_CTX.rank, _CTX.world_size, _CTX.local_rank, dev)


def current() -> DistContext:
    """The context without joining anything or choosing a device (CPU): what evaluation uses
    to know whether to shard."""
    if _CTX is not None:
        return _CTX
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def shutdown() -> None:
    """Leave the process group (torchrun warns about a group left open at exit)."""
    global _CTX
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = None


def shard_indices(n: int, rank: int, world_size: int) -> range | list[int]:
    """Indices of rank `rank` among `n` items (batches) so that every rank gets the same number,
    ceil(n / world_size): rank r takes r, r + world, ...; the last round wraps around to the
    start (as torch's DistributedSampler pads), so no rank runs out early and no item is lost.
    One process: range(n)."""
    if world_size <= 1:
        return range(n)
    if n == 0:
        return []
    per_rank = -(-n // world_size)
    return [(rank + k * world_size) % n for k in range(per_rank)]


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (tensor, tuple, list, dict or dataclass) to `device`.
    Batches are built on the CPU, so on the CPU this returns `obj` itself."""
    if device.type == "cpu":
        return obj
    return _move(obj, device)


def _move(obj: Any, device: torch.device) -> Any:
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple | list):
        return type(obj)(_move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _move(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj
