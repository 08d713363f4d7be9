"""The contract of ``grpo_ref.kl`` as its docstrings state it, pinned where the mutation run of issue 13 found it loose.

* the per-token estimators against their definitions per element (float64, every documented clamp at and past its
  edge), the documented defaults by their effect (``max_log_ratio = 20``, ``estimator = "k3"``), the domain of
  ``max_log_ratio`` (``None`` or finite ``> 0``: accepted just above 0, refused at 0);
* the straight-through forms ``"k1+"``, ``"k3+"``, ``"abs+"``, ``"low_var_kl+"``: value of the base estimator, gradient
  of k2, and verl 0.9.1's ``kl_penalty`` convention written out (``0.5 * (lp - ref)^2`` as the backward score);
* :func:`~grpo_ref.kl.categorical_kl` on 1-D, 2-D and 3-D logits and under broadcasting, its exact ``+inf``, and each
  refusal (an integer or 0-dim or ``V = 0`` tensor, NaN/+inf, a row that is ``-inf`` everywhere, a float32 overflow)
  naming the caller's argument, in the message and in ``NonFiniteInputError.name``.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import grpo_ref as G
from grpo_ref._checks import NonFiniteInputError
from grpo_ref.kl import _ESTIMATORS, KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3

F64 = torch.float64
INF = math.inf
BASES = ("k1", "k3", "abs", "low_var_kl")
PUBLIC = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def _names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def _refused(call, arg: str, exc=ValueError) -> ValueError:
    with pytest.raises(exc) as info:
        call()
    assert _names(str(info.value), arg), f"{arg!r} not named in: {info.value}"
    return info.value


def _pair(seed: int, n: int = 24, spread: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, generator=g, dtype=F64) * spread
    ref = lp + torch.randn(n, generator=g, dtype=F64) * spread
    return lp, ref


# the log-ratios d = ref - lp that reach every clamp: inside, just at and past +-max_log_ratio, past +-20, k3 > 10
EDGES = (0.0, 1e-3, -0.7, 2.0, -2.0, 2.5, -2.5, 3.0, -3.0, 12.0, -12.0, 20.0, -20.0, 25.0, -25.0)


def _edges():
    lp = torch.full((len(EDGES),), -1.5, dtype=F64)
    return lp, lp + torch.tensor(EDGES, dtype=F64)


def slow(name: str, lp: float, ref: float, max_log_ratio) -> float:
    """Schulman 2020 per element, ``d = ref - lp`` clamped to ``+-max_log_ratio``; ``low_var_kl`` is verl 0.9.1's
    ``kl_penalty_forward``: ``d`` clamped to ``+-min(20, max_log_ratio)``, the value to ``[-10, 10]``."""
    d, name = ref - lp, name.rstrip("+")  # a straight-through form has the value of its base
    if name == "low_var_kl":
        bound = 20.0 if max_log_ratio is None else min(20.0, max_log_ratio)
        d = min(max(d, -bound), bound)
        return min(max(math.expm1(d) - d, -10.0), 10.0)
    if max_log_ratio is not None:
        d = min(max(d, -max_log_ratio), max_log_ratio)
    return {"k1": -d, "k2": 0.5 * d * d, "k3": math.expm1(d) - d, "abs": abs(d)}[name]


# -- the estimators ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", KL_ESTIMATORS)
@pytest.mark.parametrize("max_log_ratio", [20.0, 2.5, 0.5, None])
def test_estimator_against_its_definition(name, max_log_ratio):
    lp, ref = _edges()
    lp2, ref2 = _pair(1)
    lp, ref = torch.cat([lp, lp2]), torch.cat([ref, ref2])
    got = kl_estimate(lp, ref, name, max_log_ratio)
    want = [slow(name, a, b, max_log_ratio) for a, b in zip(lp.tolist(), ref.tolist(), strict=True)]
    assert got.dtype == F64 and got.shape == lp.shape
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-13, atol=1e-15)
    if name in PUBLIC:
        torch.testing.assert_close(PUBLIC[name](lp, ref, max_log_ratio), got, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "abs"])
def test_default_max_log_ratio_is_20_by_its_effect(name):
    """The documented default 20 clamps ``|ref - lp| = 25`` (so it differs from no clamp and from 21) and equals 20
    passed explicitly."""
    lp, ref = _edges()
    default = kl_estimate(lp, ref, name)
    torch.testing.assert_close(default, kl_estimate(lp, ref, name, 20.0), rtol=0, atol=0)
    for other in (None, 21.0, 19.0):
        assert not torch.equal(default, kl_estimate(lp, ref, name, other)), other
    if name in PUBLIC:
        torch.testing.assert_close(PUBLIC[name](lp, ref), default, rtol=0, atol=0)


def test_low_var_kl_bound_is_the_smaller_of_20_and_max_log_ratio():
    lp, ref = _edges()
    none = kl_estimate(lp, ref, "low_var_kl", None)
    torch.testing.assert_close(none, kl_estimate(lp, ref, "low_var_kl", 20.0), rtol=0, atol=0)
    torch.testing.assert_close(none, kl_estimate(lp, ref, "low_var_kl", 1e6), rtol=0, atol=0)
    small = kl_estimate(lp, ref, "low_var_kl", 0.5)  # every |d| > 0.5 gives k3(+-0.5)
    assert float(small.max()) == pytest.approx(math.expm1(0.5) - 0.5, rel=1e-14)
    assert float(none.max()) == 10.0  # the value clamp binds at d = 12, 20, 25
    assert float(none.min()) >= 0.0  # k3 >= 0: the lower value clamp -10 is never reached


def test_kl_estimate_default_estimator_is_k3():
    lp, ref = _pair(2)
    torch.testing.assert_close(kl_estimate(lp, ref), kl_k3(lp, ref), rtol=0, atol=0)
    assert not torch.equal(kl_estimate(lp, ref), kl_k1(lp, ref))


@pytest.mark.parametrize("fn", [kl_k1, kl_k2, kl_k3, kl_estimate])
def test_max_log_ratio_domain(fn):
    """``None`` or finite ``> 0``: the open edge 0 is refused, the smallest positive float accepted."""
    lp, ref = _edges()
    tiny = fn(lp, ref, max_log_ratio=5e-324)
    assert torch.isfinite(tiny).all()
    for bad in (0.0, -0.0, -1e-300, -1.0, math.nan, INF, -INF, True, "20"):
        _refused(lambda bad=bad: fn(lp, ref, max_log_ratio=bad), "max_log_ratio")
    assert torch.isfinite(fn(lp, ref, max_log_ratio=None)).all()


@pytest.mark.parametrize("fn", [kl_k1, kl_k2, kl_k3, kl_estimate])
@pytest.mark.parametrize("arg", ["logp", "ref_logp"])
def test_refusals_name_each_argument(fn, arg):
    lp, ref = _pair(3, n=6)
    x = lp if arg == "logp" else ref

    def call(bad):
        return fn(**{"logp": lp, "ref_logp": ref, arg: bad})

    _refused(lambda: call(x > 0), arg)  # bool
    _refused(lambda: call(x.to(torch.complex128)), arg)
    _refused(lambda: call(x.tolist()), arg)  # not a tensor
    for bad in (math.nan, INF, -INF):  # no mask here: NaN/inf anywhere is refused
        y = x.clone()
        y[4] = bad
        err = _refused(lambda y=y: call(y), arg, NonFiniteInputError)
        assert err.name == arg
    err = _refused(lambda: call(x[:-1]), arg)  # shape of this argument alone
    assert _names(str(err), "logp") and _names(str(err), "ref_logp")
    # the same values in float32 are accepted and computed in float32
    assert fn(lp.float(), ref.float()).dtype == torch.float32


def test_kl_estimate_refuses_an_unknown_estimator_by_name():
    lp, ref = _pair(4, n=4)
    for bad in ("k2+", "kl", "K3", "", None, 3):
        err = _refused(lambda bad=bad: kl_estimate(lp, ref, bad), "estimator")
        assert repr(bad) in str(err)
        assert _names(str(err).replace("KL estimator", ""), "estimator")  # the argument, not only the kind of value


# -- straight-through forms -------------------------------------------------------------------------------------------
def _verl_straight_through(base: str, lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """verl 0.9.1 ``kl_penalty(logprob, ref_logprob, base + "+")``: ``backward_score = 0.5 * (logprob -
    ref_logprob).square()``, returned as ``backward_score - backward_score.detach() + forward_score.detach()``."""
    backward = 0.5 * (lp - ref).square()
    pairs = zip(lp.tolist(), ref.tolist(), strict=True)
    forward = torch.tensor([slow(base, a, b, None) for a, b in pairs], dtype=lp.dtype)
    return backward - backward.detach() + forward


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("max_log_ratio", [20.0, 1.0, None])
def test_straight_through_value_and_gradient(base, max_log_ratio):
    """Value: exactly the base estimator's. Gradient through ``logp`` and through ``ref_logp``: exactly k2's, i.e.
    ``+-(lp - ref)`` where ``|lp - ref| <= max_log_ratio`` and 0 past it."""
    lp0, ref0 = _edges()
    lp1, ref1 = _pair(5)
    lp0, ref0 = torch.cat([lp0, lp1]), torch.cat([ref0, ref1])
    lp, ref = lp0.clone().requires_grad_(True), ref0.clone().requires_grad_(True)
    st = kl_estimate(lp, ref, base + "+", max_log_ratio)
    torch.testing.assert_close(st.detach(), kl_estimate(lp0, ref0, base, max_log_ratio), rtol=0, atol=0)
    w = torch.linspace(0.5, 2.0, lp0.numel(), dtype=F64)  # any upstream gradient
    (st * w).sum().backward()
    d = ref0 - lp0
    inside = torch.ones_like(d) if max_log_ratio is None else (d.abs() <= max_log_ratio).to(F64)  # clamp edge: passes
    torch.testing.assert_close(lp.grad, w * (lp0 - ref0) * inside, rtol=1e-14, atol=0)
    torch.testing.assert_close(ref.grad, w * (ref0 - lp0) * inside, rtol=1e-14, atol=0)
    assert st.requires_grad and st.dtype == F64


@pytest.mark.parametrize("base", BASES)
def test_straight_through_follows_verl_0_9_1(base):
    """Where no clamp binds (``|lp - ref| <= 20`` and, for low_var_kl, verl's own clamps), grpo_ref's ``"<base>+"``
    equals verl's ``kl_penalty(..., "<base>+")`` in value and gradient."""
    lp0, ref0 = _pair(6, spread=4.0)
    a, b = lp0.clone().requires_grad_(True), lp0.clone().requires_grad_(True)
    ours = kl_estimate(a, ref0, base + "+")
    verl = _verl_straight_through(base, b, ref0)
    torch.testing.assert_close(ours, verl, rtol=1e-14, atol=1e-15)
    ours.sum().backward()
    verl.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=0)


def test_straight_through_names():
    """The registry keys and the function names of the ``+`` forms (verl's ``"k2+"`` is k2 itself: no entry)."""
    assert [k for k in KL_ESTIMATORS if k.endswith("+")] == [b + "+" for b in BASES]
    for base in BASES:
        est = _ESTIMATORS[base + "+"]
        assert est.__name__ == _ESTIMATORS[base].__name__ + "_straight_through"
        assert "k2" in est.__doc__ and "gradient" in est.__doc__


# -- categorical_kl ---------------------------------------------------------------------------------------------------
def slow_categorical_kl(p_row, q_row) -> float:
    """``sum_v p_v (log p_v - log q_v)`` from the logits of one row, in Python floats (0 log 0 = 0)."""
    def log_softmax(row):
        top = max(row)
        lse = top + math.log(sum(math.exp(x - top) for x in row))
        return [x - lse for x in row]
    lp, lq = log_softmax(p_row), log_softmax(q_row)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True) if a > -INF)


def _logits(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2


@pytest.mark.parametrize("p_shape, q_shape", [((5,), (5,)), ((3, 5), (3, 5)), ((2, 3, 5), (2, 3, 5)),
                                              ((5,), (3, 5)), ((2, 1, 5), (3, 5)), ((2, 3, 1), (2, 3, 1))])
def test_categorical_kl_against_slow_loop(p_shape, q_shape):
    p, q = _logits(7, p_shape), _logits(8, q_shape)
    if p.shape[-1] > 1:
        p.view(-1)[0] = -INF  # a token p gives no mass
    kl = G.categorical_kl(p, q)
    shape = torch.broadcast_shapes(p.shape, q.shape)
    assert kl.shape == shape[:-1] and kl.dtype == F64
    pe, qe = p.expand(shape).reshape(-1, shape[-1]), q.expand(shape).reshape(-1, shape[-1])
    want = [slow_categorical_kl(a, b) for a, b in zip(pe.tolist(), qe.tolist(), strict=True)]
    torch.testing.assert_close(kl.reshape(-1), torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-14)
    if shape[-1] == 1:
        assert torch.equal(kl, torch.zeros_like(kl))


def test_categorical_kl_is_exactly_inf_where_q_has_no_mass():
    p = torch.zeros(2, 3, 3, dtype=F64)
    q = _logits(9, (2, 3, 3))
    q[1, 2, 0] = -INF  # p gives mass to token 0 there: KL = +inf at [1, 2] only
    kl = G.categorical_kl(p, q)
    assert math.isinf(float(kl[1, 2])) and float(kl[1, 2]) > 0
    finite = torch.ones(2, 3, dtype=torch.bool)
    finite[1, 2] = False
    assert torch.isfinite(kl[finite]).all()
    one = G.categorical_kl(p[1, 2], q[1, 2])  # 1-D
    assert math.isinf(float(one)) and float(one) > 0


@pytest.mark.parametrize("arg", ["p_logits", "q_logits"])
def test_categorical_kl_refusals_name_the_argument(arg):
    good = _logits(10, (3, 4))

    def call(x):
        return G.categorical_kl(x, good) if arg == "p_logits" else G.categorical_kl(good, x)

    for bad in (good.long(), good > 0, good.to(torch.complex128), good[0, 0], torch.zeros(3, 0, dtype=F64),
                torch.zeros(2, 3, 0, dtype=F64), torch.zeros(0, dtype=F64), good.tolist()):
        _refused(lambda bad=bad: call(bad), arg)
    for value in (math.nan, INF):
        for x in (good.clone(), good[0].clone(), good.expand(2, 3, 4).clone()):  # 2-D, 1-D, 3-D
            x.view(-1)[1] = value
            err = _refused(lambda x=x: call(x), arg, NonFiniteInputError)
            assert err.name == arg
    for shape, row in (((4,), ()), ((3, 4), (1,)), ((2, 3, 4), (1, 0))):
        x = _logits(11, shape)
        x[row] = -INF  # one row -inf everywhere (the whole tensor when 1-D)
        err = _refused(lambda x=x: call(x), arg, NonFiniteInputError)
        assert err.name == arg and "-inf everywhere" in str(err)


def test_categorical_kl_shapes_that_do_not_broadcast_name_both_arguments():
    err = _refused(lambda: G.categorical_kl(_logits(12, (3, 4)), _logits(13, (2, 4))), "p_logits")
    assert _names(str(err), "q_logits") and "(3, 4)" in str(err) and "(2, 4)" in str(err)


@pytest.mark.parametrize("shape", [(), (1,), (2, 1)])
def test_categorical_kl_float32_overflow_is_refused_and_float64_is_finite(shape):
    """``logq = -inf`` from float32 overflow (``q`` logits ``+-3e38``: the shift by the max overflows) is not the
    exact ``+inf`` of a zero-probability ``q``: refused naming the logits; in float64 the same KL is finite. Other
    positions of the batch that hold a legitimate ``+inf`` do not hide it, nor does a ``q = -inf`` where ``p = 0``."""
    p = torch.tensor([-INF, 0.0, 0.0]).expand(*shape, 3).clone()
    q = torch.tensor([-INF, 3e38, -3e38]).expand(*shape, 3).clone()
    if shape == (2, 1):
        p[0, 0] = torch.tensor([0.0, 0.0, 0.0])  # a legitimate +inf at [0, 0]: p > 0 where q = -inf
        q[0, 0] = torch.tensor([-INF, 0.0, 0.0])
    err = _refused(lambda: G.categorical_kl(p, q), "p_logits", NonFiniteInputError)
    assert err.name == "p_logits" and _names(str(err), "q_logits") and "float64" in str(err)
    kl64 = G.categorical_kl(p.double(), q.double())
    overflowed = kl64 if shape != (2, 1) else kl64[1, 0]
    assert torch.isfinite(overflowed).all() and float(overflowed.min()) > 1e38
