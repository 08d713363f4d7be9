"""Response masks and masked reductions over ``[B, T]`` tensors.

A response mask ``m`` is 1 on the response tokens whose log-probabilities enter the loss and 0 on prompt
and padding positions. ``L_i = sum_t m[i, t]`` is the response length of sequence ``i``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import (
    as_float,
    check_bool,
    check_dim,
    check_finite,
    check_ids,
    check_int,
    check_mask,
    check_real,
    check_tensor,
)


def _lengths_arg(name: str, x, device=None) -> torch.Tensor:
    try:
        x = torch.as_tensor(x, device=device)
    except (TypeError, ValueError, RuntimeError) as e:  # a string, None, a ragged list: not lengths
        raise ValueError(f"{name} must be a tensor or a list of integer lengths, got {type(x).__name__}") from e
    x = check_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer lengths, got dtype {x.dtype}")
    return x.long()


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
        seq_len: ``T``, an int ``>= 0``.
        prompt_lengths: ``[B]`` integer lengths in ``[0, T]`` (a tensor or a list; float lengths are refused).
        total_lengths: optional ``[B]`` integer lengths, ``prompt_lengths <= total_lengths <= T``.
        tokens: optional ``[B, T]`` integer ids, needed with ``eos_token_id``; ``tokens`` without
            ``eos_token_id`` is ignored.
        eos_token_id: optional int; a row's response ends with (and keeps) its first EOS at or after the prompt.
    Returns:
        ``[B, T]`` float32 mask of 0/1 (``B = 0`` or ``T = 0`` give an empty mask).
    """
    seq_len = check_int("seq_len", seq_len, lo=0)
    prompt_lengths = _lengths_arg("prompt_lengths", prompt_lengths)
    check_dim("prompt_lengths", prompt_lengths, 1, "[B]")
    b = prompt_lengths.shape[0]
    dev = prompt_lengths.device
    pos = torch.arange(seq_len, device=dev)[None, :].expand(b, seq_len)
    if (prompt_lengths < 0).any() or (prompt_lengths > seq_len).any():
        raise ValueError(f"prompt_lengths must lie in [0, {seq_len}], got {prompt_lengths.tolist()}")
    end = torch.full((b,), seq_len, device=dev, dtype=torch.long)
    if total_lengths is not None:
        total_lengths = _lengths_arg("total_lengths", total_lengths, dev)
        if total_lengths.shape != (b,):
            raise ValueError(f"total_lengths must have shape ({b},), got {tuple(total_lengths.shape)}")
        if (total_lengths < prompt_lengths).any() or (total_lengths > seq_len).any():
            raise ValueError(f"total_lengths must satisfy prompt_lengths <= total_lengths <= seq_len = {seq_len}, got {total_lengths.tolist()}")
        end = total_lengths
    keep = (pos >= prompt_lengths[:, None]) & (pos < end[:, None])
    if eos_token_id is not None:
        eos_token_id = check_int("eos_token_id", eos_token_id)
        if tokens is None or tuple(tokens.shape) != (b, seq_len):
            got = None if tokens is None else tuple(tokens.shape)
            raise ValueError(f"eos_token_id needs tokens of shape ({b}, {seq_len}), got {got}")
        tokens = check_ids("tokens", tokens)
        is_eos = (tokens.to(dev) == eos_token_id) & keep
        # positions strictly after the first EOS: cumulative count of EOS before t is >= 1
        eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        keep = keep & (eos_before == 0)
    return keep.to(torch.float32)


def _check_masked(values, mask, values_name: str = "values", mask_name: str = "mask") -> tuple:
    """Validate a ``(values, mask)`` pair of equal shapes: a real tensor, a 0/1 mask, ``values`` finite where the
    mask is 1 (NaN/inf under the mask's 0s is allowed: padding never reaches the result). Returns ``(v, m)``:
    ``values`` in at least float32 and the mask in its dtype."""
    check_tensor(values_name, values)
    v = as_float(values)
    m = check_mask(mask_name, mask, values_name, v)
    check_finite(values_name, v, where=m)
    return v, m


def _zero_out(values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``values`` with masked-out entries set to 0 (before any product: 0 * inf = nan)."""
    return torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _check_dim_arg(dim, values: torch.Tensor) -> Optional[int]:
    if dim is None:
        return None
    return check_int("dim", dim, lo=-max(values.dim(), 1), hi=max(values.dim(), 1) - 1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``sum(values * mask)`` over ``dim`` (all dims if None), in at least float32.

    Masked-out entries are replaced by zero before the product, so an inf or NaN in a padded position
    cannot leak into the result or its gradient. Shapes: ``values, mask: [B, T]`` (equal shapes) -> a scalar,
    or the shape without ``dim``. Refused: a mask holding anything but 0/1, NaN/inf at masked-in positions,
    complex values, a ``dim`` out of range. Empty inputs sum to 0.
    """
    v, m = _check_masked(values, mask)
    return _masked_sum(v, m, _check_dim_arg(dim, v))


def _masked_sum(v: torch.Tensor, m: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    prod = _zero_out(v, m) * m
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``sum(values * mask) / max(sum(mask), 1)``: the mean over masked-in entries; 0 where none are.

    Shapes: ``values, mask: [B, T]`` -> a scalar, or ``[B]`` with ``dim=-1`` (per-sequence means).
    Refused inputs: as :func:`masked_sum`."""
    v, m = _check_masked(values, mask)
    return _masked_mean(v, m, _check_dim_arg(dim, v))


def _masked_mean(v: torch.Tensor, m: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    den = m.sum() if dim is None else m.sum(dim)
    return _masked_sum(v, m, dim) / den.clamp_min(1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked-in entries (scalar).

    ``unbiased=True`` divides by ``n - 1`` (Bessel; verl's ``masked_whiten`` and ``torch.std``), ``False`` by ``n``
    (OpenRLHF's global whitening). With ``n <= 1`` (or ``n == 0`` biased) the variance is 0, not NaN.
    Shapes: ``values, mask: [B, T]`` -> a scalar. Refused inputs: as :func:`masked_sum`; ``unbiased`` must be a bool.
    """
    v, m = _check_masked(values, mask)
    return _masked_var(v, m, check_bool("unbiased", unbiased))


def _masked_var(v: torch.Tensor, m: torch.Tensor, unbiased: bool) -> torch.Tensor:
    v = _zero_out(v, m)
    mean = _masked_mean(v, m)
    n = m.sum()
    sq = _masked_sum((v - mean) ** 2, m)
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
        values: ``[B, T]`` (any shape equal to ``mask``'s); refused inputs as :func:`masked_sum`.
        mask: ``[B, T]`` of 0/1.
        shift_mean: subtract the mean (True), or rescale only and add the mean back (False).
        unbiased: the Bessel-corrected variance (verl) or the biased one (OpenRLHF).
        eps: finite and ``>= 0``; with ``eps = 0`` a constant input (variance 0) whitens to 0, not ``0 / 0``.
    Returns:
        same shape, float32 or float64.
    """
    v, m = _check_masked(values, mask)
    eps = check_real("eps", eps, lo=0.0)
    return _masked_whiten(v, m, check_bool("shift_mean", shift_mean), check_bool("unbiased", unbiased), eps)


def _masked_whiten(v: torch.Tensor, m: torch.Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    v = _zero_out(v, m)
    mean = _masked_mean(v, m)
    var = _masked_var(v, m, unbiased=unbiased)
    scale = var + eps
    out = (v - mean) * torch.where(scale > 0, torch.rsqrt(scale), torch.zeros_like(scale))
    if not shift_mean:
        out = out + mean
    return out * m
