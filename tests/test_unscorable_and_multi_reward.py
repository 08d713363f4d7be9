"""Unscorable completions (``AlgoConfig.unscorable="zero_advantage"``) and several reward functions
(``combine_rewards``).

The reference is TRL 1.16.0's description (``GRPOTrainer._generate_and_score_completions``): a completion every
reward function returned None for is unscorable, group statistics use the scorable completions only (nanmean,
Bessel-corrected nanstd), and an unscorable completion's advantage is 0. It is written here as slow loops over
Python lists with ``None`` for a missing reward (no torch in the reference, no TRL import).
"""
from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

import grpo_ref as G

NAN = math.nan


# ------------------------------------------------------------------------------------------- slow references
def _std(vals):
    return statistics.stdev(vals) if len(vals) >= 2 else 0.0


def _flat(vals):
    return len(vals) <= 1 or max(vals) == min(vals)


def slow_group_advantages(scores, G_, scale="group", eps=1e-6):
    """GRPO over the scorable members: ``(x - mean) / (std + eps)``; None -> 0; a group with fewer than two distinct
    scorable values -> 0."""
    allv = [x for x in scores if x is not None]
    out = []
    for g in range(0, len(scores), G_):
        grp = scores[g:g + G_]
        vals = [x for x in grp if x is not None]
        for x in grp:
            if x is None or _flat(vals):
                out.append(0.0)
                continue
            c = x - sum(vals) / len(vals)
            if scale == "group":
                c /= _std(vals) + eps
            elif scale == "batch":
                c /= _std(allv) + eps
            out.append(c)
    return out


def slow_rloo(scores, G_):
    out = []
    for g in range(0, len(scores), G_):
        grp = scores[g:g + G_]
        for i, x in enumerate(grp):
            others = [y for j, y in enumerate(grp) if j != i and y is not None]
            vals = [y for y in grp if y is not None]
            out.append(0.0 if x is None or _flat(vals) else x - sum(others) / len(others))
    return out


def slow_combine(rewards, weights, G_, aggregation, scale, eps):
    """``rewards``: list of rows, each a list of K floats or None."""
    K = len(rewards[0])
    w = weights or [1.0] * K
    unscorable = [all(v is None for v in row) for row in rewards]
    if aggregation == "sum_then_normalize":
        total = [None if u else sum(wk * v for wk, v in zip(w, row) if v is not None) for row, u in zip(rewards, unscorable)]
        return slow_group_advantages(total, G_, scale or "group", eps)
    z = [[0.0] * K for _ in rewards]
    for g in range(0, len(rewards), G_):
        for k in range(K):
            vals = [rewards[i][k] for i in range(g, g + G_) if rewards[i][k] is not None]
            for i in range(g, g + G_):
                v = rewards[i][k]
                if v is not None and not _flat(vals):
                    z[i][k] = (v - sum(vals) / len(vals)) / (_std(vals) + eps)
    total = [None if u else sum(wk * zk for wk, zk in zip(w, zr)) for zr, u in zip(z, unscorable)]
    return slow_group_advantages(total, len(rewards), "group", eps)  # whole batch: its mean and std


def _to_tensor(rows):
    return torch.tensor([[NAN if v is None else v for v in row] for row in rows], dtype=torch.float64)


def _random_scores(seed, n_groups=4, G_=4, p_none=0.3, levels=None):
    rnd = random.Random(seed)
    out = []
    for _ in range(n_groups * G_):
        if rnd.random() < p_none:
            out.append(None)
        else:
            out.append(float(rnd.choice(levels)) if levels else rnd.gauss(0.0, 1.0))
    return out


# ------------------------------------------------------------------------------------------- compute_advantages
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", range(4))
def test_grpo_over_scorable_members_matches_slow_loop(scale, seed):
    scores = _random_scores(seed, levels=[0, 0.5, 1, 2] if seed % 2 else None)
    scores[4:8] = [None] * 4  # one group with no scorable member
    scores[8:12] = [None, None, None, 1.0]  # one with a single scorable member
    cfg = G.AlgoConfig(group_size=4, adv_scale=scale, unscorable="zero_advantage")
    mask = torch.ones(16, 3)
    adv, _ = G.compute_advantages(cfg, torch.tensor([NAN if s is None else s for s in scores]), mask)
    want = slow_group_advantages(scores, 4, scale, cfg.adv_eps)
    torch.testing.assert_close(adv, torch.tensor(want, dtype=adv.dtype)[:, None].expand(16, 3), rtol=1e-5, atol=1e-6)
    none = torch.tensor([s is None for s in scores])
    assert bool((adv[none] == 0).all())  # exactly 0
    assert bool((adv[4:12] == 0).all())


@pytest.mark.parametrize("seed", range(3))
def test_rloo_over_scorable_members_matches_slow_loop(seed):
    scores = _random_scores(seed + 10, p_none=0.4)
    cfg = G.get_preset("rloo", group_size=4, unscorable="zero_advantage")
    adv, _ = G.compute_advantages(cfg, torch.tensor([NAN if s is None else s for s in scores]), torch.ones(16, 2))
    torch.testing.assert_close(adv[:, 0], torch.tensor(slow_rloo(scores, 4), dtype=adv.dtype), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_baseline_whitens_over_scorable_tokens_only():
    scores = [1.0, None, 0.0, 0.5, None, None, 2.0, -1.0]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    cfg = G.AlgoConfig(adv_estimator="reinforce_pp_baseline", group_size=4, kl_coef=0.0, unscorable="zero_advantage")
    adv, _ = G.compute_advantages(cfg, torch.tensor([NAN if s is None else s for s in scores]), mask)
    centred = []
    for g in range(0, 8, 4):
        vals = [s for s in scores[g:g + 4] if s is not None]
        centred += [0.0 if s is None or _flat(vals) else s - sum(vals) / len(vals) for s in scores[g:g + 4]]
    toks = [centred[i] for i in range(8) if scores[i] is not None for _ in range(int(mask[i].sum()))]
    mean, var = sum(toks) / len(toks), statistics.variance(toks)
    want = torch.tensor([[0.0 if scores[i] is None or mask[i, t] == 0 else (centred[i] - mean) / math.sqrt(var + 1e-8)
                          for t in range(3)] for i in range(8)])
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-6)
    assert bool((adv[1] == 0).all()) and bool((adv[4:6] == 0).all())


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_without_nan_zero_advantage_is_the_default_path(estimator):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(12, generator=g)
    mask = (torch.rand(12, 5, generator=g) < 0.8).float()
    mask[:, 0] = 1
    cfg = G.AlgoConfig(adv_estimator=estimator, group_size=4, kl_coef=0.0)
    a, _ = G.compute_advantages(cfg, scores, mask)
    b, _ = G.compute_advantages(cfg.replace(unscorable="zero_advantage"), scores, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_nan_aware_path_equals_default_on_complete_groups(estimator):
    """The NaN-aware statistics are the ordinary ones when a group is complete: a batch with one unscorable
    completion in group 0 has group 1's advantages of the default path (grpo, rloo: per group; the whitened
    REINFORCE++-baseline is compared on a batch whose other groups are the same)."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(8, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 3)
    cfg = G.AlgoConfig(adv_estimator=estimator, group_size=4, kl_coef=0.0, unscorable="zero_advantage")
    with_nan = scores.clone()
    with_nan[1] = NAN
    a, _ = G.compute_advantages(cfg, with_nan, mask)
    if estimator != "reinforce_pp_baseline":
        b, _ = G.compute_advantages(cfg.replace(unscorable="refuse"), scores, mask)
        torch.testing.assert_close(a[4:], b[4:], rtol=1e-6, atol=1e-7)
        # group 0 equals the estimator on its three scorable members alone
        three = G.AlgoConfig(adv_estimator=estimator, group_size=3, kl_coef=0.0)
        c, _ = G.compute_advantages(three, scores[[0, 2, 3]], torch.ones(3, 3))
        torch.testing.assert_close(a[[0, 2, 3]], c, rtol=1e-6, atol=1e-7)
    assert bool((a[1] == 0).all())


def test_all_nan_group_gives_zeros_and_refuse_names_scores():
    scores = torch.tensor([NAN] * 4 + [1.0, 0.0, 1.0, 0.0])
    cfg = G.AlgoConfig(group_size=4, unscorable="zero_advantage")
    adv, _ = G.compute_advantages(cfg, scores, torch.ones(8, 2))
    assert bool((adv[:4] == 0).all()) and bool((adv[4:] != 0).all())
    all_nan, _ = G.compute_advantages(cfg, torch.full((8,), NAN), torch.ones(8, 2))
    assert bool((all_nan == 0).all())
    with pytest.raises(ValueError, match=r"scores contains NaN"):
        G.compute_advantages(cfg.replace(unscorable="refuse"), scores, torch.ones(8, 2))
    with pytest.raises(ValueError, match=r"scores contains NaN or inf"):
        G.compute_advantages(cfg, torch.tensor([math.inf, 0.0, 1.0, 0.0] * 2), torch.ones(8, 2))


def test_unscorable_with_reward_shaping_and_kl_in_reward():
    """Overlong shaping and the KL in the reward act on the scorable completions; the unscorable stay at 0."""
    scores = torch.tensor([1.0, NAN, 0.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    old = -torch.rand(4, 4, generator=torch.Generator().manual_seed(5))
    ref = old + 0.3
    cfg = G.get_preset("rloo", group_size=4, kl_coef=0.1, unscorable="zero_advantage", overlong_buffer=2, max_response_length=4)
    adv, _ = G.compute_advantages(cfg, scores, mask, old_logp=old, ref_logp=ref)
    lengths = mask.sum(-1)
    pen = G.overlong_penalty(lengths, 4, 2)
    kl = (G.kl_estimate(old, ref, "k3") * mask).sum(-1)
    shaped = [None if math.isnan(s) else float(s + p - 0.1 * k) for s, p, k in zip(scores.tolist(), pen, kl)]
    torch.testing.assert_close(adv[:, 0], torch.tensor(slow_rloo(shaped, 4)), rtol=1e-5, atol=1e-6)
    assert bool((adv[1] == 0).all())


# ------------------------------------------------------------------------------------------- combine_rewards
@pytest.mark.parametrize("aggregation,scale", [("sum_then_normalize", None), ("sum_then_normalize", "group"),
                                               ("sum_then_normalize", "batch"), ("sum_then_normalize", "none"),
                                               ("normalize_then_sum", None), ("normalize_then_sum", "batch")])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_combine_rewards_matches_slow_loop(aggregation, scale, weighted, seed):
    rnd = random.Random(seed)
    K, G_, n = 3, 4, 3
    rows = [[None if rnd.random() < 0.25 else float(rnd.choice([0, 1, 0.5, rnd.gauss(0, 2)])) for _ in range(K)]
            for _ in range(G_ * n)]
    rows[1] = [None] * K  # unscorable
    rows[8:12] = [[None] * K] * 3 + [[1.0, None, 0.0]]  # a group with one scorable completion
    weights = [0.5, -1.0, 2.0] if weighted else None
    got = G.combine_rewards(_to_tensor(rows), None if weights is None else torch.tensor(weights), G_, aggregation, scale)
    want = slow_combine(rows, weights, G_, aggregation, scale, 1e-4)
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-9, atol=1e-9)
    assert got[1] == 0.0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_combine_rewards_one_function_is_grpo(scale):
    r = torch.randn(12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = G.combine_rewards(r[:, None], None, 4, "sum_then_normalize", scale)
    torch.testing.assert_close(got, G.grpo_advantages(r, 4, scale, eps=1e-4), rtol=1e-12, atol=1e-12)


def test_combine_rewards_weights_scale_the_sum():
    """sum_then_normalize: the weighted sum is ``rewards @ weights`` where nothing is None; scale="none" keeps the
    weights' scale (doubling them doubles the advantages)."""
    r = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w = torch.tensor([0.3, 1.7], dtype=torch.float64)
    got = G.combine_rewards(r, w, 4, scale="none")
    torch.testing.assert_close(got, G.grpo_advantages(r @ w, 4, "none"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G.combine_rewards(r, 2 * w, 4, scale="none"), 2 * got, rtol=1e-12, atol=1e-12)


def test_combine_rewards_none_is_not_zero():
    """A None (NaN) reward is left out, not counted as 0: under normalize_then_sum the function's group statistics
    ignore it, and a completion that one function could not score takes the other functions' signal only."""
    rows = [[1.0, 0.0], [0.0, None], [1.0, 1.0], [0.0, 1.0]]
    as_none = G.combine_rewards(_to_tensor(rows), None, 4, "normalize_then_sum")
    as_zero = G.combine_rewards(_to_tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), None, 4, "normalize_then_sum")
    assert not torch.allclose(as_none, as_zero)
    torch.testing.assert_close(as_none, torch.tensor(slow_combine(rows, None, 4, "normalize_then_sum", None, 1e-4),
                                                     dtype=as_none.dtype), rtol=1e-9, atol=1e-9)


def test_combine_rewards_refusals():
    r = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"scale"):
        G.combine_rewards(r, None, 2, "normalize_then_sum", "group")
    with pytest.raises(ValueError, match=r"aggregation"):
        G.combine_rewards(r, None, 2, "sum")
    with pytest.raises(ValueError, match=r"weights"):
        G.combine_rewards(r, torch.ones(3), 2)
    with pytest.raises(ValueError, match=r"rewards contains NaN or inf"):
        G.combine_rewards(torch.tensor([[math.inf, 0.0], [0.0, 0.0]]), None, 2)
    with pytest.raises(ValueError, match=r"group_size"):
        G.combine_rewards(r, None, 3)
