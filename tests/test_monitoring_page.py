"""book/monitoring.md defines exactly the metrics the trainer logs, and its table of the committed runs is computed
from benchmarks/results/grpo_vs_ppo.json.

The keys are collected by running real (tiny) training steps: GRPO and PPO with evaluation, and DAPO on a task whose
reward is constant, so that its dynamic sampling leaves no group and the step logs ``skipped``. A metric added to the
trainer without a definition on the page fails here, and so does a definition of a key the trainer no longer logs.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch

from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "book" / "monitoring.md"
RUNS = REPO / "benchmarks" / "results" / "grpo_vs_ppo.json"
TEXT = PAGE.read_text(encoding="utf-8")


class ConstantRewardTask(AdditionTask):
    """Every completion gets reward 0: every group is flat, so DAPO's filter keeps nothing."""

    def score(self, pairs, responses):
        rewards, correct = super().score(pairs, responses)
        return torch.zeros_like(rewards), torch.zeros_like(correct)


class AllRightTask(AdditionTask):
    """Every completion is scored right (an untrained policy gets none right, and a step then logs no
    ``response_length_correct``)."""

    def score(self, pairs, responses):
        rewards, correct = super().score(pairs, responses)
        return rewards, torch.ones_like(correct)


def _step_keys(algo: str, task: AdditionTask) -> set:
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens,
                    n_layer=1, n_head=2, n_embd=32)
    config = TrainConfig(algo=algo, group_size=4, prompts_per_step=4, steps=1, minibatches=2, ppo_epochs=1,
                         eval_every=1, warmup_steps=1, filter_rounds=1)
    trainer = Trainer(tiny_gpt(cfg, 0), task, config)
    return set(trainer.step())


@pytest.fixture(scope="module")
def logged_keys() -> dict:
    task = AdditionTask(n_digits=2, eval_size=16)
    keys = {algo: _step_keys(algo, task) for algo in ("grpo", "ppo")}
    keys["dapo_skipped"] = _step_keys("dapo", ConstantRewardTask(n_digits=2, eval_size=16))
    keys["all_right"] = _step_keys("grpo", AllRightTask(n_digits=2, eval_size=16))
    return keys


def defined_terms(text: str) -> set:
    """Backticked names on the term lines of the page's definition lists (a term line is followed by ``: ...``)."""
    lines = text.splitlines()
    terms = set()
    for line, nxt in zip(lines, lines[1:]):
        if nxt.startswith(": ") and line.startswith("`"):
            terms.update(re.findall(r"`([a-z_]+)`", line))
    return terms


def test_the_skip_path_was_exercised(logged_keys):
    assert "skipped" in logged_keys["dapo_skipped"]
    assert "response_length_correct" in logged_keys["all_right"] and "response_length_incorrect" in logged_keys["grpo"]
    assert "vf_loss" in logged_keys["ppo"] and "vf_loss" not in logged_keys["grpo"]


def test_every_logged_key_is_defined(logged_keys):
    terms = defined_terms(TEXT)
    for run, keys in logged_keys.items():
        missing = sorted(keys - terms)
        assert not missing, f"{run} logs keys that book/monitoring.md does not define: {missing}"


def test_every_defined_key_is_logged(logged_keys):
    logged = set().union(*logged_keys.values())
    stale = sorted(defined_terms(TEXT) - logged)
    assert not stale, f"book/monitoring.md defines keys the trainer does not log: {stale}"


# -- the tables of the committed runs ----------------------------------------------------------------------------

def tables() -> dict:
    """``{algo: (windows, rows)}`` for the page's tables headed ``| GRPO | steps a-b | steps c-d |`` (and PPO):
    ``windows`` the ``(first, last)`` step ranges of the columns, ``rows`` ``{metric: [cell text, ...]}``."""
    out = {}
    for m in re.finditer(r"^\| (GRPO|PPO) \|(.*)\n\|[- |]+\n((?:\|.*\n)+)", TEXT, re.M):
        windows = []
        for head in m.group(2).split("|")[:-1]:
            h = re.fullmatch(r"\s*steps (\d+)-(\d+)\s*", head)
            assert h, f"unexpected column header {head!r}"
            windows.append((int(h.group(1)), int(h.group(2))))
        rows = {}
        for line in m.group(3).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[re.fullmatch(r"`([a-z_]+)`", cells[0]).group(1)] = cells[1:]
        out[m.group(1).lower()] = (windows, rows)
    assert set(out) == {"grpo", "ppo"}, f"expected a GRPO and a PPO table, found {sorted(out)}"
    return out


def window_mean(runs: list, algo: str, key: str, first: int, last: int):
    per_seed = [statistics.mean(h[key] for h in r["history"] if first <= h["step"] <= last and key in h)
                for r in runs if r["algo"] == algo and any(key in h for h in r["history"])]
    return statistics.mean(per_seed) if per_seed else None


def _decimals(cell: str) -> int:
    return len(cell.split(".")[1]) if "." in cell else 0


def test_table_cells_are_computed_from_the_committed_runs():
    runs = json.loads(RUNS.read_text())
    assert sorted({r["seed"] for r in runs if r["algo"] == "grpo"}) == [0, 1, 2]
    for algo, (windows, rows) in tables().items():
        assert len(rows) >= 8
        for key, cells in rows.items():
            for (first, last), text in zip(windows, cells):
                want = window_mean(runs, algo, key, first, last)
                assert want is not None, f"{algo} {key}: not in the committed runs"
                tol = 0.5 * 10 ** -_decimals(text) + 1e-12  # the page rounds to its printed digits
                assert want == pytest.approx(float(text), abs=tol), (
                    f"{key} {algo} steps {first}-{last}: page {text}, data {want:.4f}")


def test_the_prose_about_the_tables_holds():
    """The sentences under the tables (and the grad_norm entry): rewards and grad_norm rise and entropy falls in
    both; PPO clips more on the low side; its value_mean stays below reward_mean; GRPO's groups_with_signal rises,
    PPO's ends lower than it began."""
    t = {algo: {k: [float(c) for c in v] for k, v in rows.items()} for algo, (_, rows) in tables().items()}
    for a in ("grpo", "ppo"):
        assert t[a]["reward_mean"][-1] > t[a]["reward_mean"][0]
        assert t[a]["entropy"][-1] < t[a]["entropy"][0]
        assert t[a]["grad_norm"][-1] > t[a]["grad_norm"][0]  # the grad_norm entry: grows as entropy falls
    for w in (0, -1):
        assert t["ppo"]["clip_frac_low"][w] > t["grpo"]["clip_frac_low"][w]
        assert t["ppo"]["value_mean"][w] < t["ppo"]["reward_mean"][w]
    assert t["grpo"]["groups_with_signal"][-1] > t["grpo"]["groups_with_signal"][0]
    assert t["ppo"]["groups_with_signal"][-1] < t["ppo"]["groups_with_signal"][0]
