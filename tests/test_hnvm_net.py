import itertools
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from hnvm.models.hnvm_net import HNVMNet
from hnvm.models.layers import bpr_loss, full_softmax_loss, length_groups

N_ITEMS, N_USERS = 30, 5
SMALL = dict(hidden=16, emb_dim=12, d_e=4, d_z=6, mlp_hidden=16)


def make_net(seed: int = 0, **kw: object) -> HNVMNet:
    torch.manual_seed(seed)
    args = {**SMALL, "init_var": 0.1, **kw}
    return HNVMNet(n_items=N_ITEMS, n_users=N_USERS, **args)  # type: ignore[arg-type]


def random_items(B: int, W: int, T: int, seed: int = 0, min_len: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, T + 1, (B, W), generator=g)
    items = torch.randint(1, N_ITEMS + 1, (B, W, T), generator=g)
    return items * (torch.arange(T) < lens[..., None])


USERS = torch.tensor([1, 2, 0])  # 0 = the shared unknown user


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread pool's
    contention makes a step ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_shapes_and_masks() -> None:
    net = make_net().eval()
    items = random_items(3, 4, 7)
    out = net(USERS, items, None, sample=False)
    assert out.dec_hidden.shape == (3, 4, 7, 16)
    assert out.kl_z.shape == (3, 4) and out.kl_e.shape == (3,) and out.h_con.shape == (3, 4, 16)
    assert torch.equal(out.item_mask, items > 0)
    assert torch.equal(out.session_mask, (items > 0).any(-1))
    assert (out.dec_hidden[~out.item_mask] == 0).all()
    assert net.score(out.dec_hidden).shape == (3, 4, 7, N_ITEMS + 1)
    with pytest.raises(ValueError):  # a hole inside a session is rejected
        net(USERS, torch.tensor([[[1, 0, 2]]]).expand(3, 1, 3), None, sample=False)


def test_score_items_matches_full_score() -> None:
    net = make_net()
    h = torch.randn(5, 16)
    full = net.score(h)
    ids = torch.randint(1, N_ITEMS + 1, (5, 3))
    assert torch.allclose(net.score_items(h, ids), full.gather(1, ids), atol=1e-5)
    shared = torch.tensor([3, 1, 7, 7])
    assert torch.allclose(net.score_items(h, shared), full[:, shared], atol=1e-5)


def test_every_parameter_gets_gradient() -> None:
    for flags in [{}, {"use_e": False}, {"use_z": False}, {"use_e": False, "use_z": False}]:
        net = make_net(**flags).train()
        items = random_items(3, 3, 5, seed=1)
        out = net(USERS, items, torch.randn(3, 16), sample=True)
        logits = net.score(out.dec_hidden[out.item_mask])
        loss = full_softmax_loss(logits, items[out.item_mask]) + out.kl_z.sum() + out.kl_e.sum()
        loss.backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (flags, name)


def test_ablation_flags_remove_kl_and_parameters() -> None:
    items = random_items(3, 3, 5)
    full = make_net().train()(USERS, items, None, sample=True)
    assert (full.kl_e > 0).all() and (full.kl_z[full.session_mask] > 0).all()
    no_e = make_net(use_e=False)
    out = no_e.train()(USERS, items, None, sample=True)
    assert (out.kl_e == 0).all() and (out.kl_z[out.session_mask] > 0).all()
    assert not any(n.startswith("e_") for n, _ in no_e.named_parameters())
    no_z = make_net(use_z=False)
    out = no_z.train()(USERS, items, None, sample=True)
    assert (out.kl_z == 0).all() and (out.kl_e > 0).all()
    assert not any(n.startswith("z_") for n, _ in no_z.named_parameters())
    out = make_net(use_e=False, use_z=False)(USERS, items, None, sample=True)
    assert (out.kl_z == 0).all() and (out.kl_e == 0).all()


def _target_state(net: HNVMNet, items: torch.Tensor, n: int, t: int, **kw: object) -> torch.Tensor:
    out = net(USERS, items, None, sample=False, **kw)
    return torch.cat([out.dec_hidden[:, n, t], net.score(out.dec_hidden[:, n, t])], -1)


@pytest.mark.parametrize("mc_samples", [1, 4])
def test_no_leakage_at_inference(mc_samples: int) -> None:
    net = make_net().eval()
    items = random_items(3, 4, 6, seed=2, min_len=6)  # full sessions: every (n, t) is a target
    g = torch.Generator().manual_seed(5)
    for n in range(4):
        for t in range(6):
            kw = {"mc_samples": mc_samples, "generator": g}
            g.manual_seed(5)
            ref = _target_state(net, items, n, t, **kw)
            changed = items.clone()
            changed[:, n, t:] = (changed[:, n, t:] % N_ITEMS) + 1  # other real items
            changed[:, n + 1 :] = (changed[:, n + 1 :] * 7 % N_ITEMS) + 1
            changed[:, n + 1 :, 3:] = 0  # later sessions also change length
            g.manual_seed(5)
            assert torch.allclose(_target_state(net, changed, n, t, **kw), ref, atol=1e-6)
            if t > 0:  # sanity: the test can see a change at t - 1
                earlier = items.clone()
                earlier[:, n, t - 1] = (earlier[:, n, t - 1] % N_ITEMS) + 1
                g.manual_seed(5)
                assert not torch.allclose(_target_state(net, earlier, n, t, **kw), ref)


def test_training_posterior_does_read_the_session() -> None:
    """Counter-check that the leakage test is meaningful: q(z_n) sees the whole session."""
    net = make_net(dropout=0.0).train()
    items = random_items(3, 2, 6, seed=2, min_len=6)
    changed = items.clone()
    changed[:, 0, 5] = (changed[:, 0, 5] % N_ITEMS) + 1
    a = net(USERS, items, None, sample=True, generator=torch.Generator().manual_seed(0))
    b = net(USERS, changed, None, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a.dec_hidden[:, 0, 0], b.dec_hidden[:, 0, 0])


def test_padding_invariance() -> None:
    net = make_net().eval()
    items = random_items(3, 3, 5, seed=3)
    ref = net(USERS, items, None, sample=False)
    padded = torch.zeros(3, 5, 9, dtype=torch.long)  # 2 more sessions, 4 more positions
    padded[:, :3, :5] = items
    out = net(USERS, padded, None, sample=False)
    assert torch.allclose(out.dec_hidden[:, :3, :5], ref.dec_hidden, atol=1e-6)
    assert (out.dec_hidden[:, :, 5:] == 0).all() and (out.dec_hidden[:, 3:] == 0).all()
    assert torch.allclose(out.kl_z[:, :3], ref.kl_z, atol=1e-6) and (out.kl_z[:, 3:] == 0).all()
    assert torch.allclose(out.kl_e, ref.kl_e)
    assert torch.allclose(out.h_con[:, :3], ref.h_con, atol=1e-6)
    assert torch.allclose(out.h_con[:, 4], ref.h_con[:, 2], atol=1e-6)  # carried forward
    # another user's longer sessions in the batch change nothing either
    longer = torch.cat([padded, torch.randint(1, N_ITEMS + 1, (1, 5, 9))])
    out = net(torch.cat([USERS, torch.tensor([4])]), longer, None, sample=False)
    assert torch.allclose(out.dec_hidden[:3, :3, :5], ref.dec_hidden, atol=1e-6)
    assert torch.allclose(out.h_con[:3, :3], ref.h_con, atol=1e-6)
    assert torch.allclose(out.kl_z[:3, :3], ref.kl_z, atol=1e-6)


def _group_cost(lengths: np.ndarray, cuts: list[int], step_rows: float) -> float:
    return sum((step_rows + len(g)) * int(g.max()) for g in np.split(lengths, cuts) if len(g))


def test_length_groups_is_the_cheapest_grouping_with_enough_rows() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        lengths = np.sort(rng.integers(1, 12, size=int(rng.integers(1, 40))))
        step_rows, min_rows = float(rng.choice([0.0, 5.0, 20.0, 200.0])), int(rng.choice([1, 4, 8]))
        cuts = length_groups(lengths, step_rows, min_rows)
        groups = np.split(lengths, cuts)
        assert sum(map(len, groups)) == len(lengths) and all(len(g) for g in groups)
        assert len(groups) == 1 or min(map(len, groups)) >= min_rows
        # cuts only between different lengths, and no cheaper valid set of cuts exists
        assert all(lengths[c - 1] != lengths[c] for c in cuts)
        bounds = [i for i in range(1, len(lengths)) if lengths[i - 1] != lengths[i]]
        best = min(_group_cost(lengths, list(c), step_rows)
                   for r in range(len(bounds) + 1) for c in itertools.combinations(bounds, r)
                   if r == 0 or min(map(len, np.split(lengths, list(c)))) >= min_rows)
        assert _group_cost(lengths, cuts, step_rows) == pytest.approx(best), trial
    assert length_groups(np.array([], dtype=np.int64), 20.0) == []
    assert length_groups(np.array([1, 1, 2, 90]), 20.0) == []  # fewer than 8 rows: one group


def test_grouping_never_changes_a_state() -> None:
    """Sessions run in length groups give the states of one padded run (or any other grouping),
    in the order of items[item_mask]; only the cost differs. (Bit for bit with the CPU GEMMs
    measured, groups of >= 8 rows; the tolerance leaves room for other BLAS builds.)"""
    net = make_net(hidden=32, emb_dim=24).eval()
    g = torch.Generator().manual_seed(5)
    lengths = torch.cat([torch.randint(1, 4, (40,), generator=g), torch.randint(10, 25, (20,), generator=g)])
    seqs = torch.randint(1, N_ITEMS + 1, (60, 25), generator=g) * (torch.arange(25) < lengths[:, None])
    cond = torch.randn(60, net.decoder.input_size - net.item_emb.embedding_dim, generator=g)
    with torch.no_grad():
        grouped = [net._decode_valid(seqs, lengths, cond), net._encode(seqs, lengths)]
        assert len(net._buckets(lengths)) > 1
        net.step_rows = 1e9  # one group: every row padded to the longest
        assert len(net._buckets(lengths)) == 1
        single = [net._decode_valid(seqs, lengths, cond), net._encode(seqs, lengths)]
        x = torch.cat([torch.full((60, 1), net.bos), seqs[:, :-1]], 1)
        plain = net.decoder(torch.cat([net.item_emb(x), cond[:, None].expand(-1, 25, -1)], -1))[0]
    assert torch.allclose(grouped[0], single[0], atol=1e-6) and torch.allclose(grouped[1], single[1], atol=1e-6)
    assert torch.allclose(grouped[0], plain[torch.arange(25) < lengths[:, None]], atol=1e-6)


def test_empty_middle_session_is_skipped() -> None:
    net = make_net().eval()
    items = random_items(3, 2, 5, seed=4)
    ref = net(USERS, items, None, sample=False)
    gap = torch.zeros(3, 3, 5, dtype=torch.long)
    gap[:, 0], gap[:, 2] = items[:, 0], items[:, 1]
    out = net(USERS, gap, None, sample=False)
    assert torch.equal(out.session_mask[:, 1], torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(out.dec_hidden[:, [0, 2]], ref.dec_hidden, atol=1e-6)
    assert torch.allclose(out.h_con[:, 1], out.h_con[:, 0])
    assert torch.allclose(out.h_con[:, [0, 2]], ref.h_con, atol=1e-6)
    assert (out.kl_z[:, 1] == 0).all() and (out.dec_hidden[:, 1] == 0).all()
    # a user whose window is entirely empty keeps h_con0
    h0 = torch.randn(3, 16)
    empty = net(USERS, torch.zeros(3, 2, 4, dtype=torch.long), h0, sample=False)
    assert torch.allclose(empty.h_con, h0[:, None].expand(3, 2, 16))


def test_window_chaining_and_inference_helpers() -> None:
    net = make_net().eval()
    items = random_items(3, 4, 6, seed=6, min_len=4)
    full = net(USERS, items, None, sample=False)
    first = net(USERS, items[:, :2], None, sample=False)
    rest = net(USERS, items[:, 2:], first.h_con[:, -1], sample=False)
    assert torch.allclose(rest.dec_hidden, full.dec_hidden[:, 2:], atol=1e-5)
    h_hist = net.encode_history(USERS, items[:, :3])
    assert torch.allclose(h_hist, full.h_con[:, 2], atol=1e-6)
    # next session = the BOS step of session 3 under the prior
    nxt = net.next_session_hidden(USERS, h_hist)
    assert torch.allclose(nxt, full.dec_hidden[:, 3, 0], atol=1e-5)
    # after a prefix of L items: the state predicting item L + 1
    for L in range(4):
        h = net.prefix_hidden(USERS, h_hist, items[:, 3, :L])
        assert torch.allclose(h, full.dec_hidden[:, 3, L], atol=1e-5)


def test_mc_samples_average_prior_draws() -> None:
    items = random_items(3, 2, 5, seed=7)
    net = make_net().eval()
    mean = net(USERS, items, None, sample=False).dec_hidden
    mc = net(USERS, items, None, sample=False, mc_samples=8).dec_hidden
    assert not torch.allclose(mc, mean)
    tight = make_net(var_scale=1e-12).eval()  # draws collapse onto the prior mean
    mean = tight(USERS, items, None, sample=False).dec_hidden
    mc = tight(USERS, items, None, sample=False, mc_samples=8).dec_hidden
    assert torch.allclose(mc, mean, atol=1e-5)
    with pytest.raises(ValueError):
        net(USERS, items, None, sample=True, mc_samples=2)


@pytest.mark.parametrize("loss_name", ["full_softmax", "bpr"])
def test_overfits_tiny_personalised_data(loss_name: str) -> None:
    """4 users, each replaying its own order of the same 6 items: the next item depends on who
    the user is (via e and the history), so Recall@1 ≥ 0.9 needs the whole model to work."""
    torch.manual_seed(0)
    perms = [torch.randperm(6) + 1 for _ in range(4)]
    items = torch.stack([p.repeat(3, 1) for p in perms])  # [4, 3 sessions, 6]
    users = torch.tensor([1, 2, 3, 4])
    net = HNVMNet(
        n_items=6, n_users=4, hidden=32, emb_dim=16, d_e=8, d_z=8, mlp_hidden=32, dropout=0.0
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    mask = items > 0
    start = time.perf_counter()
    for _ in range(150):
        out = net(users, items, None, sample=True)
        h, targets = out.dec_hidden[mask], items[mask]  # [P, H], [P]
        if loss_name == "bpr":  # every other item is a negative
            negs = torch.arange(1, 7)
            pos = net.score_items(h, targets[:, None])[:, 0]
            rec = bpr_loss(pos, net.score_items(h, negs), negs != targets[:, None], "sum") / 4
        else:
            rec = full_softmax_loss(net.score(h), targets, reduction="sum") / 4
        loss = rec + 0.1 * (out.kl_z.sum() + out.kl_e.sum()) / 4
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        scores = net.score(net(users, items, None, sample=False).dec_hidden[mask])
    scores[:, 0] = -torch.inf
    recall1 = (scores.argmax(-1) == items[mask]).float().mean().item()
    assert recall1 >= 0.9
    assert time.perf_counter() - start < 10
