"""Training-step time of the CLI's default model at 1 thread, 2 threads and all cores (issue 10, item 6).

    python benchmarks/threads.py [--steps 4] [--prompts 64] [--out benchmarks/results/threads.txt]

The model is ``python -m grpo_ref train``'s default (TinyGPT, 2 layers, width 128, the 2-digit addition task),
freshly initialised rather than warm-started (the step time, not the learning, is measured; an untrained policy
samples up to ``max_new_tokens`` tokens, so its completions are the longest the task allows). One trainer per
thread count, ``TrainConfig`` defaults (G = 4, 64 prompts, 2 epochs x 4 minibatches, fused log-probs); one
warm-up step each, then ``--steps`` timed steps with the thread counts alternating step by step, so that load from
other processes hits them alike. Prints the median step time, completions per second and the ratio to 1 thread,
with the load average (1, 5, 15 min) at the start and the end, and writes the same text to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.tasks import AdditionTask
from grpo_ref.trainer import Trainer, TrainConfig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per thread count (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step (CLI default 64)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "threads.txt"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.prompts < 1:
        raise ValueError(f"--steps and --prompts must be >= 1, got {args.steps}, {args.prompts}")
    counts = sorted({1, 2, os.cpu_count() or 1})
    task = AdditionTask(n_digits=2, seed=0)
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens, n_layer=2,
                    n_head=4, n_embd=128)
    trainers = {k: Trainer(tiny_gpt(cfg, 0), task, TrainConfig(prompts_per_step=args.prompts, eval_every=0)) for k in counts}
    before = torch.get_num_threads()
    load0 = os.getloadavg()
    times = {k: [] for k in counts}
    try:
        for rep in range(args.steps + 1):
            for k in counts:
                torch.set_num_threads(k)
                t0 = time.perf_counter()
                trainers[k].step()
                if rep > 0:
                    times[k].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    load1 = os.getloadavg()
    completions = args.prompts * TrainConfig().group_size
    base = statistics.median(times[1])
    lines = [f"torch {torch.__version__}; TinyGPT 2 layers x 128 ({sum(p.numel() for p in trainers[1].policy.parameters())} "
             f"parameters), fresh init; {args.prompts} prompts x G = 4 per step; {args.steps} timed steps each "
             f"(alternating); {os.cpu_count()} cores",
             f"{'threads':>7} {'median s/step':>14} {'completions/s':>14} {'x 1 thread':>11}   all step times (s)"]
    for k in counts:
        m = statistics.median(times[k])
        lines.append(f"{k:>7} {m:>14.3f} {completions / m:>14.1f} {base / m:>11.2f}   "
                     + " ".join(f"{t:.3f}" for t in times[k]))
    fastest = min(counts, key=lambda k: statistics.median(times[k]))
    fmt = lambda x: tuple(round(a, 2) for a in x)
    lines += [f"fastest: {fastest} thread(s)",
              f"load average (1, 5, 15 min): start {fmt(load0)}, end {fmt(load1)}"]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
