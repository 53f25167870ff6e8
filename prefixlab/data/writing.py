"""Writing tables back out as CSV: every string cell neutralized against formula injection,
every cell holding a line break quoted (`csv_text`), the file replaced atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from prefixlab.files import atomic_write_text


def neutralize_cell(value: str) -> str:
    """Guard against CSV/formula injection: prefix "'" to a cell a spreadsheet would run.

    A cell starting with = + - @ (or a tab or carriage return, which some programs skip
    before looking for those) is read as a formula by Excel, LibreOffice and Sheets.
    """
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value


def write_csv(frame: pd.DataFrame, path: str | Path) -> int:
    """Write `frame` as UTF-8 CSV without its index, every string cell (header included)
    neutralized, atomically: a temp file in the same folder, then os.replace. Returns how
    many cells got the leading "'" (so a caller can say so)."""
    safe = frame.map(lambda v: neutralize_cell(v) if isinstance(v, str) else v)
    safe.columns = [neutralize_cell(c) if isinstance(c, str) else c for c in frame.columns]
    changed = int(frame.map(lambda v: isinstance(v, str) and neutralize_cell(v) != v)
                  .to_numpy().sum()) + sum(
        a != b for a, b in zip(safe.columns, frame.columns, strict=True))
    atomic_write_text(path, csv_text(safe))
    return changed


def csv_text(frame: pd.DataFrame) -> str:
    """`frame` as CSV text without its index: rows end in "\n", and a cell that holds a line
    break ("\r" or "\n") is quoted, so every CSV reader gets the same rows back.

    The csv module quotes a cell only for a character of its line terminator: with "\n" alone a
    lone "\r" (old Mac line ends, tweets) goes out bare and readers split the row there. So pandas
    formats the values (numbers, NaN) with "\r\n", which quotes both, and each parsed row is
    written again with that terminator, swapped for "\n".
    """
    rows = csv.reader(io.StringIO(frame.to_csv(index=False, lineterminator="\r\n"), newline=""))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    lines = []
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(row)
        lines.append(buffer.getvalue()[:-2])  # the row's own "\r\n"; quoted ones stay inside
    return "".join(line + "\n" for line in lines)
