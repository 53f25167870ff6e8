"""Training length chosen by validation: the early-stopping rule, the budgets, the kept step,
and a resume in the middle of a patience window that ends as the uninterrupted run does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prefixlab.engine.prefix import PrefixConfig
from prefixlab.engine.stopping import EarlyStopping
from prefixlab.engine.train import TrainConfig, train
from prefixlab.runs.config import RunConfig
from prefixlab.runs.experiment import create_run, execute_run, prepare_data
from prefixlab.runs.folder import RunFolder
from tests.test_train import _setup

CURVE = [0.40, 0.55, 0.61, 0.60, 0.61, 0.58, 0.57, 0.70, 0.50]  # macro-F1 per evaluation


def _feed(rule: EarlyStopping, curve, every: int = 10) -> int | None:
    """Feed the curve at steps 10, 20, ...; the step at which the rule says stop, if any."""
    for i, value in enumerate(curve):
        rule.update((i + 1) * every, {"macro_f1": value, "val_loss": 1 - value})
        if rule.exhausted:
            return (i + 1) * every
    return None


def test_rule_keeps_the_best_step_and_stops_after_patience():
    rule = EarlyStopping(patience=3)
    # 0.61 at step 30; 0.60, 0.61 (not better), 0.58: three without improvement
    assert _feed(rule, CURVE) == 60
    assert (rule.best_step, rule.best_value, rule.since_best) == (30, 0.61, 3)
    assert "3 evaluations" in rule.reason() and "step 30" in rule.reason()


def test_rule_with_more_patience_finds_the_later_best_and_patience_zero_never_stops():
    rule = EarlyStopping(patience=5)
    assert _feed(rule, CURVE) is None
    assert rule.best_step == 80 and rule.since_best == 1
    never = EarlyStopping(patience=0)
    assert _feed(never, [0.9, 0.1, 0.1, 0.1, 0.1]) is None and never.best_step == 10


def test_rule_minimizes_a_loss_and_respects_min_delta():
    rule = EarlyStopping(monitor="val_loss", patience=2)
    assert _feed(rule, CURVE) == 50  # loss = 1 - F1: the same best, from the other side
    assert rule.best_step == 30
    coarse = EarlyStopping(patience=2, min_delta=0.1)
    assert _feed(coarse, CURVE) == 40  # +0.06 after 0.55 is not enough
    assert coarse.best_step == 20
    with pytest.raises(KeyError, match="accuracy"):
        EarlyStopping(monitor="accuracy").update(1, {"macro_f1": 0.5})


def test_smoothing_keeps_the_centre_of_the_best_window_not_a_lone_peak():
    curve = [0.40, 0.80, 0.40, 0.62, 0.64, 0.63, 0.50]  # a lucky 0.80 between two 0.40s
    assert _kept(EarlyStopping(patience=0, smoothing=0), curve) == 20
    smooth = EarlyStopping(patience=0, smoothing=1)
    assert _kept(smooth, curve) == 50  # (0.62 + 0.64 + 0.63) / 3 beats (0.4 + 0.8 + 0.4) / 3
    assert smooth.best_step == 20  # patience still counts on single evaluations
    ends = EarlyStopping(patience=0, smoothing=1)
    assert _kept(ends, [0.5, 0.6, 0.7]) == 30  # the last one's window is (0.6 + 0.7) / 2
    loss = EarlyStopping(monitor="val_loss", patience=0, smoothing=1)
    assert _kept(loss, curve) == 50  # _feed gives val_loss = 1 - the curve
    assert "3 evaluations around it" in smooth.selection()


def test_runs_made_before_smoothing_keep_the_single_best_evaluation():
    cfg = RunConfig(train_csv="x.csv")
    assert cfg.training.smoothing == 1
    old = cfg.to_dict()
    del old["training"]["smoothing"]  # a config.json written before the setting existed
    assert RunConfig.from_dict(old).training.smoothing == 0
    assert RunConfig.from_dict(cfg.to_dict()).training.smoothing == 1


def _kept(rule: EarlyStopping, curve) -> int | None:
    _feed(rule, curve)
    return rule.kept_step


def test_replay_of_metrics_records_equals_the_live_rule():
    live = EarlyStopping(patience=4)
    records = []
    for i, value in enumerate(CURVE[:6]):
        live.update((i + 1) * 10, {"macro_f1": value})
        records.append({"type": "eval", "step": (i + 1) * 10, "macro_f1": value})
    # a resume re-evaluated step 50 (same value) and left a stray step record
    records += [{"type": "step", "step": 51}, {"type": "eval", "step": 50, "macro_f1": 0.61}]
    replayed = EarlyStopping.replay(records, up_to_step=60, patience=4)
    assert replayed.state_dict() == live.state_dict()
    smooth = EarlyStopping(patience=4, smoothing=1)
    for i, value in enumerate(CURVE[:6]):
        smooth.update((i + 1) * 10, {"macro_f1": value})
    again = EarlyStopping.replay(records, up_to_step=60, patience=4, smoothing=1)
    assert again.state_dict() == smooth.state_dict() and again.kept_step == smooth.kept_step
    assert EarlyStopping.replay(records, up_to_step=35, patience=4).best_step == 30


def test_loop_ends_on_the_epoch_budget_on_a_verdict_or_on_the_time_budget(loaded):
    enc, prefix, examples, _, _ = _setup(loaded)  # 48 rows, batch 8: 6 steps per epoch
    seen = []
    cfg = TrainConfig(epochs=2, batch_size=8, patience=0)
    result = train(loaded.model, prefix, examples, cfg, 0,
                   evaluate=lambda s: seen.append(s))
    assert (result.steps, result.reason) == (12, "budget of 2 epochs")
    assert seen == [3, 6, 9, 12]  # twice per epoch

    seen.clear()  # 40 rows: 5 steps per epoch, every 3 steps of each epoch and at its end
    train(loaded.model, prefix, examples[:40], cfg, 0, evaluate=seen.append)
    assert seen == [3, 5, 8, 10]  # not 5 and 6 side by side

    seen.clear()
    result = train(loaded.model, prefix, examples, cfg, 0,
                   evaluate=lambda s: seen.append(s) or ("enough" if s == 9 else None))
    assert (result.steps, result.reason, seen) == (9, "enough", [3, 6, 9])

    seen.clear()
    timed = TrainConfig(epochs=50, batch_size=8, max_minutes=1e-9)
    result = train(loaded.model, prefix, examples, timed, 0, evaluate=seen.append)
    assert result.steps == 1 and "time budget" in result.reason
    assert seen == [1]  # the step the budget ended on is evaluated, so it can be kept


def test_warmup_is_a_share_of_the_steps():
    from prefixlab.engine.train import learning_rate_at

    cfg = TrainConfig(learning_rate=1.0, warmup_share=0.1)
    assert cfg.warmup(200) == 20
    assert learning_rate_at(9, 200, cfg) == pytest.approx(0.5)
    assert learning_rate_at(20, 200, cfg) == pytest.approx(1.0)
    legacy = TrainConfig(learning_rate=1.0, warmup_steps=10)  # runs made before the share
    assert legacy.warmup(200) == 10
    with pytest.raises(ValueError, match="monitor"):
        TrainConfig(monitor="bleu")


def _run_config(csv, loaded, **training) -> RunConfig:
    return RunConfig(
        train_csv=str(csv), text_column="text", label_column="label", model=loaded.name,
        max_length=48, device="cpu", validation_share=0.3, prefix=PrefixConfig(prefix_length=4),
        training=TrainConfig(batch_size=4, learning_rate=3e-2, checkpoint_every=0,
                             eval_every=2, **training),
    )


@pytest.fixture
def csv_file(tmp_path):
    rows = ["text,label"] + [f"the movie was {'great' if i % 3 else 'bad'} number {i},"
                             f"{'positive' if i % 3 else 'negative'}" for i in range(40)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _records(folder: RunFolder) -> list[dict]:
    return folder.read_metrics()[0]


def test_run_keeps_the_best_step_and_resume_mid_patience_ends_equal(tmp_path, csv_file, loaded):
    cfg = _run_config(csv_file, loaded, epochs=12, patience=3, try_learning_rates=())
    prepared = prepare_data(cfg)
    whole = create_run(cfg, tmp_path / "whole", prepared, loaded)
    report = execute_run(whole, loaded, prepared=prepared)
    evals = [r for r in _records(whole) if r["type"] == "eval"]
    f1 = [r["macro_f1"] for r in evals]
    mean3 = [sum(f1[max(0, i - 1):i + 2]) / len(f1[max(0, i - 1):i + 2]) for i in range(len(f1))]
    best = evals[max(range(len(f1)), key=lambda i: (mean3[i], f1[i], -i))]  # first of equals
    assert report["kept_step"] == best["step"] < report["steps"]
    assert report["stop_reason"].startswith("no improvement of validation macro_f1 in 3")
    kept = load_file(str(whole.prefix_path))["key_values"]
    torch.testing.assert_close(kept, whole.load_snapshot(best["step"]))
    assert all("predicted" in r and sum(r["predicted"].values()) == len(prepared.validation)
               for r in evals)

    # Stop one step after an evaluation that did not improve: inside the patience window.
    waiting = [r["step"] for r in evals if r["best_step"] < r["step"]]
    assert waiting, "the curve never waited: make the task longer"
    stop_at = waiting[0] + 1
    part = create_run(cfg, tmp_path / "part", prepared, loaded)
    calls = []
    assert execute_run(part, loaded, prepared=prepared,
                       should_stop=lambda: calls.append(0) or len(calls) > stop_at) is None
    assert part.load_checkpoint().step == stop_at
    resumed = execute_run(part, loaded, prepared=prepared, resume=True)
    for key in ("kept_step", "steps", "stop_reason", "macro_f1", "loss"):
        assert resumed[key] == pytest.approx(report[key]), key
    torch.testing.assert_close(load_file(str(part.prefix_path))["key_values"], kept,
                               atol=1e-6, rtol=1e-5)
    saved = json.loads(part.report_path.read_text())
    assert saved["selection"] == ("the step whose 3 evaluations around it have the best mean "
                                  "validation macro_f1")


def test_planned_end_fits_the_steps_left_in_the_budget():
    from prefixlab.engine.schedule import planned_end

    assert planned_end(1000, 20, 20, 10.0, 50.0) == 120  # 2 steps/s, 50 s left
    assert planned_end(100, 20, 20, 10.0, 50.0) == 100  # never past the epochs' budget
    assert planned_end(1000, 20, 20, 10.0, -5.0) == 21  # out of time: one more step
    assert planned_end(1000, 20, 0, 0.0, 50.0) == 1000  # nothing timed yet


class _StepClock:
    """perf_counter for train(): one second passes per step (advanced by on_step)."""

    def __init__(self, now: float = 0.0):
        self.now = now
        self.perf_counter = lambda: self.now

    def tick(self, _info) -> None:
        self.now += 1.0


def _timed_run(loaded, monkeypatch, cfg, *, resume=None, stop_at=None, clock=None,
               evaluate=None, reserve_s=None, steps=None):
    """train() on a clock of one second per step; `steps` collects every StepInfo."""
    import prefixlab.engine.schedule as schedule_module

    enc, prefix, examples, _, _ = _setup(loaded)
    clock = clock or _StepClock()
    monkeypatch.setattr(schedule_module, "time", clock)  # the schedule keeps the time
    rates, saved = [], []

    def on_step(info):
        rates.append((info.step, info.learning_rate))
        if steps is not None:
            steps.append((clock.now, info))
        clock.tick(info)

    extra = {} if reserve_s is None else {"reserve_s": reserve_s}
    result = train(loaded.model, prefix, examples, cfg, 0, on_step=on_step, resume=resume,
                   evaluate=evaluate, on_checkpoint=saved.append, **extra,
                   should_stop=(lambda: bool(rates) and rates[-1][0] == stop_at))
    return result, rates, saved[-1], prefix


def test_a_time_budget_fits_warmup_and_decay_into_the_steps_it_allows(loaded, monkeypatch):
    # 48 rows, batch 8: 300 steps in 50 epochs, but the 1-minute budget fits ~60 of them
    cfg = TrainConfig(epochs=50, batch_size=8, max_minutes=1.0, learning_rate=1.0,
                      checkpoint_every=0)
    for evaluate in (None, lambda s: None):  # evaluations plan again, from the same speed
        result, rates, last, _ = _timed_run(loaded, monkeypatch, cfg, evaluate=evaluate)
        lrs = [lr for _, lr in rates]
        assert "time budget" in result.reason and 55 <= result.steps <= 65
        assert max(lrs) == pytest.approx(1.0, abs=0.05)  # warmed up fully...
        assert lrs[-1] < 0.1  # ...and decayed to near zero by the end of the budget
        assert last.planned_steps >= result.steps > 20

    unfitted = TrainConfig(**{**cfg.__dict__, "fit_schedule": False})
    result, rates, last, _ = _timed_run(loaded, monkeypatch, unfitted)
    assert "time budget" in result.reason and rates[-1][1] > 0.5  # cut mid-schedule
    assert last.planned_steps == 0


def test_the_time_left_never_exceeds_the_budget_left(loaded, monkeypatch):
    """The first estimate of a 10-minute run said "at most 3,076 s left": before the schedule
    is fitted to the budget its end is the epochs' budget, far past the time budget."""
    cfg = TrainConfig(epochs=50, batch_size=8, max_minutes=1.0, checkpoint_every=0)
    steps = []
    _timed_run(loaded, monkeypatch, cfg, steps=steps)
    assert steps[2][1].total_steps == 300  # not planned yet: the epochs' 300 steps
    for now, info in steps:
        assert info.eta_s <= 60 - now + 1e-9, (info.step, info.eta_s, now)
    assert max(info.eta_s for _, info in steps) > 50  # a real estimate, not 0


def test_a_reserve_for_the_final_report_ends_training_earlier(loaded, monkeypatch):
    """The budget covers the whole run: training leaves the final report what it reserves,
    the estimate counts it out, and the fitted schedule still decays to zero."""
    cfg = TrainConfig(epochs=50, batch_size=8, max_minutes=1.0, learning_rate=1.0,
                      checkpoint_every=0)
    steps = []
    result, rates, last, _ = _timed_run(loaded, monkeypatch, cfg, steps=steps,
                                        reserve_s=lambda: 15.0)
    assert "time budget" in result.reason and 40 <= result.steps <= 47
    assert 44 <= result.elapsed_s <= 47  # what the budget used: the report gets the rest
    assert rates[-1][1] < 0.1
    for now, info in steps:
        assert info.eta_s <= 45 - now + 1e-9, (info.step, info.eta_s, now)


def test_resume_keeps_the_planned_schedule(loaded, monkeypatch):
    cfg = TrainConfig(epochs=50, batch_size=8, max_minutes=1.0, checkpoint_every=0)
    whole, whole_rates, _, whole_prefix = _timed_run(loaded, monkeypatch, cfg)
    _, first, ckpt, _ = _timed_run(loaded, monkeypatch, cfg, stop_at=30)
    assert ckpt.step == 30 and ckpt.planned_steps > 30
    rest, later, _, prefix = _timed_run(loaded, monkeypatch, cfg, resume=ckpt,
                                        clock=_StepClock(now=500.0))
    assert first + later == whole_rates and rest.steps == whole.steps
    assert torch.allclose(prefix.folded(), whole_prefix.folded())


def test_a_run_given_more_time_fits_its_schedule_at_once_from_its_speed(loaded, monkeypatch):
    """Train longer: a run that ended on its time budget resumes with more minutes and its
    plan cleared (runs/extension.py); the engine plans the longer schedule at once."""
    from dataclasses import replace

    cfg = TrainConfig(epochs=50, batch_size=8, max_minutes=1.0, learning_rate=1.0,
                      checkpoint_every=0)
    first, _, ckpt, _ = _timed_run(loaded, monkeypatch, cfg)
    assert "time budget" in first.reason and ckpt.planned_steps >= ckpt.step
    longer = TrainConfig(**{**cfg.__dict__, "max_minutes": ckpt.elapsed_s / 60 + 1.0})
    steps = []
    rest, rates, _, _ = _timed_run(loaded, monkeypatch, longer, steps=steps,
                                   resume=replace(ckpt, planned_steps=0),
                                   clock=_StepClock(now=1000.0))
    assert rates[0][0] == ckpt.step + 1  # on from the step it ended on
    # a step a second, as before: about 60 more steps, planned from the first one on
    assert abs(steps[0][1].total_steps - 2 * ckpt.step) <= 3
    assert 0.3 < rates[0][1] < 0.7 and rates[-1][1] < 0.1  # resumed mid-decay, decayed again
    assert "time budget" in rest.reason and abs(rest.steps - 2 * ckpt.step) <= 3


def test_run_folders_from_before_fitted_schedules_resume_unfitted():
    old = RunConfig(train_csv="t.csv", training=TrainConfig(max_minutes=5)).to_dict()
    del old["training"]["fit_schedule"]
    assert RunConfig.from_dict(old).training.fit_schedule is False
    assert RunConfig(train_csv="t.csv").training.fit_schedule is True


def test_the_checkpoint_file_carries_the_plan(tmp_path):
    from prefixlab.engine.train import Checkpoint

    folder = RunFolder(tmp_path)
    state = {"weight": torch.ones(2, 3)}
    folder.save_checkpoint(Checkpoint(30, state, {}, 31.5, 61))
    back = folder.load_checkpoint()
    assert (back.step, back.elapsed_s, back.planned_steps) == (30, 31.5, 61)
    assert torch.equal(back.prefix_state["weight"], state["weight"])
