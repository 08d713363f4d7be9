"""Command line: ``python -m grpo_ref train --algo grpo --steps 600 --out runs/grpo`` and ``python -m grpo_ref plot``.

``train`` builds the addition task, warm-starts a :class:`~grpo_ref.model.TinyGPT` by SFT (or resumes from
``OUT/checkpoint.pt`` with ``--resume``), trains with :class:`~grpo_ref.trainer.Trainer`, and writes into
``OUT``: ``config.json``, ``metrics.jsonl`` (one line per step), ``metrics.png`` and ``checkpoint.pt``.
``plot`` draws one run's dashboard (or one ``--metric``), or compares several runs' eval accuracy.

``--resume`` continues the run in ``OUT`` with the checkpoint's settings, up to its total of steps (or to
``--steps``); any other setting given with it must equal the checkpoint's, or the command is refused. ``train``
refuses an ``OUT`` that already holds a run unless ``--resume`` or ``--overwrite`` (which deletes that run) is given.

Failures print one line ``error: ...`` on stderr and exit with 2 for bad input (arguments, as argparse does;
missing files or folders; settings that conflict with the checkpoint) and 1 when the run itself fails (a
non-finite step, a corrupt checkpoint or metrics file, a full or read-only disk); ``--debug`` shows the traceback.
An interrupted ``train`` (Ctrl-C) saves the last whole step to ``checkpoint.pt`` and exits with 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from .metrics_log import METRICS_FILE, load_metrics, metrics_path
from .sft import warm_start_policy
from .tasks import AdditionTask
from .trainer import TrainConfig, Trainer

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
RUN_FILES = ("config.json", METRICS_FILE, "metrics.png", "checkpoint.pt")


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``error: ...`` (exit code 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# train options: (flag, dest, type, default, help). Defaults are filled in after parsing, so that the options the
# user gave are known (a resumed run refuses those that contradict its checkpoint).
_D = TrainConfig()
_TRAIN_OPTIONS = [
    ("--algo", "algo", str, _D.algo, "preset name: grpo, ppo, dr_grpo, dapo, gspo, rloo, reinforce_pp"),
    ("--steps", "steps", int, _D.steps, "total RL steps (rollout + update); with --resume: the checkpoint's total"),
    ("--group-size", "group_size", int, _D.group_size, "G, completions per prompt"),
    ("--prompts", "prompts", int, _D.prompts_per_step, "prompts per step"),
    ("--lr", "lr", float, _D.lr, "policy learning rate"),
    ("--critic-lr", "critic_lr", float, _D.critic_lr, "critic learning rate (PPO)"),
    ("--warmup-steps", "warmup_steps", int, _D.warmup_steps, "linear learning-rate warm-up steps"),
    ("--epochs", "epochs", int, _D.ppo_epochs, "mu, passes over each rollout batch"),
    ("--minibatches", "minibatches", int, _D.minibatches, "optimizer steps per epoch"),
    ("--temperature", "temperature", float, _D.temperature, "sampling temperature"),
    ("--top-k", "top_k", int, _D.top_k, "sample from the k most likely tokens only, after the temperature (0: off)"),
    ("--top-p", "top_p", float, _D.top_p, "nucleus sampling: the smallest set of most likely tokens with probability "
     ">= p, in (0, 1] (1: off)"),
    ("--min-p", "min_p", float, _D.min_p, "drop tokens with probability < min_p * the top token's, in [0, 1] (0: off); "
     "the log-probs of the loss stay those of the unfiltered softmax(z / temperature), as in TRL and verl"),
    ("--ref-sync-every", "ref_sync_every", int, _D.ref_sync_every, "every this many optimizer steps, move the KL "
     "reference to the policy (TR-DPO; TRL ref_model_sync_steps; 0: never)"),
    ("--ref-sync-alpha", "ref_sync_alpha", float, _D.ref_sync_alpha, "reference update ref = alpha * policy + "
     "(1 - alpha) * ref, alpha in (0, 1] (TRL ref_model_mixup_alpha; 1: copy)"),
    ("--kl-coef", "kl_coef", float, None, "override the preset's kl_coef"),
    ("--eval-every", "eval_every", int, _D.eval_every, "steps between evaluations (0: never)"),
    ("--seed", "seed", int, _D.seed, "random seed"),
    ("--device", "device", str, _D.device, "cpu, cuda, cuda:1, mps"),
    ("--n-digits", "n_digits", int, 2, "operand digits of the addition task"),
    ("--warm-target", "warm_target", float, 0.2, "SFT warm start stops at this train accuracy"),
    ("--warm-max-steps", "warm_max_steps", int, 3000, "at most this many SFT steps"),
    ("--n-layer", "n_layer", int, 2, "transformer layers"),
    ("--n-embd", "n_embd", int, 128, "embedding width"),
    ("--threads", "threads", int, 1, "torch.set_num_threads; 1 by default: on the default model a training step took "
     "0.74 s at 1 thread and 3.0 s at 2 (2 cores, load average 3.5; benchmarks/threads.py, results/threads.txt)"),
    ("--checkpoint-every", "checkpoint_every", int, 50, "steps between checkpoints (0: only at the end)"),
    ("--stop-at", "stop_at", float, None, "stop at this eval accuracy"),
]
_DEFAULTS = {dest: default for _, dest, _, default, _ in _TRAIN_OPTIONS}
_FLAGS = {dest: flag for flag, dest, _, _, _ in _TRAIN_OPTIONS}
# options that only matter when a run starts: refused with --resume (the checkpoint holds the warm-started model)
_START_ONLY = ("warm_target", "warm_max_steps")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="warm start + RL on the addition task")
    p.add_argument("--out", required=True, help="output folder")
    for flag, dest, typ, default, text in _TRAIN_OPTIONS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=f"{text} (default: {default})")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                   help="any AlgoConfig field, e.g. --override eps_high=0.28 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="delete a run already in OUT and start a new one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")


def _overrides(args) -> dict:
    out = {}
    for item in args.override:
        if "=" not in item:
            raise UsageError(f"--override needs FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string, e.g. --override kl_estimator=k2
    if args.kl_coef is not None:
        out["kl_coef"] = args.kl_coef
    return out


def _check_resume_args(args, given: List[str], trainer: Trainer) -> None:
    """``UsageError`` if an option given with ``--resume`` contradicts the checkpoint."""
    cfg, model = trainer.config, getattr(trainer.policy, "config", None)
    stored = {
        "algo": cfg.algo, "group_size": cfg.group_size, "prompts": cfg.prompts_per_step, "lr": cfg.lr,
        "critic_lr": cfg.critic_lr, "warmup_steps": cfg.warmup_steps, "epochs": cfg.ppo_epochs,
        "minibatches": cfg.minibatches, "temperature": cfg.temperature, "eval_every": cfg.eval_every,
        "top_k": cfg.top_k, "top_p": cfg.top_p, "min_p": cfg.min_p, "ref_sync_every": cfg.ref_sync_every,
        "ref_sync_alpha": cfg.ref_sync_alpha,
        "seed": cfg.seed, "device": cfg.device, "n_digits": getattr(trainer.task, "n_digits", None),
        "n_layer": getattr(model, "n_layer", None), "n_embd": getattr(model, "n_embd", None),
    }
    conflicts = []
    for dest in given:
        if dest in _START_ONLY:
            conflicts.append(f"{_FLAGS[dest]} (only used when a run starts)")
        elif dest in stored and getattr(args, dest) != stored[dest]:
            conflicts.append(f"{_FLAGS[dest]} {getattr(args, dest)} (the checkpoint has {stored[dest]})")
    algo = trainer.algo.to_dict()
    for key, value in _overrides(args).items():
        if key not in algo or algo[key] != value:
            conflicts.append(f"--override {key}={value!r} (the checkpoint has {algo.get(key)!r})")
    if conflicts:
        raise UsageError("--resume continues the run with its checkpoint's settings; these differ: "
                         + "; ".join(conflicts) + ". Drop them, or start a new run in another --out")


def _prepare_out(args) -> None:
    """Refuse to mix two runs in one folder: a run in ``OUT`` needs ``--resume`` or ``--overwrite``."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a folder")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if args.resume:
        if not os.path.exists(os.path.join(args.out, "checkpoint.pt")):
            raise UsageError(f"--resume: no checkpoint at {os.path.join(args.out, 'checkpoint.pt')}")
    elif present and not args.overwrite:
        raise UsageError(f"{args.out} already holds a run ({', '.join(present)}): use --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    elif present:
        for name in present:
            os.remove(os.path.join(args.out, name))
    os.makedirs(args.out, exist_ok=True)


def train(args) -> int:
    given = [dest for dest in _DEFAULTS if getattr(args, dest) is not None]
    for dest, default in _DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    _prepare_out(args)
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        trainer = Trainer.from_checkpoint(ckpt)
        _check_resume_args(args, [d for d in given if d not in ("steps", "threads", "checkpoint_every", "stop_at")], trainer)
        if "steps" in given:
            try:  # the new total is stored in the next checkpoint
                trainer.config = dataclasses.replace(trainer.config, steps=args.steps)
            except ValueError as e:
                raise UsageError(str(e)) from None
        print(f"resumed {ckpt} at step {trainer.step_count} of {trainer.config.steps}", flush=True)
    else:
        try:
            config = TrainConfig(
                algo=args.algo, algo_overrides=_overrides(args), group_size=args.group_size,
                prompts_per_step=args.prompts, steps=args.steps, lr=args.lr, critic_lr=args.critic_lr,
                warmup_steps=args.warmup_steps, ppo_epochs=args.epochs, minibatches=args.minibatches,
                temperature=args.temperature, eval_every=args.eval_every, seed=args.seed, device=args.device,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, ref_sync_every=args.ref_sync_every,
                ref_sync_alpha=args.ref_sync_alpha,
            )
            task = AdditionTask(n_digits=args.n_digits, seed=0)  # one eval split for every --seed, so runs compare
            if not 0 <= args.warm_target <= 1 or args.warm_max_steps < 1:
                raise ValueError(f"need 0 <= --warm-target <= 1 and --warm-max-steps >= 1, got {args.warm_target}, {args.warm_max_steps}")
        except ValueError as e:
            raise UsageError(str(e)) from e
        t0 = time.perf_counter()
        policy = warm_start_policy(task, target_accuracy=args.warm_target, steps=args.warm_max_steps, n_layer=args.n_layer,
                                   n_embd=args.n_embd, seed=args.seed, device=torch.device(args.device))
        print(f"warm start (SFT) done in {time.perf_counter() - t0:.1f} s", flush=True)
        trainer = Trainer(policy, task, config)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({"train": config.to_dict(), "algo": trainer.algo.to_dict(), "task": task.to_dict(),
                       "model": policy.config.to_dict()}, f, indent=2)
    t0 = time.perf_counter()
    try:
        history = trainer.train(out_dir=args.out, progress=not args.no_progress,
                                checkpoint_every=args.checkpoint_every, stop_at_accuracy=args.stop_at)
    except KeyboardInterrupt:  # Ctrl-C: the interrupted step was undone, the last whole one is saved
        trainer.save(ckpt)
        raise KeyboardInterrupt(f"interrupted: {ckpt} holds step {trainer.step_count}; --resume continues") from None
    trainer.save(ckpt)
    evals = [h for h in history if "eval_accuracy" in h]
    if evals:
        print(f"eval accuracy: {evals[0]['eval_accuracy']:.3f} (step {evals[0]['step']}) -> "
              f"{evals[-1]['eval_accuracy']:.3f} (step {evals[-1]['step']}); {time.perf_counter() - t0:.1f} s", flush=True)
    wrote = [METRICS_FILE, "checkpoint.pt"]
    if _plot(history, os.path.join(args.out, "metrics.png"), f"{trainer.config.algo} on {args.out}"):
        wrote.insert(1, "metrics.png")
    print(f"wrote {args.out}/{', '.join(wrote)}", flush=True)
    return 0


def _plot(history, path, title) -> bool:
    """Draw the run's dashboard; False (and a warning) if matplotlib is missing or there is nothing to draw."""
    from .plotting import plot_run

    try:
        plot_run(history, path, title=title)
    except ImportError:
        print("warning: matplotlib is not installed: no metrics.png written", file=sys.stderr)
        return False
    except ValueError as e:
        print(f"warning: no metrics.png written: {e}", file=sys.stderr)
        return False
    return True


def plot(args) -> int:
    from .plotting import compare_runs, plot_run

    runs: Dict[str, list] = {}
    for r in args.runs:
        if not os.path.exists(metrics_path(r)):
            raise UsageError(f"no {METRICS_FILE} in {r}" if os.path.isdir(r) else f"no such run folder or file: {r}")
        runs[os.path.basename(os.path.normpath(r))] = load_metrics(r)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {args.out}: folder {folder} does not exist")
    try:
        if len(runs) == 1 and args.metric is None:
            (label, run), = runs.items()
            plot_run(run, args.out, title=label)
        else:
            compare_runs(runs, args.metric or "eval_accuracy", args.x, args.out)
    except ValueError as e:  # a metric no run has
        raise UsageError(str(e)) from None
    print(f"wrote {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m grpo_ref", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("plot", help="plot one run, or compare runs")
    p.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--metric", default=None, help="metric to draw (default: one run's dashboard; eval_accuracy for several runs)")
    p.add_argument("--x", default="step", choices=("step", "samples"))
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (0, 1 for a failed run, 2 for bad input, 130 if interrupted)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error, already printed (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)  # warnings of grpo_ref (e.g. a repaired metrics.jsonl)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("grpo_ref")
    logger.addHandler(handler)
    try:
        return train(args) if args.command == "train" else plot(args)
    except BaseException as e:
        if args.debug or isinstance(e, SystemExit):
            raise
        if isinstance(e, KeyboardInterrupt):
            print(f"error: {e or 'interrupted'}", file=sys.stderr)
            return EXIT_INTERRUPTED
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
