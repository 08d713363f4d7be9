"""KL estimators k1/k2/k3 and categorical_kl, checked by exact enumeration over a small vocabulary in float64.

With ``lp = log_softmax(theta)`` (policy) and ``ref = log_softmax(phi)``, the expectation under ``pi`` of a
per-token quantity ``f(y)`` is ``sum_y pi(y) f(y)``: no sampling, so the identities hold to rounding error.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_generator
from grpo_ref import categorical_kl, kl_estimate, kl_k1, kl_k2, kl_k3

# Schulman's three, which have public functions; the verl variants (abs, low_var_kl, the straight-through "+"
# forms) are tested in test_kl_variants.py
KL_ESTIMATORS = ("k1", "k2", "k3")

EST = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def _logits(shape, seed, scale=1.5):
    return torch.randn(*shape, generator=make_generator(seed), dtype=torch.float64) * scale


def _kl_direct(theta, phi):
    """KL(softmax(theta) || softmax(phi)) by a plain loop over the vocabulary (last dim)."""
    lp = torch.log_softmax(theta, -1)
    lq = torch.log_softmax(phi, -1)
    out = torch.zeros(theta.shape[:-1], dtype=torch.float64)
    for v in range(theta.shape[-1]):
        p = lp[..., v].exp()
        out = out + torch.where(p > 0, p * (lp[..., v] - lq[..., v]), torch.zeros_like(p))
    return out


def _expected_estimate(theta, phi, name):
    """E_{y ~ pi}[k(lp(y), ref(y))] by enumeration, with the estimator evaluated on every token y."""
    lp = torch.log_softmax(theta, -1)
    ref = torch.log_softmax(phi, -1)
    return (lp.exp() * EST[name](lp, ref)).sum(-1)


def _expected_loss_grad(theta, phi, name):
    """sum_y pi(y) * d k(lp(y), ref(y)) / d theta: the expected gradient of the estimator used as a loss on a
    fixed on-policy sample (pi(y) is the sampling probability, not differentiated)."""
    theta = theta.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    ref = torch.log_softmax(phi, -1)
    weights = lp.detach().exp()
    (weights * EST[name](lp, ref)).sum().backward()
    return theta.grad


def _grad_of(f, theta):
    theta = theta.detach().clone().requires_grad_(True)
    f(theta).sum().backward()
    return theta.grad


SEEDS = [0, 1, 2, 3]
VOCABS = [5, 6, 7]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("v", VOCABS)
def test_k1_and_k3_are_unbiased_k2_is_not(seed, v):
    theta, phi = _logits((v,), seed), _logits((v,), seed + 100)
    kl = categorical_kl(theta, phi)
    torch.testing.assert_close(kl, _kl_direct(theta, phi), rtol=0, atol=1e-12)
    assert kl.item() > 1e-3  # random logits: a non-trivial divergence
    e1 = _expected_estimate(theta, phi, "k1")
    e3 = _expected_estimate(theta, phi, "k3")
    e2 = _expected_estimate(theta, phi, "k2")
    assert abs(e1.item() - kl.item()) < 1e-10
    assert abs(e3.item() - kl.item()) < 1e-10
    assert abs(e2.item() - kl.item()) > 1e-4


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("v", VOCABS)
def test_estimators_as_losses_expected_gradients(seed, v):
    theta, phi = _logits((v,), seed), _logits((v,), seed + 100)
    g1 = _expected_loss_grad(theta, phi, "k1")
    g2 = _expected_loss_grad(theta, phi, "k2")
    g3 = _expected_loss_grad(theta, phi, "k3")
    reverse = _grad_of(lambda t: categorical_kl(t, phi), theta)  # grad KL(pi || ref)
    forward = _grad_of(lambda t: categorical_kl(phi, t), theta)  # grad KL(ref || pi)
    assert reverse.abs().max() > 1e-3 and forward.abs().max() > 1e-3
    assert (reverse - forward).abs().max() > 1e-4  # the two directions really differ here
    torch.testing.assert_close(g1, torch.zeros_like(g1), rtol=0, atol=1e-10)
    torch.testing.assert_close(g2, reverse, rtol=0, atol=1e-10)
    torch.testing.assert_close(g3, forward, rtol=0, atol=1e-10)


def test_batched_enumeration():
    b, t, v = 3, 4, 6
    theta, phi = _logits((b, t, v), 7), _logits((b, t, v), 8)
    kl = categorical_kl(theta, phi)
    assert kl.shape == (b, t)
    torch.testing.assert_close(kl, _kl_direct(theta, phi), rtol=0, atol=1e-12)
    torch.testing.assert_close(_expected_estimate(theta, phi, "k1"), kl, rtol=0, atol=1e-10)
    torch.testing.assert_close(_expected_estimate(theta, phi, "k3"), kl, rtol=0, atol=1e-10)
    assert (_expected_estimate(theta, phi, "k2") - kl).abs().max() > 1e-4
    # per-position gradients: with the sum over positions, each position's logits only see their own terms
    torch.testing.assert_close(_expected_loss_grad(theta, phi, "k1"), torch.zeros_like(theta), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        _expected_loss_grad(theta, phi, "k2"), _grad_of(lambda x: categorical_kl(x, phi), theta), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(
        _expected_loss_grad(theta, phi, "k3"), _grad_of(lambda x: categorical_kl(phi, x), theta), rtol=0, atol=1e-10
    )


def test_kl_estimate_dispatch(device):
    lp = torch.log_softmax(_logits((2, 3, 5), 9), -1).to(device)
    ref = torch.log_softmax(_logits((2, 3, 5), 10), -1).to(device)
    d = (ref - lp).double()
    direct = {"k1": -d, "k2": d**2 / 2, "k3": torch.exp(d) - d - 1}
    for name in KL_ESTIMATORS:
        out = kl_estimate(lp, ref, name)
        assert out.device.type == device.type
        torch.testing.assert_close(out, direct[name], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kl_estimate(lp, ref), direct["k3"], rtol=1e-12, atol=1e-14)  # default is k3


@pytest.mark.parametrize("seed", [0, 1])
def test_k3_nonnegative_everywhere(seed):
    g = make_generator(seed)
    d = torch.cat([torch.randn(2000, generator=g, dtype=torch.float64) * 10, torch.linspace(-30, 30, 601,
                                                                                            dtype=torch.float64)])
    lp = torch.randn(d.shape, generator=g, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        for clamp in (20.0, None):
            k = kl_k3(lp.to(dtype), (lp + d).to(dtype), max_log_ratio=clamp)
            assert (k >= 0).all()
    d_small = torch.logspace(-12, -1, 200, dtype=torch.float64)
    for sign in (1.0, -1.0):
        assert (kl_k3(torch.zeros(200), (sign * d_small).float()) >= 0).all()


# ---------------------------------------------------------------- clamp and numerics


def test_clamp_inactive_inside_range():
    g = make_generator(11)
    d = torch.cat([torch.rand(500, generator=g, dtype=torch.float64) * 39.8 - 19.9,
                   torch.tensor([-19.99, 19.99, 0.0, 1e-3, -1e-3], dtype=torch.float64)])
    lp = torch.randn(d.shape, generator=g, dtype=torch.float64)
    ref = lp + d
    d_exact = ref - lp
    for name in KL_ESTIMATORS:
        lp1 = lp.clone().requires_grad_(True)
        lp2 = lp.clone().requires_grad_(True)
        clamped = EST[name](lp1, ref, max_log_ratio=20.0)
        raw = EST[name](lp2, ref, max_log_ratio=None)
        torch.testing.assert_close(clamped, raw, rtol=0, atol=0)
        clamped.sum().backward()
        raw.sum().backward()
        torch.testing.assert_close(lp1.grad, lp2.grad, rtol=0, atol=0)
    # and the raw k3 is the textbook formula, with its textbook gradient d k3 / d lp = 1 - exp(d)
    lp3 = lp.clone().requires_grad_(True)
    k3 = kl_k3(lp3, ref, max_log_ratio=None)
    torch.testing.assert_close(k3, torch.exp(d_exact) - d_exact - 1, rtol=1e-12, atol=1e-15)
    k3.sum().backward()
    torch.testing.assert_close(lp3.grad, 1 - torch.exp(d_exact), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamp_extreme_log_ratios_finite(dtype, device):
    d = torch.tensor([1e4, -1e4, 25.0, -25.0, 200.0], dtype=dtype, device=device)
    lp = torch.zeros_like(d).requires_grad_(True)
    ref = lp.detach() + d
    for name in KL_ESTIMATORS:
        lp.grad = None
        k = EST[name](lp, ref)  # default clamp 20
        assert torch.isfinite(k).all(), (name, k)
        k.sum().backward()
        assert torch.isfinite(lp.grad).all(), (name, lp.grad)
        # outside the range the value saturates at the estimator's value at +-20 and the gradient is 0
        at20 = EST[name](torch.zeros(2, dtype=torch.float64), torch.tensor([20.0, -20.0], dtype=torch.float64),
                         max_log_ratio=None)
        expect = torch.stack([at20[0], at20[1], at20[0], at20[1], at20[0]]).to(k.dtype)
        torch.testing.assert_close(k.detach().cpu(), expect.cpu(), rtol=1e-6, atol=0)
        torch.testing.assert_close(lp.grad, torch.zeros_like(lp.grad), rtol=0, atol=0)
    # the documented value at +20
    assert abs(kl_k3(torch.zeros(1, dtype=torch.float64), torch.tensor([20.0], dtype=torch.float64)).item()
               - (math.exp(20) - 21)) < 1e-3


def test_custom_clamp_and_bad_clamp():
    lp = torch.zeros(3, dtype=torch.float64)
    ref = torch.tensor([-7.0, 2.0, 7.0], dtype=torch.float64)
    out = kl_k1(lp, ref, max_log_ratio=5.0)
    torch.testing.assert_close(out, torch.tensor([5.0, -2.0, -5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="max_log_ratio"):
        kl_k3(lp, ref, max_log_ratio=0.0)


def test_no_clamp_reproduces_raw_formula_for_large_ratios():
    lp = torch.zeros(4, dtype=torch.float64)
    d = torch.tensor([30.0, -30.0, 50.0, -50.0], dtype=torch.float64)
    torch.testing.assert_close(kl_k3(lp, lp + d, max_log_ratio=None), torch.exp(d) - d - 1, rtol=1e-12, atol=0)
    torch.testing.assert_close(kl_k1(lp, lp + d, max_log_ratio=None), -d, rtol=0, atol=0)
    torch.testing.assert_close(kl_k2(lp, lp + d, max_log_ratio=None), d**2 / 2, rtol=0, atol=0)


def _series(d):
    d = d.double()
    return d**2 / 2 + d**3 / 6 + d**4 / 24


def test_k3_tiny_log_ratio_float64():
    d = torch.cat([torch.logspace(-12, -6, 50, dtype=torch.float64), -torch.logspace(-12, -6, 50, dtype=torch.float64)])
    k = kl_k3(torch.zeros_like(d), d)
    assert (k >= 0).all()
    # within one ulp of d everywhere (cancellation of d against expm1(d) costs at most that) ...
    assert ((k - _series(d)).abs() <= d.abs() * 2.0**-52).all()
    # ... which is relative accuracy 1e-6 once |d| >= 1e-9
    big = d.abs() >= 1e-9
    torch.testing.assert_close(k[big], _series(d)[big], rtol=1e-6, atol=0)
    naive = torch.exp(d) - d - 1
    assert ((naive - _series(d)).abs() / _series(d)).max() > 1e-2  # the naive formula would not pass


def test_k3_tiny_log_ratio_float32():
    """In float32, for |d| < 1e-6 the true k3 ~ d^2/2 is far below ulp(1) ~ 1.2e-7, so exp(d) - d - 1 rounds to
    garbage (0, negative, or ~1e-8). k3 must stay within one ulp of d of the true value (what expm1(d) - d gives),
    and must never be negative."""
    d64 = torch.cat([torch.logspace(-9, -6, 40, dtype=torch.float64), -torch.logspace(-9, -6, 40, dtype=torch.float64)])
    d = d64.float()
    k = kl_k3(torch.zeros_like(d), d)
    assert k.dtype == torch.float32
    assert (k >= 0).all()
    true = _series(d)  # the series at the float32 input value
    ulp_d = d.abs().double() * 2.0**-23
    assert ((k.double() - true).abs() <= ulp_d).all()
    naive = torch.exp(d) - d - 1
    assert ((naive.double() - true).abs() > ulp_d).any()


@pytest.mark.parametrize("name", KL_ESTIMATORS)
@pytest.mark.parametrize("clamp", [20.0, None])
def test_estimators_gradcheck(name, clamp):
    g = make_generator(12)
    lp = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ref = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: EST[name](a, b, max_log_ratio=clamp), (lp, ref))


def test_categorical_kl_gradcheck():
    p = _logits((2, 3, 5), 13).requires_grad_(True)
    q = _logits((2, 3, 5), 14).requires_grad_(True)
    assert torch.autograd.gradcheck(categorical_kl, (p, q))


# ---------------------------------------------------------------- categorical_kl


def test_categorical_kl_properties(device):
    p = _logits((4, 6), 15).to(device)
    q = _logits((4, 6), 16).to(device)
    kl_pq = categorical_kl(p, q)
    kl_qp = categorical_kl(q, p)
    assert (kl_pq > 0).all() and (kl_qp > 0).all()
    assert (kl_pq - kl_qp).abs().min() > 1e-6  # asymmetric
    torch.testing.assert_close(kl_pq.cpu(), _kl_direct(p.cpu(), q.cpu()), rtol=0, atol=1e-12)
    torch.testing.assert_close(kl_qp.cpu(), _kl_direct(q.cpu(), p.cpu()), rtol=0, atol=1e-12)
    # zero iff equal distributions: equal logits, and logits equal up to a per-row shift
    assert categorical_kl(p, p).abs().max() < 1e-15
    assert categorical_kl(p, p + 3.7).abs().max() < 1e-12
    # a small perturbation gives a small but strictly positive KL
    tiny = categorical_kl(p, p + 1e-3 * _logits((4, 6), 17).to(device))
    assert (tiny > 0).all() and (tiny < 1e-5).all()


def test_categorical_kl_minus_inf_logits():
    p = _logits((3, 6), 18)
    q = _logits((3, 6), 19)
    p[:, 0] = -torch.inf  # zero-probability token under p only
    p[0, 5] = -torch.inf
    q[:, 0] = -torch.inf  # ... and under q too at token 0 (0 log 0/0 = 0)
    kl = categorical_kl(p, q)
    assert torch.isfinite(kl).all()
    # direct sum over the tokens with p > 0
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    pp = lp.exp()
    direct = torch.stack([sum(pp[i, v] * (lp[i, v] - lq[i, v]) for v in range(6) if pp[i, v] > 0) for i in range(3)])
    torch.testing.assert_close(kl, direct, rtol=0, atol=1e-12)
    # q = 0 where p > 0: the divergence is infinite, not NaN
    q2 = q.clone()
    q2[1, 3] = -torch.inf
    out = categorical_kl(p, q2)
    assert torch.isinf(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_categorical_kl_minus_inf_logits_gradient():
    """Masked (-inf) policy logits are common (top-k, invalid actions); the gradient must stay finite and equal
    the gradient over the finite logits only."""
    p = _logits((3, 6), 20)
    q = _logits((3, 6), 21)
    p[:, 0] = -torch.inf
    p_var = p.clone().requires_grad_(True)
    q_var = q.clone().requires_grad_(True)
    categorical_kl(p_var, q_var).sum().backward()
    assert torch.isfinite(p_var.grad).all(), p_var.grad
    assert torch.isfinite(q_var.grad).all(), q_var.grad
    # reference: the same KL on the 5 finite tokens of p (q keeps all 6 in its normaliser)
    pf = p[:, 1:].clone().requires_grad_(True)
    qf = q.clone().requires_grad_(True)
    lp = torch.log_softmax(pf, -1)
    lq = torch.log_softmax(qf, -1)[:, 1:]
    (lp.exp() * (lp - lq)).sum().backward()
    torch.testing.assert_close(p_var.grad[:, 1:], pf.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(p_var.grad[:, 0], torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(q_var.grad, qf.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- dtypes and bad input


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32(low, device):
    lp = torch.log_softmax(_logits((3, 4, 5), 22), -1)[..., 0].to(low).to(device)
    ref = torch.log_softmax(_logits((3, 4, 5), 23), -1)[..., 0].to(low).to(device)
    for name in KL_ESTIMATORS:
        out = EST[name](lp, ref)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        expect = EST[name](lp.double(), ref.double())
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-6)
    lo_p, lo_q = _logits((3, 5), 24).to(low).to(device), _logits((3, 5), 25).to(low).to(device)
    out = categorical_kl(lo_p, lo_q)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), categorical_kl(lo_p.double(), lo_q.double()), rtol=1e-5, atol=1e-6)


def test_shape_mismatch():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    for name in KL_ESTIMATORS:
        with pytest.raises(ValueError, match="shape mismatch"):
            EST[name](a, b)
        with pytest.raises(ValueError, match="shape mismatch"):
            kl_estimate(a, b, name)
    with pytest.raises(ValueError, match="shape mismatch"):
        categorical_kl(torch.zeros(2, 5), torch.zeros(2, 6))


def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="KL estimator"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "mse")  # verl's name for k2, not one of ours
