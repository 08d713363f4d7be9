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

from ._checks import as_float, check_2d, check_choice, check_finite, check_same_shape, mask_like
from .aggregation import aggregate
from .kl import KL_ESTIMATORS, kl_estimate
from .masks import masked_mean

RATIO_LEVELS = ("token", "sequence")


def _broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = as_float(advantages).detach().to(like.dtype)
    if a.dim() == 1 and a.shape[0] == like.shape[0]:
        a = a[:, None].expand_as(like)
    if a.shape != like.shape:
        raise ValueError(f"advantages must be [B] or [B, T] matching logp {tuple(like.shape)}, got {tuple(advantages.shape)}")
    return a


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
        mask: ``[B, T]`` response mask.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; ``eps_high=None`` means ``eps_low``.
        dual_clip: ``c > 1`` caps the loss of negative-advantage tokens at ``-c A``; None disables.
        ratio_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO).
        loss_agg_mode, norm_length: see :mod:`grpo_ref.aggregation`.
        ref_logp: ``[B, T]`` log pi_ref; needed when ``kl_coef > 0`` (constant).
        kl_coef: beta of the KL term in the loss; ``kl_estimator`` in ``{"k1", "k2", "k3"}``.
        entropy: optional ``[B, T]`` per-token entropy, only reported (the bonus is added by ``ppo_loss``/``grpo_loss``).
        max_log_ratio: ``lp - old`` (and the GSPO mean log-ratio) is clamped to ``+-max_log_ratio`` before ``exp``
            (verl uses 20), so a stale or corrupt log-prob gives a finite, clipped loss rather than inf/NaN.

    Returns:
        ``(loss, metrics)``: ``loss`` a float32/64 scalar; ``metrics`` detached scalars: ``pg_loss``,
        ``clip_frac_low`` (share of tokens where ``r < 1 - eps_low`` and ``A < 0``, i.e. the clip is active below),
        ``clip_frac_high`` (``r > 1 + eps_high`` and ``A > 0``), ``dual_clip_frac``, ``approx_kl`` (k3 estimate of
        ``KL(pi_old || pi_theta)`` on the old samples), ``ratio_mean/min/max``, ``kl_ref`` (masked mean of the KL
        estimate, when ``ref_logp`` is given), ``entropy`` (when given). All means are over masked-in tokens.
    """
    check_2d("logp", logp)
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("KL estimator", kl_estimator, KL_ESTIMATORS)
    eps_high = eps_low if eps_high is None else eps_high
    if not (0 < eps_low < 1) or eps_high <= 0:
        raise ValueError(f"need 0 < eps_low < 1 and eps_high > 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (verl default 3), got {dual_clip}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")

    lp = as_float(logp)
    m = mask_like(mask, lp)
    old = as_float(old_logp).detach().to(lp.dtype)
    adv = _broadcast_advantages(advantages, lp)
    check_finite("advantages", adv[m > 0])
    on = m > 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    # log-ratio only where the mask is on: padding may hold garbage log-probs (even inf)
    raw = torch.where(on, lp - old, zero)
    log_ratio = raw.clamp(-max_log_ratio, max_log_ratio)
    token_log_ratio = log_ratio.detach()  # for approx_kl, whatever the ratio level
    if ratio_level == "sequence":
        seq_raw = log_ratio.sum(-1) / m.sum(-1).clamp_min(1.0)
        seq_log_ratio = seq_raw.clamp(-max_log_ratio, max_log_ratio)
        # GSPO-token form: value sg[log s_i], gradient d lp_t / L_i-weighted by the aggregation; no gradient
        # where a clamp is active (as for the clamped sequence objective itself)
        free = on & (raw.abs() < max_log_ratio) & (seq_raw.abs() < max_log_ratio)[:, None]
        log_ratio = seq_log_ratio.detach()[:, None] + torch.where(free, lp - lp.detach(), zero)
        log_ratio = torch.where(on, log_ratio, zero)
    ratio = torch.exp(log_ratio)

    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(lo, hi)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = torch.zeros_like(on)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (pg > cap)
        pg = torch.where(dual_active, cap, pg)

    loss_mat = pg
    metrics: Dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        check_same_shape(logp=logp, ref_logp=ref_logp)
        ref = torch.where(on, as_float(ref_logp).detach().to(lp.dtype), lp.detach())
        kl = kl_estimate(torch.where(on, lp, lp.detach()), ref, kl_estimator, max_log_ratio)
        metrics["kl_ref"] = masked_mean(kl, m).detach()
        if kl_coef > 0:
            loss_mat = loss_mat + kl_coef * kl

    loss = aggregate(loss_mat, m, loss_agg_mode, norm_length)
    with torch.no_grad():
        r = ratio.detach()
        metrics["pg_loss"] = aggregate(pg.detach(), m, loss_agg_mode, norm_length)
        metrics["clip_frac_low"] = masked_mean(((r < lo) & (adv < 0)).to(lp.dtype), m)
        metrics["clip_frac_high"] = masked_mean(((r > hi) & (adv > 0)).to(lp.dtype), m)
        metrics["dual_clip_frac"] = masked_mean(dual_active.to(lp.dtype), m)
        metrics["approx_kl"] = masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, m)
        metrics["ratio_mean"] = masked_mean(r, m)
        one = torch.ones((), dtype=lp.dtype, device=lp.device)
        metrics["ratio_min"] = torch.where(on, r, torch.inf).amin() if on.any() else one
        metrics["ratio_max"] = torch.where(on, r, -torch.inf).amax() if on.any() else one
        if entropy is not None:
            check_same_shape(logp=logp, entropy=entropy)
            metrics["entropy"] = masked_mean(as_float(entropy).detach(), m)
    return loss, metrics
