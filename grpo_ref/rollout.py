"""Sampling completions from the policy: ``G`` per prompt, with a KV cache, EOS stopping and right padding.

The outline in the original notebooks scored random token ids that the policy never produced, so its "policy gradient" pushed on
actions the policy did not take. Here every response token is *sampled from the policy* (at temperature ``tau``)
and its log-probability ``log softmax(z / tau)`` is kept (the distribution sampled, unless a top-k / top-p / min-p
filter is on: :func:`generate` says which log-prob that is).

Layout of a rollout batch (``B = n_prompts * G`` rows, the ``G`` completions of a prompt contiguous, the
convention of :mod:`grpo_ref.advantages`):

* ``prompt_ids, prompt_mask: [B, P]`` left-padded prompts;
* ``response_ids: [B, N]`` right-padded with ``pad_id`` after EOS;
* ``response_mask: [B, N]`` 1 on response tokens up to and including the first EOS (:func:`~grpo_ref.masks.response_mask`);
* ``sample_logp: [B, N]`` log-probs at sampling time (0 where the mask is 0).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ._checks import check_bool, check_choice, check_ids, check_int, check_mask, check_real, check_tensor
from .logprobs import _token_logprobs
from .masks import response_mask
from .model import lm_logits, position_ids_from_mask

TRUNCATION_MODES = ("keep", "mask", "penalize")


@dataclass
class Generation:
    """Output of :func:`generate`: ``tokens [B, N]`` (pad after EOS), ``logp [B, N]``, ``mask [B, N]``, ``finished [B]``."""

    tokens: torch.Tensor
    logp: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor


def check_sampling(top_k, top_p, min_p) -> Tuple[int, float, float]:
    """Validate the sampling filters (``ValueError`` naming the argument and value): ``top_k`` an int ``>= 0``
    (bool refused; 0 = off), ``top_p`` a finite number in ``(0, 1]`` (1 = off), ``min_p`` a finite number in
    ``[0, 1]`` (0 = off). NaN fails every range. Returns them as ``(int, float, float)``."""
    check_int("top_k", top_k, lo=0)
    top_p = check_real("top_p", top_p, lo=0.0, hi=1.0, lo_open=True)
    min_p = check_real("min_p", min_p, lo=0.0, hi=1.0)
    return int(top_k), top_p, min_p


def filter_logits(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus), then min-p filtering of temperature-scaled logits: ``[B, V] -> [B, V]`` with the
    removed entries set to ``-inf`` (the kept ones unchanged).

    The semantics of Hugging Face transformers' ``generate`` (``GenerationMixin._get_logits_processor`` builds, in
    this order, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper`` of
    ``transformers/generation/logits_process.py``, each with ``min_tokens_to_keep=1``), so ``scaled`` is
    ``z / tau``. Each filter sees the output of the one before it:

    * top-k (``top_k > 0``): keep the tokens whose logit is ``>=`` the ``k``-th largest (ties at the boundary are
      all kept); ``k`` larger than ``V`` keeps everything;
    * top-p (``top_p < 1``): sort the probabilities ``softmax(scaled)`` in ascending order and drop the tokens whose
      cumulative probability (themselves and every smaller one) is ``<= 1 - top_p``; the kept set is the smallest
      set of most likely tokens whose total probability is ``>= top_p``, and the most likely token is always kept;
    * min-p (``min_p > 0``): drop the tokens with ``p < min_p * p_max`` (``p`` renormalised after the filters
      before; the ratio ``p / p_max`` is the same either way); the most likely token is always kept.

    With the defaults (``0, 1.0, 0.0``) ``scaled`` is returned as it is.
    """
    out = scaled
    if top_k > 0:
        k = min(top_k, out.shape[-1])
        kth = out.topk(k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        asc, order = out.sort(dim=-1)
        drop_sorted = asc.softmax(-1).cumsum(-1) <= 1.0 - top_p
        drop_sorted[..., -1] = False  # the most likely token stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = out.softmax(-1)
        drop = probs < min_p * probs.amax(-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _next_token(logits: torch.Tensor, temperature: float, greedy: bool, generator: Optional[torch.Generator],
                top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """``[B, V]`` last-position logits -> ``[B]`` token ids: argmax if greedy, else a draw from
    ``softmax(filter_logits(z / tau, top_k, top_p, min_p))`` (:func:`filter_logits`)."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p, min_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: Optional[torch.Generator] = None,
    use_cache: Optional[bool] = None,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> Generation:
    """Autoregressive sampling of up to ``max_new_tokens`` tokens per row, stopping a row at its first EOS.

    Args:
        model: any causal LM (see :func:`grpo_ref.model.lm_logits`).
        prompt_ids: ``[B, P]`` integer ids of the prompts, left-padded.
        prompt_mask: ``[B, P]`` their 0/1 mask (0 on the left padding).
        max_new_tokens: an int ``>= 1``, the most tokens sampled per row.
        eos_id: the token that ends a row (kept, and its log-prob returned).
        pad_id: the token written after a row's EOS.
        temperature: ``tau > 0``; the log-probs returned are those of ``softmax(z / tau)`` (also when greedy).
        top_k: keep the ``k`` most likely tokens (0 = off).
        top_p: keep the smallest set of most likely tokens with probability ``>= p``, ``p`` in ``(0, 1]`` (1 = off).
        min_p: drop tokens with probability below ``min_p`` times the top token's, in ``[0, 1]`` (0 = off). The three
            filters are Hugging Face ``generate``'s, applied after the temperature (:func:`filter_logits`); at their
            defaults the samples are exactly the unfiltered sampler's. Ignored when ``greedy`` (the argmax is kept).
        greedy: take the argmax instead of sampling (evaluation).
        generator: the ``torch.Generator`` the draws come from (on the model's device); None = torch's global RNG.
        use_cache: reuse keys/values of the prefix (models with ``supports_kv_cache``, i.e. :class:`~grpo_ref.model.TinyGPT`);
            None = whenever the model supports it. Without it the whole prefix is recomputed for every new token.
    Returns:
        :class:`Generation`; finished rows are padded with ``pad_id`` and masked out after their EOS.

    Which log-probs: ``logp`` is ``log softmax(z / tau)`` over the *full* vocabulary at the sampled token, also when a
    filter is on, the convention of TRL 1.16.0 (``GRPOTrainer._get_per_token_logps_and_entropies`` scores through
    the LM head patched by ``trl/trainer/utils.py add_fused_lm_head(temperature=...)``, which divides by the
    temperature and applies no top-k/top-p/min-p) and of verl 0.9.1 (``verl/workers/engine/fsdp/transformer_impl.py``
    ``_scale_logits_by_temperature``: the logits divided by the temperature, nothing else). So it equals the trainer's recomputed ``old_logp`` and the ratio ``pi_theta / pi_old`` is
    exactly 1 before the first update. With a filter on it is *not* the log-probability of the distribution
    actually sampled: that one is ``logp - log(kept mass)`` on kept tokens (``>= logp``), and 0 probability elsewhere.

    Refused (``ValueError`` naming the argument): ``prompt_ids`` that are not integer ``[B, P]`` with
    ``B, P >= 1``; a ``prompt_mask`` of another shape, with values other than 0/1 or with a row of no token;
    ``max_new_tokens``, ``eos_id``, ``pad_id`` that are not ints (bool included) in range; ``temperature``
    NaN/inf/``<= 0``; ``top_k``, ``top_p``, ``min_p`` out of range (:func:`check_sampling`); ``greedy`` or
    ``use_cache`` not bools; ``generator`` not a ``torch.Generator``; logits of
    the model that are NaN/inf (:func:`grpo_ref.logprobs.token_logprobs`' checks).
    """
    _check_prompts(prompt_ids, prompt_mask)
    check_int("max_new_tokens", max_new_tokens, lo=1)
    check_int("eos_id", eos_id, lo=0)
    check_int("pad_id", pad_id, lo=0)
    temperature = check_real("temperature", temperature, lo=0.0, lo_open=True)
    top_k, top_p, min_p = check_sampling(top_k, top_p, min_p)
    check_bool("greedy", greedy)
    _check_generator(generator)
    if use_cache is not None:
        check_bool("use_cache", use_cache)
    prompt_ids = prompt_ids.long()
    cached = getattr(model, "supports_kv_cache", False) if use_cache is None else use_cache
    if cached and not getattr(model, "supports_kv_cache", False):
        raise ValueError(f"{type(model).__name__} has no KV cache support; use use_cache=False")
    b, dev = prompt_ids.shape[0], prompt_ids.device
    ids, attn = prompt_ids, prompt_mask.long()
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    tokens, logps = [], []
    past = None
    for step in range(max_new_tokens):
        if cached:
            new = ids if past is None else ids[:, -1:]
            pos = position_ids_from_mask(attn)[:, -new.shape[1]:]
            out = model(new, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        else:
            logits = lm_logits(model, ids, attn)[:, -1]
        if not bool(torch.isfinite(logits).all()):  # [B, V] per step: the sampler needs finite probabilities
            raise ValueError(f"the model's logits at generation step {step} contain NaN or inf")
        tok = _next_token(logits, temperature, greedy, generator, top_k, top_p, min_p)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        logps.append(torch.where(done, 0.0, _token_logprobs(logits, tok, temperature, 1024)))
        tokens.append(tok)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
    tokens_t = torch.stack(tokens, dim=1)
    mask = response_mask(tokens_t.shape[1], torch.zeros(b, dtype=torch.long, device=dev), tokens=tokens_t, eos_token_id=eos_id).to(dev)
    return Generation(tokens_t, torch.stack(logps, dim=1) * mask, mask, done)


def _check_prompts(prompt_ids, prompt_mask) -> None:
    check_tensor("prompt_ids", prompt_ids)
    if prompt_ids.dim() != 2 or 0 in prompt_ids.shape:
        raise ValueError(f"prompt_ids must be [B, P] with B, P >= 1, got shape {tuple(prompt_ids.shape)}")
    check_ids("prompt_ids", prompt_ids)
    check_tensor("prompt_mask", prompt_mask)
    if prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids and prompt_mask must be equal [B, P] shapes, got {tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    m = check_mask("prompt_mask", prompt_mask, "prompt_ids", prompt_ids)
    empty = m.sum(-1) == 0
    if bool(empty.any()):
        raise ValueError(f"prompt_mask has rows with no prompt token: {empty.nonzero()[:3, 0].tolist()}")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


@dataclass
class Rollout:
    """A batch of ``B = n_prompts * G`` sampled completions; shapes in the module docstring.

    ``pairs [B, 2]`` (the task's prompt data), ``rewards [B]``, ``correct [B]`` bool, ``truncated [B]`` bool (no EOS
    within the budget), ``loss_mask [B, N]`` (``response_mask`` with truncated rows zeroed if the trainer asks).
    """

    pairs: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    loss_mask: torch.Tensor
    sample_logp: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    truncated: torch.Tensor
    group_size: int

    @property
    def input_ids(self) -> torch.Tensor:
        """``[B, P + N]`` prompt and response, for the training forward pass."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, P + N]``, the prompt mask then the response mask (EOS included, padding after it excluded)."""
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout restricted to ``rows`` (a 1-D index or bool tensor); ``group_size`` unchanged."""
        kw: Dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        new: Dict[str, Any] = {k: (v[rows.to(v.device)] if torch.is_tensor(v) else v) for k, v in kw.items()}
        return Rollout(**new)

    @staticmethod
    def cat(parts: "list[Rollout]") -> "Rollout":
        """Concatenate rollouts along the batch (responses right-padded to the longest, prompts left-padded)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        n = max(p.response_ids.shape[1] for p in parts)
        pl = max(p.prompt_ids.shape[1] for p in parts)
        out = {}
        for f in fields(Rollout):
            if f.name == "group_size":
                continue
            vals = []
            for p in parts:
                v = getattr(p, f.name)
                if f.name in ("response_ids", "response_mask", "loss_mask", "sample_logp"):
                    v = torch.nn.functional.pad(v, (0, n - v.shape[1]))  # id 0 under mask 0: never attended to
                elif f.name in ("prompt_ids", "prompt_mask"):
                    v = torch.nn.functional.pad(v, (pl - v.shape[1], 0))
                vals.append(v)
            out[f.name] = torch.cat(vals, dim=0)
        return Rollout(**out, group_size=parts[0].group_size)


def rollout(
    model: nn.Module,
    task,
    pairs: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
    truncation: str = "keep",
    truncation_reward: float = -1.0,
    device: Optional[torch.device] = None,
    use_cache: Optional[bool] = None,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt of ``pairs`` and score them with ``task.score``.

    Args:
        model: the policy (any causal LM); put in eval mode for sampling and restored afterwards.
        task: an object with ``encode_prompts(pairs) -> (ids, mask)``, ``score(pairs, responses) -> (rewards,
            correct)`` and ``tokenizer.eos_id / pad_id`` (e.g. :class:`~grpo_ref.tasks.AdditionTask`).
        pairs: ``[n_prompts, ...]`` prompt data of the task.
        group_size: an int ``>= 1``, completions per prompt (contiguous rows).
        max_new_tokens: the most tokens sampled per completion.
        temperature: ``tau > 0`` of the sampling and of the returned log-probs.
        generator: the ``torch.Generator`` of the draws; None = torch's global RNG.
        truncation: what to do with completions that hit ``max_new_tokens`` without EOS: ``"keep"`` (train on
            them with the task's reward, 0 for the addition task), ``"mask"`` (zero their ``loss_mask``: no
            gradient from them, TRL's ``mask_truncated_completions``; their reward still enters the group
            statistics) or ``"penalize"`` (their reward becomes ``truncation_reward``).
        truncation_reward: the reward of a truncated completion under ``"penalize"``; finite.
        device: where the batch goes; default the model's device.
        use_cache: as in :func:`generate`.
        top_k: as in :func:`generate` (0 = off).
        top_p: as in :func:`generate` (1 = off).
        min_p: as in :func:`generate` (0 = off). With a filter on, ``sample_logp`` stays ``log softmax(z / tau)``
            over the full vocabulary (see :func:`generate`).
    Returns:
        :class:`Rollout` with ``B = n_prompts * group_size`` rows.

    Refused (``ValueError``): ``group_size`` not an int ``>= 1`` (bool included), ``pairs`` not a tensor with
    ``n_prompts >= 1`` rows, an unknown ``truncation``, a NaN/inf ``truncation_reward``, bad ``top_k`` / ``top_p`` /
    ``min_p``, and everything
    :func:`generate` refuses (``max_new_tokens``, ``temperature``, ...).
    """
    check_int("group_size", group_size, lo=1)
    check_choice("truncation", truncation, TRUNCATION_MODES)
    truncation_reward = check_real("truncation_reward", truncation_reward)
    _check_pairs(pairs)
    check_int("max_new_tokens", max_new_tokens, lo=1)
    check_real("temperature", temperature, lo=0.0, lo_open=True)
    top_k, top_p, min_p = check_sampling(top_k, top_p, min_p)
    if device is None:
        device = next(model.parameters()).device
    pairs = pairs.repeat_interleave(group_size, dim=0)
    prompt_ids, prompt_mask = task.encode_prompts(pairs)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        gen = generate(model, prompt_ids, prompt_mask, max_new_tokens, task.tokenizer.eos_id, task.tokenizer.pad_id,
                       temperature=temperature, generator=generator, use_cache=use_cache,
                       top_k=top_k, top_p=top_p, min_p=min_p)
    finally:
        model.train(was_training)
    rewards, correct = task.score(pairs, gen.tokens.cpu())
    truncated = ~gen.finished
    if truncation == "penalize":
        rewards = torch.where(truncated.cpu(), torch.full_like(rewards, truncation_reward), rewards)
    loss_mask = gen.mask * (~truncated).to(gen.mask.dtype)[:, None] if truncation == "mask" else gen.mask
    return Rollout(pairs, prompt_ids, prompt_mask, gen.tokens, gen.mask, loss_mask, gen.logp,
                   rewards.to(device), correct.to(device), truncated, group_size)


def _check_pairs(pairs) -> None:
    check_tensor("pairs", pairs)
    if pairs.dim() < 1 or pairs.shape[0] == 0:
        raise ValueError(f"pairs must hold at least one prompt ([n_prompts, ...]), got shape {tuple(pairs.shape)}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task,
    pairs: Optional[torch.Tensor] = None,
    batch_size: int = 512,
    device: Optional[torch.device] = None,
) -> Tuple[float, float]:
    """Greedy (argmax) accuracy and mean reward of ``model`` on ``pairs`` (default the task's eval split).

    Greedy decoding needs no random numbers, so evaluating never changes a run's random stream.
    ``pairs`` must have at least one row and ``batch_size`` be an int ``>= 1`` (``ValueError`` otherwise).
    """
    check_int("batch_size", batch_size, lo=1)
    if pairs is None:
        pairs = task.eval_pairs()
    _check_pairs(pairs)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, reward = 0.0, 0.0
    try:
        for start in range(0, pairs.shape[0], batch_size):
            chunk = pairs[start : start + batch_size]
            ids, mask = task.encode_prompts(chunk)
            gen = generate(model, ids.to(device), mask.to(device), task.max_new_tokens, task.tokenizer.eos_id,
                           task.tokenizer.pad_id, greedy=True)
            r, c = task.score(chunk, gen.tokens.cpu())
            correct += float(c.sum())
            reward += float(r.sum())
    finally:
        model.train(was_training)
    return correct / pairs.shape[0], reward / pairs.shape[0]
