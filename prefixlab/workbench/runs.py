"""The runs room: a run's settings from the app's flat form, the check before Start, starting
runs, the polled list of runs with the workers' progress folded in, and opening a finished run
to score with."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch

from prefixlab.data.reading import DataError
from prefixlab.engine.balance import describe_decision
from prefixlab.engine.decode import DecodeConfig
from prefixlab.engine.encode import Encoder, Template, TemplateError
from prefixlab.engine.models import DEFAULT_MODEL, LoadedModel, ModelInfo
from prefixlab.runs.config import RunConfig
from prefixlab.runs.experiment import PreparedData, prepare_data
from prefixlab.runs.extension import LongerOffer, describe_extension, longer_offer
from prefixlab.runs.finished import Run, evaluate_csv, open_run
from prefixlab.runs.folder import RunError, RunFolder
from prefixlab.runs.generation import pair_encoder
from prefixlab.runs.presets import config_parts
from prefixlab.runs.registry import RunRow, RunStore
from prefixlab.serve.store import check_served
from prefixlab.workbench.memo import Memo

RUNS_COLUMNS = ("name", "status", "progress", "data", "base model", "macro-F1", "accuracy",
                "prefix size", "model size", "processes", "created", "id")
ADAPT_CHOICES: dict[str, str] = {
    "as trained": "none",
    "adapted to the file: label shares (EM)": "em",
    "adapted to the file: batch calibration": "batch",
}
"""The app's words for finished.evaluate_csv's adapt_prior values."""
REFRESH_INTERVAL_S = 0.5  # how stale a polled run list may be (the Train tab polls every 1.5 s)


def process_range() -> tuple[int, int]:
    """(default, most) data-parallel processes a run may use here: every CUDA device by
    default where there is more than one; on CPU one, up to one per core."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        return gpus, gpus
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1, max(1, cores or 1)


def run_config(csv_path: str, text_column: str | None, label_column: str | None,
               settings: dict, model: str = DEFAULT_MODEL, task: str | None = None,
               processes: int | None = None, target_column: str | None = None,
               shift_csv: str | None = None) -> RunConfig:
    """A RunConfig from the app's flat settings (a preset, possibly edited); a target column
    makes it a generation run (the label column is then ignored). `shift_csv`: labeled rows
    from other topics that the final report scores beside validation (RunConfig.shift_csv).

    In a generation run "max tokens per example" bounds the prompt; the target gets the
    tokens it may generate (`DecodeConfig.max_new_tokens`) on top, so that inputs are not
    cut to make room for sentences.
    """
    parts = config_parts(settings)
    generating = bool(target_column)
    decode = DecodeConfig()
    extra = {"generation": decode} if generating else {}
    run = parts["run"]
    run["max_length"] += decode.max_new_tokens + 1 if generating else 0
    # dicts, not PrefixConfig/TrainConfig: RunConfig then reports every part's problems
    return RunConfig(
        nproc=int(processes) if processes else None,
        train_csv=csv_path, text_column=text_column or None,
        label_column=None if generating else label_column or None,
        target_column=target_column or None, shift_csv=shift_csv or None, **extra, **run,
        model=model or DEFAULT_MODEL, task=task or None,
        prefix=parts["prefix"], training=parts["training"],
    )


def decision_sentence(report: dict) -> str:
    """How a report decided its labels, in plain words (empty for raw scores): the pages
    that show a report say it under the metrics, as the CLI does."""
    return describe_decision(report)


@dataclass
class StartCheck:
    """What Start would find: the prepared data, or why it cannot go ahead."""

    prepared: PreparedData | None
    data_problems: list[str] = field(default_factory=list)  # the CSV's, one per line
    prompt_problem: str | None = None  # the prompt leaves no room for the text

    @property
    def ok(self) -> bool:
        return self.prepared is not None


class RunRoom:
    """Starting and following runs. Set up by Workbench.__init__: `store`, `_runs`,
    `_refresh_lock`, `_refreshed`; `model` and `model_info` come from the models room."""

    store: RunStore
    _runs: Memo[tuple[str, float], Run]  # (run id, prefix file mtime)
    _refresh_lock: threading.Lock  # a poll never waits for a model load
    _refreshed: float
    model: Callable[..., LoadedModel]
    model_info: Callable[..., ModelInfo]

    def check_start(self, cfg: RunConfig) -> PreparedData:
        """What a worker would refuse, checked before a run exists: the data (columns,
        labels, rows left for validation: DataError) and whether the prompt with every label
        name leaves room for the text within max_length tokens (TemplateError)."""
        prepared = prepare_data(cfg)
        tokenizer = self.model(cfg.model).tokenizer
        if cfg.is_generation:
            pair_encoder(tokenizer, cfg)
        else:
            Encoder(tokenizer, Template(cfg.template), prepared.labels, cfg.max_length)
        return prepared

    def start_check(self, cfg: RunConfig) -> StartCheck:
        """check_start as a verdict for a page to show (other errors still raise)."""
        try:
            return StartCheck(self.check_start(cfg))
        except DataError as e:
            return StartCheck(None, data_problems=list(e.problems))
        except TemplateError as e:
            return StartCheck(None, prompt_problem=str(e))

    def start_run(self, cfg: RunConfig, name: str | None = None,
                  data_name: str | None = None) -> str:
        """Validate, register and start a run; returns at once with the run id."""
        prepared = self.check_start(cfg)
        info = self.model_info(cfg.model)
        # Not during a refresh: it would adopt the half-written run folder, and the registry
        # insert below would then fail (UNIQUE constraint) with the run left behind.
        with self._refresh_lock:
            run_id = self.store.create(cfg, info, name=name, data_name=data_name,
                                       prepared=prepared)
        self.store.start(run_id)
        return run_id

    def runs(self) -> list[RunRow]:
        """Every run, newest first, with the workers' progress folded in.

        A refresh commits to the registry (an fsync), so concurrent pollers share one refresh
        per REFRESH_INTERVAL_S instead of queueing on SQLite's write lock; they read the
        registry in between.
        """
        with self._refresh_lock:
            if time.monotonic() - self._refreshed >= REFRESH_INTERVAL_S:
                self._refreshed = time.monotonic()
                return self.store.refresh()
        return self.store.list()

    def refresh(self) -> list[RunRow]:
        """Fold the workers' progress into the registry now (never while a run is created)."""
        with self._refresh_lock:
            self._refreshed = time.monotonic()
            return self.store.refresh()

    def runs_table(self) -> pd.DataFrame:
        rows = []
        for r in self.runs():
            folder = self.store.folder(r.id)
            prefix_kb = folder.prefix_path.stat().st_size / 1024 if folder.prefix_path.is_file() \
                else None
            try:
                model_params = folder.read_config()["model"]["parameters"]
            except (RunError, ValueError, KeyError):
                model_params = None
            processes = folder.status().get("processes")  # written once the run starts
            rows.append({
                "name": r.name, "status": r.state,
                "progress": f"{r.step}/{r.total_steps}" if r.total_steps else "",
                "data": r.data_name, "base model": r.model,
                "macro-F1": None if r.macro_f1 is None else round(r.macro_f1, 3),
                "accuracy": None if r.accuracy is None else round(r.accuracy, 3),
                "prefix size": "" if prefix_kb is None else f"{prefix_kb:,.0f} KB",
                "model size": "" if model_params is None else f"{model_params * 4 / 2**20:,.0f} MB",
                "processes": processes or "",
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)),
                "id": r.id,
            })
        return pd.DataFrame(rows, columns=list(RUNS_COLUMNS))

    def phase(self, run_id: str) -> str | None:
        """What an active run is doing, in words (its worker writes it; None when over)."""
        folder = self.store.folder(run_id)
        status = folder.status()
        if status.get("state") not in ("queued", "running"):
            return None
        if folder.cancel_requested():
            return "cancelling: stops after the current step, keeping the last checkpoint"
        return status.get("phase")

    def longer_offer(self, run_id: str) -> LongerOffer | None:
        """Whether a run may train longer (completed, ended on its budget), and what to
        offer it; None for any other run."""
        if self.store.get(run_id).state != "completed":
            return None
        return longer_offer(self.store.folder(run_id))

    def train_longer(self, run_id: str, more_minutes: float, more_epochs: int) -> str:
        """Resume a completed run that ended on its budget with more minutes and/or epochs
        (its worker starts at once); returns what it will do, in words."""
        extension = self.store.train_longer(run_id, more_minutes, more_epochs)
        return describe_extension(extension)

    def finished_runs(self) -> list[RunRow]:
        return [r for r in self.runs() if self.store.folder(r.id).prefix_path.is_file()]

    def has_prefix(self, run_id: str) -> bool:
        """Whether the run has written a prefix yet (RunError for anything not a run id)."""
        return self.store.folder(run_id).prefix_path.is_file()

    def metrics(self, run_id: str, offset: int = 0) -> tuple[list[dict], int]:
        return self.store.folder(run_id).read_metrics(offset)

    def report(self, run_id: str) -> dict | None:
        return self.store.folder(run_id).read_report()

    def is_generation(self, run_id: str) -> bool:
        """Whether a run generates text (read from its config, no model loaded)."""
        try:
            return self.store.folder(run_id).read_config().get("task") == "generation"
        except (RunError, ValueError, OSError):
            return False

    def open(self, run_id: str) -> Run:
        """A run ready to score; cached until its prefix file changes."""
        folder = self.store.folder(run_id)
        mtime = folder.prefix_path.stat().st_mtime if folder.prefix_path.is_file() else 0.0
        key = (run_id, mtime)
        self._runs.drop(lambda k: k[0] == run_id and k != key)  # an older prefix file's

        def load() -> Run:
            return open_run(folder.path, self.model(folder.run_config().model))

        return self._runs.get(key, load)

    def folder(self, run_id: str) -> RunFolder:
        return self.store.folder(run_id)

    def evaluate_test(self, run_id: str, path: str, adapt_prior: str = "none",
                      progress: Callable[[str, int, int], None] | None = None) -> dict:
        """The run on a held-out test CSV (the serving room's evaluate_csv), its decision
        adapted to the file's rows when `adapt_prior` is em or batch (finished.evaluate_csv
        says what that assumes); a generation run has no decision to adapt."""
        if adapt_prior == "none" or self.is_generation(run_id):
            return self.evaluate_csv(run_id, path, progress=progress)
        check_served(self.store.folder(run_id), run_id)
        return evaluate_csv(self.open(run_id), path, progress=progress,
                            adapt_prior=adapt_prior)
