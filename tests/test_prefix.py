"""The prefix is exactly a pre-read text: logits, masks, positions, generation and files."""

from __future__ import annotations

import pytest
import torch

from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.predict import generate, score_labels
from prefixlab.engine.prefix import (
    Prefix,
    PrefixConfig,
    PrefixFileError,
    forward,
    init_prefix,
    load_prefix,
    save_prefix,
    text_key_values,
)


def _left_padded(rows, pad):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def test_prefix_from_text_equals_reading_the_text(loaded):
    model, tok = loaded.model, loaded.tokenizer
    text = tok("the movie was great", add_special_tokens=False)["input_ids"]
    P = len(text)
    kv = text_key_values(model, tok, "the movie was great", P)
    assert kv.shape == (loaded.shape.num_layers, 2, loaded.shape.num_kv_heads, P,
                        loaded.shape.head_dim)
    rows = [tok("a terrible boring film", add_special_tokens=False)["input_ids"],
            tok("fine", add_special_tokens=False)["input_ids"]]
    ids, mask = _left_padded(rows, tok.pad_token_id)
    got = forward(model, kv, ids, mask)
    for i, r in enumerate(rows):
        full = model(input_ids=torch.tensor([text + r])).logits[0, P:]
        torch.testing.assert_close(got[i, -len(r):], full, atol=2e-5, rtol=1e-4)


def test_bool_logits_to_keep_matches_full_logits(loaded):
    model, tok = loaded.model, loaded.tokenizer
    kv = text_key_values(model, tok, "hello world", 4)
    ids = torch.randint(1, 250, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[0, 2] = keep[1, 4] = keep[1, 5] = True
    full = forward(model, kv, ids, mask)
    torch.testing.assert_close(forward(model, kv, ids, mask, keep), full[keep])


def test_gradients_reach_only_the_prefix(loaded):
    model = loaded.model
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=3))
    init_prefix(prefix, model, loaded.tokenizer, "hello")
    ids = torch.randint(1, 250, (2, 5))
    logits = forward(model, prefix.key_values(), ids, torch.ones_like(ids))
    logits.sum().backward()
    assert prefix.kv.grad is not None and prefix.kv.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_reparameterized_prefix_starts_at_its_init_and_folds(loaded):
    model, tok = loaded.model, loaded.tokenizer
    cfg = PrefixConfig(prefix_length=4, reparameterize=True, reparam_hidden=16)
    prefix = Prefix(loaded.shape, cfg)
    init_prefix(prefix, model, tok, "the movie")
    torch.testing.assert_close(prefix.folded(), text_key_values(model, tok, "the movie", 4))
    with torch.no_grad():
        prefix.mlp[-1].weight.normal_()
    kv = prefix.folded()
    ids = torch.randint(1, 250, (1, 5))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(forward(model, kv, ids, mask),
                               forward(model, prefix.key_values(), ids, mask))


def test_generate_with_prefix_equals_greedy_loop_and_differs_from_bare(loaded):
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(1)
    kv = torch.randn_like(text_key_values(model, tok, "bad awful terrible horrible", 6)) * 4
    prompts = ["the movie", "a terrible boring film was"]
    got = generate(model, tok, kv, prompts, max_new_tokens=8)
    bare = generate(model, tok, None, prompts, max_new_tokens=8)
    for prompt, text in zip(prompts, got, strict=True):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        new = []
        for _ in range(8):
            x = torch.tensor([ids + new])
            logits = forward(model, kv, x, torch.ones_like(x))
            new.append(int(logits[0, -1].argmax()))
        assert text == tok.decode(new, skip_special_tokens=True)
    assert got != bare


def test_score_labels_matches_sequence_likelihoods(loaded):
    """Batched scoring (one prompt pass + cached continuation) equals scoring each sequence."""
    model, tok = loaded.model, loaded.tokenizer
    labels = ["positive", "negative sentiment", "neither"]
    enc = Encoder(tok, Template(), labels, max_length=64)
    kv = text_key_values(model, tok, "Classify the text", 5)
    texts = ["the movie was great", "bad", "hello world this is fine"]
    probs = score_labels(model, kv, enc, texts, batch_size=2)
    for row, text in enumerate(texts):
        prompt = enc.prompt(text)[0]
        ll = []
        for target in enc.label_ids:
            x = torch.tensor([prompt + target])
            logp = torch.log_softmax(forward(model, kv, x, torch.ones_like(x))[0], -1)
            ll.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target)))
        expected = torch.softmax(torch.tensor(ll, dtype=torch.float64), 0).numpy()
        assert probs[row] == pytest.approx(expected, abs=1e-4)
    bare = score_labels(model, None, enc, texts)
    assert bare.shape == (3, 3) and not (bare == probs).all()


def test_prefix_file_round_trip_gives_identical_logits(loaded, tmp_path):
    model, tok = loaded.model, loaded.tokenizer
    kv = text_key_values(model, tok, "hello world", 5)
    save_prefix(tmp_path / "p.safetensors", kv, loaded.name)
    back = load_prefix(tmp_path / "p.safetensors", loaded.shape)
    ids = torch.randint(1, 250, (1, 4))
    torch.testing.assert_close(forward(model, back.kv, ids, torch.ones_like(ids)),
                               forward(model, kv, ids, torch.ones_like(ids)), rtol=0, atol=0)
    assert back.metadata["base_model"] == loaded.name


def test_mismatched_or_corrupt_prefix_is_refused(loaded, tmp_path):
    from prefixlab.engine.models import PrefixShape

    kv = torch.zeros(3, 2, 2, 4, 8)
    save_prefix(tmp_path / "p.safetensors", kv, "other-model")
    with pytest.raises(PrefixFileError, match="made for other-model.*num_layers"):
        load_prefix(tmp_path / "p.safetensors", PrefixShape(2, 2, 8))
    data = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PrefixFileError, match="not a readable"):
        load_prefix(tmp_path / "torn.safetensors")
