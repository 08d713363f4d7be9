"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020) and the exact categorical KL.

Samples ``y ~ pi_theta`` (the policy), target ``KL(pi_theta || pi_ref)``. With ``log_ratio = ref - lp``
(i.e. ``log r`` for ``r = pi_ref(y) / pi_theta(y)``, Schulman's convention with ``q = pi_theta``, ``p = pi_ref``):

* ``k1 = -log r = lp - ref``                 unbiased, high variance, often negative;
* ``k2 = (log r)^2 / 2``                     biased, low variance, >= 0;
* ``k3 = (r - 1) - log r``                   unbiased, >= 0, low variance. This is DeepSeekMath eq. 4,
  ``pi_ref/pi - log(pi_ref/pi) - 1``, GRPO's KL term, TRL's KL and verl's ``low_var_kl``.

Used as *losses* (gradient through ``lp`` of a fixed on-policy sample) they differ again: ``E[grad k1] = 0``,
``E[grad k2] = grad KL(pi || ref)`` (reverse KL), ``E[grad k3] = grad KL(ref || pi)`` (forward KL);
see Tang & Munos 2025 (arXiv 2506.09477). The tests check all of this by exact enumeration.

Numerics: inputs are promoted to at least float32. ``k3`` contains ``exp(ref - lp)``, which overflows for
log-ratios beyond ~88 in float32. ``max_log_ratio`` (default 20, verl's value) clamps ``ref - lp`` to
``[-20, 20]`` before the exponential; inside that range the value and the gradient are exact (no clamp is
active), outside it the value is ``k3(+-20)`` (finite, about 4.85e8 at +20) and the gradient through the
clamped side is 0. ``None`` disables the clamp. ``k3`` is computed as ``expm1(d) - d`` so it stays exact and
non-negative for tiny ``d``, where ``exp(d) - d - 1`` cancels to 0 or below (its absolute error is then
about one ulp of ``d``; the value ``d^2/2`` itself is below float32 resolution for ``|d| < 1e-4``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import as_float, check_choice, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float]) -> torch.Tensor:
    """``ref - lp`` in at least float32, optionally clamped to ``[-max_log_ratio, max_log_ratio]``."""
    check_same_shape(logp=logp, ref_logp=ref_logp)
    d = as_float(ref_logp) - as_float(logp)
    if max_log_ratio is not None:
        if max_log_ratio <= 0:
            raise ValueError(f"max_log_ratio must be > 0 or None, got {max_log_ratio}")
        d = d.clamp(-max_log_ratio, max_log_ratio)
    return d


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float] = 20.0) -> torch.Tensor:
    """Schulman's k1 ``= lp - ref`` per token. Shapes: any equal shapes, e.g. ``[B, T]``; returns the same."""
    return -_log_ratio(logp, ref_logp, max_log_ratio)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float] = 20.0) -> torch.Tensor:
    """Schulman's k2 ``= (lp - ref)^2 / 2`` per token (verl ``kl_penalty="mse"``/``"k2"``).

    Shapes: ``logp, ref_logp: [B, T]`` (any equal shapes) -> the same shape, at least float32."""
    return 0.5 * _log_ratio(logp, ref_logp, max_log_ratio) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float] = 20.0) -> torch.Tensor:
    """Schulman's k3 ``= exp(ref - lp) - (ref - lp) - 1`` per token: DeepSeekMath eq. 4, GRPO's KL.

    Estimates ``KL(pi_theta || pi_ref)`` when tokens are sampled from ``pi_theta``.
    Shapes: ``logp, ref_logp: [B, T]`` (any equal shapes) -> the same shape, at least float32.
    See the module docstring for the clamp.
    """
    d = _log_ratio(logp, ref_logp, max_log_ratio)
    return torch.expm1(d) - d


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", max_log_ratio: Optional[float] = 20.0
) -> torch.Tensor:
    """Dispatch to ``kl_k1`` / ``kl_k2`` / ``kl_k3`` by name (verl: ``kl``/``mse``/``low_var_kl``).

    Shapes: ``logp, ref_logp: [B, T]`` -> ``[B, T]``."""
    check_choice("KL estimator", estimator, KL_ESTIMATORS)
    return {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}[estimator](logp, ref_logp, max_log_ratio)


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` between categoricals given as logits.

    For the direction: ``categorical_kl(policy_logits, ref_logits)`` is the reverse KL ``KL(pi || ref)``
    that k1 and k3 estimate on policy samples; swap the arguments for the forward KL ``KL(ref || pi)``.

    Args:
        p_logits, q_logits: ``[..., V]``, broadcastable (e.g. one reference row against a batch).
    Returns:
        ``[...]`` KL per position, float32 or float64, >= 0 up to rounding.
    """
    try:
        shape = torch.broadcast_shapes(p_logits.shape, q_logits.shape)
    except RuntimeError:
        raise ValueError(f"shape mismatch: p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} do not broadcast") from None
    logp = torch.log_softmax(as_float(p_logits), -1).expand(shape)
    logq = torch.log_softmax(as_float(q_logits), -1).expand(shape)
    p = logp.exp()
    # 0 * log 0 = 0: positions where p is exactly 0 contribute nothing even if q is 0 there too.
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(p))).sum(-1)
