"""A run's decisions explained: one text under its prefix, its start and the bare model
(interpret.explain), the words that move its decisions over validation rows beside the words
TF-IDF's model weighs most, and the model's own descriptions of the prefix
(interpret.describe).

The start and the bare model decide without the run's training prior (the prior is learned
with the prefix; runs.scoring's zero-shot baseline reads the bare model the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from prefixlab.interpret.describe import Description, describe_prefix
from prefixlab.interpret.explain import (
    Explanation,
    Source,
    WordInfluence,
    explain_texts,
    overlap,
    word_influence,
)
from prefixlab.runs.experiment import prepare_data
from prefixlab.runs.finished import Run
from prefixlab.runs.folder import RunError

SOURCES = ("prefix", "start", "bare")
"""The three readings of a text, in the order shown."""
SOURCE_NAMES = {"prefix": "trained prefix", "start": "its start (before training)",
                "bare": "bare model (no prefix)"}
TOP_WORDS = 20
EXPLAIN_ROWS = 40  # validation rows the word lists explain by default (each ~20 scored rows)


def _classifying(run: Run) -> None:
    if run.is_generation:
        raise RunError(f"run {run.folder.path.name} generates text: it makes no label "
                       "decisions to explain")


def sources(run: Run, start: torch.Tensor | None) -> list[Source]:
    """The prefix, its start (when known) and the bare model, each with its encoder."""
    plain = run.encoder.without_prior()
    out = [Source("prefix", run.kv, run.encoder)]
    if start is not None:
        out.append(Source("start", start, plain))
    return [*out, Source("bare", None, plain)]


def explain_text(run: Run, start: torch.Tensor | None, text: str) -> Explanation:
    """One text under the prefix, its start and the bare model, each word left out under the
    prefix and under the bare model: one mixed batch."""
    _classifying(run)
    if not text.strip():
        raise RunError("type a text to explain")
    return explain_texts(run.loaded.model, sources(run, start), [text],
                         leave_out=("prefix", "bare"))[0]


def tfidf_top_words(texts: Sequence[str], labels: Sequence[str], label_names: Sequence[str],
                    n: int = TOP_WORDS, seed: int = 0,
                    keep: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
    """Per label, the `n` single words TF-IDF's logistic regression (runs.evaluate's
    baseline) weighs most toward it (bigrams left out: the prefix's list is of words)."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=50_000)
    x = vectorizer.fit_transform(texts)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(x, list(labels))
    vocab = vectorizer.get_feature_names_out()
    single = np.array([" " not in w and (keep is None or keep(w)) for w in vocab])
    coef = clf.coef_
    classes = list(clf.classes_)
    if coef.shape[0] == 1:  # binary: one row, positive toward classes_[1]
        coef = np.vstack([-coef[0], coef[0]])
    out = {}
    for label in label_names:
        if label not in classes:
            out[label] = []
            continue
        w = np.where(single, coef[classes.index(label)], -np.inf)
        order = np.argsort(-w, kind="stable")[:n]
        out[label] = [str(vocab[i]) for i in order if np.isfinite(w[i])]
    return out


@dataclass
class WordAgreement:
    """The words that move the prefix's decisions most beside TF-IDF's, per label."""

    prefix: WordInfluence
    tfidf: dict[str, list[str]]
    overlap: dict[str, float]  # label -> share of the prefix's top words in TF-IDF's
    chance: float  # the share two random lists of this length would share

    def to_json(self) -> dict:
        return {"rows": self.prefix.rows, "candidates": self.prefix.candidates,
                "chance": self.chance, "overlap": self.overlap, "tfidf": self.tfidf,
                "prefix": {k: [{"word": w, "push": round(p, 4), "rows": c} for w, p, c in v]
                           for k, v in self.prefix.top.items()}}

    def lines(self) -> list[str]:
        """The agreement in words, one line per label."""
        out = [f"words that move the prefix's decisions (leave one word out, {self.prefix.rows}"
               f" validation rows) vs TF-IDF's heaviest, top {TOP_WORDS} per label among "
               f"{self.prefix.candidates} words seen ≥3 times (chance overlap "
               f"{self.chance:.0%}):"]
        for label, top in self.prefix.top.items():
            out.append(f"  {label}: overlap {self.overlap[label]:.0%}; prefix: "
                       f"{', '.join(w for w, _, _ in top[:10])}; tf-idf: "
                       f"{', '.join(self.tfidf[label][:10])}")
        return out


def word_agreement(run: Run, rows: int = EXPLAIN_ROWS, n: int = TOP_WORDS,
                   progress: Callable[[str], None] | None = None) -> WordAgreement:
    """Explain `rows` validation rows under the prefix alone; rank words per label by their
    mean push, and compare with TF-IDF's heaviest words (trained on the run's training rows),
    both ranked among the same words: seen ≥3 times in the rows and in TF-IDF's vocabulary."""
    _classifying(run)
    data = prepare_data(run.config)
    texts = list(data.validation.texts)[:rows]
    if not texts:
        raise RunError(f"run {run.folder.path.name} has no validation rows to explain")
    if progress:
        progress(f"explaining {len(texts)} validation rows, each word left out in turn")
    source = Source("prefix", run.kv, run.encoder)
    explained = []
    for start in range(0, len(texts), 8):  # 8 texts a step: progress, and bounded memory
        explained += explain_texts(run.loaded.model, [source], texts[start:start + 8],
                                   leave_out=("prefix",))
        if progress:
            progress(f"explained {len(explained)}/{len(texts)} rows")
    known = set(TfidfVectorizer().fit(data.train.texts).get_feature_names_out())
    eligible = _eligible(explained, known)
    influence = word_influence(explained, "prefix", n, keep=eligible.__contains__)
    tfidf = tfidf_top_words(data.train.texts, data.train.labels, run.labels, n,
                            run.config.training.seed, keep=eligible.__contains__)
    share = {label: overlap([w for w, _, _ in influence.top[label]], tfidf[label])
             for label in run.labels}
    chance = min(1.0, n / influence.candidates) if influence.candidates else 0.0
    return WordAgreement(influence, tfidf, share, chance)


def _eligible(explained: Sequence[Explanation], known: set[str], min_count: int = 3
              ) -> set[str]:
    counts: dict[str, int] = {}
    for ex in explained:
        for w in {w.lower() for w in ex.words}:
            counts[w] = counts.get(w, 0) + 1
    return {w for w, c in counts.items() if c >= min_count and w in known}


def describe_run(run: Run, start: torch.Tensor | None, **kwargs) -> list[Description]:
    """The model's descriptions of the run's prefix (interpret.describe)."""
    labels = [] if run.is_generation else run.labels
    return describe_prefix(run.loaded.model, run.loaded.tokenizer, run.kv, start, labels,
                           run.config.task, **kwargs)


__all__ = ["EXPLAIN_ROWS", "SOURCES", "SOURCE_NAMES", "WordAgreement", "describe_run",
           "explain_text", "sources", "tfidf_top_words", "word_agreement"]
