"""The training settings (TrainConfig), stored in every run's config.json; the loop that reads
them is train.py, which re-exports TrainConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from prefixlab.errors import ConfigError

Monitor = Literal["macro_f1", "accuracy", "val_loss"]
ClassBalance = Literal["none", "sampled", "weighted"]
MONITORS: tuple[str, ...] = get_args(Monitor)
CLASS_BALANCE: tuple[str, ...] = get_args(ClassBalance)


@dataclass
class TrainConfig:
    """Optimization settings. Stored in every run's config.json.

    How long to train is chosen on the validation rows: the loop evaluates at regular
    intervals, the caller keeps the best prefix by `monitor` (stopping.EarlyStopping) and
    ends the run after `patience` evaluations without improvement, within a budget of
    `epochs` and `max_minutes`.
    """

    learning_rate: float = 5e-3
    """AdamW step size for the prefix; prefixes tolerate far larger steps than full weights."""
    try_learning_rates: tuple[float, ...] | None = None
    """More learning rates to train at besides `learning_rate`: the run trains once at each,
    from the same start on the same rows, the time budget shared among them, and keeps the
    one whose kept step scores best on the validation rows (`monitor`; runs/trials.py).
    Empty is off. Unset, the run's task decides (RunConfig): 0.01 for a classification run,
    none for a generation run. The rate that held up best on topics training never saw
    differed between data sets, and validation picked it (docs/quality.md)."""
    epochs: int = 8
    """The budget in epochs; with patience the run usually stops before (the learning rate
    decays over this budget, so it also sets the schedule)."""
    batch_size: int = 8
    max_steps: int | None = None
    """Stop after this many steps (0 saves the initialized prefix); None runs all epochs."""
    warmup_share: float = 0.06
    """Linear warm-up over this share of the budget's steps."""
    warmup_steps: int = 0
    """A fixed warm-up length instead of `warmup_share` when above 0 (runs made before
    warmup_share existed stored 10 here, and resume with it)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0
    """Evaluate every N steps of each epoch (counted from its start) and at its end; 0
    evaluates twice per epoch."""
    patience: int = 4
    """Stop after this many evaluations in a row without a better `monitor`; 0 never stops
    early."""
    monitor: Monitor = "macro_f1"
    """The validation metric that picks the step to keep: macro_f1 or accuracy (higher is
    better), val_loss (lower is better; what a generation run uses)."""
    keep_best: bool = True
    """Keep the prefix of the best evaluation, not the last step's."""
    smoothing: int = 1
    """Evaluations on each side averaged with one when picking the step to keep: 1 keeps the
    step whose three evaluations score best on average, so one lucky score on a small
    validation split does not decide; 0 keeps the single best evaluation."""
    max_minutes: float = 0.0
    """Time budget in minutes for the whole run after its model has loaded: training, its
    evaluations and the final report (resumes included); 0 has none. Training ends early
    enough to leave the final report its time, and evaluates the step it ends on."""
    fit_schedule: bool = True
    """With a time budget: once the speed is known (after 20 steps, and again at each
    evaluation), fit the warm-up and the decay to the steps that fit in the budget rather
    than to all `epochs`, and end there. Without it, a budget that cuts the epochs short also
    cuts the schedule mid-way (a 60-minute run on 16,000 rows would spend 23 of its minutes
    warming up and never decay)."""
    class_balance: ClassBalance = "none"
    """none; sampled: each epoch draws its rows with every class equally likely (with
    replacement); weighted: every row once, its loss weighted by its class's inverse
    frequency. Both make rare classes weigh as much in the loss as common ones."""
    start_pull: float = 0.0
    """Strength of an L2 pull toward the prefix training started from: each step adds
    start_pull * (theta - theta_0) to the gradient (the gradient of start_pull/2 *
    |theta - theta_0|^2), so the prefix stays near its init text, which carries no training
    row's topic. 0 is off (and leaves training exactly as without it)."""
    average_last: int = 1
    """Keep the mean of the prefixes of the kept evaluation and the average_last - 1
    evaluations before it (weight averaging), rather than the kept one alone: a flatter
    point than any single evaluation's. 1 keeps the kept evaluation's prefix."""
    prefix_dropout: float = 0.0
    """Share of the prefix's slots hidden from each training step, so the prefix cannot lean
    on a few slots that memorize training topics. Each slot is hidden with this probability,
    drawn once per step (`kept_slots`: seeded by seed and step, so a resumed run draws the
    same) for every row and layer of the batch: one draw per step does not depend on how the
    batch is cut into chunks or shared among data-parallel ranks, so neither changes the
    prefix trained. A hidden slot is masked out of attention (a zeroed key would still take
    attention mass), the softmax spreads over what is left (so no 1/(1-p) rescaling), and it
    gets no gradient that step. Training only: evaluation and scoring read every slot. Above
    0 training takes autograd through the model, not the family's fast step (which cannot
    mask slots). 0 is off (and leaves training exactly as without it)."""
    checkpoint_every: int = 25
    """Checkpoint (prefix + optimizer) every N steps, so a crash loses at most that much."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.learning_rate < 10:
            problems.append(f"learning_rate must be in (0, 10), got {self.learning_rate}")
        try:  # from config.json a list, from --set a number or "0.01,0.02"
            if self.try_learning_rates is not None:
                self.try_learning_rates = _rates(self.try_learning_rates)
        except (TypeError, ValueError):
            problems.append(f"try_learning_rates must be learning rates, e.g. 0.01,0.02, got "
                            f"{self.try_learning_rates!r}")
        else:
            if bad := [r for r in self.try_learning_rates or () if not 0 < r < 10]:
                problems.append(f"try_learning_rates must each be in (0, 10), got "
                                f"{', '.join(f'{r:g}' for r in bad)}")
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if not 1 <= self.batch_size <= 1024:
            problems.append(f"batch_size must be 1..1024, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 0:
            problems.append(f"max_steps must be 0 or more, got {self.max_steps}")
        if not (math.isfinite(self.start_pull) and self.start_pull >= 0):
            problems.append(f"start_pull must be 0 (off) or more, got {self.start_pull}")
        if self.average_last < 1:
            problems.append(f"average_last must be at least 1, got {self.average_last}")
        if not 0 <= self.prefix_dropout < 1:  # also refuses NaN
            problems.append(f"prefix_dropout must be in [0, 1) (the share of prefix slots "
                            f"hidden per step; 0 is off), got {self.prefix_dropout}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "patience", "smoothing"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.warmup_share < 1:
            problems.append(f"warmup_share must be in [0, 1), got {self.warmup_share}")
        if not (math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            problems.append(f"max_minutes must be 0 or more, got {self.max_minutes}")
        if not 0 <= self.weight_decay <= 1:
            problems.append(f"weight_decay must be in [0, 1], got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            # a negative norm would flip the gradient: training would climb the loss
            problems.append(f"grad_clip must be 0 (off) or more, got {self.grad_clip}")
        if self.monitor not in MONITORS:
            problems.append(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.class_balance not in CLASS_BALANCE:
            problems.append(f"class_balance must be one of {', '.join(CLASS_BALANCE)}, "
                            f"got {self.class_balance!r}")
        if problems:
            raise ConfigError(problems)

    def learning_rates(self) -> list[float]:
        """The rates the run trains at: `learning_rate`, then each other one tried."""
        return list(dict.fromkeys((self.learning_rate, *(self.try_learning_rates or ()))))

    def total_steps(self, num_examples: int) -> int:
        per_epoch = math.ceil(num_examples / self.batch_size)
        total = per_epoch * self.epochs
        return total if self.max_steps is None else min(self.max_steps, total)

    def warmup(self, total: int) -> int:
        """Warm-up steps for a run of `total` steps."""
        return self.warmup_steps or round(self.warmup_share * total)

    def evaluation_interval(self, per_epoch: int) -> int:
        """Steps between evaluations (besides the end of each epoch)."""
        return self.eval_every or max(1, math.ceil(per_epoch / 2))


def _rates(value) -> tuple[float, ...]:
    """Learning rates from a sequence, one number, or text such as "0.01, 0.02"."""
    if isinstance(value, str):
        value = [x for x in value.replace(" ", "").split(",") if x]
    elif isinstance(value, int | float):
        value = [value]
    rates = tuple(float(x) for x in value)
    if not all(math.isfinite(r) for r in rates):
        raise ValueError("not a finite number")
    return rates
