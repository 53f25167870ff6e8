"""The Train tab's "Compare methods" in a real browser: prefix tuning and a linear probe on
the tiny model, trained one after another in the background, then the table and verdict.
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


def test_compare_prefix_and_probe_in_the_browser(page, workdir, screenshots):  # noqa: F811
    from playwright.sync_api import expect

    csv = write_reviews_csv(workdir / "compare.csv", rows=40)
    page.locator("#csv input[type=file]").set_input_files(str(csv))
    expect(page.locator("#data-msg")).to_contain_text("2 labels")
    open_tab(page, "Train")
    expect(page.locator("#start-check")).to_contain_text("Ready: compare.csv")
    page.get_by_role("button", name=re.compile(r"^Compare methods on this data")).click()
    methods = page.locator("#compare-methods")
    for title in ("prompt tuning", "LoRA", "TF-IDF"):
        methods.get_by_label(title, exact=True).uncheck()
    page.locator("#compare").click()
    progress = page.locator("#compare-progress")
    expect(progress).to_contain_text("Comparing")
    table = page.locator("#compare-table")
    expect(table).to_contain_text("linear probe", timeout=180_000)
    expect(table).to_contain_text("prefix tuning")
    expect(progress).to_contain_text("Comparison finished")
    expect(page.locator("#compare-verdict")).to_contain_text("scored best")
    page.locator("#compare-chart .js-plotly-plot").wait_for()
    shoot(page, screenshots, "compare", page.locator("#compare-section"))
