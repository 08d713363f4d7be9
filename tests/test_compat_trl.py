"""grpo_ref.compat.trl without TRL: round trips, refusals naming their field, dict and object configs, notes.

The translations' agreement with TRL's own code is tested in tests/test_conformance_trl.py; this module checks the
translator's bookkeeping and does not import TRL (a subprocess checks that importing the translator does not
either).
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from grpo_ref import PRESETS, AlgoConfig
from grpo_ref.compat import UnsupportedSetting
from grpo_ref.compat.trl import FIELDS, TRL_DEFAULTS, from_trl, to_trl

FULL = {"loss_type": "grpo", "num_generations": 4, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2,
        "steps_per_generation": 4, "num_iterations": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05,
        "mask_truncated_completions": True, "beta": 0.04, "sync_ref_model": True, "ref_model_sync_steps": 8,
        "ref_model_mixup_alpha": 0.5, "learning_rate": 3e-4, "weight_decay": 0.01}
TRL_CONFIGS = [
    {},  # TRL's defaults: dapo, beta 0
    {"loss_type": "grpo", "beta": 0.04},
    {"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False, "importance_sampling_level": "sequence",
     "epsilon": 3e-4, "epsilon_high": 4e-4},
    {"loss_type": "bnpo", "epsilon_high": 0.28, "scale_rewards": "batch"},
    {"loss_type": "dr_grpo", "scale_rewards": False, "max_completion_length": 64},
    {"loss_type": "dapo", "epsilon_high": 0.28, "delta": 3.0, "entropy_coef": 0.01},
    {"loss_type": "grpo", "epsilon_high": 0.28, "delta": 1.1},  # delta below 1 + eps_high
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"loss_type": "cispo", "epsilon_high": 5.0},
    {"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0, "beta": 0.01},
    {"loss_type": "sapo", "epsilon": 1.0, "epsilon_high": 0.5},
    {"loss_type": "grpo", "epsilon": 1.0},  # lower bound 0: never binds
    FULL,
    {"loss_type": "grpo", "reward_weights": [1.0, 0.5], "multi_objective_aggregation": "normalize_then_sum"},
    {"loss_type": "grpo", "generation_batch_size": 64, "per_device_train_batch_size": 16},
]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("config", TRL_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_round_trip_from_trl_to_trl(config):
    """from_trl(to_trl(from_trl(x))) == from_trl(x): the same algorithm and loop settings after a trip through TRL's
    names; to_trl writes only GRPOConfig fields."""
    first = from_trl(config)
    kwargs = to_trl(first.algo, first.train)
    assert set(kwargs) <= set(TRL_DEFAULTS), set(kwargs) - set(TRL_DEFAULTS)
    second = from_trl(kwargs)
    assert second.algo == first.algo.replace(name=second.algo.name)
    assert second.train == first.train


def test_round_trip_keeps_every_given_field():
    """Fields set in the TRL config come back with the same value, except the micro-batching, which to_trl
    writes as one micro-batch per optimizer step (the same minibatches and generation batch)."""
    config = FULL
    back = to_trl(from_trl(config).algo, from_trl(config).train)
    schedule = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation")
    for key, value in config.items():
        if key not in schedule:
            assert back[key] == pytest.approx(value), key
    assert (back["gradient_accumulation_steps"], back["steps_per_generation"]) == (1, 2)
    assert back["per_device_train_batch_size"] * back["steps_per_generation"] == 16 * 4  # the generation batch


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_to_trl_and_back(name):
    """Every preset TRL can express comes back equal, up to what TRL fixes (adv_eps 1e-4, unscorable completions
    get advantage 0, dr_grpo's norm_length = max_completion_length); the others are refused naming the field."""
    preset = PRESETS[name]
    refused = {"ppo": "loss_fn", "rloo": "adv_estimator", "reinforce_pp": "adv_estimator", "dapo": "filter_groups"}
    train = {"max_new_tokens": 32, "prompts_per_step": 16, "minibatches": 4, "ppo_epochs": 2}
    if name in refused:
        with pytest.raises(UnsupportedSetting) as e:
            _quiet(to_trl, preset, train)
        assert e.value.field_name == refused[name] and refused[name] in str(e.value)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = to_trl(preset, train)
    said = " ".join(str(w.message) for w in caught)
    assert "adv_eps" in said  # TRL's epsilon is fixed at 1e-4
    assert ("norm_length" in said) == (preset.loss_agg_mode == "seq-mean-token-sum-norm" and preset.norm_length is None)
    back = from_trl(kwargs)
    expected = preset.replace(name=back.algo.name, adv_eps=1e-4, unscorable="zero_advantage")
    if preset.loss_agg_mode == "seq-mean-token-sum-norm":
        expected = expected.replace(norm_length=32)
    assert back.algo == expected
    for key, value in train.items():
        assert back.train[key] == value


def test_dapo_preset_without_dynamic_sampling_is_trl_bnpo_and_with_global_norm_dapo():
    dapo = PRESETS["dapo"].replace(filter_groups=False)
    assert _quiet(to_trl, dapo)["loss_type"] == "bnpo"
    assert _quiet(to_trl, dapo.replace(global_token_norm=True))["loss_type"] == "dapo"


def test_dict_and_object_give_the_same_translation():
    config = FULL
    as_dict = from_trl(config)
    as_obj = from_trl(SimpleNamespace(**{**TRL_DEFAULTS, **config}))
    assert as_dict.algo == as_obj.algo and as_dict.train == as_obj.train and as_dict.notes == as_obj.notes


def test_missing_keys_take_trl_defaults():
    """TRL 1.16.0's defaults, not grpo_ref's: dapo with the global token normaliser, beta 0, bias-corrected KL."""
    tr = from_trl({})
    a = tr.algo
    assert (a.pg_objective, a.loss_agg_mode, a.global_token_norm, a.kl_coef, a.kl_ratio_weighted) == (
        "clip", "token-mean", True, 0.0, True)
    assert (a.eps_low, a.eps_high, a.group_size, a.adv_scale, a.adv_eps) == (0.2, 0.2, 8, "group", 1e-4)
    assert tr.train["minibatches"] == 1 and tr.train["prompts_per_step"] == 1 and tr.train["max_new_tokens"] == 512


@pytest.mark.parametrize("loss_type,mode", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                            ("dr_grpo", "seq-mean-token-sum-norm"), ("dapo", "token-mean"),
                                            ("luspo", "seq-mean-token-sum")])
def test_clip_loss_types(loss_type, mode):
    a = from_trl({"loss_type": loss_type, "max_completion_length": 100}).algo
    assert a.pg_objective == "clip" and a.loss_agg_mode == mode
    assert a.global_token_norm == (loss_type == "dapo")
    assert a.norm_length == (100 if loss_type == "dr_grpo" else None)


def test_delta_mapping():
    below = from_trl({"loss_type": "grpo", "epsilon_high": 0.28, "delta": 1.1}).algo
    above = from_trl({"loss_type": "grpo", "epsilon_high": 0.28, "delta": 2.0}).algo
    assert below.eps_high == pytest.approx(0.1) and below.dual_clip == pytest.approx(1.28)
    assert above.eps_high == pytest.approx(0.28) and above.dual_clip == 2.0


def test_cispo_and_sapo():
    c = from_trl({"loss_type": "cispo", "epsilon_high": 5.0}).algo
    assert (c.pg_objective, c.eps_low, c.eps_high, c.loss_agg_mode, c.global_token_norm) == (
        "cispo", 1.0, 4.0, "token-mean", True)
    s = from_trl({"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0}).algo
    assert (s.pg_objective, s.sapo_tau_pos, s.sapo_tau_neg, s.loss_agg_mode) == ("sapo", 0.5, 2.0, "seq-mean-token-mean")
    assert any("delta" in n for n in from_trl({"loss_type": "sapo", "delta": 2.0}).notes)


def test_schedule():
    tr = from_trl({"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "steps_per_generation": 8,
                   "num_generations": 4, "num_iterations": 3})
    assert (tr.train["minibatches"], tr.train["prompts_per_step"], tr.train["ppo_epochs"]) == (4, 32, 3)
    tr = from_trl({"per_device_train_batch_size": 16, "gradient_accumulation_steps": 4})  # spg None = GA
    assert (tr.train["minibatches"], tr.train["prompts_per_step"]) == (1, 8)
    assert to_trl(tr.algo, tr.train)["per_device_train_batch_size"] == 64  # one micro-batch per optimizer step


def test_notes():
    always = from_trl({})
    assert any("clamp" in n for n in always.notes)
    assert any("bnpo" in n for n in from_trl({"loss_type": "bnpo", "gradient_accumulation_steps": 2}).notes)
    assert not any("bnpo" in n for n in from_trl({"loss_type": "bnpo"}).notes)
    assert any("entropy" in n for n in from_trl({"entropy_coef": 0.1, "gradient_accumulation_steps": 2}).notes)
    assert any("normalize_then_sum" in n for n in from_trl({"multi_objective_aggregation": "normalize_then_sum"}).notes)
    assert from_trl({"multi_objective_aggregation": "normalize_then_sum"}).train["reward_scale"] is None
    assert from_trl({"scale_rewards": "batch"}).train["reward_scale"] == "batch"


# -- refusals name their field -------------------------------------------------------------------------------
NON_DEFAULT = {
    "loss_type=vespo": {"loss_type": "vespo"},
    "top_entropy_quantile": {"top_entropy_quantile": 0.2},
    "off_policy_mask_threshold": {"off_policy_mask_threshold": 0.5},
    "use_adaptive_entropy": {"use_adaptive_entropy": True},
    "entropy_coef_min": {"entropy_coef_min": 0.01},
    "entropy_coef_max": {"entropy_coef_max": 0.5},
    "entropy_coef_delta": {"entropy_coef_delta": 0.01},
    "entropy_target": {"entropy_target": 0.5},
    "vllm_importance_sampling_correction": {"use_vllm": True},
    "vllm_importance_sampling_mode": {"vllm_importance_sampling_mode": "token_truncate"},
    "vllm_importance_sampling_clip_max": {"vllm_importance_sampling_clip_max": 2.0},
    "vllm_importance_sampling_clip_min": {"vllm_importance_sampling_clip_min": 0.5},
    "vllm_importance_sampling_cap": {"vllm_importance_sampling_cap": 2.0},
    "vespo_k_pos": {"vespo_k_pos": 1.0},
    "vespo_lambda_pos": {"vespo_lambda_pos": 1.0},
    "vespo_k_neg": {"vespo_k_neg": 1.0},
    "vespo_lambda_neg": {"vespo_lambda_neg": 1.0},
    "repetition_penalty": {"repetition_penalty": 1.1},
    "generation_kwargs": {"generation_kwargs": {"no_repeat_ngram_size": 2}},
    "router_aux_loss_coef": {"router_aux_loss_coef": 0.01},
    "vllm_structured_outputs_regex": {"vllm_structured_outputs_regex": "[ab]+"},
}


def test_every_refused_row_is_refused_naming_its_field():
    refused = {r.framework_field for r in FIELDS if r.status == "refused"}
    assert refused == set(NON_DEFAULT)
    for row, config in NON_DEFAULT.items():
        field = row.split("=")[0]
        with pytest.raises(UnsupportedSetting, match=field) as e:
            from_trl(config)
        assert e.value.field_name == field, row


def test_refused_rows_accept_their_default():
    for row, config in NON_DEFAULT.items():
        field = row.split("=")[0]
        if field in TRL_DEFAULTS and field != "loss_type":
            from_trl({field: TRL_DEFAULTS[field]})
    from_trl({"generation_kwargs": {}, "router_aux_loss_coef": 0.0, "use_vllm": True,
              "vllm_importance_sampling_correction": False})


@pytest.mark.parametrize("config,field", [
    ({"loss_type": "grpo", "delta": 1.0}, "delta"),
    ({"loss_type": "grpo", "delta": 0.5}, "delta"),
    ({"loss_type": "cispo"}, "epsilon_high"),  # clamps at epsilon = 0.2
    ({"loss_type": "cispo", "epsilon_high": 0.9}, "epsilon_high"),
    ({"loss_type": "grpo", "epsilon": 0.0}, "epsilon"),
    ({"loss_type": "grpo", "epsilon_high": -0.1}, "epsilon_high"),
    ({"gradient_accumulation_steps": 4, "steps_per_generation": 2}, "steps_per_generation"),
])
def test_unexpressible_values_are_refused(config, field):
    with pytest.raises(UnsupportedSetting) as e:
        from_trl(config)
    assert e.value.field_name == field and field in str(e.value)


@pytest.mark.parametrize("config,field", [
    ({"loss_type": "ppo"}, "loss_type"),
    ({"importance_sampling_level": "tokens"}, "importance_sampling_level"),
    ({"scale_rewards": "groups"}, "scale_rewards"),
    ({"num_generations": 1}, "num_generations"),
    ({"beta": float("nan")}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"epsilon": float("inf")}, "epsilon"),
    ({"use_bias_correction_kl": "yes"}, "use_bias_correction_kl"),
    ({"per_device_train_batch_size": 6}, "generation_batch_size"),  # 6 completions, groups of 8
    ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation"),
    ({"temperature": 0.0}, "temperature"),
])
def test_values_trl_would_not_accept_are_value_errors_naming_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        from_trl(config)


@pytest.mark.parametrize("change,field", [
    ({"kl_estimator": "k1"}, "kl_estimator"),
    ({"kl_placement": "reward"}, "kl_placement"),
    ({"whiten_advantages": True}, "whiten_advantages"),
    ({"loss_agg_mode": "token-sum"}, "loss_agg_mode"),
    ({"dual_clip": 1.1}, "dual_clip"),
    ({"pg_objective": "cispo", "eps_low": 0.2}, "loss_agg_mode"),
    ({"pg_objective": "cispo", "eps_low": 0.2, "loss_agg_mode": "token-mean", "global_token_norm": True}, "eps_low"),
    ({"pg_objective": "sapo", "loss_agg_mode": "token-mean"}, "loss_agg_mode"),
    ({"ent_coef": 0.1}, "ent_agg_mode"),
    ({"max_response_length": 32, "overlong_buffer": 8}, "overlong_buffer"),
    ({"adv_estimator": "rloo"}, "adv_estimator"),
])
def test_to_trl_refuses_naming_the_field(change, field):
    cfg = AlgoConfig(adv_eps=1e-4).replace(**change)
    with pytest.raises(UnsupportedSetting) as e:
        to_trl(cfg)
    assert e.value.field_name == field and field in str(e.value)


@pytest.mark.parametrize("train,field", [
    ({"truncation": "penalize"}, "truncation"),
    ({"kv_cache_size": 3}, "kv_cache_size"),
    ({"prompts_per_step": 3, "minibatches": 5}, "minibatches"),
    ({"reward_aggregation": "normalize_then_sum", "reward_scale": "group"}, "reward_scale"),
])
def test_to_trl_refuses_train_settings_naming_them(train, field):
    with pytest.raises(UnsupportedSetting) as e:
        to_trl(AlgoConfig(adv_eps=1e-4), train)
    assert e.value.field_name == field


def test_to_trl_always_writes_the_fields_whose_defaults_differ():
    """TRL's defaults are dapo and a bias-corrected KL: to_trl of a plain grpo config must say grpo and False."""
    out = to_trl(AlgoConfig(adv_eps=1e-4))
    assert out["loss_type"] == "grpo" and out["use_bias_correction_kl"] is False and out["beta"] == 0.04
    assert to_trl(AlgoConfig(adv_eps=1e-4), {"ref_sync_every": 0})["sync_ref_model"] is False


def test_to_trl_refuses_a_non_algo_config():
    with pytest.raises(ValueError, match="cfg"):
        to_trl({"loss_type": "grpo"})


def test_fields_table():
    assert len({r.framework_field for r in FIELDS}) == len(FIELDS)
    loss_rows = {r.framework_field for r in FIELDS if r.framework_field.startswith("loss_type=")}
    assert loss_rows == {f"loss_type={t}" for t in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")}
    for name in TRL_DEFAULTS:
        if name not in ("loss_type",):
            assert any(r.framework_field == name for r in FIELDS), f"{name} has no FIELDS row"


def test_importing_the_translator_does_not_import_trl():
    code = "import sys, grpo_ref, grpo_ref.compat, grpo_ref.compat.trl; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
