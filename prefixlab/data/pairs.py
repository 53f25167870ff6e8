"""Input -> target pairs from a CSV, for generation runs (data-to-text, rewrites, replies).

The file goes through the same reader as labeled data (`data.reading.read_table`: size limit,
encoding, delimiter, CSV structure) and the same kind of messages: rows with an empty input or
target are dropped with a warning naming them; a file that cannot be used raises one
`DataError` that lists every problem. Splits keep rows that share an input together
(`group_split`): with several references per input (E2E), an input seen in training must not
be scored as held out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from prefixlab.data.columns import column_strings, resolve_column
from prefixlab.data.messages import joined, rows_phrase
from prefixlab.data.reading import MAX_FILE_BYTES, DataError, read_table


@dataclass
class TextPairs:
    """`targets[i]` was written for `inputs[i]`, from data row `rows[i]` of the file."""

    inputs: list[str]
    targets: list[str]
    rows: list[int]
    input_column: str
    target_column: str
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.inputs) == len(self.targets) == len(self.rows):
            raise ValueError(
                f"inputs, targets and rows must have the same length, got {len(self.inputs)}, "
                f"{len(self.targets)} and {len(self.rows)}"
            )

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, indices: Sequence[int]) -> TextPairs:
        return TextPairs([self.inputs[i] for i in indices], [self.targets[i] for i in indices],
                         [self.rows[i] for i in indices], self.input_column, self.target_column,
                         list(self.warnings))

    def distinct_inputs(self) -> int:
        return len(set(self.inputs))


def looks_like_targets(frame: pd.DataFrame, column: str, min_chars: float = 25.0,
                       min_unique: float = 0.5) -> bool:
    """Whether a column holds long, mostly distinct texts (targets to generate), not labels.

    Labels repeat a few short values; generation targets are sentences, most of them unique.
    """
    values = column_strings(frame.head(1000), column)
    if len(values) < 2:
        return False
    mean_chars = sum(map(len, values)) / len(values)
    return mean_chars >= min_chars and len(set(values)) / len(values) >= min_unique


def load_pairs_csv(path: str | Path, input_column: str, target_column: str, *,
                   max_text_chars: int = 20_000, max_bytes: int = MAX_FILE_BYTES) -> TextPairs:
    """Input and target texts from two named columns of a CSV."""
    table = read_table(path, max_bytes=max_bytes)
    frame = table.frame
    columns = [str(c) for c in frame.columns]
    problems: list[str] = []
    if len(frame) == 0:
        problems.append(
            f"the file has a header ({joined(map(repr, columns))}) but no data rows below it"
        )
    chosen = []
    for requested, role in ((input_column, "input"), (target_column, "target")):
        column, problem = resolve_column(requested, columns, role)
        problems += [problem] if problem else []
        chosen.append(column)
    inp, tgt = chosen
    if inp is not None and inp == tgt:
        problems.append(f"the input column and the target column are the same column "
                        f"({inp!r}); choose two different columns")
    for name, renamed in table.duplicate_columns.items():
        for role, column in (("input", inp), ("target", tgt)):
            if column == name:
                problems.append(f"the header has {len(renamed)} columns named {name!r}, so the "
                                f"{role} column is ambiguous; rename one of them")
    if problems or inp is None or tgt is None:
        raise DataError(problems, path)

    warnings = list(table.warnings)
    filled = frame.fillna("")
    inputs, targets, rows = [], [], []
    empty_input, empty_target, blank = [], [], []
    for i, (x, y) in enumerate(zip(filled[inp].tolist(), filled[tgt].tolist(), strict=True)):
        x, y = x.strip(), y.strip()
        if not x and not y:
            blank.append(i + 1)
        elif not x:
            empty_input.append(i + 1)
        elif not y:
            empty_target.append(i + 1)
        else:
            inputs.append(x[:max_text_chars])
            targets.append(y[:max_text_chars])
            rows.append(i + 1)
    if blank:
        warnings.append(f"ignored {rows_phrase(blank)} with neither input nor target")
    if empty_input:
        warnings.append(f"dropped {rows_phrase(empty_input)} with an empty input ({inp!r})")
    if empty_target:
        warnings.append(f"dropped {rows_phrase(empty_target)} with an empty target ({tgt!r})")
    dropped = "; ".join(warnings[len(table.warnings):])
    if not inputs:
        raise DataError(f"no usable rows: {dropped}" if dropped else "no usable rows", path)
    long = sum(len(v) > max_text_chars for v in filled[inp].tolist() + filled[tgt].tolist())
    if long:
        warnings.append(f"{long} cells were longer than {max_text_chars:,} characters; cut")
    seen: set[tuple[str, str]] = set()
    repeats = []
    for x, y, row in zip(inputs, targets, rows, strict=True):
        if (x, y) in seen:
            repeats.append(row)
        seen.add((x, y))
    if repeats:
        warnings.append(f"{rows_phrase(repeats)} repeat an earlier row's input and target "
                        "exactly")
    distinct = len(set(inputs))
    if distinct < 2:
        raise DataError(f"all {len(inputs)} usable rows share one input; a generation run "
                        "needs at least 2 distinct inputs (one to train on, one to hold out)",
                        path)
    return TextPairs(inputs, targets, rows, inp, tgt, warnings)


def group_split(pairs: TextPairs, validation_share: float, seed: int
                ) -> tuple[TextPairs, TextPairs]:
    """(train, validation) by distinct input, deterministic for a seed, each in file order.

    Every row of one input lands on the same side; at least one input goes to each side.
    """
    if not 0 < validation_share < 1:
        raise ValueError(f"validation_share must be between 0 and 1, got {validation_share}")
    distinct = sorted(set(pairs.inputs))
    random.Random(seed).shuffle(distinct)
    k = min(max(1, round(validation_share * len(distinct))), len(distinct) - 1)
    held = set(distinct[:k])
    train = [i for i, x in enumerate(pairs.inputs) if x not in held]
    val = [i for i, x in enumerate(pairs.inputs) if x in held]
    return pairs.subset(train), pairs.subset(val)


def sample_inputs(pairs: TextPairs, n: int | None, seed: int) -> TextPairs:
    """At most `n` distinct inputs (every row of each kept), seeded; all when n is None."""
    distinct = sorted(set(pairs.inputs))
    if n is None or len(distinct) <= n:
        return pairs
    keep = set(random.Random(seed).sample(distinct, n))
    return pairs.subset([i for i, x in enumerate(pairs.inputs) if x in keep])


def sample_rows(pairs: TextPairs, n: int | None, seed: int) -> TextPairs:
    """At most `n` rows, seeded, in file order; all when n is None."""
    if n is None or len(pairs) <= n:
        return pairs
    return pairs.subset(sorted(random.Random(seed).sample(range(len(pairs)), n)))
