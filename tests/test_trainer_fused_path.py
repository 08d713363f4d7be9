"""The trainer's fused log-prob path (``TrainConfig.logprob_path``, ``grpo_ref.trainer.response_logprobs``).

For :class:`TinyGPT` and for tiny Hugging Face GPT-2 / Llama models built from a config, the fused path (final
hidden states + output embedding through ``token_logprobs_and_entropy_from_hidden``) and the logits path
(``lm_logits`` + ``token_logprobs`` / ``token_entropy``) give the same log-probs, entropies and parameter gradients
in float64 (tolerance 1e-10 absolute: the two differ only in the order of float64 roundings), temperature
included; the default (``"auto"``) takes the fused path for these models without ever calling the output head
on the full ``[B, T, V]`` (checked with a hook that raises) nor ``lm_logits``; a model without a reachable head
falls back to the logits; one trainer step with each path gives the same loss (1e-6 relative, float64).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import grpo_ref.trainer as trainer_module
from grpo_ref.model import GPTConfig, TinyGPT, final_hidden_states, output_head, tiny_gpt
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import LOGPROB_PATHS, Trainer, TrainConfig, response_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

ATOL = 1e-10  # float64: both paths compute the same sums in a different order


def _task():
    return AdditionTask(n_digits=2, eval_size=16)


def _model(kind: str, task) -> nn.Module:
    t = task.max_prompt_len + task.max_new_tokens
    if kind == "tiny":
        return tiny_gpt(GPTConfig(vocab_size=task.vocab_size, block_size=t, n_layer=1, n_head=2, n_embd=32), 0)
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=task.vocab_size, n_positions=t, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)).eval()
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=task.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=t, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def _config(**kw):
    base = dict(group_size=4, prompts_per_step=4, minibatches=2, ppo_epochs=1, eval_every=0, warmup_steps=0)
    return TrainConfig(**{**base, **kw})


def _batch(model, task):
    """A real rollout (ragged left-padded prompts, right-padded responses) sampled by the trainer."""
    return Trainer(model, task, _config(temperature=0.9)).rollout()


def _head_module(model):
    return model.lm_head if isinstance(model, TinyGPT) else model.get_output_embeddings()


KINDS = ["tiny", "gpt2", "llama"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_fused_and_logits_paths_agree_on_values_and_gradients(kind, tau):
    task = _task()
    model = _model(kind, task)
    batch = _batch(model, task)
    model = model.double()
    assert output_head(model) is not None
    out = {}
    for path in ("fused", "logits"):
        model.zero_grad(set_to_none=True)
        logp, ent = response_logprobs(model, batch, tau, with_entropy=True, path=path)
        assert logp.dtype == ent.dtype == torch.float64 and logp.shape == ent.shape == batch.response_ids.shape
        w = torch.linspace(-1.0, 2.0, logp.numel(), dtype=torch.float64).reshape(logp.shape)
        ((logp * w).sum() + (ent * w.flip(-1)).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        logp_only, none = response_logprobs(model, batch, tau, path=path)
        assert none is None
        out[path] = (logp.detach(), ent.detach(), logp_only, grads)
    (lf, ef, lof, gf), (ll, el, lol, gl) = out["fused"], out["logits"]
    torch.testing.assert_close(lf, ll, rtol=0, atol=ATOL)
    torch.testing.assert_close(ef, el, rtol=0, atol=ATOL)
    torch.testing.assert_close(lof, lol, rtol=0, atol=ATOL)
    assert gf.keys() == gl.keys() and len(gf) == len(list(model.parameters()))
    for name in gf:
        torch.testing.assert_close(gf[name], gl[name], rtol=0, atol=ATOL, msg=name)
    assert float(ef.abs().sum()) > 0 and any(float(g.abs().sum()) > 0 for g in gf.values())


@pytest.mark.parametrize("kind", KINDS)
def test_the_default_path_is_fused_and_never_runs_the_head_on_all_positions(kind, monkeypatch):
    task = _task()
    model = _model(kind, task)
    batch = _batch(model, task)
    want = response_logprobs(model, batch, 0.8, with_entropy=True, path="logits")

    def refuse(*args, **kwargs):
        raise AssertionError("the logits path was taken")

    monkeypatch.setattr(trainer_module, "lm_logits", refuse)
    handle = _head_module(model).register_forward_hook(lambda *a: refuse())
    try:
        got = response_logprobs(model, batch, 0.8, with_entropy=True)  # path="auto"
        with pytest.raises(AssertionError, match="logits path"):
            response_logprobs(model, batch, 0.8, path="logits")
    finally:
        handle.remove()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # float32


class _LogitsOnly(nn.Module):
    """A causal LM the fused path cannot see into: a wrapper returning the logits tensor."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids, attention_mask, position_ids).logits


def test_auto_falls_back_to_the_logits_for_a_model_without_a_reachable_head(monkeypatch):
    task = _task()
    inner = _model("tiny", task)
    wrapped = _LogitsOnly(inner)
    batch = _batch(inner, task)
    assert output_head(wrapped) is None
    with pytest.raises(ValueError, match="path='fused'"):
        response_logprobs(wrapped, batch, 1.0, path="fused")
    with pytest.raises(ValueError, match="no output head"):
        final_hidden_states(wrapped, batch.input_ids, batch.attention_mask)
    auto = response_logprobs(wrapped, batch, 1.0, with_entropy=True)
    fused = response_logprobs(inner, batch, 1.0, with_entropy=True, path="fused")
    for a, f in zip(auto, fused):
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(trainer_module, "lm_logits", lambda *a, **k: (_ for _ in ()).throw(AssertionError("logits")))
    with pytest.raises(AssertionError, match="logits"):  # and auto did take the logits path for it
        response_logprobs(wrapped, batch, 1.0)


def test_hf_models_with_a_post_head_transform_are_not_fused():
    transformers = pytest.importorskip("transformers")
    task = _task()
    model = _model("llama", task)
    model.config.model_type = "gemma2"  # a type whose logits are soft-capped after the head
    assert output_head(model) is None
    model = _model("llama", task)
    model.config.logit_scale = 0.5
    assert output_head(model) is None
    assert transformers is not None


def test_tinygpt_final_hidden_is_the_input_of_lm_head():
    task = _task()
    model = _model("tiny", task)
    batch = _batch(model, task)
    out = model(batch.input_ids, batch.attention_mask)
    h = final_hidden_states(model, batch.input_ids, batch.attention_mask)
    pos = torch.cumsum(batch.attention_mask, -1) - 1
    ref = model(batch.input_ids, batch.attention_mask, pos.clamp(min=0))
    assert torch.equal(h, ref.hidden_states) and torch.equal(model.lm_head(h), ref.logits)
    assert out.logits.shape == (*batch.input_ids.shape, task.vocab_size)


def test_logprob_path_is_validated():
    assert LOGPROB_PATHS == ("auto", "fused", "logits") and TrainConfig().logprob_path == "auto"
    with pytest.raises(ValueError, match="logprob_path"):
        TrainConfig(logprob_path="fast")
    task = _task()
    model = _model("tiny", task)
    with pytest.raises(ValueError, match="path must be one of"):
        response_logprobs(model, _batch(model, task), 1.0, path="fast")


@pytest.mark.parametrize("kind,algo", [("tiny", "grpo"), ("tiny", "ppo"), ("gpt2", "grpo"), ("llama", "grpo")])
def test_a_training_step_gives_the_same_loss_with_either_path(kind, algo, monkeypatch):
    task = _task()
    model = _model(kind, task).double()
    metrics, params = {}, {}
    for path in ("auto", "logits"):
        t = Trainer(copy.deepcopy(model), task, _config(algo=algo, logprob_path=path, temperature=0.9,
                                                       algo_overrides={"ent_coef": 0.01}))
        if path == "auto":  # the default takes the fused path for the policy, reference and entropy
            with monkeypatch.context() as m:
                m.setattr(trainer_module, "lm_logits", lambda *a, **k: (_ for _ in ()).throw(AssertionError("logits")))
                metrics[path] = t.step()
        else:
            metrics[path] = t.step()
        params[path] = torch.cat([p.detach().reshape(-1) for p in t.policy.parameters()])
    a, b = metrics["auto"], metrics["logits"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-6)
    torch.testing.assert_close(params["auto"], params["logits"], rtol=0, atol=1e-9)
