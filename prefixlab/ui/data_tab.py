"""Data tab: upload a CSV (or take the bundled example), preview it, choose the columns,
see the label distribution and every problem as a readable message. The chosen file is kept
in the data directory and remembered by the browser, so a reload does not lose it. Choosing a
target column (texts to generate) instead of a label column makes the data a generation task;
it is guessed when the column beside the text holds long, mostly unique texts."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from prefixlab.figures import charts
from prefixlab.ui.common import LoadHook, bind, bullet_list, escape, shown, wire
from prefixlab.workbench import Workbench
from prefixlab.workbench.datasets import EXAMPLE_CSV

PREVIEW_CHARS = 320  # a preview cell longer than this is cut (an E2E input is ~200 characters)
NO_TARGET = "(none: classify with the label column)"


def _target(value: str | None) -> str | None:
    return None if value in (None, "", NO_TARGET) else value


def describe(workbench: Workbench, path: str, text: str | None, label: str | None,
             target: str | None = None):
    """Validate the chosen columns: a summary, warnings, and the label chart (no chart for a
    generation task: a target column instead of labels)."""
    check = workbench.check_choice(path, text, label, target)
    if check.problems:
        return f"**This file cannot be used yet:**\n\n{bullet_list(check.problems)}", None
    if check.pairs is not None:
        return describe_pairs(check.pairs), None
    data = check.data
    counts = data.label_counts()
    lines = [f"**{len(data)} usable rows**, {len(counts)} labels: "
             + ", ".join(f"{escape(k)} ({v})" for k, v in counts.items())]
    if data.warnings:
        lines.append("**Warnings:**\n\n" + bullet_list(data.warnings))
    return "\n\n".join(lines), charts.label_distribution(counts)


def describe_pairs(pairs) -> str:
    lines = [f"**Generation task: {len(pairs)} usable rows**, {pairs.distinct_inputs()} "
             f"distinct inputs ({escape(pairs.input_column)} → {escape(pairs.target_column)}); "
             "rows that share an input are its references."]
    if pairs.warnings:
        lines.append("**Warnings:**\n\n" + bullet_list(pairs.warnings))
    return "\n\n".join(lines)


def preview_frame(frame: pd.DataFrame, text: str | None, label: str | None,
                  target: str | None = None) -> pd.DataFrame:
    """The chosen columns first, the others after; long cells cut. A label goes before its
    text (short, so both are in view); an input before its target (what is read, then what
    is written)."""
    order = (text, target) if target else (label, text)
    first = [c for c in order if c in frame.columns]
    out = frame[first + [c for c in frame.columns if c not in first]].copy()
    return out.map(lambda v: v if len(str(v)) <= PREVIEW_CHARS
                   else str(v)[:PREVIEW_CHARS - 1] + "…")


# Shares of the preview's width: the chosen columns' fixed, the rest split what is left.
# Fixed shares keep every column in view; measured from the cells, a column of long
# sentences took the whole width and pushed the input off the table ("name[Blue Sp").
LABEL_SHARE, TEXT_SHARE, INPUT_SHARE, TARGET_SHARE = 12, 58, 40, 45


def preview_update(frame: pd.DataFrame, text: str | None, label: str | None,
                   target: str | None = None) -> dict:
    """The preview table (see preview_frame) with a width for each column."""
    out = preview_frame(frame, text, label, target)
    chosen = ([(text, INPUT_SHARE), (target, TARGET_SHARE)] if target
              else [(label, LABEL_SHARE), (text, TEXT_SHARE)])
    widths = [share for column, share in chosen if column in out.columns]
    rest = len(out.columns) - len(widths)
    if rest:
        widths += [(100 - sum(widths)) / rest] * rest
    else:  # the chosen columns alone share the whole width
        widths = [100 * w / sum(widths) for w in widths]
    return {**shown(out), "column_widths": [f"{w:.1f}%" for w in widths]}


# --- handlers: values in, values out; build() below wires them -----------------------------


def load(workbench: Workbench, path: str | None, name: str | None = None,
         text: str | None = None, label: str | None = None, target: str | None = None):
    """Show a file: (dataset state, message, the three column dropdowns, preview, chart, what
    the browser remembers). `text`/`label`/`target`: the columns chosen before (a reload),
    else guessed."""
    empty = gr.update(choices=[], value=None)
    no_target = gr.update(choices=[NO_TARGET], value=NO_TARGET)
    if not path:
        return None, "", empty, empty, no_target, shown(None), shown(None), None
    info, problems = workbench.try_preview(path)
    if info is None:
        return (None, f"**This file cannot be used:**\n\n{bullet_list(problems)}",
                empty, empty, no_target, shown(None), shown(None), None)
    if text not in info.columns:  # nothing remembered: every column guessed together
        text, label, target = info.text_column, info.label_column, info.target_column
    label = label if label in info.columns else None
    target = target if target in info.columns else None
    summary, fig = describe(workbench, path, text, label, target)
    state = {"path": path, "name": name or Path(path).name, "text": text, "label": label,
             "target": target}
    return (state, summary, gr.update(choices=info.columns, value=text),
            gr.update(choices=info.columns, value=label),
            gr.update(choices=[NO_TARGET, *info.columns], value=target or NO_TARGET),
            preview_update(info.frame, text, label, target), shown(fig),
            {"name": state["name"], "key": workbench.upload_key(path), "text": text,
             "label": label, "target": target})


def on_upload(workbench: Workbench, path: str | None):
    """A file uploaded: kept in the data directory (Gradio's temp copy goes), then shown."""
    if not path:
        return load(workbench, None)
    name = Path(path).name
    return load(workbench, str(workbench.keep_upload(path, name)), name)


def on_clear(workbench: Workbench):
    return load(workbench, None)


def on_example(workbench: Workbench):
    return load(workbench, str(EXAMPLE_CSV), EXAMPLE_CSV.name)


def columns_changed(workbench: Workbench, state: dict | None, text: str | None,
                    label: str | None, target: str | None):
    """Another column chosen: (state, message, preview, chart, what the browser remembers)."""
    if not state:
        return state, "", shown(None), shown(None), gr.skip()
    target = _target(target)
    state = {**state, "text": text, "label": label, "target": target}
    memory = {"name": state["name"], "key": workbench.upload_key(state["path"]),
              "text": text, "label": label, "target": target}
    frame = workbench.preview_csv(state["path"]).frame
    second = target or label
    if text and text == second:
        what = "input and target" if target else "text and label"
        return (state, f"**The {what} columns must differ.**",
                preview_update(frame, text, label, target), shown(None), memory)
    summary, fig = describe(workbench, state["path"], text, label, target)
    return state, summary, preview_update(frame, text, label, target), shown(fig), memory


def restore(workbench: Workbench, memory):
    """A reloaded page shows the file this browser had chosen, if it is still kept: in the
    file box (by its own name) and in the message; the outputs of load, then the file box."""
    path = workbench.kept_upload(memory.get("key")) if isinstance(memory, dict) else None
    if path is None:
        return (*load(workbench, None)[:-1], gr.skip(), gr.skip())
    state, summary, *rest = load(workbench, str(path), memory.get("name"), memory.get("text"),
                                 memory.get("label"), memory.get("target"))
    if state:
        summary = f"**{escape(state['name'])}** (kept from your last visit): {summary}"
    shown_file = str(path) if state and path != EXAMPLE_CSV else gr.skip()  # uploads only
    return (state, summary, *rest, shown_file)


# --- the page ------------------------------------------------------------------------------


def build(workbench: Workbench, dataset: gr.State, notice) -> list[LoadHook]:
    remembered = gr.BrowserState(None, storage_key="prefixlab-dataset")
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
        target_col = gr.Dropdown(label="Target column (texts to generate)", choices=[NO_TARGET],
                                 value=NO_TARGET, elem_id="target-col",
                                 info="a column of texts makes this a generation task")
    with gr.Row():
        preview = gr.Dataframe(label="Preview (first 20 rows; the chosen columns first)",
                               interactive=False, wrap=True, max_height=360, elem_id="preview",
                               visible=False, scale=3)
        chart = gr.Plot(label="Label distribution", show_label=False, elem_id="label-chart",
                        visible=False, scale=2)

    outputs = [dataset, message, text_col, label_col, target_col, preview, chart, remembered]
    wire(upload.upload, bind(on_upload, workbench), [upload], outputs, notice)
    wire(upload.clear, bind(on_clear, workbench), [], outputs, notice)
    wire(example.click, bind(on_example, workbench), [], outputs, notice)
    for dd in (text_col, label_col, target_col):
        wire(dd.input, bind(columns_changed, workbench),
             [dataset, text_col, label_col, target_col],
             [dataset, message, preview, chart, remembered], notice)
    return [LoadHook(bind(restore, workbench), [remembered], [*outputs, upload])]
