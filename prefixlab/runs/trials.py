"""Choosing the learning rate on the validation rows (TrainConfig.try_learning_rates).

A run given several rates trains once at each: a trial, a whole run of its own in
`trials/lr-RATE/` inside the run's folder, from the same start on the same rows, with the
time budget shared among the trials. Each trial keeps its best step as any run does; the run
then keeps the trial whose report scores best on the validation rows (by the run's
`monitor`), ties going to the earlier rate. The winner's files become the run's own, so
predict, inspect, resume and "train longer" read a plain run trained at the chosen rate
(config.json then says that rate, and no more to try); its report adds every trial's score.

Why: on topic-held-out tests the learning rate that generalized best differed between data
sets, and the validation rows ranked the rates as the shifted tests did (docs/quality.md).

While the trials run, each record a trial writes to its own log is also appended to the
run's as {"type": "trial", "learning_rate", "index", "count", "record"}, so the page can
draw every rate's curves live; the winner's own records follow once it is chosen.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefixlab.engine import distributed
from prefixlab.engine.train import StepInfo
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder

if TYPE_CHECKING:
    from prefixlab.engine.models import LoadedModel

TRIALS_DIR = "trials"
WINNER_FILES = ("prefix.safetensors", "prefix_params.safetensors", "checkpoint.safetensors")


def trial_folder(folder: RunFolder, rate: float) -> RunFolder:
    return RunFolder(folder.path / TRIALS_DIR / f"lr-{rate:g}")


def trial_score(report: dict, monitor: str) -> tuple[str, float]:
    """(the report's key, its value) for the run's monitor."""
    if monitor == "val_loss":
        return "loss", float(report["loss"])
    return monitor, float(report[monitor])


def best_trial(trials: list[dict], monitor: str) -> dict:
    """The trial with the best validation score; the earliest among equals."""
    sign = -1 if monitor == "val_loss" else 1  # max keeps the first of equals
    return max(trials, key=lambda t: sign * t["score"])


def choose_learning_rate(folder: RunFolder, loaded: LoadedModel, prepared: Any,
                         execute: Callable[..., dict | None], *,
                         on_step: Callable[[StepInfo], None] | None = None,
                         should_stop: Callable[[], bool] | None = None,
                         resume: bool = False,
                         on_progress: Callable[[dict], None] | None = None,
                         report_in_budget: bool = True) -> dict | None:
    """Train the run in `folder` at each of its learning rates and keep the best on
    validation (module docstring). `prepared` is the run's data (experiment.PreparedData)
    and `execute` experiment.execute_run, which trains each trial as a run of its own.
    Returns the run's report, or None when stopped during a trial (a resume continues that
    trial and reuses the ones completed)."""
    info = folder.read_config()
    cfg = RunConfig.from_dict(info["run"])
    rates = cfg.training.learning_rates()
    writer = distributed.is_writer()
    trials = []
    for index, rate in enumerate(rates):
        distributed.barrier()  # every rank reads the trial's state before rank 0 writes it
        sub = trial_folder(folder, rate)
        completed = sub.exists() and sub.status().get("state") == "completed"
        done = sub.read_report() if completed else None
        if done is None:
            begun = sub.exists()
            if writer:
                _write_trial_config(folder, sub, info, rate, len(rates), resume)
                folder.set_status("running", phase=f"training at learning rate {rate:g} "
                                  f"({index + 1} of {len(rates)})",
                                  processes=distributed.world_size())
            distributed.barrier()  # the other ranks read the trial's config.json

            def mirror(record: dict, rate: float = rate, index: int = index) -> None:
                folder.append_metrics({"type": "trial", "learning_rate": rate, "index": index,
                                       "count": len(rates), "record": record})

            done = execute(sub, loaded, prepared=prepared, on_step=on_step,
                           should_stop=should_stop, resume=resume and begun,
                           on_progress=on_progress, report_in_budget=report_in_budget,
                           mirror=mirror)
            if done is None:
                return None
        key, score = trial_score(done, cfg.training.monitor)
        trials.append({"learning_rate": rate, "folder": sub, "report": done, "key": key,
                       "score": score})
    winner = best_trial(trials, cfg.training.monitor)
    report = {**winner["report"], "learning_rate": winner["learning_rate"],
              "learning_rate_trials": [
                  {"learning_rate": t["learning_rate"], t["key"]: t["score"],
                   "kept_step": t["report"]["kept_step"], "steps": t["report"]["steps"],
                   "stop_reason": t["report"]["stop_reason"]} for t in trials]}
    if writer:
        _adopt(folder, winner["folder"], info, report, rates)
    distributed.barrier()  # the run's files are the winner's before any rank goes on
    return report


def _write_trial_config(folder: RunFolder, sub: RunFolder, info: dict, rate: float,
                        count: int, resume: bool) -> None:
    """The trial's config.json: the run's, at `rate`, with nothing more to try and its
    share of the time budget. A trial begun before is resumed, or started over without."""
    if sub.exists():
        if resume:
            return
        shutil.rmtree(sub.path)
    training = {**info["run"]["training"], "learning_rate": rate, "try_learning_rates": [],
                "max_minutes": info["run"]["training"]["max_minutes"] / count}
    sub.path.mkdir(parents=True)
    sub.write_config({**info, "name": f"{info['name']} · learning rate {rate:g}",
                      "created": time.time(), "run": {**info["run"], "training": training}})


def _adopt(folder: RunFolder, winner: RunFolder, info: dict, report: dict,
           rates: list[float]) -> None:
    """Make the winning trial's prefix, checkpoint, snapshots and log the run's own, and
    config.json say the rate it trained at; then write the report."""
    for name in WINNER_FILES:
        if (winner.path / name).is_file():
            shutil.copy2(winner.path / name, folder.path / name)
    if folder.snapshots_dir.is_dir():
        shutil.rmtree(folder.snapshots_dir)
    if winner.snapshots_dir.is_dir():
        shutil.copytree(winner.snapshots_dir, folder.snapshots_dir)
    for record in winner.read_metrics()[0]:
        folder.append_metrics(record)
    won = winner.read_config()
    if "prior_scale" in won["data"]:
        info["data"]["prior_scale"] = won["data"]["prior_scale"]
    # the winner's settings (its rate, nothing more to try, its share of the time budget),
    # so a resume or "train longer" continues it as it trained
    info["run"]["training"] = won["run"]["training"]
    info["learning_rate_choice"] = {"tried": rates, "chosen": report["learning_rate"],
                                    "trials": report["learning_rate_trials"]}
    folder.write_config(info)
    folder.write_report(report)
    folder.set_status("completed", step=report["steps"])
    folder.append_metrics({"type": "event", "message": "completed", "step": report["steps"],
                           "time": time.time(), "learning_rate": report["learning_rate"]})


def choice_sentence(report: dict) -> str:
    """E.g. "Learning rate 0.01, chosen on the validation rows: macro-F1 0.535 there,
    against 0.480 at 0.005." Empty for a run that trained at one rate."""
    trials = report.get("learning_rate_trials")
    if not trials:
        return ""
    key = next(k for k in trials[0] if k not in ("learning_rate", "kept_step", "steps",
                                                 "stop_reason"))
    name = {"macro_f1": "macro-F1", "accuracy": "accuracy", "loss": "loss"}.get(key, key)
    chosen = report["learning_rate"]
    won = next(t for t in trials if t["learning_rate"] == chosen)
    others = ", ".join(f"{t[key]:.3f} at {t['learning_rate']:g}" for t in trials
                       if t["learning_rate"] != chosen)
    return (f"Learning rate {chosen:g}, chosen on the validation rows: {name} {won[key]:.3f} "
            f"there, against {others}.")
