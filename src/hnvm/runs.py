"""Run directories: `hnvm train` and `hnvm evaluate` as library functions.

    RUN/config.json        model name, model and train configs, dataset reference
    RUN/model/             the final model (model.json + model.safetensors)
    RUN/items.parquet      the item vocabulary (internal id -> original id)
    RUN/users.parquet      the user vocabulary
    RUN/last/, RUN/best/   training checkpoints (neural models)
    RUN/train_log.jsonl    one JSON line per epoch / logged step
    RUN/metrics.json       written by evaluate (one entry per task and split)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hnvm import distributed
from hnvm.config import apply_overrides, as_dict, build, load_toml
from hnvm.data.batches import Sequences
from hnvm.data.store import Dataset, write_json
from hnvm.errors import ConfigError, HnvmError
from hnvm.evaluate import EvalResult, evaluate_next_item, evaluate_next_session, export_ranks
from hnvm.models.base import Recommender, get_model_class, load_model
from hnvm.train import TrainConfig

log = logging.getLogger(__name__)

RUN_FORMAT = "hnvm-run"
RUN_VERSION = 1


def vocab_digest(ds: Dataset) -> str:
    """A checksum of the item and user vocabularies: a run only evaluates on matching data."""
    h = hashlib.sha256()
    for col in (ds.items.get_column("id"), ds.users.get_column("id")):
        h.update("\x1f".join(col.to_list()).encode())
        h.update(b"\x1e")
    return h.hexdigest()


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
    process runs this; rank 0 alone writes the run directory (see hnvm.distributed)."""
    out = Path(out)
    rc = resolve_config(model, config_path, overrides or [])
    ctx = distributed.context(rc.train.device)  # joins torchrun's process group, if any
    ds = Dataset.load(dataset)
    # every rank checks before rank 0 writes anything, so all ranks agree
    if out.exists() and not (resume or force):
        raise HnvmError(f"{out}: run directory exists (use --resume to continue or --force to replace)")
    ctx.barrier()
    cfg_json = {
        "format": RUN_FORMAT, "format_version": RUN_VERSION, "model": model,
        "model_config": as_dict(rc.model_config) if rc.model_config is not None else {},
        "train": as_dict(rc.train),
        "dataset": {"path": str(Path(dataset).resolve()), "vocab_sha256": vocab_digest(ds),
                    "stats": ds.meta.get("stats", {})},
    }

    def setup() -> None:
        if force and out.exists() and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / "config.json").exists():
            prev = json.loads((out / "config.json").read_text())
            if prev.get("dataset", {}).get("vocab_sha256") != cfg_json["dataset"]["vocab_sha256"]:
                raise HnvmError(f"{out}: --resume with a different dataset than the run was trained on")
        write_json(out / "config.json", cfg_json)
        ds.items.write_parquet(out / "items.parquet")
        ds.users.write_parquet(out / "users.parquet")

    ctx.main_first(setup)
    rec = make_model(rc)
    rec.fit(ds, ds, train_cfg=rc.train, run_dir=out, resume=resume, show_progress=show_progress)

    def save() -> None:
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rec.save(tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.rename(out / "model")

    ctx.main_first(save)
    return rec, out


def load_run(run: str | Path) -> tuple[Recommender, dict[str, Any]]:
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise HnvmError(f"{run}: not a run directory (no config.json); train one with `hnvm train`")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != RUN_FORMAT or cfg.get("format_version") != RUN_VERSION:
        raise HnvmError(f"{run}: run format {cfg.get('format')!r} version {cfg.get('format_version')!r} "
                        f"is not supported (expected {RUN_FORMAT} version {RUN_VERSION})")
    if not (run / "model" / "model.json").exists():
        raise HnvmError(f"{run}: the run has no finished model (training did not complete; "
                        "continue it with `hnvm train ... --resume`)")
    return load_model(run / "model"), cfg


def evaluate_run(
    run: str | Path,
    *,
    data: str | Path | None = None,
    task: str = "next-item",
    split: str = "test",
    export: Path | None = None,
    include_first: bool = False,
    device: str = "auto",
) -> EvalResult:
    """Evaluate a trained run on its dataset (or `data`, whose vocabulary must match) on
    `device`. Under torchrun the targets are sharded over the processes; rank 0 writes."""
    run = Path(run)
    ctx = distributed.context(device)
    model, cfg = load_run(run)
    if ctx.device.type != "cpu" and callable(getattr(model, "to", None)):
        model.to(ctx.device)  # type: ignore[attr-defined]
    ds = Dataset.load(data or cfg["dataset"]["path"])
    if vocab_digest(ds) != cfg["dataset"]["vocab_sha256"]:
        raise HnvmError(f"{data or cfg['dataset']['path']}: item/user vocabulary does not match the "
                        f"one {run} was trained on; prepare the data with the same settings")
    if task not in ("next-item", "next-session") or split not in ("valid", "test"):
        raise HnvmError("--task must be next-item|next-session and --split valid|test")
    seq = Sequences.from_events(ds.events, ds.n_users)
    if task == "next-item":
        res = evaluate_next_item(model, seq, split, keep_ranks=export is not None,
                                 include_first=include_first)
    else:
        res = evaluate_next_session(model, seq, split, keep_ranks=export is not None)

    def write() -> None:
        if export is not None:
            export_ranks(res, Path(export))
        mpath = run / "metrics.json"
        allm = json.loads(mpath.read_text()) if mpath.exists() else {}
        allm[f"{task}/{split}"] = res.to_json()
        write_json(mpath, allm)

    ctx.main_first(write)
    return res
