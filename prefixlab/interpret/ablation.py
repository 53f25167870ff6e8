"""The second ablation, and what both say about attention sinks.

Hiding a part of the prefix (knockout.py) measures what it does; a part that only keeps doing
what its start text did costs as much to hide as one training taught something. Resetting a
part to its start isolates what training added: slot s reset sets slot s back to its start
at every layer, layer l reset sets every slot of layer l back; everything else stays trained.

An attention sink is a slot the model parks attention on whatever the input (typically the
first position): hiding it costs more than hiding the whole prefix (the inputs lose the
place their attention goes, which the bare model never needed), and it takes most of the
attention on every input. Its cost says nothing about the task; `attention_sinks` names
such slots with the evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prefixlab.interpret.frame import InterpretError
from prefixlab.interpret.knockout import Knockout, measured

ScoreKV = Callable[[torch.Tensor], np.ndarray]  # kv (L, 2, H_kv, P, D) -> (N, K) per row

SINK_SHARE = 0.5
SINK_COST = 0.5
"""A slot's hiding must cost at least this much mean log-probability of the correct answer
(about 40% of its probability) to count: on a prefix whose whole hiding costs nothing, a
slot's few hundredths are the noise of hiding any one of them, not a sink."""
"""A slot that takes at least this share of all attention (mean over layers, heads and query
positions) on every input measured holds attention whatever the input."""


def reset_variants(kv: torch.Tensor, start: torch.Tensor) -> list[torch.Tensor]:
    """The prefixes a reset ablation scores, in Knockout order: intact, each slot reset at
    every layer, each layer reset at every slot, the whole prefix reset (the start)."""
    if tuple(kv.shape) != tuple(start.shape):
        raise InterpretError(f"the start {tuple(start.shape)} does not fit the prefix "
                             f"{tuple(kv.shape)}: it cannot be reset to it")
    start = start.to(kv.device, kv.dtype)
    L, P = kv.shape[0], kv.shape[3]
    variants = [kv]
    for p in range(P):
        v = kv.clone()
        v[:, :, :, p] = start[:, :, :, p]
        variants.append(v)
    for layer in range(L):
        v = kv.clone()
        v[layer] = start[layer]
        variants.append(v)
    return [*variants, start]


def reset_knockout(kv: torch.Tensor, start: torch.Tensor, score: ScoreKV,
                   gold: Sequence[int] | None, precision: str,
                   progress: Callable[[float, str], None] | None = None) -> Knockout:
    """Score intact, then with each slot, each layer and the whole prefix reset to `start`.

    score(kv) scores the held-out rows (N, K) with the given prefix; gold (N,) label indices,
    or None for a generation run's per-row target score. A variant equal to the intact prefix
    (a part that never moved) is not scored again: its change is exactly 0.
    """
    variants = reset_variants(kv, start)
    gold_a = None if gold is None else np.asarray(gold, dtype=np.int64)
    lls: list[np.ndarray] = []
    for i, v in enumerate(variants):
        if progress:
            progress(i / len(variants), f"reset to start: pass {i + 1}/{len(variants)}")
        lls.append(lls[0] if i and torch.equal(v, kv) else score(v))
    if progress:
        progress(1.0, "reset to start: done")
    return measured(lls, gold_a, kv.shape[3], kv.shape[0], precision, ablation="reset")


@dataclass
class Sink:
    """A slot that behaves as an attention sink, and why it is called one (in words)."""

    slot: int
    evidence: list[str]


def attention_sinks(hidden: Knockout | None, slot_share: np.ndarray | None) -> list[Sink]:
    """Slots whose hiding costs more than hiding the whole prefix (and at least SINK_COST),
    or that take at least SINK_SHARE of all attention on every input measured.

    hidden: the hide knockout (None: not measured); slot_share (T, P): each slot's share of
    all attention per input (attention.AttentionMass.slots of one prefix), None if unmeasured.
    """
    evidence: dict[int, list[str]] = {}
    if hidden is not None and hidden.ablation == "hide":
        whole = hidden.all_log_prob
        for p, cost in enumerate(hidden.slot_log_prob):
            if cost <= -SINK_COST and cost < whole:
                evidence.setdefault(p, []).append(
                    f"hiding P{p} alone changes the log-prob by {cost:+.2f}, more than hiding "
                    f"the whole prefix ({whole:+.2f})")
    if slot_share is not None and len(slot_share):
        low, high = slot_share.min(0), slot_share.max(0)  # (P,)
        for p in np.flatnonzero(low >= SINK_SHARE):
            evidence.setdefault(int(p), []).append(
                f"P{p} takes {low[p]:.0%}–{high[p]:.0%} of all attention on every one of the "
                f"{len(slot_share)} inputs measured")
    return [Sink(p, evidence[p]) for p in sorted(evidence)]


__all__ = ["SINK_COST", "SINK_SHARE", "Sink", "attention_sinks", "reset_knockout", "reset_variants"]
