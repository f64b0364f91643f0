"""Run directories: `hnvm train` and `hnvm evaluate` as library functions.

    RUN/config.json        model name, model and train configs, dataset reference (path, digests)
    RUN/model/             the final model (model.json + model.safetensors)
    RUN/items.parquet      the item vocabulary (internal id -> original id)
    RUN/users.parquet      the user vocabulary
    RUN/last/, RUN/best/   training checkpoints (neural models)
    RUN/train_log.jsonl    one JSON line per epoch / logged step
    RUN/metrics.json       written by evaluate (one entry per task and split, with the data set used)

A run records two digests of its data set: `vocab_sha256` (item and user vocabularies) and
`train_sha256` (the training events). Evaluation refuses a data set whose train split differs:
its valid/test targets could be events the model was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from hnvm import distributed
from hnvm.config import apply_overrides, as_dict, build, load_toml
from hnvm.data.batches import Sequences
from hnvm.data.store import Dataset, check_output_dir, check_output_file, read_json_object, write_json
from hnvm.errors import ConfigError, HnvmError, one_line
from hnvm.evaluate import EvalResult, evaluate_next_item, evaluate_next_session, export_ranks
from hnvm.models.base import Recommender, get_model_class, load_model
from hnvm.train import TrainConfig

log = logging.getLogger(__name__)

RUN_FORMAT = "hnvm-run"
RUN_VERSION = 1

# train settings that may differ on `--resume` (more epochs, other patience, logging, where it
# runs); every other one (optimizer, lr, seed, metric, ...) and every model setting must equal
# the run's, or the checkpoint would continue under settings it was not trained with
RESUMABLE_TRAIN_KEYS = ("epochs", "patience", "log_every", "device", "bf16")


def vocab_digest(ds: Dataset) -> str:
    """A checksum of the item and user vocabularies: a run only evaluates on matching data."""
    h = hashlib.sha256()
    for col in (ds.items.get_column("id"), ds.users.get_column("id")):
        h.update("\x1f".join(col.to_list()).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def _events_digest(ds: Dataset, events: pl.DataFrame, tag: bytes, columns: dict[str, pl.Expr]) -> str:
    """sha256 of the vocabularies and fixed-width little-endian columns of `events` (sorted by
    the caller): independent of file paths and parquet encoding."""
    h = hashlib.sha256(tag)
    h.update(vocab_digest(ds).encode())  # internal ids -> original ids, so equal digests = equal raw ids
    frame = events.select(**columns)
    for name in frame.columns:
        arr = frame.get_column(name).to_numpy().astype("<i8")
        h.update(f"{name}:{len(arr)}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def train_digest(ds: Dataset) -> str:
    """A checksum of the training events that identifies the training data exactly: for each
    user, its train sessions in order (rank among the user's train sessions, not the global
    session number, which valid/test sessions shift), each event's item, ts and position."""
    ev = ds.events.filter(pl.col("split") == "train").sort("user", "session", "pos")
    return _events_digest(ds, ev, b"hnvm-train-events-v1", {
        "user": pl.col("user"), "session": pl.col("session").rank("dense").over("user"),
        "item": pl.col("item"), "ts": pl.col("ts"), "pos": pl.col("pos")})


def data_digest(ds: Dataset) -> str:
    """A checksum of every event of a data set (all splits): what an evaluation scored."""
    ev = ds.events.sort("session", "pos")
    return _events_digest(ds, ev, b"hnvm-events-v1", {
        "user": pl.col("user"), "session": pl.col("session"), "item": pl.col("item"), "ts": pl.col("ts"),
        "pos": pl.col("pos"), "split": pl.col("split").cast(pl.Utf8).replace_strict(
            {"train": 0, "valid": 1, "test": 2}, return_dtype=pl.Int8)})


def check_dataset(run: str | Path, cfg: dict[str, Any], ds: Dataset, path: str | Path) -> None:
    """Refuse a data set `run` cannot be evaluated on: another vocabulary, or another train split
    (its targets could be training events of the run). A run made before train digests were
    recorded is checked on the vocabulary alone, with a warning."""
    ref = cfg.get("dataset") or {}
    if vocab_digest(ds) != ref.get("vocab_sha256"):
        raise HnvmError(f"{path}: item/user vocabulary does not match the one {run} was trained on; "
                        "prepare the data with the same settings")
    want = ref.get("train_sha256")
    if want is None:
        log.warning("%s: the run predates train-split digests; only the vocabulary of %s is checked "
                    "(retrain the run to have its train split checked too)", run, path)
    elif train_digest(ds) != want:
        raise HnvmError(f"{path}: its train split differs from the one {run} was trained on (other events, "
                        "sessions or split), so its targets could be training events of the run; evaluate "
                        "on the run's own data set or prepare this one with the same settings")


@dataclass
class RunConfig:
    model: str
    model_config: Any
    train: TrainConfig


def resolve_config(model: str, config_path: Path | None, overrides: list[str]) -> RunConfig:
    """Merge a TOML file ([model], [train], optional [model.NAME] sections) and --set."""
    cls = get_model_class(model)
    tree: dict[str, Any] = load_toml(config_path) if config_path else {}
    unknown = set(tree) - {"model", "train"}
    if unknown:
        raise ConfigError(f"{config_path}: unknown section(s) {', '.join(sorted(unknown))} "
                          "(valid: [model], [train])")
    tree = apply_overrides(tree, overrides)
    model_vals = {k: v for k, v in tree.get("model", {}).items() if not isinstance(v, dict)}
    # per-model sections, e.g. [model.hnvm], override the shared [model] keys for that model
    model_vals.update(tree.get("model", {}).get(model, {}))
    config_cls = getattr(cls, "config_class", None)
    if config_cls is None:
        if model_vals:
            raise ConfigError(f"model '{model}' has no hyper-parameters; remove "
                              f"{', '.join('model.' + k for k in model_vals)}")
        model_cfg = None
    else:
        model_cfg = build(config_cls, model_vals, "model")
    return RunConfig(model, model_cfg, build(TrainConfig, tree.get("train", {}), "train"))


def make_model(rc: RunConfig) -> Recommender:
    cls = get_model_class(rc.model)
    return cls(rc.model_config) if rc.model_config is not None else cls()


def read_run_config(run: str | Path) -> dict[str, Any]:
    """RUN/config.json, checked for format, version and the keys every reader needs."""
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise HnvmError(f"{run}: not a run directory (no config.json); train one with `hnvm train`")
    cfg = read_json_object(cfg_path, "run config")
    if cfg.get("format") != RUN_FORMAT or cfg.get("format_version") != RUN_VERSION:
        raise HnvmError(f"{run}: run format {cfg.get('format')!r} version {cfg.get('format_version')!r} "
                        f"is not supported (expected {RUN_FORMAT} version {RUN_VERSION})")
    ds = cfg.get("dataset")
    if not isinstance(cfg.get("model"), str) or not isinstance(ds, dict) or not isinstance(ds.get("path"), str) \
            or not isinstance(cfg.get("model_config", {}), dict) or not isinstance(cfg.get("train", {}), dict):
        raise HnvmError(f"{cfg_path}: damaged run config (needs model, model_config, train and dataset.path)")
    return cfg


def _has_checkpoint(run: Path) -> bool:
    return (run / "last" / "state.json").is_file()


def _continue_hint(run: Path, cfg: dict[str, Any] | None) -> str:
    """How to go on with an unfinished run: resume from its checkpoint, or train it again."""
    cmd = (f"`hnvm train {cfg['dataset']['path']} --model {cfg['model']} --out {run}" if cfg
           else f"`hnvm train DATA --model MODEL --out {run}")
    if _has_checkpoint(run):
        return f"continue it with {cmd} --resume` (same settings) or replace it with --force"
    return f"it has no checkpoint to resume from; replace it with {cmd} --force`"


def _replaceable(out: Path) -> bool:
    """A directory --force may delete: a run (config.json), or one holding only the temporary
    files of a run killed before its config.json was in place."""
    return out.is_dir() and ((out / "config.json").exists()
                             or all(p.name.startswith(".") and ".tmp" in p.name for p in out.iterdir()))


def _existing_run_error(out: Path) -> HnvmError:
    """The error for `train` into an existing directory: what is there and what to do."""
    if not out.is_dir():
        return HnvmError(f"{out}: exists and is not a directory; choose another --out")
    if not (out / "config.json").exists():
        if _replaceable(out):
            return HnvmError(f"{out}: a run killed before it started exists there; replace it with --force")
        return HnvmError(f"{out}: exists and is not a run directory (no config.json); choose another --out")
    if (out / "model" / "model.json").exists():
        extra = ", or --resume to train it further from last/" if _has_checkpoint(out) else ""
        return HnvmError(f"{out}: a trained run exists there (use --force to replace it{extra})")
    try:
        cfg: dict[str, Any] | None = read_run_config(out)
    except HnvmError:
        cfg = None
    return HnvmError(f"{out}: an unfinished run exists there (training did not complete); {_continue_hint(out, cfg)}")


def _diff(prev: dict[str, Any], want: dict[str, Any], section: str, keys: set[str] | None = None) -> list[str]:
    """'section.key: prev -> want' for each differing key (all keys, or only `keys`)."""
    names = sorted((set(prev) | set(want)) if keys is None else keys)
    return [f"{section}.{k}: {prev.get(k)!r} -> {want.get(k)!r}" for k in names if prev.get(k) != want.get(k)]


def _check_resume(out: Path, cfg_json: dict[str, Any], ds: Dataset) -> None:
    """--resume continues only the same model, with the same settings (less RESUMABLE_TRAIN_KEYS),
    on the same training data, from an existing checkpoint; checked before anything is written."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        raise HnvmError(f"{out}: no run to resume; train it without --resume")
    prev = read_run_config(out)
    if not _has_checkpoint(out):
        raise HnvmError(f"{out}: nothing to resume (no checkpoint in last/; model {prev['model']} "
                        f"{'was trained without checkpoints' if (out / 'model').exists() else 'saved none'}); "
                        f"train it again with --force")
    if prev["model"] != cfg_json["model"]:
        raise HnvmError(f"{out}: --resume of a {prev['model']} run with --model {cfg_json['model']}; "
                        f"use --model {prev['model']} or another --out")
    norm = json.loads(json.dumps(cfg_json))  # tuples -> lists, as stored
    diffs = _diff(prev.get("model_config", {}), norm["model_config"], "model")
    fixed = (set(prev.get("train", {})) | set(norm["train"])) - set(RESUMABLE_TRAIN_KEYS)
    diffs += _diff(prev.get("train", {}), norm["train"], "train", fixed)
    if diffs:
        raise HnvmError(f"{out}: --resume with settings other than the run's ({'; '.join(diffs)}); resume with "
                        f"the run's settings (only train.{', train.'.join(RESUMABLE_TRAIN_KEYS)} may change) "
                        "or train into another --out")
    ref, now = prev["dataset"], cfg_json["dataset"]
    if ref.get("vocab_sha256") != now["vocab_sha256"] or (
            ref.get("train_sha256") is not None and ref["train_sha256"] != now["train_sha256"]):
        raise HnvmError(f"{out}: --resume with a different dataset (train split or vocabulary) than the run "
                        f"was trained on ({ref.get('path')})")


def train_run(
    dataset: str | Path,
    model: str,
    out: str | Path,
    *,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = False,
) -> tuple[Recommender, Path]:
    """Train `model` on a prepared dataset; write the run directory. Under torchrun every
    process runs this; rank 0 alone writes the run directory (see hnvm.distributed).

    Every check (settings, dataset, the directory, --resume compatibility) runs on every rank
    before anything is written; a failed check leaves the directory as it was."""
    out = Path(out)
    if resume and force:
        raise HnvmError("give --resume (continue the run) or --force (replace it), not both")
    rc = resolve_config(model, config_path, overrides or [])
    # never the dataset's folder (nor one holding it), a dataset, or a place inside one
    check_output_dir(out, "--out", inputs=(Path(dataset),), may_be=("run",))
    ctx = distributed.context(rc.train.device)  # joins torchrun's process group, if any
    ds = Dataset.load(dataset)
    cfg_json = {
        "format": RUN_FORMAT, "format_version": RUN_VERSION, "model": model,
        "model_config": as_dict(rc.model_config) if rc.model_config is not None else {},
        "train": as_dict(rc.train),
        "dataset": {"path": str(Path(dataset).resolve()), "vocab_sha256": vocab_digest(ds),
                    "train_sha256": train_digest(ds), "stats": ds.meta.get("stats", {})},
    }
    empty_dir = out.is_dir() and not any(out.iterdir())
    if resume:
        _check_resume(out, cfg_json, ds)
    elif out.exists() and not empty_dir:
        err = _existing_run_error(out)
        # --force replaces a run (finished or not), never some other directory or file
        if not force or not _replaceable(out):
            raise err
    ctx.barrier()

    def setup() -> None:
        if force and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run keeps its config until the resumed training succeeds
            write_json(out / "config.json", cfg_json)
            _write_parquet(ds.items, out / "items.parquet")
            _write_parquet(ds.users, out / "users.parquet")

    ctx.main_first(setup)
    rec = make_model(rc)
    rec.fit(ds, ds, train_cfg=rc.train, run_dir=out, resume=resume, show_progress=show_progress)

    def save() -> None:
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rec.save(tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.rename(out / "model")
        if resume:  # now the run's config: the resumable train settings may have changed
            write_json(out / "config.json", cfg_json)

    ctx.main_first(save)
    return rec, out


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def load_run(run: str | Path) -> tuple[Recommender, dict[str, Any]]:
    """The final model of a run and its config.json; one-line errors for a missing, unfinished
    or damaged run."""
    run = Path(run)
    cfg = read_run_config(run)
    if not (run / "model" / "model.json").exists():
        raise HnvmError(f"{run}: the run has no finished model (training did not complete); "
                        f"{_continue_hint(run, cfg)}")
    return load_model(run / "model"), cfg


def _with_original_ids(res: EvalResult, ds: Dataset) -> EvalResult:
    """The export with the raw log's ids beside the internal ones (`user_id`, and `item_id` for
    next-item targets), exactly as written in the log."""
    assert res.ranks is not None
    users = ds.users.select(user=pl.col("user").cast(res.ranks.schema["user"]), user_id=pl.col("id"))
    ranks = res.ranks.join(users, on="user", how="left", maintain_order="left")
    if "item" in ranks.columns:
        items = ds.items.select(item=pl.col("item").cast(ranks.schema["item"]), item_id=pl.col("id"))
        ranks = ranks.join(items, on="item", how="left", maintain_order="left")
    return dataclasses.replace(res, ranks=ranks)


def _sources(ds: Dataset) -> tuple[Path, ...]:
    """The raw log a data set was prepared from, if its meta.json names one."""
    src = ds.meta.get("source", {}).get("path") if isinstance(ds.meta.get("source"), dict) else None
    return (Path(src),) if isinstance(src, str) and src else ()


def _read_metrics(run: Path) -> dict[str, Any]:
    mpath = run / "metrics.json"
    if not mpath.exists():
        return {}
    try:
        return read_json_object(mpath, "metrics file")
    except HnvmError as exc:
        raise HnvmError(f"{exc}; move it away to record new metrics") from exc


def evaluate_run(
    run: str | Path,
    *,
    data: str | Path | None = None,
    task: str = "next-item",
    split: str = "test",
    export: Path | None = None,
    include_first: bool = False,
    device: str = "auto",
    force: bool = False,
) -> EvalResult:
    """Evaluate a trained run on its dataset (or `data`, whose vocabulary and train split must
    match the run's) on `device`. Under torchrun the targets are sharded over the processes;
    rank 0 writes. Everything that could refuse (the run, the data, metrics.json, the export
    destination, a split without targets) is checked before anything is written; metrics.json
    is written before the ranks export, so a failed export never loses the metrics."""
    run = Path(run)
    if task not in ("next-item", "next-session") or split not in ("valid", "test"):
        raise HnvmError("--task must be next-item|next-session and --split valid|test")
    export = Path(export) if export is not None else None
    ctx = distributed.context(device)
    model, cfg = load_run(run)
    _read_metrics(run)  # a damaged metrics.json stops us before the evaluation, not after
    data_path = Path(data) if data is not None else Path(cfg["dataset"]["path"])
    ds = Dataset.load(data_path)
    if export is not None:  # an existing export needs `force`; the run's and data's files never go
        check_output_file(export, "--export-ranks", force=force, inputs=_sources(ds))
    check_dataset(run, cfg, ds, data_path)
    if ctx.device.type != "cpu" and callable(getattr(model, "to", None)):
        model.to(ctx.device)  # type: ignore[attr-defined]
    seq = Sequences.from_events(ds.events, ds.n_users)
    if task == "next-item":
        res = evaluate_next_item(model, seq, split, keep_ranks=export is not None,
                                 include_first=include_first)
    else:
        res = evaluate_next_session(model, seq, split, keep_ranks=export is not None)
    if res.n_targets == 0:  # metrics of nothing would be NaN / missing
        first = " (positions >= 2; --include-first adds position 1)" if task == "next-item" and not \
            include_first else ""
        raise HnvmError(f"{data_path}: the {split} split has no {task} targets{first}; nothing to evaluate")
    entry = res.to_json()
    if task == "next-item":
        entry["include_first"] = include_first
    entry["dataset"] = {"path": str(data_path.resolve()), "sha256": data_digest(ds),
                        "train_sha256": cfg["dataset"].get("train_sha256") or train_digest(ds)}

    def write() -> None:
        mpath = run / "metrics.json"
        allm = _read_metrics(run)
        allm[f"{task}/{split}"] = entry
        write_json(mpath, allm)
        if export is not None:
            try:
                export.parent.mkdir(parents=True, exist_ok=True)
                export_ranks(_with_original_ids(res, ds), export)
            except OSError as exc:
                raise HnvmError(f"--export-ranks {export}: cannot write ({one_line(exc)}); "
                                f"the metrics were saved in {mpath}") from exc

    ctx.main_first(write)
    return res
