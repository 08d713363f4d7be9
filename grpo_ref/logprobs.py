"""Token log-probabilities and entropies from logits, without a second ``[B, T, V]`` tensor.

``log pi(y_t) = z_t[y_t] / tau - logsumexp(z_t / tau)``: gather the chosen logit, subtract the
log-partition function, a chunk of rows at a time (TRL's ``selective_log_softmax`` idea). Logits of
an LLM are the largest tensor of a step; ``log_softmax(logits).gather(...)`` would store a second copy.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import NonFiniteInputError, _first_bad, check_ids, check_int, check_real, check_tensor


def _check_logits(name: str, logits) -> torch.Tensor:
    """``logits: [..., V]`` floating point with ``V >= 1`` (dtype and shape only; values: :func:`_check_result`)."""
    check_tensor(name, logits)
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [..., V], got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    return logits


def _check_scaling(temperature, chunk_size) -> tuple:
    return check_real("temperature", temperature, lo=0.0, lo_open=True), check_int("chunk_size", chunk_size, lo=1)


def _check_result(out: torch.Tensor, logits: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Refuse a non-finite result, naming its cause in the inputs.

    A NaN or +inf logit, or a row that is -inf everywhere, makes its position's log-prob and entropy NaN, and a
    chosen token of logit -inf gives -inf; so one pass over the ``[...]`` result (``V`` times smaller than the
    logits) detects every bad logit, and the logits are only searched once it has failed."""
    if bool(torch.isfinite(out).all()):
        return out
    bad = torch.isnan(logits) | (logits == torch.inf)
    if bool(bad.any()):
        raise NonFiniteInputError("logits", f"logits contains NaN or +inf ({_first_bad(bad, logits)})")
    dead = ~(logits > -torch.inf).any(-1)
    if bool(dead.any()):
        raise NonFiniteInputError("logits", f"logits has rows that are -inf everywhere, no token has probability > 0 (rows {dead.nonzero()[:3].tolist()})")
    if tokens is not None:
        zero = torch.isneginf(logits.gather(-1, tokens[..., None])[..., 0])
        if bool(zero.any()):
            raise NonFiniteInputError("tokens", f"tokens picks tokens whose logit is -inf (probability 0; {_first_bad(zero, tokens)})")
    raise NonFiniteInputError("logits", f"logits / temperature overflows to a non-finite result ({_first_bad(~torch.isfinite(out), out)})")


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Log-probability of the tokens actually taken.

    Args:
        logits: ``[..., V]`` (usually ``[B, T, V]``), any float dtype; position ``t`` scores ``tokens[..., t]``
            (shift by one yourself for a causal LM: ``logits[:, :-1]`` scores ``input_ids[:, 1:]``).
            -inf entries (masked vocabulary) are allowed; NaN, +inf and rows that are -inf everywhere are refused.
        tokens: ``[...]`` integer ids of any integer dtype (int16/uint8 are widened to int64), same leading shape
            as ``logits``, in ``[0, V)``; float, bool and complex ids are refused.
        temperature: the sampling temperature ``tau``, finite and ``> 0``; logits are divided by it, as in
            PPO-RLHF and TRL, so that the log-probs are those of the distribution that was sampled.
        chunk_size: int ``>= 1``, rows (positions) processed at once; bounds the working memory of the forward pass to
            ``chunk_size * V`` floats whatever ``B * T`` is. (With gradients, the backward is hand-written and
            chunked too: it saves the logits without a copy and ``[N]`` floats, and writes the gradient into one
            ``[..., V]`` buffer in the logits' dtype; :mod:`grpo_ref.fused_logprobs` has the equations.)

    Returns:
        ``[...]`` float32 (float64 for float64 logits) log-probabilities, differentiable w.r.t. ``logits``.
        Equal to ``log_softmax(logits / tau, -1).gather(-1, tokens[..., None])[..., 0]`` to float tolerance.
        Empty inputs (no position) give an empty result. A token whose logit is -inf (probability 0) or
        logits that overflow once divided by ``tau`` raise ``ValueError``: the result would be -inf or NaN.
    """
    _check_logits("logits", logits)
    check_tensor("tokens", tokens)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    ids = check_ids("tokens", tokens, logits.shape[-1])
    tau, chunk = _check_scaling(temperature, chunk_size)
    return _check_result(_token_logprobs(logits, ids, tau, chunk), logits, ids)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
    """:func:`token_logprobs` without the checks (``tokens`` int64): the chunked forward of
    :mod:`grpo_ref.fused_logprobs`, and its hand-written chunked backward when ``logits`` require grad."""
    return _logits_apply(logits, tokens, temperature, chunk_size, True, False)[0]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` of each position's distribution (verl's form).

    Args:
        logits: ``[..., V]`` floating point; divided by ``temperature`` first. -inf entries are allowed (they
            contribute 0); NaN, +inf and rows that are -inf everywhere are refused.
        temperature: as in :func:`token_logprobs`, finite ``> 0``.
        chunk_size: as in :func:`token_logprobs`, an int ``>= 1``.
    Returns:
        ``[...]`` float32 (float64 for float64 input) entropies in nats, differentiable; empty for empty input.
    """
    _check_logits("logits", logits)
    tau, chunk = _check_scaling(temperature, chunk_size)
    return _check_result(_token_entropy(logits, tau, chunk), logits)


def _token_entropy(logits: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
    """:func:`token_entropy` without the checks (chunked forward and backward of :mod:`grpo_ref.fused_logprobs`)."""
    return _logits_apply(logits, None, temperature, chunk_size, False, True)[1]


# after the definitions above, which it imports (the checks), so either module may be imported first
from .fused_logprobs import _logits_apply  # noqa: E402
