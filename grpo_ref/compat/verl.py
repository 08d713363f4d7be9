"""verl 0.9.1's PPO trainer configuration in grpo_ref's terms, and back.

* :func:`from_verl` reads a verl config -- a nested dict (the YAML of ``verl/trainer/config/ppo_trainer.yaml``),
  a flat dict of dotted Hydra override keys (``{"actor_rollout_ref.actor.clip_ratio_high": 0.28}``; a leading
  ``+`` is dropped, string values such as ``"0.28"`` or ``"true"`` are parsed), or any object with attributes
  (an OmegaConf ``DictConfig``, verl's dataclass configs) -- and returns a :class:`~grpo_ref.compat.Translation`
  whose :class:`~grpo_ref.algorithms.AlgoConfig` gives the same loss and advantages as verl's code.
* :func:`to_verl` writes an :class:`~grpo_ref.algorithms.AlgoConfig` (and optionally training-loop settings) as
  flat dotted keys, the Hydra override form: ``python -m verl.trainer.main_ppo key=value ...``.
* ``FIELDS``: one :class:`~grpo_ref.compat.FieldMapping` row per loss-relevant verl field.

Nothing here imports verl or omegaconf. A setting that changes verl's loss and has no grpo_ref equivalent raises
:class:`~grpo_ref.compat.UnsupportedSetting` naming the field. Missing fields take verl 0.9.1's defaults (from
``verl/trainer/config/_generated_ppo_trainer.yaml`` and the dataclasses ``verl.workers.config.ActorConfig`` /
``verl.trainer.config.AlgoConfig``; note that they differ from grpo_ref's: verl's default ``adv_estimator`` is
``gae``, ``loss_agg_mode`` is ``token-mean``, ``lam`` is 1.0, ``clip_ratio_c`` is 3.0).

What verl 0.9.1's code does, as read in ``verl/trainer/ppo/core_algos.py`` and ``verl/workers/utils/losses.py``
(``ppo_loss``), and checked by running it in ``tests/test_conformance_verl.py``:

* ``compute_policy_loss_vanilla`` always applies dual-clip with ``clip_ratio_c`` (default 3.0): grpo_ref's
  ``dual_clip`` is 3.0 for a default verl config, and ``dual_clip=None`` is written as ``clip_ratio_c=inf``.
  The ``gspo``, ``sapo`` and ``cispo`` losses apply no dual clip.
* ``kl_penalty_forward``: ``k3`` and ``low_var_kl`` are the same estimator, k3 on the log-ratio clamped to
  ``+-20`` with the *value* clamped to ``[-10, 10]``: grpo_ref's ``low_var_kl``. grpo_ref's ``k3`` (no value
  clamp) has no verl name; :func:`to_verl` writes it as ``low_var_kl`` (the one lossy step: equal wherever
  ``k3 <= 10``). ``kl``/``k1``, ``abs``, ``mse``/``k2`` are k1, abs, k2. ``kl_penalty`` with a ``+`` suffix
  is the straight-through form (value of the base estimator, gradient of k2): grpo_ref's ``k1+``, ``abs+``,
  ``low_var_kl+``; ``k2+``/``mse+`` are k2. ``full`` raises ``NotImplementedError`` in verl: refused.
* the KL in the reward (``algorithm.use_kl_in_reward``; ``ray_trainer.apply_kl_penalty``) is
  ``kl_penalty(old_log_prob, ref_log_prob, algorithm.kl_penalty)`` (default ``kl`` = k1 of the *sampling*
  policy against the reference) times ``kl_ctrl.kl_coef``, subtracted per token: grpo_ref's
  ``kl_placement="reward"``. The adaptive controller is refused.
* ``agg_loss``: ``seq-mean-token-mean`` divides a row's sum by ``L_i + 1e-8`` (grpo_ref: ``max(L_i, 1)``; a
  relative difference of ``1e-8 / L_i``). Called without ``global_batch_size``, the seq-mean modes drop fully
  masked rows from ``B``; grpo_ref counts them (TRL's convention). verl's trainer passes
  ``global_batch_size = ppo_mini_batch_size * rollout.n`` (every row), so in a verl run the two agree.
  ``token-mean`` divides by ``batch_num_tokens``, the mini-batch's token count (summed over data-parallel ranks):
  grpo_ref's ``token-mean`` on that mini-batch (``global_token_norm=False``).
* ``sapo`` always aggregates its policy term ``seq-mean-token-mean``, whatever ``loss_agg_mode`` says; the
  entropy and KL terms still use ``loss_agg_mode``.
* ``gspo`` clamps the sequence log-ratio at ``+10`` (upper side only); grpo_ref clamps it at ``+-20``: they
  differ only where a sequence's mean log-ratio exceeds 10 (a ratio above 22026).
* ``cispo`` clamps the ratio on both sides, ``clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)``.
* ``compute_grpo_outcome_advantage``: eps 1e-6 (the trainer does not pass one), unbiased std;
  ``compute_gae_advantage_return`` always whitens the advantages (``masked_whiten``), returns before whitening.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

from ..algorithms import AlgoConfig
from ._common import FieldMapping, Translation, UnsupportedSetting, check_statuses

__all__ = ["DEFAULTS", "FIELDS", "from_verl", "to_verl", "VERL_VERSION"]

VERL_VERSION = "0.9.1"

A = "actor_rollout_ref.actor."
R = "actor_rollout_ref.rollout."
ALG = "algorithm."
CRITIC = "critic."

#: verl 0.9.1 defaults of the fields the translator reads, by flat dotted key (as in
#: ``verl/trainer/config/_generated_ppo_trainer.yaml`` and verl's ActorConfig, AlgoConfig, KLControlConfig).
#:
#: :meta hide-value:
DEFAULTS: Dict[str, Any] = {
    ALG + "adv_estimator": "gae",
    ALG + "norm_adv_by_std_in_grpo": True,
    ALG + "gamma": 1.0,
    ALG + "lam": 1.0,
    ALG + "use_kl_in_reward": False,
    ALG + "kl_penalty": "kl",
    ALG + "kl_ctrl.type": "fixed",
    ALG + "kl_ctrl.kl_coef": 0.001,
    ALG + "filter_groups.enable": False,
    ALG + "use_pf_ppo": False,
    A + "clip_ratio": 0.2,
    A + "clip_ratio_low": 0.2,
    A + "clip_ratio_high": 0.2,
    A + "clip_ratio_c": 3.0,
    A + "loss_agg_mode": "token-mean",
    A + "loss_scale_factor": None,
    A + "policy_loss.loss_mode": "vanilla",
    A + "tau_pos": 1.0,
    A + "tau_neg": 1.05,
    A + "entropy_coeff": 0.0,
    A + "use_kl_loss": False,
    A + "kl_loss_coef": 0.001,
    A + "kl_loss_type": "low_var_kl",
    A + "ppo_epochs": 1,
    A + "ppo_mini_batch_size": 256,
    R + "n": 1,
    R + "temperature": 1.0,
    R + "top_p": 1.0,
    R + "top_k": -1,
    R + "do_sample": True,
    CRITIC + "cliprange_value": 0.5,
}

# adv_estimator: verl name -> grpo_ref adv_estimator (verl's AdvantageEstimator enum, core_algos.py)
_ADV = {
    "grpo": "grpo",
    "grpo_vectorized": "grpo",
    "rloo": "rloo",
    "rloo_vectorized": "rloo",
    "reinforce_plus_plus": "reinforce_pp",
    "reinforce_plus_plus_baseline": "reinforce_pp_baseline",
    "gae": "gae",
}
_ADV_REFUSED = {
    "remax": "ReMax subtracts the reward of a greedy rollout (reward_baselines); grpo_ref has no greedy baseline",
    "opo": "OPO's length-weighted group baseline has no grpo_ref equivalent",
    "gpg": "GPG rescales the centred reward by B / #non-zero rewards; no grpo_ref equivalent",
    "grpo_passk": "Pass@k advantage (only the best sample of a group gets r_max - r_second); no grpo_ref equivalent",
    "gdpo": "GDPO normalises each reward dimension separately; no grpo_ref equivalent",
    "optimal_token_baseline": "the optimal token baseline needs sum_pi_squared from the actor; no grpo_ref equivalent",
    "tir_optimal_token_baseline": "the multi-turn optimal token baseline has no grpo_ref equivalent",
}

# policy_loss.loss_mode: verl name -> (pg_objective, ratio_level)
_LOSS_MODES = {"vanilla": ("clip", "token"), "gspo": ("clip", "sequence"), "sapo": ("sapo", "token"),
               "cispo": ("cispo", "token")}
_LOSS_MODES_REFUSED = {
    "dppo_tv": "DPPO's total-variation trust region has no grpo_ref equivalent",
    "dppo_kl": "DPPO's KL trust region has no grpo_ref equivalent",
    "gpg": "GPG's unclipped -A * log pi loss has no grpo_ref equivalent",
    "clip_cov": "Clip-Cov's covariance-selected token clipping has no grpo_ref equivalent",
    "kl_cov": "KL-Cov's covariance-selected KL penalty has no grpo_ref equivalent",
    "geo_mean": "GMPO's geometric-mean ratio has no grpo_ref equivalent",
    "dro": "DRO's quadratic log-ratio penalty has no grpo_ref equivalent",
    "bypass_mode": "the rollout-correction bypass loss has no grpo_ref equivalent",
}

# kl_loss_type / kl_penalty: verl name -> grpo_ref kl_estimator (core_algos.kl_penalty / kl_penalty_forward)
_KL = {
    "kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "k3": "low_var_kl", "low_var_kl": "low_var_kl",
    "kl+": "k1+", "k1+": "k1+", "abs+": "abs+", "mse+": "k2", "k2+": "k2", "k3+": "low_var_kl+",
    "low_var_kl+": "low_var_kl+",
}
# grpo_ref kl_estimator -> the verl name to_verl writes
_KL_BACK = {"k1": "kl", "k2": "mse", "k3": "low_var_kl", "abs": "abs", "low_var_kl": "low_var_kl", "k1+": "k1+",
            "k3+": "low_var_kl+", "abs+": "abs+", "low_var_kl+": "low_var_kl+"}

_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# overlong shaping: the DAPO recipe's reward_model.overlong_buffer, and the reward managers' overlong_buffer_cfg
_OVERLONG_ROOTS = ("reward_model.overlong_buffer.", "reward_model.reward_kwargs.overlong_buffer_cfg.",
                   "reward.reward_kwargs.overlong_buffer_cfg.")

_GRPO_EPS = 1e-6  # compute_grpo_outcome_advantage's default epsilon; ray_trainer.compute_advantage passes none


def _row(field: str, grpo_ref: str, status: str, note: str = "") -> FieldMapping:
    return FieldMapping(field, grpo_ref, status, note)


#: One row per loss-relevant verl 0.9.1 field (per value where a field selects an algorithm); the page "Check
#: your TRL or verl configuration" prints them as a list.
#:
#: :meta hide-value:
FIELDS: List[FieldMapping] = [
    # advantages
    _row(ALG + "adv_estimator=grpo", "adv_estimator='grpo'", "exact",
         "compute_grpo_outcome_advantage: group mean, unbiased std, eps 1e-6; grpo_vectorized is the same"),
    _row(ALG + "adv_estimator=grpo_vectorized", "adv_estimator='grpo'", "mapped", "same values as grpo"),
    _row(ALG + "adv_estimator=rloo", "adv_estimator='rloo'", "exact", "leave-one-out baseline G/(G-1) (R - mean)"),
    _row(ALG + "adv_estimator=rloo_vectorized", "adv_estimator='rloo'", "mapped", "same values as rloo"),
    _row(ALG + "adv_estimator=reinforce_plus_plus", "adv_estimator='reinforce_pp'", "mapped",
         "return-to-go of the token rewards, whitened over the batch (masked_whiten)"),
    _row(ALG + "adv_estimator=reinforce_plus_plus_baseline", "adv_estimator='reinforce_pp_baseline'", "mapped",
         "score minus group mean, broadcast to the tokens, whitened over the batch"),
    _row(ALG + "adv_estimator=gae", "adv_estimator='gae', loss_fn='ppo', whiten_advantages=True", "mapped",
         "compute_gae_advantage_return always whitens the advantages; returns = A + V before whitening"),
] + [
    _row(ALG + "adv_estimator=" + name, "(none)", "refused", reason) for name, reason in _ADV_REFUSED.items()
] + [
    _row(ALG + "norm_adv_by_std_in_grpo", "adv_scale ('group' if True, 'none' if False)", "mapped",
         "False is Dr. GRPO; grpo_ref's adv_scale='batch' has no verl equivalent"),
    _row("(fixed) grpo epsilon", "adv_eps=1e-6", "exact",
         "ray_trainer.compute_advantage passes no epsilon: 1e-6; another adv_eps is refused by to_verl"),
    _row(ALG + "gamma", "gamma", "exact", "used by gae and reinforce_plus_plus"),
    _row(ALG + "lam", "lam", "exact", "used by gae; verl's default is 1.0, grpo_ref's 0.95"),
    _row(ALG + "use_kl_in_reward", "kl_placement='reward'", "mapped",
         "apply_kl_penalty: token rewards = scores - kl_ctrl.kl_coef * kl_penalty(old_log_prob, ref_log_prob)"),
    _row(ALG + "kl_penalty", "kl_estimator (with kl_placement='reward')", "mapped", "same names as kl_loss_type"),
    _row(ALG + "kl_ctrl.kl_coef", "kl_coef (with kl_placement='reward')", "exact", "FixedKLController"),
    _row(ALG + "kl_ctrl.type", "(fixed only)", "refused", "the adaptive KL controller changes beta during training"),
    _row(ALG + "kl_ctrl.horizon / target_kl", "(none)", "ignored", "only read by the adaptive controller (refused)"),
    _row(ALG + "filter_groups.enable", "filter_groups", "mapped",
         "DAPO dynamic sampling, done by the training loop; max_num_gen_batches -> TrainConfig.filter_rounds"),
    _row(ALG + "filter_groups.metric", "(the score)", "refused", "grpo_ref filters on the task score only"),
    _row(ALG + "use_pf_ppo", "(none)", "refused", "preference-feedback reweighting of the batch"),
    _row(ALG + "rollout_correction", "(none)", "refused", "rollout importance weights / rejection sampling"),
    # actor: policy loss
    _row(A + "policy_loss.loss_mode=vanilla", "pg_objective='clip', ratio_level='token'", "exact",
         "compute_policy_loss_vanilla, log-ratio clamped to +-20 (grpo_ref's max_log_ratio)"),
    _row(A + "policy_loss.loss_mode=gspo", "ratio_level='sequence'", "mapped",
         "GSPO-token form; verl clamps the sequence log-ratio at +10, grpo_ref at +-20 (differs only above 10)"),
    _row(A + "policy_loss.loss_mode=sapo", "pg_objective='sapo'", "mapped",
         "the policy term is always seq-mean-token-mean; entropy/KL use loss_agg_mode"),
    _row(A + "policy_loss.loss_mode=cispo", "pg_objective='cispo'", "exact",
         "-sg(clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) * A * log pi"),
] + [
    _row(A + "policy_loss.loss_mode=" + name, "(none)", "refused", reason) for name, reason in _LOSS_MODES_REFUSED.items()
] + [
    _row(A + "clip_ratio", "eps_low / eps_high (fallback)", "mapped",
         "only read where clip_ratio_low / clip_ratio_high are null; their defaults are 0.2, not null"),
    _row(A + "clip_ratio_low", "eps_low", "exact", "a value >= 1 removes the lower clip: eps_low=1.0"),
    _row(A + "clip_ratio_high", "eps_high", "exact", ""),
    _row(A + "clip_ratio_c", "dual_clip", "mapped",
         "vanilla always dual-clips (default 3.0); dual_clip=None is clip_ratio_c=inf; unused by gspo/sapo/cispo"),
    _row(A + "tau_pos", "sapo_tau_pos", "exact", "sapo only"),
    _row(A + "tau_neg", "sapo_tau_neg", "exact", "sapo only"),
    _row(A + "policy_loss.(clip_cov_*, kl_cov_ratio, ppo_kl_coef, dro_beta)", "(none)", "ignored",
         "only read by the refused loss modes"),
    # actor: aggregation
    _row(A + "loss_agg_mode=token-mean", "loss_agg_mode='token-mean'", "exact",
         "divides by the mini-batch's token count (batch_num_tokens)"),
    _row(A + "loss_agg_mode=token-sum", "loss_agg_mode='token-sum'", "exact", ""),
    _row(A + "loss_agg_mode=seq-mean-token-mean", "loss_agg_mode='seq-mean-token-mean'", "exact",
         "L_i + 1e-8 vs max(L_i, 1); B: see global_batch_info"),
    _row(A + "loss_agg_mode=seq-mean-token-sum", "loss_agg_mode='seq-mean-token-sum'", "exact", ""),
    _row(A + "loss_agg_mode=seq-mean-token-sum-norm", "loss_agg_mode='seq-mean-token-sum-norm'", "exact",
         "divided by loss_scale_factor (None: the padded length T, as grpo_ref's norm_length=None)"),
    _row(A + "loss_scale_factor", "norm_length", "exact", "seq-mean-token-sum-norm only"),
    _row(A + "global_batch_info (runtime: dp_size, batch_num_tokens, global_batch_size)",
         "aggregation over the mini-batch; LossInputs.num_tokens (global_token_norm)", "mapped",
         "verl's trainer passes the whole mini-batch's token and sequence counts, so micro-batching changes "
         "nothing; without global_batch_size the seq-mean modes drop empty rows from B (grpo_ref counts them)"),
    # actor: KL in the loss and entropy
    _row(A + "use_kl_loss", "kl_placement='loss'", "mapped", "kl_loss_coef * agg_loss(kl_penalty(log_prob, ref))"),
    _row(A + "kl_loss_coef", "kl_coef (with kl_placement='loss')", "exact", ""),
] + [
    _row(f"{A}kl_loss_type={name}", f"kl_estimator={est!r}", "exact" if name == est else "mapped",
         {"k3": "value clamped to [-10, 10]: grpo_ref's low_var_kl (its k3 has no clamp)",
          "low_var_kl": "k3 with the value clamped to [-10, 10]"}.get(name, "" if "+" not in name else
                                                                      "value of the base estimator, gradient of k2"))
    for name, est in _KL.items()
] + [
    _row(A + "kl_loss_type=full", "(none)", "refused", "kl_penalty_forward raises NotImplementedError for 'full'"),
    _row(A + "entropy_coeff", "ent_coef", "exact", "agg_loss(entropy, loss_agg_mode): ent_agg_mode=None"),
    # training loop
    _row(A + "ppo_epochs", "TrainConfig.ppo_epochs", "exact", ""),
    _row(A + "ppo_mini_batch_size", "TrainConfig.minibatches = data.train_batch_size / ppo_mini_batch_size", "mapped",
         "both in prompts"),
    _row(A + "ppo_micro_batch_size_per_gpu / use_dynamic_bsz", "(none)", "ignored",
         "gradient accumulation: the loss is normalised by the mini-batch's counts (global_batch_info)"),
    _row(A + "optim.lr", "TrainConfig.lr", "exact", ""),
    _row(A + "optim.clip_grad", "TrainConfig.max_grad_norm", "exact", ""),
    _row(R + "n", "group_size", "exact", ""),
    _row(R + "temperature", "TrainConfig.temperature", "exact", "log-probs of logits / temperature, full vocabulary"),
    _row(R + "top_p", "TrainConfig.top_p", "exact", ""),
    _row(R + "top_k", "TrainConfig.top_k", "mapped", "verl's -1 (off) is grpo_ref's 0"),
    _row(R + "do_sample", "(sampling)", "refused", "do_sample=False (greedy rollouts) has no grpo_ref equivalent"),
    _row("data.max_response_length", "TrainConfig.max_new_tokens; max_response_length (overlong)", "exact", ""),
    _row("data.train_batch_size", "TrainConfig.prompts_per_step", "exact", ""),
    # critic
    _row(CRITIC + "cliprange_value", "value_clip", "exact", "compute_value_loss: 0.5 * agg(max of the two squares)"),
    _row(CRITIC + "loss_agg_mode", "loss_agg_mode (shared)", "mapped", "must equal the actor's; grpo_ref uses one"),
    _row(CRITIC + "optim.lr", "TrainConfig.critic_lr", "exact",
         "verl trains the critic with its own optimizer on its own loss; grpo_ref's vf_coef has no verl field"),
    # reward shaping
    _row("reward_model.overlong_buffer.enable", "overlong_buffer is not None", "mapped",
         "DAPO recipe; also reward(_model).reward_kwargs.overlong_buffer_cfg.*"),
    _row("reward_model.overlong_buffer.len", "overlong_buffer", "exact",
         "DAPORewardManager: min(-(L - (L_max - len)) / len * penalty_factor, 0)"),
    _row("reward_model.overlong_buffer.penalty_factor", "(1.0 only)", "refused", "grpo_ref's penalty ends at -1"),
]
check_statuses(FIELDS, "verl")


# -- reading ---------------------------------------------------------------------------------------------------------
_MISSING = object()


def _normalise(config: Any) -> Any:
    """A flat mapping with dotted keys gets its Hydra ``+``/``++`` prefixes dropped; anything else is returned as is."""
    if isinstance(config, Mapping) and any(isinstance(k, str) and ("." in k or k.startswith("+")) for k in config):
        return {(k.lstrip("+") if isinstance(k, str) else k): v for k, v in config.items()}
    return config


def _parse(value: Any) -> Any:
    """Hydra override strings (``"0.28"``, ``"true"``, ``"null"``, ``"inf"``) as Python values; others unchanged."""
    if isinstance(value, enum.Enum):  # verl's AdvantageEstimator is a str Enum
        return value.value
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return value.strip()


def _lookup(config: Any, name: str) -> Any:
    """:func:`~grpo_ref.compat._common.get_setting`, except that an explicit null (``clip_ratio_low: null``) is
    returned as None rather than read as missing: verl gives null a meaning (fall back to ``clip_ratio``)."""
    if isinstance(config, Mapping) and name in config:
        return config[name]
    node: Any = config
    for part in name.split("."):
        if node is None:
            return _MISSING
        node = node.get(part, _MISSING) if isinstance(node, Mapping) else getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _reader(config: Any):
    cfg = _normalise(config)

    def get(name: str) -> Any:
        value = _lookup(cfg, name)
        if value is _MISSING:
            return DEFAULTS.get(name)
        return _parse(value)

    def given(name: str) -> bool:
        return _lookup(cfg, name) is not _MISSING

    return get, given


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def from_verl(config: Any) -> Translation:
    """Translate a verl 0.9.1 PPO trainer config into grpo_ref's :class:`~grpo_ref.algorithms.AlgoConfig` and
    training-loop settings.

    Args:
        config: a nested dict (``{"algorithm": {"adv_estimator": "grpo"}, "actor_rollout_ref": {...}}``), a flat
            dict of dotted keys (Hydra overrides; a leading ``+`` is dropped, string values are parsed), or an
            object with attributes (OmegaConf ``DictConfig``, verl's dataclasses). Missing fields take verl's
            defaults (``DEFAULTS``).

    Returns:
        A :class:`~grpo_ref.compat.Translation` of ``algo``, whose loss and advantages equal verl's (see the
        module docstring for what is checked), ``train`` (keys of :class:`~grpo_ref.trainer.TrainConfig`: group_size,
        ppo_epochs, minibatches, prompts_per_step, temperature, top_p, top_k, max_new_tokens, lr, critic_lr,
        max_grad_norm, filter_rounds, where given) and ``notes`` (differences that remain).

    Raises:
        UnsupportedSetting: a setting that changes verl's loss and has no grpo_ref equivalent (the message names
            the field): the refused rows of ``FIELDS``, ``use_kl_loss`` together with ``use_kl_in_reward``
            (both with a coefficient > 0), ``sapo`` with a KL loss aggregated other than seq-mean-token-mean, a
            critic ``loss_agg_mode`` other than the actor's, an estimator needing groups with ``rollout.n < 2``.
        ValueError: a field of the wrong type (naming it), or a value :class:`~grpo_ref.algorithms.AlgoConfig` refuses.
    """
    get, given = _reader(config)
    notes: List[str] = []
    algo: Dict[str, Any] = {}
    train: Dict[str, Any] = {}

    # -- advantages
    key = ALG + "adv_estimator"
    est = _name(key, get(key))
    if est in _ADV_REFUSED:
        raise UnsupportedSetting(key, est, _ADV_REFUSED[est])
    if est not in _ADV:
        raise UnsupportedSetting(key, est, f"unknown verl advantage estimator; grpo_ref maps {sorted(_ADV)}")
    algo["adv_estimator"] = _ADV[est]
    algo["name"] = f"verl-{est}"
    n = _integer(R + "n", get(R + "n"))
    algo["group_size"] = n
    train["group_size"] = n
    if _ADV[est] in ("grpo", "rloo", "reinforce_pp_baseline") and n < 2:
        raise UnsupportedSetting(R + "n", n, f"{est} needs groups of >= 2 responses (verl treats a group of one "
                                 "as mean 0, std 1: its raw score); grpo_ref refuses groups of one")
    if est == "gae":
        algo["loss_fn"] = "ppo"
        algo["whiten_advantages"] = True
    norm_std = _flag(ALG + "norm_adv_by_std_in_grpo", get(ALG + "norm_adv_by_std_in_grpo"))
    if _ADV[est] == "grpo":
        algo["adv_scale"] = "group" if norm_std else "none"
    algo["adv_eps"] = _GRPO_EPS
    algo["gamma"] = _number(ALG + "gamma", get(ALG + "gamma"))
    algo["lam"] = _number(ALG + "lam", get(ALG + "lam"))
    if _flag(ALG + "use_pf_ppo", get(ALG + "use_pf_ppo")):
        raise UnsupportedSetting(ALG + "use_pf_ppo", True, "preference-feedback PPO reweights the batch; no grpo_ref equivalent")
    for sub in ("rollout_is", "rollout_rs"):
        value = get(ALG + "rollout_correction." + sub)
        if value is not None:
            raise UnsupportedSetting(ALG + "rollout_correction." + sub, value,
                                     "rollout importance weights / rejection sampling have no grpo_ref equivalent")
    if get(ALG + "rollout_correction.bypass_mode"):
        raise UnsupportedSetting(ALG + "rollout_correction.bypass_mode", True, "no grpo_ref equivalent")

    # -- policy loss
    key = A + "policy_loss.loss_mode"
    mode = _name(key, get(key))
    if mode in _LOSS_MODES_REFUSED:
        raise UnsupportedSetting(key, mode, _LOSS_MODES_REFUSED[mode])
    if mode not in _LOSS_MODES:
        raise UnsupportedSetting(key, mode, f"unknown verl loss_mode; grpo_ref maps {sorted(_LOSS_MODES)}")
    objective, ratio_level = _LOSS_MODES[mode]
    if objective != "clip":
        algo["pg_objective"] = objective
    algo["ratio_level"] = ratio_level
    clip = _number(A + "clip_ratio", get(A + "clip_ratio"))
    low, high = get(A + "clip_ratio_low"), get(A + "clip_ratio_high")
    if given(A + "clip_ratio") and clip != DEFAULTS[A + "clip_ratio"] and (low is not None or high is not None):
        notes.append(f"{A}clip_ratio={clip} is only a fallback: verl 0.9.1 reads clip_ratio_low/clip_ratio_high, "
                     "whose defaults are 0.2 (not null)")
    low = clip if low is None else _number(A + "clip_ratio_low", low)
    high = clip if high is None else _number(A + "clip_ratio_high", high)
    if low >= 1.0:  # (read for every loss mode, so that to_verl/from_verl round-trip; sapo uses neither)
        if low > 1.0:
            notes.append(f"{A}clip_ratio_low={low} >= 1: the ratio is positive, so there is no lower clip "
                         "(grpo_ref eps_low=1.0)")
        low = 1.0
    algo["eps_low"], algo["eps_high"] = low, high
    c = _number(A + "clip_ratio_c", get(A + "clip_ratio_c"))
    if mode == "vanilla":
        if not c > 1.0:
            raise ValueError(f"{A}clip_ratio_c must be > 1 (verl asserts it), got {c}")
        algo["dual_clip"] = None if c == math.inf else c
    algo["sapo_tau_pos"] = _number(A + "tau_pos", get(A + "tau_pos"))  # only sapo reads them
    algo["sapo_tau_neg"] = _number(A + "tau_neg", get(A + "tau_neg"))
    if mode == "gspo":
        notes.append("gspo: verl clamps the sequence log-ratio at +10 (upper side), grpo_ref at +-20")

    # -- aggregation, entropy, KL
    key = A + "loss_agg_mode"
    agg = _name(key, get(key))
    if agg not in _AGG_MODES:
        raise ValueError(f"{key} must be one of {_AGG_MODES}, got {agg!r}")
    scale = get(A + "loss_scale_factor")
    if scale is not None:
        algo["norm_length"] = _number(A + "loss_scale_factor", scale)
    ent = _number(A + "entropy_coeff", get(A + "entropy_coeff"))
    algo["ent_coef"] = ent
    use_kl_loss = _flag(A + "use_kl_loss", get(A + "use_kl_loss"))
    use_kl_reward = _flag(ALG + "use_kl_in_reward", get(ALG + "use_kl_in_reward"))
    loss_coef = _number(A + "kl_loss_coef", get(A + "kl_loss_coef"))
    if use_kl_reward:
        ctrl = _name(ALG + "kl_ctrl.type", get(ALG + "kl_ctrl.type"))
        if ctrl != "fixed":
            raise UnsupportedSetting(ALG + "kl_ctrl.type", ctrl, "the adaptive KL controller changes beta during "
                                     "training; grpo_ref's kl_coef is fixed")
    reward_coef = _number(ALG + "kl_ctrl.kl_coef", get(ALG + "kl_ctrl.kl_coef"))
    loss_on = use_kl_loss and loss_coef > 0
    reward_on = use_kl_reward and reward_coef > 0
    if loss_on and reward_on:
        raise UnsupportedSetting(A + "use_kl_loss", True, "together with algorithm.use_kl_in_reward: grpo_ref puts "
                                 "the KL in the loss or in the reward, not both")
    if loss_on or reward_on:
        key = A + "kl_loss_type" if loss_on else ALG + "kl_penalty"
        kl_name = _name(key, get(key))
        if kl_name not in _KL:
            raise UnsupportedSetting(key, kl_name, "no grpo_ref KL estimator ('full' raises NotImplementedError in "
                                     f"verl 0.9.1); grpo_ref maps {sorted(_KL)}")
        algo["kl_estimator"] = _KL[kl_name]
        algo["kl_coef"] = loss_coef if loss_on else reward_coef
        algo["kl_placement"] = "loss" if loss_on else "reward"
    else:  # no KL term: the estimator does not change the loss; grpo_ref's default is kept
        algo["kl_coef"] = 0.0
        algo["kl_placement"] = "reward" if use_kl_reward else "loss"
    if objective == "sapo" and agg != "seq-mean-token-mean":
        if loss_on:
            raise UnsupportedSetting(A + "loss_agg_mode", agg, "with loss_mode='sapo' verl aggregates the policy term "
                                     "seq-mean-token-mean but the KL loss with loss_agg_mode; grpo_ref uses one mode "
                                     "for both")
        notes.append(f"sapo: verl aggregates the policy term seq-mean-token-mean whatever loss_agg_mode ({agg}) says")
        if ent > 0:
            algo["ent_agg_mode"] = agg
        agg = "seq-mean-token-mean"
    algo["loss_agg_mode"] = agg

    # -- critic
    if est == "gae":
        clip_v = _number(CRITIC + "cliprange_value", get(CRITIC + "cliprange_value"))
        algo["value_clip"] = None if clip_v == math.inf else clip_v  # inf: no value clipping
        critic_agg = get(CRITIC + "loss_agg_mode")
        if critic_agg is not None and critic_agg != get(A + "loss_agg_mode"):
            raise UnsupportedSetting(CRITIC + "loss_agg_mode", critic_agg, f"differs from {A}loss_agg_mode: grpo_ref "
                                     "aggregates the value loss with the actor's mode")
        notes.append("verl trains the critic with its own optimizer (critic.optim) on its own loss; grpo_ref's "
                     "vf_coef weights the value loss in one sum and has no verl field")
        if given(CRITIC + "optim.lr"):
            train["critic_lr"] = _number(CRITIC + "optim.lr", get(CRITIC + "optim.lr"))

    # -- DAPO: dynamic sampling, overlong shaping
    if _flag(ALG + "filter_groups.enable", get(ALG + "filter_groups.enable")):
        algo["filter_groups"] = True
        metric = get(ALG + "filter_groups.metric")
        if metric not in (None, "score", "seq_final_reward", "seq_reward", "reward", "acc"):
            raise UnsupportedSetting(ALG + "filter_groups.metric", metric, "grpo_ref filters groups on the task score")
        rounds = get(ALG + "filter_groups.max_num_gen_batches")
        if rounds is not None and _integer(ALG + "filter_groups.max_num_gen_batches", rounds) > 0:
            train["filter_rounds"] = int(rounds)
    max_len = get("data.max_response_length")
    for root in _OVERLONG_ROOTS:
        if not given(root + "enable") and not given(root + "len"):
            continue
        if not _flag(root + "enable", get(root + "enable") or False):
            continue
        length = _integer(root + "len", get(root + "len"))
        factor = get(root + "penalty_factor")
        factor = 1.0 if factor is None else _number(root + "penalty_factor", factor)
        if factor != 1.0:
            raise UnsupportedSetting(root + "penalty_factor", factor, "grpo_ref's overlong penalty ends at -1 "
                                     "(penalty_factor 1.0)")
        resp = get(root.rsplit("overlong_buffer", 1)[0] + "max_resp_len") if "reward_kwargs" in root else None
        resp = resp if resp is not None else max_len
        if resp is None:
            raise ValueError(f"{root}enable=true needs data.max_response_length (verl's max_resp_len)")
        algo["overlong_buffer"] = length
        algo["max_response_length"] = _integer("data.max_response_length", resp)
        break

    # -- training loop
    if not _flag(R + "do_sample", get(R + "do_sample")):
        raise UnsupportedSetting(R + "do_sample", False, "greedy rollouts have no grpo_ref equivalent")
    train["ppo_epochs"] = _integer(A + "ppo_epochs", get(A + "ppo_epochs"))
    train["temperature"] = _number(R + "temperature", get(R + "temperature"))
    train["top_p"] = _number(R + "top_p", get(R + "top_p"))
    top_k = _integer(R + "top_k", get(R + "top_k"))
    train["top_k"] = 0 if top_k <= 0 else top_k
    if max_len is not None:
        train["max_new_tokens"] = _integer("data.max_response_length", max_len)
    elif given(R + "response_length") and isinstance(get(R + "response_length"), int):
        train["max_new_tokens"] = get(R + "response_length")
    if given("data.train_batch_size"):
        prompts = _integer("data.train_batch_size", get("data.train_batch_size"))
        mini = _integer(A + "ppo_mini_batch_size", get(A + "ppo_mini_batch_size"))
        train["prompts_per_step"] = prompts
        if mini <= 0 or prompts % mini:
            raise ValueError(f"data.train_batch_size ({prompts}) must be a multiple of {A}ppo_mini_batch_size ({mini})")
        train["minibatches"] = prompts // mini
    for key, name in ((A + "optim.lr", "lr"), (A + "optim.clip_grad", "max_grad_norm"),
                      (A + "optim.weight_decay", "weight_decay")):
        if given(key):
            train[name] = _number(key, get(key))

    try:
        cfg = AlgoConfig(**algo)
    except TypeError as e:  # a field this grpo_ref version does not have
        raise UnsupportedSetting(str(e).rsplit(" ", 1)[-1].strip("'"), None,
                                 "this grpo_ref version has no such AlgoConfig field") from e
    return Translation(algo=cfg, train=train, notes=notes)


# -- writing ---------------------------------------------------------------------------------------------------------
def _refuse(cfg: AlgoConfig, field: str, reason: str) -> None:
    raise UnsupportedSetting(field, getattr(cfg, field, None), reason)


def to_verl(cfg: AlgoConfig, train: Optional[dict] = None) -> Dict[str, Any]:
    """Write ``cfg`` (and optional training-loop settings) as verl 0.9.1 flat dotted keys (Hydra overrides).

    Args:
        cfg: an :class:`~grpo_ref.algorithms.AlgoConfig`.
        train: optional :class:`~grpo_ref.trainer.TrainConfig`-like keys (``group_size``, ``ppo_epochs``,
            ``minibatches`` with ``prompts_per_step``, ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``,
            ``lr``, ``critic_lr``, ``max_grad_norm``, ``weight_decay``, ``filter_rounds``); others are refused.

    Returns:
        ``{"algorithm.adv_estimator": "grpo", "actor_rollout_ref.actor.clip_ratio_low": 0.2, ...}`` with Python
        values; :func:`from_verl` reads it back to ``cfg`` (its ``name`` aside), except that ``kl_estimator='k3'``
        (``'k3+'``) with ``kl_coef > 0`` comes back as ``'low_var_kl'`` (``'low_var_kl+'``): verl has no k3
        without the value clamp at 10. With ``kl_coef == 0`` the estimator is not written (it changes no loss)
        and comes back as grpo_ref's default.
        ``dual_clip=None`` is written ``clip_ratio_c=inf``. grpo_ref's ``vf_coef`` has no verl field (verl's
        critic has its own optimizer) and is not written.

    Raises:
        UnsupportedSetting: fields verl cannot express (naming the grpo_ref field): ``adv_scale='batch'``,
            ``adv_eps`` other than 1e-6 (grpo), ``whiten_advantages`` other than verl's (True for gae only),
            ``dual_clip`` with a sequence ratio or another objective, ``ratio_level='sequence'`` with
            cispo/sapo, sapo with a ``loss_agg_mode`` other than seq-mean-token-mean, ``ent_agg_mode`` other than
            ``loss_agg_mode`` (outside sapo without KL), ``kl_ratio_weighted``, ``global_token_norm``,
            ``unscorable='zero_advantage'``, ``kl_estimator='k2'`` with straight-through names that verl lacks.
        ValueError: ``cfg`` not an AlgoConfig, an unknown ``train`` key.
    """
    if not isinstance(cfg, AlgoConfig):
        raise ValueError(f"cfg must be an AlgoConfig, got {type(cfg).__name__}")
    out: Dict[str, Any] = {}
    objective = getattr(cfg, "pg_objective", "clip")
    rev = {"grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_plus_plus",
           "reinforce_pp_baseline": "reinforce_plus_plus_baseline", "gae": "gae"}
    if cfg.adv_estimator not in rev:
        _refuse(cfg, "adv_estimator", "verl 0.9.1's AdvantageEstimator has no process-supervision estimator")
    out[ALG + "adv_estimator"] = rev[cfg.adv_estimator]
    if cfg.adv_estimator == "grpo":
        if cfg.adv_scale == "batch":
            _refuse(cfg, "adv_scale", "verl's grpo divides by the group's std or not at all (norm_adv_by_std_in_grpo)")
        if cfg.adv_scale == "group" and cfg.adv_eps != _GRPO_EPS:
            _refuse(cfg, "adv_eps", f"verl's trainer uses compute_grpo_outcome_advantage's epsilon {_GRPO_EPS}")
        out[ALG + "norm_adv_by_std_in_grpo"] = cfg.adv_scale == "group"
    if cfg.whiten_advantages != (cfg.adv_estimator == "gae"):
        _refuse(cfg, "whiten_advantages", "verl whitens gae advantages always and other estimators' never "
                "(reinforce_plus_plus whiten inside the estimator)")
    if cfg.loss_fn == "ppo" and cfg.adv_estimator != "gae":
        _refuse(cfg, "loss_fn", "verl trains a critic only with adv_estimator='gae'")
    out[ALG + "gamma"] = cfg.gamma
    out[ALG + "lam"] = cfg.lam
    out[R + "n"] = cfg.group_size

    if cfg.ratio_level == "sequence":
        if objective != "clip":
            _refuse(cfg, "ratio_level", f"verl's {objective} uses the token ratio")
        mode = "gspo"
    else:
        mode = {"clip": "vanilla", "cispo": "cispo", "sapo": "sapo"}[objective]
    out[A + "policy_loss.loss_mode"] = mode
    if mode == "vanilla":
        out[A + "clip_ratio_c"] = math.inf if cfg.dual_clip is None else cfg.dual_clip
    elif cfg.dual_clip is not None:
        _refuse(cfg, "dual_clip", f"verl's {mode} loss has no dual clip")
    out[A + "clip_ratio_low"] = cfg.eps_low  # written for every objective (sapo reads neither pair)
    out[A + "clip_ratio_high"] = cfg.eps_high
    out[A + "tau_pos"] = cfg.sapo_tau_pos
    out[A + "tau_neg"] = cfg.sapo_tau_neg

    agg = cfg.loss_agg_mode
    ent_agg = getattr(cfg, "ent_agg_mode", None)
    kl_loss = cfg.kl_placement == "loss" and cfg.kl_coef > 0
    if objective == "sapo" and agg != "seq-mean-token-mean":
        _refuse(cfg, "loss_agg_mode", "verl's sapo always aggregates seq-mean-token-mean")
    if ent_agg is not None and ent_agg != agg:
        if not (objective == "sapo" and not kl_loss):
            _refuse(cfg, "ent_agg_mode", "verl aggregates the entropy bonus with loss_agg_mode")
        agg = ent_agg  # sapo: the policy term ignores loss_agg_mode, the entropy term reads it
    out[A + "loss_agg_mode"] = agg
    if cfg.norm_length is not None:
        out[A + "loss_scale_factor"] = cfg.norm_length
    if getattr(cfg, "global_token_norm", False):
        _refuse(cfg, "global_token_norm", "verl's token-mean divides by the mini-batch's own token count")
    if getattr(cfg, "kl_ratio_weighted", False):
        _refuse(cfg, "kl_ratio_weighted", "verl's KL loss is not weighted by the importance ratio")
    if getattr(cfg, "unscorable", "refuse") != "refuse":
        _refuse(cfg, "unscorable", "verl's reward managers give every response a score")
    out[A + "entropy_coeff"] = cfg.ent_coef

    kl_name = _KL_BACK.get(cfg.kl_estimator)
    if kl_name is None:
        _refuse(cfg, "kl_estimator", f"no verl kl_penalty name; verl has {sorted(_KL)}")
    if cfg.kl_placement == "loss":
        out[A + "use_kl_loss"] = cfg.kl_coef > 0
        out[ALG + "use_kl_in_reward"] = False
        if cfg.kl_coef > 0:
            out[A + "kl_loss_coef"] = cfg.kl_coef
            out[A + "kl_loss_type"] = kl_name
    else:
        out[A + "use_kl_loss"] = False
        out[ALG + "use_kl_in_reward"] = True
        out[ALG + "kl_ctrl.type"] = "fixed"
        out[ALG + "kl_ctrl.kl_coef"] = cfg.kl_coef
        if cfg.kl_coef > 0:
            out[ALG + "kl_penalty"] = kl_name

    if cfg.loss_fn == "ppo":
        out[CRITIC + "cliprange_value"] = math.inf if cfg.value_clip is None else cfg.value_clip
        out[CRITIC + "loss_agg_mode"] = agg
    out[ALG + "filter_groups.enable"] = cfg.filter_groups
    if cfg.max_response_length is not None:
        out["data.max_response_length"] = cfg.max_response_length
    if cfg.overlong_buffer is not None:
        out["reward_model.overlong_buffer.enable"] = True
        out["reward_model.overlong_buffer.len"] = cfg.overlong_buffer
        out["reward_model.overlong_buffer.penalty_factor"] = 1.0

    train = dict(train or {})
    simple = {"ppo_epochs": A + "ppo_epochs", "temperature": R + "temperature", "top_p": R + "top_p",
              "lr": A + "optim.lr", "critic_lr": CRITIC + "optim.lr", "max_grad_norm": A + "optim.clip_grad",
              "weight_decay": A + "optim.weight_decay", "filter_rounds": ALG + "filter_groups.max_num_gen_batches",
              "prompts_per_step": "data.train_batch_size", "max_new_tokens": "data.max_response_length"}
    for name, value in train.items():
        if name in simple:
            out[simple[name]] = value
        elif name == "top_k":
            out[R + "top_k"] = -1 if not value else value
        elif name == "group_size":
            if value != cfg.group_size:
                raise ValueError(f"train['group_size']={value!r} differs from cfg.group_size={cfg.group_size}")
        elif name == "minibatches":
            prompts = train.get("prompts_per_step")
            if prompts is None or prompts % value:
                raise ValueError(f"train['minibatches']={value!r} needs train['prompts_per_step'], a multiple of it")
            out[A + "ppo_mini_batch_size"] = prompts // value
        elif name == "min_p" and value == 0.0:
            continue
        else:
            raise ValueError(f"train[{name!r}] has no verl 0.9.1 equivalent (or is not a training-loop setting)")
    if "data.max_response_length" in out and cfg.max_response_length is not None and \
            out["data.max_response_length"] != cfg.max_response_length:
        raise ValueError(f"train['max_new_tokens'] differs from cfg.max_response_length={cfg.max_response_length}")
    return out

