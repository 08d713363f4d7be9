"""Command line: ``python -m grpo_ref train --algo grpo --steps 600 --out runs/grpo`` and ``python -m grpo_ref plot``.

``train`` builds the addition task, warm-starts a :class:`~grpo_ref.model.TinyGPT` by SFT (or resumes from
``OUT/checkpoint.pt`` with ``--resume``), trains with :class:`~grpo_ref.trainer.Trainer`, and writes into
``OUT``: ``config.json``, ``metrics.jsonl`` (one line per step), ``metrics.png`` and ``checkpoint.pt`` (and, with
``--report_to tensorboard``, the same scalars as TensorBoard events in ``OUT/tensorboard/``).
``plot`` draws one run's dashboard (or one ``--metric``), or compares several runs, against the step, the sampled
completions or the wall-clock time (``--x``).

The flags are derived from the dataclasses by jsonargparse (the optional extra ``pip install "grpo-ref[cli]"``;
``grpo_ref`` itself needs torch alone): every field of :class:`~grpo_ref.trainer.TrainConfig` is a flag of the same
name (``--group_size 8``), with its default and a help text; every field of :class:`~grpo_ref.algorithms.AlgoConfig`
overrides the ``--algo`` preset as ``--algo_overrides.FIELD`` (``--algo_overrides.kl_coef 0``), the key it has in
``TrainConfig.algo_overrides``. Dashes are accepted for underscores (``--group-size``). ``--config FILE`` reads
the same keys from a YAML or JSON file; the command line overrides it.

``--resume`` continues the run in ``OUT`` with the checkpoint's settings, up to its total of steps (or to
``--steps``); any other setting given with it must equal the checkpoint's, or the command is refused. ``train``
refuses an ``OUT`` that is not empty unless ``--resume`` or ``--overwrite`` (which deletes the run files in it) is
given, and validates every setting before it creates ``OUT``.

Failures print one line ``error: ...`` on stderr and exit with 2 for bad input (arguments; missing files or
folders; settings that conflict with the checkpoint) and 1 when the run itself fails (a non-finite step, a corrupt
checkpoint or metrics file, a full or read-only disk) or jsonargparse is not installed; ``--debug`` shows the
traceback. An interrupted ``train`` (Ctrl-C) saves the last whole step to ``checkpoint.pt`` and exits with 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import inspect
import io
import json
import logging
import os
import sys
import textwrap
import time
import tokenize
import typing
from typing import Any, Dict, List, Optional, Tuple

import torch

from .algorithms import PRESETS, AlgoConfig
from .metrics_log import METRICS_FILE, load_metrics, metrics_path
from .model import GPTConfig
from .plotting import X_AXES
from .sft import warm_start_policy
from .tasks import AdditionTask
from .trainer import TrainConfig, Trainer

PROG = "python -m grpo_ref"
#: how to install the command line's dependencies (the project's optional extra ``cli``)
CLI_INSTALL = 'pip install "grpo-ref[cli]"'
EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
RUN_FILES = ("config.json", METRICS_FILE, "metrics.png", "checkpoint.pt")
TENSORBOARD_DIR = "tensorboard"
#: ``--report_to`` values, as TRL's ``report_to`` (``"none"``: metrics.jsonl only)
REPORT_TO = ("none", "tensorboard")
SUBCOMMANDS = ("train", "plot")


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


# -- help texts ------------------------------------------------------------------------------------------------------
# One line per field; a field missing here falls back to its comment in the dataclass source (see _field_help), and
# tests/test_cli.py checks that every field of TrainConfig and AlgoConfig ends up with a non-empty help.

TRAIN_HELP: Dict[str, str] = {
    "algo": f"preset of grpo_ref.algorithms.PRESETS: {', '.join(PRESETS)}; its fields can be changed with "
            "--algo_overrides.FIELD",
    "group_size": "G, completions sampled per prompt (copied into the preset's AlgoConfig.group_size)",
    "prompts_per_step": "distinct prompts per RL step (a step samples prompts_per_step x group_size completions)",
    "steps": "total RL steps (rollout + update); with --resume: the new total of the resumed run",
    "lr": "policy learning rate (AdamW)",
    "critic_lr": "critic learning rate (AdamW; PPO only)",
    "warmup_steps": "linear learning-rate warm-up over the first steps (both optimizers)",
    "weight_decay": "AdamW weight decay (both optimizers)",
    "ppo_epochs": "mu: passes over each rollout batch",
    "minibatches": "optimizer steps per epoch (the batch is split into this many minibatches)",
    "max_grad_norm": "clip the gradient norm to this (null: no clipping)",
    "temperature": "sampling temperature tau; the loss's log-probs are those of softmax(z / tau), as in TRL and verl",
    "max_new_tokens": "most tokens sampled per completion (null: the task's max_new_tokens)",
    "truncation": "completions that hit max_new_tokens without EOS: keep (train on them), mask (no gradient from "
                  "them, TRL's mask_truncated_completions) or penalize (reward = truncation_reward)",
    "truncation_reward": "the reward of a truncated completion with truncation=penalize",
    "filter_rounds": "DAPO dynamic sampling (AlgoConfig.filter_groups): extra sampling rounds to refill the "
                     "groups dropped for zero reward variance",
    "eval_every": "RL steps between evaluations of greedy accuracy on the held-out sums (0: never)",
    "seed": "random seed of the model initialisation, the prompts and the sampling",
    "device": "torch device: cpu, cuda, cuda:1, mps",
    "use_cache": "KV cache when sampling (null: if the model supports it)",
    "top_k": "sample from the k most likely tokens only, after the temperature (0: off)",
    "top_p": "nucleus sampling: the smallest set of most likely tokens with probability >= p, in (0, 1] (1: off)",
    "min_p": "drop tokens with probability < min_p * the top token's, in [0, 1] (0: off); the log-probs of the loss "
             "stay those of the unfiltered softmax(z / temperature), as in TRL and verl",
    "ref_sync_every": "every this many optimizer steps, move the KL reference to the policy (TR-DPO; TRL "
                      "ref_model_sync_steps; 0: never)",
    "ref_sync_alpha": "reference update ref = alpha * policy + (1 - alpha) * ref, alpha in (0, 1] (TRL "
                      "ref_model_mixup_alpha; 1: copy)",
    "logprob_path": "how the loss computes log-probs: auto (fused where the model allows), fused or logits "
                    "(see grpo_ref.trainer.response_logprobs)",
    "old_logp_source": "the ratio's denominator log pi_old: recompute (one more forward pass before the updates) "
                       "or sampler (the log-probs the rollout sampled with)",
    "critic": "PPO's critic: separate (its own transformer, a copy of the policy) or shared (a value head on the "
              "policy's trunk)",
    "critic_layers": "separate critic: keep only the first k blocks of the policy copy (0: all of them)",
}

ALGO_HELP: Dict[str, str] = {
    "loss_fn": "loss of LOSS_REGISTRY: grpo (actor only) or ppo (actor + critic)",
    "adv_estimator": "advantage estimator: grpo, rloo, reinforce_pp, reinforce_pp_baseline, gae (gae needs "
                     "loss_fn=ppo), process (the task's step rewards, DeepSeekMath process supervision)",
    "adv_scale": "group-relative advantages divided by the std of the group, of the batch, or none (Dr. GRPO)",
    "adv_eps": "epsilon added to the std before dividing",
    "whiten_advantages": "whiten the advantages over the batch after GAE (PPO-RLHF)",
    "eps_low": "clip range below: ratio >= 1 - eps_low",
    "eps_high": "clip range above: ratio <= 1 + eps_high (DAPO's clip-higher: 0.28)",
    "dual_clip": "dual-clip constant c > 1 for negative advantages (Ye et al. 2020; null: off)",
    "ratio_level": "importance ratio per token, or per sequence (GSPO)",
    "loss_agg_mode": "how token losses are aggregated: token-mean, seq-mean-token-mean, seq-mean-token-sum, "
                     "seq-mean-token-sum-norm (Dr. GRPO), token-sum",
    "norm_length": "Dr. GRPO's constant length of seq-mean-token-sum-norm (null: the padded length)",
    "kl_coef": "beta, the weight of the KL to the reference (0: no KL term)",
    "kl_estimator": "per-token KL estimator: k1, k2, k3 (GRPO), abs, low_var_kl (verl)",
    "kl_placement": "where the KL goes: loss (GRPO) or reward (PPO-RLHF, REINFORCE++)",
    "gamma": "discount of GAE and of REINFORCE++'s return-to-go",
    "lam": "GAE lambda",
    "vf_coef": "weight of the value loss (PPO)",
    "value_clip": "clip range of the value loss (PPO; null: unclipped)",
    "ent_coef": "weight of the entropy bonus",
    "overlong_buffer": "DAPO L_cache: the soft overlong penalty's buffer (needs max_response_length; null: off)",
    "max_response_length": "DAPO L_max for the overlong penalty (null: none)",
    "filter_groups": "DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts",
    "pg_objective": "policy-gradient surrogate: clip (PPO/GRPO), cispo (MiniMax-M1) or sapo (soft gate)",
    "sapo_tau_pos": "SAPO gate temperature where the advantage is > 0",
    "sapo_tau_neg": "SAPO gate temperature where the advantage is <= 0",
    "kl_ratio_weighted": "KL term times the importance ratio (TRL use_bias_correction_kl; needs kl_placement=loss)",
    "ent_agg_mode": "aggregation of the entropy bonus (null: loss_agg_mode)",
    "global_token_norm": "token-mean over the global token count (TRL dapo/cispo num_items_in_batch; needs "
                         "loss_agg_mode=token-mean)",
    "unscorable": "completions the task cannot score (NaN): refuse, or zero_advantage (TRL: every reward "
                  "function gave None)",
}
# AlgoConfig fields that are not overrides: the preset names itself, and group_size is TrainConfig.group_size
ALGO_SKIP = ("name", "group_size")

# options of the run that are not TrainConfig fields: name -> (type, default, help)
RUN_OPTIONS: Dict[str, Tuple[Any, Any, str]] = {
    "n_digits": (int, 2, "operand digits of the addition task"),
    "warm_target": (float, 0.2, "the SFT warm start stops at this greedy accuracy on training prompts"),
    "warm_max_steps": (int, 3000, "at most this many SFT steps"),
    "n_layer": (int, 2, "transformer layers of the TinyGPT policy"),
    "n_embd": (int, 128, "embedding width of the TinyGPT policy"),
    "threads": (int, 1, "torch.set_num_threads; 1 by default: on the default model a training step took 0.74 s at "
                "1 thread and 3.0 s at 2 with the other core busy (load 3.5), 0.86 s and 0.72 s on an idle machine "
                "(benchmarks/threads.py; results/threads.txt, threads_idle.txt)"),
    "checkpoint_every": (int, 50, "steps between checkpoints (0: only at the end)"),
    "stop_at": (Optional[float], None, "stop at the first evaluation reaching this accuracy (null: run all steps)"),
    "report_to": (str, "none", "also log the scalars of metrics.jsonl to: none, or tensorboard (OUT/tensorboard/; "
                  "needs pip install tensorboard), as TRL's report_to"),
}
# options that only matter when a run starts: refused with --resume (the checkpoint holds the warm-started model)
START_ONLY = ("warm_target", "warm_max_steps")
# options a resumed run may change; every other setting given with --resume must equal the checkpoint's
RESUME_MAY_CHANGE = ("steps", "threads", "checkpoint_every", "stop_at", "report_to")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _field_comments(cls) -> Dict[str, str]:
    """``{field: comment}`` of the ``name: type = default  # comment`` lines of a dataclass's source ({} if the
    source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: Dict[str, str] = {}
    line_name: Dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = tok.start
        if tok.type == tokenize.NAME and col == 4 and tok.string in names:
            line_name[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_name:
            out[line_name[row]] = tok.string.lstrip("#").strip()
    return out


def field_help(cls, name: str) -> str:
    """The help text of field ``name`` of ``TrainConfig`` or ``AlgoConfig``: this module's table, else the field's
    comment in the source; ``""`` if neither has one."""
    table = TRAIN_HELP if cls is TrainConfig else ALGO_HELP
    return table.get(name) or _field_comments(cls).get(name, "")


# -- the parser ------------------------------------------------------------------------------------------------------

def _jsonargparse():
    """The jsonargparse module; ``ImportError`` naming the extra to install if it is missing."""
    try:
        import jsonargparse
    except ImportError as e:
        raise ImportError(f"the command line needs jsonargparse, which is not installed: {CLI_INSTALL}") from e
    return jsonargparse


def build_parser():
    """The ``python -m grpo_ref`` parser (a ``jsonargparse.ArgumentParser`` with the subcommands ``train`` and
    ``plot``). ``ImportError`` if jsonargparse is not installed."""
    ja = _jsonargparse()
    parser = ja.ArgumentParser(prog=PROG, exit_on_error=False, allow_abbrev=False,
                               description="grpo_ref's command line: train GRPO, PPO and the other presets on the "
                                           "addition task (train), and plot the runs (plot).")
    subcommands = parser.add_subcommands(dest="command", required=True)
    subcommands.add_subcommand("train", _train_parser(ja), help="warm start + RL on the addition task")
    subcommands.add_subcommand("plot", _plot_parser(ja), help="plot one run, or compare runs")
    return parser


def _train_parser(ja):
    t = ja.ArgumentParser(
        prog=f"{PROG} train", exit_on_error=False, allow_abbrev=False,
        usage=f"{PROG} train --out DIR [--config FILE] [--FIELD VALUE ...]",
        description="Warm-start a TinyGPT on the addition task by SFT, then train it with RL. Every TrainConfig "
                    "field is a flag of its name; every AlgoConfig field overrides the --algo preset as "
                    "--algo_overrides.FIELD. Dashes may replace underscores; null stands for None.",
    )
    t.add_argument("--config", action=ja.ActionConfigFile,
                   help="a YAML or JSON file of these options, keyed as the flags without -- (algo_overrides as a "
                        "mapping); the command line overrides it")
    run = t.add_argument_group("the run")
    run.add_argument("--out", type=str, required=True, help="output folder; must be empty or not exist, unless "
                     "--resume or --overwrite")
    run.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    run.add_argument("--overwrite", action="store_true", help="delete the run files in OUT (config.json, "
                     "metrics.jsonl, metrics.png, checkpoint.pt, tensorboard/ events) and start a new run there")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    run.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    for name, (typ, default, text) in RUN_OPTIONS.items():
        if name == "report_to":
            run.add_argument(f"--{name}", choices=REPORT_TO, default=default, help=text)
        else:
            run.add_argument(f"--{name}", type=typ, default=default, help=text)
    t.add_class_arguments(TrainConfig, nested_key=None, skip={"algo_overrides"}, fail_untyped=True)
    for action in t._actions:  # help texts: the dataclass has comments, not the docstrings jsonargparse reads
        if action.dest in TRAIN_FIELDS:
            action.help = field_help(TrainConfig, action.dest)
    for group in t._action_groups:
        if group.title and "TrainConfig" in group.title:
            group.title = "TrainConfig fields (grpo_ref.trainer.TrainConfig)"
    overrides = t.add_argument_group(
        "AlgoConfig overrides", "Each changes one field of the --algo preset (TrainConfig.algo_overrides); "
        "the default is the preset's value (shown for grpo).")
    hints = typing.get_type_hints(AlgoConfig)
    grpo = PRESETS["grpo"]
    for f in dataclasses.fields(AlgoConfig):
        if f.name in ALGO_SKIP:
            continue
        overrides.add_argument(f"--algo_overrides.{f.name}", type=hints[f.name], default=argparse.SUPPRESS,
                               help=f"{field_help(AlgoConfig, f.name)} (grpo: {json.dumps(getattr(grpo, f.name))})")
    return t


def _plot_parser(ja):
    p = ja.ArgumentParser(prog=f"{PROG} plot", exit_on_error=False, allow_abbrev=False,
                          usage=f"{PROG} plot RUN [RUN ...] --out PNG [--metric NAME] [--x AXIS]",
                          description="Draw one run's dashboard (or one --metric), or compare several runs.")
    p.add_argument("runs", type=str, nargs="+", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", type=str, required=True, help="PNG path")
    p.add_argument("--metric", type=Optional[str], default=None,
                   help="metric to draw (default: one run's dashboard; eval_accuracy for several runs)")
    p.add_argument("--x", choices=X_AXES, default="step",
                   help="x axis: the training step, the cumulative sampled completions, or the wall-clock seconds "
                        "of the RL steps (the sum of their time_step_s)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    return p


def canonical_argv(argv: List[str]) -> List[str]:
    """``argv`` with ``--some-flag`` spelled ``--some_flag`` (the field names), and the ``--config FILE`` of a
    subcommand moved to its front, so that every other option on the command line overrides the file."""
    out: List[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    if out and out[0] in SUBCOMMANDS:
        head, rest, i = out[:1], [], 1
        while i < len(out):
            if out[i] == "--":
                rest.extend(out[i:])
                break
            if out[i] == "--config" and i + 1 < len(out):
                head += out[i:i + 2]
                i += 2
                continue
            if out[i].startswith("--config="):
                head.append(out[i])
            else:
                rest.append(out[i])
            i += 1
        out = head + rest
    return out


# -- train -----------------------------------------------------------------------------------------------------------

def _train_config(given: Dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a new run from the given options (the dataclass's defaults for the others)."""
    fields = {k: v for k, v in given.items() if k in TRAIN_FIELDS and k != "algo_overrides"}
    try:
        return TrainConfig(**fields, algo_overrides=dict(given.get("algo_overrides", {})))
    except ValueError as e:
        raise UsageError(str(e)) from e


def _check_resume_args(given: Dict[str, Any], trainer: Trainer) -> None:
    """``UsageError`` if an option given with ``--resume`` contradicts the checkpoint."""
    model = getattr(trainer.policy, "config", None)
    stored = {k: v for k, v in trainer.config.to_dict().items() if k != "algo_overrides"}
    stored.update(n_digits=getattr(trainer.task, "n_digits", None), n_layer=getattr(model, "n_layer", None),
                  n_embd=getattr(model, "n_embd", None))
    conflicts = []
    for key, value in given.items():
        if key in START_ONLY:
            conflicts.append(f"--{key} (only used when a run starts)")
        elif key in stored and key not in RESUME_MAY_CHANGE and value != stored[key]:
            conflicts.append(f"--{key} {value} (the checkpoint has {stored[key]})")
    algo = trainer.algo.to_dict()
    for key, value in given.get("algo_overrides", {}).items():
        if algo.get(key) != value:
            conflicts.append(f"--algo_overrides.{key} {value!r} (the checkpoint has {algo.get(key)!r})")
    if conflicts:
        raise UsageError("--resume continues the run with its checkpoint's settings; these differ: "
                         + "; ".join(conflicts) + ". Drop them, or start a new run in another --out")


def _tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; ``UsageError`` if the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UsageError(f"--report_to tensorboard needs the tensorboard package ({e}): pip install tensorboard") from None
    return SummaryWriter


def _prepare_out(out: str, overwrite: bool) -> None:
    """Refuse a non-empty ``OUT`` unless ``overwrite`` (which deletes the run files in it); create ``OUT``."""
    if os.path.isdir(out) and os.listdir(out):
        present = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
        events = glob.glob(os.path.join(out, TENSORBOARD_DIR, "events.out.tfevents.*"))
        if not overwrite:
            what = (f"already holds a run ({', '.join(present)})" if present
                    else f"is not empty ({', '.join(sorted(os.listdir(out))[:5])})")
            raise UsageError(f"{out} {what}: use --resume to continue a run in it, --overwrite to replace it, "
                             "or another --out")
        for path in [os.path.join(out, name) for name in present] + events:
            os.remove(path)
    os.makedirs(out, exist_ok=True)


class _TensorBoardLog:
    """Writes every metrics record (``{"step": s, name: value, ...}``) as TensorBoard scalars ``name`` at step ``s``
    into ``OUT/tensorboard/``, the same scalars as ``metrics.jsonl``. A resumed run writes its whole history again
    after a restart marker at step 0 (``purge_step``), so that TensorBoard drops the events of the killed run and
    shows exactly the log that metrics.jsonl holds."""

    def __init__(self, out: str, resumed: bool):
        writer_class = _tensorboard_writer_class()
        self.writer = writer_class(log_dir=os.path.join(out, TENSORBOARD_DIR), purge_step=0 if resumed else None)
        self.logged = 0

    def log(self, history: List[Dict[str, float]]) -> None:
        for rec in history[self.logged:]:
            step = int(rec["step"])
            for key, value in rec.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, global_step=step)
        self.logged = len(history)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def train(given: Dict[str, Any]) -> int:
    """``train`` with the options ``given`` on the command line or in ``--config`` (the defaults for the others)."""
    opts = {name: default for name, (_, default, _) in RUN_OPTIONS.items()}
    opts.update({k: v for k, v in given.items() if k not in TRAIN_FIELDS})
    out, resume, overwrite = opts["out"], opts.get("resume", False), opts.get("overwrite", False)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if opts["threads"] < 1:
        raise UsageError(f"--threads must be >= 1, got {opts['threads']}")
    if opts["checkpoint_every"] < 0:
        raise UsageError(f"--checkpoint_every must be >= 0, got {opts['checkpoint_every']}")
    if opts["report_to"] == "tensorboard":
        _tensorboard_writer_class()
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    ckpt = os.path.join(out, "checkpoint.pt")
    if resume:
        if not os.path.exists(ckpt):
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
        torch.set_num_threads(opts["threads"])
        trainer = Trainer.from_checkpoint(ckpt)
        _check_resume_args(given, trainer)
        if "steps" in given:
            try:  # the new total is stored in the next checkpoint
                trainer.config = dataclasses.replace(trainer.config, steps=given["steps"])
            except ValueError as e:
                raise UsageError(str(e)) from None
        print(f"resumed {ckpt} at step {trainer.step_count} of {trainer.config.steps}", flush=True)
    else:
        config = _train_config(given)  # every setting is checked before OUT is created
        try:
            task = AdditionTask(n_digits=opts["n_digits"], seed=0)  # one eval split for every --seed, so runs compare
            if not 0 <= opts["warm_target"] <= 1 or opts["warm_max_steps"] < 1:
                raise ValueError(f"need 0 <= --warm_target <= 1 and --warm_max_steps >= 1, got {opts['warm_target']}, "
                                 f"{opts['warm_max_steps']}")
            GPTConfig(vocab_size=task.vocab_size, block_size=task.max_prompt_len + task.max_new_tokens,
                      n_layer=opts["n_layer"], n_head=4, n_embd=opts["n_embd"])
        except ValueError as e:
            raise UsageError(str(e)) from e
        _prepare_out(out, overwrite)
        torch.set_num_threads(opts["threads"])
        t0 = time.perf_counter()
        policy = warm_start_policy(task, target_accuracy=opts["warm_target"], steps=opts["warm_max_steps"],
                                   n_layer=opts["n_layer"], n_embd=opts["n_embd"], seed=config.seed,
                                   device=torch.device(config.device))
        print(f"warm start (SFT) done in {time.perf_counter() - t0:.1f} s", flush=True)
        trainer = Trainer(policy, task, config)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"train": config.to_dict(), "algo": trainer.algo.to_dict(), "task": task.to_dict(),
                       "model": policy.config.to_dict()}, f, indent=2)
    board = _TensorBoardLog(out, resumed=resume) if opts["report_to"] == "tensorboard" else None
    if board is not None:
        step = trainer.step

        def step_and_log():  # the trainer has no callbacks: log each step's new records as they come
            metrics = step()
            board.log(trainer.history)
            return metrics

        trainer.step = step_and_log  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        history = trainer.train(out_dir=out, progress=not opts.get("no_progress", False),
                                checkpoint_every=opts["checkpoint_every"], stop_at_accuracy=opts["stop_at"])
    except KeyboardInterrupt:  # Ctrl-C: the interrupted step was undone, the last whole one is saved
        trainer.save(ckpt)
        raise KeyboardInterrupt(f"interrupted: {ckpt} holds step {trainer.step_count}; --resume continues") from None
    finally:
        if board is not None:
            board.log(trainer.history)
            board.close()
    trainer.save(ckpt)
    evals = [h for h in history if "eval_accuracy" in h]
    if evals:
        print(f"eval accuracy: {evals[0]['eval_accuracy']:.3f} (step {evals[0]['step']}) -> "
              f"{evals[-1]['eval_accuracy']:.3f} (step {evals[-1]['step']}); {time.perf_counter() - t0:.1f} s", flush=True)
    wrote = [METRICS_FILE, "checkpoint.pt"]
    if _plot(history, os.path.join(out, "metrics.png"), f"{trainer.config.algo} on {out}"):
        wrote.insert(1, "metrics.png")
    if board is not None:
        wrote.append(f"{TENSORBOARD_DIR}/")
    print(f"wrote {out}/{', '.join(wrote)}", flush=True)
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


# -- plot ------------------------------------------------------------------------------------------------------------

def plot(given: Dict[str, Any]) -> int:
    from .plotting import compare_runs, plot_run

    out, metric, x = given["out"], given.get("metric"), given.get("x", "step")
    runs: Dict[str, list] = {}
    for r in given["runs"]:
        if not os.path.exists(metrics_path(r)):
            raise UsageError(f"no {METRICS_FILE} in {r}" if os.path.isdir(r) else f"no such run folder or file: {r}")
        runs[os.path.basename(os.path.normpath(r))] = load_metrics(r)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {out}: folder {folder} does not exist")
    try:
        if len(runs) == 1 and metric is None:
            (label, run), = runs.items()
            plot_run(run, out, title=label, x=x)
        else:
            compare_runs(runs, metric or "eval_accuracy", x, out)
    except ValueError as e:  # a metric no run has
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return 0


# -- main ------------------------------------------------------------------------------------------------------------

def parse(argv: List[str]) -> Tuple[str, Dict[str, Any]]:
    """``(subcommand, options given)`` of a command line: only the options set on it or in ``--config`` (so that
    ``--resume`` knows which ones to compare with the checkpoint); the defaults are the caller's to fill in.
    ``UsageError`` on bad input; ``SystemExit`` for ``--help``."""
    argv = canonical_argv(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv, defaults=False)
    except argparse.ArgumentError as e:
        command = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
        raise UsageError(f"{e} (see {PROG} {command} --help)".replace("  ", " ")) from None
    command = ns.command
    given = ns[command].as_dict()
    given.pop("config", None)
    given.pop("__path__", None)
    return command, given


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (0, 1 for a failed run, 2 for bad input, 130 if interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _jsonargparse()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        command, given = parse(argv)
    except SystemExit as e:  # --help (0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except UsageError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)  # warnings of grpo_ref (e.g. a repaired metrics.jsonl)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("grpo_ref")
    logger.addHandler(handler)
    try:
        return train(given) if command == "train" else plot(given)
    except BaseException as e:
        if given.get("debug") or isinstance(e, SystemExit):
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
