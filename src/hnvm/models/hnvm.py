"""HNVM as a Recommender (Xiao, Liang & Meng, WWW 2019): its hyper-parameters (`HNVMConfig`),
the estimator (`HNVM`: leakage-free scoring, and the step-by-step online inference the engine
serves with) and what the generic trainer fits (`_HNVMTrainable`: the loss of eq. 18-24). The
network itself (eq. 6-15) is `hnvm.models.hnvm_net`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hnvm.config import choices, rng
from hnvm.contract import Batch
from hnvm.data.batches import Sequences, user_windows, window_batches
from hnvm.data.sampling import popularity_probs, train_counts
from hnvm.models.base import NetPersistence, register
from hnvm.models.carry import CarriedStates
from hnvm.models.gru_inference import prior_states
from hnvm.models.hnvm_latent import free_bits_kl, latent_diagnostics
from hnvm.models.hnvm_net import HNVMNet
from hnvm.models.hnvm_repeat import Pairs, RepeatMemory, history_pairs, loss_scorers, prefix_pairs
from hnvm.models.layers import keep_last_items, ranking_loss
from hnvm.training import TrainConfig, fit

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@dataclass(frozen=True)
class HNVMConfig:
    """Hyper-parameters of HNVM (section [model] of a config file). Ranges are what `hnvm tune`
    searches within and what the config loader accepts."""

    hidden: int = field(default=100, metadata=rng(8, 2048, "H of all three GRUs (paper 200)"))
    emb_dim: int = field(default=100, metadata=rng(8, 2048, "item input embedding size"))
    d_e: int = field(default=32, metadata=rng(1, 1024, "general preference e^u size"))
    d_z: int = field(default=32, metadata=rng(1, 1024, "long-term preference z_n size"))
    mlp_hidden: int = field(default=100, metadata=rng(8, 2048, "prior/posterior MLP width"))
    dropout: float = field(default=0.1, metadata=rng(0.0, 0.9))
    var_scale: float = field(default=0.05, metadata=rng(1e-4, 1.0, "variance multiplier (paper 0.05)"))
    init_var: float = field(default=0.01, metadata=rng(1e-6, 1.0, "uniform init variance"))
    use_e: bool = True
    use_z: bool = True
    use_history: bool = True  # False: every session on its own (history-blind ablation)
    loss: str = field(default="bpr-max", metadata=choices("bpr", "bpr-max", "sampled-softmax", "full-softmax"))
    n_negatives: int = field(default=1024, metadata=rng(1, 100_000, "shared popularity-sampled negatives"))
    sample_alpha: float = field(default=0.5, metadata=rng(0.0, 1.0, "negatives ~ count^alpha"))
    bpreg: float = field(default=1.0, metadata=rng(0.0, 100.0, "bpr-max score regulariser"))
    batch_size: int = field(default=64, metadata=rng(1, 100_000, "user windows per step"))
    window: int = field(default=8, metadata=rng(1, 10_000, "sessions per training window W"))
    carry_context: bool = True  # a window's entering context: from the previous window (carry.py); False: encoded
    max_len: int = field(default=0, metadata=rng(0, 100_000, "keep the last max_len items of longer sessions; 0 = all"))
    # β rises linearly from 0 to 1 over this many epochs (a fraction of an epoch is fine), so the
    # warm-up does not depend on the data size or the batch size; an epoch is only selected as the
    # best once β = 1 (the full ELBO), see `_HNVMTrainable.selectable`
    kl_anneal_epochs: float = field(default=1.0, metadata=rng(
        0.0, 1000.0, "epochs for beta 0 -> 1; 0 = 1 from the start"))
    # Posterior-collapse remedies (docs/design.md, "HNVM": what each gave on the Instacart sample)
    kl_schedule: str = field(default="linear", metadata=choices("linear", "cyclical"))
    kl_cycles: int = field(default=4, metadata=rng(
        1, 1000, "cyclical: cycles of kl_anneal_epochs epochs, beta 0 -> 1 over each first half (Fu et al. 2019)"))
    free_bits: float = field(default=0.0, metadata=rng(
        0.0, 10.0, "KL floor per latent dimension in nats, batch-averaged (Kingma et al. 2016); 0 = off"))
    word_dropout: float = field(default=0.0, metadata=rng(
        0.0, 0.99, "share of decoder input items replaced by a zero vector in training (Bowman et al. 2016)"))
    # False (default): the KL sees the unscaled Gaussians and var_scale only scales sampling (a
    # temperature); True: the paper read literally, which collapses z (docs/design.md, "HNVM")
    var_scale_in_kl: bool = False
    mc_samples: int = field(default=1, metadata=rng(1, 1000, "prior samples averaged at inference"))
    # Row 0 of the user tables is the unknown user (cold start). 0 (default): after training it becomes
    # the aggregate of the trained users' e (training untouched); > 0: that share of the training
    # windows is read as user 0, which learns e directly. On the Instacart demo (2 seeds) 0.05 cost
    # known users 3-5% next-item MRR@5 with no measurable cold-start gain, hence the default.
    unknown_user_rate: float = field(default=0.0, metadata=rng(
        0.0, 0.5, "share of training windows read as the unknown user 0 (trains the cold-start e); "
        "0 = row 0 is the trained users' aggregate"))
    sparse: bool = True  # sparse item/user-table updates (sampled losses); False = dense as before
    # Not in the paper: the repeat channel (hnvm.models.hnvm_repeat), a learned, state-gated score
    # term from what the user did with each item before; False = the paper's HNVM exactly
    repeat: bool = False


@register("hnvm")
class HNVM(NetPersistence):
    """HNVM as a Recommender: `HNVM(HNVMConfig(...)).fit(dataset)`."""

    name = "hnvm"
    config_class = HNVMConfig
    dims = ("n_items", "n_users")
    extra_tensors = ("counts_",)

    def __init__(self, config: HNVMConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or HNVMConfig(), **overrides)
        self.net: HNVMNet | None = None
        self.counts_: Tensor | None = None
        self.n_items = self.n_users = 0
        self.result_: Any = None

    # -- construction ---------------------------------------------------------------------------
    def _build(self, n_items: int, n_users: int) -> HNVMNet:
        c = self.config
        self.n_items, self.n_users = n_items, n_users
        return HNVMNet(n_items=n_items, n_users=n_users, hidden=c.hidden, emb_dim=c.emb_dim,
                       d_e=c.d_e, d_z=c.d_z, mlp_hidden=c.mlp_hidden, dropout=c.dropout,
                       var_scale=c.var_scale, init_var=c.init_var, use_e=c.use_e, use_z=c.use_z,
                       sparse=c.sparse and c.loss != "full-softmax",  # full softmax scores every row
                       var_scale_in_kl=c.var_scale_in_kl, word_dropout=c.word_dropout, repeat=c.repeat)

    def fit(self, train: Dataset, **options: Any) -> HNVM:
        """Train on `train` (options: `hnvm.training.fit`); returns self."""
        return fit(self, train, **options)

    def latent_diagnostics(self, data: Dataset, seq: Sequences | None = None) -> dict[str, float]:
        """What the trained latents carry on `data`'s training split: KL per dimension, active
        units and mutual information of z and e (`latent_diagnostics`; shown by `hnvm evaluate`).
        `seq`: `data` as Sequences when the caller has it (built here otherwise)."""
        seq = seq if seq is not None else Sequences.from_events(data.events, data.n_users, data.held_out_items)
        seq = seq.view(("train",))
        c = self.config
        n_train = np.bincount(seq.session_user, minlength=len(seq.user_first))
        return latent_diagnostics(self.network(), c, seq, user_windows(seq, c.window if c.use_history else 1),
                                  untrained_users(n_train))

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> _HNVMTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        self.net = self._build(train.n_items, train.n_users)
        self.counts_ = train_counts(train)
        return _HNVMTrainable(self, seq, self.counts_)

    def after_fit(self, trainable: _HNVMTrainable) -> None:
        """Cold start: row 0 of the user tables becomes the population's e (see hnvm_net), and
        users without training sessions get it."""
        if self.config.unknown_user_rate == 0:
            self._population_row(trainable.untrained_users)
        self._unknown_row_to(trainable.untrained_users)

    @torch.no_grad()
    def _population_row(self, untrained: Tensor) -> None:
        """Row 0 of the prior and the posterior e tables := the moment-matched aggregate of the
        trained users' Gaussians N(mu_u, var_u): mean mu_u, and mean var_u + variance of mu_u."""
        net = self.net
        if net is None or not net.use_e:
            return
        trained = torch.arange(net.e_post_mu.weight.shape[0]) > 0  # row 0 is the unknown user
        trained[untrained.long()] = False
        if not trained.any():
            return
        for mu_t, lv_t in ((net.e_prior_mu, net.e_prior_logvar), (net.e_post_mu, net.e_post_logvar)):
            keep = trained.to(mu_t.weight.device)
            mu, var = mu_t.weight[keep], lv_t.weight[keep].exp()
            mu_t.weight[0] = mu.mean(0)
            lv_t.weight[0] = (var.mean(0) + mu.var(0, unbiased=False)).log()

    @torch.no_grad()
    def _unknown_row_to(self, users: Tensor) -> None:
        """Give users without training events the trained unknown row (row 0) of every user table:
        their own rows were never updated, so they are cold-start users everywhere (evaluate,
        recommend, serve) without a lookup table in the saved model."""
        net = self.net
        if net is None or not net.use_e or not len(users):
            return
        for table in (net.e_prior_mu, net.e_prior_logvar, net.e_post_mu, net.e_post_logvar):
            table.weight[users.to(table.weight.device)] = table.weight[0].clone()

    # -- scoring (no leakage: prior for z, posterior mean of e which reads the user id only) -----
    @torch.no_grad()
    def _history(self, users: Tensor, sessions: Tensor) -> Tensor:
        net = self.network()
        if sessions.shape[1] == 0 or not self.config.use_history:
            return sessions.new_zeros(len(users), net.hidden, dtype=torch.float)
        return net.encode_history(users, self._trim(sessions))

    def _trim(self, items: Tensor) -> Tensor:
        """Keep the last max_len items of each session (only if the setting asks)."""
        return keep_last_items(items, self.config.max_len)

    def _repeat_history(self, sessions: Tensor) -> Tensor:
        """The closed sessions the repeat channel reads, as the context GRU reads them."""
        if sessions.shape[1] == 0 or not self.config.use_history:
            return sessions.new_zeros(len(sessions), 0, 1)
        return self._trim(sessions)

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        net = self.network()
        h = self._history(batch.users, batch.sessions[:, :-1])  # [B, H]
        last = batch.sessions[:, -1:]
        if (found := prior_states(net, batch.users, last[:, 0], h, self.config.mc_samples)) is None:
            out = net(batch.users, last, h_con0=h, sample=False, mc_samples=self.config.mc_samples)
            found = out.states, out.item_mask[:, 0].sum(-1)  # every real position row by row, [B]
        states, lengths = found
        if bool((batch.target_pos >= lengths[batch.target_rows]).any()):
            raise ValueError("a target position is not an item of its row's last session")
        hidden = states[(torch.cumsum(lengths, 0) - lengths)[batch.target_rows] + batch.target_pos]  # [K, H]
        if net.repeat is None:
            return net.score(hidden)
        return self._with_repeat(net.score(hidden), batch.users, h, batch.sessions[:, :-1], last, hidden,
                                 batch.target_rows, prefix_pairs(last[:, 0], batch.target_rows, batch.target_pos))

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        net = self.network()
        h = self._history(batch.users, batch.sessions)
        hidden = net.next_session_hidden(batch.users, h, self.config.mc_samples)
        if net.repeat is None:
            return net.score(hidden)
        B = len(batch.users)
        return self._with_repeat(net.score(hidden), batch.users, h, batch.sessions, batch.sessions.new_zeros(B, 1, 1),
                                 hidden, torch.arange(B, device=hidden.device), None)

    def _with_repeat(self, scores: Tensor, users: Tensor, h_con: Tensor, history: Tensor, current: Tensor,
                     hidden: Tensor, rows: Tensor, prefix: Pairs | None) -> Tensor:
        """scores Float[K, n_items + 1] plus the repeat channel's terms: phi of each row's `current`
        session (Long[B, 1, T]) from its closed sessions `history` (Long[B, N, T]), gated by the
        session input (prior-mean z after h_con Float[B, H]) and the states hidden Float[K, H] of
        the K targets in rows Long[K]; `prefix`: the targets' psi (None: next session)."""
        net = self.network()
        assert net.repeat is not None
        cond = net.session_condition(h_con, net.general_preference(users))
        hist = history_pairs(self._repeat_history(history), current)
        return net.repeat.terms(cond, hist, hidden, rows, prefix, self.n_items).add_to(scores)

    # -- online inference: the same scores one closed session and one event at a time ---------------
    # For a user u with closed sessions s_1..s_{n-1} and the first L items i_1..i_L of session n:
    #     h_con = encode_history(u, [s_1..s_{n-1}])       (or fold_session, session by session,
    #                                                        from initial_context())
    #     cond  = session_condition(general_preference(u), h_con)
    #     h     = decoder_step(bos, None, cond);  h = decoder_step(i_t, h, cond) for t = 1..L
    #     score_state(h) = score(...) of the item i_{L+1}  (L = 0: score_sessions(...)); with the
    #     repeat channel add_repeat(score_state(h), memory, prefix, cond, h) (repeat_memory/_fold)
    # with z at the prior mean, i.e. what `score` / `score_sessions` compute with mc_samples = 1.
    # A caller (hnvm.online) keeps h_con, cond and h per user and advances them as events come.

    def _net(self) -> HNVMNet:
        """The network in eval mode, switched only if it is not (`network()` walks every module,
        which costs more than a decoder step)."""
        net = self.net
        return net if net is not None and not net.training else self.network()

    @property
    def bos(self) -> int:
        """The item id that starts every session in the decoder (n_items + 1)."""
        return self._net().bos

    def initial_context(self, n: int = 1) -> Tensor:
        """h_con_0 = 0, the context before a user's first session: Float[n, H]."""
        return torch.zeros(n, self._net().hidden, device=self.device)

    @torch.no_grad()
    def general_preference(self, users: Tensor) -> Tensor | None:
        """e^u, the posterior mean of q(e|u) (eq. 14; it reads the user id only, row 0 = the
        unknown user): users Long[B] -> Float[B, d_e]; None when config.use_e is False."""
        return self._net().general_preference(users)

    @torch.no_grad()
    def encode_history(self, users: Tensor, sessions: Tensor) -> Tensor:
        """The context after a user's closed sessions, all in one pass (eq. 9-10), as `score`
        reads them: users Long[B], sessions Long[B, N, T] right-padded (empty sessions are
        skipped; each trimmed to its last max_len items) -> h_con Float[B, H]; 0 without
        sessions or when config.use_history is False."""
        return self._history(users, sessions)

    @torch.no_grad()
    def fold_session(self, h_con: Tensor, items: Tensor | np.ndarray | Sequence[int]) -> Tensor:
        """Advance the context by one closed session (eq. 9-10): the encoder over its items
        (trimmed to the last max_len), then one context step. h_con: Float[1, H]; items: the
        session's T >= 1 item ids, no padding -> Float[1, H]. The identity when
        config.use_history is False (every session on its own)."""
        if not self.config.use_history:
            return h_con
        x = items if isinstance(items, Tensor) else torch.from_numpy(np.asarray(items, dtype=np.int64))
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1 or x.numel() == 0 or bool((x <= 0).any()):
            raise ValueError("fold_session: one session, as 1 or more item ids >= 1 (no padding, no batch)")
        return self._net().fold_session(h_con, self._trim(x.reshape(1, -1)))

    @torch.no_grad()
    def session_condition(self, h_con: Tensor, e: Tensor | None) -> Tensor:
        """The decoder's input for a session after context h_con (eq. 11-12): z = the prior mean
        of p(z | h_con, e), then cond = [h_con; z] ([h_con; e] without z, h_con without either).
        h_con: Float[B, H], e: Float[B, d_e] or None (`general_preference`) -> Float[B, C]."""
        return self._net().session_condition(h_con, e)

    def decoder_step(self, item: int | Tensor, h_dec: Tensor | None, cond: Tensor) -> Tensor:
        """One decoder GRU step (eq. 11): the state after `item` (an id for every row, or Long[B])
        given the previous state h_dec Float[B, H] (None: h_dec_0 = 0, for the `bos` step) and the
        session's cond Float[B, C] -> Float[B, H], the state that predicts the next item (B = 1
        per event). The per-event hot path: torch.gru_cell with the decoder's weights."""
        if torch.is_grad_enabled():  # (a decorator would cost every step a context switch)
            with torch.no_grad():
                return self.decoder_step(item, h_dec, cond)
        net = self._net()
        return net.decoder_step(item, h_dec if h_dec is not None else cond.new_zeros(len(cond), net.hidden), cond)

    @torch.no_grad()
    def score_state(self, h_dec: Tensor) -> Tensor:
        """Scores from decoder states: Float[B, H] -> Float[B, n_items + 1] (column 0 = padding)."""
        return self._net().score(h_dec)

    # the repeat channel online: a RepeatMemory per user, folded one closed session at a time
    def repeat_memory(self, sessions: Sequence[np.ndarray] = ()) -> RepeatMemory | None:
        """A user's repeat statistics after `sessions` (closed, oldest first); None without the
        repeat channel (config.repeat False)."""
        if not self.config.repeat:
            return None
        memory = RepeatMemory()
        for s in sessions:
            self.repeat_fold(memory, s)
        return memory

    def repeat_fold(self, memory: RepeatMemory, items: np.ndarray | Sequence[int]) -> None:
        """One closed session into the memory, trimmed as `fold_session` trims it (nothing when
        config.use_history is False: every session on its own)."""
        if self.config.use_history:
            items = np.asarray(items, dtype=np.int64)
            memory.fold(items[-self.config.max_len:] if self.config.max_len else items)

    @torch.no_grad()
    def add_repeat(self, scores: Tensor, memory: RepeatMemory, prefix: Sequence[int], cond: Tensor,
                   h_dec: Tensor) -> Tensor:
        """scores Float[1, n_items + 1] of `score_state(h_dec)` plus (in place) the repeat channel's
        terms for a user with `memory` (closed sessions) and the open session's `prefix` items, the session
        input `cond` Float[1, C] and decoder state `h_dec` Float[1, H]: what `score` /
        `score_sessions` return for the same history (prefix empty: the next session)."""
        net = self._net()
        assert net.repeat is not None, "add_repeat needs config.repeat"
        dev, pre = cond.device, None
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        if len(prefix):
            row = torch.tensor([[*prefix, 0]], dtype=torch.long, device=dev)
            pre = prefix_pairs(row, zero, torch.tensor([len(prefix)], device=dev))
        hist = memory.features()
        hist = Pairs(hist.row.to(dev), hist.item.to(dev), hist.feat.to(dev))
        return net.repeat.terms(cond, hist, h_dec, zero, pre, self.n_items).add_to(scores)

    def output_layer(self) -> tuple[Tensor, Tensor]:
        """The output layer score_j = W[j]·h + b_j, detached: (W Float[n_items + 1, H],
        b Float[n_items + 1]), row 0 = padding. A ranker can score states with it directly."""
        out = self._net().out
        return out.weight.detach(), out.bias.detach()


class _HNVMTrainable:
    """What the generic Trainer needs: the module, batches and the loss (eq. 18-24)."""

    def __init__(self, model: HNVM, seq: Sequences, counts: Tensor) -> None:
        # the training events only (a held-out-item protocol's held-out items are not in it)
        seq = seq.view(("train",))
        self.model, self.seq, self.cfg = model, seq, model.config
        assert model.net is not None
        self.module = model.net
        self.windows = user_windows(seq, self.cfg.window if self.cfg.use_history else 1)
        # w_u: spread each user's KL(q(e)||p(e)) over the user's train sessions, so that one
        # epoch of session-level batches counts it once (the sequence-level bound, eq. 19/22)
        n_train = np.bincount(seq.session_user[seq.session_split == 0], minlength=len(seq.user_first))
        self.sessions_per_user = torch.from_numpy(np.maximum(n_train, 1).astype(np.float32))
        self.untrained_users = untrained_users(n_train)
        self.neg_probs = popularity_probs(counts, self.cfg.sample_alpha)
        self.steps_per_epoch = max(-(-len(self.windows) // self.cfg.batch_size), 1)  # set per epoch
        self.carry = CarriedStates(self.windows, self.cfg.carry_context and self.cfg.use_history)

    def to(self, device: torch.device) -> None:
        self.neg_probs = self.neg_probs.to(device)
        self.sessions_per_user = self.sessions_per_user.to(device)

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Any:
        n_batches = -(-len(self.windows) // self.cfg.batch_size)
        self.steps_per_epoch = max(-(-n_batches // max(world_size, 1)), 1)  # this process's steps
        return window_batches(self.seq, self.windows, self.cfg.batch_size, rng,
                              max_len=self.cfg.max_len or None,
                              max_prefix=None if self.cfg.use_history else 0,
                              rank=rank, world_size=world_size, user_order=self.carry.reset(world_size))

    def beta(self, step: int) -> float:
        """The KL weight at optimizer step `step` (0-based). linear: from 0 to 1 over
        kl_anneal_epochs epochs of this process's steps, then 1. cyclical (Fu et al. 2019, R =
        0.5): kl_cycles cycles of kl_anneal_epochs epochs, in each from 0 to 1 over the first
        half and 1 over the second; 1 after the last cycle."""
        c = self.cfg
        total = c.kl_anneal_epochs * self.steps_per_epoch
        if total <= 0:
            return 1.0
        if c.kl_schedule == "linear":
            return min(1.0, step / total)
        if step >= c.kl_cycles * total or total < 2:  # (a cycle under 2 steps cannot rise)
            return 1.0
        return min(1.0, (step % total) / (0.5 * total))

    def selectable(self, step: int) -> bool:
        """Whether the weights after `step` optimizer steps may be selected as the best epoch:
        only once β has reached 1, i.e. for the model of the full ELBO (the paper's objective).
        linear: once the warm-up is over; cyclical: when the last step's β was 1 (so the end of
        every cycle is selectable, its start is not)."""
        if self.cfg.kl_schedule == "cyclical":
            return self.beta(max(step - 1, 0)) >= 1.0
        return self.beta(step) >= 1.0

    def diagnostics(self, max_windows: int = 256) -> dict[str, float]:
        """What the latents carry, for the train log after each epoch (`latent_diagnostics`)."""
        return latent_diagnostics(self.module, self.cfg, self.seq, self.windows, self.untrained_users,
                                  max_windows=max_windows)

    def batch_targets(self, batch: Any) -> int:
        return batch.n_targets

    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        net, c = self.module, self.cfg
        # the context entering the window, without gradient (docs/design.md, "HNVM", user windows)
        h0 = self.carry.entering(batch.ids, batch.prefix, lambda p: net.encode_history(batch.users, p))
        users = batch.users
        if c.use_e and c.unknown_user_rate > 0:
            # these windows train row 0, the unknown user: cold start then reads a population e
            # (torch's generator, seeded by the Trainer: a seed still gives the same run)
            unknown = torch.rand(users.shape, device=users.device) < c.unknown_user_rate
            users = users.masked_fill(unknown, 0)
        out = net(users, batch.window, h_con0=h0, sample=True)
        self.carry.store(batch.ids, out.h_con[:, -1])  # the context after the window's last session
        mask = out.item_mask  # [B, W, T]
        hidden = out.states  # [K, H], the order of window[mask]
        targets = batch.window[mask]  # [K]
        score_all, score_items = net.score, net.score_items
        if net.repeat is not None:
            score_all, score_items = loss_scorers(net, batch.prefix, batch.window, out, hidden)
        rec = ranking_loss(c.loss, hidden, targets, score_all=score_all, score_items=score_items,
                           neg_probs=self.neg_probs, n_negatives=c.n_negatives, bpreg=c.bpreg)
        beta = self.beta(step)
        n_sess = out.session_mask.sum(1).float()  # [B] sessions of each window
        w_u = n_sess / self.sessions_per_user[batch.users]  # the real user's share, even for row 0
        kl_z, kl_e = out.kl_z.sum(), (w_u * out.kl_e).sum()
        k = max(int(mask.sum()), 1)
        kl = kl_z + kl_e
        if c.free_bits > 0:
            kl = free_bits_kl(out, w_u, c.free_bits)
        loss = (rec + beta * kl) / k  # the negative ELBO per target (free bits: its bound)
        return {"loss": loss, "rec": rec.detach() / k, "kl_z": kl_z.detach() / k,
                "kl_e": kl_e.detach() / k, "beta": torch.tensor(beta)}


def untrained_users(n_train: np.ndarray) -> Tensor:
    """Long[U']: known users with no training session (possible with a time split), whose rows
    stay untrained; n_train: int[n_users + 1] training sessions per user id."""
    return torch.from_numpy(np.flatnonzero(n_train[1:] == 0) + 1)
