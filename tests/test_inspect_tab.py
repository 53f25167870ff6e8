"""The Inspect tab's data path: a trained run's inspection, cached, on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefixlab.runs.experiment import execute_run
from prefixlab.workbench import Workbench
from tests.test_runs import _config


def test_inspection_of_a_trained_run(tmp_path, model_dir, monkeypatch):
    from prefixlab.figures import plots

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


def _trained_run(wb: Workbench, tmp_path: Path, model_dir: Path, labels: tuple[str, str],
                 name: str) -> str:
    csv = tmp_path / f"{name}.csv"
    csv.write_text("text,label\n" + "".join(
        f"the movie was {'great' if i % 2 else 'bad'} {i},{labels[i % 2]}\n" for i in range(24)))
    run_id = wb.store.create(_config(csv, model_dir, epochs=1), wb.model_info(str(model_dir)))
    execute_run(wb.folder(run_id), wb.model(str(model_dir)))
    wb.store.refresh()
    return run_id


def test_runs_with_other_labels_on_one_model_never_share_label_words(tmp_path, model_dir,
                                                                      monkeypatch):
    from prefixlab.runs.inspection import run_words, word_ids

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    first = wb.inspection(_trained_run(wb, tmp_path, model_dir, ("bad", "good"), "a"))
    second = wb.inspection(_trained_run(wb, tmp_path, model_dir, ("movie", "was"), "b"))
    words = [run_words(ins.run) for ins in (first, second)]
    assert set(words[0]["label words"]) != set(words[1]["label words"])
    assert first.bank.extra_ids != second.bank.extra_ids  # not one bank per model name
    for ins, own in zip((first, second), words, strict=True):
        # Each bank holds its own run's words, and only those, beyond the frequent tokens.
        assert ins.bank.extra_ids == word_ids(own)
        assert set(own["label words"]) <= set(ins.bank.token_ids)
    only_first = set(words[0]["label words"]) - set(word_ids(words[1]))
    assert only_first and not only_first & set(second.bank.extra_ids)
    # One file of frequent tokens per model (the words beyond it go to a small file of their
    # own), and the groups the maps mark are the run's own.
    assert first.bank.path == second.bank.path
    assert (first.words, second.words) == tuple(words)


def test_knockout_of_a_trained_run_is_cached_and_written_by_inspect(tmp_path, model_dir,
                                                                    monkeypatch):
    import json

    from prefixlab.runs import inspection

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    run_id = _trained_run(wb, tmp_path, model_dir, ("negative", "positive"), "k")
    run = wb.open(run_id)
    steps = []
    first = inspection.run_knockout(run, 4, progress=lambda f, m: steps.append(m))
    assert steps and first.knockout.rows == 4
    L, P = run.kv.shape[0], run.kv.shape[3]
    assert first.knockout.slot_log_prob.shape == (P,)
    assert first.push.push.shape == (L, 2) and first.attention.mass.shape[1] == L
    cached = json.loads((run.folder.path / inspection.KNOCKOUT_FILE).read_text())
    assert cached["rows"] == 4 and len(cached["layers"]["log_prob"]) == L
    steps.clear()
    again = inspection.run_knockout(run, 4, progress=lambda f, m: steps.append(m))
    assert not steps  # read from the run folder, not measured again
    assert again.knockout.slot_log_prob == pytest.approx(first.knockout.slot_log_prob, abs=1e-4)
    other = "float32" if first.knockout.precision == "bfloat16" else "bfloat16"
    inspection.run_knockout(run, 4, precision=other, progress=lambda f, m: steps.append(m))
    assert steps  # measured in another precision: not the cached figures
    assert json.loads((run.folder.path / inspection.KNOCKOUT_FILE).read_text())[
        "precision"] == other
    out = inspection.inspect_run(run.folder.path, tmp_path / "out", run.loaded, top_k=2,
                                 knockout_rows=4)
    written = json.loads((out / "knockout.json").read_text())
    assert written["format"] == "prefixlab-knockout/1" and "label_push" in written
    page = (out / "inspection.html").read_text()
    assert page.index("Summary") < page.index("Slots by effect") < page.index("Method and")


def test_a_reopened_run_reads_its_nearest_tokens_from_the_run_folder(tmp_path, model_dir,
                                                                     monkeypatch):
    import numpy as np

    from prefixlab.interpret import nearest
    from prefixlab.runs import inspection

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    run_id = _trained_run(wb, tmp_path, model_dir, ("negative", "positive"), "n")
    first = wb.inspection(run_id)
    assert (first.run.folder.path / inspection.NEAREST_CACHE).is_file()

    def never(*args, **kwargs):
        raise AssertionError("ranked again instead of read from the run folder")

    monkeypatch.setattr(nearest, "nearest_tokens", never)
    monkeypatch.setattr(inspection, "nearest_tokens", never)
    again = Workbench(tmp_path / "data", model=str(model_dir)).inspection(run_id)
    np.testing.assert_array_equal(again.nearest.token_ids, first.nearest.token_ids)
    np.testing.assert_allclose(again.nearest.scores, first.nearest.scores)
    assert again.nearest.labels == first.nearest.labels
