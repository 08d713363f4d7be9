"""Top-k / top-p / min-p sampling (grpo_ref.rollout): the kept sets against their definitions, enumerated on small
vocabularies; the draws always inside them and distributed as the renormalised filtered softmax; the filtered logits
equal to those of Hugging Face transformers' own processors, built by ``GenerationMixin._get_logits_processor`` (its
order: temperature, top-k, top-p, min-p); the defaults reproduce the unfiltered sampler draw for draw; the log-probs
returned stay the full-vocabulary ``log softmax(z / tau)`` (TRL 1.16.0, verl 0.9.1), so ``pi_old`` recomputed by the
trainer equals them; bad input is refused with the argument's name.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.rollout import _next_token, filter_logits, generate, rollout
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig, response_logprobs

rollout_module = importlib.import_module("grpo_ref.rollout")  # grpo_ref.rollout is also a function


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


# -- the definitions, written as loops over one row ------------------------------------------------------------------

def _probs(z, keep):
    """softmax over the kept tokens of ``z`` (a list of floats), in float64; 0 elsewhere."""
    m = max(z[i] for i in keep)
    e = {i: math.exp(z[i] - m) for i in keep}
    s = sum(e.values())
    return {i: e[i] / s for i in keep}


def kept_by_definition(z, top_k=0, top_p=1.0, min_p=0.0):
    """The kept token set of one row ``z`` (temperature already applied), by the definitions, one filter after the
    other: top-k keeps logits >= the k-th largest; top-p the smallest set of most likely tokens with probability
    >= p; min-p the tokens with p >= min_p * p_max. Returns (kept set, smallest margin to a top-p boundary)."""
    keep = set(range(len(z)))
    margin = math.inf
    if top_k > 0:
        kth = sorted(z, reverse=True)[min(top_k, len(z)) - 1]
        keep = {i for i in keep if z[i] >= kth}
    if top_p < 1.0:
        p = _probs(z, keep)
        order = sorted(keep, key=lambda i: -p[i])
        chosen, total = [], 0.0
        for i in order:
            chosen.append(i)
            total += p[i]
            margin = min(margin, abs(total - top_p))
            if total >= top_p:
                break
        keep = set(chosen)
    if min_p > 0.0:
        p = _probs(z, keep)
        top = max(p.values())
        margin = min([margin] + [abs(p[i] - min_p * top) / top for i in keep if p[i] < top])  # the top one stays
        keep = {i for i in keep if p[i] >= min_p * top}
    return keep, margin


def _rows(n, v, seed, scale=2.0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


SETTINGS = [  # (top_k, top_p, min_p)
    (1, 1.0, 0.0), (3, 1.0, 0.0), (6, 1.0, 0.0), (50, 1.0, 0.0),
    (0, 0.05, 0.0), (0, 0.5, 0.0), (0, 0.9, 0.0), (0, 0.999, 0.0),
    (0, 1.0, 0.05), (0, 1.0, 0.3), (0, 1.0, 1.0),
    (4, 0.7, 0.0), (4, 1.0, 0.2), (0, 0.8, 0.25), (3, 0.6, 0.5), (5, 0.95, 0.1),
]


@pytest.mark.parametrize("top_k,top_p,min_p", SETTINGS)
def test_the_kept_sets_are_those_of_the_definitions(top_k, top_p, min_p):
    z = _rows(300, 7, seed=top_k * 100 + int(top_p * 1000) + int(min_p * 10))
    out = filter_logits(z, top_k, top_p, min_p)
    checked = 0
    for row, filt in zip(z.tolist(), out):
        keep, margin = kept_by_definition(row, top_k, top_p, min_p)
        if margin < 1e-9:  # a draw on a boundary: rounding decides, not the definition
            continue
        assert set(torch.isfinite(filt).nonzero().flatten().tolist()) == keep, (row, top_k, top_p, min_p)
        assert torch.equal(filt[list(keep)], torch.tensor(row, dtype=z.dtype)[list(keep)])  # kept logits unchanged
        checked += 1
    assert checked >= 290


def test_top_k_keeps_ties_at_the_boundary_and_every_filter_keeps_the_top_token():
    z = torch.tensor([[3.0, 1.0, 1.0, 0.0, -2.0]])
    assert torch.isfinite(filter_logits(z, top_k=2)).tolist() == [[True, True, True, False, False]]
    z = torch.tensor([[10.0, 0.0, 0.0, 0.0]])  # p_max ~ 0.9999: any p keeps the top token
    for kw in (dict(top_p=1e-9), dict(min_p=1.0), dict(top_k=1)):
        assert torch.isfinite(filter_logits(z, **kw)).tolist() == [[True, False, False, False]], kw


def test_the_defaults_and_the_filters_set_to_keep_everything_return_the_logits_unchanged():
    z = _rows(20, 9, seed=1).float()
    assert filter_logits(z) is z
    assert torch.equal(filter_logits(z, top_k=9, top_p=1.0, min_p=0.0), z)
    assert torch.equal(filter_logits(z, top_k=100), z)


# -- draws ---------------------------------------------------------------------------------------------------------

def _chi2_bound(df: int, z: float = 4.5) -> float:
    """Wilson-Hilferty upper quantile of the chi-square distribution (z = 4.5: a tail of about 3e-6)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [
    (0, 1.0, 0.0, 1.0), (3, 1.0, 0.0, 1.0), (0, 0.8, 0.0, 0.7), (0, 1.0, 0.12, 1.3), (4, 0.9, 0.05, 0.8),
])
def test_draws_stay_in_the_kept_set_with_the_renormalised_frequencies(top_k, top_p, min_p, temperature):
    n, v = 40000, 8
    z = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.2, -0.3, -1.0, -2.5])
    keep, margin = kept_by_definition((z.double() / temperature).tolist(), top_k, top_p, min_p)
    assert margin > 1e-3
    q = _probs((z.double() / temperature).tolist(), keep)
    g = torch.Generator().manual_seed(123)
    tokens = _next_token(z.expand(n, v), temperature, False, g, top_k, top_p, min_p)
    counts = torch.bincount(tokens, minlength=v).double()
    assert set(counts.nonzero().flatten().tolist()) <= keep  # never a removed token
    expected = torch.tensor([q.get(i, 0.0) for i in range(v)], dtype=torch.float64) * n
    kept = sorted(keep)
    if len(kept) > 1:
        chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
        assert chi2 < _chi2_bound(len(kept) - 1), (chi2, counts.tolist(), expected.tolist())
    else:
        assert counts[kept[0]] == n


class TableLM(nn.Module):
    """A causal LM whose next-token logits are a table row chosen by the current token: ``[B, T] -> [B, T, V]``."""

    def __init__(self, v: int, seed: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(v, v, generator=torch.Generator().manual_seed(seed)) * 2.0)

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]


@pytest.mark.parametrize("top_k,top_p,min_p", [(2, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.3), (4, 0.9, 0.2)])
def test_generate_samples_only_kept_tokens_and_returns_full_vocabulary_logprobs(top_k, top_p, min_p):
    v, tau = 12, 0.9
    model = TableLM(v, seed=5)
    prompts = torch.randint(1, v, (64, 3), generator=torch.Generator().manual_seed(0))
    gen = generate(model, prompts, torch.ones_like(prompts), max_new_tokens=6, eos_id=0, pad_id=0, temperature=tau,
                   generator=torch.Generator().manual_seed(1), top_k=top_k, top_p=top_p, min_p=min_p)
    table = model.table.detach().double() / tau
    prev = prompts[:, -1]
    n_checked = 0
    for t in range(gen.tokens.shape[1]):
        for b in range(prompts.shape[0]):
            if gen.mask[b, t] == 0:
                continue
            row = table[prev[b]]
            keep, _ = kept_by_definition(row.tolist(), top_k, top_p, min_p)
            tok = int(gen.tokens[b, t])
            assert tok in keep
            full = torch.log_softmax(row, -1)[tok]  # the full-vocabulary log-prob, not the filtered one
            assert abs(float(gen.logp[b, t]) - float(full)) < 1e-5
            n_checked += 1
        prev = gen.tokens[:, t]
    assert n_checked > 100


# -- Hugging Face transformers' processors ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=1, bos_token_id=1,
                                  eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.15), (0.7, 8, 0.8, 0.1), (0.5, 3, 0.3, 0.6),
    (2.0, 40, 0.95, 0.02), (1.0, 1, 1.0, 0.0), (0.9, 0, 0.05, 0.0), (1.0, 0, 1.0, 1.0),
])
def test_filtered_logits_equal_those_of_transformers_generate(hf_model, temperature, top_k, top_p, min_p):
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    processors = hf_model._get_logits_processor(generation_config=config, input_ids_seq_length=1, device="cpu")
    names = [type(p).__name__ for p in processors]
    assert names == [n for n, on in [("TemperatureLogitsWarper", temperature != 1.0), ("TopKLogitsWarper", top_k > 0),
                                     ("TopPLogitsWarper", top_p < 1.0), ("MinPLogitsWarper", True)] if on]
    z = torch.randn(500, 40, generator=torch.Generator().manual_seed(7)) * 3.0
    theirs = processors(torch.zeros(500, 1, dtype=torch.long), z.clone())
    ours = filter_logits(z / temperature, top_k, top_p, min_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


# -- the defaults reproduce the unfiltered sampler -------------------------------------------------------------------

def _unfiltered_next_token(logits, temperature, greedy, generator, *filters):
    """The sampler before the filters existed: a draw from softmax(z / tau)."""
    assert not greedy
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _tiny_setup():
    task = AdditionTask(n_digits=2, eval_size=32)
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens, n_layer=1,
                    n_head=2, n_embd=32)
    return task, tiny_gpt(cfg, 0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_defaults_give_the_same_tokens_as_the_unfiltered_sampler(monkeypatch, use_cache):
    task, model = _tiny_setup()
    pairs = task.sample_train(16, torch.Generator().manual_seed(0))

    def run(**kw):
        return rollout(model, task, pairs, 4, task.max_new_tokens, temperature=0.8,
                       generator=torch.Generator().manual_seed(3), use_cache=use_cache, **kw)

    default = run()
    keep_all = run(top_k=task.vocab_size, top_p=1.0, min_p=0.0)  # the top-k path runs and removes nothing
    with monkeypatch.context() as m:
        m.setattr(rollout_module, "_next_token", _unfiltered_next_token)
        before = run()
    for other in (keep_all, before):
        assert torch.equal(default.response_ids, other.response_ids)
        assert torch.equal(default.sample_logp, other.sample_logp)
    filtered = run(top_k=2)  # and a filter does change the draws
    assert not torch.equal(default.response_ids, filtered.response_ids)


def test_the_trainer_samples_with_its_filters_and_its_old_logp_equals_the_sampling_logp():
    task, model = _tiny_setup()
    k = 2
    t = Trainer(model, task, TrainConfig(group_size=4, prompts_per_step=8, minibatches=2, ppo_epochs=1, eval_every=0,
                                         warmup_steps=0, top_k=k, temperature=1.2))
    batch = t.rollout()
    with torch.no_grad():
        old_logp, _ = response_logprobs(t.policy, batch, 1.2)
        p = batch.prompt_ids.shape[1]
        from grpo_ref.model import lm_logits
        logits = lm_logits(t.policy, batch.input_ids, batch.attention_mask)[:, p - 1 : -1]
    m = batch.response_mask > 0
    # every sampled token is among the k most likely of its position
    rank = (logits > logits.gather(-1, batch.response_ids[..., None])).sum(-1)
    assert bool((rank[m] < k).all())
    # the sampling log-prob is the full-vocabulary one: equal to pi_old (ratio 1 at the first update) ...
    assert torch.allclose(batch.sample_logp[m], old_logp[m], atol=1e-5)
    # ... and below the log-prob of the renormalised top-k distribution that was actually sampled
    top = (logits.float() / 1.2).topk(k, dim=-1).values
    filtered_logp = old_logp - torch.logsumexp(top, -1) + torch.logsumexp(logits.float() / 1.2, -1)
    assert bool((filtered_logp[m] > batch.sample_logp[m] + 1e-4).all())
    metrics = t.step()
    assert metrics["sampler_logp_gap"] < 1e-5


# -- bad input -----------------------------------------------------------------------------------------------------

BAD = [
    ("top_k", True, "top_k"), ("top_k", -1, "top_k"), ("top_k", 2.0, "top_k"), ("top_k", "3", "top_k"),
    ("top_p", float("nan"), "top_p"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("top_p", True, "top_p"),
    ("top_p", float("inf"), "top_p"),
    ("min_p", float("nan"), "min_p"), ("min_p", -0.1, "min_p"), ("min_p", 1.1, "min_p"), ("min_p", False, "min_p"),
]


@pytest.mark.parametrize("name,value,match", BAD)
def test_bad_filters_are_refused_naming_the_argument(name, value, match):
    task, model = _tiny_setup()
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=match) as e:
        generate(model, ids, torch.ones_like(ids), 3, eos_id=0, pad_id=0, **{name: value})
    assert repr(value).split("(")[0] in str(e.value) or str(value) in str(e.value)
    with pytest.raises(ValueError, match=match):
        rollout(model, task, task.sample_train(2, torch.Generator().manual_seed(0)), 2, 3, **{name: value})
    with pytest.raises(ValueError, match=f"TrainConfig.{match}"):
        TrainConfig(**{name: value})
