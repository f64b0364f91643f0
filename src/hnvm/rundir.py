"""Reading a run directory (what `hnvm train` wrote): its config.json, its final model, and the
digests that tie a run to the data set it was trained on. Below `runs` (which writes runs) so
that the online engine can open a run without the training and evaluation code.

A run records two digests of its data set: `vocab_sha256` (item and user vocabularies) and
`train_sha256` (the training events). Evaluation refuses a data set whose train split differs:
its valid/test targets could be events the model was trained on.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import polars as pl

from hnvm.contract import Recommender
from hnvm.data.store import Dataset, read_json_object
from hnvm.errors import HnvmError
from hnvm.models.base import load_model

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


def has_checkpoint(run: Path) -> bool:
    return (run / "last" / "state.json").is_file()


def continue_hint(run: Path, cfg: dict[str, Any] | None) -> str:
    """How to go on with an unfinished run: resume from its checkpoint, or train it again."""
    cmd = (f"`hnvm train {cfg['dataset']['path']} --model {cfg['model']} --out {run}" if cfg
           else f"`hnvm train DATA --model MODEL --out {run}")
    if has_checkpoint(run):
        return f"continue it with {cmd} --resume` (same settings) or replace it with --force"
    return f"it has no checkpoint to resume from; replace it with {cmd} --force`"


def load_run(run: str | Path) -> tuple[Recommender, dict[str, Any]]:
    """The final model of a run and its config.json; one-line errors for a missing, unfinished
    or damaged run."""
    run = Path(run)
    cfg = read_run_config(run)
    if not (run / "model" / "model.json").exists():
        raise HnvmError(f"{run}: the run has no finished model (training did not complete); "
                        f"{continue_hint(run, cfg)}")
    return load_model(run / "model"), cfg
