"""A run opened for use: score or generate with its prefix, predict a table, evaluate it on a
held-out CSV beside the baselines.

`open_run` opens a finished, checkpointed or imported run folder with its base model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefixlab.data.columns import guess_columns
from prefixlab.data.labeled import load_labeled_csv
from prefixlab.data.reading import DataError, read_table
from prefixlab.engine.balance import ADAPT_PRIORS, LabelRule, adapted_rule
from prefixlab.engine.decode import DecodeConfig
from prefixlab.engine.encode import Encoder, PairEncoder
from prefixlab.engine.models import LoadedModel, load_model
from prefixlab.engine.predict import score_log_likelihoods
from prefixlab.engine.prefix import load_prefix
from prefixlab.errors import ConfigError
from prefixlab.runs.config import RunConfig
from prefixlab.runs.experiment import prepare_data
from prefixlab.runs.folder import RunError, RunFolder
from prefixlab.runs.generation import generate, pair_encoder
from prefixlab.runs.scoring import SCORE_CHUNK, full_report, report_from_scores, score_rows

ADAPT_ASSUMPTION = (
    "Adapting the decision to the rows predicted assumes they are a batch of many rows from "
    "one distribution: the label shares (em) or the model's average preference (batch) are "
    "estimated on them. On a few rows, or a file that mixes sources, leave it off.")


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

    def score(self, texts: list[str], with_prefix: bool = True,
              adapt_prior: str = "none") -> np.ndarray:
        """Label probabilities (N, K) by the run's decision rule; `adapt_prior` (em, batch)
        adapts the rule to these texts taken together (balance.adapted_rule)."""
        ll = self.log_likelihoods(texts, with_prefix)
        return self.rule_for(ll, adapt_prior).probs(ll)

    def log_likelihoods(self, texts: list[str], with_prefix: bool = True) -> np.ndarray:
        """Label log-likelihoods (N, K), before any decision rule."""
        if self.is_generation:
            raise RunError(f"run {self.folder.path.name} generates text; it has no labels to "
                           "score")
        return score_log_likelihoods(self.loaded.model, self.kv if with_prefix else None,
                                     self.encoder, texts)

    def rule_for(self, ll: np.ndarray, adapt_prior: str = "none") -> LabelRule:
        """The run's decision rule, adapted to the rows of `ll` when asked."""
        if adapt_prior not in ADAPT_PRIORS:
            raise RunError(f"adapt_prior must be one of {', '.join(ADAPT_PRIORS)}, "
                           f"got {adapt_prior!r}")
        return adapted_rule(self.encoder.rule, ll, adapt_prior)

    def generate(self, texts: list[str], with_prefix: bool = True,
                 decode: DecodeConfig | None = None) -> list[str]:
        """One output per text with the run's template (and decoding, unless given)."""
        if not self.is_generation:
            raise RunError(f"run {self.folder.path.name} classifies; use score, or free "
                           "generation")
        return generate(self.loaded.model, self.encoder, self.kv if with_prefix else None,
                        texts, decode or self.config.generation)


def open_run(path: str | Path, loaded: LoadedModel | None = None,
             precision: str | None = None) -> Run:
    """Open a finished (or checkpointed) run; the base model is loaded unless given, in
    `precision` (None: the run's own; the prefix is float32 and fits any)."""
    folder = RunFolder(path)
    info = folder.read_config()
    try:
        cfg = RunConfig.from_dict(info["run"])
        labels = list(info["labels"])
    except (KeyError, ConfigError) as e:
        raise RunError(f"{folder.config_path} is not a valid run config: {e}") from e
    if loaded is None:
        loaded = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code,
                            precision=precision or cfg.precision)
    elif loaded.name != cfg.model:
        raise RunError(f"run {folder.path.name} was trained on {cfg.model!r}, "
                       f"not on the loaded {loaded.name!r}")
    prefix = load_prefix(folder.prefix_path, loaded.shape)
    data = info.get("data") or {}
    encoder = (pair_encoder(loaded.tokenizer, cfg) if cfg.is_generation else
               cfg.label_encoder(loaded.tokenizer, labels, data.get("label_counts"),
                                 data.get("prior_scale")))
    return Run(folder, cfg, labels, loaded, prefix.kv, encoder)


def _present(name: str | None, columns) -> str | None:
    """The run's column name when this file has it (else None: guess the file's own)."""
    return name if name in [str(c) for c in columns] else None


def evaluate_csv(run: Run, path: str | Path, text_column: str | None = None,
                 label_column: str | None = None,
                 progress: Callable[[str, int, int], None] | None = None,
                 adapt_prior: str = "none") -> dict:
    """The run's prefix on a held-out labeled CSV, beside both baselines on the same rows.

    Columns: as given, else the run's own names when the file has them, else guessed. A label
    the run never trained on is refused (the prefix cannot predict it). `progress(what, done,
    total)` follows the scoring (see scoring.full_report). `adapt_prior` (em, batch) adapts
    the prefix's decision to the file's rows taken together (see ADAPT_ASSUMPTION); the report
    says so, with the label shares it estimated.
    """
    columns = read_table(path).frame.columns
    data = load_labeled_csv(path, text_column or _present(run.config.text_column, columns),
                                    label_column or _present(run.config.label_column, columns))
    unknown = sorted(set(data.label_names) - set(run.labels))
    if unknown:
        raise DataError(
            f"{Path(path).name} has labels the run was not trained on: {', '.join(unknown)} "
            f"(run labels: {', '.join(run.labels)})"
        )
    try:
        train_data = prepare_data(run.config).train
    except (DataError, OSError):
        train_data = None  # the training file moved: no TF-IDF baseline
    adapted = None
    if adapt_prior != "none":
        told = ((lambda done, total: progress("scoring held-out rows with the prefix", done,
                                              total)) if progress else None)
        ll = score_rows(run.loaded, run.kv, run.encoder, data, told)
        encoder = copy.copy(run.encoder)
        encoder.rule = run.rule_for(ll, adapt_prior)
        adapted = report_from_scores(encoder, data, ll)
    report = full_report(run.loaded, run.kv, run.encoder, train_data, data,
                         run.config.training.seed, prefix_report=adapted, progress=progress)
    if adapted is not None:
        shares = np.exp(run.rule_for(ll, adapt_prior).log_probs(ll)).mean(0)
        report["adapt_prior"] = {"how": adapt_prior, "assumption": ADAPT_ASSUMPTION,
                                 "predicted_shares": dict(zip(run.labels, map(float, shares),
                                                              strict=True))}
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
        column = guess_columns(list(frame.columns), frame)[0]
    if column is None or column not in frame.columns:
        raise DataError(
            f"{Path(path).name} has no text column {column or ''!r}; "
            f"columns: {', '.join(map(str, frame.columns))}"
        )
    return column


def predict_table(run: Run, path: str | Path, text_column: str | None = None,
                  progress: Callable[[str, int, int], None] | None = None,
                  max_rows: int | None = None, adapt_prior: str = "none"):
    """A CSV's rows with the predicted label and every label's probability appended (a
    generation run: the generated text). `progress(what, done, total)` after each chunk of
    rows (a progress that raises stops there). A file over `max_rows` is refused unread.
    `adapt_prior` (em, batch) adapts the decision to the file's rows taken together."""
    frame = read_table(path).frame
    check_rows(frame, max_rows)
    column = text_column_of(frame, text_column or run.config.text_column, path,
                            guess=not text_column)
    texts = frame[column].fillna("").astype(str).tolist()
    out = frame.copy()
    if run.is_generation:
        chunks = _chunks(texts, run.config.generation.batch_size, "generating", progress)
        out["generated"] = [t for part in chunks for t in run.generate(part)]
        return out
    parts = [run.log_likelihoods(part)
             for part in _chunks(texts, SCORE_CHUNK, "predicting", progress)]
    ll = np.concatenate(parts) if parts else np.zeros((0, len(run.labels)))
    probs = run.rule_for(ll, adapt_prior).probs(ll)  # adapted over the whole file at once
    out["predicted_label"] = [run.labels[i] for i in probs.argmax(1)]
    for j, label in enumerate(run.labels):
        out[f"p_{label}"] = probs[:, j].round(6)
    return out


def check_rows(frame, max_rows: int | None) -> None:
    """RunError when a file to predict has more rows than a server takes in one request."""
    if max_rows is not None and len(frame) > max_rows:
        raise RunError(f"the file has {len(frame):,} rows; this server predicts at most "
                       f"{max_rows:,} per file (PREFIXLAB_MAX_CSV_ROWS): split it, or run "
                       "`python -m prefixlab predict` on it")


def _chunks(texts: list[str], size: int, what: str,
            progress: Callable[[str, int, int], None] | None) -> Iterator[list[str]]:
    """`texts` in one piece; with `progress`, `size` at a time, each reported once done."""
    if progress is None:
        yield texts
        return
    progress(what, 0, len(texts))
    for start in range(0, len(texts), size):
        yield texts[start:start + size]
        progress(what, min(start + size, len(texts)), len(texts))
