"""grpo_ref.fused_logprobs: the hand-written chunked backward (from logits) and the fused path from hidden states.

Gradients are checked with gradcheck in float64 (temperature != 1, chunk sizes that do not divide N); values and
gradients against the naive ``log_softmax(z / tau).gather(...)`` in float32 and for bf16 inputs; empty input;
-inf logits (masked vocabulary); and the memory claims: the backward from logits allocates one ``[N, V]`` float32
tensor (the gradient) and saves no copy of the logits, the fused path never allocates an ``[N, V]`` tensor.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_generator
from grpo_ref import fused_logprobs
from grpo_ref._checks import NonFiniteInputError
from grpo_ref.fused_logprobs import (
    _logits_apply,
    token_entropy_from_hidden,
    token_logprobs_and_entropy,
    token_logprobs_and_entropy_from_hidden,
    token_logprobs_from_hidden,
)

MODES = {"logp": (True, False), "entropy": (False, True), "both": (True, True)}


def _data(b, t, v, seed, dtype=torch.float64, scale=1.0):
    g = make_generator(seed)
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    return logits, torch.randint(0, v, (b, t), generator=g)


def _hidden(b, t, h, v, seed, dtype=torch.float64, scale=1.0):
    g = make_generator(seed)
    hid = (torch.randn(b, t, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale / h**0.5).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    return hid, w, bias, torch.randint(0, v, (b, t), generator=g)


def _naive(z, tokens, tau):
    """The naive pair in z's precision (upcast like the package): (log_softmax gathered, -sum p log p)."""
    zf = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
    lsm = torch.log_softmax(zf / tau, -1)
    lp = lsm.gather(-1, tokens[..., None])[..., 0]
    p = lsm.exp()
    return lp, -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)


def _pick(out, mode):
    lp, h = out
    return {"logp": (lp,), "entropy": (h,), "both": (lp, h)}[mode]


def _apply(z, tokens, tau, chunk, mode):
    return tuple(o for o in _logits_apply(z, tokens, tau, chunk, *MODES[mode]) if o is not None)


# ------------------------------------------------------------------------------------------ gradients (float64)
# B*T = 15 rows: chunk 4 does not divide 15, 1 and 100 are the extremes.
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tau", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_logits_gradcheck(mode, tau, chunk):
    z, tok = _data(3, 5, 6, seed=1)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _apply(x, tok, tau, chunk, mode), (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("copy_below", [0, 1 << 20])
def test_logits_gradcheck_non_contiguous_slice(copy_below, monkeypatch):
    """``logits[:, p - 1 : -1]`` (what the trainer passes) differentiates the same whether it is walked slice by
    slice without a copy (large inputs) or copied once (small ones)."""
    monkeypatch.setattr(fused_logprobs, "_COPY_BELOW", copy_below)
    z, tok = _data(3, 6, 5, seed=2)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs_and_entropy(x[:, 1:-1], tok[:, 1:-1], temperature=0.8, chunk_size=3), (z,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tau,chunk", [(0.7, 4), (1.0, 1), (1.6, 100)])
def test_hidden_gradcheck(mode, with_bias, tau, chunk):
    hid, w, b, tok = _hidden(3, 5, 4, 7, seed=3)
    args = [hid.requires_grad_(True), w.requires_grad_(True)] + ([b.requires_grad_(True)] if with_bias else [])

    def f(h, w, b=None):
        if mode == "logp":
            return token_logprobs_from_hidden(h, w, tok, tau, bias=b, chunk_size=chunk)
        if mode == "entropy":
            return token_entropy_from_hidden(h, w, tau, bias=b, chunk_size=chunk)
        return token_logprobs_and_entropy_from_hidden(h, w, tok, tau, bias=b, chunk_size=chunk)

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)


def test_double_backward_falls_back_to_the_dense_formula():
    """Second derivatives are not chunked: the backward, when itself recorded, uses plain differentiable ops."""
    z, tok = _data(2, 3, 5, seed=4)
    z.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: _apply(x, tok, 0.7, 4, "both"), (z,), eps=1e-6, atol=1e-7)
    hid, w, b, tok = _hidden(2, 3, 4, 5, seed=5)
    args = (hid.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradgradcheck(
        lambda h, w, b: token_logprobs_and_entropy_from_hidden(h, w, tok, 1.3, bias=b, chunk_size=4), args, eps=1e-6, atol=1e-7
    )


def test_gradient_formulas():
    """d log pi(y)/dz = (onehot - p)/tau and dH/dz = -p (log p + H)/tau, exactly as the module states."""
    tau = 0.7
    z, tok = _data(2, 3, 6, seed=6, scale=2.0)
    z.requires_grad_(True)
    lp, h = token_logprobs_and_entropy(z, tok, temperature=tau, chunk_size=4)
    g_lp, = torch.autograd.grad(lp.sum(), z, retain_graph=True)
    g_h, = torch.autograd.grad(h.sum(), z)
    p = torch.softmax(z.detach() / tau, -1)
    logp = torch.log_softmax(z.detach() / tau, -1)
    torch.testing.assert_close(g_lp, (torch.nn.functional.one_hot(tok, 6).double() - p) / tau, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_h, -p * (logp + h.detach()[..., None]) / tau, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ float32 and bf16
def _grads(outs, inputs, seed):
    g = make_generator(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_logits_float32_match_naive(tau, device):
    """float32: values within 2e-6 and gradients within 1e-6 of the naive form (float32 rounding of sums over V)."""
    z, tok = _data(4, 9, 300, seed=7, dtype=torch.float32, scale=3.0)
    z, tok = z.to(device).requires_grad_(True), tok.to(device)
    ours = token_logprobs_and_entropy(z, tok, temperature=tau, chunk_size=7)
    ref = _naive(z, tok, tau)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    for a, b in zip(_grads(ours, (z,), 8), _grads(ref, (z,), 8)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_logits_low_precision(low):
    """bf16/fp16 logits: float32 results equal to the naive form on the same (upcast) logits; gradients in the input
    dtype, equal to the naive float32 gradient rounded to it (tolerance: one ulp of the low dtype at |grad| <= 1/tau)."""
    tau = 0.8
    z, tok = _data(3, 8, 200, seed=9, dtype=torch.float32, scale=3.0)
    zl = z.to(low).requires_grad_(True)
    ours = token_logprobs_and_entropy(zl, tok, temperature=tau, chunk_size=5)
    z32 = zl.detach().float().requires_grad_(True)
    ref = _naive(z32, tok, tau)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (ga,), (gb,) = _grads(ours, (zl,), 10), _grads(ref, (z32,), 10)
    assert ga.dtype == low
    ulp = 2**-7 if low == torch.bfloat16 else 2**-10
    torch.testing.assert_close(ga.float(), gb, rtol=ulp, atol=ulp * 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_matches_naive(dtype, with_bias, device):
    """Fused from hidden == the naive form on ``h @ W.T + b`` (logits made in the same dtype, then upcast)."""
    tau = 0.9
    hid, w, b, tok = _hidden(3, 7, 16, 250, seed=11, dtype=dtype, scale=2.0)
    hid, w, b, tok = (x.to(device) for x in (hid, w, b, tok))
    b = b if with_bias else None
    ins = [hid.requires_grad_(True), w.requires_grad_(True)] + ([b.requires_grad_(True)] if with_bias else [])
    ours = token_logprobs_and_entropy_from_hidden(hid, w, tok, tau, bias=b, chunk_size=6)
    z = hid @ w.t() if b is None else torch.addmm(b, hid.reshape(-1, 16), w.t()).reshape(3, 7, 250)
    ref = _naive(z, tok, tau)
    vtol = 2e-5 if dtype == torch.float32 else 2e-2  # bf16: the chunked and the full matmul round differently
    for a, r in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=vtol, atol=vtol)
    gtol = 1e-5 if dtype == torch.float32 else 5e-2
    for a, r in zip(_grads(ours, ins, 12), _grads(ref, ins, 12)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=gtol, atol=gtol)


# ------------------------------------------------------------------------------------------ edge cases
def test_empty_input():
    z = torch.zeros(0, 4, 9, requires_grad=True)
    tok = torch.zeros(0, 4, dtype=torch.long)
    lp, h = token_logprobs_and_entropy(z, tok)
    assert lp.shape == h.shape == (0, 4) and lp.dtype == torch.float32
    (lp.sum() + h.sum()).backward()
    assert z.grad.shape == z.shape
    hid = torch.zeros(0, 4, 3, requires_grad=True)
    w = torch.randn(9, 3, requires_grad=True)
    b = torch.zeros(9, requires_grad=True)
    lp, h = token_logprobs_and_entropy_from_hidden(hid, w, tok, bias=b)
    assert lp.shape == h.shape == (0, 4)
    (lp.sum() + h.sum()).backward()
    assert hid.grad.shape == hid.shape and bool((w.grad == 0).all()) and bool((b.grad == 0).all())


def test_masked_vocabulary_minus_inf():
    """-inf logits (top-k / masked vocabulary) have probability 0: finite values, zero gradient there, as naive."""
    z, tok = _data(2, 5, 8, seed=13, scale=2.0)
    z[..., 0] = -torch.inf
    z[1, 2, 3:] = -torch.inf
    tok = torch.where(tok == 0, 1, tok)
    tok[1, 2] = 2
    z.requires_grad_(True)
    ours = token_logprobs_and_entropy(z, tok, temperature=0.7, chunk_size=3)
    ref = _naive(z, tok, 0.7)
    for a, r in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    for a, r in zip(_grads(ours, (z,), 14), _grads(ref, (z,), 14)):
        assert torch.isfinite(a).all() and bool((a[..., 0] == 0).all())
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    bad = tok.clone()
    bad[0, 0] = 0
    with pytest.raises(NonFiniteInputError, match="tokens picks tokens whose logit is -inf") as err:
        token_logprobs_and_entropy(z, bad)
    assert err.value.name == "tokens"


def test_hidden_masked_bias():
    hid, w, b, tok = _hidden(2, 4, 5, 6, seed=15)
    b[0] = -torch.inf
    tok = torch.where(tok == 0, 1, tok)
    ins = (hid.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    ours = token_logprobs_and_entropy_from_hidden(hid, w, tok, 1.2, bias=b, chunk_size=3)
    ref = _naive(torch.addmm(b, hid.reshape(-1, 5), w.t()).reshape(2, 4, 6), tok, 1.2)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    for a, r in zip(_grads(ours, ins, 16), _grads(ref, ins, 16)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    with pytest.raises(NonFiniteInputError, match="bias is -inf") as err:
        token_logprobs_and_entropy_from_hidden(hid, w, torch.where(tok == 1, 0, tok), bias=b)
    assert err.value.name == "tokens"


# ------------------------------------------------------------------------------------------ memory
class _AllocLog(TorchDispatchMode):
    """Sizes (elements) of every floating tensor newly allocated by an aten op (views of an input are skipped)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append(t.numel())
        return out


def _saved_bytes(fn, protected):
    """Bytes of the tensors autograd saves during ``fn()``, not counting those sharing ``protected``'s storage."""
    ptrs = {p.untyped_storage().data_ptr() for p in protected}
    total = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(total), out


@pytest.mark.parametrize("dtype,tau", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_logits_backward_holds_one_full_size_tensor(dtype, tau, monkeypatch):
    monkeypatch.setattr(fused_logprobs, "_COPY_BELOW", 0)  # walk the slice as a large input would be walked
    b, t, v, chunk = 4, 16, 64, 5
    n = b * t
    z, tok = _data(b, t + 2, v, seed=17, dtype=dtype, scale=2.0)
    z.requires_grad_(True)
    view = z[:, 1:-1]  # the trainer's non-contiguous slice
    saved, (lp, h) = _saved_bytes(lambda: token_logprobs_and_entropy(view, tok[:, 1:-1], temperature=tau, chunk_size=chunk), [z])
    # ids (int64), logsumexp, entropy and a few [N] float32 views of the outputs: O(N) bytes, no [N, V]
    assert saved <= n * 32, saved
    with _AllocLog() as log:
        (lp.sum() + h.sum()).backward()
    big = [s for s in log.sizes if s > chunk * v]
    assert big == [n * v] or sorted(big) == [n * v, (b * (t + 2)) * v], log.sizes  # the gradient (and its scatter into z.grad)
    assert z.grad is not None and z.grad.dtype == dtype
    # the detector works: the naive form saves a full [N, V] log-softmax
    saved_naive, _ = _saved_bytes(lambda: _naive(view, tok[:, 1:-1], tau), [z])
    assert saved_naive >= n * v * 4


def test_fused_never_allocates_logits():
    b, t, hdim, v, chunk = 4, 16, 8, 200, 8
    n = b * t
    hid, w, bias, tok = _hidden(b, t, hdim, v, seed=18, dtype=torch.float32)
    ins = (hid.requires_grad_(True), w.requires_grad_(True), bias.requires_grad_(True))
    with _AllocLog() as log:
        lp, h = token_logprobs_and_entropy_from_hidden(hid, w, tok, 0.9, bias=bias, chunk_size=chunk)
        (lp.sum() + h.sum()).backward()
    limit = max(chunk * v, v * hdim, n * hdim)
    assert max(log.sizes) <= limit < n * v, (max(log.sizes), limit)
    saved, _ = _saved_bytes(lambda: token_logprobs_from_hidden(hid, w, tok, 0.9, bias=bias, chunk_size=chunk), ins)
    assert saved <= n * 32, saved
    assert all(x.grad is not None for x in ins)


def test_no_grad_forward_is_chunked():
    z, tok = _data(4, 8, 64, seed=19, dtype=torch.bfloat16)
    with torch.no_grad(), _AllocLog() as log:
        token_logprobs_and_entropy(z, tok, temperature=0.7, chunk_size=5)
    assert max(log.sizes) <= 5 * 64


# ------------------------------------------------------------------------------------------ bad input
def _good():
    hid, w, b, tok = _hidden(2, 3, 4, 5, seed=20, dtype=torch.float32)
    return dict(hidden=hid, weight=w, tokens=tok, bias=b)


@pytest.mark.parametrize(
    "change,arg,match",
    [
        (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.long)), "hidden", "floating-point"),
        (dict(hidden=torch.zeros(())), "hidden", "0-D"),
        (dict(hidden=[1.0]), "hidden", "torch.Tensor"),
        (dict(weight=torch.zeros(5)), "weight", r"\[V, H\]"),
        (dict(weight=torch.zeros(5, 3)), "weight", "H = hidden.shape"),
        (dict(weight=torch.zeros(5, 4, dtype=torch.float64)), "weight", "dtype"),
        (dict(bias=torch.zeros(4)), "bias", r"\[V\]"),
        (dict(bias=torch.zeros(5, dtype=torch.float64)), "bias", "dtype"),
        (dict(tokens=torch.zeros(2, 4, dtype=torch.long)), "tokens", "shape"),
        (dict(tokens=torch.full((2, 3), 5)), "tokens", r"\[0, 5\)"),
        (dict(tokens=torch.zeros(2, 3)), "tokens", "integer"),
        (dict(temperature=0.0), "temperature", "> 0"),
        (dict(temperature=float("nan")), "temperature", "finite"),
        (dict(chunk_size=0), "chunk_size", ">= 1"),
        (dict(chunk_size=2.0), "chunk_size", "int"),
    ],
)
def test_hidden_bad_input(change, arg, match):
    kw = {**_good(), **change}
    with pytest.raises(ValueError, match=match) as err:
        token_logprobs_from_hidden(**kw)
    assert arg in str(err.value)


@pytest.mark.parametrize("arg,value", [("hidden", float("nan")), ("weight", float("inf")), ("bias", float("nan"))])
def test_hidden_non_finite_named(arg, value):
    kw = _good()
    kw[arg] = kw[arg].clone()
    kw[arg].view(-1)[1] = value
    with pytest.raises(NonFiniteInputError, match=arg) as err:
        token_logprobs_from_hidden(**kw)
    assert err.value.name == arg
    with pytest.raises(NonFiniteInputError):
        token_entropy_from_hidden(kw["hidden"], kw["weight"], bias=kw["bias"])


def test_hidden_overflow_named():
    kw = _good()
    kw["hidden"] = kw["hidden"] * 1e30
    kw["weight"] = kw["weight"] * 1e30
    with pytest.raises(NonFiniteInputError, match="overflows"):
        token_logprobs_from_hidden(**kw)
