"""The datasets room: a CSV's preview and guessed columns, checks of the chosen columns, and
uploads kept in the data directory (a browser remembers a name, never a path)."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from prefixlab.data.columns import guess_columns
from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.data.pairs import TextPairs, load_pairs_csv, looks_like_targets
from prefixlab.data.reading import DataError, read_table

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLE_CSV = ASSETS / "example_feedback.csv"
EXAMPLE_KEY = "example"
# What keep_upload names: <content digest>/<file name>, so that a page shows the file by its
# own name; <digest>-<name> is how earlier versions kept it (still found).
_UPLOAD_KEY = re.compile(r"^[0-9a-f]{16}/[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}$")
_FLAT_KEY = re.compile(r"^[0-9a-f]{16}-[A-Za-z0-9._-]{1,80}$")


@dataclass
class CsvPreview:
    frame: pd.DataFrame  # the first rows, as text
    columns: list[str]
    text_column: str | None
    label_column: str | None
    rows: int
    warnings: list[str] = field(default_factory=list)
    target_column: str | None = None
    """Guessed when the column beside the text holds long, mostly unique texts: a generation
    data set (label_column is then None)."""


@dataclass
class ColumnCheck:
    """What the chosen columns give: labeled rows, or input/target pairs (a generation task),
    or every problem that stops the file being used with them."""

    data: LabeledData | None = None
    pairs: TextPairs | None = None
    problems: list[str] = field(default_factory=list)


class DataRoom:
    """Reading what a person chose. Set up by Workbench.__init__: `uploads_dir`."""

    uploads_dir: Path

    def preview_csv(self, path: str | Path, rows: int = 20) -> CsvPreview:
        table = read_table(path)
        frame = table.frame
        text, label = guess_columns(list(frame.columns), frame)
        target = None
        if text is not None:
            rest = [c for c in frame.columns if c != text]
            # The column a label guess would take (or the only other one) holds sentences.
            candidate = label if label is not None else (rest[0] if len(rest) == 1 else None)
            if candidate is not None and looks_like_targets(frame, candidate):
                target, label = candidate, None
            elif len(frame.columns) == 2:
                # Two columns of sentence-like texts (the text guess took the longer one):
                # the first is the input, the second what to write for it.
                first, second = frame.columns
                if (looks_like_targets(frame, second)
                        and looks_like_targets(frame, first, min_unique=0.0)):
                    text, target, label = first, second, None
        return CsvPreview(frame.head(rows).fillna(""), list(frame.columns), text, label,
                          len(frame), list(table.warnings), target)

    def try_preview(self, path: str | Path, rows: int = 20
                    ) -> tuple[CsvPreview | None, list[str]]:
        """The preview, or None and every problem that stops the file being read."""
        try:
            return self.preview_csv(path, rows), []
        except DataError as e:
            return None, list(e.problems)

    def check_columns(self, path: str | Path, text: str | None,
                      label: str | None) -> LabeledData:
        return load_labeled_csv(path, text, label)

    def check_pairs(self, path: str | Path, text: str | None, target: str) -> TextPairs:
        if not text:
            raise DataError("choose the input column beside the target column")
        return load_pairs_csv(path, text, target)

    def check_choice(self, path: str | Path, text: str | None, label: str | None,
                     target: str | None = None) -> ColumnCheck:
        """The chosen columns checked: pairs when a target column is chosen, else labels."""
        try:
            if target:
                return ColumnCheck(pairs=self.check_pairs(path, text, target))
            return ColumnCheck(data=self.check_columns(path, text, label))
        except DataError as e:
            return ColumnCheck(problems=list(e.problems))

    def keep_upload(self, path: str | Path, name: str) -> Path:
        """A copy of an uploaded file in the data directory (Gradio's temp copy is cleaned
        up), in a folder named by its content so the same file is kept once, under its own
        name; a reload finds it again and shows it by that name."""
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[-80:].lstrip(".") or "data.csv"
        target = self.uploads_dir / digest / safe
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            shutil.copyfile(path, tmp)
            tmp.replace(target)
        return target

    def upload_key(self, path: str | Path) -> str | None:
        """What a browser may remember of a chosen file: a name, never a path."""
        path = Path(path)
        if path == EXAMPLE_CSV:
            return EXAMPLE_KEY
        key = f"{path.parent.name}/{path.name}"
        if path.parent.parent == self.uploads_dir and _UPLOAD_KEY.match(key):
            return key
        if path.parent == self.uploads_dir and _FLAT_KEY.match(path.name):
            return path.name
        return None

    def kept_upload(self, key: str | None) -> Path | None:
        """The file a remembered key names, if it is still kept (anything else: None)."""
        if key == EXAMPLE_KEY:
            return EXAMPLE_CSV
        if not isinstance(key, str) or not (_UPLOAD_KEY.match(key) or _FLAT_KEY.match(key)):
            return None
        path = self.uploads_dir / key
        return path if path.is_file() else None
