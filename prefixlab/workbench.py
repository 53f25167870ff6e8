"""What the app does, without the app: data preview, presets, starting and following runs,
scoring with several prefixes, generation, batch prediction and downloads.

One `Workbench` per app process. It holds the run store and a cache of loaded base models:
switching prefixes never reloads a model, because a prefix is only a tensor. Per-browser
state (which run is open, how much of its log was read) stays in the UI's session state.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pandas as pd
import torch

from prefixlab.data.columns import guess_columns
from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.data.pairs import TextPairs, load_pairs_csv, looks_like_targets
from prefixlab.data.reading import DataError, read_table
from prefixlab.data.writing import write_csv
from prefixlab.engine.decode import DecodeConfig, Sampling
from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.models import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelInfo,
    describe_model,
    load_model,
    model_provenance,
    portable_model_id,
)
from prefixlab.engine.prefix import Prefix, PrefixConfig
from prefixlab.runs.config import RunConfig
from prefixlab.runs.evaluate import classification_report
from prefixlab.runs.experiment import PreparedData, prepare_data
from prefixlab.runs.finished import (
    Run,
    evaluate_csv,
    label_column_of,
    open_run,
    predict_table,
    text_column_of,
)
from prefixlab.runs.folder import RunError, RunFolder
from prefixlab.runs.generation import evaluate_pairs_csv, pair_encoder
from prefixlab.runs.presets import PRESETS, config_parts
from prefixlab.runs.registry import RunRow, RunStore
from prefixlab.serve.batcher import (
    DEFAULT_MAX_ROWS,
    DEFAULT_WINDOW_S,
    Batcher,
    column_groups,
    predict_frame,
)
from prefixlab.serve.store import PrefixStore

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLE_CSV = ASSETS / "example_feedback.csv"

RUNS_COLUMNS = ("name", "status", "progress", "data", "base model", "macro-F1", "accuracy",
                "prefix size", "model size", "processes", "created", "id")
_UPLOAD_KEY = re.compile(r"^[0-9a-f]{16}-[A-Za-z0-9._-]{1,80}$")  # what keep_upload names
EXAMPLE_KEY = "example"
REFRESH_INTERVAL_S = 0.5  # how stale a polled run list may be (the Train tab polls every 1.5 s)


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


PREFIX_ZIP_FILES = ("prefix.safetensors", "config.json", "report.json", "metrics.jsonl")


def prefix_readme(info: dict) -> str:
    """What each file of a downloaded prefix is, and which base model it needs."""
    model = info["run"]["model"]
    text = (f"# PrefixLab prefix: {info.get('name', '')}\n\n"
            f"Base model: `{portable_model_id(model)}`.\n\n"
            "- `prefix.safetensors`: the prefix itself, one tensor `key_values` of shape "
            "(layers, 2, kv_heads, prefix_length, head_dim), float32: the keys and values "
            "read before every input.\n"
            "- `config.json`: the run's settings, labels, prompt template and data summary.\n"
            "- `report.json`: held-out metrics beside the baselines.\n"
            "- `metrics.jsonl`: the training log, one JSON object per line.\n")
    if notes := model_provenance(model):
        text += f"\n## Base weights\n\n{notes}\n"
    return text


@dataclass
class BatchPrediction:
    """A predicted CSV and what a person should know about it."""

    path: Path  # named after the input: <input stem>-predictions.csv
    rows: int
    label_column: str | None  # gold labels found in the file, if any
    report: dict | None  # metrics against that column (rows with a label the run knows)
    skipped: int  # rows whose gold label is empty or unknown to the run (not in the metrics)
    neutralized: int  # cells written with a leading ' (see data.writing.write_csv)
    reports: dict[str, dict] = field(default_factory=dict)  # several runs: metrics per run name


@dataclass
class Inspection:
    """What the Inspect tab shows for one run (the interpret modules' results)."""

    run: Run
    bank: object  # readouts.ReferenceBank
    nearest: object  # readouts.NearestTokens
    readout: object  # readouts.ValueReadout
    movement: object | None  # maps.Movement, when snapshots exist
    initial_kv: torch.Tensor | None  # the first snapshot: the prefix before training
    figures: dict = field(default_factory=dict)  # the tab's figures by view, made once each
    causal: object | None = None  # inspection.CausalReadout once the knockout is measured
    words: dict = field(default_factory=dict)  # inspection.run_words: groups the maps mark
    maps: dict = field(default_factory=dict)  # kind -> every layer's 3-D maps.PCAMap


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
               processes: int | None = None, target_column: str | None = None) -> RunConfig:
    """A RunConfig from the app's flat settings (a preset, possibly edited); a target column
    makes it a generation run (the label column is then ignored).

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
        target_column=target_column or None, **extra, **run,
        model=model or DEFAULT_MODEL, task=task or None,
        prefix=parts["prefix"], training=parts["training"],
    )


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """A cache whose values are computed once per key, each by the first thread that asks.

    The thread computing one key holds no lock that others need: requests for other keys
    proceed at once (a reference bank being built for one model does not stall scoring with
    another run), and requests for the same key wait for that one computation instead of
    starting another. A computation that fails is not kept; the next request tries again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dict for microseconds, never a computation
        self._futures: dict[K, Future] = {}

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            future = self._futures.get(key)
            mine = future is None
            if mine:
                future = self._futures[key] = Future()
        if mine:
            try:
                future.set_result(compute())
            except BaseException as e:
                with self._lock:
                    if self._futures.get(key) is future:
                        del self._futures[key]
                future.set_exception(e)
                raise
        return future.result()

    def peek(self, key: K) -> V | None:
        """The value if it is computed already (and did not fail), else None; never waits."""
        with self._lock:
            future = self._futures.get(key)
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def drop(self, stale: Callable[[K], bool]) -> None:
        """Forget the keys `stale` names (their values are freed once no caller holds them)."""
        with self._lock:
            for key in [k for k in self._futures if stale(k)]:
                del self._futures[key]


class Workbench:
    """The app's services over one data directory."""

    def __init__(self, data_dir: str | Path, model: str = DEFAULT_MODEL) -> None:
        self.store = RunStore(data_dir)
        self.default_model = model
        self.exports_dir = self.store.data_dir / "exports"
        self.uploads_dir = self.store.data_dir / "uploads"
        # Per-key caches: loading one model, opening one run or building one reference bank
        # never holds up requests for another (one lock over all of them once did).
        self._models: Memo[str, LoadedModel] = Memo()
        self._infos: Memo[str, ModelInfo] = Memo()
        self._runs: Memo[tuple[str, float], Run] = Memo()  # (run id, prefix file mtime)
        self._inspections: Memo[tuple[str, float, int], Inspection] = Memo()
        self._banks: Memo[tuple, object] = Memo()  # (model, the run's words)
        self._batchers: Memo[str, Batcher] = Memo()
        self.batch_window_s = DEFAULT_WINDOW_S  # serving: how long a request waits for company
        self.batch_max_rows = DEFAULT_MAX_ROWS
        self._refresh_lock = threading.Lock()  # a poll never waits for a model load
        self._refreshed = -REFRESH_INTERVAL_S
        self.model_status = "not loaded"

    # --- models ------------------------------------------------------------------------------

    def model(self, name: str | None = None) -> LoadedModel:
        """A loaded base model, once per process (a lock keeps two tabs from loading twice)."""
        name = name or self.default_model
        return self._models.get(name, lambda: self._load(name))

    def _load(self, name: str) -> LoadedModel:
        self.model_status = f"loading {name}"
        loaded = load_model(name, progress=self._progress)
        self.model_status = f"{name} ready on {loaded.device}"
        return loaded

    def _progress(self, message: str) -> None:
        self.model_status = message

    def warm_up(self) -> threading.Thread:
        """Load the default model in the background so the page is served at once."""
        thread = threading.Thread(target=self._warm, daemon=True, name="model-warm-up")
        thread.start()
        return thread

    def _warm(self) -> None:
        try:
            self.model()
        except Exception as e:  # shown in the app's status line; the app keeps serving
            self.model_status = f"could not load {self.default_model}: {e}"

    def model_info(self, name: str | None = None) -> ModelInfo:
        name = name or self.default_model
        if (m := self._models.peek(name)) is not None:
            return ModelInfo(m.name, m.shape, m.num_parameters)
        return self._infos.get(name, lambda: describe_model(name, progress=self._progress))

    def prefix_size(self, settings: dict, model: str | None = None) -> dict:
        """Trainable parameters, their share of the model, and the prefix file size."""
        s = {**PRESETS["Quick look"], **settings}
        info = self.model_info(model)
        cfg = PrefixConfig(prefix_length=int(s["prefix_length"]),
                           reparameterize=bool(s["reparameterize"]))
        with torch.device("meta"):
            trainable = Prefix(info.shape, cfg).trainable_parameters()
        folded = info.shape.params(cfg.prefix_length)
        return {"trainable": trainable, "share": trainable / info.num_parameters,
                "model_parameters": info.num_parameters, "file_bytes": folded * 4}

    # --- data --------------------------------------------------------------------------------

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

    def check_columns(self, path: str | Path, text: str | None,
                      label: str | None) -> LabeledData:
        return load_labeled_csv(path, text, label)

    def check_pairs(self, path: str | Path, text: str | None, target: str) -> TextPairs:
        if not text:
            raise DataError("choose the input column beside the target column")
        return load_pairs_csv(path, text, target)

    def keep_upload(self, path: str | Path, name: str) -> Path:
        """A copy of an uploaded file in the data directory (Gradio's temp copy is cleaned
        up), named by its content so the same file is kept once; a reload finds it again."""
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[-80:].lstrip(".") or "data.csv"
        target = self.uploads_dir / f"{digest}-{safe}"
        if not target.is_file():
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            shutil.copyfile(path, tmp)
            tmp.replace(target)
        return target

    def upload_key(self, path: str | Path) -> str | None:
        """What a browser may remember of a chosen file: a name, never a path."""
        path = Path(path)
        if path == EXAMPLE_CSV:
            return EXAMPLE_KEY
        if path.parent == self.uploads_dir and _UPLOAD_KEY.match(path.name):
            return path.name
        return None

    def kept_upload(self, key: str | None) -> Path | None:
        """The file a remembered key names, if it is still kept (anything else: None)."""
        if key == EXAMPLE_KEY:
            return EXAMPLE_CSV
        if not isinstance(key, str) or not _UPLOAD_KEY.match(key):
            return None
        path = self.uploads_dir / key
        return path if path.is_file() else None

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

    # --- runs --------------------------------------------------------------------------------

    def start_run(self, cfg: RunConfig, name: str | None = None,
                  data_name: str | None = None) -> str:
        """Validate, register and start a run; returns at once with the run id."""
        self.check_start(cfg)
        info = self.model_info(cfg.model)
        # Not during a refresh: it would adopt the half-written run folder, and the registry
        # insert below would then fail (UNIQUE constraint) with the run left behind.
        with self._refresh_lock:
            run_id = self.store.create(cfg, info, name=name, data_name=data_name)
        self.store.start(run_id)
        return run_id

    def runs(self) -> list[RunRow]:
        """Every run, newest first, with the workers' progress folded in.

        A refresh commits to the registry (an fsync: ~20 ms on a busy disk), so concurrent
        pollers share one refresh per REFRESH_INTERVAL_S instead of queueing on SQLite's
        write lock; they read the registry in between.
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

    def finished_runs(self) -> list[RunRow]:
        return [r for r in self.runs() if self.store.folder(r.id).prefix_path.is_file()]

    def metrics(self, run_id: str, offset: int = 0) -> tuple[list[dict], int]:
        return self.store.folder(run_id).read_metrics(offset)

    def report(self, run_id: str) -> dict | None:
        return self.store.folder(run_id).read_report()

    def open(self, run_id: str) -> Run:
        """A run ready to score; cached until its prefix file changes."""
        folder = self.store.folder(run_id)
        mtime = folder.prefix_path.stat().st_mtime if folder.prefix_path.is_file() else 0.0
        key = (run_id, mtime)
        self._runs.drop(lambda k: k[0] == run_id and k != key)  # an older prefix file's

        def load() -> Run:
            return open_run(folder.path, self.model(folder.run_config().model))

        return self._runs.get(key, load)

    # --- playground --------------------------------------------------------------------------

    def serving(self, model: str | None = None) -> Batcher:
        """The batcher of one base model: requests naming any of its runs meet in mixed
        batches (prefixlab.serve.batcher); prefixes load on demand into the store's LRU."""
        name = model or self.default_model

        def start() -> Batcher:
            loaded = self.model(name)
            store = PrefixStore(loaded, locate=lambda run_id: self.store.folder(run_id).path)
            return Batcher(loaded, store, self.batch_window_s, self.batch_max_rows)

        return self._batchers.get(name, start)

    def _batcher_of(self, run_id: str) -> Batcher:
        self.store.folder(run_id)  # RunError for anything that is not a run id
        return self.serving(self.store.get(run_id).model)  # RunError for an unknown id

    def compare(self, texts: list[str], run_ids: list[str], bare: bool = True) -> pd.DataFrame:
        """One row per text and source (each prefix, and the bare model once per distinct
        prompt and label set):
        the predicted label and every label's probability. All runs' requests go in at once,
        so they share mixed batches."""
        pending, bare_runs = [], {}
        for run_id in run_ids:
            batcher = self._batcher_of(run_id)
            name = self.store.get(run_id).name
            pending.append((f"prefix: {name}", batcher.submit_score(run_id, texts)))
            # Runs that share model, prompt and labels give the bare model the same input:
            # it is scored (and shown) once for them.
            info = self.store.folder(run_id).read_config()
            prompt = (info["run"]["model"], info["run"].get("template"),
                      info["run"].get("max_length"), tuple(info["labels"]))
            bare_runs.setdefault(prompt, (run_id, batcher, name))
        if bare:
            for run_id, batcher, name in bare_runs.values():
                source = ("bare model (zero-shot)" if len(bare_runs) == 1
                          else f"bare model, {name}'s prompt")
                pending.append((source, batcher.submit_score(run_id, texts, with_prefix=False)))
        rows = []
        for source, future in pending:
            scored = future.result()
            labels = scored.prefix.labels
            for text, p in zip(texts, scored.probabilities, strict=True):
                rows.append({"text": text, "source": source,
                             "predicted": labels[int(np.argmax(p))],
                             **{f"p({lab})": round(float(v), 4)
                                for lab, v in zip(labels, p, strict=True)}})
        return pd.DataFrame(rows)

    def says_what(self, text: str, run_ids: list[str], max_new_tokens: int = 20
                  ) -> pd.DataFrame:
        """Which prefix says what: for one text, each run's predicted label, its probability
        and its greedy continuation, all runs in shared mixed batches."""
        pending = []
        for run_id in run_ids:
            batcher = self._batcher_of(run_id)
            pending.append((run_id, batcher.submit_score(run_id, [text]),
                            batcher.submit_generate(run_id, [text], max_new_tokens)))
        rows = []
        for run_id, scored, written in pending:
            s = scored.result()
            p = s.probabilities[0]
            best = int(np.argmax(p))
            rows.append({"run": self.store.get(run_id).name, "predicted": s.prefix.labels[best],
                         "probability": round(float(p[best]), 4),
                         "continuation": written.result()[0], "id": run_id})
        return pd.DataFrame(rows, columns=["run", "predicted", "probability", "continuation",
                                           "id"])

    def generate_texts(self, prompts: list[str], run_ids: list[str], max_new_tokens: int = 40,
                       sampling: Sampling | None = None, num_beams: int = 1) -> list[dict]:
        """Continuations of every prompt under every run (none: the bare model): greedy,
        drawn (`sampling`, each prompt on its own seeded generator) or by beam search. All
        runs' requests share mixed batches, with other clients' too."""
        pending = []
        for run_id in run_ids or [None]:
            batcher = self._batcher_of(run_id) if run_id else self.serving()
            pending.append((run_id, batcher.submit_generate(run_id, prompts, max_new_tokens,
                                                            sampling, num_beams)))
        return [{"run_id": run_id or "", "prompt": prompt, "generated": out}
                for run_id, future in pending
                for prompt, out in zip(prompts, future.result(), strict=True)]

    def generate(self, prompt: str, run_id: str | None, max_new_tokens: int = 40,
                 do_sample: bool = False, temperature: float = 1.0, seed: int = 0) -> str:
        """One continuation, greedy or drawn (seeded: the same seed gives the same text); it
        shares a mixed batch with everyone else's requests either way."""
        sampling = Sampling(int(seed), float(temperature)) if do_sample else None
        return self.generate_texts([prompt], [run_id] if run_id else [], max_new_tokens,
                                   sampling)[0]["generated"]

    def predict_csv(self, run_ids: str | list[str], path: str | Path,
                    text_column: str | None = None, name: str | None = None
                    ) -> BatchPrediction:
        """Score a CSV and write it back with predictions; every cell neutralized. One run
        adds `predicted_label` and `p_<label>`; several add one column group per run
        (`<run name>: ...`), read in shared mixed batches. When the file has a column of gold
        labels, each run's metrics against it come along."""
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        if not ids:
            raise RunError("name at least one run to predict with")
        runs = [self.open(i) for i in ids]
        if len(runs) > 1 and any(r.is_generation for r in runs):
            raise RunError("batch generation takes one generation run at a time")
        if len(runs) == 1:
            out = predict_table(runs[0], path, text_column)
            groups = [""]
        else:
            models = {r.config.model for r in runs}
            if len(models) > 1:
                raise RunError("runs predicted together must share a base model; these use "
                               + ", ".join(sorted(models)))
            batcher = self._batcher_of(ids[0])
            prefixes = [batcher.store.get(i) for i in ids]
            frame = read_table(path).frame
            column = text_column_of(frame, text_column or runs[0].config.text_column, path,
                                    guess=not text_column)
            out = predict_frame(batcher.loaded, prefixes, frame, column)
            groups = column_groups(prefixes)
        added = [c for c in out.columns if c == "predicted_label" or str(c).startswith("p_")
                 or any(g and str(c).startswith(g) for g in groups)]
        gold_column = label_column_of(runs[0], out.drop(columns=added))
        reports, skipped = {}, 0
        if gold_column is not None:
            gold = out[gold_column].fillna("").astype(str).str.strip()
            for run, group in zip(runs, groups, strict=True):
                known = gold.isin(run.labels)
                skipped = max(skipped, int((~known).sum()))
                if known.any():
                    reports[group.removesuffix(": ") or run.folder.path.name] = \
                        classification_report(gold[known].tolist(),
                                              out.loc[known, f"{group}predicted_label"].tolist(),
                                              run.labels)
        # A folder per call: two users' predictions of same-named files never meet, and the
        # file keeps the input's name for whoever downloads it.
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or path).stem)[:60] or "data"
        folder = self.exports_dir / f"predictions-{int(time.time())}-{uuid.uuid4().hex[:8]}"
        target = folder / f"{stem}-predictions.csv"
        neutralized = write_csv(out, target)
        report = next(iter(reports.values()), None)
        return BatchPrediction(target, len(out), gold_column, report, skipped, neutralized,
                               reports if len(runs) > 1 else {})

    def evaluate_csv(self, run_id: str, path: str | Path) -> dict:
        """The run's prefix and its baselines on a held-out labeled CSV (a generation run:
        beside the bare model on a CSV of inputs and references)."""
        run = self.open(run_id)
        if run.is_generation:
            return evaluate_pairs_csv(run.loaded.model, run.encoder, run.kv, run.config, path)
        return evaluate_csv(run, path)

    def is_generation(self, run_id: str) -> bool:
        """Whether a run generates text (read from its config, no model loaded)."""
        try:
            return self.store.folder(run_id).read_config().get("task") == "generation"
        except (RunError, ValueError, OSError):
            return False

    def generate_side_by_side(self, texts: list[str], run_ids: list[str], bare: bool = True,
                              decode: DecodeConfig | None = None) -> pd.DataFrame:
        """One row per text and source: each generation run's output (its template and
        decoding unless `decode` is given), and the bare model's on that run's template."""
        rows = []
        for run_id in run_ids:
            run = self.open(run_id)
            name = self.store.get(run_id).name
            if not run.is_generation:
                raise RunError(f"run {name!r} classifies; pick generation runs here (or score "
                               "it above)")
            sources = [(f"prefix: {name}", True)]
            if bare:
                sources.append((f"bare model, {name}'s prompt", False))
            for source, with_prefix in sources:
                outputs = run.generate(texts, with_prefix=with_prefix, decode=decode)
                rows += [{"input": t, "source": source, "output": o}
                         for t, o in zip(texts, outputs, strict=True)]
        return pd.DataFrame(rows, columns=["input", "source", "output"])

    def download(self, run_id: str, kind: str) -> Path:
        """A zip of the run's prefix + config ("prefix") or its PEFT adapter ("peft")."""
        from prefixlab.engine.peft_interop import export_peft
        from prefixlab.engine.prefix import load_prefix

        folder = self.store.folder(run_id)
        info = folder.read_config()
        self.exports_dir.mkdir(parents=True, exist_ok=True)
        target = self.exports_dir / f"{run_id}-{kind}.zip"
        # A folder of this call's own: two users downloading the same run at once must not
        # delete each other's files; the finished zip replaces the target atomically.
        work = Path(tempfile.mkdtemp(prefix=f".{run_id}-{kind}-", dir=self.exports_dir))
        staging, tmp = work / kind, work / "download.zip"
        try:
            if kind == "peft":
                loaded = self.model(info["run"]["model"])
                kv = load_prefix(folder.prefix_path, loaded.shape).kv
                export_peft(kv, loaded.model.config, staging, portable_model_id(loaded.name),
                            notes=model_provenance(loaded.name))
            elif kind == "prefix":
                # One tensor file: the folded key/values that scoring and export read (the
                # run folder's prefix_params.safetensors only matters for resuming it).
                staging.mkdir()
                for name in PREFIX_ZIP_FILES:
                    if (folder.path / name).is_file():
                        shutil.copy2(folder.path / name, staging / name)
                (staging / "README.md").write_text(prefix_readme(info))
            else:
                raise ValueError(f"unknown download kind {kind!r}")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(staging.rglob("*")):
                    if f.is_file():
                        z.write(f, f.relative_to(staging))
            tmp.replace(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target

    # --- inspection --------------------------------------------------------------------------

    def inspection(self, run_id: str, top_k: int = 10) -> Inspection:
        """Nearest tokens, value readout and movement of a run's prefix; cached per prefix
        file. The reference bank is computed once per base model and kept on disk."""
        from prefixlab.interpret import maps, readouts
        from prefixlab.runs.inspection import (
            cached_nearest_tokens,
            load_snapshots,
            run_words,
            word_ids,
        )

        run = self.open(run_id)
        mtime = run.folder.prefix_path.stat().st_mtime
        key = (run_id, mtime, top_k)
        self._inspections.drop(lambda k: k[0] == run_id and k[1] != mtime)

        def inspect() -> Inspection:
            groups = run_words(run)
            words = word_ids(groups)
            bank = self.bank(run, words)
            nearest = cached_nearest_tokens(run, bank, top_k, words)
            readout = readouts.value_readout(run.loaded, run.kv, top_k)
            snapshots = load_snapshots(run.folder.path)
            movement = maps.prefix_movement(snapshots) if len(snapshots) > 1 else None
            return Inspection(run, bank, nearest, readout, movement,
                              snapshots[0][1] if snapshots else None, words=groups)

        return self._inspections.get(key, inspect)

    def knockout(self, run_id: str, rows: int | None, progress=None):
        """The run's knockout on `rows` held-out rows (inspection.run_knockout), kept with its
        inspection. rows=None: only what is already measured for this prefix (None if none)."""
        from prefixlab.runs.inspection import run_knockout, stored_knockout_rows

        ins = self.inspection(run_id)
        if rows is None:
            if ins.causal is not None:
                return ins.causal
            rows = stored_knockout_rows(ins.run)
            if rows is None:
                return None
        if ins.causal is None or ins.causal.knockout.rows != rows:
            ins.causal = run_knockout(ins.run, rows, progress=progress)
        return ins.causal

    def bank(self, run: Run, extra_ids: list[int] | None = None):
        """The reference bank for a run: the model's frequent tokens plus the run's own words
        (labels, init text, data words; inspection.run_words). Kept per model *and* words, so
        runs with different labels on one model never share label words."""
        from prefixlab.interpret import bank
        from prefixlab.runs.inspection import run_words, word_ids

        if extra_ids is None:
            extra_ids = word_ids(run_words(run))
        loaded = run.loaded
        # The frequent tokens and the vocabulary's layer 0 are one per model (built once, on
        # disk); only a run's own words are read per run, into a small file of their own.
        shared = self._banks.get((loaded.name, None),
                                 lambda: bank.model_bank(loaded))
        return self._banks.get((loaded.name, tuple(extra_ids)),
                               lambda: bank.with_words(shared, loaded, extra_ids))

    def folder(self, run_id: str) -> RunFolder:
        return self.store.folder(run_id)
