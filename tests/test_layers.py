import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hnvm.models.layers import (
    GaussianHead,
    bpr_loss,
    bpr_max_loss,
    full_softmax_loss,
    gaussian_kl,
    init_uniform_,
    mlp,
    reparameterize,
    sampled_softmax_loss,
)


def _log_normal(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (math.log(2 * math.pi) + logvar + (x - mu) ** 2 / logvar.exp())).sum(-1)


def test_gaussian_kl_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([-0.5, 0.2, -2.0])
    mu_p, lv_p = torch.tensor([0.0, 0.5, 1.5]), torch.tensor([0.1, -0.3, -1.0])
    x = reparameterize(mu_q.expand(400_000, 3), lv_q.expand(400_000, 3), generator=g)
    mc = (_log_normal(x, mu_q, lv_q) - _log_normal(x, mu_p, lv_p)).mean()
    kl = gaussian_kl(mu_q, lv_q, mu_p, lv_p)
    assert kl.shape == ()
    assert kl.item() == pytest.approx(mc.item(), abs=0.01)
    # closed form for one dimension, by hand
    one = gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1))
    assert one.item() == pytest.approx(0.5)


def test_gaussian_kl_zero_iff_equal_and_sums_last_dim() -> None:
    mu, lv = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.allclose(gaussian_kl(mu, lv, mu, lv), torch.zeros(4), atol=1e-6)
    kl = gaussian_kl(mu, lv, mu + 0.1, lv - 0.2)
    assert kl.shape == (4,) and bool((kl > 0).all())


def test_reparameterize_moments_generator_and_gradient() -> None:
    mu = torch.full((200_000,), 1.5, requires_grad=True)
    logvar = torch.full((200_000,), math.log(0.25), requires_grad=True)
    x = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(1.5, abs=0.01)
    assert x.std().item() == pytest.approx(0.5, abs=0.01)
    x2 = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    x.sum().backward()
    assert mu.grad is not None and torch.allclose(mu.grad, torch.ones_like(mu))
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_mlp_and_gaussian_head_var_scale() -> None:
    net = mlp(6, 8, 3)
    assert [type(m) for m in net] == [nn.Linear, nn.Tanh, nn.Linear]
    torch.manual_seed(0)
    a = GaussianHead(6, 8, 3, var_scale=1.0)
    b = GaussianHead(6, 8, 3, var_scale=0.05)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6)
    (mu_a, lv_a), (mu_b, lv_b) = a(x), b(x)
    assert mu_a.shape == lv_a.shape == (2, 3)
    assert torch.allclose(mu_a, mu_b)
    assert torch.allclose(lv_b.exp(), 0.05 * lv_a.exp(), rtol=1e-5)
    with pytest.raises(ValueError):
        GaussianHead(6, 8, 3, var_scale=0.0)


def _ls(x: float) -> float:  # -log σ(x)
    return math.log1p(math.exp(-x))


def test_bpr_loss_hand_values_and_mask() -> None:
    pos = torch.tensor([1.0, 0.0])
    neg = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    row0, row1 = (_ls(1.0) + _ls(-1.0)) / 2, (_ls(-1.0) + _ls(1.0)) / 2
    assert bpr_loss(pos, neg).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    mask = torch.tensor([[True, False], [False, False]])  # row 1 has no valid negative
    per_row = bpr_loss(pos, neg, mask, reduction="none")
    assert per_row.tolist() == pytest.approx([_ls(1.0), 0.0], rel=1e-6)
    assert bpr_loss(pos, neg, mask, reduction="sum").item() == pytest.approx(_ls(1.0), rel=1e-6)


def test_bpr_loss_gradient_is_that_of_its_definition() -> None:
    """The closed-form gradient (_BPR) against autograd through the definition, with masked
    negatives, a row without any and large score gaps (softplus' linear region)."""
    g = torch.Generator().manual_seed(0)
    pos = (torch.randn(6, generator=g, dtype=torch.float64) * 10).requires_grad_()
    neg = (torch.randn(6, 9, generator=g, dtype=torch.float64) * 10).requires_grad_()
    mask = torch.rand(6, 9, generator=g) > 0.3
    mask[2] = False
    weights = torch.randn(6, generator=g, dtype=torch.float64)
    for m in (mask, None):
        valid = torch.ones(6, 9, dtype=torch.bool) if m is None else m
        want = (-F.logsigmoid(pos.unsqueeze(-1) - neg) * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        got = bpr_loss(pos, neg, m, reduction="none")
        torch.testing.assert_close(got, want)
        gw = torch.autograd.grad((want * weights).sum(), (pos, neg))
        gg = torch.autograd.grad((got * weights).sum(), (pos, neg))
        for a, b in zip(gg, gw, strict=True):
            torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda p, n: bpr_loss(p, n, mask, reduction="none"), (pos, neg))


def test_bpr_max_single_negative_is_bpr_plus_reg() -> None:
    pos, neg = torch.tensor([0.7, -0.2]), torch.tensor([[0.3], [1.1]])
    expect = bpr_loss(pos, neg, reduction="none") + 0.5 * neg[:, 0] ** 2
    got = bpr_max_loss(pos, neg, bpreg=0.5, reduction="none")
    assert torch.allclose(got, expect, atol=1e-6)


def test_bpr_max_hand_value_mask_and_empty_row() -> None:
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.0, 2.0]])
    s0, s1 = 1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect = -math.log(s0 * sig(1.0) + s1 * sig(-1.0)) + 0.1 * (s1 * 4.0)
    assert bpr_max_loss(pos, neg, bpreg=0.1).item() == pytest.approx(expect, rel=1e-6)
    # masking a negative = dropping it
    masked = bpr_max_loss(pos, neg, 0.1, torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(bpr_max_loss(pos, neg[:, :1], 0.1).item(), rel=1e-6)
    # no valid negative: zero loss, finite gradients
    p = pos.clone().requires_grad_()
    n = neg.clone().requires_grad_()
    loss = bpr_max_loss(p, n, 0.1, torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert p.grad is not None and n.grad is not None
    assert torch.isfinite(p.grad).all() and torch.isfinite(n.grad).all()


def test_bpr_max_prefers_higher_positive() -> None:
    neg = torch.tensor([[0.5, -0.5, 1.0]])
    low = bpr_max_loss(torch.tensor([0.0]), neg, 0.0)
    high = bpr_max_loss(torch.tensor([3.0]), neg, 0.0)
    assert high < low


def test_sampled_softmax_hand_value_logq_and_mask() -> None:
    pos, neg = torch.tensor([2.0]), torch.tensor([[1.0, 0.0]])
    expect = -math.log(math.e**2 / (math.e**2 + math.e + 1))
    assert sampled_softmax_loss(pos, neg).item() == pytest.approx(expect, rel=1e-6)
    # log-Q correction subtracts the log sampling probability from each logit
    lq_pos, lq_neg = torch.tensor([0.5]), torch.tensor([[1.0, -1.0]])
    corrected = sampled_softmax_loss(pos, neg, lq_pos, lq_neg)
    manual = sampled_softmax_loss(pos - lq_pos, neg - lq_neg)
    assert corrected.item() == pytest.approx(manual.item(), rel=1e-6)
    expect_q = -math.log(math.e**1.5 / (math.e**1.5 + math.e**0 + math.e**1))
    assert corrected.item() == pytest.approx(expect_q, rel=1e-6)
    # a constant log-Q changes nothing; a masked negative is dropped
    const = sampled_softmax_loss(pos, neg, torch.tensor([-3.0]), torch.full((1, 2), -3.0))
    assert const.item() == pytest.approx(expect, rel=1e-6)
    masked = sampled_softmax_loss(pos, neg, neg_mask=torch.tensor([[False, True]]))
    assert masked.item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + 1)), rel=1e-6)


def test_full_softmax_and_valid_cols() -> None:
    logits, targets = torch.randn(3, 6), torch.tensor([1, 5, 2])
    assert torch.allclose(full_softmax_loss(logits, targets), F.cross_entropy(logits, targets))
    valid = torch.tensor([False, True, True, True, True, True])  # column 0 = padding
    got = full_softmax_loss(logits, targets, valid_cols=valid)
    assert torch.allclose(got, F.cross_entropy(logits[:, 1:], targets - 1), atol=1e-6)


def test_init_uniform_variance_bias_and_padding() -> None:
    torch.manual_seed(0)
    m = nn.ModuleDict(
        {"lin": nn.Linear(300, 400), "gru": nn.GRU(50, 60), "emb": nn.Embedding(500, 40, 0)}
    )
    init_uniform_(m, std=0.1)
    bound = math.sqrt(3) * 0.1
    w = m["lin"].weight
    assert w.abs().max() <= bound and w.var().item() == pytest.approx(0.01, rel=0.05)
    assert m["lin"].bias.abs().sum() == 0
    assert m["gru"].bias_ih_l0.abs().sum() == 0 and m["gru"].bias_hh_l0.abs().sum() == 0
    assert m["gru"].weight_hh_l0.abs().max() <= bound
    assert m["emb"].weight[0].abs().sum() == 0 and m["emb"].weight[1:].abs().sum() > 0
