"""The refusal and default contract of ``grpo_ref.masks`` (issue 13, mutation testing).

Pinned here, beside the loops of ``test_masks.py``: every validated argument is named in its refusal as a whole,
case-sensitive word; each documented bound is accepted at its edge and refused just past it, each side on its own;
each tensor argument's shape and dtype is checked on its own; the documented defaults (``masked_var``'s and
``masked_whiten``'s ``unbiased=True``, ``shift_mean=True``, ``eps=1e-8``) are pinned by their effect; float64 stays
float64; ``dim`` accepts exactly ``[-max(ndim, 1), max(ndim, 1) - 1]``.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from grpo_ref._checks import NonFiniteInputError
from grpo_ref import (
    discounted_returns,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    reinforce_pp_advantages,
    response_mask,
)
from refusals import names as _names, refused as _refused, refused_nonfinite as _refused_nonfinite





def _values(b=3, t=4, seed=0, dtype=torch.float64):
    return torch.randn(b, t, generator=torch.Generator().manual_seed(seed), dtype=dtype)


MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.float32)


# ------------------------------------------------------------------------------------- response_mask
def _loop_mask(seq_len, prompts, totals=None, tokens=None, eos=None):
    out = torch.zeros(len(prompts), seq_len)
    for i, p in enumerate(prompts):
        end = seq_len if totals is None else totals[i]
        for t in range(p, end):
            out[i, t] = 1.0
            if eos is not None and tokens[i][t] == eos:
                break
    return out


def test_response_mask_seq_len_bound_is_zero():
    assert response_mask(0, [0, 0]).shape == (2, 0)  # T = 0 is legal: an empty mask
    _refused(lambda: response_mask(-1, [0]), "seq_len")
    _refused(lambda: response_mask(2.0, [0]), "seq_len")


def test_response_mask_prompt_lengths_edges_each_side():
    out = response_mask(3, [0, 3])  # both edges of [0, T] accepted
    assert out.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    _refused(lambda: response_mask(3, [-1, 1]), "prompt_lengths")  # only the lower side violated
    _refused(lambda: response_mask(3, [4, 1]), "prompt_lengths")  # only the upper side violated
    _refused(lambda: response_mask(3, [1.0, 2.0]), "prompt_lengths")
    _refused(lambda: response_mask(3, torch.tensor([True, False])), "prompt_lengths")
    _refused(lambda: response_mask(3, torch.tensor([[1, 2]])), "prompt_lengths")
    _refused(lambda: response_mask(3, torch.tensor([1 + 0j, 2 + 0j])), "prompt_lengths")


def test_response_mask_lengths_that_are_no_lengths_refused_by_name():
    for junk in ("12", None, [[1], [1, 2]]):  # a ValueError naming the argument, not torch's TypeError
        _refused(lambda: response_mask(3, junk), "prompt_lengths")
        if junk is not None:  # total_lengths=None is its default: no right padding
            _refused(lambda: response_mask(3, [0, 1], total_lengths=junk), "total_lengths")


def test_response_mask_total_lengths_edges_each_side():
    # total == prompt (empty response) and total == T accepted
    out = response_mask(4, [1, 2], total_lengths=[1, 4])
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    _refused(lambda: response_mask(4, [1, 2], total_lengths=[0, 3]), "total_lengths")  # below prompt only
    _refused(lambda: response_mask(4, [1, 2], total_lengths=[2, 5]), "total_lengths")  # above T only
    _refused(lambda: response_mask(4, [1, 2], total_lengths=[2]), "total_lengths")
    _refused(lambda: response_mask(4, [1, 2], total_lengths=[[2, 3]]), "total_lengths")
    _refused(lambda: response_mask(4, [1, 2], total_lengths=[2.0, 3.0]), "total_lengths")
    _refused(lambda: response_mask(4, [1, 2], total_lengths=torch.tensor([True, True])), "total_lengths")
    _refused(lambda: response_mask(4, [1, 2], total_lengths=torch.tensor([2 + 0j, 3 + 0j])), "total_lengths")


def test_response_mask_total_lengths_sets_the_end():
    prompts, totals = [0, 1, 2], [2, 3, 2]
    assert torch.equal(response_mask(5, prompts, total_lengths=totals), _loop_mask(5, prompts, totals))
    assert torch.equal(response_mask(5, prompts), _loop_mask(5, prompts))


def test_response_mask_eos_arguments_refused_by_name():
    tokens = torch.tensor([[1, 2, 3], [3, 2, 1]])
    _refused(lambda: response_mask(3, [0, 1], tokens=tokens, eos_token_id=2.0), "eos_token_id")
    _refused(lambda: response_mask(3, [0, 1], tokens=tokens, eos_token_id=True), "eos_token_id")
    _refused(lambda: response_mask(3, [0, 1], eos_token_id=2), "eos_token_id", "tokens")
    _refused(lambda: response_mask(3, [0, 1], tokens=tokens[:, :2], eos_token_id=2), "eos_token_id", "tokens")
    _refused(lambda: response_mask(3, [0, 1], tokens=tokens[:1], eos_token_id=2), "eos_token_id", "tokens")
    _refused(lambda: response_mask(3, [0, 1], tokens=tokens.float(), eos_token_id=2), "tokens")


def test_response_mask_eos_shape_message_shows_the_shape_given():
    tokens = torch.zeros(2, 2, dtype=torch.long)
    msg = _refused(lambda: response_mask(3, [0, 1], tokens=tokens, eos_token_id=0), "tokens")
    assert "(2, 2)" in msg and "(2, 3)" in msg
    msg = _refused(lambda: response_mask(3, [0, 1], eos_token_id=0), "tokens")
    assert "None" in msg


def test_response_mask_first_eos_kept_later_dropped():
    tokens = [[0, 7, 5, 7, 5, 5], [7, 7, 5, 5, 5, 7], [5, 5, 5, 5, 5, 5]]
    prompts, totals = [1, 1, 0], [6, 4, 6]
    for eos in (7, 0):  # eos_token_id = 0 is an id like any other
        got = response_mask(6, prompts, total_lengths=totals, tokens=torch.tensor(tokens), eos_token_id=eos)
        assert torch.equal(got, _loop_mask(6, prompts, totals, tokens, eos))
        assert got.dtype == torch.float32
    # tokens without eos_token_id are ignored
    assert torch.equal(response_mask(6, prompts, tokens=torch.tensor(tokens)), _loop_mask(6, prompts))


def test_response_mask_eos_after_total_length_is_not_an_end():
    tokens = torch.tensor([[1, 1, 1, 9], [1, 9, 1, 1]])
    got = response_mask(4, [0, 0], total_lengths=[3, 4], tokens=tokens, eos_token_id=9)
    assert got.tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------------- masked reductions
FUNCS = {
    "masked_sum": masked_sum,
    "masked_mean": masked_mean,
    "masked_var": masked_var,
    "masked_whiten": masked_whiten,
}


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_masked_refusals_name_values_and_mask(name):
    f, v = FUNCS[name], _values()
    _refused(lambda: f(v.tolist(), MASK), "values")
    _refused(lambda: f(torch.complex(v, v), MASK), "values")
    _refused(lambda: f(v, MASK[:, :3]), "mask", "values")
    _refused(lambda: f(v[:2], MASK), "mask", "values")
    _refused(lambda: f(v, MASK.tolist()), "mask")
    bad = MASK.clone()
    bad[1, 1] = 2.0
    _refused(lambda: f(v, bad), "mask")
    nan_in = v.clone()
    nan_in[0, 0] = math.nan
    _refused_nonfinite(lambda: f(nan_in, MASK), "values")


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_masked_nonfinite_padding_is_free(name):
    f, v = FUNCS[name], _values()
    dirty = v.clone()
    dirty[0, 2], dirty[0, 3], dirty[2, 0] = math.inf, -math.inf, math.nan  # all masked out
    out, ref = f(dirty, MASK), f(v, MASK)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_masked_float64_stays_float64_and_low_precision_goes_to_float32(name):
    f, v = FUNCS[name], _values()
    assert f(v, MASK).dtype == torch.float64
    assert f(v.half(), MASK).dtype == torch.float32
    assert f(v.float(), MASK.double()).dtype == torch.float32  # the mask takes the values' dtype


def _loop_sum(v, m, dim=None):
    if dim is None:
        return sum(float(v[i, t]) for i in range(v.shape[0]) for t in range(v.shape[1]) if m[i, t] > 0)
    if dim in (1, -1):
        return [sum(float(v[i, t]) for t in range(v.shape[1]) if m[i, t] > 0) for i in range(v.shape[0])]
    return [sum(float(v[i, t]) for i in range(v.shape[0]) if m[i, t] > 0) for t in range(v.shape[1])]


@pytest.mark.parametrize("dim", [None, 0, 1, -1, -2])
def test_masked_sum_and_mean_every_legal_dim_of_a_2d_tensor(dim):
    v = _values()
    m = MASK.clone()
    m[2] = 0.0  # an empty row: its mean is 0, not NaN
    s = masked_sum(v, m, dim=dim)
    assert torch.allclose(s, torch.tensor(_loop_sum(v, m, dim), dtype=torch.float64), rtol=1e-12, atol=1e-12)
    counts = _loop_sum(torch.ones_like(v), m, dim)
    if dim is None:
        mean_ref = s / max(counts, 1.0)
    else:
        mean_ref = s / torch.tensor([max(c, 1.0) for c in counts], dtype=torch.float64)
    torch.testing.assert_close(masked_mean(v, m, dim=dim), mean_ref, rtol=1e-12, atol=1e-12)


def test_masked_mean_of_one_token_is_that_token():
    v = _values()
    m = torch.zeros_like(MASK)
    m[1, 2] = 1.0
    assert float(masked_mean(v, m)) == float(v[1, 2])
    assert float(masked_mean(v, m, dim=-1)[1]) == float(v[1, 2])
    assert float(masked_mean(v, torch.zeros_like(MASK))) == 0.0


@pytest.mark.parametrize("f", [masked_sum, masked_mean])
def test_dim_range_is_exactly_the_tensor_dims(f):
    v2, m2 = _values(), MASK
    for d in (-2, -1, 0, 1):
        f(v2, m2, dim=d)
    for d in (-3, 2):
        _refused(lambda: f(v2, m2, dim=d), "dim")
    v1, m1 = v2[1], m2[1]
    for d in (-1, 0):
        torch.testing.assert_close(f(v1, m1, dim=d), f(v1, m1))
    for d in (-2, 1):
        _refused(lambda: f(v1, m1, dim=d), "dim")
    v0, m0 = v2[1, 1], m2[1, 1]  # a 0-dim tensor: like torch, dim 0 and -1 are legal
    for d in (-1, 0):
        torch.testing.assert_close(f(v0, m0, dim=d), f(v0, m0))
    for d in (-2, 1):
        _refused(lambda: f(v0, m0, dim=d), "dim")
    _refused(lambda: f(v2, m2, dim=1.0), "dim")
    _refused(lambda: f(v2, m2, dim=True), "dim")


def _loop_var(v, m, unbiased):
    xs = [float(v[i, t]) for i in range(v.shape[0]) for t in range(v.shape[1]) if m[i, t] > 0]
    n = len(xs)
    den = n - 1 if unbiased else n
    if den <= 0:
        return 0.0
    mu = sum(xs) / n
    return sum((x - mu) ** 2 for x in xs) / den


def test_masked_var_default_is_unbiased():
    v = _values()
    default, unbiased = masked_var(v, MASK), masked_var(v, MASK, unbiased=True)
    biased = masked_var(v, MASK, unbiased=False)
    assert float(default) == float(unbiased)
    assert not math.isclose(float(default), float(biased))
    assert math.isclose(float(unbiased), _loop_var(v, MASK, True), rel_tol=1e-12)
    assert math.isclose(float(biased), _loop_var(v, MASK, False), rel_tol=1e-12)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_small_counts_follow_bessel(n, unbiased):
    v = torch.tensor([[0.5, -1.5, 4.0, 2.0]], dtype=torch.float64)
    m = torch.tensor([[1.0] * n + [0.0] * (4 - n)])
    got = float(masked_var(v, m, unbiased=unbiased))
    assert math.isclose(got, _loop_var(v, m, unbiased), rel_tol=1e-12, abs_tol=0.0)


def test_masked_var_unbiased_must_be_bool():
    for bad in (1, 0, "yes", None):
        _refused(lambda: masked_var(_values(), MASK, unbiased=bad), "unbiased")


def _loop_whiten(v, m, shift_mean=True, unbiased=True, eps=1e-8):
    xs = [float(v[i, t]) for i in range(v.shape[0]) for t in range(v.shape[1]) if m[i, t] > 0]
    mu = sum(xs) / max(len(xs), 1)
    var = _loop_var(v, m, unbiased)
    scale = var + eps
    inv = 1.0 / math.sqrt(scale) if scale > 0 else 0.0
    out = torch.zeros(v.shape, dtype=torch.float64)
    for i in range(v.shape[0]):
        for t in range(v.shape[1]):
            if m[i, t] > 0:
                out[i, t] = (float(v[i, t]) - mu) * inv + (0.0 if shift_mean else mu)
    return out


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5, 3.0])
def test_masked_whiten_matches_loop(shift_mean, unbiased, eps):
    v = _values(seed=1) * 0.3 + 2.0  # mean far from 0, variance below 1
    got = masked_whiten(v, MASK, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    torch.testing.assert_close(got, _loop_whiten(v, MASK, shift_mean, unbiased, eps), rtol=1e-10, atol=1e-12)


def test_masked_whiten_defaults_pinned_by_effect():
    v = _values(seed=2) * 0.3 + 2.0
    default = masked_whiten(v, MASK)
    explicit = masked_whiten(v, MASK, shift_mean=True, unbiased=True, eps=1e-8)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, masked_whiten(v, MASK, shift_mean=False))
    assert not torch.allclose(default, masked_whiten(v, MASK, unbiased=False))
    assert not torch.allclose(default, masked_whiten(v, MASK, eps=1.00000001))


def test_masked_whiten_eps_bound_and_constant_input():
    const = torch.full((3, 4), 2.5, dtype=torch.float64)
    out = masked_whiten(const, MASK, eps=0.0)  # eps = 0 is the edge: variance 0 whitens to 0, not 0 / 0
    assert torch.equal(out, torch.zeros_like(const))
    out = masked_whiten(const, MASK, shift_mean=False, eps=0.0)
    assert torch.equal(out, 2.5 * MASK.double())
    _refused(lambda: masked_whiten(const, MASK, eps=-1e-300), "eps")
    _refused(lambda: masked_whiten(const, MASK, eps=math.nan), "eps")
    _refused(lambda: masked_whiten(const, MASK, eps=None), "eps")


def test_masked_whiten_bool_arguments_refused_by_name():
    v = _values()
    for bad in (1, "yes", None):
        _refused(lambda: masked_whiten(v, MASK, shift_mean=bad), "shift_mean")
        _refused(lambda: masked_whiten(v, MASK, unbiased=bad), "unbiased")


def test_masked_whiten_padding_is_zero_and_statistics_are_the_masked_ones():
    v = _values(seed=3)
    out = masked_whiten(v, MASK, eps=0.0)
    assert bool((out[MASK == 0] == 0).all())
    sel = out[MASK > 0]
    assert abs(float(sel.mean())) < 1e-12
    assert math.isclose(float(sel.var(unbiased=True)), 1.0, rel_tol=1e-12)


def test_internal_whitening_defaults_are_verls():
    """REINFORCE++ whitens with the internal helper's defaults, documented as verl's ``masked_whiten``: centred,
    unbiased variance, ``eps = 1e-8``; the same as the public :func:`masked_whiten` with its defaults."""
    r = _values(seed=4) * 0.2 + 1.0
    m = MASK.double()
    got = reinforce_pp_advantages(r, m, gamma=0.9)
    returns = discounted_returns(r, m, gamma=0.9)
    torch.testing.assert_close(got, masked_whiten(returns, m, shift_mean=True, unbiased=True, eps=1e-8), rtol=1e-12,
                               atol=1e-12)
    for other in (dict(shift_mean=False), dict(unbiased=False), dict(eps=1.00000001)):
        assert not torch.allclose(got, masked_whiten(returns, m, **other))


def test_lengths_refusal_shows_the_type_it_was_given():
    """A string or a ragged list is refused naming the argument and the type received (not some other type)."""
    for bad, shown in (("12", "str"), ([[1, 2], [3]], "list")):
        msg = _refused(lambda: response_mask(4, [0, 0], total_lengths=bad), "total_lengths")
        assert re.search(rf"\bgot {shown}\b", msg), msg
