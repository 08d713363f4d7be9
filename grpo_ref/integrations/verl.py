"""grpo_ref's policy loss inside verl 0.9.1's trainer, selected by ``actor_rollout_ref.actor.policy_loss.loss_mode``.

``register_policy_loss(algo, name="grpo_ref")`` imports verl and registers, in verl's policy-loss registry
(``verl.trainer.ppo.core_algos.register_policy_loss``), a function with verl's ``PolicyLossFn`` signature
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights) -> (loss,
metrics)`` that returns :func:`grpo_ref.surrogate.policy_loss` with ``algo``'s policy fields (``pg_objective``,
``eps_low`` / ``eps_high``, ``dual_clip``, ``ratio_level``, ``sapo_tau_pos`` / ``sapo_tau_neg``,
``loss_agg_mode``, ``norm_length``). A verl run then selects it with ``policy_loss.loss_mode=grpo_ref``; the
registration must run in every worker process that computes the loss (e.g. from a module the workers import).

What stays verl's (``verl/workers/utils/losses.py`` ``ppo_loss`` adds them to the policy term): the KL loss
(``use_kl_loss``, ``kl_loss_coef``, ``kl_loss_type``), the entropy bonus (``entropy_coeff``), advantages,
rollouts, the critic. So ``algo`` fields that the registered function would silently ignore are refused with a
``ValueError``: ``kl_coef > 0`` with ``kl_placement="loss"`` (set verl's ``use_kl_loss`` instead),
``ent_coef > 0``, ``kl_ratio_weighted``, ``global_token_norm`` (verl's ``global_batch_info`` is used).

Micro-batching: verl's trainer hands each micro-batch the whole mini-batch's counts in
``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``) and sums the micro-batch
losses; the registered function rescales grpo_ref's per-micro-batch aggregate the same way (``token-mean``:
``num_tokens = batch_num_tokens / dp_size``; ``token-sum``: times ``dp_size``; the seq-mean modes: times
``B_micro * dp_size / global_batch_size``), so the summed micro-batch losses equal grpo_ref's loss on the
mini-batch. At call time, verl's ``loss_agg_mode`` must equal ``algo.loss_agg_mode`` (verl aggregates its KL and
entropy terms with it), and ``rollout_is_weights`` must be None (no per-token weights in grpo_ref's loss).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..algorithms import AlgoConfig
from ..surrogate import policy_loss

__all__ = ["register_policy_loss", "make_policy_loss_fn", "check_algo_for_verl"]


def check_algo_for_verl(algo: AlgoConfig) -> None:
    """Refuse (``ValueError`` naming the field) the ``algo`` fields a verl policy-loss function cannot apply."""
    if not isinstance(algo, AlgoConfig):
        raise ValueError(f"algo must be an AlgoConfig, got {type(algo).__name__}")
    if algo.kl_placement == "loss" and algo.kl_coef > 0:
        raise ValueError(f"algo.kl_coef={algo.kl_coef} (kl_placement='loss'): verl adds the KL loss itself; set "
                         "actor_rollout_ref.actor.use_kl_loss / kl_loss_coef / kl_loss_type and algo.kl_coef=0")
    if algo.ent_coef > 0:
        raise ValueError(f"algo.ent_coef={algo.ent_coef}: verl adds the entropy bonus itself "
                         "(actor_rollout_ref.actor.entropy_coeff); set algo.ent_coef=0")
    for name in ("kl_ratio_weighted", "global_token_norm"):
        if getattr(algo, name, False):
            raise ValueError(f"algo.{name}=True does not apply inside verl's ppo_loss")


def _info(config: Any) -> Dict[str, Any]:
    info = getattr(config, "global_batch_info", None)
    return dict(info) if info else {}


def make_policy_loss_fn(algo: AlgoConfig) -> Callable[..., Tuple[torch.Tensor, Dict[str, float]]]:
    """The verl ``PolicyLossFn`` computing grpo_ref's policy term with ``algo`` (no verl import needed).

    Shapes: ``old_log_prob, log_prob, advantages, response_mask``: ``[B, T]`` (the mask bool or 0/1).
    Returns ``(loss, metrics)``: a scalar and floats (``actor/pg_clipfrac`` = both sides of the clip,
    ``actor/pg_clipfrac_lower`` = dual clip share, ``actor/ppo_kl`` = grpo_ref's k3 ``approx_kl``, and each
    grpo_ref metric as ``actor/grpo_ref/<name>``)."""
    check_algo_for_verl(algo)

    def grpo_ref_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Optional[Any] = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        if loss_agg_mode != algo.loss_agg_mode:
            raise ValueError(f"verl's loss_agg_mode={loss_agg_mode!r} differs from algo.loss_agg_mode="
                             f"{algo.loss_agg_mode!r} (verl aggregates its KL and entropy terms with its own)")
        if rollout_is_weights is not None:
            raise ValueError("rollout_is_weights: grpo_ref's policy loss has no per-token weights "
                             "(disable algorithm.rollout_correction)")
        info = _info(config)
        dp = int(info.get("dp_size") or 1)
        norm = algo.norm_length
        scale_factor = info.get("loss_scale_factor")
        if norm is None:
            norm = scale_factor
        elif scale_factor is not None and float(scale_factor) != float(norm):
            raise ValueError(f"actor.loss_scale_factor={scale_factor} differs from algo.norm_length={norm}")
        num_tokens = None
        if algo.loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is not None:
            num_tokens = float(info["batch_num_tokens"]) / dp
        loss, metrics = policy_loss(
            log_prob, old_log_prob, advantages, response_mask, pg_objective=algo.pg_objective,
            eps_low=algo.eps_low, eps_high=algo.eps_high, dual_clip=algo.dual_clip,
            sapo_tau_pos=algo.sapo_tau_pos, sapo_tau_neg=algo.sapo_tau_neg, ratio_level=algo.ratio_level,
            loss_agg_mode=algo.loss_agg_mode, norm_length=norm, num_tokens=num_tokens)
        if algo.loss_agg_mode == "token-sum":
            loss = loss * dp
        elif algo.loss_agg_mode.startswith("seq-mean") and info.get("global_batch_size") is not None:
            loss = loss * (response_mask.shape[0] * dp / float(info["global_batch_size"]))
        out = {f"actor/grpo_ref/{k}": float(v) for k, v in metrics.items()}
        out["actor/pg_clipfrac"] = float(metrics["clip_frac_low"] + metrics["clip_frac_high"])
        out["actor/pg_clipfrac_lower"] = float(metrics["dual_clip_frac"])
        out["actor/ppo_kl"] = float(metrics["approx_kl"])
        return loss, out

    grpo_ref_policy_loss.algo = algo  # type: ignore[attr-defined]
    return grpo_ref_policy_loss


def register_policy_loss(algo: Optional[AlgoConfig] = None, name: str = "grpo_ref") -> Callable:
    """Register grpo_ref's policy loss with ``algo`` (default: the ``grpo`` preset without its KL term, which verl
    adds) under ``name`` in verl 0.9.1's policy-loss registry; returns the registered function. Imports verl."""
    from verl.trainer.ppo import core_algos  # the only verl import, here at call time

    if algo is None:
        from ..algorithms import get_preset

        algo = get_preset("grpo", kl_coef=0.0)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    fn = make_policy_loss_fn(algo)
    return core_algos.register_policy_loss(name)(fn)
