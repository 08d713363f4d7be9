"""Run grpo_ref's losses inside other frameworks' training engines (multi-GPU, DeepSpeed, vLLM generation).

Each integration lives in its own submodule and imports its framework only when called, so importing this
package (or ``grpo_ref``) needs torch alone:

* :mod:`grpo_ref.integrations.trl`: ``grpo_ref_trainer_class()`` returns ``GRPORefTrainer``, TRL 1.16.0's
  ``GRPOTrainer`` with its loss replaced by :func:`grpo_ref.compute_loss`.
* :mod:`grpo_ref.integrations.verl`: ``register_policy_loss(algo)`` puts grpo_ref's policy term in verl 0.9.1's
  policy-loss registry.

This module deliberately imports none of its submodules.
"""
