"""Every supported model family, on a tiny random model: the prefix is exactly a pre-read text
(logits, label scores, generation), inspection's key frame undoes its RoPE, a few training
steps move only the prefix, and an unlisted family is refused by name.

Adding a family: its row in prefixlab/engine/families.py, and its tiny config in conftest's
TINY_FAMILIES (the first test fails until both exist).
"""

from __future__ import annotations

import pytest
import torch

from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.families import FAMILIES, UnknownFamilyError, family_of
from prefixlab.engine.models import prepare_model
from prefixlab.engine.predict import generate, score_log_likelihoods
from prefixlab.engine.prefix import Prefix, PrefixConfig, forward, init_prefix, text_key_values
from prefixlab.engine.train import TrainConfig, train
from prefixlab.interpret.frame import key_frame

from .conftest import TEXTS, TINY_FAMILIES, save_tiny_model, tiny_model
from .test_prefix import _left_padded

TEXT = "the movie was great"


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request, tokenizer):
    return prepare_model(tiny_model(request.param), tokenizer, f"tiny-{request.param}",
                         torch.device("cpu"))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_family_has_a_tiny_model_to_test_it():
    assert set(TINY_FAMILIES) == set(FAMILIES)


def test_prefix_from_text_equals_reading_the_text(family_model):
    model, tok = family_model.model, family_model.tokenizer
    assert family_of(model.config).name == model.config.model_type
    text = _ids(tok, TEXT)
    P = len(text)
    kv = text_key_values(model, tok, TEXT, P)
    rows = [_ids(tok, "a terrible boring film"), _ids(tok, "fine")]
    ids, mask = _left_padded(rows, tok.pad_token_id)  # left padding: positions must skip it
    got = forward(model, kv, ids, mask)
    for i, r in enumerate(rows):
        full = model(input_ids=torch.tensor([text + r])).logits[0, P:]
        torch.testing.assert_close(got[i, -len(r):], full, atol=2e-5, rtol=1e-4)


def test_label_scores_after_the_prefix_equal_scores_after_the_text(family_model):
    model, tok = family_model.model, family_model.tokenizer
    text = _ids(tok, TEXT)
    kv = text_key_values(model, tok, TEXT, len(text))
    # a two-token label: scoring continues from the prompt's cache
    enc = Encoder(tok, Template(), ["negative neither", "positive"], max_length=64)
    got = score_log_likelihoods(model, kv, enc, TEXTS[:3], batch_size=2)
    for n, prompt in enumerate(enc.prompts(TEXTS[:3])):
        for k, label in enumerate(enc.label_ids):
            ids = torch.tensor([text + list(prompt) + list(label)])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            start = len(text) + len(prompt)
            want = sum(float(logp[start - 1 + j, t]) for j, t in enumerate(label))
            assert got[n, k] == pytest.approx(want, abs=1e-4)


def test_generation_after_the_prefix_continues_the_text(family_model):
    model, tok = family_model.model, family_model.tokenizer
    text = _ids(tok, TEXT)
    kv = text_key_values(model, tok, TEXT, len(text))
    prompts = ["a terrible boring film", "fine"]  # different lengths: left padding
    got = generate(model, tok, kv, prompts, max_new_tokens=6)
    for prompt, new in zip(prompts, got, strict=True):
        ids = torch.tensor([text + _ids(tok, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert new == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_key_frame_undoes_the_familys_rope(family_model):
    model, tok = family_model.model, family_model.tokenizer
    family = family_of(model.config)
    one = _ids(tok, "positive")
    assert len(one) == 1
    kv = text_key_values(model, tok, "positive", 6)  # one token read at positions 0..5
    framed = key_frame(family_model, kv)
    torch.testing.assert_close(key_frame(family_model, framed, inverse=True), kv,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(framed[:, 1], kv[:, 1])  # values are never rotated
    layer0 = framed[0, 0]  # (H, P, D): layer 0 reads no context, only the token and position
    rotated = family.rotary_dim(model.config)
    has_rotary = any("rotary" in name for name, _ in model.named_modules())
    assert has_rotary == (family.rope != "none")  # the row says what the model does
    if family.rope == "none":
        assert rotated == 0  # learned positions are part of what is read: keys differ
        assert not torch.allclose(layer0[:, 1:], layer0[:, :1].expand_as(layer0[:, 1:]))
        return
    # With RoPE the same token has one key in the frame, at every position.
    torch.testing.assert_close(layer0, layer0[:, :1].expand_as(layer0), atol=1e-5, rtol=1e-4)
    assert 0 < rotated <= family_model.shape.head_dim
    assert (rotated < family_model.shape.head_dim) == (family.rope == "partial")
    # ... while the cached keys really were rotated (on the rotated dimensions only)
    cached = kv[0, 0]
    assert not torch.allclose(cached[:, 1:, :rotated], cached[:, :1, :rotated].expand(
        -1, 5, -1))
    torch.testing.assert_close(cached[..., rotated:], layer0[..., rotated:])


def test_training_moves_only_the_prefix(family_model):
    model, tok = family_model.model, family_model.tokenizer
    enc = Encoder(tok, Template(), ["negative", "positive"], max_length=64)
    examples = enc.examples(TEXTS, ["positive", "negative", "positive", "positive",
                                    "negative", "positive"])
    prefix = Prefix(family_model.shape, PrefixConfig(prefix_length=3))
    init_prefix(prefix, model, tok, "Classify the text")
    start = prefix.folded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    cfg = TrainConfig(learning_rate=1e-2, epochs=1, batch_size=3, warmup_steps=0)
    train(model, prefix, examples, cfg, tok.pad_token_id,
          on_step=lambda s: losses.append(s.loss))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(prefix.folded(), start)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fast = family_of(model.config).fast_training_loss(model)
    assert (fast is not None) == (model.config.model_type == "llama")  # the one fast step


def test_an_unlisted_family_is_refused_with_the_supported_ones(tokenizer):
    model = tiny_model("llama")
    model.config.model_type = "made_up"
    with pytest.raises(UnknownFamilyError, match="'made_up' is not supported; supported: "
                       "gpt2, gpt_neox, llama.*prefixlab/engine/families.py"):
        family_of(model.config)
    with pytest.raises(UnknownFamilyError, match="made_up"):  # refused at load
        prepare_model(model, tokenizer, "made-up", torch.device("cpu"))


def test_an_unlisted_family_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    """load_model reads config.json first: a large model of an unlisted family is refused
    in a moment, not after minutes of reading weights."""
    import json

    from transformers import AutoModelForCausalLM

    from prefixlab.engine.models import load_model

    folder = save_tiny_model(tmp_path / "opt", "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "opt"}))

    def read_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the family was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", read_weights)
    with pytest.raises(UnknownFamilyError, match="'opt' is not supported"):
        load_model(str(folder), "cpu")
