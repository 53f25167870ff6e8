"""What training changed: the change readouts are empty for a prefix that never moved, the
reset-to-start ablation of such a prefix changes nothing, and an attention sink is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.predict import score_log_likelihoods
from prefixlab.engine.prefix import text_key_values
from prefixlab.interpret import ablation, change
from prefixlab.interpret.knockout import Knockout

TEXTS = ["the movie was great", "the movie was bad", "a terrible boring film", "great fun"]
LABELS = ["positive", "negative"]


def _start(loaded) -> torch.Tensor:
    return text_key_values(loaded.model, loaded.tokenizer, "the movie was", 4)


def _label_ids(loaded) -> list[list[int]]:
    return Encoder(loaded.tokenizer, Template(), LABELS, 48).label_ids


def test_the_change_of_an_untrained_prefix_reads_nothing(loaded):
    start = _start(loaded)
    result = change.prefix_change(loaded, start.clone(), start, 5, LABELS, _label_ids(loaded))
    assert not result.moved and not result.movement.any()
    assert all(not cell for layer in result.up + result.down for cell in layer)
    assert result.toward == [] and result.away == [] and result.label_shift() == []
    assert not result.label_push.any()
    assert result.most_moved("value") == []
    assert result.to_json()["moved"] is False


def test_the_change_readout_is_of_the_difference_and_names_the_layer_that_moved(loaded):
    start = _start(loaded)
    trained = start.clone()
    g = torch.Generator().manual_seed(0)
    trained[1, 1, :, 2] += torch.randn(trained[1, 1, :, 2].shape, generator=g) * 5
    result = change.prefix_change(loaded, trained, start, 5, LABELS, _label_ids(loaded))
    assert result.moved and result.most_moved("value") == [1]
    # Only layer 1's value of slot 2 moved: only it reads anything.
    moved = [(layer, p) for layer, row in enumerate(result.up) for p, cell in enumerate(row)
             if cell]
    assert moved == [(1, 2)]
    from prefixlab.interpret.values import value_logits

    shift = value_logits(loaded, trained)[1, 2] - value_logits(loaded, start)[1, 2]  # (V,)
    assert result.up[1][2][0][0] == int(shift.argmax())
    assert result.down[1][2][0][0] == int(shift.argmin())
    assert result.label_push[0] == pytest.approx([0.0, 0.0])  # layer 0 never moved
    assert len(result.label_shift([1])) == 2


def test_word_origin_tells_start_label_and_data_words_from_new_ones():
    words = {"init text": [1, 2], "label words": [2, 3], "data words": [4]}
    assert change.word_origin(1, words) == ["start word"]
    assert change.word_origin(2, words) == ["start word", "label word"]
    assert change.word_origin(4, words) == ["data word"]
    assert change.word_origin(9, words) == ["new"]


def _scorer(loaded):
    encoder = Encoder(loaded.tokenizer, Template(), LABELS, 48)
    return lambda kv: score_log_likelihoods(loaded.model, kv, encoder, TEXTS, batch_size=4)


def test_resetting_an_untrained_prefix_to_its_start_changes_nothing(loaded):
    start = _start(loaded)
    score = _scorer(loaded)
    gold = score(start).argmax(1)
    result = ablation.reset_knockout(start.clone(), start, score, gold, "float32")
    assert result.ablation == "reset" and result.rows == len(TEXTS)
    assert not result.slot_log_prob.any() and not result.layer_log_prob.any()
    assert result.all_log_prob == 0.0 and result.all_f1 == 0.0
    assert not result.slot_f1.any() and not result.layer_f1.any()


def test_resetting_the_slot_training_changed_costs_and_the_others_do_not(loaded):
    start = _start(loaded)
    trained = start.clone()
    g = torch.Generator().manual_seed(1)
    trained[:, :, :, 3] = torch.randn(trained[:, :, :, 3].shape, generator=g) * 30
    score = _scorer(loaded)
    gold = score(trained).argmax(1)  # the trained prefix is right by construction
    result = ablation.reset_knockout(trained, start, score, gold, "float32")
    assert result.slot_log_prob[:3].tolist() == [0.0, 0.0, 0.0]  # never moved: not rescored
    assert result.slot_log_prob[3] < 0 and result.ranked("slot")[0][0] == 3
    assert Knockout.from_json(result.to_json()).ablation == "reset"


def _knockout(slot_costs, whole: float) -> Knockout:
    P = len(slot_costs)
    return Knockout(rows=10, prefix_length=P, num_layers=2, log_prob=-0.3, f1=0.8,
                    slot_log_prob=np.array(slot_costs, dtype=float), slot_f1=np.zeros(P),
                    layer_log_prob=np.array([-0.5, -0.1]), layer_f1=np.zeros(2),
                    all_log_prob=whole, all_f1=-0.3)


def test_a_slot_that_costs_more_than_the_whole_prefix_is_an_attention_sink():
    sinks = ablation.attention_sinks(_knockout([-5.15, -0.2, 0.01], -2.23), None)
    assert [s.slot for s in sinks] == [0]
    assert "more than hiding the whole prefix (-2.23)" in sinks[0].evidence[0]
    assert ablation.attention_sinks(_knockout([-1.0, -0.2, 0.01], -2.23), None) == []
    # Where hiding the whole prefix costs nothing, a slot's few hundredths are noise.
    assert ablation.attention_sinks(_knockout([-0.13, -0.1, 0.01], 0.46), None) == []
    # The same costs under the reset ablation say nothing about sinks.
    reset = _knockout([-5.15, -0.2, 0.01], -2.23)
    reset.ablation = "reset"
    assert ablation.attention_sinks(reset, None) == []


def test_a_slot_that_takes_most_attention_on_every_input_is_an_attention_sink():
    share = np.array([[0.7, 0.1, 0.05], [0.55, 0.2, 0.1], [0.9, 0.02, 0.01]])  # (T, P)
    sinks = ablation.attention_sinks(None, share)
    assert [s.slot for s in sinks] == [0]
    assert "55%–90% of all attention on every one of the 3 inputs" in sinks[0].evidence[0]
    share[1, 0] = 0.3  # one input where it does not: attention follows the input
    assert ablation.attention_sinks(None, share) == []


def test_the_summary_says_what_training_changed_first_and_names_the_sink(loaded):
    from prefixlab.interpret.bank import reference_bank
    from prefixlab.interpret.nearest import nearest_tokens
    from prefixlab.interpret.summary import summary_markdown

    start = _start(loaded)
    trained = start.clone()
    trained[1, 1] *= 1.5  # layer 1's values moved
    ids = loaded.tokenizer("the movie was", add_special_tokens=False)["input_ids"]
    words = {"init text": ids, "label words": [], "data words": []}
    nearest = nearest_tokens(loaded, trained, reference_bank(loaded, 50), top_k=2)
    moved = change.prefix_change(loaded, trained, start, 5, LABELS, _label_ids(loaded))
    sinks = ablation.attention_sinks(_knockout([-5.15, -0.2, 0.0, 0.0], -2.23), None)
    text = summary_markdown(nearest, trained, start, _knockout([-5.15, -0.2, 0.0, 0.0], -2.23),
                            change=moved, words=words, sinks=sinks)
    first, second = text.split("\n\n")[:2]
    assert first.startswith("**What training changed**: the values of layer 1 moved most")
    assert "pushes toward ‘" in first and "and away from ‘" in first
    assert second.startswith("**What still reads as the start**")
    assert "**Attention sink: P0**" in text
    still = summary_markdown(nearest, start, start, None, change=change.prefix_change(
        loaded, start, start), words=words, start_note="the step-0 snapshot")
    assert still.startswith("**What training changed**: nothing — the prefix is still its start")
    unknown = summary_markdown(nearest, start, None, None, words=words,
                               start_note="the prefix was imported")
    assert unknown.startswith("**What training changed**: unknown — the prefix was imported")


def test_each_slots_attention_share_adds_up_to_the_prefixs(loaded):
    from prefixlab.interpret.attention import prefix_attention

    kv = _start(loaded)
    result = prefix_attention(loaded, kv, TEXTS[:2])
    assert result.slots.shape == (1, 2, kv.shape[3])  # (prefixes, texts, slots)
    # Over the slots, averaged over texts, each slot's share is the prefix's mean share.
    np.testing.assert_allclose(result.slots[0].sum(-1).mean(), result.mass[0].mean(),
                               rtol=1e-5)
