"""A run folder and the steps that fill it: prepare data, train, evaluate, predict, export.

Layout of a run folder (safetensors for tensors, JSON for everything else, never pickle):
    config.json              RunConfig + labels, template, base model, data summary
    status.json              state (created/running/completed/failed/cancelled/interrupted),
                             written only by the holder of run.lock
    run.lock, claim.lock     empty lock files: a live worker holds run.lock (see runs.py)
    prefix.safetensors       folded key/values (L, 2, H_kv, P, D) for inference and export
    prefix_params.safetensors the full parameterization (MLP included), for resume/inspection
    checkpoint.safetensors   prefix parameters + AdamW moments; checkpoint.json has the step
    metrics.jsonl            append-only: one JSON object per step / evaluation / event
    snapshots/step_N.safetensors  the prefix during training (a few hundred KB each): at each
                             checkpoint and at each evaluation
    report.json              the final evaluation with baselines, the kept step and why
                             training stopped

A run classifies (labels) or generates (a target column: `generation.py` holds its steps);
config.json's "task" says which.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from prefixlab.data import tables as datamod
from prefixlab.data.pairs import TextPairs
from prefixlab.engine import distributed
from prefixlab.engine.balance import (
    MIN_FIT_ROWS,
    LabelRule,
    fit_prior_scale,
    label_rule,
    prior_from_counts,
)
from prefixlab.engine.decode import DecodeConfig
from prefixlab.engine.encode import Encoder, PairEncoder
from prefixlab.engine.models import LoadedModel, ModelInfo, load_model
from prefixlab.engine.predict import score_labels, score_log_likelihoods
from prefixlab.engine.prefix import (
    Prefix,
    default_init_text,
    init_prefix,
    load_prefix,
    save_prefix,
)
from prefixlab.engine.stopping import EarlyStopping
from prefixlab.engine.train import Checkpoint, StepInfo, train
from prefixlab.errors import ConfigError, PrefixLabError
from prefixlab.files import atomic_save_tensors, atomic_write_json, read_json
from prefixlab.runs.config import RunConfig
from prefixlab.runs.evaluate import (
    classification_report,
    majority_baseline,
    prediction_warnings,
    predictions_from_probs,
    tfidf_baseline,
)
from prefixlab.runs.generation import (
    default_generation_init_text,
    generate,
    generation_report,
    live_scores,
    pair_encoder,
    prepare_pairs,
)

CANCEL_FILE = "cancel.request"  # its presence asks the run's worker to stop
STATES = ("created", "queued", "running", "completed", "failed", "cancelled", "interrupted")


class RunError(PrefixLabError, RuntimeError):
    """A run folder that cannot be used as asked."""


def _process_started() -> float:
    import psutil

    return psutil.Process().create_time()


class RunFolder:
    """Reads and writes the files of one run; every write is atomic."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    prefix_path = property(lambda self: self.path / "prefix.safetensors")
    params_path = property(lambda self: self.path / "prefix_params.safetensors")
    checkpoint_path = property(lambda self: self.path / "checkpoint.safetensors")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    report_path = property(lambda self: self.path / "report.json")
    snapshots_dir = property(lambda self: self.path / "snapshots")

    def exists(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict:
        if not self.exists():
            raise RunError(f"{self.path} is not a PrefixLab run folder (no config.json)")
        return read_json(self.config_path)

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.read_config()["run"])

    def write_config(self, info: dict) -> None:
        atomic_write_json(self.config_path, info)

    def status(self) -> dict:
        if not self.status_path.is_file():
            return {"state": "created"}
        try:
            return read_json(self.status_path)
        except ValueError:
            return {"state": "interrupted", "error": "status.json was unreadable"}

    def set_status(self, state: str, **extra) -> None:
        """Record the run's state with the writing process's pid and start time.

        Only the holder of the run's lock writes this (runs.RunLock: the worker, a CLI
        training, or the app while it holds a free lock); whether a worker lives is told by
        that lock, not by the pid."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        atomic_write_json(self.status_path, {
            "state": state, "updated": time.time(), "pid": os.getpid(),
            "pid_started": _process_started(), **extra,
        })

    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).is_file()

    def append_metrics(self, record: dict) -> None:
        """One JSON line per event; a reader may see a partial last line and skip it."""
        line = json.dumps(record, default=float) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def read_metrics(self, offset: int = 0) -> tuple[list[dict], int]:
        """Records appended since byte `offset`, and the offset to read from next time."""
        if not self.metrics_path.is_file():
            return [], offset
        with open(self.metrics_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records, offset + end

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        atomic_save_tensors(self.checkpoint_path, ckpt.tensors(),
                            {"step": str(ckpt.step), "elapsed_s": repr(ckpt.elapsed_s),
                             "planned_steps": str(ckpt.planned_steps)})
        atomic_save_tensors(self.params_path, ckpt.prefix_state)

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.checkpoint_path), framework="pt") as f:
                meta = f.metadata() or {}
            step, elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
            planned = int(meta.get("planned_steps", 0))
            tensors = load_file(str(self.checkpoint_path))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise RunError(f"checkpoint in {self.path} is unreadable: {e}") from e
        return Checkpoint.from_tensors(step, tensors, elapsed, planned)

    def save_snapshot(self, step: int, kv: torch.Tensor) -> None:
        atomic_save_tensors(self.snapshots_dir / f"step_{step:06d}.safetensors",
                            {"key_values": kv})

    def load_snapshot(self, step: int) -> torch.Tensor:
        path = self.snapshots_dir / f"step_{step:06d}.safetensors"
        try:
            return load_file(str(path))["key_values"]
        except (SafetensorError, OSError, KeyError) as e:
            raise RunError(f"snapshot of step {step} in {self.path} is unreadable: {e}") from e

    def snapshots(self) -> list[tuple[int, Path]]:
        if not self.snapshots_dir.is_dir():
            return []
        found = []
        for p in self.snapshots_dir.glob("step_*.safetensors"):
            try:
                found.append((int(p.stem[5:]), p))
            except ValueError:
                continue
        return sorted(found)

    def write_report(self, report: dict) -> None:
        atomic_write_json(self.report_path, report)

    def read_report(self) -> dict | None:
        return read_json(self.report_path) if self.report_path.is_file() else None


@dataclass
class PreparedData:
    train: datamod.LabeledData | TextPairs  # TextPairs in a generation run
    validation: datamod.LabeledData | TextPairs
    labels: list[str]  # empty in a generation run
    warnings: list[str]


def _sample(data: datamod.LabeledData, n: int | None, seed: int) -> datamod.LabeledData:
    if n is None or len(data) <= n:
        return data
    keep, _ = datamod.stratified_split(data, 1 - n / len(data), seed)
    return keep


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load, validate and split the data; raises DataError before anything is written."""
    if cfg.is_generation:
        train_part, val, warnings = prepare_pairs(cfg)
        return PreparedData(train_part, val, [], warnings)
    full = datamod.load_labeled_csv(cfg.train_csv, cfg.text_column, cfg.label_column)
    warnings = list(full.warnings)
    seed = cfg.training.seed
    if cfg.validation_csv:
        val = datamod.load_labeled_csv(cfg.validation_csv, full.text_column, full.label_column)
        warnings += [f"validation file: {w}" for w in val.warnings]
        unknown = sorted(set(val.label_names) - set(full.label_names))
        if unknown:
            raise datamod.DataError(
                f"the validation file has labels that training never sees: {', '.join(unknown)}"
            )
        train_part = full
    else:
        train_part, val = datamod.stratified_split(full, cfg.validation_share, seed)
        warnings += train_part.warnings[len(full.warnings):]
    train_part = _sample(train_part, cfg.max_train_examples, seed)
    val = _sample(val, cfg.max_eval_examples, seed)
    if len(val) == 0:
        raise datamod.DataError("no rows are left for validation; add rows or a validation file")
    return PreparedData(train_part, val, list(full.label_names), warnings)


@dataclass
class Run:
    """A run folder opened for use: its settings, labels, model and folded prefix."""

    folder: RunFolder
    config: RunConfig
    labels: list[str]  # empty in a generation run
    loaded: LoadedModel
    kv: torch.Tensor  # (L, 2, H_kv, P, D)
    encoder: Encoder | PairEncoder

    @property
    def is_generation(self) -> bool:
        return isinstance(self.encoder, PairEncoder)

    def score(self, texts: list[str], with_prefix: bool = True) -> np.ndarray:
        if self.is_generation:
            raise RunError(f"run {self.folder.path.name} generates text; it has no labels to "
                           "score")
        return score_labels(self.loaded.model, self.kv if with_prefix else None, self.encoder,
                            texts)

    def generate(self, texts: list[str], with_prefix: bool = True,
                 decode: DecodeConfig | None = None) -> list[str]:
        """One output per text with the run's template (and decoding, unless given)."""
        if not self.is_generation:
            raise RunError(f"run {self.folder.path.name} classifies; use score, or free "
                           "generation")
        return generate(self.loaded.model, self.encoder, self.kv if with_prefix else None,
                        texts, decode or self.config.generation)


def _present(name: str | None, columns) -> str | None:
    """The run's column name when this file has it (else None: guess the file's own)."""
    return name if name in [str(c) for c in columns] else None


def evaluate_csv(run: Run, path: str | Path, text_column: str | None = None,
                 label_column: str | None = None) -> dict:
    """The run's prefix on a held-out labeled CSV, beside both baselines on the same rows.

    Columns: as given, else the run's own names when the file has them, else guessed. A label
    the run never trained on is refused (the prefix cannot predict it).
    """
    columns = datamod.read_table(path).frame.columns
    data = datamod.load_labeled_csv(path, text_column or _present(run.config.text_column, columns),
                                    label_column or _present(run.config.label_column, columns))
    unknown = sorted(set(data.label_names) - set(run.labels))
    if unknown:
        raise datamod.DataError(
            f"{Path(path).name} has labels the run was not trained on: {', '.join(unknown)} "
            f"(run labels: {', '.join(run.labels)})"
        )
    try:
        train_data = prepare_data(run.config).train
    except (datamod.DataError, OSError):
        train_data = None  # the training file moved: no TF-IDF baseline
    report = full_report(run.loaded, run.kv, run.encoder, train_data, data,
                         run.config.training.seed)
    report["columns"] = {"text": data.text_column, "label": data.label_column}
    return report


def label_column_of(run: Run, frame) -> str | None:
    """A column of gold labels in a file to predict: the run's label column, else one whose
    filled cells are (nearly) all labels the run knows."""
    if run.config.label_column in frame.columns:
        return run.config.label_column
    known = set(run.labels)
    for column in frame.columns:
        values = [v.strip() for v in frame[column].dropna().astype(str) if v.strip()]
        if values and sum(v in known for v in values) >= 0.9 * len(values):
            return column
    return None


def text_column_of(frame, wanted: str | None, path: str | Path, guess: bool = True) -> str:
    """The column to read texts from: `wanted` if present, else (when `guess`) the guess."""
    column = wanted
    if column not in frame.columns and guess:
        column = datamod.guess_columns(list(frame.columns), frame)[0]
    if column is None or column not in frame.columns:
        raise datamod.DataError(
            f"{Path(path).name} has no text column {column or ''!r}; "
            f"columns: {', '.join(map(str, frame.columns))}"
        )
    return column


def predict_table(run: Run, path: str | Path, text_column: str | None = None):
    """A CSV's rows with the predicted label and every label's probability appended."""
    frame = datamod.read_table(path).frame
    column = text_column_of(frame, text_column or run.config.text_column, path,
                            guess=not text_column)
    texts = frame[column].fillna("").astype(str).tolist()
    out = frame.copy()
    if run.is_generation:
        out["generated"] = run.generate(texts)
        return out
    probs = run.score(texts)
    out["predicted_label"] = [run.labels[i] for i in probs.argmax(1)]
    for j, label in enumerate(run.labels):
        out[f"p_{label}"] = probs[:, j].round(6)
    return out


def open_run(path: str | Path, loaded: LoadedModel | None = None) -> Run:
    """Open a finished (or checkpointed) run; the base model is loaded unless given."""
    folder = RunFolder(path)
    info = folder.read_config()
    try:
        cfg = RunConfig.from_dict(info["run"])
        labels = list(info["labels"])
    except (KeyError, ConfigError) as e:
        raise RunError(f"{folder.config_path} is not a valid run config: {e}") from e
    if loaded is None:
        loaded = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code)
    elif loaded.name != cfg.model:
        raise RunError(f"run {folder.path.name} was trained on {cfg.model!r}, "
                       f"not on the loaded {loaded.name!r}")
    prefix = load_prefix(folder.prefix_path, loaded.shape)
    data = info.get("data") or {}
    encoder = (pair_encoder(loaded.tokenizer, cfg) if cfg.is_generation else
               cfg.label_encoder(loaded.tokenizer, labels, data.get("label_counts"),
                                 data.get("prior_scale")))
    return Run(folder, cfg, labels, loaded, prefix.kv, encoder)


def evaluate_prefix(
    loaded: LoadedModel, kv: torch.Tensor | None, encoder: Encoder, data: datamod.LabeledData
) -> tuple[dict, np.ndarray]:
    """Metrics of one prefix (or the bare model) and the label probabilities, in one pass."""
    ll = score_rows(loaded, kv, encoder, data)
    return report_from_scores(encoder, data, ll), encoder.rule.probs(ll)


def score_rows(loaded: LoadedModel, kv: torch.Tensor | None, encoder: Encoder,
               data: datamod.LabeledData) -> np.ndarray:
    """Label log-likelihoods (N, K) of the rows; in a process group each rank scores a share."""
    return distributed.gather_rows(
        lambda texts: score_log_likelihoods(loaded.model, kv, encoder, texts), data.texts)


def report_from_scores(encoder: Encoder, data: datamod.LabeledData, ll: np.ndarray) -> dict:
    """Metrics of label log-likelihoods `ll` (N, K) by the encoder's decision rule.

    The report's `loss` is the training objective on these rows: the mean cross-entropy of
    the gold label's tokens, read from the same label log-likelihoods as the predictions.
    """
    probs = encoder.rule.probs(ll)
    report = classification_report(data.labels, predictions_from_probs(probs, encoder.labels),
                                   encoder.labels)
    gold = [encoder.labels.index(y) for y in data.labels]
    n_tokens = sum(len(encoder.label_ids[g]) for g in gold)
    report["loss"] = float(-ll[np.arange(len(gold)), gold].sum() / max(n_tokens, 1))
    return report


def fit_decision(encoder: Encoder, data: datamod.LabeledData, ll: np.ndarray,
                 label_counts: dict[str, int]) -> dict:
    """The prior strength that decides best on the validation rows (balance.fit_prior_scale),
    with what it scored and, when there were too few rows to fit, which labels lacked them."""
    prior = prior_from_counts([label_counts.get(y, 0) for y in encoder.labels])
    scores = LabelRule(encoder.rule.lengths).log_probs(ll)
    gold = [encoder.labels.index(y) for y in data.labels]
    scale = fit_prior_scale(scores, gold, prior)

    def f1(strength: float) -> float:
        pred = [encoder.labels[i] for i in (scores - strength * prior).argmax(1)]
        return classification_report(data.labels, pred, encoder.labels)["macro_f1"]

    fit = {"prior_scale": scale, "validation_rows": len(gold), "macro_f1_full_prior": f1(1.0)}
    if scale is None:
        few = {y: data.labels.count(y) for y in encoder.labels}
        fit["too_few"] = {y: n for y, n in few.items() if n < MIN_FIT_ROWS}
    else:
        fit["macro_f1"] = f1(scale)
    return fit


def full_report(
    loaded: LoadedModel, kv: torch.Tensor, encoder: Encoder, train_data: datamod.LabeledData | None,
    data: datamod.LabeledData, seed: int, prefix_report: dict | None = None,
) -> dict:
    """The prefix's metrics at the top level, the baselines beside them, and warnings when
    its predictions collapse onto one label or miss one.

    `prefix_report`: the prefix's own metrics when already computed on `data` (the last
    evaluation of a run), so the rows are not scored twice.
    """
    report = dict(prefix_report) if prefix_report else evaluate_prefix(loaded, kv, encoder,
                                                                       data)[0]
    # the bare model decides on its own scores: the training prior is knowledge it lacks
    zero, _ = evaluate_prefix(loaded, None, encoder.without_prior(), data)
    baselines: dict = {"zero_shot": zero}
    if train_data is not None:
        preds = tfidf_baseline(train_data.texts, train_data.labels, data.texts, seed)
        baselines["tfidf"] = classification_report(data.labels, preds, encoder.labels)
        baselines["majority"] = classification_report(
            data.labels, majority_baseline(train_data.labels, len(data)), encoder.labels)
    else:
        baselines["tfidf"] = baselines["majority"] = None
    report["baselines"] = baselines
    report["warnings"] = prediction_warnings(report)
    return report


def create_run(cfg: RunConfig, path: str | Path, prepared: PreparedData,
               loaded: LoadedModel | ModelInfo, *, name: str | None = None) -> RunFolder:
    """Write config.json for a new run (data already validated); no weights are needed."""
    train, val = prepared.train, prepared.validation
    if isinstance(train, TextPairs):
        data = {"train_rows": len(train), "validation_rows": len(val),
                "train_inputs": train.distinct_inputs(),
                "validation_inputs": val.distinct_inputs(),
                "text_column": train.input_column, "target_column": train.target_column,
                "warnings": prepared.warnings}
    else:
        data = {"train_rows": len(train), "validation_rows": len(val),
                "text_column": train.text_column, "label_column": train.label_column,
                "label_counts": train.label_counts(), "warnings": prepared.warnings}
    folder = _new_run(cfg, path, loaded, prepared.labels, data, name=name)
    folder.set_status("created")
    return folder


def import_run(cfg: RunConfig, path: str | Path, labels: list[str], loaded: LoadedModel,
               kv: torch.Tensor, imported_from: str) -> RunFolder:
    """A completed run around a prefix trained elsewhere (e.g. a PEFT adapter): config.json
    says where it came from and that no data was seen; predict, evaluate and inspect work."""
    folder = _new_run(cfg, path, loaded, labels, {}, imported_from=imported_from)
    save_prefix(folder.prefix_path, kv, loaded.name, imported_from=imported_from)
    folder.set_status("completed")
    return folder


def _new_run(cfg: RunConfig, path: str | Path, loaded: LoadedModel | ModelInfo,
             labels: list[str], data: dict, *, name: str | None = None,
             **extra) -> RunFolder:
    """The run folder with its config.json: settings, labels, data summary, model, sizes."""
    folder = RunFolder(path)
    if folder.exists():
        raise RunError(f"{folder.path} already holds a run; choose another output folder")
    folder.path.mkdir(parents=True, exist_ok=True)
    P = cfg.prefix.prefix_length
    shape = loaded.shape
    trainable = Prefix(shape, cfg.prefix).trainable_parameters()
    folder.write_config({
        "format": "prefixlab-run/1",
        "name": name or folder.path.name,
        "created": time.time(),
        "run": cfg.to_dict(),
        "task": "generation" if cfg.is_generation else "classification",
        "labels": list(labels),
        **extra,
        "data": data,
        "model": {
            "name": loaded.name, "parameters": loaded.num_parameters,
            "num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
        },
        "prefix": {
            "trainable_parameters": trainable,
            "inference_parameters": shape.params(P),
            "share_of_model": trainable / loaded.num_parameters,
        },
    })
    return folder


def execute_run(
    folder: RunFolder,
    loaded: LoadedModel,
    *,
    prepared: PreparedData | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
) -> dict | None:
    """Train (or resume) the run in `folder` and write its prefix and report.

    Returns the report, or None when stopped early (the last checkpoint is kept).

    In a process group (distributed.py) every rank calls this: all of them train and score,
    and rank 0 alone writes the run's files.
    """
    writer = distributed.is_writer()

    def note(record: dict) -> None:
        if writer:
            folder.append_metrics(record)

    info = folder.read_config()
    cfg = RunConfig.from_dict(info["run"])
    if prepared is None:
        prepared = prepare_data(cfg)
    labels = info["labels"]
    torch.manual_seed(cfg.training.seed)
    generating = cfg.is_generation
    if generating:
        encoder = pair_encoder(loaded.tokenizer, cfg)
        examples = encoder.examples(prepared.train.inputs, prepared.train.targets)
    else:
        encoder = cfg.label_encoder(loaded.tokenizer, labels, prepared.train.label_counts())
        examples = encoder.examples(prepared.train.texts, prepared.train.labels)
    prefix = Prefix(loaded.shape, cfg.prefix).to(loaded.device)
    checkpoint = folder.load_checkpoint() if resume else None
    if resume and checkpoint is None:
        note({"type": "event", "message": "no checkpoint: starting over"})
    if checkpoint is None:
        init_text = cfg.prefix.init_text or (
            default_generation_init_text(cfg.task) if generating
            else default_init_text(labels, cfg.task))
        init_prefix(prefix, loaded.model, loaded.tokenizer, init_text, cfg.training.seed)
        if writer:
            folder.save_snapshot(0, prefix.folded())
    processes = distributed.world_size()
    if writer:
        folder.set_status("running", phase="training", processes=processes)
    note({"type": "event", "message": "resumed" if checkpoint else "started",
          "step": checkpoint.step if checkpoint else 0, "time": time.time(),
          "processes": processes})

    def log_step(s: StepInfo) -> None:
        note({"type": "step", **s.as_dict()})
        if on_step and writer:
            on_step(s)

    tc = cfg.training
    rule = EarlyStopping(monitor=tc.monitor, patience=tc.patience, smoothing=tc.smoothing)
    if checkpoint is not None:  # decide as the uninterrupted run would have
        rule = EarlyStopping.replay(folder.read_metrics()[0], checkpoint.step,
                                    monitor=tc.monitor, patience=tc.patience,
                                    smoothing=tc.smoothing)
    last_eval: dict = {}
    evaluated: dict[int, dict] = {}  # this process's reports by step, so the kept one is reused
    val_scores: dict[int, np.ndarray] = {}  # their validation label scores, for a fitted rule

    def evaluate(step: int) -> str | None:
        kv = prefix.folded()
        if generating:  # validation loss on every held-out row, BLEU on a few inputs
            scores = live_scores(loaded.model, encoder, kv, prepared.validation, cfg)
            report = {"loss": scores["val_loss"]}
            record = {"type": "eval", "step": step, **scores}
        else:
            ll = score_rows(loaded, kv, encoder, prepared.validation)
            report = report_from_scores(encoder, prepared.validation, ll)
            val_scores[step] = ll
            record = {"type": "eval", "step": step, "val_loss": report["loss"],
                      "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                      "predicted": report["predicted"],
                      "warnings": prediction_warnings(report)}
        last_eval.clear()
        last_eval.update(step=step, report=report)
        evaluated[step] = report
        rule.update(step, record)
        record["best_step"] = rule.kept_step
        note(record)
        if writer:  # any evaluated step may be the one kept when the run ends
            folder.save_snapshot(step, kv)
        return rule.reason() if rule.exhausted else None

    def save(ckpt: Checkpoint) -> None:
        if not writer:
            return
        folder.save_checkpoint(ckpt)
        kv = prefix.folded()
        save_prefix(folder.prefix_path, kv, loaded.name, step=str(ckpt.step))
        folder.save_snapshot(ckpt.step, kv)

    result = train(
        loaded.model, prefix, examples, cfg.training, loaded.tokenizer.pad_token_id,
        on_step=log_step, should_stop=should_stop, evaluate=evaluate, on_checkpoint=save,
        resume=checkpoint,
    )
    if result.stopped:
        if writer:
            folder.set_status("cancelled", step=result.steps, processes=processes)
        note({"type": "event", "message": "cancelled", "step": result.steps})
        return None
    kv, kept, done = prefix.folded(), result.steps, None
    if last_eval.get("step") == result.steps:
        done = last_eval["report"]
    if tc.keep_best and rule.kept_step is not None and rule.kept_step != result.steps:
        kept = rule.kept_step
        # rank 0 wrote it before the collectives that followed: every rank can read it
        kv = folder.load_snapshot(kept).to(kv.device)
        done = evaluated.get(kept)
    if writer:
        save_prefix(folder.prefix_path, kv, loaded.name, step=str(kept))
        folder.set_status("running", phase="evaluating", step=result.steps,
                          processes=processes)
    note({"type": "event", "message": "evaluating", "step": kept, "stop_reason": result.reason})
    fit: dict | None = None
    if not generating and cfg.decision == "fitted":
        ll = val_scores.get(kept)
        if ll is None:  # kept before a resume: this process did not score it
            ll = score_rows(loaded, kv, encoder, prepared.validation)
        counts = prepared.train.label_counts()
        fit = fit_decision(encoder, prepared.validation, ll, counts)
        if fit["prior_scale"] is not None:
            encoder.rule = label_rule(cfg.decision, cfg.label_scores, encoder.labels,
                                      encoder.label_ids, counts, fit["prior_scale"])
            done = report_from_scores(encoder, prepared.validation, ll)
            if writer:  # what open_run and the server read to decide as this report does
                info = folder.read_config()
                info["data"]["prior_scale"] = fit["prior_scale"]
                folder.write_config(info)
        note({"type": "event", "message": "decision", **fit})
    if generating:
        # Its own loss on every held-out row: the live one read one reference per input.
        report = generation_report(loaded.model, encoder, kv, prepared.validation,
                                   cfg.generation)
    else:
        report = full_report(loaded, kv, encoder, prepared.train if writer else None,
                             prepared.validation, cfg.training.seed, prefix_report=done)
    if not generating:
        report.update(decision=cfg.decision, label_scores=cfg.label_scores)
    if fit is not None:
        report.update(decision_fit=fit)
    report.update(steps=result.steps, kept_step=kept, stop_reason=result.reason,
                  selection=(rule.selection() if tc.keep_best and rule.kept_step is not None
                             else "the last step"))
    if writer:
        folder.write_report(report)
        folder.set_status("completed", step=result.steps, processes=processes)
    note({"type": "event", "message": "completed", "step": result.steps, "time": time.time()})
    return report
