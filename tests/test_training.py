"""The training loop: it learns, it resumes exactly, it refuses bad configs, it stops on NaN/inf before touching
the weights, it accepts Hugging Face models, and its reward never evaluates model text.

The learning test is the slow one (~1 min on a 2-core CPU): a warm-started tiny transformer trained with GRPO
on 2-digit addition must raise its greedy eval accuracy by a clear margin.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from grpo_ref import PRESETS
from grpo_ref.model import GPTConfig, ValueModel, hidden_size_of, tiny_gpt
from grpo_ref.rollout import rollout
from grpo_ref.sft import load_warm_start, supervised_warm_start, warm_start_policy
from grpo_ref.tasks import AdditionTask, CharTokenizer, parse_answer
from grpo_ref.checkpoint import read_checkpoint
from grpo_ref.trainer import TIME_METRICS, NonFiniteError, Trainer, TrainConfig, load_metrics


def _task(**kw):
    return AdditionTask(n_digits=2, eval_size=32, **kw)


def _policy(task, seed=0, n_embd=32):
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens, n_layer=1, n_head=2, n_embd=n_embd)
    return tiny_gpt(cfg, seed)


def _small_config(**kw):
    base = dict(group_size=4, prompts_per_step=4, steps=4, lr=1e-3, minibatches=2, ppo_epochs=2, eval_every=2, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _deterministic(history):
    return [{k: v for k, v in h.items() if k not in TIME_METRICS} for h in history]


# -- reward and task ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["2**99", "9**9**9", "__import__('os')", "1e9", "-5", "+5", " 46", "46 ", "046", "4_6",
                                  "0x2e", "46.0", "", "١٢", "12345"])
def test_parser_whitelist_rejects_anything_but_a_canonical_number(text):
    assert parse_answer(text, max_digits=3) is None


@pytest.mark.parametrize("text,value", [("0", 0), ("46", 46), ("198", 198)])
def test_parser_accepts_canonical_numbers(text, value):
    assert parse_answer(text, max_digits=3) == value


def test_score_pays_correctness_and_format():
    task = _task(format_reward=0.1)
    tok = task.tokenizer
    pairs = torch.tensor([[12, 34]] * 5)
    rows = [tok.encode("46") + [tok.eos_id], tok.encode("47") + [tok.eos_id], tok.encode("46"),  # no EOS: truncated
            [tok.eos_id], tok.encode("4") + [tok.pad_id, tok.eos_id]]
    width = max(map(len, rows))
    responses = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    rewards, correct = task.score(pairs, responses)
    assert rewards.tolist() == pytest.approx([1.1, 0.1, 0.0, 0.0, 0.0])
    assert correct.tolist() == [True, False, False, False, False]


def test_tokenizer_roundtrip_and_refusal():
    tok = CharTokenizer()
    assert tok.decode(tok.encode("12+34=") + [tok.eos_id] + tok.encode("9")) == "12+34="
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("2**9")


def test_train_and_eval_splits_are_disjoint_and_seeded():
    task = AdditionTask(n_digits=2, eval_size=500, seed=3)
    train = task.sample_train(5000, torch.Generator().manual_seed(0))
    assert not task.is_eval_pair(train).any()
    assert task.is_eval_pair(task.eval_pairs()).all()
    assert torch.equal(AdditionTask(n_digits=2, eval_size=500, seed=3).eval_pairs(), task.eval_pairs())
    assert not torch.equal(AdditionTask(n_digits=2, eval_size=500, seed=4).eval_pairs(), task.eval_pairs())
    with pytest.raises(ValueError, match="eval_size"):
        AdditionTask(n_digits=1, eval_size=80)


# -- rollout --------------------------------------------------------------------------------------------------------

def test_rollout_groups_masks_and_truncation_modes():
    task = _task()
    policy = _policy(task)  # untrained: many completions run out of budget without EOS
    pairs = task.sample_train(6, torch.Generator().manual_seed(0))
    outs = {mode: rollout(policy, task, pairs, 4, max_new_tokens=3, generator=torch.Generator().manual_seed(0), truncation=mode)
            for mode in ("keep", "mask", "penalize")}
    ro = outs["keep"]
    assert ro.response_ids.shape[0] == 24 and torch.equal(ro.pairs[::4], pairs)
    assert ro.truncated.any() and (~ro.truncated).any()
    assert torch.equal(ro.loss_mask, ro.response_mask)
    masked = outs["mask"]
    assert (masked.loss_mask[masked.truncated] == 0).all()
    assert torch.equal(masked.loss_mask[~masked.truncated], masked.response_mask[~masked.truncated])
    pen = outs["penalize"]
    assert (pen.rewards[pen.truncated] == -1.0).all()
    with pytest.raises(ValueError, match="truncation"):
        rollout(policy, task, pairs, 4, 3, truncation="drop")


# -- config validation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(algo="grpo2"), "unknown algorithm"),
    (dict(algo="grpo", group_size=1), "group_size >= 2"),
    (dict(algo="rloo", group_size=1), "group_size >= 2"),
    (dict(algo_overrides={"eps_low": 0.0}), "eps_low"),
    (dict(algo_overrides={"eps_high": -0.1}), "eps_high"),
    (dict(algo_overrides={"kl_coef": -1.0}), "kl_coef"),
    (dict(algo_overrides={"klcoef": 0.1}), "unknown algo_overrides"),
    (dict(algo_overrides={"group_size": 8}), "TrainConfig.group_size"),
    (dict(lr=0.0), "lr"),
    (dict(ppo_epochs=0), "ppo_epochs"),
    (dict(minibatches=0), "minibatches"),
    (dict(minibatches=1000), "minibatches"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(truncation="drop"), "truncation"),
    (dict(device="gpu0"), "device"),
])
def test_bad_configs_are_refused_with_a_clear_message(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_ppo_accepts_group_size_one():
    assert TrainConfig(algo="ppo", group_size=1).algo_config().adv_estimator == "gae"


# -- one step of every preset ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", sorted(PRESETS))
def test_every_preset_takes_finite_steps(algo):
    task = _task()
    trainer = Trainer(_policy(task), task, _small_config(algo=algo, steps=2))
    for _ in range(2):
        m = trainer.step()
        finite = {k: v for k, v in m.items() if isinstance(v, float)}
        assert all(math.isfinite(v) for v in finite.values()), finite
    assert (trainer.critic is not None) == (PRESETS[algo].loss_fn == "ppo")


def test_updates_change_the_policy_and_the_clip_acts():
    task = _task()
    policy = _policy(task)
    trainer = Trainer(policy, task, _small_config(lr=3e-3, ppo_epochs=3, minibatches=2, warmup_steps=0))
    before = _params(policy)
    m = trainer.step()
    assert not _same(before, _params(policy))
    assert _same(before, _params(trainer.reference)), "the reference model must stay frozen"
    assert m["ratio_max"] > 1.0 or m["ratio_min"] < 1.0, "after the first minibatch pi_theta != pi_old"
    assert m["clip_frac_low"] + m["clip_frac_high"] > 0


def test_dapo_filter_groups_keeps_only_groups_with_reward_variance():
    task = _task()
    trainer = Trainer(_policy(task), task, _small_config(algo="dapo", prompts_per_step=8, filter_rounds=2))
    batch, sampled, frac = trainer._sample_batch()
    groups = batch.rewards.view(-1, 4)
    assert (groups.amax(-1) > groups.amin(-1)).all()
    assert batch.rewards.numel() <= 32 and sampled >= 32 and 0.0 <= frac <= 1.0


# -- checkpoint and resume ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_equals_uninterrupted_run_exactly(tmp_path, algo):
    task = _task()
    cfg = _small_config(algo=algo, steps=6, eval_every=2)
    straight = Trainer(_policy(task), task, cfg)
    straight.train(progress=False)

    first = Trainer(_policy(task), task, cfg)
    first.train(steps=3, progress=False, out_dir=str(tmp_path))
    first.save(str(tmp_path / "ckpt.pt"))
    state = read_checkpoint(str(tmp_path / "ckpt.pt"))  # checksum verified; torch.load(weights_only=True) inside
    assert state["step"] == 3 and isinstance(state["config"], dict)

    resumed = Trainer(_policy(task, seed=123), task, cfg)  # different init: everything must come from the file
    resumed.load(str(tmp_path / "ckpt.pt"))
    resumed.train(progress=False, out_dir=str(tmp_path))

    assert _same(_params(straight.policy), _params(resumed.policy))
    assert _same(_params(straight.reference), _params(resumed.reference))
    if algo == "ppo":
        assert _same(_params(straight.critic), _params(resumed.critic))
    assert _deterministic(straight.history) == _deterministic(resumed.history)
    logged = load_metrics(str(tmp_path))
    assert [h["step"] for h in logged] == list(range(0, 7))
    assert _deterministic(logged) == json.loads(json.dumps(_deterministic(straight.history)))


def test_from_checkpoint_rebuilds_the_trainer(tmp_path):
    task = _task()
    cfg = _small_config(steps=3)
    t = Trainer(_policy(task), task, cfg)
    t.train(progress=False)
    t.save(str(tmp_path / "c.pt"))
    r = Trainer.from_checkpoint(str(tmp_path / "c.pt"))
    assert r.step_count == 3 and _same(_params(r.policy), _params(t.policy))
    other = Trainer(_policy(task), task, _small_config(steps=3, lr=5e-4))
    with pytest.raises(ValueError, match="different TrainConfig"):
        other.load(str(tmp_path / "c.pt"))


# -- non-finite guard -----------------------------------------------------------------------------------------------

class _NaNRewardTask(AdditionTask):
    """Addition whose reward turns NaN on one row from the ``bad_call``-th scoring on."""

    calls = 0
    bad_call = 2

    def score(self, pairs, responses):
        rewards, correct = super().score(pairs, responses)
        type(self).calls += 1
        if type(self).calls >= self.bad_call:
            rewards[1] = float("nan")
        return rewards, correct


def test_nan_reward_stops_before_any_weight_changes():
    _NaNRewardTask.calls = 0
    task = _NaNRewardTask(n_digits=2, eval_size=32)
    trainer = Trainer(_policy(task), task, _small_config(eval_every=0))
    trainer.step()
    before, opt_state = _params(trainer.policy), trainer.optimizer.state_dict()["state"][0]["step"].clone()
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite reward") as err:
        trainer.step()
    assert err.value.step == 2 and err.value.metric == "reward"
    assert _same(before, _params(trainer.policy))
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["step"], opt_state)
    assert trainer.step_count == 1


@pytest.mark.parametrize("path", ["auto", "logits"])  # auto = fused from the hidden states for TinyGPT
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_inf_in_the_forward_pass_stops_before_the_optimizer_step(algo, path):
    task = _task()
    policy = _policy(task)
    trainer = Trainer(policy, task, _small_config(algo=algo, eval_every=0, logprob_path=path))
    trainer.step()
    armed = {"on": False}

    def poison(module, args, output):  # inf final hidden states (so inf logits on either path), but only in
        if armed["on"] and torch.is_grad_enabled():  # training forward passes (with gradients)
            return output + float("inf")
        return output

    policy.ln_f.register_forward_hook(poison)
    armed["on"] = True
    before = _params(policy)
    critic_before = _params(trainer.critic) if trainer.critic is not None else []
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite (loss|logits|hidden).*epoch 0, minibatch 0"):
        trainer.step()
    assert _same(before, _params(policy))
    if trainer.critic is not None:
        assert _same(critic_before, _params(trainer.critic))


def test_inf_gradient_is_named():
    task = _task()
    policy = _policy(task)
    trainer = Trainer(policy, task, _small_config(eval_every=0))
    policy.lm_head.weight.register_hook(lambda g: g * float("inf"))
    before = _params(policy)
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite grad_norm"):
        trainer.step()
    assert _same(before, _params(policy))


# -- Hugging Face models --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,algo", [("gpt2", "grpo"), ("llama", "grpo"), ("gpt2", "ppo")])
def test_trainer_accepts_a_hugging_face_causal_lm(arch, algo, tmp_path):
    transformers = pytest.importorskip("transformers")
    task = _task(zero_pad=False)  # ragged, left-padded prompts
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=task.vocab_size, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=task.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    cfg = _small_config(algo=algo, steps=2, eval_every=1)
    trainer = Trainer(model, task, cfg)
    before = _params(model)
    history = trainer.train(progress=False)
    assert not _same(before, _params(model))
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)
    assert "eval_accuracy" in history[-1]
    if algo == "ppo":
        assert isinstance(trainer.critic, ValueModel) and trainer.critic.v_head.in_features == hidden_size_of(model)
    # the sampler (prefix recomputed, no KV cache) and the trainer's forward agree on the log-probs
    assert history[-1]["sampler_logp_gap"] < 1e-4
    trainer.save(str(tmp_path / "hf.pt"))
    again = Trainer(model, task, cfg)
    again.load(str(tmp_path / "hf.pt"))
    assert again.step_count == 2


# -- it learns --------------------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """One intra-op thread, as in benchmarks/train_accuracy.py: the run below is then the first 200 steps of that
    benchmark's ``grpo seed 0`` run, whose curve is in benchmarks/results/train_accuracy.txt."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_grpo_raises_eval_accuracy_from_the_warm_start(one_thread):
    """Warm start (SFT until ~20% train accuracy: the committed ``benchmarks/results/warm_start_seed0.pt``, made by
    ``benchmarks/warm_start.py`` and checked by tests/test_warm_start_file.py), then 250 GRPO steps with the package defaults: greedy eval
    accuracy on 256 held-out sums must rise by at least 15 points.

    The run is chaotic (another CPU gives another curve from the same seed), so the step count comes from the
    three committed seeds of ``benchmarks/grpo_vs_ppo.py``, which stand for what other machines may see: after 200
    steps seed 2 had gained only 0.11, after 250 steps the smallest gain of the three is 0.38 (seed 0 here: +0.52)."""
    task = AdditionTask(n_digits=2, eval_size=256)
    # the committed file is warm_start_policy(task, target_accuracy=0.2, seed=0) (the sdist does not ship it)
    policy = load_warm_start(str(WARM_START)) if WARM_START.exists() else warm_start_policy(task, 0.2, seed=0)
    cfg = TrainConfig(algo="grpo", steps=LEARNING_STEPS, eval_every=LEARNING_STEPS, seed=0)
    trainer = Trainer(policy, task, cfg)
    start = trainer.evaluate()["eval_accuracy"]
    assert start <= 0.3, f"the warm start should leave room for RL, got {start:.3f}"
    history = trainer.train(progress=False)
    end = history[-1]["eval_accuracy"]
    assert end >= start + 0.15, f"GRPO did not learn: eval accuracy {start:.3f} -> {end:.3f}"


LEARNING_STEPS = 250
WARM_START = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "warm_start_seed0.pt"


def test_supervised_warm_start_target_stops_early():
    task = _task()
    policy = _policy(task, n_embd=32)
    hist = supervised_warm_start(policy, task, steps=20, target_accuracy=1.0, check_every=5, check_size=16)
    assert len(hist) == 20 and [h["step"] for h in hist if "check_accuracy" in h] == [5, 10, 15, 20]
    hist = supervised_warm_start(policy, task, steps=20, target_accuracy=1e-9, check_every=5, check_size=16)
    reached = [h for h in hist if h.get("check_accuracy", 0.0) >= 1e-9]
    assert not reached or hist[-1] is reached[0], "training stops at the first check that reaches the target"
    with pytest.raises(ValueError, match="target_accuracy"):
        supervised_warm_start(policy, task, steps=1, target_accuracy=1.5)


# -- command line -----------------------------------------------------------------------------------------------------

def test_cli_train_resume_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from grpo_ref.__main__ import main

    out = str(tmp_path / "run")
    common = ["--out", out, "--n-embd", "32", "--prompts-per-step", "4", "--eval-every", "1", "--checkpoint-every", "1", "--no-progress"]
    assert main(["train", "--algo", "grpo", "--steps", "2", "--warm-max-steps", "3", *common]) == 0
    for name in ("config.json", "metrics.jsonl", "metrics.png", "checkpoint.pt"):
        assert (tmp_path / "run" / name).exists(), name
    assert main(["train", "--resume", "--steps", "3", *common]) == 0
    assert [h["step"] for h in load_metrics(out)] == [0, 1, 2, 3]
    assert main(["plot", out, out, "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").exists()
    assert main(["train", "--algo", "grpo", "--group-size", "1", "--steps", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "group_size >= 2" in capsys.readouterr().err
