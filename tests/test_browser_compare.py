"""The Train tab's "Compare methods" in a real browser: prefix tuning and a linear probe on
the tiny model with a test CSV and the form's shift CSV (Settings), trained one after another
in the background, then the table, verdict and downloads; a fresh page picks it from the past
comparisons and gets its method boxes ticked again, then picks a generation comparison (a
hand-written comparison.json: BLEU beside the bare model). Fixtures and helpers come from
test_browser.py (same app, same Chromium)."""

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
from tests.test_comparing import write_generation_comparison

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]


def _fits(on, elem_id: str) -> bool:
    """Whether a table's last column ends inside its box (no column scrolled out of view)."""
    return on.evaluate("""(id) => {
        const root = document.querySelector('#' + id), heads = root.querySelectorAll('th');
        return heads[heads.length - 1].getBoundingClientRect().right
            <= root.getBoundingClientRect().right + 1;
    }""", elem_id)


def _open_section(on) -> None:
    open_tab(on, "Train")
    on.get_by_role("button", name=re.compile(r"^Compare methods on this data")).click()


def test_compare_prefix_and_probe_in_the_browser(page, browser, url, workdir,  # noqa: F811
                                                 screenshots, workbench):  # noqa: F811
    from playwright.sync_api import expect

    csv = write_reviews_csv(workdir / "compare.csv", rows=40)
    shift = write_reviews_csv(workdir / "shift-reviews.csv", rows=10)
    test = write_reviews_csv(workdir / "test-reviews.csv", rows=12)
    page.locator("#csv input[type=file]").set_input_files(str(csv))
    expect(page.locator("#data-msg")).to_contain_text("2 labels")
    _open_section(page)
    expect(page.locator("#start-check")).to_contain_text("Ready: compare.csv")
    note = page.locator("#compare-inputs")
    expect(note).to_contain_text("no shift CSV: set one in Settings")
    expect(note).to_contain_text("no test CSV: upload one here")
    methods = page.locator("#compare-methods")
    for title in ("prompt tuning", "LoRA", "TF-IDF"):
        methods.get_by_label(title, exact=True).uncheck()
    # the shift CSV is the form's (Settings), the one Start uses; the test CSV is Compare's
    page.get_by_role("button", name=re.compile(r"^Settings ▼")).click()
    page.locator("#shift-csv input[type=file]").set_input_files(str(shift))
    expect(note).to_contain_text("shift rows: shift-reviews.csv")
    page.locator("#compare-test input[type=file]").set_input_files(str(test))
    expect(note).to_contain_text("test rows: test-reviews.csv (uploaded here)")
    page.locator("#compare").click()
    progress = page.locator("#compare-progress")
    expect(progress).to_contain_text(re.compile("Comparing|Comparison finished"))
    table = page.locator("#compare-table")
    expect(table).to_contain_text("linear probe", timeout=180_000)
    expect(table).to_contain_text("prefix tuning")
    expect(table).to_contain_text("shift F1")
    expect(table).to_contain_text("test F1")
    expect(progress).to_contain_text("Comparison finished")
    expect(progress).to_contain_text("shift rows: shift-reviews.csv (10 rows)")
    assert _fits(page, "compare-table")
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
    boxes = other.locator("#compare-methods")
    expect(boxes.get_by_label("LoRA", exact=True)).to_be_checked()  # the first choice
    other.get_by_role("combobox", name=re.compile("Past comparisons")).click()
    other.get_by_role("option", name=cid, exact=True).click()
    expect(other.locator("#compare-table")).to_contain_text("linear probe")
    expect(other.locator("#compare-table")).to_contain_text("shift F1")
    expect(other.locator("#compare-progress")).to_contain_text("Comparison finished")
    expect(other.locator("#compare-downloads a[href$='-prefix.zip']")).to_have_count(1)
    # its methods are ticked again, and only those: Compare would run it again
    for title in ("prefix tuning", "linear probe"):
        expect(boxes.get_by_label(title, exact=True)).to_be_checked()
    for title in ("prompt tuning", "LoRA", "IA3", "full fine-tuning", "TF-IDF"):
        expect(boxes.get_by_label(title, exact=True)).not_to_be_checked()
    other.locator("#compare-chart .js-plotly-plot").wait_for()
    shoot(other, screenshots, "compare-past", other.locator("#compare-section"))

    # a generation comparison (written by hand: nothing trains) reads BLEU and the bare model
    gen = write_generation_comparison(workbench.comparisons_dir, with_shift=True)
    other.get_by_role("combobox", name=re.compile("Past comparisons")).click()
    other.get_by_role("option", name=gen, exact=True).click()
    gen_table = other.locator("#compare-table")
    expect(gen_table).to_contain_text("val BLEU")
    expect(gen_table).to_contain_text("bare model")
    expect(gen_table).to_contain_text("shift BLEU")  # every column: the widest table
    assert _fits(other, "compare-table")
    expect(other.locator("#compare-progress")).to_contain_text(
        "LoRA scored best (test BLEU 23.4; the bare model 3.9)")
    expect(boxes.get_by_label("full fine-tuning", exact=True)).to_be_checked()
    other.wait_for_function(
        "document.querySelector('#compare-chart .js-plotly-plot')?.layout?.yaxis?.title?.text"
        " === 'BLEU (0-100)'")
    shoot(other, screenshots, "compare-generation", other.locator("#compare-section"))
    other.context.close()
