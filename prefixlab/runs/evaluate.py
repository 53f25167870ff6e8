"""Classification metrics, the baselines a prefix must beat, and warnings when it fails.

- majority: always the most frequent training label (what a collapsed model scores);
- zero-shot: the same frozen model and prompt template with no prefix;
- TF-IDF + logistic regression (scikit-learn), trained on the same training split.
All are computed on the same held-out rows as the prefix, so the report shows what it buys.
`prediction_warnings` says when predictions collapse onto one label or miss a label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from prefixlab.engine.balance import macro_f1


def classification_report(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict:
    """accuracy, macro_f1, per-class P/R/F1, confusion matrix (rows gold, cols predicted)."""
    labels = list(labels)
    p, r, f, s = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0
    )
    counts = Counter(predicted)
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, predicted)) if len(gold) else 0.0,
        "macro_f1": macro_f1(gold, predicted, labels),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                    "support": int(s[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {
            "labels": labels,
            "matrix": confusion_matrix(gold, predicted, labels=labels).tolist(),
        },
        "predicted": {label: counts.get(label, 0) for label in labels},
    }


COLLAPSE_SHARE = 0.95
"""One label taking at least this share of the predictions counts as a collapse."""
MISSED_SHARE = 0.05
"""A label with at least this share of the rows must be predicted at least once."""


def prediction_warnings(report: dict, name: str = "the prefix") -> list[str]:
    """Plain-language warnings when predictions are degenerate: one label takes (nearly)
    all predictions, or a label with >= 5% of the rows is never predicted."""
    predicted = report.get("predicted") or {}
    n = report.get("n", 0)
    if not n or not predicted:
        return []
    warnings = []
    top, top_count = max(predicted.items(), key=lambda kv: kv[1])
    if len(predicted) > 1 and top_count >= COLLAPSE_SHARE * n:
        warnings.append(
            f"{name} predicts {top!r} for {top_count / n:.0%} of the {n} rows: it has "
            f"collapsed onto one label, and its accuracy is no better than always "
            f"answering {top!r}"
        )
    for label, stats in report["per_class"].items():
        if stats["support"] >= MISSED_SHARE * n and predicted.get(label, 0) == 0:
            warnings.append(
                f"{name} never predicts {label!r}, which is {stats['support'] / n:.0%} of "
                f"the rows ({stats['support']}): its recall is 0"
            )
    return warnings


def majority_baseline(train_labels: Sequence[str], n: int) -> list[str]:
    """The most frequent training label, n times (ties: the first in sorted order)."""
    counts = Counter(train_labels)
    top = max(sorted(counts), key=lambda label: counts[label])
    return [top] * n


def predictions_from_probs(probs: np.ndarray, labels: Sequence[str]) -> list[str]:
    return [labels[i] for i in probs.argmax(axis=1)]


def tfidf_baseline(
    train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str], seed: int = 0
) -> list[str]:
    """Word uni- and bigram TF-IDF with a balanced logistic regression: a strong cheap baseline."""
    vectorizer, clf = fit_tfidf(train_texts, train_labels, seed)
    return list(clf.predict(vectorizer.transform(texts)))


def fit_tfidf(train_texts: Sequence[str], train_labels: Sequence[str], seed: int = 0
              ) -> tuple[TfidfVectorizer, LogisticRegression]:
    """The TF-IDF baseline's vectorizer and classifier, fitted (a comparison keeps both)."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=50_000)
    x = vectorizer.fit_transform(train_texts)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(x, list(train_labels))
    return vectorizer, clf
