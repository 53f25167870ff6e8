"""The app in a real browser (Debian's Chromium through Playwright), end to end, offline:
upload a CSV, train a prefix in a worker process on a tiny model while the curves draw,
read the report, find the run in the Runs tab, score a text in the Playground; and the page
and its API keep answering while a long run trains.

Screenshots of every tab go to $PREFIXLAB_SCREENSHOTS (default: the test's tmp folder);
their paths are printed (`pytest -s`). See /work/shared/BROWSER_TESTING.md for the facts
these selectors rely on.
"""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from prefixlab.engine.models import DEFAULT_MODEL
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.conftest import save_tiny_model
from tests.test_app import BAD_INPUTS, served, wait_for_run, write_reviews_csv

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    # Gradio's Dataframe postprocessing uses pandas options that pandas 3 deprecates.
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 30_000  # the machine has two busy cores
TRAIN_TIMEOUT_MS = 120_000


def _require_browser() -> None:
    """Skip without Chromium or Playwright, except on CI (CI=true), where that is a failure."""
    missing = None
    if not CHROMIUM.is_file():
        missing = (f"Chromium not found at {CHROMIUM}: install it with "
                   "`apt-get install -y chromium` (.ci/run does)")
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright Python package is not installed (requirements.txt)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def workbench(workdir) -> Workbench:
    """A tiny model; PREFIXLAB_BROWSER_MODEL=default walks the real default model instead
    (the README's screenshots: `PREFIXLAB_SCREENSHOTS=docs/screenshots`)."""
    if os.environ.get("PREFIXLAB_BROWSER_MODEL") == "default":
        return Workbench(workdir / "data", model=DEFAULT_MODEL)
    return Workbench(workdir / "data", model=str(save_tiny_model(workdir / "tiny-llama")))


def walk_data(workdir: Path, real: bool) -> tuple[Path, Path]:
    """A training CSV and a held-out test CSV, both named as the walk expects: short
    synthetic reviews for the tiny model; real movie-review sentences for the default one."""
    if not real:
        # 1,600 training rows (the walk lifts the preset's 200-row cap) x 40 epochs at batch
        # 1: 64,000 steps, far past the preset's 1.5-minute time budget on any machine, so the
        # run is still training when the second one queues (160 rows finished in under a
        # minute once idle OpenMP threads stopped spinning; 40 rows within one status poll)
        return (write_reviews_csv(workdir / "reviews.csv", rows=2000),
                write_reviews_csv(workdir / "test.csv", rows=12))
    from tests.conftest import SHARED_DATA

    source = SHARED_DATA / "polarity_sentences.csv"
    if not source.is_file():
        pytest.skip(f"the real walk uses {source}")
    frame = pd.read_csv(source)
    parts = [frame[frame["label"] == label].sample(n=180, random_state=0)
             for label in sorted(frame["label"].unique())]
    test = pd.concat([p.head(30) for p in parts])
    train = pd.concat([p.iloc[30:] for p in parts]).sample(frac=1.0, random_state=0)
    train.to_csv(workdir / "reviews.csv", index=False)
    test.to_csv(workdir / "test.csv", index=False)
    return workdir / "reviews.csv", workdir / "test.csv"


@pytest.fixture(scope="module")
def url(workbench, workdir):
    with served(workbench, workdir) as u:
        yield u


@pytest.fixture(scope="module")
def browser(workdir):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    (workdir / "tmp").mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(workdir / "tmp"))  # Playwright's profile and downloads
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=str(CHROMIUM),
                                  args=["--disable-gpu", "--disable-quic"])
            yield b
            b.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.locator("#csv").wait_for()
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


@pytest.fixture(scope="module")
def screenshots(workdir) -> Path:
    folder = Path(os.environ.get("PREFIXLAB_SCREENSHOTS") or workdir / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page, folder: Path, name: str, element=None) -> None:
    """The whole page, or one element (a locator) at full size."""
    path = folder / f"{name}.png"
    if element is None:
        page.screenshot(path=str(path), full_page=True)
    else:
        element.screenshot(path=str(path))
    print(f"screenshot: {path}")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def plot_points(page, elem_id: str) -> int:
    return page.evaluate(
        f"() => document.querySelector('#{elem_id} .js-plotly-plot')?.data?.[0]?.x?.length ?? 0")


def wait_for_points(page, elem_id: str, n: int, timeout: float) -> None:
    page.wait_for_function(
        f"document.querySelector('#{elem_id} .js-plotly-plot')?.data?.[0]?.x?.length >= {n}",
        timeout=timeout, polling=250)


class SlowPolls:
    """The Train tab's status polls made slow on demand, as on a loaded machine (each waits
    before it reads), and counted: the race of issue 26, item 1, at will. Only the polls
    (and Start, Cancel and the tab's reattach, which are not used meanwhile) refresh."""

    def __init__(self, workbench: Workbench, monkeypatch) -> None:
        self.delay = 0.0
        self.started = self.finished = 0
        self._changed = threading.Condition()
        refresh = workbench.refresh

        def slow_refresh():
            with self._changed:
                self.started += 1
                self._changed.notify_all()
            time.sleep(self.delay)
            try:
                return refresh()
            finally:
                with self._changed:
                    self.finished += 1
                    self._changed.notify_all()

        monkeypatch.setattr(workbench, "refresh", slow_refresh)

    def wait(self, what: str, count: int, timeout: float = 30.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: getattr(self, what) >= count, timeout), what


class SlowScoring:
    """Scoring in chunks of 4 rows, each taking at least `seconds`: long enough to see an
    action's progress and to stop it."""

    def __init__(self, monkeypatch, seconds: float) -> None:
        from prefixlab.runs import finished, scoring

        def slowed(fn):
            def slow(*args, **kwargs):
                time.sleep(seconds)
                return fn(*args, **kwargs)
            return slow

        for module in (scoring, finished):
            monkeypatch.setattr(module, "SCORE_CHUNK", 4)
        # an evaluation's scoring, and a run's (a batch prediction)
        monkeypatch.setattr(scoring, "score_log_likelihoods",
                            slowed(scoring.score_log_likelihoods))
        # Run.score and a batch prediction both read labels through log_likelihoods
        monkeypatch.setattr(finished.Run, "log_likelihoods",
                            slowed(finished.Run.log_likelihoods))


def box(page, selector: str) -> dict:
    found = page.locator(selector).bounding_box()
    assert found, f"{selector} is not on the page"
    return found


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_the_whole_walk_in_the_browser(page, workdir, screenshots, workbench, url,
                                       monkeypatch):
    """upload -> a wrong file refused before Start -> Start -> phases -> a second run queued
    and cancelled at once -> the first followed to its report -> test-CSV evaluation ->
    batch prediction with metrics -> Inspect; and an upload survives a reload."""
    from playwright.sync_api import expect

    real = workbench.default_model == DEFAULT_MODEL
    csv, test_csv = walk_data(workdir, real)

    # Without data, Start is off and says why.
    open_tab(page, "Train")
    expect(page.locator("#start-check")).to_contain_text("Choose a CSV in the Data tab first")
    expect(page.locator("#start")).to_be_disabled()
    open_tab(page, "Data")

    # A file without a text column is refused before Start, in plain words.
    page.locator("#csv input[type=file]").set_input_files(str(BAD_INPUTS / "no_text_column.csv"))
    expect(page.locator("#data-msg")).to_contain_text("no column holds text")
    open_tab(page, "Train")
    expect(page.locator("#start-check")).to_contain_text("no column holds text")
    expect(page.locator("#start")).to_be_disabled()
    open_tab(page, "Data")
    page.locator("#csv").get_by_role("button", name="Clear").click()

    # Data: upload, preview with text and label, label chart, guessed columns.
    page.locator("#csv input[type=file]").set_input_files(str(csv))
    expect(page.locator("#csv")).to_contain_text(re.compile(r"reviews\s*\.csv"))
    expect(page.locator("#data-msg")).to_contain_text("2 labels")
    page.locator("#label-chart .js-plotly-plot").wait_for()
    expect(page.get_by_role("combobox", name="Text column")).to_have_value("text")
    expect(page.get_by_role("combobox", name="Label column")).to_have_value("label")
    expect(page.locator("#preview thead")).to_contain_text("label")

    # The upload survives a reload: the browser remembers it, the data directory keeps it.
    page.reload()
    expect(page.locator("#data-msg")).to_contain_text("2 labels")
    expect(page.get_by_role("combobox", name="Label column")).to_have_value("label")
    expect(page.locator("#data-msg")).to_contain_text("reviews.csv (kept from your last visit)")
    # ... and the file box shows the kept file, not an empty drop zone (issue 26, item 8)
    expect(page.locator("#csv")).to_contain_text(re.compile(r"reviews\s*\.csv"))
    expect(page.locator("#csv")).not_to_contain_text("Drop File Here")
    expect(page.locator("#preview")).to_contain_text("positive")
    page.locator("#label-chart .js-plotly-plot").wait_for()
    shoot(page, screenshots, "1-data")

    # Start: the phases show, then training.
    open_tab(page, "Train")
    expect(page.locator("#start-check")).to_contain_text("Ready: reviews.csv")
    if not real:  # the tiny model needs a longer run for a second one to queue behind it
        page.get_by_role("button", name=re.compile(r"^Settings ▼")).click()
        set_slider(page, "epochs", 40)
        set_slider(page, "batch-size", 1)
        patience = page.get_by_label(re.compile(r"^Patience"))
        patience.fill("0")  # no early stop: it must still train when the second run starts
        patience.press("Enter")
        rows = page.get_by_label(re.compile(r"^Training rows"))
        rows.fill("0")  # every row
        rows.press("Enter")
        page.locator("#decision").get_by_label("fitted").check()
    page.get_by_role("textbox", name="Run name (optional)").fill("browser run")
    page.locator("#start").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text("browser run")
    expect(status).to_contain_text(
        re.compile("starting the worker|loading the model|training"))
    expect(status).to_contain_text("running — training", timeout=TRAIN_TIMEOUT_MS)
    expect(status).not_to_contain_text("waiting for the device")
    wait_for_points(page, "loss-plot", 2, TRAIN_TIMEOUT_MS)
    first = next(r for r in workbench.runs() if r.name == "browser run")

    # A second run queues behind it, says so, and Cancel names it.
    page.get_by_role("textbox", name="Run name (optional)").fill("second run")
    page.locator("#start").click()
    expect(status).to_contain_text("second run")
    expect(status).to_contain_text("waiting for the device")
    second = next(r for r in workbench.runs() if r.name == "second run")
    cancel = page.locator("#cancel")
    expect(cancel).to_have_text(f"Cancel run {second.id}")
    shoot(page, screenshots, "2-train-queued")

    # A slow poll answered after a pick (issue 26, item 1): with polls taking 4 s, as on a
    # loaded machine, the person picks the first run, a poll starts, and before it answers
    # they pick the second again. The page stays on the second; Cancel stops it alone.
    follow = page.get_by_role("combobox", name=re.compile("Run shown"))
    polls = SlowPolls(workbench, monkeypatch)
    follow.click()
    page.get_by_role("option", name=re.compile(r"^browser run · ")).click()
    expect(status).to_contain_text("browser run")
    expect(cancel).to_have_text(f"Cancel run {first.id}")
    polls.delay = 4.0
    began = polls.started
    polls.wait("started", began + 1)  # a poll began while the first run was shown
    follow.click()
    page.get_by_role("option", name=re.compile(r"^second run · ")).click()
    expect(status).to_contain_text("second run")
    polls.wait("finished", began + 1)  # ... and answered after the pick
    page.wait_for_timeout(1000)  # what it answered would be on the page by now
    assert "second run" in status.inner_text()  # at once: no later poll to put it right
    assert follow.input_value().startswith("second run · ")
    assert cancel.inner_text() == f"Cancel run {second.id}"
    shoot(page, screenshots, "2-train-after-a-slow-poll")
    polls.delay = 0.0
    asked = time.monotonic()
    cancel.click()
    expect(status).to_contain_text(re.compile("second run.*(cancelling|cancelled)"))
    expect(status).to_contain_text("cancelled")
    cancelled_in = time.monotonic() - asked
    print(f"queued run cancelled in {cancelled_in:.1f} s")
    assert cancelled_in < 10
    assert workbench.store.get(second.id).state == "cancelled"
    assert workbench.store.get(first.id).state in ("running", "completed")
    assert not workbench.folder(first.id).cancel_requested()

    # Back to the first run: every active run is listed; its report comes at the end.
    page.get_by_role("combobox", name=re.compile("Run shown")).click()
    page.get_by_role("option", name=re.compile(r"^browser run · ")).click()
    expect(status).to_contain_text("browser run")
    expect(status).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS * 2)
    expect(page.locator("#report")).to_contain_text("macro-F1")
    expect(page.locator("#report")).to_contain_text("Held-out results on")
    if not real:  # the fitted decision rule: the report says which strength it chose and why
        expect(page.locator("#report")).to_contain_text(
            re.compile(r"Decisions subtract \d\.\d × the log .* best on the 100 validation rows"))
    page.locator("#confusion .js-plotly-plot").wait_for()
    page.locator("#baselines .js-plotly-plot").wait_for()
    run = workbench.store.get(first.id)
    assert run.state == "completed" and run.macro_f1 is not None
    shoot(page, screenshots, "2-train")

    # Runs: the run is listed; evaluate it on a held-out test CSV.
    open_tab(page, "Runs")
    page.locator("#runs-refresh").click()
    table = page.locator("#runs-table")
    expect(table).to_contain_text("browser run")
    expect(table).to_contain_text(run.id)
    page.get_by_role("combobox", name="Run", exact=True).click()
    page.get_by_role("option", name=re.compile(r"^browser run · completed")).click()
    page.locator("#run-open").click()
    page.locator("#runs-loss .js-plotly-plot").wait_for()
    page.locator("#test-csv input[type=file]").set_input_files(str(test_csv))
    expect(page.locator("#test-csv")).to_contain_text(re.compile(r"test\s*\.csv"))
    # A long evaluation shows rows done of rows, the time so far and what is left, and stops
    # on request (issue 26, item 5); scoring is made slow here to see it.
    test_report = page.locator("#test-report")
    with pytest.MonkeyPatch.context() as slow:
        SlowScoring(slow, seconds=1.5)
        page.locator("#test-run").click()
        expect(test_report).to_contain_text(
            re.compile(r"scoring held-out rows with the prefix: [1-9]\d*/\d+ · \d+ s so far · "
                       r"about \d+ s left"))
        shoot(page, screenshots, "3-runs-evaluating")
        page.locator("#test-stop").click()
        expect(test_report).to_contain_text(re.compile(r"Stopped after \d+ of \d+"))
        expect(page.locator("#test-confusion")).to_be_hidden()
    page.locator("#test-run").click()
    expect(test_report).to_contain_text("browser run on the test file", timeout=TRAIN_TIMEOUT_MS)
    expect(test_report).to_contain_text("Evaluated in")
    expect(page.locator("#test-report")).to_contain_text("zero-shot")
    page.locator("#test-confusion .js-plotly-plot").wait_for()
    expect(page.locator("#notice")).to_have_text("")
    shoot(page, screenshots, "3-runs")

    # Train longer: the run ended on its budget, so the Runs tab offers more of it; the run
    # resumes from its checkpoint, the Train tab follows it, its report is written anew.
    longer = page.locator("#train-longer-row")
    expect(longer).to_be_visible()
    # (its time budget; or its epochs, when the walk's epochs did not take: seen once)
    expect(page.locator("#train-longer-note")).to_contain_text(re.compile(
        r"Training ended on its (time budget of [\d.]+ min|budget of \d+ epochs) at step \d+"))
    more = page.locator("#longer-minutes input")
    more.fill("0.3")
    more.press("Enter")
    longer.scroll_into_view_if_needed()
    shoot(page, screenshots, "3b-train-longer")
    ended_at = workbench.store.get(first.id).step
    page.locator("#train-longer").click()
    expect(page.locator("#runs-msg")).to_contain_text(
        f"Training browser run longer, from step {ended_at}: 0.3 more minutes")
    expect(longer).to_be_hidden()
    open_tab(page, "Train")
    expect(status).to_contain_text(re.compile(r"browser run\*?\*?: (queued|running)"))
    expect(status).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS * 2)
    longer_run = workbench.store.get(first.id)
    assert longer_run.state == "completed" and longer_run.step > ended_at
    expect(page.locator("#report")).to_contain_text(
        re.compile(rf"Kept the prefix of step \d+ of {longer_run.step} .*time budget of"))
    shoot(page, screenshots, "3c-trained-longer")
    open_tab(page, "Runs")

    # Playground: score a text; predict a labeled file and get its metrics.
    open_tab(page, "Playground")
    page.get_by_role("combobox", name="Prefixes (trained runs)").click()
    page.get_by_role("option", name=re.compile(r"^browser run · completed")).click()
    page.keyboard.press("Escape")
    page.locator("#play-text textarea").fill("the movie was great")
    page.locator("#play-score").click()
    results = page.locator("#play-results")
    expect(results).to_contain_text("prefix: browser run")
    expect(results).to_contain_text("p(positive)")
    page.locator("#play-chart .js-plotly-plot").wait_for()
    page.locator("#batch-csv input[type=file]").set_input_files(str(test_csv))
    expect(page.locator("#batch-csv")).to_contain_text(re.compile(r"test\s*\.csv"))
    # The file box's label ends before its Clear button (issue 26, item 9).
    label = box(page, "#batch-csv label[data-testid=block-label]")
    clear = box(page, "#batch-csv button[aria-label=Clear]")
    assert label["x"] + label["width"] <= clear["x"], (label, clear)
    page.get_by_role("combobox", name="Prefixes (one column group each)").click()
    page.get_by_role("option", name=re.compile(r"^browser run · completed")).click()
    page.keyboard.press("Escape")
    with pytest.MonkeyPatch.context() as slow:  # a long prediction shows how far it got
        SlowScoring(slow, seconds=1.0)
        page.locator("#batch-run").click()
        expect(page.locator("#batch-msg")).to_contain_text(
            re.compile(r"predicting: [1-9]\d*/\d+ · \d+ s so far"))
        page.locator("#batch-msg").scroll_into_view_if_needed()
        shoot(page, screenshots, "4-playground-predicting")
        expect(page.locator("#batch-msg")).to_contain_text("gold labels in",
                                                           timeout=TRAIN_TIMEOUT_MS)
    expect(page.locator("#batch-msg")).to_contain_text("macro-F1")
    expect(page.locator("#batch-out")).to_contain_text("test-predictions")
    shoot(page, screenshots, "4-playground")

    # Which prefix says what: no selection asks every trained run, in one mixed batch.
    page.locator("#what-text textarea").fill("the movie was")
    page.locator("#what-run").click()
    said = page.locator("#what-results")
    expect(said).to_contain_text("browser run")
    expect(said).to_contain_text("continuation")
    said.scroll_into_view_if_needed()
    shoot(page, screenshots, "4b-which-prefix-says-what")

    # Inspect: the maps, tables and movement of the trained prefix.
    open_tab(page, "Inspect")
    page.get_by_role("combobox", name="Run", exact=True).click()
    page.get_by_role("option", name=re.compile(r"^browser run · completed")).click()
    page.locator("#inspect-open").click()
    page.locator("#inspect-pca .js-plotly-plot").wait_for(timeout=TRAIN_TIMEOUT_MS)
    page.locator("#inspect-trajectory .js-plotly-plot").wait_for()
    expect(page.locator("#inspect-table")).to_contain_text("P0")
    expect(page.locator("#notice")).to_have_text("")
    shoot(page, screenshots, "5-inspect")
    page.get_by_text("3-D", exact=True).click()
    page.wait_for_function("document.querySelector('#inspect-pca3:not(.offstage) .js-plotly-plot')"
                           "?.data?.[0]?.type === 'scatter3d'", timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)  # WebGL draws after the data is in
    shoot(page, screenshots, "5-inspect-3d")

    # Reloaded once every run is over, the Train tab shows the last completed run's report
    # (issue 26, item 8), and Cancel has nothing to stop.
    page.reload()
    open_tab(page, "Train")
    expect(status).to_contain_text("browser run: completed")
    expect(page.locator("#report")).to_contain_text("Held-out results on")
    expect(page.locator("#cancel")).to_be_disabled()
    for plot in ("loss-plot", "eval-plot", "confusion", "baselines"):
        page.locator(f"#{plot} .js-plotly-plot").wait_for()
    shoot(page, screenshots, "6-train-after-reload")


def test_the_train_tab_follows_a_final_report_with_rows_and_time_left(page, workbench, workdir,
                                                                      screenshots):
    """The final decoding of a generation run took 4 of its 6 minutes with nothing shown. A
    run in its final report, written as its worker writes it (this test holds its run lock,
    as a worker does): the Train tab's progress line says what it is on, rows done of total,
    and the time left."""
    from playwright.sync_api import expect

    from prefixlab.runs.locks import RunLock

    csv = write_reviews_csv(workdir / "final-reviews.csv", rows=40)
    cfg = run_config(str(csv), "text", "label", {"epochs": 2}, model=workbench.default_model)
    run_id = workbench.store.create(cfg, workbench.model_info(), name="reporting run")
    folder = workbench.folder(run_id)

    def progress(done: int, elapsed: float) -> None:
        folder.append_metrics({"type": "progress", "phase": "final report",
                               "what": "decoding held-out inputs (prefix and bare model)",
                               "done": done, "total": 80, "elapsed_s": elapsed,
                               "eta_s": elapsed / done * (80 - done) if done else None})
        folder.set_status("running", step=10, phase=f"final report: decoding held-out "
                                                    f"inputs (prefix and bare model) {done}/80")

    with RunLock.claim(folder.path):
        for step in range(1, 11):
            folder.append_metrics({"type": "step", "step": step, "total_steps": 10,
                                   "epoch": step / 5, "loss": 2.0 - step / 10,
                                   "learning_rate": 0.005, "examples_per_s": 12.0,
                                   "tokens_per_s": 300.0, "elapsed_s": step, "eta_s": 10 - step})
        folder.append_metrics({"type": "eval", "step": 10, "val_loss": 1.2, "bleu": 12.0,
                               "rouge_l": 30.0, "chrf": 25.0, "best_step": 10})
        progress(0, 0.0)
        open_tab(page, "Train")
        line = page.locator("#progress")
        expect(page.locator("#train-status")).to_contain_text("reporting run")
        expect(line).to_contain_text("final report: decoding held-out inputs (prefix and bare "
                                     "model) 0/80")
        progress(32, 41.2)
        expect(line).to_contain_text("32/80 · 41 s · about 62 s left")
        expect(line).to_contain_text("training ended at step 10/10")
        expect(page.locator("#train-status")).to_contain_text("running — final report")
        shoot(page, screenshots, "2b-train-final-report")
        progress(80, 103.0)
        expect(line).to_contain_text("80/80 · 103 s · about 0 s left")
        folder.set_status("cancelled", step=10)
    expect(page.locator("#train-status")).to_contain_text("cancelled")


def test_inspect_a_run_change_views_and_run_the_knockout(page, workbench, workdir, screenshots):
    from playwright.sync_api import expect

    from prefixlab.runs.experiment import execute_run

    csv = write_reviews_csv(workdir / "inspect-reviews.csv", rows=40)
    model = workbench.default_model
    cfg = run_config(str(csv), "text", "label", {"epochs": 2}, model=model)
    run_id = workbench.store.create(cfg, workbench.model_info(model), name="inspected run")
    execute_run(workbench.folder(run_id), workbench.model(model))
    workbench.store.refresh()

    open_tab(page, "Inspect")
    page.get_by_role("combobox", name="Run", exact=True).click()
    page.get_by_role("option", name=re.compile(r"^inspected run · completed")).click()
    page.keyboard.press("Escape")
    page.locator("#inspect-open").click()
    summary = page.locator("#inspect-summary")
    # The summary's first line says what training changed, the next what still reads as
    # the start; the movement from the start per slot and layer is drawn.
    expect(summary.locator("p").first).to_contain_text(
        re.compile(r"^What training changed: the (keys|values) of layers? \d"))
    expect(summary.locator("p").nth(1)).to_contain_text("What still reads as the start")
    expect(summary).to_contain_text("run the knockout")
    page.locator("#inspect-pca .js-plotly-plot").wait_for()
    page.locator("#inspect-slot-movement .js-plotly-plot").wait_for()
    shoot(page, screenshots, "5-inspect-summary", element=summary)

    # Change the layer and the vectors: the kept figures come back.
    def map_says(plot: str, text: str, also: str = "true") -> None:
        """Wait until the map `plot` (a selector) has `text` in its title and `also` holds."""
        page.wait_for_function(
            f"document.querySelector('{plot} .js-plotly-plot')?.layout?.title?.text"
            f"?.includes({text!r}) && ({also})", timeout=TIMEOUT_MS, polling=250)

    slider = page.locator("#inspect-layer input[type=number]")
    slider.fill("1")
    slider.press("Enter")
    map_says("#inspect-pca", "Layer 1 keys")  # typing a layer redraws its map
    page.get_by_label("value", exact=True).check()
    expect(page.locator("#inspect-table")).to_be_visible()
    map_says("#inspect-pca", "Layer 1 values")
    # 2-D and 3-D are two plots, one on stage: a switch moves them, a layer change redraws
    # the one on stage.
    page.get_by_label("3-D", exact=True).check()
    page.wait_for_function(
        "document.querySelector('#inspect-pca3:not(.offstage) .js-plotly-plot')?.data?.[0]"
        "?.type === 'scatter3d' && document.querySelector('#inspect-pca.offstage')",
        timeout=TIMEOUT_MS, polling=250)
    slider.fill("0")
    slider.press("Enter")
    map_says("#inspect-pca3", "Layer 0 values")
    page.get_by_label("2-D", exact=True).check()
    map_says("#inspect-pca:not(.offstage)", "Layer 0 values",
             also="document.querySelector('#inspect-pca3.offstage')")
    box = page.locator("#inspect-pca").bounding_box()
    assert box and box["x"] >= 0 and box["width"] > 200  # on the page, full width

    # The knockout: bars for slots and layers, the label push, and the summary names them.
    page.locator("#inspect-knockout").click()
    page.locator("#inspect-knockout-plot .js-plotly-plot").wait_for(timeout=TRAIN_TIMEOUT_MS)
    page.locator("#inspect-push .js-plotly-plot").wait_for()
    expect(summary).to_contain_text("Slots that cost most when hidden")
    expect(summary).to_contain_text("Layers that cost most when hidden")
    expect(summary).to_contain_text("Prompt Waywardness")
    assert (workbench.folder(run_id).path / "knockout.json").is_file()
    # The value readout of the change from the start, in place of the learned prefix's.
    readout = page.locator("#inspect-readout")
    expect(readout).not_to_contain_text("pushed up by training")
    page.get_by_label("change from start", exact=True).check()
    expect(readout).to_contain_text("pushed up by training")
    shoot(page, screenshots, "5-inspect-change-readout", element=readout)
    page.get_by_label("learned prefix", exact=True).check()
    expect(readout).not_to_contain_text("pushed up by training")
    # Knock out by resetting to the start: what training added, beside what hiding does.
    page.get_by_label("reset to start", exact=True).check()
    page.locator("#inspect-knockout").click()
    expect(summary).to_contain_text("Slots that cost most when reset to start",
                                    timeout=TRAIN_TIMEOUT_MS)
    expect(summary).to_contain_text("What training added")
    expect(page.locator("#inspect-knockout-note")).to_contain_text("reset to start on")
    page.wait_for_function(
        "document.querySelector('#inspect-knockout-plot .js-plotly-plot')?.layout?.title?.text"
        "?.includes('Reset to its start')", timeout=TIMEOUT_MS, polling=250)
    assert (workbench.folder(run_id).path / "knockout_reset.json").is_file()
    shoot(page, screenshots, "5-inspect-summary-knockouts", element=summary)
    shoot(page, screenshots, "5-inspect")


def test_page_and_api_answer_within_a_second_while_a_run_trains(page, workbench, workdir,
                                                                 screenshots, url):
    from gradio_client import Client
    from playwright.sync_api import expect

    csv = write_reviews_csv(workdir / "long.csv", rows=40)
    # 6,400 steps, no early stop: the run must still be going when the test cancels it
    settings = {"epochs": 200, "batch_size": 1, "max_train_examples": 0, "patience": 0}
    cfg = run_config(str(csv), "text", "label", settings, model=workbench.default_model)
    run_id = workbench.start_run(cfg, name="long run", data_name="long.csv")
    step = wait_for_run(workbench, run_id, lambda r: r.state == "running" and r.step >= 3).step

    client = Client(url, verbose=False)
    slowest: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(10):
            for what, call in (
                ("api /runs", lambda: client.predict(run_id, api_name="/runs")),
                ("GET /", lambda: http.get("/").raise_for_status()),
                ("GET /gradio_api/info", lambda: http.get("gradio_api/info").raise_for_status()),
            ):
                t = time.perf_counter()
                answer = call()
                took = time.perf_counter() - t
                slowest[what] = max(slowest.get(what, 0.0), took)
                times.setdefault(what, []).append(took)
                if what == "api /runs":
                    assert answer[0]["state"] == "running"
            time.sleep(0.1)
    client.close()
    print("slowest answers while training: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in slowest.items()))
    # Typical answers within a second; one slow answer on cores shared with the training
    # worker is no failure (latency targets are measured in the benchmark), a stalled
    # handler (seconds, the length of a training step) is.
    assert all(statistics.median(t) < 1.0 for t in times.values()), times
    assert max(slowest.values()) < 3.0, slowest
    assert workbench.store.get(run_id).step > step  # it kept training meanwhile

    # A page opened during the run follows it (the Train tab reattaches), and can cancel it.
    page.goto(url)
    open_tab(page, "Train")
    expect(page.locator("#train-status")).to_contain_text("long run")
    expect(page.locator("#train-status")).to_contain_text("running")
    wait_for_points(page, "loss-plot", 1, TIMEOUT_MS)
    first = plot_points(page, "loss-plot")
    wait_for_points(page, "loss-plot", first + 1, TIMEOUT_MS)  # the timer keeps drawing
    shoot(page, screenshots, "5-train-while-running")
    page.locator("#cancel").click()
    expect(page.locator("#train-status")).to_contain_text(
        re.compile("cancelling|cancelled"))
    expect(page.locator("#train-status")).to_contain_text("cancelled", timeout=TIMEOUT_MS)
    row = wait_for_run(workbench, run_id, lambda r: r.state == "cancelled")
    assert 0 < row.step < row.total_steps

