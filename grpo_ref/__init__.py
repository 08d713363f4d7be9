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
from .logprobs import token_entropy, token_logprobs
from .fused_logprobs import (
    token_entropy_from_hidden,
    token_logprobs_and_entropy,
    token_logprobs_and_entropy_from_hidden,
    token_logprobs_from_hidden,
)
from .masks import masked_mean, masked_sum, masked_var, masked_whiten, response_mask
from .surrogate import policy_loss
from .ppo import entropy_bonus, kl_in_reward, value_loss

# The training loop (chapter 3): a tiny GPT, a verifiable task, rollouts and the PPO/GRPO trainer.
from .model import GPTConfig, TinyGPT, ValueModel, lm_logits, tiny_gpt
from .rollout import Rollout, evaluate, generate, rollout
from .sft import supervised_warm_start, warm_start_policy
from .tasks import AdditionTask, CharTokenizer, parse_answer
from .trainer import NonFiniteError, TrainConfig, Trainer, load_metrics

__version__ = "0.1.0"
