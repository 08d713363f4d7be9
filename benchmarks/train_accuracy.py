"""Wall time and sampled completions for GRPO and PPO to reach 90% eval accuracy on 2-digit addition.

    python benchmarks/train_accuracy.py [--seeds 0 1 2] [--algos grpo ppo] [--budget-s 300] [--ppo-budget-s 600] [--threads 2]

(``--prompts``, ``--eval-every`` and ``--warm-max-steps`` shrink it to the smoke run of the test suite.)

For every (algorithm, seed): warm-start a TinyGPT by SFT until 20% greedy accuracy on training prompts
(``warm_start_policy``, seeded), then train with the package defaults of :class:`TrainConfig` and that seed,
evaluating greedily on the 256 held-out eval sums every 25 steps, until the eval accuracy reaches 90% or the
wall-time budget (RL only, evaluation included) runs out. GRPO gets ``--budget-s`` (the 5-minute target);
PPO, about twice as expensive per step (its critic is a second transformer), gets ``--ppo-budget-s``, and the
summary says whether it also made it within ``--budget-s``.

Run it on an otherwise idle machine: other jobs on the cores slow the steps down, so the load average is printed
before and after every run. Prints the accuracy curve of every run and a summary, and writes them to
benchmarks/results/train_accuracy.txt (curves also as JSON in train_accuracy_curves.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from grpo_ref.rollout import evaluate
from grpo_ref.sft import warm_start_policy
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig


def run_one(algo: str, seed: int, budget_s: float, target: float, log, prompts: int = TrainConfig.prompts_per_step,
            eval_every: int = 25, warm_max_steps: int = 3000) -> dict:
    task = AdditionTask(n_digits=2, eval_size=256, seed=0)
    t0 = time.perf_counter()
    policy = warm_start_policy(task, target_accuracy=0.2, steps=warm_max_steps, seed=seed)
    warm_s = time.perf_counter() - t0
    cfg = TrainConfig(algo=algo, seed=seed, steps=100_000, eval_every=eval_every, prompts_per_step=prompts)
    trainer = Trainer(policy, task, cfg)
    start_acc = evaluate(policy, task)[0]
    log(f"[{algo} seed {seed}] warm start: {warm_s:.1f} s, eval accuracy {start_acc:.3f}; "
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
    result = {"algo": algo, "seed": seed, "warm_start_s": round(warm_s, 1), "start_accuracy": start_acc,
              "reached": reached is not None, "steps": curve[-1][0], "samples": curve[-1][1], "wall_s": curve[-1][2],
              "final_accuracy": curve[-1][3], "best_accuracy": max(c[3] for c in curve), "curve": curve}
    log(f"[{algo} seed {seed}] " + (f"reached {target:.0%} at step {reached[0]}, {reached[1]} samples, {reached[2]} s"
                                      if reached else f"did NOT reach {target:.0%} within {budget_s:.0f} s (best {result['best_accuracy']:.3f})"))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", nargs="+", default=["grpo", "ppo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--ppo-budget-s", type=float, default=600.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=TrainConfig.prompts_per_step)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--warm-max-steps", type=int, default=3000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_accuracy.txt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    out = open(args.out, "w")

    def log(line: str) -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    log("GRPO and PPO on 2-digit addition (TinyGPT 2x128, SFT warm start to ~20%), target "
        f"{args.target:.0%} greedy eval accuracy on 256 held-out sums, RL wall time counted per run")
    log(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads}; "
        f"budgets: {args.budget_s:.0f} s (PPO {args.ppo_budget_s:.0f} s); wall times include the periodic evaluations")
    results = []
    for a in args.algos:
        for seed in args.seeds:
            load0 = os.getloadavg()[0]
            r = run_one(a, seed, args.ppo_budget_s if a == "ppo" else args.budget_s, args.target, log,
                        prompts=args.prompts, eval_every=args.eval_every, warm_max_steps=args.warm_max_steps)
            r["load_avg_1min"] = (round(load0, 2), round(os.getloadavg()[0], 2))
            log(f"  load average (1 min) before / after: {r['load_avg_1min'][0]} / {r['load_avg_1min'][1]}")
            results.append(r)
    log("")
    log("summary (wall s / sampled completions to reach the target, from the warm start)")
    for algo in args.algos:
        rs = [r for r in results if r["algo"] == algo]
        cells = [f"seed {r['seed']}: {r['start_accuracy']:.2f} -> {r['final_accuracy']:.2f}, "
                 + (f"{r['wall_s']:.0f} s / {r['samples']}" if r["reached"] else f"not reached in {r['wall_s']:.0f} s")
                 for r in rs]
        ok = [r for r in rs if r["reached"]]
        in_budget = [r for r in ok if r["wall_s"] <= args.budget_s]
        med = (f"median {statistics.median(r['wall_s'] for r in ok):.0f} s / {int(statistics.median(r['samples'] for r in ok))} samples"
               if ok else "no run reached the target")
        log(f"{algo}: {len(ok)}/{len(rs)} reached ({len(in_budget)}/{len(rs)} within {args.budget_s:.0f} s); {med}; "
            + "; ".join(cells))
    with open(os.path.join(os.path.dirname(args.out), "train_accuracy_curves.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
