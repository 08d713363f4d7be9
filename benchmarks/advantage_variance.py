"""Bias and variance of the policy gradient under each advantage estimator, measured on the same samples.

    python benchmarks/advantage_variance.py [--seeds 0 1 2] [--batches 256] [--prompts 32] [--threads 1] [--out FILE]

The claims: RLOO's leave-one-out baseline keeps the REINFORCE gradient unbiased and lowers its variance (Ahmadian et
al. 2024, sec. 3); a group mean that includes the sample itself scales the expected gradient by (G - 1) / G (Dr.
GRPO's advantage); GRPO's division by the group's std reweights prompts, so its expected gradient is no longer a
multiple of the true one (Liu et al. 2025, sec. 3.1); REINFORCE++ whitens over the whole batch instead of per group
(Hu et al. 2025). This script measures each of them on :class:`grpo_ref.chain_task.ChainSumTask` at each seed's SFT
warm start (50 % greedy accuracy, as in ``benchmarks/variants.py``), with the policy held fixed:

1. ``--batches`` independent rollout batches of ``--prompts`` prompts x G = 4 completions (temperature 1);
2. for each batch, the advantages of every estimator from the same rewards (``compute_advantages`` with the
   preset's estimator), and the gradient of the same REINFORCE surrogate ``-(1/B) sum_i sum_t A_{i,t} log pi(y_t)``
   (the policy-gradient theorem's form, one aggregation for all so that only the advantage differs; the presets'
   own aggregations and clips are not part of this measurement);
3. over the batches, per estimator: the mean gradient ``g_bar``, the total variance ``tr Cov(g)`` (unbiased over
   batches) and the noise-to-signal ratio ``tr Cov(g) / ||E g||^2`` with ``||E g||^2 = ||g_bar||^2 - tr Cov(g) / K``
   (a batch's gradient is this many times noisier than its expected value is long; scale-free, so estimators
   with different advantage scales compare);
4. the bias test against plain REINFORCE (``A = R``, unbiased by the policy-gradient theorem): for
   ``d_k = g_E,k - c g_REINFORCE,k`` over the K batches, ``z = ||d_bar||^2 / (tr Cov(d) / K)``. If ``E[g_E] =
   c E[g_REINFORCE]`` then ``E ||d_bar||^2 = tr Cov(d) / K`` and ``z`` is about 1; a bias ``b`` adds
   ``K ||b||^2 / tr Cov(d)``. ``c = 1`` for RLOO, ``(G - 1) / G`` for the group mean without std, and for GRPO
   and the whitened estimators the least-squares ``c`` (the best a scale can do), so their ``z`` measures a bias of
   direction only.

5. why a baseline helps or not: for the completions of the first ``--per-sequence-batches`` batches, each one's
   score function ``s = grad sum_t log pi(y_t)``; the constant baseline that minimises ``E ||s (R - b)||^2`` is
   ``b* = E[R ||s||^2] / E[||s||^2]`` (Greensmith et al. 2004), which differs from the mean reward when the
   completions with large ``||s||`` (long ones) earn less or more than the others. Printed per kind of completion
   (right, wrong, malformed): share, mean length and mean ``||s||^2``.

Also printed: the variance of the per-sequence advantages (within each batch, mean over batches) for the record;
it is not comparable across estimators that scale differently, which is why the gradient's noise-to-signal ratio
is the figure the book asserts on. One thread by default; about 4 minutes per seed on one core.
With ``--batches 3 --prompts 4 --seeds 0 --warm-max-steps 5`` it is the smoke run of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from grpo_ref.algorithms import AlgoConfig, compute_advantages, get_preset
from grpo_ref.chain_task import ChainSumTask
from grpo_ref.masks import masked_mean
from grpo_ref.rollout import rollout
from grpo_ref.sft import warm_start_policy
from grpo_ref.trainer import response_logprobs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
G = 4
#: estimator name -> AlgoConfig (None: plain REINFORCE, A = R)
ESTIMATORS = {
    "reinforce": None,
    "rloo": get_preset("rloo", group_size=G),
    "group_mean": get_preset("dr_grpo", group_size=G),  # Dr. GRPO's advantage: R - mean of the group
    "grpo": get_preset("grpo", group_size=G),  # (R - mean) / (std + eps)
    "reinforce_pp": get_preset("reinforce_pp", group_size=G),  # return whitened over the batch
    "reinforce_pp_baseline": AlgoConfig(name="reinforce_pp_baseline", adv_estimator="reinforce_pp_baseline",
                                        group_size=G, kl_coef=0.0),
}
#: the scale c in E[g_E] = c E[g_REINFORCE] that each estimator is expected to satisfy exactly (None: fitted)
EXPECTED_SCALE = {"reinforce": 1.0, "rloo": 1.0, "group_mean": (G - 1) / G}


def _flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)])


def batch_gradients(policy, task, problems, generator, per_sequence: bool = False) -> tuple:
    """One rollout batch: ``({estimator: flat gradient [P]}, {estimator: variance of the sequence advantages},
    reward mean, per-sequence rows or None)``, every estimator on the same samples. With ``per_sequence``, also
    each completion's ``(reward, correct, well_formed, length, ||grad sum_t log pi(y_t)||^2)``."""
    batch = rollout(policy, task, problems, G, task.max_new_tokens, 1.0, generator)
    mask = batch.loss_mask.float()
    logp, _ = response_logprobs(policy, batch, 1.0)
    params = [p for p in policy.parameters() if p.requires_grad]
    rows = None
    if per_sequence:  # the score function of each completion, one backward each
        seq_logp = (logp * mask).sum(-1)
        norms = [float(_flat_grad(seq_logp[i], params).double().pow(2).sum()) for i in range(seq_logp.shape[0])]
        formed = batch.rewards > 0  # a well-formed response earns at least the format reward
        rows = [(float(r), bool(c), bool(f), float(n), g) for r, c, f, n, g in
                zip(batch.rewards, batch.correct, formed, mask.sum(-1), norms, strict=True)]
    grads, adv_var = {}, {}
    b = mask.shape[0]
    for name, cfg in ESTIMATORS.items():
        if cfg is None:
            adv = batch.rewards[:, None].float() * mask
        else:
            lp = logp.detach()
            adv, _ = compute_advantages(cfg, batch.rewards, mask, old_logp=lp, ref_logp=lp)  # pi = pi_ref: KL 0
        seq_adv = masked_mean(adv, mask, dim=-1)
        adv_var[name] = float(seq_adv.var())
        grads[name] = _flat_grad(-(adv * logp * mask).sum() / b, params)
    return grads, adv_var, float(batch.rewards.mean()), rows


class Moments:
    """Running sum and sum of squared norms of vectors, for the mean and the total variance over batches."""

    def __init__(self) -> None:
        self.k, self.sum, self.sq = 0, None, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.k += 1
        self.sum = x.clone() if self.sum is None else self.sum + x
        self.sq += float(x @ x)

    def mean(self) -> torch.Tensor:
        return self.sum / self.k

    def total_variance(self) -> float:
        """``tr Cov`` with the unbiased (K - 1) denominator."""
        m = self.mean()
        return (self.sq - self.k * float(m @ m)) / (self.k - 1)


def measure_seed(seed: int, args, log) -> dict:
    task = ChainSumTask(seed=0)
    t0 = time.perf_counter()
    policy = warm_start_policy(task, target_accuracy=args.warm_target, steps=args.warm_max_steps, seed=seed)
    warm_s = time.perf_counter() - t0
    policy.eval()
    gen = torch.Generator().manual_seed(1000 + seed)
    cross = {name: 0.0 for name in ESTIMATORS}  # sum over batches of <g_E, g_REINFORCE>
    moments = {name: Moments() for name in ESTIMATORS}
    adv_vars = {name: [] for name in ESTIMATORS}
    rewards = []
    t0 = time.perf_counter()
    seqs: list = []
    for k in range(args.batches):
        problems = task.sample_train(args.prompts, gen)
        grads, adv_var, reward, rows = batch_gradients(policy, task, problems, gen, k < args.per_sequence_batches)
        seqs += rows or []
        for name in ESTIMATORS:
            moments[name].add(grads[name])
            cross[name] += float(grads[name].double() @ grads["reinforce"].double())
            adv_vars[name].append(adv_var[name])
        rewards.append(reward)
    k = args.batches
    ref = moments["reinforce"].mean()
    out = {"seed": seed, "batches": k, "prompts": args.prompts, "group_size": G, "warm_start_s": round(warm_s, 1),
           "measure_s": round(time.perf_counter() - t0, 1), "reward_mean": sum(rewards) / k, "estimators": {}}
    for name in ESTIMATORS:
        m = moments[name]
        tv = m.total_variance()
        signal = float(m.mean() @ m.mean()) - tv / k
        scale = EXPECTED_SCALE.get(name)
        fitted = float(m.mean() @ ref) / float(ref @ ref)
        c = fitted if scale is None else scale
        # d_k = g_E,k - c g_R,k, from the sums kept: sum d and sum ||d||^2 are linear / quadratic in them
        r = moments["reinforce"]
        d_mean = m.mean() - c * r.mean()
        d_sq = m.sq - 2 * c * cross[name] + c * c * r.sq
        dv = (d_sq - k * float(d_mean @ d_mean)) / (k - 1)
        z = float(d_mean @ d_mean) / (dv / k) if dv > 1e-30 else float("nan")
        cos = float(m.mean() @ ref) / (float(m.mean().norm()) * float(ref.norm()))
        out["estimators"][name] = {
            "noise_to_signal": tv / signal if signal > 0 else float("inf"), "total_variance": tv,
            "mean_grad_norm": float(m.mean().norm()), "scale": c, "fitted_scale": fitted, "bias_z": z,
            "cos_to_reinforce": cos, "seq_adv_var": sum(adv_vars[name]) / k,
        }
    if seqs:  # the constant baseline that minimises E ||s (R - b)||^2 (s: a completion's score function)
        w = [g for *_, g in seqs]
        out["per_sequence"] = {
            "n": len(seqs), "reward_mean": sum(r for r, *_ in seqs) / len(seqs),
            "optimal_baseline": sum(r * g for (r, *_), g in zip(seqs, w, strict=True)) / sum(w),
            **{f"{kind}_{stat}": _mean([row[3 if stat == "length" else 4] for row in seqs if pick(row)])
               for kind, pick in (("right", lambda x: x[1]), ("wrong", lambda x: x[2] and not x[1]),
                                  ("malformed", lambda x: not x[2]))
               for stat in ("length", "score_sq_norm")},
            **{f"{kind}_share": sum(1 for row in seqs if pick(row)) / len(seqs)
               for kind, pick in (("right", lambda x: x[1]), ("wrong", lambda x: x[2] and not x[1]),
                                  ("malformed", lambda x: not x[2]))},
        }
    log(f"seed {seed}: warm start {warm_s:.0f} s, {k} batches of {args.prompts} x G={G} in {out['measure_s']:.0f} s, "
        f"reward mean {out['reward_mean']:.3f}")
    log(f"  {'estimator':22} {'noise/signal':>12} {'c':>6} {'fitted c':>8} {'bias z':>8} {'cos':>6} {'adv var':>8}")
    for name, e in out["estimators"].items():
        log(f"  {name:22} {e['noise_to_signal']:12.2f} {e['scale']:6.3f} {e['fitted_scale']:8.3f} "
            f"{e['bias_z']:8.2f} {e['cos_to_reinforce']:6.3f} {e['seq_adv_var']:8.4f}")
    if seqs:
        p = out["per_sequence"]
        log(f"  per completion ({p['n']}, the first {args.per_sequence_batches} batches): mean reward "
            f"{p['reward_mean']:.3f}, optimal constant baseline {p['optimal_baseline']:.3f}; "
            + "; ".join(f"{kind} {p[kind + '_share']:.0%}: length {p[kind + '_length']:.1f}, "
                        f"||score||^2 {p[kind + '_score_sq_norm']:.1f}" for kind in ("right", "wrong", "malformed")))
    return out


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=256, help="independent rollout batches per seed (K)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per batch (x G = 4 completions)")
    ap.add_argument("--per-sequence-batches", type=int, default=2,
                    help="batches whose completions also get their own score-function norm (one backward each)")
    ap.add_argument("--warm-target", type=float, default=0.5)
    ap.add_argument("--warm-max-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(RESULTS, "advantage_variance.txt"))
    ap.add_argument("--json", default=os.path.join(RESULTS, "advantage_variance.json"))
    args = ap.parse_args(argv)
    if args.batches < 2:
        ap.error(f"--batches must be at least 2 (a variance over batches), got {args.batches}")
    torch.set_num_threads(args.threads)
    for path in (args.out, args.json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.out, "w") as fh:
        def log(line: str) -> None:
            print(line, flush=True)
            fh.write(line + "\n")
            fh.flush()

        log(f"Policy-gradient bias and variance per advantage estimator (ChainSumTask, policy fixed at each seed's "
            f"warm start); machine {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {args.threads}")
        results = [measure_seed(seed, args, log) for seed in args.seeds]
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
