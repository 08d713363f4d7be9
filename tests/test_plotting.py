"""The plotting helpers: what ``series`` extracts, and that the figures draw exactly those points."""
import pytest

from grpo_ref.plotting import (
    DEFAULT_PANELS,
    available_metrics,
    compare_runs,
    first_crossing,
    head_mean,
    plot_run,
    series,
    tail_mean,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# A run as Trainer.history logs it: step 0 is the evaluation before training; evals every 2 steps.
RUN = [
    {"step": 0, "eval_accuracy": 0.2},
    {"step": 1, "samples": 8.0, "reward_mean": 0.3, "clip_frac_low": 0.01, "clip_frac_high": 0.02},
    {"step": 2, "samples": 8.0, "reward_mean": 0.4, "clip_frac_low": 0.03, "clip_frac_high": 0.0, "eval_accuracy": 0.5},
    {"step": 3, "samples": 16.0, "reward_mean": 0.6, "clip_frac_low": 0.0, "clip_frac_high": 0.05},
]


def test_series_picks_the_records_holding_the_metric():
    assert series(RUN, "eval_accuracy") == ([0, 2], [0.2, 0.5])
    assert series(RUN, "reward_mean") == ([1, 2, 3], [0.3, 0.4, 0.6])
    assert series(RUN, "missing") == ([], [])


def test_series_clip_frac_is_low_plus_high():
    xs, ys = series(RUN, "clip_frac")
    assert xs == [1, 2, 3]
    assert ys == pytest.approx([0.03, 0.03, 0.05])


def test_series_against_cumulative_samples():
    # DAPO refills make `samples` differ from step to step: the x axis must add them up, not count steps.
    assert series(RUN, "reward_mean", x="samples") == ([8.0, 16.0, 32.0], [0.3, 0.4, 0.6])
    assert series(RUN, "eval_accuracy", x="samples") == ([0.0, 16.0], [0.2, 0.5])


def test_plot_run_draws_the_present_metrics_and_saves(tmp_path):
    path = tmp_path / "run.png"
    fig = plot_run(RUN, str(path), title="t")
    try:
        assert path.stat().st_size > 0
        drawn = [ax for ax in fig.axes if ax.lines]
        assert len(drawn) == 3  # eval_accuracy, reward_mean, clip_frac; the other default panels are absent
        xs, ys = drawn[0].lines[0].get_data()
        assert list(xs) == [0, 2] and list(ys) == [0.2, 0.5]
        labels = dict(DEFAULT_PANELS)
        # each panel is titled with its metric at a readable size; the x axis is named under each column's lowest
        assert [ax.get_title() for ax in drawn] == [labels["eval_accuracy"], labels["reward_mean"], labels["clip_frac"]]
        assert all(ax.title.get_fontsize() >= 10 for ax in drawn)
        assert [bool(ax.get_xlabel()) for ax in drawn] == [False, True, True]
    finally:
        plt.close(fig)


def test_compare_runs_one_line_per_run():
    other = [dict(r, eval_accuracy=r["eval_accuracy"] / 2) if "eval_accuracy" in r else r for r in RUN]
    fig = compare_runs({"a": RUN, "b": other}, metric="eval_accuracy", x="samples")
    try:
        (ax,) = fig.axes
        assert [ln.get_label() for ln in ax.lines] == ["a", "b"]
        assert list(ax.lines[1].get_ydata()) == [0.1, 0.25]
        assert ax.get_xlabel() == "sampled completions"
    finally:
        plt.close(fig)


def test_plot_errors():
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_run([{"step": 1, "unknown": 1.0}])
    with pytest.raises(ValueError, match="no runs"):
        compare_runs({})


def test_compare_runs_refuses_a_metric_no_run_has_and_lists_the_available_ones():
    assert available_metrics({"a": RUN}) == ["clip_frac", "clip_frac_high", "clip_frac_low", "eval_accuracy", "reward_mean", "samples"]
    with pytest.raises(ValueError, match=r"no run has the metric 'nosuch'; available: clip_frac, .*reward_mean"):
        compare_runs({"a": RUN}, metric="nosuch")
    with pytest.raises(ValueError, match="x must be"):
        compare_runs({"a": RUN}, x="time")


def test_head_and_tail_means_average_the_records_holding_the_metric():
    # reward_mean is 0.3, 0.4, 0.6 at steps 1-3; step 0 (the evaluation) does not hold it
    assert head_mean(RUN, "reward_mean", 2) == pytest.approx(0.35)
    assert tail_mean(RUN, "reward_mean", 2) == pytest.approx(0.5)
    assert tail_mean(RUN, "reward_mean", 10) == pytest.approx(1.3 / 3)  # fewer records than n: all of them
    assert head_mean(RUN, "clip_frac", 1) == pytest.approx(0.03)  # low + high, as series gives it
    assert tail_mean(RUN, "eval_accuracy", 1) == 0.5


def test_first_crossing_reports_step_samples_and_wall_time_of_the_first_record_at_target():
    run = [dict(r, time_step_s=0.5) if r["step"] > 0 else r for r in RUN]
    # eval accuracy 0.2 at step 0, 0.5 at step 2: samples 8 + 8 and two RL steps of 0.5 s up to step 2
    assert first_crossing(run, 0.5) == {"step": 2, "samples": 16.0, "wall": 1.0}
    assert first_crossing(run, 0.2) == {"step": 0, "samples": 0.0, "wall": 0.0}
    assert first_crossing(run, 0.51) is None
    assert first_crossing(run, 0.45, key="reward_mean") == {"step": 3, "samples": 32.0, "wall": 1.5}


@pytest.mark.parametrize("call, match", [
    (lambda: tail_mean(RUN, "missing", 3), "tail_mean: no record has the metric 'missing'; available: clip_frac"),
    (lambda: head_mean(RUN, "reward_mean", 0), "head_mean: n must be a positive int, got 0"),
    (lambda: tail_mean(RUN, "reward_mean", 2.0), "tail_mean: n must be a positive int, got 2.0"),
    (lambda: first_crossing(RUN, float("nan")), "first_crossing: target must be a finite number, got nan"),
])
def test_run_figures_refuse_bad_input_by_name(call, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        call()
