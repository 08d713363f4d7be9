"""grpo_ref.compat.verl without verl: round trips, the three input forms, refusals that name their field.

(That the translated configs give verl's own losses is tests/test_conformance_verl.py, which runs verl.)
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

import grpo_ref
from grpo_ref import PRESETS, AlgoConfig, TrainConfig
from grpo_ref.compat import UnsupportedSetting
from grpo_ref.compat.verl import DEFAULTS, FIELDS, from_verl, to_verl

A = "actor_rollout_ref.actor."
ALG = "algorithm."
R = "actor_rollout_ref.rollout."


def nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def attrs(tree):
    return SimpleNamespace(**{k: attrs(v) for k, v in tree.items()}) if isinstance(tree, dict) else tree


def back(cfg, train=None):
    t = from_verl(to_verl(cfg, train))
    return t.algo.replace(name=cfg.name), t


# the one lossy step: verl has no k3 without its value clamp at 10
LOSSY = {"grpo": {"kl_estimator": "low_var_kl"}}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    p = PRESETS[name]
    algo, _ = back(p)
    assert algo == p.replace(**LOSSY.get(name, {}))


@pytest.mark.parametrize("changes", [
    dict(pg_objective="sapo", sapo_tau_pos=1.5, sapo_tau_neg=2.0, eps_low=0.1, eps_high=0.3),
    dict(pg_objective="cispo", eps_low=1.0, eps_high=4.0, loss_agg_mode="token-mean"),
    dict(pg_objective="sapo", ent_coef=0.01, ent_agg_mode="token-mean", kl_coef=0.0, kl_estimator="k3"),
    dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, kl_estimator="low_var_kl+", kl_coef=0.1),
    dict(dual_clip=2.5, loss_agg_mode="token-sum", kl_estimator="abs", kl_coef=0.2),
    dict(loss_agg_mode="seq-mean-token-sum-norm", norm_length=512, kl_estimator="k1+", ent_coef=0.003),
    dict(adv_estimator="reinforce_pp_baseline", kl_placement="reward", kl_estimator="k2", kl_coef=0.01, gamma=0.99),
    dict(overlong_buffer=64, max_response_length=256, filter_groups=True),
    dict(adv_scale="none", adv_estimator="grpo"),
])
def test_other_configs_round_trip(changes):
    cfg = AlgoConfig(**{"kl_estimator": "low_var_kl", **changes})  # AlgoConfig's default k3 (beta 0.04) is lossy
    algo, _ = back(cfg)
    assert algo == cfg


def test_ppo_without_value_clip_round_trips():
    cfg = PRESETS["ppo"].replace(value_clip=None, dual_clip=None, lam=0.9)
    flat = to_verl(cfg)
    assert flat["critic.cliprange_value"] == math.inf and flat[A + "clip_ratio_c"] == math.inf
    assert back(cfg)[0] == cfg


def test_train_settings_round_trip():
    train = {"group_size": 8, "ppo_epochs": 2, "minibatches": 4, "prompts_per_step": 64, "temperature": 0.7,
             "top_p": 0.9, "top_k": 0, "max_new_tokens": 128, "lr": 1e-6, "critic_lr": 1e-5, "max_grad_norm": 1.0}
    cfg = PRESETS["ppo"].replace(group_size=8)
    flat = to_verl(cfg, train)
    assert flat[A + "ppo_mini_batch_size"] == 16 and flat[R + "top_k"] == -1 and flat[R + "n"] == 8
    algo, t = back(cfg, train)
    assert algo == cfg
    for key, value in train.items():
        assert t.train[key] == value, key
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(t.train) <= known
    with pytest.raises(ValueError, match="'seed'"):
        to_verl(cfg, {"seed": 1})
    with pytest.raises(ValueError, match="minibatches"):
        to_verl(cfg, {"minibatches": 3, "prompts_per_step": 64})


def test_three_input_forms_agree():
    flat = {ALG + "adv_estimator": "grpo", R + "n": 8, A + "clip_ratio_low": 0.2, A + "clip_ratio_high": 0.28,
            A + "loss_agg_mode": "token-mean", A + "use_kl_loss": True, A + "kl_loss_coef": 0.01,
            A + "kl_loss_type": "k3+", A + "clip_ratio_c": 10.0, A + "entropy_coeff": 0.001,
            "data.max_response_length": 100, "reward_model.overlong_buffer.enable": True,
            "reward_model.overlong_buffer.len": 20}
    expected = from_verl(flat)
    assert expected.algo.eps_high == 0.28 and expected.algo.kl_estimator == "low_var_kl+"
    assert expected.algo.dual_clip == 10.0 and expected.algo.overlong_buffer == 20
    assert from_verl(nest(flat)) == expected
    assert from_verl(attrs(nest(flat))) == expected
    # Hydra override strings, with '+' for keys not in the YAML
    hydra = {("+" + k if k.startswith("reward_model") else k): (str(v).lower() if isinstance(v, bool) else str(v))
             for k, v in flat.items()}
    assert from_verl(hydra) == expected


def test_missing_fields_are_verls_defaults():
    t = from_verl({})
    assert t.algo.adv_estimator == "gae" and t.algo.loss_fn == "ppo" and t.algo.whiten_advantages
    assert (t.algo.dual_clip, t.algo.loss_agg_mode, t.algo.lam, t.algo.value_clip) == (3.0, "token-mean", 1.0, 0.5)
    assert t.algo.kl_coef == 0.0 and t.train["top_k"] == 0
    assert DEFAULTS[A + "clip_ratio_c"] == 3.0


def test_clip_ratio_fallback_and_notes():
    t = from_verl({ALG + "adv_estimator": "grpo", R + "n": 4, A + "clip_ratio": 0.3})
    assert (t.algo.eps_low, t.algo.eps_high) == (0.2, 0.2)  # verl reads clip_ratio_low/high, default 0.2
    assert any("clip_ratio=0.3" in n for n in t.notes)
    t = from_verl({ALG + "adv_estimator": "grpo", R + "n": 4, A + "clip_ratio": 0.3, A + "clip_ratio_low": None,
                   A + "clip_ratio_high": "null"})
    assert (t.algo.eps_low, t.algo.eps_high) == (0.3, 0.3)
    t = from_verl({ALG + "adv_estimator": "grpo", R + "n": 4, A + "clip_ratio_low": 2.0})
    assert t.algo.eps_low == 1.0 and any("no lower clip" in n for n in t.notes)
    t = from_verl({ALG + "adv_estimator": "grpo", R + "n": 4, A + "policy_loss.loss_mode": "sapo"})
    assert t.algo.loss_agg_mode == "seq-mean-token-mean" and any("sapo" in n for n in t.notes)


REFUSED_FROM = [
    ({ALG + "adv_estimator": "remax"}, ALG + "adv_estimator"),
    ({ALG + "adv_estimator": "made_up"}, ALG + "adv_estimator"),
    ({ALG + "adv_estimator": "grpo", R + "n": 1}, R + "n"),
    ({A + "policy_loss.loss_mode": "clip_cov"}, A + "policy_loss.loss_mode"),
    ({A + "policy_loss.loss_mode": "made_up"}, A + "policy_loss.loss_mode"),
    ({ALG + "use_kl_in_reward": True, ALG + "kl_ctrl.type": "adaptive"}, ALG + "kl_ctrl.type"),
    ({A + "use_kl_loss": True, A + "kl_loss_type": "full"}, A + "kl_loss_type"),
    ({ALG + "use_kl_in_reward": True, ALG + "kl_penalty": "full"}, ALG + "kl_penalty"),
    ({A + "use_kl_loss": True, ALG + "use_kl_in_reward": True}, A + "use_kl_loss"),
    ({A + "policy_loss.loss_mode": "sapo", A + "use_kl_loss": True, A + "loss_agg_mode": "token-mean"},
     A + "loss_agg_mode"),
    ({"critic.loss_agg_mode": "seq-mean-token-mean"}, "critic.loss_agg_mode"),
    ({R + "do_sample": False}, R + "do_sample"),
    ({ALG + "use_pf_ppo": True}, ALG + "use_pf_ppo"),
    ({ALG + "rollout_correction.rollout_is": "token"}, ALG + "rollout_correction.rollout_is"),
    ({ALG + "filter_groups.enable": True, ALG + "filter_groups.metric": "length"}, ALG + "filter_groups.metric"),
    ({"reward_model.overlong_buffer.enable": True, "reward_model.overlong_buffer.len": 4,
      "reward_model.overlong_buffer.penalty_factor": 2.0, "data.max_response_length": 16},
     "reward_model.overlong_buffer.penalty_factor"),
]


@pytest.mark.parametrize("config,field", REFUSED_FROM, ids=[f for _, f in REFUSED_FROM])
def test_from_verl_refusals_name_the_field(config, field):
    with pytest.raises(UnsupportedSetting) as e:
        from_verl(config)
    assert e.value.field_name == field and field in str(e.value)


@pytest.mark.parametrize("row", [r for r in FIELDS if r.status == "refused" and "=" in r.framework_field],
                         ids=lambda r: r.framework_field)
def test_every_refused_value_row_is_refused(row):
    field, value = row.framework_field.split("=")
    config = {ALG + "adv_estimator": "grpo", R + "n": 4, field: value}
    if "kl_loss_type" in field:
        config[A + "use_kl_loss"] = True
    with pytest.raises(UnsupportedSetting, match=field.replace(".", r"\.")):
        from_verl(config)


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        from_verl({ALG + "adv_estimator": "grpo", R + "n": 4, A + "clip_ratio_c": 1.0})
    with pytest.raises(ValueError, match=r"rollout\.n"):
        from_verl({R + "n": "many"})
    with pytest.raises(ValueError, match="loss_agg_mode"):
        from_verl({A + "loss_agg_mode": "token-median"})
    with pytest.raises(ValueError, match="use_kl_loss"):
        from_verl({A + "use_kl_loss": 3})
    with pytest.raises(ValueError, match="cfg must be an AlgoConfig"):
        to_verl({"kl_coef": 0.1})


REFUSED_TO = [
    (dict(adv_scale="batch"), "adv_scale"),
    (dict(adv_eps=1e-4), "adv_eps"),
    (dict(whiten_advantages=True), "whiten_advantages"),
    (dict(ratio_level="sequence", dual_clip=3.0), "dual_clip"),
    (dict(pg_objective="cispo", ratio_level="sequence"), "ratio_level"),
    (dict(pg_objective="sapo", loss_agg_mode="token-mean"), "loss_agg_mode"),
    (dict(ent_coef=0.1, ent_agg_mode="token-mean"), "ent_agg_mode"),
    (dict(kl_ratio_weighted=True), "kl_ratio_weighted"),
    (dict(global_token_norm=True, loss_agg_mode="token-mean"), "global_token_norm"),
    (dict(unscorable="zero_advantage"), "unscorable"),
    (dict(loss_fn="ppo"), "loss_fn"),
    (dict(adv_estimator="process"), "adv_estimator"),
]


@pytest.mark.parametrize("changes,field", REFUSED_TO, ids=[f for _, f in REFUSED_TO])
def test_to_verl_refusals_name_the_field(changes, field):
    with pytest.raises(UnsupportedSetting) as e:
        to_verl(AlgoConfig(**changes))
    assert e.value.field_name == field


def test_fields_table():
    assert len({r.framework_field for r in FIELDS}) == len(FIELDS)
    counts = {s: sum(r.status == s for r in FIELDS) for s in ("exact", "mapped", "refused", "ignored")}
    assert all(counts.values()), counts
    assert grpo_ref.compat.VERL_FIELDS is FIELDS


def test_import_grpo_ref_does_not_import_verl():
    code = ("import sys, grpo_ref, grpo_ref.compat, grpo_ref.compat.verl, grpo_ref.integrations.verl; "
            "assert not any(m == 'verl' or m.startswith('verl.') or m == 'omegaconf' for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
