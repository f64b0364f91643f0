"""`hnvm benchmark`: train and evaluate several models on one dataset, paper-style report.

    OUT/tuned/{model}.toml    optional tuned config (or OUT/tuned/{model}/best.toml from
                              `hnvm tune --out OUT/tuned/{model}`); else defaults, marked untuned
    OUT/runs/{model}/         one run directory per model (a run trained with the identical
                              resolved config on the same data is reused, not retrained)
    OUT/ranks/{model}.parquet per-target (next-item) or per-user (next-session) ranks
    OUT/results.json          rewritten after each model: a re-run skips finished models
    OUT/results.csv, table.md, significance.json, position.png, history.png (next-item)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from hnvm import report
from hnvm.atomic import atomic_file, atomic_json, atomic_text
from hnvm.config import as_dict
from hnvm.data.batches import Sequences
from hnvm.data.splits import NO_SESSION_TASK
from hnvm.data.store import Dataset, check_output_dir
from hnvm.errors import HnvmError, one_line
from hnvm.metrics import DEFAULT_KS, pad_item_sets, per_user_session_rank_metrics
from hnvm.models import BUILTIN
from hnvm.models.base import REGISTRY, get_model_class
from hnvm.paper import PROTOCOLS, check_paper_protocol, paper_configs
from hnvm.rundir import data_digest, train_digest
from hnvm.runs import evaluate_run, resolve_config, train_run
from hnvm.training import ProgressCallback

log = logging.getLogger(__name__)

# ablations: hnvm with one part switched off (mapped here, not registered as models)
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "hnvm-no-e": ("hnvm", ["model.use_e=false"]),
    "hnvm-no-z": ("hnvm", ["model.use_z=false"]),
    "hnvm-no-history": ("hnvm", ["model.use_history=false"]),
    "hnvm-no-repeat": ("hnvm", ["model.repeat=false"]),  # the paper's HNVM (no repeat channel)
}
TASKS = ("next-item", "next-session")
# what a benchmark writes into OUT (per task) besides results.json, runs/ and ranks/
REPORT_FILES = ("results.csv", "table.md", "significance.json", "position.png", "history.png")
BOTH = "both"  # --task both: OUT/next-item/ and OUT/next-session/ (runs: OUT/runs, OUT/runs-next-session)
def all_models() -> list[str]:
    """Every registered model: the built-ins in the paper's order (baselines, then HNVM), then
    any others."""

    return [n for n in BUILTIN if n in REGISTRY] + [n for n in REGISTRY if n not in BUILTIN]


def parse_models(spec: str) -> list[str]:
    """A comma-separated list of registered names, ablations and `all` (every registered model):
    `all`, `pop,hnvm`, `all,hnvm-no-e,hnvm-no-z`."""
    names = []
    for s in (s.strip() for s in spec.split(",")):
        if s:
            names += all_models() if s == "all" else [s]
    known = set(all_models()) | set(ABLATIONS)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise HnvmError(f"unknown model(s) {', '.join(bad) or '(none)'} (known: {', '.join(sorted(known))}, all)")
    return list(dict.fromkeys(names))


def _has_params(model: str) -> bool:

    return getattr(get_model_class(model), "config_class", None) is not None


def _augment(ranks: pl.DataFrame, seq: Sequences, task: str) -> pl.DataFrame:
    """Add session_len and n_history; for next-session, per-user metrics at every k of
    DEFAULT_KS (recall/precision/mrr/ndcg/phr@k, for paired tests), computed from the exported
    conservative per-target ranks (`target_ranks`) exactly as the reported means are."""
    s = ranks["session"].to_numpy().astype(np.int64)
    u = seq.session_user[s]
    ranks = ranks.with_columns(session_len=pl.Series((seq.offsets[s + 1] - seq.offsets[s]).astype(np.int64)),
                               n_history=pl.Series((s - seq.user_first[u]).astype(np.int64)))
    if task == "next-session" and len(ranks):
        tr = pad_item_sets([torch.tensor(r, dtype=torch.long) for r in ranks["target_ranks"].to_list()])
        for k in DEFAULT_KS:
            m = per_user_session_rank_metrics(tr, k)
            ranks = ranks.with_columns(**{name: pl.Series(v.numpy()) for name, v in m.items()})
    return ranks


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# fields of a model's entry in results.json: (check, what it must be); the first five are required
_ENTRY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "metrics": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()),
                "an object of numbers"),
    "untuned": (lambda v: isinstance(v, bool), "true or false"),
    "n_targets": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a count"),
    "train_s": (_is_number, "a number"),
    "eval_s": (_is_number, "a number"),
    "model": (lambda v: isinstance(v, str), "a model name"),
    "config": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "overrides": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of settings"),
    "resolved": (lambda v: isinstance(v, dict), "an object"),
    "data": (lambda v: isinstance(v, dict), "an object"),
    "include_first": (lambda v: isinstance(v, bool), "true or false"),
}
_REQUIRED = ("metrics", "untuned", "n_targets", "train_s", "eval_s")


def _check_results(res: Any) -> None:
    """The structure every reader of results.json relies on; ValueError naming the first bad field."""
    if not isinstance(res, dict) or not isinstance(res.get("models"), dict):
        raise ValueError("not a results object")
    if "include_first" in res and not isinstance(res["include_first"], bool):
        raise ValueError("include_first is not true or false")
    for name, entry in res["models"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"models.{name} is not an object")
        for key, (ok, what) in _ENTRY_FIELDS.items():
            if key not in entry:
                if key in _REQUIRED:
                    raise ValueError(f"models.{name}.{key} is missing")
            elif not ok(entry[key]):
                raise ValueError(f"models.{name}.{key} is not {what}")


def _load_results(path: Path, dataset: Path, task: str) -> dict[str, Any]:
    if not path.exists():
        return {"dataset": str(dataset), "task": task, "models": {}}
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
        _check_results(res)
    except (OSError, ValueError) as exc:
        raise HnvmError(f"{path}: damaged results file ({one_line(exc)}); move it away to "
                        "redo the benchmark in this --out") from exc
    if res.get("task") != task or res.get("dataset") != str(dataset):
        raise HnvmError(f"{path}: holds a benchmark of {res.get('dataset')} ({res.get('task')}); "
                        "use another --out for a different dataset or task")
    return res


@dataclass
class _Plan:
    """What one task of a benchmark will do, checked before anything is trained or written."""

    dataset: Path
    ds: Dataset
    task: str
    out: Path
    runs: Path
    results: dict[str, Any]
    models: list[tuple[str, str, Path | None, list[str], dict[str, Any]]]
    include_first: bool
    show_progress: bool
    say: Callable[[str], None]
    on_progress: ProgressCallback | None = None


def _check_dir(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise HnvmError(f"{flag} {path}: is a file, not a directory; move it away or use another --out")


def _plan(
    dataset: str | Path,
    models: list[str],
    task: str,
    out: str | Path,
    overrides: list[str] | None = None,
    epochs: int | None = None,
    on_step: Callable[[str], None] | None = None,
    show_progress: bool = False,
    include_first: bool = False,
    *,
    runs_dir: str | Path | None = None,
    tuned_dir: str | Path | None = None,
    model_overrides: dict[str, list[str]] | None = None,
    ds: Dataset | None = None,
    on_progress: ProgressCallback | None = None,
    protocol: str = "ours",
) -> _Plan:
    """Everything of `run_benchmark` that can refuse, before anything is trained or written."""
    if task not in TASKS:
        raise HnvmError(f"--task must be one of {', '.join(TASKS)}")
    if protocol not in PROTOCOLS:
        raise HnvmError(f"--protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    dataset, out = Path(dataset).resolve(), Path(out)
    check_output_dir(out, "--out", inputs=(dataset,))
    # the report files are rewritten on every run: only over a benchmark's own (results.json beside)
    theirs = [n for n in REPORT_FILES if (out / n).exists()] if not (out / "results.json").exists() else []
    if theirs:
        raise HnvmError(f"--out {out}: holds {', '.join(theirs)} but no results.json, so not a benchmark's; "
                        "use another --out")
    runs = Path(runs_dir) if runs_dir is not None else out / "runs"
    tuned_root = Path(tuned_dir) if tuned_dir is not None else out / "tuned"
    for d in (runs, out / "ranks"):
        _check_dir(d, "--out")
    ds = ds if ds is not None else Dataset.load(dataset)
    if task == "next-session" and ds.held_out_items:
        raise HnvmError(f"{dataset}: {NO_SESSION_TASK}")
    if protocol == "paper":
        check_paper_protocol(ds, task, dataset)
    targets = ds.next_item_targets("test", include_first) if task == "next-item" else ds.next_session_targets("test")
    if targets.height == 0:
        first = " (positions >= 2; --include-first adds position 1)" if task == "next-item" and not \
            include_first else ""
        raise HnvmError(f"{dataset}: the test split has no {task} targets{first}; nothing to benchmark")
    results = _load_results(out / "results.json", dataset, task)
    # a task's models early-stop on that task's validation, whatever a tuned config says (a --set
    # may say otherwise); under the paper's protocol "hnvm" is the paper's model (no repeat channel)
    extra = [f"train.validate={task}", *(overrides or []), *([f"train.epochs={epochs}"] if epochs is not None else [])]
    # every model's settings resolve (or refuse) before anything is trained or written
    plan = []
    for name in models:
        base, ablation = ABLATIONS.get(name, (name, []))
        # OUT/tuned/TASK/MODEL.toml (tuned for this task), OUT/tuned/MODEL.toml, or the best.toml
        # that `hnvm tune --out OUT/tuned/MODEL` writes
        candidates = [tuned_root / task / f"{n}.toml" for n in (name, base)]
        candidates += [tuned_root / f"{n}.toml" for n in (name, base)]
        candidates += [tuned_root / n / "best.toml" for n in (name, base)]
        if protocol == "paper":  # then the paper's training of this model, where we ship one
            candidates.append(paper_configs() / f"{base}.toml")
        tuned = next((p for p in candidates if p.exists()), None)
        paper = ["model.repeat=false"] if protocol == "paper" and base == "hnvm" else []
        settings = paper + extra + list((model_overrides or {}).get(name, [])) + ablation
        try:
            resolved = _resolved(base, tuned, settings)
        except HnvmError as exc:
            raise HnvmError(f"{name}: {exc}") from exc
        plan.append((name, base, tuned, settings, resolved))
        _check_dir(runs / name, "--out")
        if (out / "ranks" / f"{name}.parquet").is_dir():
            raise HnvmError(f"--out {out}: {out / 'ranks' / f'{name}.parquet'} is a directory; move it away")
    results["protocol"] = protocol
    return _Plan(dataset, ds, task, out, runs, results, plan, include_first, show_progress,
                 on_step or (lambda _msg: None), on_progress)


def run_benchmark(
    dataset: str | Path,
    models: list[str],
    task: str,
    out: str | Path,
    overrides: list[str] | None = None,
    epochs: int | None = None,
    on_step: Callable[[str], None] | None = None,
    show_progress: bool = False,
    include_first: bool = False,
    *,
    runs_dir: str | Path | None = None,
    tuned_dir: str | Path | None = None,
    model_overrides: dict[str, list[str]] | None = None,
    on_progress: ProgressCallback | None = None,
    protocol: str = "ours",
) -> dict[str, Any]:
    """Train, evaluate and report each model; resumable. Returns the results.json content
    plus "significance" and "files".

    `runs_dir` / `tuned_dir` default to OUT/runs and OUT/tuned; `model_overrides` adds per-model
    settings after the shared `overrides` (the demo's short schedules); `on_progress` gets the
    training loop's progress reports. `protocol` "paper": the data must be split the paper's way
    (`check_paper_protocol`) and models without a tuned config use hnvm/paper_configs."""
    return _execute(_plan(dataset, models, task, out, overrides, epochs, on_step, show_progress, include_first,
                          runs_dir=runs_dir, tuned_dir=tuned_dir, model_overrides=model_overrides,
                          on_progress=on_progress, protocol=protocol))


def _execute(p: _Plan, seq: Sequences | None = None) -> dict[str, Any]:
    """Train (or reuse), evaluate and report every model of a checked plan; `seq`: the plan's
    dataset as Sequences when the caller has it (both tasks share one)."""
    dataset, ds, task, out, runs, results, say = p.dataset, p.ds, p.task, p.out, p.runs, p.results, p.say
    include_first, show_progress, n_models = p.include_first, p.show_progress, len(p.models)
    res_path = out / "results.json"
    runs.mkdir(parents=True, exist_ok=True)
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    seq = seq if seq is not None else Sequences.from_events(ds.events, ds.n_users, ds.held_out_items)
    results["include_first"] = include_first
    # what a result depends on besides the model's settings: the data (every event; the train
    # events for the run) and, for next-item, whether first positions are scored
    data_ref = {"path": str(dataset), "sha256": data_digest(ds), "train_sha256": train_digest(ds)}
    first = include_first if task == "next-item" else False
    for i, (name, base, tuned, settings, resolved) in enumerate(p.models, 1):
        run_dir, ranks_path = runs / name, out / "ranks" / f"{name}.parquet"
        train_s = _reusable_run(run_dir, resolved, data_ref)
        prev = results["models"].get(name) or {}
        # done = evaluated with exactly these settings on exactly this data, from the run now in
        # run_dir; anything else (other epochs, a re-prepared data set, --include-first) redoes it
        if (train_s is not None and ranks_path.exists() and prev.get("resolved") == resolved
                and prev.get("data") == data_ref and prev.get("include_first", False) == first):
            say(f"[{i}/{n_models}] {name}: already done, skipped")
            continue
        if prev:
            say(f"[{i}/{n_models}] {name}: settings or data differ from the recorded result, redoing it")
        if train_s is not None:
            say(f"[{i}/{n_models}] {name}: reusing the trained run in {run_dir}")
        else:
            say(f"[{i}/{n_models}] training {name}" + ("" if tuned else " (untuned defaults)"))
            t0 = time.perf_counter()
            train_run(dataset, base, run_dir, config_path=tuned, overrides=settings, force=True,
                      show_progress=show_progress, on_progress=p.on_progress, loaded=(ds, seq))
            train_s = time.perf_counter() - t0
            atomic_json(run_dir / "train_time.json", {"train_s": round(train_s, 2)})
        say(f"[{i}/{n_models}] evaluating {name}")
        t0 = time.perf_counter()
        ev = evaluate_run(run_dir, task=task, keep_ranks=True, include_first=include_first, loaded=(ds, seq))
        eval_s = time.perf_counter() - t0
        assert ev.ranks is not None
        atomic_file(ranks_path, _augment(ev.ranks, seq, task).write_parquet)
        results["models"][name] = {
            "model": base, "config": str(tuned) if tuned else None,
            "untuned": tuned is None and _has_params(base),
            "overrides": settings, "metrics": ev.metrics, "n_targets": ev.n_targets,
            "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
            "resolved": resolved, "data": data_ref, "include_first": first,
        }
        atomic_json(res_path, results)
        log.info("%s: %s", name, {k: round(v, 4) for k, v in ev.metrics.items() if k.endswith("@5")})
    done = {n: results["models"][n] for n, *_ in p.models if n in results["models"]}
    files = _write_reports(out, done, task)
    atomic_json(res_path, results)
    return {**results, "significance": json.loads((out / "significance.json").read_text()), "files": files}


def _resolved(model: str, config_path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The resolved settings of a model as a run's config.json stores them (JSON types)."""

    rc = resolve_config(model, config_path, overrides)
    return json.loads(json.dumps({
        "model": model, "model_config": as_dict(rc.model_config) if rc.model_config is not None else {},
        "train": as_dict(rc.train)}))


def _reusable_run(run_dir: Path, resolved: dict[str, Any], data_ref: dict[str, Any]) -> float | None:
    """The training time of a finished run in `run_dir` trained with exactly the `resolved`
    settings on this data (same path and train-event digest), else None (also for a damaged
    run: it is retrained). Lets a re-run (or another benchmark over the same runs) reuse a run."""
    cfg_path, time_path = run_dir / "config.json", run_dir / "train_time.json"
    if not ((run_dir / "model" / "model.json").exists() and cfg_path.exists() and time_path.exists()):
        return None
    try:
        prev = json.loads(cfg_path.read_text())
        train_s = float(json.loads(time_path.read_text())["train_s"])
        ds = prev.get("dataset", {})
        have = {k: prev.get(k) for k in ("model", "model_config", "train")}
        same_data = ds.get("path") == data_ref["path"] and ds.get("train_sha256") == data_ref["train_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return train_s if have == resolved and same_data else None


def run_benchmarks(
    dataset: str | Path,
    models: list[str],
    task: str,
    out: str | Path,
    overrides: list[str] | None = None,
    epochs: int | None = None,
    on_step: Callable[[str], None] | None = None,
    show_progress: bool = False,
    include_first: bool = False,
    *,
    tuned_dir: str | Path | None = None,
    model_overrides: dict[str, list[str]] | None = None,
    data_in_out: bool = False,
    on_progress: ProgressCallback | None = None,
    protocol: str = "ours",
) -> dict[str, dict[str, Any]]:
    """`run_benchmark` for one task, or for `both` (OUT/next-item, OUT/next-session; each task
    trains its own runs, early-stopped on its own validation: OUT/runs and OUT/runs-next-session;
    tuned configs from OUT/tuned/TASK or OUT/tuned). Returns {task: result}. An OUT holding
    the dataset is refused unless `data_in_out` (the demo keeps its data set in OUT by design)."""
    if task != BOTH:
        return {task: run_benchmark(dataset, models, task, out, overrides, epochs, on_step, show_progress,
                                    include_first, tuned_dir=tuned_dir, model_overrides=model_overrides,
                                    on_progress=on_progress, protocol=protocol)}
    out = Path(out)
    say = on_step or (lambda _msg: None)
    check_output_dir(out, "--out", inputs=() if data_in_out else (Path(dataset),))
    ds = Dataset.load(dataset)
    # both tasks are checked (results files, settings, targets) before either trains anything
    plans = [_plan(dataset, models, t, out / t, overrides, epochs, lambda m, t=t: say(f"{t}: {m}"),
                   show_progress, include_first, runs_dir=out / ("runs" if t == "next-item" else f"runs-{t}"),
                   tuned_dir=tuned_dir if tuned_dir is not None else out / "tuned",
                   model_overrides=model_overrides, ds=ds, on_progress=on_progress, protocol=protocol)
             for t in TASKS]
    seq = Sequences.from_events(ds.events, ds.n_users, ds.held_out_items)
    return {p.task: _execute(p, seq) for p in plans}


def _fmt_p(p: Any) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def _write_reports(out: Path, done: dict[str, Any], task: str) -> dict[str, str]:
    files: dict[str, str] = {}
    sig = report.significance(done, task, lambda name: pl.read_parquet(out / "ranks" / f"{name}.parquet"))
    atomic_json(out / "significance.json", sig)
    title = "Next-item (Table 2 layout)" if task == "next-item" else "Next-session (Table 3 layout)"
    md = [f"## {title}: test split, full ranking, conservative ties", "",
          report.paper_table(done, task), "", "### Other cut-offs", "", report.cutoff_table(done), "",
          f"{report.DAGGER} untuned defaults (no OUT/tuned/MODEL.toml). "
          "Improv. = hnvm relative to the best baseline per column.", ""]
    if "baseline" in sig:
        md.append(f"Significance (hnvm vs {sig['baseline']}, MRR@5 per {sig['unit']}, n = {sig['n']}): "
                  f"Wilcoxon p = {_fmt_p(sig['p'])}, paired t-test p = {_fmt_p(sig['t_p'])}, "
                  f"mean difference = {sig['mean_diff']:+.4f}")
        md += ["", "### hnvm against the best baseline of each column (paired tests per "
               f"{sig['unit']})", "", report.headline_table(sig["columns"])]
    else:
        md.append(f"Significance: {sig['note']}")
    if task == "next-session":
        md += ["", "### Next-basket metrics (repeat = items the user had before)", "", report.basket_table(done)]
    atomic_text(out / "table.md", "\n".join(md) + "\n")
    files["table"] = str(out / "table.md")
    metric_names = sorted({m for r in done.values() for m in r["metrics"]})
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(["model", "untuned", "n_targets", "train_s", "eval_s", *metric_names])
    for n, r in done.items():
        w.writerow([n, r["untuned"], r["n_targets"], r["train_s"], r["eval_s"],
                    *(r["metrics"].get(m, "") for m in metric_names)])
    atomic_text(out / "results.csv", rows.getvalue(), newline="")
    files["csv"] = str(out / "results.csv")
    if task == "next-item" and done:
        ranks = {n: pl.read_parquet(out / "ranks" / f"{n}.parquet") for n in done}
        files["position"] = str(report.plot_position(
            {n: report.position_breakdown(r) for n, r in ranks.items()}, out / "position.png"))
        files["history"] = str(report.plot_history(
            {n: report.history_breakdown(r) for n, r in ranks.items()}, out / "history.png"))
    return files
