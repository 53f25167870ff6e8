"""The run registry and real worker processes: queueing, cancel, kill, resume, restart."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefixlab.engine.models import prepare_model
from prefixlab.engine.prefix import PrefixConfig
from prefixlab.engine.train import TrainConfig
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunError
from prefixlab.runs.locks import RunBusy
from prefixlab.runs.registry import RunStore, slugify

pytestmark = pytest.mark.slow  # real subprocess workers


TINY_KIND = "gpt2"  # model_dir (conftest) saves a tiny GPT-2


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return prepare_model(AutoModelForCausalLM.from_pretrained(model_dir),
                         AutoTokenizer.from_pretrained(model_dir), str(model_dir),
                         torch.device("cpu"))


@pytest.fixture
def csv_file(tmp_path) -> Path:
    rows = ["text,label"] + [f"the movie was {'great' if i % 2 else 'bad'} {i},"
                             f"{'positive' if i % 2 else 'negative'}" for i in range(40)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(csv_file, model_dir, epochs=1, batch_size=4) -> RunConfig:
    return RunConfig(
        train_csv=str(csv_file), text_column="text", label_column="label", model=str(model_dir),
        max_length=48, device="cpu", prefix=PrefixConfig(prefix_length=4),
        training=TrainConfig(epochs=epochs, batch_size=batch_size, checkpoint_every=10,
                             learning_rate=1e-2, patience=0),  # runs last their whole budget
    )


def _wait(store: RunStore, run_id: str, states, timeout=120.0, step=0):
    end = time.time() + timeout
    while time.time() < end:
        store.refresh()
        row = store.get(run_id)
        if row.state in states and row.step >= step:
            return row
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} stayed {store.get(run_id).state} (step {row.step})")


def test_worker_trains_a_run_to_completion(tmp_path, csv_file, model_dir, loaded):
    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, model_dir), loaded, name="../../etc/passwd")
    assert run_id.endswith("etc-passwd") and (store.runs_dir / run_id).is_dir()
    store.start(run_id)
    row = _wait(store, run_id, {"completed", "failed"})
    assert row.state == "completed", row.error
    assert row.step == row.total_steps == 8 and row.macro_f1 is not None
    assert (store.folder(run_id).path / "data" / "train.csv").is_file()


def test_bad_data_creates_no_run(tmp_path, model_dir, loaded):
    from prefixlab.data.reading import DataError

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nonly,one\n")
    store = RunStore(tmp_path / "data")
    with pytest.raises(DataError):
        store.create(_config(bad, model_dir), loaded)
    assert store.list() == [] and list(store.runs_dir.iterdir()) == []


def test_runs_queue_one_per_device_and_cancel_keeps_a_checkpoint(
    tmp_path, csv_file, model_dir, loaded
):
    store = RunStore(tmp_path / "data")
    first = store.create(_config(csv_file, model_dir, epochs=400, batch_size=1), loaded)
    second = store.create(_config(csv_file, model_dir), loaded, name="second")
    store.start(first)
    _wait(store, first, {"running"}, step=15)
    store.start(second)
    time.sleep(3)
    store.refresh()
    assert store.get(second).state == "queued"  # waits for the device
    store.cancel(first)
    row = _wait(store, first, {"cancelled"})
    assert 0 < row.step < row.total_steps
    assert (store.folder(first).checkpoint_path).is_file()
    assert _wait(store, second, {"completed"}).state == "completed"


def test_a_queued_run_says_it_waits_and_is_cancelled_at_once(tmp_path, csv_file, model_dir,
                                                              loaded):
    """Cancelling a queued run used to wait for the run ahead of it to finish."""
    import fcntl

    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, model_dir), loaded, name="queued")
    folder = store.folder(run_id)
    with open(store.data_dir / "locks" / "cpu.lock", "w") as device:
        fcntl.flock(device, fcntl.LOCK_EX)  # another run holds the device
        store.start(run_id)
        assert folder.status()["phase"] == "starting the worker"
        end = time.time() + 60
        while folder.status().get("phase", "").startswith("starting") and time.time() < end:
            time.sleep(0.1)
        assert folder.status()["phase"].startswith("waiting for the device")
        asked = time.time()
        store.cancel(run_id)
        row = _wait(store, run_id, {"cancelled"}, timeout=10)
        assert time.time() - asked < 5 and row.state == "cancelled"
    assert not folder.prefix_path.exists()


def test_a_run_reports_its_phases(tmp_path, csv_file, model_dir, loaded):
    """starting the worker -> loading the model -> training -> evaluating -> completed."""
    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, model_dir, epochs=3), loaded)
    folder = store.folder(run_id)
    store.start(run_id)
    seen = []
    end = time.time() + 120
    while time.time() < end:
        status = folder.status()
        phase = status.get("phase") if status["state"] in ("queued", "running") else None
        if (phase or status["state"]) not in seen:
            seen.append(phase or status["state"])
        if status["state"] in ("completed", "failed"):
            break
        time.sleep(0.02)
    assert seen[0] == "starting the worker" and seen[-1] == "completed", seen
    order = ["starting the worker", "loading the model", "training", "evaluating", "completed"]
    assert [p for p in order if p in seen] == [p for p in seen if p in order]
    assert "training" in seen


def test_sigkill_mid_run_is_interrupted_and_resume_matches_uninterrupted(
    tmp_path, csv_file, model_dir, loaded
):
    store = RunStore(tmp_path / "data")
    cfg = _config(csv_file, model_dir, epochs=60, batch_size=2)
    killed = store.create(cfg, loaded, name="killed")
    whole = store.create(_config(csv_file, model_dir, epochs=60, batch_size=2), loaded,
                         name="whole")
    store.start(killed)
    _wait(store, killed, {"running"}, step=25)
    os.kill(store.get(killed).pid, signal.SIGKILL)
    row = _wait(store, killed, {"interrupted"})
    assert "ended without finishing" in row.error
    status = json.loads((store.folder(killed).status_path).read_text())
    assert status["state"] == "interrupted"
    store.start(killed, resume=True)
    with pytest.raises(RunBusy, match="already queued or running"):  # a double click
        store.start(killed, resume=True)
    store.start(whole)
    assert _wait(store, killed, {"completed"}, timeout=300).state == "completed"
    assert _wait(store, whole, {"completed"}, timeout=300).state == "completed"
    a = load_file(store.folder(killed).prefix_path)["key_values"]
    b = load_file(store.folder(whole).prefix_path)["key_values"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    events = [json.loads(x) for x in store.folder(killed).metrics_path.read_text().splitlines()]
    assert any(e.get("message") == "resumed" for e in events)


def test_restart_lists_every_run_and_adopts_folders(tmp_path, csv_file, model_dir, loaded):
    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, model_dir), loaded)
    (tmp_path / "data" / "registry.sqlite3").unlink()  # a lost registry
    for suffix in ("-wal", "-shm"):
        Path(str(tmp_path / "data" / "registry.sqlite3") + suffix).unlink(missing_ok=True)
    again = RunStore(tmp_path / "data")
    assert [r.id for r in again.refresh()] == [run_id]


def test_a_folder_written_by_the_cli_is_listed_and_a_deleted_one_is_not(
        tmp_path, csv_file, model_dir, loaded):
    import shutil

    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, model_dir), loaded)
    # As `train --output D/runs/sentiment` leaves it: a run folder named by the user.
    shutil.copytree(store.folder(run_id).path, store.runs_dir / "sentiment")
    assert sorted(r.id for r in store.refresh()) == sorted([run_id, "sentiment"])
    assert store.get("sentiment").state == "created"
    shutil.rmtree(store.folder(run_id).path)  # deleted on disk, outside the app
    assert [r.id for r in store.refresh()] == ["sentiment"]
    with pytest.raises(RunError, match="no run"):
        store.get(run_id)


def test_ids_are_checked_and_names_sanitized(tmp_path):
    store = RunStore(tmp_path / "data")
    for bad in ("../x", "/etc", "20260101-000000-a/../../b", "", "..", ".hidden", "a/b",
                "a\\b", "x" * 81):
        with pytest.raises(RunError):
            store.folder(bad)
    assert slugify("Ünïcode ../../ name") == "unicode-name"
    assert slugify("\u202e\u0000") == "run"
