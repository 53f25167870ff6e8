"""The quality benchmark's splits: fixed, stratified, and never a near-duplicate on both sides."""

from __future__ import annotations

import pandas as pd

from prefixlab.bench.quality import fixed_split, group_key, markdown_table, sample_rows, summarize


def _frame() -> pd.DataFrame:
    rows = []
    for i in range(300):
        label = "disaster" if i % 3 == 0 else "calm"
        rows.append((f"tweet number {i} about {label}", label))
        if i % 10 == 0:  # retweets of the same text, with a link and a mention
            rows.append((f"RT @someone: tweet number {i} about {label} http://t.co/x{i}", label))
    return pd.DataFrame(rows, columns=["text", "label"])


def test_near_duplicates_share_a_key():
    assert group_key("RT @a: Fire in the hills! http://t.co/1") == group_key("fire in the HILLS")
    assert group_key("fire in the hills") != group_key("fire in the valley")


def test_fixed_split_is_stratified_seeded_and_keeps_groups_on_one_side():
    frame = _frame()
    pool, test = fixed_split(frame, test_rows=60)
    test_keys = set(test["text"].map(group_key))
    assert len(test) == len(test_keys) == 60  # one row per group in the test
    assert set(pool["text"].map(group_key)).isdisjoint(test_keys)
    assert len(pool) == sum(group_key(t) not in test_keys for t in frame["text"])
    assert test["label"].value_counts().to_dict() == {"calm": 40, "disaster": 20}
    again, test_again = fixed_split(frame, test_rows=60)
    assert test_again.equals(test) and again.equals(pool)
    rows = sample_rows(pool, 30, seed=1)
    assert len(rows) == 30 and rows["label"].value_counts().to_dict() == {"calm": 20,
                                                                         "disaster": 10}


def test_summary_line_counts_wins_and_missed_classes():
    def row(prefix, tfidf, missed=()):
        m = {"macro_f1": prefix, "accuracy": 0.5, "missed": list(missed)}
        base = {"macro_f1": tfidf, "accuracy": 0.5, "missed": []}
        return {"prefix": m, "prefix_raw": m, "prefix_content_free": m, "prefix_prior": m,
                "tfidf": base,
                "majority": base, "zero_shot": base, "train_s": 100.0}

    line = summarize([row(0.7, 0.6), row(0.5, 0.6, ["hate"])])
    assert line.startswith("quality: cases=2 prefix_beats_tfidf=1/2 prefix_f1=0.600")
    assert "missed_classes=1" in line and "max_train_s=100" in line


def test_markdown_table_averages_seeds_per_case():
    def row(case, seed, prefix, tfidf, missed=()):
        m = {"macro_f1": prefix, "accuracy": 0.8, "missed": list(missed)}
        base = {"macro_f1": tfidf, "accuracy": 0.7, "missed": []}
        return {"case": case, "n": 300, "seed": seed, "prefix": m, "prefix_raw": base,
                "tfidf": base, "majority": base, "zero_shot": base, "train_s": 60.0 + seed,
                "kept_step": 10, "steps": 20}

    full = {**row("disaster", 0, 0.70, 0.74), "n": 100000, "train_rows": 5900}
    table = markdown_table([row("davidson", 0, 0.6, 0.5), row("davidson", 1, 0.4, 0.5, ["hate"]),
                            row("polarity", 0, 0.7, 0.6), full])
    lines = table.splitlines()
    assert len(lines) == 5  # header, rule, one line per case
    # the rows the case used, and TF-IDF in bold where it wins
    assert lines[4].startswith("| disaster | 5900 | 1 | 0.700 | 0.740 | **0.740** |")
    assert lines[2].startswith("| davidson | 300 | 2 | **0.500 (0.40–0.60)** |")
    assert "| 1/2 |" in lines[2] and lines[2].endswith("| hate |")
    assert lines[3].startswith("| polarity | 300 | 1 | **0.700** |") and "none |" in lines[3]


def test_preset_overrides_apply_a_preset_but_keep_each_cases_seed():
    from prefixlab.bench.quality import _apply, preset_overrides
    from prefixlab.runs.config import RunConfig

    cfg = RunConfig(train_csv="x.csv")
    cfg.training.seed = 2
    _apply(cfg, preset_overrides("balanced"))
    assert (cfg.max_train_examples, cfg.max_eval_examples, cfg.training.max_minutes,
            cfg.training.seed) == (2000, 300, 10, 2)


def test_a_case_reports_every_decision_rule_and_keeps_its_scores(tmp_path):
    """One case end to end on a tiny model: the row holds each rule's test macro-F1 (the
    fitted ones from the validation rows) and --scores keeps what they were computed from."""
    import numpy as np
    import torch

    from prefixlab.bench.quality import Case, run_case
    from prefixlab.engine.models import prepare_model
    from tests.conftest import make_tokenizer, tiny_model
    from tests.test_train import toy_task

    loaded = prepare_model(tiny_model("gpt2"), make_tokenizer(), "tiny-gpt2",
                           torch.device("cpu"))
    texts, labels = toy_task(60)
    frame = pd.DataFrame({"text": texts, "label": labels})
    case = Case("toy", frame.iloc[:40], frame.iloc[40:], 40, 0)
    overrides = {"model": "tiny-gpt2", "max_length": 32, "prefix.prefix_length": 4,
                 "training.epochs": 1, "training.batch_size": 8}
    row = run_case(case, loaded, tmp_path, overrides, {}, tmp_path / "scores")
    for rule in ("raw", "content_free", "prior", "fitted", "offsets"):
        assert 0.0 <= row[f"prefix_{rule}"]["macro_f1"] <= 1.0
    # 8 validation rows are too few to fit on: both fitted rules fall back to the prior
    assert row["prior_scale"] is None
    assert row["prefix_fitted"] == row["prefix_offsets"] == row["prefix_prior"]
    saved = np.load(tmp_path / "scores" / "toy_40_0.npz", allow_pickle=False)
    assert saved["test_ll"].shape == (20, 2) and saved["val_ll"].shape == (8, 2)
    assert list(saved["labels"]) == sorted(set(labels))
    assert saved["test_gold"].tolist() == [sorted(set(labels)).index(y) for y in labels[40:]]
