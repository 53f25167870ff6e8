"""The app's "Compare methods" section beyond what tests/test_compare.py drives: a past
comparison picked ticks its methods again and says which files it read; Compare reads the
Train form's shift CSV and the section's test CSV, keeps copies and says which it will use;
a generation comparison (a hand-written comparison.json, nothing trained) reads as BLEU
beside the bare model in the table, the chart, the headline, the progress lines and the CSV.
Handlers are called as plain functions (workbench/comparing.py, ui/compare_tab.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import gradio as gr
import pytest

from prefixlab.runs.presets import PRESETS, SETTING_NAMES
from prefixlab.ui import build_ui, compare_tab
from prefixlab.workbench import Workbench
from prefixlab.workbench import comparing as comparing_module
from tests.conftest import save_tiny_model
from tests.test_app import write_reviews_csv
from tests.test_compare import _finished

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              # PEFT reads transformers' deprecated is_gradient_checkpointing
              pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def wb(tmp_path, tiny_dir) -> Workbench:
    return Workbench(tmp_path / "data", model=str(tiny_dir))


def _settings() -> list:
    return [{**PRESETS["Quick look"], "prefix_length": 4, "max_minutes": 0.5}[k]
            for k in SETTING_NAMES]


def _value(update):
    return update["value"] if isinstance(update, dict) and "__type__" in update else update


# --- a generation comparison, written by hand ----------------------------------------------

GENERATION_ROWS = [
    {"method": "prefix", "title": "prefix tuning", "bleu": 18.4, "chrf": 41.2, "rouge_l": 37.5,
     "loss": 2.114, "test_bleu": 16.9, "trainable": 20480, "stored": 184_320, "kept_s": 34.0},
    {"method": "prompt", "title": "prompt tuning", "bleu": 11.7, "chrf": 33.0, "rouge_l": 29.8,
     "loss": 2.640, "test_bleu": 10.2, "trainable": 4608, "stored": 41_000, "kept_s": 51.5},
    {"method": "lora", "title": "LoRA", "bleu": 24.9, "chrf": 47.8, "rouge_l": 44.1,
     "loss": 1.872, "test_bleu": 23.4, "trainable": 73728, "stored": 1_260_000, "kept_s": 80.2},
]
BARE = {"bleu": 4.2, "chrf": 21.5, "rouge_l": 18.3, "loss": 3.905}


def _scores(bleu: float, chrf: float, rouge_l: float, loss: float, rows: int) -> dict:
    return {"bleu": bleu, "chrf": chrf, "rouge_l": rouge_l, "loss": loss, "rows": rows,
            "inputs": rows}


def write_generation_comparison(comparisons_dir: Path, cid: str = "gen-20250101-120000",
                                with_test: bool = True, with_shift: bool = False) -> str:
    """A finished generation comparison of prefix, prompt and LoRA (full fine-tuning failed)
    as run_comparison and the workbench would leave it: progress.json and result/comparison.json
    with task "generation", BLEU/chrF/ROUGE-L/loss per set and the bare model's scores."""
    folder = comparisons_dir / cid
    (folder / "result").mkdir(parents=True)
    rows = []
    for r in GENERATION_ROWS:
        test = _scores(r["test_bleu"], r["chrf"] - 1, r["rouge_l"] - 1, r["loss"] + 0.1, 30)
        shift = _scores(r["test_bleu"] / 2, r["chrf"] - 9, r["rouge_l"] - 9, r["loss"] + 1, 20)
        rows.append({
            "method": r["method"], "title": r["title"], "settings": {},
            "validation": _scores(r["bleu"], r["chrf"], r["rouge_l"], r["loss"], 40),
            "test": test if with_test else None, "shift": shift if with_shift else None,
            "trainable_parameters": r["trainable"], "trainable_share": r["trainable"] / 4.6e6,
            "stored_bytes": r["stored"], "kept_step": 60, "steps": 80,
            "stop_reason": "patience", "train_s_to_kept": r["kept_s"],
            "train_s": r["kept_s"] * 1.3, "wall_s": r["kept_s"] * 1.5, "examples_per_s": 12.5,
            "peak_rss_bytes": 900_000_000, "peak_gpu_bytes": None, "folder": None})
    rows.append({"method": "full", "title": "full fine-tuning",
                 "error": "out of memory at step 3"})
    bare_test = _scores(3.9, 20.1, 17.0, 3.95, 30)
    result = {
        "format": "prefixlab-comparison/1", "task": "generation", "created": 1.0,
        "model": "tiny", "run": {"train_csv": str(folder / "pairs.csv")},
        "methods_asked": ["prefix", "prompt", "lora", "full"],
        "data": {"train_rows": 160, "validation_rows": 40, "test_rows": 30 if with_test else None,
                 "shift_rows": 20 if with_shift else None, "labels": None, "warnings": []},
        "bare_model": {"validation": _scores(**BARE, rows=40),
                       "test": bare_test if with_test else None,
                       "shift": _scores(2.0, 15.0, 12.0, 4.5, 20) if with_shift else None},
        "rows": rows,
        "verdict": ["LoRA scored best on the 30 test inputs: BLEU 23.4"],
    }
    (folder / "result" / "comparison.json").write_text(json.dumps(result))
    methods = {r["method"]: {"state": "done", "metric": "bleu", "value": r["bleu"]}
               for r in GENERATION_ROWS}
    methods["full"] = {"state": "failed", "error": "out of memory at step 3"}
    (folder / "progress.json").write_text(json.dumps({
        "state": "completed", "pid": -1, "started": 2.0, "methods": methods,
        "asked": {"methods": result["methods_asked"], "task": "generation",
                  "data": "pairs.csv", "test": "pairs-test.csv" if with_test else None,
                  "shift": "pairs-elsewhere.csv" if with_shift else None}}))
    return cid


def test_a_generation_comparison_reads_as_bleu_beside_the_bare_model(wb):
    cid = write_generation_comparison(wb.comparisons_dir)
    shown, progress, table, chart, verdict, files, cancel, timer = compare_tab.on_pick(wb, cid)
    assert shown == cid
    assert progress.startswith("Comparison finished: LoRA scored best (test BLEU 23.4; the "
                               "bare model 3.9)")
    assert "On **pairs.csv** (160 training, 40 validation rows)" in progress
    assert "test rows: **pairs-test.csv** (30 rows)" in progress and "no shift CSV" in progress
    assert "**LoRA**: done: validation BLEU 24.9" in progress
    assert "**full fine-tuning**: failed: out of memory" in progress

    frame = _value(table)
    assert list(frame.columns[:5]) == ["method", "val BLEU", "val chrF", "val ROUGE-L",
                                       "test BLEU"]
    assert "shift BLEU" not in frame.columns and "val F1" not in frame.columns
    assert list(frame["method"]) == ["prefix tuning", "prompt tuning", "LoRA",
                                     "full fine-tuning", "bare model"]
    by_method = frame.set_index("method")
    assert by_method.loc["LoRA", "val BLEU"] == "24.9"
    assert by_method.loc["LoRA", "peak RSS"] == "858.3 MB"
    assert by_method.loc["LoRA", "stored"] == "1.2 MB"
    assert by_method.loc["bare model", "test BLEU"] == "3.9"
    assert by_method.loc["bare model", "stored"] == "-"
    assert by_method.loc["full fine-tuning", "val BLEU"] == "failed"

    fig = _value(chart)
    assert chart["visible"]
    assert list(fig.data[0].y) == [16.9, 10.2, 23.4]  # test BLEU: the test rows were given
    assert list(fig.data[0].text) == ["prefix tuning", "prompt tuning", "LoRA"]
    assert fig.layout.yaxis.title.text == "BLEU (0-100)"
    assert fig.layout.title.text.startswith("test BLEU against training time")
    assert [s.y0 for s in fig.layout.shapes] == [3.9]  # the bare model's line
    assert fig.layout.annotations[0].text == "bare model 3.9"
    assert 23.4 < fig.layout.yaxis.range[1] <= 105
    assert "LoRA scored best" in verdict and not cancel["visible"] and not timer.active

    table_csv = next(Path(f) for f in _value(files) if f.endswith("-table.csv"))
    rows = list(csv.DictReader(table_csv.open()))
    assert [r["method"] for r in rows] == ["prefix", "prompt", "lora", "full", "bare"]
    assert "validation_macro_f1" not in rows[0]
    assert float(rows[2]["validation_bleu"]) == 24.9 and float(rows[2]["test_chrf"]) == 46.8
    assert float(rows[4]["validation_loss"]) == 3.905 and rows[4]["stored_bytes"] == ""
    assert rows[3]["error"] == "out of memory at step 3"


def test_a_generation_comparison_without_test_rows_reads_validation(wb):
    cid = write_generation_comparison(wb.comparisons_dir, with_test=False)
    progress, table, chart, *_ = compare_tab.on_pick(wb, cid)[1:]
    assert "(validation BLEU 24.9; the bare model 4.2)" in progress and "no test CSV" in progress
    assert "test BLEU" not in _value(table).columns
    fig = _value(chart)
    assert list(fig.data[0].y) == [18.4, 11.7, 24.9] and fig.layout.shapes[0].y0 == 4.2


def test_generation_data_offers_only_the_methods_that_generate(wb, tmp_path):
    generating = {"path": "pairs.csv", "name": "pairs.csv", "text": "input", "target": "output"}
    labeled = {"path": "reviews.csv", "name": "reviews.csv", "text": "text", "label": "label"}
    update = compare_tab.method_choices(generating, ["prefix", "lora", "probe", "tfidf"])
    assert [value for _, value in update["choices"]] == ["prefix", "prompt", "lora", "ia3",
                                                         "full"]
    assert update["value"] == ["prefix", "lora"]
    update = compare_tab.method_choices(generating, ["probe"])  # nothing left: the defaults
    assert update["value"] == ["prefix", "prompt", "lora"]
    update = compare_tab.method_choices(labeled, ["prefix", "lora"])
    assert [value for _, value in update["choices"]][-2:] == ["probe", "tfidf"]
    assert update["value"] == ["prefix", "lora"]
    assert "inputs and targets" in compare_tab.inputs_note(generating, None, None)

    # a generation comparison picked restores its methods, full fine-tuning included
    cid = write_generation_comparison(wb.comparisons_dir)
    restored = compare_tab.restore_methods(wb, generating, cid)
    assert restored["value"] == ["prefix", "prompt", "lora", "full"]


# --- test and shift CSVs, and a past comparison picked -------------------------------------


def test_compare_reads_the_forms_shift_csv_keeps_copies_and_restores_on_pick(
        wb, tmp_path, monkeypatch):
    data = write_reviews_csv(tmp_path / "reviews.csv", rows=40)
    uploads = tmp_path / "gradio" / "a1b2"  # where Gradio would put the uploads
    uploads.mkdir(parents=True)
    test = write_reviews_csv(uploads / "held-out.csv", rows=12)
    shift = write_reviews_csv(uploads / "other-source.csv", rows=10)
    state = {"path": str(data), "name": "reviews.csv", "text": "text", "label": "label"}

    note = compare_tab.inputs_note(state, None, None)
    assert "no test CSV: upload one here" in note
    assert 'no shift CSV: set one in Settings, "Generalizing to other topics"' in note
    note = compare_tab.inputs_note(state, str(test), str(shift))
    assert "test rows: **held-out.csv** (uploaded here)" in note
    assert "shift rows: **other-source.csv** (the Shift CSV in Settings" in note

    heard = []
    real = comparing_module.run_comparison

    def spy(cfg, compare, *args, **kwargs):
        heard.append(compare)
        return real(cfg, compare, *args, **kwargs)

    monkeypatch.setattr(comparing_module, "run_comparison", spy)
    cid, past, *_ = compare_tab.on_compare(wb, state, ["probe", "tfidf"], "", str(test),
                                           str(shift), *_settings())
    test.unlink()  # Gradio's temporary files may go: the comparison reads its own copies
    shift.unlink()
    status = _finished(wb, cid)
    assert status["state"] == "completed", status
    folder = wb.comparisons_dir / cid
    assert heard[0].test_csv == str(folder / "data" / "test.csv")
    assert heard[0].shift_csv == str(folder / "data" / "shift.csv")
    assert (folder / "data" / "shift.csv").read_text() == write_reviews_csv(
        tmp_path / "again.csv", rows=10).read_text()
    result = status["result"]
    assert result["data"]["test_rows"] == 12 and result["data"]["shift_rows"] == 10

    progress, table, *_ = compare_tab.on_tick(wb, cid)
    assert {"test F1", "shift F1"} <= set(_value(table).columns)
    assert "s total" not in _value(table).columns  # in the CSV: the page has no room for it
    assert progress.startswith("Comparison finished: ")
    assert ("On **reviews.csv** (32 training, 8 validation rows) · test rows: **held-out.csv** "
            "(12 rows) · shift rows: **other-source.csv** (10 rows)") in progress

    # another page, another Data-tab choice: picking it ticks its methods again
    asked = wb.comparison_asked(cid)
    assert asked == {"methods": ["probe", "tfidf"], "task": "classification",
                     "data": "reviews.csv", "test": "held-out.csv", "shift": "other-source.csv"}
    restored = compare_tab.restore_methods(wb, state, cid)
    assert restored["value"] == ["probe", "tfidf"]
    assert [v for _, v in restored["choices"]] == ["prefix", "prompt", "lora", "ia3", "full",
                                                   "probe", "tfidf"]
    assert compare_tab.restore_methods(wb, state, None) == gr.skip()
    # with generation data chosen, the probe and TF-IDF cannot be ticked again
    generating = {**state, "target": "label"}
    assert compare_tab.restore_methods(wb, generating, cid)["value"] == []


def test_a_comparison_from_before_asked_was_kept_reads_names_from_its_result(wb):
    cid = write_generation_comparison(wb.comparisons_dir)
    progress = wb.comparisons_dir / cid / "progress.json"
    status = json.loads(progress.read_text())
    del status["asked"]
    progress.write_text(json.dumps(status))
    result_file = wb.comparisons_dir / cid / "result" / "comparison.json"
    result = json.loads(result_file.read_text())
    result["data"]["test_csv"] = str(wb.comparisons_dir / cid / "inputs" / "test-pairs-test.csv")
    result_file.write_text(json.dumps(result))
    assert wb.comparison_asked(cid) == {
        "methods": ["prefix", "prompt", "lora", "full"], "task": "generation",
        "data": "pairs.csv", "test": "pairs-test.csv", "shift": None}


def test_compare_is_wired_to_the_forms_shift_csv(wb):
    demo = build_ui(wb)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert "compare-shift" not in ids  # one shift upload on the page: the form's
    def inputs_of(name: str) -> list[list]:
        return [[getattr(b, "elem_id", None) for b in f.inputs] for f in demo.fns.values()
                if f.name == name and any(getattr(b, "elem_id", None) == "compare-test"
                                          for b in f.inputs)]

    [compare] = inputs_of("on_compare")
    assert compare[3:5] == ["compare-test", "shift-csv"]
    assert {tuple(n[1:]) for n in inputs_of("inputs_note")} == {("compare-test", "shift-csv")}


@pytest.mark.parametrize("seconds", [[34.0, 80.2], [0.0967, 0.124], [0.1, 300.0], [5.0, 5.0]])
def test_the_charts_time_axis_labels_three_or_more_ticks_near_the_data(seconds):
    from prefixlab.figures.comparison import comparison_figure

    rows = [{"title": f"m{i}", "stored_bytes": 1000, "train_s_to_kept": s,
             "validation": {"macro_f1": 0.5}} for i, s in enumerate(seconds)]
    ticks = comparison_figure(rows).layout.xaxis.tickvals
    near = [t for t in ticks if min(seconds) / 1.1 <= t <= max(seconds) * 1.1]
    assert len(near) >= 3, ticks
    labels = comparison_figure(rows).layout.xaxis.ticktext
    assert all(len(label) <= 6 for label in labels), labels  # 0.11, not 0.11000000000000001
    if max(seconds) / min(seconds) > 100:
        assert {0.1, 0.2, 0.5, 1.0, 2.0, 5.0} <= set(ticks)  # 1-2-5 where the data spans wide


def test_compare_on_generation_data_asks_for_a_generation_comparison(wb, tmp_path,
                                                                     monkeypatch):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("input,output\n" + "".join(f"say {i},{i}\n" for i in range(20)))
    state = {"path": str(pairs), "name": "pairs.csv", "text": "input", "label": None,
             "target": "output"}
    asked = {}

    def start(cfg, methods, **kwargs):  # the core's own check decides what it can compare
        asked.update(cfg=cfg, methods=methods, **kwargs)
        raise gr.Error("stop here")

    monkeypatch.setattr(wb, "start_comparison", start)
    with pytest.raises(gr.Error, match="stop here"):
        compare_tab.on_compare(wb, state, ["prefix", "lora"], "", None, None, *_settings())
    assert asked["cfg"].is_generation and asked["cfg"].target_column == "output"
    assert asked["methods"] == ["prefix", "lora"] and asked["data_name"] == "pairs.csv"
    with pytest.raises(gr.Error, match="Tick at least one method"):
        compare_tab.on_compare(wb, state, [], "", None, None, *_settings())


def test_the_app_trains_a_generation_comparison_and_reads_it_as_bleu(wb, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("input,output\n" + "".join(f"say {i % 12} now,{i % 12} it is\n"
                                                 for i in range(48)))
    state = {"path": str(pairs), "name": "pairs.csv", "text": "input", "label": None,
             "target": "output"}
    settings = [{**PRESETS["Quick look"], "prefix_length": 4, "max_minutes": 0.5,
                 "epochs": 1}[k] for k in SETTING_NAMES]
    cid = compare_tab.on_compare(wb, state, ["prefix", "lora"], "", None, None, *settings)[0]
    status = _finished(wb, cid, timeout=240)
    assert status["state"] == "completed", status
    result = status["result"]
    assert result["task"] == "generation"
    assert [r["method"] for r in result["rows"]] == ["prefix", "lora"]
    assert all("bleu" in r["validation"] for r in result["rows"])
    shown, progress, table, chart, *_ = compare_tab.on_pick(wb, cid)
    frame = _value(table)
    assert list(frame["method"]) == ["prefix tuning", "LoRA", "bare model"]
    assert "val BLEU" in frame.columns and "val F1" not in frame.columns
    assert "validation BLEU" in progress
    assert _value(chart).layout.yaxis.title.text == "BLEU (0-100)"


def test_a_surprise_in_the_worker_ends_the_comparison_as_failed(wb, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(comparing_module, "run_comparison", broken)
    cid = compare_tab.on_compare(wb, {"path": str(write_reviews_csv(tmp_path / "r.csv")),
                                      "name": "r.csv", "text": "text", "label": "label"},
                                 ["prefix"], "", None, None, *_settings())[0]
    status = _finished(wb, cid, timeout=30)
    assert status["state"] == "failed"
    assert status["error"] == "RuntimeError: something nobody expected"
