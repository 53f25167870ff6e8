"""The embedded default model's cache: converted from its GGUF once, however many loaders
find the cache empty at the same time (threads of the app, worker processes)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from prefixlab.engine import models
from prefixlab.engine.models import DEFAULT_MODEL, embedded_model_dir
from tests.conftest import save_tiny_model


@pytest.fixture
def converter(tmp_path, monkeypatch) -> Path:
    """An empty cache and a stand-in converter: it writes the tiny model slowly enough for
    every loader to find the cache empty, and logs each call to the returned file."""
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf", lambda: tmp_path / "model.gguf")
    calls = tmp_path / "conversions.log"

    def convert(gguf: Path, folder: Path) -> None:
        with open(calls, "a") as f:
            f.write(f"{gguf.name}\n")
        time.sleep(0.5)
        save_tiny_model(folder)

    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def _conversions(calls: Path) -> int:
    return len(calls.read_text().splitlines()) if calls.is_file() else 0


def test_the_app_warm_up_and_a_page_asking_for_the_shape_convert_once(converter, tmp_path):
    from prefixlab.workbench import Workbench

    workbench = Workbench(tmp_path / "data")
    warm = workbench.warm_up()  # loads the model in a thread, as the app does at start
    info = workbench.model_info()  # a page asking for the prefix size meanwhile
    warm.join(timeout=60)
    assert _conversions(converter) == 1
    assert workbench.model_status.endswith("ready on cpu (float32)"), workbench.model_status
    assert info.shape == workbench.model().shape


def _load_dir(out) -> None:
    out.put(str(embedded_model_dir()))


def test_processes_racing_on_an_empty_cache_convert_once(converter):
    ctx = multiprocessing.get_context("fork")  # the children keep the stand-in converter
    out = ctx.Queue()
    procs = [ctx.Process(target=_load_dir, args=(out,)) for _ in range(2)]
    for p in procs:
        p.start()
    threading.Thread(target=lambda: out.put(str(embedded_model_dir()))).start()
    folders = {out.get(timeout=60) for _ in range(3)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert _conversions(converter) == 1
    assert len(folders) == 1 and Path(folders.pop()).name == DEFAULT_MODEL


def test_the_app_loads_its_models_on_the_device_it_was_given(tmp_path, monkeypatch):
    """`python app.py --device cuda:1` keeps the app's model off the GPU runs train on."""
    from prefixlab.workbench import Workbench
    from prefixlab.workbench import models as room

    asked = []
    monkeypatch.setattr(room, "load_model", lambda name, device, **kw: asked.append(
        (name, device, kw["precision"])) or SimpleNamespace(device=device, precision="float32"))
    Workbench(tmp_path / "data", model="m", precision="float32", device="cuda:1").model()
    assert asked == [("m", "cuda:1", "float32")]
