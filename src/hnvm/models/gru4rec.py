"""GRU4Rec (Hidasi et al. 2016; Hidasi & Karatzoglou 2018) as its authors' reference PyTorch
implementation (hidasib/GRU4Rec_PyTorch_Official) trains and scores it.

* Session-parallel mini-batches: slot b of a batch walks through one session; when it ends, the
  slot's hidden state is reset to 0 and the next session (by start time) takes the slot; once no
  session is left the batch shrinks. A step is one input -> next-item pair per slot and
  backpropagates through that step only (the carried states are detached).
* Item input: constrained_embedding: x = W_y[i] (input = output weights); embedding > 0:
  x = E[i]; otherwise the first GRU layer reads the one-hot item (its input weights are an item
  table).
* Network: x -> dropout_p_embed -> GRU layers; each layer's output -> dropout_p_hidden, and that
  dropped-out output is also the carried hidden state (as in the reference).
* Scores: r_j = W_y[j] · h + b_j against the mini-batch's targets plus n_sample items drawn from
  count^sample_alpha (drawn in bulk and cached).
* Losses: bpr-max (final ELU(elu_p), softmax weights over the negatives, bpreg · Σ s_j r_j²) and
  cross-entropy (optional log-Q correction), as the reference; and plain BPR (the mean over the
  negatives of -log σ(r_target - r_j)), which the HNVM paper uses for every GRU model (§4.3) and
  the reference's PyTorch code lacks. Each is summed over the batch and divided by the nominal
  batch size.
* Optimizer: Adagrad with momentum (train.optimizer = "adagrad", hnvm.training.AdagradMomentum,
  the reference's update and eps); the item tables then get sparse gradients so that, as in the
  reference, only the rows a step used are updated (dense with Adam or train.grad_clip > 0).
* Init: the reference's default (compatibility mode): each weight block (each gate separately)
  ~ U(±sqrt(6 / (fan_in + fan_out))), biases 0.

GRU4Rec is session-based: it ignores users and earlier sessions. `score` runs the GRU over the
prefix of the session being predicted (a target at position 0 has an empty prefix, so a zero
state and its scores are the output biases). `score_sessions` has no current session, so it
uses the user's most recent history session as the prefix (the state at its end).

Differences from the reference that do not change the model: item ids are 1..n_items with row 0
unused (padding), the initial weights come from torch seeded with `train.seed` rather than numpy
seeded with 42, and ties in session start time are ordered by session id. For speed, bpr-max's
gradient is taken in closed form (_BprMax) and the item tables' sparse gradients arrive summed
per row (_CoalescedRows): the same numbers up to float rounding, in fewer passes
(benchmarks/gru4rec_reference.py compares the two implementations' speed side by side).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hnvm.config import choices, rng
from hnvm.contract import Batch
from hnvm.data.batches import Sequences
from hnvm.data.sampling import train_counts
from hnvm.errors import ConfigError
from hnvm.models.base import NetPersistence, register
from hnvm.models.gru4rec_net import (
    GRU4RecNet,
    ParallelStep,
    PopularitySampleCache,
    in_batch_bpr_loss,
    in_batch_bpr_max_loss,
    in_batch_cross_entropy_loss,
    session_parallel_steps,
    training_order,
)
from hnvm.training import TrainConfig, fit

if TYPE_CHECKING:
    from hnvm.data.store import Dataset

# ---- the estimator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GRU4RecConfig:
    """Hyper-parameters of GRU4Rec (section [model]); names and defaults are the reference's.
    Learning rate, momentum and epochs are [train] settings (train.lr, train.momentum,
    train.epochs with train.optimizer = "adagrad")."""

    layers: tuple[int, ...] = (100,)  # GRU layer sizes, e.g. --set model.layers=100,100
    loss: str = field(default="cross-entropy", metadata=choices(
        "cross-entropy", "bpr-max", "bpr", doc="bpr: plain BPR, the HNVM paper's loss for every GRU model"))
    batch_size: int = field(default=64, metadata=rng(1, 100_000, "session-parallel slots"))
    dropout_p_embed: float = field(default=0.0, metadata=rng(0.0, 0.99, "on the item input"))
    dropout_p_hidden: float = field(default=0.0, metadata=rng(0.0, 0.99, "on GRU outputs"))
    n_sample: int = field(default=2048, metadata=rng(
        0, 1_000_000, "extra popularity-sampled negatives; 0 = in-batch only"))
    sample_alpha: float = field(default=0.5, metadata=rng(0.0, 1.0, "negatives ~ count^alpha"))
    sample_cache_size: int = field(default=10_000_000, metadata=rng(
        1, 10**9, "negative item ids drawn at once"))
    embedding: int = field(default=0, metadata=rng(
        0, 100_000, "item embedding size; 0 = one-hot input"))
    constrained_embedding: bool = True  # input embedding = output weights W_y (overrides embedding)
    bpreg: float = field(default=1.0, metadata=rng(0.0, 100.0, "bpr-max score regulariser"))
    elu_p: float = field(default=0.5, metadata=rng(0.0, 100.0, "bpr-max final ELU alpha; 0 = off"))
    logq: float = field(default=0.0, metadata=rng(0.0, 10.0, "cross-entropy log-Q weight"))
    session_order: str = field(default="time", metadata=choices(
        "time", "id", doc="training order of sessions: by start time (reference) or dataset id"))
    train_on: str = field(default="train", metadata=choices(
        "train", "train+valid", doc="train+valid: fit on both, no validation (final test runs)"))

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, int):  # `--set model.layers=100` arrives as an int
            layers = (layers,)
        if not isinstance(layers, tuple | list) or not layers or any(
                not isinstance(h, int) or h < 1 for h in layers):
            raise ConfigError(f"model.layers = {self.layers!r}: need one or more sizes >= 1")
        object.__setattr__(self, "layers", tuple(layers))


@register("gru4rec")
class GRU4Rec(NetPersistence):
    """GRU4Rec as a Recommender: `GRU4Rec(GRU4RecConfig(...)).fit(dataset, train_cfg=...)`."""

    name = "gru4rec"
    config_class = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or GRU4RecConfig(), **overrides)
        self.net: GRU4RecNet | None = None
        self.n_items = 0
        self.result_: Any = None

    def _build(self, n_items: int, sparse: bool = False, seed: int = 0) -> GRU4RecNet:
        c = self.config
        self.n_items = n_items
        return GRU4RecNet(n_items, c.layers, c.embedding,
                          c.constrained_embedding, c.dropout_p_embed, c.dropout_p_hidden,
                          sparse=sparse, seed=seed)

    def fit(self, train: Dataset, **options: Any) -> GRU4Rec:
        """Train on `train` (options: `hnvm.training.fit`); returns self."""
        return fit(self, train, **options)

    def trainable(self, train: Dataset, seq: Sequences, cfg: TrainConfig) -> _GRU4RecTrainable:
        """A fresh network and what the generic Trainer needs to fit it."""
        splits = ("train", "valid") if self.config.train_on == "train+valid" else ("train",)
        # sparse item-table gradients make Adagrad update only the rows a step used (reference);
        # Adam and gradient clipping need dense ones
        sparse = cfg.optimizer == "adagrad" and not cfg.grad_clip
        self.net = self._build(train.n_items, sparse=sparse, seed=cfg.seed)
        seq = seq.view(splits)  # the events it trains on (no held-out item)
        order = training_order(seq, train.events, splits, self.config.session_order)
        trainable = _GRU4RecTrainable(self, seq, order, train_counts(train, splits))
        trainable.fits_valid = "valid" in splits  # then validation would read training data
        return trainable

    # -- scoring: the session prefix only ----------------------------------------------------------
    @torch.no_grad()
    def score(self, batch: Batch) -> Tensor:
        net = self.network()
        current = batch.sessions[:, -1]  # [B, T]: history sessions are ignored (session-based)
        # only the steps some target reads (T is the batch's longest session of any kind; the
        # GRU is causal, each step the same [B] computation, so the states are the same floats)
        steps = int(batch.target_pos.max()) if batch.n_targets else 0  # a target at p reads step p - 1
        outs = net.run(current[:, :steps])  # [B, steps, H]
        h = outs.new_zeros(batch.n_targets, net.layers[-1])  # [K, H]; empty prefix: zero state
        has_prefix = batch.target_pos > 0
        h[has_prefix] = outs[batch.target_rows[has_prefix], batch.target_pos[has_prefix] - 1]
        return net.score_items(h)  # [K, n_items + 1]

    @torch.no_grad()
    def score_sessions(self, batch: Batch) -> Tensor:
        """No current session: the prefix is the user's last history session (zero state when the
        user has none)."""
        net = self.network()
        last = batch.sessions[:, -1]  # [B, T]
        lengths = (last > 0).sum(1)  # [B]
        outs = net.run(last[:, :int(lengths.max()) if len(last) else 0])  # [B, longest, H]
        h = outs.new_zeros(len(last), net.layers[-1])  # [B, H]
        rows = torch.nonzero(lengths > 0).squeeze(1)
        h[rows] = outs[rows, lengths[rows] - 1]
        return net.score_items(h)



class _GRU4RecTrainable:
    """What the generic Trainer needs: session-parallel steps and the reference's losses. The
    hidden state is carried from step to step here (detached: one-step backpropagation)."""

    def __init__(self, model: GRU4Rec, seq: Sequences, order: np.ndarray, counts: Tensor) -> None:
        assert model.net is not None
        self.module: GRU4RecNet = model.net
        self.cfg = model.config
        self.seq, self.order = seq, order
        self.fits_valid = False  # True: trains on the validation split too (no early stopping)
        self.state: list[Tensor] | None = None
        c = self.cfg
        self.sampler = None
        if c.n_sample > 0:
            self.sampler = PopularitySampleCache(counts, c.sample_alpha, c.n_sample,
                                                 c.sample_cache_size)
        # log Q of each column for the CE log-Q correction: in-batch targets are drawn from the
        # data (count), extra negatives from count^alpha (unnormalised, as the reference)
        self.log_count = counts.clamp(min=1e-12).log()  # Float[n_items + 1]

    def to(self, device: torch.device) -> None:
        self.log_count = self.log_count.to(device)
        if self.sampler is not None:
            self.sampler.cdf = self.sampler.cdf.to(device)

    def train_batches(self, epoch: int, rng: np.random.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Iterator[ParallelStep]:
        self.state = None  # every epoch starts from zero states
        # session-parallel steps carry state from step to step, so a rank takes every
        # world_size-th session and runs its own slots (the ranks' step counts differ by a few;
        # the Trainer stops every rank at the first one's end)
        order = self.order if world_size <= 1 else self.order[rank::world_size]
        steps = session_parallel_steps(self.seq.items, self.seq.offsets, order,
                                       self.cfg.batch_size)
        for step in steps:
            if self.cfg.n_sample == 0 and len(step.inputs) < 2:
                return  # no negatives left (the reference stops the epoch here too)
            yield step

    def batch_targets(self, batch: ParallelStep) -> int:
        return len(batch.targets)

    def loss(self, batch: ParallelStep, step: int) -> dict[str, Tensor]:
        net, c = self.module, self.cfg
        b = len(batch.inputs)
        state = self.state or net.init_state(b)
        state = [h.detach() for h in state]
        if batch.keep is not None:
            state = [h[batch.keep] for h in state]
        if batch.reset is not None:
            state = [h.masked_fill(batch.reset.unsqueeze(1), 0.0) for h in state]
        cols = batch.targets  # [m] targets of every slot, then the extra negatives
        if self.sampler is not None:
            cols = torch.cat([batch.targets, self.sampler.get()])
        scores, self.state = net.train_step(batch.inputs, state, cols)  # [b, m]; column k < b: row k's target
        if c.loss == "bpr-max":
            total = in_batch_bpr_max_loss(scores, c.bpreg, c.elu_p)
        elif c.loss == "bpr":
            total = in_batch_bpr_loss(scores)
        else:
            logq_cols = None
            if c.logq > 0:
                logq_cols = self.log_count.index_select(0, cols)
                logq_cols[b:] *= c.sample_alpha
            total = in_batch_cross_entropy_loss(scores, logq_cols, c.logq)
        return {"loss": total / c.batch_size}  # the reference divides by the nominal batch size
