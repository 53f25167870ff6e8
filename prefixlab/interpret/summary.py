"""The inspection's summary in plain words: what moved, what matters, what it resembles.

Built from the readouts (readouts, maps, knockout) only; the Inspect tab and
inspection.html show it first, before any chart.
"""

from __future__ import annotations

import numpy as np
import torch

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
    ("log-prob", "mean log-probability of the correct label among the labels (0 is certain)"),
]

# A match counts as "clearly above" the random baseline when it beats it by this many of the
# baseline's standard deviations and by this much in absolute score.
CLEAR_STDS = 3.0
CLEAR_MARGIN = 0.1


def movement_line(initial: torch.Tensor | None, trained: torch.Tensor) -> str:
    """How far keys and values moved from the initialization, relative to its size."""
    if initial is None or initial.shape != trained.shape:
        return "No snapshot of the initialization was saved, so movement is unknown."
    parts = []
    for i, kind in enumerate(KINDS):
        start = initial[:, i].float()
        moved = float((trained[:, i].float() - start).norm() / start.norm().clamp_min(1e-12))
        parts.append(f"{kind}s by {moved:.0%}")
    return (f"**Movement**: since the start, the {parts[0]} and the {parts[1]} of their size "
            f"(relative distance, all layers).")


def clear_matches(nearest: NearestTokens, limit: int = 6) -> list[tuple[int, str, int, str,
                                                                        float, float]]:
    """(layer, kind, slot, token, score, baseline) of matches clearly above random, best
    margin first, one per token."""
    margin = nearest.margin  # (L, 2, P)
    clear = (margin > CLEAR_STDS * nearest.baseline_std) & (margin > CLEAR_MARGIN)
    found, seen = [], set()
    for flat in np.argsort(-np.where(clear, margin, -np.inf), axis=None):
        layer, kind, p = np.unravel_index(flat, margin.shape)
        if not clear[layer, kind, p]:
            break
        token = nearest.labels[int(nearest.token_ids[layer, kind, p, 0])]
        if token in seen:
            continue
        seen.add(token)
        found.append((int(layer), KINDS[kind], int(p), token,
                      float(nearest.scores[layer, kind, p, 0]),
                      float(nearest.baseline[layer, kind, p])))
        if len(found) >= limit:
            break
    return found


def _show(text: str) -> str:
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def knockout_lines(result: Knockout, top: int = 3) -> list[str]:
    """The slots and layers whose knockout costs most, in words."""
    def part(kind: str) -> str:
        ranked = result.ranked(kind)
        costly = [(i, c) for i, c in ranked[:top] if c < 0]
        if not costly:
            return f"hiding any single {kind} costs nothing measurable"
        name = "P" if kind == "slot" else "layer "
        return ", ".join(f"{name}{i} ({c:+.2f})" for i, c in costly)

    f1 = (" per target token" if result.f1 is None  # a generation run's targets
          else f", macro-F1 {result.f1:.2f}")
    whole = ("" if result.all_f1 is None else f", macro-F1 {result.all_f1:+.2f}")
    return [
        f"**What matters** (knockout on {result.rows} held-out rows"
        f"{'' if result.precision == 'float32' else f', in {result.precision}'}; intact: log-prob "
        f"{result.log_prob:.2f}{f1}): hiding the whole prefix changes the log-prob by "
        f"{result.all_log_prob:+.2f}{whole}.",
        f"- Slots that cost most when hidden: {part('slot')}.",
        f"- Layers that cost most when hidden: {part('layer')}.",
    ]


def summary_markdown(nearest: NearestTokens, trained: torch.Tensor,
                     initial: torch.Tensor | None, knockout: Knockout | None) -> str:
    """The summary, markdown: movement, knockout (or how to get it), words, the caveat."""
    lines = [movement_line(initial, trained)]
    if knockout is None:
        lines.append("**What matters**: run the knockout to measure which slots and layers "
                     "carry the task.")
    else:
        lines += knockout_lines(knockout)
    matches = clear_matches(nearest)
    if matches:
        words = ", ".join(f"`{_show(t)}` (layer {layer} {kind} P{p}, {s:.2f} vs random "
                          f"{b:.2f})" for layer, kind, p, t, s, b in matches)
        lines.append(f"**Nearest words clearly above random**: {words}.")
    else:
        lines.append("**Nearest words**: none stands clearly above the random baseline "
                     f"({CLEAR_STDS:g} standard deviations and {CLEAR_MARGIN} above it): the "
                     "prefix does not sit near any real word.")
    lines.append(f"*{WAYWARDNESS}*")
    return "\n\n".join(lines)


def glossary_markdown() -> str:
    return "\n".join(f"- **{term}**: {meaning}" for term, meaning in GLOSSARY)


__all__ = ["GLOSSARY", "WAYWARDNESS", "clear_matches", "glossary_markdown", "knockout_lines",
           "movement_line", "summary_markdown"]
