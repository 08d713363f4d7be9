"""policy_loss, value_loss, aggregate and the presets against slow loops written from the equations.

Every reference below is a plain Python loop over sequences ``i`` and tokens ``t`` (skipping masked-out
tokens), written from the paper's formula, not from grpo_ref's code:

* PPO / GRPO (DeepSeekMath eq. 3): ``l_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with
  ``r = exp(lp - old)``; dual-clip (Ye et al. 2020) for ``A < 0``: ``l_t = min(l_t, -c A)``; plus
  ``beta * k_n(lp, ref)`` (Schulman's estimators with ``log r = ref - lp``).
* GSPO (Zheng et al. 2025): ``s_i = exp(mean_t(lp - old))`` and the sequence objective
  ``(1/B) sum_i min(s_i A_i, clip(s_i) A_i)``, differentiated by autograd through ``s_i``.
* aggregation (verl's ``loss_agg_mode``): token-mean, seq-mean-token-mean, seq-mean-token-sum,
  seq-mean-token-sum-norm.
* PPO value loss: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``.
* advantages: group mean/std (Bessel), leave-one-out, return-to-go, GAE as an explicit double sum, whitening.

Values AND gradients are compared in float64.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import grpo_ref
from grpo_ref import (
    PRESETS,
    LossInputs,
    aggregate,
    compute_advantages,
    compute_loss,
    get_preset,
    kl_in_reward,
    policy_loss,
    value_loss,
)

DT = torch.float64
MODES = [
    ("token-mean", None),
    ("seq-mean-token-mean", None),
    ("seq-mean-token-sum", None),
    ("seq-mean-token-sum-norm", None),  # default norm_length = T
    ("seq-mean-token-sum-norm", 13.0),  # an explicit constant (Dr. GRPO's max generation length)
]
MODE_IDS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum-norm-T", "sum-norm-13"]


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------
def make_batch(seed: int, B: int = 6, T: int = 10, log_ratio_scale: float = 0.8, empty_row: bool = True):
    """A random batch with variable prompt offsets and response lengths (row 0 full, row 1 empty)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for i in range(B):
        if i == 0:
            L, start = T, 0
        elif i == 1 and empty_row:
            L, start = 0, 0
        else:
            L = int(torch.randint(1, T + 1, (1,), generator=g))
            start = int(torch.randint(0, T - L + 1, (1,), generator=g))
        mask[i, start:start + L] = 1.0
    old = -(torch.rand(B, T, generator=g, dtype=DT) * 3.0 + 0.05)
    lp = (old + log_ratio_scale * torch.randn(B, T, generator=g, dtype=DT)).requires_grad_(True)
    ref = old + 0.7 * torch.randn(B, T, generator=g, dtype=DT)
    adv_seq = torch.randn(B, generator=g, dtype=DT)
    adv_tok = torch.randn(B, T, generator=g, dtype=DT)
    values = torch.randn(B, T, generator=g, dtype=DT).requires_grad_(True)
    old_values = values.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=DT)
    returns = torch.randn(B, T, generator=g, dtype=DT)
    entropy = torch.rand(B, T, generator=g, dtype=DT) * 2.0
    return dict(lp=lp, old=old, ref=ref, adv_seq=adv_seq, adv_tok=adv_tok, mask=mask, values=values,
                old_values=old_values, returns=returns, entropy=entropy)


# --------------------------------------------------------------------------------------------------------
# slow references, straight from the equations
# --------------------------------------------------------------------------------------------------------
def slow_kl(estimator: str, lp_t, ref_t):
    """Schulman (2020), samples from pi_theta, ``log r = log pi_ref - log pi_theta``."""
    log_r = ref_t - lp_t
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return (torch.exp(log_r) - 1.0) - log_r
    raise AssertionError(estimator)


def slow_aggregate(row_sums, row_lens, mode, norm_length, T):
    """Reduce per-sequence token sums by verl's loss_agg_mode (an empty row has sum 0 and counts in B)."""
    B = len(row_sums)
    if mode == "token-mean":
        return sum(row_sums) / max(1, sum(row_lens))
    if mode == "seq-mean-token-mean":
        return sum(s / max(1, n) for s, n in zip(row_sums, row_lens)) / B
    if mode == "seq-mean-token-sum":
        return sum(row_sums) / B
    if mode == "seq-mean-token-sum-norm":
        return sum(row_sums) / (B * (T if norm_length is None else norm_length))
    if mode == "token-sum":
        return sum(row_sums)
    raise AssertionError(mode)


def _adv_at(adv, i, t):
    return adv[i] if adv.dim() == 1 else adv[i, t]


def slow_seq_ratios(lp, old, mask):
    """GSPO: s_i = exp((1/L_i) sum_t (lp - old)), with autograd; None for an empty response."""
    B, T = lp.shape
    out = []
    for i in range(B):
        ts = [t for t in range(T) if mask[i, t] > 0]
        out.append(torch.exp(sum(lp[i, t] - old[i, t] for t in ts) / len(ts)) if ts else None)
    return out


def slow_token_terms(lp, old, adv, mask, *, eps_low, eps_high, dual_clip, ratio_level, ref, beta, estimator):
    """Per-token loss terms {(i, t): l_it} and the ratio r_it used for each (for the metrics)."""
    B, T = lp.shape
    lo = 1.0 - eps_low
    hi = 1.0 + (eps_low if eps_high is None else eps_high)
    seq_r = slow_seq_ratios(lp, old, mask) if ratio_level == "sequence" else None
    terms, ratios = {}, {}
    for i in range(B):
        for t in range(T):
            if mask[i, t] == 0:
                continue
            A = _adv_at(adv, i, t)
            if ratio_level == "token":
                r = torch.exp(lp[i, t] - old[i, t])
            else:  # GSPO-token: value s_i, gradient s_i * d lp_t (Zheng et al. 2025, sec. 4.3)
                r = seq_r[i].detach() * torch.exp(lp[i, t] - lp[i, t].detach())
            l = -min(r * A, torch.clamp(r, lo, hi) * A)
            if dual_clip is not None and A < 0:
                l = min(l, -dual_clip * A)
            if beta:
                l = l + beta * slow_kl(estimator, lp[i, t], ref[i, t])
            terms[i, t] = l
            ratios[i, t] = r.detach()
    return terms, ratios


def slow_policy_loss(lp, old, adv, mask, *, eps_low=0.2, eps_high=None, dual_clip=None, ratio_level="token",
                     mode="seq-mean-token-mean", norm_length=None, ref=None, beta=0.0, estimator="k3"):
    terms, _ = slow_token_terms(lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                                ratio_level=ratio_level, ref=ref, beta=beta, estimator=estimator)
    B, T = lp.shape
    row_sums = [sum((terms[i, t] for t in range(T) if (i, t) in terms), lp.new_zeros(())) for i in range(B)]
    row_lens = [int(mask[i].sum()) for i in range(B)]
    return slow_aggregate(row_sums, row_lens, mode, norm_length, T)


def slow_gspo_sequence_loss(lp, old, adv_seq, mask, *, eps_low, eps_high, dual_clip=None, ref=None, beta=0.0,
                            estimator="k3"):
    """-(1/B) sum_i min(s_i A_i, clip(s_i) A_i) [dual-clipped for A_i < 0] + beta * seq-mean-token-mean KL.

    GSPO's sequence objective with s_i differentiated by autograd. An empty response has no ratio and
    contributes 0 (it still counts in B, as in seq-mean-token-mean)."""
    B, T = lp.shape
    s = slow_seq_ratios(lp, old, mask)
    total = lp.new_zeros(())
    for i in range(B):
        if s[i] is None:
            continue
        A = adv_seq[i]
        l = -min(s[i] * A, torch.clamp(s[i], 1 - eps_low, 1 + eps_high) * A)
        if dual_clip is not None and A < 0:
            l = min(l, -dual_clip * A)
        if beta:
            ts = [t for t in range(T) if mask[i, t] > 0]
            l = l + beta * sum(slow_kl(estimator, lp[i, t], ref[i, t]) for t in ts) / len(ts)
        total = total + l
    return total / B


def slow_value_loss(v, old_v, ret, mask, clip, mode="token-mean"):
    B, T = v.shape
    row_sums, row_lens = [], []
    for i in range(B):
        s, n = v.new_zeros(()), 0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            e1 = (v[i, t] - ret[i, t]) ** 2
            if clip is None:
                l = 0.5 * e1
            else:
                v_clip = min(max(v[i, t], old_v[i, t] - clip), old_v[i, t] + clip)
                l = 0.5 * max(e1, (v_clip - ret[i, t]) ** 2)
            s, n = s + l, n + 1
        row_sums.append(s)
        row_lens.append(n)
    return slow_aggregate(row_sums, row_lens, mode, None, T)


def slow_masked_agg(x, mask, mode):
    B, T = x.shape
    rows = [sum((x[i, t] for t in range(T) if mask[i, t] > 0), x.new_zeros(())) for i in range(B)]
    return slow_aggregate(rows, [int(mask[i].sum()) for i in range(B)], mode, None, T)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def close(a, b, **kw):
    kw.setdefault("rtol", 1e-9)
    kw.setdefault("atol", 1e-11)
    torch.testing.assert_close(a, b, **kw)


# --------------------------------------------------------------------------------------------------------
# 1. policy_loss == slow loop, every mode / ratio level / advantage shape / KL estimator / dual clip
# --------------------------------------------------------------------------------------------------------
def test_batch_exercises_every_branch():
    """Non-vacuity: the batches used below do hit the low clip, the high clip and the dual clip (so a swapped
    min/max or a wrong bound cannot pass unnoticed), and contain an empty row and both advantage signs."""
    for seed in (0, 1, 2):
        b = make_batch(seed)
        for adv in (b["adv_seq"], b["adv_tok"]):
            _, ratios = slow_token_terms(b["lp"], b["old"], adv, b["mask"], eps_low=0.2, eps_high=0.28,
                                         dual_clip=2.0, ratio_level="token", ref=None, beta=0.0, estimator="k3")
            a = {k: float(_adv_at(adv, *k)) for k in ratios}
            assert any(float(r) < 0.8 and a[k] < 0 for k, r in ratios.items())
            assert any(float(r) > 1.28 and a[k] > 0 for k, r in ratios.items())
            assert any(float(r) > 2.0 and a[k] < 0 for k, r in ratios.items())  # dual clip active
        assert (b["mask"].sum(-1) == 0).any()
        assert (b["adv_seq"] > 0).any() and (b["adv_seq"] < 0).any()


@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("adv_kind", ["adv_seq", "adv_tok"])
@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_policy_loss_matches_slow_loop(mode, norm_length, ratio_level, adv_kind, kl, dual_clip):
    b = make_batch(seed=zlib.crc32(repr((mode, norm_length, ratio_level, adv_kind, kl, dual_clip)).encode()) % 3)
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, ratio_level=ratio_level)
    beta = 0.0 if kl is None else 0.37
    loss, _ = policy_loss(b["lp"], b["old"], b[adv_kind], b["mask"], loss_agg_mode=mode, norm_length=norm_length,
                          ref_logp=b["ref"] if kl else None, kl_coef=beta, kl_estimator=kl or "k3", **kw)
    slow = slow_policy_loss(b["lp"], b["old"], b[adv_kind], b["mask"], mode=mode, norm_length=norm_length,
                            ref=b["ref"], beta=beta, estimator=kl, **kw)
    assert loss.dtype == DT
    close(loss, slow)
    close(grad_of(loss, b["lp"]), grad_of(slow, b["lp"]))


def test_eps_high_none_means_symmetric_clip():
    b = make_batch(3)
    loss, _ = policy_loss(b["lp"], b["old"], b["adv_seq"], b["mask"], eps_low=0.15)
    slow = slow_policy_loss(b["lp"], b["old"], b["adv_seq"], b["mask"], eps_low=0.15, eps_high=0.15)
    close(loss, slow)
    close(grad_of(loss, b["lp"]), grad_of(slow, b["lp"]))


@pytest.mark.parametrize("eps", [(0.2, 0.28), (3e-4, 4e-4), (0.05, 0.05)], ids=["dapo-eps", "gspo-eps", "narrow"])
@pytest.mark.parametrize("kl", [None, "k1", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_gspo_equals_sequence_objective(eps, kl, dual_clip):
    """GSPO in grpo_ref is applied token-wise (``sg[s_i] * pi / sg[pi]``); under seq-mean-token-mean its value and
    gradient must equal those of the sequence objective (1/B) sum_i min(s_i A_i, clip(s_i) A_i) with s_i
    differentiated through the mean log-ratio."""
    b = make_batch(4, log_ratio_scale=0.15)
    beta = 0.0 if kl is None else 0.2
    loss, metrics = policy_loss(b["lp"], b["old"], b["adv_seq"], b["mask"], eps_low=eps[0], eps_high=eps[1],
                                dual_clip=dual_clip, ratio_level="sequence", loss_agg_mode="seq-mean-token-mean",
                                ref_logp=b["ref"] if kl else None, kl_coef=beta, kl_estimator=kl or "k3")
    slow = slow_gspo_sequence_loss(b["lp"], b["old"], b["adv_seq"], b["mask"], eps_low=eps[0], eps_high=eps[1],
                                   dual_clip=dual_clip, ref=b["ref"], beta=beta, estimator=kl)
    close(loss, slow)
    close(grad_of(loss, b["lp"]), grad_of(slow, b["lp"]))
    if eps[0] < 0.1:  # non-vacuity: the sequence clip is active for some sequences
        s = [x.detach() for x in slow_seq_ratios(b["lp"], b["old"], b["mask"]) if x is not None]
        assert any(float(x) < 1 - eps[0] or float(x) > 1 + eps[1] for x in s)


def test_gspo_gradient_respects_the_log_ratio_clamp():
    """policy_loss documents that the GSPO mean log-ratio is clamped to +-max_log_ratio before exp and that the
    token form has exactly the gradient of the sequence objective. Beyond the clamp (a stale/corrupt old_logp,
    mean log-ratio 25 > 20) the clamped objective is flat: its gradient is 0, as for ratio_level='token'."""
    lp = torch.tensor([[-1.0, -2.0, -1.5]], dtype=DT, requires_grad=True)
    old = lp.detach() - 25.0
    adv, mask = torch.tensor([-1.0], dtype=DT), torch.ones(1, 3)
    tok, _ = policy_loss(lp, old, adv, mask, ratio_level="token")
    assert (grad_of(tok, lp) == 0).all()
    s = torch.exp((lp - old).mean().clamp(-20.0, 20.0))
    slow = -min(s * adv[0], torch.clamp(s, 0.8, 1.2) * adv[0])
    seq, _ = policy_loss(lp, old, adv, mask, ratio_level="sequence")
    close(seq, slow)  # the value is clamped (this part holds)
    close(grad_of(seq, lp), grad_of(slow, lp))  # the gradient is not


def test_gspo_ratio_is_per_sequence_not_per_token():
    """Token ratios and GSPO's sequence ratio differ on a batch with varied log-ratios: the two levels must give
    different losses (guards against ``ratio_level`` being ignored)."""
    b = make_batch(5, log_ratio_scale=0.5)
    args = (b["lp"], b["old"], b["adv_seq"], b["mask"])
    tok, _ = policy_loss(*args, ratio_level="token")
    seq, _ = policy_loss(*args, ratio_level="sequence")
    assert not torch.allclose(tok, seq)


# --------------------------------------------------------------------------------------------------------
# 2. metrics
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("adv_kind", ["adv_seq", "adv_tok"])
def test_metrics_equal_slow_counts(ratio_level, adv_kind):
    b = make_batch(0, log_ratio_scale=0.8) if ratio_level == "token" else make_batch(8, log_ratio_scale=0.3)
    eps_low, eps_high, c = 0.2, 0.28, 2.0
    if ratio_level == "sequence":  # sequence ratios are closer to 1: narrower bounds so every branch is hit
        eps_low, eps_high, c = 0.02, 0.03, 1.04
    _, m = policy_loss(b["lp"], b["old"], b[adv_kind], b["mask"], eps_low=eps_low, eps_high=eps_high, dual_clip=c,
                       ratio_level=ratio_level, ref_logp=b["ref"], entropy=b["entropy"])
    _, ratios = slow_token_terms(b["lp"], b["old"], b[adv_kind], b["mask"], eps_low=eps_low, eps_high=eps_high,
                                 dual_clip=None, ratio_level=ratio_level, ref=None, beta=0.0, estimator="k3")
    n = len(ratios)
    low = high = dual = 0
    for (i, t), r in ratios.items():
        A = float(_adv_at(b[adv_kind], i, t))
        r = float(r)
        unclipped, clipped = r * A, min(max(r, 1 - eps_low), 1 + eps_high) * A
        if clipped < unclipped:  # min() picks the clipped term: the clip is active
            low += r < 1
            high += r > 1
        if A < 0 and -min(unclipped, clipped) > -c * A:
            dual += 1
    assert low > 0 and high > 0 and dual > 0  # non-vacuity
    close(m["clip_frac_low"], torch.tensor(low / n, dtype=DT))
    close(m["clip_frac_high"], torch.tensor(high / n, dtype=DT))
    close(m["dual_clip_frac"], torch.tensor(dual / n, dtype=DT))
    rs = torch.stack(list(ratios.values()))
    close(m["ratio_mean"], rs.mean())
    close(m["ratio_min"], rs.min())
    close(m["ratio_max"], rs.max())
    # approx_kl: k3 estimate of KL(pi_old || pi_theta) on the old samples, mean of (r - 1 - log r) >= 0 over the
    # per-token ratios r = pi/pi_old (also under GSPO, where the loss uses the sequence ratio instead)
    token_rs = [torch.exp(b["lp"][k] - b["old"][k]) for k in ratios]
    close(m["approx_kl"], torch.stack([x - 1 - torch.log(x) for x in token_rs]).mean())
    assert m["approx_kl"] >= 0
    kl_ref = torch.stack([slow_kl("k3", b["lp"][k], b["ref"][k]) for k in ratios]).mean()
    close(m["kl_ref"], kl_ref.detach())
    close(m["entropy"], torch.stack([b["entropy"][k] for k in ratios]).mean())
    # pg_loss: the clipped (and dual-clipped) surrogate alone, without the KL term
    pg = slow_policy_loss(b["lp"], b["old"], b[adv_kind], b["mask"], eps_low=eps_low, eps_high=eps_high,
                          dual_clip=c, ratio_level=ratio_level)
    close(m["pg_loss"], pg.detach())
    for v in m.values():
        assert not v.requires_grad


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_approx_kl_zero_on_policy(ratio_level):
    b = make_batch(7)
    lp = b["old"].clone().requires_grad_(True)
    _, m = policy_loss(lp, b["old"], b["adv_seq"], b["mask"], ratio_level=ratio_level)
    assert float(m["approx_kl"]) == 0.0
    assert float(m["clip_frac_low"]) == float(m["clip_frac_high"]) == 0.0
    assert float(m["ratio_min"]) == float(m["ratio_max"]) == float(m["ratio_mean"]) == 1.0


# --------------------------------------------------------------------------------------------------------
# 3. value loss and aggregate
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [None, 0.2, 0.5])
@pytest.mark.parametrize("mode", grpo_ref.LOSS_AGG_MODES)
def test_value_loss_matches_slow_loop(clip, mode):
    b = make_batch(8)
    loss, met = value_loss(b["values"], b["old_values"], b["returns"], b["mask"], clip_range=clip, loss_agg_mode=mode)
    slow = slow_value_loss(b["values"], b["old_values"], b["returns"], b["mask"], clip, mode)
    close(loss, slow)
    close(grad_of(loss, b["values"]), grad_of(slow, b["values"]))
    if clip == 0.2:  # non-vacuity: the clipped branch is selected somewhere, and the metric counts it
        v, ov, R, mk = b["values"].detach(), b["old_values"], b["returns"], b["mask"]
        n = hits = 0
        for i in range(v.shape[0]):
            for t in range(v.shape[1]):
                if mk[i, t]:
                    vc = min(max(float(v[i, t]), float(ov[i, t]) - clip), float(ov[i, t]) + clip)
                    hits += (vc - float(R[i, t])) ** 2 > (float(v[i, t]) - float(R[i, t])) ** 2
                    n += 1
        assert hits > 0
        close(met["vf_clip_frac"], torch.tensor(hits / n, dtype=DT))


@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
def test_aggregate_matches_slow_loop(mode, norm_length):
    b = make_batch(9)
    x = torch.randn(b["mask"].shape, dtype=DT, requires_grad=True)
    out = aggregate(x, b["mask"], mode, norm_length)
    T = x.shape[1]
    rows = [sum((x[i, t] for t in range(T) if b["mask"][i, t]), x.new_zeros(())) for i in range(x.shape[0])]
    slow = slow_aggregate(rows, [int(v) for v in b["mask"].sum(-1)], mode, norm_length, T)
    close(out, slow)
    close(grad_of(out, x), grad_of(slow, x))


def test_aggregate_hand_computed():
    """Two rows, lengths 1 and 3, per-token losses [[2, ., ., .], [1, 2, 3, .]]: by hand."""
    x = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 9.0]])
    m = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    assert aggregate(x, m, "token-mean").item() == pytest.approx(8 / 4)
    assert aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((2 / 1 + 6 / 3) / 2)
    assert aggregate(x, m, "seq-mean-token-sum").item() == pytest.approx((2 + 6) / 2)
    assert aggregate(x, m, "seq-mean-token-sum-norm").item() == pytest.approx((2 + 6) / 2 / 4)
    assert aggregate(x, m, "seq-mean-token-sum-norm", 8).item() == pytest.approx((2 + 6) / 2 / 8)


# --------------------------------------------------------------------------------------------------------
# 4. gradcheck in float64
# --------------------------------------------------------------------------------------------------------
def _far_from_kinks(lp, old, adv, mask, lo, hi, c, ratio_level):
    """True if no ratio lies within 1e-3 of a clip bound or of the dual-clip kink (finite differences need it)."""
    if ratio_level == "token":
        r = torch.exp(lp - old)
    else:
        s = slow_seq_ratios(lp, old, mask)
        r = torch.stack([x if x is not None else lp.new_ones(()) for x in s])[:, None].expand_as(lp)
    a = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)
    on = mask > 0
    ok = ((r - lo).abs() > 1e-3) & ((r - hi).abs() > 1e-3)
    if c is not None:
        ok &= ~((a < 0) & ((r - c).abs() < 1e-3))
    return bool(ok[on].all())


@pytest.mark.parametrize("ratio_level,mode,adv_kind,dual_clip,kl", [
    ("token", "seq-mean-token-mean", "adv_seq", 2.0, "k3"),
    ("token", "token-mean", "adv_tok", None, "k2"),
    ("token", "seq-mean-token-sum-norm", "adv_seq", 2.0, "k1"),
    ("sequence", "seq-mean-token-mean", "adv_seq", None, "k3"),
    ("sequence", "token-mean", "adv_seq", 1.5, None),
])
def test_gradcheck_policy_loss(ratio_level, mode, adv_kind, dual_clip, kl):
    """Finite differences of the loss value == autograd gradient. For GSPO only with per-sequence advantages
    [B]: with token advantages [B, T] the token-form ``sg[s_i] * pi / sg[pi]`` (GSPO-token) has by design a
    gradient that is not the derivative of its value (that case is checked against the slow loop above)."""
    b = make_batch(10, B=4, T=5, log_ratio_scale=0.8 if ratio_level == "token" else 0.2)
    lo, hi = 0.8, 1.25
    assert _far_from_kinks(b["lp"].detach(), b["old"], b[adv_kind], b["mask"], lo, hi, dual_clip, ratio_level)

    def f(lp):
        return policy_loss(lp, b["old"], b[adv_kind], b["mask"], eps_low=0.2, eps_high=0.25, dual_clip=dual_clip,
                           ratio_level=ratio_level, loss_agg_mode=mode, ref_logp=b["ref"] if kl else None,
                           kl_coef=0.3 if kl else 0.0, kl_estimator=kl or "k3")[0]

    assert torch.autograd.gradcheck(f, (b["lp"].detach().clone().requires_grad_(True),))


@pytest.mark.parametrize("clip", [None, 0.3])
def test_gradcheck_value_loss(clip):
    b = make_batch(11, B=4, T=5)
    v0, ov = b["values"].detach(), b["old_values"]
    if clip is not None:  # stay away from the clip bounds and from err == err_clip crossings
        assert (((v0 - ov).abs() - clip).abs() > 1e-3).all()
    f = lambda v: value_loss(v, ov, b["returns"], b["mask"], clip_range=clip)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (v0.clone().requires_grad_(True),))


@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
def test_gradcheck_aggregate(mode, norm_length):
    b = make_batch(12, B=4, T=5)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: aggregate(y, b["mask"], mode, norm_length), (x,))


def test_kl_in_reward_carries_no_gradient_from_logprobs():
    """The shaped rewards are constants of the rollout: no gradient flows back into logp or ref_logp."""
    b = make_batch(13)
    ref = b["ref"].clone().requires_grad_(True)
    r = kl_in_reward(torch.randn(b["mask"].shape[0], dtype=DT), b["lp"], ref, b["mask"], kl_coef=0.1)
    assert b["lp"].requires_grad and not r.requires_grad and r.grad_fn is None


def test_kl_in_reward_carries_no_gradient_from_scores():
    """Docstring of kl_in_reward: '-> [B, T] (... no gradient)'. Scores from a reward model run without no_grad
    must not make the rewards (and then the advantages) differentiable."""
    b = make_batch(13)
    scores = torch.randn(b["mask"].shape[0], dtype=DT, requires_grad=True)
    r = kl_in_reward(scores, b["lp"], b["ref"], b["mask"], kl_coef=0.1)
    assert not r.requires_grad and r.grad_fn is None


def test_kl_in_reward_matches_slow_loop():
    """PPO-RLHF rewards: -beta * k1(old, ref) on every response token, + score on the last response token."""
    b = make_batch(14)
    scores = torch.randn(b["mask"].shape[0], dtype=DT)
    beta = 0.3
    for est in ("k1", "k2", "k3"):
        r = kl_in_reward(scores, b["lp"], b["ref"], b["mask"], kl_coef=beta, estimator=est)
        B, T = r.shape
        for i in range(B):
            ts = [t for t in range(T) if b["mask"][i, t]]
            for t in range(T):
                want = 0.0
                if t in ts:
                    want = -beta * float(slow_kl(est, b["lp"][i, t].detach(), b["ref"][i, t]))
                    if t == ts[-1]:
                        want += float(scores[i])
                assert float(r[i, t]) == pytest.approx(want, rel=1e-10, abs=1e-12)


# --------------------------------------------------------------------------------------------------------
# 5. presets: compute_loss and compute_advantages against slow compositions
# --------------------------------------------------------------------------------------------------------
EXTRA_CONFIGS = {
    "grpo+dual+ent": get_preset("grpo", dual_clip=2.0, ent_coef=0.03, kl_estimator="k2"),
    "dr_grpo+norm": get_preset("dr_grpo", norm_length=16),
    "ppo+gamma": get_preset("ppo", gamma=0.9, lam=0.7, value_clip=None, ent_coef=0.01),
}
ALL_CONFIGS = {**PRESETS, **EXTRA_CONFIGS}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_compute_loss_matches_slow_loop(name):
    cfg = ALL_CONFIGS[name]
    b = make_batch(15)
    inp = LossInputs(b["lp"], b["old"], b["adv_tok"], b["mask"], ref_logp=b["ref"], entropy=b["entropy"],
                     values=b["values"], old_values=b["old_values"], returns=b["returns"])
    loss, metrics = compute_loss(inp, cfg)
    beta = cfg.kl_coef if cfg.kl_placement == "loss" else 0.0
    slow = slow_policy_loss(b["lp"], b["old"], b["adv_tok"], b["mask"], eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                            dual_clip=cfg.dual_clip, ratio_level=cfg.ratio_level, mode=cfg.loss_agg_mode,
                            norm_length=cfg.norm_length, ref=b["ref"], beta=beta, estimator=cfg.kl_estimator)
    if cfg.ent_coef > 0:
        slow = slow - cfg.ent_coef * slow_masked_agg(b["entropy"], b["mask"], cfg.loss_agg_mode)
    if cfg.loss_fn == "ppo":
        slow = slow + cfg.vf_coef * slow_value_loss(b["values"], b["old_values"], b["returns"], b["mask"],
                                                    cfg.value_clip, "token-mean")
    close(loss, slow)
    close(grad_of(loss, b["lp"]), grad_of(slow, b["lp"]))
    if cfg.loss_fn == "ppo":
        close(grad_of(loss, b["values"]), grad_of(slow, b["values"]))
        assert "vf_loss" in metrics
    else:
        assert grad_of(loss, b["values"]).abs().sum() == 0


def _slow_std(xs):
    n = len(xs)
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1))


def _slow_whiten(adv, mask, eps=1e-8):
    on = [(i, t) for i in range(adv.shape[0]) for t in range(adv.shape[1]) if mask[i, t]]
    xs = [float(adv[k]) for k in on]
    mu = sum(xs) / len(xs)
    var = sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)
    out = torch.zeros_like(adv)
    for k in on:
        out[k] = (float(adv[k]) - mu) / math.sqrt(var + eps)
    return out


def _slow_token_rewards(scores, old, ref, mask, beta, est):
    """PPO-RLHF per-token rewards as a dict row -> list of (t, r_t) over the masked-in positions."""
    rows = []
    for i in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[i, t]]
        rs = [-beta * float(slow_kl(est, old[i, t], ref[i, t])) if beta else 0.0 for t in ts]
        if ts:
            rs[-1] += float(scores[i])
        rows.append(list(zip(ts, rs)))
    return rows


def slow_advantages(cfg, scores, mask, old, ref, values):
    B, T = mask.shape
    beta = cfg.kl_coef if cfg.kl_placement == "reward" else 0.0
    G = cfg.group_size
    out = torch.zeros(B, T, dtype=DT)
    returns = None
    if cfg.adv_estimator in ("grpo", "rloo"):
        seq = []
        for i in range(B):  # score - beta * sum_t k(old, ref): the sequence reward with the KL folded in
            kl_sum = sum(float(slow_kl(cfg.kl_estimator, old[i, t], ref[i, t])) for t in range(T) if mask[i, t])
            seq.append(float(scores[i]) - beta * kl_sum)
        adv = []
        for g0 in range(0, B, G):
            grp = seq[g0:g0 + G]
            mu = sum(grp) / G
            for j, x in enumerate(grp):
                if cfg.adv_estimator == "rloo":
                    adv.append(x - sum(y for k, y in enumerate(grp) if k != j) / (G - 1))
                elif max(grp) == min(grp):
                    adv.append(0.0)
                elif cfg.adv_scale == "group":
                    adv.append((x - mu) / (_slow_std(grp) + cfg.adv_eps))
                elif cfg.adv_scale == "batch":
                    adv.append((x - mu) / (_slow_std(seq) + cfg.adv_eps))
                else:
                    adv.append(x - mu)
        for i in range(B):
            for t in range(T):
                if mask[i, t]:
                    out[i, t] = adv[i]
        return out, None
    rows = _slow_token_rewards(scores, old, ref, mask, beta, cfg.kl_estimator)
    if cfg.adv_estimator == "reinforce_pp":
        for i, row in enumerate(rows):
            for k, (t, _) in enumerate(row):  # G_t = sum_{l >= 0} gamma^l r_{t+l}
                out[i, t] = sum(cfg.gamma ** l * row[k + l][1] for l in range(len(row) - k))
        return _slow_whiten(out, mask), None
    if cfg.adv_estimator == "gae":
        returns = torch.zeros(B, T, dtype=DT)
        for i, row in enumerate(rows):
            ts = [t for t, _ in row]
            V = [float(values[i, t]) for t in ts] + [0.0]  # V = 0 after the last response token
            deltas = [row[k][1] + cfg.gamma * V[k + 1] - V[k] for k in range(len(ts))]
            for k, t in enumerate(ts):  # A_t = sum_l (gamma lam)^l delta_{t+l}
                out[i, t] = sum((cfg.gamma * cfg.lam) ** l * deltas[k + l] for l in range(len(ts) - k))
                returns[i, t] = out[i, t] + V[k]
        return (_slow_whiten(out, mask) if cfg.whiten_advantages else out), returns
    raise AssertionError(cfg.adv_estimator)


ADV_CONFIGS = {
    **PRESETS,
    "grpo+kl_in_reward": get_preset("grpo", kl_placement="reward", kl_estimator="k1", kl_coef=0.05, group_size=4),
    "rloo+kl_in_reward": get_preset("rloo", kl_coef=0.05, group_size=4),
    "grpo+batch_std": get_preset("grpo", adv_scale="batch", group_size=4),
    "reinforce_pp+gamma": get_preset("reinforce_pp", gamma=0.8),
    "ppo+gamma+k3": get_preset("ppo", gamma=0.9, lam=0.6, kl_estimator="k3"),
    "ppo+nowhiten": get_preset("ppo", whiten_advantages=False),
}


@pytest.mark.parametrize("name", list(ADV_CONFIGS))
def test_compute_advantages_matches_slow_composition(name):
    cfg = ADV_CONFIGS[name]
    G = cfg.group_size
    B = 2 * max(G, 2)
    b = make_batch(16, B=B, T=7)
    g = torch.Generator().manual_seed(17)
    scores = torch.randint(0, 4, (B,), generator=g).to(DT)
    if G > 1:
        scores[:G] = 2.0  # a group whose rewards are all equal
    values = torch.randn(B, 7, generator=g, dtype=DT)
    adv, ret = compute_advantages(cfg, scores, b["mask"], old_logp=b["old"], ref_logp=b["ref"], values=values)
    want_adv, want_ret = slow_advantages(cfg, scores, b["mask"], b["old"], b["ref"], values)
    close(adv, want_adv, rtol=1e-9, atol=1e-9)
    if want_ret is None:
        assert ret is None
    else:
        close(ret, want_ret, rtol=1e-9, atol=1e-9)
    assert adv.abs().sum() > 0


def test_approx_kl_is_per_token_at_both_ratio_levels():
    """approx_kl estimates KL(pi_old || pi_theta) from the per-token log-ratios, also under GSPO: a sequence whose
    token log-ratios are +0.3 and -0.3 has a sequence log-ratio of 0, but its tokens did move."""
    lp = torch.tensor([[0.3, -0.3, 0.0]], dtype=torch.float64)
    old, adv, mask = torch.zeros_like(lp), torch.ones(1, dtype=torch.float64), torch.ones(1, 3)
    expected = ((torch.expm1(lp) - lp).sum() / 3).item()
    for level in ("token", "sequence"):
        _, metrics = policy_loss(lp, old, adv, mask, ratio_level=level)
        assert metrics["approx_kl"].item() == pytest.approx(expected, rel=1e-12)
        assert expected > 0.03
