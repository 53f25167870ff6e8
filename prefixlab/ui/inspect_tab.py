"""Inspect tab: a summary first (what training changed, what still reads as the start); what
each slot and layer does (knockout by hiding or by resetting to the start, attention sinks,
label push); where a trained prefix sits among real tokens' keys and values (PCA maps,
nearest tokens marked start / label / data word or new, with random baselines, the value
readout of the learned prefix or of its change from the start); how it moved during
training; how much attention inputs pay it; how several prefixes compare; the words that
move its decisions beside TF-IDF's; what the model says when asked to describe it; a
readable prompt (a text that decides as the prefix does) beside the start and nearest tokens.

The readouts and figures come from the workbench's inspection room, which makes each view's
figure once and draws the others ahead after a run opens; this tab only asks for them. The
run a browser has open is that browser's own (`gr.State`).
"""

from __future__ import annotations

import time

import gradio as gr

from prefixlab.runs.explanation import EXPLAIN_ROWS
from prefixlab.runs.readable import SEARCH_SECONDS
from prefixlab.ui.common import LoadHook, bind, run_choices, shown, wire
from prefixlab.workbench import Workbench
from prefixlab.workbench.explaining import (
    DESCRIBE_CAVEAT,
    beyond_start,
    descriptions_frame,
    words_frame,
)
from prefixlab.workbench.inspection import GLOSSARY, METHOD, READOUTS, Inspection
from prefixlab.workbench.readable import readings_frame

ATTENTION_TEXTS = 8  # inputs measured at once; more lines are left out
ABLATION_CHOICES = [("hide from attention", "hide"), ("reset to start", "reset")]
# The change's readout has two long columns of tokens: without widths its last one is
# scrolled out of the half-width table; the learned readout's ten short ones size themselves.
CHANGE_WIDTHS = ["11%", "13%", "38%", "38%"]


def _dims(choice: str) -> int:
    return 3 if choice == "3-D" else 2


# --- handlers: values in, values out; build() below wires them -----------------------------


def pca_pair(ins: Inspection, layer: int, kind: str, dims: str, both: bool = False):
    """Updates of the 2-D and the 3-D plot: the chosen one drawn and on stage, the other
    off stage (drawn too when `both`, else left as it is)."""
    out = []
    for d in ("2-D", "3-D"):
        stage = [] if d == dims else ["offstage"]
        if d == dims or both:
            out.append(gr.update(value=ins.pca_figure(layer, kind, _dims(d)), visible=True,
                                 elem_classes=stage))
        else:
            out.append(gr.update(elem_classes=stage))
    return tuple(out)


def layer_views(workbench: Workbench, rid: str, layer, kind: str, dims: str,
                both: bool = False, readout_of: str = READOUTS[0]):
    """The 2-D and 3-D maps, the layers map, the nearest-token heatmap, and the two tables
    of one layer (the value readout of the learned prefix or of its change: `readout_of`)."""
    ins = workbench.view(rid)
    layer = ins.layer(layer)
    return (*pca_pair(ins, layer, kind, dims, both),
            shown(ins.layers_figure(kind)),
            shown(ins.nearest_figure(kind)),
            shown(ins.nearest_table(layer, kind)),
            readout_update(ins, layer, readout_of))


def readout_update(ins: Inspection, layer: int, readout_of: str):
    """The value readout table of the learned prefix, or of its change from the start."""
    update = shown(ins.readout_table(layer, readout_of))
    return {**update, "column_widths": CHANGE_WIDTHS if readout_of != READOUTS[0] else []}


def knockout_views(ins: Inspection, ablation: str = "hide"):
    figure, push = ins.knockout_figures(ablation)
    return shown(figure), shown(push)


def open_inspection(workbench: Workbench, rid: str | None, layer, kind: str, dims: str,
                    readout_of: str = READOUTS[0]):
    """A run opened: its state for this browser, headline, summary, the layer slider, every
    view, the knockouts (when measured before), the movement and the change from the start.
    The other views are drawn ahead in the background."""
    if not rid:
        raise gr.Error("Pick a trained run.")
    ins = workbench.inspection(rid)
    for ablation in ("reset", "hide"):
        workbench.knockout(rid, None, ablation=ablation)  # shown when measured before
    layer = ins.layer(layer)
    views = layer_views(workbench, rid, layer, kind, dims, both=True, readout_of=readout_of)
    workbench.draw_ahead(rid, kind)
    trajectory, distance = ins.movement_figures()
    return (rid, ins.headline(), ins.summary(), gr.update(maximum=ins.layers - 1, value=layer),
            *views, *knockout_views(ins), ins.knockout_note(), shown(trajectory),
            shown(distance), shown(ins.change_figure()))


def on_knockout(workbench: Workbench, rid: str | None, rows, ablation: str = "hide",
                progress=gr.Progress()):  # noqa: B008 (gradio injects it)
    """Measure the knockout (hide or reset to start) on `rows` held-out rows: summary, bars,
    label push, note."""
    if not rid:
        raise gr.Error("Inspect a run first.")
    ins = workbench.inspection(rid)
    if ablation == "reset" and ins.start.kv is None:
        raise gr.Error(f"This prefix cannot be reset to its start: {ins.start.source}.")
    start = time.perf_counter()
    workbench.knockout(rid, int(rows), progress=lambda f, m: progress(f, desc=m),
                       ablation=ablation)
    return (ins.summary(), *knockout_views(ins, ablation),
            ins.knockout_note(time.perf_counter() - start))


# Each control redraws only the views it changes: resending the layers map (30 panels) and
# the nearest-token heatmap on every change of layer made the browser redraw them too.
def on_layer(workbench: Workbench, rid: str | None, layer, kind: str, dims: str,
             readout_of: str = READOUTS[0]):
    if not rid:
        return (shown(None),) * 4
    pca, pca3, _, _, table, readout = layer_views(workbench, rid, layer, kind, dims,
                                                  readout_of=readout_of)
    return pca, pca3, table, readout


def on_readout_of(workbench: Workbench, rid: str | None, layer, readout_of: str):
    """The value readout table of the learned prefix, or of its change from the start."""
    if not rid:
        return shown(None)
    ins = workbench.view(rid)
    return readout_update(ins, ins.layer(layer), readout_of)


def on_kind(workbench: Workbench, rid: str | None, layer, kind: str, dims: str):
    if not rid:
        return (shown(None),) * 5
    return layer_views(workbench, rid, layer, kind, dims)[:5]


def on_dims(workbench: Workbench, rid: str | None, layer, kind: str, dims: str):
    if not rid:
        return shown(None), shown(None)
    ins = workbench.view(rid)
    return pca_pair(ins, ins.layer(layer), kind, dims)


def on_attention(workbench: Workbench, rid: str | None, text: str | None):
    if not rid:
        raise gr.Error("Inspect a run first.")
    lines = [t.strip() for t in (text or "").splitlines() if t.strip()]
    if not lines:
        raise gr.Error("Type at least one input.")
    return shown(workbench.inspection(rid).attention_figure(lines[:ATTENTION_TEXTS]))


def on_compare(workbench: Workbench, ids: list[str] | None, layer, kind: str):
    if not ids or len(ids) < 2:
        raise gr.Error("Pick at least two runs.")
    similarity, joint = workbench.compare_prefixes(list(ids), int(layer), kind)
    return shown(similarity), shown(joint)


def on_words(workbench: Workbench, rid: str | None, rows,
             progress=gr.Progress()):  # noqa: B008 (gradio injects it)
    """The words that move the prefix's decisions over validation rows beside TF-IDF's."""
    if not rid:
        raise gr.Error("Inspect a run first.")
    if workbench.is_generation(rid):
        raise gr.Error("A generation run makes no label decisions: nothing to rank words by.")
    progress(None, desc="explaining validation rows")
    agreement = workbench.word_agreement(rid, int(rows),
                                         progress=lambda said: progress(None, desc=said))
    note = (f"Over {agreement.prefix.rows} validation rows, among {agreement.prefix.candidates} "
            f"words seen at least 3 times: the top-{len(next(iter(agreement.tfidf.values())))} "
            "lists share " + ", ".join(f"**{v:.0%}** for {k}" for k, v in
                                       agreement.overlap.items())
            + f" (two random lists would share ~{agreement.chance:.0%}).")
    return note, shown(words_frame(agreement))


def on_describe(workbench: Workbench, rid: str | None):
    """The model's greedy descriptions of the prefix per layer range, and how many name the
    task or a label."""
    if not rid:
        raise gr.Error("Inspect a run first.")
    described = workbench.describe(rid)
    named = sum(bool(d.named) for d in described)
    return (f"{named} of {len(described)} descriptions name the task or a label; "
            f"{beyond_start(described)} name one the start's description does not. "
            f"{DESCRIBE_CAVEAT}"), shown(descriptions_frame(described))


def on_readable(workbench: Workbench, rid: str | None, tokens, steps, seconds,
                progress=gr.Progress()):  # noqa: B008 (gradio injects it)
    """A text prompt that decides the training rows as the prefix does, beside the start
    text and the nearest-token text, scored on the validation rows."""
    if not rid:
        raise gr.Error("Inspect a run first.")
    if workbench.is_generation(rid):
        raise gr.Error("A generation run makes no label decisions: no prompt can match them.")
    progress(None, desc="searching a readable prompt")
    found = workbench.readable_prompt(rid, int(tokens), int(steps), float(seconds),
                                      progress=lambda said: progress(None, desc=said))
    note = (f"Searched {found.steps} steps on {found.rows['train']} training rows in "
            f"{found.seconds:.0f} s; scored on {found.rows['validation']} validation rows, "
            f"where the prefix's macro-F1 is {found.prefix_f1:.3f}. The prompt, as plain "
            f"text:\n\n```\n{found.prompt.text}\n```\n\nWritten to the run folder as "
            "readable_prompt.json.")
    return note, shown(readings_frame(found))


def refresh(workbench: Workbench):
    """The run picker and the compare list: every run with a prefix."""
    choices = run_choices(workbench.finished_runs())
    return gr.update(choices=choices), gr.update(choices=choices)


# --- the page ------------------------------------------------------------------------------


def build(workbench: Workbench, notice) -> list[LoadHook]:
    with gr.Row():
        pick = gr.Dropdown(label="Run", choices=[], elem_id="inspect-run", scale=3)
        open_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-open")
    message = gr.Markdown(elem_id="inspect-msg")
    summary = gr.Markdown(elem_id="inspect-summary")
    with gr.Accordion("Glossary: ␣, ⏎ and the terms used here", open=False):
        gr.Markdown(GLOSSARY)
    gr.Markdown("### What each part does")
    with gr.Row():
        ko_rows = gr.Slider(10, 500, value=100, step=10, label="Held-out rows", scale=3,
                            elem_id="inspect-knockout-rows")
        ablation = gr.Radio(ABLATION_CHOICES, value="hide", label="Knock out by", scale=2,
                            elem_id="inspect-ablation")
        ko_btn = gr.Button("Run the knockout", elem_id="inspect-knockout")
    ko_note = gr.Markdown(elem_id="inspect-knockout-note")
    with gr.Row():
        ko_plot = gr.Plot(show_label=False, elem_id="inspect-knockout-plot", visible=False,
                          scale=3)
        push_plot = gr.Plot(show_label=False, elem_id="inspect-push", visible=False, scale=2)
    gr.Markdown("### Where the prefix sits")
    with gr.Row():
        layer = gr.Slider(0, 1, step=1, value=0, label="Layer", elem_id="inspect-layer")
        kind = gr.Radio(["key", "value"], value="key", label="Vectors")
        dims = gr.Radio(["2-D", "3-D"], value="2-D", label="PCA map")
        readout_of = gr.Radio(list(READOUTS), value=READOUTS[0], label="Value readout of",
                              elem_id="inspect-readout-of")
    with gr.Row():
        # The 2-D and the 3-D map are two plots; the one not chosen is drawn off stage, so a
        # switch moves plots instead of building a WebGL scene in the browser.
        with gr.Column(elem_classes=["pca-stage"]):
            pca_plot = gr.Plot(show_label=False, elem_id="inspect-pca", visible=False)
            pca3_plot = gr.Plot(show_label=False, elem_id="inspect-pca3", visible=False,
                                elem_classes=["offstage"])
        layers_plot = gr.Plot(show_label=False, elem_id="inspect-layers", visible=False)
    nearest_plot = gr.Plot(show_label=False, elem_id="inspect-nearest", visible=False)
    with gr.Row():
        nearest_table = gr.Dataframe(label="Nearest tokens at this layer (score; baseline)",
                                     interactive=False, wrap=True, elem_id="inspect-table",
                                     visible=False, elem_classes=["readable-table"])
        readout_table = gr.Dataframe(label="Value readout: the tokens each value slot promotes "
                                           "(or its change from the start pushes up and down)",
                                     interactive=False, wrap=True, visible=False,
                                     elem_id="inspect-readout",
                                     elem_classes=["readable-table"])
    gr.Markdown("### How the prefix moved during training")
    with gr.Row():
        trajectory = gr.Plot(show_label=False, visible=False, elem_id="inspect-trajectory")
        distance = gr.Plot(show_label=False, visible=False)
    slot_movement = gr.Plot(show_label=False, visible=False, elem_id="inspect-slot-movement")
    gr.Markdown("### Attention to the prefix")
    with gr.Row():
        attn_texts = gr.Textbox(label="Inputs, one per line", lines=3, scale=3,
                                elem_id="inspect-attn-text")
        attn_btn = gr.Button("Measure", elem_id="inspect-attn")
    attn_plot = gr.Plot(show_label=False, visible=False)
    gr.Markdown("### Compare prefixes")
    with gr.Row():
        compare = gr.Dropdown(label="Runs (same base model and prefix length)", choices=[],
                              multiselect=True, scale=3)
        compare_btn = gr.Button("Compare")
    with gr.Row():
        similarity = gr.Plot(show_label=False, visible=False)
        joint_pca = gr.Plot(show_label=False, visible=False)
    gr.Markdown("### Words the decisions lean on\nEach validation row's words are left out "
                "one at a time under the prefix; a word's push on a label is how much its "
                "presence raises that label's probability, averaged over its rows. Beside "
                "them: the words TF-IDF's logistic regression weighs most.")
    with gr.Row():
        words_rows = gr.Slider(10, 200, value=EXPLAIN_ROWS, step=10, label="Validation rows",
                               scale=3, elem_id="inspect-words-rows")
        words_btn = gr.Button("Rank words", elem_id="inspect-words")
    words_note = gr.Markdown(elem_id="inspect-words-note")
    words_table = gr.Dataframe(label="Top words per label: prefix (push) and TF-IDF",
                               interactive=False, wrap=True, visible=False,
                               elem_id="inspect-words-table", elem_classes=["readable-table"])
    gr.Markdown("### The model describes its prefix\nThe frozen model reads the prefix, then "
                "an inspection prompt, and continues it greedily: with every layer of the "
                "prefix, with one range of layers kept (the others read the start), and with "
                "the start alone.")
    describe_btn = gr.Button("Ask the model", elem_id="inspect-describe")
    describe_note = gr.Markdown(elem_id="inspect-describe-note")
    describe_table = gr.Dataframe(label="Descriptions", interactive=False, wrap=True,
                                  visible=False, elem_id="inspect-describe-table",
                                  elem_classes=["readable-table"])
    gr.Markdown("### A readable prompt\nReal tokens searched (PEZ, projected gradients) so "
                "that, read as text before the template, they decide the training rows as the "
                "prefix does; beside them the start text and the nearest tokens of the "
                "prefix's slots, read the same way. Agreement: the share of validation rows "
                "whose label matches the prefix's.")
    with gr.Row():
        readable_tokens = gr.Slider(4, 32, value=16, step=1, label="Tokens", scale=2,
                                    elem_id="inspect-readable-tokens")
        readable_steps = gr.Slider(10, 200, value=60, step=10, label="Search steps (at most)",
                                   scale=2, elem_id="inspect-readable-steps")
        readable_seconds = gr.Slider(15, 600, value=SEARCH_SECONDS, step=15,
                                     label="Search time (s, at most)", scale=2,
                                     elem_id="inspect-readable-seconds")
        readable_btn = gr.Button("Find a readable prompt", elem_id="inspect-readable")
    readable_note = gr.Markdown(elem_id="inspect-readable-note")
    readable_table = gr.Dataframe(label="Text prompts beside the prefix", interactive=False,
                                  wrap=True, visible=False, elem_id="inspect-readable-table",
                                  elem_classes=["readable-table"])
    with gr.Accordion("Method and caveat", open=False):
        gr.Markdown(METHOD)

    current = gr.State(None)  # the run this browser has open
    wire(open_btn.click, bind(open_inspection, workbench), [pick, layer, kind, dims, readout_of],
         [current, message, summary, layer, pca_plot, pca3_plot, layers_plot, nearest_plot,
          nearest_table, readout_table, ko_plot, push_plot, ko_note, trajectory, distance,
          slot_movement], notice)
    # Progress shows on the one-line note under the button, which then says what was
    # measured, not as overlays over the summary and both figures.
    wire(ko_btn.click, bind(on_knockout, workbench), [current, ko_rows, ablation],
         [summary, ko_plot, push_plot, ko_note], notice, show_progress_on=[ko_note])
    view_inputs = [current, layer, kind, dims]
    # Typing a layer into the slider's box fires `input`, not `release`; always_last drops
    # the intermediate ticks of a drag, so only the layer let go on is drawn.
    wire(layer.input, bind(on_layer, workbench), [*view_inputs, readout_of],
         [pca_plot, pca3_plot, nearest_table, readout_table], notice, trigger_mode="always_last")
    wire(readout_of.change, bind(on_readout_of, workbench), [current, layer, readout_of],
         [readout_table], notice)
    wire(kind.change, bind(on_kind, workbench), view_inputs,
         [pca_plot, pca3_plot, layers_plot, nearest_plot, nearest_table], notice)
    wire(dims.change, bind(on_dims, workbench), view_inputs, [pca_plot, pca3_plot], notice)
    wire(attn_btn.click, bind(on_attention, workbench), [current, attn_texts], [attn_plot],
         notice)
    wire(compare_btn.click, bind(on_compare, workbench), [compare, layer, kind],
         [similarity, joint_pca], notice)
    wire(words_btn.click, bind(on_words, workbench), [current, words_rows],
         [words_note, words_table], notice, show_progress_on=[words_note])
    wire(describe_btn.click, bind(on_describe, workbench), [current],
         [describe_note, describe_table], notice, show_progress_on=[describe_note])
    wire(readable_btn.click, bind(on_readable, workbench),
         [current, readable_tokens, readable_steps, readable_seconds],
         [readable_note, readable_table], notice,
         show_progress_on=[readable_note])
    wire(pick.focus, bind(refresh, workbench), [], [pick, compare], notice, clears=False)
    return [LoadHook(bind(refresh, workbench), [], [pick, compare])]
