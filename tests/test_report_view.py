"""The report a user sees says when a prefix fails: the majority class beside the other
baselines, the kept step and why training ended, and the warnings."""

from __future__ import annotations

from prefixlab.figures import charts
from prefixlab.runs.evaluate import classification_report, majority_baseline, prediction_warnings


def _report() -> dict:
    gold = ["offensive"] * 16 + ["neither"] * 3 + ["hate"] * 1
    report = classification_report(gold, ["offensive"] * 20, ["hate", "neither", "offensive"])
    majority = classification_report(gold, majority_baseline(gold, 20),
                                     ["hate", "neither", "offensive"])
    report.update(baselines={"zero_shot": majority, "tfidf": None, "majority": majority},
                  warnings=prediction_warnings(report), kept_step=30, steps=70,
                  selection="the step with the best validation macro_f1",
                  stop_reason="no improvement of validation macro_f1 in 4 evaluations")
    return report


def test_baseline_bars_show_the_majority_class():
    fig = charts.baseline_bars(_report())
    assert list(fig.data[0].y) == ["prefix", "majority class (always the most frequent label)",
                                   "zero-shot (same model, no prefix)"]


def test_train_tab_report_shows_majority_kept_step_and_warnings():
    from prefixlab.ui.train_tab import report_outputs

    markdown = report_outputs(_report())[0]
    assert "| majority class (always the most frequent label) | 0.296 | 0.800 |" in markdown
    assert "Kept the prefix of step 30 of 70" in markdown
    # the warning stands above the numbers, where it is read first
    assert "> ⚠️ **the prefix predicts 'offensive' for 100% of the 20 rows" in markdown
    assert markdown.index("⚠️") < markdown.index("| **prefix** |")
    assert "never predicts 'neither'" in markdown


def test_live_view_shows_the_predicted_labels_and_warnings_of_the_last_evaluation():
    from prefixlab.ui.train_tab import progress_html

    records = [
        {"type": "step", "step": 20, "total_steps": 80, "epoch": 1.0, "examples_per_s": 3.0,
         "loss": 0.5, "eta_s": 60},
        {"type": "eval", "step": 20, "macro_f1": 0.3, "predicted": {"hate": 0, "neither": 60},
         "best_step": 10, "warnings": ["the prefix never predicts 'hate', which is 8% ..."]},
    ]
    html = progress_html(records, "running")
    assert "predicted hate 0, neither 60" in html and "kept so far: step 10" in html
    assert "<b>Warning:</b> the prefix never predicts 'hate'" in html
    assert progress_html(records[:1], "running").count("<div>") == 1
