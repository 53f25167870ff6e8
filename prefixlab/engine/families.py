"""Model families: where each one keeps what a prefix touches, and what differs between them.

A prefix enters every decoder-only transformer the same way (a per-layer key/value cache, a
mask over prefix + input, positions starting at P), but families differ in where their blocks
sit, whether keys are cached after a rotation (RoPE: none, on every dimension, or on the first
`rotary_dim` only) and in whether PrefixLab has a fast training step for them. Those facts are
one `Family` per `model_type`, in `FAMILIES`; nothing else branches on a model's family. An
unlisted family is refused (`family_of`), never guessed: a wrong guess would inject a prefix
that works but inspect it wrongly, or fail deep inside a run.

Adding a family: its row in `FAMILIES`, and its tiny configuration in `TINY_FAMILIES` in
tests/conftest.py, which tests/test_families.py runs (README, "Adding a model family").

This module imports nothing of PrefixLab but its error base, so every module may consult it.
A fast training step is named as "module:function" and imported on first use: the step's
module (e.g. `prefixlab.engine.llama_cpu`) is loaded only by a process that trains.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from prefixlab.errors import PrefixLabError

RopeKind = Literal["none", "full", "partial"]


class UnknownFamilyError(PrefixLabError, ValueError):
    """A model whose family PrefixLab has no row for."""


class TrainingLoss(Protocol):
    """A family's fast training step: `prefixlab.engine.train.batch_loss`'s value and gradient
    computed another way. train() calls it per chunk of a batch, `release()` after that chunk's
    backward (what it kept may be reused), and `close()` when training ends."""

    def __call__(self, model: nn.Module, kv: torch.Tensor, batch) -> torch.Tensor: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Family:
    """Where one model family keeps the parts a prefix touches (dotted attribute paths)."""

    name: str  # the config's model_type
    layers: str  # from the CausalLM to its list of decoder blocks
    final_norm: str  # from the CausalLM to the norm before the LM head
    attention: str  # attribute of a block holding self-attention
    out_proj: str  # attribute of the attention module projecting heads back to the residual
    rope: RopeKind
    """none: learned or no positions. full/partial: keys are cached after rotation (a prefix
    taken from text is rotated at 0..P-1), on all of a head's dimensions or on the first
    `rotary_dim(config)` of them (the rest pass through unrotated)."""
    rotary: str = ""  # from the CausalLM to the rotary embedding module; "" without RoPE
    fast_loss: str | None = None
    """"module:function" giving a `TrainingLoss` for a model, or None where it does not apply
    (e.g. on CUDA); train() falls back to autograd through the model's own modules."""

    def rotary_dim(self, config) -> int:
        """How many leading dimensions of each key head RoPE rotates (0 without RoPE)."""
        if self.rope == "none":
            return 0
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if self.rope == "full":
            return head_dim
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor",
                          getattr(config, "partial_rotary_factor", None))
        if factor is None:
            raise UnknownFamilyError(
                f"{self.name} is listed with partial RoPE but its config has no "
                f"partial_rotary_factor: fix its row in prefixlab/engine/families.py")
        return int(head_dim * factor)

    def fast_training_loss(self, model: nn.Module) -> TrainingLoss | None:
        """The family's fast training step for `model`, or None (none, or not for this model)."""
        if self.fast_loss is None:
            return None
        module, function = self.fast_loss.split(":")
        factory: Callable[[nn.Module], TrainingLoss | None] = getattr(
            importlib.import_module(module), function)
        return factory(model)


def _llama_like(name: str, fast_loss: str | None = None) -> Family:
    return Family(name, "model.layers", "model.norm", "self_attn", "o_proj", "full",
                  "model.rotary_emb", fast_loss)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "transformer.h", "transformer.ln_f", "attn", "c_proj", "none"),
    _llama_like("llama", fast_loss="prefixlab.engine.llama_cpu:lean_training_loss"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),
    Family("phi", "model.layers", "model.final_layernorm", "self_attn", "dense", "partial",
           "model.rotary_emb"),
    Family("gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "attention", "dense",
           "partial", "gpt_neox.rotary_emb"),
)}


_CACHE_KEYWORD: dict[type, str] = {}


def family_of(config) -> Family:
    """The family of a model config; an unlisted `model_type` is refused."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnknownFamilyError(
            f"model family {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(FAMILIES))}. A new decoder-only family is one row in "
            f"prefixlab/engine/families.py (see README, 'Adding a model family')")
    return family


# --- transformers-version shims -------------------------------------------------------------
# These follow the transformers version, not the family: every family takes the same keyword.
# A family with a quirk of its own here would get a field in `Family`.


def cache_keyword(model: nn.Module) -> str:
    """The forward/generate keyword taking a cache: `cache` on transformers >= 5.24,
    `past_key_values` before, where forward silently ignores `cache`."""
    cls = type(model)
    if cls not in _CACHE_KEYWORD:
        params = inspect.signature(model.forward).parameters
        _CACHE_KEYWORD[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORD[cls]


def returned_cache(output):
    """The cache a forward returned: `output.cache` on 5.24, `past_key_values` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
