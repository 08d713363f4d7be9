"""GRPO and PPO with the same budget, from the same warm start: the runs chapter 3 of the book plots and asserts.

    python benchmarks/grpo_vs_ppo.py [--seeds 0 1 2] [--algos grpo ppo] [--steps 300] [--threads 1]

For every seed: warm-start a TinyGPT by SFT until 20% greedy accuracy on training prompts (``warm_start_policy``,
seeded), then train each algorithm from a copy of that warm start for ``--steps`` steps with the package defaults of
:class:`TrainConfig` and that seed, evaluating greedily on the 256 held-out sums every ``--eval-every`` steps.
Every step's metrics (those in ``KEPT``) are written to ``--json``; a summary per run is printed and written to
``--out``. One thread by default: the curves then do not depend on the number of cores (they still depend on the
CPU's floating-point rounding, which is why the chapter asserts claims with tolerances over all seeds instead of
comparing numbers).

With ``--steps 2 --prompts 4 --seeds 0 --warm-max-steps 5`` it is the smoke run the test suite does.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from grpo_ref.sft import warm_start_policy
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The per-step metrics kept in the JSON (the trainer logs more; these are the ones the chapter reads).
KEPT = ("step", "samples", "reward_mean", "train_accuracy", "kl_to_ref", "kl_ref", "entropy", "clip_frac_low",
        "clip_frac_high", "ratio_min", "ratio_max", "response_length", "grad_norm", "groups_with_signal",
        "value_mean", "vf_loss", "eval_accuracy", "eval_reward", "time_step_s")


def _round(x: float) -> float:
    return int(x) if float(x).is_integer() and abs(x) < 1e9 else float(f"{x:.5g}")


def run_seed(seed: int, args, log) -> list:
    """Warm start for ``seed``, then every algorithm of ``args.algos`` from a copy of it; one result per algorithm."""
    task = AdditionTask(n_digits=2, eval_size=256, seed=0)
    t0 = time.perf_counter()
    warm = warm_start_policy(task, target_accuracy=0.2, steps=args.warm_max_steps, seed=seed)
    warm_s = time.perf_counter() - t0
    results = []
    for algo in args.algos:
        cfg = TrainConfig(algo=algo, steps=args.steps, seed=seed, eval_every=args.eval_every,
                          prompts_per_step=args.prompts)
        trainer = Trainer(copy.deepcopy(warm), task, cfg)
        warm_eval = trainer.evaluate()
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        history = trainer.train(progress=False)
        wall = time.perf_counter() - t0
        if "eval_accuracy" not in history[-1]:
            history[-1] = {**history[-1], **trainer.evaluate()}  # the last step always has an evaluation
        steps = [{k: _round(float(h[k])) for k in KEPT if k in h} for h in history]
        result = {"algo": algo, "seed": seed, "steps": args.steps, "prompts_per_step": args.prompts,
                  "group_size": cfg.group_size, "warm_start_s": round(warm_s, 1),
                  "warm_accuracy": warm_eval["eval_accuracy"], "warm_reward": _round(warm_eval["eval_reward"]),
                  "final_accuracy": steps[-1]["eval_accuracy"], "wall_s": round(wall, 1),
                  "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)], "history": steps}
        curve = " ".join(f"{h['eval_accuracy']:.2f}" for h in steps if "eval_accuracy" in h)
        log(f"{algo:5} seed {seed}: warm {result['warm_accuracy']:.3f} -> final {result['final_accuracy']:.3f} in "
            f"{args.steps} steps, {wall:.0f} s (load {result['load_avg_1min'][0]} / {result['load_avg_1min'][1]}); "
            f"eval every {args.eval_every}: {curve}")
        results.append(result)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algos", nargs="+", default=["grpo", "ppo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=TrainConfig.prompts_per_step)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--warm-max-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(RESULTS, "grpo_vs_ppo.txt"))
    ap.add_argument("--json", default=os.path.join(RESULTS, "grpo_vs_ppo.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in (args.out, args.json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.out, "w") as out:
        def log(line: str) -> None:
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()

        log(f"GRPO vs PPO, same budget ({args.steps} steps x {args.prompts} prompts x G={TrainConfig.group_size}) "
            f"from each seed's SFT warm start; machine {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, threads {args.threads}")
        results = [r for seed in args.seeds for r in run_seed(seed, args, log)]
    with open(args.json, "w") as fh:  # one run per line: readable diffs, small file
        fh.write("[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in results) + "\n]\n")


if __name__ == "__main__":
    main()
