"""The model registry, model files (safetensors + JSON) and `NetPersistence`, the shared
save/load/network access of the neural models. The scoring contract itself (`Batch`,
`Recommender`) is `hnvm.contract`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hnvm.atomic import atomic_file, atomic_text
from hnvm.config import as_dict
from hnvm.contract import Batch, Recommender
from hnvm.data.store import read_json_object
from hnvm.errors import ConfigError, HnvmError, one_line

REGISTRY: dict[str, Callable[..., Recommender]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a model available as `hnvm train --model NAME`."""

    def deco(cls: type) -> type:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def get_model_class(name: str) -> Callable[..., Recommender]:
    import hnvm.models  # noqa: F401  (registers the built-in models; they import this module)

    if name not in REGISTRY:
        raise ConfigError(f"unknown model '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def save_model_files(path: Path, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     extra: dict[str, Any] | None = None) -> None:
    """model.safetensors + model.json in `path` (each written atomically)."""
    path.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_file(path / "model.safetensors", lambda tmp: save_file(flat, str(tmp)))
    atomic_text(path / "model.json", json.dumps({"model": name, "config": config, **(extra or {})}, indent=2) + "\n")


def _read_model_json(mj: Path) -> dict[str, Any]:
    return read_json_object(mj, "model file", "; retrain the run with --force")


def load_model_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of save_model_files: (model.json contents, tensors). A damaged file is a
    one-line HnvmError naming it."""
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
    """`save`/`load` and `network()` for models whose learned state is `self.net`, an nn.Module
    made by `self._build(**dims)`, plus the tensor attributes named in `extra_tensors`. A model
    lists the sizes `_build` needs in `dims` (saved in model.json)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    dims: ClassVar[tuple[str, ...]] = ("n_items",)
    extra_tensors: ClassVar[tuple[str, ...]] = ()
    net: Any
    result_: Any

    def network(self) -> Any:
        """The fitted network, switched to eval mode (dropout off). RuntimeError before fit/load."""
        if self.net is None or any(getattr(self, a, None) is None for a in self.extra_tensors):
            raise RuntimeError("fit or load the model first")
        self.net.eval()
        return self.net

    def save(self, path: Path) -> None:
        net = self.network()
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
        net = self.network()
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


class UserScoring:
    """score / score_sessions of a model whose network scores every item from the user alone
    (`net.scores(users)` -> Float[B, n_items + 1]): the session prefix and history are unused."""

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        """The scores of the user of each target: Float[K, n_items + 1]."""
        return self.network().scores(batch.users)[batch.target_rows]  # type: ignore[attr-defined]

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        return self.network().scores(batch.users)  # type: ignore[attr-defined]
