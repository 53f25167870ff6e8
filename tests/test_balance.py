"""Class imbalance and failure reports: inverse-frequency weights, balanced epochs, calibrated
decisions, the majority baseline, and the warning when a prefix predicts one class."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from prefixlab.data.labeled import LabeledData
from prefixlab.engine.balance import (
    calibrate,
    class_weights,
    content_free_offset,
    epoch_order,
    prior_offset,
)
from prefixlab.engine.encode import collate
from prefixlab.engine.train import TrainConfig, train
from prefixlab.runs.evaluate import classification_report, majority_baseline, prediction_warnings
from tests.test_train import _setup, toy_task


def test_class_weights_are_inverse_frequency():
    labels = [0] * 6 + [1] * 3 + [2] * 1  # 10 rows, 3 classes
    w = class_weights(labels, 3)
    assert w == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    # every class then weighs the same in total: n_k * w_k = n / K
    assert [c * x for c, x in zip([6, 3, 1], w, strict=True)] == pytest.approx([10 / 3] * 3)
    assert class_weights([0, 0, 1, 1], 3) == pytest.approx([4 / 6, 4 / 6, 0.0])  # 2 absent


def test_sampled_epochs_draw_classes_equally_and_deterministically():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    order = epoch_order(labels, "sampled", seed=3, epoch=1)
    assert len(order) == len(labels)
    drawn = Counter(labels[i] for i in order)
    assert all(250 < drawn[k] < 420 for k in range(3)), drawn  # ~333 each
    assert order == epoch_order(labels, "sampled", seed=3, epoch=1)
    assert order != epoch_order(labels, "sampled", seed=3, epoch=2)
    assert epoch_order(labels, "none", seed=3, epoch=1) == list(range(1000))
    assert epoch_order(labels, "weighted", seed=3, epoch=1) == list(range(1000))
    with pytest.raises(ValueError, match="sampled"):
        epoch_order(labels, "bogus", 0, 0)


def test_sampled_training_reads_the_rare_class_more_often(loaded):
    enc, prefix, examples, _, _ = _setup(loaded)  # 3:1 positive:negative
    read = Counter()
    cfg = TrainConfig(epochs=4, batch_size=8, class_balance="sampled", patience=0)

    import prefixlab.engine.train as trainmod

    real = trainmod._backward

    def counting(model, kv, rows, *args):
        read.update(e.label for e in rows)
        return real(model, kv, rows, *args)

    trainmod._backward = counting
    try:
        train(loaded.model, prefix, examples, cfg, 0)
    finally:
        trainmod._backward = real
    negative = enc.labels.index("negative")
    assert sum(read.values()) == 4 * len(examples)
    assert read[negative] / sum(read.values()) > 0.4  # 0.25 without balancing


def test_calibration_offsets_move_the_decision_off_the_prior():
    ll = np.log(np.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]))
    assert calibrate(ll, None).argmax(1).tolist() == [0, 0, 0]
    cf = content_free_offset(np.log(np.array([[0.65, 0.35], [0.65, 0.35]])))
    assert calibrate(ll, cf).argmax(1).tolist() == [0, 1, 0]
    prior = prior_offset([0, 0, 0, 1], 2)
    np.testing.assert_allclose(prior, np.log([0.75, 0.25]))
    assert calibrate(ll, prior).argmax(1).tolist() == [1, 1, 0]
    np.testing.assert_allclose(np.exp(calibrate(ll, prior)).sum(1), 1.0)


def test_majority_baseline_and_warnings_on_degenerate_predictions():
    gold = ["a"] * 80 + ["b"] * 15 + ["c"] * 5
    assert majority_baseline(["b", "a", "a", "c"], 3) == ["a", "a", "a"]
    collapsed = classification_report(gold, ["a"] * 100, ["a", "b", "c"])
    assert collapsed["predicted"] == {"a": 100, "b": 0, "c": 0}
    w = prediction_warnings(collapsed)
    assert any("'a' for 100%" in x and "collapsed" in x for x in w)
    assert any("never predicts 'b'" in x for x in w) and any("never predicts 'c'" in x for x in w)
    rare_missed = classification_report(gold, ["a"] * 40 + ["b"] * 60, ["a", "b", "c"])
    assert prediction_warnings(rare_missed) == [
        "the prefix never predicts 'c', which is 5% of the rows (5): its recall is 0"]
    fine = classification_report(gold, gold, ["a", "b", "c"])
    assert prediction_warnings(fine) == []


def test_a_prefix_that_predicts_one_class_is_reported_as_collapsed(loaded):
    from prefixlab.runs.scoring import full_report

    enc, prefix, _, _, _ = _setup(loaded)
    texts, _ = toy_task(48)
    only_positive = enc.examples(texts, ["positive"] * len(texts))
    train(loaded.model, prefix, only_positive,
          TrainConfig(learning_rate=1e-1, epochs=3, batch_size=8, patience=0), 0)
    val_texts, val_labels = toy_task(40, seed=1)
    data = LabeledData(val_texts, val_labels, list(range(1, 41)), ["negative", "positive"], [],
                       "text", "label")
    train_data = LabeledData(texts, ["positive"] * 47 + ["negative"], list(range(1, 49)),
                             ["negative", "positive"], [], "text", "label")
    report = full_report(loaded, prefix.folded(), enc, train_data, data, seed=0)
    assert report["predicted"]["positive"] >= 38  # (nearly) all rows
    assert any("predicts 'positive' for" in w and "collapsed" in w for w in report["warnings"])
    assert report["baselines"]["majority"]["predicted"] == {"negative": 0, "positive": 40}


def _per_token_losses(model, kv, batch):
    from prefixlab.engine.prefix import forward

    logits = forward(model, kv, batch.input_ids, batch.attention_mask, batch.loss_mask)
    return torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="none")


@pytest.mark.parametrize("fast", [False, True])
def test_weighted_loss_is_the_weighted_mean_of_token_losses_on_both_paths(loaded, fast):
    """The class-weighted loss, through autograd or the family's fast step, is
    sum(w_i * loss_i) / sum(w_i), and so is its gradient."""
    from prefixlab.engine.families import family_of
    from prefixlab.engine.train import batch_loss

    from .conftest import loss_and_grad, sentiment_batch

    examples, kv = sentiment_batch(loaded)
    weights = class_weights([e.label for e in examples], 2)
    weighted = [replace(e, weight=weights[e.label]) for e in examples]
    assert len(set(weights)) == 2  # the six rows are not balanced: the weights differ
    batch = collate(weighted, loaded.tokenizer.pad_token_id)
    w = batch.weights
    assert w is not None and collate(examples, loaded.tokenizer.pad_token_id).weights is None

    def manual(model, kv, batch):
        return (_per_token_losses(model, kv, batch) * w).sum() / w.sum()

    fn = family_of(loaded.model.config).fast_training_loss(loaded.model) if fast else None
    if fast and fn is None:
        pytest.skip("no fast step for this family")
    want = loss_and_grad(manual, loaded.model, kv, batch)
    got = loss_and_grad(fn or batch_loss, loaded.model, kv, batch)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    plain = loss_and_grad(fn or batch_loss, loaded.model, kv,
                          collate(examples, loaded.tokenizer.pad_token_id))
    assert not torch.allclose(plain[0], got[0])  # the weights do change the loss


def test_weighted_chunks_add_up_to_the_whole_batch(loaded):
    """Read in small chunks, a weighted batch has the loss and gradient of one chunk."""
    from prefixlab.engine.train import _backward

    from .conftest import sentiment_batch

    examples, kv = sentiment_batch(loaded)
    weights = class_weights([e.label for e in examples], 2)
    weighted = [replace(e, weight=weights[e.label]) for e in examples]
    pad = loaded.tokenizer.pad_token_id
    grads = []
    for max_tokens in (10_000, 8):
        leaf = kv.detach().clone().requires_grad_()
        loss, _, _ = _backward(loaded.model, leaf, weighted, pad, torch.device("cpu"), max_tokens)
        grads.append((loss, leaf.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)


def test_weighted_training_on_balanced_labels_is_plain_training(loaded):
    """With every class equally frequent the weights are all 1: the same run (up to the
    rounding of a thread count the tuner may pick differently under load)."""
    enc, _, _, texts, labels = _setup(loaded)
    keep = [i for i, y in enumerate(labels) if y == "negative"][:8]
    keep += [i for i, y in enumerate(labels) if y == "positive"][:8]
    examples = enc.examples([texts[i] for i in keep], [labels[i] for i in keep])
    results = []
    for balance in ("none", "weighted"):
        _, prefix, _, _, _ = _setup(loaded)
        train(loaded.model, prefix, examples, TrainConfig(epochs=2, batch_size=4, patience=0,
                                                          class_balance=balance), 0)
        results.append(prefix.folded())
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_label_rule_prior_and_per_token_mean():
    from prefixlab.engine.balance import LabelRule, label_rule

    # the prefix learned a 9:1 prior: argmax says "common" where the likelihood ratio
    # is below the prior ratio; prior correction decides on the evidence
    ll = np.log(np.array([[0.8, 0.2], [0.95, 0.05]]))
    raw = label_rule("raw", "sum", ["common", "rare"], [[1], [2]], {"common": 9, "rare": 1})
    prior = label_rule("prior", "sum", ["common", "rare"], [[1], [2]], {"common": 9, "rare": 1})
    assert raw.offset is None and raw.probs(ll).argmax(1).tolist() == [0, 0]
    assert raw.train_prior == pytest.approx((np.log(0.9), np.log(0.1)))  # for adapted_rule
    assert prior.offset == pytest.approx((np.log(0.9), np.log(0.1)))
    assert prior.probs(ll).argmax(1).tolist() == [1, 0]  # 0.8/0.2 < 9/1 < 0.95/0.05
    np.testing.assert_allclose(prior.probs(ll).sum(1), 1.0)
    # without training counts (an imported adapter) the rule is raw
    assert label_rule("prior", "sum", ["a", "b"], [[1], [2]], None) == LabelRule()
    # a three-token label loses on its summed log-likelihood, wins per token
    ll3 = np.array([[-2.0, -4.5]])  # "yes" (1 token), "not at all" (3 tokens)
    mean = label_rule("raw", "mean", ["yes", "not at all"], [[5], [6, 7, 8]], None)
    assert mean.lengths == (1, 3)
    assert raw.probs(ll3).argmax(1).tolist() == [0] and mean.probs(ll3).argmax(1).tolist() == [1]


def test_run_configs_carry_the_decision_rule_and_old_runs_keep_raw(tokenizer):
    from prefixlab.errors import ConfigError
    from prefixlab.runs.config import RunConfig

    cfg = RunConfig(train_csv="x.csv")
    assert cfg.decision == "fitted" and cfg.label_scores == "sum"
    old = cfg.to_dict()
    del old["decision"], old["label_scores"]  # a config.json written before they existed
    assert RunConfig.from_dict(old).decision == "raw"
    assert RunConfig.from_dict(cfg.to_dict()).decision == "fitted"
    with pytest.raises(ConfigError, match="decision must be one of fitted, prior, raw"):
        RunConfig(train_csv="x.csv", decision="bayes")
    enc = cfg.label_encoder(tokenizer, ["negative", "positive"], {"negative": 3, "positive": 1})
    assert enc.rule.offset == pytest.approx((np.log(0.75), np.log(0.25)))


def test_predictions_and_reports_follow_the_runs_decision_rule(loaded, tmp_path):
    """A run trained on 3:1 labels: its report, Run.score and mixed scoring all decide by
    the prior-corrected scores, and those are the raw scores less the log prior."""
    from prefixlab.engine.mixed import ScoreItem, mixed_score_labels
    from prefixlab.engine.predict import score_log_likelihoods
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import create_run, execute_run, prepare_data
    from prefixlab.runs.finished import open_run

    texts, labels = toy_task(40)
    csv = tmp_path / "toy.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in
                                              zip(texts, labels, strict=True)))
    cfg = RunConfig(train_csv=str(csv), model=loaded.name, max_length=32, decision="prior",
                    prefix={"prefix_length": 4},
                    training={"epochs": 1, "batch_size": 8, "patience": 0})
    prepared = prepare_data(cfg)
    folder = create_run(cfg, tmp_path / "run", prepared, loaded)
    report = execute_run(folder, loaded, prepared=prepared)
    assert report["decision"] == "prior" and report["label_scores"] == "sum"
    run = open_run(tmp_path / "run", loaded)
    # the bare model's baseline decides on its own scores, without the training prior
    bare = score_log_likelihoods(loaded.model, None, run.encoder, prepared.validation.texts)
    picked = Counter(run.labels[i] for i in bare.argmax(1))
    assert report["baselines"]["zero_shot"]["predicted"] == {y: picked[y] for y in run.labels}
    counts = prepared.train.label_counts()
    want_offset = np.log(np.array([counts[y] for y in run.labels]) / sum(counts.values()))
    assert run.encoder.rule.offset == pytest.approx(tuple(want_offset))
    ll = score_log_likelihoods(loaded.model, run.kv, run.encoder, texts[:6])
    want = np.exp(ll - want_offset)
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(run.score(texts[:6]), want, rtol=1e-6)
    mixed = mixed_score_labels(loaded.model, [ScoreItem(run.kv, run.encoder, t)
                                              for t in texts[:6]])
    np.testing.assert_allclose(np.stack(mixed), want, rtol=1e-4, atol=1e-6)


def _skewed_scores(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of a model that learned the evidence and half the training skew: the rare label
    is 10% of the rows, and the scores favour the common one by half its log prior ratio."""
    rng = np.random.default_rng(seed)
    gold = (rng.random(n) < 0.1).astype(int)
    prior = np.log(np.array([0.9, 0.1]))
    scores = rng.normal(0.0, 1.0, (n, 2))
    scores[np.arange(n), gold] += 2.0  # the evidence
    scores += 0.5 * prior[None, :]  # the skew it carries: half the prior
    return scores, gold, prior


def test_fit_prior_scale_keeps_the_strength_with_the_best_validation_macro_f1():
    from prefixlab.engine.balance import FIT_SCALES, fit_prior_scale

    def f1(scores: np.ndarray, gold: np.ndarray, offset: np.ndarray) -> float:
        return classification_report(gold, (scores - offset).argmax(1), [0, 1])["macro_f1"]

    for seed in range(3):
        scores, gold, prior = _skewed_scores(seed)
        scale = fit_prior_scale(scores, gold, prior)
        assert scale in FIT_SCALES
        # the scores carry half the skew: the full correction over-predicts the rare label
        assert scale < 1.0 and f1(scores, gold, scale * prior) > f1(scores, gold, prior)
        assert f1(scores, gold, scale * prior) == max(f1(scores, gold, a * prior)
                                                      for a in FIT_SCALES)


def test_fit_prior_scale_needs_enough_rows_of_every_label_and_breaks_ties_towards_1():
    from prefixlab.engine.balance import MIN_FIT_ROWS, fit_prior_scale

    scores, gold, prior = _skewed_scores(n=600)
    rare = np.flatnonzero(gold == 1)
    keep = np.r_[np.flatnonzero(gold == 0), rare[:MIN_FIT_ROWS - 1]]
    assert fit_prior_scale(scores[keep], gold[keep], prior) is None  # too few rare rows
    # balanced labels and a flat prior: every strength decides alike, so the tie goes to 1
    flat = np.log(np.array([0.5, 0.5]))
    assert fit_prior_scale(scores, gold, flat) == 1.0


def test_fit_offsets_never_does_worse_than_where_it_starts():
    from prefixlab.engine.balance import fit_offsets

    scores, gold, prior = _skewed_scores(seed=3)
    offset = fit_offsets(scores, gold, prior)
    assert offset.shape == (2,) and offset[0] == prior[0]  # label 0 stays where it was

    def f1(o: np.ndarray) -> float:
        return classification_report(gold, (scores - o).argmax(1), [0, 1])["macro_f1"]

    assert f1(offset) >= f1(prior) and f1(offset) > f1(np.zeros(2))


def _fitted_run(loaded, tmp_path, n: int):
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import create_run, execute_run, prepare_data

    texts, labels = toy_task(n)
    csv = tmp_path / f"toy{n}.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in
                                              zip(texts, labels, strict=True)))
    cfg = RunConfig(train_csv=str(csv), model=loaded.name, max_length=32, decision="fitted",
                    max_eval_examples=None, prefix={"prefix_length": 4},
                    training={"epochs": 1, "batch_size": 16, "patience": 0})
    prepared = prepare_data(cfg)
    folder = create_run(cfg, tmp_path / f"run{n}", prepared, loaded)
    return execute_run(folder, loaded, prepared=prepared), prepared, folder


def test_a_fitted_decision_is_fitted_on_validation_and_used_wherever_the_run_decides(
        loaded, tmp_path):
    """decision="fitted": the prior strength that decides best on the validation rows is in
    the report and config.json, and the report, Run.score and the server decide with it."""
    from prefixlab.engine.balance import FIT_SCALES, LabelRule, describe_decision, prior_from_counts
    from prefixlab.engine.predict import score_log_likelihoods
    from prefixlab.runs.finished import open_run
    from prefixlab.serve.store import PrefixStore

    report, prepared, folder = _fitted_run(loaded, tmp_path, 480)  # 24 negative validation rows
    fit = report["decision_fit"]
    assert fit["prior_scale"] in FIT_SCALES and fit["validation_rows"] == len(prepared.validation)
    assert fit["macro_f1"] >= fit["macro_f1_full_prior"]
    assert folder.read_config()["data"]["prior_scale"] == fit["prior_scale"]
    run = open_run(folder.path, loaded)
    counts = prepared.train.label_counts()
    prior = prior_from_counts([counts[y] for y in run.labels])
    assert run.encoder.rule.offset == pytest.approx(tuple(fit["prior_scale"] * prior))
    # the report's numbers are those of the fitted rule on the kept prefix
    val = prepared.validation
    ll = score_log_likelihoods(loaded.model, run.kv, run.encoder, val.texts)
    pred = [run.labels[i] for i in (LabelRule().log_probs(ll)
                                    - fit["prior_scale"] * prior).argmax(1)]
    assert report["macro_f1"] == pytest.approx(
        classification_report(val.labels, pred, run.labels)["macro_f1"])
    assert report["macro_f1"] == pytest.approx(fit["macro_f1"])
    served = PrefixStore(loaded).get(str(folder.path))
    assert served.encoder.rule == run.encoder.rule
    assert f"Decisions subtract {fit['prior_scale']:.1f} ×" in describe_decision(report)


def test_a_fitted_decision_keeps_the_full_prior_when_validation_is_too_small(loaded, tmp_path):
    from prefixlab.engine.balance import describe_decision
    from prefixlab.runs.finished import open_run

    report, prepared, folder = _fitted_run(loaded, tmp_path, 80)  # 4 negative validation rows
    fit = report["decision_fit"]
    assert fit["prior_scale"] is None and fit["too_few"] == {"negative": 4, "positive": 12}
    assert "prior_scale" not in folder.read_config()["data"]
    counts = prepared.train.label_counts()
    run = open_run(folder.path, loaded)
    assert run.encoder.rule.offset == pytest.approx(
        tuple(np.log([counts[y] / sum(counts.values()) for y in run.labels])))
    assert "not fitted" in describe_decision(report) and "negative (4)" in describe_decision(report)


def _posteriors(prior: np.ndarray, means: np.ndarray, n: int, seed: int,
                train_prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn with label prior `prior` from unit Gaussians at `means` (1-D), and their
    exact log posteriors under `train_prior`: calibrated scores of a model trained there."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(len(prior), size=n, p=prior)
    x = rng.normal(means[gold], 1.0)
    log_lik = -0.5 * (x[:, None] - means[None, :]) ** 2  # (N, K), up to a constant
    return log_lik + np.log(train_prior)[None, :], gold


def test_em_prior_recovers_a_known_shifted_prior():
    from prefixlab.engine.balance import em_prior

    train = np.array([0.5, 0.3, 0.2])
    shifted = np.array([0.1, 0.2, 0.7])
    ll, _ = _posteriors(shifted, np.array([-2.0, 0.0, 2.0]), 20_000, 0, train)
    np.testing.assert_allclose(em_prior(ll, np.log(train)), shifted, atol=0.02)
    # no shift: the training prior comes back
    same, _ = _posteriors(train, np.array([-2.0, 0.0, 2.0]), 20_000, 1, train)
    np.testing.assert_allclose(em_prior(same, np.log(train)), train, atol=0.02)


def test_adapted_rule_decides_by_the_estimated_prior():
    from prefixlab.engine.balance import LabelRule, adapted_rule, label_rule

    train, shifted = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    ll, gold = _posteriors(shifted, np.array([-1.0, 1.0]), 5_000, 2, train)
    raw = label_rule("raw", "sum", ["a", "b"], [[1], [2]], {"a": 50, "b": 50})
    em = adapted_rule(raw, ll, "em")
    # the Saerens posterior: log p_train(y|x) - log 0.5 + log 0.9 (and 0.1)
    estimated = np.exp(np.log(train) - np.asarray(em.offset))
    np.testing.assert_allclose(estimated, shifted, atol=0.02)
    accuracy = {r: float((r.probs(ll).argmax(1) == gold).mean()) for r in (raw, em)}
    assert accuracy[em] > accuracy[raw] + 0.03  # Bayes under the true prior beats the old one
    # a full prior correction is prior-free: re-estimating the prior leaves its decisions
    prior = label_rule("prior", "sum", ["a", "b"], [[1], [2]], {"a": 50, "b": 50})
    np.testing.assert_allclose(adapted_rule(prior, ll, "em").offset, prior.offset)
    assert adapted_rule(raw, ll, "none") is raw
    # batch calibration: the average prediction over the rows becomes uniform-ish
    batch = adapted_rule(LabelRule(), ll, "batch")
    assert abs(batch.probs(ll).mean(0)[0] - 0.5) < abs(LabelRule().probs(ll).mean(0)[0] - 0.5)
