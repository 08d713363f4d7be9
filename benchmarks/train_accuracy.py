"""Wall time and sampled completions for every preset to reach 90% eval accuracy on 2-digit addition.

    python benchmarks/train_accuracy.py [--seeds 0 1 2] [--algos grpo dr_grpo ppo ppo:critic=shared ...]
        [--budget-s 450] [--target-s 300] [--threads 1] [--out FILE]
    python benchmarks/train_accuracy.py --merge A.json B.json ... [--out FILE]

(``--prompts``, ``--eval-every`` and ``--warm-max-steps`` shrink it to the smoke run of the test suite.)

A run is named by a preset of :data:`grpo_ref.algorithms.PRESETS`, optionally followed by ``TrainConfig`` overrides,
e.g. ``ppo:critic=shared`` (PPO with a value head on the policy's trunk) or ``ppo:critic_layers=1`` (a one-block
critic). For every (run, seed): warm-start a TinyGPT by SFT until 20% greedy accuracy on training prompts
(``warm_start_policy``, seeded), then train with the package defaults of :class:`TrainConfig`, those overrides and
that seed, evaluating greedily on the 256 held-out eval sums every 25 steps, until the eval accuracy reaches 90% or
the wall-time budget (RL only, evaluation included) runs out. Every run gets the same ``--budget-s``; the summary
also counts the seeds that reached the target within ``--target-s`` (the 5-minute target). The warm start depends
on the seed only, so it is trained once per seed and copied into every run of that seed (its time is reported).

Run it on an otherwise idle machine, or as two shards on two cores with one thread each (``--algos`` split
between them, then ``--merge``): other jobs on the same core slow the steps down, so the load average is printed
before and after every run. Prints the accuracy curve of every run and a summary table, and writes them to
benchmarks/results/train_accuracy.txt (curves as JSON in train_accuracy_curves.json beside it; ``--out X.txt`` writes
``X_curves.json``, so two shards may share a folder).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import fields
import json
import os
import platform
import statistics
import time
from typing import Optional

import torch

from grpo_ref.rollout import evaluate
from grpo_ref.sft import warm_start_policy
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig


def parse_spec(spec: str) -> tuple:
    """``"ppo:critic=shared,critic_layers=0"`` -> ``("ppo", {"critic": "shared", "critic_layers": 0})`` (values typed
    as the TrainConfig field)."""
    algo, _, rest = spec.partition(":")
    hints = {f.name: f.type for f in fields(TrainConfig)}
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in hints:
            raise SystemExit(f"unknown TrainConfig field {key!r} in {spec!r}")
        default = getattr(TrainConfig(), key)
        overrides[key] = type(default)(value) if default is not None else value
    return algo, overrides


def warm_start(task, seed: int, warm_max_steps: int, cache: dict) -> tuple:
    """The seed's SFT warm start and its training time, trained on the first request and copied afterwards."""
    if seed not in cache:
        t0 = time.perf_counter()
        policy = warm_start_policy(task, target_accuracy=0.2, steps=warm_max_steps, seed=seed)
        cache[seed] = (policy, time.perf_counter() - t0)
    policy, warm_s = cache[seed]
    return copy.deepcopy(policy), warm_s


def run_one(spec: str, seed: int, budget_s: float, target: float, log, prompts: int = TrainConfig.prompts_per_step,
            eval_every: int = 25, warm_max_steps: int = 3000, cache: Optional[dict] = None) -> dict:
    algo, overrides = parse_spec(spec)
    task = AdditionTask(n_digits=2, eval_size=256, seed=0)
    policy, warm_s = warm_start(task, seed, warm_max_steps, {} if cache is None else cache)
    cfg = TrainConfig(algo=algo, seed=seed, steps=100_000, eval_every=eval_every, prompts_per_step=prompts, **overrides)
    trainer = Trainer(policy, task, cfg)
    start_acc = evaluate(policy, task)[0]
    log(f"[{spec} seed {seed}] warm start: {warm_s:.1f} s, eval accuracy {start_acc:.3f}; "
        f"G={cfg.group_size} prompts/step={cfg.prompts_per_step} lr={cfg.lr} mu={cfg.ppo_epochs} minibatches={cfg.minibatches}")
    curve = [(0, 0, 0.0, start_acc)]
    samples, t_rl, reached = 0, time.perf_counter(), None
    while True:
        m = trainer.step()
        samples += int(m.get("samples", 0))
        elapsed = time.perf_counter() - t_rl
        if "eval_accuracy" in m:
            curve.append((int(m["step"]), samples, round(elapsed, 1), m["eval_accuracy"]))
            log(f"  step {int(m['step']):5d}  samples {samples:7d}  {elapsed:6.1f} s  eval acc {m['eval_accuracy']:.3f}  "
                f"reward {m['reward_mean']:.3f}  kl {m['kl_to_ref']:.3f}  entropy {m.get('entropy', float('nan')):.3f}")
            if m["eval_accuracy"] >= target:
                reached = curve[-1]
                break
        if elapsed > budget_s:
            break
    result = {"label": spec, "algo": algo, "overrides": overrides, "seed": seed, "warm_start_s": round(warm_s, 1), "start_accuracy": start_acc,
              "reached": reached is not None, "steps": curve[-1][0], "samples": curve[-1][1], "wall_s": curve[-1][2],
              "final_accuracy": curve[-1][3], "best_accuracy": max(c[3] for c in curve), "curve": curve}
    log(f"[{spec} seed {seed}] " + (f"reached {target:.0%} at step {reached[0]}, {reached[1]} samples, {reached[2]} s"
                                      if reached else f"did NOT reach {target:.0%} within {budget_s:.0f} s (best {result['best_accuracy']:.3f})"))
    return result


def summarize(results: list, budget_s: float, target: float, log) -> None:
    """The table: per run label, how many seeds reached the target, how many within ``budget_s``, and the medians."""
    log("")
    log(f"summary: steps, sampled completions and RL wall time to {target:.0%} greedy eval accuracy (or the best reached), "
        "per seed, from each seed's warm start")
    log(f"{'run':26s} {'reached':>8s} {'in ' + str(int(budget_s)) + ' s':>8s} {'median s':>9s} {'median samples':>15s}  per seed")
    for label in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == label]
        ok = [r for r in rs if r["reached"]]
        in_budget = [r for r in ok if r["wall_s"] <= budget_s]
        cells = [f"s{r['seed']}: " + (f"{r['steps']} steps / {r['samples']} / {r['wall_s']:.0f} s" if r["reached"]
                                       else f"best {r['best_accuracy']:.2f} in {r['wall_s']:.0f} s") for r in rs]
        med_s = f"{statistics.median(r['wall_s'] for r in ok):9.0f}" if ok else f"{'-':>9s}"
        med_n = f"{int(statistics.median(r['samples'] for r in ok)):15d}" if ok else f"{'-':>15s}"
        log(f"{label:26s} {len(ok):>5d}/{len(rs):<2d} {len(in_budget):>5d}/{len(rs):<2d} {med_s} {med_n}  " + "; ".join(cells))


def curves_file(out: str) -> str:
    """The JSON curves beside a log: ``X.txt`` -> ``X_curves.json`` (two shards in one folder keep theirs apart)."""
    base = os.path.abspath(out)
    return (base[:-4] if base.endswith(".txt") else base) + "_curves.json"


def log_file(curves: str) -> str:
    """The log a curves file was written beside (the inverse of :func:`curves_file`)."""
    if not curves.endswith("_curves.json"):
        raise ValueError(f"--merge takes the *_curves.json files of shards, got {curves!r}")
    return curves[: -len("_curves.json")] + ".txt"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", nargs="+", default=["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo",
                                                     "ppo:critic=shared"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget-s", type=float, default=450.0, help="RL wall-time budget of every run")
    ap.add_argument("--target-s", type=float, default=300.0, help="the summary counts the seeds within this time")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=TrainConfig.prompts_per_step)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--warm-max-steps", type=int, default=3000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_accuracy.txt"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only write the summary of these shards' curve files")
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    curves_path = curves_file(args.out)
    out = open(args.out, "w")

    def log(line: str) -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    if args.merge:
        results, texts = [], []
        for path in args.merge:
            with open(path) as fh:
                results += json.load(fh)
            with open(log_file(path)) as fh:  # the shard's log
                texts.append(fh.read().split("\nsummary:")[0].rstrip("\n"))
        for text in texts:
            log(text)
        summarize(results, args.target_s, args.target, log)
        with open(curves_path, "w") as fh:
            json.dump(results, fh, indent=1)
        return
    torch.set_num_threads(args.threads)
    log("Every preset on 2-digit addition (TinyGPT 2x128, SFT warm start to ~20%), target "
        f"{args.target:.0%} greedy eval accuracy on 256 held-out sums, RL wall time counted per run")
    log(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads}; "
        f"budget: {args.budget_s:.0f} s per run; "
        "wall times include the periodic evaluations")
    results, cache = [], {}
    for spec in args.algos:
        for seed in args.seeds:
            load0 = os.getloadavg()[0]
            r = run_one(spec, seed, args.budget_s, args.target, log, prompts=args.prompts, eval_every=args.eval_every,
                        warm_max_steps=args.warm_max_steps, cache=cache)
            r["load_avg_1min"] = (round(load0, 2), round(os.getloadavg()[0], 2))
            log(f"  load average (1 min) before / after: {r['load_avg_1min'][0]} / {r['load_avg_1min'][1]}")
            results.append(r)
    summarize(results, args.target_s, args.target, log)
    with open(curves_path, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
