"""The refusal and default contract of ``grpo_ref.aggregation.aggregate`` (issue 13, mutation testing).

Pinned here: every validated argument (``loss_agg_mode``, ``loss_mat``, ``mask``, ``norm_length``, ``num_tokens``)
is named in its refusal as a whole, case-sensitive word; ``norm_length`` and ``num_tokens`` are accepted just above
their open bound 0 and refused at it; ``norm_length``'s default is ``T = mask.shape[-1]`` (not ``B``, and ``T`` even
when ``T = 1``) and a given ``norm_length`` is used as given; ``num_tokens`` replaces the batch's token count under
``token-mean`` only; every mode equals its formula of the module table as a slow loop, in float64, with an empty
response and non-finite padding; ``B = 0`` and ``T = 0`` give 0.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from grpo_ref._checks import NonFiniteInputError
from grpo_ref import aggregate
from grpo_ref.aggregation import LOSS_AGG_MODES
from refusals import names as _names, refused as _refused, refused_nonfinite as _refused_nonfinite





B, T = 3, 5  # B != T, so a reduction over the wrong axis shows
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)  # row 2 empty


def _loss(seed=0, dtype=torch.float64):
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _loop(l, m, mode, norm_length=None, num_tokens=None):
    """The module table, one formula per mode, over Python floats."""
    b, t = l.shape
    rows = [[float(l[i, j]) for j in range(t) if m[i, j] > 0] for i in range(b)]
    total = sum(sum(r) for r in rows)
    count = sum(len(r) for r in rows)
    if mode == "token-mean":
        return total / (max(count, 1) if num_tokens is None else num_tokens)
    if mode == "token-sum":
        return total
    if b == 0:
        return 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / max(len(r), 1) for r in rows) / b
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / b
    norm = float(max(t, 1)) if norm_length is None else norm_length
    return sum(sum(r) / norm for r in rows) / b


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_every_mode_matches_its_formula_in_float64(mode):
    l = _loss()
    dirty = l.clone()
    dirty[0, 3], dirty[0, 4], dirty[2, 1] = math.inf, math.nan, -math.inf  # padding may hold anything
    got = aggregate(dirty, MASK, mode)
    assert got.dtype == torch.float64 and got.shape == ()
    assert math.isclose(float(got), _loop(l, MASK, mode), rel_tol=1e-12, abs_tol=1e-15)
    assert aggregate(l.float(), MASK, mode).dtype == torch.float32
    assert aggregate(l.half(), MASK.bool(), mode).dtype == torch.float32


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_a_single_token_is_not_divided_by_more_than_its_count(mode):
    l = _loss(seed=1)
    m = torch.zeros(B, T)
    m[1, 2] = 1.0
    assert math.isclose(float(aggregate(l, m, mode)), _loop(l, m, mode), rel_tol=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("shape", [(0, T), (B, 0), (0, 0)])
def test_no_token_gives_zero(mode, shape):
    out = aggregate(torch.zeros(shape, dtype=torch.float64), torch.zeros(shape), mode)
    assert float(out) == 0.0 and out.dtype == torch.float64


def test_norm_length_default_is_t_not_b():
    l = _loss(seed=2)
    got = aggregate(l, MASK, "seq-mean-token-sum-norm")
    assert math.isclose(float(got), _loop(l, MASK, "seq-mean-token-sum-norm", norm_length=float(T)), rel_tol=1e-12)
    explicit = aggregate(l, MASK, "seq-mean-token-sum-norm", norm_length=float(T))
    assert float(got) == float(explicit)
    assert not math.isclose(float(got), float(aggregate(l, MASK, "seq-mean-token-sum-norm", norm_length=float(B))))


def test_norm_length_default_with_one_position_is_one():
    l = torch.tensor([[2.0], [4.0]], dtype=torch.float64)
    m = torch.ones(2, 1)
    assert float(aggregate(l, m, "seq-mean-token-sum-norm")) == 3.0  # T = 1: the token sums themselves


@pytest.mark.parametrize("norm_length", [0.5, 1e-3, 7.0, 123.25])
def test_norm_length_given_is_used_as_given(norm_length):
    l = _loss(seed=3)
    got = aggregate(l, MASK, "seq-mean-token-sum-norm", norm_length=norm_length)
    assert math.isclose(float(got), _loop(l, MASK, "seq-mean-token-sum-norm", norm_length), rel_tol=1e-12)


@pytest.mark.parametrize("mode", [m for m in LOSS_AGG_MODES if m != "seq-mean-token-sum-norm"])
def test_norm_length_does_not_touch_the_other_modes(mode):
    l = _loss(seed=4)
    assert float(aggregate(l, MASK, mode, norm_length=0.25)) == float(aggregate(l, MASK, mode))


def test_norm_length_open_bound_at_zero():
    l = _loss()
    aggregate(l, MASK, "seq-mean-token-sum-norm", norm_length=1e-300)  # just above the bound
    for bad in (0.0, -1.0, math.inf, math.nan, True, "5"):
        _refused(lambda: aggregate(l, MASK, "seq-mean-token-sum-norm", norm_length=bad), "norm_length")
    _refused(lambda: aggregate(l, MASK, "token-mean", norm_length=0.0), "norm_length")  # checked in every mode


@pytest.mark.parametrize("num_tokens", [0.5, 3, 1e6, torch.tensor(11.0)])
def test_num_tokens_replaces_the_token_count_under_token_mean(num_tokens):
    l = _loss(seed=5)
    got = aggregate(l, MASK, "token-mean", num_tokens=num_tokens)
    assert math.isclose(float(got), _loop(l, MASK, "token-mean", num_tokens=float(num_tokens)), rel_tol=1e-12)
    assert float(aggregate(l, MASK, "token-mean", num_tokens=None)) == float(aggregate(l, MASK, "token-mean"))


def test_num_tokens_open_bound_at_zero():
    l = _loss()
    aggregate(l, MASK, "token-mean", num_tokens=1e-300)
    for bad in (0.0, -2.0, math.inf, math.nan, True, "8"):
        _refused(lambda: aggregate(l, MASK, "token-mean", num_tokens=bad), "num_tokens")


@pytest.mark.parametrize("mode", [m for m in LOSS_AGG_MODES if m != "token-mean"])
def test_num_tokens_refused_under_the_other_modes(mode):
    l = _loss()
    msg = _refused(lambda: aggregate(l, MASK, mode, num_tokens=8.0), "num_tokens", "loss_agg_mode")
    assert mode in msg
    aggregate(l, MASK, mode)  # ... and without it the mode runs


def test_loss_agg_mode_refused_by_name():
    l = _loss()
    for bad in ("token_mean", "TOKEN-MEAN", "", None, 1):
        _refused(lambda: aggregate(l, MASK, bad), "loss_agg_mode")


def test_tensor_arguments_refused_by_name():
    l = _loss()
    _refused(lambda: aggregate(l[0], MASK[0], "token-mean"), "loss_mat")
    _refused(lambda: aggregate(l[None], MASK[None], "token-mean"), "loss_mat")
    _refused(lambda: aggregate(l.tolist(), MASK, "token-mean"), "loss_mat")
    _refused(lambda: aggregate(torch.complex(l, l), MASK, "token-mean"), "loss_mat")
    _refused(lambda: aggregate(l, MASK[:, :4], "token-mean"), "mask", "loss_mat")
    _refused(lambda: aggregate(l, MASK[:2], "token-mean"), "mask", "loss_mat")
    _refused(lambda: aggregate(l, MASK.tolist(), "token-mean"), "mask")
    half = MASK.clone()
    half[1, 1] = 0.5
    _refused(lambda: aggregate(l, half, "token-mean"), "mask")
    bad = l.clone()
    bad[1, 4] = math.nan  # masked in
    _refused_nonfinite(lambda: aggregate(bad, MASK, "token-mean"), "loss_mat")
