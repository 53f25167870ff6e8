"""Plotly figures for data, training and evaluation (the inspection figures are in plots.py).

Plain Python lists go into every figure: plotly 7 encodes numpy arrays as binary blobs.
No gradio import: the app hands these figures to gr.Plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

# The legend sits in the bottom margin, below the x-axis title, placed in pixels from the
# figure's edge (yref "container"): in plot-area units it ran into the axis title.
_LAYOUT = {"margin": {"l": 60, "r": 20, "t": 50, "b": 95}, "height": 340,
           "template": "plotly_white",
           "legend": {"orientation": "h", "yref": "container", "y": 0.02, "yanchor": "bottom",
                      "x": 0, "xanchor": "left"}}
_TITLE = {"x": 0.01, "xanchor": "left", "font": {"size": 15}}


def _titled(fig: go.Figure, title: str, **layout) -> go.Figure:
    fig.update_layout(title={**_TITLE, "text": title}, **{**_LAYOUT, **layout})
    return fig


def _step_axis(steps: Sequence[int], total: int | None = None) -> dict:
    """An x axis of whole steps that also reads well with one point (a range around it)."""
    last = max([*steps, total or 0, 1])
    axis = {"title": "step", "range": [0, last * 1.04 + 0.5], "rangemode": "tozero"}
    if last <= 12:
        axis["dtick"] = 1  # no "1.5" steps
    return axis


def empty_figure(title: str, message: str) -> go.Figure:
    """A titled figure that says why it has nothing yet, instead of empty axes."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper",
                       yref="paper", font={"size": 13, "color": "#666"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _titled(fig, title)


def label_distribution(counts: Mapping[str, int], title: str = "Examples per label") -> go.Figure:
    labels = sorted(counts, key=lambda k: -counts[k])
    fig = go.Figure(go.Bar(x=labels, y=[int(counts[k]) for k in labels],
                           text=[int(counts[k]) for k in labels], textposition="auto"))
    fig.update_layout(xaxis_title="label", yaxis_title="rows")
    return _titled(fig, title)


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def _total_steps(records: Sequence[dict]) -> int | None:
    steps = [r for r in records if r.get("type") == "step"]
    return int(steps[-1]["total_steps"]) if steps else None


def trials_of(records: Sequence[dict]) -> dict[float, list[dict]]:
    """A run choosing its learning rate (runs/trials.py): each rate's own records, in the
    order tried; empty for a run trained at one rate."""
    out: dict[float, list[dict]] = {}
    for r in records:
        if r.get("type") == "trial":
            out.setdefault(float(r["learning_rate"]), []).append(r["record"])
    return out


_TRIAL_COLORS = ("rgb(31,119,180)", "rgb(255,127,14)", "rgb(44,160,44)", "rgb(148,103,189)",
                 "rgb(140,86,75)", "rgb(227,119,194)")


def _trial_figure(trials: Mapping[float, Sequence[dict]], title: str, kind: str) -> go.Figure:
    """Each learning rate's curves in its own color: smoothed training loss and validation
    loss (`kind` "loss"), or the validation score the run keeps its step by ("eval")."""
    fig, xs = go.Figure(), []
    for i, (rate, rs) in enumerate(trials.items()):
        color = _TRIAL_COLORS[i % len(_TRIAL_COLORS)]
        steps = [r for r in rs if r.get("type") == "step"]
        evals = [r for r in rs if r.get("type") == "eval"]
        if kind == "loss":
            fig.add_trace(go.Scatter(x=[r["step"] for r in steps],
                                     y=smooth([r["loss"] for r in steps]), mode="lines",
                                     name=f"train loss, lr {rate:g}", line={"color": color}))
            points, key = evals, "val_loss"
            name = f"validation loss, lr {rate:g}"
        else:
            key = "bleu" if any("bleu" in r for r in evals) else "macro_f1"
            points = [r for r in evals if key in r]
            name = f"{'BLEU' if key == 'bleu' else 'macro-F1'}, lr {rate:g}"
        fig.add_trace(go.Scatter(x=[r["step"] for r in points], y=[r[key] for r in points],
                                 mode="lines+markers", name=name, marker={"size": 7},
                                 line={"color": color, "dash": "dot" if kind == "loss"
                                       else "solid"}))
        xs += [r["step"] for r in steps + evals]
    layout = ({"yaxis_title": "cross-entropy"} if kind == "loss" else
              {"yaxis": {"title": "score", "rangemode": "tozero"}})
    return _titled(fig, title, xaxis=_step_axis(xs, _total_steps(
        [r for rs in trials.values() for r in rs])), **layout)


def loss_curves(records: Sequence[dict], title: str = "Loss") -> go.Figure:
    """Training loss (raw and smoothed) and validation loss against the step; for a run
    choosing its learning rate, each rate's in its own color."""
    if trials := trials_of(records):
        return _trial_figure(trials, f"{title} at each learning rate", "loss")
    steps = [r for r in records if r.get("type") == "step"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not steps and not evals:
        return empty_figure(title, "The loss appears after the first training step.")
    fig = go.Figure()
    x = [r["step"] for r in steps]
    y = [r["loss"] for r in steps]
    fig.add_trace(go.Scatter(x=x, y=y, name="train loss", mode="lines",
                             line={"color": "rgba(31,119,180,0.3)"}))
    fig.add_trace(go.Scatter(x=x, y=smooth(y), name="train loss (smoothed)", mode="lines",
                             line={"color": "rgb(31,119,180)"}))
    if evals:
        fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["val_loss"] for r in evals],
                                 name="validation loss", mode="lines+markers",
                                 marker={"size": 8}, line={"color": "rgb(214,39,40)"}))
    return _titled(fig, title, xaxis=_step_axis(x + [r["step"] for r in evals],
                                                 _total_steps(records)),
                   yaxis_title="cross-entropy")


def eval_curves(records: Sequence[dict], title: str = "Validation metrics") -> go.Figure:
    """Macro-F1 and accuracy on the validation rows at each evaluation (0 to 1); for a
    generation run BLEU, ROUGE-L and chrF (0 to 100) on its sample of held-out inputs; for a
    run choosing its learning rate, macro-F1 (or BLEU) at each rate."""
    if trials := trials_of(records):
        return _trial_figure(trials, f"{title}: the learning rates tried", "eval")
    evals = [r for r in records if r.get("type") == "eval"]
    if not evals:
        return empty_figure(title, "The prefix is scored on the validation rows every half "
                                   "epoch;<br>the first scores appear then.")
    generation = any("bleu" in r for r in evals)
    series = ((("bleu", "BLEU", "{:.1f}"), ("rouge_l", "ROUGE-L", "{:.1f}"),
               ("chrf", "chrF", "{:.1f}")) if generation
              else (("macro_f1", "macro-F1", "{:.2f}"), ("accuracy", "accuracy", "{:.2f}")))
    fig = go.Figure()
    for key, name, fmt in series:
        points = [r for r in evals if key in r]
        fig.add_trace(go.Scatter(x=[r["step"] for r in points], y=[r[key] for r in points],
                                 name=name, mode="lines+markers+text" if len(points) == 1
                                 else "lines+markers", marker={"size": 9},
                                 text=[fmt.format(r[key]) for r in points],
                                 textposition="middle right"))
    if generation:
        title = f"{title} (greedy, sampled held-out inputs)"
    top = 102 if generation else 1.02
    return _titled(fig, title, xaxis=_step_axis([r["step"] for r in evals],
                                                _total_steps(records)),
                   yaxis={"range": [0, top], "title": "score"})


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
    return _titled(fig, f"Runs compared: {label}", xaxis_title="step", yaxis_title=label)


def confusion_heatmap(report: Mapping, title: str = "Confusion matrix") -> go.Figure:
    cm = report["confusion_matrix"]
    labels, matrix = list(cm["labels"]), [list(map(int, row)) for row in cm["matrix"]]
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Blues",
                               text=matrix, texttemplate="%{text}", showscale=False))
    return _titled(fig, title, xaxis={"title": "predicted", "side": "bottom"},
                   yaxis={"title": "true", "autorange": "reversed"}, height=360,
                   margin={**_LAYOUT["margin"], "b": 60})


BASELINES = (("majority", "majority class (always the most frequent label)"),
             ("zero_shot", "zero-shot (same model, no prefix)"),
             ("tfidf", "TF-IDF + logistic regression"))


def baseline_bars(report: Mapping) -> go.Figure:
    """Macro-F1 and accuracy of the prefix beside each baseline on the same rows, as
    horizontal bars: the names read level, whatever their length."""
    rows = [("prefix", report)] + [(name, report["baselines"].get(key))
                                   for key, name in BASELINES]
    rows = [(n, m) for n, m in rows if m]
    fig = go.Figure()
    for key, name in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        fig.add_trace(go.Bar(y=[n for n, _ in rows], x=[m[key] for _, m in rows], name=name,
                             orientation="h", text=[f"{m[key]:.2f}" for _, m in rows],
                             textposition="outside", cliponaxis=False))
    return _titled(fig, "Prefix vs baselines (held-out rows)", barmode="group",
                   xaxis={"range": [0, 1.12], "title": "score"},
                   yaxis={"autorange": "reversed", "automargin": True},
                   height=max(300, 110 + 60 * len(rows)))


def generation_bars(report: Mapping) -> go.Figure:
    """BLEU, ROUGE-L and chrF of a generation run's prefix beside the bare model's, as
    horizontal bars like `baseline_bars`."""
    rows = [("prefix", report), ("bare model (no prefix)", report["baselines"]["bare_model"])]
    fig = go.Figure()
    for key, name in (("bleu", "BLEU"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF")):
        fig.add_trace(go.Bar(y=[n for n, _ in rows], x=[m[key] for _, m in rows], name=name,
                             orientation="h", text=[f"{m[key]:.1f}" for _, m in rows],
                             textposition="outside", cliponaxis=False))
    # ticksuffix: room between a name and a zero-length bar's value drawn beside it
    return _titled(fig, "Prefix vs bare model (held-out inputs)", barmode="group",
                   xaxis={"range": [0, 112], "title": "score"},
                   yaxis={"autorange": "reversed", "automargin": True, "ticksuffix": "    "},
                   height=300)
