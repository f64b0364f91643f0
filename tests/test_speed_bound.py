"""benchmarks/speed.py's bound on evaluation: the FLOPs it counts for a model's history encoding
are the ones the model computes when nothing is padded, and fewer when something is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hnvm.contract import Batch
from hnvm.data.samples import synthetic_dataset
from hnvm.models.hnvm import HNVM
from hnvm.models.hrnn import HRNN
from hnvm.training import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed


def _counted(model: object, batch: Batch) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        speed.history_only(model)(batch)
    return fc.get_total_flops() / batch.n_targets


@pytest.mark.parametrize("model", [HNVM(hidden=16, emb_dim=12, mlp_hidden=16, d_e=8, d_z=8, n_negatives=8),
                                   HRNN(emb_dim=12, session_hidden=16, user_hidden=10)], ids=["hnvm", "hrnn"])
def test_history_flops_are_what_the_model_computes_without_padding(model: object) -> None:
    model.fit(synthetic_dataset(n_users=30, n_items=40, n_topics=4, seed=5),  # type: ignore[attr-defined]
              train_cfg=TrainConfig(epochs=1))
    g = torch.Generator().manual_seed(0)
    full = torch.randint(1, 20, (3, 4, 5), generator=g)  # 3 history sessions of 5 items + the current one
    rows = dict(users=torch.tensor([1, 2, 3]), target_rows=torch.tensor([0, 0, 2]), target_pos=torch.tensor([1, 2, 1]))
    flops, hidden = speed.history_flops(model, [Batch(sessions=full, **rows)])
    assert hidden == 16
    assert flops == pytest.approx(_counted(model, Batch(sessions=full, **rows)), rel=1e-12)
    padded = full.clone()
    padded[0, :2] = 0  # row 0 has one history session
    padded[1, 2, 3:] = 0  # a shorter session
    fewest, _ = speed.history_flops(model, [Batch(sessions=padded, **rows)])
    assert fewest < flops and fewest < _counted(model, Batch(sessions=padded, **rows))
