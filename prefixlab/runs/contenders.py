"""Training the methods a comparison (compare.py) sets against a prefix, on the data, encoder
and stopping rule the prefix run uses.

- prompt, lora, ia3, full: `engine.train.train` on the method's `Trainable`, evaluated on the
  validation rows as a run is (score_rows, report_from_scores), the step kept by the same
  EarlyStopping, the decision rule fitted as a run fits it; on a generation run's pairs
  (train_generation), the run's PairEncoder, its validation loss and its decoding settings;
- probe: logistic regression on the frozen model's last-token hidden state after the prompt
  (the run's template), its C chosen on the validation rows;
- tfidf: the run's TF-IDF baseline (evaluate.fit_tfidf).

Each returns a `Contender`: what the comparison scores further rows with, plus its figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from prefixlab.data.labeled import LabeledData
from prefixlab.data.pairs import TextPairs
from prefixlab.engine.encode import Encoder
from prefixlab.engine.methods import METHODS, Trainable, build_trainable
from prefixlab.engine.models import LoadedModel
from prefixlab.engine.stopping import EarlyStopping
from prefixlab.engine.train import StepInfo, train
from prefixlab.runs.config import RunConfig
from prefixlab.runs.evaluate import classification_report, fit_tfidf
from prefixlab.runs.generation import live_scores, pair_encoder, pair_scores
from prefixlab.runs.scoring import fit_decision, report_from_scores, score_rows

PROBE_C = (0.01, 0.1, 1.0, 10.0)
"""Inverse regularization strengths the probe tries; validation macro-F1 picks one."""


@dataclass
class Contender:
    """A trained method: `predict(data)` gives its report on labeled rows (the same labels),
    or on a generation run's pairs its figures (generation.pair_scores)."""

    predict: Callable[[LabeledData], dict] | Callable[[TextPairs], dict]
    validation: dict  # its report on the validation rows, by the kept step / chosen setting
    trainable_parameters: int
    stored_bytes: int
    kept_step: int | None = None
    steps: int = 0
    train_s_to_kept: float = 0.0
    train_s: float = 0.0
    examples_seen: int = 0
    stop_reason: str = ""
    settings: dict = field(default_factory=dict)
    trainable: Trainable | None = None  # a gradient method's weights, for saving
    bare: dict | None = None
    """The bare model's figures on the validation pairs when the method's run already has
    them (a generation prefix run's report), so the comparison need not decode them again."""


def _report(data: LabeledData, predicted: Sequence[str], labels: Sequence[str]) -> dict:
    return classification_report(data.labels, list(predicted), list(labels))


class _Keeper:
    """The evaluate callback of a gradient method: scores the validation rows by `score(kv)`
    (the stopping rule's record, and what else to keep of the step), feeds the stopping rule
    and keeps the weights of every step it may still keep (the kept one and the last
    `smoothing` + 1, whose smoothed scores can still change)."""

    def __init__(self, trainable: Trainable, rule: EarlyStopping,
                 score: Callable[[torch.Tensor | None], tuple[dict, object]]) -> None:
        self.trainable, self.rule, self.score = trainable, rule, score
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.scores: dict[int, object] = {}  # classification: label log-likelihoods (N, K)

    def key_values(self) -> torch.Tensor | None:
        with torch.no_grad():
            kv = self.trainable.key_values()
        return None if kv is None else kv.detach().float()

    def __call__(self, step: int) -> str | None:
        record, kept = self.score(self.key_values())
        self.rule.update(step, record)
        self.states[step] = self.trainable.state()
        self.scores[step] = kept
        recent = [s for s, _ in self.rule.history[-(self.rule.smoothing + 1):]]
        keep = {self.rule.kept_step, *recent}
        for s in [s for s in self.states if s not in keep]:
            del self.states[s], self.scores[s]
        return self.rule.reason() if self.rule.exhausted else None


@dataclass
class _Fitted:
    """A gradient method after training, its weights those of the kept step."""

    trainable: Trainable
    keeper: _Keeper
    learning_rate: float
    kept: int
    steps: int
    kept_s: float
    train_s: float
    examples_seen: int
    stop_reason: str


def _fit(name: str, cfg: RunConfig, loaded: LoadedModel, examples: Sequence,
         init_ids: Sequence[int],
         score: Callable[[Trainable], Callable[[torch.Tensor | None], tuple[dict, object]]],
         on_step: Callable[[StepInfo], None] | None,
         should_stop: Callable[[], bool] | None) -> _Fitted | None:
    """Train method `name` on `examples` as the run `cfg` would train its prefix, evaluated
    by `score(trainable)` (the validation scorer of the method's model); None when
    `should_stop` ended it."""
    method = METHODS[name]
    tc = replace(cfg.training, learning_rate=method.learning_rate or cfg.training.learning_rate,
                 checkpoint_every=0)
    trainable = build_trainable(name, loaded, prompt_ids=init_ids,
                                prompt_length=cfg.prefix.prefix_length, seed=tc.seed)
    rule = EarlyStopping(monitor=tc.monitor, patience=tc.patience, smoothing=tc.smoothing)
    keeper = _Keeper(trainable, rule, score(trainable))
    elapsed: dict[int, float] = {0: 0.0}

    def heard(info: StepInfo) -> None:
        elapsed[info.step] = info.elapsed_s
        if on_step is not None:
            on_step(info)

    # the prompt changes nothing in the model: the family's fast step still applies
    result = train(trainable.model, trainable, examples, tc, loaded.tokenizer.pad_token_id,
                   on_step=heard, should_stop=should_stop, evaluate=keeper,
                   fast_path=name == "prompt")
    if result.stopped:
        return None
    kept = rule.kept_step if tc.keep_best and rule.kept_step is not None else result.steps
    if kept not in keeper.states:  # the last step, never evaluated (a zero-step budget)
        keeper(kept)
    trainable.restore(keeper.states[kept])
    seen = sum(min(tc.batch_size, len(examples)) for _ in range(result.steps))
    return _Fitted(trainable, keeper, tc.learning_rate, kept, result.steps,
                   elapsed.get(kept, result.elapsed_s), result.elapsed_s, seen, result.reason)


def _contender(fitted: _Fitted, predict: Callable, validation: dict,
               settings: dict) -> Contender:
    t = fitted.trainable
    return Contender(predict, validation, t.trainable_parameters(), t.stored_bytes(),
                     fitted.kept, fitted.steps, fitted.kept_s, fitted.train_s,
                     fitted.examples_seen, fitted.stop_reason, settings, t)


def train_gradient(name: str, cfg: RunConfig, loaded: LoadedModel, train_data: LabeledData,
                   validation: LabeledData, labels: list[str], init_ids: Sequence[int], *,
                   on_step: Callable[[StepInfo], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Contender | None:
    """Train prompt tuning, LoRA, IA3 or full fine-tuning as the run `cfg` would train its
    prefix; None when `should_stop` ended it."""
    counts = train_data.label_counts()
    encoder = cfg.label_encoder(loaded.tokenizer, labels, counts)

    def scorer(trainable: Trainable):
        reader = replace(loaded, model=trainable.model)

        def score(kv: torch.Tensor | None) -> tuple[dict, np.ndarray]:
            ll = score_rows(reader, kv, encoder, validation)
            report = report_from_scores(encoder, validation, ll)
            return {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
                    "val_loss": report["loss"]}, ll
        return score

    fitted = _fit(name, cfg, loaded, encoder.examples(train_data.texts, train_data.labels),
                  init_ids, scorer, on_step, should_stop)
    if fitted is None:
        return None
    ll = fitted.keeper.scores[fitted.kept]
    settings = {"learning_rate": fitted.learning_rate, **METHODS[name].settings}
    if cfg.decision == "fitted":
        fit = fit_decision(encoder, validation, ll, counts)
        if fit["prior_scale"] is not None:
            encoder = cfg.label_encoder(loaded.tokenizer, labels, counts, fit["prior_scale"])
        settings["prior_scale"] = fit["prior_scale"]
    reader = replace(loaded, model=fitted.trainable.model)
    kv = fitted.keeper.key_values()

    def predict(data: LabeledData) -> dict:
        return report_from_scores(encoder, data, score_rows(reader, kv, encoder, data))

    return _contender(fitted, predict, report_from_scores(encoder, validation, ll), settings)


def train_generation(name: str, cfg: RunConfig, loaded: LoadedModel, train_pairs: TextPairs,
                     validation: TextPairs, init_ids: Sequence[int], *,
                     on_step: Callable[[StepInfo], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Contender | None:
    """Train prompt tuning, LoRA, IA3 or full fine-tuning on input -> target pairs as a
    generation run trains its prefix: the run's PairEncoder, evaluated as the run evaluates
    (generation.live_scores: the validation loss the stopping rule reads, and a live BLEU on
    a few inputs, so each evaluation costs what the prefix's does); None when `should_stop`
    ended it. Its predictions decode with the method's model (LoRA, IA3, full: the trained
    copy, no key/values; prompt tuning: the frozen model after the prompt's key/values) and
    `cfg.generation`, the same settings for every method."""
    encoder = pair_encoder(loaded.tokenizer, cfg)

    def scorer(trainable: Trainable):
        def score(kv: torch.Tensor | None) -> tuple[dict, None]:
            return live_scores(trainable.model, encoder, kv, validation, cfg), None
        return score

    fitted = _fit(name, cfg, loaded, encoder.examples(train_pairs.inputs, train_pairs.targets),
                  init_ids, scorer, on_step, should_stop)
    if fitted is None:
        return None
    model, kv = fitted.trainable.model, fitted.keeper.key_values()

    def predict(pairs: TextPairs) -> dict:
        return pair_scores(model, encoder, kv, pairs, cfg.generation)

    return _contender(fitted, predict, predict(validation),
                      {"learning_rate": fitted.learning_rate, **METHODS[name].settings})


@torch.inference_mode()
def last_token_states(loaded: LoadedModel, encoder: Encoder, texts: Sequence[str],
                      batch_size: int = 16) -> np.ndarray:
    """The final layer's hidden state (after the model's last norm) at the prompt's last
    token, for each text: (N, E) float32. The prompt is the run's template around the text."""
    prompts = encoder.prompts(texts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = loaded.tokenizer.pad_token_id
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
            mask[r, :len(prompts[i])] = 1
        hidden = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(
            loaded.device), output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        last = mask.sum(1) - 1  # (B,) each row's last real token
        states = hidden[torch.arange(len(idx)), last.to(hidden.device)].float().cpu().numpy()
        if out is None:
            out = np.zeros((len(prompts), states.shape[1]), dtype=np.float32)
        out[idx] = states  # (B, E)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def train_probe(cfg: RunConfig, loaded: LoadedModel, train_data: LabeledData,
                validation: LabeledData, labels: list[str]) -> Contender:
    """The linear probe: the C whose validation macro-F1 is best (ties: the stronger
    regularization, the first tried)."""
    from sklearn.linear_model import LogisticRegression

    began = time.perf_counter()
    encoder = cfg.label_encoder(loaded.tokenizer, labels)
    x = last_token_states(loaded, encoder, train_data.texts)
    x_val = last_token_states(loaded, encoder, validation.texts)
    best = None
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=cfg.training.seed)
        clf.fit(x, list(train_data.labels))
        report = _report(validation, clf.predict(x_val), labels)
        if best is None or report["macro_f1"] > best[1]["macro_f1"]:
            best = (clf, report, c)
    clf, report, c = best
    seconds = time.perf_counter() - began
    size = int(clf.coef_.size + clf.intercept_.size)

    def predict(data: LabeledData) -> dict:
        return _report(data, clf.predict(last_token_states(loaded, encoder, data.texts)), labels)

    return Contender(predict, report, size, 4 * size, None, len(PROBE_C), seconds, seconds,
                     len(train_data) * len(PROBE_C), f"C={c:g} chosen on validation",
                     {**METHODS["probe"].settings, "C": c, "features": x.shape[1]})


def train_tfidf(cfg: RunConfig, train_data: LabeledData, validation: LabeledData,
                labels: list[str]) -> Contender:
    """The TF-IDF baseline; what a task stores: the vocabulary (its words and an index each),
    the IDF weights and the classifier, float32."""
    began = time.perf_counter()
    vectorizer, clf = fit_tfidf(train_data.texts, train_data.labels, cfg.training.seed)
    seconds = time.perf_counter() - began
    vocabulary = vectorizer.vocabulary_
    size = int(clf.coef_.size + clf.intercept_.size)
    stored = (4 * (size + len(vectorizer.idf_) + len(vocabulary))
              + sum(len(w.encode()) for w in vocabulary))

    def predict(data: LabeledData) -> dict:
        return _report(data, clf.predict(vectorizer.transform(data.texts)), labels)

    return Contender(predict, predict(validation), size, stored, None, 1, seconds, seconds,
                     len(train_data), "",
                     {**METHODS["tfidf"].settings, "features": len(vocabulary)})
