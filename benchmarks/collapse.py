"""Posterior collapse in HNVM and its remedies, measured on the Instacart sample.

    python benchmarks/collapse.py                          # every variant, 6 epochs, seed 0
    python benchmarks/collapse.py --variants default,free-bits --epochs 10 --split leave-one-out

Each variant trains HNVM with the demo's tuned configuration (src/hnvm/demo_configs/hnvm.toml)
plus the variant's settings, early-stopping on validation next-item MRR@5 (full ranking), then
prints one row: the latent diagnostics of the selected weights on the training split (KL per
dimension of z and e in nats, active units out of d_z / d_e: posterior-mean variance > 0.01,
Burda et al. 2016; mutual information I(x; z), I(u; e) under q in nats) and next-item MRR@5 on
validation and test. The table is what the README's "Latent variables" section shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from hnvm.config import build, load_toml
from hnvm.data.batches import Sequences
from hnvm.data.prepare import PrepareConfig, prepare
from hnvm.data.samples import instacart_sample_path
from hnvm.data.store import Dataset
from hnvm.evaluate import NEXT_ITEM_VALIDATION, evaluate_next_item
from hnvm.models.hnvm import HNVM
from hnvm.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "free-bits": {"free_bits": 0.1},
    "cyclical": {"kl_schedule": "cyclical", "kl_anneal_epochs": 1.5, "kl_cycles": 4},
    "word-dropout": {"word_dropout": 0.25},
    "var-scale-after-kl": {"var_scale_in_kl": False},
    "var-scale-after-kl+free-bits": {"var_scale_in_kl": False, "free_bits": 0.1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="user-last", help="user-last or leave-one-out")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    cfg = load_toml(ROOT / "src" / "hnvm" / "demo_configs" / "hnvm.toml")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "instacart"
        prepare(instacart_sample_path(), data, preset="instacart", config=PrepareConfig(split=args.split))
        ds = Dataset.load(data)
        seq = Sequences.from_events(ds.events, ds.n_users, ds.held_out_items)
        print(f"# HNVM latents, Instacart sample ({args.split}), {args.epochs} epochs, seed {args.seed}")
        print("| variant | KL/dim z | active z | MI z | KL/dim e | active e | MI e | best epoch "
              "| valid MRR@5 | test MRR@5 | seconds |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            t0 = time.perf_counter()
            model_cfg = build(HNVM.config_class, {**cfg.get("model", {}), **VARIANTS[name]}, "model")
            train = dataclasses.replace(build(TrainConfig, cfg.get("train", {}), "train"),
                                        epochs=args.epochs, seed=args.seed)
            m = HNVM(model_cfg).fit(ds, train_cfg=train, validation=NEXT_ITEM_VALIDATION, seq=seq)
            lat = m.latent_diagnostics(ds)
            valid = evaluate_next_item(m, seq, "valid").metrics["mrr@5"]
            test = evaluate_next_item(m, seq, "test").metrics["mrr@5"]
            best = m.result_.best_epoch if m.result_ is not None else "-"
            print(f"| {name} | {lat['kl_z_per_dim']:.4f} | {lat['active_z']}/{model_cfg.d_z} | {lat['mi_z']:.2f} "
                  f"| {lat['kl_e_per_dim']:.4f} | {lat['active_e']}/{model_cfg.d_e} | {lat['mi_e']:.2f} | {best} "
                  f"| {valid:.4f} | {test:.4f} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
