"""The package's layering (docs/design.md, "Layers"), read from the source: every import
statement, module level or inside a function, counts. Also the size limits: no file over 450
lines and no function over 80 lines unless its docstring says why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hnvm"

# (importer prefix, forbidden imported prefixes)
RULES = [
    ("hnvm.models", ("hnvm.evaluate", "hnvm.online", "hnvm.serve", "hnvm.runs", "hnvm.tune",
                     "hnvm.benchmark", "hnvm.cli", "hnvm.recommend", "hnvm.demo")),
    ("hnvm.training", ("hnvm.models", "hnvm.evaluate", "hnvm.online", "hnvm.serve", "hnvm.runs",
                       "hnvm.tune", "hnvm.benchmark", "hnvm.cli")),
    ("hnvm.data", ("hnvm.models", "hnvm.training", "hnvm.evaluate", "hnvm.online", "hnvm.serve",
                   "hnvm.runs", "hnvm.tune", "hnvm.benchmark", "hnvm.cli")),
    ("hnvm.contract", ("hnvm.models", "hnvm.training", "hnvm.evaluate", "hnvm.online", "hnvm.serve",
                       "hnvm.runs", "hnvm.cli")),
    ("hnvm.evaluate", ("hnvm.models", "hnvm.training", "hnvm.online", "hnvm.serve", "hnvm.runs",
                       "hnvm.tune", "hnvm.benchmark", "hnvm.cli")),
    ("hnvm.online", ("hnvm.serve", "hnvm.cli", "hnvm.benchmark", "hnvm.tune", "hnvm.runs", "hnvm.evaluate",
                     "hnvm.training", "hnvm.recommend")),
    ("hnvm.rundir", ("hnvm.runs", "hnvm.evaluate", "hnvm.training", "hnvm.online", "hnvm.serve", "hnvm.cli")),
    ("hnvm.serve", ("hnvm.runs", "hnvm.evaluate", "hnvm.training", "hnvm.tune", "hnvm.benchmark", "hnvm.cli")),
    ("hnvm.recommend", ("hnvm.serve",)),
    ("hnvm.metrics", ("hnvm.models", "hnvm.training", "hnvm.evaluate", "hnvm.data")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports_of(path: Path, module: str) -> set[str]:
    """Every hnvm module `path` imports (absolute or relative, at any depth)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hnvm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if base.startswith("hnvm"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_import_layering() -> None:
    mods = _modules()
    assert "hnvm.training.loop" in mods and "hnvm.contract" in mods
    bad = []
    for name, path in sorted(mods.items()):
        imported = {m for m in imports_of(path, name) if m.split(".")[:2] != name.split(".")[:2] or
                    not _matches(m, name)}
        for importer, forbidden in RULES:
            if _matches(name, importer):
                bad += [f"{name} imports {m}" for m in sorted(imported)
                        if any(_matches(m, f) for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from hnvm.evaluate import evaluate_next_item\n    from . import base\n")
    assert imports_of(f, "hnvm.models.x") == {"hnvm.evaluate", "hnvm.evaluate.evaluate_next_item",
                                              "hnvm.models", "hnvm.models.base"}


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_size_limits(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 450, f"{path}: over 450 lines"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            doc = ast.get_docstring(node) or ""
            if n > 80 and "longer than 80 lines" not in doc:
                long.append(f"{node.name} ({n} lines)")
    assert not long, f"{path}: functions over 80 lines without a stated reason: {', '.join(long)}"


def test_offline_recommend_loads_nothing_of_the_http_service() -> None:
    """Transitively too: importing `hnvm.recommend` (and the engine) loads no `hnvm.serve` module."""
    import subprocess
    import sys

    code = ("import sys, hnvm.recommend, hnvm.online; "
            "bad = sorted(m for m in sys.modules if m.startswith('hnvm.serve')); print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
