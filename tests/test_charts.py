"""prefixlab.figures.charts: the training and evaluation figures read well in the states a user sees
them in (nothing yet, one evaluation, a finished report)."""

from __future__ import annotations

from prefixlab.figures import charts

STEPS = [{"type": "step", "step": s, "total_steps": 4, "loss": 7 - s / 4} for s in (1, 2, 3, 4)]
ONE_EVAL = [{"type": "eval", "step": 4, "val_loss": 6.9, "macro_f1": 0.33, "accuracy": 0.5}]


def _report(**baselines) -> dict:
    metrics = {"macro_f1": 0.8, "accuracy": 0.82}
    return {**metrics, "n": 8, "baselines": baselines,
            "confusion_matrix": {"labels": ["a", "b"], "matrix": [[4, 0], [1, 3]]}}


def test_nothing_yet_says_so_instead_of_empty_axes():
    for fig in (charts.loss_curves([]), charts.eval_curves(STEPS)):
        assert not fig.data and not fig.layout.xaxis.visible
        assert fig.layout.annotations and fig.layout.title.text
    assert "every half epoch" in charts.eval_curves(STEPS).layout.annotations[0].text


def test_one_evaluation_sits_on_a_step_axis_from_zero_with_its_values_written():
    fig = charts.eval_curves(STEPS + ONE_EVAL)
    assert fig.layout.xaxis.range[0] == 0 and fig.layout.xaxis.range[1] > 4
    assert fig.layout.xaxis.dtick == 1  # whole steps, no "1.5"
    assert list(fig.data[0].text) == ["0.33"] and fig.layout.yaxis.range == (0, 1.02)


def test_legends_sit_below_the_axis_title_in_pixels():
    fig = charts.loss_curves(STEPS + ONE_EVAL)
    assert fig.layout.legend.yref == "container" and fig.layout.legend.y < 0.1
    assert fig.layout.margin.b >= 90 and fig.layout.title.text == "Loss"
    assert [t.name for t in fig.data] == ["train loss", "train loss (smoothed)",
                                          "validation loss"]


def test_baseline_bars_are_horizontal_and_name_every_baseline():
    zero = {"macro_f1": 0.4, "accuracy": 0.5}
    fig = charts.baseline_bars(_report(zero_shot=zero, majority=zero, tfidf=None))
    assert all(t.orientation == "h" for t in fig.data)
    assert list(fig.data[0].y) == ["prefix", "majority class (always the most frequent label)",
                                   "zero-shot (same model, no prefix)"]
    assert fig.layout.yaxis.autorange == "reversed"  # the prefix on top
