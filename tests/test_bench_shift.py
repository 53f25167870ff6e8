"""bench.shift's splits: the shifted test's topics are held out of the pool and the
in-distribution test, reproducibly."""

from __future__ import annotations

import pandas as pd

from prefixlab.bench.shift import VARIANTS, markdown_table, topic_split_frame
from prefixlab.data.topics import topic_clusters

from .test_topics import topical_texts


def test_topic_split_frame_keeps_shifted_topics_out_of_training_and_is_reproducible():
    texts, topics = topical_texts(per_topic=60)
    frame = pd.DataFrame({"text": texts, "label": ["a" if i % 2 else "b" for i in
                                                   range(len(texts))], "topic": topics})
    frame = frame.drop_duplicates("text").reset_index(drop=True)
    pool, in_test, shifted = topic_split_frame(frame, test_rows=40)
    clusters = dict(zip(frame["text"], topic_clusters(frame["text"].tolist(), 12, 0),
                        strict=True))
    seen = {clusters[t] for t in pd.concat([pool, in_test])["text"]}
    assert not seen & {clusters[t] for t in shifted["text"]}
    assert len(in_test) <= 40 and len(shifted) <= 40 and len(pool) > 0
    again = topic_split_frame(frame, test_rows=40)
    assert all(a.equals(b) for a, b in zip(again, (pool, in_test, shifted), strict=True))


def test_every_variant_overrides_known_settings_and_the_table_has_a_row_per_variant():
    from prefixlab.bench.quality import _apply
    from prefixlab.runs.config import RunConfig

    for overrides in VARIANTS.values():
        _apply(RunConfig(train_csv="x.csv"), overrides)
    score = {"macro_f1": 0.5, "accuracy": 0.5, "missed": []}
    row = {"case": "c", "n": 10, "seed": 0, "val_macro_f1": 0.6, "kept_step": 3, "steps": 4,
           "drift": 0.1, **{f"{side}_{how}": score for side in ("in", "shift")
                            for how in ("none", "em", "batch")},
           **{f"{who}_{side}": score for who in ("tfidf", "bare") for side in ("in", "shift")}}
    table = markdown_table([{**row, "variant": v,
                             "learning_rate": 0.01 if v == "default" else None}
                            for v in VARIANTS])
    assert len(table.splitlines()) == 2 + len(VARIANTS)
    assert "| c | default (kept lr 0.01) | 1 |" in table
