"""Comparing prefix tuning with other methods on the same rows: prompt tuning, LoRA, IA3,
full fine-tuning, a linear probe and TF-IDF.

Every method gets the run's split (experiment.prepare_data, once), its template and label
words (RunConfig.label_encoder), its decision rule (fitted on the validation rows when the
run fits one) and its stopping rule (the validation-chosen step, patience and the time budget,
per method). The prefix row is a normal run folder (open, inspect, serve); PEFT methods keep
their adapter; full fine-tuning keeps its weights only when asked.

A generation run (a target column) compares the gradient methods alone (the probe and TF-IDF
classify): each trains on the same input -> target pairs with the run's PairEncoder, keeps
the step of lowest validation loss as the prefix run does, and decodes every held-out input
with the run's decoding settings; rows carry BLEU, chrF, ROUGE-L and the target loss, and
`bare_model` the untrained model's figures with the same template.

The comparison folder holds `comparison.json` (settings, one row per method, the verdict) and
one subfolder per method.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.data.pairs import TextPairs, load_pairs_csv
from prefixlab.data.reading import DataError
from prefixlab.engine.methods import (
    DEFAULT_METHODS,
    METHODS,
    default_methods,
    method_problems,
    parse_methods,
    peft_settings,
    save_adapter,
    task_problems,
)
from prefixlab.engine.models import LoadedModel
from prefixlab.engine.prefix import load_prefix
from prefixlab.engine.train import StepInfo
from prefixlab.errors import ConfigError, PrefixLabError
from prefixlab.runs.config import RunConfig
from prefixlab.runs.contenders import (
    Contender,
    train_generation,
    train_gradient,
    train_probe,
    train_tfidf,
)
from prefixlab.runs.experiment import PreparedData, create_run, execute_run, prepare_data
from prefixlab.runs.generation import pair_encoder, pair_scores
from prefixlab.runs.scoring import report_from_scores, score_rows
from prefixlab.runs.start import init_text
from prefixlab.runs.verdict import verdict

FORMAT = "prefixlab-comparison/1"
FILE = "comparison.json"
GENERATION_SCORES = ("bleu", "chrf", "rouge_l", "loss", "rows", "inputs")
"""A generation row's figures on one set (generation.pair_scores); a classification row's
are macro_f1, accuracy and rows."""
__all__ = ["DEFAULT_METHODS", "FILE", "FORMAT", "GENERATION_SCORES", "METHODS",
           "CompareConfig", "check_comparison", "check_task", "default_methods",
           "read_comparison", "run_comparison"]
# the app takes the method table from here (the ui wing may not import engine)


@dataclass
class CompareConfig:
    """What a comparison trains besides the run settings every method shares."""

    methods: list[str] | None = None
    """Methods in the order they train (engine.methods.METHODS); None: every method the
    run's task allows (engine.methods.default_methods: a generation run leaves out the probe
    and TF-IDF, which classify). Methods named here are trained or refused, never dropped."""
    test_csv: str | None = None
    """Rows scored once at the end, by every method's kept step: labeled, or in a
    generation run input/target pairs in the run's columns."""
    shift_csv: str | None = None
    """A set from another source (the same labels, or the same columns in a generation run):
    how each method travels."""
    keep_weights: bool = False
    """Keep full fine-tuning's weights (the size of the model); otherwise only its figures."""

    def __post_init__(self) -> None:
        if self.methods is not None:
            self.methods = parse_methods(self.methods)

    def methods_for(self, cfg: RunConfig) -> list[str]:
        """The methods this comparison trains on the run `cfg`."""
        return (list(self.methods) if self.methods is not None
                else default_methods(cfg.is_generation))


def check_comparison(cfg: RunConfig, compare: CompareConfig, model_type: str,
                     dtype: torch.dtype) -> None:
    """Refuse, in one ConfigError, every method that cannot run on this model and task."""
    _refuse(method_problems(compare.methods_for(cfg), model_type, dtype, cfg.is_generation))


def check_task(cfg: RunConfig, compare: CompareConfig) -> None:
    """Refuse, as check_comparison does, the methods that cannot run on the run's task: a
    check for before the model loads (check_comparison adds the model's)."""
    _refuse(task_problems(compare.methods_for(cfg), cfg.is_generation))


def _refuse(problems: list[str]) -> None:
    if problems:  # one line: the whole comparison is refused before anything trains
        raise ConfigError("cannot compare these methods here: " + "; ".join(problems))


def _extra_set(path: str | None, what: str,
               prepared: PreparedData) -> LabeledData | TextPairs | None:
    """The test or shift rows in the training file's columns: pairs in a generation run,
    else labeled rows whose labels training sees."""
    if not path:
        return None
    train = prepared.train
    if isinstance(train, TextPairs):
        pairs = load_pairs_csv(path, train.input_column, train.target_column)
        prepared.warnings.extend(f"{what} file: {w}" for w in pairs.warnings)
        return pairs
    data = load_labeled_csv(path, train.text_column, train.label_column)
    unknown = sorted(set(data.label_names) - set(prepared.labels))
    if unknown:
        raise DataError(f"the {what} file has labels that training never sees: "
                        f"{', '.join(unknown)} (training has {', '.join(prepared.labels)})")
    return data


def _reset_peaks(device: torch.device) -> None:
    """Start each method's peak memory afresh: Linux resets VmHWM on "5" to clear_refs."""
    # elsewhere the peak stays the process's so far, which memory_note says
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss() -> int | None:
    """This process's peak resident memory since the last reset (VmHWM), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _prefix_contender(cfg: RunConfig, where: Path, name: str, loaded: LoadedModel,
                      prepared: PreparedData, on_step: Callable[[StepInfo], None],
                      should_stop: Callable[[], bool] | None) -> Contender | None:
    """The prefix, trained as a normal run in the folder `where`."""
    folder = create_run(cfg, where, prepared, loaded, name=name)
    last = StepInfo(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    # by learning rate tried (runs/trials.py; one for most runs): each step's time, the time
    # and rows of the trials before, so a choice among rates is timed for all it trained
    elapsed: list[dict[int, float]] = [{0: 0.0}]
    before, seen = [0.0], 0

    def heard(info: StepInfo) -> None:
        nonlocal last, seen
        if info.step <= last.step:  # the next trial began
            seen += round(last.examples_per_s * last.elapsed_s)
            before.append(before[-1] + last.elapsed_s)
            elapsed.append({0: 0.0})
        elapsed[-1][info.step], last = info.elapsed_s, info
        on_step(info)

    # the whole budget trains, as it does for every other method, whose scoring follows it
    report = execute_run(folder, loaded, prepared=prepared, on_step=heard,
                         should_stop=should_stop, report_in_budget=False)
    if report is None:
        return None
    info = folder.read_config()
    kv = load_prefix(folder.prefix_path).kv
    settings = {"learning_rate": report.get("learning_rate", cfg.training.learning_rate),
                "prefix_length": cfg.prefix.prefix_length}
    bare = None
    if cfg.is_generation:
        predict, validation, bare = _generation_prefix(cfg, loaded, prepared, kv, report)
    else:
        counts = prepared.train.label_counts()
        encoder = cfg.label_encoder(loaded.tokenizer, prepared.labels, counts,
                                    info["data"].get("prior_scale"))

        def predict(data: LabeledData) -> dict:
            return report_from_scores(encoder, data, score_rows(loaded, kv, encoder, data))

        validation = report
        settings["prior_scale"] = info["data"].get("prior_scale")
    kept = report["kept_step"]
    rates = [t["learning_rate"] for t in report.get("learning_rate_trials", [])]
    won = rates.index(report["learning_rate"]) if rates else 0
    if won < len(elapsed) - 1:  # an earlier trial won: its time is in `before`
        to_kept = before[won] + elapsed[won].get(kept, before[won + 1] - before[won])
    else:
        to_kept = before[won] + elapsed[won].get(kept, last.elapsed_s)
    return Contender(predict, validation, info["prefix"]["trainable_parameters"],
                     folder.prefix_path.stat().st_size, kept, report["steps"], to_kept,
                     before[-1] + last.elapsed_s,
                     seen + round(last.examples_per_s * last.elapsed_s), report["stop_reason"],
                     {**settings, **METHODS["prefix"].settings}, bare=bare)


def _generation_prefix(cfg: RunConfig, loaded: LoadedModel, prepared: PreparedData,
                       kv: torch.Tensor, report: dict
                       ) -> tuple[Callable[[TextPairs], dict], dict, dict | None]:
    """A generation prefix's predict, its validation figures and the bare model's, read from
    its run's report: with the report outside the time budget (report_in_budget=False) it
    decoded every validation input with the run's settings, beside the bare model."""
    encoder = pair_encoder(loaded.tokenizer, cfg)

    def predict(pairs: TextPairs) -> dict:
        return pair_scores(loaded.model, encoder, kv, pairs, cfg.generation)

    rows = len(prepared.validation)
    return (predict, _from_report(report, rows),
            _from_report(report["baselines"]["bare_model"], rows))


def _from_report(scores: dict, rows: int) -> dict:
    """A generation report's scores (or its bare model's) as a row's figures."""
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "rouge_l": scores["rouge_l"],
            "loss": scores.get("loss"), "rows": rows, "inputs": scores["n"]}


def _metrics(report: dict | None, generation: bool = False) -> dict | None:
    """One set's figures in a row: a generation contender gives them as they are kept."""
    if report is None or generation:
        return report
    return {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
            "rows": report["n"]}


def run_comparison(cfg: RunConfig, compare: CompareConfig, output: str | Path,
                   loaded: LoadedModel, *, on_event: Callable[[dict], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   prefix_folder: str | Path | None = None) -> dict:
    """Train every method of `compare` on `cfg`'s data, one after another; write and return
    comparison.json's content. The prefix run goes to `prefix_folder` (the app's runs
    directory, so Runs lists it), else to `output`/prefix. `on_event` hears each method's
    progress: {"method", "state" (training | scoring | done | failed | cancelled), "step",
    "total_steps", "elapsed_s"}; a "done" event names the validation figure it carries
    ("metric": macro_f1 or bleu, "value"; a classification one also as "macro_f1"). Once
    `should_stop` says so (checked while a method trains and between methods) the methods
    finished so far are written with `cancelled` (the method that was stopped or next) and
    `not_run` (it and those after it); a cancelled generation comparison decodes no bare
    model ("bare_model": null)."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose another output")
    check_comparison(cfg, compare, loaded.model.config.model_type, loaded.dtype)
    methods, generation = compare.methods_for(cfg), cfg.is_generation
    prepared = prepare_data(cfg)  # one split for every method, refused before training
    test = _extra_set(compare.test_csv, "test", prepared)
    shift = _extra_set(compare.shift_csv, "shift", prepared)
    out.mkdir(parents=True, exist_ok=True)
    tell = on_event or (lambda event: None)
    init_ids = loaded.tokenizer(init_text(cfg, prepared.labels),
                                add_special_tokens=False)["input_ids"]
    result = {
        "format": FORMAT, "task": "generation" if generation else "classification",
        "created": time.time(), "model": loaded.name,
        "precision": loaded.precision, "device": str(loaded.device),
        "model_parameters": loaded.num_parameters,
        "run": cfg.to_dict(), "methods_asked": methods,
        "data": {"train_rows": len(prepared.train), "validation_rows": len(prepared.validation),
                 "test_rows": len(test) if test else None,
                 "shift_rows": len(shift) if shift else None, "labels": prepared.labels,
                 "test_csv": compare.test_csv, "shift_csv": compare.shift_csv,
                 "warnings": prepared.warnings},
        "memory_note": "peak RSS of the whole process while the method ran, the base model "
                       "included (since the process began where Linux cannot reset it); "
                       "GPU peak on CUDA",
        "rows": [],
    }
    bare_validation = None  # the bare model's validation figures, from the prefix's report
    for i, name in enumerate(methods):
        # probe, TF-IDF and scoring never look at should_stop: a cancel asked during them
        # stops here, before the next method trains
        if should_stop is not None and should_stop():
            result["cancelled"] = name
            result["not_run"] = methods[i:]
            break

        def on_step(info: StepInfo, name: str = name) -> None:
            tell({"method": name, "state": "training", "step": info.step,
                  "total_steps": info.total_steps, "elapsed_s": info.elapsed_s})

        tell({"method": name, "state": "training", "step": 0, "total_steps": 0,
              "elapsed_s": 0.0})
        _reset_peaks(loaded.device)
        began = time.perf_counter()
        try:
            contender = _train(name, cfg, out, loaded, prepared, init_ids, on_step,
                               should_stop, Path(prefix_folder or out / "prefix"))
        except (PrefixLabError, MemoryError) as e:  # one method's failure; the others go on
            result["rows"].append({"method": name, "title": METHODS[name].title,
                                   "error": str(e)})
            tell({"method": name, "state": "failed", "error": str(e)})
            continue
        if contender is None:  # stopped mid-training: that method keeps nothing
            tell({"method": name, "state": "cancelled"})
            result["cancelled"] = name
            result["not_run"] = methods[i:]
            break
        tell({"method": name, "state": "scoring"})
        row = _row(name, contender, loaded, test, shift, time.perf_counter() - began,
                   generation)
        bare_validation = contender.bare or bare_validation
        row.update(_keep(name, contender, loaded, out, compare.keep_weights))
        if name == "prefix":
            row["folder"] = str(Path(prefix_folder or out / "prefix"))
        result["rows"].append(row)
        metric = "bleu" if generation else "macro_f1"
        done = {"method": name, "state": "done", "metric": metric,
                "value": row["validation"][metric]}
        tell(done if generation else {**done, "macro_f1": done["value"]})
    if generation:  # a cancelled comparison stops now, without decoding more
        result["bare_model"] = None if "not_run" in result else _bare_model(
            cfg, loaded, prepared, test, shift, bare_validation)
    result["verdict"] = verdict(result["rows"], has_test=test is not None,
                                has_shift=shift is not None, task=result["task"],
                                bare=result.get("bare_model"))
    if "not_run" in result:
        result["verdict"].append(
            "the comparison was cancelled, so these figures cover only the methods above; "
            "not run: " + ", ".join(METHODS[m].title for m in result["not_run"]))
    # whole or not at all: a reader (the app's poll) never sees half a file
    tmp = out / f".{FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out / FILE)
    return result


def _train(name: str, cfg: RunConfig, out: Path, loaded: LoadedModel, prepared: PreparedData,
           init_ids: Sequence[int], on_step: Callable[[StepInfo], None],
           should_stop: Callable[[], bool] | None, prefix_folder: Path) -> Contender | None:
    kind = METHODS[name].kind
    if kind == "prefix":
        return _prefix_contender(cfg, prefix_folder, f"{out.name} prefix", loaded, prepared,
                                 on_step, should_stop)
    if kind == "probe":
        return train_probe(cfg, loaded, prepared.train, prepared.validation, prepared.labels)
    if kind == "tfidf":
        return train_tfidf(cfg, prepared.train, prepared.validation, prepared.labels)
    if cfg.is_generation:
        return train_generation(name, cfg, loaded, prepared.train, prepared.validation,
                                init_ids, on_step=on_step, should_stop=should_stop)
    return train_gradient(name, cfg, loaded, prepared.train, prepared.validation,
                          prepared.labels, init_ids, on_step=on_step, should_stop=should_stop)


def _bare_model(cfg: RunConfig, loaded: LoadedModel, prepared: PreparedData,
                test: TextPairs | None, shift: TextPairs | None,
                validation: dict | None) -> dict:
    """The untrained model's figures with the run's template and decoding settings, on the
    sets the rows were scored on: what each method buys over no training. `validation`:
    those already decoded by the prefix's run."""
    encoder = pair_encoder(loaded.tokenizer, cfg)

    def scores(pairs: TextPairs | None) -> dict | None:
        return None if pairs is None else pair_scores(loaded.model, encoder, None, pairs,
                                                      cfg.generation)

    return {"validation": validation or scores(prepared.validation), "test": scores(test),
            "shift": scores(shift)}


def _row(name: str, c: Contender, loaded: LoadedModel, test: LabeledData | TextPairs | None,
         shift: LabeledData | TextPairs | None, seconds: float, generation: bool) -> dict:
    """One method's figures (scores on the test and shift rows computed here)."""
    total = loaded.num_parameters
    settings = dict(c.settings)
    if c.trainable is not None:
        settings.update(peft_settings(c.trainable))
    return {
        "method": name, "title": METHODS[name].title, "settings": settings,
        "validation": _metrics(c.validation, generation),
        "test": _metrics(c.predict(test), generation) if test is not None else None,
        "shift": _metrics(c.predict(shift), generation) if shift is not None else None,
        "trainable_parameters": c.trainable_parameters,
        "trainable_share": c.trainable_parameters / total if name not in ("tfidf",) else None,
        "stored_bytes": c.stored_bytes,
        "kept_step": c.kept_step, "steps": c.steps, "stop_reason": c.stop_reason,
        "train_s_to_kept": c.train_s_to_kept, "train_s": c.train_s, "wall_s": seconds,
        "examples_per_s": c.examples_seen / c.train_s if c.train_s else None,
        "peak_rss_bytes": _peak_rss(), "peak_gpu_bytes": _gpu_peak(loaded.device),
    }


def _keep(name: str, c: Contender, loaded: LoadedModel, out: Path, keep_weights: bool) -> dict:
    """Save what the method keeps; the row's `folder` (relative), and for a saved adapter
    its bytes on disk in place of the count-based estimate."""
    if name == "prefix":
        return {"run": True}
    if c.trainable is None or (name == "full" and not keep_weights):
        if c.trainable is not None:  # only the figures: free the copy's memory now
            c.trainable = None
        return {"folder": None}
    written = save_adapter(c.trainable, name, loaded, out / name)
    c.trainable = None
    return {"folder": name, "stored_bytes": written}


def read_comparison(folder: str | Path) -> dict:
    """A comparison folder's comparison.json."""
    path = Path(folder) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {FILE} in {folder}: not a comparison folder")
    return json.loads(path.read_text())
