"""The Train tab's "Compare methods" section: the same data and settings as Start, trained by
prefix tuning and the other methods one after another in the background; a progress line per
method and a Cancel button, then the table, the chart, the verdict in words and the files
to download (adapters, the prefix, the table). Optional test and shift CSVs add their
columns; past comparisons are listed and shown again (workbench/comparing.py).

Handlers are plain functions (values in, values out); `build` only wires them.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from prefixlab.figures.comparison import comparison_figure
from prefixlab.runs.compare import DEFAULT_METHODS, METHODS
from prefixlab.runs.presets import SETTING_NAMES
from prefixlab.runs.verdict import COLUMNS, table_rows
from prefixlab.ui.common import bind, escape, shown, wire
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config

POLL_SECONDS = 2.0
DEFAULT_CHOICE = ["prefix", "prompt", "lora", "probe", "tfidf"]
"""Ticked at first: full fine-tuning and IA3 are one tick away (full is the slowest)."""
OPTIONAL_COLUMNS = {"test": "test F1", "shift": "shift F1"}
"""Shown only when the comparison was given that CSV: an always-empty column is noise."""


def progress_lines(status: dict) -> str:
    """One line per method: waiting, training (step n of N), done (its F1), failed,
    cancelled; once the comparison stopped early, "not run" for those it never reached."""
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
            detail = f": validation macro-F1 {p['macro_f1']:.3f}"
        elif state == "failed":
            detail = f": {escape(p.get('error', ''))}"
        lines.append(f"- **{METHODS[name].title}**: {state}{detail}")
    return f"{_headline(status)}\n\n" + "\n".join(lines)


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
    return "Comparison finished"


def comparison_table(result: dict) -> pd.DataFrame:
    """The table's cells, with the test and shift columns only where those CSVs were given."""
    table = pd.DataFrame(table_rows(result["rows"]), columns=list(COLUMNS))
    absent = [col for key, col in OPTIONAL_COLUMNS.items()
              if not result["data"].get(f"{key}_rows")]
    return table.drop(columns=absent)


def comparison_outputs(workbench: Workbench, status: dict) -> list:
    """progress, table, chart, verdict, downloads, cancel button, timer for a status."""
    result = status.get("result")
    running = status["state"] == "running"
    cancel = gr.update(visible=running, interactive=not status.get("cancelling"))
    if result is None:
        return [progress_lines(status), gr.update(visible=False), gr.update(visible=False),
                "", gr.update(value=None, visible=False), cancel, gr.Timer(active=running)]
    key = "test" if result["data"].get("test_rows") else "validation"
    verdict = "\n".join(f"- {escape(s)}" for s in result["verdict"])
    files = [str(p) for p in workbench.comparison_downloads(status["id"])]
    return [progress_lines(status), gr.update(value=comparison_table(result), visible=True),
            shown(comparison_figure(result["rows"], key)), f"**Verdict**\n\n{verdict}",
            gr.update(value=files, visible=True), cancel, gr.Timer(active=running)]


def past_choices(workbench: Workbench, value: str | None = None) -> dict:
    """The past-comparisons list, newest first, keeping `value` picked."""
    ids = workbench.comparison_ids()
    return gr.update(choices=ids, value=value if value in ids else None)


def on_compare(workbench: Workbench, state: dict | None, methods: list[str], run_name: str,
               test_csv: str | None, shift_csv: str | None, *values) -> list:
    """Start a comparison of the ticked methods on the Data tab's CSV and these settings,
    scored also on the optional test and shift CSVs."""
    if not state:
        raise gr.Error("Choose a CSV in the Data tab first (or the bundled example).")
    if state.get("target"):
        raise gr.Error("Comparing methods needs a label column; this data set generates text.")
    cfg = run_config(state["path"], state.get("text"), state.get("label"),
                     dict(zip(SETTING_NAMES, values, strict=True)),
                     model=workbench.default_model)
    cid = workbench.start_comparison(cfg, methods, name=run_name or state["name"],
                                     test_csv=test_csv, shift_csv=shift_csv)
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


def on_tick(workbench: Workbench, cid: str | None) -> list:
    if not cid:
        return ["", gr.skip(), gr.skip(), "", gr.skip(), gr.update(visible=False),
                gr.Timer(active=False)]
    return comparison_outputs(workbench, workbench.comparison(cid))


def build(workbench: Workbench, dataset: gr.State, name: gr.Textbox, settings: list,
          notice) -> None:
    """The section, below Start: which methods, optional CSVs, the buttons, what it shows,
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
                               file_types=[".csv"], type="filepath",
                               elem_id="compare-test")
            shift_csv = gr.File(label="Shift CSV (optional): same labels, another source",
                                file_types=[".csv"], type="filepath",
                                elem_id="compare-shift")
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
    wire(compare.click, bind(on_compare, workbench),
         [dataset, methods, name, test_csv, shift_csv, *settings], [cid, past, *outputs],
         notice)
    wire(cancel.click, bind(on_cancel, workbench), [cid], outputs, notice)
    # input, not change: the list updated by Compare must not re-trigger a pick
    wire(past.input, bind(on_pick, workbench), [past], [cid, *outputs], notice)
    wire(past.focus, bind(past_choices, workbench), [past], [past], notice, clears=False)
    wire(timer.tick, bind(on_tick, workbench), [cid], outputs, notice, clears=False)
