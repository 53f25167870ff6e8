"""data: every file in tests/bad_inputs/ is one test with its expected outcome, plus
generated cases (a 1 MB cell, an over-limit file), column guessing, splitting and writing."""

from __future__ import annotations

import csv
import importlib.util
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from prefixlab.data.columns import guess_columns
from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.data.reading import DataError, read_table
from prefixlab.data.splits import stratified_split
from prefixlab.data.writing import neutralize_cell, write_csv

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
NOT_CORPUS = {"make_binary.py", ".gitattributes"}
SHARED_DATA = Path(
    os.environ.get("PREFIXLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@dataclass
class Fails:
    """load_labeled_csv raises DataError and its message contains every one of `words`."""

    words: list[str]
    kwargs: dict[str, str] = field(default_factory=dict)


@dataclass
class Loads:
    """load_labeled_csv keeps exactly these rows and labels and gives exactly these warnings
    (each named by a phrase it contains)."""

    rows: list[int]
    labels: list[str]
    warns: list[str] = field(default_factory=list)
    texts: list[str] | None = None
    columns: tuple[str, str] = ("text", "label")
    encoding: str = "utf-8"
    delimiter: str = ","
    kwargs: dict[str, str] = field(default_factory=dict)


EXPLICIT = {"text_column": "text", "label_column": "label"}
ACCENTED = ["naïve café review", "awful film", "résumé of a fine film", "bad film"]
PN = ["pos", "neg", "pos", "neg"]

CASES: dict[str, Fails | Loads] = {
    # Refused: the whole file.
    "empty.csv": Fails(["empty (0 bytes)"]),
    "header_only.csv": Fails(["header ('text' and 'label')", "no data rows"]),
    "fake_xlsx.csv": Fails(["spreadsheet (.xlsx/.xls)", "export it as CSV"]),
    "fake_xls.csv": Fails(["spreadsheet (.xlsx/.xls)", "export it as CSV"]),
    "image.csv": Fails(["PNG image", "not a CSV"]),
    "binary_nul.csv": Fails(["NUL bytes", "byte 14", "binary"]),
    "undecodable.csv": Fails(["does not decode to readable text", "control characters"]),
    "utf16_truncated.csv": Fails(["UTF-16 byte-order mark", "not valid UTF-16", "truncated"]),
    "one_column.csv": Fails(["only one column", "'text'", "not a labeled CSV"]),
    "ragged_rows.csv": Fails(
        ["row 2 (line 3) has 3 fields", "row 4 (line 5) has 3 fields", "2 fields were expected",
         "double quotes"]
    ),
    "unclosed_quote.csv": Fails(["row 2 (from line 3)", "never closed"]),
    "quote_after_close.csv": Fails(["row 2 (line 3)", "after a closing quote"]),
    # Refused: the columns.
    "wrong_columns.csv": Fails(
        ["no text column named 'text' (did you mean 'txt'?)",
         "no label column named 'label' (did you mean 'lable'?)", "'txt' and 'lable'"],
        EXPLICIT,
    ),
    "missing_label_column.csv": Fails(["could not tell which column holds the labels", "'id'"]),
    "no_text_column.csv": Fails(["no column holds text", "'id', 'score' and 'date'"]),
    "numeric_texts.csv": Fails(["text column 'text' holds numbers or dates", "'0.0'"]),
    "duplicate_columns.csv": Fails(["2 columns named 'text'", "text column is ambiguous"]),
    "same_text_label.csv": Fails(
        ["same column ('text')"], {"text_column": "text", "label_column": "text"}
    ),
    # Refused: the rows.
    "id_like_labels.csv": Fails(["24 different values in 24 usable rows", "id or a measurement"]),
    "single_label.csv": Fails(["only one distinct label, 'pos'", "row 4", "empty"]),
    "all_rows_bad.csv": Fails(
        ["no usable rows", "(row 1) with an empty", "(row 2) with an empty", "'NaN'"]
    ),
    # Loaded: encodings, delimiters, quoting, line endings.
    "utf8_bom.csv": Loads([1, 2, 3, 4], PN, texts=ACCENTED, encoding="utf-8-sig"),
    "utf16_le_bom.csv": Loads(
        [1, 2, 3, 4], PN, ["UTF-16 (little-endian"], texts=ACCENTED, encoding="utf-16"
    ),
    "utf16_be_bom.csv": Loads(
        [1, 2, 3, 4], PN, ["UTF-16 (big-endian"], texts=ACCENTED, encoding="utf-16"
    ),
    "utf16_le_nobom.csv": Loads(
        [1, 2, 3, 4], PN, ["no byte-order mark"], texts=ACCENTED, encoding="utf-16-le"
    ),
    "latin1.csv": Loads(
        [1, 2, 3, 4], PN, ["not valid UTF-8 (byte 0xEF on line 2), so it was decoded as Latin-1"],
        texts=ACCENTED,
        encoding="cp1252",
    ),
    "crlf.csv": Loads([1, 2, 3, 4], PN, texts=ACCENTED),
    "semicolon.csv": Loads(
        [1, 2, 3, 4], PN,
        texts=["Good, very good", "Bad, very bad", "Okay, I guess", "Worst; ever"],
        delimiter=";",
    ),
    "tab.csv": Loads(
        [1, 2, 3, 4], PN, texts=["Good, very good", "Bad; very bad", "Okay | fine", "Meh, meh"],
        delimiter="\t",
    ),
    "pipe.csv": Loads(
        [1, 2, 3, 4], PN,
        texts=["Good, very good", "Bad; very bad", "Okay\tfine", 'Not "good", not great'],
        delimiter="|",
    ),
    "quoted_newlines.csv": Loads(
        [1, 2, 3, 4, 5], ["pos", "neg", "pos", "neg", "pos"],
        texts=["first line\nsecond line", 'a, b and "quotes"', "plain",
               "multi\r\nline\n\nwith blank line", "last"],
    ),
    "trailing_blank_lines.csv": Loads([1, 2, 3, 4], PN),
    "trailing_delimiter.csv": Loads([1, 2, 3, 4], PN, ["2 rows (rows 1 and 2) had extra empty"]),
    "excel_empty_rows.csv": Loads([1, 2, 3, 4], PN, ["ignored 2 empty rows (rows 5 and 6)"]),
    # Loaded: columns.
    "mixed_case_headers.csv": Loads([1, 2, 3, 4], PN, columns=("Tweet", "SENTIMENT")),
    "guess_by_content.csv": Loads([1, 2, 3, 4], ["x", "y", "x", "y"], columns=("a", "b")),
    "duplicate_other_column.csv": Loads([1, 2, 3, 4], PN, ["2 columns named 'note'"]),
    # Loaded: rows dropped or warned about.
    "empty_labels.csv": Loads(
        [1, 3, 4, 6], ["pos", "pos", "neg", "neg"],
        ["dropped 2 rows (rows 2 and 5) with an empty or whitespace-only label"],
    ),
    "whitespace_labels.csv": Loads(
        [1, 3, 4, 5], ["pos", "neg", "pos", "neg"],
        ["dropped 1 row (row 2) with an empty or whitespace-only label"],
    ),
    "nan_labels.csv": Loads(
        [1, 4, 7, 8], ["pos", "neg", "pos", "neg"],
        ["dropped 4 rows (rows 2, 3, 5 and 6) whose label means 'missing' ('NaN', 'nan', 'None'"],
    ),
    "short_rows.csv": Loads(
        [1, 3, 4, 5], ["pos", "pos", "neg", "neg"], ["dropped 1 row (row 2) with an empty"]
    ),
    "empty_texts.csv": Loads(
        [1, 3, 4, 6], ["pos", "pos", "neg", "neg"],
        ["dropped 2 rows (rows 2 and 5) with an empty or whitespace-only text"],
    ),
    "whitespace_texts.csv": Loads(
        [1, 3, 5, 6], ["pos", "pos", "neg", "neg"],
        ["dropped 2 rows (rows 2 and 4) with an empty or whitespace-only text"],
        texts=["great film", "fine film", "bad film", "dull film"],
    ),
    "numeric_labels.csv": Loads(
        [1, 2, 3, 4, 5], ["1", "0", "1", "0", "1"],
        texts=["great film", "awful film", "fine film", "bad film", "3.50"],
    ),
    "one_example_label.csv": Loads(
        [1, 2, 3, 4, 5], ["pos", "neg", "pos", "neg", "neutral"],
        ["1 label with only one example: 'neutral' (row 5)"],
    ),
    "duplicate_texts.csv": Loads(
        [1, 2, 3, 4, 5], ["pos", "neg", "pos", "neg", "pos"],
        ["2 duplicate texts: 2 rows (rows 3 and 4) repeat the text of an earlier row exactly; "
         "1 of them with a different label"],
    ),
    # Loaded unchanged: markup and formulas are data here (the UI escapes, write_csv guards).
    "html_script.csv": Loads(
        [1, 2, 3, 4], PN,
        texts=["<script>alert('x')</script>", '<b onmouseover="steal()">bold</b> &amp; more',
               "<img src=x onerror=alert(1)>", "</td></tr><tr><td>injected"],
    ),
    "formula_cells.csv": Loads(
        [1, 2, 3, 4, 5, 6], ["pos", "neg", "pos", "neg", "=1+1", "=1+1"],
        texts=["=1+2", "+cmd|' /C calc'!A0", "-2", "@SUM(A1:A2)", '=HYPERLINK("http://x")',
               "=tab first"],
    ),
}


def corpus_files() -> set[str]:
    return {p.name for p in CORPUS.iterdir() if p.name not in NOT_CORPUS}


def test_every_corpus_file_has_an_expected_outcome():
    assert corpus_files() == set(CASES)
    assert len(CASES) >= 30
    assert all((CORPUS / name).stat().st_size < 2048 for name in CASES)


def test_byte_exact_corpus_files_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_binary", CORPUS / "make_binary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, data in module.FILES.items():
        assert (CORPUS / name).read_bytes() == data, f"{name} differs: rerun make_binary.py"


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_file(name: str):
    case, path = CASES[name], CORPUS / name
    if isinstance(case, Fails):
        with pytest.raises(DataError) as info:
            load_labeled_csv(path, **case.kwargs)
        message = str(info.value)
        assert message.startswith(f"Cannot use {name}")
        for words in case.words:
            assert words in message
        return

    data = load_labeled_csv(path, **case.kwargs)
    assert data.rows == case.rows
    assert data.labels == case.labels
    assert data.label_names == sorted(set(case.labels))
    assert (data.text_column, data.label_column) == case.columns
    if case.texts is not None:
        assert data.texts == case.texts
    assert len(data.warnings) == len(case.warns), data.warnings
    for phrase in case.warns:
        assert any(phrase in w for w in data.warnings), (phrase, data.warnings)
    table = read_table(path)
    assert (table.encoding, table.delimiter) == (case.encoding, case.delimiter)
    assert all(isinstance(v, str) or pd.isna(v) for v in table.frame.to_numpy().ravel())


def test_an_error_lists_every_problem(tmp_path: Path):
    path = tmp_path / "bad.csv"
    path.write_text("txt,lbl\n")
    with pytest.raises(DataError) as info:
        load_labeled_csv(path, text_column="text", label_column="label")
    assert len(info.value.problems) == 3
    message = str(info.value)
    assert "no data rows" in message
    assert "no text column named 'text'" in message
    assert "no label column named 'label' (did you mean 'lbl'?)" in message


def test_data_error_survives_pickling():
    error = DataError(["first problem", "second problem"], "/tmp/x/upload.csv")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == "Cannot use upload.csv:\n- first problem\n- second problem"
    assert copy.problems == error.problems


def test_missing_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_labeled_csv(tmp_path / "nope.csv")


def test_requested_columns_match_case_insensitively():
    data = load_labeled_csv(
        CORPUS / "mixed_case_headers.csv", text_column="tweet", label_column=" sentiment "
    )
    assert (data.text_column, data.label_column) == ("Tweet", "SENTIMENT")


def test_a_renamed_duplicate_column_can_be_chosen_explicitly():
    data = load_labeled_csv(
        CORPUS / "duplicate_columns.csv", text_column="text.1", label_column="label"
    )
    assert data.texts == ["copy one", "copy two"]
    assert any("read as 'text' and 'text.1'" in w for w in data.warnings)


def test_a_one_megabyte_cell_is_truncated(tmp_path: Path):
    big = "word " * 210_000  # ~1 MB, beyond the csv module's default field limit
    path = tmp_path / "big.csv"
    path.write_text(f'text,label\n"{big}",pos\nshort,neg\nfine,pos\nbad,neg\n')
    data = load_labeled_csv(path)
    assert [len(t) for t in data.texts] == [20_000, 5, 4, 3]
    assert data.texts[0] == big.strip()[:20_000]
    assert len(data.warnings) == 1
    assert "1 row (row 1) had a text longer than 20,000 characters" in data.warnings[0]
    assert len(load_labeled_csv(path, max_text_chars=100).texts[0]) == 100


def test_a_file_over_the_limit_is_refused(tmp_path: Path):
    path = tmp_path / "large.csv"
    path.write_text("text,label\n" + "some text,pos\n" * 106 + "x" * 5)  # 1,500 bytes
    assert path.stat().st_size == 1500
    for read in (read_table, load_labeled_csv):
        with pytest.raises(DataError) as info:
            read(path, max_bytes=1024)
        assert "the file is 1.5 KB, over the 1.0 KB limit" in str(info.value)
    assert len(read_table(path, max_bytes=1500).frame) == 107


def test_real_data_sets_load(tmp_path: Path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    davidson = load_labeled_csv(SHARED_DATA / "davidson_hate_offensive.csv")
    assert davidson.label_counts() == {"hate": 1430, "neither": 4163, "offensive": 19190}
    polarity = load_labeled_csv(SHARED_DATA / "polarity_sentences.csv")
    assert polarity.label_counts() == {"negative": 2000, "positive": 2000}
    assert not any(t != t.strip() for t in polarity.texts)


# guess_columns


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text", "label"], ("text", "label")),
        (["label", "text"], ("text", "label")),
        (["TEXT", "Label"], ("TEXT", "Label")),
        (["Tweet", "Class"], ("Tweet", "Class")),
        (["id", "sentence", "gold_label"], ("sentence", "gold_label")),
        (["tweet_id", "tweet", "intent"], ("tweet", "intent")),
        (["reviewText", "overall"], ("reviewText", "overall")),
        (["label_text", "text", "label"], ("text", "label")),
        (["input", "target"], ("input", "target")),
        (["comment", "category", "note"], ("comment", "category")),
        (["a", "b", "c"], (None, None)),
        ([], (None, None)),
    ],
)
def test_guess_columns_by_name(columns: list[str], expected: tuple[str | None, str | None]):
    assert guess_columns(columns) == expected


def test_guess_columns_by_content():
    frame = pd.DataFrame(
        {
            "n": ["1", "2", "3", "4", "5", "6"],
            "body_or_not": ["a long text here", "another long one", "yet another text",
                            "more text again", "still more text", "the last long text"],
            "k": ["x", "y", "x", "y", "x", "y"],
            "z": ["p", "q", "r", "p", "q", "r"],
        }
    )
    assert guess_columns(["n", "body_or_not", "k", "z"], frame) == ("body_or_not", "k")
    # Values that never repeat (ids) are no labels.
    assert guess_columns(["n", "body_or_not"], frame) == ("body_or_not", None)


# stratified_split


def make_data(counts: dict[str, int]) -> LabeledData:
    labels = [label for label, n in counts.items() for _ in range(n)]
    return LabeledData(
        texts=[f"text {i}" for i in range(len(labels))],
        labels=labels,
        rows=list(range(1, len(labels) + 1)),
        label_names=sorted(counts),
        warnings=["from the file"],
        text_column="text",
        label_column="label",
    )


def test_split_is_deterministic_and_covers_every_label():
    data = make_data({"a": 40, "b": 16, "c": 2, "rare": 1})
    train, val = stratified_split(data, 0.25, seed=0)
    again, val_again = stratified_split(data, 0.25, seed=0)
    assert (train.rows, val.rows) == (again.rows, val_again.rows)
    assert any(stratified_split(data, 0.25, seed=s)[1].rows != val.rows for s in range(1, 6))

    assert sorted(train.rows + val.rows) == data.rows
    assert train.rows == sorted(train.rows) and val.rows == sorted(val.rows)
    assert set(train.labels) == {"a", "b", "c", "rare"}
    assert val.label_counts() == {"a": 10, "b": 4, "c": 1, "rare": 0}  # 25% of 58 -> 15
    assert val.label_names == train.label_names == ["a", "b", "c", "rare"]
    assert train.warnings[0] == val.warnings[0] == "from the file"
    assert any("single example" in w and "'rare' (row 59)" in w for w in train.warnings)
    assert not any("single example" in w for w in val.warnings)


def test_split_falls_back_when_labels_outnumber_validation_slots():
    data = make_data({f"l{i}": 2 for i in range(20)})  # 40 examples, 4 validation slots
    train, val = stratified_split(data, 0.1, seed=3)
    assert set(train.labels) == set(data.labels)
    assert sorted(train.rows + val.rows) == data.rows
    assert val.rows == stratified_split(data, 0.1, seed=3)[1].rows


def test_split_moves_a_label_back_when_sklearn_leaves_it_out_of_train():
    # 10 training slots go by largest remainder: 9 to a, 1 to b or c, none to the other.
    data = make_data({"a": 30, "b": 2, "c": 2})
    plain, _ = train_test_split(data.rows, test_size=0.7, random_state=0, stratify=data.labels)
    assert len({data.labels[r - 1] for r in plain}) == 2
    for seed in range(5):
        train, val = stratified_split(data, 0.7, seed=seed)
        assert train.label_counts() == {"a": 9, "b": 1, "c": 1}
        assert sorted(train.rows + val.rows) == data.rows


def test_split_with_only_single_examples_has_an_empty_validation_part():
    train, val = stratified_split(make_data({"a": 1, "b": 1}), 0.5, seed=0)
    assert len(train) == 2 and len(val) == 0
    assert any("validation part is empty" in w for w in train.warnings)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_a_share_outside_0_1(share: float):
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split(make_data({"a": 4, "b": 4}), share, seed=0)


# neutralize_cell and write_csv


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+2", "'=1+2"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2", "'-2"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("\t=1+2", "'\t=1+2"),
        ("\r=1+2", "'\r=1+2"),
        ("plain text", "plain text"),
        ("a = b", "a = b"),
        ("", ""),
    ],
)
def test_neutralize_cell(value: str, expected: str):
    assert neutralize_cell(value) == expected


def test_write_csv_neutralizes_formula_cells(tmp_path: Path):
    data = load_labeled_csv(CORPUS / "formula_cells.csv")
    out = tmp_path / "out.csv"
    write_csv(pd.DataFrame({"text": data.texts, "label": data.labels}), out)
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert back["text"].tolist() == ["'" + t for t in data.texts]
    assert back["label"].tolist() == [neutralize_cell(label) for label in data.labels]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert not any(line.startswith(("=", "+", "-", "@")) for line in lines)


def test_write_csv_round_trips_markup_and_keeps_other_cells(tmp_path: Path):
    data = load_labeled_csv(CORPUS / "html_script.csv")
    out = tmp_path / "out.csv"
    frame = pd.DataFrame(
        {"text": data.texts, "label": data.labels, "=score": [1, -2, 3.5, None]}
    )
    write_csv(frame, out)
    assert load_labeled_csv(out).texts == data.texts
    raw = out.read_bytes()
    assert raw.startswith(b"text,label,'=score\n") and b"\r" not in raw
    assert pd.read_csv(out)["'=score"].tolist()[:3] == [1, -2, 3.5]  # numbers stay numbers


LINE_BREAK_CELLS = ["old mac\rline end", "unix\nline end", "windows\r\nline end",
                    "\rleads with one", "ends with one\r", 'quoted "\r" and, comma']


def test_write_csv_round_trips_cells_that_hold_line_breaks(tmp_path: Path):
    # A lone "\r" used to go out unquoted (rows end in "\n"), and every reader split the row.
    frame = pd.DataFrame({"text": LINE_BREAK_CELLS, "label": ["a\rb", "x", "y", "z", "w", "v"],
                          "score": [1, 2.5, None, 4, 5, 6]})
    out = tmp_path / "out.csv"
    write_csv(frame, out)
    expected = [neutralize_cell(t) for t in LINE_BREAK_CELLS]  # "\r..." gets its leading "'"
    table = read_table(out)
    assert table.frame["text"].tolist() == expected
    assert table.frame["label"].tolist() == ["a\rb", "x", "y", "z", "w", "v"]
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert back["text"].tolist() == expected and back["score"].tolist()[:3] == ["1.0", "2.5", ""]
    with open(out, newline="", encoding="utf-8") as f:
        assert [row[0] for row in csv.reader(f)][1:] == expected
    raw = out.read_bytes()
    assert raw.startswith(b"text,label,score\n") and raw.count(b"\n") == 7 + 2  # 7 rows, 2 in cells
    assert raw.count(b"\r") == 6  # the cells' own: no row ends in "\r\n"


def test_write_csv_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out.csv"
    out.write_text("old content")
    write_csv(pd.DataFrame({"text": ["café"], "label": ["pos"]}), out)
    assert out.read_text(encoding="utf-8") == "text,label\ncafé,pos\n"
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_csv(pd.DataFrame({"text": ["new"], "label": ["neg"]}), out)
    assert out.read_text(encoding="utf-8") == "text,label\ncafé,pos\n"
    assert list(tmp_path.iterdir()) == [out]
