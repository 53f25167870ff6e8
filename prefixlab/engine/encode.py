"""From labeled text to token batches: the prompt template, label verbalizations, and
length-bucketed batches with a loss mask on the label tokens only.

A training sequence is `[prompt(x); verbalize(y)]` read after the prefix; the loss covers the
tokens of `verbalize(y)`. Scoring reads the same prompt and compares every label's tokens.
A generation run's sequence is `[prompt(x); y; EOS]` (`PairEncoder`), the loss on `y; EOS`.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from prefixlab.engine.balance import LabelRule
from prefixlab.errors import ConfigError

DEFAULT_TEMPLATE = "Text: {text}\nCategory ({labels}):"
DEFAULT_GENERATION_TEMPLATE = "Input: {text}\nOutput:"
"""A generation run's prompt: any task, no labels; the target follows after a space."""
MIN_TEXT_TOKENS = 8  # below this a text is cut to nothing useful


class TemplateError(ConfigError):
    """A prompt template that cannot be used (a setting: RunConfig collects it with the rest)."""


@dataclass(frozen=True)
class Template:
    """A prompt with `{text}` (required) and `{labels}` (optional, the label names)."""

    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if self.template.count("{text}") != 1:
            raise TemplateError(
                f"the template must contain {{text}} exactly once, got {self.template!r}"
            )
        rest = self.template.replace("{text}", "").replace("{labels}", "")
        if "{" in rest or "}" in rest:
            raise TemplateError(
                f"the template may use only {{text}} and {{labels}}, got {self.template!r}"
            )

    def parts(self, labels: Sequence[str]) -> tuple[str, str]:
        """The text before and after `{text}`, labels filled in."""
        head, tail = self.template.split("{text}")
        names = ", ".join(labels)
        return head.replace("{labels}", names), tail.replace("{labels}", names)


class _Prompts:
    """Prompt token ids: head, text and tail tokenized separately, so that cutting a long text
    never cuts the template. Subclasses set head_ids, tail_ids and text_budget."""

    tokenizer: object
    head_ids: list[int]
    tail_ids: list[int]
    text_budget: int

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt(self, text: str) -> tuple[list[int], bool]:
        """Prompt token ids for one text, and whether the text had to be cut."""
        ids = self._ids(text)
        cut = len(ids) > self.text_budget
        return self.head_ids + ids[: self.text_budget] + self.tail_ids, cut

    def prompts(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.prompt(t)[0] for t in texts]


class Encoder(_Prompts):
    """Turns texts and labels into token ids for one tokenizer, template and label set.

    Every label's tokens are the same in training and scoring.
    """

    def __init__(self, tokenizer, template: Template, labels: Sequence[str], max_length: int,
                 rule: LabelRule | None = None):
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.rule = rule or LabelRule()  # label log-likelihoods -> probabilities (a run's
        # decision rule: RunConfig.label_encoder sets it; the identity when built directly)
        head, tail = template.parts(self.labels)
        self.head_ids = self._ids(head)
        self.tail_ids = self._ids(tail)
        self.label_ids = [self._ids(" " + label) for label in self.labels]
        if any(not ids for ids in self.label_ids):
            raise TemplateError("a label has no tokens")
        longest_label = max(len(ids) for ids in self.label_ids)
        self.text_budget = max_length - len(self.head_ids) - len(self.tail_ids) - longest_label
        if self.text_budget < MIN_TEXT_TOKENS:
            prompt = len(self.head_ids) + len(self.tail_ids)
            raise TemplateError(
                f"the prompt around the text takes {prompt} tokens (it lists the "
                f"{len(self.labels)} label names) and the longest label {longest_label} more, "
                f"so {max_length} tokens per example leave "
                f"{'no room' if self.text_budget <= 0 else f'only {self.text_budget} tokens'} "
                f"for the text; raise the max tokens per example (max_length) to at least "
                f"{prompt + longest_label + 4 * MIN_TEXT_TOKENS}, or use fewer or shorter labels"
            )
        self.max_length = max_length

    def without_prior(self) -> Encoder:
        """This encoder deciding without a training prior (e.g. for the bare model)."""
        other = copy.copy(self)
        other.rule = replace(self.rule, offset=None)
        return other

    def examples(self, texts: Sequence[str], labels: Sequence[str]) -> list[Example]:
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for text, label in zip(texts, labels, strict=True):
            prompt = self.prompt(text)[0]
            out.append(Example(prompt, self.label_ids[index[label]], index[label]))
        return out


class PairEncoder(_Prompts):
    """Token ids for input -> target pairs: `[prompt(x); y; EOS]`, the loss on `y; EOS`.

    Targets are cut to `max_target_tokens` (EOS included), the most a run generates, so
    training never teaches lengths that decoding cannot reach.
    """

    def __init__(self, tokenizer, template: Template, max_length: int, max_target_tokens: int):
        self.tokenizer = tokenizer
        head, tail = template.parts([])
        self.head_ids = self._ids(head)
        self.tail_ids = self._ids(tail)
        if tokenizer.eos_token_id is None:
            raise TemplateError("the tokenizer has no end-of-sequence token to end targets with")
        self.eos_id = int(tokenizer.eos_token_id)
        self.max_target_tokens = max_target_tokens
        self.text_budget = (max_length - len(self.head_ids) - len(self.tail_ids)
                            - max_target_tokens)
        if self.text_budget < 8:
            raise TemplateError(
                f"max_length {max_length} leaves {self.text_budget} tokens for the input after "
                f"the template ({len(self.head_ids) + len(self.tail_ids)} tokens) and the "
                f"target ({max_target_tokens} tokens); raise max_length or lower the tokens "
                "generated"
            )
        self.max_length = max_length

    def target(self, text: str) -> tuple[list[int], bool]:
        """A target's tokens with EOS at the end, and whether it had to be cut."""
        ids = self._ids(" " + text)
        cut = len(ids) > self.max_target_tokens - 1
        return ids[: self.max_target_tokens - 1] + [self.eos_id], cut

    def examples(self, inputs: Sequence[str], targets: Sequence[str]) -> list[Example]:
        return [Example(self.prompt(x)[0], self.target(y)[0], 0)
                for x, y in zip(inputs, targets, strict=True)]


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    target: list[int]  # the label's tokens, or a generation target's tokens and EOS
    label: int  # 0 in generation runs
    weight: float = 1.0  # each target token's weight in the loss (class-weighted training)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.target)


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Index batches of similar length, so little compute goes to padding.

    Shuffles, sorts by length inside windows of 50 batches, cuts into batches, then shuffles
    the batch order: random across epochs, yet nearly pad-free. Deterministic for (seed, epoch).
    """
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed * 100_003 + epoch)
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    """A right-padded batch of prompt + target sequences."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) bool: positions whose next-token logit scores a target
    targets: torch.Tensor  # (n_target_tokens,) in row-major order of loss_mask
    labels: torch.Tensor  # (B,) label index per row
    real_tokens: int  # the examples' tokens (last target token included), for throughput
    weights: torch.Tensor | None = None
    """(n_target_tokens,) per-token loss weights, or None when all are 1 (a plain mean)."""

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
            self.targets.to(device), self.labels.to(device), self.real_tokens,
            None if self.weights is None else self.weights.to(device),
        )

    @property
    def mass(self) -> float:
        """The sum of the target tokens' weights: what the batch's loss is a mean over."""
        return float(self.weights.sum()) if self.weights is not None else self.targets.numel()


def target_mass(examples: Sequence[Example]) -> float:
    """The summed loss weight of the examples' target tokens (their count when unweighted)."""
    return sum(e.weight * len(e.target) for e in examples)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token losses (n,) to the batch's loss: their mean, or weighted mean."""
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded rows of prompt + target, without each target's last token: no loss reads
    what the model computes after it (causal), so it would be work for nothing."""
    T = max(len(e) for e in examples) - 1
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    targets: list[int] = []
    weights: list[float] = []
    for row, e in enumerate(examples):
        seq = (e.prompt + e.target)[:-1]
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        start = len(e.prompt)
        loss_mask[row, start - 1 : start - 1 + len(e.target)] = True  # logit j-1 scores token j
        targets += e.target
        weights += [e.weight] * len(e.target)
    weighted = any(w != 1.0 for w in weights)
    return Batch(
        input_ids, attention_mask, loss_mask, torch.tensor(targets, dtype=torch.long),
        torch.tensor([e.label for e in examples]), sum(len(e) for e in examples),
        torch.tensor(weights, dtype=torch.float32) if weighted else None,
    )
