"""Comparing methods from the app: start a comparison on the Train tab's data and settings,
follow each method's progress, cancel it, list past comparisons and read them back, and
package what each kept (adapters, the prefix, the table) for download.

A comparison trains in a background thread of the app (`Workbench.in_background`), its
methods one after another; its folder is data_dir/comparisons/<id> (progress.json, which also
names what was asked; copies of the test and shift CSVs it was given as data/test.csv and
data/shift.csv, as a run keeps its shift CSV; the result under result/), and its prefix
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
from prefixlab.runs.verdict import BARE_TITLE

PROGRESS = "progress.json"
CANCEL = "cancel.request"  # its presence asks the comparison's thread to stop
DATA = "data"  # the copies of the test and shift CSVs, named as in a run folder
SETS = ("validation", "test", "shift")
SCORES = {"classification": ("macro_f1", "accuracy"),
          "generation": ("bleu", "chrf", "rouge_l", "loss")}
"""Each task's figures per set of rows in comparison.json, the first the one a comparison
ranks by (generation scores are on a 0-100 scale; loss is the target loss)."""
COST_FIELDS = (
    "trainable_parameters", "trainable_share", "stored_bytes", "kept_step", "steps",
    "stop_reason", "train_s_to_kept", "train_s", "examples_per_s", "peak_rss_bytes",
    "peak_gpu_bytes", "error")
BARE = {"method": "bare", "title": BARE_TITLE}
"""A generation comparison's reference row: the untrained model with the same prompt."""


def comparison_task(result: dict) -> str:
    """The result's task, "generation" or "classification" (absent before generation)."""
    return result.get("task") or "classification"


def table_fields(task: str) -> tuple[str, ...]:
    """The downloaded CSV's columns for a task's comparison: raw numbers (bytes, seconds),
    not the app's rounded cells."""
    return ("method", "title", *(f"{key}_{score}" for key in SETS for score in SCORES[task]),
            *COST_FIELDS)


TABLE_FIELDS = table_fields("classification")


def bare_row(result: dict) -> dict | None:
    """The bare model's scores as a comparison row (no cost figures), where the result has
    them (a generation comparison)."""
    bare = result.get("bare_model")
    return {**BARE, **{key: bare.get(key) for key in SETS}} if bare else None


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
                         test_csv: str | None = None, shift_csv: str | None = None,
                         data_name: str | None = None) -> str:
        """Check, then start training every method in the background; returns the id.
        A bad method name or one that cannot run on the model is refused here, in one
        message, before anything trains. The test and shift CSVs are copied into the
        comparison's folder (data/test.csv, data/shift.csv): an upload's temporary file may be
        gone when it is read again. progress.json keeps what was asked, with the files' own
        names (`data_name`: the training file's, else its path's), for the app to show."""
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
                kept = folder / DATA / f"{what}.csv"
                kept.parent.mkdir(exist_ok=True)
                shutil.copyfile(path, kept)
                setattr(compare, f"{what}_csv", str(kept))
        request = {"methods": compare.methods,
                   "task": "generation" if cfg.is_generation else "classification",
                   "data": data_name or Path(cfg.train_csv).name,
                   "test": Path(test_csv).name if test_csv else None,
                   "shift": Path(shift_csv).name if shift_csv else None}
        # pid: after a restart a "running" comparison of another process was interrupted
        progress = {"state": "running", "methods": {m: {"state": "waiting"} for m in
                                                     compare.methods}, "started": time.time(),
                    "pid": os.getpid(), "asked": request}
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
            except Exception as e:  # noqa: BLE001 - the thread's end: never leave "running"
                progress.update(state="failed", error=f"{type(e).__name__}: {e}")
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

    def comparison_asked(self, cid: str) -> dict:
        """What comparison `cid` was asked to do (`asked`)."""
        return asked(self.comparison(cid))

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
        files = [_once(target / f"{cid}-table.csv", lambda p: _write_table(result, p)),
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


def asked(status: dict) -> dict:
    """What a comparison (its status, `CompareRoom.comparison`) was asked to do, for the app
    to show and to fill its form again: {"methods", "task", "data", "test", "shift"}, the
    files by the names they were given (None where none was). The result's methods_asked is
    the record; a comparison from before progress.json kept them reads the names from its
    result's paths."""
    out = dict(status.get("asked") or {})
    result = status.get("result")
    if result is not None:
        out["methods"] = result["methods_asked"]
        out.setdefault("task", comparison_task(result))
        out.setdefault("data", Path(result["run"]["train_csv"]).name)
        for what in ("test", "shift"):  # older copies were inputs/<what>-<name>
            path = result["data"].get(f"{what}_csv")
            out.setdefault(what, Path(path).name.removeprefix(f"{what}-") if path else None)
    out.setdefault("methods", list(status["methods"]))
    out.setdefault("task", "classification")
    for what in ("data", "test", "shift"):
        out.setdefault(what, None)
    return out


def flat_row(row: dict, task: str = "classification") -> dict:
    """One comparison row as table_fields(task) (missing figures left empty)."""
    flat = {k: row.get(k) for k in table_fields(task) if k in row}
    for key in SETS:
        for score in SCORES[task]:
            flat[f"{key}_{score}"] = (row.get(key) or {}).get(score)
    return flat


def _write_table(result: dict, path: Path) -> None:
    """The rows, then the bare model's where the result has them (its cost columns empty)."""
    task = comparison_task(result)
    bare = bare_row(result)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=table_fields(task))
        writer.writeheader()
        for row in [*result["rows"], *([bare] if bare else [])]:
            writer.writerow(flat_row(row, task))


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
