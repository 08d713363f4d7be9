"""The clipped surrogate policy loss shared by PPO, GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++.

Per token (PPO, Schulman et al. 2017; GRPO, DeepSeekMath eq. 3), with ``r = pi_theta / pi_old``:

    l_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)  [+ beta * KL_t]

* ``eps_high > eps_low`` is DAPO's clip-higher.
* dual-clip (Ye et al. 2020; verl ``clip_ratio_c``, OpenRLHF ``dual_clip``): for ``A < 0`` also ``l_t <= -c A``.
* ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025): ``s_i = exp((1/L_i) sum_t (lp - old))`` replaces ``r``;
  it is applied in GSPO-token form ``sg[s_i] * pi / sg[pi]``, whose value is ``s_i`` and whose gradient under
  ``seq-mean-token-mean`` is exactly the gradient of GSPO's sequence objective (0 where a clamp is active).
* the KL term ``beta * k_n(lp, ref)`` is GRPO's "KL in the loss" (k3 by default, DeepSeekMath eq. 4).

The per-token losses are then reduced by :func:`grpo_ref.aggregation.aggregate`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import as_float, clamp, check_choice, check_scalar_result, check_finite, check_float_tensor, check_optional_real, check_real, check_same_shape, check_2d
from .aggregation import _aggregate, _check_aggregate_args
from .kl import _ESTIMATORS, KL_ESTIMATORS
from .masks import _masked_mean

RATIO_LEVELS = ("token", "sequence")


def _broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    check_float_tensor("advantages", advantages)
    a = as_float(advantages).detach().to(like.dtype)
    if a.dim() == 1 and a.shape[0] == like.shape[0]:
        a = a[:, None].expand_as(like)
    if a.shape != like.shape:
        raise ValueError(f"advantages must be [B] or [B, T] matching logp {tuple(like.shape)}, got {tuple(advantages.shape)}")
    return a


def _masked_input(name: str, x, like: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """A ``[B, T]`` constant input (``old_logp``, ``ref_logp``, ``entropy``): real, shaped like ``logp``, finite
    where the mask is 1; returned detached in ``logp``'s float dtype."""
    check_float_tensor(name, x)
    check_same_shape(logp=like, **{name: x})
    check_finite(name, x, where=m)
    return as_float(x).detach().to(like.dtype)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    ratio_level: str = "token",
    loss_agg_mode: str = "seq-mean-token-mean",
    norm_length: Optional[float] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Optional[torch.Tensor] = None,
    max_log_ratio: float = 20.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped surrogate loss (to minimise) and its metrics.

    Args:
        logp: ``[B, T]`` log pi_theta of the sampled tokens (differentiable).
        old_logp: ``[B, T]`` log pi_old at sampling time (treated as constant).
        advantages: ``[B]`` (one per sequence, GRPO outcome supervision) or ``[B, T]`` (treated as constant).
        mask: ``[B, T]`` response mask of 0/1 (bool, int or float).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``, ``0 < eps_low < 1``, finite ``eps_high > 0``;
            ``eps_high=None`` means ``eps_low``.
        dual_clip: finite ``c > 1`` caps the loss of negative-advantage tokens at ``-c A``; None disables.
        ratio_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO).
        loss_agg_mode, norm_length: see :mod:`grpo_ref.aggregation`.
        ref_logp: ``[B, T]`` log pi_ref; needed when ``kl_coef > 0`` (constant).
        kl_coef: finite ``beta >= 0`` of the KL term in the loss; ``kl_estimator`` in ``{"k1", "k2", "k3"}``.
        entropy: optional ``[B, T]`` per-token entropy, only reported (the bonus is added by ``ppo_loss``/``grpo_loss``).
        max_log_ratio: finite ``> 0``; ``lp - old`` (and the GSPO mean log-ratio) is clamped to ``+-max_log_ratio``
            before ``exp`` (verl uses 20), so a stale log-prob gives a finite, clipped loss rather than inf/NaN.

    Refused with a ``ValueError`` naming the argument: tensors of the wrong shape, complex or bool log-probs, a
    mask with values other than 0/1, NaN/inf in ``logp``, ``old_logp``, ``advantages``, ``ref_logp`` or
    ``entropy`` at masked-in positions, and every hyperparameter outside the ranges above (NaN and inf included).
    Masked-out (padding) positions may hold anything, NaN and inf included: they reach neither the loss nor its
    gradient. ``B = 0`` or ``T = 0`` (no token) gives a loss of 0. A loss that overflows from finite but extreme
    inputs (``kl_coef = 1e308``, advantages of ``1e38``) is refused rather than returned as inf.

    Returns:
        ``(loss, metrics)``: ``loss`` a float32/64 scalar; ``metrics`` detached scalars: ``pg_loss``,
        ``clip_frac_low`` (share of tokens where ``r < 1 - eps_low`` and ``A < 0``, i.e. the clip is active below),
        ``clip_frac_high`` (``r > 1 + eps_high`` and ``A > 0``), ``dual_clip_frac``, ``approx_kl`` (k3 estimate of
        ``KL(pi_old || pi_theta)`` on the old samples), ``ratio_mean/min/max``, ``kl_ref`` (masked mean of the KL
        estimate, when ``ref_logp`` is given), ``entropy`` (when given). All means are over masked-in tokens.
    """
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS, what="KL estimator")
    eps_low = check_real("eps_low", eps_low, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    eps_high = eps_low if eps_high is None else check_real("eps_high", eps_high, lo=0.0, lo_open=True)
    dual_clip = check_optional_real("dual_clip", dual_clip, lo=1.0, lo_open=True)
    kl_coef = check_real("kl_coef", kl_coef, lo=0.0)
    max_log_ratio = check_real("max_log_ratio", max_log_ratio, lo=0.0, lo_open=True)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    check_float_tensor("logp", logp)
    check_2d("logp", logp)
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    lp, m, norm = _check_aggregate_args("logp", logp, mask, loss_agg_mode, norm_length)
    old = _masked_input("old_logp", old_logp, lp, m)
    adv = _broadcast_advantages(advantages, lp)
    if advantages.dim() == 1:  # [B]: finite for every sequence with a token
        check_finite("advantages", advantages, where=m.amax(-1) if m.shape[-1] else torch.zeros_like(advantages))
    else:
        check_finite("advantages", adv, where=m)
    ref = None if ref_logp is None else _masked_input("ref_logp", ref_logp, lp, m)
    ent = None if entropy is None else _masked_input("entropy", entropy, lp, m)
    loss, metrics = _policy_loss(lp, old, adv, m, eps_low, eps_high, dual_clip, ratio_level, loss_agg_mode, norm, ref,
                                 kl_coef, kl_estimator, ent, max_log_ratio)
    if not bool(torch.isfinite(loss.detach())):  # one scalar; the message is only built on failure
        check_scalar_result("the policy loss", loss.detach(), f"finite but extreme inputs: kl_coef={kl_coef}, dual_clip={dual_clip}, "
                            f"max |advantages| = {float(adv.abs().amax())}, max_log_ratio={max_log_ratio}")
    return loss, metrics


def _policy_loss(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    m: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: Optional[float],
    ratio_level: str,
    loss_agg_mode: str,
    norm: Optional[float],
    ref: Optional[torch.Tensor],
    kl_coef: float,
    kl_estimator: str,
    entropy: Optional[torch.Tensor],
    max_log_ratio: float,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """:func:`policy_loss` without the checks: float ``[B, T]`` tensors (``adv`` broadcast), ``m`` the float mask."""
    on = m > 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    # log-ratio only where the mask is on: padding may hold garbage log-probs (even inf)
    raw = torch.where(on, lp - old, zero)
    log_ratio = clamp(raw, -max_log_ratio, max_log_ratio)
    token_log_ratio = log_ratio.detach()  # for approx_kl, whatever the ratio level
    if ratio_level == "sequence":
        seq_raw = log_ratio.sum(-1) / m.sum(-1).clamp_min(1.0)
        seq_log_ratio = clamp(seq_raw, -max_log_ratio, max_log_ratio)
        # GSPO-token form: value sg[log s_i], gradient d lp_t / L_i-weighted by the aggregation; no gradient
        # where a clamp is active (as for the clamped sequence objective itself)
        free = on & (raw.abs() < max_log_ratio) & (seq_raw.abs() < max_log_ratio)[:, None]
        log_ratio = seq_log_ratio.detach()[:, None] + torch.where(free, lp - lp.detach(), zero)
        log_ratio = torch.where(on, log_ratio, zero)
    ratio = torch.exp(log_ratio)

    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * clamp(ratio, lo, hi)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = torch.zeros_like(on)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (pg > cap)
        pg = torch.where(dual_active, cap, pg)

    loss_mat = pg
    metrics: Dict[str, torch.Tensor] = {}
    if ref is not None:
        ref = torch.where(on, ref, lp.detach())
        kl = _ESTIMATORS[kl_estimator](torch.where(on, lp, lp.detach()), ref, max_log_ratio)
        metrics["kl_ref"] = _masked_mean(kl, m).detach()
        if kl_coef > 0:
            loss_mat = loss_mat + kl_coef * kl

    loss = _aggregate(loss_mat, m, loss_agg_mode, norm)
    with torch.no_grad():
        r = ratio.detach()
        metrics["pg_loss"] = _aggregate(pg.detach(), m, loss_agg_mode, norm)
        metrics["clip_frac_low"] = _masked_mean(((r < lo) & (adv < 0)).to(lp.dtype), m)
        metrics["clip_frac_high"] = _masked_mean(((r > hi) & (adv > 0)).to(lp.dtype), m)
        metrics["dual_clip_frac"] = _masked_mean(dual_active.to(lp.dtype), m)
        metrics["approx_kl"] = _masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, m)
        metrics["ratio_mean"] = _masked_mean(r, m)
        one = torch.ones((), dtype=lp.dtype, device=lp.device)
        metrics["ratio_min"] = torch.where(on, r, torch.inf).amin() if on.any() else one
        metrics["ratio_max"] = torch.where(on, r, -torch.inf).amax() if on.any() else one
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, m)
    return loss, metrics
