"""The contract of ``grpo_ref.logprobs`` (``token_logprobs``, ``token_entropy``), pinned for mutation testing.

* every refusal is a ``ValueError`` that names the caller's argument as a whole word (shape, dtype and range of
  ``logits`` and ``tokens``; ``temperature`` and ``chunk_size`` at the edge of their domain: ``tau > 0``,
  ``chunk_size >= 1``); a non-finite input raises ``NonFiniteInputError`` whose ``.name`` is the argument to blame,
  and the message shows where the offending entry is;
* the values are those of the definitions, ``log_softmax(z / tau).gather(...)`` and ``-sum p log p``, in float64 to
  1e-12 whatever the chunking (``N`` not a multiple of the chunk, chunk 1, chunk = ``N``, chunk > ``N``), with the
  dtype kept (float64 in, float64 out, gradients too) and the documented default ``temperature = 1``;
* the inputs are never written to (the forward reuses the logits' memory as a view at ``tau = 1``), and the working
  memory is the documented one: one ``[chunk, V]`` buffer for the log-probs, two with the entropy.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_generator
from grpo_ref import token_entropy, token_logprobs
from grpo_ref._checks import NonFiniteInputError

B, T, V = 2, 3, 5  # all different, V the largest: a bound read from the wrong dimension is seen


def _names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def _logits(shape=(B, T, V), seed=0, dtype=torch.float64, scale=2.0):
    return torch.randn(*shape, generator=make_generator(seed), dtype=torch.float64).mul(scale).to(dtype)


def _tokens(shape=(B, T), seed=1, v=V):
    return torch.randint(0, v, shape, generator=make_generator(seed))


def _naive_logprobs(z, tokens, tau=1.0):
    return torch.log_softmax(z.double() / tau, -1).gather(-1, tokens[..., None].long())[..., 0]


def _naive_entropy(z, tau=1.0):
    """``-sum_v p_v log p_v`` as a loop over the vocabulary (``p_v = 0`` adds 0)."""
    logp = torch.log_softmax(z.double() / tau, -1)
    h = torch.zeros(z.shape[:-1], dtype=torch.float64)
    for v in range(z.shape[-1]):
        p = logp[..., v].exp()
        h = h - torch.where(p > 0, p * logp[..., v], torch.zeros_like(p))
    return h


FUNCS = {
    "token_logprobs": lambda logits, tokens, **kw: token_logprobs(logits, tokens, **kw),
    "token_entropy": lambda logits, tokens, **kw: token_entropy(logits, **kw),
}


def _refused(fn, arg, *args, exc=ValueError, **kw):
    with pytest.raises(exc) as err:
        fn(*args, **kw)
    assert _names(str(err.value), arg), (arg, str(err.value))
    return err.value


# ------------------------------------------------------------------------------------------ refusals, each argument
@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize(
    "logits",
    [[1.0, 2.0], torch.zeros(B, T, V, dtype=torch.complex64), torch.zeros(B, T, V, dtype=torch.long),
     torch.zeros(B, T, V, dtype=torch.bool), torch.zeros(B, T, 0), torch.tensor(1.0)],
    ids=["list", "complex", "int", "bool", "V=0", "0-D"],
)
def test_logits_refused_by_name(name, logits):
    tokens = torch.zeros(logits.shape[:-1] if torch.is_tensor(logits) and logits.dim() else (), dtype=torch.long)
    _refused(FUNCS[name], "logits", logits, tokens)


@pytest.mark.parametrize("name", list(FUNCS))
def test_smallest_shapes_accepted(name):
    """``V = 1`` (probability 1: log-prob 0, entropy 0) and a single position ``[V]`` are legal."""
    one = FUNCS[name](_logits((B, T, 1)), torch.zeros(B, T, dtype=torch.long))
    assert one.shape == (B, T) and bool((one == 0).all())
    z = _logits((V,))
    tok = torch.tensor(V - 1)
    single = FUNCS[name](z, tok)
    ref = _naive_logprobs(z, tok) if name == "token_logprobs" else _naive_entropy(z)
    assert single.shape == () and single.dtype == torch.float64
    torch.testing.assert_close(single, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "tokens",
    [[0, 1], torch.zeros(B, T, dtype=torch.complex64), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool),
     torch.zeros(B, T - 1, dtype=torch.long), torch.zeros(B, T, 1, dtype=torch.long), torch.zeros(T, B, dtype=torch.long)],
    ids=["list", "complex", "float", "bool", "narrow", "extra-dim", "transposed"],
)
def test_tokens_refused_by_name(tokens):
    err = _refused(token_logprobs, "tokens", _logits(), tokens)
    if torch.is_tensor(tokens) and not tokens.is_complex() and tokens.dtype not in (torch.float32, torch.bool):
        assert str(tuple(tokens.shape)) in str(err) and str((B, T)) in str(err)  # the shape got and the one wanted


def test_token_range_edges():
    """ids in ``[0, V)``: ``0`` and ``V - 1`` accepted, ``-1`` and ``V`` refused, naming ``tokens`` and the bound."""
    z = _logits()
    for edge in (0, V - 1):
        tok = torch.full((B, T), edge)
        torch.testing.assert_close(token_logprobs(z, tok), _naive_logprobs(z, tok), rtol=1e-12, atol=1e-12)
    for bad in (-1, V):
        tok = _tokens()
        tok[1, 2] = bad
        err = _refused(token_logprobs, "tokens", z, tok)
        assert f"[0, {V})" in str(err) and str(bad) in str(err)


@pytest.mark.parametrize("name", list(FUNCS))
def test_temperature_domain_edge(name):
    """``tau > 0``: 0 and -0.0 refused (naming ``temperature`` and the value), the smallest positive float accepted."""
    z, tok = _logits(), _tokens()
    for bad in (0.0, -0.0, -1e-300, float("nan"), float("inf"), True, "1"):
        err = _refused(FUNCS[name], "temperature", z, tok, temperature=bad)
        assert str(bad) in str(err) or repr(bad) in str(err)
    flat = torch.zeros(B, T, V, dtype=torch.float64)  # 0 / tau = 0 for any tau > 0: uniform distribution
    out = FUNCS[name](flat, tok, temperature=5e-324)
    log_v = torch.tensor(float(V), dtype=torch.float64).log()
    want = torch.full((B, T), float(-log_v if name == "token_logprobs" else log_v), dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(FUNCS))
def test_chunk_size_domain_edge(name):
    """``chunk_size >= 1``: 0 refused naming ``chunk_size``, 1 accepted; floats and bools refused."""
    z, tok = _logits(), _tokens()
    for bad in (0, -1, 2.0, True, None):
        err = _refused(FUNCS[name], "chunk_size", z, tok, chunk_size=bad)
        assert str(bad) in str(err)
    ref = _naive_logprobs(z, tok) if name == "token_logprobs" else _naive_entropy(z)
    torch.testing.assert_close(FUNCS[name](z, tok, chunk_size=1), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ non-finite input, named
@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("bad,word", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nan_or_inf_logit_named_with_its_index(name, bad, word):
    z = _logits()
    z[1, 2, 3] = bad
    err = _refused(FUNCS[name], "logits", z, _tokens(), exc=NonFiniteInputError)
    assert err.name == "logits"
    assert "[1, 2, 3]" in str(err) and word in str(err).lower()  # where the bad logit is, and its value


@pytest.mark.parametrize("name", list(FUNCS))
def test_dead_row_named_with_its_index(name):
    z = _logits()
    z[1, 2] = -torch.inf
    err = _refused(FUNCS[name], "logits", z, _tokens(), exc=NonFiniteInputError)
    assert err.name == "logits" and "[1, 2]" in str(err) and "-inf everywhere" in str(err)


def test_token_of_probability_zero_named():
    z, tok = _logits(), _tokens()
    z[1, 2, tok[1, 2]] = -torch.inf
    err = _refused(token_logprobs, "tokens", z, tok, exc=NonFiniteInputError)
    assert err.name == "tokens" and "[1, 2]" in str(err)
    # an unchosen -inf logit is legal: probability 0, the chosen token's log-prob is finite
    tok2 = tok.clone()
    tok2[1, 2] = (tok[1, 2] + 1) % V
    torch.testing.assert_close(token_logprobs(z, tok2), _naive_logprobs(z, tok2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token_entropy(z), _naive_entropy(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(FUNCS))
def test_overflow_named_with_its_position(name):
    z = _logits(dtype=torch.float32)
    z[1, 2, 1] = 3e38
    err = _refused(FUNCS[name], "logits", z, _tokens(), exc=NonFiniteInputError, temperature=1e-3)
    assert err.name == "logits" and "overflow" in str(err) and "[1, 2]" in str(err)


# ------------------------------------------------------------------------------------------ values and chunking
# N = B * T = 6 rows: chunk 1, 4 (does not divide 6), 6 (= N), 7 and 1000 (> N)
@pytest.mark.parametrize("chunk", [1, 4, 6, 7, 1000])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_values_are_the_definitions_in_float64(chunk, tau):
    z, tok = _logits(), _tokens()
    lp = token_logprobs(z, tok, temperature=tau, chunk_size=chunk)
    h = token_entropy(z, temperature=tau, chunk_size=chunk)
    assert lp.dtype == h.dtype == torch.float64 and lp.shape == h.shape == (B, T)
    torch.testing.assert_close(lp, _naive_logprobs(z, tok, tau), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, _naive_entropy(z, tau), rtol=1e-12, atol=1e-12)


def test_default_temperature_is_one():
    """The documented default ``temperature = 1.0``: same result as passing it, different from ``tau = 2``."""
    z, tok = _logits(), _tokens()
    for fn in (lambda **kw: token_logprobs(z, tok, **kw), lambda **kw: token_entropy(z, **kw)):
        assert torch.equal(fn(), fn(temperature=1.0))
        assert not torch.allclose(fn(), fn(temperature=2.0))
        torch.testing.assert_close(fn(), fn(chunk_size=1), rtol=1e-12, atol=1e-12)  # the default chunk: values only


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gradients_float64_match_naive(chunk, tau):
    """``d/dz`` of a weighted sum of the outputs, against autograd through ``log_softmax(z / tau)``, float64."""
    z, tok = _logits(), _tokens()
    w = _logits((B, T), seed=5)
    for ours, naive in ((lambda x: token_logprobs(x, tok, temperature=tau, chunk_size=chunk), lambda x: _naive_logprobs(x, tok, tau)),
                        (lambda x: token_entropy(x, temperature=tau, chunk_size=chunk), lambda x: _naive_entropy(x, tau))):
        a = z.clone().requires_grad_(True)
        b = z.clone().requires_grad_(True)
        (ours(a) * w).sum().backward()
        (naive(b) * w).sum().backward()
        assert a.grad.dtype == torch.float64
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gradcheck_float64(tau):
    z, tok = _logits(scale=1.0), _tokens()
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tok, temperature=tau, chunk_size=4), (z,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, temperature=tau, chunk_size=4), (z,), eps=1e-6, atol=1e-7)


def test_arbitrary_leading_shape():
    z = _logits((2, 2, 3, V))
    tok = _tokens((2, 2, 3))
    torch.testing.assert_close(token_logprobs(z, tok, chunk_size=5), _naive_logprobs(z, tok), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token_entropy(z, chunk_size=5), _naive_entropy(z), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ aliasing and memory
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("grad", [False, True])
def test_inputs_never_written(dtype, tau, grad):
    """At ``tau = 1`` the float32/float64 logits are read in place (a view): neither pass may write into them, and
    a second call gives the same result."""
    z, tok = _logits(dtype=dtype), _tokens()
    keep, keep_tok = z.clone(), tok.clone()
    z.requires_grad_(grad)
    first = (token_logprobs(z, tok, temperature=tau, chunk_size=4), token_entropy(z, temperature=tau, chunk_size=4))
    if grad:
        (first[0].sum() + first[1].sum()).backward()
    assert torch.equal(z.detach(), keep) and torch.equal(tok, keep_tok)
    second = (token_logprobs(z, tok, temperature=tau, chunk_size=4), token_entropy(z, temperature=tau, chunk_size=4))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class _BigAllocations(TorchDispatchMode):
    """Counts the floating tensors of at least ``size`` elements newly allocated by aten ops inside the mode."""

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_work_buffers(dtype, tau):
    """Documented working memory of the forward: one ``[chunk, V]`` float buffer for the log-probs, reused by every
    chunk, two with the entropy (``N = 12`` rows in 3 chunks of 4)."""
    chunk, v = 4, 64
    z, tok = _logits((3, 4, v), dtype=dtype), _tokens((3, 4), v=v)
    with torch.no_grad():
        with _BigAllocations(chunk * v) as log:
            token_logprobs(z, tok, temperature=tau, chunk_size=chunk)
        assert log.count == 1
        with _BigAllocations(chunk * v) as log:
            token_entropy(z, temperature=tau, chunk_size=chunk)
        assert log.count == 2


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])  # 0.7: a division that is not exact in bf16/fp16
def test_low_precision_logits_upcast_before_any_arithmetic(low, tau):
    """bf16/fp16 logits are upcast to float32 before the division by ``tau`` and the max subtraction: the results
    equal the float32 computation on the same (exactly upcast) logits to float32 rounding, not to bf16 rounding."""
    z, tok = _logits((4, 6, 50), dtype=low, scale=3.0), _tokens((4, 6), v=50)
    torch.testing.assert_close(token_logprobs(z, tok, temperature=tau, chunk_size=7).double(), _naive_logprobs(z.float(), tok, tau),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_entropy(z, temperature=tau, chunk_size=7).double(), _naive_entropy(z.float(), tau),
                               rtol=1e-5, atol=1e-5)


def test_empty_input():
    z = torch.zeros(0, 3, V, dtype=torch.float64)
    tok = torch.zeros(0, 3, dtype=torch.long)
    assert token_logprobs(z, tok).shape == (0, 3) and token_logprobs(z, tok).dtype == torch.float64
    assert token_entropy(z).shape == (0, 3)
