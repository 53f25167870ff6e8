"""Where training ends: the epochs' budget, or a schedule fitted to a time budget.

The training loop (train.py) asks this after every step and evaluation whether time has run
out and where the learning rate's decay should end, so that a run on a time budget decays to
zero when the budget runs out instead of stopping mid-decay. Every rank of a data-parallel
run plans the same end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prefixlab.engine import distributed

PLAN_AFTER_STEPS = 20
"""Steps timed before a time budget first plans the schedule (`TrainConfig.fit_schedule`):
enough to see the speed, a small share of any budget worth planning. Each evaluation plans
again from the speed so far, evaluations included."""


def planned_end(total: int, step: int, steps_timed: int, seconds: float, left_s: float) -> int:
    """The step a schedule fitted to the time budget ends at: at `steps_timed` steps per
    `seconds`, the steps that fit in the `left_s` seconds left after `step`; at most `total`
    (the epochs' budget), at least one more step."""
    fits = int(steps_timed / seconds * max(0.0, left_s)) if seconds > 0 else total
    return max(step + 1, min(total, step + fits))



class Schedule:
    """Where training ends: the epochs' budget, or a schedule fitted to the time budget.

    With `TrainConfig.fit_schedule` and a time budget, the end is planned after
    PLAN_AFTER_STEPS steps from the speed so far and planned again at each evaluation, so the
    learning rate decays to zero when the budget runs out rather than stopping mid-decay.
    Every rank plans the same end (the smallest of theirs). Training's share of the budget is
    what `reserve_s()` leaves: the seconds the caller keeps for after training (its final
    report), asked anew at each check, as the caller learns what that costs.

    A run resumed past PLAN_AFTER_STEPS without a plan (one given more time after it ended:
    runs/extension.py clears its plan) plans at once, from the speed of the steps it has.
    """

    def __init__(self, budget_s: float, fit: bool, total: int, start: int, before_s: float,
                 planned: int, reserve_s: Callable[[], float] | None = None) -> None:
        """budget_s: the time budget in seconds (0: none); fit: TrainConfig.fit_schedule;
        total: the epochs' budget in steps; start, before_s, planned: where a resumed run
        stopped, the seconds it had trained and the end it had planned (0: none)."""
        self.total, self.start, self.before_s = total, start, before_s
        self.budget_s = budget_s
        self.reserve_s = reserve_s or (lambda: 0.0)
        self.fitting = bool(self.budget_s) and fit
        self.planned = planned if self.fitting else 0  # 0: the epochs' budget
        self.began = time.perf_counter()
        if self.fitting and not self.planned and start >= PLAN_AFTER_STEPS and before_s > 0:
            end = planned_end(total, start, start, before_s, self.left_s())
            self.planned = int(distributed.agree_min(end))

    @property
    def end(self) -> int:
        return self.planned or self.total

    def elapsed(self) -> float:
        """Seconds since this process began training (not counting a resumed run's past)."""
        return time.perf_counter() - self.began

    def left_s(self) -> float:
        """Seconds of the time budget left to train (inf without one): the budget less the
        time trained, resumes included, and less what the caller reserves."""
        if not self.budget_s:
            return math.inf
        return self.budget_s - self.before_s - self.elapsed() - self.reserve_s()

    def out_of_time(self, step: int) -> bool:
        """The time budget has run out before the schedule's end; every rank agrees (their
        clocks differ, and one rank stopping alone would leave the others waiting)."""
        return (bool(self.budget_s) and distributed.agree(self.left_s() <= 0)
                and step != self.end)

    def eta(self, step: int) -> float:
        """Seconds to the schedule's end at the speed of this process's steps, never more
        than the time budget leaves (before a plan, the end is the epochs' budget, which a
        time budget may cut far short)."""
        elapsed = self.elapsed()
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        if not rate:
            return 0.0
        return max(0.0, min((self.end - step) / rate, self.left_s()))

    def after_step(self, step: int) -> None:
        if self.fitting and not self.planned and step - self.start == PLAN_AFTER_STEPS:
            self.replan(step)

    def after_evaluation(self, step: int, out_of_time: bool) -> None:
        if self.fitting and self.planned and step != self.end and not out_of_time:
            self.replan(step)  # the speed so far, evaluations included

    def replan(self, step: int) -> None:
        end = planned_end(self.total, step, step - self.start, self.elapsed(), self.left_s())
        self.planned = int(distributed.agree_min(end))
