"""Response masks and masked reductions over ``[B, T]`` tensors.

A response mask ``m`` is 1 on the response tokens whose log-probabilities enter the loss and 0 on prompt
and padding positions. ``L_i = sum_t m[i, t]`` is the response length of sequence ``i``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import as_float, check_2d, mask_like


def response_mask(
    seq_len: int,
    prompt_lengths: torch.Tensor,
    total_lengths: Optional[torch.Tensor] = None,
    tokens: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int] = None,
) -> torch.Tensor:
    """Build the ``[B, T]`` float mask of response positions.

    Position ``t`` of row ``i`` is a response token when ``prompt_lengths[i] <= t < end_i``, where ``end_i`` is
    ``total_lengths[i]`` (prompt + response, excluding right padding) if given, else ``T``; and, if ``tokens`` and
    ``eos_token_id`` are given, also ``t <=`` the first EOS at or after the prompt (the EOS itself is kept: the
    policy chose to stop, so its log-prob is trained, as in TRL and verl).

    Args:
        seq_len: ``T``.
        prompt_lengths: ``[B]`` ints.
        total_lengths: optional ``[B]`` ints, ``prompt_lengths <= total_lengths <= T``.
        tokens: optional ``[B, T]`` ids, needed with ``eos_token_id``.
    Returns:
        ``[B, T]`` float32 mask of 0/1.
    """
    prompt_lengths = torch.as_tensor(prompt_lengths)
    if prompt_lengths.dim() != 1:
        raise ValueError(f"prompt_lengths must be 1-D [B], got shape {tuple(prompt_lengths.shape)}")
    b = prompt_lengths.shape[0]
    dev = prompt_lengths.device
    pos = torch.arange(seq_len, device=dev)[None, :].expand(b, seq_len)
    if (prompt_lengths < 0).any() or (prompt_lengths > seq_len).any():
        raise ValueError(f"prompt_lengths must lie in [0, {seq_len}], got {prompt_lengths.tolist()}")
    end = torch.full((b,), seq_len, device=dev, dtype=torch.long)
    if total_lengths is not None:
        total_lengths = torch.as_tensor(total_lengths, device=dev)
        if total_lengths.shape != (b,):
            raise ValueError(f"total_lengths must have shape ({b},), got {tuple(total_lengths.shape)}")
        if (total_lengths < prompt_lengths).any() or (total_lengths > seq_len).any():
            raise ValueError("total_lengths must satisfy prompt_lengths <= total_lengths <= seq_len")
        end = total_lengths.long()
    keep = (pos >= prompt_lengths[:, None]) & (pos < end[:, None])
    if eos_token_id is not None:
        if tokens is None or tuple(tokens.shape) != (b, seq_len):
            raise ValueError(f"eos_token_id needs tokens of shape ({b}, {seq_len})")
        is_eos = (tokens == eos_token_id) & keep
        # positions strictly after the first EOS: cumulative count of EOS before t is >= 1
        eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        keep = keep & (eos_before == 0)
    return keep.to(torch.float32)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``sum(values * mask)`` over ``dim`` (all dims if None), in at least float32.

    Masked-out entries are replaced by zero before the product, so an inf or NaN in a padded position
    cannot leak into the result or its gradient. Shapes: ``values, mask: [B, T]`` (equal shapes) -> a scalar,
    or the shape without ``dim``.
    """
    values = as_float(values)
    m = mask_like(mask, values)
    v = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return (v * m).sum() if dim is None else (v * m).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``sum(values * mask) / max(sum(mask), 1)``: the mean over masked-in entries; 0 where none are.

    Shapes: ``values, mask: [B, T]`` -> a scalar, or ``[B]`` with ``dim=-1`` (per-sequence means)."""
    num = masked_sum(values, mask, dim)
    m = mask_like(mask, as_float(values))
    den = m.sum() if dim is None else m.sum(dim)
    return num / den.clamp_min(1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked-in entries (scalar).

    ``unbiased=True`` divides by ``n - 1`` (Bessel; verl's ``masked_whiten`` and ``torch.std``), ``False`` by ``n``
    (OpenRLHF's global whitening). With ``n <= 1`` (or ``n == 0`` biased) the variance is 0, not NaN.
    Shapes: ``values, mask: [B, T]`` -> a scalar.
    """
    values = as_float(values)
    m = mask_like(mask, values)
    values = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    mean = masked_mean(values, m)
    n = m.sum()
    sq = masked_sum((values - mean) ** 2, m)
    den = (n - 1.0) if unbiased else n
    return torch.where(den > 0, sq / den.clamp_min(1.0), torch.zeros_like(sq))


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten over the masked-in entries: ``(x - mean) / sqrt(var + eps)``; masked-out entries become 0.

    This is verl's ``masked_whiten`` (unbiased variance, ``rsqrt(var + 1e-8)``); ``unbiased=False`` gives
    OpenRLHF's global whitening. ``shift_mean=False`` rescales without centring (the mean is added back), as
    PPO-RLHF implementations offer for rewards.

    Args:
        values, mask: ``[B, T]`` (any equal shapes).
    Returns:
        same shape, float32 or float64.
    """
    values = as_float(values)
    m = mask_like(mask, values)
    values = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    mean = masked_mean(values, m)
    var = masked_var(values, m, unbiased=unbiased)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    check_2d("mask", mask)
    return as_float(mask).sum(-1)
