"""Input checks shared by every module: a ``ValueError`` that names the caller's argument and the offending
value or shape, no hidden state.

Conventions:

* scalar checks are written so that NaN fails them (``not lo <= x``, ``math.isfinite``), and ``bool`` never
  passes where a number is meant (``isinstance(True, int)`` is True in Python);
* tensor value checks cost one reduction per tensor (``sum(x)`` or ``dot(x, mask)`` must be finite; only when
  it is not does the exact elementwise test run, so an input is never wrongly accepted or refused), and a mask
  check three light passes; the offending indices are only looked up once a check has failed
  (``benchmarks/check_overhead.py`` measures the cost);
* masked functions refuse NaN/inf only where the mask is 1: padding may hold anything, it never reaches a
  result or a gradient;
* a value that is not finite raises :class:`NonFiniteInputError`, a ``ValueError`` that also carries the argument
  name, so a training loop can tell a corrupt input from a programming error.
"""
from __future__ import annotations

import math
import numbers
from typing import Collection, Optional

import torch


class NonFiniteInputError(ValueError):
    """A tensor argument holds NaN or inf where a finite value is needed; ``.name`` is the argument."""

    def __init__(self, name: str, message: str):
        self.name = name
        super().__init__(message)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in at least float32 (float64 stays float64; bf16/fp16/ints go to float32)."""
    if x.dtype == torch.float64:
        return x
    return x.to(torch.float32)


# -- scalars ---------------------------------------------------------------------------------------------------------
def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_real(
    name: str,
    x,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``x`` as a finite ``float`` in ``[lo, hi]`` (``(lo, ...`` with ``lo_open``, ``..., hi)`` with ``hi_open``).

    Refuses ``bool``, non-numbers, NaN and +-inf; a real 0-dim tensor is read as its value."""
    if torch.is_tensor(x) and x.numel() == 1 and not (x.is_complex() or x.dtype == torch.bool):
        x = x.item()
    if not _is_real(x):
        raise ValueError(f"{name} must be a real number, got {x!r} ({type(x).__name__})")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    below = lo is not None and not (x > lo if lo_open else x >= lo)
    above = hi is not None and not (x < hi if hi_open else x <= hi)
    if below or above:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        if lo is not None and hi is not None:
            where = f"lie in {left}, {right}"
        elif lo is not None:
            where = f"be {'>' if lo_open else '>='} {lo:g}"
        else:
            where = f"be {'<' if hi_open else '<='} {hi:g}"
        raise ValueError(f"{name} must {where}, got {x!r}")
    return x


def check_optional_real(name: str, x, **bounds) -> Optional[float]:
    """``None`` or :func:`check_real`."""
    return None if x is None else check_real(name, x, **bounds)


def check_int(name: str, x, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``x`` as an ``int`` in ``[lo, hi]``; refuses ``bool``, floats (even ``2.0``) and strings."""
    if not isinstance(x, numbers.Integral) or isinstance(x, bool):
        raise ValueError(f"{name} must be an int, got {x!r} ({type(x).__name__})")
    x = int(x)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be an int {rng}, got {x}")
    return x


def check_bool(name: str, x) -> bool:
    """``x`` if it is a ``bool`` (``'yes'``, ``1`` or ``None`` are refused)."""
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be True or False, got {x!r} ({type(x).__name__})")
    return x


def check_choice(name: str, value, choices: Collection, what: Optional[str] = None) -> None:
    """``value`` must be one of ``choices``; ``what`` describes it when ``name`` (the argument) is terse."""
    if not isinstance(value, str) or value not in choices:
        label = name if what is None else f"{what}"
        of = "" if what is None else f" for {name}"
        raise ValueError(f"unknown {label} {value!r}{of}; expected one of {sorted(choices)}")


def check_group_size(batch: int, group_size, min_size: int = 1, name: str = "group_size", batch_name: str = "the batch") -> int:
    """``group_size`` as an int ``>= min_size`` that divides ``batch`` (the rows of ``batch_name``)."""
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool):
        raise ValueError(f"{name} must be an int, got {group_size!r} ({type(group_size).__name__})")
    if group_size < min_size:
        why = " for a group baseline" if min_size >= 2 else ""
        raise ValueError(f"{name} must be >= {min_size}{why}, got {group_size}")
    if batch % group_size != 0:
        raise ValueError(
            f"batch size {batch} is not a multiple of {name} {group_size} ({batch_name} has {batch} rows): "
            "a GRPO batch must hold whole groups of completions of one prompt"
        )
    return int(group_size)


# -- tensors ---------------------------------------------------------------------------------------------------------
def check_tensor(name: str, x) -> torch.Tensor:
    """``x`` if it is a real-valued tensor (complex and non-tensors are refused)."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got complex dtype {x.dtype}")
    return x


def check_float_tensor(name: str, x) -> torch.Tensor:
    """``x`` if it is a real-valued tensor; bool is refused (a ``True`` is not a number here), ints are accepted."""
    check_tensor(name, x)
    if x.dtype == torch.bool:
        raise ValueError(f"{name} must hold numbers, got dtype {x.dtype}")
    return x


def check_dim(name: str, x: torch.Tensor, dim: int, layout: str) -> None:
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(x.shape)}")


def check_2d(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x)
    check_dim(name, x, 2, "[B, T]")


def check_same_shape(**tensors: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming every shape if the given tensors do not all share one shape."""
    for name, t in tensors.items():
        if t is not None:
            check_tensor(name, t)
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in shapes.items())
        raise ValueError(f"shape mismatch: expected equal shapes, got {listed}")


def _first_bad(bad: torch.Tensor, x: torch.Tensor) -> str:
    idx = bad.nonzero()[:3]
    vals = [x[tuple(i)].item() for i in idx] if x.dim() else [x.item()]
    return f"first offending indices: {idx.tolist()}, values {vals}"


def check_finite(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    """Raise :class:`NonFiniteInputError` if ``x`` holds NaN/inf (only where the 0/1 or bool mask ``where`` is on).

    Fast path, one reduction: ``sum(x)`` (or ``dot(x, where)``) is finite unless ``x`` holds a NaN/inf where it
    counts, because NaN and inf propagate through sums (``inf + -inf`` is NaN). It can also be non-finite for
    legal inputs (an overflowing sum of huge values, or NaN under the mask's 0s, as ``NaN * 0`` is NaN); only
    then is the exact elementwise test run, so the fast path never accepts a bad input nor refuses a good one."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    v = x.detach()
    if v.dtype in (torch.float32, torch.float64):
        if where is None:
            total = v.sum()
        else:
            total = torch.dot(v.reshape(-1), where.detach().reshape(-1).to(v.dtype))
        if bool(torch.isfinite(total)):
            return
    ok = torch.isfinite(v)
    if where is not None:
        ok = ok | ~(where > 0)
    if not bool(ok.all()):
        scope = " at masked-in positions" if where is not None else ""
        raise NonFiniteInputError(name, f"{name} contains NaN or inf{scope} ({_first_bad(~ok, v)})")


def check_scalar_result(name: str, x: torch.Tensor, hint: str) -> torch.Tensor:
    """A scalar result that overflowed from finite but extreme inputs (e.g. ``kl_coef = 1e308``) is refused;
    ``hint`` names the arguments that scale it. One scalar read: negligible."""
    if not bool(torch.isfinite(x)):
        raise NonFiniteInputError(name, f"{name} overflowed to {x.item()}: {hint}")
    return x


def check_mask(name: str, mask, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """Validate a 0/1 mask against ``like`` (same shape) and return it as ``like``'s float dtype.

    Any real dtype is accepted (bool, ints, floats); every value must be exactly 0 or 1 (2, -1, 0.5, NaN are
    refused: a mask of 2s would double every sum)."""
    check_tensor(name, mask)
    check_same_shape(**{like_name: like, name: mask})
    if mask.dtype != torch.bool and mask.numel():
        if not _is_binary(mask):
            ok = (mask == 0) | (mask == 1)
            raise ValueError(f"{name} must hold only 0 and 1 ({_first_bad(~ok, mask)})")
    return mask.to(like.dtype)


def _is_binary(mask: torch.Tensor) -> bool:
    """All values 0 or 1, in three light passes: ``0 <= min, max <= 1`` (NaN fails both), and, for floats,
    ``sum m (1 - m) == 0``; each term is ``>= 0`` on ``[0, 1]`` and ``> 0`` off ``{0, 1}`` without underflow
    (one factor is ``>= 1/2``), so the sum is 0 exactly when every value is 0 or 1."""
    lo, hi = torch.aminmax(mask)
    if not (bool(lo >= 0) and bool(hi <= 1)):
        return False
    if not mask.is_floating_point():
        return True
    flat = mask.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return bool(torch.dot(flat, 1 - flat) == 0)


def check_ids(name: str, ids, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Integer token ids (any integer dtype, returned as int64, which ``gather``/``Embedding`` need) in
    ``[0, vocab_size)``; float, bool and complex ids are refused."""
    check_tensor(name, ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be integer ids, got dtype {ids.dtype}")
    ids = ids.long()
    if vocab_size is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")
    return ids


def clamp(x: torch.Tensor, lo: Optional[float], hi: Optional[float]) -> torch.Tensor:
    """``x.clamp(lo, hi)`` with Python-float bounds cut to ``x``'s finite range: a validated bound such as
    ``max_log_ratio = 3.5e38`` is legal but does not fit in float32, where torch would raise; no finite value of
    ``x`` lies beyond its dtype's largest one, so the result is that of the exact bound."""
    big = torch.finfo(x.dtype).max
    return x.clamp(None if lo is None else max(lo, -big), None if hi is None else min(hi, big))
