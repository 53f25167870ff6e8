"""The Gradio app, one module per tab; every handler calls the core through a Workbench.

Each tab module holds its handlers as module-level functions (the workbench and the event's
values in, the outputs' values out), tested without a page; its build() lays out components
and wires them to those handlers. What belongs to one browser lives in gr.State.

Imports `workbench`, `serve` (who may connect), `runs` (settings, states, errors) and
`figures` (charts of the data and of training); never `engine`, `interpret` or `data`.
"""

from __future__ import annotations

import gradio as gr

from prefixlab.ui.common import bind, wire
from prefixlab.workbench import Workbench

CSS = """
#progress .bar {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden}
#progress .fill {height: 100%; background: #2563eb}
.caveat {font-size: 0.9em; color: #555}
.offstage {position: absolute !important; left: -10000px !important; width: 600px !important}
/* The page's one error line: stays in view while scrolling, empty when all is well. */
#notice {position: sticky; top: 0; z-index: 50}
#notice .notice-error {background: #fef2f2; border: 1px solid #fca5a5; color: #991b1b;
    border-radius: 6px; padding: 8px 12px; font-weight: 500}
/* Table headers wrap between words only; cells never break a word in two. The header's
   own text element carries Gradio's break-word: "p(abbreviation)" broke as "p(abbre viation )". */
.readable-table th, .readable-table td, #runs-table th, #preview th,
.readable-table th .header, #runs-table th .header, #preview th .header {word-break: normal;
    overflow-wrap: normal; hyphens: none}
.readable-table th:first-child, .readable-table td:first-child {min-width: 4.5em}
/* Generated texts wrap, even a run of characters without a space (a bare model's output). */
#gen2-results td .cell-wrap {overflow-wrap: anywhere}
/* Where a long action's progress shows: an empty box has no height, and its bar and words
   (rows done, time so far, time left) would be drawn in none. */
.progress-host:has(> [data-testid="status-tracker"]:not(.hide)) {min-height: 5.5em}
/* A box's label leaves room for the buttons in its top right corner (a file's Clear). */
.block label[data-testid="block-label"] {max-width: calc(100% - 44px)}
"""


def model_line(workbench: Workbench) -> str:
    """The page's status line about the default model: loading, ready, or why not."""
    return f"Model: {workbench.model_status}"


def build_ui(workbench: Workbench) -> gr.Blocks:
    from prefixlab.ui import api, data_tab, inspect_tab, playground_tab, runs_tab, train_tab

    hooks = []
    with gr.Blocks(title="PrefixLab") as demo:
        gr.Markdown("# PrefixLab\nPrefix tuning of a frozen language model: upload a labeled "
                    "CSV, train a small prefix, try it, look inside it.")
        model_status = gr.Markdown(elem_id="model-status")
        notice = gr.HTML("", elem_id="notice")
        dataset = gr.State(None)  # this browser's chosen CSV: {"path", "name", "text", "label"}
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                hooks += data_tab.build(workbench, dataset, notice)
            with gr.Tab("Train", id="train") as train:
                hooks += train_tab.build(workbench, dataset, notice, shown_on=train.select)
            with gr.Tab("Runs", id="runs"):
                hooks += runs_tab.build(workbench, notice)
            with gr.Tab("Playground", id="playground"):
                hooks += playground_tab.build(workbench, notice)
            with gr.Tab("Inspect", id="inspect"):
                hooks += inspect_tab.build(workbench, notice)
        demo.load(bind(model_line, workbench), outputs=model_status, api_visibility="private")
        for hook in hooks:
            wire(demo.load, hook.fn, hook.inputs, hook.outputs, notice, clears=False)
        api.register(workbench)
    api.hide_internal_handlers(demo)  # the API lists what README documents, nothing else
    return demo
