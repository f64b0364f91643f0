"""Hand-computed expectations for POP and P-TopFreq on a hand-made batch."""

from __future__ import annotations

import polars as pl
import torch

from hnvm.contract import Batch
from hnvm.data.store import Dataset
from hnvm.metrics import topk_items
from hnvm.models.pop import Pop
from hnvm.models.ptopfreq import PTopFreq


def tiny_dataset() -> Dataset:
    # train counts: item 1 x3, item 2 x1, item 3 x2, item 4 x0 (never in train), 5 items
    train = [(1, 0, 1), (1, 0, 3), (1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 3)]
    ev = pl.DataFrame(
        {"user": [u for u, _, _ in train], "session": [s for _, s, _ in train],
         "item": [i for _, _, i in train], "ts": list(range(len(train))), "pos": [0, 1, 0, 0, 1, 2],
         "split": ["train"] * len(train)},
        schema={"user": pl.Int32, "session": pl.Int32, "item": pl.Int32, "ts": pl.Int64,
                "pos": pl.Int32, "split": pl.Enum(["train", "valid", "test"])},
    )
    items = pl.DataFrame({"item": [1, 2, 3, 4, 5], "id": list("abcde"), "train_count": [3, 1, 2, 0, 0]},
                         schema={"item": pl.Int32, "id": pl.Utf8, "train_count": pl.Int64})
    users = pl.DataFrame({"user": [1, 2], "id": ["u1", "u2"]}, schema={"user": pl.Int32, "id": pl.Utf8})
    return Dataset(ev, items, users)


def batch() -> Batch:
    # user 1: history [[2, 2], [5]] then current session [4, 3, 1]; targets at positions 1 and 2
    sessions = torch.tensor([[[2, 2, 0], [5, 0, 0], [4, 3, 1]]])
    return Batch(torch.tensor([1]), sessions, torch.tensor([0, 0]), torch.tensor([1, 2]))


def test_pop_scores_are_train_counts() -> None:
    m = Pop().fit(tiny_dataset())
    s = m.score(batch())
    assert s.tolist() == [[0, 3, 1, 2, 0, 0]] * 2
    assert topk_items(s[:1], 3).tolist() == [[1, 3, 2]]


def test_ptopfreq_user_frequency_then_popularity() -> None:
    m = PTopFreq().fit(tiny_dataset())
    b = batch()
    pop = torch.tensor([0, 3, 1, 2, 0, 0]) / 4.0  # count / (max count + 1)
    # next session from history only: item 2 twice, item 5 once, the rest by popularity
    hist = torch.tensor([0, 0, 2, 0, 0, 1]) + pop
    assert torch.allclose(m.score_sessions(Batch(b.users, b.sessions[:, :2], b.target_rows, b.target_pos))[0], hist)
    assert topk_items(hist[None], 5).tolist() == [[2, 5, 1, 3, 4]]
    # next item: history plus the prefix before each target (position 1 sees [4]; 2 sees [4, 3])
    s = m.score(b)
    assert torch.allclose(s[0], hist + torch.tensor([0, 0, 0, 0, 1, 0]))
    assert torch.allclose(s[1], hist + torch.tensor([0, 0, 0, 1, 1, 0]))
    # without the current prefix only the history counts
    s2 = PTopFreq(include_current=False).fit(tiny_dataset()).score(b)
    assert torch.allclose(s2[1], hist)
