"""What `hnvm tune` searches: the search space of each model, read from its config dataclass
(every field with `range` or `choices` metadata, less `EXCLUDE`, ranges narrowed by `OVERRIDE`),
`train.lr` and `train.optimizer` for models trained by gradient descent, and the base settings
(`--config`, `--set`) whose keys are never searched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hnvm.config import apply_overrides, load_toml
from hnvm.errors import HnvmError
from hnvm.models.base import get_model_class
from hnvm.training import TrainConfig

OBJECTIVE = "mrr@5"  # validation MRR@5 of train.validate's task (next item or next session), full ranking

# fields never searched: seeds, leaky or structural switches, inference-only knobs
EXCLUDE_ALL = frozenset({"seed", "train_on", "use_valid", "mc_samples", "sample_cache_size",
                         "session_order"})
EXCLUDE: dict[str, frozenset[str]] = {
    "gru4rec": frozenset({"embedding"}),  # constrained_embedding (default) ignores it
    # unknown_user_rate: validation users are all known, so the objective cannot judge cold start
    "hnvm": frozenset({"max_len", "unknown_user_rate"}),
    "hrnn": frozenset({"max_len"}),
    "stamp": frozenset({"max_len"}),
}

# (lo, hi) sub-ranges, inside the field's own range, that keep a trial's runtime sensible
_SIZES = {"hidden": (16, 256), "emb_dim": (16, 256), "mlp_hidden": (16, 256), "d_e": (4, 128),
          "d_z": (4, 128), "batch_size": (16, 512), "n_negatives": (32, 4096), "window": (2, 16),
          "bpreg": (0.01, 10.0), "elu_p": (0.0, 2.0), "logq": (0.0, 1.0)}
OVERRIDE: dict[str, dict[str, tuple[float, float]]] = {
    # trials run a few epochs: end the warm-up in them; the KL and init knobs in ranges that train
    # (a trial at free_bits 8 nats/dim and init variance 0.22 ran at 1/15 of the normal speed)
    "hnvm": {**_SIZES, "kl_anneal_epochs": (0.5, 5.0), "kl_cycles": (1, 10), "free_bits": (0.0, 0.5),
             "word_dropout": (0.0, 0.5), "init_var": (1e-4, 0.05)},
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
    "tifuknn": {"k": (10, 1000), "n_groups": (1, 20)},
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
    """Fitted by the generic Trainer (SGD): it hands `hnvm.training.fit` a `trainable`."""
    return callable(getattr(cls, "trainable", None))


def search_space(model: str, fixed: frozenset[str] = frozenset()) -> list[Param]:
    """What `tune` searches for `model`, less the dotted keys in `fixed`."""
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
