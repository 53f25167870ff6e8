"""Inspect tab: a summary first; what each slot and layer does (knockout, label push); where
a trained prefix sits among real tokens' keys and values (PCA maps, nearest tokens with random
baselines, the value readout); how it moved during training; how much attention inputs pay
it; how several prefixes compare. Figures are made once per view and kept with the run's
inspection, and the maps of every layer are made in the background after a run opens, so
changing the layer or the view only shows a kept figure."""

from __future__ import annotations

import os
import threading
import time
from contextlib import suppress

import gradio as gr
import pandas as pd

from prefixlab.figures import causal, plots
from prefixlab.interpret import knockout, maps, readouts
from prefixlab.interpret.summary import glossary_markdown, summary_markdown
from prefixlab.ui.common import LoadHook, run_choices, shown, wire
from prefixlab.workbench import Workbench


def _table(headers_rows) -> pd.DataFrame:
    headers, rows = headers_rows
    return pd.DataFrame(rows, columns=headers)


def build(workbench: Workbench, notice) -> list[LoadHook]:
    with gr.Row():
        pick = gr.Dropdown(label="Run", choices=[], elem_id="inspect-run", scale=3)
        open_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-open")
    message = gr.Markdown(elem_id="inspect-msg")
    summary = gr.Markdown(elem_id="inspect-summary")
    with gr.Accordion("Glossary: ␣, ⏎ and the terms used here", open=False):
        gr.Markdown(glossary_markdown())
    gr.Markdown("### What each part does")
    with gr.Row():
        ko_rows = gr.Slider(10, 500, value=100, step=10, label="Held-out rows", scale=3,
                            elem_id="inspect-knockout-rows")
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
    with gr.Row():
        # The 2-D and the 3-D map are two plots; the one not chosen is drawn off stage, so a
        # switch moves plots instead of building a WebGL scene (~1 s without a GPU).
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
        readout_table = gr.Dataframe(label="Tokens each value slot promotes (value readout)",
                                     interactive=False, wrap=True, visible=False,
                                     elem_classes=["readable-table"])
    gr.Markdown("### How the prefix moved during training")
    with gr.Row():
        trajectory = gr.Plot(show_label=False, visible=False, elem_id="inspect-trajectory")
        distance = gr.Plot(show_label=False, visible=False)
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

    with gr.Accordion("Method and caveat", open=False):
        gr.Markdown(f"{readouts.CAVEAT}\n\n{readouts.METHOD}\n\n{knockout.METHOD}")

    current = gr.State(None)

    def figure(ins, key, make):
        """A view's figure, made once per inspection (the background warm-up fills these)."""
        if key not in ins.figures:
            ins.figures[key] = make()
        return ins.figures[key]

    def maps_of(ins, kind_s):
        """Every layer's 3-D map of one kind, fitted in one batch once per inspection; the 2-D
        view is the first two axes of the same fit, so a view change only draws."""
        if kind_s not in ins.maps:
            ins.maps[kind_s] = maps.layer_pca_maps(ins.run.loaded, ins.bank,
                                                             ins.run.kv, kind_s, dims=3)
        return ins.maps[kind_s]

    def pca_view(ins, layer_i, kind_s, dims_s):
        dims_n = 3 if dims_s == "3-D" else 2
        return figure(ins, ("pca", layer_i, kind_s, dims_n), lambda: plots.pca_figure(
            maps_of(ins, kind_s)[layer_i], dims_n, ins.words))

    def layers_view(ins, kind_s):
        return figure(ins, ("layers", kind_s), lambda: plots.layers_figure(
            maps.layers_map(ins.run.loaded, ins.bank, ins.run.kv, kind_s,
                                      maps=maps_of(ins, kind_s))))

    def nearest_view(ins, kind_s):
        return figure(ins, ("nearest", kind_s),
                      lambda: plots.nearest_tokens_figure(ins.nearest, kind_s))

    last_view = [0.0]  # when a view was last asked for (time.monotonic), in this app

    def warm_up(ins, first_kind):
        """After a run opens: the other kind's maps and figures, then every layer's 2-D map,
        so later view changes find them made. It steps aside while views are being asked
        for (its figures are pure Python and would hold the interpreter lock against the
        request), and is niced: a person's own requests come first on the shared cores.
        The 3-D maps come last (~30 ms each; a switch to 3-D then only sends one)."""
        with suppress(OSError, AttributeError):  # not every platform nices one thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)

        def make(view, *args):
            while time.monotonic() - last_view[0] < 1.5:
                time.sleep(0.2)
            view(ins, *args)

        L = ins.nearest.token_ids.shape[0]
        kinds = (first_kind, *[k for k in readouts.KINDS if k != first_kind])
        for kind_s in kinds:
            make(layers_view, kind_s)
            make(nearest_view, kind_s)
        for dims_s in ("2-D", "3-D"):
            for kind_s in kinds:
                for layer_i in range(L):
                    make(pca_view, layer_i, kind_s, dims_s)

    def pca_pair(ins, layer_i, kind_s, dims_s, both: bool = False):
        """Updates of the 2-D and the 3-D plot: the chosen one drawn and on stage, the other
        off stage (drawn too when `both`, else left as it is)."""
        out = []
        for d in ("2-D", "3-D"):
            stage = [] if d == dims_s else ["offstage"]
            if d == dims_s or both:
                out.append(gr.update(value=pca_view(ins, layer_i, kind_s, d), visible=True,
                                     elem_classes=stage))
            else:
                out.append(gr.update(elem_classes=stage))
        return tuple(out)

    def layer_views(rid, layer_i, kind_s, dims_s, both: bool = False):
        last_view[0] = time.monotonic()
        ins = workbench.inspection(rid)
        layer_i = min(int(layer_i), ins.nearest.token_ids.shape[0] - 1)
        return (*pca_pair(ins, layer_i, kind_s, dims_s, both),
                shown(layers_view(ins, kind_s)),
                shown(nearest_view(ins, kind_s)),
                shown(_table(plots.nearest_tokens_table(ins.nearest, layer_i, kind_s))),
                shown(_table(plots.value_readout_table(ins.readout, layer_i))))

    def causal_views(ins):
        if ins.causal is None:
            return shown(None), shown(None)
        return (shown(causal.knockout_figure(ins.causal.knockout, ins.causal.attention)),
                shown(causal.label_push_figure(ins.causal.push)
                      if ins.causal.push is not None else None))

    def knockout_note(ins, seconds: float | None = None) -> str:
        if ins.causal is None:
            return ("Not measured yet: each slot, then each layer, is hidden in turn and the "
                    "held-out rows are scored again (~30 passes over them).")
        k = ins.causal.knockout
        took = "" if seconds is None else f" in {seconds:.0f} s"
        return f"Measured on {k.rows} held-out rows{took}, in {k.precision}."

    def summary_text(ins):
        return summary_markdown(ins.nearest, ins.run.kv, ins.initial_kv,
                                ins.causal.knockout if ins.causal else None)

    def on_open(rid, layer_i, kind_s, dims_s):
        if not rid:
            raise gr.Error("Pick a trained run.")
        ins = workbench.inspection(rid)
        workbench.knockout(rid, None)  # shown when already measured for this prefix
        L = ins.nearest.token_ids.shape[0]
        movement = ins.movement
        note = (f"**{ins.run.folder.read_config().get('name', rid)}**: {L} layers, "
                f"{ins.run.kv.shape[3]} prefix positions; layer 0 ranked among "
                f"{int(ins.nearest.ranked_among[0].max())} tokens, deeper layers among "
                f"shortlists of ~{int(ins.nearest.ranked_among[1:].mean()) if L > 1 else 0}.")
        if movement is None:
            note += " No training snapshots: movement is not available."
        views = layer_views(rid, min(int(layer_i), L - 1), kind_s, dims_s, both=True)
        threading.Thread(target=warm_up, args=(ins, kind_s), daemon=True).start()
        return (rid, note, summary_text(ins), gr.update(maximum=L - 1, value=min(int(layer_i),
                                                                                 L - 1)),
                *views, *causal_views(ins), knockout_note(ins),
                shown(plots.trajectory_figure(movement) if movement else None),
                shown(plots.distance_figure(movement) if movement else None))

    wire(open_btn.click, on_open, [pick, layer, kind, dims],
         [current, message, summary, layer, pca_plot, pca3_plot, layers_plot, nearest_plot,
          nearest_table, readout_table, ko_plot, push_plot, ko_note, trajectory, distance], notice)

    def on_knockout(rid, rows, progress=gr.Progress()):  # noqa: B008 (gradio injects it)
        if not rid:
            raise gr.Error("Inspect a run first.")
        ins = workbench.inspection(rid)
        start = time.perf_counter()
        workbench.knockout(rid, int(rows), progress=lambda f, m: progress(f, desc=m))
        return (summary_text(ins), *causal_views(ins),
                knockout_note(ins, time.perf_counter() - start))

    # Progress shows on the one-line note under the button, which then says what was
    # measured, not as overlays over the summary and both figures.
    wire(ko_btn.click, on_knockout, [current, ko_rows], [summary, ko_plot, push_plot, ko_note],
         notice, show_progress_on=[ko_note])

    # Each control redraws only the views it changes: resending the layers map (30 panels)
    # and the nearest-token heatmap on every change of layer made the browser redraw them too.
    def on_layer(rid, layer_i, kind_s, dims_s):
        if not rid:
            return (shown(None),) * 4
        pca, pca3, _, _, table, readout = layer_views(rid, layer_i, kind_s, dims_s)
        return pca, pca3, table, readout

    def on_kind(rid, layer_i, kind_s, dims_s):
        if not rid:
            return (shown(None),) * 5
        return layer_views(rid, layer_i, kind_s, dims_s)[:5]

    def on_dims(rid, layer_i, kind_s, dims_s):
        if not rid:
            return shown(None), shown(None)
        last_view[0] = time.monotonic()
        ins = workbench.inspection(rid)
        layer_i = min(int(layer_i), ins.nearest.token_ids.shape[0] - 1)
        return pca_pair(ins, layer_i, kind_s, dims_s)

    view_inputs = [current, layer, kind, dims]
    # Typing a layer into the slider's box fires `input`, not `release`; always_last drops
    # the intermediate ticks of a drag, so only the layer let go on is drawn.
    wire(layer.input, on_layer, view_inputs, [pca_plot, pca3_plot, nearest_table, readout_table],
         notice,
         trigger_mode="always_last")
    wire(kind.change, on_kind, view_inputs,
         [pca_plot, pca3_plot, layers_plot, nearest_plot, nearest_table], notice)
    wire(dims.change, on_dims, view_inputs, [pca_plot, pca3_plot], notice)

    def on_attention(rid, text):
        if not rid:
            raise gr.Error("Inspect a run first.")
        lines = [t.strip() for t in (text or "").splitlines() if t.strip()]
        if not lines:
            raise gr.Error("Type at least one input.")
        ins = workbench.inspection(rid)
        prefixes = {"trained": ins.run.kv}
        if ins.initial_kv is not None:
            prefixes = {"before training": ins.initial_kv, **prefixes}
        return shown(plots.attention_heatmap(readouts.prefix_attention(ins.run.loaded, prefixes,
                                                                        lines[:8])))

    wire(attn_btn.click, on_attention, [current, attn_texts], [attn_plot], notice)

    def on_compare(ids, layer_i, kind_s):
        if not ids or len(ids) < 2:
            raise gr.Error("Pick at least two runs.")
        runs = {workbench.store.get(i).name: workbench.open(i) for i in ids}
        shapes = {tuple(r.kv.shape) for r in runs.values()}
        models = {r.loaded.name for r in runs.values()}
        if len(shapes) > 1 or len(models) > 1:
            raise gr.Error("These runs differ in base model or prefix length; "
                           "only like prefixes compare.")
        prefixes = {name: r.kv for name, r in runs.items()}
        first = next(iter(runs.values()))
        bank = workbench.bank(first)
        layer_i = min(int(layer_i), first.kv.shape[0] - 1)
        return (shown(plots.similarity_heatmap(maps.compare_prefixes(prefixes))),
                shown(plots.pca_figure(maps.pca_map(first.loaded, bank, prefixes, layer_i,
                                                         kind_s, dims=2), 2)))

    wire(compare_btn.click, on_compare, [compare, layer, kind], [similarity, joint_pca], notice)

    def refresh():
        choices = run_choices(workbench.finished_runs())
        return gr.update(choices=choices), gr.update(choices=choices)

    wire(pick.focus, refresh, [], [pick, compare], notice, clears=False)
    return [LoadHook(refresh, [], [pick, compare])]
