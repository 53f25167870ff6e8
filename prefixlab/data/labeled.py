"""Labeled examples from a CSV: `LabeledData` (texts, labels, and the file row each came from).

`load_labeled_csv` reads the file (`data.reading`), chooses the text and label columns (named,
else guessed by `data.columns`), drops unusable rows with a warning that names them, and
raises one `DataError` listing every problem that makes the file unusable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from prefixlab.data.columns import column_strings, guess_columns, holds_values, resolve_column
from prefixlab.data.messages import LIST_LIMIT, joined, rows_phrase, short
from prefixlab.data.reading import MAX_FILE_BYTES, DataError, Table, read_table

# Label cells that spreadsheet programs and pandas write for "no value". "NA" is left out on
# purpose: it is a real label in some data sets (e.g. a region), and dropping it would be silent.
_MISSING_LABELS = frozenset({"nan", "-nan", "none", "null", "n/a", "#n/a", "<na>"})
# More distinct labels than this share of the rows (and than _MANY_LABELS) is an id or a
# measurement, not a set of classes: most "labels" would have one example.
_LABEL_SHARE = 0.5
_MANY_LABELS = 10


@dataclass
class LabeledData:
    """Examples from one CSV: `texts[i]` has label `labels[i]` and came from data row `rows[i]`."""

    texts: list[str]  # stripped, at most max_text_chars long
    labels: list[str]  # exactly as in the file, stripped; numbers stay strings ("0", not 0.0)
    rows: list[int]  # 1-based data row in the file (header not counted): messages say "row 5"
    label_names: list[str]  # sorted unique labels of the source file (a subset keeps them all)
    warnings: list[str]  # human messages about dropped rows, duplicates, rare labels, ...
    text_column: str
    label_column: str

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.labels) == len(self.rows):
            raise ValueError(
                f"texts, labels and rows must have the same length, got {len(self.texts)}, "
                f"{len(self.labels)} and {len(self.rows)}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabeledData:
        """The examples at `indices`, in that order; label names and warnings are kept."""
        return LabeledData(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            rows=[self.rows[i] for i in indices],
            label_names=list(self.label_names),
            warnings=list(self.warnings),
            text_column=self.text_column,
            label_column=self.label_column,
        )

    def label_counts(self) -> dict[str, int]:
        """Examples per label, in `label_names` order (0 for a label absent from this subset)."""
        counts = Counter(self.labels)
        return {name: counts.get(name, 0) for name in self.label_names}


def load_labeled_csv(
    path: str | Path,
    text_column: str | None = None,
    label_column: str | None = None,
    *,
    max_text_chars: int = 20_000,
    max_bytes: int = MAX_FILE_BYTES,
) -> LabeledData:
    """Texts and labels from a CSV; a column left as None is guessed (`guess_columns`).

    Rows with an empty text or label are dropped with a warning that names them. Raises
    `DataError` listing every problem that makes the file unusable.
    """
    if max_text_chars < 1:
        raise ValueError(f"max_text_chars must be at least 1, got {max_text_chars}")
    table = read_table(path, max_bytes=max_bytes)
    frame = table.frame
    columns = [str(c) for c in frame.columns]
    warnings = list(table.warnings)
    problems: list[str] = []

    if len(frame) == 0:
        problems.append(
            f"the file has a header ({joined(map(repr, columns))}) but no data rows below it"
        )
    if len(columns) < 2:
        problems.append(
            f"only one column was found ({columns[0]!r}): no comma, semicolon, tab or pipe "
            "separates a text column from a label column, so this is not a labeled CSV"
        )
        raise DataError(problems, path)

    text_col, label_col, column_problems = _choose_columns(table, text_column, label_column)
    problems += column_problems
    if text_col is not None and len(frame) and holds_values(frame, text_col):
        problems.append(
            f"the text column {text_col!r} holds numbers or dates (e.g. "
            f"{short(column_strings(frame, text_col)[0])}), not text to classify; choose a column "
            "of sentences"
        )
    if problems or text_col is None or label_col is None:
        raise DataError(problems, path)

    before = len(warnings)
    texts, labels, rows = _clean_rows(frame, text_col, label_col, warnings)
    dropped = "; ".join(warnings[before:])  # the row-dropping notes, said again in an error
    if not texts:
        raise DataError(f"no usable rows: {dropped}", path)
    label_names = sorted(set(labels))
    if len(label_names) < 2:
        raise DataError(
            f"the label column {label_col!r} has only one distinct label, "
            f"{short(label_names[0])}, in {len(texts)} usable rows; a classifier needs at "
            "least 2 labels"
            + (f"; {dropped}" if dropped else ""),
            path,
        )

    if len(label_names) > max(_MANY_LABELS, _LABEL_SHARE * len(texts)):
        once = sum(1 for n in Counter(labels).values() if n == 1)
        raise DataError(
            f"the label column {label_col!r} has {len(label_names)} different values in "
            f"{len(texts)} usable rows ({once} of them seen only once), e.g. "
            f"{joined(map(short, label_names[:3]))}: that looks like an id or a measurement, "
            "not a set of classes; choose a column whose values repeat (e.g. positive, "
            "negative)",
            path,
        )
    texts = _truncate(texts, rows, max_text_chars, warnings)
    _warn_duplicates(texts, labels, rows, warnings)
    _warn_rare_labels(labels, rows, label_col, warnings)
    return LabeledData(texts, labels, rows, label_names, warnings, text_col, label_col)


def _choose_columns(
    table: Table, text_column: str | None, label_column: str | None
) -> tuple[str | None, str | None, list[str]]:
    """(text column, label column, problems): requested names resolved, the others guessed.

    Problems: a missing column, a guess that failed (not reported for a file without rows,
    whose real problem is already said), an ambiguous duplicated name, one column for both.
    """
    frame = table.frame
    columns = [str(c) for c in frame.columns]
    problems: list[str] = []
    text_col = label_col = None
    if text_column is not None:
        text_col, problem = resolve_column(text_column, columns, "text")
        problems += [problem] if problem else []
    if label_column is not None:
        label_col, problem = resolve_column(label_column, columns, "label")
        problems += [problem] if problem else []
    if problems:
        return None, None, problems

    requested = {"text": text_column, "label": label_column}
    guessed = {role for role, name in requested.items() if name is None}
    if guessed:
        rest = [c for c in columns if c not in (text_col, label_col)]
        guess_text, guess_label = guess_columns(rest, frame[rest] if len(frame) else None)
        if text_col is None and label_col is None:
            text_col, label_col = guess_text, guess_label
        elif text_col is None:
            text_col = guess_text
        else:
            label_col = guess_label
        for role, column in (("text", text_col), ("label", label_col)):
            if role == "text" and column is None and len(frame) and all(
                    holds_values(frame, c) for c in columns if c != label_col):
                problems.append(
                    f"no column holds text: the columns {joined(map(repr, columns))} hold only "
                    "numbers or dates; a labeled CSV needs a column of texts (sentences, reviews, "
                    "tweets) and a column of labels"
                )
            elif column is None and len(frame):
                problems.append(
                    f"could not tell which column holds the {role}s; the columns in the file "
                    f"are {joined(map(repr, columns))}; choose the {role} column explicitly"
                )
        if text_col is None or label_col is None:
            return None, None, problems

    if text_col == label_col:
        problems.append(
            f"the text column and the label column are the same column ({text_col!r}); "
            "choose two different columns"
        )
    for name, renamed in table.duplicate_columns.items():
        for role, column in (("text", text_col), ("label", label_col)):
            if column == name or (role in guessed and column in renamed):
                problems.append(
                    f"the header has {len(renamed)} columns named {name!r}, so the {role} "
                    "column is ambiguous; rename one of them"
                )
    return text_col, label_col, problems


def _clean_rows(
    frame: pd.DataFrame, text_col: str, label_col: str, warnings: list[str]
) -> tuple[list[str], list[str], list[int]]:
    """Stripped (texts, labels, rows) of usable rows; a warning for each kind of dropped row."""
    filled = frame.fillna("")
    empty_row = ~filled.apply(lambda col: col.str.strip() != "").any(axis=1)
    blank_rows: list[int] = []
    empty_text: list[int] = []
    empty_label: list[int] = []
    missing_label: list[int] = []
    markers: list[str] = []
    texts, labels, rows = [], [], []
    for i, (text, label, blank) in enumerate(
        zip(filled[text_col].tolist(), filled[label_col].tolist(), empty_row.tolist(), strict=True)
    ):
        row = i + 1
        text, label = text.strip(), label.strip()
        if blank:
            blank_rows.append(row)
        elif not text:
            empty_text.append(row)
        elif not label:
            empty_label.append(row)
        elif label.casefold() in _MISSING_LABELS:
            missing_label.append(row)
            if label not in markers:
                markers.append(label)
        else:
            texts.append(text)
            labels.append(label)
            rows.append(row)

    if blank_rows:
        warnings.append(f"ignored {rows_phrase(blank_rows, 'empty row')}")
    if empty_text:
        warnings.append(
            f"dropped {rows_phrase(empty_text)} with an empty or whitespace-only text "
            f"({text_col!r})"
        )
    if empty_label:
        warnings.append(
            f"dropped {rows_phrase(empty_label)} with an empty or whitespace-only label "
            f"({label_col!r})"
        )
    if missing_label:
        warnings.append(
            f"dropped {rows_phrase(missing_label)} whose label means 'missing' "
            f"({joined(map(repr, markers))}) in {label_col!r}"
        )
    return texts, labels, rows


def _truncate(texts: list[str], rows: list[int], limit: int, warnings: list[str]) -> list[str]:
    long = [i for i, t in enumerate(texts) if len(t) > limit]
    if not long:
        return texts
    longest = max(len(texts[i]) for i in long)
    warnings.append(
        f"{rows_phrase([rows[i] for i in long])} had a text longer than {limit:,} characters "
        f"(the longest {longest:,}); cut to the first {limit:,}"
    )
    return [t[:limit] if len(t) > limit else t for t in texts]


def _warn_duplicates(
    texts: list[str], labels: list[str], rows: list[int], warnings: list[str]
) -> None:
    first: dict[str, int] = {}
    repeats, conflicts = [], 0
    for i, text in enumerate(texts):
        if text in first:
            repeats.append(rows[i])
            conflicts += labels[first[text]] != labels[i]
        else:
            first[text] = i
    if repeats:
        clash = f"; {conflicts} of them with a different label" if conflicts else ""
        warnings.append(
            f"{len(repeats)} duplicate texts: {rows_phrase(repeats)} repeat the text of an "
            f"earlier row exactly{clash}"
        )


def _warn_rare_labels(
    labels: list[str], rows: list[int], label_col: str, warnings: list[str]
) -> None:
    counts = Counter(labels)
    row_of = {label: row for label, row in zip(labels, rows, strict=True) if counts[label] == 1}
    single = sorted(row_of.items())
    if single:
        shown = ", ".join(f"{short(label)} (row {row})" for label, row in single[:LIST_LIMIT])
        more = f" and {len(single) - LIST_LIMIT} more" if len(single) > LIST_LIMIT else ""
        warnings.append(
            f"{len(single)} label{'s' if len(single) > 1 else ''} with only one example: "
            f"{shown}{more}; such a label cannot be both trained on and validated"
        )
    if len(counts) > 50 and len(counts) > len(labels) // 2:
        warnings.append(
            f"the label column {label_col!r} has {len(counts):,} distinct values in "
            f"{len(labels):,} rows; is it really the label column?"
        )
