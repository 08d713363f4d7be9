"""The contract of ``grpo_ref.algorithms`` (issue 13, mutation testing): what each preset, field and dispatch promises.

* **Presets are their sources.** ``SOURCE_FACTS`` lists, per preset, the fields its paper or framework fixes, each
  with the citation (DeepSeekMath, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, PPO-RLHF, TRL 1.16.0, verl 0.9.1, as
  summarised in ``shared/notes/peer-conventions.md`` and stated in ``book/algorithms.md``); every other field of a
  preset is ``AlgoConfig``'s default.
* **Every field is validated**: a bad value is a ``ValueError`` that names the field as a whole, case-sensitive word
  (and shows the value); every bound is accepted at its closed edge and refused just past it (or at its open edge);
  each cross-field rule refuses exactly the combination it names and accepts its neighbours.
* ``replace``, ``to_dict`` and ``get_preset`` round-trip; ``LossInputs`` refuses each field's wrong type by name.
* **Dispatch.** ``compute_loss`` equals :func:`~grpo_ref.surrogate.policy_loss` (minus the entropy bonus of
  :func:`~grpo_ref.ppo.entropy_bonus`, plus ``vf_coef`` times :func:`~grpo_ref.ppo.value_loss` for PPO) called
  directly with the config's options; ``compute_advantages`` equals the advantage function of its estimator called
  directly (with the KL-shaped rewards of :func:`~grpo_ref.ppo.kl_in_reward` / the KL-shaped scores, the overlong
  penalty, whitening, and the scorable-members-only statistics of unscorable completions). Each comparison runs on
  float64 inputs on which the option matters (checked: another value of the option changes the result), so an
  option passed wrongly, dropped, or taken from another field is caught, and float64 is kept end to end.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from refusals import refused

import grpo_ref as G
from grpo_ref.aggregation import LOSS_AGG_MODES
from grpo_ref.algorithms import ADV_ESTIMATORS, GROUP_ESTIMATORS, PRESETS, AlgoConfig, LossInputs
from grpo_ref.kl import KL_ESTIMATORS
from grpo_ref.surrogate import PG_OBJECTIVES

F64 = torch.float64
TINY = 1e-9  # "just past" a bound


# ------------------------------------------------------------------------------------------- presets = sources
_DSM = "DeepSeekMath (Shao et al. 2024, arXiv 2402.03300)"
_DRG = "Dr. GRPO (Liu et al. 2025, arXiv 2503.20783)"
_DAPO = "DAPO (Yu et al. 2025, arXiv 2503.14476)"
_GSPO = "GSPO (Zheng et al. 2025, arXiv 2507.18071)"
_RLOO = "RLOO (Ahmadian et al. 2024, arXiv 2402.14740)"
_RPP = "REINFORCE++ (Hu 2025, arXiv 2501.03262)"
_RLHF = "PPO-RLHF (Ouyang et al. 2022; Huang et al., 'The N implementation details of RLHF with PPO')"
_BOOK = "book/algorithms.md, the preset's box (grpo_ref's stated choice)"

SOURCE_FACTS = {
    "grpo": [
        ("loss_fn", "grpo", f"{_DSM}: critic-free, the group is the baseline"),
        ("adv_estimator", "grpo", f"{_DSM} sec. 4.1.2: A_i = (R_i - mean(R_group)) / std(R_group)"),
        ("adv_scale", "group", f"{_DSM} sec. 4.1.2: divided by the group's std"),
        ("adv_eps", 1e-6, "verl core_algos grpo: (R - mean) / (std + 1e-6); the paper gives no epsilon"),
        ("ratio_level", "token", f"{_DSM} eq. 3: one ratio per token"),
        ("pg_objective", "clip", f"{_DSM} eq. 3: min(r A, clip(r, 1 - eps, 1 + eps) A)"),
        ("eps_low", 0.2, "TRL GRPOConfig epsilon=0.2 (the paper gives no eps; 0.2 is PPO's)"),
        ("eps_high", 0.2, "TRL GRPOConfig epsilon_high=None, i.e. = epsilon"),
        ("loss_agg_mode", "seq-mean-token-mean", f"{_DSM} eq. 3: (1/G) sum_i (1/|o_i|) sum_t"),
        ("kl_coef", 0.04, f"{_DSM} sec. 4.2: beta = 0.04"),
        ("kl_estimator", "k3", f"{_DSM} eq. 4: pi_ref/pi - log(pi_ref/pi) - 1"),
        ("kl_placement", "loss", f"{_DSM} eq. 3: the KL is a term of the loss, not of the reward"),
        ("group_size", 8, "TRL GRPOConfig num_generations=8 (the paper samples G = 64)"),
    ],
    "dr_grpo": [
        ("adv_estimator", "grpo", f"{_DRG}: GRPO's group baseline"),
        ("adv_scale", "none", f"{_DRG}: A_i = R_i - mean(R_group), no division by the std"),
        ("loss_agg_mode", "seq-mean-token-sum-norm", f"{_DRG}: token sums divided by a constant, not by |o_i|"),
        ("norm_length", None, "verl seq-mean-token-sum-norm: the constant defaults to the padded length T"),
        ("kl_coef", 0.0, f"{_DRG}: no KL term (TRL's beta default 0.0)"),
    ],
    "dapo": [
        ("eps_low", 0.2, f"{_DAPO}: clip-higher, eps_low = 0.2"),
        ("eps_high", 0.28, f"{_DAPO}: clip-higher, eps_high = 0.28"),
        ("loss_agg_mode", "token-mean", f"{_DAPO}: token-level loss, sum over the batch's tokens / their count"),
        ("kl_coef", 0.0, f"{_DAPO}: no KL term"),
        ("filter_groups", True, f"{_DAPO}: dynamic sampling drops groups whose rewards are all equal"),
        ("adv_estimator", "grpo", f"{_DAPO}: GRPO's group-normalised advantage"),
        ("adv_scale", "group", f"{_DAPO}: GRPO's group-normalised advantage"),
    ],
    "gspo": [
        ("ratio_level", "sequence", f"{_GSPO}: s_i = exp((1/|y_i|) sum_t (lp - old))"),
        ("eps_low", 3e-4, f"{_GSPO} sec. 5.1: eps_low = 3e-4"),
        ("eps_high", 4e-4, f"{_GSPO} sec. 5.1: eps_high = 4e-4"),
        ("kl_coef", 0.0, f"{_GSPO}: no KL term"),
        ("loss_agg_mode", "seq-mean-token-mean", f"{_GSPO}: J = (1/G) sum_i min(s_i A_i, ...), one term per sequence"),
        ("adv_estimator", "grpo", f"{_GSPO}: GRPO's group advantage"),
        ("adv_scale", "group", f"{_GSPO}: GRPO's group advantage"),
    ],
    "rloo": [
        ("adv_estimator", "rloo", f"{_RLOO}: A_i = R_i - mean_(j != i) R_j"),
        ("kl_placement", "reward", f"{_RLOO}: the KL penalty shapes the sequence reward, as in RLHF"),
        ("kl_coef", 0.0, f"{_BOOK}: beta > 0 is an override"),
        ("loss_agg_mode", "token-mean", "OpenRLHF (which implements RLOO): token-level loss by default"),
    ],
    "reinforce_pp": [
        ("adv_estimator", "reinforce_pp", f"{_RPP}: return-to-go whitened over the global batch, no critic"),
        ("kl_estimator", "k1", f"{_RPP}: KL(t) = log(pi_old / pi_ref) per token"),
        ("kl_placement", "reward", f"{_RPP}: the per-token KL is subtracted from the reward"),
        ("gamma", 1.0, f"{_RPP}: gamma = 1"),
        ("loss_agg_mode", "token-mean", "OpenRLHF (REINFORCE++'s implementation): token-level loss by default"),
        ("kl_coef", 0.01, f"{_BOOK}: -0.01 k1 in the per-token reward"),
    ],
    "ppo": [
        ("loss_fn", "ppo", f"{_RLHF}: actor and learned critic"),
        ("adv_estimator", "gae", f"{_RLHF}: GAE over the per-token rewards"),
        ("gamma", 1.0, f"{_RLHF}: gamma = 1"),
        ("lam", 0.95, f"{_RLHF}: lambda = 0.95"),
        ("whiten_advantages", True, f"{_RLHF}: advantages whitened"),
        ("kl_estimator", "k1", f"{_RLHF}: r_t = -beta (old - ref)"),
        ("kl_placement", "reward", f"{_RLHF}: the KL is in the per-token reward"),
        ("eps_low", 0.2, f"{_RLHF}: policy clip 0.2"),
        ("eps_high", 0.2, f"{_RLHF}: policy clip 0.2"),
        ("loss_agg_mode", "token-mean", "verl actor loss_agg_mode default token-mean"),
        ("kl_coef", 0.05, f"{_BOOK}: -0.05 k1 (TRL's PPOConfig kl_coef)"),
        ("vf_coef", 0.5, f"{_BOOK}: L = L_pg + 0.5 L_V"),
        ("value_clip", 0.2, f"{_BOOK}: clip(V' - V, +-0.2)"),
        ("group_size", 1, f"{_BOOK}: no group statistics"),
    ],
}


def test_every_preset_has_source_facts():
    assert set(SOURCE_FACTS) == set(PRESETS)


@pytest.mark.parametrize(
    "name,field,value,source", [(n, f, v, s) for n, facts in SOURCE_FACTS.items() for f, v, s in facts]
)
def test_preset_field_is_its_source(name, field, value, source):
    got = getattr(PRESETS[name], field)
    assert got == value and type(got) is type(value), f"PRESETS[{name!r}].{field} = {got!r}, {source} says {value!r}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_fields_not_fixed_by_the_source_are_the_defaults(name):
    fixed = {f for f, _, _ in SOURCE_FACTS[name]} | {"name"}
    default = AlgoConfig()
    other = {f.name: getattr(PRESETS[name], f.name) for f in fields(AlgoConfig) if f.name not in fixed}
    assert other == {k: getattr(default, k) for k in other}
    assert PRESETS[name].name == name


# ------------------------------------------------------------------------------------------------ validation
# (field, values refused, values accepted at or next to the edges); the refusal names the field and shows the value.
FIELD_BOUNDS = [
    ("eps_low", [0.0, -TINY, 1.0 + TINY, 2.0, math.nan, math.inf, True, "0.2"], [TINY, 0.5, 1.0]),
    ("eps_high", [0.0, -TINY, math.nan, math.inf, False], [TINY, 1.0, 5.0]),
    ("dual_clip", [1.0, 1.0 - TINY, 0.5, math.nan, math.inf, True], [None, 1.0 + 1e-6, 3.0]),
    ("sapo_tau_pos", [0.0, -TINY, math.nan, math.inf, True], [TINY, 1.0, 7.0]),
    ("sapo_tau_neg", [0.0, -TINY, math.nan, math.inf, True], [TINY, 1.05, 7.0]),
    ("adv_eps", [-TINY, math.nan, math.inf, True], [0.0, 0.5, 3.0]),
    ("kl_coef", [-TINY, math.nan, math.inf, True], [0.0, 0.5, 3.0]),
    ("vf_coef", [-TINY, math.nan, math.inf, True], [0.0, 0.5, 3.0]),
    ("ent_coef", [-TINY, math.nan, math.inf, True], [0.0, 0.5, 3.0]),
    ("gamma", [-TINY, 1.0 + TINY, 1.5, math.nan, True], [0.0, 0.5, 1.0]),
    ("lam", [-TINY, 1.0 + TINY, 1.5, math.nan, True], [0.0, 0.5, 1.0]),
    ("value_clip", [0.0, -TINY, math.nan, math.inf, True], [None, TINY, 1.5]),
    ("norm_length", [0, -1, 0.0, math.nan, math.inf, True], [None, TINY, 1, 4096]),
    ("group_size", [0, -1, 2.5, True, "8", None], [2, 8]),
    ("max_response_length", [0, -1, 2.5, True], [None, 1, 512]),
    ("name", [3, None, b"grpo"], ["grpo", "my run", ""]),
]
BOOL_FIELDS = ("whiten_advantages", "filter_groups", "kl_ratio_weighted", "global_token_norm")
CHOICES = {
    "loss_fn": ("grpo", "ppo"),
    "adv_estimator": ADV_ESTIMATORS,
    "adv_scale": ("group", "batch", "none"),
    "ratio_level": ("token", "sequence"),
    "loss_agg_mode": LOSS_AGG_MODES,
    "kl_estimator": KL_ESTIMATORS,
    "kl_placement": ("loss", "reward"),
    "pg_objective": PG_OBJECTIVES,
    "unscorable": ("refuse", "zero_advantage"),
    "ent_agg_mode": (None,) + LOSS_AGG_MODES,
}


def _valid_neighbours(field, value) -> dict:
    """The other fields a value needs to be legal (a choice's own requirements), so only ``field`` is tested."""
    if field == "adv_estimator" and value == "gae":
        return dict(loss_fn="ppo")
    if field == "global_token_norm" and value is True:
        return dict(loss_agg_mode="token-mean")
    return {}


@pytest.mark.parametrize("field,bad", [(f, v) for f, bads, _ in FIELD_BOUNDS for v in bads], ids=repr)
def test_field_refused_by_name(field, bad):
    msg = refused(lambda: AlgoConfig(**{field: bad}), field)
    assert repr(bad) in msg or str(bad) in msg or repr(float(bad)) in msg, msg


@pytest.mark.parametrize("field,good", [(f, v) for f, _, goods in FIELD_BOUNDS for v in goods], ids=repr)
def test_field_accepted_at_its_edge(field, good):
    cfg = AlgoConfig(**{field: good})
    assert getattr(cfg, field) == good


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_flag_refused_unless_bool(field, bad):
    refused(lambda: AlgoConfig(**{field: bad}), field)


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("good", [True, False])
def test_flag_accepts_bools(field, good):
    cfg = AlgoConfig(**{field: good, **_valid_neighbours(field, good)})
    assert getattr(cfg, field) is good


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in CHOICES.items() for v in vs])
def test_choice_accepted(field, value):
    extra = _valid_neighbours(field, value)
    if field == "unscorable" and value == "zero_advantage":
        extra = dict(adv_estimator="grpo")
    assert getattr(AlgoConfig(**{field: value, **extra}), field) == value


@pytest.mark.parametrize("field", sorted(CHOICES))
@pytest.mark.parametrize("bad", ["Xx", 3])
def test_choice_refused_by_name(field, bad):
    msg = refused(lambda: AlgoConfig(**{field: bad}), field)
    assert repr(bad) in msg


def test_group_estimators_need_two_members_and_the_others_do_not():
    for est in GROUP_ESTIMATORS:
        refused(lambda est=est: AlgoConfig(adv_estimator=est, group_size=1), "group_size", est, "1")
        assert AlgoConfig(adv_estimator=est, group_size=2).group_size == 2
    assert AlgoConfig(adv_estimator="reinforce_pp", group_size=1).group_size == 1
    assert AlgoConfig(adv_estimator="gae", loss_fn="ppo", group_size=1).group_size == 1


def test_process_supervision_needs_a_group_and_takes_no_reward_shaping():
    """``adv_estimator='process'`` normalises over the group's steps (DeepSeekMath sec. 4.1.3): one member is
    refused; a KL in the reward (with a coefficient) and DAPO's overlong shaping would change the scores it does
    not read, so both are refused rather than silently ignored."""
    refused(lambda: AlgoConfig(adv_estimator="process", group_size=1), "group_size", "process", "1")
    refused(lambda: AlgoConfig(adv_estimator="process", kl_placement="reward", kl_coef=0.05),
            "process", "kl_placement", "reward")
    refused(lambda: AlgoConfig(adv_estimator="process", overlong_buffer=2, max_response_length=8),
            "process", "overlong_buffer", "2")
    assert AlgoConfig(adv_estimator="process", kl_placement="reward", kl_coef=0.0).kl_coef == 0.0
    assert AlgoConfig(adv_estimator="process", group_size=2).kl_placement == "loss"


def test_dual_clip_only_with_the_clip_objective():
    for obj in ("cispo", "sapo"):
        refused(
            lambda obj=obj: AlgoConfig(pg_objective=obj, dual_clip=3.0), "dual_clip", "pg_objective", repr(obj)[1:-1]
        )
        assert AlgoConfig(pg_objective=obj).dual_clip is None
    assert AlgoConfig(pg_objective="clip", dual_clip=3.0).dual_clip == 3.0


def test_kl_ratio_weighted_only_with_the_kl_in_the_loss():
    refused(
        lambda: AlgoConfig(kl_ratio_weighted=True, kl_placement="reward"), "kl_ratio_weighted", "kl_placement", "reward"
    )
    assert AlgoConfig(kl_ratio_weighted=True, kl_placement="loss").kl_ratio_weighted is True
    assert AlgoConfig(kl_ratio_weighted=False, kl_placement="reward").kl_placement == "reward"


@pytest.mark.parametrize("mode", [m for m in LOSS_AGG_MODES if m != "token-mean"])
def test_global_token_norm_only_under_token_mean(mode):
    refused(
        lambda: AlgoConfig(global_token_norm=True, loss_agg_mode=mode),
        "global_token_norm",
        "loss_agg_mode",
        "token-mean",
    )
    assert AlgoConfig(global_token_norm=False, loss_agg_mode=mode).loss_agg_mode == mode


@pytest.mark.parametrize("est", ADV_ESTIMATORS)
def test_unscorable_zero_advantage_only_with_a_group_estimator(est):
    extra = dict(loss_fn="ppo") if est == "gae" else {}
    assert AlgoConfig(adv_estimator=est, unscorable="refuse", **extra).unscorable == "refuse"
    if est in GROUP_ESTIMATORS:
        assert AlgoConfig(adv_estimator=est, unscorable="zero_advantage").unscorable == "zero_advantage"
    else:
        refused(
            lambda: AlgoConfig(adv_estimator=est, unscorable="zero_advantage", **extra),
            "unscorable",
            "adv_estimator",
            est,
        )


def test_gae_needs_the_critic_loss():
    refused(lambda: AlgoConfig(adv_estimator="gae", loss_fn="grpo"), "adv_estimator", "loss_fn", "gae", "ppo")
    assert AlgoConfig(adv_estimator="gae", loss_fn="ppo").loss_fn == "ppo"
    assert AlgoConfig(adv_estimator="grpo", loss_fn="ppo").loss_fn == "ppo"


def test_overlong_buffer_bounds():
    for mrl in (1, 8):
        assert AlgoConfig(overlong_buffer=mrl, max_response_length=mrl).overlong_buffer == mrl  # edge: equal
        assert AlgoConfig(overlong_buffer=1, max_response_length=mrl).overlong_buffer == 1
        refused(
            lambda mrl=mrl: AlgoConfig(overlong_buffer=mrl + 1, max_response_length=mrl),
            "overlong_buffer",
            "max_response_length",
            str(mrl + 1),
            str(mrl),
        )
    refused(lambda: AlgoConfig(overlong_buffer=4), "overlong_buffer", "max_response_length", "None")
    for bad in (0, -1, 2.0, True):
        refused(lambda bad=bad: AlgoConfig(overlong_buffer=bad, max_response_length=8), "overlong_buffer", str(bad))
    assert AlgoConfig(max_response_length=8).overlong_buffer is None


# ------------------------------------------------------------------------------------ replace / to_dict / presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_round_trips(name):
    cfg = PRESETS[name]
    d = cfg.to_dict()
    assert isinstance(d, dict) and list(d) == [f.name for f in fields(AlgoConfig)]
    assert d == {f.name: getattr(cfg, f.name) for f in fields(AlgoConfig)}
    assert AlgoConfig(**d) == cfg
    d["kl_coef"] = 0.5
    assert cfg.kl_coef == PRESETS[name].kl_coef  # a copy, not a view


def test_replace_changes_only_the_named_fields_and_validates():
    base = AlgoConfig()
    new = base.replace(kl_coef=0.5, eps_high=0.3)
    assert (new.kl_coef, new.eps_high) == (0.5, 0.3) and base.kl_coef == 0.04
    assert {f.name: getattr(new, f.name) for f in fields(AlgoConfig) if f.name not in ("kl_coef", "eps_high")} == {
        f.name: getattr(base, f.name) for f in fields(AlgoConfig) if f.name not in ("kl_coef", "eps_high")
    }
    assert base.replace() == base
    refused(lambda: base.replace(kl_coef=-1.0), "kl_coef")
    msg = refused(lambda: base.replace(kl_coeff=0.1, beta=0.2, kl_coef=0.3), "kl_coeff", "beta", "kl_coef")
    assert msg.index("beta") < msg.index("kl_coeff")  # sorted
    refused(lambda: base.replace(epsilon=0.2), "epsilon")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_get_preset(name):
    assert G.get_preset(name) == PRESETS[name]
    new = G.get_preset(name, ent_coef=0.125)
    assert new == PRESETS[name].replace(ent_coef=0.125) and new.ent_coef == 0.125 and PRESETS[name].ent_coef == 0.0
    refused(lambda: G.get_preset(name, ent_coef=-1.0), "ent_coef")
    refused(lambda: G.get_preset(name, entcoef=1.0), "entcoef")


@pytest.mark.parametrize("bad", ["ppo2", "GRPO", "", 3])
def test_get_preset_unknown_name(bad):
    msg = refused(lambda: G.get_preset(bad), "name")
    assert repr(bad) in msg


# ---------------------------------------------------------------------------------------------------- LossInputs
B, T, GS = 4, 5, 2
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=F64)
TENSOR_FIELDS = ("logp", "old_logp", "advantages", "mask", "ref_logp", "entropy", "values", "old_values", "returns")
REQUIRED = ("logp", "old_logp", "advantages", "mask")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(seed=0, mask=MASK, **over) -> LossInputs:
    b, t = mask.shape if torch.is_tensor(mask) else MASK.shape
    g = _gen(seed)
    old = -(torch.rand(b, t, generator=g, dtype=F64) * 2 + 0.1)
    d = dict(
        logp=old + torch.randn(b, t, generator=g, dtype=F64) * 0.6,
        old_logp=old,
        advantages=torch.randn(b, t, generator=g, dtype=F64),
        mask=mask,
        ref_logp=old + torch.randn(b, t, generator=g, dtype=F64) * 0.5,
        entropy=torch.rand(b, t, generator=g, dtype=F64) * 2,
        values=torch.randn(b, t, generator=g, dtype=F64),
        old_values=torch.randn(b, t, generator=g, dtype=F64),
        returns=torch.randn(b, t, generator=g, dtype=F64),
    )
    d.update(over)
    return LossInputs(**d)


@pytest.mark.parametrize("field", TENSOR_FIELDS)
@pytest.mark.parametrize("bad", [[0.0], 1.0, "x", "complex"])
def test_loss_inputs_field_type_refused_by_name(field, bad):
    value = torch.zeros(B, T, dtype=torch.complex64) if bad == "complex" else bad
    refused(lambda: _inputs(**{field: value}), f"LossInputs.{field}")


@pytest.mark.parametrize("field", TENSOR_FIELDS)
def test_loss_inputs_none_only_for_optional_fields(field):
    if field in REQUIRED:
        refused(lambda: _inputs(**{field: None}), f"LossInputs.{field}")
    else:
        assert getattr(_inputs(**{field: None}), field) is None


def test_loss_inputs_num_tokens():
    for bad in (0.0, -TINY, math.nan, math.inf, True, "3"):
        refused(lambda bad=bad: _inputs(num_tokens=bad), "LossInputs.num_tokens")
    for good in (None, TINY, 3, 12.5, torch.tensor(7.0)):
        assert _inputs(num_tokens=good).num_tokens is good


# ------------------------------------------------------------------------------------------- compute_loss dispatch
def _expected_loss(inp: LossInputs, cfg: AlgoConfig):
    """``compute_loss`` written with the public math functions called directly."""
    num = inp.num_tokens if cfg.global_token_norm else None
    loss, metrics = G.policy_loss(
        inp.logp,
        inp.old_logp,
        inp.advantages,
        inp.mask,
        pg_objective=cfg.pg_objective,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        dual_clip=cfg.dual_clip,
        sapo_tau_pos=cfg.sapo_tau_pos,
        sapo_tau_neg=cfg.sapo_tau_neg,
        ratio_level=cfg.ratio_level,
        loss_agg_mode=cfg.loss_agg_mode,
        norm_length=cfg.norm_length,
        num_tokens=num,
        ref_logp=inp.ref_logp,
        kl_coef=cfg.kl_coef if cfg.kl_placement == "loss" else 0.0,
        kl_estimator=cfg.kl_estimator,
        kl_ratio_weighted=cfg.kl_ratio_weighted,
        entropy=inp.entropy,
    )
    if cfg.ent_coef > 0:
        mode = cfg.ent_agg_mode or cfg.loss_agg_mode
        loss = loss - cfg.ent_coef * G.entropy_bonus(inp.entropy, inp.mask, mode, cfg.norm_length)
    if cfg.loss_fn == "ppo":
        vf, vm = G.value_loss(inp.values, inp.old_values, inp.returns, inp.mask, cfg.value_clip, cfg.loss_agg_mode)
        metrics = {**metrics, **vm, "vf_loss": vf.detach()}
        loss = loss + cfg.vf_coef * vf
    return loss, metrics


# A config where every option of the loss is away from its default and from the other options' values.
RICH = dict(
    eps_low=0.15,
    eps_high=0.35,
    kl_coef=0.07,
    kl_estimator="k2",
    loss_agg_mode="seq-mean-token-sum",
    sapo_tau_pos=0.7,
    sapo_tau_neg=1.6,
    ent_coef=0.03,
    vf_coef=0.7,
    value_clip=0.3,
    norm_length=9,
)
LOSS_CASES = {
    "clip": dict(RICH),
    "dual_clip": dict(RICH, dual_clip=1.3),
    "cispo": dict(RICH, pg_objective="cispo"),
    "sapo": dict(RICH, pg_objective="sapo"),
    "sequence": dict(RICH, ratio_level="sequence"),
    "kl_k3": dict(RICH, kl_estimator="k3"),
    "kl_ratio_weighted": dict(RICH, kl_ratio_weighted=True),
    "kl_in_reward": dict(RICH, kl_placement="reward"),
    "ent_agg": dict(RICH, ent_agg_mode="token-sum"),
    "ent_agg_norm": dict(RICH, ent_agg_mode="seq-mean-token-sum-norm"),
    "ent_agg_norm_T": dict(RICH, ent_agg_mode="seq-mean-token-sum-norm", norm_length=None),
    "no_entropy_bonus": dict(RICH, ent_coef=0.0),
    "global_token_norm": dict(RICH, loss_agg_mode="token-mean", global_token_norm=True),
    **{f"agg={m}": dict(RICH, loss_agg_mode=m) for m in LOSS_AGG_MODES},
    "agg_norm_T": dict(RICH, loss_agg_mode="seq-mean-token-sum-norm", norm_length=None),
    "ppo": dict(RICH, loss_fn="ppo"),
    "ppo_no_value_clip": dict(RICH, loss_fn="ppo", value_clip=None),
    "ppo_norm": dict(RICH, loss_fn="ppo", loss_agg_mode="seq-mean-token-sum-norm"),
}
# For each case: options whose change must change the loss on the test inputs (the comparison is then sensitive).
ALT = dict(
    eps_low=0.05,
    eps_high=0.02,
    kl_coef=0.2,
    ent_coef=0.2,
    loss_agg_mode="token-sum",
    kl_estimator="abs",
    ratio_level="token",
    pg_objective="clip",
    dual_clip=2.5,
    sapo_tau_pos=1.9,
    sapo_tau_neg=0.4,
    norm_length=3,
    ent_agg_mode="token-mean",
    vf_coef=0.1,
    value_clip=0.05,
)


def _loss_inputs(cfg, mask=MASK):
    return _inputs(seed=7, mask=mask, num_tokens=23.5 if cfg.global_token_norm else None)


def _allclose(a, b):
    return torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_compute_loss_is_the_math_functions(case):
    cfg = AlgoConfig(**LOSS_CASES[case])
    inp = _loss_inputs(cfg)
    loss, metrics = G.compute_loss(inp, cfg)
    want, want_metrics = _expected_loss(inp, cfg)
    assert loss.dtype == F64 and _allclose(loss, want), (loss, want)
    assert set(metrics) == set(want_metrics)
    for k in metrics:
        assert _allclose(metrics[k].to(F64), want_metrics[k].to(F64)), k
        assert not metrics[k].requires_grad
    reg, _ = G.LOSS_REGISTRY[cfg.loss_fn](inp, cfg)
    assert _allclose(reg, loss)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_compute_loss_options_matter_on_these_inputs(case):
    """Every option the case sets changes the loss (so the equality above would catch it passed wrongly)."""
    base = LOSS_CASES[case]
    cfg = AlgoConfig(**base)
    inp = _loss_inputs(cfg)
    loss = G.compute_loss(inp, cfg)[0]
    opts = [k for k in base if k in ALT and base[k] != ALT[k] and base[k] is not None]
    if cfg.pg_objective != "sapo":
        opts = [k for k in opts if not k.startswith("sapo")]
    if cfg.kl_placement == "reward":
        opts = [k for k in opts if k not in ("kl_coef", "kl_estimator")]
    if cfg.pg_objective == "sapo":
        opts = [k for k in opts if k not in ("eps_low", "eps_high")]
    if cfg.loss_fn != "ppo":
        opts = [k for k in opts if k not in ("vf_coef", "value_clip")]
    if cfg.ent_coef == 0:
        opts = [k for k in opts if k != "ent_agg_mode"]
    if cfg.global_token_norm:
        opts = [k for k in opts if k != "loss_agg_mode"]
    if "seq-mean-token-sum-norm" not in (cfg.loss_agg_mode, cfg.ent_agg_mode):
        opts = [k for k in opts if k != "norm_length"]
    for k in opts:
        other = G.compute_loss(inp, cfg.replace(**{k: ALT[k]}))[0]
        assert not _allclose(other, loss), f"{case}: {k} does not change the loss on these inputs"


def test_kl_in_the_reward_leaves_no_kl_term_in_the_loss():
    cfg = AlgoConfig(**RICH, kl_placement="reward")
    inp = _loss_inputs(cfg)
    assert _allclose(G.compute_loss(inp, cfg)[0], G.compute_loss(inp, cfg.replace(kl_coef=0.0))[0])
    loss_cfg = cfg.replace(kl_placement="loss")
    assert not _allclose(G.compute_loss(inp, cfg)[0], G.compute_loss(inp, loss_cfg)[0])


def test_entropy_bonus_under_sum_norm_divides_by_norm_length_or_T():
    """``seq-mean-token-sum-norm`` bonus: ``norm_length``, else the padded length ``T`` (also ``T = 1``)."""
    for mask in (MASK, MASK[:, :1], MASK[:, :2]):
        t = mask.shape[1]
        for norm in (None, 3):
            cfg = AlgoConfig(ent_coef=0.5, kl_coef=0.0, ent_agg_mode="seq-mean-token-sum-norm", norm_length=norm)
            inp = _inputs(seed=3, mask=mask)
            with_bonus = G.compute_loss(inp, cfg)[0]
            without = G.compute_loss(inp, cfg.replace(ent_coef=0.0))[0]
            h = (inp.entropy * mask).sum(-1) / (norm if norm is not None else t)
            assert _allclose(without - with_bonus, 0.5 * h.mean())


def test_entropy_needed_only_for_a_bonus():
    cfg = AlgoConfig(ent_coef=0.0)
    loss = G.compute_loss(_inputs(entropy=None), cfg)[0]
    assert torch.isfinite(loss)
    refused(lambda: G.compute_loss(_inputs(entropy=None), cfg.replace(ent_coef=TINY)), "ent_coef", "LossInputs.entropy")


def test_num_tokens_goes_with_global_token_norm_only():
    cfg = AlgoConfig(loss_agg_mode="token-mean", global_token_norm=True)
    refused(lambda: G.compute_loss(_inputs(), cfg), "global_token_norm", "LossInputs.num_tokens", "None")
    refused(
        lambda: G.compute_loss(_inputs(num_tokens=5.0), cfg.replace(global_token_norm=False)),
        "LossInputs.num_tokens",
        "global_token_norm",
        "5.0",
    )
    a = G.compute_loss(_inputs(num_tokens=5.0), cfg)[0]
    b = G.compute_loss(_inputs(num_tokens=10.0), cfg)[0]
    assert _allclose(a, 2 * b)


def test_ppo_loss_needs_each_critic_field():
    cfg = PRESETS["ppo"]
    for f in ("values", "old_values", "returns"):
        refused(lambda f=f: G.compute_loss(_inputs(**{f: None}), cfg), f)
        refused(lambda f=f: G.ppo_loss(_inputs(**{f: None}), cfg), f)
    assert (
        "vf_loss" in G.compute_loss(_inputs(), cfg)[1]
        and "vf_loss" not in G.compute_loss(_inputs(), PRESETS["grpo"])[1]
    )


def test_compute_loss_refuses_other_types_by_name():
    refused(lambda: G.compute_loss({"logp": 0}, PRESETS["grpo"]), "inp", "dict")
    refused(lambda: G.compute_loss(_inputs(), {"loss_fn": "grpo"}), "cfg", "dict")
    refused(lambda: G.compute_loss(_inputs(), "grpo"), "cfg", "str")


# ------------------------------------------------------------------------------------ compute_advantages dispatch
SCORES = torch.tensor([1.0, 0.25, -0.5, 2.0], dtype=F64)
AMASK = torch.tensor(
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=F64
)  # a hole, an empty row
OLD = -(torch.rand(B, T, generator=_gen(11), dtype=F64) + 0.2)
REF = OLD + torch.randn(B, T, generator=_gen(12), dtype=F64) * 0.7
VALUES = torch.randn(B, T, generator=_gen(13), dtype=F64)
ZERO = torch.zeros(B, T, dtype=F64)


def _adv(cfg, scores=SCORES, mask=AMASK, **kw):
    kw = {"old_logp": OLD, "ref_logp": REF, "values": VALUES, **kw}
    return G.compute_advantages(cfg, scores, mask, **kw)


def _expected_adv(cfg, scores=SCORES, mask=AMASK):
    """``compute_advantages`` written with the public math functions called directly."""
    beta = cfg.kl_coef if cfg.kl_placement == "reward" else 0.0
    if cfg.overlong_buffer is not None:
        scores = scores + G.overlong_penalty(mask.sum(-1), cfg.max_response_length, cfg.overlong_buffer).to(F64)
    token_rewards = G.kl_in_reward(scores, OLD, REF, mask, beta, cfg.kl_estimator)
    seq = scores - beta * G.masked_sum(G.kl_estimate(OLD, REF, cfg.kl_estimator), mask, dim=-1)
    est, returns = cfg.adv_estimator, None
    if est == "grpo":
        adv = G.grpo_advantages(seq, cfg.group_size, cfg.adv_scale, cfg.adv_eps)[:, None] * mask
    elif est == "rloo":
        adv = G.rloo_advantages(seq, cfg.group_size)[:, None] * mask
    elif est == "reinforce_pp":
        adv = G.reinforce_pp_advantages(token_rewards, mask, cfg.gamma)
    elif est == "reinforce_pp_baseline":
        adv = G.reinforce_pp_advantages(token_rewards, mask, cfg.gamma, group_size=cfg.group_size)
    else:
        adv, returns = G.gae_advantages(token_rewards, VALUES, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = G.masked_whiten(adv, mask)
    return adv, returns


ADV_RICH = dict(group_size=GS, adv_eps=0.3, gamma=0.8, lam=0.6, kl_coef=0.3, kl_estimator="k2")
ADV_CASES = {
    **{f"grpo_{s}": dict(ADV_RICH, adv_scale=s) for s in ("group", "batch", "none")},
    "grpo_kl_reward": dict(ADV_RICH, kl_placement="reward"),
    "grpo_kl_reward_k1": dict(ADV_RICH, kl_placement="reward", kl_estimator="k1"),
    "grpo_overlong": dict(ADV_RICH, overlong_buffer=3, max_response_length=4),
    "rloo": dict(ADV_RICH, adv_estimator="rloo"),
    "rloo_kl_reward": dict(ADV_RICH, adv_estimator="rloo", kl_placement="reward"),
    "rloo_g4": dict(ADV_RICH, adv_estimator="rloo", group_size=4),
    "reinforce_pp": dict(ADV_RICH, adv_estimator="reinforce_pp"),
    "reinforce_pp_kl": dict(ADV_RICH, adv_estimator="reinforce_pp", kl_placement="reward"),
    "reinforce_pp_kl_k3": dict(ADV_RICH, adv_estimator="reinforce_pp", kl_placement="reward", kl_estimator="k3"),
    "reinforce_pp_baseline": dict(ADV_RICH, adv_estimator="reinforce_pp_baseline"),
    "reinforce_pp_baseline_kl": dict(ADV_RICH, adv_estimator="reinforce_pp_baseline", kl_placement="reward"),
    "gae": dict(ADV_RICH, adv_estimator="gae", loss_fn="ppo"),
    "gae_whiten": dict(ADV_RICH, adv_estimator="gae", loss_fn="ppo", whiten_advantages=True),
    "gae_kl": dict(ADV_RICH, adv_estimator="gae", loss_fn="ppo", kl_placement="reward", whiten_advantages=True),
    "gae_overlong": dict(
        ADV_RICH, adv_estimator="gae", loss_fn="ppo", kl_placement="reward", overlong_buffer=2, max_response_length=4
    ),
    "grpo_lenient": dict(ADV_RICH, unscorable="zero_advantage"),
}
ADV_ALT = dict(
    adv_scale="none",
    adv_eps=0.05,
    gamma=0.5,
    lam=0.9,
    kl_coef=0.05,
    kl_estimator="abs",
    whiten_advantages=False,
    group_size=4,
    overlong_buffer=1,
    max_response_length=3,
)


@pytest.mark.parametrize("case", sorted(ADV_CASES))
def test_compute_advantages_is_the_math_functions(case):
    cfg = AlgoConfig(**ADV_CASES[case])
    adv, ret = _adv(cfg)
    want, want_ret = _expected_adv(cfg)
    assert adv.dtype == F64 and adv.shape == (B, T) and torch.allclose(adv, want, rtol=1e-10, atol=1e-12), (adv, want)
    assert bool((adv[AMASK == 0] == 0).all())
    if want_ret is None:
        assert ret is None
    else:
        assert ret.dtype == F64 and torch.allclose(ret, want_ret, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", sorted(ADV_CASES))
def test_compute_advantages_options_matter_on_these_inputs(case):
    base = ADV_CASES[case]
    cfg = AlgoConfig(**base)
    adv, ret = _adv(cfg)
    opts = [k for k in base if k in ADV_ALT and base[k] != ADV_ALT[k]]
    est = cfg.adv_estimator
    if cfg.kl_placement != "reward":
        opts = [k for k in opts if k not in ("kl_coef", "kl_estimator")]
    if est != "grpo":
        opts = [k for k in opts if k not in ("adv_scale", "adv_eps")]
    if cfg.adv_scale == "none":
        opts = [k for k in opts if k != "adv_eps"]
    if est not in ("reinforce_pp", "gae"):
        opts = [k for k in opts if k != "gamma"]
    if est != "gae":
        opts = [k for k in opts if k != "lam"]
    if est not in GROUP_ESTIMATORS:
        opts = [k for k in opts if k != "group_size"]
    if cfg.overlong_buffer is not None:
        opts += ["overlong_buffer"]
    for k in opts:
        change = {k: ADV_ALT[k]}
        if k == "overlong_buffer":
            change = dict(overlong_buffer=1, max_response_length=3)
        other = _adv(cfg.replace(**change))[0]
        assert not torch.allclose(other, adv), f"{case}: {k} does not change the advantages on these inputs"


def test_sequence_estimators_see_the_kl_shaped_score():
    """RLOO/GRPO with the KL in the reward: the score of each sequence is ``R - beta sum_t k(t)`` (an empty response
    keeps its score), i.e. the same advantages as the plain estimator on those scores."""
    for est in ("grpo", "rloo"):
        cfg = AlgoConfig(adv_estimator=est, group_size=GS, kl_coef=0.3, kl_placement="reward", kl_estimator="k1")
        shaped = SCORES - 0.3 * ((OLD - REF) * AMASK).sum(-1)
        plain = _adv(cfg.replace(kl_coef=0.0), scores=shaped)[0]
        assert torch.allclose(_adv(cfg)[0], plain, rtol=1e-12, atol=1e-14)


def test_token_rewards_carry_the_score_on_the_last_response_token():
    """REINFORCE++ with gamma = 1 and no KL: the return at every response token of a sequence is its score (a hole in
    the mask included; the whitening is then over those returns); an empty row is 0."""
    cfg = AlgoConfig(adv_estimator="reinforce_pp", group_size=1, kl_coef=0.0)
    adv = _adv(cfg)[0]
    returns = SCORES[:, None] * AMASK
    assert torch.allclose(adv, G.masked_whiten(returns, AMASK), rtol=1e-12, atol=1e-14)
    gae = AlgoConfig(adv_estimator="gae", loss_fn="ppo", kl_coef=0.0, gamma=1.0, lam=1.0)
    _, ret = _adv(gae, values=ZERO)
    assert torch.allclose(ret, returns, rtol=0, atol=1e-14)  # returns = sum of future rewards = the score


def test_last_token_with_no_response_positions():
    for est in ("reinforce_pp", "gae"):
        cfg = AlgoConfig(adv_estimator=est, loss_fn="ppo" if est == "gae" else "grpo", group_size=1)
        adv, _ = G.compute_advantages(cfg, SCORES, torch.zeros(B, 0, dtype=F64), values=torch.zeros(B, 0, dtype=F64))
        assert adv.shape == (B, 0)
        adv, _ = G.compute_advantages(cfg, SCORES, torch.zeros(B, 3, dtype=F64), values=torch.zeros(B, 3, dtype=F64))
        assert bool((adv == 0).all())


def test_float64_kept_when_only_the_log_probs_are_float64():
    """With the KL in the reward the token rewards take the log-probs' dtype (a float32 mask does not narrow them)."""
    cfg = AlgoConfig(adv_estimator="reinforce_pp", group_size=1, kl_coef=0.3, kl_placement="reward", kl_estimator="k1")
    adv = G.compute_advantages(cfg, SCORES.float(), AMASK.float(), old_logp=OLD, ref_logp=REF)[0]
    assert adv.dtype == F64
    want = G.reinforce_pp_advantages(G.kl_in_reward(SCORES, OLD, REF, AMASK, 0.3, "k1"), AMASK)
    assert torch.allclose(adv, want, rtol=1e-12, atol=1e-14)
    adv32 = G.compute_advantages(cfg.replace(kl_coef=0.0), SCORES.float(), AMASK.float())[0]
    assert adv32.dtype == torch.float32


# unscorable completions: the statistics of the scorable members only (one NaN per group of 3 -> groups of 2 scorable)
NAN_SCORES = torch.tensor([1.0, math.nan, 0.2, math.nan, -0.5, 0.7], dtype=F64)
NAN_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=F64)
SCORABLE = ~torch.isnan(NAN_SCORES)


@pytest.mark.parametrize(
    "est,scale",
    [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("rloo", "group"), ("reinforce_pp_baseline", "group")],
)
def test_unscorable_members_get_zero_and_the_others_the_scorable_statistics(est, scale):
    cfg = AlgoConfig(adv_estimator=est, group_size=3, adv_scale=scale, adv_eps=0.1, unscorable="zero_advantage")
    adv, _ = G.compute_advantages(cfg, NAN_SCORES, NAN_MASK)
    assert adv.dtype == F64 and bool((adv[~SCORABLE] == 0).all())
    s, m = NAN_SCORES[SCORABLE], NAN_MASK[SCORABLE]
    if est == "grpo":
        want = G.grpo_advantages(s, 2, scale, 0.1)[:, None] * m
    elif est == "rloo":
        want = G.rloo_advantages(s, 2)[:, None] * m
    else:
        want = G.reinforce_pp_advantages(G.kl_in_reward(s, m * 0, m * 0, m, 0.0), m, group_size=2)
    assert torch.allclose(adv[SCORABLE], want, rtol=1e-12, atol=1e-14), (adv, want)


def test_unscorable_reinforce_pp_baseline_with_the_kl_in_the_reward():
    """The sequence score of a scorable member is the sum of its KL-shaped token rewards."""
    old = -(torch.rand(6, 3, generator=_gen(21), dtype=F64) + 0.2)
    ref = old + torch.randn(6, 3, generator=_gen(22), dtype=F64) * 0.5
    cfg = AlgoConfig(
        adv_estimator="reinforce_pp_baseline",
        group_size=3,
        kl_coef=0.2,
        kl_placement="reward",
        kl_estimator="k1",
        unscorable="zero_advantage",
    )
    adv, _ = G.compute_advantages(cfg, NAN_SCORES, NAN_MASK, old_logp=old, ref_logp=ref)
    s, m = NAN_SCORES[SCORABLE], NAN_MASK[SCORABLE]
    tr = G.kl_in_reward(s, old[SCORABLE], ref[SCORABLE], m, 0.2, "k1")
    assert torch.allclose(adv[SCORABLE], G.reinforce_pp_advantages(tr, m, group_size=2), rtol=1e-12, atol=1e-14)
    assert bool((adv[~SCORABLE] == 0).all())


def test_lenient_config_without_nan_is_the_plain_estimator():
    for est in ("grpo", "rloo", "reinforce_pp_baseline"):
        cfg = AlgoConfig(adv_estimator=est, group_size=GS, kl_coef=0.0)
        a = _adv(cfg)[0]
        b = _adv(cfg.replace(unscorable="zero_advantage"))[0]
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------- compute_advantages refusals
def test_compute_advantages_refusals_name_the_argument():
    grpo = AlgoConfig(group_size=GS)
    refused(lambda: G.compute_advantages("grpo", SCORES, AMASK), "cfg", "str")
    refused(lambda: G.compute_advantages(grpo, SCORES, AMASK[0]), "mask")
    refused(lambda: G.compute_advantages(grpo, SCORES, AMASK * 2), "mask")
    refused(lambda: G.compute_advantages(grpo, SCORES[:, None], AMASK), "scores", str((B, 1)))
    refused(lambda: G.compute_advantages(grpo, SCORES[:3], AMASK), "scores", str((3,)))
    refused(lambda: G.compute_advantages(grpo, torch.tensor([1.0, math.nan, 0.0, 0.0], dtype=F64), AMASK), "scores")
    lenient = grpo.replace(unscorable="zero_advantage")
    refused(lambda: G.compute_advantages(lenient, torch.tensor([1.0, math.inf, 0.0, 0.0], dtype=F64), AMASK), "scores")
    refused(lambda: G.compute_advantages(grpo, torch.ones(3), AMASK[:3]), "group_size", "scores", "3")
    refused(lambda: G.compute_advantages(AlgoConfig(adv_estimator="gae", loss_fn="ppo"), SCORES, AMASK), "values")


STEP_R = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.5], [0.0, 0.0, 0.0]], dtype=F64)
STEP_E = torch.tensor([[0, 1, 2], [1, 3, 4], [1, 3, 0], [0, 0, 0]])
STEP_M = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=F64)


def test_process_estimator_is_process_advantages():
    """``adv_estimator='process'``: the advantages are :func:`process_advantages` of the step rewards given (the
    outcome scores are not read: other scores give the same result); other step rewards give other advantages."""
    cfg = AlgoConfig(adv_estimator="process", group_size=GS, adv_eps=0.3)
    steps = (STEP_R, STEP_E, STEP_M)
    adv, ret = _adv(cfg, steps=steps)
    want = G.process_advantages(STEP_R, STEP_E, STEP_M, AMASK, GS, 0.3)
    assert ret is None and torch.allclose(adv, want, rtol=1e-12, atol=1e-14) and bool(want.abs().sum() > 0)
    assert torch.equal(_adv(cfg, scores=-SCORES, steps=steps)[0], adv)
    other = _adv(cfg, steps=(STEP_R.flip(0), STEP_E, STEP_M))[0]
    assert not torch.allclose(other, adv)


def test_step_rewards_only_with_the_process_estimator():
    steps = (STEP_R, STEP_E, STEP_M)
    refused(lambda: _adv(AlgoConfig(group_size=GS), steps=steps), "steps", "process", "grpo", "given")
    refused(lambda: _adv(AlgoConfig(adv_estimator="process", group_size=GS)), "steps", "process", "None")
    refused(lambda: _adv(AlgoConfig(adv_estimator="process", group_size=GS), steps=steps[:2]), "steps")


@pytest.mark.parametrize("missing", ["old_logp", "ref_logp"])
def test_kl_in_the_reward_needs_both_log_probs(missing):
    cfg = AlgoConfig(group_size=GS, kl_placement="reward", kl_coef=0.1)
    refused(lambda: _adv(cfg, **{missing: None}), "old_logp", "ref_logp")
    assert _adv(cfg.replace(kl_coef=0.0), **{missing: None})[0].shape == (B, T)  # no KL: not needed


@pytest.mark.parametrize("arg", ["old_logp", "ref_logp", "values"])
def test_compute_advantages_tensor_arguments(arg):
    kl_cfg = AlgoConfig(group_size=GS, kl_placement="reward", kl_coef=0.1)
    plain = AlgoConfig(group_size=GS, kl_coef=0.1)
    x = {"old_logp": OLD, "ref_logp": REF, "values": VALUES}[arg]
    for cfg in (kl_cfg, plain):
        refused(lambda cfg=cfg: _adv(cfg, **{arg: x[:, :-1]}), arg, str((B, T - 1)))
        refused(lambda cfg=cfg: _adv(cfg, **{arg: x[:-1]}), arg, str((B - 1, T)))
        refused(lambda cfg=cfg: _adv(cfg, **{arg: x > 0}), arg)
        refused(lambda cfg=cfg: _adv(cfg, **{arg: "x"}), arg)
    nan_in = x.clone()
    nan_in[1, 2] = math.nan
    nan_pad = x.clone()
    nan_pad[0, 4] = math.nan
    refused(lambda: _adv(kl_cfg, **{arg: nan_in}), arg)
    assert torch.equal(_adv(kl_cfg, **{arg: nan_pad})[0], _adv(kl_cfg)[0])
    if arg == "values":
        refused(lambda: _adv(plain, values=nan_in), "values")
    else:  # not used without the KL in the reward: ignored
        assert torch.equal(_adv(plain, **{arg: nan_in})[0], _adv(plain)[0])


def test_compute_advantages_empty_batch():
    for est in ADV_ESTIMATORS:
        cfg = AlgoConfig(
            adv_estimator=est,
            loss_fn="ppo" if est == "gae" else "grpo",
            group_size=GS,
            kl_coef=0.1,
            kl_placement="loss" if est == "process" else "reward",  # process: step rewards, no KL in the reward
        )
        z = torch.zeros(0, T, dtype=F64)
        steps = (torch.zeros(0, 2, dtype=F64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=F64))
        adv, ret = G.compute_advantages(cfg, torch.zeros(0, dtype=F64), z, old_logp=z, ref_logp=z, values=z,
                                        steps=steps if est == "process" else None)
        assert adv.shape == (0, T)


# ------------------------------------------------------------------------------------------ edges found by mutmut
def test_group_size_at_least_one_for_every_estimator():
    for est, extra in (("reinforce_pp", {}), ("gae", dict(loss_fn="ppo"))):
        for bad in (0, -1):
            refused(
                lambda est=est, bad=bad, extra=extra: AlgoConfig(adv_estimator=est, group_size=bad, **extra),
                "group_size",
                str(bad),
            )


@pytest.mark.parametrize("none_field", ["ref_logp", "entropy", "values", "old_values"])
def test_loss_inputs_checks_the_fields_after_a_none(none_field):
    later = TENSOR_FIELDS[TENSOR_FIELDS.index(none_field) + 1 :]
    for f in later:
        refused(lambda f=f: _inputs(**{none_field: None, f: "x"}), f"LossInputs.{f}")


def test_scores_refusals_state_the_expected_shape():
    grpo = AlgoConfig(group_size=GS)
    refused(lambda: G.compute_advantages(grpo, SCORES.to(torch.complex128), AMASK), "scores")
    msg = refused(lambda: G.compute_advantages(grpo, SCORES[:2], AMASK), "scores", str((2,)))
    assert f"[{B}]" in msg  # the expected [B], not T
    msg = refused(lambda: G.compute_advantages(AlgoConfig(group_size=3), SCORES, AMASK), "group_size", "scores", "3")
    assert str(B) in msg
    assert G.compute_advantages(grpo, SCORES.tolist(), AMASK)[0].shape == (
        B,
        T,
    )  # a list of numbers is read as a tensor


def test_gae_without_values_names_the_field_that_needs_them():
    refused(
        lambda: G.compute_advantages(AlgoConfig(adv_estimator="gae", loss_fn="ppo"), SCORES, AMASK),
        "values",
        "adv_estimator",
    )


def test_overlong_penalty_is_added_to_the_scores_in_their_dtype():
    """DAPO's shaping is the penalty added to the task reward: the same as the caller adding it to its own scores
    (float32 scores stay float32 even with a float64 mask)."""
    cfg = AlgoConfig(group_size=GS, overlong_buffer=3, max_response_length=4)
    for scores in (SCORES, SCORES.float()):
        for mask in (AMASK, AMASK.float()):
            pen = G.overlong_penalty(mask.sum(-1), 4, 3).to(scores.dtype)
            a = G.compute_advantages(cfg, scores, mask)[0]
            b = G.compute_advantages(cfg.replace(overlong_buffer=None), scores + pen, mask)[0]
            assert torch.equal(a, b) and a.dtype == b.dtype


def _dispatch_reference(cfg, scores, mask, old, ref, values):
    """As ``_expected_adv`` for any inputs: the KL-shaped rewards of ``kl_in_reward`` (its dtype policy: the rewards
    take ``old_logp``'s dtype, ``ref_logp`` and the scores are cast to it; without the KL, the mask's float dtype)."""
    kl_reward = cfg.kl_placement == "reward" and cfg.kl_coef > 0
    m = mask.to(torch.float32) if not mask.is_floating_point() else mask
    scores = scores.to(torch.float32) if scores.dtype not in (torch.float32, F64) else scores
    if kl_reward:
        token_rewards = G.kl_in_reward(scores, old, ref, mask, cfg.kl_coef, cfg.kl_estimator)
        k = G.kl_estimate(old, ref.to(old.dtype), cfg.kl_estimator)
        seq = scores - cfg.kl_coef * G.masked_sum(torch.where(m > 0, k, torch.zeros_like(k)), mask.to(k.dtype), dim=-1)
    else:
        z = torch.zeros_like(m)
        token_rewards = G.kl_in_reward(scores, z, z, mask, 0.0)
        seq = scores
    est = cfg.adv_estimator
    if est == "grpo":
        return G.grpo_advantages(seq, cfg.group_size, cfg.adv_scale, cfg.adv_eps)[:, None] * m
    if est == "rloo":
        return G.rloo_advantages(seq, cfg.group_size)[:, None] * m
    if est == "reinforce_pp":
        return G.reinforce_pp_advantages(token_rewards, mask, cfg.gamma)
    if est == "reinforce_pp_baseline":
        return G.reinforce_pp_advantages(token_rewards, mask, group_size=cfg.group_size)
    adv, _ = G.gae_advantages(token_rewards, values, mask, cfg.gamma, cfg.lam)
    return G.masked_whiten(adv, mask) if cfg.whiten_advantages else adv


DTYPE_COMBOS = [
    (ms, s, o, r)
    for ms in ("f64", "f32", "bool")
    for s in (F64, torch.float32)
    for o in (F64, torch.float32)
    for r in (F64, torch.float32)
]


@pytest.mark.parametrize("est", [e for e in ADV_ESTIMATORS if e != "process"])  # process: no KL in the reward
@pytest.mark.parametrize("kl", [True, False])
def test_mixed_dtypes_follow_kl_in_reward(est, kl):
    """Any mix of float64/float32 scores, log-probs and mask (bool included): the advantages are those of the math
    functions on the same tensors, and float64 wherever ``kl_in_reward`` keeps float64 (at float64 precision)."""
    cfg = AlgoConfig(
        adv_estimator=est,
        loss_fn="ppo" if est == "gae" else "grpo",
        group_size=GS,
        kl_coef=0.3 if kl else 0.0,
        kl_placement="reward",
        kl_estimator="k3",
        gamma=0.8,
        whiten_advantages=True,
    )
    for ms, s, o, r in DTYPE_COMBOS if kl else [c for c in DTYPE_COMBOS if c[2] == c[3] == F64]:  # no KL: no log-probs
        mask = {"f64": AMASK, "f32": AMASK.float(), "bool": AMASK.bool()}[ms]
        scores, old, ref = SCORES.to(s) + 0.1, OLD.to(o), REF.to(r)
        got = G.compute_advantages(cfg, scores, mask, old_logp=old, ref_logp=ref, values=VALUES)[0]
        want = _dispatch_reference(cfg, scores, mask, old, ref, VALUES)
        if want.dtype == F64:  # float64 kept, to float64 precision
            assert got.dtype == F64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12), (ms, s, o, r)
        else:  # (a float64 mask may widen the float32 rewards: never narrower)
            assert torch.allclose(got, want.to(got.dtype), rtol=1e-5, atol=1e-6), (ms, s, o, r)


@pytest.mark.parametrize("est", ["reinforce_pp", "grpo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("kl_est", ["k1", "k2", "k3"])
def test_kl_in_reward_clamps_the_log_ratio_at_20(est, kl_est):
    """The KL-shaped rewards are ``kl_in_reward``'s, whose log-ratio is clamped at +-20 (verl): an old/ref gap of 30
    at a response token gives the same advantages as a gap of exactly 20."""
    cfg = AlgoConfig(adv_estimator=est, group_size=GS, kl_coef=0.001, kl_placement="reward", kl_estimator=kl_est)
    far, edge = REF.clone(), REF.clone()
    far[1, 2], edge[1, 2] = OLD[1, 2] - 30.0, OLD[1, 2] - 20.0
    near = REF.clone()
    near[1, 2] = OLD[1, 2] - 19.0
    a = _adv(cfg, ref_logp=far)[0]
    assert torch.allclose(a, _adv(cfg, ref_logp=edge)[0], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a, _adv(cfg, ref_logp=near)[0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(a, _dispatch_reference(cfg, SCORES, AMASK, OLD, far, VALUES), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("est", ["reinforce_pp", "reinforce_pp_baseline", "gae", "grpo"])
@pytest.mark.parametrize("junk", [math.nan, math.inf, -math.inf, 1e300])
def test_kl_in_reward_ignores_log_prob_padding(est, junk):
    """Padding may hold anything: NaN, inf or huge log-probs at masked-out positions change nothing."""
    cfg = AlgoConfig(
        adv_estimator=est,
        loss_fn="ppo" if est == "gae" else "grpo",
        group_size=GS,
        kl_coef=0.3,
        kl_placement="reward",
        kl_estimator="k3",
    )
    clean = _adv(cfg)[0]
    for name in ("old_logp", "ref_logp"):
        x = {"old_logp": OLD, "ref_logp": REF}[name].clone()
        x[AMASK == 0] = junk
        assert torch.equal(_adv(cfg, **{name: x})[0], clean), name


def test_lenient_config_without_nan_is_exactly_the_plain_estimator():
    """``unscorable="zero_advantage"`` changes nothing on a batch where every completion is scorable (bit for bit)."""
    for est in ("grpo", "rloo", "reinforce_pp_baseline"):
        for kl in (0.0, 0.3):
            for scale in ("group", "batch"):
                cfg = AlgoConfig(adv_estimator=est, group_size=GS, kl_coef=kl, kl_placement="reward", adv_scale=scale)
                assert torch.equal(_adv(cfg)[0], _adv(cfg.replace(unscorable="zero_advantage"))[0]), (est, kl, scale)


def test_unscorable_baseline_counts_an_empty_scorable_response_as_zero():
    """REINFORCE++-baseline with NaN scores: a scorable completion with an empty response has no token to carry its
    score and enters its group's mean as 0, as without NaN (``reinforce_pp_advantages``)."""
    mask = NAN_MASK.clone()
    mask[4] = 0  # scorable, empty
    cfg = AlgoConfig(adv_estimator="reinforce_pp_baseline", group_size=3, unscorable="zero_advantage", kl_coef=0.0)
    adv, _ = G.compute_advantages(cfg, NAN_SCORES, mask)
    s, m = NAN_SCORES[SCORABLE], mask[SCORABLE]
    want = G.reinforce_pp_advantages(G.kl_in_reward(s, m * 0, m * 0, m, 0.0), m, group_size=2)
    assert torch.allclose(adv[SCORABLE], want, rtol=1e-12, atol=1e-14)
    assert bool((adv[~SCORABLE] == 0).all()) and bool((adv[4] == 0).all())


@pytest.mark.parametrize("junk", [math.nan, math.inf, 1e300])
def test_unscorable_baseline_ignores_log_prob_padding(junk):
    """As without NaN scores: the padding of ``old_logp`` / ``ref_logp`` never reaches the advantages."""
    old = -(torch.rand(6, 3, generator=_gen(31), dtype=F64) + 0.2)
    ref = old + torch.randn(6, 3, generator=_gen(32), dtype=F64) * 0.5
    cfg = AlgoConfig(
        adv_estimator="reinforce_pp_baseline",
        group_size=3,
        kl_coef=0.2,
        kl_placement="reward",
        kl_estimator="k3",
        unscorable="zero_advantage",
    )
    clean = G.compute_advantages(cfg, NAN_SCORES, NAN_MASK, old_logp=old, ref_logp=ref)[0]
    for which in ("old", "ref"):
        o, r = old.clone(), ref.clone()
        (o if which == "old" else r)[NAN_MASK == 0] = junk
        assert torch.equal(G.compute_advantages(cfg, NAN_SCORES, NAN_MASK, old_logp=o, ref_logp=r)[0], clean), which
