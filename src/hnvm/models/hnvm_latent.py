"""What HNVM's latent variables carry, and the objective's free bits: posterior collapse is
when q(z|x) equals its prior, so z (or e) carries no information and HNVM is in effect a
deterministic hierarchical GRU (docs/design.md, "HNVM": the measured diagnostics and remedies)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hnvm.data.batches import Sequences, window_batches
from hnvm.models.hnvm_net import HNVMNet

if TYPE_CHECKING:
    from hnvm.models.hnvm import HNVMConfig


def free_bits_kl(out: Any, w_u: Tensor, floor: float) -> Tensor:
    """The KL terms with free bits (Kingma et al. 2016, KL thresholding): each latent
    dimension's KL is averaged over the batch (z: its real sessions; e: its users, weighted by
    w_u) and counts at least `floor` nats, so a dimension below the floor gets no gradient to
    collapse further. out: HNVMOutput (kl_z_dims [B, W, Dz], kl_e_dims [B, De]); -> scalar,
    summed like the plain KL (z over sessions, e with weights w_u [B])."""
    total = out.kl_z.new_zeros(())
    if out.kl_z_dims is not None:
        n = out.session_mask.sum().clamp(min=1).float()
        per_dim = out.kl_z_dims.sum((0, 1)) / n  # [Dz]: masked sessions hold 0
        total = total + n * per_dim.clamp(min=floor).sum()
    if out.kl_e_dims is not None:
        w = w_u.sum().clamp(min=1e-12)
        per_dim = (w_u[:, None] * out.kl_e_dims).sum(0) / w  # [De]
        total = total + w * per_dim.clamp(min=floor).sum()
    return total


@torch.no_grad()
def latent_diagnostics(net: HNVMNet, c: HNVMConfig, seq: Sequences, windows: np.ndarray, untrained: Tensor,
                       *, max_windows: int = 256, max_mi: int = 512) -> dict[str, float]:
    """What the latents carry: the mean KL per dimension of z (over the real sessions of the
    first `max_windows` training windows of `seq`, a training view) and of e (over the trained
    users, i.e. not row 0 nor `untrained`), the active units of each (Burda et al. 2016:
    dimensions whose posterior mean varies across the data with variance > 0.01) and the
    mutual information I(x; z) and I(u; e) under q (`mutual_information`, on at most `max_mi`
    sessions / users). Eval mode; its one random draw uses its own generator, so training is the
    same with or without it."""
    was_training = net.training
    net.eval()
    out: dict[str, float] = {}
    dev = next(net.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(0)
    if c.use_z and len(windows):
        mus, lvs, kls = [], [], []
        for batch in window_batches(seq, windows[:max_windows], c.batch_size, None,
                                    max_len=c.max_len or None, max_prefix=None if c.use_history else 0):
            prefix, window, users = batch.prefix.to(dev), batch.window.to(dev), batch.users.to(dev)
            h0 = net.encode_history(users, prefix) if prefix.shape[1] > 0 else None
            o = net(users, window, h_con0=h0, sample=False)
            assert o.z_gaussians is not None and o.kl_z_dims is not None
            mu_q, lv_q = o.z_gaussians[:2]
            keep = o.session_mask
            mus.append(mu_q[keep].float())
            lvs.append(lv_q[keep].float())
            kls.append(o.kl_z_dims[keep].float())
        mu, lv, kl = torch.cat(mus), torch.cat(lvs), torch.cat(kls)  # [N, Dz]
        out["kl_z_per_dim"] = float(kl.mean())
        out["active_z"] = int((mu.var(0, unbiased=False) > 0.01).sum()) if len(mu) > 1 else 0
        out["mi_z"] = mutual_information(mu[:max_mi], lv[:max_mi], gen)
    if c.use_e:
        trained = torch.ones(net.e_post_mu.weight.shape[0], dtype=torch.bool, device=dev)
        trained[0] = False
        trained[untrained.to(dev)] = False
        rows = trained.nonzero().squeeze(1)
        if len(rows):
            mu_q, lv_q, mu_p, lv_p = net.e_gaussians(rows)
            out["kl_e_per_dim"] = float(net.kl_dims(mu_q, lv_q, mu_p, lv_p).mean())
            out["active_e"] = int((mu_q.var(0, unbiased=False) > 0.01).sum()) if len(rows) > 1 else 0
            out["mi_e"] = mutual_information(mu_q[:max_mi].float(), lv_q[:max_mi].float(), gen)
    net.train(was_training)
    return out


def mutual_information(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> float:
    """I(x; z) under q, the estimate of the posterior-collapse literature (Hoffman & Johnson
    2016; He et al., ICLR 2019): E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], with the
    aggregate posterior q(z) the mixture of the N given posteriors and one z drawn from each.
    mu, logvar: Float[N, D] (N >= 2) -> nats (0 when z carries nothing about x; at most log N)."""
    n = mu.shape[0]
    if n < 2:
        return 0.0
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    # log q(z_j | x_i) for every pair: [N (j), N (i)]
    dev = (z[:, None, :] - mu[None]) ** 2 / logvar.exp()[None]
    log_q = -0.5 * (dev + logvar[None] + math.log(2 * math.pi)).sum(-1)
    log_agg = torch.logsumexp(log_q, dim=1) - math.log(n)  # [N]
    # both terms on the same draws (log q(z_j|x_j) is the diagonal): no sampling noise when the
    # posteriors are all alike, where the estimate must be 0
    return float((log_q.diagonal() - log_agg).mean())
