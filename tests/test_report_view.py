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
    from prefixlab.ui.run_view import report_outputs

    markdown = report_outputs(_report())[0]
    assert "| majority class (always the most frequent label) | 0.296 | 0.800 |" in markdown
    assert "Kept the prefix of step 30 of 70" in markdown
    # the warning stands above the numbers, where it is read first
    assert "> ⚠️ **the prefix predicts 'offensive' for 100% of the 20 rows" in markdown
    assert markdown.index("⚠️") < markdown.index("| **prefix** |")
    assert "never predicts 'neither'" in markdown


def test_live_view_shows_the_predicted_labels_and_warnings_of_the_last_evaluation():
    from prefixlab.ui.run_view import progress_html

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


def test_the_progress_line_follows_the_final_report_with_rows_and_an_estimate():
    """The final decoding of a generation run took 4 of its 6 minutes with nothing shown."""
    from prefixlab.ui.run_view import progress_html

    records = [
        {"type": "step", "step": 164, "total_steps": 164, "epoch": 3.2, "examples_per_s": 3.0,
         "loss": 1.25, "eta_s": 0.0},
        {"type": "eval", "step": 164, "val_loss": 1.4, "bleu": 20.0},
        {"type": "progress", "phase": "final report", "what": "decoding held-out inputs",
         "done": 32, "total": 80, "elapsed_s": 41.2, "eta_s": 61.8},
    ]
    phase = "final report: decoding held-out inputs 32/80"
    html = progress_html(records, "running", phase)
    assert "final report: decoding held-out inputs 32/80 · 41 s · about 62 s left" in html
    assert "width:40.0%" in html and "training ended at step 164/164" in html
    # a run trained longer: the old report's progress is past, training is shown again
    again = [*records, {**records[0], "step": 170, "total_steps": 300, "eta_s": 90.0}]
    html = progress_html(again, "running", "training")
    assert "step 170/300" in html and "at most 90 s of training left" in html
    assert "decoding" not in html
    assert "decoding" not in progress_html(records, "completed")  # over: the last step


def test_a_report_cut_by_the_time_budget_says_what_its_scores_read():
    from prefixlab.cli.output import results_header
    from prefixlab.ui.run_view import report_outputs

    bare = {"bleu": 1.0, "rouge_l": 2.0, "chrf": 3.0, "loss": 4.0, "n": 12}
    report = {"task": "generation", "n": 12, "rows": 120, "bleu": 10.0, "rouge_l": 20.0,
              "chrf": 30.0, "loss": 1.5, "baselines": {"bare_model": bare}, "samples": [],
              "decoded": {"inputs": 12, "of": 40, "why": "time budget"}}
    markdown = report_outputs(report)[0]
    assert ("The scores read the first 12 of 40 held-out inputs: the run's time budget ran "
            "out while decoding (the target loss reads all 120 references).") in markdown
    assert results_header(report).startswith("held-out results on the first 12 of 40 distinct")
