"""Issue 32's levers against topic shift, each on a tiny model: the L2 pull toward the start,
weight averaging of the last evaluations, and a topic-held-out validation slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.prefix import Prefix, PrefixConfig, average_prefixes, init_prefix
from prefixlab.engine.train import TrainConfig, train
from prefixlab.errors import ConfigError

from .test_topics import topical_texts
from .test_train import toy_task


def _trained(loaded, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of a prefix trained on the toy task with these TrainConfig settings."""
    texts, labels = toy_task(32)
    enc = Encoder(loaded.tokenizer, Template(), ["negative", "positive"], max_length=48)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    start = prefix.folded()
    cfg = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=8, **settings)
    train(loaded.model, prefix, enc.examples(texts, labels), cfg, loaded.tokenizer.pad_token_id)
    return start, prefix.folded()


def test_start_pull_of_zero_is_todays_run_and_a_pull_stays_nearer_the_start(loaded):
    start, today = _trained(loaded)
    _, zero = _trained(loaded, start_pull=0.0)
    # equal up to float summation order: the CPU thread count a step runs on may differ
    torch.testing.assert_close(zero, today, atol=1e-5, rtol=1e-5)
    _, pulled = _trained(loaded, start_pull=50.0)
    assert (pulled - start).norm() < 0.8 * (today - start).norm()
    with pytest.raises(ConfigError, match="start_pull"):
        TrainConfig(start_pull=-1.0)


def test_averaging_identical_snapshots_gives_the_snapshot():
    kv = torch.randn(2, 2, 1, 4, 8)
    torch.testing.assert_close(average_prefixes([kv, kv.clone(), kv.clone()]), kv)
    torch.testing.assert_close(average_prefixes([kv, 3 * kv]), 2 * kv)
    with pytest.raises(ValueError, match="one shape"):
        average_prefixes([kv, kv[:1]])
    with pytest.raises(ConfigError, match="average_last"):
        TrainConfig(average_last=0)


def _run(loaded, tmp_path, name: str, texts, labels, **settings):
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import create_run, execute_run, prepare_data

    csv = tmp_path / f"{name}.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in
                                              zip(texts, labels, strict=True)))
    run = {k: v for k, v in settings.items() if k != "training"}
    cfg = RunConfig(train_csv=str(csv), model=loaded.name, max_length=32,
                    prefix={"prefix_length": 4},
                    training={"epochs": 2, "batch_size": 8, "patience": 0, "smoothing": 0,
                              "learning_rate": 5e-2, **settings.get("training", {})}, **run)
    prepared = prepare_data(cfg)
    folder = create_run(cfg, tmp_path / name, prepared, loaded)
    return execute_run(folder, loaded, prepared=prepared), prepared, folder


def test_a_run_averaging_its_last_evaluations_keeps_their_mean(loaded, tmp_path):
    from prefixlab.engine.prefix import load_prefix

    texts, labels = toy_task(40)
    report, _, folder = _run(loaded, tmp_path, "avg", texts, labels,
                             training={"average_last": 3, "keep_best": False})
    steps = report["averaged_steps"]
    assert len(steps) == 3 and steps[-1] == report["kept_step"] == report["steps"]
    want = average_prefixes([folder.load_snapshot(s) for s in steps])
    torch.testing.assert_close(load_prefix(folder.prefix_path).kv, want)
    # averaging one evaluation is the run as it was: the last step's prefix
    one, _, plain = _run(loaded, tmp_path, "one", texts, labels,
                         training={"average_last": 1, "keep_best": False})
    assert "averaged_steps" not in one
    torch.testing.assert_close(load_prefix(plain.prefix_path).kv,
                               plain.load_snapshot(one["steps"]))


def test_a_topic_validation_slice_holds_out_topics_training_never_reads(loaded, tmp_path):
    from prefixlab.data.labeled import load_labeled_csv
    from prefixlab.data.topics import topic_split
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import prepare_data

    texts, topics = topical_texts(per_topic=12)
    labels = ["positive" if i % 3 else "negative" for i in range(len(texts))]
    csv = tmp_path / "topics.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in
                                              zip(texts, labels, strict=True)))
    cfg = RunConfig(train_csv=str(csv), model=loaded.name, validation_split="topics",
                    validation_share=0.3, training={"seed": 1})
    prepared = prepare_data(cfg)
    seen = {topics[r - 1] for r in prepared.train.rows}
    held = {topics[r - 1] for r in prepared.validation.rows}
    assert held and not seen & held
    want = topic_split(load_labeled_csv(csv), 0.3, 1)[1]
    assert prepared.validation.rows == want.rows
    with pytest.raises(ConfigError, match="validation_split"):
        RunConfig(train_csv=str(csv), validation_split="clusters")


def test_a_shift_set_sits_beside_validation_with_a_warning_on_a_gap(loaded, tmp_path):
    from prefixlab.runs.scoring import SHIFT_GAP

    texts, labels = toy_task(40)
    shift = tmp_path / "other_topics.csv"
    # the other side of the toy task's words: every label flipped, a gap for sure
    flipped = ["negative" if y == "positive" else "positive" for y in labels[:24]]
    shift.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in
                                                zip(texts[:24], flipped, strict=True)))
    report, prepared, _ = _run(loaded, tmp_path, "shift", texts, labels,
                               shift_csv=str(shift), training={"epochs": 1})
    got = report["shift"]
    assert got["n"] == 24 and got["validation_macro_f1"] == report["macro_f1"]
    assert got["gap"] == pytest.approx(got["macro_f1"] - report["macro_f1"])
    warned = [w for w in report["warnings"] if w.startswith("macro-F1 on the shift set")]
    assert bool(warned) == (abs(got["gap"]) > SHIFT_GAP)
    # no shift set, no shift report
    plain, _, _ = _run(loaded, tmp_path, "plain", texts, labels, training={"epochs": 1})
    assert "shift" not in plain


def test_an_ensemble_of_one_is_the_run_and_of_two_their_mean(loaded):
    from prefixlab.engine.mixed import ensemble_probs
    from prefixlab.engine.predict import score_labels

    texts, _ = toy_task(6)
    enc = Encoder(loaded.tokenizer, Template(), ["negative", "positive"], max_length=48)
    _, a = _trained(loaded)
    _, b = _trained(loaded, seed=1)
    alone = score_labels(loaded.model, a, enc, texts)
    np.testing.assert_allclose(ensemble_probs(loaded.model, [(a, enc)], texts), alone,
                               atol=1e-5)
    both = ensemble_probs(loaded.model, [(a, enc), (b, enc)], texts)
    np.testing.assert_allclose(both, (alone + score_labels(loaded.model, b, enc, texts)) / 2,
                               atol=1e-5)


def test_a_generation_run_refuses_a_shift_set():
    from prefixlab.runs.config import RunConfig

    with pytest.raises(ConfigError, match="shift_csv"):
        RunConfig(train_csv="pairs.csv", target_column="target", shift_csv="other.csv")
