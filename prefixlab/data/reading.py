"""Reading a CSV file into a `Table` of strings, or one `DataError` that lists every problem.

A user uploads whatever their spreadsheet program or script produced. Bytes -> `read_table`:
size limit, binary sniffing, encoding, delimiter, CSV structure. Column choice and row cleaning
come after (`data.labeled`, `data.pairs`).

Row numbers in messages count data rows from 1 (the header is not a row); blank lines are
skipped and not counted, the same way pandas would read the file.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from prefixlab.data.messages import LIST_LIMIT, joined, rows_phrase
from prefixlab.errors import PrefixLabError

MAX_FILE_BYTES: int = 50 * 1024 * 1024  # upload/read limit: a larger CSV is no prefix-tuning set

DELIMITERS = ",;\t|"
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_SNIFF_CHARS = 64 * 1024  # delimiter detection reads this much text, not the whole file

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
            f"{joined(map(str, positions))}); they are read as {joined(map(repr, renamed))}"
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
        shown = [f"row {r} (line {ln}) has {n} fields" for r, ln, n in ragged[:LIST_LIMIT]]
        more = f" and {len(ragged) - LIST_LIMIT} more rows" if len(ragged) > LIST_LIMIT else ""
        name = _DELIMITER_NAMES[delimiter]
        raise DataError(
            f"{'; '.join(shown)}{more}, but the header has {len(header)} "
            f"({joined(map(repr, header))}), so {len(header)} fields were expected; a cell that "
            f"contains a {name} ({delimiter!r}) must be put in double quotes",
            path,
        )
    warnings = []
    if padded_extra:
        warnings.append(
            f"{rows_phrase(padded_extra)} had extra empty fields after the last column "
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


def _format_size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"
