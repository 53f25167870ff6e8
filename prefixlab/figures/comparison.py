"""The comparison's chart: each method's macro-F1 against its training time to the kept step,
marker area growing with the bytes it stores per task (log scale: they span bytes to GB)."""

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


def comparison_figure(rows: Sequence[dict], key: str = "validation") -> go.Figure:
    """macro-F1 on `key` rows (validation or test) against seconds to the kept step."""
    done = [r for r in rows if "error" not in r and r.get(key)]
    sizes = [r["stored_bytes"] or 1 for r in done]
    seconds = [max(r["train_s_to_kept"], 0.01) for r in done]
    ticks = _ticks(seconds)
    fig = go.Figure(go.Scatter(
        x=seconds,
        y=[r[key]["macro_f1"] for r in done],
        mode="markers+text", text=[r["title"] for r in done], textposition="top center",
        marker={"size": [8 + 4 * math.log10(s) for s in sizes], "opacity": 0.7},
        customdata=[[r["stored_bytes"]] for r in done],
        hovertemplate="%{text}<br>macro-F1 %{y:.3f}<br>%{x:.1f} s<br>"
                      "%{customdata[0]:,} bytes stored<extra></extra>",
    ))
    fig.update_layout(title=f"{key} macro-F1 against training time (marker: bytes stored)",
                      xaxis={"title": "seconds of training to the kept step", "type": "log",
                             "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]},
                      # Room above 1.0: a best method's name sits over its marker, not cut.
                      yaxis={"title": "macro-F1", "range": [-0.05, 1.12]}, height=380,
                      margin={"t": 50})
    return fig
