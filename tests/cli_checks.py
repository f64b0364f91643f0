"""Shared checks of the command line's bad-input contract: a refusal is exit status 2 and one
line starting "error:" (no traceback), and a refused command writes or changes nothing."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from hnvm.cli import app


def refused(args: list[str], *needles: str) -> str:
    """Run `hnvm ARGS`; assert the refusal contract and that every needle is in the line."""
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return r.output


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) with its bytes: 'nothing written or changed'."""
    if path.is_file():
        return {str(path): path.read_bytes()}
    if not path.exists():
        return {}
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}
