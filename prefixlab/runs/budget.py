"""A run's time budget after training, and progress through its final report.

The time budget (`TrainConfig.max_minutes`) covers the whole run once its model has loaded:
training, its evaluations and the final report. `FinalReserve` is the share training leaves
for that report: guessed as a share of the budget until an evaluation has been timed, then
estimated from what the evaluations cost (the report reads the same held-out rows, with and
without the prefix). A generation run's report decodes every held-out input with the run's
decoding settings, which costs far more than an evaluation's few greedy inputs; it decodes
until `deadline` and reports on the inputs it reached.

`PhaseProgress` turns a report's progress calls (what, done, total) into records with the
time spent and an estimate of the time left, for the run folder's metrics log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prefixlab.runs.config import RunConfig

Progress = Callable[[str, int, int], None]
"""progress(what, done, total): `done` of `total` rows (or inputs) of `what` are through."""

FIRST_SHARE = {"classification": 0.1, "generation": 0.3}
"""The budget's share kept for the final report before any evaluation has been timed."""
MOST_SHARE = 0.5
"""The most of the budget the final report may claim; a generation run's report decodes
fewer inputs rather than take more."""
MARGIN = 1.25  # an estimate from one evaluation, on cores others share
FIXED_S = 2.0  # fitting the decision rule, the TF-IDF baseline, writing the files


@dataclass
class FinalReserve:
    """Seconds of a run's time budget kept for its final report: training's `reserve_s`.

    `scales`: seconds of the final report per second of each part of an evaluation
    ("scoring" the held-out rows, "decoding" a few held-out inputs); `timed` takes an
    evaluation's seconds per part.
    """

    budget_s: float
    scales: dict[str, float]
    first_share: float
    estimate_s: float | None = None

    @classmethod
    def of(cls, cfg: RunConfig, validation) -> FinalReserve:
        """The reserve of a run on its validation rows (LabeledData or TextPairs)."""
        budget_s = cfg.training.max_minutes * 60
        if not cfg.is_generation:  # the zero-shot baseline reads the same rows once more
            return cls(budget_s, {"scoring": 1.0}, FIRST_SHARE["classification"])
        inputs = max(1, validation.distinct_inputs())
        decoded = min(cfg.eval_generate_inputs, inputs)
        # An evaluation's loss reads one reference per input, the report's every row, with
        # and without the prefix; it decodes `decoded` inputs greedily, the report every
        # input with the run's beams, with and without the prefix.
        scales = {"scoring": 2 * len(validation) / inputs}
        if decoded:
            scales["decoding"] = 2 * inputs / decoded * cfg.generation.num_beams
        return cls(budget_s, scales, FIRST_SHARE["generation"])

    def timed(self, seconds: Mapping[str, float]) -> None:
        """An evaluation's seconds per part; the estimate follows the latest evaluation."""
        if all(part in seconds for part in self.scales):
            self.estimate_s = FIXED_S + MARGIN * sum(
                scale * seconds[part] for part, scale in self.scales.items())

    def __call__(self) -> float:
        """Seconds to keep for the final report now (0 without a time budget)."""
        if not self.budget_s:
            return 0.0
        guess = self.first_share * self.budget_s if self.estimate_s is None else self.estimate_s
        return min(MOST_SHARE * self.budget_s, guess)

    def deadline(self, trained_s: float) -> float | None:
        """When the budget ends (a time.monotonic() value), after `trained_s` seconds of
        training, resumes included; None without a time budget."""
        if not self.budget_s:
            return None
        return time.monotonic() + max(0.0, self.budget_s - trained_s)


class PhaseProgress:
    """Progress calls as metrics records: `write` gets {"type": "progress", what, done,
    total, elapsed_s (since `what` began), eta_s (None until something is done)}."""

    def __init__(self, write: Callable[[dict], None], phase: str = "final report") -> None:
        self.write, self.phase = write, phase
        self.what: str | None = None
        self.began = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        if what != self.what:
            self.what, self.began = what, time.monotonic()
        elapsed = time.monotonic() - self.began
        eta = elapsed / done * (total - done) if done else None
        self.write({"type": "progress", "phase": self.phase, "what": what, "done": done,
                    "total": total, "elapsed_s": elapsed, "eta_s": eta})
