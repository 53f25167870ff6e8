"""Runs you can trust through the serving room, the Playground and the API: a generation run
answers in its template everywhere (unless raw text is asked for), runs of both kinds meet in
one request, and only finished runs answer (a cancelled one once its user keeps it)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from prefixlab.engine.decode import DecodeConfig
from prefixlab.engine.predict import generate
from prefixlab.engine.prefix import save_prefix, text_key_values
from prefixlab.errors import PrefixLabError
from prefixlab.runs.locks import RunLock
from prefixlab.ui import api, build_ui, playground_tab, runs_tab
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.test_app import model_dirs, served, write_reviews_csv  # noqa: F401
from tests.test_app_generation import MRS, write_pairs_csv

README = Path(__file__).resolve().parents[1] / "README.md"
MR = "name[The Eagle], eatType[coffee shop]"
REFUSED = (gr.Error, PrefixLabError)  # a handler's own error, or the core's (api.* unguarded)


def add_run(workbench: Workbench, name: str, state: str = "completed", *,
            csv: Path, target: str | None = None, words: str = "good great",
            decode: DecodeConfig | None = None) -> str:
    """A registered run in `state` with a prefix made from `words` (no training): a
    classification run, or a generation run when `target` names a column."""
    text_column = "mr" if target else "text"
    cfg = run_config(str(csv), text_column, None if target else "label",
                     {"prefix_length": 4, "validation_share": 0.35},
                     model=workbench.default_model, target_column=target)
    if decode is not None:
        cfg = replace(cfg, generation=decode)
    run_id = workbench.store.create(cfg, workbench.model_info(), name=name)
    loaded = workbench.model()
    folder = workbench.store.folder(run_id)
    save_prefix(folder.prefix_path, text_key_values(loaded.model, loaded.tokenizer, words, 4),
                loaded.name)
    folder.set_status(state, **({"error": "ValueError: boom"} if state == "failed" else {}))
    return run_id


@pytest.fixture(scope="module")
def bench(tmp_path_factory, model_dirs) -> tuple[Workbench, dict[str, str]]:  # noqa: F811
    """Two classification runs, a generation run (a stop string in its decoding) and runs
    left in every unfinished state."""
    tmp = tmp_path_factory.mktemp("served-runs")
    workbench = Workbench(tmp / "data", model=str(model_dirs["llama"]))
    reviews = write_reviews_csv(tmp / "reviews.csv")
    pairs = write_pairs_csv(tmp / "pairs.csv")
    ids = {
        "positive": add_run(workbench, "positive", csv=reviews, words="good great wonderful"),
        "negative": add_run(workbench, "negative", csv=reviews, words="bad awful terrible"),
        "writer": add_run(workbench, "writer", csv=pairs, target="ref", words="a place to eat",
                          decode=DecodeConfig(max_new_tokens=24, stop=["\n"])),
    }
    for state in ("running", "queued", "failed", "cancelled", "interrupted"):
        ids[state] = add_run(workbench, f"{state} run", state, csv=reviews)
    # A live worker holds its run's lock (else a refresh marks the run interrupted); this
    # one has written its prefix at step 3 of 10, a mid-training checkpoint.
    workers = [RunLock.claim(workbench.store.folder(ids[s]).path) for s in ("running", "queued")]
    workbench.store.folder(ids["running"]).append_metrics({"type": "step", "step": 3,
                                                            "total_steps": 10})
    workbench.refresh()
    yield workbench, ids
    for lock in workers:
        lock.close()


# --- item 2: a generation run's template applies on every path unless raw text is asked ------


def test_a_generation_run_writes_in_its_template_on_every_path(bench):
    workbench, ids = bench
    writer, inputs = ids["writer"], [MR, MRS[1]]
    side = workbench.generate_side_by_side(inputs, [writer], bare=False, max_new_tokens=12)
    templated = side["output"].tolist()
    run = workbench.open(writer)
    raw = generate(run.loaded.model, run.loaded.tokenizer, run.kv, inputs, 12)
    assert templated != raw  # otherwise this test could not tell the two apart
    rows = api.generate(workbench, inputs, [writer], 12)
    assert [r["generated"] for r in rows] == templated
    rows = api.generate(workbench, inputs, [writer], 12, raw=True)
    assert [r["generated"] for r in rows] == raw
    # The Playground's Generate box, and its "raw prompt" box.
    assert playground_tab.on_generate(workbench, MR, writer, 12, False, 1.0) == templated[0]
    assert playground_tab.on_generate(workbench, MR, writer, 12, False, 1.0, True) == raw[0]
    # The same request batched with a classifier's continuation: each row as alone.
    both = api.generate(workbench, [MR], [ids["positive"], writer], 12)
    positive = workbench.open(ids["positive"])
    assert [r["generated"] for r in both] == [
        generate(positive.loaded.model, positive.loaded.tokenizer, positive.kv, [MR], 12)[0],
        templated[0]]


def test_a_generation_run_in_beam_search_matches_side_by_side(bench):
    workbench, ids = bench
    side = workbench.generate_side_by_side([MR], [ids["writer"]], bare=False, max_new_tokens=8,
                                           num_beams=3)
    rows = api.generate(workbench, [MR], [ids["writer"]], 8, num_beams=3)
    assert [r["generated"] for r in rows] == side["output"].tolist()


def test_the_generate_endpoint_documents_raw():
    readme = README.read_text()
    assert "`raw: bool = False`" in readme
    assert "raw" in api.generate.__doc__


# --- item 3: the API with both kinds of run ----------------------------------------------------


def test_runs_say_each_runs_task_labels_and_whether_it_answers(bench):
    workbench, ids = bench
    rows = {r["id"]: r for r in api.runs(workbench)}
    assert (rows[ids["positive"]]["task"], rows[ids["positive"]]["labels"]) == \
        ("classify", ["negative", "positive"])
    assert (rows[ids["writer"]]["task"], rows[ids["writer"]]["labels"]) == ("generate", [])
    assert rows[ids["writer"]]["usable"] and rows[ids["positive"]]["usable"]
    assert not any(rows[ids[s]]["usable"] for s in ("running", "failed", "cancelled"))


def test_score_answers_the_classifiers_and_names_the_generation_runs_it_skipped(bench):
    workbench, ids = bench
    named = [ids["positive"], ids["writer"], ids["negative"]]
    rows = api.score(workbench, ["good", "bad"], named)
    answered = [r for r in rows if r["source"] != "skipped"]
    assert [(r["text"], r["run_id"]) for r in answered] == [
        ("good", ids["positive"]), ("bad", ids["positive"]),
        ("good", ids["negative"]), ("bad", ids["negative"])]
    alone = api.score(workbench, ["good", "bad"], [ids["positive"], ids["negative"]])
    assert answered == alone
    [skipped] = [r for r in rows if r["source"] == "skipped"]
    assert skipped["run_id"] == ids["writer"]
    assert "'writer'" in skipped["error"] and "generates text" in skipped["error"]
    with pytest.raises(REFUSED, match=r"no run named classifies: run 'writer' .* generates"):
        api.score(workbench, ["good"], [ids["writer"]])


def test_predict_csv_takes_a_generation_run_beside_a_classifier(bench, tmp_path):
    workbench, ids = bench
    csv = tmp_path / "in.csv"
    csv.write_text("text,gold\nthe movie was great,positive\nbad film,negative\n")
    result = workbench.predict_csv([ids["writer"], ids["positive"]], csv)
    out = pd.read_csv(result.path, keep_default_na=False)
    assert list(out.columns) == ["text", "gold", "writer: generated",
                                 "positive: predicted_label", "positive: p_negative",
                                 "positive: p_positive"]
    writer = workbench.open(ids["writer"])
    assert out["writer: generated"].tolist() == writer.generate(list(out["text"]))
    assert result.label_column == "gold" and set(result.reports) == {"positive"}
    single = pd.read_csv(workbench.predict_csv(ids["positive"], csv).path)
    assert single["p_positive"].round(4).tolist() == out["positive: p_positive"].round(4).tolist()


@pytest.mark.slow
def test_the_readme_api_snippet_runs_as_written(bench, tmp_path, monkeypatch):
    """README's gradio_client snippet, run as it stands, against an app holding runs of both
    kinds (and unfinished ones, which the snippet must leave out)."""
    workbench, ids = bench
    block = re.search(r"With `gradio_client`.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README's API section has no gradio_client snippet"
    snippet = block.group(1)
    assert 'Client("http://127.0.0.1:7860/")' in snippet
    (tmp_path / "in.csv").write_text("text\nthe movie was great\nbad film\n")
    monkeypatch.chdir(tmp_path)
    with served(workbench, tmp_path) as url:
        scope: dict = {}
        exec(compile(snippet.replace("http://127.0.0.1:7860/", url), "README.md", "exec"),
             scope)
    for name in ("scores", "written", "predicted"):
        assert scope.get(name), f"the snippet no longer sets {name}"
    assert {r["run_id"] for r in scope["scores"]} == {ids["positive"], ids["negative"]}
    assert {r["run_id"] for r in scope["written"]} == {ids["writer"]}
    assert "negative: predicted_label" in pd.read_csv(scope["predicted"]).columns


# --- item 4: only finished runs answer -----------------------------------------------------------


@pytest.mark.parametrize("state", ["running", "queued", "failed", "cancelled", "interrupted"])
def test_an_unfinished_run_is_refused_by_name_and_state_on_every_path(bench, state, tmp_path):
    workbench, ids = bench
    run_id, name = ids[state], f"{state} run"
    said = re.escape(f"run '{name}' ({run_id}) is {state}")
    csv = tmp_path / "in.csv"
    csv.write_text("text\nthe movie was great\n")
    calls = [lambda: api.score(workbench, ["good"], [ids["positive"], run_id]),
             lambda: api.generate(workbench, ["the movie"], [run_id], 3),
             lambda: api.predict_csv(workbench, {"path": str(csv), "orig_name": "in.csv"},
                                     [run_id]),
             lambda: playground_tab.on_says_what(workbench, "the movie", [run_id], 2),
             lambda: workbench.evaluate_csv(run_id, csv)]
    for call in calls:
        with pytest.raises(REFUSED, match=said):
            call()
    with pytest.raises(LookupError, match="only completed runs are served"):
        workbench.serving().store.get(run_id)
    assert [r["state"] for r in api.runs(workbench, run_id)] == [state]  # still, after all that


def test_a_running_run_says_how_far_it_is(bench):
    workbench, ids = bench
    with pytest.raises(REFUSED, match=r"is running \(step 3 of 10\): only completed runs are "
                                      r"served; wait until it completes"):
        api.generate(workbench, ["the movie"], [ids["running"]], 3)


def test_the_playground_offers_only_runs_that_answer(bench):
    workbench, ids = bench
    scoring, prefix, batch, what, writing = (
        [c if isinstance(c, str) else c[1] for c in u["choices"]]
        for u in playground_tab.refresh_choices(workbench))
    assert set(scoring) == set(what) == {ids["negative"], ids["positive"]}
    assert writing == [ids["writer"]]
    assert set(batch) == {ids["positive"], ids["negative"], ids["writer"]}
    assert set(prefix) == {playground_tab.NO_PREFIX, *batch}
    said = playground_tab.on_says_what(workbench, "the movie", [], 2)["value"]
    assert set(said["run"]) == {"positive", "negative"}


def test_a_cancelled_run_answers_once_its_user_keeps_its_prefix(tmp_path, model_dirs):  # noqa: F811
    workbench = Workbench(tmp_path / "data", model=str(model_dirs["llama"]))
    reviews = write_reviews_csv(tmp_path / "reviews.csv")
    done = add_run(workbench, "done", csv=reviews)
    stopped = add_run(workbench, "stopped", "cancelled", csv=reviews, words="bad awful")
    running = add_run(workbench, "training", "running", csv=reviews)
    with pytest.raises(REFUSED, match="is cancelled.*keep it"):
        api.score(workbench, ["good"], [stopped])
    with pytest.raises(REFUSED, match="only a cancelled run's prefix is kept"):
        runs_tab.keep(workbench, running)
    assert "Kept the prefix **stopped**" in runs_tab.keep(workbench, stopped)
    [row] = api.runs(workbench, stopped)
    assert row["state"] == "cancelled" and row["usable"]
    assert {r["run_id"] for r in api.score(workbench, ["good"], [done, stopped])} == \
        {done, stopped}
    assert stopped in [c[1] for c in playground_tab.refresh_choices(workbench)[0]["choices"]]
    # A newer prefix (the run resumed, then cancelled again) is not kept without asking.
    folder = workbench.store.folder(stopped)
    loaded = workbench.model()
    save_prefix(folder.prefix_path, text_key_values(loaded.model, loaded.tokenizer, "new", 4),
                loaded.name)
    with pytest.raises(REFUSED, match="is cancelled"):
        api.score(workbench, ["good"], [stopped])


def test_a_served_run_that_starts_again_stops_answering(tmp_path, model_dirs):  # noqa: F811
    """The store holds prefixes in memory: the state is read on every request, not only on
    the first load."""
    workbench = Workbench(tmp_path / "data", model=str(model_dirs["llama"]))
    run_id = add_run(workbench, "resumed", csv=write_reviews_csv(tmp_path / "reviews.csv"))
    assert api.score(workbench, ["good"], [run_id])
    workbench.store.folder(run_id).set_status("running")  # resumed: training again
    with pytest.raises(REFUSED, match=re.escape(f"run 'resumed' ({run_id}) is running")):
        api.score(workbench, ["good"], [run_id])


def test_the_app_wires_the_keep_button_and_the_raw_box(bench):
    demo = build_ui(bench[0])
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"run-keep", "gen-raw"} <= ids
    params = demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    assert params[-1]["parameter_name"] == "raw" and params[-1]["parameter_default"] is False
