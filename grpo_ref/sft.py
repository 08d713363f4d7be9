"""Supervised warm start (SFT): teacher-forced cross-entropy on correct answers, a few hundred steps.

RL on a verifiable reward needs a policy that is right *sometimes*: if every sample of a group is wrong, the
group-relative advantage is 0 and nothing is learned. DeepSeek-R1 and most RLHF pipelines start from an SFT
model for this reason. Here the warm start is deliberately short, so the policy knows the answer format but
gets only part of the sums right, and RL has something to improve.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ._checks import check_int, check_mask, check_optional_real, check_real, check_same_shape
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .logprobs import token_logprobs
from .model import GPTConfig, TinyGPT, lm_logits, tiny_gpt


def sft_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the tokens where ``loss_mask`` is 1 (all ``[B, T]``); logits at ``t-1`` score ``t``.

    Refused: unequal shapes, a ``loss_mask`` with values other than 0/1, non-finite logits."""
    check_same_shape(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)
    check_mask("loss_mask", loss_mask, "input_ids", input_ids.float())
    logits = lm_logits(model, input_ids, attention_mask)[:, :-1]
    logp = token_logprobs(logits, input_ids[:, 1:])
    m = loss_mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp_min(1.0)


def _check_sft_args(*, steps, batch_size, lr, seed, target_accuracy) -> None:
    check_int("steps", steps, lo=0)
    check_int("batch_size", batch_size, lo=1)
    check_real("lr", lr, lo=0.0, lo_open=True)
    check_int("seed", seed, lo=0)
    check_optional_real("target_accuracy", target_accuracy, lo=0.0, hi=1.0, lo_open=True)


def supervised_warm_start(
    model: nn.Module,
    task,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: Optional[torch.device] = None,
    weight_decay: float = 0.0,
    target_accuracy: Optional[float] = None,
    check_every: int = 10,
    check_size: int = 256,
) -> List[Dict[str, float]]:
    """Train ``model`` in place on up to ``steps`` batches of training-split prompts with their correct answers.

    AdamW with a constant ``lr`` and gradient clipping at 1; draws from its own ``torch.Generator(seed)``, so the
    result depends on the arguments only.

    ``target_accuracy``: stop as soon as the greedy accuracy on ``check_size`` fixed *training* prompts (never the
    eval split) reaches it, checked every ``check_every`` steps. SFT on addition sits on a plateau (~10%) for a
    few hundred steps and then climbs to >80% within ~200 steps; a fixed step count lands anywhere on that
    climb depending on the seed, a target lands on the same accuracy every time.

    Returns the history: ``{"step", "loss"}`` per step, plus ``"check_accuracy"`` on the steps that checked.

    Refused (``ValueError`` naming the argument): ``steps``, ``batch_size``, ``seed``, ``check_every``,
    ``check_size`` that are not ints in range (bool included); ``lr`` NaN/inf/``<= 0``; ``weight_decay``
    NaN/inf/negative; ``target_accuracy`` outside ``(0, 1]`` or NaN.
    """
    from .rollout import evaluate

    _check_sft_args(steps=steps, batch_size=batch_size, lr=lr, seed=seed, target_accuracy=target_accuracy)
    check_real("weight_decay", weight_decay, lo=0.0)
    check_int("check_every", check_every, lo=1)
    check_int("check_size", check_size, lo=1)
    if device is None:
        device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    check_pairs = task.sample_train(check_size, torch.Generator().manual_seed(seed + 10_000)) if target_accuracy else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    history = []
    for step in range(steps):
        ids, attn, lmask = (t.to(device) for t in task.supervised_batch(task.sample_train(batch_size, g)))
        loss = sft_loss(model, ids, attn, lmask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        if target_accuracy is not None and (step + 1) % check_every == 0:
            acc, _ = evaluate(model, task, check_pairs, device=device)
            history[-1]["check_accuracy"] = acc
            if acc >= target_accuracy:
                break
    model.train()
    return history


def warm_start_policy(
    task,
    target_accuracy: Optional[float] = 0.2,
    steps: int = 3000,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: Optional[torch.device] = None,
) -> TinyGPT:
    """A :class:`~grpo_ref.model.TinyGPT` sized for ``task`` (``block_size = max_prompt_len + max_new_tokens``), initialised with
    ``seed`` and trained by :func:`supervised_warm_start` until its greedy accuracy on training prompts reaches
    ``target_accuracy`` (at most ``steps`` steps; ``target_accuracy=None`` runs all ``steps``).

    With the defaults and ``AdditionTask(n_digits=2)``: a few hundred steps, 10-20 s on one CPU core, and a
    policy right on about 20% of the eval prompts: it has the format and part of the arithmetic. Stopping on
    the SFT plateau instead (~10%, before it has found how digits line up) leaves RL almost no signal.

    Every argument is validated before anything is built (``ValueError`` naming it; see :func:`supervised_warm_start`
    and :class:`~grpo_ref.model.GPTConfig`).
    """
    _check_sft_args(steps=steps, batch_size=batch_size, lr=lr, seed=seed, target_accuracy=target_accuracy)
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens,
                    n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = tiny_gpt(cfg, seed)
    if device is not None:
        model = model.to(device)
    supervised_warm_start(model, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                          target_accuracy=target_accuracy)
    return model


WARM_START_KIND = "grpo_ref.warm_start"


def save_warm_start(model: TinyGPT, path: str, meta: Optional[Dict[str, Any]] = None) -> None:
    """Write a :class:`~grpo_ref.model.TinyGPT` (its :class:`~grpo_ref.model.GPTConfig` and weights) to ``path``,
    with ``meta`` (plain numbers and strings: how it was made), in the checksummed, atomic format of
    :mod:`grpo_ref.checkpoint`. ``benchmarks/warm_start.py`` writes the committed warm start this way."""
    if not isinstance(model, TinyGPT):
        raise ValueError(f"model must be a TinyGPT, got {type(model).__name__}")
    state = {"kind": WARM_START_KIND, "gpt_config": model.config.to_dict(),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": dict(meta or {})}
    write_checkpoint(state, path)


def _read_warm_start(path: str) -> Dict[str, Any]:
    state = read_checkpoint(path)
    if state.get("kind") != WARM_START_KIND or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a warm start written by save_warm_start (kind {state.get('kind')!r})")
    return state


def load_warm_start(path: str, device: Optional[Union[str, torch.device]] = None) -> TinyGPT:
    """The :class:`~grpo_ref.model.TinyGPT` saved by :func:`save_warm_start`, read with
    ``torch.load(..., weights_only=True)`` after its SHA-256 is checked (:func:`warm_start_record` gives its ``meta``).

    Raises ``FileNotFoundError`` without a file and :class:`~grpo_ref.checkpoint.CheckpointError` for a file that is
    not a warm start (a trainer checkpoint, a corrupt file)."""
    state = _read_warm_start(path)
    model = TinyGPT(GPTConfig(**state["gpt_config"]))
    model.load_state_dict(state["model"])
    return model if device is None else model.to(device)


def warm_start_record(path: str) -> Dict[str, Any]:
    """The ``meta`` saved with a warm start by :func:`save_warm_start` (how it was made), checked as in
    :func:`load_warm_start`."""
    return dict(_read_warm_start(path).get("meta", {}))
