"""TRL 1.16.0 ``GRPOConfig`` <-> grpo_ref: :func:`from_trl`, :func:`to_trl` and the field table ``FIELDS``.

Read against TRL 1.16.0: ``trl/trainer/grpo_config.py`` (every field and its default, ``GRPOConfig.__post_init__``
for ``steps_per_generation`` / ``generation_batch_size``) and ``trl/trainer/grpo_trainer.py``
(``GRPOTrainer._compute_loss`` for the loss, ``GRPOTrainer._generate_and_score_completions`` for the advantages,
``GRPOTrainer._prepare_inputs`` for the update schedule, ``SyncRefModelCallback`` in ``trl/trainer/callbacks.py``
for the reference sync). Nothing here imports TRL: a config is read duck-typed (a dict of ``GRPOConfig`` keyword
arguments, or any object with those attributes, e.g. a ``GRPOConfig``); a key missing from a dict takes TRL 1.16.0's
default (``TRL_DEFAULTS``; note ``loss_type="dapo"``, ``beta=0.0``, ``use_bias_correction_kl=True``).

How TRL's update schedule maps to grpo_ref's (one process; TRL splits the same batch across processes):

* a generation batch holds ``generation_batch_size = per_device_train_batch_size * steps_per_generation``
  completions, ``generation_batch_size / num_generations`` prompts (grpo_ref ``prompts_per_step``);
* it is shuffled and split into ``steps_per_generation`` micro-batches, replayed ``num_iterations`` times
  (grpo_ref ``ppo_epochs``); an optimizer step accumulates ``gradient_accumulation_steps`` micro-batches, so there
  are ``steps_per_generation / gradient_accumulation_steps`` optimizer steps per pass (grpo_ref ``minibatches``).
  A schedule where that ratio is not a whole number is refused;
* micro-batch losses are divided by ``gradient_accumulation_steps`` and summed, so for ``grpo``, ``sapo``,
  ``dr_grpo``, ``luspo``, ``dapo`` and ``cispo`` the step's gradient is the one of grpo_ref's loss on the whole
  minibatch (equal micro-batch sizes). ``bnpo`` and the entropy bonus take a token mean per micro-batch: exact when
  ``gradient_accumulation_steps == 1``, otherwise a note says so.

Differences that remain (listed in ``Translation.notes``): grpo_ref clamps the log-ratio ``lp - old`` and the KL's
``ref - lp`` to ``+-20`` before ``exp``, TRL does not (equal wherever ``|log-ratio| <= 20``); TRL's ``bnpo`` and
entropy bonus under gradient accumulation (above). TRL's advantage epsilon is fixed at 1e-4 (``adv_eps``), and TRL
gives a completion that every reward function scored None advantage 0 (``unscorable="zero_advantage"``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

from ..algorithms import AlgoConfig
from ._common import FieldMapping, Translation, UnsupportedSetting, check_statuses, get_setting

__all__ = ["FIELDS", "TRL_DEFAULTS", "from_trl", "to_trl"]

TRL_VERSION = "1.16.0"
#: TRL's advantage epsilon, ``(r - mean) / (std + 1e-4)`` in ``GRPOTrainer._generate_and_score_completions``.
TRL_ADV_EPS = 1e-4

#: TRL 1.16.0 ``GRPOConfig`` defaults of the fields the translator reads (``TrainingArguments`` ones included).
#:
#: :meta hide-value:
TRL_DEFAULTS: Dict[str, Any] = {
    "loss_type": "dapo",
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": None,
    "delta": None,
    "importance_sampling_level": "token",
    "scale_rewards": "group",
    "use_bias_correction_kl": True,
    "num_generations": 8,
    "num_iterations": 1,
    "steps_per_generation": None,
    "generation_batch_size": None,
    "gradient_accumulation_steps": 1,
    "per_device_train_batch_size": 8,
    "max_completion_length": 512,
    "mask_truncated_completions": False,
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "entropy_coef_min": 0.0,
    "entropy_coef_max": 1.0,
    "entropy_coef_delta": 0.005,
    "entropy_target": 0.2,
    "off_policy_mask_threshold": None,
    "use_vllm": False,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_max": 3.0,
    "vllm_importance_sampling_clip_min": None,
    "vllm_importance_sampling_cap": None,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "generation_kwargs": None,
    "sync_ref_model": False,
    "ref_model_mixup_alpha": 0.6,
    "ref_model_sync_steps": 512,
    "reward_weights": None,
    "multi_objective_aggregation": "sum_then_normalize",
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "router_aux_loss_coef": None,
    "vllm_structured_outputs_regex": None,
    "disable_dropout": False,
    "learning_rate": 1e-6,
    "weight_decay": 0.0,
}

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")

_F = FieldMapping
#: One row per loss-relevant ``GRPOConfig`` field (``loss_type`` one row per value), next to grpo_ref's; the
#: page "Check your TRL or verl configuration" prints them as a list.
#:
#: :meta hide-value:
FIELDS: List[FieldMapping] = [
    _F("loss_type=grpo", "pg_objective='clip', loss_agg_mode='seq-mean-token-mean'", "mapped",
       "per-sequence token mean, then the mean over sequences"),
    _F("loss_type=bnpo", "pg_objective='clip', loss_agg_mode='token-mean'", "mapped",
       "token mean of each micro-batch (per_device_train_batch_size); equal to grpo_ref's minibatch token mean when "
       "gradient_accumulation_steps == 1 (a note otherwise)"),
    _F("loss_type=dr_grpo", "loss_agg_mode='seq-mean-token-sum-norm', norm_length=max_completion_length", "mapped",
       "token sums divided by B * max_completion_length"),
    _F("loss_type=dapo", "loss_agg_mode='token-mean', global_token_norm=True", "mapped",
       "token sum divided by num_items_in_batch * gradient_accumulation_steps / steps_per_generation = the generation "
       "batch's token count / minibatches (LossInputs.num_tokens)"),
    _F("loss_type=luspo", "loss_agg_mode='seq-mean-token-sum'", "mapped", "per-sequence token sum, mean over sequences"),
    _F("loss_type=cispo", "pg_objective='cispo', eps_low=1.0, eps_high=epsilon_high - 1, token-mean, "
       "global_token_norm=True", "mapped",
       "-sg(min(r, epsilon_high)) * A * logp with dapo's normaliser; epsilon and delta are not read"),
    _F("loss_type=sapo", "pg_objective='sapo', loss_agg_mode='seq-mean-token-mean'", "mapped",
       "-(4 / tau) sigmoid(tau (r - 1)) A; epsilon, epsilon_high and delta are not read"),
    _F("loss_type=vespo", "-", "refused", "gamma-weighted sequence IS (VESPO) has no grpo_ref equivalent"),
    _F("beta", "kl_coef (kl_estimator='k3', kl_placement='loss')", "exact",
       "TRL's k3 has no clamp; grpo_ref clamps ref - lp to +-20 (exact within)"),
    _F("use_bias_correction_kl", "kl_ratio_weighted", "exact", "TRL's default is True: the KL is multiplied by r"),
    _F("epsilon", "eps_low", "exact", ""),
    _F("epsilon_high", "eps_high", "exact", "None means epsilon"),
    _F("delta", "eps_high = min(eps_high, delta - 1), dual_clip = max(delta, 1 + eps_high)", "mapped",
       "two-sided GRPO: min(r, delta) in the unclipped term; delta <= 1 is refused"),
    _F("importance_sampling_level", "ratio_level", "exact", "'token' or 'sequence' (GSPO)"),
    _F("scale_rewards", "adv_scale (adv_eps=1e-4)", "exact", "True = 'group', False = 'none'"),
    _F("reward_weights", "train['reward_weights'] (combine_rewards weights)", "exact", "None = all ones"),
    _F("multi_objective_aggregation", "train['reward_aggregation'] (combine_rewards aggregation)", "exact",
       "'sum_then_normalize' or 'normalize_then_sum'"),
    _F("sapo_temperature_pos", "sapo_tau_pos", "exact", ""),
    _F("sapo_temperature_neg", "sapo_tau_neg", "exact", ""),
    _F("entropy_coef", "ent_coef, ent_agg_mode='token-mean'", "mapped",
       "token mean of each micro-batch (a note when gradient_accumulation_steps > 1)"),
    _F("num_generations", "group_size", "exact", ""),
    _F("num_iterations", "train['ppo_epochs']", "exact", "passes over each generation batch"),
    _F("steps_per_generation", "train['minibatches'] = steps_per_generation / gradient_accumulation_steps", "mapped",
       "None = gradient_accumulation_steps"),
    _F("gradient_accumulation_steps", "train['minibatches'] (see steps_per_generation)", "mapped",
       "micro-batches per optimizer step"),
    _F("per_device_train_batch_size", "train['prompts_per_step'] = per_device_train_batch_size * "
       "steps_per_generation / num_generations", "mapped", "one process"),
    _F("generation_batch_size", "train['prompts_per_step'] = generation_batch_size / num_generations", "mapped",
       "None = per_device_train_batch_size * steps_per_generation"),
    _F("max_completion_length", "train['max_new_tokens']", "exact", "also dr_grpo's norm_length"),
    _F("mask_truncated_completions", "train['truncation'] = 'mask' / 'keep'", "mapped",
       "truncated completions leave the loss mask but still count in the batch"),
    _F("temperature", "train['temperature']", "exact", "also divides the logits of the training log-probs"),
    _F("top_p", "train['top_p']", "exact", ""),
    _F("top_k", "train['top_k']", "exact", "0 = off"),
    _F("min_p", "train['min_p']", "exact", "None = 0.0 (off)"),
    _F("repetition_penalty", "-", "refused", "grpo_ref's sampler has no repetition penalty (1.0 accepted)"),
    _F("generation_kwargs", "-", "refused", "arbitrary generate() overrides (None or {} accepted)"),
    _F("sync_ref_model", "train['ref_sync_every'] (0 = never)", "mapped", "TR-DPO reference sync"),
    _F("ref_model_sync_steps", "train['ref_sync_every']", "exact", "optimizer steps between syncs"),
    _F("ref_model_mixup_alpha", "train['ref_sync_alpha']", "exact", "ref = alpha * policy + (1 - alpha) * ref"),
    _F("learning_rate", "train['lr']", "exact", "the optimizer's other settings (schedule, warm-up, Adam "
       "constants, max_grad_norm) are not translated"),
    _F("weight_decay", "train['weight_decay']", "exact", ""),
    _F("top_entropy_quantile", "-", "refused", "entropy-masked policy gradient (1.0 accepted)"),
    _F("off_policy_mask_threshold", "-", "refused", "DeepSeek-V3.2 off-policy sequence mask (None accepted)"),
    _F("use_adaptive_entropy", "-", "refused", "adaptive entropy coefficient (False accepted)"),
    _F("entropy_coef_min", "-", "refused", "read only by the adaptive entropy controller (default accepted)"),
    _F("entropy_coef_max", "-", "refused", "read only by the adaptive entropy controller (default accepted)"),
    _F("entropy_coef_delta", "-", "refused", "read only by the adaptive entropy controller (default accepted)"),
    _F("entropy_target", "-", "refused", "read only by the adaptive entropy controller (default accepted)"),
    _F("vllm_importance_sampling_correction", "-", "refused",
       "vLLM/trainer mismatch correction; refused when use_vllm=True (True is TRL's default, harmless without vLLM)"),
    _F("vllm_importance_sampling_mode", "-", "refused", "read only by the vLLM correction (default accepted)"),
    _F("vllm_importance_sampling_clip_max", "-", "refused", "read only by the vLLM correction (default accepted)"),
    _F("vllm_importance_sampling_clip_min", "-", "refused", "read only by the vLLM correction (default accepted)"),
    _F("vllm_importance_sampling_cap", "-", "refused", "deprecated alias of clip_max (None accepted)"),
    _F("vespo_k_pos", "-", "refused", "read only by loss_type='vespo' (default accepted)"),
    _F("vespo_lambda_pos", "-", "refused", "read only by loss_type='vespo' (default accepted)"),
    _F("vespo_k_neg", "-", "refused", "read only by loss_type='vespo' (default accepted)"),
    _F("vespo_lambda_neg", "-", "refused", "read only by loss_type='vespo' (default accepted)"),
    _F("router_aux_loss_coef", "-", "refused", "MoE load-balancing loss (None or 0 accepted)"),
    _F("vllm_structured_outputs_regex", "-", "refused", "constrained decoding (None accepted)"),
    _F("use_vllm", "-", "ignored", "generation backend; its importance-sampling correction is refused"),
    _F("disable_dropout", "-", "ignored", "grpo_ref evaluates the policy without dropout (TRL's True); a note when "
       "False: equal for models without dropout"),
    _F("use_liger_kernel", "-", "ignored", "layer kernels only (TRL 1.16.0 turns off Liger's fused cross-entropy)"),
    _F("cache_implementation", "-", "ignored", "KV-cache layout of generate()"),
    _F("chat_template_kwargs", "-", "ignored", "prompt formatting"),
    _F("shuffle_dataset", "-", "ignored", "prompt order"),
    _F("num_generations_eval", "-", "ignored", "evaluation only"),
    _F("cast_lm_head_to_fp32", "-", "ignored", "numerics of the LM head"),
    _F("pad_to_multiple_of", "-", "ignored", "padding; no loss depends on the padded length (dr_grpo uses "
       "max_completion_length)"),
]
check_statuses(FIELDS, "TRL")

# fields refused when they differ from the value here (None and {} both accepted for generation_kwargs)
_REFUSED_UNLESS_DEFAULT = {
    "top_entropy_quantile": (1.0, "the entropy-masked policy gradient (top-entropy tokens only) has no grpo_ref equivalent"),
    "off_policy_mask_threshold": (None, "the off-policy sequence mask has no grpo_ref equivalent"),
    "use_adaptive_entropy": (False, "the adaptive entropy coefficient has no grpo_ref equivalent"),
    "entropy_coef_min": (0.0, "read only by the adaptive entropy controller, which grpo_ref does not have"),
    "entropy_coef_max": (1.0, "read only by the adaptive entropy controller, which grpo_ref does not have"),
    "entropy_coef_delta": (0.005, "read only by the adaptive entropy controller, which grpo_ref does not have"),
    "entropy_target": (0.2, "read only by the adaptive entropy controller, which grpo_ref does not have"),
    "vllm_importance_sampling_mode": ("sequence_mask", "read only by the vLLM importance-sampling correction, which grpo_ref does not have"),
    "vllm_importance_sampling_clip_max": (3.0, "read only by the vLLM importance-sampling correction, which grpo_ref does not have"),
    "vllm_importance_sampling_clip_min": (None, "read only by the vLLM importance-sampling correction, which grpo_ref does not have"),
    "vllm_importance_sampling_cap": (None, "read only by the vLLM importance-sampling correction, which grpo_ref does not have"),
    "vespo_k_pos": (2.0, "read only by loss_type='vespo', which has no grpo_ref equivalent"),
    "vespo_lambda_pos": (3.0, "read only by loss_type='vespo', which has no grpo_ref equivalent"),
    "vespo_k_neg": (3.0, "read only by loss_type='vespo', which has no grpo_ref equivalent"),
    "vespo_lambda_neg": (2.0, "read only by loss_type='vespo', which has no grpo_ref equivalent"),
    "repetition_penalty": (1.0, "grpo_ref's sampler has no repetition penalty"),
    "vllm_structured_outputs_regex": (None, "grpo_ref's sampler has no constrained decoding"),
}


def _get(config: Any, name: str) -> Any:
    """``config``'s value of ``name``; TRL's default when a dict lacks the key or holds None."""
    return get_setting(config, name, TRL_DEFAULTS.get(name))


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def _real(name: str, x: Any, *, lo: Optional[float] = None, lo_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
    x = float(x)
    if lo is not None and not (x > lo if lo_open else x >= lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {x!r}")
    return x


def _int(name: str, x: Any, lo: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")
    return x


def _choice(name: str, x: Any, choices) -> Any:
    if x not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {x!r}")
    return x


# -- TRL -> grpo_ref ---------------------------------------------------------------------------------------------
def from_trl(config: Any) -> Translation:
    """Translate a TRL 1.16.0 ``GRPOConfig`` (object or dict of its keyword arguments) to grpo_ref.

    Returns a :class:`~grpo_ref.compat.Translation`: ``algo`` an :class:`~grpo_ref.algorithms.AlgoConfig` whose
    :func:`~grpo_ref.algorithms.compute_loss` and :func:`~grpo_ref.algorithms.compute_advantages` (or
    :func:`~grpo_ref.advantages.combine_rewards` for several reward functions) give TRL's loss and advantages;
    ``train`` the loop settings (``group_size``, ``ppo_epochs``, ``minibatches``, ``prompts_per_step``,
    ``max_new_tokens``, ``truncation``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``ref_sync_every``,
    ``ref_sync_alpha``, ``lr``, ``weight_decay``; and for :func:`~grpo_ref.advantages.combine_rewards`:
    ``reward_weights``, ``reward_aggregation``, ``reward_scale``); ``notes`` the differences that remain. The row of ``FIELDS`` for each field says how it maps.

    Raises :class:`~grpo_ref.compat.UnsupportedSetting` (a ``ValueError``) naming the field for a setting with no
    grpo_ref equivalent (``loss_type="vespo"``, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, the
    adaptive entropy, the vLLM importance-sampling correction, ``repetition_penalty != 1``, ...), and ``ValueError``
    naming the field for a value TRL itself would not accept (an unknown ``loss_type``, ``num_generations < 2``, ...).
    """
    g = lambda name: _get(config, name)  # noqa: E731
    notes: List[str] = []

    for name, (default, reason) in _REFUSED_UNLESS_DEFAULT.items():
        value = g(name)
        if not _same(value, default):
            raise UnsupportedSetting(name, value, reason)
    gen_kwargs = g("generation_kwargs")
    if gen_kwargs:
        raise UnsupportedSetting("generation_kwargs", gen_kwargs, "arbitrary generate() overrides are not translated")
    aux = g("router_aux_loss_coef")
    if aux not in (None, 0, 0.0):
        raise UnsupportedSetting("router_aux_loss_coef", aux, "the MoE load-balancing loss has no grpo_ref equivalent")
    if g("use_vllm"):
        if g("vllm_importance_sampling_correction"):
            raise UnsupportedSetting("vllm_importance_sampling_correction", True,
                                     "the vLLM/trainer importance-sampling correction has no grpo_ref equivalent "
                                     "(set it False to translate a vLLM run)")
        notes.append("use_vllm=True: completions are sampled by vLLM, grpo_ref samples with its own model")

    if not g("disable_dropout"):
        notes.append("disable_dropout=False: TRL computes the log-probs with the model's dropout active (train mode); "
                     "grpo_ref without dropout (equal for models without dropout)")
    loss_type = _choice("loss_type", g("loss_type"), LOSS_TYPES)
    if loss_type == "vespo":
        raise UnsupportedSetting("loss_type", "vespo", "vespo has no grpo_ref equivalent")
    ratio_level = _choice("importance_sampling_level", g("importance_sampling_level"), ("token", "sequence"))
    scale = g("scale_rewards")
    scale = {True: "group", False: "none"}.get(scale, scale) if isinstance(scale, bool) else scale
    scale = _choice("scale_rewards", scale, ("group", "batch", "none"))
    eps_low = _real("epsilon", g("epsilon"))
    eps_high_raw = g("epsilon_high")
    eps_high = eps_low if eps_high_raw is None else _real("epsilon_high", eps_high_raw)
    delta = g("delta")
    beta = _real("beta", g("beta"), lo=0.0)
    ent = _real("entropy_coef", g("entropy_coef"), lo=0.0)
    bias_kl = g("use_bias_correction_kl")
    if not isinstance(bias_kl, bool):
        raise ValueError(f"use_bias_correction_kl must be a bool, got {bias_kl!r}")
    G = _int("num_generations", g("num_generations"), lo=2)
    max_len = _int("max_completion_length", g("max_completion_length"))

    algo: Dict[str, Any] = dict(
        name=f"trl_{loss_type}", loss_fn="grpo", adv_estimator="grpo", group_size=G, adv_scale=scale,
        adv_eps=TRL_ADV_EPS, ratio_level=ratio_level, kl_coef=beta, kl_estimator="k3", kl_placement="loss",
        kl_ratio_weighted=bias_kl, unscorable="zero_advantage",
    )
    clip_losses = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    if loss_type in clip_losses:
        algo.update(pg_objective="clip", loss_agg_mode={
            "grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
            "dapo": "token-mean", "luspo": "seq-mean-token-sum"}[loss_type])
        if not eps_low > 0.0:
            raise UnsupportedSetting("epsilon", eps_low, "grpo_ref's lower clip 1 - epsilon needs epsilon > 0")
        eps_low = min(eps_low, 1.0)  # a lower bound 1 - epsilon <= 0 never binds (r > 0): grpo_ref's eps_low = 1
        if not eps_high > 0.0:
            raise UnsupportedSetting("epsilon_high", eps_high, "grpo_ref's upper clip needs epsilon_high > 0")
        dual = None
        if delta is not None:
            delta = _real("delta", delta)
            if not delta > 1.0:
                raise UnsupportedSetting("delta", delta, "a cap of the ratio at delta <= 1 has no grpo_ref equivalent")
            # -min(min(r, delta) A, clip(r) A): for A > 0 the upper clip becomes min(1 + eps_high, delta); for A < 0
            # the loss is capped at -max(delta, 1 + eps_high) A (a dual clip)
            dual = max(delta, 1.0 + eps_high)
            eps_high = min(eps_high, delta - 1.0)
        algo.update(eps_low=eps_low, eps_high=eps_high, dual_clip=dual)
        if loss_type == "dr_grpo":
            algo["norm_length"] = max_len
        if loss_type == "dapo":
            algo["global_token_norm"] = True
    elif loss_type == "cispo":
        if not eps_high > 1.0:
            raise UnsupportedSetting("epsilon_high", eps_high_raw,
                                     "cispo clamps the ratio at epsilon_high (epsilon when None); grpo_ref needs "
                                     "epsilon_high > 1")
        algo.update(pg_objective="cispo", eps_low=1.0, eps_high=eps_high - 1.0, loss_agg_mode="token-mean",
                    global_token_norm=True)
        if delta is not None:
            notes.append("delta is not read under loss_type='cispo' (TRL 1.16.0), so it is not translated")
    else:  # sapo
        algo.update(pg_objective="sapo", loss_agg_mode="seq-mean-token-mean",
                    sapo_tau_pos=_real("sapo_temperature_pos", g("sapo_temperature_pos"), lo=0.0, lo_open=True),
                    sapo_tau_neg=_real("sapo_temperature_neg", g("sapo_temperature_neg"), lo=0.0, lo_open=True))
        if eps_low > 0 and eps_high > 0:  # not read by sapo's loss; kept for the round trip
            algo.update(eps_low=min(eps_low, 1.0), eps_high=eps_high)
        if delta is not None:
            notes.append("delta is not read under loss_type='sapo' (TRL 1.16.0), so it is not translated")
    if ent > 0:
        algo.update(ent_coef=ent, ent_agg_mode="token-mean")

    # -- the schedule (GRPOConfig.__post_init__, one process) -------------------------------------------------
    ga = _int("gradient_accumulation_steps", g("gradient_accumulation_steps"))
    pdbs = _int("per_device_train_batch_size", g("per_device_train_batch_size"))
    spg, gbs = g("steps_per_generation"), g("generation_batch_size")
    world = get_setting(config, "world_size", 1)
    world = world if isinstance(world, int) and not isinstance(world, bool) and world >= 1 else 1
    if spg is None and gbs is None:
        spg = ga
        gbs = pdbs * world * spg
    elif spg is None:
        gbs = _int("generation_batch_size", gbs)
        if gbs % (pdbs * world):
            raise ValueError(f"generation_batch_size ({gbs}) must be divisible by per_device_train_batch_size * "
                             f"processes ({pdbs * world})")
        spg = gbs // (pdbs * world)
    elif gbs is None:
        spg = _int("steps_per_generation", spg)
        gbs = pdbs * world * spg
    else:
        spg, gbs = _int("steps_per_generation", spg), _int("generation_batch_size", gbs)
        if gbs != pdbs * world * spg:  # a GRPOConfig object holds both, consistent; a dict may not
            raise ValueError("generation_batch_size and steps_per_generation can not both be set (TRL refuses it)")
    if spg % ga:
        raise UnsupportedSetting("steps_per_generation", spg,
                                 f"an optimizer step of gradient_accumulation_steps={ga} micro-batches must not span "
                                 f"two generation batches; grpo_ref needs steps_per_generation to be a multiple of it")
    if gbs % G:
        raise ValueError(f"generation_batch_size ({gbs}) must be divisible by num_generations ({G})")
    if ga > 1 and loss_type == "bnpo":
        notes.append(f"loss_type='bnpo' with gradient_accumulation_steps={ga}: TRL averages the token means of "
                     f"{ga} micro-batches of {pdbs}; grpo_ref takes one token mean over the minibatch (equal when "
                     f"the micro-batches hold equal token counts)")
    if ga > 1 and ent > 0:
        notes.append(f"entropy_coef with gradient_accumulation_steps={ga}: TRL averages per-micro-batch token means "
                     f"of the entropy; grpo_ref takes one token mean over the minibatch")
    notes.append("log-ratio clamp: grpo_ref clamps lp - old (and, for the KL, ref - lp) to +-20 before exp; TRL does "
                 "not (identical wherever |log-ratio| <= 20)")

    sync = g("sync_ref_model")
    weights = g("reward_weights")
    min_p = g("min_p")
    train: Dict[str, Any] = dict(
        group_size=G,
        prompts_per_step=gbs // G,
        ppo_epochs=_int("num_iterations", g("num_iterations")),
        minibatches=spg // ga,
        max_new_tokens=max_len,
        truncation="mask" if g("mask_truncated_completions") else "keep",
        temperature=_real("temperature", g("temperature"), lo=0.0, lo_open=True),
        top_p=_real("top_p", g("top_p"), lo=0.0, lo_open=True),
        top_k=_int("top_k", g("top_k"), lo=0),
        min_p=0.0 if min_p is None else _real("min_p", min_p, lo=0.0),
        ref_sync_every=_int("ref_model_sync_steps", g("ref_model_sync_steps")) if sync else 0,
        ref_sync_alpha=_real("ref_model_mixup_alpha", g("ref_model_mixup_alpha"), lo=0.0) if sync else 1.0,
        lr=_real("learning_rate", g("learning_rate"), lo=0.0),
        weight_decay=_real("weight_decay", g("weight_decay"), lo=0.0),
        reward_weights=None if weights is None else [float(w) for w in weights],
        reward_aggregation=_choice("multi_objective_aggregation", g("multi_objective_aggregation"),
                                   ("sum_then_normalize", "normalize_then_sum")),
    )
    # combine_rewards' scale: TRL's normalize_then_sum standardises the weighted sum over the batch whatever
    # scale_rewards says
    train["reward_scale"] = scale if train["reward_aggregation"] == "sum_then_normalize" else None
    if train["reward_aggregation"] == "normalize_then_sum":
        notes.append("multi_objective_aggregation='normalize_then_sum' (even with one reward function): TRL's "
                     "advantages are combine_rewards(..., aggregation='normalize_then_sum', scale=None), not "
                     "compute_advantages; scale_rewards is not read")
    return Translation(algo=_algo(algo), train=train, notes=notes)


_NEW_DEFAULTS = {"pg_objective": "clip", "kl_ratio_weighted": False, "unscorable": "refuse", "global_token_norm": False,
                 "ent_agg_mode": None, "sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05}


def _algo(kw: Dict[str, Any]) -> AlgoConfig:
    """``AlgoConfig(**kw)``, leaving out fields added in issue 9 that keep their default (so that translations that
    do not need them also build on an AlgoConfig without them)."""
    from dataclasses import fields

    known = {f.name for f in fields(AlgoConfig)}
    kw = {k: v for k, v in kw.items() if k in known or not (k in _NEW_DEFAULTS and _same(v, _NEW_DEFAULTS[k]))}
    return AlgoConfig(**kw)


# -- grpo_ref -> TRL ---------------------------------------------------------------------------------------------
_TRAIN_KEYS_IGNORED = ("reward_scale", "steps", "seed", "eval_every", "device", "use_cache", "algo", "algo_overrides", "critic_lr",
                       "filter_rounds", "warmup_steps", "max_grad_norm", "truncation_reward")


def to_trl(cfg: AlgoConfig, train: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``GRPOConfig`` keyword arguments (TRL 1.16.0) whose loss and advantages are ``cfg``'s.

    ``train``: optional loop settings, keys as in ``Translation.train`` (``prompts_per_step``, ``ppo_epochs``,
    ``minibatches``, ``max_new_tokens``, ``truncation``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``ref_sync_every``, ``ref_sync_alpha``, ``lr``, ``weight_decay``, ``reward_weights``, ``reward_aggregation``);
    loop-only keys (``steps``, ``seed``, ``eval_every``, ...) are skipped, any other key is refused. The schedule is
    written as ``gradient_accumulation_steps=1``, ``steps_per_generation=minibatches`` and
    ``per_device_train_batch_size = prompts_per_step * group_size / minibatches``. Every field is always written
    (TRL's defaults differ from grpo_ref's: ``loss_type="dapo"``, ``use_bias_correction_kl=True``).

    Raises :class:`~grpo_ref.compat.UnsupportedSetting` naming the ``AlgoConfig`` field (or ``train`` key) that TRL
    cannot express: a critic (``loss_fn="ppo"``), advantage estimators other than ``grpo``, whitening, the KL in the
    reward, KL estimators other than k3, ``token-sum`` aggregation, ``token-mean`` with a clip objective that is not
    dapo/bnpo, ``dual_clip < 1 + eps_high`` or a dual clip outside the clip objective, DAPO's ``filter_groups`` and
    overlong shaping, an entropy bonus not aggregated as a token mean, ``truncation="penalize"``.
    Warns (``UserWarning``) where TRL's value is fixed and differs: ``adv_eps`` (TRL 1e-4), ``norm_length=None``
    under ``seq-mean-token-sum-norm`` (TRL divides by ``max_completion_length``).
    """
    if not isinstance(cfg, AlgoConfig):
        raise ValueError(f"cfg must be an AlgoConfig, got {type(cfg).__name__}")
    train = dict(train or {})
    a = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731  (fields of issue 9 may be missing)

    def refuse(name: str, reason: str):
        raise UnsupportedSetting(name, getattr(cfg, name, train.get(name)), reason)

    if cfg.loss_fn != "grpo":
        refuse("loss_fn", "TRL's GRPOTrainer has no critic")
    if cfg.adv_estimator != "grpo":
        refuse("adv_estimator", "TRL's GRPOTrainer computes group-normalised (grpo) advantages only")
    if cfg.whiten_advantages:
        refuse("whiten_advantages", "TRL does not whiten advantages")
    if cfg.filter_groups:
        refuse("filter_groups", "TRL's GRPOTrainer has no dynamic sampling (DAPO filter_groups)")
    if cfg.overlong_buffer is not None:
        refuse("overlong_buffer", "TRL applies overlong shaping in a reward function, not in the trainer")
    kl_on = cfg.kl_coef > 0
    if kl_on and cfg.kl_placement != "loss":
        refuse("kl_placement", "TRL puts the KL in the loss only")
    if kl_on and cfg.kl_estimator != "k3":
        refuse("kl_estimator", "TRL's KL is k3")
    objective = a("pg_objective", "clip")
    mode = cfg.loss_agg_mode
    global_norm = bool(a("global_token_norm", False))
    out: Dict[str, Any] = {}
    if objective == "clip":
        if mode == "seq-mean-token-mean":
            loss_type = "grpo"
        elif mode == "token-mean":
            loss_type = "dapo" if global_norm else "bnpo"
        elif mode == "seq-mean-token-sum-norm":
            loss_type = "dr_grpo"
        elif mode == "seq-mean-token-sum":
            loss_type = "luspo"
        else:
            refuse("loss_agg_mode", f"no TRL loss_type aggregates as {mode!r}")
        out.update(epsilon=cfg.eps_low, epsilon_high=cfg.eps_high)
        if cfg.dual_clip is not None:
            if cfg.dual_clip < 1.0 + cfg.eps_high:
                refuse("dual_clip", "TRL's delta caps the ratio of both advantage signs; it equals a dual clip only "
                                    "for delta >= 1 + eps_high")
            out["delta"] = cfg.dual_clip
    elif objective == "cispo":
        if not (mode == "token-mean" and global_norm):
            refuse("loss_agg_mode", "TRL's cispo normalises by the batch's token count (token-mean, global_token_norm)")
        if cfg.eps_low != 1.0:
            refuse("eps_low", "TRL's cispo has no lower clip (eps_low=1.0)")
        if cfg.dual_clip is not None:
            refuse("dual_clip", "TRL's cispo has no dual clip")
        loss_type = "cispo"
        out["epsilon_high"] = 1.0 + cfg.eps_high
    elif objective == "sapo":
        if mode != "seq-mean-token-mean" or global_norm:
            refuse("loss_agg_mode", "TRL's sapo aggregates as seq-mean-token-mean")
        if cfg.dual_clip is not None:
            refuse("dual_clip", "TRL's sapo has no dual clip")
        loss_type = "sapo"
        out.update(sapo_temperature_pos=a("sapo_tau_pos"), sapo_temperature_neg=a("sapo_tau_neg"))
        out.update(epsilon=cfg.eps_low, epsilon_high=cfg.eps_high)  # not read by TRL's sapo; kept for the trip
    else:
        refuse("pg_objective", f"no TRL loss_type for {objective!r}")
    if mode == "seq-mean-token-sum-norm":
        max_len = train.get("max_new_tokens")
        if cfg.norm_length is None:
            warnings.warn("norm_length=None divides by the padded length T; TRL's dr_grpo divides by "
                          "max_completion_length (equal when batches are padded to it)", UserWarning, stacklevel=2)
        elif max_len is not None and cfg.norm_length != max_len:
            refuse("norm_length", f"TRL's dr_grpo divides by max_completion_length (max_new_tokens={max_len})")
        else:
            if float(cfg.norm_length) != int(cfg.norm_length):
                refuse("norm_length", "TRL's max_completion_length is an int")
            train.setdefault("max_new_tokens", int(cfg.norm_length))
    ent_mode = a("ent_agg_mode") or mode
    if cfg.ent_coef > 0:
        if ent_mode != "token-mean":
            refuse("ent_agg_mode", "TRL's entropy bonus is a token mean")
        if global_norm and a("ent_agg_mode") is None:
            refuse("ent_agg_mode", "TRL's entropy bonus is a per-batch token mean, not normalised by num_tokens")
    if cfg.adv_eps != TRL_ADV_EPS:
        warnings.warn(f"adv_eps={cfg.adv_eps:g}: TRL's advantage epsilon is fixed at {TRL_ADV_EPS:g}", UserWarning,
                      stacklevel=2)
    out.update(loss_type=loss_type, beta=float(cfg.kl_coef), importance_sampling_level=cfg.ratio_level,
               scale_rewards=cfg.adv_scale, use_bias_correction_kl=bool(a("kl_ratio_weighted", False)),
               entropy_coef=float(cfg.ent_coef), num_generations=cfg.group_size,
               disable_dropout=True)  # grpo_ref's sampler, pi_old and pi_theta run without dropout

    # -- the loop --------------------------------------------------------------------------------------------
    unknown = sorted(set(train) - set(_TRAIN_KEYS_IGNORED) - {
        "group_size", "prompts_per_step", "ppo_epochs", "minibatches", "max_new_tokens", "truncation", "temperature",
        "top_p", "top_k", "min_p", "ref_sync_every", "ref_sync_alpha", "lr", "weight_decay", "reward_weights",
        "reward_aggregation"})
    if unknown:
        raise UnsupportedSetting(unknown[0], train[unknown[0]], "not a training setting to_trl knows")
    if "group_size" in train and train["group_size"] != cfg.group_size:
        raise ValueError(f"train['group_size']={train['group_size']!r} differs from cfg.group_size={cfg.group_size}")
    agg = train.get("reward_aggregation", "sum_then_normalize")
    if train.get("reward_scale") not in ((None, "batch") if agg == "normalize_then_sum" else (None, cfg.adv_scale)):
        raise UnsupportedSetting("reward_scale", train["reward_scale"], f"TRL's scale under {agg!r} is "
                                 + ("the batch's" if agg == "normalize_then_sum" else "scale_rewards = adv_scale"))
    mb = int(train.get("minibatches", 1))
    out.update(gradient_accumulation_steps=1, steps_per_generation=mb)
    if "prompts_per_step" in train:
        n = int(train["prompts_per_step"]) * cfg.group_size
        if n % mb:
            raise UnsupportedSetting("minibatches", mb, f"TRL needs equal micro-batches: {n} completions per step "
                                                        f"do not split into {mb}")
        out["per_device_train_batch_size"] = n // mb
    simple = {"ppo_epochs": "num_iterations", "max_new_tokens": "max_completion_length", "temperature": "temperature",
              "top_p": "top_p", "top_k": "top_k", "lr": "learning_rate", "weight_decay": "weight_decay",
              "reward_weights": "reward_weights", "reward_aggregation": "multi_objective_aggregation"}
    for key, trl_key in simple.items():
        if key in train:
            out[trl_key] = train[key]
    if "min_p" in train:
        out["min_p"] = None if not train["min_p"] else train["min_p"]
    if "truncation" in train:
        if train["truncation"] not in ("keep", "mask"):
            raise UnsupportedSetting("truncation", train["truncation"], "TRL can mask truncated completions, not "
                                                                      "penalise them (use a reward function)")
        out["mask_truncated_completions"] = train["truncation"] == "mask"
    every = int(train.get("ref_sync_every", 0))
    if every:
        out.update(sync_ref_model=True, ref_model_sync_steps=every, ref_model_mixup_alpha=float(train.get("ref_sync_alpha", 1.0)))
    else:
        out["sync_ref_model"] = False
    return out
