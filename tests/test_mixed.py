"""Mixed-prefix batches: every row's result equals running that row alone with its prefix."""

from __future__ import annotations

import pytest
import torch

from prefixlab.engine.decode import Sampling, beam_search, mixed_generate
from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.mixed import (
    ScoreItem,
    mixed_label_log_likelihoods,
    mixed_score_labels,
    stack_prefixes,
)
from prefixlab.engine.predict import generate, label_log_likelihoods, score_labels
from prefixlab.engine.prefix import extend_prefix, text_key_values

TEXTS = ["the movie was great", "a terrible boring film and i", "fine", "hello world",
         "The quick brown fox jumps over the lazy dog"]


def _prefixes(loaded, lengths=(3, 7, 5)):
    """Prefixes of different lengths from different texts: real-scale key/values."""
    sources = ["good great wonderful", "bad awful terrible horrible", "Classify the text"]
    return [text_key_values(loaded.model, loaded.tokenizer, s, n)
            for s, n in zip(sources, lengths, strict=False)]


def test_stack_pads_on_the_left_and_masks_the_padding(loaded):
    a, b = _prefixes(loaded, (2, 5))
    stacked = stack_prefixes([a, None, b, a])
    assert stacked.length == 5
    assert stacked.mask.tolist() == [[0, 0, 0, 1, 1], [0] * 5, [1] * 5, [0, 0, 0, 1, 1]]
    k0, v0 = stacked.layers[0]
    torch.testing.assert_close(k0[0, :, 3:], a[0, 0])
    torch.testing.assert_close(v0[2], b[0, 1])
    assert k0[1].abs().sum() == 0 and k0[0, :, :3].abs().sum() == 0
    assert stack_prefixes([None, None]) is None


def test_stack_refuses_prefixes_of_different_models(loaded):
    a = _prefixes(loaded, (2,))[0]
    with pytest.raises(ValueError, match="share"):
        stack_prefixes([a, torch.zeros(a.shape[0] + 1, 2, a.shape[2], 2, a.shape[4])])


@pytest.mark.parametrize("labels", [["positive", "negative", "neither"],
                                    ["great film", "bad", "lazy dog jumps"]])
def test_mixed_scores_equal_each_row_alone(loaded, labels):
    """Single- and multi-token labels; rows with prefixes of length 3, 7, 5 and none."""
    kvs = [*_prefixes(loaded), None]
    enc = Encoder(loaded.tokenizer, Template(), labels, 128)
    other = Encoder(loaded.tokenizer, Template("Review: {text}\nVerdict:"), ["good", "bad"], 64)
    encoders = [enc, other, enc, other, enc]
    rows = [(kvs[i % len(kvs)], encoders[i], t) for i, t in enumerate(TEXTS)]
    prompts = [e.prompt(t)[0] for _, e, t in rows]
    pad = loaded.tokenizer.pad_token_id
    mixed = mixed_label_log_likelihoods(loaded.model, [r[0] for r in rows], prompts,
                                        [e.label_ids for _, e, _ in rows], pad)
    for (kv, e, _), prompt, got in zip(rows, prompts, mixed, strict=True):
        alone = label_log_likelihoods(loaded.model, kv, [prompt], e.label_ids, pad)[0]
        torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-5)


def test_mixed_score_labels_matches_score_labels(loaded):
    kvs = _prefixes(loaded)
    enc = Encoder(loaded.tokenizer, Template(), ["positive", "negative"], 64)
    items = [ScoreItem(kvs[i % 3], enc, t) for i, t in enumerate(TEXTS)]
    got = mixed_score_labels(loaded.model, items, batch_size=2)
    for it, probs in zip(items, got, strict=True):
        alone = score_labels(loaded.model, it.kv, enc, [it.text])[0]
        assert probs == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("labels", [["positive", "negative"], ["great film", "bad", "dog"]])
def test_a_template_head_read_once_per_prefix_scores_as_the_whole_prompt(loaded, labels):
    """Rows after extend_prefix(kv, head) read only text + tail, beside rows reading their
    whole prompt, prefixes of different lengths: each row scores as its whole prompt alone."""
    long = Template("You are a careful annotator. Read the review and answer.\n"
                    "Review: {text}\nVerdict ({labels}):")
    encoders = [Encoder(loaded.tokenizer, t, labels, 128) for t in (Template(), long)]
    kvs = _prefixes(loaded)
    items = []
    for i, text in enumerate(TEXTS):
        kv, enc = kvs[i % 3], encoders[i % 2]
        if i % 4 == 3:  # this row reads its whole prompt
            items.append((kv, ScoreItem(kv, enc, text)))
        else:
            items.append((kv, ScoreItem(extend_prefix(loaded.model, kv, enc.head_ids), enc,
                                        text, head_read=True)))
    assert len(items[1][1].prompt()) < len(encoders[1].prompt(TEXTS[1])[0]) - 10
    got = mixed_score_labels(loaded.model, [it for _, it in items])
    for (kv, it), probs in zip(items, got, strict=True):
        alone = score_labels(loaded.model, kv, it.encoder, [it.text])[0]
        assert probs == pytest.approx(alone, abs=1e-5)
    ext = extend_prefix(loaded.model, kvs[0], encoders[1].head_ids)
    assert torch.equal(ext[:, :, :, :kvs[0].shape[3]], kvs[0])


def test_mixed_greedy_generation_equals_each_row_alone(loaded):
    """Left-padded prompts of different lengths, prefixes of different lengths and none."""
    kvs = [*_prefixes(loaded), None]
    rows = [(kvs[i % len(kvs)], t) for i, t in enumerate(TEXTS)]
    budgets = [6, 3, 6, 1, 4]
    mixed = mixed_generate(loaded.model, loaded.tokenizer, [r[0] for r in rows],
                           [r[1] for r in rows], budgets)
    for (kv, text), n, got in zip(rows, budgets, mixed, strict=True):
        alone = generate(loaded.model, loaded.tokenizer, kv, [text], max_new_tokens=n)[0]
        assert got == alone
    assert len({*mixed}) > 1  # the rows really differ


def test_sampled_rows_equal_each_row_alone_and_leave_the_global_rng_alone(loaded):
    """Sampled rows (each its own seed), greedy rows, different prefixes and budgets in one
    batch: every row's text is its text alone; torch's global RNG is neither read nor set."""
    kvs = [*_prefixes(loaded), None]
    rows = [(kvs[i % len(kvs)], t) for i, t in enumerate(TEXTS)]
    sampling = [Sampling(11, 1.3, 0.95), None, Sampling(5, 0.8), Sampling(11, 1.3, 0.95), None]
    budgets = [6, 4, 5, 6, 3]
    state = torch.random.get_rng_state()
    mixed = mixed_generate(loaded.model, loaded.tokenizer, [r[0] for r in rows],
                           [r[1] for r in rows], budgets, sampling)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (kv, text), n, s, got in zip(rows, budgets, sampling, mixed, strict=True):
        if s is None:
            alone = generate(loaded.model, loaded.tokenizer, kv, [text], max_new_tokens=n)
        else:
            alone = generate(loaded.model, loaded.tokenizer, kv, [text], max_new_tokens=n,
                             do_sample=True, temperature=s.temperature, top_p=s.top_p,
                             seed=s.seed)
        assert got == alone[0]
    # The seed reaches the draws: other seeds, other texts (6 tokens of a random model).
    others = mixed_generate(loaded.model, loaded.tokenizer, [rows[0][0]] * 3,
                            [rows[0][1]] * 3, 6, [Sampling(s, 1.3, 0.95) for s in (12, 13, 14)])
    assert any(o != mixed[0] for o in others)


def test_rows_of_one_request_draw_from_streams_of_their_own(loaded):
    kv = _prefixes(loaded, (3,))[0]
    twice = generate(loaded.model, loaded.tokenizer, kv, ["hello world"] * 2, 6,
                     do_sample=True, temperature=1.5, seed=3)
    assert twice[0] != twice[1]  # one prompt twice: two draws, not one repeated
    second = generate(loaded.model, loaded.tokenizer, kv, ["hello world"], 6, do_sample=True,
                      temperature=1.5, seed=Sampling(3).for_row(1).seed)
    assert second[0] == twice[1]


def test_mixed_beam_search_equals_each_row_alone(loaded):
    kvs = [*_prefixes(loaded), None]
    tok = loaded.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:4]]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    mixed = beam_search(loaded.model, kvs, rows, eos, pad, 5, num_beams=3)
    for kv, row, got in zip(kvs, rows, mixed, strict=True):
        assert got == beam_search(loaded.model, kv, [row], eos, pad, 5, num_beams=3)[0]
    texts = mixed_generate(loaded.model, tok, kvs, TEXTS[:4], 5, num_beams=3)
    assert texts == [tok.decode(r, skip_special_tokens=True) for r in mixed]
    with pytest.raises(ValueError, match="one per row"):
        beam_search(loaded.model, kvs[:2], rows, eos, pad, 5, num_beams=3)


@pytest.mark.slow
def test_mixed_batch_on_the_default_model():
    from prefixlab.engine.models import load_model

    loaded = load_model(device="cpu")
    kvs = [text_key_values(loaded.model, loaded.tokenizer, s, n) for s, n in
           [("Answer in French.", 6), ("You are a pirate. Talk like one.", 12)]]
    enc = Encoder(loaded.tokenizer, Template(), ["positive", "negative", "neutral"], 96)
    texts = ["I loved this film", "Awful service, never again", "It was okay I guess"]
    items = [ScoreItem(kvs[i % 2], enc, t) for i, t in enumerate(texts)]
    for it, probs in zip(items, mixed_score_labels(loaded.model, items), strict=True):
        assert probs == pytest.approx(score_labels(loaded.model, it.kv, enc, [it.text])[0],
                                      abs=1e-4)
    prompts = ["The capital of France is", "Tell me about the sea"]
    mixed = mixed_generate(loaded.model, loaded.tokenizer, [kvs[1], None], prompts, 12)
    assert mixed[0] == generate(loaded.model, loaded.tokenizer, kvs[1], prompts[:1], 12)[0]
    assert mixed[1] == generate(loaded.model, loaded.tokenizer, None, prompts[1:], 12)[0]


@pytest.mark.parametrize("labels", [["positive", "negative"],
                                    ["great film", "bad", "lazy dog jumps"]])
def test_label_scores_equal_a_plain_forward_over_prompt_and_label(loaded, labels):
    """The one scoring path, for one prefix or none, against the definition: one forward over
    prefix + prompt + label, summing the label tokens' log-probabilities."""
    from prefixlab.engine.prefix import prefix_inputs

    kv = _prefixes(loaded, (4,))[0]
    enc = Encoder(loaded.tokenizer, Template(), labels, 128)
    prompts = [enc.prompt(t)[0] for t in TEXTS[:3]]
    pad = loaded.tokenizer.pad_token_id
    for prefix in (kv, None):
        got = label_log_likelihoods(loaded.model, prefix, prompts, enc.label_ids, pad)
        for b, prompt in enumerate(prompts):
            for k, label in enumerate(enc.label_ids):
                ids = torch.tensor([prompt + list(label)])
                with torch.no_grad():
                    out = loaded.model(input_ids=ids, **prefix_inputs(
                        loaded.model, prefix, torch.ones_like(ids)))
                logp = torch.log_softmax(out.logits[0].float(), -1)  # (T, V)
                want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(label))
                torch.testing.assert_close(got[b, k], want, atol=2e-5, rtol=1e-5)
