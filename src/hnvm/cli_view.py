"""What the `hnvm` command line shows on the terminal: the two consoles (results on stdout,
messages on stderr), one-line errors, progress (`Progress`) and the result tables. The library
never prints; it reports through callbacks that these objects turn into output."""

from __future__ import annotations

import sys
import time
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console()
err = Console(stderr=True)


def fail(exc: Exception) -> None:
    """Print `exc` as one red line on stderr and exit with its exit code (2 by default)."""
    # escaped: ids and paths in messages (`[/x]`) are text, not console markup
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(exc, "exit_code", 2))


class Progress:
    """How train, benchmark, tune and demo show progress on stderr. "live": a status line (a
    terminal); "plain": one line per stage, per epoch and, within long epochs, per
    --progress-every seconds, each starting with the time elapsed and flushed at once, with no
    control codes (a pipe, a file, nohup); "off": nothing. The library reports through
    `on_step` and `on_progress` callbacks; only this class prints."""

    mode = "auto"  # the root --progress option
    every = 30.0  # the root --progress-every option

    def __init__(self, title: str) -> None:
        self.live = (self.mode == "live" or (self.mode == "auto" and sys.stderr.isatty()))
        self.quiet = self.mode == "off"
        self.title = title
        self.t0 = self._last_line = self._last_live = time.perf_counter()
        self._status: Any = None

    def __enter__(self) -> Progress:
        if self.live and not self.quiet:
            self._status = err.status(self.title)
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()

    def _print(self, text: str) -> None:
        e = int(time.perf_counter() - self.t0)
        stamp = f"[{e // 3600}:{e // 60 % 60:02d}:{e % 60:02d}]"  # time elapsed since the command began
        if self.live:
            err.print(f"{stamp} {text}", markup=False, highlight=False, soft_wrap=True)
        else:  # plain: no rich (no wrapping, no codes), flushed so that `tail -f` sees it now
            sys.stderr.write(f"{stamp} {text}\n")
            sys.stderr.flush()

    def step(self, msg: str) -> None:
        """A stage of the command (the `on_step` callback of benchmark, tune and demo)."""
        if self.quiet:
            return
        self._print(msg)
        if self._status is not None:
            self._status.update(f"{self.title}: {msg}")

    def train(self, p: Any) -> None:
        """A `hnvm.training.Progress` report (the `on_progress` callback)."""
        if self.quiet:
            return
        now = time.perf_counter()
        head = f"{p.model} epoch {p.epoch}/{p.epochs}"
        loss = f"loss {p.losses['loss']:.4f}" if "loss" in p.losses else ""
        rate = f"{p.targets / max(p.epoch_s, 1e-9):,.0f} targets/s"
        if p.kind == "start":
            self._print(f"{p.model}: training, epoch {p.epoch} of at most {p.epochs}")
        elif p.kind == "epoch":
            line = f"{head} done" + (f": {loss}" if loss else "")
            if p.valid is not None:
                line += f", valid {p.metric} {p.valid.get(p.metric, float('nan')):.4f}"
                line += f" (best {p.best:.4f}, epoch {p.best_epoch})" if p.best is not None else ""
            lat = latent_parts(getattr(p, "latent", None) or {})
            line += f", {lat}" if lat else ""
            self._print(f"{line}, {p.epoch_s:.1f}s ({rate})")
            self._last_line = now
        elif not self.live and now - self._last_line >= self.every:
            self._last_line = now
            self._print(f"{head}: {p.targets:,} targets so far, {loss}, {p.epoch_s:.1f}s ({rate})")
        if self._status is not None and now - self._last_live >= 0.1:
            self._last_live = now
            self._status.update(f"{self.title}: {head}, {p.targets:,} targets, {loss}, {rate}")


def latent_parts(lat: dict) -> str:
    """What HNVM's latents carry, compact: "z: KL/dim 0.0123, 3 active, MI 0.41, e: ..."."""
    parts = []
    for v in ("z", "e"):
        if f"active_{v}" in lat:
            mi = f", MI {lat[f'mi_{v}']:.2f}" if f"mi_{v}" in lat else ""
            parts.append(f"{v}: KL/dim {lat[f'kl_{v}_per_dim']:.4f}, {lat[f'active_{v}']} active{mi}")
    return ", ".join(parts)


def latent_line(lat: dict) -> str:
    """`hnvm evaluate`'s line on the latents (KL per dimension in nats, active units: posterior
    mean variance > 0.01, Burda et al. 2016; MI: I(x; z) under q in nats)."""
    return f"latents on the training split: {latent_parts(lat)} (KL/dim and MI in nats)"


def print_stats(s: dict, title: str) -> None:
    """The paper's Table 1 rows of a dataset (and its target counts) as a table on stdout."""
    t = Table(title=f"Dataset statistics: {title}", show_header=True)
    t.add_column("statistic")
    t.add_column("value", justify="right")
    held_out = s.get("split") in ("leave-one-out", "shan")
    test = s["test_sessions"]
    training = s.get("table1_training_sessions", s["sessions"] - test)
    rows = [
        ("Split", s.get("split", "?")),
        ("Users", s["users"]),
        ("Items", s["items"]),
        ("Sessions", s["sessions"]),
        ("Training sessions (Table 1)", training),
        ("Test sessions (holding test targets)", test),
        ("Training + test = sessions", "yes" if training + test == s["sessions"] else "no"),
        ("Sessions holding validation targets", s["valid_sessions"]),
        ("Sessions of training events only", s.get("train_only_sessions", s["train_sessions"])),
        ("Interactions per session", s["interactions_per_session"]),
        ("Events (train / valid / test)",
         f"{s['train_events']:,} / {s['valid_events']:,} / {s['test_events']:,}"),
        ("Next-item targets (valid / test)",
         f"{s['valid_next_item_targets']:,} / {s['test_next_item_targets']:,}"
         + (" (every held-out item)" if held_out else " (positions >= 2)")),
        ("Next-session targets (valid / test)",
         "none (held-out items)" if held_out else
         f"{s['valid_next_session_targets']:,} / {s['test_next_session_targets']:,}"),
    ]
    for k, v in rows:
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    out.print(t)


def by_k_table(m: dict[str, float], title: str, ks: tuple[int, ...] = (5, 10, 20)) -> Table:
    """Rows = metrics, columns = cut-offs."""
    t = Table(title=title)
    t.add_column("metric")
    for k in ks:
        t.add_column(f"@{k}", justify="right")
    for name in ("recall", "mrr", "precision", "ndcg"):
        t.add_row(name, *(f"{m.get(f'{name}@{k}', float('nan')):.4f}" for k in ks))
    return t


# short column headers, so that the next-basket table fits 80 columns
SHORT = (("recall_repeat", "rep R"), ("recall_explore", "expl R"), ("repeat_share", "rep shr"), ("recall", "R"),
         ("ndcg", "NDCG"), ("phr", "PHR"), ("mrr", "MRR"), ("precision", "P"))


def short(metric: str) -> str:
    """recall_repeat@10 -> rep R@10, ndcg@10 -> NDCG@10, ..."""
    for long, abbrev in SHORT:
        if metric.startswith(long):
            return abbrev + metric[len(long):]
    return metric


def benchmark_table(res: dict, title: str, cols: tuple[str, ...]) -> Table:
    """Rows = a benchmark's models (+ HNVM's improvement), columns = the given metrics."""
    from hnvm import report

    t = Table(title=title)
    t.add_column("model")
    for c in cols:
        t.add_column(short(c), justify="right")
    t.add_column("train s", justify="right")
    for name, r in res["models"].items():
        mark = report.DAGGER if r["untuned"] else ""
        # .4197, not 0.4197: the columns stay narrow
        t.add_row(name + mark, *(f"{r['metrics'].get(c, float('nan')):.4f}".removeprefix("0") for c in cols),
                  f"{r['train_s']:.0f}")
    base = {c: report.best_baseline(res["models"], c) for c in cols}
    if "hnvm" in res["models"]:
        t.add_row("Improv.", *(report.improvement(res["models"], c) for c in cols), "")
        t.caption = "Improv.: hnvm relative to the best baseline of each column (" + ", ".join(
            f"{c}: {b}" for c, b in base.items()) + ")"
    return t
