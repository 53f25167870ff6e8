"""The public API as a contract, and serving many runs' prefixes through the workbench:
exactly the documented endpoints, mixed batches for the Playground, several runs per CSV,
concurrent HTTP clients naming different runs."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from prefixlab.engine.predict import generate, score_labels
from prefixlab.engine.prefix import save_prefix, text_key_values
from prefixlab.ui import build_ui
from prefixlab.ui.api import PUBLIC_ENDPOINTS, build_api
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.test_app import handler, model_dirs, served, write_reviews_csv  # noqa: F401

INITS = [("good great wonderful", 4), ("bad awful terrible", 7), ("hello world", 5)]


@pytest.fixture
def many_runs(tmp_path, model_dirs) -> tuple[Workbench, list[str]]:  # noqa: F811
    """A workbench with three finished runs whose prefixes differ in text and length."""
    workbench = Workbench(tmp_path / "data", model=str(model_dirs["llama"]))
    csv = write_reviews_csv(tmp_path / "reviews.csv")
    loaded = workbench.model()
    ids = []
    for i, (text, length) in enumerate(INITS):
        cfg = run_config(str(csv), "text", "label", {"prefix_length": length},
                         model=workbench.default_model)
        run_id = workbench.store.create(cfg, workbench.model_info(), name=f"run{i}")
        folder = workbench.store.folder(run_id)
        kv = text_key_values(loaded.model, loaded.tokenizer, text, length)
        save_prefix(folder.prefix_path, kv, loaded.name)
        folder.set_status("completed")
        ids.append(run_id)
    workbench.refresh()
    return workbench, ids


def _endpoints(demo) -> set[str]:
    info = demo.get_api_info()
    assert not info.get("unnamed_endpoints")
    return {name.lstrip("/") for name in info["named_endpoints"]}


def test_the_app_lists_exactly_the_documented_endpoints(many_runs):
    workbench, _ = many_runs
    assert _endpoints(build_ui(workbench)) == set(PUBLIC_ENDPOINTS)
    assert _endpoints(build_api(workbench)) == set(PUBLIC_ENDPOINTS)


def test_every_documented_endpoint_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in PUBLIC_ENDPOINTS:
        assert f'api_name="/{name}"' in readme and f"/gradio_api/call/{name}" in readme


def test_every_bound_is_in_the_readme_with_its_default():
    from dataclasses import fields

    from prefixlab.serve.limits import Limits, env_name

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for f in fields(Limits):
        default = getattr(Limits(), f.name)
        assert f"| `{env_name(f.name)}` | {default:g} |" in readme, f.name


def test_readmes_plain_http_examples_run_as_written(many_runs, tmp_path):
    """Each curl body in README, its run ids filled in, is answered (not "needed: 8, got:
    3", as /generate once was)."""
    import re

    workbench, ids = many_runs
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    calls = re.findall(r"gradio_api/call/(\w+) -H 'Content-Type: application/json' \\\n"
                       r"\s+-d '(\{.*?\})'", readme)
    assert {name for name, _ in calls} == {"runs", "score", "generate"}
    with served(workbench, tmp_path) as url:
        for name, body in calls:
            body = body.replace("RUN_ID_1", ids[0]).replace("RUN_ID_2", ids[1])
            post = urllib.request.Request(f"{url}gradio_api/call/{name}", data=body.encode(),
                                          headers={"Content-Type": "application/json"})
            event = json.load(urllib.request.urlopen(post, timeout=60))["event_id"]
            stream = urllib.request.urlopen(f"{url}gradio_api/call/{name}/{event}", timeout=60)
            lines = stream.read().decode().splitlines()
            assert "event: complete" in lines, (name, lines)


def test_compare_scores_every_run_like_each_alone(many_runs):
    workbench, ids = many_runs
    texts = ["the movie was great", "bad film"]
    frame = workbench.compare(texts, ids, bare=False)
    for run_id in ids:
        run = workbench.open(run_id)
        want = score_labels(run.loaded.model, run.kv, run.encoder, texts)
        got = frame[frame["source"] == f"prefix: {workbench.store.get(run_id).name}"]
        cols = [f"p({lab})" for lab in run.labels]
        assert got[cols].to_numpy() == pytest.approx(want, abs=1e-4)


def test_which_prefix_says_what(many_runs):
    workbench, ids = many_runs
    frame = workbench.says_what("the movie", ids, max_new_tokens=4)
    assert list(frame["run"]) == ["run0", "run1", "run2"]
    for run_id, continuation in zip(ids, frame["continuation"], strict=True):
        run = workbench.open(run_id)
        assert continuation == generate(run.loaded.model, run.loaded.tokenizer, run.kv,
                                        ["the movie"], 4)[0]
    shown, notice = handler(build_ui(workbench), "what-run", "click")("the movie", [], 3)
    assert notice == "" and shown["visible"]
    assert len(shown["value"]) == 3 and "id" not in shown["value"].columns  # all runs


def test_sampled_generation_through_the_api_handler_is_seeded_per_request(many_runs):
    """/generate with do_sample: the seed gives the same text alone as in the batch the
    handler makes for several runs; another seed, other texts."""
    import gradio as gr

    from prefixlab.engine.decode import Sampling
    from prefixlab.ui.api import register

    workbench, ids = many_runs
    with gr.Blocks() as demo:
        register(workbench)
    fn = next(f.fn for f in demo.fns.values() if f.api_name == "generate")
    rows = fn(["the movie", "a film"], ids, 6, True, 1.4, 1.0, 9, 1)
    assert len(rows) == 6
    for row in rows:
        run = workbench.open(row["run_id"])
        j = ["the movie", "a film"].index(row["prompt"])
        alone = generate(run.loaded.model, run.loaded.tokenizer, run.kv, [row["prompt"]], 6,
                         do_sample=True, temperature=1.4, seed=Sampling(9).for_row(j).seed)
        assert row["generated"] == alone[0]
    again = fn(["the movie", "a film"], ids, 6, True, 1.4, 1.0, 9, 1)
    other = fn(["the movie", "a film"], ids, 6, True, 1.4, 1.0, 10, 1)
    assert again == rows and other != rows
    with pytest.raises(gr.Error, match="temperature"):
        fn(["the movie"], ids[:1], 6, True, 0.0, 1.0, 9, 1)


def test_batch_prediction_with_several_runs_writes_a_column_group_each(many_runs, tmp_path):
    workbench, ids = many_runs
    csv = tmp_path / "in.csv"
    csv.write_text("text,id,gold\nthe movie was great,1,positive\nbad film,2,negative\n")
    result = workbench.predict_csv(ids, csv)
    out = pd.read_csv(result.path)
    assert list(out["id"]) == [1, 2]
    for i in range(3):
        assert {f"run{i}: predicted_label", f"run{i}: p_positive",
                f"run{i}: p_negative"} <= set(out.columns)
    assert result.label_column == "gold" and set(result.reports) == {"run0", "run1", "run2"}
    single = workbench.predict_csv(ids[0], csv)
    assert pd.read_csv(single.path)["p_positive"].round(4).tolist() == \
        out["run0: p_positive"].round(4).tolist()
    assert single.report["accuracy"] == result.reports["run0"]["accuracy"]
    path, message, notice = handler(build_ui(workbench), "batch-run", "click")(str(csv), ids)
    assert notice == "" and "- **run2**: macro-F1" in message and Path(path).is_file()


@pytest.mark.slow
def test_concurrent_http_clients_naming_different_runs(many_runs, tmp_path):
    from gradio_client import Client, handle_file

    workbench, ids = many_runs
    with served(workbench, tmp_path) as url:
        client = Client(url, verbose=False)
        assert set(client.view_api(return_format="dict", print_info=False)["named_endpoints"]
                   ) == {f"/{e}" for e in PUBLIC_ENDPOINTS}
        results, errors = {}, []

        def call(i: int) -> None:
            try:
                c = Client(url, verbose=False)
                if i % 2:
                    results[i] = c.predict(["the movie"], [ids[i % 3]], 3, api_name="/generate")
                else:
                    results[i] = c.predict(["good", "bad"], [ids[i % 3]], api_name="/score")
            except Exception as e:  # re-raised below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not errors and len(results) == 6
        for i, got in results.items():
            run = workbench.open(ids[i % 3])
            if i % 2:
                want = generate(run.loaded.model, run.loaded.tokenizer, run.kv, ["the movie"], 3)
                assert [r["generated"] for r in got] == want
            else:
                want = score_labels(run.loaded.model, run.kv, run.encoder, ["good", "bad"])
                col = run.labels.index("positive")
                assert [r["p(positive)"] for r in got] == pytest.approx(want[:, col], abs=1e-3)
        csv = tmp_path / "in.csv"
        csv.write_text("text\nthe movie was great\n")
        path = client.predict(handle_file(str(csv)), ids[:2], "", api_name="/predict_csv")
        assert "run1: predicted_label" in pd.read_csv(path).columns
        with pytest.raises(Exception, match="no prefix|no run"):
            client.predict(["good"], ["20990101-000000-missing"], api_name="/score")
        # Plain HTTP, as README shows with curl.
        body = json.dumps({"data": [["good"], [ids[0]], False]}).encode()
        post = urllib.request.Request(f"{url}gradio_api/call/score", data=body,
                                      headers={"Content-Type": "application/json"})
        event = json.load(urllib.request.urlopen(post, timeout=60))["event_id"]
        stream = urllib.request.urlopen(f"{url}gradio_api/call/score/{event}", timeout=60)
        lines = stream.read().decode().splitlines()
        assert "event: complete" in lines
        [row] = json.loads(lines[lines.index("event: complete") + 1][len("data: "):])[0]
        assert row["text"] == "good" and row["source"] == "prefix: run0"
