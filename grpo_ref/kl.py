"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020) and the exact categorical KL.

Samples ``y ~ pi_theta`` (the policy), target ``KL(pi_theta || pi_ref)``. With ``log_ratio = ref - lp``
(i.e. ``log r`` for ``r = pi_ref(y) / pi_theta(y)``, Schulman's convention with ``q = pi_theta``, ``p = pi_ref``):

* ``k1 = -log r = lp - ref``                 unbiased, high variance, often negative;
* ``k2 = (log r)^2 / 2``                     biased, low variance, >= 0;
* ``k3 = (r - 1) - log r``                   unbiased, >= 0, low variance. This is DeepSeekMath eq. 4,
  ``pi_ref/pi - log(pi_ref/pi) - 1``, GRPO's KL term and TRL 1.16.0's KL (which clamps nothing, and by
  default multiplies it by the importance ratio: ``AlgoConfig.kl_ratio_weighted``); verl's ``k3`` /
  ``low_var_kl`` also clamps the value, see ``low_var_kl`` below.

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

verl 0.9.1's further names (``verl/trainer/ppo/core_algos.py``, ``kl_penalty_forward`` and ``kl_penalty``):

* ``abs = |lp - ref|`` (verl ``"abs"``);
* ``low_var_kl``: verl's guarded k3, ``clamp(k3(clamp(ref - lp, -20, 20)), -10, 10)`` (here the log-ratio clamp
  is ``min(20, max_log_ratio)``); where a clamp is active the gradient is 0;
* the straight-through forms ``"k1+"``, ``"k3+"``, ``"abs+"``, ``"low_var_kl+"`` (verl ``kl_penalty`` with a
  ``+`` suffix): ``k2 - sg(k2) + sg(base)``, whose *value* is the base estimator and whose *gradient* is k2's
  (the unbiased gradient of ``KL(pi || ref)`` on policy samples). verl's ``"k2+"`` is k2 itself, so it has no
  name of its own here. (verl's k2 in the straight-through form has no log-ratio clamp; here k2 uses
  ``max_log_ratio`` like every estimator, so the two agree wherever ``|lp - ref| <= max_log_ratio``.)
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ._checks import (
    NonFiniteInputError,
    _first_bad,
    as_float,
    check_choice,
    check_finite,
    check_float_tensor,
    check_optional_real,
    check_same_shape,
    clamp,
)


def _check_log_ratio_args(logp, ref_logp, max_log_ratio) -> Optional[float]:
    """Validate the arguments of the k-estimators: equal-shape real tensors, finite everywhere (there is no mask
    here: zero the padding first, or use :func:`~grpo_ref.surrogate.policy_loss`, which skips it), and
    ``max_log_ratio`` None or finite ``> 0``."""
    check_float_tensor("logp", logp)
    check_float_tensor("ref_logp", ref_logp)
    check_same_shape(logp=logp, ref_logp=ref_logp)
    check_finite("logp", logp)
    check_finite("ref_logp", ref_logp)
    return check_optional_real("max_log_ratio", max_log_ratio, lo=0.0, lo_open=True)


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float]) -> torch.Tensor:
    """``ref - lp`` in at least float32, optionally clamped to ``[-max_log_ratio, max_log_ratio]``."""
    d = as_float(ref_logp) - as_float(logp)
    if max_log_ratio is not None:
        d = clamp(d, -max_log_ratio, max_log_ratio)
    return d


def _k1(logp, ref_logp, max_log_ratio):
    return -_log_ratio(logp, ref_logp, max_log_ratio)


def _k2(logp, ref_logp, max_log_ratio):
    return 0.5 * _log_ratio(logp, ref_logp, max_log_ratio) ** 2


def _k3(logp, ref_logp, max_log_ratio):
    d = _log_ratio(logp, ref_logp, max_log_ratio)
    return torch.expm1(d) - d


def _abs(logp, ref_logp, max_log_ratio):
    return _log_ratio(logp, ref_logp, max_log_ratio).abs()


#: The first guard of verl 0.9.1's ``kl_penalty_forward`` for ``low_var_kl``, which clamps ``ref - lp`` to
#: ``[-20, 20]`` before ``exp``.
LOW_VAR_KL_LOG_RATIO_CLAMP = 20.0
#: The second guard, which clamps the k3 value to ``[-10, 10]`` (verl 0.9.1 ``kl_penalty_forward``).
LOW_VAR_KL_VALUE_CLAMP = 10.0


def _low_var_kl(logp, ref_logp, max_log_ratio):
    bound = LOW_VAR_KL_LOG_RATIO_CLAMP if max_log_ratio is None else min(max_log_ratio, LOW_VAR_KL_LOG_RATIO_CLAMP)
    d = _log_ratio(logp, ref_logp, bound)
    return clamp(torch.expm1(d) - d, -LOW_VAR_KL_VALUE_CLAMP, LOW_VAR_KL_VALUE_CLAMP)


def _straight_through(base, logp, ref_logp, max_log_ratio):
    """``k2 - sg(k2) + sg(base)``: the value of ``base``, the gradient of k2 (verl 0.9.1 ``kl_penalty``).

    The ``"<base>+"`` estimators of ``_ESTIMATORS`` are this function with ``base`` bound by ``functools.partial``
    (module-level code below, no factory: the body runs at call time, where a test, or a mutant, can reach it)."""
    k2 = _k2(logp, ref_logp, max_log_ratio)
    return k2 - k2.detach() + base(logp, ref_logp, max_log_ratio).detach()


_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3, "abs": _abs, "low_var_kl": _low_var_kl}
for _name, _base in list(_ESTIMATORS.items()):
    if _name != "k2":  # verl's "k2+" is k2 itself
        _ESTIMATORS[f"{_name}+"] = functools.partial(_straight_through, _base)
        _ESTIMATORS[f"{_name}+"].__name__ = f"{_base.__name__}_straight_through"
        _ESTIMATORS[f"{_name}+"].__doc__ = _straight_through.__doc__
del _name, _base
#: The names ``kl_estimator`` accepts, the five estimators and the straight-through forms ``k1+``, ``k3+``,
#: ``abs+``, ``low_var_kl+`` (the base estimator's value with k2's gradient, verl 0.9.1's ``+`` suffix).
KL_ESTIMATORS = tuple(_ESTIMATORS)

_REFUSED = """Refused (``ValueError`` naming the argument): complex or bool tensors, unequal shapes, NaN/inf anywhere in
    ``logp`` or ``ref_logp``, ``max_log_ratio`` that is not None or a finite number ``> 0``."""


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float] = 20.0) -> torch.Tensor:
    """Schulman's k1 ``= lp - ref`` per token. Shapes: any equal shapes, e.g. ``[B, T]``; returns the same.

    {refused}"""
    return _k1(logp, ref_logp, _check_log_ratio_args(logp, ref_logp, max_log_ratio))


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float] = 20.0) -> torch.Tensor:
    """Schulman's k2 ``= (lp - ref)^2 / 2`` per token (verl ``kl_penalty="mse"``/``"k2"``).

    Shapes: ``logp, ref_logp: [B, T]`` (any equal shapes) -> the same shape, at least float32. {refused}"""
    return _k2(logp, ref_logp, _check_log_ratio_args(logp, ref_logp, max_log_ratio))


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: Optional[float] = 20.0) -> torch.Tensor:
    """Schulman's k3 ``= exp(ref - lp) - (ref - lp) - 1`` per token: DeepSeekMath eq. 4, GRPO's KL.

    Estimates ``KL(pi_theta || pi_ref)`` when tokens are sampled from ``pi_theta``.
    Shapes: ``logp, ref_logp: [B, T]`` (any equal shapes) -> the same shape, at least float32.
    See the module docstring for the clamp. {refused}
    """
    return _k3(logp, ref_logp, _check_log_ratio_args(logp, ref_logp, max_log_ratio))


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", max_log_ratio: Optional[float] = 20.0
) -> torch.Tensor:
    """The estimator ``estimator`` of :data:`KL_ESTIMATORS` per token: ``k1`` / ``k2`` / ``k3`` (verl
    ``kl``/``mse``; verl's ``low_var_kl`` is k3 with its two clamps, our ``low_var_kl``), ``abs``, and the
    straight-through forms ``k1+``, ``k3+``, ``abs+``, ``low_var_kl+`` (see the module docstring).

    Shapes: ``logp, ref_logp: [B, T]`` -> ``[B, T]``. {refused}"""
    check_choice("estimator", estimator, KL_ESTIMATORS, what="KL estimator")
    return _ESTIMATORS[estimator](logp, ref_logp, _check_log_ratio_args(logp, ref_logp, max_log_ratio))


for _f in (kl_k1, kl_k2, kl_k3, kl_estimate):  # one text for the four docstrings (None under python -OO)
    if _f.__doc__:
        _f.__doc__ = _f.__doc__.replace("{refused}", _REFUSED)


def _check_logits_arg(name: str, x) -> None:
    check_float_tensor(name, x)
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must be a floating-point tensor [..., V] with V >= 1, got dtype {x.dtype}, shape {tuple(x.shape)}")


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` between categoricals given as logits.

    For the direction: ``categorical_kl(policy_logits, ref_logits)`` is the reverse KL ``KL(pi || ref)``
    that k1 and k3 estimate on policy samples; swap the arguments for the forward KL ``KL(ref || pi)``.

    Args:
        p_logits, q_logits: ``[..., V]`` floating point, broadcastable (e.g. one reference row against a batch).
            -inf entries (probability 0) are allowed. Refused: NaN or +inf logits, a row that is -inf everywhere.
    Returns:
        ``[...]`` KL per position, float32 or float64, >= 0 up to rounding. Where ``q_logits`` is -inf on a
        token that ``p`` gives mass, the KL is exactly ``+inf`` and that is what is returned (not NaN).
    """
    _check_logits_arg("p_logits", p_logits)
    _check_logits_arg("q_logits", q_logits)
    try:
        shape = torch.broadcast_shapes(p_logits.shape, q_logits.shape)
    except RuntimeError:
        raise ValueError(f"shape mismatch: p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} do not broadcast") from None
    kl = _categorical_kl(p_logits, q_logits, shape)
    if not bool(torch.isfinite(kl).all()):  # one pass over [...], V times smaller than the logits
        _explain_categorical_kl(p_logits, q_logits, shape, kl)
    return kl


def _categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, shape) -> torch.Tensor:
    logp = torch.log_softmax(as_float(p_logits), -1).expand(shape)
    logq = torch.log_softmax(as_float(q_logits), -1).expand(shape)
    p = logp.exp()
    # 0 * log 0 = 0: positions where p is exactly 0 contribute nothing even if q is 0 there too.
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(p))).sum(-1)


def _explain_categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, shape, kl: torch.Tensor) -> None:
    """Raise for a non-finite KL unless it is the exact ``+inf`` of ``q = 0`` where ``p > 0``."""
    for name, x in (("p_logits", p_logits), ("q_logits", q_logits)):
        bad = torch.isnan(x) | (x == torch.inf)
        if bool(bad.any()):
            raise NonFiniteInputError(name, f"{name} contains NaN or +inf ({_first_bad(bad, x)})")
        dead = ~(x > -torch.inf).any(-1)
        if bool(dead.any()):
            raise NonFiniteInputError(name, f"{name} has rows that are -inf everywhere (rows {dead.nonzero()[:3].tolist()})")
    support = (torch.log_softmax(as_float(p_logits), -1).expand(shape) > -torch.inf) & torch.isneginf(q_logits).expand(shape)
    overflow = ~torch.isfinite(kl) & ~support.any(-1)
    if bool(overflow.any()):
        raise NonFiniteInputError("p_logits", f"KL(p_logits || q_logits) overflows in {kl.dtype} at positions "
                                 f"{overflow.nonzero()[:3].tolist()}: pass float64 logits")
