"""Token log-probs at LLM vocabulary sizes: time and peak memory of the naive form, the pre-issue-10 chunked
``token_logprobs``, the hand-written chunked backward and the fused path from hidden states (issue 10, items 1-3).

    python benchmarks/logprobs_speed.py            # default run: 8 minutes at load average 3.5 on 2 shared cores
    python benchmarks/logprobs_speed.py --small    # seconds (smoke test)

Methods (``METHODS_LOGITS``, ``METHODS_HIDDEN``; every entry is ``name -> fn(inputs, tau, grad) -> loss``):

* ``naive``: ``log_softmax(z / tau, -1).gather(-1, y)`` (no division at ``tau = 1``); from hidden: ``z = h @ W.T``
  first (the plain path);
* ``chunked-old``: a local copy of ``grpo_ref.logprobs._token_logprobs`` as it was before issue 10 (row chunks,
  autograd's own backward, which allocates a full-size zero gradient per chunk); run at ``V = 4096`` only (its
  forward + backward is quadratic in the number of chunks: 1.7-2.7x naive at ``V = 32000``, see the run committed
  before this one in git history), to keep the default run near 3 minutes;
* ``trl-selective``: TRL 1.16.0's ``trl.trainer.utils.selective_log_softmax(logits, index, temperature)`` (imported
  lazily, only if ``trl`` is installed), given the logits as ``[B, T, V]`` with ``T = min(N, 512)`` rows per
  sequence, as TRL's ``_get_per_token_logps_and_entropies`` calls it (its float32 branch: gather, then a Python
  loop of ``logsumexp`` over the ``B`` sequences; the Triton kernel it prefers needs a GPU);
* ``autograd``: ``grpo_ref.fused_logprobs`` from logits (hand-written chunked backward into one buffer);
  checks bypassed, ``benchmarks/check_overhead.py`` measures those;
* ``fused``: ``token_logprobs_from_hidden`` (and ``token_logprobs_and_entropy_from_hidden``): no ``[N, V]`` tensor.

Not measured: Liger-Kernel's fused linear cross-entropy / ``LigerFusedLinearGRPOLoss`` (Triton kernels: it needs
Triton and a GPU, and is not installed here) and verl's ``FusedLinearForPPO`` (verl not installed); the output
says so. ``_optional_methods`` adds TRL's function to ``METHODS_LOGITS`` when ``trl`` can be imported.

Timing (one subprocess, glibc's default allocator settings): median of ``--repeats`` wall-clock runs, 1 thread,
after a small warm-up of every method; the methods alternate within every repeat so that load from other
processes hits them alike; ratios are against ``naive`` of the same run.

Memory (a second subprocess, one call per case): peak resident set size above the resident size just before the
call, read from ``VmHWM`` in ``/proc/self/status`` after resetting it (``echo 5 > /proc/self/clear_refs``), with
glibc forced to serve every allocation of 64 KiB or more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``) so that
freed tensors go back to the OS between cases (that setting makes every allocation fault its pages in, so it is
not used for the timing). It counts every byte torch touches during the call
(temporaries, saved tensors, returned gradients), not the inputs; ``working`` subtracts the returned gradients
(``N x V x 4`` for the logits; ``N x H + V x H`` floats from hidden), which every method must produce.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import torch

MIB = 2**20


# ------------------------------------------------------------------------------------------ methods
def _chunked_old(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_size: int = 1024) -> torch.Tensor:
    """``grpo_ref.logprobs._token_logprobs`` before issue 10 (kept here as the baseline)."""
    rows = logits.reshape(-1, logits.shape[-1])
    ids = tokens.reshape(-1)
    out = []
    for start in range(0, rows.shape[0], chunk_size):
        z = rows[start : start + chunk_size].float()
        z = z if temperature == 1.0 else z / temperature
        chosen = z.gather(-1, ids[start : start + chunk_size, None])[:, 0]
        out.append(chosen - torch.logsumexp(z, dim=-1))
    return torch.cat(out).reshape(tokens.shape)


def _over_tau(z, tau):
    """``z / tau``, skipping the copy at ``tau == 1`` (the leanest plain-torch baseline)."""
    return z if tau == 1.0 else z / tau


def _naive(logits, tokens, tau):
    return torch.log_softmax(_over_tau(logits.float(), tau), -1).gather(-1, tokens[..., None])[..., 0]


def _autograd(logits, tokens, tau):
    from grpo_ref.fused_logprobs import _logits_apply

    return _logits_apply(logits, tokens, tau, 1024, True, False)[0]


def _run(fn_loss: Callable[[], torch.Tensor], inputs, grad: bool):
    """Forward (and backward to ``inputs`` when ``grad``); returns nothing, frees everything."""
    if grad:
        loss = fn_loss()
        torch.autograd.grad(loss, inputs)
    else:
        with torch.no_grad():
            fn_loss()


METHODS_LOGITS: Dict[str, Callable] = {
    "naive": lambda d, tau: _naive(d["z"], d["y"], tau).sum(),
    "chunked-old": lambda d, tau: _chunked_old(d["z"], d["y"], tau).sum(),
    "autograd": lambda d, tau: _autograd(d["z"], d["y"], tau).sum(),
}


def _fused(d, tau):
    from grpo_ref.fused_logprobs import token_logprobs_from_hidden

    return token_logprobs_from_hidden(d["h"], d["w"], d["y"], tau, chunk_size=d["chunk"]).sum()


def _fused_both(d, tau):
    from grpo_ref.fused_logprobs import token_logprobs_and_entropy_from_hidden

    lp, h = token_logprobs_and_entropy_from_hidden(d["h"], d["w"], d["y"], tau, chunk_size=d["chunk"])
    return lp.sum() + 0.01 * h.sum()


def _naive_both(d, tau):
    z = d["h"] @ d["w"].t()
    lsm = torch.log_softmax(_over_tau(z, tau), -1)
    return lsm.gather(-1, d["y"][..., None]).sum() + 0.01 * (-(lsm.exp() * lsm).sum())


def _logits_then_autograd_both(d, tau):
    from grpo_ref.fused_logprobs import _logits_apply

    lp, h = _logits_apply(d["h"] @ d["w"].t(), d["y"], tau, 1024, True, True)
    return lp.sum() + 0.01 * h.sum()


METHODS_HIDDEN: Dict[str, Callable] = {
    "naive": lambda d, tau: _naive(d["h"] @ d["w"].t(), d["y"], tau).sum(),
    "h@W.T+autograd": lambda d, tau: _autograd(d["h"] @ d["w"].t(), d["y"], tau).sum(),
    "fused": _fused,
}
METHODS_HIDDEN_BOTH: Dict[str, Callable] = {  # log-probs and entropy, what a step with an entropy term needs
    "naive": _naive_both,
    "h@W.T+autograd": _logits_then_autograd_both,
    "fused": _fused_both,
}


def _optional_methods(with_trl: bool = True) -> list:
    """Frameworks' versions of the same idea, added when importable; returns the lines to print about them.
    ``with_trl=False`` (``--small``, the smoke test) skips TRL: importing it takes 10 s of CPU and more on a loaded
    machine."""
    notes = []
    if not with_trl:
        notes.append("trl selective_log_softmax: skipped (--small: the smoke test does not import trl)")
    try:
        if not with_trl:
            raise _Skip
        from trl.trainer.utils import selective_log_softmax  # type: ignore

        import trl  # type: ignore

        def _trl(d, tau):
            n, v = d["z"].shape
            t = min(n, 512) if n % min(n, 512) == 0 else n
            return selective_log_softmax(d["z"].reshape(n // t, t, v), d["y"].reshape(n // t, t), temperature=tau).sum()

        METHODS_LOGITS["trl-selective"] = _trl
        notes.append(f"trl {trl.__version__} trl.trainer.utils.selective_log_softmax: measured (row 'trl-selective'; "
                     "logits as [N / 512, 512, V], its CPU float32 branch)")
    except _Skip:
        pass
    except Exception as exc:  # ImportError, or an API that moved
        notes.append(f"trl selective_log_softmax: NOT measured ({type(exc).__name__}: trl is not installed in this environment)")
    notes.append("liger-kernel fused linear cross-entropy / LigerFusedLinearGRPOLoss: NOT run (Triton kernels: needs Triton "
                 "and a GPU; not installed on this CPU-only machine)")
    notes.append("verl FusedLinearForPPO: NOT measured (not installed)")
    return notes


class _Skip(Exception):
    pass


# ------------------------------------------------------------------------------------------ measurement
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_bytes(call: Callable[[], None]) -> int:
    """Peak RSS during ``call()`` above the RSS just before it (see the module docstring)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    call()
    return (_rss_kib("VmHWM") - base) * 1024


def bench(methods: Dict[str, Callable], data: dict, tau: float, grad: bool, inputs, repeats: int, part: str) -> Dict[str, float]:
    """name -> median seconds (``part == "time"``) or peak extra bytes (``part == "memory"``)."""
    if part == "memory":
        return {name: peak_extra_bytes(lambda: _run(lambda: fn(data, tau), inputs, grad)) for name, fn in methods.items()}
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            _run(lambda: fn(data, tau), inputs, grad)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _warm_up() -> None:
    """Every method once on tiny inputs (lazy initialisation of kernels and thread pools out of the figures)."""
    z = torch.randn(8, 16, requires_grad=True)
    d = {"z": z, "y": torch.randint(0, 16, (8,)), "h": torch.randn(8, 4, requires_grad=True),
         "w": torch.randn(16, 4, requires_grad=True), "chunk": 3}
    for fn in METHODS_LOGITS.values():
        _run(lambda: fn(d, 0.9), (z,), True)
    for fn in list(METHODS_HIDDEN.values()) + list(METHODS_HIDDEN_BOTH.values()):
        _run(lambda: fn(d, 0.9), (d["h"], d["w"]), True)


def _table(title: str, rows: list) -> list:
    out = [title, f"{'N':>6} {'V':>7} {'pass':>4} {'method':>16} {'median s':>9} {'x naive':>8} {'peak MiB':>9} {'x naive':>8} {'working MiB':>12}"]
    out += rows
    return out


def _rows(n, v, mode, times, mems, grads_bytes):
    t0, m0 = times["naive"], mems["naive"]
    lines = []
    for name, t in times.items():
        m = mems[name]
        work = (m - grads_bytes) / MIB if mode.startswith("f+b") else m / MIB
        lines.append(f"{n:>6} {v:>7} {mode:>4} {name:>16} {t:>9.3f} {t / t0:>8.2f} {m / MIB:>9.1f} {m / max(m0, 1):>8.2f} {work:>12.1f}")
    return lines


def cases(small: bool):
    if small:
        return [(256, 512), (512, 512)], [(256, 1024, ("fwd", "f+b", "f+b+H"))], 64
    logit_cases = [(2048, 4096), (8192, 4096), (16384, 4096), (1024, 32000), (2048, 32000), (4096, 32000),
                   (512, 152064), (1024, 152064)]
    hidden_cases = [(2048, 4096, ("fwd", "f+b", "f+b+H")), (8192, 4096, ("f+b",)), (2048, 32000, ("fwd", "f+b", "f+b+H")),
                    (256, 152064, ("fwd", "f+b"))]
    return logit_cases, hidden_cases, 512


def measure(part: str, small: bool, repeats: int, tau: float) -> dict:
    """Every figure of one kind: {"A|n|v|mode": {method: value}, "B|n|v|mode": {...}}."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    notes = _optional_methods(with_trl=not small)
    _warm_up()
    logit_cases, hidden_cases, hdim = cases(small)
    out = {}
    for n, v in logit_cases:
        d = {"z": (torch.randn(n, v) * 3).requires_grad_(True), "y": torch.randint(0, v, (n,))}
        for grad, mode in ((False, "fwd"), (True, "f+b")):
            methods = dict(METHODS_LOGITS)
            if v > 4096 and not small:
                methods.pop("chunked-old")
            out[f"A|{n}|{v}|{mode}"] = bench(methods, d, tau, grad, (d["z"],), repeats, part)
            print(f"  {part} A {n} {v} {mode} done", file=sys.stderr, flush=True)
        del d
    for n, v, modes in hidden_cases:
        h = torch.randn(n, hdim).requires_grad_(True)
        w = (torch.randn(v, hdim) / hdim**0.5).requires_grad_(True)
        d = {"h": h, "w": w, "y": torch.randint(0, v, (n,)), "chunk": CHUNK_HIDDEN}
        for mode in modes:
            methods = METHODS_HIDDEN_BOTH if mode == "f+b+H" else METHODS_HIDDEN
            out[f"B|{n}|{v}|{mode}"] = bench(methods, d, tau, mode != "fwd", (h, w), repeats, part)
            print(f"  {part} B {n} {v} {mode} done", file=sys.stderr, flush=True)
        del h, w, d
    out["notes"] = notes
    return out


CHUNK_HIDDEN = 128  # token_logprobs_from_hidden's default


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--part", choices=["time", "memory"], help=argparse.SUPPRESS)  # internal: one subprocess
    args = ap.parse_args(argv)
    if args.part:
        print(json.dumps(measure(args.part, args.small, args.repeats, args.tau)))
        return
    base = [sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats), "--tau", str(args.tau)] + (["--small"] if args.small else [])
    load0, t_start = os.getloadavg(), time.perf_counter()
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    times = json.loads(subprocess.run(base + ["--part", "time"], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout)
    load_mid = os.getloadavg()
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    mems = json.loads(subprocess.run(base + ["--part", "memory"], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout)
    mems.pop("notes")
    load1 = os.getloadavg()
    logit_cases, hidden_cases, hdim = cases(args.small)
    lines = [
        f"torch {torch.__version__}, 1 thread, tau = {args.tau}, repeats = {args.repeats} (median), chunk 1024 rows from logits, "
        f"{CHUNK_HIDDEN} from hidden; CPU: {os.cpu_count()} cores shared with other processes",
        *times.pop("notes"),
        "peak MiB: peak RSS above the pre-call RSS (inputs excluded; gradients returned by the call included);",
        "working MiB: peak minus the returned gradients (f+b) -- what a method needs beyond its inputs and outputs "
        "(about 0 when the gradient is the only large allocation; small negatives are page-level noise).",
        "",
    ]
    rows = []
    for n, v in logit_cases:
        for mode in ("fwd", "f+b"):
            key = f"A|{n}|{v}|{mode}"
            rows += _rows(n, v, mode, times[key], mems[key], n * v * 4)
        rows.append(f"{'':>6} {'':>7} floor: logits N x V x 4 = {n * v * 4 / MIB:.1f} MiB (the gradient of f+b is as large); "
                    f"a 1024-row chunk {min(n, 1024) * v * 4 / MIB:.1f} MiB")
    lines += _table("A. logits given [N, V] float32 -> log pi(y) [N]", rows)
    lines.append("")
    rows = []
    for n, v, modes in hidden_cases:
        gbytes = (n * hdim + v * hdim) * 4
        for mode in modes:
            key = f"B|{n}|{v}|{mode}"
            rows += _rows(n, v, mode, times[key], mems[key], gbytes)
        rows.append(f"{'':>6} {'':>7} floor: logits {n * v * 4 / MIB:.1f} MiB (never made by fused); a {CHUNK_HIDDEN}-row chunk "
                    f"{min(n, CHUNK_HIDDEN) * v * 4 / MIB:.1f} MiB; returned grads dh + dW {gbytes / MIB:.1f} MiB")
    lines += _table(f"B. from hidden [N, H = {hdim}] and W [V, H] float32 -> log pi(y) [N], gradients to h and W "
                    "(f+b+H: log-probs and entropy)", rows)
    fmt = lambda x: tuple(round(a, 2) for a in x)
    lines += ["", f"load average (1, 5, 15 min): start {fmt(load0)}, after timing {fmt(load_mid)}, end {fmt(load1)}; "
              f"wall time {time.perf_counter() - t_start:.0f} s"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
