"""One interface for every algorithm: a config of shared parts, ``compute_advantages``, and a loss registry.

The second of the original notebooks had the right idea (change one field, switch PPO <-> GRPO) but a GRPO with
batch-level advantages and a KL divided by the length twice. Here an algorithm is an :class:`AlgoConfig`: which advantage
estimator, which ratio (token/sequence), which clip range, where the KL goes (loss or reward) and how the token
losses are aggregated. ``PRESETS`` holds the published recipes; ``LOSS_REGISTRY`` maps ``loss_fn`` to
:func:`grpo_loss` (actor only) or :func:`ppo_loss` (actor + critic + entropy), both ``(LossInputs, cfg) -> (loss, metrics)``.

Mapping of the fields to TRL 1.16.0 (``GRPOConfig``) and verl 0.9.1 (``actor_rollout_ref.actor.`` = ``actor.``,
``algorithm.``) in brief; :mod:`grpo_ref.compat` translates whole configurations both ways and its ``TRL_FIELDS`` /
``VERL_FIELDS`` tables list every loss-relevant field, each checked against the framework's own code by
``tests/test_conformance_trl.py`` and ``tests/test_conformance_verl.py``:

* ``group_size``: TRL ``num_generations``; verl ``rollout.n``
* ``adv_estimator``: TRL ``grpo`` only; verl ``algorithm.adv_estimator`` (``process``: DeepSeekMath's process
  supervision, in neither)
* ``adv_scale``: TRL ``scale_rewards`` (group/batch/none); verl ``norm_adv_by_std_in_grpo`` (no batch scale)
* ``adv_eps``: TRL 1e-4 (fixed); verl 1e-6 (fixed)
* ``eps_low`` / ``eps_high``: TRL ``epsilon`` / ``epsilon_high``; verl ``clip_ratio_low`` / ``clip_ratio_high``
* ``dual_clip``: TRL ``delta`` if ``delta >= 1 + epsilon_high``; verl ``clip_ratio_c`` (on by default: 3.0)
* ``ratio_level``: TRL ``importance_sampling_level``; verl ``policy_loss.loss_mode="gspo"``
* ``pg_objective``: TRL ``loss_type`` cispo / sapo; verl ``policy_loss.loss_mode`` cispo / sapo
* ``loss_agg_mode``: TRL ``loss_type`` grpo/bnpo/dr_grpo/dapo/luspo; verl ``loss_agg_mode`` (+ ``token-sum``)
* ``global_token_norm``: TRL ``loss_type`` dapo / cispo (TRL's default); verl global batch token count
* ``norm_length``: TRL ``max_completion_length`` (dr_grpo); verl ``loss_scale_factor``
* ``kl_coef``: TRL ``beta`` (default 0); verl ``kl_loss_coef`` / ``kl_ctrl.kl_coef``
* ``kl_estimator``: TRL k3, no clamp; verl ``kl_loss_type`` / ``kl_penalty``
* ``kl_ratio_weighted``: TRL ``use_bias_correction_kl`` (default True); verl (none)
* ``kl_placement``: TRL loss (fixed); verl ``use_kl_loss`` / ``use_kl_in_reward``
* ``gamma`` / ``lam``: TRL (none); verl ``algorithm.gamma`` / ``algorithm.lam``
* ``vf_coef`` / ``value_clip``: TRL (no critic); verl critic optimiser / ``critic.cliprange_value``
* ``ent_coef``: TRL ``entropy_coef``; verl ``entropy_coeff``
* ``ent_agg_mode``: TRL token-mean (fixed); verl ``loss_agg_mode``
* ``sapo_tau_pos`` / ``sapo_tau_neg``: TRL ``sapo_temperature_pos`` / ``_neg``; verl ``tau_pos`` / ``tau_neg``
* ``unscorable``: TRL zero_advantage (every reward function None); verl (none)
* ``overlong_buffer``: TRL (a reward function); verl ``reward_model.overlong_buffer.len``
* ``filter_groups``: TRL (none); verl ``algorithm.filter_groups.enable``

Where "the same" needs a qualification: TRL's k3 has no clamp and grpo_ref's clamps ``ref - lp`` at +-20; verl's
``k3`` / ``low_var_kl`` also clamps the value to [-10, 10] (grpo_ref's ``kl_estimator="low_var_kl"``); a TRL
``delta`` below ``1 + epsilon_high`` also lowers the upper clip (``from_trl`` maps it exactly); TRL's ``luspo`` is
``seq-mean-token-sum``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import Callable, Dict, Optional, Tuple, cast

import torch

from ._checks import (
    as_float,
    check_2d,
    check_bool,
    check_choice,
    check_finite,
    check_float_tensor,
    check_group_size,
    check_int,
    check_mask,
    check_optional_real,
    check_real,
    check_same_shape,
    check_tensor,
)
from .advantages import (
    ADV_SCALES,
    _nan_grpo_advantages,
    _nan_reinforce_pp_baseline,
    _nan_rloo_advantages,
    gae_advantages,
    grpo_advantages,
    overlong_penalty,
    process_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from .aggregation import LOSS_AGG_MODES, _aggregate, check_num_tokens
from .kl import _ESTIMATORS, KL_ESTIMATORS
from .masks import _masked_sum, _masked_whiten
from .ppo import value_loss
from .surrogate import PG_OBJECTIVES, RATIO_LEVELS, policy_loss

ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae", "process")
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")
UNSCORABLE = ("refuse", "zero_advantage")


@dataclass(frozen=True)
class AlgoConfig:
    """Every knob of the loss and the advantages; validated at construction (``ValueError`` on a bad value)."""

    name: str = "grpo"  # the preset's name (a label: the other fields define the algorithm)
    loss_fn: str = "grpo"  # key of LOSS_REGISTRY: "grpo" (actor only) or "ppo" (actor + critic)
    adv_estimator: str = "grpo"
    group_size: int = 8  # G, completions per prompt (the training loop copies TrainConfig.group_size here)
    adv_scale: str = "group"
    adv_eps: float = 1e-6
    whiten_advantages: bool = False  # after GAE (PPO-RLHF whitens)
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    ratio_level: str = "token"
    loss_agg_mode: str = "seq-mean-token-mean"
    norm_length: Optional[int] = None  # Dr. GRPO's constant; None = the padded length T
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    kl_placement: str = "loss"  # "loss" (GRPO) or "reward" (PPO-RLHF, REINFORCE++)
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    value_clip: Optional[float] = 0.2
    ent_coef: float = 0.0
    overlong_buffer: Optional[int] = None  # DAPO L_cache; needs max_response_length
    max_response_length: Optional[int] = None  # DAPO L_max
    filter_groups: bool = False  # DAPO dynamic sampling: the training loop drops zero-variance groups
    pg_objective: str = "clip"  # "clip" (PPO/GRPO), "cispo" (MiniMax-M1), "sapo" (soft gate); see grpo_ref.surrogate
    sapo_tau_pos: float = 1.0  # SAPO gate temperature where A > 0 (TRL's and verl's default)
    sapo_tau_neg: float = 1.05  # ... where A <= 0
    kl_ratio_weighted: bool = False  # KL term times the importance ratio (TRL use_bias_correction_kl)
    ent_agg_mode: Optional[str] = None  # aggregation of the entropy bonus; None = loss_agg_mode
    global_token_norm: bool = False  # token-mean over LossInputs.num_tokens (TRL dapo/cispo num_items_in_batch)
    unscorable: str = "refuse"  # NaN scores: "refuse", or "zero_advantage" (TRL: every reward function gave None)

    def __post_init__(self) -> None:
        """Refuse every bad field with a ``ValueError`` naming it: NaN/inf and out-of-range numbers (checks are
        written so that NaN fails them), ``bool`` where an int is meant, non-bools for the flags."""
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str, got {self.name!r}")
        check_choice("loss_fn", self.loss_fn, LOSS_REGISTRY)
        check_choice("adv_estimator", self.adv_estimator, ADV_ESTIMATORS)
        check_choice("adv_scale", self.adv_scale, ADV_SCALES)
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("kl_placement", self.kl_placement, ("loss", "reward"))
        check_int("group_size", self.group_size, lo=1)
        if self.adv_estimator in GROUP_ESTIMATORS + ("process",) and self.group_size < 2:
            raise ValueError(f"{self.adv_estimator} needs group_size >= 2 (a group baseline of one is the sample itself), got {self.group_size}")
        check_choice("pg_objective", self.pg_objective, PG_OBJECTIVES)
        check_choice("unscorable", self.unscorable, UNSCORABLE)
        if self.ent_agg_mode is not None:
            check_choice("ent_agg_mode", self.ent_agg_mode, LOSS_AGG_MODES)
        check_real("eps_low", self.eps_low, lo=0.0, hi=1.0, lo_open=True)
        check_real("eps_high", self.eps_high, lo=0.0, lo_open=True)
        check_optional_real("dual_clip", self.dual_clip, lo=1.0, lo_open=True)
        if self.dual_clip is not None and self.pg_objective != "clip":
            raise ValueError(f"dual_clip={self.dual_clip} only applies to pg_objective='clip', got pg_objective={self.pg_objective!r}")
        check_real("sapo_tau_pos", self.sapo_tau_pos, lo=0.0, lo_open=True)
        check_real("sapo_tau_neg", self.sapo_tau_neg, lo=0.0, lo_open=True)
        for name in ("adv_eps", "kl_coef", "vf_coef", "ent_coef"):
            check_real(name, getattr(self, name), lo=0.0)
        check_real("gamma", self.gamma, lo=0.0, hi=1.0)
        check_real("lam", self.lam, lo=0.0, hi=1.0)
        check_optional_real("value_clip", self.value_clip, lo=0.0, lo_open=True)
        check_optional_real("norm_length", self.norm_length, lo=0.0, lo_open=True)
        for name in ("whiten_advantages", "filter_groups", "kl_ratio_weighted", "global_token_norm"):
            check_bool(name, getattr(self, name))
        if self.kl_ratio_weighted and self.kl_placement != "loss":
            raise ValueError("kl_ratio_weighted=True weights the KL term of the loss: it needs kl_placement='loss', "
                             f"got kl_placement={self.kl_placement!r}")
        if self.global_token_norm and self.loss_agg_mode != "token-mean":
            raise ValueError("global_token_norm=True needs loss_agg_mode='token-mean' (it replaces that mode's token "
                             f"count), got loss_agg_mode={self.loss_agg_mode!r}")
        if self.unscorable != "refuse" and self.adv_estimator not in GROUP_ESTIMATORS:
            raise ValueError(f"unscorable={self.unscorable!r} needs a group estimator {GROUP_ESTIMATORS} (the statistics "
                             f"of the scorable group members), got adv_estimator={self.adv_estimator!r}")
        if self.adv_estimator == "process" and ((self.kl_placement == "reward" and self.kl_coef > 0)
                                                or self.overlong_buffer is not None):
            raise ValueError("adv_estimator='process' normalises the task's step rewards as DeepSeekMath does (sec. "
                             "4.1.3): it takes neither a KL in the reward nor DAPO's overlong shaping, got kl_placement="
                             f"{self.kl_placement!r}, overlong_buffer={self.overlong_buffer!r}")
        if self.adv_estimator == "gae" and self.loss_fn != "ppo":
            raise ValueError("adv_estimator='gae' needs a critic: use loss_fn='ppo'")
        if self.max_response_length is not None:
            check_int("max_response_length", self.max_response_length, lo=1)
        if self.overlong_buffer is not None:
            check_int("overlong_buffer", self.overlong_buffer, lo=1)
            if self.max_response_length is None or self.overlong_buffer > self.max_response_length:
                raise ValueError(
                    f"overlong_buffer needs max_response_length >= overlong_buffer > 0, got overlong_buffer="
                    f"{self.overlong_buffer}, max_response_length={self.max_response_length}"
                )

    def replace(self, **changes) -> "AlgoConfig":
        """A copy with some fields changed (validated again); an unknown field is a ``ValueError``."""
        known = {f.name for f in dataclass_fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown AlgoConfig field(s) {unknown}; expected some of {sorted(known)}")
        return replace(self, **changes)

    def to_dict(self) -> Dict:
        """The fields as a plain dict (``dataclasses.asdict``), as stored in a run's ``config.json``."""
        return asdict(self)


@dataclass
class LossInputs:
    """What a loss needs, all ``[B, T]`` (``advantages`` may be ``[B]``); critic fields only for ``ppo_loss``."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    old_values: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    #: the global token normaliser of ``AlgoConfig.global_token_norm`` (a number, or a 0-dim tensor)
    num_tokens: Optional[float] = None

    def __post_init__(self) -> None:
        """Types only (each tensor field a real tensor, or None where optional; ``num_tokens`` None or a finite
        number ``> 0``); shapes and values are checked by the loss that uses them, with the field's name in the
        message."""
        for f in dataclass_fields(self):
            value = getattr(self, f.name)
            if f.name == "num_tokens":
                if value is not None:
                    check_real("LossInputs.num_tokens", value, lo=0.0, lo_open=True)
            elif value is not None or f.name in ("logp", "old_logp", "advantages", "mask"):
                check_tensor(f"LossInputs.{f.name}", value)


def _num_tokens(inp: LossInputs, cfg: AlgoConfig) -> Optional[float]:
    """``inp.num_tokens`` when ``cfg.global_token_norm`` (then required), else refused if given (it would be ignored)."""
    if cfg.global_token_norm:
        if inp.num_tokens is None:
            raise ValueError("global_token_norm=True needs LossInputs.num_tokens (the global token count of the step), got None")
        return check_num_tokens(inp.num_tokens, cfg.loss_agg_mode)
    if inp.num_tokens is not None:
        raise ValueError(f"LossInputs.num_tokens={inp.num_tokens!r} is only used with global_token_norm=True")
    return None


def _entropy_norm(cfg: AlgoConfig, mode: str, T: int) -> Optional[float]:
    """The ``norm_length`` of the entropy bonus's aggregation: the run's ``norm_length`` (``T`` if None) under
    ``seq-mean-token-sum-norm``, as for the policy term."""
    if mode != "seq-mean-token-sum-norm":
        return None
    return float(cfg.norm_length) if cfg.norm_length is not None else float(max(T, 1))


def _policy_part(inp: LossInputs, cfg: AlgoConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    loss, metrics = policy_loss(
        inp.logp, inp.old_logp, inp.advantages, inp.mask,
        pg_objective=cfg.pg_objective, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
        sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg, ratio_level=cfg.ratio_level,
        loss_agg_mode=cfg.loss_agg_mode, norm_length=cfg.norm_length, num_tokens=_num_tokens(inp, cfg),
        ref_logp=inp.ref_logp, kl_coef=cfg.kl_coef if cfg.kl_placement == "loss" else 0.0,
        kl_estimator=cfg.kl_estimator, kl_ratio_weighted=cfg.kl_ratio_weighted, entropy=inp.entropy,
    )
    if cfg.ent_coef > 0:
        if inp.entropy is None:
            raise ValueError("ent_coef > 0 needs LossInputs.entropy")
        # policy_loss has validated entropy and mask (shapes, 0/1, finite where masked in): aggregate directly.
        # The bonus is normalised over this minibatch by its own mode (TRL 1.16.0: always a token mean), never
        # by the global num_tokens.
        mode = cfg.ent_agg_mode or cfg.loss_agg_mode
        norm = _entropy_norm(cfg, mode, inp.mask.shape[-1])
        loss = loss - cfg.ent_coef * _aggregate(as_float(inp.entropy), as_float(inp.mask), mode, norm)
    return loss, metrics


def grpo_loss(inp: LossInputs, cfg: AlgoConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Critic-free actor loss (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, CISPO, SAPO): the policy loss of
    :func:`~grpo_ref.surrogate.policy_loss` with ``cfg``'s objective, clip, ratio level, aggregation (and global
    token count) and (if ``kl_placement == "loss"``) KL term, minus ``ent_coef`` times the entropy aggregated by
    ``ent_agg_mode`` (``loss_agg_mode`` if None; under ``seq-mean-token-sum-norm`` divided by ``norm_length``).

    Shapes: the ``[B, T]`` fields of :class:`LossInputs` (``advantages`` ``[B]`` or ``[B, T]``).
    Returns ``(loss, metrics)``: a scalar and a dict of detached scalars. Refused inputs: as :func:`compute_loss`;
    ``ent_coef > 0`` without ``entropy``."""
    return _policy_part(inp, cfg)


def ppo_loss(inp: LossInputs, cfg: AlgoConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO actor-critic loss: policy part as in :func:`grpo_loss` plus ``vf_coef`` times the clipped value loss
    (aggregated with the same ``loss_agg_mode``).
    Needs ``values``, ``old_values`` and ``returns``, all ``[B, T]``. Returns ``(loss, metrics)`` with ``vf_loss``
    added. Refused inputs: as :func:`compute_loss` (a missing critic field included)."""
    if inp.values is None or inp.old_values is None or inp.returns is None:
        raise ValueError("ppo_loss needs values, old_values and returns (a critic); use grpo_loss for critic-free algorithms")
    loss, metrics = _policy_part(inp, cfg)
    vf, vf_metrics = value_loss(inp.values, inp.old_values, inp.returns, inp.mask, cfg.value_clip, cfg.loss_agg_mode)
    metrics.update(vf_metrics, vf_loss=vf.detach())
    return loss + cfg.vf_coef * vf, metrics


LOSS_REGISTRY: Dict[str, Callable[[LossInputs, AlgoConfig], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]] = {
    "grpo": grpo_loss,
    "ppo": ppo_loss,
}


def compute_loss(inp: LossInputs, cfg: AlgoConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``LOSS_REGISTRY[cfg.loss_fn](inp, cfg)``: the one call a training loop makes.

    Refused (``ValueError`` naming the :class:`LossInputs` field): everything :func:`~grpo_ref.surrogate.policy_loss`
    and :func:`~grpo_ref.ppo.value_loss` refuse (shapes, masks other than 0/1, NaN/inf at masked-in positions);
    ``cfg.global_token_norm`` without ``num_tokens``, ``num_tokens`` without ``cfg.global_token_norm``;
    ``inp`` not a :class:`LossInputs` or ``cfg`` not an :class:`AlgoConfig`."""
    _check_types(inp, cfg)
    return LOSS_REGISTRY[cfg.loss_fn](inp, cfg)


def _check_types(inp, cfg) -> None:
    if not isinstance(inp, LossInputs):
        raise ValueError(f"inp must be a LossInputs, got {type(inp).__name__}")
    if not isinstance(cfg, AlgoConfig):
        raise ValueError(f"cfg must be an AlgoConfig, got {type(cfg).__name__}")


def compute_advantages(
    cfg: AlgoConfig,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    values: Optional[torch.Tensor] = None,
    steps: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token advantages (and PPO returns) for a rollout batch, by ``cfg.adv_estimator``.

    Args:
        scores: ``[B]`` task rewards (groups of ``cfg.group_size`` contiguous rows for group estimators).
        mask: ``[B, T]`` response mask.
        old_logp, ref_logp: ``[B, T]``; needed when ``cfg.kl_placement == "reward"`` and ``kl_coef > 0``.
        values: ``[B, T]`` critic values at sampling time, for ``gae``.
        steps: ``(step_rewards [B, S], step_ends [B, S], step_mask [B, S])`` for ``process`` (DeepSeekMath sec.
            4.1.3, :func:`~grpo_ref.advantages.process_advantages`; e.g. from
            :meth:`ChainSumTask.process_rewards <grpo_ref.chain_task.ChainSumTask.process_rewards>`); ``scores``
            are then checked but unused. Refused for the other estimators.
    Unscorable completions: with ``cfg.unscorable == "zero_advantage"`` a NaN score marks a completion no reward
    function could score (TRL 1.16.0: every reward function returned None). The group estimators then take their
    statistics over the scorable members only (TRL's ``nanmean`` / ``nanstd``; RLOO's leave-one-out mean over the
    other scorable members; REINFORCE++-baseline whitens over the scorable completions' tokens) and give every
    token of an unscorable completion an advantage of exactly 0 (TRL ``nan_to_num(advantages, nan=0.0)``); a group
    with no scorable member, or one, gets 0 everywhere. With ``"refuse"`` (default) NaN scores are refused.
    Steps: DAPO overlong shaping is added to the scores if configured; with the KL in the reward, sequence
    estimators see ``score - beta * sum_t k(t)`` and token estimators the per-token rewards of
    :func:`~grpo_ref.ppo.kl_in_reward`.

    Returns:
        ``(advantages [B, T], returns [B, T] or None)``; 0 on masked-out positions.

    Refused with a ``ValueError`` naming the argument: ``cfg`` not an :class:`AlgoConfig`; a ``mask`` that is not
    ``[B, T]`` or holds values other than 0/1; ``scores`` that are not ``[B]`` or hold inf, or NaN unless
    ``cfg.unscorable == "zero_advantage"``; ``B`` not a
    multiple of ``cfg.group_size`` for group estimators; ``old_logp`` / ``ref_logp`` / ``values`` of another
    shape or with NaN/inf at masked-in positions (padding may hold anything). ``B = 0`` gives empty results.
    """
    if not isinstance(cfg, AlgoConfig):
        raise ValueError(f"cfg must be an AlgoConfig, got {type(cfg).__name__}")
    check_2d("mask", mask)
    m = check_mask("mask", mask, "mask", as_float(mask))
    on = m > 0
    scores = check_tensor("scores", torch.as_tensor(scores, device=m.device))
    if scores.dim() != 1 or scores.shape[0] != m.shape[0]:
        raise ValueError(f"scores must be [B] = [{m.shape[0]}], got shape {tuple(scores.shape)}")
    nan_ok = cfg.unscorable == "zero_advantage"
    check_finite("scores", scores, where=~torch.isnan(scores) if nan_ok and scores.is_floating_point() else None)
    scores = as_float(scores).detach()
    unscorable = torch.isnan(scores)
    if cfg.adv_estimator in GROUP_ESTIMATORS:
        check_group_size(scores.shape[0], cfg.group_size, 2, batch_name="scores")
    kl_reward = cfg.kl_placement == "reward" and cfg.kl_coef > 0
    if kl_reward and (old_logp is None or ref_logp is None):
        raise ValueError("kl_placement='reward' with kl_coef > 0 needs old_logp and ref_logp")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("values", values)):
        if x is not None:
            check_float_tensor(name, x)
            check_same_shape(mask=mask, **{name: x})
            if name == "values" or kl_reward:
                check_finite(name, x, where=m)
    if cfg.overlong_buffer is not None:
        assert cfg.max_response_length is not None  # AlgoConfig refuses overlong_buffer without it
        scores = scores + overlong_penalty(m.sum(-1), cfg.max_response_length, cfg.overlong_buffer).to(scores)
    dtype = as_float(cast(torch.Tensor, old_logp)).dtype if kl_reward else m.dtype  # not None: refused above
    token_rewards = _last_token(scores.to(dtype), m.to(dtype))
    seq_scores = scores
    if kl_reward:  # token estimators get -beta * k(t) per token; sequence estimators see score - beta * sum_t k(t)
        beta = cfg.kl_coef
        old = torch.where(on, as_float(cast(torch.Tensor, old_logp)).detach(), 0.0)
        ref = torch.where(on, as_float(cast(torch.Tensor, ref_logp)).detach().to(dtype), 0.0)
        kl = _ESTIMATORS[cfg.kl_estimator](old, ref, 20.0)
        token_rewards = token_rewards - beta * kl * m
        seq_scores = scores - beta * _masked_sum(kl, m.to(dtype), dim=-1)
    returns = None
    est = cfg.adv_estimator
    if (steps is None) != (est != "process"):
        raise ValueError(f"steps (per-step rewards) go with adv_estimator='process' only, got adv_estimator={est!r} "
                         f"and steps {'given' if steps is not None else 'None'}")
    if nan_ok and bool(unscorable.any()):  # group estimators only (AlgoConfig refuses the others)
        if est == "grpo":
            adv = _nan_grpo_advantages(seq_scores, cfg.group_size, cfg.adv_scale, cfg.adv_eps)[:, None] * m
        elif est == "rloo":
            adv = _nan_rloo_advantages(seq_scores, cfg.group_size)[:, None] * m
        else:  # reinforce_pp_baseline: the score as the token rewards sum it (an empty response counts as 0)
            # (the where() keeps every NaN score out: a scorable row's token rewards hold none)
            seq = torch.where(unscorable, seq_scores, token_rewards.sum(-1))
            adv = _nan_reinforce_pp_baseline(seq, m, cfg.group_size)
    elif est in ("grpo", "rloo"):
        seq = grpo_advantages(seq_scores, cfg.group_size, cfg.adv_scale, cfg.adv_eps) if est == "grpo" else rloo_advantages(seq_scores, cfg.group_size)
        adv = seq[:, None] * m
    elif est == "reinforce_pp":
        adv = reinforce_pp_advantages(token_rewards, m, cfg.gamma)
    elif est == "reinforce_pp_baseline":
        adv = reinforce_pp_advantages(token_rewards, m, group_size=cfg.group_size)  # the baseline variant has no gamma
    elif est == "process":
        assert steps is not None  # refused above
        if not isinstance(steps, (tuple, list)) or len(steps) != 3:
            raise ValueError("steps must be a tuple (step_rewards, step_ends, step_mask)")
        adv = process_advantages(steps[0], steps[1], steps[2], mask, cfg.group_size, cfg.adv_eps)
    else:  # gae
        if values is None:
            raise ValueError("adv_estimator='gae' needs values from the critic")
        adv, returns = gae_advantages(token_rewards, values, m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = _masked_whiten(adv, m)
    return adv, returns


def _last_token(scores: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: each sequence's score on its last response token (a row of 0s for an empty response)."""
    out = torch.zeros_like(m)
    if m.shape[1] == 0:
        return out
    pos = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m > 0, pos, -1).amax(-1)
    has = last >= 0
    out[torch.arange(m.shape[0], device=m.device)[has], last[has]] = scores[has]
    return out


#: The published recipes, each an :class:`AlgoConfig` of the same parts (the module's list above gives the names
#: TRL and verl give each field): ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``rloo``, ``reinforce_pp``, ``ppo``.
#: The page "The algorithms at a glance" tabulates where they differ.
#:
#: :meta hide-value:
PRESETS: Dict[str, AlgoConfig] = {
    # DeepSeekMath: group std, k3 KL in the loss (beta 0.04), per-sequence token mean.
    "grpo": AlgoConfig(name="grpo"),
    # Dr. GRPO: no std, token sums over a constant length, no KL.
    "dr_grpo": AlgoConfig(name="dr_grpo", adv_scale="none", loss_agg_mode="seq-mean-token-sum-norm", kl_coef=0.0),
    # DAPO: clip-higher, token-level loss, no KL, dynamic sampling; overlong shaping when a budget is given.
    "dapo": AlgoConfig(name="dapo", eps_low=0.2, eps_high=0.28, loss_agg_mode="token-mean", kl_coef=0.0, filter_groups=True),
    # GSPO: sequence ratio, tiny clip range, no KL.
    "gspo": AlgoConfig(name="gspo", ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, kl_coef=0.0),
    # RLOO: leave-one-out baseline, KL (if any) in the reward.
    "rloo": AlgoConfig(name="rloo", adv_estimator="rloo", loss_agg_mode="token-mean", kl_coef=0.0, kl_placement="reward"),
    # REINFORCE++: k1 KL in the reward, return-to-go, whitened over the batch.
    "reinforce_pp": AlgoConfig(name="reinforce_pp", adv_estimator="reinforce_pp", loss_agg_mode="token-mean",
                               kl_coef=0.01, kl_estimator="k1", kl_placement="reward"),
    # PPO-RLHF: critic, GAE (gamma 1, lambda 0.95), whitened advantages, k1 KL in the reward.
    "ppo": AlgoConfig(name="ppo", loss_fn="ppo", adv_estimator="gae", group_size=1, whiten_advantages=True,
                      loss_agg_mode="token-mean", kl_coef=0.05, kl_estimator="k1", kl_placement="reward"),
}


def get_preset(name: str, **overrides) -> AlgoConfig:
    """The named preset (``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``rloo``, ``reinforce_pp``, ``ppo``), with overrides.

    An unknown name or field, or a bad field value, is a ``ValueError`` naming it (see :class:`AlgoConfig`)."""
    check_choice("name", name, PRESETS, what="algorithm")
    return PRESETS[name].replace(**overrides)
