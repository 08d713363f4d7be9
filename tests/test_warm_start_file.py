"""The committed SFT warm start (``benchmarks/results/warm_start_seed0.pt``, made by ``benchmarks/warm_start.py``)
and :func:`grpo_ref.sft.save_warm_start` / :func:`grpo_ref.sft.load_warm_start`.

The learning test and chapter 3 start from that file instead of training the warm start again (40-65 s on one
core each time). So the file is checked here against the record it carries: the model it holds is a
``TinyGPT`` for 2-digit addition, and its greedy accuracy on the 256 held-out sums, recomputed on this machine,
is the one recorded when it was made (within a few sums: a near-tie between two logits can resolve differently on
another CPU) and leaves room for RL.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_ref.checkpoint import CheckpointError, write_checkpoint
from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.rollout import evaluate
from grpo_ref.sft import load_warm_start, save_warm_start, warm_start_record
from grpo_ref.tasks import AdditionTask

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "warm_start_seed0.pt"


def test_save_and_load_round_trip_weights_config_and_record(tmp_path):
    model = tiny_gpt(GPTConfig(vocab_size=11, block_size=9, n_layer=1, n_head=2, n_embd=8), seed=3)
    path = tmp_path / "w.pt"
    save_warm_start(model, str(path), {"seed": 3, "eval_accuracy": 0.25})
    back = load_warm_start(str(path))
    assert back.config == model.config
    assert warm_start_record(str(path)) == {"seed": 3, "eval_accuracy": 0.25}
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, back(ids).logits)


def test_load_refuses_what_is_not_a_warm_start(tmp_path):
    other = tmp_path / "trainer.pt"
    write_checkpoint({"step": 3, "policy": {}}, str(other))  # a checkpoint, but of something else
    with pytest.raises(CheckpointError, match="not a warm start"):
        load_warm_start(str(other))
    with pytest.raises(FileNotFoundError):
        load_warm_start(str(tmp_path / "missing.pt"))
    good = tmp_path / "w.pt"
    save_warm_start(tiny_gpt(GPTConfig(), seed=0), str(good))
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the payload
    good.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_warm_start(str(good))
    with pytest.raises(ValueError, match="model must be a TinyGPT"):
        save_warm_start(torch.nn.Linear(2, 2), str(tmp_path / "x.pt"))


@pytest.mark.skipif(not COMMITTED.exists(), reason="benchmarks/ is in the repository, not in the sdist")
def test_the_committed_warm_start_is_what_its_record_says():
    task = AdditionTask(n_digits=2, eval_size=256)
    model = load_warm_start(str(COMMITTED))
    meta = warm_start_record(str(COMMITTED))
    assert model.config.vocab_size == task.vocab_size
    assert model.config.block_size == task.max_prompt_len + task.max_new_tokens
    assert meta["seed"] == 0 and meta["target_accuracy"] == 0.2 and meta["eval_size"] == 256
    accuracy, _ = evaluate(model, task)
    assert abs(accuracy - meta["eval_accuracy"]) <= 8 / 256, (accuracy, meta["eval_accuracy"])
    # what the learning test and chapter 3 rely on: the format is learnt, most sums are still wrong
    assert 0.05 <= accuracy <= 0.3, accuracy
