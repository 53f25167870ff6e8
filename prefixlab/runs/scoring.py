"""Scoring a prefix on labeled rows: its label log-likelihoods, the report they give under
the encoder's decision rule, the fitted decision rule, and the full report beside the
baselines (evaluate.py). Used while training (execute_run), by a finished run (finished.py)
and by inspection.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from prefixlab.data.labeled import LabeledData
from prefixlab.engine import distributed
from prefixlab.engine.balance import MIN_FIT_ROWS, LabelRule, fit_prior_scale, prior_from_counts
from prefixlab.engine.encode import Encoder
from prefixlab.engine.models import LoadedModel
from prefixlab.engine.predict import score_log_likelihoods
from prefixlab.runs.budget import Progress
from prefixlab.runs.evaluate import (
    classification_report,
    majority_baseline,
    prediction_warnings,
    predictions_from_probs,
    tfidf_baseline,
)

SHIFT_GAP = 0.10
"""A shift set's macro-F1 this far from validation's earns a warning: the step kept and the
decision fitted on the validation rows do not carry over to the shift set's topics."""
SCORE_CHUNK = 64
"""Rows scored between two progress reports."""


def evaluate_prefix(
    loaded: LoadedModel, kv: torch.Tensor | None, encoder: Encoder, data: LabeledData,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics of one prefix (or the bare model) and the label probabilities, in one pass."""
    ll = score_rows(loaded, kv, encoder, data, progress)
    return report_from_scores(encoder, data, ll), encoder.rule.probs(ll)


def score_rows(loaded: LoadedModel, kv: torch.Tensor | None, encoder: Encoder,
               data: LabeledData, progress: Callable[[int, int], None] | None = None,
               ) -> np.ndarray:
    """Label log-likelihoods (N, K) of the rows; in a process group each rank scores a share.
    With `progress(done, total)`, the rows are scored SCORE_CHUNK at a time, reported after
    each chunk (a progress that raises stops the scoring there)."""
    def score(texts: list[str]) -> np.ndarray:
        return distributed.gather_rows(
            lambda share: score_log_likelihoods(loaded.model, kv, encoder, share), texts)

    texts = list(data.texts)
    if progress is None or not texts:
        return score(texts)
    progress(0, len(texts))
    parts = []
    for start in range(0, len(texts), SCORE_CHUNK):
        parts.append(score(texts[start:start + SCORE_CHUNK]))
        progress(min(start + SCORE_CHUNK, len(texts)), len(texts))
    return np.concatenate(parts, axis=0)


def report_from_scores(encoder: Encoder, data: LabeledData, ll: np.ndarray) -> dict:
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


def fit_decision(encoder: Encoder, data: LabeledData, ll: np.ndarray,
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
    loaded: LoadedModel, kv: torch.Tensor, encoder: Encoder, train_data: LabeledData | None,
    data: LabeledData, seed: int, prefix_report: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """The prefix's metrics at the top level, the baselines beside them, and warnings when
    its predictions collapse onto one label or miss one.

    `prefix_report`: the prefix's own metrics when already computed on `data` (the last
    evaluation of a run), so the rows are not scored twice. `progress(what, done, total)`
    follows the scoring of the rows, with the prefix and without.
    """
    def told(what: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(what, done, total)) if progress else None

    report = dict(prefix_report) if prefix_report else evaluate_prefix(
        loaded, kv, encoder, data, told("scoring held-out rows with the prefix"))[0]
    # the bare model decides on its own scores: the training prior is knowledge it lacks
    zero, _ = evaluate_prefix(loaded, None, encoder.without_prior(), data,
                              told("scoring held-out rows without the prefix (zero-shot)"))
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


def shift_report(loaded: LoadedModel, kv: torch.Tensor, encoder: Encoder, shift: LabeledData,
                 validation_macro_f1: float) -> dict:
    """The kept prefix on a shift set (labeled rows from other topics or sources than the
    training CSV), under the run's decision rule, beside validation's macro-F1; with a
    warning when the two differ by more than SHIFT_GAP."""
    ll = score_rows(loaded, kv, encoder, shift)
    report = report_from_scores(encoder, shift, ll)
    gap = report["macro_f1"] - validation_macro_f1
    out = {"n": report["n"], "macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
           "validation_macro_f1": validation_macro_f1, "gap": gap,
           "predicted": report["predicted"],
           "warnings": prediction_warnings(report, "on the shift set, the prefix")}
    if abs(gap) > SHIFT_GAP:
        out["warnings"].insert(0, (
            f"macro-F1 on the shift set ({report['macro_f1']:.3f}) is {abs(gap):.2f} "
            f"{'below' if gap < 0 else 'above'} validation's ({validation_macro_f1:.3f}): "
            "what was chosen on the validation rows does not carry over to the shift set's "
            "rows"))
    return out
