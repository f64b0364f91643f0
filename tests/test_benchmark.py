"""hnvm benchmark: report functions on hand-made inputs, end to end on tiny data, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from cli_checks import refused, snapshot
from typer.testing import CliRunner

from hnvm import report
from hnvm.benchmark import run_benchmark
from hnvm.cli import app
from hnvm.data.samples import synthetic_dataset
from hnvm.errors import HnvmError

TINY_HNVM = ("[model]\nhidden = 16\nemb_dim = 16\nmlp_hidden = 16\nd_e = 8\nd_z = 8\n"
             "n_negatives = 16\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench") / "data"
    synthetic_dataset(n_users=60, n_items=40, n_topics=4, seed=5).save(d)
    return d


def _out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "tuned").mkdir(parents=True)
    (out / "tuned" / "hnvm.toml").write_text(TINY_HNVM)
    return out


# ---- report: pure functions -------------------------------------------------------------

def _res(**rows: tuple[float, float, float]) -> dict:
    return {n: {"metrics": {"recall@5": r, "mrr@5": m, "precision@5": p}, "untuned": n == "b"}
            for n, (r, m, p) in rows.items()}


def test_paper_table_layout_and_improvement() -> None:
    res = _res(a=(0.10, 0.05, 0.02), b=(0.20, 0.04, 0.03), hnvm=(0.25, 0.06, 0.03),
               **{"hnvm-no-z": (0.9, 0.9, 0.9)})  # an ablation is never the best baseline
    md = report.paper_table(res, "next-item").splitlines()
    assert md[0] == "| model | Recall@5 | MRR@5 | Pre@5 |"
    assert md[3] == "| b† | 0.2000 | 0.0400 | 0.0300 |"  # untuned rows carry a dagger
    # best baseline per column: recall b .20, mrr a .05, pre b .03
    assert md[-1] == "| Improv. | +25.0% | +20.0% | +0.0% |"
    assert report.cutoff_table(res).splitlines()[0].startswith("| model | Recall@10 | MRR@10 | Pre@10 | Recall@20")


def test_paired_test_known_cases() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(40)
    t = report.paired_test(b + 0.1 + rng.random(40) * 0.01, b)  # a always better
    assert t.n == 40 and t.p < 1e-6 and t.t_p < 1e-6 and t.mean_diff == pytest.approx(0.105, abs=0.01)
    assert t.statistic == 0.0  # no negative differences: W- = 0
    same = report.paired_test(b, b)
    assert same.p == 1.0 and same.t_p == 1.0 and same.mean_diff == 0.0
    assert math.isnan(report.paired_test([1.0], [0.0]).p)
    with pytest.raises(ValueError):
        report.paired_test([1.0, 2.0], [1.0])


def _ranks_frame() -> pl.DataFrame:
    # session 0: 6 events (targets at 0-based pos 1..5), ranks chosen per group;
    # session 1: 3 events (too short for the position breakdown)
    return pl.DataFrame({
        "user": [0, 0, 0, 0, 0, 1, 1],
        "session": [0, 0, 0, 0, 0, 1, 1],
        "position": [1, 2, 3, 4, 5, 1, 2],
        "item": [1, 2, 3, 4, 5, 6, 7],
        "rank": [1, 2, 100, 4, 1, 1, 1],
    })


def test_position_breakdown() -> None:
    pb = report.position_breakdown(_ranks_frame(), k=5, session_len={0: 6, 1: 3})
    got = {g: (n, r, m) for g, n, r, m in pb.select("group", "n", "recall@5", "mrr@5").iter_rows()}
    assert list(pb["group"]) == ["Begin", "Middle", "End"]
    assert got["Begin"] == (1, 1.0, 1.0)  # pos 1 only (pos 0 is never a next-item target)
    assert got["Middle"] == (2, 0.5, pytest.approx(0.25))  # ranks 2 and 100
    assert got["End"] == (2, 1.0, pytest.approx((0.25 + 1.0) / 2))  # ranks 4 and 1
    with pytest.raises(ValueError):
        report.position_breakdown(_ranks_frame())  # no session lengths anywhere


def test_history_breakdown() -> None:
    hb = report.history_breakdown(_ranks_frame(), {0: 6, 1: 7}, k=5)
    got = {g: (n, r, m) for g, n, r, m in hb.select("group", "n", "recall@5", "mrr@5").iter_rows()}
    assert got["Short"] == (5, 0.8, pytest.approx((1 + 0.5 + 0 + 0.25 + 1) / 5))  # 6 <= 6
    assert got["Long"] == (2, 1.0, 1.0)


# ---- end to end ---------------------------------------------------------------------------

def test_benchmark_cli_end_to_end(data: Path, tmp_path: Path) -> None:
    out = _out(tmp_path)
    r = CliRunner().invoke(app, ["benchmark", str(data), "--models", "pop,ptopfreq,itemknn,hnvm",
                                 "--task", "next-item", "--out", str(out), "--set", "train.epochs=1"])
    assert r.exit_code == 0, r.output
    md = (out / "table.md").read_text()
    assert "| model | Recall@5 | MRR@5 | Pre@5 |" in md and "| Improv. |" in md
    for row in ("| pop |", "| ptopfreq |", "| itemknn† |", "| hnvm |"):  # hnvm tuned: no dagger
        assert row in md
    assert (out / "position.png").stat().st_size > 1000 and (out / "history.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"pop", "ptopfreq", "itemknn", "hnvm"}
    assert res["models"]["hnvm"]["config"].endswith("hnvm.toml")
    sig = json.loads((out / "significance.json").read_text())
    best = max(("pop", "ptopfreq", "itemknn"), key=lambda n: res["models"][n]["metrics"]["mrr@5"])
    assert sig["baseline"] == best and sig["n"] == res["models"]["hnvm"]["n_targets"]
    # the stored ranks reproduce the reported metric
    ranks = pl.read_parquet(out / "ranks" / "pop.parquet")
    mrr = float(np.where(ranks["rank"] <= 5, 1.0 / ranks["rank"], 0.0).mean())
    assert mrr == pytest.approx(res["models"]["pop"]["metrics"]["mrr@5"])
    assert {"session_len", "n_history"} <= set(ranks.columns)
    assert len(pl.read_csv(out / "results.csv")) == 4


def test_benchmark_resumes(data: Path, tmp_path: Path) -> None:
    out = _out(tmp_path)  # hnvm-no-e falls back to tuned/hnvm.toml (tiny)
    steps: list[str] = []
    run_benchmark(data, ["pop", "ptopfreq"], "next-session", out, ["train.epochs=1"])
    mtimes = {n: (out / "runs" / n / "model" / "model.json").stat().st_mtime_ns for n in ("pop", "ptopfreq")}
    res = run_benchmark(data, ["pop", "ptopfreq", "hnvm-no-e"], "next-session", out,
                        ["train.epochs=1"],
                        on_step=steps.append)
    assert sum("training" in s for s in steps) == 1 and "training hnvm-no-e" in steps[-2]
    for n, t in mtimes.items():
        assert (out / "runs" / n / "model" / "model.json").stat().st_mtime_ns == t
    assert set(res["models"]) == {"pop", "ptopfreq", "hnvm-no-e"}
    cfg = json.loads((out / "runs" / "hnvm-no-e" / "config.json").read_text())
    assert cfg["model"] == "hnvm" and cfg["model_config"]["use_e"] is False
    # per-user paired values match the reported next-session metrics
    ranks = pl.read_parquet(out / "ranks" / "ptopfreq.parquet")
    assert ranks["recall@5"].mean() == pytest.approx(res["models"]["ptopfreq"]["metrics"]["recall@5"])
    assert not (out / "position.png").exists()  # figures are next-item only


def test_task_both_trains_each_task_on_its_own_validation(data: Path, tmp_path: Path) -> None:
    out = _out(tmp_path)
    r = CliRunner().invoke(app, ["benchmark", str(data), "--models", "pop,bprmf,hnvm", "--task", "both",
                                 "--out", str(out), "--set", "train.epochs=1"])
    assert r.exit_code == 0, r.output
    for task in ("next-item", "next-session"):
        res = json.loads((out / task / "results.json").read_text())
        assert set(res["models"]) == {"pop", "bprmf", "hnvm"} and res["task"] == task
        assert res["models"]["hnvm"]["config"].endswith("hnvm.toml")  # OUT/tuned is shared
        assert (out / task / "table.md").exists()
    assert (out / "next-item" / "position.png").exists() and not (out / "next-session" / "position.png").exists()
    # one run per model and task, each early-stopped on its task's validation
    for runs, task in (("runs", "next-item"), ("runs-next-session", "next-session")):
        assert sorted(p.name for p in (out / runs).iterdir()) == ["bprmf", "hnvm", "pop"]
        cfg = json.loads((out / runs / "hnvm" / "config.json").read_text())
        assert cfg["train"]["validate"] == task
        log = [json.loads(line) for line in (out / runs / "hnvm" / "train_log.jsonl").read_text().splitlines()]
        valid = next(r["valid"] for r in log if "valid" in r)
        assert ("phr@5" in valid) == (task == "next-session")  # the next-session metrics


def test_tuned_config_of_the_task_comes_first(data: Path, tmp_path: Path) -> None:
    out = _out(tmp_path)
    (out / "tuned" / "next-session").mkdir(parents=True)
    (out / "tuned" / "next-session" / "bprmf.toml").write_text("[model]\ndim = 6\n")
    (out / "tuned" / "bprmf.toml").write_text("[model]\ndim = 5\n")
    for task, dim in (("next-item", 5), ("next-session", 6)):
        run_benchmark(data, ["bprmf"], task, out / task, ["train.epochs=1"], tuned_dir=out / "tuned")
        assert json.loads((out / task / "runs" / "bprmf" / "config.json").read_text())["model_config"]["dim"] == dim


def test_changed_settings_retrain_a_shared_run(data: Path, tmp_path: Path) -> None:
    out, steps = _out(tmp_path), []
    run_benchmark(data, ["bprmf"], "next-session", out / "a", ["train.epochs=1"], runs_dir=out / "runs")
    run_benchmark(data, ["bprmf"], "next-session", out / "b", ["train.epochs=1"], runs_dir=out / "runs",
                  on_step=steps.append)
    assert any("reusing" in s for s in steps)
    steps.clear()
    run_benchmark(data, ["bprmf"], "next-session", out / "c", ["train.epochs=1"], runs_dir=out / "runs",
                  model_overrides={"bprmf": ["model.dim=8"]}, on_step=steps.append)
    assert any("training bprmf" in s for s in steps) and not any("reusing" in s for s in steps)
    cfg = json.loads((out / "runs" / "bprmf" / "config.json").read_text())
    assert cfg["model_config"]["dim"] == 8
    steps.clear()  # the next-item task validates on next item: another run
    run_benchmark(data, ["bprmf"], "next-item", out / "d", ["train.epochs=1", "model.dim=8"], runs_dir=out / "runs",
                  on_step=steps.append)
    assert any("training bprmf" in s for s in steps)


def test_benchmark_rejects_bad_task(data: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["benchmark", str(data), "--models", "pop", "--task", "next-basket",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--task must be one of" in r.output


def test_parse_models_expands_all_inside_a_list() -> None:
    from hnvm.benchmark import all_models, parse_models

    assert parse_models("all") == all_models()
    assert parse_models("all,hnvm-no-e,hnvm") == [*all_models(), "hnvm-no-e"]  # duplicates dropped, order kept
    assert parse_models(" pop , hnvm-no-z ") == ["pop", "hnvm-no-z"]
    with pytest.raises(HnvmError, match="unknown model"):
        parse_models("all,nope")


# ---- next-session: one tie rule, reproducible export, small catalogues (issue #12, 3 and 7) ----

def _session_metrics_from_export(ranks: pl.DataFrame, k: int) -> dict[str, np.ndarray]:
    """Per-user next-session metrics by their definitions, from the exported conservative
    per-target ranks (a hit at k: rank <= k)."""
    out: dict[str, list[float]] = {n: [] for n in ("recall", "precision", "mrr", "ndcg", "phr")}
    for rk in ranks["target_ranks"].to_list():
        hits = [r for r in rk if r <= k]
        idcg = sum(1 / math.log2(i + 2) for i in range(min(len(rk), k)))
        out["recall"].append(len(hits) / len(rk))
        out["precision"].append(len(hits) / k)
        out["mrr"].append(1 / min(rk) if min(rk) <= k else 0.0)
        out["ndcg"].append(sum(1 / math.log2(r + 1) for r in hits) / idcg)
        out["phr"].append(1.0 if hits else 0.0)
    return {f"{n}@{k}": np.asarray(v) for n, v in out.items()}


def test_benchmark_next_session_export_reproduces_every_number(data: Path, tmp_path: Path) -> None:
    """OUT/ranks/MODEL.parquet holds each target's conservative rank: every reported metric
    (all k, all names) and the per-user values of the paired test come from it exactly."""
    out = _out(tmp_path)
    res = run_benchmark(data, ["pop", "itemknn", "hnvm"], "next-session", out, ["train.epochs=1"])
    for name, r in res["models"].items():
        ranks = pl.read_parquet(out / "ranks" / f"{name}.parquet")
        assert {"targets", "target_ranks", "n_targets", "first_hit_rank", "topk"} <= set(ranks.columns)
        breakdown = {f"{n}@{k}" for n in ("recall_repeat", "recall_explore", "repeat_share") for k in (5, 10, 20)}
        assert set(r["metrics"]) - breakdown == {f"{n}@{k}" for n in ("recall", "precision", "mrr", "ndcg", "phr")
                                                 for k in (5, 10, 20)}
        assert set(r["metrics"]) & breakdown == set(repeat_explore_from_export(ranks))
        for k in (5, 10, 20):
            per_user = _session_metrics_from_export(ranks, k)
            for metric, vals in per_user.items():
                assert abs(float(vals.mean()) - r["metrics"][metric]) <= 1e-12, (name, metric)
                assert np.allclose(ranks[metric].to_numpy(), vals, rtol=0, atol=1e-12), (name, metric)
    # the paired test uses the same per-user values
    sig = res["significance"]
    a = _session_metrics_from_export(pl.read_parquet(out / "ranks" / "hnvm.parquet"), 5)["mrr@5"]
    b = _session_metrics_from_export(pl.read_parquet(out / "ranks" / f"{sig['baseline']}.parquet"), 5)["mrr@5"]
    assert sig["n"] == len(a) and sig["mean_diff"] == pytest.approx(float((a - b).mean()), abs=1e-12)
    # and each headline column: hnvm against that column's best baseline, from the same export
    assert [c["metric"] for c in sig["columns"]] == ["recall@10", "ndcg@10", "phr@10", "mrr@5"]
    for c in sig["columns"]:
        k = int(c["metric"].split("@")[1])
        a = _session_metrics_from_export(pl.read_parquet(out / "ranks" / "hnvm.parquet"), k)[c["metric"]]
        b = _session_metrics_from_export(pl.read_parquet(out / "ranks" / f"{c['baseline']}.parquet"), k)[c["metric"]]
        assert c["value"] == pytest.approx(float(a.mean())) and c["baseline_value"] == pytest.approx(float(b.mean()))
        assert c["mean_diff"] == pytest.approx(float((a - b).mean()), abs=1e-12)
    md = (out / "table.md").read_text()
    assert "### Next-basket metrics" in md and "Rec-rep@10" in md and "| phr@10 |" in md


def test_unit_values_use_conservative_target_ranks() -> None:
    # user 1's two targets tie at the top (each ranks 2): MRR@5 = 1/2, never 1
    ranks = pl.DataFrame({"user": [0, 1], "target_ranks": [[1, 7], [2, 2]], "mrr@5": [9.0, 9.0]})
    assert report.unit_values(ranks, "next-session", "mrr@5")["value"].to_list() == [1.0, 0.5]
    assert report.unit_values(ranks, "next-session", "recall@1")["value"].to_list() == [0.5, 0.0]
    with pytest.raises(ValueError, match="unknown"):
        report.unit_values(ranks, "next-session", "auc@5")


def test_benchmark_both_on_a_catalogue_smaller_than_k(tmp_path: Path) -> None:
    """4 items, k = 5/10/20: `--task both` completes both tasks (no `k must be in [1, 1]`)."""
    from hnvm.benchmark import run_benchmarks

    rows, t = ["user,item,ts"], 1_600_000_000
    for u in range(6):
        for s in range(4):
            for j in range(3):
                rows.append(f"u{u},{'abcd'[(u + s + j) % 4]},{t}")
                t += 10
            t += 7200
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    data = tmp_path / "data"
    r = CliRunner().invoke(app, ["prepare", str(tmp_path / "log.csv"), "--out", str(data), "--columns",
                                 "user=user,item=item,time=ts", "--min-item-support", "1"])
    assert r.exit_code == 0, r.output
    out = _out(tmp_path)
    res = run_benchmarks(data, ["pop", "itemknn", "hnvm"], "both", out, ["train.epochs=1"])
    for task in ("next-item", "next-session"):
        assert set(res[task]["models"]) == {"pop", "itemknn", "hnvm"}
        assert (out / task / "table.md").exists() and (out / task / "significance.json").exists()
        for r_ in res[task]["models"].values():
            assert r_["metrics"]["recall@20"] == 1.0  # the whole catalogue is the top 20
    ranks = pl.read_parquet(out / "next-session" / "ranks" / "pop.parquet")
    assert all(len(row) == 20 and not any(row[4:]) for row in ranks["topk"].to_list())
    # and through the command line
    r = CliRunner().invoke(app, ["benchmark", str(data), "--models", "pop,ptopfreq", "--task", "both",
                                 "--out", str(tmp_path / "cli"), "--set", "train.epochs=1"])
    assert r.exit_code == 0 and r.exception is None, r.output


def test_benchmark_refuses_an_out_that_is_a_file_a_dataset_a_run_or_holds_the_data(data: Path, tmp_path: Path) -> None:
    from hnvm.runs import train_run

    run = tmp_path / "run"
    train_run(data, "pop", run)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    holder = tmp_path / "holder"
    synthetic_dataset(n_users=20, n_items=15, n_topics=2, seed=1).save(holder / "data")
    cases = [(data, notes, "is a file"), (data, data, "own input"), (data, run, "is a run directory"),
             (data, run / "bench", "inside the run directory"), (data, data / "bench", "inside the dataset"),
             (holder / "data", holder, "own input")]
    for ds, out, why in cases:
        for task in ("next-item", "both"):
            before = {**snapshot(data), **snapshot(run), **snapshot(notes), **snapshot(holder)}
            refused(["benchmark", str(ds), "--models", "pop", "--task", task, "--out", str(out),
                               "--set", "train.epochs=1"], "--out", why)
            assert {**snapshot(data), **snapshot(run), **snapshot(notes), **snapshot(holder)} == before


def test_benchmark_refuses_a_results_file_with_damaged_fields(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_benchmark(data, ["pop"], "next-item", out, ["train.epochs=1"])
    good = json.loads((out / "results.json").read_text())

    def damage(res: dict, how: str) -> None:
        if how == "metrics-not-object":
            res["models"]["pop"]["metrics"] = "x"
        elif how == "metric-not-number":
            res["models"]["pop"]["metrics"]["mrr@5"] = "x"
        elif how == "entry-not-object":
            res["models"]["pop"] = 7
        elif how == "missing-field":
            del res["models"]["pop"]["n_targets"]
        elif how == "bool-count":
            res["models"]["pop"]["n_targets"] = True
        elif how == "resolved-not-object":
            res["models"]["pop"]["resolved"] = [1]

    for how in ("metrics-not-object", "metric-not-number", "entry-not-object", "missing-field", "bool-count",
                "resolved-not-object"):
        res = json.loads(json.dumps(good))
        damage(res, how)
        (out / "results.json").write_text(json.dumps(res))
        before = snapshot(out)
        refused(["benchmark", str(data), "--models", "pop", "--out", str(out), "--set", "train.epochs=1"],
                          "damaged results file", "models.pop", "move it away")
        assert snapshot(out) == before, how
        with pytest.raises(HnvmError, match="damaged results file"):
            run_benchmark(data, ["pop"], "next-item", out, ["train.epochs=1"])


def test_task_both_checks_both_results_files_before_any_training(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "next-session").mkdir(parents=True)
    for bad in ("{", json.dumps({"dataset": str(data.resolve()), "task": "next-session", "models": {"pop": 7}}),
                json.dumps({"dataset": "/elsewhere", "task": "next-session", "models": {}})):
        (out / "next-session" / "results.json").write_text(bad)
        before = snapshot(out)
        refused(["benchmark", str(data), "--models", "pop", "--task", "both", "--out", str(out),
                           "--set", "train.epochs=1"], "next-session")
        assert snapshot(out) == before  # no OUT/runs, no OUT/next-item
    # a file where a task's folder goes: refused before training too
    (out / "next-session" / "results.json").unlink()
    (out / "next-session").rmdir()
    (out / "next-session").write_text("x")
    before = snapshot(out)
    refused(["benchmark", str(data), "--models", "pop", "--task", "both", "--out", str(out)],
                      "is a file")
    assert snapshot(out) == before


def test_benchmark_never_overwrites_report_files_it_did_not_write(data: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "results.csv").write_text("important\n")
    (mine / "table.md").write_text("notes\n")
    before = snapshot(mine)
    refused(["benchmark", str(data), "--models", "pop", "--task", "next-item", "--out", str(mine)],
                      "results.csv", "not a benchmark")
    assert snapshot(mine) == before


def repeat_explore_from_export(ranks: pl.DataFrame) -> dict[str, float]:
    """The repeat/explore breakdown recomputed from an export's target_ranks and target_repeat."""
    import torch

    from hnvm.basket_metrics import repeat_explore_metrics, repeat_share
    from hnvm.metrics import pad_item_sets

    r = pad_item_sets([torch.tensor(x) for x in ranks["target_ranks"].to_list()])
    rep = pad_item_sets([torch.tensor(x, dtype=torch.long) for x in ranks["target_repeat"].to_list()]).bool()
    shown = torch.tensor(ranks["topk"].to_list())
    return {**repeat_explore_metrics(r, rep), **repeat_share(shown, torch.tensor(ranks["topk_repeat"].to_list()))}
