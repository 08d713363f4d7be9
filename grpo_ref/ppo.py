"""PPO-only pieces: the clipped value loss, the entropy bonus, and KL-in-reward shaping (PPO-RLHF)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import (
    as_float,
    check_2d,
    check_choice,
    check_finite,
    check_float_tensor,
    check_mask,
    check_optional_real,
    check_real,
    check_same_shape,
    check_tensor,
    clamp,
)
from .aggregation import _aggregate, _check_aggregate_args
from .kl import _ESTIMATORS, KL_ESTIMATORS
from .masks import _masked_mean


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
    ``clip_range=None`` gives the unclipped ``0.5 * (V - R)^2``; otherwise it must be finite and ``> 0``.

    Shapes: all ``[B, T]``; ``old_values`` and ``returns`` are constants. Returns ``(loss, {"vf_clip_frac", "value_mean"})``.
    Refused: unequal shapes, complex/bool tensors, a mask with values other than 0/1, NaN/inf in ``values``,
    ``old_values`` or ``returns`` at masked-in positions (padding may hold anything).
    """
    check_float_tensor("values", values)
    check_2d("values", values)
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clip_range = check_optional_real("clip_range", clip_range, lo=0.0, lo_open=True)
    v, m, norm = _check_aggregate_args("values", values, mask, loss_agg_mode, None)
    consts = []
    for name, x in (("old_values", old_values), ("returns", returns)):
        check_float_tensor(name, x)
        x = as_float(x).detach().to(v.dtype)
        check_finite(name, x, where=m)
        consts.append(x)
    return _value_loss(v, consts[0], consts[1], m, clip_range, loss_agg_mode, norm)


def _value_loss(v, old, ret, m, clip_range, loss_agg_mode, norm):
    """:func:`value_loss` without the checks (float tensors, ``m`` the float mask, ``norm`` resolved)."""
    on = m > 0
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    v = torch.where(on, v, zero)  # padding may hold anything; it must reach neither value nor gradient
    old = torch.where(on, old, zero)
    ret = torch.where(on, ret, zero)
    err = (v - ret) ** 2
    if clip_range is None:
        per_token, clipped_frac = err, torch.zeros_like(err)
    else:
        v_clip = old + clamp(v - old, -clip_range, clip_range)
        err_clip = (v_clip - ret) ** 2
        per_token = torch.maximum(err, err_clip)
        clipped_frac = (err_clip > err).to(v.dtype)
    loss = 0.5 * _aggregate(per_token, m, loss_agg_mode, norm)
    return loss, {"vf_clip_frac": _masked_mean(clipped_frac, m).detach(), "value_mean": _masked_mean(v.detach(), m)}


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str = "token-mean", norm_length: Optional[float] = None
) -> torch.Tensor:
    """Aggregated entropy ``agg(H_t)`` (``[B, T]`` -> scalar); the total loss subtracts ``ent_coef`` times it.

    ``loss_agg_mode`` and ``norm_length`` as in :func:`~grpo_ref.aggregation.aggregate` (the bonus inside
    :func:`~grpo_ref.algorithms.compute_loss` uses ``ent_agg_mode or loss_agg_mode`` and the config's
    ``norm_length``; TRL 1.16.0's ``entropy_coef`` bonus is always ``"token-mean"``, verl 0.9.1's ``entropy_coeff``
    uses its ``loss_agg_mode``). Refused inputs: as :func:`~grpo_ref.aggregation.aggregate`, with ``entropy`` in the
    messages."""
    h, m, norm = _check_aggregate_args("entropy", entropy, mask, loss_agg_mode, norm_length)
    return _aggregate(h, m, loss_agg_mode, norm)


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
    Refused: ``kl_coef`` NaN/inf/negative, an unknown ``estimator``, NaN/inf ``scores``, NaN/inf ``logp`` or
    ``ref_logp`` at masked-in positions (padding may hold anything), a mask with values other than 0/1.
    """
    check_float_tensor("logp", logp)
    check_2d("logp", logp)
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    check_choice("estimator", estimator, KL_ESTIMATORS, what="KL estimator")
    kl_coef = check_real("kl_coef", kl_coef, lo=0.0)
    check_tensor("scores", scores)
    if scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must be [B] = [{logp.shape[0]}], got shape {tuple(scores.shape)}")
    check_finite("scores", scores)
    lp = as_float(logp).detach()
    m = check_mask("mask", mask, "logp", lp)
    check_finite("logp", lp, where=m)
    check_float_tensor("ref_logp", ref_logp)
    ref = as_float(ref_logp).detach().to(lp.dtype)
    check_finite("ref_logp", ref, where=m)
    return _kl_in_reward(as_float(scores).detach().to(lp.dtype), lp, ref, m, kl_coef, estimator)


def _kl_in_reward(scores, lp, ref, m, kl_coef, estimator):
    on = m > 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    kl = _ESTIMATORS[estimator](torch.where(on, lp, zero), torch.where(on, ref, zero), 20.0)
    rewards = -kl_coef * kl * m
    pos = torch.arange(lp.shape[1], device=lp.device)
    last = torch.where(on, pos, -1).amax(-1) if lp.shape[1] else torch.full((lp.shape[0],), -1, device=lp.device)
    has = last >= 0
    rows = torch.arange(lp.shape[0], device=lp.device)[has]
    rewards[rows, last[has]] += scores[has]
    return rewards
