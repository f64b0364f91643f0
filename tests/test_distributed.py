"""Training across processes: two CPU processes (gloo) with DistributedDataParallel.

Checks that every neural model trains under DDP with identical parameters on both ranks, that
the HNVM loss falls, that validation (sharded and gathered) is identical on both ranks and
matches a single process with the same global batch within noise, that rank 0 alone writes,
and the shard / gather helpers and the `torchrun -m hnvm train` command line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hnvm.distributed import DistContext, shard_indices
from hnvm.evaluate import NEXT_ITEM_VALIDATION
from hnvm.training import TrainConfig

WORLD = 2
# carry_context off: the single-process comparison needs one algorithm on both sides (with carried
# contexts, a process re-encodes the windows whose predecessor another process trained)
HNVM_FAST = {"hidden": 16, "emb_dim": 16, "d_e": 4, "d_z": 4, "mlp_hidden": 16, "n_negatives": 32,
             "kl_anneal_epochs": 0.5, "carry_context": False}
# every other neural model, one epoch: DDP must see all their parameters used every step (HRNN
# with carried window states: that path under DDP)
OTHERS = {
    "hrnn": {"emb_dim": 8, "session_hidden": 8, "user_hidden": 8, "n_negatives": 16, "batch_size": 16,
             "carry_state": True},
    "gru4rec": {"layers": (8,), "batch_size": 8, "n_sample": 8, "sample_cache_size": 256},
    "caser": {"L": 3, "T": 2, "d": 8, "nv": 2, "nh": 4, "batch_size": 64},
    "stamp": {"d": 8, "batch_size": 64},
    "bprmf": {"dim": 8, "batch_size": 128},
    "ncf": {"factors": 4, "mlp_layers": 2, "batch_size": 128},
}
HNVM_BATCH = 16  # per process; the single-process comparison uses WORLD x this
HNVM_TRAIN = TrainConfig(epochs=4, optimizer="adam", lr=0.01, seed=3, patience=0, device="cpu",
                         metric="mrr@20")


def _data():
    from hnvm.data.samples import synthetic_dataset

    return synthetic_dataset(n_users=160, n_items=60, n_topics=4, seed=11)


def _model(name: str, overrides: dict):
    from hnvm.models.base import get_model_class

    cls = get_model_class(name)
    return cls(cls.config_class(**overrides))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.net.parameters()])


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from hnvm import distributed
    from hnvm.data.batches import Sequences
    from hnvm.evaluate import evaluate_next_item, evaluate_next_session

    out_dir = Path(out)
    ds = _data()
    seq = Sequences.from_events(ds.events, ds.n_users)
    report: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    torch.manual_seed(0)
    m = _model("hnvm", {**HNVM_FAST, "batch_size": HNVM_BATCH})
    m.fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=HNVM_TRAIN, run_dir=out_dir / "hnvm")
    item = evaluate_next_item(m, seq, "test", keep_ranks=True, max_targets=64)
    sess = evaluate_next_session(m, seq, "test", keep_ranks=True, max_users=16)
    report["hnvm"] = {"history": m.result_.history, "test": item.metrics, "session": sess.metrics}
    tensors["hnvm"] = _flat(m)
    # the gathered per-target ranks, in single-process order
    tensors["item_ranks"] = torch.from_numpy(item.ranks.to_numpy().astype("int64"))
    tensors["session_first_hit"] = torch.tensor(sess.ranks.get_column("first_hit_rank").to_list())
    tensors["session_topk"] = torch.tensor(sess.ranks.get_column("topk").to_list())
    for name, kw in OTHERS.items():
        torch.manual_seed(0)
        m = _model(name, kw)
        m.fit(ds, train_cfg=TrainConfig(epochs=1, optimizer="adagrad" if name == "gru4rec" else "adam",
                                              lr=0.01, seed=1, device="cpu"))
        tensors[name] = _flat(m)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"params{rank}.safetensors"))
    (out_dir / f"report{rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    from safetensors.torch import load_file

    params = [load_file(str(out / f"params{r}.safetensors")) for r in range(WORLD)]
    reports = [json.loads((out / f"report{r}.json").read_text()) for r in range(WORLD)]
    return out, params, reports


def test_parameters_identical_on_every_rank(two_ranks) -> None:
    _, params, _ = two_ranks
    assert {"hnvm", *OTHERS} <= set(params[0])
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), f"{name}: ranks diverged"


def test_loss_falls_and_ranks_agree_on_validation(two_ranks) -> None:
    _, _, reports = two_ranks
    h0, h1 = reports[0]["hnvm"]["history"], reports[1]["hnvm"]["history"]
    assert h0[-1]["rec"] < h0[0]["rec"]
    # epoch figures are all-reduced and validation is gathered: identical on both ranks
    assert [r["valid"] for r in h0] == [r["valid"] for r in h1]
    assert [r["loss"] for r in h0] == [r["loss"] for r in h1]
    assert h0[0]["processes"] == WORLD
    assert reports[0]["hnvm"]["test"] == reports[1]["hnvm"]["test"]
    assert reports[0]["hnvm"]["session"] == reports[1]["hnvm"]["session"]


def test_rank0_alone_writes(two_ranks) -> None:
    out, _, _ = two_ranks
    lines = (out / "hnvm" / "train_log.jsonl").read_text().splitlines()
    epochs = [json.loads(x) for x in lines if json.loads(x)["type"] == "epoch"]
    assert len(epochs) == HNVM_TRAIN.epochs  # one writer, not two
    assert (out / "hnvm" / "last" / "weights.safetensors").exists()


def test_matches_single_process_with_the_same_global_batch(two_ranks) -> None:
    from hnvm.data.batches import Sequences
    from hnvm.evaluate import evaluate_next_item, evaluate_next_session

    _, params, reports = two_ranks
    ds = _data()
    seq = Sequences.from_events(ds.events, ds.n_users)
    torch.manual_seed(0)
    m = _model("hnvm", {**HNVM_FAST, "batch_size": WORLD * HNVM_BATCH})
    m.fit(ds, validation=NEXT_ITEM_VALIDATION, train_cfg=HNVM_TRAIN)
    single = evaluate_next_item(m, seq, "test").metrics
    multi = reports[0]["hnvm"]["test"]
    # same number of steps and data; only the sampled negatives / dropout noise differ
    assert len(m.result_.history) == len(reports[0]["hnvm"]["history"])
    assert m.result_.history[-1]["step"] == reports[0]["hnvm"]["history"][-1]["step"]
    # noise: single-process runs with seeds 3..6 spread over 0.93-0.98 recall@20, 0.38-0.44 mrr@20
    for k in ("recall@20", "mrr@20"):
        assert abs(single[k] - multi[k]) < 0.15 * max(single[k], multi[k]) + 0.02, (k, single[k], multi[k])
    # and the 2-process model evaluated here, in one process, gives the gathered metrics
    flat = params[0]["hnvm"]
    offset = 0
    with torch.no_grad():
        for p in m.net.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
    m.net.eval()
    item = evaluate_next_item(m, seq, "test", keep_ranks=True, max_targets=64)
    assert item.metrics == pytest.approx(multi, abs=1e-12)
    assert torch.equal(torch.from_numpy(item.ranks.to_numpy().astype("int64")), params[0]["item_ranks"])
    sess = evaluate_next_session(m, seq, "test", keep_ranks=True, max_users=16)
    assert sess.metrics == pytest.approx(reports[0]["hnvm"]["session"], abs=1e-12)
    assert torch.equal(torch.tensor(sess.ranks.get_column("first_hit_rank").to_list()),
                       params[0]["session_first_hit"])
    assert torch.equal(torch.tensor(sess.ranks.get_column("topk").to_list()), params[0]["session_topk"])


def test_shard_indices_equal_counts_and_cover_everything() -> None:
    for n in (0, 1, 5, 6, 7, 64):
        for world in (1, 2, 3, 4):
            shards = [list(shard_indices(n, r, world)) for r in range(world)]
            assert len({len(s) for s in shards}) == 1  # no rank runs out early
            assert set().union(*map(set, shards)) == set(range(n))
    assert list(shard_indices(5, 0, 1)) == [0, 1, 2, 3, 4]


def test_single_process_context_is_inert() -> None:
    ctx = DistContext()
    assert not ctx.distributed and ctx.is_main and ctx.sparse_grads_ok
    assert ctx.any(True, False) == [True, False]
    assert ctx.sum([1.0, 2.0]) == [1.0, 2.0]
    t = torch.arange(3)
    assert ctx.gather_rows([t])[0] is t
    assert ctx.main_first(lambda: 7) == 7
    assert not DistContext(world_size=2, device=torch.device("cuda", 0)).sparse_grads_ok
    assert not DistContext(world_size=2, device=torch.device("cpu")).sparse_grads_ok  # dense under DDP


def test_torchrun_command_line(tmp_path: Path) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m hnvm train ...`: one run directory written
    by rank 0, a model that `hnvm evaluate` reads."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this Python")
    ds = _data()
    ds.save(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(WORLD), "-m", "hnvm", "train",
           str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", "bprmf", "--device", "cpu",
           "--set", "train.epochs=2", "--set", "model.dim=8", "--set", "model.batch_size=256"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("trained bprmf") == 1  # rank 0 alone reports
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]
    assert all(r.get("processes") == WORLD for r in log if r["type"] == "epoch")
    from hnvm.runs import evaluate_run

    res2 = evaluate_run(tmp_path / "run", device="cpu")
    assert res2.n_targets > 0 and np.isfinite(res2.metrics["mrr@5"])


def test_trainer_strides_over_a_trainable_that_does_not_shard_itself() -> None:
    from hnvm.distributed import DistContext
    from hnvm.training.loop import Trainer, _takes_shard

    class Plain:
        module = torch.nn.Linear(1, 1)

        def train_batches(self, epoch, rng):
            return iter(range(7))

    class Sharding(Plain):
        def train_batches(self, epoch, rng, *, rank=0, world_size=1):
            return iter(shard_indices(7, rank, world_size))

    assert not _takes_shard(Plain()) and _takes_shard(Sharding())
    t = Trainer(TrainConfig())

    def shards(trainable) -> list[list[int]]:
        out = []
        for r in range(WORLD):
            t.ctx = DistContext(rank=r, world_size=WORLD)
            out.append(list(t._batches(trainable, 0, np.random.default_rng(0))))
        return out

    # strided: disjoint, counts may differ by one (the step loop stops all ranks at the shortest)
    assert shards(Plain()) == [[0, 2, 4, 6], [1, 3, 5]]
    # self-sharded: equal counts, the last round wraps to the start
    assert shards(Sharding()) == [[0, 2, 4, 6], [1, 3, 5, 0]]
