"""Training a finished run longer: more minutes or more epochs, from where it ended.

A run that ended on its budget (time, epochs or steps) may still have been improving (its
kept step its last). Its checkpoint holds the prefix and AdamW's moments at the step it
ended on, and its metrics log the evaluations the stopping rule replays, so a resume goes on
from that step as if the budget had been larger: the same batches, the same rule. `extend_run`
writes the larger budget into config.json (and the change into its "extensions" list); the
caller then resumes the run (RunStore.train_longer, or `resume --more-minutes/--more-epochs`)
while holding its run lock.

The learning rate decayed to zero at the old budget's end; the longer schedule is that of a
run given the larger budget from the start (warm-up and linear decay over it), so training
resumes at the rate that schedule has at this step. With more minutes and a schedule fitted
to the time budget, the engine fits it again from the speed the run had
(engine.schedule.Schedule).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from prefixlab.engine.train import Checkpoint
from prefixlab.errors import ConfigError
from prefixlab.runs.folder import RunError, RunFolder

BUDGET_REASONS = ("time budget", "budget of")
"""How train() words an end on a budget (of minutes; of epochs or steps), not on patience."""


def ended_on_budget(report: dict | None) -> bool:
    """Whether a report's training ended on its budget rather than on the stopping rule."""
    return bool(report) and str(report.get("stop_reason", "")).startswith(BUDGET_REASONS)


@dataclass(frozen=True)
class LongerOffer:
    """What a run that may train longer says about itself, and the amounts to offer."""

    steps: int
    kept_step: int
    stop_reason: str
    minutes: float  # the run's first time budget again (0: it had none)
    epochs: int  # without a time budget: its first epochs' budget again

    def sentence(self) -> str:
        kept = ("kept that step: its validation score was still improving"
                if self.kept_step == self.steps else f"kept step {self.kept_step}")
        return (f"Training ended on its {self.stop_reason} at step {self.steps} and {kept}. "
                "Train longer resumes it there, from its checkpoint (the prefix and the "
                "optimizer's state), with the stopping rule going on.")


def longer_offer(folder: RunFolder) -> LongerOffer | None:
    """The offer for a completed run that ended on its budget and kept its checkpoint; None
    for any other run (still active, stopped by patience, cancelled, imported)."""
    if folder.status().get("state") != "completed" or not folder.checkpoint_path.is_file():
        return None
    report = folder.read_report()
    if not ended_on_budget(report) or "steps" not in report:
        return None
    first = _first_budget(folder.read_config())
    minutes = round(float(first["max_minutes"]), 2)
    return LongerOffer(int(report["steps"]), int(report["kept_step"]), report["stop_reason"],
                       minutes, 0 if minutes else int(first["epochs"]))


def _first_budget(info: dict) -> dict:
    """The training settings the run was created with (before any extension)."""
    extensions = info.get("extensions") or []
    return extensions[0]["before"] if extensions else info["run"]["training"]


def check_amounts(more_minutes: float, more_epochs: int) -> None:
    """ConfigError with every problem of the amounts asked for."""
    problems = []
    if not (math.isfinite(more_minutes) and more_minutes >= 0):
        problems.append(f"more minutes must be 0 or more, got {more_minutes}")
    if more_epochs < 0 or more_epochs != int(more_epochs):
        problems.append(f"more epochs must be a whole number, 0 or more, got {more_epochs}")
    if not problems and not (more_minutes or more_epochs):
        problems.append("give more minutes or more epochs (or both) to train longer")
    if problems:
        raise ConfigError(problems)


def check_run(folder: RunFolder) -> Checkpoint:
    """The checkpoint of a run that may train longer; RunError saying why for any other."""
    name = folder.path.name
    state = folder.status().get("state")
    if state != "completed":
        raise RunError(f"run {name} is {state}: only a completed run trains longer (a "
                       "stopped one resumes)")
    report = folder.read_report()
    if not ended_on_budget(report):
        why = report.get("stop_reason") if report else "it has no report"
        raise RunError(f"run {name} did not end on its budget ({why}): training longer "
                       "would not change what it keeps")
    checkpoint = folder.load_checkpoint()
    if checkpoint is None:
        raise RunError(f"run {name} has no checkpoint to train on from")
    return checkpoint


def longer_settings(training: dict, train_rows: int, step: int, trained_s: float,
                    more_minutes: float, more_epochs: int) -> dict:
    """The training settings (config.json's "training") for `more_minutes` and `more_epochs`
    after `step`, which took `trained_s` seconds of training.

    More epochs: the budget ends `more_epochs` epochs after `step` (a step budget, as the
    run may have ended mid-epoch). More minutes: the time budget ends that long after the
    time trained so far. Either alone lifts the other budget: the minutes alone get as
    many epochs as they can use, the epochs alone no time limit.
    """
    check_amounts(more_minutes, more_epochs)
    per_epoch = math.ceil(train_rows / training["batch_size"])
    new = dict(training)
    if more_epochs:
        new["max_steps"] = step + int(more_epochs) * per_epoch
        new["epochs"] = max(training["epochs"], math.ceil(new["max_steps"] / per_epoch))
    else:  # room for twice the steps the minutes fit at the speed so far
        fits = 2 * step / trained_s * more_minutes * 60 if step and trained_s > 0 else 0
        new["max_steps"] = None
        new["epochs"] = max(training["epochs"], math.ceil((step + fits) / per_epoch) + 1)
    new["max_minutes"] = round(trained_s / 60 + more_minutes, 2) if more_minutes else 0.0
    return new


def extend_run(folder: RunFolder, more_minutes: float, more_epochs: int) -> dict:
    """Give a completed run that ended on its budget `more_minutes` and/or `more_epochs`:
    its config.json gets the larger budget, its checkpoint drops the fitted schedule's end
    (the engine fits it again). Resume it after this. The caller holds the run lock.

    Returns the extension as config.json's "extensions" list records it.
    Raises RunError for a run that cannot train longer, ConfigError for bad amounts.
    """
    checkpoint = check_run(folder)
    info = folder.read_config()
    before = dict(info["run"]["training"])
    settings = longer_settings(before, int(info["data"]["train_rows"]), checkpoint.step,
                               checkpoint.elapsed_s, float(more_minutes), more_epochs)
    extension = {"time": time.time(), "from_step": checkpoint.step,
                 "more_minutes": float(more_minutes), "more_epochs": int(more_epochs),
                 "before": before, "after": settings}
    info["run"]["training"] = settings
    info["extensions"] = [*(info.get("extensions") or []), extension]
    folder.write_config(info)
    folder.save_checkpoint(replace(checkpoint, planned_steps=0))
    folder.append_metrics({"type": "event", "message": "train longer", "time": time.time(),
                           "step": checkpoint.step, "more_minutes": float(more_minutes),
                           "more_epochs": int(more_epochs)})
    return extension


def describe_extension(extension: dict) -> str:
    """E.g. "from step 164: 2 more minutes (time budget now 3.45 min), up to 1 more epoch"."""
    parts = []
    after = extension["after"]
    if extension["more_minutes"]:
        parts.append(f"{extension['more_minutes']:g} more minutes (time budget now "
                     f"{after['max_minutes']:g} min)")
    if extension["more_epochs"]:
        n = extension["more_epochs"]
        parts.append(f"{'up to ' if parts else ''}{n} more epoch{'s' * (n != 1)}")
    return f"from step {extension['from_step']}: {', '.join(parts)}"


def longer_reason(reason: str, info: dict) -> str:
    """Why training ended, with the last extension when the run was trained longer: e.g.
    "time budget of 1.76 min (trained longer from step 164: 0.3 more minutes)" (a budget
    grown by an extension reads oddly alone)."""
    extensions = info.get("extensions") or []
    if not extensions:
        return reason
    last = extensions[-1]
    amounts = [f"{last['more_minutes']:g} more minutes"] if last["more_minutes"] else []
    if n := last["more_epochs"]:
        amounts.append(f"{n} more epoch{'s' * (n != 1)}")
    return f"{reason} (trained longer from step {last['from_step']}: {', '.join(amounts)})"
