"""Issue 32's levers against topic shift, each on a tiny model: the L2 pull toward the start,
weight averaging of the last evaluations, prefix dropout, and a topic-held-out validation
slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixlab.engine.encode import Encoder, Template, collate
from prefixlab.engine.predict import score_log_likelihoods
from prefixlab.engine.prefix import (
    Prefix,
    PrefixConfig,
    average_prefixes,
    init_prefix,
    prefix_inputs,
)
from prefixlab.engine.train import TrainConfig, batch_loss, kept_slots, train
from prefixlab.errors import ConfigError

from .conftest import sentiment_batch
from .test_topics import topical_texts
from .test_train import toy_task


def _trained(loaded, losses: list[float] | None = None, fast_path: bool = True,
             **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of a prefix trained on the toy task with these TrainConfig settings;
    each step's loss appended to `losses`."""
    texts, labels = toy_task(32)
    enc = Encoder(loaded.tokenizer, Template(), ["negative", "positive"], max_length=48)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    start = prefix.folded()
    cfg = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=8, **settings)
    on_step = None if losses is None else (lambda info: losses.append(info.loss))
    train(loaded.model, prefix, enc.examples(texts, labels), cfg, loaded.tokenizer.pad_token_id,
          on_step=on_step, fast_path=fast_path)
    return start, prefix.folded()


@pytest.fixture
def one_thread():
    """One CPU thread, which switches the thread tuner off: two runs then sum in one order
    and can be compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_start_pull_of_zero_is_todays_run_and_a_pull_stays_nearer_the_start(loaded):
    start, today = _trained(loaded)
    _, zero = _trained(loaded, start_pull=0.0)
    # equal up to float summation order: the CPU thread count a step runs on may differ
    torch.testing.assert_close(zero, today, atol=1e-5, rtol=1e-5)
    _, pulled = _trained(loaded, start_pull=50.0)
    assert (pulled - start).norm() < 0.8 * (today - start).norm()
    with pytest.raises(ConfigError, match="start_pull"):
        TrainConfig(start_pull=-1.0)


def test_prefix_dropout_of_zero_is_todays_run_bit_for_bit(loaded, one_thread):
    today_losses, zero_losses = [], []
    _, today = _trained(loaded, today_losses)
    _, zero = _trained(loaded, zero_losses, prefix_dropout=0.0)
    assert zero_losses == today_losses
    assert torch.equal(zero, today)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"prefix_dropout must be in \[0, 1\)"):
            TrainConfig(prefix_dropout=bad)


def _dropped_at_first_step(p: float, seed: int = 0) -> torch.Tensor:
    keep = kept_slots(4, p, seed, 0)
    assert keep.any() and not keep.all()  # the test needs both kinds of slot
    return keep


def test_prefix_dropout_hides_slots_from_the_loss_and_their_gradient(loaded):
    examples, kv = sentiment_batch(loaded)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    keep = _dropped_at_first_step(0.5)
    kv = kv.detach().requires_grad_()
    masked = batch_loss(loaded.model, kv, batch, keep)
    (grad,) = torch.autograd.grad(masked, kv)
    every_slot = batch_loss(loaded.model, kv.detach(), batch)
    assert float(masked.detach()) != pytest.approx(float(every_slot))
    assert torch.count_nonzero(grad[:, :, :, ~keep]) == 0  # (L, 2, H, dropped, D)
    assert torch.count_nonzero(grad[:, :, :, keep]) > 0
    # hidden slots still count for positions: the rows stay where the prefix expects them
    hid, every = (prefix_inputs(loaded.model, kv, batch.attention_mask, m) for m in (keep, None))
    assert torch.equal(hid["position_ids"], every["position_ids"])
    assert torch.equal(hid["attention_mask"][:, :4], keep.long().expand(len(examples), 4))
    # a training step leaves the dropped slots as they were (AdamW's first step moves by
    # the gradient's sign, none where it is 0) and moves the others
    start, one = _trained(loaded, max_steps=1, prefix_dropout=0.5)
    assert torch.equal(one[:, :, :, ~keep], start[:, :, :, ~keep])
    assert not torch.equal(one[:, :, :, keep], start[:, :, :, keep])
    # and a run's losses are not the run without dropout's (both through autograd)
    plain, dropped = [], []
    _trained(loaded, plain, fast_path=False, max_steps=3)
    _trained(loaded, dropped, max_steps=3, prefix_dropout=0.5)
    assert dropped != pytest.approx(plain)


def test_evaluation_during_prefix_dropout_reads_every_slot(loaded):
    texts, labels = toy_task(32)
    enc = Encoder(loaded.tokenizer, Template(), ["negative", "positive"], max_length=48)
    examples = enc.examples(texts, labels)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    cfg = TrainConfig(learning_rate=1e-2, epochs=1, batch_size=8, eval_every=1,
                      prefix_dropout=0.5)
    gold = [enc.labels.index(y) for y in labels]
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    seen = []

    def evaluate(step: int) -> None:
        kv = prefix.folded()
        val_loss = -float(np.mean(score_log_likelihoods(loaded.model, kv, enc, texts)[
            np.arange(len(texts)), gold]))
        with torch.no_grad():
            every = float(batch_loss(loaded.model, kv, batch))
            hidden = float(batch_loss(loaded.model, kv, batch, kept_slots(4, 0.5, 0, step)))
        seen.append((val_loss, every, hidden))

    train(loaded.model, prefix, examples, cfg, loaded.tokenizer.pad_token_id, evaluate=evaluate)
    assert len(seen) == 4
    for val_loss, every, _ in seen:
        assert val_loss == pytest.approx(every, abs=1e-4)
    assert any(h != pytest.approx(v, abs=1e-3) for v, _, h in seen)


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
