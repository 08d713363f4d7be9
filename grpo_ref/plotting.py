"""Plots of training metrics: one run's dashboard, and several runs compared on one metric; and the few
figures a table of runs quotes (:func:`head_mean`, :func:`tail_mean`, :func:`first_crossing`), computed from the
same :func:`series` the plots draw.

matplotlib is imported inside the functions, so ``import grpo_ref`` never needs it.
Runs are lists of metric dicts (``Trainer.history`` or :func:`grpo_ref.metrics_log.load_metrics`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

Run = List[Dict[str, float]]

#: The ``(metric, y-axis label)`` pairs of :func:`plot_run`'s default dashboard, one panel each, in this order.
DEFAULT_PANELS: Tuple[Tuple[str, str], ...] = (
    ("eval_accuracy", "eval accuracy (greedy)"),
    ("reward_mean", "mean reward of samples"),
    ("kl_to_ref", "KL(pi_old || pi_ref) per token"),
    ("entropy", "entropy per token (nats)"),
    ("clip_frac", "clipped fraction of tokens"),
    ("response_length", "response length (tokens)"),
    ("grad_norm", "grad norm (before clipping)"),
    ("vf_loss", "value loss (PPO)"),
)


def _pyplot(path: Optional[str]):
    """``matplotlib.pyplot``, switched to the file-only Agg backend when the figure goes to a file (unless a
    backend was already chosen, e.g. in a notebook)."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Optional[str]):
    """Tight layout, saved to ``path`` if given; returns ``fig``."""
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


#: The x axes of :func:`series`, in this order the training step, the cumulative sampled completions and the
#: cumulative wall-clock seconds of the RL steps (the sum of their ``time_step_s``; the warm start is not counted).
X_AXES = ("step", "samples", "wall")
X_LABELS = {"step": "training step", "samples": "sampled completions", "wall": "wall-clock time of the RL steps (s)"}


def series(run: Run, key: str, x: str = "step") -> Tuple[List[float], List[float]]:
    """``(xs, ys)`` of the records holding ``key``; ``clip_frac`` is ``clip_frac_low + clip_frac_high``.
    ``x="samples"`` gives the cumulative number of sampled completions, ``x="wall"`` the cumulative
    ``time_step_s`` (seconds; a record without it, such as the evaluation at step 0, adds nothing)."""
    xs: List[float] = []
    ys: List[float] = []
    total = 0.0
    wall = 0.0
    for rec in run:
        total += rec.get("samples", 0.0)
        wall += rec.get("time_step_s", 0.0)
        value = rec.get(key)
        if key == "clip_frac" and "clip_frac_low" in rec:
            value = rec["clip_frac_low"] + rec.get("clip_frac_high", 0.0)
        if value is None:
            continue
        xs.append(total if x == "samples" else wall if x == "wall" else rec.get(x, len(xs)))
        ys.append(value)
    return xs, ys


def _window(run: Run, key: str, n: int, caller: str) -> List[float]:
    """The values of ``key`` (``series``), checked: ``n`` a positive int, at least one record holding ``key``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{caller}: n must be a positive int, got {n!r}")
    ys = series(run, key)[1]
    if not ys:
        raise ValueError(f"{caller}: no record has the metric {key!r}; available: "
                         f"{', '.join(available_metrics({'run': run})) or 'none'}")
    return ys


def head_mean(run: Run, key: str, n: int) -> float:
    """Mean of ``key`` over the first ``n`` records that hold it (all of them if fewer): where a run starts,
    averaged over steps because per-step metrics are noisy. ``ValueError`` if ``n < 1`` or no record holds
    ``key``."""
    ys = _window(run, key, n, "head_mean")[:n]
    return sum(ys) / len(ys)


def tail_mean(run: Run, key: str, n: int) -> float:
    """Mean of ``key`` over the last ``n`` records that hold it (all of them if fewer): where a run ends.
    ``ValueError`` if ``n < 1`` or no record holds ``key``."""
    ys = _window(run, key, n, "tail_mean")[-n:]
    return sum(ys) / len(ys)


def first_crossing(run: Run, target: float, key: str = "eval_accuracy") -> Optional[Dict[str, float]]:
    """The first record with ``key >= target``, as ``{"step", "samples", "wall"}``: its step, and the
    completions sampled and wall-clock seconds of RL steps up to and including it (the x axes of
    :func:`series`); None if no record reaches ``target``. ``ValueError`` for a non-finite ``target``."""
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target):
        raise ValueError(f"first_crossing: target must be a finite number, got {target!r}")
    axes = {x: series(run, key, x) for x in X_AXES}
    for i, y in enumerate(axes["step"][1]):
        if y >= target:
            return {x: axes[x][0][i] for x in X_AXES}
    return None


def available_metrics(runs: Dict[str, Run]) -> List[str]:
    """The metrics :func:`series` can draw from ``runs`` (numeric keys, ``clip_frac`` if its parts are there)."""
    keys = {k for run in runs.values() for rec in run for k, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    if "clip_frac_low" in keys:
        keys.add("clip_frac")
    return sorted(keys)


def plot_run(run: Run, path: Optional[str] = None, title: str = "", panels: Sequence[Tuple[str, str]] = DEFAULT_PANELS,
             x: str = "step"):
    """A grid of the ``panels`` metrics against ``x`` (one of :data:`X_AXES`; the training step by default;
    metrics the run lacks are skipped). Saves to ``path`` if given; returns the matplotlib figure."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    plt = _pyplot(path)
    present = [(k, label) for k, label in panels if series(run, k)[0]]
    if not present:
        raise ValueError("the run has none of the metrics to plot")
    # two columns, 7.2 in wide: drawn for a page's text column (and a phone), so labels are not shrunk to a few pixels
    cols = min(2, len(present))
    rows = (len(present) + cols - 1) // cols
    # each panel titled with its metric at the body's size (a y label would have to be small to fit); the x axis is
    # labelled under the lowest panel of each column only
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.3 * rows), squeeze=False)
    for i, (ax, (key, label)) in enumerate(zip(axes.flat, present, strict=False)):
        xs, ys = series(run, key, x)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(label, fontsize=10)
        if i + cols >= len(present):
            ax.set_xlabel(X_LABELS[x])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def compare_runs(
    runs: Dict[str, Run], metric: str = "eval_accuracy", x: str = "step", path: Optional[str] = None, title: str = ""
):
    """One line per run (``{label: run}``) of ``metric`` against ``x`` (``"step"``, ``"samples"`` or ``"wall"``).
    Saves to ``path`` if given; returns the figure. ``ValueError`` (listing the available metrics) if no run
    has ``metric``."""
    if not runs:
        raise ValueError("no runs to compare")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    if not any(series(run, metric, x)[0] for run in runs.values()):
        raise ValueError(f"no run has the metric {metric!r}; available: {', '.join(available_metrics(runs)) or 'none'}")
    plt = _pyplot(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        xs, ys = series(run, metric, x)
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(dict(DEFAULT_PANELS).get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _finish(fig, path)
