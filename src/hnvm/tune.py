"""`hnvm tune`: Optuna search of a model's hyper-parameters on the validation split.

The search space comes from the model's config dataclass: every field with `range` or
`choices` metadata is searched, except what `EXCLUDE` drops, with ranges narrowed by
`OVERRIDE` (runtime-exploding sizes, leaky or structural switches). Models trained by the
generic Trainer (their `fit` takes `train_cfg`) also search `train.lr` and `train.optimizer`.
Keys fixed by the base config (`--config`, `--set`) are never searched.

    OUT/optuna.db    the study (sqlite; study name = model); a rerun resumes it
    OUT/best.toml    [model] and [train]: the base settings merged with the best trial's
    OUT/trials.csv   one row per trial: number, state, value, then one column per parameter

Trial 0 of a new study is the model's defaults (so tuning never reports less than the defaults
on validation). Trials of Trainer-fitted models report validation MRR@5 after every epoch: a
median pruner stops the clearly bad ones after their second epoch, and `trial_timeout` ends a
trial after the epoch that crosses it (scored on its best epoch so far).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import itertools
import logging
import math
import os
import re
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hnvm.config import apply_overrides, as_dict, load_toml
from hnvm.data.store import check_output_dir
from hnvm.errors import HnvmError, one_line

log = logging.getLogger(__name__)

OBJECTIVE = "mrr@5"  # validation next-item MRR@5, full ranking

# fields never searched: seeds, leaky or structural switches, inference-only knobs
EXCLUDE_ALL = frozenset({"seed", "train_on", "use_valid", "mc_samples", "sample_cache_size",
                         "session_order"})
EXCLUDE: dict[str, frozenset[str]] = {
    "gru4rec": frozenset({"embedding"}),  # constrained_embedding (default) ignores it
    # unknown_user_rate: validation users are all known, so the objective cannot judge cold start
    "hnvm": frozenset({"max_len", "kl_anneal_steps", "unknown_user_rate"}),
    "hrnn": frozenset({"max_len"}),
    "stamp": frozenset({"max_len"}),
}

# (lo, hi) sub-ranges, inside the field's own range, that keep a trial's runtime sensible
_SIZES = {"hidden": (16, 256), "emb_dim": (16, 256), "mlp_hidden": (16, 256), "d_e": (4, 128),
          "d_z": (4, 128), "batch_size": (16, 512), "n_negatives": (32, 4096), "window": (2, 16),
          "bpreg": (0.01, 10.0), "elu_p": (0.0, 2.0), "logq": (0.0, 1.0)}
OVERRIDE: dict[str, dict[str, tuple[float, float]]] = {
    "hnvm": _SIZES,
    "hrnn": {**_SIZES, "session_hidden": (16, 256), "user_hidden": (16, 256)},
    "gru4rec": {**_SIZES, "n_sample": (0, 4096)},
    "stamp": {**_SIZES, "d": (16, 256)},
    "caser": {"L": (1, 10), "T": (1, 5), "d": (8, 256), "nv": (1, 16), "nh": (4, 64),
              "n_negatives": (1, 64), "batch_size": (64, 1024)},
    "bprmf": {"dim": (8, 256), "reg": (1e-7, 0.1), "n_neg": (1, 32), "batch_size": (256, 8192),
              "init_std": (1e-4, 0.1)},
    "ncf": {"factors": (8, 128), "mlp_layers": (1, 4), "n_neg": (1, 16),
            "batch_size": (256, 8192), "init_std": (1e-4, 0.1)},
    "itemknn": {"neighbours": (10, 1000)},
    "sknn": {"k": (10, 500), "sample_size": (100, 5000)},
}
# train.* parameters searched for models fitted by the generic Trainer
TRAIN_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"range": (1e-4, 1e-1)},
    "optimizer": {"choices": ("adagrad", "adam")},
}


@dataclass(frozen=True)
class Param:
    """One searched parameter: `name` is dotted (model.hidden, train.lr)."""

    name: str
    kind: str  # "int" | "float" | "categorical"
    lo: float = 0.0
    hi: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.lo), int(self.hi), log=self.log)
        return trial.suggest_float(self.name, self.lo, self.hi, log=self.log)


def _param(name: str, hint: Any, meta: dict[str, Any], override: tuple[float, float] | None) -> Param | None:
    if "choices" in meta:
        return Param(name, "categorical", choices=tuple(meta["choices"]))
    if "range" not in meta:
        return None
    lo, hi = meta["range"]
    if override is not None:
        olo, ohi = override
        if not lo <= olo <= ohi <= hi:
            raise ValueError(f"{name}: search range [{olo}, {ohi}] is outside [{lo}, {hi}]")
        lo, hi = olo, ohi
    is_int = "int" in str(hint) and "float" not in str(hint)
    if is_int:
        lo, hi = int(lo), int(hi)
    # log scale for positive ranges spanning two decades or more (lr, regularisers, sizes)
    log_scale = lo > 0 and hi / lo >= 100
    return Param(name, "int" if is_int else "float", lo, hi, log_scale)


def space_from_config(cls: type, section: str = "model", *, exclude: frozenset[str] = frozenset(),
                      override: dict[str, tuple[float, float]] | None = None) -> list[Param]:
    """The searchable fields of a config dataclass (range -> int/float, choices -> categorical)."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.name in EXCLUDE_ALL:
            continue
        p = _param(f"{section}.{f.name}", hints[f.name], dict(f.metadata), (override or {}).get(f.name))
        if p is not None:
            out.append(p)
    return out


def uses_trainer(cls: Any) -> bool:
    """Fitted by the generic Trainer (SGD): its `fit` takes a `train_cfg`."""
    return "train_cfg" in inspect.signature(cls.fit).parameters


def search_space(model: str, fixed: frozenset[str] = frozenset()) -> list[Param]:
    """What `tune` searches for `model`, less the dotted keys in `fixed`."""
    from hnvm.models.base import get_model_class
    from hnvm.train import TrainConfig

    cls = get_model_class(model)
    config_cls = getattr(cls, "config_class", None)
    space = [] if config_cls is None else space_from_config(
        config_cls, exclude=EXCLUDE.get(model, frozenset()), override=OVERRIDE.get(model))
    if config_cls is not None and uses_trainer(cls):
        hints = get_type_hints(TrainConfig)
        for name, meta in TRAIN_SPACE.items():
            p = _param(f"train.{name}", hints[name], meta, None)
            assert p is not None
            space.append(p)
    space = [p for p in space if p.name not in fixed]
    if not space:
        raise HnvmError(f"model '{model}' has nothing to tune" + (
            " (every searchable key is fixed by the base config)" if fixed else
            " (it has no hyper-parameters); train it directly with `hnvm train`"))
    return space


def default_params(model: str, space: list[Param]) -> dict[str, Any]:
    """The model's (and TrainConfig's) defaults for the searched keys, clipped into their ranges."""
    from hnvm.models.base import get_model_class
    from hnvm.train import TrainConfig

    defaults = {"model": get_model_class(model).config_class(), "train": TrainConfig()}
    out: dict[str, Any] = {}
    for p in space:
        section, key = p.name.split(".", 1)
        v = getattr(defaults[section], key)
        if p.kind == "categorical":
            if v in p.choices:
                out[p.name] = v
        elif v is not None:
            v = min(max(v, p.lo), p.hi)
            out[p.name] = int(v) if p.kind == "int" else float(v)
    return out


def base_settings(model: str, config_path: Path | None, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """{'model': {...}, 'train': {...}}: what the config file and --set fix for `model`."""
    tree: dict[str, Any] = load_toml(config_path) if config_path else {}
    tree = apply_overrides(tree, overrides)
    mod = {k: v for k, v in tree.get("model", {}).items() if not isinstance(v, dict)}
    mod.update(tree.get("model", {}).get(model, {}))
    return {"model": mod, "train": dict(tree.get("train", {}))}


# ----------------------------------------------------------------------------- outputs

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(sections: dict[str, dict[str, Any]], header: str = "") -> str:
    lines = [f"# {h}" for h in header.splitlines()]
    for name, values in sections.items():
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in sorted(values.items()) if v is not None]
    return "\n".join(lines).lstrip("\n") + "\n"


def trials_csv(study: Any, names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["number", "state", "value", *names])
    for t in study.get_trials(deepcopy=False):
        w.writerow([t.number, t.state.name, "" if t.value is None else repr(t.value),
                    *(t.params.get(n, "") for n in names)])
    return buf.getvalue()


# ----------------------------------------------------------------------------- the output folder

OUTPUTS = ("optuna.db", "best.toml", "trials.csv")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _studies_in(db: Path, flag: str) -> list[str]:
    """The study names in an existing optuna.db, read without changing it; anything that is not
    an Optuna SQLite study database (a text file, a damaged or foreign database) is refused."""
    bad = f"{flag}: {db} is not an Optuna study database"
    hint = "; move it away or tune into another --out"
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise HnvmError(f"{bad} ({exc.strerror or exc}){hint}") from None
    if not head:
        return []  # an empty file is an empty SQLite database
    if head != _SQLITE_MAGIC:
        raise HnvmError(f"{bad} (not an SQLite file){hint}")
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(db.resolve()))}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return []
            if "studies" not in tables:
                raise HnvmError(f"{bad} (it holds other tables: {', '.join(sorted(tables)[:5])}){hint}")
            return [r[0] for r in conn.execute("SELECT study_name FROM studies")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise HnvmError(f"{bad} (damaged: {exc}){hint}") from None


def _toml_model(path: Path) -> str | None:
    """The model a best.toml written by `tune` is for (its header), else None."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"# hnvm tune --model (\S+):", first)
    return m.group(1) if m else None


def check_tune_out(out: Path, model: str, *, inputs: tuple[Path, ...] = (), flag: str = "--out") -> None:
    """Refuse `--out` before any trial: a file; a dataset or run directory, a place inside one or a
    folder holding the command's inputs; outputs that are not files; an optuna.db that is not an
    Optuna study database; a study (or best.toml) there of another model."""
    out = Path(out)
    check_output_dir(out, flag, inputs=inputs)
    if not out.is_dir():
        return
    for name in OUTPUTS:
        if (out / name).exists() and not (out / name).is_file():
            raise HnvmError(f"{flag} {out}: {out / name} is not a file; move it away or tune into another --out")
    db = out / "optuna.db"
    studies = _studies_in(db, flag) if db.exists() else []
    other = sorted(set(studies) - {model})
    if other:
        raise HnvmError(f"{flag} {out}: the study there is of another model ({', '.join(other)}), not {model}; "
                        "tune into another --out")
    toml_model = _toml_model(out / "best.toml") if (out / "best.toml").exists() else None
    if toml_model is not None and toml_model != model:
        raise HnvmError(f"{flag} {out}: its best.toml is of another model ({toml_model}), not {model}; "
                        "tune into another --out")
    if not db.exists() and any((out / n).exists() for n in OUTPUTS[1:]):
        raise HnvmError(f"{flag} {out}: holds best.toml or trials.csv without their study optuna.db; "
                        "move them away or tune into another --out")


# ----------------------------------------------------------------------------- the search

def tune(
    dataset: str | Path,
    model: str,
    out: str | Path,
    trials: int,
    timeout: float | None = None,
    base_overrides: list[str] | None = None,
    seed: int = 0,
    show_progress: bool = False,
    *,
    config_path: Path | None = None,
    trial_timeout: float | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Search `model`'s hyper-parameters for validation MRR@5; `trials` is the total number of
    finished (complete or pruned) trials wanted, counting those of an earlier run in `out`.
    `timeout` stops starting trials after that many seconds; `trial_timeout` ends a trial after
    the epoch that crosses it. `on_step` gets a line when each trial starts and ends (epochs
    reach a `hnvm.train.report_progress` reporter); `show_progress` is passed to the trials'
    Trainer. Nothing is printed."""
    import optuna
    import sqlalchemy.exc

    from hnvm.data.batches import Sequences
    from hnvm.data.store import Dataset
    from hnvm.evaluate import evaluate_next_item
    from hnvm.runs import data_digest, make_model, resolve_config, vocab_digest
    from hnvm.train import TrainingDiverged, observe_epochs

    overrides = list(base_overrides or [])
    if trials < 1:
        raise HnvmError(f"--trials must be at least 1 (got {trials})")
    resolve_config(model, config_path, overrides)  # unknown model / bad base config fail here
    base = base_settings(model, config_path, overrides)
    fixed = frozenset(f"{s}.{k}" for s, vals in base.items() for k in vals)
    space = search_space(model, fixed)
    names = [p.name for p in space]
    out = Path(out)
    check_tune_out(out, model, inputs=(Path(dataset),) + ((Path(config_path),) if config_path else ()))
    ds = Dataset.load(dataset)
    seq = Sequences.from_events(ds.events, ds.n_users)
    if not len(seq.sessions_of("valid")):
        raise HnvmError(f"{dataset}: the dataset has no validation sessions to tune on")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HnvmError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    if not log.isEnabledFor(logging.INFO):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = out / "optuna.db"
    try:
        study = optuna.create_study(
            storage=f"sqlite:///{db.resolve()}", study_name=model, direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, ValueError) as exc:  # a damaged or foreign study
        raise HnvmError(f"--out {out}: cannot open the study {db} ({one_line(exc, 200)}); "
                        "move it away or tune into another --out") from exc
    if study.trials:  # resuming: a fresh seed, or the startup trials would repeat earlier ones
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    # a study only resumes with the same data, base settings and search space
    # (the events digest covers the train and valid splits: re-prepared data is another study)
    setup = {"dataset_vocab_sha256": vocab_digest(ds), "dataset_sha256": data_digest(ds), "space": names,
             "base": {s: {k: str(v) for k, v in vals.items()} for s, vals in base.items()},
             "objective": OBJECTIVE}
    prev = study.user_attrs.get("setup")
    if prev is None:
        study.set_user_attr("setup", setup)
    elif any(k in prev and prev[k] != v for k, v in setup.items()):  # studies of older versions lack keys
        diff = ", ".join(k for k in setup if k in prev and prev[k] != setup[k])
        raise HnvmError(f"{out}: the study there was run with a different {diff}; "
                        "tune into another --out directory")
    if not study.trials:
        study.enqueue_trial(default_params(model, space))

    def objective(trial: optuna.Trial) -> float:
        params = {p.name: p.suggest(trial) for p in space}
        rc = resolve_config(model, config_path, overrides + [f"{k}={v}" for k, v in params.items()])
        rec = make_model(rc)
        t0 = time.monotonic()
        say(f"trial {trial.number} ({next(started)} of {missing} to run): "
            + ", ".join(f"{k}={_short(v)}" for k, v in params.items()))

        def observe(epoch: int, record: dict[str, Any]) -> bool:
            trial.set_user_attr("epochs", epoch)  # how far the trial got (pruned or cut by the timeout)
            score = record.get("valid", {}).get(OBJECTIVE)
            if score is not None and not math.isnan(score):
                trial.report(score, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{OBJECTIVE} {score:.5f} after epoch {epoch}: below the median")
            return trial_timeout is not None and time.monotonic() - t0 > trial_timeout

        try:
            with observe_epochs(observe):
                rec.fit(ds, ds, train_cfg=rc.train, run_dir=None, show_progress=show_progress)
        except TrainingDiverged as exc:  # a bad lr: counts as a (pruned) trial, the study goes on
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        res = evaluate_next_item(rec, seq, "valid")
        value = res.metrics.get(OBJECTIVE, math.nan)
        log.info("trial %d: %s = %.5f %s", trial.number, OBJECTIVE, value, params)
        return value

    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    n_done = len(study.get_trials(deepcopy=False, states=done_states))
    missing = trials - n_done
    started = itertools.count(1)  # trials this run has started
    say = on_step or (lambda _msg: None)
    t_start = time.monotonic()

    def trial_done(st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        secs = (t.duration.total_seconds() if t.duration else time.monotonic() - t_start)
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None:
            result = f"{OBJECTIVE} {t.value:.5f}"
        else:
            result = t.state.name.lower() + (f" after epoch {t.user_attrs['epochs']}" if "epochs" in t.user_attrs
                                             else "")
        try:
            best = f"best {st.best_value:.5f} (trial {st.best_trial.number})"
        except ValueError:  # no complete trial yet
            best = "no complete trial yet"
        say(f"trial {t.number}: {result} in {secs:.1f}s; {best}")

    if n_done:
        log.info("%s: resuming study with %d finished trial(s); %d to run", out, n_done, max(missing, 0))
    try:
        if missing > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # optuna's own bar would print from library code: trial_done reports instead
                study.optimize(objective, n_trials=missing, timeout=timeout, callbacks=[trial_done])
    finally:  # also after an interrupt: what has finished is written
        _write_atomic(out / "trials.csv", trials_csv(study, names))
        result = _write_best(study, model, config_path, overrides, base, out)
    return result


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_best(study: Any, model: str, config_path: Path | None, overrides: list[str],
                base: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    import optuna

    from hnvm.runs import resolve_config

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    complete = [t for t in complete if t.value is not None and not math.isnan(t.value)]
    summary: dict[str, Any] = {"model": model, "study": str(out / "optuna.db"),
                               "trials_csv": str(out / "trials.csv"), "n_trials": len(study.trials),
                               "n_complete": len(complete), "objective": OBJECTIVE}
    if not complete:
        summary.update(best_value=None, best_params={}, best_trial=None, best_toml=None)
        return summary
    best = max(complete, key=lambda t: t.value)
    rc = resolve_config(model, config_path, overrides + [f"{k}={v}" for k, v in best.params.items()])
    # typed values of the base keys and the tuned ones, as the loader resolved them
    model_all = as_dict(rc.model_config) if rc.model_config is not None else {}
    train_all = as_dict(rc.train)
    keys = {"model": set(base["model"]), "train": set(base["train"])}
    for name in best.params:
        section, key = name.split(".", 1)
        keys[section].add(key)
    sections = {"model": {k: model_all[k] for k in keys["model"]},
                "train": {k: train_all[k] for k in keys["train"]}}
    header = (f"hnvm tune --model {model}: best of {len(complete)} complete trial(s), "
              f"validation {OBJECTIVE} = {best.value:.6f} (trial {best.number})\n"
              f"use with: hnvm train DATASET --model {model} --config best.toml")
    path = out / "best.toml"
    _write_atomic(path, to_toml(sections, header))
    summary.update(best_value=best.value, best_params=dict(best.params), best_trial=best.number,
                   best_toml=str(path))
    return summary
