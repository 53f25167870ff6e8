"""Class imbalance: inverse-frequency class weights, balanced epochs, and decision rules.

A prefix trained on skewed labels learns the skew: the label log-likelihoods carry the
training prior, and argmax over them rarely picks a rare class. Two levers, measured by
`python -m prefixlab.bench.quality`:
- training: `epoch_order(..., "sampled")` draws each epoch's rows with every class equally
  likely, so the loss weighs classes alike without touching the loss itself; "weighted"
  reads every row once and weights each row's loss by `class_weights` (train.py);
- deciding: `calibrate` subtracts a per-label offset from the log-likelihoods before argmax,
  either the mean log-probability on content-free inputs (Zhao et al. 2021, "Calibrate
  Before Use") or the log of the training label frequencies (prior correction);
  `fit_prior_scale` sets how much of that prior to subtract from the validation rows, when
  they hold enough rows of every label to measure it.
- adapting at prediction time, without labels (`adapted_rule`): the rows being predicted
  re-estimate the label prior (EM, Saerens et al. 2002) or the model's average preference
  (Batch Calibration, Zhou et al. 2023). Both assume a batch of many rows drawn from one
  distribution: on a handful of rows, or a file mixing sources, the estimate is noise.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
from sklearn.metrics import f1_score

Decision = Literal["fitted", "prior", "raw"]
AdaptPrior = Literal["none", "em", "batch"]
ADAPT_PRIORS: tuple[str, ...] = get_args(AdaptPrior)
DECISIONS: tuple[str, ...] = get_args(Decision)
LabelScores = Literal["sum", "mean"]
LABEL_SCORES: tuple[str, ...] = get_args(LabelScores)

FIT_SCALES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(16))
"""Prior strengths tried by `fit_prior_scale`: 0 is the raw argmax, 1 full prior correction."""
MIN_FIT_ROWS = 20
"""Validation rows every label needs before a prior strength is fitted: with fewer, one row
of a rare label moves its F1 by several points and the fit follows the noise."""

CONTENT_FREE = ("N/A", "", "[MASK]")
"""Inputs with no content (Zhao et al. 2021): what the model says about them is its bias."""


def class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """Inverse-frequency weights n / (K * n_k): 1 for every class when balanced; a class
    absent from `labels` gets 0 (nothing to weigh)."""
    counts = Counter(labels)
    n = len(labels)
    return [n / (num_classes * counts[k]) if counts[k] else 0.0 for k in range(num_classes)]


def epoch_order(labels: Sequence[int], balance: str, seed: int, epoch: int) -> list[int]:
    """The row indices one epoch reads, in no particular order (batching shuffles them).

    "none": every row once. "sampled": as many rows, drawn with replacement with weights
    `class_weights`, so each class is drawn equally often in expectation. Deterministic for
    (seed, epoch), so a resumed run reads the same rows.
    """
    if balance in ("none", "weighted"):  # weighted: every row once, the loss weighs them
        return list(range(len(labels)))
    if balance != "sampled":
        raise ValueError(f"unknown class balance {balance!r}; use none, sampled or weighted")
    weights = class_weights(labels, max(labels) + 1)
    rng = random.Random(seed * 7_919 + epoch * 104_729 + 1)
    return rng.choices(range(len(labels)), weights=[weights[y] for y in labels], k=len(labels))


def log_softmax(ll: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities of label log-likelihoods (N, K)."""
    z = ll - ll.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def calibrate(ll: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """Label log-likelihoods (N, K) less a per-label offset (K,), renormalized: the argmax of
    the result is the calibrated decision."""
    out = log_softmax(ll)
    if offset is not None:
        out = log_softmax(out - offset[None, :])
    return out


def prior_offset(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """log of the training label frequencies (a class never seen counts as one row)."""
    return prior_from_counts(np.bincount(np.asarray(labels, dtype=int), minlength=num_classes))


def prior_from_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """log of label frequencies from their counts (a count of 0 counts as 1)."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return np.log(c / c.sum())


def content_free_offset(content_free_ll: np.ndarray) -> np.ndarray:
    """Mean label log-probability over content-free inputs (M, K) -> (K,)."""
    return np.log(np.exp(log_softmax(content_free_ll)).mean(0))


def macro_f1(gold: Sequence, predicted: Sequence, labels: Sequence) -> float:
    """Macro-averaged F1 over every label in `labels` (scikit-learn's): the one definition
    that reports, decision fits and knockouts share.

    A label that is neither gold nor predicted on these rows counts as 0, not skipped, so a
    score always averages over the run's whole label set and two scores of one run compare.
    """
    return float(f1_score(gold, predicted, labels=list(labels), average="macro",
                          zero_division=0))


def fit_prior_scale(scores: np.ndarray, gold: Sequence[int], prior: np.ndarray
                    ) -> float | None:
    """The prior strength a in FIT_SCALES whose decision, argmax(scores - a * prior), scores
    the best macro-F1 on these (validation) rows; ties go to the strength nearest 1.

    Full prior correction (a = 1) is right when the model's scores carry the training skew
    exactly; a long run on many rows learns the evidence well enough that subtracting the
    whole prior over-predicts rare labels, and a short one may need more than 1. None when a
    label has fewer than MIN_FIT_ROWS rows here: too few to measure (keep a = 1).
    """
    gold_arr = np.asarray(gold, dtype=int)
    k = scores.shape[1]
    if len(gold_arr) == 0 or np.bincount(gold_arr, minlength=k).min() < MIN_FIT_ROWS:
        return None
    base = log_softmax(np.asarray(scores, dtype=np.float64))
    prior = np.asarray(prior, dtype=np.float64)
    best = max(FIT_SCALES, key=lambda a: (
        round(macro_f1(gold_arr, (base - a * prior[None, :]).argmax(1), range(k)), 9), -abs(a - 1)))
    return float(best)


def fit_offsets(scores: np.ndarray, gold: Sequence[int], start: np.ndarray,
                rounds: int = 3) -> np.ndarray:
    """Per-label offsets (K,) fitted to these rows' macro-F1 by coordinate search from
    `start` (a step of 0.1 in [-3, 3] around it, label by label). Measured in the quality
    benchmark beside `fit_prior_scale`: K - 1 free numbers instead of one."""
    gold_arr = np.asarray(gold, dtype=int)
    base = log_softmax(np.asarray(scores, dtype=np.float64))
    k = base.shape[1]
    offset = np.asarray(start, dtype=np.float64).copy()
    steps = np.round(np.arange(-3.0, 3.01, 0.1), 1)

    def f1(o: np.ndarray) -> float:
        return round(macro_f1(gold_arr, (base - o[None, :]).argmax(1), range(k)), 9)

    for _ in range(rounds):
        for j in range(1, k):  # label 0 fixed: only differences between offsets matter
            tried = []
            for d in steps:
                o = offset.copy()
                o[j] = start[j] + d
                tried.append((f1(o), -abs(o[j] - offset[j]), o))
            offset = max(tried, key=lambda t: t[:2])[2]
    return offset


@dataclass(frozen=True)
class LabelRule:
    """How a run turns label log-likelihoods (N, K) into label probabilities, and so into its
    decision; the same rule in validation, the final report, prediction and serving.

    `lengths`: each label's token count, to compare labels by their mean log-probability per
    token (a long label is not penalized for its length); None sums over the tokens.
    `offset`: subtracted per label after that (prior correction: log training frequencies);
    None leaves the scores as the model gives them.
    """

    lengths: tuple[int, ...] | None = None
    offset: tuple[float, ...] | None = None
    train_prior: tuple[float, ...] | None = None
    """log of the training label frequencies, when known: what prediction-time adaptation
    (`adapted_rule`) replaces by the prior it estimates on the rows predicted."""
    prior_scale: float = 0.0
    """The share of `train_prior` that `offset` subtracts (1 for prior, the fitted strength
    for fitted, 0 for raw)."""

    def log_probs(self, ll: np.ndarray) -> np.ndarray:
        scores = np.asarray(ll, dtype=np.float64)
        if self.lengths is not None:
            scores = scores / np.asarray(self.lengths, dtype=np.float64)[None, :]
        return calibrate(scores, None if self.offset is None else np.asarray(self.offset))

    def probs(self, ll: np.ndarray) -> np.ndarray:
        return np.exp(self.log_probs(ll))


def label_rule(decision: str, label_scores: str, labels: Sequence[str],
               label_ids: Sequence[Sequence[int]], label_counts: Mapping[str, int] | None,
               prior_scale: float | None = None) -> LabelRule:
    """The rule a run's settings ask for. Prior correction needs the training label counts;
    a run without them (an imported adapter) decides on the raw scores. "fitted" subtracts
    `prior_scale` times the log prior: the strength fitted on the validation rows when the
    run ended, or the full prior until then (and when there were too few rows to fit)."""
    lengths = tuple(len(t) for t in label_ids) if label_scores == "mean" else None
    if not label_counts:
        return LabelRule(lengths)
    prior = tuple(float(x) for x in prior_from_counts(
        [int(label_counts.get(name, 0)) for name in labels]))
    if decision not in ("prior", "fitted"):
        return LabelRule(lengths, None, prior, 0.0)
    scale = prior_scale if decision == "fitted" and prior_scale is not None else 1.0
    return LabelRule(lengths, tuple(scale * x for x in prior), prior, float(scale))


EM_ROUNDS = 200
"""Most EM rounds of `em_prior`; it usually settles well before."""


def em_prior(log_probs: np.ndarray, train_prior: np.ndarray, rounds: int = EM_ROUNDS,
             tol: float = 1e-7) -> np.ndarray:
    """The label prior (K,) of the rows whose posteriors under the training prior are
    `log_probs` (N, K), by EM (Saerens, Latinne & Decaestecker 2002).

    Each round reweighs every row's posterior by new prior / training prior and takes the
    mean posterior as the new prior; it converges to the maximum-likelihood prior of these
    rows when the posteriors are calibrated on the training distribution and only the prior
    moved (label shift). Returned as probabilities, not logs.
    """
    base = np.exp(log_softmax(np.asarray(log_probs, dtype=np.float64)))  # (N, K)
    p_train = np.exp(np.asarray(train_prior, dtype=np.float64))
    p_train /= p_train.sum()
    prior = p_train.copy()
    for _ in range(rounds):
        w = base * (prior / p_train)[None, :]  # (N, K)
        w /= w.sum(1, keepdims=True)
        new = w.mean(0)
        if np.abs(new - prior).max() < tol:
            return new
        prior = new
    return prior


def adapted_rule(rule: LabelRule, ll: np.ndarray, how: str) -> LabelRule:
    """`rule` adapted to the rows whose label log-likelihoods are `ll` (N, K), without labels.

    "em": the label prior re-estimated on these rows (`em_prior`) takes the training prior's
    place in the decision: the model's posterior is moved to the new prior, and the rule's
    prior correction then subtracts its share of the new prior. A full prior correction
    (prior) thus decides as before; raw decides by the Saerens posterior; fitted in between.
    A rule without the training prior (an imported prefix) takes it as uniform.
    "batch": Batch Calibration: the rule's mean label probability over these rows is
    subtracted in log space, so the rows' average preference for a label is taken as bias.
    "none": the rule as it is.
    """
    if how == "none" or len(ll) == 0:
        return rule
    base = LabelRule(rule.lengths).log_probs(ll)  # (N, K): the model's own posteriors
    k = base.shape[1]
    if how == "batch":
        mean = np.log(np.exp(rule.log_probs(ll)).mean(0))
        offset = np.zeros(k) if rule.offset is None else np.asarray(rule.offset)
        return replace(rule, offset=tuple(float(x) for x in offset + mean))
    if how != "em":
        raise ValueError(f"unknown prior adaptation {how!r}; use {', '.join(ADAPT_PRIORS)}")
    train = (np.full(k, -np.log(k)) if rule.train_prior is None
             else np.asarray(rule.train_prior, dtype=np.float64))
    new = np.log(np.maximum(em_prior(base, train), 1e-12))
    offset = train - (1.0 - rule.prior_scale) * new
    return replace(rule, offset=tuple(float(x) for x in offset))


def describe_decision(report: dict) -> str:
    """How a run's report decided its labels, in plain sentences (empty for raw scores)."""
    fit = report.get("decision_fit") or {}
    if report.get("decision") == "fitted" and fit.get("prior_scale") is not None:
        return (f"Decisions subtract {fit['prior_scale']:.1f} × the log of each label's share "
                f"of the training rows: the strength that decided best on the "
                f"{fit['validation_rows']} validation rows (macro-F1 {fit['macro_f1']:.3f}; "
                f"the full correction: {fit['macro_f1_full_prior']:.3f}). The bare model "
                "decides on its own scores.")
    if report.get("decision") not in ("prior", "fitted"):
        return ""
    text = ("Decisions are prior-corrected: each label's score less the log of its share of "
            "the training rows, so a rare label is not out-voted by the training skew (the "
            "bare model decides on its own scores).")
    if few := fit.get("too_few"):
        text += (" The strength of the correction was not fitted: the validation rows hold "
                 f"fewer than {MIN_FIT_ROWS} rows of "
                 + ", ".join(f"{y} ({n})" for y, n in few.items()) + ".")
    return text
