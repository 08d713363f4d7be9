"""token_logprobs / token_entropy against direct formulas, autograd checks, dtypes, chunking and bad input."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_generator
from grpo_ref import token_entropy, token_logprobs


def _data(b, t, v, seed, dtype=torch.float32, scale=3.0):
    g = make_generator(seed)
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, v, (b, t), generator=g)
    return logits, tokens


def _reference_logprobs(logits, tokens, tau):
    """log_softmax(z / tau) gathered at the tokens, in float64."""
    lp = torch.log_softmax(logits.double() / tau, dim=-1)
    return lp.gather(-1, tokens[..., None])[..., 0]


def _reference_entropy(logits, tau):
    """-sum_v p_v log p_v with p = softmax(z / tau), written straight from the definition (0 log 0 = 0)."""
    z = logits.double() / tau
    out = torch.zeros(z.shape[:-1], dtype=torch.float64)
    flat_z = z.reshape(-1, z.shape[-1])
    flat_out = out.view(-1)
    for i in range(flat_z.shape[0]):
        row = flat_z[i]
        mx = row.max()
        w = torch.exp(row - mx)
        p = w / w.sum()
        h = 0.0
        for pv in p.tolist():
            if pv > 0:
                h -= pv * torch.log(torch.tensor(pv, dtype=torch.float64)).item()
        flat_out[i] = h
    return out


# B*T = 15 rows: chunk sizes 1, 4 (does not divide 15), 5 (divides), 15 (exact), 1000 (larger than B*T).
CHUNKS = [1, 4, 5, 15, 1000]
TEMPS = [1.0, 0.7, 1.3, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_logprobs_match_log_softmax_gather(dtype, tau, chunk, device):
    logits, tokens = _data(3, 5, 11, seed=1, dtype=dtype)
    out = token_logprobs(logits.to(device), tokens.to(device), temperature=tau, chunk_size=chunk)
    assert out.dtype == dtype
    assert out.shape == tokens.shape
    ref = _reference_logprobs(logits, tokens, tau)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)


def test_logprobs_arbitrary_leading_shape():
    logits, _ = _data(2, 12, 7, seed=2)
    logits = logits.reshape(2, 3, 4, 7)
    tokens = torch.randint(0, 7, (2, 3, 4), generator=make_generator(3))
    out = token_logprobs(logits, tokens, chunk_size=5)
    torch.testing.assert_close(out.double(), _reference_logprobs(logits, tokens, 1.0), rtol=2e-6, atol=2e-6)


def test_logprobs_large_logit_offset_is_stable():
    # log-softmax is shift invariant; a naive exp would overflow at 1e4
    logits, tokens = _data(2, 3, 9, seed=4)
    base = token_logprobs(logits, tokens)
    shifted = token_logprobs(logits + 1e4, tokens)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, base, rtol=0, atol=5e-3)  # 1e4 in float32 has ulp ~1e-3
    base64 = token_logprobs(logits.double(), tokens)
    torch.testing.assert_close(token_logprobs(logits.double() + 1e4, tokens), base64, rtol=0, atol=1e-9)


def test_logprobs_are_log_probabilities():
    # summing exp(logprob) over every token of the vocabulary gives 1 at each position
    v = 6
    logits, _ = _data(2, 3, v, seed=5, dtype=torch.float64)
    total = torch.zeros(2, 3, dtype=torch.float64)
    for tok in range(v):
        total += token_logprobs(logits, torch.full((2, 3), tok), temperature=0.8, chunk_size=4).exp()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_low_precision_logits_give_float32(low, tau, device):
    logits, tokens = _data(4, 6, 50, seed=6, dtype=torch.float32)
    low_logits = logits.to(low)
    out = token_logprobs(low_logits.to(device), tokens.to(device), temperature=tau, chunk_size=7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the reference sees exactly the same (rounded) logits, so only float32 arithmetic error remains
    ref = _reference_logprobs(low_logits.float(), tokens, tau)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    # and against the unrounded float32 logits the difference is the input rounding only
    ref32 = _reference_logprobs(logits, tokens, tau)
    atol = 0.2 if low == torch.bfloat16 else 0.03
    assert (out.cpu().double() - ref32).abs().max() < atol
    ent = token_entropy(low_logits.to(device), temperature=tau, chunk_size=7)
    assert ent.dtype == torch.float32 and torch.isfinite(ent).all()
    torch.testing.assert_close(ent.cpu().double(), _reference_entropy(low_logits.float(), tau), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_logprobs_gradcheck(tau, chunk):
    logits, tokens = _data(2, 3, 5, seed=7, dtype=torch.float64, scale=1.0)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, tokens, temperature=tau, chunk_size=chunk), (logits,), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradgradcheck(
        lambda z: token_logprobs(z, tokens, temperature=tau, chunk_size=chunk), (logits,), eps=1e-6, atol=1e-7
    )


def test_logprobs_gradient_formula():
    # d log p(y) / d z_v = (1[v == y] - p_v) / tau
    tau = 0.7
    logits, tokens = _data(2, 2, 6, seed=8, dtype=torch.float64)
    logits.requires_grad_(True)
    token_logprobs(logits, tokens, temperature=tau, chunk_size=3).sum().backward()
    p = torch.softmax(logits.detach() / tau, -1)
    expected = (torch.nn.functional.one_hot(tokens, 6).double() - p) / tau
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_entropy_matches_definition(dtype, tau, chunk, device):
    logits, _ = _data(3, 5, 7, seed=9, dtype=dtype)
    out = token_entropy(logits.to(device), temperature=tau, chunk_size=chunk)
    assert out.dtype == dtype and out.shape == (3, 5)
    tol = 1e-12 if dtype == torch.float64 else 3e-6
    torch.testing.assert_close(out.cpu().double(), _reference_entropy(logits, tau), rtol=tol, atol=tol)


def test_entropy_bounds():
    v = 8
    uniform = torch.zeros(2, 3, v, dtype=torch.float64)
    torch.testing.assert_close(
        token_entropy(uniform), torch.full((2, 3), torch.log(torch.tensor(float(v), dtype=torch.float64)).item(),
                                           dtype=torch.float64), rtol=1e-12, atol=1e-12)
    peaked = torch.zeros(1, 1, v, dtype=torch.float64)
    peaked[..., 3] = 60.0
    assert 0 <= token_entropy(peaked).item() < 1e-20
    logits, _ = _data(4, 4, v, seed=10, dtype=torch.float64)
    h = token_entropy(logits)
    assert (h >= 0).all() and (h <= torch.log(torch.tensor(float(v))).item() + 1e-12).all()


def test_entropy_with_minus_inf_logits():
    """Zero-probability tokens (logits masked to -inf, e.g. top-k) contribute 0 log 0 = 0."""
    logits, _ = _data(2, 3, 6, seed=11, dtype=torch.float64)
    logits[..., 0] = -torch.inf
    logits[0, 1, 2:] = -torch.inf
    h = token_entropy(logits, chunk_size=4)
    assert torch.isfinite(h).all(), h
    torch.testing.assert_close(h, _reference_entropy(logits, 1.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_entropy_gradcheck(tau):
    logits, _ = _data(2, 3, 5, seed=12, dtype=torch.float64, scale=1.0)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: token_entropy(z, temperature=tau, chunk_size=4), (logits,), eps=1e-6, atol=1e-7
    )


def test_empty_batch():
    logits = torch.zeros(0, 4, 9)
    tokens = torch.zeros(0, 4, dtype=torch.long)
    out = token_logprobs(logits, tokens)
    assert out.shape == (0, 4) and out.dtype == torch.float32
    assert token_entropy(logits).shape == (0, 4)


class _Float32AllocationLog(TorchDispatchMode):
    """Records the largest float32 tensor newly allocated by any aten op run inside the mode (views of an input's
    storage, e.g. ``reshape`` of float32 logits, are not allocations and are ignored)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        in_storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and t.untyped_storage().data_ptr() not in in_storages
            ):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype,tau", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float32, 0.7)])
def test_chunked_forward_never_materialises_full_float32_logits(dtype, tau):
    b, t, v, chunk = 4, 8, 64, 5
    logits, tokens = _data(b, t, v, seed=13, dtype=dtype)
    with torch.no_grad():
        with _Float32AllocationLog() as log:
            token_logprobs(logits, tokens, temperature=tau, chunk_size=chunk)
        assert log.largest <= chunk * v, log.largest
        with _Float32AllocationLog() as log:
            token_entropy(logits, temperature=tau, chunk_size=chunk)
        assert log.largest <= chunk * v, log.largest
        # the detector itself works: the one-shot reference does allocate a full copy
        with _Float32AllocationLog() as log:
            torch.log_softmax(logits.float() / tau, -1).gather(-1, tokens[..., None])
        assert log.largest >= b * t * v


# ---------------------------------------------------------------- bad input


def test_token_id_out_of_range():
    logits, tokens = _data(2, 3, 5, seed=14)
    bad = tokens.clone()
    bad[1, 2] = 5
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        token_logprobs(logits, bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="token ids"):
        token_logprobs(logits, bad)


def test_token_shape_mismatch():
    logits, tokens = _data(2, 3, 5, seed=15)
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(logits, tokens[:, :2])
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(logits, tokens[None])


def test_float_tokens_rejected():
    logits, tokens = _data(2, 3, 5, seed=16)
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, tokens.float())


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_bad_temperature(tau):
    logits, tokens = _data(2, 3, 5, seed=17)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, temperature=tau)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(logits, temperature=tau)
