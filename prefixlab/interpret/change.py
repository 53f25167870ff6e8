"""What training changed: the prefix's change from its start, read the way the prefix is read.

A prefix trained from real text keeps sitting near that text's tokens when it moves a few
percent, so a readout of the learned prefix alone mostly tells where it began. These readouts
take the change, trained minus start (both (L, 2, H_kv, P, D)):

- movement per layer, kind and slot: the slot's distance from its start over the start's size;
- the change's value readout: the value logit lens (values.value_logits) of the learned
  prefix minus that of its start, so a token it promotes is one training pushed up, one it
  demotes one training pushed down, and a prefix that did not move reads nothing at all;
- the change's label push: the same difference on the labels' first tokens;
- where each nearest token comes from: a start word, a label word, a data word, or new.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from prefixlab.engine.models import LoadedModel
from prefixlab.interpret.frame import KINDS, InterpretError, _check_kv
from prefixlab.interpret.values import value_logits

UNMOVED = 1e-6
"""A slot whose value moved less than this (relative to its start, or absolutely where it
started at zero) did not move: float noise of a start recomputed on another device stays
below it, and its readout is left empty rather than ranking rounding errors."""

MOST_MOVED = 0.5
"""Layers count among those that moved most when their mean movement is at least this share
of the largest layer's."""

# The word groups of runs.inspection.run_words, and the tag each gives a token.
ORIGINS = (("init text", "start word"), ("label words", "label word"),
           ("data words", "data word"))
NEW = "new"

Ranked = list[tuple[int, float]]  # (token id, logit change), largest change first


@dataclass
class PrefixChange:
    """The change of a prefix from its start, and what it promotes through the unembedding."""

    movement: np.ndarray  # (L, 2, P): |kv - start| per layer, kind and slot (relative: / |start|)
    relative: bool  # False when a slot started at zero: movement is then absolute
    up: list[list[Ranked]]  # [layer][slot]: tokens the change promotes most; [] where unmoved
    down: list[list[Ranked]]  # [layer][slot]: tokens the change demotes most
    toward: Ranked  # over the value layers that moved most and their slots: promoted most
    away: Ranked  # ... demoted most
    labels: dict[int, str] = field(default_factory=dict)  # token id -> its text
    label_names: list[str] = field(default_factory=list)
    label_push: np.ndarray | None = None  # (L, K): change of each layer's push to each label

    @property
    def moved(self) -> bool:
        return bool((self.movement >= UNMOVED).any())

    def kind_movement(self) -> np.ndarray:
        """(L, 2): each layer's mean movement over its slots, keys then values."""
        return self.movement.mean(-1)

    def most_moved(self, kind: str) -> list[int]:
        """The layers of `kind` that moved most (see MOST_MOVED), shallowest first."""
        per_layer = self.kind_movement()[:, KINDS.index(kind)]
        top = float(per_layer.max()) if per_layer.size else 0.0
        if top < UNMOVED:
            return []
        return [int(i) for i in np.flatnonzero(per_layer >= MOST_MOVED * top)]

    def label_shift(self, layers: Sequence[int] | None = None) -> list[tuple[str, float]]:
        """Labels by how much more the change pushes them (mean over `layers`, default all),
        most pushed first; [] without labels or without movement."""
        if self.label_push is None or not self.moved:
            return []
        rows = self.label_push[list(layers)] if layers else self.label_push
        mean = rows.mean(0)
        return [(self.label_names[int(i)], float(mean[i])) for i in np.argsort(-mean)]

    def to_json(self) -> dict:
        def ranked(items: Ranked) -> list[dict]:
            return [{"token": self.labels.get(t, ""), "id": t, "logit_change": round(g, 3)}
                    for t, g in items]

        return {
            "format": "prefixlab-change/1", "relative": self.relative, "moved": self.moved,
            "movement": {kind: np.round(self.movement[:, i], 5).tolist()
                         for i, kind in enumerate(KINDS)},
            "value_readout": [[{"position": p, "up": ranked(up), "down": ranked(down)}
                               for p, (up, down) in enumerate(zip(ups, downs, strict=True))]
                              for ups, downs in zip(self.up, self.down, strict=True)],
            "most_moved_values": self.most_moved("value"),
            "toward": ranked(self.toward), "away": ranked(self.away),
            "label_push": None if self.label_push is None else {
                "labels": self.label_names, "push": np.round(self.label_push, 4).tolist()},
        }


def slot_movement(trained: torch.Tensor, start: torch.Tensor) -> tuple[np.ndarray, bool]:
    """(L, 2, P) distance of each slot from its start, relative to the start's size unless a
    slot started at zero (then absolute, and False)."""
    if tuple(trained.shape) != tuple(start.shape):
        raise InterpretError(f"the start {tuple(start.shape)} and the trained prefix "
                             f"{tuple(trained.shape)} differ in shape")
    trained, start = trained.detach().float().cpu(), start.detach().float().cpu()
    moved = (trained - start).transpose(3, 2).flatten(3).norm(dim=-1)  # (L, 2, P)
    size = start.transpose(3, 2).flatten(3).norm(dim=-1)  # (L, 2, P)
    relative = bool((size > 0).all())
    return (moved / size if relative else moved).numpy(), relative


def _ranked(values: torch.Tensor, ids: torch.Tensor) -> Ranked:
    return [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]


def prefix_change(loaded: LoadedModel, trained: torch.Tensor, start: torch.Tensor,
                  top_k: int = 10, labels: Sequence[str] = (),
                  label_ids: Sequence[Sequence[int]] = ()) -> PrefixChange:
    """The change of `trained` from `start` and its readouts (see the module docstring).

    labels / label_ids: the run's labels and their token ids, for the change's label push
    (each label read by its first token, as the knockout's label push reads it).
    """
    _check_kv(loaded, trained)
    movement, relative = slot_movement(trained, start)
    L, P = movement.shape[0], movement.shape[2]
    value_moved = movement[:, 1] >= UNMOVED  # (L, P)
    up: list[list[Ranked]] = [[[] for _ in range(P)] for _ in range(L)]
    down: list[list[Ranked]] = [[[] for _ in range(P)] for _ in range(L)]
    toward: Ranked = []
    away: Ranked = []
    push = None
    seen: set[int] = set()
    if value_moved.any():
        shift = value_logits(loaded, trained) - value_logits(loaded, start)  # (L, P, V)
        k = min(top_k, shift.shape[-1])
        hi, lo = shift.topk(k, dim=-1), (-shift).topk(k, dim=-1)
        for layer, p in zip(*np.nonzero(value_moved), strict=True):
            up[layer][p] = _ranked(hi.values[layer, p], hi.indices[layer, p])
            down[layer][p] = _ranked(-lo.values[layer, p], lo.indices[layer, p])
            seen.update(hi.indices[layer, p].tolist() + lo.indices[layer, p].tolist())
        per_layer = torch.from_numpy(movement[:, 1].mean(-1))  # (L,)
        layers = torch.nonzero(per_layer >= MOST_MOVED * per_layer.max()).flatten()
        mean = shift[layers].mean((0, 1))  # (V,)
        few = min(10, mean.shape[0])  # some may be byte pieces
        best, worst = mean.topk(few), (-mean).topk(few)
        toward = _ranked(best.values, best.indices)
        away = _ranked(-worst.values, worst.indices)
        seen.update(best.indices.tolist() + worst.indices.tolist())
        if labels:
            first = torch.tensor([ids[0] for ids in label_ids])
            per_label = shift[..., first].mean(1)  # (L, K)
            push = (per_label - per_label.mean(-1, keepdim=True)).numpy()
    elif labels:
        push = np.zeros((L, len(labels)))
    names = {i: loaded.tokenizer.decode([i]) for i in sorted(seen)}
    return PrefixChange(movement, relative, up, down, toward, away, names, list(labels), push)


def word_origin(token_id: int, words: Mapping[str, Sequence[int]]) -> list[str]:
    """Where a token comes from among a run's word groups (runs.inspection.run_words): any of
    "start word", "label word", "data word", or ["new"] when it is none of them. A default
    start text names the labels, so a label's token is often a start word too."""
    found = [tag for group, tag in ORIGINS if token_id in set(words.get(group, ()))]
    return found or [NEW]


def origin_text(token_id: int, words: Mapping[str, Sequence[int]]) -> str:
    return " + ".join(word_origin(token_id, words))


__all__ = ["MOST_MOVED", "NEW", "ORIGINS", "UNMOVED", "PrefixChange", "origin_text",
           "prefix_change", "slot_movement", "word_origin"]
