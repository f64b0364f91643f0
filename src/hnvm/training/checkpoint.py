"""Training checkpoints: weights, optimizer and RNG states as safetensors, the loop's state as
JSON (no pickle), each checkpoint directory written atomically (`hnvm.atomic`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hnvm.atomic import atomic_dir
from hnvm.errors import HnvmError, one_line


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors + JSON (no pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = torch.tensor(v) if k == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(directory: Path, module: nn.Module, opt: torch.optim.Optimizer | None,
                     state: dict[str, Any]) -> None:
    """Write module (+ optimizer and RNG states, + trainer state) to `directory` atomically."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(tmp / "weights.safetensors"))
        if opt is not None:
            tensors, meta = _flatten_optimizer(opt)
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
            rng_state = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                rng_state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
            save_file(rng_state, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))

    atomic_dir(directory, write)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = directory / "weights.safetensors"
    if not f.exists():
        raise HnvmError(f"{directory}: no weights.safetensors (not a checkpoint)")
    return load_file(str(f))


def load_checkpoint(directory: Path, module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore module and optimizer from a checkpoint written by write_checkpoint; returns its
    state.json with the RNG states under "_rng". A missing, truncated or mismatched file is a
    one-line HnvmError naming it (the run directory is left as it is)."""
    from safetensors.torch import load_file

    def fail(name: str, exc: BaseException) -> HnvmError:
        return HnvmError(f"{directory / name}: cannot resume from it ({one_line(exc)}); the checkpoint is damaged or "
                         "was written with other model settings (replace the run with --force)")

    # each step names the file it reads; any failure of the libraries below means a bad file
    name = "state.json"
    try:
        st = json.loads((directory / name).read_text(encoding="utf-8"))
        for key in ("epoch", "step", "best", "best_epoch", "bad_epochs"):
            if not isinstance(st.get(key), int | float):
                raise ValueError(f"no numeric {key!r}")
        name = "weights.safetensors"
        module.load_state_dict(load_file(str(directory / name)))
        name = "optimizer.json"
        meta = json.loads((directory / name).read_text(encoding="utf-8"))
        name = "optimizer.safetensors"
        # load_state_dict moves the moments to each parameter's device
        _restore_optimizer(opt, load_file(str(directory / name)), meta)
        name = "rng.safetensors"
        st["_rng"] = load_file(str(directory / name))
        if "torch" not in st["_rng"]:
            raise ValueError("no torch RNG state")
    except Exception as exc:
        raise fail(name, exc) from exc
    return st
