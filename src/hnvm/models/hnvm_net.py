"""HNVM network: hierarchical neural variational model (Xiao, Liang & Meng, WWW 2019).

The network (`HNVMNet`) of eq. 6-15; the estimator (`hnvm.models.hnvm.HNVM`: the Recommender
protocol, the loss of eq. 18-24 and leakage-free scoring) is beside it.

    sessions of one user   s_1 ... s_n ...                  (items [B, W, T], 0 = padding)
    encoder  (eq. 9)       h_enc_n = GRU_enc(s_n)[last valid step]
    context  (eq. 10)      h_con_n = GRU_con(h_con_{n-1}, h_enc_n)
    general  (eq. 6, 14)   p(e|u), q(e|u): per-user mean / log-variance rows
    long-term (eq. 12, 15) p(z_n|h_con_{n-1}, e) = MLP_p,  q(z_n|h_con_{n-1}, h_enc_n) = MLP_q
    decoder  (eq. 11)      h_dec_t = GRU_dec(h_dec_{t-1}, [emb(x_t); h_con_{n-1}; z_n]),
                           x = (BOS, i_1, ..., i_{T-1}), h_dec_0 = 0; h_dec_t predicts i_t
    output                 score_j = W_out[j] · dropout(h_dec_t) + b_j

Interpretation choices (the paper leaves these open; see docs/design.md, "HNVM"):
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
* Repeat channel (not in the paper; `repeat=True`, hnvm_repeat): a sparse, state-gated score term
  from what the user did with each item before; built after the paper's init, so without it the
  network (and its random stream) is the paper's.
* Posterior-collapse remedies (not in the paper; off by default except where docs/design.md,
  "HNVM" says): `var_scale_in_kl=False` computes both KL terms on the unscaled Gaussians, so
  var_scale is only a sampling temperature (inside the KL it multiplies the mean-difference term
  by 1/var_scale = 20); `word_dropout` replaces a share of the decoder's input items by a zero
  vector during training (Bowman et al. 2016), so the decoder must lean on [h_con; z].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hnvm.models.gru_inference import InputGates, applies, context_after, gru_last_states, uses_table
from hnvm.models.hnvm_repeat import RepeatChannel
from hnvm.models.layers import (
    GaussianHead,
    ItemOutput,
    gaussian_kl_dims,
    gru_outputs,
    init_uniform_,
    length_groups,
    reparameterize,
    unsort_rows,
)


@dataclass
class HNVMOutput:
    states: Tensor  # [K, H] decoder state predicting each real item, in the order of items[item_mask]
    kl_z: Tensor  # [B, W] KL(q(z_n) || p(z_n | e)); 0 on padded sessions
    kl_e: Tensor  # [B] KL(q(e) || p(e))
    h_con: Tensor  # [B, W, H] context state after each session (carried over padding)
    item_mask: Tensor  # [B, W, T] bool, True = real item
    session_mask: Tensor  # [B, W] bool, True = non-empty session
    z_gaussians: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (mu_q, lv_q, mu_p, lv_p) [B, W, Dz]
    kl_z_dims: Tensor | None = None  # [B, W, Dz] per dimension (kl_z = its sum); 0 on padded sessions
    kl_e_dims: Tensor | None = None  # [B, De] per dimension (kl_e = its sum)
    # [B, W, C] the session input at inference, [h_con_{n-1}; prior mean of z_n]: what the repeat
    # channel's gate reads in training too, so that it never sees the session it scores
    cond: Tensor | None = None

    @property
    def dec_hidden(self) -> Tensor:
        """[B, W, T, H]: `states` at their items' places, 0 at padding (built on each call)."""
        dec = self.states.new_zeros(*self.item_mask.shape, self.states.shape[-1])
        dec[self.item_mask] = self.states
        return dec


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
        step_rows: float = 20.0,
        sparse: bool = False,
        var_scale_in_kl: bool = True,
        word_dropout: float = 0.0,
        repeat: bool = False,
    ) -> None:
        super().__init__()
        if n_items < 1 or n_users < 0:
            raise ValueError(f"need n_items >= 1 and n_users >= 0, got {n_items}, {n_users}")
        self.n_items, self.n_users, self.hidden = n_items, n_users, hidden
        self.d_e, self.d_z = d_e, d_z
        self.use_e, self.use_z = use_e, use_z
        self.step_rows = step_rows  # speed only: see _buckets
        self.bos = n_items + 1
        self.log_var_scale = math.log(var_scale)
        # the KL terms see logvar - kl_shift: 0 = the scaled Gaussians (paper), else unscaled
        self.kl_shift = 0.0 if var_scale_in_kl else self.log_var_scale
        if not 0.0 <= word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {word_dropout}")
        self.word_dropout = word_dropout
        H = hidden

        # sparse: the item and user tables get sparse gradients, so that a training step costs
        # O(rows it used), not O(catalogue + users) (the Trainer's optimizers update those rows)
        self.item_emb = nn.Embedding(n_items + 2, emb_dim, padding_idx=0, sparse=sparse)  # + padding + BOS
        self.encoder = nn.GRU(emb_dim, H, batch_first=True)
        self.context = nn.GRUCell(H, H)
        self.input_gates = InputGates()  # inference only: the encoder's input gates per item
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
        # the repeat channel (not in the paper; hnvm_repeat): built after the paper's init, so
        # that without it the network and its random stream are the paper's
        self.repeat = RepeatChannel(cond_dim, H, n_items, sparse) if repeat else None

    def train(self, mode: bool = True) -> HNVMNet:
        if mode:  # training may change the weights in ways no version counter sees
            self.input_gates = InputGates()
        return super().train(mode)

    # ---- building blocks ------------------------------------------------------------------

    def _buckets(self, lengths: Tensor) -> list[Tensor]:
        """Row indices by length, shortest first, each group one GRU call padded to its longest row
        (torch's packed GRU is slower on CPU); the grouping sets the cost (`length_groups`)."""
        order = lengths.argsort()
        cuts = length_groups(lengths[order].cpu().numpy(), self.step_rows)
        return list(order.tensor_split(cuts))

    def _encode(self, seqs: Tensor, lengths: Tensor) -> Tensor:
        """seqs: Long[N, T] right-padded, lengths: Long[N] >= 1 -> h_enc Float[N, H] (the state
        after each session's last real item). Only that state is gathered from each group's GRU
        output, never a padded [N, T, H] copy. In inference on the CPU the input gates come
        from a per-item table (gru_inference: the same floats, fewer products)."""
        exact = not self.training and applies(self.item_emb.weight)
        table = self.input_gates.table(self.item_emb, self.encoder, int(lengths.sum())) if exact else None
        parts, order = [], []
        for rows in self._buckets(lengths):
            n = lengths[rows]
            items = seqs[rows, : int(n.max())]  # [n, t]
            if table is not None and uses_table(self.encoder, items):
                parts.append(gru_last_states(table, self.encoder, items, n))
            else:
                out = gru_outputs(self.encoder, self.item_emb(items))  # [n, t, H]
                parts.append(out[torch.arange(len(rows), device=out.device), n - 1])
            order.append(rows)
        return unsort_rows(torch.cat(parts), torch.cat(order))

    def _decoder_input(self, seqs: Tensor) -> Tensor:
        """(BOS, seqs[:, :-1]): Long[N, T], with word dropout in training."""
        N = seqs.shape[0]
        x_ids = torch.cat([seqs.new_full((N, 1), self.bos), seqs[:, :-1]], dim=1)  # [N, T]
        if self.training and self.word_dropout > 0:
            # Bowman et al. 2016: an input item becomes the zero vector (padding row), BOS stays
            drop = torch.rand(x_ids.shape, device=x_ids.device) < self.word_dropout
            x_ids = x_ids.masked_fill(drop & (x_ids != self.bos), 0)
        return x_ids

    def _decode_valid(self, seqs: Tensor, lengths: Tensor, cond: Tensor) -> Tensor:
        """Decoder over (BOS, seqs[:, :-1]), the states at real positions only: seqs Long[N, T] right-padded,
        lengths Long[N] >= 1, cond Float[N, C] -> Float[sum(lengths), H] in (row, position) order, i.e. the order
        of out[arange(T) < lengths[:, None]] for a padded out. Gathering per length group avoids padded
        [N, T, H] copies (training's largest non-GRU cost) and makes dropout act on real states only."""
        x_ids = self._decoder_input(seqs)
        starts = torch.cumsum(lengths, 0) - lengths  # [N] first flat index of each row
        parts, where = [], []
        for rows in self._buckets(lengths):
            n = lengths[rows]
            t = int(n.max())
            x = self.item_emb(x_ids[rows, :t])  # [n, t, E]
            c = cond[rows].unsqueeze(1).expand(-1, t, -1)  # the same [h_con; z] at every step
            out = gru_outputs(self.decoder, torch.cat([x, c], dim=-1))  # [n, t, H]
            steps = torch.arange(t, device=out.device)
            valid = steps < n[:, None]  # [n, t]
            parts.append(out[valid])
            where.append((starts[rows, None] + steps)[valid])
        return unsort_rows(torch.cat(parts), torch.cat(where))

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

    def kl_dims(self, mu_q: Tensor, lv_q: Tensor, mu_p: Tensor, lv_p: Tensor) -> Tensor:
        """KL(q || p) per dimension [..., D] of two of this network's Gaussians (log-variances
        with var_scale in them), as the objective counts it (see `var_scale_in_kl`)."""
        if self.kl_shift:  # (no-op subtraction otherwise: it would reorder gradient accumulation)
            lv_q, lv_p = lv_q - self.kl_shift, lv_p - self.kl_shift
        return gaussian_kl_dims(mu_q, lv_q, mu_p, lv_p)

    def e_gaussians(self, users: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """users: Long[B] -> (mu_q, lv_q, mu_p, lv_p) of q(e|u) and p(e|u), each [B, d_e]."""
        return (self.e_post_mu(users), self.e_post_logvar(users) + self.log_var_scale,
                self.e_prior_mu(users), self.e_prior_logvar(users) + self.log_var_scale)

    def _user_e(
        self, users: Tensor, sample: bool, generator: torch.Generator | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """users: Long[B] -> (e Float[B, d_e] or None, KL per dimension Float[B, d_e] or None)."""
        if not self.use_e:
            return None, None
        mu_q, lv_q, mu_p, lv_p = self.e_gaussians(users)
        e = reparameterize(mu_q, lv_q, generator) if sample else mu_q
        return e, self.kl_dims(mu_q, lv_q, mu_p, lv_p)

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
        B, W, _ = items.shape
        H = self.hidden
        h_enc, item_mask, session_mask, real, seqs, seq_len = self._sessions(items)

        # the context GRU across sessions (the only loop over W)
        h_prev, h_con = self._context(h_enc, session_mask, h_con0)  # [B, W, H] each

        # latents
        e, kl_e_dims = self._user_e(users, sample, generator)
        kl_e = kl_e_dims.sum(-1) if kl_e_dims is not None else users.new_zeros(users.shape, dtype=torch.float)
        z, kl_z, kl_z_dims, S = None, h_enc.new_zeros(B, W), None, 1
        if self.use_z:
            mu_p, lv_p = self._prior_z(h_prev, e)  # [B, W, Dz]
            mu_q, lv_q = self.z_post(torch.cat([h_prev, h_enc], -1))
            kl_z_dims = self.kl_dims(mu_q, lv_q, mu_p, lv_p) * session_mask.unsqueeze(-1)  # [B, W, Dz]
            kl_z = kl_z_dims.sum(-1)  # [B, W]
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
        session_cond = self._cond(h_prev, e, mu_p if self.use_z else None) if self.repeat is not None else None
        cond = cond.reshape(S, B * W, cond.shape[-1])[:, real].flatten(0, 1)  # [S*N, C]

        # decoder over all real sessions (and MC draws) at once: one GRU call per length group;
        # only real positions are kept (a padded [B, W, T, H] copy cost more than the scoring)
        states = h_enc.new_zeros(0, H)
        if real.numel():
            out = self._decode_valid(seqs.repeat(S, 1), seq_len.repeat(S), cond)  # [S*K, H]
            states = out.view(S, -1, H).mean(0).to(h_enc.dtype)  # [K, H]
        states = self.drop(states)
        z_gaussians = (mu_q, lv_q, mu_p, lv_p) if self.use_z else None
        return HNVMOutput(states, kl_z, kl_e, h_con, item_mask, session_mask, z_gaussians,
                          kl_z_dims, kl_e_dims, session_cond)

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
        if (h := context_after(self.context, h_enc, session_mask, h_con0)) is not None:
            return h  # the occupied slots only (gru_inference: the same floats)
        return self._context(h_enc, session_mask, h_con0)[1][:, -1]

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
        lengths = lengths.repeat(S)
        last = self._decode_valid(seqs, lengths, cond)[torch.cumsum(lengths, 0) - 1]  # [S*B, H]
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

    # ---- online inference: one session, one step at a time ---------------------------------
    # The pieces of `prefix_hidden` (mc_samples = 1) and `encode_history`, so that a caller can
    # keep the state of each user and advance it event by event (`hnvm.models.hnvm.HNVM`).

    def general_preference(self, users: Tensor) -> Tensor | None:
        """e^u for inference: the posterior mean of q(e|u) (eq. 14), which reads the user id only.
        users: Long[B] -> Float[B, d_e]; None without e (use_e=False)."""
        return self.e_post_mu(users) if self.use_e else None

    def fold_session(self, h_con: Tensor, items: Tensor) -> Tensor:
        """One closed session into the context: h_enc_n = GRU_enc(s_n)[last step] (eq. 9), then
        h_con_n = GRU_con(h_con_{n-1}, h_enc_n) (eq. 10). h_con: Float[N, H]; items: Long[N, T],
        every row T >= 1 real items (no padding) -> Float[N, H]."""
        lengths = torch.full((items.shape[0],), items.shape[1], dtype=torch.long, device=items.device)
        return self.context(self.drop(self._encode(items, lengths)), h_con)

    def session_condition(self, h_con: Tensor, e: Tensor | None) -> Tensor:
        """The decoder's per-session input at inference: z_n = the mean of the prior
        p(z_n | h_con_{n-1}, e) (eq. 12), then [h_con_{n-1}; z_n] (eq. 11); [h_con; e] without z,
        h_con alone without either. h_con: Float[B, H], e: Float[B, d_e] or None -> Float[B, C]."""
        z = self._prior_z(h_con, e)[0] if self.use_z else None
        return self._cond(h_con, e, z)

    def decoder_step(self, item: int | Tensor, h_dec: Tensor, cond: Tensor) -> Tensor:
        """One decoder step (eq. 11) for B rows: input x = [emb(item); cond], state h_dec
        Float[B, H] -> h_dec' Float[B, H]; item (one id for every row, or Long[B]) in
        1..n_items, or `bos` for the first step.
        torch.gru_cell with the decoder's own weights: the same GRU as `nn.GRU` over a sequence
        (`_decode`), without its per-call set-up (a third of the cost of a one-step nn.GRU call)."""
        d = self.decoder
        emb = (self.item_emb.weight[item] if isinstance(item, Tensor) else
               self.item_emb.weight[item: item + 1].expand(len(cond), -1))
        x = torch.cat([emb, cond], -1)
        return torch.gru_cell(x, h_dec, d.weight_ih_l0, d.weight_hh_l0, d.bias_ih_l0, d.bias_hh_l0)
