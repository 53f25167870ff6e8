"""Phrases shared by the data rooms' messages: rows named by number, values cut short, lists
joined with "and".

Row numbers count data rows from 1 (the header is not a row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

LIST_LIMIT = 10  # messages name this many rows, then "and N more"


def rows_phrase(rows: Sequence[int], noun: str = "row") -> str:
    """'1 row (row 4)', '3 rows (rows 1, 2 and 9)', '25 rows (rows 1, ..., 10 and 15 more)'."""
    n = len(rows)
    count = f"{n} {noun}{'s' if n != 1 else ''}"
    if n == 1:
        return f"{count} (row {rows[0]})"
    shown = [str(r) for r in rows[:LIST_LIMIT]]
    if n > LIST_LIMIT:
        return f"{count} (rows {', '.join(shown)} and {n - LIST_LIMIT} more)"
    return f"{count} (rows {joined(shown)})"


def short(value: str, limit: int = 40) -> str:
    """repr of a value cut to `limit` characters, for naming labels in messages."""
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


def joined(items: Iterable[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"
