"""Comparing methods from the app: start a comparison on the Train tab's data and settings,
follow each method's progress, read finished comparisons back.

A comparison trains in a background thread of the app (`Workbench.in_background`), its
methods one after another; its folder is data_dir/comparisons/<id>, and its prefix row is a
normal run in the run store's folder, which the Runs tab lists (open, inspect, serve).
Progress lives in the comparison's own `progress.json`, so every browser reads the same.
"""

from __future__ import annotations

import json
import re
import threading
import time
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

PROGRESS = "progress.json"


class CompareRoom:
    """Comparisons over the Workbench's data directory (a mixin of Workbench)."""

    @property
    def comparisons_dir(self) -> Path:
        return self.store.data_dir / "comparisons"

    def start_comparison(self, cfg: RunConfig, methods: list[str],
                         name: str | None = None) -> str:
        """Check, then start training every method in the background; returns the id.
        A bad method name or one that cannot run on the model is refused here, in one
        message, before anything trains."""
        compare = CompareConfig(methods=list(methods))
        loaded = self.model(cfg.model)
        check_comparison(cfg, compare, loaded.model.config.model_type, loaded.dtype)
        self.check_start(cfg)  # the data, refused before the folder exists
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name or "comparison").strip("-") or "comparison"
        cid = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = self.comparisons_dir / cid
        folder.mkdir(parents=True)
        progress = {"state": "running", "methods": {m: {"state": "waiting"} for m in
                                                     compare.methods}, "started": time.time()}
        _write(folder / PROGRESS, progress)
        lock = threading.Lock()

        def heard(event: dict) -> None:
            with lock:
                progress["methods"][event["method"]] = {k: v for k, v in event.items()
                                                        if k != "method"}
                _write(folder / PROGRESS, progress)

        def work() -> None:
            try:
                run_comparison(cfg, compare, folder / "result", loaded, on_event=heard,
                               prefix_folder=self.store.runs_dir / f"{cid}-prefix")
                progress["state"] = "completed"
            except (PrefixLabError, OSError, MemoryError) as e:
                progress.update(state="failed", error=str(e))
            with lock:
                _write(folder / PROGRESS, progress)

        self.in_background(work, name=f"compare {cid}", nice=True)
        return cid

    def comparison(self, cid: str) -> dict:
        """A comparison's progress and, once written, its result (comparison.json)."""
        folder = self.comparisons_dir / cid
        if not re.fullmatch(r"[A-Za-z0-9_-]+", cid) or not (folder / PROGRESS).is_file():
            raise FileNotFoundError(f"no comparison {cid!r}")
        status = json.loads((folder / PROGRESS).read_text())
        if (folder / "result" / FILE).is_file():
            status["result"] = read_comparison(folder / "result")
        return status

    def comparison_ids(self) -> list[str]:
        """Every comparison, newest first."""
        if not self.comparisons_dir.is_dir():
            return []
        return sorted((p.name for p in self.comparisons_dir.iterdir()
                       if (p / PROGRESS).is_file()), reverse=True)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)
