"""When to stop training and which step to keep: the best validation score within a budget.

`EarlyStopping` is a pure rule over the sequence of evaluations: it keeps the step with the
best value of one metric (validation macro-F1 for classification, validation loss for a
generation run: `monitor` names it, `MINIMIZED` says which way is better), and says stop
once `patience` evaluations in a row brought no improvement. With `smoothing` k it keeps
the step whose window of evaluations (k on each side, fewer at the ends) has the best mean
instead: a validation split of a few dozen rows gives one lucky evaluation now and then,
and a step whose neighbours also score well is the safer pick. It knows nothing about models
or files; its whole state is `state_dict()`, and it can be rebuilt from the evaluation
records a run folder already holds (`replay`), so a resumed run decides exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MINIMIZED = frozenset({"val_loss", "loss"})
"""Metrics where lower is better; every other monitored metric is maximized."""


@dataclass
class EarlyStopping:
    """Keep the best evaluation by `monitor`; stop after `patience` evaluations without one.

    patience 0 never stops early (the budget alone ends the run). An evaluation improves on
    the best when it beats it by more than `min_delta` (in the metric's own units). Patience
    counts on the single evaluations; `smoothing` changes only which step is kept
    (`kept_step`).
    """

    monitor: str = "macro_f1"
    patience: int = 3
    min_delta: float = 0.0
    smoothing: int = 0
    best_step: int | None = None
    best_value: float | None = None
    evaluations: int = 0
    since_best: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError(f"patience must be 0 or more, got {self.patience}")
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be 0 or more, got {self.smoothing}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be 0 or more, got {self.min_delta}")

    @property
    def minimize(self) -> bool:
        return self.monitor in MINIMIZED

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.minimize:
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Record the evaluation at `step`; True when it is the new best (keep this prefix)."""
        if self.monitor not in metrics:
            raise KeyError(f"evaluation at step {step} has no {self.monitor!r}; "
                           f"it has {', '.join(sorted(metrics))}")
        value = float(metrics[self.monitor])
        if math.isnan(value):  # a diverged evaluation never becomes the best
            value = math.inf if self.minimize else -math.inf
        self.evaluations += 1
        self.history.append((step, value))
        if self._better(value):
            self.best_step, self.best_value, self.since_best = step, value, 0
            return True
        self.since_best += 1
        return False

    @property
    def kept_step(self) -> int | None:
        """The step to keep: the best evaluation, or with `smoothing` the centre of the best
        window (ties go to the better single evaluation, then the earlier step)."""
        if not self.smoothing or not self.history:
            return self.best_step
        k, values = self.smoothing, [v for _, v in self.history]
        sign = -1.0 if self.minimize else 1.0

        def score(i: int) -> tuple[float, float, int]:
            window = values[max(0, i - k):i + k + 1]
            return sign * sum(window) / len(window), sign * values[i], -i

        return self.history[max(range(len(values)), key=score)][0]

    @property
    def exhausted(self) -> bool:
        """Patience ran out: the last `patience` evaluations did not improve on the best."""
        return self.patience > 0 and self.since_best >= self.patience

    def reason(self) -> str:
        """Why the rule ends training, in words for the report (only when `exhausted`)."""
        return (f"no improvement of validation {self.monitor} in {self.since_best} "
                f"evaluations (best {self.best_value:.4f} at step {self.best_step})")

    def selection(self) -> str:
        """How the kept step was chosen, in words for the report."""
        if not self.smoothing:
            return f"the step with the best validation {self.monitor}"
        n = 2 * self.smoothing + 1
        return (f"the step whose {n} evaluations around it have the best mean validation "
                f"{self.monitor}")

    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "patience": self.patience, "min_delta": self.min_delta,
                "smoothing": self.smoothing, "best_step": self.best_step,
                "best_value": self.best_value, "evaluations": self.evaluations,
                "since_best": self.since_best, "history": [list(h) for h in self.history]}

    @classmethod
    def replay(cls, records: Iterable[Mapping], up_to_step: int, *, monitor: str = "macro_f1",
               patience: int = 3, min_delta: float = 0.0, smoothing: int = 0) -> EarlyStopping:
        """The rule's state after the evaluations at steps <= `up_to_step`, in step order.

        `records` are a run's metrics lines; an evaluation repeated after a resume (the same
        step evaluated twice) counts once, with its latest values.
        """
        by_step: dict[int, Mapping] = {}
        for r in records:
            if r.get("type") == "eval" and int(r["step"]) <= up_to_step:
                by_step[int(r["step"])] = r
        rule = cls(monitor=monitor, patience=patience, min_delta=min_delta, smoothing=smoothing)
        for step in sorted(by_step):
            rule.update(step, by_step[step])
        return rule
