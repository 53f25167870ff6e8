"""Plotly figures of the interpret modules' results, and the standalone inspection page.

Figures take the result dataclasses and pass plotly plain Python lists (never numpy arrays),
so they serialize the same everywhere. No gradio here: the UI shows these figures as they are.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from prefixlab.interpret.attention import AttentionMass
from prefixlab.interpret.change import PrefixChange, word_origin
from prefixlab.interpret.frame import KINDS
from prefixlab.interpret.maps import LayersMap, Movement, PCAMap, PrefixComparison
from prefixlab.interpret.nearest import CAVEAT, METHOD, NearestTokens
from prefixlab.interpret.values import ValueReadout

_HEIGHT = 420
_MARGIN = dict(l=50, r=20, t=50, b=40)
_CLOUD = "rgba(140, 140, 140, 0.35)"
_CLOUD_3D = "rgba(90, 90, 90, 0.55)"
_PREFIX_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def show_token(text: str) -> str:
    """A token as readable text: spaces, newlines and tabs made visible."""
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _layout(fig: go.Figure, title: str, **extra) -> go.Figure:
    settings = dict(height=_HEIGHT, margin=_MARGIN, template="plotly_white") | extra
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=14)), **settings)
    # Plain numbers on every axis: plotly's default SI suffixes turn -3e-14 into "-30f".
    fig.update_xaxes(exponentformat="power")
    fig.update_yaxes(exponentformat="power")
    return fig


def _lists(a: np.ndarray) -> list:
    return np.asarray(a, dtype=float).tolist()


# --- PCA --------------------------------------------------------------------------------------


# The run's own words in the cloud (inspection.run_words' groups): a colour and a symbol each,
# symbols that 2-D and 3-D scatters both draw, so the groups read the same in either view.
_WORD_STYLES = {"label words": ("#e08a00", "diamond"), "init text": ("#17becf", "square"),
                "data words": ("#7b4ea3", "x")}
_WORD_STYLE_OTHER = ("#555555", "cross")


def pca_figure(result: PCAMap, dims: int = 2,
               words: Mapping[str, Sequence[int]] | None = None) -> go.Figure:
    """The reference cloud (hover: token) with each prefix's P0..Pn on top.

    words: named groups of token ids (e.g. inspection.run_words: label words, init text, data
    words) marked in the cloud, one trace each with its own colour, symbol and legend entry; a
    token in several groups is marked in the first. Traces: the cloud, then one per group
    with a token in the cloud, then one per prefix.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if result.cloud.shape[1] < dims:
        raise ValueError(f"this map has {result.cloud.shape[1]} dimensions, asked for {dims}")
    scatter = go.Scatter if dims == 2 else go.Scatter3d
    axes = ("x", "y", "z")[:dims]
    ev = result.explained_variance

    def coords(x: np.ndarray) -> dict:
        return {a: _lists(x[:, i]) for i, a in enumerate(axes)}

    fig = go.Figure()
    fig.add_trace(scatter(
        **coords(result.cloud), mode="markers", name="real tokens",
        # 3-D points render smaller and paler than 2-D ones: bigger and darker to be seen.
        marker=dict(size=4 if dims == 2 else 3, color=_CLOUD if dims == 2 else _CLOUD_3D),
        hovertext=[show_token(t) for t in result.tokens], hoverinfo="text",
    ))
    row_of = {int(t): i for i, t in enumerate(result.token_ids)}
    marked: set[int] = set()
    for group, ids in (words or {}).items():
        rows = [row_of[int(t)] for t in dict.fromkeys(ids)
                if int(t) in row_of and row_of[int(t)] not in marked]
        if not rows:
            continue
        marked.update(rows)
        color, symbol = _WORD_STYLES.get(group, _WORD_STYLE_OTHER)
        fig.add_trace(scatter(
            **coords(result.cloud[rows]), mode="markers", name=group,
            marker=dict(size=8 if dims == 2 else 4, color=color, symbol=symbol,
                        line=dict(width=1, color="white") if dims == 2 else None),
            hovertext=[f"{group}: {show_token(result.tokens[r])}" for r in rows],
            hoverinfo="text",
        ))
    for i, (name, x) in enumerate(result.prefixes.items()):
        labels = [f"P{p}" for p in range(len(x))]
        fig.add_trace(scatter(
            **coords(x), mode="markers+text", name=name, text=labels,
            textposition="top center",
            marker=dict(size=9 if dims == 2 else 5, color=_PREFIX_COLORS[i % len(_PREFIX_COLORS)],
                        line=dict(width=1, color="white")),
            hovertext=[f"{name} {lab}" for lab in labels], hoverinfo="text",
        ))
    title = f"Layer {result.layer} {result.kind}s: prefix among real tokens (PCA)"
    names = [f"PC{i + 1} ({ev[i]:.0%})" for i in range(dims)]
    if dims == 2:
        return _layout(fig, title, xaxis_title=names[0], yaxis_title=names[1])
    axis = dict(exponentformat="power", showbackground=True, backgroundcolor="#f7f7f7")
    return _layout(fig, title, margin=dict(l=0, r=0, t=60, b=0),
                   legend=dict(orientation="h", y=1.0, yanchor="bottom", x=1, xanchor="right"),
                   scene=dict(xaxis=dict(title=names[0], **axis),
                              yaxis=dict(title=names[1], **axis),
                              zaxis=dict(title=names[2], **axis),
                              aspectmode="cube", camera=dict(eye=dict(x=1.5, y=1.5, z=1.1))))


def layers_figure(result: LayersMap, columns: int = 6) -> go.Figure:
    """Small multiples, one panel per layer (its own PCA, in units of the token cloud):
    a sample of real tokens in grey and the prefix positions P0..Pn.

    Drawn on one pair of axes, each layer's points fitted into its own cell of a grid, as two
    traces: thirty subplots (60 traces, 60 axes) are too slow for the browser to redraw at
    every key/value switch.
    """
    L, P, _ = result.coords.shape
    cols = min(columns, L)
    rows = -(-L // cols)
    gap = 0.25  # between cells, in cell widths
    cloud_x, cloud_y, cloud_text = [], [], []
    pre_x, pre_y, pre_text, pre_pos = [], [], [], []
    shapes, titles = [], []
    for layer in range(L):
        row, col = divmod(layer, cols)
        x0, y0 = col * (1 + gap), -row * (1 + gap)
        both = np.concatenate([result.cloud[layer], result.coords[layer]])
        low, high = both.min(0), both.max(0)
        span = float(max(high - low)) or 1.0
        mid = (low + high) / 2

        def place(xy: np.ndarray, x0=x0, y0=y0, mid=mid, span=span) -> np.ndarray:
            # same scale on both axes: a panel keeps its PCA's proportions
            return (xy - mid) / span * 0.92 + np.array([x0 + 0.5, y0 + 0.5])

        cloud, xy = place(result.cloud[layer]), place(result.coords[layer])
        cloud_x += _lists(cloud[:, 0])
        cloud_y += _lists(cloud[:, 1])
        cloud_text += [f"{show_token(t)} · layer {layer}" for t in result.tokens]
        pre_x += _lists(xy[:, 0])
        pre_y += _lists(xy[:, 1])
        pre_text += [f"P{p} · layer {layer}" for p in range(P)]
        pre_pos += list(range(P))
        shapes.append(dict(type="rect", x0=x0, x1=x0 + 1, y0=y0, y1=y0 + 1,
                           line=dict(color="rgba(0,0,0,0.15)", width=1), layer="below"))
        titles.append(dict(x=x0 + 0.5, y=y0 + 1, yanchor="bottom", text=f"layer {layer}",
                           showarrow=False, font=dict(size=10)))
    fig = go.Figure([
        go.Scatter(x=cloud_x, y=cloud_y, mode="markers", showlegend=False, hoverinfo="text",
                   hovertext=cloud_text, marker=dict(size=3, color=_CLOUD)),
        go.Scatter(x=pre_x, y=pre_y, mode="markers", showlegend=False, hoverinfo="text",
                   hovertext=pre_text,
                   marker=dict(size=6, color=pre_pos, colorscale="Turbo", cmin=0,
                               cmax=max(P - 1, 1))),
    ])
    hidden = dict(visible=False, fixedrange=True)
    fig.update_layout(shapes=shapes, annotations=titles,
                      xaxis=dict(range=[-0.05, cols * (1 + gap) - gap + 0.05], **hidden),
                      yaxis=dict(range=[-(rows - 1) * (1 + gap) - 0.05, 1.2], **hidden))
    return _layout(fig, f"Prefix {result.kind}s at every layer (per-layer PCA, axes in std of "
                        f"real tokens; colour = position P0→P{P - 1})",
                   height=max(_HEIGHT, 120 * rows + 100))


# --- nearest tokens and value readout ---------------------------------------------------------


def nearest_tokens_figure(result: NearestTokens, kind: str = "key") -> go.Figure:
    """Layers x positions: top-1 score above the random baseline, top-1 token written in."""
    i = KINDS.index(kind)
    L, _, P, k = result.token_ids.shape
    margin = result.margin[:, i]  # (L, P)
    text, hover = [], []
    for layer in range(L):
        text.append([show_token(result.labels[int(result.token_ids[layer, i, p, 0])])
                     for p in range(P)])
        hover.append([
            "<br>".join([f"layer {layer} · P{p} · among {result.ranked_among[layer, p]}",
                         f"random baseline {result.baseline[layer, i, p]:.2f}"]
                        + [f"{show_token(t)}: {s:.2f}" for t, _, s in
                           result.top(layer, kind, p)[:5]])
            for p in range(P)])
    fig = go.Figure(go.Heatmap(
        z=_lists(margin), x=[f"P{p}" for p in range(P)], y=list(range(L)), text=text,
        texttemplate="%{text}", hovertext=hover, hoverinfo="text", colorscale="RdBu",
        zmid=0, colorbar=dict(title="score −<br>baseline", thickness=10),
    ))
    return _layout(fig, f"Nearest real token per {kind} (score above random baseline)",
                   yaxis=dict(title="layer", dtick=1 if L <= 30 else None),
                   height=max(_HEIGHT, 18 * L + 120))


SHORT_ORIGIN = {"start word": "start", "label word": "label", "data word": "data", "new": "new"}


def nearest_tokens_table(result: NearestTokens, layer: int, kind: str = "key",
                         words: Mapping[str, Sequence[int]] | None = None,
                         ) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (one per position) for a table of one layer's nearest tokens; with
    `words` (a run's word groups) each token says where it comes from: start, label, data
    word, or new."""
    i = KINDS.index(kind)
    k = result.token_ids.shape[-1]

    def cell(text: str, token: int, score: float) -> str:
        if words is None:
            return f"{show_token(text)} ({score:.2f})"
        tags = "+".join(SHORT_ORIGIN[o] for o in word_origin(token, words))
        return f"{show_token(text)} ({score:.2f} · {tags})"

    # "slot", not "position": a narrow first column must not break its header mid-word
    headers = ["slot", *[f"#{j + 1}" for j in range(k)], "random baseline", "among"]
    rows = []
    for p in range(result.token_ids.shape[2]):
        rows.append([f"P{p}", *[cell(t, tid, s) for t, tid, s in result.top(layer, kind, p)],
                     f"{result.baseline[layer, i, p]:.2f} ± {result.baseline_std[layer, i, p]:.2f}",
                     str(result.ranked_among[layer, p])])
    return headers, rows


def value_readout_table(result: ValueReadout, layer: int) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (one per position) of the tokens each value promotes at one layer."""
    k = result.token_ids.shape[-1]
    headers = ["slot", *[f"#{j + 1}" for j in range(k)]]
    rows = [[f"P{p}", *[f"{show_token(result.labels[int(t)])} ({g:.1f})" for t, g in
                        zip(result.token_ids[layer, p], result.logits[layer, p], strict=True)]]
            for p in range(result.token_ids.shape[1])]
    return headers, rows


def change_readout_table(change: PrefixChange, layer: int, top: int = 3
                         ) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (one per slot): how far the slot's value moved from its start and the
    tokens that change promotes and demotes at one layer; "unchanged" where it never moved
    (the keys' movement is in movement_figure and change.json)."""
    headers = ["slot", "value moved", "pushed up by training", "pushed down"]

    def listed(ranked: list[tuple[int, float]]) -> str:
        return ", ".join(f"{show_token(change.labels.get(t, str(t)))} ({g:+.2f})"
                         for t, g in ranked[:top]) or "unchanged"

    rows = []
    for p, (up, down) in enumerate(zip(change.up[layer], change.down[layer], strict=True)):
        value = change.movement[layer, 1, p]
        rows.append([f"P{p}", f"{value:.1%}" if change.relative else f"{value:.3g}",
                     listed(up), listed(down)])
    return headers, rows


# --- movement ---------------------------------------------------------------------------------


def trajectory_figure(result: Movement) -> go.Figure:
    """The whole prefix per snapshot in 2-D PCA, in step order: 1 trace.

    Two snapshots span one direction only (PC2 explains nothing), so they are drawn on a
    line: the distance travelled along PC1, with no second axis to misread."""
    xy = result.trajectory
    ev = result.explained_variance
    two = len(result.steps) < 3
    fig = go.Figure(go.Scatter(
        x=_lists(xy[:, 0]), y=[0.0] * len(result.steps) if two else _lists(xy[:, 1]),
        mode="lines+markers+text",
        text=[f"step {s}" if two else str(s) for s in result.steps],
        textposition="top center",
        marker=dict(size=10, color=list(range(len(result.steps))), colorscale="Viridis"),
        hovertext=[f"step {s}" for s in result.steps], hoverinfo="text", name="prefix",
    ))
    if two:
        return _layout(fig, f"How the prefix moved: {len(result.steps)} snapshots, one "
                            "direction (PCA)",
                       xaxis_title="position along PC1 (the only direction)",
                       yaxis=dict(visible=False, range=[-1, 1]), height=260)
    return _layout(fig, "How the prefix moved (PCA of snapshots, labeled by step)",
                   xaxis_title=f"PC1 ({ev[0]:.0%})", yaxis_title=f"PC2 ({ev[1]:.0%})")


def distance_figure(result: Movement) -> go.Figure:
    """Distance from the initialization per layer over steps, keys | values: 2L traces."""
    L = result.distance.shape[1]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("keys", "values"), shared_yaxes=True)
    colors = sample_colorscale("Viridis", [layer / max(L - 1, 1) for layer in range(L)])
    for i in range(2):
        for layer in range(L):
            fig.add_trace(go.Scatter(
                x=result.steps, y=_lists(result.distance[:, layer, i]), mode="lines",
                name=f"layer {layer}", legendgroup=f"layer {layer}", showlegend=i == 0,
                line=dict(width=1.5, color=colors[layer]),
                hovertemplate=f"layer {layer}<br>step %{{x}}: %{{y:.3f}}<extra></extra>",
            ), row=1, col=i + 1)
    what = "relative distance ‖kv − kv₀‖ / ‖kv₀‖" if result.relative else "distance ‖kv − kv₀‖"
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text=what, row=1, col=1)
    return _layout(fig, "Distance from the initialization per layer (dark = first layers)",
                   showlegend=L <= 12)


# --- attention and comparison -----------------------------------------------------------------


def attention_heatmap(result: AttentionMass) -> go.Figure:
    """Layer x head attention mass on the prefix, one panel per prefix: R traces, plus a
    difference panel (first minus second) when there are exactly two."""
    R, L, H = result.mass.shape
    panels = [(name, result.mass[r], "Viridis", 0.0, 1.0) for r, name in enumerate(result.names)]
    if R == 2:
        diff = result.mass[0] - result.mass[1]
        top = max(float(np.abs(diff).max()), 0.01)  # symmetric, scaled to what changed
        panels.append((f"{result.names[0]} − {result.names[1]}", diff, "RdBu", -top, top))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                        shared_yaxes=True, horizontal_spacing=0.06)
    for col, (name, z, scale, low, high) in enumerate(panels, start=1):
        last_share = col == R  # one colour bar for the shares, one for the difference
        fig.add_trace(go.Heatmap(
            z=_lists(z), x=list(range(H)), y=list(range(L)), zmin=low, zmax=high,
            colorscale=scale, showscale=last_share or col == R + 1,
            colorbar=dict(thickness=8, x=1.0 + 0.06 * (col - R), title="on prefix"
                          if col <= R else "Δ"),
            hovertemplate=f"{name}<br>layer %{{y}}, head %{{x}}: %{{z:.2f}}<extra></extra>",
        ), row=1, col=col)
    fig.update_xaxes(title_text="head")
    fig.update_yaxes(title_text="layer", row=1, col=1)
    n = len(result.texts)
    return _layout(fig, f"Attention on the prefix (mean over {n} text{'s' * (n != 1)} and "
                        f"their tokens)", height=max(_HEIGHT, 14 * L + 140))


def similarity_heatmap(result: PrefixComparison, layer: int | None = None) -> go.Figure:
    """Cosine similarity between prefixes at one layer, or averaged over layers: 1 trace."""
    sim = result.similarity.mean(axis=0) if layer is None else result.similarity[layer]
    where = "mean over layers" if layer is None else f"layer {layer}"
    fig = go.Figure(go.Heatmap(
        z=_lists(sim), x=result.names, y=result.names, zmin=-1, zmax=1, colorscale="RdBu",
        text=[[f"{v:.2f}" for v in row] for row in sim.tolist()], texttemplate="%{text}",
        hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
    ))
    return _layout(fig, f"Prefix similarity ({where})")


# --- the standalone page ----------------------------------------------------------------------


def _table_html(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.caveat { background: #fff8e1; border-left: 4px solid #f0b400; padding: .6rem 1rem; }
table { border-collapse: collapse; font-size: .8rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 2px 6px; white-space: nowrap; }
th { background: #f4f4f4; } details { margin: .3rem 0; }
"""


def _markdown_html(text: str) -> str:
    """The summary's light markdown as HTML: paragraphs, "- " items, **bold**, *it*, `code`."""
    import re

    def inline(line: str) -> str:
        line = html.escape(line, quote=False)
        line = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", line)
        line = re.sub(r"`(.+?)`", r"<code>\1</code>", line)
        return re.sub(r"\*(.+?)\*", r"<i>\1</i>", line)

    out = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        items = [ln[2:] for ln in lines if ln.startswith("- ")]
        head = [ln for ln in lines if not ln.startswith("- ")]
        if head:
            out.append(f"<p>{inline(' '.join(head))}</p>")
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
    return "".join(out)


def inspection_html(
    *,
    title: str,
    model: str,
    nearest: NearestTokens,
    readout: ValueReadout,
    maps: Mapping[str, PCAMap],
    layers: Mapping[str, LayersMap],
    movement: Movement | None,
    attention: AttentionMass | None,
    summary: str = "",
    glossary: Sequence[tuple[str, str]] = (),
    extra: Sequence[tuple[str, go.Figure]] = (),
    words: Mapping[str, Sequence[int]] | None = None,
    change: PrefixChange | None = None,
) -> str:
    """One self-contained HTML page (plotly.js inlined once): works offline.

    words: the run's own token groups, marked in the PCA maps (see pca_figure) and in the
    nearest-token tables; change: the prefix's change from its start, tabled per layer.

    summary (light markdown: **bold**, *italic*, `code`, "- " items) and the glossary come
    first; `extra` figures (the knockout) come before the maps; the method is folded.
    """
    figures: list[tuple[str, go.Figure]] = list(extra)
    for kind in KINDS:
        figures.append((f"Nearest tokens: {kind}s", nearest_tokens_figure(nearest, kind)))
    for kind, m in maps.items():
        figures.append((f"PCA map of layer {m.layer} {kind}s", pca_figure(m, 2, words)))
    for kind, lm in layers.items():
        figures.append((f"{kind.capitalize()}s across layers", layers_figure(lm)))
    if movement is not None:
        figures.append(("Trajectory", trajectory_figure(movement)))
        figures.append(("Distance from the initialization", distance_figure(movement)))
    if attention is not None:
        figures.append(("Attention on the prefix", attention_heatmap(attention)))
    title = html.escape(title)
    parts = [f"<h1>{title}</h1>", f"<p>Base model: <code>{html.escape(model)}</code></p>"]
    if summary:
        parts.append(f"<h2>Summary</h2>{_markdown_html(summary)}")
    if glossary:
        items = "".join(f"<li><b>{html.escape(t)}</b>: {html.escape(m)}</li>" for t, m in glossary)
        parts.append(f"<details><summary>Glossary</summary><ul>{items}</ul></details>")

    first = True
    for heading, fig in figures:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first,
                                 config={"displaylogo": False}))
        first = False
    parts.append(f"<details><summary>Method and caveat</summary>"
                 f"<p class='caveat'>{html.escape(CAVEAT)}</p>"
                 f"<p><small>{html.escape(METHOD)}</small></p></details>")
    if movement is None:
        parts.append("<p>No snapshots were saved, so there is no movement to show.</p>")
    if attention is None:
        parts.append("<p>No texts were available to measure attention on the prefix.</p>")
    parts.append("<h2>Tables per layer</h2>")
    L = nearest.token_ids.shape[0]
    for layer in range(L):
        inner = []
        for kind in KINDS:
            inner.append(f"<h3>{kind}s: nearest real tokens</h3>")
            inner.append(_table_html(*nearest_tokens_table(nearest, layer, kind, words)))
        inner.append("<h3>values: tokens promoted through out_proj and the LM head</h3>")
        inner.append(_table_html(*value_readout_table(readout, layer)))
        if change is not None:
            inner.append("<h3>change from the start: tokens training pushed up and down</h3>")
            inner.append(_table_html(*change_readout_table(change, layer)))
        parts.append(f"<details><summary>layer {layer}</summary>{''.join(inner)}</details>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")
