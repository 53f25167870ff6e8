"""Mixed-prefix batches: every row reads its own prefix, one forward for the whole batch.

A prefix without reparameterization is only a per-row key/value cache, so rows with different
prefixes can share a forward: their prefixes are stacked into one cache of the longest length
P_max. A shorter prefix is padded on the left with zero slots that the attention mask hides
(B, P_max + T) = [row's prefix mask; input mask], and the input positions are that mask's
cumulative sum minus one: row i's input starts at position P_i, exactly as when it runs alone.
A row with no prefix (the bare model) is all padding slots.

Label scoring lives here, for one prefix and for many: every row carries its own prefix and
label set (runs differ in labels and templates); predict.label_log_likelihoods is the case of
one prefix shared by every row. Generation (greedy, sampled or beam search, every row its own
prefix) is engine.decode's, on the same stacked cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prefixlab.engine.encode import Encoder
from prefixlab.engine.families import cache_keyword, returned_cache


@dataclass(frozen=True)
class StackedPrefix:
    """Rows' prefixes as one cache's worth of key/values."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each (B, H_kv, P_max, D)
    mask: torch.Tensor  # (B, P_max) long: 1 over each row's prefix slots, 0 over padding

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def cache(self, model: nn.Module):
        """A fresh DynamicCache (caches are mutated by every forward: never reuse one)."""
        from transformers import DynamicCache

        return DynamicCache(list(self.layers), config=model.config)


def stack_prefixes(kvs: Sequence[torch.Tensor | None], device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> StackedPrefix | None:
    """Stack per-row prefixes (each (L, 2, H_kv, P_i, D), or None for no prefix) in `dtype`.

    Returns None when no row has a prefix. Rows naming the same tensor share its padded copy;
    when every row reads one tensor, the rows are views of it (no copy per row).
    """
    present = [kv for kv in kvs if kv is not None]
    if not present:
        return None
    L, _, H, _, D = present[0].shape
    for kv in present:
        if kv.dim() != 5 or (kv.shape[0], kv.shape[2], kv.shape[4]) != (L, H, D):
            raise ValueError(f"prefixes of one batch must share (L, H_kv, D) = {(L, H, D)}; a row "
                             f"has shape {tuple(kv.shape)}")
    device = device or present[0].device
    if len(present) == len(kvs) and all(kv is present[0] for kv in present):
        B, P = len(kvs), present[0].shape[3]
        kv = present[0].to(device, dtype)
        layers = [(kv[layer, 0].expand(B, -1, -1, -1), kv[layer, 1].expand(B, -1, -1, -1))
                  for layer in range(L)]  # (B, H, P, D) views
        return StackedPrefix(layers, torch.ones(B, P, dtype=torch.long, device=device))
    P_max = max(kv.shape[3] for kv in present)
    unique: dict[int, int] = {}  # id(kv) -> slot in the padded stack
    padded = [torch.zeros(L, 2, H, P_max, D, device=device, dtype=dtype)]  # slot 0: no prefix
    masks = [torch.zeros(P_max, dtype=torch.long, device=device)]
    row_slot = []
    for kv in kvs:
        if kv is None:
            row_slot.append(0)
            continue
        if id(kv) not in unique:
            P = kv.shape[3]
            block = torch.zeros(L, 2, H, P_max, D, device=device, dtype=dtype)
            block[:, :, :, P_max - P:] = kv.to(device, dtype)  # left padding
            m = torch.zeros(P_max, dtype=torch.long, device=device)
            m[P_max - P:] = 1
            unique[id(kv)] = len(padded)
            padded.append(block)
            masks.append(m)
        row_slot.append(unique[id(kv)])
    stack = torch.stack(padded)  # (U, L, 2, H, P_max, D)
    index = torch.tensor(row_slot, device=device)
    rows = stack.index_select(0, index)  # (B, L, 2, H, P_max, D)
    layers = [(rows[:, layer, 0], rows[:, layer, 1]) for layer in range(L)]  # (B, H, P_max, D)
    return StackedPrefix(layers, torch.stack(masks).index_select(0, index))


def mixed_inputs(model: nn.Module, stacked: StackedPrefix | None,
                 attention_mask: torch.Tensor) -> dict[str, object]:
    """Cache, (B, P_max + T) mask and per-row positions for one mixed batch."""
    if stacked is None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"attention_mask": attention_mask, "position_ids": positions}
    full = torch.cat([stacked.mask.to(attention_mask.dtype), attention_mask], 1)  # (B, P_max+T)
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)[:, stacked.length:]  # (B, T)
    return {cache_keyword(model): stacked.cache(model), "attention_mask": full,
            "position_ids": positions}


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@torch.inference_mode()
def mixed_label_log_likelihoods(
    model: nn.Module,
    kvs: Sequence[torch.Tensor | None],
    prompts: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
) -> list[torch.Tensor]:
    """log p(label tokens | row's prefix, prompt) per row: a (K_i,) tensor for row i's labels.

    One forward reads every prompt after its own prefix; when some label has several tokens,
    one more forward continues each prompt's cache with each of its labels.
    """
    weight = next(model.parameters())
    device = weight.device
    B = len(prompts)
    ids, mask = _pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    last = mask.sum(1) - 1  # (B,) each prompt's last real position
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[torch.arange(B, device=device), last] = True
    stacked = stack_prefixes(kvs, device, weight.dtype)  # a bf16 model reads a bf16 cache
    single = all(len(t) == 1 for labels in label_ids for t in labels)
    kwargs = mixed_inputs(model, stacked, mask)
    if stacked is None and not single:
        from transformers import DynamicCache

        kwargs[cache_keyword(model)] = DynamicCache(config=model.config)
    out = model(input_ids=ids, logits_to_keep=keep, use_cache=not single, **kwargs)
    first = torch.log_softmax(out.logits.float(), dim=-1)  # (B, V)
    scores = [first[i, torch.tensor([t[0] for t in label_ids[i]], device=device)]
              for i in range(B)]  # each (K_i,)
    if single:
        return [s.cpu() for s in scores]

    # Continue every prompt with each of its labels: continuation row c reads prompt row[c].
    row = torch.tensor([i for i in range(B) for _ in label_ids[i]], device=device)  # (C,)
    labels = [t for i in range(B) for t in label_ids[i]]
    cache = returned_cache(out)
    cache.batch_select_indices(row)
    lab, lab_mask = _pad(labels, pad_id)  # (C, M)
    lab, lab_mask = lab.to(device), lab_mask.to(device)
    cont, cont_mask = lab[:, :-1], lab_mask[:, :-1].clone()  # (C, M-1)
    cont_mask[:, 0] = 1  # a one-token label reads a dummy token here; its logits go unused
    prior = kwargs["attention_mask"].index_select(0, row)  # (C, P_max + T)
    full = torch.cat([prior, cont_mask], 1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)[:, -cont.shape[1]:]
    more = model(input_ids=cont, attention_mask=full, position_ids=positions, use_cache=True,
                 **{cache_keyword(model): cache})
    logp = torch.log_softmax(more.logits.float(), dim=-1)  # (C, M-1, V)
    tok = logp.gather(-1, lab[:, 1:].unsqueeze(-1)).squeeze(-1) * lab_mask[:, 1:]  # (C, M-1)
    rest = tok.sum(-1).split([len(t) for t in label_ids])  # per row (K_i,)
    return [(s + r).cpu() for s, r in zip(scores, rest, strict=True)]


@dataclass(frozen=True)
class ScoreItem:
    """One text to score under one prefix (kv None: the bare model on the encoder's prompt)."""

    kv: torch.Tensor | None  # (L, 2, H_kv, P, D)
    encoder: Encoder
    text: str
    head_read: bool = False  # kv already holds the template's head (prefix.extend_prefix)
    ids: list[int] | None = None  # prompt(), when already made (a server tokenizes up front)

    def prompt(self) -> list[int]:
        """The token ids this item's row reads after kv."""
        if self.ids is not None:
            return self.ids
        ids = self.encoder.prompt(self.text)[0]
        return ids[len(self.encoder.head_ids):] if self.head_read else ids


def mixed_score_labels(model: nn.Module, items: Sequence[ScoreItem], batch_size: int = 32
                       ) -> list[np.ndarray]:
    """Label probabilities per item, in its encoder's label order and by its decision rule;
    items of any prefixes share
    batches (sorted by prompt length so little compute goes to padding)."""
    if not items:
        return []
    prompts = [it.prompt() for it in items]
    pad = items[0].encoder.tokenizer.pad_token_id
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    out: list[np.ndarray] = [np.empty(0)] * len(items)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lls = mixed_label_log_likelihoods(
            model, [items[i].kv for i in idx], [prompts[i] for i in idx],
            [items[i].encoder.label_ids for i in idx], pad)
        for i, ll in zip(idx, lls, strict=True):
            out[i] = items[i].encoder.rule.probs(ll.double().numpy()[None, :])[0]
    return out


def ensemble_probs(model: nn.Module, members: Sequence[tuple[torch.Tensor, Encoder]],
                   texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Label probabilities (N, K) of an ensemble of prefixes (e.g. one recipe trained with
    K seeds): every (member, text) pair is scored in shared mixed batches, each by its own
    decision rule, and the members' probabilities are averaged. The members must share
    their labels, in one order."""
    if not members:
        raise ValueError("an ensemble needs at least one prefix")
    labels = {tuple(enc.labels) for _, enc in members}
    if len(labels) > 1:
        raise ValueError(f"ensemble members must share their labels, got {sorted(labels)}")
    k = len(members[0][1].labels)
    if not texts:
        return np.zeros((0, k))
    items = [ScoreItem(kv, enc, t) for kv, enc in members for t in texts]
    probs = mixed_score_labels(model, items, batch_size)
    return np.stack(probs).reshape(len(members), len(texts), k).mean(0)  # (N, K)
