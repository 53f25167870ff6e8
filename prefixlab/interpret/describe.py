"""The model describes its prefix (after Patchscopes, Ghandeharioun et al. 2024, and InSPEcT,
Ramati et al. 2025): the frozen model reads the prefix's key/values, then an inspection
prompt such as "The instructions above ask to", and continues it greedily.

Per layer range: the prefix's key/values are kept in the layers of the range, and the other
layers read the prefix's *start* instead (the init text's key/values, runs.start), so a
description tells what training wrote into those layers on top of where it began. Replacing
by the start rather than hiding keeps every layer's attention as the model met it in
training: hiding some layers' slots would give the upper layers inputs they never saw. Where
the start is unknown (an imported prefix) the other layers read zeros: keys 0 give every slot
the same attention score, values 0 add nothing. The start itself (no layer kept) and the
whole prefix (every layer kept) are described too: a description that names the task under
the start as well only reads the init text back.

A 135M model is a weak self-explainer: its descriptions are often generic or echo the
prompt. `naming` counts the cheap, checkable part: whether a description names a label or
a word of the task.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prefixlab.engine.decode import mixed_generate

PROMPTS = ("The instructions above ask to", "In short, the text above is about")
CAVEAT = ("A 135M-parameter model is a weak self-explainer: its descriptions are often "
          "generic, repeat the prompt, or read the init text back. Compare each with the "
          "start's: only what differs is what training wrote.")
MAX_NEW_TOKENS = 20
START = "none (the start)"  # the layers of the row that reads the start alone
_STOP = frozenset({
    "the", "and", "for", "with", "that", "this", "from", "into", "what", "which", "text",
    "above", "ask", "asks", "about", "their", "there", "them", "then", "than", "your", "you",
    "are", "was", "were", "will", "have", "has", "whether", "each", "one"})


def layer_ranges(layers: int, parts: int = 3) -> list[tuple[int, int]]:
    """`parts` contiguous half-open ranges covering `layers` layers, as even as they come."""
    parts = max(1, min(parts, layers))
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def kept_in(kv: torch.Tensor, base: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(L, 2, H_kv, P, D) the prefix in layers lo..hi-1 and `base` in every other layer."""
    if tuple(kv.shape) != tuple(base.shape):
        raise ValueError(f"the base {tuple(base.shape)} does not fit the prefix "
                         f"{tuple(kv.shape)}")
    out = base.to(kv.device, kv.dtype).clone()
    out[lo:hi] = kv[lo:hi]
    return out


@dataclass
class Description:
    """What the model continued an inspection prompt with, reading `layers` of the prefix."""

    layers: str  # in words: "all", "0–9", "none (the start)"
    prompt: str
    text: str
    named: list[str]  # labels and task words the text names

    def to_json(self) -> dict:
        return {"layers": self.layers, "prompt": self.prompt, "text": self.text,
                "named": self.named}


def task_words(task: str | None) -> list[str]:
    """The content words of a task description (lowercased, ≥ 4 letters, no stop words)."""
    words = re.findall(r"[a-z]+", (task or "").lower())
    return list(dict.fromkeys(w for w in words if len(w) >= 4 and w not in _STOP))


def naming(text: str, labels: Sequence[str], words: Sequence[str] = ()) -> list[str]:
    """The labels and task words `text` names, as whole words, case-insensitively (a label
    "sci/tech" is named by itself; "positively" does not name "positive")."""
    lowered = text.lower()
    found = []
    for term in [*labels, *words]:
        t = term.lower().strip()
        if t and t not in found and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", lowered):
            found.append(t)
    return found


def naming_count(descriptions: Sequence[Description]) -> int:
    """How many descriptions name a label or a task word."""
    return sum(bool(d.named) for d in descriptions)


def beyond_start(descriptions: Sequence[Description]) -> int:
    """How many descriptions (the start's own left out) name a label or task word that the
    start's description under the same prompt does not: what training, not the init text,
    made the model say. Without a start row every naming description counts."""
    start = {d.prompt: set(d.named) for d in descriptions if d.layers == START}
    return sum(bool(set(d.named) - start.get(d.prompt, set()))
               for d in descriptions if d.layers != START)


@torch.inference_mode()
def describe_prefix(model: nn.Module, tokenizer, kv: torch.Tensor, start: torch.Tensor | None,
                    labels: Sequence[str], task: str | None, prompts: Sequence[str] = PROMPTS,
                    parts: int = 3, max_new_tokens: int = MAX_NEW_TOKENS
                    ) -> list[Description]:
    """Greedy descriptions of the prefix per prompt: the whole prefix, each of `parts` layer
    ranges (other layers: the start, else zeros), and the start alone when known. All rows
    decode in one mixed batch; greedy decoding makes them deterministic."""
    base = start if start is not None else torch.zeros_like(kv)
    L = kv.shape[0]
    readings: list[tuple[str, torch.Tensor]] = [("all", kv)]
    if parts > 1:
        readings += [(f"{lo}–{hi - 1}" if hi - lo > 1 else f"{lo}", kept_in(kv, base, lo, hi))
                     for lo, hi in layer_ranges(L, parts)]
    if start is not None:
        readings.append((START, start))
    rows = [(name, p, prefix) for p in prompts for name, prefix in readings]
    texts = mixed_generate(model, tokenizer, [r[2] for r in rows], [r[1] for r in rows],
                           max_new_tokens)
    words = task_words(task)
    return [Description(name, p, t.strip(), naming(t, labels, words))
            for (name, p, _), t in zip(rows, texts, strict=True)]


__all__ = ["CAVEAT", "PROMPTS", "START", "Description", "beyond_start", "describe_prefix",
           "kept_in", "layer_ranges", "naming", "naming_count", "task_words"]
