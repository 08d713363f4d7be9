"""Loss aggregation: how a ``[B, T]`` matrix of per-token losses becomes one scalar.

Named as verl's ``loss_agg_mode``; TRL's ``loss_type`` equivalents in brackets (``L_i = sum_t m[i, t]``):

=============================  ================================================  ==========================================
mode                           scalar                                            who uses it [TRL ``loss_type``]
=============================  ================================================  ==========================================
``seq-mean-token-mean``        ``(1/B) sum_i (1/max(1, L_i)) sum_t m l``         GRPO paper [``grpo``]
``token-mean``                 ``sum_{i,t} m l / max(1, sum_{i,t} m)``           DAPO [``bnpo``; ``dapo`` across processes]
``seq-mean-token-sum-norm``    ``(1/B) sum_i sum_t m l / norm_length``           Dr. GRPO [``dr_grpo``]
``seq-mean-token-sum``         ``(1/B) sum_i sum_t m l``                         REINFORCE-style sums
=============================  ================================================  ==========================================

``norm_length`` should be a constant of the run (the generation budget, TRL's ``max_completion_length``);
it defaults to ``T = mask.shape[-1]``, which is verl's default ``loss_scale_factor`` and is only constant if the
batches are padded to a fixed length. verl before 2025-09 divided the token sum by ``T`` without the ``1/B``.
Under ``seq-mean-token-mean`` an empty response contributes 0 but still counts in ``B`` (TRL's convention;
recent verl drops fully masked sequences from the count).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import as_float, check_2d, check_choice, mask_like

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate(
    loss_mat: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str, norm_length: Optional[float] = None
) -> torch.Tensor:
    """Reduce per-token losses ``loss_mat: [B, T]`` under ``mask: [B, T]`` to a scalar, by ``loss_agg_mode``
    (table above)."""
    mode = loss_agg_mode
    check_choice("loss_agg_mode", mode, LOSS_AGG_MODES)
    check_2d("loss_mat", loss_mat)
    values = as_float(loss_mat)
    m = mask_like(mask, values)
    # where() rather than a bare product: a non-finite value in a masked-out slot must not leak (0 * inf = nan)
    tok = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device)) * m
    if mode == "token-mean":
        return tok.sum() / m.sum().clamp_min(1.0)
    seq = tok.sum(-1)  # [B]
    if mode == "seq-mean-token-mean":
        seq = seq / m.sum(-1).clamp_min(1.0)
    elif mode == "seq-mean-token-sum-norm":
        norm = float(m.shape[-1] if norm_length is None else norm_length)
        if norm <= 0:
            raise ValueError(f"norm_length must be > 0, got {norm_length}")
        seq = seq / norm
    return seq.mean() if seq.numel() else seq.sum()
