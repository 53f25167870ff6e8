"""The comparison's chart: each method's macro-F1 against its training time to the kept step,
marker area growing with the bytes it stores per task (log scale: they span bytes to GB)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go


def comparison_figure(rows: Sequence[dict], key: str = "validation") -> go.Figure:
    """macro-F1 on `key` rows (validation or test) against seconds to the kept step."""
    done = [r for r in rows if "error" not in r and r.get(key)]
    sizes = [r["stored_bytes"] or 1 for r in done]
    fig = go.Figure(go.Scatter(
        x=[max(r["train_s_to_kept"], 0.01) for r in done],
        y=[r[key]["macro_f1"] for r in done],
        mode="markers+text", text=[r["title"] for r in done], textposition="top center",
        marker={"size": [8 + 4 * math.log10(s) for s in sizes], "opacity": 0.7},
        customdata=[[r["stored_bytes"]] for r in done],
        hovertemplate="%{text}<br>macro-F1 %{y:.3f}<br>%{x:.1f} s<br>"
                      "%{customdata[0]:,} bytes stored<extra></extra>",
    ))
    fig.update_layout(title=f"{key} macro-F1 against training time (marker: bytes stored)",
                      xaxis={"title": "seconds of training to the kept step", "type": "log"},
                      # Room above 1.0: a best method's name sits over its marker, not cut.
                      yaxis={"title": "macro-F1", "range": [-0.05, 1.12]}, height=380,
                      margin={"t": 50})
    return fig
