"""The Train tab's "Compare methods" section: the same data and settings as Start, trained by
prefix tuning and the other methods one after another in the background; a progress line per
method and a Cancel button, then the table, the chart, the verdict in words and the files
to download (adapters, the prefix, the table). An optional test CSV (uploaded here) and the
form's shift CSV (Settings) add their columns; past comparisons are listed and shown again,
their methods ticked again (workbench/comparing.py). A generation comparison (the Data tab
chose a target column) offers only the methods that generate and reads BLEU beside the bare
model instead of macro-F1.

Handlers are plain functions (values in, values out); `build` only wires them.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from prefixlab.figures.comparison import comparison_figure
from prefixlab.runs.compare import DEFAULT_METHODS, METHODS
from prefixlab.runs.presets import SETTING_NAMES
from prefixlab.runs.verdict import COLUMNS, table_columns, table_rows
from prefixlab.ui.common import bind, escape, shown, wire
from prefixlab.workbench import Workbench
from prefixlab.workbench.comparing import SCORES, asked, comparison_task
from prefixlab.workbench.runs import run_config

POLL_SECONDS = 2.0
DEFAULT_CHOICE = ["prefix", "prompt", "lora", "probe", "tfidf"]
"""Ticked at first: full fine-tuning and IA3 are one tick away (full is the slowest)."""
OPTIONAL_COLUMNS = {"test": "test F1", "shift": "shift F1"}
"""Shown only when the comparison was given that CSV: an always-empty column is noise."""
LEFT_OUT = ("s total",)
"""In the CSV, not on the page: with every method, a full fine-tuning of 135M parameters and
both CSVs, the last column ran off the section's right edge at 1400 px."""
GENERATION_COLUMNS = ("method", "val BLEU", "val chrF", "val ROUGE-L", "test BLEU", "shift BLEU",
                      "trainable", "stored", "s to kept", "ex/s", "peak RSS", "kept step")
"""Three scores and the costs; the target loss and the share of the model are in the CSV
(with them, too, the last columns ran off the section's right edge at 1400 px)."""
GENERATION_OPTIONAL = {"test": "test BLEU", "shift": "shift BLEU"}
SCORE_TITLES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "bleu": "BLEU", "chrf": "chrF",
                "rouge_l": "ROUGE-L", "loss": "target loss"}
SHIFT_PLACE = "Settings, \"Generalizing to other topics\", Shift CSV"
"""Where the form's shift CSV is set (the Train tab's settings accordion)."""


def score_text(metric: str, value: float | None) -> str:
    """A score as the table reads it: 0-1 scores and losses to three places, 0-100 to one."""
    if value is None:
        return "-"
    return f"{value:.3f}" if metric in ("macro_f1", "accuracy", "loss") else f"{value:.1f}"


def offered_methods(state: dict | None) -> list[str]:
    """The methods this data can compare: a generation task (a target column) has no labels,
    so the probe and TF-IDF, which classify, are not offered."""
    generating = bool(state and state.get("target"))
    return [m for m in DEFAULT_METHODS if not (generating and METHODS[m].labels_only)]


def method_choices(state: dict | None, ticked: list[str] | None) -> dict:
    """The method boxes for the Data tab's data: those it can compare, the ticked ones kept
    (the first choice's where none of them is left)."""
    offered = offered_methods(state)
    value = ([m for m in ticked or [] if m in offered]
             or [m for m in DEFAULT_CHOICE if m in offered])
    return gr.update(choices=[(METHODS[m].title, m) for m in offered], value=value)


def inputs_note(state: dict | None, test_csv: str | None, shift_csv: str | None) -> str:
    """Which extra rows Compare will score each method's kept step on, in words, and where
    each file is set."""
    pairs = "inputs and targets" if state and state.get("target") else "texts and labels"
    lines = ["**What Compare scores besides the validation rows**"]
    if test_csv:
        lines.append(f"- test rows: **{escape(Path(test_csv).name)}** (uploaded here)")
    else:
        lines.append(f"- no test CSV: upload one here ({pairs} in the training file's "
                     "columns) to score each method once on rows that chose nothing")
    if shift_csv:
        lines.append(f"- shift rows: **{escape(Path(shift_csv).name)}** (the Shift CSV in "
                     f"{SHIFT_PLACE})")
    else:
        lines.append(f"- no shift CSV: set one in {SHIFT_PLACE}, to see how each method does "
                     "on rows from another source")
    return "\n".join(lines)


def _asked_line(status: dict) -> str:
    """The data and extra files the comparison shown was asked to read, with their rows."""
    a = asked(status)
    data = (status.get("result") or {}).get("data", {})
    rows = (f" ({data['train_rows']} training, {data['validation_rows']} validation rows)"
            if data.get("train_rows") else "")
    parts = [f"On **{escape(a['data'])}**{rows}" if a["data"] else "On the training data"]
    for what in ("test", "shift"):
        n = data.get(f"{what}_rows")
        if a[what]:
            parts.append(f"{what} rows: **{escape(a[what])}**" + (f" ({n} rows)" if n else ""))
        else:
            parts.append(f"{what} rows: {n}" if n else f"no {what} CSV")
    return " · ".join(parts)


def progress_lines(status: dict) -> str:
    """The headline, what was asked, and one line per method: waiting, training (step n of
    N), done (its validation score), failed, cancelled; once the comparison stopped early,
    "not run" for those it never reached."""
    lines = []
    over = status["state"] in ("cancelled", "interrupted")
    for name, p in status["methods"].items():
        state = p.get("state", "waiting")
        if over and state == "waiting":
            state = "not run"
        elif status["state"] == "interrupted" and state in ("training", "scoring"):
            state = "interrupted"
        detail = ""
        if state == "training" and p.get("step"):
            detail = f": step {p['step']} of {p['total_steps']}, {p['elapsed_s']:.0f} s"
        elif state == "done":
            detail = _done_detail(p)
        elif state == "failed":
            detail = f": {escape(p.get('error', ''))}"
        lines.append(f"- **{METHODS[name].title}**: {state}{detail}")
    return f"{_headline(status)}\n\n{_asked_line(status)}\n\n" + "\n".join(lines)


def _done_detail(event: dict) -> str:
    """A finished method's validation score from its "done" event: `metric` and `value`
    where it names them (a generation comparison), else its macro-F1."""
    metric, value = event.get("metric"), event.get("value")
    if metric is None and event.get("macro_f1") is not None:
        metric, value = "macro_f1", event["macro_f1"]
    if metric is None or value is None:
        return ""
    return f": validation {SCORE_TITLES.get(metric, escape(metric))} {score_text(metric, value)}"


def _held_out(result: dict) -> str:
    """The rows the chart and the headline read: test where given, else validation."""
    return "test" if _has(result, "test") else "validation"


def _has(result: dict, key: str) -> bool:
    """Whether the comparison scored `key` rows (test, shift)."""
    return bool(result["data"].get(f"{key}_rows")) or any(
        "error" not in r and r.get(key) for r in result["rows"])


def _headline(status: dict) -> str:
    state = status["state"]
    if state == "running":
        return ("Cancelling: the method training stops at its next step"
                if status.get("cancelling") else "Comparing")
    if state == "cancelled":
        result = status.get("result") or {}
        done = [r["title"] for r in result.get("rows", []) if "error" not in r]
        kept = ", ".join(done) if done else "no method"
        return (f"Comparison cancelled: {len(done)} of {len(status['methods'])} methods "
                f"finished ({kept}); the table shows only those")
    if state == "interrupted":
        return ("Comparison interrupted: the app stopped while it ran, so it wrote no "
                "result; start it again")
    if state == "failed":
        return f"Comparison failed: {escape(status.get('error', ''))}"
    result = status.get("result")
    return "Comparison finished" + (_best_words(result) if result else "")


def _best_words(result: dict) -> str:
    """The headline's end for a finished result, e.g. ": LoRA scored best (test BLEU 23.4;
    the bare model 5.1)"."""
    key, metric = _held_out(result), SCORES[comparison_task(result)][0]
    done = [r for r in result["rows"] if "error" not in r and r.get(key)]
    if not done:
        return ""
    best = max(done, key=lambda r: r[key][metric])
    words = (f": {escape(best['title'])} scored best ({key} {SCORE_TITLES[metric]} "
             f"{score_text(metric, best[key][metric])}")
    bare = (result.get("bare_model") or {}).get(key)
    if bare:
        words += f"; the bare model {score_text(metric, bare[metric])}"
    return words + ")"


def comparison_table(result: dict) -> pd.DataFrame:
    """The table's cells (runs.verdict's, as the CLI prints them) less the columns only the CSV
    holds, with the test and shift columns only where those CSVs were given; a generation
    comparison's scores are BLEU, chrF and ROUGE-L, with the bare model as the last row."""
    task = comparison_task(result)
    cells = table_rows(result["rows"], task, result.get("bare_model"))
    table = pd.DataFrame(cells, columns=list(table_columns(task)))
    shown_columns, optional = ((GENERATION_COLUMNS, GENERATION_OPTIONAL)
                               if task == "generation" else
                               ([c for c in COLUMNS if c not in LEFT_OUT], OPTIONAL_COLUMNS))
    absent = {col for key, col in optional.items() if not _has(result, key)}
    return table[[c for c in shown_columns if c not in absent]]


def comparison_outputs(workbench: Workbench, status: dict) -> list:
    """progress, table, chart, verdict, downloads, cancel button, timer for a status."""
    result = status.get("result")
    running = status["state"] == "running"
    cancel = gr.update(visible=running, interactive=not status.get("cancelling"))
    if result is None:
        return [progress_lines(status), gr.update(visible=False), gr.update(visible=False),
                "", gr.update(value=None, visible=False), cancel, gr.Timer(active=running)]
    key, metric = _held_out(result), SCORES[comparison_task(result)][0]
    bare = (result.get("bare_model") or {}).get(key)
    chart = comparison_figure(result["rows"], key, metric, SCORE_TITLES[metric],
                              bare[metric] if bare else None)
    verdict = "\n".join(f"- {escape(s)}" for s in result.get("verdict", []))
    files = [str(p) for p in workbench.comparison_downloads(status["id"])]
    return [progress_lines(status), gr.update(value=comparison_table(result), visible=True),
            shown(chart), f"**Verdict**\n\n{verdict}" if verdict else "",
            gr.update(value=files, visible=True), cancel, gr.Timer(active=running)]


def past_choices(workbench: Workbench, value: str | None = None) -> dict:
    """The past-comparisons list, newest first, keeping `value` picked."""
    ids = workbench.comparison_ids()
    return gr.update(choices=ids, value=value if value in ids else None)


def on_compare(workbench: Workbench, state: dict | None, methods: list[str], run_name: str,
               test_csv: str | None, shift_csv: str | None, *values) -> list:
    """Start a comparison of the ticked methods on the Data tab's CSV (a generation task
    where it chose a target column) and these settings, scored also on the optional test
    CSV and the form's shift CSV (the comparison keeps its own copies)."""
    if not state:
        raise gr.Error("Choose a CSV in the Data tab first (or the bundled example).")
    if not methods:
        raise gr.Error("Tick at least one method to compare.")
    cfg = run_config(state["path"], state.get("text"), state.get("label"),
                     dict(zip(SETTING_NAMES, values, strict=True)),
                     model=workbench.default_model, target_column=state.get("target"))
    cid = workbench.start_comparison(cfg, methods, name=run_name or state["name"],
                                     test_csv=test_csv, shift_csv=shift_csv,
                                     data_name=state["name"])
    return [cid, past_choices(workbench, cid),
            *comparison_outputs(workbench, workbench.comparison(cid))]


def on_cancel(workbench: Workbench, cid: str | None) -> list:
    """Ask the shown comparison to stop; the poll then shows what it finished."""
    if not cid:
        raise gr.Error("No comparison is shown.")
    workbench.cancel_comparison(cid)
    return comparison_outputs(workbench, workbench.comparison(cid))


def on_pick(workbench: Workbench, cid: str | None) -> list:
    """A past comparison picked: its table, chart and files again (followed if running)."""
    if not cid:
        return [None, "", gr.update(visible=False), gr.update(visible=False), "",
                gr.update(value=None, visible=False), gr.update(visible=False),
                gr.Timer(active=False)]
    return [cid, *comparison_outputs(workbench, workbench.comparison(cid))]


def restore_methods(workbench: Workbench, state: dict | None, cid: str | None) -> dict:
    """A past comparison picked: its methods ticked again, so Compare runs it again (those
    the Data tab's data cannot compare, e.g. the probe on a generation task, left out)."""
    if not cid:
        return gr.skip()
    offered = offered_methods(state)
    methods = workbench.comparison_asked(cid)["methods"]
    return gr.update(choices=[(METHODS[m].title, m) for m in offered],
                     value=[m for m in methods if m in offered])


def on_tick(workbench: Workbench, cid: str | None) -> list:
    if not cid:
        return ["", gr.skip(), gr.skip(), "", gr.skip(), gr.update(visible=False),
                gr.Timer(active=False)]
    return comparison_outputs(workbench, workbench.comparison(cid))


def build(workbench: Workbench, dataset: gr.State, name: gr.Textbox, settings: list,
          shift_csv: gr.File, notice) -> None:
    """The section, below Start: which methods, the optional test CSV and which extra files
    Compare reads (the shift CSV is the form's, in Settings), the buttons, what it shows,
    and the past comparisons."""
    with gr.Accordion("Compare methods on this data", open=False, elem_id="compare-section"):
        with gr.Row():
            methods = gr.CheckboxGroup(
                [(METHODS[m].title, m) for m in DEFAULT_METHODS], value=DEFAULT_CHOICE,
                label="Methods (each trains with the settings above, its own budget)",
                elem_id="compare-methods", scale=3)
            with gr.Column(min_width=160):
                compare = gr.Button("Compare methods", elem_id="compare", variant="primary")
                cancel = gr.Button("Cancel comparison", elem_id="compare-cancel",
                                   variant="stop", visible=False)
        with gr.Row():
            test_csv = gr.File(label="Test CSV (optional): scored once, by each kept step",
                               file_types=[".csv"], type="filepath", height=140,
                               elem_id="compare-test")
            note = gr.Markdown(inputs_note(None, None, None), elem_id="compare-inputs")
        past = gr.Dropdown(label="Past comparisons (newest first)",
                           choices=workbench.comparison_ids(), value=None,
                           elem_id="compare-past")
        progress = gr.Markdown(elem_id="compare-progress")
        table = gr.Dataframe(interactive=False, visible=False, elem_id="compare-table",
                             elem_classes=["readable-table"])
        chart = gr.Plot(show_label=False, visible=False, elem_id="compare-chart")
        verdict = gr.Markdown(elem_id="compare-verdict")
        downloads = gr.File(label="Downloads: the table, comparison.json, each kept adapter",
                            file_count="multiple", interactive=False, visible=False,
                            elem_id="compare-downloads")
    cid = gr.State(None)
    timer = gr.Timer(POLL_SECONDS, active=False)
    outputs = [progress, table, chart, verdict, downloads, cancel, timer]
    for trigger in (dataset.change, test_csv.change, shift_csv.change):
        wire(trigger, inputs_note, [dataset, test_csv, shift_csv], [note], notice,
             clears=False)
    wire(dataset.change, method_choices, [dataset, methods], [methods], notice, clears=False)
    wire(compare.click, bind(on_compare, workbench),
         [dataset, methods, name, test_csv, shift_csv, *settings], [cid, past, *outputs],
         notice)
    wire(cancel.click, bind(on_cancel, workbench), [cid], outputs, notice)
    # input, not change: the list updated by Compare must not re-trigger a pick
    wire(past.input, bind(on_pick, workbench), [past], [cid, *outputs], notice)
    wire(past.input, bind(restore_methods, workbench), [dataset, past], [methods], notice,
         clears=False)
    wire(past.focus, bind(past_choices, workbench), [past], [past], notice, clears=False)
    wire(timer.tick, bind(on_tick, workbench), [cid], outputs, notice, clears=False)
