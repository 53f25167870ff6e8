"""A comparison's rows (compare.py) in words and as a text table: which method won, by how
much, what the prefix costs or saves against it, and what the shift set says. Every sentence
reads a figure of the rows; where the rows cannot tell (a margin within sampling noise, no
test or shift set) the words say so instead of guessing.
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


def verdict(rows: Sequence[dict], *, has_test: bool, has_shift: bool) -> list[str]:
    """Sentences under the table; empty when no method finished."""
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
        out.append(
            f"the prefix is {abs(gap):.1f} points {lead} {other['title']} and stores "
            f"{_size(prefix['stored_bytes'])} per task against {_size(other['stored_bytes'])} "
            f"({_ratio(prefix['stored_bytes'], other['stored_bytes'])}); it trained "
            f"{prefix['train_s_to_kept']:.1f} s to its kept step against "
            f"{other['train_s_to_kept']:.1f} s "
            f"({_ratio(prefix['train_s_to_kept'], other['train_s_to_kept'])}) and peaked at "
            f"{_size(prefix['peak_rss_bytes'])} of memory against "
            f"{_size(other['peak_rss_bytes'])}")
    elif prefix is None:
        out.append("the prefix was not among the methods that finished")
    if has_shift:
        out += _shift_words(done, key)
    else:
        out.append("no shift set was given, so nothing here says how the methods travel to "
                   "data from another source")
    failed = [r for r in rows if "error" in r]
    if failed:
        out.append("did not finish: " + "; ".join(f"{r['title']} ({r['error']})"
                                                  for r in failed))
    return out


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


COLUMNS = ("method", "val F1", "val acc", "test F1", "shift F1", "trainable", "share",
           "stored", "s to kept", "s total", "ex/s", "peak RSS", "kept step")


def table_rows(rows: Sequence[dict]) -> list[list[str]]:
    """The comparison's rows as table cells (COLUMNS), for the CLI and the app."""
    def f1(r: dict, key: str) -> str:
        return f"{r[key]['macro_f1']:.3f}" if r.get(key) else "-"

    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["title"], "failed", *["-"] * (len(COLUMNS) - 2)])
            continue
        share = r["trainable_share"]
        cells.append([
            r["title"], f1(r, "validation"), f"{r['validation']['accuracy']:.3f}",
            f1(r, "test"), f1(r, "shift"), f"{r['trainable_parameters']:,}",
            "-" if share is None else f"{share:.4%}", _size(r["stored_bytes"]),
            f"{r['train_s_to_kept']:.1f}", f"{r['train_s']:.1f}",
            "-" if r["examples_per_s"] is None else f"{r['examples_per_s']:.1f}",
            _size(r["peak_rss_bytes"]),
            "-" if r["kept_step"] is None else str(r["kept_step"]),
        ])
    return cells


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table, columns aligned."""
    cells = [list(COLUMNS), *table_rows(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
