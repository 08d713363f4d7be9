"""Small input checks shared by every module: clear ``ValueError`` messages, no hidden state."""
from __future__ import annotations

import torch


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in at least float32 (float64 stays float64; bf16/fp16/ints go to float32)."""
    if x.dtype == torch.float64:
        return x
    return x.to(torch.float32)


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming every shape if the given tensors do not all share one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in shapes.items())
        raise ValueError(f"shape mismatch: expected equal shapes, got {listed}")


def check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(x.shape)}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf (first offending indices: {bad})")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {sorted(choices)}")


def check_group_size(batch: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if batch % group_size != 0:
        raise ValueError(
            f"batch size {batch} is not a multiple of group_size {group_size}: "
            "a GRPO batch must hold whole groups of completions of one prompt"
        )


def mask_like(mask: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Validate a response mask against ``ref`` and return it as a float tensor of ``ref``'s dtype."""
    check_same_shape(mask=mask, values=ref)
    if mask.dtype != torch.bool and mask.is_floating_point():
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold only 0 and 1")
    return mask.to(ref.dtype)
