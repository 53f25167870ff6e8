"""A generation run in a real browser, offline, on a tiny model: the Data tab guesses the
target column, the Train tab trains (BLEU drawn live) and shows the report beside the bare
model with its table of outputs, the Playground generates with the prefix and the bare model
side by side, its Generate box writes the input into the run's template (or not, with "Raw
prompt"), and Inspect opens the run. Screenshots go where test_browser.py puts its own."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from tests.test_browser import (  # noqa: F401  (module-scoped fixtures, reused here)
    TRAIN_TIMEOUT_MS,
    box,
    browser,
    open_tab,
    page,
    screenshots,
    shoot,
    url,
    wait_for_points,
    workbench,
    workdir,
)

pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]

NAMES = ["Aromi", "Cotto", "Zizzi", "Alimentum", "Strada", "Wildwood", "Fitzbillies", "Loch Fyne",
         "The Punter", "Giraffe"]
FOODS = ["Italian", "French", "Chinese", "English", "Indian"]


def write_mrs_csv(path):
    """E2E-like meaning representations, two or three references each."""
    rows = []
    for i, name in enumerate(NAMES):
        mr = f"name[{name}], food[{FOODS[i % 5]}], area[{'riverside' if i % 2 else 'city centre'}]"
        for k in range(2 + i % 2):
            rows.append({"mr": mr, "ref": f"{name} serves {FOODS[i % 5]} food, reference {k}."})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_generation_run_in_the_browser(page, workdir, screenshots, workbench):  # noqa: F811
    from playwright.sync_api import expect

    csv = write_mrs_csv(workdir / "mrs.csv")
    page.locator("#csv input[type=file]").set_input_files(str(csv))
    expect(page.locator("#data-msg")).to_contain_text("Generation task: 25 usable rows")
    expect(page.locator("#data-msg")).to_contain_text("10 distinct inputs")
    expect(page.get_by_role("combobox", name="Text column")).to_have_value("mr")
    expect(page.get_by_role("combobox", name="Target column (texts to generate)")) \
        .to_have_value("ref")
    expect(page.locator("#label-chart")).to_be_hidden()
    shoot(page, screenshots, "g1-data-generation")

    open_tab(page, "Train")
    expect(page.locator("#start-check")).to_contain_text("a generation task")
    page.get_by_role("textbox", name="Run name (optional)").fill("gen run")
    page.locator("#start").click()
    expect(page.locator("#train-status")).to_contain_text("gen run")
    expect(page.locator("#train-status")).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS)
    report = page.locator("#report")
    expect(report).to_contain_text("Held-out results on 2 distinct inputs")
    expect(report).to_contain_text("BLEU")
    expect(report).to_contain_text("bare model (same prompt, no prefix)")
    expect(report).to_contain_text("prefix output")
    expect(report).to_contain_text("bare model output")
    expect(report).to_contain_text("reference 1")
    wait_for_points(page, "eval-plot", 1, TRAIN_TIMEOUT_MS)  # BLEU at each evaluation
    traces = page.evaluate("() => document.querySelector('#eval-plot .js-plotly-plot')"
                           ".data.map(t => t.name)")
    assert traces == ["BLEU", "ROUGE-L", "chrF"]
    page.locator("#baselines .js-plotly-plot").wait_for()
    expect(page.locator("#confusion")).to_be_hidden()
    shoot(page, screenshots, "g2-train-generation")

    open_tab(page, "Playground")
    page.get_by_role("combobox", name="Generation runs").click()
    page.get_by_role("option", name=re.compile(r"^gen run · completed")).click()
    page.keyboard.press("Escape")
    page.locator("#gen2-inputs textarea").fill(
        "name[The Eagle], eatType[coffee shop]\nname[Cotto], food[Italian]")
    page.locator("#gen2-run").click()
    outputs = page.locator("#gen2-results")
    expect(outputs).to_contain_text("prefix: gen run")
    expect(outputs).to_contain_text("bare model, gen run's prompt")
    expect(outputs).to_contain_text("name[The Eagle]")
    outputs.scroll_into_view_if_needed()
    shoot(page, screenshots, "g3-playground-generation")

    # The Generate box writes the input into the run's template, as side by side does (it
    # once continued the bare text: "[Rancho Ranch, Rancho Ranch, ..."); "Raw prompt" does not.
    [run_id] = [r.id for r in workbench.store.list() if r.name == "gen run"]
    mr = "name[The Eagle], eatType[coffee shop]"
    templated = workbench.generate_side_by_side([mr], [run_id], bare=False,
                                                max_new_tokens=40)["output"][0]
    raw = workbench.generate(mr, run_id, 40, raw=True)
    assert templated and templated != raw  # else the page could not show the difference
    page.locator("#gen-prompt textarea").fill(mr)
    page.get_by_role("combobox", name="Prefix", exact=True).click()
    page.get_by_role("option", name=re.compile(r"^gen run · completed")).click()
    page.locator("#gen-run").click()
    generated = page.locator("#gen-output textarea")
    expect(generated).to_have_value(templated)
    page.locator("#gen-prompt").scroll_into_view_if_needed()
    shoot(page, screenshots, "g3b-playground-generate-in-template")
    page.locator("#gen-raw input").check()
    page.locator("#gen-run").click()
    expect(generated).to_have_value(raw)
    shoot(page, screenshots, "g3c-playground-generate-raw")

    open_tab(page, "Inspect")
    page.locator("#inspect-run").get_by_role("combobox").click()
    page.get_by_role("option", name=re.compile(r"^gen run · completed")).click()
    page.locator("#inspect-open").click()
    expect(page.locator("#inspect-msg")).to_contain_text("gen run")
    shoot(page, screenshots, "g4-inspect-generation")


# --- tables and file boxes keep what they show in view (issue 26, item 9) --------------------

LONG_MRS = [
    f"name[{name}], eatType[coffee shop], food[{food}], priceRange[more than £30], customer "
    f"rating[5 out of 5], area[riverside], familyFriendly[yes], near[{near}]"
    for name, food, near in (("Blue Spice", "English", "Avalon"), ("The Cricketers", "Chinese",
                                                                  "All Bar One"),
                             ("Cotto", "Indian", "The Portland Arms"), ("Zizzi", "Japanese",
                                                                        "Café Sicilia"),
                             ("Aromi", "French", "Rainbow Vegetarian Café"),
                             ("Strada", "Italian", "Burger King"))
]
LABELS = ["abbreviation", "description", "entity", "human", "location", "numeric"]


def write_long_pairs_csv(path):
    """E2E-like data: long meaning representations, each with three long references."""
    rows = [{"input": mr, "target": f"{mr.split('[')[1].split(']')[0]} is a coffee shop by the "
             f"river, near {mr.split('near[')[1][:-1]}, that welcomes families; reference {k}."}
            for mr in LONG_MRS for k in range(3)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_questions_csv(path):
    """Questions with six labels whose names are long words."""
    pd.DataFrame({"text": [f"what is the question number {i} about the thing" for i in range(60)],
                  "label": [LABELS[i % 6] for i in range(60)]}).to_csv(path, index=False)
    return path


def outside(tab, elem_id: str, cells: str) -> list[str]:
    """The cells (a selector inside #elem_id) whose box ends right of the component's, or
    whose text does not fit the cell: what a person cannot read without scrolling."""
    return tab.evaluate(
        """([id, cells]) => {
            const right = document.getElementById(id).getBoundingClientRect().right;
            return [...document.querySelectorAll(`#${id} ${cells}`)].filter(c => {
                const text = c.querySelector('.cell-wrap') || c;
                return c.getBoundingClientRect().right > right + 1
                    || text.scrollWidth > text.clientWidth + 1;
            }).map(c => c.innerText.trim());
        }""", [elem_id, cells])


def test_tables_and_file_boxes_keep_their_columns_in_view(  # noqa: F811
        page, workdir, screenshots, workbench):  # noqa: F811
    from playwright.sync_api import expect

    from prefixlab.runs.experiment import execute_run
    from prefixlab.workbench.runs import run_config

    pairs = write_long_pairs_csv(workdir / "long-pairs.csv")
    questions = write_questions_csv(workdir / "questions.csv")
    small = {"epochs": 1, "max_train_examples": 30, "max_eval_examples": 12}
    for csv, name, label, target in ((questions, "questions", "label", None),
                                     (pairs, "long gen", None, "target")):
        cfg = run_config(str(csv), "text" if label else "input", label, small,
                         model=workbench.default_model, target_column=target)
        run_id = workbench.store.create(cfg, workbench.model_info(), name=name)
        assert execute_run(workbench.folder(run_id), workbench.model()) is not None
    workbench.refresh()

    # The preview: the input first, then its target, each cell readable where it is.
    page.locator("#csv input[type=file]").set_input_files(str(pairs))
    expect(page.locator("#data-msg")).to_contain_text("Generation task: 18 usable rows")
    expect(page.locator("#preview thead th").first).to_have_attribute("title", "input")
    expect(page.locator("#preview")).to_contain_text("familyFriendly[yes], near[Avalon]")
    assert outside(page, "preview", "thead th") == []
    page.locator("#preview").screenshot(path=str(screenshots / "g5-preview.png"))

    # Six labels' probabilities: each header on one line, every column in view.
    open_tab(page, "Playground")
    page.get_by_role("combobox", name="Prefixes (trained runs)").click()
    page.get_by_role("option", name=re.compile(r"^questions · completed")).click()
    page.keyboard.press("Escape")
    page.locator("#play-text textarea").fill("what is the abbreviation for the thing\n"
                                             "who was the first human on the moon")
    page.locator("#play-score").click()
    expect(page.locator("#play-results")).to_contain_text("p(abbreviation)")
    assert outside(page, "play-results", "thead th") == []
    lines = page.evaluate("""() => [...document.querySelectorAll('#play-results thead th')]
        .filter(th => th.innerText.startsWith('p('))
        .map(th => { const s = th.querySelector('.header');
                     return s.getBoundingClientRect().height
                            / parseFloat(getComputedStyle(s).lineHeight); })""")
    assert len(lines) == 6 and max(lines) < 1.5, lines  # one line each
    page.locator("#play-results").screenshot(path=str(screenshots / "g5-probabilities.png"))

    # Generation runs side by side: the outputs' column in view, beside the inputs.
    page.get_by_role("combobox", name="Generation runs").click()
    page.get_by_role("option", name=re.compile(r"^long gen · completed")).click()
    page.keyboard.press("Escape")
    page.locator("#gen2-inputs textarea").fill("\n".join(LONG_MRS[:2]))
    page.locator("#gen2-run").click()
    outputs = page.locator("#gen2-results")
    expect(outputs).to_contain_text("prefix: long gen")
    assert outside(page, "gen2-results", "thead th") == []
    output = box(page, "#gen2-results thead th:nth-child(3)")
    table = box(page, "#gen2-results")
    assert output["width"] > table["width"] / 3, (output, table)  # room for sentences
    outputs.screenshot(path=str(screenshots / "g5-side-by-side.png"))

    # The batch upload: its label ends before the file box's Clear button.
    page.locator("#batch-csv input[type=file]").set_input_files(str(questions))
    expect(page.locator("#batch-csv")).to_contain_text(re.compile(r"questions\s*\.csv"))
    label = box(page, "#batch-csv label[data-testid=block-label]")
    clear = box(page, "#batch-csv button[aria-label=Clear]")
    assert label["x"] + label["width"] <= clear["x"], (label, clear)
    page.locator("#batch-csv").screenshot(path=str(screenshots / "g5-batch-upload.png"))
    shoot(page, screenshots, "g5-playground-tables")
