"""Inspect v3 in a real browser: open a trained run in the Inspect tab and read its summary,
find a readable prompt, ask the model to describe its prefix; then pick the run in the
Playground, type a text, click Explain, read the three probability rows and the highlighted
words with their legend. Screenshots go to
$PREFIXLAB_SCREENSHOTS (default: the test's tmp folder)."""

from __future__ import annotations

import re

import pytest

from prefixlab.runs.experiment import execute_run
from prefixlab.workbench import Workbench
from tests.conftest import save_tiny_model
from tests.test_app import served
from tests.test_browser import (  # noqa: F401 (fixtures)
    TIMEOUT_MS,
    box,
    browser,
    open_tab,
    screenshots,
    shoot,
    workdir,
)
from tests.test_runs import _config

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]


@pytest.fixture(scope="module")
def trained(workdir):  # noqa: F811
    wb = Workbench(workdir / "data", model=str(save_tiny_model(workdir / "tiny-llama")))
    csv = workdir / "reviews.csv"
    csv.write_text("text,label\n" + "".join(
        f"the movie was {'great' if i % 2 else 'bad'} {i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(24)))
    rid = wb.store.create(_config(csv, workdir / "tiny-llama", epochs=1),
                          wb.model_info(str(workdir / "tiny-llama")), name="explained run")
    execute_run(wb.folder(rid), wb.model(str(workdir / "tiny-llama")))
    wb.store.refresh()
    return wb


@pytest.fixture
def page(browser, trained, workdir):  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFIXLAB_CACHE", str(workdir / "cache"))
        with served(trained, workdir) as url:
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


def test_summary_then_readable_prompt_then_explanation(page, screenshots):  # noqa: F811
    """A user's walk through issue 28: what training changed (the summary), a readable prompt
    beside its start and nearest-token texts, the model's descriptions, then one decision
    explained in the Playground."""
    from playwright.sync_api import expect

    open_tab(page, "Inspect")
    page.get_by_role("combobox", name="Run", exact=True).click()
    page.get_by_role("option", name=re.compile(r"^explained run · completed")).click()
    page.locator("#inspect-open").click()
    summary = page.locator("#inspect-summary")
    expect(summary).to_contain_text("What training changed")
    shoot(page, screenshots, "inspect-summary", summary)

    page.locator("#inspect-readable-steps input[type=number]").fill("10")
    page.locator("#inspect-readable").click()
    note = page.locator("#inspect-readable-note")
    expect(note).to_contain_text("Written to the run folder as readable_prompt.json")
    expect(note).to_contain_text(re.compile(r"Searched \d+ steps on \d+ training rows"))
    readings = page.locator("#inspect-readable-table")
    for name in ("readable prompt", "start text", "nearest tokens", "agreement with the prefix"):
        expect(readings).to_contain_text(name)
    shoot(page, screenshots, "inspect-readable", page.locator("#inspect-readable-note"))
    shoot(page, screenshots, "inspect-readable-table", readings)

    page.locator("#inspect-describe").click()
    expect(page.locator("#inspect-describe-note")).to_contain_text(
        re.compile(r"\d+ of \d+ descriptions name"))
    table = page.locator("#inspect-describe-table")
    expect(table).to_contain_text("none (the start)")
    shoot(page, screenshots, "explain-describe", table)

    open_tab(page, "Playground")
    page.get_by_role("combobox", name="Prefix (a classification run)").click()
    page.get_by_role("option", name=re.compile(r"^explained run · completed")).click()
    page.locator("#explain-text textarea").fill("the movie was great, i loved it")
    page.locator("#explain-go").click()
    probs = page.locator("#explain-probs")
    expect(probs).to_contain_text("trained prefix")
    expect(probs).to_contain_text("its start (before training)")
    expect(probs).to_contain_text("bare model (no prefix)")
    expect(probs).to_contain_text("p(positive)")
    view = page.locator("#explain-view")
    expect(view).to_contain_text("trained prefix decides")
    expect(view).to_contain_text("bare model (no prefix) decides")
    expect(view).to_contain_text("Leave one word out")
    words = page.locator("#explain-view .explain-word")
    expect(words).to_have_count(2 * 7)
    assert words.first.get_attribute("title").startswith(("+", "-"))
    # The legend sits below the last highlighted line, never over it.
    lines = page.locator("#explain-view .explain-line")
    last, legend = lines.last.bounding_box(), box(page, "#explain-view .explain-legend")
    assert legend["y"] >= last["y"] + last["height"] - 1, (last, legend)
    shoot(page, screenshots, "explain-playground", page.locator("#explain-words"))
    shoot(page, screenshots, "explain-probs", probs)
