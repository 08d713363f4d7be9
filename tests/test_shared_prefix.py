"""Each distinct prompt through the model once (``TrainConfig.share_prompts``, ``trainer.response_hidden``,
``TinyGPT.final_hidden_shared_prefix``).

In float64 the shared-prefix forward gives the hidden states, log-probs and parameter gradients of the plain forward
(1e-10: the same sums in another order), on real rollouts with ragged left-padded prompts and right-padded
responses; a batch whose prompts are all distinct takes the plain path; a training step makes the same update with
and without sharing, for GRPO and for PPO with a shared critic; bad ``rows`` are refused by name.
"""
from __future__ import annotations

import copy

import pytest
import torch

import grpo_ref.model as model_module
from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig, response_hidden, response_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _task():
    return AdditionTask(n_digits=2, eval_size=16, zero_pad=False)  # prompts of 5 to 7 tokens: ragged left padding


def _model(task, seed=0):
    t = task.max_prompt_len + task.max_new_tokens
    return tiny_gpt(GPTConfig(vocab_size=task.vocab_size, block_size=t, n_layer=2, n_head=2, n_embd=32), seed)


def _config(**kw):
    base = dict(group_size=4, prompts_per_step=16, minibatches=2, ppo_epochs=2, eval_every=0, warmup_steps=0,
                temperature=1.3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def batch():
    task = _task()
    b = Trainer(_model(task), task, _config()).rollout()
    lengths = set(b.prompt_mask.sum(1).tolist())
    assert len(lengths) > 1, "the batch must mix prompt lengths (left padding)"
    assert len(set(b.response_mask.sum(1).tolist())) > 1, "and response lengths (right padding)"
    return b


def test_shared_prefix_hidden_states_values_and_gradients_equal_the_plain_pass(batch):
    model = _model(_task()).double()
    h_shared = response_hidden(model, batch, share_prompts=True)
    h_plain = response_hidden(model, batch, share_prompts=False)
    torch.testing.assert_close(h_shared, h_plain, atol=1e-10, rtol=0)
    grads = []
    for share in (True, False):
        model.zero_grad()
        logp, ent = response_logprobs(model, batch, 0.7, with_entropy=True, share_prompts=share)
        ((logp + 0.3 * ent) * batch.loss_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=1e-10, rtol=0, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in grads[0].values())


def test_final_hidden_shared_prefix_is_final_hidden_of_the_concatenation(batch):
    model = _model(_task()).double()
    p = batch.prompt_ids.shape[1]
    keys = torch.cat([batch.prompt_ids, batch.prompt_mask], 1)
    uniq, rows = torch.unique(keys, dim=0, return_inverse=True)
    assert uniq.shape[0] * 4 == keys.shape[0]  # 16 prompts, G = 4
    got = model.final_hidden_shared_prefix(uniq[:, :p], uniq[:, p:], rows, batch.response_ids, batch.response_mask.long())
    want = model_module.final_hidden_states(model, batch.input_ids, batch.attention_mask)
    live = batch.attention_mask.bool()  # padding positions are never read; real ones must agree
    torch.testing.assert_close(got[live], want[live], atol=1e-10, rtol=0)


def test_distinct_prompts_take_the_plain_pass(batch, monkeypatch):
    model = _model(_task())
    first = torch.arange(0, batch.prompt_ids.shape[0], 4)  # one completion of each prompt
    single = batch.select(first)

    def refuse(*a, **k):
        raise AssertionError("no prompt repeats: the shared-prefix pass would save nothing")

    monkeypatch.setattr(type(model), "final_hidden_shared_prefix", refuse)
    assert response_hidden(model, single).shape == (single.prompt_ids.shape[0], single.response_ids.shape[1], 32)


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.long), torch.zeros(64, 1, dtype=torch.long),
                                 torch.full((64,), 99), torch.zeros(64)])
def test_bad_rows_are_refused_by_name(batch, bad):
    model = _model(_task())
    with pytest.raises(ValueError, match="rows"):
        model.final_hidden_shared_prefix(batch.prompt_ids[:16], batch.prompt_mask[:16], bad, batch.response_ids,
                                         batch.response_mask.long())


@pytest.mark.parametrize("algo, kw", [("grpo", {}), ("ppo", {"critic": "shared", "group_size": 4})])
def test_a_training_step_makes_the_same_update_with_and_without_sharing(algo, kw):
    task = _task()

    def run(share):
        torch.set_default_dtype(torch.float64)
        try:
            tr = Trainer(_model(task), task, _config(algo=algo, share_prompts=share, **kw))
            m = tr.step()
        finally:
            torch.set_default_dtype(torch.float32)
        return m, {k: v.detach().clone() for k, v in tr.policy.state_dict().items()}

    (m1, p1), (m0, p0) = run(True), run(False)
    assert abs(m1["loss"] - m0["loss"]) < 1e-9
    for k, v in p0.items():
        torch.testing.assert_close(p1[k], v, atol=1e-9, rtol=0, msg=k)


def test_share_prompts_is_validated():
    with pytest.raises(ValueError, match="share_prompts"):
        TrainConfig(share_prompts="yes")
    assert copy.copy(TrainConfig()).share_prompts is True
