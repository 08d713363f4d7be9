"""The committed SFT warm start: ``benchmarks/results/warm_start_seed0.pt``.

    python benchmarks/warm_start.py [--seed 0] [--threads 1] [--max-steps 3000] [--out FILE]

Trains ``warm_start_policy(AdditionTask(n_digits=2, eval_size=256), target_accuracy=0.2, seed=SEED)`` (the warm
start of chapter 3, of the learning test in tests/test_training.py and of benchmarks/train_accuracy.py) on one
thread, and saves it with :func:`grpo_ref.sft.save_warm_start` together with how it was made: SFT steps and seconds,
its greedy accuracy on the 256 held-out eval sums, torch version and CPU. Training it takes 40-65 s on one core of a
2-core x86-64 CPU, once per test run and notebook run before it was committed; loading it takes milliseconds.

The file is the output of one real run on one machine: the same seed trained on another CPU gives other weights
(the last bits of a float32 sum depend on the CPU), so what is committed is this run's result, with its numbers in
``meta``, and the tests check the file against that record (tests/test_warm_start_file.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import grpo_ref
from grpo_ref.rollout import evaluate
from grpo_ref.sft import save_warm_start, warm_start_policy
from grpo_ref.tasks import AdditionTask

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "warm_start_seed{seed}.pt"
TARGET_ACCURACY = 0.2


def make(seed: int, max_steps: int, threads: int) -> tuple:
    """Train the warm start of ``seed``; returns ``(model, meta)``."""
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    task = AdditionTask(n_digits=2, eval_size=256)
    start = time.perf_counter()
    model = warm_start_policy(task, target_accuracy=TARGET_ACCURACY, steps=max_steps, seed=seed)
    seconds = time.perf_counter() - start
    accuracy, _ = evaluate(model, task)
    meta = {
        "seed": seed, "target_accuracy": TARGET_ACCURACY, "max_steps": max_steps, "threads": threads,
        "sft_seconds": round(seconds, 1), "eval_accuracy": float(accuracy),
        "eval_size": 256, "grpo_ref": grpo_ref.__version__, "torch": str(torch.__version__),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-min, before and after
    }
    return model, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/warm_start_seed{seed}.pt")
    args = ap.parse_args(argv)
    out = Path(args.out or str(DEFAULT_OUT).format(seed=args.seed))
    model, meta = make(args.seed, args.max_steps, args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_warm_start(model, str(out), meta)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
