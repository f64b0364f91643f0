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
