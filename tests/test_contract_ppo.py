"""The contract of ``grpo_ref.ppo`` (``value_loss``, ``entropy_bonus``, ``kl_in_reward``) as the docstrings state it,
pinned where the mutation run of issue 13 found it loose.

* each function against a slow loop written from its equation, in float64, on a ragged batch whose rows include an
  empty response, a response whose only token is at position 0, a hole in the mask, and a full row;
* the documented defaults by their effect: ``value_loss``'s ``clip_range = 0.2`` (equal to 0.2 passed explicitly,
  different from 1.2 and from no clip where the clip binds) and ``loss_agg_mode = "token-mean"``, ``entropy_bonus``'s
  ``"token-mean"``, ``kl_in_reward``'s ``estimator = "k1"`` and the log-ratio clamp ``max_log_ratio = 20`` that the
  book states for every preset;
* padding may hold anything (NaN/inf never reaches a value or a gradient), the result is in the dtype of the first
  tensor (``values`` / ``logp``, at least float32) whatever the dtype of the constants;
* every refusal names the caller's argument as a whole word: the shape of *each* tensor argument alone, each dtype,
  NaN/inf at a masked-in position of each tensor, each scalar at and just past the edge of its domain.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import grpo_ref as G
from grpo_ref._checks import NonFiniteInputError
from grpo_ref.kl import KL_ESTIMATORS, kl_estimate

F64 = torch.float64
NAN, INF = math.nan, math.inf
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# rows: full; a hole; only position 0; empty; ends at T - 1 after padding on the left
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=F64)
B, T = MASK.shape


def _names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def _refused(call, arg: str, exc=ValueError):
    with pytest.raises(exc) as info:
        call()
    assert _names(str(info.value), arg), f"{arg!r} not named in: {info.value}"
    return info.value


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def slow_aggregate(per_token, mask, mode):
    """verl's ``agg_loss`` modes over Python floats (``seq-mean-token-sum-norm`` divides by ``T``)."""
    rows = [[x for x, m in zip(r, mr, strict=True) if m] for r, mr in zip(per_token, mask, strict=True)]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / max(n, 1)
    if mode == "token-sum":
        return sum(sum(r) for r in rows)
    if mode == "seq-mean-token-mean":
        seq = [sum(r) / max(len(r), 1) for r in rows]
    elif mode == "seq-mean-token-sum":
        seq = [sum(r) for r in rows]
    else:
        seq = [sum(r) / len(mask[0]) for r in rows]
    return sum(seq) / len(seq)


# -- value_loss -------------------------------------------------------------------------------------------------------
def _value_batch(seed: int = 0):
    """``values`` moved away from ``old_values`` by up to +-1.5, so a clip of 0.2 binds on both sides on some tokens
    and not on others; ``returns`` on either side."""
    g = _gen(seed)
    old = torch.randn(B, T, generator=g, dtype=F64)
    values = old + (torch.rand(B, T, generator=g, dtype=F64) * 3 - 1.5)
    values[0, 1] = old[0, 1] + 0.05  # inside any clip range: the clipped error equals the plain one
    returns = old + torch.randn(B, T, generator=g, dtype=F64)
    return values, old, returns


def slow_value_loss(v, old, ret, mask, clip, mode):
    """PPO2's ``0.5 * agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))`` token by token; the clip fraction
    counts the tokens where the clipped error is strictly larger."""
    per, clipped = [], []
    for i in range(v.shape[0]):
        pr, cr = [], []
        for t in range(v.shape[1]):
            e = (float(v[i, t]) - float(ret[i, t])) ** 2
            if clip is None:
                pr.append(e)
                cr.append(0.0)
                continue
            vc = min(max(float(v[i, t]), float(old[i, t]) - clip), float(old[i, t]) + clip)
            ec = (vc - float(ret[i, t])) ** 2
            pr.append(max(e, ec))
            cr.append(1.0 if ec > e else 0.0)
        per.append(pr)
        clipped.append(cr)
    m = mask.tolist()
    n = max(sum(sum(r) for r in m), 1)
    frac = sum(c * mm for cr, mr in zip(clipped, m, strict=True) for c, mm in zip(cr, mr, strict=True)) / n
    mean_v = sum(float(v[i, t]) * m[i][t] for i in range(v.shape[0]) for t in range(v.shape[1])) / n
    return 0.5 * slow_aggregate(per, m, mode), frac, mean_v


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip", [0.2, 0.7, None])
def test_value_loss_against_slow_loop(mode, clip):
    values, old, ret = _value_batch()
    loss, metrics = G.value_loss(values, old, ret, MASK, clip_range=clip, loss_agg_mode=mode)
    want, frac, mean_v = slow_value_loss(values, old, ret, MASK, clip, mode)
    assert loss.dtype == F64 and loss.shape == ()
    assert float(loss) == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert set(metrics) == {"vf_clip_frac", "value_mean"}
    assert float(metrics["vf_clip_frac"]) == pytest.approx(frac, rel=1e-12, abs=0)
    assert float(metrics["value_mean"]) == pytest.approx(mean_v, rel=1e-12, abs=1e-14)
    assert not any(x.requires_grad for x in metrics.values())
    if clip is not None and mode == "token-mean":
        assert 0 < frac < 1  # the clip binds on some tokens and not on others


def test_value_loss_gradient_is_the_clipped_objective():
    """Gradient through ``values`` only: ``(V - R)`` where the plain error wins, 0 where the clipped value (a
    constant past the clip) wins, divided by the token count; 0 at padding."""
    values, old, ret = _value_batch(1)
    v = values.clone().requires_grad_(True)
    loss, _ = G.value_loss(v, old, ret, MASK, clip_range=0.2)
    loss.backward()
    vc = torch.minimum(torch.maximum(values, old - 0.2), old + 0.2)
    plain = (values - ret) ** 2 >= (vc - ret) ** 2
    want = torch.where(plain, values - ret, torch.zeros_like(values)) * MASK / MASK.sum()
    torch.testing.assert_close(v.grad, want, rtol=1e-13, atol=1e-15)


def test_value_loss_default_clip_range_is_0_2_by_its_effect():
    values, old, ret = _value_batch(2)
    default, dm = G.value_loss(values, old, ret, MASK)
    explicit, em = G.value_loss(values, old, ret, MASK, clip_range=0.2)
    assert torch.equal(default, explicit) and torch.equal(dm["vf_clip_frac"], em["vf_clip_frac"])
    for other in (1.2, 0.3, None):
        assert float(G.value_loss(values, old, ret, MASK, clip_range=other)[0]) != float(default), other


def test_value_loss_default_agg_mode_is_token_mean():
    values, old, ret = _value_batch(3)
    default, _ = G.value_loss(values, old, ret, MASK, 0.2)
    assert torch.equal(default, G.value_loss(values, old, ret, MASK, 0.2, "token-mean")[0])
    assert float(default) != float(G.value_loss(values, old, ret, MASK, 0.2, "seq-mean-token-mean")[0])


@pytest.mark.parametrize("garbage", [NAN, INF, -INF, 1e30])
def test_value_loss_padding_reaches_neither_value_nor_gradient(garbage):
    values, old, ret = _value_batch(4)
    off = MASK == 0
    clean = values.clone().requires_grad_(True)
    loss, metrics = G.value_loss(clean, old, ret, MASK)
    loss.backward()
    dirty = torch.where(off, torch.full_like(values, garbage), values).requires_grad_(True)
    loss_p, metrics_p = G.value_loss(dirty, torch.where(off, garbage, old), torch.where(off, garbage, ret), MASK)
    loss_p.backward()
    assert torch.equal(loss_p, loss)
    assert all(torch.equal(metrics_p[k], metrics[k]) for k in metrics)
    assert torch.equal(dirty.grad, clean.grad) and torch.equal(dirty.grad[off], torch.zeros_like(dirty.grad[off]))


def test_value_loss_result_in_the_dtype_of_values():
    values, old, ret = _value_batch(5)
    loss32, m32 = G.value_loss(values.float(), old, ret, MASK)  # float64 constants, float32 values
    assert loss32.dtype == torch.float32 and all(x.dtype == torch.float32 for x in m32.values())
    torch.testing.assert_close(loss32, G.value_loss(values.float(), old.float(), ret.float(), MASK)[0], rtol=0, atol=0)
    loss64, m64 = G.value_loss(values, old.float(), ret.float(), MASK.float())
    assert loss64.dtype == F64 and all(x.dtype == F64 for x in m64.values())


def test_value_loss_clip_range_domain():
    """``None`` or finite ``> 0``: the open edge 0 is refused, the smallest positive float accepted."""
    values, old, ret = _value_batch(6)
    tiny, _ = G.value_loss(values, old, ret, MASK, clip_range=5e-324)
    assert torch.isfinite(tiny)
    for bad in (0.0, -0.0, -1e-300, -0.2, NAN, INF, -INF, True, "0.2"):
        err = _refused(lambda bad=bad: G.value_loss(values, old, ret, MASK, clip_range=bad), "clip_range")
        assert repr(bad) in str(err)  # the offending value


@pytest.mark.parametrize("arg", ["values", "old_values", "returns", "mask"])
def test_value_loss_refusals_name_each_tensor(arg):
    values, old, ret = _value_batch(7)
    kw = {"values": values, "old_values": old, "returns": ret, "mask": MASK}

    def call(x):
        return G.value_loss(**{**kw, arg: x})

    x = kw[arg]
    for bad_shape in (x[:, :-1], x[:-1], torch.cat([x, x[:, :1]], 1)):  # this argument alone has another shape
        err = _refused(lambda b=bad_shape: call(b), arg)
        assert str(tuple(bad_shape.shape)) in str(err)
    _refused(lambda: call(x.to(torch.complex128)), arg)
    _refused(lambda: call(x.tolist()), arg)
    if arg != "mask":
        _refused(lambda: call(x > 0), arg)  # a bool tensor is not a number here
        y = x.clone()
        y[1, 3] = NAN  # masked-in
        assert _refused(lambda: call(y), arg, NonFiniteInputError).name == arg
    else:
        y = x.clone()
        y[1, 2] = 2.0
        _refused(lambda: call(y), "mask")
    if arg == "values":
        _refused(lambda: call(x[0]), arg)  # 1-D
    _refused(lambda: G.value_loss(values, old, ret, MASK, loss_agg_mode="mean"), "loss_agg_mode")


# -- entropy_bonus ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", AGG_MODES)
def test_entropy_bonus_against_slow_loop(mode):
    h = torch.rand(B, T, generator=_gen(8), dtype=F64) * 2
    want = slow_aggregate(h.tolist(), MASK.tolist(), mode)
    assert float(G.entropy_bonus(h, MASK, mode)) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_entropy_bonus_default_mode_is_token_mean():
    h = torch.rand(B, T, generator=_gen(9), dtype=F64)
    default = G.entropy_bonus(h, MASK)
    assert torch.equal(default, G.entropy_bonus(h, MASK, "token-mean"))
    assert float(default) != float(G.entropy_bonus(h, MASK, "seq-mean-token-mean"))
    _refused(lambda: G.entropy_bonus(h[:, :-1], MASK), "entropy")
    _refused(lambda: G.entropy_bonus(h, MASK, "mean"), "loss_agg_mode")


# -- kl_in_reward -----------------------------------------------------------------------------------------------------
def _kl_batch(seed: int = 10, spread: float = 1.0):
    g = _gen(seed)
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    ref = lp + torch.randn(B, T, generator=g, dtype=F64) * spread
    scores = torch.randn(B, generator=g, dtype=F64)
    return scores, lp, ref


def slow_kl_in_reward(scores, lp, ref, mask, beta, estimator):
    """``r_t = -beta * k(t)`` on every response token, ``+ score`` on the last one (PPO-RLHF); k per element from
    :func:`grpo_ref.kl.kl_estimate` with its default clamp (a row of ``T`` tokens at a time)."""
    out = torch.zeros(lp.shape, dtype=lp.dtype)
    for i in range(lp.shape[0]):
        ts = [t for t in range(lp.shape[1]) if mask[i, t]]
        for t in ts:
            out[i, t] = -beta * float(kl_estimate(lp[i, t:t + 1], ref[i, t:t + 1], estimator))
        if ts:
            out[i, ts[-1]] += float(scores[i])
    return out


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_in_reward_against_slow_loop(estimator):
    scores, lp, ref = _kl_batch()
    ref[1, 1] = lp[1, 1] + 25.0  # past the clamp of 20, both signs
    ref[0, 4] = lp[0, 4] - 25.0
    r = G.kl_in_reward(scores, lp, ref, MASK, kl_coef=0.3, estimator=estimator)
    assert r.shape == (B, T) and r.dtype == F64 and not r.requires_grad
    torch.testing.assert_close(r, slow_kl_in_reward(scores, lp, ref, MASK, 0.3, estimator), rtol=1e-13, atol=1e-15)


def test_kl_in_reward_score_on_the_last_token_even_at_position_0():
    scores, lp, ref = _kl_batch(11)
    r = G.kl_in_reward(scores, lp, ref, MASK, kl_coef=0.0)
    want = torch.zeros(B, T, dtype=F64)
    for i, t in ((0, 4), (1, 3), (2, 0), (4, 4)):  # row 3 is empty: no token carries its score
        want[i, t] = scores[i]
    assert torch.equal(r, want)


def test_kl_in_reward_defaults_k1_and_the_clamp_at_20():
    """Default estimator k1; the per-token KL is ``kl_estimate``'s with its default ``max_log_ratio = 20``: a log-ratio
    of 25 counts as 20 (not 21, not 25)."""
    scores, lp, ref = _kl_batch(12)
    ref[0, 2] = lp[0, 2] - 25.0
    ref[4, 3] = lp[4, 3] + 25.0
    r = G.kl_in_reward(scores, lp, ref, MASK, kl_coef=0.5)
    assert torch.equal(r, G.kl_in_reward(scores, lp, ref, MASK, kl_coef=0.5, estimator="k1"))
    assert not torch.equal(r, G.kl_in_reward(scores, lp, ref, MASK, kl_coef=0.5, estimator="k3"))
    assert float(r[0, 2]) == -0.5 * 20.0 and float(r[4, 3]) == 0.5 * 20.0


def test_kl_in_reward_exact_in_float32():
    """float32 in, float32 out, and each reward is what float32 arithmetic gives: ``fl(-beta * k) + fl(score)``.
    The inputs put ``1 + 2^-24`` (a tie, rounded to 1 in float32) next to a KL reward of ``2^-30``: adding the score
    in float64 first would round the sum up instead."""
    lp = torch.zeros(1, 3)
    ref = torch.tensor([[0.0, 0.0, 2.0 ** -30]])
    scores = torch.tensor([1.0 + 2.0 ** -24], dtype=F64)
    r = G.kl_in_reward(scores, lp, ref, torch.ones(1, 3), kl_coef=1.0)
    assert r.dtype == torch.float32
    k = lp - ref
    want = -k
    want[0, 2] = want[0, 2] + scores.float()[0]
    assert torch.equal(r, want)


def test_kl_in_reward_in_the_dtype_of_logp():
    scores, lp, ref = _kl_batch(13)
    assert G.kl_in_reward(scores, lp.float(), ref, MASK, 0.1).dtype == torch.float32  # float64 ref and scores
    r64 = G.kl_in_reward(scores.float(), lp, ref.float(), MASK.float(), 0.1)
    assert r64.dtype == F64
    torch.testing.assert_close(r64, G.kl_in_reward(scores.float().double(), lp, ref.float().double(), MASK, 0.1),
                               rtol=0, atol=0)


@pytest.mark.parametrize("garbage", [NAN, INF, -INF])
def test_kl_in_reward_padding_may_hold_anything(garbage):
    scores, lp, ref = _kl_batch(14)
    off = MASK == 0
    clean = G.kl_in_reward(scores, lp, ref, MASK, 0.2, "k3")
    dirty = G.kl_in_reward(scores, torch.where(off, garbage, lp), torch.where(off, garbage, ref), MASK, 0.2, "k3")
    assert torch.equal(clean, dirty)


def test_kl_in_reward_empty_shapes():
    assert G.kl_in_reward(torch.zeros(2), torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), 0.1).shape == (2, 0)
    assert G.kl_in_reward(torch.zeros(0), torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), 0.1).shape == (0, 3)


def test_kl_in_reward_kl_coef_domain():
    scores, lp, ref = _kl_batch(15)
    zero = G.kl_in_reward(scores, lp, ref, MASK, kl_coef=0.0)  # the edge: accepted, only the scores remain
    assert float(zero.abs().sum()) == pytest.approx(float(scores[[0, 1, 2, 4]].abs().sum()), rel=1e-15)
    for bad in (-1e-300, -0.1, NAN, INF, -INF, True, None, "0.1"):
        _refused(lambda bad=bad: G.kl_in_reward(scores, lp, ref, MASK, kl_coef=bad), "kl_coef")


@pytest.mark.parametrize("arg", ["logp", "ref_logp", "mask"])
def test_kl_in_reward_refusals_name_each_tensor(arg):
    scores, lp, ref = _kl_batch(16)
    kw = {"scores": scores, "logp": lp, "ref_logp": ref, "mask": MASK, "kl_coef": 0.1}

    def call(x):
        return G.kl_in_reward(**{**kw, arg: x})

    x = kw[arg]
    for bad_shape in (x[:, :-1], x[:-1], torch.cat([x, x[:, :1]], 1)):  # this argument alone has another shape
        err = _refused(lambda b=bad_shape: call(b), arg)
        assert str(tuple(bad_shape.shape)) in str(err)
    _refused(lambda: call(x.to(torch.complex128)), arg)
    _refused(lambda: call(x.tolist()), arg)
    if arg != "mask":
        _refused(lambda: call(x > 0), arg)
        for bad in (NAN, INF, -INF):
            y = x.clone()
            y[1, 3] = bad  # masked-in
            assert _refused(lambda y=y: call(y), arg, NonFiniteInputError).name == arg
    else:
        y = x.clone()
        y[1, 2] = 0.5
        _refused(lambda: call(y), "mask")
    if arg == "logp":
        _refused(lambda: call(x[0]), arg)  # 1-D


def test_kl_in_reward_refuses_bad_scores_and_estimator_by_name():
    scores, lp, ref = _kl_batch(17)
    b = 3  # B != T, so that the expected [B] can be told from [T]
    for bad in (scores[:b - 1], scores[:b, None], scores[0], scores[:b + 1]):
        err = _refused(lambda bad=bad: G.kl_in_reward(bad, lp[:b], ref[:b], MASK[:b], 0.1), "scores")
        assert str(tuple(bad.shape)) in str(err) and f"[{b}]" in str(err)  # the offending shape and the expected [B]
    _refused(lambda: G.kl_in_reward(scores.to(torch.complex128), lp, ref, MASK, 0.1), "scores")
    _refused(lambda: G.kl_in_reward(scores.tolist(), lp, ref, MASK, 0.1), "scores")
    for bad in (NAN, INF):
        s = scores.clone()
        s[3] = bad  # even the score of the empty row: scores have no mask
        err = _refused(lambda s=s: G.kl_in_reward(s, lp, ref, MASK, 0.1), "scores", NonFiniteInputError)
        assert err.name == "scores"
    for bad in ("k2+", "kl", "K1", None):
        err = _refused(lambda bad=bad: G.kl_in_reward(scores, lp, ref, MASK, 0.1, estimator=bad), "estimator")
        assert repr(bad) in str(err)
        assert _names(str(err).replace("KL estimator", ""), "estimator")  # the argument, not only the kind of value
        with pytest.raises(ValueError) as same:  # the same refusal as the estimator's own function
            kl_estimate(lp, ref, bad)
        assert str(err) == str(same.value)
