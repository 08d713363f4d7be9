"""The contract of ``grpo_ref.fused_logprobs``, pinned for mutation testing: the chunked autograd functions from
logits (``token_logprobs_and_entropy``) and from hidden states (``token_*_from_hidden``).

* refusals: a ``ValueError`` naming the caller's argument as a whole word, for each check and each argument
  (``hidden``, ``weight``, ``bias``, ``tokens``, ``logits``, ``temperature``, ``chunk_size``), each bound at its edge
  (accepted at it, refused just past it); non-finite inputs raise ``NonFiniteInputError`` whose ``.name`` is the
  argument to blame;
* values and first derivatives equal the naive ``log_softmax(z / tau).gather(...)`` / ``-sum p log p`` through
  autograd, in float64 to 1e-12, for each output set (log-probs, entropy, both), with and without bias, at
  ``tau`` = 1, 2 and 0.5, whatever the chunking (``N`` not a multiple of the chunk, chunk 1, chunk = ``N``,
  chunk > ``N``), whichever inputs require a gradient and whichever outputs receive one; the double-backward
  fallback gives the same first derivatives; gradcheck/gradgradcheck in float64;
* dtypes: float64 stays float64 (outputs and gradients), bf16 gives float32 outputs and bf16 gradients;
* the inputs are never written to, a second call gives the same result, and the working memory is the documented
  one: one ``[chunk, V]`` buffer per pass for the log-probs, two with the entropy.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_generator
from grpo_ref import fused_logprobs
from grpo_ref._checks import NonFiniteInputError
from grpo_ref.fused_logprobs import (
    token_entropy_from_hidden,
    token_logprobs_and_entropy,
    token_logprobs_and_entropy_from_hidden,
    token_logprobs_from_hidden,
)

B, T, H, V = 2, 3, 4, 9  # N = 6 rows; H < V and all sizes distinct: a bound read from the wrong dimension is seen
MODES = ("logp", "entropy", "both")


def _names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def _randn(*shape, seed, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, generator=make_generator(seed), dtype=torch.float64).mul(scale).to(dtype)


def _inputs(dtype=torch.float64, lead=(B, T), seed=0):
    hid = _randn(*lead, H, seed=seed, dtype=dtype, scale=2.0)
    w = _randn(V, H, seed=seed + 1, dtype=dtype)
    b = _randn(V, seed=seed + 2, dtype=dtype)
    tok = torch.randint(0, V, lead, generator=make_generator(seed + 3))
    return hid, w, b, tok


def _naive(z, tok, tau):
    """``(log_softmax(z / tau) gathered, -sum_v p_v log p_v)`` with autograd's own backward (``p_v = 0`` adds 0)."""
    zf = z if z.dtype == torch.float64 else z.float()
    logp = torch.log_softmax(zf / tau, -1)
    p = logp.exp()
    lp = None if tok is None else logp.gather(-1, tok[..., None])[..., 0]
    return lp, -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def _naive_logits(hid, w, b):
    z = hid.reshape(hid.shape[:-1].numel(), hid.shape[-1]) @ w.t()
    z = z if b is None else z + b
    return z.reshape(*hid.shape[:-1], w.shape[0])


def _hidden_call(mode, hid, w, tok, tau=1.0, bias=None, chunk=128):
    """The public function for ``mode``, as a tuple of outputs."""
    if mode == "logp":
        return (token_logprobs_from_hidden(hid, w, tok, tau, bias=bias, chunk_size=chunk),)
    if mode == "entropy":
        return (token_entropy_from_hidden(hid, w, tau, bias=bias, chunk_size=chunk),)
    return token_logprobs_and_entropy_from_hidden(hid, w, tok, tau, bias=bias, chunk_size=chunk)


def _naive_hidden(mode, hid, w, tok, tau=1.0, bias=None):
    lp, h = _naive(_naive_logits(hid, w, bias), tok, tau)
    return {"logp": (lp,), "entropy": (h,), "both": (lp, h)}[mode]


def _logits_call(mode, z, tok, tau=1.0, chunk=1024):
    lp, h = token_logprobs_and_entropy(z, tok, temperature=tau, chunk_size=chunk)
    return {"logp": (lp,), "entropy": (h,), "both": (lp, h)}[mode]


def _naive_logits_call(mode, z, tok, tau=1.0):
    lp, h = _naive(z, tok, tau)
    return {"logp": (lp,), "entropy": (h,), "both": (lp, h)}[mode]


def _weights(outs, seed=7):
    return [_randn(*o.shape, seed=seed + i, dtype=o.dtype) for i, o in enumerate(outs)]


def _loss(outs, weights):
    return sum((o * w).sum() for o, w in zip(outs, weights))


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _refused(fn, arg, exc=ValueError):
    with pytest.raises(exc) as err:
        fn()
    assert _names(str(err.value), arg), (arg, str(err.value))
    return err.value


# ------------------------------------------------------------------------------------------ refusals from hidden
def _good(dtype=torch.float32):
    hid, w, b, tok = _inputs(dtype)
    return dict(hidden=hid, weight=w, tokens=tok, bias=b, temperature=1.0, chunk_size=4)


def _call_hidden_kw(mode, kw):
    kw = dict(kw)
    if mode == "entropy":
        kw.pop("tokens")
        return token_entropy_from_hidden(**kw)
    fn = token_logprobs_from_hidden if mode == "logp" else token_logprobs_and_entropy_from_hidden
    return fn(**kw)


_META = dict(device="meta")
HIDDEN_BAD = [
    ("hidden", [1.0]), ("hidden", torch.zeros(B, T, H, dtype=torch.long)), ("hidden", torch.zeros(B, T, H, dtype=torch.complex64)),
    ("hidden", torch.zeros(B, T, H, dtype=torch.bool)), ("hidden", torch.tensor(1.0)),
    ("weight", [[1.0]]), ("weight", torch.zeros(V * H)), ("weight", torch.zeros(1, V, H)), ("weight", torch.zeros(0, H)),
    ("weight", torch.zeros(V, H + 1)), ("weight", torch.zeros(V, H, dtype=torch.float64)), ("weight", torch.zeros(V, H, **_META)),
    ("weight", torch.zeros(V, H, dtype=torch.complex64)),
    ("bias", [0.0] * V), ("bias", torch.zeros(H)), ("bias", torch.zeros(V + 1)), ("bias", torch.zeros(1, V)),
    ("bias", torch.zeros(V, dtype=torch.float64)), ("bias", torch.zeros(V, **_META)), ("bias", torch.zeros(V, dtype=torch.complex64)),
    ("temperature", 0.0), ("temperature", -0.0), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", True),
    ("chunk_size", 0), ("chunk_size", -1), ("chunk_size", 2.0), ("chunk_size", True),
]
TOKENS_BAD = [[0] * T, torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.complex64),
              torch.zeros(B, T - 1, dtype=torch.long), torch.zeros(B, T, 1, dtype=torch.long), torch.zeros(T, B, dtype=torch.long),
              torch.full((B, T), V), torch.full((B, T), -1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arg,value", HIDDEN_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(HIDDEN_BAD)])
def test_hidden_argument_refused_by_name(mode, arg, value):
    kw = {**_good(), arg: value}
    if arg == "hidden" and torch.is_tensor(value) and value.dim() == 0:
        kw["tokens"] = torch.tensor(0)
    err = _refused(lambda: _call_hidden_kw(mode, kw), arg)
    if arg in ("temperature", "chunk_size"):
        assert str(value) in str(err)


@pytest.mark.parametrize("mode", ["logp", "both"])
@pytest.mark.parametrize("tokens", TOKENS_BAD, ids=[f"tokens-{i}" for i in range(len(TOKENS_BAD))])
def test_hidden_tokens_refused_by_name(mode, tokens):
    err = _refused(lambda: _call_hidden_kw(mode, {**_good(), "tokens": tokens}), "tokens")
    if torch.is_tensor(tokens) and tokens.dtype == torch.long and tokens.shape != (B, T):
        assert str(tuple(tokens.shape)) in str(err) and str((B, T)) in str(err)  # the shape got and the one wanted


@pytest.mark.parametrize(
    "arg,value,wanted",
    [("weight", torch.zeros(V, H + 1), f"= {H}"), ("bias", torch.zeros(H), f"= {V}"), ("bias", torch.zeros(V + 1), f"= {V}")],
)
def test_hidden_shape_refusals_show_the_wanted_size(arg, value, wanted):
    err = _refused(lambda: token_logprobs_from_hidden(**{**_good(), arg: value}), arg)
    assert wanted in str(err) and str(tuple(value.shape)) in str(err)


@pytest.mark.parametrize("mode", MODES)
def test_hidden_edges_accepted(mode):
    """The edges of the domain: ``V = 1``, a single row ``[H]``, ids ``0`` and ``V - 1``, chunk 1, the smallest
    positive temperature."""
    hid, w, b, tok = _inputs()
    one = _hidden_call(mode, hid, w[:1], torch.zeros(B, T, dtype=torch.long), bias=b[:1])
    assert all(o.shape == (B, T) and bool((o == 0).all()) for o in one)  # one token: probability 1
    for edge in (0, V - 1):
        t = torch.full((B, T), edge)
        for a, r in zip(_hidden_call(mode, hid, w, t, bias=b, chunk=1), _naive_hidden(mode, hid, w, t, bias=b)):
            _close(a, r)
    row = _hidden_call(mode, hid[0, 0], w, tok[0, 0], bias=b)
    for a, r in zip(row, _naive_hidden(mode, hid[0, 0], w, tok[0, 0], bias=b)):
        assert a.shape == () and a.dtype == torch.float64
        _close(a, r)
    flat = _hidden_call(mode, torch.zeros(B, T, H, dtype=torch.float64), w, tok, 5e-324)  # 0 / tau = 0: uniform
    log_v = torch.tensor(float(V), dtype=torch.float64).log()
    want = {"logp": (-log_v,), "entropy": (log_v,), "both": (-log_v, log_v)}[mode]
    for a, r in zip(flat, want):
        _close(a, r.expand(B, T))


@pytest.mark.parametrize("mode", MODES)
def test_weight_vocabulary_edge(mode):
    """``V >= 1`` is refused at ``V = 0`` naming ``weight`` (without a bias that would be refused first)."""
    kw = {**_good(), "weight": torch.zeros(0, H), "bias": None}
    err = _refused(lambda: _call_hidden_kw(mode, kw), "weight")
    assert "V >= 1" in str(err)


@pytest.mark.parametrize("mode", MODES)
def test_hidden_size_zero_accepted(mode):
    """``H = 0`` passes the checks and is legal: the logits are then the bias alone."""
    hid, w, b, tok = _inputs()
    outs = _hidden_call(mode, hid[..., :0], w[:, :0], tok, 2.0, b)
    for a, r in zip(outs, _naive_hidden(mode, hid[..., :0], w[:, :0], tok, 2.0, b)):
        _close(a, r)


def test_weight_dtype_refusal_names_both():
    err = _refused(lambda: token_logprobs_from_hidden(**{**_good(), "weight": torch.zeros(V, H, dtype=torch.float64)}), "weight")
    assert _names(str(err), "hidden")


# ------------------------------------------------------------------------------------------ refusals from logits
def _logits(dtype=torch.float64, seed=20, shape=(B, T, V)):
    return _randn(*shape, seed=seed, dtype=dtype, scale=2.0), torch.randint(0, V, shape[:-1], generator=make_generator(seed + 1))


LOGITS_BAD = [
    ("logits", dict(logits=[1.0])), ("logits", dict(logits=torch.zeros(B, T, V, dtype=torch.long))),
    ("logits", dict(logits=torch.zeros(B, T, V, dtype=torch.complex64))), ("logits", dict(logits=torch.zeros(B, T, 0))),
    ("logits", dict(logits=torch.tensor(0.0), tokens=torch.tensor(0))),
    *[("tokens", dict(tokens=t)) for t in TOKENS_BAD],
    ("temperature", dict(temperature=0.0)), ("temperature", dict(temperature=-0.0)), ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=True)), ("chunk_size", dict(chunk_size=0)), ("chunk_size", dict(chunk_size=1.0)),
    ("chunk_size", dict(chunk_size=True)),
]


@pytest.mark.parametrize("arg,change", LOGITS_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(LOGITS_BAD)])
def test_logits_argument_refused_by_name(arg, change):
    z, tok = _logits()
    kw = {"logits": z, "tokens": tok, **change}
    err = _refused(lambda: token_logprobs_and_entropy(**kw), arg)
    t = change.get("tokens")
    if arg == "tokens" and torch.is_tensor(t) and t.dtype == torch.long and t.shape != (B, T):
        assert str(tuple(t.shape)) in str(err) and str((B, T)) in str(err)  # the shape got and the one wanted


def test_logits_edges_accepted():
    z, tok = _logits()
    for edge in (0, V - 1):
        t = torch.full((B, T), edge)
        for a, r in zip(token_logprobs_and_entropy(z, t, chunk_size=1), _naive(z, t, 1.0)):
            _close(a, r)
    one = token_logprobs_and_entropy(z[..., :1], torch.zeros(B, T, dtype=torch.long))
    assert all(bool((o == 0).all()) for o in one)
    single = token_logprobs_and_entropy(z[0, 0], tok[0, 0])
    for a, r in zip(single, _naive(z[0, 0], tok[0, 0], 1.0)):
        assert a.shape == ()
        _close(a, r)
    flat = token_logprobs_and_entropy(torch.zeros(B, T, V, dtype=torch.float64), tok, temperature=5e-324)
    log_v = float(torch.tensor(float(V), dtype=torch.float64).log())
    _close(flat[0], torch.full((B, T), -log_v, dtype=torch.float64))
    _close(flat[1], torch.full((B, T), log_v, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ non-finite, named
@pytest.mark.parametrize("bad,word", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_logits_nonfinite_named(bad, word):
    z, tok = _logits()
    z[1, 2, 3] = bad
    err = _refused(lambda: token_logprobs_and_entropy(z, tok), "logits", NonFiniteInputError)
    assert err.name == "logits" and "[1, 2, 3]" in str(err) and word in str(err).lower()
    z, tok = _logits()
    z[1, 2] = -torch.inf
    err = _refused(lambda: token_logprobs_and_entropy(z, tok), "logits", NonFiniteInputError)
    assert err.name == "logits" and "[1, 2]" in str(err)
    z, tok = _logits()
    z[1, 2, tok[1, 2]] = -torch.inf
    err = _refused(lambda: token_logprobs_and_entropy(z, tok), "tokens", NonFiniteInputError)
    assert err.name == "tokens" and "[1, 2]" in str(err)
    z, tok = _logits(torch.float32)
    z[1, 2, 0] = 3e38
    err = _refused(lambda: token_logprobs_and_entropy(z, tok, temperature=1e-3), "logits", NonFiniteInputError)
    assert err.name == "logits" and "overflow" in str(err) and "[1, 2]" in str(err)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arg", ["hidden", "weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_hidden_or_weight_nonfinite_named(mode, arg, bad):
    kw = _good()
    kw[arg] = kw[arg].clone()
    kw[arg].view(-1)[1] = bad
    err = _refused(lambda: _call_hidden_kw(mode, kw), arg, NonFiniteInputError)
    assert err.name == arg


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bias_nan_or_inf_named_with_index(mode, bad):
    kw = _good()
    kw["bias"] = kw["bias"].clone()
    kw["bias"][V - 2] = bad
    err = _refused(lambda: _call_hidden_kw(mode, kw), "bias", NonFiniteInputError)
    assert err.name == "bias" and f"[[{V - 2}]]" in str(err)


@pytest.mark.parametrize("mode", MODES)
def test_bias_minus_inf(mode):
    """A -inf bias masks a token out (legal); -inf everywhere is refused naming ``bias``; a chosen token of
    probability 0 is refused naming ``tokens`` (for the entropy there is no chosen token)."""
    kw = _good(torch.float64)
    kw["bias"] = kw["bias"].clone()
    kw["bias"][0] = -torch.inf
    kw["tokens"] = torch.where(kw["tokens"] == 0, 1, kw["tokens"])
    for a, r in zip(_call_hidden_kw(mode, kw) if mode == "both" else (_call_hidden_kw(mode, kw),),
                    _naive_hidden(mode, kw["hidden"], kw["weight"], kw["tokens"], bias=kw["bias"])):
        _close(a, r)
    dead = {**kw, "bias": torch.full((V,), -torch.inf, dtype=torch.float64)}
    err = _refused(lambda: _call_hidden_kw(mode, dead), "bias", NonFiniteInputError)
    assert err.name == "bias"
    picked = {**kw, "tokens": kw["tokens"].clone()}
    picked["tokens"][1, 2] = 0
    if mode == "entropy":
        _call_hidden_kw(mode, picked)  # no token is chosen: legal
    else:
        err = _refused(lambda: _call_hidden_kw(mode, picked), "tokens", NonFiniteInputError)
        assert err.name == "tokens" and "[1, 2]" in str(err)


@pytest.mark.parametrize("mode", MODES)
def test_hidden_overflow_named(mode):
    """Finite inputs whose logits overflow: ``hidden`` is named (also with a masked, -inf, bias entry)."""
    kw = _good()
    kw["hidden"], kw["weight"] = kw["hidden"] * 1e30, kw["weight"] * 1e30
    kw["bias"] = kw["bias"].clone()
    kw["bias"][0] = -torch.inf
    kw["tokens"] = torch.where(kw["tokens"] == 0, 1, kw["tokens"])
    err = _refused(lambda: _call_hidden_kw(mode, kw), "hidden", NonFiniteInputError)
    assert err.name == "hidden" and "overflow" in str(err)


@pytest.mark.parametrize("mode", MODES)
def test_hidden_overflow_shows_its_position(mode):
    """Only row ``[1, 2]`` overflows once divided by a tiny temperature: the message shows that position."""
    kw = {**_good(), "temperature": 1e-9}
    kw["hidden"] = kw["hidden"].clone()
    kw["hidden"][1, 2] = 1e30
    err = _refused(lambda: _call_hidden_kw(mode, kw), "hidden", NonFiniteInputError)
    assert err.name == "hidden" and "[1, 2]" in str(err)


# ------------------------------------------------------------------------------------------ values and gradients
# N = 6 rows: chunk 1, 4 (does not divide 6), 6 (= N), 100 (> N)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 4, 6, 100])
def test_hidden_values_and_gradients_float64(mode, with_bias, tau, chunk):
    hid, w, b, tok = _inputs()
    b = b if with_bias else None
    ours_in = [x.clone().requires_grad_(True) for x in (hid, w) + ((b,) if with_bias else ())]
    ref_in = [x.detach().clone().requires_grad_(True) for x in ours_in]
    ours = _hidden_call(mode, ours_in[0], ours_in[1], tok, tau, ours_in[2] if with_bias else None, chunk)
    ref = _naive_hidden(mode, ref_in[0], ref_in[1], tok, tau, ref_in[2] if with_bias else None)
    for a, r in zip(ours, ref):
        assert a.dtype == torch.float64 and a.shape == (B, T)
        _close(a, r)
    wts = _weights(ours)
    _loss(ours, wts).backward()
    _loss(ref, wts).backward()
    for a, r in zip(ours_in, ref_in):
        assert a.grad.dtype == torch.float64
        _close(a.grad, r.grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 4, 6, 100])
def test_logits_values_and_gradients_float64(mode, tau, chunk):
    z, tok = _logits()
    a = z.clone().requires_grad_(True)
    r = z.clone().requires_grad_(True)
    ours, ref = _logits_call(mode, a, tok, tau, chunk), _naive_logits_call(mode, r, tok, tau)
    for x, y in zip(ours, ref):
        assert x.dtype == torch.float64
        _close(x, y)
    wts = _weights(ours)
    _loss(ours, wts).backward()
    _loss(ref, wts).backward()
    assert a.grad.dtype == torch.float64
    _close(a.grad, r.grad)


@pytest.mark.parametrize("needs", ["h", "w", "b", "hw", "hb", "wb", "hwb"])
@pytest.mark.parametrize("mode", MODES)
def test_hidden_gradient_only_where_required(needs, mode):
    """Each subset of (hidden, weight, bias) requiring a gradient gets exactly the naive one; the others none."""
    hid, w, b, tok = _inputs()
    ours_in = [x.clone().requires_grad_(k in needs) for k, x in zip("hwb", (hid, w, b))]
    ref_in = [x.clone().requires_grad_(k in needs) for k, x in zip("hwb", (hid, w, b))]
    ours = _hidden_call(mode, ours_in[0], ours_in[1], tok, 2.0, ours_in[2], chunk=4)
    ref = _naive_hidden(mode, ref_in[0], ref_in[1], tok, 2.0, ref_in[2])
    wts = _weights(ours)
    _loss(ours, wts).backward()
    _loss(ref, wts).backward()
    for k, a, r in zip("hwb", ours_in, ref_in):
        if k in needs:
            _close(a.grad, r.grad)
        else:
            assert a.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("needs", ["h", "w", "b", "hwb", "hw-nobias"])
def test_low_precision_gradients_where_required(dtype, needs):
    """bf16/fp16 (e.g. a frozen ``lm_head``): float32 outputs, gradients in the input dtype, close to the naive
    float32 gradient on the same (upcast) logits, only for the inputs that require one."""
    hid, w, b, tok = _inputs(torch.float32)
    hid, w, b = (x.to(dtype) for x in (hid, w, b))
    b = None if needs.endswith("nobias") else b
    ins = [x if x is None else x.clone().requires_grad_(k in needs) for k, x in zip("hwb", (hid, w, b))]
    ref_in = [x if x is None else x.detach().float().requires_grad_(k in needs) for k, x in zip("hwb", ins)]
    ours = _hidden_call("both", ins[0], ins[1], tok, 0.8, ins[2], chunk=4)
    z = _naive_logits(ref_in[0], ref_in[1], ref_in[2])
    ref = _naive(z, tok, 0.8)
    for a, r in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
    wts = _weights(ours)
    _loss(ours, wts).backward()
    _loss(ref, wts).backward()
    for k, a, r in zip("hwb", ins, ref_in):
        if a is None:
            continue
        if k in needs:
            assert a.grad.dtype == dtype
            torch.testing.assert_close(a.grad.float(), r.grad, rtol=5e-2, atol=5e-2)
        else:
            assert a.grad is None


@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_both_outputs_with_one_used(used):
    """``(logp, entropy)`` where the loss uses only one of them: the gradient is that one's."""
    k = 0 if used == "logp" else 1
    z, tok = _logits()
    a, r = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    token_logprobs_and_entropy(a, tok, temperature=2.0, chunk_size=4)[k].sum().backward()
    _naive(r, tok, 2.0)[k].sum().backward()
    _close(a.grad, r.grad)
    hid, w, b, tok = _inputs()
    ours_in = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    ref_in = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    token_logprobs_and_entropy_from_hidden(*ours_in[:2], tok, 2.0, bias=ours_in[2], chunk_size=4)[k].sum().backward()
    _naive_hidden("both", *ref_in[:2], tok, 2.0, ref_in[2])[k].sum().backward()
    for x, y in zip(ours_in, ref_in):
        _close(x.grad, y.grad)


class _NoGrad(torch.autograd.Function):
    """Identity whose backward sends no gradient (None) upstream."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None


@pytest.mark.parametrize("mode", MODES)
def test_no_incoming_gradient_gives_none(mode):
    """An output whose gradient is None (and not materialised as zeros) contributes nothing and raises nothing."""
    z, tok = _logits()
    z.requires_grad_(True)
    outs = _logits_call(mode, z, tok, 2.0, 4)
    (sum(_NoGrad.apply(o).sum() for o in outs) + z.sum()).backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    hid, w, b, tok = _inputs()
    ins = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    outs = _hidden_call(mode, ins[0], ins[1], tok, 2.0, ins[2], chunk=4)
    (sum(_NoGrad.apply(o).sum() for o in outs) + sum(x.sum() for x in ins)).backward()
    assert all(torch.equal(x.grad, torch.ones_like(x)) for x in ins)


def _masked_logits():
    z, tok = _logits()
    z[..., 0] = -torch.inf
    z[1, 2, 3:] = -torch.inf
    tok = torch.where(tok == 0, 1, tok)
    tok[1, 2] = 2
    return z, tok


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_masked_vocabulary_gradients(mode, tau):
    """-inf logits (or bias): probability 0, finite values, gradient 0 there, as the naive form (each output set)."""
    z, tok = _masked_logits()
    a, r = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ours, ref = _logits_call(mode, a, tok, tau, 4), _naive_logits_call(mode, r, tok, tau)
    wts = _weights(ours)
    _loss(ours, wts).backward()
    _loss(ref, wts).backward()
    for x, y in zip(ours, ref):
        _close(x, y)
    assert torch.isfinite(a.grad).all() and bool((a.grad[..., 0] == 0).all())
    _close(a.grad, r.grad)
    hid, w, b, tok = _inputs()
    b[0] = -torch.inf
    tok = torch.where(tok == 0, 1, tok)
    ours_in = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    ref_in = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    ours = _hidden_call(mode, ours_in[0], ours_in[1], tok, tau, ours_in[2], chunk=4)
    ref = _naive_hidden(mode, ref_in[0], ref_in[1], tok, tau, ref_in[2])
    _loss(ours, wts).backward()
    _loss(ref, wts).backward()
    for x, y in zip(ours_in, ref_in):
        assert torch.isfinite(x.grad).all()
        _close(x.grad, y.grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_double_backward_fallback_first_derivative(mode, masked):
    """With ``create_graph=True`` the backward is the dense differentiable fallback: its first derivative equals the
    chunked one and the naive one (also with -inf logits / bias), and it is itself differentiable."""
    tau = 2.0
    z, tok = _masked_logits() if masked else _logits()
    z.requires_grad_(True)
    outs = _logits_call(mode, z, tok, tau, 4)
    wts = _weights(outs)
    dense, = torch.autograd.grad(_loss(outs, wts), z, create_graph=True)
    chunked, = torch.autograd.grad(_loss(_logits_call(mode, z, tok, tau, 4), wts), z)
    naive, = torch.autograd.grad(_loss(_naive_logits_call(mode, z, tok, tau), wts), z)
    assert dense.requires_grad and dense.dtype == torch.float64
    _close(dense, chunked)
    _close(dense, naive)
    hid, w, b, tok = _inputs()
    if masked:
        b[0] = -torch.inf
        tok = torch.where(tok == 0, 1, tok)
    for with_bias in (False, True):
        ins = [x.clone().requires_grad_(True) for x in ((hid, w, b) if with_bias else (hid, w))]
        bias = ins[2] if with_bias else None
        outs = _hidden_call(mode, ins[0], ins[1], tok, tau, bias, chunk=4)
        dense = torch.autograd.grad(_loss(outs, wts), ins, create_graph=True)
        naive = torch.autograd.grad(_loss(_naive_hidden(mode, ins[0], ins[1], tok, tau, bias), wts), ins)
        for d, n in zip(dense, naive):
            assert d.requires_grad
            _close(d, n)


def test_double_backward_fallback_low_precision():
    """The dense fallback for bf16 inputs: gradients in bf16, close to the naive float32 ones on the same inputs."""
    hid, w, b, tok = _inputs(torch.float32)
    ins = [x.to(torch.bfloat16).requires_grad_(True) for x in (hid, w, b)]
    ref_in = [x.detach().float().requires_grad_(True) for x in ins]
    outs = _hidden_call("both", ins[0], ins[1], tok, 0.8, ins[2], chunk=4)
    wts = _weights(outs)
    dense = torch.autograd.grad(_loss(outs, wts), ins, create_graph=True)
    naive = torch.autograd.grad(_loss(_naive(_naive_logits(*ref_in), tok, 0.8), wts), ref_in)
    for d, n in zip(dense, naive):
        assert d.dtype == torch.bfloat16
        torch.testing.assert_close(d.float(), n, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_and_gradgradcheck_float64(mode, with_bias):
    """Small (N = 3 rows in chunks of 2, H = 2, V = 4) so that the numerical second derivatives stay cheap."""
    hid, w, b = _randn(3, 2, seed=50), _randn(4, 2, seed=51), _randn(4, seed=52)
    tok = torch.tensor([3, 0, 2])
    args = [hid.requires_grad_(True), w.requires_grad_(True)] + ([b.requires_grad_(True)] if with_bias else [])

    def f(*xs):
        return _hidden_call(mode, xs[0], xs[1], tok, 2.0, xs[2] if with_bias else None, chunk=2)

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)
    if mode == "both":  # the fallback's first derivative is checked per mode above; its own derivative once here
        assert torch.autograd.gradgradcheck(f, tuple(args), eps=1e-6, atol=1e-7)
    if not with_bias:
        z = _randn(3, 4, seed=53)
        z.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: _logits_call(mode, x, tok, 2.0, 2), (z,), eps=1e-6, atol=1e-7)
        if mode == "both":
            assert torch.autograd.gradgradcheck(lambda x: _logits_call(mode, x, tok, 2.0, 2), (z,), eps=1e-6, atol=1e-7)


def test_defaults():
    """Documented defaults: ``temperature = 1`` (same as passing it, not as 2) and no bias; the default chunk size
    changes no value."""
    hid, w, b, tok = _inputs()
    z, ztok = _logits()
    calls = [
        lambda **kw: (token_logprobs_from_hidden(hid, w, tok, **kw),),
        lambda **kw: (token_entropy_from_hidden(hid, w, **kw),),
        lambda **kw: token_logprobs_and_entropy_from_hidden(hid, w, tok, **kw),
        lambda **kw: token_logprobs_and_entropy(z, ztok, **kw),
    ]
    for fn in calls:
        for a, one, two, c1 in zip(fn(), fn(temperature=1.0), fn(temperature=2.0), fn(chunk_size=1)):
            assert torch.equal(a, one) and not torch.allclose(a, two)
            _close(a, c1)
    for a, r in zip(token_logprobs_and_entropy_from_hidden(hid, w, tok), _naive_hidden("both", hid, w, tok)):
        _close(a, r)


# ------------------------------------------------------------------------------------------ non-viewable layouts
def _slices():
    """Non-viewable logits, as the trainer passes them: ``[B, T, V]``, ``[2, B, T, V]`` and ``[1, B, T, V]`` slices
    along ``T`` (the last is walked along a leading dimension of size 1)."""
    base3 = _randn(B, T + 2, V, seed=60, scale=2.0)
    tok3 = torch.randint(0, V, (B, T), generator=make_generator(62))
    out = [(base3, lambda x: x[:, 1:-1], tok3)]
    for lead in (2, 1):
        base4 = _randn(lead, B, T + 2, V, seed=61, scale=2.0)
        tok4 = torch.randint(0, V, (lead, B, T), generator=make_generator(63))
        out.append((base4, lambda x: x[:, :, 1:-1], tok4))
    return out


@pytest.mark.parametrize("copy_below", [0, 1 << 20])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_non_viewable_logits_walked_or_copied(copy_below, chunk, monkeypatch):
    """A non-viewable slice gives the naive values and gradients, whether it is walked along its leading
    dimensions (large input) or copied once (small one)."""
    monkeypatch.setattr(fused_logprobs, "_COPY_BELOW", copy_below)
    for base, cut, tok in _slices():
        a, r = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
        ours = token_logprobs_and_entropy(cut(a), tok, temperature=2.0, chunk_size=chunk)
        ref = _naive(cut(r), tok, 2.0)
        for x, y in zip(ours, ref):
            _close(x, y)
        wts = _weights(ours)
        _loss(ours, wts).backward()
        _loss(ref, wts).backward()
        _close(a.grad, r.grad)


def test_copy_below_edge(monkeypatch):
    """Documented: a non-viewable input of at most ``_COPY_BELOW`` elements is copied once, a larger one is walked
    without a copy (in both passes)."""
    base, cut, tok = _slices()[0]
    n_el = cut(base).numel()
    for limit, copies in ((n_el, 1), (n_el - 1, 0)):
        monkeypatch.setattr(fused_logprobs, "_COPY_BELOW", limit)
        z = base.clone().requires_grad_(True)
        with _BigAllocations(n_el) as log:
            lp, h = token_logprobs_and_entropy(cut(z), tok, chunk_size=4)
        assert log.count == copies
        with _BigAllocations(n_el) as log:
            (lp.sum() + h.sum()).backward()
        # the [N, V] gradient buffer, its scatter into z.grad, and the copy for the small input
        assert log.count == 2 + copies


# ------------------------------------------------------------------------------------------ aliasing and memory
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_inputs_never_written_and_calls_repeat(dtype, tau):
    z, ztok = _logits(dtype)
    hid, w, b, tok = _inputs(dtype)
    keep = [x.clone() for x in (z, ztok, hid, w, b, tok)]
    for x in (z, hid, w, b):
        x.requires_grad_(True)
    results = []
    for _ in range(2):
        outs = (token_logprobs_and_entropy(z, ztok, temperature=tau, chunk_size=4)
                + token_logprobs_and_entropy_from_hidden(hid, w, tok, tau, bias=b, chunk_size=4))
        sum(o.sum() for o in outs).backward()
        results.append([o.detach() for o in outs] + [x.grad.clone() for x in (z, hid, w, b)])
        for x in (z, hid, w, b):
            x.grad = None
    for x, k in zip((z, ztok, hid, w, b, tok), keep):
        assert torch.equal(x.detach(), k)
    for a, r in zip(*results):
        assert torch.equal(a, r)


class _BigAllocations(TorchDispatchMode):
    """Counts the float32/float64 tensors of ``size`` elements or more newly allocated by aten ops in the mode."""

    def __init__(self, size):
        super().__init__()
        self.size, self.count = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64) and t.numel() >= self.size
                    and t.untyped_storage().data_ptr() not in seen):
                self.count += 1
        return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_work_buffers(mode, dtype):
    """Documented working memory of the fused path: one ``[chunk, V]`` float buffer per pass for the log-probs,
    two with the entropy, whatever ``N`` (12 rows in 3 chunks of 4; ``V * H`` and ``N * H`` are smaller)."""
    chunk, v, hdim = 4, 64, 3
    g = make_generator(30)
    hid = torch.randn(3, 4, hdim, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(v, hdim, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(v, generator=g).to(dtype).requires_grad_(True)
    tok = torch.randint(0, v, (3, 4), generator=g)
    want = 1 if mode == "logp" else 2
    with _BigAllocations(chunk * v) as log:
        outs = _hidden_call(mode, hid, w, tok, 0.9, b, chunk)
    assert log.count == want
    with _BigAllocations(chunk * v) as log:
        sum(o.sum() for o in outs).backward()
    assert log.count == want


@pytest.mark.parametrize("mode", MODES)
def test_logits_forward_work_buffers(mode):
    chunk, v = 4, 64
    z, _ = _logits(torch.float32, shape=(3, 4, v))
    tok = torch.randint(0, v, (3, 4), generator=make_generator(31))
    with torch.no_grad(), _BigAllocations(chunk * v) as log:
        token_logprobs_and_entropy(z, tok, chunk_size=chunk)
    assert log.count == 2


def test_empty_input_float64():
    hid = torch.zeros(0, 3, H, dtype=torch.float64, requires_grad=True)
    w = _randn(V, H, seed=40).requires_grad_(True)
    b = torch.zeros(V, dtype=torch.float64, requires_grad=True)
    tok = torch.zeros(0, 3, dtype=torch.long)
    for mode in MODES:
        outs = _hidden_call(mode, hid, w, tok, 2.0, b)
        assert all(o.shape == (0, 3) and o.dtype == torch.float64 for o in outs)
        sum(o.sum() for o in outs).backward()
        assert hid.grad.shape == hid.shape and bool((w.grad == 0).all()) and bool((b.grad == 0).all())
    z = torch.zeros(0, 3, V, dtype=torch.float64, requires_grad=True)
    lp, h = token_logprobs_and_entropy(z, tok)
    assert lp.shape == h.shape == (0, 3) and lp.dtype == torch.float64
    (lp.sum() + h.sum()).backward()
    assert z.grad.shape == z.shape and z.grad.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_no_warning_with_a_short_last_chunk(dtype, tau):
    """Every work buffer is cut to the block's rows: 10 rows in chunks of 4 end with a block of 2, and the vocabulary
    (3) is smaller than a chunk. A buffer of another shape would be resized by ``out=`` with torch's warning, which a
    caller running with warnings as errors sees as a failure. float32 at tau = 1 reads the logits as a view (the
    unowned path); bf16 and tau != 1 copy them into the buffer."""
    import warnings

    z = torch.randn(10, 3, generator=make_generator(50)).to(dtype).requires_grad_(True)
    tok = torch.randint(0, 3, (10,), generator=make_generator(51))
    hid = torch.randn(10, 2, generator=make_generator(52)).to(dtype).requires_grad_(True)
    w = torch.randn(3, 2, generator=make_generator(53)).to(dtype).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp, h = token_logprobs_and_entropy(z, tok, temperature=tau, chunk_size=4)
        (lp.sum() + h.sum()).backward()
        lp, h = token_logprobs_and_entropy_from_hidden(hid, w, tok, temperature=tau, chunk_size=4)
        (lp.sum() + h.sum()).backward()
    assert torch.isfinite(z.grad.float()).all() and torch.isfinite(hid.grad.float()).all()
