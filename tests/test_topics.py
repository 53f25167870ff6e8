"""data.topics: topic-held-out splits hold out whole clusters, reproducibly by seed."""

from __future__ import annotations

import random

from prefixlab.data.labeled import LabeledData
from prefixlab.data.topics import cluster_split, held_out_clusters, topic_clusters, topic_split

TOPICS = {
    "sport": "football match goal team league striker referee",
    "food": "pizza pasta cheese recipe oven kitchen dinner",
    "weather": "rain storm cloud wind forecast snow thunder",
    "music": "guitar song album concert band singer drums",
    "money": "bank loan interest market stock price budget",
    "travel": "flight airport hotel beach passport luggage trip",
}


def topical_texts(per_topic: int = 30, seed: int = 0) -> tuple[list[str], list[str]]:
    """Texts of six topics, each drawn from its topic's words: (texts, their topics)."""
    rng = random.Random(seed)
    texts, topics = [], []
    for topic, words in TOPICS.items():
        vocab = words.split()
        for _ in range(per_topic):
            texts.append(" ".join(rng.choices(vocab, k=6)))
            topics.append(topic)
    return texts, topics


def test_cluster_split_puts_no_cluster_on_both_sides_and_is_reproducible():
    texts, topics = topical_texts()
    clusters = topic_clusters(texts, 6, seed=0)
    kept, held = cluster_split(texts, 0.3, seed=0, n_clusters=6)
    assert sorted(kept + held) == list(range(len(texts)))
    assert not {clusters[i] for i in kept} & {clusters[i] for i in held}
    assert len(held) >= 0.3 * len(texts) and kept
    # clusters follow the topics here, so no topic of the test is seen in training
    assert not {topics[i] for i in kept} & {topics[i] for i in held}
    assert cluster_split(texts, 0.3, seed=0, n_clusters=6) == (kept, held)
    assert any(cluster_split(texts, 0.3, seed=s, n_clusters=6)[1] != held for s in range(1, 6))


def test_held_out_clusters_never_takes_every_cluster():
    clusters = [0] * 5 + [1] * 5
    assert len(held_out_clusters(clusters, 0.99, seed=0)) == 1


def test_topic_split_keeps_every_label_in_training():
    texts, topics = topical_texts()
    # a label that lives in one topic only: holding that topic out would take it all
    labels = ["rare" if t == "weather" else "common" for t in topics]
    data = LabeledData(texts, labels, list(range(1, len(texts) + 1)), ["common", "rare"], [],
                       "text", "label")
    for seed in range(4):
        train, val = topic_split(data, 0.3, seed, n_clusters=6)
        assert sorted(train.rows + val.rows) == data.rows
        assert set(train.labels) == {"common", "rare"}
        assert len(val) > 0
