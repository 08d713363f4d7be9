"""A tiny decoder-only transformer (GPT-style), a KV cache for it, and value models for PPO's critic.

The training loop never depends on this class: it accepts any causal LM that maps ``input_ids`` (and an
``attention_mask``) to logits, returned as a tensor or as an object with ``.logits`` (Hugging Face models
included); :func:`lm_logits` is the one adapter. The tiny model exists so that the book can train a real
policy on a 2-core CPU in minutes.

Padding convention used everywhere in grpo_ref: prompts are *left*-padded, responses *right*-padded, and the
position of a token is the number of non-pad tokens before it (``position_ids = cumsum(mask) - 1``), so a
prompt gets the same positions whatever padding its batch needed.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_ids, check_int, check_mask, check_real, check_tensor

# A KV cache: one (keys, values) pair per layer, each [B, n_head, T_past, head_dim].
KVCache = List[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GPTConfig:
    """Size of :class:`TinyGPT`. ``block_size`` is the longest sequence (prompt + response) it can see."""

    vocab_size: int = 16
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # True is an int in Python
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class LMOutput:
    """What :meth:`TinyGPT.forward` returns: ``logits [B, T, V]``, the updated cache if asked, the last hidden states."""

    logits: torch.Tensor
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[torch.Tensor] = None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` 0/1 mask -> ``[B, T]`` positions: number of real tokens before each one (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``x: [B, T_new, C]``, ``allowed: [B, 1, T_new, T_past + T_new]`` bool (True = may attend).

        Returns the output ``[B, T_new, C]`` and the keys/values of all ``T_past + T_new`` positions.
        """
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(y.transpose(1, 2).reshape(b, t, c)), (k, v)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, allowed, past=None):
        """``x: [B, T_new, C]`` -> ``(x', (k, v))``: the block's output ``[B, T_new, C]`` and the attention's key/value
        cache with the new positions appended (``allowed`` and ``past`` as in :meth:`CausalSelfAttention.forward`)."""
        a, kv = self.attn(self.ln1(x), allowed, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class TinyGPT(nn.Module):
    """Decoder-only transformer with learned positions and a KV cache (no dropout: the forward is deterministic).

    ``forward(input_ids [B, T], attention_mask [B, T] | None, position_ids | None, past_key_values | None,
    use_cache=False) -> LMOutput(logits [B, T, V], past_key_values, hidden_states [B, T, C])``.
    """

    supports_kv_cache = True

    def __init__(self, cfg: GPTConfig):
        if not isinstance(cfg, GPTConfig):
            raise ValueError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2 n_layer)
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
    ) -> LMOutput:
        """Args:
            input_ids: ``[B, T_new]`` token ids (the new tokens only when a cache is passed).
            attention_mask: ``[B, T_past + T_new]`` 0/1, 0 on padding; None = all ones.
            position_ids: ``[B, T_new]``; None = derived from ``attention_mask`` (see the module docstring).
            past_key_values: the cache returned by a previous call with ``use_cache=True``.

        Refused (``ValueError``): ``input_ids`` that are not ``[B, T_new]`` with ``B, T_new >= 1``, not integers
        (any integer dtype is accepted) or outside ``[0, vocab_size)``; an ``attention_mask`` of another shape or
        with values other than 0/1; ``position_ids`` outside ``[0, block_size)``.
        """
        h, new_cache = self._trunk(input_ids, attention_mask, position_ids, past_key_values)
        return LMOutput(self.lm_head(h), new_cache if use_cache else None, h)

    def final_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[B, T, C]`` the input of ``lm_head`` (after ``ln_f``), without computing the ``[B, T, V]`` logits:
        ``forward(...).logits == lm_head(final_hidden(...))`` exactly (same operations). Arguments and refusals as
        :meth:`forward` (no cache). The fused log-prob path (:func:`grpo_ref.fused_logprobs.token_logprobs_from_hidden`)
        reads this and ``lm_head.weight``."""
        return self._trunk(input_ids, attention_mask, position_ids, None)[0]

    def final_hidden_shared_prefix(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        rows: torch.Tensor,
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, P + S, C]`` what :meth:`final_hidden` gives for ``cat(prefix_ids[rows], suffix_ids)``, computing each
        distinct prefix once. ``prefix_ids, prefix_mask: [U, P]`` the distinct (left-padded) prompts; ``rows: [B]``
        int64 index of each row's prompt in ``[0, U)``; ``suffix_ids, suffix_mask: [B, S]`` the responses.

        Exact, not an approximation: under causal attention a prompt position never sees the response, so the ``U``
        prompts' hidden states and keys/values are those of all ``B`` rows; the responses then attend to the rows'
        copies of those keys/values (the KV-cache path of :meth:`forward`). Autograd sums the gradient of a shared
        prompt over the rows that use it. It saves the prompt positions of every row whose prompt appeared before: with
        ``G`` completions per prompt, ``(G - 1) / G`` of them. Values equal :meth:`final_hidden` up to float rounding
        (tests/test_shared_prefix.py)."""
        rows = check_ids("rows", rows)
        if rows.dim() != 1 or rows.numel() != suffix_ids.shape[0] or int(rows.max()) >= prefix_ids.shape[0]:
            raise ValueError(f"rows must be [B] = [{suffix_ids.shape[0]}] indices into the {prefix_ids.shape[0]} prefixes, "
                             f"got shape {tuple(rows.shape)}")
        h_prefix, cache = self._trunk(prefix_ids, prefix_mask, position_ids_from_mask(prefix_mask), None)
        past = [(k[rows], v[rows]) for k, v in cache]
        mask = torch.cat([prefix_mask[rows], suffix_mask.to(prefix_mask.dtype)], dim=1)
        h_suffix, _ = self._trunk(suffix_ids, mask, None, past)
        return torch.cat([h_prefix[rows], h_suffix], dim=1)

    def _trunk(self, input_ids, attention_mask, position_ids, past_key_values):
        """``(ln_f output [B, T_new, C], new cache)``: everything of :meth:`forward` but ``lm_head``."""
        check_tensor("input_ids", input_ids)
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be [B, T] with B, T >= 1, got shape {tuple(input_ids.shape)}")
        input_ids = check_ids("input_ids", input_ids, self.config.vocab_size)
        b, t_new = input_ids.shape
        t_past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        t_all = t_past + t_new
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(b, t_all, dtype=torch.long, device=dev)
        check_tensor("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != (b, t_all):
            raise ValueError(f"attention_mask must be [B, T_past + T_new] = [{b}, {t_all}], got {tuple(attention_mask.shape)}")
        check_mask("attention_mask", attention_mask, "attention_mask", attention_mask)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, t_past:]
        position_ids = check_ids("position_ids", position_ids)
        if tuple(position_ids.shape) != (b, t_new):
            raise ValueError(f"position_ids must be [B, T_new] = [{b}, {t_new}], got {tuple(position_ids.shape)}")
        if int(position_ids.max()) >= self.config.block_size or int(position_ids.min()) < 0:
            raise ValueError(f"position_ids must lie in [0, block_size={self.config.block_size}): sequence longer than block_size, got range [{int(position_ids.min())}, {int(position_ids.max())}]")
        # query i (absolute index t_past + i) may see key j if j <= t_past + i and key j is not padding;
        # it always sees itself, so a padding query never has an empty row (softmax of all -inf is NaN).
        q_idx = torch.arange(t_past, t_all, device=dev)[:, None]
        k_idx = torch.arange(t_all, device=dev)[None, :]
        allowed = (k_idx <= q_idx)[None] & attention_mask.bool()[:, None, :]
        allowed = (allowed | (k_idx == q_idx)[None])[:, None]  # [B, 1, T_new, T_all]

        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, allowed, None if past_key_values is None else past_key_values[i])
            new_cache.append(kv)
        return self.ln_f(x), new_cache


def tiny_gpt(config: GPTConfig, seed: int = 0) -> TinyGPT:
    """A freshly initialised :class:`TinyGPT`, seeded without touching torch's global random state.

    ``config`` must be a :class:`GPTConfig` and ``seed`` an int ``>= 0`` (``ValueError`` otherwise)."""
    if not isinstance(config, GPTConfig):
        raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
    seed = check_int("seed", seed, lo=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyGPT(config)


class ValueModel(nn.Module):
    """PPO's critic: a transformer body plus a scalar head, ``V(s_t)`` for every position.

    ``backbone`` is any causal LM (usually a copy of the policy: PPO-RLHF initialises the critic from a
    trained model). Its last hidden states are read from ``LMOutput.hidden_states`` (:class:`TinyGPT`) or by
    calling it with ``output_hidden_states=True`` (Hugging Face models). The head starts near zero
    (weights ``N(0, init_std)`` drawn from ``torch.Generator(seed)``, bias 0), so the first values are ~0 and do
    not swamp early advantages; torch's global random state is left alone.

    ``forward(input_ids [B, T], attention_mask [B, T]) -> values [B, T]`` (float32, or float64 for a float64 model).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, init_std: float = 1e-3, seed: int = 0):
        hidden_size = check_int("hidden_size", hidden_size, lo=1)
        init_std = check_real("init_std", init_std, lo=0.0)
        seed = check_int("seed", seed, lo=0)
        super().__init__()
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):
            self.v_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.v_head.weight, std=init_std, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_ids [B, T]`` (and an optional 0/1 ``attention_mask [B, T]``) -> values ``[B, T]``, float32 or wider:
        ``V(s_t)`` at every position, from the backbone's last hidden states."""
        return _scalar_head(self.v_head, last_hidden_state(self.backbone, input_ids, attention_mask))


class ValueHead(nn.Module):
    """A scalar value head ``[..., H] -> [...]`` (float32) on hidden states someone else computes: PPO's critic
    *sharing the policy's trunk* (``TrainConfig(critic="shared")``), the layout of the PPO agents that put a value head
    on the policy network (Schulman et al. 2017, section 5: one network with a combined loss
    ``L^CLIP - c_1 L^VF``; TRL's ``AutoModelForCausalLMWithValueHead``). ``forward(hidden [..., H]) -> [...]``.
    Initialised as :class:`ValueModel`'s head:
    weights ``N(0, init_std)`` from ``torch.Generator(seed)``, bias 0, torch's global random state untouched."""

    def __init__(self, hidden_size: int, init_std: float = 1e-3, seed: int = 0):
        hidden_size = check_int("hidden_size", hidden_size, lo=1)
        init_std = check_real("init_std", init_std, lo=0.0)
        seed = check_int("seed", seed, lo=0)
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            self.v_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.v_head.weight, std=init_std, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.v_head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H] -> values [...]``, computed in float32 or wider (bf16/fp16 hidden states are upcast)."""
        return _scalar_head(self.v_head, hidden)


def _scalar_head(linear: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``linear(hidden).squeeze(-1)`` in float32 or wider: the dtype of ``hidden``, of the head, or float32."""
    w, b = linear.weight, linear.bias
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, w.dtype), torch.float32)
    return F.linear(hidden.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).squeeze(-1)


def truncated_copy(model: nn.Module, n_layer: int) -> "TinyGPT":
    """A deep copy of a :class:`TinyGPT` that keeps only its first ``n_layer`` blocks (embeddings, those blocks, the
    final norm and head): the "smaller critic" initialised from the policy (``TrainConfig(critic_layers=k)``).
    ``ValueError`` for another model class or ``n_layer`` outside ``[1, model.config.n_layer]``."""
    if not isinstance(model, TinyGPT):
        raise ValueError(f"truncated_copy needs a TinyGPT (its blocks are known), got {type(model).__name__}")
    n_layer = check_int("n_layer", n_layer, lo=1)
    if n_layer > model.config.n_layer:
        raise ValueError(f"n_layer must be at most the model's n_layer = {model.config.n_layer}, got {n_layer}")
    small = copy.deepcopy(model)
    small.blocks = nn.ModuleList(list(small.blocks)[:n_layer])
    small.config = GPTConfig(**{**model.config.to_dict(), "n_layer": n_layer})
    return small


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], **extra):
    kwargs = dict(extra)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        if _accepts(model, "position_ids"):
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, **kwargs)


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits ``[B, T, V]`` of any causal LM: ``model(input_ids=..., attention_mask=..., position_ids=...)``.

    ``position_ids`` (from the mask, so left padding does not shift positions) is passed when the model's
    ``forward`` accepts it. The result may be a tensor, an object with ``.logits``, or a tuple whose first item
    is the logits; anything else raises ``TypeError``.
    """
    out = _call(model, input_ids, attention_mask)
    logits = out if torch.is_tensor(out) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        logits = out[0]
    if logits is None:
        raise TypeError(f"model returned {type(out).__name__}; expected logits as a tensor or an object with .logits")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits must be [B, T, V] with [B, T] = {tuple(input_ids.shape)}, got {tuple(logits.shape)}")
    return logits


def last_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, T, C]`` last-layer hidden states of :class:`TinyGPT` or of a Hugging Face causal LM."""
    if isinstance(model, TinyGPT):
        return _call(model, input_ids, attention_mask).hidden_states
    out = _call(model, input_ids, attention_mask, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        raise TypeError(f"{type(model).__name__} does not return hidden_states; pass your own critic module instead")
    return hidden[-1] if isinstance(hidden, (tuple, list)) else hidden


def hidden_size_of(model: nn.Module) -> int:
    """Width of the last hidden state: ``config.n_embd`` (TinyGPT, GPT-2) or ``config.hidden_size`` (Llama, most HF)."""
    cfg = getattr(model, "config", None)
    for name in ("n_embd", "hidden_size", "d_model"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}; build ValueModel(backbone, hidden_size) yourself")


# Hugging Face model types whose causal-LM forward is exactly ``logits = lm_head(base_model(...)[0])``: no logit
# scaling or soft-capping after the head (transformers 4.x/5.x GPT2LMHeadModel, LlamaForCausalLM, Mistral, Qwen2,
# Qwen3). Others (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling, ...) would give
# different log-probs from a fused head, so :func:`output_head` returns None for them and the trainer falls back
# to the logits.
#: Hugging Face ``config.model_type`` values whose output head the fused log-prob path reaches (logits = lm_head(h)).
FUSED_HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def output_head(model: nn.Module) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(weight [V, H], bias [V] | None)`` of the output embedding when the logits are exactly
    ``final_hidden_states(model, ...) @ weight.T + bias``, else None (then only :func:`lm_logits` applies).

    :class:`TinyGPT`: ``lm_head``. Hugging Face causal LMs of :data:`FUSED_HF_MODEL_TYPES` with a reachable
    ``get_output_embeddings()`` (an ``nn.Linear``) and a ``base_model`` distinct from the model. Anything else
    (other model types, wrappers, plain modules): None. Inspects the model only; runs nothing."""
    if isinstance(model, TinyGPT):
        return model.lm_head.weight, model.lm_head.bias
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in FUSED_HF_MODEL_TYPES:
        return None
    if any(getattr(cfg, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or not isinstance(base, nn.Module) or base is model:
        return None
    return head.weight, head.bias


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, T, H]`` the input of the output head (the rows :func:`output_head`'s weight multiplies), computed
    without the ``[B, T, V]`` logits: :meth:`TinyGPT.final_hidden`, or a Hugging Face model's ``base_model(...)``
    ``.last_hidden_state`` (after the final norm), with the ``position_ids`` :func:`lm_logits` passes. ``ValueError``
    for a model :func:`output_head` does not support."""
    if output_head(model) is None:
        raise ValueError(f"model {type(model).__name__} has no output head the fused path can use (see grpo_ref.model.output_head)")
    if isinstance(model, TinyGPT):
        pos = None if attention_mask is None else position_ids_from_mask(attention_mask)
        return model.final_hidden(input_ids, attention_mask, pos)
    out = _call(model.base_model, input_ids, attention_mask)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        hidden = out[0]
    if not torch.is_tensor(hidden) or hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"{type(model).__name__}.base_model did not return [B, T, H] hidden states for input_ids {tuple(input_ids.shape)}")
    return hidden
