"""Classification metrics and the two baselines a prefix must beat.

- zero-shot: the same frozen model and prompt template with no prefix;
- TF-IDF + logistic regression (scikit-learn), trained on the same training split.
Both are computed on the same held-out rows as the prefix, so the report shows what it buys.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_report(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict:
    """accuracy, macro_f1, per-class P/R/F1, confusion matrix (rows gold, cols predicted)."""
    labels = list(labels)
    p, r, f, s = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0
    )
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, predicted)) if len(gold) else 0.0,
        "macro_f1": float(f1_score(gold, predicted, labels=labels, average="macro",
                                   zero_division=0)),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                    "support": int(s[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {
            "labels": labels,
            "matrix": confusion_matrix(gold, predicted, labels=labels).tolist(),
        },
    }


def predictions_from_probs(probs: np.ndarray, labels: Sequence[str]) -> list[str]:
    return [labels[i] for i in probs.argmax(axis=1)]


def tfidf_baseline(
    train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str], seed: int = 0
) -> list[str]:
    """Word uni- and bigram TF-IDF with a balanced logistic regression: a strong cheap baseline."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=50_000)
    x = vectorizer.fit_transform(train_texts)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(x, list(train_labels))
    return list(clf.predict(vectorizer.transform(texts)))
