"""Runs tab: every run with its status, data, model, metrics and sizes; open one, resume,
cancel or delete it, download its prefix or PEFT export, and compare curves of several."""

from __future__ import annotations

import gradio as gr

from prefixlab import charts
from prefixlab.runs import ACTIVE
from prefixlab.ui.common import LoadHook, escape, guard, run_choices
from prefixlab.ui.train_tab import report_outputs
from prefixlab.workbench import Workbench


def build(workbench: Workbench) -> list[LoadHook]:
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    table = gr.Dataframe(interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown(label="Run", choices=[], elem_id="run-pick", scale=3)
        open_btn = gr.Button("Open", size="sm", elem_id="run-open")
        resume_btn = gr.Button("Resume", size="sm", elem_id="run-resume")
        cancel_btn = gr.Button("Cancel", size="sm", elem_id="run-cancel")
        delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="run-delete")
    with gr.Row():
        dl_prefix = gr.Button("Download prefix (.zip)", size="sm", elem_id="dl-prefix")
        dl_peft = gr.Button("Download PEFT adapter (.zip)", size="sm", elem_id="dl-peft")
        download = gr.File(label="Download", interactive=False, elem_id="run-download")
    message = gr.Markdown(elem_id="runs-msg")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss")
        eval_plot = gr.Plot(label="Validation")
    report_md = gr.Markdown()
    with gr.Row():
        per_class = gr.Dataframe(interactive=False)
        confusion = gr.Plot()
        baselines = gr.Plot()
    gr.Markdown("### Compare runs")
    with gr.Row():
        compare = gr.Dropdown(label="Runs to compare", choices=[], multiselect=True,
                              elem_id="compare-pick", scale=3)
        metric = gr.Radio(["loss", "val_loss", "macro_f1", "accuracy"], value="loss",
                          label="Curve")
    compare_plot = gr.Plot(elem_id="compare-plot")

    @guard
    def list_runs(current=None):
        frame = workbench.runs_table()
        choices = run_choices(workbench.store.list())
        ids = {c[1] for c in choices}
        value = current if current in ids else None
        return frame, gr.update(choices=choices, value=value), gr.update(choices=choices)

    refresh.click(list_runs, inputs=pick, outputs=[table, pick, compare])

    @guard
    def run_status(run_id: str = "") -> list[dict]:
        """API (`/runs`): every run, or the one with this id, as plain values."""
        rows = workbench.runs()
        if run_id:
            rows = [workbench.store.get(run_id)]  # RunError for an unknown id
        return [{"id": r.id, "name": r.name, "state": r.state, "step": r.step,
                 "total_steps": r.total_steps, "macro_f1": r.macro_f1, "accuracy": r.accuracy,
                 "error": r.error} for r in rows]

    # Clients poll this; a registry refresh takes milliseconds, so it does not wait for a
    # concurrency slot behind slower events such as scoring.
    gr.api(run_status, api_name="runs", concurrency_limit=None)

    @guard
    def open_run(rid):
        if not rid:
            raise gr.Error("Pick a run first.")
        records, _ = workbench.metrics(rid, 0)
        row = workbench.store.get(rid)
        text = f"**{escape(row.name)}**: {row.state}"
        if row.error:
            text += f" — {escape(row.error)}"
        return (text, charts.loss_curves(records), charts.eval_curves(records),
                *report_outputs(workbench.report(rid)))

    open_btn.click(open_run, inputs=pick,
                   outputs=[message, loss_plot, eval_plot, report_md, per_class, confusion,
                            baselines])

    @guard
    def resume(rid):
        if not rid:
            raise gr.Error("Pick a run first.")
        row = workbench.store.get(rid)
        if row.state in ACTIVE or row.state == "completed":
            raise gr.Error(f"Run {row.name} is {row.state}; only stopped runs resume.")
        workbench.store.start(rid, resume=True)
        return f"Resuming **{escape(row.name)}** from its last checkpoint; follow it in Train."

    resume_btn.click(resume, inputs=pick, outputs=message).then(
        list_runs, inputs=pick, outputs=[table, pick, compare])

    @guard
    def cancel(rid):
        if not rid:
            raise gr.Error("Pick a run first.")
        workbench.store.cancel(rid)
        return "Cancelling after the current step; the last checkpoint is kept."

    cancel_btn.click(cancel, inputs=pick, outputs=message)

    @guard
    def delete(rid):
        if not rid:
            raise gr.Error("Pick a run first.")
        name = workbench.store.get(rid).name
        workbench.store.delete(rid)
        return f"Deleted **{escape(name)}**."

    delete_btn.click(delete, inputs=pick, outputs=message).then(
        list_runs, inputs=pick, outputs=[table, pick, compare])

    @guard
    def fetch(rid, kind):
        if not rid:
            raise gr.Error("Pick a run first.")
        if not workbench.folder(rid).prefix_path.is_file():
            raise gr.Error("This run has no prefix yet.")
        return str(workbench.download(rid, kind))

    dl_prefix.click(lambda rid: fetch(rid, "prefix"), inputs=pick, outputs=download)
    dl_peft.click(lambda rid: fetch(rid, "peft"), inputs=pick, outputs=download)

    @guard
    def compare_runs(ids, which):
        if not ids:
            return None
        curves = {workbench.store.get(i).name: workbench.metrics(i, 0)[0] for i in ids}
        return charts.compare_runs(curves, which)

    compare.change(compare_runs, inputs=[compare, metric], outputs=compare_plot)
    metric.change(compare_runs, inputs=[compare, metric], outputs=compare_plot)
    return [LoadHook(list_runs, [], [table, pick, compare])]
