"""Frozen dataclass configs, TOML loading and dotted overrides (`--set model.hidden=100`).

Every tunable field may declare its valid range in `field(metadata={"range": (lo, hi)})` or
its choices in `metadata={"choices": (...)}`; unknown keys and out-of-range values are
rejected with a message that lists what is valid.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from hnvm.errors import ConfigError

T = TypeVar("T")


def rng(lo: float, hi: float, doc: str = "") -> dict[str, Any]:
    """Field metadata: the closed range of valid values."""
    return {"range": (lo, hi), "doc": doc}


def choices(*values: str, doc: str = "") -> dict[str, Any]:
    return {"choices": values, "doc": doc}


def describe_fields(cls: type) -> str:
    """'name (type, range)' for every field of a config dataclass."""
    hints = get_type_hints(cls)
    parts = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        if "range" in meta:
            lo, hi = meta["range"]
            parts.append(f"{f.name} ({kind} in [{lo}, {hi}])")
        elif "choices" in meta:
            parts.append(f"{f.name} ({'|'.join(meta['choices'])})")
        else:
            parts.append(f"{f.name} ({kind})")
    return ", ".join(parts)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    text = str(hint)
    if isinstance(value, str):
        low = value.strip().lower()
        if "bool" in text and low in ("true", "false", "1", "0", "yes", "no"):
            return low in ("true", "1", "yes")
        if low in ("none", "null") and "None" in text:
            return None
        if "tuple" in text:
            try:
                return tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise ConfigError(f"{key}: '{value}' is not a comma-separated list of integers") from None
        try:
            if "int" in text and "float" not in text:
                return int(value)
            if "float" in text:
                return float(value)
        except ValueError:
            kind = "an integer" if "int" in text and "float" not in text else "a number"
            raise ConfigError(f"{key}: '{value}' is not {kind}") from None
        return value
    if "float" in text and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "tuple" in text and isinstance(value, list):
        return tuple(value)
    return value


def build(cls: type[T], values: dict[str, Any], section: str = "") -> T:
    """Instantiate a config dataclass from a dict, checking keys, types and ranges."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{section}." if section else ""
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key '{prefix}{key}'; valid keys of [{section or cls.__name__}]: "
                f"{describe_fields(cls)}"
            )
        v = _coerce(value, hints[key], prefix + key)
        meta = fields[key].metadata
        if "range" in meta and v is not None:
            lo, hi = meta["range"]
            if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(f"{prefix}{key} = {value!r} is out of range [{lo}, {hi}]")
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{prefix}{key} = {value!r}; choose one of {', '.join(meta['choices'])}")
        kwargs[key] = v
    return cls(**kwargs)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """['model.hidden=100', 'train.lr=0.1'] -> nested updates of `tree` (a copy); a key given
    again overrides the earlier value (the last one wins, so scripts can append overrides)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected SECTION.KEY=VALUE (e.g. model.hidden=100)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in ("model", "train"):
            raise ConfigError(f"--set '{item}': key must be model.NAME or train.NAME")
        out.setdefault(parts[0], {})[parts[1]] = value.strip()
    return out


def as_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
