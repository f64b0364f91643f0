"""Paper-style reports from benchmark results (pure functions: no training, no evaluation).

`results` maps a model name to {"metrics": {"recall@5": ..}, "untuned": bool, ...}.

Ranks frames are the per-target frames of `hnvm.evaluate` (`keep_ranks=True`):
next-item rows = one target (user, session, position [0-based], item, rank); next-session
rows = one user (user, session, n_targets, targets, target_ranks = each target's conservative
rank, first_hit_rank, topk). The benchmark adds `session_len` and `n_history` (the user's
sessions before this one) and, for next-session, per-user `recall/precision/mrr/ndcg/phr@k`
columns. Per-unit values for paired tests use the conservative ranks in both tasks
(`per_target_item_metrics`, `per_user_session_rank_metrics`), as the reported means do.

Position groups (paper Fig. 2) use 1-based positions within the session: Begin = 1–2,
Middle = 3–4, End = 5+, i.e. our 0-based `position` 0–1, 2–3, 4+. Next-item targets start at
0-based position 1 (the first item has no prefix), so Begin holds position 1 only unless the
evaluation ran with `include_first`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from hnvm.atomic import atomic_file
from hnvm.metrics import pad_item_sets, per_target_item_metrics, per_user_session_rank_metrics

PAPER_COLUMNS = (("Recall", "recall"), ("MRR", "mrr"), ("Pre", "precision"))
POSITION_GROUPS = ("Begin", "Middle", "End")
HISTORY_GROUPS = ("Short", "Long")
DAGGER = "†"


def is_hnvm(name: str) -> bool:
    """HNVM and its ablations (never counted as baselines)."""
    return name.startswith("hnvm")


def best_baseline(results: Mapping[str, Mapping[str, Any]], metric: str) -> str | None:
    """The non-HNVM model with the highest `metric` (None if there is none)."""
    cands = [(r["metrics"].get(metric, float("nan")), n) for n, r in results.items() if not is_hnvm(n)]
    cands = [(v, n) for v, n in cands if not math.isnan(v)]
    return max(cands)[1] if cands else None


def improvement(results: Mapping[str, Mapping[str, Any]], metric: str, target: str = "hnvm") -> str:
    """`target`'s relative improvement over the best baseline by `metric`, as '+12.3%' ('-' if none)."""
    base = best_baseline(results, metric)
    if target not in results or base is None:
        return "-"
    ours, theirs = results[target]["metrics"].get(metric), results[base]["metrics"][metric]
    if ours is None or theirs <= 0:
        return "-"
    return f"{100.0 * (ours - theirs) / theirs:+.1f}%"


def _table(results: Mapping[str, Mapping[str, Any]], ks: tuple[int, ...], target: str) -> str:
    return _rows(results, [(f"{label}@{k}", f"{key}@{k}") for k in ks for label, key in PAPER_COLUMNS], target)


def _rows(results: Mapping[str, Mapping[str, Any]], cols: list[tuple[str, str]], target: str) -> str:
    lines = ["| model | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, r in results.items():
        label = name + (DAGGER if r.get("untuned") else "")
        vals = [f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for _, m in cols]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    lines.append("| Improv. | " + " | ".join(improvement(results, m, target) for _, m in cols) + " |")
    return "\n".join(lines)


def paper_table(results: Mapping[str, Mapping[str, Any]], task: str, target: str = "hnvm") -> str:
    """Markdown in the layout of the paper's Table 2 (next-item) / Table 3 (next-session):
    rows = models, columns Recall@5, MRR@5, Pre@5, then an "Improv." row: `target`'s relative
    improvement over the best baseline of each column (hnvm* variants are not baselines)."""
    del task  # same layout for both tasks; the caller titles the table
    return _table(results, (5,), target)


# the columns HNVM is judged on (issue #15's "done when"): per task, against the best baseline of each
HEADLINE = {"next-item": ("recall@5", "mrr@5", "recall@20"),
            "next-session": ("recall@10", "ndcg@10", "phr@10", "mrr@5")}


def basket_table(results: Mapping[str, Mapping[str, Any]], target: str = "hnvm") -> str:
    """Next-basket metrics as the NBR literature reports them (Li et al. 2023): Recall, NDCG and
    PHR @5/10/20 (the relevant set: the held-out session's distinct items), then @10 the
    repeat/explore breakdown (recall on items the user had before / new to the user) and the
    share of repeat items among the 10 shown."""
    cols = [(f"{label}@{k}", f"{key}@{k}") for k in (5, 10, 20)
            for label, key in (("Recall", "recall"), ("NDCG", "ndcg"), ("PHR", "phr"))]
    cols += [("Rec-rep@10", "recall_repeat@10"), ("Rec-expl@10", "recall_explore@10"),
             ("Rep-share@10", "repeat_share@10")]
    return _rows(results, cols, target)


def headline_tests(results: Mapping[str, Mapping[str, Any]], task: str,
                   ranks: Callable[[str], pl.DataFrame], target: str = "hnvm") -> list[dict[str, Any]]:
    """For each HEADLINE metric of `task`: `target` against the best baseline of that column,
    the relative improvement and the paired tests over targets (next item) or users (next
    session); `ranks(name)` reads a model's exported ranks."""
    out = []
    for metric in HEADLINE[task]:
        base = best_baseline(results, metric)
        if target not in results or base is None:
            continue
        ours, theirs = results[target]["metrics"].get(metric), results[base]["metrics"].get(metric)
        if ours is None or theirs is None:
            continue
        pt = compare(ranks(target), ranks(base), task, metric)
        out.append({"metric": metric, "model": target, "value": ours, "baseline": base, "baseline_value": theirs,
                    "improvement": improvement(results, metric, target), **pt.to_json()})
    return out


def significance(results: Mapping[str, Mapping[str, Any]], task: str,
                 ranks: Callable[[str], pl.DataFrame]) -> dict[str, Any]:
    """A benchmark's significance.json: hnvm against the best baseline by MRR@5 (paired tests
    per target or user), and under "columns" `headline_tests`."""
    base = best_baseline(results, "mrr@5")
    if "hnvm" not in results or base is None:
        return {"note": "needs hnvm and at least one baseline"}
    pt = compare(ranks("hnvm"), ranks(base), task, "mrr@5")
    return {"model": "hnvm", "baseline": base, "metric": "mrr@5",
            "unit": "target" if task == "next-item" else "user",
            "test": "wilcoxon signed-rank (two-sided); paired t-test", **pt.to_json(),
            "columns": headline_tests(results, task, ranks)}


def headline_table(tests: list[dict[str, Any]]) -> str:
    """Markdown of `headline_tests`: one row per metric."""
    lines = ["| metric | hnvm | best baseline | improv. | Wilcoxon p | t-test p |", "|---|---:|---|---:|---:|---:|"]
    for t in tests:
        p, tp = (("n/a" if v is None else f"{v:.3g}") for v in (t["p"], t["t_p"]))
        lines.append(f"| {t['metric']} | {t['value']:.4f} | {t['baseline']} {t['baseline_value']:.4f} | "
                     f"{t['improvement']} | {p} | {tp} |")
    return "\n".join(lines)


def cutoff_table(results: Mapping[str, Mapping[str, Any]], ks: tuple[int, ...] = (10, 20),
                 target: str = "hnvm") -> str:
    """The same table at other cut-offs (default @10 and @20)."""
    return _table(results, ks, target)


@dataclass(frozen=True)
class PairedTest:
    """Wilcoxon signed-rank (statistic, p) and paired t-test (t_statistic, t_p) of a vs b."""

    statistic: float
    p: float
    n: int
    mean_diff: float  # mean of a - b
    t_statistic: float
    t_p: float

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def paired_test(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> PairedTest:
    """Two-sided paired tests over aligned per-target (or per-user) values. Identical samples
    give p = 1 (no evidence of a difference) instead of scipy's nan; n < 2 gives nan."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and aligned, got {x.shape} and {y.shape}")
    n = len(x)
    d = x - y
    mean_diff = float(d.mean()) if n else float("nan")
    if n and not d.any():
        return PairedTest(0.0, 1.0, n, 0.0, 0.0, 1.0)
    if n < 2:
        return PairedTest(float("nan"), float("nan"), n, mean_diff, float("nan"), float("nan"))
    w = stats.wilcoxon(x, y, alternative="two-sided")
    t = stats.ttest_rel(x, y)
    return PairedTest(float(w.statistic), float(w.pvalue), n, mean_diff,
                      float(t.statistic), float(t.pvalue))


def unit_values(ranks: pl.DataFrame, task: str, metric: str = "mrr@5") -> pl.DataFrame:
    """Per-target (next-item, keyed by session and position) or per-user (next-session, keyed
    by user) values of `metric`, in a `value` column. Both come from conservative ranks: the
    `rank` column (next-item) or the `target_ranks` list column (next-session; a frame without
    it falls back to a precomputed per-user `metric` column)."""
    if task == "next-item":
        k = int(metric.split("@")[1])
        vals = per_target_item_metrics(torch.as_tensor(ranks["rank"].to_numpy().copy()), k)[metric]
        return ranks.select("session", "position").with_columns(value=pl.Series(vals.numpy()))
    if "target_ranks" in ranks.columns:
        k = int(metric.split("@")[1])
        tr = pad_item_sets([torch.tensor(r, dtype=torch.long) for r in ranks["target_ranks"].to_list()])
        per_user = per_user_session_rank_metrics(tr, k)
        if metric not in per_user:
            raise ValueError(f"unknown next-session metric '{metric}' (known: {', '.join(per_user)})")
        return ranks.select("user").with_columns(value=pl.Series(per_user[metric].numpy(), dtype=pl.Float64))
    if metric not in ranks.columns:
        raise ValueError(f"next-session ranks have no per-user '{metric}' column")
    return ranks.select("user", pl.col(metric).alias("value"))


def compare(ranks_a: pl.DataFrame, ranks_b: pl.DataFrame, task: str, metric: str = "mrr@5") -> PairedTest:
    """Paired test of model a vs model b over their common targets (or users)."""
    va, vb = unit_values(ranks_a, task, metric), unit_values(ranks_b, task, metric)
    keys = ["session", "position"] if task == "next-item" else ["user"]
    j = va.join(vb, on=keys, how="inner", suffix="_b")
    return paired_test(j["value"].to_numpy(), j["value_b"].to_numpy())


def _group_metrics(ranks: pl.DataFrame, group: pl.Expr, order: tuple[str, ...], k: int) -> pl.DataFrame:
    r = pl.col("rank").cast(pl.Float64)
    hit = r <= k
    out = (ranks.with_columns(group=group)
           .group_by("group")
           .agg(n=pl.len(),
                **{f"recall@{k}": hit.cast(pl.Float64).mean(),
                   f"mrr@{k}": pl.when(hit).then(1.0 / r).otherwise(0.0).mean(),
                   f"precision@{k}": hit.cast(pl.Float64).mean() / k}))
    # every group appears (n = 0, nan metrics when empty), in the paper's order
    base = pl.DataFrame({"group": list(order)})
    return base.join(out, on="group", how="left", maintain_order="left").with_columns(
        pl.col("n").fill_null(0))


def _with_column(ranks: pl.DataFrame, name: str, mapping: Mapping[int, int] | None, key: str) -> pl.DataFrame:
    if mapping is None:
        if name not in ranks.columns:
            raise ValueError(f"ranks have no '{name}' column; pass the mapping")
        return ranks
    m = pl.DataFrame({key: list(mapping), name: list(mapping.values())},
                     schema={key: ranks.schema[key], name: pl.Int64})
    return ranks.drop(name, strict=False).join(m, on=key, how="left")


def position_breakdown(ranks: pl.DataFrame, k: int = 5, *, min_len: int = 5,
                       session_len: Mapping[int, int] | None = None) -> pl.DataFrame:
    """Paper Fig. 2: next-item metrics by target position over sessions with >= `min_len`
    events. Columns group (Begin/Middle/End), n, recall@k, mrr@k, precision@k. Session lengths
    come from a `session_len` column or the `session_len` mapping (session -> events)."""
    df = _with_column(ranks, "session_len", session_len, "session")
    df = df.filter(pl.col("session_len") >= min_len)
    p = pl.col("position") + 1  # 1-based, as in the paper
    group = pl.when(p <= 2).then(pl.lit("Begin")).when(p <= 4).then(pl.lit("Middle")).otherwise(pl.lit("End"))
    return _group_metrics(df, group, POSITION_GROUPS, k)


def history_breakdown(ranks: pl.DataFrame, n_history: Mapping[int, int] | None = None, k: int = 5,
                      *, threshold: int = 6) -> pl.DataFrame:
    """Paper Fig. 3: next-item metrics for users with <= `threshold` (Short) vs more (Long)
    past sessions. `n_history` maps user -> number of past sessions (default: the ranks
    frame's `n_history` column)."""
    df = _with_column(ranks, "n_history", n_history, "user")
    group = pl.when(pl.col("n_history") <= threshold).then(pl.lit("Short")).otherwise(pl.lit("Long"))
    return _group_metrics(df.filter(pl.col("n_history").is_not_null()), group, HISTORY_GROUPS, k)


def _plot_groups(frames: Mapping[str, pl.DataFrame], order: tuple[str, ...], path: Path,
                 title: str, k: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(frames)
    x = np.arange(len(order))
    width = 0.8 / max(len(names), 1)
    # tab20 keeps up to 20 models distinguishable (the default cycle repeats after 10)
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, (f"recall@{k}", f"mrr@{k}"), strict=True):
        for i, name in enumerate(names):
            vals = frames[name][metric].fill_null(float("nan")).to_numpy()
            ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name,
                   color=colors[i % len(colors)])
        ax.set_xticks(x, list(order))
        ax.set_ylabel(metric.replace("recall", "Recall").replace("mrr", "MRR"))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path = Path(path)
    try:
        atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def plot_position(frames: Mapping[str, pl.DataFrame], path: Path, k: int = 5) -> Path:
    """Grouped bars of `position_breakdown` frames (one per model), as in the paper's Fig. 2."""
    return _plot_groups(frames, POSITION_GROUPS, path, "By position in session (sessions with >= 5 events)", k)


def plot_history(frames: Mapping[str, pl.DataFrame], path: Path, k: int = 5) -> Path:
    """Grouped bars of `history_breakdown` frames (one per model), as in the paper's Fig. 3."""
    return _plot_groups(frames, HISTORY_GROUPS, path, "By number of past sessions (Short <= 6 < Long)", k)
