"""The Inspect tab's data path: a trained run's inspection, cached, on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefixlab.experiment import execute_run
from prefixlab.workbench import Workbench
from tests.conftest import make_tokenizer, tiny_model
from tests.test_runs import _config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_inspection_of_a_trained_run(tmp_path, model_dir, monkeypatch):
    from prefixlab import plots

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(
        f"the movie was {'great' if i % 2 else 'bad'} {i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(24)))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    run_id = wb.store.create(_config(csv, model_dir, epochs=2), wb.model_info(str(model_dir)))
    execute_run(wb.folder(run_id), wb.model(str(model_dir)))
    wb.store.refresh()

    ins = wb.inspection(run_id)
    L, P = ins.run.kv.shape[0], ins.run.kv.shape[3]
    assert ins.nearest.token_ids.shape[:3] == (L, 2, P)
    assert ins.movement is not None and ins.movement.steps[0] == 0
    assert not torch.equal(ins.initial_kv, ins.run.kv)  # training moved it
    assert wb.inspection(run_id) is ins  # cached until the prefix file changes
    assert plots.nearest_tokens_figure(ins.nearest, "key").data
    assert plots.distance_figure(ins.movement).data
