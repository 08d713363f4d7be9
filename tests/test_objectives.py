"""The policy-gradient objectives CISPO and SAPO, the ratio-weighted KL, the entropy bonus's aggregation, the
global token normaliser and the token-sum aggregation.

Reference: a slow per-token loop written from the papers' equations (CISPO, arXiv 2506.13585 eq. 4-5: the
detached clipped weight times ``A log pi``; SAPO, arXiv 2511.20347: the ``(4 / tau) sigmoid(tau (r - 1))`` gate;
TRL 1.16.0 ``use_bias_correction_kl``: ``r * k3``), built from torch scalars so that autograd gives the slow
gradient too. Plus gradcheck in float64 and the invariances that characterise each objective.
"""
from __future__ import annotations

import math

import pytest
import torch

import grpo_ref as G

B, T = 4, 6
MASK = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
MODES = [("token-mean", None), ("seq-mean-token-mean", None), ("seq-mean-token-sum", None),
         ("seq-mean-token-sum-norm", None), ("seq-mean-token-sum-norm", 11.0), ("token-sum", None)]
MODE_IDS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum-norm-T", "sum-norm-11", "token-sum"]


def _batch(seed: int, spread: float = 0.3, adv_tok: bool = False):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if adv_tok else torch.randn(B, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return dict(lp=lp, old=old, ref=ref, adv=adv, ent=ent)


def _adv_at(adv, i, t):
    return float(adv[i]) if adv.dim() == 1 else float(adv[i, t])


def slow_loss(lp, old, adv, mask, *, objective="clip", eps_low=0.2, eps_high=0.2, tau_pos=1.0, tau_neg=1.05,
              ratio_level="token", mode="seq-mean-token-mean", norm_length=None, num_tokens=None, ref=None,
              kl_coef=0.0, weighted=False):
    """One scalar from per-token terms, exactly as the equations read. ``lp`` may require grad."""
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    rows, lens = [], []
    for i in range(lp.shape[0]):
        ts = [t for t in range(lp.shape[1]) if mask[i, t] > 0]
        lens.append(len(ts))
        if ratio_level == "sequence" and ts:
            s_i = torch.exp(sum(lp[i, t] - old[i, t] for t in ts) / len(ts))
        row = torch.zeros((), dtype=lp.dtype)
        for t in ts:
            a = _adv_at(adv, i, t)
            r = torch.exp(lp[i, t] - old[i, t]) if ratio_level == "token" else s_i
            if objective == "clip":
                term = -torch.minimum(r * a, torch.clamp(r, lo, hi) * a)
            elif objective == "cispo":
                w = min(max(float(r.detach()), lo), hi)  # a Python float: no gradient through the weight
                term = -w * a * lp[i, t]
            elif objective == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                term = -(4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) * a
            else:
                raise AssertionError(objective)
            if kl_coef:
                d = ref[i, t] - lp[i, t]
                k3 = torch.exp(d) - d - 1.0
                term = term + kl_coef * (k3 * r if weighted else k3)
            row = row + term
        rows.append(row)
    n = lp.shape[0]
    if mode == "token-mean":
        return sum(rows) / (num_tokens if num_tokens is not None else max(1, sum(lens)))
    if mode == "token-sum":
        return sum(rows)
    if mode == "seq-mean-token-mean":
        return sum(r / max(1, L) for r, L in zip(rows, lens)) / n
    if mode == "seq-mean-token-sum":
        return sum(rows) / n
    if mode == "seq-mean-token-sum-norm":
        return sum(rows) / (n * (lp.shape[1] if norm_length is None else norm_length))
    raise AssertionError(mode)


def _both(b, *, lp=None, **kw):
    """(fast loss, fast grad, slow loss, slow grad) for the same arguments."""
    lp = b["lp"] if lp is None else lp
    fast_lp = lp.clone().requires_grad_(True)
    slow_lp = lp.clone().requires_grad_(True)
    pk = dict(kw)
    sk = dict(kw)
    for k_fast, k_slow in (("pg_objective", "objective"), ("sapo_tau_pos", "tau_pos"), ("sapo_tau_neg", "tau_neg"),
                           ("loss_agg_mode", "mode"), ("kl_ratio_weighted", "weighted")):
        if k_fast in sk:
            sk[k_slow] = sk.pop(k_fast)
    if "ref" in sk:
        pk["ref_logp"] = pk.pop("ref")
    fast, metrics = G.policy_loss(fast_lp, b["old"], b["adv"], MASK, **pk)
    fast.backward()
    slow = slow_loss(slow_lp, b["old"], b["adv"], MASK, **sk)
    slow.backward()
    return fast, fast_lp.grad, slow, slow_lp.grad, metrics


# ---------------------------------------------------------------------------------------------- slow loops
@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("objective", ["cispo", "sapo"])
@pytest.mark.parametrize("adv_tok", [False, True], ids=["adv[B]", "adv[B,T]"])
def test_objective_matches_slow_loop(objective, mode, norm_length, adv_tok):
    b = _batch(1, adv_tok=adv_tok)
    kw = dict(pg_objective=objective, loss_agg_mode=mode, norm_length=norm_length)
    if objective == "cispo":
        kw.update(eps_low=0.1, eps_high=0.15)
    else:
        kw.update(sapo_tau_pos=0.7, sapo_tau_neg=2.5)
    fast, fg, slow, sg, _ = _both(b, **kw)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fg, sg, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_with_kl_matches_slow_loop(objective, weighted, ratio_level):
    """The KL term, optionally ratio-weighted (TRL use_bias_correction_kl); under ``ratio_level='sequence'`` the
    weight is GSPO's ``s_i`` with its gradient. seq-mean-token-mean: where GSPO-token's gradient equals the sequence
    objective's (the slow loop writes the sequence objective)."""
    b = _batch(2)
    kw = dict(pg_objective=objective, ratio_level=ratio_level, ref=b["ref"], kl_coef=0.3, kl_ratio_weighted=weighted)
    fast, fg, slow, sg, _ = _both(b, **kw)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fg, sg, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
def test_sequence_level_ratio_weighted_kl_every_mode(mode, norm_length):
    """CISPO's weight is detached, so its per-token gradient is the same in the GSPO-token form and in the
    sequence objective: the full loss, ratio-weighted KL included, matches the slow loop under every mode."""
    b = _batch(3)
    fast, fg, slow, sg, _ = _both(b, pg_objective="cispo", ratio_level="sequence", eps_low=1.0, eps_high=0.05,
                                  loss_agg_mode=mode, norm_length=norm_length, ref=b["ref"], kl_coef=0.2,
                                  kl_ratio_weighted=True)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fg, sg, rtol=1e-10, atol=1e-12)


def test_padding_does_not_reach_cispo_or_sapo():
    b = _batch(4)
    lp = b["lp"].clone()
    lp[0, 5] = math.nan
    lp[2, 0] = math.inf
    for objective in ("cispo", "sapo"):
        a = lp.clone().requires_grad_(True)
        c = b["lp"].clone().requires_grad_(True)
        la, _ = G.policy_loss(a, b["old"], b["adv"], MASK, pg_objective=objective, ref_logp=b["ref"], kl_coef=0.1,
                              kl_ratio_weighted=True)
        lc, _ = G.policy_loss(c, b["old"], b["adv"], MASK, pg_objective=objective, ref_logp=b["ref"], kl_coef=0.1,
                              kl_ratio_weighted=True)
        la.backward()
        lc.backward()
        assert float(la.detach()) == float(lc.detach())
        torch.testing.assert_close(a.grad, c.grad * MASK, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_gradcheck_sapo(ratio_level, mode):
    b = _batch(5)
    lp = b["lp"].clone().requires_grad_(True)
    f = lambda x: G.policy_loss(x, b["old"], b["adv"], MASK, pg_objective="sapo", sapo_tau_pos=1.3, sapo_tau_neg=0.6,  # noqa: E731
                                ratio_level=ratio_level, loss_agg_mode=mode)[0]
    if ratio_level == "token" or mode == "seq-mean-token-mean":  # GSPO-token's gradient is the sequence objective's
        assert torch.autograd.gradcheck(f, (lp,))


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
def test_gradcheck_ratio_weighted_kl(objective, ratio_level):
    """The KL part alone (pg term made 0 by zero advantages): ``kl_coef * agg(r * k3)`` with gradient through both
    ``r`` and ``k3``, at token level and with GSPO's sequence ratio."""
    b = _batch(6)
    lp = b["lp"].clone().requires_grad_(True)
    zero = torch.zeros(B, dtype=torch.float64)
    for mode in ("token-mean", "seq-mean-token-sum"):
        f = lambda x: G.policy_loss(x, b["old"], zero, MASK, pg_objective=objective, ratio_level=ratio_level,  # noqa: E731
                                    loss_agg_mode=mode, ref_logp=b["ref"], kl_coef=0.7, kl_ratio_weighted=True)[0]
        assert torch.autograd.gradcheck(f, (lp,))


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradcheck_cispo_with_the_weight_held_fixed(ratio_level, mode):
    """CISPO's gradient has no term through the weight. gradcheck compares autograd with finite differences of the
    value; moving ``old_logp`` together with ``logp`` keeps every ratio (hence the weight) fixed, so the finite
    differences see exactly ``-w A`` per token: autograd must agree. (A weight with gradient would not.)"""
    b = _batch(7, spread=0.4)
    delta = b["lp"] - b["old"]
    lp = b["lp"].clone().requires_grad_(True)
    f = lambda x: G.policy_loss(x, x - delta, b["adv"], MASK, pg_objective="cispo", eps_low=0.1, eps_high=0.1,  # noqa: E731
                                ratio_level=ratio_level, loss_agg_mode=mode)[0]
    assert torch.autograd.gradcheck(f, (lp,))


# ---------------------------------------------------------------------------------------------- invariances
def test_cispo_gradient_is_detached_clipped_weight_times_advantage():
    b = _batch(8, spread=0.4, adv_tok=True)
    lp = b["lp"].clone().requires_grad_(True)
    loss, metrics = G.policy_loss(lp, b["old"], b["adv"], MASK, pg_objective="cispo", eps_low=0.15, eps_high=0.2,
                                  loss_agg_mode="token-sum")
    loss.backward()
    r = torch.exp(b["lp"] - b["old"])
    w = r.clamp(0.85, 1.2)
    torch.testing.assert_close(lp.grad, -w * b["adv"] * MASK, rtol=1e-12, atol=1e-14)
    assert bool(((r < 0.85) & (MASK > 0)).any()) and bool(((r > 1.2) & (MASK > 0)).any())  # both clamps active
    # clipped tokens keep their gradient (unlike PPO's clip, which zeroes it)
    assert bool((lp.grad[(w != r) & (MASK > 0)] != 0).all())
    # the clip fractions: share of masked-in tokens whose weight was clamped below / above, whatever the sign of A
    n = MASK.sum()
    assert float(metrics["clip_frac_low"]) == pytest.approx(float(((r < 0.85) * MASK).sum() / n), rel=1e-12)
    assert float(metrics["clip_frac_high"]) == pytest.approx(float(((r > 1.2) * MASK).sum() / n), rel=1e-12)


def test_cispo_with_eps_low_one_clamps_only_from_above():
    """TRL 1.16.0's cispo: ``clamp(r, max=epsilon_high)``, i.e. grpo_ref ``eps_low=1`` (lower bound 0)."""
    b = _batch(9, spread=1.5)
    lp = b["lp"].clone().requires_grad_(True)
    loss, metrics = G.policy_loss(lp, b["old"], b["adv"], MASK, pg_objective="cispo", eps_low=1.0, eps_high=3.0,
                                  loss_agg_mode="token-sum")
    loss.backward()
    r = torch.exp(b["lp"] - b["old"])
    torch.testing.assert_close(lp.grad, -torch.clamp(r, max=4.0) * b["adv"][:, None] * MASK, rtol=1e-12, atol=1e-14)
    assert float(metrics["clip_frac_low"]) == 0.0 and float(metrics["clip_frac_high"]) > 0


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.3, 4.0), (7.0, 0.5)])
def test_sapo_gradient_at_ratio_one_is_the_advantage(taus):
    """At ``r = 1`` the gate's slope is ``(4 / tau) * tau * sigmoid'(0) = 1``: the gradient is ``-A`` per token
    whatever the temperatures, and the value is ``-(2 / tau) A`` (``sigmoid(0) = 1/2``)."""
    b = _batch(10, adv_tok=True)
    lp = b["lp"].clone().requires_grad_(True)
    loss, metrics = G.policy_loss(lp, b["lp"], b["adv"], MASK, pg_objective="sapo", sapo_tau_pos=taus[0],
                                  sapo_tau_neg=taus[1], loss_agg_mode="token-sum")
    loss.backward()
    torch.testing.assert_close(lp.grad, -b["adv"] * MASK, rtol=1e-12, atol=1e-14)
    tau = torch.where(b["adv"] > 0, torch.tensor(taus[0], dtype=torch.float64), torch.tensor(taus[1], dtype=torch.float64))
    assert float(loss.detach()) == pytest.approx(float((-(2.0 / tau) * b["adv"] * MASK).sum()), rel=1e-12)
    assert float(metrics["clip_frac_low"]) == 0.0 and float(metrics["clip_frac_high"]) == 0.0


def test_sapo_gate_decays_away_from_ratio_one():
    """The per-token gradient of SAPO is ``-4 sigmoid'(tau (r - 1)) r A``: it falls off smoothly for ratios far
    from 1 on either side, where PPO's clip would cut it to 0 at once."""
    lp = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    old = -torch.tensor([[0.0, 0.5, 2.0, 3.0, -4.0]], dtype=torch.float64)  # r = 1, e^0.5, e^2, e^3, e^-4
    adv = torch.ones(1, dtype=torch.float64)
    loss, _ = G.policy_loss(lp, old, adv, torch.ones(1, 5), pg_objective="sapo", sapo_tau_pos=1.0, loss_agg_mode="token-sum")
    loss.backward()
    r = torch.exp(-old[0])
    sig = torch.sigmoid(r - 1.0)
    torch.testing.assert_close(lp.grad[0], -4.0 * sig * (1 - sig) * r, rtol=1e-12, atol=0)
    g = -lp.grad[0]
    assert g[0] == pytest.approx(1.0, rel=1e-12)
    assert 0 < g[3] < g[2] < 1.0 and 0 < g[4] < 1.0


def test_kl_ratio_weighted_at_ratio_one():
    """At ``r = 1`` the weighted KL has the unweighted value; its gradient has the extra ``k3 * d r / d lp = k3``."""
    b = _batch(11)
    for ratio_level in ("token", "sequence"):
        a = b["lp"].clone().requires_grad_(True)
        c = b["lp"].clone().requires_grad_(True)
        kw = dict(ref_logp=b["ref"], kl_coef=0.4, loss_agg_mode="token-sum", ratio_level=ratio_level)
        lw, _ = G.policy_loss(a, b["lp"], b["adv"], MASK, kl_ratio_weighted=True, **kw)
        lu, _ = G.policy_loss(c, b["lp"], b["adv"], MASK, kl_ratio_weighted=False, **kw)
        torch.testing.assert_close(lw, lu, rtol=1e-14, atol=1e-14)
        lw.backward()
        lu.backward()
        k3 = G.kl_k3(b["lp"], b["ref"]) * MASK
        if ratio_level == "token":
            extra = 0.4 * k3
        else:  # d s_i / d lp_t = s_i / L_i = 1 / L_i for every token of the sequence
            L = MASK.sum(-1, keepdim=True)
            extra = 0.4 * (k3.sum(-1, keepdim=True) / L) * MASK
        torch.testing.assert_close(a.grad - c.grad, extra, rtol=1e-10, atol=1e-13)
        assert bool((extra.abs() > 1e-3).any())


# ---------------------------------------------------------------------------------------------- AlgoConfig path
def _inputs(b, **kw):
    return G.LossInputs(logp=b["lp"], old_logp=b["old"], advantages=b["adv"], mask=MASK, ref_logp=b["ref"], entropy=b["ent"], **kw)


@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo"])
def test_compute_loss_is_policy_loss_with_the_config(objective):
    cfg = G.AlgoConfig(pg_objective=objective, eps_low=0.9 if objective == "cispo" else 0.2, eps_high=0.3,
                       sapo_tau_pos=0.8, sapo_tau_neg=1.7, kl_coef=0.05, kl_estimator="low_var_kl+",
                       kl_ratio_weighted=True, loss_agg_mode="token-mean", global_token_norm=True)
    b = _batch(12)
    got, gm = G.compute_loss(_inputs(b, num_tokens=40.0), cfg)
    want, wm = G.policy_loss(b["lp"], b["old"], b["adv"], MASK, pg_objective=objective, eps_low=cfg.eps_low, eps_high=0.3,
                             sapo_tau_pos=0.8, sapo_tau_neg=1.7, loss_agg_mode="token-mean", num_tokens=40.0,
                             ref_logp=b["ref"], kl_coef=0.05, kl_estimator="low_var_kl+", kl_ratio_weighted=True,
                             entropy=b["ent"])
    assert float(got) == float(want)
    assert {k: float(v) for k, v in gm.items()} == {k: float(v) for k, v in wm.items()}
    slow = slow_loss(b["lp"], b["old"], b["adv"], MASK, objective=objective, eps_low=cfg.eps_low, eps_high=0.3,
                     tau_pos=0.8, tau_neg=1.7, mode="token-mean", num_tokens=40.0) if objective != "clip" else None
    if slow is not None:  # the pg part alone (the metric), against the slow loop
        assert float(gm["pg_loss"]) == pytest.approx(float(slow), rel=1e-12)


@pytest.mark.parametrize("ent_mode,norm_length", [(None, None), ("token-mean", None), ("seq-mean-token-mean", None),
                                                   ("seq-mean-token-sum-norm", None), ("seq-mean-token-sum-norm", 13),
                                                   ("token-sum", None)])
@pytest.mark.parametrize("loss_mode", ["seq-mean-token-sum-norm", "token-mean"])
def test_entropy_bonus_aggregation(loss_mode, ent_mode, norm_length):
    """``loss(ent_coef) - loss(0) = -ent_coef * agg(entropy)`` with ``ent_agg_mode`` (None = ``loss_agg_mode``);
    under seq-mean-token-sum-norm the entropy is divided by ``norm_length`` like the policy term (it was T)."""
    b = _batch(13)
    cfg = G.AlgoConfig(loss_agg_mode=loss_mode, norm_length=norm_length, ent_agg_mode=ent_mode, kl_coef=0.0)
    with_bonus, _ = G.compute_loss(_inputs(b), cfg.replace(ent_coef=0.25))
    without, _ = G.compute_loss(_inputs(b), cfg)
    mode = ent_mode or loss_mode
    rows = [sum(float(b["ent"][i, t]) for t in range(T) if MASK[i, t] > 0) for i in range(B)]
    lens = [int(MASK[i].sum()) for i in range(B)]
    slow = {"token-mean": sum(rows) / sum(lens), "token-sum": sum(rows),
            "seq-mean-token-mean": sum(r / n for r, n in zip(rows, lens)) / B,
            "seq-mean-token-sum-norm": sum(rows) / (B * (T if norm_length is None else norm_length))}[mode]
    assert float(without - with_bonus) == pytest.approx(0.25 * slow, rel=1e-12)


@pytest.mark.parametrize("mode,norm_length", [("seq-mean-token-sum-norm", None), ("seq-mean-token-sum-norm", 13),
                                              ("token-mean", None), ("seq-mean-token-mean", None)])
def test_entropy_bonus_function_equals_the_bonus_inside_the_loss(mode, norm_length):
    """The public ``entropy_bonus`` and the bonus ``compute_loss`` subtracts are one aggregation: same mode, same
    ``norm_length`` (under seq-mean-token-sum-norm both divide by ``norm_length``, not by T)."""
    b = _batch(15)
    cfg = G.AlgoConfig(loss_agg_mode=mode, norm_length=norm_length, kl_coef=0.0)
    with_bonus, _ = G.compute_loss(_inputs(b), cfg.replace(ent_coef=0.5))
    without, _ = G.compute_loss(_inputs(b), cfg)
    bonus = G.entropy_bonus(b["ent"], MASK, mode, norm_length=norm_length)
    assert float(without - with_bonus) == pytest.approx(0.5 * float(bonus), rel=1e-12)
    if norm_length is not None:
        assert float(bonus) != pytest.approx(float(G.entropy_bonus(b["ent"], MASK, mode)), rel=1e-3)


def test_global_token_norm_makes_minibatches_add_up_to_the_batch():
    """TRL dapo: with ``num_tokens`` = the whole batch's token count, the minibatch losses (and gradients) sum to the
    full batch's token-mean loss, however unevenly the tokens fall into the minibatches."""
    b = _batch(14)
    cfg = G.get_preset("dapo", pg_objective="cispo", eps_low=1.0, eps_high=1.0, kl_coef=0.02, kl_ratio_weighted=True)
    lp = b["lp"].clone().requires_grad_(True)
    full, _ = G.compute_loss(G.LossInputs(lp, b["old"], b["adv"], MASK, ref_logp=b["ref"]), cfg)
    full.backward()
    g_full = lp.grad.clone()
    lp.grad = None
    n = float(MASK.sum())
    glob = cfg.replace(global_token_norm=True)
    total = 0.0
    for rows in ([0, 3], [1, 2]):  # 5 and 10 tokens
        part, _ = G.compute_loss(G.LossInputs(lp[rows], b["old"][rows], b["adv"][rows], MASK[rows], ref_logp=b["ref"][rows],
                                              num_tokens=n), glob)
        part.backward()
        total = total + float(part.detach())
    assert total == pytest.approx(float(full.detach()), rel=1e-12)
    torch.testing.assert_close(lp.grad, g_full, rtol=1e-12, atol=1e-15)
    # and the per-minibatch token-mean would not add up: the check above can fail
    local = sum(float(G.compute_loss(G.LossInputs(b["lp"][r], b["old"][r], b["adv"][r], MASK[r], ref_logp=b["ref"][r]), cfg)[0])
                for r in ([0, 3], [1, 2]))
    assert local != pytest.approx(float(full.detach()), rel=1e-6)


def test_global_token_norm_refusals():
    b = _batch(15)
    cfg = G.get_preset("dapo", global_token_norm=True)
    with pytest.raises(ValueError, match=r"num_tokens"):
        G.compute_loss(_inputs(b), cfg)
    with pytest.raises(ValueError, match=r"num_tokens"):
        G.compute_loss(_inputs(b, num_tokens=10.0), G.get_preset("dapo"))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"num_tokens"):
            G.compute_loss(_inputs(b, num_tokens=bad), cfg)
    with pytest.raises(ValueError, match=r"global_token_norm"):
        G.AlgoConfig(global_token_norm=True, loss_agg_mode="seq-mean-token-mean")
    with pytest.raises(ValueError, match=r"num_tokens"):
        G.policy_loss(b["lp"], b["old"], b["adv"], MASK, num_tokens=10.0)  # default mode seq-mean-token-mean


def test_token_sum():
    b = _batch(16)
    x = b["ent"].clone()
    x[0, 4] = math.nan  # padding
    assert float(G.aggregate(x, MASK, "token-sum")) == pytest.approx(float((b["ent"] * MASK).sum()), rel=1e-14)
    tm = float(G.aggregate(b["ent"], MASK, "token-mean"))
    assert float(G.aggregate(b["ent"], MASK, "token-mean", num_tokens=7.0)) == pytest.approx(tm * MASK.sum().item() / 7.0, rel=1e-13)
    assert float(G.aggregate(torch.zeros(0, T), torch.zeros(0, T), "token-sum")) == 0.0


def test_dual_clip_only_with_clip():
    b = _batch(17)
    for objective in ("cispo", "sapo"):
        with pytest.raises(ValueError, match=r"dual_clip"):
            G.policy_loss(b["lp"], b["old"], b["adv"], MASK, pg_objective=objective, dual_clip=3.0)
        with pytest.raises(ValueError, match=r"dual_clip"):
            G.AlgoConfig(pg_objective=objective, dual_clip=3.0)


def test_eps_low_one_is_legal_for_clip():
    """``eps_low = 1``: lower clip bound 0, i.e. none (the ratio is positive): equal to PPO with an unreachable lower
    bound."""
    b = _batch(18, spread=1.0)
    a, _ = G.policy_loss(b["lp"], b["old"], b["adv"], MASK, eps_low=1.0, eps_high=0.2)
    slow = slow_loss(b["lp"], b["old"], b["adv"], MASK, eps_low=1.0, eps_high=0.2)
    assert float(a) == pytest.approx(float(slow), rel=1e-12)
    G.AlgoConfig(eps_low=1.0)
