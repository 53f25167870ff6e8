"""Choosing the learning rate on validation, in a real browser: the Train form's "Also try
learning rates" starts a run that trains once per rate in its worker; the charts draw each
rate's curves in its own color and the report says which rate it kept, on what score.
Fixtures and helpers come from test_browser.py (same app, same Chromium)."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_app import write_reviews_csv
from tests.test_browser import (  # noqa: F401  (fixtures used by name)
    TRAIN_TIMEOUT_MS,
    browser,
    open_tab,
    page,
    screenshots,
    set_slider,
    shoot,
    url,
    workbench,
    workdir,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _trace_names(on, elem_id: str) -> list[str]:
    return on.evaluate(f"() => (document.querySelector('#{elem_id} .js-plotly-plot')?.data"
                       " ?? []).map(t => t.name)")


def test_a_run_trying_two_learning_rates_shows_both_and_keeps_one(
        page, workdir, screenshots, workbench):  # noqa: F811
    from playwright.sync_api import expect

    csv = write_reviews_csv(workdir / "rates.csv", rows=60)
    page.locator("#csv input[type=file]").set_input_files(str(csv))
    expect(page.locator("#data-msg")).to_contain_text("2 labels")
    open_tab(page, "Train")
    expect(page.locator("#start-check")).to_contain_text("Ready: rates.csv")
    page.get_by_role("button", name=re.compile(r"^Settings ▼")).click()
    set_slider(page, "epochs", 3)
    rates = page.locator("#try-learning-rates textarea, #try-learning-rates input").first
    rates.fill("0.05")
    rates.press("Enter")
    shoot(page, screenshots, "2d-train-try-learning-rates-form",
          element=page.locator("#try-learning-rates"))
    page.get_by_role("textbox", name="Run name (optional)").fill("two rates")
    page.locator("#start").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text("two rates")
    expect(status).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS * 2)
    run = next(r for r in workbench.runs() if r.name == "two rates")
    folder = workbench.folder(run.id)
    info = json.loads(folder.config_path.read_text())
    assert info["learning_rate_choice"]["tried"] == [0.005, 0.05]
    chosen = info["run"]["training"]["learning_rate"]
    report = page.locator("#report")
    expect(report).to_contain_text(
        re.compile(rf"Learning rate {chosen:g}, chosen on the validation rows: macro-F1 "
                   r"\d\.\d{3} there, against \d\.\d{3} at "))
    page.locator("#loss-plot .js-plotly-plot").wait_for()
    assert _trace_names(page, "loss-plot") == [
        "train loss, lr 0.005", "validation loss, lr 0.005", "train loss, lr 0.05",
        "validation loss, lr 0.05"]
    assert _trace_names(page, "eval-plot") == ["macro-F1, lr 0.005", "macro-F1, lr 0.05"]
    shoot(page, screenshots, "2d-train-two-learning-rates")
    shoot(page, screenshots, "2d-train-two-learning-rates-loss",
          element=page.locator("#loss-plot"))
    shoot(page, screenshots, "2d-train-two-learning-rates-eval",
          element=page.locator("#eval-plot"))
