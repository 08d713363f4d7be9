"""The command line: its flags are derived from ``TrainConfig`` and ``AlgoConfig`` (every field a flag of its name
with help and its default; ``--algo_overrides.FIELD`` for the preset's fields), ``--config FILE`` is overridden by
the command line, ``--report_to tensorboard`` writes the scalars of metrics.jsonl, ``plot --x wall`` draws against
the summed step times, and a non-empty ``--out`` is refused. Under faults and bad input: every failure is one line
``error: ...`` on stderr, exit code 2 for bad input and 1 for a failed run, a traceback only with ``--debug``, and
nothing is created before the settings are checked; ``--resume`` refuses settings that contradict the checkpoint,
continues to the checkpoint's total, and after a real kill (SIGKILL of a subprocess, marked slow) gives the same log
and weights as the uninterrupted run.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import typing
from pathlib import Path

import pytest
import torch

from grpo_ref import __main__ as cli
from grpo_ref import _files as files_module
from grpo_ref.__main__ import main
from grpo_ref.algorithms import PRESETS, AlgoConfig
from grpo_ref.checkpoint import read_checkpoint
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import TIME_METRICS, TrainConfig, load_metrics

ROOT = Path(__file__).resolve().parents[1]
# a tiny, fast run: 3 SFT steps, a 1x32 model, 4 prompts x 4 samples, evaluation every step
TINY = ["--warm_max_steps", "3", "--n_layer", "1", "--n_embd", "32", "--prompts_per_step", "4", "--minibatches", "2",
        "--eval_every", "1", "--no_progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``python -m grpo_ref *argv`` run in-process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 2 steps (checkpoint at 2, the config's total is 2), made once and copied by each test."""
    out = tmp_path_factory.mktemp("cli") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--out", str(out), "--steps", "2", *TINY]) == 0
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _deterministic(records):
    return [{k: v for k, v in r.items() if k not in TIME_METRICS} for r in records]


# -- bad input: exit code 2 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--algo_overrides.eps_high", "abc"], r'Parser key "algo_overrides.eps_high".*Got value: abc'),
    (["--algo_overrides.kl_coef", ".nan"], r"algo_overrides\['kl_coef'\] must be a finite number, got nan"),
    (["--algo_overrides.kl_coef", "-1"], r"kl_coef"),
    (["--algo_overrides.kl_coef"], r"algo_overrides.kl_coef: expected one argument"),
    (["--algo_overrides.klcoef", "0.1"], r"unrecognized arguments: --algo_overrides.klcoef"),
    (["--algo_overrides.group_size", "3"], r"unrecognized arguments: --algo_overrides.group_size"),
    (["--algo_overrides.kl_estimator", "k9"], r"kl_estimator"),
    (["--lr", ".inf"], r"TrainConfig.lr must be a finite number, got inf"),
    (["--lr", "inf"], r'Parser key "lr".*Got value: inf'),
    (["--lr", "-1"], r"invalid TrainConfig.lr = -1.0"),
    (["--temperature", ".inf"], r"TrainConfig.temperature"),
    (["--steps", "2.5"], r'Parser key "steps".*Got value: 2.5'),
    (["--group_size", "1"], r"group_size >= 2"),
    (["--group-size", "1"], r"group_size >= 2"),  # dashes spell the same flag
    (["--nosuch", "1"], r"unrecognized arguments: --nosuch"),
    (["--prompts", "4"], r"unrecognized arguments: --prompts"),  # no abbreviations of --prompts_per_step
    (["--algo", "nosuch"], r"unknown algorithm"),
    (["--device", "tpu"], r"device 'tpu'"),
    (["--threads", "0"], r"--threads must be >= 1"),
    (["--checkpoint_every", "-1"], r"--checkpoint_every must be >= 0"),
    (["--resume", "--overwrite"], r"exclude each other"),
    (["--top_k", "-1"], r"TrainConfig.top_k = -1"),
    (["--top_k", "1.5"], r'Parser key "top_k"'),
    (["--top_p", "0"], r"TrainConfig.top_p = 0.0"),
    (["--top_p", ".nan"], r"TrainConfig.top_p must be a finite number, got nan"),
    (["--min_p", "1.5"], r"TrainConfig.min_p = 1.5"),
    (["--ref_sync_every", "-2"], r"TrainConfig.ref_sync_every = -2"),
    (["--ref_sync_alpha", "0"], r"TrainConfig.ref_sync_alpha = 0.0"),
    (["--n_layer", "0"], r"n_layer"),
    (["--warm_target", "2"], r"--warm_target"),
    (["--n_digits", "0"], r"n_digits"),
    (["--report_to", "wandb"], r"report_to"),
])
def test_bad_train_arguments_are_one_line_errors_with_exit_code_2(capsys, tmp_path, argv, match):
    code, _, err = _run(capsys, "train", "--out", tmp_path / "r", *TINY, *argv)
    assert code == 2
    assert re.search(match, _one_error_line(err)), err
    assert not (tmp_path / "r").exists()  # every setting is checked before --out is created


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "--out", tmp_path / "r", *TINY, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in _one_error_line(err)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="TrainConfig.lr") as err:
        main(["train", "--out", str(tmp_path / "r"), *TINY, "--lr", "-1", "--debug"])
    assert isinstance(err.value.__cause__, ValueError)


def test_an_existing_run_is_not_replaced_without_resume_or_overwrite(capsys, run):
    before = (run / "metrics.jsonl").read_bytes()
    code, _, err = _run(capsys, "train", "--out", run, "--steps", "1", *TINY)
    assert code == 2 and "already holds a run" in _one_error_line(err)
    assert (run / "metrics.jsonl").read_bytes() == before
    code, _, _ = _run(capsys, "train", "--out", run, "--steps", "1", *TINY, "--overwrite")
    assert code == 0 and [h["step"] for h in load_metrics(str(run))] == [0, 1]
    assert read_checkpoint(str(run / "checkpoint.pt"))["step"] == 1


@pytest.mark.parametrize("argv,match", [
    (["--lr", "0.001"], r"--lr 0.001 \(the checkpoint has 0.0003\)"),
    (["--algo", "ppo"], r"--algo ppo \(the checkpoint has grpo\)"),
    (["--group_size", "8"], r"--group_size 8"),
    (["--seed", "1"], r"--seed 1"),
    (["--n_embd", "64"], r"--n_embd 64"),
    (["--algo_overrides.eps_high", "0.28"], r"--algo_overrides.eps_high 0.28 \(the checkpoint has 0.2\)"),
    (["--warm_target", "0.5"], r"--warm_target \(only used when a run starts\)"),
    (["--top_k", "5"], r"--top_k 5 \(the checkpoint has 0\)"),
    (["--ref_sync_alpha", "0.6"], r"--ref_sync_alpha 0.6 \(the checkpoint has 1.0\)"),
    (["--max_new_tokens", "3"], r"--max_new_tokens 3 \(the checkpoint has None\)"),  # a field the old CLI lacked
])
def test_resume_refuses_settings_that_contradict_the_checkpoint(capsys, run, argv, match):
    before = (run / "checkpoint.pt").read_bytes()
    code, _, err = _run(capsys, "train", "--out", run, "--resume", "--no_progress", *argv)
    assert code == 2
    line = _one_error_line(err)
    assert "--resume continues the run with its checkpoint's settings" in line
    assert re.search(match, line), line
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_accepts_settings_equal_to_the_checkpoint_and_continues_to_its_total(capsys, tmp_path):
    out = tmp_path / "r"
    # stop early (the first evaluation reaches 0): the checkpoint is at step 1 of a 3-step run
    assert _run(capsys, "train", "--out", out, "--steps", "3", *TINY, "--stop-at", "0")[0] == 0  # the README spells it with a dash
    assert read_checkpoint(str(out / "checkpoint.pt"))["step"] == 1
    code, out_text, _ = _run(capsys, "train", "--out", out, "--resume", "--no_progress", "--lr", "3e-4", "--n_embd", "32",
                             "--algo_overrides.kl_coef", "0.04")
    assert code == 0 and "at step 1 of 3" in out_text
    assert [h["step"] for h in load_metrics(str(out))] == [0, 1, 2, 3]
    code, _, _ = _run(capsys, "train", "--out", out, "--resume", "--no_progress", "--steps", "4")  # extend
    assert code == 0 and read_checkpoint(str(out / "checkpoint.pt"))["config"]["steps"] == 4
    assert [h["step"] for h in load_metrics(str(out))] == [0, 1, 2, 3, 4]


def test_help_lists_the_sampling_and_reference_sync_flags(capsys):
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())
    for flag, words in [("--top_k", "k most likely tokens"), ("--top_p", "nucleus"), ("--min_p", "min_p *"),
                        ("--ref_sync_every", "optimizer steps"), ("--ref_sync_alpha", "alpha * policy")]:
        assert flag in text and words in text, flag


def test_sampling_and_sync_flags_reach_the_trainer(capsys, tmp_path):
    out = tmp_path / "r"
    flags = ["--top_k", "3", "--top_p", "0.9", "--min_p", "0.05", "--ref_sync_every", "3", "--ref_sync_alpha", "0.5"]
    assert _run(capsys, "train", "--out", out, "--steps", "1", *TINY, *flags)[0] == 0
    stored = read_checkpoint(str(out / "checkpoint.pt"))
    assert {k: stored["config"][k] for k in ("top_k", "top_p", "min_p", "ref_sync_every", "ref_sync_alpha")} == \
        {"top_k": 3, "top_p": 0.9, "min_p": 0.05, "ref_sync_every": 3, "ref_sync_alpha": 0.5}
    assert stored["optimizer_steps"] == 4  # 2 epochs x 2 minibatches: one sync (at 3) happened
    assert any(not torch.equal(stored["reference"][k], v) for k, v in stored["policy"].items())
    code, _, _ = _run(capsys, "train", "--out", out, "--resume", "--no_progress", "--steps", "2", *flags)
    assert code == 0 and read_checkpoint(str(out / "checkpoint.pt"))["optimizer_steps"] == 8


def test_resume_without_a_checkpoint_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "--out", tmp_path / "none", "--resume")
    assert code == 2 and "no checkpoint at" in _one_error_line(err)


# -- failed runs: exit code 1 --------------------------------------------------------------------------------------

def test_a_corrupt_checkpoint_is_a_one_line_error(capsys, run):
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / "checkpoint.pt").write_bytes(bytes(data))
    code, _, err = _run(capsys, "train", "--out", run, "--resume", "--steps", "3", "--no_progress")
    assert code == 1 and "checkpoint.pt" in _one_error_line(err) and "corrupt" in err


def test_a_non_finite_reward_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    real = AdditionTask.score

    def nan_score(self, pairs, responses):
        rewards, correct = real(self, pairs, responses)
        if len(rewards) == 16:  # training rollouts (4 prompts x 4), not the evaluation
            rewards[0] = float("nan")
        return rewards, correct

    monkeypatch.setattr(AdditionTask, "score", nan_score)
    code, _, err = _run(capsys, "train", "--out", tmp_path / "r", "--steps", "2", *TINY)
    assert code == 1 and "step 1: non-finite reward" in _one_error_line(err)


def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous_checkpoint(capsys, run, monkeypatch):
    good = (run / "checkpoint.pt").read_bytes()

    def full(path, mode="r", *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(files_module, "open", full, raising=False)
    code, _, err = _run(capsys, "train", "--out", run, "--resume", "--steps", "3", "--no_progress")
    assert code == 1 and "No space left on device" in _one_error_line(err)
    assert (run / "checkpoint.pt").read_bytes() == good


def test_without_matplotlib_train_does_not_claim_a_plot(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    code, out, err = _run(capsys, "train", "--out", tmp_path / "r", "--steps", "1", *TINY)
    assert code == 0 and "matplotlib is not installed" in err
    assert "metrics.png" not in out and not (tmp_path / "r" / "metrics.png").exists()


# -- plot ------------------------------------------------------------------------------------------------------------

def test_plot_errors_are_one_line(capsys, run, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, err = _run(capsys, "plot", run, "--out", tmp_path / "p.png", "--metric", "nosuch")
    line = _one_error_line(err)
    assert code == 2 and "no run has the metric 'nosuch'" in line and "eval_accuracy" in line and "reward_mean" in line
    assert not (tmp_path / "p.png").exists()
    code, _, err = _run(capsys, "plot", tmp_path / "missing", "--out", tmp_path / "p.png")
    assert code == 2 and "no such run folder" in _one_error_line(err)
    code, _, err = _run(capsys, "plot", run, "--out", tmp_path / "nodir" / "p.png")
    assert code == 2 and "does not exist" in _one_error_line(err)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    code, _, err = _run(capsys, "plot", run, "--out", tmp_path / "p.png")
    assert code == 1 and "metrics.jsonl line 4: not valid JSON" in _one_error_line(err)


def test_plot_one_metric_of_one_run(capsys, run, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, _ = _run(capsys, "plot", run, "--out", tmp_path / "p.png", "--metric", "reward_mean")
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0


def test_ctrl_c_saves_the_last_whole_step_and_resume_equals_the_uninterrupted_run(capsys, tmp_path, monkeypatch):
    from grpo_ref.trainer import Trainer

    real = Trainer.step

    def interrupted(self):
        if self.step_count == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "step", interrupted)
    out = tmp_path / "r"
    code, _, err = _run(capsys, "train", "--out", out, "--steps", "4", *TINY, "--checkpoint_every", "0")
    assert code == 130 and "holds step 2; --resume continues" in _one_error_line(err)
    monkeypatch.undo()
    assert _run(capsys, "train", "--out", out, "--resume", "--no_progress")[0] == 0
    straight = tmp_path / "s"
    assert _run(capsys, "train", "--out", straight, "--steps", "4", *TINY)[0] == 0
    assert _deterministic(load_metrics(str(out))) == _deterministic(load_metrics(str(straight)))


# -- a real kill ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a subprocess (its own torch import) trained, killed and resumed: 15-40 s on a busy machine
def test_sigkill_then_resume_equals_the_uninterrupted_run(capsys, tmp_path):
    """SIGKILL a training subprocess at a random point (between or during writes), resume it in-process: no step
    is repeated or lost in metrics.jsonl, and log and weights equal an uninterrupted run's."""
    killed = tmp_path / "killed"
    args = ["train", "--out", str(killed), "--steps", "100000", *TINY, "--checkpoint_every", "2", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "grpo_ref", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            log = killed / "metrics.jsonl"
            if log.exists() and log.read_text().count("\n") >= 6 and (killed / "checkpoint.pt").exists():
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    total = max(load_metrics_lines(killed), read_checkpoint(str(killed / "checkpoint.pt"))["step"]) + 2
    code, _, _ = _run(capsys, "train", "--out", killed, "--resume", "--steps", total, "--no_progress")
    assert code == 0
    straight = tmp_path / "straight"
    assert _run(capsys, "train", "--out", straight, "--steps", total, *TINY, "--checkpoint_every", "2")[0] == 0
    a, b = load_metrics(str(killed)), load_metrics(str(straight))
    assert [r["step"] for r in a] == list(range(total + 1))
    assert _deterministic(a) == _deterministic(b)
    ca, cb = read_checkpoint(str(killed / "checkpoint.pt")), read_checkpoint(str(straight / "checkpoint.pt"))
    assert all(torch.equal(ca["policy"][k], cb["policy"][k]) for k in cb["policy"])


def load_metrics_lines(run: Path) -> int:
    """Complete lines in a (possibly half-written) metrics.jsonl."""
    return (run / "metrics.jsonl").read_text().count("\n")


# -- the parser: derived from TrainConfig and AlgoConfig -------------------------------------------------------------

def _train_actions() -> dict:
    import jsonargparse

    return {a.dest: a for a in cli._train_parser(jsonargparse)._actions}


def _help_text(capsys, *argv) -> str:
    code, out, _ = _run(capsys, *argv, "--help")
    assert code == 0
    return " ".join(out.split())


def test_every_train_config_field_has_a_flag_of_its_name_with_help_and_its_default(capsys):
    actions = _train_actions()
    text = _help_text(capsys, "train")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "algo_overrides":  # a dict: its keys are the --algo_overrides.FIELD flags below
            continue
        action = actions.get(f.name)
        assert action is not None and f"--{f.name}" in action.option_strings, f.name
        assert action.help and action.help.strip(), f"--{f.name} has no help"
        assert action.default == f.default, (f.name, action.default, f.default)
        assert f"--{f.name}" in text, f.name
    # the defaults are what --help prints too, e.g. TrainConfig's lr and minibatches
    assert "--lr LR policy learning rate (AdamW) (type: float, default: 0.0003)" in text
    assert f"default: {TrainConfig().minibatches})" in text


def test_every_algo_config_field_is_an_override_of_the_preset_with_help(capsys):
    actions = _train_actions()
    text = _help_text(capsys, "train")
    for f in dataclasses.fields(AlgoConfig):
        dest = f"algo_overrides.{f.name}"
        if f.name in ("name", "group_size"):  # the preset's name, and TrainConfig.group_size
            assert dest not in actions
            continue
        assert dest in actions and actions[dest].help.strip(), f.name
        assert actions[dest].default is argparse.SUPPRESS, f.name  # not given: the preset's value stays
        assert f"--{dest}" in text
        assert f"(grpo: {json.dumps(getattr(PRESETS['grpo'], f.name))})" in actions[dest].help, f.name


def test_a_field_without_help_or_comment_would_have_no_help():
    """The help check above can fail: a field that neither the table nor a source comment describes gets ''."""
    @dataclasses.dataclass
    class Undocumented:
        x: int = 1
        y: int = 2  # the y

    assert cli.field_help(Undocumented, "x") == ""
    assert cli._field_comments(Undocumented) == {"y": "the y"}


def _value_for(hint, default):
    """A command-line spelling of a value of ``hint`` other than ``default``, and the value it parses to."""
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is bool:
        return "true", True
    if base is int:
        return str((default or 0) + 3), (default or 0) + 3
    if base is float:
        return "0.125", 0.125
    return "some_text", "some_text"


def test_every_train_config_flag_reaches_its_field():
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "algo_overrides":
            continue
        text, value = _value_for(hints[f.name], f.default)
        command, given = cli.parse(["train", "--out", "x", f"--{f.name}", text])
        assert command == "train" and given == {"out": "x", f.name: value}, f.name
        # the dashed spelling is the same flag
        assert cli.parse(["train", "--out", "x", f"--{f.name.replace('_', '-')}", text])[1] == given


def test_algo_overrides_reach_the_algo_config(capsys, tmp_path):
    _, given = cli.parse(["train", "--out", "x", "--algo", "dapo", "--algo_overrides.kl_coef", "0.5",
                          "--algo_overrides.dual_clip", "null", "--algo-overrides.filter-groups", "false"])
    assert given["algo_overrides"] == {"kl_coef": 0.5, "dual_clip": None, "filter_groups": False}
    algo = cli._train_config(given).algo_config()
    assert (algo.name, algo.kl_coef, algo.filter_groups, algo.eps_high) == ("dapo", 0.5, False, 0.28)
    out = tmp_path / "r"
    assert _run(capsys, "train", "--out", out, "--steps", "1", *TINY, "--algo_overrides.eps_high", "0.3")[0] == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["train"]["algo_overrides"] == {"eps_high": 0.3} and stored["algo"]["eps_high"] == 0.3


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_values_are_used_and_the_command_line_overrides_them(tmp_path, suffix):
    settings = {"lr": 0.001, "seed": 7, "algo": "dr_grpo", "algo_overrides": {"kl_coef": 0.1, "eps_high": 0.3},
                "n_embd": 16, "top_k": 5}
    path = tmp_path / f"c.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("lr: 0.001\nseed: 7\nalgo: dr_grpo\nalgo_overrides:\n  kl_coef: 0.1\n  eps_high: 0.3\n"
                        "n_embd: 16\ntop_k: 5\n")
    _, given = cli.parse(["train", "--out", "x", "--config", str(path)])
    assert given == {"out": "x", **settings}
    # the command line wins over the file, whether it comes before or after --config
    for argv in (["--seed", "1", "--config", str(path), "--algo_overrides.kl_coef", "0"],
                 ["--config", str(path), "--seed", "1", "--algo_overrides.kl_coef", "0"]):
        _, given = cli.parse(["train", "--out", "x", *argv])
        assert given["seed"] == 1 and given["algo_overrides"] == {"kl_coef": 0.0, "eps_high": 0.3}
        assert given["lr"] == 0.001 and given["algo"] == "dr_grpo"


def test_a_config_file_with_an_unknown_key_or_a_bad_value_is_a_one_line_error(capsys, tmp_path):
    for text, match in [("lr: 0.001\nnosuch: 1\n", "nosuch"), ("steps: many\n", "steps"),
                        ("algo_overrides:\n  klcoef: 0.1\n", "klcoef")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        code, _, err = _run(capsys, "train", "--out", tmp_path / "r", "--config", path)
        assert code == 2 and match in _one_error_line(err), err
    code, _, err = _run(capsys, "train", "--out", tmp_path / "r", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in _one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_a_config_file_run_and_resume_with_the_same_file(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("warm_max_steps: 3\nn_layer: 1\nn_embd: 32\nprompts_per_step: 4\nminibatches: 2\n"
                    "eval_every: 1\nno_progress: true\nsteps: 1\nseed: 3\n")
    out = tmp_path / "r"
    assert _run(capsys, "train", "--config", path, "--out", out, "--lr", "0.001")[0] == 0
    stored = read_checkpoint(str(out / "checkpoint.pt"))["config"]
    assert (stored["seed"], stored["lr"], stored["prompts_per_step"], stored["steps"]) == (3, 0.001, 4, 1)
    # --resume with the file: its settings equal the checkpoint's, except those only used at the start
    path.write_text("n_layer: 1\nn_embd: 32\nprompts_per_step: 4\nminibatches: 2\neval_every: 1\nseed: 3\n")
    code, _, err = _run(capsys, "train", "--config", path, "--out", out, "--resume", "--steps", "2", "--lr", "0.001")
    assert code == 0, err
    assert [h["step"] for h in load_metrics(str(out))] == [0, 1, 2]


def test_without_jsonargparse_the_command_line_names_the_extra_to_install(capsys, monkeypatch):
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("jsonargparse") for req in extras["cli"])
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # import jsonargparse -> ImportError
    code, _, err = _run(capsys, "--help")
    assert code == 1
    assert f'pip install "{name}[cli]"' in _one_error_line(err) and "jsonargparse" in err


def test_threads_defaults_to_one_and_says_why(capsys):
    action = _train_actions()["threads"]
    assert action.default == 1
    assert "benchmarks/threads.py" in action.help and "threads.txt" in action.help
    assert (ROOT / "benchmarks" / "results" / "threads.txt").exists()


# -- --out is not silently overwritten -------------------------------------------------------------------------------

def test_a_non_empty_out_is_refused_and_overwrite_keeps_files_that_are_not_the_run(capsys, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "train", "--out", out, "--steps", "1", *TINY)
    assert code == 2 and "is not empty (notes.txt)" in _one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _run(capsys, "train", "--out", out, "--steps", "1", *TINY, "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint.pt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    assert _run(capsys, "train", "--out", empty, "--steps", "0", *TINY)[0] == 0


# -- TensorBoard ------------------------------------------------------------------------------------------------------

def _tensorboard_scalars(out: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl_scalars(out: Path) -> dict:
    scalars: dict = {}
    for rec in load_metrics(str(out)):
        for key, value in rec.items():
            if key != "step":
                scalars.setdefault(key, []).append((rec["step"], value))
    return scalars


def _assert_same_scalars(board: dict, log: dict):
    assert sorted(board) == sorted(log)
    for tag, points in log.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        assert [v for _, v in board[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30), tag  # float32


def test_report_to_tensorboard_writes_the_scalars_of_metrics_jsonl(capsys, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    code, text, _ = _run(capsys, "train", "--out", out, "--steps", "2", *TINY, "--report-to", "tensorboard")
    assert code == 0 and "tensorboard/" in text
    log = _jsonl_scalars(out)
    assert {"eval_accuracy", "reward_mean", "time_step_s"} <= set(log) and len(log["reward_mean"]) == 2
    _assert_same_scalars(_tensorboard_scalars(out), log)
    # a resumed run writes its whole history after a restart marker: TensorBoard shows exactly metrics.jsonl
    code, _, err = _run(capsys, "train", "--out", out, "--resume", "--steps", "3", "--no_progress",
                        "--report_to", "tensorboard")
    assert code == 0, err
    _assert_same_scalars(_tensorboard_scalars(out), _jsonl_scalars(out))
    assert [s for s, _ in _tensorboard_scalars(out)["reward_mean"]] == [1, 2, 3]


def test_without_report_to_no_tensorboard_folder(capsys, run):
    assert not (run / "tensorboard").exists()


def test_report_to_tensorboard_without_tensorboard_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, _, err = _run(capsys, "train", "--out", tmp_path / "r", *TINY, "--report_to", "tensorboard")
    assert code == 2 and "pip install tensorboard" in _one_error_line(err)
    assert not (tmp_path / "r").exists()


# -- plot --x wall ----------------------------------------------------------------------------------------------------

def test_plot_x_wall_draws_against_the_cumulative_step_time(capsys, run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from grpo_ref import plotting

    seen = {}
    real_compare, real_run = plotting.compare_runs, plotting.plot_run

    def compare_spy(runs, metric, x, path):
        seen["compare"] = x
        return real_compare(runs, metric, x, path)

    def run_spy(history, path, title="", x="step"):
        seen["run"] = x
        return real_run(history, path, title=title, x=x)

    monkeypatch.setattr(plotting, "compare_runs", compare_spy)
    monkeypatch.setattr(plotting, "plot_run", run_spy)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert _run(capsys, "plot", run, other, "--out", tmp_path / "c.png", "--x", "wall")[0] == 0
    assert _run(capsys, "plot", run, "--out", tmp_path / "d.png", "--x", "wall")[0] == 0
    assert seen == {"compare": "wall", "run": "wall"} and (tmp_path / "c.png").stat().st_size > 0
    records = load_metrics(str(run))
    xs, _ = plotting.series(records, "reward_mean", "wall")
    steps = [r for r in records if "reward_mean" in r]
    assert xs == pytest.approx([sum(r["time_step_s"] for r in steps[:i + 1]) for i in range(len(steps))])
    code, _, err = _run(capsys, "plot", run, "--out", tmp_path / "e.png", "--x", "hours")
    assert code == 2 and "hours" in _one_error_line(err)


# -- the book's page book/cli.md shows what the command line does ---------------------------------------------------


CLI_PAGE = ROOT / "book" / "cli.md"


def _blocks(lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", CLI_PAGE.read_text(), re.S)


def _help_of(capsys, monkeypatch, *argv) -> str:
    monkeypatch.setenv("COLUMNS", "88")  # the page's width (tests/test_book_layout.py: code lines <= 88 columns)
    code, out, _ = _run(capsys, *argv, "--help")
    assert code == 0
    return out


def test_the_help_shown_in_the_book_is_the_help_of_the_command(capsys, monkeypatch):
    usages = {"usage: python -m grpo_ref {": (), "usage: python -m grpo_ref plot": ("plot",)}
    shown = [b for b in _blocks("text") if b.startswith("usage: python -m grpo_ref")]
    assert len(shown) == 2
    for block in shown:
        argv = next(v for prefix, v in usages.items() if block.startswith(prefix))
        assert block.rstrip("\n") == _help_of(capsys, monkeypatch, *argv).rstrip("\n"), argv
    train = _help_of(capsys, monkeypatch, "train")
    excerpts = [b for b in _blocks("text") if b.startswith(("the run:", "AlgoConfig overrides:"))]
    assert len(excerpts) == 2
    for block in excerpts:
        text = block.rstrip("\n").removesuffix("\n  ...")
        assert text in train, text[:40]


def test_every_command_in_the_book_parses(monkeypatch, tmp_path):
    (yaml_text,) = _blocks("yaml")
    (tmp_path / "grpo.yaml").write_text(yaml_text)
    monkeypatch.chdir(tmp_path)
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python -m grpo_ref"):
                commands.append(shlex.split(line, comments=True)[3:])
    assert len(commands) >= 10
    (inline_json,) = re.findall(r"The JSON file `(\{.*?\})`", CLI_PAGE.read_text().replace("\n", " "))
    (tmp_path / "grpo.json").write_text(inline_json)
    assert cli.parse(["train", "--out", "x", "--config", "grpo.json"])[1] == {"out": "x", **json.loads(inline_json)}
    for argv in commands:
        command, given = cli.parse(argv)
        if "--config" in argv:
            assert given["algo_overrides"] == {"eps_high": 0.28, "kl_coef": 0.0} and given["stop_at"] == 0.9


def test_the_error_shown_in_the_book_is_the_error_of_the_command(capsys, tmp_path):
    (block,) = [b for b in _blocks("text") if b.startswith("$ python -m grpo_ref")]
    command, *shown = block.strip().splitlines()
    argv = shlex.split(command)[4:]
    argv[argv.index("--out") + 1] = str(tmp_path / "g1")
    code, _, err = _run(capsys, *argv)
    assert code == 2 and _one_error_line(err) == " ".join(shown)
