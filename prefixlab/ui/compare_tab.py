"""The Train tab's "Compare methods" section: the same data and settings as Start, trained by
prefix tuning and the other methods one after another in the background; a progress line per
method, then the table, the chart and the verdict in words (runs/compare.py).

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


def progress_lines(status: dict) -> str:
    """One line per method: waiting, training (step n of N), done (its F1), failed."""
    lines = []
    for name, p in status["methods"].items():
        state = p.get("state", "waiting")
        detail = ""
        if state == "training" and p.get("step"):
            detail = f": step {p['step']} of {p['total_steps']}, {p['elapsed_s']:.0f} s"
        elif state == "done":
            detail = f": validation macro-F1 {p['macro_f1']:.3f}"
        elif state == "failed":
            detail = f": {escape(p.get('error', ''))}"
        lines.append(f"- **{METHODS[name].title}**: {state}{detail}")
    head = {"running": "Comparing", "completed": "Comparison finished",
            "failed": f"Comparison failed: {escape(status.get('error', ''))}"}[status["state"]]
    return f"{head}\n\n" + "\n".join(lines)


def comparison_outputs(status: dict) -> list:
    """progress, table, chart, verdict, timer for a comparison's status."""
    result = status.get("result")
    running = status["state"] == "running"
    if result is None:
        return [progress_lines(status), gr.update(visible=False), gr.update(visible=False),
                "", gr.Timer(active=running)]
    table = pd.DataFrame(table_rows(result["rows"]), columns=list(COLUMNS))
    key = "test" if result["data"].get("test_rows") else "validation"
    verdict = "\n".join(f"- {escape(s)}" for s in result["verdict"])
    return [progress_lines(status), gr.update(value=table, visible=True),
            shown(comparison_figure(result["rows"], key)), f"**Verdict**\n\n{verdict}",
            gr.Timer(active=running)]


def on_compare(workbench: Workbench, state: dict | None, methods: list[str], run_name: str,
               *values) -> list:
    """Start a comparison of the ticked methods on the Data tab's CSV and these settings."""
    if not state:
        raise gr.Error("Choose a CSV in the Data tab first (or the bundled example).")
    if state.get("target"):
        raise gr.Error("Comparing methods needs a label column; this data set generates text.")
    cfg = run_config(state["path"], state.get("text"), state.get("label"),
                     dict(zip(SETTING_NAMES, values, strict=True)),
                     model=workbench.default_model)
    cid = workbench.start_comparison(cfg, methods, name=run_name or state["name"])
    return [cid, *comparison_outputs(workbench.comparison(cid))]


def on_tick(workbench: Workbench, cid: str | None) -> list:
    if not cid:
        return ["", gr.skip(), gr.skip(), "", gr.Timer(active=False)]
    return comparison_outputs(workbench.comparison(cid))


def build(workbench: Workbench, dataset: gr.State, name: gr.Textbox, settings: list,
          notice) -> None:
    """The section, below Start: which methods, the button, and what it shows."""
    with gr.Accordion("Compare methods on this data", open=False, elem_id="compare-section"):
        with gr.Row():
            methods = gr.CheckboxGroup(
                [(METHODS[m].title, m) for m in DEFAULT_METHODS], value=DEFAULT_CHOICE,
                label="Methods (each trains with the settings above, its own budget)",
                elem_id="compare-methods", scale=3)
            compare = gr.Button("Compare methods", elem_id="compare")
        progress = gr.Markdown(elem_id="compare-progress")
        table = gr.Dataframe(interactive=False, visible=False, elem_id="compare-table",
                             elem_classes=["readable-table"])
        chart = gr.Plot(show_label=False, visible=False, elem_id="compare-chart")
        verdict = gr.Markdown(elem_id="compare-verdict")
    cid = gr.State(None)
    timer = gr.Timer(POLL_SECONDS, active=False)
    outputs = [progress, table, chart, verdict, timer]
    wire(compare.click, bind(on_compare, workbench), [dataset, methods, name, *settings],
         [cid, *outputs], notice)
    wire(timer.tick, bind(on_tick, workbench), [cid], outputs, notice, clears=False)
