"""Generation runs on the command line, end to end on a tiny model saved as a local folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from prefixlab.cli.main import main

MRS = ["name[Aromi], eatType[pub]", "name[Cotto], food[Italian]", "name[Zizzi], area[riverside]",
       "name[Alimentum], near[Burger King]", "name[Strada], priceRange[cheap]"]


@pytest.fixture
def pairs_csv(tmp_path):
    rows = []
    for i, mr in enumerate(MRS * 3):
        rows.append({"input": mr, "target": f"{mr.split('[')[1].split(']')[0]} is fine {i}."})
    rows.append({"input": "name[Lost]", "target": ""})  # an empty target: dropped, not fatal
    path = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_generation_train_evaluate_predict(tmp_path, pairs_csv, model_dir, capsys):
    run = tmp_path / "run"
    code = main(["train", str(pairs_csv), "--text-column", "input", "--target-column", "target",
                 "--output", str(run), "--model", str(model_dir), "--max-steps", "3",
                 "--batch-size", "4", "--prefix-length", "4", "--max-length", "64",
                 "--max-new-tokens", "8", "--validation-share", "0.4"])
    assert code == 0
    captured = capsys.readouterr()
    assert "empty target" in captured.err and "distinct inputs" in captured.err
    assert "BLEU" in captured.out and "bare model" in captured.out
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "generation" and config["labels"] == []
    assert config["run"]["template"] == "Input: {text}\nOutput:"
    assert config["data"]["validation_inputs"] == 2
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "eval"]
    assert evals and {"val_loss", "bleu", "rouge_l", "chrf"} <= set(evals[-1])

    assert main(["evaluate", str(run), str(pairs_csv), "--json", "--num-beams", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("bleu", "rouge_l", "chrf", "n"):
        assert key in report and key in report["baselines"]["bare_model"]
    assert report["n"] == 5  # distinct inputs, not rows
    assert report["decoding"]["num_beams"] == 3

    assert main(["predict", str(run), "--text", MRS[0], "--text", MRS[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2

    out = tmp_path / "gen.csv"
    assert main(["predict", str(run), "--csv", str(pairs_csv), "--output", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["input", "target", "generated"] and len(frame) == 16

    src, out = tmp_path / "cr.csv", tmp_path / "cr-gen.csv"  # an input holding a lone "\r"
    pd.DataFrame({"input": [MRS[0] + "\rnear[river]", MRS[1]]}).to_csv(src, index=False,
                                                                         lineterminator="\r\n")
    assert main(["predict", str(run), "--csv", str(src), "--output", str(out)]) == 0
    back = pd.read_csv(out, keep_default_na=False)  # (outputs may hold control characters)
    assert back["input"].tolist() == [MRS[0] + "\rnear[river]", MRS[1]] and len(back) == 2


def test_a_generation_run_without_an_input_column_is_refused(tmp_path, pairs_csv,
                                                            model_dir, capsys):
    code = main(["train", str(pairs_csv), "--target-column", "target", "--output",
                 str(tmp_path / "r"), "--model", str(model_dir)])
    assert code == 2
    assert "input column" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
