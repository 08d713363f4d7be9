"""The refusal and default contract of ``grpo_ref.surrogate.policy_loss`` (issue 13, mutation testing).

Pinned here, beside the slow loops of ``test_policy_loss.py`` and ``test_objectives.py``:

* every validated argument is named in its refusal as a whole, case-sensitive word, and each tensor argument's
  shape (``old_logp``, ``mask``, ``advantages``, ``ref_logp``, ``entropy``) is refused on its own;
* each documented bound at its edge: ``0 < eps_low <= 1``, ``eps_high > 0``, ``dual_clip > 1``, SAPO's
  temperatures ``> 0``, ``kl_coef >= 0``, ``max_log_ratio > 0``: accepted at (or just inside) the edge, refused just
  past it;
* the documented defaults by their effect: ``pg_objective="clip"``, ``eps_low=0.2`` with ``eps_high=None`` meaning
  ``eps_low``, SAPO's ``1.0``/``1.05`` (TRL's and verl's), ``ratio_level="token"``,
  ``loss_agg_mode="seq-mean-token-mean"``, ``kl_coef=0``, ``kl_estimator="k3"``, ``kl_ratio_weighted=False``,
  ``max_log_ratio=20`` (verl);
* the clip metrics use the strict inequalities of the docstring (``r < 1 - eps_low`` and ``A < 0``; ``r > 1 +
  eps_high`` and ``A > 0``), tested at ``r`` exactly on the clip edge and at ``A = 0``; dual-clip counts a token where
  the clipped loss exceeds ``-c A`` strictly (verl 0.9.1 ``compute_policy_loss``: ``clip_pg_losses1 > pg_losses3``);
* float64 inputs give float64 losses and metrics, SAPO's temperatures included (1.05 is not rounded to float32).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from grpo_ref._checks import NonFiniteInputError
from grpo_ref import policy_loss
from grpo_ref.kl import KL_ESTIMATORS, kl_estimate
from refusals import names as _names, refused as _refused, refused_nonfinite as _refused_nonfinite

DT = torch.float64
B, T = 3, 4  # B != T: a reduction or a broadcast over the wrong axis shows
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=DT)





def _batch(seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=DT) * 2 - 0.1
    old = lp + torch.randn(B, T, generator=g, dtype=DT) * spread
    ref = lp + torch.randn(B, T, generator=g, dtype=DT) * 0.5
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=DT)
    return lp, old, adv, ref


def _call(**kw):
    lp, old, adv, ref = _batch()
    args = dict(logp=lp, old_logp=old, advantages=adv, mask=MASK)
    args.update(kw)
    return policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


def _loss(**kw) -> float:
    return float(_call(**kw)[0])


# ------------------------------------------------------------------------------------------------ refusals by name
@pytest.mark.parametrize("arg,bad", [
    ("pg_objective", "ppo"), ("pg_objective", "CLIP"), ("pg_objective", None),
    ("ratio_level", "seq"), ("ratio_level", "TOKEN"), ("ratio_level", None),
    ("kl_estimator", "k4"), ("kl_estimator", "K3"), ("kl_estimator", None),
    ("loss_agg_mode", "mean"), ("loss_agg_mode", None),
])
def test_choices_refused_by_name(arg, bad):
    _refused(lambda: _call(**{arg: bad}), arg)


@pytest.mark.parametrize("arg,ok,bad", [
    ("eps_low", [1e-300, 0.5, 1.0], [0.0, -0.1, 1.0 + 1e-12, 1.5, math.nan, math.inf, True, "0.2"]),
    ("eps_high", [1e-300, 0.5, 1.0, 5.0], [0.0, -0.1, math.nan, math.inf, True, "0.2"]),
    ("dual_clip", [1.0 + 1e-9, 3.0], [1.0, 0.5, 0.0, -3.0, math.nan, math.inf, True]),
    ("sapo_tau_pos", [1e-3, 0.5, 4.0], [0.0, -1.0, math.nan, math.inf, True]),
    ("sapo_tau_neg", [1e-3, 0.5, 4.0], [0.0, -1.0, math.nan, math.inf, True]),
    ("kl_coef", [0.0, 0.5, 2.0], [-1e-300, -0.5, math.nan, math.inf, True]),
    ("max_log_ratio", [1e-3, 0.5, 20.0], [0.0, -1.0, math.nan, math.inf, True]),
])
def test_hyperparameter_bounds_at_their_edges(arg, ok, bad):
    _, _, _, ref = _batch()
    extra = dict(pg_objective="sapo") if arg.startswith("sapo") else {}
    if arg == "kl_coef":
        extra = dict(ref_logp=ref)
    for value in ok:
        loss, _ = _call(**{arg: value}, **extra)
        assert bool(torch.isfinite(loss)), (arg, value)
    for value in bad:
        _refused(lambda: _call(**{arg: value}, **extra), arg)


def test_kl_ratio_weighted_must_be_bool():
    for bad in (1, 0, "yes", None):
        _refused(lambda: _call(kl_ratio_weighted=bad), "kl_ratio_weighted")


@pytest.mark.parametrize("objective", ["cispo", "sapo"])
def test_dual_clip_only_with_clip_names_both(objective):
    _refused(lambda: _call(pg_objective=objective, dual_clip=3.0), "dual_clip", "pg_objective")


@pytest.mark.parametrize("kl_coef", [0.5, 1e-12, 3.0])
def test_positive_kl_coef_needs_ref_logp(kl_coef):
    _refused(lambda: _call(kl_coef=kl_coef), "kl_coef", "ref_logp")


def test_zero_kl_coef_needs_no_ref_logp():
    loss, metrics = _call(kl_coef=0.0)
    assert "kl_ref" not in metrics and bool(torch.isfinite(loss))


def test_logp_refused_by_name():
    lp, old, adv, _ = _batch()
    _refused(lambda: policy_loss(lp < -1, old, adv, MASK), "logp")
    _refused(lambda: policy_loss(lp.tolist(), old, adv, MASK), "logp")
    _refused(lambda: policy_loss(torch.complex(lp, lp), old, adv, MASK), "logp")
    _refused(lambda: policy_loss(lp[0], old[0], adv[:1], MASK[0]), "logp")
    _refused(lambda: policy_loss(lp[None], old[None], adv, MASK[None]), "logp")
    bad = lp.clone()
    bad[1, 3] = math.nan  # masked in
    _refused_nonfinite(lambda: policy_loss(bad, old, adv, MASK), "logp")


def test_each_tensor_shape_refused_on_its_own():
    lp, old, adv, ref = _batch()
    ent = torch.rand(B, T, dtype=DT)
    _refused(lambda: policy_loss(lp, old[:, :3], adv, MASK), "old_logp")
    _refused(lambda: policy_loss(lp, old[:2], adv, MASK), "old_logp")
    _refused(lambda: policy_loss(lp, old, adv, MASK[:, :3]), "mask")
    _refused(lambda: policy_loss(lp, old, adv, MASK[:2]), "mask")
    _refused(lambda: policy_loss(lp, old, adv, MASK, ref_logp=ref[:, :3]), "ref_logp")
    _refused(lambda: policy_loss(lp, old, adv, MASK, ref_logp=ref[:2], kl_coef=0.1), "ref_logp")
    _refused(lambda: policy_loss(lp, old, adv, MASK, entropy=ent[:, :3]), "entropy")
    _refused(lambda: policy_loss(lp, old, adv, MASK, entropy=ent[:2]), "entropy")
    for bad_adv in (adv[:2], torch.zeros(T, dtype=DT), adv[None], torch.zeros(B, T + 1, dtype=DT),
                    torch.zeros(B, T, 1, dtype=DT), adv[0]):
        _refused(lambda: policy_loss(lp, old, bad_adv, MASK), "advantages")


def test_each_tensor_dtype_refused_on_its_own():
    lp, old, adv, ref = _batch()
    _refused(lambda: policy_loss(lp, old > -1, adv, MASK), "old_logp")
    _refused(lambda: policy_loss(lp, old.tolist(), adv, MASK), "old_logp")
    _refused(lambda: policy_loss(lp, old, adv > 0, MASK), "advantages")
    _refused(lambda: policy_loss(lp, old, adv.tolist(), MASK), "advantages")
    _refused(lambda: policy_loss(lp, old, adv, MASK.tolist()), "mask")
    _refused(lambda: policy_loss(lp, old, adv, MASK * 2), "mask")
    _refused(lambda: policy_loss(lp, old, adv, MASK, ref_logp=ref > -1), "ref_logp")
    _refused(lambda: policy_loss(lp, old, adv, MASK, entropy=torch.ones(B, T, dtype=torch.bool)), "entropy")


def test_nonfinite_refused_by_name_at_masked_in_positions_only():
    lp, old, adv, ref = _batch()
    ent = torch.rand(B, T, dtype=DT)
    at_in, at_out = (1, 3), (0, 3)
    for name in ("old_logp", "ref_logp", "entropy"):
        base = dict(old_logp=old, ref_logp=ref, entropy=ent)
        bad = base[name].clone()
        bad[at_in] = math.nan
        _refused_nonfinite(lambda: policy_loss(lp, **{**base, name: bad}, advantages=adv, mask=MASK, kl_coef=0.1), name)
        free = base[name].clone()
        free[at_out] = math.inf
        loss, _ = policy_loss(lp, **{**base, name: free}, advantages=adv, mask=MASK, kl_coef=0.1)
        assert bool(torch.isfinite(loss))
    adv_tok = adv[:, None].expand(B, T).clone()
    adv_tok[at_in] = math.inf
    _refused_nonfinite(lambda: policy_loss(lp, old, adv_tok, MASK), "advantages")
    adv_tok = adv[:, None].expand(B, T).clone()
    adv_tok[at_out] = math.nan
    assert bool(torch.isfinite(policy_loss(lp, old, adv_tok, MASK)[0]))


def test_sequence_advantage_checked_only_for_sequences_with_a_token():
    lp, old, adv, _ = _batch()
    m = MASK.clone()
    m[2] = 0.0  # sequence 2 has no token: its advantage may be NaN
    bad = adv.clone()
    bad[2] = math.nan
    loss, _ = policy_loss(lp, old, bad, m)
    assert float(loss) == float(policy_loss(lp, old, adv, m)[0])
    bad = adv.clone()
    bad[1] = math.inf
    _refused_nonfinite(lambda: policy_loss(lp, old, bad, m), "advantages")


def test_no_response_position_gives_zero_even_with_nan_advantages():
    z = torch.zeros(B, 0, dtype=DT)
    adv = torch.tensor([math.nan, 1.0, -1.0], dtype=DT)
    loss, metrics = policy_loss(z, z, adv, z)
    assert float(loss) == 0.0 and loss.dtype == DT
    assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0


# ------------------------------------------------------------------------------------------------ defaults
def test_defaults_equal_their_documented_values():
    _, _, _, ref = _batch()
    default = _loss()
    explicit = _loss(pg_objective="clip", eps_low=0.2, eps_high=0.2, dual_clip=None, ratio_level="token",
                     loss_agg_mode="seq-mean-token-mean", norm_length=None, num_tokens=None, kl_coef=0.0,
                     max_log_ratio=20.0)
    assert default == explicit
    kl_default = _loss(ref_logp=ref, kl_coef=0.3)
    assert kl_default == _loss(ref_logp=ref, kl_coef=0.3, kl_estimator="k3", kl_ratio_weighted=False)
    sapo_default = _loss(pg_objective="sapo")
    assert sapo_default == _loss(pg_objective="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05)


def test_defaults_differ_from_their_alternatives_where_they_bind():
    lp, old, adv, ref = _batch(spread=0.6)  # ratios well outside [0.8, 1.2]: the clip binds
    default = _loss()
    assert not math.isclose(default, _loss(eps_low=0.5))
    assert not math.isclose(default, _loss(eps_high=0.5))  # eps_high=None follows eps_low, not a fixed value
    assert not math.isclose(_loss(eps_low=0.4), _loss(eps_low=0.4, eps_high=0.2))
    assert not math.isclose(default, _loss(pg_objective="cispo"))
    assert not math.isclose(default, _loss(loss_agg_mode="token-mean"))
    assert not math.isclose(default, _loss(ratio_level="sequence"))
    sapo = _loss(pg_objective="sapo")
    assert not math.isclose(sapo, _loss(pg_objective="sapo", sapo_tau_pos=2.0))
    assert not math.isclose(sapo, _loss(pg_objective="sapo", sapo_tau_neg=2.05))
    with_ref = _call(ref_logp=ref)  # kl_coef = 0 by default: the KL is only reported
    assert float(with_ref[0]) == default and "kl_ref" in with_ref[1]
    kl = _loss(ref_logp=ref, kl_coef=0.3)
    assert not math.isclose(kl, _loss(ref_logp=ref, kl_coef=0.3, kl_estimator="k1"))
    assert not math.isclose(kl, _loss(ref_logp=ref, kl_coef=0.3, kl_ratio_weighted=True))


def test_max_log_ratio_default_is_twenty():
    lp = torch.full((1, 2), -1.0, dtype=DT)
    old = lp - torch.tensor([[25.0, 20.5]], dtype=DT)  # log-ratios beyond 20
    m = torch.ones(1, 2, dtype=DT)
    _, metrics = policy_loss(lp, old, torch.tensor([1.0], dtype=DT), m)
    assert float(metrics["ratio_max"]) == math.exp(20.0)
    assert float(metrics["ratio_min"]) == math.exp(20.0)
    _, metrics = policy_loss(lp, old, torch.tensor([1.0], dtype=DT), m, max_log_ratio=21.0)
    assert float(metrics["ratio_min"]) == math.exp(20.5)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_max_log_ratio_clamps_from_below_too(ratio_level):
    """``lp - old`` is clamped to ``-max_log_ratio`` from below as well: a token 30 nats less likely under the
    current policy reports ``r = exp(-20)`` and ``approx_kl = expm1(-20) + 20``, and (the clamp being active) gets
    no gradient, while its unclamped neighbour does."""
    lp = torch.tensor([[-31.0, -1.0]], dtype=DT, requires_grad=True)
    old = torch.tensor([[-1.0, -1.5]], dtype=DT)  # log-ratios -30 (beyond the bound) and +0.5
    m = torch.ones(1, 2, dtype=DT)
    loss, metrics = policy_loss(lp, old, torch.tensor([1.0], dtype=DT), m, ratio_level=ratio_level, eps_low=1.0,
                                eps_high=10.0)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() != 0.0
    assert float(metrics["approx_kl"]) == pytest.approx(((math.expm1(-20.0) + 20.0) + (math.expm1(0.5) - 0.5)) / 2)
    if ratio_level == "token":  # exp(-20), not exp(-30): within float64 rounding of libm's exp (other CPUs)
        assert float(metrics["ratio_min"]) == pytest.approx(math.exp(-20.0), rel=1e-13)
    else:  # the GSPO ratio is the exponential of the mean of the clamped log-ratios
        assert float(metrics["ratio_min"]) == pytest.approx(math.exp((-20.0 + 0.5) / 2))


def test_an_overflowing_loss_is_refused_as_the_policy_loss():
    """Finite but extreme inputs that overflow the loss are refused by a ``NonFiniteInputError`` whose subject is
    "the policy loss" and whose hint names the scaling argument."""
    lp, old, adv, _ = _batch()
    with pytest.raises(NonFiniteInputError) as info:  # k3 = e^3 - 3 - 1 = 16 per token: 1.6e309 > float64's max
        policy_loss(lp, old, adv, MASK, ref_logp=lp + 3.0, kl_coef=1e308)
    assert info.value.name == "the policy loss"
    assert str(info.value).startswith("the policy loss overflowed to ") and _names(str(info.value), "kl_coef")


# ------------------------------------------------------------------------------------------------ float64
@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_float64_in_float64_out(objective, ratio_level):
    lp, old, adv, ref = _batch()
    loss, metrics = policy_loss(lp, old, adv, MASK, pg_objective=objective, ratio_level=ratio_level, ref_logp=ref,
                                kl_coef=0.1, entropy=torch.rand(B, T, dtype=DT))
    assert loss.dtype == DT
    for k, v in metrics.items():
        assert v.dtype == DT, k
    empty = policy_loss(lp, old, adv, torch.zeros(B, T), pg_objective=objective, ratio_level=ratio_level)[1]
    for k, v in empty.items():
        assert v.dtype == DT, k


def test_float32_old_logp_is_promoted_to_logp_dtype():
    lp, old, adv, _ = _batch()
    got = policy_loss(lp, old.float(), adv.float(), MASK)[0]
    ref = policy_loss(lp, old.float().double(), adv.float().double(), MASK)[0]
    assert got.dtype == DT and float(got) == float(ref)


def _sapo_loop(lp, old, adv, m, tau_pos, tau_neg):
    """SAPO (arXiv 2511.20347), ``-(4 / tau) sigmoid(tau (r - 1)) A``, seq-mean-token-mean, Python floats."""
    total = 0.0
    for i in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if m[i, t] > 0]
        s = 0.0
        for t in toks:
            r = math.exp(float(lp[i, t]) - float(old[i, t]))
            a = float(adv[i])
            tau = tau_pos if a > 0 else tau_neg
            s += -(4.0 / tau) * a / (1.0 + math.exp(-tau * (r - 1.0)))
        total += s / max(len(toks), 1)
    return total / lp.shape[0]


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.3, 1.7), (1.05, 0.1)])
def test_sapo_in_float64_uses_exact_temperatures(taus):
    lp, old, _, _ = _batch(spread=1.0)
    adv = torch.tensor([0.5, -0.25, 2.0], dtype=DT)  # a positive advantage below 1 selects tau_pos
    got = float(policy_loss(lp, old, adv, MASK, pg_objective="sapo", sapo_tau_pos=taus[0], sapo_tau_neg=taus[1])[0])
    assert math.isclose(got, _sapo_loop(lp, old, adv, MASK, *taus), rel_tol=1e-13)


# ------------------------------------------------------------------------------------------- clip metrics at the edges
def _one_row(ratios, adv, **kw):
    r = torch.tensor([ratios], dtype=DT)
    lp = torch.full_like(r, -1.0)
    old = lp - torch.log(r)
    return policy_loss(lp, old, torch.tensor([adv], dtype=DT), torch.ones_like(r), **kw)


def test_clip_fracs_are_strict_at_the_clip_edges():
    # eps_low = eps_high = 0.5: the edges 0.5 and 1.5 are exact in binary, and so are the ratios
    _, m = _one_row([0.5, 0.25, 1.0], -1.0, eps_low=0.5, eps_high=0.5)
    assert float(m["clip_frac_low"]) == 1 / 3  # 0.25 only: at r = 1 - eps_low the clip is not active
    _, m = _one_row([1.5, 2.0, 1.0], 1.0, eps_low=0.5, eps_high=0.5)
    assert float(m["clip_frac_high"]) == 1 / 3  # 2.0 only
    # A = 0: no clip counts on either side, whatever the ratio
    _, m = _one_row([0.25, 2.0], 0.0, eps_low=0.5, eps_high=0.5)
    assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac_high"]) == 0.0
    # 0 < A < 1 counts above like any positive advantage; -1 < A < 0 below
    _, m = _one_row([0.25, 2.0], 0.5, eps_low=0.5, eps_high=0.5)
    assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac_high"]) == 0.5
    _, m = _one_row([0.25, 2.0], -0.5, eps_low=0.5, eps_high=0.5)
    assert float(m["clip_frac_low"]) == 0.5 and float(m["clip_frac_high"]) == 0.0


def test_cispo_clamp_fracs_are_strict_at_the_edges():
    _, m = _one_row([0.5, 0.25, 1.5, 2.0, 1.0], 0.7, pg_objective="cispo", eps_low=0.5, eps_high=0.5)
    assert float(m["clip_frac_low"]) == 0.2 and float(m["clip_frac_high"]) == 0.2  # whatever the sign of A
    _, m = _one_row([0.5, 0.25, 1.5, 2.0, 1.0], -0.7, pg_objective="cispo", eps_low=0.5, eps_high=0.5)
    assert float(m["clip_frac_low"]) == 0.2 and float(m["clip_frac_high"]) == 0.2


def test_dual_clip_frac_is_strict_and_negative_advantages_only():
    # c = 2, A = -1: the cap -c A = 2 binds where the clipped loss -A max(r, clip(r)) exceeds 2, i.e. r > 2
    _, m = _one_row([2.0, 4.0, 1.0, 3.0], -1.0, dual_clip=2.0, eps_high=0.5)
    assert float(m["dual_clip_frac"]) == 0.5  # 4 and 3; at r = c exactly the loss equals the cap
    loss, m = _one_row([4.0, 3.0], 1.0, dual_clip=2.0)
    assert float(m["dual_clip_frac"]) == 0.0
    loss, m = _one_row([4.0, 3.0], 0.0, dual_clip=2.0)
    assert float(m["dual_clip_frac"]) == 0.0 and float(loss) == 0.0


def test_dual_clip_loss_is_capped_at_minus_c_a():
    loss, _ = _one_row([4.0, 8.0], -0.5, dual_clip=3.0)
    assert float(loss) == 1.5  # both tokens at the cap -c A = 1.5
    loss, _ = _one_row([4.0, 8.0], -0.5)
    assert math.isclose(float(loss), 3.0, rel_tol=1e-14)  # without dual clip: -A r, the mean of 2 and 4


def test_ratio_metrics_cover_masked_in_tokens_only():
    r = torch.tensor([[1.5, 2.0, 7.0], [1.25, 2.5, 0.1]], dtype=DT)
    lp = torch.full_like(r, -1.0)
    m = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=DT)
    _, met = policy_loss(lp, lp - torch.log(r), torch.tensor([1.0, -1.0], dtype=DT), m)
    assert float(met["ratio_min"]) == 1.25 and float(met["ratio_max"]) == 2.5
    assert math.isclose(float(met["ratio_mean"]), (1.5 + 2.0 + 1.25 + 2.5) / 4, rel_tol=1e-15)
    approx = sum(x - 1 - math.log(x) for x in (1.5, 2.0, 1.25, 2.5)) / 4  # k3 of KL(pi_old || pi_theta)
    assert math.isclose(float(met["approx_kl"]), approx, rel_tol=1e-12)


def test_entropy_and_kl_ref_metrics_are_masked_means():
    lp, old, adv, ref = _batch()
    ent = torch.rand(B, T, dtype=DT, generator=torch.Generator().manual_seed(3))
    ent[0, 3] = math.inf  # padding
    _, met = policy_loss(lp, old, adv, MASK, entropy=ent, ref_logp=ref, kl_estimator="k1")
    sel = MASK > 0
    assert math.isclose(float(met["entropy"]), float(ent[sel].mean()), rel_tol=1e-12)
    kl = kl_estimate(lp, ref, "k1")
    assert math.isclose(float(met["kl_ref"]), float(kl[sel].mean()), rel_tol=1e-12)
    _, met = policy_loss(lp, old, adv, MASK)
    assert "entropy" not in met and "kl_ref" not in met


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_term_in_the_loss_is_kl_coef_times_the_estimator(estimator):
    lp, old, adv, ref = _batch()
    base = _loss()
    got = _loss(ref_logp=ref, kl_coef=0.25, kl_estimator=estimator)
    kl = kl_estimate(lp, ref, estimator)
    sel = MASK > 0
    per_seq = [float(kl[i][sel[i]].mean()) if bool(sel[i].any()) else 0.0 for i in range(B)]
    assert math.isclose(got - base, 0.25 * sum(per_seq) / B, rel_tol=1e-10, abs_tol=1e-14)


def test_dual_clip_leaves_positive_advantages_alone():
    for adv in (0.5, 2.0):  # 0 < A < 1 included: only A < 0 is capped
        for ratios in ([4.0, 0.25, 1.0], [1.5, 2.5]):
            with_dual = _one_row(ratios, adv, dual_clip=2.0)
            without = _one_row(ratios, adv)
            assert float(with_dual[0]) == float(without[0])
            assert float(with_dual[1]["dual_clip_frac"]) == 0.0


def test_empty_batch_gives_zero():
    z = torch.zeros(0, T, dtype=DT)
    for objective in ("clip", "cispo", "sapo"):
        loss, metrics = policy_loss(z, z, torch.zeros(0, dtype=DT), z, pg_objective=objective, ref_logp=z,
                                    kl_coef=0.1, entropy=z)
        assert float(loss) == 0.0 and loss.dtype == DT
        assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0


def test_kl_term_uses_the_log_ratio_clamp():
    # a reference far from the policy: k3 = exp(ref - lp) - (ref - lp) - 1 would overflow without the clamp
    lp, old, adv, _ = _batch()
    ref = lp + 800.0
    for mlr in (20.0, 5.0):
        loss, metrics = policy_loss(lp, old, adv, MASK, ref_logp=ref, kl_coef=0.1, max_log_ratio=mlr)
        assert bool(torch.isfinite(loss))
        expected = kl_estimate(lp, ref, "k3", max_log_ratio=mlr)[MASK > 0].mean()
        assert math.isclose(float(metrics["kl_ref"]), float(expected), rel_tol=1e-12)


@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
def test_sequence_ratio_of_a_one_token_sequence_is_its_token_ratio(objective):
    lp, old, adv, _ = _batch(spread=0.3)
    m = torch.zeros(B, T, dtype=DT)
    m[0, 1] = m[1, 2] = m[2, 0] = 1.0  # one token per sequence: GSPO's s_i is that token's ratio
    tok = policy_loss(lp, old, adv, m, pg_objective=objective)
    seq = policy_loss(lp, old, adv, m, pg_objective=objective, ratio_level="sequence")
    assert math.isclose(float(tok[0]), float(seq[0]), rel_tol=1e-12)
    assert math.isclose(float(tok[1]["ratio_mean"]), float(seq[1]["ratio_mean"]), rel_tol=1e-12)


@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
def test_loss_dtype_follows_logp_not_the_constant_inputs(objective):
    # the constant inputs (old_logp, advantages, ref_logp, entropy) are cast to logp's dtype: float64 ones do not
    # promote a float32 loss
    lp, old, adv, ref = _batch()
    loss, metrics = policy_loss(lp.float(), old, adv, MASK, pg_objective=objective, ref_logp=ref, kl_coef=0.1,
                                entropy=torch.rand(B, T, dtype=DT))
    assert loss.dtype == torch.float32
    for k, v in metrics.items():
        assert v.dtype == torch.float32, k


def test_norm_length_and_num_tokens_reach_the_aggregation():
    lp, old, adv, _ = _batch()
    tok_sum = _loss(loss_agg_mode="token-sum")
    assert math.isclose(_loss(loss_agg_mode="token-mean", num_tokens=7.0), tok_sum / 7.0, rel_tol=1e-12)
    seq_sum = _loss(loss_agg_mode="seq-mean-token-sum")
    assert math.isclose(_loss(loss_agg_mode="seq-mean-token-sum-norm", norm_length=13.0), seq_sum / 13.0, rel_tol=1e-12)
    assert math.isclose(_loss(loss_agg_mode="seq-mean-token-sum-norm"), seq_sum / T, rel_tol=1e-12)
    _refused(lambda: _call(loss_agg_mode="seq-mean-token-mean", num_tokens=7.0), "num_tokens", "loss_agg_mode")
    _refused(lambda: _call(loss_agg_mode="token-mean", num_tokens=0.0), "num_tokens")
    _refused(lambda: _call(loss_agg_mode="seq-mean-token-sum-norm", norm_length=0.0), "norm_length")


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_gradient_at_the_log_ratio_bound_is_autograd_of_the_clamped_objective(ratio_level):
    """At ``|lp - old| = max_log_ratio`` exactly (and a GSPO mean on the bound), the clamp is not active: the
    gradient is the one autograd gives the clamped objective (torch's clamp passes it at the bound), at both ratio
    levels; strictly beyond the bound it is 0 (``test_policy_loss.test_gspo_gradient_respects_the_log_ratio_clamp``)."""
    mlr = 2.0
    lp = torch.tensor([[-1.0, -1.5, -0.5]], dtype=DT, requires_grad=True)
    old = lp.detach() - mlr  # every log-ratio exactly on the bound, and so is their mean
    adv, mask = torch.tensor([-1.0], dtype=DT), torch.ones(1, 3, dtype=DT)
    loss, _ = policy_loss(lp, old, adv, mask, ratio_level=ratio_level, max_log_ratio=mlr)
    (got,) = torch.autograd.grad(loss, lp)
    lr = torch.clamp(lp - old, -mlr, mlr)
    if ratio_level == "token":
        r = torch.exp(lr)
        slow = torch.maximum(-adv[0] * r, -adv[0] * torch.clamp(r, 0.8, 1.2)).mean()
    else:
        s = torch.exp(torch.clamp(lr.mean(), -mlr, mlr))
        slow = torch.maximum(-adv[0] * s, -adv[0] * torch.clamp(s, 0.8, 1.2))
    (want,) = torch.autograd.grad(slow, lp)
    assert bool((want != 0).all())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_zero_kl_coef_keeps_an_overflowing_kl_out_of_the_loss():
    # kl_coef = 0 (the default) only reports the KL: a reference so far that k3 overflows (exp(800)) under a wide
    # max_log_ratio leaves the loss finite and equal to the loss without ref_logp
    lp, old, adv, _ = _batch()
    ref = lp + 800.0
    loss, metrics = policy_loss(lp, old, adv, MASK, ref_logp=ref, max_log_ratio=1000.0)
    assert bool(torch.isfinite(loss)) and math.isinf(float(metrics["kl_ref"]))
    assert float(loss) == float(policy_loss(lp, old, adv, MASK, max_log_ratio=1000.0)[0])
