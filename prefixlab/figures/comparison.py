"""The comparison's chart: each method's score (macro-F1; BLEU for generation) against its
training time to the kept step, marker area growing with the bytes it stores per task (log
scale: they span bytes to GB); a generation comparison's bare model as a dashed line."""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go

STEPS = ((1, 2, 5), (1, 2, 3, 5, 7), tuple(range(1, 10)))
"""Tick multipliers per decade, coarse to fine."""


def _ticks(seconds: Sequence[float]) -> list[float]:
    """Ticks around the data: 1-2-5 per decade where that puts three or more near it, finer
    where the data spans little (34 to 80 s: 1-2-5 would label 50 alone), evenly spaced where
    it spans less than a step of 1-9 (0.097 to 0.124 s). Plotly's own log ticks label minor
    steps with a bare digit ("9 0.1 2 3 ... 1"), which reads as nonsense within one decade."""
    if not seconds:
        return [m * 10.0 ** e for e in range(-1, 2) for m in STEPS[0]]
    low, high = min(seconds) / 1.1, max(seconds) * 1.1
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for steps in STEPS:
        ticks = [round(m * 10.0 ** e, 12) for e in decades for m in steps]
        if sum(low <= t <= high for t in ticks) >= 3:
            return ticks
    step = _round_step((high - low) / 4)
    return [round(k * step, 12) for k in range(math.ceil(low / step),
                                               math.floor(high / step) + 1)]


def _round_step(x: float) -> float:
    """1, 2 or 5 times a power of ten, the nearest to x."""
    e = math.floor(math.log10(x))
    f = x / 10.0 ** e
    return (1 if f < 1.5 else 2 if f < 3.5 else 5 if f < 7.5 else 10) * 10.0 ** e


def comparison_figure(rows: Sequence[dict], key: str = "validation", metric: str = "macro_f1",
                      title: str = "macro-F1", bare: float | None = None) -> go.Figure:
    """`metric` (named `title`) on the `key` rows (validation or test) against seconds to the
    kept step. Scores on 0-1 (macro-F1) keep a fixed axis; 0-100 scores (BLEU) an axis to
    just above the best. `bare`: the untrained model's score, drawn as a dashed line."""
    done = [r for r in rows if "error" not in r and r.get(key)]
    sizes = [r["stored_bytes"] or 1 for r in done]
    seconds = [max(r["train_s_to_kept"], 0.01) for r in done]
    scores = [r[key][metric] for r in done]
    ticks = _ticks(seconds)
    fig = go.Figure(go.Scatter(
        x=seconds, y=scores, name="methods", showlegend=False,
        mode="markers+text", text=[r["title"] for r in done], textposition="top center",
        marker={"size": [8 + 4 * math.log10(s) for s in sizes], "opacity": 0.7},
        customdata=[[r["stored_bytes"]] for r in done],
        hovertemplate=f"%{{text}}<br>{title} %{{y:{_format(metric)}}}<br>%{{x:.1f}} s<br>"
                      "%{customdata[0]:,} bytes stored<extra></extra>",
    ))
    if metric == "macro_f1":  # room above 1.0: a best method's name sits over its marker
        y_range, y_title = [-0.05, 1.12], title
    else:
        top = max([*scores, bare or 0.0, 1.0])
        y_range, y_title = [0, min(105.0, top * 1.2 + 2)], f"{title} (0-100)"
    note = ""
    if bare is not None:
        note = "; dashed: the bare model"
        fig.add_hline(y=bare, line_dash="dash", line_color="#888",
                      annotation_text=f"bare model {bare:{_format(metric)}}",
                      annotation_position="bottom right", annotation_font_color="#555")
    fig.update_layout(title=f"{key} {title} against training time (marker: bytes stored{note})",
                      xaxis={"title": "seconds of training to the kept step", "type": "log",
                             "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]},
                      yaxis={"title": y_title, "range": y_range}, height=380,
                      margin={"t": 50})
    return fig


def _format(metric: str) -> str:
    """How a score reads: three decimals on 0-1 and for a loss, one on a 0-100 scale."""
    return ".3f" if metric in ("macro_f1", "accuracy", "loss") else ".1f"
