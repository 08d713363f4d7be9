"""Advantage estimators: GRPO (and Dr. GRPO), RLOO, REINFORCE++, GAE, process supervision, DAPO overlong shaping.

Sequence-level estimators take one scalar reward per completion, ``rewards: [B]``, with the ``G`` completions
of one prompt stored contiguously (``B = n_prompts * G``, rows ``g*G .. g*G + G - 1`` form group ``g``), and
return ``[B]``; broadcast to tokens with ``adv[:, None] * mask``. Token-level estimators take ``[B, T]``.
All of them compute in at least float32 and refuse NaN/inf rewards with a ``ValueError``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import (
    as_float,
    check_2d,
    check_choice,
    check_dim,
    check_finite,
    check_float_tensor,
    check_group_size,
    check_int,
    check_mask,
    check_real,
    check_same_shape,
    check_tensor,
)
from .masks import _masked_whiten

ADV_SCALES = ("group", "batch", "none")


def _check_rewards(rewards, group_size, min_size: int = 2, name: str = "rewards") -> torch.Tensor:
    """``rewards: [B]`` real (bool counts as 0/1), finite, and a valid ``group_size``; returns ``[B / G, G]`` float."""
    check_tensor(name, rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(rewards.shape)}")
    check_finite(name, rewards)
    check_group_size(rewards.shape[0], group_size, min_size, batch_name=name)
    return _grouped(as_float(rewards), group_size)


def _grouped(r: torch.Tensor, group_size: int) -> torch.Tensor:
    return r.reshape(r.shape[0] // group_size, group_size)


def _check_token_rewards(token_rewards, mask, gamma) -> tuple:
    """``token_rewards, mask: [B, T]``: real, 0/1 mask, rewards finite where the mask is 1; ``gamma`` in [0, 1]."""
    check_float_tensor("token_rewards", token_rewards)
    check_2d("token_rewards", token_rewards)
    r = as_float(token_rewards)
    m = check_mask("mask", mask, "token_rewards", r)
    check_finite("token_rewards", r, where=m)
    return _zero_out(r, m), m, check_real("gamma", gamma, lo=0.0, hi=1.0)


def _zero_out(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _centred(g: torch.Tensor) -> torch.Tensor:
    """``R - mean(R_group)``, exactly 0 in groups whose rewards are all equal (no rounding residue)."""
    same = g.amax(-1, keepdim=True) == g.amin(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(g), g - g.mean(-1, keepdim=True))


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome-supervision advantage (DeepSeekMath sec. 4.1.2): ``A_i = (R_i - mean(R_group)) / (std + eps)``.

    Args:
        rewards: ``[B]`` finite real rewards (bool counts as 0/1), groups of ``group_size`` contiguous rows.
        group_size: an int ``>= 2`` dividing ``B``.
        scale: ``"group"``: divide by the group's std (DeepSeekMath; TRL ``scale_rewards="group"``; verl ``grpo``);
            ``"batch"``: divide by the std of all rewards of the batch (TRL ``scale_rewards="batch"``);
            ``"none"``: no division (Dr. GRPO; TRL ``"none"``; verl ``norm_adv_by_std_in_grpo=False``).
        eps: added to the std. The paper gives none; TRL uses 1e-4, verl 1e-6 (our default), OpenRLHF 1e-9.
            With ``eps > 0`` the advantage is invariant to reward shift exactly and to positive scale only up to
            ``eps / std``. Must be finite and ``>= 0``.
    Std is the unbiased (Bessel-corrected) one, as ``torch.std`` in TRL and verl. A group whose rewards are all
    equal gets advantage exactly 0 (it carries no learning signal; only a KL term can move the policy there).

    Returns:
        ``[B]`` advantages (empty for ``B = 0``).

    Refused (``ValueError`` naming the argument): NaN/inf or complex rewards, rewards that are not ``[B]``, a
    ``group_size`` that is not an int ``>= 2`` dividing ``B`` (bool included), ``eps`` NaN/inf/negative.
    """
    check_choice("scale", scale, ADV_SCALES, what="advantage scale")
    eps = check_real("eps", eps, lo=0.0)
    g = _check_rewards(rewards, group_size)
    if g.numel() == 0:  # B = 0: no completion
        return g.reshape(-1)
    centred = _centred(g)
    if scale == "group":
        centred = centred / (g.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (g.reshape(-1).std() + eps)  # B >= G >= 2 here
    return torch.nan_to_num(centred.reshape(-1), nan=0.0)  # 0 / (0 + 0) when eps == 0 and a group is flat


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO leave-one-out baseline (Ahmadian et al. 2024): ``A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean)``.

    Args:
        rewards: ``[B]`` finite real rewards, groups of ``group_size`` contiguous rows.
        group_size: an int ``>= 2`` dividing ``B``.

    Returns:
        ``[B]`` advantages (empty for ``B = 0``).

    Refused inputs as :func:`grpo_advantages`.
    """
    g = _check_rewards(rewards, group_size)
    return (_centred(g) * (group_size / (group_size - 1))).reshape(-1)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = sum_{s >= t, m_s = 1} gamma^{(# masked-in steps from t to s)} r_s`` over masked-in positions.

    Masked-out positions are skipped (they neither add reward nor count as a step) and get 0; they may hold
    NaN/inf (padding). Shapes: ``[B, T]`` in, ``[B, T]`` out (``B = 0`` or ``T = 0`` give an empty result).
    Refused: ``gamma`` outside ``[0, 1]`` or NaN, a mask with values other than 0/1, NaN/inf rewards at
    masked-in positions, shapes that are not ``[B, T]`` or differ.
    """
    r, m, gamma = _check_token_rewards(token_rewards, mask, gamma)
    return _discounted_returns(r, m, gamma)


def _discounted_returns(r: torch.Tensor, m: torch.Tensor, gamma: float) -> torch.Tensor:
    out = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t] > 0, r[:, t] + gamma * running, running)
        out[:, t] = running
    return out * m


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, group_size: Optional[int] = None
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): advantages whitened over the whole batch, no critic.

    * ``group_size=None`` (verl ``reinforce_plus_plus``): the discounted return-to-go of the per-token rewards
      (score on the last token, ``-beta * k1`` KL on every token), whitened over all response tokens of the batch.
    * ``group_size=G`` (verl ``reinforce_plus_plus_baseline``): the sequence score ``sum_t r_t`` minus its group
      mean, broadcast to the tokens, then whitened over the batch. (As in verl, an empty response has no token
      to carry its score, so it enters its group's mean with score 0.)

    Whitening uses the unbiased variance and ``eps = 1e-8`` (verl's ``masked_whiten``).

    Shapes: ``token_rewards, mask: [B, T]`` -> ``[B, T]`` (0 on masked-out positions).
    Refused inputs: as :func:`discounted_returns`, and a ``group_size`` that is not None or an int ``>= 2``
    dividing ``B``. (``gamma`` only acts without ``group_size``; it is validated either way.)
    """
    r, m, gamma = _check_token_rewards(token_rewards, mask, gamma)
    if group_size is None:
        returns = _discounted_returns(r, m, gamma)
    else:
        check_group_size(r.shape[0], group_size, 2, batch_name="token_rewards")
        returns = _centred(_grouped(r.sum(-1), group_size)).reshape(-1)[:, None] * m
    return _masked_whiten(returns, m)


def gae_advantages(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015) over the masked-in positions, as PPO-RLHF uses it.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = sum_l (gamma lam)^l delta_{t+l}``, where ``t+1`` is the next
    masked-in position and ``V = 0`` after the last response token (the episode ends there). Masked-out positions
    (prompt, padding) are skipped, so right padding changes nothing. ``returns = A + V`` before any whitening
    (whiten the advantages afterwards with ``masked_whiten`` if wanted; the returns stay unwhitened).

    Shapes: ``token_rewards, values, mask: [B, T]`` -> ``(advantages [B, T], returns [B, T])``, 0 where masked out.
    Values are treated as constants (no gradient flows into the critic through the targets).
    Refused: ``gamma`` or ``lam`` outside ``[0, 1]`` or NaN, unequal shapes, a mask with values other than 0/1,
    NaN/inf in ``token_rewards`` or ``values`` at masked-in positions (padding may hold anything).
    ``B = 0`` or ``T = 0`` give empty results.
    """
    check_float_tensor("values", values)
    check_same_shape(token_rewards=token_rewards, values=values)  # mask: by check_mask in _check_token_rewards
    r, m, gamma = _check_token_rewards(token_rewards, mask, gamma)
    lam = check_real("lam", lam, lo=0.0, hi=1.0)
    v = as_float(values).detach().to(r.dtype)
    check_finite("values", v, where=m)
    return _gae(r, _zero_out(v, m), m, gamma, lam)


def _gae(r: torch.Tensor, v: torch.Tensor, m: torch.Tensor, gamma: float, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    adv = torch.zeros_like(r)
    next_value = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    next_adv = torch.zeros_like(next_value)
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        on = m[:, t] > 0
        next_value = torch.where(on, v[:, t], next_value)
        next_adv = torch.where(on, a, next_adv)
        adv[:, t] = torch.where(on, a, torch.zeros_like(a))
    return adv, (adv + v) * m


def process_advantages(
    step_rewards: torch.Tensor,
    step_ends: torch.Tensor,
    step_mask: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """DeepSeekMath process supervision (sec. 4.1.3): normalise every step reward over all steps of the group,
    ``r~ = (r - mean) / (std + eps)``, then ``A_{i,t} = sum_{j: end(j) >= t} r~_{i,j}``.

    Args:
        step_rewards: ``[B, S]`` reward of step ``j`` of completion ``i``.
        step_ends: ``[B, S]`` integer token index (into ``T``) of the last token of each step.
        step_mask: ``[B, S]`` 1 for real steps, 0 for padding steps.
        mask: ``[B, T]`` response mask; the advantage is 0 outside it.
        group_size: ``G``, an int ``>= 1`` dividing ``B``; rows ``g*G .. g*G+G-1`` share a prompt. Std is unbiased;
            a group whose valid step rewards are all equal (or that has a single step) gets 0.
        eps: added to the std; finite and ``>= 0``.
    Returns:
        ``[B, T]`` token advantages (empty for ``B = 0``; 0 everywhere for ``S = 0``).
    Refused: NaN/inf step rewards of real steps (padding steps may hold anything), masks with values other than
    0/1, float/bool ``step_ends`` or real steps ending outside ``[0, T)``, unequal shapes, a bad ``group_size`` or ``eps``.
    """
    check_float_tensor("step_rewards", step_rewards)
    check_2d("step_rewards", step_rewards)
    check_same_shape(step_rewards=step_rewards, step_ends=step_ends)  # step_mask: by check_mask below
    check_2d("mask", mask)
    if mask.shape[0] != step_rewards.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} rows but step_rewards has {step_rewards.shape[0]}")
    r = as_float(step_rewards)
    sm = check_mask("step_mask", step_mask, "step_rewards", r)
    check_finite("step_rewards", r, where=sm)
    r = _zero_out(r, sm)
    tm = check_mask("mask", mask, "mask", as_float(mask))
    b, s = r.shape
    check_group_size(b, group_size, 1, batch_name="step_rewards")
    eps = check_real("eps", eps, lo=0.0)
    if step_ends.dtype.is_floating_point or step_ends.dtype == torch.bool or step_ends.is_complex():
        raise ValueError(f"step_ends must be integer token indices in [0, {mask.shape[1]}), got dtype {step_ends.dtype}")
    outside = ((step_ends < 0) | (step_ends >= mask.shape[1])) & (sm > 0)
    if bool(outside.any()):
        raise ValueError(f"step_ends must be integer token indices in [0, {mask.shape[1]}), got {step_ends[outside][:3].tolist()} at real steps")
    if s == 0:  # no step: no reward to spread
        return torch.zeros(b, mask.shape[1], dtype=r.dtype, device=r.device)
    n_groups = b // group_size
    rg, mg = r.reshape(n_groups, group_size * s), sm.reshape(n_groups, group_size * s)
    n = mg.sum(-1, keepdim=True)
    mean = (rg * mg).sum(-1, keepdim=True) / n.clamp_min(1)
    var = (((rg - mean) * mg) ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    big, small = torch.where(mg > 0, rg, -torch.inf).amax(-1, True), torch.where(mg > 0, rg, torch.inf).amin(-1, True)
    flat = (big == small) | (n <= 1)
    norm = torch.where(flat, torch.zeros_like(rg), (rg - mean) / (var.sqrt() + eps)) * mg
    norm = norm.reshape(b, s)
    t = torch.arange(mask.shape[1], device=mask.device)
    covers = (step_ends[:, :, None] >= t[None, None, :]).to(r.dtype)  # [B, S, T]
    return torch.einsum("bs,bst->bt", norm, covers) * tm.to(r.dtype)


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), added to the task reward.

    ``0`` if ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` (from 0 down to -1) if
    ``L_max - L_cache < |y| <= L_max``; ``-1`` if ``|y| > L_max``.

    Args:
        lengths: ``[B]`` response lengths ``|y|`` (finite, ``>= 0``; a tensor or a list).
        max_length: ``L_max``, an int ``> 0``.
        cache_length: ``L_cache``, an int with ``0 < cache_length <= max_length``.

    Returns:
        ``[B]`` float32 penalties in ``[-1, 0]`` (empty for ``B = 0``).
    """
    max_length = check_int("max_length", max_length, lo=1)
    cache_length = check_int("cache_length", cache_length)
    if not (0 < cache_length <= max_length):
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max_length={max_length}")
    lengths = check_float_tensor("lengths", torch.as_tensor(lengths))
    check_dim("lengths", lengths, 1, "[B]")
    check_finite("lengths", lengths)
    if bool((lengths < 0).any()):
        raise ValueError(f"lengths must be >= 0, got {lengths[lengths < 0][:3].tolist()}")
    lengths = as_float(lengths)
    soft = max_length - cache_length
    pen = (soft - lengths) / cache_length
    return torch.where(lengths <= soft, torch.zeros_like(pen), torch.where(lengths <= max_length, pen, -torch.ones_like(pen)))


# -- unscorable completions (NaN rewards) and several reward functions ------------------------------------------------
#
# TRL 1.16.0 (trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions) marks a completion for which
# every reward function returned None as unscorable (NaN), takes the group statistics over the scorable members only
# (torch.nanmean and trl/trainer/utils.py nanstd, the Bessel-corrected std of the non-NaN entries), and finally sets
# the advantage of every unscorable completion to 0 (nan_to_num). The functions below do the same with our
# conventions (exact 0 for a group whose scorable rewards are all equal, as _centred does for complete groups).


def _nan_centred(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``g: [n, G]`` with NaN for unscorable members -> ``(centred, valid, n_valid)``: ``R - mean(scorable R)`` at
    scorable members and exactly 0 elsewhere, also 0 in groups whose scorable rewards are all equal (none, one,
    or several equal ones); ``valid`` the bool ``[n, G]`` of scorable members and ``n_valid`` their ``[n, 1]`` count."""
    valid = ~torch.isnan(g)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    n = valid.sum(-1, keepdim=True)
    x = torch.where(valid, g, zero)
    mean = x.sum(-1, keepdim=True) / n.clamp_min(1)
    big = torch.where(valid, g, -torch.inf).amax(-1, keepdim=True)  # every caller has G >= 1 members per set
    small = torch.where(valid, g, torch.inf).amin(-1, keepdim=True)
    flat = (n <= 1) | (big == small)
    return torch.where(valid & ~flat, g - mean, zero), valid, n


def _nan_std(centred: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of the scorable members from their centred values (0 where they are fewer than two;
    the advantage is then 0 anyway: such a group is flat)."""
    return ((centred ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()


def _nan_grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str, eps: float) -> torch.Tensor:
    """:func:`grpo_advantages` for ``rewards: [B]`` that may hold NaN (unscorable): mean and std over the scorable
    members of each group (``scale="batch"``: std over every scorable reward of the batch); an unscorable
    completion gets exactly 0, and so does every member of a group with fewer than two distinct scorable rewards.
    Unchecked (``rewards`` finite or NaN, ``group_size`` dividing ``B``)."""
    g = _grouped(as_float(rewards), group_size)
    centred, valid, n = _nan_centred(g)
    if scale == "group":
        centred = centred / (_nan_std(centred, n) + eps)
    elif scale == "batch":
        flat_c, flat_n = _nan_centred(g.reshape(1, -1))[0], valid.sum().reshape(1, 1)
        centred = centred / (_nan_std(flat_c, flat_n) + eps)
    return torch.nan_to_num(centred, nan=0.0).reshape(-1)  # 0 / (0 + 0) when eps == 0


def _nan_rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`rloo_advantages` over the scorable members: ``A_i = R_i - mean_{j != i, scorable} R_j
    = n/(n-1) (R_i - mean)`` with ``n`` the group's scorable count; 0 for unscorable members and for ``n <= 1``."""
    centred, _, n = _nan_centred(_grouped(as_float(rewards), group_size))
    return (centred * (n / (n - 1).clamp_min(1))).reshape(-1)


def _nan_reinforce_pp_baseline(seq_scores: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++-baseline (as :func:`reinforce_pp_advantages` with ``group_size``) with NaN sequence scores:
    centred over the scorable group members, whitened over the tokens of the scorable completions only; the tokens
    of an unscorable completion get exactly 0. ``seq_scores: [B]``, ``mask: [B, T]`` float -> ``[B, T]``."""
    centred, valid, _ = _nan_centred(_grouped(seq_scores, group_size))
    m = mask * valid.reshape(-1, 1).to(mask.dtype)
    return _masked_whiten(centred.reshape(-1, 1) * m, m)


MULTI_REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def combine_rewards(
    rewards: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    group_size: int = 8,
    aggregation: str = "sum_then_normalize",
    scale: Optional[str] = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages from ``K`` reward functions, as TRL 1.16.0 ``GRPOTrainer._generate_and_score_completions``
    (``multi_objective_aggregation``, ``reward_weights``, ``scale_rewards``; trl/trainer/grpo_trainer.py).

    A NaN is a reward function that returned None for that completion. A row that is NaN everywhere is an
    unscorable completion: it is left out of every statistic and its advantage is exactly 0.

    * ``"sum_then_normalize"`` (TRL's default): ``R_i = nansum_k w_k r_ik``, then the group-relative advantage of
      :func:`grpo_advantages` with ``scale`` (``"group"``: group mean and std; ``"batch"``: group mean, std of the
      batch; ``"none"``: group mean only), statistics over the scorable completions (TRL ``nanmean``/``nanstd``).
    * ``"normalize_then_sum"`` (GDPO-style): each reward function is standardised within the group over the
      completions it scored, ``z_ik = (r_ik - mean_k) / (std_k + eps)`` (0 where it gave None), then
      ``R_i = sum_k w_k z_ik`` is standardised over the whole batch, ``(R_i - mean(R)) / (std(R) + eps)``. TRL
      1.16.0 does this last step whatever ``scale_rewards`` is, so here ``scale`` must be None or ``"batch"``.

    Stds are Bessel-corrected; a set with fewer than two distinct values gives 0 (TRL: its NaN std becomes an
    advantage of 0 through ``nan_to_num``, its zero std a zero numerator).

    Args:
        rewards: ``[B, K]`` real, finite or NaN (``+-inf`` refused); groups of ``group_size`` contiguous rows.
        weights: ``[K]`` finite real weights (TRL ``reward_weights``), None for all ones.
        group_size: an int ``>= 2`` dividing ``B``.
        aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        scale: None (TRL's behaviour: ``"group"`` for ``sum_then_normalize``, the batch step for
            ``normalize_then_sum``), or ``"group"`` / ``"batch"`` / ``"none"`` (see above).
        eps: finite ``>= 0``, added to every std (TRL 1.16.0: 1e-4).
    Returns:
        ``[B]`` advantages, at least float32 (empty for ``B = 0``).
    Refused with a ``ValueError`` naming the argument: ``rewards`` not 2-D or holding ``+-inf``, ``weights`` not
    ``[K]`` or not finite, a bad ``group_size``, ``aggregation``, ``scale`` (or ``scale`` other than None/"batch"
    under ``normalize_then_sum``) or ``eps``.
    """
    check_choice("aggregation", aggregation, MULTI_REWARD_AGGREGATIONS)
    if scale is not None:
        check_choice("scale", scale, ADV_SCALES, what="advantage scale")
    if aggregation == "normalize_then_sum" and scale not in (None, "batch"):
        raise ValueError(f"scale={scale!r} does not apply to aggregation='normalize_then_sum', which standardises the "
                         "weighted sum over the batch (TRL 1.16.0 ignores scale_rewards there): pass scale=None or 'batch'")
    eps = check_real("eps", eps, lo=0.0)
    check_float_tensor("rewards", rewards)
    check_2d("rewards", rewards)
    r = as_float(rewards)
    check_finite("rewards", r, where=~torch.isnan(r))
    b, k = r.shape
    check_group_size(b, group_size, 2, batch_name="rewards")
    if weights is None:
        w = torch.ones(k, dtype=r.dtype, device=r.device)
    else:
        check_float_tensor("weights", weights)
        check_dim("weights", weights, 1, "[K]")
        if weights.shape[0] != k:
            raise ValueError(f"weights must be [K] = [{k}] (one per reward function), got shape {tuple(weights.shape)}")
        check_finite("weights", weights)
        w = as_float(weights).detach().to(device=r.device, dtype=torch.promote_types(r.dtype, as_float(weights).dtype))
        r = r.to(w.dtype)
    if b == 0:
        return torch.zeros(0, dtype=r.dtype, device=r.device)
    unscorable = torch.isnan(r).all(-1)  # all() over K = 0 functions is True: every completion is unscorable
    nan = torch.full((), torch.nan, dtype=r.dtype, device=r.device)
    if aggregation == "sum_then_normalize":
        total = torch.where(unscorable, nan, torch.nansum(r * w, dim=-1))
        return _nan_grpo_advantages(total, group_size, scale or "group", eps)
    g = r.reshape(b // group_size, group_size, k).transpose(1, 2)  # [n, K, G]: one set per group and function
    centred, _, n = _nan_centred(g)
    z = (centred / (_nan_std(centred, n) + eps)).transpose(1, 2).reshape(b, k)
    total = torch.where(unscorable, nan, (torch.nan_to_num(z, nan=0.0) * w).sum(-1))
    return _nan_grpo_advantages(total, b, "group", eps)  # the batch as one group: TRL's batch mean and batch std
