"""The trainer under faults: each test injects one (NaN/inf in a gradient or a weight, an exception in the reward,
an interrupt, a kill between checkpoints, a full disk, a flipped bit, a checkpoint of another model or task) and
checks that nothing was lost: the trainer's state equals the one before the fault, bit for bit, and a run that
goes on after it equals the uninterrupted run.
"""
from __future__ import annotations

import copy
import errno
import json
import logging
import math

import pytest
import torch

from grpo_ref import _files as files_module
from grpo_ref import trainer as trainer_module
from grpo_ref.checkpoint import CheckpointError, read_checkpoint
from grpo_ref.metrics_log import MetricsFileError
from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import TIME_METRICS, NonFiniteError, Trainer, TrainConfig, load_metrics


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _task(**kw):
    return AdditionTask(n_digits=2, eval_size=32, **kw)


def _policy(task, seed=0, n_embd=32):
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens, n_layer=1, n_head=2, n_embd=n_embd)
    return tiny_gpt(cfg, seed)


def _config(**kw):
    base = dict(group_size=4, prompts_per_step=4, steps=4, lr=1e-3, minibatches=2, ppo_epochs=2, eval_every=2, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(algo="grpo", task=None, n_embd=32, **kw):
    task = task or _task()
    return Trainer(_policy(task, n_embd=n_embd), task, _config(algo=algo, **kw))


def _state(t: Trainer) -> dict:
    """Everything a step or a load may change, copied."""
    return copy.deepcopy({
        "policy": t.policy.state_dict(), "reference": t.reference.state_dict(),
        "critic": t.critic.state_dict() if t.critic is not None else None,
        "optimizer": t.optimizer.state_dict(),
        "critic_optimizer": t.critic_optimizer.state_dict() if t.critic_optimizer is not None else None,
        "rng": [t.prompt_generator.get_state(), t.sample_generator.get_state(), torch.get_rng_state()],
        "step": t.step_count, "history": t.history,
    })


def _equal(a, b, path="state") -> None:
    """Assert bit-identical nested containers of tensors (NaN equal to NaN, dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a!r} != {b!r}"


def _deterministic(history):
    return [{k: v for k, v in h.items() if k not in TIME_METRICS} for h in history]


class _Counter:
    """Calls ``action`` on the ``at``-th call (0-based) of the hook it is installed as."""

    def __init__(self, at, action):
        self.n, self.at, self.action = 0, at, action

    def __call__(self, *args):
        n, self.n = self.n, self.n + 1
        if n == self.at:
            return self.action(*args)
        return None


def _then_clean_step_equals_uninterrupted(t: Trainer, steps_done: int, algo: str, **kw) -> None:
    """After the fault: one more step must give exactly what an uninterrupted trainer gives."""
    t.step()
    ref = _trainer(algo, **kw)
    for _ in range(steps_done + 1):
        ref.step()
    _equal(_state(ref)["policy"], _state(t)["policy"])
    _equal(_state(ref)["optimizer"], _state(t)["optimizer"])
    assert _deterministic(ref.history) == _deterministic(t.history)


# -- a failing step changes nothing --------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_inf_gradient_at_minibatch_2_undoes_the_whole_step(algo):
    t = _trainer(algo, eval_every=0)
    t.step()
    before = _state(t)
    hook = t.policy.lm_head.weight.register_hook(_Counter(2, lambda g: g * float("inf")))  # the third backward
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite grad_norm = .* \(epoch 1, minibatch 0\); the step was undone") as err:
        t.step()
    assert "were applied" not in str(err.value)
    _equal(before, _state(t))  # minibatches 0 and 1 of epoch 0 were taken back
    hook.remove()
    _then_clean_step_equals_uninterrupted(t, 1, algo, eval_every=0)


def test_nan_in_a_weight_after_an_update_names_step_and_parameter_and_is_undone():
    t = _trainer(eval_every=0)
    t.step()
    before = _state(t)
    pad = t.task.tokenizer.pad_id

    def poison(*_):
        with torch.no_grad():
            t.policy.tok_emb.weight[pad, 0] = float("nan")  # the PAD row: never looked at by the loss

    t.optimizer.register_step_post_hook(_Counter(1, poison))
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite policy parameter tok_emb.weight = nan after the "
                                             r"optimizer step \(epoch 0, minibatch 1\)") as err:
        t.step()
    assert err.value.step == 2 and err.value.metric == "policy parameter tok_emb.weight"
    _equal(before, _state(t))


def test_nan_in_the_critic_after_an_update_is_named():
    t = _trainer("ppo", eval_every=0)
    before = _state(t)

    def poison(*_):
        with torch.no_grad():
            t.critic.v_head.bias.fill_(float("inf"))

    t.critic_optimizer.register_step_post_hook(_Counter(0, poison))
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite critic parameter v_head.bias = inf after the optimizer step"):
        t.step()
    _equal(before, _state(t))


def test_inf_lr_is_refused_and_caught_after_the_update_if_it_gets_past_the_config(tmp_path):
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("inf"))
    t = _trainer(eval_every=0, warmup_steps=0)
    t.step()
    t.save(str(tmp_path / "c.pt"))
    before = _state(t)
    t.config.lr = float("inf")  # past validation: the dataclass does not re-check on assignment
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite policy parameter \S+ = (nan|-?inf) after the optimizer step \(epoch 0, minibatch 0\)"):
        t.step()
    _equal(before, _state(t))
    t.save(str(tmp_path / "c.pt"))  # what is saved is the state before the failed step: finite
    saved = read_checkpoint(str(tmp_path / "c.pt"))
    assert saved["step"] == 1 and all(bool(torch.isfinite(v).all()) for v in saved["policy"].values())


def test_a_nan_placed_in_the_pad_embedding_is_named_before_sampling_and_never_saved(tmp_path):
    t = _trainer(eval_every=0)
    t.step()
    with torch.no_grad():
        t.policy.tok_emb.weight[t.task.tokenizer.pad_id, 3] = float("nan")
    before = _state(t)
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite policy parameter tok_emb.weight = nan before the step"):
        t.step()
    _equal(before, _state(t))
    with pytest.raises(NonFiniteError, match="no checkpoint written"):
        t.save(str(tmp_path / "c.pt"))
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "c.pt.tmp").exists()


class _FailingRewardTask(AdditionTask):
    """Addition whose ``score`` raises on its ``fail_at``-th call (0-based)."""

    def __init__(self, *a, fail_at=-1, exc=RuntimeError, **kw):
        super().__init__(*a, **kw)
        self.calls, self.fail_at, self.exc = 0, fail_at, exc

    def score(self, pairs, responses):
        n, self.calls = self.calls, self.calls + 1
        if n == self.fail_at:
            raise self.exc("reward server went away")
        return super().score(pairs, responses)


def test_an_exception_in_the_reward_after_all_updates_undoes_the_step():
    # eval_every=1: score calls are rollout 1, eval 1, rollout 2, eval 2; eval 2 runs after every update of step 2
    task = _FailingRewardTask(n_digits=2, eval_size=32, fail_at=3)
    t = Trainer(_policy(task), task, _config(eval_every=1))
    t.step()
    before = _state(t)
    with pytest.raises(RuntimeError, match="reward server"):
        t.step()
    _equal(before, _state(t))
    assert t.step_count == 1 and len(t.history) == 1
    _then_clean_step_equals_uninterrupted(t, 1, "grpo", eval_every=1)


def test_an_exception_in_a_dapo_refill_restores_the_random_generators():
    # DAPO samples again to refill dropped groups: the second rollout of the step fails after the first drew tokens
    task = _FailingRewardTask(n_digits=2, eval_size=32, fail_at=1)
    t = Trainer(_policy(task), task, _config(algo="dapo", eval_every=0, prompts_per_step=8))
    before = _state(t)
    with pytest.raises(RuntimeError):
        t.step()
    assert task.calls == 2, "the step sampled a second time (an untrained policy leaves most groups flat)"
    _equal(before, _state(t))


def test_keyboard_interrupt_inside_a_step_undoes_it():
    t = _trainer("ppo", eval_every=0)
    t.step()
    before = _state(t)

    def interrupt(*_):
        raise KeyboardInterrupt

    t.optimizer.register_step_post_hook(_Counter(2, interrupt))
    with pytest.raises(KeyboardInterrupt):
        t.step()
    _equal(before, _state(t))


# -- kill, resume and the metrics log --------------------------------------------------------------------------------

def _kill_at(monkeypatch, step: int, exc: BaseException):
    """Make ``Trainer.step`` raise ``exc`` when it is about to take step ``step`` (a kill, simulated in-process)."""
    real = Trainer.step

    def step_or_die(self):
        if self.step_count + 1 == step:
            raise exc
        return real(self)

    monkeypatch.setattr(Trainer, "step", step_or_die)


class _FullDisk:
    """A file on a disk that fills up: after ``whole`` successful ``write`` calls, the next one writes half of its
    data and raises ``OSError(ENOSPC)``."""

    def __init__(self, f, whole):
        self.f, self.whole = f, whole

    def write(self, data):
        if self.whole == 0:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.whole -= 1
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("fault", ["kill", "disk_full", "half_line"])
def test_kill_between_checkpoints_then_resume_repeats_and_loses_no_step(tmp_path, monkeypatch, caplog, fault):
    cfg = dict(steps=6, eval_every=2)
    straight = _trainer(**cfg)
    straight.train(progress=False)

    run = tmp_path / "run"
    first = _trainer(**cfg)
    if fault == "disk_full":  # the log line of step 4 is cut in the middle by a full disk
        real_open = open

        def full_open(path, mode="r", *a, **kw):
            f = real_open(path, mode, *a, **kw)
            return _FullDisk(f, 4) if str(path).endswith("metrics.jsonl") and mode == "w" else f  # steps 0-3, half of 4

        monkeypatch.setattr(trainer_module, "open", full_open, raising=False)
        with pytest.raises(OSError, match="No space"):
            first.train(progress=False, out_dir=str(run), checkpoint_every=2)
        monkeypatch.undo()
    else:
        _kill_at(monkeypatch, 5, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            first.train(progress=False, out_dir=str(run), checkpoint_every=3)  # steps 0-4 logged, checkpoint of step 3
        monkeypatch.undo()
        if fault == "half_line":  # killed while writing the line of step 5
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(straight.history[5])[:40])
    logged = (run / "metrics.jsonl").read_text().split("\n")
    if fault != "kill":
        with pytest.raises(MetricsFileError, match=rf"metrics.jsonl line {len(logged)}: not valid JSON"):
            load_metrics(str(run))

    ckpt_step = read_checkpoint(str(run / "checkpoint.pt"))["step"]
    assert ckpt_step < len(logged) - 2, "the log holds steps after the checkpoint: the case under test"
    resumed = _trainer(**cfg)
    resumed.load(str(run / "checkpoint.pt"))
    with caplog.at_level(logging.WARNING, logger="grpo_ref"):
        resumed.train(progress=False, out_dir=str(run), checkpoint_every=3)
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "logged after the checkpoint" in warnings
    if fault != "kill":
        assert f"metrics.jsonl line {len(logged)}: not valid JSON" in warnings

    log = load_metrics(str(run))
    assert [h["step"] for h in log] == list(range(7))
    assert _deterministic(log) == json.loads(json.dumps(_deterministic(straight.history)))
    _equal(_state(straight)["policy"], _state(resumed)["policy"])


def test_resume_rewrites_a_log_that_lacks_lines_the_checkpoint_has(tmp_path):
    run = tmp_path / "run"
    t = _trainer(steps=3)
    t.train(progress=False, out_dir=str(run), checkpoint_every=3)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]))  # e.g. an older copy of the log
    again = _trainer(steps=4)
    again.load(str(run / "checkpoint.pt"))
    again.train(progress=False, out_dir=str(run))
    assert [h["step"] for h in load_metrics(str(run))] == [0, 1, 2, 3, 4]


def test_load_metrics_names_file_and_line_of_a_corrupt_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "loss": 0.5}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl line 3: not a JSON object with an integer 'step'"):
        load_metrics(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        load_metrics(str(tmp_path / "nosuch"))


# -- checkpoints: atomic, verified, transactional -------------------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    t = _trainer()
    t.step()
    path = tmp_path / "checkpoint.pt"
    t.save(str(path))
    good = path.read_bytes()
    t.step()
    real_open = open
    monkeypatch.setattr(files_module, "open", lambda p, mode="r", *a, **kw: _FullDisk(real_open(p, mode, *a, **kw), 0),
                        raising=False)
    with pytest.raises(OSError, match="No space left"):
        t.save(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert read_checkpoint(str(path))["step"] == 1


def test_a_flipped_bit_is_detected_and_the_trainer_is_left_alone(tmp_path):
    t = _trainer()
    t.train(steps=2, progress=False)
    path = tmp_path / "c.pt"
    t.save(str(path))
    data = path.read_bytes()
    other = _trainer()
    other.step()
    before = _state(other)
    for frac in (0.3, 0.5, 0.7, 0.9):  # inside the payload, which is most of the file
        flipped = bytearray(data)
        flipped[int(len(data) * frac)] ^= 0x10
        bad = tmp_path / f"flip{frac}.pt"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=rf"flip{frac}.pt"):
            other.load(str(bad))
        _equal(before, _state(other))
        with pytest.raises(CheckpointError):
            Trainer.from_checkpoint(str(bad))
    (tmp_path / "short.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="short.pt"):
        other.load(str(tmp_path / "short.pt"))
    _equal(before, _state(other))


def test_a_checkpoint_of_another_model_size_is_refused_and_nothing_is_loaded(tmp_path):
    t = _trainer(n_embd=32)
    t.step()
    t.save(str(tmp_path / "c.pt"))
    small = _trainer(n_embd=16)
    small.step()
    before = _state(small)
    with pytest.raises(ValueError, match="another model"):
        small.load(str(tmp_path / "c.pt"))
    _equal(before, _state(small))


def test_a_checkpoint_of_another_task_is_refused(tmp_path):
    t = _trainer()
    t.save(str(tmp_path / "c.pt"))
    other = _trainer(task=_task(seed=1))  # same vocabulary and model, another eval split
    before = _state(other)
    with pytest.raises(ValueError, match=r"another task: seed=0 there, 1 here"):
        other.load(str(tmp_path / "c.pt"))
    _equal(before, _state(other))


def test_a_load_that_fails_half_way_is_rolled_back(tmp_path):
    t = _trainer("ppo")
    t.step()
    t.save(str(tmp_path / "c.pt"))
    state = read_checkpoint(str(tmp_path / "c.pt"))
    state["rng"]["sample"] = torch.zeros(3, dtype=torch.uint8)  # fails after the models and optimizers are loaded
    other = _trainer("ppo")
    other.train(steps=2, progress=False)
    before = _state(other)
    with pytest.raises(ValueError, match="nothing was loaded"):
        other.load_state_dict(state)
    _equal(before, _state(other))


def test_resume_may_change_only_the_number_of_steps(tmp_path):
    t = _trainer(steps=2)
    t.train(progress=False)
    t.save(str(tmp_path / "c.pt"))
    longer = _trainer(steps=5)
    longer.load(str(tmp_path / "c.pt"))
    assert longer.step_count == 2 and longer.config.steps == 5
    with pytest.raises(ValueError, match=r"different TrainConfig \(fields \['lr'\]"):
        _trainer(steps=2, lr=5e-4).load(str(tmp_path / "c.pt"))


# -- TrainConfig refuses bad values ---------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kw,match", [
    (dict(steps=2.5), r"TrainConfig.steps must be an int, got 2.5"),
    (dict(steps=True), r"TrainConfig.steps must be an int"),
    (dict(group_size=4.0), r"TrainConfig.group_size must be an int"),
    (dict(minibatches="2"), r"TrainConfig.minibatches must be an int"),
    (dict(use_cache="yes"), r"TrainConfig.use_cache must be a bool, got 'yes'"),
    (dict(lr=INF), r"TrainConfig.lr must be a finite number, got inf"),
    (dict(lr=NAN), r"TrainConfig.lr must be a finite number"),
    (dict(critic_lr=NAN), r"TrainConfig.critic_lr"),
    (dict(weight_decay=NAN), r"TrainConfig.weight_decay"),
    (dict(max_grad_norm=NAN), r"TrainConfig.max_grad_norm"),
    (dict(max_grad_norm=INF), r"TrainConfig.max_grad_norm"),
    (dict(temperature=INF), r"TrainConfig.temperature"),
    (dict(truncation_reward=NAN), r"TrainConfig.truncation_reward"),
    (dict(eval_every=1.5), r"TrainConfig.eval_every"),
    (dict(seed=0.5), r"TrainConfig.seed"),
    (dict(device=0), r"device"),
    (dict(device="tpu"), r"device"),
    (dict(algo=3), r"TrainConfig.algo must be a string"),
    (dict(algo_overrides={"kl_coef": NAN}), r"algo_overrides\['kl_coef'\] must be a finite number, got nan"),
    (dict(algo_overrides={"kl_coef": INF}), r"algo_overrides\['kl_coef'\]"),
    (dict(algo_overrides={"adv_eps": NAN}), r"algo_overrides\['adv_eps'\]"),
    (dict(algo_overrides={"ent_coef": NAN}), r"algo_overrides\['ent_coef'\]"),
    (dict(algo_overrides={"dual_clip": NAN}), r"algo_overrides\['dual_clip'\]"),
    (dict(algo_overrides={"eps_high": "abc"}), r"algo_overrides\['eps_high'\] must be a finite number, got 'abc'"),
    (dict(algo_overrides={"eps_high": True}), r"algo_overrides\['eps_high'\]"),
    (dict(algo_overrides={"whiten_advantages": "no"}), r"algo_overrides\['whiten_advantages'\] must be a bool"),
    (dict(algo_overrides={"norm_length": 2.5}), r"algo_overrides\['norm_length'\] must be an int"),
    (dict(top_k=True), r"TrainConfig.top_k must be an int, got True"),
    (dict(top_k=-1), r"TrainConfig.top_k = -1"),
    (dict(top_p=NAN), r"TrainConfig.top_p must be a finite number, got nan"),
    (dict(top_p=0.0), r"TrainConfig.top_p = 0.0"),
    (dict(min_p=INF), r"TrainConfig.min_p must be a finite number, got inf"),
    (dict(min_p=-0.5), r"TrainConfig.min_p = -0.5"),
    (dict(ref_sync_every=1.0), r"TrainConfig.ref_sync_every must be an int"),
    (dict(ref_sync_alpha=NAN), r"TrainConfig.ref_sync_alpha must be a finite number, got nan"),
])
def test_train_config_refuses_wrong_types_and_non_finite_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_config_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available"):
        TrainConfig(device="cuda")


def test_train_config_accepts_valid_values_and_round_trips():
    cfg = TrainConfig(steps=3, lr=1, use_cache=False, max_grad_norm=None, algo_overrides={"kl_coef": 0, "dual_clip": None},
                      top_k=4, top_p=0.9, min_p=0.1, ref_sync_every=8, ref_sync_alpha=0.6)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['nosuch'\]"):
        TrainConfig.from_dict({**cfg.to_dict(), "nosuch": 1})


def test_a_checkpoint_without_checksum_loads_with_a_warning(tmp_path, caplog):
    t = _trainer()
    t.step()
    torch.save(t.state_dict(), tmp_path / "old.pt")  # format 1: the state itself, no checksum
    other = _trainer()
    with caplog.at_level(logging.WARNING, logger="grpo_ref"):
        other.load(str(tmp_path / "old.pt"))
    assert "has no checksum" in caplog.text and other.step_count == 1
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a grpo_ref checkpoint"):
        other.load(str(tmp_path / "list.pt"))
