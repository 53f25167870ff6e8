"""The steps that fill a run folder (folder.py): prepare the data, create the run (or import
a prefix trained elsewhere), and execute it: train, keep the best step, fit the decision
rule, write the prefix and the report.

A run classifies (labels) or generates (a target column: generation.py holds its steps);
config.json's "task" says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.data.pairs import TextPairs
from prefixlab.data.reading import DataError
from prefixlab.data.splits import stratified_split
from prefixlab.data.topics import topic_split
from prefixlab.engine import distributed
from prefixlab.engine.balance import label_rule
from prefixlab.engine.encode import Encoder, PairEncoder
from prefixlab.engine.models import LoadedModel, ModelInfo, pick_device
from prefixlab.engine.precision import resolve_precision
from prefixlab.engine.prefix import Prefix, average_prefixes, init_prefix, save_prefix
from prefixlab.engine.stopping import EarlyStopping
from prefixlab.engine.train import Checkpoint, StepInfo, TrainConfig, TrainResult, train
from prefixlab.runs.budget import FinalReserve, PhaseProgress, Progress
from prefixlab.runs.config import RunConfig
from prefixlab.runs.evaluate import prediction_warnings
from prefixlab.runs.extension import longer_reason
from prefixlab.runs.folder import RunError, RunFolder
from prefixlab.runs.generation import (
    generation_report,
    live_scores,
    pair_encoder,
    prepare_pairs,
)
from prefixlab.runs.scoring import (
    fit_decision,
    full_report,
    report_from_scores,
    score_rows,
    shift_report,
)
from prefixlab.runs.start import init_text
from prefixlab.runs.trials import choose_learning_rate


@dataclass
class PreparedData:
    train: LabeledData | TextPairs  # TextPairs in a generation run
    validation: LabeledData | TextPairs
    labels: list[str]  # empty in a generation run
    warnings: list[str]
    shift: LabeledData | None = None  # RunConfig.shift_csv's rows


def _sample(data: LabeledData, n: int | None, seed: int) -> LabeledData:
    if n is None or len(data) <= n:
        return data
    keep, _ = stratified_split(data, 1 - n / len(data), seed)
    return keep


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load, validate and split the data; raises DataError before anything is written."""
    if cfg.is_generation:
        train_part, val, warnings = prepare_pairs(cfg)
        return PreparedData(train_part, val, [], warnings)
    full = load_labeled_csv(cfg.train_csv, cfg.text_column, cfg.label_column)
    warnings = list(full.warnings)
    seed = cfg.training.seed
    if cfg.validation_csv:
        val = load_labeled_csv(cfg.validation_csv, full.text_column, full.label_column)
        warnings += [f"validation file: {w}" for w in val.warnings]
        unknown = sorted(set(val.label_names) - set(full.label_names))
        if unknown:
            raise DataError(
                f"the validation file has labels that training never sees: {', '.join(unknown)}"
            )
        train_part = full
    else:
        split = topic_split if cfg.validation_split == "topics" else stratified_split
        train_part, val = split(full, cfg.validation_share, seed)
        warnings += train_part.warnings[len(full.warnings):]
    train_part = _sample(train_part, cfg.max_train_examples, seed)
    val = _sample(val, cfg.max_eval_examples, seed)
    if len(val) == 0:
        raise DataError("no rows are left for validation; add rows or a validation file")
    shift = None
    if cfg.shift_csv:
        shift = load_labeled_csv(cfg.shift_csv, full.text_column, full.label_column)
        unknown = sorted(set(shift.label_names) - set(full.label_names))
        if unknown:
            raise DataError(f"the shift file has labels that training never sees: "
                            f"{', '.join(unknown)}")
        warnings += [f"shift file: {w}" for w in shift.warnings]
    return PreparedData(train_part, val, list(full.label_names), warnings, shift)


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
    # auto is decided once, here: the run, and every resume of it, trains in what it chose
    chosen = resolve_precision(cfg.precision, pick_device(cfg.device))
    cfg = replace(cfg, precision=chosen.name)
    folder.path.mkdir(parents=True, exist_ok=True)
    P = cfg.prefix.prefix_length
    shape = loaded.shape
    trainable = Prefix(shape, cfg.prefix).trainable_parameters()
    folder.write_config({
        "format": "prefixlab-run/1",
        "name": name or folder.path.name,
        "created": time.time(),
        "run": cfg.to_dict(),
        "precision": chosen.as_dict(),
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


# --- executing a run -------------------------------------------------------------------------


def execute_run(
    folder: RunFolder,
    loaded: LoadedModel,
    *,
    prepared: PreparedData | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    on_progress: Callable[[dict], None] | None = None,
    report_in_budget: bool = True,
    mirror: Callable[[dict], None] | None = None,
) -> dict | None:
    """Train (or resume) the run in `folder` and write its prefix and report.

    Returns the report, or None when stopped early (the last checkpoint is kept).
    `on_step` hears every training step, `on_progress` every progress record of the final
    report (budget.PhaseProgress), as the run folder's metrics log gets them.
    `report_in_budget`: the final report fits in the time budget (training leaves it its
    estimated share, decoding stops at the budget's end); False trains the whole budget and
    reports after it, as a comparison times every method.

    In a process group (distributed.py) every rank calls this: all of them train and score,
    and rank 0 alone writes the run's files.

    A run with `training.try_learning_rates` trains once per rate (trials.py), each a run
    of its own inside this one; `mirror` hears every record such a trial writes to its log.
    """
    info = folder.read_config()
    cfg = RunConfig.from_dict(info["run"])
    if prepared is None:
        prepared = prepare_data(cfg)
    if len(cfg.training.learning_rates()) > 1:
        return choose_learning_rate(folder, loaded, prepared, execute_run, on_step=on_step,
                                    should_stop=should_stop, resume=resume,
                                    on_progress=on_progress, report_in_budget=report_in_budget)
    out = _Recorder(folder, mirror)
    torch.manual_seed(cfg.training.seed)
    encoder, examples = _training_examples(cfg, loaded, prepared, info["labels"])
    prefix = Prefix(loaded.shape, cfg.prefix).to(loaded.device)
    checkpoint = _starting_prefix(out, cfg, loaded, prefix, info["labels"], resume)
    reserve = FinalReserve.of(cfg, prepared.validation)  # the budget's share for the report
    evaluations = _Evaluations(out, cfg, loaded, encoder, prepared.validation, prefix,
                               _stopping_rule(folder, cfg.training, checkpoint), reserve)

    def log_step(s: StepInfo) -> None:
        out.note({"type": "step", **s.as_dict()})
        if on_step and out.writer:
            on_step(s)

    result = train(
        loaded.model, prefix, examples, cfg.training, loaded.tokenizer.pad_token_id,
        on_step=log_step, should_stop=should_stop, evaluate=evaluations,
        on_checkpoint=lambda ckpt: out.checkpoint(ckpt, prefix, loaded.name),
        resume=checkpoint, reserve_s=reserve if report_in_budget else None,
    )
    if result.stopped:
        out.status("cancelled", step=result.steps)
        out.note({"type": "event", "message": "cancelled", "step": result.steps})
        return None
    # what the time budget leaves the report
    deadline = reserve.deadline(result.elapsed_s) if report_in_budget else None
    kept, kv, done = _kept_prefix(folder, prefix, evaluations, cfg.training, result)
    out.prefix(kv, loaded.name, kept)
    out.status("running", phase="evaluating", step=result.steps)
    out.note({"type": "event", "message": "evaluating", "step": kept, "stop_reason": result.reason})
    fit: dict | None = None
    if not cfg.is_generation and cfg.decision == "fitted":
        # an averaged prefix (done is None) was not scored while training
        fit, done = _fit_decision_rule(out, cfg, loaded, kv, encoder, prepared,
                                       evaluations.scores.get(kept) if done else None, done)
    def log_progress(record: dict) -> None:
        out.progress(record, result.steps)
        if on_progress and out.writer:
            on_progress(record)

    progress = PhaseProgress(log_progress)
    report = _final_report(cfg, loaded, kv, encoder, prepared, done, writer=out.writer,
                           deadline=deadline, progress=progress)
    if fit is not None:
        report.update(decision_fit=fit)
    rule = evaluations.rule
    report.update(precision=loaded.precision, steps=result.steps, kept_step=kept,
                  stop_reason=longer_reason(result.reason, info),  # a grown budget says so
                  selection=(rule.selection() if cfg.training.keep_best
                             and rule.kept_step is not None else "the last step"))
    if len(averaged := averaged_steps(folder, kept, cfg.training.average_last)) > 1:
        report.update(averaged_steps=averaged)
    out.report(report)
    out.status("completed", step=result.steps)
    out.note({"type": "event", "message": "completed", "step": result.steps, "time": time.time()})
    return report


class _Recorder:
    """The run folder as one process of a run writes it. Rank 0 (or a lone process) writes;
    the other ranks of a process group run the same steps and write nothing, so the run
    has one writer and every rank's code path is the same."""

    def __init__(self, folder: RunFolder, mirror: Callable[[dict], None] | None = None) -> None:
        self.folder = folder
        self.writer = distributed.is_writer()
        self.processes = distributed.world_size()
        self.mirror = mirror if self.writer else None

    def note(self, record: dict) -> None:
        """One step, evaluation or event, appended to metrics.jsonl."""
        if self.writer:
            self.folder.append_metrics(record)
        if self.mirror:
            self.mirror(record)

    def status(self, state: str, **extra) -> None:
        """status.json, saying how many processes train the run."""
        if self.writer:
            self.folder.set_status(state, **extra, processes=self.processes)

    def progress(self, record: dict, step: int) -> None:
        """How far the final report is (budget.PhaseProgress's record): in the metrics log,
        for the page's progress line, and in words in the status."""
        if self.mirror:
            self.mirror(record)
        if self.writer:
            self.folder.append_metrics(record)
            self.folder.set_status("running", step=step, processes=self.processes,
                                   phase=f"{record['phase']}: {record['what']} "
                                         f"{record['done']}/{record['total']}")

    def snapshot(self, step: int, kv: torch.Tensor) -> None:
        if self.writer:
            self.folder.save_snapshot(step, kv)

    def prefix(self, kv: torch.Tensor, model_name: str, step: int) -> None:
        """prefix.safetensors: the folded prefix (L, 2, H_kv, P, D) of `step`."""
        if self.writer:
            save_prefix(self.folder.prefix_path, kv, model_name, step=str(step))

    def checkpoint(self, ckpt: Checkpoint, prefix: Prefix, model_name: str) -> None:
        """The checkpoint, with the prefix at its step both as the run's prefix and as a
        snapshot, so a run stopped here can be used and inspected as it stands."""
        if not self.writer:
            return
        self.folder.save_checkpoint(ckpt)
        kv = prefix.folded()
        save_prefix(self.folder.prefix_path, kv, model_name, step=str(ckpt.step))
        self.folder.save_snapshot(ckpt.step, kv)

    def report(self, report: dict) -> None:
        if self.writer:
            self.folder.write_report(report)

    def prior_scale(self, scale: float) -> None:
        """The fitted prior strength, in config.json: open_run and the server read it there
        to decide as the run's report does."""
        if self.writer:
            info = self.folder.read_config()
            info["data"]["prior_scale"] = scale
            self.folder.write_config(info)


def _training_examples(cfg: RunConfig, loaded: LoadedModel, prepared: PreparedData,
                       labels: list[str]) -> tuple[Encoder | PairEncoder, list]:
    """The run's encoder and its training rows encoded by it. A classification encoder
    carries the training label counts, which its decision rule may use as a prior."""
    if cfg.is_generation:
        encoder = pair_encoder(loaded.tokenizer, cfg)
        return encoder, encoder.examples(prepared.train.inputs, prepared.train.targets)
    encoder = cfg.label_encoder(loaded.tokenizer, labels, prepared.train.label_counts())
    return encoder, encoder.examples(prepared.train.texts, prepared.train.labels)


def _starting_prefix(out: _Recorder, cfg: RunConfig, loaded: LoadedModel, prefix: Prefix,
                     labels: list[str], resume: bool) -> Checkpoint | None:
    """Set up `prefix` to train from: the checkpoint when resuming (returned, for train to
    restore), else initialized from the init text and saved as step 0's snapshot, so
    inspection can show where training began. Then records that training started."""
    checkpoint = out.folder.load_checkpoint() if resume else None
    if resume and checkpoint is None:
        out.note({"type": "event", "message": "no checkpoint: starting over"})
    # initialized on resume too: the start is what TrainConfig.start_pull pulls toward
    init_prefix(prefix, loaded.model, loaded.tokenizer, init_text(cfg, labels),
                cfg.training.seed)
    if checkpoint is None:
        out.snapshot(0, prefix.folded())
    out.status("running", phase="training")
    out.note({"type": "event", "message": "resumed" if checkpoint else "started",
              "step": checkpoint.step if checkpoint else 0, "time": time.time(),
              "processes": out.processes})
    return checkpoint


def _stopping_rule(folder: RunFolder, tc: TrainConfig,
                   checkpoint: Checkpoint | None) -> EarlyStopping:
    """The early-stopping rule; on resume, replayed from the metrics log up to the
    checkpoint, so it decides as the uninterrupted run would have."""
    if checkpoint is None:
        return EarlyStopping(monitor=tc.monitor, patience=tc.patience, smoothing=tc.smoothing)
    return EarlyStopping.replay(folder.read_metrics()[0], checkpoint.step, monitor=tc.monitor,
                                patience=tc.patience, smoothing=tc.smoothing)


class _Evaluations:
    """Training's `evaluate` callback: scores the prefix on the validation rows, notes the
    result, feeds the early-stopping rule and snapshots the prefix (any evaluated step may
    be the one kept). Keeps this process's reports, and in a classification run the label
    scores, by step, so the kept step is not scored again for the report or a fitted rule."""

    def __init__(self, out: _Recorder, cfg: RunConfig, loaded: LoadedModel,
                 encoder: Encoder | PairEncoder, validation: LabeledData | TextPairs,
                 prefix: Prefix, rule: EarlyStopping, reserve: FinalReserve) -> None:
        self.out, self.cfg, self.loaded, self.encoder = out, cfg, loaded, encoder
        self.validation, self.prefix, self.rule = validation, prefix, rule
        self.reserve = reserve  # learns from each evaluation what the final report costs
        self.last_step: int | None = None
        self.reports: dict[int, dict] = {}
        self.scores: dict[int, np.ndarray] = {}  # validation label scores (N, K)

    def __call__(self, step: int) -> str | None:
        """Evaluate `step`; returns why training should end now, or None."""
        kv = self.prefix.folded()
        began = time.perf_counter()
        report, record = self._score(step, kv)
        record.setdefault("seconds", {"scoring": time.perf_counter() - began})
        self.reserve.timed(record["seconds"])
        self.last_step = step
        self.reports[step] = report
        self.rule.update(step, record)
        record["best_step"] = self.rule.kept_step
        self.out.note(record)
        self.out.snapshot(step, kv)
        return self.rule.reason() if self.rule.exhausted else None

    def _score(self, step: int, kv: torch.Tensor) -> tuple[dict, dict]:
        """The step's report and its metrics-log record."""
        if self.cfg.is_generation:  # validation loss on every held-out row, BLEU on a few inputs
            scores = live_scores(self.loaded.model, self.encoder, kv, self.validation, self.cfg)
            return {"loss": scores["val_loss"]}, {"type": "eval", "step": step, **scores}
        ll = score_rows(self.loaded, kv, self.encoder, self.validation)
        report = report_from_scores(self.encoder, self.validation, ll)
        self.scores[step] = ll
        return report, {"type": "eval", "step": step, "val_loss": report["loss"],
                        "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                        "predicted": report["predicted"],
                        "warnings": prediction_warnings(report)}


def _kept_prefix(folder: RunFolder, prefix: Prefix, evaluations: _Evaluations,
                 tc: TrainConfig, result: TrainResult) -> tuple[int, torch.Tensor, dict | None]:
    """The step the run keeps, its folded prefix, and its validation report when this
    process already has one (else None).

    The last step, unless `keep_best` and the stopping rule kept an earlier one: that prefix
    is read back from its snapshot, which rank 0 wrote before the collectives that followed,
    so every rank can read it.
    """
    kv, kept, done = prefix.folded(), result.steps, None
    if evaluations.last_step == result.steps:
        done = evaluations.reports[result.steps]
    kept_step = evaluations.rule.kept_step
    if tc.keep_best and kept_step is not None and kept_step != result.steps:
        kept = kept_step
        kv = folder.load_snapshot(kept).to(kv.device)
        done = evaluations.reports.get(kept)
    averaged = averaged_steps(folder, kept, tc.average_last)
    if len(averaged) > 1:  # a new prefix: its validation report is scored afresh
        kv = average_prefixes([folder.load_snapshot(s) for s in averaged]).to(kv.device)
        done = None
    return kept, kv, done


def averaged_steps(folder: RunFolder, kept: int, count: int) -> list[int]:
    """The evaluated steps whose prefixes TrainConfig.average_last averages: `kept` and the
    `count` - 1 evaluations before it (from the metrics log, so a resumed run counts the
    evaluations of its earlier part), those with a snapshot."""
    if count <= 1:
        return [kept]
    evaluated = sorted({r["step"] for r in folder.read_metrics()[0]
                        if r.get("type") == "eval" and r["step"] <= kept} | {kept})
    have = {step for step, _ in folder.snapshots()}
    return [s for s in evaluated if s in have][-count:] or [kept]


def _fit_decision_rule(out: _Recorder, cfg: RunConfig, loaded: LoadedModel, kv: torch.Tensor,
                       encoder: Encoder, prepared: PreparedData, ll: np.ndarray | None,
                       done: dict | None) -> tuple[dict, dict | None]:
    """Fit the prior strength on the kept prefix's validation scores `ll` (N, K) and, when
    it could be fitted, make it the encoder's decision rule and save it with the run.

    Returns the fit and the kept prefix's validation report: rescored under the fitted
    rule, else `done` as it was.
    """
    if ll is None:  # kept before a resume: this process did not score it
        ll = score_rows(loaded, kv, encoder, prepared.validation)
    counts = prepared.train.label_counts()
    fit = fit_decision(encoder, prepared.validation, ll, counts)
    if fit["prior_scale"] is not None:
        encoder.rule = label_rule(cfg.decision, cfg.label_scores, encoder.labels,
                                  encoder.label_ids, counts, fit["prior_scale"])
        done = report_from_scores(encoder, prepared.validation, ll)
        out.prior_scale(fit["prior_scale"])
    out.note({"type": "event", "message": "decision", **fit})
    return fit, done


def _final_report(cfg: RunConfig, loaded: LoadedModel, kv: torch.Tensor,
                  encoder: Encoder | PairEncoder, prepared: PreparedData, done: dict | None,
                  *, writer: bool, deadline: float | None = None,
                  progress: Progress | None = None) -> dict:
    """The kept prefix's report on the validation rows, its progress told to `progress`.

    A generation run scores its own loss on every held-out row (the live one read one
    reference per input), and decodes held-out inputs until `deadline` (the end of the time
    budget). A classification run reuses `done` when it has it and adds the baselines; the
    TF-IDF and majority ones are trained by the writer alone, the rank that keeps the report.
    """
    if cfg.is_generation:
        return generation_report(loaded.model, encoder, kv, prepared.validation,
                                 cfg.generation, deadline=deadline, progress=progress)
    report = full_report(loaded, kv, encoder, prepared.train if writer else None,
                         prepared.validation, cfg.training.seed, prefix_report=done,
                         progress=progress)
    report.update(decision=cfg.decision, label_scores=cfg.label_scores)
    if prepared.shift is not None:
        report["shift"] = shift_report(loaded, kv, encoder, prepared.shift, report["macro_f1"])
        report["warnings"] = report["shift"]["warnings"] + report["warnings"]
    return report
