"""Generation runs on tiny models: target-only loss, input-grouped splits, scores and reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefixlab.data.pairs import group_split, load_pairs_csv, looks_like_targets
from prefixlab.data.reading import DataError
from prefixlab.engine.decode import DecodeConfig
from prefixlab.engine.encode import PairEncoder, Template, TemplateError, collate
from prefixlab.engine.prefix import Prefix, PrefixConfig, forward
from prefixlab.engine.train import TrainConfig, batch_loss, train
from prefixlab.runs.generation import generation_report, target_loss

PAIRS = [
    ("name[Blue Spice], area[riverside]", "Blue Spice is by the riverside."),
    ("name[Blue Spice], area[riverside]", "By the riverside you find Blue Spice."),
    ("name[Cotto], food[Italian]", "Cotto serves Italian food."),
    ("name[Aromi], eatType[pub]", "Aromi is a pub."),
    ("name[Aromi], eatType[pub]", "There is a pub called Aromi."),
    ("name[Zizzi], near[The Bakers]", "Zizzi is near The Bakers."),
]


@pytest.fixture
def encoder(tokenizer):
    return PairEncoder(tokenizer, Template("Input: {text}\nOutput:"), 96, 24)


def test_pair_examples_end_with_eos_and_cut_long_targets(encoder, tokenizer):
    ex = encoder.examples(["a b"], ["the movie was great"])[0]
    assert ex.target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.target[:-1]) == " the movie was great"
    assert ex.prompt == encoder.prompt("a b")[0]
    long, cut = encoder.target("great " * 60)
    assert cut and len(long) == 24 and long[-1] == tokenizer.eos_token_id


def test_only_target_positions_carry_the_loss(loaded, tokenizer):
    encoder = PairEncoder(tokenizer, Template("Input: {text}\nOutput:"), 96, 24)
    examples = encoder.examples([x for x, _ in PAIRS[:3]], [y for _, y in PAIRS[:3]])
    batch = collate(examples, tokenizer.pad_token_id)
    # The loss mask marks exactly the positions whose next token is a target token.
    for row, e in enumerate(examples):
        marked = batch.loss_mask[row].nonzero().flatten().tolist()
        start = len(e.prompt) - 1
        assert marked == list(range(start, start + len(e.target)))
    assert batch.targets.tolist() == sum((e.target for e in examples), [])
    # The loss is the mean cross-entropy of those tokens only, from full logits by hand.
    kv = torch.randn(*Prefix(loaded.shape, PrefixConfig(prefix_length=4)).folded().shape)
    full = forward(loaded.model, kv, batch.input_ids, batch.attention_mask)  # (B, T, V)
    by_hand = torch.cat([
        F.cross_entropy(full[row, len(e.prompt) - 1: len(e.prompt) - 1 + len(e.target)],
                        torch.tensor(e.target), reduction="none")
        for row, e in enumerate(examples)
    ]).mean()
    torch.testing.assert_close(batch_loss(loaded.model, kv, batch), by_hand)
    assert target_loss(loaded.model, kv, encoder,
                       load_pairs_from(PAIRS[:3])) == pytest.approx(float(by_hand), rel=1e-5)
    # A prompt token that changes leaves the loss's gradient on the logits of prompt
    # positions at zero: the loss never reads them.
    logits = full.detach().requires_grad_()
    logp = torch.log_softmax(logits, -1)[batch.loss_mask]
    F.nll_loss(logp, batch.targets).backward()
    assert (logits.grad[~batch.loss_mask] == 0).all()
    assert (logits.grad[batch.loss_mask].abs().sum(-1) > 0).all()


def load_pairs_from(pairs):
    from prefixlab.data.pairs import TextPairs

    return TextPairs([x for x, _ in pairs], [y for _, y in pairs], list(range(1, len(pairs) + 1)),
                     "input", "target")


def test_training_lowers_the_target_loss(loaded, tokenizer):
    encoder = PairEncoder(tokenizer, Template("Input: {text}\nOutput:"), 96, 24)
    data = load_pairs_from(PAIRS)
    examples = encoder.examples(data.inputs, data.targets)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=16, init="random"))
    before = target_loss(loaded.model, prefix.folded(), encoder, data)
    train(loaded.model, prefix, examples, TrainConfig(learning_rate=0.2, epochs=40,
          batch_size=6, warmup_steps=0), tokenizer.pad_token_id)
    after = target_loss(loaded.model, prefix.folded(), encoder, data)
    assert after < 0.9 * before


def test_a_template_too_long_for_the_targets_is_refused(tokenizer):
    with pytest.raises(TemplateError, match="raise max_length"):
        PairEncoder(tokenizer, Template("Input: {text}\nOutput:"), 32, 30)


def _write(tmp_path, text: str):
    p = tmp_path / "pairs.csv"
    p.write_text(text, encoding="utf-8")
    return p


def test_pairs_csv_drops_unusable_rows_with_a_warning(tmp_path):
    p = _write(tmp_path, "input,target\na,one two\n,lost\nb,\nc,three four\nc,three four\n")
    pairs = load_pairs_csv(p, "input", "target")
    assert pairs.inputs == ["a", "c", "c"] and pairs.rows == [1, 4, 5]
    text = " ".join(pairs.warnings)
    assert "1 row (row 2) with an empty input" in text
    assert "1 row (row 3) with an empty target" in text
    assert "repeat an earlier row" in text


def test_pairs_csv_problems_are_specific(tmp_path):
    p = _write(tmp_path, "input,target\na,x\n")
    with pytest.raises(DataError, match="no target column named 'tgt'"):
        load_pairs_csv(p, "input", "tgt")
    with pytest.raises(DataError, match="at least 2 distinct inputs"):
        load_pairs_csv(p, "input", "target")


def test_split_keeps_every_row_of_an_input_on_one_side():
    data = load_pairs_from(PAIRS)
    train_part, val = group_split(data, 0.4, seed=3)
    assert set(train_part.inputs).isdisjoint(val.inputs)
    assert len(train_part) + len(val) == len(data)
    assert val.distinct_inputs() == 2  # round(0.4 * 5 distinct inputs)
    assert group_split(data, 0.4, seed=3)[1].inputs == val.inputs  # seeded


def test_long_unique_texts_look_like_targets():
    import pandas as pd

    frame = pd.DataFrame({
        "label": ["pos", "neg"] * 10,
        "target": [f"A sentence of some length, number {i}." for i in range(20)],
    })
    assert looks_like_targets(frame, "target") and not looks_like_targets(frame, "label")


def test_generation_report_puts_the_bare_model_beside_the_prefix(loaded, tokenizer):
    encoder = PairEncoder(tokenizer, Template("Input: {text}\nOutput:"), 96, 24)
    data = load_pairs_from(PAIRS)
    kv = Prefix(loaded.shape, PrefixConfig(prefix_length=4, init="random")).folded()
    report = generation_report(loaded.model, encoder, kv, data, DecodeConfig(max_new_tokens=6))
    assert report["n"] == 4 and report["rows"] == 6  # distinct inputs vs rows
    for scores in (report, report["baselines"]["bare_model"]):
        assert {"bleu", "chrf", "rouge_l", "loss", "n"} <= set(scores)
        assert 0 <= scores["bleu"] <= 100
    sample = report["samples"][0]
    assert sample["references"] == [PAIRS[0][1], PAIRS[1][1]]
    assert isinstance(sample["prefix"], str) and isinstance(sample["bare"], str)
