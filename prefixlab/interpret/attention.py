"""Attention to the prefix: the input's attention maps and the share each layer pays the prefix.

The maps come from an eager-attention twin of the model that shares its weights, so a request
reading them never changes the attention of others running on the shared model.
"""


from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prefixlab.engine.models import LoadedModel
from prefixlab.engine.prefix import prefix_inputs
from prefixlab.interpret.frame import InterpretError, _check_kv, _named

# --- attention to the prefix ------------------------------------------------------------------


def weight_sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree (own modules, config, hooks) over the model's own parameter and
    buffer tensors: changing how the copy runs never changes the shared model, and no weight
    is copied."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)


_TWINS: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()
_TWINS_LOCK = threading.Lock()


def eager_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The model with eager attention (the only kind that returns its weights), for reading
    attention maps without touching the shared model.

    A second module tree over the *same* parameter and buffer tensors, with its own config set
    to eager: switching the shared model instead (as this once did) changed the attention of
    every request running on it meanwhile. The twin costs module objects and a config copy, no
    weights. Made once per model and kept while the model lives.
    """
    if model.config._attn_implementation == "eager":
        return model
    with _TWINS_LOCK:
        twin = _TWINS.get(model)
        if twin is None:
            twin = weight_sharing_copy(model)
            twin.set_attn_implementation("eager")
            _TWINS[model] = twin
        return twin


@torch.no_grad()
def attention_maps(loaded: LoadedModel, kv: torch.Tensor | None, text: str) -> np.ndarray:
    """Attention weights (L, H, T, P+T) when `text` is read after the prefix (P=0 without).

    Heads are query heads. Key slots 0..P-1 are the prefix, then the text's T tokens.
    """
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InterpretError(f"the text {text!r} has no tokens")
    if kv is not None:
        _check_kv(loaded, kv)
        kv = kv.to(loaded.device, torch.float32)
    input_ids = torch.tensor([ids], device=loaded.device)
    mask = torch.ones_like(input_ids)
    model = eager_twin(loaded.model)
    out = model(input_ids=input_ids, output_attentions=True, use_cache=kv is not None,
                logits_to_keep=1, **prefix_inputs(model, kv, mask))
    return torch.stack(out.attentions)[:, 0].float().cpu().numpy()  # (L, H, T, P+T)


@dataclass
class AttentionMass:
    """Share of attention each layer and head puts on the prefix, per prefix."""

    names: list[str]
    texts: list[str]
    mass: np.ndarray  # (R, L, H) in [0, 1]: mean over texts and their query positions
    # (R, T, P): the share of *all* attention each slot takes, per text (mean over layers,
    # heads and query positions): a slot high on every text holds attention whatever the input
    slots: np.ndarray | None = None


def prefix_attention(loaded: LoadedModel, prefixes: Mapping[str, torch.Tensor] | torch.Tensor,
                     texts: Sequence[str]) -> AttentionMass:
    """Attention mass on the prefix slots, averaged over each text's tokens, then over texts."""
    named = _named(prefixes)
    if not texts:
        raise InterpretError("give at least one text to read after the prefix")
    masses, slots = [], []
    for kv in named.values():
        P = kv.shape[3]
        maps = [attention_maps(loaded, kv, t)[..., :P] for t in texts]  # each (L, H, T, P)
        masses.append(np.mean([m.sum(-1).mean(-1) for m in maps], axis=0))  # (L, H)
        slots.append(np.stack([m.mean((0, 1, 2)) for m in maps]))  # (T, P)
    return AttentionMass(list(named), list(texts), np.stack(masses), np.stack(slots))
