"""The comparison's chart: each method's score (macro-F1; BLEU for generation) against its
training time to the kept step, marker area growing with the bytes it stores per task (log
scale: they span bytes to GB); a generation comparison's bare model as a dashed line."""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go


def _ticks(seconds: Sequence[float]) -> list[float]:
    """1-2-5 steps around the data: plotly's own log ticks label minor steps with a bare
    digit ("9 0.1 2 3 ... 1"), which reads as nonsense within one decade."""
    low = math.floor(math.log10(min(seconds))) if seconds else -1
    high = math.ceil(math.log10(max(seconds))) if seconds else 1
    return [m * 10.0 ** e for e in range(low, high + 1) for m in (1, 2, 5)]


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
