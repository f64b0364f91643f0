"""`hnvm tune`: Optuna search of a model's hyper-parameters on the validation split.

The search space (`hnvm.search_space`) comes from the model's config dataclass, plus `train.lr`
and `train.optimizer` for models trained by gradient descent; keys fixed by the base config
(`--config`, `--set`) are never searched.

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
import io
import itertools
import logging
import math
import re
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hnvm.atomic import atomic_text
from hnvm.config import as_dict
from hnvm.data.batches import Sequences
from hnvm.data.store import Dataset, check_output_dir
from hnvm.errors import HnvmError, one_line
from hnvm.evaluate import ValidationPolicy
from hnvm.rundir import data_digest, vocab_digest
from hnvm.runs import make_model, resolve_config, validation_policy
from hnvm.search_space import OBJECTIVE, Param, base_settings, default_params, search_space
from hnvm.training import ProgressCallback, TrainingDiverged

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- outputs

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

@dataclass
class _Search:
    """One tuning run: what every trial needs."""

    model: str
    config_path: Path | None
    overrides: list[str]
    space: list[Param]
    ds: Any  # Dataset
    seq: Any  # Sequences
    show_progress: bool
    trial_timeout: float | None
    on_progress: ProgressCallback | None
    say: Callable[[str], None]
    missing: int = 0
    started: Any = dataclasses.field(default_factory=lambda: itertools.count(1))  # trials this run started
    t_start: float = dataclasses.field(default_factory=time.monotonic)

    def objective(self, trial: Any) -> float:
        """Train one trial's settings (pruned on validation after each epoch); its validation MRR@5."""
        import optuna

        params = {p.name: p.suggest(trial) for p in self.space}
        rc = resolve_config(self.model, self.config_path, self.overrides + [f"{k}={v}" for k, v in params.items()])
        rec = make_model(rc)
        validation = ValidationPolicy(task=rc.train.validate)  # the task tuned for
        t0 = time.monotonic()
        self.say(f"trial {trial.number} ({next(self.started)} of {self.missing} to run): "
                 + ", ".join(f"{k}={_short(v)}" for k, v in params.items()))

        def on_epoch(epoch: int, record: dict[str, Any]) -> bool:
            trial.set_user_attr("epochs", epoch)  # how far the trial got (pruned or cut by the timeout)
            score = record.get("valid", {}).get(OBJECTIVE)
            if score is not None and not math.isnan(score):
                trial.report(score, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{OBJECTIVE} {score:.5f} after epoch {epoch}: below the median")
            return self.trial_timeout is not None and time.monotonic() - t0 > self.trial_timeout

        try:
            rec.fit(self.ds, train_cfg=rc.train, validation=validation, seq=self.seq,
                    show_progress=self.show_progress, on_progress=self.on_progress, on_epoch=on_epoch)
        except TrainingDiverged as exc:  # a bad lr: counts as a (pruned) trial, the study goes on
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        value = validation(rec, self.seq).get(OBJECTIVE, math.nan)
        log.info("trial %d: %s = %.5f %s", trial.number, OBJECTIVE, value, params)
        return value

    def trial_done(self, st: Any, t: Any) -> None:
        """Optuna callback: one line per finished trial (its result and the best so far)."""
        import optuna

        secs = t.duration.total_seconds() if t.duration else time.monotonic() - self.t_start
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None:
            result = f"{OBJECTIVE} {t.value:.5f}"
        else:
            result = t.state.name.lower() + (f" after epoch {t.user_attrs['epochs']}" if "epochs" in t.user_attrs
                                             else "")
        try:
            best = f"best {st.best_value:.5f} (trial {st.best_trial.number})"
        except ValueError:  # no complete trial yet
            best = "no complete trial yet"
        self.say(f"trial {t.number}: {result} in {secs:.1f}s; {best}")


def _open_study(out: Path, model: str, seed: int, setup: dict[str, Any]) -> Any:
    """The Optuna study in OUT/optuna.db (created, or resumed when its setup is the same)."""
    import optuna
    import sqlalchemy.exc

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
    prev = study.user_attrs.get("setup")
    if prev is None:
        study.set_user_attr("setup", setup)
    elif any(k in prev and prev[k] != v for k, v in setup.items()):  # studies of older versions lack keys
        diff = ", ".join(k for k in setup if k in prev and prev[k] != setup[k])
        raise HnvmError(f"{out}: the study there was run with a different {diff}; "
                        "tune into another --out directory")
    return study


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
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Search `model`'s hyper-parameters for validation MRR@5 (of train.validate's task); `trials`
    is the total number of finished (complete or pruned) trials wanted, counting those of an earlier run in `out`.
    `timeout` stops starting trials after that many seconds; `trial_timeout` ends a trial after
    the epoch that crosses it. `on_step` gets a line when each trial starts and ends,
    `on_progress` the training loop's progress reports; `show_progress` is passed to the trials'
    Trainer. Nothing is printed."""
    import optuna

    overrides = list(base_overrides or [])
    if trials < 1:
        raise HnvmError(f"--trials must be at least 1 (got {trials})")
    rc = resolve_config(model, config_path, overrides)  # unknown model / bad base config fail here
    base = base_settings(model, config_path, overrides)
    space = search_space(model, frozenset(f"{s}.{k}" for s, vals in base.items() for k in vals))
    names = [p.name for p in space]
    out = Path(out)
    check_tune_out(out, model, inputs=(Path(dataset),) + ((Path(config_path),) if config_path else ()))
    ds = Dataset.load(dataset)
    seq = Sequences.from_events(ds.events, ds.n_users, ds.held_out_items)
    if not len(seq.sessions_of("valid")):
        raise HnvmError(f"{dataset}: the dataset has no validation sessions to tune on")
    validation_policy(rc.train, ds, dataset)  # train.validate = next-session needs whole sessions
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HnvmError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    # a study only resumes with the same data, base settings and search space
    # (the events digest covers the train and valid splits: re-prepared data is another study)
    study = _open_study(out, model, seed, {
        "dataset_vocab_sha256": vocab_digest(ds), "dataset_sha256": data_digest(ds), "space": names,
        "base": {s: {k: str(v) for k, v in vals.items()} for s, vals in base.items()}, "objective": OBJECTIVE})
    if not study.trials:
        study.enqueue_trial(default_params(model, space))
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    n_done = len(study.get_trials(deepcopy=False, states=done_states))
    search = _Search(model, config_path, overrides, space, ds, seq, show_progress, trial_timeout, on_progress,
                     on_step or (lambda _msg: None), missing=trials - n_done)
    if n_done:
        log.info("%s: resuming study with %d finished trial(s); %d to run", out, n_done, max(search.missing, 0))
    try:
        if search.missing > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # optuna's own bar would print from library code: trial_done reports instead
                study.optimize(search.objective, n_trials=search.missing, timeout=timeout,
                               callbacks=[search.trial_done])
    finally:  # also after an interrupt: what has finished is written
        atomic_text(out / "trials.csv", trials_csv(study, names), newline="")
        result = _write_best(study, model, config_path, overrides, base, out)
    return result


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_best(study: Any, model: str, config_path: Path | None, overrides: list[str],
                base: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    import optuna

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
    atomic_text(path, to_toml(sections, header), newline="")
    summary.update(best_value=best.value, best_params=dict(best.params), best_trial=best.number,
                   best_toml=str(path))
    return summary
