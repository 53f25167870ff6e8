"""The Train tab's "Compare methods" in a real browser: prefix tuning and a linear probe on
the tiny model with a shift CSV, trained one after another in the background, then the
table, verdict and downloads; a fresh page picks it from the past comparisons.
Fixtures and helpers come from test_browser.py (same app, same Chromium)."""

from __future__ import annotations

import re

import pytest

from tests.test_app import write_reviews_csv
from tests.test_browser import (  # noqa: F401  (fixtures used by name)
    browser,
    open_tab,
    page,
    screenshots,
    shoot,
    url,
    workbench,
    workdir,
)

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]


def _open_section(on) -> None:
    open_tab(on, "Train")
    on.get_by_role("button", name=re.compile(r"^Compare methods on this data")).click()


def test_compare_prefix_and_probe_in_the_browser(page, browser, url, workdir,  # noqa: F811
                                                 screenshots):  # noqa: F811
    from playwright.sync_api import expect

    csv = write_reviews_csv(workdir / "compare.csv", rows=40)
    shift = write_reviews_csv(workdir / "shift-reviews.csv", rows=10)
    page.locator("#csv input[type=file]").set_input_files(str(csv))
    expect(page.locator("#data-msg")).to_contain_text("2 labels")
    _open_section(page)
    expect(page.locator("#start-check")).to_contain_text("Ready: compare.csv")
    methods = page.locator("#compare-methods")
    for title in ("prompt tuning", "LoRA", "TF-IDF"):
        methods.get_by_label(title, exact=True).uncheck()
    page.locator("#compare-shift input[type=file]").set_input_files(str(shift))
    expect(page.locator("#compare-shift")).to_contain_text("shift-reviews.csv")
    page.locator("#compare").click()
    progress = page.locator("#compare-progress")
    expect(progress).to_contain_text(re.compile("Comparing|Comparison finished"))
    table = page.locator("#compare-table")
    expect(table).to_contain_text("linear probe", timeout=180_000)
    expect(table).to_contain_text("prefix tuning")
    expect(table).to_contain_text("shift F1")
    expect(progress).to_contain_text("Comparison finished")
    expect(page.locator("#compare-cancel")).to_be_hidden()
    expect(page.locator("#compare-verdict")).to_contain_text("scored best")
    # one link per file (Gradio shows a file's stem and extension apart: "...-table .csv")
    links = page.locator("#compare-downloads a")
    for ending in ("-table.csv", "-comparison.json", "-prefix.zip"):
        expect(links.and_(page.locator(f"[href$='{ending}']"))).to_have_count(1)
    page.locator("#compare-chart .js-plotly-plot").wait_for()
    shoot(page, screenshots, "compare", page.locator("#compare-section"))
    cid = page.locator("#compare-past input").input_value()

    # a fresh page (another visit) finds it among the past comparisons and shows it again
    other = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    other.goto(url)
    other.locator("#csv").wait_for()
    _open_section(other)
    expect(other.locator("#compare-table")).to_be_hidden()
    other.get_by_role("combobox", name=re.compile("Past comparisons")).click()
    other.get_by_role("option", name=cid, exact=True).click()
    expect(other.locator("#compare-table")).to_contain_text("linear probe")
    expect(other.locator("#compare-table")).to_contain_text("shift F1")
    expect(other.locator("#compare-progress")).to_contain_text("Comparison finished")
    expect(other.locator("#compare-downloads a[href$='-prefix.zip']")).to_have_count(1)
    other.locator("#compare-chart .js-plotly-plot").wait_for()
    shoot(other, screenshots, "compare-past", other.locator("#compare-section"))
    other.context.close()
