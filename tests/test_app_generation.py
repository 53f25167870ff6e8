"""Generation runs in the app without a browser: the Data tab's target guess, a run trained
in-process, its report, the Playground side by side, batch generation, downloads, Inspect."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest

from prefixlab.runs.experiment import execute_run
from prefixlab.ui import build_ui
from prefixlab.ui.data_tab import describe
from prefixlab.ui.run_view import report_outputs
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.test_app import handler, model_dirs  # noqa: F401  (a module-scoped fixture)

MRS = ["name[Aromi], eatType[pub], area[city centre]", "name[Cotto], food[Italian], near[Ranch]",
       "name[Zizzi], area[riverside], eatType[pub]", "name[Alimentum], near[Burger King]",
       "name[Strada], priceRange[cheap], food[French]", "name[Wildwood], customer rating[high]"]


def write_pairs_csv(path: Path) -> Path:
    """Meaning representations with two or three written references each."""
    rows = []
    for i, mr in enumerate(MRS):
        name = mr.split("[")[1].split("]")[0]
        for k in range(2 + i % 2):
            rows.append({"mr": mr, "ref": f"{name} is a place worth a visit, says writer {k}."})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory, model_dirs) -> tuple[Workbench, str, Path]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("generated")
    workbench = Workbench(tmp / "data", model=str(model_dirs["llama"]))
    csv = write_pairs_csv(tmp / "pairs.csv")
    cfg = run_config(str(csv), "mr", None, {"validation_share": 0.35},
                     model=workbench.default_model, target_column="ref")
    run_id = workbench.store.create(cfg, workbench.model_info(), name="gen")
    assert execute_run(workbench.folder(run_id), workbench.model()) is not None
    assert workbench.refresh()[0].state == "completed"
    return workbench, run_id, csv


def test_preview_guesses_a_target_column_of_long_unique_texts(tmp_path, model_dirs):  # noqa: F811
    workbench = Workbench(tmp_path / "data", model=str(model_dirs["llama"]))
    info = workbench.preview_csv(write_pairs_csv(tmp_path / "p.csv"))
    assert (info.text_column, info.label_column, info.target_column) == ("mr", None, "ref")
    # A labeled CSV keeps its label column, even with the label first.
    labeled = tmp_path / "labeled.csv"
    labeled.write_text("label,text\n" + "".join(f"{'pos' if i % 2 else 'neg'},a review that "
                                                 f"is long enough number {i}\n"
                                                 for i in range(20)))
    info = workbench.preview_csv(labeled)
    assert (info.text_column, info.label_column, info.target_column) == ("text", "label", None)
    summary, chart = describe(workbench, str(tmp_path / "p.csv"), "mr", None, "ref")
    assert "Generation task: 15 usable rows" in summary and "6 distinct inputs" in summary
    assert chart is None


def test_a_generation_run_reports_beside_the_bare_model(generated):
    workbench, run_id, _ = generated
    report = workbench.report(run_id)
    assert report["task"] == "generation" and report["n"] == 2  # 0.35 of 6 inputs
    summary, table, confusion, bars = report_outputs(report)
    assert "BLEU" in summary and "bare model" in summary
    assert "| input | references | prefix output | bare model output |" in summary
    sample = report["samples"][0]
    assert f"| {sample['input']} | " in summary
    assert "<br>".join(sample["references"]) in summary  # every reference of the input
    assert table["visible"] is False and confusion["visible"] is False
    assert [t.name for t in bars["value"].data] == ["BLEU", "ROUGE-L", "chrF"]
    records, _ = workbench.metrics(run_id)
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and "bleu" in evals[-1] and "val_loss" in evals[-1]


def test_the_playground_generates_with_several_prefixes_side_by_side(generated):
    workbench, run_id, _ = generated
    demo = build_ui(workbench)
    table, notice = handler(demo, "gen2-run", "click")(f"{MRS[0]}\n{MRS[1]}",
                                                       [run_id, run_id], 2, 5, True)
    assert notice == ""
    frame = table["value"]
    assert list(frame.columns) == ["input", "source", "output"]
    assert len(frame) == 2 * 2 * 2  # inputs x runs x (prefix, bare)
    assert set(frame["source"]) == {"prefix: gen", "bare model, gen's prompt"}


def test_batch_generation_and_downloads(generated, tmp_path):
    workbench, run_id, csv = generated
    result = workbench.predict_csv(run_id, csv)
    out = pd.read_csv(result.path, keep_default_na=False)
    assert list(out.columns) == ["mr", "ref", "generated"] and len(out) == 15
    crlf = tmp_path / "cr.csv"  # a cell holding a lone "\r" comes back as one cell of one row
    pd.DataFrame({"mr": ["name[Aromi],\reatType[pub]", MRS[1]]}).to_csv(crlf, index=False,
                                                                       lineterminator="\r\n")
    # (pandas reads it back: the random model's outputs hold control characters that our own
    # reader takes for a binary file)
    back = pd.read_csv(workbench.predict_csv(run_id, crlf).path, keep_default_na=False)
    assert back["mr"].tolist() == ["name[Aromi],\reatType[pub]", MRS[1]]
    peft = workbench.download(run_id, "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(
        zipfile.ZipFile(peft).namelist())


def test_inspect_works_on_a_generation_run(generated):
    workbench, run_id, _ = generated
    ins = workbench.inspection(run_id)
    assert ins.nearest.token_ids.shape[0] == 2  # the tiny model's layers


def test_the_data_tab_offers_the_guessed_target_column(generated, tmp_path):
    workbench, _, csv = generated
    demo = build_ui(workbench)
    (state, message, text_col, label_col, target_col, preview, chart, memory,
     notice) = handler(demo, "csv", "upload")(str(csv))
    assert (text_col["value"], label_col["value"], target_col["value"]) == ("mr", None, "ref")
    assert state["target"] == "ref" and memory["target"] == "ref"
    assert "Generation task" in message and not chart["visible"] and notice == ""
