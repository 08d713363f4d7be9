"""Advantage estimators: GRPO (and Dr. GRPO), RLOO, REINFORCE++, GAE, process supervision, DAPO overlong shaping.

Sequence-level estimators take one scalar reward per completion, ``rewards: [B]``, with the ``G`` completions
of one prompt stored contiguously (``B = n_prompts * G``, rows ``g*G .. g*G + G - 1`` form group ``g``), and
return ``[B]``; broadcast to tokens with ``adv[:, None] * mask``. Token-level estimators take ``[B, T]``.
All of them compute in at least float32 and refuse NaN/inf rewards with a ``ValueError``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import as_float, check_2d, check_choice, check_finite, check_group_size, check_same_shape, mask_like
from .masks import masked_whiten

ADV_SCALES = ("group", "batch", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    check_group_size(rewards.shape[0], group_size)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    return as_float(rewards).view(-1, group_size)


def _masked_in(x: torch.Tensor, m: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` with masked-out entries set to 0; ``ValueError`` if a masked-in entry is NaN or inf."""
    check_finite(name, x[m > 0])
    return torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _centred(g: torch.Tensor) -> torch.Tensor:
    """``R - mean(R_group)``, exactly 0 in groups whose rewards are all equal (no rounding residue)."""
    same = g.amax(-1, keepdim=True) == g.amin(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(g), g - g.mean(-1, keepdim=True))


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome-supervision advantage (DeepSeekMath sec. 4.1.2): ``A_i = (R_i - mean(R_group)) / (std + eps)``.

    Args:
        rewards: ``[B]`` scalar rewards, groups of ``group_size`` contiguous rows.
        scale: ``"group"``: divide by the group's std (DeepSeekMath; TRL ``scale_rewards="group"``; verl ``grpo``);
            ``"batch"``: divide by the std of all rewards of the batch (TRL ``scale_rewards="batch"``);
            ``"none"``: no division (Dr. GRPO; TRL ``"none"``; verl ``norm_adv_by_std_in_grpo=False``).
        eps: added to the std. The paper gives none; TRL uses 1e-4, verl 1e-6 (our default), OpenRLHF 1e-9.
            With ``eps > 0`` the advantage is invariant to reward shift exactly and to positive scale only up to
            ``eps / std``.
    Std is the unbiased (Bessel-corrected) one, as ``torch.std`` in TRL and verl. A group whose rewards are all
    equal gets advantage exactly 0 (it carries no learning signal; only a KL term can move the policy there).

    Returns:
        ``[B]`` advantages.
    """
    check_choice("advantage scale", scale, ADV_SCALES)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    g = _grouped(rewards, group_size)
    centred = _centred(g)
    if scale == "group":
        centred = centred / (g.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        std = g.reshape(-1).std() if g.numel() > 1 else torch.zeros((), dtype=g.dtype, device=g.device)
        centred = centred / (std + eps)
    return torch.nan_to_num(centred.reshape(-1), nan=0.0)  # 0 / (0 + 0) when eps == 0 and a group is flat


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO leave-one-out baseline (Ahmadian et al. 2024): ``A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean)``.

    Args: rewards ``[B]``, groups of ``group_size >= 2`` contiguous rows. Returns ``[B]``.
    """
    g = _grouped(rewards, group_size)
    return (_centred(g) * (group_size / (group_size - 1))).reshape(-1)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = sum_{s >= t, m_s = 1} gamma^{(# masked-in steps from t to s)} r_s`` over masked-in positions.

    Masked-out positions are skipped (they neither add reward nor count as a step) and get 0.
    Shapes: ``[B, T]`` in, ``[B, T]`` out.
    """
    check_2d("token_rewards", token_rewards)
    r = as_float(token_rewards)
    m = mask_like(mask, r)
    r = _masked_in(r, m, "token_rewards")
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
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
    """
    check_2d("token_rewards", token_rewards)
    r = as_float(token_rewards)
    m = mask_like(mask, r)
    if group_size is None:
        returns = discounted_returns(r, m, gamma)
    else:
        score = (torch.where(m > 0, r, torch.zeros_like(r))).sum(-1)
        g = _grouped(score, group_size)
        returns = _centred(g).reshape(-1)[:, None] * m
    return masked_whiten(returns, m)


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
    """
    check_2d("token_rewards", token_rewards)
    check_same_shape(token_rewards=token_rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    r = as_float(token_rewards)
    m = mask_like(mask, r)
    r = _masked_in(r, m, "token_rewards")
    v = _masked_in(as_float(values).detach().to(r.dtype), m, "values")
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
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
        group_size: ``G``; rows ``g*G .. g*G+G-1`` share a prompt. Std is unbiased; a group whose valid step rewards
            are all equal (or that has a single step) gets 0.
    Returns:
        ``[B, T]`` token advantages.
    """
    check_2d("step_rewards", step_rewards)
    check_same_shape(step_rewards=step_rewards, step_ends=step_ends, step_mask=step_mask)
    check_2d("mask", mask)
    if mask.shape[0] != step_rewards.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} rows but step_rewards has {step_rewards.shape[0]}")
    r = as_float(step_rewards)
    sm = mask_like(step_mask, r)
    r = _masked_in(r, sm, "step_rewards")
    b, s = r.shape
    check_group_size(b, group_size)
    if step_ends.dtype.is_floating_point or ((step_ends < 0) | (step_ends >= mask.shape[1]))[sm > 0].any():
        raise ValueError(f"step_ends must be integer token indices in [0, {mask.shape[1]})")
    rg, mg = r.view(-1, group_size * s), sm.view(-1, group_size * s)
    n = mg.sum(-1, keepdim=True)
    mean = (rg * mg).sum(-1, keepdim=True) / n.clamp_min(1)
    var = (((rg - mean) * mg) ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    big, small = torch.where(mg > 0, rg, -torch.inf).amax(-1, True), torch.where(mg > 0, rg, torch.inf).amin(-1, True)
    flat = (big == small) | (n <= 1)
    norm = torch.where(flat, torch.zeros_like(rg), (rg - mean) / (var.sqrt() + eps)) * mg
    norm = norm.view(b, s)
    t = torch.arange(mask.shape[1], device=mask.device)
    covers = (step_ends[:, :, None] >= t[None, None, :]).to(r.dtype)  # [B, S, T]
    return torch.einsum("bs,bst->bt", norm, covers) * mask_like(mask, r[:, :1].expand(b, mask.shape[1]))


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), added to the task reward.

    ``0`` if ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` (from 0 down to -1) if
    ``L_max - L_cache < |y| <= L_max``; ``-1`` if ``|y| > L_max``.

    Args: lengths ``[B]`` response lengths; ``0 < cache_length <= max_length``. Returns ``[B]`` float32.
    """
    if not (0 < cache_length <= max_length):
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max_length={max_length}")
    lengths = as_float(torch.as_tensor(lengths))
    soft = max_length - cache_length
    pen = (soft - lengths) / cache_length
    return torch.where(lengths <= soft, torch.zeros_like(pen), torch.where(lengths <= max_length, pen, -torch.ones_like(pen)))
