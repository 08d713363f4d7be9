"""grpo_ref's loss inside TRL 1.16.0's ``GRPOTrainer``: TRL's engine (accelerate, DeepSpeed, FSDP, vLLM), our loss.

``grpo_ref_trainer_class()`` imports TRL and returns ``GRPORefTrainer``, a subclass of
``trl.GRPOTrainer`` that takes one extra keyword, ``algo`` (an :class:`~grpo_ref.algorithms.AlgoConfig`), and overrides
``GRPOTrainer._compute_loss`` (``trl/trainer/grpo_trainer.py``, TRL 1.16.0) so that the loss TRL back-propagates
is ``grpo_ref.compute_loss(LossInputs(logp, old_logp, advantages, mask, ref_logp, entropy), algo)``:

* ``logp`` ``[B, T]`` and ``entropy`` ``[B, T]``: TRL's own ``_get_per_token_logps_and_entropies`` on
  ``prompt_ids ++ completion_ids`` (the model's fused LM head, logits divided by ``GRPOConfig.temperature``,
  only the ``T = completion_ids.size(1)`` completion positions);
* ``old_logp``: ``inputs["old_per_token_logps"]``, which TRL only computes when the batch can be stale
  (``gradient_accumulation_steps`` not a multiple of ``steps_per_generation * num_iterations``); when it is
  absent the policy is the sampling policy and ``old_logp = logp.detach()`` (ratio 1), as TRL does;
* ``advantages`` ``[B]``: ``inputs["advantages"]``, TRL's group-normalised advantages (see below);
* ``mask`` ``[B, T]``: ``completion_mask`` (times ``tool_mask`` in tool-calling runs);
* ``ref_logp``: ``inputs["ref_per_token_logps"]`` (computed by TRL when ``GRPOConfig.beta != 0``).

What is grpo_ref's and what stays TRL's:

* grpo_ref: the whole per-minibatch loss: ratio level, clip range, dual clip, the surrogate (``pg_objective``),
  the KL estimator and coefficient, the aggregation, the entropy bonus.
* TRL: generation and sampling (temperature, top-p/k, vLLM), the reward functions, the advantages
  (``_generate_and_score_completions``: group mean, ``scale_rewards``, eps 1e-4, unscorable rows get 0),
  the reference model, the optimiser, gradient accumulation, multi-process data parallelism.

So the :class:`~grpo_ref.algorithms.AlgoConfig` fields of the advantages do not apply, and a value that would be silently
ignored is refused with a ``ValueError`` (see :func:`check_algo_for_trl`): ``loss_fn`` other than ``"grpo"`` (a
critic, which TRL's GRPOTrainer has not), ``adv_estimator`` other than ``"grpo"``, ``kl_placement="reward"``
with ``kl_coef > 0``, ``whiten_advantages``, ``overlong_buffer`` (write it as a TRL reward function),
``filter_groups`` (TRL has no dynamic sampling: use ``get_preset("dapo", filter_groups=False)``), and
``group_size`` / ``adv_scale`` / ``kl_coef`` that disagree with ``GRPOConfig.num_generations`` /
``scale_rewards`` / ``beta``, and ``ent_coef > 0`` with ``global_token_norm`` under gradient accumulation
(grpo_ref's entropy bonus is a per-minibatch mean, the policy term a global token mean: they need different
scalings). ``adv_eps`` (TRL uses 1e-4), ``gamma``, ``lam``, ``vf_coef``, ``value_clip`` and
``unscorable`` (TRL always zeroes an unscorable completion's advantage) do not apply and are not checked.
Conversely the ``GRPOConfig`` fields that only TRL's own loss reads (``TRL_LOSS_FIELDS``: ``loss_type``,
``epsilon``, ``epsilon_high``, ``delta``, ``importance_sampling_level``, ``use_bias_correction_kl``,
``entropy_coef``, ...) are not read by ``GRPORefTrainer``; one set to anything but TRL's default is refused, with
the :class:`~grpo_ref.algorithms.AlgoConfig` field to set instead. TRL's defaults are themselves a loss that differs
from grpo_ref's ``grpo`` preset: ``loss_type="dapo"`` with ``use_bias_correction_kl=True`` is
``get_preset("dapo", filter_groups=False, eps_high=0.2, global_token_norm=True, kl_ratio_weighted=True,
kl_coef=beta, group_size=num_generations)``.

Gradient accumulation, as TRL 1.16.0 does it (``GRPOTrainer.loss_is_scaled_for_ga = True``): a per-minibatch
normalisation (every ``loss_agg_mode``) is divided by ``current_gradient_accumulation_steps`` in training (1 in
evaluation). With ``algo.global_token_norm`` (TRL ``loss_type="dapo"``) the token sum is divided instead by
``num_items_in_batch / num_processes * current_gradient_accumulation_steps / steps_per_generation`` (given to
grpo_ref as ``LossInputs.num_tokens``) and not divided again. Under ``loss_agg_mode="seq-mean-token-sum-norm"``
with ``norm_length=None`` the trainer's ``algo`` gets ``norm_length = GRPOConfig.max_completion_length`` (TRL's
``dr_grpo`` constant): TRL pads each batch to its longest completion, so the padded length is not a constant.

Metrics: each of grpo_ref's loss metrics is logged through TRL's ``self._metrics`` as ``grpo_ref/<name>``
(mean over processes; ``*_min`` / ``*_max`` the min / max), plus ``grpo_ref/loss`` (before the accumulation
scaling).

Importing this module does not import TRL; calling :func:`grpo_ref_trainer_class` does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Optional

import torch

from ..algorithms import AlgoConfig, LossInputs, compute_loss

__all__ = ["TRL_LOSS_FIELDS", "check_algo_for_trl", "grpo_ref_trainer_class", "make_trainer"]

#: ``GRPOConfig`` fields (TRL 1.16.0) read only by ``GRPOTrainer._compute_loss``; ``GRPORefTrainer`` replaces that
#: method, so each must keep TRL's default. Value: what to set in :class:`~grpo_ref.algorithms.AlgoConfig` instead.
#:
#: :meta hide-value:
TRL_LOSS_FIELDS: Dict[str, str] = {
    "loss_type": "loss_agg_mode (and global_token_norm for TRL's 'dapo'), pg_objective for 'cispo'/'sapo'",
    "epsilon": "eps_low",
    "epsilon_high": "eps_high",
    "delta": "dual_clip (grpo_ref's dual clip caps negative-advantage tokens; TRL's delta is another cap)",
    "importance_sampling_level": "ratio_level",
    "use_bias_correction_kl": "kl_ratio_weighted",
    "sapo_temperature_pos": "sapo_tau_pos (with pg_objective='sapo')",
    "sapo_temperature_neg": "sapo_tau_neg (with pg_objective='sapo')",
    "vespo_k_pos": "nothing (VESPO has no grpo_ref equivalent)",
    "vespo_lambda_pos": "nothing (VESPO has no grpo_ref equivalent)",
    "vespo_k_neg": "nothing (VESPO has no grpo_ref equivalent)",
    "vespo_lambda_neg": "nothing (VESPO has no grpo_ref equivalent)",
    "top_entropy_quantile": "nothing (grpo_ref has no high-entropy token mask)",
    "off_policy_mask_threshold": "nothing (grpo_ref has no off-policy sequence mask)",
    "entropy_coef": "ent_coef",
    "use_adaptive_entropy": "nothing (grpo_ref's ent_coef is constant)",
}

# The keyword arguments of TRL 1.16.0's ``_get_per_token_logps_and_entropies`` that ``_compute_loss`` takes from
# ``inputs`` (multimodal models); passed through unchanged.
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def _defaults(args) -> Dict[str, Any]:
    """TRL's defaults of the ``TRL_LOSS_FIELDS`` that ``args``'s class declares."""
    if not dataclasses.is_dataclass(args):
        raise ValueError(f"args must be a trl.GRPOConfig, got {type(args).__name__}")
    out = {}
    for f in dataclasses.fields(args):  # an instance's fields are its class's
        if f.name not in TRL_LOSS_FIELDS:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _differs(value, default) -> bool:
    """NaN-safe: a NaN value differs from every default."""
    if isinstance(value, float) and math.isnan(value):
        return True
    return value != default


def check_algo_for_trl(algo: AlgoConfig, args) -> AlgoConfig:
    """Check that ``algo`` means the same thing inside TRL 1.16.0's ``GRPOTrainer`` configured by ``args``
    (a ``trl.GRPOConfig``); return the ``algo`` the trainer uses (``norm_length`` filled in, see the module
    docstring).

    Refused with a ``ValueError`` naming the field (``algo.<field>`` or ``args.<field>``) and its value: every
    setting that would silently not apply, listed in the module docstring."""
    if not isinstance(algo, AlgoConfig):
        raise ValueError(f"algo must be a grpo_ref.AlgoConfig, got {type(algo).__name__}")
    if algo.loss_fn != "grpo":
        raise ValueError(
            f"algo.loss_fn={algo.loss_fn!r} needs a critic (value model), which TRL's GRPOTrainer does not train; "
            f"GRPORefTrainer runs critic-free losses only (loss_fn='grpo')"
        )
    if algo.adv_estimator != "grpo":
        raise ValueError(
            f"algo.adv_estimator={algo.adv_estimator!r} would not apply: TRL computes the advantages (group "
            f"normalisation, GRPOConfig.scale_rewards); GRPORefTrainer replaces the loss only. Use "
            f"adv_estimator='grpo'"
        )
    if algo.kl_placement == "reward" and algo.kl_coef > 0:
        raise ValueError(
            f"algo.kl_placement='reward' (kl_coef={algo.kl_coef}) would not apply: TRL's rewards come from its "
            f"reward functions and carry no KL; use kl_placement='loss' (and GRPOConfig.beta = kl_coef)"
        )
    for name, hint in (
        ("whiten_advantages", "the advantages are TRL's"),
        ("filter_groups", "TRL has no dynamic sampling; for DAPO use get_preset('dapo', filter_groups=False)"),
    ):
        if getattr(algo, name):
            raise ValueError(f"algo.{name}=True would not apply: {hint}")
    if algo.overlong_buffer is not None:
        raise ValueError(
            f"algo.overlong_buffer={algo.overlong_buffer} would not apply: the scores are TRL's reward functions'; "
            f"write DAPO's overlong penalty as a reward function"
        )

    defaults = _defaults(args)
    for name, instead in TRL_LOSS_FIELDS.items():
        if name in defaults and hasattr(args, name) and _differs(getattr(args, name), defaults[name]):
            raise ValueError(
                f"args.{name}={getattr(args, name)!r} would not apply: GRPORefTrainer replaces TRL's loss with "
                f"grpo_ref's; leave it at TRL's default {defaults[name]!r} and set {instead} in algo"
            )
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        raise ValueError(
            "args.vllm_importance_sampling_correction=True would not apply: grpo_ref's loss has no vLLM "
            "importance-sampling correction; set it to False"
        )
    if args.num_generations != algo.group_size:
        raise ValueError(
            f"algo.group_size={algo.group_size} disagrees with args.num_generations={args.num_generations}: TRL's "
            f"num_generations sets the group; make them equal"
        )
    if getattr(args, "multi_objective_aggregation", "sum_then_normalize") == "sum_then_normalize":
        if args.scale_rewards != algo.adv_scale:
            raise ValueError(
                f"algo.adv_scale={algo.adv_scale!r} disagrees with args.scale_rewards={args.scale_rewards!r}: TRL "
                f"scales the advantages; make them equal"
            )
    loss_beta = algo.kl_coef if algo.kl_placement == "loss" else 0.0
    if _differs(float(args.beta), float(loss_beta)):
        raise ValueError(
            f"algo.kl_coef={algo.kl_coef} (kl_placement={algo.kl_placement!r}) disagrees with args.beta={args.beta}: "
            f"TRL computes the reference log-probs only when beta != 0; make args.beta = {loss_beta}"
        )
    global_norm = bool(getattr(algo, "global_token_norm", False))
    if global_norm and algo.ent_coef > 0 and args.gradient_accumulation_steps != 1:
        # grpo_ref normalises the entropy bonus per minibatch (it would need the division by the accumulation
        # steps) and the policy term by num_tokens (it must not get it); one scalar cannot take both
        raise ValueError(
            f"algo.ent_coef={algo.ent_coef} with algo.global_token_norm=True needs "
            f"args.gradient_accumulation_steps=1, got {args.gradient_accumulation_steps}: the entropy bonus is a "
            f"per-minibatch mean and the policy term a global token mean, which accumulate differently"
        )
    if algo.loss_agg_mode == "seq-mean-token-sum-norm" and algo.norm_length is None:
        algo = algo.replace(norm_length=args.max_completion_length)
    return algo


def _log_metrics(trainer, mode: str, loss: torch.Tensor, metrics: Dict[str, torch.Tensor]) -> None:
    items = dict(metrics)
    items["loss"] = loss
    for name in sorted(items):  # the same order on every process (each gather is a collective)
        value = torch.as_tensor(items[name]).detach().float().reshape(1).to(loss.device)
        gathered = trainer.accelerator.gather(value)
        if name.endswith("_min"):
            out = gathered.min()
        elif name.endswith("_max"):
            out = gathered.max()
        else:
            out = gathered.nanmean()
        trainer._metrics[mode][f"grpo_ref/{name}"].append(out.item())


@functools.lru_cache(maxsize=None)
def grpo_ref_trainer_class():
    """Import TRL and return ``GRPORefTrainer``: ``trl.GRPOTrainer`` (TRL 1.16.0) with grpo_ref's loss.

    ``GRPORefTrainer(model, reward_funcs, args, ..., algo=AlgoConfig)`` takes ``GRPOTrainer``'s arguments plus
    the keyword ``algo`` (required), checked by :func:`check_algo_for_trl` before the models are built (after,
    when ``args`` is None and TRL builds a default config). The checked config is ``trainer.algo``."""
    from trl import GRPOTrainer

    class GRPORefTrainer(GRPOTrainer):
        """TRL's GRPOTrainer whose ``_compute_loss`` is ``grpo_ref.compute_loss`` on TRL's tensors."""

        def __init__(self, model, reward_funcs=None, args=None, *more, algo: Optional[AlgoConfig] = None, **kwargs):
            if algo is None:
                raise ValueError("algo is required: GRPORefTrainer(..., algo=grpo_ref.get_preset('grpo', ...))")
            checked = check_algo_for_trl(algo, args) if args is not None else None
            super().__init__(model, reward_funcs, args, *more, **kwargs)
            self.algo = checked if checked is not None else check_algo_for_trl(algo, self.args)

        def _compute_loss(self, model, inputs):
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            logp, entropy, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _FORWARD_KEYS},
            )
            old_logp = inputs.get("old_per_token_logps")
            old_logp = logp.detach() if old_logp is None else old_logp
            mode = "train" if self.model.training else "eval"
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
            extra = {}
            if getattr(self.algo, "global_token_norm", False):
                # TRL 1.16.0 loss_type="dapo": the generation batch's token count, rescaled to one optimizer step
                num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
                if mode == "train":
                    num_tokens = num_tokens * accumulation / self.args.steps_per_generation
                extra["num_tokens"] = float(num_tokens)
                scale = 1.0
            else:
                scale = float(accumulation)
            inp = LossInputs(
                logp=logp, old_logp=old_logp, advantages=inputs["advantages"], mask=mask,
                ref_logp=inputs.get("ref_per_token_logps"), entropy=entropy, **extra,
            )
            loss, metrics = compute_loss(inp, self.algo)
            _log_metrics(self, mode, loss.detach(), metrics)
            loss = loss / scale
            if self.aux_loss_enabled:  # MoE router loss, as TRL adds it
                loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            return loss

    GRPORefTrainer.__module__ = __name__
    return GRPORefTrainer


def make_trainer(*args, algo: AlgoConfig, **kwargs):
    """``grpo_ref_trainer_class()(*args, algo=algo, **kwargs)``: a ``GRPORefTrainer`` in one call."""
    return grpo_ref_trainer_class()(*args, algo=algo, **kwargs)
