"""PPO-only pieces: the clipped value loss, the entropy bonus, and KL-in-reward shaping (PPO-RLHF)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import as_float, check_2d, check_finite, check_same_shape, mask_like
from .aggregation import aggregate
from .kl import kl_estimate
from .masks import masked_mean


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: Optional[float] = 0.2,
    loss_agg_mode: str = "token-mean",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))``.

    As in PPO2 / PPO-RLHF (Huang et al. 2024) and verl (``cliprange_value``, default 0.5; TRL uses 0.2).
    ``clip_range=None`` gives the unclipped ``0.5 * (V - R)^2``.

    Shapes: all ``[B, T]``; ``old_values`` and ``returns`` are constants. Returns ``(loss, {"vf_clip_frac", "value_mean"})``.
    """
    check_2d("values", values)
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    v = as_float(values)
    m = mask_like(mask, v)
    on = m > 0
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    check_finite("returns", returns[on])
    check_finite("old_values", old_values[on])
    v = torch.where(on, v, zero)  # padding may hold anything; it must reach neither value nor gradient
    old = torch.where(on, as_float(old_values).detach().to(v.dtype), zero)
    ret = torch.where(on, as_float(returns).detach().to(v.dtype), zero)
    err = (v - ret) ** 2
    if clip_range is None:
        per_token, clipped_frac = err, torch.zeros_like(err)
    else:
        if clip_range <= 0:
            raise ValueError(f"value clip_range must be > 0 or None, got {clip_range}")
        v_clip = old + (v - old).clamp(-clip_range, clip_range)
        err_clip = (v_clip - ret) ** 2
        per_token = torch.maximum(err, err_clip)
        clipped_frac = (err_clip > err).to(v.dtype)
    loss = 0.5 * aggregate(per_token, m, loss_agg_mode)
    return loss, {"vf_clip_frac": masked_mean(clipped_frac, m).detach(), "value_mean": masked_mean(v.detach(), m)}


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """Aggregated entropy ``agg(H_t)`` (``[B, T]`` -> scalar); the total loss subtracts ``ent_coef`` times it."""
    return aggregate(entropy, mask, loss_agg_mode)


def kl_in_reward(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards of PPO-RLHF (Ouyang et al. 2022; Huang et al. 2024): ``r_t = -beta * k(t)`` on every response
    token, plus the sequence ``score`` on the last response token.

    With ``k1 = old - ref`` (the default, log-probs of the sampling policy) the return of the sequence is
    ``score - beta * log(pi_old(y) / pi_ref(y))``, whose policy gradient is that of the reverse sequence KL
    (Liu et al. 2025, arXiv 2510.01555). verl: ``use_kl_in_reward=True``; REINFORCE++ uses the same shaping.

    Shapes: ``scores: [B]``, ``logp, ref_logp, mask: [B, T]`` -> ``[B, T]`` (0 where masked out; no gradient).
    An empty response (mask all 0) has no token to carry its score: its row is all zero.
    """
    check_2d("logp", logp)
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must be [B] = [{logp.shape[0]}], got shape {tuple(scores.shape)}")
    check_finite("scores", scores)
    scores = scores.detach()
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    lp = as_float(logp).detach()
    m = mask_like(mask, lp)
    on = m > 0
    kl = kl_estimate(torch.where(on, lp, 0.0), torch.where(on, as_float(ref_logp).detach().to(lp.dtype), 0.0), estimator)
    rewards = -kl_coef * kl * m
    pos = torch.arange(lp.shape[1], device=lp.device)
    last = torch.where(on, pos, -1).amax(-1)  # [B], -1 for an empty response
    has = last >= 0
    rows = torch.arange(lp.shape[0], device=lp.device)[has]
    rewards[rows, last[has]] += as_float(scores).to(lp.dtype)[has]
    return rewards
