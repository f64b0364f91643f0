"""What the project's compiled loops share (numba): `compiled`, numba.njit with its on-disk
cache, and `fma`, the fused multiply-add that torch's vectorised CPU kernels compute.

Importing this module imports numba (about 0.4 s): the modules with compiled loops
(hnvm.models.knn_kernels, hnvm.training.sparse_kernels) are imported where a loop is first
needed, not with the package. No loop uses fastmath: every product and sum is rounded as
IEEE arithmetic rounds it, once each, unless `fma` says otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import torch
from numba import types
from numba.extending import intrinsic

# torch's CPU kernels whose roundings the compiled loops are checked against: its AVX2 and AVX512
# kernels round addcmul_ and add(alpha=) once (a fused multiply-add, `fma` below); its default
# (scalar) kernels, e.g. ATEN_CPU_CAPABILITY=default or a CPU without AVX2, round twice, and
# other architectures are not checked. Elsewhere the callers take torch's own operations.
CHECKED_CPU_KERNELS = ("AVX2", "AVX512")


def torch_kernels_checked() -> bool:
    """Are torch's CPU kernels here the ones the compiled loops reproduce (`CHECKED_CPU_KERNELS`)?"""
    return torch.backends.cpu.get_cpu_capability() in CHECKED_CPU_KERNELS


def compiled(fn: Callable[..., Any], parallel: bool = False) -> Any:
    """numba.njit(nogil), with numba's on-disk cache where it finds a writable place for it."""
    try:
        return numba.njit(nogil=True, parallel=parallel, cache=True)(fn)
    except RuntimeError:  # ("no locator available"): compile in each process instead
        return numba.njit(nogil=True, parallel=parallel)(fn)


@intrinsic
def fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a · b + c rounded once (LLVM's fma), for float32 a, b, c: what torch's AVX2 and AVX512
    CPU kernels compute for `addcmul_(t1, t2)` (t1 · t2 + self) and `add(other, alpha=x)`
    (other · x + self), which numba's separate multiply and add (two roundings) do not
    reproduce."""
    if not all(isinstance(x, types.Float) and x.bitwidth == 32 for x in (a, b, c)):
        return None  # numba then reports that no fma takes these types

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen
