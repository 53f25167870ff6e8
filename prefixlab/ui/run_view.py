"""How a run reads on the page while it trains and once it is done: the progress line (the
bar, the last step, the final report's rows and time left, a learning-rate trial in course)
and the report (scores beside the baselines and the shift set, per class, why this step and
rule were kept). The Train and Runs tabs both show runs this way."""

from __future__ import annotations

import pandas as pd

from prefixlab.figures import charts
from prefixlab.runs.registry import ACTIVE
from prefixlab.runs.trials import choice_sentence
from prefixlab.ui.common import escape, shown
from prefixlab.workbench.runs import decision_sentence

PER_CLASS_WIDTHS = ["28%", "19%", "17%", "17%", "19%"]  # label, precision, recall, f1, support


def progress_html(records: list[dict], state: str, phase: str | None = None) -> str:
    """The bar and the last step's numbers; before the first step, what the run is doing;
    after the last, how far its final report is (rows done of total, time spent and left)."""
    trial = current_trial(records) if state in ACTIVE else None
    if trial is not None:  # a learning-rate trial's own records (runs/trials.py)
        records = [r["record"] for r in records if r.get("type") == "trial"
                   and r["learning_rate"] == trial["learning_rate"]]
        phase = (f"learning rate {trial['learning_rate']:g} ({trial['index'] + 1} of "
                 f"{trial['count']})")
    steps = [r for r in records if r.get("type") == "step"]
    if not steps:
        return f"<div>{escape(phase or state)}…</div>" if state in ACTIVE else ""
    s = steps[-1]
    if state in ACTIVE and (final := final_phase(records)):
        return _bar(final["done"] / max(1, final["total"])) + (
            f"<div>{final_phase_line(final)}</div>"
            f"<div>training ended at step {s['step']}/{s['total_steps']} · "
            f"loss {s['loss']:.3f}</div>") + last_evaluation_html(records)
    share = s["step"] / max(1, s["total_steps"])
    eta = (f" · at most {s['eta_s']:.0f} s of training left"
           if (phase == "training" or trial) and s["eta_s"] else "")
    after = f" · {escape(phase)}…" if phase and phase != "training" else ""
    html = _bar(share) + (
        f"<div>step {s['step']}/{s['total_steps']} · epoch {s['epoch']:.2f} · "
        f"{s['examples_per_s']:.1f} examples/s · loss {s['loss']:.3f}{eta}{after}</div>"
    )
    return html + last_evaluation_html(records)


def current_trial(records: list[dict]) -> dict | None:
    """The learning-rate trial a run is in (its latest trial record), unless the run's own
    steps came after it (a chosen run, or one trained longer)."""
    for r in reversed(records):
        if r.get("type") == "trial":
            return r
        if r.get("type") == "step":
            return None
    return None


def _bar(share: float) -> str:
    return (f"<div class='bar'><div class='fill' style='width:{100 * min(1.0, share):.1f}%'>"
            "</div></div>")


def final_phase(records: list[dict]) -> dict | None:
    """The run's latest progress record of its final report, if it came after the last
    training step (a run trained longer has older ones)."""
    for r in reversed(records):
        if r.get("type") == "step":
            return None
        if r.get("type") == "progress":
            return r
    return None


def final_phase_line(r: dict) -> str:
    """E.g. "final report: decoding held-out inputs 32/80 · 41 s · about 62 s left"."""
    left = f" · about {r['eta_s']:.0f} s left" if r.get("eta_s") is not None else ""
    return (f"{escape(r['phase'])}: {escape(r['what'])} {r['done']}/{r['total']} · "
            f"{r['elapsed_s']:.0f} s{left}")


def last_evaluation_html(records: list[dict]) -> str:
    """The latest evaluation's predicted-label counts, the best step so far, its warnings."""
    evals = [r for r in records if r.get("type") == "eval" and "predicted" in r]
    if not evals:
        return ""
    e = evals[-1]
    counts = ", ".join(f"{escape(k)} {v}" for k, v in e["predicted"].items())
    html = (f"<div>evaluation at step {e['step']}: macro-F1 {e['macro_f1']:.3f} · predicted "
            f"{counts} · kept so far: step {e.get('best_step')}</div>")
    return html + "".join(f"<div><b>Warning:</b> {escape(w)}</div>" for w in e["warnings"])


def generation_report_outputs(report: dict):
    """A generation run's scores beside the bare model's, and inputs / references / outputs."""
    bare = report["baselines"]["bare_model"]
    beams = report.get("decoding", {}).get("num_beams", 1)
    how = "greedy" if beams == 1 else f"beam search, {beams} beams"
    lines = [
        f"### Held-out results on {report['n']} distinct inputs ({report['rows']} references; "
        f"{how})",
        "| | BLEU | ROUGE-L | chrF | target loss |", "|---|---|---|---|---|",
        f"| **prefix** | **{report['bleu']:.1f}** | **{report['rouge_l']:.1f}** | "
        f"**{report['chrf']:.1f}** | **{report['loss']:.3f}** |",
        f"| bare model (same prompt, no prefix) | {bare['bleu']:.1f} | {bare['rouge_l']:.1f} | "
        f"{bare['chrf']:.1f} | {bare['loss']:.3f} |",
    ]
    if cut := decoded_note(report):
        lines.append(f"\n{cut}")
    if precision := report.get("precision"):
        lines.append(f"\nThe model computed in {escape(precision)}.")
    samples = report.get("samples", [])
    if samples:
        # A Markdown table: the page's full width for four columns of sentences.
        lines += ["", f"#### {len(samples)} held-out inputs: references and outputs", "",
                  "| input | references | prefix output | bare model output |",
                  "|---|---|---|---|"]
        lines += [f"| {_cell(s['input'])} | {'<br>'.join(_cell(r) for r in s['references'])} | "
                  f"{_cell(s['prefix'])} | {_cell(s['bare'])} |" for s in samples]
    return "\n".join(lines), shown(None), shown(None), shown(charts.generation_bars(report))


def decoded_note(report: dict) -> str:
    """What a generation report's scores read when its time budget cut the decoding short."""
    cut = report.get("decoded")
    if not cut:
        return ""
    return (f"The scores read the first {cut['inputs']} of {cut['of']} held-out inputs: the "
            f"run's {cut['why']} ran out while decoding (the target loss reads all "
            f"{report['rows']} references).")


def _cell(text: str) -> str:
    """Text for one Markdown table cell: escaped, pipes and line breaks kept inside it."""
    return escape(text).replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def report_outputs(report: dict | None):
    """Markdown summary, per-class table, confusion heatmap and baseline bars (updates that
    hide the table and charts while there is no report); for a generation run: its scores,
    a table of outputs, and the bars."""
    if not report:
        return "", shown(None), shown(None), shown(None)
    if report.get("task") == "generation":
        return generation_report_outputs(report)
    lines = [
        f"### Held-out results on {report['n']} rows",
        "| | macro-F1 | accuracy |", "|---|---|---|",
        f"| **prefix** | **{report['macro_f1']:.3f}** | **{report['accuracy']:.3f}** |",
    ]
    if shift := report.get("shift"):  # beside validation: a gap is its own warning below
        lines.append(f"| prefix on the shift set ({shift['n']} rows) | {shift['macro_f1']:.3f} "
                     f"| {shift['accuracy']:.3f} |")
    for key, name in charts.BASELINES:
        if baseline := report["baselines"].get(key):
            lines.append(f"| {name} | {baseline['macro_f1']:.3f} | {baseline['accuracy']:.3f} |")
    # Said above the numbers: a prefix that predicts one class for (nearly) every row can
    # still show a fair accuracy on a skewed set.
    warnings = [f"> ⚠️ **{escape(w)}**" for w in report.get("warnings", [])]
    if warnings:  # one quoted paragraph each ("> " lines in a row would run together)
        lines[1:1] = ["", "\n>\n".join(warnings), ""]
    if "kept_step" in report:
        lines.append(f"\nKept the prefix of step {report['kept_step']} of {report['steps']} "
                     f"({report['selection']}); training ended: {report['stop_reason']}.")
    if text := choice_sentence(report):
        lines.append(escape(text))
    if text := decision_sentence(report):
        lines.append(escape(text))
    if precision := report.get("precision"):
        lines.append(f"The model computed in {escape(precision)}.")
    per_class = pd.DataFrame([
        {"label": k, "precision": round(v["precision"], 3), "recall": round(v["recall"], 3),
         "f1": round(v["f1"], 3), "support": v["support"]}
        for k, v in report["per_class"].items()
    ])
    return ("\n".join(lines), {**shown(per_class), "label": "Per class"},
            shown(charts.confusion_heatmap(report)), shown(charts.baseline_bars(report)))
