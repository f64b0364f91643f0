"""The CUDA path (`pytest -m gpu`; skipped without CUDA): every neural model trains on the GPU
with bf16 autocast, evaluation moves batches to the model's device and matches a CPU copy of
the same weights, the run directory round trip with --device cuda, and (with two GPUs) NCCL
DistributedDataParallel. benchmarks/gpu.sh runs these and the throughput benchmark."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hnvm.data.batches import Sequences
from hnvm.data.samples import synthetic_dataset
from hnvm.evaluate import NEXT_ITEM_VALIDATION, evaluate_next_item, evaluate_next_session
from hnvm.models.base import get_model_class
from hnvm.training import TrainConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FAST = {
    "hnvm": {"hidden": 32, "emb_dim": 32, "d_e": 8, "d_z": 8, "mlp_hidden": 32, "n_negatives": 64},
    "hrnn": {"emb_dim": 16, "session_hidden": 16, "user_hidden": 16, "n_negatives": 32},
    "gru4rec": {"layers": (16,), "batch_size": 16, "n_sample": 16, "sample_cache_size": 4096},
    "caser": {"L": 3, "T": 2, "d": 8, "nv": 2, "nh": 4, "batch_size": 64},
    "stamp": {"d": 16, "batch_size": 64},
    "bprmf": {"dim": 8, "batch_size": 128},
    "ncf": {"factors": 4, "mlp_layers": 2, "batch_size": 128},
}


@pytest.fixture(scope="module")
def tiny():
    ds = synthetic_dataset(n_users=120, n_items=60, n_topics=4, seed=5)
    return ds, Sequences.from_events(ds.events, ds.n_users)


def _make(name: str):
    cls = get_model_class(name)
    return cls(cls.config_class(**FAST[name]))


@pytest.mark.parametrize("name", sorted(FAST))
@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_trains_on_cuda_and_scores_like_a_cpu_copy(name: str, optimizer: str, tiny) -> None:
    ds, seq = tiny
    torch.manual_seed(0)
    m = _make(name).fit(ds, validation=NEXT_ITEM_VALIDATION,
                        train_cfg=TrainConfig(epochs=2, optimizer=optimizer, lr=0.01, device="cuda", bf16=True))
    assert m.device.type == "cuda"
    hist = m.result_.history
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    gpu = evaluate_next_item(m, seq, "test").metrics
    gpu_s = evaluate_next_session(m, seq, "test").metrics
    m.to("cpu")
    cpu = evaluate_next_item(m, seq, "test").metrics
    cpu_s = evaluate_next_session(m, seq, "test").metrics
    # fp32 scoring on both; GPU matmuls may round differently, which can move a tie or two
    for k in ("recall@20", "mrr@20"):
        assert gpu[k] == pytest.approx(cpu[k], abs=0.02)
        assert gpu_s[k] == pytest.approx(cpu_s[k], abs=0.02)


def test_hnvm_sparse_tables_on_cuda(tiny) -> None:
    ds, _ = tiny
    torch.manual_seed(0)
    m = _make("hnvm").fit(ds, train_cfg=TrainConfig(epochs=1, device="cuda"))
    assert m.net.item_emb.sparse and m.net.out.sparse  # one process: sparse updates on CUDA too
    assert m.net.out.weight.is_cuda


def test_bf16_autocast_loss_is_close_to_fp32(tiny) -> None:
    import numpy as np

    ds, _ = tiny
    torch.manual_seed(0)
    m = _make("hnvm")
    tr = m.trainable(ds, Sequences.from_events(ds.events, ds.n_users), TrainConfig())
    tr.module.cuda()
    tr.to(torch.device("cuda"))
    tr.module.eval()  # no dropout: compare one forward in both precisions
    batch = next(iter(tr.train_batches(0, np.random.default_rng(0))))
    from hnvm.distributed import to_device

    b = to_device(batch, torch.device("cuda"))
    torch.manual_seed(1)
    fp32 = tr.loss(b, 10**6)["loss"]
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = tr.loss(b, 10**6)["loss"]
    assert torch.isfinite(bf16) and float(bf16) == pytest.approx(float(fp32), rel=0.05)


def test_run_directory_with_device_cuda(tmp_path: Path) -> None:
    from hnvm.runs import evaluate_run, train_run

    ds = synthetic_dataset(n_users=80, n_items=40, n_topics=4, seed=2)
    ds.save(tmp_path / "data")
    _, out = train_run(tmp_path / "data", "hnvm", tmp_path / "run",
                       overrides=["train.epochs=2", "train.device=cuda", "model.hidden=16",
                                  "model.emb_dim=16", "model.n_negatives=32"])
    res = evaluate_run(out, device="cuda")
    res_cpu = evaluate_run(out, device="cpu")
    assert res.n_targets == res_cpu.n_targets > 0
    assert res.metrics["mrr@20"] == pytest.approx(res_cpu.metrics["mrr@20"], abs=0.02)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_with_nccl(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this Python")
    ds = synthetic_dataset(n_users=120, n_items=60, n_topics=4, seed=5)
    ds.save(tmp_path / "data")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "hnvm", "train", str(tmp_path / "data"),
           "--out", str(tmp_path / "run"), "--device", "cuda", "--set", "train.epochs=2",
           "--set", "model.hidden=16", "--set", "model.emb_dim=16"]
    res = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in log if r["type"] == "epoch"] == [2, 2]
