"""Command line: ``python -m grpo_ref train --algo grpo --steps 600 --out runs/grpo`` and ``python -m grpo_ref plot``.

``train`` builds the addition task, warm-starts a :class:`~grpo_ref.model.TinyGPT` by SFT (or resumes from
``OUT/checkpoint.pt`` with ``--resume``), trains with :class:`~grpo_ref.trainer.Trainer`, and writes into
``OUT``: ``config.json``, ``metrics.jsonl`` (one line per step), ``metrics.png`` and ``checkpoint.pt``.
``plot`` draws one run's dashboard, or compares several runs' eval accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

from .sft import warm_start_policy
from .tasks import AdditionTask
from .trainer import Trainer, TrainConfig, load_metrics


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="warm start + RL on the addition task", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--algo", default=d.algo, help="preset name: grpo, ppo, dr_grpo, dapo, gspo, rloo, reinforce_pp")
    p.add_argument("--steps", type=int, default=d.steps, help="RL steps (rollout + update)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--group-size", type=int, default=d.group_size, help="G, completions per prompt")
    p.add_argument("--prompts", type=int, default=d.prompts_per_step, help="prompts per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--critic-lr", type=float, default=d.critic_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--epochs", type=int, default=d.ppo_epochs, help="mu, passes over each rollout batch")
    p.add_argument("--minibatches", type=int, default=d.minibatches, help="optimizer steps per epoch")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--kl-coef", type=float, default=None, help="override the preset's kl_coef")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                   help="any AlgoConfig field, e.g. --override eps_high=0.28 (repeatable)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--n-digits", type=int, default=2, help="operand digits of the addition task")
    p.add_argument("--warm-target", type=float, default=0.2, help="SFT warm start stops at this train accuracy")
    p.add_argument("--warm-max-steps", type=int, default=3000, help="at most this many SFT steps")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is fastest on a busy CPU)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--stop-at", type=float, default=None, help="stop at this eval accuracy")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _overrides(args) -> dict:
    out = {}
    for item in args.override:
        if "=" not in item:
            raise SystemExit(f"--override needs FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if args.kl_coef is not None:
        out["kl_coef"] = args.kl_coef
    return out


def train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = os.path.join(args.out, "checkpoint.pt")
    os.makedirs(args.out, exist_ok=True)
    if args.resume:
        if not os.path.exists(ckpt):
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        trainer = Trainer.from_checkpoint(ckpt)
        print(f"resumed {ckpt} at step {trainer.step_count}", flush=True)
    else:
        config = TrainConfig(
            algo=args.algo, algo_overrides=_overrides(args), group_size=args.group_size, prompts_per_step=args.prompts,
            steps=args.steps, lr=args.lr, critic_lr=args.critic_lr, warmup_steps=args.warmup_steps, ppo_epochs=args.epochs,
            minibatches=args.minibatches, temperature=args.temperature, eval_every=args.eval_every, seed=args.seed,
            device=args.device,
        )
        task = AdditionTask(n_digits=args.n_digits, seed=0)  # one eval split for every --seed, so runs compare
        t0 = time.perf_counter()
        policy = warm_start_policy(task, target_accuracy=args.warm_target, steps=args.warm_max_steps, n_layer=args.n_layer,
                                   n_embd=args.n_embd, seed=args.seed, device=torch.device(args.device))
        print(f"warm start (SFT) done in {time.perf_counter() - t0:.1f} s", flush=True)
        trainer = Trainer(policy, task, config)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({"train": config.to_dict(), "algo": trainer.algo.to_dict(), "task": task.to_dict(),
                       "model": policy.config.to_dict()}, f, indent=2)
    t0 = time.perf_counter()
    history = trainer.train(steps=args.steps, out_dir=args.out, progress=not args.no_progress,
                            checkpoint_every=args.checkpoint_every, stop_at_accuracy=args.stop_at)
    trainer.save(ckpt)
    evals = [h for h in history if "eval_accuracy" in h]
    if evals:
        print(f"eval accuracy: {evals[0]['eval_accuracy']:.3f} (step {evals[0]['step']}) -> "
              f"{evals[-1]['eval_accuracy']:.3f} (step {evals[-1]['step']}); {time.perf_counter() - t0:.1f} s", flush=True)
    _plot(history, os.path.join(args.out, "metrics.png"), f"{trainer.config.algo} on {args.out}")
    print(f"wrote {args.out}/metrics.jsonl, metrics.png, checkpoint.pt", flush=True)
    return 0


def _plot(history, path, title) -> None:
    try:
        from .plotting import plot_run
    except ImportError:  # pragma: no cover
        return
    try:
        plot_run(history, path, title=title)
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)


def plot(args) -> int:
    from .plotting import compare_runs, plot_run

    runs = {os.path.basename(os.path.normpath(r)): load_metrics(r) for r in args.runs}
    if len(runs) == 1:
        (label, run), = runs.items()
        plot_run(run, args.out, title=label)
    else:
        compare_runs(runs, args.metric, args.x, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_ref", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("plot", help="plot one run, or compare runs")
    p.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--metric", default="eval_accuracy")
    p.add_argument("--x", default="step", choices=("step", "samples"))
    args = parser.parse_args(argv)
    try:
        return train(args) if args.command == "train" else plot(args)
    except ValueError as e:  # bad configuration: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
