"""A readable prompt: the PEZ search finds a text that decides as a prefix made of a text's
key/values does, and a run's readable prompt is written as readable_prompt.json (library and
CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.mixed import ScoreItem, mixed_score_labels
from prefixlab.engine.prefix import text_key_values
from prefixlab.interpret.readable import (
    SearchConfig,
    agreement,
    biased,
    fit_bias,
    fit_length,
    score_prompt,
    search_prompt,
)
from tests.conftest import TEXTS

LABELS = ["negative", "positive"]
HIDDEN = "bad awful terrible horrible"  # the text the prefix is made of


def test_fit_length_repeats_or_cuts():
    assert fit_length([1, 2], 5) == [1, 2, 1, 2, 1]
    assert fit_length([1, 2, 3], 2) == [1, 2]


def test_a_prefix_that_is_a_text_is_matched_by_a_text_prompt(loaded):
    tok = loaded.tokenizer
    enc = Encoder(tok, Template(), LABELS, 64)
    ids = tok(HIDDEN, add_special_tokens=False)["input_ids"]
    kv = text_key_values(loaded.model, tok, HIDDEN, len(ids))  # (L, 2, H, N, D)
    target = np.stack(mixed_score_labels(loaded.model, [ScoreItem(kv, enc, t) for t in TEXTS]))
    # The text itself, read as a prompt, decides exactly as the prefix made of it.
    np.testing.assert_allclose(score_prompt(loaded.model, enc, HIDDEN, TEXTS), target,
                               atol=1e-5)
    start = tok("the movie was great", add_special_tokens=False)["input_ids"]
    found = search_prompt(loaded.model, enc, TEXTS, target, fit_length(start, len(ids)),
                          SearchConfig(steps=30, batch_size=6, lr=0.3))
    assert found.steps == 30 and len(found.history) == 30
    assert found.best.agreement == 1.0
    assert agreement(biased(found.best.probs, found.best.bias), target) == 1.0
    assert len(found.best.ids) == len(ids)


def test_the_search_reads_the_prefix_only_on_the_rows_it_draws(loaded):
    tok = loaded.tokenizer
    enc = Encoder(tok, Template(), LABELS, 64)
    ids = tok(HIDDEN, add_special_tokens=False)["input_ids"]
    kv = text_key_values(loaded.model, tok, HIDDEN, len(ids))
    texts = [f"{t} {i}" for i in range(3) for t in TEXTS]
    read: list[str] = []

    def decide(rows: list[str]) -> np.ndarray:
        read.extend(rows)
        return np.stack(mixed_score_labels(loaded.model, [ScoreItem(kv, enc, t) for t in rows]))

    cfg = SearchConfig(steps=2, batch_size=3, rescore_rows=4)
    lazy = search_prompt(loaded.model, enc, texts, decide, ids, cfg)
    assert len(read) == len(set(read)) <= 2 * 3 + 4 < len(texts)  # each drawn row read once
    full = search_prompt(loaded.model, enc, texts, decide(texts), ids, cfg)
    assert lazy.best.ids == full.best.ids
    # the targets were read in other batches: the same up to float noise
    assert lazy.history == pytest.approx(full.history, rel=1e-3, abs=1e-6)


def test_the_fitted_label_bias_recovers_a_known_offset():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3))
    offset = np.array([1.0, -0.5, -0.5])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    target = biased(probs, offset)
    np.testing.assert_allclose(fit_bias(probs, target), offset, atol=1e-4)
    # a prompt that ranks the rows right but always picks one label agrees once offset
    skewed = biased(target, np.array([5.0, 0.0, 0.0]))
    assert agreement(skewed, target) < 0.8  # every row is label 0: the 73% that are
    assert agreement(biased(skewed, fit_bias(skewed, target)), target) == 1.0


def test_search_settings_are_checked():
    from prefixlab.interpret.frame import InterpretError

    with pytest.raises(InterpretError, match="steps"):
        SearchConfig(steps=-1)
    with pytest.raises(InterpretError, match="seconds"):
        SearchConfig(seconds=0)


def test_the_cli_writes_readable_prompt_json(tmp_path, model_dir, monkeypatch):
    from prefixlab.cli.main import main
    from prefixlab.engine.models import load_model
    from prefixlab.runs.experiment import execute_run, prepare_data
    from prefixlab.runs.folder import RunFolder
    from tests.test_runs import _config

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(
        f"the movie was {'great' if i % 2 else 'bad'} {i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(24)))
    cfg = _config(csv, model_dir)
    folder = RunFolder(tmp_path / "run")
    from prefixlab.runs.experiment import create_run

    loaded = load_model(str(model_dir), "cpu")
    create_run(cfg, folder.path, prepare_data(cfg), loaded)
    execute_run(folder, loaded)
    out = tmp_path / "inspected"
    code = main(["inspect", str(folder.path), "--output", str(out), "--knockout-rows", "0",
                 "--no-describe", "--readable-prompt", "--readable-tokens", "4",
                 "--readable-steps", "3"])
    assert code == 0
    found = json.loads((out / "readable_prompt.json").read_text())
    assert {"text", "tokens", "agreement", "macro_f1", "seconds", "baselines"} <= set(found)
    assert len(found["tokens"]) == 4 and "".join(found["tokens"]) == found["text"]
    assert set(found["baselines"]) == {"start_text", "nearest_tokens"}
    for reading in found["baselines"].values():
        assert set(reading) == {"text", "agreement", "macro_f1", "label_bias", "without_bias"}
        assert set(reading["without_bias"]) == {"agreement", "macro_f1"}
        assert 0.0 <= reading["agreement"] <= 1.0 and 0.0 <= reading["macro_f1"] <= 1.0
    assert 0.0 <= found["agreement"] <= 1.0


def test_the_inspect_tab_finds_a_readable_prompt_through_the_workbench(tmp_path, model_dir,
                                                                       monkeypatch):
    from prefixlab.runs.experiment import execute_run
    from prefixlab.runs.readable import READABLE_FILE
    from prefixlab.ui import inspect_tab
    from prefixlab.workbench import Workbench
    from tests.test_runs import _config

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(
        f"the movie was {'great' if i % 2 else 'bad'} {i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(24)))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    rid = wb.store.create(_config(csv, model_dir), wb.model_info(str(model_dir)))
    execute_run(wb.folder(rid), wb.model(str(model_dir)))
    wb.store.refresh()
    said: list[str] = []
    note, table = inspect_tab.on_readable(wb, rid, 4, 3, 60,
                                          progress=lambda f, desc=None: said.append(desc))
    assert "readable_prompt.json" in note and said
    frame = table["value"]
    assert list(frame["prompt"]) == ["readable prompt", "start text", "nearest tokens"]
    assert (wb.folder(rid).path / READABLE_FILE).is_file()
    assert wb.readable_prompt(rid, 4, 3) is wb.readable_prompt(rid, 4, 3)  # kept
