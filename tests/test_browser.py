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
import time
from pathlib import Path

import httpx
import pytest

from prefixlab.workbench import Workbench, run_config
from tests.test_app import BAD_INPUTS, save_tiny_model, served, wait_for_run, write_reviews_csv

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
    return Workbench(workdir / "data", model=str(save_tiny_model(workdir / "tiny-llama")))


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


def shoot(page, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
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


def test_upload_train_list_and_score_in_the_browser(page, workdir, screenshots, workbench):
    from playwright.sync_api import expect

    csv = write_reviews_csv(workdir / "reviews.csv", rows=40)

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

    # Data: upload, preview, label chart, guessed columns.
    page.locator("#csv input[type=file]").set_input_files(str(csv))
    # The name is drawn as stem and extension: its text is "reviews.csv" or "reviews .csv".
    expect(page.locator("#csv")).to_contain_text(re.compile(r"reviews\s*\.csv"))
    expect(page.locator("#data-msg")).to_contain_text("40 usable rows")
    expect(page.locator("#data-msg")).to_contain_text("2 labels")
    expect(page.locator("#preview")).to_contain_text("the movie was great 1")
    page.locator("#label-chart .js-plotly-plot").wait_for()
    expect(page.get_by_role("combobox", name="Text column")).to_have_value("text")
    expect(page.get_by_role("combobox", name="Label column")).to_have_value("label")
    shoot(page, screenshots, "1-data")

    # Train: the Quick look preset on 32 training rows is 4 steps of 8.
    open_tab(page, "Train")
    expect(page.locator("#start-check")).to_contain_text("Ready: reviews.csv, 32 training rows")
    expect(page.locator("#prefix-size")).to_contain_text("trainable parameters")
    page.get_by_role("textbox", name="Run name (optional)").fill("browser run")
    page.locator("#start").click()
    expect(page.locator("#train-status")).to_contain_text("browser run")
    wait_for_points(page, "loss-plot", 4, TRAIN_TIMEOUT_MS)
    expect(page.locator("#train-status")).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS)
    expect(page.locator("#report")).to_contain_text("macro-F1")
    expect(page.locator("#report")).to_contain_text("Held-out results on 8 rows")
    expect(page.locator("#progress")).to_contain_text("step 4/4")
    page.locator("#confusion .js-plotly-plot").wait_for()
    run = next(r for r in workbench.runs() if r.name == "browser run")
    assert run.state == "completed" and run.macro_f1 is not None
    shoot(page, screenshots, "2-train")

    # Runs: the run is listed with its result once the list is refreshed.
    open_tab(page, "Runs")
    page.locator("#runs-refresh").click()
    table = page.locator("#runs-table")
    expect(table).to_contain_text("browser run")
    expect(table).to_contain_text("completed")
    expect(table).to_contain_text(run.id)
    shoot(page, screenshots, "3-runs")

    # Playground: pick the prefix (the list refreshes on focus), score a text.
    open_tab(page, "Playground")
    page.get_by_role("combobox", name="Prefixes (trained runs)").click()
    page.get_by_role("option", name=re.compile(r"^browser run · completed")).click()
    page.keyboard.press("Escape")
    page.locator("#play-text textarea").fill("the movie was great")
    page.locator("#play-score").click()
    results = page.locator("#play-results")
    expect(results).to_contain_text("prefix: browser run")
    expect(results).to_contain_text("p(positive)")
    expect(results).to_contain_text("p(negative)")
    page.locator("#play-chart .js-plotly-plot").wait_for()
    shoot(page, screenshots, "4-playground")

    # Which prefix says what: no selection asks every trained run, in one mixed batch.
    page.locator("#what-text textarea").fill("the movie was")
    page.locator("#what-run").click()
    said = page.locator("#what-results")
    expect(said).to_contain_text("browser run")
    expect(said).to_contain_text("continuation")
    said.scroll_into_view_if_needed()
    shoot(page, screenshots, "4b-which-prefix-says-what")


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
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(10):
            for what, call in (
                ("api /runs", lambda: client.predict(run_id, api_name="/runs")),
                ("GET /", lambda: http.get("/").raise_for_status()),
                ("GET /gradio_api/info", lambda: http.get("gradio_api/info").raise_for_status()),
            ):
                t = time.perf_counter()
                answer = call()
                slowest[what] = max(slowest.get(what, 0.0), time.perf_counter() - t)
                if what == "api /runs":
                    assert answer[0]["state"] == "running"
            time.sleep(0.1)
    client.close()
    print("slowest answers while training: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in slowest.items()))
    assert max(slowest.values()) < 1.0, slowest
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
        re.compile("Cancelling after the current step|cancelled"))
    expect(page.locator("#train-status")).to_contain_text("cancelled", timeout=TIMEOUT_MS)
    row = wait_for_run(workbench, run_id, lambda r: r.state == "cancelled")
    assert 0 < row.step < row.total_steps

