"""KV-cached sampling vs recomputing the whole prefix for every new token, same model, same random draws.

    python benchmarks/kv_cache.py [--new-tokens 64] [--batch 32] [--repeats 3] [--threads 1]

Prints the median wall time of each and their ratio, checks that both produce the same tokens, and writes the
printed figures to benchmarks/results/kv_cache.txt.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from grpo_ref.model import GPTConfig, tiny_gpt
from grpo_ref.rollout import generate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kv_cache.txt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = GPTConfig(vocab_size=64, block_size=args.prompt_len + args.new_tokens, n_layer=4, n_head=4, n_embd=128)
    model = tiny_gpt(cfg, seed=0).eval()
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    # eos_id one past the vocabulary: never sampled, so no row stops early and every run samples new_tokens tokens
    kw = dict(max_new_tokens=args.new_tokens, eos_id=cfg.vocab_size, pad_id=0, temperature=1.0)

    def run(use_cache: bool):
        t0 = time.perf_counter()
        out = generate(model, prompts, mask, generator=torch.Generator().manual_seed(1), use_cache=use_cache, **kw)
        return time.perf_counter() - t0, out

    run(True), run(False)  # warm-up
    cached, full = [], []
    for _ in range(args.repeats):
        t, a = run(True)
        cached.append(t)
        t, b = run(False)
        full.append(t)
    same = torch.equal(a.tokens, b.tokens)
    max_logp_diff = float((a.logp - b.logp).abs().max())
    c, f = statistics.median(cached), statistics.median(full)
    lines = [
        "KV-cached sampling vs recomputing the prefix (grpo_ref.rollout.generate)",
        f"model: TinyGPT n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} vocab={cfg.vocab_size}",
        f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, temperature 1.0",
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
        f"{os.cpu_count()} cores (shared with other jobs: timings are noisy)",
        f"median of {args.repeats}: cached {c * 1000:.1f} ms, recomputed {f * 1000:.1f} ms",
        f"speed-up: {f / c:.1f}x  (all runs: cached {[round(x * 1000, 1) for x in cached]} ms, recomputed {[round(x * 1000, 1) for x in full]} ms)",
        f"same tokens: {same}; max |logp difference|: {max_logp_diff:.2e}",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text + "\n")
    if not same:
        raise SystemExit("cached and recomputed sampling disagree")


if __name__ == "__main__":
    main()
