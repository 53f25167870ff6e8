"""Choosing the learning rate on the validation rows (runs/trials.py), on a tiny model: the
run trained at two rates is the better of the two runs trained at each alone, its folder a
plain run at the chosen rate, and a run stopped between trials resumes without retraining
the finished one."""

from __future__ import annotations

import json

import pytest
import torch

from prefixlab.engine.prefix import load_prefix
from prefixlab.engine.train import TrainConfig
from prefixlab.errors import ConfigError
from prefixlab.figures import charts
from prefixlab.runs.trials import best_trial, choice_sentence, trial_folder

from .test_train import toy_task

SLOW, FAST = 1e-4, 5e-2  # the slow rate barely moves the prefix in four epochs


@pytest.fixture
def one_thread():
    """One CPU thread: runs then sum in one order and compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(loaded, tmp_path, name: str, should_stop=None, resume_from=None, **training):
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import create_run, execute_run, prepare_data
    from prefixlab.runs.folder import RunFolder

    texts, labels = toy_task(80)
    csv = tmp_path / "toy.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in
                                              zip(texts, labels, strict=True)))
    cfg = RunConfig(train_csv=str(csv), model=loaded.name, max_length=32,
                    prefix={"prefix_length": 4},
                    training={"epochs": 4, "batch_size": 8, "patience": 0, "smoothing": 0,
                              **training})
    prepared = prepare_data(cfg)
    folder = (RunFolder(resume_from) if resume_from
              else create_run(cfg, tmp_path / name, prepared, loaded))
    report = execute_run(folder, loaded, prepared=prepared, should_stop=should_stop,
                         resume=resume_from is not None)
    return report, folder


def test_two_rates_keep_the_better_run_on_validation(loaded, tmp_path, one_thread):
    alone = {rate: _run(loaded, tmp_path, f"alone-{rate:g}", learning_rate=rate,
                        try_learning_rates=())
             for rate in (SLOW, FAST)}
    scores = {rate: report["macro_f1"] for rate, (report, _) in alone.items()}
    assert scores[FAST] != scores[SLOW]  # else the choice below shows nothing
    report, folder = _run(loaded, tmp_path, "chosen", learning_rate=SLOW,
                          try_learning_rates=(FAST,), max_minutes=60.0)
    best = max(scores, key=lambda r: (scores[r], r == SLOW))  # ties: the first rate tried
    assert report["learning_rate"] == best
    assert [(t["learning_rate"], t["macro_f1"]) for t in report["learning_rate_trials"]] == [
        (SLOW, scores[SLOW]), (FAST, scores[FAST])]
    won_report, won = alone[best]
    assert report["macro_f1"] == won_report["macro_f1"]
    assert torch.equal(load_prefix(folder.prefix_path).kv, load_prefix(won.prefix_path).kv)
    assert [s for s, _ in folder.snapshots()] == [s for s, _ in won.snapshots()]

    # the folder is now a plain run at the chosen rate: resume and "train longer" read it
    info = json.loads(folder.config_path.read_text())
    assert info["run"]["training"]["learning_rate"] == best
    assert info["run"]["training"]["try_learning_rates"] == []
    assert info["learning_rate_choice"]["tried"] == [SLOW, FAST]
    assert folder.status()["state"] == "completed" and folder.read_report() == report
    # each trial trained in its own folder with its share of the time budget, which the
    # run's config now says too, as "train longer" continues from it
    for rate in (SLOW, FAST):
        sub = trial_folder(folder, rate)
        assert sub.run_config().training.learning_rate == rate
        assert sub.run_config().training.max_minutes == 30.0
        assert sub.status()["state"] == "completed"
    assert info["run"]["training"]["max_minutes"] == 30.0

    # the log: every trial's records wrapped, then the winner's own
    records, _ = folder.read_metrics()
    trials = charts.trials_of(records)
    assert list(trials) == [SLOW, FAST]
    own_steps = [r for r in records if r.get("type") == "step"]
    assert own_steps == [r for r in trials[best] if r.get("type") == "step"]
    assert [t.name for t in charts.loss_curves(records).data][:2] == [
        f"train loss, lr {SLOW:g}", f"validation loss, lr {SLOW:g}"]
    assert choice_sentence(report).startswith(f"Learning rate {best:g}, chosen on the "
                                              f"validation rows: macro-F1")


def test_a_run_stopped_in_its_second_trial_resumes_without_retraining_the_first(
        loaded, tmp_path):
    steps = []

    def stop_in_second_trial() -> bool:
        steps.append(1)
        return len(steps) > 40  # 32 steps a trial: 64 rows trained, batch 8, 4 epochs

    stopped, folder = _run(loaded, tmp_path, "stopped", should_stop=stop_in_second_trial,
                           learning_rate=SLOW, try_learning_rates=(FAST,))
    assert stopped is None
    first = trial_folder(folder, SLOW)
    assert first.status()["state"] == "completed"
    first_log = first.metrics_path.read_bytes()
    assert trial_folder(folder, FAST).load_checkpoint() is not None
    report, _ = _run(loaded, tmp_path, "stopped", resume_from=folder.path,
                     learning_rate=SLOW, try_learning_rates=(FAST,))
    assert report is not None and first.metrics_path.read_bytes() == first_log
    assert [t["steps"] for t in report["learning_rate_trials"]] == [32, 32]


def test_the_rates_are_checked_and_read_from_text():
    assert TrainConfig(try_learning_rates="0.01, 0.02").try_learning_rates == (0.01, 0.02)
    assert TrainConfig(try_learning_rates=0.01).learning_rates() == [0.005, 0.01]
    assert TrainConfig(learning_rate=0.01, try_learning_rates=[0.01]).learning_rates() == [0.01]
    for bad in ("fast", [0.0], "0.01,nan", [20]):
        with pytest.raises(ConfigError, match="try_learning_rates"):
            TrainConfig(try_learning_rates=bad)


def test_validation_loss_chooses_the_lower_and_ties_keep_the_first():
    trials = [{"learning_rate": 1.0, "score": 0.5}, {"learning_rate": 2.0, "score": 0.4},
              {"learning_rate": 3.0, "score": 0.5}]
    assert best_trial(trials, "macro_f1")["learning_rate"] == 1.0
    assert best_trial(trials, "val_loss")["learning_rate"] == 2.0


def test_the_progress_line_follows_the_trial_in_course():
    from prefixlab.ui.run_view import progress_html

    def step(n: int) -> dict:
        return {"type": "step", "step": n, "total_steps": 10, "epoch": n / 5, "loss": 1.0,
                "learning_rate": 0.01, "examples_per_s": 3.0, "tokens_per_s": 9.0,
                "elapsed_s": n, "eta_s": 10 - n}

    def trial(rate: float, index: int, record: dict) -> dict:
        return {"type": "trial", "learning_rate": rate, "index": index, "count": 2,
                "record": record}

    records = [trial(0.005, 0, step(n)) for n in (1, 2, 10)]
    records += [trial(0.01, 1, step(n)) for n in (1, 2, 3)]
    line = progress_html(records, "running", "training at learning rate 0.01 (2 of 2)")
    assert "step 3/10" in line and "learning rate 0.01 (2 of 2)" in line
    assert "at most 7 s of training left" in line
    # once chosen, the run's own records: the winner's last step, no trial named
    done = progress_html([*records, step(10)], "completed")
    assert "step 10/10" in done and "learning rate" not in done


def test_a_classification_run_tries_0_01_unless_told_and_others_train_once():
    from prefixlab.runs.config import RunConfig

    assert RunConfig(train_csv="x.csv").training.learning_rates() == [0.005, 0.01]
    told = RunConfig(train_csv="x.csv", training={"try_learning_rates": ""})
    assert told.training.learning_rates() == [0.005]
    generation = RunConfig(train_csv="x.csv", target_column="target")
    assert generation.training.learning_rates() == [0.005]
    # a run folder written before learning rates were tried resumes at its one rate
    old = RunConfig(train_csv="x.csv").to_dict()
    del old["training"]["try_learning_rates"]
    assert RunConfig.from_dict(old).training.learning_rates() == [0.005]
    # what is stored is what ran: the choice is written out, not left to a default
    assert RunConfig.from_dict(RunConfig(train_csv="x.csv").to_dict()
                               ).training.try_learning_rates == (0.01,)


def test_a_run_cancelled_before_its_choice_says_to_resume_rather_than_keep(loaded, tmp_path):
    from prefixlab.runs.folder import RunError

    stopped, folder = _run(loaded, tmp_path, "early", should_stop=lambda: True,
                           learning_rate=SLOW, try_learning_rates=(FAST,))
    assert stopped is None
    folder.set_status("cancelled")
    with pytest.raises(RunError, match="before it chose one: resume it"):
        folder.keep_prefix()
