"""Bit-identity fingerprint of every model: train with a fixed seed, evaluate, print hashes.

    python benchmarks/fingerprint.py > before.txt      # on one commit
    python benchmarks/fingerprint.py > after.txt       # on another
    diff before.txt after.txt                           # empty = same weights and metrics

Goes through the CLI only (`hnvm prepare/train/evaluate/tune/benchmark`), so that it measures
what users get and survives changes of the Python API. For each model on the Instacart sample:
sha256 of model.safetensors and model.json, of the best/ and last/ checkpoint weights, of
train_log.jsonl and metrics.json (next item and next session, full ranking) without timings and
with floats to 12 significant digits, and of the exported per-target ranks (exact); then a
two-trial tune of GRU4Rec (trials.csv without timings, best.toml) and a two-model benchmark of
both tasks (results.json, ranks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("pop", "ptopfreq", "itemknn", "sknn", "tifuknn", "bprmf", "ncf", "gru4rec", "hrnn", "caser", "stamp", "hnvm",
          "hnvm-repeat")
# fingerprinted variants: name -> (registered model, extra --set options)
VARIANTS = {"hnvm-repeat": ("hnvm", ("--set", "model.repeat=true"))}
TIMING_KEYS = {"seconds", "targets_per_s", "fit_seconds", "seconds_per_epoch", "duration", "datetime_start",
               "datetime_complete", "elapsed_s", "train_seconds", "eval_seconds", "score_seconds", "when",
               "created", "started", "finished", "time", "wall_s"}


def _hnvm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hnvm", "--progress", "off", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "-"


def _strip(obj: object) -> object:
    """JSON without wall-clock figures and absolute paths (they differ run to run)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS and "second" not in k
                and not k.endswith("_s") and "time" not in k and "path" not in k and "dir" not in k}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, float):  # metrics are means of exact ranks: the last bit of a float sum
        return float(f"{obj:.12g}")  # can differ run to run (thread scheduling), in any version
    return obj


def _json_sha(path: Path, root: Path | None = None) -> str:
    """sha256 of a JSON (or JSON-lines) file without timings, with floats to 12 digits and the
    temporary `root` directory's path replaced by ROOT."""
    if not path.exists():
        return "-"
    text = path.read_text()
    if root is not None:
        text = text.replace(json.dumps(str(root))[1:-1], "ROOT")
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    canon = [json.dumps(_strip(json.loads(x)), sort_keys=True) for x in lines if x.strip()]
    return hashlib.sha256("\n".join(canon).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated; empty: only tune + benchmark")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-tune", action="store_true")
    a = ap.parse_args()
    from hnvm.data.samples import instacart_sample_path

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        _hnvm("prepare", str(instacart_sample_path()), "--out", str(data), "--preset", "instacart")
        print("dataset", _sha(data / "events.parquet"))
        for m in filter(None, a.models.split(",")):
            run = root / m
            model, extra = VARIANTS.get(m, (m, ()))
            _hnvm("train", str(data), "--model", model, "--out", str(run), "--set", f"train.epochs={a.epochs}",
                  "--device", "cpu", *extra)
            for task in ("next-item", "next-session"):
                _hnvm("evaluate", str(run), "--task", task, "--device", "cpu",
                      "--export-ranks", str(root / f"{m}-{task}.parquet"))
            print(m, "model", _sha(run / "model" / "model.safetensors"), _json_sha(run / "model" / "model.json"),
                  "best", _sha(run / "best" / "weights.safetensors"),
                  "last", _sha(run / "last" / "weights.safetensors"), "log", _json_sha(run / "train_log.jsonl"),
                  "metrics", _json_sha(run / "metrics.json"),
                  "ranks", _sha(root / f"{m}-next-item.parquet"), _sha(root / f"{m}-next-session.parquet"), flush=True)
        if not a.no_tune:
            study = root / "tune"
            _hnvm("tune", str(data), "--model", "gru4rec", "--trials", "2", "--out", str(study),
                  "--set", "train.epochs=1", "--set", "model.layers=32")
            rows = (study / "trials.csv").read_text().splitlines()
            head = rows[0].split(",")
            keep = [i for i, h in enumerate(head)
                    if not any(t in h for t in ("time", "second", "duration"))]
            canon = "\n".join(",".join(r.split(",")[i] for i in keep) for r in rows)
            print("tune trials", hashlib.sha256(canon.encode()).hexdigest()[:16],
                  "best.toml", _sha(study / "best.toml"))
            bench = root / "bench"
            _hnvm("benchmark", str(data), "--models", "ptopfreq,gru4rec", "--task", "both", "--out", str(bench),
                  "--set", "train.epochs=1")
            for task in ("next-item", "next-session"):
                print("benchmark", task, _json_sha(bench / task / "results.json", root),
                      "ranks", *(_sha(bench / task / "ranks" / f"{m}.parquet") for m in ("ptopfreq", "gru4rec")))


if __name__ == "__main__":
    main()
