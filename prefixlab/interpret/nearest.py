"""Nearest tokens: which real tokens' slot references sit closest to each prefix position.

Cost and the shortlist. Layer 0's keys/values do not depend on context, so layer 0 is ranked
against the whole vocabulary. For RoPE models the bank keeps every token's layer-0 key (in the
key frame) and value once per model (`VocabularyFrame`), and ranking is one matmul; models
with learned positions read the vocabulary slot by slot. Deeper layers need a forward pass of
every candidate in every slot (N x P token reads), so by default they rank a shortlist per
position: the position's top layer-0 matches for keys and values, the extra ids (the run's
words) and a fixed spread of anchor tokens. `shortlist=None` ranks every bank token at every
layer (fast on a GPU). Each result says how many tokens it was ranked among.

Scores are centered cosines: both vectors minus the mean of the anchor tokens' references in
that slot. Raw cosines of keys are ~0.8 between *any* two tokens (keys share a large common
direction), which would make every match look strong. The random baseline runs the same
readout on random vectors of the same norm, so a score means something only well above it.
"""


from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prefixlab.engine.families import family_of
from prefixlab.engine.models import LoadedModel
from prefixlab.interpret.frame import (
    _CHUNK_TOKENS,
    InterpretError,
    _check_kv,
    _kind_index,
    _unit,
    first_layer_references,
    slot_references,
    unrotate_keys,
)

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


# --- the reference bank (built and cached by bank.py) -----------------------------------------


@dataclass
class VocabularyFrame:
    """Layer-0 keys (in the key frame) and values of every ordinary token of a RoPE model.

    Layer 0 reads no context and RoPE only turns keys, so in the key frame these are the
    layer-0 slot references of *every* slot of *any* prefix: ranking a prefix's layer 0
    against the whole vocabulary is then one matmul (see nearest_tokens).
    """

    token_ids: list[int]  # ordinary_token_ids of the model, in order
    keys: torch.Tensor  # (V, H_kv*D) in the key frame
    values: torch.Tensor  # (V, H_kv*D)
    path: Path | None = None  # the cache file, when there is one


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
    path: Path | None = None  # the cache file of the frequent tokens (one per model), if any
    loaded_from_disk: bool = False  # nothing had to be computed
    words_path: Path | None = None  # the cache file of the extra ids' part, if any
    vocabulary: VocabularyFrame | None = None  # RoPE models: layer 0 of the whole vocabulary

    def vectors(self, kind: str) -> torch.Tensor:
        return self.keys if _kind_index(kind) == 0 else self.values

    @property
    def key(self) -> str | None:
        """Names what the bank holds (its cache files name model, weights and token lists);
        None when it is not cached."""
        if self.path is None:
            return None
        parts = [self.path.name, self.words_path.name if self.words_path else ""]
        if self.vocabulary is not None and self.vocabulary.path is not None:
            parts.append(self.vocabulary.path.name)
        return "|".join(parts)


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

    def to_dict(self) -> dict:
        """Plain lists (JSON): what a run folder keeps so a later open need not rank again."""
        return {"token_ids": self.token_ids.tolist(), "scores": self.scores.tolist(),
                "baseline": self.baseline.tolist(), "baseline_std": self.baseline_std.tolist(),
                "ranked_among": self.ranked_among.tolist(),
                "labels": {str(k): v for k, v in self.labels.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> NearestTokens:
        return cls(np.asarray(d["token_ids"], dtype=np.int64),
                   np.asarray(d["scores"], dtype=np.float32),
                   np.asarray(d["baseline"], dtype=np.float32),
                   np.asarray(d["baseline_std"], dtype=np.float32),
                   np.asarray(d["ranked_among"], dtype=np.int64),
                   {int(k): v for k, v in d["labels"].items()})

    def top(self, layer: int, kind: str, position: int) -> list[tuple[str, int, float]]:
        i = _kind_index(kind)
        return [(self.labels[int(t)], int(t), float(s)) for t, s in
                zip(self.token_ids[layer, i, position], self.scores[layer, i, position],
                    strict=True)]


def ordinary_token_ids(tokenizer, vocab_size: int | None = None) -> list[int]:
    """Every id of the vocabulary except special tokens: what layer 0 ranks prefixes among.

    Limited to ids both the tokenizer and the model's embedding know (they can differ: padded
    embedding matrices, added tokens).
    """
    limit = min(len(tokenizer), vocab_size or len(tokenizer))
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                if getattr(t, "special", True)}
    return [i for i in range(limit) if i not in special]


def _vocabulary_layer_zero(loaded: LoadedModel, vectors: torch.Tensor, ids: Sequence[int],
                           anchor_ids: Sequence[int], shortlist: int, noise: torch.Tensor,
                           progress: Callable[[str], None] | None):
    """Rank every token of `ids` at layer 0 in each slot, streaming the vocabulary in chunks.

    vectors: (2, P, F) the prefix's layer-0 keys/values, heads concatenated. Returns, per kind
    and position, the top `shortlist` ids and scores (2, P, s) and the random vectors' top-1
    scores (2, P, R). Streaming keeps memory at one chunk: the whole vocabulary of the default
    model read in 10 slots would be ~190 M floats for keys and values.
    """
    _, P, _ = vectors.shape
    anchors = first_layer_references(loaded, anchor_ids, P).flatten(3)  # (2, A, P, F)
    center = anchors.mean(1)  # (2, P, F)
    query = _unit(vectors - center)  # (2, P, F)
    randoms = _unit(noise[None, None] * vectors.norm(dim=-1, keepdim=True)[..., None, :]
                    - center[:, :, None])  # (2, P, R, F)
    best_scores = torch.full((2, P, 0), -2.0)
    best_ids = torch.zeros((2, P, 0), dtype=torch.long)
    random_top1 = torch.full(randoms.shape[:3], -2.0)  # (2, P, R)
    id_tensor = torch.tensor(list(ids))
    chunk = max(1, _CHUNK_TOKENS * 4 // P)
    for start in range(0, len(ids), chunk):
        refs = first_layer_references(loaded, ids[start:start + chunk], P).flatten(3)
        refs = _unit(refs - center[:, None])  # (2, n, P, F)
        scores = torch.einsum("knpf,kpf->kpn", refs, query)  # (2, P, n)
        random_top1 = torch.maximum(random_top1,
                                    torch.einsum("knpf,kprf->kprn", refs, randoms).amax(-1))
        merged = torch.cat([best_scores, scores], -1)
        merged_ids = torch.cat([best_ids, id_tensor[start:start + chunk].expand(2, P, -1)], -1)
        top = merged.topk(min(shortlist, merged.shape[-1]), dim=-1)
        best_scores, best_ids = top.values, merged_ids.gather(-1, top.indices)
        if progress and start == 0 and len(ids) > chunk:
            progress(f"nearest tokens: ranking all {len(ids)} tokens at layer 0")
    return best_ids, best_scores, random_top1


def frame_references(loaded: LoadedModel, token_ids: Sequence[int]) -> torch.Tensor:
    """Layer-0 keys in the key frame and values of each token: (2, n, H_kv*D), RoPE models.

    Read at position 0, where RoPE turns nothing but its attention scaling, which
    unrotate_keys divides out as it does for the prefix's keys.
    """
    if family_of(loaded.model.config).rope == "none":
        raise InterpretError(f"{loaded.name} has learned positions: layer 0 depends on the slot")
    refs = first_layer_references(loaded, token_ids, 1)[:, :, 0]  # (2, n, H, D)
    keys = unrotate_keys(loaded, refs[0].transpose(0, 1), [0]).transpose(0, 1)  # (n, H, D)
    return torch.stack([keys, refs[1]]).flatten(2)  # (2, n, H*D)


def _frame_layer_zero(loaded: LoadedModel, vectors: torch.Tensor, vocab: VocabularyFrame,
                      anchor_ids: Sequence[int], shortlist: int, noise: torch.Tensor):
    """_vocabulary_layer_zero from the whole vocabulary's layer 0 kept in the key frame.

    vectors: (2, P, F) the prefix's layer-0 keys/values as cached. Its keys are moved to the
    frame; RoPE is a rotation (scaled alike for every token) and centered cosines do not
    change when both sides turn together, so a score here equals the score against the
    tokens read in slot p. The center (the anchors' mean) is then one vector per kind.
    """
    P = vectors.shape[1]
    H, D = loaded.shape.num_kv_heads, loaded.shape.head_dim
    keys = unrotate_keys(loaded, vectors[0].view(P, H, D).transpose(0, 1), torch.arange(P))
    frame = torch.stack([keys.transpose(0, 1).flatten(1), vectors[1]])  # (2, P, F)
    center = frame_references(loaded, anchor_ids).mean(1)  # (2, F)
    query = _unit(frame - center[:, None])  # (2, P, F)
    randoms = _unit(noise[None, None] * frame.norm(dim=-1, keepdim=True)[..., None, :]
                    - center[:, None, None])  # (2, P, R, F)
    R = randoms.shape[2]
    scores, random_top1 = [], torch.full((2, P, R), -2.0)
    ids = torch.tensor(vocab.token_ids)
    for kind, table in enumerate((vocab.keys, vocab.values)):
        refs = _unit(table - center[kind])  # (V, F)
        scores.append(query[kind] @ refs.T)  # (P, V)
        for start in range(0, len(refs), 8192):  # bounds the (P*R, chunk) block to ~10 MB
            block = randoms[kind].flatten(0, 1) @ refs[start:start + 8192].T  # (P*R, n)
            random_top1[kind] = torch.maximum(random_top1[kind], block.amax(-1).view(P, R))
    top = torch.stack(scores).topk(min(shortlist, len(ids)), dim=-1)  # (2, P, s)
    return ids[top.indices], top.values, random_top1


@torch.no_grad()
def nearest_tokens(
    loaded: LoadedModel,
    kv: torch.Tensor,
    bank: ReferenceBank,
    top_k: int = 10,
    *,
    shortlist: int | None = 10,
    candidates: Sequence[int] = (),
    vocabulary: bool = True,
    anchors: int = 16,
    samples: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> NearestTokens:
    """The real tokens closest to each prefix position, layer and kind (see the module doc).

    kv: (L, 2, H_kv, P, D). Layer 0 ranks every ordinary token of the vocabulary
    (`vocabulary=True`, the default) or the bank's tokens. Deeper layers rank a shortlist per
    position: the `shortlist` best layer-0 matches per kind, `candidates` (e.g. the init text's
    tokens and the training data's frequent words), the bank's extra ids (label words and the
    like) and the anchors. shortlist=None ranks every bank token at every layer instead
    (N x P token reads). anchors: evenly spread bank tokens always read; their mean in each
    slot centers the scores. samples: random vectors per position for the baseline.
    """
    _check_kv(loaded, kv)
    kv = kv.detach().float().cpu()
    L, _, H, P, D = kv.shape
    bank_ids = bank.token_ids
    N = len(bank_ids)
    anchor_ids = [bank_ids[i] for i in
                  sorted(set(np.linspace(0, N - 1, min(anchors, N)).round().astype(int).tolist()))]
    vocab = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
    bad = [int(i) for i in candidates if not 0 <= int(i) < vocab]
    if bad:
        raise InterpretError(f"candidate token ids {bad} are outside the vocabulary "
                             f"(0..{vocab - 1})")
    layer0_ids = ordinary_token_ids(loaded.tokenizer, vocab) if vocabulary else list(bank_ids)
    k = min(top_k, len(layer0_ids))
    generator = torch.Generator().manual_seed(seed)
    noise = _unit(torch.randn(samples, H * D, generator=generator))  # (R, H*D)

    top_ids = np.zeros((L, 2, P, k), dtype=np.int64)
    top_scores = np.zeros((L, 2, P, k), dtype=np.float32)
    base_mean = np.zeros((L, 2, P), dtype=np.float32)
    base_std = np.zeros((L, 2, P), dtype=np.float32)
    ranked = np.zeros((L, P), dtype=np.int64)

    def record(layer, kind, p, ids, scores, random_top1):
        pad = k - len(ids)  # fewer candidates than top_k: repeat the last
        top_ids[layer, kind, p] = np.concatenate([ids, np.repeat(ids[-1:], pad)])
        top_scores[layer, kind, p] = np.concatenate([scores, np.repeat(scores[-1:], pad)])
        base_mean[layer, kind, p] = float(random_top1.mean())
        base_std[layer, kind, p] = float(random_top1.std()) if len(random_top1) > 1 else 0.0

    vectors = kv.permute(0, 1, 3, 2, 4).flatten(3)  # (L, 2, P, H*D): heads concatenated
    wide = k if shortlist is None else max(shortlist, k)
    frame = bank.vocabulary
    if vocabulary and frame is not None and frame.token_ids == layer0_ids:
        first_ids, first_scores, first_random = _frame_layer_zero(
            loaded, vectors[0], frame, anchor_ids, wide, noise)
    else:  # learned positions, or no vocabulary kept with the bank: read it slot by slot
        first_ids, first_scores, first_random = _vocabulary_layer_zero(
            loaded, vectors[0], layer0_ids, anchor_ids, wide, noise, progress)
    common = set(anchor_ids) | set(bank.extra_ids) | {int(i) for i in candidates}
    pools: list[list[int]] = []  # per position: token ids read in that slot for layers >= 1
    for p in range(P):
        pool = set(common)
        for kind in range(2):
            record(0, kind, p, first_ids[kind, p, :k].numpy(), first_scores[kind, p, :k].numpy(),
                   first_random[kind, p])
            pool |= set(first_ids[kind, p].tolist())
        ranked[0, p] = len(layer0_ids)
        pools.append(sorted(set(bank_ids) | pool) if shortlist is None else sorted(pool))
    if L > 1:
        flat = [i for pool in pools for i in pool]
        if progress:
            progress(f"nearest tokens: reading {len(flat)} candidates in {P} prefix slots")
        slots = [p for p, pool in enumerate(pools) for _ in pool]
        refs_all = slot_references(loaded, kv, flat, slots).flatten(3)  # (L, 2, sum n, H*D)
        offset = 0
        for p, pool in enumerate(pools):
            n = len(pool)
            pool_ids = torch.tensor(pool)
            anchor_rows = [pool.index(a) for a in anchor_ids]
            for layer in range(1, L):
                for kind in range(2):
                    refs = refs_all[layer, kind, offset:offset + n]  # (n, H*D)
                    center = refs[anchor_rows].mean(0)
                    idx, scores, rnd = _rank(vectors[layer, kind, p], refs, center, min(k, n),
                                             noise)
                    record(layer, kind, p, pool_ids[idx].numpy(), scores.numpy(), rnd)
                ranked[layer, p] = n
            offset += n
    decode = loaded.tokenizer.decode
    labels = {int(i): decode([int(i)]) for i in np.unique(top_ids)}
    return NearestTokens(top_ids, top_scores, base_mean, base_std, ranked, labels)
