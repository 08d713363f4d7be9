"""One interface for every algorithm: a config of shared parts, ``compute_advantages``, and a loss registry.

The second seed had the right idea (change one field, switch PPO <-> GRPO) but a GRPO with batch-level
advantages and a KL divided by the length twice. Here an algorithm is an :class:`AlgoConfig`: which advantage
estimator, which ratio (token/sequence), which clip range, where the KL goes (loss or reward) and how the token
losses are aggregated. ``PRESETS`` holds the published recipes; ``LOSS_REGISTRY`` maps ``loss_fn`` to
:func:`grpo_loss` (actor only) or :func:`ppo_loss` (actor + critic + entropy), both ``(LossInputs, cfg) -> (loss, metrics)``.

Mapping of the fields to TRL (``GRPOConfig``) and verl (``actor_rollout_ref.actor`` / ``algorithm``) options:

=====================  ===========================================  ============================================
field                  TRL                                          verl
=====================  ===========================================  ============================================
group_size             ``num_generations``                          ``rollout.n``
adv_estimator          GRPO only (``grpo``)                         ``algorithm.adv_estimator``
adv_scale              ``scale_rewards`` (group/batch/none)         ``norm_adv_by_std_in_grpo`` (True/False)
adv_eps                1e-4 (fixed)                                 1e-6 (fixed)
eps_low / eps_high     ``epsilon`` / ``epsilon_high``               ``clip_ratio_low`` / ``clip_ratio_high``
dual_clip              (none; ``delta`` is a different cap)         ``clip_ratio_c``
ratio_level            ``importance_sampling_level``                ``policy_loss.loss_mode="gspo"``
loss_agg_mode          ``loss_type`` (grpo/bnpo/dr_grpo/dapo)       ``loss_agg_mode``
norm_length            ``max_completion_length`` (dr_grpo)          ``loss_scale_factor``
kl_coef                ``beta``                                     ``kl_loss_coef`` / ``kl_ctrl.kl_coef``
kl_estimator           k3 (fixed)                                   ``kl_loss_type`` / ``kl_penalty``
kl_placement           loss (fixed)                                 ``use_kl_loss`` / ``use_kl_in_reward``
gamma / lam            (none)                                       ``algorithm.gamma`` / ``algorithm.lam``
vf_coef / value_clip   PPOTrainer ``vf_coef``, ``cliprange_value``   ``critic.cliprange_value``
ent_coef               (none)                                       ``entropy_coeff``
overlong_buffer        (reward function)                            ``reward_model.overlong_buffer.len``
filter_groups          (none)                                       ``algorithm.filter_groups.enable``
=====================  ===========================================  ============================================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch

from dataclasses import fields as dataclass_fields

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
from .advantages import ADV_SCALES, gae_advantages, grpo_advantages, overlong_penalty, reinforce_pp_advantages, rloo_advantages
from .aggregation import LOSS_AGG_MODES, _aggregate
from .kl import _ESTIMATORS, KL_ESTIMATORS
from .masks import _masked_sum, _masked_whiten
from .surrogate import RATIO_LEVELS, policy_loss
from .ppo import value_loss

ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae")
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")


@dataclass(frozen=True)
class AlgoConfig:
    """Every knob of the loss and the advantages; validated at construction (``ValueError`` on a bad value)."""

    name: str = "grpo"
    loss_fn: str = "grpo"  # key of LOSS_REGISTRY: "grpo" (actor only) or "ppo" (actor + critic)
    adv_estimator: str = "grpo"
    group_size: int = 8
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
        if self.adv_estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(f"{self.adv_estimator} needs group_size >= 2 (a group baseline of one is the sample itself), got {self.group_size}")
        check_real("eps_low", self.eps_low, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_real("eps_high", self.eps_high, lo=0.0, lo_open=True)
        check_optional_real("dual_clip", self.dual_clip, lo=1.0, lo_open=True)
        for name in ("adv_eps", "kl_coef", "vf_coef", "ent_coef"):
            check_real(name, getattr(self, name), lo=0.0)
        check_real("gamma", self.gamma, lo=0.0, hi=1.0)
        check_real("lam", self.lam, lo=0.0, hi=1.0)
        check_optional_real("value_clip", self.value_clip, lo=0.0, lo_open=True)
        check_optional_real("norm_length", self.norm_length, lo=0.0, lo_open=True)
        for name in ("whiten_advantages", "filter_groups"):
            check_bool(name, getattr(self, name))
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

    def __post_init__(self) -> None:
        """Types only (each field a real tensor, or None where optional); shapes and values are checked by the
        loss that uses them, with the field's name in the message."""
        for f in dataclass_fields(self):
            value = getattr(self, f.name)
            if value is None and f.name not in ("logp", "old_logp", "advantages", "mask"):
                continue
            check_tensor(f"LossInputs.{f.name}", value)


def _policy_part(inp: LossInputs, cfg: AlgoConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    loss, metrics = policy_loss(
        inp.logp, inp.old_logp, inp.advantages, inp.mask,
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, ratio_level=cfg.ratio_level,
        loss_agg_mode=cfg.loss_agg_mode, norm_length=cfg.norm_length, ref_logp=inp.ref_logp,
        kl_coef=cfg.kl_coef if cfg.kl_placement == "loss" else 0.0, kl_estimator=cfg.kl_estimator, entropy=inp.entropy,
    )
    if cfg.ent_coef > 0:
        if inp.entropy is None:
            raise ValueError("ent_coef > 0 needs LossInputs.entropy")
        # policy_loss has validated entropy and mask (shapes, 0/1, finite where masked in): aggregate directly,
        # with entropy_bonus's norm (T)
        norm = float(max(inp.mask.shape[-1], 1)) if cfg.loss_agg_mode == "seq-mean-token-sum-norm" else None
        loss = loss - cfg.ent_coef * _aggregate(as_float(inp.entropy), as_float(inp.mask), cfg.loss_agg_mode, norm)
    return loss, metrics


def grpo_loss(inp: LossInputs, cfg: AlgoConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Critic-free actor loss (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++): the clipped surrogate of
    :func:`~grpo_ref.surrogate.policy_loss` with ``cfg``'s clip, ratio level, aggregation and (if
    ``kl_placement == "loss"``) KL term, minus ``ent_coef`` times the entropy.

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
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token advantages (and PPO returns) for a rollout batch, by ``cfg.adv_estimator``.

    Args:
        scores: ``[B]`` task rewards (groups of ``cfg.group_size`` contiguous rows for group estimators).
        mask: ``[B, T]`` response mask.
        old_logp, ref_logp: ``[B, T]``; needed when ``cfg.kl_placement == "reward"`` and ``kl_coef > 0``.
        values: ``[B, T]`` critic values at sampling time, for ``gae``.
    Steps: DAPO overlong shaping is added to the scores if configured; with the KL in the reward, sequence
    estimators see ``score - beta * sum_t k(t)`` and token estimators the per-token rewards of
    :func:`~grpo_ref.ppo.kl_in_reward`.

    Returns:
        ``(advantages [B, T], returns [B, T] or None)``; 0 on masked-out positions.

    Refused with a ``ValueError`` naming the argument: ``cfg`` not an :class:`AlgoConfig`; a ``mask`` that is not
    ``[B, T]`` or holds values other than 0/1; ``scores`` that are not ``[B]`` or hold NaN/inf; ``B`` not a
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
    check_finite("scores", scores)
    scores = as_float(scores).detach()
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
        scores = scores + overlong_penalty(m.sum(-1), cfg.max_response_length, cfg.overlong_buffer).to(scores)
    beta = cfg.kl_coef if kl_reward else 0.0
    dtype = as_float(old_logp).dtype if kl_reward else m.dtype
    token_rewards = torch.zeros(m.shape, dtype=dtype, device=m.device)
    seq_scores = scores
    if kl_reward:  # token estimators get -beta * k(t) per token; sequence estimators see score - beta * sum_t k(t)
        zero = torch.zeros((), dtype=dtype, device=m.device)
        old = torch.where(on, as_float(old_logp).detach(), zero)
        ref = torch.where(on, as_float(ref_logp).detach().to(dtype), zero)
        kl = _ESTIMATORS[cfg.kl_estimator](old, ref, 20.0)
        token_rewards = -beta * kl * m
        seq_scores = scores - beta * _masked_sum(kl, m.to(dtype), dim=-1)
    token_rewards = token_rewards + _last_token(scores.to(dtype), m.to(dtype))
    returns = None
    est = cfg.adv_estimator
    if est in ("grpo", "rloo"):
        seq = grpo_advantages(seq_scores, cfg.group_size, cfg.adv_scale, cfg.adv_eps) if est == "grpo" else rloo_advantages(seq_scores, cfg.group_size)
        adv = seq[:, None] * m
    elif est == "reinforce_pp":
        adv = reinforce_pp_advantages(token_rewards, m, cfg.gamma)
    elif est == "reinforce_pp_baseline":
        adv = reinforce_pp_advantages(token_rewards, m, cfg.gamma, group_size=cfg.group_size)
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


#: The published recipes, each an :class:`AlgoConfig` of the same parts (see the table above for the names
#: TRL and verl give each field): ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``rloo``, ``reinforce_pp``, ``ppo``.
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
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
