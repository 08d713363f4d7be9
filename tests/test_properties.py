"""Property-based tests (hypothesis) of the loss: invariances that any correct implementation must have.

* right padding (extra masked-out columns holding garbage, even inf/NaN) changes neither loss nor gradients;
* permuting sequences (or whole groups) leaves the loss unchanged and permutes the gradients / advantages;
* token-mean == seq-mean-token-mean when all responses have the same length;
* length weighting at ratio 1: under seq-mean-token-mean a token of sequence i has weight 1/(B L_i), under
  token-mean 1/N and under Dr. GRPO's seq-mean-token-sum-norm 1/(B C) for every token;
* the "loss is 0" fact: at ratio 1 with zero-mean group advantages the loss value is only beta * KL, while the
  gradient is not 0.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_ref import (
    PRESETS,
    compute_advantages,
    compute_loss,
    get_preset,
    grpo_advantages,
    LossInputs,
    policy_loss,
    value_loss,
)

DT = torch.float64
SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# seq-mean-token-sum-norm always with an explicit constant here: with the default norm_length = T the loss
# depends on the padded width by design (see test_default_norm_length_depends_on_padding).
MODES = [("token-mean", None), ("seq-mean-token-mean", None), ("seq-mean-token-sum", None),
         ("seq-mean-token-sum-norm", 9.0)]
MODE_IDS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum-norm-9"]
GARBAGE = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, -7.0]


@st.composite
def batches(draw, min_len=0, equal_lengths=False, max_b=5, max_t=6):
    """A random [B, T] batch: response i occupies columns start_i .. start_i + L_i - 1 (prompt on the left)."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(max(1, min_len), max_t))
    if equal_lengths:
        lengths = [draw(st.integers(max(1, min_len), T))] * B
    else:
        lengths = draw(st.lists(st.integers(min_len, T), min_size=B, max_size=B))
    starts = [draw(st.integers(0, T - L)) for L in lengths]
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for i, (s, L) in enumerate(zip(starts, lengths)):
        mask[i, s:s + L] = 1.0
    old = -(torch.rand(B, T, generator=g, dtype=DT) * 3 + 0.05)
    return dict(
        mask=mask,
        old=old,
        lp=old + 0.6 * torch.randn(B, T, generator=g, dtype=DT),
        ref=old + 0.5 * torch.randn(B, T, generator=g, dtype=DT),
        adv_seq=torch.randn(B, generator=g, dtype=DT),
        adv_tok=torch.randn(B, T, generator=g, dtype=DT),
    )


def loss_and_grad(lp, *args, **kw):
    lp = lp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, *args, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, metrics


def pad_right(x, n, value):
    return torch.cat([x, torch.full((x.shape[0], n), value, dtype=x.dtype)], dim=1)


def close(a, b, **kw):
    kw.setdefault("rtol", 1e-10)
    kw.setdefault("atol", 1e-12)
    torch.testing.assert_close(a, b, **kw)


# --------------------------------------------------------------------------------------------------------
# right padding
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@SETTINGS
@given(b=batches(), n_pad=st.integers(1, 3), g_lp=st.sampled_from(GARBAGE), g_other=st.sampled_from(GARBAGE),
       kl=st.sampled_from([None, "k1", "k2", "k3"]), adv_kind=st.sampled_from(["adv_seq", "adv_tok"]),
       dual_clip=st.sampled_from([None, 2.0]))
def test_right_padding_changes_nothing(mode, norm_length, ratio_level, b, n_pad, g_lp, g_other, kl, adv_kind, dual_clip):
    """Appending masked-out columns whose logp / old / ref / advantages hold garbage (inf, NaN, 1e30) changes
    neither the loss nor the gradient of the real tokens, and the padding gets a zero (finite) gradient."""
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, ratio_level=ratio_level, loss_agg_mode=mode,
              norm_length=norm_length, kl_coef=0.0 if kl is None else 0.3, kl_estimator=kl or "k3")
    adv = b[adv_kind]
    loss, grad, met = loss_and_grad(b["lp"], b["old"], adv, b["mask"], ref_logp=b["ref"] if kl else None, **kw)
    adv_p = adv if adv.dim() == 1 else pad_right(adv, n_pad, g_other)
    loss_p, grad_p, met_p = loss_and_grad(
        pad_right(b["lp"], n_pad, g_lp), pad_right(b["old"], n_pad, g_other), adv_p, pad_right(b["mask"], n_pad, 0.0),
        ref_logp=pad_right(b["ref"], n_pad, -g_other) if kl else None, **kw)
    T = b["mask"].shape[1]
    close(loss_p, loss)
    close(grad_p[:, :T], grad)
    assert (grad_p[:, T:] == 0).all()
    for k in met:  # metrics too (clip fractions, approx_kl, ratio stats, kl_ref)
        close(met_p[k], met[k], msg=k)


def test_default_norm_length_depends_on_padding():
    """Documented design, not a bug: seq-mean-token-sum-norm with the default norm_length = T divides by the
    padded width, so padding the same batch from T to T + P scales the loss by T / (T + P). Pass a constant
    norm_length (Dr. GRPO's max generation length) to make it padding-invariant."""
    g = torch.Generator().manual_seed(0)
    lp, old = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT)
    adv, mask = torch.randn(3, generator=g, dtype=DT), torch.ones(3, 4)
    kw = dict(loss_agg_mode="seq-mean-token-sum-norm")
    loss, _ = policy_loss(lp, old, adv, mask, **kw)
    loss_p, _ = policy_loss(pad_right(lp, 2, 0.0), pad_right(old, 2, 0.0), adv, pad_right(mask, 2, 0.0), **kw)
    close(loss_p, loss * 4 / 6)
    loss_c, _ = policy_loss(lp, old, adv, mask, norm_length=10, **kw)
    loss_pc, _ = policy_loss(pad_right(lp, 2, 0.0), pad_right(old, 2, 0.0), adv, pad_right(mask, 2, 0.0),
                             norm_length=10, **kw)
    close(loss_pc, loss_c)


@pytest.mark.parametrize("name", ["ppo", "grpo", "gspo", "dr_grpo"])
@SETTINGS
@given(b=batches(), n_pad=st.integers(1, 3), garbage=st.sampled_from([1e6, -1e6, 0.0, -7.0]))
def test_right_padding_changes_nothing_in_presets(name, b, n_pad, garbage):
    """Through compute_loss (policy + value loss for ppo), with finite garbage in every padded field."""
    cfg = PRESETS[name] if name != "dr_grpo" else get_preset("dr_grpo", norm_length=9)
    g = torch.Generator().manual_seed(1)
    B, T = b["mask"].shape
    values, old_values, returns = (torch.randn(B, T, generator=g, dtype=DT) for _ in range(3))

    def run(pad):
        p = (lambda x: pad_right(x, n_pad, garbage)) if pad else (lambda x: x)
        lp, v = p(b["lp"]).requires_grad_(True), p(values).requires_grad_(True)
        inp = LossInputs(lp, p(b["old"]), b["adv_seq"], pad_right(b["mask"], n_pad, 0.0) if pad else b["mask"],
                         ref_logp=p(b["ref"]), values=v, old_values=p(old_values), returns=p(returns))
        loss, _ = compute_loss(inp, cfg)
        glp, gv = torch.autograd.grad(loss, (lp, v), allow_unused=True)
        return loss.detach(), glp[:, :T], (gv[:, :T] if gv is not None else None)

    (l0, g0, v0), (l1, g1, v1) = run(False), run(True)
    close(l1, l0)
    close(g1, g0)
    if cfg.loss_fn == "ppo":
        close(v1, v0)


def _value_loss_padded(ret_garbage, val_garbage):
    g = torch.Generator().manual_seed(2)
    v, ov, R = (torch.randn(3, 4, generator=g, dtype=DT) for _ in range(3))
    mask = torch.tensor([[1.0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]])
    vp = pad_right(v, 2, val_garbage).requires_grad_(True)
    loss_p, _ = value_loss(vp, pad_right(ov, 2, 0.0), pad_right(R, 2, ret_garbage), pad_right(mask, 2, 0.0))
    (gp,) = torch.autograd.grad(loss_p, vp)
    v = v.requires_grad_(True)
    loss, _ = value_loss(v, ov, R, mask)
    (g0,) = torch.autograd.grad(loss, v)
    return loss, g0, loss_p, gp


def test_value_loss_right_padding_finite_garbage():
    loss, g0, loss_p, gp = _value_loss_padded(1e6, -1e6)
    close(loss_p, loss)
    close(gp[:, :4], g0)
    assert (gp[:, 4:] == 0).all()


@pytest.mark.parametrize("ret_garbage,val_garbage", [(math.nan, 0.0), (math.inf, 0.0), (0.0, math.inf)])
def test_value_loss_right_padding_nonfinite_garbage(ret_garbage, val_garbage):
    """Same contract as policy_loss / aggregate / masked_sum ('an inf or NaN in a padded position cannot leak'):
    padding returns or values that are inf/NaN must neither raise nor produce NaN gradients."""
    loss, g0, loss_p, gp = _value_loss_padded(ret_garbage, val_garbage)
    close(loss_p, loss)
    close(gp[:, :4], g0)
    assert (gp[:, 4:] == 0).all()


# --------------------------------------------------------------------------------------------------------
# permutations
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@SETTINGS
@given(b=batches(), data=st.data(), kl=st.sampled_from([None, "k3"]), adv_kind=st.sampled_from(["adv_seq", "adv_tok"]))
def test_permuting_sequences_permutes_gradients(mode, norm_length, ratio_level, b, data, kl, adv_kind):
    """The loss is a symmetric function of the sequences: a row permutation leaves it unchanged and permutes
    the gradient rows the same way."""
    B = b["mask"].shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(B))), dtype=torch.long)
    kw = dict(dual_clip=3.0, ratio_level=ratio_level, loss_agg_mode=mode, norm_length=norm_length,
              kl_coef=0.0 if kl is None else 0.2)
    loss, grad, _ = loss_and_grad(b["lp"], b["old"], b[adv_kind], b["mask"], ref_logp=b["ref"], **kw)
    loss_p, grad_p, _ = loss_and_grad(b["lp"][perm], b["old"][perm], b[adv_kind][perm], b["mask"][perm],
                                      ref_logp=b["ref"][perm], **kw)
    close(loss_p, loss)
    close(grad_p, grad[perm])


ADV_NAMES = ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo", "grpo+kl_in_reward", "rpp_baseline"]


def _adv_cfg(name, G):
    if name == "grpo+kl_in_reward":
        return get_preset("grpo", kl_placement="reward", kl_estimator="k1", kl_coef=0.1, group_size=G)
    if name == "rpp_baseline":
        return get_preset("reinforce_pp", adv_estimator="reinforce_pp_baseline", group_size=G)
    if name == "ppo":
        return PRESETS["ppo"]
    return get_preset(name, group_size=G)


@pytest.mark.parametrize("name", ADV_NAMES)
@SETTINGS
@given(n_groups=st.integers(1, 3), G=st.integers(2, 4), data=st.data(), seed=st.integers(0, 2 ** 31 - 1))
def test_permuting_groups_permutes_advantages(name, n_groups, G, data, seed):
    """Reordering whole groups, and the completions inside a group, permutes the advantages (and PPO returns)
    the same way: no estimator depends on where a group sits in the batch."""
    cfg = _adv_cfg(name, G)
    if cfg.group_size == 1:
        G = 1
    B, T = n_groups * G, 5
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (B,), generator=g).to(DT)
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    mask[:, 0] = 1.0
    old, ref, values = (torch.randn(B, T, generator=g, dtype=DT) for _ in range(3))
    group_order = data.draw(st.permutations(range(n_groups)))
    perm = torch.tensor([k * G + j for k in group_order for j in data.draw(st.permutations(range(G)))])
    kw = dict(old_logp=old, ref_logp=ref, values=values)
    adv, ret = compute_advantages(cfg, scores, mask, **kw)
    adv_p, ret_p = compute_advantages(cfg, scores[perm], mask[perm], **{k: v[perm] for k, v in kw.items()})
    close(adv_p, adv[perm], rtol=1e-9, atol=1e-9)
    if ret is not None:
        close(ret_p, ret[perm])


# --------------------------------------------------------------------------------------------------------
# aggregation and length weighting
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@SETTINGS
@given(b=batches(equal_lengths=True), kl=st.sampled_from([None, "k2", "k3"]), adv_kind=st.sampled_from(["adv_seq", "adv_tok"]))
def test_token_mean_equals_seq_mean_token_mean_for_equal_lengths(ratio_level, b, kl, adv_kind):
    kw = dict(ratio_level=ratio_level, ref_logp=b["ref"], kl_coef=0.0 if kl is None else 0.2, kl_estimator=kl or "k3")
    l1, g1, _ = loss_and_grad(b["lp"], b["old"], b[adv_kind], b["mask"], loss_agg_mode="token-mean", **kw)
    l2, g2, _ = loss_and_grad(b["lp"], b["old"], b[adv_kind], b["mask"], loss_agg_mode="seq-mean-token-mean", **kw)
    close(l1, l2)
    close(g1, g2)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@SETTINGS
@given(b=batches(min_len=1, max_b=6), A=st.floats(0.1, 3.0) | st.floats(-3.0, -0.1), C=st.floats(1.0, 50.0))
def test_length_weighting_at_ratio_one(ratio_level, b, A, C):
    """d loss / d logp_{i,t} at ratio 1 with the same advantage A for every sequence (no KL):
    seq-mean-token-mean: -A / (B L_i)   (a token of a long response weighs less: the length bias of GRPO);
    token-mean:          -A / N          (every token the same, DAPO);
    seq-mean-token-sum-norm with C: -A / (B C) (every token the same, Dr. GRPO)."""
    mask = b["mask"].to(DT)
    B = mask.shape[0]
    L = mask.sum(-1)
    lp = b["old"]
    adv = torch.full((B,), A, dtype=DT)
    on = mask > 0
    _, g_seq, _ = loss_and_grad(lp, lp, adv, mask, ratio_level=ratio_level, loss_agg_mode="seq-mean-token-mean")
    _, g_tok, _ = loss_and_grad(lp, lp, adv, mask, ratio_level=ratio_level, loss_agg_mode="token-mean")
    _, g_dr, _ = loss_and_grad(lp, lp, adv, mask, ratio_level=ratio_level, loss_agg_mode="seq-mean-token-sum-norm",
                               norm_length=C)
    close(g_seq, (-A / (B * L))[:, None].expand_as(mask) * mask)
    close(g_tok, torch.full_like(lp, -A / float(L.sum())) * mask)
    close(g_dr, torch.full_like(lp, -A / (B * C)) * mask)
    for i in range(B):
        for j in range(B):
            if L[i] > L[j]:  # longer response: each of its tokens is pushed less
                assert g_seq[i, on[i]].abs().max() < g_seq[j, on[j]].abs().min()


@pytest.mark.parametrize("mode,norm_length", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@SETTINGS
@given(data=st.data(), n_groups=st.integers(1, 3), G=st.integers(2, 4), beta=st.sampled_from([0.0, 0.04, 0.5]))
def test_loss_is_only_kl_at_ratio_one_but_gradient_is_not_zero(mode, norm_length, ratio_level, data, n_groups, G, beta):
    """The frequent 'my loss is 0' question: with logp == old_logp (ratio 1, the first step of a rollout) and
    group-centred advantages (they sum to 0 in every group), the surrogate's value is 0 and the loss prints
    beta * KL only, yet its gradient is -A_i/(B L_i) per token, not 0. Under seq-mean-token-mean this holds for
    any lengths; under the other modes only when all lengths are equal (token sums weight A_i by L_i)."""
    equal = mode != "seq-mean-token-mean"
    B = n_groups * G
    T = data.draw(st.integers(1, 6))
    lengths = [data.draw(st.integers(1, T))] * B if equal else data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    rewards = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=B, max_size=B)), dtype=DT)
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for i, L in enumerate(lengths):
        mask[i, T - L:] = 1.0
    lp = -(torch.rand(B, T, generator=g, dtype=DT) * 3 + 0.05)
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=DT)
    adv = grpo_advantages(rewards, G)
    loss, grad, _ = loss_and_grad(lp, lp, adv, mask, ratio_level=ratio_level, loss_agg_mode=mode,
                                  norm_length=norm_length, ref_logp=ref, kl_coef=beta)
    # beta * (the same aggregation of k3 = exp(ref - lp) - (ref - lp) - 1), by hand
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    rows = [float((k3[i] * mask[i]).sum()) for i in range(B)]
    Ls = [float(x) for x in mask.sum(-1)]
    if mode == "token-mean":
        kl = sum(rows) / sum(Ls)
    elif mode == "seq-mean-token-mean":
        kl = sum(r / L for r, L in zip(rows, Ls)) / B
    elif mode == "seq-mean-token-sum":
        kl = sum(rows) / B
    else:
        kl = sum(rows) / (B * norm_length)
    assert float(loss) == pytest.approx(beta * kl, rel=1e-9, abs=1e-12)
    if adv.abs().max() > 0:  # some group has unequal rewards: there is something to learn
        assert grad.abs().max() > 1e-3
