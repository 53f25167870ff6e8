"""Topic-held-out splits: texts clustered by their words, whole clusters held out.

A random split puts rows of every topic on both sides, so a validation or test score there
says how a model does on topics it trained on. Holding out whole clusters of a TF-IDF +
k-means clustering leaves topics the model never saw on the held-out side: a cheap stand-in
for a test set drawn from other topics (issue 32's shifted benchmark). Deterministic for a
seed; the clustering uses nothing but the texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer

from prefixlab.data.labeled import LabeledData

DEFAULT_CLUSTERS = 12
"""Clusters of a topic split: enough that a held-out share of 20-25% is several clusters
(one cluster alone would make the split hinge on which one was drawn), few enough that each
is a topic rather than a handful of near-duplicates."""


def topic_clusters(texts: Sequence[str], n_clusters: int = DEFAULT_CLUSTERS,
                   seed: int = 0) -> np.ndarray:
    """A cluster id (N,) per text: k-means on word TF-IDF (English stop words removed, so
    clusters follow content words rather than function words)."""
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
    if len(texts) < n_clusters:
        raise ValueError(f"{len(texts)} texts are too few for {n_clusters} topic clusters")
    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True, min_df=2,
                                 max_features=20_000)
    try:
        x = vectorizer.fit_transform(list(texts))  # (N, vocabulary), rows L2-normalized
    except ValueError:  # no word seen twice (tiny or odd inputs): every word counts
        x = TfidfVectorizer(sublinear_tf=True).fit_transform(list(texts))
    km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
    return km.fit_predict(x).astype(int)


def held_out_clusters(clusters: np.ndarray | Sequence[int], share: float,
                      seed: int) -> set[int]:
    """Clusters drawn in a seeded order until they hold at least `share` of the rows. A
    cluster that would take the held-out side past 1.5 times that share is passed over
    (one big cluster would otherwise hold out most of the data), unless nothing is held yet;
    never every cluster (one stays on the training side)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be between 0 and 1, got {share}")
    ids, sizes = np.unique(np.asarray(clusters), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    target = share * len(clusters)
    held: set[int] = set()
    rows = 0
    for i in order[:-1]:
        if rows >= target:
            break
        if held and rows + sizes[i] > 1.5 * target:
            continue
        held.add(int(ids[i]))
        rows += int(sizes[i])
    return held


def cluster_split(texts: Sequence[str], share: float, seed: int,
                  n_clusters: int = DEFAULT_CLUSTERS) -> tuple[list[int], list[int]]:
    """(kept, held-out) row indices, ascending: whole topic clusters are held out, about
    `share` of the rows, so no cluster is on both sides."""
    clusters = topic_clusters(texts, n_clusters, seed)
    held = held_out_clusters(clusters, share, seed)
    out = [i for i, c in enumerate(clusters) if c in held]
    kept = [i for i, c in enumerate(clusters) if c not in held]
    return kept, out


def topic_split(data: LabeledData, share: float, seed: int,
                n_clusters: int = DEFAULT_CLUSTERS) -> tuple[LabeledData, LabeledData]:
    """(train, validation) with whole topic clusters in validation, about `share` of the
    rows. A label the held-out clusters would take entirely keeps one row on the training
    side (the prefix cannot learn a label it never reads), with a warning."""
    k = min(n_clusters, max(2, len(data) // 10))
    kept, held = cluster_split(data.texts, share, seed, k)
    present = {data.labels[i] for i in kept}
    moved = []
    for i in list(held):
        if data.labels[i] not in present:
            held.remove(i)
            kept.append(i)
            present.add(data.labels[i])
            moved.append(data.labels[i])
    train, validation = data.subset(sorted(kept)), data.subset(held)
    if moved:
        train.warnings.append(
            "the held-out topics held every row of " + ", ".join(map(repr, moved))
            + ": one row of each went to training")
    return train, validation
