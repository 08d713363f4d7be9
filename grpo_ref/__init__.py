"""grpo_ref: a small, test-backed reference implementation of the GRPO and PPO math for language models.

Every function takes batched ``[B, T]`` tensors with a response mask and cites the equation or framework
convention it implements. See the book's API chapter for the tour.
"""
from .advantages import (
    combine_rewards,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    overlong_penalty,
    process_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from .aggregation import LOSS_AGG_MODES, aggregate
from .algorithms import (
    LOSS_REGISTRY,
    PRESETS,
    AlgoConfig,
    LossInputs,
    compute_advantages,
    compute_loss,
    get_preset,
    grpo_loss,
    ppo_loss,
)
from .kl import KL_ESTIMATORS, categorical_kl, kl_estimate, kl_k1, kl_k2, kl_k3

# isort: off
# logprobs before fused_logprobs: the two modules import each other, and this order resolves it.
from .logprobs import token_entropy, token_logprobs
from .fused_logprobs import (
    token_entropy_from_hidden,
    token_logprobs_and_entropy,
    token_logprobs_and_entropy_from_hidden,
    token_logprobs_from_hidden,
)
# isort: on
# From here on, with the loss modules, the training loop (chapter 3): model, rollout, sft, tasks (chain_task: the
# free-length task), trainer.
from .chain_task import ChainSumTask
from .masks import masked_mean, masked_sum, masked_var, masked_whiten, response_mask
from .model import GPTConfig, TinyGPT, ValueModel, lm_logits, tiny_gpt
from .ppo import entropy_bonus, kl_in_reward, value_loss
from .rollout import Rollout, evaluate, generate, rollout
from .sft import supervised_warm_start, warm_start_policy
from .surrogate import policy_loss
from .tasks import AdditionTask, CharTokenizer, parse_answer
from .trainer import NonFiniteError, TrainConfig, Trainer, load_metrics

# The one place the version is written: pyproject.toml reads it (dynamic = ["version"]).
__version__ = "0.1.0"

# The top-level API: everything above, and nothing private. Submodules (grpo_ref.checkpoint, .plotting,
# .compat, .integrations, ...) hold more public names, imported from there. tests/test_packaging.py keeps
# this list equal to what the package namespace exports.
__all__ = [
    "AdditionTask",
    "AlgoConfig",
    "ChainSumTask",
    "CharTokenizer",
    "GPTConfig",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "LOSS_REGISTRY",
    "LossInputs",
    "NonFiniteError",
    "PRESETS",
    "Rollout",
    "TinyGPT",
    "TrainConfig",
    "Trainer",
    "ValueModel",
    "aggregate",
    "categorical_kl",
    "combine_rewards",
    "compute_advantages",
    "compute_loss",
    "discounted_returns",
    "entropy_bonus",
    "evaluate",
    "gae_advantages",
    "generate",
    "get_preset",
    "grpo_advantages",
    "grpo_loss",
    "kl_estimate",
    "kl_in_reward",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "lm_logits",
    "load_metrics",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "parse_answer",
    "policy_loss",
    "ppo_loss",
    "process_advantages",
    "reinforce_pp_advantages",
    "response_mask",
    "rloo_advantages",
    "rollout",
    "supervised_warm_start",
    "tiny_gpt",
    "token_entropy",
    "token_entropy_from_hidden",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_logprobs_and_entropy_from_hidden",
    "token_logprobs_from_hidden",
    "value_loss",
    "warm_start_policy",
]
