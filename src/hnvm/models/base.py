"""The Recommender protocol every model implements, and the model registry.

Evaluation never sees model internals: it builds a `Batch`, calls `score` (next item) or
`score_sessions` (next session) and ranks the result over the full catalogue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from hnvm.errors import HnvmError, one_line

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@dataclass
class Batch:
    """Consecutive sessions of B users, oldest first, right-aligned in the session axis.

    sessions[b, n, t] is the t-th item of user b's n-th session in this window (0 = padding).
    Empty sessions appear only at the start of the session axis (left padding), so the last
    session of every row sits at index N-1.

    For next-item scoring the last session is the one being predicted and the targets are
    (target_rows[k], target_pos[k]): the item at sessions[target_rows[k], -1, target_pos[k]]
    is predicted from the sessions before and items [0, target_pos[k]) of the last one.
    For next-session scoring `sessions` holds history only and targets are unused.
    """

    users: torch.Tensor  # Long[B], 0 = unknown user
    sessions: torch.Tensor  # Long[B, N, T]
    target_rows: torch.Tensor  # Long[K]
    target_pos: torch.Tensor  # Long[K]
    session_ids: torch.Tensor | None = None  # Long[B]: dataset id of each row's last session

    @property
    def targets(self) -> torch.Tensor:
        """Long[K]: the item id of each target."""
        return self.sessions[self.target_rows, -1, self.target_pos]

    @property
    def n_targets(self) -> int:
        return int(self.target_rows.numel())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.users.to(device), self.sessions.to(device), self.target_rows.to(device),
                     self.target_pos.to(device), self.session_ids)


@runtime_checkable
class Recommender(Protocol):
    """What every model offers. Hyper-parameters are constructor keyword arguments; learned
    state is set in `fit`, which returns self."""

    name: ClassVar[str]

    def fit(self, train: Dataset, valid: Dataset | None = None, **kwargs: Any) -> Recommender: ...

    def score(self, batch: Batch) -> torch.Tensor:
        """Float[K, n_items + 1]: scores of every item for each next-item target (column 0 is
        padding and is ignored by ranking)."""
        ...

    def score_sessions(self, batch: Batch) -> torch.Tensor:
        """Float[B, n_items + 1]: scores for the next session of each row, from history only."""
        ...

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Recommender: ...


REGISTRY: dict[str, Callable[..., Recommender]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a model available as `hnvm train --model NAME`."""

    def deco(cls: type) -> type:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def get_model_class(name: str) -> Callable[..., Recommender]:
    import hnvm.models  # noqa: F401  (registers the built-in models)

    if name not in REGISTRY:
        from hnvm.errors import ConfigError

        raise ConfigError(f"unknown model '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def save_model_files(path: Path, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     extra: dict[str, Any] | None = None) -> None:
    """model.safetensors + model.json in `path` (each written to a temp file, then renamed)."""
    import json
    import os

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path / "model.safetensors")
    tmpj = path / ".model.json.tmp"
    tmpj.write_text(json.dumps({"model": name, "config": config, **(extra or {})}, indent=2) + "\n")
    os.replace(tmpj, path / "model.json")


def _read_model_json(mj: Path) -> dict[str, Any]:
    from hnvm.data.store import read_json_object

    return read_json_object(mj, "model file", "; retrain the run with --force")


def load_model_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of save_model_files: (model.json contents, tensors). A damaged file is a
    one-line HnvmError naming it."""
    from safetensors.torch import load_file

    mj, st = path / "model.json", path / "model.safetensors"
    if not mj.exists() or not st.exists():
        raise HnvmError(f"{path}: no model.json / model.safetensors (not a saved model)")
    meta = _read_model_json(mj)
    try:
        tensors = load_file(str(st))
    except Exception as exc:  # safetensors raises its own error types for truncated / garbled files
        raise HnvmError(f"{st}: damaged model file ({one_line(exc)}); retrain the run with --force") from exc
    return meta, tensors


def load_model(path: Path) -> Recommender:
    """Load any registered model saved with `save`; a damaged or mismatched model is a one-line
    HnvmError naming the file, never a traceback."""
    mj = Path(path) / "model.json"
    if not mj.exists():
        raise HnvmError(f"{path}: no model.json (not a saved model)")
    name = _read_model_json(mj).get("model")
    if not isinstance(name, str):
        raise HnvmError(f"{mj}: damaged model file (no model name); retrain the run with --force")
    cls = get_model_class(name)
    try:
        return cls.load(Path(path))  # type: ignore[attr-defined,no-any-return]
    except HnvmError:
        raise
    except Exception as exc:  # missing/odd keys, shapes that do not fit the config: the files disagree
        raise HnvmError(f"{path}: damaged model files (model.json and model.safetensors do not fit "
                        f"together: {one_line(exc)}); retrain the run with --force") from exc


class NetPersistence:
    """`save`/`load` for models whose learned state is `self.net`, an nn.Module made by
    `self._build(**dims)`, plus the tensor attributes named in `extra_tensors`. A model lists
    the sizes `_build` needs in `dims` (saved in model.json) and provides `_require()`."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    dims: ClassVar[tuple[str, ...]] = ("n_items",)
    extra_tensors: ClassVar[tuple[str, ...]] = ()

    def save(self, path: Path) -> None:
        from hnvm.config import as_dict

        net = self._require()  # type: ignore[attr-defined]
        extra = {f"_{a}": getattr(self, a) for a in self.extra_tensors}
        save_model_files(Path(path), self.name, as_dict(self.config),  # type: ignore[attr-defined]
                         {**net.state_dict(), **extra}, {d: getattr(self, d) for d in self.dims})

    @property
    def device(self) -> torch.device:
        """Where the network lives (evaluation moves its batches there)."""
        net = getattr(self, "net", None)
        p = next(net.parameters(), None) if net is not None else None
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: torch.device | str) -> Any:
        """Move the network and the extra tensors to `device`; returns self."""
        net = self._require()  # type: ignore[attr-defined]
        net.to(device)
        for a in self.extra_tensors:
            if getattr(self, a, None) is not None:
                setattr(self, a, getattr(self, a).to(device))
        return self

    @classmethod
    def load(cls, path: Path) -> Any:
        meta, tensors = load_model_files(Path(path))
        m = cls(cls.config_class(**meta["config"]))  # type: ignore[call-arg]
        for a in cls.extra_tensors:
            setattr(m, a, tensors.pop(f"_{a}"))
        m.net = m._build(**{d: meta[d] for d in cls.dims})  # type: ignore[attr-defined]
        m.net.load_state_dict(tensors)
        m.net.eval()
        return m
