"""What the commands print: progress on stderr, a run's report on stdout.

Progress, warnings and errors go to stderr; reports, predictions and JSON lines to stdout.
"""

from __future__ import annotations

import sys
import time

PROGRESS_EVERY_S = 5.0  # the final report's progress lines, at most this often


def say(message: str) -> None:
    """A message for the user, on stderr."""
    print(message, file=sys.stderr)


def progress_bar(total: int):
    """(bar, on_step): a tqdm bar on a terminal, else a line every 10 steps, fed by train()."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not sys.stderr.isatty())

    def on_step(s) -> None:
        bar.total = s.total_steps
        bar.update(s.step - bar.n)
        bar.set_postfix(loss=f"{s.loss:.3f}", ex_s=f"{s.examples_per_s:.1f}")
        if not sys.stderr.isatty() and (s.step % 10 == 0 or s.step == s.total_steps):
            say(f"step {s.step}/{s.total_steps} loss {s.loss:.4f} "
                f"{s.examples_per_s:.1f} ex/s eta {s.eta_s:.0f}s")

    return bar, on_step


def final_progress():
    """on_progress for execute_run: the final report's progress on stderr, a line when a
    part begins and ends and at most every PROGRESS_EVERY_S seconds between."""
    last = {"what": None, "at": 0.0}

    def on_progress(r: dict) -> None:
        now = time.monotonic()
        if r["what"] == last["what"] and r["done"] < r["total"] and \
                now - last["at"] < PROGRESS_EVERY_S:
            return
        last.update(what=r["what"], at=now)
        left = f", about {r['eta_s']:.0f} s left" if r.get("eta_s") is not None else ""
        say(f"{r['phase']}: {r['what']} {r['done']}/{r['total']} "
            f"({r['elapsed_s']:.0f} s{left})")

    return on_progress


def _metrics_line(name: str, m: dict | None) -> str:
    if not m:
        return f"  {name:<10} (not available)"
    if "bleu" in m:
        return (f"  {name:<10} BLEU {m['bleu']:.1f}  ROUGE-L {m['rouge_l']:.1f}  "
                f"chrF {m['chrf']:.1f}  loss {m['loss']:.3f}")
    return f"  {name:<10} accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"


def print_report(report: dict) -> None:
    """The prefix beside every baseline, then any warning about its predictions."""
    if report.get("task") == "generation":
        print(_metrics_line("prefix", report))
        print(_metrics_line("bare model", report["baselines"]["bare_model"]))
        return
    print(_metrics_line("prefix", report))
    if shift := report.get("shift"):
        print(_metrics_line(f"prefix, shift set ({shift['n']} rows)", shift))
    if adapted := report.get("adapt_prior"):
        shares = ", ".join(f"{y} {v:.0%}" for y, v in adapted["predicted_shares"].items())
        print(f"  (decision adapted to these rows by {adapted['how']}: predicted shares "
              f"{shares}. {adapted['assumption']})")
    for key, name in (("majority", "majority"), ("zero_shot", "zero-shot"), ("tfidf", "tf-idf")):
        print(_metrics_line(name, report["baselines"].get(key)))
    for w in report.get("warnings", []):
        print(f"warning: {w}")


def results_header(report: dict) -> str:
    if report.get("task") == "generation":
        if cut := report.get("decoded"):  # the time budget ended the final decoding
            return (f"held-out results on the first {cut['inputs']} of {cut['of']} distinct "
                    f"inputs (decoding stopped at the {cut['why']}; the loss reads all "
                    f"{report['rows']} references):")
        return (f"held-out results on {report['n']} distinct inputs ({report['rows']} "
                "references):")
    return f"held-out results on {report['n']} rows:"
