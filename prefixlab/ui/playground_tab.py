"""Playground: label probabilities for typed texts under several prefixes side by side with
the bare model, which prefix says what for one text, free generation with or without a
prefix, outputs of several generation runs side by side (each beside the bare model on its
prompt), what a prefix does to one decision (Explain: probabilities under the prefix, its
start and the bare model, and the words each decision leans on), and batch prediction (or
generation) of a CSV. All selected classification prefixes
share mixed batches (one forward for every run); the base model is never reloaded."""

from __future__ import annotations

import gradio as gr
import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from prefixlab.runs.explanation import SOURCE_NAMES
from prefixlab.ui.common import (
    LoadHook,
    LongAction,
    Stopped,
    bind,
    escape,
    progress_of,
    run_choices,
    shown,
    stop_action,
    wire,
)
from prefixlab.workbench import Workbench
from prefixlab.workbench.explaining import METHOD, Explanation, probability_rows
from prefixlab.workbench.serving import BatchPrediction

NO_PREFIX = "(no prefix: the bare model)"
PALETTE = qualitative.Plotly


CHART_TEXTS = 8  # panels drawn; more texts stay in the table


def probability_figure(frame) -> go.Figure | None:
    """One panel per text (the first CHART_TEXTS): each source's probability per label."""
    if frame is None or frame.empty:
        return None
    texts = list(dict.fromkeys(frame["text"]))
    shown_texts = texts[:CHART_TEXTS]
    labels = [c for c in frame.columns if c.startswith("p(")]
    sources = list(dict.fromkeys(frame["source"]))
    fig = make_subplots(rows=len(shown_texts), cols=1, shared_xaxes=True,
                        vertical_spacing=0.35 / max(len(shown_texts), 1),
                        subplot_titles=[t if len(t) <= 90 else t[:89] + "…"
                                        for t in shown_texts])
    for row, text in enumerate(shown_texts, start=1):
        part = frame[frame["text"] == text]
        for i, source in enumerate(sources):
            hit = part[part["source"] == source]
            if hit.empty:
                continue
            values = [float(hit.iloc[0][c]) if hit.iloc[0][c] == hit.iloc[0][c] else 0.0
                      for c in labels]
            fig.add_trace(go.Bar(name=source, x=[c[2:-1] for c in labels], y=values,
                                 legendgroup=source, showlegend=row == 1,
                                 marker_color=PALETTE[i % len(PALETTE)]), row=row, col=1)
    fig.update_yaxes(range=[0, 1], title_text="p")
    fig.update_annotations(font_size=12)
    more = f" (first {CHART_TEXTS} of {len(texts)} texts)" if len(texts) > CHART_TEXTS else ""
    fig.update_layout(barmode="group", height=150 + 170 * len(shown_texts),
                      title={"text": f"Label probabilities per text{more}", "x": 0.01},
                      template="plotly_white", margin={"l": 50, "r": 10, "t": 60, "b": 80},
                      legend={"orientation": "h", "yref": "container", "y": 0.0,
                              "yanchor": "bottom", "x": 0})
    return fig


def batch_summary(result: BatchPrediction) -> str:
    """What a person should know about a predicted file: metrics if it had labels, and why
    some cells start with '."""
    lines = [f"Predicted **{result.rows} rows** → `{escape(result.path.name)}`."]
    report = result.report
    if report:
        lines.append(f"The file has gold labels in **{escape(result.label_column)}**: "
                     f"macro-F1 **{report['macro_f1']:.3f}**, accuracy "
                     f"**{report['accuracy']:.3f}** on {report['n']} rows"
                     + (f" ({result.skipped} rows without a label the run knows are left out)."
                        if result.skipped else "."))
    for run, rep in result.reports.items():  # several runs: each run's own metrics
        lines.append(f"- **{escape(run)}**: macro-F1 **{rep['macro_f1']:.3f}**, accuracy "
                     f"**{rep['accuracy']:.3f}** on {rep['n']} rows")
    if len(result.reports) > 1:
        lines[1] = (f"The file has gold labels in **{escape(result.label_column)}**; "
                    "each run against them:")
    elif result.label_column and not report:
        lines.append(f"Column **{escape(result.label_column)}** has no label this run knows: "
                     "no metrics.")
    if result.neutralized:
        lines.append(f"{result.neutralized} cells start with `=`, `+`, `-` or `@`; they are "
                     "written with a leading `'` so that Excel, LibreOffice or Sheets show them "
                     "as text instead of running them as formulas. Remove the `'` if you read "
                     "the file with a program, not a spreadsheet.")
    return "\n\n".join(lines)


SUPPORT, AGAINST = (22, 163, 74), (220, 38, 38)  # green, red: toward or against a decision


def _shade(effect: float, scale: float) -> str:
    """A word's background: green when it supports the decision, red when against, as
    strong as its share of the largest effect shown."""
    r, g, b = SUPPORT if effect >= 0 else AGAINST
    alpha = min(1.0, abs(effect) / scale) * 0.75 if scale > 0 else 0.0
    return f"rgba({r},{g},{b},{alpha:.2f})"


def explanation_html(ex: Explanation) -> str:
    """The text once per reading that left words out, each word shaded by how much its
    presence moves that reading's decision; a legend with the scale; the method."""
    scale = max([float(np.abs(ex.effect(s)).max()) for s in ex.left_out if ex.spans] + [0.0])
    lines = []
    for source in ex.left_out:
        d = ex.decision(source)
        effects = ex.effect(source)
        parts, at = [], 0
        for (start, end), e in zip(ex.spans, effects, strict=True):
            parts.append(escape(ex.text[at:start]))
            parts.append(f'<span class="explain-word" style="background:{_shade(e, scale)};'
                         f'padding:1px 3px;border-radius:3px" '
                         f'title="{e:+.3f}">{escape(ex.text[start:end])}</span>')
            at = end
        parts.append(escape(ex.text[at:]))
        lines.append(f'<div class="explain-line" style="margin-bottom:12px">'
                     f'<div class="explain-head">'
                     f'{escape(SOURCE_NAMES.get(source, source))} decides '
                     f'<b>{escape(ex.labels[d])}</b> (p {ex.probs[source][d]:.2f})</div>'
                     f'<div class="explain-text" style="line-height:2;font-size:1.05em">'
                     f'{"".join(parts)}</div></div>')
    if not ex.spans:
        lines.append("<p>The text has no words to leave out.</p>")
    legend = (f'<div class="explain-legend" style="margin:4px 0 8px">'
              f'<span style="background:{_shade(-1, 1)}">'
              f'&nbsp;argues against&nbsp;</span> <span style="background:{_shade(0.35, 1)}">'
              f'&nbsp;weak&nbsp;</span> <span style="background:{_shade(1, 1)}">&nbsp;supports'
              f' the decision&nbsp;</span> full colour: the probability of the decided label '
              f'moves by {scale:.3f} without the word (hover a word for its value)</div>')
    method = METHOD.replace("**Leave one word out**", "<b>Leave one word out</b>")
    return (f'<div id="explain-view">{"".join(lines)}{legend}'
            f'<p class="explain-method" style="font-size:0.9em">{method}</p></div>')


def _lines(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").splitlines() if t.strip()]


# --- handlers: values in, values out; build() below wires them -----------------------------


def refresh_choices(workbench: Workbench):
    """The run pickers, in build()'s order: the classification runs to score with, the prefix
    to generate with (or none), batch prediction, which-says-what, and the generation runs.
    Only usable runs are offered: completed ones, and cancelled ones whose prefix was kept."""
    usable = workbench.usable_runs()
    writing = {r.id for r in usable if workbench.is_generation(r.id)}
    choices = run_choices(usable)
    classifying = run_choices([r for r in usable if r.id not in writing])
    generating = run_choices([r for r in usable if r.id in writing])
    return (gr.update(choices=classifying), gr.update(choices=[NO_PREFIX, *choices]),
            gr.update(choices=choices), gr.update(choices=classifying),
            gr.update(choices=generating))


def on_score(workbench: Workbench, text: str | None, ids: list[str] | None, with_bare: bool):
    """Each text's label probabilities under each prefix (and the bare model): table, chart."""
    lines = _lines(text)
    if not lines:
        raise gr.Error("Type at least one text.")
    if not ids:
        raise gr.Error("Pick at least one trained prefix (train one in the Train tab).")
    frame = workbench.compare(lines, list(ids), bare=with_bare).drop(columns="run_id")
    return shown(frame), shown(probability_figure(frame))


def on_says_what(workbench: Workbench, text: str | None, ids: list[str] | None, n: int):
    """Each prefix's label and continuation of one text (no pick: every classification run)."""
    if not (text or "").strip():
        raise gr.Error("Type a text.")
    ids = list(ids or []) or [r.id for r in workbench.usable_runs()
                              if not workbench.is_generation(r.id)]
    if not ids:
        raise gr.Error("No trained prefix yet: train one in the Train tab.")
    return shown(workbench.says_what(text.strip(), ids, int(n)).drop(columns="id"))


def refresh_explain_choices(workbench: Workbench):
    """The runs Explain offers: completed classification runs."""
    usable = [r for r in workbench.usable_runs() if not workbench.is_generation(r.id)]
    return gr.update(choices=run_choices(usable))


def on_explain(workbench: Workbench, text: str | None, rid: str | None):
    """One text under the prefix, its start and the bare model (table), and the words each
    decision leans on (HTML)."""
    if not (text or "").strip():
        raise gr.Error("Type a text to explain.")
    if not rid:
        raise gr.Error("Pick a trained classification run.")
    ex = workbench.explain(rid, text.strip())
    return shown(probability_rows(ex)), gr.update(value=explanation_html(ex), visible=True)


def on_generate(workbench: Workbench, text: str | None, rid: str | None, n: int,
                do_sample: bool, temp: float, raw: bool = False) -> str:
    """One continuation: a generation run writes the prompt into its template (as "side by
    side" does) unless `raw`; a classification prefix or the bare model continues it."""
    if not (text or "").strip():
        raise gr.Error("Type a prompt.")
    run = None if rid in (None, "", NO_PREFIX) else rid
    return workbench.generate(text, run, int(n), do_sample, float(temp), raw=bool(raw))


def on_generate_side_by_side(workbench: Workbench, text: str | None, ids: list[str] | None,
                             n_beams: int, n_new: int, with_bare: bool):
    lines = _lines(text)
    if not lines:
        raise gr.Error("Type at least one input.")
    if not ids:
        raise gr.Error("Pick at least one generation run (train one on a CSV with a "
                       "target column).")
    return shown(workbench.generate_side_by_side(lines, list(ids), bare=with_bare,
                                                 max_new_tokens=int(n_new),
                                                 num_beams=int(n_beams)))


def on_batch(workbench: Workbench, path: str | None, ids: list[str] | str | None,
             action: LongAction | None = None,
             progress=gr.Progress()):  # noqa: B008 (gradio injects it)
    """The predicted CSV to download, and what to know about it (or where Stop stopped it).
    Progress shows rows done of rows, the time so far and an estimate of the time left;
    `action` is this page's, which its Stop button can stop."""
    if not path:
        raise gr.Error("Upload a CSV with a text column.")
    if not ids:
        raise gr.Error("Pick at least one prefix.")
    action = action or LongAction()
    action.begin()
    try:
        result = workbench.predict_csv([ids] if isinstance(ids, str) else list(ids), path,
                                       progress=progress_of(action, progress))
    except Stopped as e:
        return None, f"**{escape(e)}** Nothing was written."
    finally:
        action.end()
    return str(result.path), batch_summary(result)


# --- the page ------------------------------------------------------------------------------


def build(workbench: Workbench, notice) -> list[LoadHook]:
    gr.Markdown("### Classify")
    with gr.Row():
        texts = gr.Textbox(label="Texts, one per line", lines=4, elem_id="play-text", scale=3)
        with gr.Column(scale=2):
            prefixes = gr.Dropdown(label="Prefixes (trained runs)", choices=[],
                                   multiselect=True, elem_id="play-prefixes")
            bare = gr.Checkbox(value=True, label="Also show the bare model (zero-shot)")
            score = gr.Button("Score", variant="primary", elem_id="play-score")
    # The text and the source get fixed shares (they wrap); the predicted label and each
    # p(label) take their header's width, so six labels' probabilities fit beside them.
    results = gr.Dataframe(label="Predictions", interactive=False, wrap=True,
                           elem_id="play-results", visible=False, max_chars=80,
                           elem_classes=["readable-table"], column_widths=["22%", "14%"])
    chart = gr.Plot(show_label=False, elem_id="play-chart", visible=False)

    gr.Markdown("### Which prefix says what")
    with gr.Row():
        what_text = gr.Textbox(label="One text", lines=2, elem_id="what-text", scale=3)
        with gr.Column(scale=2):
            what_runs = gr.Dropdown(label="Prefixes (empty: every trained run)", choices=[],
                                    multiselect=True, elem_id="what-prefixes")
            what_new = gr.Slider(1, 100, step=1, value=20, label="New tokens")
            what_go = gr.Button("Ask every prefix", elem_id="what-run")
    what_out = gr.Dataframe(label="Each prefix's label and continuation", interactive=False,
                            wrap=True, elem_id="what-results", visible=False,
                            elem_classes=["readable-table"])

    gr.Markdown("### Explain one decision\nThe text's label probabilities under the prefix, "
                "under its start (before training) and under the bare model, and which words "
                "the decision leans on with the prefix and without it (leave one word out).")
    with gr.Row():
        explain_text = gr.Textbox(label="One text", lines=2, elem_id="explain-text", scale=3)
        with gr.Column(scale=2):
            explain_run = gr.Dropdown(label="Prefix (a classification run)", choices=[],
                                      elem_id="explain-run")
            explain_go = gr.Button("Explain", elem_id="explain-go")
    explain_probs = gr.Dataframe(label="Label probabilities: prefix, start, bare model",
                                 interactive=False, wrap=True, elem_id="explain-probs",
                                 visible=False, elem_classes=["readable-table"])
    explain_words = gr.HTML(elem_id="explain-words", visible=False)

    gr.Markdown("### Generate")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="gen-prompt", scale=3)
        with gr.Column(scale=2):
            gen_prefix = gr.Dropdown(label="Prefix", choices=[NO_PREFIX], value=NO_PREFIX,
                                     elem_id="gen-prefix")
            max_new = gr.Slider(1, 200, step=1, value=40, label="New tokens")
            sample = gr.Checkbox(value=False, label="Sample (otherwise greedy)")
            temperature = gr.Slider(0.1, 2.0, step=0.1, value=0.8, label="Temperature")
            raw = gr.Checkbox(value=False, elem_id="gen-raw",
                              label="Raw prompt: skip a generation run's template",
                              info="A generation run reads the prompt as an input in its "
                                   "template, as side by side below; tick to continue it "
                                   "as typed.")
            gen = gr.Button("Generate", elem_id="gen-run")
    output = gr.Textbox(label="Generated", lines=4, interactive=False, elem_id="gen-output")

    gr.Markdown("### Generation runs side by side")
    with gr.Row():
        gen_inputs = gr.Textbox(label="Inputs, one per line", lines=3, scale=3,
                                elem_id="gen2-inputs",
                                placeholder="e.g. name[The Eagle], eatType[coffee shop]")
        with gr.Column(scale=2):
            gen_runs = gr.Dropdown(label="Generation runs", choices=[], multiselect=True,
                                   elem_id="gen2-runs")
            with gr.Row():
                beams = gr.Slider(1, 8, step=1, value=1, label="Beams (1 = greedy)")
                gen_max = gr.Slider(1, 200, step=1, value=64, label="Max new tokens")
            gen_bare = gr.Checkbox(value=True, label="Also show the bare model on each prompt")
            gen_go = gr.Button("Generate side by side", variant="primary", elem_id="gen2-run")
    # Fixed shares of the width: measured from the cells, the inputs and sources once took it
    # all and the outputs started off screen.
    gen_table = gr.Dataframe(label="Outputs", interactive=False, wrap=True, visible=False,
                             elem_id="gen2-results", elem_classes=["readable-table"],
                             column_widths=["30%", "16%", "54%"])

    gr.Markdown("### Batch prediction\nEach row of a CSV gets every picked run's label and "
                "probabilities (a generation run: its generated text); a column of gold labels "
                "gives each run's metrics.")
    with gr.Row():
        batch_file = gr.File(label="CSV to predict", file_types=[".csv", ".tsv", ".txt"],
                             elem_id="batch-csv", scale=2)
        with gr.Column(scale=2):
            batch_prefix = gr.Dropdown(label="Prefixes (one column group each)", choices=[],
                                       multiselect=True, elem_id="batch-prefix")
            with gr.Row():
                batch_go = gr.Button("Predict", elem_id="batch-run")
                batch_stop = gr.Button("Stop", elem_id="batch-stop", size="sm", scale=0,
                                       min_width=80)
        batch_out = gr.File(label="Predictions (CSV)", interactive=False, elem_id="batch-out",
                            scale=2)
    batch_msg = gr.Markdown(elem_id="batch-msg", elem_classes=["progress-host"])

    for trigger in (score.click, texts.submit):
        wire(trigger, bind(on_score, workbench), [texts, prefixes, bare], [results, chart],
             notice)
    for trigger in (what_go.click, what_text.submit):
        wire(trigger, bind(on_says_what, workbench), [what_text, what_runs, what_new],
             [what_out], notice)
    for trigger in (explain_go.click, explain_text.submit):
        wire(trigger, bind(on_explain, workbench), [explain_text, explain_run],
             [explain_probs, explain_words], notice)
    wire(explain_run.focus, bind(refresh_explain_choices, workbench), [], [explain_run],
         notice, clears=False)
    wire(gen.click, bind(on_generate, workbench),
         [prompt, gen_prefix, max_new, sample, temperature, raw], [output], notice)
    wire(gen_go.click, bind(on_generate_side_by_side, workbench),
         [gen_inputs, gen_runs, beams, gen_max, gen_bare], [gen_table], notice)
    # The prediction's progress shows on the line under the row; Stop ends it there.
    batch_action = gr.State(LongAction())
    wire(batch_go.click, bind(on_batch, workbench), [batch_file, batch_prefix, batch_action],
         [batch_out, batch_msg], notice, show_progress_on=[batch_msg])
    wire(batch_stop.click, stop_action, [batch_action], [], notice)
    lists = [prefixes, gen_prefix, batch_prefix, what_runs, gen_runs]
    for dd in lists:
        wire(dd.focus, bind(refresh_choices, workbench), [], lists, notice, clears=False)
    return [LoadHook(bind(refresh_choices, workbench), [], lists),
            LoadHook(bind(refresh_explain_choices, workbench), [], [explain_run])]
