"""The training loop's throughput against TRL's ``GRPOTrainer`` on the same model, task and algorithm (A/B, alternating).

    python benchmarks/loop_vs_trl.py [--pairs 5] [--rollouts 8] [--threads 1]

The set-up (issue 10 of the project): the CLI's default model (TinyGPT 2x128, 402k parameters) warm-started by SFT
on 2-digit addition, copied weight for weight into a Hugging Face ``GPT2LMHeadModel`` (the copy's logits are checked
against the original's); G = 4 completions of 64 prompts per rollout, 4 new tokens at most, beta = 0.04 (k3, as
TRL), epsilon 0.2, 8 optimizer steps per rollout (grpo_ref: ``ppo_epochs = 2`` x ``minibatches = 4``; TRL 1.16.0:
``steps_per_generation = 4``, ``num_iterations = 2``, ``per_device_train_batch_size = 64``), AdamW at 3e-4 after
a linear warm-up (20 rollouts = 160 optimizer steps in both), gradient clipping at 1, one thread, CPU, float32.
The loss is the ``grpo`` preset, given to TRL through :func:`grpo_ref.compat.to_trl` (so TRL optimises the same
objective: loss_type, scale_rewards, epsilon, beta and the bias correction are set, not TRL's defaults).

Arms, each run in its own subprocess (imports and model loading are not timed; the first rollout cycle is a warm-up
and not timed either):

* ``trl``: ``GRPOTrainer.train()``; a callback stamps the time at every optimizer step, and a cycle is the 8 steps
  between two generations.
* ``grpo_ref``: :meth:`grpo_ref.trainer.Trainer.step` with the package defaults (it recomputes ``pi_old``).
* ``grpo_ref_sampler``: the same with ``old_logp_source="sampler"``: ``pi_old`` is the sampler's own log-prob
  (the same quantity here, see :class:`~grpo_ref.trainer.TrainConfig`; tests/test_trainer_critic.py shows the same
  update either way), so one forward pass less per rollout.
* ``grpo_ref_groups``: as ``grpo_ref_sampler``, with ``minibatch_order="groups"``: each minibatch holds whole
  groups, so with the shared-prompt forward (``share_prompts``, on by default) it runs 16 distinct prompts instead
  of about 44; the same objective and expected update, other minibatches than TRL's shuffled rows.

The arms run in turn (trl, grpo_ref, grpo_ref_sampler, grpo_ref_groups, trl, ...) ``--pairs`` times, with the 1-minute load average
logged before each, so that a change in the machine's load hits every arm alike. Printed: completions per second of
every run, medians per arm, and the ratios of the medians against TRL, plus the mean reward of each run (the
arms optimise the same objective from the same weights; their rewards differ by sampling noise only). Results go
to benchmarks/results/loop_vs_trl.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
G, PROMPTS, UPDATES = 4, 64, 8  # completions per prompt, prompts per rollout, optimizer steps per rollout
WARMUP_ROLLOUTS = 20  # TrainConfig.warmup_steps: the learning-rate warm-up, in rollouts


def warm_policy(path: str, seed: int = 0, max_steps: int = 3000):
    """The SFT warm start every arm begins from (saved once, loaded by each worker)."""
    from grpo_ref.sft import warm_start_policy
    from grpo_ref.tasks import AdditionTask

    task = AdditionTask(n_digits=2, eval_size=256, seed=0)
    policy = warm_start_policy(task, target_accuracy=0.2, steps=max_steps, seed=seed)
    torch.save({"config": policy.config.to_dict(), "state": policy.state_dict()}, path)


def load_tiny(path: str):
    from grpo_ref.model import GPTConfig, TinyGPT

    saved = torch.load(path, weights_only=True)
    model = TinyGPT(GPTConfig(**saved["config"]))
    model.load_state_dict(saved["state"])
    return model.eval()


def to_gpt2(tiny):
    """A ``GPT2LMHeadModel`` computing the same function as ``tiny`` (exact GELU, untied head, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = tiny.config
    cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                     n_head=c.n_head, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        hf.transformer.wte.weight.copy_(tiny.tok_emb.weight)
        hf.transformer.wpe.weight.copy_(tiny.pos_emb.weight)
        for blk, h in zip(tiny.blocks, hf.transformer.h):
            for mine, theirs in ((blk.ln1, h.ln_1), (blk.ln2, h.ln_2)):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
            # GPT-2's Conv1D stores weights [in, out]: nn.Linear's transposed
            for mine, theirs in ((blk.attn.qkv, h.attn.c_attn), (blk.attn.proj, h.attn.c_proj),
                                 (blk.mlp[0], h.mlp.c_fc), (blk.mlp[2], h.mlp.c_proj)):
                theirs.weight.copy_(mine.weight.T)
                theirs.bias.copy_(mine.bias)
        hf.transformer.ln_f.weight.copy_(tiny.ln_f.weight)
        hf.transformer.ln_f.bias.copy_(tiny.ln_f.bias)
        hf.lm_head.weight.copy_(tiny.lm_head.weight)
    return hf


def hf_tokenizer(task):
    """A Hugging Face tokenizer with the task's ids: pad 0, bos 1, eos 2, one id per character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ct = task.tokenizer
    vocab = {"<pad>": ct.pad_id, "<bos>": ct.bos_id, "<eos>": ct.eos_id, **ct.stoi}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def run_grpo_ref(warm: str, rollouts: int, overrides: dict, prompts: int = PROMPTS) -> dict:
    from grpo_ref.tasks import AdditionTask
    from grpo_ref.trainer import Trainer, TrainConfig

    task = AdditionTask(n_digits=2, eval_size=256, seed=0)
    cfg = TrainConfig(algo="grpo", group_size=G, prompts_per_step=prompts, ppo_epochs=2, minibatches=UPDATES // 2,
                      warmup_steps=WARMUP_ROLLOUTS, eval_every=0, seed=0, **overrides)
    trainer = Trainer(load_tiny(warm), task, cfg)
    times, rewards = [], []
    for _ in range(rollouts + 1):
        t0 = time.perf_counter()
        m = trainer.step()
        times.append(time.perf_counter() - t0)
        rewards.append(m["reward_mean"])
    return {"cycle_s": times[1:], "reward": rewards[1:]}


def run_trl(warm: str, rollouts: int, prompts: int = PROMPTS) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_ref.algorithms import get_preset
    from grpo_ref.compat import to_trl
    from grpo_ref.tasks import AdditionTask

    task = AdditionTask(n_digits=2, eval_size=256, seed=0)
    tiny = load_tiny(warm)
    hf = to_gpt2(tiny)
    ids, mask = task.encode_prompts(torch.tensor([[7, 35], [99, 0]]))
    with torch.no_grad():
        gap = (hf(input_ids=ids, attention_mask=mask).logits - tiny(ids, mask).logits).abs().max()
    assert float(gap) < 1e-4, f"the GPT-2 copy computes another function (max logit gap {float(gap)})"
    tokenizer = hf_tokenizer(task)
    assert tokenizer("<bos>07+35=")["input_ids"] == ids[0].tolist(), "the HF tokenizer disagrees with the task's"

    pairs = task.sample_train(prompts * (rollouts + 2), torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"prompt": ["<bos>" + task.prompt_text(a, b) for a, b in pairs],
                              "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})

    def reward(completions, completion_ids, a, b, **kwargs):
        width = max(len(c) for c in completion_ids)
        resp = torch.zeros(len(completion_ids), width, dtype=torch.long)
        for i, c in enumerate(completion_ids):
            resp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        r, _ = task.score(torch.tensor([a, b]).T, resp)
        return r.tolist()

    stamps: list = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp + "/model")
        tokenizer.save_pretrained(tmp + "/model")
        trl_fields = to_trl(get_preset("grpo", group_size=G), train=dict(
            prompts_per_step=prompts, ppo_epochs=2, minibatches=UPDATES // 2, max_new_tokens=task.max_new_tokens,
            temperature=1.0, lr=3e-4, weight_decay=0.0))
        args = GRPOConfig(
            output_dir=tmp + "/out", use_cpu=True, bf16=False, report_to=[], seed=0, disable_tqdm=True,
            save_strategy="no", logging_steps=UPDATES, max_steps=UPDATES * (rollouts + 1),
            lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP_ROLLOUTS * UPDATES, max_grad_norm=1.0,
            dataloader_num_workers=0, **trl_fields,
        )
        trainer = GRPOTrainer(model=tmp + "/model", reward_funcs=[reward], args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Stamp()])
        t0 = time.perf_counter()
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    marks = [t0] + stamps
    cycles = [marks[(k + 1) * UPDATES] - marks[k * UPDATES] for k in range(rollouts + 1)]
    return {"cycle_s": cycles[1:], "reward": rewards[1:], "trl_fields": {k: str(v) for k, v in trl_fields.items()}}


def worker(arm: str, warm: str, rollouts: int, threads: int, prompts: int) -> None:
    torch.set_num_threads(threads)
    out = run_trl(warm, rollouts, prompts) if arm == "trl" else run_grpo_ref(warm, rollouts, GRPO_REF_ARMS[arm], prompts)
    print("RESULT " + json.dumps(out))


# TrainConfig overrides of the grpo_ref arms (see the module docstring)
GRPO_REF_ARMS = {"grpo_ref": {}, "grpo_ref_sampler": {"old_logp_source": "sampler"},
                 "grpo_ref_groups": {"old_logp_source": "sampler", "minibatch_order": "groups"}}
ARMS = ("trl", *GRPO_REF_ARMS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5, help="alternations of the arms")
    ap.add_argument("--rollouts", type=int, default=8, help="timed rollout cycles per run (after one warm-up cycle)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per rollout (smaller: the smoke test)")
    ap.add_argument("--warm-max-steps", type=int, default=3000, help="SFT steps of the warm start at most (smoke test: few)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "loop_vs_trl.txt"))
    ap.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.warm, args.rollouts, args.threads, args.prompts)

    import transformers
    import trl

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    lines: list = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"grpo_ref Trainer vs TRL {trl.__version__} GRPOTrainer (transformers {transformers.__version__}), same model and objective: "
        f"TinyGPT 2x128 / its GPT-2 copy, G={G} x {args.prompts} prompts, 4 new tokens, beta 0.04, {UPDATES} optimizer steps per rollout")
    log(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads}; "
        f"{args.rollouts} timed rollout cycles per run, {args.pairs} alternations")
    rates: dict = {a: [] for a in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        warm = os.path.join(tmp, "warm.pt")
        torch.set_num_threads(args.threads)
        warm_policy(warm, max_steps=args.warm_max_steps)
        for k in range(args.pairs):
            for arm in ARMS:
                load = os.getloadavg()[0]
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, "--warm", warm,
                       "--rollouts", str(args.rollouts), "--threads", str(args.threads), "--prompts", str(args.prompts)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if proc.returncode != 0:
                    raise SystemExit(f"{arm} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
                rate = G * args.prompts * len(res["cycle_s"]) / sum(res["cycle_s"])
                rates[arm].append(rate)
                log(f"run {k + 1} {arm:16s} load {load:4.2f}: {rate:6.1f} completions/s "
                    f"({statistics.median(res['cycle_s']):.3f} s per rollout + {UPDATES} updates, median), "
                    f"mean reward {statistics.fmean(res['reward']):.3f}")
    log("")
    med = {a: statistics.median(r) for a, r in rates.items()}
    for arm in ARMS:
        log(f"{arm:16s} median {med[arm]:6.1f} completions/s  ({med[arm] / med['trl']:.2f}x TRL)")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
