"""Train longer: a run that ended on its budget resumes from its checkpoint (the prefix and
AdamW's moments) with more epochs or minutes, the stopping rule going on, and its report is
written anew. From the CLI (`resume --more-epochs/--more-minutes`) and from the app's
workbench and Runs tab, whose worker is a real process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import prefixlab.engine.train as train_module
from prefixlab.cli.main import main
from prefixlab.runs.extension import longer_settings
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.locks import RunBusy
from prefixlab.ui import runs_tab
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.test_app import wait_for_run, write_reviews_csv


def _steps(folder: RunFolder) -> list[int]:
    return [r["step"] for r in folder.read_metrics()[0] if r["type"] == "step"]


def _train(csv: Path, model_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", str(csv), "--text-column", "text", "--label-column", "label",
                 "--output", str(out), "--model", str(model_dir), "--batch-size", "4",
                 "--prefix-length", "4", "--max-length", "48", "--checkpoint-every", "0",
                 *extra])


def test_the_settings_of_more_epochs_and_more_minutes():
    training = {"epochs": 2, "batch_size": 8, "max_steps": None, "max_minutes": 1.5}
    # 80 rows: 10 steps an epoch; the run ended on its time at step 15, after 90 s
    epochs = longer_settings(training, 80, 15, 90.0, 0, 2)
    assert (epochs["max_steps"], epochs["epochs"], epochs["max_minutes"]) == (35, 4, 0.0)
    minutes = longer_settings(training, 80, 15, 90.0, 3, 0)
    # 3 minutes more after 1.5 trained; 10 steps a minute: room for twice the 30 that fit
    assert (minutes["max_steps"], minutes["epochs"], minutes["max_minutes"]) == (None, 9, 4.5)
    both = longer_settings(training, 80, 15, 90.0, 3, 1)
    assert (both["max_steps"], both["max_minutes"]) == (25, 4.5)
    from prefixlab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        longer_settings(training, 80, 15, 90.0, -1, 0.5)
    assert len(e.value.problems) == 2
    with pytest.raises(ConfigError, match="give more minutes or more epochs"):
        longer_settings(training, 80, 15, 90.0, 0, 0)


def test_cli_resume_trains_a_finished_run_longer_from_its_checkpoint(
        tmp_path, model_dir, monkeypatch, capsys):
    csv = write_reviews_csv(tmp_path / "reviews.csv", rows=40)  # 32 train rows: 8 steps/epoch
    run = tmp_path / "run"
    assert _train(csv, model_dir, run, "--epochs", "2", "--patience", "0",
                  "--no-keep-best") == 0
    folder = RunFolder(run)
    before = folder.read_report()
    assert (before["steps"], before["kept_step"], before["stop_reason"]) == (
        16, 16, "budget of 2 epochs")
    # kept its last step (--no-keep-best): the CLI says it may train longer
    assert "--more-minutes M` (or --more-epochs E) trains it longer" in capsys.readouterr().err
    saved = folder.load_checkpoint()
    loaded_states = []
    real_load = train_module._load_optimizer
    monkeypatch.setattr(train_module, "_load_optimizer", lambda opt, flat: (
        loaded_states.append({k: v.clone() for k, v in flat.items()}), real_load(opt, flat)))
    capsys.readouterr()

    assert main(["resume", str(run), "--more-epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "training run longer, from step 16: 1 more epoch" in err
    after = folder.read_report()
    assert (after["steps"], after["stop_reason"]) == (
        24, "budget of 24 steps (trained longer from step 16: 1 more epoch)")
    assert _steps(folder) == list(range(1, 25))  # on from step 17, none repeated
    # AdamW's moments came from the checkpoint the first run ended with
    assert len(loaded_states) == 1 and loaded_states[0].keys() == saved.optimizer_state.keys()
    for key, value in saved.optimizer_state.items():
        torch.testing.assert_close(loaded_states[0][key], value)
    config = json.loads((run / "config.json").read_text())
    assert config["extensions"][0]["from_step"] == 16
    assert config["run"]["training"]["max_steps"] == 24

    # More minutes: the continuation keeps to them, its final report included
    began = time.monotonic()
    assert main(["resume", str(run), "--more-minutes", "0.05"]) == 0
    took = time.monotonic() - began
    report = folder.read_report()
    assert report["stop_reason"].startswith("time budget of") and report["steps"] > 24
    assert report["stop_reason"].endswith("(trained longer from step 24: 0.05 more minutes)")
    trained = folder.load_checkpoint().elapsed_s - saved.elapsed_s
    assert trained <= 3.0 + 0.5, trained
    assert took < 3.0 + 10, took  # the model's load and the file writes besides
    assert "training run longer, from step 24: 0.05 more minutes" in capsys.readouterr().err


def test_cli_resume_refuses_more_for_runs_that_did_not_end_on_their_budget(
        tmp_path, model_dir, capsys):
    csv = write_reviews_csv(tmp_path / "reviews.csv", rows=40)
    run = tmp_path / "run"
    assert _train(csv, model_dir, run, "--epochs", "30", "--patience", "1",
                  "--eval-every", "1") == 0
    assert RunFolder(run).read_report()["stop_reason"].startswith("no improvement")
    capsys.readouterr()
    assert main(["resume", str(run), "--more-epochs", "1"]) == 2
    assert "did not end on its budget" in capsys.readouterr().err
    assert main(["resume", str(run), "--more-epochs", "-1"]) == 2
    assert "more epochs must be a whole number, 0 or more, got -1" in capsys.readouterr().err


@pytest.mark.slow  # real worker processes
def test_the_runs_tab_offers_train_longer_and_the_worker_resumes(tmp_path, model_dir):
    workbench = Workbench(tmp_path / "data", model=str(model_dir))
    csv = write_reviews_csv(tmp_path / "reviews.csv", rows=200)
    settings = {"epochs": 200, "batch_size": 2, "max_train_examples": 0, "patience": 0,
                "max_minutes": 0.1}  # 6 s, far fewer than the epochs' steps
    cfg = run_config(str(csv), "text", "label", settings, model=workbench.default_model)
    rid = workbench.start_run(cfg, name="budgeted", data_name="reviews.csv")
    row = wait_for_run(workbench, rid, lambda r: r.state == "completed")
    folder = workbench.folder(rid)
    first = folder.read_report()
    assert first["stop_reason"] == "time budget of 0.1 min"
    ended = folder.load_checkpoint()

    shown, note, minutes, epochs = runs_tab.longer_offer(workbench, rid)
    assert shown["visible"] and (minutes, epochs) == (0.1, 0)
    assert f"Training ended on its time budget of 0.1 min at step {row.step}" in note
    message, hidden = runs_tab.train_longer(workbench, rid, minutes, epochs)
    assert f"Training **budgeted** longer, from step {row.step}: 0.1 more minutes" in message
    assert hidden["visible"] is False
    with pytest.raises(RunBusy):  # a second click while its worker lives
        runs_tab.train_longer(workbench, rid, minutes, epochs)
    assert not runs_tab.longer_offer(workbench, rid)[0]["visible"]  # not while it trains

    wait_for_run(workbench, rid, lambda r: r.state == "completed" and r.step > row.step)
    report = folder.read_report()
    assert report["steps"] > row.step and report["stop_reason"].startswith("time budget of")
    steps = _steps(folder)
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == report["steps"]
    assert folder.load_checkpoint().elapsed_s - ended.elapsed_s <= 6.0 + 0.5
    records = folder.read_metrics()[0]
    resumed = [r for r in records if r.get("message") == "resumed"]
    assert [r["step"] for r in resumed] == [row.step]
    assert runs_tab.longer_offer(workbench, rid)[0]["visible"]  # and again, if it helps
