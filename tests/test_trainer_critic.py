"""PPO's critic layouts (``TrainConfig.critic``, ``critic_layers``) and the sampler's log-probs as ``pi_old``
(``TrainConfig.old_logp_source``).

* ``critic="shared"``: :func:`response_logprobs_and_values` gives the log-probs of :func:`response_logprobs` and the
  values of the head applied to :func:`final_hidden_states` (float64, both log-prob paths, TinyGPT and Hugging Face
  GPT-2); the value loss's gradient reaches the trunk (and ``vf_coef`` scales it); the trainer builds a head only,
  checkpoints and resumes it exactly; a model without a reachable head is refused.
* ``critic_layers=k``: the critic is the policy's first ``k`` blocks (same weights), a smaller forward.
* ``old_logp_source="sampler"``: a training step from ``Rollout.sample_logp`` gives the same update as one that
  recomputes ``pi_old`` (float64: the two differ by float rounding only), for GRPO and PPO, with and without a top-k
  filter; ``sampler_logp_gap`` is only reported when there is a gap to measure.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from grpo_ref.model import GPTConfig, TinyGPT, ValueHead, ValueModel, final_hidden_states, tiny_gpt, truncated_copy
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig, response_logprobs, response_logprobs_and_values, response_values

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _task():
    return AdditionTask(n_digits=2, eval_size=16)


def _tiny(task, n_layer=2, seed=0):
    t = task.max_prompt_len + task.max_new_tokens
    return tiny_gpt(GPTConfig(vocab_size=task.vocab_size, block_size=t, n_layer=n_layer, n_head=2, n_embd=32), seed)


def _gpt2(task):
    transformers = pytest.importorskip("transformers")
    t = task.max_prompt_len + task.max_new_tokens
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=task.vocab_size, n_positions=t, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)).eval()


def _config(**kw):
    base = dict(group_size=4, prompts_per_step=4, minibatches=2, ppo_epochs=2, eval_every=0, warmup_steps=0)
    return TrainConfig(**{**base, **kw})


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the shared critic -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny", "gpt2"])
@pytest.mark.parametrize("path", ["fused", "logits"])
def test_shared_pass_gives_the_policys_logprobs_and_the_heads_values(kind, path):
    task = _task()
    model = (_tiny(task) if kind == "tiny" else _gpt2(task)).double()
    batch = Trainer(copy.deepcopy(model).float(), task, _config()).rollout()
    head = ValueHead(32, init_std=0.5, seed=3).double()
    logp, ent, values = response_logprobs_and_values(model, head, batch, 0.8, with_entropy=True, path=path)
    ref_logp, ref_ent = response_logprobs(model, batch, 0.8, with_entropy=True, path="logits")
    p = batch.prompt_ids.shape[1]
    hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)[:, p - 1 : -1]
    want_values = torch.einsum("bnh,h->bn", hidden, head.v_head.weight[0]) + head.v_head.bias
    assert values.shape == logp.shape == batch.response_ids.shape
    torch.testing.assert_close(logp, ref_logp, atol=1e-10, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-10, rtol=0)
    torch.testing.assert_close(values, want_values, atol=1e-10, rtol=0)
    assert values.dtype == torch.float64


def test_a_value_head_computes_in_float32_at_least():
    head = ValueHead(8, init_std=0.5, seed=0)
    h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    out = head(h.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    torch.testing.assert_close(out, (h.bfloat16().float() @ head.v_head.weight[0]) + head.v_head.bias, atol=1e-6, rtol=1e-6)


def test_the_value_loss_trains_the_trunk_only_through_a_shared_critic_scaled_by_vf_coef():
    task = _task()
    model = _tiny(task)
    batch = Trainer(copy.deepcopy(model), task, _config()).rollout()
    head = ValueHead(32, init_std=0.5, seed=1)
    _, _, values = response_logprobs_and_values(model, head, batch, 1.0)
    (values * batch.loss_mask).sum().backward()
    trunk = model.blocks[0].attn.qkv.weight
    assert trunk.grad is not None and float(trunk.grad.abs().sum()) > 0
    assert model.lm_head.weight.grad is None  # values do not go through the output head

    # In the trainer: the same step with vf_coef = 0 and 0.5 moves the policy's trunk differently (the value loss
    # reaches it); with a separate critic, vf_coef does not change the policy's update at all.
    def trunk_after(critic, vf_coef):
        tr = Trainer(_tiny(task), task, _config(algo="ppo", group_size=1, prompts_per_step=8, critic=critic,
                                                algo_overrides={"vf_coef": vf_coef}))
        tr.step()
        return tr.policy.blocks[0].mlp[0].weight.detach().clone()

    assert not torch.allclose(trunk_after("shared", 0.0), trunk_after("shared", 0.5), atol=1e-7, rtol=0)
    torch.testing.assert_close(trunk_after("separate", 0.0), trunk_after("separate", 0.5), atol=0, rtol=0)


def test_trainer_with_a_shared_critic_builds_a_head_and_resumes_exactly(tmp_path):
    task = _task()
    cfg = _config(algo="ppo", group_size=1, prompts_per_step=8, critic="shared")
    tr = Trainer(_tiny(task), task, cfg)
    assert isinstance(tr.critic, ValueHead)
    assert sum(p.numel() for p in tr.critic.parameters()) == 32 + 1
    m = tr.step()
    for key in ("vf_loss", "value_mean", "critic_grad_norm"):
        assert key in m and torch.isfinite(torch.tensor(m[key]))
    tr.save(str(tmp_path / "ck.pt"))
    again = Trainer(_tiny(task), task, cfg)
    again.load(str(tmp_path / "ck.pt"))
    a, b = tr.step(), again.step()
    assert a["loss"] == b["loss"] and a["vf_loss"] == b["vf_loss"]
    for k, v in _params(tr.critic).items():
        torch.testing.assert_close(v, _params(again.critic)[k], atol=0, rtol=0)


def test_a_checkpoint_of_a_separate_critic_does_not_load_into_a_shared_one(tmp_path):
    task = _task()
    tr = Trainer(_tiny(task), task, _config(algo="ppo", group_size=1, prompts_per_step=4))
    tr.save(str(tmp_path / "ck.pt"))
    other = Trainer(_tiny(task), task, _config(algo="ppo", group_size=1, prompts_per_step=4, critic="shared"))
    with pytest.raises(ValueError, match="critic"):
        other.load(str(tmp_path / "ck.pt"))


class _NoHead(nn.Module):
    """A causal LM the fused path cannot see into: logits only."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask).logits


def test_a_shared_critic_needs_a_reachable_head():
    task = _task()
    with pytest.raises(ValueError, match="critic='shared'.*_NoHead|_NoHead.*critic='separate'"):
        Trainer(_NoHead(_tiny(task)), task, _config(algo="ppo", group_size=1, critic="shared"))


# -- the smaller critic --------------------------------------------------------------------------------------------------
def test_truncated_copy_keeps_the_first_blocks_with_their_weights():
    task = _task()
    model = _tiny(task, n_layer=3)
    small = truncated_copy(model, 1)
    assert isinstance(small, TinyGPT) and len(small.blocks) == 1 and small.config.n_layer == 1
    assert len(model.blocks) == 3  # the original is untouched
    for (name, p), (_, q) in zip(model.blocks[0].named_parameters(), small.blocks[0].named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
        assert p.data_ptr() != q.data_ptr()
    # the same computation as running the policy's first block by hand
    ids = torch.randint(0, task.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    want = model.ln_f(model.blocks[0](model.tok_emb(ids) + model.pos_emb(torch.arange(5))[None],
                                      torch.ones(1, 1, 5, 5, dtype=torch.bool).tril())[0])
    torch.testing.assert_close(small.final_hidden(ids), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [0, 4, -1, 1.0, True])
def test_truncated_copy_refuses_bad_layer_counts(bad):
    with pytest.raises(ValueError, match="n_layer"):
        truncated_copy(_tiny(_task(), n_layer=3), bad)


def test_truncated_copy_refuses_other_models():
    with pytest.raises(ValueError, match="TinyGPT"):
        truncated_copy(_NoHead(_tiny(_task())), 1)


def test_trainer_builds_a_smaller_critic_from_the_policys_first_blocks():
    task = _task()
    policy = _tiny(task, n_layer=2)
    tr = Trainer(policy, task, _config(algo="ppo", group_size=1, critic_layers=1))
    assert isinstance(tr.critic, ValueModel) and len(tr.critic.backbone.blocks) == 1
    torch.testing.assert_close(tr.critic.backbone.blocks[0].mlp[0].weight, policy.blocks[0].mlp[0].weight, atol=0, rtol=0)
    m = tr.step()
    assert torch.isfinite(torch.tensor(m["vf_loss"]))
    with pytest.raises(ValueError, match="n_layer"):
        Trainer(_tiny(task, n_layer=2), task, _config(algo="ppo", group_size=1, critic_layers=3))


@pytest.mark.parametrize("kw, field", [
    ({"critic": "value_head"}, "critic"),
    ({"critic": None}, "critic"),
    ({"critic_layers": -1}, "critic_layers"),
    ({"critic_layers": 1, "critic": "shared"}, "critic_layers"),
    ({"old_logp_source": "vllm"}, "old_logp_source"),
    ({"old_logp_source": ""}, "old_logp_source"),
])
def test_bad_critic_and_old_logp_settings_are_refused_by_name(kw, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kw)


# -- pi_old from the sampler -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo, critic", [("grpo", "separate"), ("ppo", "separate"), ("ppo", "shared")])
@pytest.mark.parametrize("top_k", [0, 3])
def test_the_samplers_logprobs_give_the_same_update_as_recomputing_pi_old(algo, critic, top_k):
    task = _task()
    g = 1 if algo == "ppo" else 4

    def run(source):
        torch.set_default_dtype(torch.float64)
        try:
            policy = _tiny(task)
            tr = Trainer(policy, task, _config(algo=algo, group_size=g, prompts_per_step=8 // g * 2, critic=critic,
                                               old_logp_source=source, top_k=top_k, temperature=0.9))
            m = tr.step()
        finally:
            torch.set_default_dtype(torch.float32)
        return m, _params(tr.policy)

    m_re, p_re = run("recompute")
    m_sa, p_sa = run("sampler")
    assert "sampler_logp_gap" in m_re and "sampler_logp_gap" not in m_sa
    # the sampler computed log softmax(z / tau) over the full vocabulary (float32 there): the recomputed pi_old
    # differs from it by rounding only, also under top-k
    assert m_re["sampler_logp_gap"] < 1e-5
    assert m_re["samples"] == m_sa["samples"]
    assert abs(m_re["loss"] - m_sa["loss"]) < 1e-5
    for k, v in p_re.items():
        torch.testing.assert_close(p_sa[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_the_recomputed_gap_is_a_real_measurement():
    """The gap metric reads the recomputed pi_old against the sampler's: a policy changed after sampling shows up."""
    task = _task()
    tr = Trainer(_tiny(task), task, _config())
    batch = tr.rollout()
    with torch.no_grad():
        logp, _, _ = tr.policy_pass(batch)
    mask = batch.loss_mask
    assert float(((logp - batch.sample_logp).abs() * mask).sum() / mask.sum()) < 1e-5
    with torch.no_grad():
        tr.policy.lm_head.weight.mul_(1.5)
        logp2, _, _ = tr.policy_pass(batch)
    assert float(((logp2 - batch.sample_logp).abs() * mask).sum() / mask.sum()) > 1e-3


def test_response_values_of_a_separate_critic_is_unchanged_by_the_new_options():
    task = _task()
    policy = _tiny(task)
    critic = ValueModel(copy.deepcopy(policy), 32, init_std=0.3, seed=2)
    tr = Trainer(policy, task, _config(algo="ppo", group_size=1), critic=critic)
    batch = tr.rollout()
    _, _, values = tr.policy_pass(batch)
    torch.testing.assert_close(values, response_values(critic, batch), atol=0, rtol=0)
