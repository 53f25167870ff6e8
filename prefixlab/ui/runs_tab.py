"""Runs tab: every run with its status, data, model, metrics and sizes; open one, resume,
cancel or delete it, train one that ended on its budget longer, download its prefix or PEFT
export, evaluate it on a held-out test CSV, and compare curves of several."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from prefixlab.figures import charts
from prefixlab.runs.registry import ACTIVE
from prefixlab.ui.common import (
    LoadHook,
    LongAction,
    Stopped,
    bind,
    duration,
    escape,
    progress_of,
    run_choices,
    shown,
    stop_action,
    wire,
)
from prefixlab.ui.run_view import PER_CLASS_WIDTHS, report_outputs
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import ADAPT_CHOICES, RUNS_COLUMNS

# Shares of the table's width: the id must show whole, headers must not break mid-word.
# A one-word header needs ~8% of the table ("accuracy", "processes" in the header font);
# two-word ones wrap between their words; the id, the widest, wraps at its dashes.
_WIDTHS = {"name": 10, "data": 8, "base model": 10, "prefix size": 6, "model size": 6,
           "id": 12}
RUNS_COLUMN_WIDTHS = [f"{_WIDTHS.get(c, 8)}%" for c in RUNS_COLUMNS]  # one per column


# --- handlers: values in, values out; build() below wires them -----------------------------


def list_runs(workbench: Workbench, current: str | None = None):
    """The runs table, the run picker (keeping `current` if it still exists), the compare list."""
    frame = workbench.runs_table()
    choices = run_choices(workbench.store.list())
    ids = {c[1] for c in choices}
    value = current if current in ids else None
    return frame, gr.update(choices=choices, value=value), gr.update(choices=choices)


def need(rid: str | None) -> str:
    if not rid:
        raise gr.Error("Pick a run first.")
    return rid


def open_run(workbench: Workbench, rid: str | None):
    """A run's state, curves and report."""
    records, _ = workbench.metrics(need(rid), 0)
    row = workbench.store.get(rid)
    text = f"**{escape(row.name)}**: {row.state}"
    if row.error:
        text += f" — {escape(row.error)}"
    return (text, shown(charts.loss_curves(records)), shown(charts.eval_curves(records)),
            *report_outputs(workbench.report(rid)))


def picked(rid: str | None):
    """Another run chosen: what was said and shown about the previous one goes."""
    return ("", shown(None), shown(None), *report_outputs(None), "",
            *report_outputs(None)[1:], gr.update(value=None, visible=False))


def resume(workbench: Workbench, rid: str | None) -> str:
    row = workbench.store.get(need(rid))
    if row.state in ACTIVE or row.state == "completed":
        raise gr.Error(f"Run {row.name} is {row.state}; only stopped runs resume.")
    workbench.store.start(rid, resume=True)
    return f"Resuming **{escape(row.name)}** from its last checkpoint; follow it in Train."


def cancel(workbench: Workbench, rid: str | None) -> str:
    """Cancel the picked run, named in the answer."""
    name = workbench.store.get(need(rid)).name
    workbench.store.cancel(rid)
    return (f"Cancelling **{escape(name)}** (run {rid}) after the current step; the last "
            "checkpoint is kept.")


def keep(workbench: Workbench, rid: str | None) -> str:
    """Use a cancelled run's prefix as it stopped (only completed runs are used otherwise)."""
    name = workbench.keep_run(need(rid))
    return (f"Kept the prefix **{escape(name)}** stopped with: the Playground and the API use "
            "it now, like a completed run's.")


def delete(workbench: Workbench, rid: str | None) -> str:
    name = workbench.store.get(need(rid)).name
    workbench.store.delete(rid)
    return f"Deleted **{escape(name)}**."


def fetch(workbench: Workbench, rid: str | None, kind: str) -> dict:
    """The download box showing the run's zip of this kind ("prefix" or "peft")."""
    if not workbench.has_prefix(need(rid)):
        raise gr.Error("This run has no prefix yet.")
    return gr.update(value=str(workbench.download(rid, kind)), visible=True)


def download_prefix(workbench: Workbench, rid: str | None) -> dict:
    return fetch(workbench, rid, "prefix")


def download_peft(workbench: Workbench, rid: str | None) -> dict:
    return fetch(workbench, rid, "peft")


def evaluate_test(workbench: Workbench, rid: str | None, path: str | None,
                  action: LongAction | None = None, adapt: str = "as trained",
                  progress=gr.Progress()):  # noqa: B008 (gradio injects it)
    """The run, its baselines and the bare model on a held-out test CSV: the report (with how
    long it took, or where Stop stopped it), its table and charts. Progress shows rows done
    of rows, the time so far and an estimate of the time left; `action` is this page's, which
    its Stop button can stop. `adapt`: one of ADAPT_CHOICES, how the decision adapts to the
    file's rows."""
    if not workbench.has_prefix(need(rid)):
        raise gr.Error("This run has no prefix yet: evaluate a finished run.")
    if not path:
        raise gr.Error("Upload a labeled test CSV first.")
    action = action or LongAction()
    action.begin()
    try:
        report = workbench.evaluate_test(rid, path, ADAPT_CHOICES.get(adapt, "none"),
                                         progress=progress_of(action, progress))
    except Stopped as e:
        return f"**{escape(e)}**", shown(None), shown(None), shown(None)
    finally:
        action.end()
    md, table_, cm, bars = report_outputs(report)
    name = escape(workbench.store.get(rid).name)
    md = md.replace("### Held-out results on", f"### {name} on the test file:", 1)
    if adapted := report.get("adapt_prior"):
        shares = ", ".join(f"{escape(y)} {v:.0%}" for y, v in adapted["predicted_shares"].items())
        md += (f"\n\nThe prefix's decision was adapted to this file's rows ({adapted['how']}); "
               f"its predicted shares: {shares}. {escape(adapted['assumption'])}")
    md += f"\n\nEvaluated in {duration(time.monotonic() - action.started)}."
    return md, table_, cm, bars


def longer_offer(workbench: Workbench, rid: str | None):
    """The Train-longer row, shown for a completed run that ended on its budget: why, and
    the amounts to offer (its first budget again); hidden for any other run."""
    offer = workbench.longer_offer(rid) if rid else None
    if offer is None:
        return gr.update(visible=False), "", gr.skip(), gr.skip()
    return (gr.update(visible=True), f"**Train longer?** {escape(offer.sentence())}",
            offer.minutes, offer.epochs)


def train_longer(workbench: Workbench, rid: str | None, minutes, epochs):
    """Resume the picked run with more minutes and/or epochs; the row hides once it starts."""
    name = workbench.store.get(need(rid)).name
    what = workbench.train_longer(rid, float(minutes or 0), int(epochs or 0))
    return (f"Training **{escape(name)}** longer, {escape(what)}; follow it in Train.",
            gr.update(visible=False))


def compare_runs(workbench: Workbench, ids: list[str] | None, which: str):
    """One curve per run of the metric `which`."""
    if not ids:
        return shown(None)
    curves = {workbench.store.get(i).name: workbench.metrics(i, 0)[0] for i in ids}
    return shown(charts.compare_runs(curves, which))


# --- the page ------------------------------------------------------------------------------


@dataclass
class LongerRow:
    """The Train-longer row's components (train_longer_row lays them out)."""

    row: gr.Row
    note: gr.Markdown
    minutes: gr.Number
    epochs: gr.Number
    button: gr.Button


def train_longer_row() -> LongerRow:
    """Hidden until a completed run that ended on its budget is picked (longer_offer)."""
    with gr.Row(visible=False, elem_id="train-longer-row") as row:
        note = gr.Markdown(elem_id="train-longer-note")
        minutes = gr.Number(0, minimum=0, label="More minutes (0 = no time limit)",
                            elem_id="longer-minutes")
        epochs = gr.Number(0, minimum=0, precision=0, label="More epochs (0 = what fits)",
                           elem_id="longer-epochs")
        button = gr.Button("Train longer", variant="primary", elem_id="train-longer")
    return LongerRow(row, note, minutes, epochs, button)


def wire_train_longer(workbench: Workbench, longer: LongerRow, pick, open_btn, message,
                      listed: list, notice) -> None:
    offer_outputs = [longer.row, longer.note, longer.minutes, longer.epochs]
    for trigger in (pick.input, open_btn.click):
        wire(trigger, bind(longer_offer, workbench), [pick], offer_outputs, notice,
             clears=False)
    wire(longer.button.click, bind(train_longer, workbench),
         [pick, longer.minutes, longer.epochs], [message, longer.row], notice).then(
        bind(list_runs, workbench), inputs=pick, outputs=listed, api_visibility="private")


def build(workbench: Workbench, notice) -> list[LoadHook]:
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    table = gr.Dataframe(interactive=False, wrap=True, elem_id="runs-table",
                         column_widths=RUNS_COLUMN_WIDTHS, elem_classes=["readable-table"])
    with gr.Row():
        pick = gr.Dropdown(label="Run", choices=[], elem_id="run-pick", scale=3)
        open_btn = gr.Button("Open", size="sm", elem_id="run-open")
        resume_btn = gr.Button("Resume", size="sm", elem_id="run-resume")
        cancel_btn = gr.Button("Cancel", size="sm", elem_id="run-cancel")
        delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="run-delete")
    longer = train_longer_row()
    with gr.Row():
        dl_prefix = gr.Button("Download prefix (.zip)", size="sm", elem_id="dl-prefix")
        dl_peft = gr.Button("Download PEFT adapter (.zip)", size="sm", elem_id="dl-peft")
        keep_btn = gr.Button("Keep this cancelled run's prefix", size="sm", elem_id="run-keep")
        download = gr.File(label="Download", interactive=False, elem_id="run-download",
                           visible=False)
    message = gr.Markdown(elem_id="runs-msg")
    with gr.Row():
        loss_plot = gr.Plot(show_label=False, elem_id="runs-loss", visible=False)
        eval_plot = gr.Plot(show_label=False, elem_id="runs-eval", visible=False)
    with gr.Row(equal_height=False):
        report_md = gr.Markdown(elem_id="runs-report")
        per_class = gr.Dataframe(label="Per class", interactive=False, visible=False,
                                 elem_classes=["readable-table"],
                                 column_widths=PER_CLASS_WIDTHS)
    with gr.Row():
        confusion = gr.Plot(show_label=False, visible=False)
        baselines = gr.Plot(show_label=False, visible=False)
    gr.Markdown("### Evaluate on a held-out test CSV\nThe picked run's prefix, the bare model "
                "and TF-IDF on the same rows of a labeled file the run never saw.")
    with gr.Row():
        test_file = gr.File(label="Test CSV (text and label columns)",
                            file_types=[".csv", ".tsv", ".txt"], elem_id="test-csv", scale=3)
        with gr.Column():
            test_adapt = gr.Radio(list(ADAPT_CHOICES), value="as trained",
                                  label="Decision on the test rows", elem_id="test-adapt")
            test_btn = gr.Button("Evaluate", elem_id="test-run")
            test_stop = gr.Button("Stop", elem_id="test-stop", size="sm")  # ends it early
    with gr.Row(equal_height=False):
        test_md = gr.Markdown(elem_id="test-report", elem_classes=["progress-host"])
        test_per_class = gr.Dataframe(label="Per class (test)", interactive=False, visible=False,
                                      elem_id="test-per-class", elem_classes=["readable-table"],
                                      column_widths=PER_CLASS_WIDTHS)
    with gr.Row():
        test_confusion = gr.Plot(show_label=False, visible=False, elem_id="test-confusion")
        test_baselines = gr.Plot(show_label=False, visible=False, elem_id="test-baselines")
    gr.Markdown("### Compare runs")
    with gr.Row():
        compare = gr.Dropdown(label="Runs to compare", choices=[], multiselect=True,
                              elem_id="compare-pick", scale=3)
        metric = gr.Radio(["loss", "val_loss", "macro_f1", "accuracy"], value="loss",
                          label="Curve")
    compare_plot = gr.Plot(show_label=False, elem_id="compare-plot", visible=False)

    listed = [table, pick, compare]
    opened = [message, loss_plot, eval_plot, report_md, per_class, confusion, baselines]
    wire(refresh.click, bind(list_runs, workbench), [pick], listed, notice)
    wire(open_btn.click, bind(open_run, workbench), [pick], opened, notice)
    wire(pick.input, picked, [pick],
         [*opened, test_md, test_per_class, test_confusion, test_baselines, download], notice)
    wire(resume_btn.click, bind(resume, workbench), [pick], [message], notice).then(
        bind(list_runs, workbench), inputs=pick, outputs=listed, api_visibility="private")
    wire(cancel_btn.click, bind(cancel, workbench), [pick], [message], notice)
    wire(delete_btn.click, bind(delete, workbench), [pick], [message], notice).then(
        bind(list_runs, workbench), inputs=pick, outputs=listed, api_visibility="private")
    wire(keep_btn.click, bind(keep, workbench), [pick], [message], notice)
    wire_train_longer(workbench, longer, pick, open_btn, message, listed, notice)
    wire(dl_prefix.click, bind(download_prefix, workbench), [pick], [download], notice)
    wire(dl_peft.click, bind(download_peft, workbench), [pick], [download], notice)
    # The evaluation's progress shows where its report will be; Stop ends it there.
    test_action = gr.State(LongAction())
    wire(test_btn.click, bind(evaluate_test, workbench),
         [pick, test_file, test_action, test_adapt],
         [test_md, test_per_class, test_confusion, test_baselines], notice,
         show_progress_on=[test_md])
    wire(test_stop.click, stop_action, [test_action], [], notice)
    for trigger in (compare.change, metric.change):
        wire(trigger, bind(compare_runs, workbench), [compare, metric], [compare_plot], notice)
    return [LoadHook(bind(list_runs, workbench), [], listed)]
