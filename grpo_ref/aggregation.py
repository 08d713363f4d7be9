"""Loss aggregation: how a ``[B, T]`` matrix of per-token losses becomes one scalar.

Named as verl's ``loss_agg_mode``; TRL's ``loss_type`` equivalents in brackets (``L_i = sum_t m[i, t]``):

=============================  ================================================  ==========================================
mode                           scalar                                            who uses it [TRL ``loss_type``]
=============================  ================================================  ==========================================
``seq-mean-token-mean``        ``(1/B) sum_i (1/max(1, L_i)) sum_t m l``         GRPO paper [``grpo``]
``token-mean``                 ``sum_{i,t} m l / max(1, sum_{i,t} m)``           DAPO [``bnpo``; ``dapo`` across processes]
``seq-mean-token-sum-norm``    ``(1/B) sum_i sum_t m l / norm_length``           Dr. GRPO [``dr_grpo``]
``seq-mean-token-sum``         ``(1/B) sum_i sum_t m l``                         REINFORCE-style sums [``luspo``]
``token-sum``                  ``sum_{i,t} m l``                                 verl 0.9.1 ``agg_loss`` ``"token-sum"``
=============================  ================================================  ==========================================

``token-mean`` with a global normaliser: ``num_tokens`` (given from outside, e.g. the rollout batch's token
count divided by the number of minibatches) replaces this minibatch's own count ``sum_{i,t} m``. That is TRL
1.16.0's ``loss_type="dapo"``/``"cispo"`` (``GRPOTrainer._compute_loss`` divides by ``num_items_in_batch``, the
generation batch's token count, scaled to one optimizer step) and verl 0.9.1's ``agg_loss(...,
batch_num_tokens=...)``: every token of a rollout then weighs the same, whichever minibatch it falls in.

``norm_length`` should be a constant of the run (the generation budget, TRL's ``max_completion_length``);
it defaults to ``T = mask.shape[-1]``, which is verl's default ``loss_scale_factor`` and is only constant if the
batches are padded to a fixed length. verl before 2025-09 divided the token sum by ``T`` without the ``1/B``.
Under ``seq-mean-token-mean`` an empty response contributes 0 but still counts in ``B`` (TRL's convention, and
verl 0.9.1's when its trainer passes the global batch size; ``agg_loss`` called without it drops fully masked
sequences from the count).
"""
from __future__ import annotations

from typing import Optional, Tuple, cast

import torch

from ._checks import as_float, check_2d, check_choice, check_finite, check_mask, check_optional_real

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")


def _check_aggregate_args(
    name: str, loss_mat, mask, loss_agg_mode, norm_length
) -> Tuple[torch.Tensor, torch.Tensor, Optional[float]]:
    """Validate :func:`aggregate`'s arguments, naming the per-token tensor ``name``; returns ``(values, m, norm)``
    with ``values`` in at least float32, ``m`` the float mask and ``norm`` the resolved ``norm_length``."""
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    check_2d(name, loss_mat)
    values = as_float(loss_mat)
    m = check_mask("mask", mask, name, values)
    check_finite(name, values, where=m)
    norm = check_optional_real("norm_length", norm_length, lo=0.0, lo_open=True)
    if loss_agg_mode == "seq-mean-token-sum-norm" and norm is None:
        norm = float(max(m.shape[-1], 1))  # T; with T = 0 there is no token and every sum is 0 anyway
    return values, m, norm


def check_num_tokens(num_tokens, loss_agg_mode: str) -> Optional[float]:
    """The global token normaliser ``num_tokens`` checked against ``loss_agg_mode``, returned as a float or None.

    ``num_tokens`` is None, or a finite number ``> 0`` (a 0-dim tensor is read as its value) and then allowed only
    under ``loss_agg_mode="token-mean"``; anything else is a ``ValueError`` naming ``num_tokens``."""
    num = check_optional_real("num_tokens", num_tokens, lo=0.0, lo_open=True)
    if num is not None and loss_agg_mode != "token-mean":
        raise ValueError(f"num_tokens={num!r} (a global token normaliser) only applies to loss_agg_mode='token-mean', "
                         f"got loss_agg_mode={loss_agg_mode!r}")
    return num


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    norm_length: Optional[float] = None,
    num_tokens: Optional[float] = None,
) -> torch.Tensor:
    """Reduce per-token losses ``loss_mat: [B, T]`` under ``mask: [B, T]`` to a scalar, by ``loss_agg_mode``
    (table above).

    ``norm_length``: None (``T``) or a finite number ``> 0``. ``num_tokens``: None (this batch's token count) or
    a finite number ``> 0``, the global normaliser of ``token-mean`` (refused under the other modes). Refused (``ValueError``): an unknown mode, a
    ``loss_mat`` that is not 2-D or complex, a mask of another shape or with values other than 0/1, NaN/inf in
    ``loss_mat`` at masked-in positions (masked-out positions may hold anything: they never reach the result).
    An empty batch (``B = 0``) or ``T = 0`` gives 0 (a sum over no token).
    """
    values, m, norm = _check_aggregate_args("loss_mat", loss_mat, mask, loss_agg_mode, norm_length)
    return _aggregate(values, m, loss_agg_mode, norm, check_num_tokens(num_tokens, loss_agg_mode))


def _aggregate(
    values: torch.Tensor, m: torch.Tensor, mode: str, norm: Optional[float], num_tokens: Optional[float] = None
) -> torch.Tensor:
    """:func:`aggregate` without the checks (``m`` a float 0/1 mask, ``norm`` and ``num_tokens`` resolved)."""
    # where() rather than a bare product: a non-finite value in a masked-out slot must not leak (0 * inf = nan)
    tok = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device)) * m
    if mode == "token-mean":
        return tok.sum() / (m.sum().clamp_min(1.0) if num_tokens is None else num_tokens)
    if mode == "token-sum":
        return tok.sum()
    seq = tok.sum(-1)  # [B]
    if mode == "seq-mean-token-mean":
        seq = seq / m.sum(-1).clamp_min(1.0)
    elif mode == "seq-mean-token-sum-norm":
        seq = seq / cast(float, norm)  # resolved by _check_aggregate_args for this mode
    return seq.mean() if seq.numel() else seq.sum()
