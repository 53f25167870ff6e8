"""Train tab: presets and settings, the prefix's size, Start/Cancel, live curves and the
final report (drawn by run_view.py). Training runs in a worker process; this tab polls the run
folder's metrics log with a gr.Timer that is switched off when nothing is running."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from prefixlab.figures import charts
from prefixlab.runs.folder import RunError
from prefixlab.runs.presets import PRESETS, SETTING_NAMES
from prefixlab.runs.registry import ACTIVE
from prefixlab.ui import compare_tab
from prefixlab.ui.common import LoadHook, bind, bullet_list, escape, run_choices, shown, wire
from prefixlab.ui.run_view import PER_CLASS_WIDTHS, progress_html, report_outputs
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import process_range, run_config

POLL_SECONDS = 1.5
def readiness(workbench: Workbench, state: dict | None, settings: dict,
              shift_csv: str | None = None) -> tuple[str, bool]:
    """Whether Start can go ahead with this data, these settings and this shift file (its
    labels must be the data's), in plain words."""
    if not state:
        return "Choose a CSV in the Data tab first (or the bundled example).", False
    cfg = run_config(state["path"], state.get("text"), state.get("label"), settings,
                     model=workbench.default_model, target_column=state.get("target"),
                     shift_csv=shift_csv)
    check = workbench.start_check(cfg)
    if check.data_problems:
        return (f"**Cannot start with {escape(state['name'])}:**\n\n"
                f"{bullet_list(check.data_problems)}"), False
    if not check.ok:
        return f"**Cannot start:** {escape(check.prompt_problem)}", False
    prepared = check.prepared
    if cfg.is_generation:
        return (f"Ready: {escape(state['name'])}, a generation task: {len(prepared.train)} "
                f"training rows, {prepared.validation.distinct_inputs()} validation inputs "
                f"({len(prepared.validation)} references)."), True
    shift = (f" The final report also scores the {len(prepared.shift)} rows of the shift CSV."
             if prepared.shift is not None else "")
    return (f"Ready: {escape(state['name'])}, {len(prepared.train)} training rows, "
            f"{len(prepared.validation)} validation rows, {len(prepared.labels)} labels."
            f"{shift}"), True


def as_settings(*values) -> dict:
    """The settings form's values (in SETTING_NAMES order) by name."""
    return dict(zip(SETTING_NAMES, values, strict=True))


def apply_preset(choice: str) -> list:
    p = PRESETS[choice]
    return [p[k] for k in SETTING_NAMES]


def show_size(workbench: Workbench, *values) -> str:
    """The prefix-size line for these settings."""
    try:
        s = workbench.prefix_size(as_settings(*values))
    except (RunError, ValueError, OSError) as e:
        return f"Prefix size unavailable: {escape(e)}"
    return (f"**{s['trainable']:,} trainable parameters** = {s['share']:.4%} of the "
            f"model's {s['model_parameters']:,}; the saved prefix is "
            f"{s['file_bytes'] / 1024:,.0f} KB.")


def check(workbench: Workbench, state: dict | None, shift_file: str | None, *values):
    """The line above Start, and whether Start is on."""
    text, ok = readiness(workbench, state, as_settings(*values), shift_file)
    return text, gr.update(interactive=ok)


@dataclass
class Followed:
    """The run this browser follows in the Train tab: the one its person started or picked
    last (or the page found when it opened).

    One object per browser session (gr.State makes one per session) that the session's
    handlers share: Start, a pick in "Run shown" and the page's (re)attach set it; Cancel acts
    on it; a status poll reads it and never sets it. A poll that was still reading when the
    person started or picked another run finds the newer choice when it ends and leaves the
    page to it (`on_tick`): a slow poll once wrote its old run back, and Cancel then stopped
    the wrong run.
    """

    run_id: str | None = None


def follow_choices(workbench: Workbench, rid: str | None, *, pick: bool = False) -> dict:
    """Every active run (and the one shown, whatever its state) to pick from; the value is set
    only for a choice (`pick`), so a poll never moves the dropdown."""
    rows = [r for r in workbench.store.list() if r.state in ACTIVE or r.id == rid]
    if pick:
        return gr.update(choices=run_choices(rows), value=rid)
    return gr.update(choices=run_choices(rows))


def cancel_button(rid: str | None, active: bool, *, pick: bool = False) -> dict:
    """Cancel names the run it stops, and is on only while that run is active. Its name is set
    only for a choice (`pick`), with the run Cancel acts on; a poll only turns it on or off."""
    if not pick:
        return gr.update(interactive=active)
    return gr.update(value=f"Cancel run {rid}" if rid else "Cancel", interactive=active)


def new_view(rid: str | None) -> dict:
    """What this browser has read of a run's metrics log: the run, the byte offset, the
    records so far."""
    return {"run_id": rid, "offset": 0, "records": []}


def render(workbench: Workbench, rid: str | None, view: dict | None = None, *,
           pick: bool = False) -> list:
    """The run `rid`'s view, one value per poll output of build(): read what is new in its log
    (from the start when `view` is another run's); switch the timer off once the run is over.
    `pick`: the run was just started or picked, so the dropdown and Cancel name it."""
    if not view or view.get("run_id") != rid:
        view = new_view(rid)
    if not rid:
        return [view, follow_choices(workbench, None, pick=pick),
                "No run yet: start one above. Every run is listed in the Runs tab.", "",
                shown(None), shown(None), *report_outputs(None), gr.Timer(active=False),
                cancel_button(None, False, pick=pick)]
    new, offset = workbench.metrics(rid, view["offset"])
    recs = view["records"] + new
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
    return [{"run_id": rid, "offset": offset, "records": recs},
            follow_choices(workbench, rid, pick=pick), text,
            progress_html(recs, state, phase), shown(charts.loss_curves(recs)),
            shown(charts.eval_curves(recs)), *report_outputs(report),
            gr.Timer(active=not done), cancel_button(rid, not done, pick=pick)]


def on_start(workbench: Workbench, followed: Followed, state: dict | None, run_name: str,
             task_text: str, n_processes, shift_file: str | None, *values) -> list:
    """Start a run on the Data tab's CSV with the form's settings; `shift_file`, an upload
    the run folder keeps a copy of (RunStore.create), is scored beside validation."""
    if not state:
        raise gr.Error("Choose a CSV in the Data tab first (or the bundled example).")
    cfg = run_config(state["path"], state.get("text"), state.get("label"),
                     as_settings(*values), model=workbench.default_model, task=task_text,
                     processes=n_processes, target_column=state.get("target"),
                     shift_csv=shift_file)
    rid = workbench.start_run(cfg, name=run_name or None, data_name=state["name"])
    followed.run_id = rid
    workbench.refresh()
    return render(workbench, rid, pick=True)


def on_tick(workbench: Workbench, followed: Followed, view: dict | None) -> list:
    """The followed run's view, unless the person started or picked another run while this
    poll read: then every output is left as that choice set it."""
    rid = followed.run_id
    workbench.refresh()
    out = render(workbench, rid, view)
    if followed.run_id != rid:
        return [gr.skip()] * len(out)
    return out


def on_follow(workbench: Workbench, followed: Followed, rid: str | None) -> list:
    """Another run picked: followed from now on, its log read from the start."""
    followed.run_id = rid
    return render(workbench, rid, pick=True)


def on_cancel(workbench: Workbench, followed: Followed, view: dict | None) -> list:
    """Cancel the followed run, the one the button names, and no other."""
    rid = followed.run_id
    if not rid:
        raise gr.Error("No run is open.")
    workbench.store.cancel(rid)
    workbench.refresh()
    return render(workbench, rid, view, pick=True)


def reattach(workbench: Workbench, followed: Followed, view: dict | None = None) -> list:
    """Follow the run shown while it is active; else the one training (or queued); with none
    active, the run shown, or on a new page the last run completed (else the last started),
    so a reloaded page shows its report instead of nothing."""
    rows = workbench.refresh()
    rid = followed.run_id
    if not (rid and any(r.id == rid and r.state in ACTIVE for r in rows)):
        active = sorted((r for r in rows if r.state in ACTIVE),
                        key=lambda r: (r.state != "running", -r.created))
        if active:
            rid = active[0].id
        elif not any(r.id == rid for r in rows):
            last = max(rows, key=lambda r: (r.state == "completed", r.created), default=None)
            rid = last.id if last else None
    followed.run_id = rid
    return render(workbench, rid, view, pick=True)


# --- the page ------------------------------------------------------------------------------


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
                                    label="Time budget, minutes: training and final report "
                                          "(0 = none)")
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
            precision = gr.Radio(
                ["auto", "float32", "bfloat16", "float16"], value=quick["precision"],
                label="Precision (the model's compute dtype)", elem_id="precision",
                info="auto: bfloat16 where the processor multiplies it natively (a GPU; a CPU "
                     "with AMX or AVX512-BF16), else float32; float16 on CUDA only. The "
                     "prefix and its optimizer stay float32")
        gr.Markdown("**Generalizing to other topics** (off in Quick look and Balanced)",
                    elem_id="shift-heading")
        with gr.Row():
            validation_split = gr.Radio(
                ["random", "topics"], value=quick["validation_split"], label="Validation split",
                elem_id="validation-split",
                info="random: a share of the rows, by label; topics: whole groups of similar "
                     "texts, so the step kept is the one best on topics training never read")
            start_pull = gr.Number(
                value=quick["start_pull"], minimum=0, label="Pull toward the start",
                elem_id="start-pull",
                info="How strongly each step pulls the prefix back toward its starting text, "
                     "which names no training topic (0 = off; e.g. 0.1)")
            average_last = gr.Number(
                value=quick["average_last"], precision=0, minimum=1,
                label="Average last evaluations", elem_id="average-last",
                info="Keep the mean prefix of the last N evaluations up to the kept one, "
                     "steadier than any one of them (1 = off)")
            prefix_dropout = gr.Slider(
                0, 0.9, step=0.05, value=quick["prefix_dropout"], label="Prefix dropout",
                elem_id="prefix-dropout",
                info="Share of the prefix hidden at random in each training step; "
                     "scoring reads it all (0 = off)")
        with gr.Row():
            try_learning_rates = gr.Textbox(
                value=quick["try_learning_rates"], label="Also try learning rates",
                elem_id="try-learning-rates", placeholder="e.g. 0.01", max_lines=1, scale=1,
                info="Train once more at each (comma-separated), sharing the time budget, "
                     "and keep the rate that scores best on validation (empty = off)")
            shift_file = gr.File(label="Shift CSV (optional)", elem_id="shift-csv",
                                 file_types=[".csv", ".tsv", ".txt"], height=140, scale=2)
            gr.Markdown("A labeled CSV from other topics or sources, with the training file's "
                        "columns and labels. The final report scores the prefix on it beside "
                        "validation and warns when the two differ by more than 0.10; it "
                        "chooses nothing.", elem_id="shift-csv-note")
        task = gr.Textbox(label="Task description (optional, starts the prefix)", max_lines=1,
                          placeholder="e.g. Is this tweet hateful, offensive or neither")
    settings = [prefix_length, init, reparameterize, learning_rate, epochs, batch_size,
                max_length, validation_share, seed, max_train, max_eval, patience, max_minutes,
                class_balance, decision, precision, validation_split, start_pull, average_last,
                prefix_dropout, try_learning_rates]  # SETTING_NAMES' order
    size = gr.Markdown(elem_id="prefix-size")
    ready = gr.Markdown(elem_id="start-check")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start",
                          interactive=False)
        cancel = gr.Button("Cancel", elem_id="cancel", interactive=False)
    compare_tab.build(workbench, dataset, name, settings, shift_file, notice)
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

    followed = gr.State(Followed())  # each session gets its own copy
    view = gr.State(None)  # what this browser has read of the followed run's log
    timer = gr.Timer(POLL_SECONDS, active=False)

    wire(preset.change, apply_preset, [preset], settings, notice, clears=False)
    for comp in (prefix_length, reparameterize):
        wire(comp.change, bind(show_size, workbench), settings, [size], notice, clears=False)
    for trigger in (dataset.change, max_length.change, validation_share.change,
                    max_train.change, max_eval.change, validation_split.change,
                    shift_file.change):
        wire(trigger, bind(check, workbench), [dataset, shift_file, *settings], [ready, start],
             notice, clears=False)

    poll_outputs = [view, follow, status, progress, loss_plot, eval_plot, report_md, per_class,
                    confusion, baselines, timer, cancel]
    wire(start.click, bind(on_start, workbench),
         [followed, dataset, name, task, processes, shift_file, *settings], poll_outputs,
         notice)
    wire(timer.tick, bind(on_tick, workbench), [followed, view], poll_outputs, notice,
         clears=False)
    wire(follow.input, bind(on_follow, workbench), [followed, follow], poll_outputs, notice)
    wire(cancel.click, bind(on_cancel, workbench), [followed, view], poll_outputs, notice)
    if shown_on is not None:  # the tab opened again (e.g. after Resume in Runs)
        wire(shown_on, bind(reattach, workbench), [followed, view], poll_outputs, notice,
             clears=False)

    return [LoadHook(bind(reattach, workbench), [followed, view], poll_outputs),
            LoadHook(bind(show_size, workbench), settings, [size]),
            LoadHook(bind(check, workbench), [dataset, shift_file, *settings], [ready, start])]
