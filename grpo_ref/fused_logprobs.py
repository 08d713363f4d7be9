"""Token log-probs and entropies with a hand-written, chunked backward, from logits or fused from hidden states.

Two autograd functions (``torch.autograd.Function``), both chunked over rows (positions) in the forward *and*
the backward pass:

* **from logits** ``z: [N, V]`` (any leading shape, flattened to ``N`` rows): the forward keeps one per-row
  ``logsumexp`` ``[N]`` (and the entropy ``[N]`` when asked for); the backward recomputes each chunk's softmax
  from the logits (saved without a copy) and writes ``dL/dz`` into **one** preallocated ``[N, V]`` buffer in
  the logits' dtype. Autograd's own backward of a row-chunked forward would allocate a full-size zero gradient
  per chunk (quadratic in the number of chunks), and ``log_softmax(z).gather(...)`` keeps a second ``[N, V]``
  tensor for its backward.
* **fused from hidden states** ``h: [N, H]`` and the output embedding ``W: [V, H]`` (+ ``b: [V]``): each chunk's
  logits ``h_c W^T + b`` are made, reduced and dropped, in both passes; the ``[N, V]`` logits never exist.
  Backward accumulates ``dL/dW`` (``[V, H]``) and ``dL/db`` chunk by chunk and writes ``dL/dh`` per chunk.

Equations (``tau`` the temperature, ``z' = z / tau``, ``p = softmax(z')``, ``lse = logsumexp(z')``,
``log p = z' - lse``, ``y`` the chosen token, ``g`` the incoming gradient of each output)::

    log pi(y)            = z'_y - lse
    H                    = -sum_v p_v log p_v     (p_v = 0 adds 0: masked, -inf logits)
    d log pi(y) / d z_v  = (1[v = y] - p_v) / tau
    d H / d z_v          = -p_v (log p_v + H) / tau
    d/dh = (dL/dz) W,    d/dW = (dL/dz)^T h,    d/db = sum_rows dL/dz

(the entropy gradient: ``dH/dz'_j = -sum_v dp_v/dz'_j (log p_v + 1)`` with ``dp_v/dz'_j = p_v (1[v=j] - p_j)``
gives ``-p_j (log p_j + 1) + p_j sum_v p_v (log p_v + 1) = -p_j (log p_j + H)``.)

Precision: every softmax, logsumexp and gradient is computed in at least float32 (bf16/fp16 chunks are upcast one
chunk at a time; float64 stays float64). Outputs are float32 (float64 for float64 inputs); gradients are returned
in the inputs' dtype. In the fused path the matmul ``h_c W^T`` runs in the inputs' dtype (as the model's own
``lm_head`` would) and its ``[c, V]`` result is upcast; ``dL/dW`` and ``dL/db`` of bf16/fp16 inputs are
accumulated in a float32 ``[V, H]`` buffer and cast once at the end.

Memory (``c = chunk_size`` rows, float32 working precision, beyond the inputs and the returned gradients):

* from logits, forward: one ``[c, V]`` work buffer (two with the entropy), reused by every chunk; saved for backward: the logits themselves (no copy; a view
  even for non-contiguous slices such as ``logits[:, p - 1 : -1]``), the ids and ``[N]`` floats. Backward: the
  ``[N, V]`` gradient buffer (the physical floor: autograd needs it) plus at most two ``[c, V]`` buffers.
  ``log_softmax(z / tau).gather(...)`` holds ``[N, V]`` log-softmax for its backward and allocates two more
  ``[N, V]`` tensors in it.
* fused: one ``[c, V]`` buffer in either pass (two with the entropy); ``[N]`` floats saved; backward adds the ``dL/dh``
  (``[N, H]``), ``dL/dW`` (``[V, H]``) and ``dL/db`` buffers (one float32 ``[V, H]`` accumulator more for
  bf16/fp16). ``N x V`` never appears.

Double backward (second derivatives) is supported by a plain, unchunked fallback: when the backward itself is
recorded (``create_graph=True``), it is computed with ordinary differentiable torch ops over the full ``[N, V]``
(used by ``gradgradcheck``; no training loop of this package needs it).

The same ideas ship in the frameworks this book follows; none of them was run here (neither TRL nor Liger-Kernel
is installed in this environment): TRL's ``selective_log_softmax`` (row-chunked forward gather and logsumexp,
autograd backward), Liger-Kernel's fused linear cross-entropy and ``LigerFusedLinearGRPOLoss`` (chunked
``h W^T`` with the gradient computed in the forward pass), verl's fused linear-for-PPO (``FusedLinearForPPO``:
log-probs and entropy from hidden states, logits recomputed in backward), which is the design followed here.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ._checks import NonFiniteInputError, _first_bad, as_float, check_finite, check_ids, check_tensor
from .logprobs import _check_logits, _check_result, _check_scaling

__all__ = [
    "token_logprobs_and_entropy",
    "token_logprobs_from_hidden",
    "token_entropy_from_hidden",
    "token_logprobs_and_entropy_from_hidden",
]


# ---------------------------------------------------------------------------------------------- chunk kernels
_COPY_BELOW = 1 << 20  # elements (4 MiB of float32): a non-viewable input this small is walked as one copy


def _row_blocks(x: torch.Tensor, chunk: int, offset: int = 0) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(first_row, block)`` over the rows of ``x: [..., V]`` flattened to ``[N, V]``, each block a **view** of at
    most ``chunk`` rows. A non-viewable layout (e.g. the slice ``logits[:, p - 1 : -1]``) is walked along its
    leading dimension instead of being copied (blocks then do not cross that dimension), unless it holds at most
    ``_COPY_BELOW`` elements (then one copy, as ``reshape`` would make, is cheaper than many tiny blocks)."""
    v = x.shape[-1]
    try:
        rows = x.view(-1, v)
    except RuntimeError:  # only a non-empty x of >= 3 dims gets here; small ones are copied (few large blocks)
        rows = x.reshape(-1, v) if x.numel() <= _COPY_BELOW else None
    if rows is not None:
        for s in range(0, rows.shape[0], chunk):
            yield offset + s, rows[s : s + chunk]
        return
    per = x[0].numel() // v
    for i in range(x.shape[0]):
        yield from _row_blocks(x[i], chunk, offset + i * per)


class _Work:
    """``[chunk, V]`` float buffers reused by every chunk of one call (one per role, allocated on first use), so a
    pass allocates its working memory once instead of once per chunk."""

    def __init__(self, rows: int, v: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.v, self.dtype, self.device, self.bufs = rows, v, dtype, device, {}

    def get(self, key: str, c: int) -> torch.Tensor:
        buf = self.bufs.get(key)
        if buf is None:
            buf = self.bufs[key] = torch.empty(self.rows, self.v, dtype=self.dtype, device=self.device)
        return buf[:c]


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _load(block: torch.Tensor, tau: float, work: _Work, copy: bool) -> Tuple[torch.Tensor, bool]:
    """``block / tau`` in at least float32, and whether it lives in the work buffer (and may be overwritten).
    float32/float64 at ``tau == 1`` is returned as is (a view of the input) unless ``copy``."""
    same = block.dtype == work.dtype
    if same and tau == 1.0 and not copy:
        return block, False
    z = work.get("z", block.shape[0])
    if tau != 1.0 and same:
        torch.div(block, tau, out=z)
    else:
        z.copy_(block)
        if tau != 1.0:
            z.div_(tau)
    return z, True


def _forward_block(z: torch.Tensor, ids: Optional[torch.Tensor], need_h: bool, work: _Work, owned: bool):
    """``z: [c, V]`` scaled logits (overwritten when ``owned``) -> ``lse [c]``, ``log pi(y) [c]`` (or None),
    ``H [c]`` (or None).

    ``lse = m + log s`` with ``m`` the row max and ``s = sum exp(z - m)``; ``log pi(y) = (z_y - m) - log s``;
    ``H = log s - sum_v e_v t_v / s`` with ``t = z - m`` and ``e = exp(t)`` (``= -sum p log p``, no cancellation
    between large terms). One ``[c, V]`` work buffer for the log-probs, two with the entropy."""
    c = z.shape[0]
    m = z.amax(-1)
    chosen = None if ids is None else z.gather(-1, ids[:, None])[:, 0] - m
    t = z.sub_(m[:, None]) if owned else torch.sub(z, m[:, None], out=work.get("t", c))
    h = None
    if need_h:
        e = torch.exp(t, out=work.get("e", c))
        s = e.sum(-1)
        log_s = s.log()
        t.clamp_(min=torch.finfo(t.dtype).min)  # -inf logits: e = 0 there, and 0 * finite = 0 (0 log 0 = 0)
        h = log_s - e.mul_(t).sum(-1) / s
    else:
        log_s = t.exp_().sum(-1).log()
    lp = None if chosen is None else chosen - log_s
    return m + log_s, lp, h


def _grad_block(lp: torch.Tensor, ids, h, g_lp, g_h, tau: float, work: _Work) -> torch.Tensor:
    """Overwrite ``lp: [c, V]``, holding ``log p = z' - lse``, with ``dL/dz`` (see the module's equations; ``h``
    the rows' entropies, ``g_lp``/``g_h`` the incoming gradients, None for an output that did not get one)."""
    if g_h is None:
        lp.exp_().mul_((-g_lp / tau)[:, None])
    else:
        p = torch.exp(lp, out=work.get("p", lp.shape[0]))
        lp.clamp_(min=torch.finfo(lp.dtype).min).add_(h[:, None]).mul_(p).mul_((-g_h / tau)[:, None])
        if g_lp is not None:
            lp.addcmul_(p, (-g_lp / tau)[:, None])
    if g_lp is not None:
        lp.scatter_add_(1, ids[:, None], (g_lp / tau)[:, None])
    return lp


def _reshape_grads(grads, n: int, dtype) -> list:
    return [None if g is None else g.reshape(n).to(dtype) for g in grads]


def _dense_grad(z: torch.Tensor, ids, g_lp, g_h, tau: float) -> torch.Tensor:
    """Unchunked, differentiable ``dL/dz`` from full scaled logits ``z [N, V]`` (the double-backward fallback)."""
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    safe = torch.where(p > 0, logp, torch.zeros_like(logp))
    dz = torch.zeros_like(z)
    if g_lp is not None:
        dz = dz - p * g_lp[:, None] + torch.zeros_like(z).scatter(1, ids[:, None], g_lp[:, None])
    if g_h is not None:
        h = -(p * safe).sum(-1)
        dz = dz - p * (safe + h[:, None]) * g_h[:, None]
    return dz / tau


def _outputs(lp, h, need_lp: bool, need_h: bool):
    if need_lp and need_h:
        return lp, h
    return lp if need_lp else h


# ---------------------------------------------------------------------------------------------- from logits
def _logits_forward(logits: torch.Tensor, ids: torch.Tensor, tau: float, chunk: int, need_lp: bool, need_h: bool):
    """Chunked forward (no autograd): ``[N]`` log-probs (or None), entropies (or None) and logsumexp."""
    n = logits.numel() // logits.shape[-1]
    ft = _float_dtype(logits.dtype)
    work = _Work(min(chunk, n), logits.shape[-1], ft, logits.device)
    lse = torch.empty(n, dtype=ft, device=logits.device)
    lp = torch.empty(n, dtype=ft, device=logits.device) if need_lp else None
    h = torch.empty(n, dtype=ft, device=logits.device) if need_h else None
    for s, block in _row_blocks(logits, chunk):
        e = s + block.shape[0]
        z, owned = _load(block, tau, work, copy=False)
        l, a, b = _forward_block(z, ids[s:e] if need_lp else None, need_h, work, owned)
        lse[s:e] = l
        if need_lp:
            lp[s:e] = a
        if need_h:
            h[s:e] = b
    return lp, h, lse


class _LogitsFn(torch.autograd.Function):
    """``(logits [..., V], ids [N] int64) -> log pi [N] and/or H [N]``; backward chunked into one buffer."""

    @staticmethod
    def forward(ctx, logits, ids, tau, chunk, need_lp, need_h):
        lp, h, lse = _logits_forward(logits, ids, tau, chunk, need_lp, need_h)
        ctx.save_for_backward(logits, ids, lse, h)
        ctx.cfg = (tau, chunk, need_lp, need_h)
        ctx.set_materialize_grads(False)
        return _outputs(lp, h, need_lp, need_h)

    @staticmethod
    def backward(ctx, *grads):
        logits, ids, lse, h = ctx.saved_tensors
        tau, chunk, need_lp, need_h = ctx.cfg
        n, v = lse.shape[0], logits.shape[-1]
        g_lp, g_h = (grads if need_lp and need_h else ((grads[0], None) if need_lp else (None, grads[0])))
        g_lp, g_h = _reshape_grads((g_lp, g_h), n, lse.dtype)
        if (g_lp is None and g_h is None) or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: differentiable, unchunked
            z = as_float(logits.reshape(n, v)) / tau
            return _dense_grad(z, ids, g_lp, g_h, tau).reshape(logits.shape).to(logits.dtype), None, None, None, None, None
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        rows = grad.view(-1, v)
        direct = logits.dtype in (torch.float32, torch.float64)
        work = _Work(min(chunk, n), v, lse.dtype, logits.device)
        for s, block in _row_blocks(logits, chunk):
            e = s + block.shape[0]
            if direct:  # write log p straight into the gradient buffer
                out = rows[s:e]
                if tau == 1.0:
                    torch.sub(block, lse[s:e, None], out=out)
                else:
                    torch.div(block, tau, out=out).sub_(lse[s:e, None])
            else:
                out, _ = _load(block, tau, work, copy=True)
                out.sub_(lse[s:e, None])
            _grad_block(out, ids[s:e], None if h is None else h[s:e],
                        None if g_lp is None else g_lp[s:e], None if g_h is None else g_h[s:e], tau, work)
            if not direct:
                rows[s:e].copy_(out)
        return grad, None, None, None, None, None


def _logits_apply(logits, ids, tau, chunk, need_lp, need_h):
    """Dispatch: the autograd function when a gradient is wanted, the plain chunked forward otherwise."""
    flat = ids.reshape(-1) if ids is not None else torch.zeros(0, dtype=torch.long, device=logits.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        out = _LogitsFn.apply(logits, flat, tau, chunk, need_lp, need_h)
        out = out if (need_lp and need_h) else ((out, None) if need_lp else (None, out))
    else:
        lp, h, _ = _logits_forward(logits, flat, tau, chunk, need_lp, need_h)
        out = (lp, h)
    lead = logits.shape[:-1]
    return tuple(None if o is None else o.reshape(lead) for o in out)


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the taken tokens and entropies of every position, in one chunked pass over ``logits``.

    Args:
        logits: ``[..., V]`` any float dtype (see :func:`grpo_ref.logprobs.token_logprobs`: -inf entries allowed; NaN, +inf
            and rows that are -inf everywhere refused).
        tokens: ``[...]`` integer ids in ``[0, V)``, ``logits.shape[:-1]``.
        temperature: ``tau``, finite ``> 0``.
        chunk_size: an int ``>= 1``, rows per chunk (both passes).

    Returns:
        ``(logp, entropy)``, each ``[...]`` float32 (float64 for float64 logits), equal to
        ``log_softmax(z / tau).gather(...)`` and ``-sum p log p``; differentiable with the hand-written chunked
        backward described in :mod:`grpo_ref.fused_logprobs` (one ``[N, V]`` gradient buffer, softmax recomputed
        per chunk from the logits, which are saved without a copy).
    """
    _check_logits("logits", logits)
    check_tensor("tokens", tokens)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    ids = check_ids("tokens", tokens, logits.shape[-1])
    tau, chunk = _check_scaling(temperature, chunk_size)
    lp, h = _logits_apply(logits, ids, tau, chunk, True, True)
    return _check_result(lp, logits, ids), _check_result(h, logits)


# ---------------------------------------------------------------------------------------------- fused from hidden
def _chunk_logits(h_c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tau: float, work: _Work) -> torch.Tensor:
    """``(h_c W^T + b) / tau`` ``[c, V]`` in at least float32, in the work buffer (the matmul writes into it
    directly for float32/float64; a bf16/fp16 product is made in its dtype and upcast)."""
    z = work.get("z", h_c.shape[0])
    dst = z if h_c.dtype == work.dtype else None
    if bias is None:
        out = torch.mm(h_c, weight.t(), out=dst) if dst is not None else torch.mm(h_c, weight.t())
    else:
        out = torch.addmm(bias, h_c, weight.t(), out=dst) if dst is not None else torch.addmm(bias, h_c, weight.t())
    if dst is None:
        z.copy_(out)
        del out
    return z.div_(tau) if tau != 1.0 else z


class _HiddenFn(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] or None, ids [N]) -> log pi [N] and/or H [N]``, no ``[N, V]``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, tau, chunk, need_lp, need_h):
        n = hidden.shape[0]
        ft = _float_dtype(hidden.dtype)
        work = _Work(min(chunk, n), weight.shape[0], ft, hidden.device)
        lse = torch.empty(n, dtype=ft, device=hidden.device)
        lp = torch.empty(n, dtype=ft, device=hidden.device) if need_lp else None
        h = torch.empty(n, dtype=ft, device=hidden.device) if need_h else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = _chunk_logits(hidden[s:e], weight, bias, tau, work)
            l, a, b = _forward_block(z, ids[s:e] if need_lp else None, need_h, work, True)
            lse[s:e] = l
            if need_lp:
                lp[s:e] = a
            if need_h:
                h[s:e] = b
        ctx.save_for_backward(hidden, weight, bias, ids, lse, h)
        ctx.cfg = (tau, chunk, need_lp, need_h)
        ctx.set_materialize_grads(False)
        return _outputs(lp, h, need_lp, need_h)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, ids, lse, h = ctx.saved_tensors
        tau, chunk, need_lp, need_h = ctx.cfg
        n = hidden.shape[0]
        g_lp, g_h = (grads if need_lp and need_h else ((grads[0], None) if need_lp else (None, grads[0])))
        g_lp, g_h = _reshape_grads((g_lp, g_h), n, lse.dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        nothing = (None,) * 8
        if (g_lp is None and g_h is None) or not (want_h or want_w or want_b):
            return nothing
        if torch.is_grad_enabled():  # create_graph=True: differentiable, unchunked
            z = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
            z = as_float(z) / tau
            dz = _dense_grad(z, ids, g_lp, g_h, tau).to(hidden.dtype)
            return (dz @ weight if want_h else None, dz.t() @ hidden if want_w else None,
                    dz.sum(0) if want_b else None) + nothing[3:]
        low = hidden.dtype not in (torch.float32, torch.float64)
        acc = torch.float32 if low else hidden.dtype
        gh = torch.empty_like(hidden) if want_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        work = _Work(min(chunk, n), weight.shape[0], lse.dtype, hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h_c = hidden[s:e]
            dz = _chunk_logits(h_c, weight, bias, tau, work).sub_(lse[s:e, None])
            _grad_block(dz, ids[s:e], None if h is None else h[s:e],
                        None if g_lp is None else g_lp[s:e], None if g_h is None else g_h[s:e], tau, work)
            if want_h:
                torch.mm(dz.to(hidden.dtype) if low else dz, weight, out=gh[s:e])
            if want_w:
                gw.addmm_(dz.t(), h_c.to(acc) if low else h_c)
            if want_b:
                gb.add_(dz.sum(0))
        gw = gw.to(weight.dtype) if (gw is not None and low) else gw
        gb = gb.to(bias.dtype) if (gb is not None and low) else gb
        return (gh, gw, gb) + nothing[3:]


def _check_hidden_args(hidden, weight, tokens, bias, temperature, chunk_size):
    """Shapes and dtypes of the fused path (values are checked only if the result is not finite)."""
    check_tensor("hidden", hidden)
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor [..., H], got dtype {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be [..., H], got a 0-D tensor")
    check_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be 2-D [V, H] with V >= 1 (the output embedding), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] with V = weight.shape[0] = {weight.shape[0]}, got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), got {bias.dtype}, {bias.device}")
    ids = None
    if tokens is not None:
        check_tensor("tokens", tokens)
        if tokens.shape != hidden.shape[:-1]:
            raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
        ids = check_ids("tokens", tokens, weight.shape[0])
    tau, chunk = _check_scaling(temperature, chunk_size)
    return ids, tau, chunk


def _check_hidden_result(out: torch.Tensor, hidden, weight, bias, ids) -> torch.Tensor:
    """Refuse a non-finite result, naming its cause (searched only once the result has failed)."""
    if bool(torch.isfinite(out).all()):
        return out
    check_finite("hidden", hidden)
    check_finite("weight", weight)
    if bias is not None:
        bad = torch.isnan(bias) | (bias == torch.inf)
        if bool(bad.any()):
            raise NonFiniteInputError("bias", f"bias contains NaN or +inf ({_first_bad(bad, bias)})")
        if not bool((bias > -torch.inf).any()):
            raise NonFiniteInputError("bias", "bias is -inf everywhere: no token has probability > 0")
        if ids is not None:
            zero = torch.isneginf(bias[ids])
            if bool(zero.any()):
                raise NonFiniteInputError("tokens", f"tokens picks tokens whose bias is -inf (probability 0; {_first_bad(zero, ids)})")
    raise NonFiniteInputError("hidden", f"hidden @ weight.T / temperature overflows to a non-finite result ({_first_bad(~torch.isfinite(out), out)})")


def _hidden_apply(hidden, weight, tokens, bias, temperature, chunk_size, need_lp, need_h):
    ids, tau, chunk = _check_hidden_args(hidden, weight, tokens if need_lp else None, bias, temperature, chunk_size)
    lead = hidden.shape[:-1]
    rows = hidden.reshape(lead.numel(), hidden.shape[-1])  # not -1: ambiguous for H = 0 (logits = bias alone)
    flat = ids.reshape(-1) if ids is not None else torch.zeros(0, dtype=torch.long, device=hidden.device)
    out = _HiddenFn.apply(rows, weight, bias, flat, tau, chunk, need_lp, need_h)
    out = out if (need_lp and need_h) else (out,)
    return tuple(_check_hidden_result(o.reshape(lead), hidden, weight, bias, ids) for o in out)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """``log pi(y)`` from the last hidden states and the output embedding, never holding the ``[N, V]`` logits.

    ``z_c = h_c W^T + b`` is computed for ``chunk_size`` rows at a time, reduced to ``lse`` and the chosen
    logit, and dropped; backward recomputes it chunk by chunk (see :mod:`grpo_ref.fused_logprobs`).

    Args:
        hidden: ``[..., H]`` float (e.g. ``[B, T, H]``, the input of ``lm_head``); row ``t`` scores ``tokens[..., t]``
            (shift by one yourself for a causal LM).
        weight: ``[V, H]`` the output embedding (``lm_head.weight``, tied or not), hidden's dtype and device.
        tokens: ``[...]`` = ``hidden.shape[:-1]`` integer ids in ``[0, V)``.
        temperature: ``tau``, finite ``> 0``: ``log_softmax((h W^T + b) / tau)``.
        bias: optional ``[V]`` (``lm_head.bias``); -inf entries mask tokens out (probability 0).
        chunk_size: int ``>= 1`` rows per chunk; working memory is one ``[chunk_size, V]`` float32 buffer in each
            pass, two with the entropy (``128 x 32000``: 16 MB each), independent of ``N``; smaller chunks make the
            matmuls less efficient (64 rows was slower at ``H = 512`` on one CPU core).

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) log-probs; gradients flow to ``hidden``, ``weight`` and
        ``bias`` in their dtype. Equals ``token_logprobs(hidden @ weight.T + bias, tokens, temperature)``.
        Non-finite inputs (NaN/inf in hidden or weight, NaN/+inf in bias) or a chosen token of probability 0 raise
        ``ValueError`` (``NonFiniteInputError``) naming the argument; they are looked
        for only when the result is not finite, so valid inputs cost no extra pass.
    """
    return _hidden_apply(hidden, weight, tokens, bias, temperature, chunk_size, True, False)[0]


def token_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax((h W^T + b) / tau)`` per row, fused as in
    :func:`token_logprobs_from_hidden` (same arguments without ``tokens``; ``[...]`` float32 result)."""
    return _hidden_apply(hidden, weight, None, bias, temperature, chunk_size, False, True)[0]


def token_logprobs_and_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 128,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` from hidden states in one chunked pass (what a PPO/GRPO step with an entropy term
    needs); arguments as in :func:`token_logprobs_from_hidden`."""
    return _hidden_apply(hidden, weight, tokens, bias, temperature, chunk_size, True, True)
