"""Scores of generated texts against references, from the field's own libraries.

- BLEU and chrF: sacrebleu's corpus scores (default 13a tokenization, case-sensitive), the
  figures people can reproduce from the same outputs;
- ROUGE-L: rouge-score's sentence-level LCS F-measure, the best over an input's references,
  averaged over inputs (as the E2E challenge's script does).

Data-to-text sets such as E2E write several references for one input: rows that share an
input are grouped (`group_references`), and each distinct input is generated and scored once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Grouped:
    """Distinct inputs in first-seen order, with every reference written for each."""

    inputs: list[str]
    references: list[list[str]]

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, n: int) -> Grouped:
        return Grouped(self.inputs[:n], self.references[:n])


def group_references(inputs: Sequence[str], targets: Sequence[str]) -> Grouped:
    """Rows that share an input become one input with several references."""
    refs: dict[str, list[str]] = {}
    for x, y in zip(inputs, targets, strict=True):
        refs.setdefault(x, []).append(y)
    return Grouped(list(refs), list(refs.values()))


def generation_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """bleu, chrf, rouge_l (0-100) and n (inputs) of one output per input.

    `references[i]` holds every reference for input i (at least one).
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs for {len(references)} inputs")
    if any(not refs for refs in references):
        raise ValueError("every input needs at least one reference")
    if not hypotheses:
        return {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0, "n": 0}
    hyps = list(hypotheses)
    # sacrebleu takes reference *streams*: stream k holds every input's k-th reference, None
    # where an input has fewer.
    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    chrf = sacrebleu.corpus_chrf(hyps, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score_multi(list(refs), h)["rougeL"].fmeasure
             for h, refs in zip(hyps, references, strict=True)]
    return {"bleu": float(bleu), "chrf": float(chrf),
            "rouge_l": 100.0 * sum(rouge) / len(rouge), "n": len(hyps)}
