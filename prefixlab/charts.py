"""Plotly figures for data, training and evaluation (the inspection figures are in plots.py).

Plain Python lists go into every figure: plotly 7 encodes numpy arrays as binary blobs.
No gradio import: the app hands these figures to gr.Plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

_LAYOUT = {"margin": {"l": 50, "r": 20, "t": 40, "b": 40}, "height": 320,
           "template": "plotly_white", "legend": {"orientation": "h", "y": -0.2}}


def label_distribution(counts: Mapping[str, int], title: str = "Examples per label") -> go.Figure:
    labels = sorted(counts, key=lambda k: -counts[k])
    fig = go.Figure(go.Bar(x=labels, y=[int(counts[k]) for k in labels],
                           text=[int(counts[k]) for k in labels], textposition="auto"))
    fig.update_layout(title=title, **_LAYOUT)
    return fig


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def loss_curves(records: Sequence[dict], title: str = "Loss") -> go.Figure:
    """Training loss (raw and smoothed) and validation loss against the step."""
    steps = [r for r in records if r.get("type") == "step"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig = go.Figure()
    x = [r["step"] for r in steps]
    y = [r["loss"] for r in steps]
    fig.add_trace(go.Scatter(x=x, y=y, name="train loss", mode="lines",
                             line={"color": "rgba(31,119,180,0.3)"}))
    fig.add_trace(go.Scatter(x=x, y=smooth(y), name="train loss (smoothed)", mode="lines",
                             line={"color": "rgb(31,119,180)"}))
    fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["val_loss"] for r in evals],
                             name="validation loss", mode="lines+markers",
                             line={"color": "rgb(214,39,40)"}))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="cross-entropy", **_LAYOUT)
    return fig


def eval_curves(records: Sequence[dict], title: str = "Validation metrics") -> go.Figure:
    evals = [r for r in records if r.get("type") == "eval"]
    fig = go.Figure()
    for key, name in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r[key] for r in evals],
                                 name=name, mode="lines+markers"))
    fig.update_layout(title=title, xaxis_title="step", yaxis={"range": [0, 1]}, **_LAYOUT)
    return fig


def compare_runs(curves: Mapping[str, Sequence[dict]], metric: str = "loss") -> go.Figure:
    """Several runs on one chart: smoothed training loss, or validation macro-F1."""
    fig = go.Figure()
    for name, records in curves.items():
        if metric == "loss":
            steps = [r for r in records if r.get("type") == "step"]
            fig.add_trace(go.Scatter(x=[r["step"] for r in steps],
                                     y=smooth([r["loss"] for r in steps]), name=name,
                                     mode="lines"))
        else:
            evals = [r for r in records if r.get("type") == "eval"]
            fig.add_trace(go.Scatter(x=[r["step"] for r in evals],
                                     y=[r[metric] for r in evals], name=name,
                                     mode="lines+markers"))
    label = {"loss": "training loss (smoothed)", "macro_f1": "validation macro-F1",
             "val_loss": "validation loss", "accuracy": "validation accuracy"}[metric]
    fig.update_layout(title=f"Runs compared: {label}", xaxis_title="step", **_LAYOUT)
    return fig


def confusion_heatmap(report: Mapping, title: str = "Confusion matrix") -> go.Figure:
    cm = report["confusion_matrix"]
    labels, matrix = list(cm["labels"]), [list(map(int, row)) for row in cm["matrix"]]
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Blues",
                               text=matrix, texttemplate="%{text}", showscale=False))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true",
                      yaxis={"autorange": "reversed"}, **{**_LAYOUT, "height": 360})
    return fig


def baseline_bars(report: Mapping) -> go.Figure:
    """Macro-F1 and accuracy of the prefix beside the majority, zero-shot and TF-IDF
    baselines."""
    rows = [("prefix", report)] + [
        (name, report["baselines"].get(key)) for key, name in
        (("majority", "majority class"), ("zero_shot", "zero-shot (no prefix)"),
         ("tfidf", "TF-IDF + logistic regression"))
    ]
    rows = [(n, m) for n, m in rows if m]
    fig = go.Figure()
    for key, name in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        fig.add_trace(go.Bar(x=[n for n, _ in rows], y=[m[key] for _, m in rows], name=name,
                             text=[f"{m[key]:.2f}" for _, m in rows], textposition="auto"))
    fig.update_layout(title="Held-out results", yaxis={"range": [0, 1]}, barmode="group",
                      **_LAYOUT)
    return fig
