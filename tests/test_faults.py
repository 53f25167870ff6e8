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
