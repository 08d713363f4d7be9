"""response_mask and the masked reductions against slow Python loops over the selected entries."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_generator, prompt_response_mask, random_mask
from grpo_ref import masked_mean, masked_sum, masked_var, masked_whiten, response_mask

# ---------------------------------------------------------------- response_mask


def _slow_response_mask(seq_len, prompts, totals=None, tokens=None, eos=None):
    rows = []
    for i, p in enumerate(prompts):
        end = seq_len if totals is None else int(totals[i])
        stop = end  # exclusive
        if eos is not None:
            for t in range(int(p), end):
                if int(tokens[i][t]) == eos:
                    stop = t + 1  # the first EOS after the prompt is kept ...
                    break  # ... and everything after it dropped
        rows.append([1.0 if int(p) <= t < stop else 0.0 for t in range(seq_len)])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("seed", range(6))
def test_response_mask_matches_loop(seed, device):
    b, t, eos = 7, 12, 2
    g = make_generator(seed)
    prompts = torch.randint(0, t + 1, (b,), generator=g)
    prompts[0] = 0
    prompts[1] = t  # prompt fills the row: empty response
    totals = prompts + (torch.rand(b, generator=g) * (t - prompts + 1)).long().clamp(max=t - prompts)
    tokens = torch.randint(0, 4, (b, t), generator=g)  # small vocabulary: EOS is frequent, also inside prompts
    tokens[2, : max(int(prompts[2]), 1)] = eos  # an EOS-filled prompt must not end the response
    cases = [
        dict(),
        dict(total_lengths=totals),
        dict(tokens=tokens, eos_token_id=eos),
        dict(total_lengths=totals, tokens=tokens, eos_token_id=eos),
    ]
    for kw in cases:
        kw_dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        out = response_mask(t, prompts.to(device), **kw_dev)
        assert out.dtype == torch.float32 and out.shape == (b, t)
        assert out.device.type == device.type
        ref = _slow_response_mask(t, prompts.tolist(), kw.get("total_lengths"), kw.get("tokens"),
                                  kw.get("eos_token_id"))
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


def test_response_mask_eos_examples():
    eos = 9
    tokens = torch.tensor(
        [
            [5, 9, 5, 1, 9, 2, 9],  # prompt 2 with an EOS inside: response 5 1 9, then dropped
            [5, 5, 9, 9, 1, 1, 1],  # EOS right at the first response token: only that token
            [5, 5, 5, 1, 1, 1, 1],  # no EOS: all response tokens
            [5, 5, 5, 1, 1, 9, 0],  # EOS after total_length (5) is padding: ignored
        ]
    )
    prompts = torch.tensor([2, 3, 3, 3])
    totals = torch.tensor([7, 7, 7, 5])
    out = response_mask(7, prompts, totals, tokens, eos)
    expect = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 0, 0],
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_response_mask_accepts_lists():
    out = response_mask(4, [1, 0], [3, 4])
    torch.testing.assert_close(out, torch.tensor([[0.0, 1, 1, 0], [1, 1, 1, 1]]))


def test_response_mask_bad_input():
    with pytest.raises(ValueError, match="prompt_lengths must be 1-D"):
        response_mask(5, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_lengths must lie in"):
        response_mask(5, torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="prompt_lengths must lie in"):
        response_mask(5, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="total_lengths must have shape"):
        response_mask(5, torch.tensor([1, 2]), torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="total_lengths must satisfy"):
        response_mask(5, torch.tensor([3, 2]), torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="total_lengths must satisfy"):
        response_mask(5, torch.tensor([1, 2]), torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="eos_token_id needs tokens"):
        response_mask(5, torch.tensor([1, 2]), eos_token_id=0)
    with pytest.raises(ValueError, match="eos_token_id needs tokens"):
        response_mask(5, torch.tensor([1, 2]), tokens=torch.zeros(2, 4, dtype=torch.long), eos_token_id=0)


# ---------------------------------------------------------------- masked reductions


def _selected(values, mask):
    return [x for x, m in zip(values.double().flatten().tolist(), mask.flatten().tolist()) if m]


def _loop_var(xs, unbiased):
    n = len(xs)
    if n == 0 or (unbiased and n == 1):
        return 0.0
    mean = sum(xs) / n
    return sum((x - mean) ** 2 for x in xs) / (n - 1 if unbiased else n)


def _data(b, t, seed, dtype=torch.float64, prompts=False):
    g = make_generator(seed)
    values = (torch.randn(b, t, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if prompts:
        mask = prompt_response_mask(b, t, seed)[0]
    else:
        mask = random_mask(b, t, seed)
    return values, mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_sum_and_mean_match_loop(seed, dtype, device):
    values, mask = _data(6, 9, seed, dtype, prompts=seed % 2 == 1)
    v, m = values.to(device), mask.to(device)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    sel = _selected(values, mask)
    assert masked_sum(v, m).dtype == dtype
    assert abs(masked_sum(v, m).item() - sum(sel)) < tol * 10
    assert abs(masked_mean(v, m).item() - sum(sel) / len(sel)) < tol
    for dim in (0, 1, -1):
        s = masked_sum(v, m, dim).cpu().double()
        mu = masked_mean(v, m, dim).cpu().double()
        vals = values.transpose(0, 1) if dim == 0 else values
        msk = mask.transpose(0, 1) if dim == 0 else mask
        for i in range(vals.shape[0]):
            row = _selected(vals[i], msk[i])
            assert abs(s[i].item() - sum(row)) < tol * 10
            assert abs(mu[i].item() - (sum(row) / len(row) if row else 0.0)) < tol


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(seed, unbiased, device):
    values, mask = _data(6, 9, seed, prompts=seed % 2 == 0)
    out = masked_var(values.to(device), mask.to(device), unbiased=unbiased)
    assert out.shape == ()
    expect = _loop_var(_selected(values, mask), unbiased)
    assert abs(out.item() - expect) < 1e-12
    # and the two differ by the Bessel factor n / (n - 1)
    n = int(mask.sum())
    other = masked_var(values, mask, unbiased=not unbiased).item()
    ratio = n / (n - 1)
    assert math.isclose(out.item() / other, ratio if unbiased else 1 / ratio, rel_tol=1e-12)


def test_masked_var_small_counts():
    v = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    one = torch.tensor([[0.0, 1.0, 0.0]])
    assert masked_var(v, one, unbiased=True).item() == 0.0
    assert masked_var(v, one, unbiased=False).item() == 0.0
    two = torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_var(v, two, unbiased=True).item() == pytest.approx(2.0, abs=1e-14)
    assert masked_var(v, two, unbiased=False).item() == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(seed, unbiased, shift_mean, device):
    values, mask = _data(5, 8, seed, prompts=seed % 2 == 0)
    eps = 1e-8
    out = masked_whiten(values.to(device), mask.to(device), shift_mean=shift_mean, unbiased=unbiased, eps=eps).cpu()
    sel = _selected(values, mask)
    mean = sum(sel) / len(sel)
    var = _loop_var(sel, unbiased)
    for i in range(values.shape[0]):
        for t in range(values.shape[1]):
            if mask[i, t]:
                expect = (values[i, t].item() - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
            else:
                expect = 0.0
            assert abs(out[i, t].item() - expect) < 1e-10
    if shift_mean:
        w = _selected(out, mask)
        assert abs(sum(w) / len(w)) < 1e-12
        assert abs(_loop_var(w, unbiased) - var / (var + eps)) < 1e-12  # 1 up to eps / var
    assert (out[mask == 0] == 0).all()


def test_masked_whiten_float32_moments():
    values, mask = _data(8, 16, 5, dtype=torch.float32)
    out = masked_whiten(values * 100 + 1e3, mask, eps=0.0)
    assert out.dtype == torch.float32
    w = torch.tensor(_selected(out, mask), dtype=torch.float64)
    assert abs(w.mean().item()) < 1e-5
    assert abs(w.var(unbiased=True).item() - 1.0) < 1e-5


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32, torch.float64])
def test_mask_dtypes_agree(mask_dtype):
    values, mask = _data(4, 7, 6)
    m = mask.to(mask_dtype)
    torch.testing.assert_close(masked_sum(values, m), masked_sum(values, mask))
    torch.testing.assert_close(masked_mean(values, m, 1), masked_mean(values, mask, 1))
    torch.testing.assert_close(masked_var(values, m), masked_var(values, mask))
    torch.testing.assert_close(masked_whiten(values, m), masked_whiten(values, mask))


# ---------------------------------------------------------------- non-finite values outside the mask


def _poisoned(seed, fill):
    values, mask = _data(5, 8, seed, prompts=True)
    poisoned = values.clone()
    out_of_mask = mask == 0
    poisoned[out_of_mask] = fill
    clean = torch.where(out_of_mask, torch.zeros_like(values), values)
    return poisoned, clean, mask


FILLS = [float("inf"), float("-inf"), float("nan")]
OPS = {
    "sum": lambda v, m: masked_sum(v, m),
    "sum_dim1": lambda v, m: masked_sum(v, m, 1),
    "mean": lambda v, m: masked_mean(v, m),
    "mean_dim0": lambda v, m: masked_mean(v, m, 0),
    "var": lambda v, m: masked_var(v, m),
    "var_biased": lambda v, m: masked_var(v, m, unbiased=False),
    "whiten": lambda v, m: masked_whiten(v, m),
    "whiten_noshift": lambda v, m: masked_whiten(v, m, shift_mean=False),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_nonfinite_outside_mask_does_not_leak_into_value(op):
    for fill in FILLS:
        poisoned, clean, mask = _poisoned(7, fill)
        out = OPS[op](poisoned, mask)
        assert torch.isfinite(out).all(), (fill, out)
        torch.testing.assert_close(out, OPS[op](clean, mask), rtol=0, atol=0)


@pytest.mark.parametrize("op", sorted(OPS))
def test_nonfinite_outside_mask_does_not_leak_into_grad(op):
    for fill in FILLS:
        poisoned, clean, mask = _poisoned(8, fill)
        p = poisoned.clone().requires_grad_(True)
        c = clean.clone().requires_grad_(True)
        weights = torch.randn(OPS[op](clean, mask).shape, generator=make_generator(9), dtype=torch.float64)
        (OPS[op](p, mask) * weights).sum().backward()
        (OPS[op](c, mask) * weights).sum().backward()
        assert torch.isfinite(p.grad).all(), (fill, p.grad)
        torch.testing.assert_close(p.grad, c.grad, rtol=0, atol=1e-12)
        assert (p.grad[mask == 0] == 0).all()


# ---------------------------------------------------------------- empty masks, gradients, bad shapes


def test_all_zero_mask_gives_finite_zeros(device):
    values = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.zeros(3, 4, device=device)
    outs = [
        masked_sum(values, mask), masked_mean(values, mask), masked_mean(values, mask, 1),
        masked_var(values, mask), masked_var(values, mask, unbiased=False),
        masked_whiten(values, mask), masked_whiten(values, mask, shift_mean=False, unbiased=False),
    ]
    for o in outs:
        assert torch.isfinite(o).all() and (o == 0).all()
    sum(o.sum() for o in outs).backward()
    assert torch.isfinite(values.grad).all() and (values.grad == 0).all()


def test_masked_reductions_gradcheck():
    values, mask = _data(4, 6, 10, prompts=True)
    v = values.clone().requires_grad_(True)
    for op in OPS.values():
        assert torch.autograd.gradcheck(lambda x: op(x, mask), (v,))


def test_low_precision_values_reduce_in_float32():
    values, mask = _data(4, 6, 11, dtype=torch.float32)
    for low in (torch.bfloat16, torch.float16):
        vl = values.to(low)
        for name, op in OPS.items():
            out = op(vl, mask)
            assert out.dtype == torch.float32, name
            torch.testing.assert_close(out, op(vl.float(), mask), rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_mask_values():
    v = torch.randn(3, 4)
    for op in OPS.values():
        with pytest.raises(ValueError, match="shape mismatch"):
            op(v, torch.ones(3, 5))
        with pytest.raises(ValueError, match="shape mismatch"):
            op(v, torch.ones(4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_mean(v, torch.full((3, 4), 0.5))
