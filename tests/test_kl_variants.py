"""verl 0.9.1's further KL estimators (``abs``, ``low_var_kl``) and the straight-through ``+`` forms.

Each is checked against its definition written out per element in plain Python floats (``math``), against
``torch.autograd.gradcheck`` in float64 where it is differentiable, and, for the straight-through forms, by the
two properties that define them: the value is the base estimator's, the gradient is k2's.
"""
from __future__ import annotations

import math

import pytest
import torch

import grpo_ref as G
from grpo_ref.kl import _ESTIMATORS, KL_ESTIMATORS

NEW = ("abs", "low_var_kl")
STRAIGHT = ("k1+", "k3+", "abs+", "low_var_kl+")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(seed, n=64, spread=3.0):
    g = _gen(seed)
    lp = torch.randn(n, generator=g, dtype=torch.float64) * spread
    ref = torch.randn(n, generator=g, dtype=torch.float64) * spread
    return lp, ref


def slow(name: str, lp: float, ref: float) -> float:
    """The estimators from their definitions, one token at a time (d = ref - lp, Schulman 2020; verl 0.9.1
    kl_penalty_forward for abs and low_var_kl's two clamps)."""
    d = ref - lp
    if name == "k1":
        return -d
    if name == "k2":
        return 0.5 * d * d
    if name == "k3":
        return math.exp(d) - d - 1.0
    if name == "abs":
        return abs(d)
    if name == "low_var_kl":
        dc = min(max(d, -20.0), 20.0)
        return min(max(math.exp(dc) - dc - 1.0, -10.0), 10.0)
    raise AssertionError(name)


def test_names():
    assert KL_ESTIMATORS == ("k1", "k2", "k3", "abs", "low_var_kl", "k1+", "k3+", "abs+", "low_var_kl+")
    assert "k2+" not in KL_ESTIMATORS  # verl's "k2+" is k2 itself


@pytest.mark.parametrize("name", NEW + STRAIGHT)
def test_value_against_slow_definition(name):
    lp, ref = _pair(1, spread=6.0)
    # include the clamps of low_var_kl: |d| > 20 and k3 > 10 (d > ~2.6)
    lp = torch.cat([lp, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)])
    ref = torch.cat([ref, torch.tensor([25.0, -25.0, 3.0, -12.0, 1e-3], dtype=torch.float64)])
    base = name.rstrip("+")
    got = G.kl_estimate(lp, ref, name, max_log_ratio=None)
    want = torch.tensor([slow(base, a, b) for a, b in zip(lp.tolist(), ref.tolist())], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_low_var_kl_is_k3_inside_its_clamps_and_saturates_outside():
    lp, ref = _pair(2, spread=0.5)
    torch.testing.assert_close(G.kl_estimate(lp, ref, "low_var_kl"), G.kl_k3(lp, ref), rtol=0, atol=0)
    big = G.kl_estimate(torch.zeros(3, dtype=torch.float64), torch.tensor([5.0, 30.0, -30.0], dtype=torch.float64), "low_var_kl")
    assert big[0] == 10.0 and big[1] == 10.0  # value clamp at 10 (k3(5) = 143)
    assert big[2] == 10.0  # d = -30 is clamped to -20, and k3(-20) = 19 + e^-20 > 10 is clamped to 10
    # gradient is 0 where a clamp is active, k3's where none is
    lp = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.3, 5.0, -30.0], dtype=torch.float64)
    G.kl_estimate(lp, ref, "low_var_kl").sum().backward()
    assert lp.grad[0] == pytest.approx(1.0 - math.exp(0.3), rel=1e-12)
    assert lp.grad[1] == 0.0 and lp.grad[2] == 0.0


def test_low_var_kl_log_ratio_clamp_is_the_smaller_of_20_and_max_log_ratio():
    lp = torch.zeros(2, dtype=torch.float64)
    ref = torch.tensor([-1.5, -8.0], dtype=torch.float64)
    got = G.kl_estimate(lp, ref, "low_var_kl", max_log_ratio=1.0)
    want = torch.tensor([slow("k3", 0.0, -1.0)] * 2, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(G.kl_estimate(lp, ref, "low_var_kl", max_log_ratio=1e6),
                               G.kl_estimate(lp, ref, "low_var_kl", max_log_ratio=None), rtol=0, atol=0)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("clamp", [20.0, None])
def test_gradcheck(name, clamp):
    g = _gen(3)
    # away from the non-differentiable points (abs at d = 0, low_var_kl's clamp edges): |d| in [0.1, 2]
    lp = torch.randn(3, 4, generator=g, dtype=torch.float64)
    d = (torch.rand(3, 4, generator=g, dtype=torch.float64) * 1.9 + 0.1) * torch.where(torch.rand(3, 4, generator=g) < 0.5, -1.0, 1.0).double()
    ref = (lp + d).detach()
    lp.requires_grad_(True)
    ref.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _ESTIMATORS[name](a, b, clamp), (lp, ref))


@pytest.mark.parametrize("name", STRAIGHT)
@pytest.mark.parametrize("clamp", [20.0, None])
def test_straight_through_value_of_base_gradient_of_k2(name, clamp):
    lp, ref = _pair(4, spread=2.0)
    base = name[:-1]
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    st = _ESTIMATORS[name](a, ref, clamp)
    k2 = _ESTIMATORS["k2"](b, ref, clamp)
    torch.testing.assert_close(st, _ESTIMATORS[base](lp, ref, clamp), rtol=0, atol=0)  # forward: the base estimator
    w = torch.randn(lp.shape, generator=_gen(5), dtype=torch.float64)  # any upstream gradient
    (st * w).sum().backward()
    (k2 * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)  # backward: k2's, lp - ref
    torch.testing.assert_close(a.grad, w * (lp - ref), rtol=1e-12, atol=1e-12)
    # and through ref as well (both arguments are differentiable in the estimator itself)
    r1, r2 = ref.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    _ESTIMATORS[name](lp, r1, clamp).sum().backward()
    _ESTIMATORS["k2"](lp, r2, clamp).sum().backward()
    torch.testing.assert_close(r1.grad, r2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", STRAIGHT)
def test_straight_through_gradcheck_of_its_k2_part(name):
    """gradcheck on ``st - sg(st) + sg(k2)``: if the straight-through form had k2's gradient, this function equals k2
    in value *and* in gradient, so gradcheck (finite differences of the value) must agree with autograd."""
    g = _gen(6)
    lp = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def f(x):
        st = _ESTIMATORS[name](x, ref, 20.0)
        return st - st.detach() + _ESTIMATORS["k2"](x, ref, 20.0).detach()

    assert torch.autograd.gradcheck(f, (lp,))


@pytest.mark.parametrize("name", NEW + STRAIGHT)
def test_in_policy_loss(name):
    """``policy_loss``'s KL term is ``kl_coef`` times the aggregate of the named estimator (value and gradient),
    with masked-out positions ignored."""
    g = _gen(7)
    B, T = 3, 5
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1)
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.05
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float64)
    lp_pad = lp.clone()
    lp_pad[0, 4] = math.nan  # padding may hold anything
    a = lp_pad.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    with_kl, m = G.policy_loss(a, old, adv, mask, ref_logp=ref, kl_coef=0.3, kl_estimator=name)
    without, _ = G.policy_loss(b, old, adv, mask)
    kl = _ESTIMATORS[name](b, ref, 20.0)
    expected = without + 0.3 * G.aggregate(kl, mask, "seq-mean-token-mean")
    torch.testing.assert_close(with_kl, expected, rtol=1e-12, atol=1e-12)
    with_kl.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad * mask, rtol=1e-12, atol=1e-12)
    assert float(m["kl_ref"]) == pytest.approx(float(G.masked_mean(kl.detach(), mask)), rel=1e-12)


@pytest.mark.parametrize("name", STRAIGHT)
def test_kl_in_reward_uses_the_value(name):
    """In the reward the KL is a number (no gradient): a straight-through form gives its base's advantages."""
    cfg = G.get_preset("reinforce_pp", kl_estimator=name, kl_coef=0.1)
    g = _gen(8)
    B, T = 4, 6
    mask = torch.ones(B, T)
    old = -torch.rand(B, T, generator=g) * 2
    ref = old + torch.randn(B, T, generator=g)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5])
    got, _ = G.compute_advantages(cfg, scores, mask, old_logp=old, ref_logp=ref)
    want, _ = G.compute_advantages(cfg.replace(kl_estimator=name[:-1]), scores, mask, old_logp=old, ref_logp=ref)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_abs_and_k1_differ_only_in_sign_where_lp_below_ref():
    lp, ref = _pair(9)
    k1 = G.kl_estimate(lp, ref, "k1")
    ab = G.kl_estimate(lp, ref, "abs")
    torch.testing.assert_close(ab, k1.abs(), rtol=0, atol=0)
    assert bool((ab >= 0).all()) and bool((k1 < 0).any())
