"""The policy loss shared by PPO, GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, CISPO and SAPO.

Per token, with ``r = pi_theta / pi_old`` and ``pg_objective`` choosing the policy-gradient term:

* ``"clip"`` (PPO, Schulman et al. 2017; GRPO, DeepSeekMath eq. 3):
  ``l_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``;
* ``"cispo"`` (MiniMax-M1, arXiv 2506.13585, eq. 4-5): ``l_t = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi_theta``,
  a REINFORCE term whose importance weight is clipped and detached, so no token loses its gradient (TRL 1.16.0
  ``GRPOTrainer._compute_loss`` ``loss_type="cispo"`` clamps only from above, ``clamp(r, max=epsilon_high)``:
  that is ``eps_low = 1``, ``eps_high = epsilon_high - 1``; verl 0.9.1 ``compute_policy_loss_cispo`` clamps both
  sides, ``clip_ratio_low/high``);
* ``"sapo"`` (Soft Adaptive Policy Optimization, arXiv 2511.20347): ``l_t = -(4 / tau) sigmoid(tau (r - 1)) A``
  with ``tau = sapo_tau_pos`` where ``A > 0``, else ``sapo_tau_neg`` (TRL 1.16.0 ``loss_type="sapo"``; verl 0.9.1
  ``compute_policy_loss_sapo``). A soft gate instead of a clip: at ``r = 1`` its gradient is exactly ``-A d log pi``
  (``(4 / tau) * tau * sigmoid'(0) = 1``), and it decays smoothly as ``r`` moves away from 1.

plus ``beta * KL_t`` (optionally ``beta * r * KL_t``, see ``kl_ratio_weighted``).

* ``eps_high > eps_low`` is DAPO's clip-higher.
* dual-clip (Ye et al. 2020, arXiv 1912.09729; verl ``clip_ratio_c``, OpenRLHF ``dual_clip``): for ``A < 0`` also ``l_t <= -c A``.
* ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025): ``s_i = exp((1/L_i) sum_t (lp - old))`` replaces ``r``;
  it is applied in GSPO-token form ``sg[s_i] * pi / sg[pi]``, whose value is ``s_i`` and whose gradient under
  ``seq-mean-token-mean`` is exactly the gradient of GSPO's sequence objective (0 where a clamp is active).
* the KL term ``beta * k_n(lp, ref)`` is GRPO's "KL in the loss" (k3 by default, DeepSeekMath eq. 4);
  ``kl_ratio_weighted=True`` multiplies it by the importance ratio ``r`` with gradient through ``r``: TRL 1.16.0's
  ``use_bias_correction_kl`` (``_compute_loss`` multiplies the k3 term by ``coef_1``, the unclipped ratio), which
  makes the KL an estimate under the current policy for samples drawn from the old one. Under
  ``ratio_level="sequence"`` the weight is GSPO's sequence ratio ``s_i`` itself (TRL's ``coef_1`` is then ``[B, 1]``),
  whose gradient spreads over the sequence's tokens (``d s_i / d lp_t = s_i / L_i``).

The per-token losses are then reduced by :func:`grpo_ref.aggregation.aggregate`.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ._checks import (
    as_float,
    check_bool,
    check_choice,
    check_finite,
    check_float_tensor,
    check_optional_real,
    check_real,
    check_same_shape,
    check_scalar_result,
    clamp,
)
from .aggregation import _aggregate, _check_aggregate_args, check_num_tokens
from .kl import _ESTIMATORS, KL_ESTIMATORS
from .masks import _masked_mean

RATIO_LEVELS = ("token", "sequence")
PG_OBJECTIVES = ("clip", "cispo", "sapo")


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
    pg_objective: str = "clip",
    eps_low: float = 0.2,
    eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    ratio_level: str = "token",
    loss_agg_mode: str = "seq-mean-token-mean",
    norm_length: Optional[float] = None,
    num_tokens: Optional[float] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_weighted: bool = False,
    entropy: Optional[torch.Tensor] = None,
    max_log_ratio: float = 20.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Policy loss (to minimise) and its metrics.

    Args:
        logp: ``[B, T]`` log pi_theta of the sampled tokens (differentiable).
        old_logp: ``[B, T]`` log pi_old at sampling time (treated as constant).
        advantages: ``[B]`` (one per sequence, GRPO outcome supervision) or ``[B, T]`` (treated as constant).
        mask: ``[B, T]`` response mask of 0/1 (bool, int or float).
        pg_objective: ``"clip"``, ``"cispo"`` or ``"sapo"`` (module docstring).
        eps_low: the clip range's lower side, ``r >= 1 - eps_low``, of ``"clip"`` and ``"cispo"``;
            ``0 < eps_low <= 1`` (1 = no lower clip).
        eps_high: its upper side, ``r <= 1 + eps_high``; finite ``> 0``, or None for ``eps_low`` (a symmetric
            clip; DAPO's clip-higher sets it above ``eps_low``).
        dual_clip: finite ``c > 1`` caps the loss of negative-advantage tokens at ``-c A``; None disables.
            ``"clip"`` only.
        sapo_tau_pos, sapo_tau_neg: SAPO's gate temperatures for ``A > 0`` / ``A <= 0``, finite ``> 0``
            (TRL's and verl's defaults 1.0 and 1.05); used by ``"sapo"`` only.
        ratio_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO).
        loss_agg_mode, norm_length: see :mod:`grpo_ref.aggregation`.
        num_tokens: None, or the global token normaliser of ``loss_agg_mode="token-mean"`` (finite ``> 0``):
            the token sum is divided by it instead of this batch's token count (TRL ``dapo``/``cispo``).
        ref_logp: ``[B, T]`` log pi_ref; needed when ``kl_coef > 0`` (constant).
        kl_coef: finite ``beta >= 0`` of the KL term in the loss.
        kl_estimator: the KL term's estimator, one of :data:`grpo_ref.kl.KL_ESTIMATORS`.
        kl_ratio_weighted: multiply the KL term by the importance ratio (TRL ``use_bias_correction_kl``).
        entropy: optional ``[B, T]`` per-token entropy, only reported (the bonus is added by ``ppo_loss``/``grpo_loss``).
        max_log_ratio: finite ``> 0``; ``lp - old`` (and the GSPO mean log-ratio) is clamped to ``+-max_log_ratio``
            before ``exp`` (verl uses 20), so a stale log-prob gives a finite, clipped loss rather than inf/NaN.

    Refused with a ``ValueError`` naming the argument: tensors of the wrong shape, complex or bool log-probs, a
    mask with values other than 0/1, NaN/inf in ``logp``, ``old_logp``, ``advantages``, ``ref_logp`` or
    ``entropy`` at masked-in positions, every hyperparameter outside the ranges above (NaN and inf included),
    ``dual_clip`` with another objective than ``"clip"``, ``num_tokens`` under another mode than ``"token-mean"``.
    Masked-out (padding) positions may hold anything, NaN and inf included: they reach neither the loss nor its
    gradient. ``B = 0`` or ``T = 0`` (no token) gives a loss of 0. A loss that overflows from finite but extreme
    inputs (``kl_coef = 1e308``, advantages of ``1e38``) is refused rather than returned as inf.

    Returns:
        ``(loss, metrics)``, where ``loss`` is a float32/64 scalar and ``metrics`` a dict of detached scalars,
        namely ``pg_loss``, ``clip_frac_low`` / ``clip_frac_high``: under ``"clip"`` the share of tokens where the
        clip is active below (``r < 1 - eps_low`` and ``A < 0``) / above (``r > 1 + eps_high`` and ``A > 0``); under ``"cispo"``
        the share where the detached weight was clamped below / above (whatever the sign of ``A``; their sum is
        verl's ``pg_clipfrac``); 0 under ``"sapo"`` (no clip). ``dual_clip_frac``, ``approx_kl`` (k3 estimate of
        ``KL(pi_old || pi_theta)`` on the old samples), ``ratio_mean/min/max``, ``kl_ref`` (masked mean of the KL
        estimate, unweighted, when ``ref_logp`` is given), ``entropy`` (when given). All means are over masked-in
        tokens.
    """
    check_choice("pg_objective", pg_objective, PG_OBJECTIVES, what="policy-gradient objective")
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS, what="KL estimator")
    eps_low = check_real("eps_low", eps_low, lo=0.0, hi=1.0, lo_open=True)
    eps_high = eps_low if eps_high is None else check_real("eps_high", eps_high, lo=0.0, lo_open=True)
    dual_clip = check_optional_real("dual_clip", dual_clip, lo=1.0, lo_open=True)
    if dual_clip is not None and pg_objective != "clip":
        raise ValueError(f"dual_clip={dual_clip} only applies to pg_objective='clip', got pg_objective={pg_objective!r}")
    taus = (check_real("sapo_tau_pos", sapo_tau_pos, lo=0.0, lo_open=True),
            check_real("sapo_tau_neg", sapo_tau_neg, lo=0.0, lo_open=True))
    kl_coef = check_real("kl_coef", kl_coef, lo=0.0)
    check_bool("kl_ratio_weighted", kl_ratio_weighted)
    max_log_ratio = check_real("max_log_ratio", max_log_ratio, lo=0.0, lo_open=True)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    check_float_tensor("logp", logp)
    # logp 2-D and the mask's shape: _check_aggregate_args; old_logp's shape: _masked_input
    lp, m, norm = _check_aggregate_args("logp", logp, mask, loss_agg_mode, norm_length)
    num_tokens = check_num_tokens(num_tokens, loss_agg_mode)
    old = _masked_input("old_logp", old_logp, lp, m)
    adv = _broadcast_advantages(advantages, lp)
    if advantages.dim() == 1:  # [B]: finite for every sequence with a token
        check_finite("advantages", advantages, where=m.amax(-1) if m.shape[-1] else torch.zeros_like(advantages))
    else:
        check_finite("advantages", adv, where=m)
    ref = None if ref_logp is None else _masked_input("ref_logp", ref_logp, lp, m)
    ent = None if entropy is None else _masked_input("entropy", entropy, lp, m)
    opts = _Options(pg_objective, eps_low, eps_high, dual_clip, taus, ratio_level, loss_agg_mode, norm, num_tokens,
                    kl_coef, kl_estimator, kl_ratio_weighted, max_log_ratio)
    loss, metrics = _policy_loss(lp, old, adv, m, ref, ent, opts)
    if not bool(torch.isfinite(loss.detach())):  # one scalar; the message is only built on failure
        check_scalar_result("the policy loss", loss.detach(), f"finite but extreme inputs: kl_coef={kl_coef}, dual_clip={dual_clip}, "
                            f"max |advantages| = {float(adv.abs().amax())}, max_log_ratio={max_log_ratio}")
    return loss, metrics


class _Options(NamedTuple):
    """:func:`policy_loss`'s validated hyperparameters."""

    pg_objective: str
    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    taus: Tuple[float, float]  # (sapo_tau_pos, sapo_tau_neg)
    ratio_level: str
    loss_agg_mode: str
    norm: Optional[float]
    num_tokens: Optional[float]
    kl_coef: float
    kl_estimator: str
    kl_ratio_weighted: bool
    max_log_ratio: float


def _ratios(lp, old, m, ratio_level, max_log_ratio):
    """``(ratio, kl_weight, token_log_ratio)``, all ``[B, T]``: the ratio the objective uses (token, or GSPO-token
    form under ``"sequence"``), the ratio that weights the KL under ``kl_ratio_weighted`` (the same at token level,
    the plain sequence ratio ``s_i`` broadcast under ``"sequence"``), and the detached token log-ratio."""
    on = m > 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    # log-ratio only where the mask is on: padding may hold garbage log-probs (even inf)
    raw = torch.where(on, lp - old, zero)
    log_ratio = clamp(raw, -max_log_ratio, max_log_ratio)
    token_log_ratio = log_ratio.detach()
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
        return ratio, ratio, token_log_ratio
    seq_raw = log_ratio.sum(-1) / m.sum(-1).clamp_min(1.0)
    seq_log_ratio = clamp(seq_raw, -max_log_ratio, max_log_ratio)
    # GSPO-token form: value sg[log s_i], gradient d lp_t / L_i-weighted by the aggregation; no gradient
    # where a clamp is active (as for the clamped sequence objective itself): strictly beyond the bound, since
    # torch's clamp passes the gradient at the bound itself (as at ratio_level="token")
    free = on & (raw.abs() <= max_log_ratio) & (seq_raw.abs() <= max_log_ratio)[:, None]
    gspo = seq_log_ratio.detach()[:, None] + torch.where(free, lp - lp.detach(), zero)
    ratio = torch.exp(torch.where(on, gspo, zero))
    return ratio, torch.exp(seq_log_ratio)[:, None].expand_as(lp), token_log_ratio


def _clip_objective(ratio, adv, lo, hi, dual_clip):
    """PPO/GRPO: ``max(-A r, -A clip(r, lo, hi))``, optionally capped at ``-c A`` for ``A < 0`` (dual clip).
    Returns ``(pg, clipped_low, clipped_high, dual_active)``."""
    pg = torch.maximum(-adv * ratio, -adv * clamp(ratio, lo, hi))
    dual_active = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (pg > cap)
        pg = torch.where(dual_active, cap, pg)
    r = ratio.detach()
    return pg, (r < lo) & (adv < 0), (r > hi) & (adv > 0), dual_active


def _cispo_objective(ratio, lp, adv, lo, hi):
    """CISPO: ``-sg(clip(r, lo, hi)) A lp``. Returns ``(pg, clamped_low, clamped_high)``."""
    r = ratio.detach()
    return -clamp(r, lo, hi) * adv * lp, r < lo, r > hi


def _sapo_objective(ratio: torch.Tensor, adv: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    """SAPO: ``-(4 / tau) sigmoid(tau (r - 1)) A``, ``tau = tau_pos`` where ``A > 0`` else ``tau_neg``."""
    # the temperatures as tensors of the ratio's dtype: torch.where of two Python floats would round them to float32
    pos, neg = (torch.tensor(t, dtype=ratio.dtype, device=ratio.device) for t in (tau_pos, tau_neg))
    tau = torch.where(adv > 0, pos, neg)
    return -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * adv


def _policy_loss(lp, old, adv, m, ref, entropy, o: _Options) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """:func:`policy_loss` without the checks: float ``[B, T]`` tensors (``adv`` broadcast), ``m`` the float mask."""
    on = m > 0
    ratio, kl_weight, token_log_ratio = _ratios(lp, old, m, o.ratio_level, o.max_log_ratio)
    pad = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp_on = torch.where(on, lp, pad)  # padding (which may hold anything) becomes a constant 0
    lo, hi = 1.0 - o.eps_low, 1.0 + o.eps_high
    none = torch.zeros_like(on)
    dual_active = none
    if o.pg_objective == "clip":
        pg, clip_low, clip_high, dual_active = _clip_objective(ratio, adv, lo, hi, o.dual_clip)
    elif o.pg_objective == "cispo":
        pg, clip_low, clip_high = _cispo_objective(ratio, lp_on, adv, lo, hi)
    else:
        pg, clip_low, clip_high = _sapo_objective(ratio, adv, *o.taus), none, none

    loss_mat = pg
    metrics: Dict[str, torch.Tensor] = {}
    if ref is not None:
        kl = _ESTIMATORS[o.kl_estimator](lp_on, torch.where(on, ref, pad), o.max_log_ratio)
        metrics["kl_ref"] = _masked_mean(kl, m).detach()
        if o.kl_coef > 0:
            loss_mat = loss_mat + o.kl_coef * (kl * kl_weight if o.kl_ratio_weighted else kl)

    loss = _aggregate(loss_mat, m, o.loss_agg_mode, o.norm, o.num_tokens)
    with torch.no_grad():
        r = ratio.detach()
        metrics["pg_loss"] = _aggregate(pg.detach(), m, o.loss_agg_mode, o.norm, o.num_tokens)
        metrics["clip_frac_low"] = _masked_mean(clip_low.to(lp.dtype), m)
        metrics["clip_frac_high"] = _masked_mean(clip_high.to(lp.dtype), m)
        metrics["dual_clip_frac"] = _masked_mean(dual_active.to(lp.dtype), m)
        metrics["approx_kl"] = _masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, m)
        metrics["ratio_mean"] = _masked_mean(r, m)
        one = torch.ones((), dtype=lp.dtype, device=lp.device)
        metrics["ratio_min"] = torch.where(on, r, torch.inf).amin() if on.any() else one
        metrics["ratio_max"] = torch.where(on, r, -torch.inf).amax() if on.any() else one
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, m)
    return loss, metrics
