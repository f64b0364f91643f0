"""Progress of long commands (issue 12, item 16): under nohup or a pipe, `hnvm train`,
`benchmark` and `tune` write plain progress lines (model, epoch, loss, validation metric, time
elapsed) as they go, with no terminal control codes; the library itself never prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.samples import synthetic_dataset
from hnvm.runs import train_run

FAST = ["--set", "model.dim=8", "--set", "model.batch_size=256"]  # bprmf: a neural model in ~0.1 s/epoch
# "[0:00:03] bprmf epoch 2/2 done: loss 0.6895, valid mrr@5 0.1108 (best 0.1108, epoch 2), 0.0s (...)"
EPOCH = r"^\[\d+:\d\d:\d\d\] bprmf epoch {e}/2 done: loss \d+\.\d{{4}}, valid mrr@5 \d\.\d{{4}} \(best .*\d+\.\d+s"
CONTROL = ("\r", "\x1b[")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("progress") / "ds"
    synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5).save(path)
    return path


def _epoch_lines(stderr: str) -> None:
    for e in (1, 2):
        assert re.search(EPOCH.format(e=e), stderr, re.M), stderr
    assert not any(c in stderr for c in CONTROL), repr(stderr)


def test_train_with_stderr_to_a_pipe_prints_plain_lines(data: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    cmd = [sys.executable, "-m", "hnvm", "--progress-every", "0", "train", str(data), "--model", "bprmf",
           "--out", str(tmp_path / "run"), "--set", "train.epochs=2", *FAST]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    _epoch_lines(r.stderr)
    assert re.search(r"^\[\d+:\d\d:\d\d\] bprmf: training, epoch 1 of at most 2$", r.stderr, re.M)
    # --progress-every 0: a line after every step inside an epoch too
    assert re.search(r"^\[\d+:\d\d:\d\d\] bprmf epoch 1/2: [\d,]+ targets so far, loss \d+\.\d{4}", r.stderr, re.M)


def test_benchmark_under_a_pipe_prints_plain_lines(data: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["benchmark", str(data), "--models", "pop,bprmf", "--epochs", "2",
                                 "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    _epoch_lines(r.stderr)
    assert re.search(r"^\[\d+:\d\d:\d\d\] \[2/2\] training bprmf", r.stderr, re.M), r.stderr
    # the default --progress-every (30 s) leaves one line per epoch on epochs this short
    assert "targets so far" not in r.stderr


def test_tune_under_a_pipe_reports_trials_and_epochs(data: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["tune", str(data), "--model", "bprmf", "--trials", "2", "--out", str(tmp_path / "t"),
                                 "--set", "train.epochs=2", "--set", "model.dim=8", "--set", "model.batch_size=256"])
    assert r.exit_code == 0, r.output
    _epoch_lines(r.stderr)
    assert re.search(r"^\[\d+:\d\d:\d\d\] trial 1 \(2 of 2 to run\): ", r.stderr, re.M), r.stderr
    assert re.search(r"^\[\d+:\d\d:\d\d\] trial 1: (mrr@5 \d\.\d{5}|pruned).* in \d+\.\d+s; best ", r.stderr, re.M)
    assert "targets so far" not in r.stderr  # epochs shorter than --progress-every: one line each


def test_progress_off_prints_no_progress(data: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["--progress", "off", "train", str(data), "--model", "bprmf",
                                 "--out", str(tmp_path / "run"), "--set", "train.epochs=2", *FAST])
    assert r.exit_code == 0, r.output
    assert "epoch" not in r.stderr and "trained bprmf" in r.stderr
    r = CliRunner().invoke(app, ["--progress", "sometimes", "train", str(data), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--progress must be auto, live, plain or off" in r.stderr


def test_the_library_reports_to_a_callback_and_never_prints(data: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    from hnvm.training import Progress

    seen: list[Progress] = []
    train_run(data, "bprmf", tmp_path / "a", overrides=["train.epochs=2", "model.dim=8"], show_progress=True,
              on_progress=seen.append)
    train_run(data, "bprmf", tmp_path / "b", overrides=["train.epochs=1", "model.dim=8"], show_progress=True)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no bar, no line: showing progress is the caller's business
    kinds = [p.kind for p in seen]
    assert kinds[0] == "start" and kinds.count("epoch") == 2 and "step" in kinds
    last = seen[-1]
    assert (last.model, last.epoch, last.epochs, last.metric) == ("bprmf", 2, 2, "mrr@5")
    assert last.valid is not None and "mrr@5" in last.valid and last.losses["loss"] > 0 and last.fit_s > 0
    steps = [p for p in seen if p.kind == "step"]
    assert [p.step for p in steps] == list(range(1, len(steps) + 1))
    assert all(p.targets > 0 and "loss" in p.losses for p in steps)



def test_demo_under_a_pipe_prints_plain_lines(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hnvm.demo
    from hnvm.errors import HnvmError

    def short_demo(out: Path, on_step: Callable[[str], None], on_progress: Callable[[Any], None]) -> None:
        on_step("preparing the Instacart sample")  # the demo's calls, on a tiny data set
        train_run(data, "bprmf", out / "runs" / "bprmf", overrides=["train.epochs=2", "model.dim=8"],
                  on_progress=on_progress)
        raise HnvmError("stopped after one model")

    monkeypatch.setattr(hnvm.demo, "run_demo", short_demo)
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 2 and "stopped after one model" in r.stderr, r.output
    _epoch_lines(r.stderr)
    assert re.search(r"^\[\d+:\d\d:\d\d\] preparing the Instacart sample$", r.stderr, re.M), r.stderr
