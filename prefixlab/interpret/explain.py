"""What a prefix does to each decision: one text's label probabilities under several prefixes
(the trained prefix, its start, the bare model), and which input words each decision leans on.

Method: leave one word out. A word is a run of letters/digits (with inner apostrophes, so
"don't" is one word); the text without word w drops w and the spaces after it (before it, at
the end). A word's push on label k is p(k | text) - p(k | text without w): positive when the
word's presence raises k. Its effect on a decision is its push on the label decided for the
whole text under that prefix. Every variant of every prefix is one row of one mixed batch
(engine.mixed): the prefixes differ per row, the forward is shared.

Defined edge cases: a text with no word has no variants (empty effects); a one-word text's
variant is the empty text; a word wholly past the encoder's text budget is cut before the
model reads it, so removing it leaves the prompt read unchanged: its effect is exactly 0.

Over many rows (`word_influence`), a word's push on each label is averaged over the rows it
occurs in; words seen fewer than `min_count` times are left out (one row's noise otherwise
tops the list).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prefixlab.engine.encode import Encoder
from prefixlab.engine.mixed import ScoreItem, mixed_score_labels

METHOD = ("**Leave one word out**: each input word is removed in turn and the text scored "
          "again; a word's effect is how much the probability of the decided label drops "
          "without it (green: the word supports the decision, red: it argues against it). "
          "All variants are scored in one mixed batch.")
WORD = re.compile(r"\w+(?:['’]\w+)*")
BATCH_ROWS = 64  # rows per forward: one text's variants under two or three prefixes fit


@dataclass(frozen=True)
class Source:
    """One way of reading a text: a prefix (None: the bare model) and its encoder."""

    name: str
    kv: torch.Tensor | None  # (L, 2, H_kv, P, D)
    encoder: Encoder


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each word in `text`, in order."""
    return [m.span() for m in WORD.finditer(text)]


def without_word(text: str, span: tuple[int, int]) -> str:
    """`text` with the word at `span` removed, and the spaces after it (at the end of the
    text, before it), so that no double space is left behind."""
    start, end = span
    after = end
    while after < len(text) and text[after] == " ":
        after += 1
    if after == len(text):  # the last word: take the spaces before it instead
        while start > 0 and text[start - 1] == " ":
            start -= 1
        after = end
    return text[:start] + text[after:]


@dataclass
class Explanation:
    """One text read under several sources, and with each word left out under some of them."""

    text: str
    labels: list[str]
    spans: list[tuple[int, int]]  # (W,) the words' places in `text`
    probs: dict[str, np.ndarray]  # source -> (K,) label probabilities of the whole text
    left_out: dict[str, np.ndarray]  # source -> (W, K) probabilities with word w removed

    @property
    def words(self) -> list[str]:
        return [self.text[s:e] for s, e in self.spans]

    def decision(self, source: str) -> int:
        """The label index decided for the whole text under `source`."""
        return int(np.argmax(self.probs[source]))

    def push(self, source: str) -> np.ndarray:
        """(W, K) how much each word's presence raises each label's probability."""
        return self.probs[source][None, :] - self.left_out[source]

    def effect(self, source: str) -> np.ndarray:
        """(W,) each word's push on the label decided under `source`."""
        if not self.spans:
            return np.zeros(0)
        return self.push(source)[:, self.decision(source)]

    def to_json(self) -> dict:
        return {"text": self.text, "labels": self.labels, "words": self.words,
                "probabilities": {s: p.round(6).tolist() for s, p in self.probs.items()},
                "decision": {s: self.labels[self.decision(s)] for s in self.probs},
                "effect": {s: self.effect(s).round(6).tolist() for s in self.left_out}}


def explain_texts(model: nn.Module, sources: Sequence[Source], texts: Sequence[str],
                  leave_out: Sequence[str], batch_rows: int = BATCH_ROWS
                  ) -> list[Explanation]:
    """Each text under every source, and each of its words left out under the sources named
    in `leave_out`: every row of every text in shared mixed batches. The sources must share
    labels (they are one run's readings)."""
    by_name = {s.name: s for s in sources}
    missing = [name for name in leave_out if name not in by_name]
    if missing:
        raise ValueError(f"leave_out names {missing}; the sources are {list(by_name)}")
    labels = sources[0].encoder.labels
    items: list[ScoreItem] = []
    plans = []
    for text in texts:
        spans = word_spans(text)
        whole = len(items)
        items += [ScoreItem(s.kv, s.encoder, text) for s in sources]
        variants = [without_word(text, span) for span in spans]
        parts = {}
        for name in leave_out:
            parts[name] = len(items)
            s = by_name[name]
            items += [ScoreItem(s.kv, s.encoder, v) for v in variants]
        plans.append((text, spans, whole, parts))
    scored = mixed_score_labels(model, items, batch_size=batch_rows)
    out = []
    for text, spans, whole, parts in plans:
        probs = {s.name: scored[whole + i] for i, s in enumerate(sources)}
        K = len(labels)
        left = {name: (np.stack(scored[at:at + len(spans)]) if spans else np.zeros((0, K)))
                for name, at in parts.items()}
        out.append(Explanation(text, list(labels), spans, probs, left))
    return out


@dataclass
class WordInfluence:
    """Per label, the words whose presence raises it most (mean push over their rows)."""

    labels: list[str]
    top: dict[str, list[tuple[str, float, int]]]  # label -> [(word, mean push, rows)]
    candidates: int  # distinct words seen at least min_count times
    rows: int


def word_influence(explanations: Sequence[Explanation], source: str, n: int = 20,
                   min_count: int = 3, keep: Callable[[str], bool] | None = None
                   ) -> WordInfluence:
    """The `n` words per label whose presence raises it most under `source`, averaged over
    the rows each occurs in (words lowercased; fewer than `min_count` rows: left out;
    `keep(word)` False: left out, e.g. words another model has no weight for)."""
    if not explanations:
        raise ValueError("no explained rows to rank words over")
    labels = explanations[0].labels
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(labels)))
    counts: dict[str, int] = defaultdict(int)
    for ex in explanations:
        push = ex.push(source)  # (W, K)
        seen: dict[str, np.ndarray] = {}
        for word, row in zip(ex.words, push, strict=True):
            w = word.lower()
            # A word twice in a row counts once there: its strongest push.
            seen[w] = row if w not in seen else np.where(abs(row) > abs(seen[w]), row, seen[w])
        for w, row in seen.items():
            sums[w] += row
            counts[w] += 1
    words = [w for w, c in counts.items() if c >= min_count and (keep is None or keep(w))]
    top = {}
    for k, label in enumerate(labels):
        ranked = sorted(words, key=lambda w: (-sums[w][k] / counts[w], w))[:n]
        top[label] = [(w, float(sums[w][k] / counts[w]), counts[w]) for w in ranked]
    return WordInfluence(list(labels), top, len(words), len(explanations))


def overlap(ours: Sequence[str], theirs: Sequence[str]) -> float:
    """The share of `ours` also in `theirs` (0 when ours is empty)."""
    return len(set(ours) & set(theirs)) / len(ours) if ours else 0.0


__all__ = ["METHOD", "Explanation", "Source", "WordInfluence", "explain_texts", "overlap",
           "without_word", "word_influence", "word_spans"]
