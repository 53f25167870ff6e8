"""Generation metrics: references grouped by input, library scores on known cases."""

from __future__ import annotations

import pytest

from prefixlab.runs.genmetrics import generation_scores, group_references


def test_rows_that_share_an_input_become_one_with_several_references():
    g = group_references(["a", "b", "a", "c", "a"], ["a1", "b1", "a2", "c1", "a3"])
    assert g.inputs == ["a", "b", "c"]
    assert g.references == [["a1", "a2", "a3"], ["b1"], ["c1"]]
    assert len(g) == 3 and g.head(2).inputs == ["a", "b"]


def test_a_hypothesis_matching_any_reference_scores_full():
    refs = [["the cat sat on the mat today", "a feline rested on a rug"],
            ["there is a dog in the park now"]]
    # The first output equals the *second* reference of its input: still a perfect score.
    perfect = generation_scores(["a feline rested on a rug", "there is a dog in the park now"],
                                refs)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["rouge_l"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    assert perfect["n"] == 2
    # Scored against only each input's first reference, the same outputs score far lower.
    single = generation_scores(["a feline rested on a rug", "there is a dog in the park now"],
                               [[r[0]] for r in refs])
    assert single["bleu"] < 70 and single["rouge_l"] < 70


def test_multi_reference_bleu_is_sacrebleus():
    import sacrebleu

    hyps = ["a small cafe near the river", "cheap food in the centre"]
    refs = [["a small coffee shop by the river", "a cafe near the river"],
            ["the food is cheap in the city centre"]]
    got = generation_scores(hyps, refs)
    streams = [[refs[0][0], refs[1][0]], [refs[0][1], None]]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert 0 < got["bleu"] < 100


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 outputs for 1 inputs"):
        generation_scores(["a", "b"], [["a"]])
