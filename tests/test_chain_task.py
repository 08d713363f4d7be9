"""The free-length task (grpo_ref.chain_task.ChainSumTask): prompts, the whitelist reward, process rewards, the
warm-start targets, the eval split, and a trainer running on it."""
import itertools

import pytest
import torch

from grpo_ref.advantages import process_advantages
from grpo_ref.chain_task import PAD, ChainSumTask
from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.trainer import Trainer, TrainConfig

TASK = ChainSumTask()


def _problem(*digits, width=5):
    return list(digits) + [PAD] * (width - len(digits))


def _ids(text, eos=True):
    tok = TASK.tokenizer
    return tok.encode(text) + ([tok.eos_id] if eos else [])


def _responses(rows, width=None):
    width = width or max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded with pad id 0
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def _score(problem, texts, eos=True):
    rows = [_ids(t, eos) for t in texts]
    return TASK.score(torch.tensor([problem] * len(rows)), _responses(rows))


# -- prompts and targets ----------------------------------------------------------------------------------------------

def test_every_three_term_problem_round_trips_and_both_targets_score_right():
    """Exact enumeration of the 1,000 three-term problems: prompt text, tokenizer round trip, and both warm-start
    targets (running sums and direct answer) earn 1 + format_reward."""
    problems = torch.tensor([_problem(*d) for d in itertools.product(range(10), repeat=3)])
    ids, mask = TASK.encode_prompts(problems)
    for row, m, p in zip(ids.tolist(), mask.tolist(), problems.tolist(), strict=True):
        text = TASK.tokenizer.decode([t for t, k in zip(row, m, strict=True) if k])
        assert text == "+".join(str(d) for d in p if d != PAD) + "="
        assert row[m.index(1)] == TASK.tokenizer.bos_id
    for chain in (True, False):
        rows = [TASK.answer_ids(p, chain) for p in problems.tolist()]
        rewards, correct = TASK.score(problems, _responses(rows))
        assert correct.all() and torch.allclose(rewards, torch.full_like(rewards, 1 + TASK.format_reward))
    a, b, c = 7, 8, 9
    assert TASK.tokenizer.decode(TASK.answer_ids(_problem(a, b, c), True)) == f"{a + b};{a + b + c}"
    assert TASK.tokenizer.decode(TASK.answer_ids(_problem(a, b, c), False)) == f"{a + b + c}"


def test_running_sums_follow_the_definition():
    for digits in [(1, 2, 3), (9, 9, 9, 9, 9), (0, 0, 5, 0)]:
        expected, total = [], digits[0]
        for d in digits[1:]:
            total += d
            expected.append(total)
        assert ChainSumTask.running_sums(_problem(*digits)) == expected


def test_supervised_batch_teaches_the_chain_on_the_hashed_share_of_problems():
    problems = TASK.sample_train(512, torch.Generator().manual_seed(1))
    ids, attn, loss_mask = TASK.supervised_batch(problems)
    chain = TASK.uses_chain(problems)
    p = TASK.encode_prompts(problems)[0].shape[1]
    for row, lm, use, prob in zip(ids.tolist(), loss_mask.tolist(), chain.tolist(), problems.tolist(), strict=True):
        target = [t for t, k in zip(row, lm, strict=True) if k]
        assert target == TASK.answer_ids(prob, use) and all(k == 0 for k in lm[:p])
    assert torch.equal(TASK.uses_chain(problems), chain), "the choice is a fixed function of the problem"
    assert ((attn == 0) <= (loss_mask == 0)).all()


def test_chain_fraction_over_all_problems():
    """The hash splits the whole problem space (111,000 problems) in the stated proportion."""
    for frac in (0.0, 0.3, 1.0):
        task = ChainSumTask(chain_fraction=frac)
        problems = torch.cat([torch.tensor([_problem(*d) for d in itertools.product(range(10), repeat=k)])
                              for k in (3, 4)])
        share = float(task.uses_chain(problems).float().mean())
        assert abs(share - frac) < 0.01, (frac, share)


# -- the reward is a whitelist ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,correct", [("14", True), ("8;10;14", True), ("3;14", True), ("14;14", True),
                                          ("8;10;15", False), ("15", False), ("0", False), ("14;0", False)])
def test_final_number_decides(text, correct):
    rewards, ok = _score(_problem(3, 5, 2, 4), [text])
    assert bool(ok[0]) is correct
    assert float(rewards[0]) == pytest.approx(TASK.format_reward + float(correct))


@pytest.mark.parametrize("text", ["014", "14;", ";14", "8;;14", "1+13", "14=", "=14", "+14", "", "100"])
def test_malformed_responses_score_zero(text):
    """Leading zeros, empty numbers, operators, and more digits than the largest sum (45) has: 0, not 0.1."""
    rewards, ok = _score(_problem(3, 5, 2, 4), [text])
    assert float(rewards[0]) == 0.0 and not ok[0]


def test_no_eos_or_special_tokens_inside_score_zero():
    tok = TASK.tokenizer
    right = _ids("14")
    rows = [right[:-1], [tok.bos_id] + right, right[:1] + [tok.pad_id] + right[1:], right]
    rewards, ok = TASK.score(torch.tensor([_problem(3, 5, 2, 4)] * 4), _responses(rows))
    assert rewards.tolist()[:3] == [0.0, 0.0, 0.0] and ok.tolist() == [False, False, False, True]
    # a response that fills the whole sampling budget without EOS is unfinished: 0
    long = _responses([_ids("1;" * 16, eos=False)[: TASK.max_new_tokens]])
    assert long.shape[1] == TASK.max_new_tokens and float(TASK.score(torch.tensor([_problem(1, 2, 3)]), long)[0][0]) == 0


def test_a_wrong_answer_can_be_long_and_well_formed():
    text = ";".join(["9"] * 15)  # 29 characters + EOS: within the 32-token budget
    assert len(_ids(text)) <= TASK.max_new_tokens
    rewards, ok = _score(_problem(1, 1, 1), [text])
    assert float(rewards[0]) == pytest.approx(TASK.format_reward) and not ok[0]


# -- process rewards --------------------------------------------------------------------------------------------------

def _slow_process_rewards(problem, ids):
    """From the docstring's definition, on characters: step j is the j-th number; it ends at the token after its
    last digit; earlier steps are right when they equal the j-th running sum, the last when it is the sum."""
    tok = TASK.tokenizer
    text = tok.decode(ids)
    well_formed = tok.eos_id in ids and all(t in tok.itos for t in ids[: ids.index(tok.eos_id)]) and all(
        part and (part == "0" or part[0] != "0") and part.isdigit() and len(part) <= 2 for part in text.split(";"))
    if not well_formed:
        return [0.0], [len(ids) - 1]
    parts = text.split(";")
    sums = ChainSumTask.running_sums(problem)
    rewards, ends, pos = [], [], 0
    for j, part in enumerate(parts):
        pos += len(part)
        ends.append(pos)
        pos += 1
        last = j == len(parts) - 1
        rewards.append(float(int(part) == sums[-1]) if last else float(j < len(sums) - 1 and int(part) == sums[j]))
    return rewards, ends


def test_process_rewards_match_their_definition():
    problem = _problem(3, 5, 2, 4)
    texts = ["8;10;14", "8;11;14", "9;10;15", "14", "8;10;14;14", "8;10;14;15", "1;+", "", "7"]
    rows = [_ids(t) for t in texts] + [_ids("8;10", eos=False)]
    resp = _responses(rows, width=12)
    step_rewards, step_ends, step_mask = TASK.process_rewards(torch.tensor([problem] * len(rows)), resp)
    for i, row in enumerate(resp.tolist()):
        want_r, want_e = _slow_process_rewards(problem, row)
        n = int(step_mask[i].sum())
        assert step_rewards[i, :n].tolist() == want_r and step_ends[i, :n].tolist() == want_e, texts[i:i + 1]
        assert step_rewards[i, n:].eq(0).all()
    ends_at = [row[e] for row, e in zip(resp.tolist(), step_ends[:, 0].tolist(), strict=True)]
    assert ends_at[0] == TASK.tokenizer.stoi[";"] and ends_at[3] == TASK.tokenizer.eos_id


def test_process_rewards_feed_process_advantages():
    """A group of four on one problem: the right chain's tokens get a higher advantage than the wrong chain's,
    and the tokens after EOS get none (they are outside the response mask)."""
    problem = _problem(3, 5, 2, 4)
    rows = [_ids(t) for t in ("8;10;14", "8;11;15", "14", "9")]
    resp = _responses(rows, width=10)
    mask = (torch.arange(10) < torch.tensor([len(r) for r in rows])[:, None]).float()
    r, e, m = TASK.process_rewards(torch.tensor([problem] * 4), resp)
    adv = process_advantages(r, e, m, mask, group_size=4)
    assert adv[0, 0] > adv[1, 0] and adv[2, 0] > adv[3, 0]
    assert (adv[mask == 0] == 0).all()


# -- the eval split ---------------------------------------------------------------------------------------------------

def test_eval_split_is_fixed_distinct_and_never_trained_on():
    ev = TASK.eval_pairs()
    assert ev.shape == (TASK.eval_size, TASK.max_terms)
    assert torch.equal(ev, ChainSumTask().eval_pairs()), "same seed, same split"
    assert not torch.equal(ev, ChainSumTask(seed=1).eval_pairs())
    ids = TASK.problem_ids(ev)
    assert ids.unique().numel() == TASK.eval_size
    train = TASK.sample_train(20_000, torch.Generator().manual_seed(0))
    assert not torch.isin(TASK.problem_ids(train), ids).any()
    n_terms = (train >= 0).sum(-1)
    counts = torch.bincount(n_terms, minlength=6)[3:].float()
    assert n_terms.min() == 3 and n_terms.max() == 5 and (counts / counts.sum() - 1 / 3).abs().max() < 0.02
    digits = train[train >= 0]
    assert (torch.bincount(digits, minlength=10).float() / digits.numel() - 0.1).abs().max() < 0.01


def test_problem_ids_are_injective_on_every_short_problem():
    task = ChainSumTask(min_terms=2, max_terms=3)
    problems = torch.tensor([_problem(*d, width=3) for k in (2, 3) for d in itertools.product(range(10), repeat=k)])
    assert task.problem_ids(problems).unique().numel() == problems.shape[0] == 1100


# -- refusals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    ({"min_terms": 1}, "min_terms"), ({"min_terms": 4, "max_terms": 3}, "max_terms"), ({"max_terms": 9}, "max_terms"),
    ({"eval_size": 0}, "eval_size"), ({"eval_size": 1.5}, "eval_size"), ({"format_reward": float("nan")}, "format_reward"),
    ({"chain_fraction": 1.5}, "chain_fraction"), ({"chain_fraction": float("nan")}, "chain_fraction"),
    ({"max_response_tokens": 8}, "max_response_tokens"), ({"seed": -1}, "seed"),
])
def test_bad_settings_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ChainSumTask(**kwargs)


@pytest.mark.parametrize("problems,match", [
    (torch.zeros(2, 4, dtype=torch.long), r"\[N, 5\]"), (torch.zeros(0, 5, dtype=torch.long), "N >= 1"),
    (torch.zeros(2, 5), "integer"), (torch.tensor([[1, 2, 10, PAD, PAD]]), "row 0"),
    (torch.tensor([[1, PAD, 3, 4, PAD]]), "padding"), (torch.tensor([[1, 2, PAD, PAD, PAD]]), "min_terms=3"),
    (torch.tensor([[1, 2, -2, PAD, PAD]]), "row 0"), (torch.zeros(5, dtype=torch.long), r"\[N, max_terms\]"),
])
def test_bad_problems_are_refused_by_name(problems, match):
    with pytest.raises(ValueError, match="problems") as err:
        TASK.encode_prompts(problems)
    assert err.match(match)


def test_bad_responses_are_refused():
    problems = torch.tensor([_problem(1, 2, 3)] * 2)
    with pytest.raises(ValueError, match="responses"):
        TASK.score(problems, torch.full((2, 3), TASK.vocab_size))
    with pytest.raises(ValueError, match="responses has 3"):
        TASK.score(problems, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="responses"):
        TASK.process_rewards(problems, torch.zeros(2, 3))


# -- the trainer runs on it -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_trainer_steps_and_resumes_on_the_chain_task(algo, tmp_path):
    task = ChainSumTask(eval_size=16)
    policy = tiny_gpt(GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens,
                                n_layer=1, n_head=2, n_embd=32), seed=0)
    cfg = TrainConfig(algo=algo, prompts_per_step=4, steps=2, eval_every=2, seed=0)
    trainer = Trainer(policy, task, cfg)
    history = trainer.train(progress=False)
    assert history[-1]["step"] == 2 and "eval_accuracy" in history[-1]
    assert 1 <= history[-1]["response_length"] <= task.max_new_tokens
    trainer.save(str(tmp_path / "c.pt"))
    again = Trainer(policy, task, cfg)
    again.load(str(tmp_path / "c.pt"))
    assert again.step_count == 2
    with pytest.raises(ValueError, match="another task"):
        Trainer(policy, ChainSumTask(eval_size=16, chain_fraction=0.1), cfg).load(str(tmp_path / "c.pt"))


def test_step_reports_the_lengths_of_right_and_wrong_responses_separately():
    """``response_length_correct`` / ``_incorrect``: the mean response length over the step's right / wrong rows
    (recomputed here from the very batch the step trained on); a kind with no row has no key."""
    task = ChainSumTask(eval_size=16)
    policy = tiny_gpt(GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens,
                                n_layer=1, n_head=2, n_embd=32), seed=0)
    trainer = Trainer(policy, task, TrainConfig(algo="grpo", prompts_per_step=8, steps=1, eval_every=100, seed=0))
    seen = []
    sample = trainer._sample_batch

    def spy():
        out = sample()
        seen.append(out[0])
        return out

    trainer._sample_batch = spy
    # force a mix of right and wrong rows: the first half of the batch is scored right
    score = task.score

    def half_right(problems, responses):
        rewards, correct = score(problems, responses)
        correct = torch.arange(len(correct)) < len(correct) // 2
        return rewards, correct

    task.score = half_right
    m = trainer.step()
    batch = seen[-1]
    lengths = batch.response_mask.sum(-1).float()
    assert m["response_length_correct"] == pytest.approx(float(lengths[batch.correct].mean()))
    assert m["response_length_incorrect"] == pytest.approx(float(lengths[~batch.correct].mean()))
    task.score = lambda problems, responses: (score(problems, responses)[0], torch.zeros(len(problems), dtype=torch.bool))
    m = trainer.step()
    assert "response_length_correct" not in m and "response_length_incorrect" in m


def test_trainer_with_process_supervision_uses_the_task_step_rewards(monkeypatch):
    """``adv_estimator='process'``: the trainer asks the task for the step rewards of the very batch it sampled and
    its advantages are :func:`process_advantages` of them (recomputed here); a task without step rewards is refused."""
    import grpo_ref.trainer as trainer_module
    from grpo_ref.tasks import AdditionTask

    task = ChainSumTask(eval_size=16)
    policy = tiny_gpt(GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens,
                                n_layer=1, n_head=2, n_embd=32), seed=0)
    cfg = TrainConfig(algo="grpo", prompts_per_step=4, group_size=4, steps=1, eval_every=100, seed=0,
                      algo_overrides={"adv_estimator": "process"})
    trainer = Trainer(policy, task, cfg)
    seen = {}
    real = trainer_module.compute_advantages

    def spy(algo, scores, mask, **kw):
        out = real(algo, scores, mask, **kw)
        seen.update(mask=mask, steps=kw["steps"], adv=out[0])
        return out

    sample = trainer._sample_batch

    def keep():
        out = sample()
        seen["batch"] = out[0]
        return out

    monkeypatch.setattr(trainer_module, "compute_advantages", spy)
    trainer._sample_batch = keep
    trainer.step()
    batch = seen["batch"]
    r, e, m = task.process_rewards(batch.pairs, batch.response_ids)
    for got, want in zip(seen["steps"], (r, e, m), strict=True):
        assert torch.equal(got.cpu(), want)
    want = process_advantages(r, e, m, batch.loss_mask.cpu(), group_size=4)
    assert torch.allclose(seen["adv"].cpu(), want, atol=1e-6)
    with pytest.raises(ValueError, match="process_rewards"):
        Trainer(tiny_gpt(GPTConfig(vocab_size=AdditionTask().vocab_size, n_layer=1, n_head=2, n_embd=32), seed=0),
                AdditionTask(), cfg)
