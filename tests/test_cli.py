"""The command line under faults and bad input: every failure is one line ``error: ...`` on stderr, exit code 2 for
bad input and 1 for a failed run, a traceback only with ``--debug``; ``--resume`` refuses settings that contradict
the checkpoint, continues to the checkpoint's total, and after a real kill (SIGKILL of a subprocess) gives the
same log and weights as the uninterrupted run.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_ref import _files as files_module
from grpo_ref.__main__ import main
from grpo_ref.checkpoint import read_checkpoint
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import TIME_METRICS, load_metrics

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
