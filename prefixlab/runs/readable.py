"""A run's readable prompt: a text of N tokens searched to decide its training rows as the
prefix does (interpret.readable), beside two readings of the same length used as text
prompts: the start text (the run's init text) and the nearest-token text (each slot's nearest
vocabulary token at layer 0). The gap between them and the prefix is the "waywardness" gap
(Khashabi et al. 2022): how little of what a prefix does its nearest tokens keep.

Every prompt is scored as plain text read before the run's template, with the run's decision
rule, on the run's validation rows: its agreement with the prefix's decisions and its
macro-F1 against the gold labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixlab.engine.balance import macro_f1
from prefixlab.engine.mixed import ScoreItem, mixed_score_labels
from prefixlab.files import atomic_write_json
from prefixlab.interpret.bank import DEFAULT_BANK_SIZE, reference_bank
from prefixlab.interpret.nearest import NearestTokens
from prefixlab.interpret.readable import (
    SearchConfig,
    Targets,
    agreement,
    biased,
    fit_bias,
    fit_length,
    nearest_ids,
    score_prompt,
    search_prompt,
)
from prefixlab.runs.experiment import prepare_data
from prefixlab.runs.finished import Run
from prefixlab.runs.folder import RunError
from prefixlab.runs.inspection import cached_nearest_tokens, run_words, word_ids
from prefixlab.runs.start import start_text

READABLE_FILE = "readable_prompt.json"
DEFAULT_LENGTH = 16
SEARCH_ROWS = 200  # training rows the search matches the prefix on
REPORT_ROWS = 200  # validation rows each prompt is scored on
SEARCH_SECONDS = 60.0
"""The search's default time budget: with the readings before and after it, the whole call
on the default model takes about two minutes on 2 CPU cores (docs/benchmarks.md); a GPU
runs all of its steps in that time."""


@dataclass
class Reading:
    """One text prompt scored on the validation rows: with its label bias (fitted on the
    search rows to match the prefix there, interpret.readable.fit_bias), and without."""

    text: str
    agreement: float
    macro_f1: float
    plain_agreement: float  # without the bias: the text alone, under the run's rule
    plain_macro_f1: float
    bias: dict[str, float] | None = None  # per label, added to its log-probability

    def to_json(self) -> dict:
        return {"text": self.text, "agreement": round(self.agreement, 4),
                "macro_f1": round(self.macro_f1, 4),
                "label_bias": ({k: round(v, 4) for k, v in self.bias.items()}
                               if self.bias is not None else None),
                "without_bias": {"agreement": round(self.plain_agreement, 4),
                                 "macro_f1": round(self.plain_macro_f1, 4)}}


@dataclass
class ReadablePrompt:
    prompt: Reading
    tokens: list[str]
    train_agreement: float  # on the rescored sample of the search rows, where it was picked
    seconds: float  # the whole call: the prefix's decisions, the search and every reading
    steps: int
    baselines: dict[str, Reading | None]  # start_text (None: no start text), nearest_tokens
    prefix_f1: float  # the prefix's own macro-F1 on the same rows
    rows: dict[str, int]  # how many training and validation rows

    def to_json(self) -> dict:
        return {**self.prompt.to_json(), "tokens": self.tokens,
                "seconds": round(self.seconds, 1), "steps": self.steps,
                "train_agreement": round(self.train_agreement, 4),
                "prefix_macro_f1": round(self.prefix_f1, 4), "rows": self.rows,
                "baselines": {k: v.to_json() if v else None for k, v in self.baselines.items()}}

    def lines(self) -> list[str]:
        """The prompt and its baselines in words."""
        out = [f"readable prompt ({len(self.tokens)} tokens, {self.steps} steps, "
               f"{self.seconds:.0f} s): {self.prompt.text!r}",
               f"on {self.rows['validation']} validation rows (the prefix's macro-F1 "
               f"{self.prefix_f1:.3f}):"]
        for name, r in [("readable prompt", self.prompt),
                        *((k.replace("_", " "), v) for k, v in self.baselines.items())]:
            out.append(f"  {name}: agreement {r.agreement:.1%}, macro-F1 {r.macro_f1:.3f} "
                       f"(without its label bias {r.plain_agreement:.1%}, "
                       f"{r.plain_macro_f1:.3f})"
                       if r else f"  {name}: none (the prefix did not start from text)")
        if self.prompt.bias:
            out.append("  label bias of the readable prompt (add to each label's log-"
                       "probability): " + ", ".join(f"{k} {v:+.2f}"
                                                     for k, v in self.prompt.bias.items()))
        return out


def run_nearest(run: Run, top_k: int = 10, bank_size: int = DEFAULT_BANK_SIZE,
                progress: Callable[[str], None] | None = None) -> NearestTokens:
    """The nearest tokens of the run's prefix as its inspection ranks them (kept in the run
    folder, so an inspection just made is not ranked again)."""
    words = word_ids(run_words(run))
    bank = reference_bank(run.loaded, bank_size, words, progress=progress)
    return cached_nearest_tokens(run, bank, top_k, words, progress)


def _reading(run: Run, text: str, texts: Sequence[str], gold: Sequence[str],
             prefix: np.ndarray, bias: np.ndarray | None) -> Reading:
    probs = score_prompt(run.loaded.model, run.encoder, text, texts)

    def f1(p: np.ndarray) -> float:
        return macro_f1(gold, [run.labels[i] for i in p.argmax(1)], run.labels)

    adjusted = biased(probs, bias)
    return Reading(text, agreement(adjusted, prefix), f1(adjusted), agreement(probs, prefix),
                   f1(probs), None if bias is None else
                   {label: float(b) for label, b in zip(run.labels, bias, strict=True)})


def readable_prompt(run: Run, nearest: NearestTokens, length: int = DEFAULT_LENGTH,
                    config: SearchConfig | None = None, search_rows: int = SEARCH_ROWS,
                    report_rows: int = REPORT_ROWS,
                    progress: Callable[[str], None] | None = None) -> ReadablePrompt:
    """Search a `length`-token text prompt for the run's prefix on its training rows (the
    first `search_rows`), and score it beside the start text and the nearest-token text.
    config: the search's settings; None takes the defaults under a SEARCH_SECONDS budget."""
    began = time.monotonic()
    if run.is_generation:
        raise RunError(f"run {run.folder.path.name} generates text: a readable prompt matches "
                       "label decisions")
    if not 1 <= length <= 128:
        raise RunError(f"a readable prompt has 1..128 tokens, got {length}")
    data = prepare_data(run.config)
    train = list(data.train.texts)[:search_rows]
    texts = list(data.validation.texts)[:report_rows]
    gold = list(data.validation.labels)[:report_rows]
    if not train or not texts:
        raise RunError(f"run {run.folder.path.name} has no training or validation rows")
    model, tok = run.loaded.model, run.loaded.tokenizer
    if progress:
        progress(f"readable prompt: the prefix's decisions on {len(texts)} validation rows")

    def decide(rows: list[str]) -> np.ndarray:  # the search reads the rows it draws, no more
        return np.stack(mixed_score_labels(model, [ScoreItem(run.kv, run.encoder, t)
                                                   for t in rows]))

    held = decide(texts)
    targets = Targets(train, decide)
    start = start_text(run.config, run.labels)
    start_ids = (fit_length(tok(start, add_special_tokens=False)["input_ids"], length)
                 if start else None)
    near = fit_length(nearest_ids(nearest), length)
    config = config or SearchConfig(seconds=SEARCH_SECONDS)
    found = search_prompt(model, run.encoder, train, targets, start_ids or near, config,
                          progress=progress)
    if progress:
        progress(f"readable prompt: scoring it and both baselines on {len(texts)} rows")
    readings: dict[str, Reading] = {}  # a text read once, though two prompts may be it
    sample = [train[i] for i in found.rescored]

    def reading(text: str) -> Reading:
        if text not in readings:
            bias = None
            if config.label_bias:  # fitted where the readable prompt's was: the same rows
                prompt = found.finalists.get(text)
                bias = (prompt.bias if prompt is not None else
                        fit_bias(score_prompt(model, run.encoder, text, sample),
                                 targets(found.rescored)))
            readings[text] = _reading(run, text, texts, gold, held, bias)
        return readings[text]

    best = reading(found.best.text)
    baselines = {"start_text": reading(tok.decode(start_ids)) if start_ids else None,
                 "nearest_tokens": reading(tok.decode(near))}
    prefix_f1 = macro_f1(gold, [run.labels[i] for i in held.argmax(1)], run.labels)
    return ReadablePrompt(best, [tok.decode([i]) for i in found.best.ids], found.best.agreement,
                          time.monotonic() - began, found.steps, baselines, prefix_f1,
                          {"train": len(train), "validation": len(texts)})


def write_readable(result: ReadablePrompt, folder: str | Path) -> Path:
    """readable_prompt.json in `folder`; returns its path."""
    path = Path(folder) / READABLE_FILE
    atomic_write_json(path, result.to_json())
    return path


__all__ = ["DEFAULT_LENGTH", "READABLE_FILE", "REPORT_ROWS", "SEARCH_ROWS", "SEARCH_SECONDS",
           "ReadablePrompt", "Reading", "readable_prompt", "run_nearest", "write_readable"]
