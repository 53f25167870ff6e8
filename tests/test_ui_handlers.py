"""The tabs' handlers called directly, as plain functions, with a Workbench on a tiny model:
no page is built. Each handler takes the workbench and the event's values and returns the
outputs' values (plain, or gr.update dicts)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest
import torch

from prefixlab.engine.prefix import save_prefix
from prefixlab.runs import finished, scoring
from prefixlab.runs.folder import RunError
from prefixlab.runs.presets import PRESETS, SETTING_NAMES
from prefixlab.serve.limits import RequestError
from prefixlab.ui import api, data_tab, inspect_tab, playground_tab, runs_tab, train_tab
from prefixlab.ui.common import LongAction, bind, stop_action
from prefixlab.workbench import Workbench
from prefixlab.workbench.datasets import EXAMPLE_CSV
from prefixlab.workbench.runs import run_config
from tests.test_app import (  # noqa: F401  (module-scoped fixtures, reused here)
    BAD_INPUTS,
    model_dirs,
    trained_bench,
    write_reviews_csv,
)
from tests.test_app_generation import (  # noqa: F401  (a module-scoped fixture)
    generated,
    write_pairs_csv,
)


def quick(**changes) -> list:
    """The Train tab's settings values, in order: the Quick look preset with `changes`."""
    return [{**PRESETS["Quick look"], **changes}[k] for k in SETTING_NAMES]


def value(update):
    return update["value"] if isinstance(update, dict) and "__type__" in update else update


def random_prefix_run(wb: Workbench, csv: Path, name: str, length: int, seed: int) -> str:
    """A completed run with a random prefix file: enough to score, inspect and compare."""
    cfg = run_config(str(csv), "text", "label", {"prefix_length": length},
                     model=wb.default_model)
    run_id = wb.store.create(cfg, wb.model_info(), name=name)
    shape = wb.model().shape
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape.num_layers, 2, shape.num_kv_heads, length, shape.head_dim,
                     generator=g)
    save_prefix(wb.folder(run_id).prefix_path, kv, wb.default_model)
    wb.folder(run_id).set_status("completed")  # only a completed run's prefix is served
    return run_id


@pytest.fixture(scope="module")
def bench(trained_bench, tmp_path_factory, monkeypatch_module):  # noqa: F811
    """The trained run, and two runs with random prefixes of the trained one's length and of
    another length."""
    workbench, trained = trained_bench
    monkeypatch_module.setenv("PREFIXLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    csv = write_reviews_csv(tmp_path_factory.mktemp("random") / "reviews.csv")
    length = workbench.open(trained).kv.shape[3]
    alike = random_prefix_run(workbench, csv, "alike", length, 1)
    longer = random_prefix_run(workbench, csv, "longer", length + 2, 2)
    workbench.refresh()
    return workbench, trained, alike, longer


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# --- common ----------------------------------------------------------------------------------


def test_bind_gives_the_workbench_and_keeps_what_gradio_reads(bench):
    workbench = bench[0]
    bound = bind(inspect_tab.on_knockout, workbench)
    assert bound.__name__ == "on_knockout"
    params = inspect.signature(bound).parameters
    assert list(params) == ["rid", "rows", "ablation", "progress"]  # gr.Progress: by default
    assert isinstance(params["progress"].default, gr.Progress)
    assert inspect.getdoc(bound) == inspect.getdoc(inspect_tab.on_knockout)


# --- Data ------------------------------------------------------------------------------------


def test_a_bad_file_lists_its_problems_and_a_good_one_guesses_its_columns(bench):
    workbench = bench[0]
    state, message, text_col, *_ = data_tab.load(workbench, str(BAD_INPUTS / "image.csv"))
    assert state is None and "This file cannot be used" in message and "PNG image" in message
    assert text_col["choices"] == []
    state, message, text_col, label_col, target_col, preview, chart, memory = \
        data_tab.on_example(workbench)
    assert (state["text"], state["label"], state["target"]) == ("text", "label", None)
    assert "54 usable rows" in message and chart["visible"] and memory["key"] == "example"
    # A target column makes a generation task; the label column of short labels will do.
    state2, message, _, chart, memory = data_tab.columns_changed(workbench, state, "text",
                                                                 "label", "label")
    assert state2["target"] == "label" and memory["target"] == "label"
    assert "Generation task: 54 usable rows" in message and not chart["visible"]
    message = data_tab.columns_changed(workbench, state, "text", "label", "text")[1]
    assert "input and target columns must differ" in message
    # A label column with one label: the problem, in the file's own words.
    _, message, _, chart, _ = data_tab.columns_changed(workbench, state, "label", "text",
                                                       data_tab.NO_TARGET)
    assert message.startswith("**This file cannot be used yet:**") and not chart["visible"]


def test_an_upload_is_kept_and_restored_by_its_key_only(bench, tmp_path):
    workbench = bench[0]
    src = write_reviews_csv(tmp_path / "my file.csv")
    *_, memory = data_tab.on_upload(workbench, str(src))
    src.unlink()
    state, message, *_, file_box = data_tab.restore(workbench, memory)
    assert Path(state["path"]).parent.parent == workbench.uploads_dir
    assert message.startswith("**my file.csv** (kept from your last visit)")
    # Issue 26, item 8: the file box shows the kept file, by its name, not an empty drop zone.
    assert file_box == state["path"] and Path(file_box).name == "my_file.csv"
    assert data_tab.restore(workbench, {"key": str(EXAMPLE_CSV)})[0] is None
    assert data_tab.restore(workbench, {"key": "example"})[-1] == gr.skip()  # not an upload


def test_the_preview_shows_the_chosen_columns_first_each_with_its_share(bench, tmp_path):
    """Issue 26, item 9: a generation preview put the target first and cut the input."""
    workbench = bench[0]
    frame = pd.DataFrame({"id": [1], "target": ["There is a place in the city centre."],
                          "input": ["name[Blue Spice], eatType[coffee shop], area[riverside]"]})
    preview = data_tab.preview_update(frame, "input", None, "target")
    assert list(preview["value"].columns) == ["input", "target", "id"]
    assert preview["column_widths"] == ["40.0%", "45.0%", "15.0%"]
    two = data_tab.preview_update(frame[["target", "input"]], "input", None, "target")
    assert list(two["value"].columns) == ["input", "target"]
    assert two["column_widths"] == ["47.1%", "52.9%"]  # the two share the whole width
    labeled = data_tab.preview_update(frame.rename(columns={"target": "label"}), "input",
                                      "label")
    assert list(labeled["value"].columns) == ["label", "input", "id"]  # short label first
    # An uploaded generation CSV: the input column leads the preview.
    csv = write_pairs_csv(tmp_path / "pairs.csv")  # mr, then ref
    _, _, text_col, _, target_col, preview, *_ = data_tab.on_upload(workbench, str(csv))
    assert (text_col["value"], target_col["value"]) == ("mr", "ref")
    assert list(preview["value"].columns) == ["mr", "ref"]


# --- Train -----------------------------------------------------------------------------------


def test_start_is_off_without_data_and_on_with_a_good_file(bench, tmp_path):
    workbench = bench[0]
    message, start = train_tab.check(workbench, None, None, *quick())
    assert "Choose a CSV in the Data tab first" in message and start["interactive"] is False
    with pytest.raises(gr.Error, match="Choose a CSV"):
        train_tab.on_start(workbench, None, "", "", 1, None, *quick())
    csv = write_reviews_csv(tmp_path / "r.csv")
    state = {"path": str(csv), "name": "r.csv", "text": "text", "label": "label"}
    message, start = train_tab.check(workbench, state, None, *quick())
    assert message.startswith("Ready: r.csv") and start["interactive"] is True
    bad = {"path": str(BAD_INPUTS / "no_text_column.csv"), "name": "x.csv"}
    message, start = train_tab.check(workbench, bad, None, *quick())
    assert "Cannot start with x.csv" in message and start["interactive"] is False


def test_the_forms_shift_levers_and_file_reach_config_json_and_the_report(
        model_dirs, tmp_path, monkeypatch):  # noqa: F811
    """Issue 32's levers set in the Train form: in the run's config.json, the shift CSV kept in
    the run folder (the upload's temp copy goes), and its scores in the report shown."""
    from prefixlab.runs.experiment import execute_run

    workbench = Workbench(tmp_path / "data", model=str(model_dirs["llama"]))
    monkeypatch.setattr(workbench.store, "start", lambda run_id, resume=False: None)  # below
    csv = write_reviews_csv(tmp_path / "r.csv")
    (tmp_path / "upload").mkdir()
    shift = write_reviews_csv(tmp_path / "upload" / "other.csv", rows=12)
    state = {"path": str(csv), "name": "r.csv", "text": "text", "label": "label"}
    levers = quick(validation_split="topics", start_pull=0.1, average_last=2,
                   prefix_dropout=0.2, try_learning_rates="0.02")
    message, start = train_tab.check(workbench, state, str(shift), *levers)
    assert "the 12 rows of the shift CSV" in message and start["interactive"] is True
    rid = train_tab.on_start(workbench, train_tab.Followed(), state, "levers", "", 1,
                             str(shift), *levers)[0]["run_id"]
    folder = workbench.folder(rid)
    run = json.loads((folder.path / "config.json").read_text())["run"]
    assert run["validation_split"] == "topics"
    assert (run["training"]["start_pull"], run["training"]["average_last"],
            run["training"]["prefix_dropout"]) == (0.1, 2, 0.2)
    assert run["training"]["try_learning_rates"] == [0.02]
    kept = Path(run["shift_csv"])
    assert kept.parent == folder.path / "data" and kept.read_text() == shift.read_text()
    shift.unlink()
    # trained here rather than by a worker; the report reads the run's own copy
    assert execute_run(folder, workbench.model()) is not None
    assert workbench.refresh()[0].state == "completed"
    shown = train_tab.on_follow(workbench, train_tab.Followed(), rid)
    report, loss = shown[6], shown[4]
    assert "| prefix on the shift set (12 rows) |" in report
    # two learning rates tried: each one's curves, and which was kept and why
    rate = json.loads((folder.path / "config.json").read_text())["run"]["training"][
        "learning_rate"]
    assert f"Learning rate {rate:g}, chosen on the validation rows" in report
    names = [t.name for t in loss["value"].data]
    assert "train loss, lr 0.02" in names and "train loss, lr 0.005" in names


def test_presets_and_the_prefix_size_line(bench):
    workbench = bench[0]
    assert train_tab.apply_preset("Balanced") == [PRESETS["Balanced"][k] for k in SETTING_NAMES]
    line = train_tab.show_size(workbench, *quick(prefix_length=5))
    trainable = workbench.prefix_size({"prefix_length": 5})["trainable"]
    assert f"**{trainable:,} trainable parameters**" in line


def test_a_finished_run_renders_its_report_and_stops_the_timer(bench):
    workbench, trained = bench[:2]
    followed = train_tab.Followed()
    (view, follow, status, progress, loss, _, report, per_class, *_, timer,
     cancel) = train_tab.on_follow(workbench, followed, trained)
    assert followed.run_id == trained and view["run_id"] == trained and view["offset"] > 0
    assert follow["value"] == trained and "**trained**: completed" in status
    assert loss["visible"] and "Held-out results on" in report and per_class["visible"]
    assert timer.active is False
    assert cancel["value"] == f"Cancel run {trained}" and cancel["interactive"] is False
    again = train_tab.on_tick(workbench, followed, view)
    assert again[0] == view  # nothing new in the log
    assert "value" not in again[1] and "value" not in again[-1]  # a poll moves no choice
    with pytest.raises(gr.Error, match="No run is open"):
        train_tab.on_cancel(workbench, train_tab.Followed(), None)


def test_a_reloaded_page_shows_the_last_run_once_none_is_active(bench, monkeypatch):
    """Issue 26, item 8: after a reload the Train tab was blank once every run was over."""
    from dataclasses import replace

    workbench, trained, alike, longer = bench
    # the random-prefix runs made later are marked completed so that they can be served;
    # here they stand for later runs that failed, which the page must not prefer
    rows = [replace(r, state="failed") if r.id in (alike, longer) else r
            for r in workbench.refresh()]
    monkeypatch.setattr(workbench, "refresh", lambda: rows)
    followed = train_tab.Followed()  # a new page: nothing followed yet
    view, follow, status, *_, report, _, _, _, timer, cancel = train_tab.reattach(workbench,
                                                                                  followed)
    # the last completed run, with its report
    assert followed.run_id == trained == view["run_id"] and follow["value"] == trained
    assert "**trained**: completed" in status and "Held-out results on" in report
    assert timer.active is False and cancel["interactive"] is False
    # a run picked before the tab was opened again stays shown
    followed.run_id = alike
    assert train_tab.reattach(workbench, followed)[0]["run_id"] == alike


# --- Runs ------------------------------------------------------------------------------------


def test_the_runs_tab_lists_opens_and_refuses_what_cannot_be_done(bench, tmp_path):
    workbench, trained = bench[:2]
    table, pick, compare = runs_tab.list_runs(workbench, "gone")
    assert trained in list(table["id"]) and pick["value"] is None
    assert runs_tab.list_runs(workbench, trained)[1]["value"] == trained
    text, loss, _, report, *_ = runs_tab.open_run(workbench, trained)
    assert text == "**trained**: completed" and loss["visible"] and "macro-F1" in report
    with pytest.raises(gr.Error, match="only stopped runs resume"):
        runs_tab.resume(workbench, trained)
    with pytest.raises(gr.Error, match="Pick a run first"):
        runs_tab.download_prefix(workbench, None)
    zipped = runs_tab.download_prefix(workbench, trained)
    assert zipped["visible"] and zipped["value"].endswith(f"{trained}-prefix.zip")
    cfg = run_config(str(write_reviews_csv(tmp_path / "r.csv")), "text", "label", {},
                     model=workbench.default_model)
    unstarted = workbench.store.create(cfg, workbench.model_info(), name="unstarted")
    with pytest.raises(gr.Error, match="no prefix yet"):
        runs_tab.evaluate_test(workbench, unstarted, None)
    workbench.store.delete(unstarted)
    assert not runs_tab.compare_runs(workbench, [], "loss")["visible"]
    assert runs_tab.compare_runs(workbench, [trained], "loss")["visible"]


# --- Long actions: progress and Stop (issue 26, item 5) ------------------------------------


@pytest.fixture
def counted_rows(monkeypatch):
    """Scoring in chunks of 4 rows; the rows the engine was asked to score, per call."""
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 4)
    monkeypatch.setattr(finished, "SCORE_CHUNK", 4)
    calls: list[int] = []
    score = scoring.score_log_likelihoods

    def counting(model, kv, encoder, texts, *args, **kwargs):
        calls.append(len(texts))
        return score(model, kv, encoder, texts, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_log_likelihoods", counting)
    return calls


def test_evaluating_a_test_csv_shows_progress_and_stops_between_chunks(bench, tmp_path,
                                                                        counted_rows):
    workbench, trained = bench[:2]
    csv = write_reviews_csv(tmp_path / "test.csv", rows=12)
    seen: list = []
    md, table, *_ = runs_tab.evaluate_test(workbench, trained, str(csv), LongAction(),
                                           progress=lambda f, desc=None: seen.append((f, desc)))
    assert md.startswith("### trained on the test file: 12 rows") and table["visible"]
    assert "Evaluated in " in md
    descs = [d for _, d in seen]
    # the seconds depend on the machine's load: only the words around them are checked
    assert re.search(r"scoring held-out rows with the prefix: 4/12 · \d+ s so far · about ",
                     descs[1]), descs[1]
    assert any(d.startswith("scoring held-out rows without the prefix (zero-shot): 8/12 ")
               and d.endswith(" left for this part") for d in descs)
    assert [f for f, _ in seen].count(1.0) == 2  # both parts to the end
    assert sum(counted_rows) == 24  # 12 rows with the prefix, 12 without
    # scored in chunks or at once, the same report
    chunked = workbench.evaluate_csv(trained, csv, progress=lambda *told: None)
    whole = workbench.evaluate_csv(trained, csv)
    assert chunked["per_class"] == whole["per_class"] and chunked["loss"] == pytest.approx(
        whole["loss"]) and chunked["baselines"]["zero_shot"] == whole["baselines"]["zero_shot"]
    # adapted to the file's rows: the page says so and what it assumes; the rows scored once
    counted_rows.clear()
    md, table, *_ = runs_tab.evaluate_test(workbench, trained, str(csv), LongAction(),
                                           "adapted to the file: label shares (EM)",
                                           progress=lambda f, desc=None: None)
    assert "adapted to this file's rows (em)" in md and "one distribution" in md
    assert table["visible"] and sum(counted_rows) == 24

    # Stop pressed while the first chunk is scored: nothing more is scored.
    counted_rows.clear()
    action = LongAction()

    def press_stop(fraction, desc=None):
        if action.done:
            stop_action(action)

    md, table, confusion, bars = runs_tab.evaluate_test(workbench, trained, str(csv), action,
                                                        progress=press_stop)
    assert md.startswith("**Stopped after 4 of 12 (scoring held-out rows with the prefix)")
    assert not (table["visible"] or confusion["visible"] or bars["visible"])
    assert counted_rows == [4] and not action.running
    with pytest.raises(gr.Error, match="Nothing is running"):
        stop_action(action)


def test_batch_prediction_shows_progress_and_a_stopped_one_writes_nothing(bench, tmp_path,
                                                                          counted_rows):
    workbench, trained = bench[:2]
    csv = write_reviews_csv(tmp_path / "to label.csv", rows=10)
    seen: list = []
    path, summary = playground_tab.on_batch(workbench, str(csv), trained, LongAction(),
                                            progress=lambda f, desc=None: seen.append(desc))
    assert "Predicted **10 rows**" in summary and Path(path).is_file()
    assert seen[-1].startswith("predicting: 10/10 · ") and len(seen) == 4  # 0, 4, 8, 10
    before = set(workbench.exports_dir.iterdir())
    action = LongAction()
    path, summary = playground_tab.on_batch(
        workbench, str(csv), [trained], action,
        progress=lambda f, desc=None: action.done and stop_action(action))
    assert path is None and summary.startswith("**Stopped after 4 of 10 (predicting)")
    assert set(workbench.exports_dir.iterdir()) == before  # no file half written
    # several runs at once: the same chunks, the same Stop
    _, alike = bench[1:3]
    action = LongAction()
    path, summary = playground_tab.on_batch(
        workbench, str(csv), [trained, alike], action,
        progress=lambda f, desc=None: action.done and stop_action(action))
    assert path is None and "Stopped after" in summary


def test_evaluating_a_generation_run_shows_each_part_and_stops(generated):  # noqa: F811
    workbench, run_id, csv = generated
    seen: list = []
    report = workbench.evaluate_csv(run_id, csv,
                                    progress=lambda what, done, total: seen.append(what))
    assert report["task"] == "generation"
    assert list(dict.fromkeys(seen)) == [
        "loss with the prefix", "loss of the bare model",
        "decoding held-out inputs (prefix and bare model)"]
    action = LongAction()
    md, *charts_ = runs_tab.evaluate_test(
        workbench, run_id, str(csv), action,
        progress=lambda f, desc=None: action.done and stop_action(action))
    assert md.startswith("**Stopped after 15 of 15 (loss with the prefix)")


# --- Playground and the API ------------------------------------------------------------------


def test_the_playground_scores_asks_every_prefix_and_generates(bench, tmp_path):
    workbench, trained, alike, _ = bench
    prefixes, gen_prefix, *_, gen_runs = playground_tab.refresh_choices(workbench)
    ids = [c[1] for c in prefixes["choices"]]
    assert {trained, alike} <= set(ids) and gen_prefix["choices"][0] == playground_tab.NO_PREFIX
    assert gen_runs["choices"] == []  # no generation run here
    frame, chart = playground_tab.on_score(workbench, "good\n\n bad ", [trained], False)
    assert list(value(frame)["text"]) == ["good", "bad"] and chart["visible"]
    said = value(playground_tab.on_says_what(workbench, "the movie", [], 2))
    assert set(said["run"]) >= {"trained", "alike"} and "id" not in said.columns
    one = playground_tab.on_generate(workbench, "the movie", trained, 3, True, 1.5)
    assert one == playground_tab.on_generate(workbench, "the movie", trained, 3, True, 1.5)
    with pytest.raises(gr.Error, match="Type a prompt"):
        playground_tab.on_generate(workbench, " ", playground_tab.NO_PREFIX, 3, False, 1.0)
    csv = tmp_path / "to label.csv"
    csv.write_text("text\nthe movie was great\n")
    path, summary = playground_tab.on_batch(workbench, str(csv), trained)
    assert Path(path).name == "to_label-predictions.csv" and "Predicted **1 rows**" in summary


def test_the_api_endpoints_are_plain_functions_of_the_workbench(bench):
    workbench, trained = bench[:2]
    assert trained in [r["id"] for r in api.runs(workbench)]
    [row] = api.runs(workbench, trained)
    assert row["state"] == "completed" and row["name"] == "trained"
    rows = api.score(workbench, ["good", " "], [trained])
    assert [r["text"] for r in rows] == ["good"]
    with pytest.raises(RequestError, match="at least one non-empty string in prompts"):
        api.generate(workbench, [" "], [trained])


# --- Inspect ---------------------------------------------------------------------------------


def test_inspect_opens_a_run_and_every_view_is_drawn_ahead_then_only_sent(bench):
    workbench, trained = bench[:2]
    with pytest.raises(gr.Error, match="Pick a trained run"):
        inspect_tab.open_inspection(workbench, None, 0, "key", "2-D")
    (rid, headline, summary, layer, pca, pca3, layers, nearest, table, readout, ko, push,
     note, trajectory, _, slot_movement) = inspect_tab.open_inspection(workbench, trained, 9,
                                                                        "key", "2-D")
    assert rid == trained  # the browser's own state: the run it has open
    assert headline.startswith("**trained**: 2 layers")
    assert layer["maximum"] == 1 and layer["value"] == 1  # layer 9 of 2: the last one
    assert pca["visible"] and pca["elem_classes"] == [] and pca3["elem_classes"] == ["offstage"]
    assert pca3["value"] is not None  # both maps drawn on open: a switch only moves them
    assert layers["visible"] and nearest["visible"] and value(table)["slot"].iloc[0] == "P0"
    assert not ko["visible"] and not push["visible"] and note.startswith("Not measured yet")
    ins = workbench.inspection(trained)
    assert trajectory["visible"] == (ins.movement is not None)
    assert summary.startswith("**What training changed**")
    assert slot_movement["visible"] == ins.change.moved
    # The value readout of the change from the start, in place of the learned prefix's.
    change = inspect_tab.on_readout_of(workbench, trained, 1, "change from start")
    assert change["visible"] and "pushed up by training" in value(change).columns
    assert "pushed up by training" not in value(readout).columns
    workbench.draw_ahead(trained, "key").join(120)  # as open_inspection started it
    for kind in ("key", "value"):
        for dims in (2, 3):
            assert all(("pca", i, kind, dims) in ins.figures for i in range(ins.layers))
    # A view change sends the kept figure: the same object, not one drawn again.
    pca, pca3, layers, nearest, table = inspect_tab.on_kind(workbench, trained, 0, "value",
                                                            "3-D")
    assert pca3["value"] is ins.figures[("pca", 0, "value", 3)]
    assert pca3["elem_classes"] == [] and pca["elem_classes"] == ["offstage"]
    assert "value" not in pca  # the map off stage is left as it is
    assert layers["value"] is ins.figures[("layers", "value")]
    pca, pca3 = inspect_tab.on_dims(workbench, trained, 1, "value", "2-D")
    assert pca["value"] is ins.figures[("pca", 1, "value", 2)]
    assert all(not u["visible"] for u in inspect_tab.on_layer(workbench, None, 0, "key", "2-D"))


def test_two_sessions_each_see_their_own_run(bench):
    """No state shared across browsers: each asks for its own run's views by its state."""
    workbench, trained, alike, _ = bench
    mine = inspect_tab.on_layer(workbench, trained, 0, "key", "2-D")
    theirs = inspect_tab.on_layer(workbench, alike, 0, "key", "2-D")
    assert mine[0]["value"] is workbench.inspection(trained).figures[("pca", 0, "key", 2)]
    assert theirs[0]["value"] is workbench.inspection(alike).figures[("pca", 0, "key", 2)]
    assert mine[0]["value"] is not theirs[0]["value"]


def test_the_knockout_attention_and_comparison_from_the_inspect_tab(bench):
    workbench, trained, alike, longer = bench
    steps = []
    summary, ko, push, note = inspect_tab.on_knockout(
        workbench, trained, 4, progress=lambda f, desc=None: steps.append(desc))
    assert steps and ko["visible"] and push["visible"]
    assert "Slots that cost most when hidden" in summary
    assert note.startswith("Measured: hidden on 4 of ")
    # Reset to start: what training added, beside what hiding measured.
    summary, ko, push, note = inspect_tab.on_knockout(
        workbench, trained, 4, "reset", progress=lambda f, desc=None: steps.append(desc))
    assert ko["visible"] and "Reset to its start" in ko["value"].layout.title.text
    assert "Slots that cost most when hidden" in summary
    assert "Slots that cost most when reset to start" in summary
    assert "; reset to start on 4 of " in note
    # Opened again (another browser, or after a reload): the measured knockouts are shown.
    opened = inspect_tab.open_inspection(workbench, trained, 0, "key", "2-D")
    assert opened[10]["visible"] and opened[12].startswith("Measured: hidden on 4 of ")
    assert "reset to start on 4 of" in opened[12]
    with pytest.raises(gr.Error, match="at least one input"):
        inspect_tab.on_attention(workbench, trained, " \n ")
    assert inspect_tab.on_attention(workbench, trained, "the movie\nwas great")["visible"]
    with pytest.raises(gr.Error, match="at least two runs"):
        inspect_tab.on_compare(workbench, [trained], 0, "key")
    similarity, joint = inspect_tab.on_compare(workbench, [trained, alike], 5, "value")
    assert similarity["visible"] and joint["visible"]
    with pytest.raises(RunError, match="only like prefixes compare"):
        inspect_tab.on_compare(workbench, [trained, longer], 0, "key")
