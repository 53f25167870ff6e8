"""A generation run's steps: its data, its validation loss, its outputs and their scores.

A generation run trains on input -> target pairs (`pairs.py`) with the loss on the target's
tokens (`encode.PairEncoder`). Held-out inputs are generated once each (rows sharing an input
are its references) and scored with BLEU, chrF and ROUGE-L (`genmetrics.py`), beside the bare
model reading the same prompt template: what the prefix buys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.data.pairs import TextPairs, group_split, load_pairs_csv, sample_inputs, sample_rows
from prefixlab.data.reading import DataError
from prefixlab.engine import distributed
from prefixlab.engine.decode import DecodeConfig, generate_texts
from prefixlab.engine.encode import PairEncoder, Template, bucketed_batches, collate
from prefixlab.engine.prefix import forward
from prefixlab.runs.budget import Progress
from prefixlab.runs.config import RunConfig
from prefixlab.runs.genmetrics import Grouped, generation_scores, group_references

SAMPLE_ROWS = 20
"""Inputs shown in a report's table of references and outputs."""


def prepare_pairs(cfg: RunConfig) -> tuple[TextPairs, TextPairs, list[str]]:
    """(train, validation, warnings) of a generation run, split by distinct input."""
    if cfg.text_column is None:
        raise DataError("a generation run needs the input column named (--text-column) "
                        "beside the target column")
    full = load_pairs_csv(cfg.train_csv, cfg.text_column, cfg.target_column)
    warnings = list(full.warnings)
    seed = cfg.training.seed
    if cfg.validation_csv:
        val = load_pairs_csv(cfg.validation_csv, full.input_column, full.target_column)
        warnings += [f"validation file: {w}" for w in val.warnings]
        train_part = full
        shared = set(train_part.inputs) & set(val.inputs)
        if shared:
            warnings.append(f"{len(shared)} validation inputs also occur in training; their "
                            "scores say little about new inputs")
    else:
        train_part, val = group_split(full, cfg.validation_share, seed)
    train_part = sample_rows(train_part, cfg.max_train_examples, seed)
    val = sample_inputs(val, cfg.max_eval_examples, seed)
    return train_part, val, warnings


def pair_encoder(tokenizer, cfg: RunConfig) -> PairEncoder:
    """The run's encoder: targets cut to the tokens it generates (EOS included)."""
    return PairEncoder(tokenizer, Template(cfg.template), cfg.max_length,
                       cfg.generation.max_new_tokens + 1)


def live_scores(model: nn.Module, encoder: PairEncoder, kv: torch.Tensor | None,
                validation: TextPairs, cfg: RunConfig) -> dict:
    """What a training run logs at each evaluation: the validation loss on each held-out
    input's first reference, and greedy BLEU/chrF/ROUGE-L on the first `eval_generate_inputs`
    inputs. Cheap enough to run often: a data set like E2E has several references per input,
    and the loss on all of them would multiply the cost of every evaluation; the final report
    reads every row and decodes every input as configured. The record's "seconds" say what
    each part took (budget.FinalReserve estimates the final report from them)."""
    first: dict[str, int] = {}
    for i, x in enumerate(validation.inputs):
        first.setdefault(x, i)
    one_each = validation.subset(sorted(first.values()))
    began = time.perf_counter()
    record: dict = {"val_loss": target_loss(model, kv, encoder, one_each)}
    record["seconds"] = {"scoring": time.perf_counter() - began}
    if cfg.eval_generate_inputs:
        began = time.perf_counter()
        grouped = group_references(validation.inputs, validation.targets)
        grouped = grouped.head(cfg.eval_generate_inputs)
        greedy = DecodeConfig(max_new_tokens=cfg.generation.max_new_tokens,
                              stop=cfg.generation.stop,
                              batch_size=cfg.generation.batch_size)
        record.update(evaluate_generation(model, encoder, kv, grouped, greedy).scores)
        record["seconds"]["decoding"] = time.perf_counter() - began
    return record


def default_generation_init_text(task: str | None = None) -> str:
    """Real words to start a generation prefix from (as for labels, but none to name)."""
    head = task.strip() if task and task.strip() else "Write a fluent text"
    return f"{head}. Say everything in the input, in complete sentences."


@torch.inference_mode()
def target_loss(model: nn.Module, kv: torch.Tensor | None, encoder: PairEncoder,
                pairs: TextPairs, batch_size: int = 16,
                progress: Callable[[int, int], None] | None = None) -> float:
    """Mean cross-entropy per target token (EOS included) over every pair: the training
    objective on held-out rows, logits computed only at target positions. `progress(done,
    total)` after each batch of rows."""
    examples = encoder.examples(pairs.inputs, pairs.targets)
    device = next(model.parameters()).device
    pad = encoder.tokenizer.pad_token_id
    total, count, done = 0.0, 0, 0
    for idx in bucketed_batches([len(e) for e in examples], batch_size, 0, 0, shuffle=False):
        batch = collate([examples[i] for i in idx], pad).to(device)
        logits = forward(model, kv.to(device) if kv is not None else None, batch.input_ids,
                         batch.attention_mask, batch.loss_mask)  # (n_target_tokens, V)
        total += float(F.cross_entropy(logits.float(), batch.targets, reduction="sum"))
        count += batch.targets.numel()
        done += len(idx)
        if progress:
            progress(done, len(examples))
    return total / max(count, 1)


def generate(model: nn.Module, encoder: PairEncoder, kv: torch.Tensor | None,
             inputs: Sequence[str], config: DecodeConfig) -> list[str]:
    """One output per input, after the prefix (or from the bare model when kv is None)."""
    if not inputs:
        return []
    return generate_texts(model, encoder.tokenizer, kv, encoder.prompts(inputs), config)


@dataclass
class GenerationResult:
    """Scores of one prefix (or the bare model) on grouped inputs, with its outputs."""

    scores: dict  # bleu, chrf, rouge_l, n (+ loss when computed)
    outputs: list[str]  # one per grouped input


def evaluate_generation(model: nn.Module, encoder: PairEncoder, kv: torch.Tensor | None,
                        grouped: Grouped, config: DecodeConfig,
                        progress: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Outputs and scores on the grouped inputs; with `progress(done, total)`, decoded a batch
    at a time and reported after each (a progress that raises stops there)."""
    if progress is None:
        outputs = generate(model, encoder, kv, grouped.inputs, config)
    else:
        outputs, n = [], len(grouped.inputs)
        progress(0, n)
        for start in range(0, n, config.batch_size):
            outputs += generate(model, encoder, kv, grouped.inputs[start:start + config.batch_size],
                                config)
            progress(len(outputs), n)
    return GenerationResult(generation_scores(outputs, grouped.references), outputs)


def generation_report(model: nn.Module, encoder: PairEncoder, kv: torch.Tensor,
                      data: TextPairs, config: DecodeConfig, *, max_inputs: int | None = None,
                      prefix_loss: float | None = None, deadline: float | None = None,
                      progress: Progress | None = None) -> dict:
    """The prefix's scores at the top level, the bare model's beside them, and a table.

    Every distinct input of `data` (at most `max_inputs`) is generated once by each; `loss`
    is the target cross-entropy (`prefix_loss` when the caller already has it), over every
    row. With a `deadline` (a time.monotonic() value: a run's time budget) the inputs are
    decoded a batch at a time until it passes, and the report scores those reached (at least
    one batch) and says so under "decoded". `progress(what, done, total)` follows each part.
    """
    def told(what: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(what, done, total)) if progress else None

    grouped = group_references(data.inputs, data.targets)
    if max_inputs is not None:
        grouped = grouped.head(max_inputs)

    def loss(prefix_kv: torch.Tensor | None, what: str) -> float:
        if progress:
            progress(what, 0, len(data))
        tell = (lambda done, total: progress(what, done, total)) if progress else None
        return target_loss(model, prefix_kv, encoder, data, progress=tell)

    prefix_loss = prefix_loss if prefix_loss is not None else loss(kv, "loss with the prefix")
    bare_loss = loss(None, "loss of the bare model")
    ours, bare = _decode_both(model, encoder, kv, grouped, config, deadline, progress)
    reached = grouped.head(len(ours))
    report = dict(generation_scores(ours, reached.references))
    report["task"] = "generation"
    report["rows"] = len(data)
    report["decoding"] = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens,
                          "length_penalty": config.length_penalty, "stop": list(config.stop)}
    if len(reached) < len(grouped):
        report["decoded"] = {"inputs": len(reached), "of": len(grouped), "why": "time budget"}
    report["loss"] = prefix_loss
    bare_scores = dict(generation_scores(bare, reached.references))
    bare_scores["loss"] = bare_loss
    report["baselines"] = {"bare_model": bare_scores}
    report["samples"] = [
        {"input": x, "references": refs, "prefix": p, "bare": b}
        for x, refs, p, b in zip(reached.inputs[:SAMPLE_ROWS], reached.references[:SAMPLE_ROWS],
                                 ours, bare, strict=False)
    ]
    return report


def _decode_both(model: nn.Module, encoder: PairEncoder, kv: torch.Tensor, grouped: Grouped,
                 config: DecodeConfig, deadline: float | None,
                 progress: Progress | None) -> tuple[list[str], list[str]]:
    """Outputs with the prefix and of the bare model for the grouped inputs, a batch of each
    at a time, until `deadline` passes (every rank stops at the same batch)."""
    what, total = "decoding held-out inputs (prefix and bare model)", 2 * len(grouped)
    if progress:
        progress(what, 0, total)
    ours: list[str] = []
    bare: list[str] = []
    for start in range(0, len(grouped), config.batch_size):
        if ours and deadline is not None and distributed.agree(time.monotonic() >= deadline):
            break
        inputs = grouped.inputs[start:start + config.batch_size]
        ours += generate(model, encoder, kv, inputs, config)
        if progress:
            progress(what, len(ours) + len(bare), total)
        bare += generate(model, encoder, None, inputs, config)
        if progress:
            progress(what, len(ours) + len(bare), total)
    return ours, bare


def pair_scores(model: nn.Module, encoder: PairEncoder, kv: torch.Tensor | None,
                pairs: TextPairs, config: DecodeConfig) -> dict:
    """One method's figures on held-out pairs, as a comparison (compare.py) lists them:
    bleu, chrf, rouge_l (0-100) of one output per distinct input decoded with `config`, loss
    (target cross-entropy per token over every row), rows (pairs) and inputs (decoded)."""
    grouped = group_references(pairs.inputs, pairs.targets)
    scores = evaluate_generation(model, encoder, kv, grouped, config).scores
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "rouge_l": scores["rouge_l"],
            "loss": target_loss(model, kv, encoder, pairs), "rows": len(pairs),
            "inputs": scores["n"]}


def evaluate_pairs_csv(model: nn.Module, encoder: PairEncoder, kv: torch.Tensor,
                       cfg: RunConfig, path: str, input_column: str | None = None,
                       target_column: str | None = None, decode: dict | None = None, *,
                       max_inputs: int | None = None,
                       progress: Callable[[str, int, int], None] | None = None) -> dict:
    """A run's prefix on a held-out CSV of pairs, beside the bare model: every distinct input
    generated once, its rows its references. Columns default to the run's own; `decode`
    overrides some of the run's decoding settings; `progress(what, done, total)` follows
    each part."""
    data = load_pairs_csv(path, input_column or cfg.text_column,
                          target_column or cfg.target_column)
    settings = DecodeConfig(**{**asdict(cfg.generation), **(decode or {})})
    report = generation_report(model, encoder, kv, data, settings, max_inputs=max_inputs,
                               progress=progress)
    report["columns"] = {"text": data.input_column, "target": data.target_column}
    return report
