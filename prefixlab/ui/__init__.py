"""The Gradio app, one module per tab; every handler calls the core through a Workbench."""

from __future__ import annotations

import gradio as gr

from prefixlab.workbench import Workbench

CSS = """
#progress .bar {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden}
#progress .fill {height: 100%; background: #2563eb}
.caveat {font-size: 0.9em; color: #555}
"""


def build_ui(workbench: Workbench) -> gr.Blocks:
    from prefixlab.ui import data_tab, inspect_tab, playground_tab, runs_tab, train_tab

    hooks = []
    with gr.Blocks(title="PrefixLab") as demo:
        gr.Markdown("# PrefixLab\nPrefix tuning of a frozen language model: upload a labeled "
                    "CSV, train a small prefix, try it, look inside it.")
        model_status = gr.Markdown(elem_id="model-status")
        dataset = gr.State(None)  # this browser's chosen CSV: {"path", "name", "text", "label"}
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data_tab.build(workbench, dataset)
            with gr.Tab("Train", id="train"):
                hooks += train_tab.build(workbench, dataset)
            with gr.Tab("Runs", id="runs"):
                hooks += runs_tab.build(workbench)
            with gr.Tab("Playground", id="playground"):
                hooks += playground_tab.build(workbench)
            with gr.Tab("Inspect", id="inspect"):
                hooks += inspect_tab.build(workbench)
        demo.load(lambda: f"Model: {workbench.model_status}", outputs=model_status)
        for hook in hooks:
            demo.load(hook.fn, inputs=hook.inputs, outputs=hook.outputs)
    return demo
