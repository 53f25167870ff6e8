"""The app without a browser: the Workbench service, app.py's access rules, and the UI's
handlers called directly, on tiny models saved as local folders (no worker process here).

Also holds the helpers the browser and load tests share: saving a tiny model folder, writing
a small labeled CSV and serving the app on a free port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pytest  # noqa: E402

import app  # noqa: E402
from prefixlab.data.reading import DataError  # noqa: E402
from prefixlab.runs.experiment import execute_run  # noqa: E402
from prefixlab.runs.folder import RunError  # noqa: E402
from prefixlab.runs.presets import PRESETS, SETTING_NAMES  # noqa: E402
from prefixlab.ui import CSS, build_ui  # noqa: E402
from prefixlab.ui.api import launch  # noqa: E402
from prefixlab.ui.common import guard  # noqa: E402
from prefixlab.ui.data_tab import NO_TARGET, describe  # noqa: E402
from prefixlab.workbench import Workbench  # noqa: E402
from prefixlab.workbench.datasets import EXAMPLE_CSV  # noqa: E402
from prefixlab.workbench.runs import run_config  # noqa: E402
from tests.conftest import save_tiny_model  # noqa: E402

BAD_INPUTS = Path(__file__).parent / "bad_inputs"
RUNS_COLUMNS = ["name", "status", "progress", "data", "base model", "macro-F1", "accuracy",
                "prefix size", "model size", "processes", "created", "id"]


# --- helpers shared with test_browser.py and test_load.py ----------------------------------


def write_reviews_csv(path: Path, rows: int = 40) -> Path:
    """`rows` short reviews, two labels that the words give away (the tiny tokenizer knows
    'positive' and 'negative' as single tokens)."""
    lines = ["text,label"] + [
        f"the movie was {'great' if i % 2 else 'bad'} {i},{'positive' if i % 2 else 'negative'}"
        for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_run(workbench: Workbench, run_id: str, done, timeout: float = 120.0):
    """Poll the registry until done(row); a failed or interrupted run fails at once."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        workbench.store.refresh()
        row = workbench.store.get(run_id)
        if done(row):
            return row
        if row.state in ("failed", "interrupted"):
            raise AssertionError(f"run {row.name} {row.state}: {row.error}")
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} is still {workbench.store.get(run_id).state}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(workbench: Workbench, tmp: Path) -> Iterator[str]:
    """Serve the app as `python app.py` does, offline, with Gradio's uploads under `tmp`;
    yields its URL. Workers still running at the end are killed (they are ours)."""
    (tmp / "gradio").mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
        demo = build_ui(workbench)
        workbench.warm_up()
        port = free_port()
        launch(demo, workbench, "127.0.0.1", port, None, css=CSS, prevent_thread_lock=True,
               quiet=True, allowed_paths=[str(workbench.exports_dir), str(workbench.uploads_dir)])
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()
            for row in workbench.runs():
                if row.state in ("queued", "running"):
                    workbench.store.kill(row.id)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return {kind: save_tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), kind)
            for kind in ("gpt2", "llama")}


@pytest.fixture
def workbench(tmp_path, model_dirs) -> Workbench:
    return Workbench(tmp_path / "data", model=str(model_dirs["llama"]))


@pytest.fixture
def reviews(tmp_path) -> Path:
    return write_reviews_csv(tmp_path / "reviews.csv")


def handler(demo: gr.Blocks, elem_id: str, event: str):
    """The function wired to `event` of the component with this elem_id."""
    ids = {i for i, b in demo.blocks.items() if getattr(b, "elem_id", None) == elem_id}
    found = [f.fn for f in demo.fns.values() if any(t[0] in ids and t[1] == event
                                                    for t in f.targets)]
    assert len(found) == 1, f"{len(found)} handlers for {elem_id}.{event}"
    return found[0]


def api_fn(demo: gr.Blocks, api_name: str):
    found = [f.fn for f in demo.fns.values() if f.api_name == api_name]
    assert len(found) == 1, f"no API endpoint {api_name!r}"
    return found[0]


# --- Workbench -------------------------------------------------------------------------------


def test_preview_guesses_the_columns_of_the_bundled_example(workbench):
    info = workbench.preview_csv(EXAMPLE_CSV)
    assert info.columns == ["text", "label"]
    assert (info.text_column, info.label_column) == ("text", "label")
    assert info.rows == 54 and len(info.frame) == 20
    assert set(info.frame["label"]) <= {"praise", "complaint", "question"}


def test_check_columns_refuses_a_bad_file_with_the_specific_problem(workbench):
    with pytest.raises(DataError, match="only one distinct label"):
        workbench.check_columns(BAD_INPUTS / "single_label.csv", "text", "label")
    with pytest.raises(DataError, match="no label column named 'nope'"):
        workbench.check_columns(EXAMPLE_CSV, "text", "nope")
    with pytest.raises(DataError, match="PNG image"):
        workbench.preview_csv(BAD_INPUTS / "image.csv")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("length", [1, 8])
def test_prefix_size_is_layers_x_2_x_kv_heads_x_length_x_head_dim(tmp_path, model_dirs, kind,
                                                                   length):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = model_dirs[kind]
    wb = Workbench(tmp_path / "data", model=str(folder))
    c = AutoConfig.from_pretrained(folder)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    expected = (c.num_hidden_layers * 2 * kv_heads * length
                * (c.hidden_size // c.num_attention_heads))
    size = wb.prefix_size({"prefix_length": length, "reparameterize": False})
    model_parameters = AutoModelForCausalLM.from_pretrained(folder).num_parameters()
    assert size["trainable"] == expected
    assert size["file_bytes"] == 4 * expected  # float32
    assert size["model_parameters"] == model_parameters
    assert size["share"] == pytest.approx(expected / model_parameters)
    # The MLP trains more parameters, but folds into the same file.
    mlp = wb.prefix_size({"prefix_length": length, "reparameterize": True})
    assert mlp["trainable"] > expected and mlp["file_bytes"] == size["file_bytes"]


def test_runs_table_has_its_columns_when_empty_and_a_row_per_run(workbench, reviews):
    empty = workbench.runs_table()
    assert list(empty.columns) == RUNS_COLUMNS and len(empty) == 0
    cfg = run_config(str(reviews), "text", "label", {}, model=workbench.default_model)
    run_id = workbench.store.create(cfg, workbench.model_info(), name="first",
                                    data_name="reviews.csv")
    table = workbench.runs_table()
    assert list(table.columns) == RUNS_COLUMNS
    row = table.iloc[0].to_dict()
    assert row["id"] == run_id and row["name"] == "first" and row["status"] == "created"
    assert row["data"] == "reviews.csv" and row["base model"] == workbench.default_model
    assert row["progress"] == "" and row["prefix size"] == "" and row["processes"] == ""


def test_the_runs_table_has_a_width_for_every_column_and_the_id_the_widest():
    """The widths were one short once a column was added: the id column was cut off."""
    from prefixlab.ui.runs_tab import RUNS_COLUMN_WIDTHS

    assert len(RUNS_COLUMN_WIDTHS) == len(RUNS_COLUMNS)
    assert sum(int(w[:-1]) for w in RUNS_COLUMN_WIDTHS) == 100
    assert max(RUNS_COLUMN_WIDTHS, key=lambda w: int(w[:-1])) == RUNS_COLUMN_WIDTHS[-1]


def test_pollers_share_one_registry_refresh(workbench, reviews, monkeypatch):
    from prefixlab.workbench import runs as workbench_runs

    refreshes = []
    refresh = workbench.store.refresh
    monkeypatch.setattr(workbench.store, "refresh", lambda: refreshes.append(1) or refresh())
    assert workbench.runs() == [] and len(refreshes) == 1
    cfg = run_config(str(reviews), "text", "label", {}, model=workbench.default_model)
    run_id = workbench.store.create(cfg, workbench.model_info(), name="new")
    # Within the interval the registry is read, not refreshed; a new run is there at once.
    assert [r.id for r in workbench.runs()] == [run_id] and len(refreshes) == 1
    monkeypatch.setattr(workbench_runs, "REFRESH_INTERVAL_S", 0.0)
    workbench.runs()
    assert len(refreshes) == 2


def test_a_run_started_while_others_poll_is_registered_once(workbench, reviews, monkeypatch):
    """A refresh used to adopt the half-written folder: the registry insert then failed."""
    monkeypatch.setattr(workbench.store, "start", lambda run_id: None)  # no worker here
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            workbench.refresh()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        ids = [workbench.start_run(run_config(str(reviews), "text", "label", {},
                                              model=workbench.default_model), name=f"run {i}")
               for i in range(10)]
    finally:
        stop.set()
        poller.join()
    assert sorted(r.id for r in workbench.store.list()) == sorted(ids)


def test_a_start_reads_the_csv_once(workbench, reviews, monkeypatch):
    """Start checks the data and creates the run from the same parse."""
    from prefixlab.runs import experiment

    monkeypatch.setattr(workbench.store, "start", lambda run_id: None)  # no worker here
    reads = []
    load = experiment.load_labeled_csv
    monkeypatch.setattr(experiment, "load_labeled_csv",
                        lambda *a, **k: reads.append(a) or load(*a, **k))
    cfg = run_config(str(reviews), "text", "label", {}, model=workbench.default_model)
    run_id = workbench.start_run(cfg, name="once")
    assert len(reads) == 1 and workbench.store.get(run_id).name == "once"


# --- app.py: who may connect -----------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    for name in ("PREFIXLAB_HOST", "PREFIXLAB_AUTH", "PREFIXLAB_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_local_host_needs_no_login(no_env):
    assert app.access(app.parse_args([])) is None
    assert app.access(app.parse_args(["--host", "localhost"])) is None


def test_listening_beyond_this_machine_without_auth_is_refused(no_env, capsys):
    with pytest.raises(SystemExit) as e:
        app.access(app.parse_args(["--host", "0.0.0.0"]))
    said = capsys.readouterr().err
    assert e.value.code == 2 and "--auth" in said and "0.0.0.0" in said


def test_share_without_auth_is_refused(no_env, capsys):
    with pytest.raises(SystemExit) as e:
        app.access(app.parse_args(["--share"]))
    said = capsys.readouterr().err
    assert e.value.code == 2 and "--auth" in said and "share link" in said


def test_auth_gives_the_credentials(no_env, monkeypatch):
    assert app.access(app.parse_args(["--host", "0.0.0.0", "--auth", "u:p"])) == ("u", "p")
    assert app.access(app.parse_args(["--share", "--auth", "u:p:q"])) == ("u", "p:q")
    monkeypatch.setenv("PREFIXLAB_AUTH", "env:secret")
    assert app.access(app.parse_args(["--host", "0.0.0.0"])) == ("env", "secret")


@pytest.mark.parametrize("auth", ["u", "u:", ":p", ":"])
def test_malformed_auth_is_refused(no_env, auth, capsys):
    with pytest.raises(SystemExit) as e:
        app.access(app.parse_args(["--host", "0.0.0.0", "--auth", auth]))
    assert e.value.code == 2 and "user:password" in capsys.readouterr().err


# --- the UI's shared error handling ----------------------------------------------------------


def test_guard_turns_a_data_error_into_the_same_message():
    error = DataError(["row 3: empty text", "row 5: empty label"], "x.csv")

    @guard
    def fails():
        raise error

    with pytest.raises(gr.Error) as e:
        fails()
    assert e.value.message == str(error)
    assert "row 3: empty text" in e.value.message and "row 5" in e.value.message


def test_guard_names_an_unexpected_error_without_a_traceback(caplog):
    @guard
    def breaks():
        raise ZeroDivisionError("division by zero")

    with pytest.raises(gr.Error) as e:
        breaks()
    assert e.value.message.startswith("Something went wrong")
    assert "ZeroDivisionError" in e.value.message and "Traceback" not in e.value.message
    assert "breaks failed" in caplog.text  # the traceback goes to the log instead


def test_guard_passes_a_gr_error_through_and_keeps_the_name():
    @guard
    def refuses():
        raise gr.Error("Pick a run first.")

    with pytest.raises(gr.Error, match="Pick a run first."):
        refuses()
    assert refuses.__name__ == "refuses"


# --- the tabs' handlers, called as Gradio would ----------------------------------------------


def test_describe_lists_the_problems_of_a_bad_label_column(workbench, tmp_path):
    path = tmp_path / "sources.csv"
    path.write_text("text,label,source\n" + "".join(
        f"text number {i},{'a' if i % 2 else 'b'},web\n" for i in range(10)))
    message, chart = describe(workbench, str(path), "text", "source")
    assert message.startswith("**This file cannot be used yet:**")
    assert "- the label column 'source' has only one distinct label, 'web'" in message
    assert chart is None
    message, chart = describe(workbench, str(path), "text", "label")
    assert message.startswith("**10 usable rows**, 2 labels") and chart is not None


@pytest.fixture
def demo(workbench) -> gr.Blocks:
    return build_ui(workbench)


def quick(**changes) -> list:
    """The Train tab's settings inputs, in order: the Quick look preset with `changes`."""
    return [{**PRESETS["Quick look"], **changes}[k] for k in SETTING_NAMES]


def value(update):
    """The value a handler's output sets, whether plain or a gr.update(...)."""
    return update["value"] if isinstance(update, dict) and "__type__" in update else update


def test_the_example_button_fills_state_columns_preview_and_chart(demo):
    (state, message, text_col, label_col, target_col, preview, chart, memory,
     notice) = handler(demo, "use-example", "click")()
    assert state == {"path": str(EXAMPLE_CSV), "name": EXAMPLE_CSV.name, "text": "text",
                     "label": "label", "target": None}
    assert target_col["value"] == NO_TARGET  # short repeated labels: not a generation task
    assert "54 usable rows" in message and "3 labels" in message
    assert text_col["value"] == "text" and label_col["value"] == "label"
    assert text_col["choices"] == ["text", "label"]
    assert len(value(preview)) == 20 and preview["visible"] and chart["visible"]
    assert memory == {"name": EXAMPLE_CSV.name, "key": "example", "text": "text",
                      "label": "label", "target": None}
    assert notice == ""


def test_uploading_a_bad_file_shows_its_problems_and_clears_the_columns(demo):
    state, message, text_col, label_col, _, preview, chart, _, _ = handler(
        demo, "csv", "upload")(str(BAD_INPUTS / "image.csv"))
    assert state is None and "This file cannot be used" in message and "PNG image" in message
    assert text_col["choices"] == [] and not preview["visible"] and not chart["visible"]


def test_an_upload_is_kept_and_a_reloaded_page_shows_it_again(demo, workbench, tmp_path):
    (tmp_path / "gradio-temp").mkdir()
    src = write_reviews_csv(tmp_path / "gradio-temp" / "my reviews.csv")
    *_, memory, _ = handler(demo, "csv", "upload")(str(src))
    kept = workbench.kept_upload(memory["key"])
    assert kept.parent.parent == workbench.uploads_dir and kept.name == "my_reviews.csv"
    assert kept.read_bytes() == src.read_bytes()
    src.unlink()  # Gradio's temp copy goes; the kept one stays
    restore = next(f.fn for f in demo.fns.values() if f.name == "restore")
    state, message, text_col, *_ = restore({**memory, "label": "label", "text": "text"})
    assert state["path"] == str(kept) and state["name"] == "my reviews.csv"
    assert "40 usable rows" in message and text_col["value"] == "text"
    assert message.startswith("**my reviews.csv** (kept from your last visit)")
    # A remembered value is a name, never a path: anything else is ignored.
    for bad in ({"key": "../../etc/passwd"}, {"key": str(kept)}, "x", None):
        assert restore(bad)[0] is None


def test_the_same_column_for_text_and_label_is_refused(demo):
    state = {"path": str(EXAMPLE_CSV), "name": EXAMPLE_CSV.name}
    _, message, _, chart, _, _ = handler(demo, "text-col", "input")(state, "text", "text",
                                                                    NO_TARGET)
    assert "must differ" in message and not chart["visible"]


def test_a_file_without_a_text_column_is_refused_before_start(demo, workbench):
    """id,score,date: the dates used to be taken as texts and the worker failed later."""
    *_, notice = handler(demo, "csv", "upload")(str(BAD_INPUTS / "no_text_column.csv"))
    check = next(f.fn for f in demo.fns.values() if f.name == "check")
    state = {"path": str(BAD_INPUTS / "no_text_column.csv"), "name": "no_text_column.csv"}
    message, start, notice = check(state, None, *quick())
    assert "Cannot start with no_text_column.csv" in message
    assert "no column holds text" in message and start["interactive"] is False


def test_too_many_labels_for_the_prompt_are_refused_before_start(demo, tmp_path):
    path = tmp_path / "many.csv"
    path.write_text("text,label\n" + "".join(
        f"the movie was great {i},label{i % 30}\n" for i in range(120)))
    check = next(f.fn for f in demo.fns.values() if f.name == "check")
    state = {"path": str(path), "name": "many.csv", "text": "text", "label": "label"}
    message, start, _ = check(state, None, *quick(max_length=48))
    assert "Cannot start" in message and "lists the 30 label names" in message
    assert "raise the max tokens per example" in message and start["interactive"] is False
    message, start, _ = check(state, None, *quick(max_length=512))
    assert message.startswith("Ready: many.csv") and start["interactive"] is True


def test_start_without_data_asks_for_a_csv_in_the_notice_only(demo):
    start = handler(demo, "start", "click")
    *outputs, notice = start(None, "", "", *quick())
    assert "Choose a CSV in the Data tab" in notice and "notice-error" in notice
    assert all(o is gr.skip() or o == gr.skip() for o in outputs)  # no output changes


def test_score_needs_a_text_and_a_prefix(demo):
    score = handler(demo, "play-score", "click")
    assert "at least one text" in score("  \n ", ["x"], True)[-1]
    assert "trained prefix" in score("good film", [], True)[-1]


def test_a_user_error_prints_one_line_and_an_unexpected_one_its_traceback(caplog):
    from prefixlab.ui.common import wire

    calls = []

    def trigger(fn, inputs, outputs, **kwargs):
        calls.append((fn, outputs, kwargs))

    def bad_data():
        raise DataError("the label column 'x' has only one distinct label")

    def broken():
        raise KeyError("oops")

    for fn in (bad_data, broken):
        wire(trigger, fn, [], ["out"], "notice")
    assert all(c[1] == ["out", "notice"] and c[2]["api_visibility"] == "private" for c in calls)
    with caplog.at_level("WARNING", logger="prefixlab.ui"):
        assert "only one distinct label" in calls[0][0]()[1]
        assert "Something went wrong (KeyError" in calls[1][0]()[1]
    user, unexpected = caplog.records
    assert user.getMessage() == ("bad_data: Cannot use this file: the label column 'x' has "
                                 "only one distinct label")
    assert user.exc_info is None and unexpected.exc_info is not None


def test_api_endpoints_take_plain_values(demo, workbench, reviews):
    runs, score = api_fn(demo, "runs"), api_fn(demo, "score")
    assert runs() == []
    cfg = run_config(str(reviews), "text", "label", {}, model=workbench.default_model)
    run_id = workbench.store.create(cfg, workbench.model_info(), name="api")
    [row] = runs(run_id)
    assert row["id"] == run_id and row["state"] == "created" and row["step"] == 0
    with pytest.raises(gr.Error, match="no run"):
        runs("20990101-000000-missing")
    with pytest.raises(gr.Error, match="not a run id"):
        score(["good"], ["../../etc"])
    # The page's own handlers are not part of the API: only what README documents.
    assert sorted(f.api_name for f in demo.fns.values()
                  if f.api_visibility == "public") == ["generate", "predict_csv", "runs", "score"]
    with pytest.raises(gr.Error, match="at least one non-empty string in texts"):
        score([" "], [run_id])


def test_the_prefix_size_line_counts_the_parameters(demo, workbench):
    # show_size is wired to the page load and to the prefix-length slider (no elem_id).
    fn = next(f.fn for f in demo.fns.values() if f.name == "show_size")
    line, _ = fn(*quick())
    trainable = workbench.prefix_size({"prefix_length": 8})["trainable"]
    assert f"**{trainable:,} trainable parameters**" in line


def test_run_errors_from_the_store_reach_the_user_as_messages(workbench):
    with pytest.raises(RunError, match="not a run id"):
        workbench.metrics("../x")


# --- a trained run (in this process: no worker) ----------------------------------------------


@pytest.fixture(scope="module")
def trained_bench(tmp_path_factory, model_dirs) -> tuple[Workbench, str]:
    """A workbench with one completed run, trained in this process (no worker)."""
    tmp = tmp_path_factory.mktemp("trained")
    workbench = Workbench(tmp / "data", model=str(model_dirs["llama"]))
    cfg = run_config(str(write_reviews_csv(tmp / "reviews.csv")), "text", "label", {},
                     model=workbench.default_model)
    run_id = workbench.store.create(cfg, workbench.model_info(), name="trained")
    assert execute_run(workbench.folder(run_id), workbench.model()) is not None
    assert workbench.refresh()[0].state == "completed"
    return workbench, run_id


def _at_once(n: int, fn) -> list:
    """fn(0), ..., fn(n - 1) from n threads released together; re-raises the first error."""
    results, errors, start = [None] * n, [], threading.Barrier(n)

    def call(i: int) -> None:
        start.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("kind, files", [
    ("prefix", {"prefix.safetensors", "config.json", "report.json", "metrics.jsonl",
                "README.md"}),
    ("peft", {"adapter_config.json", "adapter_model.safetensors", "README.md"}),
])
def test_downloads_of_one_run_at_once_each_get_the_whole_zip(trained_bench, kind, files):
    workbench, run_id = trained_bench
    for path in _at_once(6, lambda _: workbench.download(run_id, kind)):
        assert path.name == f"{run_id}-{kind}.zip"
        assert set(zipfile.ZipFile(path).namelist()) == files
    assert not [p for p in workbench.exports_dir.iterdir() if p.name.startswith(".")]


def test_batch_predictions_at_once_each_get_their_own_file(trained_bench, tmp_path):
    workbench, run_id = trained_bench

    def csv(i: int) -> Path:
        path = tmp_path / f"batch{i}.csv"
        path.write_text(f"text\nuser {i} says the movie was great\n")
        return path

    paths = [r.path for r in _at_once(4, lambda i: workbench.predict_csv(run_id, csv(i)))]
    assert len(set(paths)) == 4 and {p.name for p in paths} == {
        f"batch{i}-predictions.csv" for i in range(4)}
    for i, path in enumerate(paths):
        text = path.read_text()
        assert f"user {i} says" in text and "predicted_label" in text


def test_batch_prediction_of_a_labeled_file_reports_metrics_and_explains_quotes(trained_bench,
                                                                               tmp_path):
    workbench, run_id = trained_bench
    path = tmp_path / "held out.csv"
    path.write_text("review,gold\n" + "".join(
        f"the movie was {'great' if i % 2 else 'bad'} {i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(10)) + "-1 star,\n")
    demo = build_ui(workbench)
    out, message, notice = handler(demo, "batch-run", "click")(str(path), run_id)
    assert Path(out).name == "held out-predictions.csv".replace(" ", "_") and notice == ""
    assert "Predicted **11 rows**" in message and "gold labels in **gold**" in message
    assert "on 10 rows (1 rows without a label the run knows are left out)" in message
    assert "1 cells start with" in message and "leading `'`" in message
    assert "'-1 star" in Path(out).read_text()
    result = workbench.predict_csv(run_id, path)
    assert result.report["n"] == 10 and result.label_column == "gold"


def test_a_trained_run_is_evaluated_on_a_test_csv_from_the_runs_tab(trained_bench, tmp_path):
    workbench, run_id = trained_bench
    path = write_reviews_csv(tmp_path / "test.csv", rows=12)
    demo = build_ui(workbench)
    md, per_class, confusion, bars, notice = handler(demo, "test-run", "click")(run_id,
                                                                               str(path))
    assert md.startswith("### trained on the test file: 12 rows") and notice == ""
    assert "zero-shot" in md and "TF-IDF" in md
    assert list(value(per_class)["support"]) == [6, 6]
    assert confusion["visible"] and bars["visible"]
    *_, notice = handler(demo, "test-run", "click")(run_id, None)
    assert "Upload a labeled test CSV" in notice


def test_two_prefixes_share_one_bare_model_row_and_the_chart_has_every_text(trained_bench):
    workbench, run_id = trained_bench
    folder = workbench.folder(run_id)
    cfg = folder.run_config()
    cfg.train_csv = str(folder.path / "data" / "train.csv")
    cfg.training.epochs = 1
    second = workbench.store.create(cfg, workbench.model_info(), name="second")
    assert execute_run(workbench.folder(second), workbench.model()) is not None
    texts = ["the movie was great", "the movie was bad"]
    frame = workbench.compare(texts, [run_id, second], bare=True)
    assert list(dict.fromkeys(frame["source"])) == ["prefix: trained", "prefix: second",
                                                    "bare model (zero-shot)"]
    assert len(frame) == 3 * len(texts)  # the bare model once, not once per prefix
    from prefixlab.ui.playground_tab import probability_figure

    fig = probability_figure(frame)
    assert [a.text for a in fig.layout.annotations] == texts  # a panel per text
    assert len(fig.data) == 3 * len(texts)
    assert sum(t.showlegend for t in fig.data) == 3  # one legend entry per source
    workbench.store.delete(second)


def test_the_playground_scores_and_generates_with_a_trained_prefix(trained_bench):
    workbench, run_id = trained_bench
    demo = build_ui(workbench)
    frame, chart, notice = handler(demo, "play-score", "click")("the movie was great", [run_id],
                                                                True)
    frame = value(frame)
    assert notice == ""
    assert list(frame["source"]) == ["prefix: trained", "bare model (zero-shot)"]
    assert (frame["p(negative)"] + frame["p(positive)"]).round(3).eq(1).all()
    assert chart["visible"]
    rows = api_fn(demo, "score")(["good", " ", "bad"], [run_id])
    assert [r["text"] for r in rows] == ["good", "bad"]
    generated, _ = handler(demo, "gen-run", "click")("the movie", run_id, 4, False, 1.0)
    assert isinstance(generated, str)
