"""``TrainConfig.minibatch_order``: minibatches of shuffled rows (the default, TRL's) or of shuffled whole groups.

The "groups" order is a uniform permutation of the groups with each group's rows kept together (exact enumeration
of the orders of three groups); the default draws exactly the permutation it always drew; with one minibatch both
orders make the same update (float64); with several, every minibatch of "groups" holds whole groups (seen in the
batches the policy is run on); bad values are refused by name.
"""
from __future__ import annotations

import collections
import itertools

import pytest
import torch

from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig, minibatch_permutation

pytestmark = pytest.mark.usefixtures("one_thread")


def test_groups_order_is_a_uniform_permutation_of_whole_groups():
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = collections.Counter()
    for _ in range(n):
        perm = minibatch_permutation(12, 4, "groups", g)
        assert sorted(perm.tolist()) == list(range(12))
        blocks = perm.view(3, 4)
        assert (blocks % 4 == torch.arange(4)).all() and (blocks // 4 == blocks[:, :1] // 4).all()
        counts[tuple((blocks[:, 0] // 4).tolist())] += 1
    assert set(counts) == set(itertools.permutations(range(3)))
    # each of the 6 orders has probability 1/6: 5 standard deviations of a binomial count
    sd = (n * (1 / 6) * (5 / 6)) ** 0.5
    assert all(abs(c - n / 6) < 5 * sd for c in counts.values()), counts


def test_rows_order_is_the_permutation_the_trainer_always_drew():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(minibatch_permutation(16, 4, "rows", a), torch.randperm(16, generator=b))
    # a batch that is not whole groups falls back to rows
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(minibatch_permutation(10, 4, "groups", a), torch.randperm(10, generator=b))


def _setup(**kw):
    task = AdditionTask(n_digits=2, eval_size=16)
    t = task.max_prompt_len + task.max_new_tokens
    model = tiny_gpt(GPTConfig(vocab_size=task.vocab_size, block_size=t, n_layer=1, n_head=2, n_embd=32), 0)
    cfg = dict(group_size=4, prompts_per_step=8, ppo_epochs=1, eval_every=0, warmup_steps=0, seed=0)
    return task, model, TrainConfig(**{**cfg, **kw})


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_one_minibatch_makes_the_same_update_in_either_order(algo):
    def run(order):
        torch.set_default_dtype(torch.float64)
        try:
            task, model, cfg = _setup(algo=algo, minibatches=1, minibatch_order=order)
            tr = Trainer(model, task, cfg)
            m = tr.step()
        finally:
            torch.set_default_dtype(torch.float32)
        return m, {k: v.detach().clone() for k, v in tr.policy.state_dict().items()}

    (m_rows, p_rows), (m_groups, p_groups) = run("rows"), run("groups")
    assert abs(m_rows["loss"] - m_groups["loss"]) < 1e-10
    for k, v in p_rows.items():
        torch.testing.assert_close(p_groups[k], v, atol=1e-10, rtol=0, msg=k)


def _minibatch_prompts(order):
    """The prompt data of every minibatch one step trains on (spied from ``policy_pass``)."""
    task, model, cfg = _setup(algo="grpo", minibatches=4, ppo_epochs=2, minibatch_order=order)
    tr = Trainer(model, task, cfg)
    seen = []
    policy_pass = tr.policy_pass

    def spy(batch, with_entropy=False):
        seen.append(batch.pairs.clone())
        return policy_pass(batch, with_entropy)

    tr.policy_pass = spy
    tr.step()
    return [p for p in seen if p.shape[0] == 8]  # the old-log-prob pass sees all 32 rows


def _whole_groups(pairs):
    """Rows 0-3 and 4-7 are each one prompt's group."""
    return torch.equal(pairs.view(2, 4, 2), pairs.view(2, 4, 2)[:, :1].expand(2, 4, 2))


def test_groups_minibatches_hold_whole_groups():
    minibatches = _minibatch_prompts("groups")
    assert len(minibatches) == 8 and all(_whole_groups(p) for p in minibatches)
    # the default order splits groups across minibatches (on this seed, at least once)
    minibatches = _minibatch_prompts("rows")
    assert len(minibatches) == 8 and not all(_whole_groups(p) for p in minibatches)


def test_minibatch_order_is_validated():
    with pytest.raises(ValueError, match="minibatch_order"):
        TrainConfig(minibatch_order="prompts")
    assert TrainConfig().minibatch_order == "rows"
