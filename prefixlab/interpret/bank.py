"""The reference bank: real tokens' keys and values per layer, built once and cached on disk.

The bank (per base model, token list and weights) holds each bank token read in a neutral
slot: right after a newline token, at position 1. It feeds the PCA maps and the token list;
keys are stored in the *key frame* (RoPE rotation undone, i.e. as at position 0) so that keys
from different positions can share one map. The neutral slot is needed
because a token read alone at position 0 becomes an attention sink: in SmolLM2-135M such
states are nearly identical for every token past layer 5 (mean pairwise cosine 0.9999).
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from prefixlab.engine.families import family_of
from prefixlab.engine.models import LoadedModel, cache_root
from prefixlab.files import atomic_save_tensors
from prefixlab.interpret.frame import InterpretError, slot_references, unrotate_keys
from prefixlab.interpret.nearest import (
    ReferenceBank,
    VocabularyFrame,
    frame_references,
    ordinary_token_ids,
)

BANK_FORMAT = "prefixlab-bank/1"
VOCABULARY_FORMAT = "prefixlab-vocabulary-layer0/1"
DEFAULT_BANK_SIZE = 2000


def _is_junk(text: str) -> bool:
    """Whitespace, partial UTF-8 bytes or control characters: not a readable token."""
    if not text.strip() or "\ufffd" in text:
        return True
    return any(unicodedata.category(c).startswith("C") for c in text)


def frequent_token_ids(tokenizer, count: int, vocab_size: int | None = None) -> list[int]:
    """The first `count` ordinary tokens by id: the offline stand-in for a frequency table.

    Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) number merges in the order they were
    learned, i.e. most frequent pairs first, so the lowest ids after the special tokens and
    the 256 single bytes are roughly the most frequent words and word pieces. Special tokens,
    whitespace-only pieces and partial UTF-8 bytes are skipped; single characters are kept.
    """
    limit = min(len(tokenizer), vocab_size or len(tokenizer))
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                if getattr(t, "special", True)}
    found = []
    for i in range(limit):
        if len(found) >= count:
            break
        if i in special or _is_junk(tokenizer.decode([i])):
            continue
        found.append(i)
    return found


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """Every token of each label, with and without a leading space (how it follows a prompt):
    the extra ids a run's reference bank always holds."""
    ids: list[int] = []
    for label in labels:
        for text in (label, " " + label):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(dict.fromkeys(ids))


def text_token_ids(tokenizer, text: str | None) -> list[int]:
    """The distinct tokens of a text (e.g. the init text), in order of first appearance."""
    if not text:
        return []
    return list(dict.fromkeys(tokenizer(text, add_special_tokens=False)["input_ids"]))


def data_word_ids(tokenizer, texts: Sequence[str], count: int = 20,
                  max_texts: int = 2000) -> list[int]:
    """The `count` most frequent *word* tokens of a data set (3+ letters, e.g. " hate").

    Punctuation and short pieces ("the" excepted by length, ",", " a") dominate raw counts and
    are already near the lowest ids of the bank; words are what a reader recognizes.
    """
    counts: dict[int, int] = {}
    rows = list(texts[:max_texts])
    # one batched call: a fast tokenizer reads the rows together, far faster than one by one
    for ids in (tokenizer(rows, add_special_tokens=False)["input_ids"] if rows else []):
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    words = []
    for i, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        piece = tokenizer.decode([i]).strip()
        if len(piece) >= 3 and piece.isalpha():
            words.append(i)
            if len(words) >= count:
                break
    return words


def _sanitize(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return clean[-60:] or "model"


def _fingerprint(model: torch.nn.Module) -> bytes:
    """A cheap hash input that changes when any weight changes much: 64 samples per tensor."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(name.encode())
        digest.update(sample.tobytes())
    return digest.digest()


def _digest(loaded: LoadedModel, kind: str, ids: Sequence[int]) -> str:
    """A cache file name for this model (name, config, weight samples) and token list."""
    digest = hashlib.sha256()
    digest.update(kind.encode())
    digest.update(loaded.name.encode())
    digest.update(loaded.model.config.to_json_string(use_diff=False).encode())
    digest.update(_fingerprint(loaded.model))
    digest.update(np.asarray(list(ids), dtype=np.int64).tobytes())
    return f"{_sanitize(loaded.name)}-{digest.hexdigest()[:16]}.safetensors"


def bank_path(loaded: LoadedModel, token_ids: Sequence[int], context_id: int) -> Path:
    """cache_root()/banks/<model>-<hash>.safetensors for this model, token list and context."""
    return cache_root() / "banks" / _digest(loaded, BANK_FORMAT, [*token_ids, context_id])


def vocabulary_path(loaded: LoadedModel, token_ids: Sequence[int]) -> Path:
    """cache_root()/banks/<model>-<hash>.safetensors for the model's layer-0 vocabulary."""
    return cache_root() / "banks" / _digest(loaded, VOCABULARY_FORMAT, token_ids)


def _read(path: Path, fmt: str, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            ok = (f.metadata() or {}).get("format") == fmt
    except (SafetensorError, OSError, ValueError):
        return None
    if not ok or tensors.get("token_ids") is None or tensors["token_ids"].tolist() != token_ids:
        return None
    return tensors["keys"].float(), tensors["values"].float()


def _token_vectors(loaded: LoadedModel, token_ids: list[int], context_id: int, use_cache: bool,
                   progress: Callable[[str], None] | None
                   ) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
    """(keys, values) (L, n, H*D) of tokens read at position 1 after context_id, the cache file
    and whether it was read from disk."""
    path = bank_path(loaded, token_ids, context_id)
    if use_cache and path.is_file():
        found = _read(path, BANK_FORMAT, token_ids)
        if found is not None:
            return *found, path, True
    if progress:
        progress(f"reading {len(token_ids)} reference tokens through {loaded.name} (once)")
    start = time.perf_counter()
    context = slot_references(loaded, None, [context_id])  # (L, 2, 1, H, D)
    context = context.permute(0, 1, 3, 2, 4)  # (L, 2, H, 1, D): a one-token cache
    refs = slot_references(loaded, context, token_ids)  # (L, 2, N, H, D), read at position 1
    keys = unrotate_keys(loaded, refs[:, 0].transpose(1, 2), [1])  # (L, H, N, D) in the frame
    keys = keys.transpose(1, 2).flatten(2)  # (L, N, H*D)
    values = refs[:, 1].flatten(2)  # (L, N, H*D)
    keys, values = keys.half(), values.half()  # what the cache holds; returned the same way
    if use_cache:
        atomic_save_tensors(path, {"token_ids": torch.tensor(token_ids), "keys": keys,
                                   "values": values},
                            metadata={"format": BANK_FORMAT, "model": loaded.name,
                                      "context_id": str(context_id),
                                      "seconds": f"{time.perf_counter() - start:.1f}"})
    return keys.float(), values.float(), path, False


def vocabulary_frame(loaded: LoadedModel, *, use_cache: bool = True,
                     progress: Callable[[str], None] | None = None) -> VocabularyFrame | None:
    """Layer 0 of every ordinary token in the key frame (interpret.VocabularyFrame), computed
    once per model and kept on disk (float32: float16 would move near-tied scores). None for
    models with learned positions, whose layer 0 depends on the slot: their vocabulary is
    read slot by slot instead."""
    if family_of(loaded.model.config).rope == "none":
        return None
    vocab = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
    ids = ordinary_token_ids(loaded.tokenizer, vocab)
    path = vocabulary_path(loaded, ids)
    if use_cache and path.is_file():
        found = _read(path, VOCABULARY_FORMAT, ids)
        if found is not None:
            return VocabularyFrame(ids, found[0], found[1], path)
    if progress:
        progress(f"reading layer 0 of all {len(ids)} tokens of {loaded.name} (once)")
    keys, values = frame_references(loaded, ids)  # (V, H*D) each
    if use_cache:
        atomic_save_tensors(path, {"token_ids": torch.tensor(ids), "keys": keys.contiguous(),
                                   "values": values.contiguous()},
                            metadata={"format": VOCABULARY_FORMAT, "model": loaded.name})
    return VocabularyFrame(ids, keys, values, path if use_cache else None)


def _context_id(loaded: LoadedModel, context: str) -> int:
    tok = loaded.tokenizer
    context_ids = tok(context, add_special_tokens=False)["input_ids"] if context else []
    if not context_ids:
        if tok.eos_token_id is None:
            raise InterpretError(f"the bank context {context!r} has no tokens and there is no EOS")
        context_ids = [tok.eos_token_id]
    return context_ids[0]


def model_bank(
    loaded: LoadedModel,
    count: int = DEFAULT_BANK_SIZE,
    *,
    context: str = "\n",
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ReferenceBank:
    """The part of a reference bank every run of a model shares: `count` frequent tokens at
    every layer, and (RoPE models) layer 0 of the whole vocabulary. Built once per model and
    kept on disk; a run's own words join it with `with_words`, which is cheap."""
    tok, model = loaded.tokenizer, loaded.model
    if count < 1:
        raise InterpretError(f"the reference bank needs at least 1 token, got {count}")
    frequent = frequent_token_ids(tok, count, min(len(tok), model.config.vocab_size))
    context_id = _context_id(loaded, context)
    keys, values, path, from_disk = _token_vectors(loaded, frequent, context_id, use_cache,
                                                   progress)
    vocabulary = vocabulary_frame(loaded, use_cache=use_cache, progress=progress)
    vocabulary_cached = vocabulary is None or vocabulary.path is not None
    return ReferenceBank(
        model_name=loaded.name, token_ids=frequent, tokens=[tok.decode([i]) for i in frequent],
        extra_ids=[], keys=keys, values=values, context_id=context_id,
        path=path if use_cache else None, vocabulary=vocabulary,
        loaded_from_disk=from_disk and vocabulary_cached and use_cache)


def with_words(bank: ReferenceBank, loaded: LoadedModel, extra_ids: Sequence[int], *,
               use_cache: bool = True,
               progress: Callable[[str], None] | None = None) -> ReferenceBank:
    """`bank` (a model_bank) with `extra_ids` (e.g. a run's label, init-text and data words)
    read the same way and appended: only the new tokens are read, into a small cache file of
    their own, so a new run's words cost a second or so, not a bank."""
    vocab = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
    bad = [i for i in extra_ids if not 0 <= int(i) < vocab]
    if bad:
        raise InterpretError(f"extra token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    asked = [int(i) for i in dict.fromkeys(extra_ids)]
    known = set(bank.token_ids)
    extras = [i for i in asked if i not in known]
    if not extras:
        return replace(bank, extra_ids=asked)
    keys, values, path, from_disk = _token_vectors(loaded, extras, bank.context_id, use_cache,
                                                   progress)
    return replace(bank, token_ids=bank.token_ids + extras,
                   tokens=bank.tokens + [loaded.tokenizer.decode([i]) for i in extras],
                   extra_ids=asked, keys=torch.cat([bank.keys, keys], 1),
                   values=torch.cat([bank.values, values], 1),
                   words_path=path if use_cache else None,
                   loaded_from_disk=bank.loaded_from_disk and from_disk)


def reference_bank(
    loaded: LoadedModel,
    count: int = DEFAULT_BANK_SIZE,
    extra_ids: Sequence[int] = (),
    *,
    context: str = "\n",
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ReferenceBank:
    """Keys and values of `count` frequent tokens plus `extra_ids`, at every layer.

    Each token is read at position 1, after the first token of `context` (a newline: plain
    text every tokenizer has; special tokens such as SmolLM2-Instruct's BOS <|im_start|> are
    chat markers, not neutral).

    The frequent tokens are computed once per base model and weights and cached as
    safetensors (float16) under cache_root()/banks/; the
    extra ids in a small file of their own (model_bank, with_words).
    """
    vocab = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
    bad = [i for i in extra_ids if not 0 <= int(i) < vocab]
    if bad:  # refused before the model's bank is built
        raise InterpretError(f"extra token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    bank = model_bank(loaded, count, context=context, use_cache=use_cache, progress=progress)
    return with_words(bank, loaded, extra_ids, use_cache=use_cache, progress=progress)


__all__ = [
    "BANK_FORMAT", "DEFAULT_BANK_SIZE", "VOCABULARY_FORMAT", "bank_path", "data_word_ids",
    "frequent_token_ids", "label_token_ids", "model_bank", "reference_bank", "text_token_ids",
    "vocabulary_frame", "vocabulary_path", "with_words",
]
