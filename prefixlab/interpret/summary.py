"""The inspection's summary in plain words: what training changed, what still reads as the
start, what matters (and which slot is only an attention sink), what the prefix resembles.

Built from the readouts (change, readouts, maps, knockout, ablation) only; the Inspect tab
and inspection.html show it first, before any chart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prefixlab.interpret.ablation import Sink
from prefixlab.interpret.change import PrefixChange, origin_text
from prefixlab.interpret.frame import KINDS
from prefixlab.interpret.knockout import Knockout
from prefixlab.interpret.nearest import NearestTokens

WAYWARDNESS = (
    "A nearest word is a hint, not an explanation: a prefix can sit near unrelated words and "
    "still do its task (Khashabi et al. 2022, \"Prompt Waywardness\"); the knockout measures "
    "what it does."
)

GLOSSARY = [
    ("␣", "a space inside a token (\"␣cat\" is the token \" cat\", a word after a space)"),
    ("⏎ / ⇥", "a newline / a tab inside a token"),
    ("slot", "one of the prefix's P virtual tokens (P0, P1, ...), present at every layer"),
    ("key / value", "what each layer caches per token: keys decide who attends, values what "
                    "they read"),
    ("score", "centered cosine with the real token's key or value in that slot (1 = same)"),
    ("baseline", "the best score random vectors of the prefix's size get: scores near it "
                 "mean nothing"),
    ("knockout", "hide a slot (all layers) or a layer (all slots) from attention and score "
                 "the held-out rows again"),
    ("reset to start", "set a slot or a layer back to where training started and score the "
                       "held-out rows again: what training added there"),
    ("change", "the trained prefix minus its start; its value readout lists the tokens "
               "training pushed up (and down)"),
    ("start / label / data word, new", "a nearest token that is a token of the start text, "
                                       "of a label, of the training data, or none of them"),
    ("attention sink", "a slot the model parks attention on whatever the input: hiding it "
                       "costs a lot, but not because it knows the task"),
    ("log-prob", "mean log-probability of the correct label among the labels (0 is certain)"),
]

# A match counts as "clearly above" the random baseline when it beats it by this many of the
# baseline's standard deviations and by this much in absolute score.
CLEAR_STDS = 3.0
CLEAR_MARGIN = 0.1


def _moved(initial: torch.Tensor, trained: torch.Tensor) -> list[str]:
    """["keys by 3%", "values by 8%"]: the distance from the start over its size, all layers."""
    parts = []
    for i, kind in enumerate(KINDS):
        start = initial[:, i].float()
        moved = float((trained[:, i].float() - start).norm() / start.norm().clamp_min(1e-12))
        parts.append(f"{kind}s by {moved:.0%}")
    return parts


def movement_line(initial: torch.Tensor | None, trained: torch.Tensor) -> str:
    """How far keys and values moved from the initialization, relative to its size."""
    if initial is None or initial.shape != trained.shape:
        return "No snapshot of the initialization was saved, so movement is unknown."
    parts = _moved(initial, trained)
    return (f"**Movement**: since the start, the {parts[0]} and the {parts[1]} of their size "
            f"(relative distance, all layers).")


def _spans(layers: Sequence[int]) -> str:
    """[3, 20, 21, 22] -> "3, 20–22"."""
    out: list[str] = []
    for i in layers:
        if out and out[-1].split("–")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('–')[0]}–{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def _tokens(ranked: Sequence[tuple[int, float]], names: Mapping[int, str], n: int = 3) -> str:
    """The first n tokens that read as text: a byte-level piece of a character decodes to
    U+FFFD (the replacement character) and would name nothing."""
    shown = [names.get(t, str(t)) for t, _ in ranked]
    return ", ".join(f"`{_show(t)}`" for t in [t for t in shown if "\ufffd" not in t][:n])


def change_line(change: PrefixChange | None, initial: torch.Tensor | None,
                trained: torch.Tensor, start_note: str = "") -> str:
    """The summary's first line: what training changed, and which way the change pushes."""
    if change is None or initial is None:
        return (f"**What training changed**: unknown — {start_note or 'the start is unavailable'}"
                "; every readout below is of the learned prefix alone.")
    if not change.moved:
        return ("**What training changed**: nothing — the prefix is still its start"
                f"{f' ({start_note})' if start_note else ''}.")
    per_kind = change.kind_movement().mean(0)  # (2,)
    kind = KINDS[int(np.argmax(per_kind))]
    layers = change.most_moved(kind)
    parts = _moved(initial, trained)
    line = (f"**What training changed**: the {kind}s of layer{'s' * (len(layers) > 1)} "
            f"{_spans(layers)} moved most (overall, {parts[0]} and {parts[1]} of their start)")
    shift = change.label_shift(change.most_moved("value"))
    if len(shift) > 1:
        line += (f"; the change pushes toward ‘{shift[0][0]}’ and away from ‘{shift[-1][0]}’ "
                 f"(label push of the most-moved value layers)")
    toward, away = _tokens(change.toward, change.labels), _tokens(change.away, change.labels)
    if toward and away:
        line += f"; of all tokens it promotes {toward} and demotes {away}"
    return line + "."


def start_line(nearest: NearestTokens, initial: torch.Tensor | None, trained: torch.Tensor,
               words: Mapping[str, Sequence[int]]) -> str | None:
    """What still reads as the start: the clear nearest words that are start words."""
    start_ids = set(words.get("init text", ()))
    if not start_ids:
        if initial is None:
            return None  # the start is unknown: the first line said so
        return ("**What still reads as the start**: the prefix started from random or zero "
                "vectors, not from text, so no nearest word is a start word.")
    found = [m for m in clear_match_ids(nearest, limit=50) if m[3] in start_ids][:6]
    moved = ("" if initial is None or initial.shape != trained.shape
             else f" (since the start: {' and '.join(_moved(initial, trained))})")
    if not found:
        return ("**What still reads as the start**: none of the nearest words clearly above "
                f"random is a word of the start text{moved}.")
    listed = ", ".join(f"`{_show(nearest.labels[t])}` (layer {layer} {kind} P{p})"
                       for layer, kind, p, t, _, _ in found)
    return (f"**What still reads as the start**: {listed} — words of the start text, where the "
            f"prefix began{moved}; being near them says where it started, not what it learned.")


def clear_match_ids(nearest: NearestTokens, limit: int = 6, skip: set[int] | None = None
                    ) -> list[tuple[int, str, int, int, float, float]]:
    """(layer, kind, slot, token id, score, baseline) of matches clearly above random, best
    margin first, one per token; tokens in `skip` are left out."""
    margin = nearest.margin  # (L, 2, P)
    clear = (margin > CLEAR_STDS * nearest.baseline_std) & (margin > CLEAR_MARGIN)
    found, seen = [], set(skip or ())
    for flat in np.argsort(-np.where(clear, margin, -np.inf), axis=None):
        layer, kind, p = np.unravel_index(flat, margin.shape)
        if not clear[layer, kind, p]:
            break
        token = int(nearest.token_ids[layer, kind, p, 0])
        if token in seen:
            continue
        seen.add(token)
        found.append((int(layer), KINDS[kind], int(p), token,
                      float(nearest.scores[layer, kind, p, 0]),
                      float(nearest.baseline[layer, kind, p])))
        if len(found) >= limit:
            break
    return found


def clear_matches(nearest: NearestTokens, limit: int = 6) -> list[tuple[int, str, int, str,
                                                                        float, float]]:
    """(layer, kind, slot, token, score, baseline) of matches clearly above random, best
    margin first, one per token."""
    return [(layer, kind, p, nearest.labels[t], sc, b)
            for layer, kind, p, t, sc, b in clear_match_ids(nearest, limit)]


def _show(text: str) -> str:
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


@dataclass
class Reference:
    """The run report's figure that the knockout's intact one is read beside."""

    macro_f1: float | None  # the report's macro-F1 (None: the run has no report)
    rows: int  # validation rows the report scored: every one of them
    precision: str  # the dtype the report scored in (the model's own)


def _intact(result: Knockout, reference: Reference | None) -> str:
    """The intact figures, and how they relate to the report's."""
    precision = "" if result.precision == "float32" else f", in {result.precision}"
    if result.f1 is None:  # a generation run's targets
        return (f"on {result.rows} held-out rows{precision}; intact: log-prob "
                f"{result.log_prob:.2f} per target token")
    own = f"intact: log-prob {result.log_prob:.2f}, macro-F1 {result.f1:.2f}"
    if reference is None or reference.macro_f1 is None:
        return f"on {result.rows} held-out rows{precision}; {own}"
    same_rows = result.rows == reference.rows
    same_dtype = result.precision == reference.precision
    if same_rows and same_dtype:
        return (f"on all {result.rows} validation rows; {own}, the report's own figure: the "
                "same rows, decision rule and macro-F1")
    why = " and ".join(w for w, differs in (("the rows", not same_rows),
                                            ("the precision", not same_dtype)) if differs)
    return (f"on the first {result.rows} of the {reference.rows} validation rows{precision}; "
            f"{own}, where the report has {reference.macro_f1:.3f} on all {reference.rows} in "
            f"{reference.precision}: they differ by {why} only (the decision rule and the "
            "macro-F1 are the report's)")


def knockout_lines(result: Knockout, top: int = 3,
                   reference: Reference | None = None) -> list[str]:
    """The slots and layers whose knockout (hide or reset) costs most, in words."""
    verb = "hiding" if result.ablation == "hide" else "resetting"
    noun = "hidden" if result.ablation == "hide" else "reset to start"

    def part(kind: str) -> str:
        ranked = result.ranked(kind)
        costly = [(i, c) for i, c in ranked[:top] if round(c, 2) < 0]  # not "-0.00"
        if not costly:
            return f"{verb} any single {kind} costs nothing measurable"
        name = "P" if kind == "slot" else "layer "
        return ", ".join(f"{name}{i} ({c:+.2f})" for i, c in costly)

    whole = ("" if result.all_f1 is None else f", macro-F1 {result.all_f1:+.2f}")
    head = ("**What matters** (knockout by hiding" if result.ablation == "hide"
            else "**What training added** (knockout by resetting to the start")
    target = "hiding the whole prefix" if result.ablation == "hide" else (
        "resetting the whole prefix to its start")
    return [
        f"{head} {_intact(result, reference)}): {target} changes the log-prob by "
        f"{result.all_log_prob:+.2f}{whole}.",
        f"- Slots that cost most when {noun}: {part('slot')}.",
        f"- Layers that cost most when {noun}: {part('layer')}.",
    ]


def sink_lines(sinks: Sequence[Sink]) -> list[str]:
    return [f"**Attention sink: P{s.slot}** — {'; '.join(s.evidence)}. The model parks "
            "attention there whatever the input, so its knockout cost is the loss of that "
            "place, not task knowledge; resetting it to its start measures what training "
            "added to it." for s in sinks]


def summary_markdown(nearest: NearestTokens, trained: torch.Tensor,
                     initial: torch.Tensor | None, knockout: Knockout | None, *,
                     change: PrefixChange | None = None, start_note: str = "",
                     words: Mapping[str, Sequence[int]] | None = None,
                     reset: Knockout | None = None, sinks: Sequence[Sink] = (),
                     reference: Reference | None = None) -> str:
    """The summary, markdown: what training changed and what still reads as the start (with
    `words`, runs.inspection.run_words, and `change`), the knockouts (or how to get them),
    attention sinks, the nearest words, the caveat. Without `words` the first line is the
    movement alone."""
    if words is None:
        lines = [movement_line(initial, trained)]
    else:
        lines = [change_line(change, initial, trained, start_note)]
        still = start_line(nearest, initial, trained, words)
        if still:
            lines.append(still)
    if knockout is None:
        lines.append("**What matters**: run the knockout to measure which slots and layers "
                     "carry the task.")
    else:
        lines += knockout_lines(knockout, reference=reference)
    lines += sink_lines(sinks)
    if reset is not None:
        lines += knockout_lines(reset, reference=reference)
    skip = set((words or {}).get("init text", ()))
    matches = clear_match_ids(nearest, skip=skip)
    if matches:
        def tag(t: int) -> str:
            return f"{origin_text(t, words)}, " if words is not None else ""

        listed = ", ".join(f"`{_show(nearest.labels[t])}` ({tag(t)}layer {layer} {kind} P{p}, "
                           f"{s:.2f} vs random {b:.2f})" for layer, kind, p, t, s, b in matches)
        lines.append(f"**Nearest words clearly above random**"
                     f"{' (start words aside)' if skip else ''}: {listed}.")
    else:
        lines.append(f"**Nearest words**: {'no other word' if skip else 'none'} stands clearly "
                     f"above the random baseline ({CLEAR_STDS:g} standard deviations and "
                     f"{CLEAR_MARGIN} above it).")
    lines.append(f"*{WAYWARDNESS}*")
    return "\n\n".join(lines)


def glossary_markdown() -> str:
    return "\n".join(f"- **{term}**: {meaning}" for term, meaning in GLOSSARY)


__all__ = ["GLOSSARY", "WAYWARDNESS", "Reference", "change_line", "clear_match_ids",
           "clear_matches", "glossary_markdown", "knockout_lines", "movement_line", "sink_lines",
           "start_line", "summary_markdown"]
