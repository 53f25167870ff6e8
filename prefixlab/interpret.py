"""Look inside a prefix: the key frame, slot references, nearest tokens, value readout, attention.

Arrays and dataclasses only; figures are in plots.py. Every readout here compares the prefix
with *reference* key/values: what the frozen model itself caches when it reads real tokens.

The frame (what "the reference of a token" means)
-------------------------------------------------
A prefix position p at layer l is compared with the **slot reference** of a token v: the key
and value the model caches at position p, layer l, when it reads v right after the prefix's own
positions 0..p-1 (exactly as if v sat in the prefix's slot p). This is exact for a prefix taken
from real text: its position p *is* the cache of its token read after positions 0..p-1, so
every position projects back to its own token at rank 1 at every layer, for keys and values,
for RoPE models (keys cached after rotation at p, and so is the reference) and for learned
absolute positions. It also stays honest for a trained prefix: the reading answers "which real
token, read in this slot after the same preceding virtual tokens, would the model cache closest
to this vector?" -- not "what the prefix means".

Cost and the shortlist. Layer 0's keys/values do not depend on context, so layer 0 is ranked
against the whole reference bank (N tokens) in one cheap pass. Deeper layers need a forward
pass of every candidate in every slot (N x P token reads, minutes for N=2000, P=10 on a 2-core
CPU with SmolLM2-135M), so by default they rank a shortlist per position: the position's
top layer-0 matches for keys and values, the extra ids (label words) and a fixed spread of
anchor tokens. `shortlist=None` ranks every bank token at every layer (fast on a GPU). Each
result says how many tokens it was ranked among.

Scores are centered cosines: both vectors minus the mean of the anchor tokens' references in
that slot. Raw cosines of keys are ~0.8 between *any* two tokens (keys share a large common
direction), which would make every match look strong. The random baseline runs the same
readout on random vectors of the same norm, so a score means something only well above it.

The modules: this one holds the frame and the readouts that rank or read the prefix
(nearest tokens, value readout, attention); interpret_bank.py builds and caches the reference
bank; interpret_maps.py places prefixes in PCA maps, follows them over training and compares
them; inspection.py writes a run's inspection (JSON and the standalone page).
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prefixlab.errors import PrefixLabError
from prefixlab.models import LoadedModel, architecture, get_module
from prefixlab.prefix import build_cache, cache_keyword, prefix_inputs

CAVEAT = (
    "These readouts describe where the prefix sits among real tokens' keys and values; they do "
    "not explain what it does. A continuous prompt can be near the vectors of unrelated, even "
    "misleading, tokens and still solve its task (Khashabi et al. 2022, \"Prompt Waywardness\"), "
    "so a nearest token is a hint, not an explanation. That is why every match shows its score "
    "and the score random vectors of the same norm get: a match close to the random baseline "
    "means nothing. The value readout assumes every head attends only to that position and "
    "reads the result as if it were the whole residual stream (a logit-lens view)."
)

METHOD = (
    "Slot references: position p of layer l is compared with the key/value the model caches at "
    "position p when it reads a real token right after the prefix's positions 0..p-1. A prefix "
    "copied from real text projects back to its own tokens at rank 1. Layer 0 is ranked against "
    "the whole reference bank; deeper layers against a shortlist per position (the layer-0 "
    "matches, label words and fixed anchor tokens) unless the full bank was asked for. Scores "
    "are cosines after subtracting the anchor tokens' mean in that slot."
)

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
    """The rotary embedding module next to the decoder blocks (model.rotary_emb in Llama)."""
    arch = architecture(model.config)
    parent_path = arch.layers.rsplit(".", 1)[0]
    rotary = getattr(get_module(model, parent_path), "rotary_emb", None)
    if rotary is None:
        raise InterpretError(
            f"{type(model).__name__} is marked as RoPE but has no {parent_path}.rotary_emb; "
            f"keys cannot be put in a common frame"
        )
    return rotary


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def unrotate_keys(loaded: LoadedModel, keys: torch.Tensor, positions: torch.Tensor | Sequence[int],
                inverse: bool = False) -> torch.Tensor:
    """Undo RoPE on keys (..., T, D) cached at positions[t]: the key frame, as at position 0.

    inverse=True applies the rotation instead (frame -> the key cached at that position).
    The identity for models without RoPE. Uses the model's own rotary module, so RoPE
    scaling variants are undone exactly as they were applied.
    """
    model = loaded.model
    if not architecture(model.config).rope:
        return keys.clone()
    positions = torch.as_tensor(positions, dtype=torch.long).view(1, -1)  # (1, T)
    probe = torch.zeros(1, dtype=torch.float32, device=loaded.device)
    cos, sin = _rotary(model)(probe, positions.to(loaded.device))  # (1, T, D)
    zero_cos, _ = _rotary(model)(probe, torch.zeros_like(positions[:, :1]).to(loaded.device))
    scale = zero_cos[0, 0]  # (D,): rope's attention_scaling, 1.0 for plain RoPE
    cos = (cos[0] / scale).to(keys.device, keys.dtype)  # (T, D)
    sin = (sin[0] / scale).to(keys.device, keys.dtype)
    if inverse:
        return keys * cos + _rotate_half(keys) * sin
    return keys * cos - _rotate_half(keys) * sin


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
    arch = architecture(model.config)
    reads = 1 if arch.rope else length
    attention = getattr(get_module(model, arch.layers)[0], arch.attention)

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
    if arch.rope:
        refs = refs.expand(-1, -1, -1, length, -1).clone()  # (2, n, H, length, D)
        refs[0] = unrotate_keys(loaded, refs[0], torch.arange(length), inverse=True)
    return refs.permute(0, 1, 3, 2, 4).contiguous()  # (2, n, length, H, D)


# --- the reference bank (built and cached by interpret_bank.py) ------------------------------


@dataclass
class ReferenceBank:
    """Real tokens' keys and values per layer, read in a neutral slot (see the module doc)."""

    model_name: str
    token_ids: list[int]  # the frequent tokens, then the extra ids
    tokens: list[str]  # decoded text of each token
    extra_ids: list[int]  # ids asked for beyond the frequent ones (e.g. label words)
    keys: torch.Tensor  # (L, N, H_kv*D) in the key frame (RoPE undone)
    values: torch.Tensor  # (L, N, H_kv*D)
    context_id: int  # the token read before each bank token
    path: Path | None = None  # the cache file, when there is one
    loaded_from_disk: bool = False

    def vectors(self, kind: str) -> torch.Tensor:
        return self.keys if _kind_index(kind) == 0 else self.values


# --- nearest tokens ---------------------------------------------------------------------------


def _rank(x: torch.Tensor, refs: torch.Tensor, center: torch.Tensor, k: int,
          noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centered-cosine top-k of x (F,) among refs (n, F), and random vectors' top-1 scores.

    noise (R, F): unit random directions, scaled to |x| before centering, so that the
    baseline runs exactly the readout a random vector of the prefix's norm would get.
    """
    refs_c = _unit(refs - center)  # (n, F)
    scores = refs_c @ _unit(x - center)  # (n,)
    top = scores.topk(k)
    randoms = noise * x.norm()  # (R, F)
    random_top1 = (_unit(randoms - center) @ refs_c.T).max(dim=1).values  # (R,)
    return top.indices, top.values, random_top1


@dataclass
class NearestTokens:
    """Per layer, kind and prefix position: the top-k real tokens by centered cosine."""

    token_ids: np.ndarray  # (L, 2, P, k) int: [.., 0, ..] keys, [.., 1, ..] values
    scores: np.ndarray  # (L, 2, P, k) centered cosine, best first
    baseline: np.ndarray  # (L, 2, P): mean top-1 score of random vectors of the same norm
    baseline_std: np.ndarray  # (L, 2, P)
    ranked_among: np.ndarray  # (L, P): how many tokens each position was ranked among
    labels: dict[int, str] = field(default_factory=dict)  # token id -> decoded text

    @property
    def margin(self) -> np.ndarray:
        """(L, 2, P): top-1 score minus the random baseline."""
        return self.scores[..., 0] - self.baseline

    def top(self, layer: int, kind: str, position: int) -> list[tuple[str, int, float]]:
        i = _kind_index(kind)
        return [(self.labels[int(t)], int(t), float(s)) for t, s in
                zip(self.token_ids[layer, i, position], self.scores[layer, i, position],
                    strict=True)]


@torch.no_grad()
def nearest_tokens(
    loaded: LoadedModel,
    kv: torch.Tensor,
    bank: ReferenceBank,
    top_k: int = 10,
    *,
    shortlist: int | None = 16,
    anchors: int = 16,
    samples: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> NearestTokens:
    """The real tokens closest to each prefix position, layer and kind (see the module doc).

    kv: (L, 2, H_kv, P, D). shortlist: layer-0 matches per kind kept as candidates for deeper
    layers (at least top_k); None ranks the whole bank at every layer (N x P token reads).
    anchors: evenly spread bank tokens always read; their mean in each slot centers the scores.
    samples: random vectors per position for the baseline.
    """
    _check_kv(loaded, kv)
    kv = kv.detach().float().cpu()
    L, _, H, P, D = kv.shape
    ids = bank.token_ids
    N = len(ids)
    k = min(top_k, N)
    anchor_idx = sorted(set(np.linspace(0, N - 1, min(anchors, N)).round().astype(int).tolist()))
    extra_idx = [ids.index(i) for i in bank.extra_ids]
    generator = torch.Generator().manual_seed(seed)
    noise = _unit(torch.randn(samples, H * D, generator=generator))  # (R, H*D)

    top_ids = np.zeros((L, 2, P, k), dtype=np.int64)
    top_scores = np.zeros((L, 2, P, k), dtype=np.float32)
    base_mean = np.zeros((L, 2, P), dtype=np.float32)
    base_std = np.zeros((L, 2, P), dtype=np.float32)
    ranked = np.zeros((L, P), dtype=np.int64)
    id_tensor = torch.tensor(ids)

    def record(layer, kind, p, idx, scores, random_top1, pool):
        top_ids[layer, kind, p] = pool[idx].numpy()
        top_scores[layer, kind, p] = scores.numpy()
        base_mean[layer, kind, p] = float(random_top1.mean())
        base_std[layer, kind, p] = float(random_top1.std()) if len(random_top1) > 1 else 0.0

    first = first_layer_references(loaded, ids, P).flatten(3)  # (2, N, P, H*D)
    vectors = kv.permute(0, 1, 3, 2, 4).flatten(3)  # (L, 2, P, H*D): heads concatenated
    pools: list[list[int]] = []  # per position: bank rows read in that slot for layers >= 1
    for p in range(P):
        candidates: set[int] = set(anchor_idx) | set(extra_idx)
        for kind in range(2):
            refs = first[kind, :, p]  # (N, H*D)
            center = refs[anchor_idx].mean(0)
            idx, scores, rnd = _rank(vectors[0, kind, p], refs, center, k, noise)
            record(0, kind, p, idx, scores, rnd, id_tensor)
            if shortlist is not None:
                wide = _unit(refs - center) @ _unit(vectors[0, kind, p] - center)
                candidates |= set(wide.topk(min(max(shortlist, k), N)).indices.tolist())
        ranked[0, p] = N
        pools.append(list(range(N)) if shortlist is None else sorted(candidates))
    if L > 1:
        flat = [ids[i] for pool in pools for i in pool]
        if progress:
            progress(f"nearest tokens: reading {len(flat)} candidates in {P} prefix slots")
        slots = [p for p, pool in enumerate(pools) for _ in pool]
        refs_all = slot_references(loaded, kv, flat, slots).flatten(3)  # (L, 2, sum n, H*D)
        offset = 0
        for p, pool_idx in enumerate(pools):
            n = len(pool_idx)
            pool = id_tensor[pool_idx]
            anchor_rows = [pool_idx.index(a) for a in anchor_idx]
            for layer in range(1, L):
                for kind in range(2):
                    refs = refs_all[layer, kind, offset:offset + n]  # (n, H*D)
                    center = refs[anchor_rows].mean(0)
                    idx, scores, rnd = _rank(vectors[layer, kind, p], refs, center, min(k, n),
                                             noise)
                    pad = k - len(idx)  # fewer candidates than top_k: repeat the last
                    record(layer, kind, p, torch.cat([idx, idx[-1:].repeat(pad)]),
                           torch.cat([scores, scores[-1:].repeat(pad)]), rnd, pool)
                ranked[layer, p] = n
            offset += n
    labels = {int(i): bank.tokens[ids.index(int(i))] for i in np.unique(top_ids)}
    return NearestTokens(top_ids, top_scores, base_mean, base_std, ranked, labels)


# --- value readout ----------------------------------------------------------------------------


@dataclass
class ValueReadout:
    """Per layer and position: the tokens a prefix value promotes through out_proj and LM head."""

    token_ids: np.ndarray  # (L, P, k)
    logits: np.ndarray  # (L, P, k), best first
    labels: dict[int, str] = field(default_factory=dict)


@torch.no_grad()
def value_logits(loaded: LoadedModel, kv: torch.Tensor) -> torch.Tensor:
    """Logits (L, P, V) of each prefix value written to the residual stream and unembedded.

    Query head h reads KV head h // (H / H_kv) (GQA, as the model repeats them); if every head
    attended only to position p, the attention output is those values concatenated over query
    heads, then the layer's out_proj (bias included). The result goes through the final norm
    and the LM head as if it were the whole residual stream (logit lens).
    """
    _check_kv(loaded, kv)
    model = loaded.model
    arch = architecture(model.config)
    blocks = get_module(model, arch.layers)
    heads = model.config.num_attention_heads
    L, _, H_kv, P, D = kv.shape
    group = heads // H_kv
    written = []
    for layer, block in enumerate(blocks):
        values = kv[layer, 1].to(loaded.device, torch.float32)  # (H_kv, P, D)
        per_head = values.repeat_interleave(group, dim=0)  # (H, P, D)
        merged = per_head.permute(1, 0, 2).reshape(P, heads * D)  # (P, H*D)
        out_proj = getattr(getattr(block, arch.attention), arch.out_proj)
        written.append(out_proj(merged))  # (P, hidden)
    normed = get_module(model, arch.final_norm)(torch.stack(written))  # (L, P, hidden)
    return model.get_output_embeddings()(normed).float().cpu()  # (L, P, V)


def value_readout(loaded: LoadedModel, kv: torch.Tensor, top_k: int = 10) -> ValueReadout:
    """The top_k tokens each prefix value promotes (see value_logits)."""
    logits = value_logits(loaded, kv)
    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    ids = top.indices.numpy()
    labels = {int(i): loaded.tokenizer.decode([int(i)]) for i in np.unique(ids)}
    return ValueReadout(ids, top.values.numpy(), labels)


# --- attention to the prefix ------------------------------------------------------------------


_TWINS: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()
_TWINS_LOCK = threading.Lock()


def eager_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The model with eager attention (the only kind that returns its weights), for reading
    attention maps without touching the shared model.

    A second module tree over the *same* parameter and buffer tensors, with its own config set
    to eager: switching the shared model instead (as this once did) changed the attention of
    every request running on it meanwhile. The twin costs module objects and a config copy, no
    weights (~3 MB of Python objects for the default 135M model, against 540 MB for a second
    loaded copy). Made once per model and kept while the model lives.
    """
    if model.config._attn_implementation == "eager":
        return model
    with _TWINS_LOCK:
        twin = _TWINS.get(model)
        if twin is None:
            shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
            twin = copy.deepcopy(model, memo=shared)
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


def prefix_attention(loaded: LoadedModel, prefixes: Mapping[str, torch.Tensor] | torch.Tensor,
                     texts: Sequence[str]) -> AttentionMass:
    """Attention mass on the prefix slots, averaged over each text's tokens, then over texts."""
    named = _named(prefixes)
    if not texts:
        raise InterpretError("give at least one text to read after the prefix")
    masses = []
    for kv in named.values():
        P = kv.shape[3]
        per_text = [attention_maps(loaded, kv, t)[..., :P].sum(-1).mean(-1) for t in texts]
        masses.append(np.mean(per_text, axis=0))  # (L, H)
    return AttentionMass(list(named), list(texts), np.stack(masses))


__all__ = [
    "CAVEAT", "KINDS", "METHOD", "AttentionMass", "InterpretError", "NearestTokens",
    "ReferenceBank", "ValueReadout", "attention_maps", "eager_twin",
    "first_layer_references", "key_frame", "nearest_tokens", "prefix_attention",
    "slot_references", "unrotate_keys", "value_logits", "value_readout",
]
