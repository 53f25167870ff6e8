"""Train tab: presets and settings, the prefix's size, Start/Cancel, live curves and the
final report. Training runs in a worker process; this tab polls the run folder's metrics log
with a gr.Timer that is switched off when nothing is running."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from prefixlab.data.tables import DataError
from prefixlab.engine.balance import describe_decision
from prefixlab.engine.encode import TemplateError
from prefixlab.figures import charts
from prefixlab.runs.experiment import RunError
from prefixlab.runs.presets import PRESETS, SETTING_NAMES
from prefixlab.runs.registry import ACTIVE
from prefixlab.ui.common import LoadHook, bullet_list, escape, run_choices, shown, wire
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import process_range, run_config

POLL_SECONDS = 1.5
PER_CLASS_WIDTHS = ["28%", "19%", "17%", "17%", "19%"]  # label, precision, recall, f1, support


def progress_html(records: list[dict], state: str, phase: str | None = None) -> str:
    """The bar and the last step's numbers; before the first step, what the run is doing."""
    steps = [r for r in records if r.get("type") == "step"]
    if not steps:
        return f"<div>{escape(phase or state)}…</div>" if state in ACTIVE else ""
    s = steps[-1]
    share = s["step"] / max(1, s["total_steps"])
    eta = f" · at most {s['eta_s']:.0f} s left" if phase == "training" and s["eta_s"] else ""
    after = f" · {escape(phase)}…" if phase and phase != "training" else ""
    html = (
        f"<div class='bar'><div class='fill' style='width:{100 * share:.1f}%'></div></div>"
        f"<div>step {s['step']}/{s['total_steps']} · epoch {s['epoch']:.2f} · "
        f"{s['examples_per_s']:.1f} examples/s · loss {s['loss']:.3f}{eta}{after}</div>"
    )
    return html + last_evaluation_html(records)


def last_evaluation_html(records: list[dict]) -> str:
    """The latest evaluation's predicted-label counts, the best step so far, its warnings."""
    evals = [r for r in records if r.get("type") == "eval" and "predicted" in r]
    if not evals:
        return ""
    e = evals[-1]
    counts = ", ".join(f"{escape(k)} {v}" for k, v in e["predicted"].items())
    html = (f"<div>evaluation at step {e['step']}: macro-F1 {e['macro_f1']:.3f} · predicted "
            f"{counts} · kept so far: step {e.get('best_step')}</div>")
    return html + "".join(f"<div><b>Warning:</b> {escape(w)}</div>" for w in e["warnings"])


def generation_report_outputs(report: dict):
    """A generation run's scores beside the bare model's, and inputs / references / outputs."""
    bare = report["baselines"]["bare_model"]
    beams = report.get("decoding", {}).get("num_beams", 1)
    how = "greedy" if beams == 1 else f"beam search, {beams} beams"
    lines = [
        f"### Held-out results on {report['n']} distinct inputs ({report['rows']} references; "
        f"{how})",
        "| | BLEU | ROUGE-L | chrF | target loss |", "|---|---|---|---|---|",
        f"| **prefix** | **{report['bleu']:.1f}** | **{report['rouge_l']:.1f}** | "
        f"**{report['chrf']:.1f}** | **{report['loss']:.3f}** |",
        f"| bare model (same prompt, no prefix) | {bare['bleu']:.1f} | {bare['rouge_l']:.1f} | "
        f"{bare['chrf']:.1f} | {bare['loss']:.3f} |",
    ]
    samples = report.get("samples", [])
    if samples:
        # A Markdown table: the page's full width for four columns of sentences.
        lines += ["", f"#### {len(samples)} held-out inputs: references and outputs", "",
                  "| input | references | prefix output | bare model output |",
                  "|---|---|---|---|"]
        lines += [f"| {_cell(s['input'])} | {'<br>'.join(_cell(r) for r in s['references'])} | "
                  f"{_cell(s['prefix'])} | {_cell(s['bare'])} |" for s in samples]
    return "\n".join(lines), shown(None), shown(None), shown(charts.generation_bars(report))


def _cell(text: str) -> str:
    """Text for one Markdown table cell: escaped, pipes and line breaks kept inside it."""
    return escape(text).replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def report_outputs(report: dict | None):
    """Markdown summary, per-class table, confusion heatmap and baseline bars (updates that
    hide the table and charts while there is no report); for a generation run: its scores,
    a table of outputs, and the bars."""
    if not report:
        return "", shown(None), shown(None), shown(None)
    if report.get("task") == "generation":
        return generation_report_outputs(report)
    lines = [
        f"### Held-out results on {report['n']} rows",
        "| | macro-F1 | accuracy |", "|---|---|---|",
        f"| **prefix** | **{report['macro_f1']:.3f}** | **{report['accuracy']:.3f}** |",
    ]
    for key, name in charts.BASELINES:
        if baseline := report["baselines"].get(key):
            lines.append(f"| {name} | {baseline['macro_f1']:.3f} | {baseline['accuracy']:.3f} |")
    # Said above the numbers: a prefix that predicts one class for (nearly) every row can
    # still show a fair accuracy on a skewed set.
    warnings = [f"> ⚠️ **{escape(w)}**" for w in report.get("warnings", [])]
    if warnings:  # one quoted paragraph each ("> " lines in a row would run together)
        lines[1:1] = ["", "\n>\n".join(warnings), ""]
    if "kept_step" in report:
        lines.append(f"\nKept the prefix of step {report['kept_step']} of {report['steps']} "
                     f"({report['selection']}); training ended: {report['stop_reason']}.")
    if text := describe_decision(report):
        lines.append(escape(text))
    per_class = pd.DataFrame([
        {"label": k, "precision": round(v["precision"], 3), "recall": round(v["recall"], 3),
         "f1": round(v["f1"], 3), "support": v["support"]}
        for k, v in report["per_class"].items()
    ])
    return ("\n".join(lines), {**shown(per_class), "label": "Per class"},
            shown(charts.confusion_heatmap(report)), shown(charts.baseline_bars(report)))


def readiness(workbench: Workbench, state: dict | None, settings: dict) -> tuple[str, bool]:
    """Whether Start can go ahead with this data and these settings, in plain words."""
    if not state:
        return "Choose a CSV in the Data tab first (or the bundled example).", False
    cfg = run_config(state["path"], state.get("text"), state.get("label"), settings,
                     model=workbench.default_model, target_column=state.get("target"))
    try:
        prepared = workbench.check_start(cfg)
    except DataError as e:
        return f"**Cannot start with {escape(state['name'])}:**\n\n{bullet_list(e.problems)}", \
            False
    except TemplateError as e:
        return f"**Cannot start:** {escape(e)}", False
    if cfg.is_generation:
        return (f"Ready: {escape(state['name'])}, a generation task: {len(prepared.train)} "
                f"training rows, {prepared.validation.distinct_inputs()} validation inputs "
                f"({len(prepared.validation)} references)."), True
    return (f"Ready: {escape(state['name'])}, {len(prepared.train)} training rows, "
            f"{len(prepared.validation)} validation rows, {len(prepared.labels)} labels."), True


def build(workbench: Workbench, dataset: gr.State, notice,
          shown_on=None) -> list[LoadHook]:
    quick = PRESETS["Quick look"]
    with gr.Row():
        preset = gr.Radio(list(PRESETS), value="Quick look", label="Preset", elem_id="preset",
                          info="Each trains until validation macro-F1 stops improving and keeps "
                               "the best step. Quick look: under 2 min on a laptop CPU. "
                               "Balanced: up to 2,000 rows, 10 min. Thorough: all rows, 1 h.")
        name = gr.Textbox(label="Run name (optional)", elem_id="run-name", max_lines=1)
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            prefix_length = gr.Slider(1, 64, step=1, value=quick["prefix_length"],
                                      label="Prefix length (virtual tokens)")
            init = gr.Radio(["text", "random", "zero"], value=quick["init"],
                            label="Initialization",
                            info="text: key/values of a task description with the labels")
            reparameterize = gr.Checkbox(value=quick["reparameterize"],
                                         label="Reparameterize (embedding → MLP)")
        with gr.Row():
            learning_rate = gr.Number(value=quick["learning_rate"], label="Learning rate",
                                      minimum=1e-6, maximum=1.0)
            epochs = gr.Slider(1, 40, step=1, value=quick["epochs"], label="Epochs (budget)",
                               elem_id="epochs")
            batch_size = gr.Slider(1, 64, step=1, value=quick["batch_size"], label="Batch size",
                                   elem_id="batch-size")
            max_length = gr.Slider(32, 512, step=8, value=quick["max_length"],
                                   label="Max tokens per example")
        with gr.Row():
            validation_share = gr.Slider(0.05, 0.5, step=0.05, value=quick["validation_share"],
                                         label="Validation share")
            seed = gr.Number(value=quick["seed"], label="Seed", precision=0)
            max_train = gr.Number(value=quick["max_train_examples"], precision=0, minimum=0,
                                  label="Training rows (0 = all)")
            max_eval = gr.Number(value=quick["max_eval_examples"], precision=0, minimum=0,
                                 label="Validation rows scored (0 = all)")
        default_processes, most_processes = process_range()
        with gr.Row():
            patience = gr.Number(value=quick["patience"], precision=0, minimum=0,
                                 label="Patience (evaluations without improvement; 0 = off)")
            max_minutes = gr.Number(value=quick["max_minutes"], minimum=0,
                                    label="Time budget, minutes (0 = none)")
            processes = gr.Slider(
                1, most_processes, step=1, value=default_processes, label="Processes",
                visible=most_processes > 1, elem_id="processes",
                info="Data-parallel workers, one per GPU; on CPU more than one pays only on "
                     "idle cores. The result is the same.")
        with gr.Row():
            class_balance = gr.Radio(
                ["none", "weighted", "sampled"], value=quick["class_balance"],
                label="Class balance in training", elem_id="class-balance",
                info="weighted: each row's loss weighted by its class's inverse frequency; "
                     "sampled: each epoch draws classes equally often")
            decision = gr.Radio(
                ["fitted", "prior", "raw"], value=quick["decision"], label="Decision rule",
                elem_id="decision",
                info="prior: each label's score less the log of its training share, so rare "
                     "labels are not out-voted by the skew; fitted: as much of that share "
                     "as decides best on the validation rows; raw: the likeliest label")
        task = gr.Textbox(label="Task description (optional, starts the prefix)", max_lines=1,
                          placeholder="e.g. Is this tweet hateful, offensive or neither")
    settings = [prefix_length, init, reparameterize, learning_rate, epochs, batch_size,
                max_length, validation_share, seed, max_train, max_eval, patience, max_minutes,
                class_balance, decision]
    size = gr.Markdown(elem_id="prefix-size")
    ready = gr.Markdown(elem_id="start-check")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start",
                          interactive=False)
        cancel = gr.Button("Cancel", elem_id="cancel")
    with gr.Row():
        follow = gr.Dropdown(label="Run shown (every queued or running run is listed)",
                             choices=[], elem_id="follow", scale=3)
        status = gr.Markdown(elem_id="train-status")
    progress = gr.HTML(elem_id="progress")
    with gr.Row():
        loss_plot = gr.Plot(show_label=False, elem_id="loss-plot", visible=False)
        eval_plot = gr.Plot(show_label=False, elem_id="eval-plot", visible=False)
    with gr.Row(equal_height=False):
        report_md = gr.Markdown(elem_id="report")
        per_class = gr.Dataframe(label="Per class", interactive=False, elem_id="per-class",
                                 visible=False, elem_classes=["readable-table"],
                                 column_widths=PER_CLASS_WIDTHS)
    with gr.Row():
        confusion = gr.Plot(show_label=False, elem_id="confusion", visible=False)
        baselines = gr.Plot(show_label=False, elem_id="baselines", visible=False)

    run_id = gr.State(None)
    offset = gr.State(0)
    records = gr.State([])
    timer = gr.Timer(POLL_SECONDS, active=False)

    def as_settings(*values) -> dict:
        return dict(zip(SETTING_NAMES, values, strict=True))

    def apply_preset(choice: str):
        p = PRESETS[choice]
        return [p[k] for k in SETTING_NAMES]

    wire(preset.change, apply_preset, [preset], settings, notice, clears=False)

    def show_size(*values):
        try:
            s = workbench.prefix_size(as_settings(*values))
        except (RunError, ValueError, OSError) as e:
            return f"Prefix size unavailable: {escape(e)}"
        return (f"**{s['trainable']:,} trainable parameters** = {s['share']:.4%} of the "
                f"model's {s['model_parameters']:,}; the saved prefix is "
                f"{s['file_bytes'] / 1024:,.0f} KB.")

    for comp in (prefix_length, reparameterize):
        wire(comp.change, show_size, settings, [size], notice, clears=False)

    def check(state, *values):
        text, ok = readiness(workbench, state, as_settings(*values))
        return text, gr.update(interactive=ok)

    for trigger in (dataset.change, max_length.change, validation_share.change,
                    max_train.change, max_eval.change):
        wire(trigger, check, [dataset, *settings], [ready, start], notice, clears=False)

    poll_outputs = [run_id, offset, records, follow, status, progress, loss_plot, eval_plot,
                    report_md, per_class, confusion, baselines, timer]

    def follow_choices(rid: str | None) -> dict:
        """Every active run (and the one shown, whatever its state) to pick from."""
        rows = [r for r in workbench.store.list() if r.state in ACTIVE or r.id == rid]
        return gr.update(choices=run_choices(rows), value=rid)

    def render(rid, off, recs):
        """Read what is new in the run's log; switch the timer off once the run is over."""
        if not rid:
            return [None, 0, [], follow_choices(None), "", "", shown(None), shown(None),
                    *report_outputs(None), gr.Timer(active=False)]
        new, off = workbench.metrics(rid, off)
        recs = recs + new
        row = workbench.store.get(rid)
        state = row.state
        phase = workbench.phase(rid)
        text = f"**{escape(row.name)}**: {state}"
        if phase:
            text += f" — {escape(phase)}"
        if row.error:
            text += f" — {escape(row.error)}"
        done = state not in ACTIVE
        report = workbench.report(rid) if state == "completed" else None
        return [rid, off, recs, follow_choices(rid), text, progress_html(recs, state, phase),
                shown(charts.loss_curves(recs)), shown(charts.eval_curves(recs)),
                *report_outputs(report), gr.Timer(active=not done)]

    def on_start(state, run_name, task_text, n_processes, *values):
        if not state:
            raise gr.Error("Choose a CSV in the Data tab first (or the bundled example).")
        cfg = run_config(state["path"], state.get("text"), state.get("label"),
                         as_settings(*values), model=workbench.default_model, task=task_text,
                         processes=n_processes, target_column=state.get("target"))
        rid = workbench.start_run(cfg, name=run_name or None, data_name=state["name"])
        workbench.refresh()
        return render(rid, 0, [])

    wire(start.click, on_start, [dataset, name, task, processes, *settings], poll_outputs,
         notice)

    def on_tick(rid, off, recs):
        workbench.refresh()
        return render(rid, off, recs)

    wire(timer.tick, on_tick, [run_id, offset, records], poll_outputs, notice, clears=False)
    # Another run picked: its log is read from the start.
    wire(follow.input, lambda rid: render(rid, 0, []), [follow], poll_outputs, notice)

    def on_cancel(rid):
        if not rid:
            raise gr.Error("No run is open.")
        workbench.store.cancel(rid)
        workbench.refresh()
        return render(rid, 0, [])

    wire(cancel.click, on_cancel, [run_id], poll_outputs, notice)

    def reattach(rid=None, off=0, recs=None):
        """Follow the run shown while it is active; else the one training (or queued)."""
        rows = workbench.refresh()
        if rid and any(r.id == rid and r.state in ACTIVE for r in rows):
            return render(rid, off, recs or [])
        active = sorted((r for r in rows if r.state in ACTIVE),
                        key=lambda r: (r.state != "running", -r.created))
        if active:
            return render(active[0].id, 0, [])
        return render(rid, 0, []) if rid else render(None, 0, [])

    if shown_on is not None:  # the tab opened again (e.g. after Resume in Runs)
        wire(shown_on, reattach, [run_id, offset, records], poll_outputs, notice, clears=False)

    return [LoadHook(lambda: reattach(), [], poll_outputs), LoadHook(show_size, settings, [size]),
            LoadHook(check, [dataset, *settings], [ready, start])]
