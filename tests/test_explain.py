"""What the prefix does to each decision, and the model's description of its prefix: the
mixed-batch explanation equals scoring every reading and variant alone, edge cases behave as
interpret.explain defines them, descriptions decode deterministically, and the naming
measure counts whole words."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.predict import score_labels
from prefixlab.engine.prefix import text_key_values
from prefixlab.interpret import describe, explain
from prefixlab.interpret.explain import Source

LABELS = ["positive", "negative"]
TEXT = "the movie was great and i loved it"


def _sources(loaded, max_length: int = 48):
    enc = Encoder(loaded.tokenizer, Template(), LABELS, max_length)
    start = text_key_values(loaded.model, loaded.tokenizer, "the movie was", 4)
    g = torch.Generator().manual_seed(1)
    trained = start + torch.randn(start.shape, generator=g) * 0.5
    return enc, [Source("prefix", trained, enc), Source("start", start, enc.without_prior()),
                 Source("bare", None, enc.without_prior())]


def _alone(loaded, source: Source, texts: list[str]) -> np.ndarray:
    return score_labels(loaded.model, source.kv, source.encoder, texts)


def test_word_removal_leaves_no_double_space():
    assert explain.word_spans("don't stop, now") == [(0, 5), (6, 10), (12, 15)]
    assert explain.without_word("a b c", (2, 3)) == "a c"
    assert explain.without_word("a b c", (4, 5)) == "a b"
    assert explain.without_word("a b c", (0, 1)) == "b c"
    assert explain.without_word("one", (0, 3)) == ""


def test_the_three_rows_and_every_variant_equal_scoring_each_alone(loaded):
    _, sources = _sources(loaded)
    [ex] = explain.explain_texts(loaded.model, sources, [TEXT], leave_out=("prefix", "bare"))
    assert ex.words == TEXT.split()
    for s in sources:
        torch.testing.assert_close(ex.probs[s.name], _alone(loaded, s, [TEXT])[0],
                                   atol=1e-5, rtol=1e-4)
    variants = [explain.without_word(TEXT, span) for span in ex.spans]
    for s in sources[0], sources[2]:
        torch.testing.assert_close(ex.left_out[s.name], _alone(loaded, s, variants),
                                   atol=1e-5, rtol=1e-4)
        d = ex.decision(s.name)
        np.testing.assert_allclose(ex.effect(s.name), ex.probs[s.name][d]
                                   - ex.left_out[s.name][:, d], atol=1e-12)
    assert "start" not in ex.left_out
    # Several texts in one call: each the same as explained alone.
    both = explain.explain_texts(loaded.model, sources, ["great fun", TEXT],
                                 leave_out=("prefix",))
    np.testing.assert_allclose(both[1].left_out["prefix"], ex.left_out["prefix"], atol=1e-5)


def test_a_text_without_words_and_a_one_word_text(loaded):
    _, sources = _sources(loaded)
    empty, one = explain.explain_texts(loaded.model, sources, ["?! ...", "great"],
                                       leave_out=("prefix", "bare"))
    assert empty.words == [] and empty.effect("prefix").shape == (0,)
    assert empty.left_out["prefix"].shape == (0, 2)
    assert empty.to_json()["effect"] == {"prefix": [], "bare": []}
    # Leaving the only word out reads the empty text.
    bare_empty = _alone(loaded, sources[0], [""])[0]
    np.testing.assert_allclose(one.left_out["prefix"][0], bare_empty, atol=1e-5)


def test_words_past_the_text_budget_move_nothing(loaded):
    _, sources = _sources(loaded, max_length=40)  # a text budget of a few tokens
    enc = sources[0].encoder
    text = " ".join(["great"] * 4 + ["movie", "bad", "terrible", "awful"] * 6)
    assert enc.prompt(text)[1]  # the text is cut
    [ex] = explain.explain_texts(loaded.model, sources, [text], leave_out=("prefix",))
    read = len(enc.prompt(text)[0]) - len(enc.head_ids) - len(enc.tail_ids)
    past = [i for i, (s, _) in enumerate(ex.spans)
            if len(enc._ids(text[:s])) >= read]  # wholly after the last token read
    assert past
    assert not ex.effect("prefix")[past].any()
    assert not ex.push("prefix")[past].any()


def test_word_influence_averages_push_per_word_and_label():
    def ex(text, push_first):
        spans = explain.word_spans(text)
        probs = {"prefix": np.array([0.6, 0.4])}
        left = np.tile(probs["prefix"], (len(spans), 1))
        left[0] -= [push_first, -push_first]
        return explain.Explanation(text, LABELS, spans, probs, {"prefix": left})

    rows = [ex("Great fun", 0.4), ex("great film", 0.2), ex("great plot", 0.3),
            ex("dull fun", -0.3), ex("dull film", -0.1), ex("dull plot", -0.2)]
    inf = explain.word_influence(rows, "prefix", n=2, min_count=3)
    assert inf.candidates == 2  # great, dull (the others are seen twice)
    assert [w for w, _, _ in inf.top["positive"]] == ["great", "dull"]
    assert inf.top["positive"][0][1] == pytest.approx(0.3)
    assert inf.top["negative"][0][:1] == ("dull",)
    assert explain.overlap(["a", "b"], ["b", "c"]) == 0.5


def test_descriptions_decode_deterministically_and_per_layer_range(loaded):
    start = text_key_values(loaded.model, loaded.tokenizer, "Classify the text", 4)
    trained = start + 0.5
    first = describe.describe_prefix(loaded.model, loaded.tokenizer, trained, start, LABELS,
                                     "sentiment of reviews", parts=2, max_new_tokens=6)
    again = describe.describe_prefix(loaded.model, loaded.tokenizer, trained, start, LABELS,
                                     "sentiment of reviews", parts=2, max_new_tokens=6)
    assert [d.to_json() for d in first] == [d.to_json() for d in again]
    assert [d.layers for d in first[:4]] == ["all", "0", "1", "none (the start)"]
    assert len(first) == 4 * len(describe.PROMPTS)
    # The start's description equals decoding under the start alone.
    from prefixlab.engine.decode import mixed_generate

    alone = mixed_generate(loaded.model, loaded.tokenizer, [start], [describe.PROMPTS[0]], 6)
    assert first[3].text == alone[0].strip()
    kept = describe.kept_in(trained, start, 1, 2)
    assert torch.equal(kept[0], start[0]) and torch.equal(kept[1], trained[1])


def test_layer_ranges_cover_every_layer_once():
    assert describe.layer_ranges(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert describe.layer_ranges(2, 3) == [(0, 1), (1, 2)]
    assert describe.layer_ranges(7, 3) == [(0, 2), (2, 5), (5, 7)]


def test_naming_counts_whole_labels_and_task_words():
    labels = ["positive", "negative", "sci/tech"]
    words = describe.task_words("Classify the sentiment of the movie review sentence")
    assert words == ["classify", "sentiment", "movie", "review", "sentence"]
    assert describe.naming("decide if it is Positive or negative.", labels) == [
        "positive", "negative"]
    assert describe.naming("positively negativity", labels) == []
    assert describe.naming("news about sci/tech", labels) == ["sci/tech"]
    assert describe.naming("review the film", labels, words) == ["review"]
    assert describe.naming("reviews", labels, words) == []
    texts = ["classify it", "the weather is nice", "say negative", "", "movies"]
    ds = [describe.Description("all", "p", t, describe.naming(t, labels, words)) for t in texts]
    assert describe.naming_count(ds) == 2
    # Beyond the start: only what the start's own description under that prompt does not name.
    rows = [("all", "p", "classify the review"), ("0", "p", "a review"),
            (describe.START, "p", "a review"), ("all", "q", "a review"),
            (describe.START, "q", "nothing")]
    ds = [describe.Description(a, p, t, describe.naming(t, labels, words)) for a, p, t in rows]
    assert describe.naming_count(ds) == 4 and describe.beyond_start(ds) == 2
