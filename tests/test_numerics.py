"""Numerics and input validation: clear ValueErrors, empty responses, flat groups, huge log-ratios, half
precision, CUDA.

Every bad input must raise ``ValueError`` whose message names the problem; every degenerate but legal input
(no response token, a group of equal rewards, log-ratios of +-1e4, bf16/fp16 tensors) must give finite values
and finite gradients, never NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

import grpo_ref
from grpo_ref import (
    PRESETS,
    AlgoConfig,
    LossInputs,
    aggregate,
    compute_advantages,
    compute_loss,
    get_preset,
    grpo_advantages,
    kl_estimate,
    kl_in_reward,
    policy_loss,
    rloo_advantages,
    value_loss,
)

PRESET_NAMES = list(PRESETS)
MODES = list(grpo_ref.LOSS_AGG_MODES)


def make(B=4, T=6, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for i in range(B):
        L = 1 + (i * 2) % T
        mask[i, T - L:] = 1.0
    old = -(torch.rand(B, T, generator=g) * 3 + 0.05)
    d = dict(
        lp=old + 0.4 * torch.randn(B, T, generator=g),
        old=old,
        ref=old + 0.4 * torch.randn(B, T, generator=g),
        adv=torch.randn(B, T, generator=g),
        mask=mask,
        values=torch.randn(B, T, generator=g),
        old_values=torch.randn(B, T, generator=g),
        returns=torch.randn(B, T, generator=g),
        scores=torch.randint(0, 3, (B,), generator=g).float(),
        entropy=torch.rand(B, T, generator=g),
    )
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k != "mask" else v.dtype) for k, v in d.items()}


def run_preset(cfg, d, lp_dtype=None):
    """compute_loss on a batch; returns (loss, grad wrt logp, grad wrt values)."""
    lp = d["lp"].detach().clone().requires_grad_(True)
    v = d["values"].detach().clone().requires_grad_(True)
    inp = LossInputs(lp, d["old"], d["adv"], d["mask"], ref_logp=d["ref"], entropy=d["entropy"], values=v,
                     old_values=d["old_values"], returns=d["returns"])
    loss, metrics = compute_loss(inp, cfg)
    glp, gv = torch.autograd.grad(loss, (lp, v), allow_unused=True)
    return loss, glp, (torch.zeros_like(v) if gv is None else gv), metrics


# --------------------------------------------------------------------------------------------------------
# 1. bad input -> ValueError naming the problem
# --------------------------------------------------------------------------------------------------------
def test_policy_loss_shape_mismatch_names_the_tensors():
    d = make()
    with pytest.raises(ValueError, match=r"shape mismatch.*old_logp=\(4, 5\)"):
        policy_loss(d["lp"], d["old"][:, :5], d["adv"], d["mask"])
    with pytest.raises(ValueError, match=r"shape mismatch.*mask=\(3, 6\)"):
        policy_loss(d["lp"], d["old"], d["adv"], d["mask"][:3])
    with pytest.raises(ValueError, match=r"shape mismatch.*ref_logp"):
        policy_loss(d["lp"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"][:, 1:], kl_coef=0.1)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
        policy_loss(d["lp"], d["old"], d["adv"][:3], d["mask"])
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
        policy_loss(d["lp"], d["old"], torch.ones(5), d["mask"])
    with pytest.raises(ValueError, match=r"logp must be 2-D"):
        policy_loss(d["lp"][0], d["old"][0], d["adv"][0], d["mask"][0])


def test_aggregate_value_loss_kl_in_reward_shape_mismatch():
    d = make()
    with pytest.raises(ValueError, match=r"shape mismatch.*mask=\(4, 5\)"):
        aggregate(d["lp"], d["mask"][:, :5], "token-mean")
    with pytest.raises(ValueError, match=r"shape mismatch.*returns=\(4, 5\)"):
        value_loss(d["values"], d["old_values"], d["returns"][:, :5], d["mask"])
    with pytest.raises(ValueError, match=r"shape mismatch.*ref_logp=\(4, 5\)"):
        kl_in_reward(d["scores"], d["lp"], d["ref"][:, :5], d["mask"], 0.1)
    with pytest.raises(ValueError, match=r"scores must be \[B\]"):
        kl_in_reward(d["scores"][:3], d["lp"], d["ref"], d["mask"], 0.1)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_batch_not_a_multiple_of_group_size(name):
    cfg = get_preset(name, group_size=4)
    with pytest.raises(ValueError, match=r"batch size 6 is not a multiple of group_size 4"):
        compute_advantages(cfg, torch.arange(6.0), torch.ones(6, 3))
    with pytest.raises(ValueError, match=r"not a multiple of group_size"):
        grpo_advantages(torch.arange(6.0), 4)


def test_unknown_names():
    d = make()
    args = (d["lp"], d["old"], d["adv"], d["mask"])
    with pytest.raises(ValueError, match=r"unknown loss_agg_mode 'mean'"):
        policy_loss(*args, loss_agg_mode="mean")
    with pytest.raises(ValueError, match=r"unknown loss_agg_mode"):
        aggregate(d["lp"], d["mask"], "sum")
    with pytest.raises(ValueError, match=r"unknown ratio_level 'seq'"):
        policy_loss(*args, ratio_level="seq")
    with pytest.raises(ValueError, match=r"unknown algorithm 'ppo2'"):
        get_preset("ppo2")
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'"):
        kl_estimate(d["lp"], d["ref"], "k4")
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'"):
        policy_loss(*args, ref_logp=d["ref"], kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"unknown kl_estimator"):
        AlgoConfig(kl_estimator="low_var")
    with pytest.raises(ValueError, match=r"unknown adv_estimator 'vtrace'"):
        AlgoConfig(adv_estimator="vtrace")
    with pytest.raises(ValueError, match=r"unknown loss_agg_mode"):
        get_preset("grpo", loss_agg_mode="token-max")


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_nan_in_rewards_is_refused(name):
    cfg = PRESETS[name]
    B = 2 * cfg.group_size
    scores = torch.ones(B)
    scores[1] = math.nan
    z = torch.zeros(B, 3)
    with pytest.raises(ValueError, match=r"(rewards|scores) contains NaN or inf"):
        compute_advantages(cfg, scores, torch.ones(B, 3), old_logp=z, ref_logp=z, values=z)


def test_nan_in_rewards_is_refused_by_estimators():
    r = torch.tensor([1.0, math.nan, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"rewards contains NaN or inf"):
        grpo_advantages(r, 2)
    with pytest.raises(ValueError, match=r"rewards contains NaN or inf"):
        rloo_advantages(r, 2)
    d = make()
    adv = d["adv"].clone()
    adv[3, -1] = math.nan  # a masked-in position
    with pytest.raises(ValueError, match=r"advantages contains NaN or inf"):
        policy_loss(d["lp"], d["old"], adv, d["mask"])


@pytest.mark.parametrize("kw", [dict(eps_low=0.0), dict(eps_low=-0.1), dict(eps_low=1.5), dict(eps_high=0.0),
                                dict(eps_high=-0.2)])
def test_bad_clip_range(kw):
    d = make()
    (name, value), = kw.items()
    expected = rf"{name} must (lie in \(0, 1\]|be > 0), got {value}"
    with pytest.raises(ValueError, match=expected):
        policy_loss(d["lp"], d["old"], d["adv"], d["mask"], **kw)
    with pytest.raises(ValueError, match=expected):
        AlgoConfig(**{k: v for k, v in {"eps_low": 0.2, "eps_high": 0.2, **kw}.items()})


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_bad_dual_clip(c):
    d = make()
    with pytest.raises(ValueError, match=r"dual_clip must be > 1"):
        policy_loss(d["lp"], d["old"], d["adv"], d["mask"], dual_clip=c)
    with pytest.raises(ValueError, match=r"dual_clip must be > 1"):
        AlgoConfig(dual_clip=c)


def test_kl_coef_without_ref_logp():
    d = make()
    with pytest.raises(ValueError, match=r"kl_coef > 0 needs ref_logp"):
        policy_loss(d["lp"], d["old"], d["adv"], d["mask"], kl_coef=0.04)
    with pytest.raises(ValueError, match=r"kl_coef > 0 needs ref_logp"):
        compute_loss(LossInputs(d["lp"], d["old"], d["adv"], d["mask"]), PRESETS["grpo"])
    with pytest.raises(ValueError, match=r"kl_coef must be >= 0"):
        policy_loss(d["lp"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"], kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"needs old_logp and ref_logp"):
        compute_advantages(PRESETS["ppo"], d["scores"], d["mask"], values=d["values"])
    with pytest.raises(ValueError, match=r"needs values"):
        compute_advantages(PRESETS["ppo"], d["scores"], d["mask"], old_logp=d["old"], ref_logp=d["ref"])
    with pytest.raises(ValueError, match=r"needs values, old_values and returns"):
        compute_loss(LossInputs(d["lp"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"]), PRESETS["ppo"])


@pytest.mark.parametrize("est", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_group_size_one_is_refused(est):
    with pytest.raises(ValueError, match=r"needs group_size >= 2"):
        AlgoConfig(adv_estimator=est, group_size=1)
    with pytest.raises(ValueError, match=r"group_size must be >= 2"):
        grpo_advantages(torch.arange(4.0), 1)


def test_algo_config_is_frozen_and_mask_must_be_binary():
    cfg = PRESETS["grpo"]
    with pytest.raises(Exception, match="cannot assign"):
        cfg.kl_coef = 0.0  # type: ignore[misc]
    d = make()
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        policy_loss(d["lp"], d["old"], d["adv"], d["mask"] * 0.5)


# --------------------------------------------------------------------------------------------------------
# 2. empty responses and flat groups
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_empty_responses_give_zero_loss_and_zero_grads(mode, ratio_level):
    d = make()
    lp = d["lp"].clone().requires_grad_(True)
    loss, m = policy_loss(lp, d["old"], d["adv"], torch.zeros_like(d["mask"]), ratio_level=ratio_level,
                          loss_agg_mode=mode, ref_logp=d["ref"], kl_coef=0.1, dual_clip=3.0)
    loss.backward()
    assert loss.item() == 0.0
    assert (lp.grad == 0).all()
    assert all(torch.isfinite(v).all() for v in m.values())


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_empty_responses_every_preset(name):
    cfg = PRESETS[name]
    B = 2 * cfg.group_size
    d = make(B=B)
    d["mask"] = torch.zeros_like(d["mask"])
    loss, glp, gv, metrics = run_preset(cfg, d)
    assert loss.item() == 0.0
    assert (glp == 0).all() and (gv == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    adv, ret = compute_advantages(cfg, d["scores"], d["mask"], old_logp=d["old"], ref_logp=d["ref"], values=d["values"])
    assert (adv == 0).all()
    assert ret is None or (ret == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, 1.0, 1e8, -3.3])
def test_flat_group_gives_exactly_zero_advantage(dtype, value):
    """All G completions of a prompt got the same reward: no learning signal, advantage exactly 0 (no 1e-9
    residue from the mean, no 0/0 NaN even with eps = 0)."""
    G = 7
    r = torch.cat([torch.full((G,), value, dtype=dtype), torch.arange(G, dtype=dtype)])
    for scale in ("group", "batch", "none"):
        for eps in (0.0, 1e-6):
            a = grpo_advantages(r, G, scale, eps)
            assert (a[:G] == 0).all() and torch.isfinite(a).all()
            assert (a[G:] != 0).any()
    assert (rloo_advantages(r, G)[:G] == 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo", "rloo"])
def test_flat_groups_give_zero_advantages_and_finite_loss(name):
    cfg = get_preset(name, group_size=3)
    d = make(B=6)
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    adv, _ = compute_advantages(cfg, scores, d["mask"], old_logp=d["old"], ref_logp=d["ref"])
    assert (adv == 0).all()
    d["adv"] = adv
    loss, glp, _, _ = run_preset(cfg, d)
    assert torch.isfinite(loss) and torch.isfinite(glp).all()
    if cfg.kl_coef == 0:
        assert loss.item() == 0.0 and (glp == 0).all()
    else:  # only the KL term moves the policy
        assert loss.item() > 0 and (glp != 0).any()


# --------------------------------------------------------------------------------------------------------
# 3. huge log-ratios
# --------------------------------------------------------------------------------------------------------
def _extreme_batch(B, T=6, big=1e4, dtype=torch.float32):
    """logp - old and logp - ref alternate between +big and -big (stale or corrupt log-probs)."""
    d = make(B=B, T=T, dtype=dtype)
    sign = torch.ones(B, T)
    sign[:, 1::2] = -1.0
    sign[1::2] *= -1.0
    d["lp"] = torch.where(sign > 0, torch.full((B, T), -1.0), torch.full((B, T), -big - 1.0)).to(dtype)
    d["old"] = (d["lp"] - big * sign).to(dtype)
    d["ref"] = (d["lp"] + big * sign.roll(1, dims=1)).to(dtype)
    return d


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("big", [1e4, -1e4, 50.0])
def test_huge_log_ratios_stay_finite_every_preset(name, big):
    cfg = PRESETS[name]
    B = 2 * cfg.group_size
    d = _extreme_batch(B, big=big)
    loss, glp, gv, metrics = run_preset(cfg, d)
    assert torch.isfinite(loss), loss
    assert torch.isfinite(glp).all() and torch.isfinite(gv).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    adv, ret = compute_advantages(cfg, d["scores"], d["mask"], old_logp=d["old"], ref_logp=d["ref"], values=d["values"])
    assert torch.isfinite(adv).all()
    assert ret is None or torch.isfinite(ret).all()
    # the same with KL in the loss and in the reward switched on, whatever the preset says
    for over in (dict(kl_coef=0.1, kl_placement="loss"), dict(kl_coef=0.1, kl_placement="reward")):
        loss, glp, gv, _ = run_preset(cfg.replace(**over), d)
        assert torch.isfinite(loss) and torch.isfinite(glp).all() and torch.isfinite(gv).all()
        adv, _ = compute_advantages(cfg.replace(**over), d["scores"], d["mask"], old_logp=d["old"],
                                    ref_logp=d["ref"], values=d["values"])
        assert torch.isfinite(adv).all()


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", MODES)
def test_huge_log_ratios_policy_loss(ratio_level, est, mode):
    d = _extreme_batch(4)
    lp = d["lp"].clone().requires_grad_(True)
    loss, m = policy_loss(lp, d["old"], d["adv"], d["mask"], ratio_level=ratio_level, loss_agg_mode=mode,
                          ref_logp=d["ref"], kl_coef=0.5, kl_estimator=est, dual_clip=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v).all() for v in m.values())


# --------------------------------------------------------------------------------------------------------
# 4. half precision
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_half_precision_inputs(name, half):
    """bf16/fp16 inputs are computed in float32: float32 loss, finite values and grads, equal to the float32
    computation on the same (rounded) numbers and close to the one on the unrounded float32 inputs."""
    cfg = PRESETS[name]
    B = 2 * cfg.group_size
    d32 = make(B=B, seed=3)
    dh = {k: (v.to(half) if v.is_floating_point() and k != "mask" else v) for k, v in d32.items()}
    d_round = {k: (v.float() if v.is_floating_point() else v) for k, v in dh.items()}
    loss_h, glp_h, gv_h, met_h = run_preset(cfg, dh)
    loss_r, glp_r, gv_r, _ = run_preset(cfg, d_round)
    loss_32, _, _, _ = run_preset(cfg, d32)
    assert loss_h.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in met_h.values())
    assert glp_h.dtype == half  # the gradient of a half leaf is half
    assert torch.isfinite(loss_h) and torch.isfinite(glp_h).all() and torch.isfinite(gv_h).all()
    torch.testing.assert_close(loss_h, loss_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(glp_h.float(), glp_r, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(gv_h.float(), gv_r, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(loss_h, loss_32, rtol=5e-2, atol=2e-2)
    adv, ret = compute_advantages(cfg, dh["scores"], dh["mask"], old_logp=dh["old"], ref_logp=dh["ref"],
                                  values=dh["values"])
    adv_r, ret_r = compute_advantages(cfg, d_round["scores"], d_round["mask"], old_logp=d_round["old"],
                                      ref_logp=d_round["ref"], values=d_round["values"])
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, adv_r)
    if ret is not None:
        torch.testing.assert_close(ret, ret_r)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_half_precision_kl(half, est):
    d = make(seed=4)
    out = kl_estimate(d["lp"].to(half), d["ref"].to(half), est)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kl_estimate(d["lp"].to(half).float(), d["ref"].to(half).float(), est))


# --------------------------------------------------------------------------------------------------------
# 5. CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_device_matches_cpu(name, device):
    cfg = PRESETS[name]
    B = 2 * cfg.group_size
    d_cpu = make(B=B, seed=5)
    d_dev = {k: v.to(device) for k, v in d_cpu.items()}
    loss_c, glp_c, gv_c, _ = run_preset(cfg, d_cpu)
    loss_d, glp_d, gv_d, met_d = run_preset(cfg, d_dev)
    assert loss_d.device.type == device.type and glp_d.device.type == device.type
    assert all(v.device.type == device.type for v in met_d.values())
    torch.testing.assert_close(loss_d.cpu(), loss_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(glp_d.cpu(), glp_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gv_d.cpu(), gv_c, rtol=1e-5, atol=1e-6)
    kw_c = dict(old_logp=d_cpu["old"], ref_logp=d_cpu["ref"], values=d_cpu["values"])
    kw_d = dict(old_logp=d_dev["old"], ref_logp=d_dev["ref"], values=d_dev["values"])
    adv_c, ret_c = compute_advantages(cfg, d_cpu["scores"], d_cpu["mask"], **kw_c)
    adv_d, ret_d = compute_advantages(cfg, d_dev["scores"], d_dev["mask"], **kw_d)
    assert adv_d.device.type == device.type
    torch.testing.assert_close(adv_d.cpu(), adv_c, rtol=1e-5, atol=1e-6)
    if ret_c is not None:
        torch.testing.assert_close(ret_d.cpu(), ret_c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_device_empty_and_extreme(ratio_level, device):
    d = {k: v.to(device) for k, v in _extreme_batch(4).items()}
    for mask in (d["mask"], torch.zeros_like(d["mask"])):
        lp = d["lp"].clone().requires_grad_(True)
        loss, _ = policy_loss(lp, d["old"], d["adv"], mask, ratio_level=ratio_level, ref_logp=d["ref"], kl_coef=0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
