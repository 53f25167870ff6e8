"""Shared fixtures: tiny random models and an in-process tokenizer, so tests run offline on CPU."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores, spinning threads of one
# test process (or its workers, which inherit this) stole whole cores from the others
# (a greedy decode took 21-49 s spinning vs 4-8 s passive under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(os.environ.get("PREFIXLAB_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))

_CORPUS = [
    "the movie was great and i loved it", "a terrible boring film", "this is fine",
    "good great wonderful excellent", "bad awful terrible horrible", "Text: Category:",
    "positive negative neutral hate offensive neither", "Classify the text. Answer with one of",
    "hello world 0123456789 !?.,;:'\"()-_", "The quick brown fox jumps over the lazy dog",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a few sentences (vocab ~300)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Label words repeated so that BPE merges each into one token, as real tokenizers do.
    labels = " positive negative neither hate offensive" * 20
    tok.train_from_iterator(_CORPUS * 3 + [labels], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return fast


TINY_FAMILIES: dict[str, dict] = {
    # Beyond the sizes every tiny model shares (see tiny_model): what each family needs.
    "gpt2": {},  # built from GPT2Config's own names, below
    "llama": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "mistral": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},  # biases on q, k and v
    "qwen3": {"num_key_value_heads": 2, "head_dim": 8},  # norms on q and k
    "phi": {"num_key_value_heads": 2},  # partial RoPE: half of each head's 8 dimensions
    "gpt_neox": {},  # partial RoPE: a quarter of each head's 8 dimensions
}
"""One tiny configuration per model family PrefixLab supports (prefixlab.engine.families)."""


def tiny_model(kind: str, vocab_size: int = 300, layers: int = 2):
    """A random model of family `kind`: hidden 32, 4 query heads (2 key/value heads for GQA
    families), `layers` decoder layers, seeded."""
    from transformers import (
        CONFIG_MAPPING,
        AutoModelForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_layer=layers, n_embd=32, n_head=4,
                         n_positions=256, eos_token_id=0, bos_token_id=0, pad_token_id=0,
                         initializer_range=0.2)
        return GPT2LMHeadModel(cfg)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, **TINY_FAMILIES["llama"]))
    if kind not in TINY_FAMILIES:
        raise ValueError(kind)
    return AutoModelForCausalLM.from_config(CONFIG_MAPPING[kind](**common, **TINY_FAMILIES[kind]))


TEXTS = ["good great", "bad awful terrible horrible boring", "fine",
         "the movie was great and i loved it", "a terrible boring film", "excellent"]
LABELS = ["positive", "negative", "positive", "positive", "negative", "positive"]


def sentiment_batch(loaded, labels=("negative", "positive"), gold=LABELS):
    """Six sentiment rows of different lengths and a text-initialized prefix's kv (P = 4)."""
    from prefixlab.engine.encode import Encoder, Template
    from prefixlab.engine.prefix import Prefix, PrefixConfig, init_prefix

    enc = Encoder(loaded.tokenizer, Template(), list(labels), max_length=64)
    examples = enc.examples(TEXTS, list(gold))
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    return examples, prefix.kv


def loss_and_grad(fn, model, kv, batch):
    """`fn(model, kv, batch)` and its gradient with respect to kv."""
    loss = fn(model, kv, batch)
    (grad,) = torch.autograd.grad(loss, kv)
    return loss.detach(), grad


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["gpt2", "llama"])
def loaded(request, tokenizer):
    """A LoadedModel with a tiny random GPT-2 or GQA Llama, frozen, on CPU."""
    from prefixlab.engine.models import prepare_model

    return prepare_model(tiny_model(request.param), tokenizer, f"tiny-{request.param}",
                         torch.device("cpu"))


def save_tiny_model(path: Path, kind: str = "llama") -> Path:
    """A tiny random model and the test tokenizer saved as a local folder, as the CLI, the app
    and a worker load a model."""
    tiny_model(kind).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> Path:
    """A tiny model folder per test module: Llama (GQA, the lean CPU step), or the family the
    module names in TINY_KIND."""
    kind = getattr(request.module, "TINY_KIND", "llama")
    return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), kind)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared reference data not found at {SHARED_DATA}")
    return SHARED_DATA
