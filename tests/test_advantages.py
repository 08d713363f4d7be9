"""Advantage estimators against slow per-group / per-sequence / per-token loops written from the papers' equations,
plus hypothesis properties (invariances, permutations, zero-variance groups) and bad-input checks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import holey_mask, make_generator, prompt_response_mask, random_mask
from grpo_ref import (
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    overlong_penalty,
    process_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

# ================================================================ slow references (plain Python floats)


def _mean(xs):
    return sum(xs) / len(xs)


def _std_unbiased(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def slow_grpo(rewards, g, scale="group", eps=1e-6):
    """DeepSeekMath 4.1.2: A_i = (R_i - mean(group)) / (std(group) + eps); batch std or no division as variants."""
    out = []
    batch_std = _std_unbiased(rewards) if len(rewards) > 1 else 0.0
    for k in range(0, len(rewards), g):
        grp = rewards[k : k + g]
        mu = _mean(grp)
        for r in grp:
            if max(grp) == min(grp):
                out.append(0.0)
            elif scale == "group":
                out.append((r - mu) / (_std_unbiased(grp) + eps))
            elif scale == "batch":
                out.append((r - mu) / (batch_std + eps))
            else:
                out.append(r - mu)
    return out


def slow_rloo(rewards, g):
    """A_i = R_i - (1 / (G - 1)) sum_{j != i} R_j."""
    out = []
    for k in range(0, len(rewards), g):
        grp = rewards[k : k + g]
        for i, r in enumerate(grp):
            others = [x for j, x in enumerate(grp) if j != i]
            out.append(r - sum(others) / len(others))
    return out


def _compact(row_vals, row_mask):
    idx = [t for t, m in enumerate(row_mask) if m]
    return idx, [row_vals[t] for t in idx]


def slow_returns(rewards, mask, gamma):
    """G_k = sum_{s >= k} gamma^(s - k) r_s over the compacted (masked-in) positions of each row."""
    b, t = rewards.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        idx, rs = _compact(rewards[i].tolist(), mask[i].tolist())
        for k in range(len(idx)):
            out[i, idx[k]] = sum(gamma ** (s - k) * rs[s] for s in range(k, len(idx)))
    return out


def slow_whiten(x, mask, eps=1e-8):
    sel = [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]
    mu = _mean(sel)
    var = sum((v - mu) ** 2 for v in sel) / (len(sel) - 1)
    return torch.where(mask > 0, (x - mu) / math.sqrt(var + eps), torch.zeros_like(x))


def slow_gae(rewards, values, mask, gamma, lam):
    """Per row, on the compacted response: delta_k = r_k + gamma V_{k+1} - V_k (V after the last token = 0),
    A_k = sum_l (gamma lam)^l delta_{k+l}; returns = A + V."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    ret = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        idx, rs = _compact(rewards[i].tolist(), mask[i].tolist())
        _, vs = _compact(values[i].tolist(), mask[i].tolist())
        n = len(idx)
        deltas = [rs[k] + gamma * (vs[k + 1] if k + 1 < n else 0.0) - vs[k] for k in range(n)]
        for k in range(n):
            a = sum((gamma * lam) ** l * deltas[k + l] for l in range(n - k))
            adv[i, idx[k]] = a
            ret[i, idx[k]] = a + vs[k]
    return adv, ret


def slow_process(step_rewards, step_ends, step_mask, mask, g, eps=1e-6):
    """DeepSeekMath 4.1.3: normalise all step rewards of the group, A_{i,t} = sum of r~_{i,j} with end(j) >= t."""
    b, s = step_rewards.shape
    t_len = mask.shape[1]
    out = torch.zeros(b, t_len, dtype=torch.float64)
    for k in range(0, b, g):
        pool = [step_rewards[i, j].item() for i in range(k, k + g) for j in range(s) if step_mask[i, j]]
        flat = len(pool) <= 1 or max(pool) == min(pool)
        mu = _mean(pool) if pool else 0.0
        sd = _std_unbiased(pool) if len(pool) > 1 else 0.0
        for i in range(k, k + g):
            for t in range(t_len):
                if not mask[i, t]:
                    continue
                acc = 0.0
                for j in range(s):
                    if step_mask[i, j] and int(step_ends[i, j]) >= t and not flat:
                        acc += (step_rewards[i, j].item() - mu) / (sd + eps)
                out[i, t] = acc
    return out


def slow_overlong(length, lmax, lcache):
    """DAPO eq. 13."""
    if length <= lmax - lcache:
        return 0.0
    if length <= lmax:
        return ((lmax - lcache) - length) / lcache
    return -1.0


# ================================================================ data


def _rewards(n_groups, g, seed, kind="normal"):
    gen = make_generator(seed)
    if kind == "binary":
        r = (torch.rand(n_groups * g, generator=gen) < 0.5).double()
    else:
        r = torch.randn(n_groups * g, generator=gen, dtype=torch.float64) * 2 + 1
    r = r.view(n_groups, g)
    r[0] = r[0, 0]  # one flat group
    return r.reshape(-1)


def _token_data(b, t, seed, prompts=True):
    gen = make_generator(seed)
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = prompt_response_mask(b, t, seed, dtype=torch.float64)[0] if prompts else random_mask(b, t, seed,
                                                                                                  dtype=torch.float64)
    return rewards, values, mask


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a.detach().cpu().double(), torch.as_tensor(b, dtype=torch.float64), rtol=tol, atol=tol)


# ================================================================ sequence-level estimators vs loops


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 1e-4, 0.0])
@pytest.mark.parametrize("g", [2, 3, 8])
@pytest.mark.parametrize("kind", ["normal", "binary"])
def test_grpo_matches_loop(scale, eps, g, kind, device):
    r = _rewards(5, g, seed=g, kind=kind)
    out = grpo_advantages(r.to(device), g, scale=scale, eps=eps)
    assert out.shape == r.shape and out.dtype == torch.float64 and out.device.type == device.type
    _close(out, slow_grpo(r.tolist(), g, scale, eps))


def test_grpo_default_is_group_scale_eps_1e6():
    r = _rewards(4, 4, seed=1)
    _close(grpo_advantages(r, 4), slow_grpo(r.tolist(), 4, "group", 1e-6))
    # std is the unbiased one: with the biased std the values would be larger by sqrt(G/(G-1))
    biased = [(x - _mean(r[k:k + 4].tolist())) / (math.sqrt(sum((y - _mean(r[k:k + 4].tolist())) ** 2
                                                                  for y in r[k:k + 4].tolist()) / 4) + 1e-6)
              for k in range(0, 16, 4) for x in r[k:k + 4].tolist()]
    assert (grpo_advantages(r, 4) - torch.tensor(biased, dtype=torch.float64)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grpo_low_precision_rewards(dtype):
    r = _rewards(3, 4, seed=2).to(dtype)
    out = grpo_advantages(r, 4)
    assert out.dtype == torch.float32
    _close(out, slow_grpo(r.double().tolist(), 4), tol=1e-5)


@pytest.mark.parametrize("g", [2, 3, 5])
def test_rloo_matches_leave_one_out_loop(g, device):
    for kind in ("normal", "binary"):
        r = _rewards(4, g, seed=10 + g, kind=kind)
        out = rloo_advantages(r.to(device), g)
        assert out.device.type == device.type
        _close(out, slow_rloo(r.tolist(), g))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_match_loop(gamma, device):
    rewards, _, mask = _token_data(6, 10, seed=20)
    out = discounted_returns(rewards.to(device), mask.to(device), gamma)
    assert out.device.type == device.type
    _close(out, slow_returns(rewards, mask, gamma))
    assert (out.cpu()[mask == 0] == 0).all()


@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_reinforce_pp_matches_loop(gamma, device):
    rewards, _, mask = _token_data(6, 9, seed=21)
    out = reinforce_pp_advantages(rewards.to(device), mask.to(device), gamma)
    assert out.device.type == device.type
    _close(out, slow_whiten(slow_returns(rewards, mask, gamma), mask))


@pytest.mark.parametrize("g", [2, 3])
def test_reinforce_pp_baseline_matches_loop(g, device):
    rewards, _, mask = _token_data(6, 9, seed=22)
    out = reinforce_pp_advantages(rewards.to(device), mask.to(device), group_size=g)
    scores = [sum(v for v, m in zip(rewards[i].tolist(), mask[i].tolist()) if m) for i in range(6)]
    centred = []
    for k in range(0, 6, g):
        mu = _mean(scores[k:k + g])
        centred += [s - mu for s in scores[k:k + g]]
    broadcast = torch.tensor(centred, dtype=torch.float64)[:, None] * mask
    _close(out, slow_whiten(broadcast, mask))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (1.0, 0.0), (0.0, 0.5)])
def test_gae_matches_loop(gamma, lam, device):
    rewards, values, mask = _token_data(7, 11, seed=23)
    adv, ret = gae_advantages(rewards.to(device), values.to(device), mask.to(device), gamma, lam)
    assert adv.device.type == device.type
    ref_adv, ref_ret = slow_gae(rewards, values, mask, gamma, lam)
    _close(adv, ref_adv)
    _close(ret, ref_ret)
    # returns are taken before whitening: returns - values = advantages on the response
    _close(ret - values.to(device) * mask.to(device), adv)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_masked_out_gaps_are_skipped_not_counted(gamma, lam, device):
    """Multi-turn masks (tool output masked out inside the response): the gaps add no reward, count as no step
    and are not bootstrapped from, so the result equals the loop on the compacted response."""
    rewards, values, _ = _token_data(6, 14, seed=32)
    mask = holey_mask(6, 14, seed=32, dtype=torch.float64)
    assert ((mask[:, 1:] - mask[:, :-1]) > 0).sum() > 6  # really several response spans per row
    r, v, m = rewards.to(device), values.to(device), mask.to(device)
    _close(discounted_returns(r, m, gamma), slow_returns(rewards, mask, gamma))
    adv, ret = gae_advantages(r, v, m, gamma, lam)
    ref_adv, ref_ret = slow_gae(rewards, values, mask, gamma, lam)
    _close(adv, ref_adv)
    _close(ret, ref_ret)
    _close(reinforce_pp_advantages(r, m, gamma), slow_whiten(slow_returns(rewards, mask, gamma), mask))


def test_gae_lam1_gamma1_is_return_to_go_minus_value():
    rewards, values, mask = _token_data(6, 10, seed=24)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    _close(adv, slow_returns(rewards, mask, 1.0) - values * mask)
    _close(ret, slow_returns(rewards, mask, 1.0))


def test_gae_right_padding_and_prompt_offset_change_nothing():
    rewards, values, mask = _token_data(5, 8, seed=25, prompts=False)  # responses start at column 0
    adv, ret = gae_advantages(rewards, values, mask, 0.97, 0.9)
    gen = make_generator(26)
    # extra masked-out columns on the right, holding random finite garbage
    pad = 4
    r2 = torch.cat([rewards, torch.randn(5, pad, generator=gen, dtype=torch.float64) * 100], 1)
    v2 = torch.cat([values, torch.randn(5, pad, generator=gen, dtype=torch.float64) * 100], 1)
    m2 = torch.cat([mask, torch.zeros(5, pad, dtype=torch.float64)], 1)
    adv2, ret2 = gae_advantages(r2, v2, m2, 0.97, 0.9)
    torch.testing.assert_close(adv2[:, :8], adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret2[:, :8], ret, rtol=0, atol=1e-12)
    assert (adv2[:, 8:] == 0).all() and (ret2[:, 8:] == 0).all()
    # a prompt of random garbage on the left: same advantages, shifted
    r3 = torch.cat([torch.randn(5, 3, generator=gen, dtype=torch.float64) * 100, rewards], 1)
    v3 = torch.cat([torch.randn(5, 3, generator=gen, dtype=torch.float64) * 100, values], 1)
    m3 = torch.cat([torch.zeros(5, 3, dtype=torch.float64), mask], 1)
    adv3, ret3 = gae_advantages(r3, v3, m3, 0.97, 0.9)
    torch.testing.assert_close(adv3[:, 3:], adv, rtol=0, atol=1e-12)
    assert (adv3[:, :3] == 0).all() and (ret3[:, :3] == 0).all()


def test_gae_nonfinite_values_outside_mask():
    """Values at padded positions are never used; a NaN/inf there must not show up in the outputs, which are
    documented to be 0 where masked out."""
    rewards, values, mask = _token_data(5, 8, seed=27)
    poisoned = values.clone()
    poisoned[mask == 0] = float("nan")
    adv, ret = gae_advantages(rewards, poisoned, mask, 1.0, 0.95)
    ref_adv, ref_ret = slow_gae(rewards, values, mask, 1.0, 0.95)
    _close(adv, ref_adv)
    assert torch.isfinite(ret).all(), ret
    _close(ret, ref_ret)


def test_token_estimators_ignore_nonfinite_rewards_outside_mask():
    """The finiteness check is meant for masked-in rewards only (it checks ``r * m``); a NaN in a padded slot
    should be ignored like any other padding value, not rejected."""
    rewards, values, mask = _token_data(4, 7, seed=28)
    poisoned = rewards.clone()
    poisoned[mask == 0] = float("nan")
    _close(discounted_returns(poisoned, mask, 0.9), slow_returns(rewards, mask, 0.9))
    _close(gae_advantages(poisoned, values, mask, 1.0, 0.95)[0], slow_gae(rewards, values, mask, 1.0, 0.95)[0])


def test_gae_values_get_no_gradient():
    rewards, values, mask = _token_data(3, 5, seed=29)
    v = values.clone().requires_grad_(True)
    adv, ret = gae_advantages(rewards, v, mask)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- process supervision


def _process_data(b, t, s, seed):
    gen = make_generator(seed)
    mask, prompts, resp = prompt_response_mask(b, t, seed, dtype=torch.float64)
    step_rewards = torch.randn(b, s, generator=gen, dtype=torch.float64)
    step_ends = torch.zeros(b, s, dtype=torch.long)
    step_mask = torch.zeros(b, s, dtype=torch.float64)
    for i in range(b):
        p, n = int(prompts[i]), int(resp[i])
        if n == 0:
            continue
        k = int(torch.randint(1, min(s, n) + 1, (1,), generator=gen))
        ends = sorted(torch.randperm(n, generator=gen)[: k - 1].tolist())
        ends = sorted(set(ends) | {n - 1})  # the last step ends on the last response token
        for j, e in enumerate(ends):
            step_ends[i, j] = p + e
            step_mask[i, j] = 1.0
        # padding steps: ends anywhere (even 0), rewards arbitrary; both must be ignored
        step_ends[i, len(ends):] = torch.randint(0, t, (s - len(ends),), generator=gen)
    return step_rewards, step_ends, step_mask, mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("g", [2, 3])
def test_process_advantages_match_loop(seed, g, device):
    sr, se, sm, mask = _process_data(6, 12, 4, seed)
    out = process_advantages(sr.to(device), se.to(device), sm.to(device), mask.to(device), g)
    assert out.shape == mask.shape and out.device.type == device.type
    _close(out, slow_process(sr, se, sm, mask, g))
    # padding steps really are ignored: changing their rewards / ends changes nothing
    sr2, se2 = sr.clone(), se.clone()
    sr2[sm == 0] = 1e6
    se2[sm == 0] = 11
    _close(process_advantages(sr2, se2, sm, mask, g), slow_process(sr, se, sm, mask, g))


def test_process_advantages_single_step_equals_outcome_grpo():
    """One step per completion ending at the last response token: process supervision reduces to GRPO outcome
    supervision broadcast over the response."""
    b, t, g = 6, 9, 3
    gen = make_generator(30)
    prompts = torch.randint(0, 4, (b,), generator=gen)
    lengths = torch.randint(1, t - 3, (b,), generator=gen)  # non-empty responses, right padding
    pos = torch.arange(t)
    mask = ((pos >= prompts[:, None]) & (pos < (prompts + lengths)[:, None])).double()
    ends = (prompts + lengths - 1)[:, None]
    r = torch.randn(b, 1, generator=make_generator(31), dtype=torch.float64)
    out = process_advantages(r, ends, torch.ones(b, 1), mask, g)
    expect = grpo_advantages(r[:, 0], g)[:, None] * mask
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_process_flat_group_is_zero():
    sr, se, sm, mask = _process_data(4, 10, 3, seed=5)
    sr[:2] = 0.3  # group 0 all steps equal
    out = process_advantages(sr, se, sm, mask, 2)
    assert (out[:2] == 0).all()
    _close(out, slow_process(sr, se, sm, mask, 2))


def test_process_bad_input():
    sr, se, sm, mask = _process_data(4, 10, 3, seed=6)
    with pytest.raises(ValueError, match="step_ends must be integer"):
        process_advantages(sr, se.double(), sm, mask, 2)
    bad = se.clone()
    bad[sm > 0] = 10
    with pytest.raises(ValueError, match="step_ends must be integer"):
        process_advantages(sr, bad, sm, mask, 2)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        process_advantages(sr, se, sm, mask, 3)
    with pytest.raises(ValueError, match="rows"):
        process_advantages(sr, se, sm, mask[:3], 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        process_advantages(sr, se[:, :2], sm, mask, 2)
    nan = sr.clone()
    nan[sm > 0] = float("nan")
    with pytest.raises(ValueError, match="step_rewards contains NaN"):
        process_advantages(nan, se, sm, mask, 2)


# ---------------------------------------------------------------- DAPO overlong penalty


@pytest.mark.parametrize("lmax,lcache", [(20, 4), (16, 16), (10, 1), (4096, 512)])
def test_overlong_penalty_piecewise(lmax, lcache, device):
    lengths = torch.cat([torch.arange(0, min(lmax, 60) + 3), torch.tensor([lmax - lcache, lmax - lcache + 1,
                                                                           lmax - 1, lmax, lmax + 1, 10 * lmax])])
    out = overlong_penalty(lengths.to(device), lmax, lcache)
    assert out.dtype == torch.float32 and out.device.type == device.type
    _close(out, [slow_overlong(int(x), lmax, lcache) for x in lengths], tol=1e-6)
    soft = lmax - lcache
    at = lambda n: overlong_penalty(torch.tensor([n]), lmax, lcache).item()  # noqa: E731
    assert at(soft) == 0.0
    assert at(soft + 1) == pytest.approx(-1.0 / lcache, abs=1e-7)
    assert at(lmax) == pytest.approx(-1.0, abs=1e-7)
    assert at(lmax + 1) == -1.0


def test_overlong_penalty_bad_input():
    for lmax, lcache in [(10, 0), (10, 11), (10, -1)]:
        with pytest.raises(ValueError, match="cache_length"):
            overlong_penalty(torch.tensor([5]), lmax, lcache)


# ================================================================ hypothesis properties

G_SIZES = st.sampled_from([2, 3, 4, 8])
GRID = st.integers(-40, 40).map(lambda k: k / 4.0)  # rule-based rewards live on a small grid


@st.composite
def grouped_rewards(draw, values=GRID, min_groups=1, max_groups=5):
    g = draw(G_SIZES)
    n = draw(st.integers(min_groups, max_groups))
    flat = draw(st.lists(values, min_size=n * g, max_size=n * g))
    return torch.tensor(flat, dtype=torch.float64), g


def _per_group_std(r, g):
    return r.view(-1, g).std(-1, keepdim=True).expand(-1, g).reshape(-1)


@settings(max_examples=80, deadline=None)
@given(data=grouped_rewards(), c=st.floats(-1e3, 1e3, allow_nan=False))
def test_grpo_shift_invariance(data, c):
    r, g = data
    for scale in ("group", "batch", "none"):
        for eps in (0.0, 1e-6):
            torch.testing.assert_close(grpo_advantages(r + c, g, scale, eps), grpo_advantages(r, g, scale, eps),
                                       rtol=0, atol=1e-9)


@settings(max_examples=80, deadline=None)
@given(data=grouped_rewards(), a=st.floats(1e-2, 1e2))
def test_grpo_scale_invariance(data, a):
    r, g = data
    base0 = grpo_advantages(r, g, "group", eps=0.0)
    torch.testing.assert_close(grpo_advantages(a * r, g, "group", eps=0.0), base0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grpo_advantages(a * r, g, "batch", eps=0.0), grpo_advantages(r, g, "batch", eps=0.0),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grpo_advantages(a * r, g, "none"), a * grpo_advantages(r, g, "none"),
                               rtol=1e-9, atol=1e-9)
    # with eps > 0 the invariance holds only up to eps / std: |A(aR) - A(R)| <= |A0| * max(eps, eps/a) / std
    eps = 1e-6
    std = _per_group_std(r, g)
    bound = torch.where(std > 0, base0.abs() * max(eps, eps / a) / std.clamp_min(1e-300), torch.zeros_like(std))
    diff = (grpo_advantages(a * r, g, "group", eps) - grpo_advantages(r, g, "group", eps)).abs()
    assert (diff <= bound + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(data=grouped_rewards(min_groups=2), seed=st.integers(0, 2**16))
def test_grpo_group_permutation_equivariance(data, seed):
    r, g = data
    n = r.numel() // g
    perm = torch.randperm(n, generator=make_generator(seed))
    permuted = r.view(n, g)[perm].reshape(-1)
    for scale in ("group", "batch", "none"):
        expect = grpo_advantages(r, g, scale).view(n, g)[perm].reshape(-1)
        torch.testing.assert_close(grpo_advantages(permuted, g, scale), expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rloo_advantages(permuted, g), rloo_advantages(r, g).view(n, g)[perm].reshape(-1),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(data=grouped_rewards(), seed=st.integers(0, 2**16))
def test_grpo_within_group_permutation_equivariance(data, seed):
    r, g = data
    n = r.numel() // g
    gen = make_generator(seed)
    idx = torch.stack([torch.randperm(g, generator=gen) + k * g for k in range(n)]).reshape(-1)
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(grpo_advantages(r[idx], g, scale), grpo_advantages(r, g, scale)[idx],
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rloo_advantages(r[idx], g), rloo_advantages(r, g)[idx], rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    data=grouped_rewards(values=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False)),
    flat_value=st.one_of(st.just(0.1), st.just(1.0 / 3.0), st.floats(-1e6, 1e6, allow_nan=False)),
    which=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_zero_variance_groups_exactly_zero(data, flat_value, which, dtype):
    r, g = data
    n = r.numel() // g
    r = r.view(n, g).clone()
    k = which % n
    r[k] = flat_value
    r = r.reshape(-1).to(dtype)
    for scale in ("group", "batch", "none"):
        for eps in (0.0, 1e-6):
            a = grpo_advantages(r, g, scale, eps).view(n, g)
            assert torch.isfinite(a).all()
            assert (a[k] == 0).all(), (scale, eps, a[k])
    assert (rloo_advantages(r, g).view(n, g)[k] == 0).all()


@settings(max_examples=80, deadline=None)
@given(data=grouped_rewards(values=st.floats(-100, 100, allow_nan=False)))
def test_rloo_is_scaled_dr_grpo(data):
    r, g = data
    torch.testing.assert_close(rloo_advantages(r, g), g / (g - 1) * grpo_advantages(r, g, "none"),
                               rtol=1e-12, atol=1e-10)
    _close(rloo_advantages(r, g), slow_rloo(r.tolist(), g), tol=1e-9)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), pad=st.integers(1, 4), gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_right_padding_property(seed, pad, gamma, lam):
    rewards, values, mask = _token_data(3, 6, seed=seed)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    gen = make_generator(seed + 1)
    r2 = torch.cat([rewards, torch.randn(3, pad, generator=gen, dtype=torch.float64)], 1)
    v2 = torch.cat([values, torch.randn(3, pad, generator=gen, dtype=torch.float64)], 1)
    m2 = torch.cat([mask, torch.zeros(3, pad, dtype=torch.float64)], 1)
    adv2, ret2 = gae_advantages(r2, v2, m2, gamma, lam)
    torch.testing.assert_close(adv2[:, :6], adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret2[:, :6], ret, rtol=0, atol=1e-12)
    _close(adv, slow_gae(rewards, values, mask, gamma, lam)[0], tol=1e-9)


# ================================================================ bad input


def test_batch_not_multiple_of_group():
    r = torch.randn(7)
    for fn in (lambda: grpo_advantages(r, 4), lambda: rloo_advantages(r, 4),
               lambda: reinforce_pp_advantages(torch.randn(7, 3), torch.ones(7, 3), group_size=4)):
        with pytest.raises(ValueError, match="batch size 7 is not a multiple of group_size 4"):
            fn()


@pytest.mark.parametrize("g", [1, 0, -2])
def test_group_size_too_small(g):
    r = torch.randn(6)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(r, g)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(r, g)


def test_group_size_one_message():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        grpo_advantages(torch.randn(6), 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_reward(bad):
    r = torch.randn(6)
    r[4] = bad
    with pytest.raises(ValueError, match="rewards contains NaN or inf"):
        grpo_advantages(r, 3)
    with pytest.raises(ValueError, match="rewards contains NaN or inf"):
        rloo_advantages(r, 3)
    tok = torch.randn(2, 3)
    tok[1, 1] = bad
    with pytest.raises(ValueError, match="token_rewards contains NaN or inf"):
        discounted_returns(tok, torch.ones(2, 3))
    with pytest.raises(ValueError, match="token_rewards contains NaN or inf"):
        gae_advantages(tok, torch.zeros(2, 3), torch.ones(2, 3))


def test_unknown_scale():
    with pytest.raises(ValueError, match="unknown advantage scale 'std'"):
        grpo_advantages(torch.randn(4), 2, scale="std")


def test_rewards_must_be_1d():
    for fn in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="rewards must be 1-D"):
            fn(torch.randn(4, 2), 2)


def test_negative_eps_and_bad_gae_params():
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(torch.randn(4), 2, eps=-1e-3)
    r, v, m = _token_data(2, 3, seed=40)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\], got 1.1"):
        gae_advantages(r, v, m, gamma=1.1)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\], got -0.1"):
        gae_advantages(r, v, m, lam=-0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        gae_advantages(r, v[:, :2], m)
    with pytest.raises(ValueError, match="token_rewards must be 2-D"):
        discounted_returns(r[0], m[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        discounted_returns(r, m[:, :2])
