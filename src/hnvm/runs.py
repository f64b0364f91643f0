"""Run directories: `hnvm train` and `hnvm evaluate` as library functions.

    RUN/config.json        model name, model and train configs, dataset reference (path, digests)
    RUN/model/             the final model (model.json + model.safetensors)
    RUN/items.parquet      the item vocabulary (internal id -> original id)
    RUN/users.parquet      the user vocabulary
    RUN/last/, RUN/best/   training checkpoints (neural models)
    RUN/train_log.jsonl    one JSON line per epoch / logged step
    RUN/metrics.json       written by evaluate (one entry per task and split, with the data set used)

Reading a run (its config, model and data digests) is `hnvm.rundir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from hnvm import distributed
from hnvm.atomic import atomic_dir, atomic_file, atomic_json
from hnvm.config import apply_overrides, as_dict, build, load_toml
from hnvm.contract import Recommender
from hnvm.data.batches import Sequences
from hnvm.data.splits import NO_SESSION_TASK
from hnvm.data.store import Dataset, check_output_dir, check_output_file, read_json_object
from hnvm.errors import ConfigError, HnvmError, one_line
from hnvm.evaluate import EvalResult, ValidationPolicy, evaluate_next_item, evaluate_next_session, export_ranks
from hnvm.models.base import get_model_class
from hnvm.rundir import (
    RUN_FORMAT,
    RUN_VERSION,
    check_dataset,
    continue_hint,
    data_digest,
    has_checkpoint,
    load_run,
    read_run_config,
    train_digest,
    vocab_digest,
)
from hnvm.training import EpochCallback, ProgressCallback, TrainConfig

log = logging.getLogger(__name__)

# train settings that may differ on `--resume` (more epochs, other patience, logging, where it
# runs); every other one (optimizer, lr, seed, metric, ...) and every model setting must equal
# the run's, or the checkpoint would continue under settings it was not trained with
RESUMABLE_TRAIN_KEYS = ("epochs", "patience", "log_every", "device", "bf16")


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
        extra = ", or --resume to train it further from last/" if has_checkpoint(out) else ""
        return HnvmError(f"{out}: a trained run exists there (use --force to replace it{extra})")
    try:
        cfg: dict[str, Any] | None = read_run_config(out)
    except HnvmError:
        cfg = None
    return HnvmError(f"{out}: an unfinished run exists there (training did not complete); {continue_hint(out, cfg)}")


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
    if not has_checkpoint(out):
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
    on_progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    loaded: tuple[Dataset, Sequences] | None = None,
) -> tuple[Recommender, Path]:
    """Train `model` on a prepared dataset; write the run directory. Under torchrun every
    process runs this; rank 0 alone writes the run directory (see hnvm.distributed).
    Early stopping reads validation of the task train.validate (`validation_policy`); on_progress/on_epoch
    are the training loop's callbacks; `loaded` is the dataset (and its Sequences) when the
    caller has already loaded `dataset`.

    Every check (settings, dataset, the directory, --resume compatibility) runs on every rank
    before anything is written; a failed check leaves the directory as it was."""
    out = Path(out)
    if resume and force:
        raise HnvmError("give --resume (continue the run) or --force (replace it), not both")
    rc = resolve_config(model, config_path, overrides or [])
    # never the dataset's folder (nor one holding it), a dataset, or a place inside one
    check_output_dir(out, "--out", inputs=(Path(dataset),), may_be=("run",))
    ctx = distributed.context(rc.train.device)  # joins torchrun's process group, if any
    ds, seq = loaded if loaded is not None else (Dataset.load(dataset), None)
    validation = validation_policy(rc.train, ds, dataset)
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
            atomic_json(out / "config.json", cfg_json)
            for frame, name in ((ds.items, "items.parquet"), (ds.users, "users.parquet")):
                atomic_file(out / name, frame.write_parquet)

    ctx.main_first(setup)
    rec = make_model(rc)
    rec.fit(ds, train_cfg=rc.train, validation=validation, seq=seq, run_dir=out, resume=resume,
            show_progress=show_progress, on_progress=on_progress, on_epoch=on_epoch)

    def save() -> None:
        atomic_dir(out / "model", rec.save)
        if resume:  # now the run's config: the resumable train settings may have changed
            atomic_json(out / "config.json", cfg_json)

    ctx.main_first(save)
    return rec, out


def validation_policy(train: TrainConfig, ds: Dataset, dataset: str | Path) -> ValidationPolicy:
    """What early stopping reads: train.validate's task on the validation split; the next-session
    task on a held-out-item split is refused (HnvmError)."""
    if train.validate == "next-session" and ds.held_out_items:
        raise HnvmError(f"{dataset}: train.validate = next-session: {NO_SESSION_TASK}")
    return ValidationPolicy(task=train.validate)


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
    keep_ranks: bool = False,
    loaded: tuple[Dataset, Sequences] | None = None,
) -> EvalResult:
    """Evaluate a trained run on its dataset (or `data`, whose vocabulary and train split must
    match the run's) on `device`. Under torchrun the targets are sharded over the processes;
    rank 0 writes. Everything that could refuse (the run, the data, metrics.json, the export
    destination, a split without targets) is checked before anything is written; metrics.json
    is written before the ranks export, so a failed export never loses the metrics.
    keep_ranks: also return the per-target ranks without exporting them; `loaded`: `data` (or
    the run's dataset) and its Sequences when the caller has already loaded them."""
    run = Path(run)
    if task not in ("next-item", "next-session") or split not in ("valid", "test"):
        raise HnvmError("--task must be next-item|next-session and --split valid|test")
    export = Path(export) if export is not None else None
    ctx = distributed.context(device)
    model, cfg = load_run(run)
    _read_metrics(run)  # a damaged metrics.json stops us before the evaluation, not after
    data_path = Path(data) if data is not None else Path(cfg["dataset"]["path"])
    ds, seq = loaded if loaded is not None else (Dataset.load(data_path), None)
    if export is not None:  # an existing export needs `force`; the run's and data's files never go
        check_output_file(export, "--export-ranks", force=force, inputs=_sources(ds))
    check_dataset(run, cfg, ds, data_path)
    if task == "next-session" and ds.held_out_items:
        raise HnvmError(f"{data_path}: {NO_SESSION_TASK}")
    if ctx.device.type != "cpu" and callable(getattr(model, "to", None)):
        model.to(ctx.device)  # type: ignore[attr-defined]
    seq = seq if seq is not None else Sequences.from_events(ds.events, ds.n_users, ds.held_out_items)
    keep = keep_ranks or export is not None
    if task == "next-item":
        res = evaluate_next_item(model, seq, split, keep_ranks=keep, include_first=include_first)
    else:
        res = evaluate_next_session(model, seq, split, keep_ranks=keep)
    if res.n_targets == 0:  # metrics of nothing would be NaN / missing
        first = " (positions >= 2; --include-first adds position 1)" if task == "next-item" and not \
            include_first else ""
        raise HnvmError(f"{data_path}: the {split} split has no {task} targets{first}; nothing to evaluate")
    diagnostics = getattr(model, "latent_diagnostics", None)
    if callable(diagnostics):  # HNVM: what its latents carry (KL/dim, active units, MI)
        res.extra["latent"] = diagnostics(ds, seq)
    entry = res.to_json()
    if task == "next-item":
        entry["include_first"] = include_first
    entry["dataset"] = {"path": str(data_path.resolve()), "sha256": data_digest(ds),
                        "train_sha256": cfg["dataset"].get("train_sha256") or train_digest(ds)}

    def write() -> None:
        mpath = run / "metrics.json"
        allm = _read_metrics(run)
        allm[f"{task}/{split}"] = entry
        atomic_json(mpath, allm)
        if export is not None:
            try:
                export.parent.mkdir(parents=True, exist_ok=True)
                export_ranks(_with_original_ids(res, ds), export)
            except OSError as exc:
                raise HnvmError(f"--export-ranks {export}: cannot write ({one_line(exc)}); "
                                f"the metrics were saved in {mpath}") from exc

    ctx.main_first(write)
    return res
