"""Conformance with verl 0.9.1: verl's own functions run on the same random ragged float64 tensors as grpo_ref,
configured through :func:`grpo_ref.compat.from_verl` from the same verl settings (often verl's own config objects:
``ActorConfig``, ``PolicyLossConfig``, ``AlgoConfig``).

What runs: ``verl/trainer/ppo/core_algos.py`` (the advantage estimators, every mapped ``policy_loss.loss_mode``
through ``get_policy_loss_fn``, ``agg_loss``, ``kl_penalty``, ``compute_value_loss``, ``compute_entropy_loss``,
``compute_rewards``), ``verl/workers/utils/losses.py`` ``ppo_loss`` (the actor loss verl's trainer optimises:
policy term + entropy bonus + KL loss), and ``verl/workers/reward_manager/dapo.py`` (DAPO's overlong penalty).
Each test asserts equal loss and gradient to 1e-6 or asserts the documented difference.

verl's ``ray_trainer.apply_kl_penalty`` cannot be imported here (its module needs ``torchdata``, not in the
README's environment); the in-reward KL is built from verl's ``kl_penalty`` as that function does (two lines,
``token_level_scores - beta * kl_penalty(old_log_prob, ref_log_prob) * response_mask``).

Each test names the :data:`grpo_ref.compat.verl.FIELDS` rows it covers; the last test checks that every
"exact"/"mapped" row is covered (training-loop rows by verl's own YAML and dataclass defaults).
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# verl is installed (--no-deps) in the README's environment: no skip, an ImportError is a failure.
from verl import DataProto
from verl.trainer.config import AlgoConfig as VerlAlgoConfig
from verl.trainer.ppo import core_algos as ca
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.reward_manager.dapo import DAPORewardManager
from verl.workers.utils.losses import ppo_loss as verl_ppo_loss
from tensordict import TensorDict

import grpo_ref
from grpo_ref import LossInputs, compute_advantages, compute_loss
from grpo_ref.compat.verl import DEFAULTS, FIELDS, from_verl, to_verl
from grpo_ref.kl import kl_estimate

A = "actor_rollout_ref.actor."
ALG = "algorithm."
F64 = torch.float64
G = 4  # group size (rollout.n)

#: FIELDS rows covered by a test that runs verl's code (filled by @covers at import time)
COVERED: set = set()
#: rows covered by comparing with verl's own YAML / dataclass defaults (training-loop settings)
COVERED_BY_CONFIG: set = set()


def covers(*rows, config_only=False):
    known = {r.framework_field for r in FIELDS}
    for r in rows:
        assert r in known, r
    (COVERED_BY_CONFIG if config_only else COVERED).update(rows)
    return lambda f: f


# -- data -------------------------------------------------------------------------------------------------------------
def ragged(seed, B=12, T=7, empty=False, hole=False, spread=0.4):
    """Random right-padded batch: log-probs (logp requires grad), old/ref log-probs, [B, T] float64 mask with
    lengths 1..T (row 0 full), optionally one empty row and one row with an interior hole (a multi-turn
    observation span)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if empty:
        lengths[B - 1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    if hole:
        mask[0, 2:4] = 0.0
    logp = -(torch.rand(B, T, generator=g, dtype=F64) * 2.0 + 0.05)
    old = logp + spread * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + spread * torch.randn(B, T, generator=g, dtype=F64)
    adv_seq = torch.randn(B, generator=g, dtype=F64)
    adv_seq[1] = 0.0  # a zero advantage (dual clip's where(A < 0) boundary)
    scores = torch.randint(0, 3, (B,), generator=g).to(F64)
    return SimpleNamespace(logp=logp.requires_grad_(), old=old, ref=ref, mask=mask, adv=adv_seq[:, None] * mask,
                           scores=scores, g=g, B=B, T=T)


def last_token_rewards(scores, mask):
    """verl's token_level_scores: each score on the response's last valid token (reward managers'
    ``reward_tensor[i, valid_response_length - 1]``)."""
    out = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        on = mask[i].nonzero()
        if len(on):
            out[i, on[-1, 0]] = scores[i]
    return out


def uid(B, group=G):
    return np.array([f"prompt-{i // group}" for i in range(B)], dtype=object)


def actor(loss_mode="vanilla", **fields) -> ActorConfig:
    """verl's own actor config dataclass (the one the trainer builds from the YAML)."""
    return ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode), **fields)


def translate(actor_cfg, algorithm=None, **rest):
    """from_verl on a config holding verl's ActorConfig object itself (attribute access)."""
    config = {"algorithm": {"adv_estimator": "grpo", **(algorithm or {})},
              "actor_rollout_ref": {"actor": actor_cfg, "rollout": {"n": G}}, **rest}
    return from_verl(config)


def global_info(actor_cfg, mask):
    """What verl's ppo_loss puts in config.global_batch_info: the whole mini-batch's counts (one rank)."""
    actor_cfg.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0],
                                       loss_scale_factor=actor_cfg.loss_scale_factor)
    return actor_cfg


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def assert_close(a, b, rtol=1e-6, atol=1e-9, what=""):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: verl {a} vs grpo_ref {b}, max diff {(a - b).abs().max()}"


def ours(cfg, d, **extra):
    loss, _ = compute_loss(LossInputs(logp=d.logp, old_logp=d.old, advantages=d.adv, mask=d.mask, **extra), cfg)
    return loss


# -- advantages -------------------------------------------------------------------------------------------------------
@covers(ALG + "adv_estimator=grpo", ALG + "adv_estimator=grpo_vectorized", ALG + "norm_adv_by_std_in_grpo",
        "(fixed) grpo epsilon", "actor_rollout_ref.rollout.n")
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantages(norm):
    d = ragged(1)
    d.scores[4:8] = 1.0  # a flat group: advantage 0 both ways
    d.scores[8:12] = torch.tensor([0.0, 1e-4, 0.0, 0.0], dtype=F64)  # tiny std: eps 1e-6 matters
    rewards = last_token_rewards(d.scores, d.mask)
    for est in ("grpo", "grpo_vectorized"):
        cfg = from_verl({"algorithm": {"adv_estimator": est, "norm_adv_by_std_in_grpo": norm},
                         "actor_rollout_ref": {"rollout": {"n": G}}}).algo
        assert cfg.adv_estimator == "grpo" and cfg.adv_eps == 1e-6
        fn = ca.get_adv_estimator_fn(est)
        verl_adv, _ = fn(token_level_rewards=rewards.clone(), response_mask=d.mask, index=uid(d.B),
                         norm_adv_by_std_in_grpo=norm)
        adv, _ = compute_advantages(cfg, d.scores, d.mask)
        assert_close(verl_adv, adv, what=est)


@covers(ALG + "adv_estimator=rloo", ALG + "adv_estimator=rloo_vectorized")
def test_rloo_advantages():
    d = ragged(2)
    rewards = last_token_rewards(d.scores, d.mask)
    for est in ("rloo", "rloo_vectorized"):
        cfg = from_verl({"algorithm.adv_estimator": est, "actor_rollout_ref.rollout.n": G}).algo
        verl_adv, _ = ca.get_adv_estimator_fn(est)(token_level_rewards=rewards.clone(), response_mask=d.mask,
                                                   index=uid(d.B), config=VerlAlgoConfig())
        adv, _ = compute_advantages(cfg, d.scores, d.mask)
        assert_close(verl_adv, adv, what=est)


def in_reward(d, name, beta):
    """ray_trainer.apply_kl_penalty's token rewards, built from verl's kl_penalty."""
    kld = ca.kl_penalty(d.old, d.ref, kl_penalty=name) * d.mask
    return last_token_rewards(d.scores, d.mask) - beta * kld


@covers(ALG + "adv_estimator=reinforce_plus_plus", ALG + "gamma", ALG + "use_kl_in_reward", ALG + "kl_penalty",
        ALG + "kl_ctrl.kl_coef", A + "kl_loss_type=kl", A + "kl_loss_type=k1")
@pytest.mark.parametrize("kl_name", ["kl", "k1"])
def test_reinforce_pp_with_kl_in_reward(kl_name):
    d = ragged(3, hole=True)
    settings = {"algorithm": {"adv_estimator": "reinforce_plus_plus", "gamma": 0.9, "use_kl_in_reward": True,
                              "kl_penalty": kl_name, "kl_ctrl": {"type": "fixed", "kl_coef": 0.05}}}
    cfg = from_verl(settings).algo
    assert (cfg.kl_placement, cfg.kl_estimator, cfg.kl_coef) == ("reward", "k1", 0.05)
    rewards = in_reward(d, kl_name, 0.05)
    if kl_name == "kl":  # verl's compute_rewards is the same k1 shaping
        assert_close(ca.compute_rewards(last_token_rewards(d.scores, d.mask), d.old, d.ref, 0.05) * d.mask,
                     rewards * d.mask, what="compute_rewards")
    verl_adv, verl_ret = ca.compute_reinforce_plus_plus_outcome_advantage(
        token_level_rewards=rewards, response_mask=d.mask, config=VerlAlgoConfig(gamma=0.9))
    adv, _ = compute_advantages(cfg, d.scores, d.mask, old_logp=d.old, ref_logp=d.ref)
    assert_close(verl_adv * d.mask, adv, what="reinforce++")


@covers(ALG + "adv_estimator=reinforce_plus_plus_baseline")
def test_reinforce_pp_baseline():
    d = ragged(4)
    cfg = from_verl({"algorithm.adv_estimator": "reinforce_plus_plus_baseline", "actor_rollout_ref.rollout.n": G}).algo
    verl_adv, _ = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(
        token_level_rewards=last_token_rewards(d.scores, d.mask), response_mask=d.mask, index=uid(d.B))
    adv, _ = compute_advantages(cfg, d.scores, d.mask)
    assert_close(verl_adv, adv, what="reinforce++ baseline")


@covers(ALG + "adv_estimator=grpo", ALG + "use_kl_in_reward", ALG + "kl_penalty", A + "kl_loss_type=low_var_kl",
        A + "kl_loss_type=k3", A + "kl_loss_type=abs", A + "kl_loss_type=mse", A + "kl_loss_type=k2")
@pytest.mark.parametrize("kl_name", ["low_var_kl", "k3", "abs", "mse", "k2"])
def test_grpo_with_kl_in_reward(kl_name):
    """verl's grpo sums the token rewards: score - beta * sum_t kl_t, as grpo_ref's sequence estimators."""
    d = ragged(5, spread=1.5)
    cfg = from_verl({"algorithm": {"adv_estimator": "grpo", "use_kl_in_reward": True, "kl_penalty": kl_name,
                                   "kl_ctrl": {"kl_coef": 0.2}}, "actor_rollout_ref": {"rollout": {"n": G}}}).algo
    verl_adv, _ = ca.compute_grpo_outcome_advantage(in_reward(d, kl_name, 0.2), d.mask, uid(d.B))
    adv, _ = compute_advantages(cfg, d.scores, d.mask, old_logp=d.old, ref_logp=d.ref)
    assert_close(verl_adv, adv, what=kl_name)


@covers(ALG + "adv_estimator=gae", ALG + "gamma", ALG + "lam", ALG + "use_kl_in_reward", ALG + "kl_ctrl.kl_coef")
def test_gae_advantages_and_returns():
    d = ragged(6, hole=True)
    values = torch.randn(d.B, d.T, generator=d.g, dtype=F64)
    cfg = from_verl({"algorithm": {"adv_estimator": "gae", "gamma": 0.95, "lam": 0.9, "use_kl_in_reward": True,
                                   "kl_ctrl": {"kl_coef": 0.05}}}).algo
    assert cfg.loss_fn == "ppo" and cfg.whiten_advantages and cfg.dual_clip == 3.0
    verl_adv, verl_ret = ca.compute_gae_advantage_return(in_reward(d, "kl", 0.05), values, d.mask, 0.95, 0.9)
    adv, ret = compute_advantages(cfg, d.scores, d.mask, old_logp=d.old, ref_logp=d.ref, values=values)
    assert_close(verl_adv * d.mask, adv, what="gae advantages (whitened)")
    assert_close(verl_ret * d.mask, ret, what="gae returns")


# -- policy losses ----------------------------------------------------------------------------------------------------
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@covers(A + "policy_loss.loss_mode=vanilla", A + "clip_ratio_low", A + "clip_ratio_high", A + "clip_ratio_c",
        A + "loss_scale_factor", A + "global_batch_info (runtime: dp_size, batch_num_tokens, global_batch_size)",
        *[f"{A}loss_agg_mode={m}" for m in AGG_MODES])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_vanilla_dual_clip(mode):
    """verl's vanilla loss dual-clips by default (clip_ratio_c = 3.0); the ratios reach past 3 here."""
    d = ragged(7, empty=True, spread=1.2)
    scale = 9 if mode == "seq-mean-token-sum-norm" else None
    a = global_info(actor(clip_ratio_low=0.15, clip_ratio_high=0.28, loss_agg_mode=mode, loss_scale_factor=scale), d.mask)
    cfg = translate(a).algo
    assert (cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.loss_agg_mode) == (0.15, 0.28, 3.0, mode)
    fn = ca.get_policy_loss_fn("vanilla")
    verl_loss, metrics = fn(d.old, d.logp, d.adv, d.mask, loss_agg_mode=mode, config=a)
    assert metrics["actor/pg_clipfrac_lower"] > 0  # the dual clip is active somewhere
    loss = ours(cfg, d)
    assert_close(verl_loss, loss, what=f"vanilla {mode}")
    assert_close(grad(verl_loss, d.logp), grad(loss, d.logp), what="gradient")


@covers(A + "clip_ratio_c", A + "clip_ratio")
def test_dual_clip_off_is_clip_ratio_c_inf():
    """grpo_ref's dual_clip=None is written clip_ratio_c=inf; verl then equals the plain clipped loss (no NaN
    from -0 * inf at zero advantages, which torch.where never selects). clip_ratio is a fallback for null low/high."""
    d = ragged(8, spread=1.2)
    cfg = grpo_ref.get_preset("dapo").replace(filter_groups=False)
    flat = to_verl(cfg)
    assert flat[A + "clip_ratio_c"] == math.inf
    a = global_info(actor(clip_ratio=0.3, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=math.inf,
                          loss_agg_mode="token-mean"), d.mask)
    back = translate(a).algo
    assert (back.eps_low, back.eps_high, back.dual_clip) == (0.3, 0.3, None)
    verl_loss, _ = ca.get_policy_loss_fn("vanilla")(d.old, d.logp, d.adv, d.mask, loss_agg_mode="token-mean", config=a)
    loss = ours(back, d)
    assert torch.isfinite(verl_loss)
    assert_close(verl_loss, loss, what="no dual clip")
    g = grad(verl_loss, d.logp)
    assert torch.isfinite(g).all()
    assert_close(g, grad(loss, d.logp), what="gradient")


@covers(A + "policy_loss.loss_mode=gspo")
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_gspo(mode):
    d = ragged(9, empty=True, spread=0.02)
    a = global_info(actor("gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode=mode), d.mask)
    cfg = translate(a).algo
    assert cfg.ratio_level == "sequence" and cfg.dual_clip is None
    verl_loss, _ = ca.get_policy_loss_fn("gspo")(d.old, d.logp, d.adv, d.mask, loss_agg_mode=mode, config=a)
    loss = ours(cfg, d)
    assert_close(verl_loss, loss, what="gspo")
    assert_close(grad(verl_loss, d.logp), grad(loss, d.logp), what="gradient")


@covers(A + "policy_loss.loss_mode=gspo")
def test_gspo_documented_difference_sequence_clamp():
    """verl clamps the sequence log-ratio at +10, grpo_ref at +-20: equal at 9, different at 15 (negative A)."""
    for shift, verl_value, our_value in ((9.0, math.exp(9.0), math.exp(9.0)), (15.0, math.exp(10.0), math.exp(15.0))):
        old = torch.full((1, 3), -3.0, dtype=F64)
        logp = (old + shift).requires_grad_()
        adv = torch.full((1, 3), -1.0, dtype=F64)
        mask = torch.ones(1, 3, dtype=F64)
        a = actor("gspo", loss_agg_mode="seq-mean-token-mean")
        verl_loss, _ = ca.get_policy_loss_fn("gspo")(old, logp, adv, mask, loss_agg_mode="seq-mean-token-mean", config=a)
        cfg = translate(a).algo
        loss, _ = compute_loss(LossInputs(logp=logp, old_logp=old, advantages=adv, mask=mask), cfg)
        # (rel_tol 1e-7: verl's seq-mean-token-mean divides by L + 1e-8)
        assert math.isclose(float(verl_loss.detach()), verl_value, rel_tol=1e-7)
        assert math.isclose(float(loss.detach()), our_value, rel_tol=1e-7)


@covers(A + "policy_loss.loss_mode=sapo", A + "tau_pos", A + "tau_neg")
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_sapo_always_seq_mean_token_mean(mode):
    d = ragged(10, empty=True, spread=0.8)
    a = global_info(actor("sapo", tau_pos=1.3, tau_neg=2.1, loss_agg_mode=mode), d.mask)
    t = translate(a)
    cfg = t.algo
    assert (cfg.pg_objective, cfg.sapo_tau_pos, cfg.sapo_tau_neg, cfg.loss_agg_mode) == ("sapo", 1.3, 2.1,
                                                                                          "seq-mean-token-mean")
    assert (mode != "seq-mean-token-mean") == any("sapo" in n for n in t.notes)
    verl_loss, _ = ca.get_policy_loss_fn("sapo")(d.old, d.logp, d.adv, d.mask, loss_agg_mode=mode, config=a)
    loss = ours(cfg, d)
    assert_close(verl_loss, loss, what="sapo")
    assert_close(grad(verl_loss, d.logp), grad(loss, d.logp), what="gradient")


@covers(A + "policy_loss.loss_mode=cispo", A + "clip_ratio_low", A + "clip_ratio_high")
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_cispo_clamps_both_sides(mode):
    d = ragged(11, empty=True, spread=0.8)
    a = global_info(actor("cispo", clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=mode), d.mask)
    cfg = translate(a).algo
    assert (cfg.pg_objective, cfg.eps_low, cfg.eps_high, cfg.dual_clip) == ("cispo", 0.2, 0.28, None)
    ratio = torch.exp(d.logp.detach() - d.old)[d.mask > 0]
    assert (ratio < 0.8).any() and (ratio > 1.28).any()  # both clamps active
    verl_loss, _ = ca.get_policy_loss_fn("cispo")(d.old, d.logp, d.adv, d.mask, loss_agg_mode=mode, config=a)
    loss = ours(cfg, d)
    assert_close(verl_loss, loss, what="cispo")
    assert_close(grad(verl_loss, d.logp), grad(loss, d.logp), what="gradient")


# -- aggregation ------------------------------------------------------------------------------------------------------
@covers(*[f"{A}loss_agg_mode={m}" for m in AGG_MODES], A + "loss_scale_factor",
        A + "global_batch_info (runtime: dp_size, batch_num_tokens, global_batch_size)")
@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss(mode):
    d = ragged(12, empty=True)
    x = torch.randn(d.B, d.T, generator=d.g, dtype=F64).requires_grad_()
    B, N = d.B, float(d.mask.sum())
    nonempty = int((d.mask.sum(-1) > 0).sum())
    for scale in (None, 11):
        ref = grpo_ref.aggregate(x, d.mask, mode, norm_length=scale)
        # as verl's trainer calls it: the mini-batch's token and sequence counts -> equal
        v = ca.agg_loss(x, d.mask, mode, dp_size=1, batch_num_tokens=N, global_batch_size=B, loss_scale_factor=scale)
        assert_close(v, ref, what=f"{mode} with global batch info")
        assert_close(grad(v, x), grad(ref, x), what="gradient")
        # bare agg_loss: the seq-mean modes drop the empty row from B (documented difference)
        v = ca.agg_loss(x, d.mask, mode, loss_scale_factor=scale)
        factor = B / nonempty if mode.startswith("seq-mean") else 1.0
        assert_close(v, ref * factor, what=f"{mode} without global batch info")
        if mode.startswith("seq-mean"):
            assert not torch.allclose(v, ref)
    # seq-mean-token-mean divides by L + 1e-8, grpo_ref by max(L, 1): equal to 1e-8 relative, not bitwise
    # global token normaliser across 2 data-parallel ranks: verl sum / N_global * dp = grpo_ref num_tokens = N_global / dp
    if mode == "token-mean":
        n_global = 3.0 * N
        v = ca.agg_loss(x, d.mask, mode, dp_size=2, batch_num_tokens=n_global, global_batch_size=2 * B)
        assert_close(v, grpo_ref.aggregate(x, d.mask, mode, num_tokens=n_global / 2), what="global token norm")
        cfg = grpo_ref.AlgoConfig(loss_agg_mode="token-mean", global_token_norm=True, kl_coef=0.0)
        a = actor(loss_agg_mode="token-mean")
        a.global_batch_info.update(dp_size=2, batch_num_tokens=n_global, global_batch_size=2 * B)
        dd = ragged(12, empty=True)
        verl_loss, _ = ca.get_policy_loss_fn("vanilla")(dd.old, dd.logp, dd.adv, dd.mask, loss_agg_mode=mode,
                                                        config=a)
        loss = ours(cfg.replace(dual_clip=3.0), dd, num_tokens=n_global / 2)
        assert_close(verl_loss, loss, what="vanilla, global token norm")


# -- KL ---------------------------------------------------------------------------------------------------------------
KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "k3", "low_var_kl", "kl+", "k1+", "abs+", "mse+", "k2+", "k3+", "low_var_kl+"]


@covers(*[f"{A}kl_loss_type={n}" for n in KL_NAMES], A + "use_kl_loss", A + "kl_loss_coef")
@pytest.mark.parametrize("name", KL_NAMES)
def test_kl_penalty_value_and_gradient(name):
    """Every verl kl name against grpo_ref's estimator, values and gradients, on log-ratios from -13 to +4 so
    that the low_var_kl value clamp at 10 is active on both sides."""
    g = torch.Generator().manual_seed(13)
    ref = -(torch.rand(64, generator=g, dtype=F64) * 3)
    d = torch.linspace(-13.0, 4.0, 64, dtype=F64)  # ref - lp
    lp = (ref - d).requires_grad_()
    est = from_verl({A + "use_kl_loss": True, A + "kl_loss_type": name, A + "kl_loss_coef": 0.1,
                     ALG + "adv_estimator": "grpo", "actor_rollout_ref.rollout.n": G}).algo.kl_estimator
    v = ca.kl_penalty(lp, ref, kl_penalty=name)
    ours_ = kl_estimate(lp, ref, est)
    assert_close(v, ours_, what=f"{name} value")
    w = torch.randn(64, generator=g, dtype=F64)
    assert_close(grad((v * w).sum(), lp), grad((ours_ * w).sum(), lp), what=f"{name} gradient")


@covers(A + "kl_loss_type=k3", A + "kl_loss_type=low_var_kl")
def test_k3_documented_difference_value_clamp():
    """verl's k3 is low_var_kl (value clamped at 10): grpo_ref's plain k3 differs exactly where k3 > 10."""
    ref = torch.zeros(4, dtype=F64)
    lp = torch.tensor([0.5, -1.0, -3.0, 12.0], dtype=F64)  # ref - lp = -0.5, 1, 3, -12
    v = ca.kl_penalty(lp, ref, kl_penalty="k3")
    plain = kl_estimate(lp, ref, "k3")
    assert_close(v, kl_estimate(lp, ref, "low_var_kl"), what="k3 = low_var_kl")
    big = plain > 10
    assert big.tolist() == [False, False, True, True]
    assert torch.equal(v[big], torch.full((2,), 10.0, dtype=F64))
    assert_close(v[~big], plain[~big], what="equal below 10")
    with pytest.raises(NotImplementedError):
        ca.kl_penalty(lp, ref, kl_penalty="full")
    with pytest.raises(grpo_ref.compat.UnsupportedSetting, match="kl_loss_type"):
        from_verl({A + "use_kl_loss": True, A + "kl_loss_type": "full", ALG + "adv_estimator": "grpo",
                   "actor_rollout_ref.rollout.n": G})


# -- the whole actor loss: verl/workers/utils/losses.py ppo_loss ------------------------------------------------------
def verl_actor_loss(a, d, entropy):
    """verl's ppo_loss on our tensors: the model output is the unpadded token stream (prompt of P tokens, then the
    response), from which no_padding_2_padding cuts the response log-probs / entropies back out."""
    B, T, P = d.B, d.T, 2
    lengths = d.mask.sum(-1).long()

    def stream(x):
        return torch.cat([torch.cat([torch.zeros(P - 1, dtype=F64), x[i, : int(lengths[i])], torch.zeros(1, dtype=F64)])
                          for i in range(B)])

    td = TensorDict({"prompts": torch.zeros(B, P, dtype=torch.long), "responses": torch.zeros(B, T, dtype=torch.long),
                     "attention_mask": torch.cat([torch.ones(B, P), d.mask.float()], 1).long(),
                     "response_mask": d.mask, "old_log_probs": d.old, "advantages": d.adv, "ref_log_prob": d.ref},
                    batch_size=[B])
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=int(d.mask.sum()), global_batch_size=B)
    out = {"log_probs": stream(d.logp)}
    if entropy is not None:
        out["entropy"] = stream(entropy)
    loss, _ = verl_ppo_loss(a, out, td)
    return loss


@covers(A + "use_kl_loss", A + "kl_loss_coef", A + "entropy_coeff", A + "loss_scale_factor",
        A + "policy_loss.loss_mode=vanilla", A + "policy_loss.loss_mode=gspo", A + "policy_loss.loss_mode=cispo",
        A + "policy_loss.loss_mode=sapo", A + "kl_loss_type=low_var_kl", A + "kl_loss_type=k3+", A + "kl_loss_type=abs",
        A + "kl_loss_type=k1+", A + "global_batch_info (runtime: dp_size, batch_num_tokens, global_batch_size)")
@pytest.mark.parametrize("loss_mode,mode,kl,ent", [
    ("vanilla", "seq-mean-token-mean", "low_var_kl", 0.01),
    ("vanilla", "token-mean", "k3+", 0.02),
    ("gspo", "seq-mean-token-sum-norm", "abs", 0.01),
    ("cispo", "token-sum", "k1+", 0.0),
    ("sapo", "token-mean", None, 0.05),  # the entropy bonus is aggregated token-mean, the policy term not
])
def test_full_actor_loss(loss_mode, mode, kl, ent):
    d = ragged(14, empty=True, spread=0.6 if loss_mode != "gspo" else 0.02)
    entropy = torch.rand(d.B, d.T, generator=d.g, dtype=F64).requires_grad_() if ent else None
    fields = dict(loss_agg_mode=mode, entropy_coeff=ent, loss_scale_factor=9 if mode.endswith("norm") else None)
    if kl:
        fields.update(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type=kl)
    a = actor(loss_mode, **fields)
    cfg = translate(a).algo
    if loss_mode == "sapo":
        assert (cfg.loss_agg_mode, cfg.ent_agg_mode) == ("seq-mean-token-mean", "token-mean")
    verl_loss = verl_actor_loss(a, d, entropy)
    loss = ours(cfg, d, ref_logp=d.ref, entropy=entropy)
    assert_close(verl_loss, loss, what=f"{loss_mode} {mode} kl={kl} ent={ent}")
    assert_close(grad(verl_loss, d.logp), grad(loss, d.logp), what="gradient wrt log-probs")
    if entropy is not None:
        assert_close(grad(verl_loss, entropy), grad(loss, entropy), what="gradient wrt entropy")


# -- critic and entropy -----------------------------------------------------------------------------------------------
@covers("critic.cliprange_value", "critic.loss_agg_mode")
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_value_loss(mode):
    d = ragged(15, empty=True)
    old_v = torch.randn(d.B, d.T, generator=d.g, dtype=F64)
    v = (old_v + torch.randn(d.B, d.T, generator=d.g, dtype=F64)).requires_grad_()
    ret = torch.randn(d.B, d.T, generator=d.g, dtype=F64)
    cfg = from_verl({"algorithm": {"adv_estimator": "gae"}, "critic": {"cliprange_value": 0.3, "loss_agg_mode": mode},
                     "actor_rollout_ref": {"actor": {"loss_agg_mode": mode}}}).algo
    assert cfg.value_clip == 0.3 and cfg.loss_agg_mode == mode
    verl_vf, frac = ca.compute_value_loss(v, ret, old_v, d.mask, cfg.value_clip, loss_agg_mode=mode,
                                          batch_num_tokens=int(d.mask.sum()), global_batch_size=d.B)
    assert 0 < float(frac) < 1
    vf, _ = grpo_ref.value_loss(v, old_v, ret, d.mask, cfg.value_clip, cfg.loss_agg_mode)
    assert_close(verl_vf, vf, what="value loss")
    assert_close(grad(verl_vf, v), grad(vf, v), what="gradient")


@covers(A + "entropy_coeff")
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_entropy_loss(mode):
    g = torch.Generator().manual_seed(16)
    logits = (3 * torch.randn(6, 5, 11, generator=g, dtype=F64)).requires_grad_()
    mask = (torch.arange(5)[None] < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]).to(F64)
    v = ca.compute_entropy_loss(logits, mask, loss_agg_mode=mode)
    ours_ = grpo_ref.entropy_bonus(grpo_ref.token_entropy(logits), mask, mode)
    assert_close(v, ours_, what="entropy")
    assert_close(grad(v, logits), grad(ours_, logits), what="gradient")


# -- DAPO overlong penalty --------------------------------------------------------------------------------------------
class _Tokenizer:
    eos_token = "</s>"

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@covers("reward_model.overlong_buffer.enable", "reward_model.overlong_buffer.len", "data.max_response_length",
        ALG + "adv_estimator=grpo")
def test_dapo_overlong_penalty():
    """verl's DAPORewardManager scores a batch of response lengths 1..T; its rewards (penalty included) go
    through verl's grpo and must equal grpo_ref's compute_advantages with the translated overlong_buffer."""
    B, P, T, cache = 8, 3, 10, 4
    lengths = torch.tensor([1, 5, 6, 7, 8, 9, 10, 10])
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    data = DataProto.from_dict(
        tensors={"prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.arange(B * T).reshape(B, T),
                 "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)},
        non_tensors={"reward_model": np.array([{"ground_truth": str(float(s))} for s in scores], dtype=object),
                     "data_source": np.array(["toy"] * B, dtype=object)})
    buffer = SimpleNamespace(enable=True, len=cache, penalty_factor=1.0, log=False)
    manager = DAPORewardManager(tokenizer=_Tokenizer(), num_examine=0, max_resp_len=T, overlong_buffer_cfg=buffer,
                                compute_score=lambda data_source, solution_str, ground_truth, extra_info: float(ground_truth))
    rewards = manager(data)
    cfg = from_verl({"algorithm": {"adv_estimator": "grpo"}, "actor_rollout_ref": {"rollout": {"n": G}},
                     "data": {"max_response_length": T},
                     "reward_model": {"overlong_buffer": {"enable": True, "len": cache, "penalty_factor": 1.0}}}).algo
    assert (cfg.overlong_buffer, cfg.max_response_length) == (cache, T)
    penalty = grpo_ref.overlong_penalty(lengths, T, cache)
    assert_close(rewards.sum(-1), scores + penalty, rtol=1e-6, atol=1e-6, what="DAPO rewards")
    assert (penalty < 0).sum() == 5  # lengths 7..10 are inside the buffer
    verl_adv, _ = ca.compute_grpo_outcome_advantage(rewards.double(), mask.double(), uid(B))
    adv, _ = compute_advantages(cfg, scores.double(), mask.double())
    assert_close(verl_adv, adv, rtol=1e-5, atol=1e-6, what="advantages")


# -- grpo_ref's loss registered in verl (grpo_ref.integrations.verl) -----------------------------------------------------
@pytest.fixture
def register():
    from grpo_ref.integrations.verl import register_policy_loss

    names = []

    def do(algo, name="grpo_ref"):
        names.append(name)
        return register_policy_loss(algo, name)

    yield do
    for name in names:
        ca.POLICY_LOSS_REGISTRY.pop(name, None)


@covers(A + "policy_loss.loss_mode=vanilla", A + "policy_loss.loss_mode=gspo", A + "policy_loss.loss_mode=sapo",
        A + "policy_loss.loss_mode=cispo")
@pytest.mark.parametrize("loss_mode,mode", [("vanilla", "seq-mean-token-mean"), ("gspo", "token-mean"),
                                            ("cispo", "token-sum"), ("sapo", "seq-mean-token-mean")])
def test_registered_grpo_ref_loss_equals_verls_own(register, loss_mode, mode):
    """verl's ppo_loss with loss_mode='grpo_ref' (KL loss and entropy still verl's) equals verl's own loss_mode."""
    d = ragged(17, empty=True, spread=0.6 if loss_mode != "gspo" else 0.02)
    entropy = torch.rand(d.B, d.T, generator=d.g, dtype=F64)
    fields = dict(loss_agg_mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.28, entropy_coeff=0.01,
                  use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl", tau_pos=1.2, tau_neg=1.6)
    own = actor(loss_mode, **fields)
    algo = translate(own).algo.replace(kl_coef=0.0, ent_coef=0.0)
    fn = register(algo)
    assert ca.get_policy_loss_fn("grpo_ref") is fn
    theirs = verl_actor_loss(own, d, entropy)
    mine = verl_actor_loss(actor("grpo_ref", **fields), d, entropy)
    assert_close(theirs, mine, what=f"grpo_ref vs verl {loss_mode}")
    assert_close(grad(theirs, d.logp), grad(mine, d.logp), what="gradient")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "token-sum", "seq-mean-token-sum-norm"])
def test_registered_loss_micro_batches_add_up(register, mode):
    """With verl's global_batch_info (the mini-batch's counts over 2 data-parallel ranks holding the same data),
    the registered loss of a rank's micro-batches adds up as verl's own vanilla loss does, and to grpo_ref's loss
    of the global mini-batch (DDP averages the ranks: token-sum is scaled by dp_size, the means are not)."""
    d = ragged(18, empty=True, spread=1.0)
    algo = grpo_ref.AlgoConfig(loss_agg_mode=mode, kl_coef=0.0, dual_clip=3.0, eps_high=0.28,
                               norm_length=9 if mode.endswith("norm") else None)
    fn = register(algo, "grpo_ref_micro")
    a = actor("grpo_ref_micro", loss_agg_mode=mode, loss_scale_factor=algo.norm_length, clip_ratio_high=0.28)
    a.global_batch_info.update(dp_size=2, batch_num_tokens=2 * float(d.mask.sum()), global_batch_size=2 * d.B,
                               loss_scale_factor=algo.norm_length)
    parts = [fn(d.old[s], d.logp[s], d.adv[s], d.mask[s].bool(), loss_agg_mode=mode, config=a)[0]
             for s in (slice(0, 5), slice(5, d.B))]
    verl_parts = [ca.get_policy_loss_fn("vanilla")(d.old[s], d.logp[s], d.adv[s], d.mask[s].bool(),
                                                   loss_agg_mode=mode, config=a)[0] for s in (slice(0, 5), slice(5, d.B))]
    assert_close(sum(verl_parts), sum(parts), what=f"verl's vanilla, micro-batches {mode}")
    whole = ours(algo, d) * (2 if mode == "token-sum" else 1)
    assert_close(sum(parts), whole, what=f"micro-batches {mode}")
    assert_close(grad(sum(parts), d.logp), grad(whole, d.logp), what="gradient")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(d.old, d.logp, d.adv, d.mask, loss_agg_mode="token-sum" if mode != "token-sum" else "token-mean", config=a)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        fn(d.old, d.logp, d.adv, d.mask, loss_agg_mode=mode, config=a, rollout_is_weights=torch.ones_like(d.mask))
    with pytest.raises(ValueError, match="kl_coef"):
        register(grpo_ref.AlgoConfig(kl_coef=0.1), "grpo_ref_refused")


# -- defaults, and the coverage of FIELDS -----------------------------------------------------------------------------
TRAIN_ROWS = ["actor_rollout_ref.actor.ppo_epochs", "actor_rollout_ref.actor.ppo_mini_batch_size",
              "actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.actor.optim.clip_grad",
              "actor_rollout_ref.rollout.temperature", "actor_rollout_ref.rollout.top_p",
              "actor_rollout_ref.rollout.top_k", "data.train_batch_size", "critic.optim.lr",
              ALG + "filter_groups.enable"]


@covers(*TRAIN_ROWS, config_only=True)
def test_defaults_are_verls():
    """DEFAULTS against verl's generated trainer YAML (read with OmegaConf, as Hydra does) and its dataclasses, and
    from_verl of the whole YAML (a DictConfig) gives verl's defaults in grpo_ref terms."""
    from omegaconf import OmegaConf
    import verl.trainer.config as tc

    path = os.path.join(os.path.dirname(tc.__file__), "_generated_ppo_trainer.yaml")
    yaml = OmegaConf.load(path)
    for key, value in DEFAULTS.items():
        got = OmegaConf.select(yaml, key)
        assert got == value or (value is None and got is None), (key, got, value)
    assert ActorConfig.__dataclass_fields__["clip_ratio_c"].default == DEFAULTS[A + "clip_ratio_c"]
    assert VerlAlgoConfig().lam == DEFAULTS[ALG + "lam"] and VerlAlgoConfig().kl_penalty == DEFAULTS[ALG + "kl_penalty"]
    t = from_verl(yaml)
    assert t.algo.adv_estimator == "gae" and t.algo.dual_clip == 3.0 and t.algo.loss_agg_mode == "token-mean"
    assert t.algo.value_clip == 0.5 and t.algo.lam == 1.0 and t.algo.kl_coef == 0.0
    assert t.train["ppo_epochs"] == 1 and t.train["top_k"] == 0 and t.train["temperature"] == 1.0
    assert t.train["max_new_tokens"] == yaml.data.max_response_length
    assert t.train["lr"] == yaml.actor_rollout_ref.actor.optim.lr
    assert t.train["max_grad_norm"] == yaml.actor_rollout_ref.actor.optim.clip_grad
    assert t.train["minibatches"] == yaml.data.train_batch_size // yaml.actor_rollout_ref.actor.ppo_mini_batch_size
    assert t.train["critic_lr"] == yaml.critic.optim.lr
    dapo = from_verl(OmegaConf.merge(yaml, OmegaConf.from_dotlist([
        "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4", "algorithm.filter_groups.enable=true",
        "algorithm.filter_groups.max_num_gen_batches=5", "actor_rollout_ref.rollout.top_k=20"])))
    assert dapo.algo.filter_groups and dapo.train["filter_rounds"] == 5 and dapo.train["top_k"] == 20
    # every estimator / loss mode verl registers is mapped or refused by a FIELDS row
    rows = {r.framework_field for r in FIELDS}
    for est in ca.AdvantageEstimator:
        assert f"{ALG}adv_estimator={est.value}" in rows, est
    for mode in ca.POLICY_LOSS_REGISTRY:
        assert f"{A}policy_loss.loss_mode={mode}" in rows, mode


def test_every_exact_or_mapped_row_is_covered():
    rows = [r.framework_field for r in FIELDS if r.status in ("exact", "mapped")]
    missing = [r for r in rows if r not in COVERED | COVERED_BY_CONFIG]
    assert not missing, f"FIELDS rows without a test running verl's code: {missing}"
