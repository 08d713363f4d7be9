"""Reference-model updates (TR-DPO, arXiv 2404.09656; TRL 1.16.0 ``sync_ref_model`` / ``ref_model_sync_steps`` /
``ref_model_mixup_alpha``): every ``ref_sync_every``-th optimizer step ``ref <- alpha * policy + (1 - alpha) * ref``.

The expected reference is computed by hand from copies of the policy taken after every optimizer step; alpha = 1
copies the policy; ``ref_sync_every = 0`` never touches it; a run resumed from a checkpoint has the same reference
(and counts optimizer steps on from where it stopped); a step that fails after a sync puts the reference back;
checkpoints written before the new fields existed still load. Also: the global token normaliser of
``AlgoConfig.global_token_norm`` (``grpo_ref.trainer.global_token_normaliser``).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from grpo_ref.algorithms import LossInputs, compute_loss, get_preset
from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import TIME_METRICS, Trainer, TrainConfig, _adam_steps, global_token_normaliser


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _task():
    return AdditionTask(n_digits=2, eval_size=32)


def _policy(task, seed=0, n_embd=32):
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens, n_layer=1,
                    n_head=2, n_embd=n_embd)
    return tiny_gpt(cfg, seed)


def _trainer(**kw):
    # lr large enough that the policy moves visibly; 2 epochs x 2 minibatches = 4 optimizer steps per trainer step
    base = dict(group_size=4, prompts_per_step=4, steps=4, lr=1e-2, minibatches=2, ppo_epochs=2, eval_every=0,
                warmup_steps=0)
    base.update(kw)
    task = _task()
    return Trainer(_policy(task), task, TrainConfig(**base))


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _record_optimizer_steps(t: Trainer):
    """Copies of the policy's and the reference's parameters after every optimizer step (and sync)."""
    policy_after, ref_after = [], []
    original = t._after_optimizer_step

    def hooked():
        policy_after.append(_params(t.policy))
        original()
        ref_after.append(_params(t.reference))

    t._after_optimizer_step = hooked
    return policy_after, ref_after


@pytest.mark.parametrize("every,alpha", [(3, 0.6), (4, 0.25), (1, 0.5)])
def test_the_reference_follows_the_formula_at_every_nth_optimizer_step(every, alpha):
    t = _trainer(ref_sync_every=every, ref_sync_alpha=alpha)
    ref = _params(t.reference)
    policy_after, ref_after = _record_optimizer_steps(t)
    for _ in range(2):
        t.step()
    assert t.optimizer_steps == len(policy_after) == 8
    for i, (pol, got) in enumerate(zip(policy_after, ref_after), start=1):
        if i % every == 0:
            ref = {k: alpha * pol[k] + (1 - alpha) * ref[k] for k in ref}
        for k in ref:  # unchanged between syncs, bit for bit; the formula (to rounding) at a sync
            if i % every == 0:
                assert torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-7), (i, k)
            else:
                assert torch.equal(got[k], ref_after[i - 2][k] if i > 1 else got[k]), (i, k)
            ref[k] = got[k]
    # the policy really moved, so the test can tell a sync from a no-op
    assert any(not torch.equal(policy_after[-1][k], policy_after[0][k]) for k in ref)


def test_alpha_one_copies_the_policy_and_the_next_step_uses_that_reference():
    t = _trainer(ref_sync_every=4, ref_sync_alpha=1.0)  # 4 optimizer steps per step: a sync at the end of each
    start = _params(t.reference)
    t.step()
    for k, v in t.reference.named_parameters():
        assert torch.equal(v, dict(t.policy.named_parameters())[k])
    assert any(not torch.equal(v, start[k]) for k, v in t.reference.named_parameters())
    assert t.step()["kl_to_ref"] == 0.0  # pi_old is the policy after step 1, which is now the reference


def test_ref_sync_every_zero_never_changes_the_reference():
    t = _trainer()
    start = _params(t.reference)
    for _ in range(2):
        t.step()
    assert t.optimizer_steps == 8
    for k, v in t.reference.named_parameters():
        assert torch.equal(v, start[k])
    assert any(not torch.equal(v, start[k]) for k, v in t.policy.named_parameters())


def test_a_resumed_run_has_the_same_reference_as_the_uninterrupted_one(tmp_path):
    kw = dict(ref_sync_every=3, ref_sync_alpha=0.6)  # 3 does not divide 4: syncs fall inside steps
    straight = _trainer(**kw)
    for _ in range(3):
        straight.step()
    first = _trainer(**kw)
    first.step()
    first.save(str(tmp_path / "ckpt.pt"))
    resumed = _trainer(**kw)
    resumed.load(str(tmp_path / "ckpt.pt"))
    assert resumed.optimizer_steps == 4
    for k, v in first.reference.named_parameters():
        assert torch.equal(v, dict(resumed.reference.named_parameters())[k])
    for _ in range(2):
        resumed.step()
    assert resumed.optimizer_steps == straight.optimizer_steps == 12
    for label in ("reference", "policy"):
        a, b = getattr(straight, label).state_dict(), getattr(resumed, label).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (label, k)
    strip = lambda h: [{k: v for k, v in m.items() if k not in TIME_METRICS} for m in h]  # noqa: E731
    assert strip(straight.history) == strip(resumed.history)


def test_a_step_that_fails_after_a_sync_puts_the_reference_back():
    t = _trainer(ref_sync_every=1, ref_sync_alpha=0.5)
    t.step()
    ref, pol, n = _params(t.reference), _params(t.policy), t.optimizer_steps
    original, calls = t._after_optimizer_step, []

    def failing():
        original()  # the sync happens, then the step fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected after the second sync")

    t._after_optimizer_step = failing
    with pytest.raises(RuntimeError, match="injected"):
        t.step()
    assert t.optimizer_steps == n and t.step_count == 1
    for k, v in t.reference.named_parameters():
        assert torch.equal(v, ref[k]), k
    for k, v in t.policy.named_parameters():
        assert torch.equal(v, pol[k]), k


def test_a_checkpoint_older_than_the_new_fields_loads(tmp_path):
    t = _trainer()
    t.step()
    state = t.state_dict()
    del state["optimizer_steps"]
    for name in ("top_k", "top_p", "min_p", "ref_sync_every", "ref_sync_alpha"):
        del state["config"][name]
    other = _trainer()
    other.load_state_dict(copy.deepcopy(state))
    assert other.step_count == 1 and other.optimizer_steps == _adam_steps(other.optimizer) == 4
    state["config"]["top_k"] = 5  # a field present with another value is still a different config
    with pytest.raises(ValueError, match="top_k"):
        _trainer().load_state_dict(state)


@pytest.mark.parametrize("kw,match", [
    (dict(ref_sync_alpha=0.0), r"TrainConfig.ref_sync_alpha = 0.0"),
    (dict(ref_sync_alpha=1.5), r"TrainConfig.ref_sync_alpha = 1.5"),
    (dict(ref_sync_alpha=float("nan")), r"TrainConfig.ref_sync_alpha must be a finite number, got nan"),
    (dict(ref_sync_alpha=True), r"TrainConfig.ref_sync_alpha"),
    (dict(ref_sync_every=-1), r"TrainConfig.ref_sync_every = -1"),
    (dict(ref_sync_every=True), r"TrainConfig.ref_sync_every must be an int, got True"),
    (dict(ref_sync_every=2.0), r"TrainConfig.ref_sync_every must be an int"),
])
def test_bad_sync_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_a_reference_of_another_shape_is_refused_when_syncing():
    task = _task()
    cfg = TrainConfig(group_size=4, prompts_per_step=4, eval_every=0, ref_sync_every=2)
    with pytest.raises(ValueError, match=r"ref_sync_every needs a reference with the policy's parameters"):
        Trainer(_policy(task), task, cfg, reference=_policy(task, n_embd=16))
    Trainer(_policy(task), task, dataclasses.replace(cfg, ref_sync_every=0), reference=_policy(task, n_embd=16))


# -- the global token normaliser -------------------------------------------------------------------------------------

def test_global_token_normaliser_makes_the_minibatch_gradients_add_up_to_the_batch_token_mean():
    """Each minibatch's token sum divided by ``num_tokens`` = batch tokens / n_mb (TRL dapo): the n_mb minibatch
    gradients of one epoch sum to n_mb x the gradient of one token-mean over the whole batch (their mean equals it),
    with minibatches of very different token counts, where per-minibatch token-means would not."""
    g = torch.Generator().manual_seed(0)
    b, n, n_mb = 8, 6, 4
    lengths = torch.tensor([6, 1, 1, 1, 6, 5, 2, 6])
    mask = (torch.arange(n)[None] < lengths[:, None]).double()
    logp = (torch.randn(b, n, generator=g, dtype=torch.float64) - 1.0).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(b, n, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    num_tokens = global_token_normaliser(mask, n_mb)
    assert num_tokens == float(lengths.sum()) / n_mb
    per_token = lambda lp, o, a: -(torch.exp(lp - o) * a[:, None])  # noqa: E731  (unclipped surrogate)
    whole = torch.autograd.grad((per_token(logp, old, adv) * mask).sum() / mask.sum(), logp)[0]
    summed = torch.zeros_like(logp)
    naive = torch.zeros_like(logp)
    for rows in torch.arange(b).chunk(n_mb):
        lp = logp[rows]
        pt = per_token(lp, old[rows], adv[rows]) * mask[rows]
        summed += torch.autograd.grad(pt.sum() / num_tokens, logp, retain_graph=True)[0]
        naive += torch.autograd.grad(pt.sum() / mask[rows].sum(), logp)[0]
    assert torch.allclose(summed, n_mb * whole, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(naive, n_mb * whole, rtol=1e-3)  # per-minibatch token-means weight tokens unequally
    assert global_token_normaliser(torch.zeros(2, 3), 2) == 0.5  # no token: TRL's clamp(min=1)


def test_with_the_math_layer_the_minibatch_gradients_add_up_to_the_batch_token_mean():
    """The same identity through ``compute_loss`` (clipped surrogate, ``global_token_norm=True`` with the
    trainer's ``num_tokens``) against ``compute_loss`` token-mean on the whole batch, on a ragged float64 batch."""
    g = torch.Generator().manual_seed(1)
    b, n, n_mb = 8, 5, 4
    lengths = torch.tensor([5, 1, 2, 1, 5, 4, 1, 5])
    mask = (torch.arange(n)[None] < lengths[:, None]).double()
    logp = (torch.randn(b, n, generator=g, dtype=torch.float64) - 1.0).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(b, n, generator=g, dtype=torch.float64)  # some ratios clipped
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    over = dict(loss_agg_mode="token-mean", kl_coef=0.0, ent_coef=0.0)
    global_cfg = get_preset("grpo", group_size=2, global_token_norm=True, **over)
    mean_cfg = get_preset("grpo", group_size=2, **over)
    num_tokens = global_token_normaliser(mask, n_mb)
    whole = torch.autograd.grad(compute_loss(LossInputs(logp, old, adv, mask), mean_cfg)[0], logp)[0]
    summed = torch.zeros_like(logp)
    for rows in torch.arange(b).chunk(n_mb):
        loss = compute_loss(LossInputs(logp[rows], old[rows], adv[rows], mask[rows], num_tokens=num_tokens), global_cfg)[0]
        summed += torch.autograd.grad(loss, logp)[0]
    assert torch.allclose(summed, n_mb * whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_passes_the_global_normaliser_only_when_the_algorithm_asks(on):
    over = {"loss_agg_mode": "token-mean", **({"global_token_norm": True} if on else {})}
    t = _trainer(algo_overrides=over, ppo_epochs=2)
    seen = []
    import grpo_ref.trainer as trainer_module

    def spy(inp, cfg):
        seen.append((inp.num_tokens, float(inp.mask.sum())))
        return compute_loss(inp, cfg)

    orig = trainer_module.compute_loss
    trainer_module.compute_loss = spy
    try:
        t.step()
    finally:
        trainer_module.compute_loss = orig
    assert len(seen) == 4
    epoch_tokens = sum(tokens for _, tokens in seen[:2])  # one epoch covers the batch once
    assert epoch_tokens == sum(tokens for _, tokens in seen[2:]) > 0
    expected = epoch_tokens / 2 if on else None
    assert all(nt == expected for nt, _ in seen), seen
