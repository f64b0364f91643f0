"""The paper's protocol end to end (`hnvm benchmark --protocol paper`): its models, its
training of the GRU models, and the data splits its tables need (docs/design.md, "Data
preparation"; Xiao, Liang & Meng, WWW 2019, §4.2-4.3 and §5.4)."""

from __future__ import annotations

from pathlib import Path

from hnvm.data.store import Dataset
from hnvm.errors import HnvmError

PROTOCOLS = ("ours", "paper")
# --protocol paper: the paper's §4.3 models (Table 2) and its training of the GRU models (BPR,
# Adagrad with momentum; hnvm/paper_configs/MODEL.toml, used where OUT/tuned has no config)
PAPER_MODELS = ("pop", "itemknn", "bprmf", "ncf", "gru4rec", "hrnn", "caser", "stamp", "hnvm")


def paper_configs() -> Path:
    """The directory of the paper-protocol configs shipped with the package."""
    from importlib import resources

    return Path(str(resources.files("hnvm") / "paper_configs"))


def check_paper_protocol(ds: Dataset, task: str, dataset: Path) -> None:
    """Refuse data not prepared the paper's way for `task` (§4.2: next item = leave-one-out
    for RSC, shan for IJC; §5.4: next session = user-last)."""
    split = (ds.meta.get("prepare") or {}).get("split")
    if task == "next-item" and not ds.held_out_items:
        raise HnvmError(f"{dataset}: --protocol paper: the paper's next-item protocol holds out each user's "
                        f"last item (this data set is split {split or 'by whole sessions'}); prepare it with "
                        "--split leave-one-out (RSC) or --split shan (IJC)")
    if task == "next-session" and split != "user-last":
        raise HnvmError(f"{dataset}: --protocol paper: the paper's next-session protocol (§5.4) is user-last "
                        f"(this data set is split {split}); prepare it with --split user-last")
