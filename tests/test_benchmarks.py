"""The benchmark scripts run, with small parameters, and write what the book reads.

Chapter 3 reads and asserts the committed results of ``benchmarks/grpo_vs_ppo.py`` and
``benchmarks/train_accuracy.py``; these tests run each script end to end on a few steps of a few prompts (so CI
exercises the code that produced the committed numbers) and check that a fresh run writes the same fields, per run
and per step, as the committed files hold: a script changed without re-running its benchmark fails here.
Nothing is timed. Marked ``slow`` (each test trains a tiny model for a few steps).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def committed(name: str):
    return json.loads((BENCH / "results" / name).read_text())


def test_grpo_vs_ppo_smoke_run_writes_what_chapter_3_reads(tmp_path):
    out, js = tmp_path / "gvp.txt", tmp_path / "gvp.json"
    printed = run_script("grpo_vs_ppo.py", "--steps", "3", "--prompts", "4", "--seeds", "0", "--warm-max-steps", "5",
                         "--eval-every", "2", "--out", str(out), "--json", str(js))
    assert out.read_text().strip() == printed.strip()
    runs = json.loads(js.read_text())
    assert [(r["algo"], r["seed"]) for r in runs] == [("grpo", 0), ("ppo", 0)]
    for r in runs:
        hist = r["history"]
        # an evaluation before the first step, every --eval-every steps, and always after the last one
        assert [h["step"] for h in hist] == [0, 1, 2, 3]
        assert [h["step"] for h in hist if "eval_accuracy" in h] == [0, 2, 3]
        assert hist[0]["eval_accuracy"] == r["warm_accuracy"] and hist[-1]["eval_accuracy"] == r["final_accuracy"]
        assert all(h["samples"] == 4 * r["group_size"] for h in hist[1:])
    assert "value_mean" in runs[1]["history"][1] and "value_mean" not in runs[0]["history"][1]  # PPO has a critic

    full = committed("grpo_vs_ppo.json")
    assert {(r["algo"], r["seed"]) for r in full} >= {(a, s) for a in ("grpo", "ppo") for s in (0, 1, 2)}
    for fresh in runs:
        old = next(r for r in full if r["algo"] == fresh["algo"])
        assert set(fresh) == set(old), "the committed results were written by another version of the script"
        # the per-kind response lengths were added to the step's metrics after these runs; nothing else may differ
        added = {"response_length_correct", "response_length_incorrect"}
        assert set(old["history"][1]) <= set(fresh["history"][1]) <= set(old["history"][1]) | added
        assert [h["step"] for h in old["history"]] == list(range(old["steps"] + 1))


def test_train_accuracy_smoke_run_writes_what_chapter_3_reads(tmp_path):
    out = tmp_path / "acc.txt"
    # target 0: reached at the first evaluation; one step of GRPO on 4 prompts
    run_script("train_accuracy.py", "--algos", "grpo", "--seeds", "0", "--target", "0.0", "--prompts", "4",
               "--eval-every", "1", "--warm-max-steps", "5", "--threads", "1", "--out", str(out))
    (fresh,) = json.loads((tmp_path / "acc_curves.json").read_text())
    assert fresh["reached"] and fresh["steps"] == 1 and fresh["samples"] == 4 * 4
    assert "summary" in out.read_text()
    full = committed("train_accuracy_curves.json")
    assert set(fresh) == set(full[0]), "the committed results were written by another version of the script"


def test_kv_cache_benchmark_smoke_run(tmp_path):
    out = tmp_path / "kv.txt"
    printed = run_script("kv_cache.py", "--new-tokens", "4", "--batch", "2", "--repeats", "1", "--out", str(out))
    assert "same tokens: True" in printed and out.read_text().strip() == printed.strip()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from Linux's /proc")
def test_logprobs_speed_benchmark_smoke_run():
    printed = run_script("logprobs_speed.py", "--small", "--repeats", "1")
    for method in ("naive", "fused"):
        assert method in printed
    committed_text = (BENCH / "results" / "logprobs_speed.txt").read_text()
    assert "x naive" in printed and "x naive" in committed_text


def test_loop_vs_trl_smoke_run_prints_what_the_performance_page_reads(tmp_path):
    """One alternation of one timed rollout on 8 prompts: every arm runs (TRL's GRPOTrainer on the GPT-2 copy, whose
    logits the script checks against the TinyGPT's) and the printed medians have the committed file's format."""
    pytest.importorskip("trl")
    out = tmp_path / "loop.txt"
    printed = run_script("loop_vs_trl.py", "--pairs", "1", "--rollouts", "1", "--prompts", "8", "--warm-max-steps", "5",
                         "--out", str(out))
    median = re.compile(r"^(\S+)\s+median\s+[\d.]+ completions/s\s+\([\d.]+x TRL\)", re.M)
    arms = median.findall(printed)
    assert arms == ["trl", "grpo_ref", "grpo_ref_sampler", "grpo_ref_groups"] and out.read_text().strip() == printed.strip()
    assert median.findall((BENCH / "results" / "loop_vs_trl.txt").read_text()) == arms


def test_variants_smoke_run_and_merge(tmp_path):
    """Two shards of benchmarks/variants.py (a preset, and an ablation overriding an AlgoConfig field and a
    TrainConfig field), merged: every run has its per-step history, the override reached the trainer, and the
    merge keeps every run."""
    common = ["--steps", "2", "--prompts", "4", "--seeds", "0", "--warm-max-steps", "5", "--eval-every", "1"]
    run_script("variants.py", "--specs", "grpo", *common, "--lr", "2e-4", "--out", str(tmp_path / "a.txt"), "--json",
               str(tmp_path / "a.json"))
    run_script("variants.py", "--specs", "dapo:eps_high=0.2,ppo_epochs=1", *common, "--out", str(tmp_path / "b.txt"),
               "--json", str(tmp_path / "b.json"))
    run_script("variants.py", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
               str(tmp_path / "m.txt"), "--json", str(tmp_path / "m.json"))
    runs = json.loads((tmp_path / "m.json").read_text())
    assert [r["spec"] for r in runs] == ["grpo", "dapo:eps_high=0.2,ppo_epochs=1"]
    assert runs[1]["algo_config"]["eps_high"] == 0.2 and runs[1]["train_config"]["ppo_epochs"] == 1
    assert runs[0]["train_config"]["lr"] == 2e-4 and runs[1]["train_config"]["lr"] == 1e-4  # --lr and its default
    assert runs[0]["algo_config"]["name"] == "grpo" and runs[1]["algo_config"]["name"] == "dapo"
    for r in runs:
        assert [h["step"] for h in r["history"]] == [0, 1, 2]
        assert all("eval_accuracy" in h for h in r["history"])
        assert all({"response_length", "entropy", "clip_frac_high", "kl_to_ref"} <= set(h) for h in r["history"][1:])
    sys.path.insert(0, str(BENCH))
    try:
        from variants import parse_spec, run_summary
    finally:
        sys.path.remove(str(BENCH))
    table = (tmp_path / "m.txt").read_text().splitlines()
    assert [line.split()[0] for line in table[2:]] == ["grpo", "dapo:eps_high=0.2,ppo_epochs=1"]
    hist = [{"step": 0, "eval_accuracy": 0.5}] + [
        {"step": k, "samples": 10, "time_step_s": 0.5, "response_length_correct": float(k),
         "response_length_incorrect": 2.0 * k, "entropy": 1.0, "clip_frac_low": 0.0, "clip_frac_high": 0.1,
         "kl_to_ref": 0.01 * k, **({"eval_accuracy": 0.6 + 0.1 * k} if k % 2 == 0 else {})} for k in range(1, 7)]
    run = {"spec": "x", "seed": 0, "warm_accuracy": 0.5, "final_accuracy": hist[-1]["eval_accuracy"], "history": hist}
    got = run_summary(run, target=0.75, tail=2)  # evals 0.8 at step 2 (first >= 0.75), 1.0 at 4, 1.2 at 6
    assert got["to_target"] == {"step": 2, "samples": 20, "seconds": 1.0} and got["best"] == hist[-1]["eval_accuracy"]
    assert got["response_length_correct"] == 5.5 and got["response_length_incorrect"] == 11.0
    assert got["kl_to_ref"] == pytest.approx(0.055)
    assert run_summary(run, target=2.0, tail=2)["to_target"] is None
    train, algo = parse_spec("dapo:eps_high=0.2,ppo_epochs=1")
    assert train == {"algo": "dapo", "ppo_epochs": 1, "algo_overrides": {"eps_high": 0.2}} and algo == {"eps_high": 0.2}
    train, algo = parse_spec("dapo:max_new_tokens=10,truncation=mask,max_response_length=10,overlong_buffer=4")
    assert train["max_new_tokens"] == 10 and train["truncation"] == "mask"  # None default: a JSON number is a number
    assert algo == {"max_response_length": 10, "overlong_buffer": 4}
    assert parse_spec("grpo:adv_estimator=process")[1] == {"adv_estimator": "process"}
    with pytest.raises(SystemExit, match="nope"):
        parse_spec("grpo:nope=1")


def test_advantage_variance_smoke_run_writes_what_chapter_5_reads(tmp_path):
    """The fields chapter 5 reads from ``advantage_variance.json`` are what a fresh run writes; the identities the
    script relies on hold on its own output: Dr. GRPO's group mean is (G - 1) / G times RLOO's advantage, so both
    have the same noise-to-signal ratio and bias statistic, and REINFORCE is its own reference (cos 1, c 1)."""
    out, js = tmp_path / "av.txt", tmp_path / "av.json"
    printed = run_script("advantage_variance.py", "--batches", "3", "--prompts", "4", "--seeds", "0",
                         "--warm-max-steps", "5", "--out", str(out), "--json", str(js))
    assert out.read_text().strip() == printed.strip()
    fresh, kept = json.loads(js.read_text()), committed("advantage_variance.json")
    assert [r["seed"] for r in kept] == [0, 1, 2] and all(r["batches"] >= 256 for r in kept)
    for run in (fresh[0], *kept):
        assert set(run) == set(kept[0]) and set(run["per_sequence"]) == set(kept[0]["per_sequence"])
        est = run["estimators"]
        assert set(est) == set(kept[0]["estimators"])
        assert all(set(e) == set(est["grpo"]) for e in est.values())
        # (float32 gradients summed in float64: equal to rounding, on any CPU well inside 1e-4)
        assert est["rloo"]["noise_to_signal"] == pytest.approx(est["group_mean"]["noise_to_signal"], rel=1e-4)
        assert est["reinforce"]["cos_to_reinforce"] == pytest.approx(1.0) and est["reinforce"]["scale"] == 1.0
        g = run["group_size"]
        assert est["group_mean"]["fitted_scale"] == pytest.approx((g - 1) / g * est["rloo"]["fitted_scale"], rel=1e-4)
