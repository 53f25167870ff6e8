"""Data tab: upload a CSV (or take the bundled example), preview it, choose the columns,
see the label distribution and every problem as a readable message."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from prefixlab import charts
from prefixlab.data import DataError
from prefixlab.ui.common import bullet_list, escape, guard
from prefixlab.workbench import EXAMPLE_CSV, Workbench


def describe(workbench: Workbench, path: str, text: str | None, label: str | None):
    """Validate the chosen columns: a summary, warnings, and the label chart."""
    try:
        data = workbench.check_columns(path, text, label)
    except DataError as e:
        return f"**This file cannot be used yet:**\n\n{bullet_list(e.problems)}", None
    counts = data.label_counts()
    lines = [f"**{len(data)} usable rows**, {len(counts)} labels: "
             + ", ".join(f"{escape(k)} ({v})" for k, v in counts.items())]
    if data.warnings:
        lines.append("**Warnings:**\n\n" + bullet_list(data.warnings))
    return "\n\n".join(lines), charts.label_distribution(counts)


def build(workbench: Workbench, dataset: gr.State) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Labeled CSV (any column names; labels as text)",
                             file_types=[".csv", ".tsv", ".txt"], elem_id="csv")
            example = gr.Button("Use the bundled example (customer feedback, 3 labels)",
                                elem_id="use-example", size="sm")
        with gr.Column(scale=3):
            message = gr.Markdown(elem_id="data-msg")
    with gr.Row():
        text_col = gr.Dropdown(label="Text column", choices=[], elem_id="text-col")
        label_col = gr.Dropdown(label="Label column", choices=[], elem_id="label-col")
    with gr.Row():
        preview = gr.Dataframe(label="Preview (first 20 rows)", interactive=False, wrap=True,
                               max_height=360, elem_id="preview")
        chart = gr.Plot(label="Label distribution", elem_id="label-chart")

    @guard
    def load(path: str | None, name: str | None = None):
        if not path:
            return (None, "", gr.update(choices=[], value=None),
                    gr.update(choices=[], value=None), None, None)
        try:
            info = workbench.preview_csv(path)
        except DataError as e:
            return (None, f"**This file cannot be used:**\n\n{bullet_list(e.problems)}",
                    gr.update(choices=[], value=None), gr.update(choices=[], value=None),
                    None, None)
        summary, fig = describe(workbench, path, info.text_column, info.label_column)
        state = {"path": path, "name": name or Path(path).name}
        return (state, summary, gr.update(choices=info.columns, value=info.text_column),
                gr.update(choices=info.columns, value=info.label_column), info.frame, fig)

    outputs = [dataset, message, text_col, label_col, preview, chart]
    upload.upload(lambda f: load(f, Path(f).name if f else None), inputs=upload,
                  outputs=outputs)
    upload.clear(lambda: load(None), outputs=outputs)
    example.click(lambda: load(str(EXAMPLE_CSV), EXAMPLE_CSV.name), outputs=outputs)

    @guard
    def columns_changed(state, text, label):
        if not state:
            return "", None
        if text and text == label:
            return "**The text and label columns must differ.**", None
        return describe(workbench, state["path"], text, label)

    for dd in (text_col, label_col):
        dd.input(columns_changed, inputs=[dataset, text_col, label_col],
                 outputs=[message, chart])
    # The Train tab reads the columns from the dataset state:
    for dd in (text_col, label_col):
        dd.change(lambda s, t, lab: {**s, "text": t, "label": lab} if s else s,
                  inputs=[dataset, text_col, label_col], outputs=dataset)
