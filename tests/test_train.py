"""Training moves only the prefix, learns a learnable task (one only reading the input
solves), and resumes exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from prefixlab.engine.encode import Encoder, Template, bucketed_batches, collate
from prefixlab.engine.families import family_of
from prefixlab.engine.predict import score_labels
from prefixlab.engine.prefix import Prefix, PrefixConfig, init_prefix
from prefixlab.engine.train import Checkpoint, TrainConfig, _backward, _chunks, batch_loss, train

from .conftest import loss_and_grad, sentiment_batch

POS = ["good", "great", "wonderful", "excellent", "fine"]
NEG = ["bad", "awful", "terrible", "horrible", "boring"]


def toy_task(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        positive = i % 4 != 3  # 3:1, so that even the label balance is something to learn
        words = POS if positive else NEG
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))))
        labels.append("positive" if positive else "negative")
    return texts, labels


def _setup(loaded, reparameterize=False):
    texts, labels = toy_task(48)
    enc = Encoder(loaded.tokenizer, Template(), ["negative", "positive"], max_length=64)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4, reparameterize=reparameterize,
                                               reparam_hidden=16))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    return enc, prefix, enc.examples(texts, labels), texts, labels


def test_training_lowers_loss_and_leaves_the_model_frozen(loaded):
    enc, prefix, examples, texts, labels = _setup(loaded)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    start = prefix.folded()
    gold = [enc.labels.index(y) for y in labels]
    p_before = score_labels(loaded.model, start, enc, texts)[range(len(texts)), gold].mean()
    losses = []
    cfg = TrainConfig(learning_rate=1e-1, epochs=8, batch_size=8, warmup_steps=0)
    train(loaded.model, prefix, examples, cfg, loaded.tokenizer.pad_token_id,
          on_step=lambda s: losses.append(s.loss))
    assert len(losses) == 8 * 6
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(prefix.folded(), start)
    # A 2-layer random model cannot read sentiment; the prefix can still learn the label
    # tokens and their 3:1 balance (mean p(gold) 0.625 when learned), up from ~0.5.
    p_after = score_labels(loaded.model, prefix.folded(), enc, texts)[range(len(texts)), gold]
    assert p_after.mean() > max(p_before + 0.05, 0.58)


def test_the_prefix_learns_to_read_its_input(loaded):
    """A task no label prior solves: each of four input words has its own label, in equal
    shares, so always answering one label scores 0.25. The frozen random model does not map
    the words to the labels; the prefix must make the answer depend on the input it reads."""
    words = ["good", "bad", "fine", "hello"]
    names = ["positive", "negative", "neither", "hate"]
    rng = random.Random(0)
    texts = [" ".join([words[i % 4]] * rng.randint(1, 3)) for i in range(48)]
    labels = [names[i % 4] for i in range(48)]
    enc = Encoder(loaded.tokenizer, Template("{text} =>"), names, max_length=32)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    gold = np.array([names.index(y) for y in labels])

    def accuracy() -> float:
        return float((score_labels(loaded.model, prefix.folded(), enc, texts).argmax(1)
                      == gold).mean())

    assert accuracy() < 0.6  # not solved at the start
    cfg = TrainConfig(learning_rate=0.2, epochs=10, batch_size=8, warmup_steps=0)
    train(loaded.model, prefix, enc.examples(texts, labels), cfg, loaded.tokenizer.pad_token_id)
    assert accuracy() >= 0.9  # 1.0 seen on both tiny models; the majority share is 0.25


def test_resume_from_checkpoint_matches_uninterrupted(loaded):
    cfg = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=8, warmup_steps=2,
                      checkpoint_every=0)
    for reparam in (False, True):
        enc, prefix, examples, _, _ = _setup(loaded, reparam)
        init = {k: v.clone() for k, v in prefix.state_dict().items()}
        train(loaded.model, prefix, examples, cfg, 0)
        full = prefix.folded()

        prefix.load_state_dict(init)
        saved: list[Checkpoint] = []
        asked: list[int] = []

        def stop_after_five(asked=asked) -> bool:
            asked.append(0)
            return len(asked) > 5

        result = train(loaded.model, prefix, examples, cfg, 0,
                       should_stop=stop_after_five, on_checkpoint=saved.append)
        assert result.stopped and result.steps == 5 and saved[-1].step == 5
        fresh = Prefix(loaded.shape, prefix.config)
        result = train(loaded.model, fresh, examples, cfg, 0, resume=saved[-1])
        assert result.steps == 12
        torch.testing.assert_close(fresh.folded(), full, atol=1e-6, rtol=1e-5)


def test_batches_are_bucketed_and_deterministic():
    lengths = [random.Random(i).randint(5, 100) for i in range(400)]
    a = bucketed_batches(lengths, 8, seed=1, epoch=0)
    assert a == bucketed_batches(lengths, 8, seed=1, epoch=0)
    assert a != bucketed_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(400))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    assert padded < 1.1 * sum(lengths)


def test_max_steps_zero_trains_nothing(loaded):
    enc, prefix, examples, _, _ = _setup(loaded)
    start = prefix.folded()
    saved = []
    result = train(loaded.model, prefix, examples, TrainConfig(max_steps=0), 0,
                   on_checkpoint=saved.append)
    assert result.steps == 0 and saved[0].step == 0
    assert torch.equal(prefix.folded(), start)


def test_evaluation_loss_is_the_training_objective(loaded):
    """The validation loss read from label scores equals the training loss on those rows."""
    from prefixlab.data.labeled import LabeledData
    from prefixlab.engine.encode import collate
    from prefixlab.engine.train import batch_loss
    from prefixlab.runs.scoring import evaluate_prefix

    enc, prefix, examples, texts, labels = _setup(loaded)
    kv = prefix.folded()
    data = LabeledData(texts=texts, labels=labels, rows=list(range(1, len(texts) + 1)),
                       label_names=sorted(set(labels)), warnings=[], text_column="text",
                       label_column="label")
    report, probs = evaluate_prefix(loaded, kv, enc, data)
    with torch.no_grad():
        expected = float(batch_loss(loaded.model, kv, collate(examples, 0)))
    assert abs(report["loss"] - expected) < 1e-4
    assert probs.shape == (len(texts), 2) and abs(probs.sum(1) - 1).max() < 1e-9


def test_batch_loss_equals_the_loss_over_whole_sequences(loaded):
    """collate leaves out each target's last token; the loss is that of the whole rows."""
    import torch.nn.functional as F

    from prefixlab.engine.encode import collate
    from prefixlab.engine.prefix import forward
    from prefixlab.engine.train import batch_loss

    enc, prefix, examples, _, _ = _setup(loaded)
    kv = prefix.folded()
    rows = examples[:6]
    losses = []
    with torch.no_grad():
        for e in rows:  # one unpadded row at a time, every position read
            ids = torch.tensor([e.prompt + e.target])
            logits = forward(loaded.model, kv, ids, torch.ones_like(ids))[0]
            start = len(e.prompt)
            losses.append(F.cross_entropy(logits[start - 1 : start - 1 + len(e.target)],
                                          torch.tensor(e.target), reduction="sum"))
        expected = float(sum(losses)) / sum(len(e.target) for e in rows)
        got = float(batch_loss(loaded.model, kv, collate(rows, 0)))
    assert abs(got - expected) < 1e-5
    assert collate(rows, 0).input_ids.shape[1] == max(len(e) for e in rows) - 1


def test_chunked_backward_gives_the_whole_batch_loss_and_gradient(loaded):
    examples, kv = sentiment_batch(loaded)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    want_loss, want_grad = loss_and_grad(batch_loss, loaded.model, kv, batch)
    leaf = kv.detach().clone().requires_grad_(True)
    longest = max(len(e) for e in examples)
    assert len(_chunks(examples, 2 * longest)) == 3  # 6 rows, 2 per chunk
    fast = family_of(loaded.model.config).fast_training_loss(loaded.model)  # Llama: lean
    loss, real, padded = _backward(loaded.model, leaf, examples, loaded.tokenizer.pad_token_id,
                                   torch.device("cpu"), 2 * longest, fast)
    assert real == sum(len(e) for e in examples) <= padded <= len(examples) * longest
    assert loss == pytest.approx(float(want_loss), rel=1e-5)
    torch.testing.assert_close(leaf.grad, want_grad, atol=1e-6, rtol=1e-5)


def test_chunks_keep_to_the_budget_and_every_row():
    from prefixlab.engine.encode import Example

    rows = [Example([1] * n, [2], 0) for n in (5, 40, 9, 12, 3, 30, 7, 20)]
    for budget in (1, 16, 64, 100, 10_000):
        parts = _chunks(rows, budget)
        assert sorted(id(e) for p in parts for e in p) == sorted(id(e) for e in rows)
        assert all(len(p) == 1 or len(p) * max(len(e) for e in p) <= budget for p in parts)
    assert len(_chunks(rows, 10_000)) == 1


def test_the_gpu_chunk_follows_free_memory_and_the_model_shape():
    from types import SimpleNamespace

    from prefixlab.engine.train import CUDA_CHUNK_TOKENS, cuda_chunk_tokens

    smollm = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             vocab_size=49152)  # the default model's shape
    assert cuda_chunk_tokens(smollm, 80 * 2**30) == CUDA_CHUNK_TOKENS  # an H100: the cap
    eight = cuda_chunk_tokens(smollm, 8 * 2**30)
    assert 1000 < eight < CUDA_CHUNK_TOKENS  # a small GPU: what half its memory holds
    assert cuda_chunk_tokens(smollm, 8 * 2**30, element_bytes=2) > eight  # bf16 weights
    wider = SimpleNamespace(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                            vocab_size=32000)
    assert cuda_chunk_tokens(wider, 8 * 2**30) < eight  # a larger model: fewer tokens
    assert cuda_chunk_tokens(smollm, 10 * 2**20) == 256  # nearly full: the floor
