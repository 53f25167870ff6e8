"""The CSV reader against generated and mutated files (hypothesis): whatever bytes arrive, it
either reads a table whose rows line up or refuses with a DataError that says what is wrong;
never another exception, never a message without words a user can act on.

Files are built from what real exports vary in: encodings (UTF-8 with or without BOM, UTF-16,
Latin-1), delimiters, quoting, line endings, blank and ragged rows, control bytes, empty and
huge cells, wide and tall tables; then some are mutated byte by byte. The profile decides how
many: `ci` (the default, 150 files each, seconds) or `full` (10,000 files each, or
PREFIXLAB_FUZZ_EXAMPLES):

    HYPOTHESIS_PROFILE=full python -m pytest tests/test_fuzz_csv.py
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixlab.data.labeled import load_labeled_csv
from prefixlab.data.reading import DataError, read_table

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("full", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          max_examples=int(os.environ.get("PREFIXLAB_FUZZ_EXAMPLES", "10000")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MAX_BYTES = 2_000_000  # the reader's limit in these tests: a huge cell or table stays in reach
INTERNAL = re.compile(r"Traceback|Error\(|object at 0x|NoneType|KeyError|IndexError|"
                      r"AttributeError|codec can't|line \d+, in ")

CELL_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                    max_size=40)
PLAIN = st.text(alphabet=string.ascii_letters + string.digits + " .,!?'-", max_size=30)


@st.composite
def cells(draw) -> str:
    """One cell as a person's export might hold it."""
    kind = draw(st.sampled_from(["plain"] * 4 + ["any", "empty", "space", "number", "quoted",
                                                 "control", "newline"] * 2 + ["huge"]))
    if kind == "plain":
        return draw(PLAIN)
    if kind == "any":
        return draw(CELL_TEXT)
    if kind == "empty":
        return ""
    if kind == "space":
        return " " * draw(st.integers(1, 4))
    if kind == "number":
        return str(draw(st.integers(-10**6, 10**6)))
    if kind == "quoted":
        return '"' + draw(PLAIN).replace('"', '""') + '"'
    if kind == "huge":
        return "x" * draw(st.integers(20_000, 60_000))
    if kind == "control":
        return draw(PLAIN) + chr(draw(st.integers(0, 31))) + draw(PLAIN)
    return draw(PLAIN) + "\n" + draw(PLAIN)


@st.composite
def csv_bytes(draw) -> bytes:
    """A whole file: header and rows joined by a delimiter, encoded one of several ways."""
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    width = draw(st.integers(1, 8))
    height = draw(st.integers(0, 60))
    header = draw(st.lists(st.sampled_from(["text", "label", "tweet", "class", "id", "", "text",
                                            "Sentiment", "body"]) | PLAIN,
                           min_size=width, max_size=width))
    rows = []
    for _ in range(height):
        ragged = draw(st.integers(-1, 1)) if draw(st.booleans()) else 0
        rows.append(draw(st.lists(cells(), min_size=max(0, width + ragged),
                                  max_size=max(0, width + ragged))))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = [delimiter.join(header)] + [delimiter.join(r) for r in rows]
    if draw(st.booleans()):
        lines += [""] * draw(st.integers(1, 3))  # trailing blank lines
    text = newline.join(lines)
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1",
                                     "cp1252"]))
    return text.encode(encoding, errors="replace")


@st.composite
def mutated(draw) -> bytes:
    """A generated file with a few bytes flipped, cut or inserted."""
    data = bytearray(draw(csv_bytes()))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = bytes(draw(st.lists(st.integers(0, 255), min_size=1, max_size=8)))
        else:
            del data[at:]
    return bytes(data)


def _check(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "upload.csv"
    path.write_bytes(data)
    try:
        table = read_table(path, max_bytes=MAX_BYTES)
    except DataError as e:
        _check_refusal(e, path)
        return
    assert all(isinstance(c, str) for c in table.frame.columns)
    try:
        labeled = load_labeled_csv(path, max_bytes=MAX_BYTES)
    except DataError as e:
        _check_refusal(e, path)
        return
    n = len(labeled)
    assert n > 0 and len(labeled.texts) == len(labeled.labels) == len(labeled.rows) == n
    assert all(t.strip() and len(t) <= 20_000 for t in labeled.texts)
    assert all(label.strip() for label in labeled.labels)
    assert sorted(set(labeled.labels)) <= sorted(labeled.label_names)
    assert labeled.rows == sorted(set(labeled.rows)) and labeled.rows[0] >= 1


def _check_refusal(error: DataError, path: Path) -> None:
    message = str(error)
    assert len(message) >= 20 and re.search(r"[a-z]{3}", message), message
    assert not INTERNAL.search(message), message


@given(data=csv_bytes())
def test_a_generated_csv_is_read_or_refused_with_a_reason(tmp_path_factory, data):
    _check(tmp_path_factory.mktemp("fuzz"), data)


@given(data=mutated())
def test_a_mutated_csv_is_read_or_refused_with_a_reason(tmp_path_factory, data):
    _check(tmp_path_factory.mktemp("fuzz"), data)


@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_are_read_or_refused_with_a_reason(tmp_path_factory, data):
    _check(tmp_path_factory.mktemp("fuzz"), data)


@pytest.mark.parametrize("width, height", [(200, 3), (2, 20_000)])
def test_wide_and_tall_tables(tmp_path, width, height):
    header = ",".join(["text", "label"] + [f"c{i}" for i in range(width - 2)])
    row = ",".join(["a short text", "yes"] + ["1"] * (width - 2))
    rows = [row.replace("yes", "no") if i % 2 else row for i in range(height)]
    path = tmp_path / "big.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    data = load_labeled_csv(path, "text", "label", max_bytes=50_000_000)
    assert len(data) == height and data.label_names == ["no", "yes"]
