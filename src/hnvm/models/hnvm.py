"""HNVM network: hierarchical neural variational model (Xiao, Liang & Meng, WWW 2019).

The network (`HNVMNet`), then the estimator (`HNVM`: the Recommender protocol, the loss of
eq. 18-24 and leakage-free scoring) that the generic trainer fits.

    sessions of one user   s_1 ... s_n ...                  (items [B, W, T], 0 = padding)
    encoder  (eq. 9)       h_enc_n = GRU_enc(s_n)[last valid step]
    context  (eq. 10)      h_con_n = GRU_con(h_con_{n-1}, h_enc_n)
    general  (eq. 6, 14)   p(e|u), q(e|u): per-user mean / log-variance rows
    long-term (eq. 12, 15) p(z_n|h_con_{n-1}, e) = MLP_p,  q(z_n|h_con_{n-1}, h_enc_n) = MLP_q
    decoder  (eq. 11)      h_dec_t = GRU_dec(h_dec_{t-1}, [emb(x_t); h_con_{n-1}; z_n]),
                           x = (BOS, i_1, ..., i_{T-1}), h_dec_0 = 0; h_dec_t predicts i_t
    output                 score_j = W_out[j] · dropout(h_dec_t) + b_j

Interpretation choices (the paper leaves these open; see DESIGN.md §5):
* One input embedding table (ids 1..n_items, 0 = padding, BOS = n_items + 1) is shared by
  encoder and decoder; the paper feeds one-hot ids, i.e. each GRU's input weights are an
  embedding, and sharing halves those parameters.
* The decoder starts at BOS so that i_1 also gets a prediction (eq. 11 starts at i_1 with
  h_dec_0 = 0; the BOS step is what scores a whole next session from history only).
* Dropout (paper: 0.1 "on the hidden states of GRU") is applied to the encoder summary h_enc_n
  (before the context GRU and the posterior) and to the decoder states before scoring.
* Ablations: use_e=False drops e (the z prior reads h_con only, KL_e = 0); use_z=False drops z
  (KL_z = 0) and, since e reaches the decoder only through z, feeds e straight to the decoder
  so that the "without z_n" ablation still has a general preference.
* Inference (sample=False) never reads the posterior of the session being scored: e is the
  posterior mean of q(e|u) (it reads only the user id), z_n the PRIOR mean of p(z_n|h_con_{n-1},
  e). With mc_samples=S > 1, z_n ~ p(z_n|...) S times and the decoder states are averaged;
  because the output layer is affine this equals averaging the S score vectors (logits).
* Cold start: row 0 of the user tables is the unknown user, and after training it holds the
  population's e: by default (`unknown_user_rate` 0) the moment-matched aggregate of the trained
  users' Gaussians (mean of the means; mean variance plus the variance of the means), which leaves
  training exactly as the paper's; with `unknown_user_rate` > 0 a share of the training windows is
  read as user 0 (KL weighted by the real user's share), so row 0 is learned directly. Either way,
  users without training events get row 0 as their rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hnvm.config import choices, rng
from hnvm.models.base import Batch, NetPersistence, register
from hnvm.models.layers import (
    GaussianHead,
    ItemOutput,
    bpr_loss,
    bpr_max_loss,
    full_softmax_loss,
    gaussian_kl,
    init_uniform_,
    reparameterize,
    sampled_softmax_loss,
)
from hnvm.train import TrainConfig

if TYPE_CHECKING:
    from hnvm.data.store import Dataset


@dataclass
class HNVMOutput:
    dec_hidden: Tensor  # [B, W, T, H] state predicting items[b, w, t]; 0 at padding
    kl_z: Tensor  # [B, W] KL(q(z_n) || p(z_n | e)); 0 on padded sessions
    kl_e: Tensor  # [B] KL(q(e) || p(e))
    h_con: Tensor  # [B, W, H] context state after each session (carried over padding)
    item_mask: Tensor  # [B, W, T] bool, True = real item
    session_mask: Tensor  # [B, W] bool, True = non-empty session


class HNVMNet(nn.Module):
    def __init__(
        self,
        *,
        n_items: int,
        n_users: int,
        hidden: int = 200,
        emb_dim: int = 200,
        d_e: int = 64,
        d_z: int = 64,
        mlp_hidden: int = 200,
        dropout: float = 0.1,
        var_scale: float = 0.05,
        init_var: float = 0.01,
        use_e: bool = True,
        use_z: bool = True,
        length_buckets: int = 8,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        if n_items < 1 or n_users < 0:
            raise ValueError(f"need n_items >= 1 and n_users >= 0, got {n_items}, {n_users}")
        self.n_items, self.n_users, self.hidden = n_items, n_users, hidden
        self.d_e, self.d_z = d_e, d_z
        self.use_e, self.use_z = use_e, use_z
        self.length_buckets = length_buckets  # speed only: see _by_length
        self.bos = n_items + 1
        self.log_var_scale = math.log(var_scale)
        H = hidden

        # sparse: the item and user tables get sparse gradients, so that a training step costs
        # O(rows it used), not O(catalogue + users) (the Trainer's optimizers update those rows)
        self.item_emb = nn.Embedding(n_items + 2, emb_dim, padding_idx=0, sparse=sparse)  # + padding + BOS
        self.encoder = nn.GRU(emb_dim, H, batch_first=True)
        self.context = nn.GRUCell(H, H)
        if use_e:  # one-hot profile -> per-user rows; row 0 = the shared unknown user
            self.e_prior_mu = nn.Embedding(n_users + 1, d_e, sparse=sparse)
            self.e_prior_logvar = nn.Embedding(n_users + 1, d_e, sparse=sparse)
            self.e_post_mu = nn.Embedding(n_users + 1, d_e, sparse=sparse)
            self.e_post_logvar = nn.Embedding(n_users + 1, d_e, sparse=sparse)
        if use_z:
            self.z_prior = GaussianHead(H + (d_e if use_e else 0), mlp_hidden, d_z, var_scale)
            self.z_post = GaussianHead(2 * H, mlp_hidden, d_z, var_scale)
        cond_dim = H + (d_z if use_z else d_e if use_e else 0)  # what the decoder reads per session
        self.decoder = nn.GRU(emb_dim + cond_dim, H, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = ItemOutput(H, n_items + 1, sparse)  # column 0 = padding, callers mask it
        init_uniform_(self, math.sqrt(init_var))

    # ---- building blocks ------------------------------------------------------------------

    def _by_length(self, run: Callable[[Tensor, int], Tensor], lengths: Tensor) -> Tensor:
        """Run a GRU over length buckets: run(rows, t) -> [len(rows), t, H] for rows trimmed to
        t steps; returns [N, max(lengths), H], zero past each bucket's longest row.
        Padded, not packed: on CPU torch's packed GRU is several times slower. Bucketing rows
        by length keeps short sessions from paying for the longest one; rows of a GRU are
        independent and causal, so valid positions are exact either way."""
        T = int(lengths.max())
        order = lengths.argsort()
        outs = []
        for rows in order.tensor_split(min(self.length_buckets, len(order))):
            t = int(lengths[rows].max())
            outs.append(F.pad(run(rows, t), (0, 0, 0, T - t)))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(outs)[inverse]

    def _encode(self, seqs: Tensor, lengths: Tensor) -> Tensor:
        """seqs: Long[N, T] right-padded, lengths: Long[N] >= 1 -> h_enc Float[N, H] (the state
        after each session's last real item)."""
        run = lambda rows, t: self.encoder(self.item_emb(seqs[rows, :t]))[0]  # noqa: E731
        out = self._by_length(run, lengths)  # [N, T, H]
        return out[torch.arange(len(lengths), device=out.device), lengths - 1]

    def _decode(self, seqs: Tensor, lengths: Tensor, cond: Tensor) -> Tensor:
        """Decoder over (BOS, seqs[:, :-1]). seqs: Long[N, T] right-padded, lengths: Long[N],
        cond: Float[N, C] per-session input -> Float[N, T, H]; states past a session's length
        are junk or 0, which the caller masks."""
        N, T = seqs.shape
        x_ids = torch.cat([seqs.new_full((N, 1), self.bos), seqs[:, :-1]], dim=1)  # [N, T]

        def run(rows: Tensor, t: int) -> Tensor:
            x = self.item_emb(x_ids[rows, :t])  # [n, t, E]
            c = cond[rows].unsqueeze(1).expand(-1, t, -1)  # the same [h_con; z] at every step
            return self.decoder(torch.cat([x, c], dim=-1))[0]  # [n, t, H]

        return F.pad(self._by_length(run, lengths), (0, 0, 0, T - int(lengths.max())))

    def _context(
        self, h_enc: Tensor, session_mask: Tensor, h_con0: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """h_enc: [B, W, H] -> (h_prev, h_con), both [B, W, H]: the state entering / after each
        session. Empty sessions keep the state unchanged (eq. 10 is skipped)."""
        B, W, H = h_enc.shape
        h = h_enc.new_zeros(B, H) if h_con0 is None else h_con0
        prev, after = [], []
        for w in range(W):  # the only loop over sessions; W is small
            prev.append(h)
            h = torch.where(session_mask[:, w, None], self.context(h_enc[:, w], h), h)
            after.append(h)
        return torch.stack(prev, 1), torch.stack(after, 1)

    def _user_e(
        self, users: Tensor, sample: bool, generator: torch.Generator | None
    ) -> tuple[Tensor | None, Tensor]:
        """users: Long[B] -> (e Float[B, d_e] or None, kl_e Float[B])."""
        if not self.use_e:
            return None, users.new_zeros(users.shape, dtype=torch.float)
        mu_q = self.e_post_mu(users)
        lv_q = self.e_post_logvar(users) + self.log_var_scale
        mu_p = self.e_prior_mu(users)
        lv_p = self.e_prior_logvar(users) + self.log_var_scale
        e = reparameterize(mu_q, lv_q, generator) if sample else mu_q
        return e, gaussian_kl(mu_q, lv_q, mu_p, lv_p)

    def _prior_z(self, h_prev: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor]:
        """h_prev: [B, ..., H], e: [B, d_e] (broadcast) -> (mu, logvar), each [B, ..., d_z]."""
        if e is None:
            return self.z_prior(h_prev)
        e = e.view(e.shape[0], *([1] * (h_prev.dim() - 2)), e.shape[-1])
        return self.z_prior(torch.cat([h_prev, e.expand(*h_prev.shape[:-1], -1)], -1))

    def _cond(self, h_prev: Tensor, e: Tensor | None, z: Tensor | None) -> Tensor:
        """Per-session decoder input [h_con_{n-1}; z_n] (or [h_con_{n-1}; e] without z)."""
        if z is not None:
            return torch.cat([h_prev, z], -1)
        if e is not None:
            e = e.view(e.shape[0], *([1] * (h_prev.dim() - 2)), e.shape[-1])
            return torch.cat([h_prev, e.expand(*h_prev.shape[:-1], -1)], -1)
        return h_prev

    def _sessions(self, items: Tensor) -> tuple[Tensor, ...]:
        """Encode every real session of items Long[B, W, T] together (one GRU call per bucket).
        -> h_enc [B, W, H] (0 for empty sessions), item_mask [B, W, T], session_mask [B, W],
        real Long[N] (flat indices of non-empty sessions), seqs Long[N, T'] (their items,
        trimmed to the longest real session T' so that batch padding costs nothing)."""
        B, W, T = items.shape
        item_mask = items > 0
        lengths = item_mask.sum(-1)  # [B, W]
        if not torch.equal(item_mask, torch.arange(T, device=items.device) < lengths[..., None]):
            raise ValueError("items must be right-padded: no 0 before a real item in a session")
        session_mask = lengths > 0
        real = session_mask.reshape(-1).nonzero().squeeze(1)  # [N]
        t_max = int(lengths.max()) if real.numel() else 0
        seqs, seq_len = items.reshape(B * W, T)[real, :t_max], lengths.reshape(-1)[real]
        h_enc = items.new_zeros(B * W, self.hidden, dtype=torch.float)
        if real.numel():
            # .to: under bf16 autocast the GRU output is bf16; the buffers stay fp32
            h_enc = h_enc.index_copy(0, real, self.drop(self._encode(seqs, seq_len)).to(h_enc.dtype))
        return h_enc.view(B, W, -1), item_mask, session_mask, real, seqs, seq_len

    # ---- training / scoring forward ---------------------------------------------------------

    def forward(
        self,
        users: Tensor,
        items: Tensor,
        h_con0: Tensor | None = None,
        sample: bool = True,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> HNVMOutput:
        """users: Long[B]; items: Long[B, W, T], each session right-padded with 0, an all-zero
        session is padding; h_con0: Float[B, H] context entering the window (None = 0).
        sample=True: training (e ~ q(e|u), z_n ~ q(z_n|h_con_{n-1}, h_enc_n)).
        sample=False: leakage-free scoring (e = E q(e|u), z_n = prior mean, or mc_samples
        prior draws with the decoder states averaged)."""
        if sample and mc_samples != 1:
            raise ValueError("mc_samples > 1 is for inference (sample=False)")
        B, W, T = items.shape
        H = self.hidden
        h_enc, item_mask, session_mask, real, seqs, seq_len = self._sessions(items)

        # the context GRU across sessions (the only loop over W)
        h_prev, h_con = self._context(h_enc, session_mask, h_con0)  # [B, W, H] each

        # latents
        e, kl_e = self._user_e(users, sample, generator)
        z, kl_z, S = None, h_enc.new_zeros(B, W), 1
        if self.use_z:
            mu_p, lv_p = self._prior_z(h_prev, e)  # [B, W, Dz]
            mu_q, lv_q = self.z_post(torch.cat([h_prev, h_enc], -1))
            kl_z = gaussian_kl(mu_q, lv_q, mu_p, lv_p) * session_mask  # [B, W]
            if sample:
                z = reparameterize(mu_q, lv_q, generator)
            elif mc_samples > 1:
                S = mc_samples
                z = torch.stack([reparameterize(mu_p, lv_p, generator) for _ in range(S)])
            else:
                z = mu_p
        if S == 1:
            cond = self._cond(h_prev, e, z)  # [B, W, C]
        else:
            cond = torch.cat([h_prev.expand(S, -1, -1, -1), z], -1)  # [S, B, W, C]
        cond = cond.reshape(S, B * W, cond.shape[-1])[:, real].flatten(0, 1)  # [S*N, C]

        # decoder over all real sessions (and MC draws) at once: one GRU call per length bucket
        dec = h_enc.new_zeros(B * W, T, H)
        if real.numel():
            out = self._decode(seqs.repeat(S, 1), seq_len.repeat(S), cond)  # [S*N, T', H]
            out = out.view(S, -1, *out.shape[1:]).mean(0)  # [N, T', H]
            dec[real, : out.shape[1]] = out.to(dec.dtype)
        dec_hidden = self.drop(dec.view(B, W, T, H) * item_mask.unsqueeze(-1))
        return HNVMOutput(dec_hidden, kl_z, kl_e, h_con, item_mask, session_mask)

    def score(self, hidden: Tensor) -> Tensor:
        """Float[..., H] -> Float[..., n_items + 1] (column 0 = padding; callers mask it)."""
        return self.out(hidden)

    def score_items(self, hidden: Tensor, item_ids: Tensor) -> Tensor:
        """Scores of selected items without building the full matrix.
        hidden: Float[..., H]. item_ids: Long[..., K] (same leading dims: per-row candidates)
        -> Float[..., K]; or Long[M] with hidden of >= 2 dims (shared candidates) -> [..., M]."""
        w, b = self.out.rows(item_ids)  # [..., K, H], [..., K]
        if item_ids.dim() == 1 and hidden.dim() > 1:
            return hidden @ w.T + b
        return torch.einsum("...h,...kh->...k", hidden, w) + b

    # ---- inference helpers ------------------------------------------------------------------

    @torch.no_grad()
    def encode_history(self, users: Tensor, items: Tensor, h_con0: Tensor | None = None) -> Tensor:
        """Context state after all given sessions: items Long[B, W, T] -> h_con Float[B, H].
        The context depends on items only; `users` keeps the signature of the other entry
        points. Chain windows through h_con0 for long histories."""
        del users
        h_enc, _, session_mask, *_ = self._sessions(items)
        _, h_con = self._context(h_enc, session_mask, h_con0)
        return h_con[:, -1]

    @torch.no_grad()
    def prefix_hidden(
        self,
        users: Tensor,
        h_con_prev: Tensor,
        prefix: Tensor | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Decoder state after BOS, i_1..i_L of the current session, i.e. the state predicting
        i_{L+1}. users: Long[B]; h_con_prev: Float[B, H] (context after the earlier sessions);
        prefix: Long[B, L] right-padded (None or L = 0: empty) -> Float[B, H].
        Uses the prior (never a posterior of the current session)."""
        B = users.shape[0]
        if prefix is None:
            prefix = users.new_zeros(B, 0)
        e, _ = self._user_e(users, sample=False, generator=None)
        S, z = 1, None
        if self.use_z:
            mu_p, lv_p = self._prior_z(h_con_prev, e)  # [B, Dz]
            if mc_samples > 1:
                S = mc_samples
                z = torch.cat([reparameterize(mu_p, lv_p, generator) for _ in range(S)])
            else:
                z = mu_p
        cond = self._cond(h_con_prev.repeat(S, 1), None if e is None else e.repeat(S, 1), z)
        lengths = (prefix > 0).sum(-1) + 1  # + the BOS step
        # pad one slot so that the decoder also consumes the last prefix item
        seqs = torch.cat([prefix, prefix.new_zeros(B, 1)], 1).repeat(S, 1)  # [S*B, L+1]
        out = self._decode(seqs, lengths.repeat(S), cond)  # [S*B, L+1, H]
        last = out[torch.arange(S * B, device=out.device), lengths.repeat(S) - 1]  # [S*B, H]
        return self.drop(last.view(S, B, -1).mean(0))

    def next_session_hidden(
        self,
        users: Tensor,
        h_con_prev: Tensor,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Decoder state of the BOS step of a new session: Float[B, H]. The next-session task
        predicts the whole next session from history only, so the BOS-step distribution under
        the prior is the natural score: next-session scores = score(next_session_hidden(...))."""
        return self.prefix_hidden(users, h_con_prev, None, mc_samples, generator)


# ---- the estimator: HNVM as a Recommender ----------------------------------------------------


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
    max_len: int = field(default=0, metadata=rng(0, 100_000, "keep the last max_len items of longer sessions; 0 = all"))
    kl_anneal_steps: int = field(default=300, metadata=rng(0, 10**9, "steps for beta 0 -> 1"))
    mc_samples: int = field(default=1, metadata=rng(1, 1000, "prior samples averaged at inference"))
    # Row 0 of the user tables is the unknown user (cold start). 0 (default): after training it becomes
    # the aggregate of the trained users' e (training untouched); > 0: that share of the training
    # windows is read as user 0, which learns e directly. On the Instacart demo (2 seeds) 0.05 cost
    # known users 3-5% next-item MRR@5 with no measurable cold-start gain, hence the default.
    unknown_user_rate: float = field(default=0.0, metadata=rng(
        0.0, 0.5, "share of training windows read as the unknown user 0 (trains the cold-start e); "
        "0 = row 0 is the trained users' aggregate"))
    sparse: bool = True  # sparse item/user-table updates (sampled losses); False = dense as before


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
                       sparse=c.sparse and c.loss != "full-softmax")  # full softmax scores every row

    def fit(self, train: Dataset, valid: Dataset | None = None, *, train_cfg: TrainConfig | None = None,
            run_dir: Path | None = None, resume: bool = False, show_progress: bool = False,
            **_: Any) -> HNVM:
        from hnvm.evaluate import evaluate_next_item
        from hnvm.train import Trainer

        cfg = train_cfg or TrainConfig()
        torch.manual_seed(cfg.seed)
        trainable = self._trainable(train)
        seq = trainable.seq

        def validate() -> dict[str, float]:
            return evaluate_next_item(self, seq, "valid", max_targets=1024).metrics

        has_valid = valid is not None and len(seq.sessions_of("valid")) > 0
        self.result_ = Trainer(cfg, run_dir, show_progress=show_progress, resume=resume).fit(
            trainable, validate if has_valid else None)
        if self.config.unknown_user_rate == 0:
            self._population_row(trainable.untrained_users)
        self._unknown_row_to(trainable.untrained_users)
        self.net.eval()
        return self

    @torch.no_grad()
    def _population_row(self, untrained: Tensor) -> None:
        """Row 0 of the prior and the posterior e tables := the moment-matched aggregate of the
        trained users' Gaussians N(mu_u, var_u): mean mu_u, and mean var_u + variance of mu_u."""
        net = self.net
        if net is None or not net.use_e:
            return
        n = net.e_post_mu.weight.shape[0]
        trained = torch.ones(n, dtype=torch.bool)
        trained[0] = False
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

    def _trainable(self, train: Dataset) -> _HNVMTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        from hnvm.data.batches import Sequences

        seq = Sequences.from_events(train.events, train.n_users)
        self.net = self._build(train.n_items, train.n_users)
        counts = torch.from_numpy(np.bincount(train.split("train").get_column("item").to_numpy(),
                                              minlength=train.n_items + 1).astype(np.float32))
        self.counts_ = counts
        return _HNVMTrainable(self, seq, counts)

    # -- scoring (no leakage: prior for z, posterior mean of e which reads the user id only) -----
    def _require(self) -> HNVMNet:
        if self.net is None:
            raise RuntimeError("fit or load the model first")
        self.net.eval()
        return self.net

    @torch.no_grad()
    def _history(self, users: Tensor, sessions: Tensor) -> Tensor:
        net = self._require()
        if sessions.shape[1] == 0 or not self.config.use_history:
            return sessions.new_zeros(len(users), net.hidden, dtype=torch.float)
        return net.encode_history(users, self._trim(sessions))

    def _trim(self, items: Tensor) -> Tensor:
        """Keep the last max_len items of each session (only if the setting asks)."""
        L = self.config.max_len
        if not L or items.shape[-1] <= L:
            return items
        lengths = (items > 0).sum(-1, keepdim=True)
        ar = torch.arange(L, device=items.device)
        idx = (lengths - L).clamp(min=0) + ar
        return items.gather(-1, idx.clamp(max=items.shape[-1] - 1)) * (ar < lengths)

    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        net = self._require()
        h = self._history(batch.users, batch.sessions[:, :-1])  # [B, H]
        out = net(batch.users, batch.sessions[:, -1:], h_con0=h, sample=False,
                  mc_samples=self.config.mc_samples)
        hidden = out.dec_hidden[batch.target_rows, 0, batch.target_pos]  # [K, H]
        return net.score(hidden)

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        net = self._require()
        h = self._history(batch.users, batch.sessions)
        return net.score(net.next_session_hidden(batch.users, h, self.config.mc_samples))

    # persistence (save/load): NetPersistence, with counts_ saved beside the weights


class _HNVMTrainable:
    """What the generic Trainer needs: the module, batches and the loss (eq. 18-24)."""

    def __init__(self, model: HNVM, seq: Any, counts: Tensor) -> None:
        from hnvm.data.batches import user_windows

        self.model, self.seq, self.cfg = model, seq, model.config
        assert model.net is not None
        self.module = model.net
        self.windows = user_windows(seq, self.cfg.window if self.cfg.use_history else 1)
        # w_u: spread each user's KL(q(e)||p(e)) over the user's train sessions, so that one
        # epoch of session-level batches counts it once (the sequence-level bound, eq. 19/22)
        n_train = np.bincount(seq.session_user[seq.session_split == 0], minlength=len(seq.user_first))
        self.sessions_per_user = torch.from_numpy(np.maximum(n_train, 1).astype(np.float32))
        # known users with no training session (possible with a time split): their rows stay untrained
        self.untrained_users = torch.from_numpy(np.flatnonzero(n_train[1:] == 0) + 1)
        probs = counts.clamp(min=0) ** self.cfg.sample_alpha
        probs[0] = 0
        self.neg_probs = probs / probs.sum()

    def to(self, device: torch.device) -> None:
        self.neg_probs = self.neg_probs.to(device)
        self.sessions_per_user = self.sessions_per_user.to(device)

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Any:
        from hnvm.data.batches import window_batches

        return window_batches(self.seq, self.windows, self.cfg.batch_size, rng,
                              max_len=self.cfg.max_len or None,
                              max_prefix=None if self.cfg.use_history else 0,
                              rank=rank, world_size=world_size)

    def batch_targets(self, batch: Any) -> int:
        return batch.n_targets

    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        net, c = self.module, self.cfg
        h0 = None
        if batch.prefix.shape[1] > 0:
            with torch.no_grad():  # the context entering the window, without gradient (§5.10)
                h0 = net.encode_history(batch.users, batch.prefix)
        users = batch.users
        if c.use_e and c.unknown_user_rate > 0:
            # these windows train row 0, the unknown user: cold start then reads a population e
            # (torch's generator, seeded by the Trainer: a seed still gives the same run)
            unknown = torch.rand(users.shape, device=users.device) < c.unknown_user_rate
            users = users.masked_fill(unknown, 0)
        out = net(users, batch.window, h_con0=h0, sample=True)
        mask = out.item_mask  # [B, W, T]
        hidden = out.dec_hidden[mask]  # [K, H]
        targets = batch.window[mask]  # [K]
        if c.loss == "full-softmax":
            logits = net.score(hidden)
            valid = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            valid[0] = False
            rec = full_softmax_loss(logits, targets, valid, reduction="sum")
        else:
            neg_ids = torch.multinomial(self.neg_probs, c.n_negatives, replacement=True)  # [M]
            pos = net.score_items(hidden, targets.unsqueeze(-1)).squeeze(-1)  # [K]
            neg = net.score_items(hidden, neg_ids)  # [K, M]
            neg_mask = neg_ids.unsqueeze(0) != targets.unsqueeze(1)
            if c.loss == "bpr":
                rec = bpr_loss(pos, neg, neg_mask, reduction="sum")
            elif c.loss == "bpr-max":
                rec = bpr_max_loss(pos, neg, c.bpreg, neg_mask, reduction="sum")
            else:
                logq = (self.neg_probs * c.n_negatives).clamp(min=1e-12).log()
                rec = sampled_softmax_loss(pos, neg, logq[targets], logq[neg_ids], neg_mask,
                                           reduction="sum")
        beta = 1.0 if c.kl_anneal_steps == 0 else min(1.0, step / c.kl_anneal_steps)
        n_sess = out.session_mask.sum(1).float()  # [B] sessions of each window
        w_u = n_sess / self.sessions_per_user[batch.users]  # the real user's share, even for row 0
        kl_z, kl_e = out.kl_z.sum(), (w_u * out.kl_e).sum()
        k = max(int(mask.sum()), 1)
        loss = (rec + beta * (kl_z + kl_e)) / k  # the negative ELBO per target
        return {"loss": loss, "rec": rec.detach() / k, "kl_z": kl_z.detach() / k,
                "kl_e": kl_e.detach() / k, "beta": torch.tensor(beta)}
