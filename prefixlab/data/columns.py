"""Which column holds the texts and which the labels: guessed by name, else by content.

Also the column helpers the loaders share: a requested name resolved against the header (with a
"did you mean" hint), a column's non-blank cells, whether a column holds numbers or dates.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import pandas as pd

from prefixlab.data.messages import joined

_TEXT_NAMES = (
    "text", "texts", "tweet", "tweets", "sentence", "sentences", "input", "content", "review",
    "body", "message", "comment", "document", "utterance", "question", "query", "prompt",
    "passage", "post", "sms", "description", "headline", "title", "abstract",
)
_LABEL_NAMES = (
    "label", "labels", "class", "classes", "category", "target", "sentiment", "intent", "topic",
    "tag", "emotion", "polarity", "stance", "gold", "output", "y", "rating", "stars",
)
# A column whose name has one of these words holds ids or counts, not texts or labels.
_NOT_CONTENT = frozenset({"id", "ids", "idx", "index", "len", "length", "count", "num", "no"})
# A cell of numbers, dates, times, amounts or percentages: no words to classify.
_VALUE_CELL = re.compile(r"^[\d\s.,:;/+\-_%$€£¥()eETZ]*\d[\d\s.,:;/+\-_%$€£¥()eETZ]*$")
_VALUE_SHARE = 0.9  # a column this full of such cells is not a text column


def guess_columns(
    columns: Sequence[str], frame: pd.DataFrame | None = None
) -> tuple[str | None, str | None]:
    """(text_column, label_column) guessed by name, else by content; None where no guess.

    By name: case-insensitive, whole name or one of its words ("review_text", "SentimentLabel");
    names with id/count words ("tweet_id") never match. By content, when `frame` has rows: the
    text column has the longest average string; the label column has the fewest distinct
    values, at least 2, with some value repeated. Without rows, when one column is known and
    exactly one other remains, that one is taken.
    """
    columns = list(columns)
    text = _best_by_name(columns, _TEXT_NAMES)
    label = _best_by_name([c for c in columns if c != text], _LABEL_NAMES)
    sample = frame.head(1000) if frame is not None and len(frame) else None
    if text is None:
        rest = [c for c in columns if c != label]
        if sample is not None:
            text = _longest_column(sample, [c for c in rest if not holds_values(sample, c)])
        elif label is not None and len(rest) == 1:
            text = rest[0]
    if label is None:
        rest = [c for c in columns if c != text and not _NOT_CONTENT.intersection(_words(c))]
        if sample is not None:
            label = _fewest_values_column(sample, rest)
        elif text is not None and len(rest) == 1:
            label = rest[0]
    return text, label


def _words(name: str) -> list[str]:
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())  # camelCase -> camel_Case
    return [w for w in re.split(r"[^0-9a-z]+", snake.lower()) if w]


def _best_by_name(columns: Sequence[str], names: Sequence[str]) -> str | None:
    """Column whose whole name is in `names` (earliest name wins), else one with such a word."""
    ranked = []
    for position, column in enumerate(columns):
        words = _words(column)
        if not words or _NOT_CONTENT.intersection(words):
            continue
        whole = "".join(words) if len(words) > 1 else words[0]
        if whole in names:
            ranked.append((0, names.index(whole), position, column))
        elif hits := [names.index(w) for w in words if w in names]:
            ranked.append((1, min(hits), position, column))
    return min(ranked)[3] if ranked else None


def holds_values(frame: pd.DataFrame, column: str) -> bool:
    """Are (nearly) all of the column's cells numbers, dates, times or amounts, not words?"""
    values = column_strings(frame.head(1000), column)
    if not values:
        return False
    return sum(bool(_VALUE_CELL.match(v)) for v in values) >= _VALUE_SHARE * len(values)


def column_strings(frame: pd.DataFrame, column: str) -> list[str]:
    """The column's non-blank string cells, stripped."""
    return [v.strip() for v in frame[column].tolist() if isinstance(v, str) and v.strip()]


def _longest_column(frame: pd.DataFrame, columns: Sequence[str]) -> str | None:
    best, best_length = None, 0.0
    for column in columns:
        values = column_strings(frame, column)
        length = sum(map(len, values)) / len(values) if values else 0.0
        if length > best_length:
            best, best_length = column, length
    return best


def _fewest_values_column(frame: pd.DataFrame, columns: Sequence[str]) -> str | None:
    ranked = []
    for position, column in enumerate(columns):
        values = column_strings(frame, column)
        distinct = len(set(values))
        if 2 <= distinct < len(values):  # labels repeat; ids and free text do not
            ranked.append((distinct, sum(map(len, values)) / len(values), position, column))
    return min(ranked)[3] if ranked else None


def resolve_column(requested: str, columns: Sequence[str], role: str) -> tuple[str | None, str]:
    """(column, problem): exact name, else a unique case/space-insensitive match."""
    if requested in columns:
        return requested, ""
    folded = [c for c in columns if c.strip().casefold() == requested.strip().casefold()]
    if len(folded) == 1:
        return folded[0], ""
    by_fold = {c.casefold(): c for c in columns}
    close = difflib.get_close_matches(requested.casefold(), list(by_fold), n=1, cutoff=0.6)
    hint = f" (did you mean {by_fold[close[0]]!r}?)" if close else ""
    return None, (
        f"there is no {role} column named {requested!r}{hint}; the columns in the file are "
        f"{joined(map(repr, columns))}"
    )
