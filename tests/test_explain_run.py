"""Explain and describe on a trained run, on a tiny model: the CLI's `predict --explain` and
`inspect` print and write them, the workbench keeps them, the Playground's Explain handler
and the Inspect tab's handlers answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefixlab.cli.main import main
from prefixlab.engine.predict import score_labels
from prefixlab.runs.explanation import explain_text, tfidf_top_words
from prefixlab.runs.inspection import run_start
from prefixlab.ui import inspect_tab, playground_tab
from prefixlab.workbench import Workbench
from tests.test_cli import _train, csv_file  # noqa: F401 (a fixture)
from tests.test_inspect_tab import _trained_run

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def test_predict_explain_and_inspect_describe(tmp_path, csv_file, model_dir,  # noqa: F811
                                              capsys):
    run = tmp_path / "run"
    assert _train(csv_file, model_dir, run, "--init-text", "the movie", "--task",
                  "movie sentiment") == 0
    capsys.readouterr()
    assert main(["predict", str(run), "--text", "the movie was great", "--explain"]) == 0
    out = capsys.readouterr().out
    for row in ("trained prefix", "its start (before training)", "bare model (no prefix)"):
        assert row in out
    assert "great(" in out and "p(positive)=" in out
    assert main(["predict", str(run), "--run", str(run), "--text", "x", "--explain"]) == 2

    assert main(["inspect", str(run), "--output", str(tmp_path / "insp"), "--bank-size", "100",
                 "--knockout-rows", "0", "--explain-rows", "12"]) == 0
    out = capsys.readouterr().out
    described = json.loads((tmp_path / "insp" / "descriptions.json").read_text())
    assert {d["layers"] for d in described} >= {"all", "none (the start)"}
    assert "descriptions name the task or a label" in out
    words = json.loads((tmp_path / "insp" / "words.json").read_text())
    assert set(words["overlap"]) == {"positive", "negative", "neither"}
    assert all(0 <= v <= 1 for v in words["overlap"].values())
    assert "overlap" in out


def test_the_workbench_and_the_tabs_explain_a_run(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    rid = _trained_run(wb, tmp_path, model_dir, ("negative", "positive"), "e")
    run = wb.open(rid)
    ex = wb.explain(rid, "the movie was great 3")
    start = run_start(run).kv
    assert list(ex.probs) == ["prefix", "start", "bare"]
    for kv, enc, name in ((run.kv, run.encoder, "prefix"),
                          (start, run.encoder.without_prior(), "start"),
                          (None, run.encoder.without_prior(), "bare")):
        np.testing.assert_allclose(ex.probs[name], score_labels(
            run.loaded.model, kv, enc, ["the movie was great 3"])[0], atol=1e-5)
    assert wb.start_of(rid) is wb.start_of(rid)  # kept per prefix file

    frame, html = playground_tab.on_explain(wb, "the movie was great 3", rid)
    assert list(frame["value"]["reading"]) == ["trained prefix", "its start (before training)",
                                               "bare model (no prefix)"]
    assert html["value"].count('class="explain-word"') == 2 * 5
    assert "Leave one word out" in html["value"] and "supports" in html["value"]
    assert playground_tab.explanation_html(explain_text(run, start, "?!")).count(
        "no words") == 1

    note, table = inspect_tab.on_words(wb, rid, 12)
    assert "validation rows" in note and table["visible"]
    note, table = inspect_tab.on_describe(wb, rid)
    assert "descriptions name the task or a label" in note
    assert list(table["value"].columns) == ["layers kept", "prompt", "the model's continuation",
                                            "names"]
    assert wb.describe(rid) is wb.describe(rid)


def test_tfidf_top_words_per_label_binary_and_multiclass():
    texts = ["good fine", "good nice", "bad awful", "bad poor", "meh okay", "meh plain"] * 3
    labels = ["pos", "pos", "neg", "neg", "mid", "mid"] * 3
    top = tfidf_top_words(texts, labels, ["pos", "neg", "mid"], n=2)
    assert top["pos"][0] == "good" and top["neg"][0] == "bad" and top["mid"][0] == "meh"
    top = tfidf_top_words(texts[:4] * 3, labels[:4] * 3, ["pos", "neg"], n=1,
                          keep=lambda w: w != "good")
    assert top == {"pos": ["fine"] if top["pos"] == ["fine"] else ["nice"], "neg": ["bad"]}
