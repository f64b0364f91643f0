from __future__ import annotations

from pathlib import Path

import pytest
import torch

# tests use small tensors: one thread is as fast and immune to a busy machine's oversubscription
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_test(request, monkeypatch):
    """`device = auto` means CUDA on a GPU machine; tests not marked `gpu` stay on the CPU so
    that their exact-equality checks hold everywhere."""
    if request.node.get_closest_marker("gpu") is None:
        from hnvm import distributed

        resolve = distributed.resolve_device
        monkeypatch.setattr(distributed, "resolve_device",
                            lambda device, local_rank=0: resolve("cpu" if device == "auto" else device, local_rank))
