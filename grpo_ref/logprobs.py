"""Token log-probabilities and entropies from logits, without a second ``[B, T, V]`` tensor.

``log pi(y_t) = z_t[y_t] / tau - logsumexp(z_t / tau)``: gather the chosen logit, subtract the
log-partition function, a chunk of rows at a time (TRL's ``selective_log_softmax`` idea). Logits of
an LLM are the largest tensor of a step; ``log_softmax(logits).gather(...)`` would store a second copy.
"""
from __future__ import annotations

import torch

from ._checks import as_float


def _rows(logits: torch.Tensor, temperature: float):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits.reshape(-1, logits.shape[-1])


def _scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """``chunk / tau`` in at least float32. For float32 logits at ``tau == 1`` this is a view (no copy), so
    autograd saves only views of the caller's logits; otherwise each chunk is one float32 copy."""
    z = as_float(chunk)
    return z if temperature == 1.0 else z / temperature


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Log-probability of the tokens actually taken.

    Args:
        logits: ``[..., V]`` (usually ``[B, T, V]``), any float dtype; position ``t`` scores ``tokens[..., t]``
            (shift by one yourself for a causal LM: ``logits[:, :-1]`` scores ``input_ids[:, 1:]``).
        tokens: ``[...]`` integer ids, same leading shape as ``logits``.
        temperature: the sampling temperature ``tau``; logits are divided by it, as in PPO-RLHF and TRL,
            so that the log-probs are those of the distribution that was sampled.
        chunk_size: rows (positions) processed at once; bounds the working memory of the forward pass to
            ``chunk_size * V`` floats whatever ``B * T`` is. (With gradients, autograd keeps what backward needs:
            nothing extra for float32 logits at ``tau = 1``, a float32 copy of the logits otherwise, the same as
            ``log_softmax`` would.)

    Returns:
        ``[...]`` float32 (float64 for float64 logits) log-probabilities, differentiable w.r.t. ``logits``.
        Equal to ``log_softmax(logits / tau, -1).gather(-1, tokens[..., None])[..., 0]`` to float tolerance.
    """
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    if tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    rows = _rows(logits, temperature)
    ids = tokens.reshape(-1)
    if ids.numel() and (ids.min() < 0 or ids.max() >= rows.shape[-1]):
        raise ValueError(f"token ids must lie in [0, {rows.shape[-1]}), got range [{int(ids.min())}, {int(ids.max())}]")
    out = []
    for start in range(0, rows.shape[0], chunk_size):
        z = _scaled(rows[start : start + chunk_size], temperature)
        chosen = z.gather(-1, ids[start : start + chunk_size, None])[:, 0]
        out.append(chosen - torch.logsumexp(z, dim=-1))
    if not out:
        return torch.zeros(tokens.shape, dtype=as_float(rows).dtype, device=logits.device)
    return torch.cat(out).reshape(tokens.shape)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` of each position's distribution (verl's form).

    Args:
        logits: ``[..., V]``; divided by ``temperature`` first.
    Returns:
        ``[...]`` float32 (float64 for float64 input) entropies in nats, differentiable.
    """
    rows = _rows(logits, temperature)
    out = []
    for start in range(0, rows.shape[0], chunk_size):
        z = _scaled(rows[start : start + chunk_size], temperature)
        p = torch.softmax(z, -1)
        # tokens with p = 0 (logit -inf, e.g. top-k masking) contribute 0, not 0 * -inf = NaN
        out.append(torch.logsumexp(z, -1) - (p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1))
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=as_float(rows).dtype, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])
