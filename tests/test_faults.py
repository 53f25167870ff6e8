"""Faults a user's machine produces: a model that will not load, an unwritable data folder,
torn files we wrote ourselves, an app that dies while its run trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from prefixlab.engine.models import describe_model, prepare_model
from prefixlab.engine.prefix import PrefixFileError, load_prefix, save_prefix
from prefixlab.runs.folder import RunError, RunFolder
from prefixlab.runs.registry import RunStore
from prefixlab.runs.trials import trial_folder
from tests.test_runs import _config, _wait

TINY_KIND = "gpt2"  # model_dir (conftest) saves a tiny GPT-2


@pytest.fixture
def csv_file(tmp_path) -> Path:
    rows = ["text,label"] + [f"word {i},{'a' if i % 2 else 'b'}" for i in range(20)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_a_model_that_fails_to_load_fails_the_run_with_a_reason(tmp_path, csv_file, model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # torn weights, config intact
    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, broken), describe_model(str(broken)))
    store.start(run_id)
    row = _wait(store, run_id, {"failed", "interrupted"})
    assert row.state == "failed" and "could not load model" in row.error


def test_an_unwritable_data_dir_is_a_readable_error(tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/prefixlab-cannot-exist")  # root may write anywhere else
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
        target = target / "data"
    with pytest.raises(RunError, match="not writable"):
        RunStore(target)


def test_torn_or_foreign_files_are_refused_not_half_loaded(tmp_path):
    path = tmp_path / "prefix.safetensors"
    save_prefix(path, torch.randn(2, 2, 2, 3, 4), "m")
    data = path.read_bytes()
    for name, payload in {
        "empty": b"", "torn": data[: len(data) - 10], "text": b"hello world",
        "pickle": b"\x80\x04\x95" + b"\x00" * 40,
    }.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(payload)
        with pytest.raises(PrefixFileError):
            load_prefix(bad)
    nan = tmp_path / "nan.safetensors"
    save_prefix(nan, torch.full((2, 2, 2, 3, 4), float("nan")), "m")
    with pytest.raises(PrefixFileError, match="NaN"):
        load_prefix(nan)


def test_a_torn_config_or_status_is_reported_not_crashed_on(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.config_path.write_text('{"run": {"train_csv": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        folder.read_config()
    folder.status_path.write_text("{")
    assert folder.status()["state"] == "interrupted"
    folder.metrics_path.write_text('{"type": "step", "step": 1}\n{"type": "st')
    records, offset = folder.read_metrics()
    assert records == [{"type": "step", "step": 1}]
    assert offset == len('{"type": "step", "step": 1}\n')


def test_atomic_writes_leave_no_torn_file(tmp_path, monkeypatch):
    from prefixlab import files

    target = tmp_path / "config.json"
    files.atomic_write_json(target, {"a": 1})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.slow
def test_a_run_outlives_the_app_and_a_restarted_app_lists_it(tmp_path, csv_file, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = prepare_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           AutoTokenizer.from_pretrained(model_dir), str(model_dir),
                           torch.device("cpu"))
    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, model_dir, epochs=100, batch_size=1), loaded)
    store.start(run_id)
    _wait(store, run_id, {"running"}, step=5)
    del store  # the app is gone; its worker is in a session of its own and trains on
    again = RunStore(tmp_path / "data")
    assert again.refresh()[0].state in ("running", "completed")
    assert _wait(again, run_id, {"completed"}, timeout=300).state == "completed"


def _run_out_of_memory_at(monkeypatch, step: int, error: type[BaseException]) -> None:
    """Training step `step` raises `error` in its forward/backward, as a GPU that ran out of
    memory raises torch.OutOfMemoryError (MemoryError on the CPU)."""
    from prefixlab.engine import train as T

    real, calls = T._backward, []

    def backward(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "_backward", backward)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_says_what_to_lower_and_the_run_resumes(tmp_path, csv_file, model_dir,
                                                              monkeypatch, capsys, error):
    """Step 3 runs out of memory: the CLI says what to lower, the run is failed at step 2 with
    that advice and a checkpoint of step 2, and `resume` ends where an uninterrupted run
    ends."""
    from safetensors.torch import load_file

    from prefixlab.cli.main import main

    args = [str(csv_file), "--model", str(model_dir), "--device", "cpu", "--seed", "1",
            "--prefix-length", "4", "--batch-size", "4", "--epochs", "1", "--max-length", "48"]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _run_out_of_memory_at(m, 3, error)
        assert main(["train", *args, "--output", str(run)]) == 2
    said = capsys.readouterr().err
    assert "out of memory on cpu in training step 3" in said
    for what in ("lower the batch size (now 4)", "max length", "dtype", "resumes"):
        assert what in said, what
    folder = RunFolder(run)
    status = folder.status()
    assert status["state"] == "failed" and "lower the batch size" in status["error"]
    # a classification run tries two learning rates; the first, 0.005, ran out of memory
    assert folder.load_checkpoint() is None
    assert trial_folder(folder, 0.005).load_checkpoint().step == 2
    assert main(["resume", str(run)]) == 0
    assert folder.status()["state"] == "completed"
    assert main(["train", *args, "--output", str(tmp_path / "whole")]) == 0
    a = load_file(folder.params_path)
    b = load_file(RunFolder(tmp_path / "whole").params_path)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_worker_out_of_memory_fails_the_run_with_advice_at_its_last_step(
        tmp_path, csv_file, model_dir, monkeypatch):
    from prefixlab.runs.worker import run_worker

    store = RunStore(tmp_path / "data")
    run_id = store.create(_config(csv_file, model_dir), describe_model(str(model_dir)))
    _run_out_of_memory_at(monkeypatch, 2, torch.OutOfMemoryError)
    assert run_worker(store.folder(run_id).path) == 1  # the worker's body, in this process
    status = store.folder(run_id).status()
    assert status["state"] == "failed" and status["step"] == 1
    assert status["error"].startswith("out of memory on cpu in training step 2")
    assert store.folder(run_id).load_checkpoint().step == 1
