"""HRNN-All: hierarchical recurrent network (Quadrana, Karatzoglou, Hidasi & Cremonesi,
RecSys 2017, "Personalizing Session-based Recommendations with Hierarchical RNNs").

    session m of a user    i_{m,1} ... i_{m,N_m}                 (items [B, W, T], 0 = padding)
    session init           s_{m,0} = tanh(W_init c_{m-1} + b_init)            (c_0 = 0)
    session GRU ("All")    s_{m,t} = GRU_ses(s_{m,t-1}, [emb(i_{m,t}); c_{m-1}])
    user GRU               c_m = GRU_usr(c_{m-1}, s_{m,N_m})    (only at the end of a session)
    output                 score_j = W_out[j] · dropout(s_{m,t}) + b_j   predicts i_{m,t+1}

The user state c is constant within a session: it changes only when a session ends. The
session state is re-initialised from c at EVERY session start, never carried over from the
previous session (an early version of the reference code carried it over; the regression
test is in tests/test_seq_baselines.py).

Training follows our user windows (docs/design.md, "HNVM", user windows): the user state entering a window comes from
the user's earlier sessions without gradient, then the window's sessions are run in order
with gradient through the user GRU. Loss: a sampled ranking loss over popularity-sampled
negatives shared by the batch (the reference code uses TOP1 / BPR / cross-entropy over the
other targets of the mini-batch plus optional popularity samples; the HNVM paper trains every
GRU baseline with BPR, which `loss = "bpr"` gives).

Differences from the reference code (all small, listed in docs/baselines.md, "HRNN-All"): the user
state enters every gate of the session GRU (the paper's wording: "input"; the code adds it to
the reset/update gates only); dropout acts on GRU outputs, not inside the recurrence; scores are
linear (no tanh final activation); the initial session state s_{m,0} also predicts the first
item of the session (`predict_first`), which is what scores a next session from history only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.config import choices, rng
from hnvm.contract import Batch
from hnvm.data.batches import Sequences, user_windows, window_batches
from hnvm.data.sampling import popularity_probs, train_counts
from hnvm.models.base import NetPersistence, register
from hnvm.models.carry import CarriedStates
from hnvm.models.layers import gru_outputs, keep_last_items, ranking_loss
from hnvm.training import TrainConfig, fit

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@dataclass
class HRNNOutput:
    pred_states: Tensor  # [B, W, T, S] session state predicting items[b, w, t] (t=0: s_{m,0})
    user_in: Tensor  # [B, W, U] user state c_{m-1} entering each session
    user_out: Tensor  # [B, U] user state after the last session of the window


class HRNNNet(nn.Module):
    def __init__(self, *, n_items: int, emb_dim: int = 100, session_hidden: int = 100,
                 user_hidden: int = 100, user_to_input: bool = True, dropout_session: float = 0.1,
                 dropout_user: float = 0.1, dropout_init: float = 0.0) -> None:
        super().__init__()
        self.n_items, self.user_hidden, self.user_to_input = n_items, user_hidden, user_to_input
        self.item_emb = nn.Embedding(n_items + 1, emb_dim, padding_idx=0)
        in_dim = emb_dim + (user_hidden if user_to_input else 0)
        self.session_gru = nn.GRU(in_dim, session_hidden, batch_first=True)
        self.user_gru = nn.GRUCell(session_hidden, user_hidden)
        self.init = nn.Linear(user_hidden, session_hidden)  # W_init, b_init
        self.out = nn.Linear(session_hidden, n_items + 1)  # column 0 = padding, callers mask it
        self.drop_session = nn.Dropout(dropout_session)
        self.drop_user = nn.Dropout(dropout_user)
        self.drop_init = nn.Dropout(dropout_init)
        nn.init.normal_(self.item_emb.weight, std=emb_dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def session_init(self, user: Tensor) -> Tensor:
        """c_{m-1}: Float[B, U] -> s_{m,0}: Float[B, S]."""
        return self.drop_init(torch.tanh(self.init(user)))

    def run_session(self, items: Tensor, user: Tensor) -> Tensor:
        """One session per row from its user state. items: Long[B, T] right-padded,
        user: Float[B, U] -> Float[B, T + 1, S]: [:, t] is the state after t items (so [:, 0]
        is s_{m,0} and [:, t] predicts items[:, t]). States past a row's length are junk."""
        h0 = self.session_init(user)  # [B, S]
        x = self.item_emb(items)  # [B, T, E]
        if self.user_to_input:  # "All": c_{m-1} is an input of every step
            x = torch.cat([x, user.unsqueeze(1).expand(-1, items.shape[1], -1)], -1)
        out = gru_outputs(self.session_gru, x, h0)  # [B, T, S]
        return self.drop_session(torch.cat([h0.unsqueeze(1), out], 1))

    def forward(self, items: Tensor, user0: Tensor | None = None) -> HRNNOutput:
        """items: Long[B, W, T] (sessions oldest first, an all-zero session is padding and
        leaves the user state unchanged); user0: Float[B, U] entering the window (None = 0)."""
        B, _, T = items.shape
        empty = items.new_zeros(B, T, self.session_gru.hidden_size, dtype=torch.float)
        pred: list[Tensor] = []

        def keep(rows: Tensor | None, states: Tensor | None) -> None:
            if rows is None or states is None:
                pred.append(empty)
                return
            t = states.shape[1] - 1
            # .to: bf16 under autocast, the buffers stay fp32
            pred.append(empty.index_copy(0, rows, F.pad(states[:, :t], (0, 0, 0, T - t)).to(empty.dtype)))

        user, user_in = self._sessions(items, user0, keep)
        return HRNNOutput(torch.stack(pred, 1), user_in, user)

    def _sessions(self, items: Tensor, user0: Tensor | None,
                  keep: Callable[[Tensor | None, Tensor | None], None] | None = None) -> tuple[Tensor, Tensor]:
        """Run the sessions of items Long[B, W, T] in order -> (user state after them Float[B, U],
        user state entering each session Float[B, W, U]). keep(rows, states) receives each
        session slot's session states ([n, t + 1, S] of the n rows with a real session; None,
        None where there is none): the training forward keeps them, the user state does not."""
        B, W, _ = items.shape
        lengths = (items > 0).sum(-1)  # [B, W]
        user = items.new_zeros(B, self.user_hidden, dtype=torch.float) if user0 is None else user0
        user_in = []
        for w in range(W):  # sessions in order: the user state must see them one by one
            user_in.append(user)
            rows = (lengths[:, w] > 0).nonzero().squeeze(1)  # [n] rows with a real session
            if rows.numel() == 0:
                if keep is not None:
                    keep(None, None)
                continue
            t = int(lengths[rows, w].max())
            states = self.run_session(items[rows, w, :t], user[rows])  # [n, t + 1, S]
            if keep is not None:
                keep(rows, states)
            last = states[torch.arange(len(rows), device=states.device), lengths[rows, w]]  # s_{m,N_m}: [n, S]
            new = self.drop_user(self.user_gru(last, user[rows]))  # c_m only at the session end
            user = user.index_copy(0, rows, new.to(user.dtype))
        return user, torch.stack(user_in, 1) if user_in else user.new_zeros(B, 0, self.user_hidden)

    @torch.no_grad()
    def user_state(self, items: Tensor, user0: Tensor | None = None) -> Tensor:
        """User state after the given sessions Long[B, N, T] -> Float[B, U] (the session states
        are not kept: only each session's last one feeds the user GRU)."""
        B, N, _ = items.shape
        if N == 0:
            zero = items.new_zeros(B, self.user_hidden, dtype=torch.float)
            return zero if user0 is None else user0
        return self._sessions(items, user0)[0]

    def score_items(self, hidden: Tensor, item_ids: Tensor) -> Tensor:
        """hidden: Float[K, S]; item_ids: Long[K, M] per-row or Long[M] shared -> Float[K, M]."""
        w, b = self.out.weight[item_ids], self.out.bias[item_ids]
        if item_ids.dim() == 1:
            return hidden @ w.T + b
        return torch.einsum("ks,kms->km", hidden, w) + b


@dataclass(frozen=True)
class HRNNConfig:
    """Hyper-parameters of HRNN-All (section [model] of a config file)."""

    emb_dim: int = field(default=100, metadata=rng(8, 2048, "item input embedding size"))
    session_hidden: int = field(default=100, metadata=rng(8, 2048, "session GRU size (paper 100)"))
    user_hidden: int = field(default=100, metadata=rng(8, 2048, "user GRU size (paper 100)"))
    user_to_input: bool = True  # True = HRNN-All, False = HRNN-Init
    dropout_session: float = field(default=0.1, metadata=rng(0.0, 0.9))
    dropout_user: float = field(default=0.1, metadata=rng(0.0, 0.9))
    dropout_init: float = field(default=0.0, metadata=rng(0.0, 0.9))
    predict_first: bool = True  # train s_{m,0} to predict the first item (next-session task)
    loss: str = field(default="full-softmax", metadata=choices(
        "bpr", "bpr-max", "sampled-softmax", "full-softmax",
        doc="full-softmax = the reference's cross-entropy; bpr = the HNVM paper's setting"))
    n_negatives: int = field(default=1024, metadata=rng(1, 100_000, "shared sampled negatives"))
    sample_alpha: float = field(default=0.75, metadata=rng(0.0, 1.0, "negatives ~ count^alpha"))
    bpreg: float = field(default=1.0, metadata=rng(0.0, 100.0, "bpr-max score regulariser"))
    batch_size: int = field(default=32, metadata=rng(1, 100_000, "user windows per step"))
    window: int = field(default=8, metadata=rng(1, 10_000, "sessions per training window W"))
    max_len: int = field(default=0, metadata=rng(
        0, 100_000, "keep the last max_len items of longer sessions; 0 = all"))
    # True: a window's entering user state is carried over from the previous window (models/carry.py),
    # faster; off by default: validation Recall@20 3.7% lower on the Instacart sample (docs/baselines.md)
    carry_state: bool = False


@register("hrnn")
class HRNN(NetPersistence):
    """HRNN-All as a Recommender: `HRNN(HRNNConfig(...)).fit(dataset)`."""

    name = "hrnn"
    config_class = HRNNConfig

    def __init__(self, config: HRNNConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or HRNNConfig(), **overrides)
        self.net: HRNNNet | None = None
        self.n_items = 0
        self.result_: Any = None

    def _build(self, n_items: int) -> HRNNNet:
        c = self.config
        self.n_items = n_items
        return HRNNNet(n_items=n_items, emb_dim=c.emb_dim, session_hidden=c.session_hidden,
                       user_hidden=c.user_hidden, user_to_input=c.user_to_input,
                       dropout_session=c.dropout_session, dropout_user=c.dropout_user,
                       dropout_init=c.dropout_init)

    def fit(self, train: Dataset, **options: Any) -> HRNN:
        """Train on `train` (options: `hnvm.training.fit`); returns self."""
        return fit(self, train, **options)

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> _HRNNTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        self.net = self._build(train.n_items)
        return _HRNNTrainable(self, seq, train_counts(train))

    # -- scoring: the GRUs are causal, so a target's state never reads items at or after it ---
    def _trim(self, items: Tensor) -> Tensor:
        return keep_last_items(items, self.config.max_len)

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        net = self.network()
        user = net.user_state(self._trim(batch.sessions[:, :-1]))  # [B, U] c_{m-1}
        states = net.run_session(batch.sessions[:, -1], user)  # [B, T + 1, S]
        return net.out(states[batch.target_rows, batch.target_pos])  # [K, n_items + 1]

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        net = self.network()
        user = net.user_state(self._trim(batch.sessions))  # [B, U]
        return net.out(net.session_init(user))  # s_{m,0} scores the next session



class _HRNNTrainable:
    """User windows, the user state entering each window without gradient, a ranking loss."""

    def __init__(self, model: HRNN, seq: Sequences, counts: Tensor) -> None:
        assert model.net is not None
        seq = seq.view(("train",))  # the training events only
        self.model, self.seq, self.cfg, self.module = model, seq, model.config, model.net
        self.windows = user_windows(seq, self.cfg.window)
        self.neg_probs = popularity_probs(counts, self.cfg.sample_alpha)
        self.carry = CarriedStates(self.windows, self.cfg.carry_state)

    def to(self, device: torch.device) -> None:
        self.neg_probs = self.neg_probs.to(device)

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Any:
        return window_batches(self.seq, self.windows, self.cfg.batch_size, rng, max_len=self.cfg.max_len or None,
                              rank=rank, world_size=world_size, user_order=self.carry.reset(world_size))

    def batch_targets(self, batch: Any) -> int:
        return batch.n_targets

    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        net, c = self.module, self.cfg
        # the user state entering the window, without gradient (docs/design.md, "HNVM", user windows)
        user0 = self.carry.entering(batch.ids, batch.prefix, net.user_state)
        out = net(batch.window, user0)
        self.carry.store(batch.ids, out.user_out)
        mask = batch.window > 0  # [B, W, T]
        if not c.predict_first:
            mask[..., 0] = False
        hidden, targets = out.pred_states[mask], batch.window[mask]  # [K, S], [K]
        rec = ranking_loss(c.loss, hidden, targets, score_all=net.out, score_items=net.score_items,
                           neg_probs=self.neg_probs, n_negatives=c.n_negatives, bpreg=c.bpreg)
        k = max(int(mask.sum()), 1)
        return {"loss": rec / k}
