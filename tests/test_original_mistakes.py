"""The mistakes of the two original notebooks, each reproduced and refuted by a property
it breaks.

The original notebooks are the two notebook exports this project started from:

* the first, "GRPO KL / GRPO loss" (functions ``original_kl_*`` below): a token-level
  ``grpo_kl`` and a ``grpo_loss(pi_logprob, pi_old_logprob, pi_ref_logprob, advantage,
  input_len, len_oi)`` that reads an undefined global ``group_num``;
* the second, "GRPO + PPO demo" (functions ``original_demo_*``): a PPO/GRPO switch with
  batch-level advantages, a KL divided by the length twice, random "actions" and a loss
  that prints 0.0000 at every step.

Each test rebuilds the original's computation as a small local function written from the
notebook (the comment above it quotes what the notebook did), shows the property it
breaks, and shows the ``grpo_ref`` function that passes it. The book's pitfalls chapter
quotes these tests.
"""

from __future__ import annotations

# [helpers] book/pitfalls.md shows the code from here to [/helpers]: the imports and the
# rebuilt computations that its listings call.
import dataclasses
import itertools
import sys

import pytest
import torch

from grpo_ref import (
    PRESETS,
    aggregate,
    categorical_kl,
    grpo_advantages,
    kl_k3,
    policy_loss,
    response_mask,
    rloo_advantages,
)

DT = torch.float64


# ======================================================================================
# the original notebooks' computations, rebuilt
# ======================================================================================
def original_kl_grpo_kl(pi_logprob, pi_ref_logprob):
    # first original notebook, `grpo_kl`: "delta = pi_logprob - pi_ref_logprob; return
    # torch.exp(delta) - delta - 1",
    # i.e. f(r) = r - log r - 1 with r = pi / pi_ref (the ratio upside down).
    delta = pi_logprob - pi_ref_logprob
    return torch.exp(delta) - delta - 1


# first original notebook, `grpo_loss` (the runnable version, section 1.3): declares
# `global group_num`, builds the mask from a
# scalar `input_len` (every position from input_len on is "response", for every row),
# turns a scalar `len_oi`
# into one length for every row, and divides by the global group_num.
ORIGINAL_KL_LOSS_SRC = """
def grpo_loss(pi_logprob, pi_old_logprob, pi_ref_logprob, advantage, input_len, len_oi):
    global group_num
    epsilon, beta = 0.2, 0.01
    bs, seq_len = pi_logprob.shape
    len_oi = torch.tensor([len_oi] * bs, dtype=pi_logprob.dtype).clamp_min(1.0)
    mask = torch.zeros(bs, seq_len, dtype=pi_logprob.dtype)
    mask[:, input_len:] = 1.0
    ratio = torch.exp(pi_logprob - pi_old_logprob)
    ratio_clip = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    advantage = advantage.unsqueeze(dim=1)
    policy_gradient = torch.minimum(ratio * advantage, ratio_clip * advantage)
    kl = grpo_kl(pi_logprob, pi_ref_logprob)
    loss = (policy_gradient - beta * kl) * mask
    loss = (-1.0 / group_num) * (1.0 / len_oi.unsqueeze(dim=1)) * loss
    return loss.sum()
"""

# first original notebook, first version (section 1.2): the same loss without the
# `global` line, calling `torch.minium`.
ORIGINAL_KL_FIRST_SRC = """
def grpo_loss(pi_logprob, pi_old_logprob, pi_ref_logprob, advantage, input_len, len_oi):
    epsilon, beta = 0.2, 0.01
    bs, seq_len = pi_logprob.shape
    len_oi = torch.tensor([len_oi] * group_num, dtype=torch.float32)
    mask = torch.zeros(bs, seq_len)
    mask[:, input_len:] = 1
    ratio = torch.exp(pi_logprob - pi_old_logprob)
    ratio_clip = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    advantage = advantage.unsqueeze(dim=1)
    policy_gradient = torch.minium(ratio * advantage, ratio_clip * advantage)
    return policy_gradient.sum()
"""


def original_kl_loss_with_global(group_num_value, src=ORIGINAL_KL_LOSS_SRC):
    """exec the original's source in a module namespace whose global `group_num` is
    `group_num_value` (or absent).
    """
    ns = {"torch": torch, "grpo_kl": original_kl_grpo_kl}
    if group_num_value is not None:
        ns["group_num"] = group_num_value
    exec(src, ns)
    return ns["grpo_loss"], ns


def original_demo_grpo_kl(pi_logprob, pi_ref_logprob, mask):
    # second original notebook, `grpo_kl`: "log_ratio = (pi_logprob - pi_ref_logprob) *
    # mask; valid_token = mask.sum(dim=1);
    # kl_per_sample = log_ratio.sum(dim=1) / valid_token" -> a per-sequence MEAN of k1,
    # shape [bs, 1].
    log_ratio = (pi_logprob - pi_ref_logprob) * mask
    valid_token = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    return log_ratio.sum(dim=1, keepdim=True) / valid_token


def original_demo_grpo_loss(
    pi_logprob,
    pi_old_logprob,
    pi_ref_logprob,
    advantage,
    mask,
    len_oi,
    group_num,
    clip_range=0.2,
    beta_kl=0.01,
):
    # second original notebook, `grpo_loss`: "kl_token = (kl_per_sample / valid_token) *
    # mask" (divided by L a second time), then
    # "loss_token = (-1.0 / group_num) * (1.0 / len_oi) * objective_token" (and a third
    # time), summed.
    bs = pi_logprob.shape[0]
    ratio = torch.exp(pi_logprob - pi_old_logprob)
    ratio_clip = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    advantage = advantage.view(bs, 1)
    policy_gradient = torch.minimum(ratio * advantage, ratio_clip * advantage) * mask
    kl_per_sample = original_demo_grpo_kl(pi_logprob, pi_ref_logprob, mask)
    valid_token = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    kl_token = (kl_per_sample / valid_token) * mask
    objective_token = policy_gradient - beta_kl * kl_token
    len_oi = len_oi.view(bs, 1).to(pi_logprob.dtype).clamp_min(1.0)
    return ((-1.0 / group_num) * (1.0 / len_oi) * objective_token).sum()


def original_demo_advantage(rewards):
    # second original notebook, `compute_advantage_from_reward`: "adv = rewards -
    # rewards.mean()" over the WHOLE batch.
    return rewards - rewards.mean()


def grad_of(loss, x):
    """d loss / d x (x a leaf tensor with requires_grad)."""
    (g,) = torch.autograd.grad(loss, x)
    return g


def random_categorical(seed, V=6, scale=1.5):
    """Log-probabilities of a random distribution over V tokens, from a seeded draw."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(V, generator=g, dtype=DT), -1)


# [/helpers]
# ======================================================================================
# a. KL of the wrong direction (first original notebook)
# ======================================================================================
@pytest.mark.parametrize("seed", range(1, 6))
def test_a_original_kl_estimates_the_wrong_divergence(seed):
    """Mistake: the first original notebook's ``grpo_kl`` is ``exp(lp - ref) - (lp -
    ref) - 1``, i.e. ``r - log r - 1`` with ``r = pi/pi_ref``; DeepSeekMath eq. 4 has
    ``r = pi_ref/pi``.
    Property: on tokens sampled from the policy, GRPO's KL term must be an unbiased
    estimator of ``KL(pi || pi_ref)``. Exact enumeration over a vocabulary: the
    original's expectation under pi is ``chi^2(pi || ref) - KL(pi || ref)``, not the KL;
    it is unbiased for ``KL(ref || pi)`` only when tokens are sampled from the reference
    model, which GRPO never does.
    Fix: ``grpo_ref.kl_k3(lp, ref) = exp(ref - lp) - (ref - lp) - 1``, whose expectation
    under pi is ``KL(pi || ref)`` exactly.
    """
    lp, ref = random_categorical(2 * seed), random_categorical(2 * seed + 1)
    pi, pref = lp.exp(), ref.exp()
    kl_pi_ref = (pi * (lp - ref)).sum()  # KL(pi || ref), by definition
    kl_ref_pi = (pref * (ref - lp)).sum()  # KL(ref || pi)
    torch.testing.assert_close(
        categorical_kl(lp, ref), kl_pi_ref
    )  # the package's exact KL agrees

    orig_under_pi = (pi * original_kl_grpo_kl(lp, ref)).sum()
    assert abs(orig_under_pi - kl_pi_ref) > 0.05 * kl_pi_ref  # biased, by a lot
    torch.testing.assert_close(
        orig_under_pi, (pi**2 / pref).sum() - 1 - kl_pi_ref
    )  # = chi^2 - KL
    torch.testing.assert_close(
        (pref * original_kl_grpo_kl(lp, ref)).sum(), kl_ref_pi
    )  # ref-sampling only

    torch.testing.assert_close(
        (pi * kl_k3(lp, ref, max_log_ratio=None)).sum(), kl_pi_ref
    )  # the fix


def test_a_original_kl_by_hand():
    """The same on two tokens, by hand: pi = (0.5, 0.5), ref = (0.9, 0.1). KL(pi || ref)
    = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.51083; the original's expectation under pi
    is sum pi^2/ref - 1 - KL = 0.27778 + 2.5 - 1 - 0.51083 = 1.26695, 2.5x too large.
    """
    lp = torch.tensor([0.5, 0.5], dtype=DT).log()
    ref = torch.tensor([0.9, 0.1], dtype=DT).log()
    pi = lp.exp()
    assert float((pi * original_kl_grpo_kl(lp, ref)).sum()) == pytest.approx(
        1.26695, abs=1e-5
    )
    assert float((pi * kl_k3(lp, ref)).sum()) == pytest.approx(0.51083, abs=1e-5)


# ======================================================================================
# b. hidden global state (first original notebook)
# ======================================================================================
def _original_kl_inputs():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 5, 32, generator=g, dtype=DT), -1)[..., 0]
    old = torch.log_softmax(torch.randn(3, 5, 32, generator=g, dtype=DT), -1)[..., 0]
    ref = torch.log_softmax(torch.randn(3, 5, 32, generator=g, dtype=DT), -1)[..., 0]
    return lp, old, ref, torch.randn(3, generator=g, dtype=DT)


def test_b_original_kl_loss_depends_on_a_hidden_global():
    """Mistake: the first original notebook's ``grpo_loss`` divides by ``group_num``,
    which is not an argument but a module global (``global group_num``, set by the
    notebook's last cell); the first version read it without even declaring it and
    called ``torch.minium``, which does not exist.
    Property: a loss must be a function of its arguments. The original's is not: the
    same tensors give different losses when the notebook's global changes, and a
    NameError in a fresh module.
    Fix: grpo_ref passes the group size explicitly (``grpo_advantages(rewards,
    group_size)``) and reads no global state (see the next test).
    """
    args = (
        *_original_kl_inputs(),
        3,
        2,
    )  # input_len = 3, len_oi = 2, as in the original
    loss_g3, _ = original_kl_loss_with_global(3)
    loss_g6, _ = original_kl_loss_with_global(6)
    a, b = loss_g3(*args), loss_g6(*args)
    assert not torch.isclose(a, b)
    torch.testing.assert_close(
        a, 2 * b
    )  # the global silently rescales the loss (and the learning rate)

    fresh, _ = original_kl_loss_with_global(None)
    with pytest.raises(NameError, match="group_num"):
        fresh(*args)
    first, _ = original_kl_loss_with_global(None, ORIGINAL_KL_FIRST_SRC)
    with pytest.raises(NameError, match="group_num"):
        first(*args)
    first, _ = original_kl_loss_with_global(3, ORIGINAL_KL_FIRST_SRC)
    assert not hasattr(torch, "minium")
    with pytest.raises(AttributeError, match="minium"):
        first(*args)


def test_b_grpo_ref_is_pure(monkeypatch):
    """Property: grpo_ref's loss and advantages depend on their arguments only. Planting
    a ``group_num`` global in every grpo_ref module (and in builtins) changes nothing;
    the group size changes the advantages only when passed as an argument;
    ``AlgoConfig`` is frozen, so a config cannot be changed behind a loss's back.
    """
    lp, old, ref, _ = _original_kl_inputs()
    mask = torch.zeros(3, 5)
    mask[:, 3:] = 1.0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0], dtype=DT)

    def run():
        adv = grpo_advantages(rewards, 3)
        loss, _ = policy_loss(lp, old, adv[:3], mask, ref_logp=ref, kl_coef=0.01)
        return adv, loss

    adv0, loss0 = run()
    import builtins

    for name, mod in list(sys.modules.items()):
        if name == "grpo_ref" or name.startswith("grpo_ref."):
            monkeypatch.setattr(mod, "group_num", 6, raising=False)
    monkeypatch.setattr(builtins, "group_num", 6, raising=False)
    adv1, loss1 = run()
    assert torch.equal(adv0, adv1) and torch.equal(loss0, loss1)
    assert not torch.equal(
        grpo_advantages(rewards, 2), adv0
    )  # the argument, not a global, decides

    cfg = PRESETS["grpo"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.group_size = 3  # type: ignore[misc]
    assert cfg.replace(group_size=3).group_size == 3 and PRESETS["grpo"].group_size == 8


# ======================================================================================
# c. KL divided by the length twice (second original notebook)
# ======================================================================================
def test_c_original_demo_kl_weight_scales_as_one_over_length_squared():
    """Mistake: the second original notebook's ``grpo_kl`` already returns the
    per-sequence mean ``(1/L) sum_t k1``; ``grpo_loss`` then divides it by
    ``valid_token`` (L) again and multiplies by ``1/len_oi`` (L) a third time.
    Property: in GRPO's objective (DeepSeekMath eq. 3, seq-mean-token-mean) every token
    of sequence i carries weight ``1/(G L_i)``, for the KL term as for the surrogate. At
    ratio 1 with zero advantages (KL term alone) the original's per-token weight is
    ``beta/(G L^2)``: a token of a 2-token answer weighs 16x one of an 8-token answer,
    where GRPO's per-sequence mean gives 4x.
    Fix: ``policy_loss(..., kl_coef=beta, loss_agg_mode="seq-mean-token-mean")``: weight
    ``beta/(B L_i)``.
    """
    beta, T = 0.01, 8
    lengths = [2, 8]
    mask = torch.zeros(2, T, dtype=DT)
    for i, L in enumerate(lengths):
        mask[i, :L] = 1.0
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(2, T, generator=g, dtype=DT) - 0.1).requires_grad_(True)
    ref = lp.detach() + 0.3 * torch.randn(2, T, generator=g, dtype=DT)
    zero_adv = torch.zeros(2, dtype=DT)
    len_oi = mask.sum(-1)

    orig_loss = original_demo_grpo_loss(
        lp, lp.detach(), ref, zero_adv, mask, len_oi, group_num=2, beta_kl=beta
    )
    w_orig = grad_of(
        orig_loss, lp
    )  # d loss / d lp_t = beta * (weight of token t), k1' = 1
    ours, _ = policy_loss(
        lp,
        lp.detach(),
        zero_adv,
        mask,
        ref_logp=ref,
        kl_coef=beta,
        kl_estimator="k1",
        loss_agg_mode="seq-mean-token-mean",
    )
    w_ours = grad_of(ours, lp)
    for i, L in enumerate(lengths):
        torch.testing.assert_close(
            w_orig[i, :L], torch.full((L,), beta / (2 * L * L), dtype=DT)
        )
        torch.testing.assert_close(
            w_ours[i, :L], torch.full((L,), beta / (2 * L), dtype=DT)
        )
    assert float(w_orig[0, 0] / w_orig[1, 0]) == pytest.approx(16.0)
    assert float(w_ours[0, 0] / w_ours[1, 0]) == pytest.approx(4.0)


# ======================================================================================
# d. batch-level instead of group-level advantages (second original notebook)
# ======================================================================================
def test_d_original_demo_batch_advantage_mixes_prompts():
    """Mistake: the second original notebook computes ``adv = rewards - rewards.mean()``
    over the whole batch, which holds two prompts (``bs = group_num *
    num_prompts_per_batch``).
    Property: GRPO's baseline is the mean of the same prompt's group. With an easy
    prompt (rewards 0.6..1.0) and a hard one (0.0..0.3), the batch baseline gives every
    completion of the easy prompt a positive advantage, even the worst one of its group
    (0.6 < its group mean 0.775), and every completion of the hard prompt a negative
    one: the policy learns "which prompt was easy", not "which answer was better".
    Equivalently, group advantages are invariant to a per-prompt reward shift (a prompt
    being easier), batch advantages are not.
    Fix: ``grpo_advantages(rewards, group_size)`` (or ``rloo_advantages``), rows grouped
    by prompt.
    """
    G = 4
    rewards = torch.tensor([0.6, 0.8, 1.0, 0.7, 0.0, 0.1, 0.3, 0.2], dtype=DT)
    batch_adv = original_demo_advantage(rewards)
    assert (batch_adv[:G] > 0).all() and (batch_adv[G:] < 0).all()
    for scale in ("group", "none"):
        group_adv = grpo_advantages(rewards, G, scale)
        assert (
            group_adv[0] < 0 and group_adv[2] > 0
        )  # worst of the easy group pushed down, best pushed up
        assert group_adv[6] > 0  # best of the hard group pushed up
    shift = torch.tensor([5.0] * G + [-3.0] * G, dtype=DT)  # per-prompt offsets
    for fn in (
        lambda r: grpo_advantages(r, G, "group"),
        lambda r: grpo_advantages(r, G, "none"),
        lambda r: rloo_advantages(r, G),
    ):
        torch.testing.assert_close(fn(rewards + shift), fn(rewards))
    assert not torch.allclose(original_demo_advantage(rewards + shift), batch_adv)


# ======================================================================================
# e. "actions" never sampled from the policy (second original notebook)
# ======================================================================================
def _surrogate_grad(theta, action, advantage, old_logp=None, **kw):
    """d/d theta of -policy_loss for one single-token response `action` (so it's the
    ascent direction).
    """
    lp_all = torch.log_softmax(theta, -1)
    lp = lp_all[action].reshape(1, 1)
    old = lp.detach() if old_logp is None else torch.tensor([[old_logp]], dtype=DT)
    loss, _ = policy_loss(
        lp, old, torch.tensor([advantage], dtype=DT), torch.ones(1, 1), **kw
    )
    return -grad_of(loss, theta)


def test_e_original_demo_random_actions_give_a_biased_gradient():
    """Mistake: the second original notebook's ``make_fake_batch`` draws ``actions =
    torch.randint(0, vocab, ...)`` uniformly, never from the policy, and sets
    ``pi_old_logprob = policy.log_prob(actions)``, so the ratio is 1 as if the actions
    had been sampled from the policy.
    Property: the policy-gradient surrogate ``E_q[r A grad log pi]`` equals ``grad
    E_pi[R]`` only when the sampling distribution q is the policy (or when r = pi/q uses
    q's real log-prob). Exact enumeration over a 5-action bandit: with q = pi the
    expected surrogate gradient is the true gradient; with q uniform and ratio 1 it is
    not (it follows sum_a R(a) grad log pi(a) / V instead).
    Fix: sample from the policy (``old_logp`` = the sampler's log-prob); off-policy data
    needs the true behaviour log-prob as ``old_logp`` (importance weighting, last check
    below, clip made inactive).
    """
    V = 5
    theta = torch.tensor([0.3, -1.0, 1.2, 0.0, -0.4], dtype=DT, requires_grad=True)
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5], dtype=DT)
    b = 0.4  # any constant baseline leaves the estimator unbiased
    pi = torch.softmax(theta, -1)
    true_grad = grad_of((pi * R).sum(), theta)

    def expected(q, use_behaviour_logp=False, **kw):
        return sum(
            float(q[a])
            * _surrogate_grad(
                theta,
                a,
                float(R[a] - b),
                float(q[a].log()) if use_behaviour_logp else None,
                **kw,
            )
            for a in range(V)
        )

    on_policy = expected(pi.detach())
    torch.testing.assert_close(on_policy, true_grad)
    uniform = torch.full((V,), 1.0 / V, dtype=DT)
    original_style = expected(uniform)
    assert (original_style - true_grad).norm() > 0.1 * true_grad.norm()
    ratios = pi.detach() / uniform
    assert (
        1e-3 < ratios.min() and ratios.max() < 1e3
    )  # the wide clip below is never active
    weighted = expected(uniform, use_behaviour_logp=True, eps_low=0.999, eps_high=1e3)
    torch.testing.assert_close(weighted, true_grad)


# ======================================================================================
# f. "loss = 0.0000" at every step (second original notebook)
# ======================================================================================
def test_f_loss_prints_zero_but_gradient_is_not_zero():
    """Symptom: the second original notebook prints ``loss = -0.0000`` / ``0.0000`` at
    every step. Property (not a bug by itself): at ratio 1 (``old = lp.detach()``, one
    update per rollout), with the reference equal to the policy (KL 0) and zero-mean
    advantages, the loss value is ~0 under GRPO's per-sequence mean while its gradient,
    ``-A_i/(B L_i)`` per token, is not 0. The printed value tells nothing about
    learning; look at the gradient norm (or the reward).
    Both the original's loss and grpo_ref's show it.
    """
    B, T, G = 8, 6, 4
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(B, T, 7, generator=g, dtype=DT), -1)[
        ..., 0
    ].requires_grad_(True)
    mask = torch.zeros(B, T, dtype=DT)
    mask[:, 2:] = 1.0
    rewards = torch.randn(B, generator=g, dtype=DT)

    adv_orig = original_demo_advantage(rewards)
    orig_loss = original_demo_grpo_loss(
        lp, lp.detach(), lp.detach(), adv_orig, mask, mask.sum(-1), group_num=G
    )
    assert f"{orig_loss.item():.4f}" in ("0.0000", "-0.0000")
    assert grad_of(orig_loss, lp).abs().max() > 1e-3

    adv = grpo_advantages(rewards, G)
    loss, _ = policy_loss(
        lp, lp.detach(), adv, mask, ref_logp=lp.detach(), kl_coef=0.04
    )
    assert abs(loss.item()) < 1e-12
    grad = grad_of(loss, lp)
    torch.testing.assert_close(grad, -(adv / (B * mask.sum(-1)))[:, None] * mask)
    assert grad.abs().max() > 1e-3


def test_f_rewards_independent_of_actions_teach_nothing():
    """Mistake: the second original notebook's ``rewards = torch.randn(bs)`` do not
    depend on the actions.
    Property: if the reward is independent of the action, the expected policy gradient
    is exactly 0, whatever the actions: nothing can be learned, and a flat loss curve is
    the correct outcome. Exact enumeration over a 3-action policy, a group of 3
    completions and i.i.d. Bernoulli(1/2) rewards: for every tuple of actions the
    gradient averaged over the 2^3 reward vectors is 0 (group advantages are
    exchangeable and sum to 0). With a reward that does depend on the action, the
    expected gradient under the policy is not 0.
    Fix: a reward computed from the completion (a verifier), and actions sampled from
    the policy.
    """
    G, V = 3, 3
    theta = torch.tensor([0.5, -0.2, 0.1], dtype=DT, requires_grad=True)
    pi = torch.softmax(theta, -1).detach()

    def batch_grad(actions, rewards):
        lp_all = torch.log_softmax(theta, -1)
        lp = lp_all[list(actions)].reshape(G, 1)
        adv = grpo_advantages(torch.tensor(rewards, dtype=DT), G)
        loss, _ = policy_loss(lp, lp.detach(), adv, torch.ones(G, 1))
        return grad_of(loss, theta)

    reward_vectors = list(itertools.product([0.0, 1.0], repeat=G))
    for actions in itertools.product(range(V), repeat=G):
        mean_grad = sum(batch_grad(actions, r) for r in reward_vectors) / len(
            reward_vectors
        )
        torch.testing.assert_close(
            mean_grad, torch.zeros(V, dtype=DT), atol=1e-14, rtol=0
        )
    # control: reward 1 for action 2 only, actions sampled from pi -> expected gradient
    # is not 0
    expected = sum(
        float(pi[list(a)].prod()) * batch_grad(a, [float(x == 2) for x in a])
        for a in itertools.product(range(V), repeat=G)
    )
    assert expected.abs().max() > 1e-2
    assert (
        expected[2] < 0
    )  # descent on the loss raises theta_2: the rewarded action becomes more likely


# ======================================================================================
# g. mask and lengths from scalars (first original notebook)
# ======================================================================================
def test_g_original_kl_scalar_prompt_length_and_response_length():
    """Mistake: the first original notebook builds the mask as ``mask[:, input_len:] =
    1`` from one scalar prompt length and normalises by one scalar ``len_oi`` for every
    row. In a real batch prompts have different lengths and responses are right-padded
    to the longest one.
    Property: GRPO's ``(1/G) sum_i (1/|o_i|) sum_{t in o_i}`` puts weight ``1/(G L_i)``
    on the response tokens of row i and 0 on prompt and padding. At ratio 1 (KL 0) the
    gradient per token is ``-A_i`` times that weight. The original's weight is ``1/(G
    len_oi)`` on every position after input_len: padding and the tail of long prompts
    are trained, the start of short-prompt responses is not, and long and short answers
    are normalised by the same length.
    Fix: ``response_mask(T, prompt_lengths, total_lengths)`` and
    ``aggregate``/``policy_loss`` with ``loss_agg_mode="seq-mean-token-mean"``, which
    divide each row by its own length.
    (With equal prompt lengths and equal, unpadded responses the original's formula is
    right: checked last.)
    """
    G, T = 3, 9
    prompt = torch.tensor([3, 2, 4])
    resp = torch.tensor([2, 5, 3])
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(G, T, 11, generator=g, dtype=DT), -1)[
        ..., 0
    ].requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=DT)

    orig_loss_fn, _ = original_kl_loss_with_global(G)
    orig_loss = orig_loss_fn(
        lp, lp.detach(), lp.detach(), adv, 3, 2
    )  # input_len=3, len_oi=2 as in the original
    w_orig = grad_of(orig_loss, lp)

    mask = response_mask(T, prompt, prompt + resp)
    assert mask.sum(-1).tolist() == resp.tolist()
    loss, _ = policy_loss(
        lp, lp.detach(), adv, mask, loss_agg_mode="seq-mean-token-mean"
    )
    w_ours = grad_of(loss, lp)
    want = torch.zeros(G, T, dtype=DT)
    for i in range(G):
        want[i, prompt[i] : prompt[i] + resp[i]] = -adv[i] / (G * resp[i])
    torch.testing.assert_close(w_ours, want)
    assert not torch.allclose(w_orig, want)
    orig_mask = (w_orig != 0).to(DT)
    assert (
        (orig_mask == 1) & (mask == 0)
    ).any()  # padding / prompt tokens trained by the original
    assert (
        (orig_mask == 0) & (mask == 1)
    ).any()  # a response token (row 1 starts at 2) ignored by the original
    # the loss itself, with the same per-token terms: the original's normalisation vs
    # per-row lengths
    x = torch.randn(G, T, generator=g, dtype=DT)
    torch.testing.assert_close(
        aggregate(x, mask, "seq-mean-token-mean"),
        sum((x[i] * mask[i]).sum() / resp[i] for i in range(G)) / G,
    )

    # the special case the original was written for: prompt length 3, every response of
    # length 2, no padding
    lp2 = lp.detach()[:, :5].clone().requires_grad_(True)
    adv2 = torch.tensor([0.7, -0.2, 0.4], dtype=DT)
    s2 = orig_loss_fn(lp2, lp2.detach() - 0.05, lp2.detach(), adv2, 3, 2)
    o2, _ = policy_loss(
        lp2, lp2.detach() - 0.05, adv2, response_mask(5, torch.tensor([3, 3, 3]))
    )
    torch.testing.assert_close(s2, o2)
    torch.testing.assert_close(grad_of(s2, lp2), grad_of(o2, lp2))
