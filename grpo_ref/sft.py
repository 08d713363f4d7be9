"""Supervised warm start (SFT): teacher-forced cross-entropy on correct answers, a few hundred steps.

RL on a verifiable reward needs a policy that is right *sometimes*: if every sample of a group is wrong, the
group-relative advantage is 0 and nothing is learned. DeepSeek-R1 and most RLHF pipelines start from an SFT
model for this reason. Here the warm start is deliberately short, so the policy knows the answer format but
gets only part of the sums right, and RL has something to improve.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .logprobs import token_logprobs
from .model import lm_logits


def sft_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the tokens where ``loss_mask`` is 1 (all ``[B, T]``); logits at ``t-1`` score ``t``."""
    logits = lm_logits(model, input_ids, attention_mask)[:, :-1]
    logp = token_logprobs(logits, input_ids[:, 1:])
    m = loss_mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp_min(1.0)


def supervised_warm_start(
    model: nn.Module,
    task,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: Optional[torch.device] = None,
    weight_decay: float = 0.0,
) -> List[Dict[str, float]]:
    """Train ``model`` in place on ``steps`` batches of training-split prompts with their correct answers.

    AdamW with a constant ``lr`` and gradient clipping at 1; draws from its own ``torch.Generator(seed)``, so the
    result depends on the arguments only. Returns the per-step ``{"step", "loss"}`` history.
    """
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}")
    if device is None:
        device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
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
        history.append({"step": step, "loss": float(loss.detach())})
    return history
