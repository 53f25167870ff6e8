"""What the app does, without the app: data preview, presets, starting and following runs,
scoring with several prefixes, generation, batch prediction, inspection and downloads.

One `Workbench` per app process, over one data directory. It holds the run store and caches
of loaded base models, opened runs and inspections: switching prefixes never reloads a model,
because a prefix is only a tensor. Per-browser state (which run is open, how much of its log
was read) stays in the UI's session state, never here.

The Workbench is made of rooms, one module each: models, datasets, runs, serving, inspection,
explaining, readable (a text prompt that decides as a prefix does), downloads, comparing.
Background work (loading the default model, drawing the
Inspect views ahead) starts in one place, `Workbench.in_background`.

Imports `serve`, `runs`, `figures`, `interpret`, `engine` and `data`; never `ui` or gradio.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from prefixlab.engine.models import DEFAULT_MODEL, LoadedModel, ModelInfo
from prefixlab.runs.finished import Run
from prefixlab.runs.registry import RunStore
from prefixlab.serve.batcher import DEFAULT_MAX_ROWS, DEFAULT_WINDOW_S, Batcher
from prefixlab.serve.limits import Limits
from prefixlab.workbench.comparing import CompareRoom
from prefixlab.workbench.datasets import DataRoom
from prefixlab.workbench.downloads import DownloadRoom
from prefixlab.workbench.explaining import ExplainRoom
from prefixlab.workbench.inspection import Inspection, InspectionRoom
from prefixlab.workbench.memo import Memo
from prefixlab.workbench.models import ModelRoom
from prefixlab.workbench.readable import ReadableRoom
from prefixlab.workbench.runs import REFRESH_INTERVAL_S, RunRoom
from prefixlab.workbench.serving import ServingRoom


class Workbench(ModelRoom, DataRoom, RunRoom, ServingRoom, InspectionRoom, ExplainRoom,
                ReadableRoom, DownloadRoom, CompareRoom):
    """The app's services over one data directory (see each room for what it does)."""

    def __init__(self, data_dir: str | Path, model: str | None = None,
                 limits: Limits | None = None, precision: str = "auto",
                 device: str | None = None) -> None:
        self.store = RunStore(data_dir)
        # What one request may ask (the operator's environment, read once here).
        self.limits = limits or Limits.from_env()
        self.default_model = model or DEFAULT_MODEL
        self.precision = precision  # the shared models' compute dtype (engine/precision.py)
        # The shared models' device: a GPU other than the one runs train on, for instance.
        self.device = device
        self.exports_dir = self.store.data_dir / "exports"
        self.uploads_dir = self.store.data_dir / "uploads"
        # Per-key caches: loading one model, opening one run or building one reference bank
        # never holds up requests for another (one lock over all of them once did).
        self._models: Memo[str, LoadedModel] = Memo()
        self._infos: Memo[str, ModelInfo] = Memo()
        self._runs: Memo[tuple[str, float], Run] = Memo()  # (run id, prefix file mtime)
        self._inspections: Memo[tuple[str, float, int], Inspection] = Memo()
        self._banks: Memo[tuple, object] = Memo()  # (model, the run's words)
        self._explaining: Memo[tuple, object] = Memo()  # (what, run id, prefix mtime, ...)
        self._batchers: Memo[str, Batcher] = Memo()
        self.batch_window_s = DEFAULT_WINDOW_S  # serving: how long a request waits for company
        self.batch_max_rows = DEFAULT_MAX_ROWS
        self._refresh_lock = threading.Lock()  # a poll never waits for a model load
        self._refreshed = -REFRESH_INTERVAL_S
        self._last_view = 0.0  # when a person last asked for an Inspect view (monotonic)
        self.model_status = "not loaded"

    def in_background(self, fn: Callable, *args, name: str, nice: bool = False
                      ) -> threading.Thread:
        """Run fn(*args) in a daemon thread: the one place the app starts background work.
        `nice` lowers the thread's priority where the platform allows, so that people's
        requests come first on shared cores."""

        def run() -> None:
            if nice:
                with suppress(OSError, AttributeError):  # not every platform nices one thread
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            fn(*args)

        thread = threading.Thread(target=run, daemon=True, name=name)
        thread.start()
        return thread


__all__ = ["Workbench"]
