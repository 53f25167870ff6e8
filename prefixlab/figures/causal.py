"""Figures of the causal readouts and of the change: knockout effects (hidden or reset to
start), attention share, label push, how far each slot moved from its start.

Kept apart from plots.py (the maps and tables): these read interpret/knockout.py's and
interpret/change.py's results.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from prefixlab.figures.plots import _layout, _lists
from prefixlab.interpret.attention import AttentionMass
from prefixlab.interpret.change import PrefixChange
from prefixlab.interpret.frame import KINDS
from prefixlab.interpret.knockout import Knockout, LabelPush


def knockout_figure(result: Knockout, attention: AttentionMass | None = None) -> go.Figure:
    """Sorted bars: slots by effect, layers by effect (change in log-prob when hidden), and
    beside the layers the share of attention each layer pays the prefix: 2-3 traces."""
    cols = 3 if attention is not None else 2
    titles = ["Slots by effect", "Layers by effect"] + (
        ["Attention share on the prefix"] if attention is not None else [])
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        column_widths=[0.3, 0.4, 0.3][:cols] if cols == 3 else [0.4, 0.6])
    for col, (kind, changes) in enumerate(
            (("slot", result.slot_log_prob), ("layer", result.layer_log_prob)), start=1):
        order = np.argsort(changes, kind="stable")  # most costly first, at the top
        names = [f"P{i}" if kind == "slot" else f"layer {i}" for i in order]
        f1 = result.slot_f1 if kind == "slot" else result.layer_f1
        hover = [f"{n}: log-prob {changes[i]:+.3f}" + ("" if f1 is None else
                 f", macro-F1 {f1[i]:+.3f}") for n, i in zip(names, order, strict=True)]
        fig.add_trace(go.Bar(
            x=_lists(changes[order]), y=names, orientation="h", name=f"{kind}s",
            marker_color=["#d62728" if changes[i] < 0 else "#1f77b4" for i in order],
            hovertext=hover, hoverinfo="text", showlegend=False), row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col, type="category")
        fig.update_xaxes(title_text="Δ log-prob of the correct label", row=1, col=col)
    if attention is not None:
        share = attention.mass[-1].mean(-1)  # (L,) mean over heads, the trained prefix
        order = np.argsort(result.layer_log_prob, kind="stable")  # rows as in "layers by effect"
        fig.add_trace(go.Bar(
            x=_lists(share[order]), y=[f"layer {i}" for i in order], orientation="h",
            marker_color="#7f7f7f", showlegend=False,
            hovertemplate="%{y}: %{x:.0%} of attention on the prefix<extra></extra>"),
            row=1, col=3)
        fig.update_yaxes(autorange="reversed", row=1, col=3, type="category")
        fig.update_xaxes(title_text="share (mean over heads)", tickformat=".0%", row=1, col=3)
    rows = max(result.prefix_length, result.num_layers)
    how = "" if result.precision == "float32" else f", {result.precision}"
    what = ("Hidden from attention", "hiding") if result.ablation == "hide" else (
        "Reset to its start", "resetting")
    if result.ablation != "hide":
        for col in (1, 2):
            fig.update_xaxes(title_text="Δ log-prob when reset to start", row=1, col=col)
    return _layout(fig, f"{what[0]}, on {result.rows} held-out rows{how} (red: "
                        f"{what[1]} it hurts)", height=max(420, 16 * rows + 140))


def label_push_figure(result: LabelPush) -> go.Figure:
    """Layers x labels: which label each layer's prefix values push toward: 1 trace."""
    L, K = result.push.shape
    top = max(float(np.abs(result.push).max()), 1e-6)
    fig = go.Figure(go.Heatmap(
        z=_lists(result.push), x=result.labels, y=list(range(L)), zmin=-top, zmax=top,
        colorscale="RdBu", reversescale=True, colorbar=dict(thickness=8, title="logit"),
        hovertemplate="layer %{y} → %{x}: %{z:+.2f}<extra></extra>"))
    fig.update_yaxes(title_text="layer", autorange="reversed", dtick=1 if L <= 40 else None)
    fig.update_xaxes(title_text="label (logit of its first token, centered per layer)")
    return _layout(fig, "Label each layer's prefix values push", height=max(420, 14 * L + 140))


def movement_figure(change: PrefixChange) -> go.Figure:
    """Layers x slots, keys beside values: how far each slot moved from its start: 2 traces."""
    L, _, P = change.movement.shape
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{k}s" for k in KINDS],
                        horizontal_spacing=0.12)
    top = max(float(change.movement.max()), 1e-12)
    unit = "of its start" if change.relative else "(absolute: a slot started at zero)"
    for col, kind in enumerate(KINDS, start=1):
        fig.add_trace(go.Heatmap(
            z=_lists(change.movement[:, col - 1]), x=[f"P{p}" for p in range(P)],
            y=list(range(L)), zmin=0, zmax=top, colorscale="Viridis", showscale=col == 2,
            colorbar=dict(thickness=8, tickformat=".1%" if change.relative else None),
            hovertemplate=f"layer %{{y}} {kind} %{{x}}: moved %{{z:.1%}} {unit}<extra></extra>"
            if change.relative else
            f"layer %{{y}} {kind} %{{x}}: moved %{{z:.3g}} {unit}<extra></extra>"),
            row=1, col=col)
        fig.update_yaxes(title_text="layer" if col == 1 else None, autorange="reversed",
                         dtick=1 if L <= 40 else None, row=1, col=col)
    return _layout(fig, f"How far each slot moved from its start ({unit})",
                   height=max(380, 14 * L + 140))


__all__ = ["knockout_figure", "label_push_figure", "movement_figure"]
