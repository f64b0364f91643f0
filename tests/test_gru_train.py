"""The training GRU (hnvm.models.gru_train) against autograd through torch's nn.GRU: the same
forward floats bit for bit, gradients as close to a float64 reference as autograd's own, what it
declines, and HNVM's and HRNN's training passes through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hnvm.models import gru_train
from hnvm.models.hnvm_net import HNVMNet
from hnvm.models.hrnn import HRNNNet
from hnvm.models.layers import module_outputs

COMPILED = gru_train.gru_sequence
COMPILED_APPLY = gru_train._GRUSequence.apply


def _gru(i: int, h: int, seed: int = 0) -> nn.GRU:
    torch.manual_seed(seed)
    return nn.GRU(i, h, batch_first=True)


def _ours(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and "GRUSequence" in type(out.grad_fn).__name__


@pytest.mark.parametrize("n", [1, 3, 17, 64])
@pytest.mark.parametrize("t", [1, 5, 23])
@pytest.mark.parametrize("sizes", [(12, 16), (200, 200), (464, 200)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_forward_equals_nn_gru_bit_for_bit(n: int, t: int, sizes: tuple[int, int], with_h0: bool) -> None:
    # (fails if an addition or product between torch's calls is fused or reordered, or a sigmoid
    # runs over [n, 2H] instead of [n, H] chunks)
    gru = _gru(*sizes)
    x = torch.randn(n, t, sizes[0], requires_grad=True)
    h0 = torch.randn(n, sizes[1]) if with_h0 else None
    out = gru_train.gru_sequence(gru, x, h0)
    assert _ours(out)
    expected = gru(x, None if h0 is None else h0[None])[0]
    assert out.shape == expected.shape == (n, t, sizes[1])
    assert torch.equal(out, expected)


def _gradients(gru: nn.GRU, x: torch.Tensor, h0: torch.Tensor | None, weight: torch.Tensor,
               ours: bool) -> list[torch.Tensor]:
    """d(sum(out · weight)) / d(x, h0, W_ih, W_hh, b_ih, b_hh), through gru_sequence or the module."""
    gru.zero_grad()
    x = x.detach().clone().requires_grad_()
    h0 = None if h0 is None else h0.detach().clone().requires_grad_()
    out = COMPILED(gru, x, h0) if ours else gru(x, None if h0 is None else h0[None])[0]
    assert _ours(out) == ours
    (out * weight).sum().backward()
    grads = [x.grad, *([] if h0 is None else [h0.grad]), *(p.grad for p in gru.parameters())]
    assert all(g is not None for g in grads)
    return [g.double() for g in grads]  # type: ignore[union-attr]


@pytest.mark.parametrize("n,t,i,h", [(1, 1, 4, 3), (5, 9, 12, 16), (40, 7, 200, 200), (29, 38, 464, 200)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("sparse_weight", [False, True])
def test_gradients_as_close_to_a_float64_reference_as_autograds(n: int, t: int, i: int, h: int, with_h0: bool,
                                                                sparse_weight: bool) -> None:
    # sparse_weight: most outputs unused, as when a model gathers each row's last real state
    # (fails if a gate's gradient, the carried state's or an output's is dropped or misplaced)
    gru = _gru(i, h)
    x, h0 = torch.randn(n, t, i), (torch.randn(n, h) if with_h0 else None)
    weight = torch.randn(n, t, h)
    if sparse_weight:
        weight = weight * (torch.rand(n, t, 1) < 0.2)
    ours = _gradients(gru, x, h0, weight, ours=True)
    theirs = _gradients(gru, x, h0, weight, ours=False)
    ref = _gradients(gru.double(), x.double(), None if h0 is None else h0.double(), weight.double(), ours=False)
    for a, b, r in zip(ours, theirs, ref, strict=True):
        scale = float(r.abs().max()) or 1.0
        err_ours, err_theirs = float((a - r).abs().max()) / scale, float((b - r).abs().max()) / scale
        assert err_ours <= 4 * err_theirs + 1e-6, (err_ours, err_theirs)
        assert err_ours < 2e-5


def test_declines_what_it_does_not_cover() -> None:
    x = torch.randn(3, 4, 5, requires_grad=True)
    with torch.no_grad():  # inference: the module (and gru_inference's ways) are faster
        assert torch.equal(gru_train.gru_sequence(_gru(5, 6), x), _gru(5, 6)(x)[0])
    for gru in (nn.GRU(5, 6, num_layers=2, batch_first=True), nn.GRU(5, 6, batch_first=True, bidirectional=True),
                nn.GRU(5, 6), nn.GRU(5, 6, batch_first=True, bias=False)):
        assert not gru_train.applies(gru, x)
        assert not _ours(gru_train.gru_sequence(gru, x))
    gru = _gru(5, 6)
    assert not _ours(gru_train.gru_sequence(gru.double(), x.double()))
    assert not gru_train.applies(gru.float(), x, torch.randn(3, 7))  # h0 of the wrong width
    assert not gru_train.applies(gru, x, torch.randn(6, 3).t())  # h0 not contiguous
    assert not gru_train.applies(gru, x[:, :0])  # no time step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gru_train.applies(gru, x)
    with pytest.raises(RuntimeError, match=r"input\.size"):  # the module's own error for a wrong width
        gru_train.gru_sequence(gru, torch.randn(3, 4, 7, requires_grad=True))
    seen = []
    handle = gru.register_forward_pre_hook(lambda module, args: seen.append(1))
    out = gru_train.gru_sequence(gru, x)  # a hook (pruning, weight_norm) runs with the module
    handle.remove()
    assert seen and not _ours(out)


def test_any_input_layout_and_inputs_without_gradient() -> None:
    gru = _gru(5, 6)
    base = torch.randn(4, 3, 5)
    for x in (base.transpose(0, 1).requires_grad_(), base.clone()):  # non-contiguous; no gradient wanted
        gru.zero_grad()
        out = gru_train.gru_sequence(gru, x)
        assert _ours(out) and torch.equal(out, gru(x)[0])
        out.pow(2).sum().backward()
        ours = [p.grad.clone() for p in gru.parameters()] + ([x.grad] if x.requires_grad else [])
        gru.zero_grad()
        x2 = x.detach().clone().requires_grad_(x.requires_grad)
        gru(x2)[0].pow(2).sum().backward()
        theirs = [p.grad for p in gru.parameters()] + ([x2.grad] if x.requires_grad else [])
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _compare_training_passes(monkeypatch: pytest.MonkeyPatch, run: object) -> None:
    """`run()` -> (loss, module) twice from the same seed: through gru_train, then through the
    module; the losses equal bit for bit, the gradients within float rounding."""
    results = []
    for way in (COMPILED, module_outputs):
        monkeypatch.setattr(gru_train, "gru_sequence", way)
        torch.manual_seed(1)
        loss, module = run()  # type: ignore[operator]
        module.zero_grad()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hnvm_training_pass_takes_it_with_the_same_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = HNVMNet(n_items=30, n_users=5, hidden=16, emb_dim=12, d_e=4, d_z=6, mlp_hidden=16, init_var=0.1).train()
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 8, (3, 4), generator=g)
    items = torch.randint(1, 31, (3, 4, 7), generator=g) * (torch.arange(7) < lens[..., None])
    taken = []
    monkeypatch.setattr(gru_train._GRUSequence, "apply", lambda *a: taken.append(1) or COMPILED_APPLY(*a))

    def run() -> tuple[torch.Tensor, nn.Module]:
        out = net(torch.tensor([1, 2, 0]), items, None, sample=True)
        return (out.states ** 2).sum() + out.kl_z.sum() + out.kl_e.sum(), net

    _compare_training_passes(monkeypatch, run)
    assert taken  # the encoder and decoder went through gru_train


def test_hrnn_training_pass_takes_it_with_the_same_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = HRNNNet(n_items=30, emb_dim=8, session_hidden=6, user_hidden=5).train()
    items = torch.tensor([[[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]], [[0, 0, 0, 0, 0], [3, 4, 8, 0, 0]]])
    taken = []
    monkeypatch.setattr(gru_train._GRUSequence, "apply", lambda *a: taken.append(1) or COMPILED_APPLY(*a))

    def run() -> tuple[torch.Tensor, nn.Module]:
        out = net(items)
        return (out.pred_states ** 2).sum() + out.user_out.sum(), net

    _compare_training_passes(monkeypatch, run)
    assert taken  # the session GRU went through gru_train


def test_frozen_weights_get_no_gradient_and_the_input_still_does() -> None:
    gru = _gru(5, 6)
    gru.weight_ih_l0.requires_grad_(False)
    gru.bias_hh_l0.requires_grad_(False)
    x = torch.randn(3, 4, 5, requires_grad=True)
    out = gru_train.gru_sequence(gru, x)
    assert _ours(out)
    out.sum().backward()
    assert gru.weight_ih_l0.grad is None and gru.bias_hh_l0.grad is None
    assert gru.weight_hh_l0.grad is not None and gru.bias_ih_l0.grad is not None and x.grad is not None
    expected = torch.autograd.grad(gru(x)[0].sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
