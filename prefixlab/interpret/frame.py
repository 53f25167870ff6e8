"""The key frame and slot references: what "the reference of a token" means.

A prefix position p at layer l is compared with the **slot reference** of a token v: the key
and value the model caches at position p, layer l, when it reads v right after the prefix's own
positions 0..p-1 (exactly as if v sat in the prefix's slot p). This is exact for a prefix taken
from real text: its position p *is* the cache of its token read after positions 0..p-1, so
every position projects back to its own token at rank 1 at every layer, for keys and values,
for RoPE models (keys cached after rotation at p, and so is the reference) and for learned
absolute positions. It also stays honest for a trained prefix: the reading answers "which real
token, read in this slot after the same preceding virtual tokens, would the model cache closest
to this vector?" -- not "what the prefix means". Keys are compared in the key frame: with the
rotation of their position undone, so positions share one space.

Arrays and dataclasses only, as in every interpret module; figures are in figures/plots.py.
Beside this module: nearest.py ranks real tokens near each position, values.py reads what the
values write, attention.py how much the input attends to the prefix, bank.py builds and
caches the reference bank, maps.py places prefixes in PCA maps, knockout.py measures what
each part does, summary.py says it in words.
"""


from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import suppress

import torch

from prefixlab.engine.families import cache_keyword, family_of
from prefixlab.engine.models import LoadedModel, get_module
from prefixlab.engine.prefix import build_cache
from prefixlab.errors import PrefixLabError

KINDS = ("key", "value")
_CHUNK_TOKENS = 4096  # token reads per forward pass: bounds memory on large vocab banks


class InterpretError(PrefixLabError, ValueError):
    """A prefix, run or request that cannot be inspected as asked."""


# --- shared checks -----------------------------------------------------------------------------


def _kind_index(kind: str) -> int:
    if kind not in KINDS:
        raise InterpretError(f"kind must be 'key' or 'value', got {kind!r}")
    return KINDS.index(kind)


def _check_kv(loaded: LoadedModel, kv: torch.Tensor) -> None:
    shape = loaded.shape
    expected = (shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
    if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != expected:
        raise InterpretError(
            f"prefix of shape {tuple(kv.shape)} does not fit {loaded.name}: expected "
            f"(L={expected[0]}, 2, H_kv={expected[2]}, P, D={expected[3]})"
        )


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _named(prefixes: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(prefixes, torch.Tensor):
        return {"prefix": prefixes}
    if not prefixes:
        raise InterpretError("no prefixes given")
    return dict(prefixes)


# --- key frame: undoing RoPE ----------------------------------------------------------------


def _rotary(model: torch.nn.Module) -> torch.nn.Module:
    """The rotary embedding module at the path the model's family names."""
    family = family_of(model.config)
    try:
        return get_module(model, family.rotary)
    except AttributeError as e:
        raise InterpretError(
            f"{type(model).__name__} is listed with RoPE but has no {family.rotary}; "
            f"keys cannot be put in a common frame (fix its row in prefixlab/engine/families.py)"
        ) from e


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def unrotate_keys(loaded: LoadedModel, keys: torch.Tensor, positions: torch.Tensor | Sequence[int],
                inverse: bool = False) -> torch.Tensor:
    """Undo RoPE on keys (..., T, D) cached at positions[t]: the key frame, as at position 0.

    inverse=True applies the rotation instead (frame -> the key cached at that position).
    The identity for models without RoPE; with partial RoPE only the first
    `rotary_dim` dimensions turn. Uses the model's own rotary module, so RoPE
    scaling variants are undone exactly as they were applied.
    """
    model = loaded.model
    family = family_of(model.config)
    if family.rope == "none":
        return keys.clone()
    positions = torch.as_tensor(positions, dtype=torch.long).view(1, -1)  # (1, T)
    probe = torch.zeros(1, dtype=torch.float32, device=loaded.device)
    cos, sin = _rotary(model)(probe, positions.to(loaded.device))  # (1, T, R)
    zero_cos, _ = _rotary(model)(probe, torch.zeros_like(positions[:, :1]).to(loaded.device))
    scale = zero_cos[0, 0]  # (R,): rope's attention_scaling, 1.0 for plain RoPE
    cos = (cos[0] / scale).to(keys.device, keys.dtype)  # (T, R)
    sin = (sin[0] / scale).to(keys.device, keys.dtype)
    R = family.rotary_dim(model.config)  # partial RoPE rotates the first R of D dimensions
    if cos.shape[-1] != R:
        raise InterpretError(
            f"{type(model).__name__} rotates {cos.shape[-1]} dimensions per head where its "
            f"family row says {R}: fix its row in prefixlab/engine/families.py")
    rotated, kept = keys[..., :R], keys[..., R:]
    sign = 1 if inverse else -1
    return torch.cat([rotated * cos + sign * _rotate_half(rotated) * sin, kept], dim=-1)


def key_frame(loaded: LoadedModel, kv: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """kv (L, 2, H_kv, P, D) with keys moved to the key frame (inverse: out of it); values kept."""
    out = kv.clone()
    positions = torch.arange(kv.shape[3])
    out[:, 0] = unrotate_keys(loaded, kv[:, 0], positions, inverse)
    return out


# --- slot references --------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once layer 0 has filled its cache: nothing deeper is needed."""


def _cache_keys_values(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = cache.layers[layer]
    return entry.keys, entry.values  # (B, H, T, D) each


@torch.no_grad()
def slot_references(loaded: LoadedModel, context: torch.Tensor | None,
                    token_ids: Sequence[int],
                    positions: Sequence[int] | None = None) -> torch.Tensor:
    """What the model caches for each token read in a slot after `context`: (L, 2, n, H_kv, D).

    `context` is a key/value cache (L, 2, H_kv, C, D) (e.g. a prefix) or None. Token i is read
    alone at position positions[i] (default C) seeing only context[..., :positions[i], :]: the
    later context slots are masked out, so one batched pass serves every slot of a prefix.
    All layers, float32 on CPU.
    """
    from transformers import DynamicCache

    model = loaded.model
    base = model.base_model  # no LM head: only the cache is wanted
    C = 0 if context is None else context.shape[3]
    slots = [C] * len(token_ids) if positions is None else [int(p) for p in positions]
    if len(slots) != len(token_ids) or any(not 0 <= p <= C for p in slots):
        raise InterpretError(f"positions must be one per token, each in 0..{C}")
    if context is not None:
        context = context.to(loaded.device, torch.float32)
    chunk = max(1, _CHUNK_TOKENS // (C + 1))
    parts = []
    for start in range(0, len(token_ids), chunk):
        ids = torch.tensor(list(token_ids[start:start + chunk]), device=loaded.device)
        pos = torch.tensor(slots[start:start + chunk], device=loaded.device)  # (b,)
        b = ids.shape[0]
        cache = (build_cache(context, b, model) if context is not None
                 else DynamicCache(config=model.config))
        seen = torch.arange(C, device=loaded.device) < pos[:, None]  # (b, C)
        mask = torch.cat([seen, torch.ones(b, 1, dtype=torch.bool, device=loaded.device)], 1)
        base(input_ids=ids.view(b, 1), attention_mask=mask.long(),  # (b, C+1)
             position_ids=pos.view(b, 1), use_cache=True, **{cache_keyword(base): cache})
        layers = [_cache_keys_values(cache, i) for i in range(len(cache.layers))]
        keys = torch.stack([k[:, :, -1] for k, _ in layers])  # (L, b, H, D)
        values = torch.stack([v[:, :, -1] for _, v in layers])
        parts.append(torch.stack([keys, values], dim=1).float().cpu())  # (L, 2, b, H, D)
    return torch.cat(parts, dim=2)  # (L, 2, n, H, D)


@torch.no_grad()
def first_layer_references(loaded: LoadedModel, token_ids: Sequence[int],
                           length: int) -> torch.Tensor:
    """Layer-0 key/values of each token at positions 0..length-1: (2, n, length, H_kv, D).

    Layer 0 reads no context, so these are the slot references of layer 0 for *any* prefix.
    RoPE models read each token once at position 0 and rotate; models with learned positions
    read each token at every position (the model stops after layer 0's attention).
    """
    from transformers import DynamicCache

    model = loaded.model
    base = model.base_model
    family = family_of(model.config)
    reads = length if family.rope == "none" else 1
    attention = getattr(get_module(model, family.layers)[0], family.attention)

    caller = threading.get_ident()

    def stop(*_):
        # The hook sits on the shared model: other threads' forwards pass through untouched.
        if threading.get_ident() == caller:
            raise _StopForward

    hook = attention.register_forward_hook(stop)
    parts = []
    try:
        chunk = max(1, _CHUNK_TOKENS // reads)
        for start in range(0, len(token_ids), chunk):
            ids = torch.tensor(list(token_ids[start:start + chunk]), device=loaded.device)
            b = ids.shape[0]
            cache = DynamicCache(config=model.config)
            with suppress(_StopForward):  # raised once layer 0 has cached its keys/values
                base(input_ids=ids.view(b, 1).expand(b, reads),  # (b, reads): v v v ...
                     attention_mask=torch.ones(b, reads, dtype=torch.long, device=loaded.device),
                     position_ids=torch.arange(reads, device=loaded.device).expand(b, reads),
                     use_cache=True, **{cache_keyword(base): cache})
            keys, values = _cache_keys_values(cache, 0)  # (b, H, reads, D)
            parts.append(torch.stack([keys, values]).float().cpu())  # (2, b, H, reads, D)
    finally:
        hook.remove()
    refs = torch.cat(parts, dim=1)  # (2, n, H, reads, D)
    if family.rope != "none":
        refs = refs.expand(-1, -1, -1, length, -1).clone()  # (2, n, H, length, D)
        refs[0] = unrotate_keys(loaded, refs[0], torch.arange(length), inverse=True)
    return refs.permute(0, 1, 3, 2, 4).contiguous()  # (2, n, length, H, D)
