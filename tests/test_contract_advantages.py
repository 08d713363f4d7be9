"""The documented contract of ``grpo_ref.advantages``, pinned where mutation testing (issue 13) found it unpinned.

* every refusal is a ``ValueError`` that names the caller's argument as a whole word (and, where the docstring
  says so, shows the offending value or shape), one case per argument and per check: the shape of *each* tensor
  argument is made wrong on its own, so a shape check that forgot one argument is caught;
* every documented domain is tested at its edge: accepted on it, refused just past it (``gamma``, ``lam`` in
  ``[0, 1]``, ``eps >= 0``, ``group_size >= 1`` or ``>= 2``, ``0 < cache_length <= max_length``, ``lengths >= 0``);
* documented defaults (``gamma = 1``, ``lam = 0.95``, ``eps``, TRL's ``combine_rewards`` defaults) are pinned by
  their effect: the default equals the value passed explicitly and differs from another value where it binds;
* float64 in gives float64 out, also on the early-return paths (``S = 0``, ``B = 0``);
* the exact-zero rule for flat groups of process supervision holds with ``eps = 0`` and padding steps, where a
  flat group that is not detected gives ``0 / 0``.
The equations themselves are checked against slow loops in ``tests/test_advantages.py``.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from grpo_ref._checks import NonFiniteInputError
from grpo_ref import (
    combine_rewards,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    overlong_penalty,
    process_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
B, T = 4, 5
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=F64)


def _names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bt(seed: int, b: int = B, t: int = T) -> torch.Tensor:
    return torch.randn(b, t, generator=_gen(seed), dtype=F64)


def _with(x: torch.Tensor, at, value) -> torch.Tensor:
    x = x.clone()
    x[at] = value
    return x


# ------------------------------------------------------------------------------------------- process data
S = 3
STEP_ENDS = torch.tensor([[0, 2, 0], [1, 3, 4], [1, 2, 2], [0, 1, 1]])
STEP_MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=F64)


def _process(**kw):
    args = dict(step_rewards=_bt(1, B, S), step_ends=STEP_ENDS, step_mask=STEP_MASK, mask=MASK, group_size=2)
    args.update(kw)
    return process_advantages(**args)


def _gae(**kw):
    args = dict(token_rewards=_bt(2), values=_bt(3), mask=MASK)
    args.update(kw)
    return gae_advantages(**args)


def _rpp(**kw):
    args = dict(token_rewards=_bt(4), mask=MASK)
    args.update(kw)
    return reinforce_pp_advantages(**args)


def _dr(**kw):
    args = dict(token_rewards=_bt(5), mask=MASK)
    args.update(kw)
    return discounted_returns(**args)


R4 = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
K2 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.5]], dtype=F64)

# (label, call, argument the refusal must name, further words it must show)
REFUSALS = [
    # grpo_advantages / rloo_advantages (through _check_rewards)
    ("grpo rewards list", lambda: grpo_advantages([1.0, 2.0], 2), "rewards", []),
    ("grpo rewards complex", lambda: grpo_advantages(torch.ones(2, dtype=torch.complex64), 2), "rewards", []),
    ("grpo rewards 2-D", lambda: grpo_advantages(R4.reshape(2, 2), 2), "rewards", [r"\(2, 2\)"]),
    ("grpo rewards nan", lambda: grpo_advantages(_with(R4, 1, NAN), 2), "rewards", []),
    ("grpo group_size 1", lambda: grpo_advantages(R4, 1), "group_size", []),
    ("grpo group_size bool", lambda: grpo_advantages(R4[:2], True), "group_size", []),
    ("grpo group_size 3 of 4", lambda: grpo_advantages(R4, 3), "rewards", ["group_size"]),
    ("grpo scale", lambda: grpo_advantages(R4, 2, scale="std"), "scale", ["std"]),
    ("grpo eps negative", lambda: grpo_advantages(R4, 2, eps=-1e-300), "eps", []),
    ("grpo eps nan", lambda: grpo_advantages(R4, 2, eps=NAN), "eps", []),
    ("rloo rewards 2-D", lambda: rloo_advantages(R4.reshape(2, 2), 2), "rewards", []),
    ("rloo rewards inf", lambda: rloo_advantages(_with(R4, 0, INF), 2), "rewards", []),
    ("rloo group_size 1", lambda: rloo_advantages(R4, 1), "group_size", []),
    ("rloo group_size 3 of 4", lambda: rloo_advantages(R4, 3), "rewards", ["group_size"]),
    # discounted_returns (through _check_token_rewards)
    ("returns token_rewards bool", lambda: _dr(token_rewards=MASK > 0), "token_rewards", []),
    ("returns token_rewards 1-D", lambda: _dr(token_rewards=_bt(5)[0], mask=MASK[0]), "token_rewards", []),
    ("returns mask shape", lambda: _dr(mask=MASK[:, :4]), "mask", ["token_rewards"]),
    ("returns mask list", lambda: _dr(mask=MASK.tolist()), "mask", []),
    ("returns mask 0.5", lambda: _dr(mask=_with(MASK, (0, 0), 0.5)), "mask", []),
    ("returns token_rewards nan", lambda: _dr(token_rewards=_with(_bt(5), (1, 2), NAN)), "token_rewards", []),
    ("returns gamma above 1", lambda: _dr(gamma=1.0 + 1e-12), "gamma", []),
    ("returns gamma below 0", lambda: _dr(gamma=-1e-300), "gamma", []),
    # reinforce_pp_advantages
    ("rpp gamma above 1", lambda: _rpp(gamma=1.5), "gamma", []),
    ("rpp gamma above 1 with group_size", lambda: _rpp(gamma=1.5, group_size=2), "gamma", []),
    ("rpp group_size 1", lambda: _rpp(group_size=1), "group_size", []),
    ("rpp group_size 3 of 4", lambda: _rpp(group_size=3), "token_rewards", ["group_size"]),
    ("rpp mask shape", lambda: _rpp(mask=MASK[:3]), "mask", ["token_rewards"]),
    # gae_advantages: each tensor's shape on its own
    ("gae values bool", lambda: _gae(values=MASK > 0), "values", []),
    ("gae values list", lambda: _gae(values=_bt(3).tolist()), "values", []),
    ("gae values shape", lambda: _gae(values=_bt(3, B, T + 1)), "values", []),
    ("gae values fewer rows", lambda: _gae(values=_bt(3, B - 1, T)), "values", []),
    ("gae token_rewards shape", lambda: _gae(token_rewards=_bt(2, B, T + 1)), "token_rewards", []),
    ("gae mask shape", lambda: _gae(mask=MASK[:, :4]), "mask", []),
    ("gae values nan", lambda: _gae(values=_with(_bt(3), (1, 4), NAN)), "values", []),
    ("gae token_rewards inf", lambda: _gae(token_rewards=_with(_bt(2), (0, 0), -INF)), "token_rewards", []),
    ("gae lam above 1", lambda: _gae(lam=1.0 + 1e-12), "lam", []),
    ("gae lam below 0", lambda: _gae(lam=-1e-300), "lam", []),
    ("gae lam nan", lambda: _gae(lam=NAN), "lam", []),
    ("gae gamma above 1", lambda: _gae(gamma=1.0 + 1e-12), "gamma", []),
    # process_advantages: each tensor's shape on its own, each check
    ("process step_rewards bool", lambda: _process(step_rewards=STEP_MASK > 0), "step_rewards", []),
    ("process step_rewards 1-D", lambda: _process(step_rewards=_bt(1, B, S)[0], step_ends=STEP_ENDS[0],
                                                  step_mask=STEP_MASK[0]), "step_rewards", []),
    ("process step_rewards 3-D", lambda: _process(step_rewards=_bt(1, B, S)[None], step_ends=STEP_ENDS[None],
                                                  step_mask=STEP_MASK[None]), "step_rewards", []),
    ("process step_rewards shape", lambda: _process(step_rewards=_bt(1, B, S + 1)), "step_rewards", []),
    ("process step_ends shape", lambda: _process(step_ends=STEP_ENDS[:, :2]), "step_ends", []),
    ("process step_ends fewer rows", lambda: _process(step_ends=STEP_ENDS[:2]), "step_ends", []),
    ("process step_mask shape", lambda: _process(step_mask=STEP_MASK[:, :2]), "step_mask", ["step_rewards"]),
    ("process step_mask 2", lambda: _process(step_mask=_with(STEP_MASK, (0, 0), 2.0)), "step_mask", []),
    ("process mask 1-D", lambda: _process(mask=MASK[0]), "mask", []),
    ("process mask list", lambda: _process(mask=MASK.tolist()), "mask", []),
    ("process mask 0.5", lambda: _process(mask=_with(MASK, (0, 0), 0.5)), "mask", []),
    # rows of mask and step_rewards both shown; the other dimensions differ from them (T = 5, S = 3)
    ("process mask rows", lambda: _process(mask=MASK[:2]), "mask", ["step_rewards", "2", "4"]),
    ("process step_rewards nan", lambda: _process(step_rewards=_with(_bt(1, B, S), (1, 1), NAN)), "step_rewards", []),
    ("process group_size 0", lambda: _process(group_size=0), "group_size", []),
    ("process group_size 3 of 4", lambda: _process(group_size=3), "step_rewards", ["group_size"]),
    ("process eps negative", lambda: _process(eps=-1e-300), "eps", []),
    ("process step_ends float", lambda: _process(step_ends=STEP_ENDS.double()), "step_ends", []),
    ("process step_ends bool", lambda: _process(step_ends=STEP_ENDS > 0), "step_ends", []),
    ("process step_ends at T", lambda: _process(step_ends=_with(STEP_ENDS, (1, 2), T)), "step_ends", ["5"]),
    ("process step_ends negative", lambda: _process(step_ends=_with(STEP_ENDS, (2, 0), -7)), "step_ends", ["-7"]),
    # overlong_penalty
    ("overlong max_length 0", lambda: overlong_penalty(torch.tensor([1]), 0, 1), "max_length", []),
    ("overlong max_length float", lambda: overlong_penalty(torch.tensor([1]), 4.0, 1), "max_length", []),
    ("overlong cache_length 0", lambda: overlong_penalty(torch.tensor([1]), 4, 0), "cache_length", []),
    ("overlong cache_length above", lambda: overlong_penalty(torch.tensor([1]), 4, 5), "cache_length", []),
    ("overlong cache_length bool", lambda: overlong_penalty(torch.tensor([1]), 4, True), "cache_length", []),
    ("overlong lengths 2-D", lambda: overlong_penalty(torch.ones(2, 2), 4, 2), "lengths", [r"\(2, 2\)"]),
    ("overlong lengths bool", lambda: overlong_penalty(torch.ones(2, dtype=torch.bool), 4, 2), "lengths", []),
    ("overlong lengths nan", lambda: overlong_penalty(torch.tensor([1.0, NAN]), 4, 2), "lengths", []),
    # only the offending (negative) lengths are shown, not the legal zeros before them
    ("overlong lengths negative", lambda: overlong_penalty(torch.tensor([0.0, 0.0, 0.0, -2.0]), 4, 2), "lengths",
     [r"-2\.0"]),
    # combine_rewards
    ("combine aggregation", lambda: combine_rewards(K2, None, 2, "sum"), "aggregation", []),
    ("combine scale", lambda: combine_rewards(K2, None, 2, scale="std"), "scale", ["std"]),
    ("combine scale under normalize_then_sum", lambda: combine_rewards(K2, None, 2, "normalize_then_sum", "group"),
     "scale", ["normalize_then_sum"]),
    ("combine eps negative", lambda: combine_rewards(K2, None, 2, eps=-1e-300), "eps", []),
    ("combine rewards bool", lambda: combine_rewards(K2 > 0, None, 2), "rewards", []),
    ("combine rewards 1-D", lambda: combine_rewards(K2[:, 0], None, 2), "rewards", []),
    ("combine rewards inf", lambda: combine_rewards(_with(K2, (1, 1), INF), None, 2), "rewards", []),
    ("combine group_size 1", lambda: combine_rewards(K2, None, 1), "group_size", []),
    ("combine group_size 3 of 4", lambda: combine_rewards(K2, None, 3), "rewards", ["group_size"]),
    ("combine weights bool", lambda: combine_rewards(K2, torch.ones(2, dtype=torch.bool), 2), "weights", []),
    ("combine weights 2-D", lambda: combine_rewards(K2, torch.ones(1, 2), 2), "weights", []),
    ("combine weights length", lambda: combine_rewards(K2, torch.ones(3), 2), "weights", ["3"]),
    ("combine weights nan", lambda: combine_rewards(K2, torch.tensor([1.0, NAN]), 2), "weights", []),
]


NONFINITE = {"grpo rewards nan", "rloo rewards inf", "returns token_rewards nan", "gae values nan",
             "gae token_rewards inf", "process step_rewards nan", "overlong lengths nan", "combine rewards inf",
             "combine weights nan"}
assert NONFINITE <= {c[0] for c in REFUSALS}


@pytest.mark.parametrize("label,call,arg,shown", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusal_names_the_argument(label, call, arg, shown):
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert _names(msg, arg), f"{label}: {msg!r} does not name {arg!r}"
    if label in NONFINITE:  # documented: a NaN/inf tensor raises NonFiniteInputError carrying the argument name
        assert isinstance(info.value, NonFiniteInputError) and info.value.name == arg, (label, info.value)
    for word in shown:
        assert re.search(rf"(?<![A-Za-z0-9_.]){word}(?![A-Za-z0-9_])", msg), f"{label}: {msg!r} lacks {word!r}"


# ------------------------------------------------------------------------------------------- domain edges
def test_gamma_and_lam_edges_are_accepted():
    for gamma in (0.0, 1.0):
        for lam in (0.0, 1.0):
            adv, ret = _gae(gamma=gamma, lam=lam)
            assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert torch.isfinite(_dr(gamma=gamma)).all()
        assert torch.isfinite(_rpp(gamma=gamma)).all()
        assert torch.isfinite(_rpp(gamma=gamma, group_size=2)).all()


def test_eps_zero_is_accepted():
    r = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=F64)
    for scale in ("group", "batch", "none"):
        out = grpo_advantages(r, 2, scale=scale, eps=0.0)
        assert torch.isfinite(out).all() and (out[:2] == 0).all()
    assert torch.isfinite(_process(eps=0.0)).all()
    assert torch.isfinite(combine_rewards(K2, None, 2, eps=0.0)).all()


def test_grpo_flat_group_with_eps_zero_is_exactly_zero_in_every_scale():
    """``0 / (0 + 0)`` in a flat group with ``eps = 0`` is 0 (documented), in each scale."""
    r = torch.tensor([3.0, 3.0, 3.0, 3.0], dtype=F64)  # every group flat, batch std 0 too
    for scale in ("group", "batch", "none"):
        out = grpo_advantages(r, 2, scale=scale, eps=0.0)
        assert out.dtype == F64 and (out == 0).all() and not torch.signbit(out).any()


def test_grpo_batch_scale_with_a_single_group_uses_its_std():
    """``scale="batch"`` on one group of two: the batch std is that group's (unbiased) std."""
    r = torch.tensor([1.0, 4.0], dtype=F64)
    sd = math.sqrt(((1.0 - 2.5) ** 2 + (4.0 - 2.5) ** 2) / 1)
    expected = torch.tensor([-1.5, 1.5], dtype=F64) / (sd + 1e-6)
    torch.testing.assert_close(grpo_advantages(r, 2, scale="batch"), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(grpo_advantages(r, 2, scale="batch"), grpo_advantages(r, 2, scale="group"),
                               rtol=1e-14, atol=0)


def test_grpo_and_rloo_keep_float64_and_empty_batches():
    for fn in (lambda x: grpo_advantages(x, 2), lambda x: grpo_advantages(x, 2, scale="batch"),
               lambda x: grpo_advantages(x, 2, scale="none"), lambda x: rloo_advantages(x, 2)):
        assert fn(R4).dtype == F64
        empty = fn(torch.zeros(0, dtype=F64))
        assert empty.shape == (0,) and empty.dtype == F64
        assert fn(torch.zeros(0)).dtype == torch.float32


def test_rloo_is_leave_one_out_in_float64():
    r = torch.tensor([0.1, 0.7, -0.3, 2.0, 5.0, 1.0], dtype=F64)
    for g in (2, 3, 6):
        expected = [r[i] - (r[(i // g) * g:(i // g) * g + g].sum() - r[i]) / (g - 1) for i in range(6)]
        torch.testing.assert_close(rloo_advantages(r, g), torch.stack(expected), rtol=1e-13, atol=1e-15)


def test_reinforce_pp_group_size_two_is_accepted():
    out = _rpp(group_size=2)
    assert out.dtype == F64 and torch.isfinite(out).all() and (out[MASK == 0] == 0).all()


def test_process_group_size_one_normalises_each_completion_alone():
    """``group_size = 1`` is allowed: each completion is its own group, so the result is that of each row alone."""
    sr = _bt(1, B, S)
    out = _process(step_rewards=sr, group_size=1)
    for i in range(B):
        alone = process_advantages(sr[i:i + 1], STEP_ENDS[i:i + 1], STEP_MASK[i:i + 1], MASK[i:i + 1], 1)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=0)
    # a slow loop per row (two or three real steps): r~ = (r - mean) / (std + eps), A_t = sum_{end_j >= t} r~_j
    for i in range(B):
        steps = [(x, e) for x, e, m in zip(sr[i].tolist(), STEP_ENDS[i].tolist(), STEP_MASK[i].tolist()) if m]
        mu = sum(x for x, _ in steps) / len(steps)
        sd = math.sqrt(sum((x - mu) ** 2 for x, _ in steps) / (len(steps) - 1))
        expected = [sum((x - mu) / (sd + 1e-6) for x, e in steps if e >= t) if MASK[i, t] else 0.0 for t in range(T)]
        torch.testing.assert_close(out[i], torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


def test_process_padding_steps_may_end_anywhere_and_hold_anything():
    """Padding steps (``step_mask = 0``) are not checked: their end index may lie outside ``[0, T)``, their reward
    may be NaN; the result is that of the same batch with tidy padding."""
    clean = _process()
    ends = STEP_ENDS.clone()
    ends[STEP_MASK == 0] = torch.tensor([-1, T, 10 * T])
    rewards = _bt(1, B, S)
    rewards[STEP_MASK == 0] = NAN
    torch.testing.assert_close(_process(step_rewards=rewards, step_ends=ends), clean, rtol=0, atol=0)


def test_process_flat_groups_are_exactly_zero_with_eps_zero_and_padding():
    """Four groups: a low one, a flat one at a negative value, a flat one at a positive value, a high one; the flat
    ones have padding steps. With ``eps = 0`` a flat group that were not detected would give ``0 / 0``; detected,
    its advantage is exactly 0, and the other groups are those of the batch without them (groups are independent)."""
    sr = torch.tensor([[-3.0, -2.0, 0.0], [-4.0, -2.5, -1.0],
                       [-0.3, -0.3, 0.0], [-0.3, -0.3, -0.3],
                       [0.7, 0.0, 0.0], [0.7, 0.7, 0.7],
                       [4.0, 6.0, 5.0], [9.0, 7.5, 8.0]], dtype=F64)
    sm = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]],
                      dtype=F64)
    sr = torch.where(sm > 0, sr, torch.full_like(sr, NAN))
    ends = torch.tensor([[0, 1, 3], [1, 2, 4], [0, 2, 9], [1, 2, 3], [4, -1, 7], [0, 1, 2], [0, 2, 3], [1, 3, 4]])
    mask = torch.ones(8, T, dtype=F64)
    out = process_advantages(sr, ends, sm, mask, 2, eps=0.0)
    assert out.dtype == F64
    assert (out[2:6] == 0).all()
    keep = [0, 1, 6, 7]
    alone = process_advantages(sr[keep], ends[keep], sm[keep], mask[keep], 2, eps=0.0)
    torch.testing.assert_close(out[keep], alone, rtol=0, atol=0)
    assert torch.isfinite(out).all() and (out[keep] != 0).any()


def test_process_without_steps_keeps_dtype_and_shape():
    for dtype in (F64, torch.float32):
        out = process_advantages(torch.zeros(B, 0, dtype=dtype), torch.zeros(B, 0, dtype=torch.long),
                                 torch.zeros(B, 0), MASK.float(), 2)
        assert out.shape == (B, T) and out.dtype == dtype and (out == 0).all()


def test_process_keeps_float64():
    assert _process().dtype == F64
    assert _process(step_rewards=_bt(1, B, S).float()).dtype == torch.float32


def test_overlong_smallest_lengths_are_accepted():
    """``max_length = cache_length = 1`` (the smallest legal pair): no soft zone below ``|y| = 1``; eq. 13 gives
    0 at ``|y| = 0``, -1 from ``|y| = 1`` on."""
    out = overlong_penalty(torch.tensor([0, 1, 2, 7]), 1, 1)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, -1.0, -1.0, -1.0]
    out = overlong_penalty([0, 2, 4, 5], 4, 4)  # cache_length = max_length: the soft zone starts at 0; a list
    assert out.tolist() == [0.0, -0.5, -1.0, -1.0]


# ------------------------------------------------------------------------------------------- defaults by effect
def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-6)


def test_discounted_returns_default_gamma_is_one():
    r = _bt(5)
    default = discounted_returns(r, MASK)
    torch.testing.assert_close(default, discounted_returns(r, MASK, 1.0), rtol=0, atol=0)
    assert _differs(default, discounted_returns(r, MASK, 0.5))
    # gamma = 1: the return-to-go is the plain sum of the masked-in rewards from t on
    expected = torch.flip(torch.cumsum(torch.flip(r * MASK, [1]), 1), [1]) * MASK
    torch.testing.assert_close(default, expected, rtol=1e-13, atol=1e-13)


def test_reinforce_pp_default_gamma_is_one():
    r = _bt(4)
    default = reinforce_pp_advantages(r, MASK)
    torch.testing.assert_close(default, reinforce_pp_advantages(r, MASK, 1.0), rtol=0, atol=0)
    assert _differs(default, reinforce_pp_advantages(r, MASK, 0.5))
    assert default.dtype == F64


def test_gae_defaults_are_gamma_one_lam_095():
    r, v = _bt(2), _bt(3)
    adv, ret = gae_advantages(r, v, MASK)
    adv_x, ret_x = gae_advantages(r, v, MASK, 1.0, 0.95)
    torch.testing.assert_close(adv, adv_x, rtol=0, atol=0)
    torch.testing.assert_close(ret, ret_x, rtol=0, atol=0)
    assert _differs(adv, gae_advantages(r, v, MASK, 1.0, 0.9)[0])
    assert _differs(adv, gae_advantages(r, v, MASK, 0.9, 0.95)[0])
    assert adv.dtype == F64 and ret.dtype == F64


def test_gae_values_of_another_dtype_follow_the_rewards():
    """``values`` are constants cast to the rewards' compute dtype: float32 values with float64 rewards give the
    float64 result of the same values, and gradients never reach ``values``."""
    r, v = _bt(2), _bt(3).float().requires_grad_(True)
    adv, ret = gae_advantages(r, v, MASK)
    adv64, ret64 = gae_advantages(r, v.detach().double(), MASK)
    assert adv.dtype == F64 and ret.dtype == F64
    torch.testing.assert_close(adv, adv64, rtol=0, atol=0)
    torch.testing.assert_close(ret, ret64, rtol=0, atol=0)
    assert not adv.requires_grad and not ret.requires_grad


def test_process_default_eps():
    sr = _bt(1, B, S) * 1e-6  # std ~ 1e-6: eps binds
    default = _process(step_rewards=sr)
    torch.testing.assert_close(default, _process(step_rewards=sr, eps=1e-6), rtol=0, atol=0)
    assert _differs(default, _process(step_rewards=sr, eps=1e-4))


def test_grpo_default_eps_binds():
    r = R4 * 1e-6
    default = grpo_advantages(r, 2)
    torch.testing.assert_close(default, grpo_advantages(r, 2, "group", 1e-6), rtol=0, atol=0)
    assert _differs(default, grpo_advantages(r, 2, "group", 1e-4))
    assert _differs(grpo_advantages(r, 2, "batch"), grpo_advantages(r, 2, "batch", 1e-4))


def test_combine_rewards_defaults_are_trl_defaults():
    """TRL 1.16.0: ``group_size`` 8 here, ``sum_then_normalize``, group scale, ``eps = 1e-4``, unit weights."""
    r = torch.randn(16, 2, generator=_gen(7), dtype=F64) * 1e-4  # std ~ 1e-4: eps binds
    default = combine_rewards(r)
    explicit = combine_rewards(r, torch.ones(2, dtype=F64), 8, "sum_then_normalize", "group", 1e-4)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert _differs(default, combine_rewards(r, None, 8, eps=1e-6))
    assert _differs(default, combine_rewards(r, None, 4))
    assert _differs(default, combine_rewards(r, None, 8, scale="batch"))
    assert _differs(default, combine_rewards(r, None, 8, "normalize_then_sum"))
    assert default.dtype == F64


def test_combine_rewards_dtypes_and_empty_batch():
    r = K2.float()
    assert combine_rewards(r, None, 2).dtype == torch.float32
    assert combine_rewards(r, torch.ones(2, dtype=F64), 2).dtype == F64  # promoted to the weights' dtype
    assert combine_rewards(K2, torch.ones(2), 2).dtype == F64
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        empty = combine_rewards(torch.zeros(0, 2, dtype=F64), None, 2, aggregation)
        assert empty.shape == (0,) and empty.dtype == F64


# ------------------------------------------------------------------------------------------- flat groups, exactly 0
# 0.1 three times: its float64 mean is 0.1 + 2**-56, so a flat group that were not recognised as flat would give
# a rounding residue (divided by std + eps ~ 1e-6) instead of the documented exact 0.
FLAT = [0.1, 0.1, 0.1]
AROUND = [-5.0, 0.0, 2.0] + FLAT + [1.0, 3.0, 9.0]  # the flat group holds neither the batch maximum nor minimum


def test_flat_group_inside_the_batch_range_is_exactly_zero():
    r = torch.tensor(AROUND, dtype=F64)
    for scale in ("group", "batch", "none"):
        assert (grpo_advantages(r, 3, scale=scale)[3:6] == 0).all(), scale
    assert (rloo_advantages(r, 3)[3:6] == 0).all()
    assert (combine_rewards(r[:, None], None, 3)[3:6] == 0).all()
    # REINFORCE++-baseline: the sequence scores are the token sums; the flat group's tokens get exactly
    # 0 - mean over the batch, the same value on each of its tokens
    tok = torch.zeros(9, 2, dtype=F64)
    tok[:, 1] = r
    out = reinforce_pp_advantages(tok, torch.ones(9, 2, dtype=F64), group_size=3)
    assert (out[3:6] == out[3, 0]).all()


def test_flat_group_with_unscorable_members_is_exactly_zero():
    """TRL's unscorable path (NaN = unscorable): a group whose scorable rewards are all equal gets exactly 0, also
    with unscorable members, also under ``normalize_then_sum`` and with ``eps = 0`` (no 0 / 0 left as NaN or 1)."""
    rows = [[-5.0], [0.0], [2.0], [NAN], [0.1], [0.1], [0.1], [NAN], [1.0], [3.0], [9.0], [NAN]]
    r = torch.tensor(rows, dtype=F64)
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        for eps in (1e-4, 0.0):
            out = combine_rewards(r, None, 4, aggregation, eps=eps)
            assert torch.isfinite(out).all() and (out[3::4] == 0).all(), (aggregation, eps)
            if aggregation == "sum_then_normalize":
                assert (out[4:8] == 0).all(), (aggregation, eps)
    for scale in ("group", "batch", "none"):
        out = combine_rewards(r, None, 4, scale=scale)
        assert (out[4:8] == 0).all() and (out[3::4] == 0).all(), scale
    # one reward function flat within every group (0 / (0 + 0) with eps = 0): it adds nothing to the sum
    two = torch.cat([r, torch.where(torch.isnan(r), r, torch.full_like(r, 0.5))], 1)  # same unscorable rows
    torch.testing.assert_close(combine_rewards(two, None, 4, "normalize_then_sum", eps=0.0),
                               combine_rewards(r, None, 4, "normalize_then_sum", eps=0.0), rtol=0, atol=0)


def test_combine_rewards_normalize_then_sum_accepts_scale_batch_as_its_default():
    r = torch.randn(8, 3, generator=_gen(8), dtype=F64)
    torch.testing.assert_close(combine_rewards(r, None, 4, "normalize_then_sum", "batch"),
                               combine_rewards(r, None, 4, "normalize_then_sum"), rtol=0, atol=0)


def test_combine_rewards_odd_group_size_and_no_reward_function():
    r = torch.randn(6, 2, generator=_gen(9), dtype=F64)
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        out = combine_rewards(r, None, 3, aggregation)
        assert out.shape == (6,) and torch.isfinite(out).all() and (out != 0).any()
        none = combine_rewards(torch.zeros(6, 0, dtype=F64), None, 3, aggregation)  # K = 0: nothing scores
        assert none.dtype == F64 and (none == 0).all()
    # the sum over functions: one function with weight 2 is the function's rewards doubled
    torch.testing.assert_close(combine_rewards(r[:, :1], torch.tensor([2.0], dtype=F64), 3),
                               combine_rewards(2 * r[:, :1], None, 3), rtol=1e-14, atol=1e-14)


def test_combine_rewards_float32_rewards_with_float64_weights_compute_in_float64():
    """The rewards are promoted to the weights' dtype before any statistic: float32 rewards (exact in float64)
    with float64 weights give exactly the result of the same rewards passed as float64."""
    r = torch.randn(8, 3, generator=_gen(10))
    w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        torch.testing.assert_close(combine_rewards(r, w, 4, aggregation), combine_rewards(r.double(), w, 4, aggregation),
                                   rtol=0, atol=0)


def test_gae_computes_in_the_rewards_dtype():
    """float32 rewards with float64 values: the values are cast to float32 (the rewards' compute dtype), so the
    result is that of float32 values, in float32."""
    r, v = _bt(2).float(), _bt(3)
    adv, ret = gae_advantages(r, v, MASK.float())
    adv32, ret32 = gae_advantages(r, v.float(), MASK.float())
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    torch.testing.assert_close(adv, adv32, rtol=0, atol=0)
    torch.testing.assert_close(ret, ret32, rtol=0, atol=0)


def _slow_standardise(xs, eps):
    """(x - mean) / (std + eps) over the non-None values (Bessel std); 0 for None and for fewer than two distinct."""
    vals = [x for x in xs if x is not None]
    if len(set(vals)) < 2:
        return [0.0] * len(xs)
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((x - mu) ** 2 for x in vals) / (len(vals) - 1))
    return [0.0 if x is None else (x - mu) / (sd + eps) for x in xs]


def test_combine_rewards_with_two_scorable_members_per_function_matches_a_slow_loop():
    """Groups where a function scored only two completions (Bessel: divide by n - 1 = 1), K = 2 functions."""
    rows = [[1.0, None], [None, 2.0], [3.0, 5.0], [None, None], [0.5, 1.0], [2.0, -1.0], [4.0, 0.0], [-1.0, 3.0]]
    r = torch.tensor([[NAN if x is None else x for x in row] for row in rows], dtype=F64)
    w, eps, g = [1.0, 0.5], 1e-4, 4
    z = [[0.0] * 2 for _ in rows]
    for k in range(2):
        for s in range(0, 8, g):
            for i, v in enumerate(_slow_standardise([rows[j][k] for j in range(s, s + g)], eps)):
                z[s + i][k] = v
    scorable = [any(x is not None for x in row) for row in rows]
    totals = [sum(wk * zk for wk, zk in zip(w, z[i])) if scorable[i] else None for i in range(8)]
    expected = _slow_standardise(totals, eps)
    out = combine_rewards(r, torch.tensor(w, dtype=F64), g, "normalize_then_sum", eps=eps)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    sums = [sum(wk * x for wk, x in zip(w, row) if x is not None) if scorable[i] else None for i, row in enumerate(rows)]
    expected = [v for s in range(0, 8, g) for v in _slow_standardise(sums[s:s + g], eps)]
    out = combine_rewards(r, torch.tensor(w, dtype=F64), g, eps=eps)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
