"""Load and validate labeled CSVs: one `DataError` that lists every problem, warnings for the rest.

A user uploads whatever their spreadsheet program or script produced. This module turns it into
`LabeledData` (texts, labels, and the file row each came from) or refuses it with one message
that says, for every problem, where it is, what was found and what was expected.

Pipeline: bytes -> `read_table` (size limit, binary sniffing, encoding, delimiter, CSV
structure) -> `load_labeled_csv` (column choice, row cleaning, warnings) -> `stratified_split`.
`write_csv` is the way back out: every string cell is neutralized against formula injection,
and every cell holding a line break is quoted (`csv_text`).

Row numbers in messages count data rows from 1 (the header is not a row); blank lines are
skipped and not counted, the same way pandas would read the file.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from prefixlab.errors import PrefixLabError
from prefixlab.files import atomic_write_text

MAX_FILE_BYTES: int = 50 * 1024 * 1024  # upload/read limit: a larger CSV is no prefix-tuning set

DELIMITERS = ",;\t|"
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_SNIFF_CHARS = 64 * 1024  # delimiter detection reads this much text, not the whole file
_LIST_LIMIT = 10  # messages name this many rows, then "and N more"

# Label cells that spreadsheet programs and pandas write for "no value". "NA" is left out on
# purpose: it is a real label in some data sets (e.g. a region), and dropping it would be silent.
_MISSING_LABELS = frozenset({"nan", "-nan", "none", "null", "n/a", "#n/a", "<na>"})

# File signatures of things people upload instead of a CSV.
_SPREADSHEET = "this looks like a spreadsheet (.xlsx/.xls), export it as CSV (UTF-8) first"
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", _SPREADSHEET),
    (b"PK\x05\x06", _SPREADSHEET),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", _SPREADSHEET),
    (b"\x89PNG\r\n\x1a\n", "this is a PNG image, not a CSV file"),
    (b"\xff\xd8\xff", "this is a JPEG image, not a CSV file"),
    (b"GIF8", "this is a GIF image, not a CSV file"),
    (b"%PDF-", "this is a PDF document, not a CSV file; export the table as CSV"),
    (b"\x1f\x8b", "this is a gzip archive; unpack it and upload the CSV inside"),
    (b"PAR1", "this is a Parquet file, not a CSV file"),
    (b"SQLite format 3\x00", "this is an SQLite database, not a CSV file"),
)
# Byte-order marks, longest first (a UTF-32 LE mark starts with the UTF-16 LE one).
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (b"\xff\xfe\x00\x00", "utf-32", "UTF-32 (little-endian, with byte-order mark)"),
    (b"\x00\x00\xfe\xff", "utf-32", "UTF-32 (big-endian, with byte-order mark)"),
    (b"\xef\xbb\xbf", "utf-8-sig", ""),  # Excel's "CSV UTF-8": common and harmless, no warning
    (b"\xff\xfe", "utf-16", "UTF-16 (little-endian, with byte-order mark)"),
    (b"\xfe\xff", "utf-16", "UTF-16 (big-endian, with byte-order mark)"),
)
# Control characters that never occur in text (tab, newlines and form feeds are allowed).
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")

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
# More distinct labels than this share of the rows (and than _MANY_LABELS) is an id or a
# measurement, not a set of classes: most "labels" would have one example.
_LABEL_SHARE = 0.5
_MANY_LABELS = 10


class DataError(PrefixLabError, ValueError):
    """A CSV that cannot be used. str(e) is one human message listing every problem.

    `problems` keeps the individual messages (each says row/column, found, expected).
    """

    def __init__(self, problems: str | Sequence[str], source: str | Path | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = Path(source).name if source is not None else None
        head = f"Cannot use {self.source}" if self.source else "Cannot use this file"
        if len(self.problems) == 1:
            message = f"{head}: {self.problems[0]}"
        else:
            message = f"{head}:\n" + "\n".join(f"- {p}" for p in self.problems)
        super().__init__(message)

    def __reduce__(self):  # rebuild from the parts, so the error survives a process boundary
        return type(self), (self.problems, self.source)


@dataclass
class Table:
    """A decoded CSV, before any column is chosen."""

    frame: pd.DataFrame  # every cell a str, NaN where a row had fewer fields than the header
    encoding: str  # Python codec name: "utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1", ...
    delimiter: str  # one of DELIMITERS
    warnings: list[str]  # human messages about the file as a whole (encoding, odd rows)
    # Header names that occur more than once, mapped to the frame columns they became
    # ({"text": ["text", "text.1"]}); choosing such a name as a column is ambiguous.
    duplicate_columns: dict[str, list[str]] = field(default_factory=dict)


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


# ---------------------------------------------------------------------------------------------
# Reading: bytes -> Table


def read_table(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> Table:
    """Read a CSV file into a `Table` of strings; raise `DataError` if it is not usable text.

    Detects the encoding (BOM, UTF-8, UTF-16 without BOM, then Windows-1252/Latin-1) and the
    delimiter (`DELIMITERS`), and refuses binary files, files over `max_bytes` and rows with
    more fields than the header.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"{path} {what}", path)
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(
            f"the file is {_format_size(size)}, over the {_format_size(max_bytes)} limit; "
            "use a smaller sample",
            path,
        )
    raw = path.read_bytes()
    if len(raw) > max_bytes:  # grew between stat and read
        raise DataError(f"the file is over the {_format_size(max_bytes)} limit", path)
    if not raw:
        raise DataError("the file is empty (0 bytes)", path)

    text, encoding, warnings = _decode(raw, path)
    if not text.strip():
        raise DataError("the file is empty (only blank lines)", path)
    delimiter = _detect_delimiter(text)
    # When no delimiter splits the header, the file is one column: commas inside its cells
    # are text, so it is parsed with a delimiter that cannot occur (NUL was refused above).
    split_on = delimiter if delimiter is not None else "\x00"
    header, records, parse_warnings = _parse_records(text, split_on, path)
    warnings += parse_warnings

    names, duplicates = _column_names(header)
    for name, renamed in duplicates.items():
        positions = [i + 1 for i, h in enumerate(header) if h.strip() == name]
        warnings.append(
            f"the header has {len(renamed)} columns named {name!r} (columns "
            f"{_join(map(str, positions))}); they are read as {_join(map(repr, renamed))}"
        )
    columns = {name: [r[j] for r in records] for j, name in enumerate(names)}
    frame = pd.DataFrame(columns, columns=names, dtype=object)
    return Table(frame, encoding, delimiter or ",", warnings, duplicates)


def _decode(raw: bytes, path: Path) -> tuple[str, str, list[str]]:
    """(text, codec name, warnings); raises DataError for binary or undecodable bytes."""
    for magic, message in _SIGNATURES:
        if raw.startswith(magic):
            raise DataError(message, path)

    for bom, codec, note in _BOMS:
        if raw.startswith(bom):
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"the file starts with a {codec.upper()} byte-order mark but is not valid "
                    f"{codec.upper()} (byte {e.start}: {e.reason}); save it again as CSV (UTF-8)",
                    path,
                ) from e
            warnings = [f"decoded as {note}"] if note else []
            return _check_text(text, path), codec, warnings

    if b"\x00" in raw:
        codec = _utf16_without_bom(raw)
        if codec is not None:
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError:
                text = ""
            if text and "\x00" not in text and not _CONTROL.search(text[:_SNIFF_CHARS]):
                endian = "little" if codec.endswith("le") else "big"
                return text, codec, [f"decoded as UTF-16 ({endian}-endian, no byte-order mark)"]
        raise DataError(
            f"the file contains NUL bytes (the first at byte {raw.index(0)}), so it is a binary "
            "file, not CSV text",
            path,
        )

    try:
        return _check_text(raw.decode("utf-8"), path), "utf-8", []
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        warning = (
            f"the file is not valid UTF-8 (byte 0x{raw[e.start]:02X} on line {line}), so it was "
            "decoded as Latin-1 (Windows-1252); check that accented letters look right"
        )
    try:
        return _check_text(raw.decode("cp1252"), path), "cp1252", [warning]
    except UnicodeDecodeError:  # cp1252 leaves five bytes undefined; Latin-1 defines all 256
        return _check_text(raw.decode("latin-1"), path), "latin-1", [warning]


def _utf16_without_bom(raw: bytes) -> str | None:
    """'utf-16-le' / 'utf-16-be' when NUL bytes sit where ASCII text in UTF-16 puts them."""
    sample = raw[:4096]
    half = len(sample) // 2
    if len(raw) % 2 or half == 0:
        return None
    even_nuls, odd_nuls = sample[0::2].count(0), sample[1::2].count(0)
    if odd_nuls > 0.3 * half and even_nuls < 0.05 * half:
        return "utf-16-le"
    if even_nuls > 0.3 * half and odd_nuls < 0.05 * half:
        return "utf-16-be"
    return None


def _check_text(text: str, path: Path) -> str:
    """Refuse decoded text that is mostly control characters (binary, or a wrong encoding)."""
    if "\x00" in text:
        raise DataError(
            "the file contains NUL characters, so it is a binary file, not CSV text", path
        )
    sample = text[:_SNIFF_CHARS]
    controls = _CONTROL.findall(sample)
    if len(controls) > max(2, 0.01 * len(sample)):
        first = _CONTROL.search(sample)
        line = sample.count("\n", 0, first.start()) + 1
        raise DataError(
            f"the file does not decode to readable text: {len(controls)} control characters in "
            f"the first {len(sample):,} characters (e.g. 0x{ord(first.group()):02X} on line "
            f"{line}); it is binary or in an unsupported encoding, save it as CSV (UTF-8)",
            path,
        )
    return text


def _detect_delimiter(text: str) -> str | None:
    """The delimiter in DELIMITERS that splits the header and keeps rows consistent.

    csv.Sniffer gives a first guess; each candidate is then scored on a sample by the share of
    rows with as many fields as the header (a header of one field disqualifies it). The
    sniffed one wins ties, then the order of DELIMITERS. None when nothing splits the header.
    """
    sample = text[:_SNIFF_CHARS]
    truncated = len(text) > len(sample)
    if truncated and "\n" in sample:
        sample = sample[: sample.rindex("\n") + 1]
    try:
        sniffed = csv.Sniffer().sniff(sample[: _SNIFF_CHARS // 2], delimiters=DELIMITERS).delimiter
    except csv.Error:
        sniffed = None

    scores: dict[str, float] = {}
    for d in DELIMITERS:
        records = [r for r in _sample_records(sample, d) if r]
        if truncated and len(records) > 1:
            records = records[:-1]  # the last record may be cut inside a quoted cell
        if not records or len(records[0]) < 2:
            continue
        width, body = len(records[0]), records[1:]
        scores[d] = sum(len(r) == width for r in body) / len(body) if body else 1.0
    if not scores:
        return None
    best = max(scores.values())
    if sniffed in scores and scores[sniffed] >= best:
        return sniffed
    return next(d for d in DELIMITERS if scores.get(d) == best)


def _sample_records(sample: str, delimiter: str, limit: int = 200) -> list[list[str]]:
    records: list[list[str]] = []
    reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter)
    try:
        for record in reader:
            records.append(record)
            if len(records) >= limit:
                break
    except csv.Error:
        pass  # a damaged sample scores what it parsed so far
    return records


def _parse_records(
    text: str, delimiter: str, path: Path
) -> tuple[list[str], list[list[str | float]], list[str]]:
    """(header, data records padded to the header width with NaN, warnings).

    Parsed with the csv module in strict mode so that an unclosed quote is an error rather
    than one giant cell, and so that every row with too many fields can be named.
    """
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # a 1 MB cell is fine
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records: list[list[str | float]] = []
    ragged: list[tuple[int, int, int]] = []  # (row, line, fields)
    padded_extra: list[int] = []
    line = 0  # last physical line consumed
    while True:
        start = line + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            where = "the header" if header is None else f"row {len(records) + 1}"
            raise DataError(_quote_problem(str(e), where, start, reader.line_num), path) from e
        line = reader.line_num
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # a blank line: skipped and not counted, as pandas would
        if header is None:
            header = record
            continue
        row = len(records) + 1
        width = len(header)
        if len(record) > width:
            if any(cell.strip() for cell in record[width:]):
                ragged.append((row, start, len(record)))
            else:
                padded_extra.append(row)
            record = record[:width]
        records.append(record + [math.nan] * (width - len(record)))
    if header is None:
        raise DataError("the file has no header row, only empty cells", path)

    if ragged:
        shown = [f"row {r} (line {ln}) has {n} fields" for r, ln, n in ragged[:_LIST_LIMIT]]
        more = f" and {len(ragged) - _LIST_LIMIT} more rows" if len(ragged) > _LIST_LIMIT else ""
        name = _DELIMITER_NAMES[delimiter]
        raise DataError(
            f"{'; '.join(shown)}{more}, but the header has {len(header)} "
            f"({_join(map(repr, header))}), so {len(header)} fields were expected; a cell that "
            f"contains a {name} ({delimiter!r}) must be put in double quotes",
            path,
        )
    warnings = []
    if padded_extra:
        warnings.append(
            f"{_rows_phrase(padded_extra)} had extra empty fields after the last column "
            "(ignored)"
        )
    return header, records, warnings


def _quote_problem(error: str, where: str, start: int, end: int) -> str:
    """A csv.Error in strict mode, said in words; `where` is "the header" or "row N"."""
    if "unexpected end of data" in error:
        return (
            f"a quoted cell in {where} (from line {start}) is never closed: the file ends "
            'inside quotes; add the missing closing " (quotes inside a cell are written "")'
        )
    if "expected after" in error:
        return (
            f"{where} (line {end}) has text right after a closing quote; put the whole cell "
            'in double quotes and write each quote inside it as ""'
        )
    return f"{where} (line {end}) could not be read as CSV ({error})"


def _column_names(header: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Frame column names for a raw header: stripped, blanks named, duplicates suffixed.

    Duplicates get pandas' suffixes ("text", "text.1"), and are reported as {name: [names]}.
    """
    stripped = [h.strip() or f"column {i + 1}" for i, h in enumerate(header)]
    counts = Counter(stripped)
    taken = set(stripped)
    seen: Counter[str] = Counter()
    names = []
    duplicates: dict[str, list[str]] = {}
    for name in stripped:
        new = name
        if seen[name]:
            suffix = seen[name]
            while f"{name}.{suffix}" in taken:
                suffix += 1
            new = f"{name}.{suffix}"
            taken.add(new)
        seen[name] += 1
        names.append(new)
        if counts[name] > 1:
            duplicates.setdefault(name, []).append(new)
    return names, duplicates


# ---------------------------------------------------------------------------------------------
# Choosing columns


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
    values = _strings(frame.head(1000), column)
    if not values:
        return False
    return sum(bool(_VALUE_CELL.match(v)) for v in values) >= _VALUE_SHARE * len(values)


def _strings(frame: pd.DataFrame, column: str) -> list[str]:
    return [v.strip() for v in frame[column].tolist() if isinstance(v, str) and v.strip()]


def _longest_column(frame: pd.DataFrame, columns: Sequence[str]) -> str | None:
    best, best_length = None, 0.0
    for column in columns:
        values = _strings(frame, column)
        length = sum(map(len, values)) / len(values) if values else 0.0
        if length > best_length:
            best, best_length = column, length
    return best


def _fewest_values_column(frame: pd.DataFrame, columns: Sequence[str]) -> str | None:
    ranked = []
    for position, column in enumerate(columns):
        values = _strings(frame, column)
        distinct = len(set(values))
        if 2 <= distinct < len(values):  # labels repeat; ids and free text do not
            ranked.append((distinct, sum(map(len, values)) / len(values), position, column))
    return min(ranked)[3] if ranked else None


def _resolve_column(requested: str, columns: Sequence[str], role: str) -> tuple[str | None, str]:
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
        f"{_join(map(repr, columns))}"
    )


# ---------------------------------------------------------------------------------------------
# Loading labeled examples


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
            f"the file has a header ({_join(map(repr, columns))}) but no data rows below it"
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
            f"{_short(_strings(frame, text_col)[0])}), not text to classify; choose a column "
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
            f"{_short(label_names[0])}, in {len(texts)} usable rows; a classifier needs at "
            "least 2 labels"
            + (f"; {dropped}" if dropped else ""),
            path,
        )

    if len(label_names) > max(_MANY_LABELS, _LABEL_SHARE * len(texts)):
        once = sum(1 for n in Counter(labels).values() if n == 1)
        raise DataError(
            f"the label column {label_col!r} has {len(label_names)} different values in "
            f"{len(texts)} usable rows ({once} of them seen only once), e.g. "
            f"{_join(map(_short, label_names[:3]))}: that looks like an id or a measurement, "
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
        text_col, problem = _resolve_column(text_column, columns, "text")
        problems += [problem] if problem else []
    if label_column is not None:
        label_col, problem = _resolve_column(label_column, columns, "label")
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
                    f"no column holds text: the columns {_join(map(repr, columns))} hold only "
                    "numbers or dates; a labeled CSV needs a column of texts (sentences, reviews, "
                    "tweets) and a column of labels"
                )
            elif column is None and len(frame):
                problems.append(
                    f"could not tell which column holds the {role}s; the columns in the file "
                    f"are {_join(map(repr, columns))}; choose the {role} column explicitly"
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
        warnings.append(f"ignored {_rows_phrase(blank_rows, 'empty row')}")
    if empty_text:
        warnings.append(
            f"dropped {_rows_phrase(empty_text)} with an empty or whitespace-only text "
            f"({text_col!r})"
        )
    if empty_label:
        warnings.append(
            f"dropped {_rows_phrase(empty_label)} with an empty or whitespace-only label "
            f"({label_col!r})"
        )
    if missing_label:
        warnings.append(
            f"dropped {_rows_phrase(missing_label)} whose label means 'missing' "
            f"({_join(map(repr, markers))}) in {label_col!r}"
        )
    return texts, labels, rows


def _truncate(texts: list[str], rows: list[int], limit: int, warnings: list[str]) -> list[str]:
    long = [i for i, t in enumerate(texts) if len(t) > limit]
    if not long:
        return texts
    longest = max(len(texts[i]) for i in long)
    warnings.append(
        f"{_rows_phrase([rows[i] for i in long])} had a text longer than {limit:,} characters "
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
            f"{len(repeats)} duplicate texts: {_rows_phrase(repeats)} repeat the text of an "
            f"earlier row exactly{clash}"
        )


def _warn_rare_labels(
    labels: list[str], rows: list[int], label_col: str, warnings: list[str]
) -> None:
    counts = Counter(labels)
    row_of = {label: row for label, row in zip(labels, rows, strict=True) if counts[label] == 1}
    single = sorted(row_of.items())
    if single:
        shown = ", ".join(f"{_short(label)} (row {row})" for label, row in single[:_LIST_LIMIT])
        more = f" and {len(single) - _LIST_LIMIT} more" if len(single) > _LIST_LIMIT else ""
        warnings.append(
            f"{len(single)} label{'s' if len(single) > 1 else ''} with only one example: "
            f"{shown}{more}; such a label cannot be both trained on and validated"
        )
    if len(counts) > 50 and len(counts) > len(labels) // 2:
        warnings.append(
            f"the label column {label_col!r} has {len(counts):,} distinct values in "
            f"{len(labels):,} rows; is it really the label column?"
        )


# ---------------------------------------------------------------------------------------------
# Splitting and writing


def stratified_split(
    data: LabeledData, validation_share: float, seed: int
) -> tuple[LabeledData, LabeledData]:
    """(train, validation), deterministic for a seed, each in file order.

    Every label with at least 2 examples appears in train; a label with a single example goes
    to train only, with a warning appended to train's warnings. Stratified with scikit-learn
    when the counts allow it, else split per label by hand.
    """
    if not 0 < validation_share < 1:
        raise ValueError(f"validation_share must be between 0 and 1, got {validation_share}")
    counts = Counter(data.labels)
    singles = [i for i, label in enumerate(data.labels) if counts[label] == 1]
    pool = [i for i, label in enumerate(data.labels) if counts[label] > 1]
    train_idx, val_idx = list(singles), []
    if pool:
        pool_labels = [data.labels[i] for i in pool]
        try:
            tr, va = train_test_split(
                pool, test_size=validation_share, random_state=seed, stratify=pool_labels
            )
        except ValueError:  # fewer validation or training slots than labels
            tr, va = _split_per_label(pool, pool_labels, validation_share, seed)
        tr, va = _cover_labels(list(tr), list(va), data.labels)
        train_idx += tr
        val_idx += va

    train = data.subset(sorted(train_idx))
    validation = data.subset(sorted(val_idx))
    if singles:
        shown = ", ".join(
            f"{_short(data.labels[i])} (row {data.rows[i]})" for i in singles[:_LIST_LIMIT]
        )
        more = f" and {len(singles) - _LIST_LIMIT} more" if len(singles) > _LIST_LIMIT else ""
        train.warnings.append(
            f"{len(singles)} label{'s' if len(singles) > 1 else ''} with a single example "
            f"went to the training part only: {shown}{more}"
        )
    if not validation.texts:
        train.warnings.append(
            f"the validation part is empty: {len(data)} examples are too few for a "
            f"{validation_share:.0%} validation share"
        )
    return train, validation


def _split_per_label(
    pool: list[int], labels: list[str], share: float, seed: int
) -> tuple[list[int], list[int]]:
    """Shuffle each label's examples with `seed`; round(share * n) of them (at most n - 1)
    go to validation."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in zip(pool, labels, strict=True):
        by_label.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        k = min(round(share * len(members)), len(members) - 1)
        val += members[:k]
        train += members[k:]
    return train, val


def _cover_labels(
    train: list[int], val: list[int], labels: list[str]
) -> tuple[list[int], list[int]]:
    """Move one validation example into train for each label that train lacks."""
    present = {labels[i] for i in train}
    for i in list(val):
        if labels[i] not in present:
            val.remove(i)
            train.append(i)
            present.add(labels[i])
    return train, val


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


# ---------------------------------------------------------------------------------------------
# Message helpers


def _rows_phrase(rows: Sequence[int], noun: str = "row") -> str:
    """'1 row (row 4)', '3 rows (rows 1, 2 and 9)', '25 rows (rows 1, ..., 10 and 15 more)'."""
    n = len(rows)
    count = f"{n} {noun}{'s' if n != 1 else ''}"
    if n == 1:
        return f"{count} (row {rows[0]})"
    shown = [str(r) for r in rows[:_LIST_LIMIT]]
    if n > _LIST_LIMIT:
        return f"{count} (rows {', '.join(shown)} and {n - _LIST_LIMIT} more)"
    return f"{count} (rows {_join(shown)})"


def _short(value: str, limit: int = 40) -> str:
    """repr of a value cut to `limit` characters, for naming labels in messages."""
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


def _join(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _format_size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"
