"""Comparing methods from the app: start a comparison on the Train tab's data and settings,
follow each method's progress, cancel it, list past comparisons and read them back, and
package what each kept (adapters, the prefix, the table) for download.

A comparison trains in a background thread of the app (`Workbench.in_background`), its
methods one after another; its folder is data_dir/comparisons/<id> (progress.json, the
test and shift CSVs it was given under inputs/, the result under result/), and its prefix
row is a normal run in the run store's folder, which the Runs tab lists (open, inspect,
serve). Progress and a cancel request are files in that folder, so every browser (and the
app after a restart) reads the same.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from prefixlab.errors import PrefixLabError
from prefixlab.runs.compare import (
    FILE,
    CompareConfig,
    check_comparison,
    read_comparison,
    run_comparison,
)
from prefixlab.runs.config import RunConfig
from prefixlab.runs.registry import RunStore

PROGRESS = "progress.json"
CANCEL = "cancel.request"  # its presence asks the comparison's thread to stop
INPUTS = "inputs"
TABLE_FIELDS = (
    "method", "title", "validation_macro_f1", "validation_accuracy", "test_macro_f1",
    "test_accuracy", "shift_macro_f1", "shift_accuracy", "trainable_parameters",
    "trainable_share", "stored_bytes", "kept_step", "steps", "stop_reason", "train_s_to_kept",
    "train_s", "examples_per_s", "peak_rss_bytes", "peak_gpu_bytes", "error")
"""The downloaded CSV: raw numbers (bytes, seconds), not the app's rounded cells."""


class ComparisonError(PrefixLabError):
    """A comparison cannot do what was asked in its state (cancel one that has finished)."""


class CompareRoom:
    """Comparisons over the Workbench's data directory (a mixin of Workbench). Set up by
    Workbench.__init__: `store`, `exports_dir`; `model`, `check_start`, `download` and
    `in_background` come from the other rooms."""

    store: RunStore
    exports_dir: Path

    @property
    def comparisons_dir(self) -> Path:
        return self.store.data_dir / "comparisons"

    def start_comparison(self, cfg: RunConfig, methods: list[str], name: str | None = None,
                         test_csv: str | None = None, shift_csv: str | None = None) -> str:
        """Check, then start training every method in the background; returns the id.
        A bad method name or one that cannot run on the model is refused here, in one
        message, before anything trains. The test and shift CSVs are copied into the
        comparison's folder: an upload's temporary file may be gone when it is read again."""
        compare = CompareConfig(methods=list(methods))
        loaded = self.model(cfg.model)
        check_comparison(cfg, compare, loaded.model.config.model_type, loaded.dtype)
        self.check_start(cfg)  # the data, refused before the folder exists
        for what, path in (("test", test_csv), ("shift", shift_csv)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"the {what} CSV {path} is gone; upload it again")
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name or "comparison").strip("-") or "comparison"
        cid = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = self.comparisons_dir / cid
        folder.mkdir(parents=True)
        for what, path in (("test", test_csv), ("shift", shift_csv)):
            if path:
                kept = folder / INPUTS / f"{what}-{Path(path).name}"
                kept.parent.mkdir(exist_ok=True)
                shutil.copyfile(path, kept)
                setattr(compare, f"{what}_csv", str(kept))
        # pid: after a restart a "running" comparison of another process was interrupted
        progress = {"state": "running", "methods": {m: {"state": "waiting"} for m in
                                                     compare.methods}, "started": time.time(),
                    "pid": os.getpid()}
        _write(folder / PROGRESS, progress)
        lock = threading.Lock()

        def heard(event: dict) -> None:
            with lock:
                progress["methods"][event["method"]] = {k: v for k, v in event.items()
                                                        if k != "method"}
                _write(folder / PROGRESS, progress)

        def work() -> None:
            try:
                result = run_comparison(cfg, compare, folder / "result", loaded,
                                        on_event=heard, should_stop=(folder / CANCEL).exists,
                                        prefix_folder=self.store.runs_dir / f"{cid}-prefix")
                progress["state"] = "cancelled" if "not_run" in result else "completed"
            except (PrefixLabError, OSError, MemoryError) as e:
                progress.update(state="failed", error=str(e))
            with lock:
                _write(folder / PROGRESS, progress)

        self.in_background(work, name=f"compare {cid}", nice=True)
        return cid

    def cancel_comparison(self, cid: str) -> None:
        """Ask a running comparison to stop: the method training stops at its next step
        and keeps nothing; the methods finished so far are written as its result."""
        status = self.comparison(cid)
        if status["state"] != "running":
            raise ComparisonError(f"comparison {cid} is {status['state']}; only a running "
                                  "one can be cancelled")
        (self.comparisons_dir / cid / CANCEL).write_text("cancel\n")

    def comparison(self, cid: str) -> dict:
        """A comparison's progress and, once written, its result (comparison.json).
        `cancelling` says a cancel was asked and not yet heard; a comparison left running
        by an earlier app process reads as interrupted."""
        folder = self.comparisons_dir / cid
        if not re.fullmatch(r"[A-Za-z0-9_-]+", cid or "") or not (folder / PROGRESS).is_file():
            raise FileNotFoundError(f"no comparison {cid!r}")
        status = json.loads((folder / PROGRESS).read_text())
        status["id"] = cid
        if status["state"] == "running":
            if status.get("pid") != os.getpid():  # its thread died with that process
                status["state"] = "interrupted"
            elif (folder / CANCEL).exists():
                status["cancelling"] = True
        if (folder / "result" / FILE).is_file():
            status["result"] = read_comparison(folder / "result")
        return status

    def comparison_ids(self) -> list[str]:
        """Every comparison, newest first (by when it started, whatever its name)."""
        if not self.comparisons_dir.is_dir():
            return []
        started = {}
        for p in self.comparisons_dir.iterdir():
            try:
                started[p.name] = json.loads((p / PROGRESS).read_text()).get("started", 0)
            except (OSError, ValueError):  # not a comparison (or being written): not listed
                continue
        return sorted(started, key=lambda c: (started[c], c), reverse=True)

    def comparison_downloads(self, cid: str) -> list[Path]:
        """What a finished (or cancelled) comparison offers for download, built once into
        exports/comparisons/<id>: the table as CSV, comparison.json, a zip per method that
        kept something (the prefix as the Runs tab's prefix zip, PEFT adapters as saved)."""
        status = self.comparison(cid)
        result = status.get("result")
        if result is None:
            return []
        source = self.comparisons_dir / cid / "result"
        target = self.exports_dir / "comparisons" / cid
        target.mkdir(parents=True, exist_ok=True)
        files = [_once(target / f"{cid}-table.csv", lambda p: _write_table(result["rows"], p)),
                 _once(target / f"{cid}-{FILE}",
                       lambda p: shutil.copyfile(source / FILE, p))]
        for row in result["rows"]:
            folder = row.get("folder")
            if not folder:
                continue
            if row["method"] == "prefix":
                run_id = Path(folder).name
                if (self.store.runs_dir / run_id).is_dir():  # unless deleted from Runs
                    files.append(_once(target / f"{cid}-prefix.zip", lambda p, r=run_id:
                                       shutil.copyfile(self.download(r, "prefix"), p)))
            elif (source / folder).is_dir():
                files.append(_once(target / f"{cid}-{row['method']}.zip",
                                   lambda p, d=source / folder: _zip(d, p)))
        return files


def flat_row(row: dict) -> dict:
    """One comparison row as TABLE_FIELDS (missing figures left empty)."""
    flat = {k: row.get(k) for k in TABLE_FIELDS if k in row}
    for key in ("validation", "test", "shift"):
        for metric in ("macro_f1", "accuracy"):
            flat[f"{key}_{metric}"] = (row.get(key) or {}).get(metric)
    return flat


def _write_table(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(flat_row(row))


def _zip(folder: Path, path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder))


def _once(path: Path, make) -> Path:
    """`path`, made by make(tmp) unless it exists; a result never changes once written,
    and the finished file replaces the target atomically (two browsers may ask at once)."""
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        os.close(fd)
        try:
            make(Path(tmp))
            Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)
