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


def test_the_knockouts_intact_figure_is_the_reports_on_the_same_rows(tmp_path, model_dir,
                                                                      monkeypatch):
    import json

    from prefixlab.interpret.summary import Reference
    from prefixlab.runs import inspection

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    run = wb.open(_trained_run(wb, tmp_path, model_dir, ("negative", "positive"), "f1"))
    report = run.folder.read_report()
    rows = json.loads(run.folder.config_path.read_text())["data"]["validation_rows"]
    every = inspection.run_knockout(run, 10_000, precision="float32", use_cache=False)
    assert every.knockout.rows == every.held_out == rows
    assert every.knockout.f1 == pytest.approx(report["macro_f1"], abs=1e-9)
    reference = inspection.report_reference(run, every)
    assert reference == Reference(report["macro_f1"], rows, "float32")
    ins = wb.inspection(run.folder.path.name)
    ins.causal = every
    assert "the report's own figure: the same rows, decision rule and macro-F1" in ins.summary()
    fewer = inspection.run_knockout(run, 2, precision="float32", use_cache=False)
    ins.causal = fewer
    assert (f"on the first 2 of the {rows} validation rows" in ins.summary()
            and "they differ by the rows only" in ins.summary())


def test_the_start_is_the_step_0_snapshot_or_recomputed_alike(tmp_path, model_dir,
                                                              monkeypatch):
    import shutil

    from prefixlab.runs import inspection

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    run = wb.open(_trained_run(wb, tmp_path, model_dir, ("negative", "positive"), "s"))
    saved = inspection.run_start(run)
    assert saved.source == "the step-0 snapshot"
    shutil.rmtree(run.folder.snapshots_dir)
    again = inspection.run_start(run)
    assert again.source.startswith("recomputed from the run's config (the init text '")
    torch.testing.assert_close(again.kv, saved.kv)
    # Where the prefix starts its change is measured from; its words are the init text's.
    assert inspection.run_words(run)["init text"]


def test_resetting_a_runs_untrained_prefix_to_its_start_changes_nothing(tmp_path, model_dir,
                                                                        monkeypatch):
    import json

    from prefixlab.runs import inspection
    from prefixlab.runs.start import Start

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    run = wb.open(_trained_run(wb, tmp_path, model_dir, ("negative", "positive"), "r"))
    untrained = Start(run.kv.clone(), "the prefix itself")
    result = inspection.run_knockout(run, 4, ablation="reset", start=untrained,
                                     use_cache=False).knockout
    assert result.ablation == "reset"
    assert not result.slot_log_prob.any() and not result.layer_log_prob.any()
    assert result.all_log_prob == 0 and result.all_f1 == 0
    stored = json.loads((run.folder.path / "knockout_reset.json").read_text())
    assert stored["ablation"] == "reset" and "Reset to start" in stored["method"]
    # The real start: the trained run's reset is measured and shown in the workbench.
    wb.knockout(run.folder.path.name, 4, ablation="reset")
    ins = wb.inspection(run.folder.path.name)
    assert ins.reset.knockout.ablation == "reset" and ins.causal is None
    assert "**What training added** (knockout by resetting to the start" in ins.summary()


def test_the_inspection_leads_with_what_training_changed(tmp_path, model_dir, monkeypatch):
    import json

    from prefixlab.runs import inspection

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    run_id = _trained_run(wb, tmp_path, model_dir, ("negative", "positive"), "c")
    ins = wb.inspection(run_id)
    assert ins.start.source == "the step-0 snapshot" and ins.change.moved
    summary = ins.summary()
    assert summary.startswith("**What training changed**: the ")
    assert summary.split("\n\n")[1].startswith("**What still reads as the start**")
    table = ins.readout_table(0, "change from start")
    assert list(table.columns) == ["slot", "value moved", "pushed up by training",
                                   "pushed down"]
    assert table["pushed up by training"].iloc[0] not in ("", "unchanged")
    assert ins.change_figure().data
    assert any(" · " in cell for cell in ins.nearest_table(0, "key")["#1"])  # origin tags
    out = inspection.inspect_run(ins.run.folder.path, tmp_path / "out", ins.run.loaded,
                                 top_k=2, knockout_rows=4, ablations=("hide", "reset"))
    change = json.loads((out / "change.json").read_text())
    assert change["start"] == "the step-0 snapshot" and change["moved"]
    assert json.loads((out / "knockout_reset.json").read_text())["ablation"] == "reset"
    nearest = json.loads((out / "nearest_tokens.json").read_text())
    assert "origin" in nearest["layers"][0]["key"][0]["top"][0]
    written = (out / "summary.md").read_text()
    assert written.startswith("**What training changed**")
    assert "What training added" in written
    page = (out / "inspection.html").read_text()
    assert "How far each slot moved from its start" in page and "change from the start" in page
