"""A comparison's rows (compare.py) in words and as a text table: which method won, by how
much, what the prefix costs or saves against it, and what the shift set says. Every sentence
reads a figure of the rows; where the rows cannot tell (a margin within sampling noise, no
test or shift set) the words say so instead of guessing.

A generation comparison ranks by BLEU (chrF and ROUGE-L beside it), sets every method against
the bare model, and says that its figures come from one split and one seed: BLEU has no
binomial noise bound like accuracy's, and none is made up here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _held_out(rows: Sequence[dict], has_test: bool) -> tuple[str, str]:
    """The set the verdict judges on: test when given (validation chose each method's step,
    so it flatters every method), else validation."""
    return ("test", "test rows") if has_test else ("validation", "validation rows")


def noise_points(n: int) -> float:
    """Two binomial standard errors of an accuracy near 0.5 on `n` rows, in points (x100):
    differences below this are not told apart by this many rows."""
    return 200 * math.sqrt(0.25 / n) if n else math.inf


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _ratio(a: float, b: float) -> str:
    """a against b: "3.2x more" / "3.2x less" / "about the same"."""
    if not a or not b:
        return "n/a"
    r = a / b
    if 0.9 <= r <= 1.1:
        return "about the same"
    return f"{r:.1f}x more" if r > 1 else f"{1 / r:.1f}x less"


def verdict(rows: Sequence[dict], *, has_test: bool, has_shift: bool,
            task: str = "classification", bare: dict | None = None) -> list[str]:
    """Sentences under the table; empty when no method finished. `task`: comparison.json's
    ("generation": rows scored by BLEU, `bare` its bare_model block)."""
    if task == "generation":
        return _generation_verdict(rows, has_test, has_shift, bare)
    done = [r for r in rows if "error" not in r]
    if not done:
        return ["no method finished, so there is nothing to compare"]
    key, where = _held_out(done, has_test)
    ranked = sorted(done, key=lambda r: -r[key]["macro_f1"])
    best = ranked[0]
    n = best[key]["rows"]
    noise = noise_points(n)
    out = []
    if len(ranked) == 1:
        out.append(f"only {best['title']} finished: macro-F1 {best[key]['macro_f1']:.3f} on "
                   f"{n} {where}; there is nothing to set it against")
    else:
        second = ranked[1]
        gap = 100 * (best[key]["macro_f1"] - second[key]["macro_f1"])
        told = ("within sampling noise" if gap < noise else "beyond sampling noise")
        out.append(f"{best['title']} scored best on the {n} {where}: macro-F1 "
                   f"{best[key]['macro_f1']:.3f}, {gap:.1f} points above {second['title']} "
                   f"({second[key]['macro_f1']:.3f}); {told} (about {noise:.1f} points on "
                   f"{n} rows)")
    prefix = next((r for r in done if r["method"] == "prefix"), None)
    if prefix is not None and len(ranked) > 1:
        other = best if best is not prefix else ranked[1]
        gap = 100 * (prefix[key]["macro_f1"] - other[key]["macro_f1"])
        lead = "ahead of" if gap > 0 else "behind"
        out.append(f"the prefix is {abs(gap):.1f} points {lead} {other['title']} and "
                   + _costs(prefix, other))
    elif prefix is None:
        out.append("the prefix was not among the methods that finished")
    if has_shift:
        out += _shift_words(done, key)
    else:
        out.append(NO_SHIFT)
    return out + _failed(rows)


NO_SHIFT = ("no shift set was given, so nothing here says how the methods travel to data from "
            "another source")


def _costs(prefix: dict, other: dict) -> str:
    """What the prefix stores, trains and holds against `other`."""
    return (f"stores {_size(prefix['stored_bytes'])} per task against "
            f"{_size(other['stored_bytes'])} "
            f"({_ratio(prefix['stored_bytes'], other['stored_bytes'])}); it trained "
            f"{_seconds(prefix['train_s_to_kept'])} to its kept step against "
            f"{_seconds(other['train_s_to_kept'])} "
            f"({_ratio(prefix['train_s_to_kept'], other['train_s_to_kept'])}) and peaked at "
            f"{_size(prefix['peak_rss_bytes'])} of memory against "
            f"{_size(other['peak_rss_bytes'])}")


def _seconds(s: float) -> str:
    """12.3 s, 0.042 s: two significant figures at least, so that a ratio beside two times
    never reads "0.1 s against 0.1 s (1.8x less)"."""
    return f"{s:.1f} s" if s >= 1 else f"{s:.2g} s"


def _failed(rows: Sequence[dict]) -> list[str]:
    failed = [r for r in rows if "error" in r]
    if not failed:
        return []
    return ["did not finish: " + "; ".join(f"{r['title']} ({r['error']})" for r in failed)]


GENERATION_METRICS = (("bleu", "BLEU"), ("chrf", "chrF"), ("rouge_l", "ROUGE-L"))


def _generation_verdict(rows: Sequence[dict], has_test: bool, has_shift: bool,
                        bare: dict | None) -> list[str]:
    """The verdict of a generation comparison: rows scored by BLEU, chrF and ROUGE-L (0-100)."""
    done = [r for r in rows if "error" not in r]
    if not done:
        return ["no method finished, so there is nothing to compare"]
    key, where = _held_out(done, has_test)
    ranked = sorted(done, key=lambda r: -r[key]["bleu"])
    best, b = ranked[0], ranked[0][key]
    sets = f"{b['rows']} {where} ({b['inputs']} inputs)"
    out = []
    if len(ranked) == 1:
        out.append(f"only {best['title']} finished: BLEU {b['bleu']:.1f}, chrF {b['chrf']:.1f}, "
                   f"ROUGE-L {b['rouge_l']:.1f} on the {sets}; there is nothing to set it "
                   "against but the bare model")
    else:
        second = ranked[1]
        out.append(f"{best['title']} scored best on the {sets}: BLEU {b['bleu']:.1f}, "
                   f"{b['bleu'] - second[key]['bleu']:.1f} points above {second['title']} "
                   f"({second[key]['bleu']:.1f}); chrF {b['chrf']:.1f}, ROUGE-L "
                   f"{b['rouge_l']:.1f}")
        disagree = [f"{title} ranks {top['title']} first" for metric, title in
                    GENERATION_METRICS[1:]
                    if (top := max(done, key=lambda r, m=metric: r[key][m])) is not best]
        if disagree:
            out.append("the metrics disagree: " + " and ".join(disagree))
        out.append("these figures come from one split and one seed, and BLEU has no simple "
                   "sampling bound as accuracy has: a gap of a point or two may not hold on "
                   "another split or seed (run the comparison again with another seed to see)")
    prefix = next((r for r in done if r["method"] == "prefix"), None)
    if prefix is not None and len(ranked) > 1:
        other = best if best is not prefix else ranked[1]
        gap = prefix[key]["bleu"] - other[key]["bleu"]
        lead = (f"level with {other['title']} in BLEU" if round(gap, 1) == 0 else
                f"{abs(gap):.1f} BLEU points {'ahead of' if gap > 0 else 'behind'} "
                f"{other['title']}")
        out.append(f"the prefix is {lead} and " + _costs(prefix, other))
        if len(ranked) > 2:
            out.append(f"BLEU against the prefix ({prefix[key]['bleu']:.1f}): " + ", ".join(
                f"{r['title']} {_signed(r[key]['bleu'] - prefix[key]['bleu'])}"
                for r in ranked if r is not prefix))
    elif prefix is None:
        out.append("the prefix was not among the methods that finished")
    if bare is None:
        out.append("the bare model was not decoded (the comparison was cancelled), so nothing "
                   "here says what training bought")
    elif bare.get(key) is not None:
        z = bare[key]["bleu"]
        out.append(f"the bare model (the same template, no training) scores BLEU {z:.1f} on "
                   f"the {where}; training bought " + ", ".join(
                       f"{r['title']} {_signed(r[key]['bleu'] - z)}" for r in ranked)
                   + " points over it")
    if has_shift:
        out += _generation_shift_words(done, key, bare)
    else:
        out.append(NO_SHIFT)
    return out + _failed(rows)


def _generation_shift_words(rows: Sequence[dict], key: str, bare: dict | None) -> list[str]:
    best = max(rows, key=lambda r: r["shift"]["bleu"])
    s = best["shift"]
    drops = {r["method"]: r[key]["bleu"] - r["shift"]["bleu"] for r in rows}
    steady = min(rows, key=lambda r: drops[r["method"]])
    plain = (f"; the bare model scores {bare['shift']['bleu']:.1f}"
             if bare is not None and bare.get("shift") is not None else "")
    words = [f"on the {s['rows']} shift rows ({s['inputs']} inputs) {best['title']} scored "
             f"best (BLEU {s['bleu']:.1f}{plain}); {steady['title']} held up best against its "
             f"{key} score (shift minus {key}: {_signed(-drops[steady['method']])} points)"]
    prefix = next((r for r in rows if r["method"] == "prefix"), None)
    if prefix is not None and prefix is not best:
        words.append(f"the prefix is {s['bleu'] - prefix['shift']['bleu']:.1f} BLEU points "
                     "behind it on the shift set")
    return words


def _signed(points: float) -> str:
    """+1.5 / -2.0 / +0.0: a difference that rounds to nothing is not shown as "-0.0"."""
    return f"{round(points, 1) + 0.0:+.1f}"


def _shift_words(rows: Sequence[dict], key: str) -> list[str]:
    best = max(rows, key=lambda r: r["shift"]["macro_f1"])
    n = best["shift"]["rows"]
    drops = {r["method"]: 100 * (r[key]["macro_f1"] - r["shift"]["macro_f1"]) for r in rows}
    steady = min(rows, key=lambda r: drops[r["method"]])
    words = [f"on the {n} shift rows {best['title']} scored best (macro-F1 "
             f"{best['shift']['macro_f1']:.3f}); {steady['title']} held up best against its "
             f"{key} score (shift minus {key}: {_signed(-drops[steady['method']])} points)"]
    prefix = next((r for r in rows if r["method"] == "prefix"), None)
    if prefix is not None and prefix is not best:
        gap = 100 * (best["shift"]["macro_f1"] - prefix["shift"]["macro_f1"])
        told = "within" if gap < noise_points(n) else "beyond"
        words.append(f"the prefix is {gap:.1f} points behind it on the shift set ({told} "
                     "sampling noise)")
    return words


COSTS = ("trainable", "share", "stored", "s to kept", "s total", "ex/s", "peak RSS",
         "kept step")
COLUMNS = ("method", "val F1", "val acc", "test F1", "shift F1", *COSTS)
GENERATION_COLUMNS = ("method", "val BLEU", "val chrF", "val ROUGE-L", "val loss",
                      "test BLEU", "test chrF", "test ROUGE-L",
                      "shift BLEU", "shift chrF", "shift ROUGE-L", *COSTS)
BARE_TITLE = "bare model"


def table_columns(task: str = "classification") -> tuple[str, ...]:
    """The columns table_rows gives for a comparison of `task` (comparison.json's)."""
    return GENERATION_COLUMNS if task == "generation" else COLUMNS


def _cost_cells(r: dict) -> list[str]:
    share = r["trainable_share"]
    return [f"{r['trainable_parameters']:,}", "-" if share is None else f"{share:.4%}",
            _size(r["stored_bytes"]), f"{r['train_s_to_kept']:.1f}", f"{r['train_s']:.1f}",
            "-" if r["examples_per_s"] is None else f"{r['examples_per_s']:.1f}",
            _size(r["peak_rss_bytes"]), "-" if r["kept_step"] is None else str(r["kept_step"])]


def _generation_cells(r: dict) -> list[str]:
    """The BLEU, chrF, ROUGE-L (and validation loss) cells of a row or of the bare model."""
    cells = []
    for key in ("validation", "test", "shift"):
        got = r.get(key)
        cells += [f"{got[m]:.1f}" if got else "-" for m, _ in GENERATION_METRICS]
        if key == "validation":
            cells.append(f"{got['loss']:.3f}" if got and got.get("loss") is not None else "-")
    return cells


def table_rows(rows: Sequence[dict], task: str = "classification",
               bare: dict | None = None) -> list[list[str]]:
    """The comparison's rows as table cells (table_columns(task)), for the CLI and the app;
    a generation comparison's `bare` model (its bare_model block) as a last row."""
    def f1(r: dict, key: str) -> str:
        return f"{r[key]['macro_f1']:.3f}" if r.get(key) else "-"

    width = len(table_columns(task))
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["title"], "failed", *["-"] * (width - 2)])
        elif task == "generation":
            cells.append([r["title"], *_generation_cells(r), *_cost_cells(r)])
        else:
            cells.append([r["title"], f1(r, "validation"), f"{r['validation']['accuracy']:.3f}",
                          f1(r, "test"), f1(r, "shift"), *_cost_cells(r)])
    if task == "generation" and bare is not None:
        cells.append([BARE_TITLE, *_generation_cells(bare), *["-"] * len(COSTS)])
    return cells


def format_table(rows: Sequence[dict], task: str = "classification",
                 bare: dict | None = None) -> str:
    """A plain-text table, columns aligned; a generation one shows the test and shift
    columns only when some row has those scores."""
    columns = list(table_columns(task))
    cells = [columns, *table_rows(rows, task, bare)]
    if task == "generation":
        keep = [i for i, c in enumerate(columns) if not c.startswith(("test ", "shift "))
                or any(row[i] != "-" for row in cells[1:])]
        cells = [[row[i] for i in keep] for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
