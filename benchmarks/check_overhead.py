"""Cost of the input checks on the hot path: each public entry point against the same math with the checks
bypassed (its private core, fed already-converted inputs), forward + backward, in the same run.

    python benchmarks/check_overhead.py            # B=256, T=512; logits N=4096, V=32000 (about 1 GB of float32)
    python benchmarks/check_overhead.py --small    # CI-sized

The two variants alternate within every repeat (so load on a shared machine hits both alike); the ratio is
median(validated) / median(bypassed). On a loaded machine that ratio is noisy at the few-ms scale, so the
checks are also timed alone: the public call with its private cores replaced by stubs (patched here, for the
measurement only, and restored), whose median is ``checks ms``; ``(bypassed + checks) / bypassed`` is the second
estimate of the overhead. Results: ``benchmarks/results/check_overhead.txt``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import contextlib

import torch

import grpo_ref as G
import grpo_ref.logprobs
import grpo_ref.ppo
import grpo_ref.surrogate
from grpo_ref._checks import as_float
from grpo_ref.aggregation import _aggregate
from grpo_ref.logprobs import _token_logprobs
from grpo_ref.ppo import _value_loss
from grpo_ref.surrogate import _policy_loss


def _batch(b: int, t: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    old = -(torch.rand(b, t, generator=g) * 3 + 0.05)
    return dict(
        logp=old + 0.1 * torch.randn(b, t, generator=g), old_logp=old, ref_logp=old + 0.1 * torch.randn(b, t, generator=g),
        advantages=torch.randn(b, generator=g), mask=mask, entropy=torch.rand(b, t, generator=g),
        values=torch.randn(b, t, generator=g), old_values=torch.randn(b, t, generator=g), returns=torch.randn(b, t, generator=g),
    )


def _policy_pair(d: Dict[str, torch.Tensor]) -> Tuple[Callable[[], None], Callable[[], None]]:
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, ratio_level="token", loss_agg_mode="seq-mean-token-mean",
              kl_coef=0.04, kl_estimator="k3", max_log_ratio=20.0)

    def checked():
        lp = d["logp"].detach().requires_grad_(True)
        loss, _ = G.policy_loss(lp, d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"], entropy=d["entropy"], **kw)
        loss.backward()

    def bypassed():
        lp = d["logp"].detach().requires_grad_(True)
        x = as_float(lp)
        adv = d["advantages"][:, None].expand_as(x)
        loss, _ = _policy_loss(x, d["old_logp"], adv, d["mask"], kw["eps_low"], kw["eps_high"], kw["dual_clip"], kw["ratio_level"],
                               kw["loss_agg_mode"], None, d["ref_logp"], kw["kl_coef"], kw["kl_estimator"], d["entropy"], kw["max_log_ratio"])
        loss.backward()

    return checked, bypassed


def _compute_loss_pair(d: Dict[str, torch.Tensor]) -> Tuple[Callable[[], None], Callable[[], None]]:
    cfg = G.get_preset("ppo", ent_coef=0.01)

    def checked():
        lp = d["logp"].detach().requires_grad_(True)
        v = d["values"].detach().requires_grad_(True)
        inp = G.LossInputs(lp, d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"], entropy=d["entropy"],
                           values=v, old_values=d["old_values"], returns=d["returns"])
        loss, _ = G.compute_loss(inp, cfg)
        loss.backward()

    def bypassed():  # the same composition as ppo_loss, from the private cores
        lp = d["logp"].detach().requires_grad_(True)
        v = d["values"].detach().requires_grad_(True)
        m = d["mask"]
        adv = d["advantages"][:, None].expand_as(lp)
        loss, _ = _policy_loss(lp, d["old_logp"], adv, m, cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.ratio_level,
                               cfg.loss_agg_mode, None, d["ref_logp"], 0.0, cfg.kl_estimator, d["entropy"], 20.0)
        loss = loss - cfg.ent_coef * _aggregate(d["entropy"], m, cfg.loss_agg_mode, None)
        vf, _ = _value_loss(v, d["old_values"], d["returns"], m, cfg.value_clip, cfg.loss_agg_mode, None)
        (loss + cfg.vf_coef * vf).backward()

    return checked, bypassed


def _logprobs_pair(n: int, v: int) -> Tuple[Callable[[], None], Callable[[], None]]:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, v, generator=g)
    tokens = torch.randint(0, v, (n,), generator=g)

    def checked():
        z = logits.detach().requires_grad_(True)
        G.token_logprobs(z, tokens).sum().backward()

    def bypassed():
        z = logits.detach().requires_grad_(True)
        _token_logprobs(z, tokens, 1.0, 1024).sum().backward()

    return checked, bypassed


@contextlib.contextmanager
def _stubbed_cores():
    """The private cores replaced by constant stubs, so that a public call runs its checks only."""
    zero = torch.zeros(())
    stubs = {
        (grpo_ref.surrogate, "_policy_loss"): lambda *a: (zero, {}),
        (grpo_ref.ppo, "_value_loss"): lambda *a: (zero, {}),
        (grpo_ref.ppo, "_aggregate"): lambda *a: zero,
        (grpo_ref.logprobs, "_token_logprobs"): lambda logits, tokens, *a: torch.zeros(tokens.shape),
    }
    saved = {key: getattr(*key) for key in stubs}
    try:
        for (mod, name), fn in stubs.items():
            setattr(mod, name, fn)
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def checks_only(checked: Callable[[], None], repeats: int) -> float:
    """Median time of ``checked`` with the cores stubbed (its ``.backward()`` on a constant is skipped)."""
    times = []
    with _stubbed_cores(), _no_backward():
        for _ in range(repeats):
            times.append(_time(checked))
    return statistics.median(times)


@contextlib.contextmanager
def _no_backward():
    original = torch.Tensor.backward
    torch.Tensor.backward = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(pair: Tuple[Callable[[], None], Callable[[], None]], repeats: int) -> Tuple[float, float]:
    checked, bypassed = pair
    checked(), bypassed()  # warm-up
    a: List[float] = []
    b: List[float] = []
    for i in range(repeats):
        order = (checked, bypassed) if i % 2 == 0 else (bypassed, checked)
        for fn in order:
            (a if fn is checked else b).append(_time(fn))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CI-sized tensors")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the [B, T] rows (default 41; 5 with --small)")
    ap.add_argument("--logits-repeats", type=int, default=None, help="repeats of the logits row (default 7; 5 with --small)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, t, n, v = (16, 64, 256, 1000) if args.small else (256, 512, 4096, 32000)
    repeats = args.repeats or (5 if args.small else 41)
    logits_repeats = args.logits_repeats or (5 if args.small else 7)
    d = _batch(b, t)
    rows = [
        (f"policy_loss fwd+bwd  [B={b}, T={t}]", _policy_pair(d), repeats),
        (f"compute_loss (ppo) fwd+bwd  [B={b}, T={t}]", _compute_loss_pair(d), repeats),
        (f"token_logprobs fwd+bwd  [N={n}, V={v}]", _logprobs_pair(n, v), logits_repeats),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; median of alternating repeats")
    print(f"{'call':<44} {'repeats':>7} {'validated ms':>13} {'bypassed ms':>12} {'ratio':>6} {'checks ms':>10} {'(byp+chk)/byp':>14}")
    for name, pair, n_rep in rows:
        checked, bypassed = measure(pair, n_rep)
        alone = checks_only(pair[0], max(n_rep, 11))
        print(f"{name:<44} {n_rep:>7} {1e3 * checked:>13.2f} {1e3 * bypassed:>12.2f} {checked / bypassed:>6.3f} "
              f"{1e3 * alone:>10.3f} {(bypassed + alone) / bypassed:>14.3f}")


if __name__ == "__main__":
    main()
