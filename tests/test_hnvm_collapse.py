"""Posterior collapse: the diagnostics that show it (KL per dimension, active units, mutual
information) and the remedies HNVM offers (free bits, cyclical annealing, decoder input
dropout, var_scale outside the KL), each against what it must do."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from hnvm.cli import app
from hnvm.data.samples import synthetic_dataset
from hnvm.models.hnvm import HNVM, HNVMConfig, _HNVMTrainable
from hnvm.models.hnvm_latent import free_bits_kl, mutual_information
from hnvm.models.hnvm_net import HNVMNet
from hnvm.models.layers import gaussian_kl_dims
from hnvm.training import TrainConfig

SMALL = dict(hidden=16, emb_dim=16, d_e=4, d_z=4, mlp_hidden=16, n_negatives=32, batch_size=16)


def test_mutual_information_is_zero_without_information_and_log_n_with_all() -> None:
    g = torch.Generator().manual_seed(0)
    n = 256
    same = mutual_information(torch.zeros(n, 8), torch.zeros(n, 8), g)
    apart = mutual_information(torch.arange(n, dtype=torch.float)[:, None].repeat(1, 8) * 100,
                               torch.full((n, 8), -4.0), g)
    assert abs(same) < 1e-4
    assert apart == pytest.approx(math.log(n), abs=1e-3)


def _out(kl_z_dims: torch.Tensor, kl_e_dims: torch.Tensor, session_mask: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(kl_z_dims=kl_z_dims, kl_e_dims=kl_e_dims, session_mask=session_mask,
                           kl_z=kl_z_dims.sum(-1))


def test_free_bits_floor_each_dimension_and_stop_its_gradient() -> None:
    mask = torch.tensor([[True, True, False]])
    z = torch.tensor([[[0.001, 2.0], [0.003, 4.0], [0.0, 0.0]]], requires_grad=True)  # [1, 3, 2]
    e = torch.tensor([[0.5, 0.001]], requires_grad=True)
    w = torch.tensor([0.5])
    total = free_bits_kl(_out(z, e, mask), w, floor=0.1)
    # z: dim 0 averages 0.002 < 0.1 -> 2 sessions x 0.1; dim 1 averages 3.0 -> 6.0
    # e: dim 0 0.5 -> 0.5 x 0.5; dim 1 0.001 < 0.1 -> 0.5 x 0.1
    assert float(total.detach()) == pytest.approx(2 * 0.1 + 6.0 + 0.5 * 0.5 + 0.5 * 0.1)
    total.backward()
    assert z.grad is not None and e.grad is not None
    assert torch.equal(z.grad[0, :, 0], torch.zeros(3)) and z.grad[0, 0, 1] == 1.0
    assert e.grad[0, 1] == 0 and e.grad[0, 0] == 0.5
    # no dimension below the floor: the plain KL (z summed over real sessions, e weighted by w_u)
    plain = free_bits_kl(_out(z.detach(), e.detach(), mask), w, floor=1e-6)
    assert float(plain) == pytest.approx(float(z.detach().sum() + 0.5 * e.detach().sum()), rel=1e-6)
    big = torch.ones(1, 3, 2)
    big[0, 2] = 0
    assert float(free_bits_kl(_out(big, torch.ones(1, 2), mask), w, floor=0.5)) == pytest.approx(4.0 + 1.0)


def _trainable(**cfg: object) -> _HNVMTrainable:
    t = object.__new__(_HNVMTrainable)
    t.cfg = HNVMConfig(**cfg)  # type: ignore[arg-type]
    t.steps_per_epoch = 10
    return t


def test_cyclical_annealing_rises_over_each_first_half_then_holds_one() -> None:
    t = _trainable(kl_schedule="cyclical", kl_anneal_epochs=2.0, kl_cycles=3)  # cycles of 20 steps
    got = [t.beta(s) for s in (0, 5, 10, 15, 19, 20, 25, 30, 59, 60, 500)]
    assert got == [0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    # the weights after `step` steps are selectable when the last step's beta was 1
    assert [t.selectable(s) for s in (5, 10, 11, 20, 21, 60)] == [False, False, True, True, False, True]
    linear = _trainable(kl_anneal_epochs=2.0)
    assert [linear.beta(s) for s in (0, 10, 20, 45)] == [0.0, 0.5, 1.0, 1.0]


def _net(**kw: object) -> HNVMNet:
    torch.manual_seed(0)
    return HNVMNet(n_items=30, n_users=5, hidden=8, emb_dim=8, d_e=3, d_z=3, mlp_hidden=8, dropout=0.0, **kw)


def test_word_dropout_acts_in_training_only_and_keeps_bos() -> None:
    items = torch.randint(1, 31, (4, 2, 6))
    users = torch.arange(1, 5)
    plain, dropped = _net(), _net(word_dropout=0.9)
    dropped.load_state_dict(plain.state_dict())
    for m in (plain, dropped):
        m.eval()
    a = plain(users, items, sample=False).dec_hidden
    assert torch.equal(a, dropped(users, items, sample=False).dec_hidden)  # eval: no dropout
    dropped.train()
    torch.manual_seed(1)
    b = dropped._decode_valid(items[:, 0], torch.full((4,), 6), torch.zeros(4, 8 + 3)).view(4, 6, -1)
    c = plain._decode_valid(items[:, 0], torch.full((4,), 6), torch.zeros(4, 8 + 3)).view(4, 6, -1)
    assert torch.equal(b[:, 0], c[:, 0])  # the BOS step is never dropped
    assert not torch.allclose(b[:, 1:], c[:, 1:])
    with pytest.raises(ValueError, match="word_dropout"):
        _net(word_dropout=1.0)


def test_var_scale_outside_the_kl_is_the_unscaled_kl() -> None:
    inside, outside = _net(var_scale=0.05), _net(var_scale=0.05, var_scale_in_kl=False)
    mu_q, mu_p = torch.randn(5, 3), torch.randn(5, 3)
    lv = torch.zeros(5, 3) + math.log(0.05)  # both variances 0.05 (raw 1): only the mean term is left
    kin, kout = inside.kl_dims(mu_q, lv, mu_p, lv), outside.kl_dims(mu_q, lv, mu_p, lv)
    assert torch.allclose(kout, 0.5 * (mu_q - mu_p) ** 2)
    assert torch.allclose(kin, kout / 0.05, rtol=1e-4)  # inside, var_scale multiplies the mean term by 20
    assert torch.allclose(kout, gaussian_kl_dims(mu_q, torch.zeros(5, 3), mu_p, torch.zeros(5, 3)))


@pytest.fixture(scope="module")
def synth():
    return synthetic_dataset(n_users=60, n_items=50, n_topics=5, seed=3, sessions_per_user=(4, 6))


@pytest.mark.parametrize("remedy", [{"free_bits": 0.1}, {"kl_schedule": "cyclical", "kl_anneal_epochs": 1.0},
                                    {"word_dropout": 0.3}, {"var_scale_in_kl": True}])
def test_each_remedy_trains_and_changes_training(remedy: dict, synth) -> None:
    tc = TrainConfig(epochs=2, patience=0, seed=2)
    base = HNVM(HNVMConfig(**SMALL)).fit(synth, train_cfg=tc)
    other = HNVM(HNVMConfig(**SMALL, **remedy)).fit(synth, train_cfg=tc)
    assert other.result_ is not None and other.result_.epochs_run == 2
    changed = [not torch.equal(a, b) for a, b in zip(base.net.state_dict().values(),
                                                     other.net.state_dict().values(), strict=True)]
    assert any(changed)
    lat = other.latent_diagnostics(synth)
    assert set(lat) >= {"kl_z_per_dim", "active_z", "mi_z", "kl_e_per_dim", "active_e", "mi_e"}


def test_evaluate_prints_and_records_the_latents(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "d"
    synthetic_dataset(n_users=40, n_items=60, n_topics=5, seed=1).save(data)
    args = ["train", str(data), "--model", "hnvm", "--out", str(tmp_path / "r"), "--set", "train.epochs=1"]
    for k, v in SMALL.items():
        args += ["--set", f"model.{k}={v}"]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, ["evaluate", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "latents on the training split" in r.output and "MI" in r.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())["next-item/test"]
    assert {"active_z", "mi_z", "kl_z_per_dim"} <= set(m["latent"])
