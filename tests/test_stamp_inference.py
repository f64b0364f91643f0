"""STAMP in inference on the CPU: the attention input W_1 x taken from a per-item table, and the
mask left out where it changes nothing, give the floats of the module's way (W_1 over the masked
embeddings of every prefix position) bit for bit; the table is built where it pays, kept while
the weights are the same and dropped when they change or training starts."""

from __future__ import annotations

import copy

import pytest
import torch

import hnvm.models.stamp as stamp
from hnvm.models.stamp import STAMPNet


def _net(d: int, n_items: int = 60, seed: int = 0, padding_row: bool = False) -> STAMPNet:
    torch.manual_seed(seed)
    net = STAMPNet(n_items=n_items, d=d, emb_std=0.5, weight_std=0.3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "bias" in name or name == "b_a":  # zero at init, which would hide an addition in another order
                p.uniform_(-0.5, 0.5)
        if padding_row:  # a padding embedding that is not 0 (a hand-edited or foreign checkpoint)
            net.item_emb.weight[0].uniform_(-1.0, 1.0)
    return net.eval()


def _prefixes(rows: int, width: int, n_items: int = 60, seed: int = 0) -> torch.Tensor:
    """Right-padded prefixes of 0..width items (some empty), one row of full width."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    lengths[0] = width
    return torch.randint(1, n_items + 1, (rows, width), generator=g) * (torch.arange(width) < lengths[:, None])


def _no_table(*args: object, **kwargs: object) -> None:
    raise AssertionError("the module's way read the table")


def _module_way(net: STAMPNet, prefix: torch.Tensor, max_len: int, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(stamp, "applies", lambda x: False)  # the way autograd and other CPUs take
        m.setattr(net.w1_table, "get", _no_table)
        return net(prefix, max_len)


@pytest.mark.parametrize(("rows", "width", "d", "n_items", "max_len", "padding_row"), [
    (8, 2, 16, 15, 0, False),  # 16 positions: the smallest product the table stands in for
    (40, 9, 24, 60, 0, False),
    (40, 9, 24, 60, 3, False),  # the mask drops real items: it is applied
    (40, 9, 24, 60, 0, True),  # the padding row is not 0: the mask is applied
    (300, 31, 100, 500, 0, False),
    (130, 7, 200, 60, 5, True),
    (40, 9, 16, 60, 0, False),  # MIN_WIDTH
])
def test_scores_from_the_item_table_are_the_modules(rows: int, width: int, d: int, n_items: int, max_len: int,
                                                     padding_row: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net(d, n_items=n_items, padding_row=padding_row)
    prefix = _prefixes(rows, width, n_items=n_items)
    with torch.no_grad():
        fast = net(prefix, max_len)
        assert net.w1_table._built is not None  # the table's way was taken
        want = _module_way(net, prefix, max_len, monkeypatch)
        assert torch.equal(fast, want)
        assert torch.equal(net.score_all(fast), net.score_all(want))


@pytest.mark.parametrize("d", [5, 7, 9, 11])
def test_narrow_embeddings_take_the_modules_way(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Square products of these widths give a row other bits by its place in the call: no table."""
    net = _net(d)
    prefix = _prefixes(40, 9)
    with torch.no_grad():
        got = net(prefix)
        assert net.w1_table._built is None
        assert torch.equal(got, _module_way(net, prefix, 0, monkeypatch))


@pytest.mark.parametrize("d", [100, 256])
def test_small_calls_after_the_table_is_built_take_the_modules_way(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under MIN_ROWS positions a product may take kernels whose last bits differ from the table's."""
    net = _net(d)
    with torch.no_grad():
        net(_prefixes(40, 9))
        assert net.w1_table._built is not None
        for rows, width in ((3, 1), (2, 3), (1, 5), (11, 1), (5, 3)):
            prefix = _prefixes(rows, width, seed=rows * width)
            assert torch.equal(net(prefix), _module_way(net, prefix, 0, monkeypatch))


def test_one_thread_gives_the_modules_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = _net(100, n_items=500)
        prefix = _prefixes(300, 31, n_items=500)
        with torch.no_grad():
            assert torch.equal(net(prefix), _module_way(net, prefix, 0, monkeypatch))
            assert net.w1_table._built is not None
    finally:
        torch.set_num_threads(threads)


def test_a_prefix_that_is_not_right_padded_is_masked_as_the_module_masks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net(24)
    prefix = _prefixes(40, 9)
    prefix[3, 2:] = 0
    prefix[3, 6] = 17  # an item after a gap: outside the positions the module reads
    with torch.no_grad():
        assert torch.equal(net(prefix), _module_way(net, prefix, 0, monkeypatch))


def test_the_table_is_built_where_it_pays_kept_and_dropped_when_weights_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net(16, n_items=60)
    with torch.no_grad():
        net(_prefixes(3, 4))  # 12 positions: under MIN_ROWS, the module's product
        assert net.w1_table._built is None
        net(_prefixes(10, 5))  # 50 positions < 61 table rows: not worth building
        assert net.w1_table._built is None
        net(_prefixes(20, 5))
        first = net.w1_table._built[2]
        assert torch.equal(first, torch.nn.functional.linear(net.item_emb.weight, net.W1.weight))
        net(_prefixes(10, 5))  # kept: the same weights, however few the positions
        assert net.w1_table._built[2] is first
        net.W1.weight.add_(0.1)  # an optimizer's in-place step
        net(_prefixes(20, 5))
        second = net.w1_table._built[2]
        assert second is not first and not torch.equal(second, first)
        net.item_emb.weight[5].add_(1.0)  # the embedding is part of the key too
        net(_prefixes(20, 5))
        third = net.w1_table._built[2]
        assert third is not second
        assert torch.equal(third, torch.nn.functional.linear(net.item_emb.weight, net.W1.weight))
        net.load_state_dict(_net(16, n_items=60, seed=1).state_dict())  # copies in place
        prefix = _prefixes(20, 5)
        assert torch.equal(net(prefix), _module_way(net, prefix, 0, monkeypatch))
        assert net.w1_table._built[2] is not third
        net.W1.weight.data.mul_(2.0)  # through .data: no version bump, so the owner clears
        net.w1_table.clear()
        assert torch.equal(net(prefix), _module_way(net, prefix, 0, monkeypatch))
    copied = copy.deepcopy(net)  # a lock does not copy: the copy starts without a table
    assert copied.w1_table._built is None and net.w1_table._built is not None
    with torch.no_grad():
        assert torch.equal(copied(prefix), net(prefix))
    net.train()
    assert net.w1_table._built is None
    net.eval()
    with torch.no_grad():
        net(_prefixes(20, 5, seed=1))
    assert net.w1_table._built is not None
    with torch.enable_grad():  # training's forward takes the module's way, with its graph
        net.train()
        net(_prefixes(20, 5)).sum().backward()
    assert net.W1.weight.grad is not None and net.w1_table._built is None


def test_training_gradients_are_those_of_the_paper_s_formula_in_its_order() -> None:
    """Training takes the module's way with the operations in their original order: autograd sums
    x's gradient terms in the order their nodes were made, so computing W_1 x earlier would change
    the gradient's last bits (and every trained weight after it)."""
    net = _net(24).train()
    prefix = _prefixes(40, 9)
    net(prefix).sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    lengths = (prefix > 0).sum(1, keepdim=True).clamp(min=1)
    mask = (torch.arange(prefix.shape[1]).unsqueeze(0) < lengths).unsqueeze(-1).float()
    x = net.item_emb(prefix) * mask
    m_s = x.sum(1) / mask.sum(1)
    x_t = x[torch.arange(len(prefix)), lengths.squeeze(1) - 1]
    act = torch.sigmoid(net.W1(x) + (net.W2(x_t) + net.W3(m_s) + net.b_a).unsqueeze(1))
    m_a = (net.w0(act) * mask * x).sum(1)
    (torch.tanh(net.mlp_s(m_a)) * torch.tanh(net.mlp_t(x_t))).sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(got, net.parameters(), strict=True))
