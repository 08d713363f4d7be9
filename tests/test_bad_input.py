"""The bad-input campaign of issue 8: every public function, every class of bad input.

Each case either expects a ``ValueError`` whose message names the caller's argument (and the offending value or
shape), or is a *valid* input whose result must be finite and equal to a clean reference (the case says why it
is valid). A case that returns silently where a refusal was expected, returns a non-finite value, or raises
anything but ``ValueError`` fails. Run ``python tests/test_bad_input.py`` for the count by class.

Classes: ``shape``, ``dtype``, ``mask``, ``nonfinite`` (NaN/inf in a tensor argument, at a masked-in or, where
legal, a masked-out position), ``hyper`` (NaN/inf/out-of-range scalars), ``bool-int`` (``True`` where an int is
meant), ``group`` (bad ``group_size``), ``empty`` (``B = 0`` or ``T = 0``), ``layout`` (non-contiguous tensors).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grpo_ref as G
from grpo_ref._checks import check_real

NAN, INF = float("nan"), float("inf")
B, T, GS, V = 4, 5, 2, 7
IN, OUT = (0, 0), (0, 4)  # a masked-in and a masked-out (padding) position of MASK

MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bt(seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(B, T, generator=_gen(seed)) * scale + shift


def _logp(seed: int) -> torch.Tensor:
    return -(torch.rand(B, T, generator=_gen(seed)) * 2 + 0.1)


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    cls: str
    func: str
    label: str
    call: Callable[[], Any]
    refused_arg: Optional[str] = None  # expect a ValueError naming this argument ...
    detail: Optional[str] = None  # ... and containing this text (the offending value or shape)
    reference: Optional[Callable[[], Any]] = None  # valid: the result must equal this (finite)
    why: str = ""  # why a valid input is valid
    check: Optional[Callable[[Any], None]] = None  # valid: an extra assertion on the result

    @property
    def id(self) -> str:
        return f"{self.cls}:{self.func}:{self.label}"


def _tensors(out) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for k in out.__dataclass_fields__ for t in _tensors(getattr(out, k))]
    if isinstance(out, (int, float)):
        return [torch.tensor(float(out))]
    return []


def _names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def outcome(case: Case) -> str:
    """``refused`` / ``valid`` on success; ``silent-nonfinite``, ``silent-meaningless``, ``wrong-message`` or
    ``other-exception`` on failure (the campaign's classes)."""
    try:
        out = case.call()
    except ValueError as e:
        if case.refused_arg is None:
            return f"unexpected-refusal: {e}"
        msg = str(e)
        ok = _names(msg, case.refused_arg) and (case.detail is None or case.detail.lower() in msg.lower())
        return "refused" if ok else f"wrong-message: {msg!r} (wanted {case.refused_arg!r} and {case.detail!r})"
    except Exception as e:  # noqa: BLE001 - the campaign counts these
        return f"other-exception: {type(e).__name__}: {e}"
    got = _tensors(out)
    if any(not bool(torch.isfinite(t.float()).all()) for t in got if t.dtype != torch.bool):
        return "silent-nonfinite"
    if case.refused_arg is not None:
        return "silent-meaningless"
    if case.reference is not None:
        ref = _tensors(case.reference())
        if len(ref) != len(got):
            return "silent-meaningless: result structure differs from the reference"
        for a, b in zip(got, ref):
            if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6):
                return f"silent-meaningless: {a} != {b}"
    if case.check is not None:
        try:
            case.check(out)
        except AssertionError as e:
            return f"silent-meaningless: {e}"
    return "valid"


CASES: List[Case] = []


def refuse(cls, func, label, call, arg, detail=None):
    CASES.append(Case(cls, func, label, call, refused_arg=arg, detail=detail))


def valid(cls, func, label, call, why, reference=None, check=None):
    assert reference is not None or check is not None
    CASES.append(Case(cls, func, label, call, reference=reference, why=why, check=check))


def _set(x: torch.Tensor, where, value) -> torch.Tensor:
    x = x.clone()
    x[where] = value
    return x


def _narrow(x: torch.Tensor) -> torch.Tensor:
    """A wrong shape: ``[B] -> [B, 1]``; otherwise one column fewer."""
    return x[:, None] if x.dim() == 1 else x[:, :-1]


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
    if x.dim() < 2:
        y = torch.empty(x.shape[0] * 2, dtype=x.dtype)[::2]
        y.copy_(x)
    else:
        y = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not y.is_contiguous() and torch.equal(y, x)
    return y


# ------------------------------------------------------------------- generic masked [B, T] functions
@dataclass
class Spec:
    """A public function of ``[B, T]`` tensors under a mask: which arguments hold values, which may be non-finite
    under the mask's 0s, its scalars and their bad values."""

    func: str
    fn: Callable[..., Any]
    make: Callable[[], Dict[str, Any]]
    values: Dict[str, str]  # argument -> "masked" (finite where mask is 1) or "all" (finite everywhere)
    mask: Optional[str] = "mask"
    scalars: Dict[str, List[Any]] = field(default_factory=dict)
    empty: Optional[Callable[[Any], None]] = None  # check of the B = 0 / T = 0 result


def _scalar_detail(v) -> str:
    return str(v)


def add_spec(s: Spec) -> None:
    call = lambda **over: (lambda: s.fn(**{**s.make(), **over}))  # noqa: E731
    clean = call()
    for arg, kind in s.values.items():
        x = s.make()[arg]
        for bad, word in ((NAN, "nan"), (INF, "inf"), (-INF, "inf")):
            refuse("nonfinite", s.func, f"{arg}={bad} masked-in", call(**{arg: _set(x, IN if x.dim() == 2 else 0, bad)}), arg, word)
        if kind == "masked":
            valid("nonfinite", s.func, f"{arg}=nan in padding", call(**{arg: _set(x, OUT, NAN)}),
                  "padding never reaches the result (documented); equal to the clean call", reference=clean)
        refuse("shape", s.func, f"{arg} narrowed", call(**{arg: _narrow(x)}), arg, str(tuple(_narrow(x).shape)))
        refuse("dtype", s.func, f"{arg} complex", call(**{arg: x.to(torch.complex64)}), arg, "complex")
        valid("layout", s.func, f"{arg} non-contiguous", call(**{arg: _strided(x)}),
              "a strided view holds the same values", reference=clean)
    if s.mask is not None:
        m = s.make()[s.mask]
        for bad in (2.0, -1.0, 0.5, NAN):
            refuse("mask", s.func, f"{s.mask} holds {bad}", call(**{s.mask: _set(m, IN, bad)}), s.mask, "0 and 1")
        refuse("mask", s.func, f"{s.mask} int 2", call(**{s.mask: _set(m.long(), IN, 2)}), s.mask, "0 and 1")
        refuse("mask", s.func, f"{s.mask} int -1", call(**{s.mask: _set(m.long(), IN, -1)}), s.mask, "0 and 1")
        refuse("dtype", s.func, f"{s.mask} complex", call(**{s.mask: m.to(torch.complex64)}), s.mask, "complex")
        refuse("shape", s.func, f"{s.mask} narrowed", call(**{s.mask: m[:, :-1]}), s.mask, str((B, T - 1)))
        for dt in (torch.bool, torch.int64, torch.uint8):
            valid("mask", s.func, f"{s.mask} {dt}", call(**{s.mask: m.to(dt)}), "a 0/1 mask of any real dtype", reference=clean)
        valid("layout", s.func, f"{s.mask} non-contiguous", call(**{s.mask: _strided(m)}), "same values", reference=clean)
    for name, bads in s.scalars.items():
        for v in bads:
            cls = "bool-int" if isinstance(v, bool) else "hyper"
            refuse(cls, s.func, f"{name}={v!r}", call(**{name: v}), name, _scalar_detail(v))
    if s.empty is not None:
        for label, rows, cols in (("B=0", slice(0, 0), slice(None)), ("T=0", slice(None), slice(0, 0))):
            kw = {k: (v[rows, cols] if torch.is_tensor(v) and v.dim() == 2 else (v[rows] if torch.is_tensor(v) and v.dim() == 1 and label == "B=0" else v))
                  for k, v in s.make().items()}
            valid("empty", s.func, label, (lambda kw=kw: s.fn(**kw)), "no token: a documented empty or zero result", check=s.empty)


def _zero_or_empty(out) -> None:
    for t in _tensors(out):
        assert t.numel() == 0 or bool((t == 0).all()) or t.numel() == 1, t


def _zero_loss(out) -> None:
    loss = out[0] if isinstance(out, tuple) else out
    assert loss.shape == () and float(loss) == 0.0, loss


HYPER_REAL = [NAN, INF, -INF, "0.1", None]
RANGE01 = [NAN, INF, -0.1, 1.5, True]
POSITIVE = [NAN, INF, 0.0, -1.0, True, "1"]
NON_NEGATIVE = [NAN, INF, -INF, -1e-3, True]

add_spec(Spec("masked_sum", G.masked_sum, lambda: dict(values=_bt(1), mask=MASK), {"values": "masked"},
              scalars={"dim": [2, -3, 1.0, True]}, empty=_zero_or_empty))
add_spec(Spec("masked_mean", G.masked_mean, lambda: dict(values=_bt(2), mask=MASK), {"values": "masked"},
              scalars={"dim": [5, 0.5, True]}, empty=_zero_or_empty))
add_spec(Spec("masked_var", G.masked_var, lambda: dict(values=_bt(3), mask=MASK), {"values": "masked"},
              scalars={"unbiased": ["yes", 1, None]}, empty=_zero_or_empty))
add_spec(Spec("masked_whiten", G.masked_whiten, lambda: dict(values=_bt(4), mask=MASK), {"values": "masked"},
              scalars={"eps": NON_NEGATIVE, "shift_mean": ["no", 0], "unbiased": [1]}, empty=_zero_or_empty))
add_spec(Spec("aggregate", G.aggregate, lambda: dict(loss_mat=_bt(5), mask=MASK, loss_agg_mode="seq-mean-token-sum-norm"),
              {"loss_mat": "masked"}, scalars={"norm_length": POSITIVE, "loss_agg_mode": ["mean", None, 3]}, empty=_zero_loss))
add_spec(Spec("entropy_bonus", G.entropy_bonus, lambda: dict(entropy=_bt(6).abs(), mask=MASK,
                                                             loss_agg_mode="seq-mean-token-sum-norm"),
              {"entropy": "masked"}, scalars={"loss_agg_mode": ["sum"], "norm_length": POSITIVE}, empty=_zero_loss))
for est in ("k1", "k2", "k3"):
    add_spec(Spec(f"kl_{est}", getattr(G, f"kl_{est}"), lambda: dict(logp=_logp(7), ref_logp=_logp(8)),
                  {"logp": "all", "ref_logp": "all"}, mask=None, scalars={"max_log_ratio": POSITIVE}, empty=_zero_or_empty))
add_spec(Spec("kl_estimate", G.kl_estimate, lambda: dict(logp=_logp(7), ref_logp=_logp(8), estimator="k3"),
              {"logp": "all", "ref_logp": "all"}, mask=None, scalars={"max_log_ratio": [NAN, -1.0], "estimator": ["k4"]}))
add_spec(Spec("discounted_returns", G.discounted_returns, lambda: dict(token_rewards=_bt(9), mask=MASK, gamma=0.9),
              {"token_rewards": "masked"}, scalars={"gamma": RANGE01}, empty=_zero_or_empty))
add_spec(Spec("reinforce_pp_advantages", G.reinforce_pp_advantages, lambda: dict(token_rewards=_bt(10), mask=MASK, gamma=0.9),
              {"token_rewards": "masked"}, scalars={"gamma": RANGE01}, empty=_zero_or_empty))
add_spec(Spec("reinforce_pp_advantages[group]", G.reinforce_pp_advantages,
              lambda: dict(token_rewards=_bt(10), mask=MASK, group_size=GS), {"token_rewards": "masked"},
              scalars={"group_size": [0, -2, 1, 2.0, True, 3], "gamma": [NAN]}))
add_spec(Spec("gae_advantages", G.gae_advantages, lambda: dict(token_rewards=_bt(11), values=_bt(12), mask=MASK, gamma=0.99, lam=0.9),
              {"token_rewards": "masked", "values": "masked"}, scalars={"gamma": RANGE01, "lam": RANGE01}, empty=_zero_or_empty))
add_spec(Spec("policy_loss", G.policy_loss,
              lambda: dict(logp=_logp(13), old_logp=_logp(14), advantages=_bt(15), mask=MASK, ref_logp=_logp(16),
                           entropy=_bt(17).abs(), kl_coef=0.1, dual_clip=3.0),
              {"logp": "masked", "old_logp": "masked", "advantages": "masked", "ref_logp": "masked", "entropy": "masked"},
              scalars={"eps_low": [NAN, INF, 0.0, 1.5, -0.2, True], "eps_high": POSITIVE, "dual_clip": [NAN, INF, 1.0, 0.5, True],
                       "kl_coef": NON_NEGATIVE, "max_log_ratio": POSITIVE + [None], "norm_length": [NAN, INF, 0, -5, True],
                       "ratio_level": ["seq"], "loss_agg_mode": ["mean"], "kl_estimator": ["k4"]},
              empty=_zero_loss))
add_spec(Spec("policy_loss[gspo]", G.policy_loss,
              lambda: dict(logp=_logp(13), old_logp=_logp(14), advantages=torch.randn(B, generator=_gen(18)), mask=MASK,
                           ratio_level="sequence", eps_low=3e-4, eps_high=4e-4),
              {"logp": "masked", "old_logp": "masked"}, scalars={"eps_low": [NAN]}, empty=_zero_loss))
add_spec(Spec("policy_loss[cispo]", G.policy_loss,
              lambda: dict(logp=_logp(13), old_logp=_logp(14), advantages=_bt(15), mask=MASK, pg_objective="cispo",
                           eps_low=1.0, eps_high=4.0, ref_logp=_logp(16), kl_coef=0.1, kl_ratio_weighted=True),
              {"logp": "masked", "old_logp": "masked", "advantages": "masked", "ref_logp": "masked"},
              scalars={"eps_low": [NAN, 0.0, 1.5, True], "eps_high": POSITIVE, "dual_clip": [3.0], "pg_objective": ["ppo", None],
                       "kl_ratio_weighted": [1, "yes", None], "kl_estimator": ["k2+", "mse"]},
              empty=_zero_loss))
add_spec(Spec("policy_loss[sapo]", G.policy_loss,
              lambda: dict(logp=_logp(13), old_logp=_logp(14), advantages=_bt(15), mask=MASK, pg_objective="sapo",
                           sapo_tau_pos=1.0, sapo_tau_neg=1.05, ref_logp=_logp(16), kl_coef=0.1, kl_estimator="low_var_kl+"),
              {"logp": "masked", "old_logp": "masked", "advantages": "masked", "ref_logp": "masked"},
              scalars={"sapo_tau_pos": POSITIVE, "sapo_tau_neg": POSITIVE, "dual_clip": [3.0], "num_tokens": [5.0]},
              empty=_zero_loss))
add_spec(Spec("policy_loss[global token-mean]", G.policy_loss,
              lambda: dict(logp=_logp(13), old_logp=_logp(14), advantages=_bt(15), mask=MASK, loss_agg_mode="token-mean",
                           num_tokens=25.0),
              {"logp": "masked", "old_logp": "masked", "advantages": "masked"},
              scalars={"num_tokens": [NAN, INF, 0.0, -3.0, True, "25"]}, empty=_zero_loss))
add_spec(Spec("aggregate[token-sum]", G.aggregate, lambda: dict(loss_mat=_bt(5), mask=MASK, loss_agg_mode="token-sum"),
              {"loss_mat": "masked"}, scalars={"num_tokens": [3.0]}, empty=_zero_loss))
add_spec(Spec("aggregate[global token-mean]", G.aggregate,
              lambda: dict(loss_mat=_bt(5), mask=MASK, loss_agg_mode="token-mean", num_tokens=9.0),
              {"loss_mat": "masked"}, scalars={"num_tokens": [NAN, INF, 0.0, -1.0, True]}, empty=_zero_loss))
add_spec(Spec("value_loss", G.value_loss,
              lambda: dict(values=_bt(19), old_values=_bt(20), returns=_bt(21), mask=MASK),
              {"values": "masked", "old_values": "masked", "returns": "masked"},
              scalars={"clip_range": [NAN, INF, 0.0, -0.2, True], "loss_agg_mode": ["avg"]}, empty=_zero_loss))
add_spec(Spec("kl_in_reward", G.kl_in_reward,
              lambda: dict(scores=torch.randn(B, generator=_gen(22)), logp=_logp(23), ref_logp=_logp(24), mask=MASK, kl_coef=0.05),
              {"logp": "masked", "ref_logp": "masked"},
              scalars={"kl_coef": NON_NEGATIVE, "estimator": ["k9"]}, empty=_zero_or_empty))


# -------------------------------------------------------------- sequence-level advantage estimators
def _rewards(seed=25):
    return torch.tensor([1.0, 0.0, 0.5, 0.5])


for name in ("grpo_advantages", "rloo_advantages"):
    fn = getattr(G, name)
    call = lambda fn=fn, **kw: (lambda: fn(**{"rewards": _rewards(), "group_size": GS, **kw}))  # noqa: E731
    for bad, word in ((NAN, "nan"), (INF, "inf"), (-INF, "inf")):
        refuse("nonfinite", name, f"rewards={bad}", call(rewards=_set(_rewards(), 1, bad)), "rewards", word)
    refuse("shape", name, "rewards [B, 1]", call(rewards=_rewards()[:, None]), "rewards", "(4, 1)")
    refuse("dtype", name, "rewards complex", call(rewards=_rewards().to(torch.complex64)), "rewards", "complex")
    valid("dtype", name, "rewards bool", call(rewards=torch.tensor([True, False, True, True])),
          "a correctness flag is a 0/1 reward", reference=call(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0])))
    valid("layout", name, "rewards non-contiguous", call(rewards=_strided(_rewards())), "same values", reference=call())
    for g in (0, -2, 1, 2.5, "2", None):
        refuse("group", name, f"group_size={g!r}", call(group_size=g), "group_size", str(g))
    refuse("bool-int", name, "group_size=True", call(group_size=True), "group_size", "True")
    refuse("group", name, "group_size=3 (B=4)", call(group_size=3), "group_size", "3")
    valid("empty", name, "B=0", call(rewards=torch.zeros(0)), "no completion: an empty [0] result",
          check=lambda out: (_ for _ in ()).throw(AssertionError(out)) if out.shape != (0,) else None)
    valid("group", name, "flat groups", call(rewards=torch.ones(B)), "equal rewards carry no signal: advantage exactly 0",
          reference=lambda: torch.zeros(B))
for v in HYPER_REAL + [-1e-6, True]:
    cls = "bool-int" if isinstance(v, bool) else "hyper"
    refuse(cls, "grpo_advantages", f"eps={v!r}", lambda v=v: G.grpo_advantages(_rewards(), GS, eps=v), "eps", str(v))
_EMPTY_ROW = _set(MASK, 3, 0.0)  # sequence 3 has no response token
valid("nonfinite", "policy_loss", "advantages [B] nan for an empty response",
      lambda: G.policy_loss(_logp(1), _logp(2), _set(torch.randn(B, generator=_gen(3)), 3, NAN), _EMPTY_ROW),
      "the advantage of a sequence without a token never reaches the loss",
      reference=lambda: G.policy_loss(_logp(1), _logp(2), _set(torch.randn(B, generator=_gen(3)), 3, 0.0), _EMPTY_ROW))
refuse("nonfinite", "policy_loss", "advantages [B] nan for a real response",
       lambda: G.policy_loss(_logp(1), _logp(2), _set(torch.randn(B, generator=_gen(3)), 0, NAN), MASK), "advantages", "nan")
refuse("hyper", "policy_loss", "kl_coef=1e308 overflows", lambda: G.policy_loss(_logp(1), _logp(2), _bt(3), MASK, ref_logp=_logp(4), kl_coef=1e308),
       "kl_coef", "1e+308")
refuse("hyper", "grpo_advantages", "scale='std'", lambda: G.grpo_advantages(_rewards(), GS, scale="std"), "scale", "std")


# ------------------------------------------------------------------------------- process supervision
def _process(**over):
    d = dict(step_rewards=torch.tensor([[0.5, 1.0], [0.0, 0.3], [1.0, 0.2], [0.1, 0.0]]),
             step_ends=torch.tensor([[1, 3], [2, 4], [0, 2], [4, 0]]),
             step_mask=torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.float32),
             mask=torch.ones(B, T), group_size=GS)
    d.update(over)
    return lambda: G.process_advantages(**d)


for bad, word in ((NAN, "nan"), (INF, "inf")):
    refuse("nonfinite", "process_advantages", f"step_rewards={bad}",
           _process(step_rewards=torch.tensor([[bad, 1.0], [0.0, 0.3], [1.0, 0.2], [0.1, 0.0]])), "step_rewards", word)
valid("nonfinite", "process_advantages", "step_rewards nan in a padding step",
      _process(step_rewards=torch.tensor([[0.5, 1.0], [0.0, 0.3], [1.0, 0.2], [0.1, NAN]])),
      "a padding step (step_mask 0) is never read", reference=_process())
refuse("mask", "process_advantages", "step_mask 2", _process(step_mask=torch.tensor([[2, 1], [1, 1], [1, 1], [1, 0]])), "step_mask", "0 and 1")
refuse("mask", "process_advantages", "mask 0.5", _process(mask=_set(torch.ones(B, T), IN, 0.5)), "mask", "0 and 1")
refuse("dtype", "process_advantages", "step_ends float", _process(step_ends=torch.zeros(B, 2)), "step_ends", "float")
refuse("dtype", "process_advantages", "step_ends bool", _process(step_ends=torch.zeros(B, 2, dtype=torch.bool)), "step_ends", "bool")
refuse("shape", "process_advantages", "step_ends out of range", _process(step_ends=torch.full((B, 2), T)), "step_ends", str(T))
refuse("shape", "process_advantages", "step_mask narrowed", _process(step_mask=torch.ones(B, 1)), "step_mask", "(4, 1)")
refuse("dtype", "process_advantages", "step_rewards complex", _process(step_rewards=torch.zeros(B, 2, dtype=torch.complex64)), "step_rewards", "complex")
for g in (0, 3, 1.0, True):
    refuse("bool-int" if g is True else "group", "process_advantages", f"group_size={g!r}", _process(group_size=g), "group_size", str(g))
for e in (NAN, INF, -1.0):
    refuse("hyper", "process_advantages", f"eps={e}", _process(eps=e), "eps", str(e))
valid("empty", "process_advantages", "S=0", _process(step_rewards=torch.zeros(B, 0), step_ends=torch.zeros(B, 0, dtype=torch.long),
                                                     step_mask=torch.zeros(B, 0)),
      "no step, no reward: advantage 0", reference=lambda: torch.zeros(B, T))
valid("empty", "process_advantages", "T=0", _process(step_rewards=torch.zeros(B, 0), step_ends=torch.zeros(B, 0, dtype=torch.long),
                                                     step_mask=torch.zeros(B, 0), mask=torch.ones(B, 0)),
      "no token: an empty [B, 0] result", reference=lambda: torch.zeros(B, 0))
valid("layout", "process_advantages", "non-contiguous step_rewards",
      _process(step_rewards=_strided(torch.tensor([[0.5, 1.0], [0.0, 0.3], [1.0, 0.2], [0.1, 0.0]]))), "same values", reference=_process())
valid("dtype", "process_advantages", "step_ends int16", _process(step_ends=torch.tensor([[1, 3], [2, 4], [0, 2], [4, 0]], dtype=torch.int16)),
      "any integer dtype holds indices", reference=_process())

# overlong penalty
for args, arg, det in (((10, 0), "cache_length", "0"), ((10, 11), "cache_length", "11"), ((10.0, 2), "max_length", "10.0"),
                       ((True, 1), "max_length", "True"), ((10, True), "cache_length", "True"), ((0, 1), "max_length", "0")):
    refuse("bool-int" if True in args and isinstance(args[args.index(True)], bool) else "hyper", "overlong_penalty", f"{args}",
           lambda args=args: G.overlong_penalty(torch.tensor([3, 9]), *args), arg, det)
refuse("nonfinite", "overlong_penalty", "lengths nan", lambda: G.overlong_penalty(torch.tensor([3.0, NAN]), 10, 2), "lengths", "nan")
refuse("hyper", "overlong_penalty", "lengths -1", lambda: G.overlong_penalty(torch.tensor([3, -1]), 10, 2), "lengths", "-1")
refuse("dtype", "overlong_penalty", "lengths complex", lambda: G.overlong_penalty(torch.tensor([3j]), 10, 2), "lengths", "complex")
valid("empty", "overlong_penalty", "B=0", lambda: G.overlong_penalty(torch.zeros(0), 10, 2), "no completion: empty",
      reference=lambda: torch.zeros(0))


# ------------------------------------------------------------------------------------ log-probs
def _logits(seed=30, shape=(B, T, V)):
    return torch.randn(*shape, generator=_gen(seed))


def _tokens(seed=31):
    return torch.randint(0, V, (B, T), generator=_gen(seed))


def _ref_logprobs(z, tok, tau=1.0):
    return torch.log_softmax(z.double() / tau, -1).gather(-1, tok[..., None].long())[..., 0]


def _ref_entropy(z):
    lp = torch.log_softmax(z.double(), -1)
    return -(lp.exp() * torch.where(lp > -INF, lp, torch.zeros_like(lp))).sum(-1)


for fname, fn, with_tokens in (("token_logprobs", G.token_logprobs, True), ("token_entropy", G.token_entropy, False)):
    def call(fn=fn, with_tokens=with_tokens, **kw):
        base = dict(logits=_logits(), tokens=_tokens()) if with_tokens else dict(logits=_logits())
        return lambda: fn(**{**base, **kw})

    ref = (lambda: _ref_logprobs(_logits(), _tokens())) if with_tokens else (lambda: _ref_entropy(_logits()))
    for bad, word in ((NAN, "nan"), (INF, "inf")):
        refuse("nonfinite", fname, f"logits={bad}", call(logits=_set(_logits(), (0, 0, 3), bad)), "logits", word)
    refuse("nonfinite", fname, "logits row all -inf", call(logits=_set(_logits(), (1, 2), -INF)), "logits", "-inf everywhere")
    refuse("nonfinite", fname, "logits overflow at tiny temperature", call(logits=_set(_logits(), (0, 0, 1), 3e38), temperature=1e-3),
           "logits", "overflow")
    neg = _set(_logits(), (0, 0, 0), -INF)
    tok_no0 = _set(_tokens(), (0, 0), 1)
    if with_tokens:
        valid("nonfinite", fname, "logits -inf at an unchosen token", call(logits=neg, tokens=tok_no0),
              "a masked vocabulary entry has probability 0; the chosen token's log-prob is finite",
              reference=lambda: _ref_logprobs(_set(_logits(), (0, 0, 0), -INF), _set(_tokens(), (0, 0), 1)))
        refuse("nonfinite", fname, "tokens pick a -inf logit", call(logits=neg, tokens=_set(_tokens(), (0, 0), 0)), "tokens", "-inf")
        for dt in (torch.int16, torch.uint8, torch.int32):
            valid("dtype", fname, f"tokens {dt}", call(tokens=_tokens().to(dt)), "any integer dtype holds ids (widened to int64)", reference=ref)
        refuse("dtype", fname, "tokens float", call(tokens=_tokens().float()), "tokens", "float")
        refuse("dtype", fname, "tokens bool", call(tokens=_tokens() > 3), "tokens", "bool")
        refuse("dtype", fname, "tokens complex", call(tokens=_tokens().to(torch.complex64)), "tokens", "complex")
        refuse("shape", fname, "tokens out of range", call(tokens=_set(_tokens(), IN, V)), "tokens", f"[0, {V})")
        refuse("shape", fname, "tokens -1", call(tokens=_set(_tokens(), IN, -1)), "tokens", "-1")
        refuse("shape", fname, "tokens narrowed", call(tokens=_tokens()[:, :-1]), "tokens", str((B, T - 1)))
        valid("layout", fname, "tokens non-contiguous", call(tokens=_strided(_tokens())), "same values", reference=ref)
    else:
        valid("nonfinite", fname, "logits -inf entry", call(logits=neg), "a probability-0 token contributes 0 to H",
              reference=lambda: _ref_entropy(_set(_logits(), (0, 0, 0), -INF)))
    refuse("dtype", fname, "logits complex", call(logits=_logits().to(torch.complex64)), "logits", "complex")
    refuse("dtype", fname, "logits int", call(logits=_logits().long()), "logits", "int64")
    refuse("shape", fname, "logits V=0", call(logits=torch.zeros(B, T, 0), **({"tokens": torch.zeros(B, T, dtype=torch.long)} if with_tokens else {})),
           "logits", "V >= 1")
    valid("layout", fname, "logits non-contiguous", call(logits=_logits((32), (T, B, V)).transpose(0, 1)), "a transposed view",
          reference=(lambda: _ref_logprobs(_logits(32, (T, B, V)).transpose(0, 1), _tokens())) if with_tokens
          else (lambda: _ref_entropy(_logits(32, (T, B, V)).transpose(0, 1))))
    for v in (NAN, INF, -INF, 0.0, -1.0, "1", None):
        refuse("hyper", fname, f"temperature={v!r}", call(temperature=v), "temperature", str(v))
    refuse("bool-int", fname, "temperature=True", call(temperature=True), "temperature", "True")
    for v in (0, -1, 2.5, "4", None):
        refuse("hyper", fname, f"chunk_size={v!r}", call(chunk_size=v), "chunk_size", str(v))
    refuse("bool-int", fname, "chunk_size=True", call(chunk_size=True), "chunk_size", "True")
    valid("empty", fname, "B=0", call(logits=torch.zeros(0, T, V), **({"tokens": torch.zeros(0, T, dtype=torch.long)} if with_tokens else {})),
          "no position: an empty result", reference=lambda: torch.zeros(0, T))
    valid("empty", fname, "T=0", call(logits=torch.zeros(B, 0, V), **({"tokens": torch.zeros(B, 0, dtype=torch.long)} if with_tokens else {})),
          "no position: an empty result", reference=lambda: torch.zeros(B, 0))

# categorical KL
_p, _q = _logits(40, (B, V)), _logits(41, (B, V))
for arg in ("p_logits", "q_logits"):
    for bad, word in ((NAN, "nan"), (INF, "inf")):
        kw = {"p_logits": _p, "q_logits": _q, arg: _set(_p if arg == "p_logits" else _q, (1, 2), bad)}
        refuse("nonfinite", "categorical_kl", f"{arg}={bad}", lambda kw=kw: G.categorical_kl(**kw), arg, word)
    kw = {"p_logits": _p, "q_logits": _q, arg: _set(_p if arg == "p_logits" else _q, 1, -INF)}
    refuse("nonfinite", "categorical_kl", f"{arg} row all -inf", lambda kw=kw: G.categorical_kl(**kw), arg, "-inf everywhere")
    kw = {"p_logits": _p, "q_logits": _q, arg: (_p if arg == "p_logits" else _q).to(torch.complex64)}
    refuse("dtype", "categorical_kl", f"{arg} complex", lambda kw=kw: G.categorical_kl(**kw), arg, "complex")
refuse("shape", "categorical_kl", "no broadcast", lambda: G.categorical_kl(_p, _q[:, :-1]), "q_logits", str((B, V - 1)))
valid("nonfinite", "categorical_kl", "both -inf at one token", lambda: G.categorical_kl(_set(_p, (0, 0), -INF), _set(_q, (0, 0), -INF)),
      "0 log 0/0 = 0: the token is outside both supports",
      reference=lambda: G.categorical_kl(_p[:, 1:], torch.cat([_q[:, :1] - INF, _q[:, 1:]], -1)[:, 1:]) * 0
      + torch.tensor([float((torch.log_softmax(_p[0, 1:].double(), -1).exp() * (torch.log_softmax(_p[0, 1:].double(), -1)
                                                                              - torch.log_softmax(_q[0, 1:].double(), -1))).sum())]
                     + [float(x) for x in G.categorical_kl(_p[1:], _q[1:])]))
valid("layout", "categorical_kl", "non-contiguous", lambda: G.categorical_kl(_logits(42, (V, B)).t(), _q), "a transposed view",
      reference=lambda: G.categorical_kl(_logits(42, (V, B)).t().contiguous(), _q))

# response mask
for kw, arg, det in ((dict(seq_len=2.5), "seq_len", "2.5"), (dict(seq_len=True), "seq_len", "True"), (dict(seq_len=-1), "seq_len", "-1"),
                     (dict(prompt_lengths=torch.tensor([1.5, 2.0])), "prompt_lengths", "float"),
                     (dict(prompt_lengths=torch.tensor([1, 9])), "prompt_lengths", "9"),
                     (dict(prompt_lengths=torch.tensor([[1, 2]])), "prompt_lengths", "(1, 2)"),
                     (dict(total_lengths=torch.tensor([0, 3])), "total_lengths", "[0, 3]"),
                     (dict(total_lengths=torch.tensor([2.0, 3.0])), "total_lengths", "float"),
                     (dict(eos_token_id=2), "tokens", "None"),
                     (dict(eos_token_id=2.0, tokens=torch.zeros(2, 5, dtype=torch.long)), "eos_token_id", "2.0"),
                     (dict(eos_token_id=2, tokens=torch.zeros(2, 5)), "tokens", "float")):
    base = dict(seq_len=5, prompt_lengths=torch.tensor([1, 2]))
    cls = "bool-int" if True in [v for v in kw.values() if isinstance(v, bool)] else ("dtype" if det == "float" else "shape" if "(" in det else "hyper")
    refuse(cls, "response_mask", str(kw)[:40], lambda kw=kw, base=base: G.response_mask(**{**base, **kw}), arg, det)
valid("empty", "response_mask", "T=0", lambda: G.response_mask(0, torch.tensor([0, 0])), "no position", reference=lambda: torch.zeros(2, 0))
valid("empty", "response_mask", "B=0", lambda: G.response_mask(5, torch.zeros(0, dtype=torch.long)), "no row", reference=lambda: torch.zeros(0, 5))
valid("dtype", "response_mask", "int16 lengths", lambda: G.response_mask(5, torch.tensor([1, 2], dtype=torch.int16)), "integer lengths",
      reference=lambda: G.response_mask(5, torch.tensor([1, 2])))


# combine_rewards: [B, K] rewards of K reward functions, NaN = a function returned None
_R2 = torch.tensor([[1.0, 0.0], [0.0, NAN], [0.5, 1.0], [NAN, NAN]])
_cr = lambda **kw: (lambda: G.combine_rewards(**{**dict(rewards=_R2, weights=torch.tensor([1.0, 0.5]), group_size=GS), **kw}))  # noqa: E731
for bad, word in ((INF, "inf"), (-INF, "inf")):
    refuse("nonfinite", "combine_rewards", f"rewards={bad}", _cr(rewards=_set(_R2, (0, 0), bad)), "rewards", word)
    refuse("nonfinite", "combine_rewards", f"weights={bad}", _cr(weights=torch.tensor([1.0, bad])), "weights", word)
refuse("nonfinite", "combine_rewards", "weights=nan", _cr(weights=torch.tensor([1.0, NAN])), "weights", "nan")
refuse("shape", "combine_rewards", "rewards [B]", _cr(rewards=_R2[:, 0]), "rewards", "(4,)")
refuse("shape", "combine_rewards", "weights [K+1]", _cr(weights=torch.ones(3)), "weights", "(3,)")
refuse("dtype", "combine_rewards", "rewards complex", _cr(rewards=_R2.to(torch.complex64)), "rewards", "complex")
refuse("dtype", "combine_rewards", "weights bool", _cr(weights=torch.ones(2, dtype=torch.bool)), "weights", "bool")
for v in (0, 1, 3, 2.0, True):
    refuse("bool-int" if isinstance(v, bool) else "group", "combine_rewards", f"group_size={v!r}", _cr(group_size=v), "group_size", str(v))
for arg, v in (("aggregation", "mean"), ("scale", "std"), ("eps", NAN), ("eps", -1e-4), ("eps", True)):
    refuse("bool-int" if isinstance(v, bool) else "hyper", "combine_rewards", f"{arg}={v!r}", _cr(**{arg: v}), arg, str(v))
for v in ("group", "none"):
    refuse("hyper", "combine_rewards", f"normalize_then_sum scale={v}", _cr(aggregation="normalize_then_sum", scale=v), "scale", v)
valid("nonfinite", "combine_rewards", "NaN = a reward function returned None", _cr(),
      "NaN marks a missing reward (TRL: None); an all-NaN row is unscorable and gets 0", check=lambda out: _row_zero(out, 3))
valid("empty", "combine_rewards", "B=0", _cr(rewards=torch.zeros(0, 2)), "no completion", reference=lambda: torch.zeros(0))
_R2_strided = torch.empty(_R2.shape[1], _R2.shape[0]).t().copy_(_R2)  # NaN != NaN, so _strided's check does not apply
assert not _R2_strided.is_contiguous()
valid("layout", "combine_rewards", "rewards non-contiguous", _cr(rewards=_R2_strided), "same values", reference=_cr())


def _row_zero(out, row) -> None:
    assert float(out[row]) == 0.0 and bool(torch.isfinite(out).all()), out


# --------------------------------------------------------------------------------------- algorithms
for field_name, bads in (("kl_coef", NON_NEGATIVE), ("adv_eps", NON_NEGATIVE), ("ent_coef", NON_NEGATIVE), ("vf_coef", NON_NEGATIVE),
                         ("dual_clip", [NAN, INF, 1.0, True]), ("value_clip", [NAN, INF, 0.0, -0.5, True]),
                         ("eps_low", [NAN, 0.0, 1.5, True]), ("eps_high", [NAN, INF, 0.0]), ("gamma", RANGE01), ("lam", RANGE01),
                         ("norm_length", [NAN, INF, 0, -1, True]), ("group_size", [0, -1, 2.5, True, "8"]),
                         ("whiten_advantages", ["yes", 1, None]), ("filter_groups", ["no", 0]),
                         ("max_response_length", [0, 2.5, True]), ("loss_agg_mode", ["mean"]), ("adv_estimator", ["vtrace"]),
                         ("pg_objective", ["ppo", None]), ("sapo_tau_pos", POSITIVE), ("sapo_tau_neg", POSITIVE),
                         ("kl_ratio_weighted", ["yes", 1, None]), ("ent_agg_mode", ["mean", 1]), ("global_token_norm", [1, "no", None]),
                         ("unscorable", ["drop", None]), ("kl_estimator", ["k2+", "mse"])):
    for v in bads:
        cls = "bool-int" if isinstance(v, bool) else ("group" if field_name == "group_size" else "hyper")
        refuse(cls, "AlgoConfig", f"{field_name}={v!r}", lambda f=field_name, v=v: G.AlgoConfig(**{f: v}), field_name, str(v))
        refuse(cls, "get_preset", f"{field_name}={v!r}", lambda f=field_name, v=v: G.get_preset("dapo", **{f: v}), field_name, str(v))
refuse("hyper", "AlgoConfig", "overlong_buffer=5 without budget", lambda: G.AlgoConfig(overlong_buffer=5), "max_response_length", "None")
refuse("bool-int", "AlgoConfig", "overlong_buffer=True", lambda: G.AlgoConfig(overlong_buffer=True, max_response_length=8), "overlong_buffer", "True")
refuse("hyper", "get_preset", "unknown field", lambda: G.get_preset("grpo", kl_coeff=0.1), "kl_coeff", "kl_coeff")
# combinations the new fields refuse (each names the field that does not apply)
refuse("hyper", "AlgoConfig", "dual_clip with cispo", lambda: G.AlgoConfig(pg_objective="cispo", dual_clip=3.0), "dual_clip", "cispo")
refuse("hyper", "AlgoConfig", "dual_clip with sapo", lambda: G.AlgoConfig(pg_objective="sapo", dual_clip=3.0), "dual_clip", "sapo")
refuse("hyper", "AlgoConfig", "kl_ratio_weighted with the KL in the reward",
       lambda: G.get_preset("rloo", kl_coef=0.1, kl_ratio_weighted=True), "kl_ratio_weighted", "reward")
refuse("hyper", "AlgoConfig", "global_token_norm under seq-mean-token-mean", lambda: G.AlgoConfig(global_token_norm=True),
       "global_token_norm", "seq-mean-token-mean")
refuse("hyper", "get_preset", "unscorable with gae", lambda: G.get_preset("ppo", unscorable="zero_advantage"), "unscorable", "gae")
refuse("hyper", "get_preset", "unscorable with reinforce_pp", lambda: G.get_preset("reinforce_pp", unscorable="zero_advantage"),
       "unscorable", "reinforce_pp")
for v in (NAN, INF, 0.0, -2.0, True, "8"):
    refuse("bool-int" if isinstance(v, bool) else "hyper", "LossInputs", f"num_tokens={v!r}",
           lambda v=v: G.LossInputs(_logp(1), _logp(2), _bt(3), MASK, num_tokens=v), "LossInputs.num_tokens", str(v))
refuse("hyper", "get_preset", "unknown name", lambda: G.get_preset("ppo2"), "name", "ppo2")
refuse("dtype", "LossInputs", "logp a list", lambda: G.LossInputs([0.0], torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1)), "LossInputs.logp", "list")
refuse("dtype", "LossInputs", "values complex", lambda: G.LossInputs(_logp(1), _logp(2), _bt(3), MASK, values=_bt(4).to(torch.complex64)),
       "LossInputs.values", "complex")


def _inputs(**over):
    d = dict(logp=_logp(50), old_logp=_logp(51), advantages=_bt(52), mask=MASK, ref_logp=_logp(53), entropy=_bt(54).abs(),
             values=_bt(55), old_values=_bt(56), returns=_bt(57))
    d.update(over)
    return G.LossInputs(**d)


_PPO = G.get_preset("ppo", ent_coef=0.01)
_GRPO = G.get_preset("grpo", ent_coef=0.01)
for arg in ("logp", "old_logp", "advantages", "ref_logp", "entropy", "values", "old_values", "returns"):
    x = getattr(_inputs(), arg)
    for bad, word in ((NAN, "nan"), (INF, "inf")):
        refuse("nonfinite", "compute_loss", f"{arg}={bad} masked-in", lambda a=arg, x=x, bad=bad: G.compute_loss(_inputs(**{a: _set(x, IN, bad)}), _PPO), arg, word)
    valid("nonfinite", "compute_loss", f"{arg}=nan in padding", lambda a=arg, x=x: G.compute_loss(_inputs(**{a: _set(x, OUT, NAN)}), _PPO),
          "padding never reaches loss or metrics", reference=lambda: G.compute_loss(_inputs(), _PPO))
    refuse("shape", "compute_loss", f"{arg} narrowed", lambda a=arg, x=x: G.compute_loss(_inputs(**{a: x[:, :-1]}), _PPO), arg, str((B, T - 1)))
    valid("layout", "compute_loss", f"{arg} non-contiguous", lambda a=arg, x=x: G.compute_loss(_inputs(**{a: _strided(x)}), _PPO),
          "same values", reference=lambda: G.compute_loss(_inputs(), _PPO))
for bad in (2.0, -1.0, 0.5):
    refuse("mask", "compute_loss", f"mask {bad}", lambda bad=bad: G.compute_loss(_inputs(mask=_set(MASK, IN, bad)), _GRPO), "mask", "0 and 1")
    refuse("mask", "compute_advantages", f"mask {bad}", lambda bad=bad: G.compute_advantages(_GRPO, torch.ones(B), _set(MASK, IN, bad)), "mask", "0 and 1")
valid("mask", "compute_loss", "bool mask", lambda: G.compute_loss(_inputs(mask=MASK.bool()), _PPO), "a 0/1 mask of any dtype",
      reference=lambda: G.compute_loss(_inputs(), _PPO))
_GLOBAL = G.get_preset("dapo", global_token_norm=True, ent_coef=0.01)
refuse("hyper", "compute_loss", "global_token_norm without num_tokens", lambda: G.compute_loss(_inputs(), _GLOBAL), "num_tokens", "None")
refuse("hyper", "compute_loss", "num_tokens without global_token_norm", lambda: G.compute_loss(_inputs(num_tokens=12.0), G.get_preset("dapo")),
       "num_tokens", "global_token_norm")
valid("hyper", "compute_loss", "num_tokens as a 0-dim tensor", lambda: G.compute_loss(_inputs(num_tokens=torch.tensor(12.0)), _GLOBAL),
      "a real 0-dim tensor is read as its value", reference=lambda: G.compute_loss(_inputs(num_tokens=12.0), _GLOBAL))
refuse("dtype", "compute_loss", "cfg a dict", lambda: G.compute_loss(_inputs(), {"loss_fn": "grpo"}), "cfg", "dict")
refuse("dtype", "compute_loss", "inp a dict", lambda: G.compute_loss({"logp": 0}, _GRPO), "inp", "dict")
valid("empty", "compute_loss", "B=0", lambda: G.compute_loss(G.LossInputs(*(torch.zeros(0, T) for _ in range(4)), ref_logp=torch.zeros(0, T),
                                                                          entropy=torch.zeros(0, T)), _GRPO),
      "no completion: loss 0", check=_zero_loss)

def _unscorable_row_zero(out) -> None:
    adv = out[0]
    assert bool((adv[0] == 0).all()) and bool((adv[1:] != 0).any()), adv


_OLD, _REF, _VAL = _logp(60), _logp(61), _bt(62)
for name in ("grpo", "rloo", "reinforce_pp", "ppo"):
    cfg = G.get_preset(name, kl_coef=0.05, group_size=GS) if name != "ppo" else G.get_preset(name)
    if name == "rloo":
        cfg = cfg.replace(kl_placement="reward")
    ca = lambda cfg=cfg, **kw: (lambda: G.compute_advantages(cfg, **{**dict(scores=_rewards(), mask=MASK, old_logp=_OLD, ref_logp=_REF, values=_VAL), **kw}))  # noqa: E731
    refuse("nonfinite", "compute_advantages", f"{name} scores nan", ca(scores=_set(_rewards(), 0, NAN)), "scores", "nan")
    if cfg.adv_estimator in ("grpo", "rloo"):
        lenient = cfg.replace(unscorable="zero_advantage")
        ca_nan = lambda cfg=lenient, **kw: (lambda: G.compute_advantages(cfg, **{**dict(scores=_rewards(), mask=MASK, old_logp=_OLD, ref_logp=_REF, values=_VAL), **kw}))  # noqa: E731
        refuse("nonfinite", "compute_advantages", f"{name} unscorable scores inf", ca_nan(scores=_set(_rewards(), 0, INF)), "scores", "inf")
        valid("nonfinite", "compute_advantages", f"{name} unscorable scores nan", ca_nan(scores=torch.tensor([NAN, 0.0, 0.2, 0.9])),
              "unscorable='zero_advantage': a NaN score is an unscorable completion, advantage 0",
              check=_unscorable_row_zero)
    refuse("shape", "compute_advantages", f"{name} scores [B, 1]", ca(scores=_rewards()[:, None]), "scores", "(4, 1)")
    if cfg.kl_placement == "reward" and cfg.kl_coef > 0:
        for arg, x in (("old_logp", _OLD), ("ref_logp", _REF)):
            refuse("nonfinite", "compute_advantages", f"{name} {arg} inf", ca(**{arg: _set(x, IN, INF)}), arg, "inf")
            valid("nonfinite", "compute_advantages", f"{name} {arg} nan in padding", ca(**{arg: _set(x, OUT, NAN)}),
                  "padding never reaches the advantages", reference=ca())
            refuse("shape", "compute_advantages", f"{name} {arg} narrowed", ca(**{arg: x[:, :-1]}), arg, str((B, T - 1)))
    if name == "ppo":
        refuse("nonfinite", "compute_advantages", "ppo values nan", ca(values=_set(_VAL, IN, NAN)), "values", "nan")
        valid("nonfinite", "compute_advantages", "ppo values nan in padding", ca(values=_set(_VAL, OUT, NAN)),
              "padding never reaches the advantages", reference=ca())
    elif cfg.adv_estimator in ("grpo", "rloo", "reinforce_pp_baseline"):
        refuse("group", "compute_advantages", f"{name} B=3", ca(scores=torch.ones(3), mask=MASK[:3], old_logp=_OLD[:3], ref_logp=_REF[:3],
                                                                values=_VAL[:3]), "scores", "3")
    valid("layout", "compute_advantages", f"{name} non-contiguous", ca(scores=_strided(_rewards()), mask=_strided(MASK)), "same values", reference=ca())
    valid("empty", "compute_advantages", f"{name} B=0", ca(scores=torch.zeros(0), mask=torch.zeros(0, T), old_logp=torch.zeros(0, T),
                                                           ref_logp=torch.zeros(0, T), values=torch.zeros(0, T)),
          "no completion: empty advantages", check=lambda out: None if out[0].shape == (0, T) else (_ for _ in ()).throw(AssertionError(out)))
refuse("dtype", "compute_advantages", "cfg a str", lambda: G.compute_advantages("grpo", _rewards(), MASK), "cfg", "str")


# -------------------------------------------------------------------------------- the training loop
_TASK = G.AdditionTask(n_digits=1, eval_size=8)
_CFG = G.GPTConfig(vocab_size=_TASK.vocab_size, block_size=_TASK.max_prompt_len + _TASK.max_new_tokens, n_layer=1, n_head=2, n_embd=16)
_MODEL = G.tiny_gpt(_CFG, seed=0).eval()
_PAIRS = torch.tensor([[1, 2], [3, 4]])
_IDS, _AM = _TASK.encode_prompts(_PAIRS)

for f, v in (("n_layer", True), ("vocab_size", 0), ("n_embd", 16.0), ("block_size", "32"), ("n_head", False)):
    refuse("bool-int" if isinstance(v, bool) else "hyper", "GPTConfig", f"{f}={v!r}", lambda f=f, v=v: G.GPTConfig(**{f: v}), f, str(v))
for v in (1.5, True, -1, "0"):
    refuse("bool-int" if v is True else "hyper", "tiny_gpt", f"seed={v!r}", lambda v=v: G.tiny_gpt(_CFG, seed=v), "seed", str(v))
refuse("dtype", "tiny_gpt", "config a dict", lambda: G.tiny_gpt({"vocab_size": 4}), "config", "dict")
refuse("dtype", "TinyGPT.forward", "input_ids float", lambda: _MODEL(_IDS.float()), "input_ids", "float")
refuse("shape", "TinyGPT.forward", "input_ids out of vocab", lambda: _MODEL(_set(_IDS, (0, 0), 99)), "input_ids", "99")
refuse("shape", "TinyGPT.forward", "input_ids B=0", lambda: _MODEL(_IDS[:0]), "input_ids", str(tuple(_IDS[:0].shape)))
refuse("mask", "TinyGPT.forward", "attention_mask 2", lambda: _MODEL(_IDS, attention_mask=_set(_AM, (0, 3), 2)), "attention_mask", "0 and 1")
refuse("shape", "TinyGPT.forward", "attention_mask narrowed", lambda: _MODEL(_IDS, attention_mask=_AM[:, 1:]), "attention_mask", str(tuple(_AM[:, 1:].shape)))
valid("dtype", "TinyGPT.forward", "input_ids int16", lambda: _MODEL(_IDS.to(torch.int16), attention_mask=_AM).logits,
      "any integer dtype holds ids", reference=lambda: _MODEL(_IDS, attention_mask=_AM).logits)
valid("layout", "TinyGPT.forward", "non-contiguous ids and mask", lambda: _MODEL(_strided(_IDS), attention_mask=_strided(_AM)).logits,
      "same values", reference=lambda: _MODEL(_IDS, attention_mask=_AM).logits)
for kw, arg, det in ((dict(hidden_size=0), "hidden_size", "0"), (dict(hidden_size=True), "hidden_size", "True"),
                     (dict(init_std=NAN), "init_std", "nan"), (dict(seed=0.5), "seed", "0.5")):
    refuse("bool-int" if True in kw.values() and isinstance(list(kw.values())[0], bool) else "hyper", "ValueModel", str(kw),
           lambda kw=kw: G.ValueModel(_MODEL, **{"hidden_size": 16, **kw}), arg, det)


def _generate(**kw):
    base = dict(model=_MODEL, prompt_ids=_IDS, prompt_mask=_AM, max_new_tokens=3, eos_id=2, pad_id=0, generator=_gen(0))
    return lambda: G.generate(**{**base, **kw})


for v in (NAN, INF, 0.0, -1.0, None):
    refuse("hyper", "generate", f"temperature={v!r}", _generate(temperature=v), "temperature", str(v))
for v in (0, 2.5, True, None):
    refuse("bool-int" if v is True else "hyper", "generate", f"max_new_tokens={v!r}", _generate(max_new_tokens=v), "max_new_tokens", str(v))
for arg, v in (("eos_id", 2.0), ("pad_id", -1), ("eos_id", True), ("greedy", "yes"), ("use_cache", 1)):
    refuse("bool-int" if v is True else "hyper", "generate", f"{arg}={v!r}", _generate(**{arg: v}), arg, str(v))
refuse("hyper", "generate", "generator a seed", _generate(generator=0), "generator", "int")
refuse("mask", "generate", "prompt_mask 2", _generate(prompt_mask=_set(_AM, (0, 3), 2)), "prompt_mask", "0 and 1")
refuse("mask", "generate", "prompt_mask empty row", _generate(prompt_mask=_set(_AM, 0, 0)), "prompt_mask", "[0]")
refuse("dtype", "generate", "prompt_ids float", _generate(prompt_ids=_IDS.float()), "prompt_ids", "float")
refuse("empty", "generate", "B=0", _generate(prompt_ids=_IDS[:0], prompt_mask=_AM[:0]), "prompt_ids", str(tuple(_IDS[:0].shape)))
refuse("shape", "generate", "prompt_mask narrowed", _generate(prompt_mask=_AM[:, 1:]), "prompt_mask", str(tuple(_AM[:, 1:].shape)))
valid("dtype", "generate", "prompt_ids int16", lambda: _generate(prompt_ids=_IDS.to(torch.int16))().tokens,
      "any integer dtype holds ids; same draws from the same generator", reference=lambda: _generate()().tokens)
valid("layout", "generate", "non-contiguous prompts", lambda: _generate(prompt_ids=_strided(_IDS), prompt_mask=_strided(_AM))().logp,
      "same values", reference=lambda: _generate()().logp)


def _rollout(**kw):
    base = dict(model=_MODEL, task=_TASK, pairs=_PAIRS, group_size=2, max_new_tokens=3, generator=_gen(0))
    return lambda: G.rollout(**{**base, **kw})


for v in (0, -1, 2.0, "2"):
    refuse("group", "rollout", f"group_size={v!r}", _rollout(group_size=v), "group_size", str(v))
refuse("bool-int", "rollout", "group_size=True", _rollout(group_size=True), "group_size", "True")
refuse("hyper", "rollout", "truncation_reward nan", _rollout(truncation_reward=NAN), "truncation_reward", "nan")
refuse("hyper", "rollout", "truncation 'drop'", _rollout(truncation="drop"), "truncation", "drop")
refuse("hyper", "rollout", "temperature inf", _rollout(temperature=INF), "temperature", "inf")
refuse("empty", "rollout", "no prompt", _rollout(pairs=_PAIRS[:0]), "pairs", "(0, 2)")
refuse("shape", "rollout", "pairs out of range", _rollout(pairs=torch.tensor([[1, 12]])), "pairs", "12")
refuse("empty", "evaluate", "no prompt", lambda: G.evaluate(_MODEL, _TASK, _PAIRS[:0]), "pairs", "(0, 2)")
for v in (0, True, 2.5):
    refuse("bool-int" if v is True else "hyper", "evaluate", f"batch_size={v!r}", lambda v=v: G.evaluate(_MODEL, _TASK, _PAIRS, batch_size=v), "batch_size", str(v))
valid("layout", "evaluate", "non-contiguous pairs", lambda: G.evaluate(_MODEL, _TASK, _strided(_PAIRS)), "same prompts",
      reference=lambda: G.evaluate(_MODEL, _TASK, _PAIRS))

for kw, arg, det in ((dict(n_digits=True), "n_digits", "True"), (dict(n_digits=2.0), "n_digits", "2.0"), (dict(n_digits=7), "n_digits", "7"),
                     (dict(eval_size=True), "eval_size", "True"), (dict(format_reward=NAN), "format_reward", "nan"),
                     (dict(format_reward=-0.1), "format_reward", "-0.1"), (dict(seed=1.5), "seed", "1.5"), (dict(zero_pad="yes"), "zero_pad", "yes")):
    refuse("bool-int" if True in kw.values() and isinstance(list(kw.values())[0], bool) else "hyper", "AdditionTask", str(kw),
           lambda kw=kw: G.AdditionTask(**{"n_digits": 1, "eval_size": 8, **kw}), arg, det)
refuse("dtype", "CharTokenizer", "chars a list", lambda: G.CharTokenizer(["0", "1"]), "chars", "['0', '1']")
refuse("hyper", "CharTokenizer", "chars repeated", lambda: G.CharTokenizer("00"), "chars", "'00'")
refuse("dtype", "CharTokenizer.encode", "text an int", lambda: _TASK.tokenizer.encode(12), "text", "int")
refuse("hyper", "CharTokenizer.encode", "text outside the vocabulary", lambda: _TASK.tokenizer.encode("1-2"), "characters", "-")
for v in (0, True, 2.0, NAN):
    refuse("bool-int" if v is True else "hyper", "parse_answer", f"max_digits={v!r}", lambda v=v: G.parse_answer("12", v), "max_digits", str(v))
valid("dtype", "parse_answer", "text not a str", lambda: torch.tensor(0.0) if G.parse_answer(12, 3) is None else torch.tensor(NAN),
      "a non-string is not an answer: None (documented)", reference=lambda: torch.tensor(0.0))
for v in (0, True, 2.0):
    refuse("bool-int" if v is True else "hyper", "AdditionTask.sample_train", f"n={v!r}", lambda v=v: _TASK.sample_train(v, _gen(0)), "n", str(v))
refuse("hyper", "AdditionTask.sample_train", "generator an int", lambda: _TASK.sample_train(4, 0), "generator", "int")
for pairs, det in ((_PAIRS[:0], "(0, 2)"), (_PAIRS.float(), "float"), (torch.tensor([[1, 10]]), "10"), (torch.tensor([1, 2]), "(2,)"),
                   (torch.tensor([[1, 2, 3]]), "(1, 3)")):
    cls = "empty" if pairs.numel() == 0 else ("dtype" if det == "float" else "shape")
    refuse(cls, "AdditionTask.encode_prompts", det, lambda p=pairs: _TASK.encode_prompts(p), "pairs", det)
    refuse(cls, "AdditionTask.score", det, lambda p=pairs: _TASK.score(p, torch.zeros(max(p.shape[0], 1), 2, dtype=torch.long)), "pairs", det)
refuse("shape", "AdditionTask.score", "responses out of vocab", lambda: _TASK.score(_PAIRS, torch.full((2, 2), 99)), "responses", "99")
refuse("dtype", "AdditionTask.score", "responses float", lambda: _TASK.score(_PAIRS, torch.zeros(2, 2)), "responses", "float")
refuse("shape", "AdditionTask.score", "rows differ", lambda: _TASK.score(_PAIRS, torch.zeros(3, 2, dtype=torch.long)), "responses", "3")
for a, det in ((10, "10"), (-1, "-1"), (True, "True"), (1.0, "1.0")):
    refuse("bool-int" if a is True else "hyper", "AdditionTask.answer_ids", f"a={a!r}", lambda a=a: _TASK.answer_ids(a, 1), "a", det)

for kw, arg, det in ((dict(lr=NAN), "lr", "nan"), (dict(lr=0.0), "lr", "0.0"), (dict(lr=INF), "lr", "inf"), (dict(steps=-1), "steps", "-1"),
                     (dict(steps=2.5), "steps", "2.5"), (dict(batch_size=True), "batch_size", "True"), (dict(batch_size=0), "batch_size", "0"),
                     (dict(target_accuracy=NAN), "target_accuracy", "nan"), (dict(target_accuracy=1.5), "target_accuracy", "1.5"),
                     (dict(weight_decay=INF), "weight_decay", "inf"), (dict(check_every=0), "check_every", "0"),
                     (dict(check_size=False), "check_size", "False"), (dict(seed=0.5), "seed", "0.5")):
    cls = "bool-int" if isinstance(list(kw.values())[0], bool) else "hyper"
    refuse(cls, "supervised_warm_start", str(kw), lambda kw=kw: G.supervised_warm_start(_MODEL, _TASK, **kw), arg, det)
for kw, arg, det in ((dict(lr=NAN), "lr", "nan"), (dict(target_accuracy=0.0), "target_accuracy", "0.0"), (dict(n_layer=True), "n_layer", "True"),
                     (dict(steps=True), "steps", "True"), (dict(n_embd=30), "n_embd", "30")):
    cls = "bool-int" if isinstance(list(kw.values())[0], bool) else "hyper"
    refuse(cls, "warm_start_policy", str(kw), lambda kw=kw: G.warm_start_policy(_TASK, **kw), arg, det)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case):
    result = outcome(case)
    assert result in ("refused", "valid"), f"{case.id}: {result}"


def test_campaign_covers_every_class_and_public_function():
    classes = Counter(c.cls for c in CASES)
    assert set(classes) == {"shape", "dtype", "mask", "nonfinite", "hyper", "bool-int", "group", "empty", "layout"}
    funcs = {c.func.split("[")[0].split(".")[0] for c in CASES}
    public = {"token_logprobs", "token_entropy", "response_mask", "masked_sum", "masked_mean", "masked_var", "masked_whiten",
              "kl_k1", "kl_k2", "kl_k3", "kl_estimate", "categorical_kl", "aggregate", "grpo_advantages", "rloo_advantages",
              "combine_rewards",
              "discounted_returns", "reinforce_pp_advantages", "gae_advantages", "process_advantages", "overlong_penalty",
              "policy_loss", "value_loss", "entropy_bonus", "kl_in_reward", "AlgoConfig", "get_preset", "compute_advantages",
              "compute_loss", "LossInputs", "GPTConfig", "tiny_gpt", "TinyGPT", "ValueModel", "generate", "rollout", "evaluate",
              "AdditionTask", "parse_answer", "supervised_warm_start", "warm_start_policy", "CharTokenizer"}
    assert public <= funcs, public - funcs
    assert all(c.why for c in CASES if c.refused_arg is None), "every valid case says why it is valid"


# -------------------------------------------------------------------- properties (hypothesis)
_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -0.0, 1e-300, 1 - 1e-16]))


@_SETTINGS
@given(kl_coef=_floats, eps_low=_floats, dual_clip=st.one_of(st.none(), _floats), max_log_ratio=_floats)
def test_policy_loss_hyperparameters_refused_or_finite(kl_coef, eps_low, dual_clip, max_log_ratio):
    """Any float for a hyperparameter: a ValueError naming the first bad one, or a finite loss (never NaN)."""
    d = dict(logp=_logp(70), old_logp=_logp(71), advantages=_bt(72), mask=MASK, ref_logp=_logp(73))
    ok = (math.isfinite(kl_coef) and kl_coef >= 0, 0 < eps_low <= 1, dual_clip is None or (math.isfinite(dual_clip) and dual_clip > 1),
          math.isfinite(max_log_ratio) and max_log_ratio > 0)
    try:
        loss, metrics = G.policy_loss(**d, kl_coef=kl_coef, eps_low=eps_low, dual_clip=dual_clip, max_log_ratio=max_log_ratio)
    except ValueError as e:
        if all(ok):  # finite but extreme (kl_coef = 1e308): the overflow is refused, naming the scale
            assert "overflowed" in str(e) and _names(str(e), "kl_coef"), e
            return
        assert any(_names(str(e), n) for n, good in zip(("kl_coef", "eps_low", "dual_clip", "max_log_ratio"), ok) if not good), e
        return
    assert all(ok)
    assert all(bool(torch.isfinite(t).all()) for t in [loss, *metrics.values()])


@_SETTINGS
@given(value=_floats, lo=st.floats(-10, 10), width=st.floats(0, 10), lo_open=st.booleans(), hi_open=st.booleans())
def test_check_real_never_lets_nan_or_out_of_range_through(value, lo, width, lo_open, hi_open):
    hi = lo + width
    inside = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    try:
        got = check_real("x", value, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    except ValueError as e:
        assert not inside and "x must" in str(e) and repr(float(value)) in str(e)
        return
    assert inside and got == value


@_SETTINGS
@given(data=st.data())
def test_any_bad_mask_value_is_refused_everywhere(data):
    """A mask holding any value other than 0/1 at any position is refused by every masked function."""
    pos = (data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, T - 1)))
    bad = data.draw(st.one_of(st.floats(width=32, allow_nan=True).filter(lambda v: v not in (0.0, 1.0)),  # float32-exact
                              st.integers(-5, 5).filter(lambda v: v not in (0, 1))))
    mask = _set(MASK, pos, bad) if isinstance(bad, float) else _set(MASK.long(), pos, bad)
    for fn in (lambda m: G.masked_mean(_bt(1), m), lambda m: G.aggregate(_bt(2), m, "token-mean"),
               lambda m: G.policy_loss(_logp(3), _logp(4), _bt(5), m), lambda m: G.discounted_returns(_bt(6), m),
               lambda m: G.compute_advantages(_GRPO, torch.ones(B), m)):
        with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
            fn(mask)


@_SETTINGS
@given(data=st.data())
def test_nonfinite_anywhere_masked_in_is_refused_and_padding_is_free(data):
    """NaN/inf at a random position of a random policy_loss tensor: refused (naming it) iff the mask is 1 there;
    under the mask's 0s the loss and its gradient equal those of the clean call."""
    arg = data.draw(st.sampled_from(["logp", "old_logp", "advantages", "ref_logp", "entropy"]))
    pos = (data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, T - 1)))
    bad = data.draw(st.sampled_from([NAN, INF, -INF]))
    make = lambda: dict(logp=_logp(80).requires_grad_(True), old_logp=_logp(81), advantages=_bt(82), mask=MASK, ref_logp=_logp(83),  # noqa: E731
                        entropy=_bt(84).abs(), kl_coef=0.1)
    kw = make()
    kw[arg] = _set(kw[arg].detach(), pos, bad).requires_grad_(arg == "logp")
    if MASK[pos] > 0:
        with pytest.raises(ValueError) as e:
            G.policy_loss(**kw)
        assert _names(str(e.value), arg)
        return
    loss, _ = G.policy_loss(**kw)
    clean = make()
    ref, _ = G.policy_loss(**clean)
    assert torch.equal(loss, ref)
    grads = [torch.autograd.grad(x, kw_["logp"])[0] for x, kw_ in ((loss, kw), (ref, clean))]
    assert bool(torch.isfinite(grads[0]).all()) and torch.equal(*grads)


@_SETTINGS
@given(group_size=st.one_of(st.integers(-3, 9), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=2)),
       batch=st.integers(0, 12))
def test_group_size_refused_or_exact(group_size, batch):
    r = torch.arange(float(batch))
    good = isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 2 and batch % group_size == 0
    try:
        out = G.grpo_advantages(r, group_size)
    except ValueError as e:
        assert not good and _names(str(e), "group_size"), e
        return
    assert good and out.shape == (batch,) and bool(torch.isfinite(out).all())


# ------------------------------------------------------------------------------------- the table
def campaign_table() -> str:
    rows: Dict[str, Counter] = {}
    for c in CASES:
        r = outcome(c).split(":")[0]
        rows.setdefault(c.cls, Counter())[r] += 1
    cols = ["refused", "valid", "silent-nonfinite", "silent-meaningless", "wrong-message", "other-exception", "unexpected-refusal"]
    lines = [f"{'class':<10} " + " ".join(f"{k:>18}" for k in cols)]
    total = Counter()
    for cls in sorted(rows):
        total.update(rows[cls])
        lines.append(f"{cls:<10} " + " ".join(f"{rows[cls][k]:>18}" for k in cols))
    lines.append(f"{'total':<10} " + " ".join(f"{total[k]:>18}" for k in cols))
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"{len(CASES)} cases")
    print(campaign_table())


def test_math_layer_does_not_import_the_loop_layer():
    """The math modules (and their shared checks) import neither the model, the task, rollouts, the trainer, the
    CLI nor plotting: the checks add no dependency from the math to the training loop."""
    import ast
    import pathlib

    pkg = pathlib.Path(G.__file__).parent
    loop = {"model", "tasks", "rollout", "trainer", "__main__", "plotting", "sft"}
    for name in ("_checks", "logprobs", "masks", "kl", "advantages", "aggregation", "surrogate", "ppo", "algorithms"):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        imported = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level and node.module}
        assert not imported & loop, (name, imported & loop)


@pytest.mark.parametrize("bound", [3.402823466385289e38, 1e300])
def test_bounds_beyond_float32_are_legal_and_act_as_no_bound(bound):
    """A validated bound larger than float32's largest value (found by hypothesis: max_log_ratio = 3.4028234663852890e38,
    just past it) must not make torch's clamp raise; it clamps nothing that float32 can hold."""
    g = torch.Generator().manual_seed(0)
    lp, old = -torch.rand(4, 5, generator=g), -torch.rand(4, 5, generator=g)
    adv, m = torch.randn(4, 5, generator=g), torch.ones(4, 5)
    wide, _ = G.policy_loss(lp, old, adv, m, eps_low=0.2, eps_high=bound, max_log_ratio=bound, ref_logp=old, kl_coef=0.1)
    loose, _ = G.policy_loss(lp, old, adv, m, eps_low=0.2, eps_high=1e30, max_log_ratio=1e30, ref_logp=old, kl_coef=0.1)
    assert torch.isfinite(wide) and torch.equal(wide, loose)
    assert torch.isfinite(G.kl_k3(lp, old, max_log_ratio=bound)).all()
    assert torch.isfinite(G.value_loss(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g),
                                     torch.randn(4, 5, generator=g), m, clip_range=bound)[0])
