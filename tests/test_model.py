"""The tiny transformer, its KV cache, padding conventions, and the adapter for foreign (Hugging Face) models."""
from __future__ import annotations

import pytest
import torch

from grpo_ref.model import GPTConfig, LMOutput, ValueModel, hidden_size_of, lm_logits, tiny_gpt
from grpo_ref.rollout import generate
from grpo_ref.tasks import AdditionTask


def _model(seed=0, **kw):
    cfg = dict(vocab_size=15, block_size=16, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return tiny_gpt(GPTConfig(**cfg), seed).eval()


def _ragged_prompts(n=6, seed=0):
    """Left-padded prompts of different lengths (no zero padding of operands: '7+35=' vs '12+34=')."""
    task = AdditionTask(n_digits=2, zero_pad=False)
    pairs = task.sample_train(n, torch.Generator().manual_seed(seed))
    pairs[0] = torch.tensor([3, 4])  # a short prompt, so the batch really is ragged
    ids, mask = task.encode_prompts(pairs)
    assert (mask == 0).any()
    return task, ids, mask


def test_config_refuses_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_tiny_gpt_is_seeded_without_touching_global_rng():
    state = torch.get_rng_state()
    a, b = _model(seed=3), _model(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(_model(seed=4).tok_emb.weight, a.tok_emb.weight)


def test_cached_forward_equals_full_forward():
    model = _model()
    _, ids, mask = _ragged_prompts()
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
    pieces = [out.logits]
    for t in range(4, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
        pieces.append(out.logits)
    on = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[on], full[on], rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_a_prompts_logits():
    model = _model()
    _, ids, mask = _ragged_prompts()
    batch = model(ids, attention_mask=mask).logits
    for i in range(ids.shape[0]):
        real = ids[i][mask[i].bool()][None]
        alone = model(real).logits[0]
        torch.testing.assert_close(batch[i][mask[i].bool()], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch).all(), "padding positions must not produce NaN (each query sees at least itself)"


def test_kv_cached_sampling_equals_recomputing_the_prefix():
    model = _model(seed=1)
    task, ids, mask = _ragged_prompts(n=8)
    kw = dict(max_new_tokens=6, eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id, temperature=1.3)
    cached = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), use_cache=True, **kw)
    full = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.mask, full.mask)
    torch.testing.assert_close(cached.logp, full.logp, rtol=1e-5, atol=1e-5)


def test_generate_stops_at_eos_and_pads_after_it():
    model = _model(seed=2)
    task, ids, mask = _ragged_prompts(n=16)
    g = generate(model, ids, mask, 8, task.tokenizer.eos_id, task.tokenizer.pad_id, generator=torch.Generator().manual_seed(1))
    for row, m, done in zip(g.tokens.tolist(), g.mask.tolist(), g.finished.tolist()):
        if task.tokenizer.eos_id in row:
            k = row.index(task.tokenizer.eos_id)
            assert done and m[: k + 1] == [1.0] * (k + 1) and sum(m) == k + 1
            assert all(t == task.tokenizer.pad_id for t in row[k + 1 :])
        else:
            assert not done and sum(m) == len(row)
    assert (g.logp[g.mask == 0] == 0).all()


def test_generate_logp_matches_temperature_scaled_softmax():
    model = _model(seed=5)
    task, ids, mask = _ragged_prompts(n=4)
    g = generate(model, ids, mask, 3, task.tokenizer.eos_id, task.tokenizer.pad_id, temperature=0.7,
                 generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([ids, g.tokens], 1)
    full_mask = torch.cat([mask, g.mask.long()], 1)
    logits = model(full_ids, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, g.tokens[..., None])[..., 0] * g.mask
    torch.testing.assert_close(g.logp, expected, rtol=1e-5, atol=1e-5)


def test_value_model_starts_near_zero_and_has_shape_b_t():
    policy = _model()
    critic = ValueModel(policy, hidden_size_of(policy))
    ids = torch.randint(0, 15, (3, 7), generator=torch.Generator().manual_seed(0))
    v = critic(ids, torch.ones_like(ids))
    assert v.shape == (3, 7) and v.abs().max() < 0.05


class _TensorLM(torch.nn.Module):
    """A causal LM that returns a bare logits tensor and takes no position_ids."""

    def __init__(self):
        super().__init__()
        self.inner = _model()

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask=attention_mask).logits


def test_lm_logits_accepts_tensor_or_logits_object_and_refuses_others():
    ids = torch.randint(0, 15, (2, 5), generator=torch.Generator().manual_seed(0))
    assert lm_logits(_TensorLM(), ids, torch.ones_like(ids)).shape == (2, 5, 15)
    assert isinstance(_model()(ids), LMOutput)

    class Bad(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return {"nope": 1}

    with pytest.raises(TypeError, match="logits"):
        lm_logits(Bad(), ids)


def test_block_size_is_enforced():
    with pytest.raises(ValueError, match="block_size"):
        _model(block_size=4)(torch.zeros(1, 6, dtype=torch.long))


transformers = pytest.importorskip("transformers")


def _hf_models():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=15, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=15, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return {"gpt2": gpt2.eval(), "llama": llama.eval()}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_model_logits_ignore_left_padding(name):
    torch.manual_seed(0)
    model = _hf_models()[name]
    _, ids, mask = _ragged_prompts()
    batch = lm_logits(model, ids, mask)
    i = 0  # the short, padded prompt
    real = ids[i][mask[i].bool()][None]
    torch.testing.assert_close(batch[i][mask[i].bool()], lm_logits(model, real, torch.ones_like(real))[0], rtol=1e-4, atol=1e-4)
    assert hidden_size_of(model) == 32
