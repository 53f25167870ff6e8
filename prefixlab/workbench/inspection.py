"""The inspection room: what the Inspect tab shows of a run's prefix, made once and kept.

An `Inspection` holds one prefix file's readouts (nearest tokens with their baselines, the
value readout, the prefix's start and its change from it, movement during training, the two
knockouts once measured: hidden and reset to start) and makes each view's
figure once. The room opens inspections (cached per prefix file), measures the knockout,
builds reference banks, compares prefixes, and draws every view ahead in the background once
a run opens, so that a later change of layer, vectors or map only sends a kept figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch

from prefixlab.figures import causal, plots
from prefixlab.interpret import attention, frame, knockout, maps, nearest, values
from prefixlab.interpret import bank as reference_banks
from prefixlab.interpret.summary import glossary_markdown
from prefixlab.runs.finished import Run
from prefixlab.runs.folder import RunError
from prefixlab.runs.inspection import (
    ABLATIONS,
    cached_nearest_tokens,
    load_snapshots,
    run_change,
    run_knockout,
    run_start,
    run_summary,
    run_words,
    stored_knockout_rows,
    word_ids,
)
from prefixlab.runs.registry import RunStore
from prefixlab.runs.start import Start
from prefixlab.workbench.memo import Memo

KINDS = frame.KINDS  # "key", "value": the two vectors a prefix slot holds per layer
GLOSSARY = glossary_markdown()
METHOD = (f"{nearest.CAVEAT}\n\n{nearest.METHOD}\n\n{knockout.METHOD}\n\n"
          f"{knockout.RESET_METHOD}")
READOUTS = ("learned prefix", "change from start")  # what the value readout table reads
VIEW_QUIET_S = 1.5
"""The drawing ahead waits until no one has asked for a view this long: its figures are pure
Python and would hold the interpreter lock against a person's request."""


def _table(headers_rows: tuple[list[str], list[list[str]]]) -> pd.DataFrame:
    headers, rows = headers_rows
    return pd.DataFrame(rows, columns=headers)


@dataclass
class Inspection:
    """What the Inspect tab shows for one run (the interpret modules' results), and each of
    its views' figures, made once."""

    run: Run
    bank: object  # nearest.ReferenceBank
    nearest: object  # nearest.NearestTokens
    readout: object  # values.ValueReadout
    movement: object | None  # maps.Movement, when snapshots exist
    start: Start  # the prefix before training (step-0 snapshot or recomputed), or why not
    change: object | None  # change.PrefixChange from the start (None: start unavailable)
    figures: dict = field(default_factory=dict)  # the tab's figures by view, made once each
    causal: object | None = None  # inspection.CausalReadout once the knockout is measured
    reset: object | None = None  # the same, of the reset-to-start ablation
    words: dict = field(default_factory=dict)  # inspection.run_words: groups the maps mark
    maps: dict = field(default_factory=dict)  # kind -> every layer's 3-D maps.PCAMap

    @property
    def initial_kv(self) -> torch.Tensor | None:
        return self.start.kv

    @property
    def layers(self) -> int:
        return self.nearest.token_ids.shape[0]

    def layer(self, value: float | int) -> int:
        """A layer asked for, as an index of this model's layers."""
        return min(int(value), self.layers - 1)

    def _figure(self, key: tuple, make: Callable[[], go.Figure]) -> go.Figure:
        if key not in self.figures:
            self.figures[key] = make()
        return self.figures[key]

    def _maps(self, kind: str) -> list:
        """Every layer's 3-D map of one kind, fitted in one batch once; the 2-D view is the
        first two axes of the same fit, so a change of view only draws."""
        if kind not in self.maps:
            self.maps[kind] = maps.layer_pca_maps(self.run.loaded, self.bank, self.run.kv, kind,
                                                  dims=3)
        return self.maps[kind]

    # --- the views ---------------------------------------------------------------------------

    def pca_figure(self, layer: int, kind: str, dims: int) -> go.Figure:
        """Where one layer's prefix vectors sit among the reference tokens', in 2 or 3 axes."""
        return self._figure(("pca", layer, kind, dims), lambda: plots.pca_figure(
            self._maps(kind)[layer], dims, self.words))

    def layers_figure(self, kind: str) -> go.Figure:
        return self._figure(("layers", kind), lambda: plots.layers_figure(
            maps.layers_map(self.run.loaded, self.bank, self.run.kv, kind,
                            maps=self._maps(kind))))

    def nearest_figure(self, kind: str) -> go.Figure:
        return self._figure(("nearest", kind),
                            lambda: plots.nearest_tokens_figure(self.nearest, kind))

    def nearest_table(self, layer: int, kind: str) -> pd.DataFrame:
        return _table(plots.nearest_tokens_table(self.nearest, layer, kind, self.words))

    def readout_table(self, layer: int, of: str = READOUTS[0]) -> pd.DataFrame:
        """The value readout of the learned prefix, or of its change from the start."""
        if of == READOUTS[0]:
            return _table(plots.value_readout_table(self.readout, layer))
        if self.change is None:
            return pd.DataFrame([[f"The start is unavailable: {self.start.source}."]],
                                columns=["change from start"])
        return _table(plots.change_readout_table(self.change, layer))

    def change_figure(self) -> go.Figure | None:
        """How far each slot moved from its start (None without a start or any movement)."""
        if self.change is None or not self.change.moved:
            return None
        return self._figure(("change",), lambda: causal.movement_figure(self.change))

    def movement_figures(self) -> tuple[go.Figure | None, go.Figure | None]:
        """The trajectory and the distance moved during training (None without snapshots)."""
        if self.movement is None:
            return None, None
        return plots.trajectory_figure(self.movement), plots.distance_figure(self.movement)

    def knockout_figures(self, ablation: str = "hide") -> tuple[go.Figure | None,
                                                               go.Figure | None]:
        """The knockout bars of one ablation (hidden or reset to start; the other when only it
        is measured) and the label push (None until a knockout is measured)."""
        chosen = self.reset if ablation == "reset" else self.causal
        chosen = chosen or self.causal or self.reset
        if chosen is None:
            return None, None
        return (causal.knockout_figure(chosen.knockout, chosen.attention),
                causal.label_push_figure(chosen.push) if chosen.push is not None else None)

    def attention_figure(self, texts: Sequence[str]) -> go.Figure:
        """How much attention each input pays the prefix, before training and after."""
        prefixes = {"trained": self.run.kv}
        if self.initial_kv is not None:
            prefixes = {"before training": self.initial_kv, **prefixes}
        return plots.attention_heatmap(attention.prefix_attention(self.run.loaded, prefixes,
                                                                 list(texts)))

    # --- the words ---------------------------------------------------------------------------

    def headline(self) -> str:
        """The run's name, its shape, and what the nearest tokens were ranked among."""
        ranked = self.nearest.ranked_among
        L = self.layers
        name = self.run.folder.read_config().get("name", self.run.folder.path.name)
        note = (f"**{name}**: {L} layers, {self.run.kv.shape[3]} prefix positions; layer 0 "
                f"ranked among {int(ranked[0].max())} tokens, deeper layers among shortlists "
                f"of ~{int(ranked[1:].mean()) if L > 1 else 0}.")
        if self.movement is None:
            note += " No training snapshots: movement is not available."
        return note

    def summary(self) -> str:
        return run_summary(self.run, self.nearest, self.start, self.change, self.causal,
                           self.reset, self.words)

    def knockout_note(self, seconds: float | None = None) -> str:
        measured = [(name, c) for name, c in (("hidden", self.causal),
                                              ("reset to start", self.reset)) if c is not None]
        if not measured:
            return ("Not measured yet: each slot, then each layer, is hidden (or reset to its "
                    "start) in turn and the held-out rows are scored again (~30 passes).")
        took = "" if seconds is None else f" (the last in {seconds:.0f} s)"
        parts = [f"{name} on {c.knockout.rows} of {c.held_out or c.knockout.rows} held-out "
                 f"rows, in {c.knockout.precision}" for name, c in measured]
        return f"Measured: {'; '.join(parts)}{took}."


class InspectionRoom:
    """Set up by Workbench.__init__: `store`, `_inspections`, `_banks`, `_last_view`; `open`
    comes from the runs room and `in_background` from the Workbench."""

    store: RunStore
    _inspections: Memo[tuple[str, float, int], Inspection]
    _banks: Memo[tuple, object]  # (model, the run's words)
    _last_view: float  # when anyone last asked for a view (time.monotonic), in this app
    open: Callable[[str], Run]
    in_background: Callable[..., threading.Thread]

    def inspection(self, run_id: str, top_k: int = 10) -> Inspection:
        """Nearest tokens, value readout and movement of a run's prefix; cached per prefix
        file. The reference bank is computed once per base model and kept on disk."""
        run = self.open(run_id)
        mtime = run.folder.prefix_path.stat().st_mtime
        key = (run_id, mtime, top_k)
        self._inspections.drop(lambda k: k[0] == run_id and k[1] != mtime)

        def inspect() -> Inspection:
            groups = run_words(run)
            words = word_ids(groups)
            reference = self.bank(run, words)
            nearest = cached_nearest_tokens(run, reference, top_k, words)
            readout = values.value_readout(run.loaded, run.kv, top_k)
            snapshots = load_snapshots(run.folder.path)
            movement = maps.prefix_movement(snapshots) if len(snapshots) > 1 else None
            start = run_start(run)
            return Inspection(run, reference, nearest, readout, movement, start,
                              run_change(run, start, top_k), words=groups)

        return self._inspections.get(key, inspect)

    def view(self, run_id: str) -> Inspection:
        """The inspection of a run whose view a person asks for now: the drawing ahead
        steps aside for a while, so the request has the cores."""
        self._last_view = time.monotonic()
        return self.inspection(run_id)

    def draw_ahead(self, run_id: str, first_kind: str) -> threading.Thread:
        """After a run opens, make in the background what a person may look at next: the
        other kind's figures, then every layer's 2-D map, then the 3-D ones (a switch to 3-D
        then only sends one). It yields to requests (see VIEW_QUIET_S) and runs niced."""
        ins = self.inspection(run_id)
        return self.in_background(self._draw_ahead, ins, first_kind, name="inspect-draw-ahead",
                                  nice=True)

    def _draw_ahead(self, ins: Inspection, first_kind: str) -> None:
        def make(view: Callable, *args) -> None:
            while time.monotonic() - self._last_view < VIEW_QUIET_S:
                time.sleep(0.2)
            view(*args)

        kinds = (first_kind, *[k for k in KINDS if k != first_kind])
        for kind in kinds:
            make(ins.layers_figure, kind)
            make(ins.nearest_figure, kind)
        for dims in (2, 3):
            for kind in kinds:
                for layer in range(ins.layers):
                    make(ins.pca_figure, layer, kind, dims)

    def knockout(self, run_id: str, rows: int | None, progress=None, ablation: str = "hide"):
        """The run's knockout on `rows` held-out rows (inspection.run_knockout), by hiding or
        by resetting to the start (`ablation`), kept with its inspection. rows=None: only what
        is already measured for this prefix (None if none)."""
        if ablation not in ABLATIONS:
            raise RunError(f"the ablation is one of {', '.join(ABLATIONS)}, got {ablation!r}")
        ins = self.inspection(run_id)
        attr = "causal" if ablation == "hide" else "reset"
        kept = getattr(ins, attr)
        if rows is None:
            if kept is not None:
                return kept
            rows = stored_knockout_rows(ins.run, ablation)
            if rows is None:
                return None
        if kept is None or kept.knockout.rows != rows:
            kept = run_knockout(ins.run, rows, progress=progress, ablation=ablation,
                                start=ins.start)
            setattr(ins, attr, kept)
        return kept

    def bank(self, run: Run, extra_ids: list[int] | None = None):
        """The reference bank for a run: the model's frequent tokens plus the run's own words
        (labels, init text, data words; inspection.run_words). Kept per model *and* words, so
        runs with different labels on one model never share label words."""
        if extra_ids is None:
            extra_ids = word_ids(run_words(run))
        loaded = run.loaded
        # The frequent tokens and the vocabulary's layer 0 are one per model (built once, on
        # disk); only a run's own words are read per run, into a small file of their own.
        shared = self._banks.get((loaded.name, None), lambda: reference_banks.model_bank(loaded))
        return self._banks.get((loaded.name, tuple(extra_ids)),
                               lambda: reference_banks.with_words(shared, loaded, extra_ids))

    def compare_prefixes(self, run_ids: Sequence[str], layer: int, kind: str
                         ) -> tuple[go.Figure, go.Figure]:
        """How alike several runs' prefixes are, and one joint PCA map of them at `layer`;
        only prefixes of one base model and length compare (RunError otherwise)."""
        runs = {self.store.get(i).name: self.open(i) for i in run_ids}
        shapes = {tuple(r.kv.shape) for r in runs.values()}
        models = {r.loaded.name for r in runs.values()}
        if len(shapes) > 1 or len(models) > 1:
            raise RunError("These runs differ in base model or prefix length; "
                           "only like prefixes compare.")
        prefixes = {name: r.kv for name, r in runs.items()}
        first = next(iter(runs.values()))
        layer = min(int(layer), first.kv.shape[0] - 1)
        joint = maps.pca_map(first.loaded, self.bank(first), prefixes, layer, kind, dims=2)
        return (plots.similarity_heatmap(maps.compare_prefixes(prefixes)),
                plots.pca_figure(joint, 2))
