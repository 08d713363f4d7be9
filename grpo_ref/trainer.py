"""The training loop: sample, score, compute advantages, then ``mu`` epochs of clipped minibatch updates.

One config field switches the algorithm: ``TrainConfig(algo="grpo")`` or ``"ppo"`` (or any preset of
:data:`grpo_ref.algorithms.PRESETS`). Everything algorithm-specific comes from the lead modules:
``get_preset`` builds the :class:`~grpo_ref.algorithms.AlgoConfig`, ``compute_advantages`` turns rewards into
advantages (GRPO: group-normalised; PPO: GAE over the critic's values with the KL in the reward), and
``compute_loss`` gives the loss (GRPO: clipped surrogate + k3 KL; PPO: clipped surrogate + clipped value loss).
The loop itself is the same for all of them:

1. draw ``prompts_per_step`` training prompts, sample ``G`` completions each from the current policy
   (``pi_old``), score them with the verifiable reward;
2. DAPO dynamic sampling if the preset asks (``filter_groups``): drop groups whose rewards are all equal and
   sample more prompts, up to ``filter_rounds`` times;
3. with no gradient: ``old_logp`` (recomputed with a full forward pass, the ratio's denominator),
   ``ref_logp`` from the frozen reference copy, and, for PPO, the critic's ``old_values``;
4. advantages (and PPO returns);
5. ``ppo_epochs`` passes over the batch in ``minibatches`` shuffled minibatches: forward, loss, backward,
   gradient clipping, optimizer step. From the second minibatch on ``pi_theta != pi_old``, so the ratio moves
   away from 1 and the clip acts (with one update per rollout, as in DeepSeekMath, it never would).

A step is all or nothing. The loss and gradient norms are checked before every optimizer step and the weights
after it (and before the step starts): a NaN/inf raises :class:`NonFiniteError` naming the step and the metric or
parameter. On that or any other failure inside :meth:`Trainer.step` (an exception in the reward, a
``KeyboardInterrupt``) the policy, critic, both optimizers, the step and optimizer-step counters, the history, the
random generators and, when ``ref_sync_every > 0`` (the step may move it), the reference are put back exactly as they
were before the step (from a copy taken at its start), then the error propagates.

Reproducible on CPU: all randomness comes from two ``torch.Generator`` objects the trainer owns, and a
checkpoint stores their states, so a resumed run equals the uninterrupted one exactly. Checkpoints carry a
SHA-256 and the task and model they belong to (:mod:`grpo_ref.checkpoint`); a load that fails leaves the trainer
as it was. ``metrics.jsonl`` always matches the checkpoint it is resumed from (:mod:`grpo_ref.metrics_log`).
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import os
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

import torch
from torch import nn

try:  # the math layer's "this tensor argument is NaN/inf" error (a ValueError carrying the argument's name)
    from ._checks import NonFiniteInputError
except ImportError:  # pragma: no cover - older math layer without it
    NonFiniteInputError = ()  # type: ignore[assignment,misc]
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .algorithms import GROUP_ESTIMATORS, PRESETS, AlgoConfig, LossInputs, compute_advantages, compute_loss, get_preset
from .fused_logprobs import token_logprobs_and_entropy_from_hidden, token_logprobs_from_hidden
from .logprobs import token_entropy, token_logprobs
from .masks import masked_mean
from .metrics_log import METRICS_FILE, load_metrics, sync_metrics
from .model import GPTConfig, TinyGPT, ValueHead, ValueModel, final_hidden_states, hidden_size_of, lm_logits, output_head, truncated_copy
from .rollout import TRUNCATION_MODES, Rollout, evaluate, rollout


def _progress_bar(**kwargs):
    """A tqdm bar if tqdm is installed, else None. Imported here, not at module level, so that
    ``import grpo_ref`` has no side effects (tqdm.auto warns on stderr in a kernel without ipywidgets)."""
    if not kwargs.get("disable"):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - exercised only without tqdm
            return None
        return tqdm(**kwargs)
    return None

#: The metrics that measure time, which differ between two runs of the same seed (every other metric must not).
TIME_METRICS = ("time_step_s", "time_rollout_s", "tokens_per_s")


#: The default note of a :class:`NonFiniteError`, for a failure caught and rolled back before the step took effect.
STEP_UNDONE = "the step was undone: weights, optimizers, random generators and step count are as before it"


class NonFiniteError(FloatingPointError):
    """A reward, loss, gradient or weight became NaN/inf. Raised by :meth:`Trainer.step` after undoing the step."""

    def __init__(self, step: int, metric: str, value: Optional[float], where: str = "", note: str = STEP_UNDONE,
                 detail: str = ""):
        self.step, self.metric, self.value = step, metric, value
        shown = "" if value is None else f" = {value}"
        super().__init__(f"step {step}: non-finite {metric}{shown}{where}{': ' + detail if detail else ''}; {note}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """``ValueError`` unless ``value`` fits the annotation ``hint`` (bool, int, float, str, or Optional of one);
    floats must be finite. Other annotations are left to the field's own checks."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return
        hint = args[0] if len(args) == 1 else None
    kinds = {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}
    if hint not in kinds:
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{name} must be {kinds[hint]}, got {value!r}")


def _check_device(device: Any) -> None:
    """``ValueError`` unless ``device`` names a device torch can use on this machine."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"invalid TrainConfig.device = {device!r}: expected a string such as 'cpu' or 'cuda'")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: unsupported device type {dev.type!r} (use cpu, cuda or mps)")


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model and the task; validated at construction (``ValueError``).

    ``algo`` names a preset of :data:`~grpo_ref.algorithms.PRESETS`; ``algo_overrides`` changes its fields
    (e.g. ``{"kl_coef": 0.0, "eps_high": 0.28}``). ``group_size`` (G) is copied into the preset.
    ``max_new_tokens=None`` takes the task's ``max_new_tokens``. ``eval_every=0`` disables evaluation.

    The defaults are tuned for ``AdditionTask(n_digits=2)`` and the 2x128 :class:`~grpo_ref.model.TinyGPT` on a CPU: G = 4
    completions for each of 64 prompts per step (more distinct prompts per step beat larger groups here),
    AdamW at 3e-4 with 20 warm-up steps (without warm-up, Adam's first sign-like steps knock the SFT policy
    down before it improves), ``mu = 2`` epochs of 4 minibatches. The optimizers are :func:`adamw` (torch's fused
    AdamW where the parameters allow it, as TRL's default).

    Sampling: ``top_k`` (0 = off), ``top_p`` in ``(0, 1]`` (1 = off), ``min_p`` in ``[0, 1]`` (0 = off) filter the
    distribution the rollout samples from, after the temperature, as Hugging Face ``generate`` (TRL 1.16.0
    ``GRPOConfig.top_k / top_p / min_p``); every log-prob the loss uses (sampling, ``pi_old``, ``pi_theta``,
    ``pi_ref``) stays ``log softmax(z / tau)`` over the full vocabulary, as in TRL and verl
    (:func:`grpo_ref.rollout.generate`).

    Reference updates (TR-DPO, Gorbatovski et al., arXiv 2404.09656; TRL 1.16.0 ``sync_ref_model=True`` with
    ``ref_model_sync_steps`` and ``ref_model_mixup_alpha``, whose defaults are 512 and 0.6): with
    ``ref_sync_every = N > 0``, after every ``N``-th *optimizer* step (counted over the whole run, ``ppo_epochs x
    minibatches`` per trainer step; TRL's ``SyncRefModelCallback.on_step_end`` tests ``state.global_step %
    ref_model_sync_steps == 0``, and the Hugging Face Trainer's ``global_step`` counts optimizer steps) every
    reference parameter becomes ``alpha * policy + (1 - alpha) * ref`` with ``alpha = ref_sync_alpha`` in ``(0, 1]``
    (1 = a copy). Parameters only, not buffers, as TRL's ``_sync_target_model``. The reference log-probs of a batch
    are computed once, before its updates, so a sync in the middle of a step first shows in the next step (TRL
    computes ``ref_per_token_logps`` at generation time too). ``ref_sync_every = 0`` never changes the reference.

    ``old_logp_source``: the ratio's denominator ``log pi_old``. ``"recompute"`` (default) runs the policy once more
    over the batch before the updates (TRL 1.16.0 and verl 0.9.1 always recompute when the batch is reused); the
    ``sampler_logp_gap`` metric then shows how far the sampler's log-probs are from it. ``"sampler"`` reuses the
    log-probs :func:`~grpo_ref.rollout.generate` recorded while sampling (``Rollout.sample_logp``) and skips that pass.
    It is the same quantity, not an approximation, because here the sampler *is* the policy: the same weights (no update
    happens between sampling and the loss's first minibatch), in eval mode (no dropout), at the same temperature,
    over the full vocabulary (also under ``top_k``/``top_p``/``min_p``); the two differ only by float rounding (the KV
    cache's incremental attention against one full pass; tests/test_trainer_critic.py asserts a ``sampler_logp_gap``
    below 1e-5 and the same update either way). It does *not* hold when another engine samples (vLLM in TRL's and verl's
    ``use_vllm`` set-ups: other kernels, often another precision), which is why those frameworks recompute.

    ``minibatch_order``: how each epoch splits the batch into ``minibatches``. ``"rows"`` (default) shuffles the rows,
    as TRL 1.16.0 does (``shuffle_sequence_dict`` on the generation batch, then ``split_tensor_dict`` into
    ``steps_per_generation`` parts), so a group's ``G`` completions usually land in different minibatches.
    ``"groups"`` shuffles the order of whole groups and keeps each group's rows together (every minibatch holds whole
    groups when the number of groups divides by ``minibatches``). The objective, the advantages and the expected
    update are the same; the minibatches differ, and with ``share_prompts`` a minibatch of whole groups holds
    ``G`` times fewer distinct prompts, so each pass over it costs less (``benchmarks/loop_vs_trl.py``). verl 0.9.1's
    actor does not shuffle at all by default (``actor.shuffle: false``).

    PPO's critic (``algo="ppo"``; ignored by the critic-free presets):

    * ``critic="separate"`` (default), PPO-RLHF's layout (Ouyang et al. 2022; TRL's ``PPOTrainer``, OpenRLHF, verl's
      ``critic`` worker): a second transformer, a copy of the policy with a :class:`~grpo_ref.model.ValueModel` head,
      its own AdamW at ``critic_lr``. It costs a second forward and backward per minibatch. ``critic_layers = k > 0``
      makes it smaller: the copy keeps only the policy's first ``k`` blocks
      (:func:`~grpo_ref.model.truncated_copy`; a :class:`~grpo_ref.model.TinyGPT` policy only).
    * ``critic="shared"``: a :class:`~grpo_ref.model.ValueHead` on the policy's own final hidden states (the value
      head on the policy network of Schulman et al. 2017, section 5, and of TRL's ``AutoModelForCausalLMWithValueHead``).
      One forward gives log-probs and values, and ``vf_coef`` times the value loss also trains the trunk (through
      the policy's optimizer; the head has its own at ``critic_lr``). Needs a model whose output head
      :func:`~grpo_ref.model.output_head` reaches.
    """

    algo: str = "grpo"
    algo_overrides: Dict[str, Any] = field(default_factory=dict)  # fields of the preset to change, {name: value}
    group_size: int = 4
    prompts_per_step: int = 64
    steps: int = 1000
    lr: float = 3e-4
    critic_lr: float = 1e-3
    warmup_steps: int = 20  # linear learning-rate warm-up over the first steps (both optimizers)
    weight_decay: float = 0.0
    ppo_epochs: int = 2  # mu: passes over each rollout batch
    minibatches: int = 4  # optimizer steps per epoch
    max_grad_norm: Optional[float] = 1.0
    temperature: float = 1.0
    max_new_tokens: Optional[int] = None
    truncation: str = "keep"  # "keep", "mask" or "penalize" (see grpo_ref.rollout.rollout)
    truncation_reward: float = -1.0
    filter_rounds: int = 4  # DAPO dynamic sampling: extra sampling rounds to refill dropped groups
    eval_every: int = 25
    seed: int = 0
    device: str = "cpu"
    use_cache: Optional[bool] = None  # KV cache when sampling; None = if the model supports it
    top_k: int = 0  # sampling filters after the temperature, Hugging Face generate's (grpo_ref.rollout.filter_logits)
    top_p: float = 1.0
    min_p: float = 0.0
    ref_sync_every: int = 0  # TR-DPO reference update every this many optimizer steps (0: never)
    ref_sync_alpha: float = 1.0  # ref <- alpha * policy + (1 - alpha) * ref
    logprob_path: str = "auto"  # "auto" (fused where the model allows), "fused" or "logits": see response_logprobs
    old_logp_source: str = "recompute"  # pi_old's log-probs: "recompute" (a forward pass) or "sampler" (see below)
    critic: str = "separate"  # PPO's critic: "separate" (its own transformer) or "shared" (a head on the policy trunk)
    critic_layers: int = 0  # separate critic: keep only the first k blocks of the policy copy (0: all of them)
    share_prompts: bool = True  # TinyGPT: each distinct prompt through the model once per pass (exact; response_hidden)
    minibatch_order: str = "rows"  # minibatches of shuffled rows (TRL) or of shuffled whole groups ("groups")

    def __post_init__(self) -> None:
        for name, hint in typing.get_type_hints(TrainConfig).items():
            _check_type(f"TrainConfig.{name}", getattr(self, name), hint)
        if not isinstance(self.algo, str) or self.algo not in PRESETS:
            raise ValueError(f"unknown algorithm {self.algo!r}; expected one of {sorted(PRESETS)}")
        if not isinstance(self.algo_overrides, dict):
            raise ValueError(f"algo_overrides must be a dict, got {type(self.algo_overrides).__name__}")
        known = {f.name for f in fields(AlgoConfig)}
        unknown = sorted(set(self.algo_overrides) - known)
        if unknown:
            raise ValueError(f"unknown algo_overrides {unknown}; AlgoConfig fields are {sorted(known)}")
        if "group_size" in self.algo_overrides:
            raise ValueError("set TrainConfig.group_size, not algo_overrides['group_size']")
        hints = typing.get_type_hints(AlgoConfig)
        for name, value in self.algo_overrides.items():
            _check_type(f"algo_overrides[{name!r}]", value, hints[name])
        preset = PRESETS[self.algo]
        if preset.adv_estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(
                f"algo {self.algo!r} uses group-relative advantages ({preset.adv_estimator}) and needs group_size >= 2, "
                f"got {self.group_size}"
            )
        checks = {
            "group_size": self.group_size >= 1,
            "prompts_per_step": self.prompts_per_step >= 1,
            "steps": self.steps >= 0,
            "lr": self.lr > 0,
            "critic_lr": self.critic_lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "ppo_epochs": self.ppo_epochs >= 1,
            "minibatches": 1 <= self.minibatches <= self.group_size * self.prompts_per_step,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "temperature": self.temperature > 0 and math.isfinite(self.temperature),
            "max_new_tokens": self.max_new_tokens is None or self.max_new_tokens >= 1,
            "filter_rounds": self.filter_rounds >= 0,
            "eval_every": self.eval_every >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p <= 1,
            "ref_sync_every": self.ref_sync_every >= 0,
            "ref_sync_alpha": 0 < self.ref_sync_alpha <= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid TrainConfig.{name} = {getattr(self, name)!r}")
        if self.old_logp_source not in OLD_LOGP_SOURCES:
            raise ValueError(f"unknown TrainConfig.old_logp_source {self.old_logp_source!r}; expected one of {OLD_LOGP_SOURCES}")
        if self.minibatch_order not in MINIBATCH_ORDERS:
            raise ValueError(f"unknown TrainConfig.minibatch_order {self.minibatch_order!r}; expected one of {MINIBATCH_ORDERS}")
        if self.critic not in CRITIC_MODES:
            raise ValueError(f"unknown TrainConfig.critic {self.critic!r}; expected one of {CRITIC_MODES}")
        if self.critic_layers < 0:
            raise ValueError(f"invalid TrainConfig.critic_layers = {self.critic_layers!r}; expected 0 (all layers) or a block count >= 1")
        if self.critic_layers and self.critic != "separate":
            raise ValueError(f"TrainConfig.critic_layers = {self.critic_layers} applies to critic='separate' only, got critic={self.critic!r}")
        if self.logprob_path not in LOGPROB_PATHS:
            raise ValueError(f"unknown TrainConfig.logprob_path {self.logprob_path!r}; expected one of {LOGPROB_PATHS}")
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"unknown truncation {self.truncation!r}; expected one of {TRUNCATION_MODES}")
        _check_device(self.device)
        try:
            self.algo_config()  # AlgoConfig validates eps, kl_coef, ... and raises ValueError
        except TypeError as e:
            raise ValueError(f"invalid algo_overrides {self.algo_overrides!r}: {e}") from None

    def algo_config(self) -> AlgoConfig:
        """The preset with ``group_size`` and the overrides applied."""
        return get_preset(self.algo, group_size=self.group_size, **self.algo_overrides)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (``dataclasses.asdict``), as written to ``config.json`` and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """The inverse of :meth:`to_dict`; an unknown key is a ``ValueError`` that lists it, a missing one takes
        its default."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**d)


LOGPROB_PATHS = ("auto", "fused", "logits")
OLD_LOGP_SOURCES = ("recompute", "sampler")
MINIBATCH_ORDERS = ("rows", "groups")
CRITIC_MODES = ("separate", "shared")


def response_logprobs(
    model: nn.Module, batch: Rollout, temperature: float, with_entropy: bool = False, path: str = "auto",
    share_prompts: bool = True,
) -> tuple:
    """Log-probs ``[B, N]`` of the response tokens under ``model`` (one forward pass over prompt + response) at
    ``temperature`` (TRL's convention: the
    logits are divided by the sampling temperature before the log-softmax, TRL 1.16.0 ``_get_per_token_logps``)
    and their entropies ``[B, N]`` (or None). Position ``P - 1 + t`` scores response token ``t``.

    ``path``:

    * ``"fused"``: the final hidden states ``[B, N, H]`` of those positions and the output embedding ``W [V, H]``
      (:func:`grpo_ref.model.output_head`) go to
      :func:`~grpo_ref.fused_logprobs.token_logprobs_and_entropy_from_hidden` (one chunked pass for log-probs
      and entropy), so the ``[B, T, V]`` logits are never held, in the forward or the backward (the
      approach of Liger-Kernel's fused linear losses and verl's ``use_fused_kernels``). ``ValueError`` if the
      model has no such head (see :data:`grpo_ref.model.FUSED_HF_MODEL_TYPES`).
    * ``"logits"``: the model's full logits ``[B, T, V]`` (:func:`grpo_ref.model.lm_logits`) then
      :func:`~grpo_ref.logprobs.token_logprobs` / :func:`~grpo_ref.logprobs.token_entropy`; works for any causal LM.
    * ``"auto"`` (default): ``"fused"`` when :func:`~grpo_ref.model.output_head` finds a head
      (:class:`~grpo_ref.model.TinyGPT`, Hugging Face GPT-2/Llama/Mistral/Qwen2/Qwen3), else ``"logits"``.

    Both paths give the same values and gradients up to float rounding (tests/test_trainer_fused_path.py).
    ``share_prompts``: on the fused path, compute each distinct prompt once (:func:`response_hidden`)."""
    if path not in LOGPROB_PATHS:
        raise ValueError(f"path must be one of {LOGPROB_PATHS}, got {path!r}")
    p = batch.prompt_ids.shape[1]
    head = None if path == "logits" else output_head(model)
    if head is None and path == "fused":
        raise ValueError(f"path='fused' but {type(model).__name__} has no output head the fused path can use "
                         "(grpo_ref.model.output_head); use path='logits' or 'auto'")
    if head is None:
        logits = lm_logits(model, batch.input_ids, batch.attention_mask)[:, p - 1 : -1]
        logp = token_logprobs(logits, batch.response_ids, temperature)
        return logp, (token_entropy(logits, temperature) if with_entropy else None)
    hidden = response_hidden(model, batch, share_prompts)
    return _logprobs_from_hidden(hidden, head, batch.response_ids, temperature, with_entropy, fused=True)


def response_hidden(model: nn.Module, batch: Rollout, share_prompts: bool = True) -> torch.Tensor:
    """``[B, N, H]`` the final hidden states of the positions that score the response tokens (``P - 1 + t`` for token
    ``t``). With ``share_prompts`` and a :class:`~grpo_ref.model.TinyGPT` whose batch repeats prompts (a group's ``G``
    completions share one), each distinct prompt goes through the model once
    (:meth:`~grpo_ref.model.TinyGPT.final_hidden_shared_prefix`, exact up to float rounding); otherwise one pass
    over every row (:func:`~grpo_ref.model.final_hidden_states`)."""
    p = batch.prompt_ids.shape[1]
    if share_prompts and isinstance(model, TinyGPT) and batch.prompt_ids.shape[0] > 1:
        keys = torch.cat([batch.prompt_ids, batch.prompt_mask.to(batch.prompt_ids.dtype)], dim=1)
        uniq, rows = torch.unique(keys, dim=0, return_inverse=True)
        if uniq.shape[0] < keys.shape[0]:
            hidden = model.final_hidden_shared_prefix(uniq[:, :p], uniq[:, p:].to(batch.prompt_mask.dtype), rows,
                                                      batch.response_ids, batch.response_mask.long())
            return hidden[:, p - 1 : -1]
    return final_hidden_states(model, batch.input_ids, batch.attention_mask)[:, p - 1 : -1]


def _logprobs_from_hidden(hidden, head, tokens, temperature, with_entropy, fused):
    weight, bias = head
    if not fused:
        logits = torch.nn.functional.linear(hidden, weight, bias)
        logp = token_logprobs(logits, tokens, temperature)
        return logp, (token_entropy(logits, temperature) if with_entropy else None)
    if with_entropy:
        return token_logprobs_and_entropy_from_hidden(hidden, weight, tokens, temperature, bias)
    return token_logprobs_from_hidden(hidden, weight, tokens, temperature, bias), None


def response_logprobs_and_values(
    model: nn.Module, value_head: nn.Module, batch: Rollout, temperature: float, with_entropy: bool = False,
    path: str = "auto", share_prompts: bool = True,
) -> tuple:
    """PPO with a critic on the policy's trunk (``TrainConfig(critic="shared")``): ``(logp [B, N], entropy [B, N] |
    None, values [B, N])`` from *one* pass of the policy's trunk. The final hidden states ``[B, N, H]`` of the positions
    that score the response go both to the output head (log-probs as :func:`response_logprobs`, fused unless
    ``path="logits"``) and to ``value_head`` (``[B, N, H] -> [B, N]``, e.g. :class:`~grpo_ref.model.ValueHead`), so
    the values are those :func:`response_values` would give for a critic reading the same hidden states, and the
    value loss's gradient reaches the trunk. ``ValueError`` if :func:`~grpo_ref.model.output_head` finds no head."""
    if path not in LOGPROB_PATHS:
        raise ValueError(f"path must be one of {LOGPROB_PATHS}, got {path!r}")
    head = output_head(model)
    if head is None:
        raise ValueError(f"a shared critic needs the policy's final hidden states, and {type(model).__name__} has no output "
                         "head grpo_ref.model.output_head reaches; use TrainConfig(critic='separate')")
    hidden = response_hidden(model, batch, share_prompts)
    logp, entropy = _logprobs_from_hidden(hidden, head, batch.response_ids, temperature, with_entropy, fused=path != "logits")
    return logp, entropy, value_head(hidden)


def response_values(critic: nn.Module, batch: Rollout) -> torch.Tensor:
    """Critic values ``[B, N]``: ``V`` of the state before each response token (same shift as the logits)."""
    p = batch.prompt_ids.shape[1]
    return critic(batch.input_ids, batch.attention_mask)[:, p - 1 : -1]


def _group_has_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[n_groups]`` bool: the group's rewards are not all equal (DAPO keeps only these)."""
    g = rewards.view(-1, group_size)
    return g.amax(-1) > g.amin(-1)


class Trainer:
    """PPO/GRPO trainer for a causal LM on a verifiable task.

    Args:
        policy: any causal LM (``input_ids, attention_mask -> logits`` or ``.logits``); trained in place.
        task: e.g. :class:`~grpo_ref.tasks.AdditionTask` (``sample_train``, ``encode_prompts``, ``score``,
            ``eval_pairs``, ``tokenizer``, ``max_new_tokens``; ``process_rewards`` for ``adv_estimator='process'``,
            as :class:`~grpo_ref.chain_task.ChainSumTask` has).
        config: :class:`TrainConfig`.
        critic: PPO's value model. With ``config.critic="separate"`` a module ``(input_ids, attention_mask) -> [B, T]``;
            default a :class:`~grpo_ref.model.ValueModel` on a copy of the policy (its first ``critic_layers``
            blocks if set) with a near-zero head. With ``"shared"`` a head ``hidden [B, N, H] -> [B, N]`` on the
            policy's final hidden states; default a :class:`~grpo_ref.model.ValueHead`.
        reference: the frozen reference policy of the KL term; default a copy of ``policy`` as given.

    Use: ``metrics = trainer.step()`` (one rollout + update), ``trainer.train(out_dir=...)``,
    ``trainer.evaluate()``, ``trainer.save(path)`` / ``trainer.load(path)``.
    """

    def __init__(
        self,
        policy: nn.Module,
        task,
        config: TrainConfig,
        critic: Optional[nn.Module] = None,
        reference: Optional[nn.Module] = None,
    ):
        self.config = config
        self.algo = config.algo_config()
        self.task = task
        self.device = torch.device(config.device)
        self.max_new_tokens = config.max_new_tokens or task.max_new_tokens
        if self.algo.adv_estimator == "process" and not callable(getattr(task, "process_rewards", None)):
            raise ValueError(f"adv_estimator='process' needs a task with per-step rewards (process_rewards(problems, "
                             f"responses)), got a {type(task).__name__}")
        self.policy = policy.to(self.device)
        self.reference = (copy.deepcopy(policy) if reference is None else reference).to(self.device)
        self.reference.eval().requires_grad_(False)
        if config.ref_sync_every:
            _check_same_parameters(self.policy, self.reference)
        self.uses_critic = self.algo.loss_fn == "ppo"
        self.shared_critic = self.uses_critic and config.critic == "shared"
        self.critic = None
        if self.uses_critic:
            if critic is None:
                critic = self._default_critic(policy, config)
            self.critic = critic.to(self.device)
        self.optimizer = adamw(self.policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.critic_optimizer = adamw(self.critic.parameters(), lr=config.critic_lr, weight_decay=config.weight_decay) if self.critic else None
        # Two generators: prompts and minibatch shuffles on the CPU (device independent), token draws on the device.
        self.prompt_generator = torch.Generator().manual_seed(config.seed)
        self.sample_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.step_count = 0
        self.optimizer_steps = 0  # policy optimizer steps over the whole run (the clock of ref_sync_every)
        self.history: List[Dict[str, float]] = []
        self._where = ""  # the minibatch being updated, for error messages

    @staticmethod
    def _default_critic(policy: nn.Module, config: TrainConfig) -> nn.Module:
        if config.critic == "shared":
            if output_head(policy) is None:
                raise ValueError(f"TrainConfig.critic='shared' needs the policy's final hidden states, and {type(policy).__name__} "
                                 "has no output head grpo_ref.model.output_head reaches; use critic='separate'")
            return ValueHead(hidden_size_of(policy), seed=config.seed)
        backbone = truncated_copy(policy, config.critic_layers) if config.critic_layers else copy.deepcopy(policy)
        return ValueModel(backbone, hidden_size_of(policy), seed=config.seed)

    def policy_pass(self, batch: Rollout, with_entropy: bool = False) -> tuple:
        """``(logp, entropy | None, values | None)``, each ``[B, N]``: the policy's log-probs of ``batch`` and, for PPO,
        the critic's values (a shared critic reads the same forward pass: :func:`response_logprobs_and_values`)."""
        cfg = self.config
        if self.shared_critic:
            return response_logprobs_and_values(self.policy, self.critic, batch, cfg.temperature, with_entropy, cfg.logprob_path,
                                                cfg.share_prompts)
        logp, entropy = response_logprobs(self.policy, batch, cfg.temperature, with_entropy=with_entropy, path=cfg.logprob_path,
                                          share_prompts=cfg.share_prompts)
        return logp, entropy, (response_values(self.critic, batch) if self.critic is not None else None)

    # -- pieces a notebook can call one at a time -------------------------------------------------------------------
    def rollout(self, pairs: Optional[torch.Tensor] = None) -> Rollout:
        """Sample ``G`` completions for ``pairs`` (default: ``prompts_per_step`` fresh training prompts)."""
        cfg = self.config
        if pairs is None:
            pairs = self.task.sample_train(cfg.prompts_per_step, self.prompt_generator)
        return rollout(self.policy, self.task, pairs, cfg.group_size, self.max_new_tokens, cfg.temperature,
                       self.sample_generator, cfg.truncation, cfg.truncation_reward, self.device, cfg.use_cache,
                       top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p)

    def sync_reference(self) -> None:
        """TR-DPO's soft update of the reference, in place: ``ref <- alpha * policy + (1 - alpha) * ref`` for every
        parameter (``alpha = config.ref_sync_alpha``; alpha = 1 copies the policy exactly). TRL 1.16.0
        ``SyncRefModelCallback._sync_target_model`` (parameters only, paired in order; here paired by name)."""
        alpha = self.config.ref_sync_alpha
        ref = dict(self.reference.named_parameters())
        with torch.no_grad():
            for name, p in self.policy.named_parameters():
                ref[name].mul_(1.0 - alpha).add_(p.detach(), alpha=alpha)

    def _after_optimizer_step(self) -> None:
        """Count the optimizer step; every ``ref_sync_every``-th one syncs the reference (TRL: ``global_step % N == 0``)."""
        self.optimizer_steps += 1
        n = self.config.ref_sync_every
        if n and self.optimizer_steps % n == 0:
            self.sync_reference()

    def evaluate(self, pairs: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Greedy accuracy and mean reward on the eval split (or ``pairs``): ``{"eval_accuracy", "eval_reward"}``."""
        acc, rew = evaluate(self.policy, self.task, pairs, device=self.device)
        return {"eval_accuracy": acc, "eval_reward": rew}

    def _sample_batch(self) -> tuple:
        """A rollout batch; with DAPO's ``filter_groups``, only groups with reward variance, refilled by resampling."""
        batch = self.rollout()
        n_sampled = batch.rewards.numel()
        if not self.algo.filter_groups:
            return batch, n_sampled, float(_group_has_signal(batch.rewards, self.config.group_size).float().mean())
        g, want = self.config.group_size, self.config.prompts_per_step
        kept = [batch.select(_group_has_signal(batch.rewards, g).repeat_interleave(g))]
        first_frac = float(_group_has_signal(batch.rewards, g).float().mean())
        for _ in range(self.config.filter_rounds):
            if sum(k.rewards.numel() for k in kept) >= want * g:
                break
            extra = self.rollout()
            n_sampled += extra.rewards.numel()
            kept.append(extra.select(_group_has_signal(extra.rewards, g).repeat_interleave(g)))
        batch = Rollout.cat(kept)
        return batch.select(torch.arange(min(batch.rewards.numel(), want * g), device=self.device)), n_sampled, first_frac

    def _check(self, name: str, value: torch.Tensor, where: str = "") -> None:
        if not bool(torch.isfinite(value).all()):
            bad = value[~torch.isfinite(value)].flatten()[0].item()
            raise NonFiniteError(self.step_count + 1, name, bad, where)

    def _models(self):
        return [("policy", self.policy)] + ([("critic", self.critic)] if self.critic is not None else [])

    def _check_params(self, step: int, where: str, note: str = STEP_UNDONE) -> None:
        """``NonFiniteError`` naming the first NaN/inf parameter of the policy or critic. One reduction per tensor
        and a single sync on the fast path; the tensors are searched only if a sum is non-finite."""
        for label, model in self._models():
            params = [p.detach() for p in model.parameters()]
            if not params or bool(torch.isfinite(torch.stack([p.sum(dtype=torch.float32) for p in params])).all()):
                continue
            for name, p in model.named_parameters():  # a sum may also overflow: only a non-finite entry counts
                bad = ~torch.isfinite(p.detach())
                if bool(bad.any()):
                    raise NonFiniteError(step, f"{label} parameter {name}", p.detach()[bad].flatten()[0].item(), where, note)

    # -- all-or-nothing --------------------------------------------------------------------------------------------
    def _snapshot(self, with_reference: bool = False) -> Dict[str, Any]:
        """Copies of everything a step (or a load) changes, to undo it: parameters, buffers and optimizer states
        cloned on their device, generator states, step count and history."""
        def clone(model):
            tensors = [*model.parameters(), *model.buffers()]
            return tensors, [t.detach().clone() for t in tensors]

        snap: Dict[str, Any] = {
            "models": {label: clone(m) for label, m in self._models()},
            "optimizer": _copy_optimizer_state(self.optimizer),
            "critic_optimizer": _copy_optimizer_state(self.critic_optimizer) if self.critic_optimizer else None,
            "rng": (self.prompt_generator.get_state(), self.sample_generator.get_state(), torch.get_rng_state()),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "step_count": self.step_count,
            "optimizer_steps": self.optimizer_steps,
            "history": (self.history, len(self.history)),  # a step only appends; a load replaces the list
        }
        if with_reference:
            snap["models"]["reference"] = clone(self.reference)
        return snap

    def _restore(self, snap: Dict[str, Any]) -> None:
        """Put back what :meth:`_snapshot` copied (in place: parameters keep their identity)."""
        with torch.no_grad():
            for tensors, saved in snap["models"].values():
                for t, s in zip(tensors, saved):
                    t.copy_(s)
        self.optimizer.load_state_dict(snap["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(snap["critic_optimizer"])
            self.critic_optimizer.zero_grad(set_to_none=True)
        prompt, sample, cpu = snap["rng"]
        self.prompt_generator.set_state(prompt)
        self.sample_generator.set_state(sample)
        torch.set_rng_state(cpu)
        if snap["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(snap["cuda_rng"])
        self.step_count = snap["step_count"]
        self.optimizer_steps = snap["optimizer_steps"]
        self.history, n = snap["history"]
        del self.history[n:]

    # -- one step ------------------------------------------------------------------------------------------------------
    def step(self) -> Dict[str, float]:
        """One rollout batch and ``ppo_epochs x minibatches`` updates. Returns this step's metrics (also appended
        to ``self.history``), all floats:

        * rollout: ``reward_mean``, ``reward_std``, ``train_accuracy`` (sampled at ``temperature``),
          ``response_length``, ``response_length_correct`` / ``response_length_incorrect`` (means over the right /
          wrong completions; a key is absent from a step that sampled none of that kind), ``truncated_frac``,
          ``samples`` (completions sampled, DAPO refills included),
          ``groups_with_signal`` (share of groups with unequal rewards), ``batch_size``;
        * policy (means over the updates): ``loss``, ``pg_loss``, ``clip_frac_low``, ``clip_frac_high``,
          ``approx_kl`` (to ``pi_old``), ``kl_ref`` (the preset's estimator, to ``pi_ref``), ``entropy``,
          ``ratio_mean/min/max``, ``grad_norm`` (before clipping); PPO adds ``vf_loss``, ``vf_clip_frac``,
          ``value_mean``, ``critic_grad_norm``;
        * ``kl_to_ref``: k1 estimate of ``KL(pi_old || pi_ref)`` per response token, ``adv_abs_mean``,
          ``sampler_logp_gap`` (mean absolute difference between the sampling log-prob and the recomputed one: ~1e-7 unless sampler and
          trainer disagree);
        * ``time_step_s``, ``time_rollout_s``, ``tokens_per_s`` (sampled response tokens per second of the step);
        * every ``eval_every`` steps: ``eval_accuracy``, ``eval_reward`` (greedy decoding, eval split).

        All or nothing: if anything raises (``NonFiniteError``, an error in the reward, ``KeyboardInterrupt``),
        the trainer is first put back exactly as it was before the call.
        """
        snap = self._snapshot(with_reference=bool(self.config.ref_sync_every))  # a sync changes the reference
        self._where = ""
        try:
            return self._step()
        except NonFiniteInputError as e:  # raised by the math layer (e.g. NaN logits): name the step
            self._restore(snap)
            raise NonFiniteError(self.step_count + 1, getattr(e, "name", "input"), None, self._where, detail=str(e)) from e
        except BaseException:
            self._restore(snap)
            raise

    def _step(self) -> Dict[str, float]:
        cfg, algo = self.config, self.algo
        self._check_params(self.step_count + 1, " before the step (changed outside the trainer?)")
        # Dropout off (TRL's disable_dropout): the sampler, pi_old and pi_theta must be one and the same function,
        # otherwise the ratio pi_theta / pi_old is noise even before any update.
        self.policy.eval()
        if self.critic is not None:
            self.critic.eval()
        t0 = time.perf_counter()
        batch, n_sampled, signal_frac = self._sample_batch()
        t_rollout = time.perf_counter() - t0
        metrics: Dict[str, float] = {"step": self.step_count + 1}
        self._check("reward", batch.rewards)
        sampled_tokens = float(batch.response_mask.sum())
        if batch.rewards.numel() == 0:  # DAPO: every group was flat, nothing to learn from
            metrics.update(skipped=1.0, samples=float(n_sampled), groups_with_signal=signal_frac)
            return self._finish(metrics, t0, t_rollout, sampled_tokens)

        self._set_lr()
        mask = batch.loss_mask
        from_sampler = cfg.old_logp_source == "sampler"
        with torch.no_grad():
            if from_sampler and not self.shared_critic:  # the sampler's own log-probs (see TrainConfig): no policy pass
                old_logp = batch.sample_logp
                old_values = response_values(self.critic, batch) if self.critic is not None else None
            else:
                old_logp, _, old_values = self.policy_pass(batch)
                if from_sampler:
                    old_logp = batch.sample_logp
            ref_logp, _ = response_logprobs(self.reference, batch, cfg.temperature, path=cfg.logprob_path,
                                            share_prompts=cfg.share_prompts)
        self._check("old_logp", old_logp[mask > 0])
        steps = None
        if algo.adv_estimator == "process":  # DeepSeekMath process supervision: the task scores every step
            steps = tuple(x.to(self.device) for x in self.task.process_rewards(batch.pairs, batch.response_ids.cpu()))
            self._check("step_rewards", steps[0][steps[2] > 0])
        adv, returns = compute_advantages(algo, batch.rewards, mask, old_logp=old_logp, ref_logp=ref_logp,
                                          values=old_values, steps=steps)
        self._check("advantages", adv)

        b = batch.rewards.numel()
        n_mb = min(cfg.minibatches, b)
        extra: Dict[str, float] = {}
        if getattr(algo, "global_token_norm", False):
            extra["num_tokens"] = global_token_normaliser(mask, n_mb)
        sums: Dict[str, float] = {}
        grad_norms, critic_norms = [], []
        for epoch in range(cfg.ppo_epochs):
            perm = minibatch_permutation(b, cfg.group_size, cfg.minibatch_order, self.prompt_generator).to(self.device)
            for k, rows in enumerate(perm.chunk(n_mb)):
                mb = batch.select(rows)
                where = self._where = f" (epoch {epoch}, minibatch {k})"
                logp, entropy, values = self.policy_pass(mb, with_entropy=True)
                inp = LossInputs(
                    logp=logp, old_logp=old_logp[rows], advantages=adv[rows], mask=mask[rows], ref_logp=ref_logp[rows],
                    entropy=entropy, values=values,
                    old_values=None if old_values is None else old_values[rows],
                    returns=None if returns is None else returns[rows], **extra,
                )
                loss, loss_metrics = compute_loss(inp, algo)
                self._check("loss", loss.detach(), where)
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic_optimizer is not None:
                    self.critic_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = self._clip(self.policy)
                self._check("grad_norm", grad_norm, where)
                if self.critic is not None:
                    critic_norm = self._clip(self.critic)
                    self._check("critic_grad_norm", critic_norm, where)
                    critic_norms.append(float(critic_norm))
                self.optimizer.step()
                if self.critic_optimizer is not None:
                    self.critic_optimizer.step()
                self._after_optimizer_step()
                self._check_params(self.step_count + 1, f" after the optimizer step{where}")
                grad_norms.append(float(grad_norm))
                for name, v in loss_metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(v)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        n_updates = cfg.ppo_epochs * n_mb
        metrics.update({name: v / n_updates for name, v in sums.items()})
        m = batch.response_mask
        metrics.update(
            reward_mean=float(batch.rewards.mean()),
            reward_std=float(batch.rewards.std()) if b > 1 else 0.0,
            train_accuracy=float(batch.correct.float().mean()),
            response_length=float(m.sum(-1).mean()),
            truncated_frac=float(batch.truncated.float().mean()),
            kl_to_ref=float(masked_mean(old_logp - ref_logp, mask)),  # k1 estimate of KL(pi_old || pi_ref)
            adv_abs_mean=float(masked_mean(adv.abs(), mask)),
            grad_norm=sum(grad_norms) / len(grad_norms),
            samples=float(n_sampled),
            groups_with_signal=signal_frac,
            batch_size=float(b),
        )
        lengths = m.sum(-1)
        for name, rows in (("response_length_correct", batch.correct), ("response_length_incorrect", ~batch.correct)):
            if bool(rows.any()):
                metrics[name] = float(lengths[rows].mean())
        if not from_sampler:  # with old_logp_source="sampler" the gap is 0 by construction
            metrics["sampler_logp_gap"] = float(masked_mean((old_logp - batch.sample_logp).abs(), mask))
        if critic_norms:
            metrics["critic_grad_norm"] = sum(critic_norms) / len(critic_norms)
        return self._finish(metrics, t0, t_rollout, sampled_tokens)

    def _set_lr(self) -> None:
        """Linear warm-up: step ``k`` (1-based) uses ``lr * min(1, k / warmup_steps)``; a function of the step alone."""
        w = self.config.warmup_steps
        scale = min(1.0, (self.step_count + 1) / w) if w else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale
        if self.critic_optimizer is not None:
            for group in self.critic_optimizer.param_groups:
                group["lr"] = self.config.critic_lr * scale

    def _clip(self, model: nn.Module) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _finish(self, metrics: Dict[str, float], t0: float, t_rollout: float, sampled_tokens: float) -> Dict[str, float]:
        self.step_count += 1
        elapsed = time.perf_counter() - t0
        metrics.update(time_step_s=elapsed, time_rollout_s=t_rollout, tokens_per_s=sampled_tokens / max(elapsed, 1e-9))
        if self.config.eval_every and self.step_count % self.config.eval_every == 0:
            metrics.update(self.evaluate())
        self.history.append(metrics)
        return metrics

    # -- the loop --------------------------------------------------------------------------------------------------
    def train(
        self,
        steps: Optional[int] = None,
        out_dir: Optional[str] = None,
        progress: bool = True,
        checkpoint_every: int = 0,
        stop_at_accuracy: Optional[float] = None,
    ) -> List[Dict[str, float]]:
        """Run until ``steps`` (default ``config.steps``) steps have been taken in total.

        Writes ``metrics.jsonl`` (one JSON object per step) and, if ``checkpoint_every > 0``, ``checkpoint.pt`` into
        ``out_dir``. A trainer with a history (resumed from a checkpoint) first rewrites ``metrics.jsonl`` to hold
        exactly that history: steps logged after the checkpoint by a killed run, or a half-written last line, are
        dropped with a warning, so no step is repeated or lost. Evaluates once before the first step (logged as
        step 0). ``stop_at_accuracy`` ends the run at the first evaluation that reaches it. Returns ``self.history``.
        """
        total = self.config.steps if steps is None else steps
        if not isinstance(total, numbers.Integral) or isinstance(total, bool) or total < 0:
            raise ValueError(f"steps must be an int >= 0, got {total!r}")
        log = None
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, METRICS_FILE)
            if self.history:
                sync_metrics(path, self.history)
            log = open(path, "a" if self.history else "w")
        try:
            if self.step_count == 0 and not self.history and self.config.eval_every:
                first = {"step": 0, **self.evaluate()}
                self.history.append(first)
                if log:
                    log.write(json.dumps(first) + "\n")
            bar = _progress_bar(total=total, initial=self.step_count, disable=not progress, desc=self.config.algo)
            while self.step_count < total:
                m = self.step()
                if log:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: round(m[k], 3) for k in ("reward_mean", "eval_accuracy", "kl_to_ref") if k in m})
                elif progress and (self.step_count % 10 == 0 or self.step_count == total):
                    print(f"step {self.step_count}/{total} " + " ".join(f"{k}={m[k]:.3f}" for k in ("reward_mean", "eval_accuracy") if k in m), flush=True)
                if out_dir is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                    self.save(os.path.join(out_dir, "checkpoint.pt"))
                if stop_at_accuracy is not None and m.get("eval_accuracy", -1.0) >= stop_at_accuracy:
                    break
            if bar is not None:
                bar.close()
        finally:
            if log:
                log.close()
        return self.history

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """All state, as tensors and plain containers (loadable with ``torch.load(..., weights_only=True)``), with
        the task and the model classes it belongs to (``fingerprint``)."""
        rng = {
            "prompt": self.prompt_generator.get_state(),
            "sample": self.sample_generator.get_state(),
            "torch_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        model_config = self.policy.config.to_dict() if isinstance(self.policy, TinyGPT) else None
        return {
            "format": 1,
            "step": self.step_count,
            "optimizer_steps": self.optimizer_steps,
            "config": self.config.to_dict(),
            "task": self.task.to_dict() if hasattr(self.task, "to_dict") else None,
            "model_config": model_config,
            "policy": self.policy.state_dict(),
            "reference": self.reference.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer is not None else None,
            "rng": rng,
            "history": self.history,
            "fingerprint": {"task_type": _qualname(self.task), "policy_type": _qualname(self.policy)},
        }

    def _verify(self, state: Dict[str, Any]) -> None:
        """``ValueError`` naming the first way ``state`` does not belong to this trainer (format, config, task,
        model classes, tensor names and shapes)."""
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError(f"unknown checkpoint format {state.get('format') if isinstance(state, dict) else state!r}")
        missing = sorted({"step", "config", "policy", "reference", "critic", "optimizer", "critic_optimizer", "rng", "history"} - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks {missing}")
        # ``steps`` (the run's length) may differ: it changes no number of the steps already taken
        # a field the checkpoint lacks (written before the field existed) had its default then
        defaults = TrainConfig().to_dict() if isinstance(state["config"], dict) else {}
        mine = {k: v for k, v in self.config.to_dict().items() if k != "steps"}
        theirs = {k: v for k, v in {**defaults, **state["config"]}.items() if k != "steps"} if isinstance(state["config"], dict) else {}
        if theirs != mine:
            diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
            raise ValueError(f"checkpoint was written with a different TrainConfig (fields {diff}: "
                             + ", ".join(f"{k}={theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:3]) + ")")
        task = self.task.to_dict() if hasattr(self.task, "to_dict") else None
        if state.get("task") is not None and task is not None and state["task"] != task:
            diff = sorted(k for k in set(state["task"]) | set(task) if state["task"].get(k) != task.get(k))
            raise ValueError("checkpoint was written for another task: "
                             + ", ".join(f"{k}={state['task'].get(k)!r} there, {task.get(k)!r} here" for k in diff))
        for key, here in (state.get("fingerprint") or {}).items():
            obj = self.task if key == "task_type" else self.policy
            if here != _qualname(obj):
                raise ValueError(f"checkpoint {key} is {here}, this trainer's is {_qualname(obj)}")
        model_config = self.policy.config.to_dict() if isinstance(self.policy, TinyGPT) else None
        if state.get("model_config") is not None and model_config is not None and state["model_config"] != model_config:
            raise ValueError(f"checkpoint was written for another model: {state['model_config']} there, {model_config} here")
        if (state["critic"] is None) != (self.critic is None):
            raise ValueError("checkpoint and trainer disagree on having a critic")
        for label in ("policy", "reference", "critic"):
            if state[label] is None:
                continue
            theirs = {k: tuple(v.shape) for k, v in state[label].items()}
            ours = {k: tuple(v.shape) for k, v in getattr(self, label).state_dict().items()}
            if theirs != ours:
                diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                raise ValueError(f"checkpoint's {label} does not fit this model: "
                                 + ", ".join(f"{k} is {theirs.get(k)} there, {ours.get(k)} here" for k in diff[:3]))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. Transactional: ``state`` is checked against this trainer first
        (config, task, model; only ``config.steps`` may differ, the trainer keeps its own), and if anything fails
        while restoring, the trainer is left exactly as it was."""
        self._verify(state)
        snap = self._snapshot(with_reference=True)
        try:
            self.policy.load_state_dict(state["policy"])
            self.reference.load_state_dict(state["reference"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.critic is not None:
                self.critic.load_state_dict(state["critic"])
                self.critic_optimizer.load_state_dict(state["critic_optimizer"])
            rng = state["rng"]
            self.prompt_generator.set_state(rng["prompt"])
            self.sample_generator.set_state(rng["sample"])
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["torch_cuda"])
            self.step_count = int(state["step"])
            self.optimizer_steps = int(state["optimizer_steps"]) if "optimizer_steps" in state else _adam_steps(self.optimizer)
            self.history = [dict(h) for h in state["history"]]
        except BaseException as e:
            self._restore(snap)
            if isinstance(e, Exception):
                raise ValueError(f"checkpoint does not fit this trainer ({type(e).__name__}: {e}); nothing was loaded") from e
            raise

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` with a SHA-256, atomically (a temporary file, then a rename).
        Refuses (``NonFiniteError``) to write non-finite weights."""
        self._check_params(self.step_count, " in the trainer", note=f"no checkpoint written to {path}")
        write_checkpoint(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Resume from a file written by :meth:`save`: its checksum is verified (``CheckpointError``, a
        ``ValueError``, if corrupt) and ``weights_only=True`` (no code is unpickled). A failed load changes nothing."""
        self.load_state_dict(read_checkpoint(path, map_location=self.device))

    @classmethod
    def from_checkpoint(cls, path: str) -> "Trainer":
        """Rebuild a :class:`~grpo_ref.model.TinyGPT` + :class:`~grpo_ref.tasks.AdditionTask` trainer from a checkpoint and resume it."""
        from .tasks import AdditionTask

        state = read_checkpoint(path, map_location="cpu")
        if not isinstance(state.get("model_config"), dict) or not isinstance(state.get("task"), dict) or not isinstance(state.get("config"), dict):
            raise ValueError(f"{path} holds a foreign model or task; build the Trainer yourself and call .load(path)")
        try:
            config = TrainConfig.from_dict(state["config"])
            policy, task = TinyGPT(GPTConfig(**state["model_config"])), AdditionTask(**state["task"])
        except TypeError as e:
            raise CheckpointError(f"{path}: {e}") from None
        trainer = cls(policy, task, config)
        trainer.load_state_dict(state)
        return trainer


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with torch's fused kernel where every parameter allows it (floating point, on the CPU or a
    CUDA device), else the default implementation. The same update rule (Loshchilov & Hutter 2019) up to float
    rounding; the fused one is what TRL 1.16.0 trains with (transformers 5.x ``TrainingArguments.optim`` defaults
    to ``adamw_torch_fused``). On the CPU the default implementation loops over the parameter tensors in Python;
    the fused one updates them in one call."""
    params = [p for p in params]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def minibatch_permutation(batch_size: int, group_size: int, order: str, generator: torch.Generator) -> torch.Tensor:
    """``[batch_size]`` row order of one epoch, to be cut into minibatches with ``torch.chunk``. ``order="rows"``: a uniform
    permutation of the rows. ``order="groups"``: a uniform permutation of the groups (rows ``g*G .. g*G+G-1``), each
    group's rows kept together in their order (a batch that is not whole groups falls back to rows). Both draw from
    ``generator``."""
    if order == "rows" or batch_size % group_size:
        return torch.randperm(batch_size, generator=generator)
    groups = torch.randperm(batch_size // group_size, generator=generator)
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()


def global_token_normaliser(mask: torch.Tensor, n_minibatches: int) -> float:
    """``LossInputs.num_tokens`` of every minibatch under ``AlgoConfig.global_token_norm``: the rollout batch's
    loss-token count (``mask [B, N]`` summed, at least 1) divided by the number of minibatches.

    TRL 1.16.0 ``GRPOTrainer._compute_loss``, ``loss_type="dapo"`` / ``"cispo"``: the normaliser is
    ``num_items_in_batch.clamp(min=1) / num_processes * gradient_accumulation_steps / steps_per_generation``,
    ``num_items_in_batch`` the generation batch's ``loss_mask`` sum. One process, one micro-batch per optimizer step
    and ``steps_per_generation = minibatches`` give this. Each minibatch's loss is its token sum over the batch's
    mean tokens per minibatch, so the ``n_minibatches`` gradients of one epoch add up to ``n_minibatches`` times
    the gradient of one token-mean over the whole batch (their mean equals it), whatever the minibatches' lengths.
    """
    return max(float(mask.sum()), 1.0) / n_minibatches


def _check_same_parameters(policy: nn.Module, reference: nn.Module) -> None:
    """``ValueError`` unless ``reference`` has the policy's parameter names and shapes (needed by ``ref_sync_every``)."""
    ours = {k: tuple(v.shape) for k, v in policy.named_parameters()}
    theirs = {k: tuple(v.shape) for k, v in reference.named_parameters()}
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ValueError("ref_sync_every needs a reference with the policy's parameters; they differ at "
                         + ", ".join(f"{k} ({ours.get(k)} in the policy, {theirs.get(k)} in the reference)" for k in diff[:3]))


def _adam_steps(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer steps taken, read from Adam's per-parameter ``step`` (for checkpoints older than ``optimizer_steps``)."""
    steps = [int(st["step"]) for st in optimizer.state.values() if "step" in st]
    return max(steps, default=0)


def _copy_optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with its tensors cloned (it returns references), for ``load_state_dict``."""
    sd = optimizer.state_dict()
    return {
        "state": {k: {n: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for n, v in st.items()}
                  for k, st in sd["state"].items()},
        "param_groups": copy.deepcopy(sd["param_groups"]),
    }


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"

